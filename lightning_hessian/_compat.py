"""The two namespaces Lightning ships under: ``pytorch_lightning`` and ``lightning.pytorch``.

``pytorch_lightning`` is the declared dependency; the unified ``lightning`` package, when it is
installed too, carries identical classes under ``lightning.pytorch``. A Trainer from either
namespace hands the callback its own strategy and logger objects, so type checks here accept the
classes of both.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

try:
    import lightning.pytorch as lightning_pytorch
except ImportError:  # only pytorch_lightning is installed
    lightning_pytorch = None

CALLBACK_BASES: tuple[type, ...] = (pl.Callback,)
TENSORBOARD_LOGGERS: tuple[type, ...] = (TensorBoardLogger,)
WANDB_LOGGERS: tuple[type, ...] = (WandbLogger,)
FSDP_STRATEGIES: tuple[type, ...] = (FSDPStrategy,)
DEEPSPEED_STRATEGIES: tuple[type, ...] = (DeepSpeedStrategy,)
MODEL_PARALLEL_STRATEGIES: tuple[type, ...] = (ModelParallelStrategy,)

if lightning_pytorch is not None:
    from lightning.pytorch import loggers as _loggers
    from lightning.pytorch import strategies as _strategies

    CALLBACK_BASES += (lightning_pytorch.Callback,)
    TENSORBOARD_LOGGERS += (_loggers.TensorBoardLogger,)
    WANDB_LOGGERS += (_loggers.WandbLogger,)
    FSDP_STRATEGIES += (_strategies.FSDPStrategy,)
    DEEPSPEED_STRATEGIES += (_strategies.DeepSpeedStrategy,)
    MODEL_PARALLEL_STRATEGIES += (_strategies.ModelParallelStrategy,)
