"""Run the CPU benchmarks against the peer libraries and write ``benchmarks/RESULTS.md``.

Usage::

    python -m benchmarks.run                  # everything, about 10 minutes on 2 cores
    python -m benchmarks.run --smoke --out /tmp/r.md --no-peers   # tiny sizes, seconds

Peers are used when they import (install them with ``bash benchmarks/install_peers.sh``); a missing
one is listed as "not installed" and its rows are left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import costs, peers, report, suites
from benchmarks.measure import command_line
from benchmarks.workloads import BUILDERS, Workload

RESULTS = Path(__file__).with_name("RESULTS.md")
K = 10

MEMORY_NOTES = """\
Memory of the Lanczos basis (the dominant term for large models): `top_eigenvalues` keeps one basis of
`c x P` numbers and `spectral_density` keeps `S` of them (`S` = probes per pass), each number
`basis_dtype` wide (`b` = 8 bytes in float64, the default; 4 in float32). `spectral_density` knows its
`m` steps and allocates `c = m + 1` columns once: `S (m + 1) P b` bytes. `top_eigenvalues` does not know
when it will stop: `c` starts at 17 columns and doubles when full (17, 34, 68, ...), and while it doubles
the old and the new array coexist, so the peak is `3 c' P b` with `c'` the capacity before the last
doubling, between `(m + 1) P b` and about `3 m P b`. Add `k P b` for the returned eigenvectors, the
operator's kept gradient graph (about one backward pass of activations per batch when
`keep_graph=True`), and `S c^2` float64 numbers for T and the reorthogonalization record (small next
to the basis, as `c` is much smaller than `P`). Example: a ResNet-18 (P = 11.2 M) with k = 10 and m = 40
steps holds `68 * 11.2e6 * 8` = 6.1 GB of float64 basis on the GPU, 9.1 GB while it grows from 34 to 68
columns; half of that with `basis_dtype=torch.float32`, none of the GPU's memory with
`basis_device="cpu"` (one transfer of P numbers per step). SLQ with 10 probes per pass and 80 steps at
P = 11.2 M would hold `10 * 81 * 11.2e6 * 8` = 73 GB: use `probes_per_pass=1` and/or a CPU or float32 basis.
"""

METHOD_NOTES = """\
How to read the tables:
- Products are Hessian-vector products (a pass with S vectors counts S), counted at the library's own
  operator without changing what it computes (the largest count over the runs).
- Wall s: wall time of the whole call, construction included, median of the timed runs after one warm-up
  run; a call whose warm-up takes over 2 s is timed once ("1 run"). CPU s: the process's CPU time over
  the same runs (all threads): it is what a call costs when the machine is shared, as this one may be.
  Each call, the warm-up included, uses the next seed (0, 1, 2, ...), passed to the library or set on
  the global RNGs; density settings all make the same number of calls (five with the default
  `--runs 3`), however slow, so that their errors are means over as many independent probe draws.
- Verdicts read the CPU time when torch runs one thread (the default here): with one thread it is the
  wall time the call would take on an idle core, and it does not move when other processes compete for
  the machine; with more threads they read the wall time.
- Peak MB: peak resident memory above the level before the call (Linux VmHWM, reset per call;
  tracemalloc cannot see tensor storage).
- Workloads: each is built with one torch thread, whatever `--threads` says, and the float32 ones are
  trained in float64 and then cast, so that every run builds the same weights bit for bit (trained in
  float32, the weights moved with the thread count and the CPU's kernels, and digits-mlp-250k's
  reference eigenvalues with them, by up to 7.5e-6 relative between one and two threads).
  `python -m benchmarks.workloads` prints a digest of each build with its reference and our default
  error, to compare two runs or two machines.
- Errors: relative errors of the k largest values (sorted), worst over the calls, against the exact
  eigenvalues of the dense float64 Hessian (small workloads) or a certified reference (large ones: our
  solver on float64 products at the same float32 weights, stopped at relative residual 1e-9, eigenvalue
  error at most 1e-9 ||H||).
