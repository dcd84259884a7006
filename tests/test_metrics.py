"""fastmf.metrics: hand-computed cases, a plain per-user reference, and scikit-learn."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import fastmf
from fastmf.data import Interactions
from fastmf.metrics import (
    METRIC_NAMES,
    auc,
    catalog_coverage,
    higher_is_better,
    hit_rate_at_k,
    intra_list_diversity,
    mae,
    map_at_k,
    metric_key,
    most_popular,
    mrr,
    ndcg_at_k,
    novelty,
    parse_metric,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    rmse,
    sampled_rank_metrics,
    serendipity,
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


def test_sampled_rank_metrics_k_is_validated_not_truncated():
    rng = np.random.default_rng(8)
    pos = rng.standard_normal(40)
    neg = rng.standard_normal((40, 20))
    ranks = (neg >= pos[:, None]).sum(axis=1)
    # Numpy ints are ints; each cut-off as computed by hand.
    out = sampled_rank_metrics(pos, neg, k=(np.int64(2), np.int32(5)))
    assert list(out) == ["hr@2", "ndcg@2", "mrr@2", "hr@5", "ndcg@5", "mrr@5", "auc"]
    assert out["hr@2"] == pytest.approx(np.mean(ranks < 2))
    assert out["mrr@5"] == pytest.approx(np.mean(np.where(ranks < 5, 1 / (ranks + 1), 0)))
    assert sampled_rank_metrics(pos, neg, k=np.int64(2)) == {
        key: out[key] for key in ("hr@2", "ndcg@2", "mrr@2", "auc")}
    for bad in (2.7, "5", True, 2.0):
        with pytest.raises(TypeError, match=rf"fastmf.metrics.sampled_rank_metrics: k must be "
                                            rf"an int, got {re.escape(repr(bad))}"):
            sampled_rank_metrics(pos, neg, k=bad)
    with pytest.raises(TypeError, match="sampled_rank_metrics: k must be an int, got 2.5"):
        sampled_rank_metrics(pos, neg, k=[1, 2.5])
    with pytest.raises(ValueError, match="sampled_rank_metrics: k is an empty list"):
        sampled_rank_metrics(pos, neg, k=[])
    with pytest.raises(ValueError, match="sampled_rank_metrics: k must be >= 1, got 0"):
        sampled_rank_metrics(pos, neg, k=[3, 0])


# ----------------------------------------------------------------------------- beyond accuracy


def test_catalog_coverage():
    assert catalog_coverage(np.array([[0, 1], [1, 3], [-1, -1]]), 10) == pytest.approx(0.3)
    with pytest.raises(IndexError):
        catalog_coverage(np.array([[10]]), 10)


def test_evaluate_novelty_counts_the_users_of_each_item():
    """evaluate's novelty takes p(i) as the fraction of users who interacted with i, as
    novelty(num_users=...) defines it: a user's repeated interactions are one user. Counted
    by rows, user 0's five clicks on item 1 made it look popular, and 25 made the call
    raise (a count above the number of users)."""
    import torch

    import fastmf
    from fastmf.data import Interactions

    users, items = 10, 6
    for repeats in (5, 25):
        tu = list(range(users)) + [0] * repeats + [1, 2, 3]
        ti = [0] * users + [1] * repeats + [2, 2, 2]
        train = Interactions(tu, ti, user_map=users, item_map=items)
        test = Interactions([4, 5], [3, 4], user_map=users, item_map=items)
        torch.manual_seed(0)
        model = fastmf.MF(users, items, dim=2)
        got = fastmf.evaluate(model, test, train=train, metrics=("novelty@3",), k=3)
        top = model.recommend(np.array([4, 5]), k=3, exclude=train)[0].numpy()
        per_item = np.array([len({u for u, i in zip(tu, ti) if i == j}) for j in range(items)])
        p = np.maximum(per_item, 1) / users
        want = np.mean([np.mean(-np.log2(p[row])) for row in top])
        assert got["novelty@3"] == pytest.approx(want)


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
    # Counts that are not counts, or fewer users than an item's count: errors, not a
    # negative "self-information".
    for bad in (np.array([8, -4, 2, 0]), np.array([8, np.nan, 2, 0]), np.ones((2, 2))):
        with pytest.raises(ValueError, match="novelty: item_popularity"):
            novelty(topk, bad)
    for users in (7, 0, 16.0, True):
        with pytest.raises(ValueError, match="novelty: num_users must be an int"):
            novelty(topk, counts, num_users=users)


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


@pytest.mark.parametrize("bad", [-2, -7])
def test_beyond_accuracy_metrics_reject_negative_items_other_than_padding(bad):
    """Only -1 marks padding (as for the ranking metrics); other negative ids were
    silently ignored."""
    rng = np.random.default_rng(abs(bad))
    topk = rng.integers(0, 10, (6, 4))
    topk[1, 3] = -1  # padding is fine
    counts = rng.integers(1, 9, 10)
    factors = rng.standard_normal((10, 3))
    # With padding only, the numbers are those of the lists without it.
    assert catalog_coverage(topk, 10) == pytest.approx(len(set(topk.ravel()) - {-1}) / 10)
    assert intra_list_diversity(topk, factors) > 0.0
    topk[2, 0] = bad
    message = rf"topk item {bad} out of range \[0, 10\) \(-1 marks padding\)"
    with pytest.raises(IndexError, match="fastmf.metrics.catalog_coverage: " + message):
        catalog_coverage(topk, 10)
    with pytest.raises(IndexError, match="fastmf.metrics.novelty: " + message):
        novelty(topk, counts)
    with pytest.raises(IndexError, match="fastmf.metrics.intra_list_diversity: " + message):
        intra_list_diversity(topk, factors)
    with pytest.raises(IndexError, match=r"novelty: topk item 10 out of range \[0, 10\)"):
        novelty(np.array([[3, 10]]), counts)


def test_catalog_coverage_num_items_must_be_a_positive_int():
    topk = np.random.default_rng(1).integers(0, 6, (5, 3))
    assert catalog_coverage(topk, np.int64(8)) == pytest.approx(len(set(topk.ravel())) / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it divided by 0 (nan and a RuntimeWarning)
        for bad in (0, -3):
            with pytest.raises(ValueError, match=rf"fastmf.metrics.catalog_coverage: num_items "
                                                 rf"must be >= 1, got {bad}"):
                catalog_coverage(np.array([[-1]]), bad)
    for bad in (8.0, "8", True):
        with pytest.raises(TypeError, match=rf"catalog_coverage: num_items must be an int, got "
                                            rf"{re.escape(repr(bad))}"):
            catalog_coverage(topk, bad)


def test_intra_list_diversity_checks_chunk_size_and_factors():
    rng = np.random.default_rng(6)
    factors = rng.standard_normal((12, 4))
    topk = np.stack([rng.permutation(12)[:4] for _ in range(9)])
    want = intra_list_diversity(topk, factors)
    assert 0.0 < want < 2.0
    for chunk in (1, np.int64(4), 100):
        assert intra_list_diversity(topk, factors, chunk_size=chunk) == pytest.approx(want)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"fastmf.metrics.intra_list_diversity: chunk_size "
                                             rf"must be >= 1, got {bad}"):
            intra_list_diversity(topk, factors, chunk_size=bad)
    for bad in (2.5, "4", None, True):
        with pytest.raises(TypeError, match=rf"intra_list_diversity: chunk_size must be an "
                                            rf"int, got {re.escape(repr(bad))}"):
            intra_list_diversity(topk, factors, chunk_size=bad)
    for value in (np.nan, np.inf, -np.inf):
        bad = factors.copy()
        bad[7, 2] = value
        with pytest.raises(ValueError, match=rf"fastmf.metrics.intra_list_diversity: "
                                             rf"item_factors must be finite, got {value} in "
                                             rf"row 7"):
            intra_list_diversity(topk, bad)
        with pytest.raises(ValueError, match="item_factors must be finite"):
            intra_list_diversity(topk, torch.from_numpy(bad).float())


def test_half_precision_tensors_are_read_in_float32():
    """numpy has no bfloat16: half tensors convert through float32 (exactly)."""
    rng = np.random.default_rng(12)
    factors = torch.from_numpy(rng.standard_normal((15, 4)))
    topk = np.stack([rng.permutation(15)[:5] for _ in range(8)])
    pos, neg = torch.from_numpy(rng.standard_normal(30)), torch.from_numpy(
        rng.standard_normal((30, 9)))
    scores, heldout, exclude, _, _ = auc_case(num_users=20, num_items=15, seed=3, ties=False)
    counts = torch.from_numpy(rng.integers(1, 50, 15).astype(np.float64))
    for dtype in (torch.float16, torch.bfloat16):
        def same(t, dtype=dtype):  # the half values, in float64
            return t.to(dtype).double()

        assert intra_list_diversity(topk, factors.to(dtype)) == pytest.approx(
            intra_list_diversity(topk, same(factors)))
        assert sampled_rank_metrics(pos.to(dtype), neg.to(dtype), k=3) == pytest.approx(
            sampled_rank_metrics(same(pos), same(neg), k=3))
        assert novelty(topk, counts.to(dtype)) == pytest.approx(novelty(topk, same(counts)))
        assert rmse(pos.to(dtype), neg[:, 0].to(dtype)) == pytest.approx(
            rmse(same(pos), same(neg[:, 0])))
        half_scores = same(torch.from_numpy(scores))
        assert auc(torch.from_numpy(scores).to(dtype), heldout, exclude=exclude) == (
            pytest.approx(auc(half_scores, heldout, exclude=exclude)))


# ----------------------------------------------------------------------------- metric names


@pytest.mark.parametrize("name, expected", [
    ("hit@10", ("hr", 10)), ("HR@10", ("hr", 10)), ("HitRate@10", ("hr", 10)),
    ("hit_rate@3", ("hr", 3)), ("NDCG@10", ("ndcg", 10)), ("Recall@20", ("recall", 20)),
    ("precision@5", ("precision", 5)), ("Prec@5", ("precision", 5)), ("P@5", ("precision", 5)),
    ("MAP@10", ("map", 10)), ("mrr", ("mrr", None)), ("MRR@10", ("mrr", 10)),
    ("AUC", ("auc", None)), ("Serendipity@10", ("serendipity", 10)),
    ("coverage", ("coverage", None)), ("Novelty", ("novelty", None)),
    ("diversity", ("diversity", None)), ("ILD", ("diversity", None)),
    ("RMSE", ("rmse", None)), ("mae", ("mae", None)), (" ndcg @ 007 ", ("ndcg", 7)),
])
def test_parse_metric_names_and_aliases(name, expected):
    assert parse_metric(name) == expected
    base, cut = expected
    assert metric_key(name) == (base if cut is None else f"{base}@{cut}")


@pytest.mark.parametrize("name, message", [
    ("ndcg@0", "positive integer, got '0'"),
    ("ndcg@x", "positive integer, got 'x'"),
    ("ndcg@", "positive integer, got ''"),
    ("ndcg@-1", "positive integer, got '-1'"),
    ("ndcg@1.5", "positive integer, got '1.5'"),
    ("ndcg@²", "positive integer"),
    ("auc@10", "auc takes no @K cut-off"),
    ("rmse@5", "rmse takes no @K cut-off"),
])
def test_parse_metric_rejects_bad_cutoffs(name, message):
    with pytest.raises(ValueError, match=message):
        parse_metric(name)


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ValueError, match="unknown metric 'ndcq@10'") as err:
        parse_metric("ndcq@10")
    for name in ("hr/hit/hitrate", "precision/prec/p", "serendipity[@K]", "auc,", "ild"):
        assert name in str(err.value)
    with pytest.raises(TypeError, match="must be a str, got int"):
        parse_metric(10)
    assert set(METRIC_NAMES) == {
        "hr", "ndcg", "recall", "precision", "map", "mrr", "serendipity", "coverage",
        "novelty", "diversity", "auc", "rmse", "mae"}


def test_higher_is_better():
    assert not higher_is_better("RMSE") and not higher_is_better("mae")
    assert higher_is_better("Hit@10") and higher_is_better("auc") and higher_is_better("ild")
    with pytest.raises(ValueError, match="unknown metric 'loss'"):
        higher_is_better("loss")


def test_ranking_k_must_be_an_int():
    topk, heldout, _ = random_case(num_users=20, k=5, seed=8)
    with pytest.raises(TypeError, match="k must be an int, got 2.5"):
        ndcg_at_k(topk, heldout, k=2.5)
    with pytest.raises(TypeError, match="k must be an int, got True"):
        ranking_metrics(topk, heldout, k=[True])


def test_users_must_be_int_indices():
    """Float user ids were truncated to other users' rows (0.7 -> user 0)."""
    topk, heldout, relevant = random_case(num_users=30, num_items=20, k=5, seed=13)
    rows = np.array([3, 17, 4])
    want = reference("ndcg", topk[:3], relevant, 5, users=rows.tolist())
    for users in (rows, rows.astype(np.int32), rows.astype(np.uint8), torch.from_numpy(rows),
                  rows.tolist()):
        assert ndcg_at_k(topk[:3], heldout, users=users) == pytest.approx(want)
    counts = np.arange(1, 21)
    scores, auc_held, exclude, _, _ = auc_case(num_users=30, num_items=20, seed=13)
    auc_rows = np.array([5, 9, 22, 9])
    auc_want = auc(scores[auc_rows], auc_held, exclude=exclude, users=auc_rows)
    assert auc(scores[auc_rows], auc_held, exclude=exclude,
               users=auc_rows.astype(np.int16)) == auc_want
    assert auc(lambda r: scores[r], auc_held, exclude=exclude,
               users=torch.from_numpy(auc_rows).int()) == pytest.approx(auc_want)
    for bad, shown in ((np.array([0.7, 1.2, 2.0]), r"float64 \[0.7, 1.2, 2.0\]"),
                       (torch.tensor([0.5, 1.5, 2.5]), r"float32 \[0.5, 1.5, 2.5\]"),
                       (np.array([True, False, True]), r"bool \[True, False, True\]")):
        for name, call in (
                ("ndcg_at_k", lambda u: ndcg_at_k(topk[:3], heldout, users=u)),
                ("ranking_metrics", lambda u: ranking_metrics(topk[:3], heldout, users=u)),
                ("serendipity", lambda u: serendipity(topk[:3], heldout, counts, users=u)),
                ("auc", lambda u: auc(scores[:3], auc_held, exclude=exclude, users=u)),
                ("auc", lambda u: auc(lambda r: scores[r], auc_held, users=u))):
            with pytest.raises(TypeError, match=rf"fastmf.metrics.{name}: users must hold int "
                                                rf"indices, got {shown}"):
                call(bad)


