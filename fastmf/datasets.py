"""Datasets: MovieLens readers and a seeded synthetic generator with planted structure.

No data is bundled: :func:`load_movielens` reads a MovieLens folder (downloaded from
https://grouplens.org/datasets/movielens/, or by :func:`fetch_movielens` into a cache),
and :func:`synthetic` generates data of any size (thousands to 100M interactions) in
memory.

>>> folder = fetch_movielens("ml-latest-small")  # doctest: +SKIP
>>> data = load_movielens("ml-latest-small")  # a folder here, else the cache  # doctest: +SKIP
>>> data, truth = synthetic(10_000, 2_000, 500_000, dim=16, seed=0, return_truth=True)
"""

from __future__ import annotations

import hashlib
import http.client
import io
import math
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from numba import njit, prange

from fastmf.data.interactions import Interactions
from fastmf.data.sampling import (
    alias_draw,
    build_alias,
    next_below,
    next_float,
    resolve_seed,
    stream_state,
)

__all__ = ["fetch_movielens", "load_movielens", "synthetic", "SyntheticTruth"]

# ============================================================================ MovieLens

# (ratings file, format name), in detection order.
_MOVIELENS_FORMATS = (
    ("ratings.csv", "csv"),  # ml-20m, ml-25m, ml-32m, ml-latest, ml-latest-small
    ("ratings.dat", "dat"),  # ml-1m, ml-10m
    ("u.data", "100k"),  # ml-100k
)
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
# SHA-256 of the zips at MOVIELENS_URL (ml-latest-small: the release of 2018-09-26).
MOVIELENS_SHA256 = {
    "ml-latest-small": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
}


def default_cache_dir() -> Path:
    """Where :func:`fetch_movielens` puts data by default: ``~/.cache/fastmf``."""
    return Path.home() / ".cache" / "fastmf"


def _missing_folder(path: Path, looked: list[Path]) -> FileNotFoundError:
    name = path.name or str(path)
    places = " and ".join(str(p) for p in looked)
    known = ", ".join(MOVIELENS_SHA256)
    return FileNotFoundError(
        f"fastmf.load_movielens: no such folder: {path} (looked in {places}); download it "
        f"with fastmf.datasets.fetch_movielens({name!r}) (known: {known}; others with url= "
        "and sha256=), or from https://grouplens.org/datasets/movielens/ and pass the "
        "unzipped folder"
    )


def _find_movielens(path: Path) -> tuple[Path, str, Path]:
    """(folder, format, ratings file) for a MovieLens folder, a folder holding exactly one
    MovieLens folder (e.g. the directory a zip was extracted into), or a ratings file, which
    is read as named even when the folder holds another one. A bare name that is no folder
    here is looked for in :func:`default_cache_dir`."""
    if path.is_file():
        for name, fmt in _MOVIELENS_FORMATS:
            if path.name == name:
                return path.parent, fmt, path
        formats = ", ".join(name for name, _ in _MOVIELENS_FORMATS)
        raise ValueError(
            f"fastmf.load_movielens: {path} is not a MovieLens ratings file ({formats}); "
            "read other files with Interactions.from_csv"
        )
    if not path.exists():
        looked = [path.absolute()]
        if len(path.parts) == 1 and path.name not in (".", ".."):
            cached = default_cache_dir() / path.name
            looked.append(cached)
            if cached.is_dir():
                return _find_movielens(cached)
        raise _missing_folder(path, looked)
    if not path.is_dir():
        raise FileNotFoundError(f"fastmf.load_movielens: no such folder: {path}")
    for name, fmt in _MOVIELENS_FORMATS:
        if (path / name).is_file():
            return path, fmt, path / name
    found = [
        (sub, fmt, sub / name)
        for sub in sorted(p for p in path.iterdir() if p.is_dir())
        for name, fmt in _MOVIELENS_FORMATS
        if (sub / name).is_file()
    ]
    if len(found) == 1:
        return found[0]
    looked_for = ", ".join(name for name, _ in _MOVIELENS_FORMATS)
    contents = sorted(p.name for p in path.iterdir())[:20]
    extra = (
        f"; several MovieLens folders inside: {[str(f[0].name) for f in found]}, pass one"
        if found else ""
    )
    raise ValueError(
        f"fastmf.load_movielens: {path} is not a MovieLens folder: looked for {looked_for} "
        f"(ml-25m/ml-latest, ml-1m/ml-10m, ml-100k); found {contents}{extra}"
    )


