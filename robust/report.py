"""Robustness report: every threat of the design on the same images, for a list of eps; JSON, Markdown, plot.

:func:`evaluate` measures accuracies in [0, 1] under the keys of :data:`robust.threats.THREATS`
(``targeted_success`` is the fraction of images pushed to a random other class, so lower is better there;
``pgd_worst`` and ``jpeg_worst`` are the per-example worst cases, the figures to claim). :func:`honesty_flags`
marks figures that cannot be trusted as they stand. :func:`write_report` writes ``report.json``, ``report.md`` and
``robustness_curve.png`` atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader

from robust.card import ModelCard
from robust.checks import check_at_least_one
from robust.data import (
    CIFAR10,
    CIFAR10_NAMES,
    DIGIT_NAMES,
    MNIST,
    Digits,
    class_folders,
    data_root,
    evenly_spaced,
    folder_transform,
    image_folder,
)
from robust.errors import RobustError
from robust.files import atomic_write_files, sha256_path
from robust.hf import HF_PREFIX
from robust.images import check_images
from robust.models import card_of
from robust.sharding import Journal, World, sharded_counts
from robust.threats import (
    AUTOATTACK_THREATS,
    DEFAULT_THREATS,
    THREATS,
    WORST_CASES,
    ThreatSpec,
    correct_counts,
    predictions,
)

FILES = ("report.json", "report.md", "robustness_curve.png")


# ---- data ----------------------------------------------------------------------------------------


def _align_labels(ds, data_names: Sequence[str], card: ModelCard) -> str:
    """Make the dataset's labels the model's class ids (``ds.target_transform``); say how they were matched.

    The data's classes must be the model's, by name (in any order); anything else is a clear error."""
    model_names = list(card.class_names)
    data_names = list(data_names)
    if data_names == model_names:
        return "by name"
    if sorted(data_names) == sorted(model_names):
        if not hasattr(ds, "target_transform"):
            raise RobustError("the model has the data's classes in another order, which this data cannot remap")
        ds.target_transform = [model_names.index(name) for name in data_names].__getitem__
        return "by name (reordered)"
    raise RobustError(
        f"the data's {len(data_names)} classes ({', '.join(data_names[:5])}{', …' if len(data_names) > 5 else ''}) "
        f"are not the model's {len(model_names)} classes ({', '.join(model_names[:5])}"
        f"{', …' if len(model_names) > 5 else ''})"
    )


def data_class_names(data: str) -> tuple[str, ...] | None:
    """The class names of ``--data`` (``digits``, ``mnist``, ``cifar10`` or an image folder's class sub-folders);
    None when ``data`` is none of these."""
    if data in ("digits", "mnist"):
        return DIGIT_NAMES
    if data == "cifar10":
        return CIFAR10_NAMES
    return class_folders(Path(data)) if Path(data).is_dir() else None


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")


def _check_not_a_split_root(root: Path, classes: Sequence[str]) -> None:
    """An image-folder root whose "classes" are its splits (``train/``, ``test/``): say which folder to pass."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits and len(splits) == len(classes):
        held_out = next((c for c in classes if c.lower() != "train"), classes[0])
        raise RobustError(f"{root} holds the splits {', '.join(classes)}, not class folders: pass one split, "
                          f"e.g. --data {root / held_out} (the held-out images)")  # fmt: skip


def _folder_fingerprint(root: Path, samples: Iterable[tuple[str, int]]) -> str:
    """sha256 over the sorted relative paths and sizes of the folder's image files (cheap, content-sensitive)."""
    digest = hashlib.sha256()
    for path, _ in sorted(samples):
        rel = Path(path).relative_to(root).as_posix()
        digest.update(f"{rel}:{Path(path).stat().st_size}\n".encode())
    return digest.hexdigest()


def eval_data(
    data: str,
    card: ModelCard,
    limit: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    cifar10_root: str = "data/cifar10",
    mnist_root: str | None = None,
) -> tuple[DataLoader, dict]:
    """The evaluation loader for ``data`` (``digits``, ``mnist``, ``cifar10`` or an image-folder path) and its
    identity.

    Images come at the model card's ``image_size`` and ``channels`` (folders and CIFAR-10 via
    :func:`robust.data.folder_transform` with the card's ``resize``; MNIST is 28×28 grayscale and must be fed as
    such); labels are the model's class ids. ``limit`` keeps that many evenly spaced images. ``mnist_root``: the
    folder holding ``MNIST/raw`` (default ``$ROBUST_DATA``, else ``data``).
    """
    if limit is not None:
        check_at_least_one(limit, "limit")
    check_at_least_one(batch_size, "batch size")
    if num_workers < 0:
        raise RobustError(f"num_workers must be 0 or more, got {num_workers}")
    size, resize, channels = card.image_size, card.resize, card.channels
    if data == "digits":
        dm = Digits(image_size=size, limit=limit, channels=channels)
        dm.setup()
        ds, identity = dm.val_set, {"name": "digits", "split": "val", "split_seed": dm.split_seed}
        match = _align_labels(ds, DIGIT_NAMES, card)
    elif data == "mnist":
        if size != MNIST.image_size:
            raise RobustError(f"MNIST images are {MNIST.image_size}×{MNIST.image_size}; the model takes {size}×{size}")
        dm = MNIST(root=mnist_root or data_root(), limit=None, download=True, channels=channels)
        dm.setup()
        match = _align_labels(dm.val_set, DIGIT_NAMES, card)
        ds = evenly_spaced(dm.val_set, limit)
        identity = {"name": "mnist", "root": str(Path(dm.root).resolve()), "split": "test"}
    elif data == "cifar10":
        from torchvision import datasets

        CIFAR10(root=cifar10_root).prepare_data()
        base = datasets.CIFAR10(cifar10_root, train=False, transform=folder_transform(size, resize, channels=channels))
        match = _align_labels(base, CIFAR10_NAMES, card)
        ds = evenly_spaced(base, limit)
        identity = {"name": "cifar10", "root": str(Path(cifar10_root).resolve()), "split": "test"}
    else:
        root = Path(data)
        if not root.is_dir():
            raise RobustError(f"--data must be digits, mnist, cifar10 or an image folder; {data!r} is none of these")
        base = image_folder(root, folder_transform(size, resize, channels=channels))
        _check_not_a_split_root(root, base.classes)
        match = _align_labels(base, base.classes, card)
        identity = {"name": "folder", "path": str(root.resolve()), "classes": list(base.classes),
                    "fingerprint": _folder_fingerprint(root, base.samples)}  # fmt: skip
        ds = evenly_spaced(base, limit)
    identity.update(labels=match, limit=limit, n=len(ds))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers), identity


