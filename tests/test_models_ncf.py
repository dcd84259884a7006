"""GMF, MLP and NeuMF against a textbook PyTorch NeuMF (nn.Embedding + nn.Linear) holding
the same weights: forward, gradients, training steps, pretraining, scoring, bad input."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmf
from fastmf.models import ncf
from fastmf.models._rows import unique_ids
from fastmf.models.base import Batch, Recommender
from fastmf.models.ncf import GMF, MLP, NeuMF
from fastmf.optim import CombinedOptimizer
from fastmf.testing import BACKENDS

NUM_USERS, NUM_ITEMS = 37, 53


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Textbook(nn.Module):
    """The paper's NeuMF written plainly: any tower may be absent (GMF: no MLP; MLP: no
    GMF)."""

    def __init__(self, gmf_dim, layers, dropout=0.0, sparse=False, dtype=torch.float32):
        super().__init__()
        self.gmf_dim, self.layers, self.dropout = gmf_dim, layers, dropout
        if gmf_dim:
            self.gmf_u = nn.Embedding(NUM_USERS, gmf_dim, sparse=sparse, dtype=dtype)
            self.gmf_i = nn.Embedding(NUM_ITEMS, gmf_dim, sparse=sparse, dtype=dtype)
        if layers:
            self.mlp_u = nn.Embedding(NUM_USERS, layers[0] // 2, sparse=sparse, dtype=dtype)
            self.mlp_i = nn.Embedding(NUM_ITEMS, layers[0] // 2, sparse=sparse, dtype=dtype)
            self.hidden = nn.ModuleList(nn.Linear(a, b, dtype=dtype)
                                        for a, b in zip(layers[:-1], layers[1:]))
        self.out = nn.Linear((gmf_dim or 0) + (layers[-1] if layers else 0), 1, dtype=dtype)

    def tables(self):
        return [t for name in ("gmf_u", "gmf_i", "mlp_u", "mlp_i")
                for t in [getattr(self, name, None)] if t is not None]

    def rows(self, users, items):
        out = []
        if self.gmf_dim:
            out.append((self.gmf_u(users), self.gmf_i(items)))
        if self.layers:
            out.append((self.mlp_u(users), self.mlp_i(items)))
        return out

    def forward(self, users, items):
        parts = []
        if self.gmf_dim:
            parts.append(self.gmf_u(users) * self.gmf_i(items))
        if self.layers:
            z = torch.cat([self.mlp_u(users), self.mlp_i(items)], -1)
            for layer in self.hidden:
                z = torch.relu(layer(F.dropout(z, self.dropout, self.training)))
            parts.append(z)
        return self.out(torch.cat(parts, -1)).squeeze(-1)

    @torch.no_grad()
    def copy_from(self, model):
        pairs = {"gmf_u": None, "gmf_i": None, "mlp_u": None, "mlp_i": None}
        if isinstance(model, GMF):
            pairs.update(gmf_u=model.user_embedding, gmf_i=model.item_embedding)
        elif isinstance(model, MLP):
            pairs.update(mlp_u=model.user_embedding, mlp_i=model.item_embedding)
        else:
            pairs.update(gmf_u=model.gmf_user_embedding, gmf_i=model.gmf_item_embedding,
                         mlp_u=model.mlp_user_embedding, mlp_i=model.mlp_item_embedding)
        for name, table in pairs.items():
            if table is not None:
                getattr(self, name).weight.copy_(table.weight)
        if self.layers:
            self.hidden.load_state_dict(model.hidden.state_dict())
        self.out.load_state_dict(model.output.state_dict())
        return self


def build(kind, dtype=torch.float32, dropout=0.0, layers=(16, 12, 6), backend="auto"):
    """A fastmf model with fresh random (not init-scale) weights and its textbook twin."""
    if kind == "gmf":
        model = GMF(NUM_USERS, NUM_ITEMS, dim=5, dtype=dtype, backend=backend)
        twin = (5, None)
    elif kind == "mlp":
        model = MLP(NUM_USERS, NUM_ITEMS, layers=layers, dropout=dropout, dtype=dtype,
                    backend=backend)
        twin = (None, layers)
    else:
        model = NeuMF(NUM_USERS, NUM_ITEMS, gmf_dim=5, layers=layers, dropout=dropout,
                      dtype=dtype, backend=backend)
        twin = (5, layers)
    with torch.no_grad():
        for p in model.parameters():  # O(1) values, so differences are not hidden by scale
            p.uniform_(-0.7, 0.7)
    return model, Textbook(*twin, dropout=dropout, dtype=dtype).copy_from(model)


def zipf_ids(rng, n, limit):
    return torch.as_tensor((rng.zipf(1.3, n) - 1) % limit)


@pytest.mark.parametrize("kind", ["gmf", "mlp", "neumf"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_equals_textbook(kind, id_dtype):
    rng = np.random.default_rng(1)
    model, twin = build(kind)
    users = zipf_ids(rng, 300, NUM_USERS).to(id_dtype)
    items = zipf_ids(rng, 300, NUM_ITEMS).to(id_dtype)
    assert len(torch.unique(users)) < 300  # duplicates
    expected = twin(users.long(), items.long())
    torch.testing.assert_close(model(users, items), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.predict(users, items) if hasattr(model, "predict")
                               else model(users, items).detach(), expected.detach(),
                               rtol=1e-5, atol=1e-5)
    empty = model(torch.zeros(0, dtype=id_dtype), torch.zeros(0, dtype=id_dtype))
    assert empty.shape == (0,)


def test_forward_float64_and_lists():
    model, twin = build("neumf", dtype=torch.float64)
    users, items = [3, 3, 0, 36], np.array([52, 1, 1, 0])
    out = model(users, items)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, twin(torch.tensor(users), torch.as_tensor(items)))


@pytest.mark.parametrize("kind", ["mlp", "neumf"])
def test_dropout_matches_textbook_masks(kind):
    rng = np.random.default_rng(2)
    model, twin = build(kind, dropout=0.3)
    users, items = zipf_ids(rng, 64, NUM_USERS), zipf_ids(rng, 64, NUM_ITEMS)
    torch.manual_seed(0)
    train_out = model(users, items)
    torch.manual_seed(0)
    torch.testing.assert_close(train_out, twin(users, items), rtol=1e-5, atol=1e-5)
    model.eval()
    twin.eval()
    torch.testing.assert_close(model(users, items), twin(users, items), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(users, items), model(users, items))


def textbook_loss(twin, users, items, negatives, loss, reg):
    """The unfused loss on the flattened batch: bce over the pairs (u, i) and (u, j), bpr
    over the (u, i, j) triples; plus reg times the squared norms of every row looked up
    (the user's once per scored pair), over B."""
    n = negatives.shape[1]
    repeated, j = users.repeat_interleave(n), negatives.reshape(-1)
    if loss == "bce":
        u, i = torch.cat([users, repeated]), torch.cat([items, j])
        labels = torch.cat([torch.ones(len(users)), torch.zeros(len(users) * n)])
        value = F.binary_cross_entropy_with_logits(twin(u, i), labels.to(twin.out.weight))
    else:
        value = F.softplus(twin(repeated, j).view(-1, n) - twin(users, items)[:, None]).mean()
    u, i = torch.cat([users, repeated]), torch.cat([items, j])
    penalty = sum(p.pow(2).sum() + q.pow(2).sum() for p, q in twin.rows(u, i))
    return value + reg * penalty / len(users)


# Under BPR some dense gradients cancel exactly in theory (the output bias always; a hidden
# bias whose units are active for both items of every triple), leaving rounding noise that
# Adam with eps=1e-8 scales up to steps of size lr in either direction, differently in the
# two models. A larger eps keeps such noise small without changing the real steps much.
DENSE_EPS = 1e-4


def fused_optimizers(model, name, lr, dense_lr):
    tables = [m.weight for m in model.modules() if isinstance(m, fastmf.nn.Embedding)]
    dense = [p for n, p in model.named_parameters() if "embedding" not in n]
    sparse = (fastmf.optim.SparseAdam(tables, lr=lr) if name == "adam"
              else fastmf.optim.SparseAdagrad(tables, lr=lr))
    return CombinedOptimizer([fastmf.optim.apply_in_backward(sparse),
                              torch.optim.Adam(dense, lr=dense_lr, eps=DENSE_EPS)])


def textbook_optimizers(twin, name, lr, dense_lr):
    tables = [t.weight for t in twin.tables()]
    dense = [p for n, p in twin.named_parameters() if not n.endswith(("_u.weight",
                                                                      "_i.weight"))]
    sparse = (torch.optim.SparseAdam(tables, lr=lr) if name == "adam"
              else torch.optim.Adagrad(tables, lr=lr))
    return CombinedOptimizer([sparse, torch.optim.Adam(dense, lr=dense_lr, eps=DENSE_EPS)])


@pytest.mark.parametrize("kind,loss,opt,reg", [
    ("gmf", "bce", "adam", 0.0), ("mlp", "bpr", "adagrad", 0.05),
    ("neumf", "bce", "adagrad", 0.05), ("neumf", "bpr", "adam", 0.0),
])
def test_training_steps_equal_textbook(kind, loss, opt, reg):
    check_training_steps(kind, loss, opt, reg, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_equal_textbook_on_every_backend(backend):
    check_training_steps("neumf", "bce", "adam", 0.01, backend)


def check_training_steps(kind, loss, opt, reg, backend):
    """Three steps of the model's training step (tables updated by a fastmf optimizer in
    backward; the pairs' gradients summed into the distinct rows by the tables' backend's
    scatter_rows) against backward + step of the textbook model on nn.Embedding(sparse=True)
    with torch's sparse optimizers: same losses, same weights after every step."""
    rng = np.random.default_rng(3)
    model, _ = build(kind, backend=backend)
    twin = Textbook(*( (5, None) if kind == "gmf" else (None, (16, 12, 6)) if kind == "mlp"
                       else (5, (16, 12, 6))), sparse=True).copy_from(model)
    mine = fused_optimizers(model, opt, lr=0.05, dense_lr=0.01)
    theirs = textbook_optimizers(twin, opt, lr=0.05, dense_lr=0.01)
    for _ in range(3):
        users, items = zipf_ids(rng, 48, NUM_USERS), zipf_ids(rng, 48, NUM_ITEMS)
        negatives = zipf_ids(rng, 48 * 3, NUM_ITEMS).reshape(48, 3)
        value, count = model.training_step(Batch(users, items, negatives=negatives), mine,
                                           loss=loss, reg=reg)
        assert count == (48 * 4 if loss == "bce" else 48 * 3)
        theirs.zero_grad()
        expected = textbook_loss(twin, users, items, negatives, loss, reg)
        expected.backward()
        theirs.step()
        torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=1e-6)
        for table in model.modules():
            assert not isinstance(table, fastmf.nn.Embedding) or table.weight.grad is None
        check = Textbook(*((twin.gmf_dim, twin.layers))).copy_from(model)
        for (name, a), b in zip(check.named_parameters(), twin.parameters()):
            if loss == "bpr" and name == "out.bias":
                continue  # cancels in x_ui - x_uj: its gradient is pure rounding noise
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6,
                                       msg=lambda m, name=name: name + m)


