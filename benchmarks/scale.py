"""The callback at the sizes people train: one default call's cost and memory, warm starts, the budget.

Usage::

    python -m benchmarks.scale                       # all workloads, writes benchmarks/RESULTS-scale.md
    python -m benchmarks.scale --workloads mlp cnn   # a subset
    python -m benchmarks.scale --smoke --out /tmp/s.md   # tiny sizes, seconds

Symbols: P parameters, t the wall time of one training step, C that of one callback call.

Workloads (CPU, one torch thread, synthetic data, each a LightningModule whose loss the callback
takes from ``training_step``, as a new user's would be):

- ``cnn``: a ResNet-18 layout at width 16 on 3x32x32 images with BatchNorm, batch 64;
- ``mlp``: an MLP 3072-512-512-10 (1.84 M parameters), batch 64;
- ``transformer``: Lightning's demo ``Transformer`` at its default size (vocabulary 33,278; 14.6 M
  parameters) on random token sequences of length 35, batch 16.

For each: the training step's time; the first (cold) call of ``HessianSpectrumCallback()`` and
the next (warm) one at defaults, with their products and seconds; the process's resident memory
before a call and its peak during it; the memory of the kept graphs (measured by the engine's
saved-tensor count) and the rest per parameter; the top-k products of warm calls along a short
training run; and, where a run long enough for four budgeted measurements takes minutes rather
than hours, that run's overhead against the same run without the callback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.measure import PeakMemory, command_line
from benchmarks.resnet import resnet18
from lightning_hessian import HessianOperator, HessianSpectrumCallback
from lightning_hessian.callback.solver import training_step_loss
from lightning_hessian.engine.graphs import tensors_of
from lightning_hessian.engine.layers import parameter_layout

RESULTS = Path(__file__).with_name("RESULTS-scale.md")
PROBE_SAMPLES = 512  # the callback's default num_samples
TARGET_PRODUCTS = 60
TARGET_BYTES_PER_PARAM = 100
# glibc's malloc moves its mmap threshold up to the largest block freed, after which blocks of a few
# parameters' worth come from the heap and freed ones stay resident; a fixed threshold returns every
# block above it at once, so that the resident peak follows what was allocated (at a cost in page
# faults, which is why the timed calls run without it). At 16 KiB the small temporaries of a double
# backward on micro-batches are returned too: at glibc's initial 128 KiB, products on the convnet's kept
# graphs leave tens of bytes per parameter of freed heap resident while allocating nothing.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "16384"}
# A default run whose training takes as long as this many warm calls holds about three budgeted
# measurements at 5%, besides the first and the last, and as many more as warm calls are cheaper.
OVERHEAD_RUN_CALLS = 70
# The budget of the smoke version of that run, long enough for calls after the first.
SMOKE_RUN_BUDGET = 0.5
# Steps of the short run that times Lightning's whole loop per training step (data, hooks, epochs).
LOOP_TIMING_STEPS = 300


class Classifier(pl.LightningModule):
    """A network trained with SGD on the mean cross-entropy of ``(x, y)`` batches."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TokenTransformer(pl.LightningModule):
    """Lightning's demo ``Transformer`` with the demo's loss (NLL of its log-probabilities)."""

    def __init__(self, vocab_size: int, ninp: int = 200) -> None:
        super().__init__()
        from pytorch_lightning.demos import Transformer

        self.model = Transformer(vocab_size=vocab_size, ninp=ninp, nhid=ninp)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@dataclass
class Workload:
    """A module, its data and its batch size."""

    name: str
    description: str
    build: Callable[[], pl.LightningModule]
    data: TensorDataset
    batch_size: int
    overhead_run: bool
    calls: int = 6

    def loader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def _images(count: int, side: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (count,), generator=generator)
    # Class-dependent means make the task learnable, so the spectrum is a trained network's.
    means = torch.randn(10, 3, 1, 1, generator=generator)
    return TensorDataset(means[labels] + torch.randn(count, 3, side, side, generator=generator), labels)


