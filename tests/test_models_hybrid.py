"""fastmf.models.Hybrid and fastmf.models.coldstart: the forward against a direct numpy
LightFM-style computation, the fused step against plain autograd, fold-in, features-only
vectors, growing users/items with their optimizer state, the popularity fallback, bad
input."""

import copy
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from _ids import ID_FORMS

import fastmf
from fastmf import optim
from fastmf.data import Features
from fastmf.models import coldstart
from fastmf.models.base import Batch
from fastmf.models.hybrid import Hybrid
from fastmf.testing import DEVICES


def random_features(rng, rows, cols, density=0.4, duplicates=True):
    """A COO matrix with repeated (row, col) entries (they add up) and no empty row."""
    nnz = int(rows * cols * density)
    r = np.concatenate([rng.integers(0, rows, nnz), np.arange(rows)])
    c = rng.integers(0, cols, len(r))
    if duplicates:
        r, c = np.concatenate([r, r[:5]]), np.concatenate([c, c[:5]])
    w = rng.uniform(0.1, 2.0, len(r))
    return sp.coo_matrix((w, (r, c)), shape=(rows, cols))


def lightfm_numpy(model, features, side_rows, identity, normalize):
    """Vectors and biases of every row: Σ_f w_f e_f over [features | identity], computed
    with numpy from the model's tables (LightFM's model)."""
    dense = np.asarray(features.todense(), dtype=np.float64)  # duplicates summed
    if identity:
        dense = np.hstack([dense, np.eye(side_rows)])
    if normalize:
        dense = dense / dense.sum(1, keepdims=True)
    return dense


