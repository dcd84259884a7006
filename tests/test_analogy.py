"""MF.analogy (latent arithmetic) against a brute-force numpy computation."""

import numpy as np
import pytest
import torch

import fastmf
from fastmf.data import Interactions
from fastmf.testing import BACKENDS

NUM_USERS, NUM_ITEMS, DIM = 30, 50, 5


@pytest.fixture(scope="module")
def train():
    rng = np.random.default_rng(3)
    users = np.array([f"u{u}" for u in rng.integers(0, NUM_USERS, 800)])
    items = rng.integers(0, NUM_ITEMS, 800) * 7 + 1000   # raw ids are not the indices
    data = Interactions.from_arrays(users, items, ratings=rng.uniform(1, 5, 800))
    assert (data.num_users, data.num_items) == (NUM_USERS, NUM_ITEMS)
    return data


def make_model(train, backend="auto", dtype=torch.float32):
    torch.manual_seed(11)
    model = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, backend=backend, init_scale=1.0, dtype=dtype)
    return model.attach_data(train)


def brute_force(table, positive, negative, k, metric, skip=(), named_pos=(), named_neg=()):
    """(indices (k,), scores (k,)) in float64 numpy, -1/-inf padding."""
    table = np.asarray(table, dtype=np.float64)
    pos = [table[i] for i in positive] + [np.asarray(v, np.float64) for v in named_pos]
    neg = [table[i] for i in negative] + [np.asarray(v, np.float64) for v in named_neg]
    if metric == "cosine":
        unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
        pos, neg = [unit(v) for v in pos], [unit(v) for v in neg]
        table = table / np.linalg.norm(table, axis=1, keepdims=True)
    query = np.sum(pos, axis=0) - (np.sum(neg, axis=0) if neg else 0.0)
    if metric == "cosine":
        query = query / np.linalg.norm(query)
    scores = table @ query
    scores[list(set(positive) | set(negative) | set(skip))] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    top = scores[order]
    order = np.where(np.isinf(top), -1, order)
    pad = max(0, k - len(order))
    return (np.concatenate([order, np.full(pad, -1)]),
            np.concatenate([top, np.full(pad, -np.inf)]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_matches_brute_force_on_indices(backend, metric, train):
    model = make_model(train, backend)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.choice(NUM_ITEMS, 4, replace=False)
        positive, negative = ids[:2].tolist(), ids[2:].tolist()
        got, scores = model.analogy(positive, negative, k=8, metric=metric)
        want, want_scores = brute_force(model.item_factors.detach(), positive, negative, 8,
                                        metric)
        assert isinstance(got, torch.Tensor) and got.shape == (8,)
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)
        assert not set(got.tolist()) & set(ids.tolist())


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_raw_ids_in_and_out(metric, train):
    model = make_model(train, dtype=torch.float64)
    raw = model.item_map.raw_ids
    rng = np.random.default_rng(1)
    idx = rng.choice(NUM_ITEMS, 3, replace=False)
    got, scores = model.analogy([raw[idx[0]], raw[idx[1]]], [raw[idx[2]]], k=6, metric=metric,
                                raw_ids=True)
    want, want_scores = brute_force(model.item_factors.detach(), idx[:2], idx[2:], 6, metric)
    assert isinstance(got, np.ndarray) and isinstance(scores, np.ndarray)
    np.testing.assert_array_equal(got, raw[want])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-10)
    assert not set(got.tolist()) & set(raw[idx].tolist())


def test_user_side_with_string_raw_ids(train):
    model = make_model(train)
    raw = model.user_map.raw_ids
    got, scores = model.analogy([raw[3]], [raw[5]], k=4, side="user", raw_ids=True)
    want, want_scores = brute_force(model.user_factors.detach(), [3], [5], 4, "cosine")
    np.testing.assert_array_equal(got, raw[want])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert got.dtype.kind in "OU" and str(got[0]).startswith("u")


def test_bare_id_and_only_positive(train):
    """One positive alone is similar_items' query: same ranking and scores."""
    model = make_model(train)
    got, scores = model.analogy(7, k=5)
    want, want_scores = model.similar_items([7], k=5)
    np.testing.assert_array_equal(got.numpy(), want[0].numpy())
    np.testing.assert_allclose(scores.numpy(), want_scores[0].numpy(), rtol=1e-5)


