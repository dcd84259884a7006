"""The argument bundles the fused ops take in Python (the schemas in ``csrc/fastmf.cpp``
stay flat, as ``TORCH_LIBRARY`` requires; :mod:`fastmf.ops.native` unpacks them, and the
C++ kernels pack them again into ``StepTables``/``OptimizerArgs`` structs at the op
boundary). FBGEMM's ``CommonArgs``/``OptimizerArgs`` are the model."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from fastmf.ops.codes import Optimizer, WeightDecay

__all__ = ["MFTables", "OptimizerArgs", "PooledSide", "RowOptimizerArgs"]


class MFTables(NamedTuple):
    """The four tables of biased MF, or their optimizer states (same slots).

    user_factors (U, K), item_factors (I, K), user_bias (U,), item_bias (I,); the biases
    are both present or both None. As states: shaped like each table (element-wise
    Adagrad), (N,) per table (row-wise Adagrad), or the bundle is None (SGD)."""

    user_factors: Tensor | None
    item_factors: Tensor | None
    user_bias: Tensor | None = None
    item_bias: Tensor | None = None


class OptimizerArgs(NamedTuple):
    """Which sparse optimizer a fused step applies, and its settings."""

    optimizer: Optimizer
    lr: float
    eps: float = 0.0


class RowOptimizerArgs(NamedTuple):
    """The settings of one exact sparse step of the embedding ops (``sparse_update``,
    ``embedding_bag_backward_update``); the schemas take them flat, in this order.

    ``step`` is the optimizer's step count for the weight AFTER incrementing it for this
    step (1 on the first step): Adam's bias correction and the stochastic-rounding counter
    use it. ``seed`` and ``stochastic_rounding`` only matter for float16/bfloat16 weights.
    """

    optimizer: Optimizer
    lr: float
    eps: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    weight_decay_mode: WeightDecay = WeightDecay.NONE
    step: int = 1
    seed: int = 0
    stochastic_rounding: bool = False


class PooledSide(NamedTuple):
    """One side (users or items) of the pooled ranking steps
    (:func:`fastmf.ops.reference.pooled.pooled_rank_steps`): a table ``(N, K)`` and its bias
    column ``(N, 1)``, each with its optimizer states ``(state1, state2)`` as the embedding
    ops take them (None where the optimizer keeps none) and its :class:`RowOptimizerArgs`
    (``step``: the step of the first run), and the CSR bags that pool its ids: ``indptr``
    (R + 1,), ``indices`` (nnz,) rows of the tables, ``weights`` (nnz,) float (a features
    matrix, identity rows included). The four tables of a call share the optimizer
    settings; each has its own step, seed and rounding."""

    table: Tensor
    table_states: tuple[Tensor | None, Tensor | None]
    table_args: RowOptimizerArgs
    bias: Tensor
    bias_states: tuple[Tensor | None, Tensor | None]
    bias_args: RowOptimizerArgs
    indptr: Tensor
    indices: Tensor
    weights: Tensor
