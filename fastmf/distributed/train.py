"""``fit_sharded``: the training loop of a :class:`ShardedMF` on the fused sharded steps."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .modules import ShardedMF, local_slice
from .routing import world

__all__ = ["fit_sharded"]

_POINTWISE = ("mse", "huber", "bce")


def _as_ids(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise TypeError(f"fastmf.distributed.fit_sharded: {name} must be 1-D int32/int64 ids, "
                        f"got {t.dtype} of shape {tuple(t.shape)}")
    return t


def fit_sharded(model: ShardedMF, optimizer, users, items, targets=None, *,
                loss: str = "mse", epochs: int = 1, batch_size: int = 1024,
                reg: float = 0.0, seed: int = 0, checkpoint=None,
                verbose: bool = False) -> list[float]:
    """Train a sharded MF on the fused steps for ``epochs`` passes; returns the mean loss of
    each epoch (the same on every rank).

    Every rank passes the SAME full training set (users, items and, for the pointwise
    losses "mse"/"huber"/"bce", targets); each epoch shuffles it with a generator seeded by
    (``seed``, epoch), identical on all ranks, cuts global batches of ``batch_size`` and each
    rank trains on its :func:`local_slice` of every batch. ``loss="bpr"`` draws one uniform
    negative item per positive from the same generator (targets ignored). The result equals
    one process running ``fastmf.train_step``/``train_step_pairwise`` on the same batches.
    ``checkpoint``: a folder for :func:`fastmf.distributed.save` after every epoch.
    """
    from .checkpoint import save

    rank, _ = world(model.group)
    if loss not in _POINTWISE + ("bpr",):
        raise ValueError(f"fastmf.distributed.fit_sharded: unknown loss {loss!r}; expected "
                         f"one of {_POINTWISE + ('bpr',)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fastmf.distributed.fit_sharded: {name} must be a positive int, "
                             f"got {value!r}")
    users, items = _as_ids("users", users), _as_ids("items", items)
    if loss != "bpr":
        if targets is None:
            raise ValueError(f"fastmf.distributed.fit_sharded: loss {loss!r} needs targets")
        targets = torch.as_tensor(targets).to(model.user_factors.dtype)
        if targets.shape != users.shape:
            raise ValueError("fastmf.distributed.fit_sharded: targets has shape "
                             f"{tuple(targets.shape)}, users {tuple(users.shape)}")
    if items.shape != users.shape:
        raise ValueError(f"fastmf.distributed.fit_sharded: items has shape "
                         f"{tuple(items.shape)}, users {tuple(users.shape)}")
    history = []
    n = users.numel()
    for epoch in range(epochs):
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for begin in range(0, n, batch_size):
            idx = order[begin:begin + batch_size]
            part = idx[local_slice(idx.numel(), model.group)]
            if loss == "bpr":
                negatives = torch.randint(0, model.num_items, (idx.numel(),), generator=gen)
                neg = negatives[local_slice(idx.numel(), model.group)]
                value = model.train_step_pairwise(optimizer, users[part], items[part], neg,
                                                  reg=reg)
            else:
                value = model.train_step(optimizer, users[part], items[part], targets[part],
                                         loss=loss, reg=reg)
            total += float(value) * idx.numel()
            count += idx.numel()
        history.append(total / max(count, 1))
        if checkpoint is not None:
            save(checkpoint, model, [optimizer], process_group=model.group,
                 extra={"epoch": epoch + 1, "history": history})
        if verbose and rank == 0:
            print(f"epoch {epoch + 1}/{epochs}: loss {history[-1]:.5f} "
                  f"({time.perf_counter() - start:.2f} s)", flush=True)
    dist.barrier(group=model.group)
    return history