def test_gradients_equal_textbook():
    """Plain sparse gradients (no optimizer in backward) of the training loss."""
    rng = np.random.default_rng(4)
    model, _ = build("neumf")
    twin = Textbook(5, (16, 12, 6), sparse=True).copy_from(model)
    users, items = zipf_ids(rng, 40, NUM_USERS), zipf_ids(rng, 40, NUM_ITEMS)
    negatives = zipf_ids(rng, 80, NUM_ITEMS).reshape(40, 2)

    class Backward:
        def zero_grad(self):
            model.zero_grad()

        def step(self):
            pass

    model.training_step(Batch(users, items, negatives=negatives), Backward(), loss="bce",
                        reg=0.1)
    textbook_loss(twin, users, items, negatives, "bce", 0.1).backward()
    grads = dict(model.named_parameters())
    pairs = [("gmf_user_embedding", "gmf_u"), ("gmf_item_embedding", "gmf_i"),
             ("mlp_user_embedding", "mlp_u"), ("mlp_item_embedding", "mlp_i")]
    for mine, theirs in pairs:
        got = grads[f"{mine}.weight"].grad
        assert got.is_sparse
        torch.testing.assert_close(got.to_dense(), getattr(twin, theirs).weight.grad.to_dense(),
                                   rtol=1e-5, atol=1e-6)
    for layer, other in zip(model.hidden, twin.hidden):
        torch.testing.assert_close(layer.weight.grad, other.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.output.weight.grad, twin.out.weight.grad, rtol=1e-5,
                               atol=1e-6)