def side_arrays(model, side):
    s = model.users if side == "user" else model.items
    return (s.table.weight.detach().double().numpy(),
            s.bias.weight.detach().double().numpy()[:, 0])


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def random_hybrid(rng, seed: int, num_users: int, num_items: int, dim: int):
    """A Hybrid on random user and item features, with random biases too (so they are
    checked), and its numpy LightFM-style (p, b_u, q, b_i) per user and item."""
    torch.manual_seed(seed)
    uf = random_features(rng, num_users, num_users // 2)
    itf = random_features(rng, num_items, num_items // 2)
    model = Hybrid(num_users, num_items, dim=dim,
                   user_features=Features.from_scipy(uf, kind="user"),
                   item_features=Features.from_scipy(itf), init_scale=0.5)
    with torch.no_grad():
        model.users.bias.weight.uniform_(-1, 1)
        model.items.bias.weight.uniform_(-1, 1)
    wu = lightfm_numpy(model, uf, num_users, True, True)
    wi = lightfm_numpy(model, itf, num_items, True, True)
    eu, cu = side_arrays(model, "user")
    ei, ci = side_arrays(model, "item")
    return model, (wu @ eu, wu @ cu, wi @ ei, wi @ ci)


def test_forward_equals_numpy_lightfm(rng):
    model, (p, bu, q, bi) = random_hybrid(rng, 1, 9, 12, 4)
    users = rng.integers(0, 9, 50)
    items = rng.integers(0, 12, 50)
    expected = (p[users] * q[items]).sum(1) + bu[users] + bi[items]
    got = model(torch.as_tensor(users), torch.as_tensor(items)).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    vec, offset = model.user_vectors(torch.as_tensor(users))
    ivec, ibias = model.item_vectors()
    via = ((vec * ivec[torch.as_tensor(items)]).sum(1) + offset
           + ibias[torch.as_tensor(items)]).detach().double().numpy()
    np.testing.assert_allclose(via, expected, rtol=1e-5, atol=1e-6)


def test_scipy_features_are_used_as_given_without_identity(rng):
    itf = random_features(rng, 10, 4)
    model = Hybrid(3, 10, dim=3, item_features=itf, identity=False)
    wi = lightfm_numpy(model, itf, 10, False, False)
    ei, ci = side_arrays(model, "item")
    got, bias = model.item_vectors()
    np.testing.assert_allclose(got.detach().double().numpy(), wi @ ei, rtol=1e-5, atol=1e-6)
    assert model.users.table.weight.shape == (3, 3)  # no user features: identity only


def reference_step(model, batch, lr, reg):
    """One BPR step of ``model`` (a copy) by plain autograd over dense tables and
    torch.optim.Adagrad: the numbers the fused step must give."""
    tables = {}
    for side in ("users", "items"):
        s = getattr(model, side)
        tables[side] = [s.table.weight.detach().clone().requires_grad_(True),
                        s.bias.weight.detach().clone().requires_grad_(True)]

    def pool(side, ids):
        s = getattr(model, side)
        idx, offsets, w = s.bags(ids)
        vec = F.embedding_bag(idx, tables[side][0], offsets, mode="sum", per_sample_weights=w)
        bias = F.embedding_bag(idx, tables[side][1], offsets, mode="sum",
                               per_sample_weights=w)
        return vec, bias[:, 0]

    p, bu = pool("users", batch.users)
    n = batch.negatives.shape[1]
    q, bi = pool("items", torch.cat([batch.items, batch.negatives.reshape(-1)]))
    size = len(batch.users)
    pos = (p * q[:size]).sum(1) + bu + bi[:size]
    neg = (p.repeat_interleave(n, 0) * q[size:]).sum(1) + bu.repeat_interleave(n) + bi[size:]
    loss = F.softplus(neg - pos.repeat_interleave(n)).mean()
    penalty = sum(o.square().sum() for o in (p, bu, q, bi))
    total = loss + reg * penalty / size
    opt = torch.optim.Adagrad([t for pair in tables.values() for t in pair], lr=lr)
    total.backward()
    opt.step()
    return {side: [t.detach() for t in pair] for side, pair in tables.items()}


def test_fused_step_equals_autograd(rng):
    torch.manual_seed(2)
    itf = random_features(rng, 15, 5)
    model = Hybrid(8, 15, dim=6, item_features=Features.from_scipy(itf), init_scale=0.3)
    expected_model = copy.deepcopy(model)
    users = torch.as_tensor(rng.integers(0, 8, 11))
    items = torch.as_tensor(rng.integers(0, 15, 11))
    negatives = torch.as_tensor(rng.integers(0, 15, (11, 3)))
    batch = Batch(users, items, None, negatives, None, None)
    expected = reference_step(expected_model, batch, lr=0.1, reg=0.01)
    opt = optim.apply_in_backward(optim.SparseAdagrad(list(model.parameters()), lr=0.1))
    loss, _ = model.training_step(batch, opt, loss="bpr", reg=0.01)
    assert torch.isfinite(loss)
    for side in ("users", "items"):
        s = getattr(model, side)
        assert s.table.weight.grad is None  # stepped in backward
        torch.testing.assert_close(s.table.weight.detach(), expected[side][0], rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(s.bias.weight.detach(), expected[side][1], rtol=1e-5,
                                   atol=1e-6)


def dense_reference_step(model, batch, loss, lr, reg):
    """One step of ``loss`` by plain autograd over dense feature matrices (no bags, no
    deduplication) and torch.optim.Adagrad."""
    params, pooled = [], {}
    for side in ("users", "items"):
        s = getattr(model, side)
        dense = torch.as_tensor(sp.csr_matrix(
            (s.weights.numpy(), s.indices.numpy(), s.indptr.numpy()),
            shape=(s.num_rows, s.table.weight.shape[0])).toarray())
        table = s.table.weight.detach().clone().requires_grad_(True)
        bias = s.bias.weight.detach().clone().requires_grad_(True)
        params += [table, bias]
        pooled[side] = (dense, table, bias)

    def pool(side, ids):
        dense, table, bias = pooled[side]
        return dense[ids] @ table, (dense[ids] @ bias)[:, 0]

    p, bu = pool("users", batch.users)
    if loss == "mse":
        q, bi = pool("items", batch.items)
        scores, targets, outputs = (p * q).sum(1) + bu + bi, batch.targets, (p, bu, q, bi)
        value = (scores - targets).square().mean()
    else:
        n = batch.negatives.shape[1]
        q, bi = pool("items", batch.items)
        qn, bn = pool("items", batch.negatives.reshape(-1))
        pos = (p * q).sum(1) + bu + bi
        neg = (p.repeat_interleave(n, 0) * qn).sum(1) + bu.repeat_interleave(n) + bn
        scores = torch.cat([pos, neg])
        targets = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        value = F.binary_cross_entropy_with_logits(scores, targets)
        outputs = (p, bu, q, bi, qn, bn)
    total = value + reg * sum(o.square().sum() for o in outputs) / len(batch.users)
    opt = torch.optim.Adagrad(params, lr=lr)
    total.backward()
    opt.step()
    return params


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_step_with_repeated_ids_equals_dense_autograd(rng, loss):
    # Few users and items, many samples: every id repeats; users identity only.
    torch.manual_seed(4)
    itf = random_features(rng, 10, 4)
    model = Hybrid(5, 10, dim=3, item_features=Features.from_scipy(itf), init_scale=0.3)
    users = torch.as_tensor(rng.integers(0, 5, 40))
    items = torch.as_tensor(rng.integers(0, 10, 40))
    targets = torch.as_tensor(rng.uniform(1, 5, 40), dtype=torch.float32)
    negatives = torch.as_tensor(rng.integers(0, 10, (40, 2))) if loss == "bce" else None
    batch = Batch(users, items, targets if loss == "mse" else None, negatives, None, None)
    expected = dense_reference_step(copy.deepcopy(model), batch, loss, lr=0.1, reg=0.01)
    before = [t.detach().clone() for t in model.parameters()]
    opt = optim.apply_in_backward(optim.SparseAdagrad(list(model.parameters()), lr=0.1))
    model.training_step(batch, opt, loss=loss, reg=0.01)
    assert all(not torch.equal(b, t.detach()) for b, t in zip(before, model.parameters(),
                                                                strict=True))
    got = [model.users.table.weight, model.users.bias.weight, model.items.table.weight,
           model.items.bias.weight]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.detach(), e.detach(), rtol=1e-5, atol=1e-6)


def planted_model(rng, num_items=60, dim=6):
    torch.manual_seed(3)
    model = Hybrid(5, num_items, dim=dim, init_scale=1.0)
    with torch.no_grad():
        model.items.bias.weight.uniform_(-0.3, 0.3)
    return model


def test_fold_in_ridge_recovers_planted_vector(rng):
    model = planted_model(rng)
    q, b = model.item_vectors()
    planted = torch.as_tensor(rng.normal(size=6), dtype=torch.float32)
    items = rng.choice(60, 25, replace=False)
    ratings = (q[items] @ planted + b[items] + 0.7).detach().numpy()
    vector, offset = coldstart.fold_in(model, items, ratings=ratings, reg=1e-9)
    torch.testing.assert_close(vector, planted, rtol=1e-4, atol=1e-4)
    assert offset == pytest.approx(0.7, abs=1e-4)


def test_fold_in_bpr_points_at_planted_vector(rng):
    model = planted_model(rng, num_items=200)
    q, b = model.item_vectors()
    planted = torch.as_tensor(rng.normal(size=6), dtype=torch.float32)
    liked = torch.topk(q.detach() @ planted, 30).indices.numpy()
    vector, _ = coldstart.fold_in(model, liked, loss="bpr", steps=100, lr=0.05, reg=1e-4)
    cosine = float(vector @ planted / (vector.norm() * planted.norm()))
    assert cosine > 0.9
    top, scores = coldstart.recommend_new_user(model, liked[:20], k=10, loss="bpr",
                                               steps=100)
    assert not np.isin(top.numpy(), liked[:20]).any()  # their own items are left out
    assert np.isin(top.numpy(), liked[20:]).sum() >= 5
    assert torch.all(scores[:-1] >= scores[1:])


def test_popularity_fallback_warns(rng):
    model = planted_model(rng)
    model.item_popularity = np.arange(60)[::-1].copy()
    model.item_map = fastmf.data.IdMap(np.arange(60) * 10, kind="item")
    with pytest.warns(coldstart.PopularityFallbackWarning, match="none of the 2"):
        top, _ = coldstart.recommend_new_user(model, [7, 13], k=3, raw_ids=True,
                                              prior="zero")
    assert top.tolist() == [0, 10, 20]
    # The default prior: the mean user's ranking, still with the warning.
    p_bar, _ = coldstart.user_prior(model)
    q, b = model.item_vectors()
    want = torch.topk(q.detach().double() @ p_bar + b.detach().double(), 3).indices * 10
    with pytest.warns(coldstart.PopularityFallbackWarning, match="none of the 2.*prior"):
        top, _ = coldstart.recommend_new_user(model, [7, 13], k=3, raw_ids=True)
    assert top.tolist() == want.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        top, _ = coldstart.recommend_new_user(model, [10, 7], k=3, raw_ids=True)
    assert 10 not in top.tolist()


def test_features_only_vectors(rng):
    torch.manual_seed(4)
    itf = random_features(rng, 20, 6)
    uf = random_features(rng, 7, 3)
    model = Hybrid(7, 20, dim=5, user_features=Features.from_scipy(uf, kind="user"),
                   item_features=Features.from_scipy(itf), init_scale=0.5)
    new_items = random_features(rng, 3, 6).tocsr()
    new_users = random_features(rng, 2, 3).tocsr()
    ei, ci = side_arrays(model, "item")
    eu, cu = side_arrays(model, "user")
    wi = lightfm_numpy(model, new_items, 3, False, True)
    wu = lightfm_numpy(model, new_users, 2, False, True)
    vec, bias = coldstart.item_vectors_from_features(model, new_items)
    np.testing.assert_allclose(vec.double().numpy(), wi[:, :6] @ ei[:6], rtol=1e-5, atol=1e-6)
    uvec, ubias = coldstart.user_vectors_from_features(model, new_users)
    np.testing.assert_allclose(ubias.double().numpy(), wu[:, :3] @ cu[:3], rtol=1e-5,
                               atol=1e-6)
    scores = coldstart.score_new_items(model, [0, 3], new_items)
    p, off = model.user_vectors(torch.tensor([0, 3]))
    expected = p.detach() @ vec.T + bias + off.detach().unsqueeze(1)
    torch.testing.assert_close(scores, expected)
    top, s = coldstart.recommend_from_features(model, new_users, k=4)
    full = uvec @ model.item_vectors()[0].detach().T + model.item_vectors()[1].detach()
    assert top.tolist() == torch.topk(full, 4).indices.tolist()
    empty = sp.csr_matrix((1, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="no feature"):
        coldstart.user_vectors_from_features(model, empty)
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(2, 3\)"):
        coldstart.user_vectors_from_features(model, sp.csr_matrix(np.ones((2, 4))))


def test_add_items_then_train(rng):
    torch.manual_seed(5)
    itf = random_features(rng, 12, 4)
    model = Hybrid(6, 12, dim=4, item_features=Features.from_scipy(itf))
    opt = optim.apply_in_backward(optim.SparseAdagrad(list(model.parameters()), lr=0.2))
    batch = Batch(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), None,
                  torch.tensor([[4, 5], [6, 7], [8, 9]]), None, None)
    model.training_step(batch, opt, loss="bpr", reg=0.0)
    new = sp.csr_matrix(np.array([[1.0, 0, 2.0, 0], [0, 0, 0, 0]], dtype=np.float32))
    before = model.items.table.weight.detach().clone()
    added = model.add_items(2, new, optimizer=opt)
    assert list(added) == [12, 13] and model.num_items == 14
    assert model.items.table.weight.shape == (4 + 14, 4)
    assert opt.state[model.items.table.weight]["sum"].shape == (18, 4)
    # Content-based start: the identity row of the featured item is the weighted mean of
    # its feature rows; the featureless one gets the default init range.
    expected = (before[0] * 1 + before[2] * 2) / 3
    torch.testing.assert_close(model.items.table.weight[4 + 12].detach(), expected)
    assert model.items.table.weight[4 + 13].abs().max() <= model.init_scale
    # Its vector: (features + identity) normalised, the identity counted as one more weight.
    vec, _ = model.item_vectors()
    torch.testing.assert_close(vec[12].detach(), (before[0] + 2 * before[2] + expected) / 4)
    target = model.items.table.weight[4 + 12].detach().clone()
    batch = Batch(torch.tensor([0, 1]), torch.tensor([12, 13]), None,
                  torch.tensor([[0, 1], [2, 3]]), None, None)
    for _ in range(3):
        loss, _ = model.training_step(batch, opt, loss="bce", reg=1e-3)
        assert torch.isfinite(loss)
    assert not torch.equal(model.items.table.weight[4 + 12].detach(), target)
    model.add_users(3, optimizer=opt)
    assert model.num_users == 9 and opt.state[model.users.table.weight]["sum"].shape == (9, 4)
    model.training_step(Batch(torch.tensor([8]), torch.tensor([13]), None,
                              torch.tensor([[0]]), None, None), opt, loss="bpr", reg=0.0)


def test_growth_is_all_or_nothing(rng):
    itf = random_features(rng, 10, 4)
    model = Hybrid(5, 10, dim=3, item_features=Features.from_scipy(itf))
    opt = optim.apply_in_backward(optim.SparseAdagrad(list(model.parameters()), lr=0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged():
        now = model.state_dict()
        assert set(now) == set(state)
        assert all(now[k].shape == state[k].shape and torch.equal(now[k], state[k])
                   for k in state)
        assert opt.state[model.items.table.weight]["sum"].shape[0] == 14

    with pytest.raises(RuntimeError, match="updated in backward by a SparseAdagrad that was "
                                           "not passed"):
        model.add_items(2)
    unchanged()
    with pytest.raises(ValueError, match=r"shape \(2, 5\), expected \(2, 4\)"):
        model.add_items(2, np.ones((2, 5)), optimizer=opt)
    unchanged()
    with pytest.raises(ValueError, match="NaN"):
        model.add_items(1, np.array([[np.nan, 0, 0, 1.0]]), optimizer=opt)
    with pytest.raises(ValueError, match="negative"):
        model.add_items(1, np.array([[-1.0, 0, 0, 1.0]]), optimizer=opt)
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.add_items(0, optimizer=opt)
    other = optim.SparseAdagrad([torch.nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(RuntimeError, match="not passed"):
        model.add_items(1, optimizer=other)
    unchanged()
    # Optimizer state that lives on another device than the tables cannot grow with them.
    weight = model.items.table.weight
    saved = opt.state[weight]["sum"]
    opt.state[weight]["sum"] = saved.to("meta")
    with pytest.raises(RuntimeError, match="'sum' state is on meta"):
        model.add_items(1, optimizer=opt)
    opt.state[weight]["sum"] = saved
    unchanged()
    plain = Hybrid(5, 10, dim=3, item_features=itf, identity=False)
    with pytest.raises(ValueError, match="no feature"):
        plain.add_items(1)


def test_mf_add_items_with_content_init_and_state():
    torch.manual_seed(6)
    model = fastmf.MF(6, 5, dim=3, sparse=True)
    opt = optim.SparseAdagrad(model.parameters(), lr=0.1)
    catalog = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], np.float32))
    before = model.item_factors.detach().clone()
    added = coldstart.add_rows(model, "item", 2, np.array([[1.0, 0], [0, 0]]),
                               catalog_features=catalog, optimizer=opt)
    assert list(added) == [5, 6] and model.num_items == 7
    torch.testing.assert_close(model.item_factors[5].detach(), before[:2].mean(0))
    assert opt.state[model.item_factors]["sum"].shape == (7, 3)
    pred = model(torch.tensor([0, 1]), torch.tensor([5, 6]))
    ((pred - 1) ** 2).mean().backward()
    opt.step()
    assert torch.isfinite(model.item_factors).all()
    with pytest.raises(ValueError, match="rows but the model"):
        coldstart.add_rows(model, "item", 1, np.ones((1, 2)), catalog_features=catalog)


def test_bad_construction(rng):
    itf = random_features(rng, 10, 4).tocsr()
    with pytest.raises(ValueError, match="item_features has 10 rows but the model has 11"):
        Hybrid(3, 11, item_features=itf)
    bad = itf.copy()
    bad.data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        Hybrid(3, 10, item_features=bad)
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Hybrid(3, 10, item_features=bad)
    empty = itf.copy().tolil()
    empty[4, :] = 0
    with pytest.raises(ValueError, match="first: item 4"):
        Hybrid(3, 10, item_features=sp.csr_matrix(empty), identity=False)
    assert Hybrid(3, 10, identity=False).items.table.weight.shape[0] == 10  # identity-only
    with pytest.raises(TypeError, match="item_features must be"):
        Hybrid(3, 10, item_features=[[1, 2]])
    model = Hybrid(3, 10, item_features=itf)
    with pytest.raises(IndexError, match=r"Hybrid.forward: items id 10 out of range \[0, 10\)"):
        model(torch.tensor([0]), torch.tensor([10]))


def test_fit_save_load_round_trip_after_growth(rng, tmp_path):
    data = fastmf.datasets.synthetic(num_users=40, num_items=30, num_interactions=600, seed=1)
    itf = random_features(rng, 30, 5)
    model = Hybrid(data.num_users, data.num_items, dim=6,
                   item_features=Features.from_scipy(itf, id_map=data.item_map))
    history = fastmf.fit(model, data, loss="bpr", epochs=2, progress=False)
    assert np.isfinite(history["loss"]).all()
    model.add_items(2, np.array([[1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 1.0]]),
                    raw_ids=np.array([1000, 1001]))
    assert model.item_map.lookup([1001]).tolist() == [31]
    model.save(tmp_path / "hybrid")
    loaded = fastmf.load(tmp_path / "hybrid")
    assert type(loaded) is Hybrid and loaded.get_config() == model.get_config()
    users = torch.as_tensor(rng.integers(0, 40, 20))
    items = torch.as_tensor(rng.integers(0, 32, 20))
    torch.testing.assert_close(loaded.predict(users, items), model.predict(users, items))
    assert loaded.recommend([1], k=3)[0].shape == (1, 3)


@pytest.mark.parametrize("dtype, optimizer", [(torch.bfloat16, "adagrad"),
                                              (torch.float16, "adam")])
def test_half_precision_model_saves_loads_and_resumes_exactly(rng, tmp_path, dtype, optimizer):
    """A float16/bfloat16 Hybrid loads back in its dtype (its config keeps it), and a fit
    resumed from its checkpoint ends bit for bit as the uninterrupted one: the optimizer's
    float32 states come back as float32 (torch's load_state_dict casts them to the
    parameter's dtype)."""
    data = fastmf.datasets.synthetic(num_users=40, num_items=30, num_interactions=600, seed=2)
    itf = Features.from_scipy(random_features(rng, 30, 5), id_map=data.item_map)

    def run(epochs, resume=False):
        torch.manual_seed(3)
        model = Hybrid(data.num_users, data.num_items, dim=6, item_features=itf, dtype=dtype)
        fastmf.fit(model, data, loss="bpr", epochs=epochs, optimizer=optimizer, seed=4,
                   progress=False, checkpoint=tmp_path / "ck", resume=resume)
        return model

    straight = run(3)
    loaded = fastmf.load(tmp_path / "ck")
    assert loaded.users.table.weight.dtype == dtype and loaded.get_config()["dtype"] == \
        str(dtype).removeprefix("torch.")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 straight.state_dict().values()))
    run(1)
    resumed = run(3, resume=True)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="dtype must be one of"):
        Hybrid(4, 4, dim=2, dtype="int8")


