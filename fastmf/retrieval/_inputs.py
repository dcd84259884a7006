"""Argument handling for fastmf.retrieval: turning the accepted forms of ``exclude`` and
``candidates`` into tensors. The op's own input checks are in :mod:`fastmf.ops.checks`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastmf._arrays import array_to_tensor
from fastmf.ops.checks import ID_DTYPES

OP = "topk_scores"


def as_index_tensor(op: str, name: str, value, device) -> Tensor:
    """A tensor of ids from a tensor, numpy array or sequence (int32/int64 kept as is)."""
    if isinstance(value, Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = array_to_tensor(value)
    else:
        tensor = torch.as_tensor(value)
        if tensor.numel() == 0:
            tensor = tensor.to(torch.int64)
    if tensor.dtype not in ID_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be int32 or int64, got {tensor.dtype}")
    return tensor.to(device)


def exclude_csr(
    op: str, exclude, batch: int | None, device
) -> tuple[Tensor | None, Tensor | None]:
    """``(indptr (B+1,), indices)`` from a scipy sparse matrix with one row per query, a torch
    sparse CSR tensor, or an ``(indptr, indices)`` pair; ``(None, None)`` for None. ``batch``
    None accepts any number of rows."""
    if exclude is None:
        return None, None
    if isinstance(exclude, Tensor) and exclude.layout == torch.sparse_csr:
        if batch is not None and exclude.shape[0] != batch:
            raise ValueError(
                f"fastmf.{op}: exclude has {exclude.shape[0]} rows but there are {batch} queries"
            )
        return exclude.crow_indices().to(device), exclude.col_indices().to(device)
    if hasattr(exclude, "tocsr") and hasattr(exclude, "shape"):
        matrix = exclude.tocsr()
        if batch is not None and matrix.shape[0] != batch:
            raise ValueError(
                f"fastmf.{op}: exclude has {matrix.shape[0]} rows but there are {batch} queries"
            )
        return (
            as_index_tensor(op, "exclude_indptr", matrix.indptr, device),
            as_index_tensor(op, "exclude_indices", matrix.indices, device),
        )
    if isinstance(exclude, tuple | list) and len(exclude) == 2:
        return (
            as_index_tensor(op, "exclude_indptr", exclude[0], device),
            as_index_tensor(op, "exclude_indices", exclude[1], device),
        )
    raise TypeError(
        f"fastmf.{op}: exclude must be a scipy sparse matrix (one row per query), a torch "
        f"sparse CSR tensor or an (indptr, indices) pair, got {type(exclude).__name__}"
    )