# ----------------------------------------------------------------------------- serendipity


def reference_serendipity(topk, relevant_sets, counts, k, primitive_k, users=None):
    """Per user, by definition: relevant, not among the primitive_k most popular (equal
    counts to the lower index), each item once, divided by k."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    expected = set(order[:primitive_k])
    users = range(len(topk)) if users is None else users
    values = []
    for row, u in zip(topk.tolist(), users, strict=True):
        if not relevant_sets[u]:
            continue
        seen, good = set(), 0
        for item in row[:k]:
            if item >= 0 and item not in seen and item in relevant_sets[u] and (
                    item not in expected):
                good += 1
            seen.add(item)
        values.append(good / k)
    return float(np.mean(values))


def test_serendipity_hand_computed():
    # Popularity 9, 1, 5, 2, 5: the 2 most popular are items 0 and 2 (2 beats 4 on index).
    counts = np.array([9, 1, 5, 2, 5])
    assert most_popular(counts, 3).tolist() == [0, 2, 4]
    heldout = sp.csr_matrix(np.array([
        [1, 1, 0, 1, 1],  # relevant 0, 1, 3, 4
        [0, 0, 1, 0, 0],  # relevant 2 only (popular)
        [0, 0, 0, 0, 0],  # nothing held out: skipped
    ]))
    topk = np.array([[0, 1, 4, 1], [2, -1, -1, -1], [1, 3, 4, 0]])
    # user 0: 0 popular, 1 unexpected hit, 4 unexpected hit, 1 repeated -> 2/4; user 1: 0.
    assert serendipity(topk, heldout, counts, primitive_k=2) == pytest.approx((2 / 4 + 0) / 2)
    # primitive_k defaults to k = 4: items 0, 2, 4, 3 are expected; only item 1 is left.
    assert serendipity(topk, heldout, counts) == pytest.approx((1 / 4 + 0) / 2)
    # k=2 cuts the lists (and the default primitive list) to 2.
    assert serendipity(topk, heldout, counts, k=2) == pytest.approx((1 / 2 + 0) / 2)


@pytest.mark.parametrize("k, primitive_k", [(1, None), (5, None), (10, 3), (10, 25)])
def test_serendipity_matches_reference(k, primitive_k):
    topk, heldout, relevant = random_case(num_users=300, num_items=60, k=10, seed=20 + k)
    rng = np.random.default_rng(k)
    counts = rng.integers(1, 12, 60)  # few distinct values: many equal counts
    topk[0, 4:] = -1
    topk[1, 2] = topk[1, 1]
    expected = reference_serendipity(topk, relevant, counts, k, primitive_k or k)
    got = serendipity(topk, heldout, counts, k, primitive_k=primitive_k)
    assert got == pytest.approx(expected)
    assert 0 < got <= precision_at_k(topk, heldout, k)


def test_serendipity_users_interactions_and_limits():
    topk, heldout, relevant = random_case(num_users=120, num_items=40, k=8, seed=31)
    rng = np.random.default_rng(2)
    users = rng.integers(0, 120, 50)
    sub = torch.from_numpy(topk[:50])
    counts = rng.integers(1, 30, 40).astype(np.float32)
    expected = reference_serendipity(sub.numpy(), relevant, counts, 8, 8, users.tolist())
    assert serendipity(sub, heldout, counts, users=users) == pytest.approx(expected)
    # Popularity from an Interactions: its item counts.
    train = Interactions(rng.integers(0, 120, 900), rng.integers(0, 40, 900), user_map=120,
                         item_map=40)
    pop = np.bincount(train.items, minlength=40)
    assert serendipity(topk, Interactions.from_scipy(heldout), train) == pytest.approx(
        reference_serendipity(topk, relevant, pop, 8, 8))
    # No primitive list: serendipity is precision. Everything expected: 0.
    assert serendipity(topk, heldout, counts, primitive_k=0) == pytest.approx(
        precision_at_k(topk, heldout))
    assert serendipity(topk, heldout, counts, primitive_k=40) == 0.0
    # Lists of padding only: nothing serendipitous, the users still count.
    assert serendipity(np.full((120, 3), -1), heldout, counts) == 0.0


def test_serendipity_errors():
    topk, heldout, _ = random_case(num_users=30, num_items=20, k=4, seed=3)
    counts = np.arange(1, 21)
    with pytest.raises(ValueError, match=r"item_popularity must be \(20,\)"):
        serendipity(topk, heldout, counts[:-1])
    with pytest.raises(ValueError, match="primitive_k must be >= 0, got -1"):
        serendipity(topk, heldout, counts, primitive_k=-1)
    with pytest.raises(TypeError, match="primitive_k must be an int"):
        serendipity(topk, heldout, counts, primitive_k=2.0)
    with pytest.raises(ValueError, match="NaN/inf"):
        serendipity(topk, heldout, np.where(counts == 3, np.nan, counts))
    with pytest.raises(ValueError, match=r"serendipity: k=0 must be in \[1, 0\]"):
        serendipity(np.zeros((30, 0), dtype=np.int64), heldout, counts)
    with pytest.raises(ValueError, match="no evaluated user has held-out items"):
        serendipity(np.zeros((0, 4), dtype=np.int64), heldout, counts,
                    users=np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------- AUC


def auc_case(num_users=80, num_items=30, seed=0, ties=True):
    """Scores with many ties (small integers), held-out and excluded items drawn at random,
    plus the edge rows: no held-out item, positives all excluded, negatives all excluded."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 6, (num_users, num_items)) if ties
              else rng.standard_normal((num_users, num_items))).astype(np.float64)
    held = rng.random((num_users, num_items)) < rng.uniform(0.02, 0.3, (num_users, 1))
    excl = (rng.random((num_users, num_items)) < 0.3) & ~held
    held[0] = False  # no held-out item
    held[1], excl[1] = False, False
    held[1, :3], excl[1, :3] = True, True  # its only positives are excluded
    held[2], excl[2] = False, True
    held[2, 5], excl[2, 5] = True, False  # one positive, every other item excluded
    held[3], excl[3] = True, False  # everything held out: no negative
    overlap = (rng.random((num_users, num_items)) < 0.05) & held
    excl[4:] |= overlap[4:]  # a few held-out items also excluded
    return scores, sp.csr_matrix(held.astype(np.float32)), sp.csr_matrix(
        excl.astype(np.float32)), held, excl


