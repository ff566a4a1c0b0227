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
from torch.utils.data import DataLoader, Dataset, Subset

from robust.card import ModelCard
from robust.checks import check_at_least_one
from robust.data import CIFAR10, CIFAR10_NAMES, DIGIT_NAMES, Digits, folder_transform, image_folder
from robust.errors import RobustError
from robust.files import atomic_write_files
from robust.hf import HF_PREFIX
from robust.images import check_images
from robust.models import card_of
from robust.sharding import Journal, World, sharded_counts
from robust.threats import DEFAULT_THREATS, THREATS, WORST_CASES, ThreatSpec, correct_counts, predictions

FILES = ("report.json", "report.md", "robustness_curve.png")


# ---- data ----------------------------------------------------------------------------------------


def _spread(ds: Dataset, limit: int | None) -> Dataset:
    """``limit`` evenly spaced examples of ``ds`` (every class of a class-sorted folder stays represented)."""
    if limit is None or limit >= len(ds):
        return ds
    step = len(ds) / limit
    return Subset(ds, [int(i * step) for i in range(limit)])


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
) -> tuple[DataLoader, dict]:
    """The evaluation loader for ``data`` (``digits``, ``cifar10`` or an image-folder path) and its identity.

    Images come at the model card's ``image_size`` (folders and CIFAR-10 via :func:`robust.data.folder_transform`
    with the card's ``resize``); labels are the model's class ids. ``limit`` keeps that many evenly spaced images.
    """
    if limit is not None:
        check_at_least_one(limit, "limit")
    check_at_least_one(batch_size, "batch size")
    if num_workers < 0:
        raise RobustError(f"num_workers must be 0 or more, got {num_workers}")
    size, resize = card.image_size, card.resize
    if data == "digits":
        dm = Digits(image_size=size, limit=limit)
        dm.setup()
        ds, identity = dm.val_set, {"name": "digits", "split": "val", "split_seed": dm.split_seed}
        match = _align_labels(ds, DIGIT_NAMES, card)
    elif data == "cifar10":
        from torchvision import datasets

        CIFAR10(root=cifar10_root).prepare_data()
        base = datasets.CIFAR10(cifar10_root, train=False, transform=folder_transform(size, resize))
        match = _align_labels(base, CIFAR10_NAMES, card)
        ds = _spread(base, limit)
        identity = {"name": "cifar10", "root": str(Path(cifar10_root).resolve()), "split": "test"}
    else:
        root = Path(data)
        if not root.is_dir():
            raise RobustError(f"--data must be 'digits', 'cifar10' or an image folder; {data!r} is none of these")
        base = image_folder(root, folder_transform(size, resize))
        match = _align_labels(base, base.classes, card)
        identity = {"name": "folder", "path": str(root.resolve()), "classes": list(base.classes),
                    "fingerprint": _folder_fingerprint(root, base.samples)}  # fmt: skip
        ds = _spread(base, limit)
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
    keys = THREATS if autoattack else DEFAULT_THREATS
    specs = [ThreatSpec(e, alpha, steps, restarts, quality, seed, keys) for e in eps_list]
    world = world or World(next(model.parameters()).device)
    count = partial(batch_counts, model, keys, world.device)
    totals = sharded_counts(loader, specs, count, 1 + len(keys), world, journal, progress).tolist()
    n = totals[0][0]
    if n == 0:
        raise RobustError("the evaluation data holds no images")
    rows = [{"eps": s.eps, "alpha": s.step, **{k: c / n for k, c in zip(keys, t[1:], strict=True)}}
            for s, t in zip(specs, totals, strict=True)]  # fmt: skip
    return {"rows": rows, "flags": honesty_flags(rows), "n": n, "eps": eps_list, "steps": int(steps),
            "restarts": int(restarts), "alpha": alpha, "quality": int(quality), "seed": int(seed),
            "autoattack": bool(autoattack)}  # fmt: skip


def batch_counts(
    model: nn.Module, keys: tuple[str, ...], device: torch.device, b: int, x: Tensor, y: Tensor, specs: list[ThreatSpec]
) -> Tensor:
    """Batch number ``b`` of a pass (``x`` in [0, 1], ``y`` class ids) under each of ``specs`` (seeded for that batch):
    ``len(specs)×(1 + len(keys))`` int64, the batch size then the correct predictions of each of ``keys``."""
    x, y = x.to(device), y.to(device)
    check_images(x)
    rows = [[len(y), *correct_counts(predictions(model, x, y, spec.for_batch(b)), y, keys)] for spec in specs]
    return torch.tensor(rows, dtype=torch.int64)


