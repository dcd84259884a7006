"""The model protocol (fastmf.models.base.Recommender): two small models defined here, one
dot-product and one scored by forward only, through the hooks, the serving code, fit,
evaluate, checkpoints and the CLI; and every registered model through fit / recommend /
save / load on tiny synthetic data."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import fastmf
from fastmf import checkpoint
from fastmf.models.base import Batch, Recommender, pairwise_loss, pointwise_loss
from fastmf.ops import reference as spec
from fastmf.optim import CombinedOptimizer


class _Product(Recommender):
    """``<p_u, q_i> + b_i`` from fastmf.nn tables and a dense bias (Adam)."""

    losses = ("mse", "huber", "bce", "bpr")
    default_loss = "bce"
    test_config: ClassVar[dict] = {"dim": 4}

    def __init__(self, num_users: int, num_items: int, dim: int = 8, *,
                 backend: str = "auto", device=None, dtype=torch.float32):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        kw = dict(backend=backend, device=device, dtype=dtype, init_scale=0.3)
        self.user_emb = fastmf.nn.Embedding(num_users, dim, **kw)
        self.item_emb = fastmf.nn.Embedding(num_items, dim, **kw)
        self.item_bias = nn.Parameter(torch.zeros(num_items, dtype=dtype, device=device))

    def get_config(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "dtype": str(self.item_bias.dtype).removeprefix("torch.")}

    def forward(self, users, items):
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        return (self.user_emb(users) * self.item_emb(items)).sum(-1) + self.item_bias[items]


@checkpoint.register_model
class ProtoDot(_Product):
    """The dot-product model: the same scores with its vectors exposed."""

    def user_vectors(self, users):
        return self.user_emb.weight.detach()[self.as_ids(users, "users")], None

    def item_vectors(self):
        return self.item_emb.weight.detach(), self.item_bias.detach()


@checkpoint.register_model
class ProtoScored(_Product):
    """The same scores, ranked through score_items (no vectors)."""


@checkpoint.register_model
class ProtoMLP(Recommender):
    """A model with no item vectors: an MLP over concatenated embeddings."""

    default_loss = "bce"
    test_config: ClassVar[dict] = {"dim": 4, "hidden": 8}

    def __init__(self, num_users: int, num_items: int, dim: int = 8, hidden: int = 16, *,
                 backend: str = "auto", device=None, dtype=torch.float32):
        super().__init__()
        self.num_users, self.num_items, self.dim, self.hidden = num_users, num_items, dim, hidden
        self.device, self.dtype = device, dtype  # attributes of these names must not clash
        kw = dict(backend=backend, device=device, dtype=dtype)
        self.user_emb = fastmf.nn.Embedding(num_users, dim, **kw)
        self.item_emb = fastmf.nn.Embedding(num_items, dim, **kw)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden, device=device, dtype=dtype),
                                 nn.ReLU(), nn.Linear(hidden, 1, device=device, dtype=dtype))

    def get_config(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "hidden": self.hidden,
                "dtype": str(self.user_emb.weight.dtype).removeprefix("torch.")}

    def forward(self, users, items):
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        x = torch.cat([self.user_emb(users), self.item_emb(items)], dim=-1)
        return self.mlp(x).squeeze(-1)


def tiny_data(seed: int = 0, users: int = 30, items: int = 20, n: int = 300):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(users * items, size=n, replace=False)
    return fastmf.data.Interactions(pairs // items, pairs % items,
                                    ratings=rng.integers(1, 11, n) / 2,
                                    user_map=users, item_map=items)


def twin_models(seed: int = 1, users: int = 30, items: int = 20):
    """A ProtoDot and a ProtoScored with the same weights (random, biases too)."""
    torch.manual_seed(seed)
    dot = ProtoDot(users, items, dim=5)
    with torch.no_grad():
        dot.item_bias.uniform_(-0.5, 0.5)
    scored = ProtoScored(users, items, dim=5)
    scored.load_state_dict(dot.state_dict())
    return dot, scored


# -- loss helpers ---------------------------------------------------------------------------

def test_pointwise_loss_matches_torch():
    torch.manual_seed(0)
    scores, targets = torch.randn(50), torch.rand(50) * 4
    torch.testing.assert_close(pointwise_loss(scores, targets, "mse"),
                               nn.functional.mse_loss(scores, targets))
    torch.testing.assert_close(pointwise_loss(scores, targets, "huber"),
                               nn.functional.huber_loss(scores, targets, delta=1.0))
    labels = (torch.rand(50) > 0.5).float()
    torch.testing.assert_close(pointwise_loss(scores, labels, "bce"),
                               nn.functional.binary_cross_entropy_with_logits(scores, labels))
    weights = torch.rand(50) + 0.5
    torch.testing.assert_close(pointwise_loss(scores, targets, "mse", weights),
                               (weights * (scores - targets) ** 2).mean())
    with pytest.raises(ValueError, match="unknown loss 'bpr'"):
        pointwise_loss(scores, targets, "bpr")


def test_pairwise_loss_is_bpr_over_every_pair():
    torch.manual_seed(1)
    pos, neg = torch.randn(7), torch.randn(7, 3)
    want = -torch.nn.functional.logsigmoid(pos.unsqueeze(1) - neg).mean()
    torch.testing.assert_close(pairwise_loss(pos, neg), want)
    weights = torch.rand(7)
    want = -(weights.unsqueeze(1) * torch.nn.functional.logsigmoid(pos.unsqueeze(1) - neg)).mean()
    torch.testing.assert_close(pairwise_loss(pos, neg, weights=weights), want)
    with pytest.raises(ValueError, match=r"negative must be \(B, n\)"):
        pairwise_loss(pos, torch.randn(6, 3))


# -- CombinedOptimizer ------------------------------------------------------------------------

def test_combined_optimizer_steps_every_part_like_the_parts_alone():
    torch.manual_seed(2)
    a, b = nn.Linear(4, 3), nn.Linear(3, 1)
    a2, b2 = nn.Linear(4, 3), nn.Linear(3, 1)
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    combined = CombinedOptimizer([torch.optim.SGD(a.parameters(), lr=0.1),
                                  torch.optim.Adam(b.parameters(), lr=0.01)])
    alone = [torch.optim.SGD(a2.parameters(), lr=0.1), torch.optim.Adam(b2.parameters(), lr=0.01)]
    x = torch.randn(16, 4)
    for _ in range(3):
        combined.zero_grad()
        b(a(x)).square().mean().backward()
        combined.step()
        for opt in alone:
            opt.zero_grad()
        b2(a2(x)).square().mean().backward()
        for opt in alone:
            opt.step()
    for p, q in zip([*a.parameters(), *b.parameters()], [*a2.parameters(), *b2.parameters()],
                    strict=True):
        torch.testing.assert_close(p, q)
    assert len(combined.param_groups) == 2
    assert len(combined.state) == 2  # Adam's state of b's weight and bias; SGD keeps none
    # A scheduler reaches the parts through the shared group dicts.
    sched = torch.optim.lr_scheduler.StepLR(combined, step_size=1, gamma=0.5)
    combined.step()
    sched.step()
    assert combined.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert combined.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.005)


def test_combined_optimizer_state_dict_round_trip_and_errors():
    torch.manual_seed(3)
    a, b = nn.Linear(3, 2), nn.Linear(2, 1)
    opt = CombinedOptimizer([torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters())])
    b(a(torch.randn(5, 3))).sum().backward()
    opt.step()
    other = CombinedOptimizer([torch.optim.Adam(a.parameters()),
                               torch.optim.Adam(b.parameters())])
    other.load_state_dict(opt.state_dict())
    torch.testing.assert_close(other.optimizers[1].state[b.weight]["exp_avg"],
                               opt.optimizers[1].state[b.weight]["exp_avg"])
    with pytest.raises(ValueError, match="with 2 entries"):
        other.load_state_dict({"optimizers": [opt.optimizers[0].state_dict()]})
    with pytest.raises(ValueError, match=r"held by optimizers\[0\] and optimizers\[1\]"):
        CombinedOptimizer([torch.optim.SGD(a.parameters(), lr=0.1),
                           torch.optim.SGD(a.parameters(), lr=0.1)])
    with pytest.raises(TypeError, match=r"optimizers\[0\] must be a torch optimizer"):
        CombinedOptimizer(["adam"])
    with pytest.raises(ValueError, match="empty"):
        CombinedOptimizer([])


# -- training hooks -------------------------------------------------------------------------

def test_make_optimizer_puts_tables_in_backward_and_the_rest_under_adam():
    model = ProtoMLP(10, 8, dim=4, hidden=6)
    opt = model.make_optimizer("rowwise_adam", 0.05)
    assert isinstance(opt, CombinedOptimizer)
    sparse, dense = opt.optimizers
    assert isinstance(sparse, fastmf.optim.SparseAdam)
    assert sparse.param_groups[0]["rowwise"] is True
    assert {id(p) for p in sparse.param_groups[0]["params"]} == {
        id(model.user_emb.weight), id(model.item_emb.weight)}
    assert isinstance(dense, torch.optim.Adam)
    assert dense.param_groups[0]["lr"] == model.dense_lr
    assert len(dense.param_groups[0]["params"]) == 4
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        ProtoMLP(10, 8).make_optimizer("lbfgs", 0.1)


@pytest.mark.parametrize("loss", ["mse", "huber", "bce", "bpr"])
def test_default_training_step_updates_only_touched_rows_and_lowers_the_loss(loss):
    torch.manual_seed(4)
    model = ProtoDot(12, 9, dim=4)
    opt = model.make_optimizer("adagrad", 0.1)
    users, items = torch.tensor([0, 3, 5, 5]), torch.tensor([1, 2, 2, 7])
    negatives = torch.tensor([[0], [4], [0], [8]]) if loss in ("bce", "bpr") else None
    targets = torch.tensor([4.0, 1.0, 3.5, 2.0]) if negatives is None else None
    batch = Batch(users, items, targets, negatives)
    before = model.user_emb.weight.detach().clone()
    losses = []
    for _ in range(30):
        value, count = model.training_step(batch, opt, loss=loss, reg=0.01)
        losses.append(float(value))
    assert value.dim() == 0 and not value.requires_grad
    assert count == {"mse": 4, "huber": 4, "bce": 8, "bpr": 4}[loss]
    assert losses[-1] < losses[0]
    changed = (model.user_emb.weight.detach() != before).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 3, 5]


def test_training_step_penalises_the_looked_up_rows():
    torch.manual_seed(5)
    model = ProtoDot(6, 5, dim=3)
    opt = CombinedOptimizer([torch.optim.SGD(model.parameters(), lr=0.0)])
    users, items = torch.tensor([1, 2, 2]), torch.tensor([0, 4, 4])
    targets = torch.tensor([1.0, 2.0, 3.0])
    plain, _ = model.training_step(Batch(users, items, targets), opt, loss="mse", reg=0.0)
    reg, _ = model.training_step(Batch(users, items, targets), opt, loss="mse", reg=0.5)
    p, q = model.user_emb.weight.detach(), model.item_emb.weight.detach()
    penalty = (p[users].square().sum() + q[items].square().sum()) / 3
    torch.testing.assert_close(reg, plain + 0.5 * penalty)


def test_batches_cover_every_interaction_once_with_negatives_outside_the_user_items():
    data = tiny_data(6)
    model = ProtoDot.from_interactions(data, dim=3)
    sampler = fastmf.data.NegativeSampler(data)
    seen = []
    for batch in model.batches(data, batch_size=64, loss="bpr", num_negatives=3,
                               sampler=sampler, generator=torch.Generator().manual_seed(9)):
        assert batch.negatives.shape == (len(batch.users), 3)
        assert batch.targets is None
        seen += list(zip(batch.users.tolist(), batch.items.tolist(), strict=True))
        positives = set(zip(data.users.tolist(), data.items.tolist(), strict=True))
        for u, row in zip(batch.users.tolist(), batch.negatives.tolist(), strict=True):
            assert not any((u, j) in positives for j in row)
    assert sorted(seen) == sorted(zip(data.users.tolist(), data.items.tolist(), strict=True))
    again = next(iter(model.batches(data, batch_size=64, loss="mse", num_negatives=0,
                                    sampler=None, generator=torch.Generator().manual_seed(9))))
    assert again.targets is not None and again.negatives is None




@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_the_epoch_order_is_the_permutation_op_whatever_the_id_dtype(n):
    """The shuffle draws its permutation in int32 and gathers int32 ids when asked: the
    order of the reference ``permutation`` at the generator's seed in int64, so the
    dtypes change no fit."""
    rng = np.random.default_rng(n)
    users, items = rng.integers(0, 50, n), rng.integers(0, 30, n)
    data = fastmf.data.Interactions(users, items, user_map=50, item_map=30)
    model = ProtoDot(50, 30, dim=3)
    for seed in (0, 5):
        order = torch.empty(n, dtype=torch.int64)
        spec.permutation(order, torch.Generator().manual_seed(seed).initial_seed())
        assert torch.equal(order.sort().values, torch.arange(n))
        for id_dtype in (torch.int64, torch.int32):
            got = model._shuffled(data, "bpr", torch.Generator().manual_seed(seed),
                                  id_dtype=id_dtype)
            assert got[0].dtype == got[1].dtype == id_dtype
            assert torch.equal(got[0].long(), torch.from_numpy(users)[order])
            assert torch.equal(got[1].long(), torch.from_numpy(items)[order])
# -- serving: dot-product and scored models agree ----------------------------------------------

def test_recommend_through_score_items_matches_the_fused_top_k():
    dot, scored = twin_models()
    data = tiny_data(7)
    users = torch.arange(30)
    for kwargs in ({}, {"exclude": data}, {"items": [3, 1, 3, 17, 9]},
                   {"exclude": data.to_csr(), "k": 25}, {"batch_size": 7, "exclude": data}):
        k = kwargs.pop("k", 6)
        a_items, a_scores = dot.recommend(users, k, **kwargs)
        b_items, b_scores = scored.recommend(users, k, **kwargs)
        assert torch.equal(a_items, b_items), kwargs
        torch.testing.assert_close(a_scores, b_scores)
    # the scores are the model's predictions
    items, scores = scored.recommend(users, 4, exclude=data)
    torch.testing.assert_close(scores, scored.predict(users.repeat_interleave(4),
                                                      items.reshape(-1)).view(30, 4))
    # everything excluded: -1 / -inf padding
    full = sp.csr_matrix(np.ones((30, 20)))
    items, scores = scored.recommend([0, 1], 3, exclude=full)
    assert (items == -1).all() and torch.isinf(scores).all()


def test_score_items_chunks_like_one_call(monkeypatch):
    torch.manual_seed(8)
    model = ProtoMLP(9, 7, dim=3, hidden=5)
    users, items = torch.tensor([0, 4, 8]), torch.tensor([6, 0, 3, 3])
    whole = model.score_items(users, items)
    monkeypatch.setattr("fastmf.recommender.SCORE_CHUNK", 5)
    torch.testing.assert_close(model.score_items(users, items), whole)
    torch.testing.assert_close(whole[1, 2], model.predict(torch.tensor([4]),
                                                          torch.tensor([3]))[0])


def test_recommend_exclude_forms_for_one_user():
    dot, scored = twin_models(seed=9)
    data = tiny_data(10)
    csr = data.to_csr(binary=True)
    for model in (dot, scored):
        want, _ = model.recommend([4], 5, exclude=data)
        row_items, _ = model.recommend([4], 5, exclude=csr[4])
        list_items, _ = model.recommend([4], 5, exclude=csr[4].indices.tolist())
        array_items, _ = model.recommend(4, 5, exclude=np.asarray(csr[4].indices))
        assert torch.equal(want, row_items)
        assert torch.equal(want, list_items)
        assert torch.equal(want, array_items)
        assert not set(want[0].tolist()) & set(csr[4].indices.tolist())
        with pytest.raises(ValueError, match="list of item ids is for one user"):
            model.recommend([1, 2], 5, exclude=[3])
        with pytest.raises(ValueError, match="exclude has shape"):
            model.recommend([1, 2], 5, exclude=csr[4])
        with pytest.raises(TypeError, match="exclude must be Interactions"):
            model.recommend([1], 5, exclude="items")


def test_recommend_as_frame_and_raw_ids():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(11)
    raw_users = np.array([f"u{k}" for k in rng.permutation(30)], dtype=object)
    raw_items = 1000 + rng.permutation(20)
    base = tiny_data(11)
    data = fastmf.data.Interactions.from_arrays(raw_users[base.users], raw_items[base.items],
                                                base.ratings)
    data = data.with_item_metadata(pd.DataFrame({"item": raw_items,
                                                 "title": [f"t{x}" for x in raw_items]}),
                                   item_col="item", title_col="title")
    model = ProtoScored.from_interactions(data, dim=4).attach_data(data)
    frame = model.recommend(["u3", "u7"], 3, exclude=data, raw_ids=True, as_frame=True)
    assert list(frame.columns) == ["user", "rank", "item", "score", "title"]
    assert frame["user"].tolist() == ["u3"] * 3 + ["u7"] * 3
    assert frame["rank"].tolist() == [1, 2, 3] * 2
    items, scores = model.recommend(["u3", "u7"], 3, exclude=data, raw_ids=True)
    assert frame["item"].tolist() == items.reshape(-1).tolist()
    np.testing.assert_allclose(frame["score"], scores.reshape(-1), rtol=1e-6)
    assert frame["title"].tolist() == [f"t{x}" for x in items.reshape(-1)]
    # predict with raw ids gives the same scores
    pred = model.predict(["u3"] * 3, items[0].tolist(), raw_ids=True)
    np.testing.assert_allclose(pred, scores[0], rtol=1e-6)
    with pytest.raises(KeyError, match="unknown raw item id"):
        model.predict(["u3"], [5], raw_ids=True)
    # an unknown raw user (the wrong type) warns and gets the popular items, NaN scores
    with pytest.warns(UserWarning, match="is a int but the model's raw user ids"):
        cold_items, cold_scores = model.recommend([3], 2, raw_ids=True)
    popular = np.argsort(-np.bincount(data.items, minlength=20), kind="stable")[:2]
    assert cold_items[0].tolist() == data.item_map.raw_ids[popular].tolist()
    assert np.isnan(cold_scores).all()


def test_models_without_vectors_refuse_similar_items_and_analogy():
    model = ProtoMLP(5, 4)
    with pytest.raises(TypeError, match="ProtoMLP.similar_items: the model has no item vectors"):
        model.similar_items([0])
    with pytest.raises(TypeError, match="ProtoMLP.similar_users: the model has no user vectors"):
        model.similar_users([0])
    with pytest.raises(TypeError, match="ProtoMLP.analogy: the model has no item vectors"):
        model.analogy([0], [1])
    dot, _ = twin_models(seed=12)
    items, scores = dot.similar_items([2], k=3)
    weights = dot.item_emb.weight.detach()
    cosine = torch.nn.functional.normalize(weights) @ torch.nn.functional.normalize(weights)[2]
    cosine[2] = -float("inf")
    assert items[0].tolist() == torch.argsort(cosine, descending=True, stable=True)[:3].tolist()
    assert dot.analogy([1, 2], [3], k=2)[0].shape == (2,)


def test_check_data_and_attach_data():
    data = tiny_data(13)
    with pytest.raises(ValueError, match="ProtoDot: data has 30 users x 20 items, the model "
                                         "31 x 20"):
        ProtoDot(31, 20).attach_data(data)
    model = ProtoDot.from_interactions(data).attach_data(data)
    assert model.item_popularity.tolist() == np.bincount(data.items, minlength=20).tolist()
    assert json.loads(json.dumps(model.get_config()))["dim"] == 8


# -- fit, evaluate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split():
    data = fastmf.datasets.synthetic(60, 40, 900, seed=3)
    return fastmf.data.random_split(data, 0.2, seed=0)


@pytest.mark.parametrize("cls", [ProtoDot, ProtoMLP])
def test_fit_validates_stops_early_and_restores_the_best_weights(cls, split):
    train, valid = split
    torch.manual_seed(0)
    model = cls.from_interactions(train, dim=4)
    history = fastmf.fit(model, train, valid=valid, epochs=4, lr=0.3, early_stopping=1,
                         progress=False)
    assert history.monitor == "ndcg@10"  # the default loss is bce: ranking metrics
    assert 1 <= len(history) <= 4 and history.best_epoch is not None
    assert all(np.isfinite(history["loss"]))
    best = history.best["ndcg@10"]
    assert fastmf.evaluate(model, valid, train=train, metrics=("ndcg@10",))["ndcg@10"] == \
        pytest.approx(best)
    assert model.user_map is train.user_map  # prepare kept the id maps


def test_fit_checks_the_loss_against_the_model(split, monkeypatch):
    train, _ = split
    monkeypatch.setattr(ProtoMLP, "losses", ("bce", "bpr"))
    with pytest.raises(ValueError, match=r"ProtoMLP does not train with loss 'mse'; its "
                                         r"losses are \('bce', 'bpr'\)"):
        fastmf.fit(ProtoMLP.from_interactions(train), train, loss="mse", progress=False)
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        fastmf.fit(ProtoMLP.from_interactions(train), train, loss="l1", progress=False)
    with pytest.raises(TypeError, match="must be a fastmf.models.base.Recommender"):
        fastmf.fit(nn.Linear(2, 1), train, progress=False)


def test_fit_merges_the_model_defaults(split, monkeypatch):
    train, _ = split
    monkeypatch.setattr(ProtoDot, "defaults", {"implicit": {"epochs": 2, "batch_size": 50}})
    history = fastmf.fit(ProtoDot.from_interactions(train), train, progress=False)
    assert len(history) == 2


def row_weights(users, items):
    """A weight per (user, item), so a batch's weights can be checked from its ids."""
    return 0.5 + ((np.asarray(users) * 7 + np.asarray(items)) % 5) / 2


