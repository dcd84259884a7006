"""fastmf.data: Interactions, splits and negative sampling."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from fastmf.data import (
    IdMap,
    Interactions,
    NegativeSampler,
    kfold,
    leave_one_out,
    popularity,
    random_split,
    sample_negatives,
    temporal_split,
)
from fastmf.data import interactions as interactions_module

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
requires_ml_small = pytest.mark.skipif(
    not (ML_SMALL / "ratings.csv").is_file(), reason=f"MovieLens data not found at {ML_SMALL}"
)


def random_interactions(
    num_users=50, num_items=40, n=800, *, seed=0, ratings=True, ties=False
) -> Interactions:
    """Random interactions; ratings hold the row number so tests can identify rows."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, n)
    items = rng.integers(0, num_items, n)
    times = rng.integers(0, 20 if ties else 10**9, n)
    return Interactions(
        users, items, np.arange(n, dtype=np.float32) if ratings else None, times,
        user_map=num_users, item_map=num_items,
    )


def row_ids(part: Interactions) -> np.ndarray:
    return part.ratings.astype(np.int64)


# ============================================================================ Interactions


def test_from_arrays_factorizes_sorted_raw_ids():
    data = Interactions.from_arrays(
        np.array([30, 10, 30, 20]), np.array(["b", "a", "c", "a"]), ratings=[1, 2, 3, 4]
    )
    assert (data.num_users, data.num_items, len(data)) == (3, 3, 4)
    assert data.users.tolist() == [2, 0, 2, 1]
    assert data.items.tolist() == [1, 0, 2, 0]
    assert data.users.dtype == np.int64 and data.ratings.dtype == np.float32
    assert data.raw_user_ids(data.users).tolist() == [30, 10, 30, 20]
    assert data.raw_item_ids(data.items).tolist() == ["b", "a", "c", "a"]
    assert data.user_index(20) == 1 and data.item_index("c") == 2
    assert data.raw_user_ids(2) == 30 and isinstance(data.raw_user_ids(2), int)
    assert data.item_index(["c", "a"]).tolist() == [2, 0]


def test_contiguous_ids_map_to_themselves_and_torch_inputs():
    users = torch.tensor([2, 0, 1, 2])
    items = torch.tensor([1, 1, 0, 3])
    data = Interactions.from_arrays(users, items, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert data.users.tolist() == [2, 0, 1, 2]
    assert data.items.tolist() == [1, 1, 0, 2]  # item 2 never occurs: 3 is the third id
    assert data.num_items == 3


def test_mixed_type_raw_ids_round_trip():
    raw = np.array(["u1", 5, "u1", 2.5], dtype=object)
    data = Interactions.from_arrays(raw, [0, 1, 2, 3])
    assert data.num_users == 3 and data.users[0] == data.users[2]
    assert data.raw_user_ids(data.users).tolist() == raw.tolist()
    assert data.user_index("u1") == data.users[0]


def test_unknown_raw_ids_raise_keyerror_naming_them():
    data = Interactions.from_arrays(["ann", "bob"], [1, 2])
    with pytest.raises(KeyError, match="'zed'") as err:
        data.user_index(["ann", "zed"])
    assert "1 unknown raw user" in str(err.value)
    with pytest.raises(KeyError, match="99"):
        data.item_index(99)
    with pytest.raises(IndexError, match="out of range"):
        data.raw_user_ids(5)


def test_num_users_means_indices_and_range_is_checked():
    data = Interactions.from_arrays([0, 3], [1, 1], num_users=10, num_items=5)
    assert data.num_users == 10 and data.num_items == 5
    assert data.users.tolist() == [0, 3]
    with pytest.raises(IndexError, match="user index 12 out of range"):
        Interactions.from_arrays([0, 12], [1, 1], num_users=10)
    with pytest.raises(IndexError, match="item index 7 out of range"):
        Interactions([0, 1], [0, 7], user_map=2, item_map=5)


def test_existing_maps_put_new_data_in_the_same_index_space():
    train = Interactions.from_arrays(["a", "b", "c"], [10, 20, 30])
    test_df = pd.DataFrame({"u": ["c", "a", "new"], "i": [10, 30, 10]})
    with pytest.raises(KeyError, match="'new'"):
        Interactions.from_pandas(test_df, "u", "i", user_map=train.user_map,
                                 item_map=train.item_map)
    test = Interactions.from_pandas(
        test_df, "u", "i", user_map=train.user_map, item_map=train.item_map, unknown="drop"
    )
    assert len(test) == 2
    assert test.user_map is train.user_map and test.item_map is train.item_map
    assert test.users.tolist() == [2, 0] and test.items.tolist() == [0, 2]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(users=[], items=[]), ValueError, "no interactions"),
        (dict(users=[0, 1], items=[0]), ValueError, "mismatched lengths"),
        (dict(users=[0, 1], items=[0, 1], ratings=[1.0]), ValueError, "mismatched lengths"),
        (dict(users=[0, 1, 2], items=[0, 1, 2], ratings=[1.0, np.nan, np.inf]),
         ValueError, r"2 NaN/inf value\(s\) \(first at row 1"),
        (dict(users=[0, None, 1], items=[0, 1, 2]), ValueError,
         r"user ids contain 1 missing value\(s\) \(first at row 1\)"),
        (dict(users=[0, 1], items=[0, 1], timestamps=[1.0, np.nan]), ValueError,
         "timestamps contain 1"),
        (dict(users=[0, 1], items=[0, 1], ratings=np.array(["1", "x"])), ValueError,
         r"fastmf.Interactions: ratings must be numbers, got dtype <U1"),
    ],
)
def test_validation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Interactions.from_arrays(**kwargs)


