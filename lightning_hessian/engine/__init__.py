"""The curvature engine: pure PyTorch numerics, no Lightning."""

from lightning_hessian.engine.density import SpectralDensity, spectral_density
from lightning_hessian.engine.errors import NonFiniteError
from lightning_hessian.engine.exact import dense_ggn, dense_hessian
from lightning_hessian.engine.lanczos import EigenResult, top_eigenvalues
from lightning_hessian.engine.operators import CurvatureOperator, GGNOperator, HessianOperator
from lightning_hessian.engine.spectrum import SpectrumSummary, outlier_gap, summarize

__all__ = [
    "CurvatureOperator",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "NonFiniteError",
    "SpectralDensity",
    "SpectrumSummary",
    "dense_ggn",
    "dense_hessian",
    "outlier_gap",
    "spectral_density",
    "summarize",
    "top_eigenvalues",
]
