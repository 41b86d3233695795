"""The optimizer's edge of stability, from real Trainer runs: oracles on a fixed quadratic and least squares."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianSpectrumCallback

from helpers import trainer

EIGENVALUES = torch.tensor([3.0, 1.5, 0.5, 0.1, 0.0], dtype=torch.float64)


def quadratic_matrix() -> torch.Tensor:
    """``Q diag(EIGENVALUES) Q'`` with a fixed random rotation Q."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return q @ torch.diag(EIGENVALUES) @ q.T


class Quadratic(pl.LightningModule):
    """Loss ``0.5 theta' A theta`` whatever the batch: its Hessian is A everywhere."""

    def __init__(self, make_optimizer):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(1.0, -1.0, 5, dtype=torch.float64))
        self.register_buffer("a", quadratic_matrix())
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        return 0.5 * self.theta @ self.a @ self.theta + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class Recorder(pl.Callback):
    """After the callback under test (it comes later in the list): the parameters, the optimizer and the batch
    of every step, and a copy of the optimizer's state, where the callback measured."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.expected = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.expected[trainer.global_step] = self.oracle(trainer.optimizers[0], pl_module, batch)


def fit(module, *callbacks, steps: int):
    run = trainer(max_steps=steps, callbacks=list(callbacks))
    run.fit(module, DataLoader(TensorDataset(torch.zeros(4, 1, dtype=torch.float64)), batch_size=2))
    return run


def callback(**kwargs):
    settings = {"every_n_steps": 1, "k": 1, "tol": 1e-10, "density": False, "history_file": None, "progress": False}
    return HessianSpectrumCallback(**{**settings, **kwargs})


# --- SGD, heavy ball, Nesterov: the threshold of plain, momentum and Nesterov updates ----------------------

def sgd_threshold(lr, momentum=0.0, dampening=0.0, nesterov=False):
    """The largest stable curvature, from the roots of the recursion's characteristic polynomial (see the docs)."""
    if nesterov:
        return (2 + 2 * momentum) / ((1 + 2 * momentum) * lr)
    return (2 + 2 * momentum) / (lr * (1 - dampening) if momentum else lr)


SGD_CASES = [
    pytest.param({}, id="sgd"),
    pytest.param({"momentum": 0.9}, id="heavy-ball"),
    pytest.param({"momentum": 0.9, "dampening": 0.5}, id="heavy-ball-dampened"),
    pytest.param({"momentum": 0.5, "nesterov": True}, id="nesterov"),
]


@pytest.mark.parametrize("options", SGD_CASES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.25], ids=["no-decay", "l2-decay"])
def test_sgd_stability_is_the_exact_ratio(options, weight_decay):
    lr = 0.3
    probe = callback()
    run = fit(Quadratic(lambda p: torch.optim.SGD(p, lr=lr, weight_decay=weight_decay, **options)), probe, steps=3)
    expected = (3.0 + weight_decay) / sgd_threshold(lr, **options)
    assert [m.step for m in probe.history] == [0, 1, 2, 3]
    for measurement in probe.history:
        assert measurement.stability.optimizer == "SGD"
        assert measurement.stability.stability == pytest.approx(expected, rel=1e-4, abs=0)
        assert measurement.stability.threshold == pytest.approx(sgd_threshold(lr, **options), rel=1e-12)
    assert float(run.callback_metrics["hessian/stability"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("options", [c for c in SGD_CASES if c.id != "heavy-ball-dampened"])
def test_a_sweep_of_learning_rates_diverges_exactly_where_the_logged_ratio_exceeds_1(options):
    lr_edge = sgd_threshold(1.0, **options) / 3.0  # the threshold is inversely proportional to lr
    for factor in (0.8, 0.95, 1.05, 1.2):
        probe = callback(every_n_steps=None, budget=None, at_end=False)  # at step 0 only: H is constant
        module = Quadratic(lambda p, lr=factor * lr_edge: torch.optim.SGD(p, lr=lr, **options))
        fit(module, probe, steps=400)
        (measurement,) = probe.history
        start = torch.linspace(1.0, -1.0, 5, dtype=torch.float64).norm()
        norm = module.theta.detach().norm()
        diverged = not math.isfinite(float(norm)) or float(norm) > 1e3 * float(start)
        assert measurement.stability.stability == pytest.approx(factor, rel=1e-6)
        assert diverged == (measurement.stability.stability > 1), (factor, float(norm))


# --- Adam, AdamW, RMSprop, Adagrad: the preconditioned sharpness --------------------------------------------

def preconditioner_of(optimizer, theta):
    """P by the optimizer's formulas, from its state (the oracle's own reading)."""
    group, state = optimizer.param_groups[0], optimizer.state[theta]
    t, eps = float(state["step"]), group["eps"]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        beta1, beta2 = group["betas"]
        v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        return (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps)
    if isinstance(optimizer, torch.optim.RMSprop):
        v = state["square_avg"] - (state["grad_avg"] ** 2 if group["centered"] else 0)
        return v.sqrt() + eps
    return (1 + (t - 1) * group["lr_decay"]) * (state["sum"].sqrt() + eps)


def adaptive_oracle(optimizer, module, batch):
    """The exact ratio: top eigenvalue of P^-1/2 (A + L2) P^-1/2, dense, over the threshold of the heavy ball."""
    group = optimizer.param_groups[0]
    p = preconditioner_of(optimizer, module.theta).double()
    decay = 0.0 if isinstance(optimizer, torch.optim.AdamW) else group["weight_decay"]
    curvature = (module.a + decay * torch.eye(5, dtype=torch.float64)) / torch.outer(p.sqrt(), p.sqrt())
    top = float(torch.linalg.eigvalsh(curvature)[-1])
    if isinstance(optimizer, torch.optim.Adam):
        beta1 = group["betas"][0]
        threshold = (2 + 2 * beta1) / ((1 - beta1) * group["lr"])
    else:
        threshold = (2 + 2 * group.get("momentum", 0.0)) / group["lr"]
    return top, top / threshold


ADAPTIVE_CASES = [
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.05), id="adam"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.5, amsgrad=True), id="adam-l2-amsgrad"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), id="adamw"),
    pytest.param(lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True), id="rmsprop-centered"),
    pytest.param(lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.2), id="adagrad"),
]


