"""Curves, not snapshots: tracked calls and snapshots in one budget (writes ``RESULTS-curves.md``).

    python -m benchmarks.curves                       # every part (about 25 minutes on one thread)
    python -m benchmarks.curves --parts plan,short    # some of them
    python -m benchmarks.curves --smoke               # tiny versions, for the tests

Parts:

The workloads are the scale suite's, the MLP trained at lr 0.01 (at the suite's 0.05 it dies within
200 steps; see :data:`MLP_LR`).

- ``plan``: for each workload, a training step, one tracked call (warm, the default: the top
  eigenvalue on one training batch; the median of those of a run that tracks every 200 steps on the
  MLP, every 20 on the others) and one default snapshot, in seconds and in
  training steps, and the number of tracked points and snapshots that the default plan gives a
  20,000-step run (:func:`lightning_hessian.callback.schedule.project_plan` on those costs). The
  snapshot is measured on the MLP; on the convnet and the transformer, whose snapshot takes minutes,
  it is priced as the budget prices it (the tracked call's seconds per product and sample, times the
  probe samples and the snapshot's products).
- ``short``: a 3,000-step run of a 5k-parameter CNN on 16x16 images at defaults, against the same
  run without the callback, by wall clock.
- ``per-step``: ``track_every_n_steps=1`` on the MLP and the convnet: products per tracked call after
  the first 20 steps, and their residuals.
- ``agreement``: on the MLP, at log-spaced steps of a run, a snapshot's eig_1 (over the probe set)
  and the tracked value at the same weights (the top eigenvalue over the first probe batch), and
  their relative difference: what a tracked point estimates against the snapshot's.
- ``run``: a budgeted run of the MLP (``--steps``, 20,000 by default) against the same run without the
  callback, by wall clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.measure import command_line
from benchmarks.report import environment, load_average, table
from benchmarks.scale import Classifier, Workload, step_seconds, trainer, workloads
from lightning_hessian import HessianOperator, HessianSpectrumCallback, top_eigenvalues
from lightning_hessian.callback.schedule import project_plan

RESULTS = Path(__file__).with_name("RESULTS-curves.md")
# The scale suite's MLP at its learning rate (0.05) leaves the edge of stability in its first 100 steps
# (eig_1 near 1,000 against SGD's threshold of 76) and dies: from step 200 its loss is stuck at 1.98 and
# the top of its spectrum is a cluster near 0.1, the softmax covariance of the last layer's biases. The
# curves are read on a run that trains: lr 0.01 (loss 0.001 by step 300).
MLP_LR = 0.01
# Tracked calls priced for the plan: every TRACK_SPACING[name] steps (the MLP at about the spacing its
# 20,000-step plan gives, the slower two sooner), TRACK_CALLS of them; the first, cold, is left out.
TRACK_SPACING = {"mlp": 200, "cnn": 20, "transformer": 20}
TRACK_CALLS = 6
# The tracked value's tolerance is checked against this one (the snapshots' default).
TIGHT_TOL = 1e-3
PLANNED_STEPS = 20_000
BUDGET = 0.05
PROBE_SAMPLES = 512
SNAPSHOT_PRODUCTS = 60  # a default snapshot above 100,000 parameters: 28 for the top 5, 32 for the density


def curve_workloads(smoke: bool) -> dict[str, Workload]:
    """The scale suite's workloads, the MLP at :data:`MLP_LR`."""
    suite = workloads(smoke)
    mlp = suite["mlp"]

    def build() -> pl.LightningModule:
        model = mlp.build()
        model.lr = MLP_LR
        return model

    suite["mlp"] = dataclasses.replace(mlp, build=build, description=f"{mlp.description}, lr {MLP_LR}")
    return suite


def _tracked_calls(workload: Workload, steps: int, every: int = 1, **settings: Any) -> list[Any]:
    """The tracked calls of a run that tracks every ``every`` steps (no snapshots)."""
    callback = HessianSpectrumCallback(budget=None, at_start=False, at_end=False, track_every_n_steps=every,
                                       progress=False, **settings)
    pl.seed_everything(0, verbose=False)
    trainer([callback], steps).fit(workload.build(), workload.loader())
    return [m for m in callback.history if not m.snapshot]


