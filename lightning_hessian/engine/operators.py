"""Curvature operators: the Hessian and its Gauss-Newton part, known by their products with flat vectors.

Symbols: P selected parameters (``op.num_params``), S vectors multiplied in one pass over the data,
N samples in ``batches``.

:class:`HessianOperator` multiplies with the Hessian of the *mean* loss over all N samples,

.. math:: H = \\frac{1}{N} \\sum_b n_b \\nabla^2_\\theta L_b(\\theta),

where :math:`L_b` is the mean loss of batch ``b`` and :math:`n_b` its number of samples, so the
operator is the same whatever the batching. :class:`GGNOperator` multiplies with the generalized
Gauss-Newton part :math:`G = \\frac{1}{N} \\sum_i J_i^\\top \\nabla^2_f \\ell_i J_i` of
:math:`H = G + H_{res}`.

Both work on a :class:`~lightning_hessian.engine.snapshot.ModelSnapshot` taken at construction, so
the model is never touched, and products run with gradients enabled also under ``torch.no_grad()``
and ``torch.inference_mode()``. A block of S vectors is ``[P, S]``, one vector per column
(``op.matmat(V)``, ``op @ V``); one vector is ``[P]`` (``op.matvec(v)``, ``op @ v``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_hessian.engine.batches import count_samples
from lightning_hessian.engine.errors import NonFiniteError, all_finite
from lightning_hessian.engine.graphs import GraphBuilder, KeepGraph, KeptGraphs
from lightning_hessian.engine.snapshot import (
    ModelSnapshot,
    SnapshotOptions,
    autograd_enabled,
    dense,
    is_sharded,
    select_parameters,
    stacked,
    zeros_like_stacked,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar``: the mean loss of one batch."""

OutputFn = Callable[[nn.Module, Any], Tensor]
"""``output_fn(model, batch) -> outputs``: the model outputs (e.g. logits ``[n, C]``) of one batch."""

OutputLossFn = Callable[[Tensor, Any], Tensor]
"""``output_loss_fn(outputs, batch) -> scalar``: the mean loss of one batch, given its outputs."""

class OperatorOptions(SnapshotOptions, total=False):
    """The keyword options of the operators: those of the snapshot, and ``keep_graph``.

    Example:
        >>> options: OperatorOptions = {"dtype": torch.float64, "keep_graph": False}
        >>> HessianOperator(torch.nn.Linear(2, 1), lambda m, b: m(b).mean(), [torch.ones(3, 2)], **options).dtype
        torch.float64
    """

    keep_graph: KeepGraph
    split_batches: bool


