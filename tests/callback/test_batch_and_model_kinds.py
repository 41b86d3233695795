"""Batch kinds and model kinds in a real ``fit``: each is measured against a dense float64 Hessian of a loss
written here (over the callback's own probe batches, each weighted by its samples), or refused with one
warning that names the fix while training goes on."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianSpectrumCallback

from helpers import dense_oracle, trainer

FEATURES, CLASSES = 8, 4


def _data(n: int = 160) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(n, FEATURES, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def _exact(**kwargs: Any) -> HessianSpectrumCallback:
    """Top 3 at a tight tolerance, measured at the start and after the last step only."""
    settings = dict(k=3, tol=1e-8, density=False, budget=None, num_samples=None)
    settings.update(kwargs)
    return HessianSpectrumCallback(**settings)


def _assert_matches_dense(callback: HessianSpectrumCallback, model: nn.Module,
                          loss: Callable[[nn.Module, Any], Tensor], count: Callable[[Any], int]) -> None:
    """The last record's top 3 equal the dense float64 Hessian's of ``loss``, batches weighted by ``count``."""
    batches = callback.probe_batches
    sizes = [count(b) for b in batches]

    def mean_loss(m: nn.Module) -> Tensor:
        return sum(n * loss(m, _double(b)) for n, b in zip(sizes, batches, strict=True)) / sum(sizes)

    expected = torch.linalg.eigvalsh(dense_oracle(model, mean_loss)).flip(0)[:3]
    measured = torch.tensor(callback.history[-1].hessian.eigenvalues, dtype=torch.float64)
    torch.testing.assert_close(measured, expected, rtol=1e-5, atol=0)
    assert callback.history[-1].num_samples == sum(sizes)


def _double(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, PackedSequence):
        return batch._replace(data=batch.data.double())
    if isinstance(batch, dict):
        return {key: _double(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_double(value) for value in batch)
    if dataclasses.is_dataclass(batch):
        fields = {f.name: _double(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        return dataclasses.replace(batch, **fields)
    return batch


class Classifier(pl.LightningModule):
    """``net`` on ``inputs(batch)``, cross-entropy on ``targets(batch)``; subclasses pick the batch kind."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, CLASSES))

    def inputs(self, batch: Any) -> Tensor:
        return batch[0]

    def targets(self, batch: Any) -> Tensor:
        return batch[1]

    def loss(self, net: nn.Module, batch: Any) -> Tensor:
        return F.cross_entropy(net(self.inputs(batch)), self.targets(batch))

    def training_step(self, batch, batch_idx):
        return self.loss(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _fit(model: pl.LightningModule, loader: DataLoader, callback: HessianSpectrumCallback, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    run = trainer(max_epochs=1, callbacks=[callback], **kwargs)
    run.fit(model, loader)
    return run


# --- how samples are counted -------------------------------------------------------------------------------------


class DictBatches(Classifier):
    def inputs(self, batch):
        return batch["x"]

    def targets(self, batch):
        return batch["y"]


def _dict_collate(items):
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    return {"max_len": torch.tensor(x.shape[1]), "x": x, "y": y}


def test_a_0d_tensor_first_in_the_batch_holds_no_samples():
    callback, model = _exact(), DictBatches()
    _fit(model, DataLoader(TensorDataset(*_data()), batch_size=20, collate_fn=_dict_collate), callback)
    assert callback.history[-1].num_samples == 160
    _assert_matches_dense(callback, model.net, model.loss, lambda b: b["x"].shape[0])


class TimeMajor(Classifier):
    """``nn.RNN`` on ``[T, B, d]`` batches (PyTorch's default layout), the last state classified."""

    def __init__(self) -> None:
        super().__init__(nn.ModuleDict({"rnn": nn.RNN(3, 5), "head": nn.Linear(5, CLASSES)}))

    def loss(self, net, batch):
        _, hidden = net["rnn"](batch[0])
        return F.cross_entropy(net["head"](hidden[-1]), batch[1])


def _time_major_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 6, 3, generator=generator), torch.randint(0, CLASSES, (50,), generator=generator)

    def collate(items):  # [B, T, d] -> [T, B, d]
        return torch.stack([a for a, _ in items]).transpose(0, 1), torch.stack([b for _, b in items])

    return DataLoader(TensorDataset(x, y), batch_size=16, collate_fn=collate)  # uneven last batch: 2 samples


def test_time_major_batches_are_weighted_by_sequences_with_num_samples_fn():
    callback, model = _exact(num_samples_fn=lambda batch: batch[0].shape[1]), TimeMajor()
    _fit(model, _time_major_loader(), callback)
    assert callback.history[-1].num_samples == 50
    _assert_matches_dense(callback, model.net, model.loss, lambda b: b[0].shape[1])


def test_time_major_batches_without_num_samples_fn_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"different leading sizes \(6, then 16\).*num_samples_fn="):
        _fit(TimeMajor(), _time_major_loader(), _exact())