# ---- measuring -----------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    loader: DataLoader | Sequence[tuple[Tensor, Tensor]],
    eps_list: Sequence[float],
    steps: int = 10,
    alpha: float | None = None,
    restarts: int = 1,
    quality: int = 75,
    autoattack: bool = False,
    seed: int = 0,
    progress: bool = True,
    world: World | None = None,
    journal: Journal | None = None,
    threats: Sequence[str] | None = None,
    norm: str = "linf",
    apgd_steps: int | None = None,
    apgd_restarts: int | None = None,
) -> dict:
    """Accuracy of ``model`` under every threat, on the same images, for each eps.

    Args:
        model: takes ``N×3×H×W`` images in [0, 1], returns logits; evaluated with BatchNorm in eval mode.
        loader: a DataLoader or a list of batches ``(x, y)``: ``x`` float in [0, 1], ``y`` int64 class ids of
            ``model``.
        eps_list: L-inf budgets in [0, 1] pixel units. steps, restarts: PGD iterations and random restarts
            (for ``pgd``, ``apgd``, ``bpda_pgd`` and the targeted attack). alpha: PGD step (default
            :func:`robust.threats.default_alpha`).
        quality: JPEG quality of the defense. autoattack: also run torchattacks' standard AutoAttack (slow).
        threats: the keys of :data:`robust.threats.THREATS` to measure (default every one but ``autoattack``;
            ``autoattack`` and ``aa_worst`` are added by ``autoattack``), in :data:`THREATS` order.
        norm: the threat model, ``linf`` or ``l2`` (eps in its units). apgd_steps, apgd_restarts: APGD-CE's own
            (default ``steps`` and ``restarts``; AutoAttack's standard APGD-CE is 100 × 1).
        seed: seeds random starts and the random targets (batch ``i`` with ``seed + i``; the global RNG is left
            untouched).
        world: the processes sharing the batches (:func:`robust.sharding.launch`; default this process alone, on
            the model's device); every process gets the same result. journal: where finished batches' counts are
            kept and, when resuming, read back (:class:`robust.sharding.Journal`).
    Returns: ``{"rows": [{"eps", "alpha", <threat>: accuracy in [0, 1], ...}, ...], "flags": [...], "n",
    "eps", "steps", "restarts", "alpha", "quality", "seed", "autoattack"}``; rows sorted by eps. Accuracies are
    counts of correct predictions over ``n``, whatever the number of processes.
    """
    eps_list = sorted({float(e) for e in eps_list})
    if not eps_list:
        raise RobustError("give at least one eps")
    asked = set(threats or DEFAULT_THREATS) | (set(AUTOATTACK_THREATS) if autoattack else set())
    keys = tuple(k for k in THREATS if k in asked)
    if asked - set(keys):
        raise RobustError(f"unknown threat(s) {', '.join(sorted(asked - set(keys)))}; known: {', '.join(THREATS)}")
    specs = [ThreatSpec(e, alpha, steps, restarts, quality, seed, keys, norm=norm, apgd_steps=apgd_steps,
                        apgd_restarts=apgd_restarts) for e in eps_list]  # fmt: skip
    world = world or World(next(model.parameters()).device)
    count = partial(batch_counts, model, keys, world.device)
    totals = sharded_counts(loader, specs, count, 1 + len(keys), world, journal, progress).tolist()
    n = totals[0][0]
    if n == 0:
        raise RobustError("the evaluation data holds no images")
    rows = [{"eps": s.eps, "alpha": s.step, **{k: c / n for k, c in zip(keys, t[1:], strict=True)}}
            for s, t in zip(specs, totals, strict=True)]  # fmt: skip
    return {"rows": rows, "flags": honesty_flags(rows, n), "n": n, "eps": eps_list, "steps": int(steps),
            "restarts": int(restarts), "alpha": alpha, "quality": int(quality), "seed": int(seed),
            "autoattack": bool(autoattack), "norm": norm, "apgd_steps": apgd_steps or int(steps),
            "apgd_restarts": apgd_restarts or int(restarts), "mode": specs[0].mode}  # fmt: skip


