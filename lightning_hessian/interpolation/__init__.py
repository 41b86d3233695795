"""The loss along the straight line between two trained models, after ``fit``; no Lightning."""

from lightning_hessian.interpolation.line import (
    DEFAULT_ALPHAS,
    InterpolationResult,
    evaluate,
    linear_interpolation,
    load_checkpoint_state,
)

__all__ = ["DEFAULT_ALPHAS", "InterpolationResult", "evaluate", "linear_interpolation", "load_checkpoint_state"]