def per_user_auc_reference(scores, held, excl):
    """{user: AUC} by sklearn.metrics.roc_auc_score and by a pairwise count, over the users
    with at least one positive and one negative."""
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    out = {}
    for u in range(len(scores)):
        candidates = ~excl[u]
        truth, s = held[u][candidates], scores[u][candidates]
        pos, neg = s[truth], s[~truth]
        if not len(pos) or not len(neg):
            continue
        pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        sk = roc_auc_score(truth, s)
        assert sk == pytest.approx(pairs), u
        out[u] = sk
    return out


def test_auc_hand_computed():
    heldout = sp.csr_matrix(np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))
    scores = np.array([[0.9, 0.5, 0.1, 0.5, 0.2],
                       [0.3, 0.2, 0.1, 0.0, 0.4],
                       [0.2, 0.2, 0.3, 0.2, 0.1]])
    # user 0: pairs (0.9 > .5, .1, .2), (0.5 = .5, > .1, > .2) -> 5.5 / 6; user 1 skipped;
    # user 2: 0.2 vs 0.2, 0.3, 0.2, 0.1 -> (0.5 + 0 + 0.5 + 1) / 4.
    assert auc(scores, heldout) == pytest.approx((5.5 / 6 + 2 / 4) / 2)
    # Excluding item 2 of user 0 leaves 3.5 / 4.
    exclude = sp.csr_matrix((np.ones(1), ([0], [2])), shape=(3, 5))
    assert auc(scores, heldout, exclude=exclude) == pytest.approx((3.5 / 4 + 2 / 4) / 2)


