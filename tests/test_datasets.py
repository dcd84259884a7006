"""fastmf.datasets: MovieLens readers (on small fake folders and the real ml-latest-small)
and the synthetic generator."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import time
import zipfile
from pathlib import Path

import numba
import numpy as np
import pytest

from fastmf.data import leave_one_out, temporal_split
from fastmf.datasets import SyntheticTruth, fetch_movielens, load_movielens, synthetic

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
requires_ml_small = pytest.mark.skipif(
    not (ML_SMALL / "ratings.csv").is_file(), reason=f"MovieLens data not found at {ML_SMALL}"
)


# ============================================================================ MovieLens


def write_100k(folder: Path) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text(
        "1\t20\t4\t881250949\n2\t10\t3\t891717742\n1\t10\t5\t878887116\n"
    )
    genres = ["unknown", "Action", "Comedy"]
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)))
    (folder / "u.item").write_bytes(
        "10|Amélie (2001)|01-Jan-2001||http://x|0|0|1\n"
        "20|Heat (1995)|01-Jan-1995||http://y|0|1|1\n".encode("latin-1")
    )
    return folder


def write_dat(folder: Path, encoding: str) -> Path:
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::4.5::978300760\n2::20::1::978302109\n")
    (folder / "movies.dat").write_bytes(
        "10::Amélie (2001)::Comedy|Romance\n20::Se7en :: The Cut (1995)::Thriller\n".encode(
            encoding
        )
    )
    return folder


def write_csv(folder: Path) -> Path:
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n3,7,0.5,1\n3,8,5.0,2\n4,7,3.5,3\n"
    )
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n7,"Heat, The (1995)",Action\n8,Amélie (2001),Comedy\n'
        "9,Unrated (2000),Drama\n",
        encoding="utf-8",
    )
    return folder


def test_load_movielens_100k(tmp_path):
    data = load_movielens(write_100k(tmp_path / "ml-100k"))
    assert (len(data), data.num_users, data.num_items) == (3, 2, 2)
    assert data.raw_item_ids(data.items).tolist() == [20, 10, 10]
    assert data.ratings.tolist() == [4.0, 3.0, 5.0]
    assert data.timestamps.tolist() == [881250949, 891717742, 878887116]
    assert data.item_titles == {0: "Amélie (2001)", 1: "Heat (1995)"}
    assert data.item_metadata.loc[1, "genres"] == "Action|Comedy"


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])  # ml-1m, ml-10m
def test_load_movielens_dat(tmp_path, encoding):
    data = load_movielens(write_dat(tmp_path / "ml-1m", encoding))
    assert data.ratings.tolist() == [4.5, 1.0]
    assert data.item_titles[data.item_index(10)] == "Amélie (2001)"
    assert data.item_titles[data.item_index(20)] == "Se7en :: The Cut (1995)"
    assert data.item_metadata.loc[0, "genres"] == "Comedy|Romance"


def test_load_movielens_csv_and_path_forms(tmp_path):
    folder = write_csv(tmp_path / "ml-latest-small")
    data = load_movielens(folder)
    assert data.ratings.tolist() == [0.5, 5.0, 3.5]
    assert data.item_titles == {0: "Heat, The (1995)", 1: "Amélie (2001)"}  # 9: unrated
    assert data.timestamps.dtype == np.int64
    # A file inside the folder, or the folder the zip was extracted into, also work.
    assert len(load_movielens(folder / "ratings.csv")) == 3
    assert len(load_movielens(tmp_path)) == 3


def test_load_movielens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_movielens(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"looked for ratings.csv, ratings.dat, u.data.*README"):
        load_movielens(tmp_path / "empty")
    write_csv(tmp_path / "a")
    write_csv(tmp_path / "b")
    with pytest.raises(ValueError, match="several MovieLens folders"):
        load_movielens(tmp_path)


def test_load_movielens_names_the_file_that_does_not_parse(tmp_path):
    folder = write_csv(tmp_path / "csv")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,100\n"
                                        "2,x,4,100\n")
    with pytest.raises(ValueError, match=r"cannot read the MovieLens files at .*ratings.csv: "
                                         r"invalid literal for int\(\) .* 'x'"):
        load_movielens(folder)
    folder = write_100k(tmp_path / "100k")
    (folder / "u.genre").write_text("unknown|0\nAction|one\n")
    with pytest.raises(ValueError, match=r"cannot read the MovieLens files at .*100k: "
                                         r"invalid literal"):
        load_movielens(folder)
    (folder / "u.data").write_text("1\t20\t4\n2\t10\t3\n")  # no timestamps
    with pytest.raises(ValueError, match=r"at .*u.data: .*column 3 \(timestamp\)"):
        load_movielens(folder)


@pytest.mark.parametrize("name, text", [
    ("ratings.dat", "1::10::4::100\n1.5::20::3::200\n2::10::5::150\n"),
    ("u.data", "1\t10\t4\t100\n2\t10.25\t5\t150\n"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,100\n1.5,20,3,200\n"),
])
def test_load_movielens_refuses_fractional_ids_in_every_format(tmp_path, name, text):
    """ratings.dat and u.data took ids such as 1.5 (every id then a float, 1 the raw id
    1.0); ratings.csv refused them. Now every format reads integer ids."""
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=rf"cannot read the MovieLens files at .*{name}"):
        load_movielens(folder)


@requires_ml_small
def test_load_movielens_latest_small():
    data = load_movielens(ML_SMALL)
    assert (len(data), data.num_users, data.num_items) == (100_836, 610, 9_724)
    assert data.item_titles[data.item_index(1)] == "Toy Story (1995)"
    assert data.ratings.min() == 0.5 and data.ratings.max() == 5.0
    assert len(data.item_titles) == data.num_items
    train, test = leave_one_out(data, by="time")
    assert len(test) == 610 and len(train) + len(test) == len(data)


# ============================================================================ synthetic


def arrays(data):
    return [data.users, data.items, data.timestamps] + (
        [data.ratings] if data.ratings is not None else []
    )


def test_synthetic_shape_and_invariants():
    data, truth = synthetic(300, 120, 9_000, dim=6, seed=1, return_truth=True)
    assert (len(data), data.num_users, data.num_items) == (9_000, 300, 120)
    assert isinstance(truth, SyntheticTruth)
    assert truth.user_factors.shape == (300, 6) and truth.item_factors.shape == (120, 6)
    assert truth.user_bias.shape == (300,) and truth.item_bias.shape == (120,)
    # No duplicate pairs; per-user counts as planted, within [min, cap].
    pairs = data.users * data.num_items + data.items
    assert len(np.unique(pairs)) == len(data)
    counts = np.bincount(data.users, minlength=300)
    np.testing.assert_array_equal(counts, truth.user_counts)
    assert counts.min() >= 5 and counts.max() <= 60
    # Ratings on the half-star grid in [1, 5]; timestamps within the range.
    np.testing.assert_array_equal(data.ratings * 2, np.round(data.ratings * 2))
    assert data.ratings.min() >= 1.0 and data.ratings.max() <= 5.0
    assert 946_684_800 <= data.timestamps.min() <= data.timestamps.max() <= 1_577_836_800


def test_synthetic_is_deterministic_and_thread_independent():
    a = synthetic(200, 80, 4_000, seed=3)
    b = synthetic(200, 80, 4_000, seed=3)
    for x, y in zip(arrays(a), arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        c = synthetic(200, 80, 4_000, seed=3)
    finally:
        numba.set_num_threads(threads)
    for x, y in zip(arrays(a), arrays(c), strict=True):
        np.testing.assert_array_equal(x, y)
    d = synthetic(200, 80, 4_000, seed=4)
    assert not np.array_equal(a.items, d.items)


def test_synthetic_ratings_follow_the_planted_model():
    data, truth = synthetic(500, 200, 20_000, dim=8, noise=0.3, seed=0, return_truth=True)
    expected = truth.expected_rating(data.users, data.items)
    inside = (expected > 1.5) & (expected < 4.5)  # away from clipping
    residual = data.ratings[inside] - expected[inside]
    # Noise 0.3 plus half-star rounding (uniform, std 0.5/sqrt(12) = 0.144).
    assert abs(residual.mean()) < 0.02
    assert abs(residual.std() - np.hypot(0.3, 0.144)) < 0.03
    # The interaction part carries signal beyond the biases.
    biases = truth.global_mean + truth.user_bias[data.users] + truth.item_bias[data.items]
    assert np.corrcoef(data.ratings - biases, truth.preference(data.users, data.items))[0, 1] > 0.6
    # Popularity is Zipf-skewed: the most popular decile of items holds a large share.
    counts = np.sort(np.bincount(data.items, minlength=200))[::-1]
    assert counts[:20].sum() > 0.25 * len(data)


def test_synthetic_implicit_picks_preferred_items():
    data, truth = synthetic(400, 300, 12_000, dim=8, implicit=True, seed=2, return_truth=True)
    assert data.ratings is None and truth.selection_strength > 0
    chosen = truth.preference(data.users, data.items)
    rng = np.random.default_rng(0)
    random_items = rng.integers(0, 300, len(data))
    assert chosen.mean() > truth.preference(data.users, random_items).mean() + 0.2 * truth.signal
    pairs = data.users * 300 + data.items
    assert len(np.unique(pairs)) == len(data)


def test_synthetic_heavy_users_use_dense_path():
    # Users may take up to every item: rows where rejection would crawl go dense.
    data = synthetic(20, 50, 600, max_user_fraction=1.0, activity_exponent=0.5,
                     implicit=True, seed=5)
    counts = np.bincount(data.users)
    assert counts.max() > 40
    assert len(np.unique(data.users * 50 + data.items)) == len(data)


def test_synthetic_supports_splits():
    data = synthetic(100, 60, 3_000, seed=0)
    train, test = temporal_split(data, 0.1)
    assert train.timestamps.max() <= test.timestamps.min()
    train, test = leave_one_out(data, by="time")
    assert len(test) == 100


def test_synthetic_errors():
    with pytest.raises(ValueError, match="num_interactions=50 must lie in"):
        synthetic(100, 10, 50)
    with pytest.raises(ValueError, match="must lie in"):
        synthetic(10, 10, 1_000)
    with pytest.raises(ValueError, match=">= 1"):
        synthetic(0, 10, 10)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mean_active_days=float("nan")), ValueError, "mean_active_days must be a finite"),
    (dict(mean_active_days=-365.0), ValueError, "mean_active_days > 0"),
    (dict(zipf=float("nan")), ValueError, "zipf must be a finite number, got nan"),
    (dict(signal=float("inf")), ValueError, "signal must be a finite number, got inf"),
    (dict(noise=float("nan")), ValueError, "noise must be a finite number"),
    (dict(global_mean=float("nan")), ValueError, "global_mean must be a finite number"),
    (dict(user_bias_std=-0.1), ValueError, "user_bias_std >= 0"),
    (dict(num_users=50.9), TypeError, "num_users must be a whole number, got 50.9"),
    (dict(dim="8"), TypeError, "dim must be an int, got str '8'"),
    (dict(min_user_interactions=2.5), TypeError, "min_user_interactions must be a whole"),
])
def test_synthetic_names_a_bad_parameter(kwargs, error, message):
    """NaN timestamps became INT64_MIN, a negative activity span put timestamps before
    time_range, NaN zipf or signal planted NaN weights and factors, NaN noise was blamed on
    the ratings, and 50.9 users were 50: all without a word about the parameter."""
    args = dict(num_users=50, num_items=40, num_interactions=400, seed=0) | kwargs
    with pytest.raises(error, match=message):
        synthetic(**args)


def test_synthetic_takes_whole_floats_and_numpy_ints():
    a = synthetic(np.int64(50), 40.0, 400, dim=np.int32(4), seed=1)
    b = synthetic(50, 40, 400, dim=4, seed=1)
    assert a.num_users == 50 and np.array_equal(a.items, b.items)
    assert np.array_equal(a.ratings, b.ratings) and np.array_equal(a.timestamps, b.timestamps)


# ============================================================================ exact files,
# missing folders, downloads


def test_load_movielens_reads_the_file_named(tmp_path):
    # A folder holding both u.data and ratings.csv: the file named is the one read.
    folder = write_100k(tmp_path / "ml")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n9,9,1.0,1\n")
    data = load_movielens(folder / "u.data")
    assert len(data) == 3 and data.ratings.tolist() == [4.0, 3.0, 5.0]
    assert data.item_titles == {0: "Amélie (2001)", 1: "Heat (1995)"}
    assert len(load_movielens(folder / "ratings.csv")) == 1
    (folder / "other.csv").write_text("userId,movieId\n1,2\n")
    with pytest.raises(ValueError, match="not a MovieLens ratings file.*from_csv"):
        load_movielens(folder / "other.csv")


def test_load_movielens_missing_folder_says_where_it_looked(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_movielens("ml-latest-small")
    message = str(err.value)
    assert str(tmp_path / "ml-latest-small") in message
    assert str(home / ".cache" / "fastmf" / "ml-latest-small") in message
    assert "fetch_movielens('ml-latest-small')" in message
    # Once in the cache, the bare name finds it.
    (home / ".cache" / "fastmf").mkdir(parents=True)
    write_csv(home / ".cache" / "fastmf" / "ml-latest-small")
    assert len(load_movielens("ml-latest-small")) == 3


def ml_small_zip(rng, top="ml-latest-small", extra=()):
    """A zip laid out like ml-latest-small.zip with a few random rows; (bytes, rows)."""
    users = rng.integers(1, 30, 12)
    items = rng.integers(1, 50, 12)
    stars = rng.integers(1, 11, 12) / 2
    rows = [(int(u), int(i), float(r), 964982700 + k) for k, (u, i, r) in
            enumerate(zip(users, items, stars, strict=True))]
    ratings = "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r},{t}\n" for u, i, r, t in rows)
    movies = "movieId,title,genres\n" + "".join(
        f"{i},Movie {i} (1999),Drama\n" for i in sorted(set(items.tolist())))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{top}/ratings.csv", ratings)
        z.writestr(f"{top}/movies.csv", movies)
        for name, text in extra:
            z.writestr(name, text)
    return buf.getvalue(), rows


@pytest.fixture
def http_server(monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes); counts requests."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base, files, hits
    server.shutdown()
    server.server_close()


def test_fetch_movielens_downloads_verifies_and_caches(tmp_path, http_server):
    base, files, hits = http_server
    body, rows = ml_small_zip(np.random.default_rng(7))
    files["/ml-latest-small.zip"] = body
    cache = tmp_path / "cache"
    folder = fetch_movielens("ml-latest-small", cache, url=f"{base}/ml-latest-small.zip",
                             sha256=hashlib.sha256(body).hexdigest())
    assert folder == cache / "ml-latest-small"
    assert sorted(p.name for p in cache.iterdir()) == ["ml-latest-small"]  # no temporaries
    data = load_movielens(folder)
    assert len(data) == len(rows)
    assert sorted(data.ratings.tolist()) == sorted(r for _, _, r, _ in rows)
    assert data.item_titles[0].startswith("Movie ")
    # A second call finds the folder and downloads nothing.
    assert fetch_movielens("ml-latest-small", cache, url=f"{base}/ml-latest-small.zip",
                           sha256=hashlib.sha256(body).hexdigest()) == folder
    assert hits == ["/ml-latest-small.zip"]


def test_fetch_movielens_refuses_a_wrong_checksum(tmp_path, http_server):
    base, files, _ = http_server
    body, _ = ml_small_zip(np.random.default_rng(8))
    files["/x.zip"] = body
    wrong = hashlib.sha256(body + b"!").hexdigest()
    with pytest.raises(ValueError, match=f"SHA-256 {hashlib.sha256(body).hexdigest()}, "
                                         f"expected {wrong}"):
        fetch_movielens("ml-latest-small", tmp_path, url=f"{base}/x.zip", sha256=wrong)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConnectionError, match="HTTP 404"):
        fetch_movielens("ml-latest-small", tmp_path, url=f"{base}/missing.zip", sha256=wrong)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_fetch_movielens_refuses_paths_outside_the_folder(tmp_path, http_server, member):
    base, files, _ = http_server
    body, _ = ml_small_zip(np.random.default_rng(9), extra=[(member, "x")])
    files["/z.zip"] = body
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="unsafe path"):
        fetch_movielens("ml-latest-small", cache, url=f"{base}/z.zip",
                        sha256=hashlib.sha256(body).hexdigest())
    assert list(cache.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_fetch_movielens_offline_fails_fast(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot download.*offline"):
        fetch_movielens("ml-100k", tmp_path, url=f"http://127.0.0.1:{port}/ml-100k.zip",
                        timeout=30)
    assert time.perf_counter() - start < 10
    assert list(tmp_path.iterdir()) == []


def test_fetch_movielens_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no known checksum for 'ml-25m'.*url= and sha256="):
        fetch_movielens("ml-25m", tmp_path)
    with pytest.raises(ValueError, match="release name"):
        fetch_movielens("../x", tmp_path, url="http://127.0.0.1:1/x.zip", sha256="0" * 64)
    with pytest.raises(ValueError, match="http"):
        fetch_movielens("ml-100k", tmp_path, url="file:///etc/passwd")
    with pytest.raises(ValueError, match="64 hex"):
        fetch_movielens("ml-100k", tmp_path, sha256="abc")
    # An existing folder that is not a release is reported, never replaced.
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a MovieLens folder"):
        fetch_movielens("ml-100k", tmp_path)
    assert (tmp_path / "ml-100k" / "mine.txt").read_text() == "keep"


def test_fetch_movielens_cache_dir_that_is_a_file(tmp_path):
    """--cache-dir naming a file gave a bare "[Errno 17] File exists"."""
    from fastmf.datasets import fetch_movielens

    cache = tmp_path / "ratings.csv"
    cache.write_text("userId,movieId\n")
    with pytest.raises(FileExistsError, match="is an existing file, not a folder"):
        fetch_movielens("ml-latest-small", cache, url="http://127.0.0.1:9/never.zip")
    assert cache.read_text() == "userId,movieId\n"
