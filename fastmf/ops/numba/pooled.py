"""The pooled family on the Numba backend: :func:`pooled_rank_steps`, the reference's loop
(:func:`fastmf.ops.reference.pooled.rank_steps`) over this backend's kernels. Its work is in
those kernels (``unique_bags``, the bag lookups and updates, ``mf_forward``,
``mf_backward_dense``, ``sample_negatives``); the loop between them is a few tensor ops."""

from __future__ import annotations

from torch import Tensor

from fastmf.ops.args import PooledSide
from fastmf.ops.reference.pooled import rank_steps

__all__ = ["pooled_rank_steps"]


def pooled_rank_steps(users_side: PooledSide, items_side: PooledSide, users: Tensor,
                      pos_items: Tensor, weights: Tensor | None, pos_indptr: Tensor,
                      pos_indices: Tensor, num_items: int, num_negatives: int,
                      batch_size: int, seed: int, loss: str, reg: float) -> Tensor:
    """See :func:`fastmf.ops.reference.pooled.pooled_rank_steps`."""
    from fastmf.ops import numba as backend

    return rank_steps(backend, users_side, items_side, users, pos_items, weights, pos_indptr,
                      pos_indices, num_items, num_negatives, batch_size, seed, loss, reg)
