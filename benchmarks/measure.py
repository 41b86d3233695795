"""Measuring a call: wall time (median after a warm-up), peak memory, and errors against a reference.

Peak memory on the CPU is the peak resident set size (Linux ``VmHWM``) above the resident size just
before the call, with the high-water mark reset through ``/proc/self/clear_refs`` and freed heap
memory returned to the system first (``malloc_trim``), so each call is measured on its own.
``tracemalloc`` cannot be used: it only sees Python's allocator, not tensor storage; and
``resource.getrusage`` reports a peak that cannot be reset. On a GPU it is
``torch.cuda.max_memory_allocated`` above the memory allocated before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"
_RESET_PEAK_RSS = "5"  # the value written to clear_refs that resets VmHWM (Linux >= 4.0)


@dataclass(frozen=True)
class Timed:
    """What one measured call produced.

    Attributes:
        values: the callable's return values, one per call, the warm-up's first.
        seconds: median wall time over the timed runs.
        cpu_seconds: median CPU time of this process over the timed runs (all threads); unlike wall
            time it barely changes when other processes compete for the cores.
        runs: number of timed runs.
        peak_bytes: peak memory above the pre-call level in the first call (None if unknown).
    """

    values: list[Any]
    seconds: float
    cpu_seconds: float
    runs: int
    peak_bytes: int | None

    @property
    def value(self) -> Any:
        """The value of the last call."""
        return self.values[-1]


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open(_PROC_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    """Context manager measuring the peak memory of a block; ``.bytes`` afterwards (or None)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open(_PROC_CLEAR_REFS, "w") as handle:
                handle.write(_RESET_PEAK_RSS)
        except OSError:
            self._start = -1
            return self
        self._start = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        peak = _status_kib("VmHWM")
        if self._start >= 0 and peak is not None:
            self.bytes = max(0, peak * 1024 - self._start)


def measure(fn: Callable[[], Any], *, runs: int, warmup: bool = True, single_above: float | None = None,
            device: torch.device | str = "cpu", prepare: Callable[[], None] | None = None) -> Timed:
    """Run ``fn`` once to warm up (unless ``warmup=False``), then ``runs`` more times, and time them.

    Args:
        fn: the call to measure (no arguments).
        runs: timed runs after the warm-up (the median is reported).
        warmup: whether the first call is an untimed warm-up.
        single_above: when the warm-up call alone takes longer than this many seconds, it is the
            one timed run (for a call this long, one-off start-up costs are negligible).
        device: where memory is counted (the first call's peak).
        prepare: untimed set-up before every call (e.g. reseeding the global RNG).
    """
    if runs < 1:
        raise ValueError(f"runs={runs} must be at least 1")
    calls: list[tuple[Any, float, float]] = []
    peak = None
    cuda = torch.device(device).type == "cuda"
    for index in range(runs + int(warmup)):
        if prepare is not None:
            prepare()
        memory = PeakMemory(device)
        with memory if index == 0 else contextlib.nullcontext():
            wall, cpu = time.perf_counter(), time.process_time()
            value = fn()
            if cuda:
                torch.cuda.synchronize()
            calls.append((value, time.perf_counter() - wall, time.process_time() - cpu))
        if index == 0:
            peak = memory.bytes
            if warmup and single_above is not None and calls[0][1] > single_above:
                break
    timed = calls[1:] if warmup and len(calls) > 1 else calls
    return Timed([c[0] for c in calls], statistics.median(c[1] for c in timed),
                 statistics.median(c[2] for c in timed), len(timed), peak)


