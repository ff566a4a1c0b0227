"""Shared fixtures: the shared real data, a small CNN really trained on the embedded digits, an untrained ResNet18."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Nothing heavy at module level: pytest-xdist's controller loads this file too, before it starts any worker, and
# torch, torchvision and robust would cost it 4 s that every run waits for. The workers (and a run without xdist)
# import them in pytest_sessionstart and in the functions that use them.
if TYPE_CHECKING:
    import torch

TINY_ARCH = "tiny_cnn"
TINY_ARCH_ARGS = ("--model.arch", TINY_ARCH, "--model.cifar_stem", "false")  # train.py fit on it (in-process only)


def tiny_cnn(num_classes: int = 10, channels: int = 3) -> torch.nn.Sequential:
    """conv 8×3×3, BatchNorm, ReLU, global average pool, linear 8→classes: any input size, about 300 parameters.
    For runs that only go through the motions: a ResNet18 makes each of them 4× slower (45 MB checkpoints to write,
    its build and its forward), and the model is not what such a test checks."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def pytest_sessionstart(session) -> None:
    """In each process that runs tests (not xdist's controller): register the suite's architectures, as a user would
    add one (an entry each), so in-process runs can name them; under xdist give each worker its share of the cores,
    as torch's thread count and as OMP_NUM_THREADS for the processes a test starts (more threads than cores slows
    torch down ~10x)."""
    if session.config.pluginmanager.has_plugin("dsession"):
        return
    import torch

    from benchmarks.digits_model import digits_cnn
    from robust.models.archs import ARCHS, Arch

    ARCHS[TINY_ARCH] = Arch(tiny_cnn, "0", "5", 8, 3, "tests/conftest.py")
    ARCHS["digits_cnn"] = Arch(digits_cnn, "0", "12", 32, 3, "benchmarks/digits_model.py")  # digits_cnn_ckpt's
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The experiment scripts under test set torch's thread count for the whole process (``--threads``): the tests
    after them get the suite's count back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$ROBUST_DATA``); CI sets ROBUST_REQUIRE_SHARED_DATA=1 to fail when missing."""
    from robust.data.roots import shared_data_dir

    path = shared_data_dir()
    if not (path / "cifar10-subset").is_dir():
        msg = f"shared data not found at {path} (set ROBUST_DATA)"
        if os.environ.get("ROBUST_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tests"
DIGITS_EPOCHS = 5
# Another seed gives another training trajectory, as another CPU does: `ROBUST_TEST_SEED=3 make test` checks that no
# verdict hangs on this one (docs/results/tests.md).
DIGITS_SEED = int(os.environ.get("ROBUST_TEST_SEED", "0"))


def digits_weights() -> Path:
    """The trained digits CNN's state dict on disk, trained (on one thread, 3 s on a Zen 4) on the first call for the
    code and machine at hand and kept in ``.cache/tests/`` under a digest of all that decides it: its training code
    and the modules it builds on, the torch, torchvision and scikit-learn versions, the CPU kernels. A later run on
    the same code loads it. xdist workers that find none each train it (the same bits: same seed, one thread) and all
    load the first one's."""
    import torch

    from benchmarks import digits_model
    from robust.data import digits
    from robust.models import archs, build

    sources = b"".join(Path(m.__file__).read_bytes() for m in (digits_model, digits, archs, build))
    machine = f"{DIGITS_EPOCHS} {DIGITS_SEED} {torch.__version__} {version('torchvision')} {version('scikit-learn')}"
    machine += f" {torch.backends.cpu.get_cpu_capability()}"
    path = CACHE / f"digits-cnn-{hashlib.sha256(sources + machine.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same model from every worker count, and no worker slowed by another's threads
    try:
        model = digits_model.train_digits_model(DIGITS_EPOCHS, DIGITS_SEED, network=digits_model.digits_cnn_network)
    finally:
        torch.set_num_threads(threads)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(model.state_dict(), partial)
    try:
        os.link(partial, path)  # the first worker's file stays: every worker loads the same one
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: the last worker's file stays (the same bits)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    for old in CACHE.glob("digits-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _left_unchanged(model: torch.nn.Module):
    """Yields the shared ``model``; fails the test that leaves it changed (weights, BatchNorm statistics, dtype, mode,
    frozen parameters) instead of letting it move later tests' figures."""
    import torch

    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    after = model.state_dict()
    changed = [k for k, v in before.items() if not (after[k].dtype == v.dtype and torch.equal(after[k], v))]
    assert not changed, f"the test changed the shared model: {changed[:3]}"
    assert not model.training and all(p.requires_grad for p in model.parameters()), "the test left the model changed"


@pytest.fixture(scope="session")
def _digits_cnn_session() -> torch.nn.Module:
    import torch

    from benchmarks.digits_model import digits_cnn_network

    model = digits_cnn_network()
    model.load_state_dict(torch.load(digits_weights(), weights_only=True))
    return model.eval()


@pytest.fixture
def digits_cnn(_digits_cnn_session):
    """The session's trained digits CNN (:func:`benchmarks.digits_model.digits_cnn_network`: BatchNorm, ~97% val
    accuracy, clean-trained, so PGD at eps 0.03 fools nearly all of it and eps 0.01-0.015 about half), in eval mode,
    shared by every test whose figures are a trained model's: an attack's effect and arithmetic, a defense's, a
    report's. A ResNet18 in its place makes each about 5x slower and its training costs 9 s of every fresh run."""
    yield from _left_unchanged(_digits_cnn_session)


@pytest.fixture(scope="session")
def _resnet18_session() -> torch.nn.Module:
    import torch

    from benchmarks.digits_model import digits_network

    with torch.random.fork_rng():  # seeded, without reseeding the tests after it
        torch.manual_seed(0)
        return digits_network().eval()


@pytest.fixture
def resnet18_model(_resnet18_session):
    """An untrained, seeded ResNet18 for digits (:func:`benchmarks.digits_model.digits_network`), eval mode, shared:
    for tests of what a torchvision ResNet18 checkpoint goes through (loading, fine-tuning, export), not of figures."""
    yield from _left_unchanged(_resnet18_session)


@pytest.fixture(scope="session")
def digits_val() -> tuple[torch.Tensor, torch.Tensor]:
    """The 360 digits validation images (``360×3×32×32`` in [0, 1]) and labels: ``Digits()``'s validation set."""
    from robust.data.digits import digits_split

    return digits_split()[1]


def lightning_checkpoint(model: torch.nn.Module, arch: str, path: Path) -> Path:
    """A real Lightning checkpoint of the digits ``model`` (of ``arch``) at ``path``: an AdversarialClassifier
    fitted for one batch on Digits by a Trainer (so the checkpoint holds the data description), its weights then set
    to ``model``'s, saved."""
    import lightning as L

    from robust.data.modules import DIGIT_NAMES, Digits
    from robust.training.module import AdversarialClassifier

    module = AdversarialClassifier(
        arch=arch,
        cifar_stem=False,
        num_classes=10,
        class_names=list(DIGIT_NAMES),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        attack="none",
        lr_scheduler=None,
        eps=0.1,
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=Digits(batch_size=64))
    module.model.load_state_dict(model.state_dict())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def resnet18_ckpt(_resnet18_session, tmp_path_factory) -> Path:
    """A real Lightning checkpoint of ``resnet18_model`` (:func:`lightning_checkpoint`)."""
    return lightning_checkpoint(_resnet18_session, "resnet18", tmp_path_factory.mktemp("ckpt") / "resnet18.ckpt")


@pytest.fixture(scope="session")
def digits_cnn_ckpt(_digits_cnn_session, tmp_path_factory) -> Path:
    """A real Lightning checkpoint of ``digits_cnn`` (arch ``digits_cnn``, registered above): what the report, fool
    and ONNX tests load."""
    return lightning_checkpoint(_digits_cnn_session, "digits_cnn", tmp_path_factory.mktemp("ckpt") / "digits_cnn.ckpt")


def tiny_fit_args(save_dir, *extra: str) -> list[str]:
    """``train.py fit`` arguments for a run that only has to go through the motions: :func:`tiny_cnn` on digits at
    8×8, one batch of 8, one validation batch with one PGD step, a 4-image guard probe, no image grid (0.2-0.3 s a
    validation; test_training checks the grid). Logs and checkpoints go under ``save_dir``; ``extra`` comes last, so
    it may name another arch."""
    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    return [
        "fit",
        "--config",
        str(config),
        *TINY_ARCH_ARGS,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--model.val_steps",
        "1",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.image_size",
        "8",
        "--overfit_guard.n",
        "4",
        "--overfit_guard.pgd_steps",
        "1",
        "--image_grid.n",
        "0",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def evaluate_in_process(*args: str) -> subprocess.CompletedProcess:
    """``python evaluate.py ARGS`` run in this process: its exit code (``SystemExit``'s for argument errors), stdout
    and stderr, as a CompletedProcess. A new interpreter's start-up (seconds of torch and Lightning imports) is not the
    behaviour under test; the real-process path is checked by test_fool.py's
    test_robust_error_in_a_real_process_is_one_line_exit_2 and test_imports.py."""
    import evaluate

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = evaluate.main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["evaluate.py", *args], code, out.getvalue(), err.getvalue())


def clean_accuracy(model: torch.nn.Module, data: str, limit: int) -> float:
    """The model's accuracy (eval mode, no gradient) on the images ``evaluate.py report --data DATA --limit LIMIT``
    reads for it: what a report's ``clean`` figure must equal."""
    import torch

    from robust.data.eval_data import eval_data

    loader, _ = eval_data(data, model.card, limit=limit)
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model.eval()(x).argmax(1) == y).sum())
            n += len(y)
    return correct / n
