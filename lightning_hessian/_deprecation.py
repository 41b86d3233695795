"""Old names kept for one release: modules that moved, arguments that were renamed."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that returns ``new``'s attributes with a ``DeprecationWarning``.

    Example:
        >>> forward = moved_module("old.json", "json")
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     forward("dumps")([1])
        '[1]'
    """

    def forward(name: str) -> Any:
        value = getattr(importlib.import_module(new), name)
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return value

    return forward


def renamed_argument(owner: str, old: str, new: str) -> None:
    """Warn that ``owner``'s argument ``old`` is now called ``new``."""
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}=... instead", DeprecationWarning, stacklevel=3)
