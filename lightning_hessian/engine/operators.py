"""Curvature operators on a flat parameter vector.

Symbols: P is the number of selected parameters (``op.num_params``), S the number of vectors
multiplied in one pass over the data, N the number of samples in ``batches``.

:class:`HessianOperator` multiplies with the Hessian of the *mean* loss over all N samples,

.. math:: H = \\frac{1}{N} \\sum_b n_b \\nabla^2_\\theta L_b(\\theta),

where :math:`L_b` is the mean loss of batch ``b`` and :math:`n_b` its number of samples, so the
operator is the same whatever the batching. :class:`GGNOperator` multiplies with the generalized
Gauss-Newton part :math:`G = \\frac{1}{N} \\sum_i J_i^\\top \\nabla^2_f \\ell_i J_i` of
:math:`H = G + H_{res}`.

Neither operator touches the model: products run through :func:`torch.func.functional_call` on
copies of the parameters and buffers taken at construction (the operator is a snapshot), so
parameters, buffers, ``.grad`` and ``requires_grad`` are unchanged afterwards; module modes are
set for the duration of a pass and restored. Products run with gradients enabled, also when
called under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.engine.errors import NonFiniteError

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar``: the mean loss of one batch."""

OutputFn = Callable[[nn.Module, Any], Tensor]
"""``output_fn(model, batch) -> outputs``: the model outputs (e.g. logits ``[n, C]``) of one batch."""

OutputLossFn = Callable[[Tensor, Any], Tensor]
"""``output_loss_fn(outputs, batch) -> scalar``: the mean loss of one batch, given its outputs."""

Mode = Literal["eval", "train"]


