"""Where the callback's overhead goes: its calls, or training slowed down between them.

Usage::

    python -m benchmarks.overhead                  # writes benchmarks/RESULTS-overhead.md
    python -m benchmarks.overhead --smoke --out /tmp/o.md

On the scale suite's MLP (``benchmarks.scale``), runs of ``STEPS`` training steps without the
callback and with it measuring every ``EVERY`` steps alternate, ``REPEATS`` times each. Every training
step's wall time (from the end of one to the end of the next) is recorded; the steps that hold a call
are set apart. If the callback cost nothing but its calls, the other steps take as long as those of
the run without it, and the overhead is the share of wall time spent in calls, which is what
``hessian/overhead`` reports. Comparing whole runs instead (as ``benchmarks.scale`` does) adds the
run-to-run noise of the machine, which the repeats of the run without the callback show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks.measure import command_line
from benchmarks.scale import trainer, workloads
from lightning_hessian import HessianSpectrumCallback

RESULTS = Path(__file__).with_name("RESULTS-overhead.md")
STEPS, EVERY, REPEATS = 3000, 500, 2


class StepClock(pl.Callback):
    """Wall time from the end of one training step to the end of the next, for every step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.last: float | None = None

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds.append(now - self.last)
        self.last = now


def run(smoke: bool, measuring: bool, steps: int, every: int) -> dict[str, float]:
    """One run: wall time, and the steps' times outside calls (median, sum) and in calls."""
    pl.seed_everything(0, verbose=False)
    workload = workloads(smoke)["mlp"]
    clock = StepClock()
    callbacks: list[Any] = [clock]
    if measuring:
        settings = {"num_samples": 64, "num_probes": 1, "num_steps": 8} if smoke else {}
        callbacks.append(HessianSpectrumCallback(every_n_steps=every, at_start=False, at_end=False, progress=False,
                                                 **settings))
    started = time.perf_counter()
    trainer(callbacks, steps).fit(workload.build(), workload.loader())
    wall = time.perf_counter() - started
    # seconds[i] ends at global step i + 2; a call at step s runs at the end of the step that makes it s.
    calls = {r.step for r in callbacks[1].history} if measuring else set()
    holding = {i for i in range(len(clock.seconds)) if i + 2 in calls or i + 1 in calls}
    outside = [t for i, t in enumerate(clock.seconds) if i not in holding]
    in_calls = sum(r.seconds for r in callbacks[1].history) if measuring else 0.0
    return {"wall": wall, "median": statistics.median(outside), "outside": sum(outside), "calls": len(calls),
            "in_calls": in_calls}


def report(rows: list[tuple[str, dict[str, float]]], steps: int, every: int, command: str) -> str:
    """RESULTS-overhead.md: one row per run, then the comparison."""
    lines = ["# Where the overhead goes", "", f"- Command: `{command}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, one thread",
             f"- The scale suite's MLP, {steps:,} training steps; with the callback at defaults measuring every "
             f"{every} steps. Steps outside calls: every step but the ones that hold a call.", "",
             "| run | wall | steps outside calls: median | their sum | calls | seconds in calls | share in calls |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['wall']:.1f} s | {r['median'] * 1e3:.2f} ms | {r['outside']:.1f} s | "
                     f"{r['calls']} | {r['in_calls']:.1f} s | {r['in_calls'] / r['wall']:.1%} |")
    without = [r for name, r in rows if name.startswith("without,")]
    with_ = [r for name, r in rows if name.startswith("with,")]
    base = statistics.mean(r["median"] for r in without)
    spread = (max(r["wall"] for r in without) - min(r["wall"] for r in without)) / statistics.mean(
        r["wall"] for r in without)
    lines += ["", f"- Steps outside calls, median with / without the callback: "
              f"{statistics.mean(r['median'] for r in with_) / base:.3f}",
              f"- Run-to-run spread of the wall time of identical runs without the callback: {spread:.1%}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, every = (60, 20) if args.smoke else (STEPS, EVERY)
    rows = []
    for repeat in range(1, REPEATS + 1):
        rows.append((f"without, {repeat}", run(args.smoke, False, steps, every)))
        rows.append((f"with, {repeat}", run(args.smoke, True, steps, every)))
    text = report(rows, steps, every, command_line("benchmarks.overhead", argv))
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
