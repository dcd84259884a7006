"""Numba CPU backend of the pointwise op family: the five kernels as ``@njit`` code over
zero-copy numpy views of CPU tensors.

Same functions, argument order and numbers as :mod:`fastmf.ops.reference.pointwise` (and the
op schemas in ``csrc/fastmf.cpp``), same input checks as the native ops
(:mod:`fastmf.ops.checks`). Shapes:
``users``/``items`` (B,) int32 or int64; ``user_factors`` (U, K); ``item_factors`` (I, K);
``user_bias`` (U,); ``item_bias`` (I,); ``targets`` (B,) like the weights.

How the sparse updates stay exact and deterministic: the ids of a batch are grouped with a
stable LSD radix sort over only the bits of the table size (O(B) work, no O(num_rows)
scratch), so each unique row becomes one segment whose gradient rows are summed in order of
occurrence, as ``index_add_`` sums them, before one optimizer update. Segments are independent,
so they run in parallel without atomics and the result does not depend on the thread count.
The loss is summed per segment, then over the segments in id order: an order fixed by the
batch, not by the threads.

Arithmetic stays in the weights' dtype with no fast-math, and every scale factor is formed
the way autograd forms it; what differs from the reference is rounding only: the K-term dot
products are summed as a fixed tree (which vectorises), and PyTorch's vectorised float32
sqrt is not always correctly rounded. Kernels compile on first call (``cache=True`` keeps
them across runs), one signature per weight dtype: ids are widened to int64 and absent
tables are passed as empty arrays.

Kernels run on numba's thread pool (``numba.set_num_threads``); batches under
``_PARALLEL_MIN_SAMPLES`` run on the calling thread.

>>> import torch, fastmf.ops.numba as nk  # doctest: +SKIP
>>> P, Q = torch.randn(10, 4), torch.randn(20, 4)  # doctest: +SKIP
>>> users, items = torch.tensor([1, 2]), torch.tensor([3, 3])  # doctest: +SKIP
>>> nk.mf_forward(users, items, P, Q, None, None, 3.5).shape  # doctest: +SKIP
torch.Size([2])
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from torch.autograd.graph import increment_version

from fastmf.ops import checks as _checks
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import STEP_OPTIMIZERS, Loss, Optimizer, parse

__all__ = ["mf_forward", "mf_backward", "sparse_adagrad_update", "sparse_sgd_update", "train_step"]

# Plain ints: numba folds them as compile-time constants.
_SGD, _ADAGRAD = int(Optimizer.SGD), int(Optimizer.ADAGRAD)
_ROWWISE = int(Optimizer.ROWWISE_ADAGRAD)
_MSE, _HUBER, _BCE = int(Loss.MSE), int(Loss.HUBER), int(Loss.BCE)
_OK, _BAD_IDS, _BAD_TARGETS = 0, 1, 2

# Samples per parallel work item of mf_forward / mf_backward (each block checks its ids
# before it reads any row).
_BLOCK = 512
# Parallel work items per thread for the segment loops: enough to balance the Zipf-hot rows,
# few enough that each item's scratch allocation is noise.
_CHUNKS_PER_THREAD = 4
# How far ahead (samples / segments) rows are prefetched: the gathers are latency-bound,
# and a row loop is too long for out-of-order execution to reach the next rows by itself.
_PREFETCH_SAMPLES = 8
_PREFETCH_SEGMENTS = 4
_CACHE_LINE = 64
# LLVM names the intrinsic by pointer type: typed pointers before LLVM 15, opaque after.
_PREFETCH_INTRINSIC = (
    "llvm.prefetch.p0" if llvm_binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"
)

# error_model="numpy": float division without Python's zero check, which would otherwise
# stop LLVM from vectorising the optimizer loops (x/0 gives inf, as in PyTorch).
_jit = numba.njit(cache=True, error_model="numpy")
_pjit = numba.njit(cache=True, parallel=True, error_model="numpy")


# --------------------------------------------------------------------------------------------
# Low-level helpers


def _cast_like(like, value):
    """``value`` converted to the type of the scalar ``like`` or of the elements of the array
    ``like`` (inside jitted code only)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_cast_like)
def _cast_like_impl(like, value):
    # Literal Python numbers would promote float32 arithmetic to float64; casting every
    # constant to the weights' type keeps float32 math in float32, as PyTorch does it.
    target_type = like.dtype if isinstance(like, types.Array) else like

    def impl(like, value):
        return target_type(value)

    return impl


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the cache to fetch ``arr[index]`` (1-D ``arr``); never faults."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]],
                                       wraparound=False)
        i32 = ir.IntType(32)
        byte_ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_INTRINSIC)
        # read access, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@_jit
