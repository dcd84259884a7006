"""``fastmf.evaluate``: score a model on held-out interactions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fastmf.ops.checks import HALF_DTYPES

if TYPE_CHECKING:
    from fastmf.data import Interactions

RATING_METRICS = ("rmse", "mae")
BEYOND_ACCURACY = ("coverage", "novelty", "diversity")
RANKING_METRICS = ("hr", "precision", "recall", "ndcg", "mrr", "map")


@torch.no_grad()
def predict_pairs(model, users, items, batch_size: int = 1 << 16) -> np.ndarray:
    """Predictions for (users, items) pairs in batches: (N,) float64 numpy."""
    device = model._param_device()
    users = torch.as_tensor(np.asarray(users), dtype=torch.int64)
    items = torch.as_tensor(np.asarray(items), dtype=torch.int64)
    out = np.empty(len(users), dtype=np.float64)
    for lo in range(0, len(users), batch_size):
        pred = model.predict(users[lo:lo + batch_size].to(device),
                             items[lo:lo + batch_size].to(device))
        out[lo:lo + batch_size] = pred.double().cpu().numpy()
    return out


def _scoring(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, float16/bfloat16 upcast to float32 (scored in float32, as
    :func:`fastmf.retrieval.topk_scores` scores half vectors)."""
    t = t.detach()
    return t.float() if t.dtype in HALF_DTYPES else t