def _snapshot(workload: Workload) -> Any:
    """One default snapshot at step 0."""
    callback = HessianSpectrumCallback(budget=None, at_end=False, progress=False)
    pl.seed_everything(0, verbose=False)
    trainer([callback], 1).fit(workload.build(), workload.loader())
    return callback.history[0]


def plan_row(workload: Workload, measure_snapshot: bool, smoke: bool) -> dict[str, Any]:
    step = step_seconds(workload, 4 if smoke else 10)
    every = 1 if smoke else TRACK_SPACING[workload.name]
    tracked = _tracked_calls(workload, every * (4 if smoke else TRACK_CALLS), every)
    warm = tracked[1:] or tracked
    tracked_seconds = statistics.median(m.seconds for m in warm)
    per_product = statistics.median(m.seconds / (m.num_matvecs * m.num_samples) for m in warm)
    if measure_snapshot:
        snapshot = _snapshot(workload)
        snapshot_seconds, snapshot_products, priced = snapshot.seconds, snapshot.num_matvecs, False
    else:
        snapshot_products = SNAPSHOT_PRODUCTS
        snapshot_seconds, priced = per_product * PROBE_SAMPLES * snapshot_products, True
    plan = project_plan(BUDGET, PLANNED_STEPS, step, snapshot_seconds, tracked_seconds)
    return {"step": step, "tracked_seconds": tracked_seconds,
            "tracked_products": statistics.median(m.num_matvecs for m in warm),
            "snapshot_seconds": snapshot_seconds, "snapshot_products": snapshot_products, "priced": priced,
            "snapshots": len(plan.snapshots), "tracked": len(plan.tracked), "spent": plan.spent,
            "budget": plan.budget, "num_params": sum(p.numel() for p in workload.build().parameters())}


def small_cnn_workload(smoke: bool) -> Workload:
    """A 5k-parameter CNN on 16x16 images, batch 32."""
    count = 256 if smoke else 2048
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (count,), generator=generator)
    means = torch.randn(10, 3, 1, 1, generator=generator)
    images = TensorDataset(means[labels] + torch.randn(count, 3, 16, 16, generator=generator), labels)

    def build() -> pl.LightningModule:
        return Classifier(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                        nn.Flatten(), nn.Linear(256, 10)))

    return Workload("small-cnn", "CNN 3x16x16, two 3x3 convolutions of 16 channels, 5,098 parameters, batch 32",
                    build, images, 32, overhead_run=False)


class _StepTimes(pl.Callback):
    """First in the list: each training step's wall time, and the time between steps (the loop's own, and
    the calls of the callback after it)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.between = 0.0
        self.ended: float | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        self.started = time.perf_counter()
        if self.ended is not None:
            self.between += self.started - self.ended

    def on_train_batch_end(self, *args: Any) -> None:
        self.ended = time.perf_counter()
        self.steps.append(self.ended - self.started)


def timed_runs(workload: Workload, steps: int) -> dict[str, Any]:
    """Wall time of a run with the default callback and without, in the order without, with, with, without;
    and where the difference goes: the training steps' median, and the time between steps less the
    callback's (what the callback adds beyond what it counts)."""
    walls: dict[str, list[float]] = {"without": [], "with": []}
    medians: dict[str, list[float]] = {"without": [], "with": []}
    uncounted: dict[str, list[float]] = {"without": [], "with": []}
    callback = None
    for name in ("without", "with", "with", "without"):
        times = _StepTimes()
        callbacks = [times] + ([HessianSpectrumCallback(progress=False)] if name == "with" else [])
        pl.seed_everything(0, verbose=False)
        started = time.perf_counter()
        trainer(callbacks, steps).fit(workload.build(), workload.loader())
        walls[name].append(time.perf_counter() - started)
        medians[name].append(statistics.median(times.steps))
        spent = callbacks[1].clock.spent if name == "with" else 0.0
        uncounted[name].append((times.between - spent) / len(times.steps))
        callback = callbacks[1] if name == "with" else callback
    assert callback is not None
    with_, without = statistics.mean(walls["with"]), statistics.mean(walls["without"])
    tracked = [m for m in callback.history if not m.snapshot]
    return {"with": with_, "without": without, "overhead": (with_ - without) / without,
            "walls": walls, "medians": {name: statistics.mean(v) for name, v in medians.items()},
            "uncounted": {name: statistics.mean(v) for name, v in uncounted.items()},
            "tracked_call": statistics.median(m.seconds for m in tracked) / without if tracked else 0.0,
            "snapshots": [m.step for m in callback.history if m.snapshot],
            "tracked": len(tracked), "first": callback.history[0].step, "last": callback.history[-1].step,
            "reported": callback.history[-1].overhead, "plan": callback.plan}


