"""The one place that talks to loggers (TensorBoard, W&B, CSV and any other) and writes files.

One module per job: :mod:`~lightning_hessian.loggers.send` dispatches to every logger,
:mod:`~lightning_hessian.loggers.tags` names the tags, :mod:`~lightning_hessian.loggers.tensorboard`
and :mod:`~lightning_hessian.loggers.wandb` hold what only those backends show,
:mod:`~lightning_hessian.loggers.figures` draws (the package's one figure style) and
:mod:`~lightning_hessian.loggers.files` writes JSON. Every public function is available here too.
"""

from lightning_hessian.loggers.figures import (
    NUM_BINS,
    Histogram,
    bulk_histogram,
    density_histogram,
    density_views,
    spectrum_figure,
    top_k_histogram,
)
from lightning_hessian.loggers.files import json_ready, write_json
from lightning_hessian.loggers.send import (
    log_figure,
    log_hyperparams,
    log_interpolation,
    log_measurement,
    log_metrics,
    log_no_spectrum,
    log_run_start,
    log_scalars,
    log_spectra,
    log_text,
)
from lightning_hessian.loggers.tags import (
    COST_TAGS,
    GGN,
    STEP_METRIC,
    matrix_metrics,
    scalar_metrics,
    stability_metrics,
    tensorboard_layout,
)
from lightning_hessian.loggers.tensorboard import add_histogram, write_tensorboard_layout
from lightning_hessian.loggers.wandb import log_spectrum, spectrum_table, wandb_define_metrics

__all__ = [
    "COST_TAGS", "GGN", "NUM_BINS", "STEP_METRIC", "Histogram", "add_histogram", "bulk_histogram",
    "density_histogram", "density_views", "json_ready", "log_figure", "log_hyperparams", "log_interpolation",
    "log_measurement", "log_metrics", "log_no_spectrum", "log_run_start", "log_scalars", "log_spectra",
    "log_spectrum", "log_text", "matrix_metrics", "scalar_metrics", "spectrum_figure", "spectrum_table",
    "stability_metrics", "tensorboard_layout", "top_k_histogram", "wandb_define_metrics", "write_json",
    "write_tensorboard_layout",
]
