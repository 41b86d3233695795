"""A model's sample-weighted mean loss and accuracy over a dataloader, optionally with other tensors swapped in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.engine.batches import count_samples, move_batch
from lightning_hessian.engine.operators import LossFn
from lightning_hessian.engine.snapshot import BoundModule, module_mode

# (what needs (x, y) batches, the fix), for errors about batches of another form.
_DEFAULT_LOSS_NEEDS = (
    "the default loss (cross-entropy of model(x) against y)",
    "pass loss_fn=<loss_fn(model, batch) -> scalar mean loss> for batches of another form",
)


_ACCURACY_NEEDS = ("accuracy", "pass accuracy=False for batches of another form")


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


class Evaluator:
    """Sample-weighted mean loss and torchmetrics accuracy of a module over a dataloader.

    Given a ``state``, the module runs through :func:`functional_call` with those tensors swapped in
    for the call (so a ``loss_fn`` that calls the module's own methods sees them too); without one,
    as it is.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> batches = [(torch.ones(4, 2), torch.tensor([0, 1, 0, 1]))]
        >>> zero = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
        >>> loss, accuracy = Evaluator(model, None, accuracy=True)(batches, state=zero)  # equal logits
        >>> round(loss, 6), accuracy
        (0.693147, 0.5)
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
    return Evaluator(model, loss_fn, accuracy)(dataloader)
