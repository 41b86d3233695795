"""Values are current or absent: ModelCheckpoint and EarlyStopping monitoring a tag see the value measured
at the step they check, never an older one, under the default (budgeted) schedule too."""

from __future__ import annotations

import math
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianSpectrumCallback

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
TAG = "hessian/eig_1"


class MLP(pl.LightningModule):
    def __init__(self, validate: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.validate = validate

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def val_dataloader(self):
        return _loader(shuffle=False) if self.validate else []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _loader(shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 8, generator=generator), torch.randint(0, 4, (160,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=20, shuffle=shuffle)


class Spy(pl.Callback):
    """Records what a monitor would read: the tag in ``callback_metrics`` at each check point."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, float | None]] = []

    def _record(self, trainer, hook):
        value = trainer.callback_metrics.get(TAG)
        self.seen.append((hook, trainer.global_step, None if value is None else float(value)))

    def on_train_batch_end(self, trainer, *args):
        self._record(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, "epoch")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(trainer, "validation")


def _measured(callback: HessianSpectrumCallback) -> dict[int, float]:
    return {m.step: float(torch.tensor(m.hessian.eigenvalues[0], dtype=torch.float32)) for m in callback.history}


def test_model_checkpoint_scores_every_epochs_checkpoint_with_its_own_value_under_the_default_schedule(tmp_path):
    pl.seed_everything(0, verbose=False)
    callback = HessianSpectrumCallback(k=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=TAG, mode="min", save_top_k=-1, filename="{epoch}-{step}")
    pl.Trainer(max_epochs=4, callbacks=[callback, checkpoint], **QUIET).fit(MLP(), _loader())
    measured = _measured(callback)
    scores = {int(os.path.basename(path).split("step=")[1].split(".")[0]): float(score)
              for path, score in checkpoint.best_k_models.items()}
    assert sorted(scores) == [8, 16, 24, 32]
    for step, score in scores.items():
        assert score == pytest.approx(measured[step], rel=1e-6), step
    assert len(set(scores.values())) == 4
    best = min(scores, key=scores.get)
    assert checkpoint.best_model_path.endswith(f"step={best}.ckpt")


@pytest.mark.parametrize("schedule", [{}, {"every_n_steps": 5}], ids=["budget", "every_n_steps"])
def test_a_monitor_sees_the_value_of_its_own_step_or_none(schedule):
    pl.seed_everything(0, verbose=False)
    callback, spy = HessianSpectrumCallback(k=2, density=False, **schedule), Spy()
    stopping = EarlyStopping(monitor=TAG, mode="min", patience=100)
    pl.Trainer(max_epochs=3, callbacks=[callback, stopping, spy], enable_checkpointing=False, **QUIET).fit(
        MLP(), _loader())
    measured = _measured(callback)
    for hook, step, value in spy.seen:
        if value is None:
            assert hook == "batch" and step not in measured, (hook, step)
        else:
            assert value == pytest.approx(measured[step], rel=1e-6), (hook, step)
    assert all(value is not None for hook, _, value in spy.seen if hook == "epoch")
    assert stopping.best_score.item() == pytest.approx(min(v for s, v in measured.items() if s in (8, 16, 24)))


def test_without_monitors_an_old_value_leaves_callback_metrics_once_training_moves_on():
    pl.seed_everything(0, verbose=False)
    callback, spy = HessianSpectrumCallback(k=2, density=False, every_n_steps=4), Spy()
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, spy], enable_checkpointing=False, **QUIET)
    trainer.fit(MLP(), _loader())
    measured = _measured(callback)
    assert sorted(measured) == [0, 4, 8, 12, 16]
    present = {step for hook, step, value in spy.seen if hook == "batch" and value is not None}
    assert present == {4, 8, 12, 16}
    assert float(trainer.callback_metrics[TAG]) == pytest.approx(measured[16])


def test_early_stopping_and_checkpoints_on_mid_epoch_validation_see_current_values(tmp_path):
    pl.seed_everything(0, verbose=False)
    callback, spy = HessianSpectrumCallback(k=2, density=False), Spy()
    stopping = EarlyStopping(monitor=TAG, mode="min", patience=100, strict=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=TAG, save_top_k=-1, filename="{step}")
    pl.Trainer(max_epochs=2, val_check_interval=0.5, callbacks=[callback, stopping, checkpoint, spy], **QUIET).fit(
        MLP(validate=True), _loader())
    measured = _measured(callback)
    checks = [(step, value) for hook, step, value in spy.seen if hook == "validation"]
    assert [step for step, _ in checks] == [4, 8, 12, 16]
    assert all(value == pytest.approx(measured[step], rel=1e-6) for step, value in checks)
    assert len(checkpoint.best_k_models) == 4


def test_a_model_checkpoint_on_steps_gets_a_measurement_at_each_of_its_steps(tmp_path):
    pl.seed_everything(0, verbose=False)
    callback = HessianSpectrumCallback(k=2, density=False, budget=None, at_start=False, at_end=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=TAG, save_top_k=-1, every_n_train_steps=3,
                                 filename="{step}")
    pl.Trainer(max_epochs=1, callbacks=[callback, checkpoint], **QUIET).fit(MLP(), _loader())
    measured = _measured(callback)
    assert sorted(measured) == [3, 6, 8]  # every 3 steps, and the epoch's end
    assert all(not math.isnan(float(score)) for score in checkpoint.best_k_models.values())


def test_a_monitor_on_a_timer_is_named_in_a_warning_at_setup(tmp_path):
    from datetime import timedelta

    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=TAG, train_time_interval=timedelta(seconds=30))
    callback = HessianSpectrumCallback(k=2, density=False, budget=None, at_end=False)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='hessian/eig_1'\) checks on a timer"):
        pl.Trainer(max_steps=1, callbacks=[callback, checkpoint], **QUIET).fit(MLP(), _loader())


class CountingTrainer:
    """A trainer whose ``callback_metrics`` counts its reads (Lightning computes every logged metric on each)."""

    def __init__(self) -> None:
        self.global_step, self.reads, self.metrics = 0, 0, {"loss": torch.tensor(1.0)}

    @property
    def callback_metrics(self) -> dict:
        self.reads += 1
        return self.metrics


def test_callback_metrics_is_read_after_a_batch_only_while_it_may_hold_the_callbacks_values():
    from lightning_hessian.callback.monitors import Monitors

    trainer, monitors = CountingTrainer(), Monitors("hessian")
    for trainer.global_step in (1, 2):
        monitors.after_batch(trainer)
    assert trainer.reads == 0
    monitors.called_step, monitors.placed = 2, True  # a call at step 2 put its values there
    trainer.metrics["hessian/eig_1"] = torch.tensor(3.0)
    monitors.after_batch(trainer)  # still step 2: current
    assert trainer.reads == 0 and "hessian/eig_1" in trainer.metrics
    for trainer.global_step in (3, 4, 5):
        monitors.after_batch(trainer)
    assert trainer.reads == 1 and set(trainer.metrics) == {"loss"}
