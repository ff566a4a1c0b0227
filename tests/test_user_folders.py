"""A user's own image folder, as a new user brings it: generated here (PNG and JPEG files written with PIL, nothing
committed), trained one short epoch with the defaults of ``configs/imagefolder.yaml`` (and, slow, of
``configs/imagefolder_finetune.yaml`` from the first run's checkpoint: no download), then reported, fooled and exported
to ONNX, in-process. Every folder of the battery works; every folder that cannot is one line before training, naming
the option to change."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH_ARGS
from PIL import Image

import evaluate
import train
from robust.data.modules import FolderImageError, ImageFolder, is_image_file
from robust.models.card import ModelCard
from robust.models.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "imagefolder.yaml"
FINETUNE = ROOT / "configs" / "imagefolder_finetune.yaml"
SIZE = 8  # the images' side after the config's resize and crop


# ---- folders ---------------------------------------------------------------------------------------------------


@dataclass
class Folder:
    """A user folder: ``classes`` -> (train images, test images); each image's file format, PIL mode and size by its
    index (cycling through ``kinds`` and ``sizes``); ``strays``: files and folders a data set must skip."""

    classes: dict[str, tuple[int, int]]
    kinds: tuple[tuple[str, str], ...] = (("png", "RGB"),)
    sizes: tuple[tuple[int, int], ...] = ((12, 12),)
    strays: bool = False

    def write(self, root: Path) -> Path:
        """The tree ``root/{train,test}/<class>/<i>.<format>``: each class's pixels scatter (seeded noise) around a
        grey level of its own, spread over 0..255, so the classes differ."""
        rng = np.random.default_rng(0)
        for split, at in (("train", 0), ("test", 1)):
            for k, (name, counts) in enumerate(self.classes.items()):
                folder = root / split / name
                folder.mkdir(parents=True)
                level = 255 * k / max(1, len(self.classes) - 1)
                for i in range(counts[at]):
                    fmt, mode = self.kinds[i % len(self.kinds)]
                    w, h = self.sizes[i % len(self.sizes)]
                    pixels = np.clip(level + rng.normal(0, 40, (h, w, 4)), 0, 255).astype(np.uint8)
                    image_of(pixels, mode).save(folder / f"{i}.{fmt}", format="JPEG" if fmt == "jpg" else fmt.upper())
                if self.strays:
                    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
                    (folder / "notes.txt").write_text("photos from the garden\n")
                    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # AppleDouble
            if self.strays:
                (root / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
                (root / split / ".ipynb_checkpoints").mkdir()
                (root / split / "__MACOSX").mkdir()
        return root


def image_of(pixels: np.ndarray, mode: str) -> Image.Image:
    """An ``h×w×4`` uint8 array as a PIL image of ``mode`` (RGB, RGBA, L, LA, P, I;16)."""
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        return Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    rgb = Image.fromarray(pixels[..., :3], "RGB")
    return rgb.quantize(16) if mode == "P" else rgb.convert(mode)


MIXED = (("png", "RGBA"), ("png", "P"), ("png", "L"), ("jpg", "RGB"), ("jpg", "L"), ("png", "LA"), ("png", "I;16"))
BATTERY = {
    "two": Folder({"cat": (40, 40), "dog": (40, 40)}),
    "three": Folder({"bird": (40, 40), "cat": (40, 40), "dog": (40, 40)}),
    "hundred": Folder({f"c{i:03d}": (2, 2) for i in range(100)}),
    "imbalanced": Folder({"rare": (2, 1), "common": (40, 20)}),
    "mixed_sizes": Folder({"a": (6, 3), "b": (6, 3)}, sizes=((5, 9), (40, 17), (64, 64), (13, 13), (300, 7))),
    "mixed_modes": Folder({"a": (7, 7), "b": (7, 7)}, kinds=MIXED),
    "grayscale": Folder({"a": (6, 3), "b": (6, 3), "c": (6, 3)}, kinds=(("png", "L"),)),
    "strays": Folder({"a": (6, 3), "b": (6, 3)}, strays=True),
}


# ---- running the commands in-process ---------------------------------------------------------------------------


def fit_args(config: Path, root: Path, logs: Path, *extra: str) -> list[str]:
    """``train.py fit`` with ``config``'s defaults on ``root``, shortened to seconds: the tiny CNN, one epoch of at
    most two batches, one validation batch with one attack step, a 4-image guard probe; logs under ``logs``."""
    return [
        "fit",
        "--config",
        str(config),
        "--data.init_args.root",
        str(root),
        "--data.init_args.image_size",
        str(SIZE),
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--model.val_steps",
        "1",
        "--overfit_guard.n",
        "4",
        "--overfit_guard.pgd_steps",
        "1",
        "--image_grid.n",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        *TINY_ARCH_ARGS,
        *extra,
    ]


def fit(*args: str) -> Path:
    """Run ``train.py fit`` in-process; the run's ``last.ckpt``."""
    cli = train.main(list(args))
    return Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"


