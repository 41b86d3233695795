"""Walking nested batches: count samples, move, slice and join them.

A batch is a tensor, or a tuple, list, named tuple or dict of them (nested to any depth), whose
tensors hold samples along dimension 0; other leaves (strings, numbers) ride along. The number of
samples of a batch is the leading size of its first tensor. A list of non-tensor items as long as
the batch (raw texts, file names) is a per-sample field: slicing a batch slices it too.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy
import torch
from torch import Tensor


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of a nested batch, keeping its structure.

    Example:
        >>> map_tensors({"x": torch.ones(2), "name": "a"}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'name': 'a'}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(value, fn) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def count_samples(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor.

    Raises:
        TypeError: if the batch holds no tensor.

    Example:
        >>> count_samples((torch.zeros(8, 3), torch.zeros(8)))
        8
    """
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        raise TypeError(f"a batch must be a tensor, tuple, list or dict of tensors, got {type(batch).__name__}")
    for item in items:
        with contextlib.suppress(TypeError):
            return count_samples(item)
    raise TypeError("a batch must contain at least one tensor to count its samples")


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Every tensor of a batch on ``device``; floating tensors cast to ``dtype`` when given.

    Inference tensors (made under ``torch.inference_mode``) are copied into ordinary ones, which
    autograd can save for the backward pass.

    Example:
        >>> move_batch((torch.ones(2), torch.ones(2, dtype=torch.int64)), torch.device("cpu"), torch.float64)
        (tensor([1., 1.], dtype=torch.float64), tensor([1, 1]))
    """

    def move(tensor: Tensor) -> Tensor:
        if tensor.is_inference():
            tensor = tensor.clone()
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device)

    return map_tensors(batch, move)


def _is_per_sample_list(value: Any, size: int) -> bool:
    """A list of ``size`` items none of which is a tensor or a container of them (e.g. raw texts)."""
    return isinstance(value, list) and len(value) == size and not any(
        isinstance(item, (Tensor, Mapping, list, tuple)) for item in value
    )


def take_samples(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch: tensors with the batch's leading size and per-sample lists are sliced.

    Example:
        >>> take_samples({"x": torch.arange(4), "text": ["a", "b", "c", "d"]}, 1, 3)
        {'x': tensor([1, 2]), 'text': ['b', 'c']}
    """
    size = count_samples(batch)

    def cut(part: Any) -> Any:
        if isinstance(part, Tensor):
            return part[start:stop] if part.dim() > 0 and part.shape[0] == size else part
        if _is_per_sample_list(part, size):
            return part[start:stop]
        if isinstance(part, Mapping):
            return type(part)({key: cut(value) for key, value in part.items()})
        if isinstance(part, tuple) and hasattr(part, "_fields"):
            return type(part)(*(cut(value) for value in part))
        if isinstance(part, (list, tuple)):
            return type(part)(cut(value) for value in part)
        return part

    return cut(batch)


def concat_batches(batches: list[Any]) -> Any:
    """Join batches of the same structure along dimension 0 (per-sample lists are concatenated).

    Raises:
        TypeError: if a part is neither a tensor, a per-sample list, a container of them nor a value
            that is the same in every batch.
        RuntimeError: if tensors cannot be concatenated (shapes differ beyond dimension 0).

    Example:
        >>> concat_batches([(torch.zeros(2), ["a", "b"]), (torch.ones(1), ["c"])])
        (tensor([0., 0., 1.]), ['a', 'b', 'c'])
    """
    sizes = [count_samples(b) for b in batches]

    def join(parts: list[Any]) -> Any:
        first = parts[0]
        if isinstance(first, Tensor):
            return torch.cat(parts)
        if all(_is_per_sample_list(p, n) for p, n in zip(parts, sizes, strict=True)):
            return [item for part in parts for item in part]
        if isinstance(first, Mapping):
            return type(first)({key: join([p[key] for p in parts]) for key in first})
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*(join(list(group)) for group in zip(*parts, strict=True)))
        if isinstance(first, (list, tuple)):
            return type(first)(join(list(group)) for group in zip(*parts, strict=True))
        if all(part == first for part in parts):  # one value per batch, the same in all: kept once
            return first
        raise TypeError(f"cannot join batches holding different {type(first).__name__} values; keep the loader's "
                        "batches")

    return join(batches)


def rebatch(batches: list[Any], batch_size: int) -> list[Any]:
    """The same samples, in order, in batches of ``batch_size`` (the last one may be smaller).

    Example:
        >>> [b.tolist() for b in rebatch([torch.arange(3), torch.arange(3, 5)], 2)]
        [[0, 1], [2, 3], [4]]
    """
    joined = concat_batches(batches)
    total = count_samples(joined)
    return [take_samples(joined, start, start + batch_size) for start in range(0, total, batch_size)]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving the global random streams of torch (CPU and CUDA), NumPy and Python.

    Iterating a shuffled ``DataLoader`` draws from the global torch generator; inside this block the
    draw happens but the streams are put back afterwards.

    Example:
        >>> state = torch.random.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(state, torch.random.get_rng_state())
        True
    """
    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)


def materialize(batches: Iterable[Any]) -> list[Any]:
    """The batches of a re-iterable (a list, a DataLoader) as a list, without moving any global RNG.

    Example:
        >>> len(materialize(torch.utils.data.DataLoader(torch.arange(10), batch_size=4, shuffle=True)))
        3
    """
    with preserved_rng():
        return list(batches)
