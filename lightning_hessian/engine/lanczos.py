"""Lanczos kept semi-orthogonal: extreme eigenpairs with residual certificates, and SLQ's tridiagonals.

Symbols: P parameters (``op.num_params``), k wanted eigenpairs, m Lanczos steps, S recursions run
side by side (one product with S vectors per step).

Plain Lanczos loses orthogonality as soon as a Ritz pair converges and then returns spurious
copies of it (on a trained MLP, 5 copies of lambda_1 among the top 10 after 80 steps). Orthogonalizing
every new vector against the whole basis prevents that, but costs two reads of the basis per step,
which dominated the solver's own time on large models. Partial reorthogonalization (Simon, Math.
Comp. 42, 1984) gets the same accuracy for less: a recurrence estimates the inner products of the
new vector with the basis from T alone, and the new vector (and the next one, which inherits the
loss) is orthogonalized against the whole basis only when an estimate exceeds a threshold
(``sqrt(eps)``, or a tenth of the residual tolerance when that is smaller). Such a semi-orthogonal
basis makes T the projection of H onto the Krylov space to working precision, so Ritz values and
quadrature are as accurate as with full reorthogonalization. On trained float64 MLPs a third of the
steps or fewer reorthogonalize; float32 products, whose rounding alone exceeds ``sqrt(eps)`` of the
float64 basis, reorthogonalize at every step (SLQ settles for float32's ``sqrt(eps)``).

The residual of a Ritz pair (theta, y = Q s) is read from the recursion: ``H Q = Q T + beta_m
q_{m+1} e_m^T + Q C``, with C the components that reorthogonalization removed (recorded, each below
the threshold times a step's residual), so ``||H y - theta y||^2 = (beta_m s_m)^2 + ||C s||^2`` up
to the rounding of the products themselves (about 1e-7 of ``||H||`` in float32). It certifies each
eigenvalue: some eigenvalue of H lies within that distance of theta.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import scipy.linalg
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
# top_eigenvalues stops for a pair whose residual from the recurrence is below this fraction of the
# residual that rounding left (recorded by reorthogonalization): further steps cannot lower it.
_FLOOR_FRACTION = 0.1
# ... provided that rounding part is within this many unit roundoffs (times sqrt(m)) of ||H||.
_FLOOR_ROUNDINGS = 100.0


class LinearOperator(Protocol):
    """What the solvers need from an operator: a symmetric P x P matrix known by its products."""

    num_params: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[P, S] -> [P, S]``: the products with S vectors, one per column."""
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
            ``residuals[i] * ||H||`` of ``eigenvalues[i]``. The vectors are orthonormal to about
            ``sqrt(eps)`` of the basis dtype (1.5e-8 in float64).
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
    """S Lanczos recursions run side by side, kept semi-orthogonal by partial reorthogonalization.

    Args:
        op: the operator.
        start: ``(S, P)`` start vectors (normalized here).
        generator: source of random restart directions after a breakdown.
        basis_dtype: dtype of the stored basis (default float64).
        basis_device: where the basis lives (default the operator's device); ``"cpu"`` keeps a
            large basis off the GPU at the cost of a transfer per step.
        capacity: basis columns to allocate up front, e.g. the number of steps when it is known;
            default 16, doubled whenever full (so up to twice the memory needed at the peak).
        semi_orthogonality: the estimated loss of orthogonality that triggers a reorthogonalization;
            default ``sqrt(eps)`` of ``basis_dtype``. What a reorthogonalization removes is up to
            this fraction of a step's residual, which enters the residuals of the Ritz pairs, so a
            residual tolerance ``tol`` needs it below ``tol`` (``top_eigenvalues`` sees to it);
            quadrature needs only ``sqrt(eps)`` of the products' own precision.
        deflate: ``(k, P)`` orthonormal vectors, e.g. known eigenvectors, that the bases are kept
            orthogonal to: the recursions then run on H restricted to their complement.

    Attributes:
        num_steps: m, the steps taken.
        num_reorthogonalized: new Lanczos vectors that were orthogonalized against their whole basis
            (a step of S recursions adds up to S).
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
        semi_orthogonality: float | None = None,
        deflate: Tensor | None = None,
    ) -> None:
        self.op = op
        self.generator = generator
        self.basis_device = torch.device(basis_device) if basis_device is not None else op.device
        self.basis_dtype = basis_dtype
        start = start.to(device=self.basis_device, dtype=basis_dtype)
        norms = start.norm(dim=1, keepdim=True)
        if not torch.all(norms > 0):
            raise ValueError("start vectors must be non-zero")
        self._deflate = None if deflate is None else deflate.to(device=self.basis_device, dtype=basis_dtype)
        num_recursions = start.shape[0]
        # One column more than the steps: the vector after the last step.
        columns = min((capacity or _INITIAL_CAPACITY) + 1, op.num_params)
        self._basis = torch.empty(num_recursions, columns, op.num_params, dtype=basis_dtype, device=self.basis_device)
        self.num_steps = 0
        start = self._deflated(start)
        kept = start.norm(dim=1, keepdim=True)
        # A start that lies (almost) in the deflated space carries no direction: a random one replaces it.
        lost = kept[:, 0] <= math.sqrt(torch.finfo(basis_dtype).eps) * norms[:, 0]
        self._basis[:, 0] = start / kept.clamp_min(torch.finfo(basis_dtype).tiny)
        if lost.any():
            self._basis[:, 0] = torch.where(lost[:, None], self._fresh_direction(), self._basis[:, 0])
        self._alpha = np.zeros((num_recursions, columns))
        self._beta = np.zeros((num_recursions, columns))
        self._last_beta = torch.zeros(num_recursions, dtype=basis_dtype, device=self.basis_device)
        # Estimated inner products of the newest basis vector (and of the one before) with every
        # basis vector, ``(S, columns + 1)``; the diagonal entries are 1.
        self._omega = np.zeros((num_recursions, columns + 1))
        self._omega[:, 0] = 1.0
        self._omega_before = np.zeros((num_recursions, columns + 1))
        # Column j: the components that reorthogonalization removed from step j's new vector, which
        # the three-term recurrence in T does not account for, ``(S, columns, columns)``.
        self._removed = np.zeros((num_recursions, columns, columns))
        # Rounding per step, of the basis or of the products (float32 products make it float32's).
        # With the default threshold, float32 products, whose rounding exceeds it, reorthogonalize
        # at every step.
        self._unit_roundoff = max(torch.finfo(basis_dtype).eps, torch.finfo(op.dtype).eps)
        self._semi_orthogonality = math.sqrt(torch.finfo(basis_dtype).eps) if semi_orthogonality is None \
            else semi_orthogonality
        self._scale = np.zeros(num_recursions)
        self._reorthogonalize_next = np.zeros(num_recursions, dtype=bool)
        self.num_reorthogonalized = 0
        # Step at which each recursion's current Krylov block began: after a breakdown the recursion
        # restarts from a fresh direction, and T is block diagonal.
        self.block_starts = np.zeros(num_recursions, dtype=int)

    @property
    def basis(self) -> Tensor:
        """``(S, m, P)``: the Lanczos vectors of the steps taken so far, orthonormal to
        ``sqrt(eps)`` (eps the unit roundoff of the basis or of the products, whichever is larger)."""
        return self._basis[:, : self.num_steps]

    @property
    def alphas(self) -> Tensor:
        """``(S, m)`` float64 diagonals of the tridiagonal matrices."""
        return torch.from_numpy(self._alpha[:, : self.num_steps])

    @property
    def betas(self) -> Tensor:
        """``(S, m)`` float64 off-diagonals; entry j joins steps j and j + 1 (the last one is the
        norm of the residual vector, which is not part of T)."""
        return torch.from_numpy(self._beta[:, : self.num_steps])

    def step(self) -> None:
        """One Lanczos step for every recursion: one product with S vectors."""
        j = self.num_steps
        if j + 1 >= self._basis.shape[1] and j + 1 < self.op.num_params:
            self._grow()
        current = self._basis[:, j]
        product = self.op.matmat(current.to(device=self.op.device, dtype=self.op.dtype).T).T
        w = product.to(device=self.basis_device, dtype=self.basis_dtype)
        alpha = torch.linalg.vecdot(current, w)
        w = torch.addcmul(w, alpha[:, None], current, value=-1)
        if j > 0:
            w = torch.addcmul(w, self._last_beta[:, None], self._basis[:, j - 1], value=-1)
        w = self._deflated(w)
        beta = torch.linalg.vector_norm(w, dim=1)
        alpha_host, beta_host = torch.stack([alpha, beta]).to(device="cpu", dtype=torch.float64).numpy()
        self._scale = np.maximum(self._scale, np.abs(alpha_host) + beta_host)
        omega = self._next_orthogonality(j, alpha_host, beta_host)
        lost = (np.abs(omega[:, : j + 1]) > self._semi_orthogonality).any(axis=1)
        selected = np.flatnonzero(lost | self._reorthogonalize_next)
        if selected.size:
            w, beta = self._reorthogonalize(w, beta, selected)
            beta_host = beta.to(device="cpu", dtype=torch.float64).numpy()
            omega[selected, : j + 1] = self._unit_roundoff
        # The vector after a reorthogonalized one inherits the loss through the recurrence.
        self._reorthogonalize_next = lost
        broken = beta_host <= _BREAKDOWN_FRACTION * np.maximum(self._scale, np.finfo(np.float64).tiny)
        self.num_steps = j + 1
        self._alpha[:, j] = alpha_host
        self._beta[:, j] = np.where(broken, 0.0, beta_host)
        self._omega_before, self._omega = self._omega, omega
        if j + 1 >= self.op.num_params:
            return
        if broken.any():
            self.block_starts[broken] = j + 1
            fresh = torch.from_numpy(broken).to(self.basis_device)[:, None]
            w = torch.where(fresh, self._fresh_direction(), w / beta.clamp_min(1e-300)[:, None])
            omega[broken, : j + 1] = self._unit_roundoff
            beta = torch.where(fresh[:, 0], torch.zeros_like(beta), beta)
        else:
            w = w / beta[:, None]
        self._last_beta = beta
        self._basis[:, j + 1] = w

    def _deflated(self, vectors: Tensor) -> Tensor:
        """``(S, P)`` vectors without their components along the deflated vectors (if any)."""
        if self._deflate is None:
            return vectors
        return vectors - (vectors @ self._deflate.T) @ self._deflate

    def _reorthogonalize(self, w: Tensor, beta: Tensor, selected: np.ndarray) -> tuple[Tensor, Tensor]:
        """Orthogonalize the new vectors ``w`` ``(S, P)`` of the ``selected`` recursions against their
        whole bases; returns them and their norms ``(S,)``, and records what was removed.

        Classical Gram-Schmidt, with a second pass only where the first removed a large part of the
        vector (the DGKS criterion: "twice is enough"). Consecutive recursions go in one batched pass.
        """
        j = self.num_steps
        for rows in _contiguous_runs(selected):
            basis = self._basis[rows, : j + 1]
            before = beta[rows].clone()
            w[rows], removed = _orthogonalize(w[rows], basis)
            beta[rows] = w[rows].norm(dim=1)
            if bool((beta[rows] < _REORTHOGONALIZE_AGAIN * before).any()):
                w[rows], again = _orthogonalize(w[rows], basis)
                removed = removed + again
                beta[rows] = w[rows].norm(dim=1)
            self._removed[rows, : j + 1, j] = removed.to(device="cpu", dtype=torch.float64).numpy()
        self.num_reorthogonalized += selected.size
        return w, beta

    def _next_orthogonality(self, j: int, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Estimated inner products of the next Lanczos vector with the basis, ``(S, columns + 1)``.

        Simon's recurrence for the loss of orthogonality (Math. Comp. 42, 1984): the recurrence
        ``beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}`` carries the inner products
        ``omega_{j,k} = q_j . q_k`` along, each step adding a rounding term of about
        ``eps sqrt(P) ||H||`` (as in Simon's analysis and PROPACK; counted against the growth, with
        the sign that makes it worse). Entries after ``j + 1`` are zero.
        """
        omega = np.zeros((alpha.shape[0], self._omega.shape[1]))
        rounding = self._unit_roundoff * math.sqrt(self.op.num_params) * self._scale
        current, before = self._omega[:, : j + 1], self._omega_before[:, : j + 1]
        # A breakdown (beta = 0) restarts the recursion orthogonally: any finite estimate will do.
        beta = np.maximum(beta, np.finfo(np.float64).tiny)
        if j > 0:
            estimate = self._beta[:, :j] * current[:, 1:] + (self._alpha[:, :j] - alpha[:, None]) * current[:, :j]
            estimate[:, 1:] += self._beta[:, : j - 1] * current[:, : j - 1]
            estimate -= self._beta[:, j - 1 : j] * before[:, :j]
            omega[:, :j] = (estimate + np.sign(estimate) * rounding[:, None]) / beta[:, None]
        omega[:, j] = rounding / beta
        omega[:, j + 1] = 1.0
        return omega

    def _grow(self) -> None:
        """Double the capacity of the basis and of the scalars (at most P columns)."""
        steps, columns = self.num_steps + 1, self._basis.shape[1]
        extra = min(columns, self.op.num_params - columns)
        grown = torch.empty(self._basis.shape[0], columns + extra, self._basis.shape[2], dtype=self.basis_dtype,
                            device=self.basis_device)
        grown[:, :steps] = self._basis[:, :steps]
        self._basis = grown
        for name in ("_alpha", "_beta", "_omega", "_omega_before", "_removed"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], *(size + extra for size in old.shape[1:])))
            new[(slice(None), *(slice(0, size) for size in old.shape[1:]))] = old
            setattr(self, name, new)

    def _fresh_direction(self) -> Tensor:
        """Random unit vectors orthogonal to the current bases, ``(S, P)``."""
        shape = (self._basis.shape[0], self.op.num_params)
        w = self._deflated(torch.randn(shape, generator=self.generator, dtype=self.basis_dtype).to(self.basis_device))
        w = self._deflated(_orthogonalize(_orthogonalize(w, self.basis)[0], self.basis)[0])
        return w / w.norm(dim=1, keepdim=True)

    def tridiagonal(self, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal ``(m,)`` and off-diagonal ``(m - 1,)`` of the tridiagonal matrix T of recursion ``index``."""
        return self._alpha[index, : self.num_steps], self._beta[index, : self.num_steps - 1]

    def unrecorded(self, index: int, vectors: np.ndarray) -> np.ndarray:
        """Norms ``(k,)`` of the parts of ``H Q s - Q T s - beta_m s_m q_{m+1}`` that
        reorthogonalization moved out of the recurrence, for T-vectors ``s`` given as ``(m, k)`` columns.

        With ``C`` the removed components (column j from step j), ``H Q = Q T + beta_m q_{m+1} e_m^T
        + Q C`` up to rounding, so the residual of the Ritz vector ``Q s`` has the two orthogonal parts
        ``beta_m s_m q_{m+1}`` and ``Q C s``.
        """
        steps = self.num_steps
        return np.linalg.norm(self._removed[index, :steps, :steps] @ vectors, axis=0)

    def ritz(self, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues ``(m,)`` ascending and eigenvectors ``(m, m)`` (columns) of T of recursion ``index``."""
        return _tridiagonal_eigh(*self.tridiagonal(index))


def _tridiagonal_eigh(diagonal: np.ndarray, off_diagonal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``(m,)`` ascending and eigenvectors ``(m, m)`` of a symmetric tridiagonal matrix."""
    if diagonal.shape[0] == 1:
        return diagonal.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(diagonal, off_diagonal)


def _contiguous_runs(indices: np.ndarray) -> list[slice]:
    """Sorted indices as slices of consecutive ones: ``[0, 1, 2, 5] -> [0:3, 5:6]``."""
    breaks = np.flatnonzero(np.diff(indices) > 1)
    starts = [indices[0], *indices[breaks + 1]]
    stops = [*indices[breaks], indices[-1]]
    return [slice(int(first), int(last) + 1) for first, last in zip(starts, stops, strict=True)]


def _orthogonalize(vectors: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One classical Gram-Schmidt pass: ``(S, P)`` vectors minus their projections on ``(S, m, P)``
    bases, and the coefficients of the projections, ``(S, m)``."""
    coefficients = torch.einsum("smp,sp->sm", basis, vectors)
    return vectors - torch.einsum("smp,sm->sp", basis, coefficients), coefficients


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

    Lanczos kept semi-orthogonal, checked after every step: it stops as soon as each of
    the k wanted Ritz pairs has relative residual ``||H v - theta v|| / ||H|| <= tol`` or sits at
    the rounding floor of the products (float32 products can leave about 1e-7 to 1e-6 that no step
    removes), or when ``max_matvecs`` products are spent; ``converged`` says which pairs met ``tol``.

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
        basis_dtype: dtype of the Lanczos basis (float64 by default; T is always float64).
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
        ...     def matmat(self, v): return v * torch.tensor([[4.0], [3.0], [2.0], [1.0]], dtype=torch.float64)
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
    # Reorthogonalization removes up to this fraction of a step's residual, which the certificates
    # then carry: a tenth of tol keeps them reachable, and sqrt(eps) is all that PRO needs otherwise.
    eps = torch.finfo(basis_dtype).eps
    semi_orthogonality = min(math.sqrt(eps), max(eps, 0.1 * tol))
    lanczos = Lanczos(op, start, generator=generator, basis_dtype=basis_dtype, basis_device=basis_device,
                      semi_orthogonality=semi_orthogonality)
    ritz = residuals = vectors = None
    while lanczos.num_steps < cap:
        lanczos.step()
        if lanczos.num_steps < k:
            continue
        ritz, vectors, residuals, at_floor = _ritz_pairs(lanczos, k, which)
        if ((residuals.numpy() <= tol) | at_floor).all() and _restart_settled(lanczos, k, which, tol):
            break
    assert ritz is not None and vectors is not None and residuals is not None
    eigenvectors = torch.einsum("mk,mp->kp", vectors.to(device=lanczos.basis_device, dtype=lanczos.basis_dtype),
                                lanczos.basis[0])
    eigenvectors = eigenvectors / eigenvectors.norm(dim=1, keepdim=True)  # the basis is orthonormal to sqrt(eps)
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


def _ritz_pairs(lanczos: Lanczos, k: int, which: Which) -> tuple[Tensor, Tensor, Tensor, np.ndarray]:
    """The k wanted Ritz values ``(k,)``, their T-eigenvectors ``(m, k)``, relative residuals (float64),
    and whether each pair is at the rounding floor ``(k,)`` bool.

    A pair is at the floor when the recurrence's part of its residual has fallen below
    ``_FLOOR_FRACTION`` of the part that reorthogonalization recorded, and that part is no more than
    the products' rounding could leave (``_FLOOR_ROUNDINGS * sqrt(m) * eps`` of ``||H||``, eps of
    the operator's dtype; float32 products leave 1e-7 to 2e-6): more steps cannot remove it.
    """
    values, vectors = lanczos.ritz(0)
    order = slice(None, -k - 1, -1) if which == "largest" else slice(None, k)
    scale = max(float(np.abs(values).max()), np.finfo(np.float64).tiny)
    # When the whole space is spanned, T's eigenpairs are exact.
    beta = 0.0 if lanczos.num_steps >= lanczos.op.num_params else float(lanczos.betas[0, -1])
    recurrence = np.abs(beta * vectors[-1, order])
    rounding = lanczos.unrecorded(0, vectors[:, order])
    residuals = np.hypot(recurrence, rounding) / scale
    attainable = _FLOOR_ROUNDINGS * math.sqrt(lanczos.num_steps) * torch.finfo(lanczos.op.dtype).eps * scale
    at_floor = (recurrence < _FLOOR_FRACTION * rounding) & (rounding <= attainable)
    return torch.from_numpy(values[order].copy()), torch.from_numpy(vectors[:, order].copy()), \
        torch.from_numpy(residuals), at_floor


def _restart_settled(lanczos: Lanczos, k: int, which: Which, tol: float) -> bool:
    """After a breakdown (the start spanned an invariant subspace, e.g. a Rademacher vector that is an
    eigenvector of a symmetric network), whether the block grown from the fresh direction has
    converged its own k wanted pairs: until then larger eigenvalues may still be hidden there."""
    first = int(lanczos.block_starts[0])
    if first == 0 or lanczos.num_steps >= lanczos.op.num_params:
        return True
    if first >= lanczos.num_steps:  # the fresh direction has not been multiplied yet
        return False
    diagonal, off_diagonal = lanczos.tridiagonal(0)
    values, vectors = _tridiagonal_eigh(diagonal[first:], off_diagonal[first:])
    wanted = min(k, values.shape[0])
    order = slice(None, -wanted - 1, -1) if which == "largest" else slice(None, wanted)
    scale = max(float(np.abs(lanczos.alphas[0]).max()), float(np.abs(values).max()), np.finfo(np.float64).tiny)
    return bool((np.abs(float(lanczos.betas[0, -1]) * vectors[-1, order]) <= tol * scale).all())


def tridiagonal_quadrature(lanczos: Lanczos) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of every recursion: eigenvalues of T and the squared first
    components of its eigenvectors, each ``(S, m)``, weights summing to 1 per row."""
    pairs = [lanczos.ritz(index) for index in range(lanczos.alphas.shape[0])]
    nodes = np.stack([values for values, _ in pairs])
    weights = np.stack([vectors[0] ** 2 for _, vectors in pairs])
    return torch.from_numpy(nodes), torch.from_numpy(weights)


__all__ = ["EigenResult", "Lanczos", "LinearOperator", "rademacher", "top_eigenvalues", "tridiagonal_quadrature"]

