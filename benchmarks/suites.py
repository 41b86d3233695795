"""The solver figures, top-k, density and trace: one function per table, returning plain rows (dicts).

Symbols: P parameters, k eigenvalues, S vectors per pass, m Lanczos steps.

Every library call is timed from scratch (operator construction included) with
:func:`benchmarks.measure.measure`: one warm-up call, then the median of ``runs`` calls; a call whose
warm-up takes over ``SINGLE_RUN_SECONDS`` is timed once, and the table says so. Each call gets its
own seed (see :func:`_execute`). A peer that raises is recorded with its error message instead of
numbers.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from benchmarks import peers
from benchmarks.measure import certificate_check, measure, relative_errors, wasserstein1, wasserstein1_grid
from benchmarks.peers import DensityOutput, EigOutput, TraceOutput
from benchmarks.workloads import Workload
from lightning_hessian import spectral_density, top_eigenvalues
from lightning_hessian.engine.density import default_num_probes

OURS = "lightning-hessian"
SCIPY_ON_OURS = "scipy eigsh on our product"
# A call whose warm-up run takes longer than this is timed once (its first run).
SINGLE_RUN_SECONDS = 2.0


@dataclass(frozen=True)
class Case:
    """One library call at one setting; ``run(seed)`` makes the call with that seed."""

    library: str
    setting: str
    run: Callable[[int], Any]


def _execute(case: Case, runs: int, device: torch.device,
             single_above: float | None = SINGLE_RUN_SECONDS) -> dict[str, Any]:
    """Time a case over seeds 0, 1, ...; a failure becomes a row with its message.

    Each call (the warm-up too) gets the next seed, passed to the library where it takes one and
    set on the global RNGs (torch, NumPy) for those that draw from them, so that the calls are
    independent draws; ``outputs`` holds every call's result.
    """
    row: dict[str, Any] = {"library": case.library, "setting": case.setting}
    seeds = itertools.count()
    current = [0]

    def prepare() -> None:
        current[0] = next(seeds)
        torch.manual_seed(current[0])
        np.random.seed(current[0])

    try:
        timed = measure(lambda: case.run(current[0]), runs=runs, single_above=single_above, device=device,
                        prepare=prepare)
    except Exception as err:  # a peer's failure is a result, not a crash of the benchmark
        row["failure"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        return row
    row.update(outputs=timed.values, seconds=timed.seconds, cpu_seconds=timed.cpu_seconds, runs=timed.runs,
               peak_mb=None if timed.peak_bytes is None else timed.peak_bytes / 2**20,
               products=max(output.products for output in timed.values))
    return row


def _execute_all(cases: list[Case], runs: int, device: torch.device, *, single_above: float | None,
                 deadline: float | None, peers_first: bool) -> list[dict[str, Any]]:
    """:func:`_execute` each case (peers before ours if asked); cases after ``deadline`` are skipped."""
    if peers_first:
        cases = [c for c in cases if c.library not in (OURS, SCIPY_ON_OURS)] + \
            [c for c in cases if c.library in (OURS, SCIPY_ON_OURS)]
    rows = []
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"library": case.library, "setting": case.setting, "failure": "skipped: time limit"})
            continue
        rows.append(_execute(case, runs, device, single_above))
    return rows


# --- top-k eigenvalues ---------------------------------------------------------------------

def _ours_top_k(workload: Workload, k: int, seed: int, **kwargs: Any) -> EigOutput:
    result = top_eigenvalues(workload.operator(), k, seed=seed, **kwargs)
    return EigOutput(result.eigenvalues, result.num_matvecs, result.residuals)


def _eigsh_on_ours(workload: Workload, k: int, tol: float) -> EigOutput:
    op = workload.operator()

    def matvec(v: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).double().cpu().numpy()

    linear = scipy.sparse.linalg.LinearOperator((op.num_params, op.num_params), matvec=matvec, dtype=np.float64)
    values = scipy.sparse.linalg.eigsh(linear, k=k, which="LA", tol=tol, return_eigenvectors=False)
    return EigOutput(torch.from_numpy(np.asarray(values, dtype=np.float64)), op.num_matvecs)


OURS_TOL_SWEEP = (1e-5, 1e-4, 1e-3)
"""Looser residual tolerances of ours, besides the default 1e-6: the eigenvalue error is about the
square of the residual, so a looser tolerance can still reach a given eigenvalue accuracy."""

DEFLATE = 10
"""Top eigenpairs that the deflated density settings place exactly."""

PYHESSIAN_SWEEP = ((100, 1e-3), (1000, 1e-4), (1000, 1e-5), (1000, 1e-6))
"""PyHessian ``(maxIter, tol)`` settings; the first is its default."""


def eigen_cases(workload: Workload, k: int, available: dict[str, str | None]) -> list[Case]:
    """Top-k settings of every library: its documented defaults and tightened ones."""
    w, big = workload, workload.large
    cases = [
        Case(OURS, "top_eigenvalues(k), default tol=1e-6", lambda seed: _ours_top_k(w, k, seed)),
        *(Case(OURS, f"tol={tol:g}", lambda seed, t=tol: _ours_top_k(w, k, seed, tol=t)) for tol in OURS_TOL_SWEEP),
        Case(SCIPY_ON_OURS, "eigsh(which='LA'), default tol=0", lambda seed: _eigsh_on_ours(w, k, 0.0)),
        *(Case(SCIPY_ON_OURS, f"eigsh(which='LA', tol={tol:g})", lambda seed, t=tol: _eigsh_on_ours(w, k, t))
          for tol in (1e-6, *OURS_TOL_SWEEP)),
    ]
    if available.get("PyHessian"):
        for max_iter, tol in PYHESSIAN_SWEEP[:1] if big else PYHESSIAN_SWEEP:
            label = f"eigenvalues(top_n={k}, maxIter={max_iter}, tol={tol:g})" + (
                ", defaults otherwise" if (max_iter, tol) == PYHESSIAN_SWEEP[0] else "")
            cases.append(Case("PyHessian", label,
                              lambda seed, m=max_iter, t=tol: peers.pyhessian_top_k(w, k, max_iter=m, tol=t)))
    if available.get("hessian-eigenthings"):
        cases += [
            Case("hessian-eigenthings", f"lanczos(k={k}), default max_iter=2k",
                 lambda seed: peers.eigenthings_lanczos(w, k, seed=seed)),
            Case("hessian-eigenthings", "lanczos, max_iter=50 (largest with reorthogonalization)",
                 lambda seed: peers.eigenthings_lanczos(w, k, max_iter=50, seed=seed)),
        ]
        if not big:
            cases.append(Case("hessian-eigenthings", "deflated_power_iteration, defaults (100 it., tol 1e-4)",
                              lambda seed: peers.eigenthings_power(w, k, seed=seed)))
    if available.get("curvlinops"):
        cases += [
            Case("curvlinops + scipy", f"eigsh(H.to_scipy(), k={k}, which='LM') (documented recipe)",
                 lambda seed: peers.curvlinops_eigsh(w, k)),
            Case("curvlinops + scipy", "which='LA', tol=1e-6, check_deterministic=False",
                 lambda seed: peers.curvlinops_eigsh(w, k, which="LA", tol=1e-6, check_deterministic=False)),
        ]
    return cases


def eigen_table(workload: Workload, k: int, available: dict[str, str | None], runs: int, *,
                deadline: float | None = None, peers_first: bool = False) -> list[dict[str, Any]]:
    """Rows: products, seconds, peak memory and top-1/5/k relative errors (worst over the calls) per setting.

    Rows of a solver that certifies its pairs (ours) also get ``certificate``: the worst over the calls
    of :func:`~benchmarks.measure.certificate_check` with the workload's ``product_rounding``.
    """
    rows = _execute_all(eigen_cases(workload, k, available), runs, workload.device,
                        single_above=SINGLE_RUN_SECONDS, deadline=deadline, peers_first=peers_first)
    for row in rows:
        if "outputs" in row:
            outputs = row.pop("outputs")
            errors = [relative_errors(o.eigenvalues, workload.reference, (1, 5, k)) for o in outputs]
            row["errors"] = {j: max(e[j] for e in errors) for j in (1, 5, k)}
            if all(o.residuals is not None for o in outputs):
                checks = [certificate_check(o.eigenvalues, o.residuals, workload.reference, k, scale=workload.norm,
                                            rounding=workload.product_rounding or 0.0) for o in outputs]
                row["certificate"] = {key: max(c[key] for c in checks) for key in ("ratio", "bound", "residual")}
    return rows


# --- spectral density and trace ------------------------------------------------------------------

def _ours_density(workload: Workload, seed: int, deflate: int = 0, **kwargs: Any) -> DensityOutput:
    """``spectral_density``; with ``deflate`` > 0 the top ``deflate`` eigenpairs are found first (in the
    timed call, their products counted) and placed exactly."""
    op_kwargs = {key: kwargs.pop(key) for key in ("keep_graph", "vectorize") if key in kwargs}
    op = workload.operator(**op_kwargs)
    deflated = top_eigenvalues(op, deflate, seed=seed) if deflate else None
    result = spectral_density(op, seed=seed, deflate=deflated, **kwargs)
    return DensityOutput(op.num_matvecs, nodes=result.nodes.flatten(),
                         weights=result.weights.flatten() / result.nodes.shape[0])


def density_cases(workload: Workload, available: dict[str, str | None]) -> list[Case]:
    """SLQ settings: ours with each speed lever on and off and with the top eigenpairs deflated, and the
    peers' defaults and tightened settings."""
    w = workload
    probes = default_num_probes(w.num_params)
    cases = [
        Case(OURS, f"spectral_density() defaults: {probes} probes (by P) x 80 steps, all in one pass, plain "
             "recurrence, graph kept", lambda seed: _ours_density(w, seed)),
        Case(OURS, "probes_per_pass=1 (graph kept)", lambda seed: _ours_density(w, seed, probes_per_pass=1)),
        Case(OURS, "keep_graph=False (all probes per pass)", lambda seed: _ours_density(w, seed, keep_graph=False)),
        Case(OURS, "probes_per_pass=1, keep_graph=False (neither lever)",
             lambda seed: _ours_density(w, seed, probes_per_pass=1, keep_graph=False)),
        Case(OURS, "vectorize=False (all probes per pass, looped)",
             lambda seed: _ours_density(w, seed, vectorize=False)),
        Case(OURS, "reorthogonalize=True (full reorthogonalization)",
             lambda seed: _ours_density(w, seed, reorthogonalize=True)),
        *(Case(OURS, f"deflate=top_eigenvalues(op, {DEFLATE}), {probes} probes x {steps} steps "
               f"(top-{DEFLATE} included)",
               lambda seed, m=steps: _ours_density(w, seed, deflate=DEFLATE, num_steps=m)) for steps in (40, 80)),
    ]
    if available.get("PyHessian"):
        cases.append(Case("PyHessian", "density(iter=100, n_v=1) (defaults)", lambda seed: peers.pyhessian_density(w)))
    if available.get("hessian-eigenthings"):
        cases.append(Case("hessian-eigenthings", "spectral_density() defaults: 10 runs x 80 steps",
                          lambda seed: peers.eigenthings_density(w, seed=seed)))
    if available.get("curvlinops"):
        cases += [
            Case("curvlinops", "lanczos_approximate_spectrum(ncv=128), num_repeats=1 (default)",
                 lambda seed: peers.curvlinops_density(w)),
            Case("curvlinops", "ncv=128, num_repeats=10 (documented example)",
                 lambda seed: peers.curvlinops_density(w, repeats=10)),
        ]
    return cases


