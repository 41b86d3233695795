"""Lanczos recursions for stochastic Lanczos quadrature: S probes side by side, their tridiagonal matrices.

Symbols: P parameters (``op.num_params``), S recursions run side by side (one product with S vectors
per step), m Lanczos steps.

Each recursion runs the three-term recurrence ``beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``
from its probe; the eigenvalues of the tridiagonal matrix T and the squared first components of its
eigenvectors are the nodes and weights of the m-point Gauss quadrature of the probe's spectral measure.

Reorthogonalization. By default the recursions keep only their last two vectors (a few numbers per
parameter). The vectors then lose orthogonality once Ritz values converge, and T acquires copies
("ghosts") of converged eigenvalues; for quadrature that is harmless: the copies split the weight of
the eigenvalue they copy, and the quadrature of smooth functions stays as accurate as in exact
arithmetic (Druskin and Knizhnerman, Numer. Linear Algebra Appl. 2, 1995; Musco, Musco and Sidford,
SODA 2018), which is what the density is. Top eigenvalues are another matter: ghosts would pass
for eigenvalues, which is why :func:`~lightning_hessian.engine.eigen.top_eigenvalues` keeps its
basis orthogonal. ``reorthogonalize=True`` stores the whole basis, ``S (m + 1) P`` numbers, and
orthogonalizes every new vector against it (a second Gram-Schmidt pass where the first cancelled
much of the vector): the reference that the tests and benchmarks compare with.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from lightning_hessian.engine.linear_operator import LinearOperator
from lightning_hessian.engine.vectors import VectorSpace

# A new Lanczos vector whose norm falls below this fraction of the operator's scale means the
# Krylov space is invariant: the recursion continues from a fresh random direction with beta = 0.
_BREAKDOWN_FRACTION = 1e-10
# A second Gram-Schmidt pass runs where the first shrank the vector below 1/sqrt(2) of its norm.
_REORTHOGONALIZE_AGAIN = 2**-0.5


class Lanczos:
    """S Lanczos recursions run side by side, with or without a stored, orthogonal basis.

    Args:
        op: the operator.
        start: ``(S, P)`` start vectors (normalized here).
        generator: source of random directions after a breakdown.
        reorthogonalize: store the basis and orthogonalize every new vector against it (see the
            module docstring); default ``False``: two vectors per recursion.
        basis_dtype: dtype of the vectors (default float64).
        basis_device: where the vectors live (default the operator's device).
        capacity: steps to allocate the stored basis for (with ``reorthogonalize``); it doubles
            when more are taken.
        deflate: ``(k, P)`` orthonormal vectors, e.g. known eigenvectors, that the recursions are
            kept orthogonal to: they then run on H restricted to their complement.

    Attributes:
        num_steps: m, the steps taken.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> lanczos = Lanczos(DiagonalOperator([3.0, 1.0]), torch.ones(1, 2), generator=torch.Generator())
        >>> lanczos.step(); lanczos.step()
        >>> tridiagonal_quadrature(lanczos)[0].round(decimals=6)  # two steps span the space: the eigenvalues
        tensor([[1., 3.]], dtype=torch.float64)
    """

    def __init__(
        self,
        op: LinearOperator,
        start: Tensor,
        *,
        generator: torch.Generator,
        reorthogonalize: bool = False,
        basis_dtype: torch.dtype = torch.float64,
        basis_device: torch.device | str | None = None,
        capacity: int | None = None,
        deflate: Tensor | None = None,
    ) -> None:
        self.op = op
        self.space = space = VectorSpace(op)
        self.generator = generator
        self.reorthogonalize = reorthogonalize
        self.basis_device = torch.device(basis_device) if basis_device is not None else op.device
        self.basis_dtype = basis_dtype
        start = start.to(device=self.basis_device, dtype=basis_dtype)
        norms = space.norm(start, dim=1, keepdim=True)
        if not torch.all(norms > 0):
            raise ValueError("start vectors must be non-zero")
        self._deflate = None if deflate is None else deflate.to(device=self.basis_device, dtype=basis_dtype)
        num_recursions = start.shape[0]
        self.num_steps = 0
        columns = min((capacity or 16) + 1, op.num_params) if reorthogonalize else 2
        self._vectors = torch.empty(num_recursions, columns, space.length, dtype=basis_dtype,
                                    device=self.basis_device)
        start = self._deflated(start)
        kept = space.norm(start, dim=1, keepdim=True)
        # A start that lies (almost) in the deflated space carries no direction: a random one replaces it.
        lost = kept[:, 0] <= math.sqrt(torch.finfo(basis_dtype).eps) * norms[:, 0]
        self._vectors[:, 0] = start / kept.clamp_min(torch.finfo(basis_dtype).tiny)
        if lost.any():
            self._vectors[:, 0] = torch.where(lost[:, None], self._fresh_direction(), self._vectors[:, 0])
        self._alpha: list[np.ndarray] = []
        self._beta: list[np.ndarray] = []
        self._last_beta = torch.zeros(num_recursions, dtype=basis_dtype, device=self.basis_device)
        self._scale = np.zeros(num_recursions)

    def _column(self, step: int) -> int:
        """Where the vector of ``step`` is stored: its own column, or one of two in turn."""
        return step if self.reorthogonalize else step % 2

    @property
    def basis(self) -> Tensor:
        """``(S, m, P)``: the Lanczos vectors of the steps taken (only with ``reorthogonalize``)."""
        if not self.reorthogonalize:
            raise AttributeError("the basis is stored only with reorthogonalize=True")
        return self._vectors[:, : self.num_steps]

    @property
    def alphas(self) -> Tensor:
        """``(S, m)`` float64 diagonals of the tridiagonal matrices."""
        return torch.from_numpy(np.stack(self._alpha, axis=1)) if self._alpha else torch.zeros(0, 0)

    @property
    def betas(self) -> Tensor:
        """``(S, m)`` float64 off-diagonals; entry j joins steps j and j + 1 (the last one is the norm
        of the residual vector, which is not part of T)."""
        return torch.from_numpy(np.stack(self._beta, axis=1)) if self._beta else torch.zeros(0, 0)

    def step(self) -> None:
        """One Lanczos step for every recursion: one product with S vectors."""
        j = self.num_steps
        if self.reorthogonalize and j + 1 >= self._vectors.shape[1] and j + 1 < self.op.num_params:
            self._grow()
        current = self._vectors[:, self._column(j)]
        product = self.op.matmat(current.to(device=self.op.device, dtype=self.op.dtype).T).T
        w = product.to(device=self.basis_device, dtype=self.basis_dtype)
        alpha = self.space.reduce(torch.linalg.vecdot(current, w))
        w = torch.addcmul(w, alpha[:, None], current, value=-1)
        if j > 0:
            w = torch.addcmul(w, self._last_beta[:, None], self._vectors[:, self._column(j - 1)], value=-1)
        w = self._deflated(w)
        if self.reorthogonalize:
            w = self._orthogonalized(w, j + 1)
        beta = torch.linalg.vector_norm(w, dim=1) if not self.space.split else self.space.norm(w, dim=1)
        alpha_host, beta_host = torch.stack([alpha, beta]).to(device="cpu", dtype=torch.float64).numpy()
        self._scale = np.maximum(self._scale, np.abs(alpha_host) + beta_host)
        broken = beta_host <= _BREAKDOWN_FRACTION * np.maximum(self._scale, np.finfo(np.float64).tiny)
        self.num_steps = j + 1
        self._alpha.append(alpha_host)
        self._beta.append(np.where(broken, 0.0, beta_host))
        if j + 1 >= self.op.num_params:
            return
        if broken.any():
            fresh = torch.from_numpy(broken).to(self.basis_device)[:, None]
            w = torch.where(fresh, self._fresh_direction(), w / beta.clamp_min(1e-300)[:, None])
            beta = torch.where(fresh[:, 0], torch.zeros_like(beta), beta)
        else:
            w = w / beta[:, None]
        self._last_beta = beta
        self._vectors[:, self._column(j + 1)] = w

    def _deflated(self, vectors: Tensor) -> Tensor:
        """``(S, P)`` vectors without their components along the deflated vectors (if any)."""
        if self._deflate is None:
            return vectors
        return vectors - self.space.reduce(vectors @ self._deflate.T) @ self._deflate

    def _orthogonalized(self, w: Tensor, steps: int) -> Tensor:
        """``(S, P)`` new vectors orthogonalized against the first ``steps`` stored ones of their recursion."""
        basis = self._vectors[:, :steps]
        before = self.space.norm(w, dim=1)
        w = w - torch.einsum("smp,sm->sp", basis, self._coefficients(basis, w))
        if bool((self.space.norm(w, dim=1) < _REORTHOGONALIZE_AGAIN * before).any()):
            w = w - torch.einsum("smp,sm->sp", basis, self._coefficients(basis, w))
        return self._deflated(w)

    def _coefficients(self, basis: Tensor, w: Tensor) -> Tensor:
        """``(S, m)`` inner products of each recursion's new vector with its ``(S, m, P)`` stored ones."""
        return self.space.reduce(torch.einsum("smp,sp->sm", basis, w))

    def _grow(self) -> None:
        """Double the stored basis (at most P columns)."""
        steps, columns = self.num_steps + 1, self._vectors.shape[1]
        extra = min(columns, self.op.num_params - columns)
        grown = torch.empty(self._vectors.shape[0], columns + extra, self._vectors.shape[2], dtype=self.basis_dtype,
                            device=self.basis_device)
        grown[:, :steps] = self._vectors[:, :steps]
        self._vectors = grown

    def _fresh_direction(self) -> Tensor:
        """Random unit vectors ``(S, P)`` orthogonal to the deflated space and to the stored vectors."""
        shape = (self._vectors.shape[0], self.space.length)
        w = torch.randn(shape, generator=self.generator, dtype=self.basis_dtype).to(self.basis_device)
        steps = range(max(0, self.num_steps - (self._vectors.shape[1] if not self.reorthogonalize else self.num_steps)),
                      self.num_steps)  # the vectors written so far (the last two without a stored basis)
        stored = self._vectors[:, [self._column(step) for step in steps]]
        for _ in range(2):
            w = self._deflated(w - torch.einsum("smp,sm->sp", stored, self._coefficients(stored, w)))
        return w / self.space.norm(w, dim=1, keepdim=True)

    def tridiagonal(self, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal ``(m,)`` and off-diagonal ``(m - 1,)`` of the tridiagonal matrix T of recursion ``index``."""
        return self.alphas[index].numpy(), self.betas[index, :-1].numpy()


def tridiagonal_quadrature(lanczos: Lanczos) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of every recursion: eigenvalues of T and the squared first
    components of its eigenvectors, each ``(S, m)``, weights summing to 1 per row.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> lanczos = Lanczos(DiagonalOperator([2.0, 2.0]), torch.ones(1, 2), generator=torch.Generator())
        >>> lanczos.step()
        >>> nodes, weights = tridiagonal_quadrature(lanczos)
        >>> nodes.round(decimals=6), weights
        (tensor([[2.]], dtype=torch.float64), tensor([[1.]], dtype=torch.float64))
    """
    nodes, weights = [], []
    for index in range(lanczos.alphas.shape[0]):
        diagonal, off_diagonal = lanczos.tridiagonal(index)
        if diagonal.shape[0] == 1:
            values, vectors = diagonal.copy(), np.ones((1, 1))
        else:
            values, vectors = scipy.linalg.eigh_tridiagonal(diagonal, off_diagonal)
        nodes.append(values)
        weights.append(vectors[0] ** 2)
    return torch.from_numpy(np.stack(nodes)), torch.from_numpy(np.stack(weights))
