"""``fastmf.train_step``: forward, loss gradient, backward and optimizer update fused into
one kernel call, with no autograd graph."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastmf import ops
from fastmf.layers import MF
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import Loss, Optimizer, PairwiseLoss, names
from fastmf.optim import SparseAdagrad, SparseSGD


def _fused_optimizer(model: MF, optimizer) -> tuple[OptimizerArgs, MFTables | None]:
    """(optimizer settings, states of the four tables or None for SGD) for ``optimizer``."""
    if not isinstance(optimizer, SparseAdagrad | SparseSGD):
        raise TypeError(
            "fastmf.train_step fuses fastmf.optim.SparseAdagrad or SparseSGD, got "
            f"{type(optimizer).__name__}; for other optimizers use the unfused path "
            "(loss.backward(); optimizer.step())"
        )
    tables = model.tables()
    groups = []
    for table in tables:
        if table is None:
            continue
        try:
            groups.append(optimizer.hyperparameters(table))
        except KeyError:
            raise ValueError("fastmf.train_step: the optimizer does not hold all of the "
                             "model's parameters") from None
    if any(g.get("weight_decay", 0.0) for g in groups):
        raise ValueError("fastmf.train_step: the fused MF step has no weight_decay (use its "
                         "reg= argument, or the unfused path loss.backward(); "
                         "optimizer.step())")
    if any(g is not groups[0] for g in groups):
        keys = ("lr", "eps", "rowwise")
        if any(tuple(g.get(k) for k in keys) != tuple(groups[0].get(k) for k in keys)
               for g in groups):
            raise ValueError("fastmf.train_step: all of the model's parameters must share "
                             "one lr (and eps/rowwise)")
    group = groups[0]
    if isinstance(optimizer, SparseSGD):
        return OptimizerArgs(Optimizer.SGD, group["lr"]), None
    code = Optimizer.ROWWISE_ADAGRAD if group["rowwise"] else Optimizer.ADAGRAD
    states = MFTables(*(None if t is None else optimizer.state_for(t) for t in tables))
    return OptimizerArgs(code, group["lr"], group["eps"]), states


def _parse_loss(enum, loss: str, op: str):
    if not isinstance(loss, str) or loss.upper() not in enum.__members__:
        raise ValueError(f"fastmf.{op}: unknown loss {loss!r}; expected one of {names(enum)}")
    return enum[loss.upper()]


def _weights(model: MF, weights, op: str):
    """``weights`` (None, a tensor or array-like of B floats) in the model's dtype, on its
    device; their length and values are checked by the backend's kernel."""
    if weights is None:
        return None
    dtype, device = model.user_factors.dtype, model.user_factors.device
    if isinstance(weights, Tensor):
        if not weights.is_floating_point():
            raise TypeError(f"fastmf.{op}: weights must be floating point, got {weights.dtype}")
        return weights.to(dtype)
    return torch.as_tensor(np.asarray(weights, dtype=np.float64), device=device).to(dtype)


def _detached(model: MF) -> MFTables:
    return MFTables(*(None if t is None else t.detach() for t in model.tables()))


