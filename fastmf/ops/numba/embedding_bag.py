"""Numba CPU backend of the embedding_bag op family: bag forward, its backward, the dense
gradient of a row gather (``scatter_rows``), a batch's distinct rows as bags
(``unique_bags``), the exact
deduplicated sparse step (``sparse_update``) and the backward fused with that step
(``embedding_bag_backward_update``), as ``@njit`` code over numpy views of CPU tensors.

Same functions, arguments, numbers and checks as :mod:`fastmf.ops.reference.embedding_bag`
(its module docstring is the math). How the results stay the reference's, bit for bit
where the arithmetic is the same:

- forward: one bag per work item, rows added in index order from zero, MEAN divides by the
  bag size; backward: ``grad_output[bag(j)]`` times the per-sample weight, or divided by the
  bag size, as the reference forms each row.
- the sparse step groups the ids with ``group_into`` (stable: occurrence order), sums each
  unique id's gradient terms in that order from zero, then updates the row once; segments
  are independent, so the result does not depend on the thread count. Every scalar
  (``1 - beta1``, the bias corrections, ``lr * weight_decay``, ...) is formed in double as
  the reference forms it and rounded once to the accumulation type.
- ``embedding_bag_backward_update`` is that step with the gradient terms formed on the fly
  from ``grad_output`` (the reference's rows, never stored); ``sparse_update`` is the same
  kernel with one "bag" per gradient row.
- float16/bfloat16 tables are passed as their uint16 bits (numpy has no bfloat16), widened
  to float32 exactly and written back rounded to nearest even as PyTorch rounds, or with the
  counter-based stochastic rounding of :func:`fastmf.ops.reference.embedding_bag.
  stochastic_round` (splitmix64 per row and murmur3's fmix32 per column, the same bits for
  the same (seed, step, row, column)).

What differs from the reference is rounding only, in the optimizer updates: the square root
here is correctly rounded and PyTorch's vectorised one is not always (Adagrad and Adam rows
can differ in the last bit), and the row-wise optimizers' ``mean_k(g²)`` is summed
sequentially, not in PyTorch's vectorised order. SGD steps, the forward and the backward
are the reference's bits.

Kernels compile on first call (``cache=True`` keeps them across runs): ids and offsets are
widened to int64, half gradients to float32 (exactly), so there is one signature per weight
storage kind (float32, float64, uint16 bits).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import prange, types
from numba.extending import overload

from fastmf.ops import checks
from fastmf.ops.codes import Optimizer, Pooling, WeightDecay, parse
from fastmf.ops.numba._common import (
    BAD_IDS,
    BFLOAT16,
    FLOAT16,
    OK,
    PLAIN,
    PREFETCH_SAMPLES,
    PREFETCH_SEGMENTS,
    Writable,
    absent,
    bfloat16_to_float32,
    cast_like,
    chunk_bounds,
    float16_to_float32,
    float32_bits,
    float32_from_bits,
    float32_to_bfloat16,
    float32_to_float16,
    group_into,
    ids_view,
    inline_jit,
    is_ids,
    jit,
    launch,
    pjit,
    prefetch_row,
    raise_if_rejected,
    read_view,
    require_cpu,
    round_to_half,
)
from fastmf.ops.reference.embedding_bag import update_pair

__all__ = ["embedding_bag_backward", "embedding_bag_backward_update",
           "embedding_bag_backward_update_pair", "embedding_bag_forward", "scatter_rows",
           "sparse_update", "unique_bags"]

Tensor = torch.Tensor

_SGD = int(Optimizer.SGD)
_ADAGRAD = int(Optimizer.ADAGRAD)
_ROWWISE_ADAGRAD = int(Optimizer.ROWWISE_ADAGRAD)
_ADAM = int(Optimizer.ADAM)
_NONE, _L2, _DECOUPLED = int(WeightDecay.NONE), int(WeightDecay.L2), int(WeightDecay.DECOUPLED)
_SUM, _MEAN = int(Pooling.SUM), int(Pooling.MEAN)
# A kernel status beside _common's: offsets that are not CSR bags (found before any write).
BAD_OFFSETS = 3
# Bags per parallel work item of the forward and backward kernels.
_BAG_BLOCK = 256

# The optimizer scalars, formed in double on the Python side (see _settings).
(_LR, _EPS, _WD, _LR_WD, _BETA1, _ONE_MINUS_BETA1, _BETA2, _ONE_MINUS_BETA2, _ADAM_STEP,
 _BIAS_CORRECTION2, _ROWWISE_ADAM_STEP, _NUM_SETTINGS) = range(12)

_MASK64 = (1 << 64) - 1
_LOW32 = np.uint64(0xFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_COL_MIX = np.uint64(0x9E3779B9)
_FMIX1 = np.uint64(0x85EBCA6B)
_FMIX2 = np.uint64(0xC2B2AE35)
_F16_CUT = np.uint64(0xFFFFE000)  # clears the 13 bits float16 drops from a float32
_BF16_CUT = np.uint64(0xFFFF0000)  # clears the 16 bits bfloat16 drops
_F16_MAX = np.float32(65504.0)
_F16_MIN_NORMAL = np.float32(2.0 ** -14)


# --------------------------------------------------------------------------------------------
# Stochastic rounding (the reference's random_bits / stochastic_round, element by element)


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _stream_key(seed: int, step: int) -> np.uint64:
    """``splitmix64(splitmix64(seed) ^ step)``: the key of a step's random bits."""
    return np.uint64(_splitmix64_int(_splitmix64_int(seed & _MASK64) ^ (step & _MASK64)))


