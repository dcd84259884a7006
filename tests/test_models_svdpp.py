"""fastmf.models.SVDpp and TimeSVDpp against textbook computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _checkpoints import resealed, set_entry

import fastmf
from fastmf.data import Interactions
from fastmf.models import SVDpp, TimeSVDpp

DAY = 86400
NUM_USERS, NUM_ITEMS, DIM = 30, 25, 6


class Batch:
    def __init__(self, users, items, targets, timestamps=None):
        self.users, self.items, self.targets, self.timestamps = users, items, targets, timestamps
        self.negatives = self.weights = None


def zipf_ids(rng, n, high):
    return (rng.zipf(1.3, n) - 1) % high


def random_data(seed=0, n=300, timestamps=True, idle_users=(3, 7)):
    """Zipf-distributed users and items with duplicate pairs; ``idle_users`` have no rating."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(rng, n, NUM_USERS)
    users = np.where(np.isin(users, idle_users), (users + 1) % NUM_USERS, users)
    items = zipf_ids(rng, n, NUM_ITEMS)
    ratings = rng.integers(1, 11, n).astype(np.float32) / 2
    stamps = (1_000_000_000 + rng.integers(0, 400 * DAY, n)) if timestamps else None
    return Interactions(users, items, ratings, stamps, user_map=NUM_USERS, item_map=NUM_ITEMS)


