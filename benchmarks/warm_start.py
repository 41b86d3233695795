"""Warm starts of the top-k solve along training: one vector (the callback's) against the block.

Usage::

    python -m benchmarks.warm_start                  # writes benchmarks/RESULTS-warm.md
    python -m benchmarks.warm_start --smoke --out /tmp/w.md

On the scale suite's MLP (``benchmarks.scale``, 1.84 M parameters, SGD with momentum), the top 5 of
the Hessian over 512 fixed probe samples are solved to the callback's tolerance in its lean basis at
calls 5 training steps apart, in two phases: from initialization, and after 300 training steps. Each
call solves three ways: cold (a random start), warm from the sum of the previous call's eigenvectors
(what the callback does), and warm from those eigenvectors as a block. The floor of a warm start is
k products (exact eigenvectors span an invariant subspace); what it costs above that measures how far
the eigenvectors moved between calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import command_line
from benchmarks.scale import workloads
from lightning_hessian import HessianOperator
from lightning_hessian.callback.solver import CHEAP_TOL, training_step_loss
from lightning_hessian.engine.eigen import lean_max_basis, top_eigenvalues

RESULTS = Path(__file__).with_name("RESULTS-warm.md")
K = 5
PROBE_BATCHES = 8  # 8 x 64 = the callback's 512 probe samples
SPACING = 5
CALLS = 6


def phase(after: int, *, smoke: bool) -> list[dict[str, float]]:
    """Calls ``SPACING`` steps apart from training step ``after``: products of each start per call."""
    torch.manual_seed(0)
    workload = workloads(smoke)["mlp"]
    module = workload.build()
    optimizer = module.configure_optimizers()
    loader = workload.loader()
    stream = iter(loader)
    probe = [next(stream) for _ in range(min(PROBE_BATCHES, len(loader) - 1))]

    def train(steps: int) -> None:
        nonlocal stream
        for index in range(steps):
            batch = next(stream, None)
            if batch is None:
                stream = iter(loader)
                batch = next(stream)
            optimizer.zero_grad()
            module.training_step(batch, index).backward()
            optimizer.step()

    train(after)
    rows, previous = [], None
    for call in range(CALLS):
        op = HessianOperator(module, training_step_loss, probe, dtype=torch.float32, keep_graph=True)
        solve = {"tol": CHEAP_TOL, "basis_dtype": torch.float32, "max_basis": lean_max_basis(K)}
        cold = top_eigenvalues(op, K, **solve)
        row = {"step": after + SPACING * call, "cold": cold.num_matvecs, "eig_1": float(cold.eigenvalues[0])}
        if previous is not None:
            for name, start in (("sum", previous.sum(dim=0)), ("block", previous)):
                row[name] = top_eigenvalues(op, K, v0=start, verify=False, **solve).num_matvecs
            rows.append(row)
        previous = cold.eigenvectors
        train(SPACING)
    return rows


def report(phases: dict[int, list[dict[str, float]]], seconds: float, command: str) -> str:
    """RESULTS-warm.md: one table per phase and the medians."""
    lines = ["# Warm starts along training", "", f"- Command: `{command}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, one thread; "
             f"{seconds / 60:.1f} min",
             f"- Top {K} of the Hessian of the scale suite's MLP over 512 probe samples, relative residual "
             f"{CHEAP_TOL:g}, basis of {lean_max_basis(K)} vectors; calls {SPACING} training steps apart.", "",
             "| phase | step | eig_1 | cold | warm: sum of eigenvectors | warm: eigenvectors as a block |",
             "| --- | --- | --- | --- | --- | --- |"]
    for after, rows in phases.items():
        name = "from initialization" if after == 0 else f"after {after} steps"
        lines += [f"| {name} | {r['step']} | {r['eig_1']:.2f} | {r['cold']} | {r['sum']} | {r['block']} |"
                  for r in rows]
        lines.append(f"| {name}: median | | | {statistics.median(r['cold'] for r in rows)} | "
                     f"{statistics.median(r['sum'] for r in rows)} | {statistics.median(r['block'] for r in rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    phases = {after: phase(after, smoke=args.smoke) for after in (0, 300)}
    text = report(phases, time.perf_counter() - started, command_line("benchmarks.warm_start", argv))
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
