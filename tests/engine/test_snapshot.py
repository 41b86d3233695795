"""The model snapshot, the batch walker, the argument checks and the memory policy the operators rely on."""

from __future__ import annotations

import cases
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, top_eigenvalues
from lightning_hessian.engine import memory, operators
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
    monkeypatch.setattr(operators, "available_bytes", lambda device: 5 * auto.graph_nbytes)
    tight = HessianOperator(problem.model(), cases.cross_entropy, batches, dtype=F64, keep_graph="auto")
    torch.testing.assert_close(tight.matmat(vectors), expected, rtol=1e-12, atol=1e-14)
    assert tight.keep_graph == 2 and sum(g is not None for g in tight._graphs) == 2
    assert memory.available_bytes(torch.device("cpu")) > 0