def test_from_pandas_columns():
    df = pd.DataFrame({"user": ["x", "y"], "item": [1, 2], "stars": [3.0, 4.5]})
    with pytest.raises(ValueError, match=r"'userId' \(user_col\) not found.*'user', 'item'"):
        Interactions.from_pandas(df)
    data = Interactions.from_pandas(df, "user", "item", rating_col="stars")
    assert data.ratings.tolist() == [3.0, 4.5] and data.timestamps is None
    # Default optional names may be absent; names you pass must exist.
    assert Interactions.from_pandas(df, "user", "item").ratings is None
    with pytest.raises(ValueError, match="'when' .time_col. not found"):
        Interactions.from_pandas(df, "user", "item", time_col="when")


def test_from_pandas_datetime_timestamps():
    times = pd.to_datetime(["2020-01-02", "2020-01-01"]).tz_localize("UTC")
    df = pd.DataFrame({"userId": [1, 1], "movieId": [1, 2], "timestamp": times})
    data = Interactions.from_pandas(df)
    assert data.timestamps.dtype.kind == "M"
    train, test = leave_one_out(Interactions.from_pandas(df))
    assert test.items.tolist() == [0]


@pytest.mark.parametrize("pyarrow_engine", [True, False])
def test_from_csv(tmp_path, monkeypatch, pyarrow_engine):
    if pyarrow_engine:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setattr(interactions_module, "_has_pyarrow", lambda: False)
    path = tmp_path / "r.csv"
    path.write_text("uid,iid,r,extra\na,1,4.0,x\nb,2,3.5,y\na,2,5.0,z\n")
    data = Interactions.from_csv(path, "uid", "iid", "r")
    assert data.ratings.tolist() == [4.0, 3.5, 5.0]
    assert data.raw_user_ids(data.users).tolist() == ["a", "b", "a"]
    with pytest.raises(ValueError, match="available columns"):
        Interactions.from_csv(path)
    with pytest.raises(FileNotFoundError):
        Interactions.from_csv(tmp_path / "missing.csv")
    tsv = tmp_path / "r.tsv"
    tsv.write_text("userId\tmovieId\n1\t2\n")
    assert len(Interactions.from_csv(tsv, sep="\t")) == 1


def test_from_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(
        {"userId": [5, 6, 5], "movieId": [1, 1, 2], "rating": [1.0, 2.0, 3.0],
         "timestamp": [3, 2, 1]}
    )
    path = tmp_path / "r.parquet"
    df.to_parquet(path)
    data = Interactions.from_parquet(path)
    assert data.users.tolist() == [0, 1, 0] and data.timestamps.tolist() == [3, 2, 1]
    with pytest.raises(ValueError, match="available columns"):
        Interactions.from_parquet(path, user_col="nope")


def test_from_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow.dataset", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        Interactions.from_parquet(tmp_path / "r.parquet")


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil"])
def test_from_scipy_round_trip(fmt):
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 3, (6, 5)).astype(np.float32) * (rng.random((6, 5)) < 0.5)
    matrix = sp.csr_matrix(dense).asformat(fmt)
    data = Interactions.from_scipy(matrix)
    assert len(data) == np.count_nonzero(dense)
    assert data.shape == (6, 5)
    np.testing.assert_array_equal(data.to_csr().toarray(), dense)