def density_table(workload: Workload, available: dict[str, str | None], runs: int, *,
                  deadline: float | None = None, peers_first: bool = False) -> list[dict[str, Any]]:
    """Rows: products, seconds, peak memory and Wasserstein-1 error over the range per setting.

    Every setting makes the same ``runs + 1`` calls (a warm-up, then ``runs`` timed), however long they
    take, so that each W1 is a mean over the same number of independent probe draws. Without an
    exact spectrum (large workloads) the error is left out.
    """
    rows = _execute_all(density_cases(workload, available), runs, workload.device, single_above=None,
                        deadline=deadline, peers_first=peers_first)
    for row in rows:
        outputs = row.pop("outputs", None)
        if outputs is None:
            continue
        errors = [float("nan")] if workload.eigenvalues is None else \
            [_density_error(o, workload.eigenvalues) for o in outputs]
        row["w1"] = statistics.mean(errors)
        row["w1_se"] = statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) > 1 else float("nan")
    return rows


def _density_error(output: DensityOutput, eigenvalues: Tensor) -> float:
    if output.nodes is not None:
        return wasserstein1(output.nodes, output.weights, eigenvalues)
    return wasserstein1_grid(output.grid, output.density, eigenvalues)


def _ours_trace(workload: Workload, probes: int, seed: int) -> TraceOutput:
    result = spectral_density(workload.operator(), num_probes=probes, num_steps=1, probes_per_pass=10, seed=seed)
    return TraceOutput(result.trace, result.num_matvecs)


