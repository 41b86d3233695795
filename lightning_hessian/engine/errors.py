"""Exceptions raised by the engine, and the check that raises the non-finite one."""

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """The loss or a curvature product is NaN or infinite, so there is no spectrum to measure.

    Example:
        >>> from lightning_hessian.engine.operators import HessianOperator
        >>> op = HessianOperator(torch.nn.Linear(2, 1), lambda m, b: m(b).mean() * float("nan"), [torch.ones(3, 2)])
        >>> try:
        ...     op.matvec(torch.ones(3))
        ... except FloatingPointError as error:  # a NonFiniteError is a FloatingPointError
        ...     print(type(error).__name__, error)
        NonFiniteError loss_fn returned a non-finite loss (nan); no curvature there
    """


def all_finite(values: Tensor) -> bool:
    """Whether every entry is finite, without a mask as large as ``values`` (a NaN propagates to the
    maximum, an infinity is the maximum or the minimum).

    Example:
        >>> all_finite(torch.tensor([1.0, -2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    return values.numel() == 0 or bool(torch.isfinite(values.amax()) & torch.isfinite(values.amin()))
