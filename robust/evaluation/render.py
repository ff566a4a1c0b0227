"""Rendering a report: ``report.md`` (heading, what to claim, every attack, setup, warnings), the robustness curve and
the honesty flags, all from a report dict (:func:`robust.evaluation.report.build_report`); no model needed.

:func:`honesty_flags` marks figures that cannot be trusted as they stand, and only beyond sampling noise
(:data:`FLAG_RULE`). :func:`write_report` writes ``report.json``, ``report.md`` and ``robustness_curve.png``
atomically. Accuracies are in [0, 1] in the dict and in percent on the page; eps in [0, 1] pixel units.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robust.files import atomic_write_files
from robust.learned import REMEDY
from robust.models.hf import HF_PREFIX
from robust.threats import THREATS, WORST_CASES

FILES = ("report.json", "report.md", "robustness_curve.png")

# Sampling noise of a flag: both figures are counts of correct predictions on the same n images. A flag needs a gap
# of at least FLAG_MIN_IMAGES images (the fewest for which an exact two-sided sign test on the images where the two
# attacks disagree, all one way, is significant at 5%: 2·0.5^6 < 0.05) and beyond FLAG_Z standard errors of the
# difference of two binomial proportions, sqrt((a(1-a) + b(1-b))/n) (as if independent: conservative for the same
# images).
FLAG_MIN_IMAGES = 6
FLAG_Z = 1.96
FLAG_RULE = (
    f"a flag needs a gap of at least {FLAG_MIN_IMAGES} images and more than {FLAG_Z} standard errors of the "
    "difference of two binomial proportions, √((a(1−a) + b(1−b))/n)"
)


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


def honesty_flags(rows: Sequence[dict], n: int | None = None, norm: str = "linf", cascade: bool = False) -> list[str]:
    """Warnings for figures that cannot be trusted as measured: an adaptive attack weaker than a transferred
    one (``bpda_pgd > jpeg_pgd``: claim ``jpeg_worst``), PGD weaker than FGSM (``pgd > fgsm``, a sign of gradient
    masking: claim ``pgd_worst``), and, when AutoAttack ran, how far the cheap worst case ``pgd_worst`` is above
    it. Each fires only on a gap beyond the sampling noise of ``n`` images (:data:`FLAG_RULE`; ``n`` None: any gap),
    and says how many images the gap is."""
    flags = []
    for row in rows:
        e = format_eps(row["eps"], norm)
        if {"bpda_pgd", "jpeg_pgd", "jpeg_worst"} <= row.keys() and beyond_noise(row["bpda_pgd"], row["jpeg_pgd"], n):
            flags.append(
                f"eps {e}: adaptive bpda_pgd accuracy {row['bpda_pgd']:.2%} is above the transferred jpeg_pgd "
                f"{row['jpeg_pgd']:.2%} ({_gap(row['bpda_pgd'], row['jpeg_pgd'], n)}); the adaptive attack is too "
                f"weak here (more steps or restarts), so trust at most the per-example worst case jpeg_worst "
                f"{row['jpeg_worst']:.2%} for the JPEG defense"
            )
        # In a cascade PGD's figure is measured after FGSM (never above it): the comparison means nothing there.
        if not cascade and {"pgd", "fgsm", "pgd_worst"} <= row.keys() and beyond_noise(row["pgd"], row["fgsm"], n):
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


NORM_NAMES = {"linf": "L∞", "l2": "L2"}


def norm_name(report: dict) -> str:
    """The report's threat model as printed: ``L∞`` or ``L2``."""
    return NORM_NAMES[report.get("norm", "linf")]


def format_eps(eps: float, norm: str = "linf") -> str:
    """``0.0314`` -> ``"0.03137 (8/255)"`` in L∞; eps not on the 1/255 grid, or in L2, -> ``"0.1"``."""
    levels = eps * 255
    grid = norm == "linf" and eps > 0 and math.isclose(levels, round(levels), abs_tol=1e-6)
    return f"{eps:.4g} ({round(levels)}/255)" if grid else f"{eps:.4g}"


