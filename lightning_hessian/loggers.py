"""The one place that talks to loggers: TensorBoard, W&B, CSV, any Lightning logger, and files.

It names the tags, sends scalars to every logger and into ``trainer.callback_metrics``, draws the
density as a histogram and the spectrum as a matplotlib figure for the loggers that can show them,
writes the history file, and logs the results of :func:`~lightning_hessian.linear_interpolation`
and of the paper's experiments. Everything it reads is typed
(:class:`~lightning_hessian.measurement.Measurement`,
:class:`~lightning_hessian.interpolation.InterpolationResult`); plain values appear only in what it
writes.

Tags, with ``<prefix>`` the callback's ``name`` (``hessian`` by default): the Hessian's quantities
are ``<prefix>/<quantity>``, the Gauss-Newton matrix's ``<prefix>/ggn/<quantity>``, a layer block's
top eigenvalue ``<prefix>/layer/<name>/eig_1``, a module's trace and share of the top eigenvector
``<prefix>/layer/<name>/trace`` and ``.../eig_1_mass``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_hessian._compat import TENSORBOARD_LOGGERS, WANDB_LOGGERS
from lightning_hessian.engine import SpectralDensity
from lightning_hessian.measurement import MatrixMeasurement, Measurement

if TYPE_CHECKING:
    from lightning_hessian.interpolation import InterpolationResult

GGN = "ggn"
# Bins of the density histogram: fine enough to show the outliers apart from the bulk, coarse
# enough that TensorBoard's rebinning (about 30 buckets on screen) has something to merge.
NUM_BINS = 200
# Cost tags of a call: they keep their values when a call yields no spectrum.
COST_TAGS = ("matvecs", "seconds", "overhead", "nonfinite", "skipped")
# The figure's log-scaled density axis stops this far below the peak.
_FLOOR_FRACTION = 1e-6
# 512 x 320 pixels: readable in TensorBoard's image panel, and a third cheaper to render than 100 dpi.
_DPI = 80


def matrix_metrics(measured: MatrixMeasurement, prefix: str, lr: float | None) -> dict[str, float]:
    """The scalar tags of one matrix, ``{tag: value}``; quantities that are NaN or absent are left out.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> measured = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> sorted(matrix_metrics(measured, "hessian", lr=0.1))[:4]
        ['hessian/eig_1', 'hessian/eig_2', 'hessian/max_residual', 'hessian/outliers']
    """
    metrics = {f"{prefix}/eig_{i}": float(v) for i, v in enumerate(measured.eigenvalues, start=1)}
    summary = measured.summary
    optional = {
        "eig_min": measured.eig_min,
        "trace": None if measured.density is None else measured.density.trace,
        "outliers": summary.outliers,
        "near_zero_fraction": summary.near_zero_fraction,
        "negative_mass": summary.negative_mass,
        "grad_overlap": measured.grad_overlap,
        "max_residual": measured.max_residual,
        "sharpness_x_lr": None if lr is None else measured.eigenvalues[0] * lr,
    }
    metrics.update({f"{prefix}/{name}": float(v) for name, v in optional.items() if _finite(v)})
    for name, layer in measured.layers.items():
        metrics[f"{prefix}/layer/{name}/eig_1"] = layer.eigenvalue
    for name, view in measured.layer_views.items():
        metrics[f"{prefix}/layer/{name}/trace"] = view.trace
        metrics[f"{prefix}/layer/{name}/eig_1_mass"] = view.eig_1_mass
    return metrics


def scalar_metrics(measurement: Measurement, prefix: str = "hessian") -> dict[str, float]:
    """Every scalar tag of one call: each matrix's quantities and the call's cost.

    Args:
        measurement: one call of the callback.
        prefix: the callback's ``name``.

    Returns:
        ``<prefix>/eig_1``, ..., ``<prefix>/ggn/...`` when the Gauss-Newton matrix was measured, and
        ``<prefix>/matvecs``, ``<prefix>/seconds``, ``<prefix>/overhead`` and ``<prefix>/nonfinite`` (0).
    """
    metrics: dict[str, float] = {}
    for name, measured in measurement.matrices.items():
        metrics.update(matrix_metrics(measured, prefix if name == "hessian" else f"{prefix}/{GGN}", measurement.lr))
    cost = {"matvecs": measurement.num_matvecs, "seconds": measurement.seconds, "overhead": measurement.overhead}
    metrics.update({f"{prefix}/{name}": float(v) for name, v in cost.items() if _finite(v)})
    metrics[f"{prefix}/nonfinite"] = 0.0
    return metrics


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_metrics(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to each of ``loggers`` at ``step``."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger (rank 0) and into ``trainer.callback_metrics`` (every rank).

    ``callback_metrics`` is filled on every rank so that ``ModelCheckpoint`` and ``EarlyStopping``
    monitoring a tag decide alike on all ranks.
    """
    device = trainer.strategy.root_device
    trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in metrics.items()})
    if trainer.is_global_zero:
        log_metrics(trainer.loggers, metrics, step)


