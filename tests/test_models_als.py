"""fastmf.models.ALS and the per-interaction weights of fastmf.data.Interactions."""

import numba
import numpy as np
import pytest
import torch
from _ids import ID_FORMS

from fastmf.data import Interactions, leave_one_out
from fastmf.models.als import ALS


def random_problem(seed, num_users=25, num_items=30, density=0.25, counts=True):
    rng = np.random.default_rng(seed)
    mask = rng.random((num_users, num_items)) < density
    mask[0] = False  # a user without items
    mask[1:, 0] = False  # an item without users
    users, items = np.nonzero(mask)
    ratings = rng.integers(1, 30, len(users)).astype(np.float64) if counts else None
    return Interactions(users, items, ratings, user_map=num_users, item_map=num_items)


def direct_solution(fixed, conf_matrix, reg_rows):
    """Each row's exact minimiser: (F^T C_r F + reg_r I)^-1 F^T C_r p_r in float64, with
    C_r the row's confidences (1 where unobserved) and p_r = 1 exactly where observed."""
    fixed = fixed.astype(np.float64)
    out = np.zeros((conf_matrix.shape[0], fixed.shape[1]))
    for r, conf in enumerate(conf_matrix):
        observed = ~np.isnan(conf)
        if not observed.any():
            continue
        c = np.where(observed, conf, 1.0)
        a = fixed.T @ (c[:, None] * fixed) + reg_rows[r] * np.eye(fixed.shape[1])
        out[r] = np.linalg.solve(a, fixed.T @ (c * observed))
    return out


def confidence_matrix(data, values):
    """(users, items) with each observed pair's confidence, NaN where unobserved."""
    out = np.full(data.shape, np.nan)
    out[data.users, data.items] = values
    return out


def make(data, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ALS(data.num_users, data.num_items, **kwargs)


def test_sweep_equals_weighted_least_squares_per_row():
    data = random_problem(1).with_confidence(alpha=2.0, eps=3.0)
    model = make(data, dim=5, reg=0.3, cg_steps=40)
    items_before = model.item_factors.numpy().copy()
    model.fit_epoch(data)
    conf = confidence_matrix(data, data.weights)
    expected_users = direct_solution(items_before, conf, np.full(data.num_users, 0.3))
    np.testing.assert_allclose(model.user_factors.numpy(), expected_users, rtol=1e-4,
                               atol=1e-6)
    # The item half of the sweep solves from the new user factors.
    expected_items = direct_solution(model.user_factors.numpy(), conf.T,
                                     np.full(data.num_items, 0.3))
    np.testing.assert_allclose(model.item_factors.numpy(), expected_items, rtol=1e-4,
                               atol=1e-6)
    assert np.abs(expected_users).max() > 1e-3  # not a trivial all-zero solution
    assert not model.user_factors[0].any() and not model.item_factors[0].any()


def test_binary_data_gets_confidence_one_plus_alpha():
    data = random_problem(2, counts=False)
    model = make(data, dim=4, reg=0.1, alpha=7.0, cg_steps=30)
    items_before = model.item_factors.numpy().copy()
    model.fit_epoch(data)
    expected = direct_solution(items_before, confidence_matrix(data, 8.0),
                               np.full(data.num_users, 0.1))
    np.testing.assert_allclose(model.user_factors.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_confidence_weights_are_used():
    data = random_problem(3)
    flat = data.with_weights(np.full(len(data), 4.0))
    varied = data.with_confidence(alpha=3.0)
    a, b, c = (make(d, dim=6, alpha=3.0) for d in (data.with_weights(None), flat, varied))
    for model, d in ((a, data.with_weights(None)), (b, flat), (c, varied)):
        model.fit_epoch(d)
    # Weights 1 + alpha everywhere are the binary model; counts move the solution.
    np.testing.assert_allclose(a.user_factors.numpy(), b.user_factors.numpy(), rtol=1e-5,
                               atol=1e-7)
    assert np.abs(c.user_factors.numpy() - a.user_factors.numpy()).max() > 1e-3


def test_frequency_scaled_regularisation():
    data = random_problem(4)
    model = make(data, dim=4, reg=0.02, alpha=5.0, reg_exponent=1.0, cg_steps=30)
    items_before = model.item_factors.numpy().copy()
    model.fit_epoch(data.with_weights(None))
    n_u = np.bincount(data.users, minlength=data.num_users)
    expected = direct_solution(items_before, confidence_matrix(data, 6.0),
                               0.02 * (n_u + data.num_items / 5.0))
    np.testing.assert_allclose(model.user_factors.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_duplicate_rows_count_once_with_the_pairs_confidence():
    data = random_problem(5)
    twice = Interactions(np.r_[data.users, data.users[:10]], np.r_[data.items, data.items[:10]],
                         np.r_[data.ratings, data.ratings[:10]], user_map=data.num_users,
                         item_map=data.num_items)
    once = data.with_confidence(alpha=1.5)
    # with_confidence sums a pair's counts over its rows.
    summed = data.ratings.copy()
    summed[:10] *= 2
    expected_conf = 1 + 1.5 * np.log1p(summed)
    np.testing.assert_allclose(once.with_confidence(alpha=1.5, counts=summed).weights,
                               expected_conf, rtol=1e-6)
    a, b = make(data, dim=4), make(data, dim=4)
    a.fit_epoch(twice.with_confidence(alpha=1.5))
    b.fit_epoch(data.with_confidence(alpha=1.5, counts=summed))
    np.testing.assert_array_equal(a.user_factors.numpy(), b.user_factors.numpy())


def test_objective_is_reported_and_falls():
    data = random_problem(6).with_confidence(alpha=2.0)
    model = make(data, dim=4, reg=0.5, cg_steps=20)
    losses = [model.fit_epoch(data)["loss"] for _ in range(4)]
    # Brute force: every pair's weighted squared error plus the penalties.
    x, y = model.user_factors.numpy().astype(np.float64), model.item_factors.numpy()
    conf = confidence_matrix(data, data.weights)
    observed = ~np.isnan(conf)
    s = x @ y.T.astype(np.float64)
    total = (np.where(observed, conf, 1.0) * (observed - s) ** 2).sum()
    total += 0.5 * (np.square(x).sum() + np.square(y.astype(np.float64)).sum())
    assert model.objective(data) == pytest.approx(total, rel=1e-5)
    assert losses[-1] * len(data) == pytest.approx(total, rel=1e-5)
    # Exact alternating solves never increase the objective.
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False))


def test_deterministic_and_thread_count_independent():
    data = random_problem(7, num_users=60, num_items=50).with_confidence(alpha=4.0)
    results = []
    threads = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(n)
            model = make(data, seed=3, dim=8)
            for _ in range(3):
                model.fit_epoch(data)
            results.append(model.state_dict())
    finally:
        numba.set_num_threads(threads)
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=0)


