"""`make demo`: watch the Hessian spectrum of a digits MLP while it trains (about a minute on 2 CPU cores).

The paper's setting (Sagun et al. 2017): scikit-learn's 8x8 digits (bundled, no download),
an MLP 64-20-20-10 (1,930 parameters), plain SGD with lr 0.1 and batch 32 for 30 epochs.
``HessianSpectrumCallback`` measures the Hessian of the mean loss over all 1,000 training images at the
start, every 240 steps and at the end: the top 12 eigenvalues (certified by Lanczos residuals) and the
spectral density (SLQ). At initialization the top eigenvalues decay smoothly; after training about
C - 1 = 9 outliers stand above a bulk concentrated at zero.

Outputs: TensorBoard logs and ``spectrum.png`` under ``runs/demo`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_hessian import HessianSpectrumCallback, Measurement
from lightning_hessian.paper.data import DigitsDataModule
from lightning_hessian.paper.models import MLPClassifier


def plot(history: list[Measurement], path: Path) -> None:
    """Top eigenvalues at every measurement, and the density at the start and at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.cm.viridis(torch.linspace(0, 1, len(history)).tolist())
    for record, color in zip(history, colors, strict=True):
        values = record.hessian.eigenvalues
        left.plot(range(1, len(values) + 1), values, "o-", ms=3, color=color, label=f"step {record.step}")
    left.set_yscale("log")
    left.set_xlabel("index i")
    left.set_ylabel("lambda_i")
    left.set_title("top eigenvalues during training")
    left.legend(fontsize=7)
    for record, name in ((history[0], "start"), (history[-1], "end")):
        density = record.hessian.density
        grid = density.grid()
        curve = density.density(grid).clamp_min(1e-5)
        right.semilogy(grid.tolist(), curve.tolist(), label=f"{name} (step {record.step})")
    right.set_xlabel("eigenvalue")
    right.set_ylabel("density (SLQ)")
    right.set_title("spectral density")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _describe(record: Measurement, when: str) -> str:
    hessian = record.hessian
    top = ", ".join(f"{v:.3g}" for v in hessian.eigenvalues)
    return (f"{when} (step {record.step}): top eigenvalues {top}\n"
            f"    outliers: {hessian.summary.outliers} (gap ratio {hessian.summary.gap_ratio:.2f}), "
            f"near-zero fraction {hessian.summary.near_zero_fraction:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    args = parser.parse_args()

    # One thread: for a 1,930-parameter MLP a second thread only adds synchronization (10-40x slower
    # steps measured on a busy 2-core machine).
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(num_train=1000, batch_size=32, scaling="unit")
    model = MLPClassifier(64, (20, 20), 10, lr=0.1)
    callback = HessianSpectrumCallback(every_n_steps=240, k=12, density=True, num_probes=4, num_steps=40,
                                       num_samples=1000, batch_size=1000, tol=1e-4,
                                       at_evaluate=False)
    logger = TensorBoardLogger(save_dir=str(args.out), name="", version="")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=logger, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=20)
    trainer.fit(model, data)
    (result,) = trainer.validate(model, data, verbose=False)

    history = callback.history
    figure = args.out / "spectrum.png"
    plot(history, figure)
    print()
    print(_describe(history[0], "start"))
    print(_describe(history[-1], "end"))
    print(f"test accuracy {result['val_acc']:.3f}; {len(history)} measurements, "
          f"{sum(r.seconds for r in history):.1f} s spent in the callback")
    print(f"\nspectrum plot: {figure}")
    print(f"TensorBoard:   tensorboard --logdir {args.out}   (then open http://localhost:6006)")


if __name__ == "__main__":
    main()
