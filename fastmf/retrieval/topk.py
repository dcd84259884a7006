"""Exact top-k retrieval: ``topk_scores`` (the fused op behind ``model.recommend``),
``similar`` (most similar rows of a factor table) and ``popular_items`` (the cold-start
fallback)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastmf import ops
from fastmf.ops.checks import HALF_DTYPES, check_exclude_csr, check_ids, check_k, check_weight
from fastmf.retrieval._inputs import OP, as_index_tensor, exclude_csr

METRICS = ("cosine", "dot")
# The reference materialises (batch × items) scores; by default it goes in chunks of about
# this many so that a large batch does not exhaust memory.
REFERENCE_CHUNK_ELEMENTS = 1 << 24


def topk_scores(
    queries: Tensor,
    item_factors: Tensor,
    item_bias: Tensor | None = None,
    k: int = 10,
    *,
    exclude=None,
    candidates=None,
    backend: str = "auto",
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` best items per query by ``item_bias[i] + <queries[b], item_factors[i]>``.

    Args:
        queries: (B, K) float32/float64, e.g. the user factors of the users to serve (the
            global mean and user bias do not change the order, so they are left out);
            float16/bfloat16 queries, factors and bias are scored in float32.
        item_factors: (I, K), same dtype and device.
        item_bias: (I,) or None.
        k: how many items per query (> 0).
        exclude: items to leave out per query (typically the users' training items): a
            scipy sparse matrix with one row per query, a torch sparse CSR tensor, or an
            ``(indptr (B+1,), indices)`` pair of int32/int64 tensors. Rows need not be sorted.
        candidates: (C,) int32/int64 item ids: only these items are ranked (repeats are
            ignored).
        backend: ``"auto"`` (native kernel if built for the device, else Numba on CPU, else
            the reference), ``"native"``, ``"numba"`` or ``"reference"``.
        batch_size: queries per call of the backend (default: all of them; for the
            reference, chunks of about 16M scores).

    Returns:
        ``(scores, indices)``, each (B, k): scores like ``queries``, indices int64, best
        first, equal scores ordered by lower item index, NaN scores ranked as -inf. Where
        fewer than ``k`` items are left for a query (``k`` above the candidate count, or
        everything excluded) the row is padded with index ``-1`` and score ``-inf``.

    Raises ValueError for k <= 0 and mismatched shapes, IndexError for item ids out of
    range in ``exclude``/``candidates``, TypeError for wrong dtypes.

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0]])
    >>> items = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 9.0]])
    >>> topk_scores(q, items, k=3, exclude=(torch.tensor([0, 1]), torch.tensor([1])))
    (tensor([[2., 1., 1.]]), tensor([[3, 0, 2]]))
    """
    if not isinstance(queries, Tensor):
        raise TypeError(f"fastmf.{OP}: queries must be a tensor, got {type(queries).__name__}")
    k = check_k(OP, k)
    if queries.dim() != 2:
        raise ValueError(f"fastmf.{OP}: queries must be 2-D, got shape {tuple(queries.shape)}")
    # A half-precision model's vectors are scored in float32 (the kernels take float32 and
    # float64; SVD++, timeSVD++ and Item2Vec train float16/bfloat16 tables).
    queries, item_factors, item_bias = (
        t.float() if isinstance(t, Tensor) and t.dtype in HALF_DTYPES else t
        for t in (queries, item_factors, item_bias))
    device = queries.device
    impl_name = ops.resolve_backend(backend, device, op=f"fastmf.{OP}")
    batch = queries.shape[0]
    indptr, indices = exclude_csr(OP, exclude, batch, device)
    if candidates is not None:
        candidates = as_index_tensor(OP, "candidates", candidates, device)
    impl = ops.kernels(impl_name, device).topk_scores

    if batch_size is None:
        batch_size = batch
        if impl_name == "reference" and isinstance(item_factors, Tensor):
            batch_size = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, item_factors.shape[0]))
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fastmf.{OP}: batch_size must be a positive int, got {batch_size!r}")
    if batch <= batch_size:
        return impl(queries, item_factors, item_bias, k, indptr, indices, candidates)
    parts = []
    for start in range(0, batch, batch_size):
        stop = min(batch, start + batch_size)
        # A slice of indptr is a valid CSR over the same indices (it need not start at 0).
        part_indptr = indptr[start : stop + 1] if indptr is not None else None
        parts.append(
            impl(queries[start:stop], item_factors, item_bias, k, part_indptr, indices,
                 candidates)
        )
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def similar(
    vectors: Tensor,
    query_ids,
    k: int = 10,
    metric: str = "cosine",
    *,
    backend: str = "auto",
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of ``vectors`` most similar to each ``vectors[query_ids[b]]``, the
    query row itself left out (other rows equal to it are kept): what
    ``model.similar_items``/``similar_users`` return.

    Args:
        vectors: (N, K) float32/float64, e.g. item factors.
        query_ids: (B,) int ids in [0, N).
        metric: ``"cosine"`` (rows normalised; a zero row has similarity 0 to everything)
            or ``"dot"``.

    Returns ``(scores, indices)`` (B, k) as :func:`topk_scores` does (padded with -inf / -1
    when ``k >= N``).

    >>> import torch
    >>> v = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0]])
    >>> similar(v, [0], k=2)[1]
    tensor([[1, 2]])
    """
    op = "similar"
    if metric not in METRICS:
        raise ValueError(f"fastmf.{op}: unknown metric {metric!r}; expected one of {METRICS}")
    if isinstance(vectors, Tensor) and vectors.dtype in HALF_DTYPES:
        vectors = vectors.float()  # scored in float32, as topk_scores scores half vectors
    check_weight(op, "vectors", vectors, 2)
    k = check_k(op, k)
    ids = as_index_tensor(op, "query_ids", query_ids, vectors.device)
    check_ids(op, "query_ids", ids, vectors.shape[0])
    table = vectors
    if metric == "cosine":
        tiny = torch.finfo(vectors.dtype).tiny
        table = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(tiny)
    indptr = torch.arange(ids.shape[0] + 1, device=vectors.device)
    return topk_scores(
        table[ids.long()], table, None, k, exclude=(indptr, ids), backend=backend,
        batch_size=batch_size,
    )


def popular_items(
    counts,
    k: int = 10,
    exclude=None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The ``k`` most-interacted items: the fallback for users with no factors yet.

    Args:
        counts: (I,) interactions per item (ints or floats; a tensor, array or sequence).
        exclude: optional items to leave out per user (their seen items), in any form that
            :func:`topk_scores` accepts; the number of its rows is the number of users.

    Returns ``(scores, indices)``: scores are the counts as float64; shapes (k,) without
    ``exclude``, (B, k) with it. Equal counts go to the lower item index; padding is
    -inf / -1 as in :func:`topk_scores`.

    >>> popular_items([5, 9, 1, 9], k=3)[1]
    tensor([1, 3, 0])
    """
    op = "popular_items"
    k = check_k(op, k)
    counts = torch.as_tensor(counts)
    if counts.dim() != 1:
        raise ValueError(f"fastmf.{op}: counts must be 1-D, got shape {tuple(counts.shape)}")
    scores = counts.to(torch.float64)
    num_items, device = scores.shape[0], scores.device
    no_factors = scores.new_zeros((num_items, 0))

    def ranking(m):
        s, i = topk_scores(scores.new_zeros((1, 0)), no_factors, scores, m, backend=backend)
        return s[0], i[0]

    if exclude is None:
        return ranking(k)
    indptr, indices = exclude_csr(op, exclude, None, device)
    check_exclude_csr(op, indptr, indices, num_items)
    indptr = indptr.long()
    batch = indptr.shape[0] - 1
    start, stop = int(indptr[0]), int(indptr[-1])
    seen = indices[start:stop].long()
    lengths = indptr[1:] - indptr[:-1]
    # One global ranking, long enough that every user keeps k items after removing theirs.
    longest = int(lengths.max()) if batch else 0
    top_scores, top_ids = ranking(k + longest)
    rank_of = torch.full((num_items,), -1, dtype=torch.int64, device=device)
    listed = top_ids >= 0
    rank_of[top_ids[listed]] = torch.arange(int(listed.sum()), device=device)
    hidden = (~listed).expand(batch, -1).clone()
    rows = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    ranks = rank_of[seen]
    hit = ranks >= 0
    hidden[rows[hit], ranks[hit]] = True
    order = torch.sort(hidden.to(torch.uint8), dim=1, stable=True).indices[:, :k]
    pad = hidden.gather(1, order)
    out_ids = torch.where(pad, -1, top_ids[order])
    out_scores = torch.where(pad, float("-inf"), top_scores[order])
    return out_scores, out_ids
