"""The first optimizer against its edge of stability: one small part of a call, after its matrices.

The numerics are the engine's (:mod:`lightning_hessian.engine.stability`); this room reads the
optimizer the Trainer steps, builds the operators it needs and packs a
:class:`~lightning_hessian.measurement.Stability`. Per call it costs, for an adaptive optimizer, one
warm-started top-1 solve of the preconditioned Hessian over the probe set (a few products), and,
at a call that follows a training step, one gradient and one product on the batch just trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_hessian.callback.solver import MatrixSolver, make_operator, top_k_matvecs
from lightning_hessian.engine import EigenResult, NonFiniteError, top_eigenvalues
from lightning_hessian.engine.snapshot import select_parameters
from lightning_hessian.engine.stability import (
    PreconditionedOperator,
    UnsupportedOptimizer,
    batch_sharpness,
    is_adaptive,
    preconditioner,
    stability_ratio,
    update_rules,
    weight_decays,
)
from lightning_hessian.measurement import MatrixMeasurement, Stability

# Warm-start key of the preconditioned solve, next to the Hessian's own keys.
WARM_KEY = "hessian/preconditioned"


class StabilityWatch:
    """What the callback keeps for the edge of stability between hooks: the batch the run just trained
    on (held for the one call it triggers) and whether it said that the optimizer's edge is unknown.

    Example:
        >>> watch = StabilityWatch()
        >>> with watch.training_batch("batch"):
        ...     watch.batch
        'batch'
        >>> watch.batch is None
        True
    """

    def __init__(self) -> None:
        self.batch: Any = None
        self.said_unknown = False

    @contextmanager
    def training_batch(self, batch: Any) -> Iterator[None]:
        """Hold ``batch`` (on the module's device, as training saw it) for the duration of one call."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None

    def measure(
        self,
        trainer: Any,
        pl_module: Any,
        solver: MatrixSolver,
        hessian: MatrixMeasurement | None,
        batches: list[Any],
        dtype: torch.dtype,
        warm: dict[str, Tensor] | None,
        *,
        split_batches: bool,
    ) -> Stability | None:
        """The first optimizer's stability at this call, or ``None``.

        ``None`` without an optimizer, without a Hessian measurement (``matrix="ggn"``), or for an
        optimizer whose edge of stability is not known; the last is said once, on rank zero, with why.
        Under DDP every rank calls it (the products are summed across ranks).

        Args:
            trainer: the Trainer; its first optimizer is only read.
            pl_module: the LightningModule.
            solver: this call's settings (loss, mode, graphs, tolerance, seed, basis, product cap).
            hessian: this call's Hessian measurement (its eig_1 is SGD's curvature).
            batches: this rank's batches of the call (the preconditioned solve's): the probe set at a
                snapshot, its first batches at a tracked call.
            dtype: the products' dtype.
            warm: warm-start vectors by key, updated in place; ``None`` for cold starts.
            split_batches: whether the preconditioned operator splits the batches into rows.
        """
        config = solver.config
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers or hessian is None:
            return None
        optimizer = optimizers[0]
        try:
            rules = update_rules(optimizer)
        except UnsupportedOptimizer as err:
            if not self.said_unknown:
                rank_zero_warn(f"HessianSpectrumCallback logs no {config.name}/stability: {err}", category=UserWarning)
                self.said_unknown = True
            return None

        def make(batches: list[Any], *, keep_graph: bool | str, split_batches: bool) -> Any:
            return make_operator(trainer, pl_module, batches, "hessian", dtype=dtype, mode=config.mode,
                                 loss_fn=config.loss_fn, keep_graph=keep_graph, split_batches=split_batches,
                                 num_samples_fn=config.num_samples_fn)

        fields: dict[str, Any] = {"optimizer": type(optimizer).__name__,
                                  "threshold": min(rule.threshold for rule in rules)}
        count = 0
        if not is_adaptive(optimizer):
            fields["stability"] = stability_ratio(hessian.eigenvalues[0], rules, preconditioned=False)
        else:
            params = [p for _, p in select_parameters(pl_module)]
            scale = preconditioner(optimizer, params)
            if scale is not None:  # after the optimizer's first step
                decays = weight_decays(optimizer, params)
                op = PreconditionedOperator(make(batches, keep_graph=config.keep_graph, split_batches=split_batches),
                                            scale, decays if bool(decays.any()) else None)
                top = _top_one(op, solver, warm)
                eig_1 = float(top.eigenvalues[0])
                fields.update(stability=stability_ratio(eig_1, rules, preconditioned=True), preconditioned_eig_1=eig_1,
                              preconditioned_residual=float(top.residuals[0]))
                count += top.num_matvecs
        if self.batch is not None:
            try:
                # Whole, as training held it: the pass that gives the gradient builds the graph its
                # product runs through.
                op = make([self.batch], keep_graph=True, split_batches=False)
                fields["batch_sharpness"] = batch_sharpness(op)
                count += 1
            except NonFiniteError:  # the batch's loss or product overflowed, or it gave no loss
                pass
        return Stability(**fields, num_matvecs=count)


def _top_one(op: PreconditionedOperator, solver: MatrixSolver, warm: dict[str, Tensor] | None) -> EigenResult:
    """The top eigenpair of ``op`` at the call's tolerance, warm-started from ``warm[WARM_KEY]`` and
    leaving this call's vector there, under the top-k solve's cap at k = 1 (12 products at the
    default tolerance) unless ``max_matvecs`` is set.

    The engine's check for a missed eigenvalue is skipped: the first call starts at random (with
    k = 1 it sees every distinct eigenvalue), later ones from the last top eigenvector, which a larger
    eigenvalue would have to be orthogonal to for the solve to miss it.
    """
    stored = warm.pop(WARM_KEY, None) if warm is not None else None
    v0 = stored if stored is not None and stored.numel() == op.num_params else None
    config = solver.config
    cap = config.max_matvecs if config.max_matvecs is not None else top_k_matvecs(1, config.tol)
    result = top_eigenvalues(op, 1, tol=config.tol, v0=v0, max_matvecs=cap, seed=config.seed,
                             basis_dtype=solver.basis_dtype, basis_device=config.basis_device, verify=False)
    if warm is not None:
        warm[WARM_KEY] = result.eigenvectors[0].to(device="cpu", dtype=torch.float32)
    return result