@pytest.mark.parametrize("make_optimizer", ADAPTIVE_CASES)
def test_adaptive_stability_is_the_exact_preconditioned_ratio(make_optimizer):
    probe, recorder = callback(), Recorder(adaptive_oracle)
    run = fit(Quadratic(make_optimizer), probe, recorder, steps=4)
    first, *later = probe.history
    assert first.step == 0 and first.stability.stability is None  # no optimizer state before the first step
    assert first.stability.preconditioned_eig_1 is None
    assert [m.step for m in later] == [1, 2, 3, 4]
    for measurement in later:
        top, ratio = recorder.expected[measurement.step]
        assert measurement.stability.preconditioned_eig_1 == pytest.approx(top, rel=1e-4, abs=0)
        assert measurement.stability.stability == pytest.approx(ratio, rel=1e-4, abs=0)
        assert measurement.stability.preconditioned_residual < 1e-6
    assert float(run.callback_metrics["hessian/stability"]) == pytest.approx(ratio, rel=1e-4)


def test_reading_the_state_leaves_it_unchanged():
    """The optimizer's state after a run with the callback equals the state after the same run without it."""
    def train(with_callback):
        torch.manual_seed(0)
        module = Quadratic(lambda p: torch.optim.Adam(p, lr=0.05))
        run = fit(module, *([callback()] if with_callback else []), steps=3)
        return module.theta.detach().clone(), run.optimizers[0].state_dict()["state"][0]

    (plain, plain_state), (probed, probed_state) = train(False), train(True)
    assert torch.equal(plain, probed)
    assert all(torch.equal(plain_state[key], probed_state[key]) for key in plain_state)


# --- batch sharpness -------------------------------------------------------------------------------------------

class LeastSquares(pl.LightningModule):
    def __init__(self, make_optimizer=None, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(3, 1, dtype=torch.float64))
        self.make_optimizer = make_optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.net(x).squeeze(1) - y).pow(2).mean()

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def least_squares_data(n: int = 24) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
                         + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64))


def batch_sharpness_oracle(optimizer, module, batch):
    """g' H g / g' g on the batch, dense: H = [x 1]' [x 1] / n, g = [x 1]' r / n."""
    x, y = batch
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    w = torch.cat([module.net[1].weight.detach().flatten(), module.net[1].bias.detach()])
    hessian = design.T @ design / len(x)
    gradient = design.T @ (design @ w - y) / len(x)
    return float(gradient @ hessian @ gradient / (gradient @ gradient))


