"""Numba CPU backend of the fused pairwise (BPR) step, ``train_step_pairwise``, and of
``train_step_pairwise_sampled`` (the same step on uniform negatives it draws itself).

Same arguments and numbers as :func:`fastmf.ops.reference.pairwise.train_step_pairwise` and the
``fastmf::train_step_pairwise`` op; same input checks and messages
(:func:`fastmf.ops.checks.check_train_step_pairwise`). Each sample is (u, i, j)::

    x = b_i - b_j + <P[u], Q[i] - Q[j]>
    loss = mean softplus(-x) + reg * mean(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²)

Built from the segment machinery of :mod:`fastmf.ops.numba._common`, as ``train_step`` is:
users are grouped into segments of equal ids, and so are the 2B item occurrences (positives
at positions 0..B-1, negatives at B..2B-1, the reference's ``torch.cat`` order), so an item
that is a positive in one sample and a negative in another sums both gradients in position
order before its one update. The user pass computes x and dL/dx while each user's row sits
in cache, saves the old row and updates it; the item pass takes its gradients from the saved
rows, so every gradient comes from the pre-step weights. ``user_bias`` cancels in x: it and
its state are never written. Segments are independent and the loss is summed in segment
order, so the results do not depend on the thread count.

>>> import torch, fastmf.ops.numba as nb  # doctest: +SKIP
>>> from fastmf.ops import MFTables, Optimizer, OptimizerArgs  # doctest: +SKIP
>>> P, Q = torch.randn(10, 4) * 0.1, torch.randn(20, 4) * 0.1  # doctest: +SKIP
>>> u, i, j = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([4, 5])  # +SKIP
>>> nb.train_step_pairwise(MFTables(P, Q), None, u, i, j, "bpr", 0.0,
...                        OptimizerArgs(Optimizer.SGD, 0.1))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from fastmf.ops import checks as _checks
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import PairwiseLoss, parse
from fastmf.ops.numba._common import (
    OK,
    PREFETCH_SAMPLES,
    add_sample,
    begin_segment,
    cast_like,
    check_weights,
    chunk_bounds,
    codes_ok,
    dot,
    first_pass_outputs,
    group_users_and_items,
    ids_view,
    is_ids,
    jit,
    mean_loss,
    pjit,
    prefetch_row,
    require_cpu,
    run_step,
    save_and_update_row,
    states_ok,
    step_arguments,
    step_arrays,
    step_rows_from_saved,
    step_scalars,
    tables_ok,
    weights_view,
)
from fastmf.ops.numba.sampling import _draw
from fastmf.ops.reference.pairwise import sampled_steps

__all__ = ["train_step_pairwise", "train_step_pairwise_sampled", "train_steps_pairwise_sampled"]

# F.softplus's default threshold: beyond it the reference's softplus is the identity and
# its gradient exactly 1, and this backend must agree with the reference there too.
_SOFTPLUS_THRESHOLD = 20.0


_HINGE = int(PairwiseLoss.HINGE)


@jit
def _pair_loss_and_grad(x, scale, loss):
    """BPR or the hinge (``loss``) of one sample: (dL/dx in the weights' type, the loss as
    float64), as csrc/cpu/pairwise.cpp PairLoss forms them."""
    if loss == _HINGE:
        margin = cast_like(x, 1.0) - x
        if margin > 0:
            return -scale, np.float64(margin)
        return cast_like(scale, 0.0), 0.0
    return _bpr_loss_and_grad(x, scale)


@jit
def _bpr_loss_and_grad(x, scale):
    """(dL/dx in the weights' type, softplus(-x) as float64) for one sample; the gradient
    formed as autograd forms it, ``-((scale * e^z) / (e^z + 1))`` with z = -x, which cannot
    overflow below the threshold."""
    z = -x
    if np.float64(z) > _SOFTPLUS_THRESHOLD:
        return -scale, np.float64(z)
    e = np.exp(z)
    return -((scale * e) / (e + cast_like(x, 1.0))), np.log1p(np.exp(np.float64(z)))


@pjit
def _pairwise_kernel(user_factors, item_factors, item_bias, has_bias, user_factors_state,
                     item_factors_state, item_bias_state, users, items, weights, has_weights,
                     loss, reg, optimizer, lr, eps, num_threads):
    """The fused pairwise step, in place. ``items`` (2B,) int64: positives then negatives;
    ``weights`` (B,) (checked) scale each sample's term when ``has_weights``; states as in
    ``update_row`` (bias state (N,)); absent tables are empty arrays.
    Returns ``(status, loss)``, the loss (data + reg) as a float64; a bad id is reported
    before anything is written."""
    num_samples = users.shape[0]
    dim = user_factors.shape[1]
    P, Q = user_factors, item_factors
    zero, batch, reg_scale, lr_, eps_, use_reg = step_scalars(P, num_samples, reg, lr, eps)
    # mean's backward: 1/B in the weights' type.
    scale = cast_like(P, 1.0) / batch

    no_bias = item_bias[:0]

    # 1. Group users (B ids) and item occurrences (2B ids).
    status, user_groups, item_groups = group_users_and_items(users, P.shape[0], items,
                                                             Q.shape[0], no_bias, False)
    if status != OK:
        return status, 0.0
    sorted_users, user_order, user_starts, num_user_segments = user_groups
    sorted_items, item_order, item_starts, num_item_segments, _ = item_groups

    # 2. Users: per sample x, dL/dx and the user's gradient row (from item rows not yet
    # updated); then the user's update. Old user rows are kept for the item pass, and what
    # that pass needs is stored per sample.
    (old_user_rows, segment_loss, segment_reg, grad_x,
     user_segment) = first_pass_outputs(P, num_user_segments, num_samples)
    bounds = chunk_bounds(user_starts, num_user_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, P.dtype)
        diff = np.empty(dim, P.dtype)
        scratch = np.empty(dim, P.dtype)
        last_pos = user_starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            u, _ = begin_segment(P, user_factors_state, no_bias, no_bias, False, sorted_users,
                                 user_starts, num_user_segments, s, optimizer, grad)
            p = P[u]
            p_norm = dot(p, p, scratch) if use_reg else zero
            loss_sum = 0.0
            reg_sum = 0.0
            for pos in range(user_starts[s], user_starts[s + 1]):
                if pos + PREFETCH_SAMPLES < last_pos:
                    ahead = user_order[pos + PREFETCH_SAMPLES]
                    prefetch_row(Q, items[ahead])
                    prefetch_row(Q, items[num_samples + ahead])
                b = user_order[pos]
                user_segment[b] = s
                i = items[b]
                j = items[num_samples + b]
                qi = Q[i]
                qj = Q[j]
                # The reference's association: <p, qi - qj>, then (+ b_i) - b_j.
                for k in range(dim):
                    diff[k] = qi[k] - qj[k]
                x = dot(p, diff, scratch)
                if has_bias:
                    x = x + item_bias[i]
                    x = x - item_bias[j]
                g, value = _pair_loss_and_grad(x, scale, loss)
                if has_weights:
                    g = g * weights[b]
                    value = value * np.float64(weights[b])
                grad_x[b] = g
                loss_sum += value
                if use_reg:
                    norms = (np.float64(p_norm) + np.float64(dot(qi, qi, scratch))
                             + np.float64(dot(qj, qj, scratch)))
                    if has_bias:
                        norms += (np.float64(item_bias[i]) ** 2
                                  + np.float64(item_bias[j]) ** 2)
                    reg_sum += norms
                add_sample(grad, g, diff, p, reg_scale, use_reg)
            segment_loss[s] = loss_sum
            segment_reg[s] = reg_sum
            save_and_update_row(P, user_factors_state, u, grad, old_user_rows[s], optimizer,
                                lr_, eps_)

    total = mean_loss(segment_loss, segment_reg, num_user_segments, num_samples, reg)

    # 3. Items, over their 2B occurrences, from the saved user rows.
    bounds = chunk_bounds(item_starts, num_item_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        step_rows_from_saved(Q, item_factors_state, item_bias, item_bias_state, has_bias,
                             sorted_items, item_starts, num_item_segments, bounds[c],
                             bounds[c + 1], item_order, num_samples, grad_x, user_segment,
                             old_user_rows, use_reg, reg_scale, optimizer, lr_, eps_)
    return OK, total


_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias", "user_factors_state",
          "item_factors_state", "user_bias_state", "item_bias_state", "users", "pos_items",
          "neg_items")


def _structure_ok(tables, states, users, pos_items, neg_items, loss, optimizer) -> bool:
    """What ``_checks.check_train_step_pairwise`` demands, short of reading the ids."""
    if not codes_ok(PairwiseLoss, loss, optimizer):
        return False
    return (tables_ok(users, pos_items, *tables) and is_ids(neg_items, users.shape[0])
            and states_ok(tables, states, optimizer))


def train_step_pairwise(tables: MFTables, states: MFTables | None, users, pos_items,
                        neg_items, loss, reg: float, optimizer: OptimizerArgs, weights=None):
    """Fused pairwise step (BPR or hinge), in place on the tables and states; returns the
    loss (data term + reg term) as a 0-d tensor like the weights.

    users, pos_items, neg_items: (B,) int32/int64; ``tables``: user_factors (U, K),
    item_factors (I, K), user_bias (U,) and item_bias (I,), or both None; ``states`` None
    for SGD, else like their table (row-wise Adagrad: (U,) and (I,) for the factor tables).
    ``user_bias`` and its state are checked but never written. ``loss`` is a
    :class:`~fastmf.ops.codes.PairwiseLoss`, code or name; ``weights`` None or (B,) scaling
    each sample's term. An empty batch changes nothing and returns 0.
    """
    op = "train_step_pairwise"
    loss = int(parse(PairwiseLoss, loss, op, "pairwise loss"))
    tables, states, optimizer, lr, eps = step_arguments(op, tables, states, optimizer, reg)
    user_factors, item_factors, _, item_bias = tables
    require_cpu(op, _NAMES, tables + states + (users, pos_items, neg_items))

    def full_checks():
        _checks.check_train_step_pairwise(op, tables, states, users, pos_items, neg_items,
                                          loss, optimizer)

    # The ids' range is checked in the kernel, before it writes; anything else the cheap
    # structural test doubts goes through the shared checks, which raise their own errors.
    if not _structure_ok(tables, states, users, pos_items, neg_items, loss, optimizer):
        full_checks()
    check_weights(op, weights, user_factors, users)
    _checks.check_separate(op, *_checks.pairwise_written(tables, states))
    if users.shape[0] == 0:
        return user_factors.new_zeros(())
    has_bias = item_bias is not None
    writable, arrays = step_arrays(tables, states, optimizer, write_user_bias=False)
    P, Q, _, bias_array, P_state, Q_state, _, bias_state = arrays
    items = torch.cat([pos_items.to(torch.int64), neg_items.to(torch.int64)]).numpy()
    args = (P, Q, bias_array, has_bias, P_state, Q_state, bias_state, ids_view(users), items,
            *weights_view(weights, P), loss, float(reg), optimizer, float(lr), float(eps))
    return run_step(op, _pairwise_kernel, users.shape[0], args, writable, full_checks,
                    user_factors.dtype)


def train_step_pairwise_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                                pos_indptr, pos_indices, num_negatives: int, seed: int,
                                step: int, loss, reg: float, optimizer: OptimizerArgs,
                                weights=None):
    """:func:`train_step_pairwise` against ``num_negatives`` uniform negatives per positive
    drawn from the positives' CSR (``pos_indptr``, ``pos_indices``) at (``seed``,
    ``step``): see :func:`fastmf.ops.reference.pairwise.train_step_pairwise_sampled`."""
    op = "train_step_pairwise_sampled"
    loss = int(parse(PairwiseLoss, loss, op, "pairwise loss"))
    tables, states, code, lr, eps = step_arguments(op, tables, states, optimizer, reg)
    require_cpu(op, _NAMES[:-1] + ("pos_indptr", "pos_indices"),
                tables + states + (users, pos_items, pos_indptr, pos_indices))
    _checks.check_train_step_pairwise_sampled(op, tables, states, users, pos_items, pos_indptr,
                                              pos_indices, num_negatives, seed, step, loss,
                                              code)
    check_weights(op, weights, tables[0], users)
    users_rep, pos_rep, neg = _draw(users, pos_items, pos_indptr, pos_indices,
                                    tables[1].shape[0], num_negatives, seed, step, op)
    if weights is not None:
        weights = weights.repeat_interleave(int(num_negatives))
    return train_step_pairwise(tables, states, users_rep, pos_rep, neg, loss, reg, optimizer,
                               weights)


def train_steps_pairwise_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                                 pos_indptr, pos_indices, num_negatives: int,
                                 batch_size: int, seed: int, step: int, loss, reg: float,
                                 optimizer: OptimizerArgs, weights=None, order=None):
    """:func:`train_step_pairwise_sampled` on each run of ``batch_size`` positives in turn,
    every input checked first: see
    :func:`fastmf.ops.reference.pairwise.train_steps_pairwise_sampled`, whose loop runs
    this module's step."""
    require_cpu("train_steps_pairwise_sampled",
                _NAMES[:-1] + ("pos_indptr", "pos_indices", "order"),
                tuple(tables) + tuple(states if states is not None else (None,) * 4)
                + (users, pos_items, pos_indptr, pos_indices, order))
    return sampled_steps(train_step_pairwise_sampled, tables, states, users, pos_items,
                         pos_indptr, pos_indices, num_negatives, batch_size, seed, step, loss,
                         reg, optimizer, weights, order)