def test_layer_reg_adds_keras_l2():
    rng = np.random.default_rng(5)
    model, _ = build("mlp")
    users, items = zipf_ids(rng, 20, NUM_USERS), zipf_ids(rng, 20, NUM_ITEMS)
    negatives = zipf_ids(rng, 20, NUM_ITEMS).reshape(20, 1)
    batch = Batch(users, items, negatives=negatives)
    noop = CombinedOptimizer([torch.optim.SGD(model.parameters(), lr=0.0)])
    base, _ = model.training_step(batch, noop, loss="bce", reg=0.0)
    model.layer_reg = 0.01
    with_l2, _ = model.training_step(batch, noop, loss="bce", reg=0.0)
    penalty = 0.01 * sum(float(layer.weight.pow(2).sum()) for layer in model.hidden)
    assert penalty > 0
    assert float(with_l2 - base) == pytest.approx(penalty, rel=1e-5)


def test_from_pretrained_numbers():
    rng = np.random.default_rng(6)
    gmf, _ = build("gmf")
    mlp, _ = build("mlp", dropout=0.2)
    mlp.layer_reg = 0.001
    model = NeuMF.from_pretrained(gmf, mlp, alpha=0.3)
    assert (model.gmf_dim, model.layers, model.dropout, model.layer_reg) == (
        5, (16, 12, 6), 0.2, 0.001)
    torch.testing.assert_close(model.gmf_item_embedding.weight, gmf.item_embedding.weight)
    torch.testing.assert_close(model.mlp_user_embedding.weight, mlp.user_embedding.weight)
    torch.testing.assert_close(model.hidden[1].bias, mlp.hidden[1].bias)
    torch.testing.assert_close(model.output.weight,
                               torch.cat([0.3 * gmf.output.weight, 0.7 * mlp.output.weight], 1))
    torch.testing.assert_close(model.output.bias,
                               0.3 * gmf.output.bias + 0.7 * mlp.output.bias)
    for m in (gmf, mlp, model):
        m.eval()
    users, items = zipf_ids(rng, 100, NUM_USERS), zipf_ids(rng, 100, NUM_ITEMS)
    torch.testing.assert_close(model(users, items),
                               0.3 * gmf(users, items) + 0.7 * mlp(users, items),
                               rtol=1e-5, atol=1e-5)
    # The copy is deep: training the NeuMF leaves the towers alone.
    before = gmf.user_embedding.weight.clone()
    with torch.no_grad():
        model.gmf_user_embedding.weight.add_(1.0)
    torch.testing.assert_close(gmf.user_embedding.weight, before)