def threat_names(report: dict) -> dict[str, str]:
    """Column titles of the threats in ``report`` (human-readable, with steps and JPEG quality), in
    :data:`THREATS` order."""
    restarts = f"×{report['restarts']}" if report["restarts"] > 1 else ""
    pgd_name = f"PGD-{report['steps']}{restarts}"
    apgd_steps, apgd_restarts = (
        report.get("apgd_steps", report["steps"]),
        report.get("apgd_restarts", report["restarts"]),
    )
    apgd_name = f"APGD-CE-{apgd_steps}{f'×{apgd_restarts}' if apgd_restarts > 1 else ''}"
    q = report["quality"]
    apgd_rest = apgd_name.removeprefix("APGD-CE")
    names = {
        "clean": "Clean",
        "fgsm": "FGSM",
        "pgd": pgd_name,
        "apgd": apgd_name,
        "apgd_dlr": _adapted_title(report, "apgd_dlr", "APGD-DLR", apgd_rest),
        "apgd_t": _adapted_title(report, "apgd_t", "APGD-T", apgd_rest),
        "square": f"Square-{report.get('square_queries', 0)}",
        "pgd_worst": f"Worst case ({worst_parts(report)})",
        "jpeg": f"JPEG q{q}",
        "jpeg_fgsm": f"JPEG q{q} ∘ FGSM",
        "jpeg_pgd": f"JPEG q{q} ∘ {pgd_name} (transfer)",
        "bpda_pgd": f"JPEG q{q} ∘ BPDA {pgd_name} (adaptive)",
        "jpeg_worst": f"JPEG q{q} worst case",
        "autoattack": "AutoAttack",
        "aa_worst": "Worst case (all of them and AutoAttack)",
        "targeted_success": "Targeted success ↓",
    }
    return {k: names[k] for k in THREATS if k in report["rows"][0]}


def _runs(report: dict, key: str, name: str) -> str:
    """What ran for the APGD part ``key`` (named ``name`` in AutoAttack): the report's ``adapted`` record of the
    model's class count (:meth:`robust.threats.ThreatSpec.adaptations`), else ``name``."""
    return ((report.get("adapted") or {}).get(key) or {}).get("runs", name)


def _adapted_title(report: dict, key: str, name: str, rest: str) -> str:
    """``APGD-T-10``; ``APGD-T-CE-10`` where another loss ran; ``APGD-DLR-10 (= APGD-CE-10)`` where APGD-CE's run
    stood for it (2 classes)."""
    runs = _runs(report, key, name)
    return f"{runs}{rest}" if runs.startswith(name) else f"{name}{rest} (= {runs}{rest})"


def worst_parts(report: dict) -> str:
    """The cheap worst case's attacks as its title names them: ``FGSM, PGD, APGD-CE, -DLR, -T`` (those that ran at
    the model's class count: ``-T-CE`` at 3, neither at 2; ``, Square`` when the report ran Square)."""
    apgds = [_runs(report, k, n) for k, n in (("apgd_dlr", "APGD-DLR"), ("apgd_t", "APGD-T"))]
    rest = "".join(f", {runs.removeprefix('APGD')}" for runs in apgds if runs != "APGD-CE")
    return f"FGSM, PGD, APGD-CE{rest}" + (", Square" if report.get("square_queries") else "")


# report.md's first table: what to claim; the second: every attack behind it.
SUMMARY_KEYS = ("clean", "pgd_worst", "jpeg_worst", "autoattack", "aa_worst")


