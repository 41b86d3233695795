"""lightning-hessian: watch the Hessian spectrum of a network's loss while it trains."""

from lightning_hessian.callback import HessianSpectrumCallback
from lightning_hessian.engine import (
    CurvatureOperator,
    EigenResult,
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    SpectralDensity,
    SpectrumSummary,
    dense_ggn,
    dense_hessian,
    outlier_gap,
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.class_structure import ClassStructure, class_structure
from lightning_hessian.interpolation import InterpolationResult, linear_interpolation

__version__ = "0.1.0"

__all__ = [
    # callback
    "HessianSpectrumCallback",
    # engine: operators
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    # engine: solvers and results
    "EigenResult",
    "NonFiniteError",
    "SpectralDensity",
    "SpectrumSummary",
    "dense_ggn",
    "dense_hessian",
    "outlier_gap",
    "spectral_density",
    "summarize",
    "top_eigenvalues",
    # engine: class structure (Papyan)
    "ClassStructure",
    "class_structure",
    # post-fit linear interpolation
    "InterpolationResult",
    "linear_interpolation",
]