def train_step(model: MF, optimizer, users, items, targets, *, loss: str = "mse",
               reg: float = 0.0, weights=None) -> Tensor:
    """One fused training step on a batch; returns the loss (0-d tensor, data term + reg).

    Updates ``model``'s weights and ``optimizer``'s state in place exactly as the unfused
    sequence would (within fp32 rounding)::

        pred = model(users, items)
        total = F.mse_loss(pred, targets)            # or huber (delta 1) / bce with logits
        total += reg * mean_b(||P[u_b]||² + ||Q[i_b]||² + b_u[u_b]² + b_i[i_b]²)
        total.backward(); optimizer.step(); optimizer.zero_grad()

    The reg term is a per-sample L2 penalty on the rows and biases the batch touches
    (FunkSVD style): untouched rows are not decayed, and a row seen n times in the batch is
    penalised n times. ``optimizer`` must be :class:`fastmf.optim.SparseAdagrad` (either
    mode) or :class:`fastmf.optim.SparseSGD` holding all of the model's parameters with one
    learning rate. Runs on ``model.backend``'s kernels; an empty batch is a no-op returning 0.

    users, items: (B,) int32/int64; targets: (B,) float (ratings, or 0/1 labels for bce);
    weights: None or (B,) finite weights >= 0 (e.g. confidences
    ``1 + alpha * log(1 + count / eps)``, Hu, Koren & Volinsky 2008) scaling each sample's
    data term: ``mean_b(w_b * loss_b) + reg term`` (the mean stays over B; the reg term is
    not weighted), as :func:`fastmf.models.pointwise_loss` with ``weights``.

    >>> import torch, fastmf
    >>> model = fastmf.MF(100, 50, dim=8, global_mean=3.5)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    >>> u, i = torch.randint(0, 100, (256,)), torch.randint(0, 50, (256,))
    >>> r = torch.rand(256) * 4 + 1
    >>> loss = fastmf.train_step(model, opt, u, i, r, reg=0.01)
    """
    code = _parse_loss(Loss, loss, "train_step")
    settings, states = _fused_optimizer(model, optimizer)
    # lr, eps, reg and separate tables are checked by every backend's kernel before it
    # writes; the optimizer adds its own rules (eps > 0), for all groups.
    optimizer.check_groups()
    users, items = model.as_ids(users, "users"), model.as_ids(items, "items")
    dtype, device = model.user_factors.dtype, model.user_factors.device
    if isinstance(targets, Tensor):
        if not targets.is_floating_point():
            targets = targets.to(dtype)
    else:
        targets = torch.as_tensor(np.asarray(targets, dtype=np.float64), device=device)
    targets = targets.to(dtype)
    weights = _weights(model, weights, "train_step")
    kernels = ops.kernels(model.backend, model.user_factors.device)
    with torch.no_grad():
        return kernels.train_step(_detached(model), states, users, items, targets, model.mu,
                                  code, float(reg), settings, weights)


def train_step_pairwise(model: MF, optimizer, users, pos_items, neg_items, *,
                        loss: str = "bpr", reg: float = 0.0, weights=None) -> Tensor:
    """One fused pairwise (implicit-feedback) step; returns the loss (0-d tensor).

    Each sample is (user, positive item, sampled negative item); BPR minimises
    ``mean softplus(-(x_ui - x_uj))`` with ``x_ui - x_uj = b_i - b_j + <P[u], Q[i] - Q[j]>``,
    plus ``reg * mean_b(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²)``. Every row touched
    by the batch — an item may appear as a positive and as a negative — gets exactly one
    optimizer update with its summed gradient, as the unfused autograd sequence would give.
    For k negatives per positive, repeat the users and positives k times.

    users, pos_items, neg_items: (B,) int32/int64; weights: None or (B,) finite weights
    >= 0 scaling each sample's softplus term (the mean stays over B; reg is not weighted).
    """
    code = _parse_loss(PairwiseLoss, loss, "train_step_pairwise")
    settings, states = _fused_optimizer(model, optimizer)
    optimizer.check_groups()
    users = model.as_ids(users, "users")
    pos_items = model.as_ids(pos_items, "pos_items")
    neg_items = model.as_ids(neg_items, "neg_items")
    weights = _weights(model, weights, "train_step_pairwise")
    kernels = ops.kernels(model.backend, model.user_factors.device)
    with torch.no_grad():
        return kernels.train_step_pairwise(_detached(model), states, users, pos_items,
                                           neg_items, code, float(reg), settings, weights)


