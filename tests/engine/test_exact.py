"""The dense oracles themselves: `dense_hessian` and `dense_ggn` against independent routes."""


import functools

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian import dense_ggn, dense_hessian


def _tiny_batches(sizes):
    return lambda: cases.split(*cases.gaussian_mixture(sum(sizes), 3, 6), sizes)


@pytest.mark.parametrize("case", [
    pytest.param(cases.Case(lambda: cases.mlp((6, 5, 3)), cases.cross_entropy, _tiny_batches([12])),
                 id="mlp-tanh-ce"),
    pytest.param(cases.Case(lambda: cases.mlp((6, 5, 3), nn.Sigmoid), cases.squared_error, _tiny_batches([7, 23])),
                 id="mlp-sigmoid-mse-uneven"),
    pytest.param(cases.Case(cases.BatchNormDropoutNet, cases.cross_entropy, _tiny_batches([8, 12])),
                 id="batchnorm-eval"),
    pytest.param(cases.Case(cases.BatchNormDropoutNet, cases.cross_entropy, _tiny_batches([8, 12]), mode="train"),
                 id="batchnorm-train"),
    pytest.param(cases.Case(cases.WithUnused, cases.cross_entropy, _tiny_batches([20])), id="unused-parameter"),
    pytest.param(cases.Case(lambda: cases.mlp((6, 5, 3)), cases.dict_cross_entropy, cases.dict_batches),
                 id="dict-batches"),
    pytest.param(cases.Case(cases.AttentionNet, cases.cross_entropy, _tiny_batches([9, 11])), id="self-attention"),
])
def test_dense_hessian_matches_autograd_functional_hessian(case):
    model, batches = case.build(), case.batches()
    expected = cases.autograd_hessian(model, case.loss_fn, batches, mode=case.mode)
    actual = dense_hessian(model, case.loss_fn, batches, mode=case.mode)
    assert actual.dtype == torch.float64
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_dense_hessian_of_linear_least_squares_is_the_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x, target = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)

    def loss_fn(m, batch):
        return 0.5 * (m(batch[0]) - batch[1]).pow(2).sum(1).mean()

    # W is [3, 4] row-major, so H = I_3 (x) (X^T X / N).
    expected = torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x / 10)
    actual = dense_hessian(model, loss_fn, [(x[:3], target[:3]), (x[3:], target[3:])])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-14)


def test_dense_hessian_params_is_the_sub_block():
    model = cases.mlp((6, 5, 3))
    batches = _tiny_batches([20])()
    full = dense_hessian(model, cases.cross_entropy, batches)
    block = dense_hessian(model, cases.cross_entropy, batches, params=["2.*"])
    first = sum(p.numel() for p in model[0].parameters())
    assert block.shape == (18, 18)
    torch.testing.assert_close(block, full[first:, first:], rtol=0, atol=1e-14)


@pytest.mark.parametrize("output_loss", [
    pytest.param(cases.cross_entropy_on_outputs, id="cross-entropy"),
    pytest.param(cases.squared_error_on_outputs, id="squared-error"),
])
def test_dense_ggn_matches_explicit_jacobians(output_loss):
    model = cases.mlp((6, 4, 3))
    batches = _tiny_batches([5, 7])()
    replica = cases.mlp((6, 4, 3)).double()
    names = [n for n, _ in replica.named_parameters()]
    params = tuple(p.detach() for p in replica.parameters())
    num_params = sum(p.numel() for p in params)
    expected = torch.zeros(num_params, num_params, dtype=torch.float64)
    for x, y in batches:

        def outputs(*theta, x=x):
            return torch.func.functional_call(replica, dict(zip(names, theta, strict=True)), (x.double(),))

        blocks = torch.autograd.functional.jacobian(outputs, params)
        jacobian = torch.cat([j.reshape(x.shape[0] * 3, -1) for j in blocks], dim=1)
        f = outputs(*params).detach()

        def loss_of(flat, y=y, shape=f.shape):
            return output_loss(flat.reshape(shape), (None, y))

        output_hessian = torch.autograd.functional.hessian(loss_of, f.reshape(-1))
        expected += jacobian.T @ output_hessian @ jacobian * (x.shape[0] / 12)
    actual = dense_ggn(model, cases.outputs_of, output_loss, batches)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_dense_ggn_equals_dense_hessian_for_a_linear_model_with_squared_error():
    model = nn.Linear(6, 3)
    batches = _tiny_batches([10, 20])()
    hessian = dense_hessian(model, cases.squared_error, batches)
    ggn = dense_ggn(model, cases.outputs_of, cases.squared_error_on_outputs, batches)
    torch.testing.assert_close(ggn, hessian, rtol=0, atol=1e-13)


