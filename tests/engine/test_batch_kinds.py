"""Batch kinds and model kinds the operators measure exactly, or refuse early with the fix.

Every measurement is checked against a dense float64 oracle written here: the Hessian, by
``torch.autograd.functional.hessian``, of the mean loss over *all* samples at once, with no batching
and no sample weighting, so a wrong weight of a batch shows.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_sequence
from torch.utils.checkpoint import checkpoint

from lightning_hessian import HessianOperator, UnsupportedError, dense_hessian
from lightning_hessian.engine.batches import concat_batches, count_samples, map_tensors, rebatch, take_samples

from helpers import dense_oracle as oracle


def matrix_of(op: HessianOperator) -> Tensor:
    return op @ torch.eye(op.num_params, dtype=op.dtype)


def assert_close(matrix: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    error = float((matrix.double() - expected).abs().max() / expected.abs().max())
    assert error < rtol, error


# --- how samples are counted -------------------------------------------------------------------


class TimeMajorRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.RNN(3, 4), nn.Linear(4, 2)  # batch_first=False: inputs [T, B, d]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][-1])


def test_time_major_batches_weighted_by_sequences_with_num_samples_fn() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(5, 23, 3), torch.randint(0, 2, (23,))  # 23 sequences of 5 steps; batches of 10, 10, 3
    batches = [(x[:, i:i + 10], y[i:i + 10]) for i in range(0, 23, 10)]
    model = TimeMajorRNN()

    def loss(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    expected = oracle(model, lambda m: F.cross_entropy(m(x.double()), y))
    with pytest.warns(UserWarning, match=r"different leading sizes \(5, then 10\).*num_samples_fn="):
        counted_by_steps = HessianOperator(model, loss, batches, dtype=torch.float64)
    assert counted_by_steps.num_samples == 15  # the time steps: the warning says so
    op = HessianOperator(model, loss, batches, dtype=torch.float64, num_samples_fn=lambda b: b[0].shape[1])
    assert op.snapshot.batch_sizes == [10, 10, 3] and op.num_samples == 23
    assert_close(matrix_of(op), expected)
    dense = dense_hessian(model, loss, batches, num_samples_fn=lambda b: b[0].shape[1])
    assert_close(dense, expected)


def test_num_samples_fn_must_count_samples() -> None:
    with pytest.raises(ValueError, match=r"num_samples_fn\(batch 0\)=0 must be an integer >= 1"):
        HessianOperator(nn.Linear(2, 1), lambda m, b: m(b).mean(), [torch.ones(3, 2)], num_samples_fn=lambda b: 0)


def test_packed_sequences_count_their_sequences() -> None:
    torch.manual_seed(2)
    lengths = [5, 2, 4, 3, 1, 4, 2]
    seqs = [torch.randn(n, 3) for n in lengths]
    y = torch.randint(0, 2, (7,))
    torch.manual_seed(0)
    model = nn.ModuleDict({"gru": nn.GRU(3, 4), "head": nn.Linear(4, 2)})

    def logits(m: nn.Module, packed: Any) -> Tensor:
        return m["head"](m["gru"](packed)[1][-1])

    batches = [(pack_sequence(seqs[:4], enforce_sorted=False), y[:4]),
               (pack_sequence(seqs[4:], enforce_sorted=False), y[4:])]
    assert [count_samples(b) for b in batches] == [4, 3]
    op = HessianOperator(model, lambda m, b: F.cross_entropy(logits(m, b[0]), b[1]), batches, dtype=torch.float64)
    assert op.num_samples == 7
    moved = op.snapshot.batches[0][0]
    assert moved.data.dtype == torch.float64 and moved.batch_sizes.device.type == "cpu"
    everything = [s.double() for s in seqs]
    expected = oracle(model, lambda m: F.cross_entropy(logits(m, pack_sequence(everything, enforce_sorted=False)), y))
    assert_close(matrix_of(op), expected)
    with pytest.raises(TypeError, match="PackedSequence cannot be cut"):
        rebatch(batches, 2)


def test_a_0d_tensor_holds_no_samples() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    batches = [{"max_len": torch.tensor(4), "x": x[:8], "y": y[:8]},
               {"max_len": torch.tensor(4), "x": x[8:], "y": y[8:]}]
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), batches, dtype=torch.float64)
    assert op.snapshot.batch_sizes == [8, 3]
    assert_close(matrix_of(op), oracle(model, lambda m: F.cross_entropy(m(x.double()), y)))
    assert float(concat_batches(batches)["max_len"]) == 4  # the same in every batch: kept once


@dataclasses.dataclass
class Batch:
    x: Tensor
    y: Tensor
    source: str = "train"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: Tensor
    y: Tensor


class Custom:  # a custom batch class without len(), as a transfer_batch_to_device override would move it
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


@pytest.mark.parametrize("kind", [Batch, FrozenBatch, Custom])
def test_dataclass_and_object_batches(kind: type) -> None:
    torch.manual_seed(4)
    x, y = torch.randn(13, 4), torch.randint(0, 3, (13,))
    batches = [kind(x[:9], y[:9]), kind(x[9:], y[9:])]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b.x), b.y), batches, dtype=torch.float64)
    assert op.snapshot.batch_sizes == [9, 4]
    moved = op.snapshot.batches[0]
    assert type(moved) is kind and moved.x.dtype == torch.float64 and batches[0].x.dtype == torch.float32
    assert_close(matrix_of(op), oracle(model, lambda m: F.cross_entropy(m(x.double()), y)))
    joined = concat_batches(batches)
    assert type(joined) is kind and torch.equal(joined.x, x)
    assert torch.equal(take_samples(joined, 2, 5).y, y[2:5])
    assert map_tensors(batches[0], lambda t: t).x is batches[0].x


def test_a_batch_with_no_tensor_names_num_samples_fn() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"cannot count the samples of a batch of type Opaque.*num_samples_fn="):
        count_samples(Opaque())


def test_rebatching_keeps_a_tensor_every_batch_carries_once() -> None:
    weight = torch.tensor([1.0, 2.0, 1.0, 0.5])
    batches = [{"x": torch.randn(n, 3), "y": torch.zeros(n, dtype=torch.long), "class_weight": weight} for n in (5, 5)]
    rebatched = rebatch(batches, 4)
    assert [b["x"].shape[0] for b in rebatched] == [4, 4, 2]
    assert all(torch.equal(b["class_weight"], weight) for b in rebatched)
    batches[1]["class_weight"] = weight * 2
    with pytest.raises(TypeError, match=r"neither hold one entry per sample.*batch_size=None"):
        rebatch(batches, 4)


# --- model kinds -------------------------------------------------------------------------------


def test_sparse_embeddings_are_measured_densely() -> None:
    torch.manual_seed(5)
    tokens, y = torch.randint(0, 9, (14, 3)), torch.randint(0, 2, (14,))
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(9, 2, sparse=True), "head": nn.Linear(2, 2)})

    def loss(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m["head"](torch.tanh(m["emb"](b[0])).mean(1)), b[1])

    replica = copy.deepcopy(model)
    replica["emb"].sparse = False  # the oracle's double backward needs dense gradients
    expected = oracle(replica, lambda m: loss(m, (tokens, y)))
    for keep_graph in (True, False):
        op = HessianOperator(model, loss, [(tokens[:10], y[:10]), (tokens[10:], y[10:])], dtype=torch.float64,
                             keep_graph=keep_graph)
        assert_close(matrix_of(op), expected)
    assert model["emb"].sparse


class Checkpointed(nn.Module):
    def __init__(self, on_input: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.on_input, self.use_checkpoint = on_input, True
        self.inp = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.on_input else self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=True) if self.use_checkpoint else self.block(h)
        return self.head(h if not self.on_input else self.inp(h))


@pytest.mark.parametrize("on_input", [False, True])
def test_reentrant_checkpoints_give_the_full_hessian(on_input: bool) -> None:
    torch.manual_seed(6)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    model = Checkpointed(on_input)
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x[:7], y[:7]), (x[7:], y[7:])],
                         dtype=torch.float64)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    matrix = matrix_of(op)
    assert_close(matrix, oracle(plain, lambda m: F.cross_entropy(m(x.double()), y)))
    block = slice(*_span(model, "block."))
    assert matrix[block, block].abs().max() > 0  # the checkpointed block's rows are measured
    assert "apply" not in vars(torch.utils.checkpoint.CheckpointFunction)  # checkpointing is back as it was
    with torch.no_grad():
        assert checkpoint(model.block, x, use_reentrant=True).requires_grad is False


def _span(model: nn.Module, prefix: str) -> tuple[int, int]:
    start = 0
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            return start, start + sum(q.numel() for n, q in model.named_parameters() if n.startswith(prefix))
        start += p.numel()
    raise AssertionError(prefix)


class Mixed(nn.Module):  # float32 body, float64 head
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.float()).double())


def test_mixed_float32_float64_models_keep_their_dtypes() -> None:
    torch.manual_seed(7)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    model = Mixed()
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x[:6], y[:6]), (x[6:], y[6:])])
    assert op.dtype == torch.float64
    assert [leaf.dtype for leaf in op.snapshot.leaves] == [torch.float32] * 2 + [torch.float64] * 2
    expected = oracle(model, lambda m: F.cross_entropy(m.head(m.body(x.double())), y))  # all in float64
    assert_close(matrix_of(op), expected, rtol=1e-5)  # the body's products in float32


class AuxNet(nn.Module):  # auxiliary logits only in training mode
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.main, self.aux = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Any:
        h = torch.tanh(self.trunk(x))
        return (self.main(h), self.aux(h)) if self.training else self.main(h)


def _aux_loss(m: nn.Module, b: Any) -> Tensor:
    logits, aux = m(b[0])
    return F.cross_entropy(logits, b[1]) + 0.3 * F.cross_entropy(aux, b[1])


def test_outputs_that_differ_in_training_mode_name_mode_train() -> None:
    torch.manual_seed(8)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    model = AuxNet()
    op = HessianOperator(model, _aux_loss, [(x, y)], dtype=torch.float64)
    with pytest.raises(UnsupportedError, match=r"fails with the model in eval mode \(ValueError.*pass mode='train'"):
        op.matvec(torch.ones(op.num_params))
    trained = HessianOperator(model, _aux_loss, [(x, y)], dtype=torch.float64, mode="train")
    replica = copy.deepcopy(model).train()
    expected = oracle(replica, lambda m: _aux_loss(m.train(), (x.double(), y)))
    assert_close(matrix_of(trained), expected)
    assert model.training and model.trunk.training  # the model's modes are as they were
    with pytest.raises(ValueError, match="too many values") as raised:  # fails in both modes: the user's error
        HessianOperator(nn.Linear(4, 3), _aux_loss, [(x, y)]).matvec(torch.ones(15))
    assert not isinstance(raised.value, UnsupportedError)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.LazyLinear(3)), r"'0.weight' is not initialized yet .*nn.LazyLinear.*one forward pass"),
    (lambda: nn.Linear(4, 3).to("meta"), r"'weight' is on the meta device.*to_empty"),
    (lambda: _ComplexLinear(), r"'w' is complex \(torch.complex64\).*params="),
])
def test_parameters_without_real_values_are_refused_early(make: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(UnsupportedError, match=match):
        HessianOperator(make(), lambda m, b: m(b[0]).abs().mean(), [(torch.ones(2, 4),)])


def test_meta_batches_are_refused_early() -> None:
    with pytest.raises(UnsupportedError, match="meta device"):
        dense_hessian(nn.Linear(4, 3), lambda m, b: m(b).mean(), [torch.ones(2, 4, device="meta")])


class _ComplexLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 3, dtype=torch.cfloat))

    def forward(self, x: Tensor) -> Tensor:
        return x.to(torch.cfloat) @ self.w
