"""One measurement of one curvature matrix: engine operators, engine solvers, a plain record.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.

Everything numeric is the engine's (:class:`HessianOperator`, :class:`GGNOperator`,
:func:`top_eigenvalues`, :func:`spectral_density`, :func:`summarize`); this module chooses the
loss the module defines, wraps the operator for DDP and turns the results into plain Python values
that checkpoints, JSON and loggers take as they are.
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
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.layers import Layout, gradient_overlap, layer_traces, mass_by_layer
from lightning_hessian.engine.operators import select_parameters


def _hessian_loss(module: nn.Module, batch: Any) -> Tensor:
    return module.hessian_loss(batch)


def _training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss ``training_step`` returns (a tensor or a dict's ``"loss"``); ``self.log`` is muted meanwhile."""
    output = module.training_step(batch, 0)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"training_step returned {type(output).__name__}, not a loss tensor or a dict with 'loss'; "
            "define `hessian_loss(self, batch)` on the module or pass `loss_fn=` to HessianSpectrumCallback"
        )
    return loss


def _hessian_outputs(module: nn.Module, batch: Any) -> Tensor:
    return module.hessian_outputs(batch)


def layer_name(pattern: str) -> str:
    """Tag-friendly name of a parameter pattern: ``"net.0.*"`` -> ``"net.0"``."""
    return pattern.rstrip(".*") or pattern


def make_operator(
    trainer: Any,
    pl_module: nn.Module,
    batches: list[Any],
    matrix: str,
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
                loss_fn = _hessian_loss if callable(getattr(pl_module, "hessian_loss", None)) else _training_step_loss
            local = HessianOperator(pl_module, loss_fn, batches, **common)
        else:
            local = GGNOperator(pl_module, _hessian_outputs, pl_module.hessian_output_loss, batches, **common)
    if trainer.world_size == 1:
        return local
    selected = select_parameters(pl_module, params)
    return SummedOperator(local, trainer.strategy, num_params=sum(p.numel() for _, p in selected),
                          dtype=dtype, device=selected[0][1].device)


@dataclass(frozen=True)
class Solver:
    """What one call measures of a matrix (the callback's numeric settings, see its docstring)."""

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
        self,
        make: Callable[..., Any],
        key: str,
        warm: dict[str, Tensor] | None,
        *,
        layout: Layout,
    ) -> tuple[dict[str, Any], int]:
        """Measure one matrix.

        Args:
            make: ``make(params=...)`` builds the operator over all parameters (``None``) or those
                a list of name patterns selects.
            key: the matrix's name (``"hessian"``, ``"ggn"``), prefix of its warm-start keys.
            warm: warm-start vectors by key, updated in place; ``None`` for cold starts.
            layout: ``(name, numel)`` of the operator's parameters, for the layer views.

        Returns:
            The record fields (plain values: ``eigenvalues`` (k), ``residuals``, ``converged``,
            ``num_params``, optionally ``eig_min``/``eig_min_residual``, ``trace``,
            ``trace_stderr``, ``nodes``/``weights`` (S x (m + k), the top k placed exactly when they
            converged, else S x m), then ``outliers``, ``gap_ratio``,
            ``bulk_edge``, ``near_zero_fraction``, ``negative_mass``, ``layers``, ``layer_views``
            (per module: ``trace``, ``trace_stderr``, ``eig_1_mass``) and ``grad_overlap``) and the
            number of products used.
        """
        op = make(params=None)
        top = self._solve(op, min(self.k, op.num_params), warm, key)
        fields: dict[str, Any] = {
            "eigenvalues": top.eigenvalues.tolist(), "residuals": top.residuals.tolist(),
            "converged": top.converged.tolist(), "num_params": op.num_params,
        }
        count = top.num_matvecs
        if self.smallest:
            low = self._solve(op, 1, warm, f"{key}/min", which="smallest")
            fields["eig_min"], fields["eig_min_residual"] = float(low.eigenvalues[0]), float(low.residuals[0])
            count += low.num_matvecs
        esd = None
        if self.density:
            # The converged top-k are placed exactly and SLQ spends its steps on the rest (the bulk).
            exact = top if top.all_converged and top.eigenvalues.numel() < op.num_params else None
            esd = spectral_density(op, num_probes=self.num_probes, num_steps=self.num_steps, seed=self.seed,
                                   outliers=exact)
            fields.update(trace=esd.trace, trace_stderr=esd.trace_stderr, nodes=esd.nodes.tolist(),
                          weights=esd.weights.tolist())
            count += esd.num_matvecs
        summary = summarize(top.eigenvalues, esd)
        fields.update(outliers=summary.outliers, gap_ratio=summary.gap_ratio, bulk_edge=summary.bulk_edge,
                      near_zero_fraction=summary.near_zero_fraction, negative_mass=summary.negative_mass)
        layers = {}
        for pattern in self.layers:
            block = self._solve(make(params=[pattern]), 1, warm, f"{key}/layer/{pattern}")
            layers[layer_name(pattern)] = {"pattern": pattern, "eigenvalue": float(block.eigenvalues[0]),
                                           "residual": float(block.residuals[0])}
            count += block.num_matvecs
        if layers:
            fields["layers"] = layers
        if self.layer_views:
            traces = layer_traces(op, layout, num_probes=self.num_probes, seed=self.seed)
            mass = mass_by_layer(layout, top.eigenvectors[:1])
            fields["layer_views"] = {
                name: {"trace": trace, "trace_stderr": stderr, "eig_1_mass": float(mass[name][0])}
                for name, (trace, stderr) in traces.items()
            }
            count += self.num_probes
        if self.grad_overlap and key == "hessian":
            fields["grad_overlap"] = gradient_overlap(op.gradient(), top.eigenvectors)
        return fields, count
