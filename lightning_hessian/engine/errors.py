"""Exceptions raised by the engine."""


class NonFiniteError(FloatingPointError):
    """The loss or a curvature product is NaN or infinite, so there is no spectrum to measure."""
