"""fastmf.models.coldstart.fold_in shrunk toward the population prior: the closed form
against a direct numpy solve of the shrunk ridge, the prior itself with no known item, the
ranking-loss steps, user_prior, determinism, bad input."""

import warnings

import numpy as np
import pytest
import torch

import fastmf
from fastmf.models import coldstart


@pytest.fixture
def rng():
    return np.random.default_rng(20261130)


def random_mf(rng, num_users=40, num_items=50, dim=6, mu=3.2):
    """An MF whose tables are fresh random draws, with a user-bias mean away from 0 and a
    mean user vector away from 0 (so the two priors differ)."""
    model = fastmf.MF(num_users, num_items, dim=dim, global_mean=mu)
    with torch.no_grad():
        model.user_factors.copy_(torch.as_tensor(rng.normal(0.4, 1.0, (num_users, dim))))
        model.item_factors.copy_(torch.as_tensor(rng.normal(0.0, 1.0, (num_items, dim))))
        model.user_bias.copy_(torch.as_tensor(rng.normal(0.5, 0.3, num_users)))
        model.item_bias.copy_(torch.as_tensor(rng.normal(0.0, 0.5, num_items)))
    return model


def numpy_shrunk_ridge(model, items, targets, reg, p_bar, b_bar):
    """argmin_{p, b_u} Σ (r - mu - b_i - <p, q_i> - b_u)² + reg (|p - p̄|² + (b_u - b̄)²),
    solved directly from the normal equations in float64."""
    q = model.item_factors.detach().double().numpy()[items]
    b = model.item_bias.detach().double().numpy()[items]
    x = np.hstack([q, np.ones((len(items), 1))])
    w_bar = np.append(p_bar, b_bar)
    lhs = x.T @ x + reg * np.eye(x.shape[1])
    rhs = x.T @ (targets - model.mu - b) + reg * w_bar
    w = np.linalg.solve(lhs, rhs)
    return w[:-1], model.mu + w[-1]


@pytest.mark.parametrize("prior", ["mean", "zero"])
@pytest.mark.parametrize("n", [1, 3, 20])
def test_closed_form_matches_numpy_shrunk_ridge(rng, prior, n):
    model = random_mf(rng)
    items = rng.choice(50, n, replace=False)
    ratings = rng.uniform(1, 5, n)
    reg = float(rng.uniform(0.2, 3.0))
    p = model.user_factors.detach().double().numpy()
    bu = model.user_bias.detach().double().numpy()
    p_bar, b_bar = (p.mean(0), bu.mean()) if prior == "mean" else (np.zeros(6), 0.0)
    want_vec, want_off = numpy_shrunk_ridge(model, items, ratings, reg, p_bar, b_bar)
    vec, off = coldstart.fold_in(model, items, ratings=ratings, reg=reg, prior=prior)
    np.testing.assert_allclose(vec.double().numpy(), want_vec, rtol=1e-5, atol=1e-5)
    assert off == pytest.approx(want_off, abs=1e-5)
    # Implicit feedback: every target is 1.
    want_vec, want_off = numpy_shrunk_ridge(model, items, np.ones(n), reg, p_bar, b_bar)
    vec, off = coldstart.fold_in(model, items, loss="mse", reg=reg, prior=prior)
    np.testing.assert_allclose(vec.double().numpy(), want_vec, rtol=1e-5, atol=1e-5)
    assert off == pytest.approx(want_off, abs=1e-5)


def test_shrinkage_limits(rng):
    model = random_mf(rng)
    p_bar, off_bar = coldstart.user_prior(model)
    items = rng.choice(50, 4, replace=False)
    ratings = rng.uniform(1, 5, 4)
    vec, off = coldstart.fold_in(model, items, ratings=ratings, reg=1e9)
    np.testing.assert_allclose(vec.double().numpy(), p_bar.numpy(), atol=1e-6)
    assert off == pytest.approx(off_bar, abs=1e-6)
    # Enough data and no penalty: the prior does not matter.
    items = rng.choice(50, 30, replace=False)
    ratings = rng.uniform(1, 5, 30)
    mean = coldstart.fold_in(model, items, ratings=ratings, reg=1e-10, prior="mean")
    zero = coldstart.fold_in(model, items, ratings=ratings, reg=1e-10, prior="zero")
    torch.testing.assert_close(mean[0], zero[0], rtol=1e-4, atol=1e-4)
    assert mean[1] == pytest.approx(zero[1], abs=1e-4)
    # With little data they do differ.
    mean = coldstart.fold_in(model, items[:2], ratings=ratings[:2], reg=1.0, prior="mean")
    zero = coldstart.fold_in(model, items[:2], ratings=ratings[:2], reg=1.0, prior="zero")
    assert float((mean[0] - zero[0]).abs().max()) > 0.05


