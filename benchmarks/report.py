"""Turning measured rows into ``RESULTS.md``: the environment, the targets with verdicts, the tables.

The verdicts are computed from the rows of the same run, so a ratio is never taken between numbers
measured at different times or on different machines.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy
import torch

import lightning_hessian
from benchmarks.costs import WARM_START_BAR_STEPS
from benchmarks.suites import OURS, PYHESSIAN_SWEEP, SCIPY_ON_OURS

# Top-10 relative error we must reach with float64 products. With float32 products no solver is owed
# less than the workload's rounding floor (rho ||H|| / |lambda_10|, see Workload.rounding_floor), so
# there a setting "reaches" 1e-6 when it is within 1e-6 of that floor, and our default is judged by
# its certificate instead (see eigen_verdicts).
ACCURACY_TARGET = 1e-6
PYHESSIAN_ACCURACY = 1e-2  # the accuracy at which PyHessian's product count is taken
PRODUCT_RATIO_TARGET = 5.0
# scipy rows compared with ours at our default: its default and the same nominal tolerance.
SCIPY_VERDICT_SETTINGS = ("eigsh(which='LA'), default tol=0", "eigsh(which='LA', tol=1e-06)")
DENSITY_TIME_TARGET = 0.5  # our time / the most accurate peer's time
# "Same accuracy": W1 within two standard errors of the difference (both are means over random probes).
DENSITY_SAME_ACCURACY_SE = 2.0
# Which clock the verdicts read: CPU time of the process when timing on the CPU with one thread (what a
# call costs, however busy the machine), wall time on a GPU. Both are in every table.
CLOCK = "cpu_seconds"
PRODUCT_COST_TARGET = 1.5  # product / gradient with the graph kept
PRODUCT_COST_BAR = 2.5  # product / gradient, the looser bar
COLD_BAR, WARM_BAR, WARM_RATIO_BAR = 40, 25, 1.5  # products: cold top-10, warm top-10, cold / warm


def fmt(value: Any, kind: str = "g") -> str:
    """A table cell: ``-`` for missing values, scientific notation for errors, 3 digits otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "e":
        return f"{value:.1e}"
    if kind == "s":
        return f"{value:.3g}"
    if kind == "x":
        return f"{value:.2f}x"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def load_average() -> float:
    """The 1-minute load average (NaN where the system does not report it)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def environment(command: str, peer_versions: dict[str, str | None], load: tuple[float, float]) -> list[str]:
    """Date, machine, versions, threads, load and the command that produced the file."""
    peers = ", ".join(f"{name} {version or 'not installed'}" for name, version in peer_versions.items())
    return [
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {_cpu_model()}, {os.cpu_count()} cores, {_memory_gib()}, {platform.system()} "
        f"{platform.release()}; torch threads: {torch.get_num_threads()}",
        f"- Load average (1 min) before / after the run: {load[0]:.2f} / {load[1]:.2f}"
        + (" — a shared machine: other processes were running, so wall times carry their noise"
           if max(load) > 0.5 * (os.cpu_count() or 1) else ""),
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, lightning-hessian {lightning_hessian.__version__}; peers: {peers}",
        "",
    ]


def _row(rows: list[dict[str, Any]], library: str, setting_prefix: str = "") -> dict[str, Any] | None:
    for row in rows:
        if row["library"] == library and row["setting"].startswith(setting_prefix) and "failure" not in row:
            return row
    return None


def set_clock(key: str) -> None:
    """Make the verdicts read ``"seconds"`` (wall) or ``"cpu_seconds"``."""
    global CLOCK
    if key not in ("seconds", "cpu_seconds"):
        raise ValueError(f"clock={key!r} must be 'seconds' or 'cpu_seconds'")
    CLOCK = key


def _clock_name() -> str:
    return "CPU" if CLOCK == "cpu_seconds" else "wall"


def _accuracy_verdict(name: str, ours: dict[str, Any], k: int, product_rounding: float | None) -> list[str]:
    """Our default's accuracy: against 1e-6 with float64 products; with float32 products, against the
    guarantee its certificate gives, which rounding cannot make false (see "Float32 accuracy" in
    benchmarks/run.py's notes)."""
    error = ours["errors"][k]
    if product_rounding is None:
        return [name, f"top-{k} relative error <= {ACCURACY_TARGET:g}", f"{error:.1e} in {ours['products']} products",
                "yes" if error <= ACCURACY_TARGET else "no"]
    certificate = ours.get("certificate")
    if certificate is None:
        return [name, f"top-{k} error within its certificate", "no certificate returned", "no"]
    return [name, f"top-{k} error within its guarantee (r_i + rho) ||H|| (float32 products)",
            f"{error:.1e}, guaranteed <= {certificate['bound']:.1e} (residuals r_i <= {certificate['residual']:.1e}, "
            f"rho = {product_rounding:.1e}) in {ours['products']} products",
            "yes" if certificate["ratio"] <= 1 else "no"]


def _accuracy_label(floor: float) -> str:
    """``1e-06``, or ``1e-06 + the float32 floor`` where the products are float32."""
    return f"{ACCURACY_TARGET:g}" if floor == 0 else f"{ACCURACY_TARGET:g} + float32 floor {floor:.1e}"


def eigen_verdicts(name: str, rows: list[dict[str, Any]], k: int, *, product_rounding: float | None = None,
                   rounding_floor: float = 0.0) -> list[list[str]]:
    """Targets on top-k: accuracy, products vs PyHessian at 1e-2, time vs scipy on our product.

    ``product_rounding`` and ``rounding_floor`` are the workload's (``Workload.product_rounding`` and
    ``Workload.rounding_floor(k)``): ``None`` and 0 for float64 products. With float32 products a
    setting reaches the accuracy target when its top-k error is at most ``1e-6 + rounding_floor``: errors
    there are either at the floor (1e-8 to 1e-6, different on every CPU) or far above it, so the
    threshold does not cut through rounding.
    """
    ours = _row(rows, OURS, "top_eigenvalues")
    if ours is None:
        return [[name, "our top-k ran", "failed", "no"]]
    verdicts = [_accuracy_verdict(name, ours, k, product_rounding)]
    accuracy = ACCURACY_TARGET + rounding_floor
    pyhessian = [r for r in rows if r["library"] == "PyHessian" and "failure" not in r]
    reached = [r for r in pyhessian if r["errors"][k] <= PYHESSIAN_ACCURACY]
    # Both sides at their cheapest setting that reaches the accuracy in question (ours: 1e-6).
    ours_accurate = [r for r in rows if r["library"] == OURS and "failure" not in r
                     and r["errors"][k] <= accuracy]
    cheapest = min(ours_accurate, key=lambda r: r["products"], default=None)
    if reached and cheapest is not None:
        ratio = reached[0]["products"] / cheapest["products"]
        verdicts.append([name, f">= {PRODUCT_RATIO_TARGET:g}x fewer products than PyHessian needs for "
                         f"{PYHESSIAN_ACCURACY:g}", f"{ratio:.1f}x ({reached[0]['products']} vs "
                         f"{cheapest['products']}; ours at {_tol_of(cheapest)} with error {cheapest['errors'][k]:.0e}, "
                         f"PyHessian at {reached[0]['setting'].split('(')[1].split(')')[0]})",
                         "yes" if ratio >= PRODUCT_RATIO_TARGET else "no"])
    elif pyhessian:
        most = max(r["products"] for r in pyhessian)
        verdicts.append([name, f"PyHessian reaches {PYHESSIAN_ACCURACY:g}",
                         f"never, within {most} products ({len(PYHESSIAN_SWEEP)} settings)", "yes (ours does)"])
    for row in rows:
        if row["library"] == SCIPY_ON_OURS and "failure" not in row and row["setting"] in SCIPY_VERDICT_SETTINGS:
            ratio = ours[CLOCK] / row[CLOCK]
            verdicts.append([name, f"time <= scipy {row['setting']}",
                             f"{_clock_name()} {ours[CLOCK]:.3g} s vs {row[CLOCK]:.3g} s ({ratio:.2f}x)",
                             "yes" if ratio <= 1 else "no"])
    scipy_accurate = [r for r in rows if r["library"] == SCIPY_ON_OURS and "failure" not in r
                      and r["errors"][k] <= accuracy]
    fastest_ours = min(ours_accurate, key=lambda r: r[CLOCK], default=None)
    fastest_scipy = min(scipy_accurate, key=lambda r: r[CLOCK], default=None)
    if fastest_ours is not None and fastest_scipy is not None:
        ratio = fastest_ours[CLOCK] / fastest_scipy[CLOCK]
        measured = (f"{_clock_name()} {fastest_ours[CLOCK]:.3g} s ({_tol_of(fastest_ours)}) vs "
                    f"{fastest_scipy[CLOCK]:.3g} s ({fastest_scipy['setting']}) ({ratio:.2f}x)")
        verdicts.append([name, f"time to top-{k} error <= {_accuracy_label(rounding_floor)} <= scipy eigsh's (each at "
                         "its fastest setting that reaches it)", measured, "yes" if ratio <= 1 else "no"])
    return verdicts


def _tol_of(row: dict[str, Any]) -> str:
    """``tol=...`` of one of our top-k rows."""
    return "tol=1e-6" if row["setting"].startswith("top_eigenvalues") else row["setting"]


def _same_accuracy(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """W1 no worse than ``best``'s, up to two standard errors of the difference of the two means."""
    margin = DENSITY_SAME_ACCURACY_SE * math.hypot(row.get("w1_se", 0.0), best.get("w1_se", 0.0))
    return row["w1"] <= best["w1"] + margin


def density_verdict(name: str, rows: list[dict[str, Any]]) -> list[list[str]]:
    """Target: the most accurate peer's W1 (within noise) in under half its time."""
    ours = [r for r in rows if r["library"] == OURS and "failure" not in r and not math.isnan(r["w1"])]
    peers = [r for r in rows if r["library"] != OURS and "failure" not in r and not math.isnan(r["w1"])]
    if not ours or not peers:
        return []
    best = min(peers, key=lambda r: r["w1"])
    candidates = {"defaults": ours[0]}
    fastest = min((r for r in ours if _same_accuracy(r, best)), key=lambda r: r[CLOCK], default=None)
    if fastest is not None and fastest is not ours[0]:
        candidates[f"its fastest setting that accurate ({fastest['setting']})"] = fastest
    verdicts = []
    for label, row in candidates.items():
        ratio = row[CLOCK] / best[CLOCK]
        verdicts.append([name, f"density, ours at {label}: W1 as low as the most accurate peer's, in < "
                         f"{DENSITY_TIME_TARGET:g}x its time",
                         f"W1 {row['w1']:.2e} ± {row.get('w1_se', 0):.0e} vs {best['w1']:.2e} ± "
                         f"{best.get('w1_se', 0):.0e} ({best['library']}); {_clock_name()} {row[CLOCK]:.3g} s vs "
                         f"{best[CLOCK]:.3g} s ({ratio:.2f}x)",
                         "yes" if _same_accuracy(row, best) and ratio < DENSITY_TIME_TARGET else "no"])
    return verdicts


def product_verdicts(name: str, rows: list[dict[str, Any]], floor: float | None = None) -> list[list[str]]:
    """Targets: product / gradient with the graph kept (<= 1.5x, and the looser <= 2.5x); ``floor``
    is the ratio of multiply-adds of an exact product to a gradient, where known."""
    kept = next((r for r in rows if r["route"] == "ours: double backward, graph kept" and "failure" not in r), None)
    if kept is None:
        return []
    ratio = kept[f"ratio_{CLOCK}"]
    measured = f"{ratio:.2f}x ({_clock_name()})" + ("" if floor is None else f"; matrix-product floor {floor:.2f}x")
    return [[name, f"one product <= {target:g}x a gradient (graph kept)", measured,
             "yes" if ratio <= target else "no"] for target in (PRODUCT_COST_TARGET, PRODUCT_COST_BAR)]


def warm_verdicts(name: str, rows: list[dict[str, Any]]) -> list[list[str]]:
    """Issue 2 bars on the top-10 after 20 GD steps (cold <= 40, warm <= 25), and warm >= 1.5x fewer
    products than cold after each stretch."""
    top10 = [r for r in rows if r["k"] == 10]
    at_bar = next((r for r in top10 if r["steps"] == WARM_START_BAR_STEPS), None)
    if at_bar is None:
        return []
    verdicts = [
        [name, f"top-10 to residual 1e-6 cold in <= {COLD_BAR} products", str(at_bar["cold"]),
         "yes" if at_bar["cold"] <= COLD_BAR and at_bar["cold_converged"] else "no"],
        [name, f"top-10 warm-started after {WARM_START_BAR_STEPS} GD steps in <= {WARM_BAR}", str(at_bar["warm"]),
         "yes" if at_bar["warm"] <= WARM_BAR and at_bar["warm_converged"] else "no"],
    ]
    verdicts += [[name, f"top-10 warm start >= {WARM_RATIO_BAR:g}x fewer products than cold, after {r['steps']} "
                  "GD steps", f"{r['ratio']:.2f}x ({r['cold']} vs {r['warm']})",
                  "yes" if r["ratio"] >= WARM_RATIO_BAR else "no"] for r in top10]
    return verdicts


def _seconds(row: dict[str, Any]) -> list[str]:
    """Wall and CPU seconds, marked when the call was timed once."""
    note = "" if row["runs"] > 1 else " (1 run)"
    return [fmt(row["seconds"], "s") + note, fmt(row["cpu_seconds"], "s")]


def eigen_lines(rows: list[dict[str, Any]], k: int) -> list[str]:
    """The top-k table."""
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["library"], r["setting"], "-", "-", "-", "-", f"failed: {r['failure']}", "", ""])
            continue
        errors = r["errors"]
        body.append([r["library"], r["setting"], str(r["products"]), *_seconds(r), fmt(r["peak_mb"], "s"),
                     fmt(errors[1], "e"), fmt(errors[5], "e"), fmt(errors[k], "e")])
    return table(["library", "setting", "products", "wall s", "CPU s", "peak MB", "err top-1", "err top-5",
                  f"err top-{k}"], body)