def trace_table(workload: Workload, available: dict[str, str | None], runs: int) -> list[dict[str, Any]]:
    """Rows: products, seconds, mean estimate and mean relative error of each trace estimator (~100 products)."""
    w = workload
    cases = [Case(OURS, "spectral_density(num_probes=100, num_steps=1): Hutchinson, 10 per pass",
                  lambda seed: _ours_trace(w, 100, seed))]
    if available.get("PyHessian"):
        cases.append(Case("PyHessian", "trace() defaults (maxIter=100, tol=1e-3)",
                          lambda seed: peers.pyhessian_trace(w)))
    if available.get("hessian-eigenthings"):
        cases += [Case("hessian-eigenthings", "trace() defaults (Hutch++, 100 products)",
                       lambda seed: peers.eigenthings_trace(w, seed=seed)),
                  Case("hessian-eigenthings", "trace(method='hutchinson', 100 products)",
                       lambda seed: peers.eigenthings_trace(w, method="hutchinson", seed=seed))]
    if available.get("curvlinops"):
        cases += [Case("curvlinops", "hutchinson_trace(num_matvecs=100)", lambda seed: peers.curvlinops_trace(w)),
                  Case("curvlinops", "hutchpp_trace(num_matvecs=99) (a multiple of 3)",
                       lambda seed: peers.curvlinops_trace(w, matvecs=99, method="hutch++"))]
    rows = []
    for case in cases:
        row = _execute(case, runs, w.device)
        if "outputs" in row:
            estimates = [o.estimate for o in row.pop("outputs")]
            row["estimate"] = statistics.mean(estimates)
            if w.trace is not None:
                row["error"] = statistics.mean(abs(e - w.trace) / abs(w.trace) for e in estimates)
        rows.append(row)
    return rows
