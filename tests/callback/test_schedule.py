"""When to measure: multiples crossed by jumping steps, the snapshots' fidelity, and the budget's plan of
snapshots and tracked calls on the one clock the callback charges."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback
from lightning_hessian.callback.schedule import (
    MAX_SNAPSHOTS,
    MIN_DENSITY_STEPS,
    OVERHEAD_CAP,
    SNAPSHOT_SHARE,
    TIMED_STEPS,
    Budget,
    Clock,
    Fidelity,
    crossed_multiple,
    fit_fidelity,
    log_spaced_steps,
    plan_message,
    project_plan,
)

from helpers import SimulatedTime, TinyMLP, dataset, trainer


@pytest.mark.parametrize(("previous", "step", "expected"), [
    pytest.param(4, 6, True, id="jumps-over-5"),
    pytest.param(6, 8, False, id="between-multiples"),
    pytest.param(8, 10, True, id="lands-on-10"),
    pytest.param(5, 7, False, id="previous-was-the-multiple"),
    pytest.param(10, 10, False, id="no-advance"),
    pytest.param(3, 21, True, id="jumps-over-several"),
])
def test_a_multiple_between_the_previous_step_and_this_one_is_crossed(previous, step, expected):
    assert crossed_multiple(previous, step, 5) is expected


def test_a_global_step_that_advances_by_two_meets_every_multiple_once():
    fired = [step for step in range(2, 32, 2) if crossed_multiple(step - 2, step, 3)]
    assert fired == [4, 6, 10, 12, 16, 18, 22, 24, 28, 30]
    assert [step for step in range(1, 31) if crossed_multiple(step - 1, step, 3)] == list(range(3, 31, 3))


def test_log_spaced_multiples_are_every_times_a_power_of_two():
    assert [step for step in range(2, 100, 2) if crossed_multiple(step - 2, step, 3, log_spaced=True)] \
        == [4, 6, 12, 24, 48, 96]
    assert crossed_multiple(13, 30, 3, log_spaced=True)
    assert not crossed_multiple(25, 47, 3, log_spaced=True)
    assert not crossed_multiple(24, 30, 3, log_spaced=True)
    assert not crossed_multiple(-1, 0, 3, log_spaced=True)  # step 0 is no power-of-two multiple


def test_log_spaced_steps_are_distinct_inside_and_even_in_log():
    steps = log_spaced_steps(0, 10_000, 6)
    assert steps == sorted(set(steps)) and all(0 < s < 10_000 for s in steps) and len(steps) == 6
    ratios = [math.log1p(b) - math.log1p(a) for a, b in itertools.pairwise([0, *steps, 10_000])]
    assert max(ratios) - min(ratios) < 0.15  # the steps are whole
    assert log_spaced_steps(0, 3, 5) == [1, 2]  # as many as fit
    assert log_spaced_steps(10, 11, 2) == []


def _cost(fidelity: Fidelity, per_product: float, samples: list[int], top_k: int) -> float:
    return per_product * sum(samples[:fidelity.num_batches]) * fidelity.products(top_k)


def test_a_snapshot_shrinks_probes_then_samples_then_steps_then_the_density():
    full = Fidelity(num_batches=16, num_probes=4, num_steps=32)
    samples, top_k, per_product = [32] * 16, 28, 1e-4
    assert fit_fidelity(full, 10.0, per_product, samples, top_k) == full
    full_cost = _cost(full, per_product, samples, top_k)
    previous = full
    shrunk = []
    for allowance in [full_cost * f for f in (0.9, 0.5, 0.2, 0.1, 0.05, 0.02, 0.012)]:
        fidelity = fit_fidelity(full, allowance, per_product, samples, top_k)
        assert fidelity is not None and _cost(fidelity, per_product, samples, top_k) <= allowance
        # Never more faithful than at a larger allowance, in any respect.
        assert fidelity.num_probes <= previous.num_probes and fidelity.num_batches <= previous.num_batches
        assert fidelity.num_steps <= previous.num_steps and fidelity.density <= previous.density
        previous = fidelity
        shrunk.append(fidelity)
    assert shrunk[0] == Fidelity(16, 2, 32)  # first the probes
    assert shrunk[2].num_probes == 1 and shrunk[2].num_batches < 16 and shrunk[2].num_steps == 32
    assert shrunk[-1] == Fidelity(1, 1, MIN_DENSITY_STEPS, density=False)  # the top k of one batch
    assert fit_fidelity(full, 1e-6, per_product, samples, top_k) is None


class SimulatedRun:
    """A run on the callback's own clock, with simulated time: training steps and calls advance it."""

    def __init__(self, fraction: float, total_steps: int | None, start_step: int = 0, **budget) -> None:
        self.now = 0.0
        self.clock = Clock(now=lambda: self.now)
        self.clock.start()
        self.budget = Budget(fraction=fraction, total_steps=total_steps, clock=self.clock, start_step=start_step,
                             **budget)

    def train(self, seconds: float) -> None:
        self.now += seconds

    def call(self, kind: str, step: int, seconds: float) -> None:
        """A call, charged to the clock as the callback charges it, then recorded."""
        spent = self.clock.spent
        with self.clock.charged():
            self.now += seconds
        self.budget.record(kind, step, self.clock.spent - spent)