def test_new_user_with_every_item_and_models_without_vectors():
    """A new user who has every item gets padding from every model (a ranking fold-in had
    no negatives to draw and raised for ALS, GMF, Item2Vec); fold-in on a model without
    item vectors is a TypeError naming the model."""
    from fastmf.models import ALS, GMF, MLP

    data = fastmf.datasets.synthetic(num_users=30, num_items=12, num_interactions=160, seed=0)
    for model in (fastmf.MF.from_interactions(data, dim=4), ALS.from_interactions(data, dim=4),
                  GMF.from_interactions(data, dim=4)):
        fastmf.fit(model, data, epochs=1, progress=False)
        top, scores = model.recommend_new_user(list(range(12)), k=3)
        assert top.tolist() == [-1, -1, -1] and scores.tolist() == [float("-inf")] * 3
        top, _ = model.recommend_new_user(list(range(11)), k=3)
        assert top.tolist()[:1] == [11]  # the one item left
    mlp = MLP(30, 12, layers=(8, 4))
    for call in (lambda: coldstart.fold_in(mlp, [1, 2]),
                 lambda: coldstart.recommend_new_user(mlp, [1, 2])):
        with pytest.raises(TypeError, match=r"\(MLP\): the model has no item vectors"):
            call()


def test_fold_in_and_recommend_new_user_methods(rng):
    torch.manual_seed(8)
    items = rng.choice(30, 6, replace=False)
    ratings = rng.uniform(1, 5, 6)
    for model in (fastmf.MF(4, 30, dim=5), planted_model(rng, num_items=30, dim=5),
                  fastmf.models.GMF(4, 30, dim=5)):
        vector, offset = model.fold_in(items, ratings=ratings, reg=0.5)
        expected, expected_offset = coldstart.fold_in(model, items, ratings=ratings, reg=0.5)
        torch.testing.assert_close(vector, expected)
        assert offset == pytest.approx(expected_offset)
        top, scores = model.recommend_new_user(items, k=4, ratings=ratings, reg=0.5)
        want_top, want_scores = coldstart.recommend_new_user(model, items, 4, ratings=ratings,
                                                             reg=0.5)
        assert torch.equal(torch.as_tensor(top), torch.as_tensor(want_top))
        assert not set(np.asarray(top).tolist()) & set(items.tolist())
        torch.testing.assert_close(torch.as_tensor(scores), torch.as_tensor(want_scores))
    mlp = fastmf.models.MLP(4, 30, layers=(8, 4))
    for call in (lambda: mlp.fold_in(items), lambda: mlp.recommend_new_user(items)):
        with pytest.raises(TypeError, match=r"MLP\.(fold_in|recommend_new_user): the model "
                                            "has no item vectors"):
            call()