@pytest.mark.parametrize("loss", ["bce", "bpr", "mse"])
def test_fit_hands_the_interaction_weights_to_the_step(split, loss, monkeypatch):
    """Every batch carries the weights of its own rows; weights of 1 train exactly as no
    weights do, other weights train differently."""
    train, _ = split
    weighted = train.with_weights(row_weights(train.users, train.items))
    seen = []
    step = ProtoDot.training_step

    def spy(self, batch, optimizer, **kw):
        seen.append((batch.users, batch.items, batch.weights))
        return step(self, batch, optimizer, **kw)

    def run(data):
        torch.manual_seed(0)
        model = ProtoDot.from_interactions(data, dim=4)
        history = fastmf.fit(model, data, loss=loss, epochs=2, batch_size=64, lr=0.1, seed=1,
                             progress=False)
        return model, history

    monkeypatch.setattr(ProtoDot, "training_step", spy)
    varied, varied_history = run(weighted)
    assert sum(len(u) for u, _, _ in seen) == 2 * len(train)
    for users, items, weights in seen:
        np.testing.assert_array_equal(weights.numpy(),
                                      row_weights(users.numpy(), items.numpy()))
    seen.clear()
    plain, plain_history = run(train)
    assert all(weights is None for _, _, weights in seen)
    ones, ones_history = run(train.with_weights(np.ones(len(train))))
    assert ones_history["loss"] == plain_history["loss"]
    for a, b in zip(ones.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert varied_history["loss"] != plain_history["loss"]
    assert not torch.equal(varied.user_emb.weight, plain.user_emb.weight)


@pytest.mark.parametrize("make, loss", [
    (lambda d: fastmf.models.SVDpp.from_interactions(d, dim=4), "mse"),
])
def test_fit_refuses_weights_a_model_does_not_use(split, make, loss):
    """SVD++'s step weighs every row alike: weighted data is an error, not weights silently
    dropped; without the weights the same call trains. (MF's fused steps take them:
    tests/test_step_weights.py.)"""
    train, _ = split
    weighted = train.with_weights(row_weights(train.users, train.items))
    model = make(train)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"carry per-row weights, which "
                                         rf"{type(model).__name__}'s training step does not"):
        fastmf.fit(model, weighted, loss=loss, epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    fastmf.fit(model, weighted.with_weights(None), loss=loss, epochs=1, progress=False)


def test_fit_takes_scipy_and_pandas_data(split):
    pd = pytest.importorskip("pandas")
    train, valid = split
    frame = valid.to_pandas()  # user, item, rating, timestamp (raw ids)
    torch.manual_seed(1)
    model = ProtoDot(train.num_users, train.num_items, dim=4)
    history = fastmf.fit(model, train.to_csr(), loss="mse", valid=frame, epochs=1,
                         progress=False)
    assert set(history.epochs[0]) >= {"rmse", "mae"}
    with pytest.raises(ValueError, match=r"without user and item columns .* it has \['u', 'i'\]"):
        fastmf.fit(model, pd.DataFrame({"u": [0], "i": [1]}), progress=False)
    with pytest.raises(TypeError, match="Interactions, a scipy.sparse user x item matrix or a "
                                        "pandas DataFrame, got list"):
        fastmf.fit(model, [(0, 1)], progress=False)


def test_evaluate_any_model(split):
    train, valid = split
    dot, scored = twin_models(seed=14, users=train.num_users, items=train.num_items)
    metrics = ("rmse", "ndcg@5", "auc", "coverage@5")
    a = fastmf.evaluate(dot, valid, train=train, metrics=metrics + ("diversity@5",))
    b = fastmf.evaluate(scored, valid, train=train, metrics=metrics)
    for key in metrics:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert 0 <= a["diversity@5"] <= 2
    with pytest.raises(ValueError, match="diversity needs item vectors; ProtoScored has none"):
        fastmf.evaluate(scored, valid, train=train, metrics=("diversity",))


# -- checkpoints ----------------------------------------------------------------------------------

def _states(optimizer):
    out = {}
    for k, part in enumerate(optimizer.optimizers):
        for g, group in enumerate(part.param_groups):
            for j, p in enumerate(group["params"]):
                for key, value in part.state.get(p, {}).items():
                    out[(k, g, j, key)] = value
    return out


def test_save_load_round_trip_with_optimizer_state_and_exact_resume(split, tmp_path):
    train, _ = split
    torch.manual_seed(2)
    straight = ProtoMLP.from_interactions(train, dim=4, hidden=6)
    interrupted = ProtoMLP.from_interactions(train, dim=4, hidden=6)
    interrupted.load_state_dict(straight.state_dict())
    opt = straight.make_optimizer("rowwise_adam", 0.05)
    fastmf.fit(straight, train, epochs=2, optimizer=opt, progress=False)
    fastmf.fit(interrupted, train, epochs=1, optimizer="rowwise_adam", lr=0.05,
               checkpoint=tmp_path / "ck", progress=False)
    saved = fastmf.load_checkpoint(tmp_path / "ck")
    assert type(saved.optimizer).__name__ == "CombinedOptimizer"
    assert [type(p).__name__ for p in saved.optimizer.optimizers] == ["SparseAdam", "Adam"]
    assert saved.optimizer.optimizers[0].param_groups[0]["rowwise"] is True
    # the loaded optimizer runs its tables in backward, like the one that was saved
    assert fastmf.nn.embedding.fused_optimizer(saved.model.user_emb.weight) is \
        saved.optimizer.optimizers[0]
    resumed = ProtoMLP.from_interactions(train, dim=4, hidden=6)
    fastmf.fit(resumed, train, epochs=2, optimizer="rowwise_adam", lr=0.05,
               checkpoint=tmp_path / "ck", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # model.save with the optimizer: every state tensor and step comes back
    path = straight.save(tmp_path / "full", optimizer=opt)
    loaded = fastmf.load_checkpoint(path)
    mine, theirs = _states(opt), _states(loaded.optimizer)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    for key, value in mine.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(theirs[key], value, msg=str(key))
        else:
            assert theirs[key] == value
    users = torch.arange(train.num_users)
    assert torch.equal(straight.recommend(users, 5, exclude=train)[0],
                       loaded.model.recommend(users, 5, exclude=train)[0])
    assert loaded.model.item_map is not None


def _rewrite(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


class _MetaOnly(ProtoMLP):
    """Fails when built anywhere but on the meta device: loading must check first."""

    def __init__(self, *args, device=None, **kwargs):
        if str(device) != "meta":
            raise AssertionError("built for real before the checkpoint was checked")
        super().__init__(*args, device=device, **kwargs)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"].update(num_users=10**12), r"model.user_emb.weight has shape"),
    (lambda c: c["model"].update(num_users=2**50), r"num_users must be an int in"),
    (lambda c: c["model"].update(hidden=-3), r"cannot build \w+ from its config"),
    (lambda c: c["model"].update(dim="4"), r"cannot build \w+ from its config"),
    (lambda c: c["model"].update(device="cuda"), r"holds 'device'"),
    (lambda c: c["model"].update(dtype="int8"), r"dtype must be one of"),
    (lambda c: c.update(model_class="Nope"), r"unknown model class \"Nope\""),
    (lambda c: c.update(model=[1, 2]), r"model must be an object"),
    (lambda c: c["optimizer"]["parts"][0].update(type="LBFGS"), r"optimizer.parts\[0\].type"),
    (lambda c: c["optimizer"]["parts"][1]["groups"][0].update(lr=-1),
     r"groups\[0\].lr must be a finite number >= 0"),
    (lambda c: c["optimizer"]["parts"][1]["groups"][0]["params"].append("ghost"),
     r"names the parameter 'ghost'"),
    (lambda c: c["optimizer"]["parts"][0]["state"].update(extra={"tensors": [], "scalars": {}}),
     r"state\['extra'\]"),
])
def test_load_refuses_bad_configs_before_allocating(split, tmp_path, monkeypatch, change,
                                                    message):
    train, _ = split
    model = ProtoMLP.from_interactions(train, dim=3, hidden=4)
    opt = model.make_optimizer("adagrad", 0.1)
    fastmf.fit(model, train, epochs=1, optimizer=opt, progress=False)
    path = model.save(tmp_path / "ck", optimizer=opt)
    _rewrite(path, change)
    monkeypatch.setitem(checkpoint.MODELS, "ProtoMLP", _MetaOnly)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        fastmf.load(path)


def test_save_refuses_what_would_not_load(tmp_path):
    class Unregistered(ProtoMLP):
        pass

    with pytest.raises(checkpoint.CheckpointError, match="is not registered"):
        Unregistered(3, 3).save(tmp_path / "a")
    model = ProtoMLP(3, 3)
    with pytest.raises(checkpoint.CheckpointError, match="cannot save a SGD"):
        model.save(tmp_path / "b", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="needs a registered model class"):
        fastmf.fit(Unregistered(30, 20), tiny_data(), checkpoint=tmp_path / "c", progress=False)


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_trains_any_registered_model_and_serves_it(split, tmp_path, capsys):
    from fastmf.cli import main

    train, _ = split
    csv = tmp_path / "ratings.csv"
    frame = train.to_pandas().rename(columns={"user": "userId", "item": "movieId"})
    frame.to_csv(csv, index=False)
    out = tmp_path / "model"
    code = main(["train", "--data", str(csv), "--model", "ProtoMLP", "--model-args",
                 '{"dim": 3, "hidden": 5}', "--epochs", "1", "--quiet", "--device", "cpu",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "model=ProtoMLP" in printed.out or "model=protomlp" in printed.out
    loaded = fastmf.load(out)
    assert type(loaded) is ProtoMLP and loaded.hidden == 5
    assert main(["evaluate", "--model", str(out), "--data", str(csv)]) == 0
    assert "ndcg@10=" in capsys.readouterr().out
    user = str(frame["userId"].iloc[0])
    assert main(["recommend", "--model", str(out), "--user", user, "-k", "3"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) >= 3
    # A loss only some models train with: the CLI offers it, the model decides.
    code = main(["train", "--data", str(csv), "--model", "hybrid", "--loss", "warp",
                 "--model-args", '{"dim": 4}', "--epochs", "1", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "model=hybrid" in capsys.readouterr().out
    for argv, message in (
            (["--model", "nosuch"], "unknown model; choose one of .*mf.*protomlp"),
            (["--model", "protomlp", "--model-args", "{"], "--model-args: not valid JSON"),
            (["--model", "protomlp", "--model-args", "[1]"], "expected a JSON object"),
            (["--model", "protomlp", "--model-args", '{"layers": [4]}'],
             "ProtoMLP has no argument 'layers'; it takes dim, hidden"),
            (["--model", "protomlp", "--model-args", '{"num_users": 4}'],
             "'num_users' is set from the data"),
            (["--model", "protomlp", "--model-args", '{"hidden": -1}'], "cannot build it"),
            (["--model", "gmf", "--loss", "warp"], "--loss warp: --model gmf trains with bce, "
                                                    "bpr")):
        code = main(["train", "--data", str(csv), "--epochs", "1", "--quiet", *argv])
        err = capsys.readouterr().err
        assert code != 0
        assert __import__("re").search(message, err), err


# -- every registered model ----------------------------------------------------------------------

REGISTERED = sorted(name for name, cls in checkpoint.MODELS.items()
                    if cls.__module__.startswith("fastmf"))


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_model_fits_recommends_saves_and_loads(name, split, tmp_path):
    cls = checkpoint.MODELS[name]
    train, valid = split
    torch.manual_seed(0)
    model = cls.from_interactions(train, **dict(getattr(cls, "test_config", {}) or {}))
    loss = cls.default_loss
    optimizer = model.make_optimizer(None, 0.05)
    history = fastmf.fit(model, train, loss=loss, epochs=1, batch_size=256,
                         optimizer=optimizer, valid=valid, progress=False)
    assert len(history) == 1 and np.isfinite(history["loss"][0])
    users = torch.arange(train.num_users)
    items, scores = model.recommend(users, 5, exclude=train)
    assert items.shape == (train.num_users, 5) and (items >= 0).all()
    seen = set(zip(train.users.tolist(), train.items.tolist(), strict=True))
    assert not any((u, i) in seen for u, row in enumerate(items.tolist()) for i in row)
    torch.testing.assert_close(scores[:, 0].double(), model.predict(users, items[:, 0]).double(),
                               rtol=1e-4, atol=1e-4)
    path = model.save(tmp_path / name, optimizer=optimizer)
    loaded = fastmf.load_checkpoint(path)
    assert type(loaded.model) is cls
    assert type(loaded.optimizer) is type(optimizer)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)
    assert torch.equal(loaded.model.recommend(users, 5, exclude=train)[0], items)


@pytest.mark.parametrize("name", [n for n in REGISTERED
                                  if not checkpoint.MODELS[n].uses_timestamps])
def test_models_that_skip_timestamps_never_read_them(name, split, monkeypatch):
    """``uses_timestamps = False`` only spares batches() the per-epoch shuffle of what the
    step never reads: the same weights as a fit whose batches carry the timestamps."""
    cls = checkpoint.MODELS[name]
    train, _ = split
    assert train.timestamps is not None
    states = []
    for flag in (False, True):
        monkeypatch.setattr(cls, "uses_timestamps", flag)
        torch.manual_seed(0)
        model = cls.from_interactions(train, **dict(getattr(cls, "test_config", {}) or {}))
        fastmf.fit(model, train, loss=cls.default_loss, epochs=2, batch_size=256, seed=0,
                   progress=False)
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


# -- id checks of the scoring entry points ---------------------------------------------------

@pytest.fixture(scope="module")
def audit_data():
    return fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)


def _scoring_model(name: str, data):
    """A small trained (or randomly initialised) model of each kind, sized 50 x 40."""
    from fastmf.models import ALS, Hybrid, Item2Vec

    torch.manual_seed(0)
    if name == "MF":
        return fastmf.MF(50, 40, dim=4)
    if name == "ALS":
        model = ALS(50, 40, dim=4)
        model.fit(data, epochs=2)
        return model
    if name == "Item2Vec":
        model = Item2Vec(40, dim=4, min_count=1)
        fastmf.fit(model, data, epochs=1, progress=False)
        return model
    model = Hybrid(50, 40, dim=4)
    with torch.no_grad():
        model.users.bias.weight.uniform_(-1, 1)
        model.items.bias.weight.uniform_(-1, 1)
    return model


# (users, items) -> (error, the part of the message every model shares with MF's mf_forward)
BAD_PAIRS = [
    (([-1], [0]), IndexError, r"users id -1 out of range \[0, 50\)"),
    (([50], [0]), IndexError, r"users id 50 out of range \[0, 50\)"),
    (([0], [-1]), IndexError, r"items id -1 out of range \[0, 40\)"),
    (([0], [40]), IndexError, r"items id 40 out of range \[0, 40\)"),
    (([3, 0, 2], [1, 2, 40]), IndexError, r"items id 40 out of range \[0, 40\)"),
    ((torch.tensor([0.9]), torch.tensor([0])), TypeError, "users must be int32 or int64"),
    ((torch.tensor([0]), torch.tensor([1.9])), TypeError, "items must be int32 or int64"),
    ((torch.tensor([0.9]), torch.tensor([1.9])), TypeError, "users must be int32 or int64"),
    (([0.9], [0]), TypeError, "users must be integer ids, got dtype float64"),
    (([0], np.array([1.0])), TypeError, "items must be integer ids, got dtype float64"),
    (([0], [0, 1, 2]), ValueError, r"lengths differ \(users has 1, items has 3\)"),
    (([0, 1], [0]), ValueError, r"lengths differ \(users has 2, items has 1\)"),
    ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5])), ValueError,
     r"lengths differ \(users has 2, items has 1\)"),
    # lengths are checked before ranges, as mf_forward checks them
    (([-1, 0], [0]), ValueError, r"lengths differ \(users has 2, items has 1\)"),
]


