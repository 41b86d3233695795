"""Drawing the probe set: whole batches, no trace on the random streams or the data order, no workers, split by rank."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, TensorDataset

from lightning_hessian.callback.probes import draw_probe_set


def _draw(loader, num_samples=None, batch_size=None, seed=0, rank=0, world_size=1):
    return draw_probe_set(loader, num_samples=num_samples, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size)


def _indices(batches) -> list[list[int]]:
    return [b[0].tolist() for b in batches]


def _numbers(size: int = 12) -> TensorDataset:
    return TensorDataset(torch.arange(size))


def test_whole_batches_are_taken_until_they_hold_num_samples():
    loader = DataLoader(_numbers(12), batch_size=5)
    assert _indices(_draw(loader, num_samples=6)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert _indices(_draw(loader, num_samples=5)) == [[0, 1, 2, 3, 4]]
    assert [len(b) for b in _indices(_draw(loader, num_samples=None))] == [5, 5, 2]
    assert [len(b) for b in _indices(_draw(loader, num_samples=100))] == [5, 5, 2]


def _shuffled_by_own_generator() -> DataLoader:
    return DataLoader(_numbers(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))


def _shuffled_by_sampler_generator() -> DataLoader:
    data = _numbers()
    return DataLoader(data, batch_size=4, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(1)))


def _shuffled_by_global_rng() -> DataLoader:
    return DataLoader(_numbers(), batch_size=4, shuffle=True)


def _epoch(loader) -> list[int]:
    return [i for batch in _indices(loader) for i in batch]


SHUFFLED = [
    pytest.param(_shuffled_by_own_generator, id="loader-generator"),
    pytest.param(_shuffled_by_sampler_generator, id="sampler-generator"),
    pytest.param(_shuffled_by_global_rng, id="global-rng"),
]


@pytest.mark.parametrize("make", SHUFFLED)
def test_the_next_epoch_of_a_shuffled_loader_is_the_one_it_would_have_been(make):
    """A plain extra pass over the same loader does change it."""
    torch.manual_seed(7)
    expected = _epoch(make())
    drawn, passed = make(), make()
    torch.manual_seed(7)
    probes = _draw(drawn, num_samples=8)
    assert _epoch(drawn) == expected and len(probes) == 2
    torch.manual_seed(7)
    _epoch(passed)
    assert _epoch(passed) != expected


@pytest.mark.parametrize("make", SHUFFLED)
def test_the_global_random_streams_and_the_loaders_generators_are_untouched(make):
    loader = make()
    generators = [g for g in (loader.generator, getattr(loader.sampler, "generator", None)) if g is not None]
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(),
              [g.get_state() for g in generators])
    _draw(loader, num_samples=8, seed=3)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate(), [g.get_state() for g in generators])
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3], strict=True))


def test_a_loader_on_the_global_rng_gives_the_probe_set_of_the_seed_whatever_the_global_state():
    torch.manual_seed(1)
    first = _indices(_draw(_shuffled_by_global_rng(), num_samples=8, seed=3))
    torch.manual_seed(2)
    again = _indices(_draw(_shuffled_by_global_rng(), num_samples=8, seed=3))
    other = _indices(_draw(_shuffled_by_global_rng(), num_samples=8, seed=4))
    assert first == again and first != other


class Pids(Dataset):
    """Each sample records its index and the process that loaded it."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, os.getpid()])


class PidStream(IterableDataset):
    def __iter__(self):
        for index in range(12):
            yield torch.tensor([index, os.getpid()])


def _marked(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collation of the loader's own: the drawing copy must use it."""
    stacked = torch.stack(samples)
    return {"index": stacked[:, 0], "pid": stacked[:, 1]}


@pytest.mark.parametrize("dataset", [Pids(), PidStream()], ids=["map-style", "iterable"])
def test_a_loader_with_workers_is_read_in_this_process_with_its_own_sampler_and_collation(dataset):
    def make(num_workers: int) -> DataLoader:
        sampler = None
        if not isinstance(dataset, IterableDataset):
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(5))
        return DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, collate_fn=_marked)

    batches = _draw(make(num_workers=2), num_samples=8)
    assert {pid for b in batches for pid in b["pid"].tolist()} == {os.getpid()}
    assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in list(make(num_workers=0))[:2]]