def test_mf_add_users_and_add_items_methods():
    torch.manual_seed(9)
    model = fastmf.MF(6, 5, dim=3, sparse=True)
    opt = optim.SparseAdagrad(model.parameters(), lr=0.1)
    catalog = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], np.float32))
    before = model.item_factors.detach().clone()
    assert list(model.add_items(2, np.array([[0, 1.0], [0, 0]]), catalog_features=catalog,
                                optimizer=opt)) == [5, 6]
    torch.testing.assert_close(model.item_factors[5].detach(), before[2:4].mean(0))
    assert list(model.add_users(3, optimizer=opt)) == [6, 7, 8]
    assert (model.num_users, model.num_items) == (9, 7)
    assert opt.state[model.user_factors]["sum"].shape == (9, 3)
    assert model.user_factors[6:].abs().max() <= 0.05 + 1e-7  # the default init
    assert model(torch.tensor([8]), torch.tensor([6])).shape == (1,)
    with pytest.raises(ValueError, match="add_rows"):
        model.add_users(0)


def test_feature_vocabulary_survives_save_load(tmp_path):
    """A loaded Hybrid encodes a new user by feature names and recommends for it exactly
    as the saved model does."""
    import pandas as pd

    rng = np.random.default_rng(3)
    users = pd.DataFrame({"userId": np.arange(30) + 100,
                          "age": rng.choice(["young", "old", "mid"], 30),
                          "likes": ["|".join(rng.choice(list("abcde"), 2)) for _ in range(30)]})
    u = rng.integers(0, 30, 400) + 100
    i = rng.integers(0, 40, 400)
    data = fastmf.data.Interactions.from_arrays(u, i)
    feats = Features.from_pandas(users, "userId", id_map=data.user_map, categorical="age",
                                 multi="likes", kind="user")
    torch.manual_seed(0)
    model = Hybrid(data.num_users, data.num_items, dim=6, user_features=feats)
    fastmf.fit(model, data, loss="bpr", epochs=2, progress=False, seed=0)
    model.save(tmp_path / "h")
    loaded = fastmf.load(tmp_path / "h")
    new = pd.DataFrame({"age": ["old", "young"], "likes": ["a|c", "e"]})
    rows = loaded.features("user").transform(new)
    assert (rows != feats.transform(new)).nnz == 0
    top, scores = coldstart.recommend_from_features(loaded, rows, k=5)
    want_top, want_scores = coldstart.recommend_from_features(model, feats.transform(new), k=5)
    assert torch.equal(top, want_top)
    torch.testing.assert_close(scores, want_scores)
    with pytest.raises(ValueError, match=r"Hybrid\.features: the item side was built "
                                         "without fastmf.data.Features"):
        loaded.features("item")
    with pytest.raises(ValueError, match="side must be 'user' or 'item', got 'movie'"):
        loaded.features("movie")