def workloads(smoke: bool) -> dict[str, Workload]:
    """The suite's workloads (tiny versions with ``smoke``)."""
    side, width, hidden, vocab = (8, 4, 32, 200) if smoke else (32, 16, 512, 33278)
    count = 256 if smoke else 4096
    images = _images(count, side)
    flat = TensorDataset(images.tensors[0].flatten(1), images.tensors[1])
    tokens = torch.randint(0, vocab, (count // 4, 2, 35), generator=torch.Generator().manual_seed(1))
    return {
        "cnn": Workload("cnn", f"ResNet-18 layout, width {width}, BatchNorm, 3x{side}x{side} images, batch 64",
                        lambda: Classifier(resnet18(10, width)), images, 64, overhead_run=False, calls=4),
        "mlp": Workload("mlp", f"MLP {3 * side * side}-{hidden}-{hidden}-10, batch 64",
                        lambda: Classifier(nn.Sequential(nn.Linear(3 * side * side, hidden), nn.ReLU(),
                                                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))),
                        flat, 64, overhead_run=True),
        "transformer": Workload("transformer", f"Lightning's demo Transformer, vocabulary {vocab}, sequences of 35 "
                                "tokens, batch 16", lambda: TokenTransformer(vocab, ninp=16 if smoke else 200),
                                TensorDataset(tokens[:, 0], tokens[:, 1]), 16, overhead_run=False, calls=4),
    }


def trainer(callbacks: list[Any], max_steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                      num_sanity_val_steps=0)


def step_seconds(workload: Workload, steps: int) -> float:
    """Median wall time of a training step (after two warm-up steps), without the callback."""
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter() - self.started)

    pl.seed_everything(0, verbose=False)
    trainer([Clock()], steps + 2).fit(workload.build(), workload.loader())
    return statistics.median(times[2:])


