"""Speed ratios measured side by side on this machine: ``python benchmarks/run.py [--quick] [--device cpu|cuda]``.

- training: one adversarial training step (FGSM-RS on the full batch, on half of it, PGD-10) over one clean
  step, through the product's own ``AdversarialClassifier.training_step`` + backward + optimizer step;
- attacks: our PGD-10 throughput over torchattacks' PGD-10, same model and batch, both in eval mode;
- JPEG: our batched ``robust.defenses.jpeg`` over a per-image PIL save/load loop, quality 75;
- suite (long, only with ``--only suite``): the report's threat suite (``robust.threats.DEFAULT_THREATS``) with
  early exit and with early exit + cascade over every example every step, on the default digits model
  (``configs/digits.yaml``, what ``make train`` trains), the same recipe clean-trained, and the authors' robust
  MNIST ``fgsm.pth`` (Wong et al. 2020) at eps 0.3; time ratios and every accuracy, which must never be higher than
  the all-steps figure. On that MNIST model, the cheap worst case ``pgd_worst`` against torchattacks' AutoAttack
  (standard) on the same images: time ratio and accuracy gap.

Every benchmark runs ours and its reference in alternating rounds (after warm-up rounds), so background load
hits both alike, and reports the median time per batch. ``--fast-paths`` (default on CUDA) adds the bf16
autocast (``--trainer.precision bf16-mixed``) and channels-last (``--model.channels_last true``) variants.
Prints a table, then one JSON object as the last line (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchattacks
import torchvision
import yaml
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import functional as TF

from robust.attacks import default_step, pgd
from robust.cli import exit_code
from robust.data import Digits, evenly_spaced, mnist_tensors
from robust.defenses import jpeg, to_uint8
from robust.errors import RobustError
from robust.files import atomic_write_bytes
from robust.loading import external_model, load_model
from robust.machine import machine
from robust.models import CIFAR10_MEAN, CIFAR10_STD
from robust.module import AdversarialClassifier
from robust.runfiles import shared_data_dir
from robust.threats import DEFAULT_THREATS, ThreatSpec, accuracy, predictions, worst_case

EPS, QUALITY = 8 / 255, 75
PGD_ALPHA = default_step("pgd", EPS)  # the registry's evaluation step: eps/4 = 2/255
KEY_JPEG = "jpeg_batched_over_pil"
ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs" / "digits.yaml"  # what `make train` trains
SUITE_CACHE = ROOT / ".cache" / "benchmarks"  # the digits models the suite benchmark trains, once
MNIST_MODEL = ROOT / ".cache" / "fast_adversarial" / "fgsm.pth"  # experiments/mnist.py downloads it there
MNIST_EPS = 0.3  # Wong et al. 2020's MNIST budget
# The threat suite's settings side by side: every example every step, early exit, early exit + cascade.
SUITE_MODES = {"all_steps": {"early_exit": False}, "early_exit": {}, "cascade": {"cascade": True}}
SUITE_LABELS = {"all_steps": "all steps", "early_exit": "early exit", "cascade": "early exit+cascade"}
# Issue #28's goals: the suite's time over the all-steps version's, per model.
SUITE_GOALS = {"digits": "<= 0.5", "digits_clean": "<= 0.2"}


@dataclass(frozen=True)
class Sizes:
    """Batch and image sizes of one run: training/attack ``batch`` of ``image``×``image``; JPEG (count, side)."""

    batch: int
    image: int
    pgd_steps: int
    jpeg_small: tuple[int, int]
    jpeg_large: tuple[int, int]
    suite_n: int = 100  # images each threat-suite row evaluates
    suite_steps: int = 10  # the report's default PGD/APGD steps
    aa_n: int = 100  # MNIST test images of the cheap-worst-case-vs-AutoAttack row
    quick: bool = False


FULL = Sizes(batch=128, image=32, pgd_steps=10, jpeg_small=(256, 32), jpeg_large=(32, 224))
QUICK = Sizes(batch=2, image=8, pgd_steps=2, jpeg_small=(8, 32), jpeg_large=(2, 64), suite_n=8, suite_steps=2,
              aa_n=4, quick=True)  # fmt: skip
BENCHMARKS = ("train", "pgd", "jpeg", "suite")
DEFAULT_BENCHMARKS = ("train", "pgd", "jpeg")  # the suite takes minutes: only with --only suite


@dataclass(frozen=True)
class Variant:
    """A fast-path setting: bf16 autocast (Lightning's ``bf16-mixed``) and/or channels-last memory format."""

    bf16: bool = False
    channels_last: bool = False

    @property
    def suffix(self) -> str:
        return "".join(s for s, on in (("_bf16", self.bf16), ("_channels_last", self.channels_last)) if on)

    @property
    def label(self) -> str:
        return self.suffix.lstrip("_").replace("_channels_last", "+channels_last") or "fp32"

    def autocast(self, device: torch.device):
        """The autocast context Lightning's ``precision="bf16-mixed"`` puts around ``training_step``."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


@dataclass
class Row:
    """One line of the table: ``seconds`` per batch of ``images``; ``ratio`` against the row's reference."""

    name: str
    variant: str
    seconds: float
    images: int
    ratio: float | None = None
    goal: str = ""


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median seconds per call of each function. Each round calls every function once, in an order rotated
    from round to round, so background load and clock changes hit them all alike; warm-up rounds are not timed.
    (``torch.utils.benchmark.Timer`` times one statement's runs back to back: on a shared machine a load that comes
    and goes would then land on one side of a ratio only.)"""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def sample_images(n: int, size: int, seed: int) -> tuple[Tensor, str]:
    """``n`` real photos as ``n×3×size×size`` float [0, 1], and where they come from: the shared CIFAR-10
    test images for 32×32 when present, else random crops of scikit-learn's two bundled photos (resized)."""
    folder = shared_data_dir() / "cifar10-subset" / "test"
    files = sorted(folder.glob("*/*.png"))
    if size == 32 and len(files) >= n:
        picks = [files[int(i * len(files) / n)] for i in range(n)]  # every class represented
        images = [torchvision.io.decode_image(str(f), mode=torchvision.io.ImageReadMode.RGB) for f in picks]
        return torch.stack(images).float().div_(255), "cifar10-subset/test"
    from sklearn.datasets import load_sample_images

    generator = torch.Generator().manual_seed(seed)
    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in load_sample_images().images]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(torch.randint(max(size, 96), min(photo.shape[1:]) + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=generator))
        crops.append(TF.resize(photo[:, top : top + side, left : left + side], [size, size], antialias=True))
    return torch.stack(crops).float().div_(255), "sklearn sample photos (random crops)"


