"""The pooled family, in plain PyTorch: ranking steps of two-sided pooled embeddings, a user
and an item each the weighted sum of its feature rows (LightFM's model,
:class:`fastmf.models.Hybrid`). Each side is a table ``(N, K)`` and a bias column ``(N, 1)``
pooled by the CSR bags of its rows (a features matrix: ``indptr``, ``indices``,
``weights``).

:func:`rank_forward` and :func:`rank_backward` are one step's loss and its gradient with
respect to the distinct pooled rows; :func:`pooled_rank_steps` runs the steps of one epoch's
batches in turn, each as the model's training step does: draw the negatives
(``sample_negatives``), pool each side's distinct ids once (``unique_bags``,
``embedding_bag_forward``), score the pairs (``mf_forward``), take the loss and its
gradient, sum the pairs' gradients into the distinct rows (``mf_backward_dense``) and update
each side's table and bias in one ``embedding_bag_backward_update_pair``. The loop is
written once over a backend module (:func:`rank_steps`): the reference runs it on the
reference kernels, the Numba backend on its own, and the native op
(``csrc/pooled_steps.cpp``) is the same loop in C++ over the native kernels.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastmf.ops import checks
from fastmf.ops.args import PooledSide
from fastmf.ops.codes import Pooling
from fastmf.ops.reference.embedding_bag import add_rows

__all__ = ["pair_users", "pooled_rank_steps", "rank_backward", "rank_forward", "rank_steps"]

# The caller the draws name in their errors: the data loop's NegativeSampler.sample_step,
# whose draws these are.
SAMPLER_OP = "NegativeSampler.sample_step"


def pair_users(user_at: Tensor, n: int) -> Tensor:
    """The user position of every pair of B positives and their (B, n) negatives, laid out
    as the pairs' item positions are: the B positives, then the negatives row by row."""
    return torch.cat([user_at, user_at.repeat_interleave(n)])


def rank_forward(p: Tensor, bu: Tensor, q: Tensor, bi: Tensor, user_at: Tensor,
                 pos_at: Tensor, neg_at: Tensor, loss: str, weights: Tensor | None,
                 reg: float, kernels: ModuleType, batch: int | None = None):
    """A ranking step's loss from the rows pooled once and what :func:`rank_backward` needs:
    ``(value, (at_user, at_item, c_pos, c_neg), counts)``.

    ``p`` (U, dim), ``bu`` (U,): the distinct users' pooled vectors and biases; ``q``
    (I, dim), ``bi`` (I,): the distinct items' (positives and negatives together);
    ``user_at`` (B,), ``pos_at`` (B,), ``neg_at`` (B, n): each occurrence's row. ``loss``:
    BPR (each positive against each of its negatives), BCE (positives labelled 1,
    negatives 0), each weighted by the positives' ``weights``; or ``"warp"``, WARP's update
    once the violators are chosen (one negative per positive, ``weights`` the rank weights,
    over ``batch``, the whole batch's B). Plus ``reg`` times the squared pooled outputs of
    every occurrence over ``batch``. The pairs are scored by ``kernels.mf_forward`` on the
    distinct rows: no (pairs, dim) block of gathered rows is written (at batch 4096 with 4
    negatives such a block is 5 MB)."""
    size, n = neg_at.shape
    batch = size if batch is None else batch
    flat_neg = neg_at.reshape(-1)
    at_user = pair_users(user_at, n)
    at_item = torch.cat([pos_at, flat_neg])
    scores = kernels.mf_forward(at_user, at_item, p, q, bu, bi, 0.0)
    pos, neg = scores[:size], scores[size:].view(size, n)
    w = None if weights is None else weights.to(pos.dtype)
    if loss == "bpr":
        diff = neg - pos.unsqueeze(1)
        pairs = diff.numel()
        terms = torch.nn.functional.softplus(diff)
        if w is not None:
            terms = terms * w.unsqueeze(1)
        value = terms.sum() / max(pairs, 1)
        # d/d neg of softplus(neg - pos) is sigmoid(neg - pos); d/d pos its negative.
        c_neg = diff.sigmoid_()
        if w is not None:
            c_neg.mul_(w.unsqueeze(1))
        c_neg.div_(max(pairs, 1))
        c_pos = c_neg.sum(1).neg_()
    elif loss == "warp":  # n == 1: each positive's chosen violator
        hinge = (1.0 - pos).add_(neg[:, 0])
        value = (hinge * w).sum() / max(batch, 1)
        c_pos = w.neg().div_(max(batch, 1))
        c_neg = w.div(max(batch, 1)).unsqueeze(1)
    else:  # bce
        pairs = size * (n + 1)
        softplus = torch.nn.functional.softplus
        pos_terms = softplus(-pos)  # label 1: -log sigmoid(pos)
        if w is not None:
            pos_terms = pos_terms * w
        value = (pos_terms.sum() + softplus(neg).sum()) / max(pairs, 1)
        c_pos = torch.sigmoid(-pos).neg_()
        if w is not None:
            c_pos.mul_(w)
        c_pos.div_(max(pairs, 1))
        c_neg = torch.sigmoid(neg).div_(max(pairs, 1))
    counts = None
    if reg and size:
        user_count = torch.bincount(user_at, minlength=len(p)).to(p.dtype)
        item_count = torch.bincount(at_item, minlength=len(q)).to(q.dtype)
        value = value + reg / batch * (
            (user_count * (p.square().sum(1) + bu.square())).sum()
            + (item_count * (q.square().sum(1) + bi.square())).sum())
        counts = (user_count.mul_(2 * reg / batch), item_count.mul_(2 * reg / batch))
    return value, (at_user, at_item, c_pos, c_neg), counts


