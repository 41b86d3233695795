"""Two optimizers at their edge of stability: SGD with momentum and AdamW on the digits MLP.

The paper's digits MLP (64-20-20-10, 1,930 parameters, scikit-learn's digits bundled with the
package, no download) trains twice from the same initialization by full-batch steps (batch = the
1,000 training images) on the squared error against one-hot labels, once with SGD (lr 0.3, momentum
0.9: the edge is eig_1 = 3.8 / lr) and once with AdamW (lr 0.01, betas 0.9 and 0.999, weight decay
0.01: the edge is a preconditioned sharpness of 38 / lr). ``HessianSpectrumCallback`` measures the
top eigenvalue every ``--every`` steps and logs ``hessian/stability``, the ratio to each optimizer's
own threshold, which rises to 1 in both runs and hovers there. The figure (``--figure``) shows the
ratio, and for each run the curvature against its threshold.

    python examples/edge_of_stability.py                 # about 30 s on one core
    python examples/edge_of_stability.py --figure docs/img/edge_of_stability.png

``train(...)`` does one run from Python and returns its measurements.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian import HessianSpectrumCallback, Measurement
from lightning_hessian.loggers.figures import new_figure, save_figure
from lightning_hessian.paper.data import DigitsDataModule
from lightning_hessian.paper.models import MLPClassifier

NUM_TRAIN = 1000
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
# The two runs of the figure: SGD with heavy-ball momentum first, then AdamW.
RUNS: dict[str, MakeOptimizer] = {
    "SGD, lr 0.3, momentum 0.9": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
    "AdamW, lr 0.01": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
}


class SquaredErrorMLP(MLPClassifier):
    """The digits MLP on half the squared error of its logits against one-hot labels, with any optimizer."""

    def __init__(self, make_optimizer: MakeOptimizer) -> None:
        super().__init__(64, (20, 20), 10)
        self.make_optimizer = make_optimizer

    def hessian_output_loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        targets = F.one_hot(batch[1], outputs.shape[1]).to(outputs.dtype)
        return 0.5 * (outputs - targets).pow(2).sum(1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def train(make_optimizer: MakeOptimizer, *, max_steps: int = 600, every_n_steps: int = 10,
          seed: int = 0) -> list[Measurement]:
    """One full-batch run with the callback measuring the top eigenvalue every ``every_n_steps`` steps.

    Args:
        make_optimizer: builds the optimizer from the parameters.
        max_steps: optimizer steps.
        every_n_steps: measurement interval (plus step 0).
        seed: seeds the initialization.
    """
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(num_train=NUM_TRAIN, batch_size=NUM_TRAIN, seed=seed, scaling="unit")
    callback = HessianSpectrumCallback(every_n_steps=every_n_steps, budget=None, k=1, density=False,
                                       num_samples=NUM_TRAIN, batch_size=NUM_TRAIN, at_evaluate=False,
                                       history_file=None, progress=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(SquaredErrorMLP(make_optimizer), data)
    return callback.history


def describe(name: str, history: list[Measurement]) -> str:
    """One line: the threshold, the peak ratio and the mean ratio over the second half of the run."""
    ratios = [m.stability.stability for m in history if m.stability.stability is not None]
    late = ratios[len(ratios) // 2:]
    return (f"{name}: threshold {history[-1].stability.threshold:.4g}, stability peaks at {max(ratios):.2f}, "
            f"mean {sum(late) / len(late):.2f} over the second half (min {min(late):.2f}, max {max(late):.2f})")


def figure(runs: dict[str, list[Measurement]], path: Path) -> None:
    """The ratio of both runs against 1, and each run's curvature against its threshold."""
    fig = new_figure(14, 3.8)
    axes = fig.subplots(1, 3)
    colors = ("tab:blue", "tab:orange")
    for (name, history), color in zip(runs.items(), colors, strict=True):
        measured = [m for m in history if m.stability.stability is not None]
        axes[0].plot([m.step for m in measured], [m.stability.stability for m in measured], "o-", ms=2.5,
                     color=color, label=name)
    axes[0].axhline(1, color="black", ls="--", lw=1, label="edge of stability (1)")
    axes[0].set_title("hessian/stability")
    (sgd_name, sgd), (adamw_name, adamw) = runs.items()
    steps = [m.step for m in sgd]
    axes[1].plot(steps, [m.hessian.eigenvalues[0] for m in sgd], "o-", ms=2.5, color=colors[0],
                 label="eig_1 (hessian/eig_1)")
    axes[1].plot(steps[1:], [m.stability.batch_sharpness for m in sgd[1:]], "-", lw=1, color="tab:green",
                 label="batch sharpness (hessian/batch_sharpness)")
    axes[1].axhline(sgd[-1].stability.threshold, color="black", ls="--", lw=1,
                    label=f"3.8 / lr = {sgd[-1].stability.threshold:.3g}")
    axes[1].set_title(sgd_name)
    measured = [m for m in adamw if m.stability.preconditioned_eig_1 is not None]
    axes[2].plot([m.step for m in measured], [m.stability.preconditioned_eig_1 for m in measured], "o-", ms=2.5,
                 color=colors[1], label="top eigenvalue of P^-1 H (hessian/preconditioned_eig_1)")
    axes[2].axhline(adamw[-1].stability.threshold, color="black", ls="--", lw=1,
                    label=f"38 / lr = {adamw[-1].stability.threshold:.4g}")
    axes[2].set_title(adamw_name)
    for panel in axes:
        panel.set_xlabel("step")
        panel.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    parser.add_argument("--every", type=int, default=10, help="measure every this many steps (default 10)")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (a .png)")
    args = parser.parse_args()
    # One thread: for a 1,930-parameter MLP a second thread only adds synchronization.
    torch.set_num_threads(1)
    runs = {name: train(make, max_steps=args.steps, every_n_steps=args.every) for name, make in RUNS.items()}
    for name, history in runs.items():
        print(describe(name, history))
    if args.figure is not None:
        figure(runs, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
