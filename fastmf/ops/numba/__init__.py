"""The Numba backend (CPU tensors): the same function names and arguments as
:mod:`fastmf.ops.reference` and :mod:`fastmf.ops.native`, one module per op family.
Importing it imports numba (~0.4 s), so :func:`fastmf.ops.kernels` imports it only when a
Numba kernel is first asked for."""

from fastmf.ops.numba.embedding_bag import (
    embedding_bag_backward,
    embedding_bag_backward_update,
    embedding_bag_backward_update_pair,
    embedding_bag_forward,
    scatter_rows,
    sparse_update,
    unique_bags,
)
from fastmf.ops.numba.pairwise import (
    train_step_pairwise,
    train_step_pairwise_sampled,
    train_steps_pairwise_sampled,
)
from fastmf.ops.numba.pointwise import (
    mf_backward,
    mf_backward_dense,
    mf_forward,
    sparse_adagrad_update,
    sparse_sgd_update,
    train_step,
    train_step_sampled,
    train_steps_sampled,
)
from fastmf.ops.numba.pooled import pooled_rank_steps
from fastmf.ops.numba.sampling import permutation, sample_negatives
from fastmf.ops.numba.topk import topk_scores

NAME = "numba"

__all__ = ["NAME", "embedding_bag_backward", "embedding_bag_backward_update",
           "embedding_bag_backward_update_pair", "embedding_bag_forward", "mf_backward",
           "mf_backward_dense", "mf_forward",
           "permutation", "pooled_rank_steps", "sample_negatives", "scatter_rows",
           "sparse_adagrad_update", "sparse_sgd_update", "sparse_update", "topk_scores",
           "train_step", "train_step_pairwise", "train_step_pairwise_sampled",
           "train_step_sampled", "train_steps_pairwise_sampled", "train_steps_sampled",
           "unique_bags"]
