"""The probe set: a fixed list of batches on which every measurement is taken.

Drawn once from a dataloader: whole batches from its start until they hold ``num_samples`` samples
(a batch is never cut, so per-sample fields such as raw texts stay aligned and a stateful module
sees batches of the size training uses), with the global seed set to ``seed`` for the draw and every
random stream (global and the loader's own generators) put back afterwards, so the training data
order does not change (an extra pass over a shuffled loader would otherwise change the next epoch's
order). A DataLoader with workers is read in this process instead, through a copy with the same
dataset, sampler and collation, so no worker is created or advanced for the draw.

Under DDP, a loader with a ``DistributedSampler`` (Lightning adds one to the training loader) is
already split by rank: each rank takes its share of ``num_samples`` from its own part. A loader
without one yields the same batches on every rank: the batches are taken once and batch ``i`` goes
to rank ``i % world_size``, so the probe set is the same as in one process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy
import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_hessian.engine.batches import count_samples, rebatch


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


def _without_workers(loader: Iterable[Any]) -> Iterable[Any]:
    """A DataLoader over the same dataset, sampler and collation that loads in this process."""
    if not isinstance(loader, DataLoader) or loader.num_workers == 0:
        return loader
    # The loader's own generator too: iterating draws the workers' base seed from it, before any shuffle.
    same = {"collate_fn": loader.collate_fn, "generator": loader.generator}
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **same)
    if loader.batch_sampler is None:  # batch_size=None: the dataset yields whole batches
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **same)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **same)


def _first_batches(loader: Iterable[Any], num_samples: int | None) -> list[Any]:
    """Whole batches from the start of ``loader`` until they hold at least ``num_samples`` samples (all
    of them when ``None``)."""
    batches, count = [], 0
    for batch in loader:
        batches.append(batch)
        count += count_samples(batch)
        if num_samples is not None and count >= num_samples:
            break
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
        loader: a DataLoader or any re-iterable of batches (a list of batches too).
        num_samples: probe samples over all ranks (``None``: the whole loader), rounded up to whole batches.
        batch_size: re-batch this rank's samples to this size (tensors and per-sample lists are cut);
            ``None`` keeps the loader's batches.
        seed: global seed during the draw.
        rank, world_size: this process and the number of processes.

    Returns:
        The batches of this rank; possibly empty when there are fewer batches than ranks.

    Raises:
        ValueError: if the loader yields no samples.

    Example:
        >>> batches = [(torch.arange(4.0) + 4 * i, torch.arange(4) + 4 * i) for i in range(3)]
        >>> [b[1].tolist() for b in draw_probe_set(batches, num_samples=6, batch_size=None, seed=0, rank=0,
        ...                                        world_size=1)]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    sharded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
    share = num_samples
    if sharded and num_samples is not None:
        share = num_samples // world_size + (rank < num_samples % world_size)
    with _untouched_rng(loader, seed):
        batches = _first_batches(_without_workers(loader), share) if share != 0 else []
    if not batches and not sharded:
        raise ValueError("the probe dataloader yielded no samples; pass a non-empty `dataloader=`")
    if not sharded:
        batches = batches[rank::world_size]
    if not batches or batch_size is None:
        return batches
    return rebatch(batches, batch_size)
