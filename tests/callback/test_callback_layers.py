"""The callback's layer views and gradient overlap: real Trainer runs, dense oracles, real TensorBoard files."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback, dense_hessian
from lightning_hessian.engine.layers import layer_slices, parameter_layout

from helpers import TinyMLP, cross_entropy, dataset, trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = TinyMLP(dtype=torch.float64)
    callback = HessianSpectrumCallback(budget=None, k=3, num_samples=24, loss_fn=cross_entropy, tol=1e-6,
                                       layer_views=True, grad_overlap=True, num_probes=64, num_steps=10)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="tb")
    trainer(max_steps=3, logger=logger, callbacks=[callback]).fit(
        model, DataLoader(dataset(40, dtype=torch.float64), batch_size=8)
    )
    return model, callback, logger.log_dir


def test_layer_views_match_dense_blocks(run):
    model, callback, _ = run
    record = callback.history[-1]
    hessian = dense_hessian(model, cross_entropy, callback.probe_batches)
    top_vector = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    views = record.hessian.layer_views
    assert set(views) == {"net.0", "net.2"}
    for name, cut in layer_slices(parameter_layout(model)).items():
        exact_trace = float(hessian[cut, cut].diagonal().sum())
        assert abs(views[name].trace - exact_trace) <= 4 * views[name].trace_stderr + 1e-12, name
        assert views[name].eig_1_mass == pytest.approx(float(top_vector[cut].pow(2).sum()), abs=1e-6)


def test_gradient_overlap_matches_dense_eigenspace(run):
    model, callback, _ = run
    batches = callback.probe_batches
    total = sum(b[0].shape[0] for b in batches)
    loss = sum(cross_entropy(model, b) * b[0].shape[0] for b in batches) / total
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    basis = torch.linalg.eigh(dense_hessian(model, cross_entropy, batches)).eigenvectors[:, -3:]
    exact = float((basis.T @ gradient).pow(2).sum() / gradient.pow(2).sum())
    assert callback.history[-1].hessian.grad_overlap == pytest.approx(exact, abs=1e-6)
    assert all(p.grad is None or not p.grad.isnan().any() for p in model.parameters())


def test_new_tags_reach_tensorboard(run):
    _, callback, log_dir = run
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    steps = [r.step for r in callback.history]
    for tag in ("hessian/grad_overlap", "hessian/layer/net.0/trace", "hessian/layer/net.2/eig_1_mass"):
        assert [e.step for e in events.Scalars(tag)] == steps, tag
