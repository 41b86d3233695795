"""Walking nested batches: count samples, move, slice and join them.

A batch is a tensor, or a tuple, list, named tuple, dict, dataclass or plain object (its
attributes) of them, nested to any depth, whose tensors hold samples along dimension 0; other leaves
(strings, numbers) ride along. The number of samples of a batch is the leading size of its first
tensor of at least one dimension (a 0-d tensor, such as a padded length, holds no samples); a
:class:`~torch.nn.utils.rnn.PackedSequence` counts its sequences. A list of non-tensor items as long
as the batch (raw texts, file names) is a per-sample field: slicing a batch slices it too. Where the
samples lie along another dimension (a time-major ``[T, B, ...]`` RNN batch), the caller counts them
with its own ``num_samples_fn``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

SampleCounter = Callable[[Any], int]
"""``num_samples_fn(batch) -> int``: the number of samples in a batch."""


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of a nested batch, keeping its structure.

    Example:
        >>> map_tensors({"x": torch.ones(2), "name": "a"}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'name': 'a'}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, PackedSequence):  # the sizes stay on the CPU, as PackedSequence.to keeps them
        indices = (None if t is None else fn(t) for t in (batch.sorted_indices, batch.unsorted_indices))
        return type(batch)(fn(batch.data), batch.batch_sizes, *indices)
    return _map_parts(batch, lambda part: map_tensors(part, fn))


def _map_parts(batch: Any, fn: Callable[[Any], Any]) -> Any:
    """``batch`` with ``fn`` applied to each of its direct parts, the container kept; a leaf as it is."""
    if isinstance(batch, Mapping):
        return type(batch)({key: fn(value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(fn(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(fn(value) for value in batch)
    fields = record_fields(batch)
    if fields is not None:
        return _rebuilt(batch, {name: fn(value) for name, value in fields.items()})
    return batch


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return dataclasses.is_dataclass(value) and record_fields(value) is not None  # plain objects: one level


def record_fields(batch: Any) -> dict[str, Any] | None:
    """The named parts of a record batch, or ``None`` for anything else: a dataclass instance's fields,
    or the attributes of a plain object that holds tensors among them (a custom batch class).

    Example:
        >>> @dataclasses.dataclass
        ... class Batch:
        ...     x: Tensor
        ...     name: str
        >>> list(record_fields(Batch(torch.zeros(2), "a")))
        ['x', 'name']
    """
    if isinstance(batch, (Tensor, type, str, bytes, Mapping, list, tuple)):
        return None
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    attributes = getattr(batch, "__dict__", None)
    if isinstance(attributes, dict) and any(_holds_tensor(v) for v in attributes.values()):
        return dict(attributes)
    return None


def _rebuilt(record: Any, values: Mapping[str, Any]) -> Any:
    """A shallow copy of ``record`` with its fields (or attributes) replaced by ``values``."""
    if all(values[name] is value for name, value in (record_fields(record) or {}).items()):
        return record
    new = copy.copy(record)
    for name, value in values.items():
        object.__setattr__(new, name, value)  # frozen dataclasses too
    return new


def _parts(batch: Any) -> Iterable[Any]:
    """The direct parts of a container batch (empty for a leaf)."""
    if isinstance(batch, Mapping):
        return batch.values()
    if isinstance(batch, (list, tuple)):
        return batch
    fields = record_fields(batch)
    return () if fields is None else fields.values()


def leading_sizes(batch: Any) -> list[int]:
    """The sample count each part of a batch proposes, in order: the leading size of every tensor of at
    least one dimension, and the number of sequences of every ``PackedSequence``.

    Example:
        >>> leading_sizes({"max_len": torch.tensor(7), "x": torch.zeros(4, 7), "y": torch.zeros(4)})
        [4, 4]
    """
    return [size for size, _ in _leading_parts(batch)]


def _leading_parts(batch: Any) -> list[tuple[int, Any]]:
    """``(leading size, part)`` for every tensor of at least one dimension and every ``PackedSequence``."""
    if isinstance(batch, PackedSequence):
        return [(int(batch.batch_sizes[0]) if batch.batch_sizes.numel() else 0, batch)]
    if isinstance(batch, Tensor):
        return [(batch.shape[0], batch)] if batch.dim() > 0 else []
    return [found for part in _parts(batch) for found in _leading_parts(part)]


def count_samples(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor of at least one dimension
    (0-d tensors are skipped), or the number of sequences of a ``PackedSequence``.

    Raises:
        TypeError: if the batch holds no such tensor; the message names ``num_samples_fn``.

    Example:
        >>> count_samples((torch.zeros(8, 3), torch.zeros(8)))
        8
        >>> count_samples({"max_len": torch.tensor(3), "x": torch.zeros(5, 3)})
        5
    """
    sizes = leading_sizes(batch)
    if not sizes:
        raise TypeError(
            f"cannot count the samples of a batch of type {type(batch).__name__}: a batch must be a tensor, or a "
            "tuple, list, dict, dataclass or object holding a tensor with the samples along dimension 0; pass "
            "num_samples_fn=lambda batch: <its number of samples>"
        )
    return sizes[0]


