"""Load user images safely and turn them into model inputs; save model inputs as lossless PNG.

:func:`open_image` decodes any common file with PIL (JPEG, PNG, GIF, BMP, TIFF, WebP; greyscale, palette,
RGBA, CMYK, 16-bit; animated files give their first frame; EXIF rotation applied) into an 8-bit RGB image,
and turns every bad file (missing, empty, truncated, not an image, over PIL's decompression-bomb pixel limit)
into a :class:`RobustError`. :func:`to_model_input` applies a model card's preprocessing (its ``image_size``,
``resize`` and ``channels``) and returns a ``1×C×S×S`` float tensor in [0, 1] whose values lie exactly on the
1/255 grid. A grayscale model takes grayscale files (and colour files whose pixels are all grey); a colour image
for it is a one-line error, not a silent conversion. An RGB model takes any file (grey as R = G = B).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import encode_png
from torchvision.transforms import v2

from robust.defenses import to_uint8
from robust.errors import RobustError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _decode(path: Path) -> Image.Image:
    """Open and fully decode the first frame, with decompression-bomb warnings turned into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
            img.seek(0)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise RobustError(
                f"image {path} is too large to decode safely (over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} "
                "pixels; decompression-bomb protection)"
            ) from None
        except UnidentifiedImageError:
            raise RobustError(f"{path} is not an image file PIL can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise RobustError(f"image {path} is damaged or truncated ({exc})") from None
    return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled to 8 bits, transparency composited onto white."""
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        values = np.asarray(img)
        if not np.isfinite(values).all():
            raise RobustError(f"image {path} holds NaN or infinite pixel values")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise RobustError(
            f"image {path} has colour mode {img.mode}, which cannot be converted to RGB ({exc})"
        ) from None


def folder_transform(
    image_size: int, resize: int | None = None, augment: bool = False, channels: int = 3
) -> v2.Compose:
    """PIL image -> ``C×S×S`` float [0, 1]: resize the short side to ``resize`` (default ``image_size``),
    center-crop ``image_size``; ``augment`` adds padded random crop and horizontal flip; ``channels`` 1 converts
    to grayscale (ITU-R 601-2 luma)."""
    steps = [v2.Grayscale(1)] if channels == 1 else []
    steps += [v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size)]
    if augment:
        steps += [v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True)])


def open_image(path: str | Path) -> Image.Image:
    """Decode the image file at ``path`` (first frame, EXIF orientation applied) into an RGB PIL image.

    Raises :class:`RobustError` for a missing, empty, truncated or non-image file, and for images over
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (decompression bombs).
    """
    path = Path(path)
    if not path.exists():
        raise RobustError(f"image {path} does not exist")
    if not path.is_file():
        raise RobustError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise RobustError(f"image {path} is empty (0 bytes)")
    img = _decode(path)
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block only loses the rotation hint; the pixels are fine
    return _to_rgb(img, path)


def is_grey(img: Image.Image) -> bool:
    """Whether an RGB image holds grey pixels only (R = G = B everywhere)."""
    pixels = np.asarray(img.convert("RGB"))
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def to_model_input(img: Image.Image, image_size: int, resize: int | None = None, channels: int = 3) -> Tensor:
    """RGB PIL image -> ``1×C×S×S`` float [0, 1] with ``S = image_size``, ``C = channels`` (values on the 1/255
    grid); a model card's ``image_size``, ``resize`` and ``channels`` give the model's input. ``channels`` 1 needs
    a grey image (:func:`is_grey`).

    An image already ``S×S`` is used as is. Otherwise, when ``resize`` exceeds ``S`` (ImageNet-style models:
    256 then 224) the short side is resized to ``resize`` and the centre ``S×S`` cropped; else (e.g. 32×32
    models) the image is resized to ``S×S``.
    """
    size = int(image_size)
    resize = int(resize or size)
    to_float = v2.functional.to_dtype
    img = img if img.mode == "RGB" else img.convert("RGB")
    if channels == 1:
        if not is_grey(img):
            raise RobustError(
                "the image is in colour; the model takes grayscale (1-channel) images: convert it to grayscale first"
            )
        img = img.convert("L")
    if img.size == (size, size):
        x = to_float(v2.functional.pil_to_tensor(img), torch.float32, scale=True)
    elif resize > size:
        x = folder_transform(size, resize)(img)
    else:
        pixels = v2.functional.resize(v2.functional.pil_to_tensor(img), [size, size], antialias=True)
        x = to_float(pixels, torch.float32, scale=True)
    return x.as_subclass(Tensor).unsqueeze(0)


def check_images(x: Tensor) -> None:
    """Raise :class:`RobustError` unless the float images ``x`` are finite and within [0, 1]."""
    if not torch.isfinite(x).all():
        raise RobustError("the input images hold NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise RobustError(f"input images must be in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]")


def load_image(path: str | Path, image_size: int, resize: int | None = None, channels: int = 3) -> Tensor:
    """:func:`open_image` then :func:`to_model_input`: a ``1×C×S×S`` model input in [0, 1]."""
    try:
        return to_model_input(open_image(path), image_size, resize, channels)
    except RobustError as exc:
        raise RobustError(f"{path}: {exc}") from None


def png_bytes(x: Tensor) -> bytes:
    """A ``C×H×W`` (or ``1×C×H×W``) [0, 1] image as lossless 8-bit PNG bytes (rounded to uint8): RGB for C = 3,
    grayscale for C = 1."""
    return encode_png(to_uint8(x.squeeze(0)).cpu()).numpy().tobytes()
