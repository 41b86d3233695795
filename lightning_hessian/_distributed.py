"""A curvature operator whose probe set is split across DDP ranks.

Each rank multiplies with the curvature of its own probe samples; the products are summed across
ranks weighted by sample counts (sums and counts, divided at the end, never per-rank means), so
every rank holds the product of the operator over the whole probe set and runs the identical
Lanczos recursion from the same seed. Every product is exactly one all-reduce on every rank, also
on a rank without probe samples or whose loss is not finite, so no rank waits for another.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_hessian.engine import CurvatureOperator, NonFiniteError


class SummedOperator:
    """Products of the sample-weighted mean of the ranks' local operators.

    Args:
        local: this rank's operator, or ``None`` when the rank holds no probe samples.
        strategy: the Trainer's strategy; its ``reduce(tensor, reduce_op="sum")`` is the all-reduce.
        num_params, dtype, device: of the flat vectors (the same on every rank).

    Attributes:
        num_params, dtype, device: as given.
        num_matvecs: vector products so far.
        num_samples: probe samples over all ranks (known after the first product).
    """

    def __init__(
        self,
        local: CurvatureOperator | None,
        strategy: Any,
        *,
        num_params: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.local = local
        self.strategy = strategy
        self.num_params = num_params
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0
        self.num_samples = 0

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[S, P] -> [S, P]``: one local product and one all-reduce.

        Raises:
            NonFiniteError: on every rank, when the product of any rank is not finite.
        """
        matrix = vectors.reshape(-1, self.num_params).to(device=self.device, dtype=self.dtype)
        local_samples = 0 if self.local is None else self.local.num_samples
        if self.local is None:
            product = torch.zeros_like(matrix)
        else:
            try:
                product = self.local.matmat(matrix) * local_samples
            except NonFiniteError:
                product = torch.full_like(matrix, float("nan"))
        count = torch.tensor([float(local_samples)], dtype=self.dtype, device=self.device)
        packed = torch.cat([product.reshape(-1), count])
        # Lightning's reduce works in place: hand it a tensor nobody else holds.
        reduced = self.strategy.reduce(packed.clone(), reduce_op="sum")
        self.num_samples = int(reduced[-1].item())
        total = reduced[:-1].reshape(matrix.shape) / self.num_samples
        if not torch.isfinite(total).all():
            raise NonFiniteError("the curvature product is not finite (NaN or inf) on at least one rank")
        self.num_matvecs += matrix.shape[0]
        return total.reshape(vectors.shape)

    def matvec(self, vector: Tensor) -> Tensor:
        """Multiply with one flat vector ``[P]``; returns ``[P]``."""
        return self.matmat(vector.reshape(1, -1))[0]
