"""The spec of the embedding_bag op family: bag forward (gather + pooling + per-sample
weights), its backward, the exact deduplicated sparse optimizer step (``sparse_update``) and
the backward fused with that step (``embedding_bag_backward_update``). The C++, Numba and
CUDA kernels are tested against these functions; each checks its inputs with
:mod:`fastmf.ops.checks`, before anything is written.

Bags are CSR: ``indices`` (L,) int32/int64 ids in [0, N); ``offsets`` (B+1,) of the same
dtype with ``offsets[0] == 0``, non-decreasing, ``offsets[B] == L``; bag b is
``indices[offsets[b]:offsets[b+1]]`` (possibly empty). ``pooling`` is a
:class:`~fastmf.ops.codes.Pooling` (or its code / name).

Types: ``weight`` (N, K) is float32, float64, float16 or bfloat16. Everything is computed in
the *accumulation type*, float64 for float64 weights and float32 otherwise; the bag output
has that type (so float16/bfloat16 tables give float32 outputs, FBGEMM's default), and so do
``per_sample_weights`` and every optimizer state. Sums run in index order (j ascending).

Optimizer states are a pair ``(state1, state2)``::

    SGD               (None, None)
    ADAGRAD           (sum (N, K), None)
    ROWWISE_ADAGRAD   (sum (N,), None)
    ADAM              (exp_avg (N, K), exp_avg_sq (N, K))
    ROWWISE_ADAM      (exp_avg (N, K), exp_avg_sq (N,))

The step of one unique row, with ``g`` the sum of its gradient rows (in order of occurrence)
and ``w`` the row before the step, both in the accumulation type, ``t`` = ``step``::

    L2 weight decay:         g += weight_decay * w
    DECOUPLED weight decay:  w -= lr * weight_decay * w
    SGD:              w -= lr * g
    ADAGRAD:          G += g²;  w -= lr * g / (√G + eps)
    ROWWISE_ADAGRAD:  G += mean_k(g²);  w -= lr * g / (√G + eps)
    ADAM (torch.optim.SparseAdam):
                      m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²
                      w -= (lr · √(1-b2^t) / (1-b1^t)) · m / (√v + eps)
    ROWWISE_ADAM (FBGEMM PARTIAL_ROWWISE_ADAM):
                      m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·mean_k(g²)
                      w -= (lr / (1-b1^t)) · m / (√(v / (1-b2^t)) + eps)

Note the two Adams place eps differently, each as its anchor does: torch's SparseAdam adds
eps to √v and folds √(1-b2^t) into the step size; FBGEMM adds it to the bias-corrected √v̂.
Scalars (lr, eps, betas, bias corrections) are computed in double and used in the
accumulation type. Rows the step does not touch are not changed (no decay either).

Writing back to a float16/bfloat16 weight: round to nearest even, or, with
``stochastic_rounding``, the counter-based stochastic rounding of :func:`stochastic_round`.

>>> import torch
>>> from fastmf.ops.reference import embedding_bag_forward
>>> w = torch.arange(6.0).view(3, 2)
>>> embedding_bag_forward(w, torch.tensor([0, 2, 2]), torch.tensor([0, 1, 3]), None, "sum")
tensor([[ 0.,  1.],
        [ 8., 10.]])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmf.ops import checks
from fastmf.ops.codes import Optimizer, Pooling, WeightDecay, parse

__all__ = ["embedding_bag_backward", "embedding_bag_backward_update",
           "embedding_bag_backward_update_pair", "embedding_bag_forward", "random_bits",
           "scatter_rows", "sparse_update", "stochastic_round", "unique_bags"]

_MASK64 = (1 << 64) - 1


def add_rows(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``out[index[j]] += rows[j]`` for every j (index int64), in place; returns ``out``.

    On the CPU ``index_add_`` adds a row's terms in index order, the order the spec asks
    for. On CUDA it adds them with atomics, in whatever order the threads land, so two
    calls on the same inputs can differ in the last bit (seen on an H200: ~1e-9 on a few of
    3,900 elements), and a test of the spec against itself fails. ``index_put_`` with
    ``accumulate=True`` sorts the index there and adds each row's terms in a fixed order:
    the same bits on every call."""
    if out.device.type == "cpu":
        return out.index_add_(0, index, rows)
    return out.index_put_((index,), rows, accumulate=True)


def _bags(offsets: Tensor, num_indices: int) -> tuple[Tensor, Tensor]:
    """(bag of each index (L,) int64, size of each bag (B,) int64)."""
    o = offsets.long()
    sizes = o[1:] - o[:-1]
    # index j is in the bag whose end is the first one past j (empty bags are skipped)
    bag = torch.searchsorted(o[1:], torch.arange(num_indices, device=offsets.device),
                             right=True)
    return bag, sizes


