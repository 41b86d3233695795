"""Turn a measurement into logger calls: the one place that knows TensorBoard, W&B and CSV.

A measurement arrives as the plain record the callback keeps in its history (see
:class:`~lightning_hessian.callback.HessianSpectrumCallback`); this module names the tags
(DESIGN.md, "What gets logged"), sends scalars to every logger and into
``trainer.callback_metrics``, draws the density as a TensorBoard or W&B histogram and the spectrum
as a matplotlib figure, and writes the history file.

Tags: the Hessian's quantities are under ``hessian/``, the Gauss-Newton matrix's under
``hessian/ggn/``, a layer block's top eigenvalue under ``<prefix>/layer/<name>/eig_1``, its trace
and share of the top eigenvector under ``<prefix>/layer/<name>/trace`` and ``.../eig_1_mass``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_hessian._compat import TENSORBOARD_LOGGERS, WANDB_LOGGERS
from lightning_hessian.engine import SpectralDensity

PREFIX = "hessian"
GGN_KEY = "ggn"
# Bins of the density histogram: fine enough to show the outliers apart from the bulk, coarse
# enough that TensorBoard's rebinning (about 30 buckets on screen) has something to merge.
NUM_BINS = 200
# The figure's log-scaled density axis stops this far below the peak.
_FLOOR_FRACTION = 1e-6
# 512 x 320 pixels: readable in TensorBoard's image panel, and a third cheaper to render than 100 dpi.
_DPI = 80
# Per-matrix quantities logged as ``<prefix>/<name>`` when present in the record.
_SCALARS = ("eig_min", "trace", "outliers", "near_zero_fraction", "negative_mass")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _matrix_metrics(fields: Mapping[str, Any], prefix: str, lr: float | None) -> dict[str, float]:
    metrics = {f"{prefix}/eig_{i}": float(v) for i, v in enumerate(fields.get("eigenvalues", []), start=1)}
    metrics.update({f"{prefix}/{name}": float(fields[name]) for name in _SCALARS if _finite(fields.get(name))})
    residuals = list(fields.get("residuals", []))
    if _finite(fields.get("eig_min_residual")):
        residuals.append(fields["eig_min_residual"])
    for name, layer in fields.get("layers", {}).items():
        metrics[f"{prefix}/layer/{name}/eig_1"] = float(layer["eigenvalue"])
        residuals.append(layer["residual"])
    for name, view in fields.get("layer_views", {}).items():
        metrics[f"{prefix}/layer/{name}/trace"] = float(view["trace"])
        metrics[f"{prefix}/layer/{name}/eig_1_mass"] = float(view["eig_1_mass"])
    if _finite(fields.get("grad_overlap")):
        metrics[f"{prefix}/grad_overlap"] = float(fields["grad_overlap"])
    if residuals:
        metrics[f"{prefix}/max_residual"] = float(max(residuals))
    if lr is not None and fields.get("eigenvalues"):
        metrics[f"{prefix}/sharpness_x_lr"] = float(fields["eigenvalues"][0]) * lr
    return metrics


def scalar_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalar tags of one measurement record, ``{tag: value}``; NaN quantities are left out.

    Args:
        record: a measurement as kept in ``HessianSpectrumCallback.history``.

    Returns:
        ``hessian/eig_1``, ..., ``hessian/trace``, ..., ``hessian/ggn/...`` when the Gauss-Newton
        matrix was measured, and the call's ``hessian/matvecs``, ``hessian/seconds``,
        ``hessian/overhead`` and ``hessian/nonfinite`` (0).
    """
    lr = record.get("lr")
    metrics = _matrix_metrics(record, PREFIX, lr)
    if GGN_KEY in record:
        metrics.update(_matrix_metrics(record[GGN_KEY], f"{PREFIX}/{GGN_KEY}", lr))
    for name in ("matvecs", "seconds", "overhead"):
        if _finite(record.get(name)):
            metrics[f"{PREFIX}/{name}"] = float(record[name])
    metrics[f"{PREFIX}/nonfinite"] = 0.0
    return metrics


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger (rank 0) and into ``trainer.callback_metrics`` (every rank).

    ``callback_metrics`` is filled on every rank so that ``ModelCheckpoint`` and ``EarlyStopping``
    monitoring a ``hessian/`` tag decide alike on all ranks.
    """
    device = trainer.strategy.root_device
    trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in metrics.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)


def log_hyperparams(trainer: Any, params: Mapping[str, Any]) -> None:
    """Log the callback's settings once, as hyperparameters, to every logger (rank 0)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(params))


