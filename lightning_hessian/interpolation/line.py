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
import pickle
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.engine.batches import count_samples, move_batch
from lightning_hessian.engine.snapshot import BoundModule, module_mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BNMode = Literal["interpolate", "recompute"]
ModelLike = nn.Module | str | os.PathLike
LossFn = Callable[[nn.Module, Any], Tensor]

# Keskar et al.'s grid, linspace(-1, 2, 25): step 1/8, so 0 and 1 are exact binary fractions.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(-1 + 3 * i / 24 for i in range(25))

# torch.save writes a zip archive holding "<name>/data.pkl", or (legacy format) a pickle opening with this number.
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")

# (what needs (x, y) batches, the fix), for errors about batches of another form.
_DEFAULT_LOSS_NEEDS = (
    "the default loss (cross-entropy of model(x) against y)",
    "pass loss_fn=<loss_fn(model, batch) -> scalar mean loss> for batches of another form",
)
_ACCURACY_NEEDS = ("accuracy", "pass accuracy=False for batches of another form")


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
        from matplotlib.figure import Figure

        has_accuracy = self.rows[0]["accuracy"] is not None
        fig = Figure(figsize=(10 if has_accuracy else 5.5, 4), layout="constrained")
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
        """Write :meth:`figure` as an image at 120 dpi, creating parent folders.

        Args:
            path: the file to write; its suffix picks the format (``.png``, ``.pdf``, ``.svg``).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure().savefig(path, dpi=120)
        return path


def _check_torch_file(path: Path) -> None:
    """Raise a ValueError naming ``path`` and what it holds unless :func:`torch.save` wrote it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/data.pkl") for name in archive.namelist()):
                return
        found = "a zip archive without the data.pkl that torch.save writes"
    else:
        with path.open("rb") as handle:
            head = handle.read(32)
        if _LEGACY_MAGIC in head:
            return
        found = f"a file starting with {head[:16]!r}" if head else "an empty file"
    raise ValueError(
        f"{str(path)!r} is not a PyTorch checkpoint file: it is {found}. Expected a file written by torch.save: "
        "a Lightning .ckpt or torch.save(model.state_dict(), path)"
    )


def load_checkpoint_state(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensors of a checkpoint file: a Lightning ``.ckpt`` (its ``state_dict``) or a saved state dict.

    Loaded with ``torch.load(weights_only=True)``: tensors and plain Python values only.

    Args:
        path: the file, written by :func:`torch.save` (a Lightning ``.ckpt`` is one).
        map_location: the device the tensors are loaded onto (default the CPU).

    Returns:
        ``{name: tensor}`` in the file's order, shapes and dtypes as saved.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a PyTorch checkpoint (e.g. text, empty, or a NumPy ``.npy``),
            needs unpickling arbitrary Python objects (it is refused), or holds no state dict.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(nn.Linear(3, 2).state_dict(), Path(folder) / "linear.pt")
        ...     state = load_checkpoint_state(Path(folder) / "linear.pt")
        >>> {name: tuple(tensor.shape) for name, tensor in state.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    _check_torch_file(path)
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it needs unpickling arbitrary Python objects, and checkpoints are read "
            "with torch.load(weights_only=True) because they are data, not code. Save tensors and plain values "
            "only, e.g. torch.save(model.state_dict(), path), or pass the model itself. "
            f"torch said: {str(error).splitlines()[0]}"
        ) from error
    state = content.get("state_dict", content) if isinstance(content, Mapping) else content
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} holds no state dict: expected a Lightning checkpoint (with a 'state_dict' entry) "
            "or the output of torch.save(model.state_dict(), path)"
        )
    return dict(state)


