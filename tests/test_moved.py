"""What users called before the library was grouped keeps working, with one FutureWarning naming the new home."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from robust.moved import MOVED
from robust.training import optim


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, f"robust.{old}", raising=False)
    with pytest.warns(FutureWarning, match=f"robust.{old} is now robust.{MOVED[old]}"):
        module = importlib.import_module(f"robust.{old}")
    assert module is importlib.import_module(f"robust.{MOVED[old]}")


def test_an_old_class_path_names_the_same_class(monkeypatch):
    """A config's ``class_path: robust.optim.OneCycle`` builds the very class training uses."""
    monkeypatch.delitem(sys.modules, "robust.optim", raising=False)
    with pytest.warns(FutureWarning):
        old = importlib.import_module("robust.optim")
    assert old.OneCycle is optim.OneCycle


def test_the_old_builders_warn_and_build_what_create_model_builds():
    from robust.models.resolve import build_classifier, create_model

    torch.manual_seed(0)
    new = create_model("mnist_net", num_classes=10)
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="create_model"):
        old = build_classifier("mnist_net", 10)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(old(x), new(x)) and old.card.arch == new.card.arch == "mnist_net"


def test_a_run_saved_under_the_old_paths_resumes_without_a_changed_setting():
    """A ``config.yaml`` written before the move names ``robust.optim.OneCycle`` and ``robust.data.Digits``; the
    same settings now name their new homes, and the resume check sees no difference (a real change still shows)."""
    from robust.training.resume import config_differences

    saved = {
        "model": {"lr_scheduler": {"class_path": "robust.optim.OneCycle"}, "eps": 0.1},
        "data": {"class_path": "robust.data.Digits"},
    }
    given = {
        "model": {"lr_scheduler": {"class_path": "robust.training.optim.OneCycle"}, "eps": 0.1},
        "data": {"class_path": "robust.data.modules.Digits"},
    }
    assert config_differences(saved, given) == {}
    given["data"]["class_path"] = "robust.data.modules.MNIST"
    assert config_differences(saved, given) == {
        "data.class_path": ("robust.data.modules.Digits", "robust.data.modules.MNIST")
    }
