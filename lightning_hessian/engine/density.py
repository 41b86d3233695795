"""Stochastic Lanczos quadrature (SLQ): the spectral density of a curvature operator.

Symbols: P parameters, S probe vectors, m Lanczos steps, G grid points.

For a unit probe v, m Lanczos steps give a tridiagonal T whose eigenvalues (nodes) and squared
first eigenvector components (weights) form the m-point Gauss quadrature of the measure
``sum_i (v . u_i)^2 delta(t - lambda_i)``; with v uniform on the sphere its expectation is the
spectral density ``(1/P) sum_i delta(t - lambda_i)``. Averaging S probes estimates it
(Lin, Saad and Yang 2016, section 4; Ghorbani, Krishnan and Xiao 2019). Probes are normalized
Rademacher vectors from a dedicated, seeded generator, and the S recursions run side by side: one
pass over the data multiplies all S vectors.

The trace is the Hutchinson estimate ``z^T H z = ||z||^2 T[0, 0]`` per Rademacher probe z, which is
exact in expectation for any m; its standard error is the sample standard deviation over probes /
sqrt(S).

Eigenpairs known exactly (``deflate=``, e.g. the result of ``top_eigenvalues``) are deflated: the
probes and the operator are projected onto their orthogonal complement, SLQ estimates the remaining
``P - k`` eigenvalues, and the k outliers enter as point masses of ``1/P`` at their eigenvalues (and
exactly in the trace). The outliers are where most of a trained network's spectral range and most of
the estimate's variance sit: on the benchmarks' mixture MLP, deflating the top 10 made 10 probes x 40
steps (about 430 products with the top-10's) as accurate in Wasserstein distance as 10 x 80 without, and
its error varied a tenth as much from seed to seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.engine.checks import check_count
from lightning_hessian.engine.eigen import EigenResult
from lightning_hessian.engine.lanczos import Lanczos, tridiagonal_quadrature
from lightning_hessian.engine.linear_operator import LinearOperator, rademacher
from lightning_hessian.engine.vectors import VectorSpace

# Default kernel width as a fraction of the spectral range (largest minus smallest node): wide
# enough that an 80-step quadrature reads as a smooth curve, narrow enough to separate outliers
# that are a few percent of lambda_max apart.
DEFAULT_SIGMA_FRACTION = 0.01


@dataclass(frozen=True)
class SpectralDensity:
    """An SLQ estimate of the spectral density, kept as raw quadrature nodes and weights.

    Attributes:
        nodes: ``(S, m + k)`` float64 Ritz values per probe, ascending, with the k deflated
            deflated eigenvalues among them (k = 0 without ``deflate``).
        weights: ``(S, m + k)`` float64 quadrature weights per probe, each row summing to 1 (with
            ``deflate``: each deflated eigenvalue weighs ``1/P`` and the rest of a row ``(P - k)/P`` times the
            probe's share ``||(I - V V^T) z||^2 / mean``, so the rows average to 1).
        trace: Hutchinson estimate of ``tr(H)``.
        trace_stderr: its standard error (0 with one probe).
        num_params: P, so that ``weights * P`` counts eigenvalues.
        num_matvecs: operator products used (S m; not counting those that found the outliers).
        seconds: wall time of the call.
        deflated: ``(k,)`` float64, the eigenvalues placed exactly (``deflate``), descending; ``None``
            without deflation.
        deflated_mask: ``(S, m + k)`` bool, true where ``nodes`` holds one of them; ``None`` without
            deflation. ``~deflated_mask`` selects the SLQ estimate of the rest (the bulk).

    Example:
        >>> density = SpectralDensity(  # one probe: 3 of the P = 4 eigenvalues at 0, one at 2
        ...     nodes=torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.75, 0.25]], dtype=torch.float64),
        ...     trace=2.0, trace_stderr=0.0, num_params=4, num_matvecs=2, seconds=0.0,
        ... )
        >>> density.range, density.mass(1.0, 3.0), (density.weights * density.num_params).tolist()
        ((0.0, 2.0), 0.25, [[3.0, 1.0]])
        >>> grid = density.grid()
        >>> round(float(torch.trapezoid(density.density(grid), grid)), 2)  # smoothed, it integrates to 1
        1.0
    """

    nodes: Tensor
    weights: Tensor
    trace: float
    trace_stderr: float
    num_params: int
    num_matvecs: int
    seconds: float
    deflated: Tensor | None = None
    deflated_mask: Tensor | None = None

    def __eq__(self, other: object) -> bool:
        """Equal fields, tensors compared by shape, dtype and values."""
        if not isinstance(other, SpectralDensity):
            return NotImplemented
        return all(_same_field(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    def __hash__(self) -> int:
        return hash((self.trace, self.num_params, self.num_matvecs))

    @property
    def range(self) -> tuple[float, float]:
        """Smallest and largest node over all probes."""
        return float(self.nodes.min()), float(self.nodes.max())

    def default_sigma(self) -> float:
        """Kernel width used when none is given: ``DEFAULT_SIGMA_FRACTION`` of the node range."""
        low, high = self.range
        return DEFAULT_SIGMA_FRACTION * max(high - low, abs(high), 1e-12)

    def grid(self, num_points: int = 1000, sigma: float | None = None) -> Tensor:
        """``(G,)`` evenly spaced points covering the nodes plus three kernel widths each side."""
        sigma = self.default_sigma() if sigma is None else sigma
        low, high = self.range
        return torch.linspace(low - 3 * sigma, high + 3 * sigma, num_points, dtype=torch.float64)

    def density(self, grid: Tensor | None = None, sigma: float | None = None) -> Tensor:
        """The density smoothed with a Gaussian kernel, averaged over probes.

        Args:
            grid: ``(G,)`` points (default :meth:`grid`).
            sigma: kernel standard deviation in eigenvalue units (default :meth:`default_sigma`,
                1% of the spectral range).

        Returns:
            ``(G,)`` float64 values of ``sum_k w_k N(t; theta_k, sigma^2)`` averaged over probes;
            it integrates to 1 over the real line.
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma={sigma!r} must be positive")
        grid = self.grid(sigma=sigma) if grid is None else grid.to(torch.float64)
        z = (grid[None, None, :] - self.nodes[:, :, None]) / sigma
        kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights[:, :, None] * kernel).sum(dim=1).mean(dim=0)

    def mass(self, low: float = -math.inf, high: float = math.inf) -> float:
        """Fraction of the spectrum (unsmoothed quadrature) in ``[low, high)``, averaged over probes."""
        inside = (self.nodes >= low) & (self.nodes < high)
        return float((self.weights * inside).sum(dim=1).mean())