def _read_text(path: Path) -> str:
    """ml-1m ships latin-1, later releases UTF-8: try UTF-8 first."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_double_colon(path: Path, names: list[str], dtypes: dict) -> pd.DataFrame:
    # pandas only parses multi-character separators with the slow Python engine; the
    # ratings files hold nothing but numbers, so rewrite "::" to a tab and use the C parser.
    data = path.read_bytes().replace(b"::", b"\t")
    return pd.read_csv(io.BytesIO(data), sep="\t", header=None, names=names, dtype=dtypes)


def _movielens_items(folder: Path, fmt: str) -> pd.DataFrame | None:
    if fmt == "csv":
        movies = folder / "movies.csv"
        return pd.read_csv(movies) if movies.is_file() else None
    if fmt == "dat":
        movies = folder / "movies.dat"
        if not movies.is_file():
            return None
        # id::title::genres; split from both ends so a "::" inside a title survives.
        rows = []
        for line in _read_text(movies).splitlines():
            if line:
                movie_id, rest = line.split("::", 1)
                rows.append([movie_id, *rest.rsplit("::", 1)])
        df = pd.DataFrame(rows, columns=["movieId", "title", "genres"])
        df["movieId"] = df["movieId"].astype(np.int64)
        return df
    items = folder / "u.item"
    if not items.is_file():
        return None
    genre_file = folder / "u.genre"
    genres = list(_ML100K_GENRES)
    if genre_file.is_file():
        pairs = [
            line.rsplit("|", 1) for line in _read_text(genre_file).splitlines() if "|" in line
        ]
        genres = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    cols = ["movieId", "title", "release_date", "video_release_date", "imdb_url", *genres]
    df = pd.read_csv(items, sep="|", header=None, names=cols, encoding="latin-1")
    flags = df[genres].to_numpy(dtype=bool)
    names = np.asarray(genres, dtype=object)
    df["genres"] = ["|".join(names[row]) for row in flags]
    return df[["movieId", "title", "genres", "release_date", "imdb_url"]]


def load_movielens(path: str | os.PathLike) -> Interactions:
    """Read a downloaded MovieLens folder into :class:`~fastmf.data.Interactions`.

    Detects the release from its files:

    - ``ratings.csv`` (+ ``movies.csv``): ml-20m, ml-25m, ml-32m, ml-latest(-small)
    - ``ratings.dat`` with ``::`` (+ ``movies.dat``, latin-1 or UTF-8): ml-1m, ml-10m
    - ``u.data``, tab-separated (+ ``u.item``, latin-1): ml-100k

    ``path`` may also be a ratings file (``ratings.csv``, ``ratings.dat``, ``u.data``),
    read as named (the movies file beside it gives the titles), or a folder holding exactly
    one MovieLens folder. A bare name such as ``"ml-latest-small"`` that is not a folder
    here is looked for in the :func:`fetch_movielens` cache (``~/.cache/fastmf``). Users and
    items are indexed in sorted raw-id order; ratings are float32 stars, timestamps int64
    Unix seconds; ``item_titles`` and ``item_metadata`` (title, genres) come from the
    movies file when present.

    Raises FileNotFoundError for a missing folder (saying where it looked and how to
    download it), ValueError when no ratings file is found.

    >>> data = load_movielens("ml-latest-small")  # doctest: +SKIP
    >>> len(data), data.num_users, data.item_titles[0]  # doctest: +SKIP
    (100836, 610, 'Toy Story (1995)')
    """
    folder, fmt, ratings_file = _find_movielens(Path(path))
    names = ["userId", "movieId", "rating", "timestamp"]

    # Every format read with these dtypes: integer ids and times (an id 1.5 is a damaged
    # file; read as floats it made every id a float, 1 the raw id 1.0).
    dtypes = {"userId": np.int64, "movieId": np.int64, "rating": np.float32,
              "timestamp": np.int64}

    def read_ratings() -> Interactions:
        if fmt == "csv":
            df = pd.read_csv(ratings_file, dtype=dtypes)
        else:
            try:
                df = (_read_double_colon(ratings_file, names, dtypes) if fmt == "dat" else
                      pd.read_csv(ratings_file, sep="\t", header=None, names=names,
                                  dtype=dtypes))
            except ValueError as exc:  # pandas names a headerless file's column by number
                message = str(exc)
                for n, name in enumerate(names):
                    message = message.replace(f"column {n}", f"column {n} ({name})")
                raise ValueError(message) from None
        return Interactions.from_pandas(df, "userId", "movieId", "rating", "timestamp")

    data = _naming_the_file(ratings_file, read_ratings)
    items = _naming_the_file(folder, lambda: _movielens_items(folder, fmt))
    if items is not None:
        data = data.with_item_metadata(items, item_col="movieId", title_col="title")
    return data


def _naming_the_file(path: Path, read):
    """``read()``, with a file that does not parse (a non-numeric id, a missing column, a
    bad genre index) reported as a ValueError that names ``path``: pandas' and int()'s own
    messages name neither the file nor the reader."""
    try:
        return read()
    except (ValueError, TypeError, IndexError, KeyError, pd.errors.ParserError) as exc:
        detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"fastmf.load_movielens: cannot read the MovieLens files at {path}: "
                         f"{detail}") from exc


_RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def fetch_movielens(
    name: str = "ml-latest-small",
    cache_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download a MovieLens release once and return its folder (``cache_dir/name``).

    - ``name``: the release, the zip's name without ``.zip``; ``ml-latest-small`` and
      ``ml-100k`` have known checksums (``MOVIELENS_SHA256``), any other needs ``url`` and
      ``sha256``.
    - ``cache_dir``: default ``~/.cache/fastmf``. When ``cache_dir/name`` already is a
      MovieLens folder nothing is downloaded.
    - ``url``: default ``https://files.grouplens.org/datasets/movielens/<name>.zip``;
      http(s) only. ``timeout``: seconds per network operation.

    The zip is downloaded next to the cache (proxies from the environment apply), its
    SHA-256 checked before anything is extracted, its members checked (no absolute paths,
    ``..`` or links), extracted into a temporary folder and moved into place with one
    rename, so an interrupted call leaves no half-extracted release.
    :func:`load_movielens` finds the result by ``name`` alone.

    Raises ConnectionError when the server cannot be reached (offline), ValueError for a
    checksum mismatch or an unsafe or unexpected zip.

    >>> folder = fetch_movielens("ml-latest-small")  # doctest: +SKIP
    >>> data = load_movielens(folder)  # doctest: +SKIP
    """
    where = "fastmf.fetch_movielens"
    if not isinstance(name, str) or not _RELEASE_NAME.fullmatch(name):
        raise ValueError(f"{where}: name must be a release name like 'ml-latest-small', "
                         f"got {name!r}")
    known = MOVIELENS_SHA256.get(name)
    if known is None and (url is None or sha256 is None):
        raise ValueError(
            f"{where}: no known checksum for {name!r} (known: {', '.join(MOVIELENS_SHA256)}); "
            "pass url= and sha256= for another release"
        )
    url = MOVIELENS_URL.format(name=name) if url is None else str(url)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{where}: url must be http:// or https://, got {url!r}")
    expected = (sha256 or known).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"{where}: sha256 must be 64 hex digits, got {sha256!r}")
    if not float(timeout) > 0:
        raise ValueError(f"{where}: timeout must be > 0, got {timeout}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / name
    if target.is_dir():
        return _find_movielens(target)[0]  # ValueError if it is something else: kept
    if target.exists():
        raise FileExistsError(f"{where}: {target} exists and is not a folder")
    if cache.exists() and not cache.is_dir():
        raise FileExistsError(f"{where}: the cache folder {cache} is an existing file, not a "
                              "folder; pass a folder as cache_dir (--cache-dir)")
    cache.mkdir(parents=True, exist_ok=True)

    fd, zip_name = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".zip.part")
    tmp_dir = None
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                url, timeout=timeout
            ) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"{where}: {url} answered HTTP {exc.code} {exc.reason}") \
                from None
        except (urllib.error.URLError, ConnectionError, TimeoutError,
                http.client.HTTPException) as exc:
            # Network failures only: a full disk is not "offline".
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(
                f"{where}: cannot download {url} ({reason}); offline? Download the zip "
                f"elsewhere, unzip it and pass the folder to load_movielens"
            ) from None
        got = digest.hexdigest()
        if got != expected:
            raise ValueError(
                f"{where}: {url} has SHA-256 {got}, expected {expected}; the download was "
                "discarded (a changed release or a bad transfer)"
            )
        tmp_dir = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}.tmp-"))
        _safe_extract(zip_name, tmp_dir, where)
        folder = _find_movielens(tmp_dir)[0]
        try:
            os.replace(folder, target)
        except OSError:
            if not target.is_dir():  # not a concurrent fetch of the same release
                raise
        return _find_movielens(target)[0]
    finally:
        os.unlink(zip_name)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _safe_extract(zip_path: str, dest: Path, where: str) -> None:
    """Extract every member under ``dest``, refusing absolute paths, ``..`` and links (a
    zip may name any path; extracting it blindly writes outside ``dest``)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{where}: the download is not a zip file ({exc})") from None
    with archive:
        for info in archive.infolist():
            member = info.filename.replace("\\", "/")
            parts = PurePosixPath(member).parts
            if (member.startswith("/") or re.match(r"[A-Za-z]:", member) or ".." in parts):
                raise ValueError(f"{where}: the zip holds an unsafe path {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ValueError(f"{where}: the zip holds a link {info.filename!r}")
        archive.extractall(dest)


# ============================================================================ synthetic


@dataclass(frozen=True)
class SyntheticTruth:
    """The planted model behind :func:`synthetic` (all in index space).

    - ``user_factors``: (num_users, dim) float32; ``item_factors``: (num_items, dim) float32
    - ``user_bias``: (num_users,) float32; ``item_bias``: (num_items,) float32
    - ``global_mean``: float
    - ``item_weights``: (num_items,) float64 Zipf popularity, summing to 1
    - ``user_counts``: (num_users,) int64 interactions per user
    - ``signal``, ``noise``, ``selection_strength``: the generator's parameters
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float
    item_weights: np.ndarray
    user_counts: np.ndarray
    signal: float
    noise: float
    selection_strength: float

    def preference(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B,) planted affinity ``<P[u], Q[i]>`` (std ``signal`` over random pairs)."""
        users, items = np.asarray(users), np.asarray(items)
        return np.einsum(
            "bk,bk->b", self.user_factors[users].astype(np.float64),
            self.item_factors[items].astype(np.float64),
        )

    def expected_rating(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B,) noise-free rating ``mu + b_u + b_i + <P[u], Q[i]>`` (before rounding)."""
        users, items = np.asarray(users), np.asarray(items)
        return (
            self.global_mean + self.user_bias[users].astype(np.float64)
            + self.item_bias[items] + self.preference(users, items)
        )