def test_from_pretrained_bad_input():
    gmf, mlp = GMF(NUM_USERS, NUM_ITEMS, 4), MLP(NUM_USERS, NUM_ITEMS, (8, 4))
    with pytest.raises(ValueError, match="num_users=36"):
        NeuMF.from_pretrained(GMF(NUM_USERS - 1, NUM_ITEMS), mlp)
    with pytest.raises(ValueError, match="num_items"):
        NeuMF.from_pretrained(gmf, MLP(NUM_USERS, NUM_ITEMS + 1, (8, 4)))
    with pytest.raises(ValueError, match=r"gmf_dim=8 but gmf has dim=4"):
        NeuMF.from_pretrained(gmf, mlp, gmf_dim=8)
    with pytest.raises(ValueError, match=r"layers=\(8, 2\) but mlp has layers=\(8, 4\)"):
        NeuMF.from_pretrained(gmf, mlp, layers=(8, 2))
    with pytest.raises(ValueError, match="alpha"):
        NeuMF.from_pretrained(gmf, mlp, alpha=1.5)
    with pytest.raises(TypeError, match="mlp must be a fastmf.models.MLP"):
        NeuMF.from_pretrained(gmf, gmf)
    swapped = MLP(NUM_USERS, NUM_ITEMS, (8, 4))
    swapped.hidden[0] = nn.Linear(8, 3)
    with pytest.raises(ValueError, match=r"mlp.hidden.0.weight has shape \(3, 8\)"):
        NeuMF.from_pretrained(gmf, swapped)
    with pytest.raises(ValueError, match="float64"):
        NeuMF.from_pretrained(GMF(NUM_USERS, NUM_ITEMS, 4, dtype=torch.float64), mlp)
    assert NeuMF.from_pretrained(gmf, mlp, gmf_dim=4, layers=[8, 4]).layers == (8, 4)


