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
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_hessian._compat import TENSORBOARD_LOGGERS, WANDB_LOGGERS
from lightning_hessian.callback.config import CallbackConfig
from lightning_hessian.engine import SpectralDensity
from lightning_hessian.engine.density import DEFAULT_SIGMA_FRACTION
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
        "eig_error_bound": measured.max_error_bound,
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

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> hessian = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> call = Measurement(0, 0, "fit", "eval", "float32", 16, 0.1, 0.5, 20, hessian=hessian)
        >>> metrics = scalar_metrics(call)
        >>> metrics["hessian/eig_1"], metrics["hessian/sharpness_x_lr"], metrics["hessian/matvecs"]
        (2.0, 0.2, 20.0)
        >>> sorted(tag for tag in metrics if tag not in matrix_metrics(hessian, "hessian", lr=0.1))
        ['hessian/matvecs', 'hessian/nonfinite', 'hessian/seconds']
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
    """Send scalars to each of ``loggers`` at ``step``.

    Example:
        >>> import csv, tempfile
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> logger = CSVLogger(tempfile.mkdtemp())
        >>> log_metrics([logger], {"hessian/eig_1": 2.0}, step=5)
        >>> logger.save()
        >>> with open(logger.experiment.metrics_file_path) as handle:
        ...     list(csv.DictReader(handle))
        [{'hessian/eig_1': '2.0', 'step': '5'}]
    """
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger (rank 0) and into ``trainer.callback_metrics`` (every rank).

    ``callback_metrics`` is filled on every rank so that ``ModelCheckpoint`` and ``EarlyStopping``
    monitoring a tag decide alike on all ranks.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> log_scalars(trainer, {"hessian/eig_1": 2.0}, step=5)
        >>> trainer.callback_metrics
        {'hessian/eig_1': tensor(2.)}
        >>> trainer.logger.experiment.metrics  # what the CSV logger writes on save()
        [{'hessian/eig_1': 2.0, 'step': 5}]
    """
    device = trainer.strategy.root_device
    trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in metrics.items()})
    if trainer.is_global_zero:
        log_metrics(trainer.loggers, metrics, step)


def log_measurement(trainer: Any, measurement: Measurement, prefix: str) -> None:
    """Scalars of one call to every logger and ``callback_metrics``; histograms and figures where shown.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> hessian = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> call = Measurement(7, 0, "fit", "eval", "float32", 16, 0.1, 0.5, 20, hessian=hessian)
        >>> log_measurement(trainer, call, "hessian")
        >>> trainer.callback_metrics["hessian/eig_1"], trainer.logger.experiment.metrics[0]["step"]
        (tensor(2.), 7)
    """
    log_scalars(trainer, scalar_metrics(measurement, prefix), measurement.step)
    log_spectra(trainer, measurement, prefix)


def log_no_spectrum(trainer: Any, prefix: str, step: int, costs: Mapping[str, float]) -> None:
    """A call without a spectrum: the cost tags are logged, the spectral tags in ``callback_metrics`` turn NaN.

    A ``ModelCheckpoint`` or ``EarlyStopping`` monitoring ``<prefix>/eig_1`` then sees that this call
    measured nothing, instead of the last finite value.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> log_scalars(trainer, {"hessian/eig_1": 2.0, "hessian/seconds": 0.5}, step=0)
        >>> log_no_spectrum(trainer, "hessian", step=10, costs={"seconds": 0.25, "nonfinite": 1})
        >>> trainer.callback_metrics
        {'hessian/eig_1': tensor(nan), 'hessian/seconds': tensor(0.2500), 'hessian/nonfinite': tensor(1.)}
        >>> trainer.logger.experiment.metrics[-1]
        {'hessian/seconds': 0.25, 'hessian/nonfinite': 1.0, 'step': 10}
    """
    stale = [key for key in trainer.callback_metrics
             if key.startswith(f"{prefix}/") and key.rsplit("/", 1)[-1] not in COST_TAGS]
    trainer.callback_metrics.update({key: torch.tensor(float("nan")) for key in stale})
    log_scalars(trainer, {f"{prefix}/{name}": float(value) for name, value in costs.items()}, step)


# Step metric of every tag in W&B: the trainer's optimizer steps, which Lightning's WandbLogger logs
# with each call of log_metrics.
STEP_METRIC = "trainer/global_step"
# The custom-scalars layout written so far to each SummaryWriter. TensorBoard reads one layout per run
# (the last one written), so a second callback in the same Trainer adds its categories to the first one's.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = weakref.WeakKeyDictionary()


def log_run_start(trainer: Any, config: CallbackConfig) -> None:
    """What the loggers need once per run, before the first measurement is logged (rank 0).

    TensorBoard gets the custom-scalars layout of :func:`tensorboard_layout` (its "Custom Scalars"
    tab: the top-k on one chart, eig_1 of H and G together, trace, outliers and cost); W&B gets the
    callback's tags defined against ``trainer/global_step`` (:func:`wandb_define_metrics`). Other
    loggers need nothing. Calling it again for the same writer and settings writes nothing.

    Args:
        trainer: the Trainer.
        config: the callback's settings (its ``name`` is the tag prefix, ``k`` the number of top
            eigenvalues, ``matrix`` which matrices are measured).

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
        >>> logger = TensorBoardLogger(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
        >>> log_run_start(trainer, CallbackConfig(k=3))
        >>> logger.experiment.flush()
        >>> events = EventAccumulator(logger.log_dir)
        >>> _ = events.Reload()
        >>> (written,) = events.Tensors("custom_scalars__config__")
        >>> [category.title for category in Layout.FromString(written.tensor_proto.string_val[0]).category]
        ['hessian: spectrum', 'hessian: cost']
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TENSORBOARD_LOGGERS):
            write_tensorboard_layout(logger.experiment, tensorboard_layout(config))
        elif isinstance(logger, WANDB_LOGGERS):
            wandb_define_metrics(logger.experiment, config.name)


