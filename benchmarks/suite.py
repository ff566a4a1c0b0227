"""The threat-suite benchmark (``python benchmarks/run.py --only suite``): the report's whole default threat suite
(``robust.threats.DEFAULT_THREATS``) every example every step, with early exit, and with early exit + cascade, in
interleaved rounds, on the default digits model (``configs/digits.yaml``, what ``make train`` trains), the same
recipe clean-trained, and the authors' robust MNIST ``fgsm.pth`` (Wong et al. 2020) at eps 0.3: time ratios and
every accuracy, which must never be higher than the all-steps figure. On the default digits model and the MNIST
one, the cheap worst case ``pgd_worst`` (as the report runs it, with APGD-100, with Square) against torchattacks'
AutoAttack (standard) on the same images: time ratio and accuracy gap."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchattacks
import yaml
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from benchmarks.timing import Row, Sizes, time_interleaved
from robust.data.modules import Digits, evenly_spaced, mnist_tensors
from robust.data.roots import shared_data_dir
from robust.errors import RobustError
from robust.models.resolve import external_model, load_model
from robust.threats import DEFAULT_THREATS, ThreatSpec, accuracy, predictions, worst_case
from robust.training.module import AdversarialClassifier

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs" / "digits.yaml"  # what `make train` trains
SUITE_CACHE = ROOT / ".cache" / "benchmarks"  # the digits models the suite benchmark trains, once
MNIST_MODEL = ROOT / ".cache" / "fast_adversarial" / "fgsm.pth"  # experiments/mnist.py downloads it there
MNIST_EPS = 0.3  # Wong et al. 2020's MNIST budget
QUICK_SIZE = 8  # the --quick stand-ins train and run on 8x8 digits
# The threat suite's settings side by side: every example every step, early exit, early exit + cascade.
SUITE_MODES = {"all_steps": {"early_exit": False}, "early_exit": {}, "cascade": {"cascade": True}}
SUITE_LABELS = {"all_steps": "all steps", "early_exit": "early exit", "cascade": "early exit+cascade"}
# Issue #28's goals: the suite's time over the all-steps version's, per model.
SUITE_GOALS = {"digits": "<= 0.5", "digits_clean": "<= 0.2"}


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
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(DIGITS_CONFIG),
            "--trainer.logger.init_args.save_dir",
            str(SUITE_CACHE),
            "--trainer.logger.init_args.name",
            name,
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode or not ckpt.is_file():
            raise RobustError(f"training {name} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return ckpt


def quick_digits_model(attack: str, eps: float, steps: int = 6) -> nn.Module:
    """A stand-in for ``--quick``: the recipe's network (ResNet18, CIFAR stem) on 8×8 digits, ``steps`` Adam steps of
    the product's ``training_step`` with ``attack``: a smoke run, not the default model."""
    torch.manual_seed(0)
    data = Digits(batch_size=32, image_size=QUICK_SIZE)
    data.setup()
    module = AdversarialClassifier(
        arch="resnet18",
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        cifar_stem=True,
        attack=attack,
        eps=eps,
        lr_scheduler=None,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
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


def suite_cases(
    device: torch.device, sizes: Sizes, args: argparse.Namespace, keys: tuple[str, ...] | None = None
) -> list[SuiteCase]:
    """The default digits model, the same recipe clean-trained (both at the config's eps, on the first
    ``suite_n`` held-out digits) and the authors' robust MNIST model (eps 0.3, ``suite_n`` evenly spaced test
    images). ``--quick``: stand-ins for the digits models (:func:`quick_digits_model`); the MNIST model must be
    there (``--mnist-model``), else its rows are left out with one line saying so. ``keys``: only these cases
    (default all)."""
    mnist = mnist_model(args, sizes, device)  # first: a missing model stops before minutes of training
    eps, threads = digits_eps(), torch.get_num_threads()
    cases = []
    for key, label, attack, given in (
        ("digits", "digits FGSM-RS", "fgsm_rs", args.digits_model),
        ("digits_clean", "digits clean", "none", args.clean_model),
    ):
        if keys is not None and key not in keys:
            continue
        if given is None and sizes.quick:
            model, size = quick_digits_model(attack, eps), QUICK_SIZE
        else:
            extra = () if attack == "fgsm_rs" else ("--model.attack", attack)
            model = load_model(given or recipe_checkpoint(key, extra, threads))
            size = model.card.image_size
        data = Digits(image_size=size)
        data.setup()
        x, y = (t[: sizes.suite_n] for t in data.val_set.tensors)
        cases.append(SuiteCase(key, label, model.to(device).eval(), x.to(device), y.to(device), eps))
    if mnist is not None:
        x, y = mnist_test(sizes.suite_n)
        name = Path(args.mnist_model).name
        cases.append(SuiteCase("mnist", f"MNIST {name}", mnist, x.to(device), y.to(device), MNIST_EPS))
    return cases


def mnist_model(args: argparse.Namespace, sizes: Sizes, device: torch.device) -> nn.Module | None:
    """The authors' MNIST model (``--mnist-model``), eval mode on ``device``, when it and MNIST are there; else
    ``--quick`` says so in one line and gets None, a full run stops with the same line (its rows are the point)."""
    mnist, raw = Path(args.mnist_model), shared_data_dir() / "MNIST" / "raw"
    if mnist.is_file() and raw.is_dir():
        return external_model(str(mnist), "state_dict", arch="mnist_net").to(device).eval()
    missing = mnist if not mnist.is_file() else raw
    if not sizes.quick:
        raise RobustError(
            f"{missing} is missing: give the authors' fgsm.pth with --mnist-model (experiments/mnist.py "
            "downloads it to .cache/fast_adversarial/) and MNIST under $ROBUST_DATA"
        )
    print(f"note: {missing} is missing: the MNIST rows are left out", flush=True)
    return None


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
    rows = [
        Row(
            f"suite {case.label}, {SUITE_LABELS[m]}",
            f"eps {case.eps:g}",
            t[m],
            len(case.y),
            t[m] / t["all_steps"] if m != "all_steps" else None,
            goal if m != "all_steps" else "",
        )
        for m in specs
    ]
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
    cut_down(attack._autoattack.attacks, quick)
    return attack


def cut_down(parts: list, quick: bool) -> list:
    """AutoAttack's components ``parts``, with ``quick`` cut in place to 2 iterations and 10 Square queries."""
    for part in parts if quick else ():
        for name, value in (("steps", 2), ("n_queries", 10)):
            if hasattr(part, name):
                setattr(part, name, value)
    return parts


# The cheap worst case ``pgd_worst`` beside AutoAttack: as the report runs it; with AutoAttack's 100 APGD iterations;
# with Square (the gradient-free part a masked model needs; ``--square-queries``). Key: (ThreatSpec settings, quick
# settings, label).
CHEAP_SETTINGS = {
    "cheap": ({}, {}, "cheap worst case"),
    "cheap_cascade_apgd100": (
        {"cascade": True, "apgd_steps": 100},
        {"cascade": True, "apgd_steps": 2},
        "cheap worst, cascade, APGD-100",
    ),
    "cheap_cascade_square": (
        {"cascade": True, "square_queries": 1000},
        {"cascade": True, "square_queries": 10},
        "cheap worst, cascade, Square-1000",
    ),
}


def bench_cheap_vs_autoattack(case: SuiteCase, sizes: Sizes, run: dict) -> tuple[list[Row], dict]:
    """The report's cheap worst case ``pgd_worst`` in each of :data:`CHEAP_SETTINGS` against AutoAttack (standard) on
    the first ``aa_n`` of ``case``'s digits or ``aa_mnist_n`` evenly spaced MNIST test images, which, as AutoAttack's
    reference code and our report do, attacks only the images the model gets right. Keys are prefixed
    ``<case.key>_``."""
    if case.key == "mnist":
        x, y = (t.to(case.x.device) for t in mnist_test(sizes.aa_mnist_n))
    else:
        x, y = case.x[: sizes.aa_n], case.y[: sizes.aa_n]
    model, eps = case.model, case.eps
    specs = {
        k: ThreatSpec(eps, steps=sizes.suite_steps, threats=("clean", "pgd_worst"), **(q if sizes.quick else kw))
        for k, (kw, q, _) in CHEAP_SETTINGS.items()
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

    t = time_interleaved({**{k: ours(k) for k in specs}, "autoattack": theirs}, **run)
    acc = {k: (p == y).float().mean().item() for k, p in out.items()}
    union = worst_case(y, [out["cheap"], out["autoattack"]])
    aa = "AutoAttack (quick: cut down)" if sizes.quick else "AutoAttack standard"
    rows = [
        Row(f"{case.label} {label}", f"eps {eps:g}", t[k], len(y), t[k] / t["autoattack"], "<= 0.2")
        for k, (_, _, label) in CHEAP_SETTINGS.items()
    ]
    rows.append(Row(f"{case.label} {aa}, torchattacks", f"eps {eps:g}", t["autoattack"], len(y)))
    k = case.key
    keys = {
        **{f"{k}_{c}_over_autoattack": t[c] / t["autoattack"] for c in specs},
        **{f"{k}_{c}_minus_autoattack_points": 100 * (acc[c] - acc["autoattack"]) for c in specs},
        f"{k}_cheap_vs_autoattack_seconds": t,
        f"{k}_cheap_vs_autoattack_accuracy": {
            **acc,
            "worst_of_cheap_and_autoattack": (union == y).float().mean().item(),
        },
        f"{k}_cheap_vs_autoattack_n": len(y),
    }
    return rows, keys


AUTOATTACK_CASES = ("digits", "mnist")  # issue #28's two models for the cheap worst case against AutoAttack


def bench_suite(
    device: torch.device, sizes: Sizes, run: dict, args: argparse.Namespace, which: tuple[str, ...] = ("suite",)
) -> tuple[list[Row], dict]:
    """``which``: ``suite``, every :func:`suite_cases` model through :func:`bench_suite_case`; ``autoattack``, the
    :data:`AUTOATTACK_CASES` through :func:`bench_cheap_vs_autoattack`."""
    rows: list[Row] = []
    record: dict = {"suite_steps": sizes.suite_steps, "suite_threats": list(DEFAULT_THREATS)}
    keys_needed = None if "suite" in which else AUTOATTACK_CASES
    for case in suite_cases(device, sizes, args, keys_needed):
        if "suite" in which:
            new_rows, keys = bench_suite_case(case, sizes, run)
            rows += new_rows
            record.update(keys)
        if "autoattack" in which and case.key in AUTOATTACK_CASES:
            # one round: AutoAttack's minutes dwarf the machine's noise, and a second would double them
            new_rows, keys = bench_cheap_vs_autoattack(case, sizes, {**run, "repeats": 1})
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
    for key in ("digits", "mnist"):
        if f"{key}_cheap_vs_autoattack_accuracy" in record:
            acc = record[f"{key}_cheap_vs_autoattack_accuracy"]
            print(f"{key} accuracy (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()))
