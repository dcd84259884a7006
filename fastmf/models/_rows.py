"""What the models' training steps share about a batch's rows: its distinct ids, and the
backend kernel that sums per-pair gradients back into those rows.

A step that scores many (user, item) pairs looks each distinct user and item up once and
gathers the looked-up rows for its pairs (NCF's towers, Hybrid's pooled bags); the
gradient of a row is then the sum over its pairs, which ``scatter_rows`` (or, for a dot
product's two sides at once, ``mf_backward_dense``) computes in index order, on the tables'
own backend.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from fastmf import ops
from fastmf.ops.reference.pooled import pair_users

__all__ = ["pair_users", "table_kernels", "unique_ids"]


def unique_ids(ids: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(the distinct ids of ``ids``, ascending; the position of each id among them, shaped
    like ``ids``). A batch that covers much of a small table (NCF's 20,480 items per step of
    a ~10k catalog) marks a dense array instead of sorting."""
    flat = ids.reshape(-1)
    if flat.numel() and flat.numel() * 4 >= size:
        low, high = torch.aminmax(flat)
        if 0 <= int(low) and int(high) < size:
            if flat.device.type == "cpu":
                # NumPy on the same memory: its calls cost a few us each where torch's
                # cost 10-30, so 102 against 192 us for a default NCF step's 20,480 items
                # (one thread; 36 against 61 us for its users). The same values.
                marks = np.zeros(size, dtype=np.int64)
                numbers = flat.numpy()
                marks[numbers] = 1
                distinct = torch.from_numpy(np.flatnonzero(marks))
                np.cumsum(marks, out=marks)
                marks -= 1
                return distinct, torch.from_numpy(marks[numbers]).view(ids.shape)
            # index_fill_ and index_select, not mark[flat] = 1 and [flat]: the same values
            # in 146 against 241 us for a default NCF step's users and items, one thread.
            mark = torch.zeros(size, dtype=torch.int64, device=flat.device)
            mark.index_fill_(0, flat, 1)
            distinct = mark.nonzero().squeeze(1)
            return distinct, mark.cumsum_(0).sub_(1).index_select(0, flat).view(ids.shape)
    # Out-of-range ids reach the table's own lookup, which names the problem.
    distinct, inverse = torch.unique(flat, return_inverse=True)
    return distinct, inverse.view(ids.shape)


def table_kernels(model: nn.Module, device: torch.device,
                  kernel: str = "scatter_rows") -> ModuleType:
    """The backend module of ``model``'s tables, resolved for ``device`` and ``kernel``:
    its ``mf_forward`` scores the pairs on the distinct rows, its ``mf_backward_dense`` /
    ``scatter_rows`` sum a training step's pair gradients into them. The tables are
    fastmf.nn's, or their sharded forms after fastmf.distributed.shard: both say
    ``is_embedding_table`` and carry their backend. Resolved at every step, because
    sharding can replace the tables after construction (a module walk: a few us)."""
    table = next(m for m in model.modules() if getattr(m, "is_embedding_table", False))
    return ops.kernels(table.backend, device, kernel=kernel)
