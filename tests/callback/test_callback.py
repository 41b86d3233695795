"""HessianSpectrumCallback in real CPU Trainer runs: schedule, exactness, isolation, contexts, resume."""

from __future__ import annotations

import ast
import csv
import dataclasses
import inspect
import logging
import math
import textwrap
import time
import types

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback, dense_ggn, dense_hessian
from lightning_hessian.callback.config import CallbackConfig
from lightning_hessian.loggers import scalar_metrics

from helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    ProtocolMLP,
    TinyMLP,
    assert_eigenvalues,
    cross_entropy,
    dataset,
    top_dense,
    trainer,
)


class NoisyNet(pl.LightningModule):
    """BatchNorm + dropout + a torchmetrics metric: everything a measurement could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(8, NUM_CLASSES))
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES)
        self.seen: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(float(batch[0].sum()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.accuracy(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.accuracy, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ManualMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class AttentionNet(ProtocolMLP):
    """Self-attention over the features (fused kernels have no double backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net[0](x).reshape(x.shape[0], 1, 3, 2)  # 4-d: the CPU flash kernel
        mixed = F.scaled_dot_product_attention(tokens, tokens, tokens).reshape(x.shape[0], 6)
        return self.net[2](torch.tanh(mixed))


class PoisonedMLP(TinyMLP):
    """Its weights turn NaN after optimizer step 3; training goes on."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 3:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")



# --- construction ------------------------------------------------------------------------------

def test_zero_argument_construction():
    callback = HessianSpectrumCallback()
    assert callback.config.k == 5 and callback.config.matrix == "hessian" and callback.history == []


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        pytest.param({"k": 0}, ValueError, "k=0", id="k"),
        pytest.param({"every_n_steps": -5}, ValueError, "every_n_steps", id="every_n_steps"),
        pytest.param({"every_n_steps": 0}, ValueError, "every_n_steps", id="every_n_steps-zero"),
        pytest.param({"every_n_epochs": -1}, ValueError, "every_n_epochs", id="every_n_epochs"),
        pytest.param({"matrix": "fisher"}, ValueError, "matrix", id="matrix"),
        pytest.param({"mode": "test"}, ValueError, "mode", id="mode"),
        pytest.param({"num_probes": 0}, ValueError, "num_probes", id="num_probes"),
        pytest.param({"num_steps": 0}, ValueError, "num_steps", id="num_steps"),
        pytest.param({"num_samples": 0}, ValueError, "num_samples", id="num_samples"),
        pytest.param({"batch_size": 0}, ValueError, "batch_size", id="batch_size"),
        pytest.param({"tol": 0.0}, ValueError, "tol", id="tol"),
        pytest.param({"track_tol": 1.0}, ValueError, "track_tol", id="track_tol"),
        pytest.param({"max_matvecs": 2, "k": 3}, ValueError, "max_matvecs", id="max_matvecs"),
        pytest.param({"budget": 1.5}, ValueError, "budget", id="budget"),
        pytest.param({"budget": "half"}, ValueError, "budget", id="budget-string"),
        pytest.param({"density": "yes"}, TypeError, "density", id="flag"),
        pytest.param({"history_file": 123}, TypeError, "history_file", id="history_file"),
        pytest.param({"keep_graph": "sometimes"}, ValueError, "keep_graph", id="keep_graph"),
        pytest.param({"basis_dtype": "float16"}, ValueError, "basis_dtype", id="basis_dtype"),
        pytest.param({"max_basis": 3, "k": 5}, ValueError, "max_basis", id="max_basis"),
        pytest.param({"seed": -1}, ValueError, "seed", id="seed"),
        pytest.param({"every_n_steps": None, "log_spaced": True}, ValueError, "log_spaced", id="log_spaced"),
        pytest.param({"layers": "net.0.*"}, TypeError, "layers", id="layers"),
        pytest.param({"loss_fn": "cross_entropy"}, TypeError, "loss_fn", id="loss_fn"),
        pytest.param({"k": 2.5}, ValueError, "k=2.5", id="k-float"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        HessianSpectrumCallback(**kwargs)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="top_k"):
        HessianSpectrumCallback(top_k=3)


def test_schedule_predicate():
    every = HessianSpectrumCallback(every_n_steps=10)
    spaced = HessianSpectrumCallback(every_n_steps=10, log_spaced=True)
    assert [s for s in range(1, 100) if every.should_measure(s, s - 1)] == list(range(10, 100, 10))
    assert [s for s in range(1, 200) if spaced.should_measure(s, s - 1)] == [10, 20, 40, 80, 160]
    assert not any(HessianSpectrumCallback().should_measure(s, s - 1) for s in range(1, 50))
    # global_step advancing by 2 (two optimizers under manual optimization): multiples are crossed, not hit
    assert [s for s in range(2, 42, 2) if HessianSpectrumCallback(every_n_steps=5).should_measure(s, s - 2)] == \
        [6, 10, 16, 20, 26, 30, 36, 40]


def test_integral_numbers_are_counts_and_max_overhead_is_refused_naming_budget():
    import numpy as np

    assert HessianSpectrumCallback(k=np.int64(4)).config.k == 4
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_overhead'"):  # now budget=
        HessianSpectrumCallback(every_n_steps=2, max_overhead=0.2)


def test_probe_set_takes_whole_batches_split_across_ranks_and_rebatches_on_request():
    from lightning_hessian.callback.probes import draw_probe_set

    loader = [{"x": torch.arange(4.0) + 4 * i, "y": torch.arange(4) + 4 * i,
               "text": [f"s{4 * i + j}" for j in range(4)]} for i in range(3)]  # samples 0..11, with their texts
    draw = dict(num_samples=10, batch_size=None, seed=0, world_size=2)
    first = draw_probe_set(loader, rank=0, **draw)  # whole batches 0 and 2 (10 samples round up to 12)
    second = draw_probe_set(loader, rank=1, **draw)
    assert [b["y"].tolist() for b in first] == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert [b["y"].tolist() for b in second] == [[4, 5, 6, 7]]
    rebatched = draw_probe_set(loader, num_samples=None, batch_size=5, seed=0, rank=0, world_size=1)
    assert [b["y"].tolist() for b in rebatched] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert [b["text"] for b in rebatched][2] == ["s10", "s11"]  # per-sample lists are cut with the tensors


# --- setup errors ------------------------------------------------------------------------------

def test_manual_optimization_without_loss_is_refused_at_setup():
    with pytest.raises(RuntimeError, match=r"manual optimization.*loss_fn"):
        trainer(max_steps=1, callbacks=[HessianSpectrumCallback()]).fit(ManualMLP(), DataLoader(dataset()))


def test_ggn_without_protocol_is_refused_at_setup():
    with pytest.raises(RuntimeError, match="hessian_outputs and hessian_output_loss"):
        trainer(max_steps=1, callbacks=[HessianSpectrumCallback(matrix="ggn")]).fit(TinyMLP(), DataLoader(dataset()))


def test_sharded_strategies_are_refused_at_setup():
    from pytorch_lightning.strategies import FSDPStrategy

    with pytest.raises(RuntimeError, match="does not support FSDPStrategy: it wraps the model in FSDP1"):
        HessianSpectrumCallback().setup(types.SimpleNamespace(strategy=FSDPStrategy()), TinyMLP(), "fit")


def test_unknown_layer_pattern_names_layers():
    callback = HessianSpectrumCallback(layers=["encoder.*"])
    with pytest.raises(ValueError, match=r"layers.*encoder"):
        trainer(max_steps=1, callbacks=[callback]).fit(TinyMLP(), DataLoader(dataset(), batch_size=8))


# --- side effects ------------------------------------------------------------------------------

def _noisy_run(tmp_path, name: str, callback: HessianSpectrumCallback | None, seeded_loader: bool):
    pl.seed_everything(7, verbose=False)
    model = NoisyNet()
    generator = torch.Generator().manual_seed(3) if seeded_loader else None
    loader = DataLoader(dataset(24), batch_size=6, shuffle=True, generator=generator)
    run = trainer(max_epochs=2, accumulate_grad_batches=2, logger=CSVLogger(tmp_path, name=name),
                  log_every_n_steps=1, callbacks=[callback] if callback else [])
    run.fit(model, loader)
    with open(f"{run.logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [{k: v for k, v in row.items() if "hessian" not in k} for row in rows if not row.get("hessian/eig_1")]
    return model, logged, torch.rand(3)


@pytest.mark.parametrize(
    ("seeded_loader", "mode"),
    [pytest.param(False, "train", id="global-rng-train"), pytest.param(True, "eval", id="loader-generator-eval")],
)
def test_no_side_effects(tmp_path, seeded_loader, mode):
    """Same weights, buffers, batch order, logged metrics and RNG state with and without the callback."""
    callback = HessianSpectrumCallback(every_n_steps=1, k=2, num_samples=12, num_steps=4, num_probes=2,
                                       mode=mode, history_file=None)
    plain, plain_logged, plain_rng = _noisy_run(tmp_path, "plain", None, seeded_loader)
    probed, probed_logged, probed_rng = _noisy_run(tmp_path, "probed", callback, seeded_loader)
    # 4 batches per epoch, 2 per step: steps 1..4, plus step 0, once per optimizer step
    assert [r.step for r in callback.history] == list(range(5))
    assert probed.seen == plain.seen
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert probed_logged == plain_logged and {"train_loss", "train_acc_epoch"} <= set(plain_logged[0])
    assert torch.equal(plain_rng, probed_rng)


# --- exactness -------------------------------------------------------------------------------

def test_logged_eigenvalues_equal_dense_hessian_at_the_last_step(tmp_path):
    k = 4
    model = TinyMLP(dtype=torch.float64)
    callback = HessianSpectrumCallback(every_n_steps=2, k=k, num_samples=24, loss_fn=cross_entropy, tol=1e-6)
    run = trainer(max_steps=5, logger=CSVLogger(tmp_path), callbacks=[callback])
    run.fit(model, DataLoader(dataset(40, dtype=torch.float64), batch_size=8, shuffle=True))
    assert [r.step for r in callback.history] == [0, 2, 4, 5]
    with open(f"{run.logger.log_dir}/metrics.csv") as handle:
        header, *rows = [line.split(",") for line in handle.read().splitlines()]
    last = dict(zip(header, rows[-1], strict=True))
    assert int(last["step"]) == 5
    assert sum(int(b[0].shape[0]) for b in callback.probe_batches) == 24
    assert_eigenvalues([float(last[f"hessian/eig_{i}"]) for i in range(1, k + 1)],
                       top_dense(model, callback.probe_batches, k))
    assert all(r <= 1e-6 for r in callback.history[-1].hessian.residuals)
    # The density places the converged top-k exactly (1/P each) and estimates the rest below them.
    last = callback.history[-1].hessian
    nodes, weights = last.density.nodes, last.density.weights
    assert nodes.shape == weights.shape and nodes.shape[1] == callback.config.num_steps + k
    for eigenvalue in last.eigenvalues:
        exact = (nodes - eigenvalue).abs() <= 1e-12 * abs(eigenvalue)
        assert torch.all(exact.sum(dim=1) >= 1)
        torch.testing.assert_close(weights[exact], torch.full_like(weights[exact], 1 / last.num_params))


def test_gauss_newton_and_layer_blocks_match_dense():
    model = ProtocolMLP(dtype=torch.float64)
    callback = HessianSpectrumCallback(budget=None, k=3, num_samples=16, matrix="both", tol=1e-6,
                                       layers=["net.2.*"], smallest=True, max_matvecs=51)
    trainer(max_steps=1, callbacks=[callback]).fit(model, DataLoader(dataset(dtype=torch.float64), batch_size=8))
    record = callback.history[-1]
    batches = callback.probe_batches
    ggn = dense_ggn(model, lambda m, b: m(b[0]), lambda f, b: F.cross_entropy(f, b[1]), batches)
    assert_eigenvalues(record.ggn.eigenvalues, torch.linalg.eigvalsh(ggn).flip(0)[:3])
    hessian = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batches))
    assert record.hessian.eig_min == pytest.approx(float(hessian[0]), rel=1e-6)
    block = dense_hessian(model, cross_entropy, batches, params=["net.2.*"])
    assert record.hessian.layers["net.2"].eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
    assert {"hessian/ggn/eig_1", "hessian/layer/net.2/eig_1", "hessian/eig_min",
            "hessian/ggn/layer/net.2/eig_1"} <= set(scalar_metrics(record))


# --- contexts --------------------------------------------------------------------------------

def test_measure_after_fit_and_under_validate_and_test():
    model = ProtocolMLP(dtype=torch.float64)
    data = DataLoader(dataset(dtype=torch.float64), batch_size=8)
    callback = HessianSpectrumCallback(budget=None, at_start=False, k=2, tol=1e-6, num_samples=16, density=False)
    fit = trainer(max_steps=3, callbacks=[callback])
    fit.fit(model, data)
    after = callback.measure(fit)
    assert after.step == 3 and len(callback.history) == 2
    assert after.hessian.eigenvalues == pytest.approx(callback.history[0].hessian.eigenvalues, rel=1e-9)
    expected = top_dense(model, callback.probe_batches, 2)
    for stage in ("validate", "test"):
        evaluating = HessianSpectrumCallback(dataloader=data, k=2, tol=1e-6, num_samples=16, density=False)
        run = trainer(callbacks=[evaluating])
        getattr(run, stage)(model, data)
        assert [r.stage for r in evaluating.history] == [stage]
        assert_eigenvalues(evaluating.history[0].hessian.eigenvalues, expected)
        assert float(run.callback_metrics["hessian/eig_1"]) == pytest.approx(float(expected[0]), rel=1e-6)
    without_data = HessianSpectrumCallback()
    with pytest.warns(UserWarning, match=r"no probe data under trainer\.test\(\)"):
        trainer(callbacks=[without_data]).test(model, data)
    assert without_data.history == []


def test_nonfinite_loss_is_reported_and_training_continues():
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, num_steps=6, num_probes=2)
    run = trainer(max_steps=6, callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="no spectrum at step 4"):
        run.fit(PoisonedMLP(), DataLoader(dataset(), batch_size=8))
    assert run.global_step == 6
    assert [r.step for r in callback.history] == [0, 2]
    assert [(e.step, e.reason) for e in callback.events] == [(4, "nonfinite"), (6, "nonfinite")]
    assert float(run.callback_metrics["hessian/nonfinite"]) == 1.0


class SlowStepMLP(TinyMLP):
    """A training step of at least 5 ms, so that a call costs a steady handful of steps."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.005)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_the_default_budget_measures_at_start_says_its_plan_once_and_spaces_the_calls(caplog):
    callback = HessianSpectrumCallback(budget=0.2, k=2, num_samples=16, density=False)  # no explicit schedule
    with caplog.at_level(logging.INFO):
        trainer(max_steps=300, callbacks=[callback]).fit(SlowStepMLP(), DataLoader(dataset(), batch_size=8))
    steps = [r.step for r in callback.history]
    assert steps[0] == 0 and steps[-1] == 300  # values at initialization and after the last step
    assert callback.history[-1].snapshot and not all(r.snapshot for r in callback.history)  # both kinds
    assert 3 <= len(steps) < 100 and steps == sorted(set(steps))  # some calls between, not one per step
    assert callback.plan.startswith("HessianSpectrumCallback: a snapshot takes")
    assert "a tracked call" in callback.plan and "to keep its cost near 20% of 300 steps" in callback.plan
    assert sum("a snapshot takes" in record.getMessage() for record in caplog.records) == 1
    assert 0 < callback.history[-1].overhead < 1


def test_a_run_shorter_than_one_snapshot_gets_tracked_values_at_its_start_and_end():
    callback = HessianSpectrumCallback(k=3)  # default budget: 5% of a run of 40 steps of about a millisecond
    run = trainer(max_epochs=10, callbacks=[callback])
    run.fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [(r.step, r.snapshot) for r in callback.history] == [(0, False), (40, False)]
    assert "tracked calls stand for the start and the end" in callback.plan
    assert float(run.callback_metrics["hessian/snapshot"]) == 0.0
    explicit = HessianSpectrumCallback(k=3, budget=None)  # no budget: snapshots at the start and the end
    trainer(max_epochs=10, callbacks=[explicit]).fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [(r.step, r.snapshot) for r in explicit.history] == [(0, True), (40, True)]


def test_a_time_limit_is_said_to_count_the_callbacks_calls(caplog):
    callback = HessianSpectrumCallback(k=2, density=False)
    with caplog.at_level(logging.INFO):
        trainer(max_time={"seconds": 30}, max_steps=2, callbacks=[callback]).fit(
            TinyMLP(), DataLoader(dataset(), batch_size=8))
    said = [r.getMessage() for r in caplog.records if "stops on time" in r.getMessage()]
    assert len(said) == 1 and "trains fewer steps" in said[0]


def test_every_n_epochs_and_a_budget_cap_on_an_explicit_schedule():
    by_epoch = HessianSpectrumCallback(budget=None, every_n_epochs=1, at_start=False, at_end=False,
                                       k=2, num_samples=16, density=False)
    trainer(max_epochs=3, callbacks=[by_epoch]).fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in by_epoch.history] == [4, 8, 12]
    assert [r.epoch for r in by_epoch.history] == [0, 1, 2]
    trainer(max_epochs=1, callbacks=[by_epoch]).fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in by_epoch.history] == [4, 8, 12, 4]  # a second run with the same callback
    budget = HessianSpectrumCallback(every_n_steps=1, k=2, num_samples=16, density=False, budget=1e-9)
    run = trainer(max_steps=4, callbacks=[budget])
    run.fit(TinyMLP(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in budget.history] == [0]
    assert [(e.step, e.reason) for e in budget.events] == [(s, "budget") for s in (1, 2, 3, 4)]
    assert float(run.callback_metrics["hessian/skipped"]) == 1.0
    assert 0 < float(run.callback_metrics["hessian/overhead"]) <= 1


def test_compiled_module_uses_the_original_forward():
    from pytorch_lightning.utilities.compile import from_compiled

    data = DataLoader(dataset(16, dtype=torch.float64), batch_size=8)
    plain = ProtocolMLP(dtype=torch.float64)
    compiled = from_compiled(torch.compile(plain, backend="aot_eager"))
    compiled_forward = compiled.forward
    callback = HessianSpectrumCallback(dataloader=data, k=2, density=False)
    record = callback.measure(trainer(), compiled)
    assert_eigenvalues(record.hessian.eigenvalues, top_dense(plain, list(data), 2))
    assert compiled.forward is compiled_forward


def test_attention_products_use_the_math_kernel():
    callback = HessianSpectrumCallback(every_n_steps=1, k=2, num_samples=16, num_steps=6, num_probes=2)
    trainer(max_steps=2, callbacks=[callback]).fit(AttentionNet(), DataLoader(dataset(), batch_size=8))
    assert len(callback.history) == 3 and all(math.isfinite(r.hessian.eigenvalues[0]) for r in callback.history)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
def test_precisions_give_float32_products(precision):
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, num_steps=6, num_probes=2)
    trainer(max_steps=2, precision=precision, callbacks=[callback]).fit(ProtocolMLP(), DataLoader(dataset(),
                                                                                                   batch_size=8))
    assert [r.dtype for r in callback.history] == ["float32", "float32"]
    assert all(math.isfinite(v) for r in callback.history for v in [*r.hessian.eigenvalues, r.hessian.density.trace])


