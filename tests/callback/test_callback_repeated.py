"""The callback on a model whose every Hessian eigenvalue comes twice: Lightning's BoringModel."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from lightning_hessian import HessianSpectrumCallback, dense_hessian

from helpers import trainer


def _boring_loss(module, batch):
    return module.training_step(batch, 0)["loss"]


@pytest.mark.parametrize("density", [True, False], ids=["checked-by-the-density", "checked-by-the-engine"])
def test_boring_model_logs_both_copies_of_each_eigenvalue(density):
    """Its two outputs see the same inputs through separate weights, so the Hessian is blockdiag(A, A).
    A one-vector Krylov space sees one copy of each value; the logged top 5 must hold both."""
    pl.seed_everything(0)
    callback = HessianSpectrumCallback(k=5, density=density, budget=None)  # full snapshots, whatever the cost
    model = BoringModel()
    trainer(max_epochs=1, limit_train_batches=8, callbacks=[callback]).fit(model)
    record = callback.history[-1].hessian
    exact = torch.linalg.eigvalsh(dense_hessian(model, _boring_loss, callback.probe_batches)).flip(0)[:5]
    assert torch.allclose(exact[0], exact[1]) and torch.allclose(exact[2], exact[3])
    assert all(record.converged)
    torch.testing.assert_close(torch.tensor(record.eigenvalues, dtype=torch.float64), exact, rtol=1e-5, atol=0)
    if density:  # the outliers and the deflated nodes are the corrected pairs
        deflated = record.density.deflated
        torch.testing.assert_close(deflated, torch.tensor(record.eigenvalues, dtype=torch.float64))