def pil_jpeg(x: Tensor, quality: int = QUALITY) -> Tensor:
    """The reference: the seed tutorial's per-image PIL save/load loop, on the same uint8 pixels (RGB batch).
    Its pixel conversions are whole-batch numpy (single-threaded), so only the codec loop is per image."""
    images = (np.clip(x.detach().cpu().permute(0, 2, 3, 1).numpy(), 0, 1) * 255).round().astype(np.uint8)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return torch.from_numpy(out.astype(np.float32) / 255).permute(0, 3, 1, 2).to(x.device)


def make_classifier(device: torch.device, variant: Variant, **kwargs) -> AdversarialClassifier:
    """The product's module: ResNet18 with the CIFAR stem, CIFAR-10 normalization, SGD at a constant lr."""
    module = AdversarialClassifier(arch="resnet18", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                   cifar_stem=True, channels_last=variant.channels_last, eps=EPS, lr_scheduler=None,
                                   optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, nesterov=True,
                                                     weight_decay=5e-4), **kwargs)  # fmt: skip
    return module.to(device)


def bench_training(x: Tensor, y: Tensor, sizes: Sizes, variant: Variant, run: dict) -> tuple[list[Row], dict]:
    """Clean, FGSM-RS (full and half batch) and PGD training steps, each as Lightning's automatic
    optimization runs it: zero_grad, ``training_step`` under the precision's autocast, backward, step."""
    cases = {
        "clean": {"attack": "none"},
        "fgsm_rs": {"attack": "fgsm_rs"},
        "fgsm_rs_half": {"attack": "fgsm_rs", "adv_ratio": 0.5},
        "pgd": {"attack": "pgd", "attack_steps": sizes.pgd_steps},
    }
    steps = {}
    for name, kwargs in cases.items():
        torch.manual_seed(0)
        module = make_classifier(x.device, variant, **kwargs).train()
        optimizer = module.configure_optimizers()

        def step(module=module, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with variant.autocast(x.device):
                loss = module.training_step((x, y), 0)
            loss.backward()
            optimizer.step()

        steps[name] = step
    t = time_interleaved(steps, **run)
    pgd_name = f"PGD-{sizes.pgd_steps}"
    labels = {"clean": "train step, clean", "fgsm_rs": "train step, FGSM-RS", "fgsm_rs_half": "train step, "
              "FGSM-RS adv_ratio=0.5", "pgd": f"train step, {pgd_name}"}  # fmt: skip
    goals = {"fgsm_rs": "<= 2.1"}
    rows = [Row(labels[k], variant.label, t[k], len(x), t[k] / t["clean"] if k != "clean" else None, goals.get(k, ""))
            for k in cases]  # fmt: skip
    s = variant.suffix
    keys = {
        f"fgsm_step_over_clean_step{s}": t["fgsm_rs"] / t["clean"],
        f"fgsm_half_step_over_clean_step{s}": t["fgsm_rs_half"] / t["clean"],
        f"pgd{sizes.pgd_steps}_step_over_clean_step{s}": t["pgd"] / t["clean"],
    }
    return rows, keys


def bench_pgd(x: Tensor, y: Tensor, sizes: Sizes, variant: Variant, run: dict) -> tuple[list[Row], dict]:
    """Our ``pgd`` against ``torchattacks.PGD``: same eval-mode model, batch, eps, step and steps."""
    torch.manual_seed(0)
    model = make_classifier(x.device, variant).eval()
    theirs = torchattacks.PGD(model, eps=EPS, alpha=PGD_ALPHA, steps=sizes.pgd_steps, random_start=True)

    def ours_fn() -> None:
        with variant.autocast(x.device):
            pgd(model, x, y, EPS, PGD_ALPHA, sizes.pgd_steps)

    def theirs_fn() -> None:
        with variant.autocast(x.device):
            theirs(x, y)

    t = time_interleaved({"ours": ours_fn, "torchattacks": theirs_fn}, **run)
    ratio = t["torchattacks"] / t["ours"]
    rows = [
        Row(f"PGD-{sizes.pgd_steps} attack, ours", variant.label, t["ours"], len(x), ratio, ">= 1.0 (CPU), 1.5 (GPU)"),
        Row(f"PGD-{sizes.pgd_steps} attack, torchattacks", variant.label, t["torchattacks"], len(x)),
    ]
    return rows, {f"pgd_over_torchattacks{variant.suffix}": ratio}


def bench_jpeg(x: Tensor, run: dict) -> tuple[list[Row], float, bool]:
    """Our batched JPEG (threaded CPU codec, or nvjpeg on CUDA) against the per-image PIL loop."""
    identical = torch.equal(to_uint8(jpeg(x, QUALITY)), to_uint8(pil_jpeg(x)))
    t = time_interleaved({"ours": lambda: jpeg(x, QUALITY), "pil": lambda: pil_jpeg(x)}, **run)
    ratio = t["pil"] / t["ours"]
    size = f"{len(x)}×{x.shape[-2]}×{x.shape[-1]}"
    threads = torch.get_num_threads()
    codec = "nvjpeg" if x.is_cuda else f"{threads} thread{'s' if threads > 1 else ''}"
    goal = ">= 20 (GPU)" if x.is_cuda else ">= 3"
    return [Row(f"JPEG q75 {size}, ours", codec, t["ours"], len(x), ratio, goal),
            Row(f"JPEG q75 {size}, PIL loop", "1 thread", t["pil"], len(x))], ratio, identical  # fmt: skip


@dataclass
class SuiteCase:
    """One model of the suite benchmark: ``key`` (JSON), ``label`` (table), the eval-mode model, its held-out
    images ``x`` (``N×C×H×W`` in [0, 1]) and labels ``y``, and the budget ``eps`` (L-inf)."""

    key: str
    label: str
    model: nn.Module
    x: Tensor
    y: Tensor
    eps: float


def digits_eps() -> float:
    """``configs/digits.yaml``'s eps: the budget the default digits model is trained and validated at."""
    return float(yaml.safe_load(DIGITS_CONFIG.read_text())["model"]["eps"])


def recipe_checkpoint(name: str, extra: tuple[str, ...], threads: int) -> Path:
    """``configs/digits.yaml`` trained by ``train.py fit`` as ``make train`` runs it (``extra``: overrides), once:
    its ``best.ckpt`` under ``.cache/benchmarks/<name>/``, trained in a subprocess when missing (the default
    recipe: about 6½ min on a 2-core CPU)."""
    ckpt = SUITE_CACHE / name / "best.ckpt"
    if not ckpt.is_file():
        print(f"training {name} once (configs/digits.yaml {' '.join(extra)}) into {ckpt.parent}", flush=True)
        cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(DIGITS_CONFIG),
               "--trainer.logger.init_args.save_dir", str(SUITE_CACHE), "--trainer.logger.init_args.name", name,
               "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode or not ckpt.is_file():
            raise RobustError(f"training {name} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return ckpt


def quick_digits_model(attack: str, eps: float, steps: int = 6) -> nn.Module:
    """A stand-in for ``--quick``: the recipe's network (ResNet18, CIFAR stem) on 8×8 digits, ``steps`` Adam steps of
    the product's ``training_step`` with ``attack``: a smoke run, not the default model."""
    torch.manual_seed(0)
    data = Digits(batch_size=32, image_size=8)
    data.setup()
    module = AdversarialClassifier(arch="resnet18", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3, cifar_stem=True,
                                   attack=attack, eps=eps, lr_scheduler=None,
                                   optimizer=partial(torch.optim.Adam, lr=1e-3))  # fmt: skip
    optimizer = module.configure_optimizers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer here
        for (x, y), _ in zip(data.train_dataloader(), range(steps), strict=False):
            optimizer.zero_grad(set_to_none=True)
            module.training_step((x, y), 0).backward()
            optimizer.step()
    return module.model.eval()


def mnist_test(n: int) -> tuple[Tensor, Tensor]:
    """``n`` evenly spaced MNIST test images (as ``evaluate.py report --data mnist --limit n`` takes them) and labels,
    from ``$ROBUST_DATA/MNIST/raw``."""
    x, y = mnist_tensors(shared_data_dir(), train=False, download=False)
    idx = list(getattr(evenly_spaced(TensorDataset(x, y), n), "indices", range(len(y))))
    return x[idx], y[idx]


def suite_cases(device: torch.device, sizes: Sizes, args: argparse.Namespace) -> list[SuiteCase]:
    """The default digits model, the same recipe clean-trained (both at the config's eps, on the first
    ``suite_n`` held-out digits) and the authors' robust MNIST model (eps 0.3, ``suite_n`` evenly spaced test
    images). ``--quick``: stand-ins for the digits models (:func:`quick_digits_model`); the MNIST model must be
    there (``--mnist-model``), else its rows are left out with one line saying so."""
    mnist, raw = Path(args.mnist_model), shared_data_dir() / "MNIST" / "raw"
    if not mnist.is_file() and not sizes.quick:  # before minutes of training the digits models
        raise RobustError(f"{mnist} is missing: give the authors' fgsm.pth with --mnist-model (experiments/mnist.py "
                          "downloads it to .cache/fast_adversarial/)")  # fmt: skip
    eps, threads = digits_eps(), torch.get_num_threads()
    cases = []
    for key, label, attack, given in (("digits", "digits FGSM-RS", "fgsm_rs", args.digits_model),
                                      ("digits_clean", "digits clean", "none", args.clean_model)):  # fmt: skip
        if given is None and sizes.quick:
            model = quick_digits_model(attack, eps)
        else:
            extra = () if attack == "fgsm_rs" else ("--model.attack", attack)
            model = load_model(given or recipe_checkpoint(key, extra, threads))
        size = model.card.image_size if hasattr(model, "card") else 8
        data = Digits(image_size=size)
        data.setup()
        x, y = (t[: sizes.suite_n] for t in data.val_set.tensors)
        cases.append(SuiteCase(key, label, model.to(device).eval(), x.to(device), y.to(device), eps))
    if mnist.is_file() and (raw.is_dir() or not sizes.quick):
        model = external_model(str(mnist), "state_dict", arch="mnist_net").to(device).eval()
        x, y = mnist_test(sizes.suite_n)
        cases.append(SuiteCase("mnist", f"MNIST {mnist.name}", model, x.to(device), y.to(device),
                               MNIST_EPS))  # fmt: skip
    else:
        print(f"note: {mnist if not mnist.is_file() else raw} is missing: the MNIST rows are left out", flush=True)
    return cases


def never_higher(acc: dict[str, float], reference: dict[str, float]) -> bool:
    """Whether every accuracy in ``acc`` is at most ``reference``'s (the all-steps run's), and the targeted success
    rate (lower is better) at least it."""
    return all(acc[k] >= v if k == "targeted_success" else acc[k] <= v for k, v in reference.items())


def bench_suite_case(case: SuiteCase, sizes: Sizes, run: dict) -> tuple[list[Row], dict]:
    """The whole default threat suite on ``case``'s images, all steps vs early exit vs early exit + cascade
    (interleaved rounds, medians); every threat's accuracy of each."""
    specs = {mode: ThreatSpec(case.eps, steps=sizes.suite_steps, **kw) for mode, kw in SUITE_MODES.items()}
    acc: dict[str, dict[str, float]] = {}

    def call(mode: str) -> Callable[[], None]:
        def fn() -> None:
            acc[mode] = accuracy(case.model, case.x, case.y, specs[mode])

        return fn

    t = time_interleaved({mode: call(mode) for mode in specs}, **run)
    goal = SUITE_GOALS.get(case.key, "")
    rows = [Row(f"suite {case.label}, {SUITE_LABELS[m]}", f"eps {case.eps:g}", t[m], len(case.y),
                t[m] / t["all_steps"] if m != "all_steps" else None, goal if m != "all_steps" else "")
            for m in specs]  # fmt: skip
    k = f"suite_{case.key}"
    keys = {
        f"{k}_early_exit_over_all_steps": t["early_exit"] / t["all_steps"],
        f"{k}_cascade_over_all_steps": t["cascade"] / t["all_steps"],
        f"{k}_seconds": t,
        f"{k}_accuracy": acc,
        f"{k}_never_higher": all(never_higher(acc[m], acc["all_steps"]) for m in ("early_exit", "cascade")),
        f"{k}_eps": case.eps,
        f"{k}_n": len(case.y),
    }
    return rows, keys


def autoattack_reference(model: nn.Module, eps: float, quick: bool):
    """torchattacks' AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square 5,000 queries), seed 0; with
    ``quick`` its iterations cut to 2 and Square's queries to 10 (a smoke run, not AutoAttack)."""
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    if quick:
        for part in attack._autoattack.attacks:
            for name, value in (("steps", 2), ("n_queries", 10)):
                if hasattr(part, name):
                    setattr(part, name, value)
    return attack


def bench_cheap_vs_autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, sizes: Sizes, run: dict
) -> tuple[list[Row], dict]:
    """The report's cheap worst case ``pgd_worst`` (as the report runs it; with the cascade; with the cascade and
    AutoAttack's 100 APGD iterations) against AutoAttack (standard) on the same images, which, as AutoAttack's
    reference code and our report do, attacks only the images the model gets right."""
    cheap = {"cheap": {}, "cheap_cascade": {"cascade": True}, "cheap_cascade_apgd100": {"cascade": True,
             "apgd_steps": 2 if sizes.quick else 100}}  # fmt: skip
    labels = {"cheap": "cheap worst case", "cheap_cascade": "cheap worst case, cascade",
              "cheap_cascade_apgd100": "cheap worst, cascade, APGD-100"}  # fmt: skip
    specs = {
        k: ThreatSpec(eps, steps=sizes.suite_steps, threats=("clean", "pgd_worst"), **kw) for k, kw in cheap.items()
    }
    reference = autoattack_reference(model, eps, sizes.quick)
    out: dict[str, Tensor] = {}

    def ours(key: str) -> Callable[[], None]:
        def fn() -> None:
            out[key] = predictions(model, x, y, specs[key])["pgd_worst"]

        return fn

    def theirs() -> None:
        with torch.no_grad():
            pred = model(x).argmax(1)
        right = pred == y
        if right.any():
            made = reference(x[right], y[right])
            with torch.no_grad():
                pred[right] = model(made).argmax(1)
        model.zero_grad(set_to_none=True)  # some torchattacks components backpropagate into the weights
        out["autoattack"] = pred

    t = time_interleaved({**{k: ours(k) for k in cheap}, "autoattack": theirs}, **run)
    acc = {k: (p == y).float().mean().item() for k, p in out.items()}
    union = worst_case(y, [out["cheap"], out["autoattack"]])
    aa = "AutoAttack (quick: cut down)" if sizes.quick else "AutoAttack standard"
    rows = [Row(f"MNIST {labels[k]}", f"eps {eps:g}", t[k], len(y), t[k] / t["autoattack"], "<= 0.2")
            for k in cheap]  # fmt: skip
    rows.append(Row(f"MNIST {aa}, torchattacks", f"eps {eps:g}", t["autoattack"], len(y)))
    keys = {
        **{f"{k}_over_autoattack": t[k] / t["autoattack"] for k in cheap},
        **{f"{k}_minus_autoattack_points": 100 * (acc[k] - acc["autoattack"]) for k in cheap},
        "cheap_vs_autoattack_seconds": t,
        "cheap_vs_autoattack_accuracy": {**acc, "worst_of_cheap_and_autoattack": (union == y).float().mean().item()},
        "cheap_vs_autoattack_n": len(y),
    }
    return rows, keys


def bench_suite(device: torch.device, sizes: Sizes, run: dict, args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Every :func:`suite_cases` model through :func:`bench_suite_case`, then, on the MNIST model,
    :func:`bench_cheap_vs_autoattack`."""
    rows: list[Row] = []
    record: dict = {"suite_steps": sizes.suite_steps, "suite_threats": list(DEFAULT_THREATS)}
    for case in suite_cases(device, sizes, args):
        new_rows, keys = bench_suite_case(case, sizes, run)
        rows += new_rows
        record.update(keys)
        if case.key == "mnist":
            x, y = (t.to(device) for t in mnist_test(sizes.aa_n))
            # one round: AutoAttack's minutes dwarf the machine's noise, and a second would double them
            new_rows, keys = bench_cheap_vs_autoattack(case.model, x, y, case.eps, sizes, {**run, "repeats": 1})
            rows += new_rows
            record.update(keys)
    return rows, record


def print_suite_accuracy(record: dict) -> None:
    """The suite's accuracies (%) per model and setting: the figures to claim, and whether any is above the
    all-steps run's."""
    keys = [k.removesuffix("_accuracy") for k in record if k.startswith("suite_") and k.endswith("_accuracy")]
    if not keys:
        return
    print(f"\n{'threat suite':<22} {'setting':<20} {'clean':>6} {'pgd_worst':>9} {'jpeg_worst':>10}  never higher")
    for k in keys:
        for mode, acc in record[f"{k}_accuracy"].items():
            figures = " ".join(
                f"{100 * acc[t]:{w}.1f}" for t, w in (("clean", 6), ("pgd_worst", 9), ("jpeg_worst", 10))
            )
            check = "" if mode == "all_steps" else str(record[f"{k}_never_higher"])
            print(f"{k.removeprefix('suite_'):<22} {SUITE_LABELS[mode]:<20} {figures}  {check}")
    if "cheap_vs_autoattack_accuracy" in record:
        acc = record["cheap_vs_autoattack_accuracy"]
        print("MNIST accuracy (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()))


def print_table(rows: list[Row]) -> None:
    head = f"{'benchmark':<44} {'variant':<20} {'ms/batch':>10} {'images/s':>10} {'ratio':>7}  goal"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else " " * 7
        print(f"{r.name:<44} {r.variant:<20} {r.seconds * 1e3:10.1f} {r.images / r.seconds:10.1f} {ratio}  {r.goal}")


def run_benchmarks(
    device: torch.device,
    sizes: Sizes,
    repeats: int,
    warmup: int,
    fast_paths: bool,
    only: tuple[str, ...] = DEFAULT_BENCHMARKS,
    suite: argparse.Namespace | None = None,
) -> dict:
    """Run the benchmarks named in ``only``; print the table; return the JSON record (ratios, settings, images/s).
    ``suite``: the suite benchmark's options (``suite_repeats``, ``digits_model``, ``clean_model``,
    ``mnist_model``); its rounds are not warmed up (a report pays its first call too)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    run = {"repeats": repeats, "warmup": warmup, "sync": sync}
    rows: list[Row] = []
    record: dict = {}
    benches = [bench for name, bench in (("train", bench_training), ("pgd", bench_pgd)) if name in only]
    if benches:
        x, record["train_images"] = sample_images(sizes.batch, sizes.image, seed=0)
        x, y = x.to(device), torch.randint(0, 10, (sizes.batch,), generator=torch.Generator().manual_seed(0)).to(device)
        variants = [Variant()]
        if fast_paths:
            bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
            variants += [Variant(channels_last=True)] + ([Variant(bf16=True), Variant(True, True)] if bf16 else [])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer here
            for variant in variants:
                for bench in benches:
                    new_rows, keys = bench(x, y, sizes, variant, run)
                    rows += new_rows
                    record.update(keys)
    if "jpeg" in only:
        for key, (n, side) in ((KEY_JPEG, sizes.jpeg_small), (f"{KEY_JPEG}_224", sizes.jpeg_large)):
            images, record[f"{key}_images"] = sample_images(n, side, seed=1)
            new_rows, record[key], record[f"{key}_pixels_identical"] = bench_jpeg(images.to(device), run)
            rows += new_rows
    if "suite" in only:
        suite = suite or parse_args([])
        suite_run = {**run, "repeats": suite.suite_repeats or (1 if sizes.quick else 3), "warmup": 0}
        new_rows, keys = bench_suite(device, sizes, suite_run, suite)
        rows += new_rows
        record.update(keys, suite_repeats=suite_run["repeats"])
    print_table(rows)
    print_suite_accuracy(record)
    record.update({
        "device": machine(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup, "batch": sizes.batch,
        "image_size": sizes.image, "pgd_steps": sizes.pgd_steps, "jpeg_sizes": [sizes.jpeg_small, sizes.jpeg_large],
        "images_per_s": {f"{r.name} [{r.variant}]": round(r.images / r.seconds, 2) for r in rows},
    })  # fmt: skip
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run, not a measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--repeats", type=int, help="timed rounds per benchmark (median reported); default 5, quick 1")
    p.add_argument("--warmup", type=int, help="untimed rounds first; default 1")
    p.add_argument("--threads", type=int, help="torch intra-op threads (and JPEG codec threads); default torch's")
    p.add_argument("--fast-paths", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure bf16 autocast and channels_last variants (default: on for cuda)")  # fmt: skip
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(DEFAULT_BENCHMARKS),
                   help="run only these (default: all but suite, which takes minutes)")  # fmt: skip
    p.add_argument("--suite-repeats", type=int, help="suite: timed rounds (median), none warmed up; default 3, quick "
                   "1; AutoAttack and the cheap worst cases beside it: always one")  # fmt: skip
    p.add_argument("--digits-model", help="suite: the default digits model's checkpoint (default: configs/digits.yaml "
                   "trained once into .cache/benchmarks/digits/; --quick: a stand-in)")  # fmt: skip
    p.add_argument("--clean-model", help="suite: the clean-trained one (default: configs/digits.yaml with "
                   "--model.attack none, trained once into .cache/benchmarks/digits_clean/)")  # fmt: skip
    p.add_argument("--mnist-model", default=str(MNIST_MODEL), help="suite: the authors' MNIST fgsm.pth (mnist_net)")
    p.add_argument("--out", help="also write the JSON record to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    if repeats < 1 or warmup < 0 or any(v is not None and v < 1 for v in (args.threads, args.suite_repeats)):
        raise RobustError("--repeats, --suite-repeats and --threads must be at least 1, and --warmup at least 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fast_paths = args.fast_paths if args.fast_paths is not None else device.type == "cuda"
    sizes = QUICK if args.quick else FULL
    record = run_benchmarks(device, sizes, repeats, warmup, fast_paths, tuple(args.only), suite=args)
    line = json.dumps(record)
    if args.out:
        atomic_write_bytes(args.out, (line + "\n").encode())
    print(line)
    return record


if __name__ == "__main__":
    sys.exit(exit_code(main))
