"""The edge-of-stability example, run short: both optimizers get their ratio, and the figure is drawn."""

from __future__ import annotations

import pytest

from helpers import load_example

# Example runs: seconds each.
pytestmark = pytest.mark.slow


def test_both_runs_log_their_ratio_and_the_figure_is_drawn(tmp_path):
    example = load_example("edge_of_stability")
    runs = {name: example.train(make, max_steps=20, every_n_steps=10) for name, make in example.RUNS.items()}
    (sgd_name, sgd), (_, adamw) = runs.items()
    assert [m.step for m in sgd] == [m.step for m in adamw] == [0, 10, 20]
    assert sgd[0].stability.threshold == pytest.approx(3.8 / 0.3)
    assert sgd[0].stability.stability == pytest.approx(sgd[0].hessian.eigenvalues[0] * 0.3 / 3.8)
    assert adamw[0].stability.stability is None  # no optimizer state before the first step
    assert adamw[-1].stability.threshold == pytest.approx(38 / 0.01)
    assert all(m.stability.preconditioned_eig_1 > 0 and m.stability.batch_sharpness is not None for m in adamw[1:])
    assert "stability peaks at" in example.describe(sgd_name, sgd)
    example.figure(runs, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