class CurvatureOperator:
    """Base class: a symmetric P x P curvature matrix averaged over samples, known by its products.

    The base owns the loop over batches, the sample weighting (batch size / N), the flat layout (through
    its snapshot), dtype and device and the product counter; a subclass supplies the product of one
    batch's matrix (mean over that batch) with S vectors in :meth:`_batch_matmat`.

    Args:
        model: the network; never modified.
        batches: a re-iterable of batches (a list, a DataLoader); each batch is a tensor or a
            tuple, list, dict, dataclass or object of them, weighted by its samples (see
            ``num_samples_fn``).
        keep_graph: keep each batch's first-derivative graph between products, so that one product
            costs about one backward pass instead of a forward and a double backward, at the memory
            of those graphs; an integer keeps the graphs of that many batches (the first ones) and
            recomputes the others; ``"auto"`` measures the first graph and keeps as many as fit in
            half the memory available on the device (:func:`~lightning_hessian.engine.graphs.available_bytes`).
            Dropped with a warning if the device runs out of memory.
        split_batches: when the first batch's graph holds more than about 8 numbers per parameter and
            more than 16 MiB (a convnet's activations on a large batch), cut every batch into
            micro-batches whose graph holds about that many, so that a product's working memory (which follows
            one batch's graph) stays near that of a few parameter vectors; the total of the kept graphs
            does not change, nor the operator (it averages over samples). Done only if the first batch's
            loss equals its micro-batches' losses weighted by samples (to a relative 1e-4), i.e. when
            the samples do not interact; batch statistics (``mode="train"``) or a loss over in-batch
            pairs keep the batches whole, and so does a ``num_samples_fn`` other than the default count
            (the samples may lie along another dimension). Default ``False``.
        **options: the snapshot's (:class:`~lightning_hessian.engine.snapshot.SnapshotOptions`):
            ``params``, name patterns selecting parameters (default all with ``requires_grad``);
            ``dtype``, of the products (e.g. ``torch.float64`` for exact small-model work; default
            each parameter's dtype, float32 for 16-bit ones); ``mode``, ``"eval"`` (default;
            running statistics, dropout off) or ``"train"`` (batch statistics, running statistics not
            updated, dropout still off); ``num_samples_fn``, the samples of a batch (default: the
            leading size of its first tensor with one); ``vectorize``.

    Attributes:
        graphs: the :class:`~lightning_hessian.engine.graphs.KeptGraphs` products reuse.
        keep_graph: the kept-graph policy in force (an integer once ``"auto"`` is resolved).
        graph_nbytes: bytes held by one batch's kept graph (the first batch's, measured when it is
            built: the tensors autograd saved and the first derivatives; ``None`` before); after a
            split, the first micro-batch's.
        snapshot: the :class:`~lightning_hessian.engine.snapshot.ModelSnapshot` products run on.
        num_params: P; ``shape``: ``(P, P)``.
        num_samples: N.
        num_matvecs: vector products so far (a pass with S vectors counts S).
        dtype, device: of the flat vectors.
        param_names: names of the selected parameters, in flat order.

    Example:
        >>> class BatchScaledIdentity(CurvatureOperator):
        ...     def _batch_matmat(self, index, vectors):  # batch b's matrix: (b + 1) I
        ...         return [(index + 1) * v for v in vectors]
        >>> op = BatchScaledIdentity(torch.nn.Linear(2, 1), [torch.ones(3, 2), torch.ones(1, 2)])
        >>> op.shape, op.num_samples, op.param_names
        ((3, 3), 4, ['weight', 'bias'])
        >>> op @ torch.ones(3)  # batches weighted by their samples: (3 * 1 + 1 * 2) / 4
        tensor([1.2500, 1.2500, 1.2500])
        >>> op.num_matvecs
        1
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        keep_graph: KeepGraph = True,
        split_batches: bool = False,
        **options: Unpack[SnapshotOptions],
    ) -> None:
        self.snapshot = ModelSnapshot(model, batches, **options)
        # Samples counted by another num_samples_fn may lie along another dimension than the split's.
        splits = split_batches and self.snapshot.num_samples_fn in (None, count_samples)
        self.graphs = KeptGraphs(self.snapshot, keep=keep_graph, split=splits)
        self.num_matvecs = 0

    @property
    def keep_graph(self) -> KeepGraph:
        """The kept-graph policy in force (``"auto"`` becomes a number of batches at the first product)."""
        return self.graphs.keep

    @property
    def graph_nbytes(self) -> int | None:
        return self.graphs.nbytes

    @property
    def model(self) -> nn.Module:
        return self.snapshot.model

    @property
    def num_params(self) -> int:
        return self.snapshot.num_params

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def num_samples(self) -> int:
        return self.snapshot.num_samples

    @property
    def dtype(self) -> torch.dtype:
        return self.snapshot.dtype

    @property
    def device(self) -> torch.device:
        return self.snapshot.device

    @property
    def param_names(self) -> list[str]:
        return self.snapshot.param_names

    @property
    def vectorize(self) -> bool:
        """Whether a pass multiplies several vectors at once (see ``ModelSnapshot``)."""
        return self.snapshot.vectorize

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        """Product of batch ``index``'s mean matrix with S vectors.

        Args:
            index: position of the batch in ``self.snapshot.batches``.
            vectors: one tensor per selected parameter, of shape ``[S, *param.shape]``.

        Returns:
            One tensor per selected parameter, of shape ``[S, *param.shape]``.
        """
        raise NotImplementedError

    def matmat(self, vectors: Tensor) -> Tensor:
        """Multiply with S vectors in one pass over the data.

        Args:
            vectors: ``[P, S]`` (one vector per column) or ``[P]``, any floating dtype; cast to the
                operator's dtype.

        Returns:
            ``[P, S]`` (or ``[P]``) in the operator's dtype, on its device.

        Raises:
            ValueError: if the vectors do not have P entries.
            NonFiniteError: if the loss or the product is not finite.
        """
        single = vectors.dim() == 1
        matrix = vectors.reshape(-1, 1) if single else vectors
        if matrix.dim() != 2 or matrix.shape[0] != self.num_params:
            raise ValueError(
                f"vectors have shape {tuple(vectors.shape)}; the operator takes [P] or [P, S] with "
                f"P = num_params = {self.num_params} (one vector per column)"
            )
        snapshot = self.snapshot
        with autograd_enabled():
            self.graphs.prepare(self._builder())
            parts = snapshot.unflatten(matrix.detach().to(device=self.device, dtype=self.dtype))
            total = torch.zeros(matrix.shape[1], self.num_params, dtype=self.dtype, device=self.device)
            totals = total.split(snapshot.numels, dim=1)  # views: each batch's product is added in place
            for index, size in enumerate(snapshot.batch_sizes):
                for accumulated, part in zip(totals, self._batch_matmat(index, parts), strict=True):
                    accumulated.add_(part.reshape(part.shape[0], -1), alpha=size / snapshot.num_samples)
            total = total.T
        self._check_finite(total)
        self.num_matvecs += matrix.shape[1]
        return total[:, 0] if single else total

    def _check_finite(self, product: Tensor) -> None:
        if not all_finite(product):
            raise NonFiniteError(
                f"the {type(self).__name__} product is not finite (NaN or inf); the loss or its "
                "derivatives overflow at these parameters"
            )

    def matvec(self, vector: Tensor) -> Tensor:
        """Multiply with one flat vector ``[P]``; returns ``[P]``."""
        return self.matmat(vector.reshape(-1))

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matmat(vectors)

    def release(self) -> None:
        """Drop kept graphs to free their memory; the next product rebuilds them."""
        self.graphs.release()

    def _build_graph(self, index: int) -> Any:
        """The first-derivative graph of batch ``index`` that products reuse (what a subclass keeps)."""
        raise NotImplementedError

    def _batch_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The mean loss of one batch (a scalar), as the graphs compute it (for :meth:`ModelSnapshot.call`)."""
        raise NotImplementedError

    def _unread(self, graph: Any) -> list[Tensor]:
        """The tensors of a graph whose values products never read (only their ``grad_fn``)."""
        return []

    def _loss_of(self, batch: Any) -> Tensor:
        return scalar_loss(self.snapshot.call(self._batch_loss, batch), "loss")

    def _builder(self) -> GraphBuilder:
        """How this operator builds its graphs: made per request, so the graph store holds no reference back."""
        return GraphBuilder(self._build_graph, self._unread, self._loss_of)