def default_num_probes(num_params: int) -> int:
    """SLQ probes used when none are given: 4 below 10,000 parameters, 2 below 100,000, then 1.

    One probe's quadrature concentrates around the density as P grows (the variance of the quadratic
    form ``z^T f(H) z / P`` falls like 1/P), and at the step counts a monitor can afford the error is
    the quadrature's more than the probes': on the benchmarks' trained networks, with 32 steps and the
    top 5 deflated, 8 probes instead of 1 lowered the Wasserstein error by 1.3x to 1.8x at every size
    (1,930 to 252,950 parameters, ``benchmarks/RESULTS-probes.md``). A few probes on small models,
    where they are cheap, also give the trace a standard error.

    Example:
        >>> default_num_probes(2_000), default_num_probes(50_000), default_num_probes(14_600_000)
        (4, 2, 1)
    """
    return 4 if num_params < 10_000 else 2 if num_params < 100_000 else 1


def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int | None = None,
    num_steps: int = 80,
    seed: int = 0,
    probes_per_pass: int | None = None,
    reorthogonalize: bool = False,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    deflate: EigenResult | None = None,
) -> SpectralDensity:
    """Estimate the spectral density and trace of ``op`` by stochastic Lanczos quadrature.

    Args:
        op: the operator.
        num_probes: S, the number of random probe vectors (default :func:`default_num_probes`: 4, 2
            or 1 as P passes 10,000 and 100,000).
        num_steps: m, Lanczos steps per probe (default 80, as Ghorbani et al.); capped at P - k.
        seed: seed of the probes' private ``torch.Generator`` (the global RNG is untouched).
        probes_per_pass: probes multiplied together in one pass over the data (default all S).
        reorthogonalize: keep each probe's basis orthogonal (``S (m + 1) P`` numbers) instead of the
            plain recurrence (about 3 P numbers per probe); see
            :mod:`~lightning_hessian.engine.lanczos` for why the plain one suffices for a density.
        basis_dtype: dtype of the Lanczos vectors (default: the operator's dtype, float64 with
            ``reorthogonalize``; T is always float64).
        basis_device: device of the Lanczos vectors (default the operator's).
        deflate: converged eigenpairs of ``op`` to place exactly instead of estimating them,
            typically ``top_eigenvalues(op, k)`` (see the module docstring); their products are
            not counted in ``num_matvecs``.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: if ``num_probes``, ``num_steps`` or ``probes_per_pass`` is below 1, or ``deflate``
            does not fit ``op`` or has unconverged pairs.
        NonFiniteError: if a product is not finite.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> density = spectral_density(DiagonalOperator([0.0] * 8 + [1.0, 5.0]), num_probes=20, num_steps=10)
        >>> round(density.mass(-0.1, 0.1), 1), round(density.trace, 0)
        (0.8, 6.0)
    """
    started = time.perf_counter()
    num_params = op.num_params
    num_probes = check_count("num_probes", default_num_probes(num_params) if num_probes is None else num_probes)
    num_steps = check_count("num_steps", num_steps)
    per_pass = check_count("probes_per_pass", num_probes if probes_per_pass is None else probes_per_pass)
    dtype = basis_dtype or (torch.float64 if reorthogonalize else op.dtype)
    space = VectorSpace(op)
    generator = space.generator(seed)
    probes = rademacher((num_probes, space.length), generator, dtype)
    exact = torch.zeros(0, dtype=torch.float64)
    # ||z||^2 per probe, of the part that deflation leaves: ||z||^2 - ||V z||^2 (all P without it). A
    # probe's measure counts in proportion (the ratio estimator: a probe almost inside the deflated
    # space carries almost nothing), and its Hutchinson term is z^T (I - V V^T) H (I - V V^T) z =
    # ||.||^2 T[0, 0].
    squared = torch.full((num_probes,), float(num_params), dtype=torch.float64)
    vectors = None
    if deflate is not None:
        exact = _check_deflated(deflate, num_params, space.length)
        vectors = deflate.eigenvectors.to(device=probes.device, dtype=dtype)
        squared = (squared - space.reduce(probes @ vectors.T).double().pow(2).sum(dim=1)).clamp_min(0)
    shares = squared / squared.mean()
    steps = min(num_steps, num_params - exact.numel())
    nodes, weights, diagonals = [], [], []
    for group in probes.split(per_pass):
        lanczos = Lanczos(op, group, generator=generator, reorthogonalize=reorthogonalize, basis_dtype=dtype,
                          basis_device=basis_device, capacity=steps, deflate=vectors)
        for _ in range(steps):
            lanczos.step()
        group_nodes, group_weights = tridiagonal_quadrature(lanczos)
        nodes.append(group_nodes)
        weights.append(group_weights)
        diagonals.append(lanczos.alphas[:, 0])
    estimates = torch.cat(diagonals) * squared + exact.sum()
    stderr = float(estimates.std() / math.sqrt(num_probes)) if num_probes > 1 else 0.0
    all_nodes, all_weights, placed = _with_outliers(torch.cat(nodes), torch.cat(weights) * shares[:, None], exact,
                                                    num_params)
    return SpectralDensity(
        nodes=all_nodes,
        weights=all_weights,
        trace=float(estimates.mean()),
        trace_stderr=stderr,
        num_params=num_params,
        num_matvecs=num_probes * steps,
        seconds=time.perf_counter() - started,
        deflated=exact if exact.numel() else None,
        deflated_mask=placed,
    )


