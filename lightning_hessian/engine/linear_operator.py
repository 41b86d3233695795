"""What the solvers multiply with: the :class:`LinearOperator` protocol, a diagonal example of it, and
the random sign vectors that probe it.

Symbols: P parameters (``num_params``), S vectors multiplied at once.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LinearOperator(Protocol):
    """What the solvers need from an operator: a symmetric P x P matrix known by its products.

    Example:
        >>> isinstance(DiagonalOperator([1.0]).num_params, int)
        True
    """

    num_params: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[P, S] -> [P, S]``: the products with S vectors, one per column."""
        ...


class DiagonalOperator:
    """A diagonal matrix as an operator (float64, CPU): for examples and quick checks.

    Example:
        >>> DiagonalOperator([2.0, 1.0]).matmat(torch.ones(2, 1, dtype=torch.float64))
        tensor([[2.],
                [1.]], dtype=torch.float64)
    """

    def __init__(self, diagonal: list[float] | Tensor) -> None:
        self.diagonal = torch.as_tensor(diagonal, dtype=torch.float64)
        self.num_params = self.diagonal.numel()
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[P, S] -> [P, S]``."""
        return self.diagonal[:, None] * vectors


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Random signs, ``+-1`` with equal probability, drawn on the CPU from ``generator``.

    Example:
        >>> rademacher((2, 3), torch.Generator().manual_seed(0), torch.float64).abs().sum().item()
        6.0
    """
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
