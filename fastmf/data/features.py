"""``fastmf.data.Features``: side information for users or items as a sparse
(rows x features) weight matrix, in the row order of an :class:`~fastmf.data.IdMap` shared
with :class:`~fastmf.data.Interactions`, for :class:`fastmf.models.Hybrid` and the cold-start
helpers in :mod:`fastmf.models.coldstart`.

Feature names: a categorical column ``c`` with value ``v`` gives the feature ``"c=v"``
(weight 1); a multi-valued column (``"Comedy|Drama"``, split on ``sep``) gives one ``"c=v"``
per distinct value (weight 1 each); a numeric column ``c`` gives the feature ``"c"`` with the
value as its weight. Several table rows for one id (a tag table) add up.

Weights must be finite and >= 0. With ``normalize=True`` (LightFM's default) each row is
divided by its sum so the weights of a row sum to 1; an empty row stays empty.

Hashing (``hash_buckets=N``): a feature name ``s`` goes to the column

    h = sklearn.utils.murmurhash3_32(s, seed=0, positive=False)    # signed 32-bit MurmurHash3
    column = abs(h) % N      (h == -2**31: (2**31 - 1 - (N - 1)) % N)
    sign = -1 if h < 0 else +1   (only with signed=True)

of the UTF-8 bytes of ``s``: scikit-learn's ``FeatureHasher`` (same columns and, with
``signed=True``, the same signs as ``alternate_sign=True``), stable across processes and
platforms (Python's ``hash`` of a str is salted per process and is never used). Unknown
names at transform time simply hash. :meth:`Features.collisions` reports how many names
share a column. With ``signed=True`` normalisation divides by the sum of absolute values.

>>> import pandas as pd
>>> from fastmf.data import Features
>>> movies = pd.DataFrame({"movieId": [1, 2], "genres": ["Comedy|Drama", "Drama"]})
>>> f = Features.from_pandas(movies, "movieId", multi=["genres"])
>>> f.feature_names.tolist(), f.matrix.toarray().tolist()
(['genres=Comedy', 'genres=Drama'], [[0.5, 0.5], [0.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fastmf.data.interactions import IdMap

__all__ = ["Features", "feature_hash"]

_INT32_MIN = -(2**31)


def _murmurhash3_32():
    try:
        from sklearn.utils import murmurhash3_32
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("fastmf.data.Features: hash_buckets needs scikit-learn (its "
                          "murmurhash3_32 is the documented hash); pip install scikit-learn"
                          ) from err
    return murmurhash3_32


def feature_hash(names: Iterable[str], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns int64, signs int8) of feature ``names`` under the documented hash (see the
    module docstring): FeatureHasher's columns and alternate signs."""
    if isinstance(buckets, bool) or not isinstance(buckets, int | np.integer) or buckets < 1:
        raise ValueError(f"fastmf.data.feature_hash: buckets must be a positive int, got "
                         f"{buckets!r}")
    murmur = _murmurhash3_32()
    names = list(names)
    h = np.fromiter((murmur(str(s), seed=0, positive=False) for s in names), dtype=np.int64,
                    count=len(names))
    cols = np.abs(h) % buckets
    cols[h == _INT32_MIN] = (2**31 - 1 - (buckets - 1)) % buckets
    signs = np.where(h < 0, -1, 1).astype(np.int8)
    return cols.astype(np.int64), signs


def _check_weights(op: str, what: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{op}: {what} holds {int(bad.sum())} NaN/inf weight(s); feature "
                         "weights must be finite and >= 0")
    neg = values < 0
    if neg.any():
        raise ValueError(f"{op}: {what} holds {int(neg.sum())} negative weight(s) (first "
                         f"{float(values[neg][0])}); feature weights must be >= 0")


def _as_list(value, name: str, op: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence | np.ndarray | pd.Index):
        raise TypeError(f"{op}: {name} must be a column name or a list of them, got "
                        f"{type(value).__name__}")
    return [str(v) for v in value]


