"""What only W&B shows: tags defined against the trainer's step, and a call's spectrum payload."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_hessian.loggers.figures import Histogram
from lightning_hessian.loggers.tags import PEAK_TAGS, STEP_METRIC
from lightning_hessian.measurement import MatrixMeasurement


def wandb_define_metrics(run: Any, prefix: str) -> None:
    """Define every ``<prefix>/...`` tag of a W&B run against ``trainer/global_step``.

    W&B then draws them against the trainer's step (not its own call counter) and overlays runs
    compared in one workspace step for step. ``<prefix>/stability`` and ``<prefix>/eig_1`` keep their
    largest value over the run in the summary (``summary="max"``), so that the runs table and sweeps
    sort runs by their peak.

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
        hessian/stability {'step_metric': 'trainer/global_step', 'step_sync': True, 'summary': 'max'}
        hessian/eig_1 {'step_metric': 'trainer/global_step', 'step_sync': True, 'summary': 'max'}
    """
    run.define_metric(STEP_METRIC)
    run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC, step_sync=True)
    for tag in PEAK_TAGS:
        run.define_metric(f"{prefix}/{tag}", step_metric=STEP_METRIC, step_sync=True, summary="max")


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


def log_spectrum(run: Any, tag: str, measured: MatrixMeasurement,
                 views: Mapping[str, Histogram], figure: Any, step: int) -> None:
    """One matrix's spectrum to a W&B run: the figure as an image, the histograms, the top k as a table
    and a line plot, and the last top k in the run's summary.

    Example:
        >>> from matplotlib.figure import Figure
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> class Run:  # stands in for a wandb Run: prints what is logged
        ...     summary = {}
        ...     def log(self, payload):
        ...         print(sorted(payload))
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> measured = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> run = Run()
        >>> log_spectrum(run, "hessian", measured, {}, Figure(figsize=(2, 2)), step=3)
        ['hessian/spectrum', 'hessian/spectrum_line', 'hessian/spectrum_table', 'trainer/global_step']
        >>> run.summary
        {'hessian/top_k': [2.0, 0.5], 'hessian/top_k_step': 3}
    """
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
