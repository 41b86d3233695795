"""Modules and set-ups a new user brings: each trains with the callback exactly as it does without it."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_hessian import HessianSpectrumCallback

from helpers import NUM_CLASSES, NUM_FEATURES, ProtocolMLP, TinyMLP, dataset, trainer


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _fit(model: pl.LightningModule, loader, callback: HessianSpectrumCallback | None, seed: int = 3, **kwargs):
    pl.seed_everything(seed, verbose=False)
    run = trainer(callbacks=[callback] if callback else [], **kwargs)
    run.fit(model, loader)
    return run


def _assert_same_training(make_model, make_loader, callback, **kwargs):
    """Training with the callback gives bit-identical weights to training without it."""
    pl.seed_everything(0, verbose=False)
    plain = make_model()
    pl.seed_everything(0, verbose=False)
    probed = make_model()
    _fit(plain, make_loader(), None, **kwargs)
    _fit(probed, make_loader(), callback, **kwargs)
    for a, b in zip(_weights(plain), _weights(probed), strict=True):
        assert torch.equal(a, b)
    return plain, probed


class Stateful(pl.LightningModule):
    """Carries a hidden state from one training step to the next, and counts the samples it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(NUM_FEATURES, NUM_CLASSES)
        self.hidden: torch.Tensor | None = None
        self.samples_seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hidden is None:
            self.hidden = torch.zeros_like(x)
        out = self.net(x + self.hidden)
        self.hidden = x.detach()
        self.samples_seen += len(x)
        return F.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_state_that_training_step_keeps_on_the_module_is_isolated():
    """The hidden state and counter are put back after every loss evaluation: no crash on a size
    mismatch, the same weights, the same count (it used to read 576 instead of 192)."""
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=40, num_steps=4, num_probes=2, tol=1e-4)
    plain, probed = _assert_same_training(Stateful, lambda: DataLoader(dataset(96), batch_size=16),
                                          callback, max_epochs=2)
    assert probed.samples_seen == plain.samples_seen == 192
    assert [r.step for r in callback.history] == [0, 2, 4, 6, 8, 10, 12]


class SkipsNonFinite(TinyMLP):
    """Lightning's idiom: return None to skip a batch whose loss is not finite."""

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        if self.global_step >= 4:
            loss = loss * float("inf")
        return None if not torch.isfinite(loss) else loss


def test_a_training_step_that_returns_none_is_reported_and_training_continues():
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, density=False)
    run = trainer(max_steps=8, callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="no spectrum at step 4"):
        run.fit(SkipsNonFinite(), DataLoader(dataset(), batch_size=8))
    assert run.global_step == 8
    assert [r.step for r in callback.history] == [0, 2]
    assert [(e.step, e.reason) for e in callback.events] == [(4, "no_loss"), (6, "no_loss"), (8, "no_loss")]
    assert math.isnan(float(run.callback_metrics["hessian/eig_1"]))  # not the stale value of step 2
    assert float(run.callback_metrics["hessian/nonfinite"]) == 1.0


class Chatty(TinyMLP):
    """Logs through the logger directly on the first batch of every epoch."""

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        if batch_idx == 0:
            self.logger.log_metrics({"first_batch_loss": float(loss), "batch_size": float(len(batch[0]))},
                                    step=self.global_step)
        self.logger.experiment  # noqa: B018 - touching the experiment must work too
        return loss


def test_direct_logger_calls_and_first_batch_work_do_not_run_again(tmp_path):
    rows = {}
    for name, callback in (("plain", None), ("probed", HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16,
                                                                                 density=False))):
        _fit(Chatty(), DataLoader(dataset(48), batch_size=8), callback, max_epochs=2,
             logger=CSVLogger(tmp_path, name=name), log_every_n_steps=1)
        with open(tmp_path / name / "version_0" / "metrics.csv") as handle:
            rows[name] = [r for r in csv.DictReader(handle) if r.get("first_batch_loss")]
    assert [(r["step"], r["batch_size"]) for r in rows["probed"]] == [(r["step"], r["batch_size"])
                                                                       for r in rows["plain"]] == [("0", "8.0"),
                                                                                                   ("6", "8.0")]