def refusal(capsys, *args: str) -> str:
    """``train.py fit`` that must stop with exit code 2 and one ``error:`` line: that line."""
    with pytest.raises(SystemExit) as stop:
        train.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_evaluate(*args: str) -> str:
    """``evaluate.py`` in-process, which must succeed; its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main([*args, "--device", "cpu"] if args[0] != "export" else list(args)) == 0
    return out.getvalue()


def first_image(root: Path) -> Path:
    return next(p for p in sorted((root / "test").rglob("*")) if p.is_file() and is_image_file(str(p)))


def reported(ckpt: Path, root: Path, out: Path) -> dict:
    """``evaluate.py report`` of ``ckpt`` on the folder's test split (16 images at most, PGD-1), checked: the report's
    JSON, with its page as ``md``."""
    args = ("--checkpoint", str(ckpt), "--data", str(root / "test"), "--steps", "1", "--limit", "16", "--out", str(out))
    run_evaluate("report", *args)
    report = json.loads((out / "report.json").read_text())
    test_images = sum(1 for p in (root / "test").rglob("*") if p.is_file() and is_image_file(str(p)))
    assert report["n"] == min(16, test_images) and report["num_classes"] == len(report["model"]["card"]["class_names"])
    assert all(0 <= v <= 1 for row in report["rows"] for k, v in row.items() if k not in ("eps", "alpha"))
    return {**report, "md": (out / "report.md").read_text()}


def fooled(ckpt: Path, root: Path, out: Path) -> str:
    """``evaluate.py fool`` of ``ckpt`` on the folder's first test image, checked: what it printed."""
    said = run_evaluate("fool", "--checkpoint", str(ckpt), "--image", str(first_image(root)), "--out", str(out))
    assert said.startswith("original prediction:") and (out / "adversarial.png").is_file()
    return said


def exported(ckpt: Path, out: Path, *onnx: str) -> ModelCard:
    """``evaluate.py export`` of ``ckpt`` (``--onnx``: with the onnxruntime-checked ``model.onnx``): its card."""
    run_evaluate("export", "--checkpoint", str(ckpt), "--out", str(out), *onnx)
    assert (out / "model.onnx").is_file() == bool(onnx)
    return ModelCard.from_dict(json.loads((out / "model.json").read_text()), "export")


def check_adapted(report: dict, card: ModelCard) -> None:
    """The report, its page and the card say which APGD parts ran at the model's class count."""
    k, md = report["num_classes"], report["md"]
    assert card.num_classes == k and card.robustness.adapted == report["adapted"]
    if k == 2:
        assert set(report["adapted"]) == {"apgd_dlr", "apgd_t"} and "Worst case (FGSM, PGD, APGD-CE)" in md
        assert "APGD-DLR-1 (= APGD-CE-1)" in md and "The model has 2 classes" in md
    elif k == 3:
        assert list(report["adapted"]) == ["apgd_t"] and "APGD-T-CE-1" in md and "-DLR, -T-CE)" in md
    else:
        assert report["adapted"] == {} and "Worst case (FGSM, PGD, APGD-CE, -DLR, -T)" in md


