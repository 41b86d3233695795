"""The Hessian of a model whose parameters torch's FSDP2 (``fully_shard``) has sharded across ranks.

Symbols: P selected parameters over all ranks (``op.num_params``), p the entries of them this rank
holds (``op.shards.length``), N samples over all ranks, B the most batches any rank holds.

:class:`ShardedHessianOperator` is what ``HessianOperator(model, loss_fn, batches)`` returns when the
selected parameters are DTensors sharded along their first dimension on a one-dimensional device
mesh (what ``fully_shard`` makes). It is called on every rank of the mesh, each with its own batches,
and multiplies with the Hessian of the mean loss over all ranks' samples,

.. math:: H = \\frac{1}{N} \\sum_{r} \\sum_{b \\in r} n_b \\nabla^2_\\theta L_b(\\theta).

A vector is this rank's part of a P-vector: its shards of the selected parameters, each flattened, in
``named_parameters()`` order (``p`` entries, ``[p]`` or ``[p, S]``); no rank ever holds a whole
P-vector. The solvers (:func:`~lightning_hessian.engine.eigen.top_eigenvalues`,
:func:`~lightning_hessian.engine.density.spectral_density`) see the split through ``op.shards``
(:mod:`~lightning_hessian.engine.vectors`): every inner product is all-reduced, so every rank gets the
same eigenvalues, residuals and densities, and eigenvectors as each rank's part ``(k, p)``.

Products come from central differences of gradients,

.. math:: H v \\approx \\frac{\\nabla L(\\theta + h v) - \\nabla L(\\theta - h v)}{2 h},

each gradient a forward and backward pass over every batch through FSDP's own machinery (its
all-gathers and reduce-scatters), with the model's parameters set to ``theta +- h v`` in place and put
back bit for bit, and ``.grad`` restored, afterwards. Double backward does not run under FSDP2: the
sharded parameters are not in the forward's graph (autograd reports that they "appear to not have
been used in the graph"). The unsharded parameters FSDP gathers are, and a double backward through
them gives exact products, but only with ``reshard_after_forward=False`` and
``reshard_after_backward=False``, i.e. with every rank holding the whole model and whole P-vectors
during a product: the memory FSDP exists to avoid. A difference of gradients keeps FSDP's memory (that
of a training step) and the vectors sharded: besides the solver's vectors, the operator holds five of
this rank's parts (the parameters at construction, their current values while a product runs, the
gradient there and the two differenced ones). A product costs two gradients, ``2 B`` forward and
backward passes on every rank (a rank with fewer batches runs passes of weight zero, since each pass
is a collective); the gradient at the parameters costs one more, once.

The step. ``h = eps^(1/3) max(||theta||, 1) / ||v||`` with eps the machine epsilon of the parameters'
dtype and ``||theta||`` the norm of all selected parameters, so the step moves each entry by about
``eps^(1/3)`` of the parameters' size: the classical balance of a central difference's truncation
error (``h^2``) against rounding (``eps / h``), which leaves a relative error of order ``eps^(2/3)`` on
a smooth loss. A ReLU (any kink) crossed between ``theta - h v`` and
``theta + h v`` breaks that: the gradient jumps, and the difference is off by the jump over 2h. The
second difference ``g(theta + h v) - 2 g(theta) + g(theta - h v)`` holds that jump in full, while on a
smooth loss it is ``O(h)`` times ``g(theta + h v) - g(theta - h v)``; so each product checks the ratio
of their norms (the first one's at least ``2 h ||v||`` times the largest ``||H v|| / ||v||`` seen, so
that a direction of little curvature, whose second difference is mostly rounding, is judged
against ``||H||`` as the residuals are), and where it exceeds ``10 eps^(1/3)`` it recomputes with the
step shrunk 16 times (the chance of crossing a kink shrinks with the step), down to a step 4096 times
smaller, until the ratio is small or falls by 4x with the step as a smooth loss's does; later
products start from the step that worked.

Accuracy, measured against exact double-backward products of the same unsharded nets (tanh and ReLU
MLPs of 516 parameters, 128 samples, at initialization and trained; ``benchmarks/RESULTS-sharded.md``):
the relative error ``||Hv_fd - Hv|| / ||Hv||`` is at most 9e-10 in float64, and the top 3 eigenvalues
are within 4e-10 of the dense float64 Hessian's; in float32 the error is 3e-5 to 3e-4 (tanh), so
residuals stall near 1e-4 and a ``tol`` below that is not met; a float32 ReLU net is out of reach
(every step that rounding allows crosses kinks: products off by 0.4 to 10 %): a product still
unclear after its last recomputation raises :class:`~lightning_hessian.engine.errors.NonSmoothError`
on every rank, and the residuals of the others stay far above ``tol``. The
solvers' residuals are those of the products as computed: the asymmetry the error leaves in the
projected matrix is part of every residual, its symmetric part is not seen, so an eigenvalue of H
lies within ``(residual + sqrt(m) delta) ||H||`` of a reported one, with ``delta`` the products'
relative error and m the basis size. ``op.unit_roundoff`` (``eps^(2/3)`` of the dtype) tells the
solvers the products' floor.

Assumes FSDP's default gradient reduction (the mean over the mesh's ranks, which the losses are
scaled to undo); a divide factor set with ``set_gradient_divide_factor`` or a mixed-precision policy
that computes in another dtype would scale or round the products and is not seen. Buffers and the
parameters not selected are read from the model at each product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from lightning_hessian.engine.batches import SampleCounter, ambiguous_count, count_samples, materialize, move_batch
from lightning_hessian.engine.checks import check_count
from lightning_hessian.engine.errors import NonFiniteError, NonSmoothError, UnsupportedError, all_finite
from lightning_hessian.engine.operators import LossFn, scalar_loss
from lightning_hessian.engine.snapshot import Mode, autograd_enabled, module_mode, select_parameters
from lightning_hessian.engine.vectors import Shards

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# A product is recomputed with a smaller step when its second difference exceeds this many times
# eps^(1/3) of its first difference (a kink was crossed), the step divided by _SHRINK each time, down
# to _SHRINK^(_LEVELS - 1) times the first step; a retry whose ratio fell by _SMOOTH_FALL as the step
# shrank is accepted (a smooth loss's ratio falls with the step, a kink's does not).
_KINK_ROUNDINGS = 10.0
_SHRINK = 16.0
_LEVELS = 4
_SMOOTH_FALL = 4.0


class ShardedHessianOperator:
    """Products with the Hessian of the mean loss over every rank's samples, for FSDP2-sharded parameters.

    Construct it (or ``HessianOperator(model, loss_fn, batches)``, which returns one here) on every
    rank of the mesh, with the same arguments but each rank's own ``batches``; call every product on
    every rank too (each runs FSDP's collectives). See the module docstring for the products, their
    step and accuracy.

    Args:
        model: the ``fully_shard``-ed network; its parameters are moved during a product and put back
            bit for bit, with their ``.grad``; module modes are restored.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of a batch; it must call the model
            (FSDP's forward).
        batches: this rank's re-iterable of batches (at least one); ranks may hold different numbers.
        params: name patterns selecting parameters (default all with ``requires_grad``); every
            selected one must be a DTensor sharded along dimension 0 of the same one-dimensional mesh
            and require gradients.
        dtype: ``None`` or the parameters' dtype: products run in it.
        mode: ``"eval"`` (default) or ``"train"``, as in
            :class:`~lightning_hessian.engine.snapshot.ModelSnapshot`.
        num_samples_fn: ``num_samples_fn(batch) -> int``, the samples of a batch (default: the leading
            size of its first tensor), as in :class:`~lightning_hessian.engine.snapshot.ModelSnapshot`.
        keep_graph, split_batches, vectorize: accepted for the signature of
            :class:`~lightning_hessian.engine.operators.HessianOperator`; no effect (a product keeps
            no graph and multiplies one vector at a time).

    Attributes:
        num_params: P; ``shape``: ``(P, P)``.
        shards: this rank's part (``shards.length`` = p), rank, and the all-reduce over the mesh.
        num_samples: N, over all ranks.
        num_matvecs: vector products so far; ``num_gradients``: gradients evaluated (two per product,
            two more per recomputation, one for the gradient at the parameters).
        num_refined: products recomputed with a smaller step (a kink was crossed).
        unit_roundoff: the products' relative floor for the solvers, ``eps^(2/3)`` of the dtype.
        dtype, device, param_names, model, loss_fn, mode: as given or resolved.

    Example:
        >>> import torch.distributed as dist
        >>> from torch.distributed.fsdp import fully_shard
        >>> from lightning_hessian import HessianOperator
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # every rank runs this
        >>> net = fully_shard(torch.nn.Linear(3, 1, bias=False).double())
        >>> op = HessianOperator(net, lambda m, b: 0.5 * m(b).pow(2).sum(1).mean(), [torch.eye(3).double()])
        >>> type(op).__name__, op.num_params, op.shards.length
        ('ShardedHessianOperator', 3, 3)
        >>> op.matvec(torch.ones(3, dtype=torch.float64))  # H = x^T x / 3 = I / 3
        tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
        >>> dist.destroy_process_group()
    """

    vectorize = False
    keep_graph = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        keep_graph: Any = True,
        split_batches: bool = False,
        vectorize: bool | None = None,
        num_samples_fn: SampleCounter | None = None,
    ) -> None:
        del keep_graph, split_batches, vectorize  # no graphs to keep, one vector per pass
        if mode not in ("eval", "train"):
            raise ValueError(f"mode={mode!r} must be 'eval' or 'train'")
        selected = select_parameters(model, params)
        mesh = _common_mesh(selected)
        natural = selected[0][1].dtype
        if dtype is not None and dtype != natural:
            raise UnsupportedError(f"dtype={dtype} differs from the sharded parameters' {natural}; products on sharded "
                             "parameters run in their own dtype: leave dtype=None or cast the model before fully_shard")
        self.model = model
        self.loss_fn = loss_fn
        self.mode: Mode = mode
        self.param_names = [name for name, _ in selected]
        self._params: list[DTensor] = [param for _, param in selected]  # type: ignore[misc]
        self._group = mesh.get_group()
        self._divide = float(dist.get_world_size(self._group))  # FSDP's reduction: the mean over the ranks
        locals_ = [param.to_local() for param in self._params]
        self.dtype = natural
        self.device = locals_[0].device
        self.num_params = sum(param.numel() for param in self._params)
        self.shards = Shards(length=sum(t.numel() for t in locals_), rank=dist.get_rank(self._group),
                             ranks=dist.get_world_size(self._group), all_reduce=self._all_reduce)
        self._local_shapes = [t.shape for t in locals_]
        self.unit_roundoff = torch.finfo(natural).eps ** (2 / 3)
        with autograd_enabled():
            self._batches = [move_batch(b, self.device, natural) for b in materialize(batches)]
        self.batch_sizes = [count_samples(b) if num_samples_fn is None
                            else check_count(f"num_samples_fn(batch {i})", num_samples_fn(b))
                            for i, b in enumerate(self._batches)]
        if num_samples_fn is None and (message := ambiguous_count(self._batches)) is not None:
            warnings.warn(message, UserWarning, stacklevel=3)
        self._theta = self._flat(locals_).clone()  # the point of the Hessian: this rank's part of theta
        totals = self._all_reduce(torch.tensor([float(sum(self.batch_sizes)), float(self._theta.double().pow(2).sum())],
                                               dtype=torch.float64, device=self.device))
        counts = self._all_reduce(torch.tensor([len(self._batches), -len(self._batches)], device=self.device),
                                  op=dist.ReduceOp.MAX)
        if int(counts[1]) == 0:
            raise ValueError("batches is empty on at least one rank; pass every rank at least one batch of samples")
        self.num_samples = int(totals[0])
        self._passes = int(counts[0])  # every rank runs as many forward-backward passes (FSDP's collectives)
        self._step_scale = torch.finfo(natural).eps ** (1 / 3) * max(math.sqrt(float(totals[1])), 1.0)
        self._level = 0  # step shrinks (powers of _SHRINK) that the last product needed
        self._curvature = 0.0  # the largest ||H v|| / ||v|| of a product so far: ||H|| from below
        self._gradient: Tensor | None = None
        self.num_matvecs = 0
        self.num_gradients = 0
        self.num_refined = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def _all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """The element-wise sum (or ``op``) over the mesh's ranks, of a copy of ``tensor``."""
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=op, group=self._group)
        return reduced

    def _flat(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in parts])

    def _parts(self, flat: Tensor) -> list[Tensor]:
        sizes = [math.prod(shape) for shape in self._local_shapes]
        return [chunk.reshape(shape) for chunk, shape in zip(flat.split(sizes), self._local_shapes, strict=True)]

    def _gradient_at(self, point: Tensor) -> Tensor:
        """This rank's part ``[p]`` of the gradient of the mean loss over all samples at the parameters
        ``point`` (this rank's part); the model's parameters and ``.grad`` are put back afterwards."""
        locals_ = [param.to_local() for param in self._params]
        current = self._flat(locals_).clone()
        everything = list(self.model.parameters())  # the backward writes the .grad of the unselected ones too
        grads = [param.grad for param in everything]
        try:
            with torch.no_grad():
                for local, part in zip(locals_, self._parts(point), strict=True):
                    local.copy_(part)
            for param in everything:
                param.grad = None
            self._backward_passes()
            gradient = self._flat([torch.zeros(shape, dtype=self.dtype, device=self.device) if param.grad is None
                                   else param.grad.to_local().detach()
                                   for param, shape in zip(self._params, self._local_shapes, strict=True)]).clone()
        finally:
            with torch.no_grad():
                for local, part in zip(locals_, self._parts(current), strict=True):
                    local.copy_(part)
            for param, grad in zip(everything, grads, strict=True):
                param.grad = grad
        self.num_gradients += 1
        return gradient

    def _backward_passes(self) -> None:
        """One forward and backward pass per batch, through FSDP, accumulating the sample-weighted mean
        gradient in ``.grad``; a rank with fewer batches than another runs passes of weight zero, so that
        every rank runs the same collectives."""
        with autograd_enabled(), module_mode(self.model, self.mode, freeze_statistics=True), \
                torch.autocast(self.device.type, enabled=False):
            for index in range(self._passes):
                held = index < len(self._batches)
                batch = self._batches[index if held else 0]
                loss = scalar_loss(self.loss_fn(self.model, batch), "loss_fn")
                if not loss.requires_grad:
                    raise ValueError("loss_fn returned a loss that does not depend on the parameters (no autograd "
                                     "graph); do not detach it")
                # FSDP averages the ranks' gradients: the factor makes the sum sample-weighted over all N.
                weight = self.batch_sizes[index] * self._divide / self.num_samples if held else 0.0
                (loss * weight).backward()

    def gradient(self) -> Tensor:
        """This rank's part ``[p]`` of the gradient of the mean loss over all samples (computed once)."""
        if self._gradient is None:
            self._gradient = self._gradient_at(self._theta)
        return self._gradient

    def matmat(self, vectors: Tensor) -> Tensor:
        """Multiply with S vectors, one at a time (two gradients each).

        Args:
            vectors: this rank's part of them, ``[p, S]`` or ``[p]``.

        Returns:
            ``[p, S]`` (or ``[p]``) in the operator's dtype.

        Raises:
            ValueError: if the vectors do not have p rows.
            NonFiniteError: on every rank, if a gradient is not finite on any.
            NonSmoothError: on every rank, if a product kept crossing kinks of the loss.
        """
        single = vectors.dim() == 1
        matrix = vectors.reshape(-1, 1) if single else vectors
        length = self.shards.length
        if matrix.dim() != 2 or matrix.shape[0] != length:
            raise ValueError(f"vectors have shape {tuple(vectors.shape)}; the sharded operator takes this rank's "
                             f"part of them, [p] or [p, S] with p = {length} (one vector per column)")
        matrix = matrix.detach().to(device=self.device, dtype=self.dtype)
        columns = [self._product(matrix[:, j]) for j in range(matrix.shape[1])]
        self.num_matvecs += matrix.shape[1]
        total = torch.stack(columns, dim=1)
        return total[:, 0] if single else total

    def matvec(self, vector: Tensor) -> Tensor:
        """Multiply with one vector (this rank's part ``[p]``); returns ``[p]``."""
        return self.matmat(vector.reshape(-1))

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matmat(vectors)

    def release(self) -> None:
        """Drop the cached gradient at the parameters (the next product recomputes it)."""
        self._gradient = None

    def _product(self, vector: Tensor) -> Tensor:
        """``H v`` for this rank's part of one vector, by central differences (see the module docstring)."""
        norm = float(self._all_reduce(vector.double().pow(2).sum()).sqrt())
        if norm == 0.0:
            return torch.zeros_like(vector)
        center = self.gradient()
        tolerance = _KINK_ROUNDINGS * torch.finfo(self.dtype).eps ** (1 / 3)
        start, previous = self._level, math.inf
        for level in range(start, _LEVELS):
            step = self._step_scale / norm / _SHRINK**level
            plus = self._gradient_at(self._theta + step * vector)
            minus = self._gradient_at(self._theta - step * vector)
            first, second = plus - minus, plus - 2 * center + minus
            squares = self._all_reduce(torch.stack([first.double().pow(2).sum(), second.double().pow(2).sum()]))
            if not all_finite(squares):
                raise NonFiniteError("a gradient of the sharded model is not finite (NaN or inf) on at least one "
                                     "rank; the loss or its derivatives overflow at these parameters")
            # Relative to ||H|| as far as seen (as the residuals are): a direction of little curvature has
            # a small first difference, and its second difference is then mostly rounding.
            difference = float(squares[0].sqrt())
            ratio = _kink_ratio(float(squares[1].sqrt()), max(difference, 2 * step * norm * self._curvature))
            if ratio <= tolerance or (level > start and ratio * _SMOOTH_FALL <= previous):
                self._level = level
                self._curvature = max(self._curvature, difference / (2 * step * norm))
                self.num_refined += level > start
                return first / (2 * step)
            previous = ratio
        raise NonSmoothError(f"a finite-difference product of the sharded Hessian kept crossing kinks of the loss "
                             f"(ReLU, max, abs) with steps down to {step:.1e}, so its error is not bounded; with "
                             f"{self.dtype} parameters rounding allows no smaller step (float64 ones resolve what "
                             "float32 cannot)")


