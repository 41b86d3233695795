"""HessianOperator and GGNOperator products against dense float64 matrices, and their contract of no side effects."""

import random

import cases
import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    dense_ggn,
    dense_hessian,
    spectral_density,
    top_eigenvalues,
)

F64 = torch.float64


def _random_vectors(num_params, num_vectors=3, seed=0):
    return torch.randn(num_vectors, num_params, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_same_operator(actual, expected, rtol=1e-10):
    """Products agree to ``rtol`` relative to the largest entry of the expected products."""
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * float(scale))


# --- HessianOperator against the dense Hessian ------------------------------------------------


@pytest.mark.parametrize("case", cases.HESSIAN_CASES)
def test_hessian_products_equal_dense_hessian_times_vectors(case):
    model, batches = case.build(), case.batches()
    op = HessianOperator(model, case.loss_fn, batches, params=case.params, dtype=F64, mode=case.mode, **case.kwargs)
    hessian = dense_hessian(model, case.loss_fn, batches, params=case.params, mode=case.mode)
    vectors = _random_vectors(op.num_params)
    _assert_same_operator(op.matmat(vectors.T).T, vectors @ hessian)
    _assert_same_operator(op.matvec(vectors[0]), hessian @ vectors[0])
    _assert_same_operator(op @ vectors.T, hessian @ vectors.T)
    assert op.num_matvecs == 2 * vectors.shape[0] + 1
    assert op.num_samples == sum(cases.count_samples(b) for b in batches)


def test_products_are_the_same_whatever_the_batching():
    problem = cases.trained_digits()
    model = problem.model()
    x, y = (torch.cat(parts) for parts in zip(*problem.batches, strict=True))
    vectors = _random_vectors(problem.hessian.shape[0], num_vectors=4)
    products = {
        name: HessianOperator(model, cases.cross_entropy, cases.split(x, y, sizes), dtype=F64).matmat(vectors.T).T
        for name, sizes in {"1x512": [512], "8x64": [64] * 8, "uneven": [100, 3, 200, 128, 81]}.items()
    }
    for name in ("8x64", "uneven"):
        _assert_same_operator(products[name], products["1x512"])
    _assert_same_operator(products["1x512"], vectors @ problem.hessian)


def test_keep_graph_and_vectorize_do_not_change_the_products():
    model = cases.mlp((10, 12, 4), nn.ReLU)
    batches = cases.split(*cases.gaussian_mixture(60, 4, 10), [25, 35])
    vectors = _random_vectors(sum(p.numel() for p in model.parameters()), num_vectors=3)
    hessian_args = (HessianOperator, cases.cross_entropy)
    ggn_args = (GGNOperator, cases.outputs_of, cases.cross_entropy_on_outputs)
    for operator, *args in (hessian_args, ggn_args):
        products = []
        for keep_graph in (True, False):
            for vectorize in (True, False):
                op = operator(model, *args, batches, dtype=F64, keep_graph=keep_graph, vectorize=vectorize)
                products += [op.matmat(vectors.T).T, op.matmat(vectors.T).T]  # the second product reuses kept graphs
        for product in products[1:]:
            _assert_same_operator(product, products[0], rtol=1e-12)


def test_params_patterns_select_the_sub_block():
    model = cases.mlp((10, 12, 12, 4))
    batches = cases.split(*cases.gaussian_mixture(40, 4, 10), [40])
    full = dense_hessian(model, cases.cross_entropy, batches)
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    for patterns, names in ((["2.*"], ["2.weight", "2.bias"]), (["*.bias"], ["0.bias", "2.bias", "4.bias"]),
                            (["4.weight", "0.*"], ["0.weight", "0.bias", "4.weight"])):
        op = HessianOperator(model, cases.cross_entropy, batches, params=patterns, dtype=F64)
        assert op.param_names == names
        index = torch.cat([offsets[n] for n in names])
        vectors = _random_vectors(index.numel())
        _assert_same_operator(op.matmat(vectors.T).T, vectors @ full[index][:, index])


def test_unused_parameter_gives_zero_rows():
    model = cases.WithUnused()
    batches = cases.split(*cases.gaussian_mixture(30, 3, 6), [12, 18])
    op = HessianOperator(model, cases.cross_entropy, batches, dtype=F64)
    assert op.param_names[0] == "unused"  # a module's own parameters come before its children's
    unused = slice(0, 5)
    products = op.matmat(_random_vectors(op.num_params).T).T
    assert products[:, unused.stop :].abs().max() > 1e-3
    assert torch.all(products[:, unused] == 0)
    only_unused = torch.zeros(op.num_params, dtype=F64)
    only_unused[unused] = 1.0
    assert torch.all(op.matvec(only_unused) == 0)
    hessian = dense_hessian(model, cases.cross_entropy, batches)
    assert torch.all(hessian[unused] == 0) and torch.all(hessian[:, unused] == 0)


