"""The probe set: a fixed list of batches on which every measurement is taken.

Drawn once from a dataloader: the first ``num_samples`` samples it yields, with the global seed set
to ``seed`` for the draw and every random stream (global and the loader's own generators) put back
afterwards, so the training data order does not change (PITFALLS.md: an extra pass over a shuffled
loader changes the next epoch's order unless isolated).

Under DDP, a loader with a ``DistributedSampler`` (Lightning adds one to the training loader) is
already split by rank: each rank takes its share of ``num_samples`` from its own part. A loader
without one yields the same batches on every rank: the first ``num_samples`` samples are taken and
batch ``i`` goes to rank ``i % world_size``, so the probe set is the same as in one process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy
import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_hessian.engine.operators import count_samples


def _map(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a (nested) batch, keeping its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: _map(value, fn) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(value, fn) for value in batch)
    return batch


def _take(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (tensors sliced along dimension 0)."""
    size = count_samples(batch)
    return _map(batch, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == size else t)


def _concat(batches: list[Any]) -> Any:
    """Join batches of the same structure along dimension 0."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return type(first)({key: _concat([b[key] for b in batches]) for key in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat(list(parts)) for parts in zip(*batches, strict=True)))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(parts)) for parts in zip(*batches, strict=True))
    raise TypeError(
        f"cannot re-batch a {type(first).__name__} in the probe set; with batch_size=None the loader's "
        "batches are kept as they are"
    )


def _rebatch(batches: list[Any], batch_size: int) -> list[Any]:
    """The same samples in batches of ``batch_size`` (the last one may be smaller)."""
    joined = _concat(batches)
    total = count_samples(joined)
    return [_take(joined, start, start + batch_size) for start in range(0, total, batch_size)]


def _generators(loader: Any) -> list[torch.Generator]:
    """The private generators a DataLoader draws from (its own, its sampler's, its batch sampler's)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = [loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)]
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def _untouched_rng(loader: Any, seed: int) -> Iterator[None]:
    """Seed the global RNGs (torch, NumPy, Python) for a draw; restore them and the loader's generators after."""
    saved = [(g, g.get_state()) for g in _generators(loader)]
    with isolate_rng():
        torch.manual_seed(seed)
        numpy.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            for generator, state in saved:
                generator.set_state(state)


def _first_samples(loader: Iterable[Any], num_samples: int | None) -> list[Any]:
    """The first ``num_samples`` samples of ``loader`` (all when ``None``), as its batches."""
    batches, count = [], 0
    for batch in loader:
        size = count_samples(batch)
        if num_samples is not None and count + size >= num_samples:
            batches.append(_take(batch, 0, num_samples - count))
            break
        batches.append(batch)
        count += size
    return batches


def _joined(batches: list[Any]) -> list[Any]:
    """The batches as one batch when their structure allows (tensors of matching shapes), else as they are."""
    if len(batches) < 2:
        return batches
    try:
        return [_concat(batches)]
    except (TypeError, ValueError, KeyError, RuntimeError):  # non-tensor parts, or shapes that differ
        return batches


def draw_probe_set(
    loader: Iterable[Any],
    *,
    num_samples: int | None,
    batch_size: int | None,
    seed: int,
    rank: int,
    world_size: int,
) -> list[Any]:
    """This rank's share of the probe set, as batches straight from the loader (not yet on device).

    Args:
        loader: a DataLoader or any re-iterable of batches.
        num_samples: probe samples over all ranks (``None``: the whole loader).
        batch_size: re-batch this rank's samples to this size; ``None`` joins them into one batch
            when the batch structure allows (tensors only) and keeps the loader's batches otherwise.
        seed: global seed during the draw.
        rank, world_size: this process and the number of processes.

    Returns:
        The batches of this rank; possibly empty when there are fewer batches than ranks.

    Raises:
        ValueError: if the loader yields no samples.
    """
    sharded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
    share = num_samples
    if sharded and num_samples is not None:
        share = num_samples // world_size + (rank < num_samples % world_size)
    with _untouched_rng(loader, seed):
        batches = _first_samples(loader, share) if share != 0 else []
    if not batches and not sharded:
        raise ValueError("the probe dataloader yielded no samples; pass a non-empty `dataloader=`")
    if not sharded:
        batches = batches[rank::world_size]
    if not batches:
        return batches
    return _joined(batches) if batch_size is None else _rebatch(batches, batch_size)