def _prefetch_row(table, row):
    """Prefetch every cache line of ``table[row]`` (2-D table)."""
    line = max(1, _CACHE_LINE // table.itemsize)
    values = table[row]
    for k in range(0, values.shape[0], line):
        _prefetch(values, k)


@_jit
def _update_row(weight, state, row, grad, optimizer, lr, eps):
    """One optimizer step of ``weight[row]`` (K,) with the summed gradient ``grad`` (K,).
    ``state``: (N, K) for Adagrad, (N, 1) for row-wise Adagrad, unused for SGD."""
    w = weight[row]
    if optimizer == _SGD:
        for k in range(w.shape[0]):
            w[k] -= lr * grad[k]
    elif optimizer == _ADAGRAD:
        acc = state[row]
        for k in range(w.shape[0]):
            g = grad[k]
            a = acc[k] + g * g
            acc[k] = a
            w[k] -= lr * g / (np.sqrt(a) + eps)
    else:
        square_sum = _cast_like(weight, 0.0)
        for k in range(w.shape[0]):
            square_sum += grad[k] * grad[k]
        a = state[row, 0] + square_sum / _cast_like(weight, w.shape[0])
        state[row, 0] = a
        std = np.sqrt(a) + eps
        for k in range(w.shape[0]):
            w[k] -= lr * grad[k] / std


@_jit
def _update_scalar(weight, state, row, grad, optimizer, lr, eps):
    """One optimizer step of the 1-D ``weight[row]``; row-wise Adagrad on a 1-D table is
    element-wise Adagrad (a row of one element)."""
    if optimizer == _SGD:
        weight[row] -= lr * grad
    else:
        a = state[row] + grad * grad
        state[row] = a
        weight[row] -= lr * grad / (np.sqrt(a) + eps)


@_jit
def _mean_loss(segment_loss, segment_reg, num_segments, num_samples, reg):
    """The step's loss: segment sums in segment order (fixed by the ids, not by the
    threads), as means over the batch."""
    data_total = 0.0
    reg_total = 0.0
    for s in range(num_segments):
        data_total += segment_loss[s]
        reg_total += segment_reg[s]
    return data_total / num_samples + reg * (reg_total / num_samples)


@_jit
def _dot(a, b, scratch):
    """sum_k a[k] * b[k] for 1-D ``a``, ``b`` of length K, summed as a fixed tree: fold the
    tail onto the largest power of two, then halve. Every step is element-wise, so it
    vectorises without fast-math, and the order is the same on every call; a sequential
    sum would be one long chain of dependent additions. ``scratch``: (>= K,)."""
    n = a.shape[0]
    if n == 0:
        return _cast_like(a, 0.0)
    half = 1
    while half * 2 <= n:
        half *= 2
    for k in range(n):
        scratch[k] = a[k] * b[k]
    for k in range(n - half):
        scratch[k] += scratch[k + half]
    half //= 2
    while half >= 1:
        for k in range(half):
            scratch[k] += scratch[k + half]
        half //= 2
    return scratch[0]


@_jit
def _prefetch_update_rows(weight, state, bias, bias_state, row, optimizer, has_bias):
    """Prefetch what ``_update_row``/``_update_scalar`` will touch for ``row``."""
    _prefetch_row(weight, row)
    if optimizer == _ADAGRAD:
        _prefetch_row(state, row)
    elif optimizer == _ROWWISE:
        _prefetch(state[:, 0], row)
    if has_bias:
        _prefetch(bias, row)
        if optimizer != _SGD:
            _prefetch(bias_state, row)


# --------------------------------------------------------------------------------------------
# Grouping ids into segments


@_jit
def _group_into(ids, num_rows, sorted_ids, order, starts):
    """Stable grouping of ``ids`` (B,) int64; returns the segment count S, or -1 (and
    nothing else done) when an id is outside [0, num_rows).

    Fills ``order`` (B,) with the sample indices sorted by id, ties in order of occurrence,
    ``sorted_ids`` (B,) with their ids, and ``starts`` (B + 1,): segment ``s`` (one unique
    id) is ``order[starts[s]:starts[s + 1]]``.
    """
    n = ids.shape[0]
    bits = 0
    while (1 << bits) < num_rows:
        bits += 1
    # Digits of up to 11 bits keep the histograms in L1; narrower for tiny batches, where
    # clearing a wide histogram would cost more than the pass.
    max_width = 4
    while max_width < 11 and (1 << max_width) < n:
        max_width += 1
    passes = max(1, (bits + max_width - 1) // max_width)
    width = max(1, (bits + passes - 1) // passes)
    buckets = 1 << width
    mask = buckets - 1
    counts = np.zeros((passes, buckets), np.int64)
    out_of_range = False
    for j in range(n):
        key = ids[j]
        out_of_range |= (key < 0) | (key >= num_rows)
        # masked digits stay in bounds even for a bad id; it is reported below
        for p in range(passes):
            counts[p, (key >> (p * width)) & mask] += 1
    if out_of_range:
        return -1
    for p in range(passes):
        total = 0
        for d in range(buckets):
            c = counts[p, d]
            counts[p, d] = total
            total += c
    # Ping-pong between the outputs and scratch so that the last pass lands in the outputs.
    spare_ids = np.empty_like(sorted_ids)
    spare_order = np.empty_like(order)
    if passes % 2 == 1:
        dst_ids, dst_order, src_ids, src_order = sorted_ids, order, spare_ids, spare_order
    else:
        dst_ids, dst_order, src_ids, src_order = spare_ids, spare_order, sorted_ids, order
    for j in range(n):
        key = ids[j]
        d = key & mask
        pos = counts[0, d]
        counts[0, d] = pos + 1
        dst_ids[pos] = key
        dst_order[pos] = j
    for p in range(1, passes):
        src_ids, dst_ids = dst_ids, src_ids
        src_order, dst_order = dst_order, src_order
        shift = p * width
        for j in range(n):
            key = src_ids[j]
            d = (key >> shift) & mask
            pos = counts[p, d]
            counts[p, d] = pos + 1
            dst_ids[pos] = key
            dst_order[pos] = src_order[j]
    num_segments = 0
    for j in range(n):
        if j == 0 or sorted_ids[j] != sorted_ids[j - 1]:
            starts[num_segments] = j
            num_segments += 1
    starts[num_segments] = n
    return num_segments


@_jit
def _chunk_bounds(starts, num_segments, num_threads):
    """Segment-index bounds (C + 1,) cutting the segments into C parallel work items of
    about equal sample counts (Zipf-hot rows make equal segment counts unbalanced). The
    cut changes with ``num_threads``, the results do not: segments are independent."""
    num_chunks = min(max(num_segments, 1), _CHUNKS_PER_THREAD * num_threads)
    n = starts[num_segments]
    bounds = np.empty(num_chunks + 1, np.int64)
    bounds[0] = 0
    s = 0
    for c in range(1, num_chunks):
        target = (n * c) // num_chunks
        while s < num_segments and starts[s] < target:
            s += 1
        bounds[c] = s
    bounds[num_chunks] = num_segments
    return bounds


# --------------------------------------------------------------------------------------------
# Kernels. Each returns a status: _OK, or _BAD_IDS / _BAD_TARGETS before it has written
# anything, so that the caller can raise the checks' own error.


@_jit
def _ids_in_range(users, items, start, end, num_users, num_items):
    """Whether every (user, item) pair of samples [start, end) indexes a row."""
    for b in range(start, end):
        u = users[b]
        i = items[b]
        if not ((u >= 0) & (u < num_users) & (i >= 0) & (i < num_items)):
            return False
    return True


@_pjit
def _forward_kernel(users, items, user_factors, item_factors, user_bias, item_bias, has_bias,
                    global_mean, out):
    """out (B,) = global_mean + <P[u], Q[i]> (+ b_u + b_i), the terms added in the
    reference's order."""
    num_samples = users.shape[0]
    num_users, num_items = user_factors.shape[0], item_factors.shape[0]
    dim = user_factors.shape[1]
    mean = _cast_like(user_factors, global_mean)
    num_blocks = (num_samples + _BLOCK - 1) // _BLOCK
    bad = np.zeros(num_blocks, np.bool_)
    for blk in prange(num_blocks):
        end = min(num_samples, (blk + 1) * _BLOCK)
        if not _ids_in_range(users, items, blk * _BLOCK, end, num_users, num_items):
            bad[blk] = True
            continue
        scratch = np.empty(dim, user_factors.dtype)
        for b in range(blk * _BLOCK, end):
            ahead = b + _PREFETCH_SAMPLES
            if ahead < end:
                _prefetch_row(user_factors, users[ahead])
                _prefetch_row(item_factors, items[ahead])
            u = users[b]
            i = items[b]
            pred = _dot(user_factors[u], item_factors[i], scratch) + mean
            if has_bias:
                pred = pred + user_bias[u]
                pred = pred + item_bias[i]
            out[b] = pred
    return _BAD_IDS if bad.any() else _OK


@_pjit
def _backward_kernel(grad_out, users, items, user_factors, item_factors, grad_p, grad_q):
    """grad_p[b] = grad_out[b] * Q[items[b]], grad_q[b] = grad_out[b] * P[users[b]]: (B, K)."""
    num_samples = users.shape[0]
    num_users, num_items = user_factors.shape[0], item_factors.shape[0]
    dim = user_factors.shape[1]
    num_blocks = (num_samples + _BLOCK - 1) // _BLOCK
    bad = np.zeros(num_blocks, np.bool_)
    for blk in prange(num_blocks):
        end = min(num_samples, (blk + 1) * _BLOCK)
        if not _ids_in_range(users, items, blk * _BLOCK, end, num_users, num_items):
            bad[blk] = True
            continue
        for b in range(blk * _BLOCK, end):
            ahead = b + _PREFETCH_SAMPLES
            if ahead < end:
                _prefetch_row(user_factors, users[ahead])
                _prefetch_row(item_factors, items[ahead])
            g = grad_out[b]
            p = user_factors[users[b]]
            q = item_factors[items[b]]
            for k in range(dim):
                grad_p[b, k] = g * q[k]
                grad_q[b, k] = g * p[k]
    return _BAD_IDS if bad.any() else _OK


@_pjit
def _sparse_update_kernel(weight, state, ids, grad_rows, optimizer, lr, eps, num_threads):
    """In place: one ``optimizer`` step per unique id with its summed ``grad_rows``.
    weight (N, K); state (N, K) Adagrad, (N, 1) row-wise, unused for SGD; ids (B,) int64;
    grad_rows (B, K)."""
    n = ids.shape[0]
    sorted_ids = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    num_segments = _group_into(ids, weight.shape[0], sorted_ids, order, starts)
    if num_segments < 0:
        return _BAD_IDS
    bounds = _chunk_bounds(starts, num_segments, num_threads)
    dim = weight.shape[1]
    lr_ = _cast_like(weight, lr)
    eps_ = _cast_like(weight, eps)
    no_bias = weight[0, :0]
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, weight.dtype)
        last_pos = starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            if s + _PREFETCH_SEGMENTS < num_segments:
                _prefetch_update_rows(weight, state, no_bias, no_bias,
                                      sorted_ids[starts[s + _PREFETCH_SEGMENTS]], optimizer,
                                      False)
            for k in range(dim):
                grad[k] = 0
            for pos in range(starts[s], starts[s + 1]):
                if pos + _PREFETCH_SAMPLES < last_pos:
                    _prefetch_row(grad_rows, order[pos + _PREFETCH_SAMPLES])
                rows = grad_rows[order[pos]]
                for k in range(dim):
                    grad[k] += rows[k]
            _update_row(weight, state, sorted_ids[starts[s]], grad, optimizer, lr_, eps_)
    return _OK


@_jit
def _loss_and_grad(pred, target, loss, mse_norm, huber_norm, batch):
    """(d loss / d pred in the weights' type, the sample's loss as float64) for one sample,
    each scale formed as autograd forms it: mse_loss scales by 2/B and huber_loss by 1/B (a
    double rounded to the weights' type), BCE divides by B."""
    if loss == _MSE:
        diff = pred - target
        return mse_norm * diff, np.float64(diff) * np.float64(diff)
    if loss == _HUBER:
        diff = pred - target
        ad = abs(np.float64(diff))
        value = 0.5 * ad * ad if ad < 1.0 else ad - 0.5
        if diff < -1:
            return -huber_norm, value
        if diff > 1:
            return huber_norm, value
        return huber_norm * diff, value
    x = np.float64(pred)
    e = np.exp(-abs(x))
    sig = 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)
    value = max(x, 0.0) - x * np.float64(target) + np.log1p(e)
    return (_cast_like(pred, sig) - target) / batch, value


@_pjit
def _train_step_kernel(user_factors, item_factors, user_bias, item_bias, has_bias,
                       user_factors_state, item_factors_state, user_bias_state,
                       item_bias_state, users, items, targets, global_mean, loss, reg,
                       optimizer, lr, eps, num_threads):
    """Fused forward, loss gradient, reg gradient and sparse optimizer step, in place.
    Returns ``(status, loss)``, the loss (data + reg) as a float64. Shapes as
    ``train_step``; ids int64; states as in ``_update_row`` (bias states (N,)); absent
    tables are empty arrays.

    Two passes over the batch, both over segments of equal ids: the user pass computes
    each sample's prediction and loss gradient while the user's row sits in L1, updates the
    user, and keeps its old row; the item pass takes its gradients from the saved rows."""
    num_samples = users.shape[0]
    dim = user_factors.shape[1]
    P, Q = user_factors, item_factors
    zero = _cast_like(P, 0.0)
    mean = _cast_like(P, global_mean)
    lr_ = _cast_like(P, lr)
    eps_ = _cast_like(P, eps)
    batch = _cast_like(P, num_samples)
    mse_norm = _cast_like(P, 2.0 / num_samples)
    huber_norm = _cast_like(P, 1.0 / num_samples)
    # The reg term's gradient is (reg/B) * 2p in autograd; 2*(reg/B) is exact, so
    # (2*(reg/B)) * p rounds the same.
    reg_scale = _cast_like(P, 2.0) * (_cast_like(P, reg) / batch)
    use_reg = reg != 0.0

    # 1. Group users and items into segments of equal ids (one side per thread); check
    # the targets before anything is written.
    sorted_ids = np.empty((2, num_samples), np.int64)
    order = np.empty((2, num_samples), np.int64)
    starts = np.empty((2, num_samples + 1), np.int64)
    num_segments = np.empty(2, np.int64)
    targets_finite = np.ones(1, np.bool_)
    item_position = np.empty(num_samples, np.int64)  # sample -> its place in item order
    for side in prange(2):
        if side == 0:
            num_segments[0] = _group_into(users, P.shape[0], sorted_ids[0], order[0], starts[0])
        else:
            num_segments[1] = _group_into(items, Q.shape[0], sorted_ids[1], order[1], starts[1])
            if num_segments[1] >= 0:
                for pos in range(num_samples):
                    item_position[order[1, pos]] = pos
            for b in range(num_samples):
                if not np.isfinite(targets[b]):
                    targets_finite[0] = False
                    break
    if num_segments[0] < 0 or num_segments[1] < 0:
        return _BAD_IDS, 0.0
    if not targets_finite[0]:
        return _BAD_TARGETS, 0.0

    # 2. Users: per sample the prediction, the loss gradient and the user's gradient row
    # (from the item rows, untouched so far); then the user's update. The old user rows
    # are kept for the items' gradients, the losses summed per segment. What the item pass
    # needs per sample is stored at the sample's place in item order, so that pass reads
    # it sequentially.
    sorted_users, user_order, user_starts = sorted_ids[0], order[0], starts[0]
    num_user_segments = num_segments[0]
    old_user_rows = np.empty((num_user_segments, dim), P.dtype)
    segment_loss = np.empty(num_user_segments, np.float64)
    segment_reg = np.zeros(num_user_segments, np.float64)
    user_segment_by_item = np.empty(num_samples, np.int64)
    grad_pred_by_item = np.empty(num_samples, P.dtype)
    bounds = _chunk_bounds(user_starts, num_user_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, P.dtype)
        scratch = np.empty(dim, P.dtype)
        last_pos = user_starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            if s + _PREFETCH_SEGMENTS < num_user_segments:
                _prefetch_update_rows(P, user_factors_state, user_bias, user_bias_state,
                                      sorted_users[user_starts[s + _PREFETCH_SEGMENTS]],
                                      optimizer, has_bias)
            u = sorted_users[user_starts[s]]
            p = P[u]
            p_norm = _dot(p, p, scratch) if use_reg else zero
            user_term = zero
            if has_bias:
                user_term = user_bias[u]
            for k in range(dim):
                grad[k] = 0
            grad_bias = zero
            loss_sum = 0.0
            reg_sum = 0.0
            for pos in range(user_starts[s], user_starts[s + 1]):
                if pos + _PREFETCH_SAMPLES < last_pos:
                    _prefetch_row(Q, items[user_order[pos + _PREFETCH_SAMPLES]])
                b = user_order[pos]
                user_segment_by_item[item_position[b]] = s
                i = items[b]
                q = Q[i]
                pred = _dot(p, q, scratch) + mean
                if has_bias:
                    pred = pred + user_term
                    pred = pred + item_bias[i]
                g, value = _loss_and_grad(pred, targets[b], loss, mse_norm, huber_norm, batch)
                grad_pred_by_item[item_position[b]] = g
                loss_sum += value
                if use_reg:
                    norms = np.float64(p_norm) + np.float64(_dot(q, q, scratch))
                    if has_bias:
                        norms += (np.float64(user_term) ** 2
                                  + np.float64(item_bias[i]) ** 2)
                    reg_sum += norms
                    for k in range(dim):
                        grad[k] += g * q[k] + reg_scale * p[k]
                    grad_bias += g + reg_scale * user_term
                else:
                    for k in range(dim):
                        grad[k] += g * q[k]
                    grad_bias += g
            segment_loss[s] = loss_sum
            segment_reg[s] = reg_sum
            old = old_user_rows[s]
            for k in range(dim):
                old[k] = p[k]
            _update_row(P, user_factors_state, u, grad, optimizer, lr_, eps_)
            if has_bias:
                _update_scalar(user_bias, user_bias_state, u, grad_bias, optimizer, lr_, eps_)

    total = _mean_loss(segment_loss, segment_reg, num_user_segments, num_samples, reg)

    # 3. Items, from the saved user rows.
    sorted_items, item_starts = sorted_ids[1], starts[1]
    num_item_segments = num_segments[1]
    bounds = _chunk_bounds(item_starts, num_item_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, P.dtype)
        last_pos = item_starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            if s + _PREFETCH_SEGMENTS < num_item_segments:
                _prefetch_update_rows(Q, item_factors_state, item_bias, item_bias_state,
                                      sorted_items[item_starts[s + _PREFETCH_SEGMENTS]],
                                      optimizer, has_bias)
            i = sorted_items[item_starts[s]]
            q = Q[i]
            item_term = zero
            if has_bias:
                item_term = item_bias[i]
            for k in range(dim):
                grad[k] = 0
            grad_bias = zero
            for pos in range(item_starts[s], item_starts[s + 1]):
                if pos + _PREFETCH_SAMPLES < last_pos:
                    # written by whichever thread owned the user: often another core's cache
                    _prefetch_row(old_user_rows, user_segment_by_item[pos + _PREFETCH_SAMPLES])
                g = grad_pred_by_item[pos]
                p = old_user_rows[user_segment_by_item[pos]]
                if use_reg:
                    for k in range(dim):
                        grad[k] += g * p[k] + reg_scale * q[k]
                    grad_bias += g + reg_scale * item_term
                else:
                    for k in range(dim):
                        grad[k] += g * p[k]
                    grad_bias += g
            _update_row(Q, item_factors_state, i, grad, optimizer, lr_, eps_)
            if has_bias:
                _update_scalar(item_bias, item_bias_state, i, grad_bias, optimizer, lr_, eps_)
    return _OK, total


# --------------------------------------------------------------------------------------------
# Tensor-level API
#
# Validation is split for speed: the structural checks below are cheap attribute tests; the
# two that read every value (ids in range, finite targets) run inside the kernels, which
# report a problem before writing anything. Whenever a fast test fails, the shared checks
# in fastmf.ops.checks run and raise their own error, so messages match the other backends.

_Tensor = torch.Tensor
# Below this many samples the kernels run on the calling thread alone: waking the pool
# costs more than it saves, and on a busy machine a parallel region can stall for a whole
# scheduler slice waiting for a thread that is not running.
_PARALLEL_MIN_SAMPLES = 1024
_WEIGHT_DTYPES = (torch.float32, torch.float64)
_ID_DTYPES = (torch.int32, torch.int64)


def _require_cpu(op: str, names: tuple, tensors: tuple) -> None:
    for name, t in zip(names, tensors):
        if isinstance(t, _Tensor) and not t.is_cpu:
            raise ValueError(
                f"fastmf.{op}: {name} is on {t.device}; the numba backend runs on CPU tensors "
                "only; use backend='native' for CUDA"
            )


def _is_ids(ids, length=None) -> bool:
    return (isinstance(ids, _Tensor) and ids.dtype in _ID_DTYPES and ids.ndim == 1
            and (length is None or ids.shape[0] == length))


def _is_table(t, dtype, shape) -> bool:
    return isinstance(t, _Tensor) and t.dtype == dtype and t.shape == shape


def _tables_ok(users, items, user_factors, item_factors, user_bias, item_bias) -> bool:
    """The structure ``_checks.check_mf_inputs`` demands, without reading any value."""
    if not (isinstance(user_factors, _Tensor) and isinstance(item_factors, _Tensor)):
        return False
    dtype = user_factors.dtype
    if (dtype not in _WEIGHT_DTYPES or item_factors.dtype != dtype or user_factors.ndim != 2
            or item_factors.ndim != 2 or user_factors.shape[1] != item_factors.shape[1]):
        return False
    if (user_bias is None) != (item_bias is None):
        return False
    if user_bias is not None and not (
        _is_table(user_bias, dtype, user_factors.shape[:1])
        and _is_table(item_bias, dtype, item_factors.shape[:1])
    ):
        return False
    return _is_ids(users) and _is_ids(items, users.shape[0])


def _states_ok(tables, states, optimizer) -> bool:
    """Each present table's optimizer state has its dtype and shape (row-wise Adagrad: one
    value per row); SGD has no states."""
    if optimizer == _SGD:
        return True
    for table, state in zip(tables, states):
        if table is not None and not _is_table(
            state, table.dtype, table.shape[:1] if optimizer == _ROWWISE else table.shape
        ):
            return False
    return True


def _ids_view(ids: torch.Tensor) -> np.ndarray:
    """ids as a contiguous int64 array (one compiled signature for both id dtypes)."""
    return ids.to(torch.int64).contiguous().numpy()


def _read_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _Writable:
    """A contiguous numpy view of ``tensor`` whose changes land in ``tensor``: zero-copy
    when it is already contiguous, else a copy written back by ``commit`` (a dense pass
    over the table: pass contiguous tables where speed matters)."""

    __slots__ = ("tensor", "work", "array")

    def __init__(self, tensor: torch.Tensor, shape=None):
        self.tensor = tensor.detach()
        self.work = self.tensor if self.tensor.is_contiguous() else self.tensor.contiguous()
        view = self.work if shape is None else self.work.view(shape)
        self.array = view.numpy()

    def commit(self) -> None:
        if self.work is not self.tensor:
            self.tensor.copy_(self.work)
        else:
            # Writes through numpy bypass PyTorch; bump the version as an in-place op
            # would, so autograd still detects a saved tensor modified after its save.
            increment_version(self.tensor)


def _step_arrays(tables, states, optimizer, write_user_bias=True):
    """The arrays a fused step kernel updates in place, ``(writable, arrays)``: arrays are
    ``P, Q, b_u, b_i, P_state, Q_state, b_u_state, b_i_state`` with empty stand-ins for
    absent ones (row-wise factor states as (N, 1)); ``writable`` commits them back. With
    ``write_user_bias`` false the user bias and its state are left out (never written)."""
    user_factors, item_factors, user_bias, item_bias = tables
    writable = [_Writable(user_factors), _Writable(item_factors)]
    empty1 = _absent(writable[0].array, 1)
    empty2 = _absent(writable[0].array, 2)

    def add(tensor, shape=None, absent=empty1):
        if tensor is None:
            return absent
        writable.append(_Writable(tensor, shape))
        return writable[-1].array

    has_bias = item_bias is not None
    arrays = [writable[0].array, writable[1].array,
              add(user_bias if write_user_bias else None), add(item_bias)]
    if optimizer == _SGD:
        return writable, arrays + [empty2, empty2, empty1, empty1]
    rowwise = optimizer == _ROWWISE
    arrays += [add(states[0], (user_factors.shape[0], 1) if rowwise else None),
               add(states[1], (item_factors.shape[0], 1) if rowwise else None),
               add(states[2] if has_bias and write_user_bias else None),
               add(states[3] if has_bias else None)]
    return writable, arrays


def _absent(like: np.ndarray, ndim: int) -> np.ndarray:
    """An empty stand-in for an absent table or state, typed like ``like`` so the kernel
    keeps one compiled signature."""
    return np.empty((0,) * ndim, dtype=like.dtype)


def _launch(kernel, num_samples: int, *args, pass_threads: bool = False):
    """``kernel(*args)`` (with the thread count appended when ``pass_threads``), serial for
    small batches. Results do not depend on the thread count."""
    threads = numba.get_num_threads()
    serial = threads > 1 and num_samples < _PARALLEL_MIN_SAMPLES
    if serial:
        numba.set_num_threads(1)
    try:
        return kernel(*args, 1 if serial else threads) if pass_threads else kernel(*args)
    finally:
        if serial:
            numba.set_num_threads(threads)


def _unreachable(op: str):
    # The kernel saw a bad id or target that the shared checks accept: a bug here.
    return RuntimeError(f"fastmf.{op}: the numba kernel rejected inputs that passed the checks")


def mf_forward(users, items, user_factors, item_factors, user_bias, item_bias, global_mean):
    """Predictions (B,): ``global_mean + b_u + b_i + <P[u], Q[i]>``.

    users, items: (B,) int32/int64; user_factors (U, K); item_factors (I, K); user_bias (U,)
    and item_bias (I,), or both None.
    """
    op = "mf_forward"
    args = (users, items, user_factors, item_factors, user_bias, item_bias)
    _require_cpu(op, ("users", "items", "user_factors", "item_factors", "user_bias",
                      "item_bias"), args)
    if not _tables_ok(*args):
        _checks.check_mf_inputs(op, *args)
    out = torch.empty(users.shape[0], dtype=user_factors.dtype)
    if users.shape[0] == 0:
        return out
    has_bias = user_bias is not None
    P = _read_view(user_factors)
    no_bias = _absent(P, 1)
    status = _launch(
        _forward_kernel, users.shape[0], _ids_view(users), _ids_view(items), P,
        _read_view(item_factors), _read_view(user_bias) if has_bias else no_bias,
        _read_view(item_bias) if has_bias else no_bias,
        has_bias, float(global_mean), out.numpy(),
    )
    if status != _OK:
        _checks.check_mf_inputs(op, *args)
        raise _unreachable(op)
    return out


def mf_backward(grad_out, users, items, user_factors, item_factors):
    """Per-sample gradient rows ``(grad_out[b] * Q[items[b]], grad_out[b] * P[users[b]])``,
    each (B, K). grad_out: (B,) like the weights; users, items (B,); P (U, K); Q (I, K)."""
    op = "mf_backward"
    _require_cpu(op, ("grad_out", "users", "items", "user_factors", "item_factors"),
                 (grad_out, users, items, user_factors, item_factors))

    def full_checks():
        _checks.check_mf_inputs(op, users, items, user_factors, item_factors, None, None)
        _checks.check_weight(op, "grad_out", grad_out, 1, like=user_factors)
        _checks.check_same_length(op, grad_out=grad_out, users=users)

    if not (_tables_ok(users, items, user_factors, item_factors, None, None)
            and _is_table(grad_out, user_factors.dtype, users.shape)):
        full_checks()
    shape = (users.shape[0], user_factors.shape[1])
    grad_p = torch.empty(shape, dtype=user_factors.dtype)
    grad_q = torch.empty(shape, dtype=user_factors.dtype)
    if users.shape[0] == 0:
        return grad_p, grad_q
    status = _launch(
        _backward_kernel, users.shape[0], _read_view(grad_out), _ids_view(users),
        _ids_view(items), _read_view(user_factors), _read_view(item_factors), grad_p.numpy(),
        grad_q.numpy(),
    )
    if status != _OK:
        full_checks()
        raise _unreachable(op)
    return grad_p, grad_q


def _sparse_update(op, weight, state, ids, grad_rows, lr, eps, optimizer):
    _require_cpu(op, ("weight", "state", "ids", "grad_rows"), (weight, state, ids, grad_rows))
    rowwise = optimizer == _ROWWISE

    def full_checks():
        _checks.check_sparse_update(op, weight, state, ids, grad_rows, rowwise)

    ok = (isinstance(weight, _Tensor) and weight.dtype in _WEIGHT_DTYPES
          and weight.ndim in (1, 2) and _is_ids(ids)
          and _is_table(grad_rows, weight.dtype, ids.shape + weight.shape[1:]))
    if ok and optimizer != _SGD:
        ok = _is_table(state, weight.dtype, weight.shape[:1] if rowwise else weight.shape)
    if not ok:
        full_checks()
    if ids.shape[0] == 0:
        return
    # A 1-D table is a table of rows of one element; row-wise Adagrad state is one column.
    rows = (weight.shape[0], weight.shape[1] if weight.ndim == 2 else 1)
    w = _Writable(weight, rows)
    if optimizer == _SGD:
        s = None
        state_array = _absent(w.array, 2)
    else:
        s = _Writable(state, (rows[0], 1) if state.ndim == 1 else rows)
        state_array = s.array
    grads = _read_view(grad_rows).reshape(ids.shape[0], rows[1])
    status = _launch(_sparse_update_kernel, ids.shape[0], w.array, state_array, _ids_view(ids),
                     grads, optimizer, float(lr), float(eps), pass_threads=True)
    if status != _OK:
        full_checks()
        raise _unreachable(op)
    w.commit()
    if s is not None:
        s.commit()


def sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps, rowwise):
    """In place, exact sparse Adagrad: the grad rows of each unique id are summed in order
    of occurrence, then ``G += g²`` (row-wise: ``G += mean_k g²``) and
    ``w -= lr·g/(√G + eps)`` once per unique row.

    weight (N, K) or (N,); state like weight, or (N,) when ``rowwise`` and weight is 2-D;
    ids (B,) int32/int64; grad_rows (B, K) or (B,).
    """
    # Row-wise on a 1-D table (rows of one element) is element-wise; no special case.
    optimizer = _ROWWISE if rowwise else _ADAGRAD
    _sparse_update("sparse_adagrad_update", weight, state, ids, grad_rows, lr, eps, optimizer)