def batch_counts(
    model: nn.Module, keys: tuple[str, ...], device: torch.device, b: int, x: Tensor, y: Tensor, specs: list[ThreatSpec]
) -> Tensor:
    """Batch number ``b`` of a pass (``x`` in [0, 1], ``y`` class ids) under each of ``specs`` (seeded for that batch):
    ``len(specs)×(1 + len(keys))`` int64, the batch size then the correct predictions of each of ``keys``."""
    x, y = x.to(device), y.to(device)
    check_images(x)
    rows = [[len(y), *correct_counts(predictions(model, x, y, spec.for_batch(b)), y, keys)] for spec in specs]
    return torch.tensor(rows, dtype=torch.int64)


# Sampling noise of a flag: both figures are counts of correct predictions on the same n images. A flag needs a gap
# of at least FLAG_MIN_IMAGES images (the fewest for which an exact two-sided sign test on the images where the two
# attacks disagree, all one way, is significant at 5%: 2·0.5^6 < 0.05) and beyond FLAG_Z standard errors of the
# difference of two binomial proportions, sqrt((a(1-a) + b(1-b))/n) (as if independent: conservative for the same
# images).
FLAG_MIN_IMAGES = 6
FLAG_Z = 1.96
FLAG_RULE = (f"a flag needs a gap of at least {FLAG_MIN_IMAGES} images and more than {FLAG_Z} standard errors of the "
             "difference of two binomial proportions, √((a(1−a) + b(1−b))/n)")  # fmt: skip


def beyond_noise(high: float, low: float, n: int | None) -> bool:
    """Whether accuracy ``high`` is above ``low`` (both on the same ``n`` images) by more than sampling noise
    (:data:`FLAG_RULE`); with ``n`` None, any gap counts."""
    if n is None:
        return high > low
    gap = high - low
    noise = FLAG_Z * math.sqrt(max(high * (1 - high) + low * (1 - low), 0.0) / n)
    return round(gap * n) >= FLAG_MIN_IMAGES and gap > noise


def _gap(high: float, low: float, n: int | None) -> str:
    points = f"{100 * (high - low):.1f} points"
    return points if n is None else f"{points}, {round((high - low) * n)} of {n} images"


