"""One measurement of one curvature matrix: engine operators and solvers in, a typed measurement out.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.

Everything numeric is the engine's; this module chooses the loss the module defines (the
protocols of :mod:`lightning_hessian.callback.hooks`), wraps the operator for DDP, keeps the warm-start
vectors between calls and packs the results into a
:class:`~lightning_hessian.measurement.MatrixMeasurement`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.callback.config import CallbackConfig
from lightning_hessian.callback.distributed import SummedOperator
from lightning_hessian.callback.hooks import HessianLossModule
from lightning_hessian.callback.isolation import kept_loss, plain_state_kept
from lightning_hessian.callback.progress import ProgressOperator
from lightning_hessian.callback.sharding import agreed, sharded_module, sharded_operator
from lightning_hessian.engine import (
    EigenResult,
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    SpectralDensity,
    spectral_density,
    summarize,
    top_eigenvalues,
)
from lightning_hessian.engine.checks import check_count
from lightning_hessian.engine.eigen import lean_max_basis
from lightning_hessian.engine.layers import Layout, gradient_overlap, layer_traces, mass_by_layer
from lightning_hessian.engine.snapshot import select_parameters
from lightning_hessian.engine.vectors import VectorSpace
from lightning_hessian.measurement import LayerEigenvalue, LayerView, Matrix, MatrixMeasurement


class MissingLoss(NonFiniteError):
    """``training_step`` returned no loss (``None``, Lightning's way to skip a batch) during a measurement.

    Handled like a non-finite loss: there is no spectrum at this call, and training goes on.
    """


def hessian_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of a module that defines ``hessian_loss(batch)``, its plain state put back afterwards."""
    with plain_state_kept(module):
        return module.hessian_loss(batch)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss ``training_step`` returns (a tensor or a dict's ``"loss"``), for ``batch_idx=-1``.

    The batch index is one that training never passes, so work done on ``batch_idx == 0`` does not
    run again; the module's plain state is put back afterwards (see
    :func:`~lightning_hessian.callback.isolation.plain_state_kept`), so every probe batch sees the state
    training left.

    Raises:
        MissingLoss: if it returns ``None`` or a dict without ``"loss"``.
        TypeError: if it returns anything else that is not a tensor.
    """
    with plain_state_kept(module):
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
    """The outputs of a module that defines ``hessian_outputs(batch)``, its plain state put back afterwards."""
    with plain_state_kept(module):
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
    keep_graph: bool | str = True,
    split_batches: bool = False,
    num_samples_fn: Callable[[Any], int] | None = None,
) -> Any:
    """The ``"hessian"`` or ``"ggn"`` operator over this rank's batches, summed across ranks under DDP.

    The loss is ``loss_fn``, else the module's ``hessian_loss``, else its ``training_step``'s loss.
    Each parameter computes in its own dtype (16-bit lifted to float32); ``dtype`` is that of the flat
    vectors (:func:`~lightning_hessian.engine.snapshot.flat_dtype`). On sharded parameters (FSDP2) every
    rank builds the engine's sharded operator, which sums over the ranks itself, in the parameters' dtype.
    """
    if matrix == "hessian":
        if loss_fn is None:
            loss_fn = hessian_loss if isinstance(pl_module, HessianLossModule) else training_step_loss
        else:
            loss_fn = kept_loss(loss_fn)
    if matrix == "hessian" and sharded_module(pl_module, params):
        return sharded_operator(trainer, pl_module, loss_fn, batches, params=params, mode=mode,
                                num_samples_fn=num_samples_fn)
    local = None
    if batches:
        common = {"params": params, "dtype": None, "mode": mode, "keep_graph": keep_graph,
                  "split_batches": split_batches, "num_samples_fn": num_samples_fn}
        if matrix == "hessian":
            local = HessianOperator(pl_module, loss_fn, batches, **common)
        else:
            local = GGNOperator(pl_module, hessian_outputs, pl_module.hessian_output_loss, batches, **common)
    if trainer.world_size == 1:
        return local
    selected = select_parameters(pl_module, params)
    return SummedOperator(local, trainer.strategy, num_params=sum(p.numel() for _, p in selected),
                          dtype=dtype, device=selected[0][1].device)


def top_k_matvecs(k: int, tol: float) -> int | None:
    """The default cap on the products of a call's top-k solve: ``4 k + 8`` at ``tol >= 1e-3``, else the
    engine's (``None``: ``20 k + 100``), since tighter tolerances need more products.

    Measured on the scale suite's MLP (``benchmarks/RESULTS-warm.md``), the top 5 reach a relative
    residual of 1e-3 in 9 to 13 products, warm or cold, once training has settled; in its first tens
    of steps, where the top eigenvalues cluster and move, they take 15 to over 100, and the cap keeps
    such a call within 60 products with its residuals reported.

    Example:
        >>> top_k_matvecs(5, 1e-3), top_k_matvecs(5, 1e-6)
        (28, None)
    """
    return 4 * k + 8 if tol >= CHEAP_TOL else None


# The default tolerance; at it and above, the top-k solve is capped by top_k_matvecs.
CHEAP_TOL = 1e-3
@dataclass(frozen=True)
class MatrixSolver:
    """How one call measures a matrix: the callback's settings as they are, plus what a run resolves.

    Attributes:
        config: the callback's settings (each documented on the callback).
        num_probes: S, the SLQ probes for this model (``config.num_probes`` or the default for P).
        basis_dtype: dtype of the Lanczos vectors (``config.basis_dtype`` or the products' dtype).

    Example:
        >>> from lightning_hessian.callback.config import CallbackConfig
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> solver = MatrixSolver(CallbackConfig(k=2, tol=1e-6, density=False, num_steps=8), num_probes=1,
        ...                       basis_dtype=torch.float64)
        >>> measured = solver.measure(lambda params=None: DiagonalOperator([3.0, 2.0, 1.0]), "hessian", None,
        ...                           layout=[("w", 3)])
        >>> [round(v, 6) for v in measured.eigenvalues]
        [3.0, 2.0]
    """

    config: CallbackConfig
    num_probes: int
    basis_dtype: torch.dtype

    def _solve(self, op: Any, k: int, warm: dict[str, Tensor] | None, key: str, which: str = "largest",
               *, checked: bool = False, max_matvecs: int | None = None) -> EigenResult:
        """``top_eigenvalues``, warm-started from ``warm[key]`` and leaving this call's vectors there.

        The engine's check for missed eigenvalues is skipped when the caller checks the result
        (``checked``: the density's Lanczos run, whose probes are random and deflate the k pairs,
        reveals an eigenvalue beyond them that the solve missed).
        """
        stored = warm.get(key) if warm is not None else None
        # Sharded, each rank holds its part of the vectors, and all ranks must start alike.
        warmed = agreed(op, stored is not None and stored.numel() == VectorSpace(op).length)
        del stored
        config = self.config
        cap = config.max_matvecs if config.max_matvecs is not None else max_matvecs
        # The warm vector is popped into the call, which drops it once the basis holds it (P numbers).
        result = top_eigenvalues(op, k, tol=config.tol, which=which, v0=warm.pop(key) if warmed else None,
                                 max_matvecs=cap, seed=config.seed, basis_dtype=self.basis_dtype,
                                 basis_device=config.basis_device,
                                 max_basis=config.max_basis if config.max_basis is not None else lean_max_basis(k),
                                 verify=not checked)
        if warm is not None:
            # One vector, the sum of the unit eigenvectors: it restarts Lanczos in the fewest products
            # (benchmarks/RESULTS.md) and keeps checkpoints small.
            warm[key] = result.eigenvectors.sum(dim=0).to(device="cpu", dtype=torch.float32)
        return result

    def measure(
        self,
        make: Callable[..., Any],
        matrix: Matrix,
        warm: dict[str, Tensor] | None,
        *,
        layout: Layout,
        bar: Any = None,
    ) -> MatrixMeasurement:
        """Measure one matrix.

        Args:
            make: ``make(params=...)`` builds the operator over all parameters (``None``) or those
                a list of name patterns selects.
            matrix: ``"hessian"`` or ``"ggn"``, also the prefix of its warm-start keys.
            warm: warm-start vectors by key, updated in place; ``None`` for cold starts.
            layout: ``(name, numel)`` of the operator's parameters, for the layer views.
            bar: a progress line to count products on (``None`` for none).
        """
        op = ProgressOperator(make(params=None), bar)
        k = check_count("k", self.config.k)
        if k > op.num_params:
            raise ValueError(f"k={k} exceeds the number of parameters measured ({op.num_params}); lower k")
        _describe(bar, f"{matrix}: top-{k} eigenvalues")
        # Without the density the engine checks for missed eigenvalues itself, under its own cap: each
        # copy of a repeated eigenvalue costs a Krylov run, more than the cheap cap leaves.
        top = self._solve(op, k, warm, matrix, checked=self.config.density,
                          max_matvecs=top_k_matvecs(k, self.config.tol) if self.config.density else None)
        count = top.num_matvecs
        eig_min = eig_min_residual = None
        if self.config.smallest:
            _describe(bar, f"{matrix}: smallest eigenvalue")
            low = self._solve(op, 1, warm, f"{matrix}/min", which="smallest")
            eig_min, eig_min_residual = float(low.eigenvalues[0]), float(low.residuals[0])
            count += low.num_matvecs
        density = None
        if self.config.density:
            density = self._density(op, top, matrix, bar)
            count += density.num_matvecs
            if top.all_converged and _beyond(density, top, self.config.tol):
                # The density's Lanczos run found an eigenvalue beyond the top k that the solve missed
                # (a copy of a repeated eigenvalue, or a direction a warm start is orthogonal to). The
                # engine's own check finds it, under the engine's cap (each copy costs a Krylov run of its
                # own); the density is then redone so that it places the corrected pairs and its
                # outliers count them.
                _describe(bar, f"{matrix}: top-{k} eigenvalues, checked")
                top = self._solve(op, k, warm, matrix)
                density = self._density(op, top, matrix, bar)
                count += top.num_matvecs + density.num_matvecs
        layers = {}
        for pattern in self.config.layers:
            _describe(bar, f"{matrix}: layer {pattern}")
            block = self._solve(ProgressOperator(make(params=[pattern]), bar), 1, warm, f"{matrix}/layer/{pattern}")
            layers[layer_name(pattern)] = LayerEigenvalue(pattern, float(block.eigenvalues[0]),
                                                          float(block.residuals[0]))
            count += block.num_matvecs
        views = {}
        if self.config.layer_views:
            _describe(bar, f"{matrix}: layer traces")
            traces = layer_traces(op, layout, num_probes=self.num_probes, seed=self.config.seed)
            mass = mass_by_layer(layout, top.eigenvectors[:1])
            views = {name: LayerView(trace, stderr, float(mass[name][0])) for name, (trace, stderr) in traces.items()}
            count += self.num_probes
        overlap = None
        if self.config.grad_overlap and matrix == "hessian":
            overlap = gradient_overlap(op.gradient(), top.eigenvectors)
        return _packed(matrix, op, top, num_matvecs=count, density=density, eig_min=eig_min,
                       eig_min_residual=eig_min_residual, layers=layers, layer_views=views, grad_overlap=overlap)

    def track(self, make: Callable[..., Any], matrix: Matrix, warm: dict[str, Tensor] | None, *,
              bar: Any = None) -> MatrixMeasurement:
        """A tracked call on one matrix: the top ``track_k`` eigenvalues only, warm-started from the previous
        tracked call's vectors (kept under their own key), to the solver's ``tol`` (the callback's
        ``track_tol``) within ``4 track_k + 8`` products at ``tol >= 1e-3`` (else the engine's cap), each
        with its residual. ``make`` builds the operator over the tracked subset; the other arguments are
        those of :meth:`measure`."""
        # A few products on one batch: the heap they free is small, and handing it back after each one
        # would only make the next fault its pages in again.
        op = ProgressOperator(make(params=None), bar, release_heap=False)
        k = self.config.track_k
        _describe(bar, f"{matrix}: top-{k} eigenvalues, tracked")
        top = self._solve(op, k, warm, f"{matrix}/tracked", checked=True,
                          max_matvecs=top_k_matvecs(k, self.config.tol))
        return _packed(matrix, op, top, num_matvecs=top.num_matvecs)

    def _density(self, op: Any, top: EigenResult, matrix: Matrix, bar: Any) -> SpectralDensity:
        """The SLQ density with the converged top eigenpairs placed exactly (SLQ spends its steps on the
        rest, the bulk)."""
        _describe(bar, f"{matrix}: spectral density")
        exact = top.converged_part() if top.eigenvalues.numel() < op.num_params else None
        return spectral_density(op, num_probes=self.num_probes, num_steps=self.config.num_steps, seed=self.config.seed,
                                deflate=exact, reorthogonalize=self.config.reorthogonalize,
                                basis_dtype=self.basis_dtype, basis_device=self.config.basis_device)


def _packed(matrix: Matrix, op: Any, top: EigenResult, *, num_matvecs: int, density: SpectralDensity | None = None,
            **views: Any) -> MatrixMeasurement:
    """One matrix's measurement from its top-k solve, its density (if any) and the other views."""
    return MatrixMeasurement(
        matrix=matrix, num_params=op.num_params, eigenvalues=tuple(top.eigenvalues.tolist()),
        residuals=tuple(top.residuals.tolist()), converged=tuple(top.converged.tolist()), num_matvecs=num_matvecs,
        summary=summarize(top.eigenvalues, density), density=density, error_bounds=tuple(top.error_bounds.tolist()),
        **views,
    )


def _describe(bar: Any, text: str) -> None:
    if bar is not None:
        bar.set_description(text, refresh=False)


def _beyond(density: SpectralDensity, top: EigenResult, tol: float) -> bool:
    """Whether the density's quadrature has a node above the smallest of the deflated top eigenvalues,
    other than those eigenvalues themselves: a larger eigenvalue that the top-k solve missed."""
    values = top.eigenvalues.double()
    scale = float(values.abs().max())
    nodes = density.nodes.flatten()
    estimated = nodes if density.deflated_mask is None else nodes[~density.deflated_mask.flatten()]
    threshold = float(values.min()) + tol * scale
    return bool(estimated.numel()) and float(estimated.max()) > threshold