@pytest.mark.parametrize("compare_max", [0, 3, 10**6])
@pytest.mark.parametrize("ties", [True, False])
def test_auc_matches_sklearn_and_pairwise_count(ties, compare_max, monkeypatch):
    # compare_max: every user by sorting, a mix, every user by comparisons.
    monkeypatch.setattr(fastmf.metrics, "_AUC_COMPARE_MAX", compare_max)
    scores, heldout, exclude, held, excl = auc_case(seed=5 + ties, ties=ties)
    expected = per_user_auc_reference(scores, held, excl)
    assert not {0, 1, 2, 3} & set(expected)  # the edge rows are skipped
    want = float(np.mean(list(expected.values())))
    assert auc(scores, heldout, exclude=exclude) == pytest.approx(want)
    # float32 tensors, Interactions, small chunks: the same.
    assert auc(torch.from_numpy(scores).float(), Interactions.from_scipy(heldout),
               exclude=Interactions.from_scipy(exclude), chunk_size=7) == pytest.approx(want)
    # Excluded items may hold -inf (a masked score matrix).
    masked = np.where(excl, -np.inf, scores)
    assert auc(masked, heldout, exclude=exclude, chunk_size=1) == pytest.approx(want)
    assert auc(np.where(excl, np.nan, scores), heldout, exclude=exclude) == pytest.approx(want)
    # Without exclusion every non-held-out item is a negative.
    no_excl = per_user_auc_reference(scores, held, np.zeros_like(excl))
    assert auc(scores, heldout) == pytest.approx(float(np.mean(list(no_excl.values()))))


