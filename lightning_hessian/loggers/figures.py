"""The package's one figure style, and the histograms of a spectrum that the loggers show.

Every histogram counts eigenvalues: ``(edges, counts)``, ``(num_bins + 1,)`` bin edges and
``(num_bins,)`` counts, float64.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_hessian.engine import SpectralDensity
from lightning_hessian.engine.density import DEFAULT_SIGMA_FRACTION
from lightning_hessian.measurement import MatrixMeasurement

# Bins of the density histogram: fine enough to show the outliers apart from the bulk, coarse
# enough that TensorBoard's rebinning (about 30 buckets on screen) has something to merge.
NUM_BINS = 200


# The figure's log-scaled density axis stops this far below the peak.
_FLOOR_FRACTION = 1e-6


# 512 x 320 pixels: readable in TensorBoard's image panel, and a third cheaper to render than 100 dpi.
_DPI = 80

SAVE_DPI = 120
"""Resolution of the figures written to files (reports, interpolation plots), in dots per inch."""


def new_figure(width: float, height: float, *, dpi: float | None = None, constrained: bool = True) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches, made without pyplot (no global backend or
    figure manager is touched, so it is safe inside a training run and needs no closing).

    Args:
        width, height: the size in inches.
        dpi: the resolution it renders at when logged (default matplotlib's).
        constrained: constrained layout (labels never overlap); off for figures logged at every call,
            which set fixed margins because the layout engine dominates their drawing time.

    Example:
        >>> figure = new_figure(4, 3)
        >>> figure.get_size_inches().tolist(), figure.get_layout_engine() is not None
        ([4.0, 3.0], True)
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained" if constrained else None)


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` at :data:`SAVE_DPI`, creating parent folders; the suffix picks the format.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_figure(new_figure(2, 2), Path(folder) / "plots" / "empty.png").name
        'empty.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=SAVE_DPI)
    return path


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


def bulk_histogram(density: SpectralDensity, num_bins: int = NUM_BINS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The P - k eigenvalues below the deflated top k, as a histogram over their own range.

    Computed from the raw SLQ nodes and weights with the k deflated nodes (``density.deflated_mask``)
    left out: each remaining node
    spreads its weight over the bins as a Gaussian of width 1% of the bulk's range (the same kernel as
    :meth:`~lightning_hessian.engine.SpectralDensity.density`, integrated over each bin), times P.
    The range is the bulk's, not the whole spectrum's, so the bulk keeps its shape instead of one bin.

    Args:
        density: an SLQ estimate.
        num_bins: number of bins.

    Returns:
        ``(edges, counts)`` as in :func:`density_histogram`, the counts summing to about P - k;
        ``None`` when nothing was deflated (then the SLQ nodes estimate the top k too, and no bulk
        can be told apart honestly).

    Example:
        >>> nodes = torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64)  # 8 eigenvalues: 0 (x6), 1 and 5
        >>> weights = torch.tensor([[6 / 8, 1 / 8, 1 / 8]], dtype=torch.float64)
        >>> density = SpectralDensity(nodes, weights, trace=6.0, trace_stderr=0.0, num_params=8, num_matvecs=0,
        ...                           seconds=0.0, deflated=torch.tensor([5.0], dtype=torch.float64),
        ...                           deflated_mask=torch.tensor([[False, False, True]]))  # 5 placed exactly
        >>> edges, counts = bulk_histogram(density)
        >>> round(float(counts.sum()), 1), round(float(edges[0]), 2), round(float(edges[-1]), 2)  # 7 in [0, 1]
        (7.0, -0.03, 1.03)
        >>> import dataclasses
        >>> bulk_histogram(dataclasses.replace(density, deflated=None, deflated_mask=None)) is None  # no bulk
        True
    """
    mask = density.deflated_mask
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
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
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
        deflated = measured.density.deflated
        # The bulk below the top k, when all k were deflated (a call deflates only converged pairs).
        bulk = bulk_histogram(measured.density, num_bins) \
            if deflated is not None and deflated.numel() == len(measured.eigenvalues) else None
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
    from matplotlib.ticker import LogFormatter

    figure = new_figure(6.4, 4.0, dpi=_DPI, constrained=False)
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