class Features:
    """A (num_rows, num_features) sparse weight matrix for users or items.

    Build it with :meth:`from_pandas`, :meth:`from_scipy` or :meth:`from_interactions`.
    Row ``r`` belongs to raw id ``id_map.raw_ids[r]``: pass the ``user_map``/``item_map``
    of your :class:`~fastmf.data.Interactions` so rows line up with the model's indices.

    Attributes: ``id_map`` (rows), ``feature_names`` ((F,) str array; with hashing the
    column names ``"#0" .. "#N-1"``), ``hash_buckets`` (None or N), ``signed``,
    ``normalize``, ``identity``; :attr:`matrix` is the weight matrix the models use: the
    F feature columns, then (``identity=True``) one identity column per row (``F + r`` for
    row ``r``, raw weight 1), rows normalised when ``normalize``.

    :meth:`transform` builds rows for new users/items (cold start) in the same feature
    space from a DataFrame with the same columns.
    """

    def __init__(self, raw: sp.csr_matrix, id_map: IdMap, feature_names: np.ndarray, *,
                 normalize: bool = True, identity: bool = False,
                 hash_buckets: int | None = None, signed: bool = False,
                 spec: dict | None = None, hashed_names: dict[str, int] | None = None):
        op = "fastmf.data.Features"
        # A copy of every array: without copy=True, scipy shares the caller's indices and
        # indptr (and data, when already float32), which the in-place calls below rewrite.
        raw = sp.csr_matrix(raw, dtype=np.float32, copy=True)
        raw.sum_duplicates()
        raw.sort_indices()
        if raw.shape[0] != len(id_map):
            raise ValueError(f"{op}: the matrix has {raw.shape[0]} rows but the id map "
                             f"{len(id_map)} ids; they must match")
        if raw.shape[1] != len(feature_names):
            raise ValueError(f"{op}: the matrix has {raw.shape[1]} columns but there are "
                             f"{len(feature_names)} feature names")
        if not signed:
            _check_weights(op, "the matrix", raw.data)
        elif not np.isfinite(raw.data).all():
            raise ValueError(f"{op}: the matrix holds NaN/inf weights")
        raw.eliminate_zeros()
        self.raw = raw
        self.id_map = id_map
        self.feature_names = np.asarray(feature_names, dtype=object)
        self.normalize = bool(normalize)
        self.identity = bool(identity)
        self.hash_buckets = hash_buckets
        self.signed = bool(signed)
        self._spec = spec
        self._hashed_names = hashed_names
        self._vocab: dict[str, int] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pandas(cls, df: pd.DataFrame, id_col: str, *, id_map: IdMap | None = None,
                    categorical=None, multi=None, numeric=None, sep: str = "|",
                    hash_buckets: int | None = None, signed: bool = False,
                    normalize: bool = True, identity: bool = False,
                    kind: str = "item") -> Features:
        """Features from a table with one or more rows per raw id in ``id_col``.

        - ``categorical``, ``multi``, ``numeric``: column names (see the module docstring);
          ``multi`` splits on ``sep``. Missing values (NaN, "") give no feature.
        - ``id_map``: the rows (pass ``train.item_map``); ids of ``df`` outside it are
          ignored, ids of the map absent from ``df`` get an empty row. None: the distinct
          ids of ``df`` in order of first appearance.
        - ``hash_buckets``: hash feature names into that many columns (``signed``: with
          FeatureHasher's alternate sign).
        """
        op = "fastmf.data.Features.from_pandas"
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"{op}: df must be a pandas DataFrame, got {type(df).__name__}")
        spec = {"categorical": _as_list(categorical, "categorical", op),
                "multi": _as_list(multi, "multi", op),
                "numeric": _as_list(numeric, "numeric", op), "sep": sep}
        columns = spec["categorical"] + spec["multi"] + spec["numeric"]
        if not columns:
            raise ValueError(f"{op}: name at least one column in categorical, multi or numeric")
        for col in [id_col, *columns]:
            if col not in df.columns:
                raise ValueError(f"{op}: column {col!r} not found; available columns: "
                                 f"{list(df.columns)}")
        if hash_buckets is not None:
            feature_hash([], hash_buckets)  # validates the count
        if id_map is None:
            id_map = IdMap(pd.unique(df[id_col].to_numpy()), kind=kind)
        rows = id_map.lookup(df[id_col].to_numpy())
        keep = rows >= 0
        names, r, w = cls._triples(op, df.loc[keep], rows[keep], spec)
        if hash_buckets is None:
            vocab, col = np.unique(np.asarray(names, dtype=object).astype(str),
                                   return_inverse=True)
            matrix = sp.csr_matrix((w, (r, col)), shape=(len(id_map), len(vocab)))
            return cls(matrix, id_map, vocab, normalize=normalize, identity=identity,
                       spec=spec)
        distinct = sorted(set(names))
        cols, signs = feature_hash(distinct, hash_buckets)
        lookup = dict(zip(distinct, range(len(distinct))))
        pos = np.fromiter((lookup[n] for n in names), dtype=np.int64, count=len(names))
        values = w * (signs[pos] if signed else 1)
        matrix = sp.csr_matrix((values, (r, cols[pos])), shape=(len(id_map), hash_buckets))
        bucket_names = np.array([f"#{b}" for b in range(hash_buckets)], dtype=object)
        return cls(matrix, id_map, bucket_names, normalize=normalize, identity=identity,
                   hash_buckets=int(hash_buckets), signed=signed, spec=spec,
                   hashed_names=dict(zip(distinct, cols.tolist())))

    @staticmethod
    def _triples(op: str, df: pd.DataFrame, rows: np.ndarray, spec: dict):
        """(feature names, row of each, weight of each) for the table's cells."""
        names: list[str] = []
        out_rows: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for col in spec["categorical"]:
            values = df[col].to_numpy(dtype=object)
            ok = np.array([not _missing(v) for v in values], dtype=bool)
            names += [f"{col}={v}" for v in values[ok]]
            out_rows.append(rows[ok])
            weights.append(np.ones(int(ok.sum()), dtype=np.float32))
        for col in spec["multi"]:
            for row, cell in zip(rows, df[col].to_numpy(dtype=object)):
                if _missing(cell):
                    continue
                parts = sorted({p.strip() for p in str(cell).split(spec["sep"])} - {""})
                names += [f"{col}={p}" for p in parts]
                out_rows.append(np.full(len(parts), row, dtype=np.int64))
                weights.append(np.ones(len(parts), dtype=np.float32))
        for col in spec["numeric"]:
            try:
                values = pd.to_numeric(df[col]).to_numpy(dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{op}: numeric column {col!r} holds non-numbers") from err
            # NaN is refused rather than read as "no feature": a missing number is the
            # caller's decision (0, the column mean, ...).
            _check_weights(op, f"numeric column {col!r}", values)
            ok = values != 0
            names += [col] * int(ok.sum())
            out_rows.append(rows[ok])
            weights.append(values[ok].astype(np.float32))
        if not names:
            return names, np.zeros(0, np.int64), np.zeros(0, np.float32)
        return names, np.concatenate(out_rows), np.concatenate(weights)

    @classmethod
    def from_scipy(cls, matrix, *, id_map: IdMap | None = None, feature_names=None,
                   normalize: bool = True, identity: bool = False,
                   kind: str = "item") -> Features:
        """Features from a (rows, features) scipy sparse matrix (or dense array) of weights;
        ``id_map`` None: identity map of the row count; ``feature_names`` None: "f0", ...
        """
        op = "fastmf.data.Features.from_scipy"
        if not (sp.issparse(matrix) or isinstance(matrix, np.ndarray)):
            raise TypeError(f"{op}: matrix must be a scipy sparse matrix or a numpy array, got "
                            f"{type(matrix).__name__}")
        matrix = sp.csr_matrix(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"{op}: matrix must be 2-D")
        _check_weights(op, "the matrix", np.asarray(matrix.data, dtype=np.float64))
        if id_map is None:
            id_map = IdMap.identity(matrix.shape[0], kind=kind)
        if feature_names is None:
            feature_names = [f"f{j}" for j in range(matrix.shape[1])]
        return cls(matrix, id_map, np.asarray(feature_names, dtype=object),
                   normalize=normalize, identity=identity)

    @classmethod
    def from_interactions(cls, data, *, multi=None, categorical=None, numeric=None,
                          sep: str = "|", **kwargs) -> Features:
        """Item features from ``data.item_metadata`` (:meth:`Interactions.with_item_metadata`)
        in ``data.item_map``'s order. Without column names: ``"genres"`` as a multi-valued
        column when present. Other keyword arguments as in :meth:`from_pandas`."""
        op = "fastmf.data.Features.from_interactions"
        meta = getattr(data, "item_metadata", None)
        if meta is None:
            raise ValueError(f"{op}: the interactions carry no item metadata; add it with "
                             "Interactions.with_item_metadata(movies) or use from_pandas")
        if multi is None and categorical is None and numeric is None:
            if "genres" not in meta.columns:
                raise ValueError(f"{op}: no 'genres' column in the item metadata; name the "
                                 f"columns to use (available: {list(meta.columns)})")
            multi = ["genres"]
        table = meta.reset_index()
        index_col = table.columns[0]
        return cls.from_pandas(table, index_col, id_map=IdMap.identity(data.num_items,
                                                                       kind="item"),
                               multi=multi, categorical=categorical, numeric=numeric,
                               sep=sep, **kwargs)._with_map(data.item_map)

    def _with_map(self, id_map: IdMap) -> Features:
        self.id_map = id_map
        return self

    # ------------------------------------------------------------------ views
    @property
    def num_rows(self) -> int:
        return self.raw.shape[0]

    @property
    def num_features(self) -> int:
        """Feature columns, identity columns not counted."""
        return self.raw.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of :attr:`matrix` (identity columns included)."""
        return self.num_rows, self.num_features + (self.num_rows if self.identity else 0)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        hashing = f", hash_buckets={self.hash_buckets}" if self.hash_buckets else ""
        return (f"Features({self.num_rows} {self.id_map.kind}s x {self.num_features} features"
                f", nnz={self.raw.nnz}{hashing}, normalize={self.normalize}, "
                f"identity={self.identity})")

    @property
    def matrix(self) -> sp.csr_matrix:
        """The float32 CSR weights the models use (see the class docstring)."""
        return self.weights(self.raw, identity_start=0 if self.identity else None)

    def weights(self, rows: sp.csr_matrix, identity_start: int | None,
                num_identity: int | None = None) -> sp.csr_matrix:
        """``rows`` ((n, F) raw weights) with identity columns ``F + identity_start + r``
        appended (None: none) among ``num_identity`` of them (default: this object's row
        count), then normalised per this object's setting."""
        rows = sp.csr_matrix(rows, dtype=np.float32, copy=True)  # sort_indices is in place
        n = rows.shape[0]
        if identity_start is not None:
            total = self.num_rows if num_identity is None else num_identity
            eye = sp.csr_matrix((np.ones(n, np.float32),
                                 (np.arange(n), identity_start + np.arange(n))),
                                shape=(n, total))
            rows = sp.hstack([rows, eye], format="csr")
        if self.normalize:
            sums = np.asarray(abs(rows).sum(axis=1)).ravel()
            scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
            rows = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ rows)
        rows.sort_indices()
        return rows

    def empty_rows(self) -> np.ndarray:
        """Indices of the rows with no feature (identity not counted)."""
        return np.flatnonzero(np.diff(self.raw.indptr) == 0)

    def with_identity(self, identity: bool = True) -> Features:
        """A copy with the identity columns on or off (the raw weights are shared)."""
        out = Features.__new__(Features)
        out.__dict__.update(self.__dict__)
        out.identity = bool(identity)
        return out

    # ------------------------------------------------------------------ hashing report
    def collisions(self) -> dict:
        """Hashing statistics over the feature names seen when building: ``names``
        (distinct names), ``buckets`` (N), ``used`` (buckets holding a name),
        ``colliding_names`` (names sharing their bucket with another name), ``collision_rate``
        (colliding_names / names), ``max_per_bucket``. Without hashing every count is
        collision-free (``colliding_names`` 0)."""
        if self.hash_buckets is None:
            n = self.num_features
            return dict(names=n, buckets=n, used=n, colliding_names=0, collision_rate=0.0,
                        max_per_bucket=1 if n else 0)
        cols = np.fromiter(self._hashed_names.values(), dtype=np.int64,
                           count=len(self._hashed_names))
        counts = np.bincount(cols, minlength=self.hash_buckets)
        colliding = int(counts[counts > 1].sum())
        return dict(names=len(cols), buckets=self.hash_buckets, used=int((counts > 0).sum()),
                    colliding_names=colliding,
                    collision_rate=colliding / len(cols) if len(cols) else 0.0,
                    max_per_bucket=int(counts.max()) if len(cols) else 0)

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self) -> dict:
        """What :meth:`transform` needs, as JSON values (no rows): ``feature_names`` (list
        of str; None with hashing, where the names are the buckets), ``hash_buckets``,
        ``signed``, ``normalize`` and ``spec`` (the table columns of :meth:`from_pandas`:
        ``categorical``, ``multi``, ``numeric``, ``sep``; None for :meth:`from_scipy`).
        :meth:`from_vocabulary` rebuilds a row-less Features from it (checkpoints keep it
        so a loaded model encodes new users/items by feature name)."""
        spec = None if self._spec is None else {
            "categorical": list(self._spec["categorical"]), "multi": list(self._spec["multi"]),
            "numeric": list(self._spec["numeric"]), "sep": self._spec["sep"]}
        return {"feature_names": (None if self.hash_buckets is not None
                                  else [str(n) for n in self.feature_names]),
                "hash_buckets": self.hash_buckets, "signed": self.signed,
                "normalize": self.normalize, "spec": spec}

    @classmethod
    def from_vocabulary(cls, vocabulary: dict, *, kind: str = "item",
                        op: str = "fastmf.data.Features.from_vocabulary") -> Features:
        """A Features with no rows from :meth:`vocabulary`'s dict, checked value by value
        (it may come from a file): its :meth:`transform` encodes new rows as the original's
        did. ValueError naming ``op`` and the bad entry otherwise."""
        keys = {"feature_names", "hash_buckets", "signed", "normalize", "spec"}
        if not isinstance(vocabulary, dict) or set(vocabulary) != keys:
            found = sorted(vocabulary) if isinstance(vocabulary, dict) else type(
                vocabulary).__name__
            raise ValueError(f"{op}: a feature vocabulary must be a dict with exactly the keys "
                             f"{sorted(keys)}, got {found}")
        buckets, names = vocabulary["hash_buckets"], vocabulary["feature_names"]
        for key in ("signed", "normalize"):
            if not isinstance(vocabulary[key], bool):
                raise ValueError(f"{op}: vocabulary[{key!r}] must be a bool, got "
                                 f"{vocabulary[key]!r}")
        if buckets is not None:
            if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
                raise ValueError(f"{op}: vocabulary['hash_buckets'] must be None or an int "
                                 f">= 1, got {buckets!r}")
            if names is not None:
                raise ValueError(f"{op}: vocabulary['feature_names'] must be None with "
                                 "hashing (the columns are the buckets)")
            names = [f"#{b}" for b in range(buckets)]
        elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{op}: vocabulary['feature_names'] must be a list of str")
        elif len(set(names)) != len(names):
            raise ValueError(f"{op}: vocabulary['feature_names'] holds duplicate names")
        spec = vocabulary["spec"]
        if spec is not None:
            if not isinstance(spec, dict) or set(spec) != {"categorical", "multi", "numeric",
                                                           "sep"}:
                raise ValueError(f"{op}: vocabulary['spec'] must be None or a dict with the "
                                 "keys categorical, multi, numeric, sep")
            for key in ("categorical", "multi", "numeric"):
                if not isinstance(spec[key], list) or not all(isinstance(c, str)
                                                               for c in spec[key]):
                    raise ValueError(f"{op}: vocabulary['spec'][{key!r}] must be a list of "
                                     "column names (str)")
            if not isinstance(spec["sep"], str) or not spec["sep"]:
                raise ValueError(f"{op}: vocabulary['spec']['sep'] must be a non-empty str")
            spec = {key: list(value) if isinstance(value, list) else value
                    for key, value in spec.items()}
        raw = sp.csr_matrix((0, len(names)), dtype=np.float32)
        return cls(raw, IdMap(np.zeros(0, dtype=np.int64), kind=kind),
                   np.asarray(names, dtype=object), normalize=vocabulary["normalize"],
                   hash_buckets=buckets, signed=vocabulary["signed"], spec=spec)

    # ------------------------------------------------------------------ new rows
    def transform(self, df: pd.DataFrame, id_col: str | None = None, *,
                  unknown: str = "error") -> sp.csr_matrix:
        """Raw (unnormalised, no identity) feature rows for new users/items, one per row of
        ``df`` (or per distinct id of ``id_col``, in order of first appearance, several rows
        of one id adding up), in this object's columns. ``df`` has the columns this object
        was built from (:meth:`from_pandas`). Feature names never seen when building:
        hashed like the others with hashing; otherwise ``unknown="error"`` raises KeyError
        naming them and ``unknown="ignore"`` drops them. Pass the result to
        ``model.add_items(n, features=...)`` or the cold-start functions."""
        op = "fastmf.data.Features.transform"
        if self._spec is None:
            raise ValueError(f"{op}: these features were not built from a table (from_scipy); "
                             "build the new rows as a scipy matrix with the same columns")
        if unknown not in ("error", "ignore"):
            raise ValueError(f"{op}: unknown must be 'error' or 'ignore', got {unknown!r}")
        columns = self._spec["categorical"] + self._spec["multi"] + self._spec["numeric"]
        for col in columns + ([id_col] if id_col is not None else []):
            if col not in df.columns:
                raise ValueError(f"{op}: column {col!r} not found; available columns: "
                                 f"{list(df.columns)}")
        if id_col is None:
            rows, n = np.arange(len(df), dtype=np.int64), len(df)
        else:
            codes, uniques = pd.factorize(df[id_col], sort=False)
            rows, n = codes.astype(np.int64), len(uniques)
        names, r, w = self._triples(op, df, rows, self._spec)
        if self.hash_buckets is not None:
            cols, signs = feature_hash(names, self.hash_buckets)
            values = w * (signs if self.signed else 1)
            return sp.csr_matrix((values, (r, cols)), shape=(n, self.hash_buckets),
                                 dtype=np.float32)
        if self._vocab is None:
            self._vocab = {name: j for j, name in enumerate(self.feature_names)}
        cols = np.fromiter((self._vocab.get(s, -1) for s in names), dtype=np.int64,
                           count=len(names))
        missing = cols < 0
        if missing.any() and unknown == "error":
            shown = sorted({names[j] for j in np.flatnonzero(missing)})
            raise KeyError(f"{op}: {len(shown)} feature name(s) not in the vocabulary: "
                           f"{shown[:5]} (pass unknown='ignore' to drop them, or build the "
                           "features with hash_buckets)")
        keep = ~missing
        return sp.csr_matrix((w[keep], (r[keep], cols[keep])),
                             shape=(n, self.num_features), dtype=np.float32)


def _missing(value: Any) -> bool:
    """None, NaN of any float type, pandas' NA and NaT, or a blank string: no feature.
    (Columns from ``convert_dtypes()``, parquet or a pyarrow-backed read hold ``pd.NA``,
    which had become a feature named ``"<NA>"`` shared by every row missing the value.)"""
    if isinstance(value, str):
        return value.strip() == ""
    if value is None:
        return True
    if isinstance(value, float):  # np.float64 too
        return value != value
    if isinstance(value, int | np.integer):
        return False
    missing = pd.isna(value)  # pd.NA, pd.NaT, np.float32 NaN; an array for list-likes
    return isinstance(missing, bool | np.bool_) and bool(missing)
