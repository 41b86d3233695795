"""The methods a LightningModule may define so the callback knows its loss: typed as protocols.

None is required: without them the callback takes the loss that ``training_step`` returns. Defining
``hessian_loss`` is cheaper and has no side effects of ``training_step`` (logging, counters);
the Gauss-Newton matrix (``matrix="ggn"`` or ``"both"``) needs the split into outputs and a loss on
them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class HessianLossModule(Protocol):
    """A module that gives the mean loss of a batch directly.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Linear):
        ...     def hessian_loss(self, batch):
        ...         return self(batch[0]).pow(2).mean()
        >>> isinstance(Net(2, 1), HessianLossModule)
        True
    """

    def hessian_loss(self, batch: Any) -> Tensor:
        """The mean loss over the samples of ``batch``, a scalar tensor attached to the parameters."""
        ...


@runtime_checkable
class GaussNewtonModule(Protocol):
    """A module whose loss splits into outputs and a loss on them: what the Gauss-Newton matrix needs.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Linear):
        ...     def hessian_outputs(self, batch):
        ...         return self(batch[0])
        ...     def hessian_output_loss(self, outputs, batch):
        ...         return torch.nn.functional.cross_entropy(outputs, batch[1])
        >>> isinstance(Net(2, 3), GaussNewtonModule)
        True
    """

    def hessian_outputs(self, batch: Any) -> Tensor:
        """The model outputs of ``batch``, e.g. logits ``[n, C]``."""
        ...

    def hessian_output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """The mean loss of ``batch`` given its outputs, a scalar tensor."""
        ...
