"""Lanczos with full reorthogonalization: extreme eigenpairs with residual certificates.

Symbols: P parameters (``op.num_params``), k wanted eigenpairs, m Lanczos steps, S recursions run
side by side (one product with S vectors per step).

Every new Lanczos vector is orthogonalized twice against the whole basis (classical Gram-Schmidt,
twice), which is what keeps the Ritz values free of the spurious copies that plain Lanczos produces
(PITFALLS.md: 5 copies of lambda_1 among the top 10 after 80 steps without it). The basis lives in
float64 by default; products run in the operator's dtype.

The residual of a Ritz pair (theta, y) is read from the recursion, ``||H y - theta y|| =
beta_m |s_m|`` with ``s_m`` the last component of the tridiagonal eigenvector; with full
reorthogonalization this equals the true residual to rounding error, so it certifies each
eigenvalue: some eigenvalue of H lies within that distance of theta.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

Which = Literal["largest", "smallest"]

# Warm starts (see _random_fraction): each eigenvector gets a random start component of this many
# times tol, fifty times the component (2 tol) at which a missing eigenvalue went unnoticed...
_MISSING_COMPONENT_TOLS = 100.0
# ... and the random part is at most this fraction of the warm start's norm.
_MAX_RANDOM_FRACTION = 1 / 3

# A new Lanczos vector whose norm falls below this fraction of the operator's scale means the
# Krylov space is invariant: the recursion restarts from a fresh random direction with beta = 0.
_BREAKDOWN_FRACTION = 1e-10
# A second Gram-Schmidt pass runs when the first shrank the vector below 1/sqrt(2) of its norm.
_REORTHOGONALIZE_AGAIN = 2**-0.5
# Basis columns allocated when the number of steps is not known in advance (the basis doubles).
_INITIAL_CAPACITY = 16


class LinearOperator(Protocol):
    """What the solvers need from an operator: a symmetric P x P matrix known by its products."""

    num_params: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[S, P] -> [S, P]``."""
        ...


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a curvature operator with their certificates.

    Attributes:
        eigenvalues: ``(k,)`` float64; largest first for ``which="largest"``, smallest first for
            ``which="smallest"``.
        eigenvectors: ``(k, P)`` unit vectors; row i belongs to ``eigenvalues[i]``.
        residuals: ``(k,)`` float64 relative residuals ``||H v - theta v|| / ||H||``, with
            ``||H||`` estimated by the largest absolute Ritz value; an eigenvalue of H lies within
            ``residuals[i] * ||H||`` of ``eigenvalues[i]``.
        converged: ``(k,)`` bool, ``residuals <= tol``.
        num_matvecs: operator products used.
        seconds: wall time of the call.
        which: ``"largest"`` or ``"smallest"``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    seconds: float
    which: Which

    @property
    def all_converged(self) -> bool:
        """Whether every returned pair met the tolerance."""
        return bool(self.converged.all())


