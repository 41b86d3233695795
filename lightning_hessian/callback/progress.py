"""The operator of a measurement: a progress line for long calls, and host memory handed back.

Nothing is printed for calls shorter than ``DELAY_SECONDS`` (tqdm's ``delay``); longer ones show one
line on standard error, on rank zero, which disappears when the call ends. After every product on
the CPU the free heap is returned to the system (:mod:`lightning_hessian.callback.heap`).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor
from tqdm import tqdm

from lightning_hessian.callback.heap import release_free_heap

# Calls shorter than this print nothing.
DELAY_SECONDS = 2.0


class ProgressOperator:
    """An operator that forwards to ``op``, counts its products on a progress line and, when ``op``
    computes on the CPU and ``release_heap`` is set, releases the free heap after each product.

    Args:
        op: the operator (engine or DDP-summed).
        bar: the progress line, or ``None`` for none.
        release_heap: hand the free heap back after each product (a call of many products on a
            large probe set); off for a few products on one batch, whose freed blocks are reused.

    Example:
        >>> import torch
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> counted = ProgressOperator(DiagonalOperator([1.0, 2.0]), bar=None)
        >>> counted.matmat(torch.ones(2, 3, dtype=torch.float64)).shape, counted.num_params
        (torch.Size([2, 3]), 2)
    """

    def __init__(self, op: Any, bar: tqdm | None, *, release_heap: bool = True) -> None:
        self.op = op
        self.bar = bar
        self.release_heap = release_heap and op.device.type == "cpu"

    def __getattr__(self, name: str) -> Any:
        """Everything but the products is the wrapped operator's (``num_params``, ``dtype``, ``gradient``, ...)."""
        return getattr(self.op, name)

    def matvec(self, vector: Tensor) -> Tensor:
        """``[P] -> [P]``, counted like :meth:`matmat`."""
        return self.matmat(vector.reshape(-1, 1))[:, 0]

    def matmat(self, vectors: Tensor) -> Tensor:
        """The wrapped operator's product; advances the line by the number of vectors."""
        product = self.op.matmat(vectors)
        if self.release_heap:
            release_free_heap()
        if self.bar is not None:
            self.bar.update(1 if vectors.dim() == 1 else vectors.shape[1])
        return product


def progress_line(name: str, expected: int, enabled: bool) -> tqdm | None:
    """A progress line for a measurement expected to take about ``expected`` products, or ``None``.

    Example:
        >>> progress_line("hessian", 60, enabled=False) is None
        True
    """
    if not enabled:
        return None
    return tqdm(total=expected, desc=f"{name}: measuring", unit="product", delay=DELAY_SECONDS, leave=False,
                file=sys.stderr, dynamic_ncols=True)