@jit
def _splitmix64(x):
    """splitmix64 of the uint64 ``x`` (uint64 arithmetic wraps)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@jit
def _element_bits(row_bits, col):
    """``fmix32(row_bits ^ col * 0x9E3779B9)`` in uint64 held to 32 bits (csrc/counter_hash.h
    element_bits)."""
    h = row_bits ^ ((np.uint64(col) * _COL_MIX) & _LOW32)
    h ^= h >> np.uint64(16)
    h = (h * _FMIX1) & _LOW32
    h ^= h >> np.uint64(13)
    h = (h * _FMIX2) & _LOW32
    return h ^ (h >> np.uint64(16))


@jit
def _stochastic_float16(v, bits):
    """float16 bits of the float32 ``v`` rounded with the 32 random ``bits`` (uint64): 13 of
    them added below float16's precision, then cut; outside float16's normal range, and
    for non-finite values, to nearest."""
    magnitude = abs(v)
    if not magnitude < _F16_MAX or magnitude < _F16_MIN_NORMAL:
        return float32_to_float16(v)
    cut = (float32_bits(v) + (bits >> np.uint64(19))) & _F16_CUT
    return float32_to_float16(float32_from_bits(cut))


@jit
def _stochastic_bfloat16(v, bits):
    """bfloat16 bits of the float32 ``v`` rounded with the 32 random ``bits``: 16 of them
    added below bfloat16's precision, then cut; non-finite values, and values the rounding
    would carry to inf, to nearest."""
    if not np.isfinite(v):
        return float32_to_bfloat16(v)
    cut = (float32_bits(v) + (bits >> np.uint64(16))) & _BF16_CUT
    if not np.isfinite(float32_from_bits(cut)):
        return float32_to_bfloat16(v)
    return np.uint16(cut >> np.uint64(16))


# --------------------------------------------------------------------------------------------
# Row access by storage kind: float32/float64 rows are used in place; uint16 rows (half
# tables) are widened into a float32 scratch row and narrowed back.


def _load_row(src, scratch, kind):
    """The row ``src`` in its accumulation type: ``src`` itself for a float table, else
    ``scratch`` (K,) float32 filled from the half bits (inside jitted code only)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_load_row)
def _load_row_impl(src, scratch, kind):
    if src.dtype != types.uint16:
        return lambda src, scratch, kind: src

    def impl(src, scratch, kind):
        if kind == BFLOAT16:
            for k in range(src.shape[0]):
                scratch[k] = bfloat16_to_float32(src[k])
        else:
            for k in range(src.shape[0]):
                scratch[k] = float16_to_float32(src[k])
        return scratch

    return impl


