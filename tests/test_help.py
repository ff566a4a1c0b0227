"""``train.py fit --help`` helps: every option has a description, the few options most runs change come first
and last, the model's options are listed in sections; warnings print values, not formulas."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from robust.training.averaging import WeightEMA
from robust.training.module import ARG_SECTIONS, AdversarialClassifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fit_help() -> str:
    """``train.py fit --help`` at 120 columns, in this process (a new interpreter's imports are not what is tested)."""
    import train

    out, before, argv = io.StringIO(), os.environ.get("COLUMNS"), sys.argv
    os.environ["COLUMNS"], sys.argv = "120", ["train.py", "fit", "--help"]  # the usage line's program name
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            train.main(["fit", "--help"])
    finally:
        sys.argv = argv
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    assert not exit_.value.code
    return out.getvalue()


def option_entries(text: str) -> dict[str, str]:
    """``{"--model.eps": "its description", ...}`` from the options part of an argparse help text (group and section
    titles and the epilog end up in the description of the option before them: harmless here)."""
    body = text.split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  (?:  )?-)", body):
        first, *more = entry.split("\n")
        spec, _, start = re.split(r"(\s{2,})", first.strip() + "  ", maxsplit=1)
        names = re.findall(r"(?:^|,\s*)(-[\w.+-]+)", spec)
        description = " ".join([start, *more]).split()
        text_only = " ".join(description).split("(type:")[0].split("(required,")[0].strip()
        entries[names[-1]] = text_only
    return entries


def test_every_option_of_fit_has_a_description(fit_help):
    entries = option_entries(fit_help)
    assert len(entries) > 120 and "--model.weights" in entries and "--overfit_guard.min_drop" in entries
    missing = sorted(name for name, text in entries.items() if not text)
    assert not missing, f"options without a description: {missing}"


def test_fit_help_starts_and_ends_with_the_options_most_runs_change(fit_help):
    tail = fit_help[fit_help.rindex("Train a robust classifier.") :].splitlines()
    assert tail[0].startswith("Train a robust classifier. The options most runs change")
    common = re.findall(r"^  (--[\w.]+)", "\n".join(tail), re.M)
    assert len(common) >= 7
    entries = option_entries(fit_help)
    for option in common:
        assert option in entries, option
    assert fit_help.index("The options most runs change") < fit_help.index("\noptions:\n")


def test_the_model_options_are_listed_in_sections_in_signature_order(fit_help):
    """Each argument of AdversarialClassifier is in one section, the sections in signature order, and the help lists
    each section's options under its title (those linked from the data are not options)."""
    parameters = list(inspect.signature(AdversarialClassifier.__init__).parameters)[1:]
    assert [name for names in ARG_SECTIONS.values() for name in names] == parameters
    linked = {"num_classes", "class_names", "channels"}
    model = fit_help[fit_help.index("\nClassifier trained on a mix") :]
    starts = [model.index(f"\n  {title}:\n") for title in ARG_SECTIONS]
    assert starts == sorted(starts)
    for (title, names), start in zip(ARG_SECTIONS.items(), starts, strict=True):
        block = model[start : model.index("\n\n", start + 1)]
        listed = [o for o in re.findall(r"^    (--model\.[\w.]+)", block, re.M) if not o.endswith(".help")]
        assert listed == [f"--model.{name}" for name in names if name not in linked], title


def test_a_decay_too_slow_for_the_run_is_lowered_in_one_line_with_values_not_a_formula(caplog):
    trainer = SimpleNamespace(estimated_stepping_batches=230)
    ema = WeightEMA(decay=0.999)
    with caplog.at_level(logging.INFO):
        ema.on_train_start(trainer, None)
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ema:")]
    assert message.startswith("ema: decay 0.999 -> 0.987 for this run") and "leave 80% of the first step's" in message
    assert ema.decay == 0.987  # in force, and what the card records
    kept = WeightEMA(decay=0.999, adapt=False)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        kept.on_train_start(trainer, None)
    assert kept.decay == 0.999 and any("--ema.decay 0.987 or less" in r.getMessage() for r in caplog.records)
    fitting = WeightEMA(decay=0.98)  # 0.98^229 = 1%: an average over the run already
    fitting.on_train_start(trainer, None)
    assert fitting.decay == 0.98


@pytest.mark.parametrize("name", ["Digits", "MNIST", "CIFAR10", "ImageFolder"])
def test_each_data_module_s_options_are_described_by_its_short_name(name):
    """``train.py fit --data.help NAME``: every option of the data module with a description of its own, as the
    model's (``Args:`` of robust.data's classes, one option a line)."""
    import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        train.main(["fit", "--data.help", name])
    assert not exit_.value.code
    text = out.getvalue()
    entries = option_entries("\noptions:\n" + text[text.index("\n  --data.") + 1 :])
    assert {"--data.batch_size", "--data.num_workers", "--data.limit"} <= set(entries)
    for option, description in entries.items():
        assert len(description.split()) >= 3, f"{option} has no description of its own: {description!r}"
        assert "num_workers:" not in description and "limit:" not in description  # not another option's text
