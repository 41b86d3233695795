"""The loss along the straight line between two trained models, after ``fit``; no Lightning.

:mod:`~lightning_hessian.interpolation.line` walks the line and holds the result,
:mod:`~lightning_hessian.interpolation.checkpoints` reads and checks the endpoints and
:mod:`~lightning_hessian.interpolation.evaluate` measures a model's loss and accuracy.
"""

from lightning_hessian.interpolation.checkpoints import ModelLike, load_checkpoint_state
from lightning_hessian.interpolation.evaluate import evaluate
from lightning_hessian.interpolation.line import DEFAULT_ALPHAS, BNMode, InterpolationResult, linear_interpolation

__all__ = ["DEFAULT_ALPHAS", "BNMode", "InterpolationResult", "ModelLike", "evaluate", "linear_interpolation",
           "load_checkpoint_state"]
