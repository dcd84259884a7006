"""The spec: every fastmf operation written plainly with ``nn.Embedding`` / ``torch.optim``
semantics. Every other backend (C++, Numba, CUDA) is tested against these functions.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("mse", "huber", "bce")
LOSS_CODES = {name: code for code, name in enumerate(LOSSES)}
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
OPTIMIZER_CODES = {name: code for code, name in enumerate(OPTIMIZERS)}
HUBER_DELTA = 1.0


def mf_forward(users, items, user_factors, item_factors, user_bias, item_bias, global_mean):
    """``global_mean + b_u + b_i + <P[u], Q[i]>`` for each (user, item) pair: (B,)."""
    p = F.embedding(users.long(), user_factors)
    q = F.embedding(items.long(), item_factors)
    pred = (p * q).sum(1) + global_mean
    if user_bias is not None:
        pred = pred + user_bias[users.long()] + item_bias[items.long()]
    return pred


def mf_backward(grad_out, users, items, user_factors, item_factors):
    """Per-sample gradient rows of the dot product: ``(g*Q[i], g*P[u])``, each (B, K)."""
    g = grad_out.unsqueeze(1)
    return g * item_factors[items.long()], g * user_factors[users.long()]


def pointwise_loss(pred, targets, loss: str):
    """The mean loss named by ``loss`` (see the module docstring)."""
    if loss == "mse":
        return F.mse_loss(pred, targets)
    if loss == "huber":
        return F.huber_loss(pred, targets, delta=HUBER_DELTA)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(pred, targets)
    raise ValueError(f"fastmf: unknown loss {loss!r}; expected one of {LOSSES}")


def reg_term(users, items, user_factors, item_factors, user_bias, item_bias, reg):
    """``reg * mean_b(||P[u_b]||² + ||Q[i_b]||² + b_u² + b_i²)`` (0 when the batch is empty)."""
    u, i = users.long(), items.long()
    per_sample = user_factors[u].pow(2).sum(1) + item_factors[i].pow(2).sum(1)
    if user_bias is not None:
        per_sample = per_sample + user_bias[u].pow(2) + item_bias[i].pow(2)
    if per_sample.numel() == 0:
        return per_sample.sum()
    return reg * per_sample.mean()


def coalesce_rows(ids, grad_rows):
    """Unique ids (ascending) and the sum of each one's grad rows: like
    ``torch.sparse_coo_tensor(...).coalesce()``."""
    unique, inverse = torch.unique(ids.long(), return_inverse=True)
    summed = grad_rows.new_zeros((unique.numel(),) + tuple(grad_rows.shape[1:]))
    summed.index_add_(0, inverse, grad_rows)
    return unique, summed


@torch.no_grad()
def sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps, rowwise):
    """In place. Element-wise (``torch.optim.Adagrad``, lr_decay=0, weight_decay=0)::

        g = sum of the grad rows of each unique id;  G[id] += g²;  w[id] -= lr·g/(√G[id] + eps)

    Row-wise (FBGEMM's exact row-wise Adagrad; ``state`` is (N,))::

        G[id] += mean_k(g²);  w[id] -= lr·g/(√G[id] + eps)
    """
    if ids.numel() == 0:
        return
    unique, g = coalesce_rows(ids, grad_rows)
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
    if ids.numel() == 0:
        return
    unique, g = coalesce_rows(ids, grad_rows)
    weight[unique] -= lr * g


def train_step(
    user_factors,
    item_factors,
    user_bias,
    item_bias,
    user_factors_state,
    item_factors_state,
    user_bias_state,
    item_bias_state,
    users,
    items,
    targets,
    global_mean,
    loss,
    reg,
    optimizer,
    lr,
    eps,
):
    """The spec of the fused ``train_step`` op (same arguments; ``loss`` and ``optimizer``
    are names or codes). Gathers the rows as ``nn.Embedding(sparse=True)`` would, takes
    the loss and its gradient with autograd, then applies the sparse optimizer to each
    table: every gradient is computed from the weights as they were before the step.
    Returns the loss (data term + reg term) as a 0-d tensor."""
    loss = LOSSES[loss] if isinstance(loss, int) else loss
    optimizer = OPTIMIZERS[optimizer] if isinstance(optimizer, int) else optimizer
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
        total = pointwise_loss(pred, targets, loss) + reg * per_sample.mean()
        grads = torch.autograd.grad(total, rows)
    tables = [(user_factors, user_factors_state, u), (item_factors, item_factors_state, i)]
    if user_bias is not None:
        tables += [(user_bias, user_bias_state, u), (item_bias, item_bias_state, i)]
    for (weight, state, ids), g in zip(tables, grads):
        _apply_sparse(optimizer, weight, state, ids, g, lr, eps)
    return total.detach()


PAIRWISE_LOSSES = ("bpr",)
PAIRWISE_LOSS_CODES = {name: code for code, name in enumerate(PAIRWISE_LOSSES)}


def _apply_sparse(optimizer, weight, state, ids, grad_rows, lr, eps):
    if optimizer == "sgd":
        sparse_sgd_update(weight, ids, grad_rows, lr)
    else:
        sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps,
                              optimizer == "rowwise_adagrad")


def train_step_pairwise(
    user_factors,
    item_factors,
    user_bias,
    item_bias,
    user_factors_state,
    item_factors_state,
    user_bias_state,
    item_bias_state,
    users,
    pos_items,
    neg_items,
    loss,
    reg,
    optimizer,
    lr,
    eps,
):
    """The spec of the fused pairwise step (BPR). Each sample is (u, i, j) with i a
    positive and j a sampled negative item of user u::

        x = b_i - b_j + <P[u], Q[i] - Q[j]>          (mu and b_u cancel)
        loss = mean_b softplus(-x)  (= -mean log σ(x))
             + reg * mean_b(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²)

    An item row's positive and negative gradients are summed before its single optimizer
    update; ``user_bias`` (no gradient) is left untouched. Returns the loss (0-d)."""
    loss = PAIRWISE_LOSSES[loss] if isinstance(loss, int) else loss
    if loss not in PAIRWISE_LOSSES:
        raise ValueError(f"fastmf: unknown pairwise loss {loss!r}; expected {PAIRWISE_LOSSES}")
    optimizer = OPTIMIZERS[optimizer] if isinstance(optimizer, int) else optimizer
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
        total = F.softplus(-x).mean() + reg * per_sample.mean()
        grads = torch.autograd.grad(total, rows)
    both = torch.cat([i, j])
    _apply_sparse(optimizer, user_factors, user_factors_state, u, grads[0], lr, eps)
    _apply_sparse(optimizer, item_factors, item_factors_state, both,
                  torch.cat([grads[1], grads[2]]), lr, eps)
    if item_bias is not None:
        _apply_sparse(optimizer, item_bias, item_bias_state, both,
                      torch.cat([grads[3], grads[4]]), lr, eps)
    return total.detach()