class Packed(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.ModuleDict({"gru": nn.GRU(3, 4), "head": nn.Linear(4, CLASSES)}))

    def loss(self, net, batch):
        _, hidden = net["gru"](batch[0])
        return F.cross_entropy(net["head"](hidden[-1]), batch[1])


def test_packed_sequences_count_their_sequences():
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randn(int(length), 3, generator=generator) for length in torch.randint(2, 7, (30,))]
    labels = torch.randint(0, CLASSES, (30,), generator=generator)

    def collate(items):
        return pack_sequence([s for s, _ in items], enforce_sorted=False), torch.stack([y for _, y in items])

    callback, model = _exact(), Packed()
    _fit(model, DataLoader(list(zip(sequences, labels, strict=True)), batch_size=8, collate_fn=collate), callback)
    assert callback.history[-1].num_samples == 30
    _assert_matches_dense(callback, model.net, model.loss, lambda b: int(b[0].batch_sizes[0]))


# --- batch objects -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    x: Tensor
    y: Tensor


class DataclassBatches(Classifier):
    def inputs(self, batch):
        return batch.x

    def targets(self, batch):
        return batch.y


def _dataclass_loader() -> DataLoader:
    def collate(items):
        return Batch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))

    return DataLoader(TensorDataset(*_data()), batch_size=20, collate_fn=collate)


@pytest.mark.parametrize("own_loss", [False, True], ids=["training_step", "loss_fn"])
def test_dataclass_batches(own_loss):
    model = DataclassBatches()
    loss_fn = (lambda m, b: F.cross_entropy(m.net(b.x), b.y)) if own_loss else None
    callback = _exact(loss_fn=loss_fn)
    _fit(model, _dataclass_loader(), callback)
    _assert_matches_dense(callback, model.net, model.loss, lambda b: b.x.shape[0])


