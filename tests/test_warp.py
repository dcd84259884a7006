"""The WARP loss: the batched ``warp_loss``/``warp_choice`` against a plain per-sample loop
of LightFM's definition (values and autograd gradients), Hybrid's and the default training
step against the same loop, fit/recommend/save/load with ``loss="warp"``, bad input."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import fastmf
from fastmf.data import Interactions
from fastmf.models.base import Batch, Recommender
from fastmf.models.hybrid import Hybrid
from fastmf.recommender import KERNEL_LOSSES, warp_choice, warp_loss


def loop_warp(positive, candidates, num_items, weights=None):
    """LightFM's fit_warp for one pass, written per sample: draw candidates in order until
    one scores above positive - 1; weight log(max(1, floor((num_items - 1) / trials)))
    clipped at 10, times the hinge 1 - s_i + s_j. Mean over the batch."""
    size, n = candidates.shape
    total = positive.new_zeros(())
    for b in range(size):
        for j in range(n):
            if float(candidates[b, j].detach()) > float(positive[b].detach()) - 1:
                rank = max(1, (num_items - 1) // (j + 1))
                weight = min(math.log(rank), 10.0)
                term = weight * (1 - positive[b] + candidates[b, j])
                if weights is not None:
                    term = term * weights[b]
                total = total + term
                break
    return total / max(size, 1)


def zipf_ids(rng, size, high):
    return torch.as_tensor((rng.zipf(1.3, size) - 1) % high)


def dot_scores(rng, size, n, num_users=7, num_items=30, dim=5):
    """Leaf tables and the scores of Zipf-distributed (so repeated) user/item ids."""
    users_t = torch.randn(num_users, dim, dtype=torch.float64, requires_grad=True)
    items_t = torch.randn(num_items, dim, dtype=torch.float64, requires_grad=True)
    u = zipf_ids(rng, size, num_users)
    i = zipf_ids(rng, size, num_items)
    j = zipf_ids(rng, size * n, num_items).view(size, n)
    return users_t, items_t, u, i, j


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_batched_equals_loop_values_and_gradients(seed, weighted):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    size, n, num_items = 40, 6, 30
    users_t, items_t, u, i, j = dot_scores(rng, size, n, num_items=num_items)
    weights = (torch.as_tensor(rng.uniform(0.2, 3.0, size)) if weighted else None)

    def scores():
        pos = (users_t[u] * items_t[i]).sum(1)
        cand = (users_t[u].unsqueeze(1) * items_t[j]).sum(2)
        return pos, cand

    pos, cand = scores()
    batched = warp_loss(pos, cand, num_items, weights)
    grads = torch.autograd.grad(batched, (users_t, items_t))
    pos, cand = scores()
    expected = loop_warp(pos, cand, num_items, weights)
    grads_loop = torch.autograd.grad(expected, (users_t, items_t))
    assert float(expected.detach()) > 0  # random scores: some violators
    torch.testing.assert_close(batched, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_loop, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_choice_is_the_first_violator_and_the_weight_lightfm_s():
    pos = torch.tensor([0.0, 0.0, 5.0, 0.0])
    cand = torch.tensor([[-2.0, -0.5, 3.0],    # first violator: index 1 (2 trials)
                         [-1.5, -1.2, -3.0],   # none
                         [4.5, 9.0, 0.0],      # index 0 (1 trial)
                         [float("nan"), -3.0, 2.0]])  # NaN never violates: index 2
    first, weight = warp_choice(pos, cand, 101)
    assert first.tolist() == [1, 0, 0, 2]
    expected = [math.log(50), 0.0, math.log(100), math.log(33)]
    torch.testing.assert_close(weight.double(), torch.tensor(expected, dtype=torch.float64))
    # log of a huge rank is clipped at 10 (LightFM's MAX_LOSS); a one-item catalog weighs 0
    assert float(warp_choice(pos[:1], cand[:1], 10**9)[1][0]) == 10.0
    assert float(warp_choice(pos[:1], cand[:1], 1)[1][0]) == 0.0


def test_no_violator_gives_zero_loss_and_gradient():
    pos = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cand = (pos.detach().unsqueeze(1) - 1.5 - torch.rand(8, 5, dtype=torch.float64)
            ).requires_grad_()
    loss = warp_loss(pos, cand, 100)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert not pos.grad.any() and not cand.grad.any()


def test_empty_batch_and_no_candidates():
    empty = warp_loss(torch.zeros(0), torch.zeros(0, 4), 10)
    assert empty.shape == () and float(empty) == 0.0
    pos = torch.randn(3, requires_grad=True)
    assert float(warp_loss(pos, torch.zeros(3, 0), 10)) == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match=r"warp_choice: candidates must be \(B, n\)"):
        warp_loss(torch.zeros(3), torch.zeros(4, 2), 10)
    with pytest.raises(ValueError, match="num_items must be an int >= 1, got 0"):
        warp_loss(torch.zeros(3), torch.zeros(3, 2), 0)
    data = Interactions.from_arrays(np.array([0, 1, 2]), np.array([1, 2, 0]))
    gmf = fastmf.models.GMF(3, 3, dim=2)
    assert "warp" not in gmf.losses
    with pytest.raises(ValueError, match=r"fastmf\.models\.GMF does not train with loss "
                                         r"'warp'; its losses are \('bce', 'bpr'\)"):
        fastmf.fit(gmf, data, loss="warp", epochs=1, progress=False)
    with pytest.raises(ValueError, match="unknown loss 'wrap'.*'warp'"):
        fastmf.fit(Hybrid(3, 3, dim=2), data, loss="wrap", epochs=1, progress=False)


def hybrid_and_batch(seed, with_features=True, size=50, n=7):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    num_users, num_items = 9, 25
    feats = None
    if with_features:
        feats = sp.random(num_items, 4, density=0.5, random_state=seed, format="csr") * 3
    model = Hybrid(num_users, num_items, dim=6, item_features=feats, init_scale=0.5)
    with torch.no_grad():  # non-zero biases so they take part
        model.items.bias.weight.normal_()
        model.users.bias.weight.normal_()
    batch = Batch(zipf_ids(rng, size, num_users), zipf_ids(rng, size, num_items),
                  negatives=zipf_ids(rng, size * n, num_items).view(size, n),
                  weights=torch.as_tensor(rng.uniform(0.5, 2.0, size), dtype=torch.float32))
    return model, batch


def dense_side(side):
    """(rows, F (+N)) float64 weights of a Hybrid side, from its CSR buffers."""
    indptr, indices = side.indptr.numpy(), side.indices.numpy()
    weights = side.weights.double().numpy()
    return torch.as_tensor(sp.csr_matrix((weights, indices, indptr),
                                         shape=(side.num_rows, side.table.weight.shape[0])
                                         ).toarray())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_features", [False, True])
def test_hybrid_step_equals_loop_gradient(seed, with_features):
    """One SGD step of Hybrid's WARP moves every table row by -lr times the autograd
    gradient of the per-sample loop (plus the penalty on the lookups that loop uses)."""
    model, batch = hybrid_and_batch(seed, with_features)
    reg, lr = 0.01, 0.1
    xu, xi = dense_side(model.users), dense_side(model.items)
    tables = [model.users.table.weight, model.users.bias.weight, model.items.table.weight,
              model.items.bias.weight]
    leaves = [t.detach().double().clone().requires_grad_() for t in tables]
    eu, cu, ei, ci = leaves
    u, i, j = batch.users, batch.items, batch.negatives
    p, bu = xu @ eu, (xu @ cu)[:, 0]
    q, bi = xi @ ei, (xi @ ci)[:, 0]
    pos = (p[u] * q[i]).sum(1) + bu[u] + bi[i]
    cand = (p[u].unsqueeze(1) * q[j]).sum(2) + bu[u].unsqueeze(1) + bi[j]
    data = loop_warp(pos, cand, model.num_items, batch.weights.double())
    first, weight = warp_choice(pos, cand, model.num_items)
    found = weight > 0
    chosen = j.gather(1, first.unsqueeze(1)).squeeze(1)[found]
    uf, if_ = u[found], i[found]
    penalty = (p[uf].square().sum() + bu[uf].square().sum() + q[if_].square().sum()
               + bi[if_].square().sum() + q[chosen].square().sum() + bi[chosen].square().sum())
    expected = data + reg * penalty / len(u)
    expected.backward()
    before = [t.detach().clone() for t in tables]
    optimizer = model.make_optimizer("sgd", lr)
    value, count = model.training_step(batch, optimizer, loss="warp", reg=reg)
    assert count == len(u)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for table, old, leaf in zip(tables, before, leaves, strict=True):
        torch.testing.assert_close((old - table.detach()).double() / lr, leaf.grad,
                                   rtol=1e-4, atol=1e-5)


class TinyDot(Recommender):
    """A plain torch dot-product model that opts in to WARP through the default step."""

    losses = (*KERNEL_LOSSES, "warp")
    default_loss = "warp"

    def __init__(self, num_users, num_items, dim=4):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.p = nn.Embedding(num_users, dim, dtype=torch.float64)
        self.q = nn.Embedding(num_items, dim, dtype=torch.float64)

    def forward(self, users, items):
        return (self.p(users) * self.q(items)).sum(1)


def test_default_step_equals_loop_gradient():
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    model = TinyDot(8, 20)
    size, n, reg, lr = 60, 5, 0.02, 0.5
    batch = Batch(zipf_ids(rng, size, 8), zipf_ids(rng, size, 20),
                  negatives=zipf_ids(rng, size * n, 20).view(size, n))
    p = model.p.weight.detach().clone().requires_grad_()
    q = model.q.weight.detach().clone().requires_grad_()
    u, i, j = batch.users, batch.items, batch.negatives
    pos = (p[u] * q[i]).sum(1)
    cand = (p[u].unsqueeze(1) * q[j]).sum(2)
    first, weight = warp_choice(pos, cand, 20)
    found = weight > 0
    chosen = j.gather(1, first.unsqueeze(1)).squeeze(1)[found]
    penalty = 2 * p[u[found]].square().sum() + q[i[found]].square().sum() + q[chosen].square(
    ).sum()
    expected = loop_warp(pos, cand, 20) + reg * penalty / size
    expected.backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = [model.p.weight.detach().clone(), model.q.weight.detach().clone()]
    value, count = model.training_step(batch, optimizer, loss="warp", reg=reg)
    assert count == size
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close((before[0] - model.p.weight.detach()) / lr, p.grad)
    torch.testing.assert_close((before[1] - model.q.weight.detach()) / lr, q.grad)


def test_step_without_candidates_changes_nothing():
    model, batch = hybrid_and_batch(1, size=6, n=0)
    before = [t.detach().clone() for t in model.parameters()]
    value, count = model.training_step(batch, model.make_optimizer("adagrad", 0.1),
                                       loss="warp", reg=0.1)
    assert float(value) == 0.0 and count == 6
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_step_without_violator_changes_nothing():
    model, batch = hybrid_and_batch(0, with_features=False, size=10, n=3)
    batch = batch._replace(items=batch.items % 5, negatives=5 + batch.negatives % 20)
    with torch.no_grad():  # positives far above every candidate
        model.items.bias.weight[batch.items] = 100.0
        model.items.bias.weight[batch.negatives.reshape(-1)] = -100.0
    before = [t.detach().clone() for t in model.parameters()]
    value, count = model.training_step(batch, model.make_optimizer("adagrad", 0.1),
                                       loss="warp", reg=0.1)
    assert float(value) == 0.0 and count == 10
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)


def implicit_data(seed=0, users=40, items=60, per_user=15):
    """Four taste groups: each user picks distinct items, most from its own group."""
    rng = np.random.default_rng(seed)
    u, i = [], []
    for user in range(users):
        own = np.flatnonzero(np.arange(items) % 4 == user % 4)
        other = np.flatnonzero(np.arange(items) % 4 != user % 4)
        picks = np.concatenate([rng.choice(own, per_user - 3, replace=False),
                                rng.choice(other, 3, replace=False)])
        u += [user] * per_user
        i += picks.tolist()
    return Interactions.from_arrays(np.array(u) * 10 + 1, np.array(i) * 10 + 7)


def test_fit_warp_is_deterministic_and_learns():
    data = implicit_data()
    train, test = fastmf.data.random_split(data, 0.2, seed=1)

    def trained():
        torch.manual_seed(0)  # the initial tables; fit's seed fixes the rest
        model = Hybrid(data.num_users, data.num_items, dim=8)
        history = fastmf.fit(model, train, loss="warp", epochs=8, num_negatives=10,
                             lr=0.1, batch_size=64, progress=False, seed=3)
        return model, history

    a, history = trained()
    b, _ = trained()
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    losses = [row["loss"] for row in history.epochs]
    assert losses[-1] < losses[0]
    untrained = Hybrid(data.num_users, data.num_items, dim=8)
    auc = fastmf.evaluate(a, test, train=train, metrics=["auc"])["auc"]
    base = fastmf.evaluate(untrained, test, train=train, metrics=["auc"])["auc"]
    assert auc > base + 0.05


def test_fit_warp_recommend_save_load(tmp_path):
    data = implicit_data(1)
    model = Hybrid(data.num_users, data.num_items, dim=8)
    fastmf.fit(model, data, loss="warp", epochs=3, num_negatives=5, progress=False, seed=0)
    users = data.user_map.raw_ids[:4]
    items, scores = model.recommend(users, k=5, exclude=data, raw_ids=True)
    model.save(tmp_path / "warp")
    loaded = fastmf.load(tmp_path / "warp")
    again, scores_again = loaded.recommend(users, k=5, exclude=data, raw_ids=True)
    assert np.array_equal(items, again)
    np.testing.assert_allclose(scores, scores_again)
    # training continues on the loaded model with the same loss
    fastmf.fit(loaded, data, loss="warp", epochs=1, num_negatives=5, progress=False, seed=1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", fastmf.ops.available_backends())
def test_mf_warp_step_equals_textbook(backend, weighted):
    """MF's fused WARP step (violators picked by the fused forward, then the fused hinge
    step) equals textbook PyTorch: nn.Embedding tables, the same pick (warp_choice), the
    loss ``sum_found w * relu(1 - x) / B + reg * sum_found(norms) / B`` by autograd and
    torch.optim.SGD."""
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    num_users, num_items, size, n, reg, lr = 30, 40, 200, 3, 0.03, 0.5
    model = fastmf.MF(num_users, num_items, dim=8, global_mean=0.5, backend=backend,
                      init_scale=1.0)
    with torch.no_grad():
        model.user_bias.uniform_(-0.5, 0.5)
        model.item_bias.uniform_(-0.5, 0.5)
    batch = Batch(zipf_ids(rng, size, num_users), zipf_ids(rng, size, num_items),
                  negatives=torch.as_tensor(rng.integers(0, num_items, (size, n))),
                  weights=torch.rand(size) + 0.5 if weighted else None)
    p, q, bu, bi = (t.detach().clone().requires_grad_() for t in model.tables())
    u, i, j = batch.users, batch.items, batch.negatives
    with torch.no_grad():
        pos = model.mu + bu[u] + bi[i] + (p[u] * q[i]).sum(1)
        cand = model.mu + bu[u].unsqueeze(1) + bi[j] + (p[u].unsqueeze(1) * q[j]).sum(2)
    first, weight = warp_choice(pos, cand, num_items)
    found = weight > 0
    assert 0 < int(found.sum()) < size
    uf, i_f = u[found], i[found]
    jf = j.gather(1, first.unsqueeze(1)).squeeze(1)[found]
    x = bi[i_f] - bi[jf] + (p[uf] * (q[i_f] - q[jf])).sum(1)
    w = weight[found] * (batch.weights[found] if weighted else 1)
    norms = (p[uf].square().sum(1) + q[i_f].square().sum(1) + q[jf].square().sum(1)
             + bi[i_f].square() + bi[jf].square())
    expected = (w * torch.relu(1 - x)).sum() / size + reg * norms.sum() / size
    expected.backward()
    before = [t.detach().clone() for t in model.tables()]
    optimizer = fastmf.optim.SparseSGD(model.parameters(), lr=lr)
    value, count = model.training_step(batch, optimizer, loss="warp", reg=reg)
    assert count == size
    torch.testing.assert_close(value, expected.detach())
    for old, new, grad in zip(before, model.tables(), (p.grad, q.grad, bu.grad, bi.grad),
                              strict=True):
        want = torch.zeros_like(old) if grad is None else grad  # b_u cancels
        torch.testing.assert_close((old - new.detach()) / lr, want, atol=1e-5, rtol=1e-4)


def test_mf_fit_warp_learns_and_is_deterministic():
    data = implicit_data(2)
    train, test = fastmf.data.random_split(data, 0.2, seed=1)

    def trained():
        torch.manual_seed(0)
        model = fastmf.MF(data.num_users, data.num_items, dim=8)
        history = fastmf.fit(model, train, loss="warp", epochs=8, num_negatives=10, lr=0.1,
                             batch_size=64, progress=False, seed=3)
        return model, history

    a, history = trained()
    b, _ = trained()
    assert all(torch.equal(x, y) for x, y in zip(a.tables(), b.tables(), strict=True))
    losses = [row["loss"] for row in history.epochs]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    torch.manual_seed(0)
    untrained = fastmf.MF(data.num_users, data.num_items, dim=8)
    auc = fastmf.evaluate(a, test, train=train, metrics=["auc"])["auc"]
    base = fastmf.evaluate(untrained, test, train=train, metrics=["auc"])["auc"]
    assert auc > base + 0.05


@pytest.mark.parametrize("loss, explicit", [
    ("warp", dict(num_negatives=10, batch_size=4096, lr=0.05, reg=1e-4)),
    ("bpr", dict(num_negatives=4, batch_size=4096, lr=0.05, reg=1e-4)),
    ("bce", dict(num_negatives=4, batch_size=4096, lr=0.1, reg=1e-4)),
])
def test_hybrid_fit_defaults_per_loss(loss, explicit):
    """fit(Hybrid) without settings (but the epochs) trains exactly as with Hybrid's
    documented defaults for the loss (batch 4096, lr 0.05 or 0.1 for BCE, reg 1e-4; WARP
    with 10 candidates), and not as with another candidate count."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 110)  # 4,400 rows: more than one batch of 4096
    data = Interactions.from_arrays(users, rng.integers(0, 60, users.shape[0]))

    def trained(**settings):
        torch.manual_seed(0)
        model = Hybrid(data.num_users, data.num_items, dim=4)
        fastmf.fit(model, data, loss=loss, epochs=2, progress=False, seed=5, **settings)
        return list(model.state_dict().values())

    default = trained()
    assert all(torch.equal(x, y) for x, y in zip(default, trained(**explicit), strict=True))
    other = dict(explicit, num_negatives=explicit["num_negatives"] + 1)
    assert not all(torch.equal(x, y) for x, y in zip(default, trained(**other), strict=True))
