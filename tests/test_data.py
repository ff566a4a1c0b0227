"""Data modules yield [0, 1] float images and int labels; folders are checked with clear errors, stray files skipped
(the battery of user folders: tests/test_user_folders.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from robust.data.modules import (
    CIFAR10,
    CIFAR10_NAMES,
    MNIST,
    Digits,
    FolderImageError,
    ImageFolder,
    class_names_in,
    holdout_split,
    is_image_file,
)
from robust.errors import RobustError


def test_digits_is_embedded_and_deterministic():
    a, b = Digits(batch_size=32), Digits(batch_size=32)
    a.setup()
    b.setup()
    assert len(a.train_set) == 1437 and len(a.val_set) == 360 and a.num_classes == 10
    x, y = next(iter(a.val_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])


def test_image_folder_on_real_cifar_subset(shared_data):
    dm = ImageFolder(root=str(shared_data / "cifar10-subset"), batch_size=16, num_workers=0, limit=100)
    assert dm.class_names == CIFAR10_NAMES and dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert len(dm.val_set) == 100
    assert len({int(label) for _, label in dm.val_set}) == 10  # the limit keeps every class


def test_image_folder_errors(tmp_path):
    with pytest.raises(RobustError, match="does not exist: set --data.init_args.root"):
        ImageFolder(root=str(tmp_path / "nope"))
    (tmp_path / "train" / "only").mkdir(parents=True)
    with pytest.raises(RobustError, match=r"has no test/ split \(it holds train\).*--data.init_args.val_dir"):
        ImageFolder(root=str(tmp_path))
    (tmp_path / "test" / "only").mkdir(parents=True)
    with pytest.raises(RobustError, match=r"train has 1 class folder\(s\) \(only\); a classifier needs at least 2"):
        ImageFolder(root=str(tmp_path))
    (tmp_path / "train" / "other").mkdir()
    (tmp_path / "test" / "other").mkdir()
    dm = ImageFolder(root=str(tmp_path), num_workers=0)
    with pytest.raises(RobustError, match=r"class folder .*train/only holds no images \(nor do other\)"):
        dm.setup()
    for split in ("train", "test"):
        for name in ("only", "other"):
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "a.png")
    with pytest.raises(RobustError, match="training needs 2 images or more; --data.init_args.limit 1 keeps 1"):
        ImageFolder(root=str(tmp_path), num_workers=0, limit=1).setup()
    with pytest.raises(RobustError, match="image_size must be at least 1 pixel, got 0"):
        ImageFolder(root=str(tmp_path), image_size=0)


def test_stray_files_and_folders_are_skipped(tmp_path):
    assert is_image_file("a/b/cat.PNG") and is_image_file("dog.jpeg")
    assert not any(is_image_file(n) for n in (".DS_Store", "notes.txt", "._cat.png", "a/.hidden.jpg", "cat.png.txt"))
    for name in ("cat", "dog", ".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / name).mkdir()
    (tmp_path / "readme.md").write_text("not a class")
    assert class_names_in(tmp_path) == ("cat", "dog")


def test_an_image_error_from_a_dataloader_worker_stays_one_line():
    """PyTorch re-raises a worker's exception as ``type(message)``, the worker's traceback in the message."""
    wrapped = (
        "Caught FolderImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "worker.py", line 1, in fetch\nrobust.data.FolderImageError: image a.png is damaged: remove it\n'
    )
    assert str(FolderImageError(wrapped)) == "image a.png is damaged: remove it"
    assert str(FolderImageError("image b.png is damaged")) == "image b.png is damaged"


@pytest.mark.parametrize(("n", "batch", "dropped"), [(129, 128, True), (130, 128, False), (9, 8, True), (1, 8, False)])
def test_a_last_training_batch_of_one_image_sits_the_epoch_out(n, batch, dropped):
    """BatchNorm cannot train on one image: a last batch of one is dropped (training only, never validation)."""
    dm = Digits(batch_size=batch, limit=n, image_size=8)
    dm.setup()
    assert dm.train_dataloader().drop_last is dropped and dm.val_dataloader().drop_last is False
    assert len(dm.train_dataloader()) == n // batch + (0 if dropped or n % batch == 0 else 1)


def test_cifar10_offline_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(RobustError, match="CIFAR-10"):
        CIFAR10(root=str(tmp_path), download=False).setup()


@pytest.mark.parametrize("size", [0, -3])
def test_digits_rejects_an_empty_image_size(size):
    with pytest.raises(RobustError, match=f"image_size must be at least 1 pixel, got {size}"):
        Digits(image_size=size)


def test_holdout_split_is_a_seeded_partition():
    kept, held = holdout_split(100, 10, seed=3)
    assert len(held) == 10 and torch.equal(torch.cat([kept, held]).sort().values, torch.arange(100))
    assert torch.equal(held, holdout_split(100, 10, seed=3)[1]) and not torch.equal(held, holdout_split(100, 10, 4)[1])
    for size in (0, 100):
        with pytest.raises(RobustError, match=f"val_size must be between 1 and 99 .* got {size}"):
            holdout_split(100, size, seed=0)
    with pytest.raises(RobustError, match="val_size must be 0"):
        MNIST(val_size=-1)


@pytest.mark.shared_data
def test_mnist_validates_on_held_out_training_images(shared_data):
    """With ``val_size`` the validation (and so the checkpoint's choice) sees training images nobody trains on, never
    a test image; the test split stays whole for evaluate.py."""
    plain, held = MNIST(root=str(shared_data)), MNIST(root=str(shared_data), val_size=1000, split_seed=1)
    plain.setup()
    held.setup()
    assert (len(held.train_set), len(held.val_set), len(held.test_set)) == (59_000, 1000, 10_000)
    assert plain.val_set is plain.test_set and len(plain.train_set) == 60_000
    train_x = plain.train_set.tensors[0]
    _, index = holdout_split(60_000, 1000, seed=1)
    assert torch.equal(held.val_set.tensors[0], train_x[index])  # training images, as drawn
    assert torch.equal(held.test_set.tensors[0], plain.test_set.tensors[0])
    assert held.describe()["val_size"] == 1000
    assert len(held.test_dataloader().dataset) == 10_000 and len(held.val_dataloader().dataset) == 1000