def scalar_loss(loss: Any, where: str) -> Tensor:
    """``loss`` as a 0-d tensor; a ``ValueError`` naming ``where`` if it is not a one-element tensor.

    Safe inside :mod:`torch.func` transforms (it reads only the shape).

    Example:
        >>> scalar_loss(torch.ones(1), "loss_fn")
        tensor(1.)
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{where} must return a scalar tensor (the mean loss of the batch), got {shape}; reduce it with .mean()"
        )
    return loss.reshape(())


def checked_loss(loss: Any, where: str) -> Tensor:
    """:func:`scalar_loss`, plus: finite (else :class:`NonFiniteError`) and attached to the parameters.

    Example:
        >>> checked_loss(torch.tensor(float("nan"), requires_grad=True), "loss_fn")
        Traceback (most recent call last):
        ...
        lightning_hessian.engine.errors.NonFiniteError: loss_fn returned a non-finite loss (nan); no curvature there
    """
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

    On a model whose selected parameters FSDP2's ``fully_shard`` has sharded (DTensors), the call
    returns a :class:`~lightning_hessian.engine.sharded.ShardedHessianOperator` instead: called on
    every rank with that rank's batches, it multiplies this rank's part of a vector with the Hessian
    of the mean loss over all ranks' samples, by differences of gradients.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of a batch.
        batches: a re-iterable of batches.
        **options: ``keep_graph`` and the snapshot's options, as in :class:`CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> op = HessianOperator(model, lambda m, b: 0.5 * m(b).pow(2).sum(1).mean(), [torch.eye(3)])
        >>> op.matvec(torch.ones(3))  # H = x^T x / 3 = I / 3
        tensor([0.3333, 0.3333, 0.3333])
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        if cls is HessianOperator and isinstance(model, nn.Module) and any(
                is_sharded(p) for _, p in select_parameters(model, kwargs.get("params"))):
            from lightning_hessian.engine.sharded import ShardedHessianOperator  # loads torch.distributed.tensor

            return ShardedHessianOperator(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        **options: Unpack[OperatorOptions],
    ) -> None:
        super().__init__(model, batches, **options)
        self.loss_fn = loss_fn

    def _batch_loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss_fn(model, batch)

    def _gradients(self, index: int, *, create_graph: bool) -> tuple[Tensor | None, ...]:
        """The gradient of batch ``index``'s loss, one tensor per parameter (``None`` where unused)."""
        snapshot = self.snapshot
        loss = checked_loss(snapshot.call(self.loss_fn, snapshot.batches[index]), "loss_fn")
        grads = torch.autograd.grad(loss, snapshot.leaves, create_graph=create_graph, allow_unused=True)
        return tuple(None if g is None else dense(g) for g in grads)

    def _build_graph(self, index: int) -> tuple[Tensor | None, ...]:
        """The gradient of batch ``index``'s loss, with its graph (``create_graph=True``)."""
        return self._gradients(index, create_graph=True)

    def _unread(self, graph: tuple[Tensor | None, ...]) -> list[Tensor]:
        return [g for g in graph if g is not None]

    def gradient(self) -> Tensor:
        """The gradient of the mean loss over all samples, ``[P]``.

        One forward and backward pass over the batches: the kept graphs do not keep the gradient's
        values (products never read them).

        Example:
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> HessianOperator(model, lambda m, b: m(b).mean(), [torch.ones(4, 2)]).gradient()
            tensor([1., 1.])
        """
        snapshot = self.snapshot
        with autograd_enabled():
            self.graphs.prepare(self._builder())
            total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
            for index, size in enumerate(snapshot.batch_sizes):
                grads = stacked(self._gradients(index, create_graph=False), snapshot.leaves, 1)
                total.add_(snapshot.flatten(grads)[:, 0].detach(), alpha=size / snapshot.num_samples)
        return total

    def gradient_and_product(self) -> tuple[Tensor, Tensor]:
        """The gradient g ``[P]`` of the mean loss and the product ``H g`` ``[P]``.

        Over one batch the product runs through the graph that gave g: one forward and backward pass
        (with its graph) and one product, where :meth:`gradient` then :meth:`matvec` take two passes
        and the product. Over several batches it is those two (every batch's product needs the whole g).

        Raises:
            NonFiniteError: if the loss or the product is not finite.

        Example:
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> with torch.no_grad():
            ...     _ = model.weight.fill_(1.0)
            >>> op = HessianOperator(model, lambda m, b: 0.5 * m(b).pow(2).mean(), [torch.eye(2)])
            >>> op.gradient_and_product()  # H = I / 2, g = w / 2
            (tensor([0.5000, 0.5000]), tensor([0.2500, 0.2500]))
        """
        snapshot = self.snapshot
        if len(snapshot.batches) != 1:
            gradient = self.gradient()
            return gradient, self.matvec(gradient)
        with autograd_enabled():
            grads = self._gradients(0, create_graph=True)
            values = [None if g is None else g.detach() for g in grads]
            gradient = snapshot.flatten(stacked(values, snapshot.leaves, 1))
            used = [(g, v) for g, v in zip(grads, snapshot.unflatten(gradient), strict=True) if g is not None]
            if used:
                outputs, cotangents = zip(*used, strict=True)
                parts = snapshot.vjp(outputs, cotangents, snapshot.leaves, retain=False)
            else:
                parts = zeros_like_stacked(snapshot.leaves, 1)
            product = snapshot.flatten(parts)[:, 0]
        self._check_finite(product)
        self.num_matvecs += 1
        return gradient[:, 0], product

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        grads = self.graphs.get(index, self._builder())
        used = [(g, v) for g, v in zip(grads, vectors, strict=True) if g is not None]
        if not used:
            return zeros_like_stacked(self.snapshot.leaves, vectors[0].shape[0])
        outputs, cotangents = zip(*used, strict=True)
        return self.snapshot.vjp(outputs, cotangents, self.snapshot.leaves, retain=self.graphs.kept(index))