# ---- fast: two folders, every step ---------------------------------------------------------------------------


FAST = {
    # 2 classes with what a photo folder holds: every colour mode and format, odd sizes, stray files
    "two_mixed": Folder({"cat": (7, 4), "dog": (7, 4)}, kinds=MIXED, sizes=((12, 12), (20, 9), (9, 30)), strays=True),
    "three_grey": Folder({"bird": (4, 4), "cat": (4, 4), "dog": (4, 4)}, kinds=(("png", "L"),)),
}


class Trained(dict):
    """Each :data:`FAST` folder, trained one short epoch with ``imagefolder.yaml``'s defaults when first asked for:
    name -> (the folder, its run's ``last.ckpt``)."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, name: str) -> tuple[Path, Path]:
        base = self.tmp_path_factory.mktemp(name)
        root = FAST[name].write(base / "data")
        self[name] = root, fit(*fit_args(CONFIG, root, base / "logs"))
        return self[name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return Trained(tmp_path_factory)


# The 2-class folder runs in the fast suite; the 3-class one (APGD-T on the targeted CE: test_threats.py's fast
# tests) trains, reports and fools in make test-all, with the battery.
FAST_NAMES = ["two_mixed", pytest.param("three_grey", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", FAST_NAMES)
def test_a_user_folder_trains_and_says_which_threat_parts_ran(name, trained):
    root, ckpt = trained[name]
    classes = len(FAST[name].classes)
    card = load_model(ckpt).card
    assert card.num_classes == classes and card.class_names == sorted(FAST[name].classes)
    assert set(card.robustness.adapted) == ({"apgd_dlr", "apgd_t"} if classes == 2 else {"apgd_t"})
    assert {"pgd_worst", "apgd_dlr", "apgd_t", "targeted_success"} <= card.robustness.metrics.keys()
    events = b"".join(f.read_bytes() for f in ckpt.parents[1].glob("events.out.tfevents.*"))
    assert b"val/threats" in events and card.robustness.adapted["apgd_t"]["note"].encode() in events


@pytest.mark.parametrize("name", FAST_NAMES)
def test_a_user_folder_model_reports_and_fools(name, trained, tmp_path):
    root, ckpt = trained[name]
    report = reported(ckpt, root, tmp_path / "report")
    check_adapted(report, load_model(ckpt).card)
    said = fooled(ckpt, root, tmp_path / "fooled")
    assert re.search(rf"original prediction: +({'|'.join(FAST[name].classes)}) \(", said), said


@pytest.mark.parametrize("name", FAST_NAMES)
def test_a_user_folder_model_exports(name, trained, tmp_path):
    _, ckpt = trained[name]
    card = exported(ckpt, tmp_path / "model")
    assert card.num_classes == len(FAST[name].classes) and card.class_names == sorted(FAST[name].classes)


@pytest.mark.slow
def test_a_two_class_model_exports_to_onnx(trained, tmp_path):
    """The ONNX export, checked in onnxruntime against torch (6 s: the battery below runs it on every folder)."""
    _, ckpt = trained["two_mixed"]
    assert exported(ckpt, tmp_path / "model", "--onnx").num_classes == 2


# ---- refusals: one line before training --------------------------------------------------------------------------


def _no_test_split(root: Path) -> None:
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "test").rmdir()


def _one_class(root: Path) -> None:
    for split in ("train", "test"):
        for p in (root / split / "dog").iterdir():
            p.unlink()
        (root / split / "dog").rmdir()


def _empty_class(root: Path) -> None:
    for split in ("train", "test"):
        (root / split / "bird").mkdir()


def _other_classes(root: Path) -> None:
    (root / "test" / "dog").rename(root / "test" / "wolf")


def _not_an_image(root: Path) -> None:
    (root / "train" / "cat" / "9.png").write_text("not a picture")


def _truncated(root: Path) -> None:
    path = root / "train" / "dog" / "0.png"
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not


def _flat(root: Path) -> None:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).rename(root / f"{split}-{cls}")
        (root / split).rmdir()


REFUSALS = {
    # what the user did -> (how the folder is broken, the options given, what the one line says)
    "no test split": (_no_test_split, (), r"has no test/ split .*--data.init_args.root must hold train/<class>/"),
    "one class": (_one_class, (), r"has 1 class folder\(s\) \(cat\); a classifier needs at least 2"),
    "an empty class": (_empty_class, (), r"class folder .*train/bird holds no images: add .*png"),
    "other test classes": (_other_classes, (), r"test lacks dog; .*train lacks wolf\): give train/ and test/ the"),
    "a text file named .png": (_not_an_image, (), r"cat/9.png is not an image PIL can read .*: remove it from"),
    "no split folders": (_flat, (), r"has no train/ split \(it holds test-cat, test-dog, train-cat, train-dog\)"),
    "one image left": (lambda root: None, ("--data.init_args.limit", "1"), r"--data.init_args.limit 1 keeps 1"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_broken_folder_is_one_line_before_training(case, tmp_path, capsys):
    root = Folder({"cat": (10, 2), "dog": (10, 2)}).write(tmp_path / "data")
    breaks, options, says = REFUSALS[case]
    breaks(root)
    logs = tmp_path / "logs"
    line = refusal(capsys, *fit_args(CONFIG, root, logs, *options))
    assert re.search(says, line), line
    assert not list(logs.rglob("*.ckpt"))  # before the first step: nothing was trained


def test_a_truncated_image_is_named_by_the_loader_in_a_worker(tmp_path):
    """A file whose header opens but whose pixels are cut off passes the check before training; reading it (in a
    DataLoader worker too) is one line naming it, not a worker traceback."""
    root = Folder({"cat": (4, 2), "dog": (4, 2)}).write(tmp_path / "data")
    _truncated(root)
    dm = ImageFolder(root=str(root), batch_size=8, num_workers=1, augment=False)
    dm.setup()
    loader = dm.train_dataloader()
    with pytest.raises(FolderImageError) as caught:
        next(iter(loader))
    message = str(caught.value)
    # Shut the worker down now, by reference counting: left to the garbage collector (the traceback holds the
    # iterator), the worker's queues may go first and torch waits 5 s for the worker to join.
    caught.value.__traceback__ = None
    del caught, loader
    assert "\n" not in message and re.fullmatch(
        r"image .*dog/0.png is damaged or truncated \(.*\): remove it .*", message
    )


# ---- slow: the whole battery, both configs ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BATTERY))
def test_every_folder_of_the_battery_works_with_both_configs(name, tmp_path):
    """The README's two recipes on each folder: ``imagefolder.yaml`` from scratch, then (as
    ``imagefolder_finetune.yaml``'s comment says) a clean run whose checkpoint ``imagefolder_finetune.yaml`` starts
    from; each trained model reports, fools and exports."""
    root = BATTERY[name].write(tmp_path / name)
    logs = tmp_path / "logs"
    clean = fit(*fit_args(CONFIG, root, logs, "--model.attack", "none", "--trainer.logger.init_args.name", "clean"))
    runs = {
        "scratch": fit(*fit_args(CONFIG, root, logs)),
        "finetuned": fit(*fit_args(FINETUNE, root, logs, "--model.weights", str(clean))),
    }
    for run, ckpt in runs.items():
        report = reported(ckpt, root, tmp_path / run / "report")
        fooled(ckpt, root, tmp_path / run / "fooled")
        card = exported(ckpt, tmp_path / run / "model", "--onnx")
        check_adapted(report, card)
        assert report["num_classes"] == len(BATTERY[name].classes)
    assert card.training.init["kind"] == "checkpoint"  # the fine-tuned run started from the clean run's weights
