"""Compare the Hessian spectrum of two runs that differ only in learning rate, in TensorBoard and W&B.

The same digits MLP (64-20-20-10, 1,930 parameters, scikit-learn's 8x8 digits bundled with the package,
no download) trains twice from the same initialization by full-batch gradient descent (batch = the
1,000 training images) for 300 steps, at learning rates 0.1 and 0.2; ``--runs BATCH:LR ...`` chooses
other runs (e.g. ``--runs 25:0.2 1000:0.2`` compares batch sizes). ``HessianSpectrumCallback`` measures
the Hessian of the loss over the whole training set at step 0, every ``--every`` steps and at the
end. The runs log to one TensorBoard directory (one run folder each) and to one W&B project (offline
unless ``--wandb-mode online``), so either tool overlays them: ``hessian/eig_1`` and
``hessian/stability`` (eig_1 over the optimizer's threshold, 2 / lr here: 1 is the edge of
stability), the outliers (``hessian/outliers``, ``hessian/density/top_k``) and the bulk
(``hessian/density/bulk``). ``docs/compare.md`` shows how to read them.

    python examples/compare_runs.py                 # about 30 s of CPU time on 2 cores
    tensorboard --logdir runs/compare/tensorboard   # then open http://localhost:6006
    wandb sync runs/compare/wandb/offline-run-*     # to upload the offline W&B runs, if you want to

``compare(...)`` does the same from Python and returns each run's measurements.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_hessian import HessianSpectrumCallback, Measurement
from lightning_hessian.paper.data import DigitsDataModule
from lightning_hessian.paper.models import MLPClassifier

NUM_TRAIN = 1000
# (batch size, learning rate): full-batch gradient descent at two learning rates.
DEFAULT_RUNS = ((NUM_TRAIN, 0.1), (NUM_TRAIN, 0.2))


@dataclass(frozen=True)
class RunResult:
    """One training run: its name, batch size, learning rate and the callback's measurements."""

    name: str
    batch_size: int
    lr: float
    history: list[Measurement]
    wandb_dir: str | None


def train_one(out: Path, *, batch_size: int, lr: float, max_steps: int, every_n_steps: int, k: int,
              wandb_mode: str | None, project: str, num_samples: int = NUM_TRAIN, seed: int = 0) -> RunResult:
    """Train the digits MLP once with the callback, logging to ``out/tensorboard/<name>`` and W&B.

    Args:
        out: the output folder shared by the runs.
        batch_size: training batch size (``NUM_TRAIN`` for full-batch gradient descent).
        lr: SGD learning rate.
        max_steps: optimizer steps.
        every_n_steps: the callback measures at step 0, every this many steps and at the end.
        k: top eigenvalues per measurement.
        wandb_mode: ``"offline"`` or ``"online"`` to log to W&B too, ``None`` for TensorBoard only.
        project: the W&B project.
        num_samples: images in the probe set (default all 1,000 training images).
        seed: seeds the initialization and the data order (the same for every run).
    """
    name = f"batch_{batch_size}_lr_{lr:g}"
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(num_train=NUM_TRAIN, batch_size=batch_size, seed=seed, scaling="unit")
    model = MLPClassifier(64, (20, 20), 10, lr=lr)
    callback = HessianSpectrumCallback(every_n_steps=every_n_steps, k=k, num_samples=num_samples,
                                       batch_size=num_samples, num_probes=3, num_steps=30, tol=1e-4,
                                       at_evaluate=False)
    loggers: list[pl.loggers.Logger] = [TensorBoardLogger(save_dir=str(out / "tensorboard"), name=name, version="")]
    if wandb_mode is not None:
        from pytorch_lightning.loggers import WandbLogger

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(project=project, name=name, save_dir=str(out), mode=wandb_mode,
                                   config={"batch_size": batch_size}))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=loggers, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=10, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data)
    wandb_dir = None
    if wandb_mode is not None:
        run = loggers[-1].experiment
        wandb_dir = os.path.dirname(run.dir)  # .../wandb/<offline-run-...>
        run.finish()
    return RunResult(name, batch_size, lr, callback.history, wandb_dir)


def compare(out: str | os.PathLike = "runs/compare", *, runs: Sequence[tuple[int, float]] = DEFAULT_RUNS,
            max_steps: int = 300, every_n_steps: int = 25, k: int = 12, wandb_mode: str | None = "offline",
            project: str = "lightning-hessian-compare", num_samples: int = NUM_TRAIN) -> list[RunResult]:
    """Train one run per ``(batch size, learning rate)`` (same model, initialization and data) and log all.

    Args:
        out: output folder: ``tensorboard/<run>`` for each run, ``wandb/`` for W&B's files.
        runs: ``(batch_size, lr)`` of each run.
        max_steps: optimizer steps per run.
        every_n_steps: measurement interval (plus step 0 and the last step).
        k: top eigenvalues per measurement.
        wandb_mode: ``"offline"`` (default), ``"online"`` or ``None`` (no W&B).
        project: the W&B project all runs log to.
        num_samples: images in every run's probe set (default all 1,000 training images).

    Returns:
        One :class:`RunResult` per run, in order.
    """
    out = Path(out)
    return [train_one(out, batch_size=b, lr=lr, max_steps=max_steps, every_n_steps=every_n_steps, k=k,
                      wandb_mode=wandb_mode, project=project, num_samples=num_samples) for b, lr in runs]


def describe(result: RunResult) -> str:
    """Three lines: lambda_1, the stability ratio and the outlier count at the first and the last
    measurement, and the largest ratio of the run."""
    lines = [f"{result.name}:"]
    for record in (result.history[0], result.history[-1]):
        hessian = record.hessian
        lines.append(f"  step {record.step:4d}: lambda_1 {hessian.eigenvalues[0]:6.3f}, stability "
                     f"{record.stability.stability:5.2f}, outliers {hessian.summary.outliers:2d}, near-zero fraction "
                     f"{hessian.summary.near_zero_fraction:.2f}")
    peak = max(record.stability.stability for record in result.history)
    lines.append(f"  largest stability over the run: {peak:.2f} (edge of stability: 1)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (runs/compare)")
    parser.add_argument("--runs", nargs="+", default=[f"{b}:{lr}" for b, lr in DEFAULT_RUNS], metavar="BATCH:LR",
                        help="one run per batch size and learning rate (default 1000:0.1 1000:0.2)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--every", type=int, default=25, help="measure every this many steps (default 25)")
    parser.add_argument("--k", type=int, default=12, help="top eigenvalues per measurement (default 12)")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "none"], default="offline",
                        help="W&B mode (default offline; none for TensorBoard only)")
    args = parser.parse_args()

    # One thread: for a 1,930-parameter MLP a second thread only adds synchronization.
    torch.set_num_threads(1)
    runs = [(int(b), float(lr)) for b, lr in (run.split(":") for run in args.runs)]
    results = compare(args.out, runs=runs, max_steps=args.steps,
                      every_n_steps=args.every, k=args.k,
                      wandb_mode=None if args.wandb_mode == "none" else args.wandb_mode)
    print()
    for result in results:
        print(describe(result))
    print(f"\nTensorBoard: tensorboard --logdir {args.out / 'tensorboard'}")
    if args.wandb_mode == "offline":
        print(f"W&B (offline): wandb sync {args.out / 'wandb'}/offline-run-*")


if __name__ == "__main__":
    main()