class BoundModule(nn.Module):
    """Wraps ``fn(model, *args)`` as a module so :func:`functional_call` can swap the model's tensors."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Tensor:
        return self.fn(self.model, *args)


def select_parameters(
    model: nn.Module, params: Sequence[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, parameter)`` pairs an operator works on.

    Args:
        model: the network.
        params: ``None`` for every parameter with ``requires_grad``, or name patterns
            (:mod:`fnmatch` style, e.g. ``["0.*", "*.bias"]``) matched against
            ``model.named_parameters()``; a parameter is selected when any pattern matches.

    Returns:
        The selected pairs, in ``named_parameters()`` order.

    Raises:
        TypeError: if ``params`` is a single string or holds tensors instead of names.
        ValueError: if nothing is selected.
    """
    named = list(model.named_parameters())
    if params is None:
        selected = [(n, p) for n, p in named if p.requires_grad]
        if not selected:
            raise ValueError(
                "the model has no parameter with requires_grad=True; unfreeze some parameters "
                "or pass `params=` name patterns"
            )
        return selected
    if isinstance(params, str) or not all(isinstance(p, str) for p in params):
        raise TypeError(
            f"params must be a list of name patterns such as ['fc1.*'], got {params!r}; "
            "see dict(model.named_parameters()) for the names"
        )
    selected = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in params)]
    if not selected:
        names = ", ".join(n for n, _ in named[:8])
        raise ValueError(f"params={list(params)!r} matches no parameter; the model has: {names}, ...")
    return selected


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: Mode, *, freeze_statistics: bool = False) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the duration of the block, then restore every submodule's mode.

    ``"train"`` keeps dropout off (its modules stay in eval mode) so the operator is deterministic;
    batch normalization then uses batch statistics.

    Args:
        model: the network.
        mode: ``"eval"`` or ``"train"``.
        freeze_statistics: in ``"train"`` mode, also keep batch normalization from updating its
            running statistics (``track_running_stats`` is off for the block; it still normalizes
            with batch statistics), so no buffer is written in place, which :mod:`torch.func`
            transforms require. The operators use this; re-estimating statistics does not.
    """
    saved = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
            if freeze_statistics:
                for m, _ in norms:
                    m.track_running_stats = False
        yield
    finally:
        for m, training in saved:
            m.training = training
        for m, tracking in norms:
            m.track_running_stats = tracking


def _autograd_on() -> contextlib.AbstractContextManager[Any]:
    """Gradients on, inference mode off: products work inside ``torch.no_grad()`` and ``inference_mode()``."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def count_samples(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        raise TypeError(f"a batch must be a tensor, tuple, list or dict of tensors, got {type(batch).__name__}")
    for item in items:
        with contextlib.suppress(TypeError):
            return count_samples(item)
    raise TypeError("a batch must contain at least one tensor to count its samples")


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move every tensor of a batch to ``device``; cast floating tensors to ``dtype`` when given.

    Inference tensors (made under ``torch.inference_mode``) are copied into ordinary ones, which
    autograd can save for the backward pass.
    """
    if isinstance(batch, Tensor):
        if batch.is_inference():
            batch = batch.clone()
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_batch(v, device, dtype) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


class CurvatureOperator:
    """Base class: a symmetric P x P curvature matrix averaged over samples, known by its products.

    The base owns the loop over batches, the sample weighting (batch size / N), the flat-vector
    layout, dtype and device handling and the product counter; a subclass supplies the product of
    one batch's matrix (mean over that batch) with S vectors in :meth:`_batch_matmat`.

    Args:
        model: the network; never modified.
        batches: a re-iterable of batches (a list, a DataLoader); each batch is a tensor, tuple,
            list or dict whose first tensor has the samples along dimension 0.
        params: name patterns selecting parameters (see :func:`select_parameters`); default all
            with ``requires_grad``.
        dtype: floating dtype of the products, e.g. ``torch.float64`` for exact small-model work;
            default the parameters' dtype, promoted to float32 for 16-bit models.
        mode: ``"eval"`` (default; running statistics, dropout off) or ``"train"`` (batch
            statistics, running statistics not updated, dropout still off).
        keep_graph: keep each batch's first-derivative graph between products, so that one
            product costs about one backward pass instead of a forward and a double backward; costs
            the memory of those graphs. Dropped with a warning if the device runs out of memory.
        vectorize: multiply several vectors per pass with ``is_grads_batched`` (falls back to a
            loop where an operation has no batching rule); default ``None``: on CUDA devices only. On
            a CPU the batched pass cost more per vector than a loop (2.6x vs 1.7x a gradient on a
            5k-parameter MLP, 2.2x vs 1.4x on a small CNN; ``benchmarks/RESULTS.md``).

    Attributes:
        num_params: P, the length of the flat vectors.
        num_samples: N, the number of samples over all batches.
        num_matvecs: vector products so far (a pass with S vectors counts S).
        dtype, device: of the flat vectors.
        param_names: names of the selected parameters, in flat-vector order.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        keep_graph: bool = True,
        vectorize: bool | None = None,
    ) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode={mode!r} must be 'eval' or 'train'")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} must be a floating dtype such as torch.float64")
        self.model = model
        self.mode: Mode = mode
        self.keep_graph = keep_graph
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self._shapes = [p.shape for _, p in selected]
        self._numels = [p.numel() for _, p in selected]
        self.num_params = sum(self._numels)
        self.device = selected[0][1].device
        self.vectorize = self.device.type == "cuda" if vectorize is None else vectorize
        default = selected[0][1].dtype
        self.dtype = dtype or (torch.float32 if default in (torch.float16, torch.bfloat16) else default)
        with _autograd_on():
            self._batches = [move_batch(b, self.device, self.dtype) for b in batches]
            if not self._batches:
                raise ValueError("batches is empty; pass at least one batch of samples")
            self._sizes = [count_samples(b) for b in self._batches]
            self._leaves = [p.detach().to(self.dtype, copy=True).requires_grad_(True) for _, p in selected]
            selected_names = set(self.param_names)
            self._frozen = {
                n: p.detach().to(self.dtype, copy=True) if p.is_floating_point() else p.detach().clone()
                for n, p in model.named_parameters()
                if n not in selected_names
            }
            self._buffers = {
                n: b.detach().to(self.dtype, copy=True) if b.is_floating_point() else b.detach().clone()
                for n, b in model.named_buffers()
            }
        self.num_samples = sum(self._sizes)
        self.num_matvecs = 0
        self._graphs: list[Any] | None = None

    # --- what a subclass provides ----------------------------------------------------------

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        """Product of batch ``index``'s mean matrix with S vectors.

        Args:
            index: position of the batch in ``self._batches``.
            vectors: one tensor per selected parameter, of shape ``[S, *param.shape]``.

        Returns:
            One tensor per selected parameter, of shape ``[S, *param.shape]``.
        """
        raise NotImplementedError

    # --- shared machinery --------------------------------------------------------------------

    def _state(self) -> dict[str, Tensor]:
        """Tensors that :func:`functional_call` swaps into the model (names relative to the model)."""
        state = dict(zip(self.param_names, self._leaves, strict=True))
        state.update(self._frozen)
        state.update(self._buffers)
        return state

    def call(self, fn: Callable[..., Tensor], *args: Any, leaves: Sequence[Tensor] | None = None) -> Tensor:
        """Evaluate ``fn(model, *args)`` with the operator's tensors in place of the model's.

        ``leaves`` replaces the selected parameters (one tensor per parameter, in flat order).
        """
        state = self._state()
        if leaves is not None:
            state.update(zip(self.param_names, leaves, strict=True))
        state = {"model." + k: v for k, v in state.items()}
        modes = module_mode(self.model, self.mode, freeze_statistics=True)
        with modes, torch.autocast(self.device.type, enabled=False):
            return functional_call(BoundModule(self.model, fn), state, args, strict=False)

    def _unflatten(self, matrix: Tensor) -> list[Tensor]:
        """``[S, P]`` -> one ``[S, *shape]`` tensor per parameter."""
        chunks = matrix.split(self._numels, dim=1)
        return [c.reshape(matrix.shape[0], *s) for c, s in zip(chunks, self._shapes, strict=True)]

    def _flatten(self, parts: list[Tensor]) -> Tensor:
        """One ``[S, *shape]`` tensor per parameter -> ``[S, P]``."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def _vjp(
        self, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor], retain: bool
    ) -> list[Tensor]:
        """Vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` for S stacked cotangents.

        ``cotangents[j]`` has shape ``[S, *outputs[j].shape]``; the result holds one
        ``[S, *inputs[i].shape]`` tensor per input. Outputs that do not depend on the inputs
        contribute zero; inputs that do not influence the outputs get zero rows.
        """
        num_vectors = cotangents[0].shape[0]
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
        if not pairs:
            return _zeros_like_stacked(inputs, num_vectors)
        outs, cots = zip(*pairs, strict=True)

        def one_pass(cot: Sequence[Tensor], batched: bool, keep: bool) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(
                outs, inputs, cot, retain_graph=keep, allow_unused=True, is_grads_batched=batched
            )

        if self.vectorize and num_vectors > 1:
            try:
                return _fill(one_pass(cots, True, True), inputs, num_vectors)
            except RuntimeError as err:  # an op without a batching rule: loop instead
                warnings.warn(f"batched products unavailable ({err}); multiplying one vector at a time",
                              RuntimeWarning, stacklevel=3)
                self.vectorize = False
        rows = [
            _fill(one_pass([c[s] for c in cots], False, retain or s < num_vectors - 1), inputs, 1)
            for s in range(num_vectors)
        ]
        return rows[0] if num_vectors == 1 else [torch.cat(parts) for parts in zip(*rows, strict=True)]

    def matmat(self, vectors: Tensor) -> Tensor:
        """Multiply with S vectors in one pass over the data.

        Args:
            vectors: ``[S, P]`` (or ``[P]``), any floating dtype; cast to the operator's dtype.

        Returns:
            ``[S, P]`` (or ``[P]``) in the operator's dtype, on its device.

        Raises:
            NonFiniteError: if the loss or the product is not finite.
        """
        single = vectors.dim() == 1
        matrix = vectors.reshape(1, -1) if single else vectors
        if matrix.shape[1] != self.num_params:
            raise ValueError(
                f"vectors have length {matrix.shape[1]}, the operator has num_params={self.num_params}"
            )
        with _autograd_on():
            parts = self._unflatten(matrix.detach().to(device=self.device, dtype=self.dtype))
            total = None
            for index, size in enumerate(self._sizes):
                product = self._flatten(self._batch_matmat(index, parts))  # a new tensor: scaled in place
                if size != self.num_samples:
                    product.mul_(size / self.num_samples)
                total = product if total is None else total.add_(product)
        if not torch.isfinite(total).all():
            raise NonFiniteError(
                f"the {type(self).__name__} product is not finite (NaN or inf); the loss or its "
                "derivatives overflow at these parameters"
            )
        self.num_matvecs += matrix.shape[0]
        return total[0] if single else total

    def matvec(self, vector: Tensor) -> Tensor:
        """Multiply with one flat vector ``[P]``; returns ``[P]``."""
        return self.matmat(vector.reshape(1, -1))[0]

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matmat(vectors.T).T if vectors.dim() == 2 else self.matvec(vectors)

    def release(self) -> None:
        """Drop kept graphs to free their memory; the next product rebuilds them."""
        self._graphs = None

    def _cached(self, index: int, build: Callable[[], Any]) -> Any:
        """The graph of batch ``index``, built on first use and kept when ``keep_graph`` allows."""
        if not self.keep_graph:
            return build()
        if self._graphs is None:
            self._graphs = [None] * len(self._batches)
        if self._graphs[index] is None:
            try:
                self._graphs[index] = build()
            except torch.OutOfMemoryError:
                self._graphs, self.keep_graph = None, False
                warnings.warn("out of memory while keeping gradient graphs; recomputing them per product",
                              RuntimeWarning, stacklevel=3)
                return build()
        return self._graphs[index]


def scalar_loss(loss: Any, where: str) -> Tensor:
    """``loss`` as a 0-d tensor; a ``ValueError`` naming ``where`` if it is not a one-element tensor.

    Safe inside :mod:`torch.func` transforms (it reads only the shape).
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{where} must return a scalar tensor (the mean loss of the batch), got {shape}; "
            "reduce it with .mean()"
        )
    return loss.reshape(())


def _check_loss(loss: Any, where: str) -> Tensor:
    """:func:`scalar_loss`, plus: finite (else :class:`NonFiniteError`) and attached to the parameters."""
    loss = scalar_loss(loss, where)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"{where} returned a non-finite loss ({loss.item()}); no curvature there")
    if not loss.requires_grad:
        raise ValueError(
            f"{where} returned a loss that does not depend on the selected parameters (no autograd graph); "
            "do not detach it, and select parameters that the loss uses"
        )
    return loss


class HessianOperator(CurvatureOperator):
    """Products with the Hessian of the mean loss over all samples of ``batches``.

    ``op.matvec(v)`` is one pass over the batches: per batch, a gradient with ``create_graph=True``
    followed by a second backward pass (double backward through :func:`torch.autograd.grad`). With
    ``keep_graph=True`` the first-order graphs are kept, so later products cost one backward each.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of a batch.
        batches: a re-iterable of batches.
        params, dtype, mode, keep_graph, vectorize: see :class:`CurvatureOperator`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.eye(3)
        >>> op = HessianOperator(model, lambda m, b: 0.5 * m(b).pow(2).sum(1).mean(), [x])
        >>> op.matvec(torch.ones(3))  # H = x^T x / 3 = I / 3
        tensor([0.3333, 0.3333, 0.3333])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        keep_graph: bool = True,
        vectorize: bool | None = None,
    ) -> None:
        super().__init__(model, batches, params=params, dtype=dtype, mode=mode,
                         keep_graph=keep_graph, vectorize=vectorize)
        self.loss_fn = loss_fn

    def _gradient(self, index: int) -> tuple[Tensor | None, ...]:
        loss = _check_loss(self.call(self.loss_fn, self._batches[index]), "loss_fn")
        return torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)

    def gradient(self) -> Tensor:
        """The gradient of the mean loss over all samples, ``[P]`` in the operator's layout.

        Reuses the kept first-order graphs, so after a product it costs no extra pass.
        """
        with _autograd_on():
            total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
            for index, size in enumerate(self._sizes):
                grads = _fill(self._cached(index, lambda index=index: self._gradient(index)), self._leaves, 1)
                total.add_(self._flatten(grads)[0].detach(), alpha=size / self.num_samples)
        return total

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        grads = self._cached(index, lambda: self._gradient(index))
        used = [(g, v) for g, v in zip(grads, vectors, strict=True) if g is not None]
        if not used:
            return _zeros_like_stacked(self._leaves, vectors[0].shape[0])
        outputs, cotangents = zip(*used, strict=True)
        return self._vjp(outputs, cotangents, self._leaves, retain=self.keep_graph)


class GGNOperator(CurvatureOperator):
    """Products with the generalized Gauss-Newton matrix G of the mean loss over ``batches``.

    .. math:: G = \\frac{1}{N} \\sum_b n_b\\, J_b^\\top \\big(\\nabla^2_f L_b\\big) J_b,

    with :math:`J_b` the Jacobian of batch ``b``'s outputs f w.r.t. the parameters and
    :math:`\\nabla^2_f L_b` the Hessian of its mean loss w.r.t. those outputs. G is the part of
    :math:`H = G + H_{res}` that drops the curvature of the network itself; it is positive
    semidefinite when the loss is convex in the outputs (squared error, softmax cross-entropy), and
    equals H for a linear model with squared error.

    Each product is a Jacobian-vector product (double-backward trick), a product with the output
    Hessian, and a vector-Jacobian product.

    Args:
        model: the network; never modified.
        output_fn: ``output_fn(model, batch) -> outputs``, e.g. ``lambda m, b: m(b[0])``.
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar``, the batch's mean loss, e.g.
            ``lambda f, b: torch.nn.functional.cross_entropy(f, b[1])``.
        batches, params, dtype, mode, keep_graph, vectorize: see :class:`CurvatureOperator`.
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: OutputFn,
        output_loss_fn: OutputLossFn,
        batches: Iterable[Any],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        keep_graph: bool = True,
        vectorize: bool | None = None,
    ) -> None:
        super().__init__(model, batches, params=params, dtype=dtype, mode=mode,
                         keep_graph=keep_graph, vectorize=vectorize)
        self.output_fn = output_fn
        self.output_loss_fn = output_loss_fn

    def _graph(self, index: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        """Outputs f, the loss gradient dL/df (with graph), a dummy u and J^T u (with graph)."""
        batch = self._batches[index]
        outputs = self.call(self.output_fn, batch)
        if not isinstance(outputs, Tensor):
            raise ValueError(f"output_fn must return a tensor of model outputs, got {type(outputs).__name__}")
        if not outputs.requires_grad:
            raise ValueError(
                "output_fn returned outputs that do not depend on the selected parameters (no autograd graph); "
                "do not detach them, and select parameters that the outputs use"
            )
        detached = outputs.detach().requires_grad_(True)
        loss = _check_loss(self.output_loss_fn(detached, batch), "output_loss_fn")
        (loss_grad,) = torch.autograd.grad(loss, detached, create_graph=True)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = torch.autograd.grad(
            outputs, self._leaves, dummy, create_graph=True, allow_unused=True, materialize_grads=True
        )
        return outputs, detached, loss_grad, (dummy, *jt_dummy)

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        outputs, detached, loss_grad, (dummy, *jt_dummy) = self._cached(index, lambda: self._graph(index))
        # J v by the double-backward trick: J v = d<J^T u, v>/du, linear in the dummy u.
        (jv,) = self._vjp(jt_dummy, vectors, [dummy], retain=True)
        (hjv,) = self._vjp([loss_grad], [jv], [detached], retain=True)
        return self._vjp([outputs], [hjv], self._leaves, retain=self.keep_graph)


def _zeros_like_stacked(inputs: Sequence[Tensor], num_vectors: int) -> list[Tensor]:
    """One ``[S, *input.shape]`` zero tensor per input."""
    return [torch.zeros(num_vectors, *t.shape, dtype=t.dtype, device=t.device) for t in inputs]


def _fill(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], num_vectors: int) -> list[Tensor]:
    """Stack gradients as ``[S, *input.shape]``, with zeros for inputs the outputs do not use."""
    return [
        g.reshape(num_vectors, *t.shape) if g is not None
        else torch.zeros(num_vectors, *t.shape, dtype=t.dtype, device=t.device)
        for g, t in zip(grads, inputs, strict=True)
    ]
