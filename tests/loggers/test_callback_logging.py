"""What the callback writes, read back from real files: TensorBoard events, a W&B offline run, CSV, JSON."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
import wandb
import yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback

from helpers import ProtocolMLP, dataset, trainer

STEPS = [0, 2, 4]
SCALARS = [
    *(f"hessian/eig_{i}" for i in (1, 2, 3)),
    "hessian/eig_min", "hessian/trace", "hessian/outliers", "hessian/near_zero_fraction", "hessian/negative_mass",
    "hessian/sharpness_x_lr", "hessian/max_residual", "hessian/matvecs", "hessian/seconds", "hessian/overhead",
    "hessian/nonfinite", "hessian/layer/net.0/eig_1", "hessian/stability", "hessian/stability_threshold",
]
# The batch just trained on: at the calls that follow a training step.
BATCH_STEPS = [2, 4]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One fit with TensorBoard, W&B (offline) and CSV loggers side by side."""
    root = tmp_path_factory.mktemp("logs")
    environment = dict(os.environ)  # wandb may set variables; the per-test restore does not cover this fixture
    tensorboard = TensorBoardLogger(root, name="tb")
    weights_and_biases = WandbLogger(mode="offline", save_dir=str(root), project="lightning-hessian-tests")
    comma_separated = CSVLogger(root, name="csv")
    callback = HessianSpectrumCallback(every_n_steps=2, k=3, smallest=True, num_samples=16, num_steps=8,
                                       num_probes=2, layers=["net.0.*"])
    run = trainer(max_steps=4, logger=[tensorboard, weights_and_biases, comma_separated], callbacks=[callback])
    torch.manual_seed(0)  # the same weights whichever tests ran before
    run.fit(ProtocolMLP(), DataLoader(dataset(), batch_size=8))
    summary = {key: weights_and_biases.experiment.summary[key] for key in weights_and_biases.experiment.summary.keys()}
    run_dir = weights_and_biases.experiment.dir
    wandb.finish()
    os.environ.clear()
    os.environ.update(environment)
    yield {"callback": callback, "tb": tensorboard.log_dir, "csv": comma_separated.log_dir, "wandb": summary,
           "wandb_dir": run_dir}


def test_tensorboard_events_hold_scalars_histograms_and_figures(logged_run):
    events = EventAccumulator(logged_run["tb"], size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    for tag in SCALARS:
        assert [e.step for e in events.Scalars(tag)] == STEPS, tag
    history = logged_run["callback"].history
    logged = [e.value for e in events.Scalars("hessian/eig_1")]
    assert logged == pytest.approx([r.hessian.eigenvalues[0] for r in history])
    histograms = events.Histograms("hessian/density")
    assert [h.step for h in histograms] == STEPS
    first = histograms[0].histogram_value
    assert len(first.bucket) == 200 and min(first.bucket) >= 0
    assert first.num == pytest.approx(history[0].hessian.num_params, rel=0.05)  # counts eigenvalues
    assert first.bucket_limit[0] <= history[0].hessian.eigenvalues[0] <= first.bucket_limit[-1]
    images = events.Images("hessian/spectrum")
    assert [i.step for i in images] == STEPS and images[0].width > 100
    assert [e.step for e in events.Scalars("hessian/batch_sharpness")] == BATCH_STEPS


def test_tensorboard_draws_the_stability_ratio_against_its_edge_at_1(logged_run):
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

    events = EventAccumulator(logged_run["tb"], size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    (written,) = events.Tensors("custom_scalars__config__")
    layout = Layout.FromString(written.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["stability (edge of stability: 1)"] == ["^hessian/stability$", "^hessian/stability_edge$"]
    history = logged_run["callback"].history
    edge = events.Scalars("hessian/stability_edge")
    assert [(e.step, e.value) for e in edge] == [(step, 1.0) for step in STEPS]
    ratios = [e.value for e in events.Scalars("hessian/stability")]
    # SGD at lr 0.1: eig_1 over 2 / lr
    assert ratios == pytest.approx([m.hessian.eigenvalues[0] * 0.1 / 2 for m in history], rel=1e-6)
    assert ratios == pytest.approx([m.stability.stability for m in history])


def test_wandb_offline_run_receives_scalars_histogram_and_image(logged_run):
    summary, last = logged_run["wandb"], logged_run["callback"].history[-1]
    assert summary["trainer/global_step"] == STEPS[-1]
    for tag in SCALARS:
        assert tag in summary, tag
    history = logged_run["callback"].history
    # the peak over the run, not the last value: runs and sweeps sort by it
    assert dict(summary["hessian/eig_1"]) == {"max": pytest.approx(max(m.hessian.eigenvalues[0] for m in history))}
    assert dict(summary["hessian/stability"]) == {"max": pytest.approx(max(m.stability.stability for m in history))}
    assert summary["hessian/eig_2"] == pytest.approx(last.hessian.eigenvalues[1])
    histogram = dict(summary["hessian/density"])
    assert histogram["_type"] == "histogram" and len(histogram["values"]) == 200
    assert len(histogram["bins"]) == 201
    assert glob.glob(f"{logged_run['wandb_dir']}/media/images/hessian/spectrum_*.png")
    assert glob.glob(f"{logged_run['wandb_dir']}/../run-*.wandb")


def test_csv_has_the_scalars_and_settings(logged_run):
    with open(f"{logged_run['csv']}/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["hessian/eig_1"]]
    assert [int(row["step"]) for row in rows] == STEPS
    for tag in SCALARS:
        assert all(row[tag] for row in rows), tag
    with open(f"{logged_run['csv']}/hparams.yaml") as handle:
        settings = yaml.safe_load(handle)
    assert settings["hessian/k"] == 3 and settings["hessian/num_samples"] == 16 and settings["hessian/mode"] == "eval"


def test_history_file_is_strict_json(logged_run):
    with open(f"{logged_run['tb']}/hessian_history.json") as handle:
        saved = json.load(handle)
    assert [r["step"] for r in saved["history"]] == STEPS
    assert saved["settings"]["hessian/k"] == 3
    first = saved["history"][0]["hessian"]
    assert len(first["density"]["nodes"]) == len(first["density"]["weights"]) == 2
    # 8 SLQ nodes, and the converged ones of the top 3 placed exactly
    assert len(first["density"]["nodes"][0]) == 8 + sum(first["converged"])
    assert first["eigenvalues"] == pytest.approx(logged_run["callback"].history[0].hessian.eigenvalues)


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_no_figure_or_histogram_without_a_logger_that_shows_them(tmp_path, monkeypatch, logger):
    """Rendering costs more than the scalars (a quarter of a call with TensorBoard on the digits MLP): none
    is drawn when no TensorBoard or W&B logger would receive it."""
    from lightning_hessian import loggers

    def refuse(*args, **kwargs):
        raise AssertionError("rendered for no logger")

    monkeypatch.setattr(loggers, "spectrum_figure", refuse)
    monkeypatch.setattr(loggers, "density_histogram", refuse)
    callback = HessianSpectrumCallback(every_n_steps=2, k=2, num_samples=16, num_steps=4, num_probes=2)
    attached = CSVLogger(tmp_path, name="csv") if logger == "csv" else False
    trainer(max_steps=2, logger=attached, callbacks=[callback]).fit(ProtocolMLP(), DataLoader(dataset(), batch_size=8))
    assert [r.step for r in callback.history] == [0, 2]