def test_learns_held_out_preferences():
    from fastmf.datasets import synthetic
    from fastmf.metrics import ranking_metrics

    data = synthetic(300, 200, 8_000, dim=4, implicit=True, seed=11)
    train, test = leave_one_out(data, by="time")
    model = make(train, dim=8, reg=1.0, alpha=5.0)
    for _ in range(8):
        model.fit_epoch(train)
    scores = model.user_factors.numpy() @ model.item_factors.numpy().T
    indptr, indices = train.positive_structure()
    for u in range(train.num_users):
        scores[u, indices[indptr[u]:indptr[u + 1]]] = -np.inf
    users = np.unique(test.users)
    top = np.argsort(-scores[users], axis=1, kind="stable")[:, :10]
    rng = np.random.default_rng(0)
    random_top = np.stack([rng.permutation(train.num_items)[:10] for _ in users])
    learned = ranking_metrics(top, test, k=10, users=users)["hr@10"]
    chance = ranking_metrics(random_top, test, k=10, users=users)["hr@10"]
    assert learned > 2 * chance and learned > 0.15
    # forward is the dot product the ranking used.
    u, i = torch.tensor([1, 2, 5]), torch.tensor([3, 4, 0])
    expected = (model.user_factors[u] * model.item_factors[i]).sum(1)
    torch.testing.assert_close(model(u, i), expected)
    assert model(u, i).abs().max() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(reg=-1.0), "reg must be a finite number >= 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(cg_steps=0), "cg_steps must be an int >= 1"),
    (dict(dim=2.5), "dim must be an int"),
    (dict(reg_exponent=1.0, alpha=0.0), "reg_exponent > 0 needs alpha > 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALS(10, 10, **kwargs)


def test_bad_data():
    data = random_problem(8)
    with pytest.raises(ValueError, match=r"fastmf.models.ALS: train has 25 users x 30 items "
                                         r"but the model has 25 x 31"):
        ALS(25, 31).fit_epoch(data)
    with pytest.raises(TypeError, match="must be fastmf.data.Interactions"):
        ALS(25, 30).fit_epoch(np.ones((25, 30)))


# ------------------------------------------------------------------ Interactions weights


def test_weights_follow_subsets_and_splits():
    rng = np.random.default_rng(9)
    users = rng.integers(0, 20, 300)
    items = rng.integers(0, 40, 300)
    weights = rng.random(300).astype(np.float32) * 5
    data = Interactions(users, items, timestamps=rng.permutation(300), weights=weights)
    assert "weights=yes" in repr(data)
    rows = rng.permutation(300)[:50]
    np.testing.assert_array_equal(data.subset(rows).weights, weights[rows])
    train, test = leave_one_out(data, by="time")
    by_row = dict(zip(zip(data.timestamps.tolist(), users.tolist(), strict=True),
                      weights.tolist(), strict=True))
    for part in (train, test):
        keys = zip(part.timestamps.tolist(), part.users.tolist(), strict=True)
        np.testing.assert_array_equal(part.weights, np.float32([by_row[k] for k in keys]))
    assert data.to_pandas()["weight"].tolist() == weights.tolist()
    assert data.with_weights(None).weights is None
    assert Interactions(users, items).weights is None


def test_with_confidence_formula():
    rng = np.random.default_rng(10)
    counts = rng.integers(0, 50, 200).astype(np.float64)
    data = Interactions(np.arange(200) // 10, np.arange(200) % 10, ratings=counts)
    out = data.with_confidence(alpha=3.0, eps=2.5)
    np.testing.assert_allclose(out.weights, 1 + 3.0 * np.log1p(counts / 2.5), rtol=1e-6)
    assert out.ratings is data.ratings and data.weights is None  # a copy, data unchanged
    other = data.with_confidence(alpha=0.5, counts=counts[::-1].copy())
    np.testing.assert_allclose(other.weights, 1 + 0.5 * np.log1p(counts[::-1]), rtol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda d: Interactions([0, 1], [0, 1], weights=[1.0, -2.0]), ValueError,
     r"fastmf.Interactions: weights must be finite and >= 0; 1 are not \(first at row 1"),
    (lambda d: Interactions([0, 1], [0, 1], weights=[np.nan, 1.0]), ValueError,
     r"weights must be finite and >= 0; 1 are not \(first at row 0: nan"),
    (lambda d: Interactions([0, 1], [0, 1], weights=[1.0]), ValueError, "mismatched lengths"),
    (lambda d: d.with_weights([1.0]), ValueError, "with_weights: weights has 1 values for 3"),
    (lambda d: d.with_weights(["a", "b", "c"]), TypeError, "weights must be numbers"),
    (lambda d: d.with_confidence(counts=[1.0, -1.0, 2.0]), ValueError,
     r"with_confidence: counts must be finite and >= 0; 1 are not \(first at row 1: -1.0"),
    (lambda d: d.with_confidence(counts=[1.0, np.nan, 2.0]), ValueError,
     r"counts must be finite and >= 0; 1 are not \(first at row 1: nan"),
    (lambda d: d.with_confidence(alpha=-1.0), ValueError, "alpha must be a finite number >= 0"),
    (lambda d: d.with_confidence(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda d: Interactions([0, 1], [0, 1]).with_confidence(), ValueError,
     "no ratings column to use as counts"),
    (lambda d: Interactions([0, 1], [0, 1], ratings=[2.0, -3.0]).with_confidence(), ValueError,
     r"ratings \(used as counts\) must be finite and >= 0"),
])
def test_bad_weights(call, error, match):
    data = Interactions([0, 1, 1], [0, 1, 2], ratings=[1.0, 2.0, 3.0])
    with pytest.raises(error, match=match):
        call(data)


def test_protocol_hooks_run_one_sweep_per_epoch_and_serving_works():
    data = random_problem(12, num_users=40, num_items=35).with_confidence(alpha=2.0)
    a, b = make(data, seed=5, dim=6), make(data, seed=5, dim=6)
    optimizer = b.make_optimizer(None, 0.1)
    for _ in range(2):
        a.fit_epoch(data)
        steps = [b.training_step(batch, optimizer, loss="bce", reg=0.0)
                 for batch in b.batches(data, batch_size=7, loss="bce", num_negatives=4,
                                        sampler=None, generator=torch.Generator())]
        assert len(steps) == 1 and steps[0][1] == len(data)
    torch.testing.assert_close(a.user_factors, b.user_factors, rtol=0, atol=0)
    assert steps[0][0].item() == pytest.approx(b.objective(data) / len(data), rel=1e-6)
    optimizer.step()  # a stray step changes nothing: ALS takes no gradient steps
    torch.testing.assert_close(a.user_factors, b.user_factors, rtol=0, atol=0)
    assert optimizer.state_dict()["state"] == {}
    # Serving from the base class: the top items by <x_u, y_i>, training items left out.
    b.attach_data(data)
    items, _ = b.recommend(torch.arange(1, 6), k=5, exclude=data)
    scores = (b.user_factors @ b.item_factors.T).numpy()
    scores[data.users, data.items] = -np.inf
    expected = np.argsort(-scores[1:6], axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(items.numpy(), expected)
    assert b.similar_items([3], k=4)[0].shape == (1, 4)
    assert b.get_config()["dim"] == 6 and type(b)(**b.get_config()).dim == 6


def test_fastmf_fit_runs_one_sweep_per_epoch():
    import fastmf

    data = random_problem(13, num_users=30, num_items=20).with_confidence(alpha=1.0)
    a, b = make(data, seed=2, dim=4), make(data, seed=2, dim=4)
    history = fastmf.fit(a, data, epochs=3, progress=False)
    losses = [b.fit_epoch(data)["loss"] for _ in range(3)]
    torch.testing.assert_close(a.item_factors, b.item_factors, rtol=0, atol=0)
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-6)
    assert a.item_map is data.item_map  # prepare() ran: raw ids and popularity for serving


def zipf_ids(rng, n, size):
    """``size`` ids in [0, n), Zipf-skewed (many duplicates) from 1 on, with 0 and n - 1
    first."""
    ids = (rng.zipf(1.4, size) % n)
    ids[:2] = [0, n - 1]
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_of_good_ids_are_the_dot_products_of_the_tables(dtype):
    data = random_problem(14, num_users=30, num_items=25).with_confidence(alpha=2.0)
    model = make(data, seed=3, dim=5, dtype=dtype)
    model.fit(data, epochs=2)
    rng = np.random.default_rng(8)
    users, items = zipf_ids(rng, 30, 400), zipf_ids(rng, 25, 400)
    assert np.bincount(users).max() > 50  # duplicates, skewed
    u, i = torch.as_tensor(users), torch.as_tensor(items)
    x, y = model.user_factors.detach(), model.item_factors.detach()
    exact = (x[u] * y[i]).sum(-1)  # what forward computed before its ids were checked
    brute = np.einsum("bd,bd->b", x.double().numpy()[users], y.double().numpy()[items])
    # user 0 and item 0 have no data (random_problem), so their rows stay near zero
    trained = (users > 0) & (items > 0)
    assert trained.sum() > 300 and np.all(np.abs(brute[trained]) > 1e-6)
    for form in ID_FORMS:
        got = model.predict(form(users), form(items))
        assert got.dtype == dtype and torch.equal(got, exact)
        np.testing.assert_allclose(got.double().numpy(), brute, rtol=1e-5, atol=1e-7)
        vectors, offset = model.user_vectors(form(users))
        assert offset is None and torch.equal(vectors, x[u])
    grid = model.score_items(users[:6].tolist(), items[:8].astype(np.int32))
    np.testing.assert_allclose(grid.double().numpy(),
                               x.double().numpy()[users[:6]] @ y.double().numpy()[items[:8]].T,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("users, items, error, match", [
    ([-1], [0], IndexError, r"users id -1 out of range \[0, 30\)"),
    ([30], [0], IndexError, r"users id 30 out of range \[0, 30\)"),
    ([0], [-1], IndexError, r"items id -1 out of range \[0, 25\)"),
    ([0], [25], IndexError, r"items id 25 out of range \[0, 25\)"),
    (torch.tensor([0.9]), torch.tensor([0]), TypeError,
     "users must be int32 or int64, got torch.float32"),
    ([0.9], [0], TypeError, "users must be integer ids, got dtype float64"),
    ([0], [0, 1, 2], ValueError, r"lengths differ \(users has 1, items has 3\)"),
    (0, 0, ValueError, r"users must be 1-D, got shape \(\)"),
])
def test_bad_ids_raise_as_mf_does(users, items, error, match):
    # -1 used to score user 29, 0.9 user 0, and [0] against [0, 1, 2] broadcast.
    data = random_problem(15, num_users=30, num_items=25)
    model = make(data, dim=4)
    model.fit(data, epochs=1)
    for call in (model.predict, model.forward):
        with pytest.raises(error, match=r"^fastmf\.models\.ALS\.forward: " + match):
            call(users, items)
    if match.startswith("users") and not isinstance(users, int):
        with pytest.raises(error, match=r"^fastmf\.models\.ALS\.user_vectors: " + match):
            model.user_vectors(users)