def honesty_flags(rows: Sequence[dict], n: int | None = None) -> list[str]:
    """Warnings for figures that cannot be trusted as measured: an adaptive attack weaker than a transferred
    one (``bpda_pgd > jpeg_pgd``: claim ``jpeg_worst``), PGD weaker than FGSM (``pgd > fgsm``, a sign of gradient
    masking: claim ``pgd_worst``), and, when AutoAttack ran, how far the cheap worst case ``pgd_worst`` is above
    it. Each fires only on a gap beyond the sampling noise of ``n`` images (:data:`FLAG_RULE`; ``n`` None: any gap),
    and says how many images the gap is."""
    flags = []
    for row in rows:
        e = format_eps(row["eps"])
        if {"bpda_pgd", "jpeg_pgd", "jpeg_worst"} <= row.keys() and beyond_noise(row["bpda_pgd"], row["jpeg_pgd"], n):
            flags.append(
                f"eps {e}: adaptive bpda_pgd accuracy {row['bpda_pgd']:.2%} is above the transferred jpeg_pgd "
                f"{row['jpeg_pgd']:.2%} ({_gap(row['bpda_pgd'], row['jpeg_pgd'], n)}); the adaptive attack is too "
                f"weak here (more steps or restarts), so trust at most the per-example worst case jpeg_worst "
                f"{row['jpeg_worst']:.2%} for the JPEG defense"
            )
        if {"pgd", "fgsm", "pgd_worst"} <= row.keys() and beyond_noise(row["pgd"], row["fgsm"], n):
            flags.append(
                f"eps {e}: PGD accuracy {row['pgd']:.2%} is above FGSM {row['fgsm']:.2%} "
                f"({_gap(row['pgd'], row['fgsm'], n)}); a multi-step attack should never be weaker than one step: a "
                "sign of gradient masking, so the PGD figure overstates robustness; trust at most the per-example "
                f"worst case pgd_worst {row['pgd_worst']:.2%}"
            )
        if {"autoattack", "pgd_worst"} <= row.keys() and beyond_noise(row["pgd_worst"], row["autoattack"], n):
            flags.append(
                f"eps {e}: the cheap worst case pgd_worst {row['pgd_worst']:.2%} is "
                f"{_gap(row['pgd_worst'], row['autoattack'], n)} above AutoAttack {row['autoattack']:.2%}; "
                "the cheap suite (validation, the checkpoint's choice) overstates robustness by as much here, so "
                "claim AutoAttack's figure"
            )
    return flags


# ---- identity --------------------------------------------------------------------------------------


def model_identity(spec: str | Path, model: nn.Module) -> dict:
    """Which model was evaluated: the spec, and for a file or folder (a checkpoint, an export, a local Hugging Face
    model) its absolute path and sha256; arch and card. ``imagenet`` is torchvision's fixed published weights."""
    card = card_of(model)
    text = str(spec)
    info = {"spec": text, "arch": None if card is None else card.arch, "card": None if card is None else card.to_dict()}
    path = None if text == "imagenet" else Path(text.removeprefix(HF_PREFIX))
    if path is not None and path.exists():
        info.update(path=str(path.resolve()), sha256=sha256_path(path))
    return info


