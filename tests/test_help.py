"""``train.py fit --help`` helps: every option has a description, and the few options most runs change come first
and last; warnings print values, not formulas."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from robust.averaging import WeightEMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fit_help() -> str:
    proc = subprocess.run([sys.executable, "train.py", "fit", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def option_entries(text: str) -> dict[str, str]:
    """``{"--model.eps": "its description", ...}`` from the options part of an argparse help text (group titles and
    the epilog end up in the description of the option before them: harmless here)."""
    body = text.split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", body):
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


def test_the_ema_warning_gives_the_decay_to_use_not_a_formula():
    ema = WeightEMA(decay=0.999)
    trainer = SimpleNamespace(estimated_stepping_batches=230)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema.on_train_start(trainer, None)
    [message] = [str(w.message) for w in caught]
    assert "--ema.decay 0.987 or less" in message and "holds 80% of the first step's weights" in message