def test_from_scipy_sums_duplicates_and_drops_zeros():
    coo = sp.coo_matrix(([1.0, 2.0, 0.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 3))
    data = Interactions.from_scipy(coo)
    assert len(data) == 1 and data.ratings.tolist() == [3.0]
    with pytest.raises(ValueError, match="no interactions"):
        Interactions.from_scipy(sp.csr_matrix((3, 3)))
    with pytest.raises(TypeError):
        Interactions.from_scipy(np.eye(2))


def test_to_csr_sums_duplicates_and_binary():
    data = Interactions([0, 0, 1], [1, 1, 2], ratings=[2.0, 3.0, 1.0], item_map=4)
    csr = data.to_csr()
    assert isinstance(csr, sp.csr_matrix) and csr.shape == (2, 4)
    assert csr.has_canonical_format
    np.testing.assert_array_equal(csr.toarray(), [[0, 5, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(data.to_csr(binary=True).toarray(), [[0, 1, 0, 0],
                                                                       [0, 0, 1, 0]])


def test_subset_shares_maps_and_checks_selection():
    data = random_interactions()
    mask = data.ratings % 3 == 0
    part = data.subset(mask)
    assert part.user_map is data.user_map and part.item_map is data.item_map
    assert part.shape == data.shape and len(part) == mask.sum()
    np.testing.assert_array_equal(part.items, data.items[mask])
    rows = np.array([5, 1, 5])
    np.testing.assert_array_equal(data.subset(rows).timestamps, data.timestamps[rows])
    with pytest.raises(ValueError, match="no interactions"):
        data.subset(np.zeros(len(data), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        data.subset(np.ones(3, dtype=bool))
    with pytest.raises(IndexError):
        data.subset([len(data)])


def test_to_torch_and_to_pandas():
    data = Interactions.from_arrays(["a", "b"], ["x", "y"], ratings=[1.5, 2.0])
    users, items, ratings = data.to_torch()
    assert users.dtype == torch.int64 and items.dtype == torch.int64
    assert ratings.dtype == torch.float32 and ratings.tolist() == [1.5, 2.0]
    implicit = Interactions([0, 1], [1, 0])
    assert implicit.to_torch("cpu")[2].tolist() == [1.0, 1.0]
    df = data.to_pandas()
    assert df["user"].tolist() == ["a", "b"] and df["rating"].tolist() == [1.5, 2.0]


def test_to_torch_copies_read_only_arrays():
    """pandas' copy-on-write hands out read-only column arrays; to_torch copies them (torch
    warns on read-only arrays, and a shared tensor would let a write change the data)."""
    rng = np.random.default_rng(3)
    ratings = rng.uniform(0.5, 5.0, size=50).astype(np.float32)
    ratings.setflags(write=False)
    expected = ratings.copy()
    data = Interactions(rng.integers(0, 7, 50), rng.integers(0, 9, 50), ratings=ratings)
    assert not data.ratings.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        users, items, got = data.to_torch()
    got += 1
    np.testing.assert_array_equal(data.ratings, expected)
    np.testing.assert_array_equal(got.numpy(), expected + 1)
    assert users.tolist() == data.users.tolist() and items.tolist() == data.items.tolist()


def test_drop_duplicates():
    data = Interactions([0, 0, 1, 0], [1, 1, 1, 1], ratings=[1, 2, 3, 4], timestamps=[9, 5, 0, 1])
    assert data.drop_duplicates("first").ratings.tolist() == [1, 3]
    assert data.drop_duplicates("last").ratings.tolist() == [3, 4]
    assert data.drop_duplicates("latest").ratings.tolist() == [1, 3]


def test_with_item_metadata():
    data = Interactions.from_arrays([1, 2], [20, 10])
    meta = pd.DataFrame({"movieId": [10, 20, 30], "title": ["Ten", "Twenty", "Thirty"]})
    titled = data.with_item_metadata(meta)
    assert titled.item_titles == {0: "Ten", 1: "Twenty"}
    assert titled.item_metadata.loc[1, "title"] == "Twenty"
    assert titled.users is data.users and data.item_titles is None
    # Titles travel with subsets.
    assert titled.subset([0]).item_titles == titled.item_titles


def test_idmap_rejects_duplicate_raw_ids():
    with pytest.raises(ValueError, match="not unique"):
        IdMap(["a", "b", "a"])


def test_factorize_is_fast_enough_for_large_data():
    # 2M rows in well under the time budget: no Python loop per row.
    rng = np.random.default_rng(0)
    users = rng.integers(0, 10**9, 2_000_000)
    items = rng.integers(0, 50_000, 2_000_000)
    data = Interactions.from_arrays(users, items)
    assert len(data) == 2_000_000
    assert data.raw_user_ids(data.users[:100]).tolist() == users[:100].tolist()


@requires_ml_small
def test_from_csv_movielens_small():
    data = Interactions.from_csv(ML_SMALL / "ratings.csv")
    df = pd.read_csv(ML_SMALL / "ratings.csv")
    assert len(data) == len(df) == 100_836
    assert data.num_users == df.userId.nunique() and data.num_items == df.movieId.nunique()
    np.testing.assert_array_equal(data.raw_item_ids(data.items), df.movieId.to_numpy())
    np.testing.assert_array_equal(data.ratings, df.rating.to_numpy(np.float32))


# ============================================================================ splits


def assert_partition(data: Interactions, train: Interactions, test: Interactions):
    """No row on both sides, every row on one side, shared maps."""
    tr, te = row_ids(train), row_ids(test)
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(data)))
    for part in (train, test):
        assert part.user_map is data.user_map and part.item_map is data.item_map
        # Each side keeps the input's row order and the rows' contents.
        assert (np.diff(row_ids(part)) > 0).all()
        np.testing.assert_array_equal(part.users, data.users[row_ids(part)])
        np.testing.assert_array_equal(part.items, data.items[row_ids(part)])
        np.testing.assert_array_equal(part.timestamps, data.timestamps[row_ids(part)])


@pytest.mark.parametrize("by_user", [False, True])
def test_random_split(by_user):
    data = random_interactions()
    train, test = random_split(data, 0.25, seed=3, by_user=by_user)
    assert_partition(data, train, test)
    if not by_user:
        assert len(test) == round(0.25 * len(data))
    else:
        counts = np.bincount(data.users, minlength=data.num_users)
        expected = np.minimum(np.floor(0.25 * counts + 0.5), np.maximum(counts - 1, 0))
        np.testing.assert_array_equal(np.bincount(test.users, minlength=data.num_users),
                                      expected)
    again = random_split(data, 0.25, seed=3, by_user=by_user)[1]
    np.testing.assert_array_equal(row_ids(again), row_ids(test))
    other = random_split(data, 0.25, seed=4, by_user=by_user)[1]
    assert not np.array_equal(row_ids(other), row_ids(test))


def test_kfold_covers_every_row_once():
    data = random_interactions(n=503)
    folds = list(kfold(data, k=5, seed=1))
    assert len(folds) == 5
    tests = [row_ids(test) for _, test in folds]
    for train, test in folds:
        assert_partition(data, train, test)
    np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(len(data)))
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 1
    again = [row_ids(test) for _, test in kfold(data, k=5, seed=1)]
    assert all(np.array_equal(a, b) for a, b in zip(tests, again, strict=True))
    with pytest.raises(ValueError, match="k must be"):
        next(kfold(data, k=1))


@pytest.mark.parametrize("by", ["time", "random"])
def test_leave_one_out(by):
    data = random_interactions(n=600, ties=True)  # many equal timestamps per user
    # Give user 0 a single interaction: it must stay in train.
    keep = (data.users != 0) | (np.arange(len(data)) == np.flatnonzero(data.users == 0)[0])
    data = Interactions(data.users[keep], data.items[keep], np.arange(keep.sum()),
                        data.timestamps[keep], user_map=data.num_users,
                        item_map=data.num_items)
    train, test = leave_one_out(data, by=by, seed=7)
    assert_partition(data, train, test)
    counts = np.bincount(data.users, minlength=data.num_users)
    per_user_test = np.bincount(test.users, minlength=data.num_users)
    np.testing.assert_array_equal(per_user_test, (counts >= 2).astype(int))
    assert 0 in train.users and 0 not in test.users
    if by == "time":
        for row in row_ids(test):
            u = data.users[row]
            rows = np.flatnonzero(data.users == u)
            latest = rows[data.timestamps[rows] == data.timestamps[rows].max()]
            assert row == latest.max()  # ties: the last such row
    else:
        again = leave_one_out(data, by="random", seed=7)[1]
        np.testing.assert_array_equal(row_ids(again), row_ids(test))
        other = leave_one_out(data, by="random", seed=8)[1]
        assert not np.array_equal(row_ids(other), row_ids(test))


def test_leave_one_out_random_is_uniform_within_user():
    # 2000 users with items 0..3 each: the held-out item is uniform over the four.
    users = np.repeat(np.arange(2000), 4)
    data = Interactions(users, np.tile(np.arange(4), 2000), np.arange(8000.0))
    picks = leave_one_out(data, by="random", seed=0)[1].items
    assert len(picks) == 2000
    counts = np.bincount(picks, minlength=4)
    assert counts.min() > 420 and counts.max() < 580  # 500 expected each, sd ~19


@pytest.mark.parametrize("by_user", [False, True])
def test_temporal_split(by_user):
    data = random_interactions(ties=True)
    train, test = temporal_split(data, 0.2, by_user=by_user)
    assert_partition(data, train, test)
    if not by_user:
        assert len(test) == round(0.2 * len(data))
        assert train.timestamps.max() <= test.timestamps.min()
    else:
        for u in np.unique(test.users):
            assert train.timestamps[train.users == u].max() <= test.timestamps[
                test.users == u].min()


def test_split_errors():
    data = random_interactions()
    with pytest.raises(ValueError, match="test_fraction"):
        random_split(data, 1.5)
    no_time = Interactions(data.users, data.items)
    with pytest.raises(ValueError, match="needs timestamps"):
        leave_one_out(no_time)
    with pytest.raises(ValueError, match="needs timestamps"):
        temporal_split(no_time)
    with pytest.raises(ValueError, match="by must be"):
        leave_one_out(data, by="latest")
    one_each = Interactions([0, 1], [0, 0], timestamps=[1, 2])
    with pytest.raises(ValueError, match="test side would have no interactions"):
        leave_one_out(one_each)


# ============================================================================ negative sampling


def positives_of(data: Interactions) -> list[set]:
    sets = [set() for _ in range(data.num_users)]
    for u, i in zip(data.users.tolist(), data.items.tolist(), strict=True):
        sets[u].add(i)
    return sets


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
@pytest.mark.parametrize("replace", [True, False])
def test_negatives_exclude_positives(distribution, replace):
    data = random_interactions(num_users=60, num_items=80, n=2000, seed=2)
    users = np.random.default_rng(0).integers(0, 60, 500)
    k = 20
    neg = sample_negatives(data, users, k, distribution=distribution, seed=0, replace=replace)
    assert neg.shape == (500, k) and neg.dtype == np.int64
    assert neg.min() >= 0 and neg.max() < data.num_items
    pos = positives_of(data)
    for u, row in zip(users.tolist(), neg.tolist(), strict=True):
        assert not pos[u].intersection(row)
        if not replace:
            assert len(set(row)) == k
    if distribution == "popularity":
        weights = popularity(data)
        assert (weights[neg] > 0).all()


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_negatives_deterministic_and_thread_independent(distribution):
    data = random_interactions(num_users=100, num_items=300, n=5000, seed=5)
    users = np.arange(100).repeat(20)
    sampler = NegativeSampler(data, distribution=distribution)
    a = sampler.sample(users, 8, seed=123)
    b = sampler.sample(users, 8, seed=123)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sampler.sample(users, 8, seed=124))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        c = sampler.sample(users, 8, seed=123)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(a, c)
    # Repeated users get independent draws.
    assert not all(np.array_equal(a[0], a[j]) for j in range(1, 20))


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_small_batches_run_serially_with_the_same_draws(distribution):
    data = random_interactions(num_users=100, num_items=300, n=5000, seed=6)
    users = np.random.default_rng(6).integers(0, 100, 3000)
    sampler = NegativeSampler(data, distribution=distribution)
    threads = numba.get_num_threads()
    big = sampler.sample(users, 4, seed=9)  # 12,000 draws: the thread pool
    small = sampler.sample(users[:200], 4, seed=9)  # 800 draws: one thread
    assert numba.get_num_threads() == threads
    np.testing.assert_array_equal(small, big[:200])  # each row has its own stream


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_visit_order_does_not_change_negatives(monkeypatch, distribution):
    # Large batches are visited user by user; each row's stream makes that invisible.
    from fastmf.data import sampling

    data = random_interactions(num_users=30, num_items=100, n=1500, seed=8)
    users = np.random.default_rng(2).integers(0, 30, 3000)
    sampler = NegativeSampler(data, distribution=distribution)
    direct = sampler.sample(users, 3, seed=5)
    monkeypatch.setattr(sampling, "_GROUP_MIN_ROWS", 1)
    np.testing.assert_array_equal(sampler.sample(users, 3, seed=5), direct)


def test_csr_input_matches_interactions_input():
    data = random_interactions(n=1000, seed=3)
    users = np.arange(data.num_users)
    csr = data.to_csr(binary=True)  # ratings hold row numbers; row 0's is a zero
    for dist in ("uniform", "popularity"):
        a = sample_negatives(data, users, 5, distribution=dist, seed=9)
        b = sample_negatives(csr.tocsc(), users, 5, distribution=dist, seed=9)
        if dist == "uniform":  # same positive sets -> same draws
            np.testing.assert_array_equal(a, b)
        else:  # CSR counts distinct pairs, Interactions counts rows
            assert b.shape == a.shape


def frequencies(samples: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(samples.ravel(), minlength=n) / samples.size


@pytest.mark.parametrize("replace", [True, False])
def test_uniform_negatives_are_uniform(replace):
    # One user with positives {0, 3, 4, 9} among 12 items: 8 candidates, 1/8 each.
    data = Interactions([0, 0, 0, 0], [0, 3, 4, 9], item_map=12)
    k = 4 if not replace else 8
    neg = sample_negatives(data, np.zeros(20_000, dtype=np.int64), k, seed=1, replace=replace)
    freq = frequencies(neg, 12)
    expected = np.full(12, 1 / 8)
    expected[[0, 3, 4, 9]] = 0
    np.testing.assert_allclose(freq, expected, atol=0.006)
    # Without replacement, positions are exchangeable (Floyd's output is shuffled).
    if not replace:
        np.testing.assert_allclose(frequencies(neg[:, 0], 12), expected, atol=0.01)


def test_popularity_negatives_follow_weights_including_dense_rows():
    # Item weights 1..10; user 0 holds the heaviest items (most of the mass), so the
    # sampler has to leave rejection for the exact path.
    weights = np.arange(1.0, 11.0)
    data = Interactions([0, 0, 0, 0, 0, 1], [9, 8, 7, 6, 5, 0], item_map=10)
    sampler = NegativeSampler(data, distribution=weights)
    for user, positives in ((0, [5, 6, 7, 8, 9]), (1, [0])):
        neg = sampler.sample(np.full(40_000, user), 1, seed=user)
        expected = weights.copy()
        expected[positives] = 0
        expected /= expected.sum()
        np.testing.assert_allclose(frequencies(neg, 10), expected, atol=0.01)
    pop = sample_negatives(data, np.full(10_000, 1), 1, distribution="popularity", seed=0)
    # popularity: items 5..9 have count 1, item 0 is user 1's positive, 1..4 count 0.
    assert set(np.unique(pop)) == {5, 6, 7, 8, 9}


def test_popularity_alpha():
    data = Interactions([0, 0, 0, 1], [0, 0, 1, 2], item_map=4)  # counts 2, 1, 1, 0
    counts = popularity(data)
    assert counts.tolist() == [2, 1, 1, 0]
    neg = sample_negatives(data, np.full(30_000, 1), 1, distribution="popularity",
                           alpha=0.5, seed=0)
    expected = np.array([np.sqrt(2), 1.0, 0.0, 0.0])
    np.testing.assert_allclose(frequencies(neg, 4), expected / expected.sum(), atol=0.01)


def test_user_with_every_item_raises():
    data = Interactions([0, 0, 0, 1], [0, 1, 2, 0])
    with pytest.raises(ValueError, match="user 0 has no non-interacted items"):
        sample_negatives(data, np.array([1, 0]), 2, seed=0)
    with pytest.raises(ValueError, match="user 0 has no non-interacted items with nonzero"):
        sample_negatives(data, np.array([1, 0]), 2, distribution="popularity", seed=0)
    with pytest.raises(ValueError, match="user 1 has only 2 non-interacted items, fewer than"):
        sample_negatives(data, np.array([1]), 3, seed=0, replace=False)
    assert sample_negatives(data, np.array([1]), 2, seed=0, replace=False).shape == (1, 2)


def test_sampler_inputs():
    data = random_interactions()
    users = torch.tensor([0, 1, 2])
    neg = sample_negatives(data, users, 3, seed=0)
    assert isinstance(neg, torch.Tensor) and neg.dtype == torch.int64 and neg.shape == (3, 3)
    assert sample_negatives(data, np.array([], dtype=np.int64), 3).shape == (0, 3)
    assert sample_negatives(data, np.array([1]), 0).shape == (1, 0)
    a = sample_negatives(data, np.array([1, 2]), 4, seed=np.random.default_rng(5))
    b = sample_negatives(data, np.array([1, 2]), 4, seed=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError, match="user index 50 out of range"):
        sample_negatives(data, np.array([50]), 1)
    with pytest.raises(ValueError, match="distribution"):
        NegativeSampler(data, distribution="zipf")
    with pytest.raises(ValueError, match="shape"):
        NegativeSampler(data, distribution=np.ones(3))
    with pytest.raises(TypeError, match="train must be"):
        NegativeSampler([[0, 1]])


def test_popularity_of_sparse_matrix():
    matrix = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 5], [0, 0, 0]]))
    assert popularity(matrix).tolist() == [1, 0, 2]


