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


def check_square_queries(queries: int) -> None:
    """Square's query budget: 0 (Square does not run) or more."""
    if int(queries) < 0:
        raise RobustError(f"Square's queries must be 0 (no Square) or more, got {queries}")


NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    """``norm`` itself when it is a known threat model (``linf``, ``l2``); else raise."""
    if norm not in NORMS:
        raise RobustError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    return norm


def check_l2_eps(eps: float, dims: int | None = None) -> None:
    """Raise unless ``0 <= eps`` and, given ``dims`` (C·H·W of one image), ``eps <= sqrt(dims)``: the L2 distance
    of an all-black and an all-white image, the largest two [0, 1] images can have, so a larger budget means
    nothing (usually a value meant for another norm or another image size)."""
    if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
        raise RobustError(f"L2 eps must be a finite number >= 0 (pixel units, e.g. 0.5), got {eps}")
    if dims is not None and float(eps) > math.sqrt(dims):
        raise RobustError(
            f"L2 eps {eps} is above {math.sqrt(dims):.4g} = sqrt(C·H·W) for {dims} values per image, "
            "the largest L2 distance two [0, 1] images can have"
        )


def check_budget(
    eps: float, alpha: float | None = None, steps: int | None = None, *, norm: str = "linf", dims: int | None = None
) -> None:
    """Raise unless the budget is valid in ``norm`` (pixel units; ``None`` skips a check): L-inf ``0 <= eps <= 1``
    and ``0 < alpha <= 1``; L2 ``eps`` as :func:`check_l2_eps` (``dims``: C·H·W, when known) and a finite
    ``alpha > 0``; ``steps >= 1``."""
    if check_norm(norm) == "l2":
        check_l2_eps(eps, dims)
        if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) > 0.0):
            raise RobustError(f"alpha (L2 step size) must be a finite number > 0 (pixel units), got {alpha}")
    else:
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
