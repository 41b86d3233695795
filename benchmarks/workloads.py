"""The benchmark workloads: trained models, their data, and (for small ones) the exact spectrum.

Symbols: P parameters, N samples (one batch holds all N), C = 10 classes.

Every workload is a classifier with the mean softmax cross-entropy over N = 1,000 training samples,
trained by full-batch gradient descent from a fixed seed, so that its spectrum has the bulk and the
outliers that the paper describes rather than the flat spectrum of a random initialization. The
two small ones run in float64 and carry the exact eigenvalues of their dense Hessian, so that what
is measured is the solvers' error, not float32 rounding; the two larger ones run in float32 and are
compared with a certified reference (our solver on a float64 evaluation of the same float32 weights,
stopped at a relative residual of 1e-9, whose eigenvalue error is bounded by that residual times
``||H||``).

Every build gives the same model bit for bit, whatever the thread count and, up to a rare one-ulp
difference in the cast (about 1e-3 weights expected per build, measured), the CPU's vector kernels:

- builds run with one torch thread (:func:`one_thread`), whatever the caller set;
- the digits are standardized in float64 (:func:`digits_float64`), and the float32 workloads are
  trained in float64 and then cast to float32 (:func:`train_float32`). Trained in float32, the
  weights depended on the summation order of the products (threads, vector width of the CPU's
  kernels): on digits-mlp-250k, one thread against two moved the weights by about 1e-6 relative
  and the reference's top-10 eigenvalues by up to 7.5e-6 relative, so figures near float32
  precision, and the point where PyHessian's error crosses 1e-2, moved from build to build.
  Trained in float64, the same differences stay near 1e-12 relative, far below float32's
  resolution (6e-8), and the cast rounds them away.

A float32 workload also records ``product_rounding``: how far its float32 products are from the
float64 ones, relative to ``||H||``, on the reference's eigenvectors. To first order that is how far
float32 products can move each top eigenvalue, whatever the solver (see :meth:`Workload.rounding_floor`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the caller's setting.

    The float32 and float64 sums of a multi-threaded product depend on how the work is split, so a
    build that follows the caller's thread count would train (slightly) different weights.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        product_rounding: for a float32 workload, the largest ``||H_32 v - H v|| / ||H||`` over the
            reference's unit eigenvectors v (``H_32 v`` the float32 product, ``H v`` the float64 one,
            ``||H||`` the largest reference eigenvalue in magnitude); ``None`` where the products
            are float64 (their rounding, about 1e-15, is left out).
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
    product_rounding: float | None = None

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

    @property
    def norm(self) -> float:
        """``||H||``, estimated by the largest reference eigenvalue in magnitude."""
        return float(self.reference.abs().max())

    def rounding_floor(self, k: int) -> float:
        """Relative error of the k-th largest eigenvalue that float32 products alone can cause:
        ``product_rounding * ||H|| / |lambda_k|`` (0 for float64 products).

        A Ritz value ``theta`` with unit vector ``y`` whose float32 residual is ``r ||H||`` lies within
        ``||H y - theta y|| <= (r + product_rounding) ||H||`` of an eigenvalue of the float64 Hessian
        (to first order in the rounding), so no solver on these products is owed less than this.
        """
        if self.product_rounding is None:
            return 0.0
        return self.product_rounding * self.norm / float(self.reference[:k].abs().min())

    def fingerprint(self) -> dict[str, object]:
        """What identifies a build: a digest of the weights and inputs, the reference, the rounding."""
        digest = hashlib.sha256()
        for tensor in (*(p.detach() for p in self.model.parameters()), *self.batch):
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return {"name": self.name, "num_params": self.num_params, "dtype": str(self.dtype).removeprefix("torch."),
                "sha256": digest.hexdigest(), "reference": [float(v) for v in self.reference],
                "product_rounding": self.product_rounding}


def train(model: nn.Module, batch: Batch, *, steps: int, lr: float) -> nn.Module:
    """Full-batch gradient descent on the mean cross-entropy; returns the model in eval mode."""
    train_sgd(model, *batch, lr=lr, steps=steps)
    return model.eval()


def train_float32(model: nn.Module, batch: Batch, *, steps: int, lr: float) -> nn.Module:
    """:func:`train` on a float64 copy of a float32 model and a float64 batch, cast back to float32
    (see the module notes). The float32 initialization is exact in float64."""
    return train(model.double(), batch, steps=steps, lr=lr).float()


def digits_float64(num_train: int) -> Batch:
    """The training split of :func:`~lightning_hessian.paper.data.digits_tensors`, standardized per pixel
    with its own mean and standard deviation as there, but in float64: ``(x [n, 64] float64, y [n])``.

    A float32 mean over the samples can depend on the CPU's reduction kernels (it did with torch's
    scalar kernels against its AVX-512 ones); in float64 the difference stays far below what a cast
    to float32 keeps.
    """
    x, y, _, _ = digits_tensors(num_train=num_train, scaling="unit")  # pixel / 16: exact in float32
    x = x.double()
    std = x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - x.mean(0)) / std, y


def _finish(name: str, description: str, model: nn.Module, batch: Batch, *, exact: bool, large: bool) -> Workload:
    """Attach the exact spectrum (dense Hessian) or a certified reference to a trained model."""
    if exact:
        hessian = dense_hessian(model, cross_entropy, [batch], dtype=torch.float64)
        eigenvalues = torch.linalg.eigvalsh(hessian).flip(0)
        return Workload(name, description, model, batch, eigenvalues, eigenvalues[:REFERENCE_K], "exact",
                        float(hessian.trace()), large)
    op = HessianOperator(model, cross_entropy, [batch], dtype=torch.float64)
    result = top_eigenvalues(op, REFERENCE_K, tol=REFERENCE_TOL, max_matvecs=400)
    if not result.all_converged:
        raise RuntimeError(f"{name}: the reference stopped at relative residual {float(result.residuals.max()):.1e}, "
                           f"above {REFERENCE_TOL:g}, in {result.num_matvecs} products")
    vectors = result.eigenvectors.T.to(torch.float64)  # (P, k) unit columns
    exact = op.matmat(vectors)
    rounded = HessianOperator(model, cross_entropy, [batch]).matmat(vectors).to(torch.float64)
    norm = float(result.eigenvalues.abs().max())
    rounding = float((rounded - exact).norm(dim=0).max()) / norm
    return Workload(name, description, model, batch, None, result.eigenvalues, "certified", None, large, rounding)


def mixture_mlp(smoke: bool = False) -> Workload:
    """ReLU MLP 20-64-48-10 (4,954 parameters) on a 10-class Gaussian mixture, float64, exact."""
    with one_thread():
        return _mixture_mlp(smoke)


def _mixture_mlp(smoke: bool) -> Workload:
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
    with one_thread():
        return _digits_mlp(smoke)


def _digits_mlp(smoke: bool) -> Workload:
    torch.manual_seed(0)
    batch = digits_float64(200 if smoke else 1000)
    y = batch[1]
    model = MLPClassifier(64, (20, 20), 10).net.double()
    train(model, batch, steps=300, lr=0.1)
    description = f"ReLU MLP 64-20-20-10 on digits ({len(y)} samples), 300 full-batch GD steps at lr 0.1, float64"
    return _finish("digits-mlp", description, model, batch, exact=True, large=False)


def digits_mlp_large(smoke: bool = False) -> Workload:
    """ReLU MLP 64-512-420-10 (252,950 parameters) on digits, float32, certified reference."""
    with one_thread():
        return _digits_mlp_large(smoke)


def _digits_mlp_large(smoke: bool) -> Workload:
    torch.manual_seed(0)
    hidden = (32, 32) if smoke else (512, 420)
    x, y = digits_float64(200 if smoke else 1000)
    model = train_float32(MLPClassifier(64, hidden, 10).net, (x, y), steps=100, lr=0.1)
    x = x.float()
    description = (f"ReLU MLP 64-{hidden[0]}-{hidden[1]}-10 on digits ({len(y)} samples), "
                   "100 full-batch GD steps at lr 0.1 in float64, then cast to float32")
    return _finish("digits-mlp-250k", description, model, (x, y), exact=False, large=True)


def digits_cnn(smoke: bool = False) -> Workload:
    """The project's SmallCNN with channels (32, 64) (21,386 parameters) on digits, float32, certified."""
    with one_thread():
        return _digits_cnn(smoke)


