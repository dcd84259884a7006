"""Ids and arguments in the forms users pass them: empty lists, uint64, bad k, raw ids of
the wrong type."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastmf
from fastmf.datasets import synthetic
from fastmf.testing import BACKENDS


@pytest.fixture(scope="module")
def trained():
    data = synthetic(num_users=60, num_items=40, num_interactions=500, seed=3)
    torch.manual_seed(0)
    model = fastmf.MF(data.num_users, data.num_items, dim=4).attach_data(data)
    with torch.no_grad():
        model.item_bias.copy_(torch.linspace(-1, 1, data.num_items))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list_ids_are_an_empty_batch(backend):
    model = fastmf.MF(10, 8, dim=4, backend=backend)
    out = model([], [])
    assert out.shape == (0,) and out.dtype == torch.float32


def test_uint64_ids_beyond_int64_report_their_true_value():
    model = fastmf.MF(10, 8, dim=4)
    with pytest.raises(IndexError, match="id 9223372036854775808 is out of range"):
        model(np.array([2**63], dtype=np.uint64), np.array([0]))
    # In-range uint64 ids work like int64 ones.
    ids = np.array([1, 7], dtype=np.uint64)
    torch.testing.assert_close(model(ids, ids), model(torch.tensor([1, 7]), torch.tensor([1, 7])))


@pytest.mark.parametrize("k, error", [(-1, ValueError), (0, ValueError), (2.5, TypeError),
                                      ("3", TypeError)])
def test_recommend_bad_k(trained, k, error):
    with pytest.raises(error, match=r"fastmf\.MF\.recommend: k must be"):
        trained.recommend([0], k=k)


def test_unknown_raw_user_is_flagged_with_a_type_hint(trained):
    known_raw = trained.user_map.raw_ids[2]
    with pytest.warns(UserWarning, match=r"1 unknown raw user id\(s\) \['5'\].*'5' is a str"):
        items, scores = trained.recommend(np.array(["5"], dtype=object), k=3, raw_ids=True)
    # The fallback is the most popular items, most popular first.
    popular = np.argsort(-trained.item_popularity, kind="stable")[:3]
    assert list(trained.item_map.lookup(items[0])) == list(popular)
    assert np.isfinite(scores).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.recommend([known_raw], k=3, raw_ids=True)


def test_meta_ids_for_a_model_on_the_cpu_are_refused():
    """The fake kernels also serve as the ops' Meta kernels, and a call that mixes meta ids
    with real tables reaches them: their empty results on the CPU were returned as
    predictions and losses of uninitialised memory. They now apply the kernels' one-device
    rule; a model built on the meta device still traces shapes."""
    torch.manual_seed(0)
    model = fastmf.MF(50, 40, dim=4, backend="native")
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    ids = torch.randint(0, 40, (64,), device="meta")
    mixed = r"is on (meta|cpu) but \w+ is on (cpu|meta); move them to one device"
    before = model.user_factors.detach().clone()
    with pytest.raises(ValueError, match=mixed):
        model(ids, ids)
    with pytest.raises(ValueError, match=mixed):
        fastmf.train_step(model, opt, ids, ids, torch.ones(64))
    assert torch.equal(model.user_factors, before)
    with pytest.raises(ValueError, match=mixed):
        fastmf.nn.Embedding(10, 4)(torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=mixed):
        fastmf.nn.EmbeddingBag(10, 4)(torch.zeros(3, dtype=torch.long, device="meta"),
                                      torch.zeros(1, dtype=torch.long, device="meta"))
    on_meta = fastmf.MF(50, 40, dim=4, backend="native", device="meta")
    out = on_meta(ids, ids)
    assert out.device.type == "meta" and out.shape == (64,)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(global_mean=float("nan")), ValueError, "global_mean must be finite, got nan"),
    (dict(global_mean=float("-inf")), ValueError, "global_mean must be finite"),
    (dict(global_mean="3.5"), TypeError, "global_mean must be a number, got str"),
    (dict(init_scale=float("nan")), ValueError, "init_scale must be finite and >= 0"),
    (dict(init_scale=float("inf")), ValueError, "init_scale must be finite and >= 0"),
    (dict(init_scale=-1.0), ValueError, "init_scale must be finite and >= 0, got -1.0"),
])
def test_mf_settings_are_checked(kwargs, error, message):
    """A NaN global mean made every prediction NaN and saved a checkpoint fastmf.load then
    refused; a bad init_scale failed inside torch's uniform_ without naming it."""
    with pytest.raises(error, match=f"fastmf.MF: {message}"):
        fastmf.MF(10, 8, dim=4, **kwargs)
    model = fastmf.MF(10, 8, dim=4, global_mean=-2.5)
    if "global_mean" in kwargs:
        with pytest.raises(error, match="MF.set_global_mean: value must be"):
            model.set_global_mean(kwargs["global_mean"])
    assert model.mu == -2.5