def _chart(tags: Iterable[str]) -> list[Any]:
    """A multi-line chart of the given tags, each as an anchored regular expression (one tag exactly)."""
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


def tensorboard_layout(config: CallbackConfig) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of one callback, as ``SummaryWriter.add_custom_scalars`` takes it.

    Two categories, ``"<prefix>: spectrum"`` and ``"<prefix>: cost"``, of multi-line charts
    ``{title: ["Multiline", [tag regex, ...]]}``. Each regex is one tag, anchored
    (``^hessian/eig_1$``), so that ``eig_1`` does not also draw ``eig_10``. Charts: the top k of each
    matrix measured; with ``matrix="both"`` eig_1 of H and of the Gauss-Newton matrix G together;
    eig_1 times the learning rate (2 is the edge of stability of gradient descent); with the density
    the trace and the mass near and below zero; the outlier count; and the cost of a call (seconds,
    products, overhead).

    Args:
        config: the callback's settings (``name``, ``k``, ``matrix``, ``density``).

    Example:
        >>> layout = tensorboard_layout(CallbackConfig(k=2, matrix="both"))
        >>> layout["hessian: spectrum"]["top-2 eigenvalues of H"]
        ['Multiline', ['^hessian/eig_1$', '^hessian/eig_2$']]
        >>> layout["hessian: spectrum"]["eig_1 of H and G"]
        ['Multiline', ['^hessian/eig_1$', '^hessian/ggn/eig_1$']]
        >>> sorted(layout["hessian: cost"])
        ['Hessian-vector products per call', 'overhead (fraction of training time)', 'seconds per call']
    """
    prefix = config.name
    measured = {"hessian": (prefix, "H"), "ggn": (f"{prefix}/{GGN}", "G (Gauss-Newton)")}
    tags = [measured[m] for m in ("hessian", "ggn") if config.matrix in (m, "both")]
    spectrum = {f"top-{config.k} eigenvalues of {name}": _chart(f"{tag}/eig_{i}" for i in range(1, config.k + 1))
                for tag, name in tags}
    if len(tags) == 2:
        spectrum["eig_1 of H and G"] = _chart(f"{tag}/eig_1" for tag, _ in tags)
    spectrum["eig_1 x learning rate (edge of stability: 2)"] = _chart(f"{tag}/sharpness_x_lr" for tag, _ in tags)
    spectrum["outlier count"] = _chart(f"{tag}/outliers" for tag, _ in tags)
    if config.density:
        spectrum["trace"] = _chart(f"{tag}/trace" for tag, _ in tags)
        spectrum["spectral mass near zero and below zero"] = _chart(
            f"{tag}/{quantity}" for tag, _ in tags for quantity in ("near_zero_fraction", "negative_mass"))
    cost = {
        "seconds per call": _chart([f"{prefix}/seconds"]),
        "Hessian-vector products per call": _chart([f"{prefix}/matvecs"]),
        "overhead (fraction of training time)": _chart([f"{prefix}/overhead"]),
    }
    return {f"{prefix}: spectrum": spectrum, f"{prefix}: cost": cost}


def write_tensorboard_layout(writer: Any, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Add ``layout``'s categories to what ``writer`` (a ``SummaryWriter``) shows in "Custom Scalars".

    The layout is merged with those written before to the same writer (a chart of the same category
    and title is replaced) and written again only when that changes something.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
        >>> writer = SummaryWriter(tempfile.mkdtemp())
        >>> write_tensorboard_layout(writer, {"run": {"loss": ["Multiline", ["^train/loss$", "^val/loss$"]]}})
        >>> write_tensorboard_layout(writer, tensorboard_layout(CallbackConfig(k=2)))
        >>> write_tensorboard_layout(writer, tensorboard_layout(CallbackConfig(k=2)))  # nothing new: not written
        >>> writer.flush()
        >>> events = EventAccumulator(writer.log_dir)
        >>> _ = events.Reload()
        >>> written = events.Tensors("custom_scalars__config__")
        >>> len(written), [c.title for c in Layout.FromString(written[-1].tensor_proto.string_val[0]).category]
        (2, ['run', 'hessian: spectrum', 'hessian: cost'])
    """
    written = _LAYOUTS.get(writer, {})
    merged = {category: dict(charts) for category, charts in written.items()}
    for category, charts in layout.items():
        merged.setdefault(category, {}).update(charts)
    if merged != written:
        writer.add_custom_scalars(merged)
        _LAYOUTS[writer] = merged


