"""When to measure: explicit step and epoch schedules, and the budget that plans two kinds of call.

Symbols: S the run's optimizer steps (``trainer.estimated_stepping_batches``), s a step, b the budget
(a fraction of the run's wall time), t the wall time of one training step, C_s and C_t the wall time
of a snapshot and of a tracked call (numerics and logging).

Two kinds of call. A *snapshot* measures everything asked for (the top k over the whole probe set,
the density and every view); a *tracked* call measures only the top eigenvalues, warm-started from
the previous tracked call, on a subset of the probe set (one training batch by default): a few
products on one batch, so it costs a few training steps and a run affords many of them. Together they
draw a dense curve of the top eigenvalues with full pictures of the spectrum at a few steps.

The budget. Over a run of S steps the callback may spend ``B = b / (1 - b) * S * t`` seconds. A
quarter of it, :data:`SNAPSHOT_SHARE`, is for snapshots: the one at the start, the one after the last
step, and between them as many more as that quarter affords (at most :data:`MAX_SNAPSHOTS` in all),
log-spaced, since the spectrum changes fastest early; a snapshot that would take more than an eighth
of B is shrunk (:func:`fit_fidelity`: fewer SLQ probes, fewer probe samples, fewer Lanczos steps,
then no density) until it fits. The rest of B, and whatever the snapshots leave, is for tracked
calls, spread evenly over the steps: a tracked call is due when the tracked calls' spending, with it,
stays within their share of the budget for the part of the run done. The split favours the curve:
a snapshot costs as much as tens of tracked calls (50 to 200 on the scale suite), a curve needs tens
of points to show a trend where the pictures need two, and on long runs the quarter still buys more
pictures (B grows with S); a snapshot's cost is measured on the run (and estimated before
the first training step from the products of a tracked call, one product on a batch costing about
one training step). C_s, C_t and t are measured on the run itself, so the plan follows the real
costs; t is timed from the end of the first training step on (the first carries the loop's warm-up),
over at least ``TIMED_STEPS`` steps before the first planned call. A snapshot between start and end
is also held back while it would lift the overhead so far above ``2 b`` (the call at the start
excepted), so a run stopped early has spent at most about twice its share. A run spends at most b
plus one tracked call, once the costs are measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pytorch_lightning.utilities.rank_zero import rank_zero_info

# Snapshots (between the start and the end) may lift the overhead so far up to this multiple of the
# budget: a run stopped early has spent at most about twice its share.
OVERHEAD_CAP = 2.0
# Training steps timed (after the first) before the budget plans a call.
TIMED_STEPS = 5
# The share of the budget for snapshots; the rest, and what they leave, goes to tracked calls.
SNAPSHOT_SHARE = 0.25
# At most this many snapshots in a budgeted run, the start and the end included: more pictures of the
# spectrum add little that the tracked curve does not show.
MAX_SNAPSHOTS = 8
# The fewest Lanczos steps per SLQ probe a shrunk snapshot keeps before it drops the density.
MIN_DENSITY_STEPS = 8

Kind = Literal["snapshot", "tracked"]


def note_time_limit(trainer: Any) -> None:
    """Say once (rank zero) that a Trainer stopping on time (``max_time`` or a ``Timer``) counts the callback's calls,
    so the run trains fewer steps than it would without them."""
    if any(type(callback).__name__ == "Timer" for callback in getattr(trainer, "callbacks", None) or []):
        rank_zero_info("HessianSpectrumCallback: the Trainer stops on time (max_time or a Timer); the callback's "
                       "calls count against it, so the run trains fewer steps than it would without them")


def crossed_multiple(previous: int, step: int, every: int, *, log_spaced: bool = False) -> bool:
    """Whether a multiple of ``every`` lies in ``(previous, step]`` (with ``log_spaced``, a multiple
    ``every * 2**j``): a schedule that still fires when the step advances by more than one at a time.

    Example:
        >>> [s for s in (2, 4, 6, 8, 10, 12) if crossed_multiple(s - 2, s, 5)]
        [6, 10]
        >>> [crossed_multiple(a, b, 2, log_spaced=True) for a, b in ((3, 9), (9, 15), (15, 17))]  # 2 * 2**j
        [True, False, True]
    """
    first, last = previous // every + 1, step // every
    if first > last:
        return False
    if not log_spaced:
        return True
    if last < 1:  # no every * 2**j at or below zero
        return False
    power = 1 << (last.bit_length() - 1)  # the largest power of two <= last
    return power >= first


def log_spaced_steps(first: int, last: int, count: int) -> list[int]:
    """``count`` distinct steps strictly between ``first`` and ``last``, evenly spaced in ``log(1 + s)``
    (as many as fit when the gap is small).

    Example:
        >>> log_spaced_steps(0, 10_000, 3)
        [9, 99, 999]
    """
    low, high = math.log1p(first), math.log1p(last)
    steps = sorted({round(math.expm1(low + (high - low) * j / (count + 1))) for j in range(1, count + 1)})
    return [s for s in steps if first < s < last]


@dataclass(frozen=True)
class Fidelity:
    """What a snapshot measures: the first ``num_batches`` probe batches, ``num_probes`` SLQ probes of
    ``num_steps`` Lanczos steps each, or no density.

    Example:
        >>> Fidelity(num_batches=16, num_probes=4, num_steps=32).products(top_k=28)
        156
    """

    num_batches: int
    num_probes: int
    num_steps: int
    density: bool = True

    def products(self, top_k: int) -> int:
        """Products of one snapshot: ``top_k`` for the top eigenvalues and the density's probes times steps."""
        return top_k + (self.num_probes * self.num_steps if self.density else 0)


