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
serendipity@K   ``sum_j hit[u, j] [item not among the K most popular] / K``
==============  ==================================================================

:func:`auc` ranks the whole catalogue instead of a top-K list (from a score matrix or
chunk by chunk from a score function); :func:`serendipity` needs item popularity.

Metric names (``"ndcg@10"``, ``"Hit@10"``, ``"auc"``, as :func:`fastmf.evaluate` takes them)
are case-insensitive with aliases; :func:`parse_metric` and :func:`metric_key` read them.

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
from fastmf.ops.checks import HALF_DTYPES

__all__ = [
    "METRIC_NAMES",
    "parse_metric",
    "metric_key",
    "higher_is_better",
    "rmse",
    "mae",
    "hit_rate_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "precision_at_k",
    "mrr",
    "map_at_k",
    "ranking_metrics",
    "serendipity",
    "most_popular",
    "auc",
    "auc_chunk_size",
    "sampled_rank_metrics",
    "catalog_coverage",
    "novelty",
    "intra_list_diversity",
]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16: half tensors convert through float32 (exact for both).
        return (x.float() if x.dtype in HALF_DTYPES else x).numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- metric names

# Canonical name -> accepted spellings (matched after lower-casing).
_SPELLINGS = {
    "hr": ("hr", "hit", "hitrate", "hit_rate"),
    "ndcg": ("ndcg",),
    "recall": ("recall",),
    "precision": ("precision", "prec", "p"),
    "map": ("map",),
    "mrr": ("mrr",),
    "serendipity": ("serendipity",),
    "coverage": ("coverage",),
    "novelty": ("novelty",),
    "diversity": ("diversity", "ild"),
    "auc": ("auc",),
    "rmse": ("rmse",),
    "mae": ("mae",),
}
_ALIASES = {alias: name for name, aliases in _SPELLINGS.items() for alias in aliases}
#: Canonical metric names, in the order error messages list them.
METRIC_NAMES = tuple(_SPELLINGS)
# Metrics of the top-K lists: they take an optional ``@K`` cut-off.
_CUTOFF_METRICS = frozenset(
    ("hr", "ndcg", "recall", "precision", "map", "mrr", "serendipity", "coverage", "novelty",
     "diversity"))
_LOWER_IS_BETTER = frozenset(("rmse", "mae"))


def _valid_names() -> str:
    return ", ".join(
        "/".join(aliases) + ("[@K]" if name in _CUTOFF_METRICS else "")
        for name, aliases in _SPELLINGS.items()
    )


def _parse_metric(name: Any, where: str) -> tuple[str, int | None]:
    if not isinstance(name, str):
        raise TypeError(f"{where}: a metric name must be a str, got {type(name).__name__} "
                        f"{name!r}")
    base, at, cut = name.strip().lower().partition("@")
    base = base.strip()
    canonical = _ALIASES.get(base)
    if canonical is None:
        raise ValueError(f"{where}: unknown metric {name!r}; valid names (case-insensitive, "
                         f"K a positive integer): {_valid_names()}")
    if not at:
        return canonical, None
    if canonical not in _CUTOFF_METRICS:
        raise ValueError(f"{where}: metric {name!r}: {canonical} takes no @K cut-off")
    cut = cut.strip()
    # isascii: str.isdigit accepts superscripts and other scripts' digits that int() rejects.
    if not (cut.isascii() and cut.isdigit()) or int(cut) < 1:
        raise ValueError(f"{where}: metric {name!r}: the cut-off after '@' must be a positive "
                         f"integer, got {cut!r}")
    return canonical, int(cut)


def parse_metric(name: str) -> tuple[str, int | None]:
    """``(canonical name, K)`` of a metric name; ``K`` is None without an ``@K`` suffix.

    Names are case-insensitive and ignore surrounding spaces. Aliases: ``hit``, ``hitrate``,
    ``hit_rate`` -> ``hr``; ``prec``, ``p`` -> ``precision``; ``ild`` -> ``diversity``.
    The top-K metrics (``hr``, ``ndcg``, ``recall``, ``precision``, ``map``, ``mrr``,
    ``serendipity``, ``coverage``, ``novelty``, ``diversity``) take an optional ``@K``
    (K a positive integer); ``auc``, ``rmse`` and ``mae`` take none. Raises ValueError,
    listing the valid names, for anything else.

    >>> parse_metric("HitRate@10")
    ('hr', 10)
    >>> parse_metric("MRR")
    ('mrr', None)
    """
    return _parse_metric(name, "fastmf.metrics.parse_metric")


