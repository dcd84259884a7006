"""Numba CPU backend of the pointwise op family: the five kernels as ``@njit`` code over
zero-copy numpy views of CPU tensors.

Same functions, argument order and numbers as :mod:`fastmf.ops.reference.pointwise` (and the
op schemas in ``csrc/fastmf.cpp``), same input checks as the native ops
(:mod:`fastmf.ops.checks`). Shapes:
``users``/``items`` (B,) int32 or int64; ``user_factors`` (U, K); ``item_factors`` (I, K);
``user_bias`` (U,); ``item_bias`` (I,); ``targets`` (B,) like the weights.

How the sparse updates stay exact and deterministic, and how the input checks are split
between Python and the kernels: see :mod:`fastmf.ops.numba._common`. What differs from the
reference is rounding only: the K-term dot products are summed as a fixed tree (which
vectorises), and PyTorch's vectorised float32 sqrt is not always correctly rounded. Kernels
compile on first call (``cache=True`` keeps them across runs), one signature per weight
dtype: ids are widened to int64 and absent tables are passed as empty arrays.

>>> import torch, fastmf.ops.numba as nk  # doctest: +SKIP
>>> P, Q = torch.randn(10, 4), torch.randn(20, 4)  # doctest: +SKIP
>>> users, items = torch.tensor([1, 2]), torch.tensor([3, 3])  # doctest: +SKIP
>>> nk.mf_forward(users, items, P, Q, None, None, 3.5).shape  # doctest: +SKIP
torch.Size([2])
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from fastmf.ops import checks as _checks
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import Loss, parse
from fastmf.ops.numba._common import (
    ADAGRAD,
    BAD_IDS,
    OK,
    PREFETCH_SAMPLES,
    ROWWISE,
    SGD,
    WEIGHT_DTYPES,
    Writable,
    absent,
    add_sample,
    begin_segment,
    cast_like,
    check_weights,
    chunk_bounds,
    codes_ok,
    dot,
    first_pass_outputs,
    group_into,
    group_users_and_items,
    ids_view,
    inline_jit,
    is_ids,
    is_table,
    jit,
    launch,
    mean_loss,
    pjit,
    prefetch_row,
    raise_if_rejected,
    read_view,
    require_cpu,
    run_step,
    save_and_update_row,
    states_ok,
    step_arguments,
    step_arrays,
    step_rows_from_saved,
    step_scalars,
    tables_ok,
    update_row,
    update_scalar,
    weights_view,
)
from fastmf.ops.numba.sampling import _draw
from fastmf.ops.reference.pointwise import sampled_pointwise_steps

__all__ = ["mf_forward", "mf_backward", "mf_backward_dense", "sparse_adagrad_update",
           "sparse_sgd_update", "train_step", "train_step_sampled", "train_steps_sampled"]

_MSE, _HUBER, _BCE = int(Loss.MSE), int(Loss.HUBER), int(Loss.BCE)
# Samples per parallel work item of mf_forward / mf_backward (each block checks its ids
# before it reads any row).
_BLOCK = 512


# --------------------------------------------------------------------------------------------
# Kernels. Each returns a status: OK, or BAD_IDS / BAD_TARGETS before it has written
# anything, so that the caller can raise the checks' own error.


@jit
def _checked_block_end(users, items, num_users, num_items, blk, bad):
    """The end of sample block ``blk`` (its samples are [blk * _BLOCK, end)) once every
    (user, item) pair in it indexes a row; else ``bad[blk]`` is set and the block is empty.
    Each block checks its ids before it reads any row."""
    end = min(users.shape[0], (blk + 1) * _BLOCK)
    for b in range(blk * _BLOCK, end):
        u = users[b]
        i = items[b]
        if not ((u >= 0) & (u < num_users) & (i >= 0) & (i < num_items)):
            bad[blk] = True
            return blk * _BLOCK
    return end


@inline_jit
def _prefetch_sample_rows(user_factors, item_factors, users, items, b, end):
    """Prefetch the rows sample ``b + PREFETCH_SAMPLES`` reads, if it is before ``end``."""
    ahead = b + PREFETCH_SAMPLES
    if ahead < end:
        prefetch_row(user_factors, users[ahead])
        prefetch_row(item_factors, items[ahead])


@pjit
def _forward_kernel(users, items, user_factors, item_factors, user_bias, item_bias, has_bias,
                    global_mean, out):
    """out (B,) = global_mean + <P[u], Q[i]> (+ b_u + b_i), the terms added in the
    reference's order."""
    P, Q = user_factors, item_factors
    mean = cast_like(P, global_mean)
    bad = np.zeros((users.shape[0] + _BLOCK - 1) // _BLOCK, np.bool_)
    for blk in prange(bad.shape[0]):
        end = _checked_block_end(users, items, P.shape[0], Q.shape[0], blk, bad)
        scratch = np.empty(P.shape[1], P.dtype)
        for b in range(blk * _BLOCK, end):
            _prefetch_sample_rows(P, Q, users, items, b, end)
            u = users[b]
            i = items[b]
            pred = dot(P[u], Q[i], scratch) + mean
            if has_bias:
                pred = pred + user_bias[u]
                pred = pred + item_bias[i]
            out[b] = pred
    return BAD_IDS if bad.any() else OK


@pjit
def _backward_kernel(grad_out, users, items, user_factors, item_factors, grad_p, grad_q):
    """grad_p[b] = grad_out[b] * Q[items[b]], grad_q[b] = grad_out[b] * P[users[b]]: (B, K)."""
    P, Q = user_factors, item_factors
    bad = np.zeros((users.shape[0] + _BLOCK - 1) // _BLOCK, np.bool_)
    for blk in prange(bad.shape[0]):
        end = _checked_block_end(users, items, P.shape[0], Q.shape[0], blk, bad)
        for b in range(blk * _BLOCK, end):
            _prefetch_sample_rows(P, Q, users, items, b, end)
            g = grad_out[b]
            p = P[users[b]]
            q = Q[items[b]]
            for k in range(P.shape[1]):
                grad_p[b, k] = g * q[k]
                grad_q[b, k] = g * p[k]
    return BAD_IDS if bad.any() else OK


@jit
def _backward_dense_kernel(grad_out, users, items, user_factors, item_factors, grad_p,
                           grad_q):
    """grad_p[users[b]] += grad_out[b] * Q[items[b]] and grad_q[items[b]] += grad_out[b] *
    P[users[b]] for b in order (ids checked by the caller): each row's terms in batch
    order, on one thread."""
    P, Q = user_factors, item_factors
    for b in range(users.shape[0]):
        g = grad_out[b]
        u, i = users[b], items[b]
        for k in range(P.shape[1]):
            grad_p[u, k] += g * Q[i, k]
            grad_q[i, k] += g * P[u, k]


@pjit
def _sparse_update_kernel(weight, state, ids, grad_rows, optimizer, lr, eps, num_threads):
    """In place: one ``optimizer`` step per unique id with its summed ``grad_rows``.
    weight (N, K); state (N, K) Adagrad, (N, 1) row-wise, unused for SGD; ids (B,) int64;
    grad_rows (B, K)."""
    n = ids.shape[0]
    sorted_ids = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    num_segments = group_into(ids, weight.shape[0], sorted_ids, order, starts)
    if num_segments < 0:
        return BAD_IDS
    bounds = chunk_bounds(starts, num_segments, num_threads)
    dim = weight.shape[1]
    lr_ = cast_like(weight, lr)
    eps_ = cast_like(weight, eps)
    no_bias = weight[0, :0]
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, weight.dtype)
        last_pos = starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            row, _ = begin_segment(weight, state, no_bias, no_bias, False, sorted_ids, starts,
                                   num_segments, s, optimizer, grad)
            for pos in range(starts[s], starts[s + 1]):
                if pos + PREFETCH_SAMPLES < last_pos:
                    prefetch_row(grad_rows, order[pos + PREFETCH_SAMPLES])
                rows = grad_rows[order[pos]]
                for k in range(dim):
                    grad[k] += rows[k]
            update_row(weight, state, row, grad, optimizer, lr_, eps_)
    return OK


@jit
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
    return (cast_like(pred, sig) - target) / batch, value


@pjit
def _train_step_kernel(user_factors, item_factors, user_bias, item_bias, has_bias,
                       user_factors_state, item_factors_state, user_bias_state,
                       item_bias_state, users, items, targets, weights, has_weights,
                       global_mean, loss, reg, optimizer, lr, eps, num_threads):
    """Fused forward, loss gradient, reg gradient and sparse optimizer step, in place.
    Returns ``(status, loss)``, the loss (data + reg) as a float64. Shapes as
    ``train_step``; ids int64; ``weights`` (B,) (checked) scale each sample's data term
    when ``has_weights``; states as in ``update_row`` (bias states (N,)); absent tables are
    empty arrays.

    Two passes over the batch, both over segments of equal ids: the user pass computes
    each sample's prediction and loss gradient while the user's row sits in L1, updates the
    user, and keeps its old row; the item pass takes its gradients from the saved rows."""
    num_samples = users.shape[0]
    dim = user_factors.shape[1]
    P, Q = user_factors, item_factors
    mean = cast_like(P, global_mean)
    zero, batch, reg_scale, lr_, eps_, use_reg = step_scalars(P, num_samples, reg, lr, eps)
    mse_norm = cast_like(P, 2.0 / num_samples)
    huber_norm = cast_like(P, 1.0 / num_samples)

    # 1. Group users and items into segments of equal ids; check the targets before
    # anything is written.
    status, user_groups, item_groups = group_users_and_items(users, P.shape[0], items,
                                                             Q.shape[0], targets, True)
    if status != OK:
        return status, 0.0
    sorted_users, user_order, user_starts, num_user_segments = user_groups
    sorted_items, _, item_starts, num_item_segments, item_position = item_groups

    # 2. Users: per sample the prediction, the loss gradient and the user's gradient row
    # (from the item rows, untouched so far); then the user's update. The old user rows
    # are kept for the items' gradients, the losses summed per segment. What the item pass
    # needs per sample is stored at the sample's place in item order, so that pass reads
    # it sequentially.
    (old_user_rows, segment_loss, segment_reg, grad_pred_by_item,
     user_segment_by_item) = first_pass_outputs(P, num_user_segments, num_samples)
    bounds = chunk_bounds(user_starts, num_user_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, P.dtype)
        scratch = np.empty(dim, P.dtype)
        last_pos = user_starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            u, user_term = begin_segment(P, user_factors_state, user_bias, user_bias_state,
                                         has_bias, sorted_users, user_starts,
                                         num_user_segments, s, optimizer, grad)
            p = P[u]
            p_norm = dot(p, p, scratch) if use_reg else zero
            grad_bias = zero
            loss_sum = 0.0
            reg_sum = 0.0
            for pos in range(user_starts[s], user_starts[s + 1]):
                if pos + PREFETCH_SAMPLES < last_pos:
                    prefetch_row(Q, items[user_order[pos + PREFETCH_SAMPLES]])
                b = user_order[pos]
                user_segment_by_item[item_position[b]] = s
                i = items[b]
                q = Q[i]
                pred = dot(p, q, scratch) + mean
                if has_bias:
                    pred = pred + user_term
                    pred = pred + item_bias[i]
                g, value = _loss_and_grad(pred, targets[b], loss, mse_norm, huber_norm, batch)
                if has_weights:
                    g = g * weights[b]
                    value = value * np.float64(weights[b])
                grad_pred_by_item[item_position[b]] = g
                loss_sum += value
                if use_reg:
                    norms = np.float64(p_norm) + np.float64(dot(q, q, scratch))
                    if has_bias:
                        norms += (np.float64(user_term) ** 2
                                  + np.float64(item_bias[i]) ** 2)
                    reg_sum += norms
                add_sample(grad, g, q, p, reg_scale, use_reg)
                grad_bias += g + reg_scale * user_term if use_reg else g
            segment_loss[s] = loss_sum
            segment_reg[s] = reg_sum
            save_and_update_row(P, user_factors_state, u, grad, old_user_rows[s], optimizer,
                                lr_, eps_)
            if has_bias:
                update_scalar(user_bias, user_bias_state, u, grad_bias, optimizer, lr_, eps_)

    total = mean_loss(segment_loss, segment_reg, num_user_segments, num_samples, reg)

    # 3. Items, from the saved user rows.
    bounds = chunk_bounds(item_starts, num_item_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        step_rows_from_saved(Q, item_factors_state, item_bias, item_bias_state, has_bias,
                             sorted_items, item_starts, num_item_segments, bounds[c],
                             bounds[c + 1], item_position[:0], num_samples,
                             grad_pred_by_item, user_segment_by_item, old_user_rows, use_reg,
                             reg_scale, optimizer, lr_, eps_)
    return OK, total


# --------------------------------------------------------------------------------------------
# Tensor-level API (checks split as described in _common)


def mf_forward(users, items, user_factors, item_factors, user_bias, item_bias, global_mean):
    """Predictions (B,): ``global_mean + b_u + b_i + <P[u], Q[i]>``.

    users, items: (B,) int32/int64; user_factors (U, K); item_factors (I, K); user_bias (U,)
    and item_bias (I,), or both None.
    """
    op = "mf_forward"
    args = (users, items, user_factors, item_factors, user_bias, item_bias)
    require_cpu(op, ("users", "items", "user_factors", "item_factors", "user_bias",
                     "item_bias"), args)
    if not tables_ok(*args):
        _checks.check_mf_inputs(op, *args)
    out = torch.empty(users.shape[0], dtype=user_factors.dtype)
    if users.shape[0] == 0:
        return out
    has_bias = user_bias is not None
    P = read_view(user_factors)
    no_bias = absent(P, 1)
    status = launch(
        _forward_kernel, users.shape[0], ids_view(users), ids_view(items), P,
        read_view(item_factors), read_view(user_bias) if has_bias else no_bias,
        read_view(item_bias) if has_bias else no_bias,
        has_bias, float(global_mean), out.numpy(),
    )
    raise_if_rejected(op, status, lambda: _checks.check_mf_inputs(op, *args))
    return out


def mf_backward(grad_out, users, items, user_factors, item_factors):
    """Per-sample gradient rows ``(grad_out[b] * Q[items[b]], grad_out[b] * P[users[b]])``,
    each (B, K). grad_out: (B,) like the weights; users, items (B,); P (U, K); Q (I, K)."""
    op = "mf_backward"
    require_cpu(op, ("grad_out", "users", "items", "user_factors", "item_factors"),
                (grad_out, users, items, user_factors, item_factors))

    def full_checks():
        _checks.check_mf_backward(op, grad_out, users, items, user_factors, item_factors)

    if not (tables_ok(users, items, user_factors, item_factors, None, None)
            and is_table(grad_out, user_factors.dtype, users.shape)):
        full_checks()
    shape = (users.shape[0], user_factors.shape[1])
    grad_p = torch.empty(shape, dtype=user_factors.dtype)
    grad_q = torch.empty(shape, dtype=user_factors.dtype)
    if users.shape[0] == 0:
        return grad_p, grad_q
    status = launch(
        _backward_kernel, users.shape[0], read_view(grad_out), ids_view(users),
        ids_view(items), read_view(user_factors), read_view(item_factors), grad_p.numpy(),
        grad_q.numpy(),
    )
    raise_if_rejected(op, status, full_checks)
    return grad_p, grad_q


def mf_backward_dense(grad_out, users, items, user_factors, item_factors):
    """The tables' dense gradients of the dot product, ``(grad_P (U, K), grad_Q (I, K))``:
    see :func:`fastmf.ops.reference.pointwise.mf_backward_dense`."""
    op = "mf_backward_dense"
    require_cpu(op, ("grad_out", "users", "items", "user_factors", "item_factors"),
                (grad_out, users, items, user_factors, item_factors))
    _checks.check_mf_backward(op, grad_out, users, items, user_factors, item_factors)
    grad_p, grad_q = torch.zeros_like(user_factors), torch.zeros_like(item_factors)
    if users.shape[0]:
        _backward_dense_kernel(read_view(grad_out), ids_view(users), ids_view(items),
                               read_view(user_factors), read_view(item_factors),
                               grad_p.numpy(), grad_q.numpy())
    return grad_p, grad_q


def _sparse_update(op, weight, state, ids, grad_rows, lr, eps, optimizer):
    require_cpu(op, ("weight", "state", "ids", "grad_rows"), (weight, state, ids, grad_rows))
    rowwise = optimizer == ROWWISE

    def full_checks():
        _checks.check_sparse_update(op, weight, state, ids, grad_rows, rowwise)

    ok = (isinstance(weight, torch.Tensor) and weight.dtype in WEIGHT_DTYPES
          and weight.ndim in (1, 2) and is_ids(ids)
          and is_table(grad_rows, weight.dtype, ids.shape + weight.shape[1:]))
    if ok and optimizer != SGD:
        ok = is_table(state, weight.dtype, weight.shape[:1] if rowwise else weight.shape)
    if not ok:
        full_checks()
    _checks.check_settings(op, lr=lr, eps=eps)
    _checks.check_separate_update(op, weight, state)
    if ids.shape[0] == 0:
        return
    # A 1-D table is a table of rows of one element; row-wise Adagrad state is one column.
    rows = (weight.shape[0], weight.shape[1] if weight.ndim == 2 else 1)
    w = Writable(weight, rows)
    if optimizer == SGD:
        s = None
        state_array = absent(w.array, 2)
    else:
        s = Writable(state, (rows[0], 1) if state.ndim == 1 else rows)
        state_array = s.array
    grads = read_view(grad_rows).reshape(ids.shape[0], rows[1])
    status = launch(_sparse_update_kernel, ids.shape[0], w.array, state_array, ids_view(ids),
                    grads, optimizer, float(lr), float(eps), pass_threads=True)
    raise_if_rejected(op, status, full_checks)
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
    optimizer = ROWWISE if rowwise else ADAGRAD
    _sparse_update("sparse_adagrad_update", weight, state, ids, grad_rows, lr, eps, optimizer)


def sparse_sgd_update(weight, ids, grad_rows, lr):
    """In place: ``w[id] -= lr · (sum of the grad rows of id)`` once per unique id.
    weight (N, K) or (N,); ids (B,); grad_rows (B, K) or (B,)."""
    _sparse_update("sparse_sgd_update", weight, None, ids, grad_rows, lr, 0.0, SGD)


_TRAIN_STEP_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias",
                     "user_factors_state", "item_factors_state", "user_bias_state",
                     "item_bias_state", "users", "items", "targets")


def _train_step_ok(tables, states, users, items, targets, loss, optimizer) -> bool:
    """The structure ``_checks.check_train_step`` demands, without reading any value."""
    user_factors, item_factors, user_bias, item_bias = tables
    if not codes_ok(Loss, loss, optimizer):
        return False
    if not tables_ok(users, items, user_factors, item_factors, user_bias, item_bias):
        return False
    return is_table(targets, user_factors.dtype, users.shape) and states_ok(
        tables, states, optimizer)


def train_step(tables: MFTables, states: MFTables | None, users, items, targets,
               global_mean: float, loss, reg: float, optimizer: OptimizerArgs, weights=None):
    """Fused forward + loss + backward + sparse optimizer step, in place on the tables and
    states; returns the loss (data term + reg term) as a 0-d tensor like the weights.

    users, items: (B,) int32/int64; ``tables``: user_factors (U, K), item_factors (I, K),
    user_bias (U,) and item_bias (I,), or both None; ``states`` None for SGD, else like
    their table (row-wise Adagrad: (U,) and (I,) for the factor tables); targets (B,)
    finite, dtype of the weights; ``loss`` a :class:`~fastmf.ops.codes.Loss`, code or name;
    ``weights`` None or (B,) scaling each sample's data term. An empty batch changes nothing
    and returns 0.
    """
    op = "train_step"
    loss = int(parse(Loss, loss, op, "loss"))
    tables, states, optimizer, lr, eps = step_arguments(op, tables, states, optimizer, reg)
    user_factors, item_factors, user_bias, item_bias = tables
    require_cpu(op, _TRAIN_STEP_NAMES, tables + states + (users, items, targets))

    def full_checks():
        _checks.check_train_step(op, tables, states, users, items, targets, loss, optimizer)

    if not _train_step_ok(tables, states, users, items, targets, loss, optimizer):
        full_checks()
    check_weights(op, weights, user_factors, users)
    # The kernel writes user rows while it still reads item rows; checked for an empty
    # batch too, as the other backends do.
    _checks.check_separate(op, tables, states)
    if users.shape[0] == 0:
        return user_factors.new_zeros(())
    has_bias = user_bias is not None
    writable, arrays = step_arrays(tables, states, optimizer)
    args = (*arrays[:4], has_bias, *arrays[4:], ids_view(users), ids_view(items),
            read_view(targets), *weights_view(weights, arrays[0]), float(global_mean), loss,
            float(reg), optimizer, float(lr), float(eps))
    return run_step(op, _train_step_kernel, users.shape[0], args, writable, full_checks,
                    user_factors.dtype)


def train_step_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                       pos_indptr, pos_indices, num_negatives: int, seed: int, step: int,
                       global_mean: float, loss, reg: float, optimizer: OptimizerArgs,
                       weights=None):
    """:func:`train_step` on the positives (label 1) and ``num_negatives`` uniform
    negatives per positive (label 0) drawn from the positives' CSR (``pos_indptr``,
    ``pos_indices``) at (``seed``, ``step``): see
    :func:`fastmf.ops.reference.pointwise.train_step_sampled`."""
    op = "train_step_sampled"
    loss = int(parse(Loss, loss, op, "loss"))
    tables, states, code, lr, eps = step_arguments(op, tables, states, optimizer, reg)
    require_cpu(op, _TRAIN_STEP_NAMES[:-3] + ("users", "pos_items", "pos_indptr", "pos_indices"),
                tables + states + (users, pos_items, pos_indptr, pos_indices))
    _checks.check_train_step_sampled(op, tables, states, users, pos_items, pos_indptr,
                                     pos_indices, num_negatives, seed, step, loss, code)
    check_weights(op, weights, tables[0], users)
    users_rep, _, neg = _draw(users, pos_items, pos_indptr, pos_indices, tables[1].shape[0],
                              num_negatives, seed, step, op)
    batch = users.shape[0]
    labels = torch.cat([torch.ones(batch), torch.zeros(batch * int(num_negatives))])
    if weights is not None:
        weights = torch.cat([weights, weights.new_ones(batch * int(num_negatives))])
    return train_step(tables, states, torch.cat([users.long(), users_rep]),
                      torch.cat([pos_items.long(), neg]), labels.to(tables[0].dtype),
                      global_mean, loss, reg, optimizer, weights)


def train_steps_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                        pos_indptr, pos_indices, num_negatives: int, batch_size: int,
                        seed: int, step: int, global_mean: float, loss, reg: float,
                        optimizer: OptimizerArgs, weights=None, order=None):
    """:func:`train_step_sampled` on each run of ``batch_size`` positives in turn, every
    input checked first: see :func:`fastmf.ops.reference.pointwise.train_steps_sampled`,
    whose loop runs this module's step."""
    require_cpu("train_steps_sampled",
                _TRAIN_STEP_NAMES[:-3]
                + ("users", "pos_items", "pos_indptr", "pos_indices", "order"),
                tuple(tables) + tuple(states if states is not None else (None,) * 4)
                + (users, pos_items, pos_indptr, pos_indices, order))
    return sampled_pointwise_steps(train_step_sampled, tables, states, users, pos_items,
                                   pos_indptr, pos_indices, num_negatives, batch_size, seed,
                                   step, global_mean, loss, reg, optimizer, weights, order)
