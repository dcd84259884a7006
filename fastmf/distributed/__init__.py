"""Row-wise sharded embedding training on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

:func:`shard` turns every fastmf embedding table of a model (``fastmf.MF``'s four tables,
``fastmf.nn.Embedding``/``EmbeddingBag``) into a sharded one: each rank stores and optimises
only its rows (row ``g`` on rank ``g % W``) and their optimizer state. A step routes each
rank's ids to their owners with ``torch.distributed.all_to_all_single``, the owners send the
rows back, the loss is computed locally, and the gradient rows travel back to the owners,
which apply the fused fastmf sparse optimizer once per unique row with every rank's
gradients summed in the global batch's order. Replicated (dense) parameters are
data-parallel: :func:`sync_dense_grads` sums their gradients.

Exactness contract: with every rank holding a contiguous slice of the global batch
(:func:`local_slice`) and each rank's loss its share of the global loss (sum over its
samples divided by the GLOBAL batch size), a sharded run matches one process on the whole
batch.

>>> # torchrun --nproc-per-node 2 -m fastmf.distributed --users 10000 --items 5000  # doctest: +SKIP
>>> import torch.distributed as dist, fastmf, fastmf.distributed as fd  # doctest: +SKIP
>>> dist.init_process_group("gloo")                                     # doctest: +SKIP
>>> model = fd.shard(fastmf.MF(10_000, 5_000, dim=32))                  # doctest: +SKIP
>>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)       # doctest: +SKIP
>>> part = fd.local_slice(len(users))                                   # doctest: +SKIP
>>> loss = model.train_step(opt, users[part], items[part], ratings[part])  # doctest: +SKIP

:func:`fastmf.fit` trains a sharded model directly (``fastmf.fit(fd.shard(model), train)``
or ``fastmf.fit(model, train, distributed=True)``): see :mod:`fastmf.distributed.fit`.
"""

from .checkpoint import load, load_model, save
from .fit import FitContext, gather_model
from .modules import (
                      ShardedEmbedding,
                      ShardedEmbeddingBag,
                      ShardedMF,
                      apply_sparse,
                      is_sharded,
                      local_slice,
                      loss_share,
                      shard,
                      sync_dense_grads,
)
from .routing import Route, local_rows, owner_of, timings
from .train import fit_sharded

__all__ = ["FitContext", "Route", "ShardedEmbedding", "ShardedEmbeddingBag", "ShardedMF",
           "apply_sparse", "fit_sharded", "gather_model", "is_sharded", "load", "load_model",
           "local_rows",
           "local_slice", "loss_share", "owner_of", "save", "shard", "sync_dense_grads",
           "timings"]
