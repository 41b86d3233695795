"""The one place that talks to loggers: TensorBoard, W&B, CSV, any Lightning logger.

It sends scalars to every logger and into ``trainer.callback_metrics``, the density's histograms
and the spectrum's figure to the loggers that can show them, and logs the results of
:func:`lightning_hessian.linear_interpolation` and of the paper's experiments. Everything it reads
is typed ([`Measurement`][lightning_hessian.measurement.Measurement],
[`InterpolationResult`][lightning_hessian.interpolation.InterpolationResult]); plain values appear
only in what it writes. The tag names are those of :mod:`lightning_hessian.loggers.tags`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_hessian._compat import TENSORBOARD_LOGGERS, WANDB_LOGGERS
from lightning_hessian.loggers.figures import density_views, spectrum_figure
from lightning_hessian.loggers.tags import COST_TAGS, GGN, STABILITY_EDGE, scalar_metrics, tensorboard_layout
from lightning_hessian.loggers.tensorboard import add_histogram, write_tensorboard_layout
from lightning_hessian.loggers.wandb import log_spectrum, wandb_define_metrics
from lightning_hessian.measurement import Measurement

if TYPE_CHECKING:
    from lightning_hessian.interpolation import InterpolationResult





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
    """Scalars of one call to every logger and ``callback_metrics``; at snapshots, histograms and figures
    where shown.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> from lightning_hessian.measurement import MatrixMeasurement
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> hessian = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> call = Measurement(7, 0, "fit", "eval", "float32", 16, 0.1, 0.5, 20, hessian=hessian)
        >>> log_measurement(trainer, call, "hessian")
        >>> trainer.callback_metrics["hessian/eig_1"], trainer.logger.experiment.metrics[0]["step"]
        (tensor(2.), 7)
    """
    log_scalars(trainer, scalar_metrics(measurement, prefix), measurement.step)
    if measurement.snapshot:
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


def log_run_start(trainer: Any, prefix: str, *, k: int, matrix: str = "hessian", density: bool = True) -> None:
    """What the loggers need once per run, before the first measurement is logged (rank 0).

    TensorBoard gets the custom-scalars layout of :func:`tensorboard_layout` (its "Custom Scalars"
    tab: the top-k on one chart, eig_1 of H and G together, trace, outliers and cost); W&B gets the
    callback's tags defined against ``trainer/global_step`` (:func:`wandb_define_metrics`). Other
    loggers need nothing. Calling it again for the same writer and settings writes nothing.

    Args:
        trainer: the Trainer.
        prefix: the callback's ``name``, the tag prefix.
        k: the number of top eigenvalues.
        matrix: ``"hessian"``, ``"ggn"`` or ``"both"``: the matrices measured.
        density: whether the density's tags are logged.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
        >>> logger = TensorBoardLogger(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
        >>> log_run_start(trainer, "hessian", k=3)
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
            write_tensorboard_layout(logger.experiment, tensorboard_layout(prefix, k=k, matrix=matrix, density=density))
        elif isinstance(logger, WANDB_LOGGERS):
            wandb_define_metrics(logger.experiment, prefix)


def log_hyperparams(trainer: Any, params: Mapping[str, Any]) -> None:
    """Log settings as hyperparameters to every logger (rank 0).

    Example:
        >>> import os, tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> trainer = pl.Trainer(logger=CSVLogger(tempfile.mkdtemp()), accelerator="cpu", enable_progress_bar=False)
        >>> log_hyperparams(trainer, {"hessian/k": 3})
        >>> trainer.logger.save()  # writes hparams.yaml
        >>> with open(os.path.join(trainer.logger.log_dir, "hparams.yaml")) as handle:
        ...     [line.strip() for line in handle if line.startswith("hessian/k:")]
        ['hessian/k: 3']
    """
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(params))


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
    keeps the last top k (``<prefix>/top_k``, with its step ``<prefix>/top_k_step``). TensorBoard also
    gets ``<prefix>/stability_edge`` (1) with each stability ratio, the edge line of its stability
    chart. Other loggers get nothing here (they have the scalars), and nothing is drawn for them.

    Example:
        >>> import tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from lightning_hessian.engine import SpectralDensity, SpectrumSummary
        >>> from lightning_hessian.measurement import MatrixMeasurement
        >>> logger = TensorBoardLogger(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
        >>> density = SpectralDensity(  # one probe: 3 of the P = 4 eigenvalues at 0, one at 2
        ...     nodes=torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.75, 0.25]], dtype=torch.float64),
        ...     trace=2.0, trace_stderr=0.0, num_params=4, num_matvecs=2, seconds=0.0,
        ...     deflated=torch.tensor([2.0], dtype=torch.float64), deflated_mask=torch.tensor([[False, True]]),
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
                    add_histogram(logger.experiment, f"{tag}/{view}", histogram, step)
                logger.experiment.add_figure(f"{tag}/spectrum", figure, global_step=step, close=False)
            else:
                log_spectrum(logger.experiment, tag, measured, views, figure, step)
    if measurement.stability is not None and measurement.stability.stability is not None:
        for logger in showing:
            if isinstance(logger, TENSORBOARD_LOGGERS):
                logger.experiment.add_scalar(f"{prefix}/{STABILITY_EDGE}", 1.0, global_step=step)


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
