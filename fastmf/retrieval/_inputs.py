"""Argument handling for fastmf.retrieval: turning the accepted forms of ``exclude`` and
``candidates`` into tensors, and the checks the Python backends make. The native op makes
the same checks in C++ (csrc/cpu/topk.cpp) with the same exception types and messages."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastmf._checks import ID_DTYPES, check_ids, check_weight

OP = "topk_scores"


def as_index_tensor(op: str, name: str, value, device) -> Tensor:
    """A tensor of ids from a tensor, numpy array or sequence (int32/int64 kept as is)."""
    if isinstance(value, Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
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


def check_k(op: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"fastmf.{op}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"fastmf.{op}: k must be positive, got {k}")
    return int(k)


def check_topk_inputs(
    queries, item_factors, item_bias, k, exclude_indptr, exclude_indices, candidates
) -> None:
    """Everything the native op checks, in the same order and words."""
    check_weight(OP, "queries", queries, 2)
    check_weight(OP, "item_factors", item_factors, 2, like=queries)
    if queries.shape[1] != item_factors.shape[1]:
        raise ValueError(
            f"fastmf.{OP}: queries has dim {queries.shape[1]} but item_factors has dim "
            f"{item_factors.shape[1]}"
        )
    check_k(OP, k)
    batch, num_items = queries.shape[0], item_factors.shape[0]
    if item_bias is not None:
        check_weight(OP, "item_bias", item_bias, 1, like=queries)
        if item_bias.shape[0] != num_items:
            raise ValueError(
                f"fastmf.{OP}: item_bias has {item_bias.shape[0]} rows, item_factors has "
                f"{num_items}"
            )
    if (exclude_indptr is None) != (exclude_indices is None):
        raise ValueError(
            f"fastmf.{OP}: exclude_indptr and exclude_indices must both be given or both None"
        )
    if exclude_indptr is not None:
        for name, t in (("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices)):
            if t.dtype not in ID_DTYPES:
                raise TypeError(f"fastmf.{OP}: {name} must be int32 or int64, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"fastmf.{OP}: {name} must be 1-D, got shape {tuple(t.shape)}")
        if exclude_indptr.shape[0] != batch + 1:
            raise ValueError(
                f"fastmf.{OP}: exclude_indptr must have one entry per query plus one "
                f"({batch + 1}), got {exclude_indptr.shape[0]}"
            )
        indptr = exclude_indptr.long()
        start, stop, nnz = int(indptr[0]), int(indptr[-1]), exclude_indices.shape[0]
        if start < 0 or stop > nnz:
            raise ValueError(
                f"fastmf.{OP}: exclude_indptr spans [{start}, {stop}) but exclude_indices has "
                f"{nnz} entries"
            )
        steps = indptr[1:] - indptr[:-1]
        if batch and bool((steps < 0).any()):
            b = int(torch.nonzero(steps < 0)[0, 0])
            raise ValueError(
                f"fastmf.{OP}: exclude_indptr must be non-decreasing, got {int(indptr[b])} "
                f"then {int(indptr[b + 1])} at query {b}"
            )
        check_ids(OP, "exclude", exclude_indices[start:stop], num_items)
    if candidates is not None:
        check_ids(OP, "candidates", candidates, num_items)
