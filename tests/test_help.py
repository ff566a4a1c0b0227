"""``train.py fit --help`` helps: every option has a description, the few options most runs change come first
and last, the model's options are listed in sections; warnings print values, not formulas."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from robust.averaging import WeightEMA
from robust.module import ARG_SECTIONS, AdversarialClassifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fit_help() -> str:
    proc = subprocess.run(
        [sys.executable, "train.py", "fit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


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


def test_the_ema_warning_gives_the_decay_to_use_not_a_formula():
    ema = WeightEMA(decay=0.999)
    trainer = SimpleNamespace(estimated_stepping_batches=230)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema.on_train_start(trainer, None)
    [message] = [str(w.message) for w in caught]
    assert "--ema.decay 0.987 or less" in message and "holds 80% of the first step's weights" in message
