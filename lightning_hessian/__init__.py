"""lightning-hessian: watch the Hessian spectrum of a network's loss while it trains.

The package has three wings: :mod:`lightning_hessian.engine` (pure PyTorch numerics, importable
without Lightning), the Lightning face at the top level (the callback, its configuration and
measurements, the loggers, linear interpolation, the command line) and
:mod:`lightning_hessian.paper` (the reproduction of Sagun et al. 2017). The face is imported on
first use, so ``import lightning_hessian.engine`` loads no Lightning module.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_hessian.engine import (
    ClassStructure,
    CurvatureOperator,
    EigenResult,
    GGNOperator,
    HessianOperator,
    ModelSnapshot,
    NonFiniteError,
    SpectralDensity,
    SpectrumSummary,
    class_structure,
    dense_ggn,
    dense_hessian,
    outlier_gap,
    spectral_density,
    summarize,
    top_eigenvalues,
)

__version__ = "0.1.0"

# The Lightning face, imported on first access: name -> module.
_FACE = {
    "HessianSpectrumCallback": "lightning_hessian.callback",
    "CallbackConfig": "lightning_hessian.config",
    "Measurement": "lightning_hessian.measurement",
    "MatrixMeasurement": "lightning_hessian.measurement",
    "HessianLossModule": "lightning_hessian.hooks",
    "GaussNewtonModule": "lightning_hessian.hooks",
    "InterpolationResult": "lightning_hessian.interpolation",
    "linear_interpolation": "lightning_hessian.interpolation",
}

__all__ = [
    # the Lightning face
    "CallbackConfig",
    "GaussNewtonModule",
    "HessianLossModule",
    "HessianSpectrumCallback",
    "InterpolationResult",
    "MatrixMeasurement",
    "Measurement",
    "linear_interpolation",
    # engine: operators
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "ModelSnapshot",
    # engine: solvers and results
    "EigenResult",
    "NonFiniteError",
    "SpectralDensity",
    "SpectrumSummary",
    "outlier_gap",
    "spectral_density",
    "summarize",
    "top_eigenvalues",
    # engine: dense matrices and class structure
    "ClassStructure",
    "class_structure",
    "dense_ggn",
    "dense_hessian",
]


def __getattr__(name: str) -> Any:
    if name in _FACE:
        value = getattr(importlib.import_module(_FACE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_hessian' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
