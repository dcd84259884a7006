"""The default-choosing helpers of benchmarks/accuracy.py and benchmarks/accuracy_svdpp.py:
the inner validation splits use training rows only and have their stated shapes, the
SVD++ search starts from exactly the class defaults, and values round to two digits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import fastmf
import fastmf.models

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
accuracy = pytest.importorskip("accuracy")
accuracy_svdpp = pytest.importorskip("accuracy_svdpp")


def row_keys(data) -> set:
    return set(zip(data.users.tolist(), data.items.tolist(), data.timestamps.tolist(),
                   strict=True))


@pytest.fixture(scope="module")
def data():
    return fastmf.datasets.synthetic(num_users=120, num_items=300, num_interactions=6_000,
                                     seed=np.random.default_rng().integers(1 << 30))


def test_inner_splits_use_training_rows_only(data):
    splits = accuracy.inner_splits(data)
    assert set(splits) == {"dense", "sparse", "temporal", "synthetic"}
    outer_train, outer_test = next(fastmf.data.kfold(data, accuracy.FOLDS, seed=accuracy.SEED))
    allowed, reported = row_keys(outer_train), row_keys(outer_test)
    for name in ("dense", "sparse", "temporal"):
        train, valid = splits[name]
        assert len(train) and len(valid)
        assert row_keys(train) <= allowed and row_keys(valid) <= allowed, name
        assert not row_keys(valid) & reported, name
        assert not row_keys(train) & row_keys(valid), name
    dense_train, dense_valid = splits["dense"]
    assert len(dense_train) + len(dense_valid) == len(outer_train)
    sparse_train, sparse_valid = splits["sparse"]
    per_user = np.bincount(np.concatenate([sparse_train.users, sparse_valid.users]),
                           minlength=data.num_users)
    assert per_user.max() <= 15
    temporal_train, temporal_valid = splits["temporal"]
    assert temporal_train.timestamps.max() <= temporal_valid.timestamps.min()
    synthetic_train, synthetic_valid = splits["synthetic"]
    assert synthetic_train.num_users > 4 * synthetic_train.num_items  # a different shape
    assert len(synthetic_valid) == round(0.2 * (len(synthetic_train) + len(synthetic_valid)))


@pytest.mark.parametrize("value, expected", [(0.12512806, 0.13), (3.94, 3.9), (0.00734, 0.0073),
                                             (12.6, 13.0)])
def test_round_setting_two_significant_digits(value, expected):
    assert accuracy.round_setting(value) == pytest.approx(expected)


@pytest.mark.parametrize("cls", [fastmf.models.SVDpp, fastmf.models.TimeSVDpp])
def test_search_starts_from_the_class_defaults(cls):
    setting = accuracy_svdpp.setting_of(accuracy_svdpp.current_point(cls))
    fit = cls.defaults["explicit"]
    assert setting.pop("lr") == pytest.approx(fit["lr"])
    assert setting.pop("reg") == pytest.approx(fit["reg"])
    assert setting.pop("batch_size") == fit["batch_size"]
    assert setting.pop("bias_reg") == pytest.approx(cls.default_bias_reg)
    model = cls(7, 9)
    for key, value in setting.items():
        assert getattr(model, key) == pytest.approx(value), key


def test_setting_of_resolves_ratios_and_rounds():
    rng = np.random.default_rng()
    reg, ratio, lr = rng.uniform(0.5, 5), rng.uniform(0.01, 2), rng.uniform(0.01, 0.5)
    params = dict(reg_form="rows", reg=reg, dim=32, batch_size=4096, lr=lr,
                  implicit_reg_ratio=ratio)
    exact = accuracy_svdpp.setting_of(params)
    assert exact == pytest.approx(dict(reg_form="rows", reg=reg, dim=32, batch_size=4096, lr=lr,
                                       implicit_reg=reg * ratio))
    rounded = accuracy_svdpp.setting_of(params, rounded=True)
    assert rounded["implicit_reg"] == float(f"{reg * ratio:.2g}")
    assert rounded["lr"] == float(f"{lr:.2g}")