def _score_source(model):
    """``users -> (len(users), num_items)`` ranking scores on the model's device, in the
    order :meth:`~fastmf.models.base.Recommender.recommend` ranks by: for dot-product
    models ``b_i + <u, v_i>`` (the user offset, e.g. MF's ``mu + b_u``, shifts a user's
    scores alike, and adding it could merge near-ties in float32), else ``score_items``.
    Half-precision vectors are scored in float32 (SVDpp's user vectors are float32 where
    its item vectors are half)."""
    if not model.has_vectors:
        device = model._param_device()
        items = torch.arange(model.num_items, device=device)

        def scored(users: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return model.score_items(torch.as_tensor(users, device=device), items)

        return scored
    item_vectors, item_bias = model.item_vectors()
    item_vectors = _scoring(item_vectors)
    item_bias = _scoring(item_bias) if item_bias is not None else None

    def scores(users: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            rows = model.user_vectors(torch.as_tensor(users, device=item_vectors.device))[0]
        rows = _scoring(rows)
        dtype = torch.promote_types(rows.dtype, item_vectors.dtype)
        out = rows.to(dtype) @ item_vectors.T.to(dtype)
        return out + item_bias if item_bias is not None else out

    return scores


def _heldout_matrix(model, test):
    """The test set's items per user as a binary (model.num_users, model.num_items) CSR,
    what the metrics rank the model's top-K lists and scores against: a test set built
    from fewer users or items than the model has (indices, its id maps shorter) is padded
    with empty rows and columns. A user or item index the model does not have is a
    ValueError."""
    shape = (model.num_users, model.num_items)
    for side, ids, n in (("user", test.users, shape[0]), ("item", test.items, shape[1])):
        if ids.size and int(ids.max()) >= n:
            raise ValueError(f"fastmf.evaluate: the test interactions hold {side} index "
                             f"{int(ids.max())}, but {model.public_name()} has {n:,} {side}s")
    # The data's own shape may exceed the model's (longer id maps) though its indices fit.
    csr = test.to_csr(binary=True, shape=(max(shape[0], test.num_users),
                                          max(shape[1], test.num_items)))
    return csr if csr.shape == shape else csr[:shape[0], :shape[1]]


def evaluate(model, test: Interactions, *, train: Interactions | None = None,
             metrics=("rmse", "mae"), k: int = 10, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``model`` (any :class:`fastmf.models.base.Recommender`) on ``test`` (an
    :class:`Interactions` in the model's index space).

    - ``"rmse"``, ``"mae"``: rating error of the predictions for the test pairs;
    - ranking metrics (``"hr@10"``, ``"ndcg@10"``, ``"recall@10"``, ``"precision@10"``,
      ``"mrr@10"``, ``"map@10"``, any K): full-catalog top-K for every test user, leaving
      out the user's ``train`` items (see :mod:`fastmf.metrics` for the definitions);
    - ``"serendipity@10"``: the share of each top-K list that is relevant and outside the K
      most popular ``train`` items (:func:`fastmf.metrics.serendipity`; needs ``train``);
    - ``"auc"``: full-catalog per-user ROC AUC of the test items against every item
      neither in the test set nor in ``train`` (:func:`fastmf.metrics.auc`), computed from
      the vectors (``score_items`` for models without) for at most ``batch_size`` users
      (and about 4M scores) at a time, never all users × items at once;
    - ``"coverage"``, ``"novelty"``, ``"diversity"``: catalog coverage, mean self-information
      (``-log2`` of the share of users who interacted with each item in ``train``, else in
      ``test``) and intra-list diversity of the same
      top-K lists (diversity: from the item vectors; ValueError for models without).

    Names are case-insensitive with the aliases of :func:`fastmf.metrics.parse_metric`
    (``hit@10``/``hitrate@10`` for ``hr@10``, ``p@10``/``prec@10`` for ``precision@10``,
    ``ild`` for ``diversity``); a top-K metric without ``@K`` (``"mrr"``, ``"coverage"``)
    uses ``k``. Results are keyed by the canonical name (:func:`fastmf.metrics.metric_key`):
    ``metrics=("Hit@10", "MRR")`` returns ``{"hr@10": ..., "mrr": ...}``. An unknown name
    raises ValueError listing the valid ones.

    >>> results = evaluate(model, test, train=train, metrics=("rmse", "ndcg@10"))  # doctest: +SKIP
    """
    # Scores in eval mode (dropout off); the caller's train/eval mode is restored after.
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, test, train, metrics, k, batch_size)
    finally:
        model.train(was_training)


def _evaluate(model, test, train, metrics, k, batch_size) -> dict[str, float]:
    from fastmf import metrics as M


    if isinstance(metrics, str):
        metrics = (metrics,)
    # Indices of the model's own id maps (a test set read with maps of its own re-indexed).
    maps = getattr(model, "user_map", None), getattr(model, "item_map", None)
    test = test.in_maps_of(*maps, "fastmf.evaluate", "test")
    if train is not None:
        train = train.in_maps_of(*maps, "fastmf.evaluate", "train")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"fastmf.evaluate: k must be a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or (
            batch_size < 1):
        raise ValueError(f"fastmf.evaluate: batch_size must be a positive int, got "
                         f"{batch_size!r}")
    # key -> (canonical metric, cut-off), in the order asked for.
    wanted: dict[str, tuple[str, int | None]] = {}
    for name in metrics:
        base, cut = M._parse_metric(name, "fastmf.evaluate")
        wanted[base if cut is None else f"{base}@{cut}"] = (
            base, int(k) if cut is None and base in M._CUTOFF_METRICS else cut)
    if not wanted:
        raise ValueError("fastmf.evaluate: metrics is empty")
    bases = {base for base, _ in wanted.values()}
    if "serendipity" in bases and train is None:
        raise ValueError("fastmf.evaluate: serendipity needs train= (the item popularity of "
                         "the training set defines the expected, popular items)")

    if "diversity" in bases and not model.has_vectors:
        raise ValueError(f"fastmf.evaluate: diversity needs item vectors; "
                         f"{model.public_name()} has none (leave diversity out)")

    out: dict[str, float] = {}
    if bases & set(RATING_METRICS):
        if test.ratings is None:
            raise ValueError("fastmf.evaluate: rmse/mae need ratings; the test set has none")
        pred = predict_pairs(model, test.users, test.items)
        for key, (base, _) in wanted.items():
            if base in RATING_METRICS:
                out[key] = getattr(M, base)(pred, test.ratings)

    users = np.unique(test.users)
    # At the model's size: train may predate add_users/add_items (a prefix of its rows).
    exclude = None if train is None else train.to_csr(
        binary=True, shape=(max(model.num_users, train.num_users),
                            max(model.num_items, train.num_items)))
    top_k = {key: cut for key, (base, cut) in wanted.items() if base in M._CUTOFF_METRICS}
    # The held-out items at the model's size, as train above: the top-K lists and score
    # rows span the model's items, whatever the test set's own shape.
    heldout = _heldout_matrix(model, test) if top_k or "auc" in bases else None
    if top_k:
        longest = max(top_k.values())
        topk = np.empty((len(users), longest), dtype=np.int64)
        for lo in range(0, len(users), batch_size):
            rows = users[lo:lo + batch_size]
            items, _ = model.recommend(torch.as_tensor(rows), k=longest, exclude=exclude)
            topk[lo:lo + len(rows)] = items.cpu().numpy()
        ranking_cuts = sorted({cut for key, cut in top_k.items()
                               if wanted[key][0] in RANKING_METRICS})
        ranking = (M.ranking_metrics(topk, heldout, k=ranking_cuts, users=users)
                   if ranking_cuts else {})
        popularity = None
        for key, cut in top_k.items():
            base, top = wanted[key][0], topk[:, :cut]
            if base in RANKING_METRICS:
                out[key] = ranking[f"{base}@{cut}"]
            elif base == "serendipity":
                if popularity is None:
                    popularity = np.bincount(train.items, minlength=model.num_items)
                out[key] = M.serendipity(top, heldout, popularity, users=users)
            elif base == "coverage":
                out[key] = M.catalog_coverage(top, model.num_items)
            elif base == "novelty":
                source = train if train is not None else test
                # The users of each item (novelty's p(i) is the fraction of users who
                # interacted with i), not its rows: a repeated interaction counted again.
                pop = np.bincount(source.positive_structure()[1], minlength=model.num_items)
                out[key] = M.novelty(top, pop, num_users=source.num_users)
            elif base == "diversity":
                out[key] = M.intra_list_diversity(top, model.item_vectors()[0].detach().cpu())
    if "auc" in bases:
        out["auc"] = M.auc(_score_source(model), heldout, exclude=exclude, users=users,
                           chunk_size=M.auc_chunk_size(model.num_items, batch_size))
    return {key: out[key] for key in wanted}