class _TrackedAtSnapshots(pl.Callback):
    """After the callback under test: at each of its snapshots, the tracked value at the same weights
    (the engine's top eigenvalue over the first probe batch, at the default tolerance)."""

    def __init__(self, probe: HessianSpectrumCallback) -> None:
        self.probe, self.pairs = probe, []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = self.probe.history[-1] if self.probe.history else None
        if last is None or last.step != trainer.global_step or not last.snapshot:
            return
        op = HessianOperator(pl_module, _loss, self.probe.probe_batches[:1])
        tracked = top_eigenvalues(op, 1, tol=self.probe.config.track_tol)
        tight = top_eigenvalues(op, 1, tol=TIGHT_TOL, v0=tracked.eigenvectors[0])
        self.pairs.append((last.step, last.hessian.eigenvalues[0], float(tracked.eigenvalues[0]),
                           float(tight.eigenvalues[0])))


def _loss(module: Any, batch: Any) -> Any:
    return module.training_step(batch, 0)


def agreement_rows(workload: Workload, steps: int) -> list[tuple[int, float, float, float]]:
    probe = HessianSpectrumCallback(budget=None, every_n_steps=max(steps // 32, 1), log_spaced=True, at_start=False,
                                    density=False, progress=False)
    pairs = _TrackedAtSnapshots(probe)
    pl.seed_everything(0, verbose=False)
    trainer([probe, pairs], steps).fit(workload.build(), workload.loader())
    return pairs.pairs


def per_step_row(workload: Workload, steps: int) -> dict[str, Any]:
    tracked = _tracked_calls(workload, steps)
    settled = tracked[20:] or tracked[1:]
    return {"calls": len(tracked), "median_products": statistics.median(m.num_matvecs for m in settled),
            "max_products": max(m.num_matvecs for m in settled),
            "max_residual": max(m.hessian.max_residual for m in settled),
            "converged": sum(all(m.hessian.converged) for m in settled) / len(settled)}


def _walls(walls: dict[str, list[float]]) -> str:
    order = [walls["without"][0], walls["with"][0], walls["with"][1], walls["without"][1]]
    return ", ".join(f"{wall:.1f} s" for wall in order)


def report(rows: dict[str, Any], command: str, seconds: float, load: tuple[float, float]) -> str:
    lines = ["# Curves: tracked calls and snapshots in one budget", "", *environment(command, {}, load),
             f"- Wall time of the benchmark: {seconds / 60:.1f} min", ""]
    if "plan" in rows:
        lines += ["## What one call costs, and what the default plan gives a 20,000-step run", "",
                  f"Budget {BUDGET:.0%}; a tracked call is the default (the top eigenvalue, warm, on one training "
                  "batch, to a relative residual of 1e-2), the median of "
                  f"{TRACK_CALLS - 1} warm ones every {TRACK_SPACING['mlp']} steps on the MLP and every "
                  f"{TRACK_SPACING['cnn']} on the others from the start of training; a snapshot the default (top 5 "
                  "and the density over 512 probe samples). Snapshots "
                  "marked * are priced as the budget prices them, from the tracked call's seconds per product "
                  "and sample (the measured ones, on one thread: 250 s for the convnet and 2,395 s for the "
                  "transformer, `RESULTS-scale-large.md`).", ""]
        lines += table(["workload", "P", "training step", "tracked call: products, seconds (steps)",
                        "snapshot: products, seconds (steps)", "20,000 steps: tracked points", "snapshots",
                        "spent / budget"],
                       [[name, f"{r['num_params']:,}", f"{r['step'] * 1e3:.1f} ms",
                         f"{r['tracked_products']:.0f}, {r['tracked_seconds']:.3g} s "
                         f"({r['tracked_seconds'] / r['step']:.0f})",
                         f"{r['snapshot_products']}, {r['snapshot_seconds']:.3g} s "
                         f"({r['snapshot_seconds'] / r['step']:,.0f}){' *' if r['priced'] else ''}",
                         str(r["tracked"]), str(r["snapshots"]), f"{r['spent'] / r['budget']:.2f}"]
                        for name, r in rows["plan"].items()])
        lines.append("")
    for key, title in (("short", "A short run at defaults"), ("run", "A budgeted run of the MLP at defaults")):
        if key in rows:
            r = rows[key]
            lines += [f"## {title}", "", f"{r['description']}, {r['steps']:,} steps.", "",
                      *table(["without", "with", "overhead (wall)", "one tracked call / run", "reported",
                              "snapshots at", "tracked calls", "first and last value"],
                             [[f"{r['without']:.1f} s", f"{r['with']:.1f} s", f"{r['overhead']:.1%}",
                               f"{r['tracked_call']:.2%}", f"{r['reported']:.1%}",
                               ", ".join(map(str, r["snapshots"])), str(r["tracked"]),
                               f"steps {r['first']} and {r['last']}"]]),
                      "", "Where the difference goes (means of the two runs of each; per step): "
                      f"the median training step {r['medians']['with'] * 1e3:.2f} ms with the callback, "
                      f"{r['medians']['without'] * 1e3:.2f} ms without; the time between steps less the "
                      f"callback's counted time {r['uncounted']['with'] * 1e3:.3f} ms with, "
                      f"{r['uncounted']['without'] * 1e3:.3f} ms without. The runs' walls in order "
                      f"(without, with, with, without): {_walls(r['walls'])}.",
                      "", f"Plan: {r['plan']}", ""]
    if "agreement" in rows:
        lines += ["## A tracked value against the snapshot's, at the same steps (MLP)", "",
                  "The snapshot's eig_1 is over the 512 probe samples; the tracked value is the top eigenvalue "
                  "over the first probe batch (64 samples), at the same weights, to the tracked calls' relative "
                  f"residual (1e-2), and the same to {TIGHT_TOL:g}.", "",
                  *table(["step", "snapshot eig_1", "tracked eig_1", "tracked / snapshot - 1",
                          f"tracked to {TIGHT_TOL:g}", "1e-2 / tighter - 1"],
                         [[f"{step:,}", f"{snap:.4g}", f"{tracked:.4g}", f"{tracked / snap - 1:+.1%}",
                           f"{tight:.4g}", f"{tracked / tight - 1:+.2e}"]
                          for step, snap, tracked, tight in rows["agreement"]]), ""]
    if "per-step" in rows:
        lines += ["## Tracking every step (`track_every_n_steps=1`)", "",
                  *table(["workload", "tracked calls", "median products after step 20", "largest",
                          "largest residual", "converged"],
                         [[name, str(r["calls"]), f"{r['median_products']:.0f}", str(r["max_products"]),
                           f"{r['max_residual']:.2g}", f"{r['converged']:.0%}"]
                          for name, r in rows["per-step"].items()]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curves", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="plan,short,agreement,per-step,run", help="comma-separated parts to run")
    parser.add_argument("--workloads", default="mlp,cnn,transformer", help="the plan's workloads")
    parser.add_argument("--steps", type=int, default=PLANNED_STEPS, help="length of the budgeted MLP run")
    parser.add_argument("--smoke", action="store_true", help="tiny versions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command, started, load = command_line("benchmarks.curves", argv), time.perf_counter(), (load_average(), 0.0)
    parts, suite, rows = args.parts.split(","), curve_workloads(args.smoke), {}
    if "plan" in parts:
        rows["plan"] = {name: plan_row(suite[name], name == "mlp", args.smoke) for name in args.workloads.split(",")}
    if "short" in parts:
        small = small_cnn_workload(args.smoke)
        rows["short"] = {**timed_runs(small, 300 if args.smoke else 3000), "description": small.description,
                         "steps": 300 if args.smoke else 3000}
    if "agreement" in parts:
        rows["agreement"] = agreement_rows(suite["mlp"], 64 if args.smoke else 3200)
    if "per-step" in parts:
        rows["per-step"] = {name: per_step_row(suite[name], 24 if args.smoke else 60) for name in ("mlp", "cnn")}
    if "run" in parts:
        steps = 200 if args.smoke else args.steps
        rows["run"] = {**timed_runs(suite["mlp"], steps), "description": suite["mlp"].description, "steps": steps}
    load = (load[0], load_average())
    args.out.write_text(report(rows, command, time.perf_counter() - started, load))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