def train_step_pairwise_sampled(model: MF, optimizer, users, pos_items, pos_indptr,
                                pos_indices, num_negatives: int, *, seed: int, step: int,
                                loss: str = "bpr", reg: float = 0.0, weights=None) -> Tensor:
    """:func:`train_step_pairwise` with ``num_negatives`` uniform negatives per positive
    drawn inside the fused op: each is uniform over the items outside the user's row of
    the positives' CSR (``pos_indptr`` (U+1,), ``pos_indices``, rows sorted and distinct,
    e.g. :meth:`fastmf.data.NegativeSampler.csr`), counter-based in (``seed``, ``step``), so
    the same on every backend and thread count (the items of
    :meth:`fastmf.data.NegativeSampler.sample_step`). One kernel call, no sampling pass;
    the loss is the mean over the B * num_negatives pairs. ``weights`` (None or (B,), finite,
    >= 0): each positive's weight scales the terms of all of its pairs.

    >>> import torch, fastmf
    >>> model = fastmf.MF(3, 5, dim=4)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    >>> indptr, indices = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 4, 1])
    >>> loss = train_step_pairwise_sampled(model, opt, torch.tensor([0, 1]),
    ...                                    torch.tensor([0, 1]), indptr, indices, 2,
    ...                                    seed=0, step=0)
    """
    code = _parse_loss(PairwiseLoss, loss, "train_step_pairwise_sampled")
    kernels, settings, states, users, pos_items = _sampled_arguments(
        "train_step_pairwise_sampled", model, optimizer, users, pos_items)
    weights = _weights(model, weights, "train_step_pairwise_sampled")
    with torch.no_grad():
        return kernels.train_step_pairwise_sampled(_detached(model), states, users, pos_items,
                                                   pos_indptr, pos_indices, num_negatives,
                                                   seed, step, code, float(reg), settings,
                                                   weights)


def train_steps_pairwise_sampled(model: MF, optimizer, users, pos_items, pos_indptr,
                                 pos_indices, num_negatives: int, *, batch_size: int,
                                 seed: int, step: int = 0, loss: str = "bpr",
                                 reg: float = 0.0, weights=None, order=None) -> Tensor:
    """:func:`train_step_pairwise_sampled` on each run of ``batch_size`` positives in turn
    (the t-th slice at ``step + t``), in one kernel call: an epoch of BPR without a Python
    loop. The tables, states and losses are those of the loop::

        for t, lo in enumerate(range(0, len(users), batch_size)):
            train_step_pairwise_sampled(model, optimizer, users[lo:lo + batch_size],
                                        pos_items[lo:lo + batch_size], pos_indptr,
                                        pos_indices, num_negatives, seed=seed,
                                        step=step + t, loss=loss, reg=reg, weights=...)

    except that every id, weight and CSR row of every slice is checked before the first
    step (on the CPU backends bad input anywhere writes nothing). ``order`` (None, or (n,)
    int32/int64 positions in ``[0, len(users))``, repeats allowed, e.g. an epoch's
    ``torch.randperm``): the run is ``users[order]``, ``pos_items[order]`` (and
    ``weights[order]``), read through ``order`` without a gathered copy, every input still
    checked whole. Returns the steps' losses, (ceil(n / batch_size),), n the run's length.

    >>> import torch, fastmf
    >>> model = fastmf.MF(3, 5, dim=4)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    >>> indptr, indices = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 4, 1])
    >>> losses = train_steps_pairwise_sampled(model, opt, torch.tensor([0, 1, 2]),
    ...                                       torch.tensor([0, 1, 3]), indptr, indices, 1,
    ...                                       batch_size=2, seed=0)
    >>> losses.shape
    torch.Size([2])
    """
    op = "train_steps_pairwise_sampled"
    code = _parse_loss(PairwiseLoss, loss, op)
    kernels, settings, states, users, pos_items = _sampled_arguments(
        op, model, optimizer, users, pos_items)
    weights = _weights(model, weights, op)
    order = _order(model, order)
    with torch.no_grad():
        return kernels.train_steps_pairwise_sampled(_detached(model), states, users, pos_items,
                                                    pos_indptr, pos_indices, num_negatives,
                                                    batch_size, seed, step, code, float(reg),
                                                    settings, weights, order)


def _order(model: MF, order):
    """A multi-step op's order as a tensor on the model's device (the op checks it)."""
    return None if order is None else model.as_ids(order, "order")


