"""Classifiers for the paper's experiments: an MLP and a small CNN, softmax cross-entropy.

Symbols: n samples per batch, d input features, C classes.

Both follow the project's module protocol, so :class:`~lightning_hessian.HessianSpectrumCallback`
measures them without a ``loss_fn``: ``hessian_loss(batch)`` is the mean cross-entropy of a batch
``(x [n, d], y [n])``; ``hessian_outputs(batch)`` gives the logits ``[n, C]`` and
``hessian_output_loss(outputs, batch)`` the cross-entropy of given logits (the split that the
Gauss-Newton operator needs). None of the three logs anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["relu", "tanh", "gelu", "softplus"]
Optimizer = Literal["sgd", "adam"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}
Batch = tuple[Tensor, Tensor]


def cross_entropy_of_logits(outputs: Tensor, batch: Batch) -> Tensor:
    """Mean softmax cross-entropy of logits ``[n, C]`` against the labels ``[n]`` of a batch ``(x, y)``:
    the loss of every experiment of the reproduction.

    Example:
        >>> round(float(cross_entropy_of_logits(torch.zeros(4, 2), (None, torch.zeros(4, dtype=torch.long)))), 4)
        0.6931
    """
    return F.cross_entropy(outputs, batch[1])


def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    """:func:`cross_entropy_of_logits` of ``model(x)`` for a batch ``(x, y)``: a ``loss_fn(model, batch)``.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        >>> round(float(cross_entropy(model, (torch.ones(4, 2), torch.zeros(4, dtype=torch.long)))), 4)  # log 2
        0.6931
    """
    return cross_entropy_of_logits(model(batch[0]), batch)


class _Classifier(pl.LightningModule):
    """Training, evaluation, optimizer and Hessian protocol shared by the classifiers.

    A subclass builds ``self.net`` (a module mapping ``[n, d]`` inputs to ``[n, C]`` logits).
    """

    net: nn.Module

    def __init__(self, optimizer: Optimizer, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={optimizer!r} must be 'sgd' or 'adam'")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive")
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[n, C]`` of inputs ``[n, d]``."""
        return self.net(x)

    def hessian_outputs(self, batch: Batch) -> Tensor:
        """Logits ``[n, C]`` of a batch ``(x, y)``."""
        return self(batch[0])

    def hessian_output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Mean softmax cross-entropy of logits ``[n, C]`` against the batch's labels."""
        return cross_entropy_of_logits(outputs, batch)

    def hessian_loss(self, batch: Batch) -> Tensor:
        """Mean softmax cross-entropy of a batch ``(x, y)``."""
        return self.hessian_output_loss(self.hessian_outputs(batch), batch)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.hessian_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Batch, prefix: str) -> None:
        logits = self.hessian_outputs(batch)
        self.log(f"{prefix}_loss", self.hessian_output_loss(logits, batch), prog_bar=True)
        self.log(f"{prefix}_acc", (logits.argmax(1) == batch[1]).float().mean(), prog_bar=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class MLPClassifier(_Classifier):
    """Fully connected classifier ``d -> h_1 -> ... -> C`` with PyTorch's default initialization.

    The paper's digits net is ``MLPClassifier(64, (20, 20), 10)`` (M = 1,930 parameters), trained
    with plain SGD at ``lr=0.1``.

    Args:
        input_dim: d, features per sample (64 for 8x8 digits).
        hidden_sizes: widths of the hidden layers.
        num_classes: C.
        activation: nonlinearity after each hidden layer.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty added by the optimizer (not part of the measured loss).

    Example:
        >>> model = MLPClassifier(64, (20, 20), 10)
        >>> sum(p.numel() for p in model.parameters())
        1930
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_sizes: Sequence[int] = (20, 20),
        num_classes: int = 10,
        activation: Activation = "relu",
        optimizer: Optimizer = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr, momentum, weight_decay)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(_ACTIVATIONS)}")
        widths = [input_dim, *hidden_sizes]
        if min(widths) < 1 or num_classes < 2:
            raise ValueError(
                f"input_dim={input_dim}, hidden_sizes={list(hidden_sizes)} must be positive and "
                f"num_classes={num_classes} at least 2"
            )
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), _ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)


class SmallCNN(_Classifier):
    """Two 3x3 convolutions with max pooling, then a linear layer, for square single-channel images.

    Inputs come flat, ``[n, side * side]`` (the digits data modules give ``[n, 64]``), and are reshaped
    to ``[n, 1, side, side]``; each pooling halves the side (8 -> 4 -> 2).

    Args:
        num_classes: C.
        channels: output channels of the two convolutions.
        image_size: the side of the square image (8 for digits); must be divisible by 4.
        optimizer, lr, momentum, weight_decay: as in :class:`MLPClassifier`.

    Example:
        >>> SmallCNN()(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (8, 16),
        image_size: int = 8,
        optimizer: Optimizer = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr, momentum, weight_decay)
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels={list(channels)} must be two positive channel counts, e.g. (8, 16)")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size={image_size} must be a positive multiple of 4 (two 2x2 poolings)")
        self.save_hyperparameters()
        first, second = channels
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, image_size, image_size)),
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * (image_size // 4) ** 2, num_classes),
        )
