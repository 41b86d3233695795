"""Costs beyond the solvers: product routes against a gradient, warm starts, the callback's overhead.

Symbols: P parameters, k eigenvalues, S vectors per pass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from benchmarks import peers
from benchmarks.measure import measure
from benchmarks.workloads import Workload, cross_entropy, train
from lightning_hessian import top_eigenvalues

# Products per timed call are repeated until a call lasts about this long, so that short
# products are not timed at the clock's resolution.
_MIN_TIMED_SECONDS = 0.05
# Warm starts: GD steps between the two measurements (the bars are read at 20).
WARM_START_STEPS = (1, 5, 20)
WARM_START_BAR_STEPS = 20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- product cost ---------------------------------------------------------------------------------

def _func_product(workload: Workload, vectors: int) -> Callable[[Tensor], Tensor]:
    """``torch.func`` forward-over-reverse product, ``vmap``-ed when ``vectors > 1``."""
    model = workload.model
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [p.shape for p in params.values()]

    def loss(p: dict[str, Tensor]) -> Tensor:
        x, y = workload.batch
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def one(v: Tensor) -> Tensor:
        parts = {n: c.reshape(s) for n, c, s in zip(names, v.split([s.numel() for s in shapes]), shapes, strict=True)}
        out = jvp(grad(loss), (params,), (parts,))[1]
        return torch.cat([out[n].reshape(-1) for n in names])

    return vmap(one) if vectors > 1 else one


def product_routes(workload: Workload, available: dict[str, str | None]) -> list[tuple[str, int, Callable]]:
    """``(route, S, build)``: ``build()`` returns the product, called with ``[S, P]`` (``[P]`` when S = 1).

    Routes are built one at a time, so that only one kept gradient graph is alive at once.
    """
    w = workload

    def ours(**kwargs: Any) -> Callable[[], Callable]:
        def build() -> Callable[[Tensor], Tensor]:
            op = w.operator(**kwargs)
            return lambda v: op.matmat(v.T if v.dim() == 2 else v)  # the operator takes columns [P, S]

        return build

    routes: list[tuple[str, int, Callable]] = [
        ("ours: double backward, graph kept", 1, ours()),
        ("ours: graph kept, 10 vectors per pass (is_grads_batched)", 10, ours()),
        ("ours: graph kept, 10 vectors per pass, looped (vectorize=False)", 10, ours(vectorize=False)),
        ("ours: graph recomputed (keep_graph=False)", 1, ours(keep_graph=False)),
        ("ours: graph recomputed, 10 vectors per pass (is_grads_batched)", 10, ours(keep_graph=False)),
        ("ours: graph recomputed, 10 vectors per pass, looped", 10, ours(keep_graph=False, vectorize=False)),
        ("torch.func jvp(grad)", 1, lambda: _func_product(w, 1)),
        ("torch.func vmap(jvp(grad)), 10 vectors", 10, lambda: _func_product(w, 10)),
    ]
    if available.get("PyHessian"):
        routes.append(("PyHessian: double backward on a kept graph", 1, lambda: peers.pyhessian_product(w)))
    if available.get("hessian-eigenthings"):
        routes.append(("hessian-eigenthings: forward + double backward", 1, lambda: peers.eigenthings_product(w)))
    if available.get("curvlinops"):
        routes += [("curvlinops: vmap(jvp(jacrev))", 1, lambda: peers.curvlinops_product(w)),
                   ("curvlinops: 10 vectors per pass", 10,
                    lambda: (lambda matmul: lambda v: matmul(v.T))(peers.curvlinops_product(w)))]
    return routes


def _per_call_seconds(fn: Callable[[], Any], runs: int, device: torch.device) -> tuple[float, float, int | None]:
    """Median wall and CPU seconds of one call of ``fn`` (repeated within each timed run when it is short),
    and the peak memory of the first timed run."""
    started = time.perf_counter()
    fn()
    _synchronize(device)
    repeats = max(1, math.ceil(_MIN_TIMED_SECONDS / max(time.perf_counter() - started, 1e-6)))

    def many() -> None:
        for _ in range(repeats):
            fn()

    timed = measure(many, runs=runs, device=device)
    return timed.seconds / repeats, timed.cpu_seconds / repeats, timed.peak_bytes


def product_table(workload: Workload, available: dict[str, str | None], runs: int, *,
                  deadline: float | None = None) -> list[dict[str, Any]]:
    """Rows: wall and CPU seconds per vector of each product route, and their ratios to one gradient
    of the same loss (``ratio_seconds``, ``ratio_cpu_seconds``)."""
    device = workload.device
    params = [p for p in workload.model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(cross_entropy(workload.model, workload.batch), params)

    gradient = _per_call_seconds(gradient, runs, device)
    rows = [{"route": "gradient (forward + backward)", "vectors": 1, "seconds": gradient[0],
             "cpu_seconds": gradient[1], "ratio_seconds": 1.0, "ratio_cpu_seconds": 1.0,
             "peak_mb": None if gradient[2] is None else gradient[2] / 2**20}]
    generator = torch.Generator().manual_seed(0)
    for route, vectors, build in product_routes(workload, available):
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"route": route, "vectors": vectors, "failure": "skipped: time limit"})
            continue
        v = torch.randn(vectors, workload.num_params, generator=generator).to(device=device, dtype=workload.dtype)
        argument = v if vectors > 1 else v[0]
        try:
            product = build()
            timing = _per_call_seconds(lambda p=product, a=argument: p(a), runs, device)
        except Exception as err:  # a route that cannot run here is a result
            rows.append({"route": route, "vectors": vectors, "failure": f"{type(err).__name__}: {err}"[:200]})
            continue
        finally:
            product = None
        rows.append({"route": route, "vectors": vectors, "seconds": timing[0] / vectors,
                     "cpu_seconds": timing[1] / vectors, "ratio_seconds": timing[0] / vectors / gradient[0],
                     "ratio_cpu_seconds": timing[1] / vectors / gradient[1],
                     "peak_mb": None if timing[2] is None else timing[2] / 2**20})
    return rows


# --- warm start --------------------------------------------------------------------------------------

def exact_product_floor(model: nn.Module) -> float | None:
    """Multiply-adds of an exact Hessian-vector product over those of a gradient, for an MLP.

    With ``F_l = d_in * d_out`` for linear layer l (per sample; biases and elementwise work left
    out), a gradient costs ``2 F_1 + 3 sum_{l>=2} F_l``: the forward pass, the weight gradients, and
    the input gradients of every layer but the first. Pearlmutter's R-operator, which double
    backward on a kept graph computes, costs ``2 F_1 + 6 sum_{l>=2} F_l``: every matrix product of
    the forward and backward passes gets one tangent term per factor, except where a factor is the
    data. ``None`` unless every layer with parameters is an ``nn.Linear``.
    """
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not layers or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    first, *rest = (m.in_features * m.out_features for m in layers)
    return (2 * first + 6 * sum(rest)) / (2 * first + 3 * sum(rest))


def warm_start_table(workload: Workload, ks: tuple[int, ...] = (1, 5, 10), tol: float = 1e-6) -> list[dict[str, Any]]:
    """Cold vs warm-started products after each of ``WARM_START_STEPS`` more full-batch GD steps (lr 0.1).

    ``moved`` is the sine of the largest principal angle between the top-k eigenvectors before and
    after the steps: how far the warm start is from the answer.
    """
    before = {k: top_eigenvalues(workload.operator(), k, tol=tol) for k in ks}
    rows = []
    for steps in WARM_START_STEPS:
        later = dataclasses.replace(
            workload, model=train(copy.deepcopy(workload.model), workload.batch, steps=steps, lr=0.1))
        for k in ks:
            cold = top_eigenvalues(later.operator(), k, tol=tol)
            # As the callback warm-starts: one vector, the sum of the previous eigenvectors.
            warm = top_eigenvalues(later.operator(), k, tol=tol, v0=before[k].eigenvectors.sum(dim=0))
            cosines = torch.linalg.svdvals(before[k].eigenvectors @ cold.eigenvectors.T)
            rows.append({"steps": steps, "k": k, "tol": tol, "cold": cold.num_matvecs, "warm": warm.num_matvecs,
                         "cold_converged": cold.all_converged, "warm_converged": warm.all_converged,
                         "ratio": cold.num_matvecs / warm.num_matvecs,
                         "moved": float((1 - cosines.min().clamp(max=1) ** 2).sqrt()),
                         "agree": float((cold.eigenvalues - warm.eigenvalues).abs().max()
                                        / cold.eigenvalues.abs().max())})
    return rows


# --- the callback's overhead -----------------------------------------------------------------------------

def callback_overhead(max_epochs: int = 10, runs: int = 2, root: str | None = None) -> dict[str, Any]:
    """Training wall time of the digits MLP with and without ``HessianSpectrumCallback()`` at its defaults.

    The demo setting: ``MLPClassifier()`` (64-20-20-10) on ``DigitsDataModule()`` (1,000 training
    images, batch 32), ``max_epochs`` epochs on the CPU; runs alternate with and without the
    callback and the median of each is reported.
    """
    import tempfile

    import pytorch_lightning as pl

    from lightning_hessian.callback import HessianSpectrumCallback
    from lightning_hessian.paper.data import DigitsDataModule
    from lightning_hessian.paper.models import MLPClassifier

    def fit(with_callback: bool, directory: str) -> tuple[float, list[Any]]:
        pl.seed_everything(0, verbose=False)
        callbacks = [HessianSpectrumCallback()] if with_callback else []
        trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                             default_root_dir=directory)
        started = time.perf_counter()
        trainer.fit(MLPClassifier(), DigitsDataModule())
        return time.perf_counter() - started, callbacks[0].history if callbacks else []

    times: dict[bool, list[float]] = {False: [], True: []}
    history: list[Any] = []
    with tempfile.TemporaryDirectory(dir=root) as directory:
        fit(False, directory)  # warm-up: imports, threads, allocator
        for _ in range(runs):
            for with_callback in (False, True):
                seconds, records = fit(with_callback, directory)
                times[with_callback].append(seconds)
                history = records or history
    without, with_ = float(np.median(times[False])), float(np.median(times[True]))
    return {"max_epochs": max_epochs, "runs": runs, "without": without, "with": with_,
            "overhead": with_ / without - 1, "measurements": len(history),
            "seconds_each": statistics.mean(r.seconds for r in history) if history else float("nan"),
            "matvecs_each": statistics.mean(r.num_matvecs for r in history) if history else float("nan")}
