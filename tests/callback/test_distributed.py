"""The DDP-summed operator in one process: sample-weighted sums over ranks, one all-reduce per product on every rank."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_hessian import HessianOperator
from lightning_hessian.callback.distributed import SummedOperator
from lightning_hessian.engine import NonFiniteError

F64 = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).to(F64)


def _batches(sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=generator, dtype=F64), torch.randn(n, 1, generator=generator, dtype=F64))
            for n in sizes]


def _squared_error(module: nn.Module, batch) -> torch.Tensor:
    return (module(batch[0]) - batch[1]).pow(2).mean()


def _operator(model: nn.Module, batches, loss_fn=_squared_error) -> HessianOperator:
    return HessianOperator(model, loss_fn, batches, dtype=F64)


def _summed(local, strategy) -> SummedOperator:
    return SummedOperator(local, strategy, num_params=11, dtype=F64, device=torch.device("cpu"))


def _vectors(columns: int = 3) -> torch.Tensor:
    return torch.randn(11, columns, generator=torch.Generator().manual_seed(1), dtype=F64)


@pytest.fixture
def one_process_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_in_a_one_process_group_the_summed_operator_is_the_local_one(one_process_group):
    model, batches = _model(), _batches([5, 3], seed=2)
    local = _operator(model, batches)
    summed = _summed(_operator(model, batches), DDPStrategy())
    vectors = _vectors()
    torch.testing.assert_close(summed.matmat(vectors), local.matmat(vectors), rtol=1e-12, atol=1e-14)
    assert summed.num_samples == 8 and summed.num_matvecs == 3
    single = summed.matvec(vectors[:, 0].float())
    assert single.shape == (11,) and single.dtype == F64 and summed.num_matvecs == 4
    torch.testing.assert_close(single, local.matvec(vectors[:, 0].float()), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(summed.gradient(), local.gradient(), rtol=1e-12, atol=1e-14)


class PeerRank(SingleDeviceStrategy):
    """A CPU strategy whose all-reduce adds, in place as Lightning's does, what a second rank sends: in one
    process no second rank exists, so its tensors are recorded from another operator and handed in here."""

    def __init__(self, incoming: list[torch.Tensor] | None = None) -> None:
        super().__init__(device=torch.device("cpu"))
        self.incoming = list(incoming or [])
        self.sent: list[torch.Tensor] = []

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert reduce_op == "sum"
        self.sent.append(tensor.clone())
        if self.incoming:
            tensor += self.incoming.pop(0)
        return tensor


def test_products_and_gradients_are_weighted_by_each_ranks_samples():
    model, mine, theirs = _model(), _batches([5, 3], seed=2), _batches([2], seed=3)
    vectors = _vectors()
    peer = _summed(_operator(model, theirs), PeerRank())
    peer.matmat(vectors)
    peer.gradient()
    summed = _summed(_operator(model, mine), PeerRank(incoming=peer.strategy.sent))
    whole = _operator(model, mine + theirs)
    product = summed.matmat(vectors)
    torch.testing.assert_close(product, whole.matmat(vectors), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(summed.gradient(), whole.gradient(), rtol=1e-12, atol=1e-14)
    assert summed.num_samples == 10
    mean_of_means = (_operator(model, mine).matmat(vectors) + _operator(model, theirs).matmat(vectors)) / 2
    assert not torch.allclose(product, mean_of_means)


def test_a_rank_without_probe_samples_takes_part_in_every_all_reduce_with_nothing():
    model, theirs = _model(), _batches([2], seed=3)
    vectors = _vectors()
    peer = _summed(_operator(model, theirs), PeerRank())
    peer.matmat(vectors)
    peer.matvec(vectors[:, 0])
    empty = _summed(None, PeerRank(incoming=peer.strategy.sent))
    torch.testing.assert_close(empty.matmat(vectors), _operator(model, theirs).matmat(vectors), rtol=1e-12, atol=1e-14)
    assert empty.matvec(vectors[:, 0]).shape == (11,)
    assert empty.num_samples == 2 and empty.num_matvecs == 4
    assert [tuple(t.shape) for t in empty.strategy.sent] == [(34,), (12,)]
    assert all(not t.any() for t in empty.strategy.sent)


def _non_finite(module: nn.Module, batch) -> torch.Tensor:
    return _squared_error(module, batch) * float("inf")


def test_a_non_finite_product_on_one_rank_raises_on_every_rank_after_one_all_reduce():
    model, vectors = _model(), _vectors()
    broken = _summed(_operator(model, _batches([4], seed=2), loss_fn=_non_finite), PeerRank())
    with pytest.raises(NonFiniteError, match="at least one rank"):
        broken.matmat(vectors)
    [sent] = broken.strategy.sent
    assert sent[:-1].isnan().all() and sent[-1] == 4
    healthy = _summed(_operator(model, _batches([2], seed=3)), PeerRank(incoming=broken.strategy.sent))
    with pytest.raises(NonFiniteError, match="at least one rank"):
        healthy.matmat(vectors)
    assert len(healthy.strategy.sent) == 1