def build_report(results: dict, model_info: dict, data_info: dict) -> dict:
    """The full report: the figures of :func:`evaluate` plus model and data identity, as JSON-native values."""
    import torchvision

    report = {**results, "model": model_info, "data": data_info,
              "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}  # fmt: skip
    return json.loads(json.dumps(report))


# ---- rendering -----------------------------------------------------------------------------------


def format_eps(eps: float) -> str:
    """``0.0314`` -> ``"0.03137 (8/255)"``; eps not on the 1/255 grid -> ``"0.1"``."""
    levels = eps * 255
    grid = eps > 0 and math.isclose(levels, round(levels), abs_tol=1e-6)
    return f"{eps:.4g} ({round(levels)}/255)" if grid else f"{eps:.4g}"


def threat_names(report: dict) -> dict[str, str]:
    """Column titles of the threats in ``report`` (human-readable, with steps and JPEG quality), in
    :data:`THREATS` order."""
    restarts = f"×{report['restarts']}" if report["restarts"] > 1 else ""
    pgd_name = f"PGD-{report['steps']}{restarts}"
    q = report["quality"]
    names = {"clean": "Clean", "fgsm": "FGSM", "pgd": pgd_name, "apgd": f"APGD-CE-{report['steps']}{restarts}",
             "pgd_worst": "Worst case (FGSM, PGD, APGD)", "jpeg": f"JPEG q{q}", "jpeg_fgsm": f"JPEG q{q} ∘ FGSM",
             "jpeg_pgd": f"JPEG q{q} ∘ {pgd_name} (transfer)", "bpda_pgd": f"JPEG q{q} ∘ BPDA {pgd_name} (adaptive)",
             "jpeg_worst": f"JPEG q{q} worst case", "autoattack": "AutoAttack",
             "aa_worst": "Worst case (FGSM, PGD, APGD, AutoAttack)",
             "targeted_success": "Targeted success ↓"}  # fmt: skip
    return {k: names[k] for k in THREATS if k in report["rows"][0]}


# report.md's first table: what to claim; the second: every attack behind it.
SUMMARY_KEYS = ("clean", "pgd_worst", "jpeg_worst", "autoattack", "aa_worst")


def _table(report: dict, keys: Sequence[str]) -> list[str]:
    names = threat_names(report)
    keys = [k for k in keys if k in names]
    lines = ["| ε (L∞) | " + " | ".join(names[k] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in report["rows"]:
        lines.append(f"| {format_eps(row['eps'])} | " + " | ".join(f"{100 * row[k]:.1f}" for k in keys) + " |")
    return lines


def _model_name(report: dict) -> str:
    model = report.get("model", {})
    spec = str(model.get("spec", "model"))
    name = spec if spec == "imagenet" or spec.startswith(HF_PREFIX) else Path(spec).name
    return f"`{name}` ({model.get('arch') or '?'})"


def _data_name(report: dict) -> str:
    data = report.get("data", {})
    name = data.get("name", "the data")
    if name == "folder" and data.get("path"):
        name = f"the folder {Path(data['path']).name}/"
    split = f" ({data['split']} split)" if data.get("split") else ""
    return f"{name}{split}"


def report_title(report: dict) -> str:
    """report.md's heading: the model, the data and the threat."""
    eps = ", ".join(format_eps(r["eps"]) for r in report["rows"])
    return f"Robustness of {_model_name(report)} on {report['n']} images of {_data_name(report)}: L∞ attacks at ε {eps}"


def markdown_table(report: dict) -> str:
    """``report.md``: a heading naming the model, data and threat; a compact table of what to claim (clean, the
    per-example worst cases, AutoAttack when run); the per-attack table below it; the setup and any honesty flags.
    Accuracies in percent, one row per eps."""
    alphas = ", ".join(f"{r['alpha']:.4g}" for r in report["rows"])
    others = [k for k in threat_names(report) if k not in SUMMARY_KEYS]
    lines = [f"# {report_title(report)}", "",
             "Accuracy (%); the worst cases (an image counts only if it survives every attack of its setting) are the "
             "figures to claim.", "", *_table(report, SUMMARY_KEYS), "",
             "Per attack (accuracy %; targeted success: the fraction PGD pushes to a random other class, lower is "
             "better):", "", *_table(report, others), "",
             f"Setup: PGD {report['steps']} steps of α = {alphas}, {report['restarts']} restart(s), random start "
             f"(APGD-CE: as many steps and restarts, its own step schedule); JPEG quality {report['quality']}; seed "
             f"{report['seed']}. Worst case (FGSM, PGD, APGD): correct under all three; JPEG worst case: correct "
             f"through JPEG under FGSM and PGD made on the bare model (transfer) and BPDA PGD through it (adaptive). "
             f"Warnings below fire only beyond sampling noise: {FLAG_RULE}."]  # fmt: skip
    if {"autoattack", "pgd_worst"} <= report["rows"][0].keys():
        gaps = ", ".join(f"{100 * (r['pgd_worst'] - r['autoattack']):+.1f} at eps {format_eps(r['eps'])}"
                         for r in report["rows"])  # fmt: skip
        lines.append(f"\nThe cheap worst case minus AutoAttack, in points: {gaps}.")
    lines += [f"\n**Warning:** {flag}" for flag in report["flags"]]
    return "\n".join(lines) + "\n"


# One look per threat: colour, line style, marker; worst cases thick, clean on top of everything.
CURVE_STYLE = {
    "clean": ("black", "-", "o"), "fgsm": ("tab:blue", "--", "s"), "pgd": ("tab:orange", "-", "^"),
    "apgd": ("tab:brown", "-.", "v"), "pgd_worst": ("tab:red", "-", "D"), "jpeg": ("tab:gray", ":", "o"),
    "jpeg_fgsm": ("tab:cyan", "--", "s"), "jpeg_pgd": ("tab:green", "--", "^"), "bpda_pgd": ("tab:olive", "-.", "v"),
    "jpeg_worst": ("tab:purple", "-", "D"), "autoattack": ("magenta", "-", "*"),
    "targeted_success": ("tab:pink", "-", "X"),
}  # fmt: skip


def curve_png(report: dict) -> bytes:
    """``robustness_curve.png``: accuracy vs eps, one line per threat (each its own colour, line style and marker;
    worst cases thick, clean drawn on top, ringed by JPEG's larger hollow marker where the two coincide), and the
    targeted attack's success rate on a panel of its own."""
    fig = Figure(figsize=(11, 6), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(3, 1))
    acc, success = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    eps = [r["eps"] for r in report["rows"]]
    names = threat_names(report)
    for key, name in names.items():
        color, style, marker = CURVE_STYLE[key]
        ax = success if key == "targeted_success" else acc
        width = 2.6 if key in WORST_CASES else 1.4
        ax.plot(eps, [r[key] for r in report["rows"]], linestyle=style, color=color, marker=marker, linewidth=width,
                markersize={"clean": 7, "jpeg": 11}.get(key, 6), label=name, zorder=5 if key == "clean" else 3,
                markerfacecolor="none" if key in ("jpeg", "jpeg_fgsm", "jpeg_pgd", "bpda_pgd") else color)  # fmt: skip
    for ax in (acc, success):
        ax.set_xlabel("ε (L∞, pixel units in [0, 1])")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    acc.set_ylabel("accuracy (higher is more robust)")
    acc.set_title(f"Accuracy of {_model_name(report).replace('`', '')}, n = {report['n']}", fontsize=10)
    handles = [h for ax in (acc, success) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=4, frameon=False)
    success.set_ylabel("targeted success rate (lower is better)")
    success.set_title("Targeted PGD: success rate", fontsize=10)
    if "targeted_success" not in names:
        success.text(0.5, 0.5, "not measured", ha="center", transform=success.transAxes)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Render everything first, then write ``report.json``, ``report.md``, ``robustness_curve.png`` into ``out``
    (each atomically: temp file + rename). Returns the paths written."""
    out = Path(out)
    blobs = {"robustness_curve.png": curve_png(report), "report.md": markdown_table(report).encode(),
             "report.json": (json.dumps(report, indent=2) + "\n").encode()}  # fmt: skip
    atomic_write_files(out, blobs)
    return [out / name for name in FILES]


# ---- command-line defaults -----------------------------------------------------------------------


def default_eps(card: ModelCard) -> float:
    """The eps a model was adversarially trained at (from its card), else 8/255."""
    eps = card.training.get("eps")
    trained = card.training.get("attack") not in (None, "none") and isinstance(eps, (int, float))
    return float(eps) if trained and 0 < eps <= 1 else 8 / 255


def default_out(spec: str, data: str) -> Path:
    """``reports/<model>-<data>``, from the model spec and data names (file-name safe)."""
    name = f"{Path(str(spec).removeprefix(HF_PREFIX)).stem}-{Path(data).name or data}"
    return Path("reports") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def report_journal(out: str | Path, model_info: dict, data_info: dict, batch_size: int, device: torch.device,
                   resume: bool) -> Journal:  # fmt: skip
    """The journal of the report written to ``out`` (in ``out/.cache``), valid for this model and data identity
    (:func:`model_identity`, :func:`eval_data`), batch size, device type and torch version; read back only when
    ``resume``."""
    identity = {"model": model_info, "data": data_info, "batch_size": batch_size, "device": device.type,
                "torch": torch.__version__}  # fmt: skip
    return Journal(Path(out) / ".cache", identity, resume)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; unavailable CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustError("--device cuda was asked for, but CUDA is not available here")
    return device
