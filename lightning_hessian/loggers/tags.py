"""The tag schema: the names of every scalar a call logs, and the TensorBoard custom-scalars layout.

Tags, with ``<prefix>`` the callback's ``name`` (``hessian`` by default): the Hessian's quantities
are ``<prefix>/<quantity>``, the Gauss-Newton matrix's ``<prefix>/ggn/<quantity>``, a layer block's
top eigenvalue ``<prefix>/layer/<name>/eig_1``, a module's trace and share of the top eigenvector
``<prefix>/layer/<name>/trace`` and ``.../eig_1_mass``; the optimizer's edge of stability
``<prefix>/stability`` and its companions (:func:`stability_metrics`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from lightning_hessian.measurement import MatrixMeasurement, Measurement, Stability

GGN = "ggn"


# Cost tags of a call: they keep their values when a call yields no spectrum.
COST_TAGS = ("matvecs", "seconds", "overhead", "nonfinite", "skipped", "snapshot")
# Tags whose W&B summary is their largest value over the run, not the last: runs and sweeps sort by the peak.
PEAK_TAGS = ("stability", "eig_1")
# The constant 1 that TensorBoard draws next to <prefix>/stability: a custom-scalars chart has no
# horizontal line of its own.
STABILITY_EDGE = "stability_edge"


def matrix_metrics(measured: MatrixMeasurement, prefix: str, lr: float | None, *,
                   snapshot: bool = True) -> dict[str, float]:
    """The scalar tags of one matrix, ``{tag: value}``; quantities that are NaN or absent are left out.

    A snapshot logs every quantity, and its eig_1 once more as ``<prefix>/snapshot/eig_1`` (a marker on
    the top-k chart); a tracked call (``snapshot=False``) only the top eigenvalues, their residual and
    error bound, and eig_1 times the learning rate.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> measured = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> sorted(matrix_metrics(measured, "hessian", lr=0.1))[:4]
        ['hessian/eig_1', 'hessian/eig_2', 'hessian/max_residual', 'hessian/outliers']
    """
    metrics = {f"{prefix}/eig_{i}": float(v) for i, v in enumerate(measured.eigenvalues, start=1)}
    top = {
        "max_residual": measured.max_residual,
        "eig_error_bound": measured.max_error_bound,
        "sharpness_x_lr": None if lr is None else measured.eigenvalues[0] * lr,
    }
    metrics.update({f"{prefix}/{name}": float(v) for name, v in top.items() if _finite(v)})
    if not snapshot:
        return metrics
    metrics[f"{prefix}/snapshot/eig_1"] = float(measured.eigenvalues[0])
    summary = measured.summary
    optional = {
        "eig_min": measured.eig_min,
        "trace": None if measured.density is None else measured.density.trace,
        "outliers": summary.outliers,
        "near_zero_fraction": summary.near_zero_fraction,
        "negative_mass": summary.negative_mass,
        "grad_overlap": measured.grad_overlap,
    }
    metrics.update({f"{prefix}/{name}": float(v) for name, v in optional.items() if _finite(v)})
    for name, layer in measured.layers.items():
        metrics[f"{prefix}/layer/{name}/eig_1"] = layer.eigenvalue
    for name, view in measured.layer_views.items():
        metrics[f"{prefix}/layer/{name}/trace"] = view.trace
        metrics[f"{prefix}/layer/{name}/eig_1_mass"] = view.eig_1_mass
    return metrics


def stability_metrics(stability: Stability, prefix: str) -> dict[str, float]:
    """The edge-of-stability tags of one call; quantities that are NaN or absent are left out.

    ``<prefix>/stability`` (1 at the edge), ``<prefix>/stability_threshold``,
    ``<prefix>/preconditioned_eig_1`` with ``<prefix>/preconditioned_residual`` (adaptive
    optimizers) and ``<prefix>/batch_sharpness``.

    Example:
        >>> stability_metrics(Stability("SGD", threshold=20.0, stability=0.5, batch_sharpness=9.0), "hessian")
        {'hessian/stability': 0.5, 'hessian/stability_threshold': 20.0, 'hessian/batch_sharpness': 9.0}
    """
    values = {"stability": stability.stability, "stability_threshold": stability.threshold,
              "preconditioned_eig_1": stability.preconditioned_eig_1,
              "preconditioned_residual": stability.preconditioned_residual,
              "batch_sharpness": stability.batch_sharpness}
    return {f"{prefix}/{name}": float(v) for name, v in values.items() if _finite(v)}


def scalar_metrics(measurement: Measurement, prefix: str = "hessian") -> dict[str, float]:
    """Every scalar tag of one call: each matrix's quantities and the call's cost.

    Args:
        measurement: one call of the callback.
        prefix: the callback's ``name``.

    Returns:
        ``<prefix>/eig_1``, ..., ``<prefix>/ggn/...`` when the Gauss-Newton matrix was measured, the
        tags of :func:`stability_metrics` when the optimizer's edge of stability is known, and
        ``<prefix>/matvecs``, ``<prefix>/seconds``, ``<prefix>/overhead``, ``<prefix>/snapshot`` (1 for a
        snapshot, 0 for a tracked call) and ``<prefix>/nonfinite`` (0).

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> hessian = MatrixMeasurement("hessian", 10, (2.0, 0.5), (1e-7, 1e-6), (True, True), 20, summary)
        >>> call = Measurement(0, 0, "fit", "eval", "float32", 16, 0.1, 0.5, 20, hessian=hessian)
        >>> metrics = scalar_metrics(call)
        >>> metrics["hessian/eig_1"], metrics["hessian/sharpness_x_lr"], metrics["hessian/matvecs"]
        (2.0, 0.2, 20.0)
        >>> sorted(tag for tag in metrics if tag not in matrix_metrics(hessian, "hessian", lr=0.1))
        ['hessian/matvecs', 'hessian/nonfinite', 'hessian/seconds', 'hessian/snapshot']
    """
    metrics: dict[str, float] = {}
    for name, measured in measurement.matrices.items():
        metrics.update(matrix_metrics(measured, prefix if name == "hessian" else f"{prefix}/{GGN}", measurement.lr,
                                      snapshot=measurement.snapshot))
    if measurement.stability is not None:
        metrics.update(stability_metrics(measurement.stability, prefix))
    cost = {"matvecs": measurement.num_matvecs, "seconds": measurement.seconds, "overhead": measurement.overhead,
            "snapshot": float(measurement.snapshot)}
    metrics.update({f"{prefix}/{name}": float(v) for name, v in cost.items() if _finite(v)})
    metrics[f"{prefix}/nonfinite"] = 0.0
    return metrics


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Step metric of every tag in W&B: the trainer's optimizer steps, which Lightning's WandbLogger logs
# with each call of log_metrics.
STEP_METRIC = "trainer/global_step"


def _chart(tags: Iterable[str]) -> list[Any]:
    """A multi-line chart of the given tags, each as an anchored regular expression (one tag exactly)."""
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


def tensorboard_layout(prefix: str, *, k: int, matrix: str = "hessian",
                       density: bool = True) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of one callback, as ``SummaryWriter.add_custom_scalars`` takes it.

    Two categories, ``"<prefix>: spectrum"`` and ``"<prefix>: cost"``, of multi-line charts
    ``{title: ["Multiline", [tag regex, ...]]}``. Each regex is one tag, anchored
    (``^hessian/eig_1$``), so that ``eig_1`` does not also draw ``eig_10``. Charts: the top k of each
    matrix measured; with ``matrix="both"`` eig_1 of H and of the Gauss-Newton matrix G together;
    eig_1 times the learning rate (2 is the edge of stability of plain gradient descent only); unless
    only the Gauss-Newton matrix is measured, the optimizer's stability ratio with its edge, the
    constant ``<prefix>/stability_edge`` at 1 that the TensorBoard logger gets with it; with the
    density the trace and the mass near and below zero; the outlier count; and the cost of a call
    (seconds, products, overhead).

    Args:
        prefix: the callback's ``name``.
        k: the number of top eigenvalues.
        matrix: ``"hessian"``, ``"ggn"`` or ``"both"``: the matrices measured.
        density: whether the density's tags (trace, mass near and below zero) are logged.

    Example:
        >>> layout = tensorboard_layout("hessian", k=2, matrix="both")
        >>> layout["hessian: spectrum"]["top-2 eigenvalues of H"]  # the curve, and eig_1 at snapshots
        ['Multiline', ['^hessian/eig_1$', '^hessian/eig_2$', '^hessian/snapshot/eig_1$']]
        >>> layout["hessian: spectrum"]["eig_1 of H and G"]
        ['Multiline', ['^hessian/eig_1$', '^hessian/ggn/eig_1$']]
        >>> layout["hessian: spectrum"]["stability (edge of stability: 1)"]
        ['Multiline', ['^hessian/stability$', '^hessian/stability_edge$']]
        >>> sorted(layout["hessian: cost"])  # doctest: +NORMALIZE_WHITESPACE
        ['Hessian-vector products per call', 'kind of call (1: snapshot, 0: tracked)',
         'overhead (fraction of training time)', 'seconds per call']
    """
    measured = {"hessian": (prefix, "H"), "ggn": (f"{prefix}/{GGN}", "G (Gauss-Newton)")}
    tags = [measured[m] for m in ("hessian", "ggn") if matrix in (m, "both")]
    spectrum = {f"top-{k} eigenvalues of {name}": _chart([*(f"{tag}/eig_{i}" for i in range(1, k + 1)),
                                                          f"{tag}/snapshot/eig_1"])
                for tag, name in tags}
    if len(tags) == 2:
        spectrum["eig_1 of H and G"] = _chart(f"{tag}/eig_1" for tag, _ in tags)
    spectrum["eig_1 x learning rate (edge of stability: 2 for plain gradient descent)"] = _chart(
        f"{tag}/sharpness_x_lr" for tag, _ in tags)
    if matrix != GGN:
        spectrum["stability (edge of stability: 1)"] = _chart([f"{prefix}/stability", f"{prefix}/{STABILITY_EDGE}"])
    spectrum["outlier count"] = _chart(f"{tag}/outliers" for tag, _ in tags)
    if density:
        spectrum["trace"] = _chart(f"{tag}/trace" for tag, _ in tags)
        spectrum["spectral mass near zero and below zero"] = _chart(
            f"{tag}/{quantity}" for tag, _ in tags for quantity in ("near_zero_fraction", "negative_mass"))
    cost = {
        "seconds per call": _chart([f"{prefix}/seconds"]),
        "Hessian-vector products per call": _chart([f"{prefix}/matvecs"]),
        "overhead (fraction of training time)": _chart([f"{prefix}/overhead"]),
        "kind of call (1: snapshot, 0: tracked)": _chart([f"{prefix}/snapshot"]),
    }
    return {f"{prefix}: spectrum": spectrum, f"{prefix}: cost": cost}
