"""One measurement of one curvature matrix: engine operators and solvers in, a typed measurement out.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.

Everything numeric is the engine's; this module chooses the loss the module defines (the
protocols of :mod:`lightning_hessian.hooks`), wraps the operator for DDP, keeps the warm-start
vectors between calls and packs the results into a
:class:`~lightning_hessian.measurement.MatrixMeasurement`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian._distributed import SummedOperator
from lightning_hessian.engine import (
    EigenResult,
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.layers import Layout, gradient_overlap, layer_traces, mass_by_layer
from lightning_hessian.engine.snapshot import select_parameters
from lightning_hessian.measurement import LayerEigenvalue, LayerView, Matrix, MatrixMeasurement


class MissingLoss(NonFiniteError):
    """``training_step`` returned no loss (``None``, Lightning's way to skip a batch) during a measurement.

    Handled like a non-finite loss: there is no spectrum at this call, and training goes on.
    """


def hessian_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of a module that defines ``hessian_loss(batch)``."""
    return module.hessian_loss(batch)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss ``training_step`` returns (a tensor or a dict's ``"loss"``), for ``batch_idx=-1``.

    Raises:
        MissingLoss: if it returns ``None`` or a dict without ``"loss"``.
        TypeError: if it returns anything else that is not a tensor.
    """
    output = module.training_step(batch, -1)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if loss is None:
        raise MissingLoss("training_step returned no loss (None) on a probe batch")
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"training_step returned {type(output).__name__}, not a loss tensor or a dict with 'loss'; "
            "define `hessian_loss(self, batch)` on the module or pass `loss_fn=` to HessianSpectrumCallback"
        )
    return loss


def hessian_outputs(module: nn.Module, batch: Any) -> Tensor:
    """The outputs of a module that defines ``hessian_outputs(batch)``."""
    return module.hessian_outputs(batch)


def layer_name(pattern: str) -> str:
    """Tag-friendly name of a parameter pattern: ``"net.0.*"`` -> ``"net.0"``."""
    return pattern.rstrip(".*") or pattern


def make_operator(
    trainer: Any,
    pl_module: nn.Module,
    batches: list[Any],
    matrix: Matrix,
    *,
    dtype: torch.dtype,
    mode: str,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    params: list[str] | None = None,
) -> Any:
    """The ``"hessian"`` or ``"ggn"`` operator over this rank's batches, summed across ranks under DDP.

    The loss is ``loss_fn``, else the module's ``hessian_loss``, else its ``training_step``'s loss.
    """
    local = None
    if batches:
        common = {"params": params, "dtype": dtype, "mode": mode}
        if matrix == "hessian":
            if loss_fn is None:
                loss_fn = hessian_loss if callable(getattr(pl_module, "hessian_loss", None)) else training_step_loss
            local = HessianOperator(pl_module, loss_fn, batches, **common)
        else:
            local = GGNOperator(pl_module, hessian_outputs, pl_module.hessian_output_loss, batches, **common)
    if trainer.world_size == 1:
        return local
    selected = select_parameters(pl_module, params)
    return SummedOperator(local, trainer.strategy, num_params=sum(p.numel() for _, p in selected),
                          dtype=dtype, device=selected[0][1].device)


@dataclass(frozen=True)
class MatrixSolver:
    """How one call measures a matrix (the callback's numeric settings, documented on the callback)."""

    k: int
    tol: float
    max_matvecs: int | None
    smallest: bool
    density: bool
    num_probes: int
    num_steps: int
    layers: tuple[str, ...]
    layer_views: bool
    grad_overlap: bool
    seed: int

    def _solve(self, op: Any, k: int, warm: dict[str, Tensor] | None, key: str, which: str = "largest") -> EigenResult:
        """``top_eigenvalues``, warm-started from ``warm[key]`` and leaving this call's vectors there."""
        v0 = warm.get(key) if warm is not None else None
        if v0 is not None and v0.numel() != op.num_params:
            v0 = None
        result = top_eigenvalues(op, k, tol=self.tol, which=which, v0=v0, max_matvecs=self.max_matvecs,
                                 seed=self.seed)
        if warm is not None:
            # The engine starts from the sum of a block's unit rows: keeping only that sum, ``(P,)``,
            # keeps checkpoints small.
            warm[key] = result.eigenvectors.sum(dim=0).to(device="cpu", dtype=torch.float32)
        return result

    def measure(
        self, make: Callable[..., Any], matrix: Matrix, warm: dict[str, Tensor] | None, *, layout: Layout
    ) -> MatrixMeasurement:
        """Measure one matrix.

        Args:
            make: ``make(params=...)`` builds the operator over all parameters (``None``) or those
                a list of name patterns selects.
            matrix: ``"hessian"`` or ``"ggn"``, also the prefix of its warm-start keys.
            warm: warm-start vectors by key, updated in place; ``None`` for cold starts.
            layout: ``(name, numel)`` of the operator's parameters, for the layer views.
        """
        op = make(params=None)
        top = self._solve(op, min(self.k, op.num_params), warm, matrix)
        count = top.num_matvecs
        eig_min = eig_min_residual = None
        if self.smallest:
            low = self._solve(op, 1, warm, f"{matrix}/min", which="smallest")
            eig_min, eig_min_residual = float(low.eigenvalues[0]), float(low.residuals[0])
            count += low.num_matvecs
        density = None
        if self.density:
            # The converged top-k are placed exactly and SLQ spends its steps on the rest (the bulk).
            exact = top if top.all_converged and top.eigenvalues.numel() < op.num_params else None
            density = spectral_density(op, num_probes=self.num_probes, num_steps=self.num_steps, seed=self.seed,
                                       deflate=exact)
            count += density.num_matvecs
        layers = {}
        for pattern in self.layers:
            block = self._solve(make(params=[pattern]), 1, warm, f"{matrix}/layer/{pattern}")
            layers[layer_name(pattern)] = LayerEigenvalue(pattern, float(block.eigenvalues[0]),
                                                          float(block.residuals[0]))
            count += block.num_matvecs
        views = {}
        if self.layer_views:
            traces = layer_traces(op, layout, num_probes=self.num_probes, seed=self.seed)
            mass = mass_by_layer(layout, top.eigenvectors[:1])
            views = {name: LayerView(trace, stderr, float(mass[name][0])) for name, (trace, stderr) in traces.items()}
            count += self.num_probes
        overlap = None
        if self.grad_overlap and matrix == "hessian":
            overlap = gradient_overlap(op.gradient(), top.eigenvectors)
        return MatrixMeasurement(
            matrix=matrix, num_params=op.num_params, eigenvalues=tuple(top.eigenvalues.tolist()),
            residuals=tuple(top.residuals.tolist()), converged=tuple(top.converged.tolist()), num_matvecs=count,
            summary=summarize(top.eigenvalues, density), density=density, eig_min=eig_min,
            eig_min_residual=eig_min_residual, layers=layers, layer_views=views, grad_overlap=overlap,
        )
