"""Validation of user-given numbers, in one place: the library calls these checks, and ``evaluate.py`` wraps the
same functions as argparse types. No torch import, so the CLI rejects bad arguments instantly.

Each check raises :class:`robust.errors.RobustError` with one sentence naming the value and its allowed range.
"""

from __future__ import annotations

import math

from robust.errors import RobustError


def parse_fraction(text: str) -> float:
    """``"0.03"`` or a fraction such as ``"8/255"`` -> a finite float."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise RobustError(f"{text!r} is not a number (e.g. 0.03 or 8/255)") from None
    if not math.isfinite(value):
        raise RobustError(f"{text!r} is not a finite number")
    return value


def parse_int(text: str, what: str) -> int:
    """``"10"`` -> 10; anything else is an error naming ``what``."""
    try:
        return int(text)
    except ValueError:
        raise RobustError(f"{what} must be a whole number, got {text!r}") from None


def check_at_least_one(value: int, what: str) -> None:
    """Raise unless ``value >= 1`` (counts: steps, restarts, a batch size, an image limit)."""
    if int(value) < 1:
        raise RobustError(f"{what} must be at least 1, got {value}")


def check_budget(eps: float, alpha: float | None = None, steps: int | None = None) -> None:
    """Raise unless ``0 <= eps <= 1``, ``0 < alpha <= 1`` and ``steps >= 1`` (pixel units; ``None`` skips a check)."""
    if not 0.0 <= float(eps) <= 1.0:
        raise RobustError(f"eps must be in [0, 1] (pixel units, e.g. 8/255 = 0.0314), got {eps}")
    if alpha is not None and not 0.0 < float(alpha) <= 1.0:
        raise RobustError(f"alpha (step size) must be in (0, 1] pixel units, got {alpha}")
    if steps is not None:
        check_at_least_one(steps, "steps")


def check_quality(quality: int) -> None:
    """Raise unless ``quality`` is an integer in 1..100 (JPEG quality)."""
    if isinstance(quality, bool) or int(quality) != quality or not 1 <= int(quality) <= 100:
        raise RobustError(f"JPEG quality must be an integer in 1..100, got {quality}")