@pytest.mark.parametrize("name", ["MF", "ALS", "Item2Vec", "Hybrid"])
def test_scoring_refuses_bad_ids_as_mf_does(name, audit_data):
    """Negative ids used to wrap to the last rows, float ids were truncated and unequal
    lengths broadcast in ALS, Item2Vec and Hybrid; they now raise what MF raises, naming
    the model's method, the argument and the value."""
    model = _scoring_model(name, audit_data)
    for (users, items), error, message in BAD_PAIRS:
        for call in (model.predict, model.forward, model):
            with pytest.raises(error, match=message) as caught:
                call(users, items)
            if name != "MF":  # MF's are its op's: fastmf.mf_forward
                assert str(caught.value).startswith(f"fastmf.models.{name}.forward: "), (
                    str(caught.value))


@pytest.mark.parametrize("name", ["MF", "ALS", "Item2Vec", "Hybrid"])
def test_user_vectors_and_score_items_refuse_bad_ids(name, audit_data):
    model = _scoring_model(name, audit_data)
    prefix = r"^fastmf\.MF\." if name == "MF" else rf"^fastmf\.models\.{name}\."
    for users, error, message in [
        ([-1], IndexError, r"users id -1 out of range \[0, 50\)"),
        (torch.tensor([4, 50]), IndexError, r"users id 50 out of range \[0, 50\)"),
        (np.array([3, -2], dtype=np.int32), IndexError, r"users id -2 out of range \[0, 50\)"),
        (torch.tensor([0.9]), TypeError, "users must be int32 or int64, got torch.float32"),
        ([0.5], TypeError, "users must be integer ids, got dtype float64"),
        (torch.tensor([[0, 1]]), ValueError, r"users must be 1-D, got shape \(1, 2\)"),
    ]:
        with pytest.raises(error, match=prefix + "user_vectors: " + message):
            model.user_vectors(users)
        with pytest.raises(error, match=prefix + "score_items: " + message):
            model.score_items(users, [0, 1])
    for items, error, message in [
        ([-1], IndexError, r"items id -1 out of range \[0, 40\)"),
        (torch.tensor([40]), IndexError, r"items id 40 out of range \[0, 40\)"),
        (torch.tensor([1.0]), TypeError, "items must be int32 or int64"),
    ]:
        with pytest.raises(error, match=prefix + "score_items: " + message):
            model.score_items([0, 1], items)


