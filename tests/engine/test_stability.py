"""Edge-of-stability numerics: thresholds against the optimizers' own dynamics, operators against dense matrices."""

import math

import pytest
import torch
from torch import nn

from lightning_hessian.engine import HessianOperator, dense_hessian, top_eigenvalues
from lightning_hessian.engine.stability import (
    PreconditionedOperator,
    UnsupportedOptimizer,
    UpdateRule,
    batch_sharpness,
    preconditioner,
    stability_ratio,
    update_rules,
    weight_decays,
)

CURVATURES = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)


def diverges(optimizer_of, before_step=None, steps: int = 4000) -> bool:
    """Minimize ``0.5 sum(c x^2)`` with a torch optimizer; ``before_step(state, grad)`` may pin its state."""
    x = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = optimizer_of([x])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (CURVATURES * x * x).sum()).backward()
        if before_step is not None and optimizer.state.get(x):
            before_step(optimizer.state[x], x.grad + optimizer.param_groups[0]["weight_decay"] * x.detach())
        optimizer.step()
        if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 1e8:
            return True
    return False


@pytest.mark.parametrize("options", [
    pytest.param({}, id="gd"), pytest.param({"momentum": 0.9}, id="heavy-ball"),
    pytest.param({"momentum": 0.9, "dampening": 0.5}, id="dampened"),
    pytest.param({"momentum": 0.5, "nesterov": True}, id="nesterov"),
    pytest.param({"momentum": 0.9, "weight_decay": 0.5}, id="l2-decay"),
])
def test_sgd_diverges_just_above_its_threshold_and_not_just_below(options):
    def sgd_at(factor):
        (rule,) = update_rules(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0, **options))
        lr_edge = rule.threshold / (3.0 + rule.weight_decay)  # the threshold scales as 1 / lr
        return lambda params: torch.optim.SGD(params, lr=factor * lr_edge, **options)

    assert not diverges(sgd_at(0.98), steps=2000) and diverges(sgd_at(1.02), steps=2000)


V, G_AVG = torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.1, 0.5], dtype=torch.float64)


def pin_adam(beta2, step):
    """Sets ``exp_avg_sq`` so that the coming step's second moment is V, and its step count t."""
    def before_step(state, grad):
        state["exp_avg_sq"].copy_((V - (1 - beta2) * grad * grad) / beta2)
        state["step"].fill_(step - 1)
    return before_step


def pin_rmsprop(alpha, centered):
    def before_step(state, grad):
        state["square_avg"].copy_((V - (1 - alpha) * grad * grad) / alpha)
        if centered:
            state["grad_avg"].copy_((G_AVG - (1 - alpha) * grad) / alpha)
    return before_step


def preconditioned_top(p, decay=0.0):
    return float(((CURVATURES + decay) / p).max())


@pytest.mark.parametrize("case", ["adam", "adam-l2", "adam-t3", "rmsprop", "rmsprop-momentum-centered"])
def test_adaptive_updates_with_pinned_state_diverge_just_above_the_preconditioned_threshold(case):
    """With the second moment held fixed, the update is heavy ball on P^-1 H; the threshold is its edge."""
    eps, beta1, beta2 = 1e-8, 0.9, 0.5
    if case.startswith("adam"):
        step, decay = (3 if case == "adam-t3" else 10**6), (0.5 if case == "adam-l2" else 0.0)
        p = (1 - beta1**step) * ((V / (1 - beta2**step)).sqrt() + eps)
        (rule,) = update_rules(torch.optim.Adam([nn.Parameter(torch.ones(1))], lr=1.0, betas=(beta1, beta2)))
        lr_edge = rule.threshold / preconditioned_top(p, decay)
        make = lambda factor: lambda params: torch.optim.Adam(  # noqa: E731
            params, lr=factor * lr_edge, betas=(beta1, beta2), eps=eps, weight_decay=decay)
        pin = pin_adam(beta2, step)
    else:
        centered = case.endswith("centered")
        momentum = 0.9 if centered else 0.0
        p = (V - (G_AVG**2 if centered else 0)).sqrt() + eps
        lr_edge = UpdateRule(lr=1.0, momentum=momentum).threshold / preconditioned_top(p)
        make = lambda factor: lambda params: torch.optim.RMSprop(  # noqa: E731
            params, lr=factor * lr_edge, alpha=0.5, eps=eps, momentum=momentum, centered=centered)
        pin = pin_rmsprop(0.5, centered)
    assert not diverges(make(0.95), pin, steps=2000) and diverges(make(1.05), pin, steps=2000)


