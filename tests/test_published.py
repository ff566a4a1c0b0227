"""The papers' models and settings: the architecture registry, plain state dicts and factories loaded as any model,
the papers' optimizers and schedules through LightningCLI, and configs that hold the papers' values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clean_accuracy, evaluate_in_process
from torch import nn

import train
from experiments.mnist_recipes import RECIPE_CHANGES, RECIPES, ROBUST_RECIPE
from robust import load_model
from robust.errors import RobustError
from robust.models.archs import ARCHS, build_arch, mnist_net
from robust.models.resolve import spec_kind
from robust.training.optim import Cyclic
from robust.training.resume import flatten

ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    """``evaluate.py`` in this process (conftest's evaluate_in_process says where the real-process path is tested)."""
    return evaluate_in_process(*args)


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_arch_builds_for_its_natural_input(name):
    arch = ARCHS[name]
    size = 32 if arch.torchvision else arch.image_size
    net = build_arch(name, 10, arch.channels).eval()
    with torch.no_grad():
        assert net(torch.rand(2, arch.channels, size, size)).shape == (2, 10)
    assert isinstance(getattr(net, arch.head), nn.Linear) and isinstance(getattr(net, arch.stem), nn.Conv2d)


def test_the_papers_networks_keep_the_authors_state_dict_keys():
    # mnist_net.py's nn.Sequential indices and preact_resnet.py's attribute names, so their released weights load.
    assert list(mnist_net().state_dict()) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "5.weight",
        "5.bias",
        "7.weight",
        "7.bias",
    ]
    keys = build_arch("preact_resnet18", 10).state_dict().keys()
    assert {
        "conv1.weight",
        "layer1.0.bn1.running_mean",
        "layer2.0.shortcut.0.weight",
        "bn.weight",
        "linear.bias",
    } <= keys
    assert sum(p.numel() for p in mnist_net().parameters()) == 272 + 8_224 + 156_900 + 1_010


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = mnist_net().eval()
    path = tmp_path_factory.mktemp("sd") / "net.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_a_plain_state_dict_loads_with_its_arch(state_dict_file):
    path, net = state_dict_file
    assert spec_kind(path) == "checkpoint" and spec_kind(path, arch="mnist_net") == "state_dict"
    model = load_model(path, arch="mnist_net")
    card = model.card
    assert (card.arch, card.channels, card.num_classes, card.image_size, card.mean, card.std) == (
        "mnist_net",
        1,
        10,
        28,
        [0.0],
        [1.0],
    )
    assert card.training.init["kind"] == "state_dict" and len(card.training.init["sha256"]) == 64
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))  # no normalization in front: the network as it was saved


def test_a_factory_network_loads_with_its_weights(tmp_path):
    from factory_models import small_cnn

    torch.manual_seed(1)
    net = small_cnn().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = load_model("factory_models:small_cnn", weights=str(tmp_path / "w.pt"), image_size=28)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert (model.card.arch, model.card.channels, model.card.num_classes) == ("factory_models:small_cnn", 1, 10)


