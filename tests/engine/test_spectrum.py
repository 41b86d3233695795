"""Reading a spectrum: `outlier_gap`, `bulk_outliers` and `summarize` on constructed spectra, on operators with a
chosen spectrum, and against the dense spectra of trained networks."""

import dataclasses
import functools
import math

import cases
import pytest
import torch

from lightning_hessian import (
    HessianOperator,
    SpectralDensity,
    SpectrumSummary,
    dense_hessian,
    outlier_gap,
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.spectrum import bulk_edge, bulk_outliers, dense_outliers

F64 = torch.float64


@pytest.mark.parametrize(("eigenvalues", "expected"), [
    pytest.param([9.0, 8.0, 1.0, 0.9], (2, 8.0), id="two-outliers"),
    pytest.param([1.0, 0.9, 8.0, 9.0], (2, 8.0), id="unsorted"),
    pytest.param([10.0, 9.0, 8.5, 2.0, 1.9, 1.8, -3.0], (3, 4.25), id="negatives-ignored"),
    pytest.param([12.0, 6.0, 1.0, 0.9], (2, 6.0), id="largest-ratio-wins-over-first-gap"),
    pytest.param([5.0, 4.0, 3.5, 3.0], (0, 1.0), id="no-gap-above-1.5"),
    pytest.param([5.0, -1.0, -2.0], (0, 1.0), id="one-positive"),
    pytest.param([3.0, 1.5 + 1e-9], (1, pytest.approx(2.0)), id="two-values"),
])
def test_outlier_gap_on_constructed_spectra(eigenvalues, expected):
    assert outlier_gap(torch.tensor(eigenvalues)) == expected


def test_outlier_gap_threshold_is_configurable():
    values = torch.tensor([3.0, 2.5, 1.0, 0.9])
    assert outlier_gap(values) == (2, 2.5)
    assert outlier_gap(values, min_gap_ratio=3.0) == (0, 1.0)


def _density(nodes, weights):
    nodes, weights = torch.tensor([nodes], dtype=F64), torch.tensor([weights], dtype=F64)
    return SpectralDensity(nodes=nodes, weights=weights, trace=0.0, trace_stderr=0.0, num_params=100,
                           num_matvecs=nodes.shape[1], seconds=0.0)


def test_summarize_partitions_a_constructed_spectrum_into_three_bands():
    # lambda_1 = 10, so near zero means |lambda| < 0.1 and negative means below -0.1.
    density = _density([-1.0, -0.1, -0.05, 0.0, 0.05, 0.5, 10.0], [0.1, 0.05, 0.2, 0.3, 0.15, 0.1, 0.1])
    summary = summarize(torch.tensor([10.0, 2.0, 1.5, 0.5]), density)
    assert summary.near_zero_fraction == pytest.approx(0.7)  # [-0.1, 0.1]: the edge -0.1 counts as near zero
    assert summary.negative_mass == pytest.approx(0.1)
    # The bulk (nodes up to 0.05) lies inside the near-zero band; 0.5 is 5 times the band's edge: all four are isolated.
    assert (summary.outliers, summary.saturated) == (4, False)
    assert summary.bulk_edge == pytest.approx(0.1) and summary.gap_ratio == pytest.approx(5.0)
    assert summary.gap_outliers == 1  # the ratio-gap reading: 10 / 2


def test_summarize_without_a_gap_or_a_density():
    summary = summarize(torch.tensor([1.0, 0.95, 0.9]))
    assert (summary.outliers, summary.gap_ratio, summary.bulk_edge, summary.gap_outliers) == (0, 1.0, 1.0, 0)
    assert math.isnan(summary.near_zero_fraction) and math.isnan(summary.negative_mass)


def test_summarize_without_a_density_falls_back_to_the_ratio_gap():
    summary = summarize(torch.tensor([9.0, 8.0, 1.0, 0.9]))
    assert (summary.outliers, summary.gap_ratio, summary.bulk_edge) == (2, 8.0, 1.0)
    assert (summary.gap_outliers, summary.saturated) == (2, False)


def test_summarize_tolerance_moves_the_bands():
    density = _density([-0.5, -0.01, 0.02, 4.0], [0.25, 0.25, 0.25, 0.25])
    eigenvalues = torch.tensor([4.0, 1.0])
    assert summarize(eigenvalues, density, near_zero_tol=1e-2).near_zero_fraction == pytest.approx(0.5)
    wide = summarize(eigenvalues, density, near_zero_tol=0.2)
    assert wide.near_zero_fraction == pytest.approx(0.75) and wide.negative_mass == pytest.approx(0.0)


# SLQ against the exact spectrum of the trained digits MLP (P = 2,410, tol 1e-2 lambda_1). Measured
# over seeds 0-2: near-zero fraction 0.949 to 0.951 (exact 0.951), negative mass 0.0047 to 0.0061
# (exact 0.0054). Tolerances are about five times the largest deviation seen.
NEAR_ZERO_ATOL = 0.01
NEGATIVE_ATOL = 0.003


@pytest.mark.parametrize("seed", [0, 1])
def test_near_zero_fraction_and_negative_mass_match_the_exact_spectrum(seed):
    exact = cases.trained_digits().eigenvalues
    summary = summarize(exact.flip(0)[:10], cases.digits_density(seed))
    threshold = 1e-2 * float(exact[-1])
    exact_near_zero = float((exact.abs() < threshold).double().mean())
    exact_negative = float((exact < -threshold).double().mean())
    assert exact_near_zero > 0.5 and exact_negative > 0  # the trained bulk; both quantities are informative
    assert summary.near_zero_fraction == pytest.approx(exact_near_zero, abs=NEAR_ZERO_ATOL)
    assert summary.negative_mass == pytest.approx(exact_negative, abs=NEGATIVE_ATOL)


# --- outliers isolated from the bulk ---------------------------------------------------------------------------------


def isolated_count(spectrum, ratio=2.0, tol=1e-2):
    """The definition on a whole spectrum: the eigenvalues above the lowest step of a factor ``ratio`` or more, walking
    up through every eigenvalue above ``tol * lambda_1``."""
    values = sorted((float(v) for v in spectrum), reverse=True)
    previous = tol * values[0]
    above = [v for v in reversed(values) if v > previous]
    for index, value in enumerate(above):
        if value >= ratio * previous:
            return len(above) - index
        previous = value
    return 0


# A continuous bulk: 400 zeros (a rank-deficient Hessian) and 400 eigenvalues u^2 for u evenly spaced in [0, 1], so that
# consecutive ratios above the near-zero band stay below 1.1 (P = 800 plus the outliers).
BULK = [0.0] * 400 + (torch.linspace(0, 1, 400, dtype=F64) ** 2).tolist()
# One dominant outlier: the largest ratio (20 / 4) puts the ratio gap after the first, but all three are isolated.
DOMINANT = [20.0, 4.0, 2.5]
SLQ_SETTINGS = [(1, 30), (2, 40), (3, 40), (10, 80)]


@pytest.mark.parametrize(("spectrum", "expected"), [
    pytest.param([*BULK, *DOMINANT], 3, id="dominant-outlier"),
    pytest.param(BULK, 0, id="bulk-only"),
    pytest.param([0.0, 0.0, 0.06, 0.1, 0.15, 0.25, 2.0, 5.0], 2, id="bulk-touching-the-band"),
    pytest.param([0.0, 0.0, 0.3, 0.5, 0.8, 2.0, 5.0], 5, id="bulk-away-from-the-band"),
    pytest.param([0.0, 0.0, 0.0], 0, id="zero"),
    pytest.param([-3.0, -1.0, 0.0], 0, id="non-positive"),
    pytest.param([1.0, 3.0, 9.0, 27.0], 4, id="all-isolated"),
])
def test_dense_outliers_on_constructed_spectra(spectrum, expected):
    assert dense_outliers(torch.tensor(spectrum, dtype=F64)) == isolated_count(spectrum) == expected


def _operator(outliers, bulk=BULK):
    return cases.MatrixOperator(_matrix(tuple(outliers), tuple(bulk)))


@functools.cache
def _matrix(outliers, bulk):
    return cases.matrix_with_spectrum([*bulk, *outliers])


def _read(op, k, num_probes=2, num_steps=40, seed=0, deflate=True):
    # Room for the check for missed eigenvalues when the k-th value sits in a dense bulk (measured 277).
    top = top_eigenvalues(op, k, max_matvecs=400)
    density = spectral_density(op, num_probes=num_probes, num_steps=num_steps, seed=seed,
                               deflate=top if deflate else None)
    return summarize(top.eigenvalues, density)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("num_probes", "num_steps"), SLQ_SETTINGS)
