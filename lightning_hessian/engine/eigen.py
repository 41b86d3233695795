"""Extreme eigenpairs of a symmetric operator with residual certificates, in a basis of bounded size.

Symbols: P parameters (``op.num_params``), k wanted eigenpairs, b block size (1 from a random start,
the number of warm-start vectors otherwise), c the basis capacity (``max_basis``), m the basis size.

The method is a thick-restart block Krylov-Schur iteration (Stewart, SIAM J. Matrix Anal. Appl. 23,
2002; Wu and Simon, SIAM J. Matrix Anal. Appl. 22, 2000). The solver keeps an orthonormal basis V
(at most c vectors, so memory is ``c P`` numbers whatever the number of products), the projected
matrix ``M = V^T H V`` and a pending block U of new directions, with the exact relation

    H V = V M + U E

for the products as computed. Each step multiplies U (b products), orthogonalizes the results
against the whole basis (classical Gram-Schmidt, repeated where the first pass cancelled much of a
vector: "twice is enough"), and appends U to V. The Ritz pairs ``(theta, V y)`` of the symmetric part
of M then have the residual norm ``sqrt(||E y||^2 + ||(M - M_sym) y||^2)``: the first term is the
Krylov residual, the second what rounding made asymmetric; both are computed, so every reported
residual is the true one up to the rounding of the products themselves. When the basis is full,
the best Ritz vectors are kept (a thick restart): V shrinks, M becomes diagonal, and the relation
carries on, so the solver can spend any number of products in c vectors.

A warm start ``v0`` (e.g. the previous call's eigenvectors) is the first block: if the eigenvectors
have not moved, one block of k products gives the Rayleigh-Ritz pairs on their span, certified.
Once they have moved, every further step of a block of b vectors costs b products, and one vector,
their sum, is usually cheaper: its Krylov space holds the k eigenvectors after k products when they
are exact and grows one product at a time (the callback warm-starts this way).

A Krylov space grown from one vector holds one direction per distinct eigenvalue: it cannot see a
second copy of a repeated eigenvalue, and a start orthogonal to an eigenvector (a warm start inside
an invariant subspace) never sees that eigenvector. So once the k wanted pairs have converged, the
solver checks for what the space cannot hold: it continues from a fresh Gaussian direction
orthogonal to the basis (keeping only the k pairs first when the basis is bounded), and runs until
either the basis holds more Ritz values beyond theta_k (the k-th wanted value) than before, by
Cauchy interlacing an eigenvalue the pairs missed, which it then converges and checks for again, or
the fresh part's best Ritz pair has converged or, after a few steps, settled short of theta_k. The
last check that finds nothing ends the solve. A pending block set aside for the fresh direction is
never multiplied; it stays in the relation as ``F G``, and later blocks take over its parts along
them, so every residual stays the true one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.engine.checks import check_choice, check_count, check_fraction
from lightning_hessian.engine.linear_operator import LinearOperator, rademacher
from lightning_hessian.engine.vectors import VectorSpace

Which = Literal["largest", "smallest"]

# A new direction whose norm, after orthogonalization, falls below this fraction of ||H|| carries
# no information: the Krylov space is invariant in that direction, and it is dropped.
_BREAKDOWN_FRACTION = 1e-10
# A second Gram-Schmidt pass runs for a vector that the first pass shrank below 1/sqrt(2) of its norm.
_REORTHOGONALIZE_AGAIN = 2**-0.5
# A pair stops once its Krylov residual is below this fraction of the rounding part of its residual...
_FLOOR_FRACTION = 0.1
# ... provided the rounding part is within this many unit roundoffs (times sqrt(m)) of ||H||:
# more products cannot lower it (float32 products leave about 1e-7 to 1e-6 of ||H||).
_FLOOR_ROUNDINGS = 100.0
# The check for missed eigenvalues ends once the fresh part's best Ritz pair has converged, or once,
# after this many steps (products) from the fresh direction, its residual is within this fraction of
# its distance to theta_k: it has then settled on an eigenvalue short of theta_k, and a missed one
# would have needed a component along its eigenvector too small for that many steps to amplify.
_CHECK_STEPS = 10
_CHECK_SEPARATION = 0.1
# Rows allocated at first when the basis may grow (it doubles when full).
_INITIAL_ROWS = 32
# Columns of the basis transformed at once by a restart: bounds the temporary memory to this many
# numbers per basis vector.
_RESTART_CHUNK = 1 << 16


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a curvature operator with their certificates.

    Attributes:
        eigenvalues: ``(k,)`` float64; largest first for ``which="largest"``, smallest first for
            ``which="smallest"``.
        eigenvectors: ``(k, P)`` orthonormal vectors (in the basis dtype); row i belongs to
            ``eigenvalues[i]``.
        residuals: ``(k,)`` float64 relative residuals ``||H v - theta v|| / ||H||``, with ``||H||``
            estimated by the largest absolute Ritz value: an eigenvalue of H lies within
            ``residuals[i] * ||H||`` of ``eigenvalues[i]``.
        converged: ``(k,)`` bool, ``residuals <= tol``: each such pair is an eigenpair to ``tol``.
        num_matvecs: operator products used.
        seconds: wall time of the call.
        which: ``"largest"`` or ``"smallest"``.
        error_bounds: ``(k,)`` float64 estimated absolute eigenvalue errors,
            ``min(r, r**2 / gap)`` with ``r = residuals * ||H||`` and the gap read from the
            neighbouring Ritz values (a Kato-Temple bound whose gap is an estimate).
        checked: whether the check that no eigenvalue beyond the k-th was missed ran to its end
            (``top_eigenvalues(verify=True)``); ``False`` when ``max_matvecs`` cut it short, so the
            pairs are eigenpairs but perhaps not the k extreme ones; ``None`` when it did not run.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> result = top_eigenvalues(DiagonalOperator([3.0, 2.0, 1.0]), k=1)
        >>> float(result.eigenvalues[0]), result.all_converged
        (3.0, True)
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    seconds: float
    which: Which
    error_bounds: Tensor
    checked: bool | None = None

    @property
    def all_converged(self) -> bool:
        """Whether every returned pair met the tolerance and, where the check for missed eigenvalues
        ran, it ran to its end."""
        return bool(self.converged.all()) and self.checked is not False

    def converged_part(self) -> EigenResult | None:
        """The pairs that met the tolerance, as an :class:`EigenResult` (``None`` when none did).

        Example:
            >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
            >>> operator = DiagonalOperator([100.0] + [1.0 - 0.01 * i for i in range(30)])
            >>> result = top_eigenvalues(operator, k=2, max_matvecs=4)  # too few products for the second
            >>> result.converged.tolist(), result.converged_part().eigenvalues.round(decimals=6).tolist()
            ([True, False], [100.0])
        """
        if not bool(self.converged.any()):
            return None
        if bool(self.converged.all()):  # itself: a copy of the eigenvectors would be k more parameter vectors
            return self
        kept = self.converged
        return EigenResult(
            eigenvalues=self.eigenvalues[kept], eigenvectors=self.eigenvectors[kept.to(self.eigenvectors.device)],
            residuals=self.residuals[kept], converged=self.converged[kept], num_matvecs=self.num_matvecs,
            seconds=self.seconds, which=self.which, error_bounds=self.error_bounds[kept],
        )


def lean_max_basis(k: int) -> int:
    """A basis capacity for large models: ``max(2 k + 2, 8)`` vectors.

    ARPACK's rule for its Lanczos basis is ``max(2 k + 1, 20)``; ``2 k + 2`` leaves room for the k
    wanted Ritz vectors, as many more to converge them with, and the pending vector and its product.
    Tight clusters and the smallest eigenvalues of a trained network (a negative tail against the
    bulk at zero) converge in fewer products with a larger basis.

    Example:
        >>> lean_max_basis(5), lean_max_basis(2)
        (12, 8)
    """
    return max(2 * k + 2, 8)


class _KrylovSchur:
    """The solver's state: basis, projected matrix, pending block and the bookkeeping of restarts."""

    def __init__(self, op: LinearOperator, start: Tensor, *, capacity: int, dtype: torch.dtype,
                 device: torch.device, generator: torch.Generator, space: VectorSpace) -> None:
        self.op = op
        self.generator = generator
        self.space = space
        self.length = space.length  # of the rows held here: P, or this rank's part of a split vector
        self.capacity = capacity
        initial = min(capacity, max(2 * start.shape[0] + 1, _INITIAL_ROWS))
        self.rows = torch.empty(initial, self.length, dtype=dtype, device=device)
        self.num_matvecs = 0
        self.scale = 0.0  # largest ||H u|| seen: an estimate of ||H|| from below
        self.n = 0
        self.M = np.zeros((0, 0))
        self.defects: list[np.ndarray] = []  # rounding parts of restarts past, in current coordinates
        # Pending directions set aside by explore(), never multiplied, with their coupling G kept in the
        # relation
        #     H V = V M + U E + F G,        F orthogonal to V and U, not normalized.
        # Every new pending block U' takes over F's part along it (F = U' C + F', E' += C G), so the
        # basis can still grow into those directions, and a Ritz pair's Krylov residual stays exact:
        # ||E y||^2 + (G y)^T (F^T F) (G y).
        self.frozen = torch.empty(0, self.length, dtype=dtype, device=device)
        self.G = np.zeros((0, 0))
        self.gram = np.zeros((0, 0))  # F^T F
        self.fresh = np.zeros(0, dtype=bool)  # basis coordinates grown from the newest fresh direction
        # An operator whose products carry more than rounding (finite differences) says so with its own.
        self.unit_roundoff = max(torch.finfo(dtype).eps, getattr(op, "unit_roundoff", torch.finfo(op.dtype).eps))
        block = start.to(device=device, dtype=dtype)
        nonzero = space.norm(block, dim=1) > 0
        if not bool(nonzero.all()):
            block = block[nonzero]
        self.rows[: block.shape[0]] = block
        self.b = self._orthonormalize_rows(0, block.shape[0], reference=space.norm(block, dim=1), threshold=0.0)[0]
        if self.b == 0:
            self.rows[0] = self._fresh_direction(0)
            self.b = 1
        self.E = np.zeros((self.b, 0))
        self.u_fresh = False

    # --- products and orthogonalization ----------------------------------------------------

    def _multiply(self, block: Tensor, out: Tensor) -> None:
        """``out[i] = H block[i]``: the block's products, one column at a time unless the operator batches."""
        op = self.op
        if getattr(op, "vectorize", False) and block.shape[0] > 1:
            out.copy_(op.matmat(block.T.to(device=op.device, dtype=op.dtype)).T)
        else:
            for i in range(block.shape[0]):
                out[i] = op.matmat(block[i].reshape(-1, 1).to(device=op.device, dtype=op.dtype))[:, 0]
        self.num_matvecs += block.shape[0]

    def _orthonormalize_rows(self, offset: int, count: int, *, reference: Tensor,
                             threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
        """Orthonormalize ``rows[offset:offset + count]`` in place, against ``rows[:offset]`` and among
        themselves; the r independent directions end up in ``rows[offset:offset + r]``.

        Args:
            offset: where the block starts; the rows before it are orthonormal already.
            count: b, the rows of the block.
            reference: ``(b,)`` norms of the rows before any orthogonalization.
            threshold: a direction whose norm falls to this is dependent and dropped.

        Returns:
            ``(r, C, R)``: the coefficients ``C`` ``(offset, b)`` on the rows before and ``R``
            ``(r, b)`` on the new directions, so that the block as given equals
            ``C^T rows[:offset] + R^T rows[offset:offset + r]``.
        """
        existing, work = self.rows[:offset], self.rows[offset:offset + count]
        coefficients = self._project_out(work, existing)
        if offset and bool((self.space.norm(work, dim=1) < _REORTHOGONALIZE_AGAIN * reference).any()):
            coefficients += self._project_out(work, existing)
        r, R = 0, np.zeros((count, count))
        for i in range(count):  # Gram-Schmidt within the block, in place: row offset + r is free once row i is read
            if r < i:
                self.rows[offset + r] = work[i]
            vector = self.rows[offset + r]
            if r:
                accepted = self.rows[offset:offset + r]
                for _ in range(2):
                    projection = self.space.reduce(accepted @ vector)
                    vector.addmv_(accepted.T, projection, alpha=-1.0)
                    R[:r, i] += projection.double().cpu().numpy()
            norm = float(self.space.norm(vector))
            if norm <= threshold or norm == 0.0:
                continue
            vector.div_(norm)
            R[r, i] = norm
            r += 1
        return r, coefficients.double().cpu().numpy(), R[:r]

    def _project_out(self, work: Tensor, rows: Tensor) -> Tensor:
        """Subtract from each row of ``work`` its projection on the orthonormal ``rows``, in place;
        returns the coefficients ``(len(rows), len(work))``."""
        coefficients = self.space.reduce(rows @ work.T)
        if rows.shape[0]:
            work.addmm_(coefficients.T, rows, alpha=-1.0)
        return coefficients

    def _fresh_direction(self, offset: int) -> Tensor:
        """A random unit vector orthogonal to ``rows[:offset]`` (two Gram-Schmidt passes)."""
        vector = torch.randn(1, self.length, generator=self.generator, dtype=torch.float64)
        vector = vector.to(device=self.rows.device, dtype=self.rows.dtype)
        for _ in range(2):
            self._project_out(vector, self.rows[:offset])
        return (vector / self.space.norm(vector))[0]

    def _absorb(self, offset: int, count: int) -> np.ndarray:
        """Move the set-aside directions' part along the new pending block ``rows[offset:offset + count]``
        out of F: returns its coupling ``C G`` ``(count, m)`` to add to E."""
        if self.frozen.shape[0] == 0 or count == 0:
            return np.zeros((count, self.G.shape[1]))
        block = self.rows[offset:offset + count]
        C = self._project_out(self.frozen, block).double().cpu().numpy()  # (count, f): F = U C + F'
        self.gram = self.gram - C.T @ C
        return C @ self.G

    # --- one step ----------------------------------------------------------------------------

    def _reserve(self, count: int) -> None:
        """Room for ``count`` rows: the storage doubles (up to the capacity) when it is short."""
        if count <= self.rows.shape[0] or self.rows.shape[0] >= self.capacity:
            return
        grown = torch.empty(min(self.capacity, max(count, 2 * self.rows.shape[0])), self.length,
                            dtype=self.rows.dtype, device=self.rows.device)
        used = self.n + self.b
        grown[:used] = self.rows[:used]
        self.rows = grown

    def step(self) -> None:
        """Multiply the pending block, orthogonalize, and append it to the basis (b products)."""
        n, b = self.n, self.b
        m = n + b
        self._reserve(m + b)
        self._multiply(self.rows[n:m], self.rows[m:m + b])
        before = self.space.norm(self.rows[m:m + b], dim=1)
        self.scale = max(self.scale, float(before.max()))
        # The products become the new directions in place; C holds their coefficients on the basis and
        # on the block itself (the new column of M), R those on the new directions.
        r, C, R = self._orthonormalize_rows(m, b, reference=before,
                                            threshold=_BREAKDOWN_FRACTION * max(self.scale, 1e-300))
        M = np.zeros((m, m))
        M[:n, :n] = self.M
        M[n:, :n] = self.E
        M[:, n:] = C
        self.M = M
        self.fresh = np.concatenate([self.fresh, np.full(b, self.u_fresh)])
        self.defects = [np.pad(defect, ((0, 0), (0, b))) for defect in self.defects]
        self.G = np.pad(self.G, ((0, 0), (0, b)))
        self.n = m
        # r = 0: the basis spans an invariant subspace (the whole space when m = P, and up to the
        # set-aside directions' coupling); no block pends.
        self.E = self._absorb(m, r)
        self.E[:, n:] += R
        self.b = r

    def explore(self) -> None:
        """Continue from a fresh random direction orthogonal to the basis, uncoupled from it.

        A pending block is set aside, never multiplied (F, one P-vector per direction): its coupling
        stays in the residuals, so they stay the true ones, and later blocks take over its parts
        along them.
        """
        if self.b:
            f = self.frozen.shape[0]
            self.frozen = torch.cat([self.frozen, self.rows[self.n:self.n + self.b]])
            self.G = np.concatenate([self.G, self.E])
            gram = np.eye(f + self.b)
            gram[:f, :f] = self.gram
            self.gram = gram
        self.rows[self.n] = self._fresh_direction(self.n)
        self.E = self._absorb(self.n, 1)
        self.b = 1
        self.fresh[:] = False
        self.u_fresh = True

    # --- Ritz pairs ----------------------------------------------------------------------------

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values ``(m,)`` ascending, their M-eigenvectors ``(m, m)``, and the Krylov and rounding parts
        ``(m,)`` of each pair's absolute residual."""
        symmetric = (self.M + self.M.T) / 2
        values, vectors = np.linalg.eigh(symmetric)
        krylov = self._krylov_residuals(vectors)
        rounding = np.linalg.norm((self.M - symmetric) @ vectors, axis=0)
        for defect in self.defects:
            rounding = rounding + np.linalg.norm(defect @ vectors, axis=0)
        return values, vectors, krylov, rounding

    def fresh_best(self, which: Which) -> tuple[float, float, int] | None:
        """The best Ritz value of the part grown from the newest fresh direction, its absolute Krylov
        residual and the part's dimension (``None`` before that part has a vector)."""
        index = np.flatnonzero(self.fresh)
        if index.size == 0:
            return None
        part = self.M[np.ix_(index, index)]
        values, vectors = np.linalg.eigh((part + part.T) / 2)
        best = _wanted(values, 1, which)
        vector = np.zeros((self.n, 1))
        vector[index] = vectors[:, best]
        return float(values[best[0]]), float(self._krylov_residuals(vector)[0]), int(index.size)

    def _krylov_residuals(self, vectors: np.ndarray) -> np.ndarray:
        """``||U E y + F G y||`` per column y of ``vectors`` ``(m, s)``: ``(s,)``."""
        coupled = self.G @ vectors
        squares = (np.linalg.norm(self.E @ vectors, axis=0) ** 2
                   + np.maximum(np.einsum("is,ij,js->s", coupled, self.gram, coupled), 0.0))
        return np.sqrt(squares)

    # --- restart -------------------------------------------------------------------------------

    def restart(self, keep: int, which: Which) -> None:
        """Keep the ``keep`` best Ritz vectors (a thick restart)."""
        self.keep(_wanted(np.linalg.eigvalsh((self.M + self.M.T) / 2), keep, which))

    def keep(self, index: np.ndarray) -> None:
        """Keep the Ritz vectors at ``index`` (positions among the Ritz values in ascending order):
        V <- V Y, M <- diag(theta), E <- E Y."""
        symmetric = (self.M + self.M.T) / 2
        values, vectors = np.linalg.eigh(symmetric)
        chosen = vectors[:, index]
        keep = index.size
        n, b = self.n, self.b
        transform = torch.from_numpy(np.ascontiguousarray(chosen.T)).to(device=self.rows.device,
                                                                         dtype=self.rows.dtype)
        for start in range(0, self.length, _RESTART_CHUNK):
            columns = slice(start, start + _RESTART_CHUNK)
            self.rows[:keep, columns] = transform @ self.rows[:n, columns]
        for i in range(b):  # the pending block moves down; keep <= n, so no row is overwritten before it is read
            self.rows[keep + i] = self.rows[n + i]
        self.defects = [defect @ chosen for defect in self.defects] + [(self.M - symmetric) @ chosen]
        mass = (chosen[self.fresh] ** 2).sum(axis=0) if self.fresh.any() else np.zeros(keep)
        self.fresh = mass > 0.5
        self.M = np.diag(values[index])
        self.E = self.E @ chosen
        self.G = self.G @ chosen
        self.n = keep

    def eigenvectors(self, vectors: np.ndarray) -> Tensor:
        """``(k, P)`` Ritz vectors ``V y`` for M-eigenvectors given as ``(m, k)`` columns."""
        transform = torch.from_numpy(np.ascontiguousarray(vectors.T)).to(device=self.rows.device,
                                                                          dtype=self.rows.dtype)
        return transform @ self.rows[: self.n]


def _wanted(values: np.ndarray, count: int, which: Which) -> np.ndarray:
    """Indices of the ``count`` wanted values of an ascending array, best first."""
    order = np.arange(values.size)
    return order[::-1][:count] if which == "largest" else order[:count]


def _start_block(v0: Tensor | None, space: VectorSpace, generator: torch.Generator, limit: int,
                 dtype: torch.dtype) -> Tensor:
    """The first block: up to ``limit`` rows of ``v0`` (a vector or a block), or one Rademacher vector."""
    if v0 is None:
        return rademacher((1, space.length), generator, dtype)
    block = v0.reshape(-1, v0.shape[-1]).detach()
    if block.shape[1] != space.length:
        has = f"this rank holds {space.length} of its entries" if space.split else f"num_params={space.length}"
        raise ValueError(f"v0 has length {block.shape[1]}, the operator has {has}")
    # A NaN propagates to a row's maximum, an infinity is its maximum or minimum: no mask as large as the block.
    finite = torch.isfinite(block.amax(dim=1)) & torch.isfinite(block.amin(dim=1))
    if space.split:  # a row is kept on every rank or on none
        finite = space.reduce((~finite).to(torch.float64)) == 0
    if not bool(finite.all()):
        block = block[finite]
    block = block[:limit]
    if block.shape[0] == 0 or not bool((space.norm(block, dim=1) > 0).any()):
        return rademacher((1, space.length), generator, dtype)
    return block


def top_eigenvalues(
    op: LinearOperator,
    k: int = 5,
    *,
    tol: float = 1e-6,
    which: Which = "largest",
    v0: Tensor | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    max_basis: int | None = None,
    verify: bool = True,
) -> EigenResult:
    """The k largest (or smallest) eigenvalues of a symmetric operator, with certificates.

    A thick-restart block Krylov-Schur iteration (see the module docstring), checked after every
    block: the k wanted Ritz pairs are done once each has relative residual
    ``||H v - theta v|| / ||H|| <= tol`` or sits at the rounding floor of the products (float32
    products can leave about 1e-7 to 1e-6 of ``||H||`` that no step removes); ``converged`` says
    which pairs met ``tol``. Eigenvalues are counted with multiplicity: a value repeated r times
    appears r times among the k. With ``verify`` the solver then checks, from fresh random
    directions, that no eigenvalue beyond the k-th was missed (below), and stops when a check finds
    nothing, when the whole space is spanned, or when ``max_matvecs`` products are spent.

    What the result guarantees:

    - each returned pair, always: an eigenvalue of the operator lies within
      ``residuals[i] * ||H||`` of ``eigenvalues[i]`` (the residuals are computed, not estimated);
    - with ``verify``, that the k values are the k extreme ones counted with multiplicity, up to a
      randomized check: the last check ran Lanczos from a Gaussian direction orthogonal to the
      basis until its best Ritz pair converged, or settled after 10 products on a value
      short of theta_k, and an eigenvalue beyond theta_k that the pairs missed would have pushed a
      Ritz value past theta_k (Cauchy interlacing). It fails only if the direction's component
      along the missed eigenvector is too small for those steps to amplify: for a missed
      eigenvalue ``eps`` times the spectrum's width above the check's best Ritz value after m
      steps, with probability at most ``1.648 sqrt(P) exp(-(2 m - 1) sqrt(eps))`` (Kuczynski and
      Wozniakowski, SIAM J. Matrix Anal. Appl. 13, 1992). A random start (no ``v0``) with
      ``k = 1`` sees every distinct eigenvalue with probability one, so it checks only when its
      Krylov space is invariant. ``checked`` says whether the check ran to its end; a check cut
      short by ``max_matvecs`` certifies only the pairs, and ``all_converged`` is then false.

    Args:
        op: the operator (``HessianOperator``, ``GGNOperator``, anything with ``num_params``,
            ``dtype``, ``device`` and ``matmat`` on ``[P, S]`` columns).
        k: number of eigenpairs, ``1 <= k <= P``.
        tol: relative residual at which a pair counts as converged (default 1e-6; the eigenvalue
            error is then at most ``tol * ||H||`` and, away from other eigenvalues, about
            ``tol**2 * ||H||**2 / gap``: see ``EigenResult.error_bounds``).
        which: ``"largest"`` (algebraically largest first) or ``"smallest"`` (smallest first).
        v0: warm start: a vector ``(P,)`` or a block ``(b, P)``; its rows are the first block of the
            iteration. Previous eigenvectors as a block certify in b products if they are still exact;
            after the operator changed, their sum as one vector usually takes fewer products.
        max_matvecs: cap on products (default ``min(P, 20 k + 100)``, and never less than the size
            of the first block).
        seed: seed of the random start and of fresh directions (a private ``torch.Generator``; the
            global RNG is not touched).
        basis_dtype: dtype of the basis (default float64; float32 halves its memory, and with
            float32 products costs no accuracy above their rounding floor).
        basis_device: device of the basis (default the operator's; ``"cpu"`` keeps it off the GPU
            for a transfer of the products).
        max_basis: basis capacity c in vectors: the basis then takes at most ``c P`` numbers whatever
            the number of products, and thick restarts keep it there (:func:`lean_max_basis` is a good
            choice for large models). At least ``k + 2``; a warm-start block is cut to
            ``(c - k) // 2`` rows. Default ``None``: no restart; the basis grows with the products
            (doubling its storage when full), which converges in the fewest products. Each check of
            ``verify`` that starts while a block pends sets that block aside: ``b P`` numbers more
            (one vector from a one-vector start) until the call returns.
        verify: check from fresh random directions that no eigenvalue beyond the k-th was missed
            (copies of repeated eigenvalues, eigenvectors a warm start is orthogonal to; see above).
            ``False`` saves those products for callers that check otherwise (the callback checks
            with its density run, whose Lanczos probes are random and deflate the k pairs); the
            pairs are then still certified, but a missed copy goes unnoticed.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: if ``k``, ``tol``, ``max_matvecs`` or ``max_basis`` is out of range, ``which``
            is unknown, or ``v0`` has the wrong length.
        NonFiniteError: if a product is not finite.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> result = top_eigenvalues(DiagonalOperator([4.0, 3.0, 2.0, 1.0]), k=2)
        >>> result.eigenvalues.round(decimals=8), result.all_converged
        (tensor([4., 3.], dtype=torch.float64), True)
    """
    started = time.perf_counter()
    num_params = op.num_params
    k = check_count("k", k)
    if k > num_params:
        raise ValueError(f"k={k!r} must be an integer between 1 and the number of parameters ({num_params})")
    tol = check_fraction("tol", tol)
    check_choice("which", which, ("largest", "smallest"))
    cap = min(num_params, 20 * k + 100) if max_matvecs is None else check_count("max_matvecs", max_matvecs, minimum=k)
    bounded = max_basis is not None
    limit = max(1, (check_count("max_basis", max_basis, minimum=k + 2) - k) // 2) if bounded else k
    space = VectorSpace(op)
    generator = space.generator(seed)
    dtype = torch.float64 if basis_dtype is None else basis_dtype
    start = _start_block(v0, space, generator, limit, dtype)
    cold = v0 is None
    del v0  # the start block is a copy: the caller's vectors need not stay alive through the products
    cap = max(cap, start.shape[0])
    # Rows: the basis (at most P vectors), the pending block and its products.
    capacity = min(max_basis, num_params + 2 * limit) if bounded else min(cap, num_params) + 2 * start.shape[0] + 1
    device = torch.device(basis_device) if basis_device is not None else op.device
    solver = _KrylovSchur(op, start, capacity=capacity, dtype=dtype, device=device, generator=generator,
                          space=space)
    del start  # copied into the basis
    check: _MissedCheck | None = None
    checked = False  # whether the last check (or the whole space, or k = 1's random start) rules out a miss
    while True:
        solver.step()
        values, _, krylov, rounding = solver.ritz()
        scale = _norm_estimate(values)
        wanted = _wanted(values, k, which)
        floor = _FLOOR_ROUNDINGS * math.sqrt(solver.num_matvecs) * solver.unit_roundoff * scale
        settled = (np.hypot(krylov, rounding) <= tol * scale) | ((krylov < _FLOOR_FRACTION * rounding)
                                                                 & (rounding <= floor))
        if check is not None and check.found(values):
            check = None  # an eigenvalue the locked pairs missed: converge it, then check again
        if wanted.size == k and bool(settled[wanted].all()):
            if check is not None and check.done(solver.fresh_best(which), max(tol * scale, floor)):
                checked = True
                break
            if check is None:
                invariant = solver.b == 0 or bool(settled.all())
                if not verify or solver.n >= num_params or (k == 1 and cold and not invariant):
                    checked = True  # the whole space, or k = 1 from a random start (unused without verify)
                    break
                check = _MissedCheck(values, wanted, which, tol * scale)
                if bounded:  # lock the k pairs: the rest of the basis is the fresh part's
                    solver.keep(np.sort(wanted))
                solver.explore()
        if solver.b == 0:  # invariant, but the wanted pairs are not all there yet
            if solver.n >= num_params:
                checked = True
                break
            solver.explore()
        if solver.num_matvecs + solver.b > cap:
            break
        if solver.n + 2 * solver.b > capacity:
            solver.restart(max(k, k + (capacity - 2 * solver.b - k) // 2), which)
    values, vectors, krylov, rounding = solver.ritz()
    scale = _norm_estimate(values)
    absolute = np.hypot(krylov, rounding)
    wanted = _wanted(values, min(k, values.size), which)
    residuals = torch.from_numpy(absolute[wanted] / scale)
    return EigenResult(
        eigenvalues=torch.from_numpy(values[wanted].copy()),
        eigenvectors=solver.eigenvectors(vectors[:, wanted]),
        residuals=residuals,
        converged=residuals <= tol,
        num_matvecs=solver.num_matvecs,
        seconds=time.perf_counter() - started,
        which=which,
        error_bounds=torch.from_numpy(_error_bounds(values, absolute, wanted)),
        checked=checked if verify else None,
    )


def _norm_estimate(values: np.ndarray) -> float:
    """``||H||`` estimated by the largest absolute Ritz value (never zero)."""
    return max(float(np.abs(values).max()), np.finfo(np.float64).tiny)


class _MissedCheck:
    """A check for eigenvalues beyond theta_k that the converged pairs missed.

    It counts the Ritz values beyond ``theta_k + margin`` (below ``theta_k - margin`` for
    ``"smallest"``) when it starts; by Cauchy interlacing, more of them later means the operator has
    more eigenvalues there than the pairs found. It is done once the fresh part's best Ritz pair has
    converged, or, after ``_CHECK_STEPS`` steps, has settled on an eigenvalue short of theta_k: its
    residual is within ``_CHECK_SEPARATION`` of its distance to theta_k.
    """

    def __init__(self, values: np.ndarray, wanted: np.ndarray, which: Which, margin: float) -> None:
        self.sign = 1.0 if which == "largest" else -1.0
        self.theta = self.sign * float(values[wanted[-1]])
        self.edge = self.theta + margin
        self.count = self._beyond(values)

    def done(self, best: tuple[float, float, int] | None, limit: float) -> bool:
        """Whether the fresh part's best pair ``(value, absolute residual, steps)`` ends the check;
        ``limit`` is the residual at which a pair counts as converged."""
        if best is None:
            return False
        value, residual, steps = best
        separated = steps >= _CHECK_STEPS and residual <= _CHECK_SEPARATION * (self.theta - self.sign * value)
        return residual <= limit or separated

    def _beyond(self, values: np.ndarray) -> int:
        return int((self.sign * values > self.edge).sum())

    def found(self, values: np.ndarray) -> bool:
        """Whether the Ritz values ``values`` hold more beyond theta_k than when the check started."""
        return self._beyond(values) > self.count


def _error_bounds(values: np.ndarray, residuals: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``min(r, r**2 / gap)`` per wanted Ritz value, the gap being the distance to the other Ritz values
    minus their own residuals (zero gap: the residual alone)."""
    bounds = []
    for index in wanted:
        others = np.delete(np.arange(values.size), index)
        gap = float(np.min(np.abs(values[others] - values[index]) - residuals[others])) if others.size else 0.0
        r = float(residuals[index])
        bounds.append(min(r, r * r / gap) if gap > 0 else r)
    return np.asarray(bounds)