def test_bad_vocabulary_in_config_is_refused(tmp_path):
    import json

    import pandas as pd

    table = pd.DataFrame({"movieId": [1, 2, 3], "genres": ["A|B", "B", "C"]})
    feats = Features.from_pandas(table, "movieId", multi="genres")
    model = Hybrid(2, 3, dim=2, item_features=feats)
    model.save(tmp_path / "h")
    config_file = tmp_path / "h" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["model"]["item_features"]["vocabulary"]["feature_names"] == [
        "genres=A", "genres=B", "genres=C"]
    config["model"]["item_features"]["vocabulary"]["feature_names"] = ["x", "y"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(fastmf.checkpoint.CheckpointError, match="vocabulary"):
        fastmf.load(tmp_path / "h")


def test_oversized_vocabulary_is_left_out_with_a_warning(monkeypatch):
    import pandas as pd

    from fastmf.models import hybrid

    table = pd.DataFrame({"movieId": [1, 2, 3], "genres": ["A|B", "B", "C"]})
    model = Hybrid(2, 3, dim=2, item_features=Features.from_pandas(table, "movieId",
                                                                   multi="genres"))
    assert "vocabulary" in model.get_config()["item_features"]
    monkeypatch.setattr(hybrid, "MAX_VOCABULARY_BYTES", 20)
    with pytest.warns(UserWarning, match="item feature vocabulary takes .* bytes"):
        config = model.get_config()
    assert "vocabulary" not in config["item_features"]
    assert Hybrid(**config).get_config()["item_features"]["num_features"] == 3


def _zipf_positions(rng, rows, shape):
    """Positions into ``rows`` distinct rows, Zipf-skewed (many repeats), every row used
    when there are enough draws."""
    draws = np.minimum(rng.zipf(1.3, size=int(np.prod(shape))) - 1, rows - 1)
    return torch.as_tensor(draws.reshape(shape), dtype=torch.int64)


def _rank_loss_autograd(p, bu, q, bi, user_at, pos_at, neg_at, loss, weights, reg, batch):
    """The ranking loss as the step wrote it before _RankLoss: gathers, broadcast dots,
    pairwise_loss / pointwise_loss / warp_term and the count-weighted penalty, all through
    autograd (``batch``: the B that WARP's mean and every penalty divide by)."""
    from fastmf.models.base import pairwise_loss, pointwise_loss
    from fastmf.recommender import warp_term

    size, n = neg_at.shape
    pu, b_u = p[user_at], bu[user_at]
    pos = (pu * q[pos_at]).sum(1) + b_u + bi[pos_at]
    neg = (pu.unsqueeze(1) * q[neg_at]).sum(2) + b_u.unsqueeze(1) + bi[neg_at]
    if loss == "warp":  # weights: the rank weights (all > 0: positives with a violator)
        value = warp_term(pos, neg[:, 0], weights) * (size / batch)
    elif loss == "bpr":
        value = pairwise_loss(pos, neg, "bpr", weights)
    else:
        labels = torch.cat([torch.ones_like(pos), torch.zeros(size * n, dtype=pos.dtype)])
        w = None if weights is None else torch.cat([weights, pos.new_ones(size * n)])
        value = pointwise_loss(torch.cat([pos, neg.reshape(-1)]), labels, "bce", w)
    if reg:
        user_count = torch.bincount(user_at, minlength=len(p)).to(p.dtype)
        item_count = torch.bincount(torch.cat([pos_at, neg_at.reshape(-1)]),
                                    minlength=len(q)).to(q.dtype)
        value = value + reg * ((user_count * (p.square().sum(1) + bu.square())).sum()
                               + (item_count * (q.square().sum(1) + bi.square())).sum()
                               ) / max(batch, 1)
    return value


@pytest.mark.parametrize("backend", fastmf.ops.available_backends())
@pytest.mark.parametrize("loss", ["bpr", "bce", "warp"])
@pytest.mark.parametrize("case", [
    dict(size=64, n=4, weights=False, reg=0.01),
    dict(size=33, n=1, weights=True, reg=0.0),
    dict(size=50, n=3, weights=True, reg=0.1),
    dict(size=1, n=2, weights=False, reg=0.01),
    dict(size=0, n=4, weights=False, reg=0.01),
    dict(size=9, n=0, weights=True, reg=0.01),
])
def test_rank_loss_matches_autograd(rng, backend, loss, case):
    # Hybrid's ranking step with its hand-written backward against the same loss through
    # autograd: the value and every gradient, repeated rows (Zipf positions), each backend's
    # scatter_rows, empty batches and no negatives. WARP's second pass scores one chosen
    # violator per positive with rank weights in (0, 10], over a batch of which these
    # positives are a part.
    from fastmf.models.hybrid import _RankLoss

    size, n = case["size"], case["n"]
    batch = size
    if loss == "warp":
        n, batch = 1, size + 5
    num_users, num_items, dim = 7, 23, 5
    leaves = [torch.as_tensor(rng.normal(size=shape), dtype=torch.float32)
              for shape in ((num_users, dim), (num_users,), (num_items, dim), (num_items,))]
    user_at = _zipf_positions(rng, num_users, (size,))
    pos_at = _zipf_positions(rng, num_items, (size,))
    neg_at = _zipf_positions(rng, num_items, (size, n))
    weights = (torch.as_tensor(rng.uniform(0.5, 3.0, size), dtype=torch.float32)
               if case["weights"] else None)
    if loss == "warp":
        weights = torch.as_tensor(rng.uniform(0.1, 10.0, size), dtype=torch.float32)
    kernels = fastmf.ops.kernels(backend, torch.device("cpu"), kernel="scatter_rows")
    ours = [t.clone().requires_grad_(True) for t in leaves]
    theirs = [t.clone().requires_grad_(True) for t in leaves]
    got = _RankLoss.apply(*ours, user_at, pos_at, neg_at, loss, weights, case["reg"], kernels,
                          batch)
    want = _rank_loss_autograd(*theirs, user_at, pos_at, neg_at, loss, weights, case["reg"],
                               batch)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, b in zip(ours, theirs, strict=True):
        expected = torch.zeros_like(b) if b.grad is None else b.grad
        torch.testing.assert_close(a.grad, expected, rtol=1e-5, atol=1e-6)
    if size * max(n, 1):
        assert any(a.grad.abs().sum() > 0 for a in ours)


@pytest.mark.parametrize("loss", ["bpr", "bce", "warp"])
def test_rank_loss_gradcheck(rng, loss):
    from fastmf.models.hybrid import _RankLoss

    kernels = fastmf.ops.kernels("reference", torch.device("cpu"), kernel="scatter_rows")
    leaves = [torch.as_tensor(rng.normal(size=shape), dtype=torch.float64).requires_grad_(True)
              for shape in ((4, 3), (4,), (9, 3), (9,))]
    user_at, pos_at = _zipf_positions(rng, 4, (6,)), _zipf_positions(rng, 9, (6,))
    neg_at = _zipf_positions(rng, 9, (6, 1 if loss == "warp" else 2))
    weights = torch.as_tensor(rng.uniform(0.5, 2.0, 6), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: _RankLoss.apply(*t, user_at, pos_at, neg_at, loss, weights, 0.05, kernels,
                                   8),
        leaves)


@pytest.mark.parametrize("backend", fastmf.ops.available_backends())
@pytest.mark.parametrize("loss", ["bpr", "bce", "warp"])
@pytest.mark.parametrize("case", [
    dict(size=48, n=3, weights=True, reg=0.01, ids=torch.int64, dtype=torch.float32),
    dict(size=31, n=1, weights=False, reg=0.0, ids=torch.int32, dtype=torch.float32),
    dict(size=40, n=2, weights=True, reg=0.05, ids=torch.int64, dtype=torch.bfloat16),
    dict(size=0, n=2, weights=False, reg=0.01, ids=torch.int64, dtype=torch.float32),
])
def test_step_without_graph_equals_backward_pass(rng, monkeypatch, backend, loss, case):
    # With every table updated in backward, Hybrid's ranking step forms the pooled rows'
    # gradients itself and hands them to the tables' optimizers: the same bits as the
    # backward pass through _RankLoss, step after step (Zipf ids with repeats, features on
    # both sides with repeated entries, per-interaction weights, int32/int64 ids, a
    # bfloat16 table with stochastic rounding, an empty batch).
    from fastmf.models import hybrid

    size, n = case["size"], case["n"]
    num_users, num_items = 9, 17
    torch.manual_seed(5)
    model = Hybrid(num_users, num_items, dim=5, backend=backend, dtype=case["dtype"],
                   user_features=Features.from_scipy(random_features(rng, num_users, 3)),
                   item_features=Features.from_scipy(random_features(rng, num_items, 6)),
                   init_scale=0.3)
    other, initial = copy.deepcopy(model), copy.deepcopy(model)
    make = lambda m: optim.apply_in_backward(optim.SparseAdagrad(  # noqa: E731
        list(m.parameters()), lr=0.1, backend=backend))
    ours, theirs = make(model), make(other)
    graph_free = hybrid.FeatureSide.updated_in_backward
    assert model.users.updated_in_backward() and model.items.updated_in_backward()
    for _ in range(3):
        batch = Batch(
            _zipf_positions(rng, num_users, (size,)).to(case["ids"]),
            _zipf_positions(rng, num_items, (size,)).to(case["ids"]),
            negatives=_zipf_positions(rng, num_items, (size, 10 if loss == "warp" else n)
                                      ).to(case["ids"]),
            weights=(torch.as_tensor(rng.uniform(0.5, 3.0, size), dtype=torch.float32)
                     if case["weights"] else None))
        monkeypatch.setattr(hybrid.FeatureSide, "updated_in_backward", graph_free)
        got, count = model.training_step(batch, ours, loss=loss, reg=case["reg"])
        monkeypatch.setattr(hybrid.FeatureSide, "updated_in_backward", lambda self: False)
        want, want_count = other.training_step(batch, theirs, loss=loss, reg=case["reg"])
        assert count == want_count
        assert torch.equal(got, want) and not got.requires_grad
        for a, b in zip(model.parameters(), other.parameters(), strict=True):
            assert a.grad is None and b.grad is None
            assert torch.equal(a.detach(), b.detach())
        states = ours.state_dict()["state"], theirs.state_dict()["state"]
        assert states[0].keys() == states[1].keys()
        for key, state in states[0].items():
            assert state.get("step") == states[1][key].get("step")
            assert torch.equal(state["sum"], states[1][key]["sum"])
    if size:  # the steps moved the tables
        assert not torch.equal(initial.items.table.weight, model.items.table.weight)
        assert not torch.equal(initial.users.table.weight, model.users.table.weight)


def test_step_with_tables_not_updated_in_backward(rng):
    # An optimizer that steps the tables from sparse gradients after backward (no
    # apply_in_backward): the step goes through the backward pass and gives the numbers
    # of the step in backward, within float32 rounding.
    torch.manual_seed(6)
    model = Hybrid(8, 15, dim=6, item_features=Features.from_scipy(random_features(rng, 15, 5)),
                   init_scale=0.3)
    other = copy.deepcopy(model)
    batch = Batch(torch.as_tensor(rng.integers(0, 8, 21)), torch.as_tensor(rng.integers(0, 15, 21)),
                  negatives=torch.as_tensor(rng.integers(0, 15, (21, 2))))
    plain = optim.SparseAdagrad(list(model.parameters()), lr=0.1)
    fused = optim.apply_in_backward(optim.SparseAdagrad(list(other.parameters()), lr=0.1))
    assert not model.items.updated_in_backward() and other.items.updated_in_backward()
    model.training_step(batch, plain, loss="bpr", reg=0.01)
    other.training_step(batch, fused, loss="bpr", reg=0.01)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.items.table.weight, Hybrid(8, 15, dim=6).items.table.weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_fit_on_the_device_trains_as_on_the_cpu(rng, device, loss):
    """Hybrid with item features moved to ``device`` and fit there (unique_bags, the bag
    kernels, the rank loss, the four fused updates) trains as it does on the CPU: the same
    batches and negatives, so only float32 summation order differs; and the same bits
    when fit there twice."""
    data = fastmf.datasets.synthetic(num_users=60, num_items=40, num_interactions=900,
                                     implicit=True, seed=2)
    itf = Features.from_scipy(random_features(rng, 40, 6), id_map=data.item_map)

    def fit(dev):
        torch.manual_seed(0)
        model = Hybrid(data.num_users, data.num_items, dim=8, item_features=itf).to(dev)
        history = fastmf.fit(model, data, loss=loss, epochs=2, seed=3, progress=False)
        fastmf.ops.check_device_errors()
        return model, history

    (got, got_history), (want, want_history) = fit(device), fit("cpu")
    again, _ = fit(device)
    for name, w in want.state_dict().items():
        g = got.state_dict()[name]
        assert g.device.type == device, name
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4, msg=name)
        # Every sum of the step has a fixed order on the device too (the bias gradients
        # through add_rows, not index_add_'s atomics): a second fit gives the same bits.
        assert torch.equal(again.state_dict()[name], g), name
    assert got_history["loss"] == pytest.approx(want_history["loss"], rel=1e-4)
    users = torch.arange(5)
    torch.testing.assert_close(got.recommend(users, k=5)[1].cpu(),
                               want.recommend(users, k=5)[1], rtol=1e-4, atol=1e-4)