def _sampled_arguments(op: str, model: MF, optimizer, users, pos_items):
    """(backend module, optimizer settings, states, users, positives) of a sampled step."""
    settings, states = _fused_optimizer(model, optimizer)
    optimizer.check_groups()
    users = model.as_ids(users, "users")
    pos_items = model.as_ids(pos_items, "pos_items")
    kernels = ops.kernels(model.backend, model.user_factors.device, kernel=op)
    return kernels, settings, states, users, pos_items


def train_step_sampled(model: MF, optimizer, users, pos_items, pos_indptr, pos_indices,
                       num_negatives: int, *, seed: int, step: int, loss: str = "bce",
                       reg: float = 0.0, weights=None) -> Tensor:
    """:func:`train_step` on each positive (label 1) and ``num_negatives`` uniform negatives
    per positive (label 0) drawn inside the fused op, as
    :func:`train_step_pairwise_sampled` draws them: uniform over the items outside the
    user's row of the positives' CSR (``pos_indptr`` (U+1,), ``pos_indices``, rows sorted
    and distinct, e.g. :meth:`fastmf.data.NegativeSampler.csr`), counter-based in
    (``seed``, ``step``), the items of :meth:`fastmf.data.NegativeSampler.sample_step`. One
    kernel call, no sampling pass; the loss (``"bce"`` for implicit feedback) is the mean
    over the B * (1 + num_negatives) rows, the positives' rows first. ``weights`` (None or
    (B,), finite, >= 0) scale the positives' rows only; each negative's row weighs 1, as
    confidence weighs the observed pairs (Hu, Koren & Volinsky 2008).

    >>> import torch, fastmf
    >>> model = fastmf.MF(3, 5, dim=4)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    >>> indptr, indices = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 4, 1])
    >>> loss = train_step_sampled(model, opt, torch.tensor([0, 1]), torch.tensor([0, 1]),
    ...                           indptr, indices, 2, seed=0, step=0)
    """
    code = _parse_loss(Loss, loss, "train_step_sampled")
    kernels, settings, states, users, pos_items = _sampled_arguments(
        "train_step_sampled", model, optimizer, users, pos_items)
    weights = _weights(model, weights, "train_step_sampled")
    with torch.no_grad():
        return kernels.train_step_sampled(_detached(model), states, users, pos_items,
                                          pos_indptr, pos_indices, num_negatives, seed, step,
                                          model.mu, code, float(reg), settings, weights)


def train_steps_sampled(model: MF, optimizer, users, pos_items, pos_indptr, pos_indices,
                        num_negatives: int, *, batch_size: int, seed: int, step: int = 0,
                        loss: str = "bce", reg: float = 0.0, weights=None,
                        order=None) -> Tensor:
    """:func:`train_step_sampled` on each run of ``batch_size`` positives in turn (the t-th
    slice at ``step + t``), in one kernel call, as :func:`train_steps_pairwise_sampled`
    runs the pairwise step: the tables, states and losses of the loop of single steps,
    every input checked before the first step, the run read through ``order`` when given
    (as there). Returns the steps' losses, (ceil(n / batch_size),), n the run's length.

    >>> import torch, fastmf
    >>> model = fastmf.MF(3, 5, dim=4)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    >>> indptr, indices = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 4, 1])
    >>> losses = train_steps_sampled(model, opt, torch.tensor([0, 1, 2]),
    ...                              torch.tensor([0, 1, 3]), indptr, indices, 2,
    ...                              batch_size=2, seed=0)
    >>> losses.shape
    torch.Size([2])
    """
    op = "train_steps_sampled"
    code = _parse_loss(Loss, loss, op)
    kernels, settings, states, users, pos_items = _sampled_arguments(
        op, model, optimizer, users, pos_items)
    weights = _weights(model, weights, op)
    order = _order(model, order)
    with torch.no_grad():
        return kernels.train_steps_sampled(_detached(model), states, users, pos_items,
                                           pos_indptr, pos_indices, num_negatives, batch_size,
                                           seed, step, model.mu, code, float(reg), settings,
                                           weights, order)