class Probed(HessianSpectrumCallback):
    """The default callback, with the peak resident memory of each call recorded (around the hooks that
    measure)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory: list[tuple[int, int]] = []  # (resident before, peak increase during)

    def _probed(self, hook: Any, *args: Any) -> None:
        before, calls = _resident(), len(self.history)
        with PeakMemory() as peak:
            hook(*args)
        if len(self.history) > calls:
            self.memory.append((before, peak.bytes or 0))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._probed(super().on_train_start, trainer, pl_module)

    def on_train_batch_end(self, *args: Any) -> None:
        self._probed(super().on_train_batch_end, *args)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._probed(super().on_train_end, trainer, pl_module)


def _resident() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def probe_operator(module: pl.LightningModule, batches: list[Any]) -> HessianOperator:
    """The Hessian of ``training_step``'s loss over ``batches`` as a default call builds it, after one
    product (which builds and keeps the graphs, as memory allows)."""
    op = HessianOperator(module, training_step_loss, batches, dtype=torch.float32, keep_graph="auto",
                         split_batches=True)
    op.matvec(torch.zeros(op.num_params))
    return op


def kept_graph_bytes(module: pl.LightningModule, batches: list[Any]) -> int:
    """Bytes of the gradient graphs a default call keeps (all probe batches', as memory allows): every
    distinct storage that a kept graph's nodes saved, found by walking the graphs (micro-batches are
    views of their batch, so the first graph's size times their number would count a batch many times)."""
    op = probe_operator(module, batches)
    excluded = {t.untyped_storage().data_ptr() for t in (*op.snapshot.leaves, *op.snapshot.others)}
    storages: dict[int, int] = {}
    seen: set[Any] = set()
    nodes = [t.grad_fn for graph in (op.graphs.graphs or []) if graph is not None for t in tensors_of(graph)
             if t.grad_fn is not None]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                for tensor in tensors_of(getattr(node, name)):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in excluded:
                        storages[storage.data_ptr()] = storage.nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def default_calls(workload: Workload, calls: int, **settings: Any) -> dict[str, Any]:
    """``calls`` default measurements, one after every 5 training steps (a cold one, then warm ones);
    ``settings`` change the defaults (smoke runs only)."""
    pl.seed_everything(0, verbose=False)
    module = workload.build()
    # One call: at step 0 of a one-step run, none after it.
    callback = Probed(every_n_steps=5, progress=False, at_end=calls > 1, **settings)
    trainer([callback], max(5 * (calls - 1), 1)).fit(module, workload.loader())
    num_params = sum(size for _, size in parameter_layout(module))
    graphs = kept_graph_bytes(module, callback.probe_batches)
    first, *rest = callback.history
    before, peak = callback.memory[0]
    return {
        "num_params": num_params, "probe_samples": first.num_samples, "cold_seconds": first.seconds,
        "cold_products": first.num_matvecs,
        "warm_seconds": statistics.median(r.seconds for r in rest) if rest else None,
        "warm_products": [r.num_matvecs for r in rest],
        "warm_top_k": [_top_k_products(r) for r in rest], "cold_top_k": _top_k_products(first),
        "resident_before": before, "peak_increase": max(p for _, p in callback.memory), "first_peak": peak,
        "call_peaks": [p for _, p in callback.memory],
        "graph_bytes": graphs, "k": callback.config.k, "num_probes": first.hessian.density.nodes.shape[0],
        "max_relative_error_bound": max(r.hessian.max_error_bound / abs(r.hessian.eigenvalues[0])
                                        for r in callback.history),
        "converged": all(all(r.hessian.converged) for r in callback.history),
    }


def _top_k_products(measurement: Any) -> int:
    """The products a call spent on the Hessian's top k (all of its products but the density's)."""
    hessian = measurement.hessian
    return hessian.num_matvecs - (hessian.density.num_matvecs if hessian.density else 0)


def working_memory(workload: Workload, probe_samples: int = PROBE_SAMPLES) -> dict[str, int]:
    """Peak bytes of one training step's forward and backward on a probe batch, and of one product with
    the probe batches' graphs kept: a product's double backward needs memory in proportion to the
    activations of a (micro-)batch, as the training step's backward does, beyond the parameter-sized vectors."""
    pl.seed_everything(0, verbose=False)
    module, stream = workload.build(), iter(workload.loader())
    batches = [next(stream) for _ in range(min(max(probe_samples // workload.batch_size, 1), len(stream)))]
    for _ in range(2):  # the second step is measured: the first allocates the kernels' one-time buffers
        with PeakMemory() as step:
            module.training_step(batches[0], 0).backward()
        module.zero_grad(set_to_none=True)
    op = probe_operator(module, batches)
    vector = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0))
    with PeakMemory() as product:
        op.matvec(vector)
    return {"training_step": step.bytes or 0, "product": product.bytes or 0, "num_params": op.num_params,
            "micro_batch": max(op.snapshot.batch_sizes)}


def _fixed_threshold_child(*arguments: str) -> dict[str, Any]:
    """The JSON line a ``benchmarks.scale`` child prints, run in a fresh process whose malloc returns
    freed blocks (:data:`FIXED_MMAP_THRESHOLD`), so that its resident peak follows what it allocated."""
    command = [sys.executable, "-m", "benchmarks.scale", *arguments]
    done = subprocess.run(command, env={**os.environ, **FIXED_MMAP_THRESHOLD}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocation_rest(name: str, smoke: bool, probe_samples: int | None = None) -> dict[str, int]:
    """Peak bytes of a cold and a warm call beyond the kept graphs (``rest``) and those graphs
    (``graphs``), in a fresh process (:func:`_fixed_threshold_child`)."""
    return _fixed_threshold_child("--allocation-peak", name, *(["--smoke"] if smoke else []),
                                  *(["--probe-samples", str(probe_samples)] if probe_samples else []))


def memory_report(names: list[str], smoke: bool, probe_samples: int | None, command: str) -> str:
    """RESULTS-memory.md: each workload's allocation peak of a default call beyond its kept graphs, and
    the working memory of one product and of one training step, all in fresh processes."""
    samples = probe_samples or (64 if smoke else PROBE_SAMPLES)
    lines = ["# Memory of a default call (CPU)", "", f"- Command: `{command}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, one thread",
             f"- Each figure from a fresh process with `MALLOC_MMAP_THRESHOLD_="
             f"{FIXED_MMAP_THRESHOLD['MALLOC_MMAP_THRESHOLD_']}`, whose resident peak follows what was allocated; "
             "that has run a training step and a product on a throwaway copy (the kernels' one-time buffers); "
             f"a cold and a warm default call over {samples} probe samples. What a call holds beyond its kept graphs "
             "(the parameter-sized vectors, and one product's working memory, which follows one micro-batch's "
             "activations) does not grow with the probe samples; the kept graphs do.", "",
             "| workload | P | kept graphs | call beyond the graphs | per parameter: cold call; warm call "
             "| micro-batch | one product's working memory, per parameter | one training step's, per parameter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for name in names:
        peak = allocation_rest(name, smoke, probe_samples)
        work = _fixed_threshold_child("--working-memory", name, "--probe-samples", str(samples),
                                      *(["--smoke"] if smoke else []))
        per_param = peak["rest"] / work["num_params"]
        calls = "; ".join(f"{rest / work['num_params']:.0f}" for rest in peak["call_rests"])
        lines.append(f"| {name} | {work['num_params']:,} | {_gib(peak['graphs'])} | {_gib(peak['rest'])} | "
                     f"{calls} | {work['micro_batch']} | {work['product'] / work['num_params']:.0f} | "
                     f"{work['training_step'] / work['num_params']:.0f} |")
        verdicts.append(f"| {name} | at most {TARGET_BYTES_PER_PARAM} bytes per parameter beyond the kept graphs "
                        f"(allocated) | {per_param:.0f} | {'yes' if per_param <= TARGET_BYTES_PER_PARAM else 'no'} |")
    lines += ["", "## Verdicts", "", "| workload | target | measured | met |", "| --- | --- | --- | --- |", *verdicts]
    return "\n".join(lines) + "\n"


def overhead_run(workload: Workload, call_seconds: float, max_steps: int | None = None,
                 **settings: Any) -> dict[str, Any]:
    """A default run long enough for at least four budgeted measurements, against the same run without,
    in the order without, with, with, without (a drift of the machine's speed cancels in the means);
    wall and CPU time of the process (``max_steps`` caps the length and ``settings`` change the
    defaults, for smoke runs)."""
    timing = LOOP_TIMING_STEPS if max_steps is None else min(LOOP_TIMING_STEPS, max_steps)
    pl.seed_everything(0, verbose=False)
    started = time.perf_counter()
    trainer([], timing).fit(workload.build(), workload.loader())
    loop_step = (time.perf_counter() - started) / timing
    steps = max(50, math.ceil(OVERHEAD_RUN_CALLS * call_seconds / loop_step))
    steps = steps if max_steps is None else min(steps, max_steps)
    results: dict[str, Any] = {"without": [], "with": [], "steps": steps, "loop_step": loop_step}
    for name in ("without", "with", "with", "without"):
        callbacks = [HessianSpectrumCallback(progress=False, **settings)] if name == "with" else []
        pl.seed_everything(0, verbose=False)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer(callbacks, steps).fit(workload.build(), workload.loader())
        results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        if callbacks:
            results["measurements"] = [r.step for r in callbacks[0].history]
            results["warm_top_k"] = [_top_k_products(r) for r in callbacks[0].history[1:]]
            results["reported"] = callbacks[0].history[-1].overhead
            results["plan"] = callbacks[0].plan
    for clock, index in (("overhead", 0), ("cpu_overhead", 1)):
        with_, without = (statistics.mean(t[index] for t in results[n]) for n in ("with", "without"))
        results[clock] = (with_ - without) / with_
    walls = [wall for wall, _ in results["without"]]
    results["noise"] = (max(walls) - min(walls)) / statistics.mean(walls)
    return results


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _warm_seconds(row: dict[str, Any]) -> float:
    """A warm call's seconds, or the cold call's when only one call ran."""
    return row["warm_seconds"] if row["warm_seconds"] is not None else row["cold_seconds"]


def _overhead_bound(row: dict[str, Any]) -> float:
    """The budget (5%) plus one warm call, as a share of the mean run with the callback."""
    return 0.05 + _warm_seconds(row) / statistics.mean(wall for wall, _ in row["run"]["with"])


def _per_param(value: int | None, num_params: int) -> str:
    return "not run" if value is None else f"{value / num_params:.0f}"


def report(rows: dict[str, dict[str, Any]], descriptions: dict[str, str], command: str, seconds: float) -> str:
    """RESULTS-scale.md: the machine, the command, a table per measure and the verdicts."""
    lines = [
        "# The callback at scale (CPU)",
        "",
        f"- Command: `{command}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s); "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        f"- Total run time: {seconds / 60:.1f} min",
        "",
        "| workload | description | P | training step |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {descriptions[name]} | {r['num_params']:,} | {r['step'] * 1e3:.1f} ms |"
              for name, r in rows.items()]
    lines += ["", "## One default call", "",
              "| workload | probe samples | probes | cold: products (top-k) | cold: seconds | cold: training steps "
              "| warm: products | warm: seconds | largest eigenvalue error bound / eig_1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['probe_samples']} | {r['num_probes']} | {r['cold_products']} ({r['cold_top_k']}) "
                     f"| {r['cold_seconds']:.1f} | {r['cold_seconds'] / r['step']:,.0f} | "
                     f"{', '.join(map(str, r['warm_products'])) or 'not run'} | "
                     f"{'not run' if r['warm_seconds'] is None else format(r['warm_seconds'], '.1f')} | "
                     f"{r['max_relative_error_bound']:.1e} |")
    lines += ["", "## Memory of a call", "",
              "Resident memory (RSS) of the process before the first call and its peak increase over all calls; the "
              "kept graphs (the engine's count of the tensors autograd saved, and the first derivatives); the rest "
              "per parameter, with glibc's default malloc (which keeps freed blocks of a few parameters' worth "
              "resident once its dynamic mmap threshold has grown) and in a fresh process with "
              f"`MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD['MALLOC_MMAP_THRESHOLD_']}` (a cold and a warm call), "
              "whose resident peak follows what the call allocated.", "",
              "| workload | RSS before | peak increase | kept graphs | rest | bytes per parameter beyond the graphs "
              "| the same, fixed mmap threshold |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        rest = max(r["peak_increase"] - r["graph_bytes"], 0)
        lines.append(f"| {name} | {_gib(r['resident_before'])} | {_gib(r['peak_increase'])} | {_gib(r['graph_bytes'])} "
                     f"| {_gib(rest)} | {rest / r['num_params']:.0f} | "
                     f"{_per_param(r['allocated_rest'], r['num_params'])} |")
    lines += ["", "## Warm starts along training", "",
              "Top-k products of the calls after the first, one call every 5 training steps (k = 5).", "",
              "| workload | cold top-k | warm top-k | median warm | 2k |", "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        if r["warm_top_k"]:
            lines.append(f"| {name} | {r['cold_top_k']} | {', '.join(map(str, r['warm_top_k']))} | "
                         f"{statistics.median(r['warm_top_k'])} | {2 * r['k']} |")
    runs = {name: r["run"] for name, r in rows.items() if "run" in r}
    if runs:
        lines += ["", "## A default run with the budget", "",
                  "Four runs of the same length, without the callback, with it, with it, without it; the overhead "
                  "compares the means (wall time, and the process's CPU time, which leaves out the time other "
                  "processes of a shared machine took); the noise is the spread of the two runs without.", "",
                  "| workload | steps | measured at | without | with | overhead (wall) | overhead (CPU) | noise "
                  "| reported | budget + one call |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, run in runs.items():
            walls = {n: ", ".join(f"{wall:.0f} s" for wall, _ in run[n]) for n in ("without", "with")}
            lines.append(f"| {name} | {run['steps']:,} | {', '.join(map(str, run['measurements']))} | "
                         f"{walls['without']} | {walls['with']} | {run['overhead']:.1%} | {run['cpu_overhead']:.1%} | "
                         f"{run['noise']:.1%} | {run['reported']:.1%} | {_overhead_bound(rows[name]):.1%} |")
        lines += [""] + [f"- {name}: {run['plan']}" for name, run in runs.items() if run.get("plan")]
        lines += [f"- {name}: top-k products of the calls after the first along the run (the second run with the "
                  f"callback): {', '.join(map(str, run['warm_top_k']))}; median {statistics.median(run['warm_top_k'])}"
                  for name, run in runs.items() if run["warm_top_k"]]
    unrun = [name for name, r in rows.items() if "run" not in r]
    if unrun:
        lines += ["", "Not run, for want of hours: a run long enough for four measurements at the default budget "
                  f"of 5% lasts about {OVERHEAD_RUN_CALLS} warm calls of training:", ""]
        for name in unrun:
            r = rows[name]
            steps = OVERHEAD_RUN_CALLS * _warm_seconds(r) / r["step"]
            lines.append(f"- {name}: about {steps:,.0f} training steps, "
                         f"{OVERHEAD_RUN_CALLS * _warm_seconds(r) / 3600:.1f} h on this machine")
    lines += ["", "## Verdicts", "", "| workload | target | measured | met |", "| --- | --- | --- | --- |"]
    for name, r in rows.items():
        worst = max([r["cold_products"], *r["warm_products"]])
        rest = max(r["peak_increase"] - r["graph_bytes"], 0) / r["num_params"]
        # The allocation peak where it was measured, else the resident peak (which is never below it).
        allocated = rest if r["allocated_rest"] is None else r["allocated_rest"] / r["num_params"]
        verdicts = [
            (f"at most {TARGET_PRODUCTS} products per default call", f"{worst} (cold {r['cold_products']})",
             worst <= TARGET_PRODUCTS or r["num_params"] <= 1e5),
            (f"at most {TARGET_BYTES_PER_PARAM} bytes per parameter beyond the kept graphs (allocated; "
             "default malloc's resident peak)", f"{_per_param(r['allocated_rest'], r['num_params'])} ({rest:.0f})",
             allocated <= TARGET_BYTES_PER_PARAM),
        ]
        if r["warm_top_k"]:
            median_warm = statistics.median(r["warm_top_k"])
            verdicts.append(("median warm top-k at most 2k products, calls 5 steps apart from initialization",
                             f"{median_warm} (2k = {2 * r['k']})",
                             median_warm <= 2 * r["k"]))
        if "run" in r and r["run"]["warm_top_k"]:
            median_run = statistics.median(r["run"]["warm_top_k"])
            verdicts.append(("median warm top-k at most 2k products, along the budgeted run",
                             f"{median_run} (2k = {2 * r['k']})", median_run <= 2 * r["k"]))
        if "run" in r:
            run = r["run"]
            bound = _overhead_bound(r)
            verdicts.append(("overhead of a default run at most the budget plus one call (wall; CPU)",
                             f"{run['overhead']:.1%}; {run['cpu_overhead']:.1%} (bound {bound:.1%}, "
                             f"{len(run['measurements'])} measurements, noise {run['noise']:.1%})",
                             run["overhead"] <= bound and len(run["measurements"]) >= 4))
        lines += [f"| {name} | {target} | {value} | {'yes' if met else 'no'} |" for target, value, met in verdicts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["cnn", "mlp", "transformer"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the figures")
    parser.add_argument("--no-overhead-run", action="store_true", help="skip the budgeted runs (the longest part)")
    parser.add_argument("--calls", type=int, help="default calls per workload (the first cold, the others warm; "
                        "default: each workload's own, 4 to 6); one call of the demo transformer takes about an hour")
    parser.add_argument("--no-allocation-peak", action="store_true",
                        help="skip the fresh process that measures the allocation peak (two more calls)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--allocation-peak", metavar="WORKLOAD", help=argparse.SUPPRESS)
    parser.add_argument("--working-memory", metavar="WORKLOAD",
                        help="print the peak memory of one training step and of one product on WORKLOAD, and stop")
    parser.add_argument("--memory", action="store_true",
                        help="only the memory of a default call, in fresh processes (writes RESULTS-memory.md)")
    parser.add_argument("--probe-samples", type=int,
                        help="probe samples for --memory (default the callback's 512; the memory beyond the kept "
                        "graphs does not depend on them, and the demo transformer's call is 8x shorter at 64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Denormal floats flushed to zero: after about 1,000 steps the synthetic MLP's cross-entropy drives
    # its gradients below float32's normal range, where each step takes several times longer, which would
    # make the budgeted runs' length and their comparison depend on when that starts.
    torch.set_flush_denormal(True)
    smoke = {"num_samples": 64, "num_probes": 1, "num_steps": 8} if args.smoke else {}
    if args.probe_samples:
        smoke["num_samples"] = args.probe_samples
    if args.working_memory:
        print(json.dumps(working_memory(workloads(args.smoke)[args.working_memory],
                                        smoke.get("num_samples", PROBE_SAMPLES))))
        return 0
    if args.allocation_peak:  # the child of allocation_rest
        workload = workloads(args.smoke)[args.allocation_peak]
        # A training step and a product on a throwaway copy first: the kernels' one-time buffers (caches,
        # thread pools, per-shape kernel caches) belong to the process, allocated by whichever
        # runs them first, once. The product runs on a whole batch, so on the micro-batches a call uses
        # (after a product on a smaller batch, the convnet's first call holds the primitives of its shapes).
        batch = next(iter(workload.loader()))
        throwaway = workload.build()
        throwaway.training_step(batch, 0).backward()
        probe_operator(throwaway, [batch])
        del throwaway
        row = default_calls(workload, 2, **smoke)
        print(json.dumps({"rest": max(row["peak_increase"] - row["graph_bytes"], 0), "graphs": row["graph_bytes"],
                          "call_rests": [peak - row["graph_bytes"] for peak in row["call_peaks"]]}))
        return 0
    if args.memory:
        out = args.out if args.out != RESULTS else RESULTS.with_name("RESULTS-memory.md")
        text = memory_report(args.workloads, args.smoke, args.probe_samples, command_line("benchmarks.scale", argv))
        out.write_text(text)
        print(text)
        return 0
    started = time.perf_counter()
    suite = workloads(args.smoke)
    rows = {}
    for name in args.workloads:
        workload = suite[name]
        row = {"step": step_seconds(workload, 5 if args.smoke else 20)}
        calls = args.calls or (3 if args.smoke else workload.calls)
        row.update(default_calls(workload, calls, **smoke))
        row["allocated_rest"] = None if args.no_allocation_peak else allocation_rest(name, args.smoke)["rest"]
        if workload.overhead_run and not args.no_overhead_run:
            # a smoke run of 100 steps is shorter than one call at 5%: a larger share keeps calls after the first
            budget = {"budget": SMOKE_RUN_BUDGET} if args.smoke else {}
            row["run"] = overhead_run(workload, _warm_seconds(row), 100 if args.smoke else None, **smoke, **budget)
        rows[name] = row
        print(f"scale: {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
        # Written after every workload, so that a run stopped early keeps what it measured.
        text = report(rows, {n: suite[n].description for n in rows}, command_line("benchmarks.scale", argv),
                      time.perf_counter() - started)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