def test_the_overhead_is_the_callbacks_share_of_the_wall_time():
    run = SimulatedRun(fraction=0.1, total_steps=None)
    assert run.clock.overhead() == 0.0 and run.clock.training_seconds() == 0.0
    run.call("snapshot", step=0, seconds=1.0)
    run.train(10.0)
    run.call("tracked", step=5, seconds=3.0)
    run.train(6.0)
    assert run.clock.overhead() == pytest.approx(0.2) and run.clock.training_seconds() == pytest.approx(16.0)
    assert run.budget.spent == {"snapshot": 1.0, "tracked": 3.0} and run.budget.first_cost == 1.0
    assert math.isnan(Clock().overhead())  # not started


@pytest.mark.parametrize(("fraction", "total_steps", "step_seconds", "snapshot", "tracked"), [
    pytest.param(0.05, 20_000, 0.01, 0.5, 0.02, id="mlp-like"),
    pytest.param(0.05, 20_000, 0.08, 75.0, 0.4, id="cnn-like"),
    pytest.param(0.1, 2000, 0.1, 1.0, 0.05, id="ten-percent"),
])
def test_the_plan_spends_the_budget_on_both_kinds_and_never_more_than_one_tracked_call_over(
        fraction, total_steps, step_seconds, snapshot, tracked):
    plan = project_plan(fraction, total_steps, step_seconds, snapshot, tracked)
    assert plan.budget == pytest.approx(fraction / (1 - fraction) * total_steps * step_seconds)
    snapshots, points = plan.snapshots, plan.tracked
    assert snapshots[0] == 0 and snapshots[-1] == total_steps and 2 <= len(snapshots) <= MAX_SNAPSHOTS
    assert plan.spent <= plan.budget + tracked + 1e-9
    assert plan.spent >= plan.budget - snapshot - 2 * tracked  # and it spends what it has
    gaps = [b - a for a, b in itertools.pairwise(points)]
    typical = statistics.median(gaps)  # evenly spaced, but for a catch-up after a snapshot took a slot
    assert len(points) >= 50 and sum(abs(g - typical) <= 0.25 * typical for g in gaps) >= 0.9 * len(gaps), gaps
    between = snapshots[1:-1]
    assert between == sorted(between) and all(b > 1.5 * a for a, b in itertools.pairwise(between))  # log-spaced


def test_the_snapshots_take_at_most_their_share_and_the_rest_goes_to_tracked_calls():
    plan = project_plan(0.05, 20_000, 0.01, 0.5, 0.02)
    snapshot_spent = 0.5 * len(plan.snapshots)
    assert snapshot_spent <= SNAPSHOT_SHARE * plan.budget + 0.5
    assert len(plan.tracked) * 0.02 >= plan.budget - snapshot_spent - 0.04


def test_without_a_known_length_tracked_calls_spend_their_share_of_the_time_so_far():
    run = SimulatedRun(fraction=0.05, total_steps=None)
    run.call("snapshot", step=0, seconds=0.5)
    run.budget.tracked_seconds, due = 0.02, 1
    for step in range(1, 20_001):
        run.train(0.01)
        if step >= due:
            due, kind = run.budget.next_call(step)
            assert kind != "snapshot"  # no snapshots between without a known end
            if due <= step and kind is not None:
                run.call(kind, step, 0.02)
                due = step + 1
    earned = (1 - SNAPSHOT_SHARE) * 0.05 / 0.95 * 20_000 * 0.01
    assert earned - 0.02 <= run.budget.spent["tracked"] <= earned + 0.02


