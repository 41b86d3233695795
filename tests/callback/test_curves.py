"""Curves against dense float64 oracles: a tracked value is the top of its own samples' Hessian, and a
snapshot the budget shrank is exact over the batches it kept, both to their certificates."""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback, dense_hessian
from lightning_hessian.callback.schedule import Clock

from helpers import SimulatedTime, TinyMLP, cross_entropy, dataset, trainer

BATCH = 8


class WeightsAtCalls(pl.Callback):
    """After the callback under test (later in the list): a copy of the model at each of its calls."""

    def __init__(self, probe: HessianSpectrumCallback) -> None:
        self.probe, self.models = probe, {}

    def _keep(self, trainer, pl_module) -> None:
        history = self.probe.history
        if history and history[-1].step == trainer.global_step:
            self.models[(history[-1].step, history[-1].snapshot)] = copy.deepcopy(pl_module.net).double()

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._keep(trainer, pl_module)


def assert_within_certificate(eigenvalues, max_residual: float, model, batches) -> None:
    """Each value lies within its relative residual (times the spectral norm) of an eigenvalue of the
    dense float64 Hessian over ``batches``, and the top one is the top one."""
    double = [(x.double(), y) for x, y in batches]
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, double)).flip(0)
    scale = float(exact.abs().max())
    for value in eigenvalues:
        assert float((exact - value).abs().min()) <= max_residual * scale + 1e-9 * scale, (value, exact[:3])
    assert abs(eigenvalues[0] - float(exact[0])) <= max_residual * scale + 1e-9 * scale


def budgeted_run(steps: int, step_seconds: float, loss_seconds: float, **settings):
    """A default-budget run whose clock is simulated, so its plan (and any shrinking) does not depend on
    this machine's speed; the model at every call is kept."""
    simulated = SimulatedTime(step_seconds=step_seconds, loss_seconds=loss_seconds)

    class SlowSteps(TinyMLP):
        def training_step(self, batch, batch_idx):
            simulated.offset += simulated.step_seconds
            return super().training_step(batch, batch_idx)

    probe = HessianSpectrumCallback(loss_fn=simulated.loss, progress=False, tol=1e-9, **settings)
    probe.clock = Clock(now=simulated)
    kept = WeightsAtCalls(probe)
    trainer(max_steps=steps, callbacks=[probe, kept]).fit(SlowSteps(), DataLoader(dataset(64), batch_size=BATCH))
    return probe, kept.models


def test_a_tracked_value_is_the_top_of_its_own_batches_hessian_to_its_certificate():
    probe, models = budgeted_run(200, step_seconds=1.0, loss_seconds=0.01, k=2, track_k=2,
                                 track_samples=2 * BATCH, num_samples=64, density=False, keep_graph=True)
    tracked = [m for m in probe.history if not m.snapshot]
    assert len(tracked) >= 5
    subset = probe.probe_batches[:2]
    for measurement in tracked:
        assert measurement.num_samples == 2 * BATCH and len(measurement.hessian.eigenvalues) == 2
        assert_within_certificate(measurement.hessian.eigenvalues, measurement.hessian.max_residual,
                                  models[(measurement.step, False)], subset)


def test_a_snapshot_the_budget_shrank_is_exact_over_the_batches_it_kept():
    """Without kept graphs every product evaluates the loss of each batch, at 0.05 s each here: a snapshot of
    8 probe batches costs more than an eighth of the budget, the plan keeps fewer batches, and the
    snapshot's top k is the dense top k of those."""
    probe, models = budgeted_run(400, step_seconds=1.0, loss_seconds=0.05, k=3, num_samples=64, density=False,
                                 keep_graph=False)
    snapshots = [m for m in probe.history if m.snapshot]
    assert snapshots and all(m.num_samples < 64 for m in snapshots), [m.num_samples for m in snapshots]
    assert "probe batches" in probe.plan
    for measurement in snapshots:
        kept = probe.probe_batches[:measurement.num_samples // BATCH]
        assert_within_certificate(measurement.hessian.eigenvalues, measurement.hessian.max_residual,
                                  models[(measurement.step, True)], kept)


def test_tracked_calls_stop_at_track_tol_and_snapshots_at_tol():
    def run(track_tol: float) -> list:
        probe = HessianSpectrumCallback(budget=None, track_every_n_steps=1, track_tol=track_tol, tol=1e-5, k=2,
                                        num_samples=32, density=False, progress=False)
        trainer(max_steps=6, callbacks=[probe]).fit(TinyMLP(), DataLoader(dataset(64), batch_size=BATCH))
        return probe.history

    loose, tight = run(0.3), run(1e-5)
    for history, track_tol in ((loose, 0.3), (tight, 1e-5)):
        tracked = [m for m in history if not m.snapshot]
        snapshots = [m for m in history if m.snapshot]
        assert len(tracked) == 6 and len(snapshots) == 2
        assert all(m.hessian.converged == tuple(r <= track_tol for r in m.hessian.residuals) for m in tracked)
        assert all(m.hessian.max_residual <= 1e-5 for m in snapshots)
    assert max(m.hessian.max_residual for m in loose if not m.snapshot) > 1e-5  # stopped before tol
    assert sum(m.num_matvecs for m in loose) < sum(m.num_matvecs for m in tight)
