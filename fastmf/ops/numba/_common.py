"""What the Numba op families share: jit settings, prefetching, the optimizer updates, the
grouping of ids into segments, the fused steps' second pass, and the tensor plumbing
(structural checks, array views, launch). Private to :mod:`fastmf.ops.numba`; the family
modules import from here and never from each other.

How the sparse updates stay exact and deterministic: the ids of a batch are grouped with a
stable LSD radix sort over only the bits of the table size (O(B) work, no O(num_rows)
scratch), so each unique row becomes one segment whose gradient rows are summed in order of
occurrence, as ``index_add_`` sums them, before one optimizer update. Segments are independent,
so they run in parallel without atomics and the result does not depend on the thread count.
Losses are summed per segment, then over the segments in id order: an order fixed by the
batch, not by the threads.

Arithmetic stays in the weights' dtype with no fast-math, and every scale factor is formed
the way autograd forms it. Kernels run on numba's thread pool (``numba.set_num_threads``);
batches under ``PARALLEL_MIN_SAMPLES`` run on the calling thread.
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

from fastmf.ops import checks
from fastmf.ops.codes import STEP_OPTIMIZERS, Optimizer, parse

# Plain ints: numba folds them as compile-time constants.
SGD, ADAGRAD = int(Optimizer.SGD), int(Optimizer.ADAGRAD)
ROWWISE = int(Optimizer.ROWWISE_ADAGRAD)
# Kernel statuses: OK, or what the kernel found before it wrote anything.
OK, BAD_IDS, BAD_TARGETS = 0, 1, 2

# Parallel work items per thread for the segment loops: enough to balance the Zipf-hot rows,
# few enough that each item's scratch allocation is noise.
CHUNKS_PER_THREAD = 4
# How far ahead (samples / segments) rows are prefetched: the gathers are latency-bound,
# and a row loop is too long for out-of-order execution to reach the next rows by itself.
PREFETCH_SAMPLES = 8
PREFETCH_SEGMENTS = 4
CACHE_LINE = 64
# LLVM names the intrinsic by pointer type: typed pointers before LLVM 15, opaque after.
_PREFETCH_INTRINSIC = (
    "llvm.prefetch.p0" if llvm_binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"
)

# error_model="numpy": float division without Python's zero check, which would otherwise
# stop LLVM from vectorising the optimizer loops (x/0 gives inf, as in PyTorch).
jit = numba.njit(cache=True, error_model="numpy")
pjit = numba.njit(cache=True, parallel=True, error_model="numpy")
# For the helpers called once per sample or per segment: inlined in numba's IR, as LLVM
# does not always inline them, and a call that passes arrays (each as its own struct of
# fields) cost train_step about 15 % at K=64.
inline_jit = numba.njit(cache=True, error_model="numpy", inline="always")


# --------------------------------------------------------------------------------------------
# Low-level helpers


def cast_like(like, value):
    """``value`` converted to the type of the scalar ``like`` or of the elements of the array
    ``like`` (inside jitted code only)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(cast_like)
def _cast_like_impl(like, value):
    # Literal Python numbers would promote float32 arithmetic to float64; casting every
    # constant to the weights' type keeps float32 math in float32, as PyTorch does it.
    target_type = like.dtype if isinstance(like, types.Array) else like

    def impl(like, value):
        return target_type(value)

    return impl