def _check_deflated(deflate: EigenResult, num_params: int, length: int) -> Tensor:
    """The deflated eigenvalues ``(k,)`` float64, after checking that they fit (``length`` entries per
    vector held here) and converged."""
    shape = tuple(deflate.eigenvectors.shape)
    if len(shape) != 2 or shape[1] != length or not 1 <= shape[0] < num_params:
        raise ValueError(f"deflate has eigenvectors of shape {shape}; they must be (k, {length}) with "
                         f"1 <= k < {num_params}, e.g. top_eigenvalues(op, k) of the same operator")
    if not bool(deflate.converged.all()):
        raise ValueError("deflate has unconverged eigenpairs; deflating them would distort the density: "
                         "raise max_matvecs in top_eigenvalues or pass only converged pairs")
    return deflate.eigenvalues.to(torch.float64).cpu()


def _with_outliers(nodes: Tensor, weights: Tensor, exact: Tensor,
                   num_params: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-probe measures ``(S, m)`` of the deflated operator rescaled to ``(P - k)/P``, with the k
    exact eigenvalues added at ``1/P`` each: ``(S, m + k)``, sorted by node, and where those k sit
    (``(S, m + k)`` bool; ``None`` without them)."""
    if exact.numel() == 0:
        return nodes, weights, None
    num_probes, count = nodes.shape[0], exact.numel()
    nodes = torch.cat([nodes, exact.expand(num_probes, count)], dim=1)
    weights = torch.cat([weights * (num_params - count) / num_params,
                         torch.full((num_probes, count), 1 / num_params, dtype=weights.dtype)], dim=1)
    order = nodes.argsort(dim=1)
    return nodes.gather(1, order), weights.gather(1, order), order >= nodes.shape[1] - count


def _same_field(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    return bool(a == b)