def test_lightning_pytorch_namespace(tmp_path):
    import lightning.pytorch as lp
    from lightning.pytorch.cli import LightningCLI

    class Unified(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(NUM_FEATURES, NUM_CLASSES)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = HessianSpectrumCallback(every_n_steps=1, k=2, num_samples=16, density=False)
    run = lp.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=[callback])
    run.fit(Unified(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in callback.history] == [0, 1, 2]
    assert "hessian/eig_1" in run.callback_metrics
    config = {"trainer": {"callbacks": [{"class_path": "lightning_hessian.HessianSpectrumCallback",
                                          "init_args": {"k": 3, "every_n_steps": 10}}]}}
    config["trainer"].update(logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    cli = LightningCLI(Unified, run=False, args=config, save_config_callback=None, seed_everything_default=False)
    [configured] = [c for c in cli.trainer.callbacks if isinstance(c, HessianSpectrumCallback)]
    assert (configured.config.k, configured.config.every_n_steps) == (3, 10)


# --- checkpoints -----------------------------------------------------------------------------

def _resumable_run(tmp_path, crash_at_step: int | None, ckpt_path: str | None = None):
    pl.seed_everything(1, verbose=False)
    model = TinyMLP(dtype=torch.float64)
    model.crash_at_step = crash_at_step
    callback = HessianSpectrumCallback(every_n_steps=3, k=2, num_samples=16, num_steps=6, num_probes=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    run = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[callback, checkpoints])
    run.fit(model, DataLoader(dataset(dtype=torch.float64), batch_size=8), ckpt_path=ckpt_path, weights_only=True)
    return callback


def test_resume_continues_history_without_gaps_or_duplicates(tmp_path):
    whole = _resumable_run(tmp_path / "whole", None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resumable_run(tmp_path / "crashed", crash_at_step=10)
    saved = tmp_path / "crashed" / "epoch=1-step=8.ckpt"
    state = torch.load(saved, weights_only=True)["callbacks"]
    [callback_state] = [v for k, v in state.items() if k.startswith("HessianSpectrumCallback")]
    assert [r["step"] for r in callback_state["history"]] == [0, 3, 6]
    assert callback_state["warm_start"]["hessian"].shape == (51,)
    resumed = _resumable_run(tmp_path / "resumed", None, ckpt_path=str(saved))
    assert [r.step for r in resumed.history] == [r.step for r in whole.history] == [0, 3, 6, 9, 12]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a.hessian.eigenvalues == pytest.approx(b.hessian.eigenvalues, rel=1e-9)
        assert a.num_matvecs == b.num_matvecs  # the same warm start after the resume


def test_each_setting_is_declared_once_in_the_signature_and_once_in_the_config():
    """The signature LightningCLI reads and the settings object agree: the same names, order and defaults."""
    signature = inspect.signature(HessianSpectrumCallback.__init__).parameters
    arguments = {name: p.default for name, p in signature.items() if name != "self"}
    fields = {field.name: field.default for field in dataclasses.fields(CallbackConfig)}
    assert list(arguments) == list(fields)
    assert {name: default for name, default in arguments.items() if name != "layers"} \
        == {name: default for name, default in fields.items() if name != "layers"}
    assert arguments["layers"] is None and fields["layers"] == ()
    source = textwrap.dedent(inspect.getsource(HessianSpectrumCallback.__init__))
    call = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CallbackConfig")
    assert {keyword.arg for keyword in call.keywords} == set(arguments)  # every setting reaches the config