def log_measurement(trainer: Any, measurement: Measurement, prefix: str) -> None:
    """Scalars of one call to every logger and ``callback_metrics``; histograms and figures where shown."""
    log_scalars(trainer, scalar_metrics(measurement, prefix), measurement.step)
    log_spectra(trainer, measurement, prefix)


def log_no_spectrum(trainer: Any, prefix: str, step: int, costs: Mapping[str, float]) -> None:
    """A call without a spectrum: the cost tags are logged, the spectral tags in ``callback_metrics`` turn NaN.

    A ``ModelCheckpoint`` or ``EarlyStopping`` monitoring ``<prefix>/eig_1`` then sees that this call
    measured nothing, instead of the last finite value.
    """
    stale = [key for key in trainer.callback_metrics
             if key.startswith(f"{prefix}/") and key.rsplit("/", 1)[-1] not in COST_TAGS]
    trainer.callback_metrics.update({key: torch.tensor(float("nan")) for key in stale})
    log_scalars(trainer, {f"{prefix}/{name}": float(value) for name, value in costs.items()}, step)


def log_hyperparams(trainer: Any, params: Mapping[str, Any]) -> None:
    """Log settings as hyperparameters to every logger (rank 0)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(params))


def density_histogram(density: SpectralDensity, num_bins: int = NUM_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed density as a histogram counting eigenvalues.

    Args:
        density: an SLQ estimate.
        num_bins: number of bins over the density's grid.

    Returns:
        ``(edges, counts)``: ``(num_bins + 1,)`` bin edges and ``(num_bins,)`` expected numbers of
        eigenvalues per bin (the density at the bin centre times the bin width times P), float64.
    """
    edges = density.grid(num_points=num_bins + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    counts = density.density(centres) * (edges[1] - edges[0]) * density.num_params
    return edges, counts


def spectrum_figure(eigenvalues: Sequence[float], density: SpectralDensity | None, title: str) -> Any:
    """A matplotlib figure: the smoothed density on a log scale and the top eigenvalues as markers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    figure = Figure(figsize=(6.4, 4.0), dpi=_DPI)
    # Fixed margins and no minor ticks: constrained layout and log-axis minor ticks made up most of
    # the logging time of a call on the digits MLP.
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91)
    axes = figure.subplots()
    if density is not None:
        grid = density.grid()
        values = density.density(grid)
        floor = float(values.max()) * _FLOOR_FRACTION
        axes.semilogy(grid.numpy(), values.clamp_min(floor).numpy(), color="tab:blue", label="density (SLQ)")
        axes.set_ylim(bottom=floor)
        axes.set_ylabel("spectral density")
    if eigenvalues:
        axes.vlines(list(eigenvalues), 0, 1, transform=axes.get_xaxis_transform(), colors="tab:red",
                    linestyles="dotted", label=f"top {len(eigenvalues)} eigenvalues")
    axes.minorticks_off()
    # Plain "1e-05" labels: the default mathtext ones ("$10^{-5}$") cost a parser run per label.
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.set_xlabel("eigenvalue")
    axes.set_title(title)
    axes.legend(loc="upper right")
    return figure


def _showing(loggers: Sequence[Any]) -> list[Any]:
    """The loggers that show figures and histograms (TensorBoard, W&B)."""
    return [lg for lg in loggers if isinstance(lg, TENSORBOARD_LOGGERS + WANDB_LOGGERS)]


def log_spectra(trainer: Any, measurement: Measurement, prefix: str) -> None:
    """Density histograms and spectrum figures for the loggers that can show them (rank 0).

    TensorBoard gets ``<prefix>/density`` through ``add_histogram_raw`` and ``<prefix>/spectrum``
    through ``add_figure``; W&B gets a ``wandb.Histogram`` and a ``wandb.Image`` of the figure.
    Other loggers get nothing here (they have the scalars), and nothing is drawn for them.
    """
    showing = _showing(trainer.loggers)
    if not trainer.is_global_zero or not showing:
        return
    step = measurement.step
    for name, measured in measurement.matrices.items():
        tag = prefix if name == "hessian" else f"{prefix}/{GGN}"
        figure = spectrum_figure(measured.eigenvalues, measured.density, f"{tag} spectrum, step {step}")
        histogram = density_histogram(measured.density) if measured.density is not None else None
        for logger in showing:
            if isinstance(logger, TENSORBOARD_LOGGERS):
                _tensorboard_histogram(logger.experiment, f"{tag}/density", histogram, step)
                logger.experiment.add_figure(f"{tag}/spectrum", figure, global_step=step, close=False)
            else:
                _wandb_spectrum(logger.experiment, tag, histogram, figure, step)


def _tensorboard_histogram(writer: Any, tag: str, histogram: Any, step: int) -> None:
    if histogram is None:
        return
    edges, counts = histogram
    centres = (edges[1:] + edges[:-1]) / 2
    writer.add_histogram_raw(
        tag, min=float(edges[0]), max=float(edges[-1]), num=float(counts.sum()),
        sum=float((counts * centres).sum()), sum_squares=float((counts * centres**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step,
    )


def _wandb_spectrum(run: Any, tag: str, histogram: Any, figure: Any, step: int) -> None:
    import wandb

    payload: dict[str, Any] = {f"{tag}/spectrum": wandb.Image(figure), "trainer/global_step": step}
    if histogram is not None:
        edges, counts = histogram
        payload[f"{tag}/density"] = wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
    run.log(payload)


def log_figure(loggers: Sequence[Any], tag: str, figure: Any, step: int = 0) -> None:
    """A matplotlib figure to TensorBoard (``add_figure``) and W&B (an image), for those among ``loggers``."""
    for logger in _showing(loggers):
        if isinstance(logger, TENSORBOARD_LOGGERS):
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        else:
            import wandb

            logger.log_metrics({tag: wandb.Image(figure)}, step=step)


def log_text(loggers: Sequence[Any], tag: str, text: str, step: int = 0) -> None:
    """Markdown text to TensorBoard's text tab, for the TensorBoard loggers among ``loggers``."""
    for logger in loggers:
        if isinstance(logger, TENSORBOARD_LOGGERS):
            logger.experiment.add_text(tag, text, global_step=step)


def log_interpolation(result: InterpolationResult, loggers: Sequence[Any], *, step: int = 0,
                      name: str = "interpolation") -> None:
    """Log a :func:`~lightning_hessian.linear_interpolation` result.

    Scalars ``<name>/barrier_height/<split>``, ``<name>/distance``, ``<name>/norm_a`` and
    ``<name>/norm_b`` go to every logger; TensorBoard also gets the figure ``<name>/curve`` and the
    table as text ``<name>/table``; W&B gets a ``wandb.Table``, a line plot of the loss against alpha
    and the figure.

    Args:
        result: what ``linear_interpolation`` returned.
        loggers: Lightning loggers (e.g. ``trainer.loggers``).
        step: the step to log at.
        name: the tag prefix.
    """
    scalars = {f"{name}/barrier_height/{s}": result.barrier_height(s) for s in result.splits}
    scalars.update({f"{name}/distance": result.distance, f"{name}/norm_a": result.norm_a,
                    f"{name}/norm_b": result.norm_b})
    log_metrics(loggers, scalars, step)
    figure = result.figure()
    log_figure(loggers, f"{name}/curve", figure, step)
    log_text(loggers, f"{name}/table", result.to_markdown(), step)
    for logger in loggers:
        if isinstance(logger, WANDB_LOGGERS):
            import wandb

            columns = ["alpha", "split", "loss", "accuracy"]
            logger.log_table(key=f"{name}/table", columns=columns, data=[[r[c] for c in columns] for r in result.rows])
            curves = [result.values(s) for s in result.splits]
            plot = wandb.plot.line_series(xs=list(result.alphas), ys=curves, keys=list(result.splits),
                                          title=f"{name}: loss", xname="alpha")
            logger.log_metrics({f"{name}/loss_curve": plot}, step=step)


def json_ready(value: Any, *, significant_digits: int | None = None) -> Any:
    """A copy fit for strict JSON: tensors as lists, non-finite floats as ``None``, floats rounded if asked.

    Example:
        >>> json_ready({"a": float("nan"), "b": [1.23456789]}, significant_digits=3)
        {'a': None, 'b': [1.23]}
    """
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist(), significant_digits=significant_digits)
    if isinstance(value, Mapping):
        return {str(k): json_ready(v, significant_digits=significant_digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, significant_digits=significant_digits) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{significant_digits}g}") if significant_digits is not None else value
    return value


def write_json(path: str | os.PathLike, payload: Any, *, significant_digits: int | None = None) -> None:
    """Write ``payload`` as strict JSON (NaN and infinities as ``null``), creating the folder."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_ready(payload, significant_digits=significant_digits), handle, allow_nan=False, indent=1)
