"""FBGEMM's CPU table-batched embedding (TBE) for ``bench_embedding.py``, when installed.

fbgemm-gpu-cpu is not a fastmf dependency and CI does not install it; without it
``MISSING`` says why and the FBGEMM cases skip with that reason. Version 1.8.0 loads with
torch 2.13.0+cpu (1.9.0 does not); install it beside the environment, not into it, so it
cannot replace torch:

    pip install --no-deps --target /tmp/fbgemm fbgemm-gpu-cpu==1.8.0
    PYTHONPATH=/tmp/fbgemm pytest benchmarks/bench_embedding.py

One TBE holds every table of a model; ``feature_table_map`` says which table each feature
(one bag per sample) reads, so one forward call looks up all features. Its inputs are
feature-major: the B bags of feature 0, then the B bags of feature 1, ...; its output is
(B, sum of the features' dims), the features side by side. The optimizer runs inside the
backward pass (as ``fastmf.optim.apply_in_backward`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
except Exception as error:  # not installed, or built for another torch (OSError, RuntimeError)
    MISSING: str | None = f"fbgemm_gpu is not importable ({type(error).__name__}: {error})"
else:
    MISSING = None

# The optimizers FBGEMM's CPU TBE has (1.8.0 refuses PARTIAL_ROWWISE_ADAM and ADAM on CPU),
# by the names bench_embedding.py uses.
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
DTYPES = (torch.float32, torch.float16)  # FBGEMM has no bfloat16 CPU weights


def make_tbe(tables: list[Tensor], feature_table_map: list[int], optimizer: str, lr: float,
             eps: float, dtype: torch.dtype = torch.float32):
    """A CPU TBE whose tables start as copies of ``tables`` ((N_t, K_t) float32 each, values
    exactly representable in ``dtype``), stepped by ``optimizer`` ("sgd": EXACT_SGD,
    "adagrad": EXACT_ADAGRAD, "rowwise_adagrad": EXACT_ROWWISE_ADAGRAD) in backward.
    float16 tables are written back with FBGEMM's stochastic rounding."""
    if MISSING is not None:
        raise RuntimeError(MISSING)
    codes = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    precisions = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16}
    if optimizer not in codes:
        raise ValueError(f"make_tbe: optimizer {optimizer!r} is not one FBGEMM's CPU TBE has; "
                         f"expected one of {OPTIMIZERS}")
    if dtype not in precisions:
        raise ValueError(f"make_tbe: dtype {dtype} is not float32 or float16")
    specs = [(t.shape[0], t.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU)
             for t in tables]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        specs, feature_table_map=feature_table_map, optimizer=codes[optimizer],
        learning_rate=lr, eps=eps, weights_precision=precisions[dtype],
        output_dtype=SparseType.FP32, stochastic_rounding=True, pooling_mode=PoolingMode.SUM)
    with torch.no_grad():
        for mine, init in zip(tbe.split_embedding_weights(), tables, strict=True):
            mine.copy_(init)
    return tbe


def table_weights(tbe) -> list[Tensor]:
    """The TBE's tables as float32 copies, in the order they were given."""
    return [w.detach().float().clone() for w in tbe.split_embedding_weights()]