def ambiguous_count(batches: list[Any]) -> str | None:
    """A warning's text when the tensors of a batch disagree on their leading size (the count may not be the
    number of samples, as for a time-major ``[T, B, ...]`` batch), else ``None``. A tensor that is the same
    in every batch (a class-weight vector each batch carries) holds no samples and is left out, once there
    are two batches to compare.

    Example:
        >>> ambiguous_count([(torch.zeros(6, 25, 8), torch.zeros(25))]) is not None
        True
        >>> weight = torch.ones(4)
        >>> ambiguous_count([(torch.zeros(8, 3), weight), (torch.ones(8, 3), weight)]) is None
        True
    """
    parts = [_leading_parts(batch) for batch in batches]
    if not parts or not parts[0]:
        return None
    width = min(len(found) for found in parts)
    constant = [len(parts) > 1 and _same_everywhere([found[j][1] for found in parts]) for j in range(width)]
    for found in parts:
        sizes = [size for j, (size, _) in enumerate(found) if j >= width or not constant[j]]
        if len(set(sizes)) > 1:
            others = sorted(set(sizes) - {sizes[0]})
            return (f"the batch's tensors have different leading sizes ({sizes[0]}, then "
                    f"{', '.join(map(str, others))}); each batch counts {sizes[0]} samples, the first tensor's "
                    "leading size, and batches are weighted so. If the samples lie along another dimension (a "
                    "time-major [T, B, ...] RNN batch), pass num_samples_fn=lambda batch: <its number of samples>")
    return None


def _same_everywhere(values: list[Any]) -> bool:
    first = values[0]
    return all(isinstance(v, Tensor) and isinstance(first, Tensor) and v.shape == first.shape
               and v.dtype == first.dtype and torch.equal(v, first) for v in values)


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
        if isinstance(part, PackedSequence):
            raise TypeError(_UNCUT)
        if _is_per_sample_list(part, size):
            return part[start:stop]
        return _map_parts(part, cut)

    return cut(batch)


_UNCUT = ("a PackedSequence cannot be cut into or joined from other batches; keep the loader's batches "
          "(batch_size=None)")


def concat_batches(batches: list[Any]) -> Any:
    """Join batches of the same structure along dimension 0 (per-sample lists are concatenated).

    A tensor is per-sample when its leading size is its batch's number of samples; any other tensor
    (a 0-d value, a class-weight vector every batch carries) and any other value must be the same in
    every batch, and is kept once.

    Raises:
        TypeError: if a part is neither per-sample, a container of them nor the same in every batch,
            or is a ``PackedSequence``.
        RuntimeError: if tensors cannot be concatenated (shapes differ beyond dimension 0).

    Example:
        >>> concat_batches([(torch.zeros(2), ["a", "b"]), (torch.ones(1), ["c"])])
        (tensor([0., 0., 1.]), ['a', 'b', 'c'])
    """
    sizes = [count_samples(b) for b in batches]

    def join(parts: list[Any]) -> Any:
        first = parts[0]
        if isinstance(first, Tensor):
            return _join_tensors(parts, sizes)
        if isinstance(first, PackedSequence):
            raise TypeError(_UNCUT)
        if all(_is_per_sample_list(p, n) for p, n in zip(parts, sizes, strict=True)):
            return [item for part in parts for item in part]
        if isinstance(first, Mapping):
            return type(first)({key: join([p[key] for p in parts]) for key in first})
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*(join(list(group)) for group in zip(*parts, strict=True)))
        if isinstance(first, (list, tuple)):
            return type(first)(join(list(group)) for group in zip(*parts, strict=True))
        fields = record_fields(first)
        if fields is not None:
            return _rebuilt(first, {name: join([getattr(p, name) for p in parts]) for name in fields})
        if all(part == first for part in parts):  # one value per batch, the same in all: kept once
            return first
        raise TypeError(f"cannot join batches holding different {type(first).__name__} values; keep the loader's "
                        "batches")

    return join(batches)


def _join_tensors(parts: list[Tensor], sizes: list[int]) -> Tensor:
    """Per-sample tensors (leading size = their batch's samples) concatenated; a tensor that is the same in
    every batch (a 0-d value, a class-weight vector) kept once."""
    if all(t.dim() > 0 and t.shape[0] == n for t, n in zip(parts, sizes, strict=True)):
        return torch.cat(parts)
    first = parts[0]
    if all(t.shape == first.shape and t.dtype == first.dtype and torch.equal(t, first) for t in parts):
        return first
    raise TypeError(
        f"cannot join tensors of shapes {', '.join(str(tuple(t.shape)) for t in parts[:3])}: they neither hold one "
        f"entry per sample along dimension 0 (batches of {', '.join(map(str, sizes[:3]))} samples) nor are the same "
        "in every batch; keep the loader's batches (batch_size=None)"
    )


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
