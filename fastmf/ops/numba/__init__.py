"""The Numba backend (CPU tensors): the same function names and arguments as
:mod:`fastmf.ops.reference` and :mod:`fastmf.ops.native`, one module per op family.
Importing it imports numba (~0.4 s), so :func:`fastmf.ops.kernels` imports it only when a
Numba kernel is first asked for."""

from fastmf.ops.numba.pairwise import train_step_pairwise
from fastmf.ops.numba.pointwise import (
    mf_backward,
    mf_forward,
    sparse_adagrad_update,
    sparse_sgd_update,
    train_step,
)
from fastmf.ops.numba.topk import topk_scores

NAME = "numba"

__all__ = ["NAME", "mf_backward", "mf_forward", "sparse_adagrad_update", "sparse_sgd_update",
           "topk_scores", "train_step", "train_step_pairwise"]
