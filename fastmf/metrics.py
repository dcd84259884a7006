"""Evaluation metrics: rating error, top-K ranking quality, the sampled (NCF) protocol and
beyond-accuracy measures. All vectorised over users (no Python loop per user); inputs may
be numpy arrays or torch tensors.

Ranking metrics take

- ``topk``: (U, K) int item indices, best first, one row per evaluated user; ``-1`` pads
  lists shorter than K (never a hit); an item repeated within a row counts only at its
  first position;
- ``heldout``: the relevant (held-out) items, a (num_users, num_items) scipy.sparse matrix
  (stored nonzeros are relevant) or :class:`~fastmf.data.Interactions`;
- ``users``: optional (U,) user index of each ``topk`` row (default: row ``u`` is user
  ``u``, and ``topk`` must have ``num_users`` rows).

Relevance is binary. Users with no held-out items are excluded from every average (they
have no defined recall or NDCG); a ValueError is raised when no user is left.

With ``hit[u, j]`` = 1 when the item at position ``j`` (0-based) of user ``u``'s list is
relevant, ``R_u`` the user's relevant set and ``disc(j) = 1 / log2(j + 2)``:

==============  ==================================================================
HR@K            ``1`` if any ``hit[u, :K]``
precision@K     ``sum_j hit[u, j] / K``
recall@K        ``sum_j hit[u, j] / |R_u|`` (so at most ``K / |R_u|`` when ``|R_u| > K``)
NDCG@K          ``sum_j hit[u, j] disc(j) / sum_{j < min(|R_u|, K)} disc(j)``
MRR@K           ``1 / (1 + first j with hit[u, j])``, 0 without a hit
MAP@K           ``sum_j P@(j+1) hit[u, j] / min(|R_u|, K)``
==============  ==================================================================

>>> import numpy as np, scipy.sparse as sp
>>> heldout = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 0, 0, 0]]))
>>> topk = np.array([[1, 2], [3, 2]])
>>> ranking_metrics(topk, heldout, k=2)["hr@2"]
0.5
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fastmf.data.interactions import Interactions

__all__ = [
    "rmse",
    "mae",
    "hit_rate_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "precision_at_k",
    "mrr",
    "map_at_k",
    "ranking_metrics",
    "sampled_rank_metrics",
    "catalog_coverage",
    "novelty",
    "intra_list_diversity",
]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- rating error


def _pair(pred: Any, target: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    p = _np(pred).astype(np.float64, copy=False).reshape(-1)
    t = _np(target).astype(np.float64, copy=False).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(
            f"fastmf.metrics.{name}: pred has {p.size} values, target has {t.size}"
        )
    if p.size == 0:
        raise ValueError(f"fastmf.metrics.{name}: empty inputs")
    return p, t


def rmse(pred: Any, target: Any) -> float:
    """Root mean squared error ``sqrt(mean((pred - target)**2))`` over (N,) arrays.

    >>> rmse([3.0, 4.0], [4.0, 4.0])
    0.7071067811865476
    """
    p, t = _pair(pred, target, "rmse")
    return float(np.sqrt(np.mean((p - t) ** 2)))


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error ``mean(|pred - target|)`` over (N,) arrays.

    >>> mae([3.0, 5.0], [4.0, 4.0])
    1.0
    """
    p, t = _pair(pred, target, "mae")
    return float(np.mean(np.abs(p - t)))


# ----------------------------------------------------------------------------- top-K ranking


