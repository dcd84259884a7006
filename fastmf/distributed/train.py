"""``fit_sharded``: :func:`fastmf.fit` on a sharded model from id arrays."""

from __future__ import annotations

import torch

from .modules import ShardedMF

__all__ = ["fit_sharded"]

_LOSSES = ("mse", "huber", "bce", "bpr")


def _as_ids(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise TypeError(f"fastmf.distributed.fit_sharded: {name} must be 1-D int32/int64 ids, "
                        f"got {t.dtype} of shape {tuple(t.shape)}")
    return t


def fit_sharded(model: ShardedMF, optimizer, users, items, targets=None, *,
                loss: str = "mse", epochs: int = 1, batch_size: int = 1024,
                reg: float = 0.0, seed: int = 0, checkpoint=None, resume: bool = False,
                num_negatives: int = 1, verbose: bool = False) -> list[float]:
    """Train a sharded model with :func:`fastmf.fit` on the interactions ``(users, items)``
    for ``epochs`` passes; returns the mean loss of each epoch (the same on every rank).

    Every rank passes the SAME full training set: ``targets`` are the ratings of the
    explicit losses "mse"/"huber"; for "bce"/"bpr" the pairs are the positives and each
    gets ``num_negatives`` sampled negative items (fit's implicit losses; ``targets`` are
    ignored). Batches, shuffling and negatives are fit's, seeded by ``seed``: the result
    equals one process running ``fastmf.fit`` on the unsharded model. ``checkpoint``: a
    folder for a sharded checkpoint after every epoch (``resume=True`` continues
    from it, at any world size). ``verbose``: progress on rank 0.
    """
    from fastmf.data import Interactions
    from fastmf.train import fit

    if loss not in _LOSSES:
        raise ValueError(f"fastmf.distributed.fit_sharded: unknown loss {loss!r}; expected "
                         f"one of {_LOSSES}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fastmf.distributed.fit_sharded: {name} must be a positive int, "
                             f"got {value!r}")
    users, items = _as_ids("users", users), _as_ids("items", items)
    if items.shape != users.shape:
        raise ValueError(f"fastmf.distributed.fit_sharded: items has shape "
                         f"{tuple(items.shape)}, users {tuple(users.shape)}")
    ratings = None
    if loss in ("mse", "huber"):
        if targets is None:
            raise ValueError(f"fastmf.distributed.fit_sharded: loss {loss!r} needs targets")
        ratings = torch.as_tensor(targets)
        if ratings.shape != users.shape:
            raise ValueError("fastmf.distributed.fit_sharded: targets has shape "
                             f"{tuple(ratings.shape)}, users {tuple(users.shape)}")
        ratings = ratings.double().cpu().numpy()
    data = Interactions(users.cpu().numpy(), items.cpu().numpy(), ratings,
                        user_map=model.num_users, item_map=model.num_items)
    history = fit(model, data, loss=loss, epochs=epochs, batch_size=batch_size,
                  optimizer=optimizer, reg=reg, seed=seed, checkpoint=checkpoint, resume=resume,
                  num_negatives=num_negatives, progress=verbose, set_global_mean=False)
    return [float(v) for v in history["loss"]]
