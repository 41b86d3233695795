"""The model snapshot, the batch walker, the argument checks and the memory policy the operators rely on."""

from __future__ import annotations

import gc
import weakref

import cases
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, top_eigenvalues
from lightning_hessian.engine import graphs, operators
from lightning_hessian.engine.batches import concat_batches, count_samples, rebatch, take_samples
from lightning_hessian.engine.checks import check_count, check_flag, check_fraction
from lightning_hessian.engine.snapshot import ModelSnapshot

F64 = torch.float64


def test_building_an_operator_from_a_shuffled_dataloader_leaves_the_global_rng_alone():
    x, y = cases.gaussian_mixture(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = torch.nn.Linear(10, 4)
    before = torch.random.get_rng_state()
    HessianOperator(model, cases.cross_entropy, loader)
    assert torch.equal(before, torch.random.get_rng_state())


def test_the_snapshot_flattens_columns_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    snapshot = ModelSnapshot(model, [torch.ones(4, 3)])
    matrix = torch.arange(2 * snapshot.num_params, dtype=torch.float32).reshape(snapshot.num_params, 2)
    parts = snapshot.unflatten(matrix)
    assert [tuple(p.shape) for p in parts] == [(2, 2, 3), (2, 2), (2, 1, 2), (2, 1)]
    torch.testing.assert_close(snapshot.flatten(parts), matrix)
    assert snapshot.num_samples == 4 and len(snapshot.others) == 0
    for leaf, (_, parameter) in zip(snapshot.leaves, model.named_parameters(), strict=True):
        assert leaf.requires_grad and leaf.data_ptr() != parameter.data_ptr()


def test_per_sample_lists_are_cut_and_joined_with_the_tensors():
    batch = {"x": torch.arange(6).reshape(3, 2), "text": ["a", "b", "c"], "meta": "one per batch"}
    assert count_samples(batch) == 3
    part = take_samples(batch, 1, 3)
    assert part["x"].tolist() == [[2, 3], [4, 5]] and part["text"] == ["b", "c"] and part["meta"] == "one per batch"
    joined = concat_batches([take_samples(batch, 0, 1), part])
    assert joined["text"] == ["a", "b", "c"]
    assert [b["text"] for b in rebatch([batch, batch], 4)] == [["a", "b", "c", "a"], ["b", "c"]]


@pytest.mark.parametrize(("check", "value", "error"), [
    pytest.param(check_count, True, ValueError, id="bool-is-not-a-count"),
    pytest.param(check_count, 2.0, ValueError, id="float-is-not-a-count"),
    pytest.param(check_flag, "no", TypeError, id="string-is-not-a-flag"),
    pytest.param(check_fraction, 2.0, ValueError, id="fraction-above-one"),
])
def test_checks_name_the_argument(check, value, error):
    with pytest.raises(error, match="value="):
        check("value", value)
    assert check_count("value", np.int32(3)) == 3 and check_count("value", torch.tensor(4)) == 4


def test_top_eigenvalues_refuses_a_tolerance_of_one_or_more():
    with pytest.raises(ValueError, match=r"tol=2\.0"):
        top_eigenvalues(cases.MatrixOperator(torch.eye(4, dtype=F64)), 1, tol=2.0)


def test_auto_keeps_as_many_graphs_as_fit_and_gives_the_same_products(monkeypatch):
    problem = cases.trained_digits()
    batches = cases.split(*cases.digits(400), [100] * 4)
    vectors = torch.randn(problem.hessian.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = HessianOperator(problem.model(), cases.cross_entropy, batches, dtype=F64, keep_graph=False)
    expected = exact.matmat(vectors)
    auto = HessianOperator(problem.model(), cases.cross_entropy, batches, dtype=F64, keep_graph="auto")
    torch.testing.assert_close(auto.matmat(vectors), expected, rtol=1e-12, atol=1e-14)
    assert auto.keep_graph == 4 and auto.graph_nbytes > 0  # plenty of memory here
    # With room for two and a half graphs, two are kept and the others recomputed.
    monkeypatch.setattr(graphs, "available_bytes", lambda device: 5 * auto.graph_nbytes)
    tight = HessianOperator(problem.model(), cases.cross_entropy, batches, dtype=F64, keep_graph="auto")
    torch.testing.assert_close(tight.matmat(vectors), expected, rtol=1e-12, atol=1e-14)
    assert tight.keep_graph == 2 and sum(g is not None for g in tight.graphs.graphs) == 2
    assert graphs.available_bytes(torch.device("cpu")) > 0


def _small_convnet() -> torch.nn.Module:
    """483 parameters and activations far larger than them: a graph of many numbers per parameter."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double()


def _image_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 6, 6, generator=generator, dtype=F64), torch.randint(0, 3, (24,), generator=generator)
    return [(x[:12], y[:12]), (x[12:], y[12:])]


def _pairwise_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A loss over in-batch pairs (the mean squared difference of two samples' outputs): the samples interact."""
    outputs = model(batch[0])
    return 2 * (outputs - outputs.mean(dim=0)).pow(2).sum(dim=1).mean()


@pytest.fixture
def no_byte_floor(monkeypatch):
    """Micro-batches from the numbers-per-parameter cap alone: the test models' graphs are far below the
    floor of bytes under which a batch stays whole."""
    monkeypatch.setattr(graphs, "_MICRO_BATCH_MIN_BYTES", 0)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.usefixtures("no_byte_floor")
def test_split_batches_cuts_large_graphs_into_micro_batches_and_keeps_the_operator(kind):
    batches = _image_batches()
    if kind == "hessian":
        build = lambda **o: HessianOperator(_small_convnet(), cases.cross_entropy, batches, dtype=F64, **o)  # noqa: E731
    else:
        build = lambda **o: operators.GGNOperator(_small_convnet(), cases.outputs_of,  # noqa: E731
                                                  cases.cross_entropy_on_outputs, batches, dtype=F64, **o)
    whole, split = build(), build(split_batches=True)
    vectors = torch.randn(whole.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(split.matmat(vectors), whole.matmat(vectors), rtol=1e-12, atol=1e-14)
    assert whole.snapshot.batch_sizes == [12, 12]
    assert len(split.snapshot.batch_sizes) > 2 and sum(split.snapshot.batch_sizes) == 24
    # The micro-batch's graph holds about the cap's numbers per parameter at most (the whole batch's, many more).
    cap = graphs._MICRO_BATCH_GRAPH_NUMBERS * 8 * split.num_params
    assert split.graph_nbytes <= 1.5 * cap < whole.graph_nbytes
    if kind == "hessian":
        torch.testing.assert_close(split.matmat(vectors), cases.autograd_hessian(_small_convnet(), cases.cross_entropy,
                                                                                batches) @ vectors)


@pytest.mark.parametrize(("mode", "loss"), [
    pytest.param("train", cases.cross_entropy, id="batch-statistics"),
    pytest.param("eval", _pairwise_loss, id="in-batch-pairs"),
])
@pytest.mark.usefixtures("no_byte_floor")
def test_split_batches_keeps_batches_whole_when_samples_interact(mode, loss):
    batches = _image_batches()
    whole = HessianOperator(_small_convnet(), loss, batches, dtype=F64, mode=mode)
    split = HessianOperator(_small_convnet(), loss, batches, dtype=F64, mode=mode, split_batches=True)
    vectors = torch.randn(whole.num_params, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(split.matmat(vectors), whole.matmat(vectors), rtol=1e-12, atol=1e-14)
    assert split.snapshot.batch_sizes == [12, 12] and split.graph_nbytes == whole.graph_nbytes


def test_a_graph_below_the_byte_floor_stays_whole_on_a_small_model():
    """The convnet's batch holds many numbers per parameter but few bytes: splitting would only cost passes."""
    split = HessianOperator(_small_convnet(), cases.cross_entropy, _image_batches(), dtype=F64, split_batches=True)
    split.matmat(torch.ones(split.num_params, 1, dtype=F64))
    assert split.snapshot.batch_sizes == [12, 12]
    assert graphs._MICRO_BATCH_GRAPH_NUMBERS * 8 * split.num_params < split.graph_nbytes < graphs._MICRO_BATCH_MIN_BYTES


def test_split_batches_keeps_small_graphs_whole():
    model = cases.mlp([64, 256, 10]).double()  # wide, on small batches: a graph of few numbers per parameter
    batches = [(x.double(), y) for x, y in cases.split(*cases.digits(40), [20, 20])]
    op = HessianOperator(model, cases.cross_entropy, batches, split_batches=True)
    torch.testing.assert_close(op.gradient(), HessianOperator(model, cases.cross_entropy, batches).gradient())
    assert op.snapshot.batch_sizes == [20, 20]
    assert op.graph_nbytes < graphs._MICRO_BATCH_GRAPH_NUMBERS * 8 * op.num_params


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_kept_graphs_do_not_hold_a_parameter_vector_per_batch(kind):
    model = cases.mlp([64, 256, 10]).double()  # 19k parameters, 20 samples a batch: activations of 6k numbers
    batches = [(x.double(), y) for x, y in cases.split(*cases.digits(40), [20, 20])]
    if kind == "hessian":
        op = HessianOperator(model, cases.cross_entropy, batches)
    else:
        op = operators.GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches)
    vectors = torch.randn(op.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    first = op.matmat(vectors)
    # The first derivatives (for the GGN, J^T u) keep their graphs but not their values.
    assert op.graph_nbytes < 8 * op.num_params
    torch.testing.assert_close(op.matmat(vectors), first, rtol=0, atol=0)
    exact = HessianOperator(model, cases.cross_entropy, batches, keep_graph=False) if kind == "hessian" else \
        operators.GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches, keep_graph=False)
    torch.testing.assert_close(first, exact.matmat(vectors), rtol=1e-12, atol=1e-14)


class _Recorded(torch.nn.Module):
    """A tanh layer that keeps a weak reference to its last output (which autograd saves for backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        self.output = weakref.ref(y)
        return y


def test_a_dropped_operator_frees_its_graphs():
    """At once, without the cycle collector: counting the saved tensors must not tie a graph to itself (a
    saved output that referenced its own node kept every measured graph alive for good, one batch of
    activations per call), and the graph store must hold no reference back to its operator."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), _Recorded(), torch.nn.Linear(8, 3)).double()
    batches = [(x.double(), y) for x, y in cases.split(*cases.gaussian_mixture(20, 3, 4), [10, 10])]
    gc.collect()
    gc.disable()
    try:
        for keep_graph in (True, "auto", False):
            op = HessianOperator(model, cases.cross_entropy, batches, keep_graph=keep_graph, split_batches=True)
            op.matvec(torch.ones(op.num_params, dtype=F64))
            output = model[1].output
            del op
            assert output() is None, keep_graph
    finally:
        gc.enable()