def test_a_snapshot_between_is_held_back_until_the_overhead_so_far_fits_under_the_cap():
    plan = project_plan(0.05, 20_000, 0.01, 2.0, 0.02)
    # One more snapshot of 2 s (the free first one aside) needs 2 / (2 * 0.05) - 2 = 18 s of training.
    assert plan.snapshots[1] * 0.01 >= 2.0 / (OVERHEAD_CAP * 0.05) - 2.0 - 1e-9


def test_nothing_is_due_before_the_steps_are_timed_or_once_the_budget_is_spent():
    run = SimulatedRun(fraction=0.05, total_steps=1000, track=True)
    run.call("snapshot", step=0, seconds=0.1)
    run.budget.tracked_seconds = 0.01
    run.train(0.1)
    assert run.budget.next_call(step=1) == (1 + TIMED_STEPS, None)
    spent = SimulatedRun(fraction=0.05, total_steps=1000, timed_from=(1, 0.01))
    spent.call("snapshot", step=0, seconds=100.0)
    spent.train(0.1)
    assert spent.budget.next_call(step=10) == (1001, None)


def test_a_real_run_spends_the_budget_on_the_clock_it_logs():
    """The callback's own clock, simulated: steps of 1 s and 50 ms per loss evaluation of a call, over 400
    steps. The 5% budget, B = 400 * 0.05 / 0.95 = 21 s, buys values at the start, at most eight snapshots
    with the one after the last step, and tracked calls on one batch between; the run spends about B and
    never more than B and one tracked call (the real milliseconds of each call come on top), and the
    logged overhead is the clock's."""
    simulated = SimulatedTime(step_seconds=1.0, loss_seconds=0.05)

    class SlowSteps(TinyMLP):
        def training_step(self, batch, batch_idx):
            simulated.offset += simulated.step_seconds
            return super().training_step(batch, batch_idx)

    callback = HessianSpectrumCallback(k=2, num_samples=16, density=False, keep_graph=True, loss_fn=simulated.loss,
                                       progress=False)
    callback.clock = Clock(now=simulated)
    trainer(max_steps=400, callbacks=[callback]).fit(SlowSteps(), DataLoader(dataset(), batch_size=8))
    budget = callback._budget
    assert budget.clock is callback.clock
    snapshots = [m.step for m in callback.history if m.snapshot]
    tracked = [m for m in callback.history if not m.snapshot]
    assert callback.history[0].step == 0 and snapshots[-1] == 400 and 2 <= len(snapshots) <= MAX_SNAPSHOTS
    assert all(m.num_samples == 8 and len(m.hessian.eigenvalues) == 1 for m in tracked)
    assert len(tracked) >= 10 and statistics.median(m.num_matvecs for m in tracked[1:]) <= 8
    spent, elapsed = callback.clock.spent, callback.clock.elapsed()
    total = 400 * 0.05 / 0.95
    assert 0.8 * total < spent < 1.1 * total + budget.tracked_seconds, (spent, total)
    assert callback.history[-1].overhead == pytest.approx(spent / elapsed, rel=0.05)
    assert "tracked calls" in callback.plan


@pytest.mark.parametrize("started_with_snapshot", [False, True])
def test_a_plan_without_room_for_snapshots_says_what_the_start_was(started_with_snapshot):
    budget = Budget(fraction=0.05, total_steps=20_000, tracked_seconds=0.05, planned=[], snapshots=False)
    budget.record("snapshot" if started_with_snapshot else "tracked", step=0, seconds=2.0)
    full = Fidelity(num_batches=8, num_probes=1, num_steps=32)
    message = plan_message(budget, 0.01, None, full, "hessian")
    assert ("the snapshot at the start and no more" in message) == started_with_snapshot
    assert ("the start is a tracked call" in message) != started_with_snapshot
    assert ("tracked calls stand for the start and the end" in message) != started_with_snapshot