def _digits_cnn(smoke: bool) -> Workload:
    torch.manual_seed(0)
    channels = (4, 8) if smoke else (32, 64)
    x, y = digits_float64(200 if smoke else 1000)
    model = train_float32(SmallCNN(10, channels).net, (x, y), steps=100, lr=0.05)
    x = x.float()
    description = (f"CNN conv3x3({channels[0]})-pool-conv3x3({channels[1]})-pool-linear on 8x8 digits "
                   f"({len(y)} samples), 100 full-batch GD steps at lr 0.05 in float64, then cast to float32")
    return _finish("digits-cnn", description, model, (x, y), exact=False, large=True)


BUILDERS: dict[str, Callable[[bool], Workload]] = {
    "mixture-mlp": mixture_mlp,
    "digits-mlp": digits_mlp,
    "digits-mlp-250k": digits_mlp_large,
    "digits-cnn": digits_cnn,
}
"""Workload name -> builder taking ``smoke`` (tiny sizes for a quick check)."""


def main(argv: list[str] | None = None) -> int:
    """Print each workload's :meth:`~Workload.fingerprint` and our default top-k error, one JSON line each.

    Two runs (two machines, two thread settings) that print the same lines built the same models and
    measured the same errors: ``python -m benchmarks.workloads --smoke``.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workloads", description=main.__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workloads")
    parser.add_argument("--workloads", default=",".join(BUILDERS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the measurement (default 1, as in benchmarks.run); the builds run "
                             "first, at whatever the process starts with (e.g. OMP_NUM_THREADS), and pin one "
                             "thread themselves")
    args = parser.parse_args(argv)
    unknown = sorted({n.strip() for n in args.workloads.split(",") if n.strip()} - set(BUILDERS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(BUILDERS)}")
    built = [BUILDERS[n.strip()](args.smoke) for n in args.workloads.split(",") if n.strip()]
    torch.set_num_threads(args.threads)
    for w in built:
        result = top_eigenvalues(w.operator(), REFERENCE_K)
        ours = torch.sort(result.eigenvalues.double(), descending=True).values
        error = float(((ours - w.reference).abs() / w.reference.abs()).max())
        print(json.dumps({**w.fingerprint(), "top_k_error": error, "products": result.num_matvecs,
                          "max_residual": float(result.residuals.max())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
