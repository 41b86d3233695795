"""When to measure: explicit step and epoch schedules, and the budget that spaces calls by their cost.

Symbols: S the run's optimizer steps (``trainer.estimated_stepping_batches``), s a step, b the budget
(a fraction of the run's wall time), C the wall time of one call (numerics and logging), t the wall
time of one training step.

The budget schedule. Over a run of S steps the callback may spend ``B = b / (1 - b) * S * t``
seconds, i.e. about ``n = B / C`` calls. It spreads them evenly in ``u(s) = (log(1 + s) / log(1 + S)
+ s / S) / 2``: half log-spaced (dense early, when the spectrum changes fastest) and half evenly
spaced (so the late run is not starved). After every call the remaining budget is divided again
over the remaining part of ``u``, with C and t measured on the run itself, so the plan follows the
real costs; t is timed from the end of the first training step on (the first carries the loop's
warm-up), over at least ``TIMED_STEPS`` steps before the first planned call. A call is also held
back while it would lift the overhead so far above ``2 b`` (the call at step 0 excepted), so a run
stopped early has spent at most twice its share. The call after the last step (``at_end``) is one
more, made only while the calls so far spent at most B: a run spends at most b plus one call (on a
run shorter than one call, that one is the call at step 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_info

# Early calls may lift the overhead so far up to this multiple of the budget: room for the log-spaced
# start of the plan, while a run stopped early has spent at most twice its share.
OVERHEAD_CAP = 2.0
# Training steps timed (after the first) before the budget plans a call.
TIMED_STEPS = 5


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


def blended_position(step: float, total: int) -> float:
    """``u(s)``: where a step sits in the run, half on a log scale and half on a linear one, in [0, 1].

    Example:
        >>> round(blended_position(0, 1000), 3), round(blended_position(1000, 1000), 3)
        (0.0, 1.0)
    """
    step = min(max(step, 0.0), float(total))
    return 0.5 * math.log1p(step) / math.log1p(total) + 0.5 * step / total


def step_at(position: float, total: int) -> int:
    """The first step ``s`` with ``u(s) >= position`` (``u`` increases, so a bisection finds it).

    Example:
        >>> step_at(blended_position(300, 1000), 1000)
        300
    """
    low, high = 0, total
    while low < high:
        middle = (low + high) // 2
        if blended_position(middle, total) >= position:
            high = middle
        else:
            low = middle + 1
    return low


@dataclass
class Budget:
    """The budget schedule's bookkeeping for one run (all times in seconds).

    Attributes:
        fraction: b.
        total_steps: S, or ``None`` when the run's length is unknown (then only the overhead cap decides).
        start_step: the step the run (or its resumption) started at.
        spent: wall time spent in the callback so far.
        first_cost: what the call at the start cost (not held against the overhead cap).
        last_step: the step of the latest call.
        call_seconds: C, the latest call's cost.
        timed_from: ``(step, training seconds)`` at the first check after the first step: where t is
            timed from.

    Example:
        >>> budget = Budget(fraction=0.05, total_steps=10_000)
        >>> budget.record_call(step=0, seconds=2.0)
        >>> budget.next_step(step=1, training_seconds=0.5)  # the first step, with the loop's warm-up
        6
        >>> budget.next_step(step=101, training_seconds=1.5)  # t = 10 ms, a call 200 steps: 1.6 calls left
        1839
    """

    fraction: float
    total_steps: int | None
    start_step: int = 0
    spent: float = 0.0
    first_cost: float = 0.0
    last_step: int = 0
    call_seconds: float = 0.0
    calls: int = 0
    timed_from: tuple[int, float] | None = None

    def record_call(self, step: int, seconds: float) -> None:
        """A call at ``step`` that took ``seconds`` (numerics and logging)."""
        if self.calls == 0 and step == self.start_step:
            self.first_cost = seconds
        self.spent += seconds
        self.call_seconds = seconds
        self.last_step = step
        self.calls += 1

    def allows_end_call(self, training_seconds: float) -> bool:
        """Whether the call after the last step still fits: the calls so far spent at most the budget,
        ``b / (1 - b)`` times the training time, so that the run spends at most b plus one call.

        Example:
            >>> budget = Budget(fraction=0.05, total_steps=80)
            >>> budget.record_call(step=0, seconds=0.5)  # one call longer than the whole run's budget
            >>> budget.allows_end_call(training_seconds=0.1), budget.allows_end_call(training_seconds=100.0)
            (False, True)
        """
        return self.spent <= self.fraction / (1 - self.fraction) * training_seconds

    def overhead(self, training_seconds: float) -> float:
        """Fraction of the run's wall time spent in the callback so far."""
        return self.spent / max(training_seconds + self.spent, 1e-12)

    def step_seconds(self, step: int, training_seconds: float) -> float | None:
        """t, timed from :attr:`timed_from`; ``None`` before ``TIMED_STEPS`` steps are timed (the first
        check sets :attr:`timed_from`)."""
        if self.timed_from is None:
            self.timed_from = (step, training_seconds)
        timed_step, timed_seconds = self.timed_from
        if step - timed_step < TIMED_STEPS:
            return None
        return max(training_seconds - timed_seconds, 0.0) / (step - timed_step)

    def affordable_calls(self, step: int, training_seconds: float) -> float:
        """How many more calls of cost C the budget affords over the whole run (projected from the steps so
        far; ``inf`` before t is known)."""
        per_step = self.step_seconds(step, training_seconds)
        if per_step is None:
            return math.inf
        total = self.total_steps if self.total_steps is not None else step
        budget = self.fraction / (1 - self.fraction) * (total - self.start_step) * per_step
        return (budget - self.spent) / max(self.call_seconds, 1e-12)

    def next_step(self, step: int, training_seconds: float) -> int:
        """The first step, from ``step`` on, at which the budget allows the next call.

        Args:
            step: the current optimizer step (at least one step after the run's start).
            training_seconds: wall time of training so far, the callback's own time excluded.
        """
        per_step = self.step_seconds(step, training_seconds)
        if per_step is None:
            assert self.timed_from is not None
            return self.timed_from[0] + TIMED_STEPS
        per_step = max(per_step, 1e-12)
        # The overhead cap: wait until one more call keeps the overhead so far within OVERHEAD_CAP b.
        held = self.spent - self.first_cost + self.call_seconds
        needed = held / (OVERHEAD_CAP * self.fraction) - held - self.first_cost
        capped = self.start_step + math.ceil(max(needed, 0.0) / per_step)
        if self.total_steps is None:
            return max(step, capped)
        calls = self.affordable_calls(step, training_seconds)
        if calls < 1:
            return self.total_steps + 1  # nothing left before the end
        total = self.total_steps
        last = blended_position(self.last_step, total)
        planned = step_at(last + (1 - last) / (math.floor(calls) + 1), total)
        return max(step, capped, planned)
