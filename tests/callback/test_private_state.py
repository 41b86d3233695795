"""State a loader or a module owns privately is left as it was: samplers with their own random generators
or counters, module-owned generators, tensors inside containers. Every setup trains bit-identically with
and without the callback, and the private state ends where it ends without the callback."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_hessian import HessianSpectrumCallback
from lightning_hessian.callback.isolation import plain_state_kept
from lightning_hessian.callback.saved_state import CLONED_ELEMENTS, CLONED_TOTAL, SavedState

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
NUM_SAMPLES, FEATURES, CLASSES = 120, 6, 3


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(NUM_SAMPLES, FEATURES, generator=generator), torch.randint(0, CLASSES, (NUM_SAMPLES,),
                                                                                 generator=generator)


class Linear(pl.LightningModule):
    """A linear classifier; subclasses add the state under test."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(FEATURES, CLASSES)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(self.inputs(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _fit(model: pl.LightningModule, loader: DataLoader, with_callback: bool, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    callbacks = [HessianSpectrumCallback(k=2, every_n_steps=3, density=False)] if with_callback else []
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, **QUIET, **kwargs)
    trainer.fit(model, loader)
    return trainer


def _both(make_model, make_loader, **kwargs) -> tuple[pl.LightningModule, pl.LightningModule]:
    """Train without and with the callback from the same seed; the weights must be bit-identical."""
    runs = []
    for with_callback in (False, True):
        pl.seed_everything(0, verbose=False)
        model = make_model()
        _fit(model, make_loader(), with_callback, **kwargs)
        runs.append(model)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    return runs[0], runs[1]


# --- samplers and batch samplers with private state ----------------------------------------------------------


class TorchBatchSampler(Sampler):
    """Shuffles into batches with its own ``torch.Generator``."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.generator = n, size, torch.Generator().manual_seed(4)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter([order[i:i + self.size] for i in range(0, self.n, self.size)])

    def __len__(self) -> int:
        return -(-self.n // self.size)


class NumpyBatchSampler(TorchBatchSampler):
    """Shuffles into batches with a NumPy ``Generator``."""

    def __init__(self, n: int, size: int) -> None:
        super().__init__(n, size)
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        order = self.rng.permutation(self.n).tolist()
        return iter([order[i:i + self.size] for i in range(0, self.n, self.size)])


class PositionSampler(Sampler):
    """Yields ``num_samples`` indices from where it stopped last time: a position counter."""

    def __init__(self, n: int, num_samples: int) -> None:
        self.n, self.num_samples, self.position = n, num_samples, 0

    def __iter__(self):
        for _ in range(self.num_samples):
            yield self.position % self.n
            self.position += 1

    def __len__(self) -> int:
        return self.num_samples


class LegacyRandomSampler(Sampler):
    """Draws from a NumPy ``RandomState`` kept in a dict, and a Python ``random.Random``."""

    def __init__(self, n: int) -> None:
        self.n, self.streams = n, {"numpy": np.random.RandomState(3), "python": random.Random(5)}

    def __iter__(self):
        order = self.streams["numpy"].permutation(self.n).tolist()
        self.streams["python"].shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


class AugmentingDataset(Dataset):
    """Adds noise from its own generator in ``__getitem__`` and counts the items it served."""

    def __init__(self) -> None:
        self.x, self.y = _data()
        self.generator, self.served = torch.Generator().manual_seed(9), 0

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int):
        self.served += 1
        return self.x[index] + 0.1 * torch.randn(FEATURES, generator=self.generator), self.y[index]


class MaskingCollate:
    """A collate object that masks features with its own NumPy generator."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(2)

    def __call__(self, items):
        x = torch.stack([item[0] for item in items])
        mask = torch.as_tensor(self.rng.random(x.shape) > 0.2, dtype=x.dtype)
        return x * mask, torch.stack([item[1] for item in items])


class WrappingBatchSampler(Sampler):
    """A batch sampler around a sampler that is not called ``sampler`` and owns a generator."""

    def __init__(self, n: int) -> None:
        self.inner = {"order": TorchBatchSampler(n, 20)}

    def __iter__(self):
        return iter(self.inner["order"])

    def __len__(self) -> int:
        return len(self.inner["order"])


def _tensor_data() -> TensorDataset:
    return TensorDataset(*_data())


