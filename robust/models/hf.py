"""Hugging Face image classifiers in the project's convention: [0, 1] images in, logits out.

``load_hf_model("deepmind/vision-perceiver-learned")`` (a hub id, or a local ``save_pretrained`` directory)
returns a :class:`robust.models.build.CardedModel` with the layers ``(geometry, normalize, backbone)``:

- ``geometry`` (:class:`ProcessorGeometry`): the image processor's crop and resize as differentiable torch
  ops, so gradients reach the input pixels. Perceiver processors crop the centre ``size/crop_size`` of the
  shorter side, then resize; ConvNeXT/ResNet processors resize the shorter side to ``shortest_edge/crop_pct``
  and crop ``shortest_edge`` (warp to a square at 384 and above); the others resize (``height``/``width`` or
  ``shortest_edge``), then centre-crop to ``crop_size`` when the processor does. Crop offsets round as the
  processor's do. Inputs already of the output size (the card's ``image_size``, as the project's loaders make
  them) pass unchanged. Differences to the processor: it resizes 8-bit images, this module [0, 1] floats
  (clamped to [0, 1] after each resize), so pixels differ by rounding (mean 0.3 grey levels) and, near the
  borders of upsampled images, by up to ~9 grey levels (torch's float and uint8 antialiasing kernels
  differ); BOX and HAMMING resampling become bilinear, LANCZOS bicubic.
- ``normalize`` (:class:`robust.models.build.Normalize`): the processor's rescale and ``image_mean``/``image_std``,
  folded into mean/std in [0, 1] pixel units.
- ``backbone`` (:class:`HFLogits`): the ``transformers`` model, returning ``N×num_classes`` logits.

``transformers`` is the optional extra ``robust[hf]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from robust.errors import RobustError
from robust.models.build import CardedModel, Normalize
from robust.models.card import TrainingRecord, new_card

HF_PREFIX = "hf:"  # model specs and archs "hf:<hub id or save_pretrained dir>" name Hugging Face classifiers

# PIL resample codes (what processors store) -> torchvision modes that resize float tensors differentiably.
_INTERPOLATION = {
    0: InterpolationMode.NEAREST_EXACT,
    1: InterpolationMode.BICUBIC,  # LANCZOS: tensors support it on CPU only (recent torchvision)
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BILINEAR,  # BOX: no tensor kernel
    5: InterpolationMode.BILINEAR,  # HAMMING: no tensor kernel
}
CONVNEXT_WARP_SIZE = 384  # ConvNeXT processors warp instead of cropping at this shortest_edge and above


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """Centre crop ``N×C×H×W`` to ``height×width`` like the HF processors: floor offsets, zero padding if smaller."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        x = nn.functional.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return x[..., top : top + height, left : left + width]


def _shorter_side_to(side: int, height: int, width: int) -> list[int]:
    """``[height, width]`` with the shorter side scaled to ``side`` and the longer one truncated, as HF does."""
    return [side, int(side * width / height)] if height <= width else [int(side * height / width), side]