def test_rules_read_each_group_and_refuse_what_they_do_not_know():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    sgd = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.4, "weight_decay": 1.0}], lr=0.1)
    assert [rule.threshold for rule in update_rules(sgd)] == [20.0, 5.0]
    # the largest ratio over groups: (2 + 1) / 5
    assert stability_ratio(2.0, update_rules(sgd), preconditioned=False) == pytest.approx(0.6)
    assert weight_decays(sgd, [a, b]).tolist() == [0.0, 0.0, 1.0]
    adamw = torch.optim.AdamW([a], lr=0.1, weight_decay=0.1)
    assert update_rules(adamw)[0].weight_decay == 0.0 and weight_decays(adamw, [a]).tolist() == [0.0, 0.0]
    with pytest.raises(UnsupportedOptimizer, match="maximize=True"):
        update_rules(torch.optim.SGD([a], lr=0.1, maximize=True))
    with pytest.raises(UnsupportedOptimizer, match="NAdam is not an optimizer"):
        update_rules(torch.optim.NAdam([a]))


def test_preconditioner_reads_the_state_without_changing_it_and_leaves_out_what_has_no_state():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    adam = torch.optim.Adam([a, b], lr=0.1)
    assert preconditioner(adam, [a, b]) is None
    a.grad = torch.tensor([1.0, 2.0])
    adam.step()  # b has no gradient: no state
    before = {key: value.clone() for key, value in adam.state[a].items()}
    p = preconditioner(adam, [a, b])
    assert torch.allclose(p[:2], 0.1 * (torch.tensor([1.0, 2.0], dtype=torch.float64) + 1e-8))
    assert math.isinf(p[2])
    assert all(torch.equal(before[key], value) for key, value in adam.state[a].items())


def small_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, [batch]


def test_preconditioned_top_eigenvalue_equals_the_dense_one():
    model, loss_fn, batches = small_problem()
    hessian = dense_hessian(model, loss_fn, batches)
    p = torch.rand(hessian.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    shift = torch.full_like(p, 0.05)
    root = p.rsqrt()
    dense = root[:, None] * (hessian + torch.diag(shift)) * root[None, :]
    op = PreconditionedOperator(HessianOperator(model, loss_fn, batches, dtype=torch.float64), p, shift)
    result = top_eigenvalues(op, k=1, tol=1e-10)
    assert float(result.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-9)
    assert float(result.residuals[0]) < 1e-9


def test_batch_sharpness_equals_the_dense_quotient():
    model, loss_fn, batches = small_problem()
    hessian = dense_hessian(model, loss_fn, batches)
    op = HessianOperator(model, loss_fn, batches, dtype=torch.float64)
    gradient = op.gradient()
    assert batch_sharpness(op) == pytest.approx(float(gradient @ hessian @ gradient / (gradient @ gradient)), rel=1e-10)


@pytest.mark.parametrize("num_batches", [1, 2])
def test_the_gradient_and_its_product_match_the_dense_hessian(num_batches):
    model, loss_fn, (batch,) = small_problem()
    model.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))  # no gradient: zero rows
    batches = [batch] if num_batches == 1 else [(batch[0][:5], batch[1][:5]), (batch[0][5:], batch[1][5:])]
    hessian = dense_hessian(model, loss_fn, batches)
    op = HessianOperator(model, loss_fn, batches, dtype=torch.float64)
    gradient, product = op.gradient_and_product()
    torch.testing.assert_close(gradient, op.gradient(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(product, hessian @ gradient, rtol=1e-10, atol=1e-12)
    assert gradient.abs().sum() > 0 and product[:2].abs().max() == 0  # the module's own parameter comes first
