"""Adapters to the peer libraries: PyHessian 0.1, hessian-eigenthings 1.0 and curvlinops 3 (+ scipy).

Each adapter runs one library call on a :class:`~benchmarks.workloads.Workload` exactly as a user
would (the library's own operator, its own solver, the settings given) and returns what came out
with the number of Hessian-vector products it used. Products are counted without changing what the
library computes: PyHessian's module-level ``hessian_vector_product`` is wrapped in a counting
function for the duration of the call, hessian-eigenthings' operator is wrapped in its own
``LambdaOperator``, curvlinops' operator is subclassed to count the columns of each ``_matmat``.

PyHessian writes ``.grad`` (with graph) into the model it is given and puts it in eval mode, so it
always gets a deep copy. It draws its random vectors from the global RNG, as does curvlinops'
``fast_lanczos``: callers reseed it before every run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from benchmarks.workloads import Workload, cross_entropy

PEERS = {
    "PyHessian": ("pyhessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
}
"""Display name -> (import name, distribution name)."""


class PeerFailure(RuntimeError):
    """A peer library failed on this workload (the message says how)."""


@dataclass(frozen=True)
class EigOutput:
    """Top eigenvalues (any order) and the products spent; ``residuals`` ``(k,)``, in the order of
    ``eigenvalues``, where the solver certifies its pairs (``||H v - theta v|| / ||H||``), else None."""

    eigenvalues: Tensor
    products: int
    residuals: Tensor | None = None


@dataclass(frozen=True)
class DensityOutput:
    """A density estimate: raw quadrature (``nodes``/``weights``) or a grid (``grid``/``density``)."""

    products: int
    nodes: Tensor | None = None
    weights: Tensor | None = None
    grid: Tensor | None = None
    density: Tensor | None = None


@dataclass(frozen=True)
class TraceOutput:
    """A trace estimate and the products spent."""

    estimate: float
    products: int


def versions() -> dict[str, str | None]:
    """Installed version of each peer (None when it cannot be imported)."""
    found: dict[str, str | None] = {}
    for display, (module, distribution) in PEERS.items():
        try:
            __import__(module)
            found[display] = importlib.metadata.version(distribution)
        except Exception:  # any import failure means "not usable here"
            found[display] = None
    return found


# --- PyHessian 0.1 ---------------------------------------------------------------------------

@contextlib.contextmanager
def _pyhessian_counter() -> Iterator[list[int]]:
    """Count calls of PyHessian's ``hessian_vector_product`` (one call = one product)."""
    module = importlib.import_module("pyhessian.hessian")  # the package re-exports a class of that name
    original = module.hessian_vector_product
    counter = [0]

    def counted(grads: list[Tensor], params: list[Tensor], v: list[Tensor]) -> tuple[Tensor, ...]:
        counter[0] += 1
        return original(grads, params, v)

    module.hessian_vector_product = counted
    try:
        yield counter
    finally:
        module.hessian_vector_product = original


def _pyhessian(workload: Workload):
    from pyhessian import hessian

    model = copy.deepcopy(workload.model)
    return hessian(model, nn.CrossEntropyLoss(), data=workload.batch, cuda=workload.batch[0].is_cuda)


def pyhessian_top_k(workload: Workload, k: int, *, max_iter: int = 100, tol: float = 1e-3) -> EigOutput:
    """``hessian(...).eigenvalues(maxIter, tol, top_n=k)``: deflated power iteration (one batch, graph kept)."""
    with _pyhessian_counter() as counter:
        values, _ = _pyhessian(workload).eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    return EigOutput(torch.tensor(values, dtype=torch.float64), counter[0])


def pyhessian_density(workload: Workload, *, steps: int = 100, runs: int = 1) -> DensityOutput:
    """``hessian(...).density(iter, n_v)``; raises on current torch (``torch.eig`` was removed)."""
    with _pyhessian_counter() as counter:
        try:
            nodes, weights = _pyhessian(workload).density(iter=steps, n_v=runs)
        except RuntimeError as err:
            first_sentence = str(err).split(". ")[0]
            raise PeerFailure(f"{first_sentence} (raised after {counter[0]} products)") from err
    return DensityOutput(counter[0], nodes=torch.tensor(nodes).flatten(), weights=torch.tensor(weights).flatten())


def pyhessian_trace(workload: Workload, *, max_iter: int = 100, tol: float = 1e-3) -> TraceOutput:
    """``hessian(...).trace(maxIter, tol)``: Hutchinson with Rademacher probes, stopped on relative change."""
    with _pyhessian_counter() as counter:
        samples = _pyhessian(workload).trace(maxIter=max_iter, tol=tol)
    return TraceOutput(float(np.mean(samples)), counter[0])


def pyhessian_product(workload: Workload) -> Callable[[Tensor], Tensor]:
    """PyHessian's product on a kept graph (what its solvers call), as a flat ``[P] -> [P]`` map."""
    from pyhessian.utils import hessian_vector_product

    h = _pyhessian(workload)
    shapes = [p.shape for p in h.params]

    def product(v: Tensor) -> Tensor:
        parts = [c.reshape(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes, strict=True)]
        return torch.cat([g.reshape(-1) for g in hessian_vector_product(h.gradsH, h.params, parts)])

    return product


# --- hessian-eigenthings 1.0 -----------------------------------------------------------------

