"""lightning-hessian: watch the Hessian spectrum of a network's loss while it trains.

The package has three wings: :mod:`lightning_hessian.engine` (pure PyTorch numerics, importable
without Lightning), the Lightning face at the top level (the callback, its configuration and
measurements, the loggers, linear interpolation, the command line) and
:mod:`lightning_hessian.paper` (the reproduction of Sagun et al. 2017). The face is imported on
first use, so ``import lightning_hessian.engine`` loads no Lightning module; every name of the engine's
``__all__`` is available here too.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_hessian import engine

__version__ = "0.1.0"

# The Lightning face, imported on first access: name -> module.
_FACE = {
    "HessianSpectrumCallback": "lightning_hessian.callback",
    "CallbackConfig": "lightning_hessian.callback",
    "Measurement": "lightning_hessian.measurement",
    "MatrixMeasurement": "lightning_hessian.measurement",
    "HessianLossModule": "lightning_hessian.callback",
    "GaussNewtonModule": "lightning_hessian.callback",
    "InterpolationResult": "lightning_hessian.interpolation",
    "linear_interpolation": "lightning_hessian.interpolation",
}

__all__ = [*_FACE, *engine.__all__]


def __getattr__(name: str) -> Any:
    if name in _FACE:
        value = getattr(importlib.import_module(_FACE[name]), name)
    elif name in engine.__all__:
        value = getattr(engine, name)
    else:
        raise AttributeError(f"module 'lightning_hessian' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