def density_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The SLQ table."""
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["library"], r["setting"], "-", "-", "-", "-", f"failed: {r['failure']}"])
        else:
            w1 = "-" if math.isnan(r["w1"]) else f"{r['w1']:.2e} ± {r['w1_se']:.0e}"
            body.append([r["library"], r["setting"], str(r["products"]), *_seconds(r), fmt(r["peak_mb"], "s"), w1])
    return table(["library", "setting", "products", "wall s", "CPU s", "peak MB", "W1 / range (± s.e.)"], body)


def trace_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The trace table."""
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["library"], r["setting"], "-", "-", "-", "-", f"failed: {r['failure']}"])
        else:
            body.append([r["library"], r["setting"], str(r["products"]), *_seconds(r), f"{r['estimate']:.4g}",
                         fmt(r.get("error"), "e")])
    return table(["library", "setting", "products", "wall s", "CPU s", "mean estimate", "mean rel. error"], body)


def product_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The product-cost table."""
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["route"], str(r["vectors"]), "-", "-", f"failed: {r['failure']}", "-"])
        else:
            body.append([r["route"], str(r["vectors"]), f"{r['seconds'] * 1e3:.3g}", f"{r['cpu_seconds'] * 1e3:.3g}",
                         fmt(r[f"ratio_{CLOCK}"], "x"), fmt(r["peak_mb"], "s")])
    return table(["route", "vectors per call", "wall ms per vector", "CPU ms per vector",
                  f"/ gradient ({_clock_name()})", "peak MB per call"], body)


def warm_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The warm-start table."""
    body = [[str(r["steps"]), str(r["k"]), f"{r['tol']:g}", fmt(r["moved"], "e"),
             str(r["cold"]) + ("" if r["cold_converged"] else " (not converged)"),
             str(r["warm"]) + ("" if r["warm_converged"] else " (not converged)"), fmt(r["ratio"], "x"),
             fmt(r["agree"], "e")] for r in rows]
    return table(["GD steps", "k", "tol", "eigenvectors moved (sin)", "cold products", "warm products",
                  "cold / warm", "max rel. difference"], body)