- Float32 accuracy: the large workloads' products are float32, and what they guarantee is not a fixed
  figure. A returned value theta_i with residual r_i ||H|| (the certificate `top_eigenvalues` returns:
  r_i <= tol, or the float32 floor where no further product lowers it) lies within (r_i + rho) ||H||
  of an eigenvalue of the exact Hessian, where rho ||H|| is how far a float32 product is from the
  float64 one (measured on the reference's eigenvectors when the workload is built, and printed above
  its table). Relative to the 10th eigenvalue, rounding alone may thus leave rho ||H|| / lambda_10,
  "the float32 floor", whatever the solver. The float32 verdict on our default therefore checks each
  error against its own guarantee, not against 1e-6: the error itself (1e-8 to 1e-6) changes with the
  CPU's kernels and the thread count, the guarantee holds on all of them. Where a verdict asks which
  settings "reach 1e-6", a float32 setting reaches it within 1e-6 of the floor: errors there are
  either at the floor or orders of magnitude above it (looser tolerances), so rounding cannot move a
  setting across the line.
- W1 / range: Wasserstein-1 distance between the estimated spectral measure and the exact spectrum,
  divided by the spectral range, mean ± standard error over the calls (independent probes); "as low
  as" in a verdict means within two standard errors of the difference. Raw quadrature nodes and
  weights are compared where the library returns them (ours, hessian-eigenthings); curvlinops returns
  only a smoothed density on a grid, compared as it is (its kernel adds about 0.003 of the range).
