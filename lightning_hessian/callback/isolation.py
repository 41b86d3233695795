"""Run a measurement inside a training run without leaving a trace.

The engine's operators already work on detached copies of parameters and buffers; this module adds
what a Lightning hook needs around them: the global RNG streams, gradients switched on even under
``trainer.validate()``'s inference mode, the uncompiled forward of a ``torch.compile``d module,
``self.log`` and the Trainer's loggers made harmless while ``training_step`` computes a loss, and a
snapshot of everything the module's code could change: buffers, ``.grad`` and ``requires_grad``,
module modes, and the plain state of every submodule (its instance attributes: a recurrent hidden
state, a counter, a cache, torchmetrics states).

Plain state is restored by identity (an attribute rebound to a new object gets its old object back,
an attribute added is removed), one level into lists, dicts and sets (their items are put back),
and by value for tensors of up to ``CLONED_ELEMENTS`` elements changed in place. A larger tensor
changed in place cannot be restored; a warning names it. :func:`plain_state_kept` does this around
every evaluation of the loss, so each probe batch sees the state training left, not the state an
earlier probe batch left.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn

# Module methods a measurement swaps out: ``forward``/``training_step`` for their uncompiled
# originals (Lightning keeps them in ``_compiler_ctx``), ``log``/``log_dict`` for no-ops.
_COMPILED = {"forward": "original_forward", "training_step": "original_training_step"}
_LOGGING = ("log", "log_dict")


def _discard(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while ``training_step`` computes a loss for us."""


# In-place changes to tensor attributes of up to this many elements are undone (they are copied
# before every loss evaluation); larger ones are only detected.
CLONED_ELEMENTS = 1 << 20
# Module internals that are not plain state: parameters and buffers are handled on their own, and
# the submodule tree is not changed by a loss.
_STRUCTURE = frozenset({"_parameters", "_buffers", "_modules"})


class PlainState:
    """The instance attributes of a module and its submodules, to put back later.

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
        self._saved = []
        for sub in module.modules():
            entries = {}
            for key, value in sub.__dict__.items():
                if key in _STRUCTURE:
                    continue
                entries[key] = (value, *_contents(value))
            self._saved.append((sub, entries))

    def restore(self) -> None:
        """Put every attribute back; warn about large tensors changed in place."""
        for sub, entries in self._saved:
            for key in [k for k in sub.__dict__ if k not in _STRUCTURE and k not in entries]:
                del sub.__dict__[key]
            for key, (value, contents, version) in entries.items():
                sub.__dict__[key] = value
                _put_back(value, contents, version, f"{type(sub).__name__}.{key}")


def _contents(value: Any) -> tuple[Any, int | None]:
    """What restoring ``value`` needs besides its identity: a copy of its items or small tensor, its version."""
    if isinstance(value, torch.Tensor):
        if value.is_inference():  # made under inference mode: it cannot be changed in place outside it
            return None, None
        small = value.numel() <= CLONED_ELEMENTS
        return (value.detach().clone() if small else None), value._version
    if isinstance(value, (list, dict, set)):
        return copy.copy(value), None
    return None, None


def _put_back(value: Any, contents: Any, version: int | None, name: str) -> None:
    if isinstance(value, torch.Tensor):
        if version is None or value._version == version:
            return
        if contents is None:
            warnings.warn(f"HessianSpectrumCallback: the loss changed the large tensor attribute {name} in place, "
                          "which cannot be undone; compute the loss without writing to module attributes "
                          "(e.g. define hessian_loss)", RuntimeWarning, stacklevel=4)
            return
        with torch.no_grad():
            value.copy_(contents)
    elif isinstance(value, list):
        value[:] = contents
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(contents)


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