def relative_errors(estimate: Tensor, reference: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Largest relative error among the top-k eigenvalues, for each k in ``ks`` (NaN if too few).

    Both are sorted descending first, so a solver that returns the right values in another order
    is not penalized, and one that returns a ghost copy is (a copy pushes the others down).
    """
    est = torch.sort(estimate.detach().double().cpu().flatten(), descending=True).values
    ref = torch.sort(reference.detach().double().cpu().flatten(), descending=True).values
    errors = {}
    for k in ks:
        if est.numel() < k or ref.numel() < k:
            errors[k] = float("nan")
        else:
            errors[k] = float(((est[:k] - ref[:k]).abs() / ref[:k].abs()).max())
    return errors


def certificate_check(estimate: Tensor, residuals: Tensor, reference: Tensor, k: int, *, scale: float,
                      rounding: float = 0.0) -> dict[str, float]:
    """Whether each of the top-k values lies within its certificate of the reference.

    A Ritz value ``theta_i`` whose unit vector has residual ``r_i * scale`` with the operator's products
    lies within ``(r_i + rounding) * scale`` of an eigenvalue of the exact matrix, when the products
    are off by at most ``rounding * scale`` on that vector (Weyl; ``rounding`` 0 for exact products).
    The values are sorted descending (with their residuals) and compared with the sorted reference in
    order, which assumes no eigenvalue among the top k was missed.

    Args:
        estimate: ``(k',)`` values, any order, ``k' >= k``.
        residuals: ``(k',)`` relative residuals in the order of ``estimate``.
        reference: ``(>= k,)`` reference eigenvalues.
        k: how many of the largest to compare.
        scale: ``||H||`` (the residuals and ``rounding`` are relative to it).
        rounding: relative error of the products on the eigenvectors.

    Returns:
        ``ratio``: the largest ``|theta_i - lambda_i| / bound_i`` (<= 1: every value within its
        certificate); ``bound``: the largest ``bound_i / |lambda_i|`` (the guaranteed relative
        error); ``residual``: the largest ``r_i``. NaN for all three if there are fewer than k values.

    Example:
        >>> certificate_check(torch.tensor([1.0, 2.0]), torch.tensor([1e-3, 1e-6]), torch.tensor([2.0, 0.999]), 2,
        ...                   scale=2.0)["ratio"] <= 1
        True
    """
    est = estimate.detach().double().cpu().flatten()
    res = residuals.detach().double().cpu().flatten()
    ref = torch.sort(reference.detach().double().cpu().flatten(), descending=True).values
    if est.numel() < k or ref.numel() < k:
        return {"ratio": float("nan"), "bound": float("nan"), "residual": float("nan")}
    order = torch.argsort(est, descending=True)[:k]
    bound = (res[order] + rounding) * scale
    return {"ratio": float(((est[order] - ref[:k]).abs() / bound).max()),
            "bound": float((bound / ref[:k].abs()).max()), "residual": float(res[order].max())}


def wasserstein1(nodes: Tensor, weights: Tensor, eigenvalues: Tensor) -> float:
    """Wasserstein-1 distance between a discrete measure and the exact spectrum, over its range.

    Args:
        nodes: ``(n,)`` support points of the estimate (e.g. all SLQ nodes of all probes).
        weights: ``(n,)`` their masses (normalized here to sum to 1).
        eigenvalues: ``(P,)`` exact eigenvalues, each of mass ``1/P``.

    Returns:
        ``W1 / (lambda_max - lambda_min)``: 0 for a perfect estimate, at most 1.
    """
    exact = eigenvalues.detach().double().cpu().flatten()
    points = torch.cat([nodes.detach().double().cpu().flatten(), exact])
    masses = torch.cat([weights.detach().double().cpu().flatten() / weights.sum(),
                        -torch.full_like(exact, 1.0 / exact.numel())])
    order = torch.argsort(points)
    cdf_gap = torch.cumsum(masses[order], 0)[:-1]
    widths = torch.diff(points[order])
    return float((cdf_gap.abs() * widths).sum() / (exact.max() - exact.min()))


def wasserstein1_grid(grid: Tensor, density: Tensor, eigenvalues: Tensor) -> float:
    """:func:`wasserstein1` for a density given on a grid (trapezoid masses at the grid points)."""
    grid = grid.detach().double().cpu().flatten()
    density = density.detach().double().cpu().flatten().clamp_min(0)
    steps = torch.diff(grid)
    masses = torch.zeros_like(grid)
    masses[:-1] += density[:-1] * steps / 2
    masses[1:] += density[1:] * steps / 2
    return wasserstein1(grid, masses, eigenvalues)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran a benchmark script (``argv`` as given to its ``main``, else the process's),
    as its results file states it."""
    arguments = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m " + module, *map(shlex.quote, arguments)])
