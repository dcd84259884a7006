"""Recommending for someone new, and growing a trained model.

Over the protocol's scoring hooks (``item_vectors`` / ``user_vectors``; ``fastmf.MF``'s
tables), for any dot-product model:

- :func:`fold_in`: the vector of an unseen user from the items they interacted with:
  closed-form ridge regression on the item vectors for the squared loss (an implicit user
  gets target 1 per item), a few full-batch Adam steps of BPR or BCE against uniformly
  sampled non-interacted items for the ranking losses (implicit's ``recalculate_user``),
  both shrunk toward the population prior (:func:`user_prior`: the mean trained user).
- :func:`recommend_new_user`: fold in, then the exact top-k of the rest of the catalogue.
- :func:`user_vectors_from_features`, :func:`item_vectors_from_features`,
  :func:`recommend_from_features`, :func:`score_new_items`: for
  :class:`~fastmf.models.Hybrid`, users and items described by features only; for other
  models a new item's vector is the weighted mean of the vectors of the catalogue items
  sharing its features (``catalog_features``).
- :func:`add_rows`: append users or items to ``fastmf.MF`` or any model whose tables are
  fastmf.nn modules or row parameters, growing the optimizer state with them so training
  continues (implicit's ``partial_fit_users``/``partial_fit_items``); Hybrid's
  ``add_users``/``add_items`` call :func:`grow_hybrid`. All-or-nothing: every check and
  every new tensor comes before the first change.

When a new user has nothing to go on (no known item), the answer is the prior's ranking
(the mean user's, a popularity order learned by the model) or, for a model without user
vectors or with ``prior="zero"``, the popular items; a :class:`PopularityFallbackWarning`
says so either way: a mistyped id is never silently answered with the top sellers.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmf import optim as fastmf_optim
from fastmf.data.features import Features
from fastmf.memory import cat_rows
from fastmf.nn import embedding as nn_embedding

__all__ = ["PopularityFallbackWarning", "add_rows", "fold_in", "grow_hybrid",
           "item_vectors_from_features", "recommend_from_features", "recommend_new_user",
           "score_new_items", "user_prior", "user_vectors_from_features"]


class PopularityFallbackWarning(UserWarning):
    """A recommendation came from the population (item popularity, or the model's mean
    user), not from the person's data."""


def _name(model) -> str:
    return f"fastmf.models.coldstart ({type(model).__name__})"


def _item_side(model) -> tuple[Tensor, Tensor | None]:
    """(item vectors (N, D), item bias (N,) or None), detached. TypeError for a model
    without them (MLP and NeuMF score through layers: their item_vectors raise
    NotImplementedError, which reached fold-in's callers as such)."""
    if getattr(model, "has_vectors", True) is False:
        raise TypeError(f"{_name(model)}: the model has no item vectors (fold-in needs a "
                        "dot-product model)")
    if hasattr(model, "item_vectors"):
        with torch.no_grad():
            vectors, bias = model.item_vectors()
    elif hasattr(model, "tables"):
        _, vectors, _, bias = model.tables()
    else:
        raise TypeError(f"{_name(model)}: the model has no item vectors (fold-in needs a "
                        "dot-product model)")
    return vectors.detach(), None if bias is None else bias.detach()


def _num_items(model) -> int:
    num = getattr(model, "num_items", None)
    return int(num) if num is not None else _item_side(model)[0].shape[0]


def _base_offset(model) -> float:
    """What every user's score starts from (MF's global mean; 0 for the others)."""
    return float(getattr(model, "mu", 0.0))