def embedding_bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor,
                          per_sample_weights: Tensor | None, pooling) -> Tensor:
    """``out[b] = Σ_{j in bag b} w_j · weight[indices[j]]`` (``w_j`` = per_sample_weights[j]
    or 1), divided by the bag size for MEAN; an empty bag gives zeros.

    weight (N, K); indices (L,); offsets (B+1,); per_sample_weights (L,) in the accumulation
    type, SUM only, or None. Returns (B, K) in the accumulation type.
    """
    op = "embedding_bag_forward"
    pooling = parse(Pooling, pooling, op, "pooling")
    checks.check_embedding_bag_forward(op, weight, indices, offsets, per_sample_weights,
                                       pooling)
    acc = checks.accumulation_dtype(weight.dtype)
    num_bags, dim = offsets.shape[0] - 1, weight.shape[1]
    bag, sizes = _bags(offsets, indices.shape[0])
    rows = weight.detach()[indices.long()].to(acc)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.detach().unsqueeze(1)
    out = torch.zeros(num_bags, dim, dtype=acc, device=weight.device)
    # Rows added in index order: the j-ascending sum the spec asks for.
    add_rows(out, bag, rows)
    if pooling == Pooling.MEAN:
        out = out / sizes.clamp(min=1).to(acc).unsqueeze(1)
    return out


def embedding_bag_backward(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Tensor | None, pooling) -> Tensor:
    """The gradient rows of the forward w.r.t. the gathered weight rows: (L, K) in
    grad_output's dtype, ``grad_rows[j] = w_j · grad_output[bag(j)]`` (MEAN:
    ``grad_output[bag(j)] / size(bag(j))``). These are the values of the weight's COO
    gradient, one row per index (uncoalesced), as ``nn.EmbeddingBag(sparse=True)`` gives.

    grad_output (B, K); indices (L,); offsets (B+1,); per_sample_weights (L,) or None.
    """
    op = "embedding_bag_backward"
    pooling = parse(Pooling, pooling, op, "pooling")
    checks.check_embedding_bag_backward(op, grad_output, indices, offsets, per_sample_weights,
                                        pooling)
    bag, sizes = _bags(offsets, indices.shape[0])
    rows = grad_output[bag]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    elif pooling == Pooling.MEAN:
        rows = rows / sizes[bag].to(grad_output.dtype).unsqueeze(1)
    return rows


