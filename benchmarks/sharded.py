"""Finite-difference Hessian products on FSDP2-sharded parameters against exact products.

Usage::

    python -m benchmarks.sharded            # writes benchmarks/RESULTS-sharded.md (a few minutes)
    python -m benchmarks.sharded --smoke --out /tmp/s.md

For tanh and ReLU MLPs (10 -> 16 -> 16 -> 4, 516 parameters, softmax cross-entropy on 128 samples of a
Gaussian mixture), at initialization and after 200 full-batch SGD steps, in float64 and float32: the
model is wrapped with ``fully_shard`` in a one-rank gloo group, and the products of the engine's
sharded operator (central differences of gradients through FSDP, with its step rule and kink check)
are compared with exact double-backward products of the same unsharded model in float64 at the same
parameters. Reported: the relative error ``||Hv_fd - Hv|| / ||Hv||`` over random unit directions
(median and max), the fraction of products recomputed with a smaller step, gradients per product, and
the fraction refused (``NonSmoothError``: a product that could not get clear of kinks), and the largest
error of the top 3 eigenvalues of ``top_eigenvalues`` on the sharded operator against the dense float64
Hessian (with whether they met ``tol``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

from benchmarks.measure import command_line
from lightning_hessian import HessianOperator, NonSmoothError, dense_hessian, top_eigenvalues

RESULTS = Path(__file__).with_name("RESULTS-sharded.md")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
STATES = {"init": 0, "trained": 200}
K = 3


def mixture(num_samples: int = 128) -> tuple[Tensor, Tensor]:
    """``x`` ``[N, 10]`` float64 and labels ``[N]`` of a 4-class Gaussian mixture."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=generator, dtype=torch.float64) * 2
    y = torch.arange(num_samples) % 4
    return centers[y] + torch.randn(num_samples, 10, generator=generator, dtype=torch.float64), y


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def trained(activation: type[nn.Module], steps: int, batch: tuple[Tensor, Tensor]) -> nn.Module:
    """The float64 MLP after ``steps`` full-batch SGD steps (learning rate 0.1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), activation(), nn.Linear(16, 16), activation(),
                          nn.Linear(16, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        optimizer.step()
    return model


def measure(activation: type[nn.Module], dtype: torch.dtype, steps: int, directions: int) -> dict[str, object]:
    """The errors of one configuration (see the module docstring); a product that raised ``NonSmoothError``
    counts as refused (and is not in the errors)."""
    x, y = mixture()
    model = trained(activation, steps, (x, y)).to(dtype)
    reference = copy.deepcopy(model).double()  # the same parameters (rounded to dtype), in float64
    exact = HessianOperator(reference, cross_entropy, [(x, y)], dtype=torch.float64)
    sharded = HessianOperator(fully_shard(model), cross_entropy, [(x.to(dtype), y)])
    generator = torch.Generator().manual_seed(1)
    errors, refused = [], 0
    for _ in range(directions):
        v = torch.randn(exact.num_params, generator=generator, dtype=torch.float64)
        v /= v.norm()
        product = exact.matvec(v)
        try:
            errors.append(float((sharded.matvec(v.to(dtype)).double() - product).norm() / product.norm()))
        except NonSmoothError:
            refused += 1
    row: dict[str, object] = {"median": statistics.median(errors) if errors else None,
                              "max": max(errors) if errors else None, "refused": refused / directions,
                              "refined": sharded.num_refined / directions,
                              "gradients": (sharded.num_gradients - 1) / directions}
    expected = torch.linalg.eigvalsh(dense_hessian(reference, cross_entropy, [(x, y)], dtype=torch.float64))
    row["lambda_max"] = float(expected[-1])
    try:
        result = top_eigenvalues(sharded, k=K)
        row["top"] = float((result.eigenvalues - expected.flip(0)[:K]).abs().max())
        row["converged"] = "yes" if result.all_converged else "no"
    except NonSmoothError:
        row["top"], row["converged"] = None, "refused (NonSmoothError)"
    return row


def _cell(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--directions", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    directions = 3 if args.smoke else args.directions
    started = time.perf_counter()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    lines = ["# Finite-difference products on sharded parameters against exact ones", "",
             f"- Command: `{command_line('benchmarks.sharded', argv)}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, one thread, "
             "CPU, `fully_shard` in a one-rank gloo group", "",
             f"Relative error of the sharded operator's products over {directions} random unit directions, against "
             "exact float64 double-backward products of the same unsharded model at the same parameters; top-3: the "
             "largest absolute error of `top_eigenvalues(op, k=3)` (default `tol=1e-6`) against the dense float64 "
             "Hessian.", "",
             "| net | dtype | state | median error | max error | recomputed | refused | gradients / product "
             "| top-3 error | lambda_max | top-3 converged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    try:
        for net, activation in ACTIVATIONS.items():
            for dtype_name, dtype in DTYPES.items():
                for state, steps in STATES.items():
                    row = measure(activation, dtype, steps, directions)
                    lines.append(f"| {net} | {dtype_name} | {state} | {_cell(row['median'], '.1e')} | "
                                 f"{_cell(row['max'], '.1e')} | {row['refined']:.0%} | {row['refused']:.0%} | "
                                 f"{row['gradients']:.2f} | {_cell(row['top'], '.1e')} | {row['lambda_max']:.3f} | "
                                 f"{row['converged']} |")
                    print(lines[-1], flush=True)
    finally:
        dist.destroy_process_group()
    lines += ["", f"Total run time: {(time.perf_counter() - started) / 60:.1f} min", ""]
    args.out.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
