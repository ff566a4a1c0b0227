"""The model card: one dataclass for checkpoints, exports and loaded models; the step in force; old checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from robust.data.modules import DIGIT_NAMES, Digits
from robust.errors import RobustError
from robust.files import load_checkpoint
from robust.models.card import ModelCard, RobustnessRecord, TrainingRecord, new_card
from robust.models.resolve import CARD_KEY, load_model
from robust.training.module import AdversarialClassifier
from robust.training.optim import Cosine, Cyclic, OneCycle, Piecewise
from robust.training.run_record import schedule_record

CARD = ModelCard(
    arch="resnet18",
    num_classes=3,
    class_names=["a", "b", "c"],
    image_size=16,
    resize=18,
    mean=[0.5, 0.5, 0.5],
    std=[0.25, 0.25, 0.25],
    cifar_stem=True,
    data="Digits",
    training=TrainingRecord(attack="none", eps=0.1),
    robustness=RobustnessRecord(metrics={"clean": 0.9}),
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, AdversarialClassifier]:
    """An FGSM-RS module fitted for one batch of 16×16 digits, its step then changed as a guard rollback does,
    saved by its trainer (no checkpoint callback: no monitored best score)."""
    L.seed_everything(0)
    module = AdversarialClassifier(num_classes=10, class_names=list(DIGIT_NAMES), eps=0.1, lr_scheduler=None)
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
    trainer.fit(module, datamodule=Digits(batch_size=16, image_size=16))
    module.set_attack_step(0.5 * module.alpha)
    path = tmp_path_factory.mktemp("card") / "fitted.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_json_round_trip_and_schema():
    assert ModelCard.from_json(CARD.to_json(), "card") == CARD
    assert list(ModelCard.schema()) == [f.name for f in dataclasses.fields(ModelCard)]
    assert ModelCard.schema()["num_classes"][0] == "int" and ModelCard.schema()["data"][0] == "str | None"
    as_ints = {**CARD.to_dict(), "mean": [0, 0, 0], "data": None}  # JSON integers are floats; data may be null
    assert ModelCard.from_dict(as_ints, "card").mean == [0, 0, 0]


def test_an_old_card_missing_record_fields_loads_with_defaults():
    old = {**CARD.to_dict(), "training": {"attack": "fgsm_rs", "eps": 0.1}}  # written before the other fields
    del old["robustness"]
    card = ModelCard.from_dict(old, "old card")
    assert card.training == TrainingRecord(attack="fgsm_rs", eps=0.1) and card.training.objective is None
    assert card.robustness == RobustnessRecord() and card.robustness.metrics == {}
    assert ModelCard.from_dict({**old, "robustness": {}}, "old card").robustness == RobustnessRecord()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_classes": True}, "'num_classes' must be int"),  # a bool is not a number
        ({"image_size": 16.0}, "'image_size' must be int"),
        ({"class_names": ["a", "b", 3]}, r"'class_names' must be list\[str\]"),
        ({"data": 7}, "'data' must be str | None"),
        ({"format": "other"}, "format 'other' version 1"),
        ({"std": [0.2, 0.2]}, "mean and std need 3 value"),
        ({"training": [1]}, "'training' must be TrainingRecord"),
        ({"training": {"eps": "8/255"}}, r"'training.eps' must be float \| None, got '8/255'"),
        ({"training": {"lp": "l3"}}, r"unknown fields \['training.lp'\]"),
        ({"robustness": {"steps": 1.5}}, r"'robustness.steps' must be int \| None"),
    ],
)
def test_from_dict_checks_the_annotated_types(changes, message):
    with pytest.raises(RobustError, match=message):
        ModelCard.from_dict({**CARD.to_dict(), **changes}, "card")


def test_checkpoint_stores_the_card_with_the_step_in_force(fitted):
    path, module = fitted
    stored = load_checkpoint(path)[CARD_KEY]
    card = load_model(path).card
    assert card.to_dict() == stored
    assert card.training.alpha == module.alpha == pytest.approx(0.5 * 1.25 * 0.1)  # not the configured default
    assert (card.image_size, card.resize, card.data, card.class_names) == (16, 16, "Digits", list(DIGIT_NAMES))
    assert card.robustness.best is None and card.robustness.global_step == 1
    # Typed all the way down, and the same JSON: every field of the records, in their order.
    assert (card.training.attack, card.training.eps, card.training.init["kind"]) == ("fgsm_rs", 0.1, "scratch")
    assert list(stored["training"]) == list(TrainingRecord.schema())
    assert list(stored["robustness"]) == list(RobustnessRecord.schema())
    assert card.to_json() == json.dumps(stored, indent=2) + "\n"


def test_checkpoint_without_a_card_is_described_by_its_hyper_parameters(fitted, tmp_path):
    path, module = fitted
    ckpt = torch.load(path, weights_only=True)
    stored = ckpt.pop(CARD_KEY)
    ckpt["robust_data"] = {"name": "Digits", "class_names": list(DIGIT_NAMES), "image_size": 16, "resize": 16}
    torch.save(ckpt, tmp_path / "old.ckpt")
    model = load_model(tmp_path / "old.ckpt")
    # What the hyper-parameters hold: the configured step and steps (None: the attack's default), no init record, no
    # seed or optimizer (recorded at save time only).
    unset = {"alpha": None, "attack_steps": None, "init": None, "seed": None, "optimizer": None, "lr_scheduler": None}
    assert model.card.training == TrainingRecord(**{**stored["training"], **unset})
    assert dataclasses.replace(model.card, training=TrainingRecord(**stored["training"])).to_dict() == stored
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), load_model(path)(x))


def test_a_card_of_another_version_in_a_checkpoint_is_refused(fitted, tmp_path):
    ckpt = torch.load(fitted[0], weights_only=True)
    ckpt[CARD_KEY]["format_version"] = 2
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(RobustError, match="future.ckpt is format 'robust-export' version 2"):
        load_model(tmp_path / "future.ckpt")


def test_the_card_records_every_schedule_by_its_own_arguments():
    """A schedule's record holds what rebuilds it: Piecewise's milestones and gamma as well as the run's length."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    records = [
        schedule_record(s)
        for s in (
            Cyclic(opt, 50, peak_at=0.3),
            Piecewise(opt, 50, (0.5, 0.9), 0.2),
            Cosine(opt, 50),
            OneCycle(opt, 50, peak_at=0.25),
            torch.optim.lr_scheduler.StepLR(opt, 7, gamma=0.5),
        )
    ]
    assert records == [
        {"class": "robust.training.optim.Cyclic", "total_steps": 50, "peak_at": 0.3},
        {"class": "robust.training.optim.Piecewise", "total_steps": 50, "milestones": [0.5, 0.9], "gamma": 0.2},
        {"class": "robust.training.optim.Cosine", "total_steps": 50},
        {"class": "robust.training.optim.OneCycle", "total_steps": 50, "peak_at": 0.25},
        {"class": "torch.optim.lr_scheduler.StepLR", "step_size": 7, "gamma": 0.5},
    ]
    assert json.loads(json.dumps(records)) == records


def test_every_card_of_the_library_is_built_by_new_card():
    """One builder: the library constructs ModelCard in new_card only (from_dict reads stored ones through the
    dataclass machinery, never by a call)."""
    import ast

    import robust

    calls = {
        f"{path.name}:{fn.name}"
        for path in Path(robust.__file__).parent.rglob("*.py")
        for fn in ast.walk(ast.parse(path.read_text()))
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ModelCard"
    }
    assert calls == {"card.py:new_card"}


def test_new_card_fills_the_defaults_and_refuses_a_wrong_name_count():
    card = new_card("mnist_net", 3, image_size=28, channels=1)
    assert (card.class_names, card.mean, card.std, card.resize) == (["0", "1", "2"], [0.0], [1.0], 28)
    assert card.training == TrainingRecord() and card.robustness == RobustnessRecord()
    rgb = new_card("resnet18", 2, image_size=32, class_names=["cat", "dog"])
    assert rgb.mean == [0.485, 0.456, 0.406] and rgb.class_names == ["cat", "dog"]
    with pytest.raises(RobustError, match="3 class names given for a model with 2 outputs"):
        new_card("resnet18", 2, image_size=32, class_names=["a", "b", "c"])
