"""Loading user images: every common kind becomes RGB, every bad file a clear RobustError; model preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from robust.data.images import check_images, load_image, open_image, png_bytes, to_model_input
from robust.data.modules import folder_transform
from robust.defenses import to_uint8
from robust.errors import RobustError


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    return v2.functional.to_dtype(pixels, torch.float32, scale=True)


SIZE_32 = (32, 32)  # (image_size, resize) of a 32×32 model card
SIZE_224 = (224, 256)  # an ImageNet-style card


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def grey_l(tmp: Path) -> Path:
    return _save(Image.new("L", (20, 10), 100), tmp / "grey.png")


def rgba(tmp: Path) -> Path:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white background shows
    return _save(img, tmp / "rgba.png")


def palette(tmp: Path) -> Path:
    return _save(
        Image.new("RGB", (8, 8), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE), tmp / "palette.png"
    )


def palette_transparent(tmp: Path) -> Path:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    return _save(img, tmp / "palette_t.png", transparency=0)


def cmyk_jpeg(tmp: Path) -> Path:
    return _save(Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK"), tmp / "cmyk.jpg", quality=95)


def png16(tmp: Path) -> Path:
    return _save(Image.fromarray(np.full((6, 5), 128 * 257, dtype=np.uint16)), tmp / "sixteen.png")


def one_pixel(tmp: Path) -> Path:
    return _save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp / "one.png")


def animated_gif(tmp: Path) -> Path:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _save(frames[0], tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)


def wrong_extension(tmp: Path) -> Path:
    return _save(Image.new("RGB", (8, 8), (0, 255, 0)), tmp / "really_png.jpg", format="PNG")


def exif_rotated(tmp: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return _save(Image.new("RGB", (40, 20), (90, 90, 90)), tmp / "rotated.jpg", exif=exif)


# (maker, expected size (W, H), expected RGB of pixel (x, y), where, tolerance)
GOOD = {
    "greyscale L": (grey_l, (20, 10), (100, 100, 100), (3, 3), 0),
    "RGBA over white": (rgba, (4, 4), (255, 255, 255), (0, 0), 0),
    "RGBA opaque": (rgba, (4, 4), (255, 0, 0), (2, 2), 0),
    "palette P": (palette, (8, 8), (0, 128, 255), (1, 1), 0),
    "palette with transparency": (palette_transparent, (4, 4), (255, 255, 255), (0, 0), 0),
    "palette opaque pixel": (palette_transparent, (4, 4), (0, 200, 0), (1, 1), 0),
    "CMYK JPEG": (cmyk_jpeg, (16, 16), (200, 30, 30), (8, 8), 12),
    "16-bit I;16 PNG": (png16, (5, 6), (128, 128, 128), (2, 2), 0),
    "1x1": (one_pixel, (1, 1), (10, 20, 30), (0, 0), 0),
    "animated GIF first frame": (animated_gif, (8, 8), (255, 0, 0), (4, 4), 0),
    "PNG named .jpg": (wrong_extension, (8, 8), (0, 255, 0), (4, 4), 0),
    "EXIF rotation": (exif_rotated, (20, 40), (90, 90, 90), (5, 5), 3),
}


@pytest.mark.parametrize("case", GOOD)
def test_common_image_kinds_become_rgb(case, tmp_path):
    maker, size, colour, where, tol = GOOD[case]
    img = open_image(maker(tmp_path))
    assert img.mode == "RGB" and img.size == size
    assert np.abs(np.array(img.getpixel(where), dtype=int) - colour).max() <= tol
    x = to_model_input(img, *SIZE_32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


def truncated_png(tmp: Path) -> Path:
    full = _save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp / "full.png")
    path = tmp / "truncated.png"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path


def text_as_png(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("this is not an image\n")
    return path


def empty_file(tmp: Path) -> Path:
    path = tmp / "empty.jpg"
    path.touch()
    return path


def missing_file(tmp: Path) -> Path:
    return tmp / "nope.png"


def directory(tmp: Path) -> Path:
    return tmp


def nan_float_tiff(tmp: Path) -> Path:
    values = np.full((4, 4), 0.5, dtype=np.float32)
    values[1, 1] = np.nan
    return _save(Image.fromarray(values), tmp / "nan.tiff")


BAD = {
    "truncated PNG": (truncated_png, "damaged or truncated"),
    "text file named .png": (text_as_png, "not an image"),
    "empty file": (empty_file, "empty"),
    "missing file": (missing_file, "does not exist"),
    "directory": (directory, "not a file"),
    "NaN in a float image": (nan_float_tiff, "NaN"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_one_clear_error(case, tmp_path):
    maker, message = BAD[case]
    with pytest.raises(RobustError, match=message):
        open_image(maker(tmp_path))


@pytest.mark.parametrize("pixels", [4_000, 2_000])  # 5,000 pixels: over the limit (PIL warns), over twice it (PIL errs)
def test_decompression_bomb_is_refused(pixels, tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(RobustError, match="too large"):
        open_image(path)


def test_imagenet_style_preprocessing_is_resize_then_center_crop(shared_data):
    photo = open_image(shared_data / "photos" / "cats-coco-000000039769.png")
    assert photo.size == (640, 480)
    x = to_model_input(photo, *SIZE_224)
    assert x.shape == (1, 3, 224, 224)
    assert torch.equal(x[0], folder_transform(224, 256)(photo).as_subclass(torch.Tensor))


def test_small_model_preprocessing_is_plain_resize_on_the_uint8_grid(shared_data):
    x = load_image(shared_data / "photos" / "cats-coco-000000039769.png", *SIZE_32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.equal(x, to_float(to_uint8(x)))  # exactly uint8 grey levels
    # A plain resize squashes the 4:3 photo whole; a center crop would have cut its sides off.
    cropped = folder_transform(32, 32)(open_image(shared_data / "photos" / "cats-coco-000000039769.png"))
    assert not torch.equal(x[0], cropped.as_subclass(torch.Tensor))


def test_png_round_trip_at_model_size_is_exact(tmp_path):
    x = to_float(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(x))
    assert torch.equal(load_image(path, *SIZE_32), x)
    assert torch.equal(load_image(path, 32, 36), x)  # already model size: used as is


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 1.5])
def test_check_images_rejects_nan_inf_and_out_of_range(bad):
    x = torch.rand(2, 3, 4, 4)
    x[1, 0, 0, 0] = bad
    with pytest.raises(RobustError):
        check_images(x)
    check_images(torch.rand(2, 3, 4, 4))
