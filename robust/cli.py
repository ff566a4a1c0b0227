"""What every command line shares: bad input is one line ``error: <sentence>`` on stderr and exit code 2.

``train.py``, ``evaluate.py``, ``experiments/recipes.py`` and ``benchmarks/run.py`` all end this way. A user's
mistake is a :class:`~robust.errors.RobustError`, also when a library re-raises it as its own exception
(``raise ... from``, as jsonargparse does for a class it instantiates); anything else is a bug and keeps its
traceback, as every error does with ``debug`` (``--debug``). Standard library only: ``evaluate.py`` rejects bad
arguments before torch is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from robust.errors import RobustError

EXIT_BAD_INPUT = 2


def robust_cause(exc: BaseException | None) -> RobustError | None:
    """``exc`` or the RobustError it was raised from (following ``__cause__``); None when there is none."""
    while exc is not None and not isinstance(exc, RobustError):
        exc = exc.__cause__
    return exc


def user_error(exc: Exception, debug: bool = False) -> int:
    """Print ``error: <sentence>`` on stderr for a user's mistake and return :data:`EXIT_BAD_INPUT`; re-raise
    ``exc`` when it is not one (:func:`robust_cause`) or when ``debug``."""
    error = robust_cause(exc)
    if debug or error is None:
        raise exc
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def exit_code(run: Callable[[], object], debug: bool = False) -> int:
    """Call ``run()``; the process's exit code: 0, or :data:`EXIT_BAD_INPUT` after :func:`user_error`'s line."""
    try:
        run()
    except Exception as exc:
        return user_error(exc, debug)
    return 0