class WholeBatches(Dataset):
    """A dataset whose items are batches already, read with ``batch_size=None``."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(4) + 4 * index, torch.full((4,), float(index))


def test_a_loader_of_whole_batches_with_workers_gives_the_batches_it_gives_without():
    def make(num_workers: int) -> DataLoader:
        return DataLoader(WholeBatches(), batch_size=None, num_workers=num_workers)

    batches = _draw(make(num_workers=2), num_samples=8)
    expected = list(make(num_workers=0))[:2]
    assert [type(b) for b in batches] == [type(b) for b in expected]
    assert all(torch.equal(a, b) for got, want in zip(batches, expected, strict=True)
               for a, b in zip(got, want, strict=True))


def test_the_probe_set_of_a_loader_with_its_own_generator_does_not_depend_on_the_workers():
    def make(num_workers: int) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(12)), batch_size=4, shuffle=True, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(5))

    first_epoch = [b[0].tolist() for b in make(num_workers=0)][:2]
    for num_workers in (0, 2):
        assert [b[0].tolist() for b in _draw(make(num_workers), num_samples=8)] == first_epoch


def test_without_a_distributed_sampler_batch_i_goes_to_rank_i_modulo_world_size():
    loader = DataLoader(_numbers(20), batch_size=4)

    def batch_numbers(rank, world_size, num_samples=None):
        return [b[0] // 4 for b in _indices(_draw(loader, num_samples=num_samples, rank=rank, world_size=world_size))]

    assert [batch_numbers(r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert [batch_numbers(r, 2, num_samples=12) for r in range(2)] == [[0, 2], [1]]
    assert [batch_numbers(r, 3, num_samples=8) for r in range(3)] == [[0], [1], []]


def test_with_a_distributed_sampler_each_rank_takes_its_share_from_its_own_part():
    data = _numbers(16)

    def drawn(rank, num_samples):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(data, batch_size=2, sampler=sampler)
        return _indices(_draw(loader, num_samples=num_samples, rank=rank, world_size=2))

    assert drawn(0, 6) == [[0, 2], [4, 6]] and drawn(1, 6) == [[1, 3], [5, 7]]
    assert drawn(0, 5) == [[0, 2], [4, 6]] and drawn(1, 5) == [[1, 3]]
    assert drawn(0, 1) == [[0, 2]] and drawn(1, 1) == []
    assert drawn(1, None) == [[1, 3], [5, 7], [9, 11], [13, 15]]


class Texts(Dataset):
    """Per-sample strings next to the tensors: raw texts must stay with their inputs."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict:
        return {"x": torch.tensor([float(index)]), "text": f"s{index}"}


def _aligned(batches) -> list[list[int]]:
    numbers = []
    for batch in batches:
        assert [int(t[1:]) for t in batch["text"]] == batch["x"][:, 0].int().tolist()
        numbers.append(batch["x"][:, 0].int().tolist())
    return numbers


def test_rebatching_cuts_per_sample_lists_with_the_tensors():
    loader = DataLoader(Texts(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(2))
    rebatched = _aligned(_draw(loader, num_samples=7, batch_size=2))
    assert [len(b) for b in rebatched] == [2, 2, 2, 2, 1]
    first_batches = _aligned(_draw(loader, num_samples=7))
    assert [i for b in rebatched for i in b] == [i for b in first_batches for i in b]
    assert [len(b) for b in _aligned(_draw(loader, num_samples=7, batch_size=2, rank=1, world_size=2))] == [2, 1]


@pytest.mark.parametrize("loader", [[], DataLoader(_numbers(0), batch_size=4)], ids=["empty-list", "empty-loader"])
def test_an_empty_loader_is_refused_naming_the_dataloader_argument(loader):
    with pytest.raises(ValueError, match="`dataloader=`"):
        _draw(loader, num_samples=8)