@pytest.mark.parametrize("name", ["MF", "ALS", "Item2Vec", "Hybrid"])
def test_good_ids_in_every_form_score_alike(name, audit_data):
    """int32 and int64 tensors, numpy arrays and lists, Zipf-random with duplicates: the same
    scores (bit for bit) as int64 tensors, those of score_items and of the vectors."""
    model = _scoring_model(name, audit_data)
    rng = np.random.default_rng(3)
    users = (rng.zipf(1.4, 300) - 1) % 50
    items = (rng.zipf(1.4, 300) - 1) % 40
    users[:2], items[:2] = [0, 49], [39, 0]
    assert len(np.unique(users)) < len(users)  # duplicates
    reference = model.predict(torch.as_tensor(users), torch.as_tensor(items))
    assert reference.shape == (300,) and torch.isfinite(reference).all()
    assert (reference != 0).sum() > 250
    forms = [lambda a: torch.as_tensor(a, dtype=torch.int32), lambda a: a,
             lambda a: a.astype(np.int32), lambda a: a.tolist(),
             lambda a: torch.as_tensor(a)]
    for form_u in forms:
        for form_i in forms:
            assert torch.equal(model.predict(form_u(users), form_i(items)), reference)
    assert torch.equal(model(torch.as_tensor(users), torch.as_tensor(items)).detach(),
                       reference)
    grid = model.score_items(users[:7].tolist(), torch.as_tensor(items[:9], dtype=torch.int32))
    pairs = model.predict(torch.as_tensor(users[:7]).repeat_interleave(9),
                          torch.as_tensor(items[:9]).repeat(7))
    torch.testing.assert_close(grid, pairs.view(7, 9))
    vectors, offset = model.user_vectors(users.astype(np.int32))
    item_vecs, bias = model.item_vectors()
    via = (vectors.detach() * item_vecs.detach()[torch.as_tensor(items)]).sum(1)
    via = via + (0 if offset is None else offset.detach())
    via = via + (0 if bias is None else bias.detach()[torch.as_tensor(items)])
    torch.testing.assert_close(via, reference, rtol=1e-5, atol=1e-6)
    assert model.predict([], []).shape == (0,)


