"""MF.recommend / similar_items / similar_users on every backend against brute force."""

import numpy as np
import pytest
import torch

import fastmf
from fastmf.data import Interactions
from fastmf.testing import BACKENDS

NUM_USERS, NUM_ITEMS, DIM = 40, 60, 6


@pytest.fixture(scope="module")
def train():
    rng = np.random.default_rng(0)
    users = np.array([f"u{u}" for u in rng.integers(0, NUM_USERS, 900)])
    items = rng.integers(1000, 1000 + NUM_ITEMS, 900)
    data = Interactions.from_arrays(users, items, ratings=rng.uniform(1, 5, 900))
    assert (data.num_users, data.num_items) == (NUM_USERS, NUM_ITEMS)
    return data


def make_model(backend, train):
    torch.manual_seed(0)
    model = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, global_mean=3.0, backend=backend,
                      init_scale=0.5)
    with torch.no_grad():
        model.user_bias.uniform_(-1, 1)
        model.item_bias.uniform_(-1, 1)
    return model.attach_data(train)


def brute_force(model, users, k, seen=None, candidates=None):
    scores = model.predict(torch.as_tensor(users).repeat_interleave(NUM_ITEMS),
                           torch.arange(NUM_ITEMS).repeat(len(users))).reshape(len(users), -1)
    scores = scores.double()
    if seen is not None:
        scores[torch.as_tensor(seen.toarray()[users] > 0)] = float("-inf")
    if candidates is not None:
        keep = torch.zeros(NUM_ITEMS, dtype=torch.bool)
        keep[candidates] = True
        scores[:, ~keep] = float("-inf")
    # Stable sort on -score: ties go to the lower item index.
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    top = torch.gather(scores, 1, order)
    order[torch.isinf(top)] = -1
    if k > NUM_ITEMS:
        order = torch.cat([order, order.new_full((len(users), k - NUM_ITEMS), -1)], dim=1)
    return order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_recommend_matches_brute_force(backend, k, train):
    model = make_model(backend, train)
    users = np.arange(NUM_USERS)
    seen = train.to_csr(binary=True)
    items, scores = model.recommend(users, k=k, exclude=train)
    want = brute_force(model, users, k, seen)
    assert items.shape == (NUM_USERS, k)
    assert torch.equal(items, want)
    found = items >= 0
    rows = torch.as_tensor(users).unsqueeze(1).expand_as(items)[found]
    torch.testing.assert_close(scores[found], model.predict(rows, items[found]))
    assert torch.isinf(scores[~found]).all()
    for u in users:  # nothing seen comes back
        assert not set(items[u][items[u] >= 0].tolist()) & set(seen[u].indices.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_recommend_candidates_and_ties(backend, train):
    model = make_model(backend, train)
    with torch.no_grad():  # planted ties: identical item rows and biases
        model.item_factors[7] = model.item_factors[3]
        model.item_bias[7] = model.item_bias[3]
    candidates = [3, 7, 11, 20, 50]
    items, _ = model.recommend([0, 1, 2], k=10, items=candidates)
    assert torch.equal(items, brute_force(model, [0, 1, 2], 10, candidates=candidates))
    row = items[0].tolist()
    assert row.index(3) < row.index(7) and row[5:] == [-1] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_ids_and_cold_start(backend, train):
    model = make_model(backend, train)
    items, scores = model.recommend(["u3", "never-seen"], k=5, raw_ids=True)
    assert items.shape == (2, 5)
    idx = model.item_map.lookup(items[0])
    assert torch.equal(torch.as_tensor(idx), model.recommend([model.user_map.index("u3")],
                                                             k=5)[0][0])
    popular = np.argsort(-model.item_popularity, kind="stable")[:5]
    assert list(model.item_map.lookup(items[1])) == list(popular)
    expected = model.mu + model.item_bias.detach()[torch.as_tensor(popular)]
    torch.testing.assert_close(torch.as_tensor(scores[1]), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_similar_items_and_users(backend, metric, train):
    model = make_model(backend, train)
    items, scores = model.similar_items([4, 9], k=5, metric=metric)
    q = model.item_factors.detach()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True)
    sims = q[[4, 9]] @ q.T
    sims[0, 4] = sims[1, 9] = float("-inf")
    want = torch.sort(-sims, dim=1, stable=True).indices[:, :5]
    assert torch.equal(items, want)
    assert 4 not in items[0].tolist()
    users, _ = model.similar_users(["u1"], k=3, raw_ids=True)
    assert "u1" not in list(users[0]) and len(users[0]) == 3


def test_recommend_rejects_bad_input(train):
    model = make_model("auto", train)
    with pytest.raises(ValueError, match="k"):
        model.recommend([0], k=0)
    with pytest.raises(IndexError, match="user index 40 out of range"):
        model.recommend([40], k=3)
    with pytest.raises(ValueError, match="exclude has shape"):
        model.recommend([0], k=3, exclude=train.to_csr()[:3])
    with pytest.raises(KeyError, match="nobody"):
        model.similar_users(["nobody"], k=3, raw_ids=True)