def _eigenthings_operator(workload: Workload) -> tuple[object, list[int]]:
    from hessian_eigenthings import HessianOperator, LambdaOperator

    op = HessianOperator(workload.model, [workload.batch], cross_entropy)
    counter = [0]

    def matvec(v: Tensor) -> Tensor:
        counter[0] += 1
        return op.matvec(v)

    return LambdaOperator(matvec, op.size, op.device, op.dtype), counter


def eigenthings_lanczos(workload: Workload, k: int, *, max_iter: int | None = None, seed: int = 0) -> EigOutput:
    """``lanczos(op, k=k, max_iter=...)`` (default Krylov size ``min(2k, P-1)``), ``which="LM"``."""
    from hessian_eigenthings import lanczos

    op, counter = _eigenthings_operator(workload)
    result = lanczos(op, k=k, max_iter=max_iter, seed=seed)
    return EigOutput(result.eigenvalues.detach().double().cpu(), counter[0])


def eigenthings_power(workload: Workload, k: int, *, seed: int = 0) -> EigOutput:
    """``deflated_power_iteration(op, k=k)`` at its defaults (100 iterations, tol 1e-4)."""
    from hessian_eigenthings import deflated_power_iteration

    op, counter = _eigenthings_operator(workload)
    result = deflated_power_iteration(op, k=k, seed=seed)
    return EigOutput(result.eigenvalues.detach().double().cpu(), counter[0])


def eigenthings_density(workload: Workload, *, runs: int = 10, steps: int = 80, seed: int = 0) -> DensityOutput:
    """``spectral_density(op, num_runs, lanczos_steps)``: SLQ with full reorthogonalization, raw nodes kept."""
    from hessian_eigenthings import spectral_density

    op, counter = _eigenthings_operator(workload)
    result = spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=seed * runs)
    keep = torch.isfinite(result.raw_eigenvalues)
    weights = result.raw_weights[keep] / result.raw_weights.shape[0]
    return DensityOutput(counter[0], nodes=result.raw_eigenvalues[keep].cpu(), weights=weights.cpu())


def eigenthings_trace(workload: Workload, *, matvecs: int = 100, method: str = "hutch++", seed: int = 0) -> TraceOutput:
    """``trace(op, num_matvecs, method)``: Hutch++ by default."""
    from hessian_eigenthings import trace

    op, counter = _eigenthings_operator(workload)
    return TraceOutput(float(trace(op, num_matvecs=matvecs, method=method, seed=seed).estimate), counter[0])


def eigenthings_product(workload: Workload) -> Callable[[Tensor], Tensor]:
    """hessian-eigenthings' product (forward and double backward per call)."""
    op, _ = _eigenthings_operator(workload)
    return op.matvec


# --- curvlinops 3 + scipy ------------------------------------------------------------------------

def _curvlinops_operator(workload: Workload, *, check_deterministic: bool = True):
    from curvlinops import HessianLinearOperator

    class Counted(HessianLinearOperator):
        products = 0

        def _matmat(self, M: list[Tensor]) -> list[Tensor]:
            self.products += M[0].shape[-1]
            return super()._matmat(M)

    params = [p for p in workload.model.parameters() if p.requires_grad]
    return Counted(workload.model, nn.CrossEntropyLoss(), params, [workload.batch],
                   check_deterministic=check_deterministic)


def curvlinops_eigsh(workload: Workload, k: int, *, which: str = "LM", tol: float = 0.0,
                     check_deterministic: bool = True) -> EigOutput:
    """The documented recipe: ``scipy.sparse.linalg.eigsh(HessianLinearOperator(...).to_scipy(), k)``.

    Products include those of curvlinops' construction-time determinism check.
    """
    op = _curvlinops_operator(workload, check_deterministic=check_deterministic)
    values = scipy.sparse.linalg.eigsh(op.to_scipy(), k=k, which=which, tol=tol, return_eigenvectors=False)
    return EigOutput(torch.from_numpy(np.asarray(values, dtype=np.float64)), op.products)


def curvlinops_density(workload: Workload, *, ncv: int = 128, repeats: int = 1) -> DensityOutput:
    """``lanczos_approximate_spectrum(op, ncv, num_repeats)`` (Papyan 2020; bounds from eigsh, tol 1e-2)."""
    from curvlinops import lanczos_approximate_spectrum

    op = _curvlinops_operator(workload, check_deterministic=False)
    grid, density = lanczos_approximate_spectrum(op, ncv, num_repeats=repeats)
    return DensityOutput(op.products, grid=grid.cpu(), density=density.cpu())


def curvlinops_trace(workload: Workload, *, matvecs: int = 100, method: str = "hutchinson") -> TraceOutput:
    """``hutchinson_trace(op, num_matvecs)`` or ``hutchpp_trace(op, num_matvecs)``."""
    from curvlinops import hutchinson_trace, hutchpp_trace

    op = _curvlinops_operator(workload, check_deterministic=False)
    estimate = (hutchinson_trace if method == "hutchinson" else hutchpp_trace)(op, matvecs)
    return TraceOutput(float(estimate), op.products)


def curvlinops_product(workload: Workload) -> Callable[[Tensor], Tensor]:
    """curvlinops' product: ``vmap``-ed ``jvp(jacrev(loss))``; a ``[P, S]`` matrix is one pass."""
    op = _curvlinops_operator(workload, check_deterministic=False)
    return op.__matmul__