def _table(report: dict, keys: Sequence[str]) -> list[str]:
    names = threat_names(report)
    keys = [k for k in keys if k in names]
    lines = [f"| ε ({norm_name(report)}) | " + " | ".join(names[k] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in report["rows"]:
        lines.append(
            f"| {format_eps(row['eps'], report.get('norm', 'linf'))} | "
            + " | ".join(f"{100 * row[k]:.1f}" for k in keys)
            + " |"
        )
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
    """report.md's heading: the model, the data and the threat (and the model's own threat model when it was trained
    in another norm: a cross-norm evaluation)."""
    norm = report.get("norm", "linf")
    eps = ", ".join(format_eps(r["eps"], norm) for r in report["rows"])
    card = report.get("model", {}).get("card") or {}
    trained = (card.get("training") or {}).get("norm") or "linf"
    cross = f" (a model trained in {NORM_NAMES[trained]})" if card and trained != norm else ""
    return (
        f"Robustness of {_model_name(report)} on {report['n']} images of {_data_name(report)}: {NORM_NAMES[norm]} "
        f"attacks at ε {eps}{cross}"
    )


def markdown_table(report: dict) -> str:
    """``report.md``: a heading naming the model, data and threat; a compact table of what to claim (clean, the
    per-example worst cases, AutoAttack when run); the per-attack table below it; the setup and any honesty flags.
    Accuracies in percent, one row per eps."""
    alphas = ", ".join(f"{r['alpha']:.4g}" for r in report["rows"])
    norm = report.get("norm", "linf")
    others = [k for k in threat_names(report) if k not in SUMMARY_KEYS]
    lines = [
        f"# {report_title(report)}",
        "",
        *(
            [f"**Not learned:** {report['not_learned']}: the figures below mean nothing. Try {REMEDY}.", ""]
            if report.get("not_learned")
            else []
        ),
        "Accuracy (%); the worst cases (an image counts only if it survives every attack of its setting) are the "
        "figures to claim.",
        "",
        *_table(report, SUMMARY_KEYS),
        "",
        "Per attack (accuracy %; targeted success: the fraction PGD pushes to a random other class, lower is better):",
        "",
        *_table(report, others),
        "",
        f"Setup: {norm_name(report)} PGD {report['steps']} steps of α = {alphas}, {report['restarts']} "
        "restart(s), "
        f"random start; APGD-CE {report.get('apgd_steps', report['steps'])} steps, "
        f"{report.get('apgd_restarts', report['restarts'])} restart(s), its own step schedule; JPEG quality "
        f"{report['quality']}; seed {report['seed']}. "
        + (
            "Images the model already gets wrong are not attacked, and each image leaves an attack at its first "
            "fooling step; "
            if report.get("early_exit", True)
            else "Every image runs every step; "
        )
        + "the parts of each worst case are measured "
        f"{'on the survivors of the parts before' if report.get('mode') == 'cascade' else 'independently'}. "
        f"Worst case ({worst_parts(report)}): correct under all of them; JPEG worst case: correct "
        f"through JPEG under FGSM and PGD made on the bare model (transfer) and BPDA PGD through it (adaptive)."
        + (f" Warnings below fire only beyond sampling noise: {FLAG_RULE}." if report["flags"] else ""),
    ]
    if report.get("adapted"):
        notes = "; ".join(a["note"] for a in report["adapted"].values())
        lines.append(f"\nThe model has {report['num_classes']} classes, and AutoAttack's parts adapt: {notes}.")
    if {"autoattack", "pgd_worst"} <= report["rows"][0].keys():
        gaps = ", ".join(
            f"{100 * (r['pgd_worst'] - r['autoattack']):+.1f} at eps {format_eps(r['eps'], norm)}"
            for r in report["rows"]
        )
        lines.append(f"\nThe cheap worst case minus AutoAttack, in points: {gaps}.")
    lines += [f"\n**Warning:** {flag}" for flag in report["flags"]]
    return "\n".join(lines) + "\n"


# One look per threat: colour, line style, marker; worst cases thick, clean on top of everything.
CURVE_STYLE = {
    "clean": ("black", "-", "o"),
    "fgsm": ("tab:blue", "--", "s"),
    "pgd": ("tab:orange", "-", "^"),
    "apgd": ("tab:brown", "-.", "v"),
    "apgd_dlr": ("goldenrod", ":", "<"),
    "apgd_t": ("teal", "-.", ">"),
    "square": ("darkkhaki", "--", "p"),
    "pgd_worst": ("tab:red", "-", "D"),
    "jpeg": ("tab:gray", ":", "o"),
    "jpeg_fgsm": ("tab:cyan", "--", "s"),
    "jpeg_pgd": ("tab:green", "--", "^"),
    "bpda_pgd": ("tab:olive", "-.", "v"),
    "jpeg_worst": ("tab:purple", "-", "D"),
    "autoattack": ("magenta", "-", "*"),
    "aa_worst": ("darkmagenta", "-", "P"),
    "targeted_success": ("tab:pink", "-", "X"),
}


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
        ax.plot(
            eps,
            [r[key] for r in report["rows"]],
            linestyle=style,
            color=color,
            marker=marker,
            linewidth=width,
            markersize={"clean": 7, "jpeg": 11}.get(key, 6),
            label=name,
            zorder=5 if key == "clean" else 3,
            markerfacecolor="none" if key in ("jpeg", "jpeg_fgsm", "jpeg_pgd", "bpda_pgd") else color,
        )
    for ax in (acc, success):
        ax.set_xlabel(f"ε ({norm_name(report)}, pixel units)")
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
    blobs = {
        "robustness_curve.png": curve_png(report),
        "report.md": markdown_table(report).encode(),
        "report.json": (json.dumps(report, indent=2) + "\n").encode(),
    }
    atomic_write_files(out, blobs)
    return [out / name for name in FILES]
