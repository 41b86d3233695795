"""Handing freed host memory back to the system between the products of a call.

On Linux, glibc's ``malloc`` raises its mmap threshold to the largest block freed so far (up to
32 MiB). After a few products, blocks of a few parameters' worth (one layer's gradient, one product)
come from the heap, and the pages of freed ones stay resident until the heap is trimmed (on the
scale benchmark's 1.8 M-parameter MLP a call's resident peak was 129 bytes per parameter beyond the
kept graphs against 81 allocated; 94 with the heap released after every product:
``benchmarks/RESULTS-scale.md``). ``malloc_trim(0)`` returns the free pages at once; it walks the
heap's free chunks, which is quick while the heap holds few. Elsewhere (macOS, musl, Windows, or
an operator on a GPU, whose memory the caching allocator manages) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    return getattr(library, "malloc_trim", None)


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system; whether the C library could.

    Example:
        >>> isinstance(release_free_heap(), bool)
        True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