def test_user_prior_is_the_mean_user(rng):
    model = random_mf(rng)
    p = model.user_factors.detach().double().numpy()
    bu = model.user_bias.detach().double().numpy()
    vec, off = coldstart.user_prior(model)
    np.testing.assert_allclose(vec.numpy(), p.mean(0), rtol=1e-6, atol=1e-7)
    assert off == pytest.approx(model.mu + bu.mean(), abs=1e-6)
    some = rng.choice(40, 7, replace=False)
    vec, off = coldstart.user_prior(model, some)
    np.testing.assert_allclose(vec.numpy(), p[some].mean(0), rtol=1e-6, atol=1e-7)
    assert off == pytest.approx(model.mu + bu[some].mean(), abs=1e-6)
    # Any dot-product model: the mean of user_vectors (Hybrid: pooled vectors and biases).
    torch.manual_seed(5)
    hybrid = fastmf.models.Hybrid(9, 12, dim=4, init_scale=1.0)
    with torch.no_grad():
        hybrid.users.bias.weight.uniform_(-1, 1)
        uv, ub = hybrid.user_vectors(torch.arange(9))
    vec, off = coldstart.user_prior(hybrid)
    np.testing.assert_allclose(vec.numpy(), uv.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
    assert off == pytest.approx(float(ub.double().mean()), abs=1e-6)


def test_no_known_item_gives_the_prior(rng):
    model = random_mf(rng)
    p_bar, off_bar = coldstart.user_prior(model)
    vec, off = coldstart.fold_in(model, np.zeros(0, np.int64))
    np.testing.assert_allclose(vec.double().numpy(), p_bar.numpy(), rtol=1e-6, atol=1e-6)
    assert off == pytest.approx(off_bar)
    assert vec.dtype == model.item_factors.dtype
    for loss in ("bpr", "bce"):
        vec, _ = coldstart.fold_in(model, [], loss=loss)
        np.testing.assert_allclose(vec.double().numpy(), p_bar.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"fold_in: no known item .* no prior"):
        coldstart.fold_in(model, [], prior="zero")
    # recommend_new_user answers with the prior's ranking, and says so.
    model.item_popularity = rng.permutation(50)
    q = model.item_factors.detach().double()
    want = torch.topk(q @ p_bar + model.item_bias.detach().double(), 5).indices
    with pytest.warns(coldstart.PopularityFallbackWarning, match="population prior"):
        top, scores = coldstart.recommend_new_user(model, [], k=5)
    assert top.tolist() == want.tolist()
    assert torch.all(scores[:-1] >= scores[1:])
    with pytest.warns(coldstart.PopularityFallbackWarning, match="popular-items fallback"):
        top, _ = coldstart.recommend_new_user(model, [], k=5, prior="zero")
    assert top.tolist() == np.argsort(-model.item_popularity, kind="stable")[:5].tolist()


class ItemsOnly:
    """A dot-product scorer with item vectors and no user vectors."""

    num_items = 30

    def __init__(self, rng):
        self.q = torch.as_tensor(rng.normal(size=(30, 4)), dtype=torch.float32)
        self.b = torch.as_tensor(rng.normal(size=30), dtype=torch.float32)
        self.item_popularity = rng.permutation(30)

    def item_vectors(self):
        return self.q, self.b


def test_model_without_user_vectors_shrinks_to_zero(rng):
    model = ItemsOnly(rng)
    assert coldstart.user_prior(model) is None
    items = rng.choice(30, 3, replace=False)
    ratings = rng.uniform(1, 5, 3)
    mean = coldstart.fold_in(model, items, ratings=ratings, reg=0.7, prior="mean")
    zero = coldstart.fold_in(model, items, ratings=ratings, reg=0.7, prior="zero")
    torch.testing.assert_close(mean[0], zero[0])
    with pytest.raises(ValueError, match="no known item"):
        coldstart.fold_in(model, [])
    with pytest.warns(coldstart.PopularityFallbackWarning, match="popular-items fallback"):
        top, _ = coldstart.recommend_new_user(model, [], k=4)
    assert top.tolist() == np.argsort(-model.item_popularity, kind="stable")[:4].tolist()


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_ranking_steps_start_at_and_shrink_to_the_prior(rng, loss):
    model = random_mf(rng)
    p_bar, _ = coldstart.user_prior(model)
    items = rng.choice(50, 3, replace=False)
    # Overwhelming penalty: Adam's steps (each about lr per coordinate) cannot leave p̄.
    vec, _ = coldstart.fold_in(model, items, loss=loss, reg=1e6, lr=1e-3, steps=40)
    assert float((vec.double() - p_bar).abs().max()) < 5e-3
    vec, _ = coldstart.fold_in(model, items, loss=loss, reg=1e6, lr=1e-3, steps=40,
                               prior="zero")
    assert float(vec.abs().max()) < 5e-3
    # Weak penalty: the data moves it away, toward the known items.
    free, _ = coldstart.fold_in(model, items, loss=loss, reg=1e-3, steps=200)
    q = model.item_factors.detach()
    assert float((free.double() - p_bar).norm()) > 0.5
    assert float((q[items] @ free).mean()) > float((q[items] @ p_bar.float()).mean())
    # A precomputed prior equals "mean".
    given = coldstart.fold_in(model, items, loss=loss, reg=0.3, steps=20,
                              prior=coldstart.user_prior(model))
    default = coldstart.fold_in(model, items, loss=loss, reg=0.3, steps=20)
    assert torch.equal(given[0], default[0]) and given[1] == default[1]


def test_ranking_pull_fades_with_more_items(rng):
    """The loss is summed over the known items: more of them, further from the prior."""
    model = random_mf(rng, num_items=200)
    p_bar, _ = coldstart.user_prior(model)
    planted = torch.as_tensor(rng.normal(size=6), dtype=torch.float32)
    liked = torch.topk(model.item_factors.detach() @ planted, 40).indices.numpy()
    liked = rng.permutation(liked)
    dist = []
    for n in (1, 40):
        vec, _ = coldstart.fold_in(model, liked[:n], loss="bpr", reg=3.0, steps=300)
        dist.append(float((vec.double() - p_bar).norm()))
    assert dist[1] > 2 * dist[0]


def test_deterministic_given_seed(rng):
    model = random_mf(rng)
    items = rng.choice(50, 5, replace=False)
    a = coldstart.fold_in(model, items, loss="bpr", reg=0.1, seed=3)
    b = coldstart.fold_in(model, items, loss="bpr", reg=0.1, seed=3)
    c = coldstart.fold_in(model, items, loss="bpr", reg=0.1, seed=4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    ratings = rng.uniform(1, 5, 5)
    a = coldstart.fold_in(model, items, ratings=ratings)
    b = coldstart.fold_in(model, items, ratings=ratings)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_bad_input(rng):
    model = random_mf(rng)
    items = rng.choice(50, 3, replace=False)
    with pytest.raises(ValueError, match=r"fold_in: prior must be 'mean', 'zero' .* 'median'"):
        coldstart.fold_in(model, items, prior="median")
    with pytest.raises(ValueError, match=r"fold_in: prior must be .* got a Tensor"):
        coldstart.fold_in(model, items, prior=torch.zeros(6))
    with pytest.raises(ValueError, match=r"fold_in: the prior vector has shape \(5,\)"):
        coldstart.fold_in(model, items, prior=(np.ones(5), 0.0))
    with pytest.raises(ValueError, match="fold_in: the prior holds NaN"):
        coldstart.fold_in(model, items, prior=(np.full(6, np.nan), 0.0))
    with pytest.raises(ValueError, match="fold_in: the prior holds NaN"):
        coldstart.fold_in(model, items, prior=(np.ones(6), float("inf")))
    with pytest.raises(ValueError, match=r"fold_in: reg must be finite and >= 0, got -1"):
        coldstart.fold_in(model, items, reg=-1.0)
    with pytest.raises(ValueError, match="recommend_new_user: prior must be"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coldstart.recommend_new_user(model, [], prior="median")
    with pytest.raises(IndexError, match=r"user_prior: user index 40 out of range \[0, 40\)"):
        coldstart.user_prior(model, [3, 40])
    with pytest.raises(TypeError, match="user_prior: users must be integer"):
        coldstart.user_prior(model, [0.5])
    with pytest.raises(ValueError, match="user_prior: users is empty"):
        coldstart.user_prior(model, np.zeros(0, np.int64))


def test_default_strength_depends_on_the_loss(rng):
    model = random_mf(rng)
    items = rng.choice(50, 4, replace=False)
    ratings = rng.uniform(1, 5, 4)
    default = coldstart.fold_in(model, items, ratings=ratings)
    given = coldstart.fold_in(model, items, ratings=ratings, reg=0.1)
    assert torch.equal(default[0], given[0]) and default[1] == given[1]
    for loss in ("bpr", "bce"):
        default = coldstart.fold_in(model, items, loss=loss, steps=10)
        given = coldstart.fold_in(model, items, loss=loss, steps=10, reg=0.3)
        other = coldstart.fold_in(model, items, loss=loss, steps=10, reg=0.1)
        assert torch.equal(default[0], given[0])
        assert not torch.equal(default[0], other[0])


def test_no_known_item_without_item_vectors_is_popularity(rng):
    mlp = fastmf.models.MLP(4, 30, layers=(8, 4))
    mlp.item_popularity = rng.permutation(30)
    with pytest.warns(coldstart.PopularityFallbackWarning, match="popular-items fallback"):
        top, _ = coldstart.recommend_new_user(mlp, [], k=3)
    assert top.tolist() == np.argsort(-mlp.item_popularity, kind="stable")[:3].tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(lr="0.1"), "lr must be a finite number > 0, got '0.1'"),
    (dict(lr=True), "lr must be a finite number > 0, got True"),
    (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
    (dict(seed=1.5), "seed must be an int >= 0, got 1.5"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
])
def test_fold_in_checks_lr_and_seed(kwargs, message):
    """lr=inf folded in a NaN vector and recommend_new_user ranked items scored -inf without
    a word; lr=nan, "0.1" and seed=1.5 failed with torch's messages; lr=True was 1.0."""
    data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)
    torch.manual_seed(0)
    mf = fastmf.MF(50, 40, dim=4)
    fastmf.fit(mf, data, loss="bpr", epochs=2, progress=False)
    for call in (coldstart.fold_in, coldstart.recommend_new_user):
        with pytest.raises(ValueError, match=message):
            call(mf, [1, 5, 7], loss="bpr", **kwargs)


def test_fold_in_without_reg_takes_the_least_norm_fit():
    """reg=0 with fewer known items than dim + 1: the normal equations are singular, and
    solve() returned an arbitrary exact fit (entries of -53). Now the least-squares step of
    least norm: equal to numpy's lstsq on the same design, and it fits the ratings."""
    data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)
    torch.manual_seed(0)
    mf = fastmf.MF(50, 40, dim=4)
    fastmf.fit(mf, data, loss="mse", epochs=2, progress=False)
    items, ratings = [1, 5, 7, 9], np.array([4.0, 3.0, 5.0, 2.0])
    p, b = coldstart.fold_in(mf, items, ratings=ratings, reg=0.0, prior="zero")
    q = mf.item_factors.detach().double()[items].numpy()
    bi = mf.item_bias.detach().double()[items].numpy()
    mu = float(mf.global_mean)
    design = np.hstack([q, np.ones((len(items), 1))])
    want = np.linalg.lstsq(design, ratings - mu - bi, rcond=None)[0]
    np.testing.assert_allclose(p.double().numpy(), want[:-1], atol=1e-5)
    np.testing.assert_allclose(b - mu, want[-1], atol=1e-5)
    np.testing.assert_allclose(design @ want + mu + bi, ratings, atol=1e-6)
