"""What the tests of the Lightning face share: a tiny classifier, its data, a quiet CPU Trainer and the oracle."""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from lightning_hessian import dense_hessian

NUM_FEATURES, NUM_CLASSES = 4, 3


def dataset(num_samples: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=generator, dtype=dtype)
    return TensorDataset(x, torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator))


def cross_entropy(module: nn.Module, batch) -> torch.Tensor:
    """A ``loss_fn(pl_module, batch)`` (module level, so ddp_spawn can pickle it)."""
    return F.cross_entropy(module(batch[0]), batch[1])


class TinyMLP(pl.LightningModule):
    """4 -> 6 -> 3 tanh MLP (51 parameters); the loss comes from ``training_step`` (no protocol)."""

    def __init__(self, lr: float = 0.1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, 6), nn.Tanh(), nn.Linear(6, NUM_CLASSES)).to(dtype)
        self.lr = lr
        self.crash_at_step: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ProtocolMLP(TinyMLP):
    """TinyMLP with the module protocol (``hessian_loss``, ``hessian_outputs``, ``hessian_output_loss``)."""

    def hessian_loss(self, batch) -> torch.Tensor:
        return cross_entropy(self, batch)

    def hessian_outputs(self, batch) -> torch.Tensor:
        return self(batch[0])

    def hessian_output_loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[1])


def trainer(**kwargs) -> pl.Trainer:
    settings = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False}
    settings.update(kwargs)
    return pl.Trainer(**settings)


class _WholeLoss(nn.Module):
    def __init__(self, model: nn.Module, loss_of_all: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.model, self.loss_of_all = model, loss_of_all

    def forward(self) -> Tensor:
        return self.loss_of_all(self.model)


def dense_oracle(model: nn.Module, loss_of_all: Callable[[nn.Module], Tensor]) -> Tensor:
    """The float64 Hessian of ``loss_of_all(model)``, the mean loss over every sample, over the trainable parameters."""
    replica = copy.deepcopy(model).double().eval()
    names = [n for n, p in replica.named_parameters() if p.requires_grad]
    params = dict(replica.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(theta: Tensor) -> Tensor:
        parts = [c.reshape(s) for c, s in zip(theta.split([s.numel() for s in shapes]), shapes, strict=True)]
        state = {"model." + n: p for n, p in zip(names, parts, strict=True)}
        return functional_call(_WholeLoss(replica, loss_of_all), state, (), strict=False)

    return torch.autograd.functional.hessian(loss, flat)


def top_dense(module: nn.Module, batches, k: int, **kwargs) -> torch.Tensor:
    hessian = dense_hessian(module, cross_entropy, batches, **kwargs)
    return torch.linalg.eigvalsh(hessian).flip(0)[:k]


def assert_eigenvalues(measured: list[float], expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Measured eigenvalues (a record's plain floats) equal the float64 oracle to ``rtol``."""
    torch.testing.assert_close(torch.tensor(measured, dtype=torch.float64), expected, rtol=rtol, atol=0)


def load_example(name: str) -> ModuleType:
    """The script ``examples/<name>.py`` as a module (it is not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class SimulatedTime:
    """Wall time that a real run advances on purpose: every training step by ``step_seconds``, every loss
    evaluation of a measurement by ``loss_seconds`` (the real seconds, milliseconds here, come on top)."""

    def __init__(self, step_seconds: float, loss_seconds: float) -> None:
        self.offset, self.step_seconds, self.loss_seconds = 0.0, step_seconds, loss_seconds

    def __call__(self) -> float:
        return time.perf_counter() + self.offset

    def loss(self, module, batch):
        self.offset += self.loss_seconds
        return cross_entropy(module, batch)
