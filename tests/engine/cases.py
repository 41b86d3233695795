"""Seeded models, data and oracles shared by the engine tests.

Symbols: P parameters, N samples, C classes.

Every model and data set here is built from a fixed seed, so a failing test fails the same way on
every run. The expensive oracles (a trained digits MLP and its dense float64 Hessian) are built
once per session by cached functions; callers get a fresh copy of the model each time, so a test
that mutated one could not hide it from the next.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import HessianOperator, SpectralDensity, dense_hessian, spectral_density

LossFn = Callable[[nn.Module, Any], Tensor]

# Gaussian-mixture data: C centers at this distance scale, unit-variance clusters.
_CENTER_SCALE = 2.0


# --- data -----------------------------------------------------------------------------------


def gaussian_mixture(num_samples: int = 512, num_classes: int = 4, dim: int = 10, seed: int = 0) -> tuple[Tensor, ...]:
    """``x`` float32 ``[N, dim]`` and labels ``y`` int64 ``[N]`` (classes in turn) of a Gaussian mixture."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=generator) * _CENTER_SCALE
    y = torch.arange(num_samples) % num_classes
    x = centers[y] + torch.randn(num_samples, dim, generator=generator)
    return x, y


@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x[:1000].mean(0)) / x[:1000].std(0).clamp_min(1e-6)
    return x, torch.tensor(data.target, dtype=torch.int64)


