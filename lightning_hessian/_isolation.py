"""Run a measurement inside a training run without leaving a trace.

The engine's operators already work on detached copies of parameters and buffers; this context
adds what a Lightning hook needs around them: the global RNG
streams, gradients switched on even under ``trainer.validate()``'s inference mode, the math kernel
for attention (fused kernels have no double backward), cuDNN off for RNNs (same reason), the
uncompiled forward of a ``torch.compile``d module, ``self.log`` made harmless for a loss computed
by ``training_step``, and a snapshot of everything a user's loss could still change: buffers,
``.grad`` and ``requires_grad``, module modes and torchmetrics states.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Module methods a measurement swaps out: ``forward``/``training_step`` for their uncompiled
# originals (Lightning keeps them in ``_compiler_ctx``), ``log``/``log_dict`` for no-ops.
_COMPILED = {"forward": "original_forward", "training_step": "original_training_step"}
_LOGGING = ("log", "log_dict")


def _discard(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while ``training_step`` computes a loss for us."""


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _metric_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """States of the torchmetrics ``Metric`` submodules (they are attributes, not buffers)."""
    saved = []
    for sub in module.modules():
        defaults = getattr(sub, "_defaults", None)
        if isinstance(defaults, dict) and hasattr(sub, "_update_count"):
            names = [*defaults, "_update_count", "_computed", "_forward_cache"]
            saved.append((sub, {n: _clone(getattr(sub, n)) for n in names if hasattr(sub, n)}))
    return saved


@contextlib.contextmanager
def _swapped(module: nn.Module, replacements: dict[str, Any]) -> Iterator[None]:
    """Set instance attributes for the block; afterwards put back what was there (or nothing)."""
    missing = object()
    previous = {name: module.__dict__.get(name, missing) for name in replacements}
    try:
        for name, value in replacements.items():
            object.__setattr__(module, name, value)
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, value)


@contextlib.contextmanager
def isolated(module: nn.Module) -> Iterator[None]:
    """Measure inside this block; on exit the module and the global RNG are as they were.

    Args:
        module: the (unwrapped) LightningModule.
    """
    compiler_ctx = getattr(module, "_compiler_ctx", None) or {}
    replacements: dict[str, Any] = {name: _discard for name in _LOGGING}
    replacements.update({name: compiler_ctx[key] for name, key in _COMPILED.items() if key in compiler_ctx})
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolate_rng())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        params = [(p, p.grad, p.requires_grad) for p in module.parameters()]
        modes = [(m, m.training) for m in module.modules()]
        metrics = _metric_states(module)
        try:
            with _swapped(module, replacements):
                yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    if not torch.equal(buffer, saved):
                        buffer.copy_(saved)
            for param, grad, requires_grad in params:
                param.grad = grad
                param.requires_grad_(requires_grad)
            for sub, training in modes:
                sub.training = training
            for sub, state in metrics:
                for name, value in state.items():
                    setattr(sub, name, value)