def _kink_ratio(second: float, first: float) -> float:
    """``||second difference|| / ||first difference||`` (0 when both vanish, inf when only the first does)."""
    if first > 0:
        return second / first
    return 0.0 if second == 0 else math.inf


def _common_mesh(selected: list[tuple[str, nn.Parameter]]) -> DeviceMesh:
    """The one-dimensional mesh every selected parameter is sharded on along dimension 0; an
    :class:`~lightning_hessian.engine.errors.UnsupportedError` naming the first parameter that is not."""
    mesh = None
    for name, param in selected:
        if not isinstance(param, DTensor):
            raise UnsupportedError(f"parameter {name!r} is not sharded while others are (DTensors of fully_shard); "
                                   "apply fully_shard to the root module too, or select only sharded parameters "
                                   "with params=")
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise UnsupportedError(f"parameter {name!r} has placements {tuple(param.placements)} on a "
                                   f"{param.device_mesh.ndim}-dimensional mesh; sharded products support "
                                   "fully_shard's (Shard(0),) on a one-dimensional mesh (no HSDP or tensor "
                                   "parallelism)")
        if mesh is None:
            mesh = param.device_mesh
        elif param.device_mesh != mesh:
            raise UnsupportedError(f"parameter {name!r} is sharded on another device mesh than {selected[0][0]!r}; "
                                   "shard the whole model on one mesh")
        if not param.requires_grad:
            raise UnsupportedError(f"parameter {name!r} does not require gradients; products on sharded parameters "
                                   "come from FSDP's backward, which computes only those: select parameters that "
                                   "require grad")
    assert mesh is not None  # select_parameters returns at least one
    return mesh
