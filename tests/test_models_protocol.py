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
        kw = dict(backend=backend, device=device, dtype=dtype)
        self.user_emb = fastmf.nn.Embedding(num_users, dim, **kw)
        self.item_emb = fastmf.nn.Embedding(num_items, dim, **kw)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden, device=device, dtype=dtype),
                                 nn.ReLU(), nn.Linear(hidden, 1, device=device, dtype=dtype))

    def get_config(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "hidden": self.hidden, "dtype": str(self.dtype).removeprefix("torch.")}

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