def rank_backward(grad: Tensor, p: Tensor, bu: Tensor, q: Tensor, bi: Tensor,
                  at_user: Tensor, at_item: Tensor, c_pos: Tensor, c_neg: Tensor, counts,
                  kernels: ModuleType) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients ``(grad_p, grad_bu, grad_q, grad_bi)`` of :func:`rank_forward`'s
    value times ``grad`` with respect to the distinct rows."""
    size = c_pos.shape[0]
    coef = torch.cat([c_pos, c_neg.reshape(-1)]).mul_(grad)
    # Each pair's rows of the two tables' gradients (coef times the other side's row),
    # summed into the distinct rows in index order, without forming the rows.
    grad_p, grad_q = kernels.mf_backward_dense(coef, at_user, at_item, p, q)
    # A user's bias takes each positive's terms summed first: under BPR they cancel
    # exactly (c_pos = -sum c_neg), and a rounding residue would become a whole
    # normalised step under Adagrad or Adam.
    # add_rows: index_add_ on the CPU (a row's terms in index order; the native
    # scatter_rows costs about 5 us a call more here), and on CUDA a sorted, fixed-order
    # sum where index_add_ adds with atomics: the same bits on every run there too.
    grad_bu = add_rows(torch.zeros_like(bu), at_user[:size], (c_pos + c_neg.sum(1)).mul_(grad))
    grad_bi = add_rows(torch.zeros_like(bi), at_item, coef)
    if counts is not None:
        user_count, item_count = (c * grad for c in counts)
        grad_p.addcmul_(p, user_count.unsqueeze(1))
        grad_bu.addcmul_(bu, user_count)
        grad_q.addcmul_(q, item_count.unsqueeze(1))
        grad_bi.addcmul_(bi, item_count)
    return grad_p, grad_bu, grad_q, grad_bi


class _PooledBags:
    """One side's distinct ids of a step pooled once: the bags (the ops' CSR form, weights
    in the accumulation type, as an EmbeddingBag's lookup hands them to the kernel), the
    position of each id among the distinct ones, and the pooled vectors and biases."""

    def __init__(self, kernels: ModuleType, side: PooledSide, ids: Tensor):
        _, self.inverse, indices, offsets, weights = kernels.unique_bags(
            ids, side.indptr, side.indices, side.weights)
        dtype = side.table.dtype
        weights = weights.to(dtype).to(checks.accumulation_dtype(dtype))
        self.bags = (indices, offsets, weights, Pooling.SUM)
        self.vec = kernels.embedding_bag_forward(side.table, *self.bags)
        self.bias = kernels.embedding_bag_forward(side.bias, *self.bags).squeeze(1)


def _update(kernels: ModuleType, side: PooledSide, pooled: _PooledBags, grad_vec: Tensor,
            grad_bias: Tensor, t: int) -> None:
    """One side's table and bias stepped in one call at its run ``t``."""
    a, b = side.table_args, side.bias_args
    kernels.embedding_bag_backward_update_pair(
        side.table, *side.table_states, grad_vec, side.bias, *side.bias_states,
        grad_bias[:, None], *pooled.bags[:3], int(Pooling.SUM), int(a.optimizer),
        float(a.lr), float(a.eps), float(a.beta1), float(a.beta2), float(a.weight_decay),
        int(a.weight_decay_mode), a.step + t, a.seed, a.stochastic_rounding, b.step + t,
        b.seed, b.stochastic_rounding)