def _relevant(heldout: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(indptr, sorted indices, num_users, num_items) of the relevant items per user."""
    if isinstance(heldout, Interactions):
        indptr, indices = heldout.positive_structure()
        return indptr, indices, heldout.num_users, heldout.num_items
    if sp.issparse(heldout):
        csr = sp.csr_matrix(heldout)
        if not csr.has_canonical_format or (csr.data == 0).any():
            csr = csr.copy()
            csr.sum_duplicates()
            csr.eliminate_zeros()
        return (
            csr.indptr.astype(np.int64, copy=False),
            csr.indices.astype(np.int64, copy=False),
            *csr.shape,
        )
    raise TypeError(
        "fastmf.metrics: heldout must be a scipy.sparse matrix or Interactions, "
        f"got {type(heldout).__name__}"
    )


def _hits(
    topk: Any, heldout: Any, k: int | None, users: Any, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(hits (U', k) bool, relevant counts (U',) int64) over the users with relevant items."""
    top = _np(topk)
    if top.ndim != 2:
        raise ValueError(f"fastmf.metrics.{name}: topk must be (U, K), got shape {top.shape}")
    if top.size and top.dtype.kind not in "iu":
        raise TypeError(f"fastmf.metrics.{name}: topk must hold int indices, got {top.dtype}")
    k = top.shape[1] if k is None else int(k)
    if not 1 <= k <= top.shape[1]:
        raise ValueError(
            f"fastmf.metrics.{name}: k={k} must be in [1, {top.shape[1]}] (topk columns)"
        )
    top = top[:, :k].astype(np.int64, copy=False)
    indptr, indices, num_users, num_items = _relevant(heldout)
    if users is None:
        if top.shape[0] != num_users:
            raise ValueError(
                f"fastmf.metrics.{name}: topk has {top.shape[0]} rows but heldout has "
                f"{num_users} users; pass users= to say which user each row is"
            )
        rows = np.arange(num_users, dtype=np.int64)
    else:
        rows = _np(users).astype(np.int64, copy=False).reshape(-1)
        if rows.shape[0] != top.shape[0]:
            raise ValueError(
                f"fastmf.metrics.{name}: users has {rows.shape[0]} entries, topk "
                f"{top.shape[0]} rows"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= num_users):
            raise IndexError(f"fastmf.metrics.{name}: user index out of range [0, {num_users})")
    if top.size and (top.min() < -1 or top.max() >= num_items):
        bad = int(top.min()) if top.min() < -1 else int(top.max())
        raise IndexError(
            f"fastmf.metrics.{name}: topk item {bad} out of range [0, {num_items}) "
            "(-1 marks padding)"
        )
    n_rel = indptr[rows + 1] - indptr[rows]
    keep = n_rel > 0
    if not keep.any():
        raise ValueError(f"fastmf.metrics.{name}: no evaluated user has held-out items")
    top, rows, n_rel = top[keep], rows[keep], n_rel[keep]

    # Membership of every (user, item) in the held-out set with one vectorised binary
    # search: the canonical CSR lists keys user * num_items + item in increasing order.
    entry_rows = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(indptr))
    keys = entry_rows * num_items + indices
    query = rows[:, None] * num_items + top
    pos = np.searchsorted(keys, query)
    hits = keys[np.minimum(pos, len(keys) - 1)] == query
    hits &= top >= 0
    if k > 1:
        # Count a repeated item only at its first position.
        order = np.argsort(top, axis=1, kind="stable")
        sorted_top = np.take_along_axis(top, order, axis=1)
        repeat = np.zeros_like(hits)
        repeat[:, 1:] = sorted_top[:, 1:] == sorted_top[:, :-1]
        if repeat.any():
            first_only = np.ones_like(hits)
            np.put_along_axis(first_only, order, ~repeat, axis=1)
            hits &= first_only
    return hits, n_rel


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


def _per_user(metric: str, hits: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    k = hits.shape[1]
    if metric == "hr":
        return hits.any(axis=1).astype(np.float64)
    if metric == "precision":
        return hits.sum(axis=1) / k
    if metric == "recall":
        return hits.sum(axis=1) / n_rel
    if metric == "ndcg":
        disc = _discounts(k)
        ideal = np.cumsum(disc)[np.minimum(n_rel, k) - 1]
        return (hits @ disc) / ideal
    if metric == "mrr":
        first = hits.argmax(axis=1)
        return np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)
    if metric == "map":
        precision_at = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
        return (precision_at * hits).sum(axis=1) / np.minimum(n_rel, k)
    raise ValueError(f"fastmf.metrics: unknown metric {metric!r}")


