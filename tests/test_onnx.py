"""ONNX export (``evaluate.py export --onnx``): the model runs in onnxruntime with torch's logits and predictions,
clean and adversarial, at any batch size; an unfaithful export is refused; the README's snippet runs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import robust.export.onnx
from robust.attacks import pgd
from robust.data.images import load_image, png_bytes
from robust.data.modules import DIGIT_NAMES, folder_transform
from robust.errors import RobustError
from robust.export.folder import export_model
from robust.export.onnx import TOLERANCE, check_batch, onnx_session
from robust.files import sha256_hex
from robust.models.card import ModelCard, TrainingRecord
from robust.models.resolve import load_model

onnx = pytest.importorskip("onnx")  # the extra robust[onnx]; `make` installs it
onnxruntime = pytest.importorskip("onnxruntime")

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def onnx_cli(digits_cnn_ckpt, tmp_path_factory) -> tuple[Path, int, str]:
    """The shared digits checkpoint exported by ``evaluate.py export --onnx``: folder, exit code, stdout."""
    out = tmp_path_factory.mktemp("onnx_export") / "model"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = evaluate.main(["export", "--checkpoint", str(digits_cnn_ckpt), "--out", str(out), "--onnx"])
    return out, rc, stdout.getvalue()


@pytest.fixture(scope="module")
def session(onnx_cli):
    return onnx_session(onnx_cli[0] / "model.onnx")


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def torch_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_predictions(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Logits within TOLERANCE, hence the same class wherever torch's top two are more than 2·TOLERANCE apart (all
    but near-ties, which must stay rare)."""
    assert (got - expected).abs().max() <= TOLERANCE
    top2 = expected.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * TOLERANCE
    assert clear.float().mean() >= 0.9
    assert torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_cli_writes_model_onnx_beside_the_weights(onnx_cli, digits_val, digits_cnn):
    out, rc, stdout = onnx_cli
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temp folders left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert re.search(r"model\.onnx: opset \d+, max \|logit difference\| to torch \S+ on 32 digits images", stdout)
    x = digits_val[0][:8]
    assert torch.equal(torch_logits(load_model(out / "model.onnx"), x), torch_logits(digits_cnn, x))


