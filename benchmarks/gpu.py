"""GPU benchmarks: the larger workloads and a ResNet-18, float32 and a bf16 model, ours and the peers.

Usage (one prepared script; the peers run first so that the time limit cannot cut them off)::

    python -m benchmarks.gpu                       # on a CUDA machine: writes benchmarks/RESULTS-gpu.md
    python -m benchmarks.gpu --smoke --device cpu --out /tmp/gpu.md   # tiny sizes, checks the script

Workloads: the 252,950-parameter digits MLP and the digits CNN of ``benchmarks.workloads``, and a
ResNet-18 (11.17 M parameters, eval mode) on a fixed batch of 256 random 3x32x32 images with random
labels, as in an earlier measurement on an H200 (PyHessian 450 products, 91 s; a plain 40-step
Lanczos 7.3 s). Each runs with a float32 model and with the same model cast to bfloat16 (our operator
then multiplies in float32 at the bf16 weights; the peers run in the model's dtype). Figures per
workload and dtype: top-10 eigenvalues (errors against our float64 Lanczos stopped at relative residual
1e-9 at the same weights), the product cost of each route relative to a gradient, and the SLQ cost on
the two digits workloads (the ResNet's 10-probe SLQ bases alone would take 73 GB, see RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

from benchmarks import costs, peers, report, suites
from benchmarks.measure import command_line
from benchmarks.resnet import resnet18
from benchmarks.workloads import BUILDERS, REFERENCE_K, REFERENCE_TOL, Workload, cross_entropy
from lightning_hessian import HessianOperator, top_eigenvalues

RESULTS = Path(__file__).with_name("RESULTS-gpu.md")
K = 10
RESNET_BATCH = 256


def resnet_workload(smoke: bool) -> Workload:
    """ResNet-18 at initialization on a fixed random batch (reference filled in by :func:`on_device`)."""
    torch.manual_seed(0)
    width, batch, side = (2, 4, 8) if smoke else (64, RESNET_BATCH, 32)
    model = resnet18(10, width).eval()
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    description = (f"ResNet-18 (width {width}) at initialization, eval mode, one batch of {batch} random "
                   f"3x{side}x{side} images with random labels")
    return Workload("resnet18", description, model, (x, y), None, torch.empty(0), "certified", None, True)


def on_device(workload: Workload, device: torch.device, dtype: torch.dtype) -> Workload:
    """The workload with its model and inputs moved and cast, and a certified reference at those weights."""
    model = copy.deepcopy(workload.model).to(device=device, dtype=dtype)
    x, y = workload.batch
    moved = dataclasses.replace(workload, model=model, batch=(x.to(device=device, dtype=dtype), y.to(device)),
                                eigenvalues=None, trace=None, reference_kind="certified",
                                name=f"{workload.name} ({str(dtype).removeprefix('torch.')})",
                                description=f"{workload.description}; model cast to {dtype} on {device}")
    op = HessianOperator(model, cross_entropy, [moved.batch], dtype=torch.float64)
    reference = top_eigenvalues(op, REFERENCE_K, tol=REFERENCE_TOL, max_matvecs=300)
    return dataclasses.replace(moved, reference=reference.eigenvalues)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads) — not a GPU: these figures only check the script"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each product route")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds after which no new case starts (default 480)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--workloads", default="resnet18,digits-mlp-250k,digits-cnn",
                        help="comma-separated; the ResNet first, so that the time limit falls on the others")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report.set_clock("cpu_seconds" if device.type == "cpu" and torch.get_num_threads() == 1 else "seconds")
    started, load_before = time.monotonic(), report.load_average()
    deadline = started + args.time_limit
    available = {name: None for name in peers.PEERS} if args.no_peers else peers.versions()
    runs = 1 if args.smoke else args.runs
    builders = {**BUILDERS, "resnet18": resnet_workload}

    body, verdicts = [], []
    for name in args.workloads.split(","):
        base = builders[name](args.smoke)
        for dtype in (torch.float32, torch.bfloat16):
            if time.monotonic() > deadline:
                body += [f"## {base.name} ({dtype}): skipped, time limit", ""]
                continue
            w = on_device(base, device, dtype)
            print(f"[benchmarks.gpu] {w.name}: P={w.num_params:,}", file=sys.stderr, flush=True)
            body += [f"## {w.name}, P = {w.num_params:,}", "", w.description + ".", "", f"### Top-{K} eigenvalues", ""]
            rows = suites.eigen_table(w, K, available, 1, deadline=deadline, peers_first=True)
            body += report.eigen_lines(rows, K)
            verdicts += resnet_verdict(w, rows) if base.name == "resnet18" and dtype == torch.float32 else []
            body += ["### Product cost relative to one gradient", "",
                     *report.product_lines(costs.product_table(w, available, runs, deadline=deadline))]
            if base.name != "resnet18":
                density = suites.density_table(w, available, 1, deadline=deadline, peers_first=True)
                body += ["### Spectral density (SLQ), cost only (no exact spectrum at this size)", "",
                         *report.density_lines(density)]
            del w
            if device.type == "cuda":
                torch.cuda.empty_cache()

    command = command_line("benchmarks.gpu", argv)
    minutes = (time.monotonic() - started) / 60
    text = ["# GPU benchmarks", "", f"- Device: {_describe_device(device)}",
            *report.environment(command, available, (load_before, report.load_average()))[:-1],
            f"- Total run time: {minutes:.1f} min (time limit {args.time_limit:.0f} s)", "",
            "## Targets", "", *report.table(["workload", "target", "measured", "met"], verdicts), *body]
    args.out.write_text("\n".join(text))
    print(f"[benchmarks.gpu] wrote {args.out} in {minutes:.1f} min", file=sys.stderr)
    return 0


def resnet_verdict(workload: Workload, rows: list[dict]) -> list[list[str]]:
    """Issue 6's GPU target: ResNet-18 top-10 in at most a tenth of PyHessian's time, same run."""
    ours = next((r for r in rows if r["library"] == suites.OURS and "failure" not in r), None)
    pyhessian = next((r for r in rows if r["library"] == "PyHessian" and "failure" not in r), None)
    if ours is None or pyhessian is None:
        return [[workload.name, "top-10 in <= 0.1x PyHessian's time", "not measured (a side failed)", "-"]]
    clock = report.CLOCK
    ratio = ours[clock] / pyhessian[clock]
    return [[workload.name, "top-10 in <= 0.1x PyHessian's time",
             f"{ours[clock]:.3g} s ({ours['products']} products) vs {pyhessian[clock]:.3g} s "
             f"({pyhessian['products']} products): {ratio:.3f}x", "yes" if ratio <= 0.1 else "no"]]


if __name__ == "__main__":
    raise SystemExit(main())