def scatter_rows(ids: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``out[ids[j]] += rows[j]`` for every j in index order, starting from zeros of shape
    ``(num_rows, *rows.shape[1:])``: the dense gradient of the row gather ``table[ids]``
    (what ``index_select``'s backward forms with ``index_add_``). Summed in the accumulation
    type (float64 for float64 rows, else float32) and returned in rows' dtype; rows no id
    names are zeros.

    ids (L,) int32/int64 in [0, num_rows); rows (L,) or (L, K) float32/float64/float16/
    bfloat16 on the ids' device.
    """
    op = "scatter_rows"
    checks.check_scatter_rows(op, ids, rows, num_rows)
    acc = checks.accumulation_dtype(rows.dtype)
    out = torch.zeros((int(num_rows),) + tuple(rows.shape[1:]), dtype=acc, device=rows.device)
    add_rows(out, ids.long(), rows.to(acc))  # in index order: the order the spec asks for
    return out.to(rows.dtype)


def unique_bags(ids: Tensor, indptr: Tensor, indices: Tensor,
                weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The bags of a batch's distinct rows of a CSR matrix: ``(distinct, inverse,
    bag_indices, bag_offsets, bag_weights)``.

    ``distinct`` (D,) int64 holds the distinct ids of ``ids`` in ascending order and
    ``inverse`` (n,) int64 the position of each id among them (``distinct[inverse] ==
    ids``). Row r of the matrix is ``indices[indptr[r]:indptr[r + 1]]`` with
    ``weights[indptr[r]:indptr[r + 1]]``; the rows of ``distinct`` follow one another in
    that order as bags (the ops' CSR form): bag_indices (T,) like indices, bag_offsets
    (D + 1,) like indices from 0 to T, bag_weights (T,) like weights. What a model with side
    features pools for a step: each distinct user or item once, as the bag of its feature
    rows (fastmf.models' Hybrid).

    ids (n,), indptr (R + 1,), indices (nnz,) int32/int64; weights (nnz,) float; ids in
    [0, R); each named row's ``0 <= indptr[r] <= indptr[r + 1] <= nnz`` (other rows are not
    read).
    """
    op = "unique_bags"
    checks.check_unique_bags(op, ids, indptr, indices, weights)
    distinct, inverse = torch.unique(ids.long(), sorted=True, return_inverse=True)
    ptr = indptr.long()
    starts, ends = ptr[distinct], ptr[distinct + 1]
    checks.check_bag_rows(op, distinct, starts, ends, indices.shape[0])
    lengths = ends - starts
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    total = int(offsets[-1])
    checks.check_bag_total(op, total, indices.dtype)
    # Entry t of bag g is row distinct[g]'s entry starts[g] + (t - offsets[g]).
    pos = torch.arange(total, device=ids.device) + torch.repeat_interleave(
        starts - offsets[:-1], lengths, output_size=total)
    return (distinct, inverse, indices[pos], offsets.to(indices.dtype), weights[pos])


def per_sample_weights_grad(grad_output: Tensor, weight: Tensor, indices: Tensor,
                            offsets: Tensor) -> Tensor:
    """``grad_psw[j] = <grad_output[bag(j)], weight[indices[j]]>`` (L,), in grad_output's
    dtype (SUM pooling: the only one per-sample weights are allowed with)."""
    bag, _ = _bags(offsets, indices.shape[0])
    rows = weight.detach()[indices.long()].to(grad_output.dtype)
    return (grad_output[bag] * rows).sum(1)


# --- stochastic rounding ------------------------------------------------------------------

def _splitmix64_int(x: int) -> int:
    """splitmix64 on a plain Python int (uint64, wrapping)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _as_int64(x: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """splitmix64 on int64 tensors holding uint64 bits; int64 add/mul wrap mod 2**64 like
    uint64, and _shr masks the sign extension away."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def random_bits(rows: Tensor, num_cols: int, seed: int, step: int) -> Tensor:
    """The 32 random bits of every element (row r, column c) of a ``num_cols``-wide table at
    (seed, step)::

        key = splitmix64(splitmix64(seed) ^ step)             (uint64)
        row_bits = low32(splitmix64(key ^ r))                  (once per row)
        bits = fmix32(row_bits ^ (c * 0x9E3779B9 mod 2**32))   (murmur3's finalizer)

    splitmix64 per row and 32-bit work per element, which the CPU kernels run 8-16 lanes
    at a time (csrc/counter_hash.h element_bits). (R, num_cols) int64 in [0, 2**32)."""
    key = _splitmix64_int(_splitmix64_int(seed & _MASK64) ^ (step & _MASK64))
    row_bits = _splitmix64(rows.long() ^ _as_int64(key)) & 0xFFFFFFFF
    cols = (torch.arange(num_cols, device=rows.device) * 0x9E3779B9) & 0xFFFFFFFF
    return _fmix32(row_bits.unsqueeze(1) ^ cols)


def stochastic_round(values: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """float32 ``values`` rounded to float16/bfloat16 with the random ``bits`` (same shape,
    int64 in [0, 2**32)): add ``bits`` to the float32 bit pattern below the target's
    precision (13 bits for float16, 16 for bfloat16) and cut those bits (rounding the
    magnitude toward zero), so a value rounds up with probability equal to its distance
    from the lower neighbour: E[round(v)] = v.

    float16 (FBGEMM's rule): values that are not finite, ``|v| >= 65504`` or in float16's
    subnormal range ``|v| < 2**-14`` are cast to nearest instead. bfloat16: non-finite
    values, and values whose rounding up would overflow to inf, are cast to nearest.
    """
    if dtype == torch.float16:
        drop = 13
    elif dtype == torch.bfloat16:
        drop = 16
    else:
        raise TypeError(f"fastmf.stochastic_round: dtype must be float16 or bfloat16, got "
                        f"{dtype}")
    values = values.to(torch.float32).contiguous()
    pattern = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (pattern + _shr(bits, 32 - drop)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded)
    result = rounded.to(torch.int32).view(torch.float32)
    if dtype == torch.float16:
        magnitude = values.abs()
        plain = ~torch.isfinite(values) | (magnitude >= 65504.0) | (magnitude < 2.0 ** -14)
    else:
        plain = ~torch.isfinite(values) | ~torch.isfinite(result)
    return torch.where(plain, values, result).to(dtype)


def _write_rows(weight: Tensor, rows: Tensor, values: Tensor, seed: int, step: int,
                stochastic_rounding: bool) -> None:
    """weight[rows] = values (accumulation type), rounded to the weight's dtype."""
    if weight.dtype in checks.HALF_DTYPES and stochastic_rounding:
        num_cols = weight.shape[1] if weight.dim() == 2 else 1
        bits = random_bits(rows, num_cols, seed, step).view(values.shape)
        weight[rows] = stochastic_round(values, weight.dtype, bits)
    else:
        weight[rows] = values.to(weight.dtype)


# --- the sparse step ----------------------------------------------------------------------

def coalesce_ids(ids: Tensor, grad_rows: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Unique ids (ascending, int64) and the sum of each one's grad rows in order of
    occurrence, in the accumulation type ``acc``."""
    unique, inverse = torch.unique(ids.long(), return_inverse=True)
    summed = torch.zeros((unique.numel(),) + tuple(grad_rows.shape[1:]), dtype=acc,
                         device=grad_rows.device)
    add_rows(summed, inverse, grad_rows.to(acc))
    return unique, summed


def _row_mean(x: Tensor) -> Tensor:
    """mean_k over a row of a 2-D tensor; a 1-D tensor is its own per-row value."""
    return x.mean(1) if x.dim() == 2 else x


def _per_row(x: Tensor, like: Tensor) -> Tensor:
    """A per-row value (R,) broadcast against rows ``like`` (R, K) or (R,)."""
    return x.unsqueeze(1) if like.dim() == 2 else x


def _apply_step(weight, state1, state2, unique, g, optimizer, lr, eps, beta1, beta2,
                weight_decay, weight_decay_mode, step, seed, stochastic_rounding) -> None:
    """One update of the rows ``unique`` with their summed gradients ``g`` (accumulation
    type); arguments already checked."""
    w = weight[unique].to(g.dtype)
    if weight_decay_mode == WeightDecay.L2 and weight_decay != 0:
        g = g + weight_decay * w
    elif weight_decay_mode == WeightDecay.DECOUPLED and weight_decay != 0:
        w = w - lr * weight_decay * w
    if optimizer == Optimizer.SGD:
        w = w - lr * g
    elif optimizer in (Optimizer.ADAGRAD, Optimizer.ROWWISE_ADAGRAD):
        square = g * g if optimizer == Optimizer.ADAGRAD else _row_mean(g * g)
        sum_square = state1[unique] + square
        state1[unique] = sum_square
        denom = sum_square.sqrt() + eps
        if optimizer == Optimizer.ROWWISE_ADAGRAD:
            denom = _per_row(denom, g)
        w = w - lr * g / denom
    else:
        exp_avg = beta1 * state1[unique] + (1 - beta1) * g
        square = g * g if optimizer == Optimizer.ADAM else _row_mean(g * g)
        exp_avg_sq = beta2 * state2[unique] + (1 - beta2) * square
        state1[unique] = exp_avg
        state2[unique] = exp_avg_sq
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        if optimizer == Optimizer.ADAM:
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
            w = w - step_size * exp_avg / (exp_avg_sq.sqrt() + eps)
        else:
            denom = _per_row((exp_avg_sq / bias_correction2).sqrt() + eps, g)
            w = w - (lr / bias_correction1) * exp_avg / denom
    _write_rows(weight, unique, w, seed, step, stochastic_rounding)


def _parse_codes(op: str, optimizer, pooling=None, weight_decay_mode=WeightDecay.NONE):
    optimizer = parse(Optimizer, optimizer, op, "optimizer")
    weight_decay_mode = parse(WeightDecay, weight_decay_mode, op, "weight_decay_mode")
    if pooling is None:
        return optimizer, weight_decay_mode
    return optimizer, weight_decay_mode, parse(Pooling, pooling, op, "pooling")


@torch.no_grad()
def sparse_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None, ids: Tensor,
                  grad_rows: Tensor, optimizer, lr: float, eps: float, beta1: float,
                  beta2: float, weight_decay: float, weight_decay_mode, step: int, seed: int,
                  stochastic_rounding: bool) -> None:
    """In place: the exact deduplicated sparse step (see the module docstring). For each
    unique id, ascending, ``g`` = the sum of its ``grad_rows`` in order of occurrence; then
    one update of that row and its states. An empty ``ids`` changes nothing.

    weight (N, K) or (N,) (biases; row-wise variants then act element-wise); ids (L,)
    int32/int64; grad_rows (L, K) or (L,) in the weight's dtype (or float32 for
    float16/bfloat16 weights); states as in the module docstring; ``optimizer`` and
    ``weight_decay_mode`` members, codes or names. ``step`` is the optimizer's step count
    after incrementing it for this step (>= 1).
    """
    op = "sparse_update"
    optimizer, weight_decay_mode = _parse_codes(op, optimizer,
                                                weight_decay_mode=weight_decay_mode)
    checks.check_sparse_update_inputs(op, weight, state1, state2, ids, grad_rows, optimizer,
                                      lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                                      step, seed)
    if ids.numel() == 0:
        return
    unique, g = coalesce_ids(ids, grad_rows, checks.accumulation_dtype(weight.dtype))
    _apply_step(weight, state1, state2, unique, g, optimizer, lr, eps, beta1, beta2,
                weight_decay, weight_decay_mode, step, seed, bool(stochastic_rounding))


@torch.no_grad()
def embedding_bag_backward_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None,
                                  grad_output: Tensor, indices: Tensor, offsets: Tensor,
                                  per_sample_weights: Tensor | None, pooling, optimizer,
                                  lr: float, eps: float, beta1: float, beta2: float,
                                  weight_decay: float, weight_decay_mode, step: int, seed: int,
                                  stochastic_rounding: bool) -> None:
    """In place: the backward of :func:`embedding_bag_forward` fused with
    :func:`sparse_update` — the same numbers as
    ``sparse_update(weight, state1, state2, indices, embedding_bag_backward(grad_output,
    indices, offsets, per_sample_weights, pooling), ...)`` (a kernel groups the indices by
    id, stable, and sums ``w_j · grad_output[bag(j)]`` (/ bag size) per id in occurrence
    order without materialising the (L, K) rows; the spec writes the composition).

    weight (N, K); grad_output (B, K) in the accumulation type; the rest as in
    :func:`embedding_bag_forward` and :func:`sparse_update`.
    """
    op = "embedding_bag_backward_update"
    optimizer, weight_decay_mode, pooling = _parse_codes(op, optimizer, pooling,
                                                         weight_decay_mode)
    checks.check_backward_update_inputs(op, weight, state1, state2, grad_output, indices,
                                        offsets, per_sample_weights, pooling, optimizer, lr,
                                        eps, beta1, beta2, weight_decay, weight_decay_mode,
                                        step, seed)
    if indices.numel() == 0:
        return
    grad_rows = embedding_bag_backward(grad_output, indices, offsets, per_sample_weights,
                                       pooling)
    unique, g = coalesce_ids(indices, grad_rows, checks.accumulation_dtype(weight.dtype))
    _apply_step(weight, state1, state2, unique, g, optimizer, lr, eps, beta1, beta2,
                weight_decay, weight_decay_mode, step, seed, bool(stochastic_rounding))


def update_pair(update):
    """``embedding_bag_backward_update_pair`` of a backend from its
    ``embedding_bag_backward_update``: both tables checked, then ``update`` on each in
    turn."""

    def embedding_bag_backward_update_pair(
            weight: Tensor, state1: Tensor | None, state2: Tensor | None, grad_output: Tensor,
            weight_b: Tensor, state1_b: Tensor | None, state2_b: Tensor | None,
            grad_output_b: Tensor, indices: Tensor, offsets: Tensor,
            per_sample_weights: Tensor | None, pooling, optimizer, lr: float, eps: float,
            beta1: float, beta2: float, weight_decay: float, weight_decay_mode, step: int,
            seed: int, stochastic_rounding: bool, step_b: int, seed_b: int,
            stochastic_rounding_b: bool) -> None:
        """In place: :func:`embedding_bag_backward_update` of two tables pooled by the same
        bags (a table and its bias column), ``weight`` with ``grad_output``, ``step``,
        ``seed``, ``stochastic_rounding``, and ``weight_b`` with the ``_b`` ones; the same
        numbers as the two calls. The tables have the same number of rows and take the same
        optimizer settings. Every check of both runs before either is written; a kernel
        may read and group the bags once for both."""
        op = "embedding_bag_backward_update_pair"
        optimizer, weight_decay_mode, pooling = _parse_codes(op, optimizer, pooling,
                                                             weight_decay_mode)
        settings = (optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode)
        checks.check_backward_update_pair(
            op, ((weight, state1, state2, grad_output),
                 (weight_b, state1_b, state2_b, grad_output_b)),
            indices, offsets, per_sample_weights, pooling, settings,
            ((step, seed), (step_b, seed_b)))
        bags = (indices, offsets, per_sample_weights, pooling)
        update(weight, state1, state2, grad_output, *bags, *settings, step, seed,
               stochastic_rounding)
        update(weight_b, state1_b, state2_b, grad_output_b, *bags, *settings, step_b, seed_b,
               stochastic_rounding_b)

    return embedding_bag_backward_update_pair


embedding_bag_backward_update_pair = update_pair(embedding_bag_backward_update)