def test_card_records_the_onnx_contract_and_check(onnx_cli, session):
    out = onnx_cli[0]
    card = json.loads((out / "model.json").read_text())
    assert card["files"]["model.onnx"] == sha256_hex((out / "model.onnx").read_bytes())
    record = card["onnx"]
    proto = onnx.load(out / "model.onnx")
    assert record["opset"] == next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    assert (record["input"], record["output"]) == ("images", "logits")
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name, inp.type) == ("images", "logits", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # a symbolic batch dimension
    assert record["input_shape"] == ["batch", 3, 32, 32]
    check = record["check"]
    assert check["provider"] == "CPUExecutionProvider" and check["tolerance"] == TOLERANCE
    assert (check["data"]["name"], check["data"]["split"], check["data"]["n"]) == ("digits", "val", 32)
    assert 0.0 <= check["max_abs_logit_diff"] <= TOLERANCE
    assert card["versions"]["onnxruntime"] == onnxruntime.__version__
    assert card["versions"]["onnx"] == onnx.__version__
    assert load_model(out).card.onnx == record


def test_cards_without_the_onnx_field_still_load(onnx_cli, tmp_path):
    card = json.loads((onnx_cli[0] / "model.json").read_text())
    old = {k: v for k, v in card.items() if k != "onnx"}  # as written before the field existed
    assert ModelCard.from_dict(old, "old card").onnx is None
    with pytest.raises(RobustError, match="no 'image_size' field"):  # fields without a default stay required
        ModelCard.from_dict({k: v for k, v in old.items() if k != "image_size"}, "old card")


@pytest.mark.parametrize("n", [1, 7, 64])  # the export traced a batch of 2 and checked one of 32
def test_same_logits_on_clean_images_at_any_batch_size(session, digits_cnn, digits_val, n):
    x = digits_val[0][-n:]
    assert_same_predictions(run_onnx(session, x), torch_logits(digits_cnn, x))


def test_adversarial_batch_from_torch_gets_the_same_predictions(session, digits_cnn, digits_val):
    x, y = digits_val[0][:48], digits_val[1][:48]
    x_adv = pgd(digits_cnn, x, y, eps=0.1, alpha=0.025, steps=5)
    expected = torch_logits(digits_cnn, x_adv)
    assert (expected.argmax(1) == y).float().mean() < (torch_logits(digits_cnn, x).argmax(1) == y).float().mean()
    assert_same_predictions(run_onnx(session, x_adv), expected)


def test_export_is_refused_when_onnxruntime_disagrees(digits_cnn_ckpt, onnx_cli, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(onnx_cli[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = robust.export.onnx.onnx_logits

    def off_by_twice_the_tolerance(session, x: torch.Tensor) -> torch.Tensor:
        logits = real(session, x)
        logits[3, 1] += 2 * TOLERANCE
        return logits

    converted = ((out / "model.onnx").read_bytes(), json.loads(before["model.json"])["onnx"]["opset"])
    monkeypatch.setattr(robust.export.onnx, "to_onnx", lambda *_: converted)  # the fixture's conversion
    monkeypatch.setattr(robust.export.onnx, "onnx_logits", off_by_twice_the_tolerance)
    with pytest.raises(RobustError, match=r"differ from torch's by up to 0\.002 on 32 digits images") as info:
        export_model(digits_cnn_ckpt, out, onnx=True)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # and no temp folder is left


def test_without_the_extra_onnx_fails_in_one_line(digits_cnn_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    rc = evaluate.main(["export", "--checkpoint", str(digits_cnn_ckpt), "--out", str(tmp_path / "model"), "--onnx"])
    assert rc == 2
    err = capsys.readouterr().err
    assert (
        err == "error: ONNX export needs onnxruntime: install the 'onnx' extra (pip install 'robust[onnx]', "
        "or uv sync --extra onnx)\n"
    )
    assert not (tmp_path / "model").exists()


def test_check_batch_is_the_given_data_else_the_digits_else_seeded_noise(digits_val, tmp_path):
    card = ModelCard(
        arch="resnet18",
        num_classes=10,
        class_names=list(DIGIT_NAMES),
        image_size=16,
        resize=16,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        cifar_stem=False,
        data=None,
        training=TrainingRecord(),
    )
    noise, identity = check_batch(card)
    assert identity == {"name": "random", "distribution": "uniform [0, 1]", "seed": 0, "n": 32}
    assert noise.shape == (32, 3, 16, 16) and 0 <= noise.min() and noise.max() <= 1
    assert torch.equal(check_batch(card)[0], noise)  # seeded: every export checks the same images
    digits, identity = check_batch(dataclasses.replace(card, data="Digits"))
    assert digits.shape == (32, 3, 16, 16) and (identity["name"], identity["split"]) == ("digits", "val")
    for i, name in enumerate(DIGIT_NAMES):  # a class folder per digit, the model's class names
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(png_bytes(digits_val[0][digits_val[1] == i][0]))
    images, identity = check_batch(dataclasses.replace(card, data="Digits"), str(tmp_path))
    assert images.shape == (10, 3, 16, 16) and (identity["name"], identity["n"]) == ("folder", 10)


def test_onnx_data_needs_onnx(digits_cnn_ckpt, tmp_path, capsys):
    args = ["export", "--checkpoint", str(digits_cnn_ckpt), "--out", str(tmp_path / "model"), "--onnx-data", "digits"]
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == "error: --onnx-data only applies with --onnx\n"
    assert not (tmp_path / "model").exists()


def readme_snippet() -> str:
    match = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md has no <!-- onnx-snippet --> python block"
    return match.group(1)


def run_snippet(folder: Path, image: Path, cwd: Path) -> str:
    """The README's snippet in a fresh Python (no torch imported) with ``model/`` and ``digit.png`` in ``cwd``."""
    (cwd / "model").symlink_to(folder)
    shutil.copy(image, cwd / "digit.png")
    done = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_readme_snippet_classifies_a_digit_png_as_torch_does(onnx_cli, digits_cnn, digits_val, tmp_path):
    png = tmp_path / "digit.png"
    png.write_bytes(png_bytes(digits_val[0][0]))
    expected = torch_logits(digits_cnn, load_image(png, 32)).argmax(1).item()
    (tmp_path / "run").mkdir()
    assert run_snippet(onnx_cli[0], png, tmp_path / "run") == DIGIT_NAMES[expected]


def snippet_crop(path: Path, size: int, resize: int) -> torch.Tensor:
    """The README snippet's preprocessing, step for step (PIL): short side to ``resize``, centre ``size``×``size``;
    a ``1×3×size×size`` tensor in [0, 1]."""
    image = Image.open(path).convert("RGB")
    scale = resize / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())[None] / 255


def test_readme_snippet_resizes_and_crops_a_photo(onnx_cli, digits_cnn, shared_data, tmp_path):
    photo = shared_data / "photos" / "cats-coco-000000039769.png"  # 640×480: resized and cropped
    card = json.loads((onnx_cli[0] / "model.json").read_text())
    x = snippet_crop(photo, card["image_size"], card["resize"])
    # the snippet's crop is the training transform's, up to the two libraries' resampling (8 grey levels on average
    # at this 15× downscale; a crop off centre or unscaled is 25 or more)
    training = folder_transform(card["image_size"], card["resize"])(Image.open(photo).convert("RGB"))[None]
    assert (x - training).abs().mean() < 0.05
    assert run_snippet(onnx_cli[0], photo, tmp_path) == DIGIT_NAMES[torch_logits(digits_cnn, x).argmax(1).item()]
