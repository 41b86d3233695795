"""Models a call cannot measure: said once, with the fix, and training goes on.

Two kinds. A module with lazy parameters (``nn.LazyLinear`` before its first forward) has nothing to
measure yet: that call is skipped with a word once, and the callback measures from the next call
on. A model or batch the engine refuses (an
:class:`~lightning_hessian.engine.errors.UnsupportedError`: complex parameters, a loss that only works
in training mode under ``mode="eval"``, batches whose samples cannot be counted) stops the callback
for the rest of the run, with one warning that names the reason and the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.nn.parameter import UninitializedParameter

from lightning_hessian.engine import UnsupportedError
from lightning_hessian.measurement import Event


def initialized(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters that hold values (not a lazy module's uninitialized ones).

    Example:
        >>> import torch
        >>> lazy = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Linear(3, 1))
        >>> len(initialized(lazy.parameters())), len(list(lazy.parameters()))
        (2, 4)
    """
    return [p for p in params if not isinstance(p, UninitializedParameter)]


class Refusals:
    """Whether a call can measure, and the one warning when it cannot.

    Attributes:
        reason: why the run is not measured (the engine's message), ``None`` while it is.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._warned_lazy = False

    def skip(self, trainer: Any, pl_module: Any, step: int, stage: str, events: list[Event]) -> bool:
        """Whether this call cannot measure: the run was refused before, or the module still has lazy
        parameters (recorded as an ``"uninitialized"`` event, with a warning once)."""
        if self.reason is not None:
            return True
        selected = [p for p in pl_module.parameters() if p.requires_grad]
        if len(initialized(selected)) == len(selected):
            return False
        events.append(Event(step, stage, "uninitialized"))
        if not self._warned_lazy and trainer.is_global_zero:
            warnings.warn(f"HessianSpectrumCallback: no spectrum at step {step}: the module has lazy parameters "
                          "(nn.LazyLinear, ...) that its first forward initializes; the callback measures from the "
                          "next call on", UserWarning, stacklevel=3)
        self._warned_lazy = True
        return True

    def refuse(self, trainer: Any, step: int, stage: str, error: UnsupportedError, events: list[Event]) -> None:
        """Stop measuring a run that cannot be measured as configured (an ``"unsupported"`` event); say why
        and the fix, once."""
        self.reason = str(error)
        events.append(Event(step, stage, "unsupported"))
        if trainer.is_global_zero:
            warnings.warn(f"HessianSpectrumCallback cannot measure this run: {error}. Training continues without "
                          "measurements", UserWarning, stacklevel=3)
