"""Test axes and data makers shared by the tests and the benchmarks.

Every test is parametrised over these axes; CUDA cases carry ``requires_cuda`` so a
machine without a GPU shows them as skipped rather than hiding them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmf._extension import LOAD_ERROR as _LOAD_ERROR
from fastmf._extension import native_available as _native_available
from fastmf.ops import numba_available as _numba_available

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
)

requires_native = pytest.mark.skipif(
    not _native_available(), reason=f"native extension not built: {_LOAD_ERROR}"
)
requires_numba = pytest.mark.skipif(not _numba_available(), reason="numba is not installed")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
BACKENDS = [
    "reference",
    pytest.param("numba", marks=requires_numba),
    pytest.param("native", marks=requires_native),
]
FAST_BACKENDS = BACKENDS[1:]
ID_DTYPES = [torch.int32, torch.int64]
WEIGHT_DTYPES = [torch.float32, torch.float64]
BATCH_SIZES = [0, 1, 7, 4096]

# fp32: a few ulps of accumulated rounding over K-term dot products and 20 optimizer steps.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def zipf_ids(
    num_rows: int,
    size: int,
    *,
    exponent: float = 1.0,
    generator: np.random.Generator | None = None,
    dtype: torch.dtype = torch.int64,
    device="cpu",
) -> torch.Tensor:
    """``size`` ids in [0, num_rows) with P(rank r) ∝ 1/r**exponent, ranks shuffled over
    the ids so hot rows are spread across the table. Many duplicates by design."""
    rng = generator if generator is not None else np.random.default_rng()
    weights = 1.0 / np.arange(1, num_rows + 1, dtype=np.float64) ** exponent
    weights /= weights.sum()
    ranks = rng.choice(num_rows, size=size, p=weights)
    perm = rng.permutation(num_rows)
    return torch.from_numpy(perm[ranks]).to(dtype=dtype, device=device)


def make_tables(
    num_users: int,
    num_items: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = True,
    seed: int | None = None,
):
    """Random (never zero) tables: (user_factors, item_factors, user_bias, item_bias)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.2 - 0.1).to(
            dtype=dtype, device=device
        )

    p, q = rand(num_users, dim), rand(num_items, dim)
    if not bias:
        return p, q, None, None
    return p, q, rand(num_users), rand(num_items)


def make_batch(
    num_users: int,
    num_items: int,
    batch: int,
    *,
    id_dtype: torch.dtype = torch.int64,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int | None = None,
    implicit: bool = False,
):
    """(users, items, targets): Zipf users and items, ratings in [1, 5] (or 0/1 labels)."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(num_users, batch, generator=rng, dtype=id_dtype, device=device)
    items = zipf_ids(num_items, batch, generator=rng, dtype=id_dtype, device=device)
    if implicit:
        targets = rng.integers(0, 2, size=batch).astype(np.float64)
    else:
        targets = rng.uniform(1.0, 5.0, size=batch)
    return users, items, torch.from_numpy(targets).to(dtype=dtype, device=device)


def clone_all(*tensors):
    return tuple(None if t is None else t.clone() for t in tensors)


# Top-k data: quantised factors (multiples of 1/4) make every score exact in any summation
# order, and every 7th item row (and bias) is a copy of row 0, so there are exact ties and
# every kernel must agree with fastmf.retrieval.reference bit for bit, tie order included.


def quantised(gen: torch.Generator, *shape, dtype: torch.dtype = torch.float32):
    return (torch.randint(-4, 5, shape, generator=gen) / 4).to(dtype)


def make_topk_items(num_items, dim=8, *, dtype=torch.float32, seed=0, bias=True):
    """(items, bias): quantised item tables with every 7th row (and bias) a copy of row 0."""
    gen = torch.Generator().manual_seed(seed)
    items = quantised(gen, num_items, dim, dtype=dtype)
    b = quantised(gen, num_items, dtype=dtype) if bias else None
    items[1::7] = items[0]
    if bias:
        b[1::7] = b[0]
    return items, b


def make_topk_queries(batch, dim=8, *, dtype=torch.float32, seed=1):
    return quantised(torch.Generator().manual_seed(seed), batch, dim, dtype=dtype)


def make_topk_exclude(batch, num_items, *, seed=2, id_dtype=torch.int64, max_len=40,
                      sort_rows=False):
    """(indptr, indices): a CSR with empty rows, unsorted (or sorted) rows, repeated ids, and
    (if batch > 1) a row that excludes every item."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        if b == 1:
            rows.append(rng.permutation(num_items))
        elif b % 5 == 0:
            rows.append(np.zeros(0, np.int64))
        else:
            rows.append(rng.integers(0, num_items, size=rng.integers(1, max_len)))
    if sort_rows:
        rows = [np.sort(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return torch.from_numpy(indptr).to(id_dtype), torch.from_numpy(indices).to(id_dtype)


def make_topk_candidates(num_items, size, *, seed=3, id_dtype=torch.int64):
    """Candidate ids drawn with repeats."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, max(num_items, 1), size=size)).to(id_dtype)