LOADERS = {
    "batch-sampler-torch-generator": lambda: DataLoader(_tensor_data(),
                                                        batch_sampler=TorchBatchSampler(NUM_SAMPLES, 20)),
    "batch-sampler-numpy-generator": lambda: DataLoader(_tensor_data(),
                                                        batch_sampler=NumpyBatchSampler(NUM_SAMPLES, 20)),
    "position-counter-sampler": lambda: DataLoader(_tensor_data(), sampler=PositionSampler(NUM_SAMPLES, 40),
                                                   batch_size=10),
    "randomstate-and-random-in-a-dict": lambda: DataLoader(_tensor_data(), sampler=LegacyRandomSampler(NUM_SAMPLES),
                                                           batch_size=20),
    "nested-batch-sampler": lambda: DataLoader(_tensor_data(), batch_sampler=WrappingBatchSampler(NUM_SAMPLES)),
    "dataset-with-own-generator": lambda: DataLoader(AugmentingDataset(), batch_size=20, shuffle=True),
    "collate-with-own-generator": lambda: DataLoader(_tensor_data(), batch_size=20, collate_fn=MaskingCollate()),
}


@pytest.mark.parametrize("make_loader", list(LOADERS.values()), ids=list(LOADERS))
def test_private_state_of_the_loader_chain_is_untouched_by_the_probe_draw(make_loader):
    _both(Linear, make_loader)


def test_the_draw_leaves_the_samplers_generator_where_training_left_it():
    loaders = []
    for with_callback in (False, True):
        pl.seed_everything(0, verbose=False)
        loader = LOADERS["batch-sampler-torch-generator"]()
        _fit(Linear(), loader, with_callback)
        loaders.append(loader)
    assert torch.equal(loaders[0].batch_sampler.generator.get_state(), loaders[1].batch_sampler.generator.get_state())


# --- module-owned generators and containers ------------------------------------------------------------------


class TorchNoise(Linear):
    """Noise injection from a module-owned ``torch.Generator``."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(123)

    def inputs(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.gen)


class NumpyMask(Linear):
    """Feature masking from a module-owned NumPy generator."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(7)

    def inputs(self, x):
        return x * torch.as_tensor(self.rng.random(x.shape) > 0.3, dtype=x.dtype)


class Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.streams = [random.Random(1), np.random.RandomState(2)]

    def forward(self, x):
        scale = self.streams[0].random() + self.streams[1].rand()
        return x * scale


class NestedNoise(Linear):
    """Generators in a list on a submodule: Python's ``random.Random`` and NumPy's ``RandomState``."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = Noise()

    def inputs(self, x):
        return self.noise(x)


class EMA(Linear):
    """An exponential moving average of the weights, in containers of every kind, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        params = dict(self.net.named_parameters())
        self.ema = {n: p.detach().clone() for n, p in params.items()}
        self.ema_list = [p.detach().clone() for p in params.values()]
        self.nested = collections.OrderedDict(decay={"values": [params["bias"].detach().clone()]})
        self.history = collections.deque([np.zeros(CLASSES)], maxlen=3)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            for (name, p), listed in zip(self.net.named_parameters(), self.ema_list, strict=True):
                self.ema[name].mul_(0.9).add_(p, alpha=0.1)
                listed.mul_(0.8).add_(p, alpha=0.2)
            self.nested["decay"]["values"][0].mul_(0.5).add_(self.net.bias, alpha=0.5)
        self.history[-1] += self.net.bias.detach().numpy()
        return super().training_step(batch, batch_idx)


def _loader() -> DataLoader:
    return DataLoader(_tensor_data(), batch_size=20, shuffle=True)


@pytest.mark.parametrize("make_model", [TorchNoise, NumpyMask, NestedNoise], ids=["torch", "numpy", "nested"])
def test_module_owned_generators_are_not_advanced_by_the_measurements(make_model):
    plain, probed = _both(make_model, _loader)
    assert torch.equal(plain.net.weight, probed.net.weight)


def test_a_module_owned_generator_ends_in_the_state_training_left():
    plain, probed = _both(TorchNoise, _loader)
    assert torch.equal(plain.gen.get_state(), probed.gen.get_state())


def test_tensors_and_arrays_inside_containers_do_not_drift():
    plain, probed = _both(EMA, _loader)
    for name in plain.ema:
        assert torch.equal(plain.ema[name], probed.ema[name]), name
    for a, b in zip(plain.ema_list, probed.ema_list, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.nested["decay"]["values"][0], probed.nested["decay"]["values"][0])
    assert np.array_equal(plain.history[-1], probed.history[-1])