class GGNOperator(CurvatureOperator):
    """Products with the generalized Gauss-Newton matrix G of the mean loss over ``batches``.

    .. math:: G = \\frac{1}{N} \\sum_b n_b\\, J_b^\\top \\big(\\nabla^2_f L_b\\big) J_b,

    with :math:`J_b` the Jacobian of batch ``b``'s outputs f with respect to the parameters and
    :math:`\\nabla^2_f L_b` the Hessian of its mean loss with respect to those outputs. G is the part
    of :math:`H = G + H_{res}` that drops the curvature of the network itself; it is positive
    semidefinite when the loss is convex in the outputs (squared error, softmax cross-entropy), and
    equals H for a linear model with squared error.

    Each product is a Jacobian-vector product (double-backward trick), a product with the output
    Hessian, and a vector-Jacobian product.

    Args:
        model: the network; never modified.
        output_fn: ``output_fn(model, batch) -> outputs``, e.g. ``lambda m, b: m(b[0])``.
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar``, the batch's mean loss, e.g.
            ``lambda f, b: torch.nn.functional.cross_entropy(f, b[1])``.
        batches: a re-iterable of batches.
        **options: ``keep_graph`` and the snapshot's options, as in :class:`CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> op = GGNOperator(model, lambda m, b: m(b), lambda f, b: 0.5 * f.pow(2).sum(1).mean(), [torch.eye(3)])
        >>> op.matvec(torch.ones(3))  # a linear model with squared error: G = H = I / 3
        tensor([0.3333, 0.3333, 0.3333])
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: OutputFn,
        output_loss_fn: OutputLossFn,
        batches: Iterable[Any],
        **options: Unpack[OperatorOptions],
    ) -> None:
        super().__init__(model, batches, **options)
        self.output_fn = output_fn
        self.output_loss_fn = output_loss_fn

    def _batch_loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.output_loss_fn(self.output_fn(model, batch), batch)

    def _unread(self, graph: tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]) -> list[Tensor]:
        return list(graph[3][1:])  # J^T u: only its graph gives J v

    def _build_graph(self, index: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        """Outputs f, the loss gradient dL/df (with graph), a dummy u and J^T u (with graph)."""
        snapshot = self.snapshot
        batch = snapshot.batches[index]
        outputs = snapshot.call(self.output_fn, batch)
        if not isinstance(outputs, Tensor):
            raise ValueError(f"output_fn must return a tensor of model outputs, got {type(outputs).__name__}")
        if not outputs.requires_grad:
            raise ValueError(
                "output_fn returned outputs that do not depend on the selected parameters (no autograd graph); "
                "do not detach them, and select parameters that the outputs use"
            )
        detached = outputs.detach().requires_grad_(True)
        loss = checked_loss(self.output_loss_fn(detached, batch), "output_loss_fn")
        (loss_grad,) = torch.autograd.grad(loss, detached, create_graph=True)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = torch.autograd.grad(
            outputs, snapshot.leaves, dummy, create_graph=True, allow_unused=True, materialize_grads=True
        )
        return outputs, detached, loss_grad, (dummy, *map(dense, jt_dummy))

    def _batch_matmat(self, index: int, vectors: list[Tensor]) -> list[Tensor]:
        outputs, detached, loss_grad, (dummy, *jt_dummy) = self.graphs.get(index, self._builder())
        snapshot = self.snapshot
        # J v by the double-backward trick: J v = d<J^T u, v>/du, linear in the dummy u.
        (jv,) = snapshot.vjp(jt_dummy, vectors, [dummy], retain=True)
        (hjv,) = snapshot.vjp([loss_grad], [jv], [detached], retain=True)
        return snapshot.vjp([outputs], [hjv], snapshot.leaves, retain=self.graphs.kept(index))