def test_exclude_leaves_out_more_items(train):
    model = make_model(train)
    first, _ = model.analogy([1, 2], [3], k=5)
    skip = first[:2].tolist()
    got, _ = model.analogy([1, 2], [3], k=5, exclude=skip)
    want, _ = brute_force(model.item_factors.detach(), [1, 2], [3], 5, "cosine", skip=skip)
    np.testing.assert_array_equal(got.numpy(), want)
    assert not set(got.tolist()) & set(skip)
    raw = model.item_map.raw_ids
    got_raw, _ = model.analogy([raw[1], raw[2]], [raw[3]], k=5, raw_ids=True,
                               exclude=raw[skip])
    np.testing.assert_array_equal(got_raw, raw[want])


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_named_vectors(metric, train):
    """A genre's mean vector enters the query like an item's (the survey's example kind)."""
    model = make_model(train)
    table = model.item_factors.detach()
    genre = [4, 9, 16, 25]
    genre_mean = table[genre].mean(0)
    other = torch.randn(DIM, generator=torch.Generator().manual_seed(2)).numpy()
    got, scores = model.analogy([4, "other"], ["genre"], k=7, metric=metric,
                                vectors={"genre": genre_mean, "other": other})
    want, want_scores = brute_force(table, [4], [], 7, metric, named_pos=[other],
                                    named_neg=[genre_mean.numpy()])
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)
    raw = model.item_map.raw_ids
    got_raw, _ = model.analogy([raw[4], "other"], ["genre"], k=7, metric=metric, raw_ids=True,
                               vectors={"genre": genre_mean, "other": other})
    np.testing.assert_array_equal(got_raw, raw[want])


def test_k_above_the_catalog_pads_like_recommend(train):
    model = make_model(train)
    got, scores = model.analogy([0, 1], [2], k=NUM_ITEMS + 5)
    assert got.shape == scores.shape == (NUM_ITEMS + 5,)
    real = NUM_ITEMS - 3
    assert (got[:real] >= 0).all() and (got[real:] == -1).all()
    assert torch.isfinite(scores[:real]).all() and torch.isneginf(scores[real:]).all()
    assert sorted(got[:real].tolist()) == sorted(set(range(NUM_ITEMS)) - {0, 1, 2})
    raw = model.item_map.raw_ids
    got_raw, scores_raw = model.analogy([raw[0], raw[1]], [raw[2]], k=NUM_ITEMS + 5,
                                        raw_ids=True)
    assert got_raw.dtype == object and all(v is None for v in got_raw[real:])
    assert np.isneginf(scores_raw[real:]).all()


def test_bad_input_is_named(train):
    model = make_model(train)
    raw = model.item_map.raw_ids
    with pytest.raises(KeyError, match=r"MF.analogy: unknown raw item id.*\b5\b"):
        model.analogy([raw[0], 5], k=3, raw_ids=True)
    with pytest.raises(ValueError, match="MF.analogy: positive is empty"):
        model.analogy([], [1], k=3)
    with pytest.raises(ValueError, match=r"MF.analogy: unknown metric 'euclid'"):
        model.analogy([1], metric="euclid")
    with pytest.raises(ValueError, match=r"side must be 'item' or 'user', got 'items'"):
        model.analogy([1], side="items")
    with pytest.raises(IndexError, match=r"item index 50 out of range \[0, 50\)"):
        model.analogy([50])
    with pytest.raises(ValueError, match=r"k must be positive, got 0"):
        model.analogy([1], k=0)
    with pytest.raises(ValueError, match=r"vectors\['g'\] has shape \(3,\), expected \(5,\)"):
        model.analogy([1], ["g"], vectors={"g": np.ones(3)})
    with pytest.raises(ValueError, match=r"vectors\['g'\] holds NaN"):
        model.analogy([1], ["g"], vectors={"g": np.full(DIM, np.nan)})
    with pytest.raises(KeyError, match=r"negative holds 'Animaton', which is no item index"):
        model.analogy([1], ["Animaton"], vectors={"Animation": np.ones(DIM)})
    with pytest.raises(KeyError, match=r"unknown raw item id\(s\) in positive: \['Animaton'\] "
                                       r"\(names in vectors: \['Animation'\]\)"):
        model.analogy([raw[0], "Animaton"], raw_ids=True, vectors={"Animation": np.ones(DIM)})
    with pytest.raises(ValueError, match="the terms cancel out"):
        model.analogy([1], [1], metric="dot")
    with pytest.raises(ValueError, match=r"raw_ids=True but the model holds no item id map"):
        fastmf.MF(4, 6, dim=2).analogy([1], raw_ids=True)
    users = np.array(["a", "b"])
    clash = Interactions.from_arrays(users, np.array(["x", "y"]))
    named = fastmf.MF(2, 2, dim=2).attach_data(clash)
    with pytest.raises(ValueError, match=r"vectors name 'x' is also a raw item id"):
        named.analogy(["y"], ["x"], raw_ids=True, vectors={"x": np.ones(2)})