def wandb_define_metrics(run: Any, prefix: str) -> None:
    """Define every ``<prefix>/...`` tag of a W&B run against ``trainer/global_step``.

    W&B then draws them against the trainer's step (not its own call counter) and overlays runs
    compared in one workspace step for step.

    Args:
        run: a ``wandb`` Run (``WandbLogger.experiment``).
        prefix: the callback's ``name``.

    Example:
        >>> class Run:  # stands in for a wandb Run: prints what is defined
        ...     def define_metric(self, name, **options):
        ...         print(name, options)
        >>> wandb_define_metrics(Run(), "hessian")
        trainer/global_step {}
        hessian/* {'step_metric': 'trainer/global_step', 'step_sync': True}
    """
    run.define_metric(STEP_METRIC)
    run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC, step_sync=True)


def log_hyperparams(trainer: Any, params: Mapping[str, Any]) -> None:
    """Log settings as hyperparameters to every logger (rank 0).

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> log_hyperparams(trainer, CallbackConfig(k=3).hparams())
        >>> trainer.logger.save()  # writes hparams.yaml
        >>> with open(os.path.join(trainer.logger.log_dir, "hparams.yaml")) as handle:
        ...     [line.strip() for line in handle if line.startswith("hessian/k:")]
        ['hessian/k: 3']
    """
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

    Example:
        >>> density = SpectralDensity(  # one probe: 3 of the P = 4 eigenvalues at 0, one at 2
        ...     nodes=torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.75, 0.25]], dtype=torch.float64),
        ...     trace=2.0, trace_stderr=0.0, num_params=4, num_matvecs=2, seconds=0.0,
        ... )
        >>> edges, counts = density_histogram(density)
        >>> edges.shape, counts.shape
        (torch.Size([201]), torch.Size([200]))
        >>> round(float(counts[edges[1:] <= 1.0].sum()), 1), round(float(counts.sum()), 1)
        (3.0, 4.0)
    """
    edges = density.grid(num_points=num_bins + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    counts = density.density(centres) * (edges[1] - edges[0]) * density.num_params
    return edges, counts


Histogram = tuple[torch.Tensor, torch.Tensor]
"""``(edges, counts)``: ``(num_bins + 1,)`` bin edges and ``(num_bins,)`` counts of eigenvalues, float64."""


def deflated_columns(density: SpectralDensity, eigenvalues: Sequence[float]) -> torch.Tensor | None:
    """Where the exactly placed top eigenvalues sit among the SLQ nodes, or ``None`` if they are not there.

    With deflation (the callback deflates its top k when all converged) every probe's row holds each
    of the k eigenvalues once, as a node of weight ``1/P``.

    Returns:
        ``(S, m + k)`` bool, true at those k columns of every row; ``None`` when the density was
        estimated without deflating ``eigenvalues``.

    Example:
        >>> from lightning_hessian.engine import spectral_density, top_eigenvalues
        >>> from lightning_hessian.engine.eigen import DiagonalOperator
        >>> op = DiagonalOperator([0.0] * 6 + [1.0, 5.0])
        >>> top = top_eigenvalues(op, k=1)
        >>> density = spectral_density(op, num_probes=2, num_steps=3, deflate=top)
        >>> deflated_columns(density, top.eigenvalues.tolist())  # 5 is the last node of both probes
        tensor([[False, False, False,  True],
                [False, False, False,  True]])
        >>> deflated_columns(density, [4.0]) is None
        True
    """
    if not eigenvalues:
        return None
    exact = torch.tensor(list(eigenvalues), dtype=torch.float64)
    nodes, weights = density.nodes.to(torch.float64), density.weights.to(torch.float64)
    is_value = torch.isclose(nodes[..., None], exact, rtol=1e-12, atol=0.0).any(dim=-1)
    point_mass = torch.tensor(1.0 / density.num_params, dtype=torch.float64)
    mask = is_value & torch.isclose(weights, point_mass, rtol=1e-9, atol=0.0)
    return mask if bool((mask.sum(dim=1) == exact.numel()).all()) else None


def bulk_histogram(density: SpectralDensity, eigenvalues: Sequence[float],
                   num_bins: int = NUM_BINS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The P - k eigenvalues below the deflated top k, as a histogram over their own range.

    Computed from the raw SLQ nodes and weights with the k exact nodes left out: each remaining node
    spreads its weight over the bins as a Gaussian of width 1% of the bulk's range (the same kernel as
    :meth:`~lightning_hessian.engine.SpectralDensity.density`, integrated over each bin), times P.
    The range is the bulk's, not the whole spectrum's, so the bulk keeps its shape instead of one bin.

    Args:
        density: an SLQ estimate.
        eigenvalues: the top k (``MatrixMeasurement.eigenvalues``).
        num_bins: number of bins.

    Returns:
        ``(edges, counts)`` as in :func:`density_histogram`, the counts summing to about P - k;
        ``None`` when the top k were not deflated (then the SLQ nodes estimate them too, and no
        bulk can be told apart honestly).

    Example:
        >>> nodes = torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64)  # 8 eigenvalues: 0 (x6), 1 and 5
        >>> weights = torch.tensor([[6 / 8, 1 / 8, 1 / 8]], dtype=torch.float64)  # 5 placed exactly
        >>> density = SpectralDensity(nodes, weights, trace=6.0, trace_stderr=0.0, num_params=8, num_matvecs=0,
        ...                           seconds=0.0)
        >>> edges, counts = bulk_histogram(density, [5.0])
        >>> round(float(counts.sum()), 1), round(float(edges[0]), 2), round(float(edges[-1]), 2)  # 7 in [0, 1]
        (7.0, -0.03, 1.03)
        >>> bulk_histogram(density, [4.0]) is None  # not deflated: no bulk to tell apart
        True
    """
    mask = deflated_columns(density, eigenvalues)
    if mask is None:
        return None
    nodes, weights = density.nodes.to(torch.float64), density.weights.to(torch.float64).masked_fill(mask, 0.0)
    bulk = nodes[~mask]
    if bulk.numel() == 0:
        return None
    low, high = float(bulk.min()), float(bulk.max())
    sigma = DEFAULT_SIGMA_FRACTION * max(high - low, abs(high), abs(low), 1e-12)
    edges = torch.linspace(low - 3 * sigma, high + 3 * sigma, num_bins + 1, dtype=torch.float64)
    counts = torch.zeros(num_bins, dtype=torch.float64)
    for row_nodes, row_weights in zip(nodes, weights, strict=True):  # one probe at a time: (m + k, bins) each
        cdf = torch.special.ndtr((edges[None, :] - row_nodes[:, None]) / sigma)
        counts += row_weights @ (cdf[:, 1:] - cdf[:, :-1])
    return edges, counts * density.num_params / nodes.shape[0]