def metric_key(name: str) -> str:
    """The canonical spelling of a metric name, the key :func:`fastmf.evaluate` returns it
    under: ``"hr@10"`` for ``"Hit@10"``, ``"mrr"`` for ``"MRR"``, ``"diversity"`` for
    ``"ild"``.

    >>> metric_key("P@5")
    'precision@5'
    """
    base, cut = _parse_metric(name, "fastmf.metrics.metric_key")
    return base if cut is None else f"{base}@{cut}"


def higher_is_better(name: str) -> bool:
    """False for the rating errors (``rmse``, ``mae``), True for every other metric.

    >>> higher_is_better("RMSE"), higher_is_better("ndcg@10")
    (False, True)
    """
    return _parse_metric(name, "fastmf.metrics.higher_is_better")[0] not in _LOWER_IS_BETTER


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


def _relevant(heldout: Any, arg: str = "heldout") -> tuple[np.ndarray, np.ndarray, int, int]:
    """(indptr, sorted indices, num_users, num_items) of the stored items per user."""
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
        f"fastmf.metrics: {arg} must be a scipy.sparse matrix or Interactions, "
        f"got {type(heldout).__name__}"
    )


def _int_k(k: Any, name: str, arg: str = "k") -> int:
    """``k`` as an int; bools, floats and other non-integers are errors, not truncated."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"fastmf.metrics.{name}: {arg} must be an int, got {k!r}")
    return int(k)


def _cutoffs(k: Any, name: str) -> list[int]:
    """The cut-offs of ``k`` (an int or an iterable of ints), each >= 1, at least one."""
    ks = [_int_k(k, name)] if np.ndim(k) == 0 else [_int_k(v, name) for v in k]
    if not ks:
        raise ValueError(f"fastmf.metrics.{name}: k is an empty list")
    for cut in ks:
        if cut < 1:
            raise ValueError(f"fastmf.metrics.{name}: k must be >= 1, got {cut}")
    return ks


def _user_rows(users: Any, name: str) -> np.ndarray:
    """``users`` as (U,) int64; floats and bools are errors, not truncated to an index."""
    rows = _np(users).reshape(-1)
    if rows.size and rows.dtype.kind not in "iu":
        raise TypeError(f"fastmf.metrics.{name}: users must hold int indices, got "
                        f"{rows.dtype} {rows[:3].tolist()}")
    return rows.astype(np.int64, copy=False)


def _hits(
    topk: Any, heldout: Any, k: int | None, users: Any, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hits (U', k) bool, relevant counts (U',) int64, the lists (U', k) int64) over the
    users with relevant items."""
    top = _np(topk)
    if top.ndim != 2:
        raise ValueError(f"fastmf.metrics.{name}: topk must be (U, K), got shape {top.shape}")
    if top.size and top.dtype.kind not in "iu":
        raise TypeError(f"fastmf.metrics.{name}: topk must hold int indices, got {top.dtype}")
    k = top.shape[1] if k is None else _int_k(k, name)
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
        rows = _user_rows(users, name)
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
    return hits, n_rel, top


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
    hits, n_rel, _ = _hits(topk, heldout, k, users, f"{metric}_at_k")
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
    ks = ([top.shape[1] if top.ndim == 2 else 1] if k is None
          else _cutoffs(k, "ranking_metrics"))
    hits, n_rel, _ = _hits(top, heldout, max(ks), users, "ranking_metrics")
    out: dict[str, float] = {}
    for cut in sorted(set(ks)):
        for metric in _RANKING:
            out[f"{metric}@{cut}"] = float(_per_user(metric, hits[:, :cut], n_rel).mean())
    out["users"] = int(len(n_rel))
    return out


