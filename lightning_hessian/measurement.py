"""What one call of the callback measured: frozen dataclasses from the engine's results to the loggers.

A :class:`Measurement` holds the call's context and cost and one :class:`MatrixMeasurement` per
matrix (the Hessian, and the Gauss-Newton matrix when asked). They stay typed in the callback's
``history`` and in :mod:`lightning_hessian.loggers`; :meth:`Measurement.to_dict` and
:meth:`Measurement.from_dict` convert them to plain Python values (lists, floats, strings) and back,
which is what checkpoints (loaded with ``weights_only=True``) and the JSON history file hold.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m nodes per probe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_hessian.engine import SpectralDensity, SpectrumSummary

Matrix = Literal["hessian", "ggn"]


@dataclass(frozen=True)
class LayerEigenvalue:
    """The top eigenvalue of one block of parameters (a ``layers=`` pattern).

    Attributes:
        pattern: the parameter name pattern, e.g. ``"net.0.*"``.
        eigenvalue: the block's largest eigenvalue.
        residual: its relative residual.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(0, 1.0, 2.0, float("nan"), float("nan"))
        >>> block = LayerEigenvalue("net.0.*", eigenvalue=1.5, residual=1e-4)
        >>> measured = MatrixMeasurement("hessian", 3, (2.0,), (1e-9,), (True,), 10, summary, layers={"net0": block})
        >>> measured.max_residual  # the block's residual counts with the top k's
        0.0001
        >>> MatrixMeasurement.from_dict(measured.to_dict()).layers["net0"]
        LayerEigenvalue(pattern='net.0.*', eigenvalue=1.5, residual=0.0001)
    """

    pattern: str
    eigenvalue: float
    residual: float


@dataclass(frozen=True)
class LayerView:
    """One module's share of the curvature.

    Attributes:
        trace: Hutchinson estimate of the trace of the module's diagonal block.
        trace_stderr: its standard error.
        eig_1_mass: fraction of the top eigenvector's squared norm inside the module, in [0, 1].

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(0, 1.0, 2.0, float("nan"), float("nan"))
        >>> view = LayerView(trace=3.0, trace_stderr=0.1, eig_1_mass=0.9)
        >>> measured = MatrixMeasurement("hessian", 3, (2.0,), (1e-9,), (True,), 10, summary,
        ...                              layer_views={"net.0": view})
        >>> measured.to_dict()["layer_views"]
        {'net.0': {'trace': 3.0, 'trace_stderr': 0.1, 'eig_1_mass': 0.9}}
    """

    trace: float
    trace_stderr: float
    eig_1_mass: float


@dataclass(frozen=True)
class MatrixMeasurement:
    """One matrix (Hessian or Gauss-Newton) at one call.

    Attributes:
        matrix: ``"hessian"`` or ``"ggn"``.
        num_params: P.
        eigenvalues: the k largest eigenvalues, largest first.
        residuals: their relative residuals ``||H v - theta v|| / ||H||``.
        converged: whether each met the tolerance.
        num_matvecs: products spent on this matrix.
        summary: outliers, bulk edge, near-zero fraction, negative mass.
        density: the SLQ estimate (``None`` when the density is off).
        eig_min: the smallest eigenvalue, with ``eig_min_residual`` (``None`` unless asked).
        layers: the top eigenvalue of each ``layers=`` block, by tag name.
        layer_views: traces and eigenvector mass per module (empty unless asked).
        grad_overlap: fraction of the gradient inside the top-k eigenspace (``None`` unless asked).
        error_bounds: estimated absolute errors of the eigenvalues (``EigenResult.error_bounds``:
            ``min(r, r**2 / gap)``, r the absolute residual).

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(1, 4.0, 0.5, float("nan"), float("nan"))
        >>> measured = MatrixMeasurement("hessian", num_params=10, eigenvalues=(2.0, 0.5), residuals=(1e-7, 1e-6),
        ...                              converged=(True, True), num_matvecs=20, summary=summary,
        ...                              error_bounds=(1e-9, 1e-8))
        >>> measured.max_residual, measured.max_error_bound
        (1e-06, 1e-08)
        >>> plain = measured.to_dict()  # plain values, for checkpoints and JSON
        >>> plain["eigenvalues"], MatrixMeasurement.from_dict(plain).eigenvalues
        ([2.0, 0.5], (2.0, 0.5))
    """

    matrix: Matrix
    num_params: int
    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    num_matvecs: int
    summary: SpectrumSummary
    density: SpectralDensity | None = None
    eig_min: float | None = None
    eig_min_residual: float | None = None
    layers: Mapping[str, LayerEigenvalue] = field(default_factory=dict)
    layer_views: Mapping[str, LayerView] = field(default_factory=dict)
    grad_overlap: float | None = None
    error_bounds: tuple[float, ...] = ()

    def __eq__(self, other: object) -> bool:
        return same_values(self, other)

    __hash__ = None  # type: ignore[assignment]  # mappings inside: not hashable

    @property
    def max_error_bound(self) -> float:
        """The largest estimated eigenvalue error of the top k (NaN when not recorded)."""
        return max(self.error_bounds) if self.error_bounds else math.nan

    @property
    def max_residual(self) -> float:
        """The largest residual of every eigenvalue reported (top-k, smallest, layer blocks)."""
        residuals = [*self.residuals, *(layer.residual for layer in self.layers.values())]
        if self.eig_min_residual is not None:
            residuals.append(self.eig_min_residual)
        return max(residuals)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (the density as lists of nodes and weights)."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain.update(
            eigenvalues=list(self.eigenvalues), residuals=list(self.residuals), converged=list(self.converged),
            error_bounds=list(self.error_bounds),
            summary=dataclasses.asdict(self.summary), density=_density_to_dict(self.density),
            layers={name: dataclasses.asdict(layer) for name, layer in self.layers.items()},
            layer_views={name: dataclasses.asdict(view) for name, view in self.layer_views.items()},
        )
        return plain

    @classmethod
    def from_dict(cls, plain: Mapping[str, Any]) -> MatrixMeasurement:
        """The inverse of :meth:`to_dict`."""
        values = dict(plain)
        values.update(
            eigenvalues=tuple(values["eigenvalues"]), residuals=tuple(values["residuals"]),
            converged=tuple(values["converged"]), summary=SpectrumSummary(**values["summary"]),
            error_bounds=tuple(values.get("error_bounds", ())),
            density=_density_from_dict(values.get("density")),
            layers={name: LayerEigenvalue(**layer) for name, layer in values.get("layers", {}).items()},
            layer_views={name: LayerView(**view) for name, view in values.get("layer_views", {}).items()},
        )
        return cls(**values)


@dataclass(frozen=True)
class Stability:
    """Where the first optimizer's update stands against its edge of stability, at one call.

    Attributes:
        optimizer: the optimizer's class name, e.g. ``"SGD"``.
        threshold: the largest stable eigenvalue of the update's curvature (``2 / lr`` for plain
            gradient descent; the smallest over param groups), in the units of
            ``preconditioned_eig_1`` for adaptive optimizers and of the Hessian's eigenvalues otherwise.
        stability: the top eigenvalue of the update's linearization over the threshold, 1 at the edge
            (``None`` for an adaptive optimizer before its first step: it has no preconditioner yet).
        preconditioned_eig_1: top eigenvalue of ``P^-1/2 (H + W) P^-1/2`` (adaptive optimizers only).
        preconditioned_residual: its relative residual.
        batch_sharpness: the curvature of the batch just trained on along its own gradient,
            ``g' H_B g / g' g`` (``None`` at calls that follow no training step).
        num_matvecs: products spent on these quantities (the batch's gradient not counted).

    Example:
        >>> call = Stability("SGD", threshold=20.0, stability=0.5, batch_sharpness=9.0, num_matvecs=1)
        >>> Stability.from_dict(call.to_dict()) == call
        True
    """

    optimizer: str
    threshold: float
    stability: float | None = None
    preconditioned_eig_1: float | None = None
    preconditioned_residual: float | None = None
    batch_sharpness: float | None = None
    num_matvecs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, plain: Mapping[str, Any]) -> Stability:
        """The inverse of :meth:`to_dict`."""
        return cls(**plain)


@dataclass(frozen=True)
class Measurement:
    """One call of the callback: where and how it measured, what it cost, and each matrix.

    Attributes:
        step: ``trainer.global_step`` at the call.
        epoch: ``trainer.current_epoch``.
        stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"measure"`` (on demand).
        mode: ``"eval"`` or ``"train"``.
        dtype: the products' dtype, e.g. ``"float32"``.
        num_samples: probe samples over all ranks (of the subset a tracked call or a shrunk snapshot measured).
        lr: the first optimizer's learning rate (``None`` without an optimizer).
        seconds: wall time of the numerics.
        num_matvecs: products over all matrices.
        overhead: fraction of training wall time spent in the callback so far (NaN outside ``fit``).
        hessian: the Hessian's measurement (``None`` for ``matrix="ggn"``).
        ggn: the Gauss-Newton matrix's (``None`` unless asked).
        snapshot: ``True`` for a snapshot (everything asked for, over the probe set), ``False`` for a
            tracked call (the top ``track_k`` eigenvalues on a subset of it, warm-started).
        stability: the first optimizer against its edge of stability (``None`` without an optimizer,
            without the Hessian, or for an optimizer whose edge is not known).
    """

    step: int
    epoch: int
    stage: str
    mode: str
    dtype: str
    num_samples: int
    lr: float | None
    seconds: float
    num_matvecs: int
    overhead: float = math.nan
    hessian: MatrixMeasurement | None = None
    ggn: MatrixMeasurement | None = None
    snapshot: bool = True
    stability: Stability | None = None

    def __eq__(self, other: object) -> bool:
        return same_values(self, other)

    __hash__ = None  # type: ignore[assignment]  # mappings inside: not hashable

    @property
    def matrices(self) -> dict[str, MatrixMeasurement]:
        """The matrices measured, by name (``"hessian"``, ``"ggn"``)."""
        return {name: m for name, m in (("hessian", self.hessian), ("ggn", self.ggn)) if m is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, for checkpoints and JSON.

        Example:
            >>> from lightning_hessian.engine import SpectrumSummary
            >>> summary = SpectrumSummary(0, 1.0, 2.0, float("nan"), float("nan"))
            >>> hessian = MatrixMeasurement("hessian", 3, (2.0,), (1e-9,), (True,), 10, summary)
            >>> call = Measurement(0, 0, "fit", "eval", "float32", 16, 0.1, 0.5, 10, hessian=hessian)
            >>> Measurement.from_dict(call.to_dict()).hessian.eigenvalues
            (2.0,)
        """
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain.update({name: None if m is None else m.to_dict() for name, m in (("hessian", self.hessian),
                                                                              ("ggn", self.ggn))})
        plain["stability"] = None if self.stability is None else self.stability.to_dict()
        return plain

    @classmethod
    def from_dict(cls, plain: Mapping[str, Any]) -> Measurement:
        """The inverse of :meth:`to_dict`."""
        values = dict(plain)
        for name in ("hessian", "ggn"):
            if values.get(name) is not None:
                values[name] = MatrixMeasurement.from_dict(values[name])
        if values.get("stability") is not None:
            values["stability"] = Stability.from_dict(values["stability"])
        return cls(**values)


@dataclass(frozen=True)
class Event:
    """A scheduled call that produced no spectrum.

    Attributes:
        step: ``trainer.global_step``.
        stage: as in :class:`Measurement`.
        reason: ``"nonfinite"`` (the loss or a product was NaN or infinite), ``"no_loss"``
            (``training_step`` returned ``None``), ``"budget"`` (skipped to stay within the budget),
            ``"uninitialized"`` (the module still had lazy parameters) or ``"unsupported"`` (the model
            or its batches cannot be measured as configured; the warning names the fix).

    Example:
        >>> Event(step=120, stage="fit", reason="nonfinite").to_dict()
        {'step': 120, 'stage': 'fit', 'reason': 'nonfinite'}
    """

    step: int
    stage: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values."""
        return dataclasses.asdict(self)


def same_values(a: Any, b: Any) -> bool:
    """Whether two records of one type hold the same plain values (:meth:`Measurement.to_dict`), NaN equal
    to NaN: a history compares equal to its checkpoint or JSON round trip.

    Example:
        >>> from lightning_hessian.engine import SpectrumSummary
        >>> summary = SpectrumSummary(0, 1.0, 2.0, float("nan"), float("nan"))
        >>> one = MatrixMeasurement("hessian", 3, (2.0,), (1e-9,), (True,), 10, summary)
        >>> one == MatrixMeasurement.from_dict(one.to_dict()), one == dataclasses.replace(one, num_matvecs=11)
        (True, False)
    """
    if type(a) is not type(b):
        return NotImplemented
    return _plain_equal(a.to_dict(), b.to_dict())


def _plain_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_plain_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_plain_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _density_to_dict(density: SpectralDensity | None) -> dict[str, Any] | None:
    if density is None:
        return None
    plain = dataclasses.asdict(density)
    plain.update(nodes=density.nodes.tolist(), weights=density.weights.tolist(),
                 deflated=None if density.deflated is None else density.deflated.tolist(),
                 deflated_mask=None if density.deflated_mask is None else density.deflated_mask.tolist())
    return plain


def _density_from_dict(plain: Mapping[str, Any] | None) -> SpectralDensity | None:
    if plain is None:
        return None
    values = dict(plain)
    values.update(nodes=torch.tensor(values["nodes"], dtype=torch.float64),
                  weights=torch.tensor(values["weights"], dtype=torch.float64))
    if values.get("deflated") is not None:
        values.update(deflated=torch.tensor(values["deflated"], dtype=torch.float64),
                      deflated_mask=torch.tensor(values["deflated_mask"], dtype=torch.bool))
    return SpectralDensity(**values)
