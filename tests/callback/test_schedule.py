"""When to measure: multiples crossed by jumping steps, the blended position u(s) and the budget's bookkeeping."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback
from lightning_hessian.callback.schedule import (
    OVERHEAD_CAP,
    TIMED_STEPS,
    Budget,
    Clock,
    blended_position,
    crossed_multiple,
    step_at,
)

from helpers import TinyMLP, cross_entropy, dataset, trainer


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


def test_the_blended_position_is_half_log_half_linear_and_stays_in_zero_one():
    assert blended_position(0, 999) == 0.0 and blended_position(999, 999) == 1.0
    assert blended_position(9, 999) == pytest.approx(0.5 / 3 + 0.5 * 9 / 999, rel=1e-12)
    assert blended_position(-5, 999) == 0.0 and blended_position(5000, 999) == 1.0
    positions = [blended_position(s, 200) for s in range(201)]
    assert all(a < b for a, b in itertools.pairwise(positions))
    assert blended_position(100, 200) > 0.5


def test_step_at_is_the_first_step_at_or_after_a_position():
    total = 200
    assert [step_at(blended_position(s, total), total) for s in range(total + 1)] == list(range(total + 1))
    between = (blended_position(40, total) + blended_position(41, total)) / 2
    assert step_at(between, total) == 41
    assert step_at(0.0, total) == 0 and step_at(1.0, total) == total and step_at(1.5, total) == total


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

    def call(self, step: int, seconds: float) -> None:
        """A call, charged to the clock as the callback charges it, then recorded."""
        spent = self.clock.spent
        with self.clock.charged():
            self.now += seconds
        self.budget.record_call(step, self.clock.spent - spent)


def test_only_a_first_call_at_the_start_step_is_free_of_the_overhead_cap():
    resumed = SimulatedRun(fraction=0.1, total_steps=None, start_step=100)
    resumed.call(step=100, seconds=2.0)
    resumed.call(step=150, seconds=3.0)
    budget = resumed.budget
    assert (budget.first_cost, resumed.clock.spent, budget.call_seconds, budget.last_step, budget.calls) \
        == (2.0, 5.0, 3.0, 150, 2)
    late = SimulatedRun(fraction=0.1, total_steps=None, start_step=100)
    late.call(step=150, seconds=2.0)
    assert late.budget.first_cost == 0.0 and late.budget.calls == 1


def test_the_overhead_is_the_callbacks_share_of_the_wall_time():
    run = SimulatedRun(fraction=0.1, total_steps=None)
    assert run.clock.overhead() == 0.0 and run.clock.training_seconds() == 0.0
    run.call(step=0, seconds=1.0)
    run.train(10.0)
    run.call(step=5, seconds=3.0)
    run.train(6.0)
    assert run.clock.overhead() == pytest.approx(0.2) and run.clock.training_seconds() == pytest.approx(16.0)
    assert math.isnan(Clock().overhead())  # not started


def test_affordable_calls_project_the_budget_over_the_whole_run():
    run = SimulatedRun(fraction=0.05, total_steps=10_000)
    run.call(step=0, seconds=2.0)
    run.train(0.5)
    assert run.budget.next_step(step=1) == 1 + TIMED_STEPS  # t is timed from here on
    # 100 steps after the first took 1 s: the run takes 100 s, of which 0.05 / 0.95 * 100 s may go to calls of 2 s
    run.train(1.0)
    assert run.budget.affordable_calls(step=101) == pytest.approx((5 / 0.95 - 2.0) / 2.0)
    assert run.budget.next_step(step=101) == 1839


def test_a_slow_first_step_does_not_make_the_calls_look_cheap():
    """The first step carries the loop's warm-up; timed with it, a call of 0.1 s would look like one step."""
    run = SimulatedRun(fraction=0.05, total_steps=1000)
    run.call(step=0, seconds=0.1)
    run.train(0.1)
    assert run.budget.step_seconds(step=1) is None
    for step in range(2, 1 + TIMED_STEPS):
        run.train(0.01)
        assert run.budget.step_seconds(step) is None
    run.train(0.01)
    assert run.budget.step_seconds(1 + TIMED_STEPS) == pytest.approx(0.01)
    assert run.budget.affordable_calls(1 + TIMED_STEPS) == pytest.approx((0.05 / 0.95 * 1000 * 0.01 - 0.1) / 0.1)


def _share_after_one_more_call(run: SimulatedRun, step: int, seconds_per_step: float) -> float:
    """The overhead the cap bounds: every call but the free first one, plus the next, over the wall time so far."""
    budget, spent = run.budget, run.clock.spent
    held = spent - budget.first_cost + budget.call_seconds
    return held / ((step - budget.start_step) * seconds_per_step + spent + budget.call_seconds)


@pytest.mark.parametrize("total_steps", [None, 10_000], ids=["unknown-length", "known-length"])
def test_a_call_is_held_back_until_the_share_so_far_fits_under_the_cap(total_steps):
    run = SimulatedRun(fraction=0.1, total_steps=total_steps, timed_from=(1, 1.0))
    run.call(step=0, seconds=1.0)
    run.train(10.0)
    run.call(step=10, seconds=5.0)
    run.train(1.0)
    due = run.budget.next_step(step=11)
    assert due >= 39
    assert _share_after_one_more_call(run, 39, 1.0) <= OVERHEAD_CAP * run.budget.fraction
    assert _share_after_one_more_call(run, 38, 1.0) > OVERHEAD_CAP * run.budget.fraction
    if total_steps is None:
        assert due == 39
        run.train(49.0)
        assert run.budget.next_step(step=60) == 60


