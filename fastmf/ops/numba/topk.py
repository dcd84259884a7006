"""Numba backend of ``topk_scores`` (the semantics of :mod:`fastmf.ops.reference.topk`).

Imported only when the Numba backend is asked for; each function compiles on first call.
The layout mirrors the C++ kernel: query blocks × item tiles of scores, each tile row
folded into the query's bounded heap at once, parallel over blocks (and over item segments
when the batch is too small to occupy the threads) on torch's number of threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from fastmf.ops import checks

QUERY_BLOCK = 32
TILE = 256
UNITS_PER_THREAD = 4
MIN_SEGMENT = 8192
MAX_SPLIT_K = 4096


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dot(x, y):
    # Reassociation (and FMA contraction) let LLVM vectorise the sum. No other fast-math
    # flag: NaN and inf scores must keep their meaning.
    acc = x.dtype.type(0)
    for d in range(x.shape[0]):
        acc += x[d] * y[d]
    return acc


@njit(inline="always")
def _before(sa, ia, sb, ib):
    return sa > sb or (sa == sb and ia < ib)


@njit(inline="always")
def _swap(hs, hi, a, b):
    hs[a], hs[b] = hs[b], hs[a]
    hi[a], hi[b] = hi[b], hi[a]


@njit(inline="always")
def _sift_down(hs, hi, size, pos):
    # Min-heap on rank: every parent ranks after its children, so hs[0] is the worst kept.
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and _before(hs[left], hi[left], hs[right], hi[right]):
            child = right
        if _before(hs[child], hi[child], hs[pos], hi[pos]):
            return
        _swap(hs, hi, pos, child)
        pos = child


@njit(inline="always")
def _push(hs, hi, size, score, idx):
    pos = size
    hs[pos] = score
    hi[pos] = idx
    while pos > 0:
        parent = (pos - 1) // 2
        if _before(hs[pos], hi[pos], hs[parent], hi[parent]):
            return
        _swap(hs, hi, pos, parent)
        pos = parent


@njit(inline="always")
def _heap_sort(hs, hi, size):
    """Sorts a heap of ``size`` entries in place, best first: the worst is moved to the back
    one at a time."""
    for last in range(size - 1, 0, -1):
        _swap(hs, hi, 0, last)
        _sift_down(hs, hi, last, 0)


@njit(inline="always")
def _write_sorted(hs, hi, size, out_scores, out_ids):
    """The heap's ``size`` entries, best first, into the rows ``out_scores``/``out_ids``
    (k,), padded with (-inf, -1)."""
    _heap_sort(hs, hi, size)
    out_scores[:size] = hs[:size]
    out_ids[:size] = hi[:size]
    out_scores[size:] = out_scores.dtype.type(-np.inf)
    out_ids[size:] = -1


@njit(nogil=True, cache=True)
def sort_rows(indptr, indices):
    """Sorts each CSR row in place (rows of exclusions are looked up by a forward cursor)."""
    for r in range(indptr.shape[0] - 1):
        start, stop = indptr[r], indptr[r + 1]
        indices[start:stop] = np.sort(indices[start:stop])


@njit(nogil=True, cache=True)
def _scan_unit(unit, queries, items, bias, has_bias, candidates, has_candidates, indptr, excl,
               has_exclude, capacity, segments, out_scores, out_ids, part_scores, part_ids,
               part_count):
    """One query block × one item segment: score tiles folded into per-query heaps."""
    batch = queries.shape[0]
    num_positions = candidates.shape[0] if has_candidates else items.shape[0]
    seg_len = (num_positions + segments - 1) // segments
    neg_inf = queries.dtype.type(-np.inf)
    block, segment = unit // segments, unit % segments
    q0 = block * QUERY_BLOCK
    rows = min(QUERY_BLOCK, batch - q0)
    pos0 = segment * seg_len
    pos1 = min(num_positions, pos0 + seg_len)
    hs = np.empty((rows, capacity), queries.dtype)
    hi = np.empty((rows, capacity), np.int64)
    size = np.zeros(rows, np.int64)
    cursor = np.zeros(rows, np.int64)
    cursor_end = np.zeros(rows, np.int64)
    if has_exclude:
        for r in range(rows):
            cursor[r] = indptr[q0 + r]
            cursor_end[r] = indptr[q0 + r + 1]
    tile = np.empty((rows, TILE), queries.dtype)
    tile_ids = np.empty(TILE, np.int64)
    for t0 in range(pos0, pos1, TILE):
        cols = min(TILE, pos1 - t0)
        for c in range(cols):
            item = candidates[t0 + c] if has_candidates else t0 + c
            tile_ids[c] = item
            row = items[item]
            for r in range(rows):
                s = _dot(queries[q0 + r], row)
                if has_bias:
                    s += bias[item]
                tile[r, c] = s
        for r in range(rows):
            for c in range(cols):
                s = tile[r, c]
                full = size[r] == capacity
                # Items come in ascending index order, so a full heap only takes a strictly
                # greater score; NaN fails the compare (it ranks as -inf).
                if full and not s > hs[r, 0]:
                    continue
                item = tile_ids[c]
                if has_exclude:
                    while cursor[r] < cursor_end[r] and excl[cursor[r]] < item:
                        cursor[r] += 1
                    if cursor[r] < cursor_end[r] and excl[cursor[r]] == item:
                        continue
                if np.isnan(s):
                    s = neg_inf
                if full:
                    hs[r, 0] = s
                    hi[r, 0] = item
                    _sift_down(hs[r], hi[r], capacity, 0)
                else:
                    _push(hs[r], hi[r], size[r], s, item)
                    size[r] += 1
    for r in range(rows):
        n = size[r]
        if segments > 1:
            part_scores[segment, q0 + r, :n] = hs[r, :n]
            part_ids[segment, q0 + r, :n] = hi[r, :n]
            part_count[segment, q0 + r] = n
        else:
            _write_sorted(hs[r], hi[r], n, out_scores[q0 + r], out_ids[q0 + r])


@njit(nogil=True, cache=True)
def _merge_queries(begin, end, capacity, out_scores, out_ids, part_scores, part_ids,
                   part_count):
    """Queries [begin, end): the best entries over the item segments' partial heaps."""
    hs = np.empty(capacity, out_scores.dtype)
    hi = np.empty(capacity, np.int64)
    for b in range(begin, end):
        size = 0
        for seg in range(part_count.shape[0]):
            for j in range(part_count[seg, b]):
                s, i = part_scores[seg, b, j], part_ids[seg, b, j]
                if size < capacity:
                    _push(hs, hi, size, s, i)
                    size += 1
                elif _before(s, i, hs[0], hi[0]):
                    hs[0] = s
                    hi[0] = i
                    _sift_down(hs, hi, size, 0)
        _write_sorted(hs, hi, size, out_scores[b], out_ids[b])