def digits(num_samples: int = 1000) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` of scikit-learn's digits: ``x`` float32 ``[N, 64]`` standardized, ``y`` int64."""
    x, y = _digits()
    return x[:num_samples], y[:num_samples]


def split(x: Tensor, y: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Consecutive ``(x, y)`` batches of the given sizes (they must add up to at most N)."""
    total = sum(sizes)
    return list(zip(x[:total].split(list(sizes)), y[:total].split(list(sizes)), strict=True))


# --- losses ---------------------------------------------------------------------------------


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean softmax cross-entropy of an ``(x, y)`` batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def squared_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean over samples of half the squared distance between the outputs and one-hot labels."""
    return squared_error_on_outputs(model(batch[0]), batch)


def squared_error_on_outputs(outputs: Tensor, batch: Any) -> Tensor:
    """The loss of :func:`squared_error`, given the outputs: ``0.5 ||f - onehot(y)||^2`` averaged."""
    y = batch["y"] if isinstance(batch, dict) else batch[1]
    target = F.one_hot(y, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - target).pow(2).sum(1).mean()


def cross_entropy_on_outputs(outputs: Tensor, batch: Any) -> Tensor:
    """Mean cross-entropy given the logits."""
    y = batch["y"] if isinstance(batch, dict) else batch[1]
    return F.cross_entropy(outputs, y)


def outputs_of(model: nn.Module, batch: Any) -> Tensor:
    """The model's outputs for a tuple/list batch ``(x, y)`` or a dict batch ``{"x", "y"}``."""
    return model(batch["x"] if isinstance(batch, dict) else batch[0])


def dict_cross_entropy(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of a dict batch ``{"x": ..., "y": ...}``."""
    return F.cross_entropy(model(batch["x"]), batch["y"])


# --- models ---------------------------------------------------------------------------------


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """A fully connected net ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), activation()]
    return nn.Sequential(*layers[:-1])


class WithUnused(nn.Module):
    """An MLP plus a parameter the forward pass never reads (its Hessian rows are zero)."""

    def __init__(self, dim: int = 6, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.net = mlp((dim, 8, num_classes), seed=seed)
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BatchNormDropoutNet(nn.Module):
    """Linear -> BatchNorm -> tanh -> dropout -> linear, with running statistics away from their init."""

    def __init__(self, dim: int = 6, hidden: int = 8, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.train()
            for scale in (1.0, 3.0):
                self(torch.randn(32, dim) * scale + 1.0)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class AttentionNet(nn.Module):
    """Self-attention over tokens: ``[N, 2 T]`` inputs as T tokens of 2 features -> C logits.

    Torch runs ``scaled_dot_product_attention`` on a fused kernel by default (on CPU too), whose
    backward has no derivative: products through it need the engine's choice of the math kernel.
    """

    def __init__(self, dim: int = 6, width: int = 4, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(2, width)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.reshape(x.shape[0], -1, 2))
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(mixed.mean(1))


# --- an explicit matrix as an operator ------------------------------------------------------


class MatrixOperator:
    """A symmetric matrix known by its products, counting them like the curvature operators do."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[P, S] -> [P, S]``, one vector per column."""
        self.num_matvecs += vectors.shape[1]
        return self.matrix @ vectors


def matrix_with_spectrum(eigenvalues: Sequence[float], seed: int = 0) -> Tensor:
    """A dense float64 symmetric matrix ``Q diag(eigenvalues) Q^T`` with a seeded random rotation."""
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=generator, dtype=torch.float64))
    return (q * values) @ q.T


# --- an independent oracle ------------------------------------------------------------------


def autograd_hessian(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], mode: str = "eval") -> Tensor:
    """The float64 Hessian of the sample-weighted mean loss by :func:`torch.autograd.functional.hessian`.

    A route independent of the engine (no :mod:`torch.func` transforms, no double-backward
    products): each batch's loss is a function of one flat float64 vector; the model runs on a deep
    copy in float64 with dropout off and, for ``mode="train"``, batch statistics.
    """
    replica = copy.deepcopy(model).double()
    replica.train(mode == "train")
    for module in replica.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    names = [n for n, p in replica.named_parameters() if p.requires_grad]
    params = dict(replica.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    total = sum(count_samples(b) for b in batches)
    hessian = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for batch in batches:
        batch64 = _to_double(batch)

        def loss_of(theta: Tensor, batch64: Any = batch64) -> Tensor:
            parts = [c.reshape(s) for c, s in zip(theta.split([s.numel() for s in shapes]), shapes, strict=True)]
            state = {n: b.clone() for n, b in replica.named_buffers()}
            state.update(zip(names, parts, strict=True))
            return functional_call(_LossModule(replica, loss_fn), {"model." + k: v for k, v in state.items()},
                                   (batch64,), strict=False)

        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            hessian += torch.autograd.functional.hessian(loss_of, flat) * (count_samples(batch) / total)
    return hessian


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def count_samples(batch: Any) -> int:
    """Samples in a tuple, list or dict batch: the leading size of its first tensor."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.shape[0]


def _to_double(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_double(v) for v in batch)
    return batch.double() if batch.is_floating_point() else batch


# --- the operator case table ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One operator problem: a model factory, a loss and batches, plus operator options."""

    build: Callable[[], nn.Module]
    loss_fn: LossFn
    batches: Callable[[], list[Any]]
    mode: str = "eval"
    params: Sequence[str] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _mixture_batches(sizes: Sequence[int], num_classes: int = 4, dim: int = 10) -> Callable[[], list[Any]]:
    return lambda: split(*gaussian_mixture(sum(sizes), num_classes, dim), sizes)


def dict_batches() -> list[dict[str, Tensor]]:
    return [{"x": x, "y": y} for x, y in split(*gaussian_mixture(48, 3, 6), [16, 32])]


HESSIAN_CASES = [
    pytest.param(Case(lambda: mlp((10, 12, 4)), cross_entropy, _mixture_batches([64])), id="mlp-tanh-ce-1batch"),
    pytest.param(Case(lambda: mlp((10, 12, 4), nn.ReLU, seed=1), cross_entropy, _mixture_batches([32, 32, 17])),
                 id="mlp-relu-ce-uneven"),
    pytest.param(Case(lambda: mlp((10, 8, 8, 4), nn.Sigmoid), squared_error, _mixture_batches([20, 30])),
                 id="mlp3-sigmoid-mse-2batches"),
    pytest.param(Case(lambda: mlp((64, 10, 10)), cross_entropy, lambda: split(*digits(96), [48, 48])),
                 id="mlp-digits-ce-2batches"),
    pytest.param(Case(lambda: mlp((10, 12, 4)), cross_entropy, _mixture_batches([40, 24]), params=["2.*"]),
                 id="mlp-ce-last-layer-only"),
    pytest.param(Case(lambda: mlp((10, 12, 4)), cross_entropy, _mixture_batches([40]), params=["*.bias"]),
                 id="mlp-ce-biases-only"),
    pytest.param(Case(WithUnused, cross_entropy, lambda: split(*gaussian_mixture(30, 3, 6), [10, 20])),
                 id="unused-parameter"),
    pytest.param(Case(BatchNormDropoutNet, cross_entropy, lambda: split(*gaussian_mixture(40, 3, 6), [16, 24])),
                 id="batchnorm-dropout-eval"),
    pytest.param(Case(BatchNormDropoutNet, cross_entropy, lambda: split(*gaussian_mixture(40, 3, 6), [16, 24]),
                      mode="train"), id="batchnorm-dropout-train"),
    pytest.param(Case(lambda: mlp((6, 8, 3)), dict_cross_entropy, dict_batches), id="dict-batches"),
    pytest.param(Case(AttentionNet, cross_entropy, lambda: split(*gaussian_mixture(24, 3, 6), [10, 14])),
                 id="self-attention"),
    pytest.param(Case(lambda: mlp((10, 12, 4)), cross_entropy, _mixture_batches([30, 34]),
                      kwargs={"keep_graph": False, "vectorize": False}), id="no-keep-graph-no-vectorize"),
]


# --- trained models and their exact spectra (built once per session) -----------------------

DIGITS_SIZES = (64, 24, 24, 10)
MIXTURE_SIZES = (10, 32, 32, 4)
PROBE_SAMPLES = 512
PROBE_BATCH = 64


@dataclass(frozen=True)
class Problem:
    """A model with its probe batches, loss and exact float64 Hessian spectrum."""

    state: dict[str, Tensor]
    sizes: tuple[int, ...]
    activation: type[nn.Module]
    batches: list[tuple[Tensor, Tensor]]
    hessian: Tensor
    eigenvalues: Tensor  # ascending, float64

    def model(self) -> nn.Sequential:
        """A fresh copy of the trained model."""
        model = mlp(self.sizes, self.activation)
        model.load_state_dict(self.state)
        return model


def train(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, lr: float, batch_size: int = 64) -> None:
    """Plain minibatch SGD on the mean cross-entropy, with a seeded sample order."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


def _problem(
    model: nn.Sequential, data: tuple[Tensor, ...], sizes: tuple[int, ...], activation: type[nn.Module]
) -> Problem:
    batches = split(*data, [PROBE_BATCH] * (PROBE_SAMPLES // PROBE_BATCH))
    hessian = dense_hessian(model, cross_entropy, batches)
    return Problem(
        state={k: v.clone() for k, v in model.state_dict().items()},
        sizes=sizes,
        activation=activation,
        batches=batches,
        hessian=hessian,
        eigenvalues=torch.linalg.eigvalsh(hessian),
    )


@functools.cache
def trained_digits() -> Problem:
    """A 64-24-24-10 ReLU MLP (P = 2,410) after 600 SGD steps on 1,000 digits; probes: the first 512."""
    x, y = digits(1000)
    model = mlp(DIGITS_SIZES, nn.ReLU)
    train(model, x, y, steps=600, lr=0.1)
    return _problem(model, (x, y), DIGITS_SIZES, nn.ReLU)


@functools.cache
def trained_mixture() -> Problem:
    """A 10-32-32-4 tanh MLP (P = 1,540) after 300 SGD steps on a 4-class Gaussian mixture."""
    x, y = gaussian_mixture(1000, 4, 10)
    model = mlp(MIXTURE_SIZES, nn.Tanh)
    train(model, x, y, steps=300, lr=0.1)
    return _problem(model, (x, y), MIXTURE_SIZES, nn.Tanh)


@functools.cache
def digits_density(seed: int) -> SpectralDensity:
    """The SLQ estimate of :func:`trained_digits`'s Hessian with the issue's settings: 10 probes, 80 steps."""
    problem = trained_digits()
    op = HessianOperator(problem.model(), cross_entropy, problem.batches, dtype=torch.float64)
    return spectral_density(op, num_probes=10, num_steps=80, seed=seed)
