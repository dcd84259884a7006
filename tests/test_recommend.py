"""MF.recommend / similar_items / similar_users on every backend against brute force."""

import re

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


def popular_order(model):
    """Every item index by decreasing training popularity, ties to the lower index."""
    return list(np.argsort(-model.item_popularity, kind="stable"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cold_start_fallback_honours_exclude(backend, train):
    import scipy.sparse as sp

    model = make_model(backend, train)
    order = popular_order(model)
    raw = model.item_map.raw_ids
    bias = model.item_bias.detach().double().numpy()
    # An unknown user's list of raw items: the popular items without them, in order.
    skip = [order[0], order[2], order[3]]
    with pytest.warns(UserWarning, match="never-seen"):
        items, scores = model.recommend(["never-seen"], k=5, raw_ids=True,
                                        exclude=list(raw[skip]))
    want = [i for i in order if i not in skip][:5]
    assert list(items[0]) == list(raw[want])
    np.testing.assert_allclose(scores[0], model.mu + bias[want], rtol=1e-6)
    # Its own (1, num_items) sparse row reads the same.
    row = sp.csr_matrix((np.ones(3), (np.zeros(3, dtype=int), skip)), shape=(1, NUM_ITEMS))
    with pytest.warns(UserWarning):
        items, _ = model.recommend(["never-seen"], k=5, raw_ids=True, exclude=row)
    assert list(items[0]) == list(raw[want])
    # Fewer items left than k: padded with None / -inf.
    pool = [order[1], order[4], order[6], order[7]]
    with pytest.warns(UserWarning):
        items, scores = model.recommend(["never-seen"], k=4, raw_ids=True,
                                        items=list(raw[pool]), exclude=list(raw[pool[:2]]))
    assert list(items[0]) == [raw[order[6]], raw[order[7]], None, None]
    assert np.isneginf(scores[0, 2:]).all() and np.isfinite(scores[0, :2]).all()
    # A matrix indexed by user: known users lose their row, the unknown one has none.
    seen = train.to_csr(binary=True)
    with pytest.warns(UserWarning):
        items, _ = model.recommend(["u3", "never-seen", "u7"], k=6, raw_ids=True,
                                   exclude=train)
    for r, user in ((0, "u3"), (2, "u7")):
        u = model.user_map.index(user)
        assert list(model.item_map.lookup(items[r])) == brute_force(model, [u], 6,
                                                                    seen)[0].tolist()
    assert list(items[1]) == list(raw[order[:6]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_similar_raw_ids_pad_with_none(backend, train):
    model = make_model(backend, train)
    raw_items, scores = model.similar_items([1003, 1010], k=NUM_ITEMS + 2, raw_ids=True)
    index, want_scores = model.similar_items(model.item_map.lookup([1003, 1010]),
                                             k=NUM_ITEMS + 2)
    real = NUM_ITEMS - 1  # every item but the query
    assert raw_items.shape == (2, NUM_ITEMS + 2)
    assert (index[:, :real] >= 0).all() and (index[:, real:] == -1).all()
    for r in range(2):
        assert list(raw_items[r, :real]) == list(model.item_map.raw_ids[index[r, :real]])
        assert list(raw_items[r, real:]) == [None] * 3
    np.testing.assert_array_equal(scores, want_scores.numpy())
    assert np.isneginf(scores[:, real:]).all()
    users, scores = model.similar_users(["u1"], k=NUM_USERS + 1, raw_ids=True)
    index, _ = model.similar_users([model.user_map.index("u1")], k=NUM_USERS + 1)
    assert list(users[0, :NUM_USERS - 1]) == list(
        model.user_map.raw_ids[index[0, :NUM_USERS - 1]])
    assert list(users[0, NUM_USERS - 1:]) == [None] * 2
    assert "u1" not in list(users[0])


def test_recommend_checks_batch_size(train):
    from fastmf.models import MLP

    torch.manual_seed(0)
    mlp = MLP(NUM_USERS, NUM_ITEMS, layers=(8, 4))
    fastmf.fit(mlp, train, loss="bce", epochs=1, progress=False)
    users = [0, 1, 2]
    scores = mlp.predict(torch.as_tensor(users).repeat_interleave(NUM_ITEMS),
                         torch.arange(NUM_ITEMS).repeat(len(users))).reshape(len(users), -1)
    want = torch.sort(-scores.double(), dim=1, stable=True).indices[:, :4]
    for batch_size in (None, 1, 2, np.int64(3)):
        items, _ = mlp.recommend(users, k=4, batch_size=batch_size)
        assert torch.equal(items, want), batch_size
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=rf"^fastmf\.models\.MLP\.recommend: "
                                             rf"batch_size must be >= 1, got {bad}$"):
            mlp.recommend(users, k=4, batch_size=bad)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match=rf"^fastmf\.models\.MLP\.recommend: batch_size "
                                            rf"must be a positive int or None, got "
                                            rf"{re.escape(repr(bad))}$"):
            mlp.recommend(users, k=4, batch_size=bad)
    model = make_model("auto", train)
    with pytest.raises(ValueError, match=r"^fastmf\.MF\.recommend: batch_size must be >= 1, "
                                         r"got 0$"):
        model.recommend(users, k=4, batch_size=0)
    assert torch.equal(model.recommend(users, k=4, batch_size=2)[0],
                       brute_force(model, users, 4))


def test_recommend_refuses_dense_exclude(train):
    import scipy.sparse as sp

    model = make_model("auto", train)
    best = int(model.recommend([0], k=1)[0][0, 0])
    dense = np.zeros((1, NUM_ITEMS), dtype=np.int64)
    dense[0, best] = 1
    message = (r"^fastmf\.MF\.recommend: exclude must be a 1-D list of item ids for one user "
               r"or a sparse matrix \(scipy\.sparse / Interactions\) with one row per user; "
               r"got a \({}, {}\) {}$")
    with pytest.raises(ValueError, match=message.format(1, NUM_ITEMS, "ndarray")):
        model.recommend([0], k=3, exclude=dense)
    with pytest.raises(ValueError, match=message.format(1, NUM_ITEMS, "Tensor")):
        model.recommend([0], k=3, exclude=torch.as_tensor(dense))
    with pytest.raises(ValueError, match=message.format(NUM_USERS, NUM_ITEMS, "ndarray")):
        model.recommend([0, 1], k=3, exclude=np.zeros((NUM_USERS, NUM_ITEMS)))
    # The accepted forms of the same exclusion agree with brute force.
    seen = sp.csr_matrix(dense)
    want = brute_force(model, [0], 5, sp.vstack([seen] * NUM_USERS))
    assert best not in want[0].tolist()
    for form in (seen, [best], np.array([best]), torch.tensor([best])):
        assert torch.equal(model.recommend([0], k=5, exclude=form)[0], want), type(form)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raw_ids_of_half_models(dtype, train):
    torch.manual_seed(0)
    model = fastmf.models.SVDpp(NUM_USERS, NUM_ITEMS, dim=8, dtype=dtype).attach_data(train)
    with torch.no_grad():  # spread-out scores, not the near-ties of a fresh model
        for param in model.parameters():
            param.uniform_(-1, 1)
    users = ["u0", "u5", "never-seen"]
    with pytest.warns(UserWarning, match="never-seen"):
        items, scores = model.recommend(users, k=5, raw_ids=True)
    index, want = model.recommend(model.user_map.lookup(users[:2]), k=5)
    assert want.dtype == dtype and scores.dtype == np.float32
    assert items.shape == scores.shape == (3, 5)
    assert [list(row) for row in items[:2]] == [list(model.item_map.raw_ids[row])
                                                 for row in index.numpy()]
    np.testing.assert_array_equal(scores[:2], want.float().numpy())
    assert (np.diff(scores[:2], axis=1) <= 0).all()
    assert list(model.item_map.lookup(items[2])) == popular_order(model)[:5]
    # predict agrees with the ranked scores (to the half dtype's precision).
    u = np.repeat(users[:2], 5)
    np.testing.assert_allclose(scores[:2].reshape(-1),
                               model.predict(u, items[:2].reshape(-1), raw_ids=True),
                               rtol=2e-2, atol=2e-2)
    sim, sim_scores = model.similar_items([1000], k=3, raw_ids=True)
    assert sim_scores.dtype == np.float32 and sim.shape == (1, 3)