# ============================================================================ text files


def random_rows(rng, n=40):
    return (rng.integers(1, 60, n), rng.integers(1, 90, n), rng.integers(1, 6, n),
            rng.integers(874_000_000, 893_000_000, n))


@pytest.mark.parametrize("pyarrow_engine", [True, False])
def test_from_csv_headerless_movielens_100k_layout(tmp_path, monkeypatch, pyarrow_engine):
    if not pyarrow_engine:
        monkeypatch.setattr(interactions_module, "_has_pyarrow", lambda: False)
    rng = np.random.default_rng(11)
    users, items, stars, times = random_rows(rng)
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(
        users, items, stars, times, strict=True)))
    layout = interactions_module.csv_layout(path)
    assert (layout.sep, layout.header) == ("\t", False)
    assert layout.columns == ["user", "item", "rating", "timestamp"]
    assert "by the .data extension" in layout.reason and "by position" in layout.reason
    data = Interactions.from_csv(path)
    np.testing.assert_array_equal(data.raw_user_ids(data.users), users)
    np.testing.assert_array_equal(data.raw_item_ids(data.items), items)
    np.testing.assert_array_equal(data.ratings, stars.astype(np.float32))
    np.testing.assert_array_equal(data.timestamps, times)
    # None still leaves a column out; three columns are user, item, rating.
    assert Interactions.from_csv(path, rating_col=None).ratings is None
    three = tmp_path / "three.tsv"
    three.write_text("".join(f"{u}\t{i}\t{r}\n" for u, i, r in zip(
        users, items, stars, strict=True)))
    data = Interactions.from_csv(three)
    assert data.timestamps is None
    np.testing.assert_array_equal(data.ratings, stars.astype(np.float32))


