"""The reference backend: every fastmf op as plain PyTorch, the spec the other backends
are tested against. Same function names and arguments as :mod:`fastmf.ops.native` and
:mod:`fastmf.ops.numba`; one module per op family."""

from fastmf.ops.reference.embedding_bag import (
    embedding_bag_backward,
    embedding_bag_backward_update,
    embedding_bag_backward_update_pair,
    embedding_bag_forward,
    scatter_rows,
    sparse_update,
    unique_bags,
)
from fastmf.ops.reference.pairwise import (
    train_step_pairwise,
    train_step_pairwise_sampled,
    train_steps_pairwise_sampled,
)
from fastmf.ops.reference.pointwise import (
    mf_backward,
    mf_backward_dense,
    mf_forward,
    sparse_adagrad_update,
    sparse_sgd_update,
    train_step,
    train_step_sampled,
    train_steps_sampled,
)
from fastmf.ops.reference.pooled import pooled_rank_steps
from fastmf.ops.reference.sampling import permutation, sample_negatives
from fastmf.ops.reference.topk import topk_scores

NAME = "reference"

__all__ = ["NAME", "embedding_bag_backward", "embedding_bag_backward_update",
           "embedding_bag_backward_update_pair", "embedding_bag_forward", "mf_backward",
           "mf_backward_dense", "mf_forward",
           "permutation", "pooled_rank_steps", "sample_negatives", "scatter_rows",
           "sparse_adagrad_update", "sparse_sgd_update", "sparse_update", "topk_scores",
           "train_step", "train_step_pairwise", "train_step_pairwise_sampled",
           "train_steps_pairwise_sampled", "train_steps_sampled",
           "train_step_sampled", "unique_bags"]
