"""Dense curvature matrices for small models (P up to a few thousand): the tests' oracle, and a feature.

Symbols: P selected parameters, C model outputs per sample.

These take a different route from the operators' kept-graph double backward: the Hessian is
``jacrev(grad)`` of the loss as a function of the flat parameter vector (reverse over reverse,
vectorized with :func:`torch.func.vmap`), which is defined for every loss in
:mod:`torch.nn.functional` with a second derivative; forward-over-reverse fails on some of them
(``mse_loss`` and ``huber_loss`` have no forward-mode derivative of their backward). The
Gauss-Newton matrix is built from ``jacrev`` Jacobians and the output Hessian (reverse over reverse
too). A test that compares the two routes checks the operators' batching, weighting and
flattening, not only their arithmetic. Memory: the matrix takes ``8 P^2`` bytes in float64 (200 MB at P = 5,000) and
:func:`torch.linalg.eigvalsh` costs O(P^3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev

from lightning_hessian.engine.errors import NonFiniteError
from lightning_hessian.engine.operators import LossFn, OutputFn, OutputLossFn, scalar_loss
from lightning_hessian.engine.snapshot import ModelSnapshot, SnapshotOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Hessian rows computed per vectorized pass: bounds the memory of the batched backward passes.
_ROWS_PER_PASS = 256


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    **options: Unpack[SnapshotOptions],
) -> Tensor:
    """The full Hessian of the mean loss over all samples in ``batches``.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of a batch.
        batches: a re-iterable of batches; weighted by their sample counts.
        **options: the snapshot's (:class:`~lightning_hessian.engine.snapshot.SnapshotOptions`):
            ``params`` (name patterns; default all with ``requires_grad``), ``dtype`` of the computation
            and result (default float64 here), ``mode`` (``"eval"`` or ``"train"``), as in the operators.

    Returns:
        ``(P, P)`` symmetric matrix, parameters in ``named_parameters()`` order.

    Raises:
        ValueError: if ``loss_fn`` does not return a scalar, or the selection or batches are empty.
        NonFiniteError: if the matrix holds NaN or infinite entries.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> dense_hessian(model, mse, [(torch.eye(2), torch.zeros(2, 1))])  # 2 x^T x / n = I
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    snapshot = ModelSnapshot(model, batches, **{"dtype": torch.float64, **options})

    def batch_hessian(flat: Tensor, batch: Any) -> Tensor:
        def loss(theta: Tensor) -> Tensor:
            return scalar_loss(snapshot.call(loss_fn, batch, leaves=snapshot.parameters_of(theta)), "loss_fn")

        return jacrev(grad(loss), chunk_size=_ROWS_PER_PASS)(flat)

    return _finite(_sample_average(snapshot, batch_hessian), "Hessian")


def dense_ggn(
    model: nn.Module,
    output_fn: OutputFn,
    output_loss_fn: OutputLossFn,
    batches: Iterable[Any],
    **options: Unpack[SnapshotOptions],
) -> Tensor:
    """The full generalized Gauss-Newton matrix ``G = (1/N) sum_b n_b J_b^T (d^2 L_b / df^2) J_b``.

    Args:
        model: the network; never modified.
        output_fn: ``output_fn(model, batch) -> outputs``.
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar``, the batch's mean loss.
        batches: a re-iterable of batches; weighted by their sample counts.
        **options: as in :func:`dense_hessian`.

    Returns:
        ``(P, P)`` symmetric positive semidefinite matrix (for losses convex in the outputs).

    Raises:
        ValueError: if ``output_loss_fn`` does not return a scalar, or the selection or batches are empty.
        NonFiniteError: if the matrix holds NaN or infinite entries.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> half_squares = lambda f, b: 0.5 * f.pow(2).sum(1).mean()
        >>> dense_ggn(model, lambda m, b: m(b), half_squares, [torch.eye(2)])  # x^T x / n = I / 2
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]], dtype=torch.float64)
    """
    snapshot = ModelSnapshot(model, batches, **{"dtype": torch.float64, **options})

    def batch_ggn(flat: Tensor, batch: Any) -> Tensor:
        def outputs_of(theta: Tensor) -> Tensor:
            return snapshot.call(output_fn, batch, leaves=snapshot.parameters_of(theta))

        outputs = outputs_of(flat).detach()
        jacobian = jacrev(outputs_of)(flat).reshape(-1, snapshot.num_params)
        output_hessian = jacrev(grad(
            lambda f: scalar_loss(output_loss_fn(f.reshape(outputs.shape), batch), "output_loss_fn")
        ))(outputs.reshape(-1))
        return jacobian.T @ output_hessian @ jacobian

    return _finite(_sample_average(snapshot, batch_ggn), "Gauss-Newton matrix")


def _sample_average(snapshot: ModelSnapshot, per_batch: Callable[[Tensor, Any], Tensor]) -> Tensor:
    """``(1/N) sum_b n_b per_batch(theta, b)``, symmetrized: the ``(P, P)`` matrix of the whole sample."""
    flat = snapshot.flat_parameters()
    total = torch.zeros(snapshot.num_params, snapshot.num_params, dtype=snapshot.dtype, device=flat.device)
    for batch, size in zip(snapshot.batches, snapshot.batch_sizes, strict=True):
        total += per_batch(flat, batch) * (size / snapshot.num_samples)
    return (total + total.T) / 2


def _finite(matrix: Tensor, name: str) -> Tensor:
    """``matrix``, or a :class:`NonFiniteError` if any entry is NaN or infinite."""
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(
            f"the dense {name} is not finite (NaN or inf); the loss or its derivatives overflow at these "
            "parameters or the inputs hold NaN"
        )
    return matrix