def test_from_csv_separator_and_header_rules(tmp_path):
    rng = np.random.default_rng(12)
    users, items, stars, _ = random_rows(rng, 10)
    body = ["userId", "movieId", "rating"], list(zip(users, items, stars, strict=True))
    for name, sep, how in (("r.tsv", "\t", "by the .tsv extension"),
                           ("r.txt", ";", "detected from the first lines"),
                           ("r.log", "|", "detected from the first lines")):
        path = tmp_path / name
        path.write_text(sep.join(body[0]) + "\n" + "".join(
            sep.join(map(str, row)) + "\n" for row in body[1]))
        layout = interactions_module.csv_layout(path)
        assert (layout.sep, layout.header) == (sep, True) and how in layout.reason
        data = Interactions.from_csv(path)
        np.testing.assert_array_equal(data.ratings, stars.astype(np.float32))
    # A comma file named .tsv needs sep: the error says so instead of reading one column.
    wrong = tmp_path / "comma.tsv"
    wrong.write_text("userId,movieId\n1,2\n")
    with pytest.raises(ValueError, match="wrong separator: pass sep"):
        Interactions.from_csv(wrong)
    assert len(Interactions.from_csv(wrong, sep=",")) == 1
    # header=False overrides detection: string ids with no header row.
    plain = tmp_path / "plain.csv"
    plain.write_text("ann,x,4\nbob,y,2\n")
    assert Interactions.from_csv(plain, header=False).ratings.tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="available columns"):
        Interactions.from_csv(plain)
    wide = tmp_path / "wide.csv"
    wide.write_text("1,2,3,4,5\n")
    with pytest.raises(ValueError, match="no header row and 5 columns"):
        Interactions.from_csv(wide)
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Interactions.from_csv(tmp_path / "empty.csv")
    (tmp_path / "one.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="cannot tell the separator"):
        Interactions.from_csv(tmp_path / "one.txt")


def test_column_names_match_exactly_and_typos_are_reported(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,Rating,timestamp\n1,2,4.5,10\n3,2,1.0,11\n")
    with pytest.raises(ValueError, match=r"'rating' \(rating_col\) not found, but 'Rating' is: "
                                         r"names are matched exactly.*--rating-col"):
        Interactions.from_csv(path)
    assert Interactions.from_csv(path, rating_col="Rating").ratings.tolist() == [4.5, 1.0]
    assert Interactions.from_csv(path, rating_col=None).ratings is None
    df = pd.DataFrame({"UserId": [1], "movieId": [2]})
    with pytest.raises(ValueError, match=r"but 'UserId' is.*available columns: \['UserId'"):
        Interactions.from_pandas(df)
    df = pd.DataFrame({"a": [1], "b": [2]})
    with pytest.raises(ValueError, match=r"expected user_col='userId', item_col='movieId'.*"
                                         r"matched exactly"):
        Interactions.from_pandas(df)


@pytest.mark.parametrize("pyarrow_engine", [True, False])
def test_from_csv_reports_text_that_is_not_utf8(tmp_path, monkeypatch, pyarrow_engine):
    if not pyarrow_engine:
        monkeypatch.setattr(interactions_module, "_has_pyarrow", lambda: False)
    path = tmp_path / "r.csv"
    path.write_bytes(b"userId,movieId,rating\nann,1,4.0\nb\xe9a,2,3.0\nbob,2,1.0\n")
    with pytest.raises(ValueError, match=r"not valid utf-8 text at line 3, column 'userId': "
                                         r"b'b\\xe9a'.*encoding"):
        Interactions.from_csv(path)
    data = Interactions.from_csv(path, encoding="latin-1")
    assert sorted(data.user_map.raw_ids.tolist()) == ["ann", "bob", "béa"]


def test_bytes_ids_are_decoded_or_refused():
    data = Interactions.from_arrays(np.array([b"x", b"\xc3\xa9", b"x"]), [1, 2, 3])
    assert data.user_map.raw_ids.tolist() == ["x", "é"] and data.users.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"item id at row 1 is not valid UTF-8 text: b'\\xff'"):
        Interactions.from_arrays([1, 2], np.array([b"a", b"\xff"], dtype=object))


def test_empty_id_lists_are_empty_not_float():
    for kwargs in (dict(num_users=3, num_items=3), dict(user_map=IdMap(["a"]),
                                                        item_map=IdMap(["b"])), {}):
        with pytest.raises(ValueError, match="no interactions"):
            Interactions.from_arrays([], [], **kwargs)
    with pytest.raises(ValueError, match="no interactions"):
        Interactions([], [], user_map=2, item_map=2)
    m = IdMap(["a", "b"])
    assert m.raw([]).tolist() == [] and m.lookup([]).tolist() == []
    data = Interactions([0, 1], [1, 0])
    with pytest.raises(ValueError, match="selection has no interactions"):
        data.subset([])


def test_uint64_indices_are_reported_with_their_value():
    big = np.array([3, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(IndexError, match="user index 18446744073709551615 out of range"):
        Interactions(big, [0, 1])
    with pytest.raises(IndexError, match=r"item index 18446744073709551615 out of range \[0, 5\)"):
        Interactions([0, 1], big, item_map=5)
    with pytest.raises(IndexError, match=r"user index 18446744073709551615 out of range \[0, 9\)"):
        Interactions.from_arrays(big, [0, 1], num_users=9)
    ok = Interactions(np.array([3, 1], dtype=np.uint64), [0, 1])
    assert ok.users.dtype == np.int64 and ok.num_users == 4


def test_from_csv_read_csv_kwargs_cannot_override_the_layout(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,rating\n1,2,4.0\n2,1,3.0\n")
    with pytest.raises(ValueError, match=r"may not set \['header', 'names'\]"):
        Interactions.from_csv(path, read_csv_kwargs={"header": None, "names": ["a", "b"]})
    data = Interactions.from_csv(path, read_csv_kwargs={"dtype": {"userId": str}})
    assert data.user_map.raw_ids.tolist() == ["1", "2"]


# ============================================================================ audit fixes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8,
                                   np.int16, np.int32, np.int64])
def test_idmap_lookups_do_not_wrap_narrow_integer_raw_ids(dtype):
    # pandas' get_indexer on a uint8/16/32 Index wrapped larger query ints: 261 found raw
    # id 5 of a uint8 map, and user_index(257) returned an index instead of a KeyError.
    rng = np.random.default_rng(np.dtype(dtype).num)
    top = min(int(np.iinfo(dtype).max), 120)
    raw = rng.choice(np.arange(1, top), 12, replace=False).astype(dtype)
    m = IdMap(raw, kind="user")
    assert m.raw_ids.dtype == dtype and m.raw_ids.tolist() == raw.tolist()
    position = {int(r): i for i, r in enumerate(raw.tolist())}
    for _ in range(30):
        base = rng.choice(raw.astype(np.int64), int(rng.integers(1, 9)))
        shifts = rng.choice([0, 0, 1 << 8, 1 << 16, 1 << 32, 1 << 40, -(1 << 8), -(1 << 32),
                             -1000], len(base))
        queries = base + shifts
        want = [position.get(int(q), -1) for q in queries]
        assert m.lookup(queries).tolist() == want
        assert m.lookup(queries.tolist()).tolist() == want
        for q, w in zip(queries.tolist(), want, strict=True):
            if w >= 0:
                assert m.index(q) == w
            else:
                with pytest.raises(KeyError, match=rf"1 unknown raw user id\(s\): \[{q}\]"):
                    m.index(q)
    big = np.array([int(raw[0]), 2**63 + int(raw[1])], dtype=np.uint64)
    assert m.lookup(big).tolist() == [0, -1]

    users = rng.choice(raw, 30)
    items = rng.integers(1, 50, 30)
    train = Interactions.from_arrays(users, items)
    assert train.user_map.raw_ids.dtype == dtype
    unknown = int(users[0]) + 256  # a raw id that wraps onto users[0] in a uint8 map
    with pytest.raises(KeyError, match=rf"unknown raw user id\(s\): \[{unknown}\]"):
        train.user_index(unknown)
    with pytest.raises(KeyError, match=rf"1 user id\(s\) not in the user map \(first at row 1\): "
                                       rf"\[{unknown}\]"):
        Interactions.from_arrays([int(users[3]), unknown], [int(items[0]), int(items[1])],
                                 user_map=train.user_map, item_map=train.item_map)
    test = Interactions.from_arrays(
        [unknown, int(users[3]), unknown + (1 << 32), int(users[5])],
        [int(items[0]), int(items[3]), int(items[1]), int(items[5])],
        ratings=[1.0, 2.0, 3.0, 4.0], user_map=train.user_map, item_map=train.item_map,
        unknown="drop",
    )
    assert test.ratings.tolist() == [2.0, 4.0]
    assert test.raw_user_ids(test.users).tolist() == [int(users[3]), int(users[5])]
    assert test.raw_item_ids(test.items).tolist() == [int(items[3]), int(items[5])]


def test_value_columns_mixing_ints_and_floats_are_numbers():
    rng = np.random.default_rng(11)
    n = 9
    users, items = rng.integers(0, 4, n), rng.integers(0, 5, n)
    mixed = [int(v) if k % 2 else float(v) + 0.25
             for k, v in enumerate(rng.integers(1, 10**6, n))]
    want = np.array(mixed, dtype=np.float64)
    data = Interactions(users, items, weights=mixed, timestamps=mixed)
    np.testing.assert_array_equal(data.weights, want.astype(np.float32))
    assert data.timestamps.dtype == np.float64
    np.testing.assert_array_equal(data.timestamps, want)
    np.testing.assert_array_equal(Interactions(users, items).with_weights(tuple(mixed)).weights,
                                  want.astype(np.float32))
    raw = Interactions.from_arrays([f"u{u}" for u in users], items, timestamps=mixed)
    np.testing.assert_array_equal(raw.timestamps, want)
    ints = [int(v) for v in rng.integers(1, 2**40, n)]
    assert Interactions(users, items, timestamps=ints).timestamps.tolist() == ints
    # Not numbers: still refused, naming the column.
    with pytest.raises(TypeError, match="fastmf.Interactions: weights must be numbers, got object"):
        Interactions([0, 1], [0, 1], weights=[1, "2"])
    with pytest.raises(TypeError, match="timestamps must be numbers or datetime64, got object"):
        Interactions([0, 1], [0, 1], timestamps=[5, None])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0; 1 are not \(first "
                                         r"at row 1: nan\)"):
        Interactions([0, 1], [0, 1], weights=[3, float("nan")])


def test_from_arrays_drop_checks_lengths_before_masking():
    # With unknown="drop" and an unknown id, a ratings/timestamps column of the wrong
    # length failed in numpy's boolean indexing; it gets the message the other path gives.
    rng = np.random.default_rng(5)
    users = rng.integers(1, 6, 7)
    items = np.r_[rng.integers(1, 3, 6), 9]  # item 9 is not in the map: its row is dropped
    known = np.r_[items[:6], 2]
    item_map = IdMap([1, 2])
    for extra, name in ((dict(ratings=rng.random(5)), "ratings"),
                        (dict(timestamps=rng.integers(0, 99, 8)), "timestamps")):
        length = len(next(iter(extra.values())))
        message = (rf"^fastmf.Interactions: mismatched lengths \{{'users': 7, 'items': 7, "
                   rf"'{name}': {length}\}}$")
        with pytest.raises(ValueError, match=message):
            Interactions.from_arrays(users, known, item_map=item_map, **extra)
        with pytest.raises(ValueError, match=message):
            Interactions.from_arrays(users, items, item_map=item_map, unknown="drop", **extra)
    ratings, stamps = rng.random(7).astype(np.float32), rng.integers(0, 99, 7)
    kept = Interactions.from_arrays(users, items, ratings, stamps, item_map=item_map,
                                    unknown="drop")
    np.testing.assert_array_equal(kept.ratings, ratings[:6])
    np.testing.assert_array_equal(kept.timestamps, stamps[:6])


def test_uint64_timestamps_beyond_int64_are_refused():
    rng = np.random.default_rng(8)
    fine = rng.integers(0, 2**62, 6).astype(np.uint64)
    data = Interactions(np.arange(6), np.arange(6), timestamps=fine)
    assert data.timestamps.dtype == np.int64
    assert data.timestamps.tolist() == fine.tolist()
    big = fine.copy()
    big[[2, 4]] = np.uint64(2**63) + rng.integers(0, 2**62, 2).astype(np.uint64)
    match = rf"timestamps must fit in int64; 2 do not \(first at row 2: {int(big[2])}\)"
    with pytest.raises(ValueError, match=match):
        Interactions(np.arange(6), np.arange(6), timestamps=big)
    with pytest.raises(ValueError, match=match):
        Interactions.from_arrays(np.arange(6), np.arange(6), timestamps=big.tolist())
    with pytest.raises(ValueError, match=r"timestamps must fit in int64; 1 do not \(first at "
                                         rf"row 1: {-2**63 - 7}\)"):
        Interactions([0, 1], [0, 1], timestamps=[5, -2**63 - 7])


@pytest.mark.parametrize("value, error, shown", [
    (2.5, TypeError, "2.5"), (3.0, TypeError, "3.0"), ("3", TypeError, "'3'"),
    (True, TypeError, "True"), (-1, ValueError, "-1"),
])
def test_num_users_and_num_items_must_be_ints(value, error, shown):
    for name in ("num_users", "num_items"):
        with pytest.raises(error, match=rf"fastmf.Interactions.from_arrays: {name} must be an "
                                        rf"int >= 0, got {shown}$"):
            Interactions.from_arrays([0, 1, 1], [0, 1, 2], **{name: value})
    data = Interactions.from_arrays([0, 1, 1], [0, 1, 2], num_users=np.int32(7), num_items=5)
    assert data.shape == (7, 5) and data.items.tolist() == [0, 1, 2]


def test_split_arguments_are_checked_and_named():
    data = random_interactions(seed=4)
    for call, where in ((lambda **kw: random_split(data, **kw), "random_split"),
                        (lambda **kw: random_split(data, by_user=True, **kw), "random_split"),
                        (lambda **kw: temporal_split(data, **kw), "temporal_split")):
        for fraction in ("0.2", None, True, [0.2]):
            with pytest.raises(TypeError, match=rf"fastmf.{where}: test_fraction must be a "
                                                rf"number in \(0, 1\), got "):
                call(test_fraction=fraction)
        with pytest.raises(ValueError, match=rf"fastmf.{where}: test_fraction must be in "
                                             r"\(0, 1\), got nan"):
            call(test_fraction=float("nan"))
    seeded = (lambda seed: random_split(data, 0.3, seed=seed),
              lambda seed: random_split(data, 0.3, seed=seed, by_user=True),
              lambda seed: leave_one_out(data, by="random", seed=seed),
              lambda seed: leave_one_out(data, by="time", seed=seed),
              lambda seed: kfold(data, 4, seed=seed))
    names = ("random_split", "random_split", "leave_one_out", "leave_one_out", "kfold")
    for split, where in zip(seeded, names, strict=True):
        for seed in (-1, np.int64(-3)):
            with pytest.raises(ValueError, match=rf"fastmf.{where}: seed must be an int >= 0, "
                                                 rf"got {int(seed)}$"):
                split(seed)
        for seed, shown in ((1.5, "1.5"), ("3", "'3'"), (True, "True")):
            with pytest.raises(TypeError, match=rf"fastmf.{where}: seed must be an int >= 0, "
                                                rf"None or a numpy Generator, got {shown}$"):
                split(seed)
    # numpy ints and Generators seed as before: the same rows as the plain int.
    for split in seeded[:3]:
        a, b = split(np.uint32(17)), split(17)
        np.testing.assert_array_equal(row_ids(a[1]), row_ids(b[1]))
        c = split(np.random.default_rng(17))
        np.testing.assert_array_equal(row_ids(c[1]), row_ids(b[1]))
    a = [row_ids(test) for _, test in kfold(data, 4, seed=np.int16(9))]
    b = [row_ids(test) for _, test in kfold(data, 4, seed=9)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(data)))
    train, test = random_split(data, np.float32(0.25), seed=3)
    assert len(test) == round(0.25 * len(data)) and len(train) + len(test) == len(data)


@pytest.mark.parametrize("alpha, error, match", [
    (float("nan"), ValueError, "alpha must be finite and >= 0, got nan$"),
    (float("inf"), ValueError, "alpha must be finite and >= 0, got inf$"),
    (-float("inf"), ValueError, "alpha must be finite and >= 0, got -inf$"),
    (-1.0, ValueError, r"alpha must be finite and >= 0, got -1.0: the items nobody interacted "
                       r"with would get weight 0 \*\* alpha = inf"),
    ("0.75", TypeError, "alpha must be a number, got '0.75'"),
    (None, TypeError, "alpha must be a number, got None"),
    (2000.0, ValueError, r"popularity \*\* alpha \(alpha=2000.0\) must be finite and >= 0; "
                         r"\d+ are not \(first at item \d+: inf\)"),
])
def test_popularity_alpha_is_checked(alpha, error, match):
    # nan/inf made every weight nan/inf and sample() spin forever; -1 gave the items with
    # count 0 weight inf, so every negative was the same item.
    data = random_interactions(seed=2)
    with pytest.raises(error, match="fastmf.NegativeSampler: " + match):
        NegativeSampler(data, distribution="popularity", alpha=alpha)
    with pytest.raises(error, match="fastmf.NegativeSampler: " + match):
        sample_negatives(data, np.array([0, 1]), 2, distribution="popularity", alpha=alpha,
                         seed=0)


def test_item_weights_are_checked_before_the_alias_table():
    rng = np.random.default_rng(6)
    data = Interactions([0, 0, 1, 2], [0, 1, 2, 2], user_map=3, item_map=6)
    weights = rng.random(6) + 0.5
    weights[3] = np.nan
    with pytest.raises(ValueError, match=r"fastmf.NegativeSampler: weights must be finite and "
                                         r">= 0; 1 are not \(first at item 3: nan\)"):
        NegativeSampler(data, distribution=weights)
    with pytest.raises(ValueError, match="weights sum to inf; scale them down"):
        NegativeSampler(data, distribution=np.full(6, 1e308))
    with pytest.raises(ValueError, match="all item weights are zero"):
        NegativeSampler(data, distribution=np.zeros(6))
    # A valid alpha of 0 is uniform over every item, those nobody interacted with included.
    neg = sample_negatives(data, np.full(40_000, 2), 1, distribution="popularity", alpha=0,
                           seed=1)
    assert not (neg == 2).any()  # user 2's positive
    np.testing.assert_allclose(frequencies(neg, 6)[[0, 1, 3, 4, 5]], 0.2, atol=0.01)
