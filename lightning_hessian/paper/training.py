"""The reproduction's one training loop: plain SGD on the mean softmax cross-entropy of fixed tensors.

For the paper's 2,000-parameter nets a Lightning step costs more than the step itself, so the
experiments train with this loop and measure with the engine; the callback is shown on the same
nets by ``make demo`` and the configs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_hessian.engine.checks import check_count
from lightning_hessian.paper.models import cross_entropy


def full_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy of ``model`` over all of ``(x [n, d], y [n])``, without gradients.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        >>> round(full_loss(model, torch.ones(4, 2), torch.zeros(4, dtype=torch.long)), 4)  # log 2
        0.6931
    """
    with torch.no_grad():
        return float(cross_entropy(model, (x, y)))


def train_sgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    record_every: int | None = None,
) -> list[tuple[int, float]]:
    """Plain SGD (no momentum) on the mean cross-entropy of ``(x, y)``; the model is trained in place.

    Minibatches walk through a fresh permutation of the samples each epoch, drawn from ``generator``
    (``batch_size=None``: full-batch gradient descent, no shuffling). Training stops after ``steps``
    optimizer steps, or after ``epochs`` epochs when ``steps`` is not given.

    Args:
        model: the network, mapping ``x`` to logits ``[n, C]``.
        x, y: inputs ``[n, d]`` and integer labels ``[n]``.
        lr: learning rate.
        steps: optimizer steps to take.
        epochs: epochs to take when ``steps`` is ``None``.
        batch_size: samples per step (``None``: all of them).
        generator: source of the shuffles (default a fresh one seeded with 0).
        record_every: record the full training loss every this many steps (``None``: record nothing).

    Returns:
        ``(step, full training loss)`` at step 0, every ``record_every`` steps and at the last step;
        empty without ``record_every``.

    Raises:
        ValueError: if neither ``steps`` nor ``epochs`` is given, or a count is not positive.

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> model = nn.Linear(2, 2)
        >>> x, y = torch.randn(8, 2), torch.tensor([0, 1] * 4)
        >>> curve = train_sgd(model, x, y, lr=0.5, steps=4, batch_size=4, record_every=2)
        >>> [step for step, _ in curve]
        [0, 2, 4]
    """
    if steps is None and epochs is None:
        raise ValueError("pass steps= or epochs= to train_sgd")
    size = len(y) if batch_size is None else check_count("batch_size", batch_size)
    steps_per_epoch = -(-len(y) // size)
    total = check_count("steps", steps) if steps is not None else check_count("epochs", epochs) * steps_per_epoch
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    curve = [(0, full_loss(model, x, y))] if record_every is not None else []
    step = 0
    while step < total:
        order = torch.arange(len(y)) if size >= len(y) else torch.randperm(len(y), generator=generator)
        for index in order.split(size):
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(model, (x[index], y[index])).backward()
            optimizer.step()
            step += 1
            if record_every is not None and (step % record_every == 0 or step == total):
                curve.append((step, full_loss(model, x, y)))
            if step == total:
                break
    optimizer.zero_grad(set_to_none=True)
    return curve
