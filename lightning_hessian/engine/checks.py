"""Argument checks shared by the engine and the callback: each names the argument and what it accepts.

Counts accept any integral number (``int``, ``numpy.int64``, a 0-d integer tensor) but not ``bool``;
flags accept only ``bool``; choices compare with ``==``; fractions are numbers in an interval.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any


def check_count(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` if it is an integral number ``>= minimum``.

    Args:
        name: the argument's name, used in the message.
        value: what the caller passed.
        minimum: the smallest allowed value.
        allow_none: whether ``None`` is accepted (and returned).

    Returns:
        ``int(value)``, or ``None`` when allowed and given.

    Raises:
        ValueError: naming the argument, the value and what is allowed.

    Example:
        >>> import numpy as np
        >>> check_count("k", np.int64(5))
        5
        >>> check_count("k", 0)
        Traceback (most recent call last):
        ...
        ValueError: k=0 must be an integer >= 1
    """
    if value is None and allow_none:
        return None
    integral = not isinstance(value, bool) and _is_integral(value)
    if not integral or operator.index(value) < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")
    return operator.index(value)


def _is_integral(value: Any) -> bool:
    if isinstance(value, numbers.Integral):
        return True
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; a ``TypeError`` naming the argument otherwise.

    Example:
        >>> check_flag("density", "yes")
        Traceback (most recent call last):
        ...
        TypeError: density='yes' must be True or False
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; a ``ValueError`` listing them otherwise.

    Example:
        >>> check_choice("mode", "eval", ("eval", "train"))
        'eval'
    """
    choices = tuple(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def check_fraction(
    name: str, value: Any, *, low: float = 0.0, high: float = 1.0, include_high: bool = False, allow_none: bool = False
) -> float | None:
    """``value`` as a float if it is a real number in ``(low, high)`` (or ``(low, high]``).

    Example:
        >>> check_fraction("tol", 1e-3)
        0.001
        >>> check_fraction("tol", 2.0)
        Traceback (most recent call last):
        ...
        ValueError: tol=2.0 must be a number in (0.0, 1.0)
    """
    if value is None and allow_none:
        return None
    inside = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and low < float(value)
        and (float(value) <= high if include_high else float(value) < high)
    )
    if not inside:
        interval = f"({low}, {high}]" if include_high else f"({low}, {high})"
        raise ValueError(f"{name}={value!r} must be a number in {interval}" + (" or None" if allow_none else ""))
    return float(value)