def _check_same_layout(first: Mapping[str, Tensor], second: Mapping[str, Tensor], names: tuple[str, str]) -> None:
    """Raise a ValueError listing every tensor name that is missing on one side or differs in shape."""
    differences = []
    for key in sorted(set(first) | set(second)):
        if key not in second:
            differences.append(f"{key}: {tuple(first[key].shape)} in {names[0]}, missing in {names[1]}")
        elif key not in first:
            differences.append(f"{key}: missing in {names[0]}, {tuple(second[key].shape)} in {names[1]}")
        elif first[key].shape != second[key].shape:
            differences.append(
                f"{key}: {tuple(first[key].shape)} in {names[0]} vs {tuple(second[key].shape)} in {names[1]}"
            )
    if differences:
        raise ValueError(
            f"{names[0]} and {names[1]} have different architectures; differing parameters and buffers:\n  "
            + "\n  ".join(differences)
        )


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every state dict name of a tensor that an earlier name holds too (tied weights)."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first = first_name.setdefault(id(tensor), name)
        if first != name:
            aliases[name] = first
    return aliases


def _without_aliases(state: Mapping[str, Tensor], aliases: Mapping[str, str], name: str) -> dict[str, Tensor]:
    """``state`` less the ``aliases``, each checked to hold the same values as the name it is tied to.

    Raises:
        ValueError: naming each alias whose values differ (``name`` is not tied like the template).
    """
    untied = [
        f"{alias} differs from {first}"
        for alias, first in aliases.items()
        if alias in state and first in state and not torch.equal(state[alias], state[first])
    ]
    if untied:
        raise ValueError(
            f"{name} is not tied like the module evaluated with (model_template, else the first module): "
            f"{', '.join(untied)}, names that module ties to one tensor; pass a model_template tied like the endpoints"
        )
    return {key: value for key, value in state.items() if key not in aliases}


