"""The spec of the top-k op family, written plainly; every other backend (C++, Numba,
CUDA) is tested against it.

``topk_scores`` ranks the items of each query by ``item_bias[i] + <queries[b],
item_factors[i]>``:

- order: higher score first; equal scores go to the lower item index (``torch.topk``
  promises no tie order, so this sorts stably instead);
- a NaN score ranks as ``-inf``;
- ``exclude_indptr``/``exclude_indices``: a CSR with one row per query listing items to
  leave out (rows need not be sorted; repeats are harmless); ``candidates``: the only items
  to consider (a set: repeats count once);
- when fewer than ``k`` items remain for a query, the rest of its row is padding: index
  ``-1`` with score ``-inf``. An item whose real score is ``-inf`` keeps its index, so
  padding is told apart by the index alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmf.ops import checks


def rank_order(scores: Tensor) -> Tensor:
    """(B, I) item indices of each row sorted by score descending, ties by index ascending."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def allowed_items(
    batch: int,
    num_items: int,
    exclude_indptr: Tensor | None,
    exclude_indices: Tensor | None,
    candidates: Tensor | None,
    device=None,
) -> Tensor:
    """(B, I) bool: the items each query may return."""
    allowed = torch.ones(batch, num_items, dtype=torch.bool, device=device)
    if candidates is not None:
        in_candidates = torch.zeros(num_items, dtype=torch.bool, device=device)
        in_candidates[candidates.long()] = True
        allowed &= in_candidates
    if exclude_indptr is not None:
        indptr = exclude_indptr.long()
        start, stop = int(indptr[0]), int(indptr[-1])
        rows = torch.repeat_interleave(
            torch.arange(batch, device=device), indptr[1:] - indptr[:-1]
        )
        allowed[rows, exclude_indices[start:stop].long()] = False
    return allowed


def topk_scores(
    queries: Tensor,
    item_factors: Tensor,
    item_bias: Tensor | None = None,
    k: int = 10,
    exclude_indptr: Tensor | None = None,
    exclude_indices: Tensor | None = None,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k. ``queries`` (B, K), ``item_factors`` (I, K), ``item_bias`` (I,) or None;
    returns ``(scores (B, k) like queries, indices (B, k) int64)``, best first, padded with
    ``(-inf, -1)``. Materialises the (B, I) scores: meant for tests and small inputs.

    >>> q, items = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 5.0]])
    >>> topk_scores(q, items, k=4)
    (tensor([[2., 1., 1., -inf]]), tensor([[ 1,  0,  2, -1]]))
    """
    checks.check_topk_inputs(queries, item_factors, item_bias, k, exclude_indptr,
                             exclude_indices, candidates)
    batch, num_items = queries.shape[0], item_factors.shape[0]
    scores = queries @ item_factors.T
    if item_bias is not None:
        scores = scores + item_bias
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)

    allowed = allowed_items(
        batch, num_items, exclude_indptr, exclude_indices, candidates, queries.device
    )
    order = rank_order(scores)
    # Stable again on "not allowed" so the allowed items come first, still in rank order.
    disallowed_ranked = (~allowed.gather(1, order)).to(torch.uint8)
    order = order.gather(1, torch.sort(disallowed_ranked, dim=1, stable=True).indices)

    take = min(k, num_items)
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=queries.device)
    values = torch.full((batch, k), float("-inf"), dtype=queries.dtype, device=queries.device)
    indices[:, :take] = order[:, :take]
    values[:, :take] = scores.gather(1, order[:, :take])
    padding = torch.arange(k, device=queries.device) >= allowed.sum(1, keepdim=True)
    indices[padding] = -1
    values[padding] = float("-inf")
    return values, indices