def honesty_flags(rows: Sequence[dict]) -> list[str]:
    """Warnings for figures that cannot be trusted as measured: an adaptive attack weaker than a transferred
    one (``bpda_pgd > jpeg_pgd``: claim ``jpeg_worst``), PGD weaker than FGSM (``pgd > fgsm``, a sign of gradient
    masking: claim ``pgd_worst``), and, when AutoAttack ran, how far the cheap worst case ``pgd_worst`` is above
    it."""
    flags = []
    for row in rows:
        e = format_eps(row["eps"])
        if row["bpda_pgd"] > row["jpeg_pgd"]:
            flags.append(
                f"eps {e}: adaptive bpda_pgd accuracy {row['bpda_pgd']:.2%} is above the transferred jpeg_pgd "
                f"{row['jpeg_pgd']:.2%}; the adaptive attack is too weak here (more steps or restarts), so trust "
                f"at most the per-example worst case jpeg_worst {row['jpeg_worst']:.2%} for the JPEG defense"
            )
        if row["pgd"] > row["fgsm"]:
            flags.append(
                f"eps {e}: PGD accuracy {row['pgd']:.2%} is above FGSM {row['fgsm']:.2%}; a multi-step attack "
                "should never be weaker than one step: a sign of gradient masking, so the PGD figure overstates "
                f"robustness; trust at most the per-example worst case pgd_worst {row['pgd_worst']:.2%}"
            )
        if "autoattack" in row and row["pgd_worst"] > row["autoattack"]:
            flags.append(
                f"eps {e}: the cheap worst case pgd_worst {row['pgd_worst']:.2%} is "
                f"{100 * (row['pgd_worst'] - row['autoattack']):.1f} points above AutoAttack {row['autoattack']:.2%}; "
                "the cheap suite (validation, the checkpoint's choice) overstates robustness by as much here, so "
                "claim AutoAttack's figure"
            )
    return flags


# ---- identity --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                digest.update(chunk)
    return digest.hexdigest()


def model_identity(spec: str | Path, model: nn.Module) -> dict:
    """Which model was evaluated: the spec, and for a file or folder (a checkpoint, an export, a local Hugging Face
    model) its absolute path and sha256; arch and card. ``imagenet`` is torchvision's fixed published weights."""
    card = card_of(model)
    text = str(spec)
    info = {"spec": text, "arch": None if card is None else card.arch, "card": None if card is None else card.to_dict()}
    path = None if text == "imagenet" else Path(text.removeprefix(HF_PREFIX))
    if path is not None and path.exists():
        info.update(path=str(path.resolve()), sha256=_sha256(path))
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
             "targeted_success": "Targeted success ↓"}  # fmt: skip
    names |= {"apgd_dlr": f"APGD-DLR-{report['steps']}{restarts}", "apgd_t": f"APGD-T-{report['steps']}{restarts}",
              "pgd_worst": "Worst case (FGSM, PGD, APGD-CE, APGD-DLR, APGD-T)"}  # fmt: skip
    return {k: names[k] for k in THREATS if k in report["rows"][0]}


def markdown_table(report: dict) -> str:
    """A paper-ready Markdown table: one row per eps, one column per threat, accuracies in percent; the setup
    and any honesty flags below it."""
    names = threat_names(report)
    lines = ["| ε (L∞) | " + " | ".join(names.values()) + " |", "|---|" + "---:|" * len(names)]
    for row in report["rows"]:
        lines.append(f"| {format_eps(row['eps'])} | " + " | ".join(f"{100 * row[k]:.1f}" for k in names) + " |")
    model, data = report.get("model", {}), report.get("data", {})
    alphas = ", ".join(f"{r['alpha']:.4g}" for r in report["rows"])
    lines += ["", f"Accuracy (%) of `{model.get('spec', 'model')}` ({model.get('arch', '?')}) on {report['n']} "
              f"images of {data.get('name', 'the data')}; PGD: {report['steps']} steps of α = {alphas}, "
              f"{report['restarts']} restart(s), random start (APGD-CE: as many steps and restarts, its own step "
              f"schedule); JPEG quality {report['quality']}; seed {report['seed']}. Worst cases: an image counts only "
              "if it survives every attack of its setting (through JPEG: FGSM and PGD transferred, BPDA adaptive): "
              "the figures to claim. Targeted success: fraction of images PGD pushes to a random other class (lower "
              "is better)."]  # fmt: skip
    if "autoattack" in names:
        gaps = ", ".join(f"{100 * (r['pgd_worst'] - r['autoattack']):+.1f} at eps {format_eps(r['eps'])}"
                         for r in report["rows"])  # fmt: skip
        lines.append(f"\nThe cheap worst case minus AutoAttack, in points: {gaps}.")
    lines += [f"\n**Warning:** {flag}" for flag in report["flags"]]
    return "\n".join(lines) + "\n"


def curve_png(report: dict) -> bytes:
    """``robustness_curve.png``: accuracy vs eps, one line per threat (targeted success dotted)."""
    fig = Figure(figsize=(9, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    eps = [r["eps"] for r in report["rows"]]
    for key, name in threat_names(report).items():
        style = ":" if key == "targeted_success" else "--" if key in ("clean", "jpeg") else "-"
        width = 2.5 if key in WORST_CASES else 1.2
        ax.plot(eps, [r[key] for r in report["rows"]], style, marker="o", linewidth=width, label=name)
    ax.set_xlabel("ε (L∞, pixel units in [0, 1])")
    ax.set_ylabel("accuracy (targeted: success rate)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Robustness of {Path(report.get('model', {}).get('spec', 'model')).name}, n = {report['n']}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
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