def _user_counts(
    rng: np.random.Generator,
    num_users: int,
    total: int,
    minimum: int,
    cap: int,
    exponent: float,
) -> np.ndarray:
    """Power-law activity: counts in [minimum, cap] summing exactly to ``total``, the part
    above ``minimum`` proportional to Pareto(exponent) weights (water-filled at the cap)."""
    weights = rng.pareto(exponent, size=num_users) + 1.0
    extra = total - num_users * minimum
    room = cap - minimum
    counts = np.full(num_users, minimum, dtype=np.int64)
    if extra == 0:
        return counts
    # Find lam with sum(min(room, lam * w)) == extra by bisection (monotone in lam).
    lo, hi = 0.0, extra / weights.min() + 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if np.minimum(room, mid * weights).sum() <= extra:
            lo = mid
        else:
            hi = mid
    share = np.minimum(room, lo * weights)
    base = np.floor(share).astype(np.int64)
    remainder = int(extra - base.sum())
    frac = share - base
    frac[base >= room] = -1.0
    # Largest fractional parts first; ties by user index (stable) for determinism.
    order = np.argsort(-frac, kind="stable")
    while remainder > 0:
        eligible = order[base[order] < room][:remainder]
        base[eligible] += 1
        remainder -= len(eligible)
    return counts + base