def _store_row(dst, values, kind, stochastic, key, row):
    """Write ``values`` (what ``_load_row`` returned, updated) back to the table row ``dst``:
    nothing to do for a float table (they are the row); for half bits rounded to nearest,
    or stochastically with element k's bits ``_element_bits(low32(splitmix64(key ^ row)),
    k)`` (inside jitted code only)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_store_row)
def _store_row_impl(dst, values, kind, stochastic, key, row):
    if dst.dtype != types.uint16:
        def in_place(dst, values, kind, stochastic, key, row):
            return None

        return in_place

    def impl(dst, values, kind, stochastic, key, row):
        n = dst.shape[0]
        if stochastic:
            row_bits = _splitmix64(key ^ np.uint64(row)) & _LOW32
            if kind == FLOAT16:
                for k in range(n):
                    dst[k] = _stochastic_float16(values[k], _element_bits(row_bits, k))
            else:
                for k in range(n):
                    dst[k] = _stochastic_bfloat16(values[k], _element_bits(row_bits, k))
        elif kind == FLOAT16:
            for k in range(n):
                dst[k] = float32_to_float16(values[k])
        else:
            for k in range(n):
                dst[k] = float32_to_bfloat16(values[k])

    return impl


# --------------------------------------------------------------------------------------------
# Kernels. Each returns a status: OK, or BAD_OFFSETS / BAD_IDS found before it wrote
# anything the caller passed in, so that the caller raises the checks' own error.


@jit
def _offsets_valid(offsets, num_indices):
    """CSR bags: offsets (B+1,) start at 0, never decrease and end at ``num_indices``
    (so every offset indexes within the ids). B + 1 >= 1."""
    if offsets[0] != 0:
        return False
    for b in range(offsets.shape[0] - 1):
        if offsets[b + 1] < offsets[b]:
            return False
    return offsets[offsets.shape[0] - 1] == num_indices


@jit
def _forward_bags(weight, kind, indices, offsets, psw, has_psw, mean, first, last, out):
    """Bags [first, last) of ``_forward_kernel``; False (nothing computed) when one of
    their ids is out of range."""
    num_rows = weight.shape[0]
    dim = out.shape[1]
    end = offsets[last]
    for j in range(offsets[first], end):
        if indices[j] < 0 or indices[j] >= num_rows:
            return False
    scratch = np.empty(dim, out.dtype)
    for b in range(first, last):
        acc = out[b]
        for k in range(dim):
            acc[k] = 0
        for j in range(offsets[b], offsets[b + 1]):
            if j + PREFETCH_SAMPLES < end:
                prefetch_row(weight, indices[j + PREFETCH_SAMPLES])
            row = _load_row(weight[indices[j]], scratch, kind)
            if has_psw:
                scale = psw[j]
                for k in range(dim):
                    acc[k] += row[k] * scale
            else:
                for k in range(dim):
                    acc[k] += row[k]
        size = offsets[b + 1] - offsets[b]
        if mean and size > 0:
            divisor = cast_like(acc, size)
            for k in range(dim):
                acc[k] = acc[k] / divisor
    return True


@pjit
def _forward_kernel(weight, kind, indices, offsets, psw, has_psw, mean, out):
    """out[b] (B, K) = sum over the bag's ids j ascending of psw[j] * weight[indices[j]]
    (or the plain rows), from zero, divided by the bag size for MEAN; empty bags give 0.
    ``weight`` float32/float64 or uint16 bits of ``kind``; ``out`` in the accumulation
    type. Each block of bags checks its ids before it reads a row."""
    if not _offsets_valid(offsets, indices.shape[0]):
        return BAD_OFFSETS
    num_bags = offsets.shape[0] - 1
    good = np.ones((num_bags + _BAG_BLOCK - 1) // _BAG_BLOCK, np.bool_)
    for blk in prange(good.shape[0]):
        good[blk] = _forward_bags(weight, kind, indices, offsets, psw, has_psw, mean,
                                  blk * _BAG_BLOCK, min(num_bags, (blk + 1) * _BAG_BLOCK),
                                  out)
    return OK if good.all() else BAD_IDS


@jit
def _backward_bags(grad_output, grad_kind, offsets, psw, has_psw, mean, first, last, rows):
    """Bags [first, last) of ``_backward_kernel``."""
    dim = rows.shape[1]
    for b in range(first, last):
        src = grad_output[b]
        divisor = round_to_half(cast_like(src, offsets[b + 1] - offsets[b]), grad_kind)
        for j in range(offsets[b], offsets[b + 1]):
            dst = rows[j]
            if has_psw:
                scale = psw[j]
                for k in range(dim):
                    dst[k] = round_to_half(src[k] * scale, grad_kind)
            elif mean:
                for k in range(dim):
                    dst[k] = round_to_half(src[k] / divisor, grad_kind)
            else:
                for k in range(dim):
                    dst[k] = src[k]


@pjit
def _backward_kernel(grad_output, grad_kind, offsets, num_indices, psw, has_psw, mean, rows):
    """rows[j] (L, K) = grad_output[bag(j)] * psw[j], or / the bag size for MEAN, or the
    plain row; each product or quotient rounded to ``grad_kind``'s half type when the
    gradient is a half tensor passed as float32 (as PyTorch's half arithmetic rounds)."""
    if not _offsets_valid(offsets, num_indices):
        return BAD_OFFSETS
    num_bags = offsets.shape[0] - 1
    for blk in prange((num_bags + _BAG_BLOCK - 1) // _BAG_BLOCK):
        _backward_bags(grad_output, grad_kind, offsets, psw, has_psw, mean, blk * _BAG_BLOCK,
                       min(num_bags, (blk + 1) * _BAG_BLOCK), rows)
    return OK


@inline_jit
def _add_terms(g, grad, b, j, offsets, psw, has_psw, mean, grad_kind):
    """g += the gradient term of index j in bag b: grad[b] * psw[j], grad[b] / size(b) for
    MEAN, else grad[b]; formed as the reference forms its rows (rounded to a half type for a
    half gradient), then added."""
    src = grad[b]
    dim = g.shape[0]
    if has_psw:
        scale = psw[j]
        if grad_kind == PLAIN:
            for k in range(dim):
                g[k] += src[k] * scale
        else:
            for k in range(dim):
                g[k] += round_to_half(src[k] * scale, grad_kind)
    elif mean:
        divisor = round_to_half(cast_like(g, offsets[b + 1] - offsets[b]), grad_kind)
        if grad_kind == PLAIN:
            for k in range(dim):
                g[k] += src[k] / divisor
        else:
            for k in range(dim):
                g[k] += round_to_half(src[k] / divisor, grad_kind)
    else:
        for k in range(dim):
            g[k] += src[k]


@inline_jit
def _prefetch_segment(weight, state1, state2, sorted_ids, starts, num_segments, s):
    """Prefetch what the update of segment ``s`` touches (if there is one)."""
    if s < num_segments:
        row = sorted_ids[starts[s]]
        prefetch_row(weight, row)
        if state1.shape[0] > 0:
            prefetch_row(state1, row)
        if state2.shape[0] > 0:
            prefetch_row(state2, row)


@jit
def _square_mean(g):
    """mean_k(g²) of the row ``g`` (K,), summed in order."""
    total = cast_like(g, 0.0)
    for k in range(g.shape[0]):
        total += g[k] * g[k]
    return total / cast_like(g, g.shape[0])


@inline_jit
def _step_row(w, g, state1, state2, row, optimizer, decay_mode, scalars):
    """One step of the row ``w`` (K,) with its summed gradient ``g`` (K,), both in the
    accumulation type, in place (``g`` too, by L2 decay). States as ``sparse_update`` takes
    them, per-row ones viewed as (N, 1); ``scalars`` the _settings in that type."""
    dim = w.shape[0]
    lr = scalars[_LR]
    eps = scalars[_EPS]
    if decay_mode == _L2:
        decay = scalars[_WD]
        for k in range(dim):
            g[k] = g[k] + decay * w[k]
    elif decay_mode == _DECOUPLED:
        shrink = scalars[_LR_WD]
        for k in range(dim):
            w[k] = w[k] - shrink * w[k]
    if optimizer == _SGD:
        for k in range(dim):
            w[k] = w[k] - lr * g[k]
    elif optimizer == _ADAGRAD:
        acc = state1[row]
        for k in range(dim):
            sum_square = acc[k] + g[k] * g[k]
            acc[k] = sum_square
            w[k] = w[k] - lr * g[k] / (np.sqrt(sum_square) + eps)
    elif optimizer == _ROWWISE_ADAGRAD:
        sum_square = state1[row, 0] + _square_mean(g)
        state1[row, 0] = sum_square
        denom = np.sqrt(sum_square) + eps
        for k in range(dim):
            w[k] = w[k] - lr * g[k] / denom
    else:
        beta1 = scalars[_BETA1]
        one_minus_beta1 = scalars[_ONE_MINUS_BETA1]
        beta2 = scalars[_BETA2]
        one_minus_beta2 = scalars[_ONE_MINUS_BETA2]
        exp_avg = state1[row]
        if optimizer == _ADAM:
            step_size = scalars[_ADAM_STEP]
            exp_avg_sq = state2[row]
            for k in range(dim):
                m = beta1 * exp_avg[k] + one_minus_beta1 * g[k]
                v = beta2 * exp_avg_sq[k] + one_minus_beta2 * (g[k] * g[k])
                exp_avg[k] = m
                exp_avg_sq[k] = v
                w[k] = w[k] - step_size * m / (np.sqrt(v) + eps)
        else:
            v = beta2 * state2[row, 0] + one_minus_beta2 * _square_mean(g)
            state2[row, 0] = v
            denom = np.sqrt(v / scalars[_BIAS_CORRECTION2]) + eps
            step_size = scalars[_ROWWISE_ADAM_STEP]
            for k in range(dim):
                m = beta1 * exp_avg[k] + one_minus_beta1 * g[k]
                exp_avg[k] = m
                w[k] = w[k] - step_size * m / denom


@jit
def _update_segments(weight, kind, state1, state2, grad, grad_kind, offsets, bag_of, per_bag,
                     psw, has_psw, mean, optimizer, decay_mode, scalars, stochastic, key,
                     sorted_ids, order, starts, num_segments, first, last):
    """Segments [first, last) of ``_update_kernel``: each one's terms summed in order of
    occurrence, then one step of its row."""
    dim = weight.shape[1]
    g = np.empty(dim, grad.dtype)
    scratch = np.empty(dim, grad.dtype)
    last_pos = starts[last]
    for s in range(first, last):
        _prefetch_segment(weight, state1, state2, sorted_ids, starts, num_segments,
                          s + PREFETCH_SEGMENTS)
        for k in range(dim):
            g[k] = 0
        for pos in range(starts[s], starts[s + 1]):
            ahead = pos + PREFETCH_SAMPLES
            if ahead < last_pos:
                prefetch_row(grad, bag_of[order[ahead]] if per_bag else order[ahead])
            j = order[pos]
            _add_terms(g, grad, bag_of[j] if per_bag else j, j, offsets, psw, has_psw, mean,
                       grad_kind)
        row = sorted_ids[starts[s]]
        w = _load_row(weight[row], scratch, kind)
        _step_row(w, g, state1, state2, row, optimizer, decay_mode, scalars)
        _store_row(weight[row], w, kind, stochastic, key, row)


@pjit
def _update_kernel(weight, kind, state1, state2, grad, grad_kind, indices, offsets, per_bag,
                   psw, has_psw, mean, optimizer, decay_mode, settings, stochastic, key,
                   num_threads):
    """In place: one step per unique id of ``indices`` (L,) with the sum of its gradient
    terms in order of occurrence. ``per_bag``: ``grad`` (B, K) is the bag gradient and
    index j's term is formed from row bag(j) (see ``_add_terms``); else ``grad`` (L, K)
    holds one row per index (``offsets``, ``psw`` unused). ``weight`` (N, K) float32/
    float64 or uint16 bits of ``kind``; states (N, K), (N, 1) or empty, in ``grad``'s
    type; ``settings`` (_NUM_SETTINGS,) float64; ``key`` the stochastic-rounding key."""
    n = indices.shape[0]
    bag_of = np.empty(n if per_bag else 0, np.int64)
    if per_bag:
        if not _offsets_valid(offsets, n):
            return BAD_OFFSETS
        for b in range(offsets.shape[0] - 1):
            for j in range(offsets[b], offsets[b + 1]):
                bag_of[j] = b
    sorted_ids = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    num_segments = group_into(indices, weight.shape[0], sorted_ids, order, starts)
    if num_segments < 0:
        return BAD_IDS
    scalars = np.empty(_NUM_SETTINGS, grad.dtype)
    for i in range(_NUM_SETTINGS):
        scalars[i] = settings[i]
    bounds = chunk_bounds(starts, num_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        _update_segments(weight, kind, state1, state2, grad, grad_kind, offsets, bag_of,
                         per_bag, psw, has_psw, mean, optimizer, decay_mode, scalars,
                         stochastic, key, sorted_ids, order, starts, num_segments, bounds[c],
                         bounds[c + 1])
    return OK


# --------------------------------------------------------------------------------------------
# Tensor-level API. The structural checks below read no value; offsets and ids are checked
# inside the kernels before anything is written. Whenever either finds a problem, the
# shared checks in fastmf.ops.checks run and raise their own error (the reference's).

_HALF_KINDS = {torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}


def _kind(dtype: torch.dtype) -> int:
    return _HALF_KINDS.get(dtype, PLAIN)


def _is_float_table(t, dims) -> bool:
    return isinstance(t, Tensor) and t.dtype in checks.EMBEDDING_DTYPES and t.ndim in dims


def _bags_ok(indices, offsets, per_sample_weights, pooling: int, psw_dtype) -> bool:
    """The structure ``checks.check_bag_structure`` demands, without reading any value."""
    if not (is_ids(indices) and is_ids(offsets) and offsets.dtype == indices.dtype
            and offsets.shape[0] >= 1):
        return False
    return per_sample_weights is None or (
        pooling == _SUM and isinstance(per_sample_weights, Tensor)
        and per_sample_weights.dtype == psw_dtype
        and per_sample_weights.shape == indices.shape)


def _grad_ok(grad, weight) -> bool:
    """A gradient's dtype fits the weight's (``checks.check_grad_rows_dtype``)."""
    return grad.dtype == weight.dtype or (grad.dtype == torch.float32
                                          and weight.dtype in checks.HALF_DTYPES)


def _full_checks_first(full_checks, cheap_checks) -> None:
    """Run ``cheap_checks``; should one raise, the full checks run first, so that the error
    is the one the reference raises for these inputs (its checks run in another order)."""
    try:
        cheap_checks()
    except (TypeError, ValueError, IndexError):
        full_checks()
        raise


def _acc_view(t: Tensor) -> np.ndarray:
    """A float gradient as an array of its accumulation type (half ones widened: exact)."""
    if t.dtype in checks.HALF_DTYPES:
        t = t.float()
    return read_view(t)


def _table_view(weight: Tensor) -> np.ndarray:
    """A table for reading: float32/float64 as is, float16/bfloat16 as their uint16 bits."""
    weight = weight.detach()
    if weight.dtype in checks.HALF_DTYPES:
        weight = weight.view(torch.uint16)
    return read_view(weight)


def embedding_bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor,
                          per_sample_weights: Tensor | None, pooling) -> Tensor:
    """``out[b] = Σ_{j in bag b} w_j · weight[indices[j]]`` (``w_j`` = per_sample_weights[j]
    or 1), divided by the bag size for MEAN; an empty bag gives zeros.

    weight (N, K) float32/float64/float16/bfloat16; indices (L,) and offsets (B+1,) int32/
    int64 CSR bags; per_sample_weights (L,) in the accumulation type, SUM only, or None.
    Returns (B, K) in the accumulation type (float32 for half tables).
    """
    op = "embedding_bag_forward"
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    require_cpu(op, ("weight", "indices", "offsets", "per_sample_weights"),
                (weight, indices, offsets, per_sample_weights))

    def full_checks():
        checks.check_embedding_bag_forward(op, weight, indices, offsets, per_sample_weights,
                                           pooling)

    if not (_is_float_table(weight, (2,)) and _bags_ok(
            indices, offsets, per_sample_weights, pooling,
            checks.accumulation_dtype(weight.dtype))):
        full_checks()
    acc = checks.accumulation_dtype(weight.dtype)
    out = torch.empty(offsets.shape[0] - 1, weight.shape[1], dtype=acc)
    table = _table_view(weight)
    has_psw = per_sample_weights is not None
    psw = read_view(per_sample_weights) if has_psw else absent(out.numpy(), 1)
    status = launch(_forward_kernel, indices.shape[0], table, _kind(weight.dtype),
                    ids_view(indices), ids_view(offsets), psw, has_psw, pooling == _MEAN,
                    out.numpy())
    raise_if_rejected(op, status, full_checks)
    return out


def embedding_bag_backward(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Tensor | None, pooling) -> Tensor:
    """The gradient rows of the forward w.r.t. the gathered weight rows: (L, K) in
    grad_output's dtype, ``grad_rows[j] = w_j · grad_output[bag(j)]`` (MEAN:
    ``grad_output[bag(j)] / size(bag(j))``).

    grad_output (B, K); indices (L,); offsets (B+1,); per_sample_weights (L,) like
    grad_output, or None.
    """
    op = "embedding_bag_backward"
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    require_cpu(op, ("grad_output", "indices", "offsets", "per_sample_weights"),
                (grad_output, indices, offsets, per_sample_weights))

    def full_checks():
        checks.check_embedding_bag_backward(op, grad_output, indices, offsets,
                                            per_sample_weights, pooling)

    if not (_is_float_table(grad_output, (2,))
            and _bags_ok(indices, offsets, per_sample_weights, pooling, grad_output.dtype)
            and grad_output.shape[0] == offsets.shape[0] - 1):
        full_checks()
    grads = _acc_view(grad_output)
    rows = np.empty((indices.shape[0], grad_output.shape[1]), grads.dtype)
    has_psw = per_sample_weights is not None
    psw = _acc_view(per_sample_weights) if has_psw else absent(grads, 1)
    status = launch(_backward_kernel, indices.shape[0], grads, _kind(grad_output.dtype),
                    ids_view(offsets), indices.shape[0], psw, has_psw, pooling == _MEAN, rows)
    raise_if_rejected(op, status, full_checks)
    # half gradients: the rows hold half values already, so this cast is exact
    return torch.from_numpy(rows).to(grad_output.dtype)


def _settings(lr, eps, beta1, beta2, weight_decay, step) -> np.ndarray:
    """The step's scalars in double, each formed as the reference forms it."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    settings = np.empty(_NUM_SETTINGS, np.float64)
    settings[_LR] = lr
    settings[_EPS] = eps
    settings[_WD] = weight_decay
    settings[_LR_WD] = lr * weight_decay
    settings[_BETA1] = beta1
    settings[_ONE_MINUS_BETA1] = 1 - beta1
    settings[_BETA2] = beta2
    settings[_ONE_MINUS_BETA2] = 1 - beta2
    settings[_ADAM_STEP] = lr * math.sqrt(bias_correction2) / bias_correction1
    settings[_BIAS_CORRECTION2] = bias_correction2
    settings[_ROWWISE_ADAM_STEP] = lr / bias_correction1
    return settings


def _run_update(op, full_checks, weight, state1, state2, grad, grad_kind, indices, offsets,
                psw, pooling, optimizer, lr, eps, beta1, beta2, weight_decay,
                weight_decay_mode, step, seed, stochastic_rounding) -> None:
    """Launch ``_update_kernel`` on checked inputs (``offsets`` None: one gradient row per
    index) and commit what it wrote."""
    num_rows = weight.shape[0]
    dim = weight.shape[1] if weight.ndim == 2 else 1
    kind = _kind(weight.dtype)
    table = weight.detach()
    if kind != PLAIN:
        table = table.view(torch.uint16)
    written = [Writable(table, (num_rows, dim))]
    grads = _acc_view(grad).reshape(grad.shape[0], dim)

    def state_array(state):
        if state is None:
            return absent(grads, 2)
        written.append(Writable(state, (num_rows, state.shape[1] if state.ndim == 2 else 1)))
        return written[-1].array

    per_bag = offsets is not None
    has_psw = psw is not None
    decay_mode = weight_decay_mode if weight_decay != 0 else _NONE
    status = launch(
        _update_kernel, indices.shape[0], written[0].array, kind, state_array(state1),
        state_array(state2), grads, grad_kind, ids_view(indices),
        ids_view(offsets) if per_bag else np.empty(0, np.int64), per_bag,
        _acc_view(psw) if has_psw else absent(grads, 1), has_psw, pooling == _MEAN,
        optimizer, decay_mode, _settings(lr, eps, beta1, beta2, weight_decay, step),
        bool(stochastic_rounding) and kind != PLAIN, _stream_key(seed, step),
        pass_threads=True)
    raise_if_rejected(op, status, full_checks)
    for w in written:
        w.commit()


def _parse_codes(op: str, optimizer, weight_decay_mode) -> tuple[int, int]:
    return (int(parse(Optimizer, optimizer, op, "optimizer")),
            int(parse(WeightDecay, weight_decay_mode, op, "weight_decay_mode")))


@torch.no_grad()
def sparse_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None, ids: Tensor,
                  grad_rows: Tensor, optimizer, lr: float, eps: float, beta1: float,
                  beta2: float, weight_decay: float, weight_decay_mode, step: int, seed: int,
                  stochastic_rounding: bool) -> None:
    """In place: the exact deduplicated sparse step. For each unique id, ``g`` = the sum of
    its ``grad_rows`` in order of occurrence; then one update of that row and its states
    (see :mod:`fastmf.ops.reference.embedding_bag`). An empty ``ids`` changes nothing.

    weight (N, K) or (N,); ids (L,) int32/int64; grad_rows (L, K) or (L,) in the weight's
    dtype (or float32 for float16/bfloat16 weights); states (state1, state2) as the
    optimizer needs them, in the accumulation type; ``step`` >= 1 (after incrementing).
    """
    op = "sparse_update"
    optimizer, weight_decay_mode = _parse_codes(op, optimizer, weight_decay_mode)
    require_cpu(op, ("weight", "state1", "state2", "ids", "grad_rows"),
                (weight, state1, state2, ids, grad_rows))
    settings = (optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode, step, seed)

    def full_checks():
        checks.check_sparse_update_inputs(op, weight, state1, state2, ids, grad_rows,
                                          *settings)

    checks.check_row_optimizer_args(op, *settings)
    if not (_is_float_table(weight, (1, 2)) and _is_float_table(grad_rows, (weight.ndim,))
            and _grad_ok(grad_rows, weight) and grad_rows.shape[1:] == weight.shape[1:]
            and is_ids(ids, grad_rows.shape[0])):
        full_checks()
    _full_checks_first(full_checks, lambda: checks.check_row_states(op, optimizer, weight,
                                                                    state1, state2))
    if ids.shape[0] == 0:
        return
    _run_update(op, full_checks, weight, state1, state2, grad_rows, PLAIN, ids, None, None,
                _SUM, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                step, seed, stochastic_rounding)


@torch.no_grad()
@jit
def _scatter_kernel(ids, rows, out):
    # One pass in index order: each row's terms are added as the reference adds them.
    dim = rows.shape[1]
    for j in range(ids.shape[0]):
        r = ids[j]
        for k in range(dim):
            out[r, k] += rows[j, k]


def scatter_rows(ids: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``out[ids[j]] += rows[j]`` in index order from zeros, in the accumulation type,
    returned in rows' dtype: see :func:`fastmf.ops.reference.embedding_bag.scatter_rows`.
    The reference's bits (the same adds in the same order)."""
    op = "scatter_rows"
    require_cpu(op, ("ids", "rows"), (ids, rows))
    checks.check_scatter_rows(op, ids, rows, num_rows)
    acc = checks.accumulation_dtype(rows.dtype)
    out = torch.zeros((int(num_rows),) + tuple(rows.shape[1:]), dtype=acc)
    n = ids.shape[0]
    if n and out.numel():
        _scatter_kernel(ids_view(ids), _acc_view(rows).reshape(n, -1),
                        out.numpy().reshape(int(num_rows), -1))
    return out.to(rows.dtype)


@jit
def _unique_rows_kernel(ids, num_rows, distinct, inverse):
    """The distinct ids (ascending) into ``distinct`` and each id's position among them into
    ``inverse``; returns their number, or -1 (nothing else done) for an id outside
    [0, num_rows)."""
    n = ids.shape[0]
    sorted_ids = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    num_distinct = group_into(ids, num_rows, sorted_ids, order, starts)
    for g in range(num_distinct):
        distinct[g] = sorted_ids[starts[g]]
        for j in range(starts[g], starts[g + 1]):
            inverse[order[j]] = g
    return num_distinct


@jit
def _bag_offsets_kernel(indptr, distinct, nnz, offsets):
    """Bag offsets of the rows ``distinct`` into ``offsets`` (D + 1,); returns the entries'
    total, or -(g + 1) for the first row g whose entries are not within [0, nnz)."""
    total = 0
    for g in range(distinct.shape[0]):
        offsets[g] = total
        start, end = indptr[distinct[g]], indptr[distinct[g] + 1]
        if not (0 <= start and start <= end and end <= nnz):
            return -(g + 1)
        total += end - start
    offsets[distinct.shape[0]] = total
    return total


@jit
def _copy_bags_kernel(indptr, distinct, offsets, indices, weights, bag_indices, bag_weights):
    for g in range(distinct.shape[0]):
        start = indptr[distinct[g]]
        at = offsets[g]
        for t in range(indptr[distinct[g] + 1] - start):
            bag_indices[at + t] = indices[start + t]
            bag_weights[at + t] = weights[start + t]


def unique_bags(ids: Tensor, indptr: Tensor, indices: Tensor,
                weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The bags of a batch's distinct rows of a CSR matrix, ``(distinct, inverse,
    bag_indices, bag_offsets, bag_weights)``: see
    :func:`fastmf.ops.reference.embedding_bag.unique_bags`. The reference's values (ids
    grouped by the stable ``group_into``; entries copied)."""
    op = "unique_bags"
    require_cpu(op, ("ids", "indptr", "indices", "weights"), (ids, indptr, indices, weights))
    checks.check_unique_bags(op, ids, indptr, indices, weights)
    n, num_rows, nnz = ids.shape[0], indptr.shape[0] - 1, indices.shape[0]
    distinct = torch.empty(n, dtype=torch.int64)
    inverse = torch.empty(n, dtype=torch.int64)
    num_distinct = _unique_rows_kernel(ids_view(ids), num_rows, distinct.numpy(),
                                       inverse.numpy()) if n else 0
    distinct = distinct[:num_distinct]
    ptr = ids_view(indptr)
    offsets = torch.empty(num_distinct + 1, dtype=torch.int64)
    total = _bag_offsets_kernel(ptr, distinct.numpy(), nnz, offsets.numpy())
    if total < 0:
        row = int(distinct[-total - 1])
        checks.check_bag_row(op, row, int(ptr[row]), int(ptr[row + 1]), nnz)
    checks.check_bag_total(op, total, indices.dtype)
    bag_indices = torch.empty(total, dtype=indices.dtype)
    bag_weights = torch.empty(total, dtype=weights.dtype)
    # Half weights move as their 16 bits (numpy has no bfloat16).
    bits = torch.int16 if weights.dtype in (torch.float16, torch.bfloat16) else weights.dtype
    _copy_bags_kernel(ptr, distinct.numpy(), offsets.numpy(), read_view(indices),
                      read_view(weights.view(bits)), bag_indices.numpy(),
                      bag_weights.view(bits).numpy())
    return distinct, inverse, bag_indices, offsets.to(indices.dtype), bag_weights


def embedding_bag_backward_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None,
                                  grad_output: Tensor, indices: Tensor, offsets: Tensor,
                                  per_sample_weights: Tensor | None, pooling, optimizer,
                                  lr: float, eps: float, beta1: float, beta2: float,
                                  weight_decay: float, weight_decay_mode, step: int, seed: int,
                                  stochastic_rounding: bool) -> None:
    """In place: the backward of :func:`embedding_bag_forward` fused with
    :func:`sparse_update`, the same numbers as their composition: the indices are grouped
    by id (stable) and each id's terms ``w_j · grad_output[bag(j)]`` (/ bag size) are summed
    in occurrence order as they are formed, without materialising the (L, K) rows.

    weight (N, K); grad_output (B, K) in the weight's dtype or float32 for half weights; the
    rest as in :func:`embedding_bag_forward` and :func:`sparse_update`.
    """
    op = "embedding_bag_backward_update"
    optimizer, weight_decay_mode = _parse_codes(op, optimizer, weight_decay_mode)
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    require_cpu(op, ("weight", "state1", "state2", "grad_output", "indices", "offsets",
                     "per_sample_weights"),
                (weight, state1, state2, grad_output, indices, offsets, per_sample_weights))
    settings = (optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode, step, seed)

    def full_checks():
        checks.check_backward_update_inputs(op, weight, state1, state2, grad_output, indices,
                                            offsets, per_sample_weights, pooling, *settings)

    checks.check_row_optimizer_args(op, *settings)
    if not (_is_float_table(weight, (2,)) and _is_float_table(grad_output, (2,))
            and _bags_ok(indices, offsets, per_sample_weights, pooling, grad_output.dtype)
            and grad_output.shape[0] == offsets.shape[0] - 1 and _grad_ok(grad_output, weight)
            and grad_output.shape[1] == weight.shape[1]):
        full_checks()
    _full_checks_first(full_checks, lambda: checks.check_row_states(op, optimizer, weight,
                                                                    state1, state2))
    if indices.shape[0] == 0:
        # nothing to write; the offsets are still the reference's to check
        full_checks()
        return
    _run_update(op, full_checks, weight, state1, state2, grad_output,
                _kind(grad_output.dtype), indices, offsets, per_sample_weights, pooling,
                optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode, step, seed,
                stochastic_rounding)


# Both tables checked, then each updated by the kernel above (the bags grouped per table).
embedding_bag_backward_update_pair = update_pair(embedding_bag_backward_update)
