"""LightningDataModules yielding ``(x, y)``: ``x`` is ``N×C×H×W`` float in [0, 1] (``C`` = the module's
``channels``: 1 grayscale, 3 RGB), ``y`` is ``N`` int64.

- :class:`Digits`: scikit-learn's bundled 8×8 digits upsampled to 32×32 (RGB, or grayscale). Embedded: no download.
- :class:`MNIST`: the official MNIST, 60,000 + 10,000 28×28 grayscale digits, through torchvision (reads
  ``<root>/MNIST/raw``; downloads there for online users). ``root`` defaults to ``$ROBUST_DATA``. Validates on the
  test split, or on ``val_size`` held-out training images so that the checkpoint's choice never sees a test image.
- :class:`CIFAR10`: torchvision's CIFAR-10 (downloads to ``root`` for online users).
- :class:`ImageFolder`: any ``root/<split>/<class>/<image>`` tree, e.g. ``../shared/data/cifar10-subset``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from robust.data.digits import digits_split
from robust.data.images import folder_transform, open_image
from robust.data.roots import data_root
from robust.errors import RobustError

DIGIT_NAMES = tuple(str(i) for i in range(10))
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ROOT_OPTION = "--data.init_args.root"  # the setting that names an image-folder tree, for its errors
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def evenly_spaced(ds: Dataset, limit: int | None) -> Dataset:
    """``limit`` evenly spaced examples of ``ds`` (all of it for None): every class of a class-sorted folder stays
    represented."""
    if limit is None or limit >= len(ds):
        return ds
    step = len(ds) / limit
    return Subset(ds, [int(i * step) for i in range(limit)])


def check_channels(channels: int) -> int:
    """``channels`` if it is 1 (grayscale) or 3 (RGB); one-line RobustError otherwise."""
    if channels not in (1, 3):
        raise RobustError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return int(channels)


def holdout_split(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(kept, held_out)`` of ``n`` examples: ``size`` of them held out, drawn by ``seed`` (the same
    ``(n, size, seed)`` gives the same split on any machine); both sorted, disjoint, together all ``n``."""
    if not 0 < size < n:
        raise RobustError(f"val_size must be between 1 and {n - 1} (the training images to hold out), got {size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


class _Base(L.LightningDataModule):
    """Shared loaders; subclasses set ``train_set``, ``val_set`` and ``class_names`` in ``setup``."""

    class_names: tuple[str, ...]
    channels: int = 3  # of the images it yields; linked into the model's ``channels``

    def __init__(self, batch_size: int, num_workers: int, limit: int | None) -> None:
        super().__init__()
        if batch_size < 1:
            raise RobustError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None  # the test split; None: the validation set is the test split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        """What a deployed model needs to know about its training data: name, classes, input size."""
        size = getattr(self, "image_size", 32)
        return {
            "name": type(self).__name__,
            "root": str(getattr(self, "root", "")) or None,
            "class_names": list(self.class_names),
            "image_size": size,
            "channels": self.channels,
            "resize": getattr(self, "resize", None) or size,
        }

    def _limited(self, ds: Dataset) -> Dataset:
        return evenly_spaced(ds, self.limit)

    def _loader(self, split: str) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        shuffle = split == "train"
        test = self.val_set if self.test_set is None else self.test_set
        ds = {"train": self.train_set, "val": self.val_set, "test": test}[split]
        # Every DataLoader iterator draws a worker seed from its generator; the validation loader gets its own so
        # that how often one validates does not shift the global RNG that shuffles, augments and attacks.
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # A last training batch of one image would stop the run at an epoch's end (BatchNorm cannot train on one
            # value per channel, as at a 1×1 feature map): that image sits the epoch out, a different one each epoch.
            drop_last=shuffle and len(ds) % self.batch_size == 1 and len(ds) > 1,
            generator=None if shuffle else torch.Generator().manual_seed(0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class Digits(_Base):
    """Embedded 10-class digits (scikit-learn), 32×32 RGB (``channels`` 3) or grayscale (1); a fixed seeded 80/20
    train/val split.

    Args:
        batch_size: images per optimizer step.
        num_workers: data loading processes (0: in the training process).
        image_size: side of the square images, in pixels.
        limit: keep that many evenly spaced images of each split (quick runs).
        split_seed: seed of the train/val split.
        channels: 3 (the grey digit repeated as RGB) or 1 (grayscale).
    """

    class_names = DIGIT_NAMES

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        limit: int | None = None,
        split_seed: int = 0,
        channels: int = 3,
    ) -> None:
        super().__init__(batch_size, num_workers, limit)
        if image_size < 1:
            raise RobustError(f"image_size must be at least 1 pixel, got {image_size}")
        self.image_size, self.split_seed, self.channels = image_size, split_seed, check_channels(channels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = digits_split(self.image_size, self.channels, self.split_seed)
        self.train_set = self._limited(TensorDataset(*train))
        self.val_set = self._limited(TensorDataset(*val))


def mnist_tensors(root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training (60,000) or test (10,000) split as ``N×1×28×28`` float [0, 1] images (``pixel / 255``, as
    ``ToTensor`` gives) and ``N`` int64 labels, read by torchvision from ``<root>/MNIST/raw``."""
    try:
        ds = datasets.MNIST(str(root), train=train, download=download)
    except (OSError, RuntimeError) as exc:
        how = "could not be downloaded" if download else "download is off"
        where = Path(root) / "MNIST" / "raw"
        raise RobustError(
            f"MNIST is not in {where} and {how} ({str(exc).strip()}); set --data.init_args.root "
            "(or ROBUST_DATA) to the folder that holds MNIST/raw"
        ) from None
    return ds.data.unsqueeze(1).float().div_(255), ds.targets.to(torch.int64)


class MNIST(_Base):
    """The official MNIST: 60,000 training and 10,000 test digits, 28×28 grayscale. The validation set (per-epoch
    ``val/*`` and the checkpoint's choice) is the test split, as in torchvision's examples, or with ``val_size`` N
    that many training images held out (drawn by ``split_seed``), trained on by nobody and never a test image.
    ``test_set`` is always the test split.

    Args:
        root: the folder holding ``MNIST/raw`` (torchvision's layout); default ``$ROBUST_DATA``, else ``data``.
        batch_size: images per optimizer step.
        num_workers: data loading processes (0: in the training process).
        limit: keep that many evenly spaced images of each split (quick runs).
        download: let torchvision download the files when missing.
        channels: 1 (grayscale, as published) or 3 (the digit repeated as RGB, for RGB backbones).
        val_size: 0 validates on the test split; N holds out N training images to validate on.
        split_seed: seed of the held-out draw.
    """

    class_names = DIGIT_NAMES
    image_size = 28

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        limit: int | None = None,
        download: bool = True,
        channels: int = 1,
        val_size: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, limit)
        if val_size < 0:
            raise RobustError(f"val_size must be 0 (validate on the test split) or more, got {val_size}")
        self.root, self.download, self.channels = root or data_root(), download, check_channels(channels)
        self.val_size, self.split_seed = val_size, split_seed

    def prepare_data(self) -> None:
        for train in (True, False):
            mnist_tensors(self.root, train, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (x, y), (x_test, y_test) = (mnist_tensors(self.root, train, self.download) for train in (True, False))
        x, x_test = x.expand(-1, self.channels, -1, -1), x_test.expand(-1, self.channels, -1, -1)
        self.test_set = self._limited(TensorDataset(x_test, y_test))
        if self.val_size:
            kept, held = holdout_split(len(y), self.val_size, self.split_seed)
            self.train_set = self._limited(TensorDataset(x[kept], y[kept]))
            self.val_set = self._limited(TensorDataset(x[held], y[held]))
        else:
            self.train_set, self.val_set = self._limited(TensorDataset(x, y)), self.test_set

    def describe(self) -> dict:
        return {**super().describe(), "val_size": self.val_size, "split_seed": self.split_seed}


def _train_transform(size: int, augment: bool) -> v2.Compose:
    steps = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True)])


class CIFAR10(_Base):
    """torchvision's CIFAR-10 in ``root`` (downloaded when ``download``); val = the official test set.

    Args:
        root: the folder torchvision's CIFAR10 reads (and downloads to).
        batch_size: images per optimizer step.
        num_workers: data loading processes (0: in the training process).
        augment: pad-and-crop and horizontal flips of the training images.
        download: let torchvision download the files when missing.
        limit: keep that many evenly spaced images of each split (quick runs).
    """

    class_names = CIFAR10_NAMES

    def __init__(
        self,
        root: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 2,
        augment: bool = True,
        download: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, limit)
        self.root, self.augment, self.download = root, augment, download

    def prepare_data(self) -> None:
        try:
            datasets.CIFAR10(self.root, train=True, download=self.download)
            datasets.CIFAR10(self.root, train=False, download=self.download)
        except (OSError, RuntimeError) as exc:
            raise RobustError(f"CIFAR-10 is not in {self.root} and could not be downloaded ({exc})") from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        plain = _train_transform(32, augment=False)
        self.train_set = self._limited(datasets.CIFAR10(self.root, True, _train_transform(32, self.augment)))
        self.val_set = self._limited(datasets.CIFAR10(self.root, False, plain))


def is_image_file(path: str) -> bool:
    """Whether a folder data set takes the file at ``path``: an image extension (:data:`IMAGE_EXTENSIONS`), and not
    hidden (``.DS_Store``; ``._photo.png``, the resource forks macOS leaves on shared drives). Other files
    (``notes.txt``) are skipped, as torchvision's ``is_valid_file`` skips them."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class FolderImageError(RobustError):
    """A folder's image that cannot be read: one line, also when a DataLoader worker raised it (PyTorch re-raises a
    worker's exception as ``type(message)`` with the worker's traceback in the message: its last line is kept)."""

    def __init__(self, message: str) -> None:
        last = message.rstrip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1] if "Traceback" in message else message)


def load_folder_image(path: str) -> Image.Image:
    """A folder data set's loader: :func:`robust.data.images.open_image` (RGB; transparency on white, 16-bit scaled,
    EXIF
    rotation applied, as ``evaluate.py fool`` reads an image), a bad file one line naming it."""
    try:
        return open_image(path)
    except RobustError as exc:
        raise FolderImageError(f"{exc}: remove it from the folder or replace it") from None


def _check_readable(samples: list[tuple[str, int]]) -> None:
    """Every file's header opens in PIL (about 30 µs a file): a non-image file with an image's extension, an empty
    one or a decompression bomb is one line naming it before training, not after an epoch."""
    for path, _ in samples:
        try:
            with Image.open(path):
                pass
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise FolderImageError(f"{path} is not an image PIL can read ({exc}): remove it from the folder") from None


class _Folder(datasets.ImageFolder):
    """torchvision's ``ImageFolder`` over the classes of :func:`class_names_in` (hidden folders left out)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = list(class_names_in(Path(directory)))
        return classes, {name: i for i, name in enumerate(classes)}


def image_folder(path: str | Path, transform: v2.Compose, option: str = "--data") -> datasets.ImageFolder:
    """A checked ``ImageFolder`` of ``path/<class>/**/<image>``: at least two classes (:func:`class_folders`), an
    image in every class folder, every image's header readable; stray files skipped (:func:`is_image_file`). Each
    problem is one line naming the folder or file (and ``option``, the setting that chose the folder)."""
    path = Path(path)
    class_folders(path, option)
    ds = _Folder(
        str(path), transform=transform, loader=load_folder_image, is_valid_file=is_image_file, allow_empty=True
    )
    found = set(ds.targets)
    empty = [name for i, name in enumerate(ds.classes) if i not in found]
    if empty:
        others = f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else ""
        raise RobustError(
            f"class folder {path / empty[0]} holds no images{others}: add {', '.join(IMAGE_EXTENSIONS)} files or "
            "remove the folder"
        )
    _check_readable(ds.samples)
    return ds


def class_names_in(path: Path) -> tuple[str, ...]:
    """The class sub-folder names of ``path``, sorted (as ImageFolder orders them): hidden folders
    (``.ipynb_checkpoints``) and ``__``-folders (``__MACOSX``) left out."""
    return tuple(sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "__"))))


def class_folders(path: Path, option: str = "--data") -> tuple[str, ...]:
    """:func:`class_names_in` ``path``, checked (the folder exists, two classes or more; no image decoding); an
    error names ``option``, the setting that chose the folder."""
    if not path.is_dir():
        raise RobustError(f"data folder {path} does not exist: check {option}")
    classes = class_names_in(path)
    if len(classes) < 2:
        found = f" ({', '.join(classes)})" if classes else ""
        raise RobustError(
            f"data folder {path} has {len(classes)} class folder(s){found}; a classifier needs at least 2: add a "
            f"folder of images for each class under it ({option})"
        )
    return classes


def split_classes(root: Path, train_dir: str, val_dir: str) -> tuple[str, ...]:
    """The classes of an image-folder tree ``root/{train_dir,val_dir}/<class>/``, checked without reading an image:
    both splits there, at least 2 classes, the same in both; each problem one line naming the option to change."""
    option = ROOT_OPTION
    if not root.is_dir():
        raise RobustError(f"data folder {root} does not exist: set {option}")
    for split, flag in ((train_dir, "train_dir"), (val_dir, "val_dir")):
        if not (root / split).is_dir():
            holds = ", ".join(class_names_in(root)) or "no folders"
            raise RobustError(
                f"{root} has no {split}/ split (it holds {holds}): {option} must hold {train_dir}/<class>/ and "
                f"{val_dir}/<class>/ image folders, the held-out images in {val_dir}/ (other split names: "
                f"--data.init_args.{flag})"
            )
    train, val = class_folders(root / train_dir, option), class_folders(root / val_dir, option)
    if train != val:
        lacks = [
            f"{root / split} lacks {', '.join(c for c in want if c not in have)}"
            for split, have, want in ((val_dir, val, train), (train_dir, train, val))
            if set(want) - set(have)
        ]
        raise RobustError(
            f"the splits have different class folders ({'; '.join(lacks)}): give {train_dir}/ and {val_dir}/ the "
            f"same class folders ({option})"
        )
    return train


class ImageFolder(_Base):
    """``root/<train_dir>/<class>/*`` and ``root/<val_dir>/<class>/*`` image trees (any size, any mode, sub-folders
    too; other files skipped: :func:`is_image_file`).

    Everything that would fail later is one line before the first step: the splits and their classes when built
    (:func:`split_classes`), empty class folders, unreadable images and too few images in ``setup``
    (:func:`image_folder`).

    Args:
        root: the folder holding the two splits (your images: ``root/train/<class>/``, ``root/test/<class>/``).
        train_dir: the training split's folder under ``root``.
        val_dir: the validation split's folder under ``root`` (per-epoch ``val/*`` and the best checkpoint).
        image_size: side of the square model input, in pixels (images are resized and centre-cropped to it).
        resize: short side before the centre crop (default ``image_size``; ImageNet style: 256 for 224).
        batch_size: images per optimizer step (a few hundred images: 16 or 32, for enough steps).
        num_workers: data loading processes (0: in the training process).
        augment: padded random crops and horizontal flips of the training images.
        limit: keep that many evenly spaced images of each split (quick runs).
    """

    def __init__(
        self,
        root: str = "data/images",
        train_dir: str = "train",
        val_dir: str = "test",
        image_size: int = 32,
        resize: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        augment: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, limit)
        self.root, self.train_dir, self.val_dir = Path(root), train_dir, val_dir
        if image_size < 1:
            raise RobustError(f"image_size must be at least 1 pixel, got {image_size}")
        self.image_size, self.resize, self.augment = image_size, resize, augment
        self.class_names = split_classes(self.root, train_dir, val_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        option = ROOT_OPTION
        train = image_folder(
            self.root / self.train_dir, folder_transform(self.image_size, self.resize, self.augment), option
        )
        val = image_folder(self.root / self.val_dir, folder_transform(self.image_size, self.resize), option)
        if (tuple(train.classes), tuple(val.classes)) != (self.class_names,) * 2:
            raise RobustError(f"the class folders of {self.root} changed since the run began: start it again")
        self.train_set, self.val_set = self._limited(train), self._limited(val)
        if len(self.train_set) < 2:  # BatchNorm cannot train on one image
            raise RobustError(
                f"training needs 2 images or more; --data.init_args.limit {self.limit} keeps {len(self.train_set)}"
            )
