"""Checks of the structures a model loads from a checkpoint along with its tables.

A checkpoint's checksums catch damage, not edits: a file changed and hashed again passes
them, so what it holds is checked like any other input before the model uses it. The
compressed rows (SVD++'s and Item2Vec's histories, Hybrid's feature matrices) are cut into
bags and gathered without further checks on every call; a row that ran past its data had
crashed the interpreter (torch.repeat_interleave with an output_size trusts its counts).
Errors are ValueErrors, which :func:`fastmf.load` reports as CheckpointErrors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmf.ops.checks import check_offsets_values


def check_csr_state(op: str, name: str, indptr: Tensor, indices: Tensor, num_columns: int,
                    weights: Tensor | None = None, *, signed: bool = False) -> None:
    """``indptr`` (rows + 1,), ``indices`` and ``weights`` (nnz,) of ``op``'s ``name``
    matrix as loaded: indptr from 0 to nnz without decreasing, every index in [0,
    num_columns), every weight finite and (unless ``signed``) >= 0."""
    indptr, indices = indptr.detach().cpu(), indices.detach().cpu()
    # The offsets' rules and messages of the bag ops (from 0, non-decreasing, to nnz).
    check_offsets_values(f"{op.removeprefix('fastmf.')}: {name}", indptr, indices.numel())
    bad = torch.nonzero((indices < 0) | (indices >= num_columns))
    if bad.numel():
        raise ValueError(f"{op}: {name} holds index {int(indices[int(bad[0])])}, outside "
                         f"[0, {num_columns})")
    if weights is not None:
        weights = weights.detach().cpu()
        wrong = ~torch.isfinite(weights) if signed else ~(torch.isfinite(weights)
                                                          & (weights >= 0))
        if bool(wrong.any()):
            what = "finite" if signed else "finite and >= 0"
            raise ValueError(f"{op}: {name} weights must be {what}, got "
                             f"{float(weights[wrong][0])}")