@pytest.mark.parametrize("kind", ["gmf", "mlp", "neumf"])
def test_score_items_equals_forward(kind):
    rng = np.random.default_rng(7)
    model, twin = build(kind)
    users = zipf_ids(rng, 6, NUM_USERS).to(torch.int32)
    items = torch.as_tensor(rng.permutation(NUM_ITEMS)[:20])
    scores = model.score_items(users, items)
    assert scores.shape == (6, 20) and not scores.requires_grad
    expected = twin(users.long().repeat_interleave(20), items.repeat(6)).reshape(6, 20)
    torch.testing.assert_close(scores, expected.detach(), rtol=1e-5, atol=1e-5)


def test_gmf_vectors_give_forward():
    rng = np.random.default_rng(8)
    model, _ = build("gmf")
    users, items = zipf_ids(rng, 50, NUM_USERS), zipf_ids(rng, 50, NUM_ITEMS)
    vectors, offset = model.user_vectors(users)
    item_vectors, bias = model.item_vectors()
    assert bias is None and item_vectors.shape == (NUM_ITEMS, 5)
    torch.testing.assert_close((vectors * item_vectors[items]).sum(1) + offset,
                               model(users, items), rtol=1e-5, atol=1e-6)


def test_config_rebuilds_architecture():
    for model in (GMF(9, 8, dim=3), MLP(9, 8, layers=[6, 4], dropout=0.1, layer_reg=0.01),
                  NeuMF(9, 8, gmf_dim=2, layers=(4,), dropout=0.5)):
        config = model.get_config()
        rebuilt = type(model)(**config)
        assert rebuilt.get_config() == config
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}
    assert [m.out_features for m in MLP(9, 8, layers=(64, 32, 16, 8)).hidden] == [32, 16, 8]
    assert MLP(9, 8, layers=(64, 32, 16, 8)).user_embedding.dim == 32