def _item_indices(model, items, raw_ids: bool, op: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the known items, mask of the known ones over ``items``)."""
    values = items.detach().cpu().numpy() if isinstance(items, Tensor) else items
    values = np.asarray(values if np.ndim(values) else [values]).reshape(-1)
    num_items = _num_items(model)
    if raw_ids:
        id_map = getattr(model, "item_map", None)
        if id_map is None:
            raise ValueError(f"{op}: raw_ids=True but the model holds no item id map (train "
                             "it with fastmf.fit or call attach_data)")
        index = id_map.lookup(values) if len(values) else np.zeros(0, np.int64)
        return index[index >= 0], index >= 0
    if len(values) and values.dtype.kind not in "iu":
        raise TypeError(f"{op}: items must be integer item indices, got dtype {values.dtype} "
                        "(pass raw_ids=True for raw ids)")
    index = values.astype(np.int64)
    bad = (index < 0) | (index >= num_items)
    if bad.any():
        raise IndexError(f"{op}: item index {int(index[bad][0])} out of range "
                         f"[0, {num_items}) (pass raw_ids=True for raw ids)")
    return index, np.ones(len(index), dtype=bool)


def _user_table(model):
    """``fn(users) -> (vectors, offsets or None)`` over the trained users, or None when the
    model has no user vectors."""
    if hasattr(model, "user_vectors"):
        def table(users):
            with torch.no_grad():
                return model.user_vectors(users)
        try:
            table(np.zeros(1, np.int64))  # numpy ids: the model puts them on its device
        except NotImplementedError:
            return None
        return table
    if hasattr(model, "tables"):
        p, _, bu, _ = model.tables()
        mu = _base_offset(model)

        def table(users):
            users = torch.as_tensor(users, device=p.device)
            return p.detach()[users], (None if bu is None else mu + bu.detach()[users])
        return table
    return None


def user_prior(model, users=None) -> tuple[Tensor, float] | None:
    """The population prior of a new user: ``(mean vector (D,), mean offset)`` of the
    model's users (``users``: indices to average over, e.g. only those with training
    interactions; default every user), the offset being ``mu + b_u`` as in
    :func:`fold_in`. ``None`` when the model has no user vectors. The mean user scores item
    i by ``<p̄, q_i> + b_i``: a popularity-like order the model learned."""
    op = "fastmf.models.coldstart.user_prior"
    table = _user_table(model)
    if table is None:
        return None
    num_users = int(model.num_users)
    if users is None:
        ids = np.arange(num_users)
    else:
        ids = users.detach().cpu().numpy() if isinstance(users, Tensor) else users
        ids = np.asarray(ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{op}: users must be integer user indices, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= num_users)
        if bad.any():
            raise IndexError(f"{op}: user index {int(ids[bad][0])} out of range "
                             f"[0, {num_users})")
    if len(ids) == 0:
        raise ValueError(f"{op}: users is empty; there is nobody to average over")
    total, offset_total = None, 0.0
    for lo in range(0, len(ids), 65536):  # bounded memory for large user tables
        vectors, offsets = table(ids[lo:lo + 65536].astype(np.int64))
        part = vectors.detach().to(torch.float64).sum(0)
        total = part if total is None else total + part
        offset_total += (float(offsets.detach().to(torch.float64).sum()) if offsets is not None
                         else _base_offset(model) * len(vectors))
    return total / len(ids), offset_total / len(ids)


def _resolve_prior(model, prior, dim: int, op: str) -> tuple[Tensor, float] | None:
    """``(vector (D,) float64, offset)`` of ``prior`` ("mean", "zero" or a given pair), or
    None for "zero" and for "mean" on a model without user vectors."""
    if isinstance(prior, str):
        if prior == "zero":
            return None
        if prior == "mean":
            return user_prior(model)
        raise ValueError(f"{op}: prior must be 'mean', 'zero' or a (vector, offset) pair, got "
                         f"{prior!r}")
    if not isinstance(prior, tuple | list) or len(prior) != 2:
        raise ValueError(f"{op}: prior must be 'mean', 'zero' or a (vector, offset) pair, got "
                         f"a {type(prior).__name__}")
    vector = torch.as_tensor(np.asarray(prior[0].detach().cpu() if isinstance(prior[0], Tensor)
                                        else prior[0], dtype=np.float64))
    if vector.shape != (dim,):
        raise ValueError(f"{op}: the prior vector has shape {tuple(vector.shape)}, the model's "
                         f"vectors ({dim},)")
    offset = float(prior[1])
    if not (torch.isfinite(vector).all() and np.isfinite(offset)):
        raise ValueError(f"{op}: the prior holds NaN/inf")
    return vector, offset


def fold_in(model, items, *, ratings=None, loss: str | None = None, reg: float | None = None,
            steps: int = 50, lr: float = 0.05, num_negatives: int = 20, seed: int = 0,
            prior="mean", raw_ids: bool = False) -> tuple[Tensor, float]:
    """The vector of a user the model has not seen, from the ``items`` they interacted with
    (indices, or raw ids with ``raw_ids``; unknown raw ids are skipped): ``(vector (D,),
    offset)`` so that the user's score of item i is ``<vector, q_i> + b_i + offset``.

    ``prior``: what the answer is shrunk toward, ``(p̄, b̄)``. ``"mean"`` (default): the
    mean trained user, :func:`user_prior` (``(0, 0)`` for a model without user vectors);
    ``"zero"``: ``(0, 0)``; or a ``(vector, offset)`` pair such as ``user_prior(model,
    trained_users)`` (computed once for many fold-ins). The penalty is
    ``reg (|p - p̄|² + (b_u - b̄)²)`` against a loss summed over the known items, so the
    prior's pull fades as they grow (the ranking losses penalise ``p`` only); with no known
    item the answer is the prior itself. ``reg`` None: 0.1 for the squared loss, 0.3 for
    the ranking losses.

    The ranking defaults (the mean prior, reg 0.3) were chosen on inner user splits of
    MovieLens-latest-small and of a synthetic set (benchmarks/coldstart.py, "Cold start"
    in benchmarks/README.md; MF trained with BPR, 1, 3 and 10 known items): the zero prior
    was 0.015 NDCG@10 better on the first and 0.05 worse on the second (0.11 worse with one
    known item); the mean was better on average and in the worst case.

    - ``loss="mse"`` (default with ``ratings``): ridge regression
      ``min Σ (r_i - mu - b_i - <p, q_i> - b_u)² + penalty``, closed form; without ratings
      every target is 1. With ``reg=0`` the least-squares step of least norm (fewer known
      items than ``dim + 1`` leave many exact fits).
    - ``loss="bpr"``/``"bce"`` (default without ratings, when the model trains with one):
      ``steps`` full-batch Adam steps (``lr``) from the prior on ``p`` (and ``b_u`` for
      BCE, unpenalised) of the loss against ``num_negatives`` uniformly drawn
      non-interacted items per positive (averaged per positive), plus ``reg |p - p̄|²``;
      deterministic given ``seed``.

    Raises ValueError when no item is known and there is no prior (``prior="zero"`` or a
    model without user vectors; :func:`recommend_new_user` uses popularity then)."""
    op = "fastmf.models.coldstart.fold_in"
    index, _ = _item_indices(model, items, raw_ids, op)
    if ratings is not None:
        ratings = np.asarray(ratings, dtype=np.float64).reshape(-1)
        if raw_ids:
            _, known = _item_indices(model, items, raw_ids, op)
            if len(ratings) != len(known):
                raise ValueError(f"{op}: ratings has {len(ratings)} values for {len(known)} "
                                 "items")
            ratings = ratings[known]
        if len(ratings) != len(index):
            raise ValueError(f"{op}: ratings has {len(ratings)} values for {len(index)} items")
        if not np.isfinite(ratings).all():
            raise ValueError(f"{op}: ratings hold NaN/inf")
    if loss is None:
        default = getattr(model, "default_loss", "mse")
        loss = "mse" if ratings is not None or default not in ("bpr", "bce") else default
    if loss not in ("mse", "bpr", "bce"):
        raise ValueError(f"{op}: loss must be 'mse', 'bpr' or 'bce', got {loss!r}")
    if reg is None:
        reg = 0.1 if loss == "mse" else 0.3
    if isinstance(reg, bool) or not isinstance(reg, int | float) or not (
            np.isfinite(reg) and reg >= 0):
        raise ValueError(f"{op}: reg must be finite and >= 0, got {reg!r}")
    # (lr=inf folded in a NaN vector, and recommend_new_user then ranked on -inf scores.)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
            np.isfinite(lr) and lr > 0):
        raise ValueError(f"{op}: lr must be a finite number > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{op}: seed must be an int >= 0, got {seed!r}")
    vectors, bias = _item_side(model)
    work = torch.float64
    q = vectors.to(work)
    b = bias.to(work) if bias is not None else torch.zeros(q.shape[0], dtype=work,
                                                            device=q.device)
    mu = _base_offset(model)
    resolved = _resolve_prior(model, prior, q.shape[1], op)
    if len(index) == 0:
        if resolved is None:
            raise ValueError(f"{op}: no known item to fold in from (got {np.size(items)} "
                             "item(s)) and no prior to answer with (prior='zero' or a model "
                             "without user vectors)")
        return resolved[0].to(vectors.dtype).to(vectors.device), resolved[1]
    if resolved is None:
        p_prior, b_prior = torch.zeros(q.shape[1], dtype=work, device=q.device), 0.0
    else:
        p_prior, b_prior = resolved[0].to(q.device), resolved[1] - mu
    idx = torch.as_tensor(index, device=q.device)
    if loss == "mse":
        target = (torch.as_tensor(ratings, dtype=work, device=q.device) if ratings is not None
                  else torch.ones(len(index), dtype=work, device=q.device))
        # Solve for the step away from the prior: plain ridge on what the prior leaves
        # unexplained. The user's bias is a last coordinate with a constant 1 feature.
        rest = target - mu - b[idx] - q[idx] @ p_prior - b_prior
        design = torch.cat([q[idx], torch.ones(len(index), 1, dtype=work, device=q.device)], 1)
        if reg > 0:
            gram = design.T @ design + reg * torch.eye(design.shape[1], dtype=work,
                                                      device=q.device)
            step = torch.linalg.solve(gram, design.T @ rest)
        else:
            # Without the ridge term, fewer items than dim + 1 leave the normal equations
            # singular; solve() then returned an arbitrary exact fit (entries of -53, scores
            # of 20 on a 1-5 scale). The least-squares step of least norm instead.
            step = torch.linalg.pinv(design) @ rest
        return ((p_prior + step[:-1]).to(vectors.dtype),
                mu + b_prior + float(step[-1]))
    return _fold_in_ranking(q, b, idx, loss, reg, steps, lr, num_negatives, seed,
                            vectors.dtype, mu, p_prior, b_prior, op)


def _fold_in_ranking(q, b, idx, loss, reg, steps, lr, num_negatives, seed, dtype, mu,
                     p_prior, b_prior, op):
    for name, value in (("steps", steps), ("num_negatives", num_negatives)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    num_items = q.shape[0]
    seen = torch.zeros(num_items, dtype=torch.bool, device=q.device)
    seen[idx] = True
    pool = torch.nonzero(~seen).squeeze(1)
    if len(pool) == 0:
        raise ValueError(f"{op}: the user interacted with every item; nothing to rank against")
    p = p_prior.clone().requires_grad_(True)
    bu = torch.tensor(b_prior, dtype=q.dtype, device=q.device, requires_grad=True)
    params = [p, bu] if loss == "bce" else [p]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device=q.device).manual_seed(seed)
    pos_scores_base = b[idx]
    for _ in range(steps):
        neg = pool[torch.randint(len(pool), (len(idx), num_negatives), generator=gen,
                                 device=q.device)]
        pos = q[idx] @ p + pos_scores_base + bu
        negs = q[neg] @ p + b[neg] + bu
        # Summed over the positives (each averaged over its negatives), as the squared
        # loss is: the prior weighs as much as reg / n positives.
        if loss == "bpr":
            value = F.softplus(negs - pos.unsqueeze(1)).mean(1).sum()
        else:
            value = (F.softplus(-pos).sum() + F.softplus(negs).sum()) / num_negatives
        value = value + reg * (p - p_prior).pow(2).sum()
        opt.zero_grad()
        value.backward()
        opt.step()
    return p.detach().to(dtype), mu + float(bu.detach())


def _popular(model, k: int, skip: np.ndarray, what: str, stacklevel: int = 3):
    """The fallback: the k most popular items (lowest index on ties) not in ``skip``."""
    warnings.warn(f"fastmf.models.coldstart: {what}; answering with the popular-items "
                  "fallback", PopularityFallbackWarning, stacklevel=stacklevel)
    num_items = _num_items(model)
    counts = getattr(model, "item_popularity", None)
    counts = np.zeros(num_items) if counts is None else np.asarray(counts, dtype=np.float64)
    order = np.lexsort((np.arange(num_items), -counts))
    order = order[~np.isin(order, skip)][:k]
    scores = np.full(k, -np.inf)
    scores[:len(order)] = counts[order]
    top = np.full(k, -1, dtype=np.int64)
    top[:len(order)] = order
    return torch.as_tensor(top), torch.as_tensor(scores)


def _topk(model, query: Tensor, offset: float, k: int, skip: np.ndarray, candidates=None):
    from fastmf import retrieval

    vectors, bias = _item_side(model)
    query = query.to(device=vectors.device, dtype=vectors.dtype).reshape(1, -1)
    skip = np.unique(skip.astype(np.int64))
    exclude = (torch.tensor([0, len(skip)], device=vectors.device),
               torch.as_tensor(skip, device=vectors.device))
    scores, top = retrieval.topk_scores(query, vectors, bias, k, exclude=exclude,
                                        candidates=candidates)
    scores = torch.where(top >= 0, scores + offset, scores)
    return top[0], scores[0]


def recommend_new_user(model, items, k: int = 10, *, ratings=None, exclude_seen: bool = True,
                       raw_ids: bool = False, **fold_kwargs):
    """Top-``k`` ``(items (k,), scores (k,))`` for a user the model has not seen, from the
    items they interacted with (see :func:`fold_in` for ``ratings`` and ``fold_kwargs``);
    their own items are left out unless ``exclude_seen=False``. With no known item (none
    given, or every raw id unknown) the prior's top items come back (see :func:`fold_in`'s
    ``prior``; the most popular items with ``prior="zero"`` or without user vectors) and a
    :class:`PopularityFallbackWarning` names the unknown ids. Padding: -1 (None for raw
    ids) and -inf, as :meth:`fastmf.MF.recommend`."""
    from fastmf.ops import checks

    op = "fastmf.models.coldstart.recommend_new_user"
    k = checks.check_k("models.coldstart.recommend_new_user", k)
    index, known = _item_indices(model, items, raw_ids, op)
    skip = index if exclude_seen else np.zeros(0, np.int64)
    if exclude_seen and len(np.unique(index)) >= model.num_items:
        # Every item is theirs: nothing left to recommend, whatever the fold-in (a ranking
        # loss's fold-in has no negatives to draw then, and raised).
        device = next(model.parameters()).device
        top = torch.full((k,), -1, dtype=torch.int64, device=device)
        scores = torch.full((k,), float("-inf"), dtype=_item_side(model)[0].dtype,
                            device=device)
    elif len(index) == 0:
        values = np.asarray(items if np.ndim(items) else [items], dtype=object).reshape(-1)
        what = ("no interacted item was given" if len(values) == 0 else
                f"none of the {len(values)} item id(s) is known (first: {values[:5].tolist()})")
        try:
            dim = _item_side(model)[0].shape[1]
        except (TypeError, NotImplementedError):
            dim = None  # no vectors to rank by: popularity is all there is
        prior = fold_kwargs.get("prior", "mean")
        prior = None if dim is None else _resolve_prior(model, prior, dim, op)
        if prior is None:
            top, scores = _popular(model, k, skip, what)
        else:
            warnings.warn(f"fastmf.models.coldstart: {what}; answering with the population "
                          "prior (the mean user's ranking)", PopularityFallbackWarning,
                          stacklevel=2)
            top, scores = _topk(model, prior[0], prior[1], k, skip)
    else:
        vector, offset = fold_in(model, items, ratings=ratings, raw_ids=raw_ids,
                                 **fold_kwargs)
        top, scores = _topk(model, vector, offset, k, skip)
    if raw_ids:
        return model._to_raw(top), scores.cpu().numpy()
    return top, scores


# ---------------------------------------------------------------------- features only
def _hybrid_side(model, side: str, op: str):
    from fastmf.models.hybrid import Hybrid

    if not isinstance(model, Hybrid):
        raise TypeError(f"{op}: vectors from {side} features need a fastmf.models.Hybrid, got "
                        f"{type(model).__name__}")
    return model.users if side == "user" else model.items


def _feature_rows(op: str, arg: str, features, num_features: int,
                  allow_negative: bool) -> sp.csr_matrix:
    from fastmf.models.hybrid import raw_feature_rows

    if isinstance(features, Features):
        features = features.raw
    n = features.shape[0] if sp.issparse(features) or isinstance(features, np.ndarray) else 0
    raw = raw_feature_rows(op, arg, features, n, num_features)
    if not allow_negative and (raw.data < 0).any():
        raise ValueError(f"{op}: {arg} holds negative feature weights (allowed only for "
                         "signed hashed features)")
    raw.eliminate_zeros()
    empty = np.flatnonzero(np.diff(raw.indptr) == 0)
    if len(empty):
        raise ValueError(f"{op}: {arg} row {int(empty[0])} has no feature ({len(empty)} "
                         "empty row(s)); a features-only vector needs at least one feature "
                         "(recommend_new_user falls back to popularity)")
    return raw


def user_vectors_from_features(model, features) -> tuple[Tensor, Tensor]:
    """``(vectors (n, D), biases (n,))`` of new users from their raw feature rows ((n, F)
    scipy/numpy, or :meth:`Features.transform` output) for a Hybrid: the weighted sum of
    the feature embeddings, rows normalised like the training rows (no identity row)."""
    op = "fastmf.models.coldstart.user_vectors_from_features"
    side = _hybrid_side(model, "user", op)
    raw = _feature_rows(op, "features", features, side.num_features, side.signed)
    return side.pool_rows(raw)


def item_vectors_from_features(model, features, *, catalog_features=None
                               ) -> tuple[Tensor, Tensor | None]:
    """``(vectors (n, D), biases (n,) or None)`` of new items from their raw feature rows.
    Hybrid: the weighted sum of the feature embeddings. Other dot-product models (content
    based): the mean of the vectors (and biases) of the catalogue items sharing the new
    item's features, weighted by the shared weight ``<x_new, x_i>``; ``catalog_features``
    ((num_items, F) Features or matrix of the existing items) is required then. A new item
    sharing no feature with the catalogue raises ValueError."""
    op = "fastmf.models.coldstart.item_vectors_from_features"
    from fastmf.models.hybrid import Hybrid

    if isinstance(model, Hybrid):
        side = model.items
        raw = _feature_rows(op, "features", features, side.num_features, side.signed)
        return side.pool_rows(raw)
    vectors, bias = _item_side(model)
    catalog = _catalog(op, catalog_features, vectors.shape[0])
    raw = _feature_rows(op, "features", features, catalog.shape[1], True)
    means, found = _content_means(catalog, raw, vectors, bias)
    if not found.all():
        raise ValueError(f"{op}: new item {int(np.flatnonzero(~found)[0])} shares no feature "
                         "with any catalogue item; there is nothing to average")
    return means


def _catalog(op: str, catalog_features, num_items: int) -> sp.csr_matrix:
    if catalog_features is None:
        raise ValueError(f"{op}: catalog_features (the features of the model's items) is "
                         "needed to place new items of a model without feature embeddings")
    matrix = sp.csr_matrix(catalog_features.raw if isinstance(catalog_features, Features)
                           else catalog_features, dtype=np.float32)
    if matrix.shape[0] != num_items:
        raise ValueError(f"{op}: catalog_features has {matrix.shape[0]} rows but the model "
                         f"{num_items} rows on that side")
    return matrix


def _content_means(catalog: sp.csr_matrix, raw: sp.csr_matrix, vectors: Tensor,
                   bias: Tensor | None):
    """Weighted means of the catalogue rows sharing features with each new row, and which
    new rows share any."""
    share = sp.csr_matrix(abs(raw) @ abs(catalog).T)  # (n, N) shared weight
    totals = np.asarray(share.sum(axis=1)).ravel()
    found = totals > 0
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=found)
    weights = sp.diags(scale) @ share
    dense = torch.as_tensor(weights.toarray(), dtype=vectors.dtype, device=vectors.device)
    means = dense @ vectors
    bias_means = dense @ bias if bias is not None else None
    return (means, bias_means), found


def recommend_from_features(model, features, k: int = 10, *, items=None):
    """Top-``k`` ``(items (n, k), scores (n, k))`` for ``n`` new users of a Hybrid from their
    feature rows (see :func:`user_vectors_from_features`); ``items``: candidates only."""
    from fastmf import retrieval
    from fastmf.ops import checks

    k = checks.check_k("models.coldstart.recommend_from_features", k)
    vectors, bias = user_vectors_from_features(model, features)
    item_vectors, item_bias = _item_side(model)
    candidates = None if items is None else torch.as_tensor(np.asarray(items, dtype=np.int64))
    scores, top = retrieval.topk_scores(vectors, item_vectors, item_bias, k,
                                        candidates=candidates)
    return top, torch.where(top >= 0, scores + bias.unsqueeze(1), scores)


@torch.no_grad()
def score_new_items(model, users, features, *, catalog_features=None) -> Tensor:
    """``(B, n)`` scores of ``n`` new items (their feature rows) for known ``users`` (B,):
    ``<p_u, q_new> + b_new + offset_u`` with the item vectors of
    :func:`item_vectors_from_features`."""
    (vectors, bias) = item_vectors_from_features(model, features,
                                                 catalog_features=catalog_features)
    users = torch.as_tensor(np.asarray(users.cpu() if isinstance(users, Tensor) else users,
                                       dtype=np.int64))
    if hasattr(model, "user_vectors"):
        p, offset = model.user_vectors(users)
    else:
        p, _, bu, _ = model.tables()
        p = p[users]
        offset = (bu[users] if bu is not None else torch.zeros(len(users))) + _base_offset(model)
    scores = p.detach().to(vectors.dtype) @ vectors.T
    if bias is not None:
        scores = scores + bias
    if offset is not None:
        scores = scores + offset.detach().to(scores.dtype).unsqueeze(1)
    return scores


# ---------------------------------------------------------------------- growing
def _check_count(op: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{op}: n must be a positive int, got {n!r}")
    return int(n)


def _plan_params(op: str, params: list, optimizer) -> list:
    """Check every growth ``(param, new rows, fastmf.nn module or None)`` and compute the new
    optimizer states; change nothing. Returns [(state dict, new entries)] to apply."""
    states = []
    for param, rows, _ in params:
        fused = nn_embedding.fused_optimizer(param)
        holders = [] if optimizer is None else fastmf_optim._holders(optimizer)
        if fused is not None and not any(fused is h for h in holders):
            raise RuntimeError(f"{op}: a table of shape {tuple(param.shape)} is updated in "
                               f"backward by a {type(fused).__name__} that was not passed as "
                               "optimizer=; pass that optimizer so its state grows with the "
                               "table (growing the table alone would break its next step)")
        if rows.shape[1:] != param.shape[1:]:
            raise ValueError(f"{op}: new rows of shape {tuple(rows.shape)} do not fit a table "
                             f"of shape {tuple(param.shape)}")
        if rows.device != param.device:
            raise ValueError(f"{op}: new rows on {rows.device}, the table on {param.device}")
        if optimizer is not None:
            states.append(fastmf_optim.grown_state(optimizer, param, rows.shape[0]))
    return states


def _apply(params: list, states: list) -> None:
    """Commit a checked growth (nothing here can fail on checked input)."""
    for param, rows, module in params:
        if module is not None:
            nn_embedding.grow(module, rows)
        else:
            with torch.no_grad():
                param.data = cat_rows([param.data, rows.to(param.dtype)])
    for state, new in states:
        state.update(new)


def _extend_map(op: str, model, side: str, n: int, raw_ids):
    """The grown id map of ``side``, or None (no map on the model and no raw ids)."""
    from fastmf.data import IdMap

    id_map = getattr(model, f"{side}_map", None)
    if raw_ids is None:
        if id_map is not None:
            raise ValueError(f"{op}: the model holds a {side} id map; pass raw_ids= for the "
                             f"{n} new {side}(s) so they can be served by raw id")
        return None
    raw = np.asarray(raw_ids).reshape(-1)
    if len(raw) != n:
        raise ValueError(f"{op}: raw_ids has {len(raw)} ids for {n} new {side}(s)")
    if id_map is None:
        raise ValueError(f"{op}: raw_ids given but the model holds no {side} id map")
    known = id_map.lookup(raw) >= 0
    if known.any():
        raise ValueError(f"{op}: raw {side} id(s) already in the model: "
                         f"{raw[known][:5].tolist()}")
    old = id_map.raw_ids
    if raw.dtype != old.dtype:
        # Objects keep both kinds as given (numpy would coerce 7 and "7" to one kind).
        old, raw = old.astype(object), raw.astype(object)
    return IdMap(np.concatenate([old, raw]), kind=side)


def add_rows(model, side: str, n: int, features=None, *, catalog_features=None,
             optimizer=None, tables=None, raw_ids=None, generator=None) -> range:
    """Append ``n`` users (``side="user"``) or items to ``model`` and return their indices.

    Tables: ``tables`` (a list of fastmf.nn Embedding/EmbeddingBag modules or row
    parameters whose rows are the side's ids), or for ``fastmf.MF`` its factors and bias of
    that side. New rows start at the model's default init (uniform ±init_scale, biases 0),
    or with ``features`` ((n, F) raw rows) and ``catalog_features`` ((rows, F) of the
    existing ones) at the weighted mean of the rows sharing their features (rows sharing
    none keep the default init). ``optimizer``: the optimizer training the model (required
    for tables stepped in backward): its row state grows too. ``raw_ids``: ids of the new
    rows, required when the model holds an id map. All-or-nothing."""
    op = f"fastmf.models.coldstart.add_rows ({type(model).__name__}, {side}s)"
    n = _check_count(op, n)
    if side not in ("user", "item"):
        raise ValueError(f"{op}: side must be 'user' or 'item', got {side!r}")
    from fastmf.models.hybrid import Hybrid

    if isinstance(model, Hybrid):
        return grow_hybrid(model, side, n, features, optimizer, raw_ids=raw_ids)
    if hasattr(model, f"num_{side}s") and not isinstance(
            getattr(type(model), f"num_{side}s", None), property):
        # Its count (and, for SVD++ and timeSVD++, per-user history and day state) is its
        # own, not its tables' rows: growing the tables left a model that refused the new
        # ids and a checkpoint that load refused.
        raise TypeError(f"{op}: {type(model).__name__} keeps its {side} count and {side} "
                        "state beyond its tables; it cannot be grown (train a new model on "
                        "the data with the new rows)")
    if tables is None:
        if not hasattr(model, "tables"):
            raise TypeError(f"{op}: pass tables= (the modules/parameters indexed by {side} "
                            "ids) for a model without MF's tables()")
        p, q, bu, bi = model.tables()
        factor, bias = (p, bu) if side == "user" else (q, bi)
        entries = [(factor, "factor", None)]
        if bias is not None:
            entries.append((bias, "bias", None))
    else:
        entries = []
        for t in tables:
            # One-column tables are biases (zero start), wider ones factors.
            if isinstance(t, nn_embedding._Table):
                entries.append((t.weight, "factor" if t.weight.shape[1] > 1 else "bias", t))
            elif isinstance(t, nn.Parameter):
                wide = t.dim() == 2 and t.shape[1] > 1
                entries.append((t, "factor" if wide else "bias", None))
            else:
                raise TypeError(f"{op}: tables holds a {type(t).__name__}; expected fastmf.nn "
                                "modules or parameters")
    if not entries:
        raise ValueError(f"{op}: tables is empty")
    old = entries[0][0].shape[0]
    for param, _, _ in entries:
        if param.shape[0] != old:
            raise ValueError(f"{op}: the tables have different row counts "
                             f"({[tuple(p.shape) for p, _, _ in entries]})")
    scale = float(getattr(model, "init_scale", 0.05))
    gen = generator
    new = []
    for param, kind, _ in entries:
        shape = (n, *param.shape[1:])
        if kind == "factor":
            rows = torch.empty(shape, dtype=torch.float32, device=param.device).uniform_(
                -scale, scale, generator=gen).to(param.dtype)
        else:
            rows = torch.zeros(shape, dtype=param.dtype, device=param.device)
        new.append(rows)
    if features is not None:
        catalog = _catalog(op, catalog_features, old)
        from fastmf.models.hybrid import raw_feature_rows

        raw = raw_feature_rows(op, "features", features, n, catalog.shape[1])
        for j, (param, _, _) in enumerate(entries):
            flat = param.detach().reshape(old, -1)
            (means, _), found = _content_means(catalog, raw, flat, None)
            mask = torch.as_tensor(found, device=param.device)
            new[j][mask] = means[mask].reshape(-1, *param.shape[1:]).to(param.dtype)
    params = [(param, rows, module) for (param, _, module), rows in zip(entries, new)]
    states = _plan_params(op, params, optimizer)
    id_map = _extend_map(op, model, side, n, raw_ids)
    _apply(params, states)
    _after_growth(model, side, n, id_map)
    return range(old, old + n)


def _after_growth(model, side: str, n: int, id_map) -> None:
    if id_map is not None:
        setattr(model, f"{side}_map", id_map)
    if side == "item" and getattr(model, "item_popularity", None) is not None:
        model.item_popularity = np.concatenate([model.item_popularity,
                                                np.zeros(n, model.item_popularity.dtype)])


def grow_hybrid(model, side: str, n: int, features, optimizer, *, raw_ids=None) -> range:
    """:meth:`Hybrid.add_users` / :meth:`Hybrid.add_items` (see there)."""
    op = f"fastmf.models.Hybrid.add_{side}s"
    n = _check_count(op, n)
    s = model.users if side == "user" else model.items
    old = s.num_rows
    if features is None:
        raw = sp.csr_matrix((n, s.num_features), dtype=np.float32)
    else:
        from fastmf.models.hybrid import raw_feature_rows

        raw = raw_feature_rows(op, "features", features, n, s.num_features)
        if not s.signed and (raw.data < 0).any():
            raise ValueError(f"{op}: features hold {int((raw.data < 0).sum())} negative "
                             "weight(s); feature weights must be >= 0")
    final = s.new_rows(raw, old, old + n)  # raises on rows left empty
    device = s.indptr.device
    indptr = torch.cat([s.indptr, s.indptr[-1] + torch.as_tensor(
        final.indptr[1:].astype(np.int64), device=device)])
    indices = torch.cat([s.indices, torch.as_tensor(final.indices.astype(np.int64),
                                                    device=device)])
    weights = torch.cat([s.weights, torch.as_tensor(final.data, dtype=s.weights.dtype,
                                                    device=device)])
    params = []
    if s.identity:
        table, bias = s.table.weight, s.bias.weight
        rows = torch.empty(n, table.shape[1], dtype=torch.float32, device=device).uniform_(
            -model.init_scale, model.init_scale).to(table.dtype)
        brows = torch.zeros(n, 1, dtype=bias.dtype, device=device)
        has = np.diff(raw.indptr) > 0
        if has.any():
            # Content-based start: the identity row begins at the weighted mean of the
            # row's feature embeddings, so the new vector starts near its features' vector.
            sums = np.asarray(abs(raw).sum(axis=1)).ravel()
            mean = sp.csr_matrix(sp.diags(np.divide(1.0, sums, out=np.zeros_like(sums),
                                                    where=sums > 0)) @ raw)
            dense = torch.as_tensor(mean.toarray(), dtype=table.dtype, device=device)
            feature_rows = table.detach()[:s.num_features]
            mask = torch.as_tensor(has, device=device)
            rows[mask] = (dense @ feature_rows)[mask]
            brows[mask] = (dense @ bias.detach()[:s.num_features])[mask]
        params = [(table, rows, s.table), (bias, brows, s.bias)]
    states = _plan_params(op, params, optimizer)
    id_map = _extend_map(op, model, side, n, raw_ids)
    _apply(params, states)
    s.indptr, s.indices, s.weights = indptr, indices, weights
    _after_growth(model, side, n, id_map)
    return range(old, old + n)