def test_adam_on_several_parameters_reads_each_ones_state_in_the_operators_order():
    """Least squares over all 24 samples (the probe set), a weight [1, 3] and a bias [1] with their own
    second moments and L2 decay: the dense P^-1/2 (H + w) P^-1/2, P in named_parameters' order."""
    data = least_squares_data()

    def oracle(optimizer, module, batch):
        x, _ = data.tensors
        design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        root = torch.cat([preconditioner_of(optimizer, p).flatten() for p in module.parameters()]).sqrt()
        curvature = (design.T @ design / len(x) + 0.1 * torch.eye(4, dtype=torch.float64)) / torch.outer(root, root)
        return float(torch.linalg.eigvalsh(curvature)[-1])

    probe, recorder = callback(k=2), Recorder(oracle)
    module = LeastSquares(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1))
    trainer(max_steps=4, callbacks=[probe, recorder]).fit(module, DataLoader(data, batch_size=6, shuffle=True))
    later = probe.history[1:]
    assert [m.step for m in later] == [1, 2, 3, 4]
    for measurement in later:
        top = recorder.expected[measurement.step]
        assert measurement.stability.preconditioned_eig_1 == pytest.approx(top, rel=1e-6)
        assert measurement.stability.stability == pytest.approx(top * 0.2 * 0.01 / 3.6, rel=1e-6)


def test_batch_sharpness_is_the_training_batch_curvature_along_its_gradient():
    probe, recorder = callback(k=2), Recorder(batch_sharpness_oracle)
    module = LeastSquares()
    trainer(max_steps=5, callbacks=[probe, recorder]).fit(module, DataLoader(least_squares_data(), batch_size=6,
                                                                             shuffle=True))
    first, *later = probe.history
    assert first.step == 0 and first.stability.batch_sharpness is None  # no training batch before the first step
    assert [m.step for m in later] == [1, 2, 3, 4, 5]
    for measurement in later:
        assert measurement.stability.batch_sharpness == pytest.approx(recorder.expected[measurement.step], rel=1e-8)
    # the probe-set Hessian differs from any one batch's: batch sharpness is not eig_1
    assert later[-1].stability.batch_sharpness != pytest.approx(later[-1].hessian.eigenvalues[0], rel=1e-3)


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), id="nesterov"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.01), id="adamw"),
])
def test_training_with_the_callback_is_bit_identical(make_optimizer):
    """Dropout, a shuffled loader and every call's preconditioned solve and batch product: nothing moves."""
    def train(with_callback):
        pl.seed_everything(5, verbose=False)
        module = LeastSquares(make_optimizer, dropout=0.2)
        run = trainer(max_epochs=2, callbacks=[callback(k=2, mode="train")] if with_callback else [])
        run.fit(module, DataLoader(least_squares_data(), batch_size=6, shuffle=True))
        return module.state_dict(), run.optimizers[0].state_dict()["state"], torch.rand(3)

    plain, probed = train(False), train(True)
    for key in plain[0]:
        assert torch.equal(plain[0][key], probed[0][key]), key
    for index, state in plain[1].items():
        assert all(torch.equal(value, probed[1][index][key]) for key, value in state.items())
    assert torch.equal(plain[2], probed[2])


# --- optimizers without a known edge ------------------------------------------------------------------------

class CustomSGD(torch.optim.SGD):
    """A subclass may change the update: no stability for it."""


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda p: CustomSGD(p, lr=0.1), id="subclass"),
    pytest.param(lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=2), id="lbfgs"),
])
def test_an_unknown_optimizer_gets_no_stability_tag_and_one_warning(make_optimizer):
    probe = callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fit(Quadratic(make_optimizer), probe, steps=3)
    said = [w for w in caught if "stability" in str(w.message)]
    name = type(run.optimizers[0]).__name__
    assert len(said) == 1, [str(w.message) for w in said]
    assert f"logs no hessian/stability: {name} is not an optimizer whose edge of stability is known" in str(
        said[0].message)
    assert len(probe.history) == 4 and all(m.stability is None for m in probe.history)
    assert "hessian/stability" not in run.callback_metrics and "hessian/eig_1" in run.callback_metrics


def test_tracked_calls_carry_the_exact_stability_and_batch_sharpness():
    """Between snapshots, every tracked call logs the ratio of the optimizer in use and the batch's sharpness."""
    probe = callback(every_n_steps=None, every_n_epochs=None, budget=None, track_every_n_steps=1)
    recorder = Recorder(adaptive_oracle)
    run = fit(Quadratic(ADAPTIVE_CASES[0].values[0]), probe, recorder, steps=4)
    tracked = [m for m in probe.history if not m.snapshot]
    assert [m.step for m in tracked] == [1, 2, 3, 4]
    for measurement in tracked:
        top, ratio = recorder.expected[measurement.step]
        assert measurement.stability.preconditioned_eig_1 == pytest.approx(top, rel=1e-4, abs=0)
        assert measurement.stability.stability == pytest.approx(ratio, rel=1e-4, abs=0)
        assert measurement.stability.batch_sharpness is not None
    assert float(run.callback_metrics["hessian/stability"]) == pytest.approx(ratio, rel=1e-4)
