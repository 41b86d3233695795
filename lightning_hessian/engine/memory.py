"""Memory at hand and memory held: what decides whether the operators keep their gradient graphs.

Symbols: P parameters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor


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
