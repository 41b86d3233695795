"""Freed host memory goes back to the system after every product of a call on the CPU."""

from __future__ import annotations

import ctypes

import pytest
import torch

from lightning_hessian.callback import progress
from lightning_hessian.callback.heap import _malloc_trim, release_free_heap
from lightning_hessian.callback.progress import ProgressOperator
from lightning_hessian.engine.linear_operator import DiagonalOperator

BLOCK = 64 * 1024  # below glibc's initial mmap threshold: served from the heap
BLOCKS = 1600  # 100 MiB


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_free_pages_inside_the_heap_leave_the_resident_set_only_when_released():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for address in blocks:
        ctypes.memset(address, 1, BLOCK)  # touch every page
    for address in blocks[:-1]:  # the last block pins the top of the heap: no automatic trim
        libc.free(address)
    held = _resident_bytes()
    assert release_free_heap() is True
    released = held - _resident_bytes()
    libc.free(blocks[-1])
    assert released > 0.8 * BLOCK * BLOCKS


def test_a_product_on_the_cpu_releases_the_free_heap_and_nothing_else_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(progress, "release_free_heap", lambda: calls.append(1) or True)
    op = ProgressOperator(DiagonalOperator([1.0, 2.0, 3.0]), bar=None)
    product = op.matmat(torch.ones(3, 2, dtype=torch.float64))
    op.matvec(torch.ones(3, dtype=torch.float64))
    assert len(calls) == 2
    assert product[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_a_product_off_the_host_leaves_the_heap_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(progress, "release_free_heap", lambda: calls.append(1) or True)
    gpu_like = DiagonalOperator([1.0, 2.0])
    gpu_like.device = torch.device("meta")  # any device but the CPU; its memory is not the C heap's
    gpu_like.matmat = lambda vectors: vectors
    ProgressOperator(gpu_like, bar=None).matmat(torch.ones(2, 1, dtype=torch.float64))
    assert calls == []
