"""How many SLQ probes a density needs, as P grows: the evidence behind ``default_num_probes``.

Usage::

    python -m benchmarks.probes            # writes benchmarks/RESULTS-probes.md (about 10 minutes)
    python -m benchmarks.probes --smoke --out /tmp/p.md

For each workload of ``benchmarks/workloads.py`` (trained MLPs and a CNN, 1,930 to 252,950
parameters), the Wasserstein-1 distance between the callback's density (the top 5 deflated, 32
plain Lanczos steps per probe, S probes) and a reference, relative to the spectral range, for S =
1, 2, 4 and 8 over several seeds. The reference is the exact spectrum (dense float64 Hessian) where
it is known, else a 16-probe, 80-step reorthogonalized estimate with the top 10 deflated. Also the
same 1-probe density with reorthogonalization, to show what dropping it costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.measure import command_line
from benchmarks.workloads import BUILDERS, Workload
from lightning_hessian import spectral_density, top_eigenvalues

RESULTS = Path(__file__).with_name("RESULTS-probes.md")
PROBES = (1, 2, 4, 8)
STEPS = 32
K = 5


def w1_between(nodes: Tensor, weights: Tensor, ref_nodes: Tensor, ref_weights: Tensor) -> float:
    """Wasserstein-1 distance between two discrete measures on the line (each given by nodes and
    weights, rows averaged), the integral of the absolute difference of their distribution functions.

    Example:
        >>> w1_between(torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]))
        1.0
    """
    a_nodes, a_weights = nodes.double().flatten(), (weights.double() / weights.shape[0]).flatten()
    b_nodes, b_weights = ref_nodes.double().flatten(), (ref_weights.double() / ref_weights.shape[0]).flatten()
    points = torch.cat([a_nodes, b_nodes])
    signed = torch.cat([a_weights / a_weights.sum(), -b_weights / b_weights.sum()])
    order = torch.argsort(points)
    cumulative = torch.cumsum(signed[order], 0)[:-1]
    return float((cumulative.abs() * torch.diff(points[order])).sum())


def reference_measure(workload: Workload) -> tuple[Tensor, Tensor, str]:
    """The exact spectrum as a measure, or a many-probe reorthogonalized estimate."""
    if workload.eigenvalues is not None:
        values = workload.eigenvalues.double()
        return values[None, :], torch.full((1, values.numel()), 1 / values.numel(), dtype=torch.float64), "exact"
    op = workload.operator()
    top = top_eigenvalues(op, 10, tol=1e-6).converged_part()
    estimate = spectral_density(op, num_probes=16, num_steps=80, seed=100, reorthogonalize=True, deflate=top)
    return estimate.nodes, estimate.weights, "16 probes x 80 steps, reorthogonalized, top 10 deflated"


def measure(workload: Workload, seeds: int) -> dict[str, object]:
    """W1 / range of the callback's density for each number of probes, over ``seeds`` seeds."""
    ref_nodes, ref_weights, kind = reference_measure(workload)
    span = float(ref_nodes.max() - ref_nodes.min())
    op = workload.operator(dtype=torch.float32) if workload.eigenvalues is None else workload.operator()
    top = top_eigenvalues(op, K, tol=1e-4).converged_part()
    rows: dict[str, list[float]] = {}
    for probes in PROBES:
        rows[f"{probes} plain"] = [
            w1_between(*_nodes(spectral_density(op, num_probes=probes, num_steps=STEPS, seed=seed, deflate=top)),
                       ref_nodes, ref_weights) / span for seed in range(seeds)]
    rows["1 reorthogonalized"] = [
        w1_between(*_nodes(spectral_density(op, num_probes=1, num_steps=STEPS, seed=seed, deflate=top,
                                            reorthogonalize=True)), ref_nodes, ref_weights) / span
        for seed in range(seeds)]
    return {"num_params": op.num_params, "reference": kind, "rows": rows}


def _nodes(density) -> tuple[Tensor, Tensor]:
    return density.nodes, density.weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = ["# SLQ probes against the number of parameters", "",
             f"- Command: `{command_line('benchmarks.probes', argv)}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, one thread",
             "",
             f"Wasserstein-1 distance to the reference, relative to the spectral range, of a density with the top {K} "
             f"deflated and {STEPS} Lanczos steps per probe: median over {args.seeds} seeds (max in brackets).", "",
             "| workload | P | reference | " + " | ".join(f"{p} probe{'s' * (p > 1)}" for p in PROBES)
             + " | 1 probe, reorthogonalized |",
             "| --- | --- | --- | " + " | ".join("---" for _ in PROBES) + " | --- |"]
    for name, build in BUILDERS.items():
        result = measure(build(args.smoke), 2 if args.smoke else args.seeds)
        cells = [f"{statistics.median(v):.2e} ({max(v):.1e})" for v in result["rows"].values()]
        lines.append(f"| {name} | {result['num_params']:,} | {result['reference']} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"Total run time: {(time.perf_counter() - started) / 60:.1f} min", ""]
    args.out.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
