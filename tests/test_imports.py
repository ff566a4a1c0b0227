"""Import costs: the library and its pure parts load without Lightning, and ``evaluate.py`` rejects bad
arguments before torch is imported (checked in fresh processes with an import blocker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs evaluate.py as __main__ in a process where importing torch or lightning raises ImportError.
BLOCKED_CLI = """
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "lightning"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Blocker())
sys.argv = ["evaluate.py", *sys.argv[1:]]
runpy.run_path("evaluate.py", run_name="__main__")
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter's imports (seconds); test_layout.py checks the same statically in make test
def test_library_imports_no_lightning():
    code = (
        "import sys, robust, robust.attacks, robust.defenses, robust.models.resolve, robust.export; "
        "from robust import load_model; "
        "print(sorted(m for m in sys.modules if 'lightning' in m.partition('.')[0]))"
    )
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bad_arguments_fail_before_torch_is_imported():
    proc = run(
        "-c", BLOCKED_CLI, "report", "--checkpoint", "m.ckpt", "--data", "digits", "--norm", "linf", "--eps", "2"
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr == "error: argument --eps: eps must be in [0, 1] (L∞ pixel units, e.g. 8/255), got 2 (see --help)\n"
    )
    proc = run("-c", BLOCKED_CLI, "report", "--checkpoint", "m.ckpt", "--data", "digits", "--eps=-1")  # any norm
    assert proc.returncode == 2 and proc.stderr.startswith("error: argument --eps: ")
    proc = run("-c", BLOCKED_CLI, "fool", "--image", "a.png", "--out", "o", "--model", "imagenet", "--steps", "x")
    assert proc.returncode == 2
    assert proc.stderr == "error: argument --steps: steps must be a whole number, got 'x' (see --help)\n"
    # Control: valid arguments do reach the torch import, so the blocker really guards it.
    proc = run("-c", BLOCKED_CLI, "report", "--checkpoint", "m.ckpt", "--data", "digits", "--eps", "8/255")
    assert proc.returncode == 1 and "blocked import of torch" in proc.stderr


def test_help_explains_pixel_units_without_torch():
    proc = run("-c", BLOCKED_CLI, "fool", "--help")
    assert proc.returncode == 0
    assert "[0, 1] pixel units" in proc.stdout and "8/255" in proc.stdout
