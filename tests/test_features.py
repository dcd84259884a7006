"""fastmf.data.Features: construction from tables, scipy and metadata; normalisation,
identity columns, hashing (stable, FeatureHasher's), transform of new rows, bad input."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fastmf.data import Features, IdMap, Interactions, feature_hash


@pytest.fixture
def movies():
    return pd.DataFrame({
        "movieId": [10, 20, 30, 40],
        "genres": ["Comedy|Drama", "Drama", "Comedy|Comedy|Horror", None],
        "studio": ["A", "B", "A", "C"],
        "year": [1.5, 0.0, 2.0, 3.0],
    })


def test_from_pandas_columns_and_weights(movies):
    f = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio",
                             numeric="year", normalize=False)
    names = f.feature_names.tolist()
    assert names == sorted(names)
    dense = pd.DataFrame(f.matrix.toarray(), columns=names, index=[10, 20, 30, 40])
    assert dense.loc[10, "genres=Comedy"] == 1 and dense.loc[10, "genres=Drama"] == 1
    # A repeated value inside one cell counts once; a missing cell gives nothing.
    assert dense.loc[30, "genres=Comedy"] == 1 and dense.loc[30, "genres=Horror"] == 1
    assert dense.loc[40].filter(like="genres=").sum() == 0
    assert dense.loc[20, "studio=B"] == 1
    np.testing.assert_allclose(dense["year"].to_numpy(), [1.5, 0.0, 2.0, 3.0])
    assert f.shape == (4, len(names))


def test_normalisation_and_identity(movies):
    f = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio")
    sums = np.asarray(f.matrix.sum(axis=1)).ravel()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    g = f.with_identity()
    m = g.matrix.toarray()
    assert m.shape == (4, f.num_features + 4)
    # The identity column of row r is F + r, weighted like one more feature.
    np.testing.assert_allclose(m[0, f.num_features + 0], 1 / 4)  # Comedy, Drama, studio, id
    np.testing.assert_allclose(m[3, f.num_features + 3], 1 / 2)  # studio, id
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert f.identity is False  # with_identity copies


def test_rows_follow_a_shared_id_map(movies):
    data = Interactions.from_arrays([1, 1, 2], [30, 99, 10]).with_item_metadata(
        movies.rename(columns={"genres": "genres"}), title_col=None)
    f = Features.from_pandas(movies, "movieId", id_map=data.item_map, multi="genres")
    assert f.num_rows == data.num_items
    for raw in (30, 10):
        row = f.matrix[data.item_map.index(raw)].toarray().ravel()
        expected = movies.set_index("movieId").loc[raw, "genres"].split("|")
        got = {f.feature_names[j] for j in np.flatnonzero(row)}
        assert got == {f"genres={g}" for g in expected}
    # 99 has no row in the table: an empty row; 20 and 40 are not in the map: ignored.
    assert f.matrix[data.item_map.index(99)].nnz == 0
    assert f.empty_rows().tolist() == [int(data.item_map.index(99))]
    g = Features.from_interactions(data)
    assert (g.matrix != f.matrix).nnz == 0 and g.id_map is data.item_map


def test_repeated_ids_add_up():
    tags = pd.DataFrame({"movieId": [1, 1, 1, 2], "tag": ["funny", "funny", "dark", "dark"]})
    f = Features.from_pandas(tags, "movieId", categorical="tag", normalize=False)
    d = dict(zip(f.feature_names, f.matrix[0].toarray().ravel()))
    assert d == {"tag=dark": 1.0, "tag=funny": 2.0}


def test_from_scipy_checks_and_normalises():
    rng = np.random.default_rng(3)
    m = sp.random(6, 4, density=0.5, format="csr", random_state=rng) * 3
    f = Features.from_scipy(m)
    sums = np.asarray(m.sum(1)).ravel()
    expected = m.toarray() / np.where(sums > 0, sums, 1)[:, None]
    np.testing.assert_allclose(f.matrix.toarray(), expected, rtol=1e-6)
    bad = m.copy()
    bad.data[0] = -1.0
    with pytest.raises(ValueError, match="negative weight"):
        Features.from_scipy(bad)
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Features.from_scipy(bad)
    with pytest.raises(ValueError, match="rows but the id map"):
        Features.from_scipy(m, id_map=IdMap.identity(5))


def messy_csr(rng, dtype, shape=(7, 5), nnz=24):
    """A CSR with duplicate entries, unsorted column indices within rows and explicit zeros,
    built from its arrays (scipy keeps them as given), and its dense value."""
    rows = np.sort(rng.integers(0, shape[0], nnz))
    cols = rng.integers(0, shape[1], nnz)
    values = rng.integers(1, 9, nnz).astype(dtype) + dtype(0.5)
    values[rng.choice(nnz, 3, replace=False)] = 0  # explicit zeros
    dense = np.zeros(shape)
    np.add.at(dense, (rows, cols), values.astype(np.float64))
    order = np.lexsort((-cols, rows))  # columns descending within each row: unsorted
    indptr = np.searchsorted(rows[order], np.arange(shape[0] + 1)).astype(np.int32)
    m = sp.csr_matrix((values[order], cols[order].astype(np.int32), indptr), shape=shape)
    assert not m.has_sorted_indices and len(set(zip(rows, cols))) < nnz
    return m, dense


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_from_scipy_and_weights_leave_the_callers_matrix_alone(dtype):
    # sp.csr_matrix(raw, dtype=float32) shared the caller's indices/indptr (and data when
    # float32); sum_duplicates/sort_indices/eliminate_zeros then rewrote them in place, so a
    # float64 matrix came back holding other values.
    rng = np.random.default_rng(21 if dtype is np.float64 else 22)
    m, dense = messy_csr(rng, dtype)
    before = [a.copy() for a in (m.data, m.indices, m.indptr)]
    f = Features.from_scipy(m, normalize=False)
    for a, b in zip(before, (m.data, m.indices, m.indptr), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(m.toarray(), dense)
    np.testing.assert_allclose(f.raw.toarray(), dense, rtol=1e-6)
    assert f.raw.has_canonical_format and f.raw.nnz == np.count_nonzero(dense)
    np.testing.assert_allclose(f.matrix.toarray(), dense, rtol=1e-6)

    # The constructor and weights() copy too.
    m2, dense2 = messy_csr(rng, dtype)
    before = [a.copy() for a in (m2.data, m2.indices, m2.indptr)]
    direct = Features(m2, IdMap.identity(7), np.array([f"f{j}" for j in range(5)]),
                      normalize=False)
    np.testing.assert_allclose(direct.raw.toarray(), dense2, rtol=1e-6)
    normalised = Features.from_scipy(m, normalize=True)
    out = normalised.weights(m2, None)
    sums = dense2.sum(1, keepdims=True)
    np.testing.assert_allclose(out.toarray(), dense2 / np.where(sums > 0, sums, 1), rtol=1e-6)
    out = f.weights(m2, None)
    assert out.has_sorted_indices
    np.testing.assert_allclose(out.toarray(), dense2, rtol=1e-6)
    for a, b in zip(before, (m2.data, m2.indices, m2.indptr), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_tables(movies):
    with pytest.raises(ValueError, match="column 'nope' not found"):
        Features.from_pandas(movies, "movieId", multi="nope")
    with pytest.raises(ValueError, match="at least one column"):
        Features.from_pandas(movies, "movieId")
    bad = movies.assign(year=[1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        Features.from_pandas(bad, "movieId", numeric="year")
    with pytest.raises(ValueError, match="negative"):
        Features.from_pandas(movies.assign(year=[1.0, -2.0, 2.0, 3.0]), "movieId",
                             numeric="year")
    with pytest.raises(ValueError, match="hash_buckets|buckets must be a positive"):
        Features.from_pandas(movies, "movieId", multi="genres", hash_buckets=0)


# Fixed expected values: h = murmurhash3_32(name, seed=0, positive=False) (signed 32-bit
# MurmurHash3 of the UTF-8 bytes), column = abs(h) % 1024, sign = -1 if h < 0.
HASHES = {"genres=Comedy": -802011650, "genres=Drama": 425518278, "tag=funny": 2105696142,
          "user_age": 7243560, "Ωmega=ü": -1594406437}


def test_hash_formula_fixed_values():
    names = list(HASHES)
    cols, signs = feature_hash(names, 1024)
    assert cols.tolist() == [abs(h) % 1024 for h in HASHES.values()] == [514, 198, 910, 808,
                                                                          549]
    assert signs.tolist() == [-1, 1, 1, 1, -1]


def test_hash_equals_feature_hasher():
    from sklearn.feature_extraction import FeatureHasher

    rng = np.random.default_rng(11)
    names = ["".join(rng.choice(list("abcdefgh=|é1"), size=rng.integers(1, 12)))
             for _ in range(200)]
    cols, signs = feature_hash(names, 37)
    fh = FeatureHasher(n_features=37, input_type="string", alternate_sign=True)
    expected = fh.transform([[n] for n in names]).toarray()
    got = np.zeros_like(expected)
    got[np.arange(len(names)), cols] = signs
    np.testing.assert_array_equal(got, expected)


def test_hash_stable_across_processes():
    # Another process with another str-hash salt gets the same hashes (the documented hash
    # never goes through Python's salted hash()).
    names = ["genres=Comedy", "tag=x", "Ωmega=ü"]
    code = ("from sklearn.utils import murmurhash3_32; "
            f"print([murmurhash3_32(n, seed=0, positive=False) for n in {names!r}])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    hashes = np.array(eval(out.stdout))
    cols, signs = feature_hash(names, 97)
    np.testing.assert_array_equal(cols, np.abs(hashes) % 97)
    np.testing.assert_array_equal(signs, np.where(hashes < 0, -1, 1))


def test_hashed_features_and_collisions(movies):
    f = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio",
                             hash_buckets=2, normalize=False)
    names = ["genres=Comedy", "genres=Drama", "genres=Horror", "studio=A", "studio=B",
             "studio=C"]
    cols, _ = feature_hash(names, 2)
    stats = f.collisions()
    counts = np.bincount(cols, minlength=2)
    assert stats["names"] == 6 and stats["buckets"] == 2
    assert stats["colliding_names"] == int(counts[counts > 1].sum())
    assert stats["max_per_bucket"] == int(counts.max())
    # Row 0 (Comedy, Drama, studio A): each name adds 1 to its bucket.
    expected = np.bincount(cols[[0, 1, 3]], minlength=2)
    np.testing.assert_array_equal(f.matrix[0].toarray().ravel(), expected)
    signed = Features.from_pandas(movies, "movieId", multi="genres", hash_buckets=64,
                                  signed=True, normalize=True)
    np.testing.assert_allclose(np.asarray(abs(signed.matrix[:3]).sum(1)).ravel(), 1.0,
                               rtol=1e-6)
    plain = Features.from_pandas(movies, "movieId", multi="genres")
    assert plain.collisions()["colliding_names"] == 0


def test_pandas_missing_values_give_no_feature():
    """pd.NA (string, Int64 and pyarrow-backed columns: convert_dtypes, parquet) and NaT
    are missing values like None and NaN: no feature, in from_pandas and in transform."""
    df = pd.DataFrame({"movieId": [10, 20, 30], "genres": ["Comedy|Drama", "Drama", None],
                       "studio": ["A", None, "B"], "year": [1999, None, 2001]}).convert_dtypes()
    assert df["studio"].isna().sum() == 1 and str(df["year"].dtype) == "Int64"
    f = Features.from_pandas(df, "movieId", multi="genres", categorical=["studio", "year"],
                             normalize=False)
    assert f.feature_names.tolist() == ["genres=Comedy", "genres=Drama", "studio=A",
                                        "studio=B", "year=1999", "year=2001"]
    assert f.matrix.toarray().tolist() == [[1, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0],
                                           [0, 0, 0, 1, 0, 1]]
    new = pd.DataFrame({"genres": [pd.NA, "Comedy"], "studio": ["B", pd.NA],
                        "year": [pd.NA, 1999]}).astype({"year": "Int64"})
    assert f.transform(new).toarray().tolist() == [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0]]


def test_transform_new_rows(movies):
    f = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio")
    new = pd.DataFrame({"genres": ["Drama|Horror"], "studio": ["B"]})
    rows = f.transform(new)
    got = {f.feature_names[j]: v for j, v in zip(rows.indices, rows.data)}
    assert got == {"genres=Drama": 1.0, "genres=Horror": 1.0, "studio=B": 1.0}
    unseen = pd.DataFrame({"genres": ["Drama|Western"], "studio": ["Z"]})
    with pytest.raises(KeyError, match="Western"):
        f.transform(unseen)
    kept = f.transform(unseen, unknown="ignore")
    assert [f.feature_names[j] for j in kept.indices] == ["genres=Drama"]
    hashed = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio",
                                  hash_buckets=16)
    h = hashed.transform(unseen)  # unknown names simply hash
    cols, _ = feature_hash(["genres=Drama", "genres=Western", "studio=Z"], 16)
    np.testing.assert_array_equal(h.toarray().ravel(), np.bincount(cols, minlength=16))
    by_id = f.transform(pd.DataFrame({"movieId": [7, 7], "genres": ["Drama", "Horror"],
                                      "studio": ["A", "A"]}), "movieId")
    assert by_id.shape[0] == 1 and by_id.sum() == 4  # studio A twice, two genres


@pytest.mark.parametrize("hashed", [False, True])
def test_vocabulary_round_trip_through_json(movies, hashed):
    import json

    f = Features.from_pandas(movies, "movieId", multi="genres", categorical="studio",
                             numeric="year", hash_buckets=16 if hashed else None,
                             signed=hashed)
    vocab = json.loads(json.dumps(f.vocabulary()))
    g = Features.from_vocabulary(vocab, kind="item")
    assert g.num_rows == 0 and g.num_features == f.num_features
    assert g.feature_names.tolist() == f.feature_names.tolist()
    new = pd.DataFrame({"genres": ["Drama|Horror", None], "studio": ["C", "A"],
                        "year": [2.5, 0.0]})
    assert (g.transform(new) != f.transform(new)).nnz == 0
    assert g.transform(new).nnz > 0


def test_vocabulary_bad_input(movies):
    vocab = Features.from_pandas(movies, "movieId", multi="genres").vocabulary()
    with pytest.raises(ValueError, match="exactly the keys"):
        Features.from_vocabulary({**vocab, "code": "print(1)"})
    with pytest.raises(ValueError, match=r"\['feature_names'\] must be a list of str"):
        Features.from_vocabulary({**vocab, "feature_names": ["a", 3]})
    with pytest.raises(ValueError, match="duplicate names"):
        Features.from_vocabulary({**vocab, "feature_names": ["a", "a"]})
    with pytest.raises(ValueError, match=r"\['hash_buckets'\] must be None or an int >= 1"):
        Features.from_vocabulary({**vocab, "feature_names": None, "hash_buckets": 0})
    with pytest.raises(ValueError, match=r"\['spec'\]\['multi'\] must be a list"):
        Features.from_vocabulary({**vocab, "spec": {**vocab["spec"], "multi": "genres"}})
    with pytest.raises(ValueError, match=r"\['normalize'\] must be a bool"):
        Features.from_vocabulary({**vocab, "normalize": 1})
    # built from a matrix: names but no table columns, so transform says how to proceed
    g = Features.from_vocabulary(Features.from_scipy(sp.eye(3, format="csr")).vocabulary())
    with pytest.raises(ValueError, match="not built from a table"):
        g.transform(movies)
