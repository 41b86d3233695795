"""Reading a spectrum: `outlier_gap` and `summarize` on constructed spectra and against an exact spectrum."""

import math

import cases
import pytest
import torch

from lightning_hessian import SpectralDensity, outlier_gap, summarize

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
    assert summary.outliers == 1 and summary.gap_ratio == pytest.approx(5.0) and summary.bulk_edge == 2.0
    assert summary.near_zero_fraction == pytest.approx(0.7)  # [-0.1, 0.1): the edge -0.1 counts as near zero
    assert summary.negative_mass == pytest.approx(0.1)


def test_summarize_without_a_gap_or_a_density():
    summary = summarize(torch.tensor([1.0, 0.95, 0.9]))
    assert (summary.outliers, summary.gap_ratio, summary.bulk_edge) == (0, 1.0, 1.0)
    assert math.isnan(summary.near_zero_fraction) and math.isnan(summary.negative_mass)


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