@pytest.mark.parametrize("name", ["ALS", "Item2Vec", "Hybrid"])
def test_training_never_runs_the_id_checks_of_scoring(name, audit_data, monkeypatch):
    """fit's epochs go through the models' own steps (ALS's sweeps, Item2Vec's SGNS step,
    Hybrid's pooled steps, fused or batch by batch), not forward: the serving checks cost
    training nothing."""
    calls = []
    original = Recommender.pair_ids

    def counting(self, users, items, method="forward"):
        calls.append(method)
        return original(self, users, items, method)

    monkeypatch.setattr(Recommender, "pair_ids", counting)
    model = _scoring_model(name, audit_data)
    for loss in (model.default_loss,) + (("warp", "mse") if name == "Hybrid" else ()):
        fastmf.fit(model, audit_data, loss=loss, epochs=1, batch_size=128, progress=False)
    assert calls == []
    model.predict([0], [1])
    assert calls == ["forward"]
    # raw ids (the model now holds the data's id maps): the same length check
    with pytest.raises(ValueError, match=rf"{name}.predict: lengths differ \(users has 1, "
                                         r"items has 2\)"):
        model.predict([0], [1, 2], raw_ids=True)


def test_as_ids_and_pair_ids_of_any_model():
    model = ProtoDot(6, 4, dim=3)
    # Without a bound: converted only (the ops check them), as before.
    assert torch.equal(model.as_ids([1, 2], "users"), torch.tensor([1, 2]))
    floats = torch.tensor([0.5])
    assert model.as_ids(floats, "users") is floats
    ids = torch.tensor([5, 0], dtype=torch.int32)
    assert model.as_ids(ids, "users", 6, method="forward") is ids
    with pytest.raises(IndexError, match=r"ProtoDot.rank: users id 6 out of range \[0, 6\)"):
        model.as_ids([6], "users", 6, method="rank")
    with pytest.raises(TypeError, match="ProtoDot.rank: users must be integer ids"):
        model.as_ids([1.5], "users", 6, method="rank")
    users, items = model.pair_ids(np.array([5, 0]), torch.tensor([3, 3], dtype=torch.int32))
    assert users.dtype == torch.int64 and items.dtype == torch.int32
    with pytest.raises(ValueError, match=r"ProtoDot.predict: lengths differ \(users has 1, "
                                         r"items has 2\)"):
        model.pair_ids([5], [3, 3], "predict")
    with pytest.raises(IndexError, match=r"ProtoDot.predict: items id 4 out of range \[0, 4\)"):
        model.pair_ids([5], [4], "predict")
