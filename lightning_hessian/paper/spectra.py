"""Training and measuring the small nets of the reproduction: plain loops, certified spectra, H vs G.

Symbols: M parameters, k top eigenvalues, C classes.

Training is a plain PyTorch loop: for 2,000-parameter MLPs a Lightning step costs more than the step
itself. Every Hessian here is that of the mean cross-entropy over a whole training set, in float64.
Top eigenvalues come from the engine's Lanczos (certified by residuals), densities from SLQ, and,
where asked, full spectra from dense Hessians (``eigvalsh``; practical up to M of about 5,000).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.engine import (
    GGNOperator,
    HessianOperator,
    dense_ggn,
    dense_hessian,
    outlier_gap,
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.spectrum import dense_outliers
from lightning_hessian.interpolation import evaluate
from lightning_hessian.paper.models import MLPClassifier, cross_entropy, cross_entropy_of_logits
from lightning_hessian.paper.training import train_sgd

LR = 0.1
BATCH_SIZE = 32
EPOCHS = 30
# |lambda| below this fraction of lambda_1 counts as zero in an exact spectrum (the pilot runs' threshold);
# SLQ estimates use the engine's coarser default (1e-2: an 80-step quadrature cannot resolve finer).
NEAR_ZERO_TOL = 1e-3
SLQ_NEAR_ZERO_TOL = 1e-2
TOL = 1e-6
# ||H - G||_2 needs two or three digits: a relative residual of 1e-3 gives them (eigenvalue error ~1e-6).
NORM_TOL = 1e-3
# Rows of the Jacobian held at once by dense_ggn: its output Hessian is (batch * C)^2 numbers.
GGN_BATCH = 100


@dataclass
class Spectrum:
    """One Hessian spectrum: certified top eigenvalues, an SLQ density and, if asked, the exact spectrum.

    Attributes:
        num_params: M.
        top: ``k`` largest eigenvalues (Lanczos), largest first.
        residuals: their relative residuals.
        outliers: eigenvalues isolated from the bulk (:func:`~lightning_hessian.engine.spectrum.bulk_outliers`
            of ``top`` and the SLQ density deflated by it); without a density, ``gap_outliers``.
        gap_outliers, gap_ratio: :func:`~lightning_hessian.outlier_gap` of ``top`` (the largest ratio gap).
        ratios: ``top[i] / top[i + 1]``.
        slq_near_zero_fraction: SLQ mass with ``|lambda| <= 1e-2 lambda_1``.
        slq_trace: Hutchinson trace from the SLQ probes.
        bulk_edge, isolation, saturated: the top of the bulk, the lowest outlier over it (1.0 without
            outliers), and whether the gap fell among the deflated eigenvalues (NaN, 1.0, False without a
            density).
        exact: every eigenvalue (dense Hessian, ``eigvalsh``), largest first, or ``None``.
        exact_outliers: :func:`~lightning_hessian.engine.spectrum.dense_outliers` of ``exact`` (-1 without).
        near_zero_fraction: exact fraction with ``|lambda| < 1e-3 lambda_1`` (NaN without ``exact``).
        exact_near_zero_fraction_coarse: exact fraction with ``|lambda| < 1e-2 lambda_1`` (vs SLQ).
        negative_count, lambda_min: exact count of negative eigenvalues and the smallest one.
        lanczos_error: ``max_i |top_i - exact_i| / lambda_1``.
        seconds: wall time of the measurement.
    """

    num_params: int
    top: list[float]
    residuals: list[float]
    outliers: int
    gap_outliers: int
    gap_ratio: float
    ratios: list[float]
    slq_near_zero_fraction: float
    slq_trace: float
    bulk_edge: float = math.nan
    isolation: float = 1.0
    saturated: bool = False
    exact: list[float] | None = None
    exact_outliers: int = -1
    near_zero_fraction: float = math.nan
    exact_near_zero_fraction_coarse: float = math.nan
    negative_count: int = -1
    lambda_min: float = math.nan
    lanczos_error: float = math.nan
    seconds: float = 0.0


@dataclass
class TrainedNet:
    """A float64 MLP trained on a fixed set, with its data and scores."""

    model: MLPClassifier
    init: MLPClassifier
    x: Tensor
    y: Tensor
    train_loss: float
    train_acc: float
    test_acc: float
    steps: int
    seconds: float
    dense: dict[str, Tensor] = field(default_factory=dict)


def logits(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The logits ``[n, C]`` of a batch ``(x, y)``."""
    return model.hessian_outputs(batch)


