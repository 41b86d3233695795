"""Where the solvers' vectors live: whole in one process, or split across the ranks of a process group.

Symbols: P parameters (``op.num_params``), p this rank's part of them (``VectorSpace.length``).

An operator whose vectors are split across ranks (the Hessian of a model whose parameters are
sharded) says so with one attribute besides the
:class:`~lightning_hessian.engine.linear_operator.LinearOperator` protocol: ``shards``, a
:class:`Shards`. Each rank then holds only its p entries of every vector and runs the same solver;
an inner product or a norm is the all-reduced sum of the ranks' partial sums, so every rank computes
the same numbers and takes the same decisions, and no rank ever holds a whole P-vector. Without
``shards`` every operation is the plain one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_hessian.engine.linear_operator import LinearOperator


# Entries per partial sum of VectorSpace.dot.
DOT_CHUNK = 1 << 16


@dataclass(frozen=True)
class Shards:
    """How an operator's vectors are split: this rank's part, its rank, and the sum over ranks.

    Attributes:
        length: p, the entries of a vector this rank holds.
        rank: this rank's index (random draws are independent per rank).
        ranks: how many ranks share the vectors.
        all_reduce: ``all_reduce(tensor) -> tensor``, the element-wise sum over the ranks (every rank
            gets the same sum; it may work in place).

    Example:
        >>> Shards(length=3, rank=0, ranks=1, all_reduce=lambda t: t).length
        3
    """

    length: int
    rank: int
    ranks: int
    all_reduce: Callable[[Tensor], Tensor]


class VectorSpace:
    """The vectors of an operator as the solvers see them: their local length, inner products and draws.

    Args:
        op: an operator; its optional ``shards`` attribute (a :class:`Shards`) splits the vectors.

    Attributes:
        length: entries of a vector held here (P, or p when split).
        split: whether the vectors are split across ranks.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> space = VectorSpace(DiagonalOperator([1.0, 2.0]))
        >>> space.length, space.split, float(space.norm(torch.tensor([3.0, 4.0])))
        (2, False, 5.0)
    """

    def __init__(self, op: LinearOperator) -> None:
        shards: Shards | None = getattr(op, "shards", None)
        self.shards = shards
        self.split = shards is not None
        self.length = shards.length if shards is not None else op.num_params

    def reduce(self, partial: Tensor) -> Tensor:
        """The sum over ranks of per-rank partial sums (inner products of the local parts); unchanged unsplit."""
        return partial if self.shards is None else self.shards.all_reduce(partial.contiguous())

    def dot(self, a: Tensor, b: Tensor) -> float:
        """The inner product of two whole vectors, summed in float64: the dots of chunks of
        :data:`DOT_CHUNK` entries (in the vectors' dtype) are added in float64, so a float32 sum over
        millions of entries keeps float32's accuracy per entry and needs no float64 copy.

        Example:
            >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
            >>> VectorSpace(DiagonalOperator([1.0, 1.0])).dot(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
            11.0
        """
        partials = torch.stack([x.dot(y) for x, y in zip(a.split(DOT_CHUNK), b.split(DOT_CHUNK), strict=True)])
        return float(self.reduce(partials.double().sum()))

    def norm(self, vectors: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
        """Euclidean norms of whole vectors (``Tensor.norm`` unsplit; over ``dim``, or all entries)."""
        if self.shards is None:
            return vectors.norm() if dim is None else vectors.norm(dim=dim, keepdim=keepdim)
        squares = vectors.pow(2).sum() if dim is None else vectors.pow(2).sum(dim=dim, keepdim=keepdim)
        return self.reduce(squares).sqrt()

    def generator(self, seed: int) -> torch.Generator:
        """A private generator: seeded with ``seed`` unsplit; split, from ``(seed, rank)``, so that the
        ranks' parts of a random vector are independent draws."""
        if self.shards is None:
            return torch.Generator().manual_seed(seed)
        state = np.random.SeedSequence([seed % 2**63, self.shards.rank]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) >> 1)