def top_k_histogram(eigenvalues: Sequence[float], num_bins: int = NUM_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k eigenvalues as point masses: a histogram in which each adds one count to its bin.

    Args:
        eigenvalues: the top k, any order.
        num_bins: number of equal bins from the smallest to the largest (padded by 1% of the span).

    Returns:
        ``(edges, counts)`` as in :func:`density_histogram`; the counts sum to k.

    Example:
        >>> edges, counts = top_k_histogram([4.0, 1.0, 0.9], num_bins=4)
        >>> counts.tolist()
        [2.0, 0.0, 0.0, 1.0]
    """
    values = torch.tensor(list(eigenvalues), dtype=torch.float64)
    low, high = float(values.min()), float(values.max())
    pad = 0.01 * max(high - low, abs(high), 1e-12)
    edges = torch.linspace(low - pad, high + pad, num_bins + 1, dtype=torch.float64)
    bins = (torch.bucketize(values, edges, right=True) - 1).clamp(0, num_bins - 1)
    return edges, torch.bincount(bins, minlength=num_bins).to(torch.float64)


def density_views(measured: MatrixMeasurement, num_bins: int = NUM_BINS) -> dict[str, Histogram]:
    """The histograms logged for one matrix, by tag suffix; all count eigenvalues.

    - ``density``: the whole spectrum (:func:`density_histogram`), with the density on. On a trained
      network it is one spike at zero holding nearly all P eigenvalues: the outliers, one count
      each, do not show on its linear axis.
    - ``density/bulk``: the P - k eigenvalues below the top k over their own range
      (:func:`bulk_histogram`), with the density on and the top k deflated.
    - ``density/top_k``: the top k as point masses, one count each (:func:`top_k_histogram`), always.
      The outliers stand apart from the rest of the top k here, in a view no bulk can swamp.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> from lightning_hessian.engine import spectral_density, top_eigenvalues
        >>> from lightning_hessian.engine.eigen import DiagonalOperator
        >>> op = DiagonalOperator([0.0] * 6 + [1.0, 5.0])
        >>> top = top_eigenvalues(op, k=1)
        >>> density = spectral_density(op, num_probes=2, num_steps=3, deflate=top)
        >>> summary = SpectrumSummary(1, 5.0, 1.0, 0.75, 0.0)
        >>> measured = MatrixMeasurement("hessian", 8, (5.0,), (0.0,), (True,), 6, summary, density=density)
        >>> {tag: round(float(counts.sum()), 1) for tag, (edges, counts) in density_views(measured).items()}
        {'density': 8.0, 'density/bulk': 7.0, 'density/top_k': 1.0}
    """
    views: dict[str, Histogram] = {}
    if measured.density is not None:
        views["density"] = density_histogram(measured.density, num_bins)
        bulk = bulk_histogram(measured.density, measured.eigenvalues, num_bins)
        if bulk is not None:
            views["density/bulk"] = bulk
    if measured.eigenvalues:
        views["density/top_k"] = top_k_histogram(measured.eigenvalues, num_bins)
    return views


def spectrum_figure(eigenvalues: Sequence[float], density: SpectralDensity | None, title: str) -> Any:
    """A matplotlib figure: the smoothed density on a log scale and the top eigenvalues as markers.

    Example:
        >>> density = SpectralDensity(  # one probe: 3 of the P = 4 eigenvalues at 0, one at 2
        ...     nodes=torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.75, 0.25]], dtype=torch.float64),
        ...     trace=2.0, trace_stderr=0.0, num_params=4, num_matvecs=2, seconds=0.0,
        ... )
        >>> axes = spectrum_figure([2.0], density, "hessian spectrum, step 0").axes[0]
        >>> axes.get_title(), axes.get_yscale(), axes.get_legend_handles_labels()[1]
        ('hessian spectrum, step 0', 'log', ['density (SLQ)', 'top 1 eigenvalues'])
    """
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
    """Density histograms, spectrum figures and tables for the loggers that can show them (rank 0).

    TensorBoard gets the histograms of :func:`density_views` (``<prefix>/density``,
    ``<prefix>/density/bulk``, ``<prefix>/density/top_k``) through ``add_histogram_raw`` and
    ``<prefix>/spectrum`` through ``add_figure``. W&B gets the same histograms as ``wandb.Histogram``,
    the figure as a ``wandb.Image``, the top k as a ``wandb.Table`` (``<prefix>/spectrum_table``) and
    as a line plot of eigenvalue against index (``<prefix>/spectrum_line``), and the run summary
    keeps the last top k (``<prefix>/top_k``, with its step ``<prefix>/top_k_step``). Other loggers
    get nothing here (they have the scalars), and nothing is drawn for them.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> logger = TensorBoardLogger(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
        >>> density = SpectralDensity(  # one probe: 3 of the P = 4 eigenvalues at 0, one at 2
        ...     nodes=torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.75, 0.25]], dtype=torch.float64),
        ...     trace=2.0, trace_stderr=0.0, num_params=4, num_matvecs=2, seconds=0.0,
        ... )
        >>> summary = SpectrumSummary(1, 2.0, 0.0, 0.75, 0.0)
        >>> hessian = MatrixMeasurement("hessian", 4, (2.0,), (0.0,), (True,), 2, summary, density=density)
        >>> call = Measurement(3, 0, "fit", "eval", "float64", 4, 0.1, 0.1, 2, hessian=hessian)
        >>> log_spectra(trainer, call, "hessian")
        >>> logger.experiment.flush()
        >>> events = EventAccumulator(logger.log_dir)
        >>> _ = events.Reload()
        >>> sorted(events.Tags()["histograms"]), events.Tags()["images"]
        (['hessian/density', 'hessian/density/bulk', 'hessian/density/top_k'], ['hessian/spectrum'])
    """
    showing = _showing(trainer.loggers)
    if not trainer.is_global_zero or not showing:
        return
    step = measurement.step
    for name, measured in measurement.matrices.items():
        tag = prefix if name == "hessian" else f"{prefix}/{GGN}"
        figure = spectrum_figure(measured.eigenvalues, measured.density, f"{tag} spectrum, step {step}")
        views = density_views(measured)
        for logger in showing:
            if isinstance(logger, TENSORBOARD_LOGGERS):
                for view, histogram in views.items():
                    _tensorboard_histogram(logger.experiment, f"{tag}/{view}", histogram, step)
                logger.experiment.add_figure(f"{tag}/spectrum", figure, global_step=step, close=False)
            else:
                _wandb_spectrum(logger.experiment, tag, measured, views, figure, step)


def _tensorboard_histogram(writer: Any, tag: str, histogram: Any, step: int) -> None:
    if histogram is None:
        return
    edges, counts = histogram
    centres = (edges[1:] + edges[:-1]) / 2
    filled = torch.nonzero(counts > 0).flatten()
    # TensorBoard drops empty buckets at both ends and stretches the outermost filled ones to min and
    # max: give it the filled range, so that a point mass keeps its narrow bucket.
    low, high = (int(filled[0]), int(filled[-1])) if filled.numel() else (0, counts.numel() - 1)
    writer.add_histogram_raw(
        tag, min=float(edges[low]), max=float(edges[high + 1]), num=float(counts.sum()),
        sum=float((counts * centres).sum()), sum_squares=float((counts * centres**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step,
    )


def spectrum_table(measured: MatrixMeasurement, step: int) -> tuple[list[str], list[list[Any]]]:
    """The top k of one call as table rows: ``(columns, rows)``, one row per eigenvalue.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> measured = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> spectrum_table(measured, step=3)
        (['step', 'index', 'eigenvalue', 'residual', 'converged'], [[3, 1, 2.0, 1e-07, True], [3, 2, 0.5, 1e-06, True]])
    """
    columns = ["step", "index", "eigenvalue", "residual", "converged"]
    rows = [[step, i, float(value), float(residual), bool(converged)] for i, (value, residual, converged)
            in enumerate(zip(measured.eigenvalues, measured.residuals, measured.converged, strict=True), start=1)]
    return columns, rows


def _wandb_spectrum(run: Any, tag: str, measured: MatrixMeasurement,
                    views: Mapping[str, Histogram], figure: Any, step: int) -> None:
    import wandb

    payload: dict[str, Any] = {f"{tag}/spectrum": wandb.Image(figure), STEP_METRIC: step}
    for view, (edges, counts) in views.items():
        payload[f"{tag}/{view}"] = wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
    if measured.eigenvalues:
        columns, rows = spectrum_table(measured, step)
        table = wandb.Table(columns=columns, data=rows)
        payload[f"{tag}/spectrum_table"] = table
        payload[f"{tag}/spectrum_line"] = wandb.plot.line(
            table, "index", "eigenvalue", title=f"{tag}: top {len(rows)} eigenvalues, step {step}")
    run.log(payload)
    if measured.eigenvalues:
        run.summary[f"{tag}/top_k"] = [float(v) for v in measured.eigenvalues]
        run.summary[f"{tag}/top_k_step"] = step


def log_figure(loggers: Sequence[Any], tag: str, figure: Any, step: int = 0) -> None:
    """A matplotlib figure to TensorBoard (``add_figure``) and W&B (an image), for those among ``loggers``.

    Example:
        >>> import tempfile
        >>> from matplotlib.figure import Figure
        >>> from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> tensorboard = TensorBoardLogger(tempfile.mkdtemp())
        >>> figure = Figure(figsize=(2, 2))
        >>> _ = figure.subplots().plot([0, 1], [1, 0])
        >>> log_figure([tensorboard, CSVLogger(tempfile.mkdtemp())], "curve", figure, step=4)  # CSV: no figures
        >>> tensorboard.experiment.flush()
        >>> events = EventAccumulator(tensorboard.log_dir)
        >>> _ = events.Reload()
        >>> [(image.step, image.width, image.height) for image in events.Images("curve")]
        [(4, 200, 200)]
    """
    for logger in _showing(loggers):
        if isinstance(logger, TENSORBOARD_LOGGERS):
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        else:
            import wandb

            logger.log_metrics({tag: wandb.Image(figure)}, step=step)


def log_text(loggers: Sequence[Any], tag: str, text: str, step: int = 0) -> None:
    """Markdown text to TensorBoard's text tab, for the TensorBoard loggers among ``loggers``.

    Example:
        >>> import tempfile
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> tensorboard = TensorBoardLogger(tempfile.mkdtemp())
        >>> log_text([tensorboard], "notes", "| alpha | loss |", step=2)
        >>> tensorboard.experiment.flush()
        >>> events = EventAccumulator(tensorboard.log_dir)
        >>> _ = events.Reload()
        >>> [(event.step, event.tensor_proto.string_val) for event in events.Tensors("notes/text_summary")]
        [(2, [b'| alpha | loss |'])]
    """
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

    Example:
        >>> import tempfile
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> from lightning_hessian.interpolation import InterpolationResult
        >>> losses = {0.0: 1.0, 0.5: 3.0, 1.0: 2.0}
        >>> result = InterpolationResult(
        ...     rows=[{"alpha": a, "split": "train", "loss": v, "accuracy": None} for a, v in losses.items()],
        ...     alphas=(0.0, 0.5, 1.0), splits=("train",), bn="none", norm_a=1.0, norm_b=2.0, distance=1.5,
        ...     num_params=4, labels=("start", "end"), seconds=0.1,
        ... )
        >>> logger = CSVLogger(tempfile.mkdtemp())
        >>> log_interpolation(result, [logger], step=10)  # CSV: the scalars only
        >>> logger.experiment.metrics  # doctest: +NORMALIZE_WHITESPACE
        [{'interpolation/barrier_height/train': 1.5, 'interpolation/distance': 1.5,
          'interpolation/norm_a': 1.0, 'interpolation/norm_b': 2.0, 'step': 10}]
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
    """Write ``payload`` as strict JSON (NaN and infinities as ``null``), creating the folder.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "runs", "history.json")  # the folder is created
        >>> write_json(path, {"eig_1": [2.123456, float("nan")]}, significant_digits=3)
        >>> with open(path) as handle:
        ...     json.load(handle)
        {'eig_1': [2.12, None]}
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_ready(payload, significant_digits=significant_digits), handle, allow_nan=False, indent=1)