def _score(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)``."""
    loss, accuracy = evaluate(model, [(x, y)])
    return loss, float(accuracy)


def train_net(
    split: tuple[Tensor, Tensor, Tensor, Tensor], hidden: int, seed: int, *, mixture_steps: int | None = None
) -> TrainedNet:
    """Build ``MLPClassifier(d, (h, h), C)`` in float64 under ``seed`` and train it.

    Digits (``mixture_steps=None``): SGD, batch 32, 30 epochs. Mixtures: ``mixture_steps``
    full-batch steps.
    """
    x, y, x_test, y_test = (t.double() if t.is_floating_point() else t for t in split)
    torch.manual_seed(seed)
    model = MLPClassifier(x.shape[1], (hidden, hidden), int(y.max()) + 1, lr=LR).double()
    init = copy.deepcopy(model)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    if mixture_steps is None:
        train_sgd(model, x, y, lr=LR, epochs=EPOCHS, batch_size=BATCH_SIZE, generator=generator)
        steps = EPOCHS * -(-len(y) // BATCH_SIZE)
    else:
        train_sgd(model, x, y, lr=LR, steps=mixture_steps, generator=generator)
        steps = mixture_steps
    seconds = time.perf_counter() - started
    loss, acc = _score(model, x, y)
    return TrainedNet(model, init, x, y, loss, acc, _score(model, x_test, y_test)[1], steps, seconds)


def measure(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    k: int,
    num_probes: int = 5,
    num_steps: int = 80,
    density: bool = True,
    exact: bool = False,
    hessian: Tensor | None = None,
) -> tuple[Spectrum, Tensor | None]:
    """Top-k eigenvalues (Lanczos), SLQ density and, with ``exact``, the dense spectrum of the Hessian.

    Args:
        model, x, y: the net and its training set; the Hessian is that of the mean loss over it.
        k: top eigenvalues wanted.
        num_probes, num_steps: SLQ probes and Lanczos steps per probe.
        density: estimate the SLQ density, deflated by the top k as the callback does, and count the
            outliers from it (else its fields are NaN and the outliers are the ratio-gap count).
        exact: also compute the dense Hessian and all its eigenvalues.
        hessian: a dense Hessian of this model already computed (used instead of a new one).

    Returns:
        The :class:`Spectrum` and the dense Hessian ``(M, M)`` (``None`` without ``exact``).
    """
    started = time.perf_counter()
    op = HessianOperator(model, cross_entropy, [(x, y)], dtype=torch.float64)
    top = top_eigenvalues(op, k, tol=TOL, max_matvecs=min(op.num_params, 20 * k + 200))
    values = top.eigenvalues
    count, ratio = outlier_gap(values)
    spectrum = Spectrum(op.num_params, values.tolist(), top.residuals.tolist(), count, count, ratio,
                        (values[:-1] / values[1:]).tolist(), math.nan, math.nan)
    if density:
        deflate = top if top.all_converged and k < op.num_params else None
        slq = spectral_density(op, num_probes=num_probes, num_steps=num_steps, seed=0, deflate=deflate)
        summary = summarize(values, slq, near_zero_tol=SLQ_NEAR_ZERO_TOL)
        spectrum.outliers, spectrum.bulk_edge = summary.outliers, summary.bulk_edge
        spectrum.isolation, spectrum.saturated = summary.gap_ratio, summary.saturated
        spectrum.slq_near_zero_fraction, spectrum.slq_trace = summary.near_zero_fraction, slq.trace
    if exact:
        hessian = dense_hessian(model, cross_entropy, [(x, y)]) if hessian is None else hessian
        full = torch.linalg.eigvalsh(hessian).flip(0)
        scale = float(full[0])
        spectrum.exact = full.tolist()
        spectrum.exact_outliers = dense_outliers(full)
        spectrum.near_zero_fraction = float((full.abs() < NEAR_ZERO_TOL * scale).double().mean())
        spectrum.exact_near_zero_fraction_coarse = float((full.abs() < SLQ_NEAR_ZERO_TOL * scale).double().mean())
        spectrum.negative_count = int((full < 0).sum())
        spectrum.lambda_min = float(full[-1])
        spectrum.lanczos_error = float((values - full[:k]).abs().max() / scale)
    spectrum.seconds = time.perf_counter() - started
    return spectrum, hessian


class _Difference:
    """The operator H - G, from one Hessian and one Gauss-Newton operator on the same data."""

    def __init__(self, hessian: HessianOperator, ggn: GGNOperator) -> None:
        self.hessian, self.ggn = hessian, ggn
        self.num_params, self.dtype, self.device = hessian.num_params, hessian.dtype, hessian.device

    def matmat(self, vectors: Tensor) -> Tensor:
        return self.hessian.matmat(vectors) - self.ggn.matmat(vectors)


def compare_ggn(net: TrainedNet, model: nn.Module, name: str, *, exact: bool, k: int = 10) -> dict[str, Any]:
    """Top-k of H and G, and ``||H - G||_2``, by Lanczos and (with ``exact``) from dense matrices."""
    batch = [(net.x, net.y)]
    hessian = HessianOperator(model, cross_entropy, batch, dtype=torch.float64)
    ggn = GGNOperator(model, logits, cross_entropy_of_logits, batch, dtype=torch.float64)
    top_h = top_eigenvalues(hessian, k, tol=TOL).eigenvalues
    top_g = top_eigenvalues(ggn, k, tol=TOL).eigenvalues
    difference = _Difference(hessian, ggn)
    extremes = [float(top_eigenvalues(difference, 1, tol=NORM_TOL, which=w).eigenvalues[0])
                for w in ("largest", "smallest")]
    row = {"point": name, "loss": _score(model, net.x, net.y)[0], "top_h": top_h.tolist(), "top_g": top_g.tolist(),
           "relative_gap": float(((top_h - top_g).abs() / top_h.abs()).max()),
           "residual_norm": max(abs(v) for v in extremes), "lambda_1": float(top_h[0])}
    if exact:
        dense_h = net.dense.get(name)
        if dense_h is None:
            dense_h = dense_hessian(model, cross_entropy, batch)
        chunks = list(zip(net.x.split(GGN_BATCH), net.y.split(GGN_BATCH), strict=True))
        dense_g = dense_ggn(model, logits, cross_entropy_of_logits, chunks)
        eig_g = torch.linalg.eigvalsh(dense_g).flip(0)
        row["exact_top_g"] = eig_g[:k].tolist()
        row["exact_residual_norm"] = float(torch.linalg.matrix_norm(dense_h - dense_g, ord=2))
        row["ggn_rank"] = int((eig_g > eig_g[0] * 1e-10).sum())
        row["num_params"] = dense_g.shape[0]
    return row
