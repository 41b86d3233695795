"""The probe set: a fixed list of batches on which every measurement is taken.

Drawn once from a dataloader: the first ``num_samples`` samples it yields, with the global seed set
to ``seed`` for the draw and every random stream (global and the loader's own generators) put back
afterwards, so the training data order does not change (an extra pass over a shuffled loader would
otherwise change the next epoch's order).

Under DDP, a loader with a ``DistributedSampler`` (Lightning adds one to the training loader) is
already split by rank: each rank takes its share of ``num_samples`` from its own part. A loader
without one yields the same batches on every rank: the first ``num_samples`` samples are taken and
batch ``i`` goes to rank ``i % world_size``, so the probe set is the same as in one process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy
import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import DistributedSampler

from lightning_hessian.engine.batches import concat_batches, count_samples, rebatch, take_samples


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
            batches.append(take_samples(batch, 0, num_samples - count))
            break
        batches.append(batch)
        count += size
    return batches


def _joined(batches: list[Any]) -> list[Any]:
    """The batches as one batch when their structure allows (tensors of matching shapes), else as they are."""
    if len(batches) < 2:
        return batches
    try:
        return [concat_batches(batches)]
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
    return _joined(batches) if batch_size is None else rebatch(batches, batch_size)