class ProcessorGeometry(nn.Module):
    """An image processor's crop/resize steps on ``N×C×H×W`` [0, 1] images, in its order, differentiable.

    ``steps`` is a sequence of
    ``("short_side_crop", fh, fw)``: centre crop ``int(fh * min(H, W)) × int(fw * min(H, W))`` (Perceiver);
    ``("resize", height, width)``; ``("resize_short", s)``: shorter side to ``s``, aspect kept;
    ``("crop", height, width)``: centre crop. Every resize uses ``interpolation``.

    Images that already have the steps' output size pass unchanged: like the project's loaders, the module
    takes them as preprocessed (a ``card``-sized input is the processor's crop, see :meth:`loader_sizes`).
    """

    def __init__(self, steps: Sequence[tuple], interpolation: InterpolationMode) -> None:
        super().__init__()
        self.steps, self.interpolation = tuple(tuple(step) for step in steps), interpolation

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output; ``None`` when it follows the input's shape."""
        last = self.steps[-1] if self.steps else ("none",)
        return (int(last[1]), int(last[2])) if last[0] in ("resize", "crop") else None

    def loader_sizes(self) -> tuple[int, int] | None:
        """``(image_size, resize)`` such that resizing an image's short side to ``resize`` and centre-cropping
        ``image_size`` shows the region these steps show (exact for crops of the short side; an approximation
        for processors that warp to a non-square aspect). ``None`` when the output size follows the input's."""
        if self.output_size is None:
            return None
        side, region = None, 1.0  # current square side in pixels; visible fraction of the input's short side
        for name, *args in self.steps:
            if name == "short_side_crop":
                region, side = region * args[0], None if side is None else int(args[0] * side)
            elif name == "crop":
                region, side = region * (args[0] / side if side else 1.0), args[0]
            else:
                side = args[0]
        return side, round(side / region)

    def forward(self, x: Tensor) -> Tensor:
        if self.output_size is not None and tuple(x.shape[-2:]) == self.output_size:
            return x
        for name, *args in self.steps:
            h, w = x.shape[-2:]
            if name == "short_side_crop":
                x = _center_crop(x, int(args[0] * min(h, w)), int(args[1] * min(h, w)))
            elif name == "crop":
                x = _center_crop(x, *args)
            else:
                size = list(args) if name == "resize" else _shorter_side_to(args[0], h, w)
                if size != [h, w]:
                    x = TF.resize(x, size, interpolation=self.interpolation, antialias=True).clamp(0, 1)
        return x

    def extra_repr(self) -> str:
        return f"steps={self.steps}, interpolation={self.interpolation.value}"