def density_of(fields: Mapping[str, Any]) -> SpectralDensity | None:
    """The SLQ density stored in a record's matrix fields, or ``None`` when none was measured."""
    if "nodes" not in fields:
        return None
    return SpectralDensity(
        nodes=torch.tensor(fields["nodes"], dtype=torch.float64),
        weights=torch.tensor(fields["weights"], dtype=torch.float64),
        trace=fields["trace"],
        trace_stderr=fields["trace_stderr"],
        num_params=fields["num_params"],
        num_matvecs=0,
        seconds=0.0,
    )


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


def spectrum_figure(eigenvalues: list[float], density: SpectralDensity | None, title: str) -> Any:
    """A matplotlib figure: the smoothed density on a log scale and the top eigenvalues as markers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    figure = Figure(figsize=(6.4, 4.0), dpi=_DPI)
    # Fixed margins and no minor ticks: constrained layout and log-axis minor ticks made up 80% of a
    # call's logging time on the digits MLP (0.4 s of 0.5 s per figure).
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
        axes.vlines(eigenvalues, 0, 1, transform=axes.get_xaxis_transform(), colors="tab:red",
                    linestyles="dotted", label=f"top {len(eigenvalues)} eigenvalues")
    axes.minorticks_off()
    # Plain "1e-05" labels: the default mathtext ones ("$10^{-5}$") cost a parser run per label.
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.set_xlabel("eigenvalue")
    axes.set_title(title)
    axes.legend(loc="upper right")
    return figure


def log_spectra(trainer: Any, record: Mapping[str, Any], step: int) -> None:
    """Density histograms and spectrum figures for the loggers that can show them (rank 0).

    TensorBoard gets ``<prefix>/density`` through ``add_histogram_raw`` and ``<prefix>/spectrum``
    through ``add_figure``; W&B gets a ``wandb.Histogram`` and a ``wandb.Image`` of the figure.
    Other loggers get nothing here (they have the scalars).
    """
    rich = [lg for lg in trainer.loggers if isinstance(lg, TENSORBOARD_LOGGERS + WANDB_LOGGERS)]
    if not trainer.is_global_zero or not rich:
        return
    matrices = [(PREFIX, record)]
    if GGN_KEY in record:
        matrices.append((f"{PREFIX}/{GGN_KEY}", record[GGN_KEY]))
    for prefix, fields in matrices:
        density = density_of(fields)
        figure = spectrum_figure(fields.get("eigenvalues", []), density, f"{prefix} spectrum, step {step}")
        histogram = density_histogram(density) if density is not None else None
        for logger in rich:
            if isinstance(logger, TENSORBOARD_LOGGERS):
                _tensorboard(logger.experiment, prefix, histogram, figure, step)
            else:
                _wandb(logger.experiment, prefix, histogram, figure, step)


def _tensorboard(writer: Any, prefix: str, histogram: Any, figure: Any, step: int) -> None:
    if histogram is not None:
        edges, counts = histogram
        centres = (edges[1:] + edges[:-1]) / 2
        writer.add_histogram_raw(
            f"{prefix}/density",
            min=float(edges[0]),
            max=float(edges[-1]),
            num=float(counts.sum()),
            sum=float((counts * centres).sum()),
            sum_squares=float((counts * centres**2).sum()),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
    writer.add_figure(f"{prefix}/spectrum", figure, global_step=step, close=False)


def _wandb(run: Any, prefix: str, histogram: Any, figure: Any, step: int) -> None:
    import wandb

    payload: dict[str, Any] = {f"{prefix}/spectrum": wandb.Image(figure), "trainer/global_step": step}
    if histogram is not None:
        edges, counts = histogram
        payload[f"{prefix}/density"] = wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
    run.log(payload)


def _plain(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become ``None``, tensors become lists."""
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_history(path: str, payload: Mapping[str, Any]) -> None:
    """Write the measurement history as strict JSON (NaN and infinities as ``null``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_plain(payload), handle, allow_nan=False, indent=1)