class Augmented(Dataset):
    """Random augmentation in the worker processes."""

    def __init__(self) -> None:
        self.data = dataset(64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return x + 0.1 * torch.randn(NUM_FEATURES), y


def test_persistent_workers_with_random_augmentation_are_not_disturbed():
    def loader():
        return DataLoader(Augmented(), batch_size=16, shuffle=True, num_workers=2, persistent_workers=True)

    callback = HessianSpectrumCallback(every_n_steps=4, k=2, num_samples=32, density=False)
    _assert_same_training(TinyMLP, loader, callback, max_steps=12)


class OneShotStream(IterableDataset):
    """A stream that cannot be read twice: every sample comes once from a shared source."""

    def __init__(self, source: list) -> None:
        self.source = source

    def __iter__(self):
        while self.source:
            yield self.source.pop(0)


def test_a_one_shot_stream_keeps_its_samples_when_the_probe_data_is_given():
    samples = [dataset(96)[i] for i in range(96)]
    probe = [(torch.stack([x for x, _ in samples[:32]]), torch.stack([y for _, y in samples[:32]]))]
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, dataloader=probe, density=False)
    _assert_same_training(TinyMLP, lambda: DataLoader(OneShotStream(list(samples)), batch_size=16), callback,
                          max_steps=6)
    assert callback.history[-1].num_samples == 32  # a list of batches is probe data, not a collection of loaders
    drawing = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, density=False)
    with pytest.warns(UserWarning, match="one-shot stream"):
        trainer(max_steps=2, callbacks=[drawing]).fit(TinyMLP(), DataLoader(OneShotStream(list(samples)),
                                                                            batch_size=16))


def test_k_above_the_number_of_parameters_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"k=60 exceeds the number of trainable parameters \(51\)"):
        trainer(max_steps=1, callbacks=[HessianSpectrumCallback(k=60)]).fit(TinyMLP(), DataLoader(dataset()))


def test_two_callbacks_keep_their_own_tags_and_history_files(tmp_path):
    cheap = HessianSpectrumCallback(every_n_steps=1, k=1, density=False, num_samples=16, name="curvature/cheap")
    full = HessianSpectrumCallback(every_n_steps=2, k=3, num_steps=6, num_probes=2, num_samples=16)
    run = trainer(max_steps=4, callbacks=[cheap, full], logger=CSVLogger(tmp_path, name="csv"))
    run.fit(ProtocolMLP(), DataLoader(dataset(), batch_size=8))
    with open(f"{run.logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r.get("curvature/cheap/eig_1")] == [0, 1, 2, 3, 4]
    assert [int(r["step"]) for r in rows if r.get("hessian/eig_1")] == [0, 2, 4]
    written = sorted(p.name for p in (tmp_path / "csv" / "version_0").glob("*_history.json"))
    assert written == ["curvature_cheap_history.json", "hessian_history.json"]


class ManualTwoOptimizers(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def hessian_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(self.hessian_loss(batch))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_a_global_step_that_advances_by_two_still_meets_every_multiple():
    callback = HessianSpectrumCallback(every_n_steps=5, k=2, num_samples=16, density=False, at_end=False)
    trainer(max_steps=20, callbacks=[callback]).fit(ManualTwoOptimizers(), DataLoader(dataset(80), batch_size=8))
    assert [r.step for r in callback.history] == [0, 6, 10, 16, 20]


class WithHyperparameters(TinyMLP):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()


def test_the_settings_reach_tensorboards_hparams_tab_next_to_the_modules(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, density=False)
    trainer(max_steps=2, logger=logger, callbacks=[callback]).fit(WithHyperparameters(), DataLoader(dataset(),
                                                                                                   batch_size=8))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert {"lr", "hessian/k", "hessian/budget"} <= set(session.hparams)
    assert session.hparams["hessian/k"].number_value == 2


def test_fast_dev_run_takes_one_cheap_measurement_after_the_last_step():
    callback = HessianSpectrumCallback(k=5, num_samples=16)
    trainer(fast_dev_run=3, callbacks=[callback]).fit(ProtocolMLP(), DataLoader(dataset(), batch_size=8))
    [record] = callback.history
    assert record.step == 3 and len(record.hessian.eigenvalues) == 2
    assert record.num_matvecs <= 12 + 8


def test_numpy_counts_are_accepted():
    callback = HessianSpectrumCallback(every_n_steps=np.int64(2), k=np.int64(2), num_samples=16, density=False)
    trainer(max_steps=2, callbacks=[callback]).fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in callback.history] == [0, 2]