def _one(metric: str, topk: Any, heldout: Any, k: int | None, users: Any) -> float:
    hits, n_rel = _hits(topk, heldout, k, users, f"{metric}_at_k")
    return float(_per_user(metric, hits, n_rel).mean())


def hit_rate_at_k(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """HR@K: fraction of evaluated users with at least one relevant item in their top K.

    ``topk``: (U, K') int, ``k <= K'`` (default ``K'``). See the module docstring.

    >>> hit_rate_at_k(np.array([[1, 2]]), sp.csr_matrix([[0, 0, 1]]), k=1)
    0.0
    """
    return _one("hr", topk, heldout, k, users)


def precision_at_k(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """Precision@K: relevant items in the top K divided by K, averaged over users.

    >>> precision_at_k(np.array([[1, 2]]), sp.csr_matrix([[0, 0, 1]]))
    0.5
    """
    return _one("precision", topk, heldout, k, users)


def recall_at_k(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """Recall@K: relevant items in the top K divided by the user's number of relevant
    items ``|R_u|`` (not ``min(|R_u|, K)``), averaged over users.

    >>> recall_at_k(np.array([[1, 2]]), sp.csr_matrix([[1, 0, 1]]))
    0.5
    """
    return _one("recall", topk, heldout, k, users)


def ndcg_at_k(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """NDCG@K with binary relevance and ``1/log2(rank + 1)`` discount (rank from 1); the
    ideal DCG puts ``min(|R_u|, K)`` relevant items first. Averaged over users.

    >>> round(ndcg_at_k(np.array([[1, 2]]), sp.csr_matrix([[0, 0, 1]])), 4)
    0.6309
    """
    return _one("ndcg", topk, heldout, k, users)


def mrr(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """MRR@K: mean over users of ``1 / rank`` of the first relevant item in the top K
    (rank from 1; 0 when none).

    >>> mrr(np.array([[1, 2]]), sp.csr_matrix([[0, 0, 1]]))
    0.5
    """
    return _one("mrr", topk, heldout, k, users)


def map_at_k(topk: Any, heldout: Any, k: int | None = None, *, users: Any = None) -> float:
    """MAP@K: mean over users of AP@K ``= sum_j P@j * rel_j / min(|R_u|, K)`` (j = 1..K).

    >>> map_at_k(np.array([[2, 0]]), sp.csr_matrix([[1, 0, 1]]))
    1.0
    """
    return _one("map", topk, heldout, k, users)


_RANKING = ("hr", "precision", "recall", "ndcg", "mrr", "map")


def ranking_metrics(
    topk: Any,
    heldout: Any,
    k: int | Iterable[int] | None = None,
    *,
    users: Any = None,
) -> dict[str, float]:
    """All ranking metrics at one or several cut-offs from one membership pass.

    Returns ``{"hr@K", "precision@K", "recall@K", "ndcg@K", "mrr@K", "map@K"}`` for each K
    in ``k`` (an int or a list; default ``topk.shape[1]``), plus ``"users"``: the number
    of users averaged over (those with held-out items).

    >>> topk = model.recommend(test.users, k=20)  # doctest: +SKIP
    >>> ranking_metrics(topk, test, k=[10, 20], users=test_users)  # doctest: +SKIP
    {'hr@10': ..., 'ndcg@10': ..., ..., 'users': 610}
    """
    top = _np(topk)
    ks = [top.shape[1] if top.ndim == 2 else 1] if k is None else (
        [int(k)] if np.ndim(k) == 0 else [int(v) for v in k]
    )
    hits, n_rel = _hits(top, heldout, max(ks), users, "ranking_metrics")
    out: dict[str, float] = {}
    for cut in sorted(set(ks)):
        if cut < 1:
            raise ValueError(f"fastmf.metrics.ranking_metrics: k must be >= 1, got {cut}")
        for metric in _RANKING:
            out[f"{metric}@{cut}"] = float(_per_user(metric, hits[:, :cut], n_rel).mean())
    out["users"] = int(len(n_rel))
    return out


# ----------------------------------------------------------------------------- sampled protocol


def sampled_rank_metrics(
    scores_pos: Any,
    scores_neg: Any,
    k: int | Iterable[int] = 10,
) -> dict[str, float]:
    """The NCF protocol: each user's held-out item ranked among N sampled negatives.

    ``scores_pos``: (U,) score of each user's held-out item; ``scores_neg``: (U, N) scores
    of its negatives (e.g. N = 99). The 0-based rank of the positive is the number of
    negatives with a score **>=** its own: ties count pessimistically, a negative with an
    equal score ranks above the positive, so a model scoring everything alike gets
    HR = 0, not an optimistic or arbitrary value.

    Returns, for each K in ``k``, ``"hr@K"`` (rank < K), ``"ndcg@K"`` (``1/log2(rank + 2)``
    when rank < K, else 0) and ``"mrr@K"`` (``1/(rank + 1)`` when rank < K), plus
    ``"auc"``: the mean fraction of negatives scored strictly below the positive.

    >>> sampled_rank_metrics(np.array([0.9, 0.1]), np.array([[0.5, 0.1], [0.5, 0.1]]), k=1)
    {'hr@1': 0.5, 'ndcg@1': 0.5, 'mrr@1': 0.5, 'auc': 0.5}

    The usual setup: leave one out, then 99 distinct negatives per test user, none of
    them a train or test positive:

    >>> train, test = leave_one_out(data, by="time")  # doctest: +SKIP
    >>> neg = sample_negatives(data, test.users, 99, replace=False, seed=0)  # doctest: +SKIP
    >>> out = sampled_rank_metrics(model.score(test.users, test.items),  # doctest: +SKIP
    ...                            model.score(test.users[:, None], neg), k=[5, 10])
    """
    pos = _np(scores_pos).astype(np.float64, copy=False)
    neg = _np(scores_neg).astype(np.float64, copy=False)
    if pos.ndim != 1 or neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(
            "fastmf.metrics.sampled_rank_metrics: need scores_pos (U,) and scores_neg (U, N), "
            f"got {pos.shape} and {neg.shape}"
        )
    if pos.size == 0 or neg.shape[1] == 0:
        raise ValueError("fastmf.metrics.sampled_rank_metrics: empty inputs")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("fastmf.metrics.sampled_rank_metrics: scores contain NaN/inf")
    rank = (neg >= pos[:, None]).sum(axis=1)
    ks = [int(k)] if np.ndim(k) == 0 else [int(v) for v in k]
    out: dict[str, float] = {}
    for cut in ks:
        if cut < 1:
            raise ValueError(f"fastmf.metrics.sampled_rank_metrics: k must be >= 1, got {cut}")
        hit = rank < cut
        out[f"hr@{cut}"] = float(hit.mean())
        out[f"ndcg@{cut}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())
        out[f"mrr@{cut}"] = float(np.where(hit, 1.0 / (rank + 1.0), 0.0).mean())
    out["auc"] = float((neg < pos[:, None]).mean())
    return out


# ----------------------------------------------------------------------------- beyond accuracy


def _lists(topk: Any, name: str) -> np.ndarray:
    top = _np(topk)
    if top.ndim != 2 or top.shape[0] == 0:
        raise ValueError(f"fastmf.metrics.{name}: topk must be a non-empty (U, K) array")
    if top.dtype.kind not in "iu":
        raise TypeError(f"fastmf.metrics.{name}: topk must hold int indices, got {top.dtype}")
    return top.astype(np.int64, copy=False)


def catalog_coverage(topk: Any, num_items: int) -> float:
    """Fraction of the catalogue recommended to anyone: distinct items in ``topk`` (U, K)
    (ignoring ``-1`` padding) divided by ``num_items``.

    >>> catalog_coverage(np.array([[0, 1], [1, -1]]), 4)
    0.5
    """
    top = _lists(topk, "catalog_coverage")
    if top.size and top.max() >= num_items:
        raise IndexError(
            f"fastmf.metrics.catalog_coverage: item {int(top.max())} out of range "
            f"[0, {num_items})"
        )
    seen = np.zeros(num_items, dtype=bool)
    seen[top[top >= 0]] = True
    return float(seen.sum() / num_items)


def novelty(topk: Any, item_popularity: Any, *, num_users: int | None = None) -> float:
    """Mean self-information of the recommended items, ``-log2 p(i)`` in bits.

    ``item_popularity``: (num_items,) interaction counts (e.g.
    :func:`fastmf.data.popularity` of the training set) or :class:`Interactions`.
    ``p(i) = count_i / sum(counts)``, or ``count_i / num_users`` (the fraction of users
    who interacted with ``i``) when ``num_users`` is given. Counts of 0 are treated as 1
    (an item never seen is as novel as one seen once). Each list's mean over its items
    (``-1`` padding ignored) is averaged over lists.

    >>> novelty(np.array([[0, 1]]), np.array([2, 2]))
    1.0
    """
    top = _lists(topk, "novelty")
    if isinstance(item_popularity, Interactions):
        counts = np.bincount(item_popularity.items, minlength=item_popularity.num_items)
    else:
        counts = _np(item_popularity)
    counts = np.maximum(counts.astype(np.float64), 1.0)
    if top.size and top.max() >= len(counts):
        raise IndexError(
            f"fastmf.metrics.novelty: item {int(top.max())} out of range [0, {len(counts)})"
        )
    denominator = float(num_users) if num_users is not None else counts.sum()
    info = -np.log2(counts / denominator)
    valid = top >= 0
    per_item = np.where(valid, info[np.where(valid, top, 0)], 0.0)
    length = valid.sum(axis=1)
    keep = length > 0
    if not keep.any():
        raise ValueError("fastmf.metrics.novelty: every list is empty")
    return float((per_item.sum(axis=1)[keep] / length[keep]).mean())


def intra_list_diversity(topk: Any, item_factors: Any, *, chunk_size: int = 4096) -> float:
    """Mean pairwise cosine distance ``1 - cos(f_i, f_j)`` within each list, averaged over
    lists.

    ``topk``: (U, K) int (``-1`` padding ignored; lists with fewer than 2 items are
    skipped); ``item_factors``: (num_items, d) item vectors (a zero vector has cosine 0 with
    everything). Uses ``sum_{i<j} cos = (||sum_i v_i||² - sum_i ||v_i||²) / 2`` on unit
    vectors, in chunks of ``chunk_size`` lists, so memory is ``O(chunk_size * K * d)``.

    >>> intra_list_diversity(np.array([[0, 1]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    1.0
    """
    top = _lists(topk, "intra_list_diversity")
    factors = _np(item_factors).astype(np.float64, copy=False)
    if factors.ndim != 2:
        raise ValueError("fastmf.metrics.intra_list_diversity: item_factors must be (N, d)")
    if top.size and top.max() >= factors.shape[0]:
        raise IndexError(
            f"fastmf.metrics.intra_list_diversity: item {int(top.max())} out of range "
            f"[0, {factors.shape[0]})"
        )
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    unit = np.divide(factors, norms, out=np.zeros_like(factors), where=norms > 0)
    totals, count = 0.0, 0
    for start in range(0, top.shape[0], chunk_size):
        block = top[start:start + chunk_size]
        valid = block >= 0
        vecs = unit[np.where(valid, block, 0)] * valid[..., None]
        summed = vecs.sum(axis=1)
        pair_sum = 0.5 * ((summed**2).sum(axis=1) - (vecs**2).sum(axis=(1, 2)))
        length = valid.sum(axis=1)
        keep = length >= 2
        pairs = length[keep] * (length[keep] - 1) / 2.0
        totals += float((1.0 - pair_sum[keep] / pairs).sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("fastmf.metrics.intra_list_diversity: no list has 2 or more items")
    return totals / count
