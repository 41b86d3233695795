"""The engine on a model sharded by FSDP2's ``fully_shard``: 2 gloo processes against the dense float64 oracle.

One run of 2 ranks (``_results``, once per module) builds the sharded operator on each rank's own
batches and records what the engine's public calls return; the tests compare it with the dense
Hessian of the same unsharded model on all samples, and the ranks with each other.
"""

from __future__ import annotations

import math
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    NonSmoothError,
    dense_hessian,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.engine.stability import PreconditionedOperator, batch_sharpness

F64 = torch.float64
WORLD = 2
K = 3
SIZES = ([7, 5], [9])  # rank 0 holds two batches, rank 1 one: the ranks run different numbers of batches
TIMEOUT = 240
LAST = ["4.*"]  # the last layer
PRECONDITIONER = torch.linspace(0.5, 2.0, 99, dtype=F64)  # a diagonal P, as an optimizer's


def model(activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """5 -> 6 -> 6 -> 3 (99 parameters; the 6- and 3-row layers split unevenly over 2 ranks), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), activation(), nn.Linear(6, 6), activation(), nn.Linear(6, 3)).to(F64)


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(10 + rank)
    return [(torch.randn(n, 5, generator=generator, dtype=F64), torch.randint(0, 3, (n,), generator=generator))
            for n in SIZES[rank]]


def all_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for rank in range(WORLD) for batch in batches(rank)]


def cross_entropy(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def nan_on_rank_one(module: nn.Module, batch) -> torch.Tensor:
    loss = cross_entropy(module, batch)
    return loss * float("nan") if dist.get_rank() == 1 else loss


def sharded(activation: type[nn.Module] = nn.Tanh, layers: bool = True) -> nn.Sequential:
    """``model`` with ``fully_shard`` on each linear layer and the root (``layers``), or on the root alone."""
    net = model(activation)
    for layer in net:
        if layers and isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


def global_indices(net: nn.Module) -> torch.Tensor:
    """Where this rank's entries of a vector sit in the whole flat vector (``named_parameters()`` order)."""
    parts, offset = [], 0
    for param in net.parameters():
        numbers = torch.arange(offset, offset + param.numel()).reshape(param.shape)
        parts.append(distribute_tensor(numbers, param.device_mesh, [Shard(0)]).to_local().reshape(-1))
        offset += param.numel()
    return torch.cat(parts)


def train(rank: int, between=None) -> list[torch.Tensor]:
    """Two SGD steps of a sharded net; ``between(net)`` runs after each backward, before the step."""
    net = sharded(layers=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for batch in batches(rank)[:1] * 2:
        optimizer.zero_grad()
        cross_entropy(net, batch).backward()
        if between is not None:
            between(net)
        optimizer.step()
    return [p.to_local() for p in net.parameters()]


def _measure(rank: int) -> dict:
    net = sharded()
    cross_entropy(net, batches(rank)[0]).backward()  # a .grad that the products must leave as it is
    before = [(p.to_local().clone(), p.grad.to_local().clone()) for p in net.parameters()]
    op = HessianOperator(net, cross_entropy, batches(rank))
    shapes = []
    multiply = op.matmat

    def recorded(vectors):
        shapes.append(tuple(vectors.shape))
        return multiply(vectors)

    op.matmat = recorded
    probe = torch.randn(op.num_params, generator=torch.Generator().manual_seed(3), dtype=F64)
    index = global_indices(net)
    top = top_eigenvalues(op, k=K)
    density = spectral_density(op, num_probes=2, num_steps=8, deflate=top)
    last = HessianOperator(net, cross_entropy, batches(rank), params=LAST)  # 21 parameters: a full density is cheap
    full = spectral_density(last, num_probes=1, num_steps=last.num_params - K, reorthogonalize=True,
                            deflate=top_eigenvalues(last, k=K))
    results = {
        "type": type(op).__name__, "num_params": op.num_params, "length": op.shards.length,
        "num_samples": op.num_samples, "index": index, "gradient": op.gradient(),
        "product": op.matvec(probe[index]), "probe": probe,
        "eigenvalues": top.eigenvalues, "residuals": top.residuals, "converged": top.converged,
        "eigenvectors": top.eigenvectors, "full_nodes": full.nodes, "density_nodes": density.nodes,
        "density_weights": density.weights, "trace": density.trace, "shapes": shapes, "refined": op.num_refined,
        "restored": all(torch.equal(p.to_local(), value) and torch.equal(p.grad.to_local(), grad)
                        for p, (value, grad) in zip(net.parameters(), before, strict=True)),
    }
    results["sharpness"] = batch_sharpness(op)
    preconditioned = PreconditionedOperator(op, PRECONDITIONER[index])
    results["preconditioned"] = top_eigenvalues(preconditioned, k=1).eigenvalues
    probed = train(rank, lambda net: top_eigenvalues(HessianOperator(net, cross_entropy, batches(rank)), k=1,
                                                     max_matvecs=3))
    results["training_unchanged"] = all(torch.equal(a, b) for a, b in zip(train(rank), probed, strict=True))
    relu = HessianOperator(sharded(nn.ReLU, layers=False), cross_entropy, batches(rank))
    results["relu_eigenvalues"] = top_eigenvalues(relu, k=K).eigenvalues
    results["errors"] = {}
    for name, call in [
        ("nan", lambda: top_eigenvalues(HessianOperator(sharded(layers=False), nan_on_rank_one, batches(rank)), k=1)),
        ("dtype", lambda: HessianOperator(net, cross_entropy, batches(rank), dtype=torch.float32)),
        ("ggn", lambda: GGNOperator(net, lambda m, b: m(b[0]), lambda f, b: F.cross_entropy(f, b[1]), batches(rank))),
    ]:
        try:
            call()
            results["errors"][name] = None
        except (NonFiniteError, ValueError) as error:
            results["errors"][name] = (type(error).__name__, str(error))
    return results


def _rank(rank: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_measure(rank), Path(directory) / f"rank{rank}.pt")
    except BaseException:
        (Path(directory) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(directory: Path) -> list[dict]:
    """Run ``_rank`` in WORLD processes (a gloo group); their results, or a failure with the first traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.spawn(_rank, args=(port, str(directory)), nprocs=WORLD, join=False)
    try:
        finished = False
        for _ in range(TIMEOUT):
            if context.join(timeout=1):
                finished = True
                break
    except Exception:
        errors = sorted(directory.glob("*.error"))
        pytest.fail(errors[0].read_text() if errors else "a rank failed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert finished, f"the ranks did not finish within {TIMEOUT} s (a collective that one rank skipped?)"
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def dense() -> torch.Tensor:
    return dense_hessian(model(), cross_entropy, all_batches(), dtype=F64)


def test_the_operator_is_the_sharded_one_over_all_samples(ranks):
    for result in ranks:
        assert result["type"] == "ShardedHessianOperator"
        assert result["num_params"] == 99 and result["num_samples"] == 21


def test_each_rank_holds_its_part_of_every_vector_and_never_a_whole_one(ranks):
    indices = torch.cat([result["index"] for result in ranks])
    assert torch.equal(indices.sort().values, torch.arange(99))  # the parts are disjoint and cover the vector
    for result in ranks:
        length = result["length"]
        assert length == result["index"].numel() < 99
        assert result["eigenvectors"].shape == (K, length)
        assert result["shapes"] and all(shape[0] == length for shape in result["shapes"])


def test_gradient_and_product_match_the_unsharded_model_on_all_samples(ranks, dense):
    reference = model()
    parameters = list(reference.parameters())
    loss = sum(cross_entropy(reference, b) * b[0].shape[0] for b in all_batches()) / 21
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)])
    for result in ranks:
        index = result["index"]
        torch.testing.assert_close(result["gradient"], gradient[index], rtol=1e-12, atol=1e-14)
        product = dense @ result["probe"]
        torch.testing.assert_close(result["product"], product[index], rtol=0, atol=1e-8 * float(product.norm()))


def test_top_eigenvalues_match_the_dense_hessian_on_both_ranks(ranks, dense):
    values, vectors = torch.linalg.eigh(dense)
    expected = values.flip(0)[:K]
    for result in ranks:
        assert bool(result["converged"].all())
        assert result["refined"] == 0  # a smooth loss: no product judged to straddle a kink
        torch.testing.assert_close(result["eigenvalues"], expected, rtol=0, atol=1e-8)
    whole = torch.zeros(K, 99, dtype=F64)
    for result in ranks:
        whole[:, result["index"]] = result["eigenvectors"]
    overlaps = (whole @ vectors.flip(1)[:, :K]).diagonal().abs()  # the ranks' parts form the eigenvectors
    torch.testing.assert_close(overlaps, torch.ones(K, dtype=F64), rtol=0, atol=1e-6)


def test_batch_sharpness_and_the_preconditioned_top_eigenvalue_match_the_dense_hessian(ranks, dense):
    reference = model()
    loss = sum(cross_entropy(reference, b) * b[0].shape[0] for b in all_batches()) / 21
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(reference.parameters()))])
    scale = PRECONDITIONER.rsqrt()
    expected = torch.linalg.eigvalsh(scale[:, None] * dense * scale[None, :])[-1]
    for result in ranks:
        assert result["sharpness"] == pytest.approx(float(gradient @ dense @ gradient / (gradient @ gradient)),
                                                    rel=1e-8)
        torch.testing.assert_close(result["preconditioned"][0], expected, rtol=1e-8, atol=0)


def test_relu_net_top_eigenvalues_match_the_dense_hessian(ranks):
    expected = torch.linalg.eigvalsh(dense_hessian(model(nn.ReLU), cross_entropy, all_batches(), dtype=F64))
    for result in ranks:
        torch.testing.assert_close(result["relu_eigenvalues"], expected.flip(0)[:K], rtol=0, atol=1e-7)


def test_a_full_reorthogonalized_density_of_selected_parameters_has_every_eigenvalue_as_a_node(ranks):
    expected = torch.linalg.eigvalsh(dense_hessian(model(), cross_entropy, all_batches(), dtype=F64, params=LAST))
    for result in ranks:
        nodes = result["full_nodes"][0].sort().values
        torch.testing.assert_close(nodes, expected, rtol=0, atol=1e-7 * float(expected.abs().max()))


def test_both_ranks_return_the_same_numbers(ranks):
    first, second = ranks
    for key in ("eigenvalues", "residuals", "full_nodes", "density_nodes", "density_weights"):
        assert torch.equal(first[key], second[key]), key
    assert first["trace"] == second["trace"] and math.isfinite(first["trace"])


def test_products_leave_parameters_and_gradients_bit_for_bit(ranks):
    assert all(result["restored"] for result in ranks)


def test_training_with_products_between_its_steps_is_bit_identical(ranks):
    assert all(result["training_unchanged"] for result in ranks)


def test_a_non_finite_loss_on_one_rank_raises_on_every_rank(ranks):
    for result in ranks:
        name, message = result["errors"]["nan"]
        assert name == "NonFiniteError" and "at least one rank" in message


def test_what_sharded_parameters_cannot_do_is_refused_by_name(ranks):
    for result in ranks:
        assert result["errors"]["dtype"][0] == "UnsupportedError" and "dtype=None" in result["errors"]["dtype"][1]
        assert result["errors"]["ggn"][0] == "UnsupportedError" and "only HessianOperator" in result["errors"]["ggn"][1]


@pytest.fixture
def one_rank():
    """A one-process gloo group: ``fully_shard`` runs, and every collective is local."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def kinked(offset: float):
    """A one-weight net at w = 1 with loss ``w^2 / 2 + relu(w - 1 - offset)``: H = 1 (the kink's second
    derivative is zero) unless a difference straddles the kink at ``1 + offset``."""
    net = fully_shard(nn.Linear(1, 1, bias=False).to(F64))
    with torch.no_grad():
        net.weight.to_local().fill_(1.0)

    def loss(module: nn.Module, batch) -> torch.Tensor:
        w = module(batch).sum()
        return 0.5 * w**2 + F.relu(w - 1 - offset)

    return HessianOperator(net, loss, [torch.ones(1, 1, dtype=F64)])


def test_a_product_that_straddles_a_kink_is_recomputed_with_a_smaller_step(one_rank):
    op = kinked(3e-6)  # the first step, eps^(1/3) ~ 6e-6, crosses the kink; a 16 times smaller one does not
    torch.testing.assert_close(op.matvec(torch.ones(1, dtype=F64)), torch.ones(1, dtype=F64), rtol=1e-8, atol=0)
    assert op.num_refined == 1 and op.num_gradients == 5
    op.matvec(torch.ones(1, dtype=F64))  # the next product starts from the step that worked
    assert op.num_refined == 1 and op.num_gradients == 7


def test_a_product_that_cannot_get_clear_of_a_kink_raises(one_rank):
    with pytest.raises(NonSmoothError, match="kinks"):
        kinked(1e-10).matvec(torch.ones(1, dtype=F64))  # closer than the smallest step