def rank_step(kernels: ModuleType, users_side: PooledSide, items_side: PooledSide,
              users: Tensor, items: Tensor, negatives: Tensor, weights: Tensor | None,
              loss: str, reg: float, t: int) -> Tensor:
    """One step of :func:`pooled_rank_steps` (its run ``t``) on ``kernels``: returns the
    loss. ``users`` (B,), ``items`` (B,), ``negatives`` (B, n) int64."""
    size, n = negatives.shape
    pu = _PooledBags(kernels, users_side, users)
    pi = _PooledBags(kernels, items_side, torch.cat([items.reshape(-1), negatives.reshape(-1)]))
    pos_at, neg_at = pi.inverse.split([size, size * n])
    value, saved, counts = rank_forward(pu.vec, pu.bias, pi.vec, pi.bias, pu.inverse, pos_at,
                                        neg_at.view(size, n), loss, weights, float(reg), kernels)
    grad_p, grad_bu, grad_q, grad_bi = rank_backward(
        torch.ones_like(value), pu.vec, pu.bias, pi.vec, pi.bias, *saved, counts, kernels)
    _update(kernels, users_side, pu, grad_p, grad_bu, t)
    _update(kernels, items_side, pi, grad_q, grad_bi, t)
    return value


def rank_steps(kernels: ModuleType, users_side: PooledSide, items_side: PooledSide,
               users: Tensor, pos_items: Tensor, weights: Tensor | None, pos_indptr: Tensor,
               pos_indices: Tensor, num_items: int, num_negatives: int, batch_size: int,
               seed: int, loss: str, reg: float) -> Tensor:
    """:func:`pooled_rank_steps` on the kernels of the backend module ``kernels``."""
    checks.check_pooled_rank_steps("pooled_rank_steps", users_side, items_side, users,
                                   pos_items, weights, num_negatives, batch_size, loss, reg)
    users, pos_items = users.long(), pos_items.long()
    n = users.shape[0]
    losses = []
    for t, lo in enumerate(range(0, n, batch_size)):
        u = users[lo:lo + batch_size]
        negatives = kernels.sample_negatives(u, pos_indptr, pos_indices, num_items,
                                             num_negatives, seed, t, SAMPLER_OP)
        losses.append(rank_step(kernels, users_side, items_side, u,
                                pos_items[lo:lo + batch_size], negatives,
                                None if weights is None else weights[lo:lo + batch_size],
                                loss, reg, t))
    if not losses:
        dtype = checks.accumulation_dtype(users_side.table.dtype)
        return torch.empty(0, dtype=dtype, device=users_side.table.device)
    return torch.stack(losses)


def pooled_rank_steps(users_side: PooledSide, items_side: PooledSide, users: Tensor,
                      pos_items: Tensor, weights: Tensor | None, pos_indptr: Tensor,
                      pos_indices: Tensor, num_items: int, num_negatives: int,
                      batch_size: int, seed: int, loss: str, reg: float) -> Tensor:
    """In place on both sides' tables and states: the ranking steps of each run of
    ``batch_size`` positives ``(users, pos_items)`` in turn; returns the runs' losses
    ``(ceil(n / batch_size),)`` in the tables' accumulation type.

    Run ``t`` (``users[lo:hi]``, ``pos_items[lo:hi]``, ``weights[lo:hi]``, lo = t ·
    batch_size) draws its ``num_negatives`` uniform negatives per positive as
    ``sample_negatives(users[lo:hi], pos_indptr, pos_indices, num_items, num_negatives, seed,
    t)``; pools each side's distinct ids once (``unique_bags`` of its CSR, then
    ``embedding_bag_forward`` of its table and bias with per-sample weights in the table's
    dtype, then the accumulation type); takes ``loss`` ("bpr": each positive against each
    of its negatives; "bce": positives labelled 1, negatives 0; each positive's terms
    weighted by ``weights``) plus ``reg`` times the squared pooled outputs of every
    occurrence over B (:func:`rank_forward`); forms the distinct rows' gradients
    (:func:`rank_backward`); and updates the user side, then the item side, with one
    ``embedding_bag_backward_update_pair`` each: the table and its bias column over the same
    bags, with each side's ``table_args`` / ``bias_args`` (the optimizer settings, which
    the four tables share, and each table's step, ``step + t`` at run t, its seed and
    rounding).

    ``users_side`` / ``items_side``: :class:`fastmf.ops.args.PooledSide`. ``users``,
    ``pos_items`` (n,) int32/int64; ``weights`` None or (n,) float."""
    from fastmf.ops import reference

    return rank_steps(reference, users_side, items_side, users, pos_items, weights,
                      pos_indptr, pos_indices, num_items, num_negatives, batch_size, seed,
                      loss, reg)