def randomize(model, seed=1):
    """Every table non-zero (biases start at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return model


def history(data):
    """N(u) as sets, from the raw rows."""
    out = [set() for _ in range(NUM_USERS)]
    for u, i in zip(data.users, data.items, strict=True):
        out[u].add(int(i))
    return out


def weights(model, name):
    return getattr(model, name).weight.detach().double().numpy()


def textbook_svdpp(model, data, users, items):
    """mu + b_u + b_i + q_i · (p_u + |N(u)|^-1/2 sum_j y_j), one rating at a time."""
    hist = history(data)
    p, q, y = (weights(model, n) for n in ("user_factors", "item_factors",
                                           "implicit_factors"))
    bu, bi = weights(model, "user_bias")[:, 0], weights(model, "item_bias")[:, 0]
    mu = float(np.mean(data.ratings, dtype=np.float64))
    out = []
    for u, i in zip(users, items, strict=True):
        vec = p[u].copy()
        if hist[u]:
            vec += sum(y[j] for j in sorted(hist[u])) / np.sqrt(len(hist[u]))
        out.append(mu + bu[u] + bi[i] + q[i] @ vec)
    return np.array(out)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_svdpp_forward_matches_textbook(dtype):
    data = random_data()
    model = randomize(SVDpp.from_interactions(data, dim=DIM))
    rng = np.random.default_rng(5)
    users = np.concatenate([zipf_ids(rng, 200, NUM_USERS), [3, 7, 3]])  # 3, 7: no history
    items = zipf_ids(rng, 203, NUM_ITEMS)
    pred = model.predict(torch.as_tensor(users, dtype=dtype), torch.as_tensor(items, dtype=dtype))
    expected = textbook_svdpp(model, data, users, items)
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()
    np.testing.assert_allclose(pred.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    # No history: exactly the biased-MF prediction.
    p, q = weights(model, "user_factors"), weights(model, "item_factors")
    bu, bi = weights(model, "user_bias")[:, 0], weights(model, "item_bias")[:, 0]
    plain = model.mu + bu[3] + bi[items[-1]] + p[3] @ q[items[-1]]
    assert float(pred[-1]) == pytest.approx(plain, abs=1e-5)


def test_empty_batch_and_bad_ids():
    model = SVDpp.from_interactions(random_data(), dim=DIM)
    empty = torch.zeros(0, dtype=torch.int64)
    assert model.predict(empty, empty).shape == (0,)
    opt = model.make_optimizer("adagrad", 0.1)
    loss, count = model.training_step(Batch(empty, empty, torch.zeros(0)), opt, loss="mse",
                                      reg=0.1)
    assert count == 0 and float(loss) == 0.0
    with pytest.raises(IndexError, match="user index 30"):
        model.predict(torch.tensor([30]), torch.tensor([0]))
    with pytest.raises(TypeError, match="users must be int32 or int64"):
        model.predict(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="loss 'bce' is not supported"):
        model.training_step(Batch(empty, empty, torch.zeros(0)), opt, loss="bce", reg=0.1)


def test_model_without_any_history_predicts_plain_mf():
    model = randomize(SVDpp(NUM_USERS, NUM_ITEMS, DIM))
    u, i = torch.tensor([0, 5, 5]), torch.tensor([1, 2, 3])
    p, q = model.user_factors.weight, model.item_factors.weight
    expected = (p[u] * q[i]).sum(1) + model.user_bias.weight[u, 0] + model.item_bias.weight[i, 0]
    torch.testing.assert_close(model.predict(u, i), expected.detach())


def plain_step(model, batch, *, loss, reg, lr, timed=False, coefs=None, lrs=None,
               per_rating=False):
    """The same step on plain tensors with torch autograd and torch.optim.Adagrad: the
    penalty over the distinct rows each table was read at (``per_rating``: once per rating
    that read the row, y rows once per rating of their user), added to the loss.
    ``coefs``/``lrs``: L2 coefficient and learning rate by table name (default: ``reg`` for
    the factor tables, ``model.bias_reg`` for the others; ``lr``)."""
    tables = {name: p.detach().clone().double().requires_grad_(True)
              for name, p in ((n.removesuffix(".weight"), p)
                              for n, p in model.named_parameters())}
    lrs = lrs or {}
    opt = torch.optim.Adagrad([{"params": [t], "lr": lrs.get(name, lr)}
                               for name, t in tables.items()], lr=lr)
    u, i = batch.users.long(), batch.items.long()
    offsets, hist = model.history_offsets, model.history_items
    vec = tables["user_factors"][u].clone()
    touched_y = []
    for b in range(len(u)):
        rows = hist[offsets[u[b]]:offsets[u[b] + 1]]
        touched_y.append(rows)
        if len(rows):
            vec[b] = vec[b] + tables["implicit_factors"][rows].sum(0) / np.sqrt(len(rows))
    pred = (vec * tables["item_factors"][i]).sum(1) + model.mu
    pred = pred + tables["user_bias"][u, 0] + tables["item_bias"][i, 0]
    reads = {"user_factors": u, "item_factors": i, "implicit_factors": torch.cat(touched_y),
             "user_bias": u, "item_bias": i}
    if timed:
        days = torch.div(batch.timestamps, DAY, rounding_mode="floor")
        extra, time_reads = hand_time_terms(model, tables, u, i, days)
        pred = pred + extra
        reads.update(time_reads)
    targets = batch.targets.double()
    data = (torch.nn.functional.mse_loss(pred, targets) if loss == "mse"
            else torch.nn.functional.huber_loss(pred, targets, delta=1.0))
    penalty = 0
    factor_tables = ("user_factors", "item_factors", "implicit_factors")
    for name, ids in reads.items():
        if coefs is not None:
            coef = coefs[name]
        else:
            coef = reg if name in factor_tables else model.bias_reg
        if per_rating:  # one term per read, repeats included
            penalty = penalty + coef * tables[name][ids].pow(2).sum()
        else:
            penalty = penalty + coef * tables[name][torch.unique(ids)].pow(2).sum()
    (data + penalty / len(u)).backward()
    opt.step()
    return {k: v.detach() for k, v in tables.items()}


def hand_time_terms(model, tables, u, i, days):
    """alpha_u·dev_u(t) + b_{u,day} + b_{i,bin}, row by row from the definitions."""
    first, last = (int(v) for v in model.day_range)
    keys = model.user_day_keys.tolist()
    span = last - first + 1
    out, day_rows, bin_rows = [], [], []
    for b in range(len(u)):
        uu, d = int(u[b]), int(days[b])
        has = int(model.history_offsets[uu + 1] - model.history_offsets[uu]) > 0
        delta = d - float(model.user_mean_day[uu])
        dev = np.sign(delta) * abs(delta) ** model.beta if has else 0.0
        term = tables["user_alpha"][uu, 0] * dev
        key = uu * span + (d - first)
        if first <= d <= last and key in keys:
            day_rows.append(keys.index(key))
            term = term + tables["user_day_bias"][keys.index(key), 0]
        bin_ = min(max((d - first) * model.num_bins // span, 0), model.num_bins - 1)
        bin_rows.append(int(i[b]) * model.num_bins + bin_)
        out.append(term + tables["item_bin_bias"][bin_rows[-1], 0])
    return torch.stack(out), {"user_alpha": u, "user_day_bias": torch.tensor(day_rows,
                                                                               dtype=torch.long),
                              "item_bin_bias": torch.tensor(bin_rows)}


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("grouped", [True, False])
def test_fused_step_matches_autograd(cls, loss, grouped):
    """The fused step (weight-decay penalty with make_optimizer's groups; the penalty in the
    loss with one plain group) equals torch autograd + torch.optim.Adagrad."""
    data = random_data(seed=2)
    # y at fit's reg and lr, the time terms at bias_reg and lr (the knobs' None/1 values).
    plain = dict(implicit_reg=None, implicit_lr_scale=1.0, bias_lr_scale=1.0)
    if cls is TimeSVDpp:
        plain.update(time_reg=None, time_lr_scale=1.0, alpha_reg=None, alpha_lr_scale=1.0)
    model = randomize(cls.from_interactions(data, dim=DIM, bias_reg=0.07, **plain))
    if grouped:
        opt = model.make_optimizer("adagrad", 0.05)
    else:
        opt = fastmf.optim.apply_in_backward(
            fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05))
    rng = np.random.default_rng(9)
    rows = rng.integers(0, len(data), 64)
    users = torch.as_tensor(np.concatenate([data.users[rows], [3]]))  # 3: no history
    items = torch.as_tensor(np.concatenate([data.items[rows], [4]]))
    targets = torch.as_tensor(np.concatenate([data.ratings[rows], [2.5]]))
    stamps = torch.as_tensor(np.concatenate([data.timestamps[rows], [data.timestamps[0]]]))
    stamps[:5] += 900 * DAY  # after the training range: no day bias, last bin
    batch = Batch(users.int(), items, targets * 3 if loss == "huber" else targets, stamps)
    expected = plain_step(model, batch, loss=loss, reg=0.2, lr=0.05, timed=cls is TimeSVDpp)
    model.training_step(batch, opt, loss=loss, reg=0.2)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(model, name).weight.detach().double(), value,
                                   rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
@pytest.mark.parametrize("reg_form", ["rows", "ratings"])
def test_knobs_match_autograd(cls, reg_form):
    """Own L2 coefficients and learning rates for y, the biases and the time terms, and the
    per-rating penalty, against the plain step with those numbers per table."""
    data = random_data(seed=3)
    knobs = dict(bias_reg=0.07, implicit_reg=0.6, implicit_lr_scale=0.3, bias_lr_scale=2.0,
                 reg_form=reg_form)
    if cls is TimeSVDpp:
        knobs.update(time_reg=0.9, time_lr_scale=0.5, alpha_reg=1.7, alpha_lr_scale=0.01)
    model = randomize(cls.from_interactions(data, dim=DIM, **knobs))
    clone = cls(**model.get_config())
    assert {k: clone.get_config()[k] for k in knobs} == knobs
    opt = model.make_optimizer("adagrad", 0.05)
    reg, lr = 0.2, 0.05
    coefs = dict(user_factors=reg, item_factors=reg, implicit_factors=0.6, user_bias=0.07,
                 item_bias=0.07, user_alpha=1.7, user_day_bias=0.9, item_bin_bias=0.9)
    lrs = dict(implicit_factors=0.3 * lr, user_bias=2 * lr, item_bias=2 * lr,
               user_alpha=0.01 * lr, user_day_bias=0.5 * lr, item_bin_bias=0.5 * lr)
    rng = np.random.default_rng(11)
    rows = rng.integers(0, len(data), 80)  # Zipf users: many repeat within the batch
    users = torch.as_tensor(np.concatenate([data.users[rows], [3]]))
    items = torch.as_tensor(np.concatenate([data.items[rows], [4]]))
    targets = torch.as_tensor(np.concatenate([data.ratings[rows], [2.5]]))
    stamps = torch.as_tensor(np.concatenate([data.timestamps[rows], [data.timestamps[0]]]))
    batch = Batch(users, items, targets, stamps)
    expected = plain_step(model, batch, loss="mse", reg=reg, lr=lr, timed=cls is TimeSVDpp,
                          coefs=coefs, lrs=lrs, per_rating=reg_form == "ratings")
    model.training_step(batch, opt, loss="mse", reg=reg)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(model, name).weight.detach().double(), value,
                                   rtol=2e-5, atol=2e-6, msg=name)


def test_bad_knobs():
    with pytest.raises(ValueError, match="SVDpp: reg_form must be 'rows' or 'ratings', got "
                                         "'batch'"):
        SVDpp(NUM_USERS, NUM_ITEMS, DIM, reg_form="batch")
    with pytest.raises(ValueError, match="SVDpp: implicit_reg must be a finite number >= 0, "
                                         "got -1"):
        SVDpp(NUM_USERS, NUM_ITEMS, DIM, implicit_reg=-1)
    with pytest.raises(ValueError, match="TimeSVDpp: alpha_lr_scale must be a finite number"):
        TimeSVDpp(NUM_USERS, NUM_ITEMS, DIM, alpha_lr_scale=float("nan"))


def test_time_terms_by_hand():
    # User 0 rates on days 10, 12, 20 (mean 14); user 1 on day 30; the range is 10..30
    # (21 days) in 3 bins of 7 days.
    day = lambda d: d * DAY + 3600  # noqa: E731
    data = Interactions([0, 0, 0, 1], [0, 1, 0, 2], [4.0, 3.0, 5.0, 1.0],
                        [day(10), day(12), day(20), day(30)], user_map=3, item_map=3)
    model = TimeSVDpp.from_interactions(data, dim=2, num_bins=3)
    assert model.get_config()["num_user_days"] == 4
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.user_alpha.weight[:, 0] = torch.tensor([0.5, -1.0, 2.0])
        model.user_day_bias.weight[:, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # keys sorted
        model.item_bin_bias.weight.view(3, 3)[2] = torch.tensor([1.0, 2.0, 3.0])
    mu = 13 / 4
    # user 0, item 2 on day 12: dev = -(2 ** 0.4), day bias 0.2 (key 0·21 + 2), bin 0.
    # user 0, item 2 on day 25: dev = 11 ** 0.4, no day bias, bin 2 (15 · 3 // 21 = 2).
    # user 1, item 2 without time: day 30, dev 0, day bias 0.4, bin 2.
    # user 2 (no history), item 2 at day 5: no alpha, no day bias, bin clamped to 0.
    expected = [mu + 0.5 * -(2 ** 0.4) + 0.2 + 1.0, mu + 0.5 * 11 ** 0.4 + 3.0,
                mu + 0.4 + 3.0, mu + 1.0]
    u, i = torch.tensor([0, 0]), torch.tensor([2, 2])
    got = model.predict(u, i, torch.tensor([day(12), day(25)]))
    np.testing.assert_allclose(got.numpy(), expected[:2], rtol=1e-6)
    got = model.predict(torch.tensor([1]), torch.tensor([2]))
    np.testing.assert_allclose(got.numpy(), expected[2:3], rtol=1e-6)
    got = model.predict(torch.tensor([2]), torch.tensor([2]), np.array([day(5)]))
    np.testing.assert_allclose(got.numpy(), expected[3:], rtol=1e-6)
    as_datetime = np.array([day(12)], dtype="datetime64[s]")
    got = model.predict(torch.tensor([0]), torch.tensor([2]), as_datetime)
    np.testing.assert_allclose(got.numpy(), expected[:1], rtol=1e-6)


def test_missing_timestamps():
    data = random_data(timestamps=False)
    with pytest.raises(ValueError, match="TimeSVDpp: the interactions have no timestamps"):
        TimeSVDpp.from_interactions(data, dim=DIM)
    model = TimeSVDpp.from_interactions(random_data(), dim=DIM)
    opt = model.make_optimizer("adagrad", 0.1)
    batch = Batch(torch.tensor([0]), torch.tensor([1]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="the batch has no timestamps"):
        model.training_step(batch, opt, loss="mse", reg=0.1)


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
def test_vectors_config_and_state(cls):
    data = random_data(seed=4)
    model = randomize(cls.from_interactions(data, dim=DIM))
    users = torch.as_tensor(np.array([0, 1, 3, 1, 29]))
    uvec, offset = model.user_vectors(users)
    ivec, bias = model.item_vectors()
    scores = uvec @ ivec.T + bias + offset[:, None]
    all_items = torch.arange(NUM_ITEMS)
    for row, u in enumerate(users.tolist()):
        direct = model.predict(torch.full((NUM_ITEMS,), u), all_items)
        torch.testing.assert_close(scores[row].detach(), direct, rtol=1e-5, atol=1e-5)
    clone = cls(**model.get_config())
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.predict(users, users % NUM_ITEMS),
                               model.predict(users, users % NUM_ITEMS))
    assert clone.mu == model.mu


def test_training_lowers_the_loss():
    data = random_data(seed=6, n=2000)
    for cls in (SVDpp, TimeSVDpp):
        torch.manual_seed(0)
        model = cls.from_interactions(data, dim=DIM)
        opt = model.make_optimizer("adagrad", 0.05)
        u, i, _ = data.to_torch()
        r = 1 + (u % 5) * 0.5 + (i % 3) * 0.4 + 0.3 * torch.cos(u * i * 1.0)  # learnable
        batch = Batch(u, i, r, torch.as_tensor(data.timestamps))
        first = float(model.training_step(batch, opt, loss="mse", reg=0.01)[0])
        for _ in range(30):
            last = float(model.training_step(batch, opt, loss="mse", reg=0.01)[0])
        assert last < 0.5 * first


def day_bias_by_pair(model):
    first, last = (int(v) for v in model.day_range)
    span = last - first + 1
    keys = model.user_day_keys.tolist()
    values = model.user_day_bias.weight[:, 0].tolist()
    return {(k // span, k % span + first): v for k, v in zip(keys, values, strict=False)}


def test_prepare_again_keeps_trained_day_biases():
    data = random_data(seed=8)
    model = randomize(TimeSVDpp.from_interactions(data, dim=DIM))
    before = day_bias_by_pair(model)
    rows = np.arange(len(data))
    later = data.subset((rows % 3 != 0) | (rows > len(data) - 5))
    later.timestamps = later.timestamps.copy()
    later.timestamps[-4:] += 1000 * DAY  # new pairs after the old range
    model.attach_data(later)
    after = day_bias_by_pair(model)
    kept = set(before) & set(after)
    assert len(kept) > 10 and len(after) > len(kept)
    for pair in kept:
        assert after[pair] == before[pair]
    for pair in set(after) - kept:
        assert after[pair] == 0.0


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
@pytest.mark.parametrize("change, message", [
    (set_entry("model.history_offsets", 10, 10**6),
     r"history: offsets must be non-decreasing, got 1000000 then \d+ at offsets\[10\]"),
    (set_entry("model.history_offsets", 0, 3),
     r"history: offsets must start at 0, got offsets\[0\] = 3"),
    (set_entry("model.history_offsets", -1, 7),
     rf"history: offsets must be non-decreasing, got \d+ then 7 at offsets\[{NUM_USERS - 1}\]"),
    (set_entry("model.history_offsets", -1, 10**6),
     rf"history: offsets\[{NUM_USERS}\] = 1000000 is past the end of indices"),
    (set_entry("model.history_items", 4, NUM_ITEMS), rf"history holds index {NUM_ITEMS}, "
                                                rf"outside \[0, {NUM_ITEMS}\)"),
    (set_entry("model.history_items", 2, -1), "history holds index -1"),
    (set_entry("model.global_mean", (), float("nan")),
     "model.global_mean holds 1 NaN or infinite values"),
])
def test_a_hand_edited_history_is_refused_at_load(tmp_path, cls, change, message):
    """N(u) is cut into bags without further checks, so a loaded one is checked first: a
    decreasing offset once crashed the interpreter in the first recommend."""
    data = random_data(seed=5)
    torch.manual_seed(0)
    model = cls.from_interactions(data, dim=DIM)
    fastmf.fit(model, data, epochs=1, progress=False)
    model.save(tmp_path / "ck")
    assert fastmf.load(tmp_path / "ck").history_offsets.equal(model.history_offsets)
    resealed(tmp_path / "ck", change)
    with pytest.raises(fastmf.checkpoint.CheckpointError, match=message):
        fastmf.load(tmp_path / "ck")


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "3.5"])
def test_global_mean_must_be_a_finite_number(cls, value):
    error = TypeError if isinstance(value, str) else ValueError
    with pytest.raises(error, match=f"fastmf.models.{cls.__name__}: global_mean must be"):
        cls(NUM_USERS, NUM_ITEMS, dim=DIM, global_mean=value)
    model = cls(NUM_USERS, NUM_ITEMS, dim=DIM, global_mean=3.5)
    with pytest.raises(error, match="set_global_mean: value must be"):
        model.set_global_mean(value)
    assert model.mu == 3.5 and float(model.global_mean) == 3.5


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), float("-inf")])
def test_timesvdpp_refuses_times_without_a_day(stamp):
    """A NaN or infinite time became the most negative int64 day, and a prediction tens of
    thousands of stars off the scale."""
    data = random_data(seed=6)
    torch.manual_seed(0)
    model = TimeSVDpp.from_interactions(data, dim=DIM)
    users, items = torch.tensor([0, 1]), torch.tensor([0, 1])
    for stamps in (torch.tensor([1.0e9, stamp]), np.array([1.0e9, stamp])):
        with pytest.raises(ValueError, match="TimeSVDpp: timestamps must be finite"):
            model(users, items, stamps)
    with pytest.raises(ValueError, match="timestamps must be finite, got NaT"):
        model(users, items, np.array(["2001-01-01", "NaT"], dtype="datetime64[s]"))
    assert torch.isfinite(model(users, items, torch.tensor([1.0e9, 1.1e9]))).all()


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
def test_half_precision_models_recommend_and_evaluate(cls):
    """float16 tables train, and every top-k path (recommend, similar_items, ranking
    evaluation) scores their vectors in float32, as it does for float32 tables."""
    data = random_data()
    torch.manual_seed(0)
    model = cls.from_interactions(data, dim=DIM, dtype=torch.float16)
    fastmf.fit(model, data, epochs=2, progress=False)
    top, scores = model.recommend([0, 1], k=4)
    assert top.shape == (2, 4) and (top >= 0).all() and torch.isfinite(scores).all()
    vectors, bias = model.item_vectors()
    users, offset = model.user_vectors(torch.tensor([0, 1]))
    want = users.float() @ vectors.float().T + bias.float()
    # recommend returns scores in the model's dtype: float16 rounding.
    torch.testing.assert_close(scores.float(), want.gather(1, top) + (
        0 if offset is None else offset[:, None].float()), rtol=2e-3, atol=2e-3)
    assert model.similar_items([0], k=3)[0].shape == (1, 3)
    got = fastmf.evaluate(model, data, metrics=("ndcg@5", "rmse"))
    assert 0 <= got["ndcg@5"] <= 1 and np.isfinite(got["rmse"])


@pytest.mark.parametrize("cls", [SVDpp, TimeSVDpp])
@pytest.mark.parametrize("side", ["user", "item"])
def test_growth_is_refused_before_any_change(cls, side):
    """coldstart.add_rows grew the tables and id map but not the count and per-user state:
    the new ids were refused and the saved checkpoint did not load. Now refused up front."""
    from fastmf.models import coldstart

    data = random_data()
    model = cls.from_interactions(data, dim=DIM)
    opt = model.make_optimizer("adagrad", 0.05)
    fastmf.fit(model, data, epochs=1, optimizer=opt, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tables = ([model.user_factors, model.user_bias] if side == "user"
              else [model.item_factors, model.item_bias])
    with pytest.raises(TypeError, match=f"{cls.__name__} keeps its {side} count"):
        coldstart.add_rows(model, side, 2, optimizer=opt, tables=tables, raw_ids=[1000, 1001])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.user_map) == data.num_users and len(model.item_map) == data.num_items