def sparse_sgd_update(weight, ids, grad_rows, lr):
    """In place: ``w[id] -= lr · (sum of the grad rows of id)`` once per unique id.
    weight (N, K) or (N,); ids (B,); grad_rows (B, K) or (B,)."""
    _sparse_update("sparse_sgd_update", weight, None, ids, grad_rows, lr, 0.0, _SGD)


_TRAIN_STEP_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias",
                     "user_factors_state", "item_factors_state", "user_bias_state",
                     "item_bias_state", "users", "items", "targets")


def _train_step_ok(tables, states, users, items, targets, loss, optimizer) -> bool:
    """The structure ``_checks.check_train_step`` demands, without reading any value."""
    user_factors, item_factors, user_bias, item_bias = tables
    if not (0 <= loss < len(Loss) and 0 <= optimizer < len(STEP_OPTIMIZERS)):
        return False
    if not _tables_ok(users, items, user_factors, item_factors, user_bias, item_bias):
        return False
    return _is_table(targets, user_factors.dtype, users.shape) and _states_ok(
        tables, states, optimizer)


def train_step(tables: MFTables, states: MFTables | None, users, items, targets,
               global_mean: float, loss, reg: float, optimizer: OptimizerArgs):
    """Fused forward + loss + backward + sparse optimizer step, in place on the tables and
    states; returns the loss (data term + reg term) as a 0-d tensor like the weights.

    users, items: (B,) int32/int64; ``tables``: user_factors (U, K), item_factors (I, K),
    user_bias (U,) and item_bias (I,), or both None; ``states`` None for SGD, else like
    their table (row-wise Adagrad: (U,) and (I,) for the factor tables); targets (B,)
    finite, dtype of the weights; ``loss`` a :class:`~fastmf.ops.codes.Loss`, code or name.
    An empty batch changes nothing and returns 0.
    """
    op = "train_step"
    loss = int(parse(Loss, loss, op, "loss"))
    lr, eps = optimizer.lr, optimizer.eps
    optimizer = int(parse(Optimizer, optimizer.optimizer, op, "optimizer"))
    tables = tuple(tables)
    states = tuple(states) if states is not None else (None,) * 4
    user_factors, item_factors, user_bias, item_bias = tables
    _require_cpu(op, _TRAIN_STEP_NAMES, tables + states + (users, items, targets))

    def full_checks():
        _checks.check_train_step(op, tables, states, users, items, targets, loss, optimizer)

    if not _train_step_ok(tables, states, users, items, targets, loss, optimizer):
        full_checks()
    if users.shape[0] == 0:
        return user_factors.new_zeros(())
    # The fused kernel updates the user rows while it still reads item rows.
    for a, b in ((user_factors, item_factors), (user_bias, item_bias)):
        if a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
            raise ValueError(f"fastmf.{op}: the user and item tables share memory; the numba "
                             "backend needs separate tables")

    has_bias = user_bias is not None
    writable, arrays = _step_arrays(tables, states, optimizer)
    status, total = _launch(
        _train_step_kernel, users.shape[0], *arrays[:4], has_bias, *arrays[4:],
        _ids_view(users), _ids_view(items), _read_view(targets),
        float(global_mean), loss, float(reg), optimizer, float(lr), float(eps),
        pass_threads=True,
    )
    if status != _OK:
        full_checks()
        raise _unreachable(op)
    for w in writable:
        w.commit()
    return torch.tensor(total, dtype=user_factors.dtype)
