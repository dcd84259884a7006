"""fastmf.metrics: hand-computed cases, a plain per-user reference, and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fastmf.data import Interactions
from fastmf.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    mae,
    map_at_k,
    mrr,
    ndcg_at_k,
    novelty,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    rmse,
    sampled_rank_metrics,
)

FUNCTIONS = {
    "hr": hit_rate_at_k,
    "precision": precision_at_k,
    "recall": recall_at_k,
    "ndcg": ndcg_at_k,
    "mrr": mrr,
    "map": map_at_k,
}


# ----------------------------------------------------------------------------- a plain reference


def reference_user(metric: str, ranked: list[int], relevant: set, k: int) -> float:
    """One user's metric, written out by definition (the module docstring's table)."""
    seen, hits = set(), []
    for item in ranked[:k]:
        hits.append(item >= 0 and item in relevant and item not in seen)
        seen.add(item)
    if metric == "hr":
        return float(any(hits))
    if metric == "precision":
        return sum(hits) / k
    if metric == "recall":
        return sum(hits) / len(relevant)
    if metric == "ndcg":
        dcg = sum(1 / math.log2(j + 2) for j, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(relevant), k)))
        return dcg / idcg
    if metric == "mrr":
        return next((1 / (j + 1) for j, h in enumerate(hits) if h), 0.0)
    if metric == "map":
        total, found = 0.0, 0
        for j, h in enumerate(hits):
            if h:
                found += 1
                total += found / (j + 1)
        return total / min(len(relevant), k)
    raise AssertionError(metric)


def reference(metric, topk, relevant_sets, k, users=None):
    users = range(len(topk)) if users is None else users
    values = [
        reference_user(metric, list(row), relevant_sets[u], k)
        for row, u in zip(topk.tolist(), users, strict=True)
        if relevant_sets[u]
    ]
    return float(np.mean(values))


def random_case(num_users=300, num_items=60, k=10, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.random((num_users, num_items)) < rng.uniform(0, 0.2, (num_users, 1))
    heldout = sp.csr_matrix(dense.astype(np.float32))
    topk = np.stack([rng.permutation(num_items)[:k] for _ in range(num_users)])
    relevant_sets = [set(np.flatnonzero(row).tolist()) for row in dense]
    return topk, heldout, relevant_sets


# ----------------------------------------------------------------------------- rating error


def test_rmse_mae():
    pred, target = np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt(5 / 3))
    assert mae(pred, target) == pytest.approx(1.0)
    assert rmse(torch.tensor(pred), torch.tensor(target, dtype=torch.float32)) == pytest.approx(
        math.sqrt(5 / 3)
    )
    with pytest.raises(ValueError, match="pred has 3 values, target has 2"):
        rmse(pred, target[:2])
    with pytest.raises(ValueError, match="empty"):
        mae([], [])


# ----------------------------------------------------------------------------- ranking


def test_ranking_hand_computed():
    # user 0: relevant {1, 3}; user 1: relevant {0}; user 2: nothing held out (excluded).
    heldout = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    topk = np.array([[3, 2, 1], [4, 2, 0], [0, 1, 2]])
    d = 1 / np.log2([2, 3, 4])
    expected = {
        "hr": (1 + 1) / 2,
        "precision": (2 / 3 + 1 / 3) / 2,
        "recall": (2 / 2 + 1 / 1) / 2,
        "ndcg": ((d[0] + d[2]) / (d[0] + d[1]) + d[2] / d[0]) / 2,
        "mrr": (1 / 1 + 1 / 3) / 2,
        "map": ((1 / 1 + 2 / 3) / 2 + (1 / 3) / 1) / 2,
    }
    for name, fn in FUNCTIONS.items():
        assert fn(topk, heldout) == pytest.approx(expected[name]), name
    at2 = ranking_metrics(topk, heldout, k=2)
    assert at2["hr@2"] == pytest.approx(0.5)
    assert at2["recall@2"] == pytest.approx(0.25)
    assert at2["ndcg@2"] == pytest.approx((d[0] / (d[0] + d[1])) / 2)
    assert at2["users"] == 2


@pytest.mark.parametrize("k", [1, 5, 10])
def test_ranking_matches_reference(k):
    topk, heldout, relevant = random_case(k=10, seed=k)
    results = ranking_metrics(topk, heldout, k=k)
    for name, fn in FUNCTIONS.items():
        expected = reference(name, topk, relevant, k)
        assert fn(topk, heldout, k) == pytest.approx(expected), name
        assert results[f"{name}@{k}"] == pytest.approx(expected), name


def test_ranking_matches_sklearn_ndcg():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    topk, heldout, _ = random_case(num_users=200, num_items=40, k=10, seed=11)
    dense = heldout.toarray()
    has_relevant = dense.sum(axis=1) > 0
    # Scores that rank the top-k lists first, in order, and everything else strictly below.
    scores = -np.random.default_rng(0).random(dense.shape)
    rows = np.arange(len(topk))[:, None]
    scores[rows, topk] = 10.0 - np.arange(10)
    for k in (3, 10):
        expected = sklearn_metrics.ndcg_score(dense[has_relevant], scores[has_relevant], k=k)
        assert ndcg_at_k(topk, heldout, k) == pytest.approx(expected)


def test_users_argument_padding_and_repeats():
    topk, heldout, relevant = random_case(num_users=100, k=8, seed=4)
    users = np.random.default_rng(1).integers(0, 100, 40)
    sub = topk[:40].copy()
    sub[0, 5:] = -1  # a short list
    sub[1, 3] = sub[1, 2]  # a repeated item counts once
    for name, fn in FUNCTIONS.items():
        expected = reference(name, sub, relevant, 8, users=users.tolist())
        assert fn(sub, heldout, users=users) == pytest.approx(expected), name
    # A relevant item repeated in a list cannot push precision or recall above 1.
    one = sp.csr_matrix(np.array([[1.0, 0.0]]))
    assert precision_at_k(np.array([[0, 0]]), one) == pytest.approx(0.5)
    assert recall_at_k(np.array([[0, 0]]), one) == pytest.approx(1.0)


def test_heldout_as_interactions_and_torch_topk():
    topk, heldout, _ = random_case(num_users=50, num_items=30, k=5, seed=2)
    data = Interactions.from_scipy(heldout)
    a = ranking_metrics(topk, heldout)
    b = ranking_metrics(torch.from_numpy(topk), data)
    assert a == pytest.approx(b)
    assert set(a) == {f"{m}@5" for m in FUNCTIONS} | {"users"}


def test_ranking_multiple_cutoffs_consistent():
    topk, heldout, _ = random_case(k=10, seed=6)
    many = ranking_metrics(topk, heldout, k=[1, 5, 10])
    for k in (1, 5, 10):
        single = ranking_metrics(topk, heldout, k=k)
        for name in FUNCTIONS:
            assert many[f"{name}@{k}"] == pytest.approx(single[f"{name}@{k}"])
    assert many["hr@1"] <= many["hr@5"] <= many["hr@10"]
    assert many["recall@1"] <= many["recall@5"] <= many["recall@10"]


def test_ranking_errors():
    heldout = sp.csr_matrix(np.eye(3))
    with pytest.raises(ValueError, match="pass users="):
        ndcg_at_k(np.zeros((2, 2), dtype=np.int64), heldout)
    with pytest.raises(ValueError, match="k=3 must be in"):
        ndcg_at_k(np.zeros((3, 2), dtype=np.int64), heldout, k=3)
    with pytest.raises(IndexError, match="item 7 out of range"):
        hit_rate_at_k(np.array([[7], [0], [1]]), heldout)
    with pytest.raises(ValueError, match="no evaluated user has held-out items"):
        hit_rate_at_k(np.array([[0]]), sp.csr_matrix((1, 3)))
    with pytest.raises(TypeError, match="int indices"):
        mrr(np.zeros((3, 2)), heldout)


def test_ranking_is_vectorised_at_scale():
    # 100k users x top-20 over 5k items: one vectorised pass (no per-user Python loop).
    rng = np.random.default_rng(0)
    num_users, num_items = 100_000, 5_000
    rows = rng.integers(0, num_users, 500_000)
    cols = rng.integers(0, num_items, 500_000)
    heldout = sp.csr_matrix((np.ones(500_000), (rows, cols)), shape=(num_users, num_items))
    topk = rng.integers(0, num_items, (num_users, 20))
    results = ranking_metrics(topk, heldout, k=[10, 20])
    assert 0 < results["hr@20"] < 1 and results["users"] == int((heldout.getnnz(1) > 0).sum())


# ----------------------------------------------------------------------------- sampled protocol


def test_sampled_rank_metrics_hand_computed_with_pessimistic_ties():
    pos = np.array([0.9, 0.5, 0.2])
    neg = np.array([
        [0.1, 0.2, 0.3],  # rank 0
        [0.5, 0.1, 0.0],  # a tie: rank 1, not 0
        [0.3, 0.4, 0.2],  # rank 3 (tie counts above)
    ])
    out = sampled_rank_metrics(pos, neg, k=[1, 2])
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert out["mrr@2"] == pytest.approx((1 + 1 / 2) / 3)
    assert out["auc"] == pytest.approx((3 / 3 + 2 / 3 + 0 / 3) / 3)
    # All scores equal: the positive ranks last.
    flat = sampled_rank_metrics(np.zeros(5), np.zeros((5, 99)), k=10)
    assert flat["hr@10"] == 0.0 and flat["auc"] == 0.0


def test_sampled_rank_metrics_random_against_loop():
    rng = np.random.default_rng(3)
    pos = rng.integers(0, 20, 500).astype(np.float32)  # integer scores: many ties
    neg = rng.integers(0, 20, (500, 99)).astype(np.float32)
    out = sampled_rank_metrics(torch.from_numpy(pos), torch.from_numpy(neg), k=10)
    ranks = [sum(n >= p for n in row) for p, row in zip(pos, neg, strict=True)]
    assert out["hr@10"] == pytest.approx(np.mean([r < 10 for r in ranks]))
    assert out["ndcg@10"] == pytest.approx(
        np.mean([1 / math.log2(r + 2) if r < 10 else 0 for r in ranks])
    )
    with pytest.raises(ValueError, match="NaN"):
        sampled_rank_metrics(np.array([np.nan]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(U,\) and scores_neg \(U, N\)"):
        sampled_rank_metrics(np.zeros(2), np.zeros((3, 3)))


# ----------------------------------------------------------------------------- beyond accuracy


def test_catalog_coverage():
    assert catalog_coverage(np.array([[0, 1], [1, 3], [-1, -1]]), 10) == pytest.approx(0.3)
    with pytest.raises(IndexError):
        catalog_coverage(np.array([[10]]), 10)


def test_novelty():
    counts = np.array([8, 4, 2, 0])  # a 0 counts as 1: p = 8/15, 4/15, 2/15, 1/15
    topk = np.array([[0, 1], [2, -1], [3, 3]])
    info = -np.log2(np.array([8, 4, 2, 1]) / 15)
    expected = np.mean([(info[0] + info[1]) / 2, info[2], info[3]])
    assert novelty(topk, counts) == pytest.approx(expected)
    per_user = -np.log2(np.array([8, 4, 2, 1]) / 16)
    assert novelty(np.array([[0], [1]]), counts, num_users=16) == pytest.approx(
        (per_user[0] + per_user[1]) / 2
    )
    data = Interactions([0, 1, 1], [0, 0, 1], item_map=3)  # counts 2, 1, 0 -> 2, 1, 1
    assert novelty(np.array([[1]]), data) == pytest.approx(-math.log2(1 / 4))


def test_intra_list_diversity_against_pairwise_loop():
    rng = np.random.default_rng(5)
    factors = rng.standard_normal((30, 4))
    factors[7] = 0.0  # zero vector: cosine 0 with everything
    topk = np.stack([rng.permutation(30)[:6] for _ in range(50)])
    topk[0, 3:] = -1
    topk[1, 1:] = -1  # one item: skipped

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    per_list = []
    for row in topk:
        items = [i for i in row if i >= 0]
        if len(items) < 2:
            continue
        dists = [1 - cos(factors[a], factors[b])
                 for x, a in enumerate(items) for b in items[x + 1:]]
        per_list.append(np.mean(dists))
    expected = float(np.mean(per_list))
    assert intra_list_diversity(topk, factors) == pytest.approx(expected)
    assert intra_list_diversity(topk, torch.from_numpy(factors), chunk_size=7) == pytest.approx(
        expected
    )
    same = np.ones((3, 2))
    assert intra_list_diversity(np.array([[0, 1, 2]]), same) == pytest.approx(0.0)