class Custom:
    """A batch class without ``len()``, moved by the module's ``transfer_batch_to_device``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


class CustomBatches(DataclassBatches):
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return Custom(batch.x.to(device), batch.y.to(device))


def test_custom_batch_objects():
    def collate(items):
        return Custom(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))

    callback, model = _exact(), CustomBatches()
    _fit(model, DataLoader(TensorDataset(*_data()), batch_size=20, collate_fn=collate), callback)
    assert callback.history[-1].num_samples == 160
    assert isinstance(callback.probe_batches[0], Custom)


def _constant_weight_collate(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items]),
            "class_weight": torch.tensor([1.0, 2.0, 1.0, 0.5])}


class Weighted(DictBatches):
    def loss(self, net, batch):
        return F.cross_entropy(net(batch["x"]), batch["y"], weight=batch["class_weight"])


def test_rebatching_keeps_a_tensor_every_batch_carries_once():
    callback, model = _exact(batch_size=16), Weighted()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, DataLoader(TensorDataset(*_data()), batch_size=20, collate_fn=_constant_weight_collate), callback)
    assert not [w for w in caught if "different leading sizes" in str(w.message)]  # the weight holds no samples
    assert [b["x"].shape[0] for b in callback.probe_batches] == [16] * 10
    assert all(b["class_weight"].shape == (4,) for b in callback.probe_batches)
    _assert_matches_dense(callback, model.net, model.loss, lambda b: b["x"].shape[0])


# --- model kinds ---------------------------------------------------------------------------------------------------


class SparseEmbedding(Classifier):
    def __init__(self, sparse: bool = True) -> None:
        super().__init__(nn.ModuleDict({"emb": nn.Embedding(30, 5, sparse=sparse), "head": nn.Linear(5, 3)}))

    def loss(self, net, batch):
        return F.cross_entropy(net["head"](net["emb"](batch[0]).mean(1)), batch[1])


def test_sparse_embeddings_are_measured():
    tokens = torch.randint(0, 30, (160, 4), generator=torch.Generator().manual_seed(1))
    callback, model = _exact(), SparseEmbedding()
    _fit(model, DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=20), callback)
    dense = SparseEmbedding(sparse=False)
    dense.net.load_state_dict(model.net.state_dict())
    _assert_matches_dense(callback, dense.net, dense.loss, lambda b: b[0].shape[0])


class Checkpointed(Classifier):
    """A reentrant activation checkpoint around ``block``, on the raw input or on an inner activation."""

    def __init__(self, on_input: bool) -> None:
        super().__init__(nn.ModuleDict({"stem": nn.Linear(FEATURES, FEATURES), "head": nn.Linear(FEATURES, CLASSES),
                                        "block": nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh())}))
        self.on_input = on_input

    def forward_loss(self, net, batch, checkpointed: bool):
        def block(h):
            return checkpoint(net["block"], h, use_reentrant=True) if checkpointed else net["block"](h)

        x = batch[0]
        h = torch.tanh(net["stem"](block(x))) if self.on_input else block(torch.tanh(net["stem"](x)))
        return F.cross_entropy(net["head"](h), batch[1])

    def training_step(self, batch, batch_idx):
        return self.forward_loss(self.net, batch, checkpointed=True)

    def loss(self, net, batch):
        return self.forward_loss(net, batch, checkpointed=False)


@pytest.mark.parametrize("on_input", [False, True], ids=["inner_activation", "raw_input"])
def test_reentrant_activation_checkpoints_give_the_full_hessian(on_input):
    callback, model = _exact(), Checkpointed(on_input)
    _fit(model, DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    _assert_matches_dense(callback, model.net, model.loss, lambda b: b[0].shape[0])


class Mixed(Classifier):
    """A float32 body and a float64 head."""

    def __init__(self) -> None:
        super().__init__(nn.ModuleDict({"body": nn.Sequential(nn.Linear(FEATURES, 12), nn.Tanh()),
                                        "head": nn.Linear(12, CLASSES).double()}))

    def loss(self, net, batch):
        return F.cross_entropy(net["head"](net["body"](batch[0].float()).double()), batch[1])


def test_a_float32_model_with_a_float64_head_keeps_both():
    callback, model = _exact(), Mixed()
    _fit(model, DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    assert callback.history[-1].dtype == "float64"
    assert model.net["body"][0].weight.dtype == torch.float32
    # the oracle is all float64, the measurement's body float32: agreement to float32's precision
    batches = callback.probe_batches

    def mean_loss(m):
        return sum(b[0].shape[0] * F.cross_entropy(m["head"](m["body"](b[0].double())), b[1]) for b in batches) / 160

    expected = torch.linalg.eigvalsh(dense_oracle(model.net, mean_loss)).flip(0)[:3]
    torch.testing.assert_close(torch.tensor(callback.history[-1].hessian.eigenvalues, dtype=torch.float64),
                               expected, rtol=1e-4, atol=0)


class Lazy(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.LazyLinear(12), nn.Tanh(), nn.Linear(12, CLASSES)))


def test_lazy_modules_are_measured_once_their_first_forward_has_run():
    callback = _exact(every_n_steps=4)
    with pytest.warns(UserWarning, match="no spectrum at step 0: the module has lazy parameters"):
        run = _fit(Lazy(), DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    assert run.global_step == 8
    assert [(e.step, e.reason) for e in callback.events] == [(0, "uninitialized")]
    assert [m.step for m in callback.history] == [4, 8]


class Complex(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(FEATURES, CLASSES, dtype=torch.cfloat))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy((batch[0].to(torch.cfloat) @ self.w).abs(), batch[1])


def test_complex_parameters_are_refused_once_and_training_goes_on():
    callback = _exact(every_n_steps=2)
    with pytest.warns(UserWarning, match=r"cannot measure this run: parameter 'w' is complex.*requires_grad=False"):
        run = _fit(Complex(), DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    assert run.global_step == 8 and callback.history == []
    assert [(e.step, e.reason) for e in callback.events] == [(0, "unsupported")]


class AuxNet(Classifier):
    """Auxiliary logits only in training mode (Inception style)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.main, self.aux = nn.Linear(FEATURES, 12), nn.Linear(12, CLASSES), nn.Linear(12, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return (self.main(h), self.aux(h)) if self.training else self.main(h)

    def training_step(self, batch, batch_idx):
        logits, aux = self(batch[0])
        return F.cross_entropy(logits, batch[1]) + 0.3 * F.cross_entropy(aux, batch[1])


def test_outputs_that_differ_in_training_mode_name_mode_train_and_training_goes_on():
    callback = _exact()
    with pytest.warns(UserWarning, match=r"fails with the model in eval mode.*pass mode='train'"):
        run = _fit(AuxNet(), DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    assert run.global_step == 8 and callback.history == []
    assert [e.reason for e in callback.events] == ["unsupported"]
    measured = _exact(mode="train")
    _fit(AuxNet(), DataLoader(TensorDataset(*_data()), batch_size=20), measured)
    assert [m.step for m in measured.history] == [0, 8]


def test_a_restored_history_compares_equal_to_the_original():
    callback = HessianSpectrumCallback(k=2, every_n_steps=4)
    _fit(Classifier(), DataLoader(TensorDataset(*_data()), batch_size=20), callback)
    restored = HessianSpectrumCallback(k=2)
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history
    assert restored.history[0] != callback.history[1]
