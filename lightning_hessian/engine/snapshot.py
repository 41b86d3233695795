"""A functional snapshot of a model over a fixed list of batches: what every curvature computation reads.

Symbols: P selected parameters (flat length), S vectors handled together, N samples.

The snapshot copies the selected parameters into fresh leaf tensors, the other parameters and the
buffers into detached copies, and the batches onto the parameters' device in the computation dtype;
:meth:`ModelSnapshot.call` evaluates a function of the model with those tensors swapped in through
:func:`torch.func.functional_call`. The model itself is never written: its parameters, buffers,
``.grad`` and ``requires_grad`` are unchanged, and module modes are restored after each call.

Flat vectors follow one convention throughout the engine: a vector is ``[P]`` in the order of
``model.named_parameters()`` restricted to the selection, and a block of S vectors is ``[P, S]``,
one vector per column, as in SciPy's ``LinearOperator.matmat``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian.engine.batches import (
    SampleCounter,
    ambiguous_count,
    count_samples,
    map_tensors,
    materialize,
    move_batch,
    take_samples,
)
from lightning_hessian.engine.checks import check_count
from lightning_hessian.engine.errors import UnsupportedError

Mode = Literal["eval", "train"]


class SnapshotOptions(TypedDict, total=False):
    """The keyword options of a :class:`ModelSnapshot`, which the operators and dense matrices pass on.

    ``params`` (name patterns), ``dtype`` (of the computation), ``mode`` (``"eval"`` or ``"train"``),
    ``vectorize`` (several vectors per backward pass) and ``num_samples_fn`` (samples per batch): see
    :class:`ModelSnapshot`.

    Example:
        >>> options: SnapshotOptions = {"dtype": torch.float64, "mode": "eval"}
        >>> ModelSnapshot(torch.nn.Linear(2, 1), [torch.ones(3, 2)], **options).dtype
        torch.float64
    """

    params: Sequence[str] | None
    dtype: torch.dtype | None
    mode: Mode
    vectorize: bool | None
    num_samples_fn: SampleCounter | None


class BoundModule(nn.Module):
    """``fn(model, *args)`` as a module, so that :func:`functional_call` can swap the model's tensors.

    Example:
        >>> bound = BoundModule(torch.nn.Linear(2, 1), lambda m, x: m(x).sum())
        >>> bound(torch.zeros(3, 2)).shape
        torch.Size([])
    """

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.model, *args)


def select_parameters(model: nn.Module, params: Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a curvature computation works on.

    Args:
        model: the network.
        params: ``None`` for every parameter with ``requires_grad``, or name patterns
            (:mod:`fnmatch` style, e.g. ``["0.*", "*.bias"]``) matched against
            ``model.named_parameters()``; a parameter is selected when any pattern matches.

    Returns:
        The selected pairs, in ``named_parameters()`` order (a tied parameter once).

    Raises:
        TypeError: if ``params`` is a single string or holds something other than names.
        ValueError: if nothing is selected.

    Example:
        >>> [name for name, _ in select_parameters(torch.nn.Linear(2, 1), ["*.bias", "bias"])]
        ['bias']
    """
    named = list(model.named_parameters())
    if params is None:
        selected = [(n, p) for n, p in named if p.requires_grad]
        if not selected:
            raise ValueError(
                "the model has no parameter with requires_grad=True; unfreeze some parameters or pass `params=` "
                "name patterns"
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


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, e.g. a parameter that FSDP2's ``fully_shard`` has sharded.

    Example:
        >>> is_sharded(torch.nn.Linear(2, 1).weight)
        False
    """
    module = sys.modules.get("torch.distributed.tensor")  # nothing is a DTensor before that module loads
    return module is not None and isinstance(tensor, module.DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or this rank's shard of it if it is a DTensor (what flat vectors of a sharded
    operator hold: :mod:`lightning_hessian.engine.sharded`).

    Example:
        >>> local_part(torch.ones(2)).shape
        torch.Size([2])
    """
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: Mode, *, freeze_statistics: bool = False) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the duration of the block, then restore every submodule's mode.

    ``"train"`` keeps dropout off (its modules stay in eval mode), so the computation is
    deterministic; batch normalization then uses batch statistics.

    Args:
        model: the network.
        mode: ``"eval"`` or ``"train"``.
        freeze_statistics: in ``"train"`` mode, also keep batch normalization from updating its
            running statistics (it still normalizes with batch statistics), so that no buffer is
            written in place, which :mod:`torch.func` transforms require.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout(0.5))
        >>> with module_mode(net, "train"):
        ...     net[0].training
        False
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


