"""Post-fit linear interpolation between two models: loss and accuracy along a straight line.

For endpoints with parameters and buffers theta_a and theta_b, the model at ``alpha`` is

.. math:: \\theta(\\alpha) = (1 - \\alpha)\\,\\theta_a + \\alpha\\,\\theta_b,

evaluated for every alpha on every dataloader given (Goodfellow, Vinyals and Saxe 2015; Keskar et
al. 2016 use ``linspace(-1, 2, 25)``, the default here). ``alpha = 0`` and ``alpha = 1`` are always on
the grid and reproduce the endpoints bit for bit (``torch.lerp`` is exact at both ends).

Nothing is copied and nothing is changed: each model is evaluated with
:func:`torch.func.functional_call` on the template module with the interpolated tensors swapped
in, and module modes are restored afterwards. Endpoints may be modules or checkpoint files, which
are read with ``torch.load(weights_only=True)`` (checkpoints are data, not code). A tensor the
template holds under several names (tied weights: a decoder sharing the embedding's weight) is
interpolated once, under its first name.

BatchNorm running statistics are interpolated like every other tensor (``bn="interpolate"``) or,
with ``bn="recompute"``, re-estimated at each alpha by a no-grad pass in train mode over
``bn_loader`` with a cumulative average over batches, as :func:`torch.optim.swa_utils.update_bn`
does. The result records which.

The function only computes; the result writes itself (:meth:`InterpolationResult.to_csv`,
:meth:`InterpolationResult.save_plot`) and :func:`lightning_hessian.loggers.log_interpolation`
logs it to TensorBoard, W&B or any Lightning logger.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_hessian.engine.operators import LossFn
from lightning_hessian.engine.snapshot import module_mode
from lightning_hessian.interpolation.checkpoints import ModelLike, resolve_endpoints
from lightning_hessian.interpolation.evaluate import Evaluator
from lightning_hessian.loggers.figures import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure





BNMode = Literal["interpolate", "recompute"]


# Keskar et al.'s grid, linspace(-1, 2, 25): step 1/8, so 0 and 1 are exact binary fractions.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(-1 + 3 * i / 24 for i in range(25))


@dataclass(frozen=True)
class InterpolationResult:
    """Loss and accuracy along the line between two models.

    Attributes:
        rows: one dict per (alpha, split), alphas ascending, splits in the order given, with keys
            ``alpha`` (float), ``split`` (str), ``loss`` (sample-weighted mean loss) and
            ``accuracy`` (fraction in [0, 1], or ``None`` when accuracy was off).
        alphas: the grid, ascending; contains 0.0 and 1.0.
        splits: the dataloader names.
        bn: ``"interpolate"`` or ``"recompute"``: how BatchNorm running statistics were set;
            ``"none"`` when the model has no BatchNorm layer with running statistics.
        norm_a, norm_b: Euclidean norms of the endpoints' parameters (buffers excluded).
        distance: Euclidean norm of ``theta_b - theta_a`` over the parameters.
        num_params: number of scalar parameters.
        labels: display names of the endpoints (alpha 0, alpha 1).
        seconds: wall time of the evaluation, in seconds.

    Example:
        >>> losses = {0.0: 1.0, 0.5: 3.0, 1.0: 2.0}
        >>> result = InterpolationResult(
        ...     rows=[{"alpha": a, "split": "train", "loss": v, "accuracy": None} for a, v in losses.items()],
        ...     alphas=(0.0, 0.5, 1.0), splits=("train",), bn="none", norm_a=1.0, norm_b=2.0, distance=1.5,
        ...     num_params=4, labels=("start", "end"), seconds=0.1,
        ... )
        >>> result.values("train")
        [1.0, 3.0, 2.0]
        >>> result.barrier_height()  # 3 - (1 + 2) / 2 at alpha 0.5
        1.5
        >>> print(result.to_markdown())
        | alpha | train loss |
        | --- | --- |
        | 0 | 1 |
        | 0.5 | 3 |
        | 1 | 2 |
    """

    rows: list[dict[str, Any]]
    alphas: tuple[float, ...]
    splits: tuple[str, ...]
    bn: Literal["interpolate", "recompute", "none"]
    norm_a: float
    norm_b: float
    distance: float
    num_params: int
    labels: tuple[str, str]
    seconds: float

    def values(self, split: str = "train", metric: Literal["loss", "accuracy"] = "loss") -> list[float]:
        """The metric of one split at every alpha, in the order of :attr:`alphas`.

        Args:
            split: a dataloader name in :attr:`splits`.
            metric: ``"loss"`` (sample-weighted mean loss) or ``"accuracy"`` (fraction; ``None`` entries when off).

        Returns:
            One value per alpha.

        Raises:
            KeyError: if ``split`` was not evaluated.
        """
        if split not in self.splits:
            raise KeyError(f"split={split!r} was not evaluated; the splits are {list(self.splits)}")
        return [row[metric] for row in self.rows if row["split"] == split]

    def barrier_height(self, split: str = "train") -> float:
        """Largest excess of the loss over the chord between the endpoint losses, on ``[0, 1]``.

        ``max over alpha in [0, 1] of loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1))``, clipped at 0:
        0 means the loss never rises above the straight line between the endpoints.

        Args:
            split: a dataloader name in :attr:`splits`.

        Returns:
            The height, in the loss's units (>= 0).
        """
        curve = dict(zip(self.alphas, self.values(split), strict=True))
        start, end = curve[0.0], curve[1.0]
        excess = [loss - ((1 - a) * start + a * end) for a, loss in curve.items() if 0.0 <= a <= 1.0]
        return max(0.0, *excess)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :attr:`rows` as CSV (columns alpha, split, loss, accuracy), creating parent folders.

        Args:
            path: the file to write.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["alpha", "split", "loss", "accuracy"])
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_markdown(self) -> str:
        """The rows as a Markdown table, one line per alpha and a loss (and accuracy) column per split."""
        has_accuracy = self.rows[0]["accuracy"] is not None
        header = ["alpha"] + [f"{s} loss" for s in self.splits] + ([f"{s} acc" for s in self.splits] * has_accuracy)
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        losses = [self.values(s) for s in self.splits]
        accuracies = [self.values(s, "accuracy") for s in self.splits] if has_accuracy else []
        for i, alpha in enumerate(self.alphas):
            cells = [f"{alpha:g}"] + [f"{v[i]:.4g}" for v in losses] + [f"{v[i]:.3f}" for v in accuracies]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def figure(self) -> Figure:
        """A matplotlib figure: loss (log scale) and, when measured, accuracy against alpha per split."""
        has_accuracy = self.rows[0]["accuracy"] is not None
        fig = new_figure(10 if has_accuracy else 5.5, 4)
        axes = fig.subplots(1, 2 if has_accuracy else 1, squeeze=False)[0]
        for ax, metric in zip(axes, ["loss", "accuracy"], strict=False):
            for split in self.splits:
                ax.plot(self.alphas, self.values(split, metric), marker="o", markersize=3, label=split)
            for alpha in (0.0, 1.0):
                ax.axvline(alpha, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(f"alpha  (0: {self.labels[0]}, 1: {self.labels[1]})")
            ax.set_ylabel(metric)
            ax.legend()
        if all(v > 0 for s in self.splits for v in self.values(s)):
            axes[0].set_yscale("log")
        barrier = self.barrier_height(self.splits[0])
        axes[0].set_title(f"{self.splits[0]} barrier {barrier:.3g}, distance {self.distance:.3g}, bn: {self.bn}")
        return fig

    def save_plot(self, path: str | os.PathLike) -> Path:
        """Write :meth:`figure` as an image (at the package's file resolution, 120 dpi), creating parent folders.

        Args:
            path: the file to write; its suffix picks the format (``.png``, ``.pdf``, ``.svg``).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        return save_figure(self.figure(), path)


def _interpolate(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) a + alpha b`` for floating tensors; integer buffers are taken from the nearer endpoint."""
    return {
        key: torch.lerp(a, state_b[key].to(a), alpha) if a.is_floating_point() else (a if alpha < 0.5 else state_b[key])
        for key, a in state_a.items()
    }


def _batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers that keep running statistics, with their qualified names."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _recompute_batchnorm(evaluator: Evaluator, state: dict[str, Tensor], loader: Iterable[Any]) -> None:
    """Reset the BatchNorm statistics in ``state`` and re-estimate them with a no-grad train-mode pass.

    ``momentum=None`` makes every layer keep a cumulative average over batches, as ``update_bn`` does;
    the statistics land in fresh tensors in ``state``, never in the template's buffers.
    """
    layers = _batchnorm_layers(evaluator.model)
    momenta = [m.momentum for _, m in layers]
    for name, m in layers:
        prefix = f"{name}." if name else ""
        state[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
        state[prefix + "running_var"] = torch.ones_like(m.running_var)
        state[prefix + "num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
    try:
        for _, m in layers:
            m.momentum = None
        with torch.no_grad(), module_mode(evaluator.model, "train"):
            for batch in loader:
                evaluator.outputs(batch, state)
    finally:
        for (_, m), momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum


def _alpha_grid(alphas: Sequence[float] | Tensor | None) -> tuple[float, ...]:
    """The sorted, de-duplicated grid with 0.0 and 1.0 merged in."""
    values = DEFAULT_ALPHAS if alphas is None else [float(a) for a in torch.as_tensor(alphas).flatten()]
    if not all(math.isfinite(a) for a in values):
        raise ValueError(f"alphas must be finite numbers, got {list(values)}")
    return tuple(sorted({*values, 0.0, 1.0}))


def linear_interpolation(
    model_a: ModelLike,
    model_b: ModelLike,
    dataloaders: Mapping[str, Iterable[Any]] | Iterable[Any],
    alphas: Sequence[float] | Tensor | None = None,
    *,
    model_template: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    accuracy: bool = True,
    bn: BNMode = "interpolate",
    bn_loader: Iterable[Any] | None = None,
    labels: tuple[str, str] = ("model_a", "model_b"),
    progress: bool = True,
) -> InterpolationResult:
    """Evaluate the models on the line ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b``.

    Every floating parameter and buffer is interpolated (BatchNorm statistics too, unless
    ``bn="recompute"``); the models given are not changed.

    Args:
        model_a: the endpoint at alpha = 0: a module (``nn.Module`` or LightningModule) or the path of a
            checkpoint (a Lightning ``.ckpt`` or a saved state dict; loaded with ``weights_only=True``).
        model_b: the endpoint at alpha = 1, likewise.
        dataloaders: ``{split name: dataloader}``, e.g. ``{"train": ..., "test": ...}``; a single
            dataloader is named ``"train"``. Batches are ``(x, y)`` unless ``loss_fn`` says otherwise.
        alphas: the grid (default Keskar et al.'s ``linspace(-1, 2, 25)``); 0 and 1 are always added,
            values are sorted and de-duplicated.
        model_template: the module whose architecture the checkpoints fit; default the first endpoint
            that is a module (required when both are paths).
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss`` (default softmax cross-entropy of
            ``model(x)`` against ``y``); the loss is averaged over samples, weighted by batch size.
        accuracy: measure accuracy of the logits ``model(x)`` ``[n, C]`` against ``y`` (torchmetrics,
            micro average); ``False`` for batches or outputs of another shape.
        bn: ``"interpolate"`` (default) or ``"recompute"`` (reset and re-estimate BatchNorm running
            statistics at each alpha with a no-grad pass over ``bn_loader``).
        bn_loader: the data for ``bn="recompute"`` (default the ``"train"`` dataloader, else the first).
        labels: display names of the two endpoints in plots.
        progress: show a progress bar over alphas.

    Returns:
        An :class:`InterpolationResult`.

    Raises:
        TypeError: for an endpoint that is neither a module nor a path, two paths without
            ``model_template``, or batches that are not ``(x, y)`` with the default loss or accuracy.
        ValueError: for a bad ``bn`` or ``alphas``, no dataloader, architectures that differ (the
            message lists each differing name and shape), endpoints not tied like the template, a file
            that is not a PyTorch checkpoint or is refused, or outputs that are not class logits
            ``[n, C]`` (or labels that are not integers) while ``accuracy`` is on.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> result = linear_interpolation(a, b, data, [0.5], progress=False)
        >>> result.alphas, [row["split"] for row in result.rows]
        ((0.0, 0.5, 1.0), ['train', 'train', 'train'])
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if bn not in ("interpolate", "recompute"):
        raise ValueError(f"bn={bn!r} must be 'interpolate' or 'recompute'")
    loaders = dict(dataloaders) if isinstance(dataloaders, Mapping) else {"train": dataloaders}
    if not loaders:
        raise ValueError("dataloaders is empty: pass {'train': train_loader, ...} or a single dataloader")
    grid = _alpha_grid(alphas)
    template, state_a, state_b = resolve_endpoints(model_a, model_b, model_template)
    evaluator = Evaluator(template, loss_fn, accuracy)
    recompute = bn == "recompute" and bool(_batchnorm_layers(template))
    statistics_loader = bn_loader if bn_loader is not None else loaders.get("train", next(iter(loaders.values())))

    rows = []
    for alpha in tqdm(grid, desc="linear interpolation: alphas", disable=not progress, leave=False):
        state = _interpolate(state_a, state_b, alpha)
        if recompute:
            _recompute_batchnorm(evaluator, state, statistics_loader)
        for split, loader in loaders.items():
            loss, acc = evaluator(loader, state)
            rows.append({"alpha": alpha, "split": split, "loss": loss, "accuracy": acc})

    names = [n for n, _ in template.named_parameters()]
    a = torch.cat([state_a[n].detach().double().flatten() for n in names])
    b = torch.cat([state_b[n].detach().double().flatten().to(a.device) for n in names])
    result = InterpolationResult(
        rows=rows,
        alphas=grid,
        splits=tuple(loaders),
        bn=bn if _batchnorm_layers(template) else "none",
        norm_a=float(a.norm()),
        norm_b=float(b.norm()),
        distance=float((b - a).norm()),
        num_params=a.numel(),
        labels=labels,
        seconds=time.perf_counter() - started,
    )
    return result
