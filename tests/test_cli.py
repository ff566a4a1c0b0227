"""robust.cli, the one rule of every command line: a user's mistake is one ``error:`` line and exit code 2."""

from __future__ import annotations

import pytest

from robust.cli import EXIT_BAD_INPUT, exit_code
from robust.errors import RobustError


def fails_with(exc: Exception):
    def run():
        raise exc

    return run


def wrapped() -> ValueError:
    """A RobustError re-raised by a library as its own exception (jsonargparse's ValueError)."""
    try:
        raise RobustError("eps must be in [0, 1]")
    except RobustError as cause:
        try:
            raise ValueError("Problem with given class_path") from cause
        except ValueError as exc:
            return exc


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    assert exit_code(lambda: None) == 0
    assert exit_code(fails_with(RobustError("no such file: m.ckpt"))) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: no such file: m.ckpt\n"
    assert exit_code(fails_with(wrapped())) == 2
    assert capsys.readouterr().err == "error: eps must be in [0, 1]\n"


def test_a_bug_and_debug_keep_the_traceback(capsys):
    with pytest.raises(KeyError):
        exit_code(fails_with(KeyError("bug")))
    with pytest.raises(RobustError):
        exit_code(fails_with(RobustError("shown with its traceback")), debug=True)
    assert capsys.readouterr().err == ""
