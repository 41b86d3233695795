"""Dense curvature matrices for small models (P up to a few thousand): the oracle, and a feature.

Symbols: P parameters, C model outputs per sample.

These take a different route from the operators' double backward: forward-over-reverse
:mod:`torch.func` (``jvp`` of ``grad``) for the Hessian and ``jacrev`` for the Gauss-Newton
Jacobians, so a test that compares the two checks the operators' batching, weighting and
flattening, not only their arithmetic. Memory: the matrix takes ``8 P^2`` bytes in float64
(200 MB at P = 5,000) and :func:`torch.linalg.eigvalsh` costs O(P^3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from lightning_hessian.engine.errors import NonFiniteError
from lightning_hessian.engine.operators import CurvatureOperator, LossFn, Mode, OutputFn, OutputLossFn, scalar_loss

# Hessian rows computed per vectorized pass: bounds the memory of the forward-mode tangents.
_ROWS_PER_PASS = 256


class _Flat(CurvatureOperator):
    """Holds the batches, selected parameters and frozen tensors; evaluates a function of a flat vector."""

    def flat(self) -> Tensor:
        return torch.cat([leaf.detach().reshape(-1) for leaf in self._leaves])

    def evaluate(self, fn: Callable[..., Tensor], flat: Tensor, batch: Any) -> Tensor:
        parts = [c.reshape(s) for c, s in zip(flat.split(self._numels), self._shapes, strict=True)]
        return self.call(fn, batch, leaves=parts)


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    mode: Mode = "eval",
) -> Tensor:
    """The full Hessian of the mean loss over all samples in ``batches``.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of a batch.
        batches: a re-iterable of batches; weighted by their sample counts.
        params: name patterns selecting parameters (default all with ``requires_grad``).
        dtype: dtype of the computation and result (default float64).
        mode: ``"eval"`` (default) or ``"train"`` (batch statistics, dropout off), as in the
            operators.

    Returns:
        ``(P, P)`` symmetric matrix, parameters in ``named_parameters()`` order.

    Raises:
        ValueError: if ``loss_fn`` does not return a scalar, or the selection or batches are empty.
        NonFiniteError: if the matrix holds NaN or infinite entries.
    """
    holder = _Flat(model, batches, params=params, dtype=dtype, mode=mode, keep_graph=False)
    flat = holder.flat()
    identity = torch.eye(holder.num_params, dtype=dtype, device=flat.device)
    hessian = torch.zeros(holder.num_params, holder.num_params, dtype=dtype, device=flat.device)
    for batch, size in zip(holder._batches, holder._sizes, strict=True):

        def gradient(theta: Tensor, batch: Any = batch) -> Tensor:
            return torch.func.grad(lambda t: scalar_loss(holder.evaluate(loss_fn, t, batch), "loss_fn"))(theta)

        def row(direction: Tensor, gradient: Callable[[Tensor], Tensor] = gradient) -> Tensor:
            return jvp(gradient, (flat,), (direction,))[1]

        for start in range(0, holder.num_params, _ROWS_PER_PASS):
            rows = identity[start : start + _ROWS_PER_PASS]
            hessian[start : start + rows.shape[0]] += vmap(row)(rows) * (size / holder.num_samples)
    return _finite((hessian + hessian.T) / 2, "Hessian")


def dense_ggn(
    model: nn.Module,
    output_fn: OutputFn,
    output_loss_fn: OutputLossFn,
    batches: Iterable[Any],
    *,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    mode: Mode = "eval",
) -> Tensor:
    """The full generalized Gauss-Newton matrix ``G = (1/N) sum_b n_b J_b^T (d^2 L_b / df^2) J_b``.

    Args:
        model: the network; never modified.
        output_fn: ``output_fn(model, batch) -> outputs``.
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar``, the batch's mean loss.
        batches, params, dtype, mode: as in :func:`dense_hessian`.

    Returns:
        ``(P, P)`` symmetric positive semidefinite matrix (for losses convex in the outputs).

    Raises:
        ValueError: if ``output_loss_fn`` does not return a scalar, or the selection or batches are empty.
        NonFiniteError: if the matrix holds NaN or infinite entries.
    """
    holder = _Flat(model, batches, params=params, dtype=dtype, mode=mode, keep_graph=False)
    flat = holder.flat()
    ggn = torch.zeros(holder.num_params, holder.num_params, dtype=dtype, device=flat.device)
    for batch, size in zip(holder._batches, holder._sizes, strict=True):
        outputs = holder.evaluate(output_fn, flat, batch).detach()
        jacobian = jacrev(lambda t, b=batch: holder.evaluate(output_fn, t, b))(flat)
        jacobian = jacobian.reshape(-1, holder.num_params)
        output_hessian = torch.func.hessian(
            lambda f, b=batch, shape=outputs.shape: scalar_loss(output_loss_fn(f.reshape(shape), b), "output_loss_fn")
        )(outputs.reshape(-1))
        ggn += jacobian.T @ output_hessian @ jacobian * (size / holder.num_samples)
    return _finite((ggn + ggn.T) / 2, "Gauss-Newton matrix")


def _finite(matrix: Tensor, name: str) -> Tensor:
    """``matrix``, or a :class:`NonFiniteError` if any entry is NaN or infinite."""
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(
            f"the dense {name} is not finite (NaN or inf); the loss or its derivatives overflow at these "
            "parameters or the inputs hold NaN"
        )
    return matrix
