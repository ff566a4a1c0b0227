"""Fool / defend one image: a real checkpoint and the shared photo; the PNG round trip; CLI errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from robust import load_model
from robust.data.images import load_image
from robust.defenses import to_uint8
from robust.errors import RobustError
from robust.evaluation.fool import fool, quantize_within, summary

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "photos/cats-coco-000000039769.png"
EPS = 0.1


def cli_main(argv: list[str]) -> tuple[int, str, str]:
    """Run ``evaluate.py``'s ``main`` in-process; returns (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model(digits_cnn_ckpt):
    return load_model(digits_cnn_ckpt)


@pytest.fixture(scope="module")
def targeted(digits_cnn_ckpt, shared_data, tmp_path_factory):
    """``evaluate.py fool`` with a targeted PGD on the cat photo toward digit 7: 50 steps of eps/10, a margin wide
    enough that reaching the target does not hang on the digits model's training trajectory (PGD-10 of eps/4
    reached it on some CPUs only)."""
    out = tmp_path_factory.mktemp("fool")
    code, stdout, _ = cli_main(
        [
            "fool",
            "--checkpoint",
            str(digits_cnn_ckpt),
            "--image",
            str(shared_data / PHOTO),
            "--target",
            "7",
            "--eps",
            str(EPS),
            "--steps",
            "50",
            "--alpha",
            str(EPS / 10),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return out, stdout


def test_targeted_fool_reaches_its_target_within_eps(targeted, model, shared_data):
    out, stdout = targeted
    size = model.card.image_size, model.card.resize
    x = load_image(shared_data / PHOTO, *size)  # the photo resized to the model's 32×32 input
    x_adv = load_image(out / "adversarial.png", *size)  # the written PNG, re-loaded
    assert x_adv.shape == x.shape == (1, 3, 32, 32)
    assert 0 < (x_adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        assert model(x_adv).argmax(1).item() == 7  # the round trip keeps the adversarial prediction
        original = model(x).argmax(1).item()
    assert original != 7
    lines = stdout.splitlines()
    assert lines[0].startswith(f"original prediction:    {original} (")
    assert lines[1].startswith("adversarial prediction: 7 (") and "target '7' reached" in lines[1]
    assert lines[2].startswith("after JPEG q75:")


def test_fool_files_are_valid_images(targeted):
    out, _ = targeted
    sizes = {}
    for name in ("adversarial.png", "perturbation.png", "figure.png"):
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG"
            sizes[name] = img.size
    assert sizes["adversarial.png"] == sizes["perturbation.png"] == (32, 32)
    assert sizes["figure.png"][0] > 800
    assert sorted(p.name for p in out.iterdir()) == ["adversarial.png", "figure.png", "perturbation.png"]


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_untargeted_fool_is_quantized_inside_the_ball(model, digits_val, attack):
    x = digits_val[0][:1]
    result = fool(model, x, attack=attack, eps=8 / 255, steps=3)
    assert result.target is None and result.linf <= 8 / 255 + 1e-6
    assert torch.allclose(result.x_adv * 255, torch.round(result.x_adv * 255), atol=1e-4)  # uint8 grey levels
    with torch.no_grad():
        assert model(result.x_adv).argmax(1).item() == result.pred["adversarial"]
    assert [len(result.top[k]) for k in ("original", "adversarial", "jpeg")] == [3, 3, 3]


@pytest.mark.parametrize("target", [None, "other"])
def test_a_two_class_model_is_fooled_with_its_two_classes(target):
    """Two classes (a cat/dog folder's model): the top-k lists hold both, and the one other class is a target."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        original = int(model(x).argmax(1))
    goal = None if target is None else str(1 - original)
    result = fool(model, x, target=goal, eps=0.3, steps=5)
    assert result.pred["adversarial"] == 1 - original  # fooled: the other class, the only one there is
    assert [len(result.top[k]) for k in ("original", "adversarial", "jpeg")] == [2, 2, 2]
    assert (f"target '{goal}' reached" if target else ": fooled]") in summary(result)


def test_eps_zero_changes_nothing(model, digits_val):
    x = v2.functional.to_dtype(to_uint8(digits_val[0][:1]), torch.float32, scale=True)  # as load_image gives
    result = fool(model, x, target="3", eps=0.0)
    assert torch.equal(result.x_adv, x) and result.pred["adversarial"] == result.pred["original"]


def test_quantize_within_stays_in_the_ball():
    gen = torch.Generator().manual_seed(0)
    x = quantize_within(torch.rand(4, 3, 16, 16, generator=gen), torch.full((4, 3, 16, 16), 0.5), 1.0)
    for eps in (0.1, 8 / 255, 0.013):  # on and off the 1/255 grid
        x_adv = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
        q = quantize_within(x_adv, x, eps)
        assert (q - x).abs().max() <= eps + 1e-6 and 0 <= q.min() and q.max() <= 1
        assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)
        assert (q - x_adv).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "7x"], "unknown target class '7x'; did you mean '7'"),
        (["--target", "12"], "target class id 12 is out of range"),
        (["--image", "{tmp}/missing.png"], "does not exist"),
        (["--image", "{tmp}/notes.png"], "not an image"),
        (["--checkpoint", "{tmp}/notes.png"], "notes.png"),
    ],
)
def test_fool_input_errors_are_one_line_exit_2(args, message, digits_cnn_ckpt, shared_data, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    defaults = {"--checkpoint": str(digits_cnn_ckpt), "--image": str(shared_data / PHOTO)}
    given = dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]), strict=True))
    argv = ["fool", *[x for k, v in {**defaults, **given}.items() for x in (k, v)], "--out", str(tmp_path / "out")]
    code, stdout, stderr = cli_main(argv)
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_debug_shows_the_exception(digits_cnn_ckpt, tmp_path):
    with pytest.raises(RobustError, match="does not exist"):
        cli_main(
            [
                "fool",
                "--debug",
                "--checkpoint",
                str(digits_cnn_ckpt),
                "--image",
                str(tmp_path / "x.png"),
                "--out",
                str(tmp_path),
            ]
        )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


USAGE_ERRORS = {
    "eps above 1": (
        ["report", "--checkpoint", "m.ckpt", "--data", "digits", "--norm", "linf", "--eps", "1.5"],
        "eps must be in [0, 1]",
    ),
    "eps below 0": (["fool", "--image", "a.png", "--out", "o", "--model", "imagenet", "--eps=-0.1"], "eps must be"),
    "eps NaN": (["fool", "--image", "a.png", "--out", "o", "--model", "imagenet", "--eps", "nan"], "not a finite"),
    "eps not a number": (["report", "--model", "m.ckpt", "--data", "digits", "--eps", "big"], "not a number"),
    "steps 0": (["report", "--checkpoint", "m.ckpt", "--data", "digits", "--steps", "0"], "steps must be at least 1"),
    "quality 0": (["report", "--checkpoint", "m.ckpt", "--data", "digits", "--quality", "0"], "quality must be"),
    "quality 101": (["fool", "--image", "a", "--out", "o", "--model", "imagenet", "--quality", "101"], "1..100"),
    "no model": (["fool", "--image", "a.png", "--out", "o"], "--checkpoint/--model"),
    "unknown attack": (["fool", "--image", "a", "--out", "o", "--model", "m", "--attack", "cw"], "invalid choice"),
    "no subcommand": ([], "required"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(case):
    args, message = USAGE_ERRORS[case]
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr


@pytest.mark.slow  # a fresh interpreter importing torch; in-process: test_fool_input_errors_are_one_line_exit_2
def test_robust_error_in_a_real_process_is_one_line_exit_2(tmp_path):
    proc = run_cli(
        "report", "--checkpoint", str(tmp_path / "missing.ckpt"), "--data", "digits", "--out", str(tmp_path / "out")
    )
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.ckpt" in lines[0]
    assert not (tmp_path / "out").exists()
