"""Save the state reachable from some Python objects and put it back later, whatever kind it is.

What a measurement may change without meaning to lives in plain Python objects: the instance
attributes of a module, of a sampler, a batch sampler, a dataset or a collate object. One walk saves
all of it and :meth:`SavedState.restore` puts it back:

- an attribute rebound, added or removed gets its old object back (by identity), or is removed;
- a list, dict (any subclass: ``OrderedDict``, ``defaultdict``), set or deque gets its items back,
  and the walk goes on into the items, at any depth (tuples are walked too), so a tensor in a dict
  of tensors is covered like a tensor attribute;
- a tensor changed in place gets its values back when it holds up to ``CLONED_ELEMENTS``
  elements and the copies of one walk hold no more than ``CLONED_TOTAL`` (so a dataset of many
  small tensors is not copied whole); another one cannot be put back, and a warning names it;
- a NumPy array of up to ``CLONED_ELEMENTS`` elements gets its values back, within the same total;
- a random generator gets its state back: ``torch.Generator``, NumPy's ``Generator``,
  ``BitGenerator`` and ``RandomState``, Python's ``random.Random``;
- with ``objects=True`` (data loaders), the walk also enters other objects that have a
  ``__dict__``, to ``OBJECT_DEPTH`` levels: a sampler inside a batch sampler, a dataset's own
  random state, a position counter.

Not covered: state outside ``__dict__`` (``__slots__``, C extensions other than the generators
above), a Python generator object or an iterator half consumed (its position cannot be saved), and
with ``objects=False`` the attributes of objects other than containers (put back by identity only).
"""

from __future__ import annotations

import collections
import copy
import random
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy
import torch

# Tensors (and NumPy arrays) of up to this many elements changed in place get their values back
# (they are copied when the state is saved); larger ones are only detected.
CLONED_ELEMENTS = 1 << 20
# The copies one walk makes hold at most this many elements in all (64 MB of float32).
CLONED_TOTAL = 16 * CLONED_ELEMENTS
# How many levels of plain objects an ``objects=True`` walk enters below its roots.
OBJECT_DEPTH = 4
# Values with nothing inside to save.
_ATOMS = (str, bytes, int, float, complex, bool, type(None), types.FunctionType, types.BuiltinFunctionType,
          types.MethodType, type, types.ModuleType)
# Objects an ``objects=True`` walk does not enter: a DataLoader's live iterator holds worker processes
# and queues, and is not advanced by a draw that reads a copy of the loader.
_OPAQUE = (torch.utils.data.dataloader._BaseDataLoaderIter, torch.nn.Module)


def _random_state(value: Any) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
    """``(get, set)`` of a random generator's state, or ``None`` if ``value`` is none."""
    if isinstance(value, torch.Generator):
        return value.get_state, value.set_state
    if isinstance(value, numpy.random.Generator):
        value = value.bit_generator
    if isinstance(value, numpy.random.BitGenerator):
        bit = value
        return (lambda: copy.deepcopy(bit.state)), (lambda state: setattr(bit, "state", state))
    if isinstance(value, numpy.random.RandomState):
        return value.get_state, value.set_state
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):
        return value.getstate, value.setstate
    return None


