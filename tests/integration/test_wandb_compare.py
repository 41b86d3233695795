"""The compare example, run small, leaves two W&B offline runs that W&B can compare without custom code.

Read back from the run files (the ``.wandb`` record log with wandb's own protobuf classes, and the
table files under ``files/media/table``): each run defines the callback's tags against
``trainer/global_step``, holds the top k of every measurement as a ``wandb.Table`` and as a line plot
of eigenvalue against index, and keeps the last top k in its summary, with the peaks of eig_1 and of
the stability ratio.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import wandb
from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

from helpers import load_example

# A server process or W&B runs: seconds to a minute each.
pytestmark = pytest.mark.slow

PROJECT = "lightning-hessian-compare"
RUNS = ((8, 0.1), (64, 0.2))  # (batch size, learning rate)
STEPS = [0, 2, 4]
K = 3


def _records(path: Path):
    """The records of a ``.wandb`` file: LevelDB's log format (32 KiB blocks of checksummed chunks)."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B run file"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too short for a chunk header: padding up to the next block
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:  # zero padding
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # the whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
        elif kind == 2:  # its first chunk
            pending = chunk
        elif kind == 3:  # a middle chunk
            pending += chunk
        elif kind == 4:  # its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record


def _flat(items) -> dict[str, object]:
    """Summary, config or history items as ``{"a/b": value}`` (nested keys joined with '/')."""
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}


def _complete_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished run's file, once its last one (``exit``) is on disk: W&B's service
    writes the file in its own process, and on a loaded machine the tail can land after ``finish()``
    has returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_records(path))
        except (DecodeError, struct.error):  # a record half written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} holds no exit record {timeout:.0f} s after the run finished"
        time.sleep(0.2)


def _read_run(directory: Path) -> dict[str, object]:
    (path,) = directory.glob("run-*.wandb")
    run, metrics, history, summary, config = None, [], [], {}, {}
    for record in _complete_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "metric":
            metrics.append(record.metric)
        elif kind == "history":
            history.append(_flat(record.history.item))
        elif kind == "summary":
            summary.update(_flat(record.summary.update))
        elif kind == "config":
            config.update(_flat(record.config.update))
    return {"run": run, "metrics": metrics, "history": history, "summary": summary, "config": config}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    environment = dict(os.environ)  # wandb may set variables; the per-test restore does not cover this fixture
    try:
        results = load_example("compare_runs").compare(out, runs=RUNS, max_steps=4, every_n_steps=2, k=K,
                                                       num_samples=64, wandb_mode="offline", project=PROJECT)
    finally:
        wandb.finish()
        os.environ.clear()
        os.environ.update(environment)
    return {"out": out, "results": results, "runs": [_read_run(Path(r.wandb_dir)) for r in results]}


def test_both_runs_land_in_one_project_and_one_tensorboard_directory(compared):
    runs, results = compared["runs"], compared["results"]
    assert [r["run"].project for r in runs] == [PROJECT, PROJECT]
    assert [r["run"].display_name for r in runs] == [r.name for r in results] == ["batch_8_lr_0.1", "batch_64_lr_0.2"]
    assert len({r["run"].run_id for r in runs}) == 2
    folders = sorted(p.name for p in (compared["out"] / "tensorboard").iterdir())
    assert folders == ["batch_64_lr_0.2", "batch_8_lr_0.1"]
    assert all(list((compared["out"] / "tensorboard" / f).glob("events.out.tfevents.*")) for f in folders)


def test_the_callback_tags_are_defined_against_the_trainer_step(compared):
    for run in compared["runs"]:
        defined = {(m.glob_name or m.name): m.step_metric for m in run["metrics"]}
        assert defined["hessian/*"] == "trainer/global_step"
        assert "trainer/global_step" in defined
        peaks = {m.name: m.step_metric for m in run["metrics"] if m.summary.max}
        assert peaks == {"hessian/stability": "trainer/global_step", "hessian/eig_1": "trainer/global_step"}
        steps = [row["trainer/global_step"] for row in run["history"] if "hessian/eig_1" in row]
        assert steps == STEPS


def test_each_measurement_is_a_table_and_a_line_plot_of_eigenvalue_against_index(compared):
    for run, result in zip(compared["runs"], compared["results"], strict=True):
        rows = [row for row in run["history"] if "hessian/spectrum_table/path" in row]
        assert [row["trainer/global_step"] for row in rows] == STEPS
        for row, measurement in zip(rows, result.history, strict=True):
            assert row["hessian/spectrum_table/_type"] == "table-file"
            assert row["hessian/spectrum_line_table/_type"] == "table-file"  # the plot's data
            with open(Path(result.wandb_dir) / "files" / row["hessian/spectrum_table/path"]) as handle:
                table = json.load(handle)
            assert table["columns"] == ["step", "index", "eigenvalue", "residual", "converged"]
            assert [r[0] for r in table["data"]] == [measurement.step] * K
            assert [r[1] for r in table["data"]] == list(range(1, K + 1))
            assert [r[2] for r in table["data"]] == pytest.approx(list(measurement.hessian.eigenvalues))
        chart = run["config"]["_wandb/visualize/hessian/spectrum_line"]
        assert chart["panel_config"]["panelDefId"] == "wandb/line/v0"
        assert chart["panel_config"]["fieldSettings"] == {"x": "index", "y": "eigenvalue", "stroke": None}
        assert chart["panel_config"]["stringSettings"]["title"] == f"hessian: top {K} eigenvalues, step {STEPS[-1]}"


def test_the_summary_holds_the_last_top_k_for_the_runs_table(compared):
    for run, result in zip(compared["runs"], compared["results"], strict=True):
        summary, last = run["summary"], result.history[-1]
        assert summary["hessian/top_k"] == pytest.approx(list(last.hessian.eigenvalues))
        assert summary["hessian/top_k_step"] == STEPS[-1]
        for i, value in enumerate(last.hessian.eigenvalues[1:], start=2):
            assert summary[f"hessian/eig_{i}"] == pytest.approx(value)
        # eig_1 and the stability ratio keep their peak, so the runs table sorts runs by it
        history = result.history
        assert summary["hessian/eig_1"] == {"max": pytest.approx(max(m.hessian.eigenvalues[0] for m in history))}
        assert summary["hessian/stability"] == {"max": pytest.approx(max(m.stability.stability for m in history))}
        assert summary["hessian/sharpness_x_lr"] == pytest.approx(last.hessian.eigenvalues[0] * result.lr)
        assert summary["trainer/global_step"] == STEPS[-1]
