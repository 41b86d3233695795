"""A curvature operator whose probe set is split across DDP ranks.

Each rank multiplies with the curvature of its own probe samples; the products are summed across
ranks weighted by sample counts (sums and counts, divided at the end, never per-rank means), so
every rank holds the product of the operator over the whole probe set and runs the identical
Lanczos recursion from the same seed. Every product is exactly one all-reduce on every rank, also
on a rank without probe samples or whose loss is not finite, so no rank waits for another.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.engine import CurvatureOperator, NonFiniteError
from lightning_hessian.engine.errors import all_finite


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
        """``[P, S] -> [P, S]`` (or ``[P] -> [P]``): one local product and one all-reduce.

        Raises:
            NonFiniteError: on every rank, when the product of any rank is not finite.
        """
        matrix = vectors.reshape(self.num_params, -1).to(device=self.device, dtype=self.dtype)
        total = self._summed(lambda op: op.matmat(matrix), tuple(matrix.shape))
        self.num_matvecs += matrix.shape[1]
        return total.reshape(vectors.shape)

    def gradient(self) -> Tensor:
        """``[P]``: the gradient of the mean loss over every rank's probe samples (one all-reduce)."""
        return self._summed(lambda op: op.gradient(), (self.num_params,))

    def _summed(self, local_mean: Callable[[Any], Tensor], shape: tuple[int, ...]) -> Tensor:
        """The sample-weighted mean over ranks of ``local_mean(local operator)``, of the given shape."""
        local_samples = 0 if self.local is None else self.local.num_samples
        if self.local is None:
            part = torch.zeros(shape, dtype=self.dtype, device=self.device)
        else:
            try:
                part = local_mean(self.local).reshape(shape) * local_samples
            except NonFiniteError:
                part = torch.full(shape, float("nan"), dtype=self.dtype, device=self.device)
        count = torch.tensor([float(local_samples)], dtype=self.dtype, device=self.device)
        packed = torch.cat([part.reshape(-1), count])
        # Lightning's reduce works in place: hand it a tensor nobody else holds.
        reduced = self.strategy.reduce(packed.clone(), reduce_op="sum")
        self.num_samples = int(reduced[-1].item())
        total = reduced[:-1].reshape(shape) / self.num_samples
        if not all_finite(total):
            raise NonFiniteError("the curvature product is not finite (NaN or inf) on at least one rank")
        return total

    def matvec(self, vector: Tensor) -> Tensor:
        """Multiply with one flat vector ``[P]``; returns ``[P]``."""
        return self.matmat(vector.reshape(-1))


def warn_history_elsewhere(trainer: Any, history_path: str | None) -> None:
    """Under a launcher that runs ``fit`` in new processes (``ddp_spawn``, ``ddp_notebook``), say once on rank
    zero that ``callback.history`` of the process that called ``fit`` stays empty, and how to read it."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher).__name__ != "_MultiProcessingLauncher" or not trainer.is_global_zero:
        return
    where = (f"the history file {history_path!r} in the logger's directory holds them (it needs a logger); "
             "`callback.load_state_dict(json.load(open(path)))` puts them into callback.history"
             if history_path else "pass history_file= (and a logger) to keep them in a file")
    warnings.warn("HessianSpectrumCallback measures in the processes this strategy starts, so callback.history of "
                  f"the process that called fit stays empty: {where}", UserWarning, stacklevel=3)