class SavedState:
    """The state reachable from some objects' attributes (see the module docstring), to put back later.

    Args:
        objects: enter plain objects too (to ``OBJECT_DEPTH`` levels below those added).

    Example:
        >>> import numpy as np
        >>> class Sampler:
        ...     def __init__(self):
        ...         self.rng, self.position, self.seen = np.random.default_rng(0), 0, {"w": torch.zeros(2)}
        >>> sampler = Sampler()
        >>> saved = SavedState()
        >>> saved.add(sampler)
        >>> first = sampler.rng.integers(100)
        >>> sampler.position += 1
        >>> _ = sampler.seen["w"].add_(1.0)
        >>> saved.restore()
        >>> bool(sampler.rng.integers(100) == first), sampler.position, sampler.seen["w"].tolist()
        (True, 0, [0.0, 0.0])
    """

    def __init__(self, *, objects: bool = True) -> None:
        self._objects = objects
        self._seen: set[int] = set()
        self._undo: list[Callable[[], None]] = []
        self._left = CLONED_TOTAL  # elements the walk may still copy

    def add(self, owner: Any, *, skip: frozenset[str] = frozenset()) -> None:
        """Save the instance attributes of ``owner`` (those named in ``skip`` left alone) and what they hold."""
        if id(owner) in self._seen or not isinstance(getattr(owner, "__dict__", None), dict):
            return
        self._seen.add(id(owner))
        self._save_attributes(owner, skip, type(owner).__name__, 0)

    def restore(self) -> None:
        """Put everything back, in the order it was saved (containers before their items)."""
        for undo in self._undo:
            undo()

    def _save(self, value: Any, name: str, depth: int) -> None:
        if isinstance(value, _ATOMS) or id(value) in self._seen:
            return
        self._seen.add(id(value))
        random_state = _random_state(value)
        if random_state is not None:
            get, put = random_state
            state = get()
            self._undo.append(lambda: put(state))
        elif isinstance(value, torch.Tensor):
            self._save_tensor(value, name)
        elif isinstance(value, numpy.ndarray):
            self._save_array(value)
        elif isinstance(value, (list, dict, set, collections.deque, tuple)):
            self._save_container(value, name, depth)
        elif self._objects and depth < OBJECT_DEPTH and not isinstance(value, _OPAQUE) \
                and isinstance(getattr(value, "__dict__", None), dict):
            self._save_attributes(value, frozenset(), name, depth + 1)

    def _save_attributes(self, owner: Any, skip: frozenset[str], name: str, depth: int) -> None:
        """``owner.__dict__`` but ``skip``: rebound and added keys undone, the values walked."""
        namespace = owner.__dict__
        attributes = {key: value for key, value in namespace.items() if key not in skip}

        def undo() -> None:
            for key in [k for k in namespace if k not in attributes and k not in skip]:
                del namespace[key]
            namespace.update(attributes)

        self._undo.append(undo)
        for key, value in attributes.items():
            self._save(value, f"{name}.{key}", depth)

    def _save_container(self, value: Any, name: str, depth: int) -> None:
        if isinstance(value, dict):
            items = dict(value)
            self._undo.append(lambda: (value.clear(), value.update(items)))
            children: Iterable[tuple[str, Any]] = ((f"{name}[{k!r}]", v) for k, v in items.items())
        elif isinstance(value, (list, collections.deque)):
            listed = list(value)
            self._undo.append(lambda: (value.clear(), value.extend(listed)))
            children = ((f"{name}[{i}]", v) for i, v in enumerate(listed))
        else:
            if isinstance(value, set):
                members = set(value)
                self._undo.append(lambda: (value.clear(), value.update(members)))
            children = ((f"{name}[{i}]", v) for i, v in enumerate(value))
        for child_name, child in children:
            self._save(child, child_name, depth)

    def _save_tensor(self, value: torch.Tensor, name: str) -> None:
        if value.is_inference():  # made under inference mode: it cannot be changed in place outside it
            return
        version = value._version
        saved = value.detach().clone() if self._copyable(value.numel()) else None

        def undo() -> None:
            if value._version == version:
                return
            if saved is None:
                warnings.warn(f"HessianSpectrumCallback: the loss changed the large tensor attribute {name} in place, "
                              "which cannot be undone; compute the loss without writing to module attributes "
                              "(e.g. define hessian_loss)", RuntimeWarning, stacklevel=5)
                return
            with torch.no_grad():
                value.copy_(saved)

        self._undo.append(undo)

    def _copyable(self, size: int) -> bool:
        """Whether a tensor or array of ``size`` elements is copied (and so counted against the total)."""
        if size > min(CLONED_ELEMENTS, self._left):
            return False
        self._left -= size
        return True

    def _save_array(self, value: numpy.ndarray) -> None:
        if not value.flags.writeable or value.dtype.hasobject or not self._copyable(value.size):
            return
        saved = value.copy()
        self._undo.append(lambda: numpy.copyto(value, saved))