def test_nothing_is_planned_once_the_budget_is_spent():
    run = SimulatedRun(fraction=0.05, total_steps=1000, timed_from=(1, 0.01))
    run.call(step=0, seconds=100.0)
    run.train(0.1)
    assert run.budget.affordable_calls(step=10) < 1
    assert run.budget.next_step(step=10) == 1001


def _simulate(fraction: float, total_steps: int, step_seconds: float, call_seconds: float):
    """A run: ask at every step from the due one on, call when due, on the clock the callback charges."""
    run = SimulatedRun(fraction=fraction, total_steps=total_steps)
    run.call(step=0, seconds=call_seconds)
    calls, shares, due = [0], [], 1
    for step in range(1, total_steps + 1):
        run.train(step_seconds)
        if step < due:
            continue
        due = run.budget.next_step(step)
        if due <= step:
            shares.append(_share_after_one_more_call(run, step, step_seconds))
            run.call(step, call_seconds)
            calls.append(step)
    return run, calls, shares


@pytest.mark.parametrize(("fraction", "total_steps", "step_seconds", "call_seconds"), [
    pytest.param(0.05, 10_000, 0.01, 0.5, id="ten-calls"),
    pytest.param(0.05, 10_000, 0.01, 0.05, id="a-hundred-calls"),
    pytest.param(0.1, 2000, 0.1, 1.0, id="ten-percent"),
])
def test_the_plan_spends_about_the_budget_and_never_more_than_the_cap_on_the_way(fraction, total_steps,
                                                                                  step_seconds, call_seconds):
    run, calls, shares = _simulate(fraction, total_steps, step_seconds, call_seconds)
    training = total_steps * step_seconds
    affordable = fraction / (1 - fraction) * training / call_seconds
    assert affordable - 2 <= len(calls) <= affordable + 1
    assert run.clock.training_seconds() == pytest.approx(training)
    assert 0.8 * fraction <= run.clock.overhead() <= fraction
    assert max(shares) <= OVERHEAD_CAP * fraction + 1e-12


def test_after_the_capped_start_the_calls_are_evenly_spaced_in_the_blended_position():
    total = 10_000
    _, calls, _ = _simulate(0.05, total, 0.01, 0.5)
    assert len(calls) == 10
    gaps = [blended_position(b, total) - blended_position(a, total) for a, b in itertools.pairwise(calls[1:])]
    assert max(gaps) - min(gaps) < 0.05 * min(gaps)
    steps = [b - a for a, b in itertools.pairwise(calls[1:])]
    assert all(a < b for a, b in itertools.pairwise(steps))


class SimulatedTime:
    """Wall time that a real run advances on purpose: every training step by ``step_seconds``, every loss
    evaluation of a measurement by ``loss_seconds`` (the real seconds, milliseconds here, come on top)."""

    def __init__(self, step_seconds: float, loss_seconds: float) -> None:
        self.offset, self.step_seconds, self.loss_seconds = 0.0, step_seconds, loss_seconds

    def __call__(self) -> float:
        return time.perf_counter() + self.offset

    def loss(self, module, batch):
        self.offset += self.loss_seconds
        return cross_entropy(module, batch)


def test_a_real_run_spends_the_budget_on_the_clock_it_logs():
    """The callback's own clock, simulated: steps of 0.2 s and calls of C = about 1 s over 400 steps. A 5%
    budget affords B = 80 * 0.05 / 0.95 = 4.2 s of calls, about B / C calls before the last step (the first
    after the start held back by the overhead cap, the others evenly spaced in the blended position), plus
    the call after it; the logged overhead is the clock's."""
    simulated = SimulatedTime(step_seconds=0.2, loss_seconds=0.1)

    class SlowSteps(TinyMLP):
        def training_step(self, batch, batch_idx):
            simulated.offset += simulated.step_seconds
            return super().training_step(batch, batch_idx)

    callback = HessianSpectrumCallback(k=2, num_samples=16, density=False, keep_graph=True, loss_fn=simulated.loss,
                                       progress=False)
    callback.clock = Clock(now=simulated)
    trainer(max_steps=400, callbacks=[callback]).fit(SlowSteps(), DataLoader(dataset(), batch_size=8))
    assert callback._budget.clock is callback.clock
    steps = [measurement.step for measurement in callback.history]
    spent, elapsed = callback.clock.spent, callback.clock.elapsed()
    cost = spent / len(steps)
    assert 0.5 < cost < 1.5 and 80 + spent < elapsed < 80 + spent + 10  # real seconds of 400 tiny steps on top
    assert steps[0] == 0 and steps[-1] == 400 and abs(len(steps) - 1 - 80 * 0.05 / 0.95 / cost) <= 1.5, steps
    gaps = [blended_position(b, 400) - blended_position(a, 400) for a, b in itertools.pairwise(steps[1:-1])]
    assert len(gaps) >= 1 and max(gaps) < 1.2 * min(gaps), steps
    assert callback.history[-1].overhead == pytest.approx(spent / elapsed, rel=0.05)