- `which='LM'` (the default of hessian-eigenthings' Lanczos and of the documented curvlinops recipe) asks
  for the largest magnitudes, which include negative eigenvalues when those are large (at initialization):
  the errors are then those of the top-k of a different set.
- "Fewer products than PyHessian": both libraries at their cheapest setting in the table that reaches
  the accuracy in question, ours 1e-6 (plus the float32 floor on the large workloads; its residual
  tolerance sweep: the eigenvalue error is about the square of the residual), PyHessian 1e-2 (its
  `maxIter`/`tol` sweep). The same rule compares our time with scipy's `eigsh` (its `tol` sweep) at
  1e-6 (plus the floor); the rows "time <= scipy ..." compare our default
  with its default and with the same nominal `tol=1e-6` (its tolerance is relative to each Ritz value,
  ours to `||H||`).
- Product floor: for the MLPs, the multiply-adds of an exact Hessian-vector product (Pearlmutter's
  R-operator, which double backward on a kept graph computes) over those of a gradient,
  `(2 F_1 + 6 sum F_l) / (2 F_1 + 3 sum F_l)` with `F_l` the size of weight matrix l (l >= 2 in the
  sums): no exact product route on a kept graph does fewer matrix products.
- Warm starts: from one vector, the sum of the previous top-k eigenvectors, as the callback starts
  (the previous eigenvectors as a block pay k products per step once they have moved). "Eigenvectors
  moved" is the sine of the largest principal angle between the top-k eigenvectors before and after
  the GD steps.
- PyHessian runs on one batch with its gradient graph kept (its fastest mode) at its defaults except
  `top_n` (1 by default, 10 here). Its `density()` calls `torch.eig`, removed from PyTorch: that failure
  is the peer's and is recorded as such, not patched.
"""


def _section_eigen(w: Workload, available: dict[str, str | None], runs: int) -> tuple[list[str], list[list[str]]]:
    rows = suites.eigen_table(w, K, available, runs)
    verdicts = report.eigen_verdicts(w.name, rows, K, product_rounding=w.product_rounding,
                                     rounding_floor=w.rounding_floor(K))
    lines = [f"### Top-{K} eigenvalues", ""]
    if w.product_rounding is not None:
        lines += [f"float32 products: rho = {w.product_rounding:.1e} (their largest error on the reference's "
                  f"eigenvectors, relative to ||H|| = {w.norm:.4g}); the float32 floor at the {K}th eigenvalue, "
                  f"rho ||H|| / lambda_{K}, is {w.rounding_floor(K):.1e}.", ""]
    return [*lines, *report.eigen_lines(rows, K)], verdicts


def _section_density(w: Workload, available: dict[str, str | None], runs: int) -> tuple[list[str], list[list[str]]]:
    rows = suites.density_table(w, available, runs)
    return ["### Spectral density (SLQ)", "", *report.density_lines(rows)], report.density_verdict(w.name, rows)


def _section_trace(w: Workload, available: dict[str, str | None], runs: int) -> tuple[list[str], list[list[str]]]:
    rows = suites.trace_table(w, available, runs)
    exact = f" (exact: {w.trace:.6g})" if w.trace is not None else " (no exact trace at this size)"
    return [f"### Trace{exact}", "", *report.trace_lines(rows)], []


def _section_products(w: Workload, available: dict[str, str | None], runs: int) -> tuple[list[str], list[list[str]]]:
    rows = costs.product_table(w, available, runs)
    return ["### Product cost relative to one gradient", "", *report.product_lines(rows)], \
        report.product_verdicts(w.name, rows, costs.exact_product_floor(w.model))


def _section_warm(w: Workload) -> tuple[list[str], list[list[str]]]:
    rows = costs.warm_start_table(w)
    stretches = ", ".join(str(steps) for steps in costs.WARM_START_STEPS)
    title = f"### Warm start: {stretches} more full-batch GD steps, then top-k from the previous eigenvectors"
    return [title, "", *report.warm_lines(rows)], report.warm_verdicts(w.name, rows)


def _section_callback(max_epochs: int) -> tuple[list[str], list[list[str]]]:
    try:
        result = costs.callback_overhead(max_epochs=max_epochs)
    except ImportError as err:
        return ["## The callback's overhead", "", f"Not measured: {err}.", ""], []
    lines = ["## The callback's overhead on the demo run", "",
             f"`MLPClassifier()` on `DigitsDataModule()` (1,000 images, batch 32), {result['max_epochs']} epochs on "
             f"the CPU, `HessianSpectrumCallback()` at its defaults: {result['without']:.3g} s without, "
             f"{result['with']:.3g} s with the callback (median of {result['runs']} runs each): "
             f"**{100 * result['overhead']:.0f}% overhead**, from {result['measurements']} measurements of "
             f"{result['seconds_each']:.3g} s and {result['matvecs_each']:.0f} products each on average.", ""]
    return lines, [["digits demo", "callback overhead at defaults", f"{100 * result['overhead']:.0f}%", "(figure)"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, one run each (seconds, not minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output file (default {RESULTS})")
    parser.add_argument("--no-peers", action="store_true", help="benchmark lightning-hessian alone")
    parser.add_argument("--workloads", default=",".join(BUILDERS), help="comma-separated subset of "
                        + ", ".join(BUILDERS))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per call on small workloads (large: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the measurements (default 1: every library gets the same single "
                             "core, and the timings survive other processes on a small machine; 0 keeps torch's "
                             "choice); the workloads are built with one thread whatever this says")
    parser.add_argument("--callback-epochs", type=int, default=10, help="epochs of the callback-overhead run (0: skip)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report.set_clock("cpu_seconds" if torch.get_num_threads() == 1 else "seconds")
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(BUILDERS)}")
    started, load_before = time.perf_counter(), report.load_average()
    available = {name: None for name in peers.PEERS} if args.no_peers else peers.versions()
    runs = 1 if args.smoke else args.runs

    body: list[str] = []
    verdicts: list[list[str]] = []
    for name in names:
        w = BUILDERS[name](args.smoke)
        print(f"[benchmarks] {name}: P={w.num_params:,}", file=sys.stderr, flush=True)
        body += [f"## {w.name} (P = {w.num_params:,})", "", w.description + ".", ""]
        sections = [_section_eigen(w, available, 1 if w.large else runs)]
        if w.eigenvalues is not None:
            sections.append(_section_density(w, available, runs + 1))
        sections += [_section_trace(w, available, 1 if w.large else runs), _section_products(w, available, runs)]
        if name == "mixture-mlp":
            sections.append(_section_warm(w))
        for lines, found in sections:
            body += lines
            verdicts += found
    if args.callback_epochs > 0:
        lines, found = _section_callback(1 if args.smoke else args.callback_epochs)
        body += lines
        verdicts += found

    command = command_line("benchmarks.run", argv)
    minutes = (time.perf_counter() - started) / 60
    text = [
        "# Benchmarks: lightning-hessian against PyHessian, hessian-eigenthings and curvlinops", "",
        *report.environment(command, available, (load_before, report.load_average())),
        f"Total run time: {minutes:.1f} min. GPU figures: pending — no GPU was available to this run; "
        "`python -m benchmarks.gpu` writes them (see `benchmarks/gpu.py`).", "",
        "The callback at the sizes people train (a ResNet-18, a 1.84M-parameter MLP, a 14.6M-parameter "
        "transformer: products and memory per call, warm starts, the budget) is in "
        "[`RESULTS-scale.md`](RESULTS-scale.md) (`python -m benchmarks.scale`), and the density's error "
        "against the number of probes in [`RESULTS-probes.md`](RESULTS-probes.md) (`python -m benchmarks.probes`).",
        "",
        "## Targets, measured in this run", "",
        *report.table(["workload", "target", "measured", "met"], verdicts),
        METHOD_NOTES, *body, "## Memory", "", MEMORY_NOTES,
    ]
    args.out.write_text("\n".join(text))
    print(f"[benchmarks] wrote {args.out} in {minutes:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