def test_tuple_list_and_dict_batches_give_the_same_operator():
    model = cases.mlp((6, 8, 3))
    tuples = cases.split(*cases.gaussian_mixture(48, 3, 6), [16, 32])
    lists = [list(b) for b in tuples]
    dicts = [{"x": x, "y": y} for x, y in tuples]
    vectors = _random_vectors(sum(p.numel() for p in model.parameters()))
    expected = HessianOperator(model, cases.cross_entropy, tuples, dtype=F64).matmat(vectors.T).T
    _assert_same_operator(HessianOperator(model, cases.cross_entropy, lists, dtype=F64).matmat(vectors.T).T, expected,
                          rtol=1e-14)
    by_dict = HessianOperator(model, cases.dict_cross_entropy, dicts, dtype=F64).matmat(vectors.T).T
    _assert_same_operator(by_dict, expected, rtol=1e-14)
    ggn = GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, dicts, dtype=F64)
    _assert_same_operator(ggn.matmat(vectors.T).T,
                          vectors @ dense_ggn(model, cases.outputs_of, cases.cross_entropy_on_outputs, tuples))


def test_train_mode_uses_batch_statistics_and_eval_mode_running_statistics():
    model = cases.BatchNormDropoutNet()
    batches = cases.split(*cases.gaussian_mixture(40, 3, 6), [16, 24])
    vectors = _random_vectors(sum(p.numel() for p in model.parameters()))
    products = {}
    for mode in ("eval", "train"):
        oracle = cases.autograd_hessian(model, cases.cross_entropy, batches, mode=mode)
        products[mode] = HessianOperator(model, cases.cross_entropy, batches, dtype=F64, mode=mode).matmat(vectors.T).T
        _assert_same_operator(products[mode], vectors @ oracle)
    assert (products["train"] - products["eval"]).abs().max() > 0.1 * products["eval"].abs().max()


def test_the_operator_is_a_snapshot_of_the_model_at_construction():
    model = cases.mlp((10, 12, 4))
    batches = cases.split(*cases.gaussian_mixture(40, 4, 10), [40])
    op = HessianOperator(model, cases.cross_entropy, batches)
    vectors = torch.randn(2, op.num_params)
    before = op.matmat(vectors.T).T
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    torch.testing.assert_close(op.matmat(vectors.T).T, before, rtol=0, atol=0)


@pytest.mark.parametrize("context", [
    pytest.param(torch.no_grad, id="no_grad"), pytest.param(torch.inference_mode, id="inference_mode")])
def test_products_work_with_gradients_disabled(context):
    model = cases.mlp((10, 12, 4))
    data = cases.gaussian_mixture(40, 4, 10)
    vectors = _random_vectors(sum(p.numel() for p in model.parameters()))
    expected = HessianOperator(model, cases.cross_entropy, [data], dtype=F64).matmat(vectors.T).T
    with context():
        batches = [tuple(t.clone() for t in data)]  # under inference_mode these are inference tensors
        product = HessianOperator(model, cases.cross_entropy, batches, dtype=F64).matmat(vectors.T).T
        ggn = GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches, dtype=F64)
        ggn = ggn.matmat(vectors.T).T
    _assert_same_operator(product, expected, rtol=1e-14)
    _assert_same_operator(ggn, vectors @ dense_ggn(model, cases.outputs_of, cases.cross_entropy_on_outputs, [data]))


# --- GGNOperator ------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "output_loss", "sizes"), [
    pytest.param(lambda: cases.mlp((10, 12, 4)), cases.cross_entropy_on_outputs, [64], id="mlp-ce-1batch"),
    pytest.param(lambda: cases.mlp((10, 8, 8, 4), nn.ReLU), cases.cross_entropy_on_outputs, [20, 31, 13],
                 id="mlp3-relu-ce-uneven"),
    pytest.param(lambda: cases.mlp((10, 12, 4), nn.Sigmoid), cases.squared_error_on_outputs, [30, 30],
                 id="mlp-sigmoid-mse"),
])
def test_ggn_products_equal_dense_ggn_times_vectors(build, output_loss, sizes):
    model = build()
    batches = cases.split(*cases.gaussian_mixture(sum(sizes), 4, 10), sizes)
    op = GGNOperator(model, cases.outputs_of, output_loss, batches, dtype=F64)
    ggn = dense_ggn(model, cases.outputs_of, output_loss, batches)
    vectors = _random_vectors(op.num_params)
    _assert_same_operator(op.matmat(vectors.T).T, vectors @ ggn)
    hessian = dense_hessian(model, lambda m, b: output_loss(cases.outputs_of(m, b), b), batches)
    assert (ggn - hessian).abs().max() > 1e-6  # a nonlinear net: G differs from H