class Lanczos:
    """S Lanczos recursions run side by side with full reorthogonalization.

    Args:
        op: the operator.
        start: ``(S, P)`` start vectors (normalized here).
        generator: source of random restart directions after a breakdown.
        basis_dtype: dtype of the stored basis and of all scalars (default float64).
        basis_device: where the basis lives (default the operator's device); ``"cpu"`` keeps a
            large basis off the GPU at the cost of a transfer per step.
        capacity: basis columns to allocate up front, e.g. the number of steps when it is known;
            default 16, doubled whenever full (so up to twice the memory needed at the peak).

    Attributes:
        alphas: list of ``(S,)`` diagonal entries, one per step.
        betas: list of ``(S,)`` off-diagonal entries; ``betas[j]`` joins steps j and j+1.
        num_steps: m, the steps taken.
    """

    def __init__(
        self,
        op: LinearOperator,
        start: Tensor,
        *,
        generator: torch.Generator,
        basis_dtype: torch.dtype = torch.float64,
        basis_device: torch.device | str | None = None,
        capacity: int | None = None,
    ) -> None:
        self.op = op
        self.generator = generator
        self.basis_device = torch.device(basis_device) if basis_device is not None else op.device
        self.basis_dtype = basis_dtype
        start = start.to(device=self.basis_device, dtype=basis_dtype)
        norms = start.norm(dim=1, keepdim=True)
        if not torch.all(norms > 0):
            raise ValueError("start vectors must be non-zero")
        columns = min(capacity or _INITIAL_CAPACITY, op.num_params)
        self._basis = torch.empty(start.shape[0], columns, op.num_params, dtype=basis_dtype,
                                  device=self.basis_device)
        self._basis[:, 0] = start / norms
        self.alphas: list[Tensor] = []
        self.betas: list[Tensor] = []
        self.num_steps = 0
        self._scale = torch.zeros(start.shape[0], dtype=basis_dtype, device=self.basis_device)

    @property
    def basis(self) -> Tensor:
        """``(S, m, P)``: the orthonormal Lanczos vectors of the steps taken so far."""
        return self._basis[:, : self.num_steps]

    def step(self) -> None:
        """One Lanczos step for every recursion: one product with S vectors."""
        j = self.num_steps
        current = self._basis[:, j]
        product = self.op.matmat(current.to(device=self.op.device, dtype=self.op.dtype))
        w = product.to(device=self.basis_device, dtype=self.basis_dtype)
        alpha = (current * w).sum(dim=1)
        w = w - alpha[:, None] * current
        if j > 0:
            w = w - self.betas[-1][:, None] * self._basis[:, j - 1]
        # Full reorthogonalization: one classical Gram-Schmidt pass against the whole basis, and a
        # second one only where the first removed a large part of the vector (the DGKS criterion:
        # "twice is enough"); after the three-term recurrence a second pass is rarely needed.
        basis = self._basis[:, : j + 1]
        before = w.norm(dim=1)
        w = _orthogonalize(w, basis)
        beta = w.norm(dim=1)
        if bool((beta < _REORTHOGONALIZE_AGAIN * before).any()):
            w = _orthogonalize(w, basis)
            beta = w.norm(dim=1)
        self._scale = torch.maximum(self._scale, alpha.abs() + beta)
        broken = beta <= _BREAKDOWN_FRACTION * self._scale.clamp_min(torch.finfo(self.basis_dtype).tiny)
        self.alphas.append(alpha)
        self.betas.append(torch.where(broken, torch.zeros_like(beta), beta))
        self.num_steps = j + 1
        if j + 1 >= self.op.num_params:
            return
        if j + 1 >= self._basis.shape[1]:
            grown = torch.empty(self._basis.shape[0], 2 * self._basis.shape[1], self._basis.shape[2],
                                dtype=self.basis_dtype, device=self.basis_device)
            grown[:, : j + 1] = self._basis[:, : j + 1]
            self._basis = grown
        if broken.any():
            w = torch.where(broken[:, None], self._fresh_direction(), w / beta.clamp_min(1e-300)[:, None])
        else:
            w = w / beta[:, None]
        self._basis[:, j + 1] = w

    def _fresh_direction(self) -> Tensor:
        """Random unit vectors orthogonal to the current bases, ``(S, P)``."""
        shape = (self._basis.shape[0], self.op.num_params)
        w = torch.randn(shape, generator=self.generator, dtype=self.basis_dtype).to(self.basis_device)
        w = _orthogonalize(_orthogonalize(w, self.basis), self.basis)
        return w / w.norm(dim=1, keepdim=True)

    def tridiagonal(self, index: int = 0) -> Tensor:
        """The ``(m, m)`` tridiagonal matrix T of recursion ``index``."""
        diag = torch.stack([a[index] for a in self.alphas])
        off = torch.stack([b[index] for b in self.betas[: self.num_steps - 1]]) if self.num_steps > 1 else None
        matrix = torch.diag(diag)
        if off is not None:
            matrix = matrix + torch.diag(off, 1) + torch.diag(off, -1)
        return matrix