@njit(inline="always")
def _dot(P, Q, u, i):
    acc = 0.0
    for d in range(P.shape[1]):
        acc += np.float64(P[u, d]) * np.float64(Q[i, d])
    return acc


@njit(inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(inline="always")
def _gaussian(state):
    state, a = next_float(state)
    state, b = next_float(state)
    return state, math.sqrt(-2.0 * math.log(1.0 - a)) * math.cos(2.0 * math.pi * b)


@njit(inline="always")
def _log_sigmoid(x):
    if x >= 0.0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


@njit(cache=True)
def _choose_dense(P, Q, u, c, log_weights, strength, inv_signal, state, out, off):
    """Successive sampling without replacement over all items (Gumbel top-c)."""
    n = Q.shape[0]
    keys = np.empty(n, dtype=np.float64)
    for i in range(n):
        state, f = next_float(state)
        key = log_weights[i] - math.log(-math.log1p(-f) + 1e-300)
        if strength != 0.0:
            key += _log_sigmoid(strength * _dot(P, Q, u, i) * inv_signal)
        keys[i] = -key
    top = np.argsort(keys)[:c]
    for t in range(c):
        out[off + t] = top[t]
    return state


@njit(cache=True)
def _choose_sparse(P, Q, u, c, prob, alias, strength, inv_signal, state, out, off):
    """Same distribution as _choose_dense, by rejection: popularity draws accepted with
    probability sigmoid(strength * z) and deduplicated with an open-addressing set.
    Returns (state, ok); ok is False after too many draws (caller falls back to dense)."""
    size = 16
    while size < 4 * c:
        size *= 2
    mask = size - 1
    table = np.full(size, -1, dtype=np.int64)
    filled = 0
    budget = 20 * c + 1000
    while filled < c:
        budget -= 1
        if budget < 0:
            return state, False
        state, f = next_float(state)
        i = alias_draw(prob, alias, f)
        if strength != 0.0:
            state, a = next_float(state)
            if a >= _sigmoid(strength * _dot(P, Q, u, i) * inv_signal):
                continue
        h = ((i * 0x9E3779B1) >> 12) & mask
        while table[h] != -1 and table[h] != i:
            h = (h + 1) & mask
        if table[h] == i:
            continue
        table[h] = i
        out[off + filled] = i
        filled += 1
    return state, True


@njit(parallel=True, cache=True)
def _synthetic_kernel(
    P, Q, user_bias, item_bias, global_mean, prob, alias, log_weights, counts, offsets,
    strength, inv_signal, noise, explicit, lo, hi, step, t0, t1, mean_span, seed,
    items_out, ratings_out, times_out,
):
    num_items = Q.shape[0]
    for u in prange(counts.shape[0]):
        c = counts[u]
        off = offsets[u]
        state = stream_state(seed, u)
        ok = False
        if 8 * c <= num_items:
            state, ok = _choose_sparse(P, Q, u, c, prob, alias, strength, inv_signal, state,
                                       items_out, off)
        if not ok:
            state = _choose_dense(P, Q, u, c, log_weights, strength, inv_signal, state,
                                  items_out, off)
        # Shuffle so that time order is independent of the order of selection.
        for j in range(c - 1, 0, -1):
            state, s = next_below(state, j + 1)
            tmp = items_out[off + j]
            items_out[off + j] = items_out[off + s]
            items_out[off + s] = tmp
        # Active period: uniform start, exponential length (clipped at t1); times are the
        # order statistics of uniforms, built from normalised exponential spacings.
        state, f = next_float(state)
        start = t0 + f * (t1 - t0)
        state, f = next_float(state)
        span = min(-math.log1p(-f) * mean_span, t1 - start)
        saved = state
        total = 0.0
        for _ in range(c + 1):
            state, f = next_float(state)
            total += -math.log1p(-f)
        state = saved
        acc = 0.0
        for j in range(c):
            state, f = next_float(state)
            acc += -math.log1p(-f)
            times_out[off + j] = np.int64(start + span * (acc / total))
        state, f = next_float(state)  # the (c+1)-th spacing, consumed to keep streams aligned
        if explicit:
            for j in range(c):
                i = items_out[off + j]
                state, g = _gaussian(state)
                r = (global_mean + user_bias[u] + item_bias[i] + _dot(P, Q, u, i)
                     + noise * g)
                r = lo + np.floor((r - lo) / step + 0.5) * step
                ratings_out[off + j] = min(max(r, lo), hi)


def _whole(name: str, value) -> int:
    """``value`` as an int: an int or numpy integer, or a float with no fractional part
    (TypeError otherwise: 2.5 users were silently 2)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float | np.floating):
        raise TypeError(f"fastmf.synthetic: {name} must be an int, got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        raise TypeError(f"fastmf.synthetic: {name} must be a whole number, got {value!r}")
    return int(value)


def _finite(value) -> bool:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool) and math.isfinite(value))


def synthetic(
    num_users: int = 1_000,
    num_items: int = 500,
    num_interactions: int = 50_000,
    dim: int = 8,
    *,
    implicit: bool = False,
    seed: int = 0,
    noise: float = 0.5,
    zipf: float = 1.0,
    activity_exponent: float = 1.2,
    min_user_interactions: int | None = None,
    max_user_fraction: float = 0.5,
    signal: float = 0.8,
    user_bias_std: float = 0.35,
    item_bias_std: float = 0.45,
    global_mean: float = 3.5,
    rating_scale: tuple[float, float] = (1.0, 5.0),
    rating_step: float = 0.5,
    selection_strength: float | None = None,
    time_range: tuple[int, int] = (946_684_800, 1_577_836_800),
    mean_active_days: float = 365.0,
    return_truth: bool = False,
) -> Interactions | tuple[Interactions, SyntheticTruth]:
    """Seeded synthetic interactions with planted low-rank structure.

    The model (all seeded by ``seed``):

    - factors ``P`` (num_users, dim), ``Q`` (num_items, dim) with i.i.d. normal entries
      scaled so that ``<P[u], Q[i]>`` has std ``signal``; biases ``b_u ~ N(0,
      user_bias_std²)``, ``b_i ~ N(0, item_bias_std²)``;
    - item popularity: Zipf, weight of the item at popularity rank ``r`` ∝ ``r**-zipf``
      (ranks shuffled over item indices);
    - user activity: power law, counts ∝ Pareto(``activity_exponent``) weights, between
      ``min_user_interactions`` (default ``min(5, num_interactions // num_users)``) and
      ``max_user_fraction * num_items``, summing exactly to ``num_interactions``;
    - each user's items: distinct (no duplicate pairs), drawn without replacement with
      probability ∝ ``popularity[i] * sigmoid(selection_strength * <P[u],Q[i]> / signal)``;
      ``selection_strength`` defaults to 2.0 for implicit data (users pick what they like)
      and 0.0 for ratings (missing at random);
    - ratings (unless ``implicit``): ``global_mean + b_u + b_i + <P[u],Q[i]> +
      noise * N(0, 1)``, rounded to multiples of ``rating_step`` from ``rating_scale[0]``
      and clipped to ``rating_scale``; implicit data has ``ratings=None``;
    - timestamps (int64 Unix seconds in ``time_range``): each user is active over an
      exponential span (mean ``mean_active_days``) from a uniform start; items come in
      random order within it, so temporal and leave-one-out splits work.

    Users and items are indexed ``0..n-1`` (identity id maps; items never drawn still
    count in ``num_items``). Rows are grouped by user. Memory is the output itself
    (about 28 bytes per interaction with ratings) plus per-thread scratch; the result
    does not depend on the number of threads.

    Returns ``Interactions``, or ``(Interactions, SyntheticTruth)`` with
    ``return_truth=True``.

    >>> data, truth = synthetic(200, 100, 5_000, dim=4, seed=1, return_truth=True)
    >>> len(data), data.num_users, data.num_items, truth.user_factors.shape
    (5000, 200, 100, (200, 4))
    """
    num_users, num_items, total, dim = (
        _whole("num_users", num_users), _whole("num_items", num_items),
        _whole("num_interactions", num_interactions), _whole("dim", dim))
    if min_user_interactions is not None:
        min_user_interactions = _whole("min_user_interactions", min_user_interactions)
    for name, value in (("noise", noise), ("zipf", zipf),
                        ("activity_exponent", activity_exponent),
                        ("max_user_fraction", max_user_fraction), ("signal", signal),
                        ("user_bias_std", user_bias_std), ("item_bias_std", item_bias_std),
                        ("global_mean", global_mean), ("rating_step", rating_step),
                        ("selection_strength", selection_strength),
                        ("mean_active_days", mean_active_days),
                        *(("rating_scale", v) for v in rating_scale)):
        if value is not None and not _finite(value):
            raise ValueError(f"fastmf.synthetic: {name} must be a finite number, got {value!r}")
    if user_bias_std < 0 or item_bias_std < 0 or mean_active_days <= 0:
        raise ValueError("fastmf.synthetic: need user_bias_std >= 0, item_bias_std >= 0 and "
                         f"mean_active_days > 0, got {user_bias_std}, {item_bias_std}, "
                         f"{mean_active_days}")
    if num_users < 1 or num_items < 1 or dim < 1:
        raise ValueError(
            "fastmf.synthetic: num_users, num_items and dim must be >= 1, got "
            f"{num_users}, {num_items}, {dim}"
        )
    if min_user_interactions is None:
        min_user_interactions = max(1, min(5, total // num_users))
    minimum = int(min_user_interactions)
    if not 0.0 < max_user_fraction <= 1.0:
        raise ValueError("fastmf.synthetic: max_user_fraction must be in (0, 1]")
    cap = max(minimum, int(max_user_fraction * num_items))
    if minimum > num_items:
        raise ValueError(
            f"fastmf.synthetic: min_user_interactions={minimum} exceeds num_items={num_items}"
        )
    if not num_users * minimum <= total <= num_users * cap:
        raise ValueError(
            f"fastmf.synthetic: num_interactions={total} must lie in "
            f"[num_users * {minimum}, num_users * {cap}] = [{num_users * minimum}, "
            f"{num_users * cap}] ({minimum} to {cap} distinct items per user; see "
            "min_user_interactions and max_user_fraction)"
        )
    lo, hi = (float(v) for v in rating_scale)
    if not (lo < hi and rating_step > 0):
        raise ValueError("fastmf.synthetic: need rating_scale[0] < rating_scale[1], step > 0")
    if noise < 0 or signal <= 0 or zipf < 0 or activity_exponent <= 0:
        raise ValueError(
            "fastmf.synthetic: need noise >= 0, signal > 0, zipf >= 0, activity_exponent > 0"
        )
    if selection_strength is None:
        selection_strength = 2.0 if implicit else 0.0
    t0, t1 = (int(v) for v in time_range)
    if t1 <= t0:
        raise ValueError("fastmf.synthetic: time_range must be (start, end) with start < end")

    rng = np.random.default_rng(seed)
    scale = (signal**2 / dim) ** 0.25
    P = (rng.standard_normal((num_users, dim), dtype=np.float32) * scale).astype(np.float32)
    Q = (rng.standard_normal((num_items, dim), dtype=np.float32) * scale).astype(np.float32)
    user_bias = (rng.standard_normal(num_users) * user_bias_std).astype(np.float32)
    item_bias = (rng.standard_normal(num_items) * item_bias_std).astype(np.float32)
    weights = np.empty(num_items, dtype=np.float64)
    weights[rng.permutation(num_items)] = np.arange(1, num_items + 1, dtype=np.float64) ** -zipf
    weights /= weights.sum()
    counts = _user_counts(rng, num_users, total, minimum, cap, activity_exponent)
    kernel_seed = resolve_seed(int(rng.integers(0, 2**63)))

    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    prob, alias = build_alias(weights)
    items = np.empty(total, dtype=np.int64)
    ratings = np.empty(0 if implicit else total, dtype=np.float32)
    times = np.empty(total, dtype=np.int64)
    _synthetic_kernel(
        P, Q, user_bias, item_bias, float(global_mean), prob, alias, np.log(weights), counts,
        offsets, float(selection_strength), 1.0 / signal, float(noise), not implicit,
        lo, hi, float(rating_step), float(t0), float(t1), mean_active_days * 86_400.0,
        kernel_seed, items, ratings, times,
    )
    users = np.repeat(np.arange(num_users, dtype=np.int64), counts)
    data = Interactions(
        users, items, None if implicit else ratings, times,
        user_map=num_users, item_map=num_items,
    )
    if not return_truth:
        return data
    truth = SyntheticTruth(
        user_factors=P, item_factors=Q, user_bias=user_bias, item_bias=item_bias,
        global_mean=float(global_mean), item_weights=weights, user_counts=counts,
        signal=float(signal), noise=float(noise),
        selection_strength=float(selection_strength),
    )
    return data, truth