def test_known_outliers_above_a_continuous_bulk(num_probes, num_steps, seed):
    summary = _read(_operator(DOMINANT), 8, num_probes, num_steps, seed)
    assert isolated_count([*BULK, *DOMINANT]) == 3
    assert (summary.outliers, summary.saturated) == (3, False)
    assert summary.bulk_edge == pytest.approx(1.0) and summary.gap_ratio == pytest.approx(2.5)
    assert summary.gap_outliers == 1


@pytest.mark.parametrize(("num_probes", "num_steps"), SLQ_SETTINGS)
def test_a_bulk_without_outliers_reads_zero(num_probes, num_steps):
    summary = _read(_operator([]), 6, num_probes, num_steps)
    assert (summary.outliers, summary.gap_ratio, summary.saturated) == (0, 1.0, False)
    assert summary.bulk_edge == pytest.approx(1.0)  # the walk climbs to lambda_1


def test_every_top_eigenvalue_an_outlier_when_k_equals_their_number():
    # The gap lies between lambda_k and the deflated bulk: only the density can show it.
    summary = _read(_operator(DOMINANT), 3)
    assert (summary.outliers, summary.saturated) == (3, False)
    assert summary.bulk_edge == pytest.approx(1.0, rel=1e-3) and summary.gap_outliers == 1


