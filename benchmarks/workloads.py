"""The benchmark workloads: trained models, their data, and (for small ones) the exact spectrum.

Symbols: P parameters, N samples (one batch holds all N), C = 10 classes.

Every workload is a classifier with the mean softmax cross-entropy over N = 1,000 training samples,
trained by full-batch gradient descent from a fixed seed, so that its spectrum has the bulk and the
outliers that the paper describes rather than the flat spectrum of a random initialization. The
two small ones run in float64 and carry the exact eigenvalues of their dense Hessian, so that what
is measured is the solvers' error, not float32 rounding; the two larger ones run in float32 and are
compared with a certified reference (Lanczos stopped at a relative residual of 1e-9, whose
eigenvalue error is bounded by that residual times ``||H||``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian import HessianOperator, dense_hessian, top_eigenvalues
from lightning_hessian.paper.data import digits_tensors, gaussian_mixture_tensors
from lightning_hessian.paper.models import MLPClassifier, SmallCNN
from lightning_hessian.paper.training import train_sgd

Batch = tuple[Tensor, Tensor]

# Relative residual of the reference eigenvalues of workloads too large for a dense Hessian.
REFERENCE_TOL = 1e-9
# Eigenvalues kept for the comparisons (top-1/5/10 errors).
REFERENCE_K = 10


def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    """Mean softmax cross-entropy of a batch ``(x [n, d], y [n])``: the loss of every workload."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass
class Workload:
    """A trained model, its training batch and what is known exactly about its Hessian.

    Attributes:
        name: short identifier used in tables.
        description: model, data and training in one line.
        model: the trained network (eval mode).
        batch: ``(x [N, d], y [N])``, all training samples in one batch.
        eigenvalues: ``(P,)`` float64 exact eigenvalues, descending, or ``None``.
        reference: ``(REFERENCE_K,)`` top eigenvalues to compare with (exact or certified).
        reference_kind: ``"exact"`` or ``"certified"``.
        trace: exact trace of the Hessian, or ``None``.
        large: whether the workload is costly (fewer repeats, fewer settings).
    """

    name: str
    description: str
    model: nn.Module
    batch: Batch
    eigenvalues: Tensor | None
    reference: Tensor
    reference_kind: str
    trace: float | None
    large: bool

    @property
    def num_params(self) -> int:
        """P."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where the model and its batch live."""
        return self.batch[0].device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    def operator(self, **kwargs: object) -> HessianOperator:
        """Our Hessian operator on this workload (keyword arguments go to :class:`HessianOperator`)."""
        return HessianOperator(self.model, cross_entropy, [self.batch], **kwargs)


def train(model: nn.Module, batch: Batch, *, steps: int, lr: float) -> nn.Module:
    """Full-batch gradient descent on the mean cross-entropy; returns the model in eval mode."""
    train_sgd(model, *batch, lr=lr, steps=steps)
    return model.eval()


def _finish(name: str, description: str, model: nn.Module, batch: Batch, *, exact: bool, large: bool) -> Workload:
    """Attach the exact spectrum (dense Hessian) or a certified reference to a trained model."""
    if exact:
        hessian = dense_hessian(model, cross_entropy, [batch], dtype=torch.float64)
        eigenvalues = torch.linalg.eigvalsh(hessian).flip(0)
        return Workload(name, description, model, batch, eigenvalues, eigenvalues[:REFERENCE_K], "exact",
                        float(hessian.trace()), large)
    op = HessianOperator(model, cross_entropy, [batch], dtype=torch.float64)
    result = top_eigenvalues(op, REFERENCE_K, tol=REFERENCE_TOL, max_matvecs=400)
    return Workload(name, description, model, batch, None, result.eigenvalues, "certified", None, large)


def mixture_mlp(smoke: bool = False) -> Workload:
    """ReLU MLP 20-64-48-10 (4,954 parameters) on a 10-class Gaussian mixture, float64, exact."""
    torch.manual_seed(0)
    dim, hidden, samples = (5, (8,), 200) if smoke else (20, (64, 48), 2000)
    x, y, _, _ = gaussian_mixture_tensors(num_classes=10, dim=dim, num_samples=samples, cluster_std=3.0,
                                          test_fraction=0.5)
    model = MLPClassifier(dim, hidden, 10).net.double()
    batch = (x.double(), y)
    train(model, batch, steps=200, lr=0.1)
    widths = "-".join(str(w) for w in (dim, *hidden, 10))
    description = (f"ReLU MLP {widths} on a 10-class Gaussian mixture (std 3, {samples // 2} samples), "
                   "200 full-batch GD steps at lr 0.1, float64")
    return _finish("mixture-mlp", description, model, batch, exact=True, large=False)


def digits_mlp(smoke: bool = False) -> Workload:
    """The paper's digits net, ReLU MLP 64-20-20-10 (1,930 parameters), float64, exact."""
    torch.manual_seed(0)
    x, y, _, _ = digits_tensors(num_train=200 if smoke else 1000)
    model = MLPClassifier(64, (20, 20), 10).net.double()
    batch = (x.double(), y)
    train(model, batch, steps=300, lr=0.1)
    description = f"ReLU MLP 64-20-20-10 on digits ({len(y)} samples), 300 full-batch GD steps at lr 0.1, float64"
    return _finish("digits-mlp", description, model, batch, exact=True, large=False)


def digits_mlp_large(smoke: bool = False) -> Workload:
    """ReLU MLP 64-512-420-10 (252,950 parameters) on digits, float32, certified reference."""
    torch.manual_seed(0)
    hidden = (32, 32) if smoke else (512, 420)
    x, y, _, _ = digits_tensors(num_train=200 if smoke else 1000)
    model = MLPClassifier(64, hidden, 10).net
    train(model, (x, y), steps=100, lr=0.1)
    description = (f"ReLU MLP 64-{hidden[0]}-{hidden[1]}-10 on digits ({len(y)} samples), "
                   "100 full-batch GD steps at lr 0.1, float32")
    return _finish("digits-mlp-250k", description, model, (x, y), exact=False, large=True)


def digits_cnn(smoke: bool = False) -> Workload:
    """The project's SmallCNN with channels (32, 64) (21,386 parameters) on digits, float32, certified."""
    torch.manual_seed(0)
    channels = (4, 8) if smoke else (32, 64)
    x, y, _, _ = digits_tensors(num_train=200 if smoke else 1000)
    model = SmallCNN(10, channels).net
    train(model, (x, y), steps=100, lr=0.05)
    description = (f"CNN conv3x3({channels[0]})-pool-conv3x3({channels[1]})-pool-linear on 8x8 digits "
                   f"({len(y)} samples), 100 full-batch GD steps at lr 0.05, float32")
    return _finish("digits-cnn", description, model, (x, y), exact=False, large=True)


BUILDERS: dict[str, Callable[[bool], Workload]] = {
    "mixture-mlp": mixture_mlp,
    "digits-mlp": digits_mlp,
    "digits-mlp-250k": digits_mlp_large,
    "digits-cnn": digits_cnn,
}
"""Workload name -> builder taking ``smoke`` (tiny sizes for a quick check)."""