def test_scores_of_good_ids_in_every_form_equal_numpy_lightfm(rng):
    model, (p, bu, q, bi) = random_hybrid(rng, 4, 11, 13, 3)
    users = (rng.zipf(1.4, 250) - 1) % 11
    items = (rng.zipf(1.4, 250) - 1) % 13
    users[:2], items[:2] = [0, 10], [12, 0]
    assert np.bincount(users).max() > 30  # duplicates, skewed
    expected = (p[users] * q[items]).sum(1) + bu[users] + bi[items]
    assert np.all(np.abs(expected) > 1e-6)
    reference = model.predict(torch.as_tensor(users), torch.as_tensor(items))
    for form in ID_FORMS:
        got = model.predict(form(users), form(items))
        assert torch.equal(got, reference)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)
        vectors, offset = model.user_vectors(form(users))
        np.testing.assert_allclose(vectors.detach().double().numpy(), p[users], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(offset.detach().double().numpy(), bu[users], rtol=1e-5,
                                   atol=1e-6)
    grid = model.score_items(users[:4].tolist(), items[:6].astype(np.int32))
    np.testing.assert_allclose(grid.detach().double().numpy(),
                               p[users[:4]] @ q[items[:6]].T + bu[users[:4], None]
                               + bi[items[:6]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("users, items, error, match", [
    ([-1], [0], IndexError, r"users id -1 out of range \[0, 6\)"),
    ([6], [0], IndexError, r"users id 6 out of range \[0, 6\)"),
    ([0], [-1], IndexError, r"items id -1 out of range \[0, 10\)"),
    (torch.tensor([0.9]), torch.tensor([1.9]), TypeError,
     "users must be int32 or int64, got torch.float32"),
    (torch.tensor([0]), torch.tensor([1.9], dtype=torch.float64), TypeError,
     "items must be int32 or int64, got torch.float64"),
    ([0.9], [1], TypeError, "users must be integer ids, got dtype float64"),
    ([0], [0, 1, 2], ValueError, r"lengths differ \(users has 1, items has 3\)"),
    (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), ValueError,
     r"users must be 1-D, got shape \(2, 1\)"),
])
def test_bad_scoring_ids_raise_as_mf_does(rng, users, items, error, match):
    # 0.9 and 1.9 used to score user 0 and item 1.
    model = Hybrid(6, 10, dim=3, item_features=random_features(rng, 10, 4))
    for call in (model.predict, model.forward):
        with pytest.raises(error, match=r"^fastmf\.models\.Hybrid\.forward: " + match):
            call(users, items)
    if match.startswith("users"):
        with pytest.raises(error, match=r"^fastmf\.models\.Hybrid\.user_vectors: " + match):
            model.user_vectors(users)