@contextlib.contextmanager
def twice_differentiable(device: torch.device) -> Iterator[None]:
    """Run a forward whose graph will be differentiated twice: full precision, no fused kernels.

    Autocast off (products in the snapshot's dtype), attention through the math kernel and cuDNN
    off: the fused attention kernels (flash, memory-efficient, and the CPU flash kernel torch uses by
    default) and cuDNN's RNNs have no derivative of their backward, so a Hessian-vector product
    through them fails. Reentrant activation checkpoints (``checkpoint(..., use_reentrant=True)``) run
    as plain calls (see :func:`reentrant_checkpoints_inlined`).

    Example:
        >>> q = torch.randn(1, 2, 3, 4, requires_grad=True)
        >>> with twice_differentiable(q.device):
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        >>> torch.autograd.grad(g.pow(2).sum(), q)[0].shape
        torch.Size([1, 2, 3, 4])
    """
    with torch.autocast(device.type, enabled=False), sdpa_kernel(SDPBackend.MATH), \
            torch.backends.cudnn.flags(enabled=False), reentrant_checkpoints_inlined():
        yield


@contextlib.contextmanager
def reentrant_checkpoints_inlined() -> Iterator[None]:
    """Run the blocks of reentrant activation checkpoints as plain calls for the duration of the block.

    A reentrant checkpoint (``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=True)``) keeps no
    graph inside ``fn``: its backward recomputes ``fn`` and supports neither ``torch.autograd.grad``
    (what the products need) nor parameters inside ``fn`` when ``x`` needs no gradient (they get none).
    Its forward computes ``fn(x)`` all the same, so calling ``fn`` directly gives the same loss with a
    graph through it, at the memory checkpointing would have saved; the non-reentrant variant needs
    nothing. Not thread-safe: another thread's reentrant checkpoints run inline meanwhile too.

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> layer = torch.nn.Linear(2, 2)
        >>> with reentrant_checkpoints_inlined():
        ...     out = checkpoint(layer, torch.ones(1, 2), use_reentrant=True)  # input without grad
        >>> out.requires_grad  # the layer's parameters are in the graph
        True
    """
    function = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    if function is None or "apply" in vars(function):  # no such class, or already inlined (nested)
        yield
        return

    def inline(run_function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return run_function(*args)

    function.apply = staticmethod(inline)
    try:
        yield
    finally:
        del function.apply


def autograd_enabled() -> contextlib.AbstractContextManager[Any]:
    """Gradients on and inference mode off, so that products work under ``no_grad`` and ``inference_mode``.

    Example:
        >>> with torch.no_grad(), autograd_enabled():
        ...     torch.is_grad_enabled()
        True
        >>> with torch.inference_mode(), autograd_enabled():
        ...     torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        (True, False)
    """
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _copy(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    if tensor.is_floating_point():
        return tensor.detach().to(dtype or lifted(tensor.dtype), copy=True)
    return tensor.detach().clone()


def lifted(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor computes in by default: its own, with 16-bit floats lifted to float32.

    Example:
        >>> lifted(torch.bfloat16), lifted(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def flat_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a snapshot's flat ``[P]`` vectors for ``module``: float64 if one trainable parameter is
    float64 (the others keep their own dtypes), else float32 (16-bit models computed in float32).

    Example:
        >>> flat_dtype(torch.nn.Linear(2, 1).bfloat16()), flat_dtype(torch.nn.Linear(2, 1).double())
        (torch.float32, torch.float64)
    """
    dtypes = {lifted(p.dtype) for p in module.parameters() if p.requires_grad and p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_measurable(selected: Sequence[tuple[str, Tensor]], batches: Sequence[Any]) -> None:
    """An :class:`~lightning_hessian.engine.errors.UnsupportedError` naming the fix for parameters or batches
    that hold no values to differentiate: lazy (uninitialized) parameters, the meta device, complex
    parameters.

    Example:
        >>> try:
        ...     check_measurable([("w", torch.nn.Parameter(torch.ones(2, dtype=torch.cfloat)))], [])
        ... except ValueError as error:
        ...     print(str(error)[:50])
        parameter 'w' is complex (torch.complex64): the He
    """
    for name, p in selected:
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise UnsupportedError(
                f"parameter {name!r} is not initialized yet (a lazy module such as nn.LazyLinear): run one forward "
                "pass of the model before measuring"
            )
        if p.is_meta:
            raise UnsupportedError(
                f"parameter {name!r} is on the meta device, which holds no values: materialize the model first "
                "(model.to_empty(device=...) and load its weights)"
            )
        if p.is_complex():
            raise UnsupportedError(
                f"parameter {name!r} is complex ({p.dtype}): the Hessian is measured over real parameters; keep it "
                "out of the selection (params=[...] name patterns, or requires_grad=False) or hold its real and "
                "imaginary parts as a real parameter (torch.view_as_complex in forward)"
            )
    on_meta: list[Tensor] = []
    for batch in batches:
        map_tensors(batch, lambda t: on_meta.append(t) if t.is_meta else None)
    if on_meta:
        raise UnsupportedError("the batches hold tensors on the meta device, which hold no values; pass real data")


class ModelSnapshot:
    """The selected parameters, other tensors and batches of a model, frozen for curvature work.

    Args:
        model: the network; never modified.
        batches: a re-iterable of batches (a list, a DataLoader); each batch is a tensor, tuple,
            list or dict whose first tensor has the samples along dimension 0. Read once, without
            moving any global random stream.
        params: name patterns selecting parameters (see :func:`select_parameters`); default all
            with ``requires_grad``.
        dtype: floating dtype of the computation; default each parameter's and buffer's own dtype
            (16-bit ones lifted to float32), so a float32 model with a float64 head keeps both, and
            flat vectors in the widest of them; the batches' floating tensors are cast to ``dtype``, or
            to the parameters' dtype when they all share one.
        mode: ``"eval"`` (running statistics, dropout off) or ``"train"`` (batch statistics, running
            statistics not updated, dropout still off). A loss that fails in eval mode and works in
            training mode (outputs that differ between the two) raises an
            :class:`~lightning_hessian.engine.errors.UnsupportedError` that names ``mode="train"``.
        num_samples_fn: ``num_samples_fn(batch) -> int``, the number of samples of a batch, which
            weights it; default :func:`~lightning_hessian.engine.batches.count_samples` (the leading
            size of the first tensor with one; a ``PackedSequence`` counts its sequences), with a
            warning when the batch's tensors disagree on it (a time-major ``[T, B, ...]`` batch
            needs ``lambda batch: batch[0].shape[1]``).
        vectorize: multiply several vectors per backward pass with ``is_grads_batched`` (falls back
            to a loop where an operation has no batching rule); ``None``: on CUDA devices only, as on
            a CPU the batched pass cost more per vector than a loop (``benchmarks/RESULTS.md``).

    Attributes:
        model, mode, dtype, device: as given or resolved.
        param_names: names of the selected parameters, in flat order.
        num_params: P.
        batches: the batches on ``device``, floating tensors cast as ``dtype`` says.
        batch_sizes: samples per batch; ``num_samples``: N, their sum.
        leaves: one leaf tensor per selected parameter (``requires_grad=True``), detached copies.
        others: detached copies of the other parameters and of the buffers.

    Example:
        >>> snapshot = ModelSnapshot(torch.nn.Linear(3, 2), [torch.ones(4, 3)])
        >>> snapshot.num_params, snapshot.num_samples, snapshot.flat_parameters().shape
        (8, 4, torch.Size([8]))
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        vectorize: bool | None = None,
        num_samples_fn: SampleCounter | None = None,
    ) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode={mode!r} must be 'eval' or 'train'")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} must be a floating dtype such as torch.float64")
        self.model = model
        self.mode: Mode = mode
        selected = select_parameters(model, params)
        sharded = [n for n, p in selected if is_sharded(p)]
        if sharded:
            raise UnsupportedError(
                f"parameter {sharded[0]!r} is sharded (a DTensor of fully_shard); of the curvature computations "
                "only HessianOperator (and the solvers on it) runs on sharded parameters"
            )
        raw = materialize(batches)
        check_measurable(selected, raw)
        self.param_names = [n for n, _ in selected]
        self.shapes = [p.shape for _, p in selected]
        self.numels = [p.numel() for _, p in selected]
        self.num_params = sum(self.numels)
        self.device = selected[0][1].device
        self.vectorize = self.device.type == "cuda" if vectorize is None else vectorize
        natural = {lifted(p.dtype) for _, p in selected}
        uniform = dtype or (natural.pop() if len(natural) == 1 else None)  # None: each tensor its own
        self.num_samples_fn = num_samples_fn
        with autograd_enabled():
            self.batches = [move_batch(b, self.device, uniform) for b in raw]
            if not self.batches:
                raise ValueError("batches is empty; pass at least one batch of samples")
            self.batch_sizes = [self.count(b, i) for i, b in enumerate(self.batches)]
            self.leaves = [_copy(p, uniform).requires_grad_(True) for _, p in selected]
            chosen = set(self.param_names)
            self._others = {n: _copy(p, uniform) for n, p in model.named_parameters() if n not in chosen}
            self._others.update({n: _copy(b, uniform) for n, b in model.named_buffers()})
        self.dtype = max((leaf.dtype for leaf in self.leaves), key=lambda d: torch.finfo(d).bits)
        self.others = tuple(self._others.values())
        self.num_samples = sum(self.batch_sizes)
        if num_samples_fn is None and (message := ambiguous_count(self.batches)) is not None:
            warnings.warn(message, UserWarning, stacklevel=3)

    def count(self, batch: Any, index: int = 0) -> int:
        """The samples of ``batch`` (position ``index``, for the message): ``num_samples_fn``'s or the default count."""
        if self.num_samples_fn is None:
            return count_samples(batch)
        return check_count(f"num_samples_fn(batch {index})", self.num_samples_fn(batch))  # type: ignore[return-value]

    def call(self, fn: Callable[..., Any], *args: Any, leaves: Sequence[Tensor] | None = None) -> Any:
        """Evaluate ``fn(model, *args)`` with the snapshot's tensors in place of the model's.

        Runs in the snapshot's mode, outside autocast, with kernels that can be differentiated twice
        (see :func:`twice_differentiable`). ``leaves`` replaces the selected parameters (one tensor
        per parameter, in flat order).
        """
        state = dict(zip(self.param_names, self.leaves if leaves is None else leaves, strict=True))
        state.update(self._others)
        state = {"model." + name: tensor for name, tensor in state.items()}
        try:
            return self._evaluate(fn, state, args, self.mode)
        except Exception as err:
            if self.mode == "eval" and self._works_in_training_mode(fn, state, args):
                raise UnsupportedError(
                    f"the loss fails with the model in eval mode ({type(err).__name__}: {err}) and works in training "
                    "mode: the model's outputs differ between the modes (auxiliary outputs, say); pass mode='train' "
                    "(batch statistics, dropout still off)"
                ) from err
            raise

    def _evaluate(self, fn: Callable[..., Any], state: dict[str, Tensor], args: tuple[Any, ...], mode: Mode) -> Any:
        with module_mode(self.model, mode, freeze_statistics=True), twice_differentiable(self.device):
            return functional_call(BoundModule(self.model, fn), state, args, strict=False)

    def _works_in_training_mode(self, fn: Callable[..., Any], state: dict[str, Tensor], args: tuple[Any, ...]) -> bool:
        try:
            with torch.no_grad():
                self._evaluate(fn, state, args, "train")
        except Exception:
            return False
        return True

    def split_batches(self, size: int) -> None:
        """Cut every batch into micro-batches of at most ``size`` samples, in order (see
        :func:`~lightning_hessian.engine.batches.take_samples`); ``num_samples`` is unchanged.

        Example:
            >>> snapshot = ModelSnapshot(torch.nn.Linear(3, 2), [torch.ones(5, 3)])
            >>> snapshot.split_batches(2)
            >>> snapshot.batch_sizes, snapshot.num_samples
            ([2, 2, 1], 5)
        """
        self.batches = [take_samples(batch, start, start + size)
                        for batch, count in zip(self.batches, self.batch_sizes, strict=True)
                        for start in range(0, count, size)]
        self.batch_sizes = [self.count(batch, i) for i, batch in enumerate(self.batches)]

    def flat_parameters(self) -> Tensor:
        """The selected parameters as one ``[P]`` vector (detached, in ``dtype``)."""
        return torch.cat([leaf.detach().reshape(-1).to(self.dtype) for leaf in self.leaves])

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        """``[P, S]`` -> one ``[S, *shape]`` tensor per selected parameter, in that parameter's dtype."""
        columns = matrix.shape[1]
        return [c.T.reshape(columns, *leaf.shape).to(leaf.dtype)
                for c, leaf in zip(matrix.split(self.numels), self.leaves, strict=True)]

    def flatten(self, parts: Sequence[Tensor]) -> Tensor:
        """One ``[S, *shape]`` tensor per selected parameter -> ``[P, S]`` in ``dtype``."""
        return torch.cat([p.reshape(p.shape[0], -1).to(self.dtype) for p in parts], dim=1).T

    def parameters_of(self, flat: Tensor) -> list[Tensor]:
        """A ``[P]`` vector as one tensor per selected parameter (views where the dtypes agree)."""
        return [chunk.reshape(leaf.shape).to(leaf.dtype)
                for chunk, leaf in zip(flat.split(self.numels), self.leaves, strict=True)]

    def vjp(
        self, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor], *, retain: bool
    ) -> list[Tensor]:
        """Vector-Jacobian products of ``outputs`` with respect to ``inputs`` for S stacked cotangents.

        Args:
            outputs: tensors of the graph.
            cotangents: ``cotangents[j]`` of shape ``[S, *outputs[j].shape]``.
            inputs: the tensors to differentiate with respect to.
            retain: keep the graph for later passes.

        Returns:
            One ``[S, *inputs[i].shape]`` tensor per input. Outputs that do not depend on the inputs
            contribute zero; inputs that do not influence the outputs get zero rows.
        """
        num_vectors = cotangents[0].shape[0]
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
        if not pairs:
            return zeros_like_stacked(inputs, num_vectors)
        outs, cots = zip(*pairs, strict=True)

        def one_pass(cot: Sequence[Tensor], batched: bool, keep: bool) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(outs, inputs, cot, retain_graph=keep, allow_unused=True,
                                       is_grads_batched=batched)

        if self.vectorize and num_vectors > 1:
            try:
                return stacked(one_pass(cots, True, True), inputs, num_vectors)
            except RuntimeError as err:  # an operation without a batching rule: loop instead
                warnings.warn(f"batched products unavailable ({err}); multiplying one vector at a time",
                              RuntimeWarning, stacklevel=3)
                self.vectorize = False
        rows = [
            stacked(one_pass([c[s] for c in cots], False, retain or s < num_vectors - 1), inputs, 1)
            for s in range(num_vectors)
        ]
        return rows[0] if num_vectors == 1 else [torch.cat(parts) for parts in zip(*rows, strict=True)]


