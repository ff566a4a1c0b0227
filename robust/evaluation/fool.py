"""Fool one image, then try to defend it with JPEG: the single-image flow of ``evaluate.py fool``.

The adversarial image is quantized to uint8 grey levels inside the eps-ball *before* it is classified, so the
PNG written to disk holds exactly the pixels whose prediction is reported (re-loading it gives the same answer).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchvision.transforms import v2

from robust.attacks import check_budget, default_step, fgsm, pgd, resolve_class, seeded_rng
from robust.data.images import check_images, png_bytes
from robust.defenses import check_quality, jpeg
from robust.errors import RobustError
from robust.evaluation.render import format_eps
from robust.fast_path import fast_model
from robust.files import atomic_write_files
from robust.models.build import card_of

FILES = ("adversarial.png", "perturbation.png", "figure.png")


@dataclass
class FoolResult:
    """Images are ``1×C×S×S`` in [0, 1] (C = the model's channels); ``top`` maps each panel to its top-3
    ``(class name, probability)``."""

    x: Tensor
    x_adv: Tensor
    x_jpeg: Tensor
    pred: dict[str, int]
    top: dict[str, list[tuple[str, float]]]
    target: int | None
    class_names: list[str]
    attack: str
    eps: float
    quality: int

    @property
    def linf(self) -> float:
        """``|x_adv - x|_inf`` in pixel units."""
        return float((self.x_adv - self.x).abs().max())


def quantize_within(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Round ``x_adv`` to uint8 grey levels, keeping it within ``eps`` of ``x`` in ``norm`` and in [0, 1].

    The result is exactly what a uint8 PNG of it decodes to (same float values as ``to_dtype(uint8)``). L2: the
    perturbation is first shrunk to ``eps - 0.5·sqrt(d)/255`` (``d`` pixel values), the most rounding can add.
    """
    if norm == "l2":
        delta = x_adv - x
        size = float(delta.flatten().norm())
        room = max(0.0, eps - 0.5 * delta.numel() ** 0.5 / 255)
        if size > room:
            x_adv = x + delta * (room / size)
        levels = torch.round(x_adv * 255).clamp(0, 255)
        return v2.functional.to_dtype(levels.to(torch.uint8), torch.float32, scale=True)
    tol = 1e-4  # grey levels; absorbs float error in (x ± eps)·255 without leaving the ball measurably
    lo = torch.ceil((x - eps) * 255 - tol).clamp(0, 255)
    hi = torch.floor((x + eps) * 255 + tol).clamp(0, 255)
    levels = torch.minimum(torch.maximum(torch.round(x_adv * 255), lo), hi)
    return v2.functional.to_dtype(levels.to(torch.uint8), torch.float32, scale=True)


@torch.no_grad()
def _top(model: nn.Module, x: Tensor, names: list[str], k: int = 3) -> tuple[int, list[tuple[str, float]]]:
    probs = model(x).softmax(1)[0]
    values, ids = probs.topk(min(k, probs.numel()))
    return int(ids[0]), [(names[i], float(p)) for p, i in zip(values.tolist(), ids.tolist(), strict=True)]


def fool(
    model: nn.Module,
    x: Tensor,
    target: str | int | None = None,
    attack: str = "pgd",
    eps: float = 8 / 255,
    steps: int = 10,
    alpha: float | None = None,
    quality: int = 75,
    seed: int = 0,
    norm: str = "linf",
    fast_path: bool = True,
) -> FoolResult:
    """Attack ``model``'s prediction of one image ``x`` (``1×C×S×S`` in [0, 1]) and JPEG the result.

    Untargeted (``target=None``) pushes away from the model's own prediction; otherwise ``target`` is a class
    name or id of the model card's ``class_names`` (ids only, for a model without a card). ``attack`` is ``fgsm``
    or ``pgd`` (``steps`` of ``alpha``, default the registry's: L∞ eps/4, L2 2.5·eps/steps; random start seeded by
    ``seed``); ``eps`` in pixel units of ``norm`` (``linf``: [0, 1]; ``l2``). ``fast_path``: the attack runs on
    :func:`robust.fast_path.fast_model`'s frozen copy (False: on ``model``, for debugging); the predictions shown
    are ``model``'s own either way.
    """
    if attack not in ("fgsm", "pgd"):
        raise RobustError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    alpha = default_step("pgd", eps, norm=norm, steps=steps) if alpha is None else alpha
    check_budget(eps, alpha, steps, norm=norm, dims=x[0].numel() if x.dim() == 4 else None)
    check_quality(quality)
    if x.dim() != 4 or x.shape[0] != 1:
        raise RobustError(f"fool takes one image 1×C×H×W, got shape {tuple(x.shape)}")
    check_images(x)
    card = card_of(model)
    model.eval()
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        num_classes = model(x).shape[1]
    names = list(card.class_names) if card is not None else [str(i) for i in range(num_classes)]
    target_id = None if target is None else resolve_class(target, names)
    pred, top = {}, {}
    pred["original"], top["original"] = _top(model, x, names)
    y = torch.tensor([pred["original"] if target_id is None else target_id], device=x.device)
    attacked = fast_model(model) if fast_path else model
    with seeded_rng(seed, x.device):
        if attack == "fgsm":
            x_adv = fgsm(attacked, x, y, eps, targeted=target_id is not None, norm=norm)
        else:
            x_adv = pgd(attacked, x, y, eps, alpha, steps, targeted=target_id is not None, norm=norm)
    x_adv = quantize_within(x_adv, x, eps, norm)
    x_jpeg = jpeg(x_adv, quality)
    pred["adversarial"], top["adversarial"] = _top(model, x_adv, names)
    pred["jpeg"], top["jpeg"] = _top(model, x_jpeg, names)
    return FoolResult(x, x_adv, x_jpeg, pred, top, target_id, names, attack, float(eps), int(quality))


def _label(top: list[tuple[str, float]]) -> str:
    name, p = top[0]
    return f"{name} ({p:.1%})"


def summary(result: FoolResult) -> str:
    """What happened, in a few printed lines: original, adversarial and after-JPEG predictions, and a verdict on
    each: fooled or ``not fooled`` (the attack left the prediction as it was), the target reached or not, and
    whether JPEG restored the original prediction (only asked when there was something to restore)."""
    r = result
    fooled = r.pred["adversarial"] != r.pred["original"]
    if r.target is None:
        verdict = "fooled" if fooled else "not fooled"
    else:
        reached = r.pred["adversarial"] == r.target
        verdict = f"target {r.class_names[r.target]!r} {'reached' if reached else 'not reached'}"
        verdict += "" if fooled or reached else ": not fooled"
    if not fooled:
        after = "nothing to restore: not fooled"
    elif r.pred["jpeg"] == r.pred["original"]:
        after = "original prediction restored"
    else:
        after = "original prediction not restored"
    return "\n".join(
        [
            f"original prediction:    {_label(r.top['original'])}",
            f"adversarial prediction: {_label(r.top['adversarial'])}   [{r.attack.upper()}, eps {format_eps(r.eps)}, "
            f"L-inf {r.linf * 255:.0f}/255: {verdict}]",
            f"after JPEG q{r.quality}:        {_label(r.top['jpeg'])}   [{after}]",
        ]
    )


def perturbation_image(result: FoolResult) -> Tensor:
    """``x_adv - x`` amplified to the full grey range around mid-grey: ``1×C×S×S`` in [0, 1]."""
    delta = result.x_adv - result.x
    peak = float(delta.abs().max())
    return (0.5 + delta / (2 * peak)).clamp(0, 1) if peak > 0 else torch.full_like(delta, 0.5)


def figure_png(result: FoolResult) -> bytes:
    """Original / perturbation / adversarial / JPEG-defended side by side, each titled with its top-3."""
    r = result
    fig = Figure(figsize=(13, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    peak = r.linf
    amp = f"×{0.5 / peak:.0f}" if peak > 0 else "none"
    panels = [
        ("original", r.x, r.top["original"]),
        (f"perturbation (amplified {amp}, L-inf {peak * 255:.0f}/255)", perturbation_image(r), None),
        (f"adversarial ({r.attack.upper()})", r.x_adv, r.top["adversarial"]),
        (f"JPEG q{r.quality} of adversarial", r.x_jpeg, r.top["jpeg"]),
    ]
    for i, (title, img, top) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        pixels = img[0].permute(1, 2, 0).cpu().numpy()
        if pixels.shape[-1] == 1:
            ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        lines = [f"{name[:28]}: {p:.1%}" for name, p in top] if top else []
        ax.set_title("\n".join([title, *lines]), fontsize=8)
        ax.axis("off")
    goal = "untargeted" if r.target is None else f"target: {r.class_names[r.target]}"
    fig.suptitle(f"{r.attack.upper()} at eps {format_eps(r.eps)} ({goal})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_fool(result: FoolResult, out: str | Path) -> list[Path]:
    """Write ``adversarial.png`` (lossless, model input size), ``perturbation.png`` and ``figure.png`` into
    ``out``; everything is rendered first, then each file is written atomically. Returns the paths."""
    out = Path(out)
    blobs = {
        "adversarial.png": png_bytes(result.x_adv),
        "perturbation.png": png_bytes(perturbation_image(result)),
        "figure.png": figure_png(result),
    }
    atomic_write_files(out, blobs)
    return [out / name for name in FILES]