def _run_threads(fn, num_tasks, threads):
    """fn(task) for every task on ``threads`` threads (the kernels release the GIL). Numba's
    own prange would do, but compiling a parallel function costs seconds more per dtype."""
    if threads <= 1 or num_tasks <= 1:
        for task in range(num_tasks):
            fn(task)
        return
    with ThreadPoolExecutor(min(threads, num_tasks)) as pool:
        list(pool.map(fn, range(num_tasks)))


def topk_scores(queries, item_factors, item_bias, k, exclude_indptr, exclude_indices,
                candidates):
    """Same arguments and result as :func:`fastmf.ops.reference.topk.topk_scores`."""
    checks.check_topk_inputs(queries, item_factors, item_bias, k, exclude_indptr,
                             exclude_indices, candidates)
    x = np.ascontiguousarray(queries.detach().cpu().numpy())
    items = np.ascontiguousarray(item_factors.detach().cpu().numpy())
    dtype = x.dtype
    batch, num_items = x.shape[0], items.shape[0]
    has_bias = item_bias is not None
    bias = (np.ascontiguousarray(item_bias.detach().cpu().numpy()) if has_bias
            else np.zeros(0, dtype))
    has_candidates = candidates is not None
    cand = (np.unique(candidates.cpu().numpy().astype(np.int64)) if has_candidates
            else np.zeros(0, np.int64))
    has_exclude = exclude_indptr is not None
    if has_exclude:
        indptr = exclude_indptr.cpu().numpy().astype(np.int64)
        excl = exclude_indices.cpu().numpy().astype(np.int64)  # a copy: sorted in place below
        sort_rows(indptr, excl)
    else:
        indptr, excl = np.zeros(1, np.int64), np.zeros(0, np.int64)

    out_scores = np.empty((batch, k), dtype)
    out_ids = np.empty((batch, k), np.int64)
    num_positions = cand.shape[0] if has_candidates else num_items
    capacity = min(k, num_positions)
    if batch == 0 or capacity == 0:
        out_scores.fill(-np.inf)
        out_ids.fill(-1)
    else:
        threads = torch.get_num_threads()
        num_blocks = (batch + QUERY_BLOCK - 1) // QUERY_BLOCK
        segments = 1
        if num_blocks < UNITS_PER_THREAD * threads and capacity <= MAX_SPLIT_K:
            wanted = -(-UNITS_PER_THREAD * threads // num_blocks)
            segments = max(1, min(wanted, num_positions // MIN_SEGMENT))
        part_shape = (segments, batch, capacity) if segments > 1 else (0, 0, 0)
        part_scores = np.empty(part_shape, dtype)
        part_ids = np.empty(part_shape, np.int64)
        part_count = np.zeros(part_shape[:2], np.int64)

        def scan(unit):
            _scan_unit(unit, x, items, bias, has_bias, cand, has_candidates, indptr, excl,
                       has_exclude, capacity, segments, out_scores, out_ids, part_scores,
                       part_ids, part_count)

        _run_threads(scan, num_blocks * segments, threads)
        if segments > 1:
            step = -(-batch // threads)

            def merge(task):
                begin = task * step
                _merge_queries(begin, min(batch, begin + step), capacity, out_scores, out_ids,
                               part_scores, part_ids, part_count)

            _run_threads(merge, -(-batch // step), threads)
    device = queries.device
    return torch.from_numpy(out_scores).to(device), torch.from_numpy(out_ids).to(device)
