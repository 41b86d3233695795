"""Reading a spectrum: outliers above the bulk, near-zero mass, negative mass.

Symbols: k top eigenvalues (sorted, largest first).

The outlier rule. Sagun et al. find a bulk of eigenvalues near zero plus a few outliers; with
softmax cross-entropy on C classes there are about C of them. We count them by the largest
*ratio* gap among the positive top eigenvalues: with ``r_i = lambda_i / lambda_{i+1}``, the count
is the i of the largest ``r_i``, provided that ratio reaches ``min_gap_ratio`` (default 1.5);
otherwise the top of the spectrum has no clean gap and the count is 0. Because the class term of
the Gauss-Newton matrix has rank C - 1 after the softmax's null direction, the clean gap is
usually after C - 1 outliers and sometimes after C (both occur in ``reports/REPORT.md``; a 2-class
softmax gives exactly 1). The gap can only be seen when k exceeds the number of outliers: ask
for at least C + 1 eigenvalues. At random initialization the top ratios measured 1.03 to 1.6
(``reports/REPORT.md``, section 2); trained digits MLPs give 1.8 to 9.

Mass fractions. With ``t = near_zero_tol * lambda_1``, the near-zero fraction is the spectral mass
in ``(-t, t)`` and the negative mass is the mass below ``-t``: the three bands partition the
spectrum. The negative mass leaves out the near-zero band on purpose: after training the bulk piles
up at zero on both sides, and an 80-node quadrature cannot tell ``-1e-6`` from ``+1e-6``. On a
trained digits MLP (P = 2,410) the mass strictly below zero was 0.33 exactly but 0.16 to 0.17 by
SLQ, while the mass below ``-t`` was 0.0054 exactly and 0.0047 to 0.0061 by SLQ (near-zero
fraction 0.951 exactly, 0.949 to 0.951 by SLQ; 10 probes, 80 steps, ``near_zero_tol = 1e-2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.engine.density import SpectralDensity

DEFAULT_MIN_GAP_RATIO = 1.5
# Eigenvalues with |lambda| below this fraction of lambda_1 count as "near zero" in SLQ estimates:
# an 80-step quadrature cannot resolve the bulk more finely than about 1% of the spectral range.
DEFAULT_NEAR_ZERO_FRACTION = 1e-2


@dataclass(frozen=True)
class SpectrumSummary:
    """What the spectrum says, in the quantities the callback logs.

    Attributes:
        outliers: number of eigenvalues above the largest ratio gap (0 when no gap reaches
            ``min_gap_ratio``).
        gap_ratio: ``lambda_i / lambda_{i+1}`` at that gap (1.0 when none).
        bulk_edge: the largest eigenvalue below the gap (``lambda_{outliers+1}``), or
            ``lambda_1`` when there is no gap.
        near_zero_fraction: fraction of the spectral mass with ``|lambda| < tol * lambda_1``
            (NaN without a density).
        negative_mass: fraction of the spectral mass below ``-tol * lambda_1``, i.e. clearly
            negative, beyond the near-zero band (NaN without a density).
    """

    outliers: int
    gap_ratio: float
    bulk_edge: float
    near_zero_fraction: float
    negative_mass: float


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
    values = torch.sort(eigenvalues.detach().double().cpu(), descending=True).values
    positive = values[values > 0]
    if positive.numel() < 2:
        return 0, 1.0
    ratios = positive[:-1] / positive[1:]
    best = int(torch.argmax(ratios))
    ratio = float(ratios[best])
    if ratio < min_gap_ratio:
        return 0, 1.0
    return best + 1, ratio


def summarize(
    eigenvalues: Tensor,
    density: SpectralDensity | None = None,
    *,
    min_gap_ratio: float = DEFAULT_MIN_GAP_RATIO,
    near_zero_tol: float = DEFAULT_NEAR_ZERO_FRACTION,
) -> SpectrumSummary:
    """Read outliers, near-zero mass and negative mass from top eigenvalues and a density.

    Args:
        eigenvalues: ``(k,)`` top eigenvalues.
        density: an SLQ estimate for the mass fractions (optional).
        min_gap_ratio: see :func:`outlier_gap`.
        near_zero_tol: eigenvalues with ``|lambda| < near_zero_tol * lambda_1`` count as near zero,
            those below ``-near_zero_tol * lambda_1`` as negative.

    Returns:
        A :class:`SpectrumSummary`.
    """
    values = torch.sort(eigenvalues.detach().double().cpu(), descending=True).values
    count, ratio = outlier_gap(values, min_gap_ratio=min_gap_ratio)
    bulk_edge = float(values[count]) if count < values.numel() else float(values[-1])
    near_zero = negative = float("nan")
    if density is not None:
        threshold = near_zero_tol * abs(float(values[0]))
        near_zero = density.mass(-threshold, threshold)
        negative = density.mass(high=-threshold)
    return SpectrumSummary(count, ratio, bulk_edge, near_zero, negative)
