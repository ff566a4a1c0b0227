"""Every file the project writes honours the user's umask: checkpoints (best and last), reports, fool, exports."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_fit_args
from test_fool import PHOTO, cli_main

import train

UMASK_022, UMASK_077 = (0o022, 0o644), (0o077, 0o600)  # umask, the mode files must get


@pytest.fixture
def umask(request):
    """Run the test under the umask it is parametrized with; yields the mode written files must have."""
    mask, expected = request.param
    before = os.umask(mask)
    yield expected
    os.umask(before)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


# Each writer under one umask (a training run costs seconds); test_files.py checks the shared writer under both.
@pytest.mark.parametrize("umask", [UMASK_077], indirect=True, ids=["umask077"])
def test_training_checkpoints_follow_the_umask(umask, tmp_path):
    train.main(tiny_fit_args(tmp_path))
    written = modes(tmp_path / "digits" / "version_0" / "checkpoints")
    assert "last.ckpt" in written and any(name.startswith("best-") for name in written), written
    assert set(written.values()) == {umask}, written


@pytest.mark.parametrize("umask", [UMASK_022], indirect=True, ids=["umask022"])
def test_report_fool_and_export_files_follow_the_umask(umask, digits_cnn_ckpt, shared_data, tmp_path):
    commands = {
        "report": ["report", "--checkpoint", str(digits_cnn_ckpt), "--data", "digits", "--limit", "4", "--steps", "1"],
        "fool": ["fool", "--checkpoint", str(digits_cnn_ckpt), "--image", str(shared_data / PHOTO), "--steps", "1"],
        "export": ["export", "--checkpoint", str(digits_cnn_ckpt)],
    }
    for name, argv in commands.items():
        code, _, err = cli_main([*argv, "--out", str(tmp_path / name)])
        assert code == 0, err
        written = modes(tmp_path / name)
        assert written and set(written.values()) == {umask}, (name, written)