def _popularity(item_popularity: Any, num_items: int | None, name: str) -> np.ndarray:
    """(num_items,) float64 counts from an array or an Interactions (its item counts);
    ``num_items`` None: any length."""
    if isinstance(item_popularity, Interactions):
        counts = np.bincount(item_popularity.items, minlength=item_popularity.num_items)
    else:
        counts = _np(item_popularity)
    if num_items is None and counts.ndim == 1:
        num_items = len(counts)
    if counts.ndim != 1 or len(counts) != num_items:
        raise ValueError(
            f"fastmf.metrics.{name}: item_popularity must be ({num_items},) (one count per "
            f"item of heldout), got shape {counts.shape}"
        )
    if counts.dtype.kind not in "biuf":
        raise TypeError(f"fastmf.metrics.{name}: item_popularity must be numeric, got "
                        f"{counts.dtype}")
    counts = counts.astype(np.float64)
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"fastmf.metrics.{name}: item_popularity must hold counts >= 0 "
                         "(no NaN/inf, no negatives)")
    return counts


def most_popular(item_popularity: Any, n: int) -> np.ndarray:
    """The ``n`` items with the highest counts, most popular first; equal counts go to the
    lower item index (the order :meth:`fastmf.MF.recommend` gives its cold-start fallback).

    >>> most_popular(np.array([3, 9, 3, 1]), 2)
    array([1, 0])
    """
    counts = _np(item_popularity).astype(np.float64, copy=False)
    n = _int_k(n, "most_popular", "n")
    if n < 0:
        raise ValueError(f"fastmf.metrics.most_popular: n must be >= 0, got {n}")
    # lexsort sorts by the last key first: descending count, then ascending index.
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[:n]


def serendipity(
    topk: Any,
    heldout: Any,
    item_popularity: Any,
    k: int | None = None,
    *,
    users: Any = None,
    primitive_k: int | None = None,
) -> float:
    r"""Serendipity@K against a popularity baseline: the fraction of each user's top K that
    is relevant **and** unexpected, averaged over users with held-out items.

    Following Ge et al. (2010, "Beyond accuracy: evaluating recommender systems by coverage
    and serendipity"), an item is *unexpected* when a primitive recommender would not have
    suggested it; here the primitive recommender is global popularity, whose list ``PM`` is
    the ``primitive_k`` (default ``k``) items with the highest ``item_popularity``, equal
    counts going to the lower index (:func:`most_popular`). With ``L_u`` the first ``k``
    items of user ``u``'s list and ``R_u`` its held-out (relevant) items::

        serendipity_u = |(L_u \ PM) ∩ R_u| / k

    averaged over the users with at least one held-out item, as the other ranking metrics.
    Relevance is binary; ``-1`` padding never counts and still takes a place in the
    denominator (as in precision@K); an item repeated within a list counts once.
    ``primitive_k=0`` makes every item unexpected (serendipity equals precision@K).

    Variants in the literature differ in the denominator (some divide by the number of
    unexpected items ``|L_u \ PM|`` instead of ``k``), in graded utility instead of binary
    relevance, in a per-user primitive list (popular items the user has not seen) or a
    primitive model other than popularity, and in a rank discount (Murakami et al. 2008).
    This function implements the one above: binary relevance, a single global popularity
    list, denominator ``k``. Unexpectedness measured by distance to the user's history
    (Kaminskas & Bridge 2016) is a different quantity and is not computed here.

    ``topk``, ``heldout``, ``users``: as for the other ranking metrics (module docstring).
    ``item_popularity``: (num_items,) interaction counts (or any popularity score), usually
    of the training set, or an :class:`Interactions` whose item counts are used.

    >>> heldout = sp.csr_matrix(np.array([[1, 1, 0, 1]]))
    >>> serendipity(np.array([[0, 1, 3]]), heldout, np.array([9, 1, 5, 2]), primitive_k=2)
    0.6666666666666666
    """
    hits, _, top = _hits(topk, heldout, k, users, "serendipity")
    num_items = _relevant(heldout)[3]
    counts = _popularity(item_popularity, num_items, "serendipity")
    k = hits.shape[1]
    primitive_k = k if primitive_k is None else _int_k(primitive_k, "serendipity",
                                                        "primitive_k")
    if primitive_k < 0:
        raise ValueError(f"fastmf.metrics.serendipity: primitive_k must be >= 0, got "
                         f"{primitive_k}")
    expected = np.zeros(num_items, dtype=bool)
    expected[most_popular(counts, primitive_k)] = True
    # A hit is never padding, so indexing with the padded lists is safe where it matters.
    unexpected = ~expected[np.where(top >= 0, top, 0)]
    return float(((hits & unexpected).sum(axis=1) / k).mean())


