"""The Lightning callback and the rooms only it uses.

:class:`HessianSpectrumCallback` (``callback.py``) schedules measurements (``schedule.py``), draws the
probe set (``probes.py``), isolates side effects (``isolation.py``), sums products across DDP ranks
(``distributed.py``), shows progress (``progress.py``) and hands the numeric work to the solver
(``solver.py``); its settings are a :class:`CallbackConfig` (``config.py``), and the methods a module
may define for it are the protocols of ``hooks.py``.
"""

from lightning_hessian.callback.callback import HessianSpectrumCallback
from lightning_hessian.callback.config import CallbackConfig
from lightning_hessian.callback.hooks import GaussNewtonModule, HessianLossModule

__all__ = ["CallbackConfig", "GaussNewtonModule", "HessianLossModule", "HessianSpectrumCallback"]