def test_the_report_measures_a_state_dict_and_a_factory_network(state_dict_file, tmp_path):
    path, _ = state_dict_file
    for i, model in enumerate(
        (["--model", str(path), "--arch", "mnist_net"], ["--model", "factory_models:small_cnn", "--image-size", "28"])
    ):
        proc = evaluate(
            "report",
            *model,
            "--data",
            "digits",
            "--limit",
            "16",
            "--steps",
            "1",
            "--eps",
            "0.1",
            "--threats",
            "clean",
            "pgd",
            "--out",
            str(tmp_path / str(i)),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / str(i) / "report.json").read_text())
        (row,) = report["rows"]
        assert report["model"]["arch"] == ("mnist_net", "factory_models:small_cnn")[i]
        assert row["pgd"] <= row["clean"]
    # the state dict's weights are fixed: its clean figure is that network's accuracy on those 16 digits
    report = json.loads((tmp_path / "0" / "report.json").read_text())
    assert report["rows"][0]["clean"] == clean_accuracy(load_model(path, arch="mnist_net"), "digits", 16)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "lenet"], "unknown arch 'lenet'; choose one of resnet18"),
        (["--arch", "preact_resnet18"], "does not fit a preact_resnet18: missing"),
        (["--arch", "resnet18"], "does not fit a resnet18"),
    ],
)
def test_bad_external_models_are_one_line(state_dict_file, tmp_path, args, message):
    path, _ = state_dict_file
    proc = evaluate("report", "--model", str(path), *args, "--data", "digits", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and not (tmp_path / "r").exists()


def test_a_state_dict_for_another_channel_count_is_one_line(tmp_path):
    torch.save(mnist_net(channels=3).state_dict(), tmp_path / "rgb.pth")
    model = load_model(tmp_path / "rgb.pth", arch="mnist_net")  # its channel count is read off the weights
    assert model.card.channels == 3
    with pytest.raises(RobustError, match=r"the images have 1 channel\(s\) \(grayscale\); the model takes 3"):
        model(torch.rand(1, 1, 28, 28))


def test_cyclic_schedule_is_wong_et_al_s_interpolation():
    # train_mnist.py: lr_schedule(epoch + (i + 1) / len(loader)) = interp([t], [0, epochs·2//5, epochs], [0, lr, 0])
    epochs, batches, lr = 10, 7, 5e-3
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = Cyclic(opt, epochs * batches, peak_at=0.4)
    for epoch in range(epochs):
        for i in range(batches):
            expected = np.interp([epoch + (i + 1) / batches], [0, epochs * 2 // 5, epochs], [0, lr, 0])[0]
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
            opt.step()
            sched.step()


@pytest.mark.parametrize("config", ["mnist_fgsm.yaml", "mnist_pgd.yaml"])
def test_the_paper_configs_hold_the_papers_values(config, tmp_path):
    # locuslab/fast_adversarial MNIST/train_mnist.py defaults, and its README's Madry command for PGD.
    cli = train.main(
        [
            "--config",
            str(ROOT / "configs" / config),
            "--data.init_args.root",
            str(tmp_path),
            "--data.init_args.download",
            "false",
        ],
        run=False,
    )
    model, data = cli.model, cli.datamodule
    opt = model.optimizer(model.parameters())
    assert (model.hparams.arch, model.hparams.eps, model.hparams.adv_ratio) == ("mnist_net", 0.3, 1.0)
    assert model.hparams.mean == (0.0,) and model.hparams.std == (1.0,)
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0 and opt.defaults["betas"] == (0.9, 0.999)
    if config == "mnist_fgsm.yaml":
        assert (model.attack, model.alpha, model.hparams.clamp_start) == ("fgsm_rs", 0.375, False)
        assert (opt.defaults["lr"], data.batch_size, cli.trainer.max_epochs) == (5e-3, 100, 10)
        sched = model.lr_scheduler(opt, 100)
        assert isinstance(sched, Cyclic) and sched.peak_at == 0.4
    else:
        assert (model.attack, model.alpha, model.attack_steps) == ("pgd", 0.01, 40)
        assert model.hparams.attack_early_exit is True
        assert (opt.defaults["lr"], data.batch_size, cli.trainer.max_epochs) == (1e-4, 50, 100)
        assert model.lr_scheduler is None


def _config(name: str, tmp_path: Path, *extra: str) -> dict:
    """A shipped config resolved by train.py (nothing built), flattened to ``key -> value``."""
    cli = train.main(
        ["--config", str(ROOT / "configs" / name), "--data.init_args.root", str(tmp_path), *extra], run=False
    )
    return flatten(cli.config.as_dict())


def test_the_mnist_recipe_is_the_paper_run_with_the_measured_changes(tmp_path):
    """configs/mnist_robust.yaml is what experiments/mnist_recipes.py measured as its recipe: mnist_fgsm.yaml with the
    recipe's overrides; nothing else differs but the log folder's name (and the path of the config itself)."""
    config, overrides, kept, _ = RECIPES[ROBUST_RECIPE]
    assert config == "configs/mnist_robust.yaml" and not overrides and kept == "best"
    ours = _config("mnist_robust.yaml", tmp_path)
    paper = _config("mnist_fgsm.yaml", tmp_path, *RECIPE_CHANGES)
    differ = {k for k in ours.keys() | paper.keys() if ours.get(k) != paper.get(k)}
    assert differ == {"config", "trainer.logger.init_args.name"}, {k: (ours.get(k), paper.get(k)) for k in differ}
    assert ours["data.init_args.val_size"] == 1000


@pytest.mark.shared_data
def test_the_mnist_recipe_trains_and_keeps_a_held_out_choice(shared_data, tmp_path):
    cli = train.main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "mnist_robust.yaml"),
            "--data.init_args.root",
            str(shared_data),
            *"--data.init_args.download false --data.init_args.val_size 64 --overfit_guard.n 32".split(),
            *"--model.val_steps 2 --image_grid.n 0".split(),  # what is under test is which data chooses
            *"--trainer.max_epochs 1 --trainer.limit_train_batches 3 --trainer.limit_val_batches 1".split(),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    card = load_model(cli.trainer.checkpoint_callback.best_model_path).card
    assert (card.arch, card.training.attack, card.training.eps) == ("mnist_net", "fgsm_rs", 0.3)
    assert len(cli.datamodule.val_set) == 64  # held out, not the test split
    assert Path(cli.trainer.checkpoint_callback.best_model_path).name.startswith("best-epoch000-")