def test_auc_rows_for_users_and_callable_source():
    scores, heldout, exclude, held, excl = auc_case(num_users=60, num_items=25, seed=9)
    expected = per_user_auc_reference(scores, held, excl)
    users = np.random.default_rng(4).integers(0, 60, 40)
    want = float(np.mean([expected[u] for u in users if u in expected]))
    assert auc(scores[users], heldout, exclude=exclude, users=users) == pytest.approx(want)

    calls = []

    def source(rows):
        calls.append(len(rows))
        return torch.from_numpy(scores[rows])

    assert auc(source, heldout, exclude=exclude, users=users, chunk_size=8) == pytest.approx(
        want)
    assert max(calls) <= 8
    calls.clear()
    # By default the callable is asked only for users with held-out items.
    everyone = float(np.mean(list(expected.values())))
    assert auc(source, heldout, exclude=exclude, chunk_size=16) == pytest.approx(everyone)
    assert sum(calls) == int((held.sum(axis=1) > 0).sum())


def test_auc_errors():
    scores, heldout, exclude, held, _ = auc_case(num_users=10, num_items=8, seed=2)
    with pytest.raises(ValueError, match=r"scores must be \(U, 8\)"):
        auc(scores[:, :5], heldout)
    with pytest.raises(ValueError, match="pass users="):
        auc(scores[:4], heldout)
    with pytest.raises(IndexError, match=r"user index out of range \[0, 10\)"):
        auc(scores[:1], heldout, users=[10])
    with pytest.raises(ValueError, match="exclude is"):
        auc(scores, heldout, exclude=sp.csr_matrix((10, 9)))
    with pytest.raises(TypeError, match="exclude must be a scipy.sparse matrix"):
        auc(scores, heldout, exclude=held)
    bad = scores.copy()
    bad[5, np.flatnonzero(~held[5])[0]] = np.nan
    with pytest.raises(ValueError, match="NaN/inf at items that are ranked"):
        auc(bad, heldout)
    with pytest.raises(ValueError, match="no evaluated user has held-out items"):
        auc(scores, sp.csr_matrix((10, 8)))
    everything = sp.csr_matrix(np.ones((10, 8)))
    with pytest.raises(ValueError, match="all excluded or held out"):
        auc(scores, heldout, exclude=everything)
    with pytest.raises(ValueError, match="returned shape"):
        auc(lambda rows: np.zeros((len(rows), 3)), heldout)


