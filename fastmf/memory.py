"""Embedding tables on transparent huge pages.

A lookup or sparse update touches rows spread over the whole table, so on a large table
nearly every row costs a TLB miss and a page walk: 4 KiB pages give about 8 MiB of TLB
reach on current x86 cores (2,048 second-level entries), far less than a 256 MiB table. On
Linux, ``madvise(MADV_HUGEPAGE)`` lets the kernel back a region with 2 MiB pages instead,
which for the embedding-bag workload of ``benchmarks/bench_embedding.py`` (a 1M x 64
feature table) made the lookups and the fused updates faster (numbers in
``benchmarks/README.md``, "Huge pages for large tables").

:func:`empty_table` allocates every large CPU table and optimizer state fastmf creates
(``fastmf.nn`` weights, ``fastmf.MF`` and ``ALS`` factors, the ``fastmf.optim`` states) and
advises the huge-page-aligned interior of its memory before anything is written to it, so
the first write already faults in huge pages. Only tables of :data:`MIN_BYTES` or more are
advised: smaller ones fit the TLB's reach anyway, and short-lived tensors (activations,
gradients) are never advised, unlike torch's global ``THP_MEM_ALLOC_ENABLE=1``.

Nothing changes in the values: this is where the memory lives, not what it holds. The
advice is a hint the kernel may decline (``/sys/kernel/mm/transparent_hugepage/enabled``
set to ``never``, no free huge pages); then the table simply stays on 4 KiB pages. Set
``FASTMF_HUGE_PAGES=0`` to never advise (for example where memory compaction stalls
matter more than lookup speed). Other platforms and CUDA tensors are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch
from torch import Tensor

__all__ = ["HUGE_PAGE_BYTES", "MIN_BYTES", "advise_huge_pages", "cat_rows", "empty_table",
           "huge_pages_enabled", "keep_freed_memory"]

HUGE_PAGE_BYTES = 2 << 20
# Below this size a table's rows are mostly within the TLB's reach on 4 KiB pages (about
# 8 MiB on current x86 cores), and only its whole huge pages could be advised anyway.
MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h; the same on every Linux architecture


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The most glibc's own adaptive mmap threshold reaches on 64-bit systems
# (DEFAULT_MMAP_THRESHOLD_MAX), a value every 64-bit glibc accepts.
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make glibc's malloc keep up to ``limit`` bytes of freed memory for later
    allocations instead of handing it back to the operating system. Returns whether it
    was applied: False (and nothing changed) where the C library is not glibc.

    Why: a CPU training step allocates and frees tensors of a few MiB (a NeuMF step at
    batch 4,096 x 5 pairs: (20,480, 32) activations and their gradients). glibc serves
    blocks above its mmap threshold with fresh mappings and gives them back on free, and
    gives back free memory at the top of its heaps above its trim threshold, so the next
    step faults the same pages in again, zero-filled: up to 1,300 page faults per NeuMF
    step on a 2-core VM, each 2 us or more (a (20,480, 16) x (16, 32) matmul into fresh
    memory took 1.85 ms against 0.46 ms into reused memory). This sets the mmap threshold
    to 32 MiB (as high as glibc's own adaptive threshold goes: blocks up to that size come
    from the heap and are reused) and the trim threshold to ``limit``: the same as the
    environment variables ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=<limit>``,
    and much what preloading jemalloc or tcmalloc does, which PyTorch's CPU performance
    guide recommends for the same reason. The trim threshold alone is worse than neither
    (110,000 faults per NeuMF epoch instead of 6,000-32,000): glibc then stops adapting its
    mmap threshold, so every block over 128 KiB is mapped and unmapped.

    The cost is memory: the process keeps up to ``limit`` bytes of freed heap (its
    resident size does not shrink back after a large step). It applies to the whole
    process, every library in it included, from the call on; ``fastmf train`` calls it,
    ``import fastmf`` and :func:`fastmf.fit` do not. ``limit`` is an int in
    [33554432, 2**31 - 1] (mallopt takes a C int)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not (
            _MMAP_THRESHOLD_MAX <= limit <= 2**31 - 1):
        raise ValueError(f"fastmf.memory.keep_freed_memory: limit must be an int of bytes in "
                         f"[{_MMAP_THRESHOLD_MAX}, {2**31 - 1}], got {limit!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # The mmap threshold first: a trim threshold alone would freeze it at 128 KiB.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and mallopt(_M_TRIM_THRESHOLD, limit))


@functools.cache
def _mallopt():
    """glibc's mallopt(param, value), or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    # Not glibc (musl's malloc has other parameters): leave it alone.
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return None
    try:
        mallopt = libc.mallopt
    except AttributeError:
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def huge_pages_enabled() -> bool:
    """Whether :func:`empty_table` advises huge pages here: on Linux, unless the
    environment variable ``FASTMF_HUGE_PAGES`` is ``0`` (read at each call)."""
    return sys.platform.startswith("linux") and os.environ.get("FASTMF_HUGE_PAGES", "1") != "0"


@functools.cache
def _libc():
    """The C library (for madvise and mallopt), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), or None where it cannot be loaded."""
    libc = _libc()
    try:
        madvise = libc.madvise
    except AttributeError:  # also libc None
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def advise_huge_pages(tensor: Tensor) -> bool:
    """Advise the kernel to back the whole huge pages inside ``tensor``'s storage (the
    memory it views, which an expanded view's ``nbytes`` overstates) with huge pages.
    Returns whether the advice was given (and accepted): False for CUDA tensors or storage
    under :data:`MIN_BYTES`, off Linux, with ``FASTMF_HUGE_PAGES=0``, or when the kernel
    refuses it. Pages already written keep their size until the kernel's background
    collapse; call this before the first write (as :func:`empty_table` does)."""
    if tensor.device.type != "cpu" or tensor.is_sparse or not huge_pages_enabled():
        return False
    storage = tensor.untyped_storage()
    size = storage.nbytes()
    if size < MIN_BYTES:
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    begin = storage.data_ptr()
    start = -(-begin // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (begin + size) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= start:
        return False
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0


def empty_table(shape, *, dtype: torch.dtype, device=None) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, advised to live on huge pages
    when it is a large CPU table (:func:`advise_huge_pages`). Uninitialised: fill it."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out)
    return out


def cat_rows(tensors) -> Tensor:
    """``torch.cat(tensors)`` (along rows) into a new :func:`empty_table`: a grown table."""
    tensors = list(tensors)
    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return torch.cat(tensors, out=empty_table(shape, dtype=first.dtype, device=first.device))