def _orthogonalize(vectors: Tensor, basis: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass: ``(S, P)`` vectors minus their projections on ``(S, m, P)`` bases."""
    return vectors - torch.einsum("smp,sm->sp", basis, torch.einsum("smp,sp->sm", basis, vectors))


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Random signs, ``+-1`` with equal probability, drawn on the CPU from ``generator``."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)


def top_eigenvalues(
    op: LinearOperator,
    k: int = 5,
    *,
    tol: float = 1e-6,
    which: Which = "largest",
    v0: Tensor | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """The k largest (or smallest) eigenvalues of a symmetric operator, with certificates.

    Lanczos with full reorthogonalization, checked after every step: it stops as soon as each of
    the k wanted Ritz pairs has relative residual ``||H v - theta v|| / ||H|| <= tol``, or when
    ``max_matvecs`` products are spent (then ``converged`` says which pairs made it).

    Args:
        op: the operator (``HessianOperator``, ``GGNOperator``, anything with ``matmat``).
        k: number of eigenpairs, ``1 <= k <= P``.
        tol: relative residual at which a pair counts as converged (default 1e-6; the error of
            the eigenvalue is then at most ``tol * ||H||`` and in practice about its square).
        which: ``"largest"`` (algebraically largest first) or ``"smallest"`` (smallest first).
        v0: warm start: a vector ``(P,)`` or a block ``(b, P)``, e.g. the eigenvectors of a
            previous call; the rows are normalized, summed and mixed with a small random vector,
            so directions that were not in it are still found (see ``_random_fraction``).
        max_matvecs: cap on products (default ``min(P, 20 k + 100)``).
        seed: seed of the random start and restart directions (a private ``torch.Generator``;
            the global RNG is not touched).
        basis_dtype: dtype of the Lanczos basis and scalars (float64 by default).
        basis_device: device of the basis (default the operator's; ``"cpu"`` to save GPU memory:
            the basis takes ``m * P * 8`` bytes in float64).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: if ``k`` or ``tol`` is out of range or ``which`` is unknown.
        NonFiniteError: if a product is not finite.

    Example:
        >>> import torch
        >>> from lightning_hessian.engine.lanczos import top_eigenvalues
        >>> class Diagonal:
        ...     num_params, dtype, device = 4, torch.float64, torch.device("cpu")
        ...     def matmat(self, v): return v * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
        >>> result = top_eigenvalues(Diagonal(), k=2)
        >>> result.eigenvalues.round(decimals=8), result.all_converged
        (tensor([4., 3.], dtype=torch.float64), True)
    """
    started = time.perf_counter()
    num_params = op.num_params
    if not isinstance(k, int) or not 1 <= k <= num_params:
        raise ValueError(f"k={k!r} must be an integer between 1 and the number of parameters ({num_params})")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be positive")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r} must be 'largest' or 'smallest'")
    cap = min(num_params, max_matvecs if max_matvecs is not None else 20 * k + 100)
    if cap < k:
        raise ValueError(f"max_matvecs={max_matvecs} must be >= k={k}; raise max_matvecs or lower k")
    generator = torch.Generator().manual_seed(seed)
    start = rademacher((1, num_params), generator, basis_dtype)
    if v0 is not None:
        start = _warm_start(v0, start, num_params, tol)
    lanczos = Lanczos(op, start, generator=generator, basis_dtype=basis_dtype, basis_device=basis_device)
    ritz = residuals = vectors = None
    while lanczos.num_steps < cap:
        lanczos.step()
        if lanczos.num_steps < k:
            continue
        ritz, vectors, residuals = _ritz_pairs(lanczos, k, which)
        if bool((residuals <= tol).all()):
            break
    assert ritz is not None and vectors is not None and residuals is not None
    eigenvectors = torch.einsum("mk,mp->kp", vectors.to(lanczos.basis_dtype), lanczos.basis[0])
    return EigenResult(
        eigenvalues=ritz.cpu(),
        eigenvectors=eigenvectors,
        residuals=residuals.cpu(),
        converged=(residuals <= tol).cpu(),
        num_matvecs=lanczos.num_steps,
        seconds=time.perf_counter() - started,
        which=which,
    )


def _warm_start(v0: Tensor, random_start: Tensor, num_params: int, tol: float) -> Tensor:
    """Unit sum of the given block plus a random part of norm ``_random_fraction(P, tol)``, ``(1, P)``."""
    block = v0.reshape(-1, v0.shape[-1]).to(device="cpu", dtype=random_start.dtype)
    if block.shape[1] != num_params:
        raise ValueError(f"v0 has length {block.shape[1]}, the operator has num_params={num_params}")
    block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-300)
    combined = block.sum(dim=0, keepdim=True)
    if not torch.isfinite(combined).all() or combined.norm() == 0:
        return random_start
    fraction = _random_fraction(num_params, tol)
    return combined / combined.norm() + fraction * random_start / random_start.norm()


def _random_fraction(num_params: int, tol: float) -> float:
    """Norm of the random part of a warm start, relative to the part from ``v0``.

    The random part gives every eigenvector, also a new top direction that ``v0`` lacks, a start
    component of about ``fraction / sqrt(P)``; it costs steps, because Lanczos must damp it below
    ``tol`` like a cold start. Measured on trained MLPs (P = 1,540 and 2,410, tol = 1e-6, v0 the
    exact eigenvectors with one wanted one left out): components of about 2 tol let the solver
    stop, "converged", without the missing eigenvalue; 20 tol and above found it. We keep the
    component at ``_MISSING_COMPONENT_TOLS * tol``, with the fraction capped at a third, which
    large models reach (at tol = 1e-6 from P of about 11 million). At P = 2,410 and tol = 1e-6 the
    fraction is 5e-3, and an exact warm start at the same point takes 20 products instead of 25
    with a fixed third (cold: 28).
    """
    return min(_MAX_RANDOM_FRACTION, _MISSING_COMPONENT_TOLS * tol * math.sqrt(num_params))


def _ritz_pairs(lanczos: Lanczos, k: int, which: Which) -> tuple[Tensor, Tensor, Tensor]:
    """The k wanted Ritz values ``(k,)``, their T-eigenvectors ``(m, k)`` and relative residuals."""
    values, vectors = torch.linalg.eigh(lanczos.tridiagonal(0).cpu())
    order = torch.arange(values.numel() - 1, values.numel() - 1 - k, -1) if which == "largest" \
        else torch.arange(k)
    scale = values.abs().max().clamp_min(torch.finfo(values.dtype).tiny)
    beta = lanczos.betas[-1][0].cpu()
    if lanczos.num_steps >= lanczos.op.num_params:
        beta = torch.zeros_like(beta)  # the whole space is spanned: T's eigenpairs are exact
    residuals = (beta * vectors[-1, order]).abs() / scale
    return values[order], vectors[:, order], residuals


def tridiagonal_quadrature(lanczos: Lanczos) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of every recursion: eigenvalues of T and the squared first
    components of its eigenvectors, each ``(S, m)``, weights summing to 1 per row."""
    nodes, weights = [], []
    for index in range(len(lanczos.alphas[0])):
        values, vectors = torch.linalg.eigh(lanczos.tridiagonal(index).cpu())
        nodes.append(values)
        weights.append(vectors[0] ** 2)
    return torch.stack(nodes), torch.stack(weights)


__all__ = ["EigenResult", "Lanczos", "LinearOperator", "rademacher", "top_eigenvalues", "tridiagonal_quadrature"]