@pytest.mark.parametrize("make,match", [
    (lambda: MLP(5, 5, layers=()), "non-empty tuple"),
    (lambda: MLP(5, 5, layers=(7, 4)), r"layers\[0\] must be even"),
    (lambda: MLP(5, 5, layers=(8, 0)), "positive ints"),
    (lambda: NeuMF(5, 5, layers=(8, 4.0)), "positive ints"),
    (lambda: NeuMF(5, 5, layers=8), "non-empty tuple"),
    (lambda: MLP(5, 5, dropout=1.0), r"dropout must be a float in \[0, 1\), got 1.0"),
    (lambda: NeuMF(5, 5, dropout=-0.1), "dropout"),
    (lambda: GMF(0, 5), "fastmf.models.GMF: num_users must be a positive int, got 0"),
    (lambda: NeuMF(5, 5, gmf_dim=True), "gmf_dim"),
    (lambda: MLP(5, 5, layer_reg=-1.0), "layer_reg"),
])
def test_bad_constructor_args(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_forward_input():
    model = NeuMF(5, 6, gmf_dim=2, layers=(4, 2))
    with pytest.raises(ValueError, match="same length"):
        model(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="int32 or int64"):
        model(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integer ids"):
        model([0.5], [1])
    with pytest.raises(IndexError):
        model(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(TypeError, match="float32 or float64"):
        GMF(5, 5, dtype=torch.float16)


@pytest.mark.parametrize("kind,loss", [("gmf", "bpr"), ("mlp", "bce"), ("neumf", "bce"),
                                       ("neumf", "bpr")])
def test_training_step_equals_the_base_class_step(kind, loss):
    """The broadcast step (each user embedded once) gives the loss and the update of the
    protocol's default step, which scores the flattened pairs through forward."""
    rng = np.random.default_rng(9)
    model, _ = build(kind)
    # Not copy.deepcopy: a copied table is not known as a fastmf.nn table until its first
    # lookup, so make_optimizer would put it under dense Adam.
    other = type(model)(**model.get_config())
    other.load_state_dict(model.state_dict())
    users, items = zipf_ids(rng, 32, NUM_USERS), zipf_ids(rng, 32, NUM_ITEMS)
    batch = Batch(users, items, negatives=zipf_ids(rng, 64, NUM_ITEMS).reshape(32, 2),
                  weights=torch.rand(32) + 0.5)
    mine, count = model.training_step(batch, model.make_optimizer("adagrad", 0.05), loss=loss,
                                      reg=0.03)
    theirs, base_count = Recommender.training_step(
        other, batch, other.make_optimizer("adagrad", 0.05), loss=loss, reg=0.03)
    assert count == base_count
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        if loss == "bpr" and name == "output.bias":
            continue  # cancels in x_ui - x_uj: Adam's step on its rounding noise is arbitrary
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: name + m)


def test_make_optimizer_adam_on_tables_in_backward():
    model = NeuMF(9, 8, gmf_dim=2, layers=(4, 2))
    opt = model.make_optimizer(None, 0.01)
    sparse, dense = opt.optimizers
    assert isinstance(sparse, fastmf.optim.SparseAdam) and sparse.param_groups[0]["lr"] == 0.01
    assert isinstance(dense, torch.optim.Adam)
    assert dense.param_groups[0]["lr"] == NeuMF.dense_lr
    assert len(sparse.param_groups[0]["params"]) == 4
    assert isinstance(NeuMF(9, 8).make_optimizer("adagrad", 0.1).optimizers[0],
                      fastmf.optim.SparseAdagrad)


def _brute_force_top(model, users, k, seen):
    with torch.no_grad():
        scores = model(users.repeat_interleave(NUM_ITEMS),
                       torch.arange(NUM_ITEMS).repeat(len(users))).view(len(users), -1)
    scores = scores.masked_fill(seen[users], float("-inf"))
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("kind", ["gmf", "mlp", "neumf"])
def test_recommend_excludes_seen_items_and_ranks_like_forward(kind):
    rng = np.random.default_rng(10)
    model, _ = build(kind)
    train = fastmf.data.Interactions(zipf_ids(rng, 400, NUM_USERS).numpy(),
                                     zipf_ids(rng, 400, NUM_ITEMS).numpy(),
                                     user_map=NUM_USERS, item_map=NUM_ITEMS)
    seen = torch.as_tensor(train.to_csr(binary=True).toarray() > 0)
    users = torch.tensor([0, 1, 5, 36, 0])
    items, scores = model.recommend(users, k=7, exclude=train)
    top_scores, top_items = _brute_force_top(model, users, 7, seen)
    assert not seen[users.unsqueeze(1), items].any()
    torch.testing.assert_close(scores, top_scores, rtol=1e-5, atol=1e-6)
    # Items may swap only where their scores tie within rounding.
    same = items == top_items
    assert same.float().mean() > 0.9
    # Candidates: only those items come back.
    cand, _ = model.recommend(users, k=3, items=torch.tensor([4, 9, 50, 2]))
    assert set(cand.flatten().tolist()) <= {4, 9, 50, 2}


def test_score_items_chunks_like_one_call(monkeypatch):
    model, _ = build("neumf")
    users, items = torch.arange(NUM_USERS), torch.arange(NUM_ITEMS)
    whole = model.score_items(users, items)
    monkeypatch.setattr(ncf, "SCORE_CHUNK", NUM_ITEMS * 12 * 3)  # 3 users per chunk
    torch.testing.assert_close(model.score_items(users, items), whole)
    assert model.score_items(users[:0], items).shape == (0, NUM_ITEMS)


def test_models_without_item_vectors_refuse_similar_items():
    model = MLP(9, 8, layers=(4, 2))
    with pytest.raises(TypeError, match="fastmf.models.MLP.similar_items: the model has no "
                                        "item vectors"):
        model.similar_items([0])
    assert not model.has_vectors and GMF(9, 8).has_vectors
    items, _ = GMF(9, 8).similar_items([3], k=4)
    assert 3 not in items.tolist()


def test_config_dtype_round_trip():
    model = NeuMF(9, 8, gmf_dim=2, layers=(4,), dtype=torch.float64)
    config = model.get_config()
    assert config["dtype"] == "float64"
    assert type(model)(**config).output.weight.dtype == torch.float64


class _KeepGradients:
    """An optimizer that only clears gradients: the step's gradients stay on the model."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self):
        self.model.zero_grad()

    def step(self):
        pass


def _dense_grad(param):
    grad = param.grad
    if grad is None:
        return torch.zeros_like(param)
    return grad.to_dense() if grad.is_sparse else grad


@pytest.mark.parametrize("kind", ["gmf", "mlp", "neumf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("size", [0, 1, 7, 300])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_split_first_layer_equals_concatenation(kind, dtype, n, size, loss):
    """The training step (distinct rows looked up once, the first layer split into its user
    and item halves, GMF's weighted dot on the distinct rows, the hand-written backwards)
    against autograd on the plain concatenation [p_u, q_i] of every scored pair: same loss
    and gradients of every parameter, to float32 rounding (float64: to 1e-12; the split
    sums each first-layer unit as two partial dot products, so not bit for bit)."""
    rng = np.random.default_rng(100 + size + 10 * n)
    model, twin = build(kind, dtype=dtype)
    users = zipf_ids(rng, size, NUM_USERS)
    if size > 1:
        users[-1] = users[0]  # at least one user twice
        assert len(torch.unique(users)) < size
    items = zipf_ids(rng, size, NUM_ITEMS)
    negatives = zipf_ids(rng, size * n, NUM_ITEMS).reshape(size, n)
    value, count = model.training_step(Batch(users, items, negatives=negatives),
                                       _KeepGradients(model), loss=loss, reg=0.05)
    if size:
        expected = textbook_loss(twin, users, items, negatives, loss, 0.05)
        expected.backward()
    else:  # the protocol's losses are 0 on an empty batch (no NaN from a mean over nothing)
        expected = torch.zeros((), dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                           atol=1e-14)
    assert count == size * (n + 1 if loss == "bce" else n)
    assert value.dtype == dtype
    torch.testing.assert_close(value, expected.detach(), **tol)
    theirs = dict(twin.named_parameters())
    side = "gmf" if kind == "gmf" else "mlp"
    names = {"user_embedding": f"{side}_u", "item_embedding": f"{side}_i", "gmf_user_embedding":
             "gmf_u", "gmf_item_embedding": "gmf_i", "mlp_user_embedding": "mlp_u",
             "mlp_item_embedding": "mlp_i", "output": "out"}
    for name, param in model.named_parameters():
        head, _, rest = name.partition(".")
        other = theirs[f"{names.get(head, head)}.{rest}"]
        assert other.shape == param.shape
        torch.testing.assert_close(_dense_grad(param), _dense_grad(other), **tol,
                                   msg=lambda m, name=name: name + m)
    if size:
        assert _dense_grad(model.output.weight).abs().sum() > 0
        if kind != "gmf":
            assert _dense_grad(model.hidden[0].weight).abs().sum() > 0


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (1,), (300, 1), (300, 5)])
@pytest.mark.parametrize("size", [40, 100_000])
def test_unique_ids_match_torch_unique(id_dtype, shape, size):
    """The training steps' distinct ids (the dense-mark path where a batch covers much of
    the table, torch.unique otherwise): ascending distinct ids and each id's position
    among them, as torch.unique gives them, for Zipf ids with repeats."""
    rng = np.random.default_rng(sum(shape) + size)
    ids = zipf_ids(rng, int(np.prod(shape)), size).to(id_dtype).view(shape)
    distinct, where = unique_ids(ids, size)
    expected, inverse = torch.unique(ids.reshape(-1).long(), return_inverse=True)
    assert torch.equal(distinct.long(), expected)
    assert where.shape == ids.shape and where.dtype == torch.int64
    assert torch.equal(where.reshape(-1), inverse)
    assert torch.equal(distinct[where].to(id_dtype), ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tower_broadcast_and_forward_gradients_equal_concatenation(dtype):
    """The tower's other entry points: forward on 1-D ids (users and items the same shape)
    and score_items' broadcast (users (R, 1) against items (1, M)), values and the
    gradients of a weighted sum against autograd on the concatenation."""
    rng = np.random.default_rng(11)
    model, twin = build("neumf", dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                           atol=1e-14)
    users, items = zipf_ids(rng, 50, NUM_USERS), zipf_ids(rng, 50, NUM_ITEMS)
    weights = torch.rand(50, dtype=dtype) - 0.5
    (model(users, items) * weights).sum().backward()
    (twin(users, items) * weights).sum().backward()
    for layer, other in zip(model.hidden, twin.hidden):
        torch.testing.assert_close(layer.weight.grad, other.weight.grad, **tol)
        torch.testing.assert_close(layer.bias.grad, other.bias.grad, **tol)
    torch.testing.assert_close(model.output.weight.grad, twin.out.weight.grad, **tol)
    torch.testing.assert_close(_dense_grad(model.mlp_item_embedding.weight),
                               _dense_grad(twin.mlp_i.weight), **tol)
    torch.testing.assert_close(_dense_grad(model.mlp_user_embedding.weight),
                               _dense_grad(twin.mlp_u.weight), **tol)
    few_users, few_items = users[:5], torch.as_tensor(rng.permutation(NUM_ITEMS)[:9])
    grid = model.score_items(few_users, few_items)
    with torch.no_grad():
        expected = twin(few_users.repeat_interleave(9), few_items.repeat(5)).view(5, 9)
    torch.testing.assert_close(grid, expected, **tol)


def test_make_optimizer_fused_dense_adam_steps_like_the_base_class():
    """NCF's optimizer swaps the base class's dense Adam for torch's fused kernel: same
    hyperparameters, same weights after a few steps."""
    rng = np.random.default_rng(12)
    model, _ = build("neumf")
    other = type(model)(**model.get_config())
    other.load_state_dict(model.state_dict())
    mine = model.make_optimizer(None, 0.01)
    theirs = Recommender.make_optimizer(other, "adam", 0.01)
    fused, plain = mine.optimizers[1], theirs.optimizers[1]
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
    assert {k: v for k, v in fused.defaults.items() if k not in ("fused", "foreach")} == {
        k: v for k, v in plain.defaults.items() if k not in ("fused", "foreach")}
    before = [p.detach().clone() for p in model.hidden.parameters()]
    for _ in range(3):
        users, items = zipf_ids(rng, 40, NUM_USERS), zipf_ids(rng, 40, NUM_ITEMS)
        batch = Batch(users, items, negatives=zipf_ids(rng, 80, NUM_ITEMS).reshape(40, 2))
        model.training_step(batch, mine, loss="bce", reg=0.0)
        other.training_step(batch, theirs, loss="bce", reg=0.0)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: name + m)
    assert all(not torch.equal(a, b) for a, b in zip(model.hidden.parameters(), before))