class HFLogits(nn.Module):
    """A ``transformers`` image classifier on normalized ``N×3×H×W`` pixels -> ``N×num_classes`` logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: Tensor) -> Tensor:
        # Positional: most models name it pixel_values, the Perceiver names it inputs.
        return self.net(pixel_values).logits


def _size(value: Any) -> dict[str, int]:
    """A processor size (dict, ``SizeDict`` or int) as a dict of its set keys."""
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if isinstance(value, Mapping) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def _hw(size: dict[str, int], what: str) -> tuple[int, int]:
    if "height" not in size or "width" not in size:
        raise RobustError(f"the image processor's {what} {size} has no height/width; robust cannot replicate it")
    return size["height"], size["width"]


def processor_geometry(processor: Any) -> ProcessorGeometry:
    """The crop/resize steps of a ``transformers`` image processor as a :class:`ProcessorGeometry`."""
    kind = type(processor).__name__
    resample = getattr(processor, "resample", None)
    if isinstance(resample, InterpolationMode):
        interpolation = resample
    else:
        interpolation = _INTERPOLATION.get(2 if resample is None else int(resample), InterpolationMode.BILINEAR)
    do_resize, do_crop = bool(getattr(processor, "do_resize", False)), bool(getattr(processor, "do_center_crop", False))
    size = _size(processor.size) if do_resize else {}
    crop = [("crop", *_hw(_size(processor.crop_size), "crop_size"))] if do_crop else []
    if kind.startswith("Perceiver"):  # crop the centre size/crop_size of the shorter side, then resize
        height, width = _hw(_size(processor.size), "size")
        crop_h, crop_w = _hw(_size(processor.crop_size), "crop_size")
        steps = [("short_side_crop", height / crop_h, width / crop_w)] if do_crop else []
        return ProcessorGeometry(steps + ([("resize", height, width)] if do_resize else []), interpolation)
    if not do_resize:
        return ProcessorGeometry(crop, interpolation)
    if set(size) == {"shortest_edge"}:
        edge = size["shortest_edge"]
        crop_pct = getattr(processor, "crop_pct", None)
        if kind.startswith("ConvNext") and crop_pct and edge < CONVNEXT_WARP_SIZE:
            steps = [("resize_short", int(edge / crop_pct)), ("crop", edge, edge), *crop]
            return ProcessorGeometry(steps, interpolation)
        if kind.startswith("ConvNext"):
            return ProcessorGeometry([("resize", edge, edge), *crop], interpolation)
        return ProcessorGeometry([("resize_short", edge), *crop], interpolation)
    return ProcessorGeometry([("resize", *_hw(size, "size")), *crop], interpolation)


def _per_channel(value: float | Sequence[float]) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def processor_normalization(processor: Any) -> tuple[list[float], list[float]]:
    """The processor's rescale + normalize as ``(mean, std)`` for [0, 1] inputs: ``(x - mean) / std``."""
    scale = 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 255.0
    if getattr(processor, "do_normalize", False):
        mean, std = _per_channel(processor.image_mean), _per_channel(processor.image_std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    return [m / scale for m in mean], [s / scale for s in std]


def load_hf_model(name_or_dir: str, num_classes: int | None = None) -> CardedModel:
    """A ``transformers`` image classifier as ``Sequential(geometry, normalize, backbone)``, eval mode, CPU.

    Input ``N×3×H×W`` float images in [0, 1]; output ``N×num_classes`` logits. Images of any size go through the
    processor's crop and resize; images of the card's ``image_size`` are taken as already cropped (what the
    project's loaders make from ``resize``/``image_size``) and only normalized. The model's
    :class:`~robust.models.card.ModelCard` has arch ``"hf:<name_or_dir>"``, class_names (``id2label`` by id),
    image_size, resize, and mean, std (the processor's, in [0, 1] pixel units).

    Args:
        name_or_dir: a Hugging Face hub id (downloaded by ``transformers`` to its cache) or a local directory
            written by ``save_pretrained`` (model and image processor).
        num_classes: when given and different from the model's, the classification head is replaced by a new,
            randomly initialised one with that many outputs (fine-tuning).
    """
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    except ImportError:
        raise RobustError(
            "hf: models need transformers: install the robust[hf] extra (pip install '.[hf]' or uv sync --extra hf)"
        ) from None
    if not name_or_dir.strip():
        raise RobustError("give a Hugging Face model id or directory after 'hf:', e.g. hf:google/vit-base-patch16-224")
    local = Path(name_or_dir).expanduser()
    if not local.is_dir() and (name_or_dir.startswith(("/", ".", "~")) or name_or_dir.count("/") > 1):
        raise RobustError(f"{name_or_dir} is not a directory (a hub id looks like 'org/name')")
    name_or_dir = str(local) if local.is_dir() else name_or_dir
    try:
        config = AutoConfig.from_pretrained(name_or_dir)
        kwargs = {}
        if num_classes is not None and num_classes != config.num_labels:
            kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        net = AutoModelForImageClassification.from_pretrained(name_or_dir, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError) as exc:  # unknown id, offline without a cache, not an image classifier
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if local.is_dir() else " (hub ids need the network once; offline, HF_HUB_OFFLINE=1 skips retries)"
        raise RobustError(f"could not load Hugging Face image classifier {name_or_dir!r}: {first}{hint}") from None
    geometry = processor_geometry(processor)
    mean, std = processor_normalization(processor)
    model = nn.Sequential(
        OrderedDict(geometry=geometry, normalize=Normalize(mean, std), backbone=HFLogits(net.float()))
    ).to("cpu")
    fallback = getattr(net.config, "image_size", 224)
    fallback = fallback if isinstance(fallback, int) else 224
    size, resize = geometry.loader_sizes() or (fallback, fallback)
    labels = net.config.id2label
    card = new_card(
        f"{HF_PREFIX}{name_or_dir}",
        int(net.config.num_labels),
        image_size=size,
        class_names=[labels[i] for i in sorted(labels)],
        mean=mean,
        std=std,
        resize=resize,
        data="huggingface",
        training=TrainingRecord(attack="none"),
    )
    return CardedModel(model, card).eval()
