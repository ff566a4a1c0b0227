"""Atomic writes honour the umask, like files made by ``open()``."""

from __future__ import annotations

import os

import pytest

from robust.files import atomic_write_bytes, atomic_write_files


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"data")
        atomic_write_files(tmp_path / "out", {"b.txt": b"b"})
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    files = (tmp_path / "a.bin", tmp_path / "out" / "b.txt", tmp_path / "plain")
    modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    assert modes == {"a.bin": mode, "b.txt": mode, "plain": mode}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "out", "plain"]  # no temp files left