@pytest.mark.parametrize("deflate", [True, False])
def test_outliers_beyond_k_are_flagged(deflate):
    # Five outliers in steps below 2; k = 2 leaves three in the deflated part, below the edge count (8 of P = 805).
    summary = _read(_operator([20.0, 16.0, 13.0, 10.0, 8.0]), 2, deflate=deflate)
    assert (summary.outliers, summary.saturated) == (2, True)
    assert summary.bulk_edge == pytest.approx(1.0, rel=0.05)


def _point_density(nodes, weights, num_params=100):
    return SpectralDensity(nodes=torch.tensor([nodes], dtype=F64), weights=torch.tensor([weights], dtype=F64),
                           trace=0.0, trace_stderr=0.0, num_params=num_params, num_matvecs=len(nodes), seconds=0.0)


def test_a_single_stray_node_does_not_make_the_bulk_edge():
    # Counts P w: 90 at 0, 9 at 0.4, 1 at 5: the edge needs 5 eigenvalues, so it is 0.4, not the stray node at 5.
    density = _point_density([0.0, 0.4, 5.0], [0.90, 0.09, 0.01])
    assert bulk_edge(density) == 0.4
    assert bulk_edge(density, count=0.5) == 5.0
    assert bulk_edge(density, below=0.3) == 0.0  # everything counts from the node at 0
    assert bulk_edge(density, below=0.0) == -math.inf
    # The stray node is 12.5 times the edge: it is the gap, below lambda_k = 6, so the count is saturated.
    assert bulk_outliers(torch.tensor([7.0, 6.0], dtype=F64), density) == (2, 12.5, 0.4, True)


def test_a_zero_hessian_is_all_near_zero_and_has_no_outliers():
    # What Lanczos gives a zero operator: T = 0, every node at 0. The band [-t, t] with t = 0 still holds them.
    density = _point_density([0.0] * 4, [0.25] * 4)
    summary = summarize(torch.zeros(3, dtype=F64), density)
    assert (summary.outliers, summary.gap_ratio, summary.bulk_edge, summary.saturated) == (0, 1.0, 0.0, False)
    assert summary.near_zero_fraction == 1.0 and summary.negative_mass == 0.0


def test_non_positive_top_eigenvalues_have_no_outliers():
    density = _point_density([-2.0, -1.0], [0.5, 0.5])
    assert bulk_outliers(torch.tensor([-0.5, -0.7], dtype=F64), density) == (0, 1.0, -0.5, False)


def test_a_bulk_inside_the_near_zero_band_starts_the_walk_at_the_band():
    # A negative bulk: lambda_1 = 5, so the walk starts at 0.05 and 3 is 60 times that.
    summary = _read(_operator([5.0, 3.0], bulk=(-torch.linspace(0, 1, 300, dtype=F64)).tolist()), 4)
    assert (summary.outliers, summary.saturated) == (2, False)
    assert summary.bulk_edge == pytest.approx(0.05) and summary.gap_ratio == pytest.approx(60.0)


def test_the_summary_round_trips_through_a_dict_and_keeps_its_positional_form():
    summary = SpectrumSummary(3, 2.5, 1.0, 0.9, 0.01, 1, True)
    assert SpectrumSummary(**dataclasses.asdict(summary)) == summary
    assert SpectrumSummary(1, 4.0, 0.5, math.nan, math.nan).gap_outliers == -1


def _digits_net(classes):
    from lightning_hessian.paper.data import digits_tensors
    from lightning_hessian.paper.spectra import cross_entropy, train_net

    net = train_net(digits_tensors(classes, 0.5565, scaling="unit"), 20, 0)
    return HessianOperator(net.model, cross_entropy, [(net.x, net.y)], dtype=F64), dense_hessian(
        net.model, cross_entropy, [(net.x, net.y)])


@pytest.mark.parametrize(("classes", "gap_reading"), [(3, 1), (6, 4)])
def test_trained_digits_nets_against_their_dense_spectrum(classes, gap_reading):
    # MLP 64-20-20-C of the reproduction (30 epochs of SGD on digits 0..C-1 in [0, 1]). Exact: the definition on all
    # M = 1,783 (C = 3) or 1,846 (C = 6) eigenvalues; estimate: the top 2C + 2 and 2 probes x 40 steps, deflated.
    op, hessian = _digits_net(classes)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    count = isolated_count(exact)
    assert dense_outliers(exact) == count
    summary = _read(op, 2 * classes + 2)
    assert count == classes - 1 and summary.outliers == count and not summary.saturated
    assert summary.bulk_edge == pytest.approx(float(exact[count]), rel=1e-6)
    assert summary.gap_outliers == gap_reading  # the ratio gap: 2.6 / 0.48 for C = 3, 1.49 / 0.54 after 4 for C = 6


def test_a_trained_net_without_a_gap_reads_zero_like_its_dense_spectrum():
    # Standardized digits (64-24-24-10, P = 2,410): no step reaches 2 (the top 24 climb in steps of at most 1.39).
    problem = cases.trained_digits()
    op = HessianOperator(problem.model(), cases.cross_entropy, problem.batches, dtype=F64)
    assert isolated_count(problem.eigenvalues) == 0
    assert _read(op, 22, num_probes=1, num_steps=30).outliers == 0