@intrinsic
def prefetch(typingctx, arr, index):
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


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def float32_bits(typingctx, value):
    """The bit pattern of the float32 ``value`` as a uint64 in [0, 2**32): uint64 because
    numba widens 32-bit integer arithmetic to 64 bits, and mixing signed with unsigned 64-bit
    integers would give floats."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.uint64(value), codegen


@jit
def prefetch_row(table, row):
    """Prefetch every cache line of ``table[row]`` (2-D table)."""
    line = max(1, CACHE_LINE // table.itemsize)
    values = table[row]
    for k in range(0, values.shape[0], line):
        prefetch(values, k)


@jit
def update_row(weight, state, row, grad, optimizer, lr, eps):
    """One optimizer step of ``weight[row]`` (K,) with the summed gradient ``grad`` (K,).
    ``state``: (N, K) for Adagrad, (N, 1) for row-wise Adagrad, unused for SGD."""
    w = weight[row]
    if optimizer == SGD:
        for k in range(w.shape[0]):
            w[k] -= lr * grad[k]
    elif optimizer == ADAGRAD:
        acc = state[row]
        for k in range(w.shape[0]):
            g = grad[k]
            a = acc[k] + g * g
            acc[k] = a
            w[k] -= lr * g / (np.sqrt(a) + eps)
    else:
        square_sum = cast_like(weight, 0.0)
        for k in range(w.shape[0]):
            square_sum += grad[k] * grad[k]
        a = state[row, 0] + square_sum / cast_like(weight, w.shape[0])
        state[row, 0] = a
        std = np.sqrt(a) + eps
        for k in range(w.shape[0]):
            w[k] -= lr * grad[k] / std


@jit
def update_scalar(weight, state, row, grad, optimizer, lr, eps):
    """One optimizer step of the 1-D ``weight[row]``; row-wise Adagrad on a 1-D table is
    element-wise Adagrad (a row of one element)."""
    if optimizer == SGD:
        weight[row] -= lr * grad
    else:
        a = state[row] + grad * grad
        state[row] = a
        weight[row] -= lr * grad / (np.sqrt(a) + eps)


@jit
def dot(a, b, scratch):
    """sum_k a[k] * b[k] for 1-D ``a``, ``b`` of length K, summed as a fixed tree: fold the
    tail onto the largest power of two, then halve. Every step is element-wise, so it
    vectorises without fast-math, and the order is the same on every call; a sequential
    sum would be one long chain of dependent additions. ``scratch``: (>= K,)."""
    n = a.shape[0]
    if n == 0:
        return cast_like(a, 0.0)
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


# --------------------------------------------------------------------------------------------
# float16 / bfloat16 storage
#
# numpy has no bfloat16, so half tables are passed as their uint16 bit patterns, widened to
# float32 for the arithmetic and narrowed back exactly as PyTorch narrows (round to nearest
# even): ports of c10's fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value and of
# BFloat16's round_to_nearest_even. Bit operations run on uint64 with uint64 constants, the
# only integer type numba neither widens nor turns into a float when mixed.

# Storage kinds of a table passed as uint16 bits (PLAIN: float32/float64, used as is).
PLAIN, FLOAT16, BFLOAT16 = 0, 1, 2
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN32 = np.uint64(0x80000000)
_F16_EXP_OFFSET = np.uint64(0xE0 << 23)
_F16_EXP_SCALE = np.float32(2.0 ** -112)
_F16_MAGIC_MASK = np.uint64(126 << 23)
_F16_DENORMAL_CUTOFF = np.uint64(1 << 27)
_F16_SCALE_TO_INF = np.float32(2.0 ** 112)
_F16_SCALE_TO_ZERO = np.float32(2.0 ** -110)
_F16_MIN_BIAS = np.uint64(0x71000000)
_F32_EXP_MASK_SHL1 = np.uint64(0xFF000000)
_BF16_NAN = np.uint16(0x7FC0)
_BF16_ROUND = np.uint64(0x7FFF)


@jit
def float16_to_float32(h):
    """The float32 value of the float16 bits ``h`` (exact)."""
    w = np.uint64(h) << np.uint64(16)
    sign = w & _SIGN32
    two_w = (w + w) & _LOW32
    normalized = float32_from_bits((two_w >> np.uint64(4)) + _F16_EXP_OFFSET) * _F16_EXP_SCALE
    denormalized = float32_from_bits((two_w >> np.uint64(17)) | _F16_MAGIC_MASK) - np.float32(0.5)
    if two_w < _F16_DENORMAL_CUTOFF:
        return float32_from_bits(sign | float32_bits(denormalized))
    return float32_from_bits(sign | float32_bits(normalized))


@jit
def float32_to_float16(f):
    """The float16 bits of the float32 ``f`` rounded to nearest even (NaN: 0x7E00 with
    f's sign), as uint16."""
    base = (abs(f) * _F16_SCALE_TO_INF) * _F16_SCALE_TO_ZERO
    w = float32_bits(f)
    shl1_w = (w + w) & _LOW32
    sign = w & _SIGN32
    bias = shl1_w & _F32_EXP_MASK_SHL1
    if bias < _F16_MIN_BIAS:
        bias = _F16_MIN_BIAS
    base = float32_from_bits((bias >> np.uint64(1)) + np.uint64(0x07800000)) + base
    bits = float32_bits(base)
    nonsign = ((bits >> np.uint64(13)) & np.uint64(0x7C00)) + (bits & np.uint64(0x0FFF))
    if shl1_w > _F32_EXP_MASK_SHL1:
        nonsign = np.uint64(0x7E00)
    return np.uint16((sign >> np.uint64(16)) | nonsign)


@jit
def bfloat16_to_float32(h):
    """The float32 value of the bfloat16 bits ``h`` (exact)."""
    return float32_from_bits(np.uint64(h) << np.uint64(16))


@jit
def float32_to_bfloat16(f):
    """The bfloat16 bits of the float32 ``f`` rounded to nearest even (NaN: 0x7FC0), as
    uint16."""
    if f != f:
        return _BF16_NAN
    u = float32_bits(f)
    return np.uint16((u + _BF16_ROUND + ((u >> np.uint64(16)) & np.uint64(1)))
                     >> np.uint64(16))


def round_to_half(f, kind):
    """The float32 ``f`` rounded to the nearest float16 (``kind`` FLOAT16) or bfloat16
    (BFLOAT16) value, as a float32; ``f`` itself for PLAIN or a float64 ``f`` (inside
    jitted code only)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(round_to_half)
def _round_to_half_impl(f, kind):
    if f != types.float32:
        # float64 kernels have no half path; typed apart so they need no float32 bit casts
        return lambda f, kind: f

    def impl(f, kind):
        if kind == FLOAT16:
            return float16_to_float32(float32_to_float16(f))
        if kind == BFLOAT16:
            return bfloat16_to_float32(float32_to_bfloat16(f))
        return f

    return impl


@inline_jit
def begin_segment(weight, state, bias, bias_state, has_bias, sorted_ids, starts, num_segments,
                  s, optimizer, grad):
    """Start the gradient sum of segment ``s``: zero ``grad`` (K,) and return the segment's
    ``(row, bias[row])`` (bias 0 without biases). First it prefetches what
    ``update_row``/``update_scalar`` will touch for segment ``s + PREFETCH_SEGMENTS``, so
    those rows arrive while this segment is summed."""
    ahead = s + PREFETCH_SEGMENTS
    if ahead < num_segments:
        next_row = sorted_ids[starts[ahead]]
        prefetch_row(weight, next_row)
        if optimizer == ADAGRAD:
            prefetch_row(state, next_row)
        elif optimizer == ROWWISE:
            prefetch(state[:, 0], next_row)
        if has_bias:
            prefetch(bias, next_row)
            if optimizer != SGD:
                prefetch(bias_state, next_row)
    for k in range(grad.shape[0]):
        grad[k] = 0
    row = sorted_ids[starts[s]]
    own_bias = cast_like(weight, 0.0)
    if has_bias:
        own_bias = bias[row]
    return row, own_bias


# --------------------------------------------------------------------------------------------
# Grouping ids into segments


@jit
def group_into(ids, num_rows, sorted_ids, order, starts):
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


@jit
def group_with_positions(ids, num_rows, sorted_ids, order, starts, position):
    """``group_into``, and ``position`` (B,) its inverse: where each sample stands in
    ``order``. The fused steps' first pass stores what the second needs at those places,
    so the second pass reads it sequentially."""
    num_segments = group_into(ids, num_rows, sorted_ids, order, starts)
    if num_segments >= 0:
        for pos in range(ids.shape[0]):
            position[order[pos]] = pos
    return num_segments


@pjit
def group_users_and_items(users, num_users, items, num_items, finite_values, with_positions):
    """The two sides of a fused step grouped into segments, one side per thread: the users
    (B,) by ``group_into``, the item occurrences (N,) (N = B, or 2B positives then negatives
    for the pairwise step) too, or by ``group_with_positions`` when ``with_positions``
    (else ``item_position`` is empty). The item side's thread also checks that
    ``finite_values`` (e.g. the targets; may be empty) are finite.

    Returns ``(status, (sorted_users, user_order, user_starts, num_user_segments),
    (sorted_items, item_order, item_starts, num_item_segments, item_position))``, status
    BAD_IDS for an id out of range, else BAD_TARGETS for a non-finite value, else OK."""
    sorted_users = np.empty(users.shape[0], np.int64)
    user_order = np.empty(users.shape[0], np.int64)
    user_starts = np.empty(users.shape[0] + 1, np.int64)
    sorted_items = np.empty(items.shape[0], np.int64)
    item_order = np.empty(items.shape[0], np.int64)
    item_starts = np.empty(items.shape[0] + 1, np.int64)
    item_position = np.empty(items.shape[0] if with_positions else 0, np.int64)
    num_segments = np.empty(2, np.int64)
    finite = np.ones(1, np.bool_)
    for side in prange(2):
        if side == 0:
            num_segments[0] = group_into(users, num_users, sorted_users, user_order,
                                         user_starts)
        else:
            if with_positions:
                num_segments[1] = group_with_positions(items, num_items, sorted_items,
                                                       item_order, item_starts, item_position)
            else:
                num_segments[1] = group_into(items, num_items, sorted_items, item_order,
                                             item_starts)
            for b in range(finite_values.shape[0]):
                if not np.isfinite(finite_values[b]):
                    finite[0] = False
                    break
    status = OK
    if num_segments[0] < 0 or num_segments[1] < 0:
        status = BAD_IDS
    elif not finite[0]:
        status = BAD_TARGETS
    return (status, (sorted_users, user_order, user_starts, num_segments[0]),
            (sorted_items, item_order, item_starts, num_segments[1], item_position))


@jit
def chunk_bounds(starts, num_segments, num_threads):
    """Segment-index bounds (C + 1,) cutting the segments into C parallel work items of
    about equal sample counts (Zipf-hot rows make equal segment counts unbalanced). The
    cut changes with ``num_threads``, the results do not: segments are independent."""
    num_chunks = min(max(num_segments, 1), CHUNKS_PER_THREAD * num_threads)
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
# The fused steps' two passes: users first, each user's row updated once its samples are
# summed; then items, from the saved pre-step user rows.


@jit
def step_scalars(like, num_samples, reg, lr, eps):
    """``(zero, batch, reg_scale, lr, eps, use_reg)`` of a fused step, in the weights' type
    (``like``) but ``use_reg``: the batch size B, and the factor of the L2 term's gradient.
    That gradient is (reg/B) * 2w in autograd; 2*(reg/B) is exact, so (2*(reg/B)) * w rounds
    the same."""
    batch = cast_like(like, num_samples)
    reg_scale = cast_like(like, 2.0) * (cast_like(like, reg) / batch)
    return (cast_like(like, 0.0), batch, reg_scale, cast_like(like, lr), cast_like(like, eps),
            reg != 0.0)


@inline_jit
def save_and_update_row(weight, state, row, grad, saved, optimizer, lr, eps):
    """Copy ``weight[row]`` into ``saved`` (K,), then ``update_row``: the fused steps' first
    pass keeps the pre-step rows for the second pass's gradients."""
    w = weight[row]
    for k in range(w.shape[0]):
        saved[k] = w[k]
    update_row(weight, state, row, grad, optimizer, lr, eps)


@inline_jit
def add_sample(grad, g, other, own, reg_scale, use_reg):
    """``grad += g * other`` (+ ``reg_scale * own`` with L2): one sample's share of the
    gradient of the row ``own`` (K,), from the row ``other`` (K,) it was scored with."""
    if use_reg:
        for k in range(grad.shape[0]):
            grad[k] += g * other[k] + reg_scale * own[k]
    else:
        for k in range(grad.shape[0]):
            grad[k] += g * other[k]


@jit
def mean_loss(segment_loss, segment_reg, num_segments, num_samples, reg):
    """The step's loss: segment sums in segment order (fixed by the ids, not by the
    threads), as means over the batch."""
    data_total = 0.0
    reg_total = 0.0
    for s in range(num_segments):
        data_total += segment_loss[s]
        reg_total += segment_reg[s]
    return data_total / num_samples + reg * (reg_total / num_samples)


@jit
def first_pass_outputs(like, num_user_segments, num_entries):
    """What the user pass leaves: ``(old_user_rows (S, K), segment_loss (S,) float64,
    segment_reg (S,) float64 zeroed, grad_of (N,), user_segment_of (N,) int64)`` for S user
    segments and N entries (one per sample or per item position, see
    ``step_rows_from_saved``), rows and gradients in the weights' type (``like`` (., K))."""
    return (np.empty((num_user_segments, like.shape[1]), like.dtype),
            np.empty(num_user_segments, np.float64),
            np.zeros(num_user_segments, np.float64),
            np.empty(num_entries, like.dtype),
            np.empty(num_entries, np.int64))


@inline_jit
def sample_at(sample_of, num_samples, pos):
    """``(b, negative)``: the entry of sorted item position ``pos`` (``sample_of[pos]``, or
    ``pos`` itself when ``sample_of`` is empty), and whether it is the negative item of
    sample ``b`` (entries from ``num_samples`` on)."""
    b = pos if sample_of.shape[0] == 0 else sample_of[pos]
    if b >= num_samples:
        return b - num_samples, True
    return b, False


@jit
def step_rows_from_saved(weight, state, bias, bias_state, has_bias, sorted_ids, starts,
                         num_segments, first, last, sample_of, num_samples, grad_of,
                         user_segment_of, saved_rows, use_reg, reg_scale, optimizer, lr, eps):
    """One optimizer update for each row of segments [first, last) of the item side: the
    row's gradient is the sum over its sorted positions of ``g * saved_rows[user_segment_of[b]]``
    (+ ``reg_scale`` times the row) in position order, with ``(b, negative) = sample_at(
    sample_of, num_samples, pos)`` and ``g = grad_of[b]``, negated for a negative (negating
    is exact, so -(g p) of the reference equals (-g) p); its bias gets the sum of the g
    (+ the reg term).

    train_step stores its per-sample results at each sample's place in item order and
    passes an empty ``sample_of``, so this pass reads them sequentially; the pairwise step
    stores them per sample and passes the item order (2B positions over B samples).
    ``saved_rows`` are the user rows from before the step, so every gradient comes from the
    pre-step weights. ``state``, ``bias_state`` as in ``update_row``, ``update_scalar``;
    ``lr``, ``eps``, ``reg_scale`` in the weights' type."""
    zero = cast_like(weight, 0.0)
    grad = np.empty(weight.shape[1], weight.dtype)
    last_pos = starts[last]
    for s in range(first, last):
        row, own_bias = begin_segment(weight, state, bias, bias_state, has_bias, sorted_ids,
                                      starts, num_segments, s, optimizer, grad)
        w = weight[row]
        grad_bias = zero
        for pos in range(starts[s], starts[s + 1]):
            if pos + PREFETCH_SAMPLES < last_pos:
                ahead, _ = sample_at(sample_of, num_samples, pos + PREFETCH_SAMPLES)
                # written by whichever thread owned the user: often another core's cache
                prefetch_row(saved_rows, user_segment_of[ahead])
            b, negative = sample_at(sample_of, num_samples, pos)
            g = -grad_of[b] if negative else grad_of[b]
            add_sample(grad, g, saved_rows[user_segment_of[b]], w, reg_scale, use_reg)
            grad_bias += g + reg_scale * own_bias if use_reg else g
        update_row(weight, state, row, grad, optimizer, lr, eps)
        if has_bias:
            update_scalar(bias, bias_state, row, grad_bias, optimizer, lr, eps)


# --------------------------------------------------------------------------------------------
# Tensor-level plumbing
#
# Validation is split for speed: the structural checks below are cheap attribute tests; the
# ones that read every value (ids in range, finite targets) run inside the kernels, which
# report a problem before writing anything. Whenever a fast test fails, the shared checks
# in fastmf.ops.checks run and raise their own error, so messages match the other backends.

Tensor = torch.Tensor
# Below this many samples the kernels run on the calling thread alone: waking the pool
# costs more than it saves, and on a busy machine a parallel region can stall for a whole
# scheduler slice waiting for a thread that is not running.
PARALLEL_MIN_SAMPLES = 1024
WEIGHT_DTYPES = (torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def require_cpu(op: str, names: tuple, tensors: tuple) -> None:
    for name, t in zip(names, tensors):
        if isinstance(t, Tensor) and not t.is_cpu:
            raise ValueError(
                f"fastmf.{op}: {name} is on {t.device}; the numba backend runs on CPU tensors "
                "only; use backend='native' for CUDA"
            )


def is_ids(ids, length=None) -> bool:
    return (isinstance(ids, Tensor) and ids.dtype in ID_DTYPES and ids.ndim == 1
            and (length is None or ids.shape[0] == length))


def is_table(t, dtype, shape) -> bool:
    return isinstance(t, Tensor) and t.dtype == dtype and t.shape == shape


def tables_ok(users, items, user_factors, item_factors, user_bias, item_bias) -> bool:
    """The structure ``checks.check_mf_inputs`` demands, without reading any value."""
    if not (isinstance(user_factors, Tensor) and isinstance(item_factors, Tensor)):
        return False
    dtype = user_factors.dtype
    if (dtype not in WEIGHT_DTYPES or item_factors.dtype != dtype or user_factors.ndim != 2
            or item_factors.ndim != 2 or user_factors.shape[1] != item_factors.shape[1]):
        return False
    if (user_bias is None) != (item_bias is None):
        return False
    if user_bias is not None and not (
        is_table(user_bias, dtype, user_factors.shape[:1])
        and is_table(item_bias, dtype, item_factors.shape[:1])
    ):
        return False
    return is_ids(users) and is_ids(items, users.shape[0])


def states_ok(tables, states, optimizer) -> bool:
    """Each present table's optimizer state has its dtype and shape (row-wise Adagrad: one
    value per row); SGD has no states."""
    if optimizer == SGD:
        return True
    for table, state in zip(tables, states):
        if table is not None and not is_table(
            state, table.dtype, table.shape[:1] if optimizer == ROWWISE else table.shape
        ):
            return False
    return True


def codes_ok(loss_enum, loss: int, optimizer: int) -> bool:
    """Whether the loss and optimizer codes name members (without raising)."""
    return 0 <= loss < len(loss_enum) and 0 <= optimizer < len(STEP_OPTIMIZERS)


def ids_view(ids: torch.Tensor) -> np.ndarray:
    """ids as a contiguous int64 array (one compiled signature for both id dtypes)."""
    return ids.to(torch.int64).contiguous().numpy()


def read_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


@jit
def _weights_valid(weights) -> bool:
    for w in weights:
        if not (w >= 0 and w != np.inf):  # NaN fails w >= 0
            return False
    return True


def check_weights(op: str, weights, user_factors: torch.Tensor, users: torch.Tensor) -> None:
    """:func:`fastmf.ops.checks.check_step_weights` at the cost of one compiled pass over
    the weights when they are good (its torch ops cost a 8192-sample step ~20 %); the full
    check, and its message, otherwise."""
    if weights is None:
        return
    if (isinstance(weights, torch.Tensor) and weights.dtype == user_factors.dtype
            and weights.dim() == 1 and weights.device == user_factors.device
            and weights.shape[0] == users.shape[0] and weights.device.type == "cpu"
            and _weights_valid(read_view(weights))):
        return
    checks.check_step_weights(op, weights, user_factors, users)


def weights_view(weights: torch.Tensor | None, like: np.ndarray) -> tuple[np.ndarray, bool]:
    """(array, has_weights) of a fused step's optional per-sample weights: an empty array
    of the tables' dtype for None, so both cases share one compiled signature."""
    if weights is None:
        return np.empty(0, like.dtype), False
    return read_view(weights), True


class Writable:
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


def absent(like: np.ndarray, ndim: int) -> np.ndarray:
    """An empty stand-in for an absent table or state, typed like ``like`` so the kernel
    keeps one compiled signature."""
    return np.empty((0,) * ndim, dtype=like.dtype)


def launch(kernel, num_samples: int, *args, pass_threads: bool = False):
    """``kernel(*args)`` (with the thread count appended when ``pass_threads``), serial for
    small batches. Results do not depend on the thread count."""
    threads = numba.get_num_threads()
    serial = threads > 1 and num_samples < PARALLEL_MIN_SAMPLES
    if serial:
        numba.set_num_threads(1)
    try:
        return kernel(*args, 1 if serial else threads) if pass_threads else kernel(*args)
    finally:
        if serial:
            numba.set_num_threads(threads)


def raise_if_rejected(op: str, status: int, full_checks) -> None:
    """After a kernel: a status other than OK means it found a bad id or target; the shared
    checks then raise their own error. Should they pass, the kernel and the checks
    disagree: a bug here."""
    if status != OK:
        full_checks()
        raise RuntimeError(
            f"fastmf.{op}: the numba kernel rejected inputs that passed the checks")


# --------------------------------------------------------------------------------------------
# The fused steps' Python side


def step_arguments(op: str, tables, states, optimizer, reg: float):
    """The bundles of a fused step unpacked: ``(tables, states, optimizer code, lr, eps)``,
    tables and states as 4-tuples (states all None when not given). The settings are
    checked here (finite, >= 0), before any kernel runs."""
    lr, eps = optimizer.lr, optimizer.eps
    code = int(parse(Optimizer, optimizer.optimizer, op, "optimizer"))
    checks.check_settings(op, lr=lr, eps=eps, reg=reg)
    states = tuple(states) if states is not None else (None,) * 4
    return tuple(tables), states, code, lr, eps


def step_arrays(tables, states, optimizer, write_user_bias=True):
    """The arrays a fused step kernel updates in place, ``(writable, arrays)``: arrays are
    ``P, Q, b_u, b_i, P_state, Q_state, b_u_state, b_i_state`` with empty stand-ins for
    absent ones (row-wise factor states as (N, 1)); ``writable`` commits them back. With
    ``write_user_bias`` false the user bias and its state are left out (never written)."""
    user_factors, item_factors, user_bias, item_bias = tables
    writable = [Writable(user_factors), Writable(item_factors)]
    empty1 = absent(writable[0].array, 1)
    empty2 = absent(writable[0].array, 2)

    def add(tensor, shape=None, absent=empty1):
        if tensor is None:
            return absent
        writable.append(Writable(tensor, shape))
        return writable[-1].array

    has_bias = item_bias is not None
    arrays = [writable[0].array, writable[1].array,
              add(user_bias if write_user_bias else None), add(item_bias)]
    if optimizer == SGD:
        return writable, arrays + [empty2, empty2, empty1, empty1]
    rowwise = optimizer == ROWWISE
    arrays += [add(states[0], (user_factors.shape[0], 1) if rowwise else None),
               add(states[1], (item_factors.shape[0], 1) if rowwise else None),
               add(states[2] if has_bias and write_user_bias else None),
               add(states[3] if has_bias else None)]
    return writable, arrays


def run_step(op: str, kernel, num_samples: int, args: tuple, writable, full_checks, dtype):
    """Launch a fused step ``kernel(*args, num_threads) -> (status, loss)``; on success
    commit the ``writable`` tables and return the loss as a 0-d tensor of ``dtype``."""
    status, total = launch(kernel, num_samples, *args, pass_threads=True)
    raise_if_rejected(op, status, full_checks)
    for w in writable:
        w.commit()
    return torch.tensor(total, dtype=dtype)
