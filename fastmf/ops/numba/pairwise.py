"""Numba CPU backend of the fused pairwise (BPR) step, ``train_step_pairwise``.

Same arguments and numbers as :func:`fastmf.ops.reference.pairwise.train_step_pairwise` and the
``fastmf::train_step_pairwise`` op; same input checks and messages
(:func:`fastmf.ops.checks.check_train_step_pairwise`). Each sample is (u, i, j)::

    x = b_i - b_j + <P[u], Q[i] - Q[j]>
    loss = mean softplus(-x) + reg * mean(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²)

Built from the segment machinery of :mod:`fastmf.ops.numba.pointwise`: users are grouped into
segments of equal ids, and so are the 2B item occurrences (positives at positions 0..B-1,
negatives at B..2B-1, the reference's ``torch.cat`` order), so an item that is a positive in
one sample and a negative in another sums both gradients in position order before its one
update. The user pass computes x and dL/dx while each user's row sits in cache, saves the
old row and updates it; the item pass takes its gradients from the saved rows, so every
gradient comes from the pre-step weights. ``user_bias`` cancels in x: it and its state are
never written. Segments are independent and the loss is summed in segment order, so the
results do not depend on the thread count.

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
from fastmf.ops.codes import STEP_OPTIMIZERS, Optimizer, PairwiseLoss, parse
from fastmf.ops.numba.pointwise import (
    _BAD_IDS,
    _OK,
    _PREFETCH_SAMPLES,
    _PREFETCH_SEGMENTS,
    _cast_like,
    _chunk_bounds,
    _dot,
    _group_into,
    _ids_view,
    _is_ids,
    _jit,
    _launch,
    _mean_loss,
    _pjit,
    _prefetch_row,
    _prefetch_update_rows,
    _require_cpu,
    _states_ok,
    _step_arrays,
    _tables_ok,
    _unreachable,
    _update_row,
    _update_scalar,
)

__all__ = ["train_step_pairwise"]

# F.softplus's default threshold: beyond it the reference's softplus is the identity and
# its gradient exactly 1, and this backend must agree with the reference there too.
_SOFTPLUS_THRESHOLD = 20.0


@_jit
def _bpr_loss_and_grad(x, scale):
    """(dL/dx in the weights' type, softplus(-x) as float64) for one sample; the gradient
    formed as autograd forms it, ``-((scale * e^z) / (e^z + 1))`` with z = -x, which cannot
    overflow below the threshold."""
    z = -x
    if np.float64(z) > _SOFTPLUS_THRESHOLD:
        return -scale, np.float64(z)
    e = np.exp(z)
    return -((scale * e) / (e + _cast_like(x, 1.0))), np.log1p(np.exp(np.float64(z)))


@_pjit
def _pairwise_kernel(user_factors, item_factors, item_bias, has_bias, user_factors_state,
                     item_factors_state, item_bias_state, users, items, reg, optimizer, lr,
                     eps, num_threads):
    """The fused pairwise step, in place. ``items`` (2B,) int64: positives then negatives;
    states as in ``_update_row`` (bias state (N,)); absent tables are empty arrays.
    Returns ``(status, loss)``, the loss (data + reg) as a float64; a bad id is reported
    before anything is written."""
    num_samples = users.shape[0]
    num_positions = items.shape[0]
    dim = user_factors.shape[1]
    P, Q = user_factors, item_factors
    zero = _cast_like(P, 0.0)
    lr_ = _cast_like(P, lr)
    eps_ = _cast_like(P, eps)
    batch = _cast_like(P, num_samples)
    # mean's backward: 1/B in the weights' type.
    scale = _cast_like(P, 1.0) / batch
    # The reg gradient is (reg/B) * 2q in autograd; 2*(reg/B) is exact, so this rounds the
    # same.
    reg_scale = _cast_like(P, 2.0) * (_cast_like(P, reg) / batch)
    use_reg = reg != 0.0

    # 1. Group users (B ids) and item occurrences (2B ids), one side per thread.
    sorted_users = np.empty(num_samples, np.int64)
    user_order = np.empty(num_samples, np.int64)
    user_starts = np.empty(num_samples + 1, np.int64)
    sorted_items = np.empty(num_positions, np.int64)
    item_order = np.empty(num_positions, np.int64)
    item_starts = np.empty(num_positions + 1, np.int64)
    num_segments = np.empty(2, np.int64)
    for side in prange(2):
        if side == 0:
            num_segments[0] = _group_into(users, P.shape[0], sorted_users, user_order,
                                          user_starts)
        else:
            num_segments[1] = _group_into(items, Q.shape[0], sorted_items, item_order,
                                          item_starts)
    if num_segments[0] < 0 or num_segments[1] < 0:
        return _BAD_IDS, 0.0

    # 2. Users: per sample x, dL/dx and the user's gradient row (from item rows not yet
    # updated); then the user's update. Old user rows are kept for the item pass.
    num_user_segments = num_segments[0]
    old_user_rows = np.empty((num_user_segments, dim), P.dtype)
    segment_loss = np.empty(num_user_segments, np.float64)
    segment_reg = np.zeros(num_user_segments, np.float64)
    user_segment = np.empty(num_samples, np.int64)
    grad_x = np.empty(num_samples, P.dtype)
    no_bias = item_bias[:0]
    bounds = _chunk_bounds(user_starts, num_user_segments, num_threads)
    for c in prange(bounds.shape[0] - 1):
        grad = np.empty(dim, P.dtype)
        diff = np.empty(dim, P.dtype)
        scratch = np.empty(dim, P.dtype)
        last_pos = user_starts[bounds[c + 1]]
        for s in range(bounds[c], bounds[c + 1]):
            if s + _PREFETCH_SEGMENTS < num_user_segments:
                _prefetch_update_rows(P, user_factors_state, no_bias, no_bias,
                                      sorted_users[user_starts[s + _PREFETCH_SEGMENTS]],
                                      optimizer, False)
            u = sorted_users[user_starts[s]]
            p = P[u]
            p_norm = _dot(p, p, scratch) if use_reg else zero
            for k in range(dim):
                grad[k] = 0
            loss_sum = 0.0
            reg_sum = 0.0
            for pos in range(user_starts[s], user_starts[s + 1]):
                if pos + _PREFETCH_SAMPLES < last_pos:
                    ahead = user_order[pos + _PREFETCH_SAMPLES]
                    _prefetch_row(Q, items[ahead])
                    _prefetch_row(Q, items[num_samples + ahead])
                b = user_order[pos]
                user_segment[b] = s
                i = items[b]
                j = items[num_samples + b]
                qi = Q[i]
                qj = Q[j]
                # The reference's association: <p, qi - qj>, then (+ b_i) - b_j.
                for k in range(dim):
                    diff[k] = qi[k] - qj[k]
                x = _dot(p, diff, scratch)
                if has_bias:
                    x = x + item_bias[i]
                    x = x - item_bias[j]
                g, value = _bpr_loss_and_grad(x, scale)
                grad_x[b] = g
                loss_sum += value
                if use_reg:
                    norms = (np.float64(p_norm) + np.float64(_dot(qi, qi, scratch))
                             + np.float64(_dot(qj, qj, scratch)))
                    if has_bias:
                        norms += (np.float64(item_bias[i]) ** 2
                                  + np.float64(item_bias[j]) ** 2)
                    reg_sum += norms
                    for k in range(dim):
                        grad[k] += g * diff[k] + reg_scale * p[k]
                else:
                    for k in range(dim):
                        grad[k] += g * diff[k]
            segment_loss[s] = loss_sum
            segment_reg[s] = reg_sum
            old = old_user_rows[s]
            for k in range(dim):
                old[k] = p[k]
            _update_row(P, user_factors_state, u, grad, optimizer, lr_, eps_)

    total = _mean_loss(segment_loss, segment_reg, num_user_segments, num_samples, reg)

    # 3. Items, over their 2B occurrences, from the saved user rows.
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
                    ahead = item_order[pos + _PREFETCH_SAMPLES]
                    if ahead >= num_samples:
                        ahead -= num_samples
                    # written by whichever thread owned the user: often another core's cache
                    _prefetch_row(old_user_rows, user_segment[ahead])
                b = item_order[pos]
                # Negating is exact, so the reference's -(g p) equals (-g) p.
                if b >= num_samples:
                    b -= num_samples
                    g = -grad_x[b]
                else:
                    g = grad_x[b]
                p = old_user_rows[user_segment[b]]
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


_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias", "user_factors_state",
          "item_factors_state", "user_bias_state", "item_bias_state", "users", "pos_items",
          "neg_items")


def _structure_ok(tables, states, users, pos_items, neg_items, loss, optimizer) -> bool:
    """What ``_checks.check_train_step_pairwise`` demands, short of reading the ids."""
    if not (0 <= loss < len(PairwiseLoss) and 0 <= optimizer < len(STEP_OPTIMIZERS)):
        return False
    return (_tables_ok(users, pos_items, *tables) and _is_ids(neg_items, users.shape[0])
            and _states_ok(tables, states, optimizer))


def train_step_pairwise(tables: MFTables, states: MFTables | None, users, pos_items,
                        neg_items, loss, reg: float, optimizer: OptimizerArgs):
    """Fused BPR step, in place on the tables and states; returns the loss (data term + reg
    term) as a 0-d tensor like the weights.

    users, pos_items, neg_items: (B,) int32/int64; ``tables``: user_factors (U, K),
    item_factors (I, K), user_bias (U,) and item_bias (I,), or both None; ``states`` None
    for SGD, else like their table (row-wise Adagrad: (U,) and (I,) for the factor tables).
    ``user_bias`` and its state are checked but never written. ``loss`` is a
    :class:`~fastmf.ops.codes.PairwiseLoss`, code or name. An empty batch changes nothing
    and returns 0.
    """
    op = "train_step_pairwise"
    loss = int(parse(PairwiseLoss, loss, op, "pairwise loss"))
    lr, eps = optimizer.lr, optimizer.eps
    optimizer = int(parse(Optimizer, optimizer.optimizer, op, "optimizer"))
    tables = tuple(tables)
    states = tuple(states) if states is not None else (None,) * 4
    user_factors, item_factors, _, item_bias = tables
    _require_cpu(op, _NAMES, tables + states + (users, pos_items, neg_items))

    def full_checks():
        _checks.check_train_step_pairwise(op, tables, states, users, pos_items, neg_items,
                                          loss, optimizer)

    # The ids' range is checked in the kernel, before it writes; anything else the cheap
    # structural test doubts goes through the shared checks, which raise their own errors.
    if not _structure_ok(tables, states, users, pos_items, neg_items, loss, optimizer):
        full_checks()
    if users.shape[0] == 0:
        return user_factors.new_zeros(())
    # The user pass writes user rows while it still reads item rows.
    if user_factors.untyped_storage().data_ptr() == item_factors.untyped_storage().data_ptr():
        raise ValueError(f"fastmf.{op}: the user and item tables share memory; the numba "
                         "backend needs separate tables")

    has_bias = item_bias is not None
    writable, arrays = _step_arrays(tables, states, optimizer, write_user_bias=False)
    P, Q, _, bias_array, P_state, Q_state, _, bias_state = arrays
    items = torch.cat([pos_items.to(torch.int64), neg_items.to(torch.int64)]).numpy()
    status, total = _launch(
        _pairwise_kernel, users.shape[0], P, Q, bias_array, has_bias, P_state, Q_state,
        bias_state, _ids_view(users), items,
        float(reg), optimizer, float(lr), float(eps), pass_threads=True,
    )
    if status != _OK:
        full_checks()
        raise _unreachable(op)
    for w in writable:
        w.commit()
    return torch.tensor(total, dtype=user_factors.dtype)
