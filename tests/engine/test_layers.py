"""Layer views against the dense Hessian: block traces, eigenvector mass, gradient overlap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian import HessianOperator, dense_hessian, top_eigenvalues
from lightning_hessian.engine.layers import (
    gradient_overlap,
    layer_slices,
    layer_traces,
    mass_by_layer,
    parameter_layout,
)


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    x, y = torch.randn(80, 6, dtype=torch.float64), torch.randint(0, 4, (80,))
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    return model, batches, HessianOperator(model, _loss, batches), dense_hessian(model, _loss, batches)


def test_layer_slices_cover_the_flat_vector(problem):
    _, _, op, _ = problem
    slices = layer_slices(parameter_layout(op.model))
    assert list(slices) == ["0", "2"]
    assert slices["0"] == slice(0, 6 * 12 + 12) and slices["2"] == slice(84, op.num_params)


def test_layer_traces_are_unbiased_block_traces(problem):
    _, _, op, hessian = problem
    traces = layer_traces(op, parameter_layout(op.model), num_probes=100, seed=1)
    for layer, cut in layer_slices(parameter_layout(op.model)).items():
        exact = float(hessian[cut, cut].diagonal().sum())
        estimate, stderr = traces[layer]
        assert abs(estimate - exact) <= 4 * stderr + 1e-12, layer
    with pytest.raises(ValueError, match="num_probes"):
        layer_traces(op, parameter_layout(op.model), num_probes=0)


def test_mass_by_layer_sums_to_one_and_matches_dense_eigenvectors(problem):
    _, _, op, hessian = problem
    result = top_eigenvalues(op, 3)
    mass = mass_by_layer(parameter_layout(op.model), result.eigenvectors)
    torch.testing.assert_close(sum(mass.values()), torch.ones(3, dtype=torch.float64))
    vectors = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    for layer, cut in layer_slices(parameter_layout(op.model)).items():
        assert mass[layer][0] == pytest.approx(float(vectors[cut].pow(2).sum()), abs=1e-8)


def test_gradient_overlap(problem):
    hessian = problem[3]
    basis = torch.linalg.eigh(hessian).eigenvectors[:, -3:].T
    inside = basis[0] * 2 - basis[2]
    assert gradient_overlap(inside, basis) == pytest.approx(1.0)
    outside = torch.linalg.eigh(hessian).eigenvectors[:, 0]
    assert gradient_overlap(outside, basis) == pytest.approx(0.0, abs=1e-12)
    assert gradient_overlap(inside + outside, basis) == pytest.approx(5 / 6)


def test_operator_gradient_is_the_mean_loss_gradient(problem):
    model, batches, op, _ = problem
    total = sum(b[0].shape[0] for b in batches)
    loss = sum(_loss(model, b) * b[0].shape[0] for b in batches) / total
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(op.gradient(), expected, rtol=1e-12, atol=1e-14)
    op.matvec(torch.ones(op.num_params, dtype=torch.float64))  # with the graphs kept, the same again
    torch.testing.assert_close(op.gradient(), expected, rtol=1e-12, atol=1e-14)