def test_ggn_equals_hessian_for_a_linear_model_with_squared_error():
    model = nn.Linear(10, 4)
    batches = cases.split(*cases.gaussian_mixture(50, 4, 10), [20, 30])
    ggn = GGNOperator(model, cases.outputs_of, cases.squared_error_on_outputs, batches, dtype=F64)
    hessian = HessianOperator(model, cases.squared_error, batches, dtype=F64)
    identity = torch.eye(ggn.num_params, dtype=F64)
    _assert_same_operator(ggn.matmat(identity), hessian.matmat(identity), rtol=1e-13)
    _assert_same_operator(ggn.matmat(identity), dense_hessian(model, cases.squared_error, batches), rtol=1e-13)


@pytest.mark.parametrize("output_loss", [
    pytest.param(cases.cross_entropy_on_outputs, id="cross-entropy"),
    pytest.param(cases.squared_error_on_outputs, id="squared-error"),
])
def test_ggn_is_positive_semidefinite(output_loss):
    # P = 244 > N (C - 1) = 60: G has a null space, so its smallest eigenvalue is exactly zero.
    model = cases.mlp((10, 12, 4))
    batches = cases.split(*cases.gaussian_mixture(20, 4, 10), [8, 12])
    ggn = dense_ggn(model, cases.outputs_of, output_loss, batches)
    eigenvalues = torch.linalg.eigvalsh(ggn)
    assert eigenvalues[0] >= -1e-10 * eigenvalues[-1]
    hessian_eigenvalues = torch.linalg.eigvalsh(
        dense_hessian(model, lambda m, b: output_loss(cases.outputs_of(m, b), b), batches))
    assert hessian_eigenvalues[0] < -1e-4 * hessian_eigenvalues[-1]  # H itself is indefinite here
    op = GGNOperator(model, cases.outputs_of, output_loss, batches, dtype=F64)
    tol = 1e-8
    smallest = top_eigenvalues(op, 1, which="smallest", tol=tol)
    assert smallest.all_converged
    assert smallest.eigenvalues[0] >= -tol * eigenvalues[-1]


# --- no side effects ---------------------------------------------------------------------------


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "bn_tracking": {n: m.track_running_stats for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same_snapshot(after, before):
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert after[key].keys() == value.keys(), key
            for name, item in value.items():
                if isinstance(item, torch.Tensor):
                    assert torch.equal(after[key][name], item), f"{key}: {name} changed"
                else:
                    assert after[key][name] == item, f"{key}: {name} changed"
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            assert (after[key] == value).all(), f"{key} changed"
        else:
            assert after[key] == value, f"{key} changed"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_products_and_solvers_leave_model_and_rng_untouched(mode):
    model = cases.BatchNormDropoutNet()
    model.train()
    model.fc2.eval()  # mixed modes must come back mixed
    model.fc1.bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # e.g. in the middle of a gradient-accumulation window
    batches = cases.split(*cases.gaussian_mixture(40, 3, 6), [16, 24])
    before = _snapshot(model)
    assert before["modes"]["bn"] and before["modes"]["drop"] and not before["modes"]["fc2"]

    hessian = HessianOperator(model, cases.cross_entropy, batches, mode=mode)
    hessian.matmat(torch.randn(hessian.num_params, 3, generator=torch.Generator().manual_seed(0)))
    top_eigenvalues(hessian, 3, max_matvecs=20)
    spectral_density(hessian, num_probes=3, num_steps=10)
    ggn = GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches, mode=mode, keep_graph=False)
    top_eigenvalues(ggn, 2, max_matvecs=10)
    dense_hessian(model, cases.cross_entropy, batches, mode=mode)
    dense_ggn(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches, mode=mode)

    assert "fc1.bias" not in hessian.param_names
    _assert_same_snapshot(_snapshot(model), before)