def _resolve_endpoints(
    model_a: ModelLike, model_b: ModelLike, model_template: nn.Module | None
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """The module to evaluate with and the two endpoints' state dicts (checked to match it).

    Names of tied tensors (a decoder sharing the embedding's weight) are dropped from the state dicts
    but the first of each tensor's names in the template, so that each tensor is interpolated once and
    :func:`functional_call` swaps it under all its names.
    """
    for name, value in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(value, (nn.Module, str, os.PathLike)):
            raise TypeError(f"{name} must be an nn.Module or a checkpoint path, got {type(value).__name__}")
    modules = [m for m in (model_template, model_a, model_b) if isinstance(m, nn.Module)]
    template = modules[0] if modules else None
    if template is None:
        raise TypeError(
            "model_a and model_b are both checkpoint paths: pass model_template=<a module of that architecture>"
        )
    device = next(template.parameters()).device
    aliases = _tied_aliases(template)

    def state_of(model: ModelLike, name: str) -> dict[str, Tensor]:
        state = model.state_dict() if isinstance(model, nn.Module) else load_checkpoint_state(model, device)
        return _without_aliases(state, aliases, name)

    state_a, state_b = state_of(model_a, "model_a"), state_of(model_b, "model_b")
    _check_same_layout(state_a, state_b, ("model_a", "model_b"))
    if template is not model_a:
        _check_same_layout(state_of(template, "model_template"), state_a, ("model_template", "model_a"))
    return template, state_a, state_b


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


def _recompute_batchnorm(evaluator: _Evaluator, state: dict[str, Tensor], loader: Iterable[Any]) -> None:
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


def _inputs_and_targets(batch: Any, needed_by: str, fix: str) -> tuple[Any, Any]:
    """``(x, y)``, the first two items of a tuple or list batch.

    Raises:
        TypeError: for a batch of another form, saying that ``needed_by`` needs ``(x, y)`` and the ``fix``.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    found = f"a dict with keys {list(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise TypeError(f"{needed_by} needs (x, y) batches (inputs, then targets), got {found}; {fix}")


def _class_labels(logits: Tensor, batch: Any) -> Tensor:
    """The labels ``y`` of an ``(x, y)`` batch on the logits' device, checked to fit class logits ``[n, C]``.

    Raises:
        ValueError: unless the logits are ``[n, C]`` with ``C >= 2`` and the labels integers ``[n]``
            (a regression model, for one, has neither).
    """
    labels = move_batch(_inputs_and_targets(batch, *_ACCURACY_NEEDS)[1], logits.device, None)
    is_labels = isinstance(labels, Tensor) and not labels.is_floating_point() and not labels.is_complex()
    if logits.ndim != 2 or logits.shape[1] < 2 or not is_labels or labels.shape != logits.shape[:1]:
        found = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            "accuracy needs class logits [n, C] with C >= 2 and integer labels [n] (classification); the model "
            f"returned {tuple(logits.shape)} and the labels are {found}; pass accuracy=False (e.g. for regression)"
        )
    return labels


class _Evaluator:
    """Sample-weighted mean loss and torchmetrics accuracy of a module over a dataloader.

    Given a ``state``, the module runs through :func:`functional_call` with those tensors swapped in
    for the call (so a ``loss_fn`` that calls the module's own methods sees them too); without one,
    as it is.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, accuracy: bool) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.accuracy = accuracy
        floating = [p for p in model.parameters() if p.is_floating_point()]
        self.device = floating[0].device if floating else torch.device("cpu")
        self.dtype = floating[0].dtype if floating else None
        self._bound = BoundModule(model, self._loss_and_logits)

    def _loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor | None]:
        if self.loss_fn is None:
            x, y = _inputs_and_targets(batch, *_DEFAULT_LOSS_NEEDS)
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        loss = self.loss_fn(model, batch)
        return loss, (model(_inputs_and_targets(batch, *_ACCURACY_NEEDS)[0]) if self.accuracy else None)

    def outputs(self, batch: Any, state: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """``(mean loss, logits or None)`` of one batch, with the tensors of ``state`` if given."""
        batch = move_batch(batch, self.device, self.dtype)
        if state is None:
            return self._loss_and_logits(self.model, batch)
        swapped = {f"model.{key}": value for key, value in state.items()}
        return functional_call(self._bound, swapped, (batch,), strict=False)

    def __call__(self, loader: Iterable[Any], state: Mapping[str, Tensor] | None = None) -> tuple[float, float | None]:
        """Return ``(mean loss, accuracy or None)`` over the loader, in eval mode."""
        from torchmetrics.classification import MulticlassAccuracy

        total, count, metric = 0.0, 0, None
        with torch.no_grad(), module_mode(self.model, "eval"):
            for batch in loader:
                loss, logits = self.outputs(batch, state)
                num = count_samples(batch)
                total += float(loss) * num
                count += num
                if logits is None:
                    continue
                labels = _class_labels(logits, batch)
                if metric is None:
                    metric = MulticlassAccuracy(num_classes=logits.shape[1], average="micro").to(logits.device)
                metric.update(logits, labels)
        if count == 0:
            raise ValueError("a dataloader yielded no batches")
        return total / count, (float(metric.compute()) if metric is not None else None)


def evaluate(
    model: nn.Module, dataloader: Iterable[Any], *, loss_fn: LossFn | None = None, accuracy: bool = True
) -> tuple[float, float | None]:
    """Mean loss (weighted by batch size) and accuracy of a model over a dataloader, in eval mode.

    The same computation :func:`linear_interpolation` does at every alpha.

    Args:
        model: the network; its modes are restored afterwards.
        dataloader: batches ``(x, y)`` (any re-iterable); floating tensors are cast to the model's dtype.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``; default cross-entropy of ``model(x)``.
        accuracy: also measure accuracy (torchmetrics, micro average) of ``model(x)`` logits ``[n, C]``
            against integer labels ``y`` ``[n]``.

    Returns:
        ``(loss, accuracy)``: the loss in its own units, accuracy a fraction in [0, 1] or ``None`` when off.

    Raises:
        TypeError: if the default loss or accuracy meets batches that are not ``(x, y)``.
        ValueError: if accuracy meets outputs that are not class logits ``[n, C]``, ``C >= 2``, or labels
            that are not integers ``[n]``, or the dataloader yields no batch.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        >>> data = [(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))]
        >>> loss, accuracy = evaluate(model, data)
        >>> round(loss, 4), accuracy  # both classes equally likely: log 2; ties go to class 0
        (0.6931, 1.0)
    """
    return _Evaluator(model, loss_fn, accuracy)(dataloader)


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
    template, state_a, state_b = _resolve_endpoints(model_a, model_b, model_template)
    evaluator = _Evaluator(template, loss_fn, accuracy)
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
