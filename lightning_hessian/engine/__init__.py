"""The curvature engine: pure PyTorch numerics, no Lightning.

Operators (:class:`HessianOperator`, :class:`GGNOperator`) multiply flat vectors with a curvature
matrix averaged over samples; solvers read it (:func:`top_eigenvalues`, :func:`spectral_density`,
:func:`summarize`); dense matrices serve small models and the tests (:func:`dense_hessian`,
:func:`dense_ggn`); :func:`class_structure` splits the Gauss-Newton matrix by classes.
"""

from lightning_hessian.engine.class_structure import ClassStructure, class_structure
from lightning_hessian.engine.density import SpectralDensity, spectral_density
from lightning_hessian.engine.eigen import EigenResult, top_eigenvalues
from lightning_hessian.engine.errors import NonFiniteError, NonSmoothError, UnsupportedError
from lightning_hessian.engine.exact import dense_ggn, dense_hessian
from lightning_hessian.engine.operators import CurvatureOperator, GGNOperator, HessianOperator
from lightning_hessian.engine.snapshot import ModelSnapshot
from lightning_hessian.engine.spectrum import SpectrumSummary, outlier_gap, summarize

__all__ = [
    # operators
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "ModelSnapshot",
    # solvers and their results
    "EigenResult",
    "NonFiniteError",
    "NonSmoothError",
    "UnsupportedError",
    "SpectralDensity",
    "SpectrumSummary",
    "outlier_gap",
    "spectral_density",
    "summarize",
    "top_eigenvalues",
    # dense matrices and class structure
    "ClassStructure",
    "class_structure",
    "dense_ggn",
    "dense_hessian",
]