def zeros_like_stacked(inputs: Sequence[Tensor], num_vectors: int) -> list[Tensor]:
    """One ``[S, *input.shape]`` zero tensor per input.

    Example:
        >>> [t.shape for t in zeros_like_stacked([torch.ones(2, 3), torch.ones(3)], 4)]
        [torch.Size([4, 2, 3]), torch.Size([4, 3])]
    """
    return [torch.zeros(num_vectors, *t.shape, dtype=t.dtype, device=t.device) for t in inputs]


def stacked(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], num_vectors: int) -> list[Tensor]:
    """Gradients as ``[S, *input.shape]``, with zeros for inputs the outputs do not use.

    Example:
        >>> w, b = torch.ones(2, requires_grad=True), torch.ones(1, requires_grad=True)
        >>> grads = torch.autograd.grad((3 * w).sum(), [w, b], allow_unused=True)  # b is unused: None
        >>> stacked(grads, [w, b], 1)
        [tensor([[3., 3.]]), tensor([[0.]])]
    """
    return [
        dense(g).reshape(num_vectors, *t.shape) if g is not None
        else torch.zeros(num_vectors, *t.shape, dtype=t.dtype, device=t.device)
        for g, t in zip(grads, inputs, strict=True)
    ]


def dense(gradient: Tensor) -> Tensor:
    """A gradient in the strided layout: a sparse one (``nn.Embedding(sparse=True)``) made dense, with its graph.

    Example:
        >>> weight = torch.ones(4, 2, requires_grad=True)
        >>> loss = torch.nn.functional.embedding(torch.tensor([1]), weight, sparse=True).sum()
        >>> (g,) = torch.autograd.grad(loss, weight)
        >>> g.layout, dense(g).layout
        (torch.sparse_coo, torch.strided)
    """
    return gradient if gradient.layout == torch.strided else gradient.to_dense()
