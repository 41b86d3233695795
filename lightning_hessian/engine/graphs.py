"""Kept gradient graphs: which batches' first-derivative graphs an operator keeps between products,
how much memory each holds, and when a batch is cut into micro-batches.

Symbols: P parameters, N samples.

A product with a kept graph costs about one backward pass instead of a forward pass and a double
backward. The graphs hold memory (the activations autograd saved and the first derivatives), so
:class:`KeptGraphs` measures the first one (:class:`SavedBytes`) against the memory at hand
(:func:`available_bytes`) and keeps as many as the policy allows.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_hessian.engine.batches import take_samples
from lightning_hessian.engine.snapshot import ModelSnapshot

KeepGraph = bool | int | Literal["auto"]
"""``True`` keeps every batch's graph, ``False`` none, an integer the first that many, ``"auto"`` as many
as fit in half the memory available."""

# With keep_graph="auto", the kept graphs may take this fraction of the memory available.
_GRAPH_MEMORY_FRACTION = 0.5
# With split_batches, a micro-batch's graph holds at most about this many numbers per parameter: a
# product's working memory follows the graph of one batch (the activations and their first
# derivatives), and at this size it stays below that of the solvers' parameter-sized vectors. A lower
# cap saves less than it costs: part of that memory is parameter-sized, and smaller micro-batches fill
# a GPU less well.
_MICRO_BATCH_GRAPH_NUMBERS = 8
# ... but a batch whose graph holds less than this many bytes stays whole whatever the model's size: its
# memory is negligible on any machine, while micro-batches cost a pass each (on a model of a few thousand
# parameters, a product on eight micro-batches takes several times one on the whole batch).
_MICRO_BATCH_MIN_BYTES = 16 * 2**20
# ... and the micro-batches are used only if their losses, weighted by samples, give the batch's loss
# to this relative tolerance: the samples do not interact (no batch statistics, no in-batch pairs).
_SPLIT_RTOL = 1e-4
# The bytes per sample of a batch's graph are measured on this fraction of the first batch.
_TRIAL_PIECES = 8


def tensors_of(graph: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple or list: a graph's outputs, or an autograd node's saved attribute.

    Example:
        >>> [t.tolist() for t in tensors_of((torch.ones(1), [torch.zeros(2), None], 3))]
        [[1.0], [0.0, 0.0]]
    """
    if isinstance(graph, Tensor):
        return [graph]
    if isinstance(graph, (tuple, list)):
        return [t for part in graph for t in tensors_of(part)]
    return []


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``, in bytes.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused. CPU: the
    kernel's ``MemAvailable`` (Linux), else the free physical pages.

    Example:
        >>> available_bytes(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class SavedBytes:
    """Bytes of the distinct tensors that autograd saves for backward inside a ``counting()`` block.

    Tensors in ``exclude`` (their storages) are not counted: e.g. the parameters and the batch,
    which exist anyway.

    Example:
        >>> weight = torch.ones(3, requires_grad=True)
        >>> saved = SavedBytes(exclude=[weight])
        >>> with saved.counting():
        ...     _ = (weight * torch.full((3,), 2.0)).sum()
        >>> saved.nbytes  # the constant (the other factor, the weight, is excluded)
        12
    """

    def __init__(self, exclude: list[Tensor] | tuple[Tensor, ...] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor``'s storage was counted (saved for backward, or added)."""
        return tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() in self._seen

    def add(self, tensor: Tensor) -> None:
        """Count ``tensor``'s storage (once); a sparse tensor's indices and values."""
        if tensor.layout == torch.sparse_coo:
            self.add(tensor._indices())
            self.add(tensor._values())
            return
        if tensor.layout != torch.strided:  # other sparse layouts: their parts are not counted
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._seen[storage.data_ptr()] = storage.nbytes()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        def pack(tensor: Tensor) -> Tensor:
            self.add(tensor)
            # An alias without autograd history: the tensor itself would hold its own node when it is the
            # node's output (a reference cycle that keeps the whole graph alive after it is dropped).
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield


class GraphBuilder(NamedTuple):
    """How an operator builds a batch's graph, handed to :class:`KeptGraphs` with each request (so that the
    store holds no reference to its operator, and a dropped operator frees its graphs at once).

    Attributes:
        build: ``build(index)``, the graph of batch ``index`` (what products reuse).
        unread: ``unread(graph)``, the graph's tensors whose values products never read (only their
            ``grad_fn``): released after building unless autograd saved them.
        loss_of: ``loss_of(batch)``, the batch's mean loss (a 0-d tensor), to check that a split keeps it.

    Example:
        >>> builder = GraphBuilder(build=lambda index: None, unread=lambda graph: [], loss_of=lambda batch: None)
        >>> builder.unread(builder.build(0))
        []
    """

    build: Callable[[int], Any]
    unread: Callable[[Any], list[Tensor]]
    loss_of: Callable[[Any], Tensor]


class KeptGraphs:
    """The first-derivative graphs of an operator's batches, built on first use and kept as ``keep`` allows.

    Args:
        snapshot: the operator's snapshot; with ``split``, its batches may be cut into micro-batches.
        keep: the policy (:data:`KeepGraph`); ``"auto"`` is resolved to a count when the first graph is
            measured.
        split: cut every batch into micro-batches whose graph holds about 8 numbers per parameter,
            where the first batch's graph is larger and its loss equals its micro-batches' losses
            weighted by samples (to a relative 1e-4).

    Attributes:
        keep: the policy in force (an integer once ``"auto"`` is resolved; ``False`` after running out
            of memory).
        nbytes: bytes held by one batch's graph (the first batch's or micro-batch's, measured when
            built; ``None`` before).
        graphs: the kept graphs by batch index (``None`` where not kept), or ``None`` when none is kept.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> snapshot = ModelSnapshot(model, [torch.ones(3, 2), torch.ones(1, 2)])
        >>> loss_of = lambda batch: snapshot.call(lambda m, b: m(b).pow(2).mean(), batch)
        >>> build = lambda index: torch.autograd.grad(loss_of(snapshot.batches[index]), snapshot.leaves,
        ...                                           create_graph=True)
        >>> builder = GraphBuilder(build, lambda graph: list(graph), loss_of)
        >>> graphs = KeptGraphs(snapshot, keep=1)
        >>> _ = graphs.get(0, builder), graphs.get(1, builder)
        >>> [graph is not None for graph in graphs.graphs], graphs.nbytes > 0
        ([True, False], True)
    """

    def __init__(
        self,
        snapshot: ModelSnapshot,
        *,
        keep: KeepGraph = True,
        split: bool = False,
    ) -> None:
        if not (isinstance(keep, (bool, int)) or keep == "auto"):
            raise ValueError(f"keep_graph={keep!r} must be True, False, a number of batches or 'auto'")
        self.snapshot = snapshot
        self.keep: KeepGraph = keep
        self.split = bool(split)
        self.nbytes: int | None = None
        self.graphs: list[Any] | None = None

    def kept(self, index: int) -> bool:
        """Whether batch ``index``'s graph is kept (a product must then retain it)."""
        keep = self.keep
        if keep == "auto":
            return True  # the first graph is kept while it is measured
        return keep if isinstance(keep, bool) else index < keep

    def prepare(self, builder: GraphBuilder) -> None:
        """Before the first pass over the batches, which a split may change: build and measure batch 0's graph."""
        if self.split and self.nbytes is None:
            self.get(0, builder)

    def release(self) -> None:
        """Drop the kept graphs; the next product rebuilds them."""
        self.graphs = None

    def get(self, index: int, builder: GraphBuilder) -> Any:
        """The graph of batch ``index``, built on first use and kept when the policy allows."""
        if self.nbytes is None:
            graph = self._measured(index, builder)
            if not self.kept(index):
                return graph
        elif not self.kept(index):
            return self._counted(index, builder)[0]
        else:
            graph = None
        if self.graphs is None:
            self.graphs = [None] * len(self.snapshot.batches)
        if self.graphs[index] is None:
            try:
                self.graphs[index] = graph if graph is not None else self._counted(index, builder)[0]
            except torch.OutOfMemoryError:
                self.graphs, self.keep = None, False
                warnings.warn("out of memory while keeping gradient graphs; recomputing them per product",
                              RuntimeWarning, stacklevel=3)
                return self._counted(index, builder)[0]
        return self.graphs[index]

    def _counted(self, index: int, builder: GraphBuilder) -> tuple[Any, int]:
        """The graph of batch ``index`` and the bytes it holds, its unread values released."""
        snapshot = self.snapshot
        saved = SavedBytes(exclude=[*snapshot.leaves, *snapshot.others])
        with saved.counting():
            graph = builder.build(index)
        for tensor in builder.unread(graph):
            storage = tensor.untyped_storage()
            if tensor.is_contiguous() and not saved.holds(tensor) and storage.nbytes() == tensor.nbytes:
                storage.resize_(0)
        for part in tensors_of(graph):
            saved.add(part)
        return graph, saved.nbytes

    def _micro_batch_size(self, builder: GraphBuilder) -> int | None:
        """Samples per micro-batch, or ``None`` to keep the batches whole (a graph of few numbers per
        parameter, or samples that interact in the loss).

        The graph of a slice of the first batch (an eighth of it) gives the bytes per sample, so that a
        batch whose whole graph would be large is never built whole.
        """
        snapshot = self.snapshot
        count = snapshot.batch_sizes[0]
        limit = max(_MICRO_BATCH_GRAPH_NUMBERS * snapshot.num_params * torch.finfo(snapshot.dtype).bits // 8,
                    _MICRO_BATCH_MIN_BYTES)
        whole_batches = snapshot.batches, snapshot.batch_sizes
        try:
            snapshot.split_batches(math.ceil(count / _TRIAL_PIECES))
            trial = snapshot.batch_sizes[0]
            per_sample = self._counted(0, builder)[1] / trial
            snapshot.batches, snapshot.batch_sizes = whole_batches
            pieces = min(math.ceil(count * per_sample / max(limit, 1)), count)
            if pieces <= 1:
                return None
            size = math.ceil(count / pieces)
            batch = snapshot.batches[0]
            with torch.no_grad():
                whole = float(builder.loss_of(batch))
                loss_of = builder.loss_of
                combined = sum(min(size, count - start) * float(loss_of(take_samples(batch, start, start + size)))
                               for start in range(0, count, size)) / count
        except Exception:  # a module that cannot take smaller batches (a state sized by the batch): keep them
            snapshot.batches, snapshot.batch_sizes = whole_batches
            return None
        if not math.isfinite(whole) or abs(combined - whole) > _SPLIT_RTOL * max(abs(whole), 1e-30):
            return None
        return size

    def _measured(self, index: int, builder: GraphBuilder) -> Any:
        """Build the graph of batch ``index`` and record its bytes; first, with ``split``, cut the batches
        into micro-batches where one batch's graph would be large; with ``"auto"``, decide how many graphs
        to keep."""
        if self.split and index == 0:
            size = self._micro_batch_size(builder)
            if size is not None:
                self.snapshot.split_batches(size)
        graph, nbytes = self._counted(index, builder)
        self.nbytes = nbytes
        if self.keep == "auto":
            allowance = _GRAPH_MEMORY_FRACTION * available_bytes(self.snapshot.device)
            self.keep = int(min(len(self.snapshot.batches), allowance // max(nbytes, 1)))
        return graph
