"""The spec of the pairwise op family: the fused pairwise step ``train_step_pairwise``
(BPR, or the margin ranking hinge), ``train_step_pairwise_sampled``, the same step
drawing its uniform negatives itself (:func:`fastmf.ops.reference.sampling.sample_negatives`),
and ``train_steps_pairwise_sampled``, a run of those steps over consecutive batches in one
call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmf.ops import checks
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import Optimizer, PairwiseLoss, parse
from fastmf.ops.reference.pointwise import apply_sparse, checked_steps
from fastmf.ops.reference.sampling import sample_negatives


def train_step_pairwise(tables: MFTables, states: MFTables | None, users, pos_items,
                        neg_items, loss, reg: float, optimizer: OptimizerArgs, weights=None):
    """The spec of the fused pairwise step. Each sample is (u, i, j) with i a positive and
    j a sampled negative item of user u::

        x = b_i - b_j + <P[u], Q[i] - Q[j]>          (mu and b_u cancel)
        loss = mean_b l(x)
             + reg * mean_b(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²)

    with ``l(x) = softplus(-x)`` (BPR, ``= -log σ(x)``) or ``relu(1 - x)`` (HINGE, the
    margin ranking loss; its gradient is -1 where x < 1, else 0, as autograd of relu).

    ``weights`` (B,) (finite, >= 0), when given, scale each sample's term:
    ``mean_b(w_b * l(x_b))``; the reg term is not weighted.

    An item row's positive and negative gradients are summed before its single optimizer
    update (positives first, then negatives: ``torch.cat([i, j])``); ``user_bias`` (no
    gradient) is left untouched. Returns the loss (0-d)."""
    op = "train_step_pairwise"
    tables = MFTables(*tables)
    states = MFTables(*(states if states is not None else (None,) * 4))
    loss = parse(PairwiseLoss, loss, op, "pairwise loss")
    optimizer = OptimizerArgs(parse(Optimizer, optimizer.optimizer, op, "optimizer"),
                              optimizer.lr, optimizer.eps)
    checks.check_train_step_pairwise(op, tables, states, users, pos_items, neg_items, loss,
                                     optimizer.optimizer)
    checks.check_settings(op, lr=optimizer.lr, eps=optimizer.eps, reg=reg)
    checks.check_step_weights(op, weights, tables.user_factors, users)
    user_factors, item_factors, _, item_bias = tables
    if users.numel() == 0:
        return user_factors.new_zeros(())
    u, i, j = users.long(), pos_items.long(), neg_items.long()
    with torch.enable_grad():
        p = user_factors.detach()[u].requires_grad_()
        qi = item_factors.detach()[i].requires_grad_()
        qj = item_factors.detach()[j].requires_grad_()
        rows = [p, qi, qj]
        x = (p * (qi - qj)).sum(1)
        per_sample = p.pow(2).sum(1) + qi.pow(2).sum(1) + qj.pow(2).sum(1)
        if item_bias is not None:
            bi = item_bias.detach()[i].requires_grad_()
            bj = item_bias.detach()[j].requires_grad_()
            rows += [bi, bj]
            x = x + bi - bj
            per_sample = per_sample + bi.pow(2) + bj.pow(2)
        data = F.softplus(-x) if loss == PairwiseLoss.BPR else F.relu(1.0 - x)
        data = data.mean() if weights is None else (data * weights).mean()
        total = data + reg * per_sample.mean()
        grads = torch.autograd.grad(total, rows)
    both = torch.cat([i, j])
    apply_sparse(optimizer, user_factors, states.user_factors, u, grads[0])
    apply_sparse(optimizer, item_factors, states.item_factors, both,
                 torch.cat([grads[1], grads[2]]))
    if item_bias is not None:
        apply_sparse(optimizer, item_bias, states.item_bias, both,
                     torch.cat([grads[3], grads[4]]))
    return total.detach()


def train_step_pairwise_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                                pos_indptr, pos_indices, num_negatives: int, seed: int,
                                step: int, loss, reg: float, optimizer: OptimizerArgs,
                                weights=None):
    """``train_step_pairwise`` against uniform negatives drawn in the step: each positive
    (``users[b]``, ``pos_items[b]``) meets ``num_negatives`` negatives, drawn as
    :func:`sample_negatives` does from the positives' CSR (``pos_indptr`` (U+1,),
    ``pos_indices``; int32/int64) and (``seed``, ``step``). Exactly::

        neg = sample_negatives(users, pos_indptr, pos_indices, I, num_negatives, seed, step)
        train_step_pairwise(tables, states, users.repeat_interleave(num_negatives),
                            pos_items.repeat_interleave(num_negatives), neg.reshape(-1),
                            loss, reg, optimizer,
                            weights=None if weights is None
                            else weights.repeat_interleave(num_negatives))

    (``weights`` (B,): each positive's weight scales all of its pairs), so the loss is the
    mean over the B * num_negatives pairs. Returns the loss (0-d)."""
    op = "train_step_pairwise_sampled"
    tables = MFTables(*tables)
    states = MFTables(*(states if states is not None else (None,) * 4))
    loss = parse(PairwiseLoss, loss, op, "pairwise loss")
    optimizer = OptimizerArgs(parse(Optimizer, optimizer.optimizer, op, "optimizer"),
                              optimizer.lr, optimizer.eps)
    checks.check_train_step_pairwise_sampled(op, tables, states, users, pos_items, pos_indptr,
                                             pos_indices, num_negatives, seed, step, loss,
                                             optimizer.optimizer)
    checks.check_settings(op, lr=optimizer.lr, eps=optimizer.eps, reg=reg)
    checks.check_step_weights(op, weights, tables.user_factors, users)
    neg = sample_negatives(users, pos_indptr, pos_indices, tables.item_factors.shape[0],
                           num_negatives, seed, step, op)
    if weights is not None:
        weights = weights.repeat_interleave(num_negatives)
    return train_step_pairwise(tables, states, users.repeat_interleave(num_negatives),
                               pos_items.repeat_interleave(num_negatives), neg.reshape(-1),
                               loss, reg, optimizer, weights)


def train_steps_pairwise_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                                 pos_indptr, pos_indices, num_negatives: int,
                                 batch_size: int, seed: int, step: int, loss, reg: float,
                                 optimizer: OptimizerArgs, weights=None, order=None):
    """:func:`train_step_pairwise_sampled` on each run of ``batch_size`` positives in turn,
    the t-th at ``step + t``: an epoch's batches in one call. Exactly::

        torch.stack([
            train_step_pairwise_sampled(
                tables, states, users[lo:lo + batch_size], pos_items[lo:lo + batch_size],
                pos_indptr, pos_indices, num_negatives, seed, step + t, loss, reg, optimizer,
                None if weights is None else weights[lo:lo + batch_size])
            for t, lo in enumerate(range(0, len(users), batch_size))])

    (an empty (0,) tensor for no positives), except that every input of every step (ids,
    weights, the users' CSR rows) is checked before the first step runs, so bad input in
    any slice raises before anything is written. ``order`` (None, or (n,) int32/int64
    positions in ``[0, len(users))``, repeats allowed): the run is ``users[order]``,
    ``pos_items[order]`` and ``weights[order]`` (an epoch's shuffle without a gathered
    copy), every input still checked whole. Returns the steps' losses."""
    return sampled_steps(train_step_pairwise_sampled, tables, states, users, pos_items,
                         pos_indptr, pos_indices, num_negatives, batch_size, seed, step, loss,
                         reg, optimizer, weights, order)


def sampled_steps(step_fn, tables, states, users, pos_items, pos_indptr, pos_indices,
                  num_negatives, batch_size, seed, step, loss, reg, optimizer, weights=None,
                  order=None):
    """:func:`train_steps_pairwise_sampled` around a backend's own sampled step
    ``step_fn`` (this module's, or the Numba backend's): all of the checks, then the
    steps."""
    return checked_steps(
        "train_steps_pairwise_sampled", PairwiseLoss, "pairwise loss",
        checks.check_train_step_pairwise_sampled,
        lambda tables, states, u, p, t, loss, optimizer, w: step_fn(
            tables, states, u, p, pos_indptr, pos_indices, num_negatives, seed, t, loss, reg,
            optimizer, w),
        tables, states, users, pos_items, pos_indptr, pos_indices, num_negatives, batch_size,
        seed, step, loss, reg, optimizer, weights, order)
