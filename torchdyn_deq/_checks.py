"""Option validators: one rule for every option of every object.

Numbers are Python ``int`` / ``float`` (a ``bool`` is refused even though it is an ``int``:
``max_steps=True`` is a mistake, not ``1``), and each check returns the normalised value.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """``value`` as an ``int >= 1``."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(name: str, value) -> int:
    """``value`` as an ``int >= 0``."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def positive_float(name: str, value) -> float:
    """``value`` as a finite ``float > 0``."""
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative_float(name: str, value) -> float:
    """``value`` as a finite ``float >= 0``."""
    if not _is_number(value) or not math.isfinite(value) or not value >= 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def float_in(name: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (open or closed ends)."""
    ok = _is_number(value) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def boolean(name: str, value) -> bool:
    """``value`` as a ``bool``: only ``True`` / ``False`` (``0``, ``'yes'`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def one_of(name: str, value, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; the error lists them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def optional(check, name: str, value) -> Optional[object]:
    """``None``, or ``check(name, value)``."""
    return None if value is None else check(name, value)
