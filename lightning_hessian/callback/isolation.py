"""Run a measurement inside a training run without leaving a trace.

The engine's operators already work on detached copies of parameters and buffers; this module adds
what a Lightning hook needs around them: the global RNG streams, gradients switched on even under
``trainer.validate()``'s inference mode, the uncompiled forward of a ``torch.compile``d module,
``self.log`` and the Trainer's loggers made harmless while ``training_step`` computes a loss, and a
snapshot of everything the module's code could change: buffers, ``.grad`` and ``requires_grad``,
module modes, and the plain state of every submodule (its instance attributes: a recurrent hidden
state, a counter, a cache, torchmetrics states).

Plain state is saved and put back by :class:`~lightning_hessian.callback.saved_state.SavedState`:
by identity (an attribute rebound to a new object gets its old object back, an attribute added is
removed), into lists, dicts, sets, deques and tuples at any depth (their items are put back), by
value for tensors and NumPy arrays of up to ``saved_state.CLONED_ELEMENTS`` elements changed in
place, and by state for random generators (torch, NumPy, Python). A larger tensor changed in place
cannot be restored; a warning names it. :func:`plain_state_kept` does this around every evaluation of the
loss, so each probe batch sees the state training left, not the state an earlier probe batch left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn

from lightning_hessian.callback.saved_state import SavedState

# Module methods a measurement swaps out: ``forward``/``training_step`` for their uncompiled
# originals (Lightning keeps them in ``_compiler_ctx``), ``log``/``log_dict`` for no-ops.
_COMPILED = {"forward": "original_forward", "training_step": "original_training_step"}
_LOGGING = ("log", "log_dict")


def _discard(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while ``training_step`` computes a loss for us."""


# Module internals that are not plain state: parameters and buffers are handled on their own, and
# the submodule tree is not changed by a loss.
_STRUCTURE = frozenset({"_parameters", "_buffers", "_modules"})


class PlainState:
    """The instance attributes of a module and its submodules, to put back later (see
    :class:`~lightning_hessian.callback.saved_state.SavedState`: containers at any depth, tensors and
    NumPy arrays by value, random generators by state).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> net.hidden, net.seen = torch.zeros(2), [1]
        >>> state = PlainState(net)
        >>> net.hidden, net.extra = torch.ones(2), "new"
        >>> net.seen.append(2)
        >>> state.restore()
        >>> net.hidden, net.seen, hasattr(net, "extra")
        (tensor([0., 0.]), [1], False)
    """

    def __init__(self, module: nn.Module) -> None:
        self._saved = SavedState(objects=False)
        for sub in module.modules():
            self._saved.add(sub, skip=_STRUCTURE)

    def restore(self) -> None:
        """Put every attribute back; warn about large tensors changed in place."""
        self._saved.restore()


@contextlib.contextmanager
def plain_state_kept(module: nn.Module) -> Iterator[None]:
    """Run the block, then put the module's plain state back (see :class:`PlainState`).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> net.calls = 0
        >>> with plain_state_kept(net):
        ...     net.calls += 1
        >>> net.calls
        0
    """
    state = PlainState(module)
    try:
        yield
    finally:
        state.restore()


def kept_loss(loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
    """``loss_fn(module, batch)`` with the module's plain state (random generators included) put back after
    every evaluation, as for the module's own losses.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> net.gen = torch.Generator().manual_seed(0)
        >>> noisy = kept_loss(lambda m, b: torch.randn(1, generator=m.gen).sum())
        >>> bool(noisy(net, None) == noisy(net, None))
        True
    """

    def loss(module: nn.Module, batch: Any) -> torch.Tensor:
        with plain_state_kept(module):
            return loss_fn(module, batch)

    return loss


class _Discard:
    """Stands in for a logger (and its experiment) while ``training_step`` runs for a loss: every
    attribute is a no-op."""

    def __getattr__(self, name: str) -> _Discard:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Discard:
        return self


@contextlib.contextmanager
def loggers_muted(trainer: Any) -> Iterator[None]:
    """While the block runs, ``self.logger`` and ``self.loggers`` of the module swallow every call.

    Example:
        >>> import types
        >>> trainer = types.SimpleNamespace(loggers=["csv"])
        >>> with loggers_muted(trainer):
        ...     trainer.loggers[0].log_metrics({"a": 1.0}, step=0) is not None
        True
        >>> trainer.loggers
        ['csv']
    """
    saved = list(trainer.loggers)
    trainer.loggers = [_Discard() for _ in saved]
    try:
        yield
    finally:
        trainer.loggers = saved


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
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        params = [(p, p.grad, p.requires_grad) for p in module.parameters()]
        modes = [(m, m.training) for m in module.modules()]
        plain = PlainState(module)
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
            plain.restore()
            for sub, training in modes:
                sub.training = training
