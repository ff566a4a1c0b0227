"""Evaluation data: the images a report (or the ONNX check) runs on, with labels that are the model's class ids.

:func:`eval_data` reads ``digits``, ``mnist``, ``cifar10`` or an image folder at the model card's size and channels,
matches the data's classes to the model's by name, and says what it read (name, split, folder fingerprint, ``n``),
so a report records which images its figures are on. :func:`data_class_names` names the classes of ``--data``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from robust.checks import check_at_least_one
from robust.data.images import folder_transform
from robust.data.modules import (
    CIFAR10,
    CIFAR10_NAMES,
    DIGIT_NAMES,
    MNIST,
    Digits,
    class_folders,
    class_names_in,
    evenly_spaced,
    image_folder,
)
from robust.data.roots import data_root
from robust.errors import RobustError
from robust.models.card import ModelCard


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
DEFAULT_BATCH_SIZE = 128  # images per batch of a report (evaluate.py report --batch-size)


def _check_not_a_split_root(root: Path, classes: Sequence[str]) -> None:
    """An image-folder root whose "classes" are its splits (``train/``, ``test/``): say which folder to pass."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits and len(splits) == len(classes):
        held_out = next((c for c in classes if c.lower() != "train"), classes[0])
        raise RobustError(
            f"{root} holds the splits {', '.join(classes)}, not class folders: pass one split, "
            f"e.g. --data {root / held_out} (the held-out images)"
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
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    cifar10_root: str = "data/cifar10",
    mnist_root: str | None = None,
) -> tuple[DataLoader, dict]:
    """The evaluation loader for ``data`` (``digits``, ``mnist``, ``cifar10`` or an image-folder path) and its
    identity.

    Images come at the model card's ``image_size`` and ``channels`` (folders and CIFAR-10 via
    :func:`robust.data.images.folder_transform` with the card's ``resize``; MNIST is 28×28 grayscale and must be fed as
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
        match = _align_labels(dm.test_set, DIGIT_NAMES, card)
        ds = evenly_spaced(dm.test_set, limit)
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
        _check_not_a_split_root(root, class_names_in(root))
        base = image_folder(root, folder_transform(size, resize, channels=channels), "--data")
        match = _align_labels(base, base.classes, card)
        identity = {
            "name": "folder",
            "path": str(root.resolve()),
            "classes": list(base.classes),
            "fingerprint": _folder_fingerprint(root, base.samples),
        }
        ds = evenly_spaced(base, limit)
    identity.update(labels=match, limit=limit, n=len(ds))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers), identity
