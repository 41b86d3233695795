"""Stochastic Lanczos quadrature (SLQ): the spectral density of a curvature operator.

Symbols: P parameters, S probe vectors, m Lanczos steps, G grid points.

For a unit probe v, m Lanczos steps give a tridiagonal T whose eigenvalues (nodes) and squared
first eigenvector components (weights) form the m-point Gauss quadrature of the measure
``sum_i (v . u_i)^2 delta(t - lambda_i)``; with v uniform on the sphere its expectation is the
spectral density ``(1/P) sum_i delta(t - lambda_i)``. Averaging S probes estimates it
(Lin, Saad and Yang 2016, section 4; Ghorbani, Krishnan and Xiao 2019). Probes are normalized
Rademacher vectors from a dedicated, seeded generator, and the S recursions run side by side: one
pass over the data multiplies all S vectors.

The trace is the Hutchinson estimate ``P v^T H v = P T[0, 0]`` per probe, which is exact in
expectation for any m; its standard error is the sample standard deviation over probes / sqrt(S).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.engine.lanczos import Lanczos, LinearOperator, rademacher, tridiagonal_quadrature

# Default kernel width as a fraction of the spectral range (largest minus smallest node): wide
# enough that an 80-step quadrature reads as a smooth curve, narrow enough to separate outliers
# that are a few percent of lambda_max apart.
DEFAULT_SIGMA_FRACTION = 0.01


@dataclass(frozen=True)
class SpectralDensity:
    """An SLQ estimate of the spectral density, kept as raw quadrature nodes and weights.

    Attributes:
        nodes: ``(S, m)`` float64 Ritz values per probe, ascending.
        weights: ``(S, m)`` float64 quadrature weights per probe, each row summing to 1.
        trace: Hutchinson estimate of ``tr(H)``.
        trace_stderr: its standard error (0 with one probe).
        num_params: P, so that ``weights * P`` counts eigenvalues.
        num_matvecs: operator products used (S m).
        seconds: wall time of the call.
    """

    nodes: Tensor
    weights: Tensor
    trace: float
    trace_stderr: float
    num_params: int
    num_matvecs: int
    seconds: float

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


def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    seed: int = 0,
    probes_per_pass: int | None = None,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
) -> SpectralDensity:
    """Estimate the spectral density and trace of ``op`` by stochastic Lanczos quadrature.

    Args:
        op: the operator.
        num_probes: S, the number of random probe vectors (default 10, as Ghorbani et al.).
        num_steps: m, Lanczos steps per probe (default 80, as Ghorbani et al.); capped at P.
        seed: seed of the probes' private ``torch.Generator`` (the global RNG is untouched).
        probes_per_pass: probes multiplied together in one pass over the data (default all S);
            lower it when S bases of ``m * P`` numbers do not fit in memory.
        basis_dtype: dtype of the Lanczos bases (float64 by default; T is always float64).
        basis_device: device of the bases (default the operator's).

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: if ``num_probes`` or ``num_steps`` is below 1.
        NonFiniteError: if a product is not finite.
    """
    started = time.perf_counter()
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    per_pass = num_probes if probes_per_pass is None else probes_per_pass
    if not isinstance(per_pass, int) or per_pass < 1:
        raise ValueError(f"probes_per_pass={probes_per_pass!r} must be a positive integer")
    num_params = op.num_params
    steps = min(num_steps, num_params)
    generator = torch.Generator().manual_seed(seed)
    probes = rademacher((num_probes, num_params), generator, basis_dtype)
    nodes, weights, diagonals = [], [], []
    for group in probes.split(per_pass):
        lanczos = Lanczos(op, group, generator=generator, basis_dtype=basis_dtype, basis_device=basis_device,
                          capacity=steps)
        for _ in range(steps):
            lanczos.step()
        group_nodes, group_weights = tridiagonal_quadrature(lanczos)
        nodes.append(group_nodes)
        weights.append(group_weights)
        diagonals.append(lanczos.alphas[:, 0])
    estimates = torch.cat(diagonals) * num_params
    stderr = float(estimates.std() / math.sqrt(num_probes)) if num_probes > 1 else 0.0
    return SpectralDensity(
        nodes=torch.cat(nodes),
        weights=torch.cat(weights),
        trace=float(estimates.mean()),
        trace_stderr=stderr,
        num_params=num_params,
        num_matvecs=num_probes * steps,
        seconds=time.perf_counter() - started,
    )
