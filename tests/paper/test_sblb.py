"""The small-batch vs large-batch experiment: the paper's three shapes on a quick run, outputs, config."""

import json
from pathlib import Path

import pytest
import torch

from lightning_hessian import cli
from lightning_hessian.paper.data import digits_tensors
from lightning_hessian.paper.sblb import (
    BARRIER_FRACTION,
    FALL_FACTOR,
    RISE_FACTOR,
    SBLBConfig,
    _digits,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sb_vs_lb.yaml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``lightning-hessian sb-lb --quick`` run through the console-script entry point."""
    out = tmp_path_factory.mktemp("sb_lb")
    threads = torch.get_num_threads()
    code = cli.main(["sb-lb", "--config", str(CONFIG), "--out", str(out), "--quick"])
    assert torch.get_num_threads() == threads
    return code, out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_quick_run_shows_uphill_then_downhill(quick_run):
    _, _, summary = quick_run
    losses = summary["continuation"]["train_loss"]
    assert summary["continuation"]["steps"][0] == 0
    assert losses[0] == pytest.approx(summary["points"]["w_LB"]["train_loss"], rel=1e-12)
    assert losses[-1] == pytest.approx(summary["points"]["w_LB->SB"]["train_loss"], rel=1e-12)
    peak = max(losses)
    assert peak >= RISE_FACTOR * losses[0] and losses[-1] <= peak / FALL_FACTOR
    assert summary["checks"]["rise_then_fall"]["passed"]


@pytest.mark.slow
def test_quick_run_shows_no_barrier_between_lb_and_its_sb_continuation(quick_run):
    _, out, summary = quick_run
    line = summary["interpolation"]["w_LB -> w_LB->SB"]
    train = {row["alpha"]: row["loss"] for row in line["rows"] if row["split"] == "train"}
    assert min(train) == -1.0 and max(train) == 2.0 and len(train) == 25
    start, end = train[0.0], train[1.0]
    excess = max(loss - ((1 - a) * start + a * end) for a, loss in train.items() if 0 <= a <= 1)
    assert excess <= BARRIER_FRACTION * max(start, end)
    assert line["barrier_height"]["train"] == max(0.0, excess)
    assert summary["checks"]["no_barrier"]["passed"]
    assert (out / "interpolation_lb_to_lbsb.csv").read_text().count("\n") == 1 + 25 * 2


@pytest.mark.slow
def test_quick_run_finds_lb_sharper(quick_run):
    _, _, summary = quick_run
    points = summary["points"]
    assert points["w_LB"]["top_eigenvalues"][0] > points["w_LB->SB"]["top_eigenvalues"][0] > 0
    assert all(p["converged"] for p in points.values())
    assert summary["checks"]["lb_sharper"]["passed"]


@pytest.mark.slow
def test_quick_run_writes_plots_summaries_and_tensorboard(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, summary = quick_run
    assert code == 0 and summary["passed"]
    for name in ("sb_continuation_loss", "interpolation_lb_to_lbsb", "interpolation_keskar", "spectra"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "summary.md").read_text()
    for check in summary["checks"].values():
        assert check["criterion"] in markdown
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    continuation = events.Scalars("lb_to_sb/train_loss")
    assert len(continuation) == 1 + summary["config"]["small_batch_steps"]
    assert [e.value for e in continuation] == pytest.approx(summary["continuation"]["train_loss"], rel=1e-6)
    assert {"interpolation/lb_to_lbsb/barrier_height/train", "spectrum/LB/eig_1", "lb/train_loss"} <= set(
        events.Tags()["scalars"]
    )
    assert {"sb_lb/continuation_loss", "sb_lb/spectra", "interpolation/keskar/curve"} <= set(events.Tags()["images"])


def test_yaml_config_is_the_default_and_not_a_fit_config():
    assert CONFIG.read_text().splitlines()[0] == "# not a fit config"
    assert SBLBConfig.from_yaml(CONFIG) == SBLBConfig()
    quick = SBLBConfig().quickened()
    assert quick.large_batch_steps < SBLBConfig().large_batch_steps and quick.lr == SBLBConfig().lr


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        pytest.param({"optimization": {"learning_rate": 0.1}}, "unknown settings", id="unknown"),
        pytest.param({"data": {"scaling": "raw"}}, "scaling='raw'", id="scaling"),
        pytest.param({"small_batch_steps": 0}, "small_batch_steps=0", id="steps"),
        pytest.param({"quick": {"epochs": 1}}, "quick has unknown keys", id="quick"),
        pytest.param({"interpolation": {"alphas": [-1, 2, 1]}}, r"alphas=\[-1, 2, 1\]", id="alphas"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        SBLBConfig.from_mapping(settings)


def test_scaling_unit_and_standardize():
    x, y, x_test, y_test = _digits(SBLBConfig())
    assert x.dtype == torch.float64 and x.shape == (1000, 64) and x_test.shape == (797, 64)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    standardized = _digits(SBLBConfig(scaling="standardize"))
    with pytest.raises(ValueError, match="unknown settings \\['inputs'\\]"):
        SBLBConfig.from_mapping({"data": {"inputs": "standardized"}})
    reference = digits_tensors(num_train=1000)
    assert torch.equal(standardized[0], reference[0].double()) and torch.equal(standardized[1], y)
    assert torch.equal(reference[3], y_test)