# --- every loss of torch.nn.functional with a second derivative ----------------------------------------------------
# Targets of n samples for three outputs per sample, from a seeded generator: float64 [n, 3], or int64 labels [n].
def _real(n, generator):
    return torch.randn(n, 3, generator=generator, dtype=torch.float64)


def _probabilities(n, generator):
    return torch.rand(n, 3, generator=generator, dtype=torch.float64)


def _labels(n, generator):
    return torch.randint(0, 3, (n,), generator=generator)


def _distributions(n, generator):
    return _real(n, generator).softmax(1)


def _counts(n, generator):
    return torch.poisson(torch.full((n, 3), 2.0, dtype=torch.float64), generator=generator)


def _rows(vector: Tensor, wrt: list[Tensor]) -> Tensor:
    """``d vector / d wrt`` as a ``[len(vector), total numel of wrt]`` matrix, one backward pass per entry."""
    rows = [torch.autograd.grad(v, wrt, retain_graph=True, allow_unused=True, materialize_grads=True) for v in vector]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])


def _loss_batches(targets):
    """A float64 tanh MLP ``4 -> 5 -> 3`` and two ``(x, target)`` batches of 5 and 9 samples."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(14, 4, generator=generator, dtype=torch.float64)
    return cases.mlp((4, 5, 3)).double(), list(zip(x.split([5, 9]), targets(14, generator).split([5, 9]), strict=True))


@pytest.mark.parametrize(("loss", "targets"), [
    pytest.param(F.mse_loss, _real, id="mse"),
    pytest.param(nn.MSELoss(), _real, id="mse-module"),
    pytest.param(F.huber_loss, _real, id="huber"),
    pytest.param(F.smooth_l1_loss, _real, id="smooth-l1"),
    pytest.param(F.binary_cross_entropy_with_logits, _probabilities, id="bce-with-logits"),
    pytest.param(functools.partial(F.cross_entropy, label_smoothing=0.1), _labels, id="cross-entropy-label-smoothing"),
    pytest.param(lambda f, y: F.nll_loss(F.log_softmax(f, dim=1), y), _labels, id="nll-after-log-softmax"),
    pytest.param(lambda f, p: F.kl_div(F.log_softmax(f, dim=1), p, reduction="batchmean"), _distributions,
                 id="kl-div-batchmean"),
    pytest.param(F.poisson_nll_loss, _counts, id="poisson-nll"),
])
def test_dense_hessian_and_ggn_of_every_twice_differentiable_loss(loss, targets):
    """Against double backward through all samples as one batch: each loss is a mean over samples, so the loss of
    the concatenation is the sample-weighted mean of the batches' losses. Each is convex in the outputs (softmax and
    exp inside the loss), so the Gauss-Newton split ``J^T (d^2 L / df^2) J`` applies to all of them."""
    model, batches = _loss_batches(targets)
    x, target = (torch.cat(parts) for parts in zip(*batches, strict=True))
    params = list(model.parameters())
    outputs = model(x)
    expected_hessian = _rows(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss(outputs, target), params, create_graph=True)]), params)
    free_outputs = outputs.detach().requires_grad_()
    (output_gradient,) = torch.autograd.grad(loss(free_outputs, target), free_outputs, create_graph=True)
    jacobian = _rows(outputs.reshape(-1), params)
    expected_ggn = jacobian.T @ _rows(output_gradient.reshape(-1), [free_outputs]) @ jacobian

    hessian = dense_hessian(model, lambda m, b: loss(m(b[0]), b[1]), batches)
    ggn = dense_ggn(model, cases.outputs_of, lambda f, b: loss(f, b[1]), batches)
    for actual, expected in ((hessian, expected_hessian), (ggn, expected_ggn)):
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max())