# ----------------------------------------------------------------------------- full-catalog AUC


def _padded_rows(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The stored items of ``rows`` as (B, m) int64 padded with item 0 and a (B, m) mask of
    the real entries, m the longest row; a row's entries come first, in item order."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    width = int(lengths.max()) if len(rows) else 0
    slot = np.arange(width, dtype=np.int64)
    real = slot < lengths[:, None]
    if not indices.size:
        return np.zeros(real.shape, dtype=np.int64), real
    cols = indices[np.minimum(starts[:, None] + slot, len(indices) - 1)]
    return np.where(real, cols, 0), real


def _row_keys(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray,
              num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``j * num_items + item`` (increasing) of the stored items of ``rows[j]``, and
    each row's count."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    first = np.cumsum(lengths) - lengths
    offsets = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)
    row_of = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    return row_of * num_items + indices[offsets], lengths


# Rows with at most this many held-out items count by comparisons, the others by sorting.
_AUC_COMPARE_MAX = 8


def _auc_block(
    block: torch.Tensor,
    heldout: tuple[np.ndarray, np.ndarray],
    exclude: tuple[np.ndarray, np.ndarray] | None,
    users: np.ndarray,
    name: str,
) -> tuple[float, int]:
    """(sum of the defined per-user AUCs, their number) for the (B, I) scores of ``users``.

    Mann-Whitney: twice a positive's U counts each negative scored below it twice and each
    one scored equal once. Every non-negative item gets score +inf, so it never counts below
    a finite score. A row with at most _AUC_COMPARE_MAX positives compares each positive
    with the whole row, ``2 U_p = I + sum_i sign(s_p - s_i)`` (a +inf item adds 1 - 1 = 0),
    which measured ~16x cheaper per positive than sorting a 20k-item row; the other rows
    binary-search their sorted negatives.
    """
    batch, num_items = block.shape
    device = block.device
    if not block.is_floating_point() or block.dtype in (torch.float16, torch.bfloat16):
        block = block.to(torch.float64 if not block.is_floating_point() else torch.float32)
    cols, real = _padded_rows(*heldout, users)
    row_of = np.broadcast_to(np.arange(batch, dtype=np.int64)[:, None], cols.shape)
    pos_keys = row_of * num_items + cols
    n_rel = real.sum(axis=1)
    if exclude is not None:
        ex_keys, n_ex = _row_keys(*exclude, users, num_items)
        where = np.searchsorted(ex_keys, pos_keys)
        in_ex = ex_keys[np.minimum(where, len(ex_keys) - 1)] == pos_keys if ex_keys.size else (
            np.zeros(cols.shape, dtype=bool))
        in_ex &= real
        # An excluded item is not ranked at all, even when it is also held out.
        positive = real & ~in_ex
        n_neg = num_items - n_rel - n_ex + in_ex.sum(axis=1)
    else:
        ex_keys = np.zeros(0, dtype=np.int64)
        positive = real
        n_neg = num_items - n_rel
    n_pos = positive.sum(axis=1)

    # Excluded scores may be anything (a masked matrix holds -inf there); the rest must be
    # finite. A finite sum proves every score finite at the cost of one pass (measured ~15x
    # faster than isfinite + all); a non-finite one, even from overflow, takes the exact check.
    ex_flat = torch.as_tensor(ex_keys, device=device)
    if not torch.isfinite(block.sum()):
        ranked = block.clone()
        ranked.view(-1)[ex_flat] = 0
        if not torch.isfinite(ranked).all():
            raise ValueError(f"fastmf.metrics.{name}: scores contain NaN/inf at items that "
                             "are ranked (not excluded)")
    pos_cols = torch.as_tensor(cols, device=device)
    weight = torch.as_tensor(positive, dtype=torch.float64, device=device)
    # Padding slots and excluded positives may hold NaN, which a zero weight would not cancel.
    query = torch.where(weight > 0, block.gather(1, pos_cols),
                        torch.zeros((), dtype=block.dtype, device=device))
    negatives = block.clone()
    negatives.view(-1)[ex_flat] = float("inf")
    negatives.view(-1)[torch.as_tensor(pos_keys[real], device=device)] = float("inf")

    twice_u = np.zeros(batch, dtype=np.float64)
    light = n_rel <= _AUC_COMPARE_MAX
    if light.any():
        # Most positives first: slot j then runs on a prefix of the rows, so the work is one
        # pass per positive, not per row times the longest row.
        rows = np.flatnonzero(light)
        rows = rows[np.argsort(-n_rel[rows], kind="stable")]
        live_per_slot = (n_rel[rows][None, :] > np.arange(int(n_rel[rows[0]]))[:, None]).sum(1)
        index = torch.as_tensor(rows, device=device)
        neg_l, query_l, weight_l = negatives[index], query[index], weight[index]
        part = torch.zeros(len(rows), dtype=torch.float64, device=device)
        # Sums of +-1 are exact in float32 below 2**24 items, and a float64 accumulator
        # measured ~7x slower.
        exact = torch.float32 if num_items < 2**24 else torch.float64
        for slot, live in enumerate(live_per_slot.tolist()):
            signs = torch.sign(query_l[:live, slot:slot + 1] - neg_l[:live]).sum(dim=1,
                                                                                  dtype=exact)
            part[:live] += (signs.to(torch.float64) + num_items) * weight_l[:live, slot]
        twice_u[rows] = part.cpu().numpy()
    if not light.all():
        rows = np.flatnonzero(~light)
        index = torch.as_tensor(rows, device=device)
        sorted_neg = negatives[index].sort(dim=1).values
        query_h = query[index].contiguous()
        below = torch.searchsorted(sorted_neg, query_h, side="left")
        not_above = torch.searchsorted(sorted_neg, query_h, side="right")
        twice_u[rows] = ((below + not_above).to(torch.float64) * weight[index]).sum(
            dim=1).cpu().numpy()
    defined = (n_pos > 0) & (n_neg > 0)
    values = 0.5 * twice_u[defined] / (n_pos[defined] * n_neg[defined].astype(np.float64))
    return float(values.sum()), int(defined.sum())


def auc_chunk_size(num_items: int, max_users: int | None = None) -> int:
    """Users per :func:`auc` chunk: about 4M scores (16 MB per float32 copy; a chunk holds a
    few), at most ``max_users``."""
    rows = max(1, (1 << 22) // max(int(num_items), 1))
    return rows if max_users is None else max(1, min(rows, int(max_users)))


@torch.no_grad()
def auc(
    scores: Any,
    heldout: Any,
    *,
    exclude: Any = None,
    users: Any = None,
    chunk_size: int | None = None,
) -> float:
    r"""Full-catalog ROC AUC per user, averaged over users (as LightFM's ``auc_score``
    reports it): for each user, the probability that a random held-out item is scored above
    a random negative item, ties counting one half.

    For user ``u`` with held-out items ``R_u``, excluded items ``E_u`` (usually its training
    items), positives ``P = R_u \ E_u`` and negatives ``N = all items \ (R_u ∪ E_u)``::

        AUC_u = (#{(p, n): s_p > s_n} + #{(p, n): s_p = s_n} / 2) / (|P| |N|)

    (equivalently ``(sum of the positives' average ranks among P ∪ N - |P|(|P|+1)/2) /
    (|P| |N|)``, the Mann-Whitney statistic; it equals ``sklearn.metrics.roc_auc_score`` on
    the user's ranked items). Users with no positive or no negative have no AUC and are
    left out of the mean (a ValueError when none is left). An item both held out and
    excluded is not ranked at all.

    - ``scores``: a (U, num_items) numpy array or torch tensor of scores (higher ranks
      first), row ``j`` for user ``users[j]`` (default: row ``u`` is user ``u``); or a
      callable ``scores(users: np.ndarray) -> (len(users), num_items)`` tensor/array, called
      on chunks of ``chunk_size`` users so that the full U×I matrix never exists, with
      ``users`` defaulting to every user that has a held-out item. Scores of excluded items
      are ignored (they may be ``-inf``); the others must be finite.
    - ``heldout``, ``exclude``: (num_users, num_items) scipy.sparse matrices (stored
      nonzeros count) or :class:`Interactions`.
    - ``chunk_size``: users per chunk (default: about 4M scores per chunk).

    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1]]))
    >>> auc(np.array([[0.9, 0.5, 0.1, 0.5]]), heldout)
    0.875
    """
    indptr, indices, num_users, num_items = _relevant(heldout)
    if exclude is not None:
        ex_indptr, ex_indices, *ex_shape = _relevant(exclude, "exclude")
        if tuple(ex_shape) != (num_users, num_items):
            raise ValueError(f"fastmf.metrics.auc: exclude is {tuple(ex_shape)}, heldout "
                             f"{(num_users, num_items)}; they must have the same shape")
    if chunk_size is None:
        chunk_size = auc_chunk_size(num_items)
    chunk_size = _int_k(chunk_size, "auc", "chunk_size")
    if chunk_size < 1:
        raise ValueError(f"fastmf.metrics.auc: chunk_size must be >= 1, got {chunk_size}")
    n_rel = np.diff(indptr)

    dense = None
    if callable(scores):
        rows = np.flatnonzero(n_rel > 0) if users is None else _user_rows(users, "auc")
    else:
        dense = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(_np(scores))
        if dense.ndim != 2 or dense.shape[1] != num_items:
            raise ValueError(f"fastmf.metrics.auc: scores must be (U, {num_items}) (one column "
                             f"per item of heldout), got shape {tuple(dense.shape)}")
        if users is None:
            if dense.shape[0] != num_users:
                raise ValueError(f"fastmf.metrics.auc: scores has {dense.shape[0]} rows but "
                                 f"heldout has {num_users} users; pass users= to say which "
                                 "user each row is")
            rows = np.arange(num_users, dtype=np.int64)
        else:
            rows = _user_rows(users, "auc")
            if rows.shape[0] != dense.shape[0]:
                raise ValueError(f"fastmf.metrics.auc: users has {rows.shape[0]} entries, "
                                 f"scores {dense.shape[0]} rows")
    if rows.size and (rows.min() < 0 or rows.max() >= num_users):
        raise IndexError(f"fastmf.metrics.auc: user index out of range [0, {num_users})")
    # Rows of users without held-out items are never scored nor sorted.
    keep = np.flatnonzero(n_rel[rows] > 0)
    if not keep.size:
        raise ValueError("fastmf.metrics.auc: no evaluated user has held-out items")

    total, count = 0.0, 0
    for lo in range(0, len(keep), chunk_size):
        part = keep[lo:lo + chunk_size]
        block_users = rows[part]
        if dense is None:
            block = scores(block_users)
            block = block if isinstance(block, torch.Tensor) else torch.as_tensor(_np(block))
            if tuple(block.shape) != (len(block_users), num_items):
                raise ValueError(f"fastmf.metrics.auc: the scores callable returned shape "
                                 f"{tuple(block.shape)} for {len(block_users)} users, expected "
                                 f"({len(block_users)}, {num_items})")
        else:
            block = dense[torch.as_tensor(part, device=dense.device)]
        part_sum, part_count = _auc_block(
            block.detach(), (indptr, indices),
            None if exclude is None else (ex_indptr, ex_indices), block_users, "auc")
        total += part_sum
        count += part_count
    if count == 0:
        raise ValueError("fastmf.metrics.auc: no evaluated user has both a held-out item and "
                         "a negative item to rank it against (all excluded or held out)")
    return total / count


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
    ks = _cutoffs(k, "sampled_rank_metrics")
    rank = (neg >= pos[:, None]).sum(axis=1)
    out: dict[str, float] = {}
    for cut in ks:
        hit = rank < cut
        out[f"hr@{cut}"] = float(hit.mean())
        out[f"ndcg@{cut}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())
        out[f"mrr@{cut}"] = float(np.where(hit, 1.0 / (rank + 1.0), 0.0).mean())
    out["auc"] = float((neg < pos[:, None]).mean())
    return out


# ----------------------------------------------------------------------------- beyond accuracy


def _lists(topk: Any, name: str, num_items: int) -> np.ndarray:
    """``topk`` as (U, K) int64, every entry an item in [0, num_items) or -1 (padding)."""
    top = _np(topk)
    if top.ndim != 2 or top.shape[0] == 0:
        raise ValueError(f"fastmf.metrics.{name}: topk must be a non-empty (U, K) array")
    if top.dtype.kind not in "iu":
        raise TypeError(f"fastmf.metrics.{name}: topk must hold int indices, got {top.dtype}")
    top = top.astype(np.int64, copy=False)
    if top.size and (top.min() < -1 or top.max() >= num_items):
        bad = int(top.min()) if top.min() < -1 else int(top.max())
        raise IndexError(
            f"fastmf.metrics.{name}: topk item {bad} out of range [0, {num_items}) "
            "(-1 marks padding)"
        )
    return top


def catalog_coverage(topk: Any, num_items: int) -> float:
    """Fraction of the catalogue recommended to anyone: distinct items in ``topk`` (U, K)
    (ignoring ``-1`` padding; any other entry must be in ``[0, num_items)``) divided by
    ``num_items`` (an int >= 1).

    >>> catalog_coverage(np.array([[0, 1], [1, -1]]), 4)
    0.5
    """
    num_items = _int_k(num_items, "catalog_coverage", "num_items")
    if num_items < 1:
        raise ValueError(f"fastmf.metrics.catalog_coverage: num_items must be >= 1, got "
                         f"{num_items}")
    top = _lists(topk, "catalog_coverage", num_items)
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
    (``-1`` padding ignored; any other entry must index ``item_popularity``) is averaged
    over lists.

    >>> novelty(np.array([[0, 1]]), np.array([2, 2]))
    1.0
    """
    counts = np.maximum(_popularity(item_popularity, None, "novelty"), 1.0)
    top = _lists(topk, "novelty", len(counts))
    if num_users is not None and (isinstance(num_users, bool) or not isinstance(
            num_users, int | np.integer) or num_users < counts.max()):
        raise ValueError(f"fastmf.metrics.novelty: num_users must be an int >= the largest "
                         f"count ({counts.max():g}), got {num_users!r}")
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
    skipped; any other entry an item in ``[0, num_items)``); ``item_factors``: (num_items, d)
    finite item vectors (a zero vector has cosine 0 with everything; NaN/inf is a
    ValueError). Uses ``sum_{i<j} cos = (||sum_i v_i||² - sum_i ||v_i||²) / 2`` on unit
    vectors, in chunks of ``chunk_size`` (a positive int) lists, so memory is
    ``O(chunk_size * K * d)``.

    >>> intra_list_diversity(np.array([[0, 1]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    1.0
    """
    chunk_size = _int_k(chunk_size, "intra_list_diversity", "chunk_size")
    if chunk_size < 1:
        raise ValueError(f"fastmf.metrics.intra_list_diversity: chunk_size must be >= 1, got "
                         f"{chunk_size}")
    factors = _np(item_factors).astype(np.float64, copy=False)
    if factors.ndim != 2:
        raise ValueError("fastmf.metrics.intra_list_diversity: item_factors must be (N, d)")
    finite = np.isfinite(factors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        value = factors[row][~np.isfinite(factors[row])][0]
        raise ValueError(f"fastmf.metrics.intra_list_diversity: item_factors must be finite, "
                         f"got {value} in row {row}")
    top = _lists(topk, "intra_list_diversity", factors.shape[0])
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
