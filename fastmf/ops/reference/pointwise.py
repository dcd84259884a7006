"""The spec of the pointwise op family (``mf_forward``, ``mf_backward``, the sparse
optimizer updates and the fused ``train_step``), written plainly with ``nn.Embedding`` /
``torch.optim`` semantics. Every other backend (C++, Numba, CUDA) is tested against these
functions; each checks its inputs with :mod:`fastmf.ops.checks` as the native ops do in
``csrc/checks.h``.

Shapes: ``users``/``items``: (B,) int32 or int64; ``user_factors`` (U, K); ``item_factors``
(I, K); ``user_bias`` (U,); ``item_bias`` (I,); ``targets`` (B,) float.

Losses (``loss=`` everywhere in fastmf), each a mean over the batch:

- ``"mse"``: ``mean((pred - target)**2)``  (``F.mse_loss``)
- ``"huber"``: ``F.huber_loss(pred, target, delta=1.0)``
- ``"bce"``: ``F.binary_cross_entropy_with_logits(pred, target)`` (targets in [0, 1])

Regularisation (``reg=``), FunkSVD style: a per-sample L2 penalty on the rows and biases
that the batch touches, added to the mean loss::

    reg * mean_b(||P[u_b]||² + ||Q[i_b]||² + b_u[u_b]² + b_i[i_b]²)

A row that occurs n times in a batch is penalised n times, exactly as autograd of this
expression would do. Rows the batch does not touch are not decayed.

Per-sample weights (``weights=``, (B,), finite and >= 0, e.g. confidences
``1 + alpha * log(1 + count / eps)`` as in Hu, Koren & Volinsky 2008) scale each sample's
data term, and the mean stays over B: ``mean_b(w_b * loss_b) + reg term``. Weights of 1
give the unweighted step; the reg term is never weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmf.ops import checks
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import HUBER_DELTA, Loss, Optimizer, parse
from fastmf.ops.reference.embedding_bag import add_rows, coalesce_ids
from fastmf.ops.reference.sampling import check_sample_rows, run_steps, sample_negatives


def mf_forward(users, items, user_factors, item_factors, user_bias, item_bias, global_mean):
    """``global_mean + b_u + b_i + <P[u], Q[i]>`` for each (user, item) pair: (B,)."""
    checks.check_mf_inputs("mf_forward", users, items, user_factors, item_factors, user_bias,
                           item_bias)
    p = F.embedding(users.long(), user_factors)
    q = F.embedding(items.long(), item_factors)
    pred = (p * q).sum(1) + global_mean
    if user_bias is not None:
        pred = pred + user_bias[users.long()] + item_bias[items.long()]
    return pred


def mf_backward(grad_out, users, items, user_factors, item_factors):
    """Per-sample gradient rows of the dot product: ``(g*Q[i], g*P[u])``, each (B, K)."""
    checks.check_mf_backward("mf_backward", grad_out, users, items, user_factors, item_factors)
    g = grad_out.unsqueeze(1)
    return g * item_factors[items.long()], g * user_factors[users.long()]


def mf_backward_dense(grad_out, users, items, user_factors, item_factors):
    """The tables' dense gradients of the dot product, :func:`mf_backward`'s rows summed by
    row as :func:`~fastmf.ops.reference.embedding_bag.scatter_rows` sums them: ``grad_P``
    (U, K) with ``grad_P[u] = Σ_{b: users[b] = u} grad_out[b] * Q[items[b]]`` and ``grad_Q``
    (I, K) likewise, each row's terms added in batch order from zero, in the tables' dtype.
    The native kernels never form the (B, K) rows."""
    checks.check_mf_backward("mf_backward_dense", grad_out, users, items, user_factors,
                             item_factors)
    g = grad_out.unsqueeze(1)
    # Rows added in index order: the order the spec asks for.
    grad_p = add_rows(torch.zeros_like(user_factors), users.long(),
                      g * item_factors[items.long()])
    grad_q = add_rows(torch.zeros_like(item_factors), items.long(),
                      g * user_factors[users.long()])
    return grad_p, grad_q


def pointwise_loss(pred, targets, loss, weights=None):
    """The mean loss named by ``loss`` (a :class:`~fastmf.ops.codes.Loss`, its code or
    name; see the module docstring), each sample's term scaled by ``weights`` (B,) when
    given."""
    loss = parse(Loss, loss, "train_step", "loss")
    reduction = "mean" if weights is None else "none"
    if loss == Loss.MSE:
        value = F.mse_loss(pred, targets, reduction=reduction)
    elif loss == Loss.HUBER:
        value = F.huber_loss(pred, targets, delta=HUBER_DELTA, reduction=reduction)
    else:
        value = F.binary_cross_entropy_with_logits(pred, targets, reduction=reduction)
    return value if weights is None else (value * weights).mean()


def reg_term(users, items, user_factors, item_factors, user_bias, item_bias, reg):
    """``reg * mean_b(||P[u_b]||² + ||Q[i_b]||² + b_u² + b_i²)`` (0 when the batch is empty)."""
    u, i = users.long(), items.long()
    per_sample = user_factors[u].pow(2).sum(1) + item_factors[i].pow(2).sum(1)
    if user_bias is not None:
        per_sample = per_sample + user_bias[u].pow(2) + item_bias[i].pow(2)
    if per_sample.numel() == 0:
        return per_sample.sum()
    return reg * per_sample.mean()


@torch.no_grad()
def sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps, rowwise):
    """In place. Element-wise (``torch.optim.Adagrad``, lr_decay=0, weight_decay=0)::

        g = sum of the grad rows of each unique id;  G[id] += g²;  w[id] -= lr·g/(√G[id] + eps)

    Row-wise (FBGEMM's exact row-wise Adagrad; ``state`` is (N,))::

        G[id] += mean_k(g²);  w[id] -= lr·g/(√G[id] + eps)
    """
    checks.check_sparse_update("sparse_adagrad_update", weight, state, ids, grad_rows, rowwise)
    checks.check_settings("sparse_adagrad_update", lr=lr, eps=eps)
    checks.check_separate_update("sparse_adagrad_update", weight, state)
    if ids.numel() == 0:
        return
    unique, g = coalesce_ids(ids, grad_rows, grad_rows.dtype)
    if rowwise and weight.dim() == 2:
        state[unique] += g.pow(2).mean(1)
        std = state[unique].sqrt().add_(eps).unsqueeze(1)
    else:
        state[unique] += g.pow(2)
        std = state[unique].sqrt().add_(eps)
    weight[unique] -= lr * g / std


@torch.no_grad()
def sparse_sgd_update(weight, ids, grad_rows, lr):
    """In place: ``w[id] -= lr · (sum of the grad rows of id)`` once per unique id."""
    checks.check_sparse_update("sparse_sgd_update", weight, None, ids, grad_rows)
    checks.check_settings("sparse_sgd_update", lr=lr)
    if ids.numel() == 0:
        return
    unique, g = coalesce_ids(ids, grad_rows, grad_rows.dtype)
    weight[unique] -= lr * g


def train_step(tables: MFTables, states: MFTables | None, users, items, targets,
               global_mean: float, loss, reg: float, optimizer: OptimizerArgs, weights=None):
    """The spec of the fused ``train_step`` op. ``tables``/``states``: the four tables and
    their optimizer states (None for SGD); ``loss``: a :class:`~fastmf.ops.codes.Loss`, its
    code or name; ``weights``: None or (B,) per-sample weights of the data term (module
    docstring). Gathers the rows as ``nn.Embedding(sparse=True)`` would, takes the loss
    and its gradient with autograd, then applies the sparse optimizer to each table: every
    gradient is computed from the weights as they were before the step. Returns the loss
    (data term + reg term) as a 0-d tensor."""
    op = "train_step"
    tables = MFTables(*tables)
    states = MFTables(*(states if states is not None else (None,) * 4))
    loss = parse(Loss, loss, op, "loss")
    optimizer = OptimizerArgs(parse(Optimizer, optimizer.optimizer, op, "optimizer"),
                              optimizer.lr, optimizer.eps)
    checks.check_train_step(op, tables, states, users, items, targets, loss,
                            optimizer.optimizer)
    checks.check_settings(op, lr=optimizer.lr, eps=optimizer.eps, reg=reg)
    checks.check_step_weights(op, weights, tables.user_factors, users)
    user_factors, item_factors, user_bias, item_bias = tables
    if users.numel() == 0:
        return user_factors.new_zeros(())
    u, i = users.long(), items.long()
    with torch.enable_grad():
        p = user_factors.detach()[u].requires_grad_()
        q = item_factors.detach()[i].requires_grad_()
        rows = [p, q]
        pred = (p * q).sum(1) + global_mean
        per_sample = p.pow(2).sum(1) + q.pow(2).sum(1)
        if user_bias is not None:
            bu = user_bias.detach()[u].requires_grad_()
            bi = item_bias.detach()[i].requires_grad_()
            rows += [bu, bi]
            pred = pred + bu + bi
            per_sample = per_sample + bu.pow(2) + bi.pow(2)
        total = pointwise_loss(pred, targets, loss, weights) + reg * per_sample.mean()
        grads = torch.autograd.grad(total, rows)
    ids = (u, i, u, i)
    for weight, state, row_ids, g in zip(tables, states, ids, grads):
        apply_sparse(optimizer, weight, state, row_ids, g)
    return total.detach()


def train_step_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                       pos_indptr, pos_indices, num_negatives: int, seed: int, step: int,
                       global_mean: float, loss, reg: float, optimizer: OptimizerArgs,
                       weights=None):
    """``train_step`` on the positives labelled 1 and ``num_negatives`` uniform negatives
    per positive labelled 0, drawn in the step as
    :func:`~fastmf.ops.reference.sampling.sample_negatives` draws them from the positives'
    CSR (``pos_indptr`` (U+1,), ``pos_indices``; int32/int64) and (``seed``, ``step``).
    Exactly::

        neg = sample_negatives(users, pos_indptr, pos_indices, I, num_negatives, seed, step)
        train_step(tables, states,
                   torch.cat([users, users.repeat_interleave(num_negatives)]),
                   torch.cat([pos_items, neg.reshape(-1)]),
                   torch.cat([ones(B), zeros(B * num_negatives)]),
                   global_mean, loss, reg, optimizer,
                   weights=None if weights is None
                   else torch.cat([weights, ones(B * num_negatives)]))

    (``weights`` (B,): each positive's row is scaled, its negatives' rows weigh 1, as
    confidence weighs observed pairs only), so the loss (``"bce"`` for implicit feedback;
    any :class:`~fastmf.ops.codes.Loss` against the 0/1 labels) is the mean over the
    B * (1 + num_negatives) rows. Returns the loss (0-d)."""
    op = "train_step_sampled"
    tables = MFTables(*tables)
    states = MFTables(*(states if states is not None else (None,) * 4))
    loss = parse(Loss, loss, op, "loss")
    optimizer = OptimizerArgs(parse(Optimizer, optimizer.optimizer, op, "optimizer"),
                              optimizer.lr, optimizer.eps)
    checks.check_train_step_sampled(op, tables, states, users, pos_items, pos_indptr,
                                    pos_indices, num_negatives, seed, step, loss,
                                    optimizer.optimizer)
    checks.check_settings(op, lr=optimizer.lr, eps=optimizer.eps, reg=reg)
    checks.check_step_weights(op, weights, tables.user_factors, users)
    neg = sample_negatives(users, pos_indptr, pos_indices, tables.item_factors.shape[0],
                           num_negatives, seed, step, op)
    users = users.long()
    labels = torch.cat([torch.ones(len(users)), torch.zeros(len(users) * num_negatives)])
    if weights is not None:
        weights = torch.cat([weights, weights.new_ones(len(users) * num_negatives)])
    return train_step(tables, states,
                      torch.cat([users, users.repeat_interleave(num_negatives)]),
                      torch.cat([pos_items.long(), neg.reshape(-1)]),
                      labels.to(tables.user_factors), global_mean, loss, reg, optimizer,
                      weights)


def apply_sparse(optimizer: OptimizerArgs, weight, state, ids, grad_rows):
    """One sparse update of ``weight`` by the optimizer ``optimizer`` names."""
    if optimizer.optimizer == Optimizer.SGD:
        sparse_sgd_update(weight, ids, grad_rows, optimizer.lr)
    else:
        sparse_adagrad_update(weight, state, ids, grad_rows, optimizer.lr, optimizer.eps,
                              optimizer.optimizer == Optimizer.ROWWISE_ADAGRAD)


def train_steps_sampled(tables: MFTables, states: MFTables | None, users, pos_items,
                        pos_indptr, pos_indices, num_negatives: int, batch_size: int,
                        seed: int, step: int, global_mean: float, loss, reg: float,
                        optimizer: OptimizerArgs, weights=None, order=None):
    """:func:`train_step_sampled` on each run of ``batch_size`` positives in turn, the
    t-th at ``step + t``: an epoch's batches in one call. Exactly::

        torch.stack([
            train_step_sampled(
                tables, states, users[lo:lo + batch_size], pos_items[lo:lo + batch_size],
                pos_indptr, pos_indices, num_negatives, seed, step + t, global_mean, loss,
                reg, optimizer, None if weights is None else weights[lo:lo + batch_size])
            for t, lo in enumerate(range(0, len(users), batch_size))])

    (an empty (0,) tensor for no positives), except that every input of every step (ids,
    weights, the users' CSR rows) is checked before the first step runs, so bad input in
    any slice raises before anything is written. ``order`` (None, or (n,) int32/int64
    positions in ``[0, len(users))``, repeats allowed): the run is ``users[order]``,
    ``pos_items[order]`` and ``weights[order]`` (an epoch's shuffle without a gathered
    copy), every input still checked whole. Returns the steps' losses."""
    return sampled_pointwise_steps(train_step_sampled, tables, states, users, pos_items,
                                   pos_indptr, pos_indices, num_negatives, batch_size, seed,
                                   step, global_mean, loss, reg, optimizer, weights, order)


def sampled_pointwise_steps(step_fn, tables, states, users, pos_items, pos_indptr,
                            pos_indices, num_negatives, batch_size, seed, step, global_mean,
                            loss, reg, optimizer, weights=None, order=None):
    """:func:`train_steps_sampled` around a backend's own sampled step ``step_fn`` (this
    module's, or the Numba backend's): all of the checks, then the steps."""
    return checked_steps(
        "train_steps_sampled", Loss, "loss", checks.check_train_step_sampled,
        lambda tables, states, u, p, t, loss, optimizer, w: step_fn(
            tables, states, u, p, pos_indptr, pos_indices, num_negatives, seed, t,
            global_mean, loss, reg, optimizer, w),
        tables, states, users, pos_items, pos_indptr, pos_indices, num_negatives, batch_size,
        seed, step, loss, reg, optimizer, weights, order)


def checked_steps(op, loss_codes, loss_what, check, one_step, tables, states, users,
                  pos_items, pos_indptr, pos_indices, num_negatives, batch_size, seed, step,
                  loss, reg, optimizer, weights, order=None):
    """What both multi-step sampled ops do around their step: every check of every step
    first (``check``: the step's own checks, given ``batch_size``; the settings; the
    weights; ``order``; the run's users' CSR rows), then ``one_step(tables, states, users,
    pos_items, step, loss, optimizer, weights)`` on each slice in turn (:func:`run_steps`).
    With ``order`` the run is ``users[order]``, ``pos_items[order]`` (and
    ``weights[order]``): every input is checked whole, then gathered."""
    batch_size = checks.check_int(op, "batch_size", batch_size, 1)
    tables = MFTables(*tables)
    states = MFTables(*(states if states is not None else (None,) * 4))
    loss = parse(loss_codes, loss, op, loss_what)
    optimizer = OptimizerArgs(parse(Optimizer, optimizer.optimizer, op, "optimizer"),
                              optimizer.lr, optimizer.eps)
    run = checks.check_run_order(op, order, tables.user_factors, users)
    check(op, tables, states, users, pos_items, pos_indptr, pos_indices, num_negatives, seed,
          step, loss, optimizer.optimizer, batch_size, run)
    checks.check_settings(op, lr=optimizer.lr, eps=optimizer.eps, reg=reg)
    checks.check_step_weights(op, weights, tables.user_factors, users)
    if order is not None:
        checks.check_ids(op, "order", order, users.shape[0])
        users, pos_items = users.index_select(0, order), pos_items.index_select(0, order)
        weights = None if weights is None else weights.index_select(0, order)
    check_sample_rows(users, pos_indptr, pos_indices, tables.item_factors.shape[0], op)
    return run_steps(lambda u, p, w, t: one_step(tables, states, u, p, t, loss, optimizer, w),
                     users, pos_items, weights, batch_size, step, tables.user_factors)
