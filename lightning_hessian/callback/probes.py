"""The probe set: a fixed list of batches on which every measurement is taken.

Drawn once from a dataloader: whole batches from its start until they hold ``num_samples`` samples
(a batch is never cut, so per-sample fields such as raw texts stay aligned and a stateful module
sees batches of the size training uses), with the global seed set to ``seed`` for the draw and every
random stream put back afterwards, the global ones and every state the loader owns (the generators,
counters and other attributes of the loader, its sampler, batch sampler, dataset and collate
object), so the training data order does not change (an extra pass over a shuffled loader would
otherwise change the next epoch's order). A DataLoader with workers is read in this process
instead, through a copy with the same dataset, sampler and collation, so no worker is created or
advanced for the draw. Of the training loader, the draw reads at most the batches an epoch trains on
(``limit_train_batches``, ``overfit_batches``).

Under DDP, a loader with a ``DistributedSampler`` (Lightning adds one to the training loader) is
already split by rank: each rank takes its share of ``num_samples`` from its own part. A loader
without one yields the same batches on every rank: the batches are taken once and batch ``i`` goes
to rank ``i % world_size``, so the probe set is the same as in one process.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy
import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_hessian.callback.saved_state import SavedState
from lightning_hessian.engine.batches import count_samples, rebatch


@contextlib.contextmanager
def _untouched_rng(loader: Any, seed: int) -> Iterator[None]:
    """Seed the global RNGs (torch, NumPy, Python) for a draw; put them back after, and with them every
    state the loader owns (see :class:`~lightning_hessian.callback.saved_state.SavedState`): the
    generators and counters of the loader, its sampler, batch sampler, dataset and collate object."""
    owned = SavedState()
    if not isinstance(loader, (list, tuple)):
        owned.add(loader)
    with isolate_rng():
        torch.manual_seed(seed)
        numpy.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            owned.restore()


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


def _first_batches(loader: Iterable[Any], num_samples: int | None, max_batches: int | None,
                   counter: Callable[[Any], int]) -> list[Any]:
    """Whole batches from the start of ``loader`` until they hold at least ``num_samples`` samples (all
    of them when ``None``), counted by ``counter``, at most ``max_batches`` of them."""
    batches, count = [], 0
    for batch in itertools.islice(loader, max_batches):
        batches.append(batch)
        count += counter(batch)
        if num_samples is not None and count >= num_samples:
            break
    return batches


def trained_batches(trainer: Any) -> int | None:
    """The batches of the training loader an epoch trains on, after ``limit_train_batches`` and
    ``overfit_batches`` (this rank's, under DDP); ``None`` when not limited or not known.

    Example:
        >>> import types
        >>> trained_batches(types.SimpleNamespace(num_training_batches=2)), trained_batches(object())
        (2, None)
    """
    count = getattr(trainer, "num_training_batches", None)
    return int(count) if isinstance(count, (int, float)) and math.isfinite(count) else None


def draw_probe_set(
    loader: Iterable[Any],
    *,
    num_samples: int | None,
    batch_size: int | None,
    seed: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
    num_samples_fn: Callable[[Any], int] = count_samples,
) -> list[Any]:
    """This rank's share of the probe set, as batches straight from the loader (not yet on device).

    Args:
        loader: a DataLoader or any re-iterable of batches (a list of batches too).
        num_samples: probe samples over all ranks (``None``: the whole loader), rounded up to whole batches.
        batch_size: re-batch this rank's samples to this size (tensors and per-sample lists are cut);
            ``None`` keeps the loader's batches.
        seed: global seed during the draw.
        rank, world_size: this process and the number of processes.
        max_batches: read at most this many batches of the loader (on this rank): the batches a run
            limited by ``limit_train_batches`` or ``overfit_batches`` trains on; ``None`` for no limit.
        num_samples_fn: the samples of a batch (default: the leading size of its first tensor).

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
        batches = _first_batches(_without_workers(loader), share, max_batches, num_samples_fn) if share != 0 else []
    if not batches and not sharded:
        raise ValueError("the probe dataloader yielded no samples; pass a non-empty `dataloader=`")
    if not sharded:
        batches = batches[rank::world_size]
    if not batches or batch_size is None:
        return batches
    return rebatch(batches, batch_size)
