"""Speed ratios measured side by side on this machine: ``python benchmarks/run.py [--quick] [--device cpu|cuda]``.

- training: one adversarial training step (FGSM-RS on the full batch, on half of it, PGD-10) over one clean
  step, through the product's own ``AdversarialClassifier.training_step`` + backward + optimizer step;
- attacks: our PGD-10 throughput over torchattacks' PGD-10, same model and batch, both in eval mode;
- floor (only with ``--only floor``): our PGD on the inference fast path over torchattacks' and our step over 2
  forwards, at 1 and 2 threads, for ResNet18, PreAct-ResNet18 and mnist_net (``benchmarks/floor.py``);
- JPEG: our batched ``robust.defenses.jpeg`` over a per-image PIL save/load loop, quality 75;
- suite (long, only with ``--only suite``): the report's threat suite with and without early exit and cascade
  (``benchmarks/suite.py``);
- autoattack (long, only with ``--only autoattack``): the cheap worst case against AutoAttack (the same file);
- report (long, only with ``--only report``): ``evaluate.py report --autoattack``'s computation against
  torchattacks' AutoAttack alone on the same MNIST images (``benchmarks/report_autoattack.py``).

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
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchattacks
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts: its shared parts import as benchmarks.*

from benchmarks.floor import bench_floor  # noqa: E402
from benchmarks.report_autoattack import bench_report_autoattack  # noqa: E402
from benchmarks.suite import MNIST_MODEL, bench_suite, mnist_model, print_suite_accuracy  # noqa: E402
from benchmarks.timing import FULL, QUICK, Row, Sizes, time_interleaved  # noqa: E402
from robust.attacks import default_step, pgd  # noqa: E402
from robust.cli import exit_code  # noqa: E402
from robust.defenses import jpeg, to_uint8  # noqa: E402
from robust.errors import RobustError  # noqa: E402
from robust.files import atomic_write_bytes  # noqa: E402
from robust.machine import machine  # noqa: E402
from robust.models.build import CIFAR10_MEAN, CIFAR10_STD, build_model  # noqa: E402
from robust.training.module import AdversarialClassifier  # noqa: E402
from robust.training.runfiles import shared_data_dir  # noqa: E402

EPS, QUALITY = 8 / 255, 75
PGD_ALPHA = default_step("pgd", EPS)  # the registry's evaluation step: eps/4 = 2/255
KEY_JPEG = "jpeg_batched_over_pil"
BENCHMARKS = ("train", "pgd", "jpeg", "floor", "suite", "autoattack", "report")
DEFAULT_BENCHMARKS = ("train", "pgd", "jpeg")  # the others take minutes: only when named


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
    module = AdversarialClassifier(
        arch="resnet18",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        cifar_stem=True,
        channels_last=variant.channels_last,
        eps=EPS,
        lr_scheduler=None,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
        **kwargs,
    )
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
    labels = {
        "clean": "train step, clean",
        "fgsm_rs": "train step, FGSM-RS",
        "fgsm_rs_half": "train step, FGSM-RS adv_ratio=0.5",
        "pgd": f"train step, {pgd_name}",
    }
    goals = {"fgsm_rs": "<= 2.1"}
    rows = [
        Row(labels[k], variant.label, t[k], len(x), t[k] / t["clean"] if k != "clean" else None, goals.get(k, ""))
        for k in cases
    ]
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
    return (
        [
            Row(f"JPEG q75 {size}, ours", codec, t["ours"], len(x), ratio, goal),
            Row(f"JPEG q75 {size}, PIL loop", "1 thread", t["pil"], len(x)),
        ],
        ratio,
        identical,
    )


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
    if "floor" in only:
        new_rows, keys = bench_floor(device, sizes, run, lambda n, size: sample_images(n, size, seed=2)[0])
        rows += new_rows
        record.update(keys)
    if {"suite", "autoattack"} & set(only):
        suite = suite or parse_args([])
        suite_run = {**run, "repeats": suite.suite_repeats or (1 if sizes.quick else 3), "warmup": 0}
        which = tuple(b for b in ("suite", "autoattack") if b in only)
        new_rows, keys = bench_suite(device, sizes, suite_run, suite, which)
        rows += new_rows
        record.update(keys, suite_repeats=suite_run["repeats"])
    if "report" in only:
        model, name = mnist_model(suite or parse_args([]), sizes, device), "fgsm.pth"
        if model is None and (shared_data_dir() / "MNIST" / "raw").is_dir():
            print("note: a random mnist_net stands in for fgsm.pth in the report rows", flush=True)
            model, name = build_model("mnist_net", mean=(0.0,), std=(1.0,)).to(device).eval(), "random mnist_net"
        if model is not None:
            # one round: each side takes most of a minute, and AutoAttack's minutes dwarf the machine's noise
            new_rows, keys = bench_report_autoattack(model, name, sizes, {**run, "repeats": 1, "warmup": 0})
            rows += new_rows
            record.update(keys)
    print_table(rows)
    print_suite_accuracy(record)
    record.update(
        {
            "device": machine(device),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "batch": sizes.batch,
            "image_size": sizes.image,
            "pgd_steps": sizes.pgd_steps,
            "jpeg_sizes": [sizes.jpeg_small, sizes.jpeg_large],
            "images_per_s": {f"{r.name} [{r.variant}]": round(r.images / r.seconds, 2) for r in rows},
        }
    )
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run, not a measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--repeats", type=int, help="timed rounds per benchmark (median reported); default 5, quick 1")
    p.add_argument("--warmup", type=int, help="untimed rounds first; default 1")
    p.add_argument("--threads", type=int, help="torch intra-op threads (and JPEG codec threads); default torch's")
    p.add_argument(
        "--fast-paths",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure bf16 autocast and channels_last variants (default: on for cuda)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        default=list(DEFAULT_BENCHMARKS),
        help="run only these (default: all but floor, suite, autoattack and report, which take minutes)",
    )
    p.add_argument(
        "--suite-repeats",
        type=int,
        help="suite: timed rounds (median), none warmed up; default 3, quick "
        "1; AutoAttack and the cheap worst cases beside it: always one",
    )
    p.add_argument(
        "--digits-model",
        help="suite: the default digits model's checkpoint (default: configs/digits.yaml "
        "trained once into .cache/benchmarks/digits/; --quick: a stand-in)",
    )
    p.add_argument(
        "--clean-model",
        help="suite: the clean-trained one (default: configs/digits.yaml with "
        "--model.attack none, trained once into .cache/benchmarks/digits_clean/)",
    )
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
