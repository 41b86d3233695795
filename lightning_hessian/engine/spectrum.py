"""Reading a spectrum: outliers above the bulk, near-zero mass, negative mass.

Symbols: P parameters, k top eigenvalues (largest first), S SLQ probes, m Lanczos steps per probe.

What an outlier is. Sagun et al. find a bulk of eigenvalues near zero plus a few outliers, about one
per class (C - 1 with softmax cross-entropy). An outlier is an eigenvalue isolated from the bulk:
walking up the spectrum from the bulk, the first eigenvalue at least ``ISOLATION_RATIO`` (1.75) times
the one below it starts the outliers, and every eigenvalue above it is one. Below that gap the
spectrum climbs in steps of less than that factor (the bulk and its tail); ``bulk_edge`` is the
top of that climb. On a complete spectrum (:func:`dense_outliers`) the count is the number of
eigenvalues above the lowest such step above the near-zero band ``near_zero_tol * lambda_1``.
:func:`bulk_outliers` estimates it from what the callback measures, the top k and an SLQ density
deflated by them:

1. The SLQ part of the density is its nodes below ``lambda_k``: that drops the k exact point masses
   of a deflated density (and, in one that is not deflated, the Ritz values that copy the top k).
   Each node counts ``P w`` eigenvalues, averaged over the probes.
2. The bulk's edge E (:func:`bulk_edge`) is the highest node at which the count above reaches 1% of
   P (at least 5 eigenvalues): one stray node does not make an edge, nor do a few outliers that k
   missed.
3. The walk starts at ``max(E, near_zero_tol * lambda_1)``, climbs through the SLQ nodes above E
   (the extreme Ritz values, which converge to single eigenvalues ``lambda_{k+1}``, ... first), then
   through the top k. The first point at least ``ISOLATION_RATIO`` times the one before it is the
   gap; the count is the number of top eigenvalues above it, and ``gap_ratio`` the step across it.
4. A gap among the SLQ nodes means the deflated part still holds outliers: all k are outliers and
   ``saturated`` is set (the count is a lower bound; ask for more eigenvalues).

Starting at the near-zero band keeps ratios between eigenvalues that are zero to working precision
out of the walk; starting at E keeps out the interior nodes of a coarse quadrature, whose spacing says
nothing about gaps in the spectrum.

Why a factor of 1.75. Among the top 2C + 2 eigenvalues of 42 random initializations (the 27 digits
and 15 Gaussian-blob MLPs below) no consecutive ratio reached 1.7 (largest 1.61), so an untrained
net reads 0. Trained digits nets climb from the bulk to their class outliers in steps of up to 1.9
(C = 3: 0.053, 0.083, 0.099, 0.171, then 0.48 and 2.6). Over the 27 trained digits nets (MLP
64-20-20-C, C = 2..10, 3 seeds) the dense count equals C - 1 for 22 at thresholds 1.85 to 2.0 and
for 21 at 1.75 to 1.8; but the outliers of a net trained by Lightning in ``make demo`` (10 classes)
climb 0.32, 0.58, 1.02 (steps 1.81 and 1.76), which only a threshold below 1.81 reads (as C = 10),
and one of C - 1 or C is the paper's "about one per class". 1.75 is the lowest threshold that keeps
every untrained net at 0 with a margin.

Validation (dense float64 Hessians, ``eigvalsh``): on those 27 nets and on 15 blob nets (C = 2, 3, 5,
7, 10; cluster std 1, 3, 6), trained and at initialization, the estimate from the top 2C + 2 and a
deflated density of 1, 2, 3, 5 or 10 probes x 30 to 80 steps equalled the dense count in every case.
The count is C - 1 for 22 of the 27 digits nets, against 16 for the ratio-gap reading below; on the
blobs both readings hit C - 1 in 4 of 15 (see ``lightning-hessian reproduce``, section 2).

When the count misleads:

- k not larger than the number of outliers: with a deflated density the gap falls among the SLQ
  nodes and ``saturated`` flags it, unless the missed outliers fill 1% of P (the edge then lands
  among them) or a stray unconverged node bridges the gap; without a density nothing flags it. Ask
  for well over C eigenvalues (the validation asks for 2C + 2).
- An untrained network: no eigenvalue is isolated, the count is 0, which is the right reading.
- Spectra with no gap: outliers that descend to the bulk in steps of less than 2 read as 0 even when
  ``lambda_1`` is far above the bulk (blobs with 5 or 10 heavily overlapping clusters; digits nets far
  from a minimum), and a top that is one smooth tail (separable blobs at near-zero loss) gives an
  arbitrary count. ``gap_outliers`` keeps the ratio-gap reading for comparison.
- A hierarchy of outliers (Papyan 2019): below the class outliers sit C(C - 1) cross-class ones; where
  they too are a factor 1.75 above the bulk (C = 2 nets) the count exceeds C - 1.
- A block of many eigenvalues a factor 1.75 above the near-zero band: the dense count calls it outliers,
  the estimate (whose edge E lies inside the block) calls it bulk.

The ratio-gap reading (:func:`outlier_gap`, the count without a density) is the index of the largest
ratio ``lambda_i / lambda_{i+1}`` among the positive top eigenvalues, when it reaches
``min_gap_ratio`` (1.5). It fails the other way: one dominant eigenvalue (2.6, 0.48, 0.17, 0.1 for
C = 3) puts the largest ratio after the first, and it reads 1.

Mass fractions. With ``t = near_zero_tol * lambda_1``, the near-zero fraction is the spectral mass
in the closed band ``[-t, t]`` and the negative mass is the mass below ``-t``: the three bands
partition the spectrum, and a Hessian that is exactly zero has near-zero fraction 1 and negative mass
0. The negative mass leaves out the near-zero band on purpose: after training the bulk piles up at
zero on both sides, and an 80-node quadrature cannot tell ``-1e-6`` from ``+1e-6``. On a trained
digits MLP (P = 2,410) the mass strictly below zero was 0.33 exactly but 0.16 to 0.17 by SLQ, while
the mass below ``-t`` was 0.0054 exactly and 0.0047 to 0.0061 by SLQ (near-zero fraction 0.951
exactly, 0.949 to 0.951 by SLQ; 10 probes, 80 steps, ``near_zero_tol = 1e-2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.engine.density import SpectralDensity

DEFAULT_MIN_GAP_RATIO = 1.5
# Eigenvalues with |lambda| below this fraction of lambda_1 count as "near zero" in SLQ estimates:
# an 80-step quadrature cannot resolve the bulk more finely than about 1% of the spectral range.
DEFAULT_NEAR_ZERO_FRACTION = 1e-2
# An eigenvalue this many times the one below it is isolated from everything below (the module
# docstring says why: no untrained net reaches 1.7, trained nets' outliers stand out by more).
ISOLATION_RATIO = 1.75
# The bulk's edge has this fraction of the eigenvalues above it: outliers number about C, far below 1% of
# P (C = 10 at P = 1,930 in the reproduction), so missed outliers alone cannot fill the top 1%...
BULK_EDGE_FRACTION = 1e-2
# ...and at least this many: one isolated eigenvalue counts P (z.u)^2 ~ chi2_1 per probe, above 5 with
# probability 2.5%, so a single extreme node rarely makes an edge by itself.
BULK_EDGE_MIN_COUNT = 5.0


@dataclass(frozen=True)
class SpectrumSummary:
    """What the spectrum says, in the quantities the callback logs.

    Attributes:
        outliers: eigenvalues isolated from the bulk (:func:`bulk_outliers`) when there is a density,
            else the ratio-gap count (:func:`outlier_gap`); 0 when there is no gap.
        gap_ratio: lowest outlier over ``bulk_edge``, the ratio across the gap that was counted (1.0
            when none).
        bulk_edge: top of the bulk, the largest eigenvalue (or SLQ node) below the gap, in eigenvalue
            units, and at least ``tol * lambda_1`` (where the walk starts); ``lambda_1`` when there is no
            gap.
        near_zero_fraction: fraction of the spectral mass with ``|lambda| <= tol * lambda_1``
            (NaN without a density).
        negative_mass: fraction of the spectral mass below ``-tol * lambda_1``, i.e. clearly
            negative, beyond the near-zero band (NaN without a density).
        gap_outliers: the ratio-gap count (:func:`outlier_gap`) of the same eigenvalues, the second
            reading (-1 in summaries recorded before it existed).
        saturated: the gap fell below ``lambda_k``, among the deflated eigenvalues: all k are
            outliers and there may be more.

    Example:
        >>> summary = SpectrumSummary(2, 2.8, 0.17, 0.95, 0.01)
        >>> summary.outliers, summary.gap_outliers, summary.saturated
        (2, -1, False)
    """

    outliers: int
    gap_ratio: float
    bulk_edge: float
    near_zero_fraction: float
    negative_mass: float
    gap_outliers: int = -1
    saturated: bool = False


def _descending(eigenvalues: Tensor) -> Tensor:
    """``(k,)`` float64 CPU copy, largest first."""
    return torch.sort(eigenvalues.detach().double().cpu().reshape(-1), descending=True).values


def outlier_gap(eigenvalues: Tensor, *, min_gap_ratio: float = DEFAULT_MIN_GAP_RATIO) -> tuple[int, float]:
    """Count outliers by the largest ratio gap among the positive top eigenvalues.

    Args:
        eigenvalues: ``(k,)`` top eigenvalues, any order.
        min_gap_ratio: smallest ratio that counts as a gap.

    Returns:
        ``(count, ratio)``: the number of eigenvalues above the gap and the ratio there;
        ``(0, 1.0)`` when fewer than two are positive or no ratio reaches ``min_gap_ratio``.

    Example:
        >>> outlier_gap(torch.tensor([9.0, 8.0, 1.0, 0.9]))
        (2, 8.0)
    """
    values = _descending(eigenvalues)
    positive = values[values > 0]
    if positive.numel() < 2:
        return 0, 1.0
    ratios = positive[:-1] / positive[1:]
    best = int(torch.argmax(ratios))
    ratio = float(ratios[best])
    if ratio < min_gap_ratio:
        return 0, 1.0
    return best + 1, ratio


def _slq_part(density: SpectralDensity, below: float) -> tuple[Tensor, Tensor]:
    """The density's nodes below ``below``, pooled over probes and largest first, with the eigenvalues
    each counts (``P w / S``): two ``(n,)`` float64 tensors; the deflated point masses never count."""
    nodes, weights = density.nodes.reshape(-1), density.weights.reshape(-1)
    keep = nodes < below
    if density.deflated_mask is not None:
        keep &= ~density.deflated_mask.reshape(-1)
    counts = weights[keep] * density.num_params / density.nodes.shape[0]
    order = torch.argsort(nodes[keep], descending=True)
    return nodes[keep][order], counts[order]


def bulk_edge(density: SpectralDensity, *, below: float = math.inf, count: float | None = None) -> float:
    """The bulk's right edge: the highest SLQ node with ``count`` eigenvalues at or above it.

    Args:
        density: an SLQ estimate; its deflated point masses (``density.deflated_mask``) stay out.
        below: only nodes strictly below this value count (eigenvalue units).
        count: eigenvalues (``P w``, averaged over probes) the edge must have at or above it; default
            ``max(BULK_EDGE_MIN_COUNT, BULK_EDGE_FRACTION * P)``, 5 up to P = 500.

    Returns:
        The edge in eigenvalue units: the lowest node when all nodes together count fewer than
        ``count``, ``-inf`` when no node is below ``below``.

    Example:
        >>> nodes = torch.tensor([[0.0, 0.1, 0.15, 0.25]], dtype=torch.float64)
        >>> weights = torch.tensor([[0.90, 0.06, 0.03, 0.01]], dtype=torch.float64)
        >>> density = SpectralDensity(nodes, weights, trace=0.0, trace_stderr=0.0, num_params=100,
        ...                           num_matvecs=4, seconds=0.0)
        >>> bulk_edge(density)  # 1 eigenvalue at 0.25, 3 at 0.15, 6 at 0.1: 5 reached at 0.1
        0.1
    """
    nodes, counts = _slq_part(density, below)
    if count is None:
        count = max(BULK_EDGE_MIN_COUNT, BULK_EDGE_FRACTION * density.num_params)
    return _edge(nodes, counts, count)


def _edge(nodes: Tensor, counts: Tensor, count: float) -> float:
    """The first of the ``(n,)`` descending nodes where the running total of ``counts`` reaches ``count``."""
    if nodes.numel() == 0:
        return -math.inf
    reached = torch.nonzero(counts.cumsum(0) >= count)
    return float(nodes[int(reached[0]) if reached.numel() else -1])


def bulk_outliers(
    eigenvalues: Tensor,
    density: SpectralDensity,
    *,
    isolation_ratio: float = ISOLATION_RATIO,
    near_zero_tol: float = DEFAULT_NEAR_ZERO_FRACTION,
    edge_count: float | None = None,
) -> tuple[int, float, float, bool]:
    """Count the top eigenvalues isolated from the bulk that ``density`` describes (module docstring).

    Args:
        eigenvalues: ``(k,)`` top eigenvalues, any order.
        density: an SLQ estimate of the same operator, best deflated by these eigenvalues
            (``spectral_density(op, deflate=top)``).
        isolation_ratio: an eigenvalue this many times the point below it starts the outliers.
        near_zero_tol: the walk starts no lower than ``near_zero_tol * lambda_1``.
        edge_count: see :func:`bulk_edge`.

    Returns:
        ``(count, ratio, edge, saturated)``: the outliers, the ratio across their gap (1.0 without
        one), the top of the bulk below the gap (``lambda_1`` without one) and whether the gap fell
        among the deflated eigenvalues (then ``count == k``). ``(0, 1.0, lambda_1, False)`` when
        ``lambda_1 <= 0``.

    Example:
        >>> nodes = torch.tensor([[0.0, 0.1, 0.15, 0.25]], dtype=torch.float64)
        >>> weights = torch.tensor([[0.90, 0.06, 0.03, 0.01]], dtype=torch.float64)
        >>> density = SpectralDensity(nodes, weights, trace=0.0, trace_stderr=0.0, num_params=100,
        ...                           num_matvecs=4, seconds=0.0)
        >>> top = torch.tensor([9.0, 3.0, 0.4, 0.3], dtype=torch.float64)
        >>> bulk_outliers(top, density)  # walk 0.1, 0.15, 0.25, 0.3, 0.4 | 3, 9: the gap is 3 / 0.4
        (2, 7.5, 0.4, False)
    """
    values = _descending(eigenvalues)
    top, lowest = float(values[0]), float(values[-1])
    if not top > 0:
        return 0, 1.0, top, False
    nodes, counts = _slq_part(density, lowest)
    if edge_count is None:
        edge_count = max(BULK_EDGE_MIN_COUNT, BULK_EDGE_FRACTION * density.num_params)
    start = max(_edge(nodes, counts, edge_count), near_zero_tol * top)
    nodes = nodes[nodes > start].flip(0)
    points = torch.cat([nodes, values[values > start].flip(0)])
    first = _first_gap(points, start, isolation_ratio)
    if first is None:
        return 0, 1.0, top, False
    below = float(points[first - 1]) if first else start
    count = int((values >= points[first]).sum())
    return count, float(points[first]) / below, below, first < nodes.numel()


def _first_gap(points: Tensor, start: float, isolation_ratio: float) -> int | None:
    """Index of the first of the ascending ``(n,)`` points that is ``isolation_ratio`` times the one before it
    (``start`` before the first); ``None`` without one."""
    previous = torch.cat([torch.tensor([start], dtype=torch.float64), points[:-1]])
    gaps = torch.nonzero(points >= isolation_ratio * previous)
    return int(gaps[0]) if gaps.numel() else None


def dense_outliers(
    eigenvalues: Tensor,
    *,
    isolation_ratio: float = ISOLATION_RATIO,
    near_zero_tol: float = DEFAULT_NEAR_ZERO_FRACTION,
) -> int:
    """The outlier count of a complete spectrum (``eigvalsh`` of a dense Hessian): what :func:`bulk_outliers` estimates.

    Args:
        eigenvalues: ``(P,)`` every eigenvalue, any order.
        isolation_ratio: an eigenvalue this many times the one below it starts the outliers.
        near_zero_tol: the walk starts at ``near_zero_tol * lambda_1``.

    Returns:
        The number of eigenvalues above the lowest step of a factor ``isolation_ratio`` or more, walking up
        through every eigenvalue above ``near_zero_tol * lambda_1``; 0 without one or when ``lambda_1 <= 0``.

    Example:
        >>> dense_outliers(torch.tensor([0.0, 0.0, 0.06, 0.1, 0.15, 0.25, 2.0, 5.0]))  # from 0.05: 0.06 ... 0.25 | 2, 5
        2
    """
    values = _descending(eigenvalues)
    top = float(values[0])
    if not top > 0:
        return 0
    start = near_zero_tol * top
    points = values[values > start].flip(0)
    first = _first_gap(points, start, isolation_ratio)
    return 0 if first is None else points.numel() - first


def summarize(
    eigenvalues: Tensor,
    density: SpectralDensity | None = None,
    *,
    min_gap_ratio: float = DEFAULT_MIN_GAP_RATIO,
    near_zero_tol: float = DEFAULT_NEAR_ZERO_FRACTION,
    isolation_ratio: float = ISOLATION_RATIO,
) -> SpectrumSummary:
    """Read outliers, near-zero mass and negative mass from top eigenvalues and a density.

    Args:
        eigenvalues: ``(k,)`` top eigenvalues.
        density: an SLQ estimate, best deflated by ``eigenvalues``; without it the outliers are the
            ratio-gap count and the mass fractions NaN.
        min_gap_ratio: see :func:`outlier_gap`.
        near_zero_tol: eigenvalues with ``|lambda| <= near_zero_tol * lambda_1`` count as near zero,
            those below ``-near_zero_tol * lambda_1`` as negative; the outlier walk starts above the
            band.
        isolation_ratio: see :func:`bulk_outliers`.

    Returns:
        A :class:`SpectrumSummary`.

    Example:
        >>> two_nodes = torch.tensor([[0.0, 0.2]], dtype=torch.float64)  # 80% of the mass at zero
        >>> density = SpectralDensity(two_nodes, torch.tensor([[0.8, 0.2]], dtype=torch.float64), trace=0.0,
        ...                           trace_stderr=0.0, num_params=50, num_matvecs=2, seconds=0.0)
        >>> top = torch.tensor([9.0, 1.5, 0.4, 0.3], dtype=torch.float64)
        >>> summary = summarize(top, density)  # 0.4 -> 1.5 is the first step of 1.75 or more above the bulk
        >>> summary.outliers, summary.gap_ratio, summary.bulk_edge, summary.near_zero_fraction
        (2, 3.75, 0.4, 0.8)
        >>> summary.gap_outliers, summarize(top).outliers  # the largest ratio, 9 / 1.5, reads 1
        (1, 1)
    """
    values = _descending(eigenvalues)
    gap_count, gap_ratio = outlier_gap(values, min_gap_ratio=min_gap_ratio)
    if density is None:
        edge = float(values[min(gap_count, values.numel() - 1)])
        return SpectrumSummary(gap_count, gap_ratio, edge, math.nan, math.nan, gap_count, False)
    count, ratio, edge, saturated = bulk_outliers(values, density, isolation_ratio=isolation_ratio,
                                                  near_zero_tol=near_zero_tol)
    near_zero, negative = _mass_fractions(density, near_zero_tol * abs(float(values[0])))
    return SpectrumSummary(count, ratio, edge, near_zero, negative, gap_count, saturated)


def _mass_fractions(density: SpectralDensity, threshold: float) -> tuple[float, float]:
    """Mass in the closed band ``[-threshold, threshold]`` and below it, averaged over probes."""
    near_zero = (density.nodes >= -threshold) & (density.nodes <= threshold)
    negative = density.nodes < -threshold
    return (float((density.weights * near_zero).sum(dim=1).mean()),
            float((density.weights * negative).sum(dim=1).mean()))