# ----------------------------------------------------------------------------- fastmf.evaluate


@pytest.fixture(scope="module")
def implicit_split():
    rng = np.random.default_rng(17)
    num_users, num_items = 90, 70
    dense = rng.random((num_users, num_items)) < rng.uniform(0.05, 0.3, (num_users, 1))
    test_mask = dense & (rng.random(dense.shape) < 0.25)
    train = Interactions.from_scipy(sp.csr_matrix((dense & ~test_mask).astype(np.float32)))
    test = Interactions.from_scipy(sp.csr_matrix(test_mask.astype(np.float32)))
    torch.manual_seed(3)
    model = fastmf.MF(num_users, num_items, 6, init_scale=0.5)
    with torch.no_grad():
        model.item_bias.normal_()
    return model, train, test


def test_evaluate_aliases_keys_and_new_metrics(implicit_split):
    model, train, test = implicit_split
    asked = ("Hit@10", "hr@5", "P@3", "NDCG@10", "MRR", "map@10", "Serendipity@10",
             "serendipity@5", "AUC", "coverage", "ILD", "novelty@5")
    got = fastmf.evaluate(model, test, train=train, metrics=asked, k=10)
    assert list(got) == ["hr@10", "hr@5", "precision@3", "ndcg@10", "mrr", "map@10",
                         "serendipity@10", "serendipity@5", "auc", "coverage", "diversity",
                         "novelty@5"]
    users = np.unique(test.users)
    topk = model.recommend(torch.as_tensor(users), k=10, exclude=train)[0].numpy()
    ranking = ranking_metrics(topk, test, k=[3, 5, 10], users=users)
    assert got["hr@10"] == pytest.approx(ranking["hr@10"])
    assert got["precision@3"] == pytest.approx(ranking["precision@3"])
    assert got["mrr"] == pytest.approx(ranking["mrr@10"])
    pop = np.bincount(train.items, minlength=model.num_items)
    assert got["serendipity@5"] == pytest.approx(
        serendipity(topk[:, :5], test, pop, users=users))
    assert got["serendipity@10"] == pytest.approx(
        serendipity(topk, test, pop, users=users, primitive_k=10))
    assert got["novelty@5"] == pytest.approx(
        novelty(topk[:, :5], pop, num_users=train.num_users))
    # AUC from the factors, chunk by chunk, equals sklearn on the full score matrix.
    p, q, _, bi = model.tables()
    full = (p @ q.T + bi).detach().double().numpy()
    held = test.to_csr(binary=True).toarray() > 0
    excl = train.to_csr(binary=True).toarray() > 0
    expected = per_user_auc_reference(full, held, excl)
    assert got["auc"] == pytest.approx(float(np.mean(list(expected.values()))), abs=1e-6)
    small = fastmf.evaluate(model, test, train=train, metrics="auc", batch_size=7)
    assert small == pytest.approx({"auc": got["auc"]})
    assert 0.0 < got["auc"] < 1.0


def test_evaluate_rejects_bad_metric_names(implicit_split):
    model, train, test = implicit_split
    with pytest.raises(ValueError, match="fastmf.evaluate: unknown metric 'ndgc@10'.*hitrate"):
        fastmf.evaluate(model, test, train=train, metrics=("ndgc@10",))
    with pytest.raises(ValueError, match="fastmf.evaluate: metric 'ndcg@0'.*positive integer"):
        fastmf.evaluate(model, test, train=train, metrics=("ndcg@0",))
    with pytest.raises(ValueError, match="fastmf.evaluate: metric 'NDCG@x'"):
        fastmf.evaluate(model, test, train=train, metrics=("NDCG@x",))
    with pytest.raises(ValueError, match="serendipity needs train="):
        fastmf.evaluate(model, test, metrics=("serendipity@10",))
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        fastmf.evaluate(model, test, train=train, metrics=("mrr",), k=0)
    with pytest.raises(ValueError, match="metrics is empty"):
        fastmf.evaluate(model, test, train=train, metrics=())