def test_every_evaluation_of_a_user_loss_fn_starts_from_the_generator_state_training_left():
    """So the operator is one fixed matrix: with keep_graph=False every product evaluates the loss again."""
    model, states = TorchNoise(), []

    def loss_fn(module, batch):
        states.append(module.gen.get_state())
        return F.cross_entropy(module.net(module.inputs(batch[0])), batch[1])

    callback = HessianSpectrumCallback(k=2, density=False, loss_fn=loss_fn, keep_graph=False, budget=None, at_end=False)
    pl.Trainer(max_steps=1, callbacks=[callback], **QUIET).fit(model, _loader())
    assert len(states) > 2 and all(torch.equal(state, states[0]) for state in states)


def test_saved_state_covers_every_kind_of_value_it_promises():
    class Owner:
        pass

    owner = Owner()
    owner.tensor, owner.array = torch.zeros(3), np.zeros(3)
    owner.deep = {"a": [{"b": (torch.zeros(2),)}]}
    owner.generators = [torch.Generator().manual_seed(0), np.random.default_rng(0), np.random.RandomState(0),
                        random.Random(0), np.random.PCG64(0)]
    owner.inner = Owner()
    owner.inner.count = 0
    owner.removed = "here"
    saved = SavedState()
    saved.add(owner)
    first = [torch.rand(1, generator=owner.generators[0]).item(), owner.generators[1].random(),
             owner.generators[2].rand(), owner.generators[3].random(), owner.generators[4].random_raw()]
    owner.tensor.add_(1.0)
    owner.array += 1.0
    owner.deep["a"][0]["b"][0].add_(1.0)
    owner.deep["a"].append("new")
    owner.inner.count += 1
    owner.added = "new"
    del owner.removed
    saved.restore()
    again = [torch.rand(1, generator=owner.generators[0]).item(), owner.generators[1].random(),
             owner.generators[2].rand(), owner.generators[3].random(), owner.generators[4].random_raw()]
    assert again == first
    assert not owner.tensor.any() and not owner.array.any() and not owner.deep["a"][0]["b"][0].any()
    assert len(owner.deep["a"]) == 1 and owner.inner.count == 0
    assert owner.removed == "here" and not hasattr(owner, "added")


def test_the_copies_of_one_walk_stop_at_the_total_and_a_change_beyond_it_is_named():
    net = nn.Linear(2, 2)
    copied = CLONED_TOTAL // CLONED_ELEMENTS
    net.buffers_list = [torch.zeros(CLONED_ELEMENTS) for _ in range(copied + 1)]
    with pytest.warns(RuntimeWarning, match=rf"large tensor attribute Linear.buffers_list\[{copied}\] in place"):
        with plain_state_kept(net):
            for tensor in net.buffers_list:
                tensor.add_(1.0)
    assert all(not tensor.any() for tensor in net.buffers_list[:copied]) and net.buffers_list[copied].all()


def test_plain_state_kept_puts_a_generator_of_a_submodule_back():
    net = nn.Sequential(NestedNoise())
    before = net[0].noise.streams[1].get_state()[1].copy()
    with plain_state_kept(net):
        net[0].noise(torch.ones(2))
    assert np.array_equal(net[0].noise.streams[1].get_state()[1], before)


# --- the probe set is drawn from the samples the run trains on -----------------------------------------------


class Seen(Linear):
    """Records the first feature of every sample it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[float] = set()

    def training_step(self, batch, batch_idx):
        self.seen.update(batch[0][:, 0].tolist())
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("limit", [{"overfit_batches": 1}, {"limit_train_batches": 2}, {"limit_train_batches": 0.25}],
                         ids=["overfit_batches", "limit_train_batches-int", "limit_train_batches-fraction"])
def test_the_probe_set_holds_only_samples_the_run_trains_on(limit):
    model, callback = Seen(), HessianSpectrumCallback(k=2, every_n_steps=2, density=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **QUIET, **limit)
    trainer.fit(model, DataLoader(_tensor_data(), batch_size=20))
    probe = {v for batch in callback.probe_batches for v in batch[0][:, 0].tolist()}
    assert probe and probe <= model.seen
    assert len(callback.probe_batches) == trainer.num_training_batches
