"""Numba CPU backend of the uniform negatives the sampled fused steps draw
(``train_step_pairwise_sampled``, ``train_step_sampled``): the items of
:func:`fastmf.ops.reference.sampling.sample_negatives`, pair by pair from the same counters."""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from fastmf.data.sampling import _rank_to_item
from fastmf.ops import checks as _checks
from fastmf.ops.numba._common import ids_view, jit, launch, pjit, require_cpu
from fastmf.ops.numba.embedding_bag import _splitmix64, _stream_key
from fastmf.ops.reference.sampling import permutation_key

__all__ = ["permutation", "sample_negatives"]


_BAD_ROW, _NO_NEGATIVE = 1, 2
_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


@jit
def _mulhi64(x, m):
    """floor(x * m / 2**64) in uint64 from 32-bit halves (csrc/counter_hash.h mulhi64)."""
    x_lo, x_hi = x & _LOW32, x >> _U32
    m_lo, m_hi = m & _LOW32, m >> _U32
    lo_lo, hi_lo, lo_hi = x_lo * m_lo, x_hi * m_lo, x_lo * m_hi
    cross = (lo_lo >> _U32) + (hi_lo & _LOW32) + lo_hi
    return x_hi * m_hi + (hi_lo >> _U32) + (cross >> _U32)


@jit
def _permute(out, key):
    n = out.shape[0]
    for i in range(n):
        out[i] = i
    for i in range(n - 1):
        h = _splitmix64(key ^ np.uint64(i))
        j = i + np.int64(_mulhi64(h, np.uint64(n - i)))
        t = out[i]
        out[i] = out[j]
        out[j] = t


def permutation(out, seed: int) -> None:
    """Fills ``out`` with :func:`fastmf.ops.reference.sampling.permutation`'s permutation at
    ``seed``, the Fisher-Yates pass compiled."""
    op = "permutation"
    _checks.check_permutation(op, out)
    require_cpu(op, ("out",), (out,))
    if out.numel():
        _permute(out.numpy(), np.uint64(permutation_key(seed)))


@pjit
def _sample_kernel(users, pos_items, indptr, indices, num_items, num_negatives, key, users_rep,
                   pos_rep, neg, status):
    """The reference's ``sample_negatives`` (pair p = b * K + k), with the positives
    expanded alongside; ``status[b]`` flags a bad row (1) or a user with no item left (2).
    Each pair draws from its own counter, so the schedule changes nothing."""
    nnz = indices.shape[0]
    for b in prange(users.shape[0]):
        u = users[b]
        start = indptr[u]
        stop = indptr[u + 1]
        if start < 0 or stop < start or stop > nnz:
            status[b] = _BAD_ROW
            continue
        deg = stop - start
        if deg >= num_items:
            status[b] = _NO_NEGATIVE
            continue
        free = np.uint64(num_items - deg)
        for k in range(num_negatives):
            p = b * num_negatives + k
            bits = _splitmix64(key ^ np.uint64(p)) >> _U32
            rank = np.int64((bits * free) >> _U32)
            users_rep[p] = u
            pos_rep[p] = pos_items[b]
            neg[p] = _rank_to_item(indices, start, deg, rank)


def _draw(users, pos_items, pos_indptr, pos_indices, num_items: int, num_negatives: int,
          seed: int, step: int, op: str):
    """(users repeated, positives repeated, negatives): (B * K,) int64 tensors each."""
    u = ids_view(users)
    k = int(num_negatives)
    size = u.shape[0] * k
    users_rep = np.empty(size, np.int64)
    pos_rep = np.empty(size, np.int64)
    neg = np.empty(size, np.int64)
    if size:
        indptr = ids_view(pos_indptr)
        indices = ids_view(pos_indices)
        status = np.zeros(u.shape[0], np.int8)
        launch(_sample_kernel, size, u, ids_view(pos_items), indptr, indices,
               np.int64(num_items), np.int64(k), _stream_key(int(seed), int(step)), users_rep,
               pos_rep, neg, status)
        for flag in (_BAD_ROW, _NO_NEGATIVE):
            bad = np.flatnonzero(status == flag)
            if bad.size:
                user = int(u[bad[0]])
                start, stop = int(indptr[user]), int(indptr[user + 1])
                if flag == _BAD_ROW:
                    raise ValueError(f"fastmf.{op}: pos_indptr gives user {user} the row "
                                     f"[{start}, {stop}), not an ordered range within "
                                     f"[0, {indices.shape[0]}] (len(pos_indices))")
                raise ValueError(f"fastmf.{op}: user {user} has {stop - start} positives of "
                                 f"{num_items} items; no item is left to sample as a negative")
    return torch.from_numpy(users_rep), torch.from_numpy(pos_rep), torch.from_numpy(neg)


def sample_negatives(users, pos_indptr, pos_indices, num_items: int, num_negatives: int,
                     seed: int, step: int, op: str = "train_step_pairwise_sampled"):
    """:func:`fastmf.ops.reference.sampling.sample_negatives` in compiled code (CPU
    tensors; the ids must be in range): the same (B, num_negatives) int64 items."""
    _checks.check_ids(op, "users", users, pos_indptr.shape[0] - 1)
    _, _, neg = _draw(users, users, pos_indptr, pos_indices, num_items, num_negatives, seed,
                      step, op)
    return neg.view(users.shape[0], int(num_negatives))
