"""Exceptions raised by the engine."""


class NonFiniteError(FloatingPointError):
    """The loss or a curvature product is NaN or infinite, so there is no spectrum to measure.

    Example:
        >>> import torch
        >>> from lightning_hessian.engine.operators import HessianOperator
        >>> op = HessianOperator(torch.nn.Linear(2, 1), lambda m, b: m(b).mean() * float("nan"), [torch.ones(3, 2)])
        >>> try:
        ...     op.matvec(torch.ones(3))
        ... except FloatingPointError as error:  # a NonFiniteError is a FloatingPointError
        ...     print(type(error).__name__, error)
        NonFiniteError loss_fn returned a non-finite loss (nan); no curvature there
    """
