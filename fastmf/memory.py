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
           "huge_pages_enabled"]

HUGE_PAGE_BYTES = 2 << 20
# Below this size a table's rows are mostly within the TLB's reach on 4 KiB pages (about
# 8 MiB on current x86 cores), and only its whole huge pages could be advised anyway.
MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h; the same on every Linux architecture


def huge_pages_enabled() -> bool:
    """Whether :func:`empty_table` advises huge pages here: on Linux, unless the
    environment variable ``FASTMF_HUGE_PAGES`` is ``0`` (read at each call)."""
    return sys.platform.startswith("linux") and os.environ.get("FASTMF_HUGE_PAGES", "1") != "0"


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), or None where it cannot be loaded."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
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
