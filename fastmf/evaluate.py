"""``fastmf.evaluate``: score a model on held-out interactions."""

from __future__ import annotations

import numpy as np
import torch

from fastmf import metrics as M
from fastmf.data import Interactions

RATING_METRICS = ("rmse", "mae")
BEYOND_ACCURACY = ("coverage", "novelty", "diversity")


@torch.no_grad()
def predict_pairs(model, users, items, batch_size: int = 1 << 16) -> np.ndarray:
    """Predictions for (users, items) pairs in batches: (N,) float64 numpy."""
    device = model.user_factors.device
    users = torch.as_tensor(np.asarray(users), dtype=torch.int64)
    items = torch.as_tensor(np.asarray(items), dtype=torch.int64)
    out = np.empty(len(users), dtype=np.float64)
    for lo in range(0, len(users), batch_size):
        pred = model.predict(users[lo:lo + batch_size].to(device),
                             items[lo:lo + batch_size].to(device))
        out[lo:lo + batch_size] = pred.double().cpu().numpy()
    return out


def evaluate(model, test: Interactions, *, train: Interactions | None = None,
             metrics=("rmse", "mae"), k: int = 10, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``model`` on ``test`` (an :class:`Interactions` in the model's index space).

    - ``"rmse"``, ``"mae"``: rating error of the predictions for the test pairs;
    - ranking metrics (``"hr@10"``, ``"ndcg@10"``, ``"recall@10"``, ``"precision@10"``,
      ``"mrr@10"``, ``"map@10"``, any K): full-catalog top-K for every test user, leaving
      out the user's ``train`` items (see :mod:`fastmf.metrics` for the definitions);
    - ``"coverage"``, ``"novelty"``, ``"diversity"``: catalog coverage, mean self-information
      (popularity from ``train``) and intra-list diversity of the same top-K lists.

    >>> results = evaluate(model, test, train=train, metrics=("rmse", "ndcg@10"))  # doctest: +SKIP
    """
    metrics = tuple(metrics)
    out: dict[str, float] = {}
    if any(m in RATING_METRICS for m in metrics):
        if test.ratings is None:
            raise ValueError("fastmf.evaluate: rmse/mae need ratings; the test set has none")
        pred = predict_pairs(model, test.users, test.items)
        if "rmse" in metrics:
            out["rmse"] = M.rmse(pred, test.ratings)
        if "mae" in metrics:
            out["mae"] = M.mae(pred, test.ratings)
    ranking = [m for m in metrics if "@" in m]
    extra = [m for m in metrics if m in BEYOND_ACCURACY]
    unknown = set(metrics) - set(RATING_METRICS) - set(ranking) - set(extra)
    if unknown:
        raise ValueError(f"fastmf.evaluate: unknown metrics {sorted(unknown)}")
    if ranking or extra:
        cutoffs = sorted({int(m.split("@")[1]) for m in ranking} | {k})
        users = np.unique(test.users)
        exclude = train.to_csr(binary=True) if train is not None else None
        topk = np.empty((len(users), max(cutoffs)), dtype=np.int64)
        for lo in range(0, len(users), batch_size):
            rows = users[lo:lo + batch_size]
            items, _ = model.recommend(torch.as_tensor(rows), k=max(cutoffs), exclude=exclude)
            topk[lo:lo + len(rows)] = items.cpu().numpy()
        if ranking:
            values = M.ranking_metrics(topk, test, k=cutoffs, users=users)
            out.update({m: values[m] for m in ranking})
        top = topk[:, :k]
        if "coverage" in extra:
            out["coverage"] = M.catalog_coverage(top, model.num_items)
        if "novelty" in extra:
            source = train if train is not None else test
            pop = np.bincount(source.items, minlength=model.num_items)
            out["novelty"] = M.novelty(top, pop, num_users=source.num_users)
        if "diversity" in extra:
            out["diversity"] = M.intra_list_diversity(top, model.item_factors.detach().cpu())
    return out
