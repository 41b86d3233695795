"""The histograms the loggers show, against spectra known exactly."""

import pytest

from lightning_hessian.engine import spectral_density, top_eigenvalues
from lightning_hessian.engine.linear_operator import DiagonalOperator
from lightning_hessian.loggers import bulk_histogram, top_k_histogram


def test_the_density_keeps_what_it_deflated_and_the_bulk_view_leaves_exactly_that_out():
    op = DiagonalOperator([0.0] * 6 + [1.0, 5.0])  # P = 8: six at 0, one at 1, one at 5
    top = top_eigenvalues(op, k=1)
    density = spectral_density(op, num_probes=2, num_steps=3, deflate=top)
    assert density.deflated.tolist() == pytest.approx([5.0], rel=1e-12)
    mask = density.deflated_mask
    assert mask.shape == density.nodes.shape and mask.sum(dim=1).tolist() == [1, 1]
    assert density.nodes[mask].tolist() == pytest.approx([5.0, 5.0], rel=1e-12)
    assert density.weights[mask].tolist() == pytest.approx([1 / 8, 1 / 8], rel=1e-12)
    edges, counts = bulk_histogram(density, num_bins=50)
    assert float(counts.sum()) == pytest.approx(7, rel=0.01) and float(edges[-1]) < 5.0  # kernel tails past edges
    assert float(top_k_histogram([5.0])[1].sum()) == 1.0


def test_no_bulk_view_when_nothing_was_deflated():
    """Without deflation the SLQ nodes estimate the top k too and no bulk can be told apart."""
    plain = spectral_density(DiagonalOperator([0.0] * 6 + [1.0, 5.0]), num_probes=2, num_steps=3)
    assert plain.deflated is None and plain.deflated_mask is None
    assert bulk_histogram(plain) is None
