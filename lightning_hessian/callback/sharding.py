"""The callback under Lightning's sharded strategies: which ones it serves, and how its calls agree there.

``ModelParallelStrategy`` with ``fully_shard`` applied in ``configure_model`` (FSDP2) shards the
parameters into DTensors. The engine's ``HessianOperator`` then returns its sharded operator
(:mod:`lightning_hessian.engine.sharded`), which every rank builds on its own probe batches and which
reduces over the ranks itself, weighted by samples as under DDP; the solvers hold each rank's part of
every vector. What needs whole vectors or a second derivative through FSDP is refused at setup: the
Gauss-Newton matrix, the layer views and the gradient overlap.

Refused: Lightning's ``FSDPStrategy``, which wraps the model in FSDP1's ``FullyShardedDataParallel``
(flat parameters that no product runs on), and ``DeepSpeedStrategy`` (its engine owns the parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian._compat import DEEPSPEED_STRATEGIES, FSDP_STRATEGIES, MODEL_PARALLEL_STRATEGIES
from lightning_hessian.callback.config import CallbackConfig
from lightning_hessian.engine import HessianOperator
from lightning_hessian.engine.batches import SampleCounter
from lightning_hessian.engine.snapshot import Mode, is_sharded, select_parameters


def check_strategy(strategy: Any, config: CallbackConfig) -> None:
    """Refuse, before training, a strategy the callback cannot measure under, or settings it cannot serve there.

    Raises:
        RuntimeError: naming the strategy or the setting, and what to use instead.

    Example:
        >>> from pytorch_lightning.strategies import ModelParallelStrategy
        >>> check_strategy(ModelParallelStrategy(), CallbackConfig())  # FSDP2: served
        >>> try:
        ...     check_strategy(ModelParallelStrategy(), CallbackConfig(matrix="ggn"))
        ... except RuntimeError as error:
        ...     print(str(error).split(": ")[1])
        matrix='ggn' needs them; use matrix='hessian', layer_views=False, grad_overlap=False
    """
    name = type(strategy).__name__
    if isinstance(strategy, DEEPSPEED_STRATEGIES):
        raise RuntimeError(f"HessianSpectrumCallback does not support {name}: DeepSpeed's engine owns the parameters "
                           "and their gradients; use ModelParallelStrategy with fully_shard (FSDP2), DDP or one device")
    if isinstance(strategy, FSDP_STRATEGIES):
        raise RuntimeError(f"HessianSpectrumCallback does not support {name}: it wraps the model in FSDP1's "
                           "FullyShardedDataParallel, whose flat parameters no curvature product runs on; use "
                           "ModelParallelStrategy and apply torch.distributed.fsdp.fully_shard (FSDP2) in "
                           "configure_model, which the callback measures")
    if isinstance(strategy, MODEL_PARALLEL_STRATEGIES):
        unserved = [f"{key}={getattr(config, key)!r}" for key, served in
                    (("matrix", config.matrix == "hessian"), ("layer_views", not config.layer_views),
                     ("grad_overlap", not config.grad_overlap)) if not served]
        if unserved:
            raise RuntimeError(f"HessianSpectrumCallback under {name} measures the Hessian of sharded parameters by "
                               f"differences of gradients, without whole parameter vectors: {', '.join(unserved)} "
                               "needs them; use matrix='hessian', layer_views=False, grad_overlap=False")


def sharded_module(module: nn.Module, params: list[str] | None = None) -> bool:
    """Whether the parameters measured (all with ``requires_grad``, or those ``params`` selects) are sharded.

    Example:
        >>> sharded_module(torch.nn.Linear(2, 1))
        False
    """
    return any(is_sharded(p) for _, p in select_parameters(module, params))


def sharded_operator(trainer: Any, pl_module: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: list[Any],
                     *, params: list[str] | None, mode: Mode, num_samples_fn: SampleCounter | None = None) -> Any:
    """The engine's sharded Hessian over this rank's probe batches, built on every rank (with or without
    batches: a rank without raises, on every rank, the engine's error that names it).

    Raises:
        RuntimeError: if the parameters are sharded over fewer ranks than the Trainer runs (tensor
            parallelism): the probe set is split over all of them, the sums would cover a part.

    Example:
        >>> import types
        >>> import torch.distributed as dist
        >>> from torch.distributed.fsdp import fully_shard
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> net = fully_shard(torch.nn.Linear(2, 1))
        >>> loss = lambda m, b: m(b).pow(2).mean()
        >>> sharded_operator(types.SimpleNamespace(world_size=1), net, loss, [torch.ones(4, 2)], params=None,
        ...                  mode="eval").num_params
        3
        >>> try:  # a Trainer of two ranks whose parameters are sharded over one
        ...     sharded_operator(types.SimpleNamespace(world_size=2), net, loss, [torch.ones(4, 2)], params=None,
        ...                      mode="eval")
        ... except RuntimeError as error:
        ...     print(str(error)[:73])
        HessianSpectrumCallback: the parameters are sharded over 1 of the 2 ranks
        >>> dist.destroy_process_group()
    """
    op = HessianOperator(pl_module, loss_fn, batches, params=params, mode=mode, num_samples_fn=num_samples_fn)
    if op.shards.ranks != trainer.world_size:
        raise RuntimeError(f"HessianSpectrumCallback: the parameters are sharded over {op.shards.ranks} of the "
                           f"{trainer.world_size} ranks; it measures FSDP2 over every rank: use "
                           "ModelParallelStrategy(data_parallel_size=<all devices>, tensor_parallel_size=1)")
    return op


def agreed(op: Any, flag: bool) -> bool:
    """``flag`` if it holds on every rank that shares the sharded operator ``op`` (one all-reduce), else
    ``False``; ``flag`` itself for any other operator. Where ranks decide alone (a warm start that fits
    one rank's part of the vectors), this keeps their solvers in step.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> agreed(DiagonalOperator([1.0]), True)
        True
    """
    shards = getattr(op, "shards", None)
    if shards is None:
        return flag
    dissent = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=op.device)
    return bool(shards.all_reduce(dissent)[0] == 0)
