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


class NonSmoothError(NonFiniteError):
    """A finite-difference curvature product could not get clear of the loss's kinks (ReLU, max, abs).

    The sharded Hessian's products are differences of gradients; a kink between the two points makes
    the difference's error unbounded. Raised on every rank (the decision reads all-reduced norms). A
    :class:`NonFiniteError`, so callers that skip a measurement at a non-finite loss skip this too.

    Example:
        >>> issubclass(NonSmoothError, NonFiniteError)
        True
    """


def all_finite(values: Tensor) -> bool:
    """Whether every entry is finite, without a mask as large as ``values`` (a NaN propagates to the
    maximum, an infinity is the maximum or the minimum).

    Example:
        >>> all_finite(torch.tensor([1.0, -2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    return values.numel() == 0 or bool(torch.isfinite(values.amax()) & torch.isfinite(values.amin()))


class UnsupportedError(ValueError):
    """The model, its loss or its batches cannot be measured as given; the message names the fix.

    Raised early (when the operator is built or at its first product), never after a partial result.

    Example:
        >>> from lightning_hessian.engine.operators import HessianOperator
        >>> try:
        ...     HessianOperator(torch.nn.Linear(2, 1).to("meta"), lambda m, b: m(b).mean(), [torch.ones(3, 2)])
        ... except ValueError as error:  # an UnsupportedError is a ValueError
        ...     print(type(error).__name__)
        UnsupportedError
    """