def fit_fidelity(full: Fidelity, allowance: float, product_seconds: float, batch_samples: list[int],
                 top_k: int) -> Fidelity | None:
    """The most faithful snapshot within ``allowance`` seconds, shrunk from ``full`` step by step: SLQ probes
    halved down to one, then probe batches halved down to one, then Lanczos steps halved down to
    :data:`MIN_DENSITY_STEPS`, then no density; ``None`` if even the top eigenvalues of one batch cost more.

    Args:
        full: the snapshot the settings ask for.
        allowance: seconds one snapshot may take.
        product_seconds: the seconds of one product per probe sample (measured on the run).
        batch_samples: the samples of each probe batch, in order.
        top_k: products of the top-k solve.

    Example:
        >>> full = Fidelity(num_batches=16, num_probes=4, num_steps=32)
        >>> fit_fidelity(full, allowance=2.0, product_seconds=1e-3, batch_samples=[32] * 16, top_k=28)
        Fidelity(num_batches=1, num_probes=1, num_steps=32, density=True)
    """
    def cost(fidelity: Fidelity) -> float:
        return product_seconds * sum(batch_samples[:fidelity.num_batches]) * fidelity.products(top_k)

    fidelity = full
    while cost(fidelity) > allowance:
        if fidelity.density and fidelity.num_probes > 1:
            fidelity = dataclasses.replace(fidelity, num_probes=fidelity.num_probes // 2)
        elif fidelity.num_batches > 1:
            fidelity = dataclasses.replace(fidelity, num_batches=fidelity.num_batches // 2)
        elif fidelity.density and fidelity.num_steps > MIN_DENSITY_STEPS:
            fidelity = dataclasses.replace(fidelity, num_steps=max(fidelity.num_steps // 2, MIN_DENSITY_STEPS))
        elif fidelity.density:
            fidelity = dataclasses.replace(fidelity, density=False)
        else:
            return None
    return fidelity


class Clock:
    """The run's wall time and the part of it spent in the callback, in seconds: the one clock that the
    budget plans with and that ``<name>/overhead`` reports.

    Args:
        now: the time source (default :func:`time.perf_counter`); tests pass a simulated one.

    Example:
        >>> ticks = iter([0.0, 1.0, 3.0, 10.0, 10.0])
        >>> clock = Clock(now=lambda: next(ticks))
        >>> clock.start()  # t = 0
        >>> with clock.charged():  # from t = 1 to t = 3 in the callback
        ...     pass
        >>> clock.spent, clock.training_seconds(), clock.overhead()  # at t = 10, then t = 10
        (2.0, 8.0, 0.2)
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.started: float | None = None
        self.spent = 0.0

    def start(self) -> None:
        """Start the run's clock (at fit start) with nothing spent."""
        self.started, self.spent = self.now(), 0.0

    @contextlib.contextmanager
    def charged(self) -> Iterator[None]:
        """Count the wall time of the block as the callback's."""
        begun = self.now()
        try:
            yield
        finally:
            self.spent += self.now() - begun

    def elapsed(self) -> float:
        """Wall time since :meth:`start` (0 before)."""
        return 0.0 if self.started is None else self.now() - self.started

    def training_seconds(self) -> float:
        """Wall time since :meth:`start` that the callback did not spend."""
        return max(self.elapsed() - self.spent, 0.0)

    def overhead(self) -> float:
        """The callback's share of the wall time since :meth:`start` (NaN before)."""
        if self.started is None:
            return float("nan")
        return self.spent / max(self.elapsed(), 1e-12)


@dataclass
class Budget:
    """The budget's plan for one run: when the next snapshot and tracked call are due (times in seconds,
    read from ``clock``).

    Attributes:
        fraction: b.
        total_steps: S, or ``None`` when the run's length is unknown (then no snapshots between the
            start and the end, and tracked calls spend their share of the time trained so far).
        clock: the run's :class:`Clock`, which the callback charges with its time.
        start_step: the step the run (or its resumption) started at.
        track: whether the budget plans tracked calls (not when an explicit schedule sets them).
        snapshots: whether snapshots fit the budget at all (if not, only the one after the last step runs).
        snapshot_seconds: C_s, the latest snapshot's cost (or its estimate before one ran).
        tracked_seconds: C_t, the latest tracked call's cost.
        spent: seconds spent by each kind so far.
        first_cost: what the calls at the start cost (not held against the overhead cap).
        calls, snapshots_taken: the calls so far, and the snapshots among them.
        planned: the steps of the snapshots still to come between the start and the end (``None``
            until planned, once t is timed; planned again after each snapshot, at its real cost).
        replan: whether the next check plans the snapshots again.
        timed_from: ``(step, training seconds)`` at the first check after the first step: where t is
            timed from.

    Example:
        >>> now = [0.0]
        >>> clock = Clock(now=lambda: now[0])
        >>> clock.start()
        >>> budget = Budget(fraction=0.05, total_steps=10_000, clock=clock)
        >>> clock.spent = 0.05; now[0] = 0.55; budget.record("tracked", step=0, seconds=0.05)
        >>> budget.snapshot_seconds = 1.0  # what a snapshot would cost
        >>> budget.next_call(step=1)  # the first step (0.5 s, the loop's warm-up) starts the timing
        (6, None)
        >>> now[0] = 1.55  # 100 steps later: t = 10 ms, B = 5.3 s; a quarter affords only the end's snapshot
        >>> budget.next_call(step=101), budget.planned  # 4.3 s left for tracked calls of 0.05 s: every 116 steps
        ((235, 'tracked'), [])
    """

    fraction: float
    total_steps: int | None
    clock: Clock = field(default_factory=Clock)
    start_step: int = 0
    track: bool = True
    snapshots: bool = True
    snapshot_seconds: float = 0.0
    tracked_seconds: float = 0.0
    spent: dict[str, float] = field(default_factory=lambda: {"snapshot": 0.0, "tracked": 0.0})
    first_cost: float = 0.0
    calls: int = 0
    snapshots_taken: int = 0
    planned: list[int] | None = None
    replan: bool = False
    timed_from: tuple[int, float] | None = None

    def record(self, kind: Kind, step: int, seconds: float) -> None:
        """A call of ``kind`` at ``step`` that took ``seconds`` (numerics and logging; the clock has charged them)."""
        if step == self.start_step:  # a call at the start (the tracked call that prices a snapshot, and the snapshot)
            self.first_cost += seconds
        self.spent[kind] += seconds
        if kind == "snapshot":
            self.snapshots_taken += 1
            self.snapshot_seconds = seconds
            self.replan = self.planned is not None  # the snapshots to come, at what this one really cost
        else:
            self.tracked_seconds = seconds
        self.calls += 1

    def step_seconds(self, step: int) -> float | None:
        """t, timed from :attr:`timed_from`; ``None`` before ``TIMED_STEPS`` steps are timed (the first
        check sets :attr:`timed_from`)."""
        training_seconds = self.clock.training_seconds()
        if self.timed_from is None:
            self.timed_from = (step, training_seconds)
        timed_step, timed_seconds = self.timed_from
        if step - timed_step < TIMED_STEPS:
            return None
        return max(training_seconds - timed_seconds, 0.0) / (step - timed_step)

    def total_seconds(self, per_step: float) -> float | None:
        """B, the whole run's budget at ``per_step`` seconds a step (``None`` when S is unknown)."""
        if self.total_steps is None:
            return None
        return self.fraction / (1 - self.fraction) * (self.total_steps - self.start_step) * per_step

    def snapshot_allowance(self, per_step: float) -> float | None:
        """The seconds one snapshot may take: the snapshots' share of B over the start and the end."""
        total = self.total_seconds(per_step)
        return None if total is None else SNAPSHOT_SHARE * total / 2

    def _plan(self, step: int, total: float) -> list[int]:
        """The snapshots between now and the end that the snapshots' share affords, log-spaced."""
        if not self.snapshots:
            return []
        cost = max(self.snapshot_seconds, 1e-12)
        left = SNAPSHOT_SHARE * total - self.spent["snapshot"] - cost  # the end's snapshot is reserved
        count = min(max(math.floor(left / cost), 0), MAX_SNAPSHOTS - 1 - self.snapshots_taken)
        assert self.total_steps is not None
        return log_spaced_steps(step, self.total_steps, count)

    def end_allowance(self, per_step: float) -> float | None:
        """The seconds the snapshot after the last step may take: what is left of B (``None`` when S is unknown)."""
        total = self.total_seconds(per_step)
        return None if total is None else total - self.clock.spent

    def tracked_allowance(self, total: float) -> float:
        """The seconds left to the tracked calls of the whole run: B less the snapshots spent and to come
        (those planned and the one after the last step)."""
        return total - self.spent["snapshot"] - self.snapshot_seconds * (len(self.planned or ()) + 1)

    def _capped(self, per_step: float, cost: float) -> int:
        """The first step at which one more call of ``cost`` keeps the overhead so far within OVERHEAD_CAP b."""
        held = self.clock.spent - self.first_cost + cost
        needed = held / (OVERHEAD_CAP * self.fraction) - held - self.first_cost
        return self.start_step + math.ceil(max(needed, 0.0) / per_step)

    def next_call(self, step: int) -> tuple[int, Kind | None]:
        """The next step, from ``step`` on, at which a call is due, and its kind (``None``: nothing is
        due, ask again then).

        Args:
            step: the current optimizer step (at least one step after the run's start).
        """
        per_step = self.step_seconds(step)
        if per_step is None:
            assert self.timed_from is not None
            return self.timed_from[0] + TIMED_STEPS, None
        per_step = max(per_step, 1e-12)
        total = self.total_seconds(per_step)
        snapshot = math.inf
        if total is not None:
            if self.planned is None or self.replan:
                self.planned, self.replan = self._plan(step, total), False
            if self.planned:
                snapshot = max(self.planned[0], self._capped(per_step, self.snapshot_seconds))
        tracked = math.inf
        if self.track:
            cost = self.tracked_seconds
            if total is None:  # the tracked share of what has been earned so far
                rate = (1 - SNAPSHOT_SHARE) * self.fraction / (1 - self.fraction) * per_step
                tracked = self.start_step + math.ceil((self.spent["tracked"] + cost) / max(rate, 1e-300))
            else:
                allowance = self.tracked_allowance(total)
                if allowance > 0:
                    assert self.total_steps is not None
                    progress = (self.spent["tracked"] + cost) / allowance
                    tracked = self.start_step + math.ceil(progress * (self.total_steps - self.start_step))
        due = min(snapshot, tracked)
        if due == math.inf or (self.total_steps is not None and due > self.total_steps):
            return (self.total_steps if self.total_steps is not None else step) + 1, None
        return max(step, int(due)), "snapshot" if snapshot <= tracked else "tracked"

    def took_snapshot(self, step: int) -> None:
        """A planned snapshot ran at ``step``: it stands for every planned one up to there (those the overhead
        cap held back), whose share goes to the tracked calls."""
        while self.planned and self.planned[0] <= step:
            self.planned.pop(0)


def plan_message(budget: Budget, per_step: float, fidelity: Fidelity | None, full: Fidelity, name: str) -> str:
    """What the budget will do, in one paragraph: each kind's cost in training steps and how many of each
    the run gets, and what a shrunk snapshot leaves out and how to buy it back.

    Args:
        budget: the run's budget, once planned.
        per_step: t, seconds per training step.
        fidelity: the snapshots' fidelity (``None``: no snapshot fits the budget).
        full: the fidelity the settings ask for.
        name: the callback's ``name`` (the tag prefix).

    Example:
        >>> budget = Budget(fraction=0.05, total_steps=20_000, tracked_seconds=0.05, planned=[99, 999])
        >>> budget.record("snapshot", step=0, seconds=2.0)
        >>> full = Fidelity(num_batches=16, num_probes=4, num_steps=32)
        >>> print(plan_message(budget, 0.01, full, full, "hessian"))  # doctest: +NORMALIZE_WHITESPACE
        HessianSpectrumCallback: a snapshot takes 2 s (200 training steps), a tracked call 0.05 s (5 steps);
        to keep its cost near 5% of 20,000 steps it takes 4 snapshots (at the start, after the last step
        and 2 log-spaced between) and about 50 tracked calls more, one every 400 steps; hessian/overhead
        logs the real share
    """
    steps = budget.total_steps
    length = f"{steps:,} steps" if steps is not None else "the run"
    between = len(budget.planned or ())
    tracked_cost = f"{budget.tracked_seconds:.2g} s ({budget.tracked_seconds / per_step:,.0f} steps)"
    cost = (f"a snapshot takes {budget.snapshot_seconds:.2g} s ({budget.snapshot_seconds / per_step:,.0f} training "
            f"steps), a tracked call {tracked_cost}")
    if fidelity is not None:
        snapshots = f"{between + 2} snapshots (at the start, after the last step and {between} log-spaced between)"
    elif budget.snapshots_taken:  # the start's estimate of t let one in; the measured t leaves no room for more
        snapshots = "the snapshot at the start and no more unless what is left of the budget affords one after " \
                    "the last step (a tracked call stands for the end otherwise)"
    else:
        snapshots = "no snapshot unless what is left of the budget affords one after the last step (tracked " \
                    "calls stand for the start and the end)"
    total = budget.total_seconds(per_step)
    if budget.track and total is not None and budget.tracked_seconds > 0:
        left = budget.tracked_allowance(total) - budget.spent["tracked"]
        count = max(math.floor(left / budget.tracked_seconds), 0)
        tracked = f" and about {count:,} tracked calls more" + (f", one every {math.ceil(steps / count):,} steps"
                                                             if count and steps else "")
    elif budget.track:
        tracked = f" and tracked calls in {1 - SNAPSHOT_SHARE:.0%} of the budget"
    else:
        tracked = ""
    message = f"HessianSpectrumCallback: {cost}; to keep its cost near {budget.fraction:.0%} of {length} it takes " \
              f"{snapshots}{tracked}"
    if fidelity != full:
        message += "; " + _shrunk(fidelity, full, start_snapshot=budget.snapshots_taken > 0)
    return message + f"; {name}/overhead logs the real share"


def _shrunk(fidelity: Fidelity | None, full: Fidelity, *, start_snapshot: bool = False) -> str:
    """What a shrunk snapshot leaves out, and how to buy it back (``start_snapshot``: the start had one)."""
    if fidelity is None:
        start = "" if start_snapshot else ", so the start is a tracked call"
        return (f"even the top eigenvalues of one probe batch cost more than a snapshot's share of the budget{start}; "
                "raise `budget=` or set an explicit schedule (`every_n_steps=`) for snapshots")
    lost = []
    if fidelity.num_batches < full.num_batches:
        lost.append(f"{fidelity.num_batches} of the {full.num_batches} probe batches")
    if full.density and not fidelity.density:
        lost.append("no density")
    else:
        if fidelity.num_probes < full.num_probes:
            lost.append(f"{fidelity.num_probes} SLQ probe(s) instead of {full.num_probes}")
        if fidelity.num_steps < full.num_steps:
            lost.append(f"{fidelity.num_steps} Lanczos steps instead of {full.num_steps}")
    return ("to fit, snapshots measure " + ", ".join(lost) + "; raise `budget=`, or set `num_samples=`, "
            "`num_probes=` and `num_steps=` with an explicit schedule (`every_n_steps=`), to measure all of it")


@dataclass(frozen=True)
class ProjectedPlan:
    """What the budget's plan gives a run, projected from measured costs (:func:`project_plan`).

    Attributes:
        snapshots: the steps of the snapshots.
        tracked: the steps of the tracked calls.
        spent: the seconds spent in calls.
        budget: B, the seconds the budget affords.
    """

    snapshots: list[int]
    tracked: list[int]
    spent: float
    budget: float


def project_plan(fraction: float, total_steps: int, step_seconds: float, snapshot_seconds: float,
                 tracked_seconds: float) -> ProjectedPlan:
    """The calls the budget plans for a run of ``total_steps`` steps of ``step_seconds``, with snapshots of
    ``snapshot_seconds`` (at full fidelity; one over its allowance is shrunk to it, as the callback shrinks
    its fidelity) and tracked calls of ``tracked_seconds``: the plan of :class:`Budget` driven step by step
    on a simulated clock, as the callback drives it (a snapshot at the start, the calls it says are due,
    a snapshot after the last step).

    Example:
        >>> plan = project_plan(0.05, 20_000, step_seconds=0.01, snapshot_seconds=5.0, tracked_seconds=0.05)
        >>> len(plan.snapshots), len(plan.tracked) >= 50, plan.spent <= plan.budget + 0.05
        (2, True, True)
    """
    now = [0.0]
    clock = Clock(now=lambda: now[0])
    clock.start()
    budget = Budget(fraction=fraction, total_steps=total_steps, clock=clock)
    allowance = budget.snapshot_allowance(step_seconds)
    assert allowance is not None

    def call(kind: Kind, step: int, seconds: float) -> None:
        spent = clock.spent
        with clock.charged():
            now[0] += seconds
        budget.record(kind, step, clock.spent - spent)

    call("snapshot", 0, min(snapshot_seconds, allowance))
    budget.tracked_seconds = tracked_seconds
    snapshots, tracked, due = [0], [], 1
    for step in range(1, total_steps + 1):
        now[0] += step_seconds
        if step < due:
            continue
        due, kind = budget.next_call(step)
        if due <= step and kind is not None:
            if kind == "snapshot":
                call(kind, step, min(snapshot_seconds, allowance))
                budget.took_snapshot(step)
                snapshots.append(step)
            else:
                call(kind, step, tracked_seconds)
                tracked.append(step)
            due = step + 1
    end = budget.end_allowance(step_seconds)
    call("snapshot", total_steps, min(snapshot_seconds, max(end if end is not None else snapshot_seconds, 0.0)))
    snapshots.append(total_steps)
    total = budget.total_seconds(step_seconds)
    assert total is not None
    return ProjectedPlan(snapshots=snapshots, tracked=tracked, spent=clock.spent, budget=total)
