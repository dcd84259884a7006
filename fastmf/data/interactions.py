"""User–item interactions in one contiguous index space.

:class:`Interactions` holds parallel arrays, one entry per interaction (row):

- ``users``, ``items``: (N,) int64 contiguous indices in ``[0, num_users)`` / ``[0, num_items)``
- ``ratings``: (N,) float32 or ``None`` (implicit feedback)
- ``timestamps``: (N,) int64/float64/datetime64 or ``None``
- ``weights``: (N,) float32 >= 0 or ``None``: a per-interaction confidence (see
  :meth:`Interactions.with_confidence`): :class:`fastmf.models.ALS` takes them as its
  confidences, and :func:`fastmf.fit` weighs each row's loss terms by them for the models
  whose training step uses them (``uses_weights``; it refuses weighted data for the others)

plus the two :class:`IdMap` objects that translate raw ids (ints or strings, as they appear
in the source data) to indices and back. Subsets and splits share the same ``IdMap``
objects, so a train and a test set always live in the same index space.

Duplicated (user, item) pairs are kept as separate rows; :meth:`Interactions.to_csr` sums
them and :meth:`Interactions.drop_duplicates` removes them.

>>> import numpy as np
>>> data = Interactions.from_arrays(["ann", "bob", "ann"], [10, 20, 20], ratings=[4, 3, 5])
>>> data.num_users, data.num_items, len(data)
(2, 2, 3)
>>> data.user_index("bob"), data.raw_item_ids([1, 0]).tolist()
(1, [20, 10])
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from fastmf._arrays import array_to_tensor

__all__ = ["CsvLayout", "IdMap", "Interactions", "csv_layout"]

_UNKNOWN_POLICIES = ("error", "drop")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor, pandas object or sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (pd.Series, pd.Index)):
        return x.to_numpy()
    if isinstance(x, list | tuple):
        return _sequence_to_numpy(x)
    return np.asarray(x)


def _sequence_to_numpy(values: list | tuple) -> np.ndarray:
    """A plain sequence without numpy's type coercion, which would change raw ids silently:
    [1, "a"] would become the strings "1" and "a", ["a", nan] the string "nan", and ints
    beside a float float64 (merging 2**53 and 2**53 + 1). Sequences of one kind convert as
    numpy does; mixed ones stay an object array holding the values as given."""
    kinds = set()
    for v in values:
        if isinstance(v, bool | np.bool_):
            kinds.add("bool")
        elif isinstance(v, int | np.integer):
            kinds.add("int")
        elif isinstance(v, float | np.floating):
            kinds.add("float")
        elif isinstance(v, str | np.str_):
            kinds.add("str")
        else:
            kinds.add("other")
    if len(kinds) <= 1 and kinds != {"other"}:
        if kinds == {"int"}:
            try:
                return np.asarray(values, dtype=np.int64)
            except OverflowError:  # beyond int64: uint64 if it fits, else keep the ints
                try:
                    return np.asarray(values, dtype=np.uint64)
                except OverflowError:
                    pass
        else:
            return np.asarray(values)
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _as_ids(x: Any) -> np.ndarray:
    """:func:`_to_numpy` for ids and indices: an empty list (which numpy makes float64) is
    an empty int64 array, so emptiness is reported as such rather than as a dtype."""
    arr = _to_numpy(x)
    if arr.size == 0 and arr.dtype.kind == "f":
        return arr.astype(np.int64)
    return arr


def _first_rows(mask: np.ndarray) -> tuple[int, int]:
    """(how many True, index of the first True) of a boolean mask."""
    bad = np.flatnonzero(mask)
    return len(bad), int(bad[0])


def _preview(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


class IdMap:
    """Bijection between raw ids and contiguous indices ``0..n-1``.

    ``raw_ids``: (n,) array, ``raw_ids[index] == raw id``; ints, strings or any hashable.
    Lookups are vectorised through a :class:`pandas.Index` built on first use.

    >>> m = IdMap(["b", "a", "c"])
    >>> m.index(["c", "b"]).tolist(), m.raw(0)
    ([2, 0], 'b')
    """

    __slots__ = ("_raw", "_lookup", "kind")

    def __init__(self, raw_ids: Any, kind: str = "id") -> None:
        raw = np.array(_to_numpy(raw_ids), copy=True)  # never alias the caller's array
        if raw.ndim != 1:
            raise ValueError(f"fastmf.IdMap: raw ids must be 1-D, got shape {raw.shape}")
        self._raw = raw
        self._lookup: pd.Index | None = None
        self.kind = kind
        if not self._index().is_unique:
            dup = self._index()[self._index().duplicated()].to_numpy()
            raise ValueError(f"fastmf.IdMap: raw {kind} ids are not unique: {_preview(dup)}")

    @classmethod
    def identity(cls, n: int, kind: str = "id") -> IdMap:
        """The map ``i <-> i`` for ``i in range(n)`` (raw ids are the indices)."""
        m = cls.__new__(cls)
        m._raw = np.arange(n, dtype=np.int64)
        m._lookup = pd.RangeIndex(n)
        m.kind = kind
        return m

    def _index(self) -> pd.Index:
        if self._lookup is None:
            raw = self._raw
            if raw.dtype.kind in "iu" and raw.dtype.itemsize < 8:
                # Looked up as int64, which holds every such id exactly: pandas'
                # get_indexer on a uint8/16/32 Index wraps larger query ints (261 found raw
                # id 5 of a uint8 map). ``raw_ids`` keep their own dtype.
                raw = raw.astype(np.int64)
            self._lookup = pd.Index(raw)
        return self._lookup

    def __len__(self) -> int:
        return len(self._raw)

    @property
    def is_identity(self) -> bool:
        """Whether this is :meth:`identity`'s map (raw ids are the indices)."""
        return isinstance(self._lookup, pd.RangeIndex)

    def __repr__(self) -> str:
        return f"IdMap({len(self)} {self.kind} ids, raw dtype {self._raw.dtype})"

    @property
    def raw_ids(self) -> np.ndarray:
        """(n,) raw id of each index (read-only view)."""
        view = self._raw.view()
        view.setflags(write=False)
        return view

    def lookup(self, raw_ids: Any) -> np.ndarray:
        """(M,) int64 indices of ``raw_ids``; ``-1`` where a raw id is unknown."""
        values = _as_ids(raw_ids)
        if values.ndim != 1:
            values = values.reshape(-1)
        if isinstance(self._lookup, pd.RangeIndex) and values.dtype.kind in "iu":
            # Identity maps: a range check is all the lookup there is.
            out = values.astype(np.int64, copy=True)
            out[(out < 0) | (out >= len(self))] = -1
            return out
        return self._index().get_indexer(values).astype(np.int64, copy=False)

    def index(self, raw_ids: Any) -> Any:
        """Index of each raw id: an int for a scalar, an (M,) int64 array otherwise.

        Raises KeyError naming the raw ids that are not in the map."""
        scalar = np.ndim(raw_ids) == 0 and not isinstance(raw_ids, torch.Tensor)
        values = np.asarray([raw_ids]) if scalar else _as_ids(raw_ids).reshape(-1)
        idx = self.lookup(values)
        missing = idx < 0
        if missing.any():
            raise KeyError(
                f"fastmf: {int(missing.sum())} unknown raw {self.kind} id(s): "
                f"{_preview(values[missing])}"
            )
        return int(idx[0]) if scalar else idx

    def raw(self, indices: Any) -> Any:
        """Raw id of each index: a scalar for a scalar, an (M,) array otherwise.

        Raises IndexError for an index outside ``[0, n)``."""
        scalar = np.ndim(indices) == 0 and not isinstance(indices, torch.Tensor)
        idx = np.asarray([indices]) if scalar else _as_ids(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"fastmf: {self.kind} indices must be integers, got {idx.dtype}")
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            raise IndexError(
                f"fastmf: {self.kind} index {int(idx[bad][0])} out of range [0, {len(self)})"
            )
        out = self._raw[idx]
        if not scalar:
            return out
        value = out[0]
        return value.item() if isinstance(value, np.generic) else value


def _encode(
    values: Any,
    kind: str,
    *,
    num: int | None,
    id_map: IdMap | None,
) -> tuple[np.ndarray, IdMap]:
    """Raw ids -> (codes with -1 for unknown, map). ``num``: values already are indices."""
    arr = _as_ids(values)
    if arr.ndim != 1:
        raise ValueError(f"fastmf.Interactions: {kind}s must be 1-D, got shape {arr.shape}")
    if num is not None and id_map is not None:
        raise ValueError(f"fastmf.Interactions: pass num_{kind}s or {kind}_map, not both")
    if num is not None:
        num = _check_count(num, f"num_{kind}s", "fastmf.Interactions.from_arrays")
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"fastmf.Interactions: with num_{kind}s, {kind}s must be integer indices, "
                f"got {arr.dtype}"
            )
        id_map = IdMap.identity(num, kind)
    arr = _decode_bytes_ids(arr, kind)
    if id_map is not None:
        return id_map.lookup(arr), id_map
    try:
        codes, uniques = pd.factorize(arr, sort=True)
    except TypeError:  # mixed, unorderable raw ids: keep order of first appearance
        codes, uniques = pd.factorize(arr, sort=False)
    codes = codes.astype(np.int64, copy=False)
    if len(codes) and codes.min() < 0:
        count, first = _first_rows(codes < 0)
        raise ValueError(
            f"fastmf.Interactions: {kind} ids contain {count} missing value(s) "
            f"(first at row {first})"
        )
    return codes, IdMap(np.asarray(uniques), kind)


def _check_count(value: Any, name: str, where: str) -> int:
    """``value`` as an int >= 0: TypeError for anything but an int (a float such as 2.5
    was truncated to 2), ValueError for a negative one."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{where}: {name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}")
    return int(value)


def _decode_bytes_ids(arr: np.ndarray, kind: str) -> np.ndarray:
    """Bytes ids (a CSV reader's answer to bytes that are not UTF-8, numpy ``S`` arrays) as
    ``str``: decoded as UTF-8, or ValueError naming the first row that is not UTF-8. Left
    as bytes, they would train and then fail to save."""
    if arr.dtype.kind == "S":
        arr = arr.astype(object)
    if arr.dtype.kind != "O" or pd.api.types.infer_dtype(arr, skipna=True) not in (
        "bytes", "mixed", "mixed-integer"
    ):
        return arr
    codes, uniques = pd.factorize(arr, sort=False)  # decode each distinct id once
    decoded = np.empty(len(uniques), dtype=object)
    for j, value in enumerate(uniques):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                row = int(np.flatnonzero(codes == j)[0])
                raise ValueError(
                    f"fastmf.Interactions: {kind} id at row {row} is not valid UTF-8 text: "
                    f"{value!r}; decode the ids (with their real encoding) first"
                ) from None
        decoded[j] = value
    out = np.empty(len(arr), dtype=object)
    valid = codes >= 0
    out[valid] = decoded[codes[valid]]
    out[~valid] = None
    return out


def _as_numbers(values: Any) -> np.ndarray:
    """:func:`_to_numpy` for a column of values (weights, timestamps), not ids: an object
    array holding only numbers (a list mixing ints and floats, which the raw-id converter
    keeps as given; a pandas object column) becomes float64, or int64/uint64 when they are
    all ints that fit. Anything else (strings, None, pandas NA) stays as it is, for the
    caller's dtype check."""
    arr = _to_numpy(values)
    if arr.dtype != object or arr.size == 0:
        return arr
    kind = pd.api.types.infer_dtype(arr.reshape(-1), skipna=False)
    if kind in ("floating", "mixed-integer-float", "integer-na"):  # "integer-na": NaN in ints
        return arr.astype(np.float64)
    if kind == "integer":
        for dtype in (np.int64, np.uint64):
            try:
                return arr.astype(dtype)
            except OverflowError:
                pass
    return arr


def _as_weights(values: Any, where: str) -> np.ndarray:
    """(N,) float32 weights, refusing NaN/inf and negative values with the first bad row."""
    weights = _as_numbers(values)
    if weights.dtype.kind not in "iufb":
        raise TypeError(f"{where}: weights must be numbers, got {weights.dtype}")
    weights = weights.astype(np.float32, copy=False)
    if weights.ndim != 1:
        raise ValueError(f"{where}: weights must be 1-D, got shape {weights.shape}")
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        count, first = _first_rows(bad)
        raise ValueError(f"{where}: weights must be finite and >= 0; {count} are not "
                         f"(first at row {first}: {weights[first]})")
    return weights


def _as_timestamps(values: Any) -> np.ndarray:
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.DatetimeTZDtype):
        values = values.dt.tz_convert(None)
    ts = _as_numbers(values)
    # Beyond int64 (uint64 above 2**63 - 1, or Python ints that fit no integer dtype):
    # astype(int64) would wrap a uint64 to a negative, earliest time.
    flat = ts.reshape(-1)
    outside = None
    if ts.dtype.kind == "u":
        outside = flat > np.iinfo(np.int64).max
    elif ts.dtype == object and pd.api.types.infer_dtype(flat, skipna=False) == "integer":
        outside = np.array([not -(1 << 63) <= v < (1 << 63) for v in flat], dtype=bool)
    if outside is not None and outside.any():
        count, first = _first_rows(outside)
        raise ValueError(
            f"fastmf.Interactions: timestamps must fit in int64; {count} do not (first at row "
            f"{first}: {flat[first]})"
        )
    if ts.dtype.kind in "iu":
        return ts.astype(np.int64, copy=False)
    if ts.dtype.kind == "f":
        return ts.astype(np.float64, copy=False)
    if ts.dtype.kind == "M":
        return ts
    raise TypeError(
        f"fastmf.Interactions: timestamps must be numbers or datetime64, got {ts.dtype}"
    )


class Interactions:
    """Interactions between users and items, indexed contiguously.

    Attributes (N interactions):

    - ``users``: (N,) int64 in ``[0, num_users)``; ``items``: (N,) int64 in ``[0, num_items)``
    - ``ratings``: (N,) float32 or ``None``; ``timestamps``: (N,) int64, float64, datetime64
      or ``None``
    - ``weights``: (N,) float32 >= 0 or ``None``: per-interaction confidence (keyword
      ``weights=``, :meth:`with_weights` or :meth:`with_confidence`); subsets and splits
      keep each row's weight
    - ``user_map``, ``item_map``: :class:`IdMap` (raw id <-> index)
    - ``item_titles``: ``dict[int, str]`` (item index -> title) or ``None``
    - ``item_metadata``: :class:`pandas.DataFrame` indexed by item index, or ``None``

    Treat instances as immutable: subsets and splits share the maps, and some derived
    structures are cached.

    The constructor takes indices; build from raw ids with :meth:`from_arrays`,
    :meth:`from_pandas`, :meth:`from_csv`, :meth:`from_parquet` or :meth:`from_scipy`
    (MovieLens folders: :func:`fastmf.datasets.load_movielens`; generated data:
    :func:`fastmf.datasets.synthetic`, which returns an ``Interactions`` itself).
    ``user_map``/``item_map`` may be an :class:`IdMap`, an int ``n`` (identity map of size
    ``n``) or ``None`` (identity map of size ``max index + 1``).

    >>> data = Interactions([0, 1, 1], [2, 0, 1], ratings=[5.0, 3.0, 4.0])
    >>> data.to_csr().toarray()
    array([[0., 0., 5.],
           [3., 4., 0.]], dtype=float32)
    """

    def __init__(
        self,
        users: Any,
        items: Any,
        ratings: Any = None,
        timestamps: Any = None,
        *,
        user_map: IdMap | int | None = None,
        item_map: IdMap | int | None = None,
        item_titles: Mapping[int, str] | None = None,
        item_metadata: pd.DataFrame | None = None,
        weights: Any = None,
    ) -> None:
        users = _as_ids(users)
        items = _as_ids(items)
        for name, arr in (("users", users), ("items", items)):
            if arr.ndim != 1:
                raise ValueError(f"fastmf.Interactions: {name} must be 1-D, got {arr.shape}")
            if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and arr.size == 0):
                raise TypeError(
                    f"fastmf.Interactions: {name} must be integer indices, got {arr.dtype}; "
                    "use Interactions.from_arrays for raw ids"
                )
        n = len(users)
        lengths = {"users": n, "items": len(items)}
        if ratings is not None:
            raw = _to_numpy(ratings)
            try:
                ratings = raw.astype(np.float32, copy=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"fastmf.Interactions: ratings must be numbers, got dtype "
                                 f"{raw.dtype} ({exc})") from None
            lengths["ratings"] = len(ratings) if ratings.ndim == 1 else -1
        if timestamps is not None:
            timestamps = _as_timestamps(timestamps)
            lengths["timestamps"] = len(timestamps) if timestamps.ndim == 1 else -1
        if weights is not None:
            weights = _as_weights(weights, "fastmf.Interactions")
            lengths["weights"] = len(weights)
        if len(set(lengths.values())) != 1:
            raise ValueError(f"fastmf.Interactions: mismatched lengths {lengths}")
        if n == 0:
            raise ValueError("fastmf.Interactions: no interactions")

        # Ranges are checked on the caller's arrays: a uint64 index above 2**63 - 1 would
        # turn negative in int64 and be reported as a value nobody passed.
        self.user_map = self._resolve_map(user_map, users, "user")
        self.item_map = self._resolve_map(item_map, items, "item")
        self.users = users.astype(np.int64, copy=False)
        self.items = items.astype(np.int64, copy=False)

        if ratings is not None:
            bad = ~np.isfinite(ratings)
            if bad.any():
                count, first = _first_rows(bad)
                raise ValueError(
                    f"fastmf.Interactions: ratings contain {count} NaN/inf value(s) "
                    f"(first at row {first}: {ratings[first]})"
                )
        if timestamps is not None:
            bad = np.isnat(timestamps) if timestamps.dtype.kind == "M" else None
            if timestamps.dtype.kind == "f":
                bad = ~np.isfinite(timestamps)
            if bad is not None and bad.any():
                count, first = _first_rows(bad)
                raise ValueError(
                    f"fastmf.Interactions: timestamps contain {count} missing/non-finite "
                    f"value(s) (first at row {first})"
                )
        self.ratings = ratings
        self.timestamps = timestamps
        self.weights = weights
        self.item_titles = dict(item_titles) if item_titles is not None else None
        self.item_metadata = item_metadata
        self._cache: dict[str, Any] = {}

    @staticmethod
    def _resolve_map(id_map: IdMap | int | None, idx: np.ndarray, kind: str) -> IdMap:
        lo, hi = int(idx.min()), int(idx.max())
        if id_map is None:
            if hi > np.iinfo(np.int64).max:
                raise IndexError(
                    f"fastmf.Interactions: {kind} index {hi} out of range [0, 2**63)"
                )
            id_map = IdMap.identity(hi + 1, kind)
        elif isinstance(id_map, (int, np.integer)):
            id_map = IdMap.identity(int(id_map), kind)
        elif not isinstance(id_map, IdMap):
            raise TypeError(
                f"fastmf.Interactions: {kind}_map must be an IdMap, an int or None, "
                f"got {type(id_map).__name__}"
            )
        bad = lo if lo < 0 else (hi if hi >= len(id_map) else None)
        if bad is not None:
            raise IndexError(
                f"fastmf.Interactions: {kind} index {bad} out of range [0, {len(id_map)})"
            )
        return id_map

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(
        cls,
        users: Any,
        items: Any,
        ratings: Any = None,
        timestamps: Any = None,
        *,
        num_users: int | None = None,
        num_items: int | None = None,
        user_map: IdMap | None = None,
        item_map: IdMap | None = None,
        unknown: str = "error",
    ) -> Interactions:
        """Build from raw ids: (N,) arrays (numpy, torch, pandas or lists).

        By default raw ids are factorised: indices follow the sorted order of the distinct
        raw ids (pandas' safe sort for mixed types; first-appearance order if even that
        fails), so ids that already are ``0..n-1`` map to themselves.

        - ``num_users``/``num_items``: the ids already are indices in ``[0, n)``; the map is
          the identity of size ``n`` (items that never occur still count).
        - ``user_map``/``item_map``: translate through an existing map, e.g. ``train.item_map``
          to build a test set in the training index space. Ids missing from the map raise
          KeyError (``unknown="error"``) or their rows are dropped (``unknown="drop"``).

        >>> d = Interactions.from_arrays(np.array([7, 7, 9]), np.array(["x", "y", "x"]))
        >>> d.users.tolist(), d.items.tolist()
        ([0, 0, 1], [0, 1, 0])
        """
        if unknown not in _UNKNOWN_POLICIES:
            raise ValueError(f"fastmf.Interactions: unknown must be one of {_UNKNOWN_POLICIES}")
        u_codes, u_map = _encode(users, "user", num=num_users, id_map=user_map)
        i_codes, i_map = _encode(items, "item", num=num_items, id_map=item_map)
        if len(u_codes) != len(i_codes):
            raise ValueError(
                f"fastmf.Interactions: mismatched lengths users={len(u_codes)}, "
                f"items={len(i_codes)}"
            )
        bad = (u_codes < 0) | (i_codes < 0)
        if bad.any() and unknown == "drop":
            # Lengths are checked before the rows are masked (a mask of another length
            # would fail inside numpy); the constructor checks them otherwise.
            lengths = {"users": len(u_codes), "items": len(i_codes)}
            if ratings is not None:
                ratings = _to_numpy(ratings)
                lengths["ratings"] = len(ratings) if ratings.ndim == 1 else -1
            if timestamps is not None:
                timestamps = _as_timestamps(timestamps)
                lengths["timestamps"] = len(timestamps) if timestamps.ndim == 1 else -1
            if len(set(lengths.values())) != 1:
                raise ValueError(f"fastmf.Interactions: mismatched lengths {lengths}")
        if bad.any():
            if unknown == "error":
                for codes, raw, kind, num in (
                    (u_codes, users, "user", num_users), (i_codes, items, "item", num_items)
                ):
                    missing = codes < 0
                    if not missing.any():
                        continue
                    values = _to_numpy(raw)[missing]
                    first = int(np.flatnonzero(missing)[0])
                    if num is not None:
                        raise IndexError(
                            f"fastmf.Interactions: {kind} index {values[0]} out of range "
                            f"[0, {num}) (row {first})"
                        )
                    raise KeyError(
                        f"fastmf.Interactions: {int(missing.sum())} {kind} id(s) not in the "
                        f"{kind} map (first at row {first}): {_preview(pd.unique(values))}"
                    )
            keep = ~bad
            u_codes, i_codes = u_codes[keep], i_codes[keep]
            ratings = None if ratings is None else ratings[keep]
            timestamps = None if timestamps is None else timestamps[keep]
        return cls(
            u_codes, i_codes, ratings, timestamps, user_map=u_map, item_map=i_map
        )

    @classmethod
    def from_pandas(
        cls,
        df: pd.DataFrame,
        user_col: str = "userId",
        item_col: str = "movieId",
        rating_col: str | None = "rating",
        time_col: str | None = "timestamp",
        **kwargs: Any,
    ) -> Interactions:
        """Build from a DataFrame with one row per interaction.

        ``user_col`` and ``item_col`` must exist. ``rating_col``/``time_col`` are used when
        present; with their default names they are optional, a name you pass must exist,
        and ``None`` ignores the column. Names are matched exactly (case and spaces
        included); a column that differs from a requested name only in case or spaces
        (``Rating`` for ``rating``) raises ValueError instead of being silently skipped.
        ``kwargs`` go to :meth:`from_arrays` (``user_map``, ``item_map``, ``unknown``,
        ``num_users``, ``num_items``).

        >>> df = pd.DataFrame({"userId": [1, 2], "movieId": [5, 5], "rating": [4.0, 2.5]})
        >>> Interactions.from_pandas(df).ratings.tolist()
        [4.0, 2.5]
        """
        user_col, item_col, rating_col, time_col = _resolve_columns(
            list(df.columns), user_col, item_col, rating_col, time_col, "from_pandas"
        )
        return cls.from_arrays(
            df[user_col],
            df[item_col],
            None if rating_col is None else df[rating_col],
            None if time_col is None else _as_timestamps(df[time_col]),
            **kwargs,
        )

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        user_col: str = "userId",
        item_col: str = "movieId",
        rating_col: str | None = "rating",
        time_col: str | None = "timestamp",
        *,
        sep: str | None = None,
        header: bool | None = None,
        encoding: str = "utf-8",
        read_csv_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Interactions:
        """Build from a delimited text file (CSV, TSV, MovieLens ``u.data``, ...).

        - ``sep``: the separator; ``None`` decides by the extension (``.csv``: comma,
          ``.tsv``/``.data``: tab) or else from the first lines (comma, tab, ``;`` or
          ``|``, whichever splits every line into the same number of fields, at least 2).
        - ``header``: whether the first row names the columns; ``None`` detects it: a first
          row made only of numbers is data. With a header, columns are matched by their
          exact names (case and spaces included) as in :meth:`from_pandas`. Without one,
          columns are taken by position: user, item, then rating and timestamp when there
          are 3 or 4 columns (more is refused: nothing says which is which); the ``*_col``
          names are then not looked for, and ``rating_col=None``/``time_col=None`` still
          leave those columns out.
        - Text must be in ``encoding``; bytes that are not raise ValueError naming the line
          and column rather than becoming ``bytes`` ids.

        Reads only the needed columns, with pandas' pyarrow engine when pyarrow is
        installed. ``read_csv_kwargs`` go to :func:`pandas.read_csv`. :func:`csv_layout`
        tells how a file will be read.

        >>> data = Interactions.from_csv("ml-latest-small/ratings.csv")  # doctest: +SKIP
        >>> data = Interactions.from_csv("ml-100k/u.data")  # tab, no header  # doctest: +SKIP
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fastmf.Interactions.from_csv: no such file: {path}")
        extra = dict(read_csv_kwargs or {})
        taken = sorted(set(extra) & {"sep", "delimiter", "header", "names", "usecols",
                                     "encoding"})
        if taken:
            raise ValueError(
                f"fastmf.Interactions.from_csv: read_csv_kwargs may not set {taken}: pass "
                "sep, header and encoding to from_csv itself; columns are chosen by the *_col "
                "names (or by position without a header)"
            )
        layout = csv_layout(path, sep, header, encoding=encoding)
        engine = extra.pop("engine", None)
        if (engine is None and len(layout.sep) == 1 and not extra
                and encoding.lower().replace("_", "-") in ("utf-8", "utf8") and _has_pyarrow()):
            engine = "pyarrow"
        if layout.header:
            cols = _resolve_columns(
                layout.columns, user_col, item_col, rating_col, time_col, "from_csv"
            )
            read = dict(header=0, usecols=[c for c in cols if c is not None])
        else:
            n = len(layout.columns)
            if n > 4:
                raise ValueError(
                    f"fastmf.Interactions.from_csv: {path} has no header row and {n} columns: "
                    "which is the user, item, rating and timestamp cannot be told by "
                    "position beyond 4 columns; add a header row and name the columns"
                )
            names = [user_col, item_col, rating_col or "rating", time_col or "timestamp"][:n]
            if len(set(names)) != n:
                names = ["user", "item", "rating", "timestamp"][:n]
            cols = (names[0], names[1], rating_col and (names[2] if n > 2 else None),
                    time_col and (names[3] if n > 3 else None))
            # All columns are read (at most 4): pyarrow's reader mishandles usecols
            # together with names.
            read = dict(header=None, names=names)
        try:
            df = pd.read_csv(path, sep=layout.sep, engine=engine, encoding=encoding,
                             **read, **extra)
        except UnicodeDecodeError:
            raise ValueError(_bad_text_message(path, layout, encoding)) from None
        for col in df.columns:
            if df[col].dtype == object and pd.api.types.infer_dtype(
                df[col].to_numpy()[:1000], skipna=True
            ) in ("bytes", "mixed"):
                # pyarrow's reader hands bytes that are not UTF-8 back as ``bytes``.
                values = df[col].to_numpy()
                if any(isinstance(v, bytes) for v in values):
                    raise ValueError(_bad_text_message(path, layout, encoding))
        return cls.from_pandas(df, *cols, **kwargs)

    @classmethod
    def from_parquet(
        cls,
        path: str | os.PathLike,
        user_col: str = "userId",
        item_col: str = "movieId",
        rating_col: str | None = "rating",
        time_col: str | None = "timestamp",
        **kwargs: Any,
    ) -> Interactions:
        """Build from a Parquet file or dataset directory (needs pyarrow); reads only the
        needed columns. Column rules as in :meth:`from_pandas`.

        >>> data = Interactions.from_parquet("ratings.parquet")  # doctest: +SKIP
        """
        try:
            import pyarrow.dataset as pads
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(
                "fastmf.Interactions.from_parquet needs pyarrow: pip install pyarrow"
            ) from err
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastmf.Interactions.from_parquet: no such path: {path}")
        names = pads.dataset(path, format="parquet").schema.names
        cols = _resolve_columns(names, user_col, item_col, rating_col, time_col, "from_parquet")
        table = pq.read_table(path, columns=[c for c in cols if c is not None])
        return cls.from_pandas(table.to_pandas(), *cols, **kwargs)

    @classmethod
    def from_scipy(cls, matrix: Any) -> Interactions:
        """Build from any scipy.sparse matrix/array of shape (num_users, num_items).

        Every stored nonzero becomes one interaction with its value as the rating
        (duplicates summed, explicit zeros dropped); rows and columns are the indices
        (identity maps of the matrix's shape), ordered row-major.

        >>> Interactions.from_scipy(sp.csr_matrix([[0, 2], [1, 0]])).ratings.tolist()
        [2.0, 1.0]
        """
        if not sp.issparse(matrix):
            raise TypeError(
                f"fastmf.Interactions.from_scipy: expected a scipy.sparse matrix, "
                f"got {type(matrix).__name__}"
            )
        coo = sp.coo_matrix(matrix, copy=True)
        coo.sum_duplicates()
        coo.eliminate_zeros()
        if coo.nnz == 0:
            raise ValueError("fastmf.Interactions.from_scipy: matrix has no interactions")
        if not np.isfinite(coo.data).all():
            count, first = _first_rows(~np.isfinite(coo.data))
            raise ValueError(
                f"fastmf.Interactions.from_scipy: matrix has {count} NaN/inf value(s) "
                f"(first at row {int(coo.row[first])}, column {int(coo.col[first])})"
            )
        num_users, num_items = coo.shape
        return cls(
            coo.row.astype(np.int64),
            coo.col.astype(np.int64),
            coo.data.astype(np.float32),
            user_map=num_users,
            item_map=num_items,
        )

    # ------------------------------------------------------------------ metadata

    def with_item_metadata(
        self,
        metadata: pd.DataFrame,
        item_col: str = "movieId",
        title_col: str | None = "title",
    ) -> Interactions:
        """A copy (arrays shared) carrying item metadata: ``metadata`` has one row per raw
        item id in ``item_col``; rows for unknown items are ignored. Sets ``item_titles``
        from ``title_col`` and ``item_metadata`` (indexed by item index, sorted).

        >>> movies = pd.read_csv("movies.csv")  # doctest: +SKIP
        >>> data = data.with_item_metadata(movies)  # doctest: +SKIP
        """
        for col in (item_col, title_col):
            if col is not None and col not in metadata.columns:
                raise ValueError(
                    f"fastmf.Interactions.with_item_metadata: column {col!r} not found; "
                    f"available columns: {list(metadata.columns)}"
                )
        idx = self.item_map.lookup(metadata[item_col].to_numpy())
        keep = idx >= 0
        meta = metadata.loc[keep].copy()
        meta.index = pd.Index(idx[keep], name="item")
        meta = meta[~meta.index.duplicated(keep="first")].sort_index()
        titles = None
        if title_col is not None:
            titles = dict(zip(meta.index.tolist(), meta[title_col].astype(str), strict=True))
        return self._derive(
            self.users, self.items, self.ratings, self.timestamps,
            item_titles=titles, item_metadata=meta,
        )

    # ------------------------------------------------------------------ weights

    def with_weights(self, weights: Any) -> Interactions:
        """A copy (other arrays shared) whose ``weights`` are ``weights``: (N,) finite and
        >= 0, one per row; ``None`` removes them.

        >>> Interactions([0, 1], [1, 0]).with_weights([1.0, 3.0]).weights.tolist()
        [1.0, 3.0]
        """
        if weights is not None:
            weights = _as_weights(weights, "fastmf.Interactions.with_weights")
            if len(weights) != len(self):
                raise ValueError(
                    f"fastmf.Interactions.with_weights: weights has {len(weights)} values "
                    f"for {len(self)} interactions"
                )
        return self._derive(self.users, self.items, self.ratings, self.timestamps,
                            weights=weights)

    def with_confidence(self, alpha: float = 1.0, eps: float = 1.0, *,
                        counts: Any = None) -> Interactions:
        """A copy whose ``weights`` are the confidence ``c = 1 + alpha * log(1 + count / eps)``
        of each row (Hu, Koren & Volinsky 2008, "Collaborative Filtering for Implicit
        Feedback Datasets", their log-scaled variant).

        - ``counts``: (N,) counts >= 0 (play counts, clicks, ...); default the ``ratings``
          column. A (user, item) pair spread over several rows counts once with the sum of
          its rows' counts, and each of its rows gets that confidence; call it on the
          training rows (after a split), or the test rows' counts leak into training.
        - ``alpha`` >= 0 scales the confidence; ``eps`` > 0 is the count at which the log
          starts to bend.

        >>> d = Interactions([0, 0, 1], [0, 1, 0], ratings=[1.0, 9.0, 0.0])
        >>> [round(float(c), 3) for c in d.with_confidence(alpha=2.0).weights]
        [2.386, 5.605, 1.0]
        """
        where = "fastmf.Interactions.with_confidence"
        for name, value, low_ok in (("alpha", alpha, True), ("eps", eps, False)):
            if (isinstance(value, bool) or not isinstance(value, int | float | np.number)
                    or not np.isfinite(value) or value < 0 or (value == 0 and not low_ok)):
                bound = ">= 0" if low_ok else "> 0"
                raise ValueError(f"{where}: {name} must be a finite number {bound}, "
                                 f"got {value!r}")
        if counts is None:
            if self.ratings is None:
                raise ValueError(f"{where}: these interactions have no ratings column to "
                                 "use as counts; pass counts=")
            values = self.ratings.astype(np.float64)
            what = "ratings (used as counts)"
        else:
            values = _to_numpy(counts).astype(np.float64, copy=False)
            what = "counts"
            if values.shape != (len(self),):
                raise ValueError(f"{where}: counts has shape {values.shape}, expected "
                                 f"({len(self)},)")
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            count, first = _first_rows(bad)
            raise ValueError(f"{where}: {what} must be finite and >= 0; {count} are not "
                             f"(first at row {first}: {values[first]})")
        key = self.users * np.int64(self.num_items) + self.items
        codes, uniques = pd.factorize(key)
        if len(uniques) < len(key):
            values = np.bincount(codes, weights=values, minlength=len(uniques))[codes]
        weights = (1.0 + float(alpha) * np.log1p(values / float(eps))).astype(np.float32)
        return self._derive(self.users, self.items, self.ratings, self.timestamps,
                            weights=weights)

    # ------------------------------------------------------------------ basic API

    @property
    def num_users(self) -> int:
        """Size of the user index space (users without interactions in this subset count)."""
        return len(self.user_map)

    @property
    def num_items(self) -> int:
        """Size of the item index space."""
        return len(self.item_map)

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_users, num_items)``, the shape of :meth:`to_csr`."""
        return self.num_users, self.num_items

    def __len__(self) -> int:
        return len(self.users)

    def __repr__(self) -> str:
        parts = [
            f"{len(self)} interactions",
            f"{self.num_users} users",
            f"{self.num_items} items",
            f"ratings={'yes' if self.ratings is not None else 'no'}",
            f"timestamps={'yes' if self.timestamps is not None else 'no'}",
        ]
        if self.weights is not None:
            parts.append("weights=yes")
        return f"Interactions({', '.join(parts)})"

    def _derive(self, users, items, ratings, timestamps, **overrides) -> Interactions:
        out = Interactions.__new__(Interactions)
        out.users, out.items = users, items
        out.ratings, out.timestamps = ratings, timestamps
        out.weights = overrides.get("weights", self.weights)
        out.user_map, out.item_map = self.user_map, self.item_map
        out.item_titles = overrides.get("item_titles", self.item_titles)
        out.item_metadata = overrides.get("item_metadata", self.item_metadata)
        out._cache = {}
        return out

    def subset(self, rows: Any) -> Interactions:
        """The interactions selected by ``rows``: an (N,) boolean mask or integer row
        indices (in the given order). Shares the id maps, titles and metadata.

        >>> train = data.subset(data.ratings >= 4)  # doctest: +SKIP
        """
        sel = _as_ids(rows)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(
                    f"fastmf.Interactions.subset: mask has shape {sel.shape}, "
                    f"expected ({len(self)},)"
                )
        elif sel.dtype.kind in "iu":
            if sel.ndim != 1:
                raise ValueError("fastmf.Interactions.subset: row indices must be 1-D")
            if len(sel) and (sel.min() < -len(self) or sel.max() >= len(self)):
                raise IndexError(
                    f"fastmf.Interactions.subset: row index out of range [0, {len(self)})"
                )
        else:
            raise TypeError(
                f"fastmf.Interactions.subset: expected a boolean mask or integer rows, "
                f"got {sel.dtype}"
            )
        empty = not sel.any() if sel.dtype == bool else len(sel) == 0
        if empty:
            raise ValueError("fastmf.Interactions.subset: selection has no interactions")
        return self._derive(
            self.users[sel],
            self.items[sel],
            None if self.ratings is None else self.ratings[sel],
            None if self.timestamps is None else self.timestamps[sel],
            weights=None if self.weights is None else self.weights[sel],
        )

    def in_maps_of(self, user_map: IdMap | None, item_map: IdMap | None, who: str,
                   name: str) -> Interactions:
        """This data in the index space of ``user_map``/``item_map`` (a model's, a training
        set's), for scoring against them. Data read with id maps of its own (a test file
        read without ``user_map=``) numbers its users and items in its own way, and its
        indices taken as they stand would be other users and items: such data is re-indexed
        through its raw ids (:meth:`reindex`), the rows with users or items the maps do not
        hold left out with a warning (a ValueError when none is left). Data with the same
        maps, with identity maps (built from indices) or scored against no maps (None) is
        returned as it is. ``who`` and ``name`` name the caller and the data in messages."""
        if user_map is None or item_map is None:
            return self
        if self.same_ids(user_map, item_map) or (self.user_map.is_identity
                                                  and self.item_map.is_identity):
            for side, ids, m in (("user", self.users, user_map), ("item", self.items, item_map)):
                if ids.max() >= len(m):
                    raise ValueError(f"{who}: the {name} interactions hold {side} index "
                                     f"{int(ids.max())}, but the training data has {len(m):,} "
                                     f"{side}s")
            return self
        try:
            out = self.reindex(user_map, item_map)
        except ValueError:  # no row left
            raise ValueError(f"{who}: none of the {len(self):,} {name} interactions has a "
                             "user and an item of the training data (its id maps hold other "
                             "raw ids)") from None
        if len(out) < len(self):
            warnings.warn(f"{who}: {len(self) - len(out):,} of {len(self):,} {name} "
                          "interactions have users or items the training data does not "
                          "know; they are left out", stacklevel=4)
        return out

    def same_ids(self, user_map: IdMap, item_map: IdMap) -> bool:
        """Whether this data's id maps are ``user_map`` and ``item_map`` (the same objects,
        or the same raw ids in the same order): then its indices mean the same users and
        items."""
        return all(own is other or (len(own) == len(other)
                                    and np.array_equal(own.raw_ids, other.raw_ids))
                   for own, other in ((self.user_map, user_map), (self.item_map, item_map)))

    def reindex(self, user_map: IdMap, item_map: IdMap) -> Interactions:
        """These interactions in other id maps (a model's, a training set's): each row's raw
        user and item ids looked up there. Rows whose user or item those maps do not hold
        are left out (compare ``len`` before and after); the ratings, timestamps and weights
        of the others are kept. Titles and item metadata belong to the old item indices and
        are not carried over.

        >>> test = test.reindex(model.user_map, model.item_map)  # doctest: +SKIP
        """
        for name, m in (("user_map", user_map), ("item_map", item_map)):
            if not isinstance(m, IdMap):
                raise TypeError(f"fastmf.Interactions.reindex: {name} must be an IdMap, got "
                                f"{type(m).__name__}")
        users = user_map.lookup(self.user_map.raw_ids[self.users])
        items = item_map.lookup(self.item_map.raw_ids[self.items])
        keep = (users >= 0) & (items >= 0)
        if not keep.any():
            raise ValueError(f"fastmf.Interactions.reindex: none of the {len(self):,} "
                             "interactions has a user and an item in these maps")
        ratings, stamps, weights = (None if a is None else a[keep]
                                    for a in (self.ratings, self.timestamps, self.weights))
        return Interactions(users[keep], items[keep], ratings, stamps, user_map=user_map,
                            item_map=item_map, weights=weights)

    def drop_duplicates(self, keep: str = "last") -> Interactions:
        """One row per (user, item) pair: the ``"first"`` or ``"last"`` occurrence in row
        order (by timestamp when ``keep="latest"``). Row order is preserved."""
        if keep not in ("first", "last", "latest"):
            raise ValueError("fastmf.Interactions.drop_duplicates: keep must be first/last/latest")
        key = self.users * np.int64(self.num_items) + self.items
        rows = np.arange(len(self))
        if keep == "latest":
            if self.timestamps is None:
                raise ValueError(
                    "fastmf.Interactions.drop_duplicates: keep='latest' needs timestamps"
                )
            order = np.lexsort((rows, self.timestamps, key))
        else:
            order = np.lexsort((rows, key))
        sorted_key = key[order]
        if keep == "first":
            chosen = order[np.r_[True, sorted_key[1:] != sorted_key[:-1]]]
        else:
            chosen = order[np.r_[sorted_key[1:] != sorted_key[:-1], True]]
        return self.subset(np.sort(chosen))

    def user_index(self, raw_ids: Any) -> Any:
        """Indices of raw user ids (int for a scalar); KeyError names unknown ids."""
        return self.user_map.index(raw_ids)

    def item_index(self, raw_ids: Any) -> Any:
        """Indices of raw item ids (int for a scalar); KeyError names unknown ids."""
        return self.item_map.index(raw_ids)

    def raw_user_ids(self, indices: Any) -> Any:
        """Raw user ids of user indices (scalar for a scalar)."""
        return self.user_map.raw(indices)

    def raw_item_ids(self, indices: Any) -> Any:
        """Raw item ids of item indices (scalar for a scalar)."""
        return self.item_map.raw(indices)

    # ------------------------------------------------------------------ conversions

    def to_csr(self, binary: bool = False, *, shape: tuple[int, int] | None = None
               ) -> sp.csr_matrix:
        """(num_users, num_items) float32 CSR, canonical (sorted indices, no duplicates).

        Values are the ratings (1 when there are none, or when ``binary=True``); duplicated
        pairs are summed, so implicit data with repeats gives counts. ``shape``: a larger
        (users, items) shape, the rows and columns past these data empty (a model grown by
        add_users/add_items since it was trained on them).

        >>> Interactions([0, 0], [1, 1]).to_csr().toarray()
        array([[0., 2.]], dtype=float32)
        """
        if shape is None:
            shape = self.shape
        elif len(shape) != 2 or shape[0] < self.num_users or shape[1] < self.num_items:
            raise ValueError(f"fastmf.Interactions.to_csr: shape {tuple(shape)} is smaller "
                             f"than the data's {self.shape}")
        if binary or self.ratings is None:
            values = np.ones(len(self), dtype=np.float32)
        else:
            values = self.ratings
        csr = sp.csr_matrix((values, (self.users, self.items)), shape=tuple(shape))
        csr.sum_duplicates()
        if binary:
            csr.data[:] = 1.0
        return csr

    def positive_structure(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr (num_users+1,), indices (nnz,)) int64 of the distinct items of each user,
        sorted within each user. Cached (used by negative sampling and ranking metrics)."""
        cached = self._cache.get("positives")
        if cached is None:
            csr = self.to_csr(binary=True)  # scipy's counting sort: O(N), no global sort
            cached = (
                csr.indptr.astype(np.int64, copy=False),
                csr.indices.astype(np.int64, copy=False),
            )
            self._cache["positives"] = cached
        return cached

    def to_torch(self, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(users (N,) int64, items (N,) int64, ratings (N,) float32) tensors on ``device``.
        Without ratings (implicit feedback) the third tensor is all ones.

        >>> users, items, ratings = data.to_torch("cuda")  # doctest: +SKIP
        """
        ratings = self.ratings if self.ratings is not None else np.ones(len(self), np.float32)
        return tuple(array_to_tensor(a, device) for a in (self.users, self.items, ratings))

    def to_pandas(self, raw_ids: bool = True) -> pd.DataFrame:
        """One row per interaction: ``user``, ``item`` (raw ids, or indices with
        ``raw_ids=False``), and ``rating``/``timestamp``/``weight`` when present."""
        cols: dict[str, Any] = {
            "user": self.user_map.raw_ids[self.users] if raw_ids else self.users,
            "item": self.item_map.raw_ids[self.items] if raw_ids else self.items,
        }
        if self.ratings is not None:
            cols["rating"] = self.ratings
        if self.timestamps is not None:
            cols["timestamp"] = self.timestamps
        if self.weights is not None:
            cols["weight"] = self.weights
        return pd.DataFrame(cols)


def _same_name(a: str, b: str) -> bool:
    return str(a).strip().casefold() == str(b).strip().casefold()


def _resolve_columns(
    available: list[str],
    user_col: str,
    item_col: str,
    rating_col: str | None,
    time_col: str | None,
    where: str,
) -> tuple[str, str, str | None, str | None]:
    """Check the requested columns exist (exact names); optional columns with their default
    names may be absent, unless a column differing only in case or spaces suggests a typo:
    silently training without the ratings of a ``Rating`` column would be worse."""
    available = [str(c) for c in available]
    expected = (
        f"expected user_col={user_col!r}, item_col={item_col!r}"
        + (f", rating_col={rating_col!r}" if rating_col is not None else "")
        + (f", time_col={time_col!r}" if time_col is not None else "")
        + " (names are matched exactly, case and spaces included)"
    )
    hint = ""
    if len(available) == 1 and any(c in available[0] for c in ",\t;|"):
        hint = "; the single column suggests the wrong separator: pass sep (CLI: --sep)"
    elif available and all(_is_number(c) for c in available):
        hint = ("; the columns look numeric: if the file has no header row, pass "
                "header=False (CLI: --header no)")
    defaults = {"rating_col": "rating", "time_col": "timestamp"}
    resolved = []
    for role, col in (
        ("user_col", user_col), ("item_col", item_col), ("rating_col", rating_col),
        ("time_col", time_col),
    ):
        optional_default = defaults.get(role)
        if col is None:
            if optional_default is None:
                raise ValueError(f"fastmf.Interactions.{where}: {role} is required")
            resolved.append(None)
            continue
        if col in available:
            resolved.append(col)
            continue
        near = [c for c in available if _same_name(c, col)]
        if optional_default is not None and col == optional_default and not near:
            resolved.append(None)
            continue
        if near:
            ignore = f", or {role}=None to ignore it" if optional_default is not None else ""
            flag = "--" + role.replace("_", "-")
            raise ValueError(
                f"fastmf.Interactions.{where}: column {col!r} ({role}) not found, but "
                f"{near[0]!r} is: names are matched exactly; pass {role}={near[0]!r} "
                f"(CLI: {flag} {near[0]!r}){ignore}; available columns: {available}"
            )
        raise ValueError(
            f"fastmf.Interactions.{where}: column {col!r} ({role}) not found; "
            f"available columns: {available}; {expected}{hint}"
        )
    return tuple(resolved)  # type: ignore[return-value]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- delimited text

_SEP_BY_EXTENSION = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".data": "\t"}
_SNIFFED_SEPS = (",", "\t", ";", "|")
_SEP_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe", " ": "space"}


@dataclass(frozen=True)
class CsvLayout:
    """How :meth:`Interactions.from_csv` reads a file (see :func:`csv_layout`).

    - ``sep``: the separator; ``header``: whether the first row names the columns;
    - ``columns``: the header's names, or with no header the positional names
      ``user, item, rating, timestamp`` (as many as there are columns);
    - ``reason``: one line saying how ``sep`` and ``header`` were decided.
    """

    sep: str
    header: bool
    columns: list[str]
    reason: str


def _fields(line: str, sep: str) -> list[str]:
    return next(csv.reader([line], delimiter=sep), [])


def csv_layout(
    path: str | os.PathLike,
    sep: str | None = None,
    header: bool | None = None,
    *,
    encoding: str = "utf-8",
) -> CsvLayout:
    """Separator, header and columns of a delimited text file, read from its first 64 KiB.

    ``sep=None``: by extension (``.csv`` comma; ``.tsv``, ``.tab``, ``.data`` tab), else
    the first of comma, tab, ``;``, ``|`` that splits the first lines (up to 20) into the
    same number (>= 2) of fields. ``header=None``: a first row whose fields are all numbers
    (or empty) is data, anything else is a header.

    >>> csv_layout("ml-100k/u.data")  # doctest: +SKIP
    CsvLayout(sep='\\t', header=False, columns=['user', 'item', 'rating', 'timestamp'], ...)
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        sample = f.read(1 << 16)
        truncated = bool(f.read(1))
    text = sample.decode(encoding, errors="replace").lstrip("\ufeff")
    lines = text.splitlines()
    if truncated and len(lines) > 1:
        lines = lines[:-1]  # cut mid-line
    lines = [line for line in lines if line.strip()][:20]
    if not lines:
        raise ValueError(f"fastmf.Interactions.from_csv: {path} is empty")
    ext = os.path.splitext(path)[1].lower()
    if sep is not None:
        if not isinstance(sep, str) or not sep:
            raise ValueError(f"fastmf.Interactions.from_csv: sep must be a non-empty string, "
                             f"got {sep!r}")
        how = f"{_SEP_NAMES.get(sep, repr(sep))}-separated (given)"
    elif ext in _SEP_BY_EXTENSION:
        sep = _SEP_BY_EXTENSION[ext]
        how = f"{_SEP_NAMES[sep]}-separated (by the {ext} extension)"
    else:
        for candidate in _SNIFFED_SEPS:
            counts = {len(_fields(line, candidate)) for line in lines}
            if len(counts) == 1 and counts.pop() >= 2:
                sep = candidate
                break
        if sep is None:
            raise ValueError(
                f"fastmf.Interactions.from_csv: cannot tell the separator of {path}: none of "
                "comma, tab, ';', '|' splits its first lines into the same number of fields; "
                "pass sep"
            )
        how = f"{_SEP_NAMES[sep]}-separated (detected from the first lines)"
    first = _fields(lines[0], sep) if len(sep) == 1 else lines[0].split(sep)
    if header is None:
        header = any(field.strip() and not _is_number(field) for field in first)
        how += ", " + ("header row" if header else "no header row") + " (detected)"
    else:
        header = bool(header)
        how += ", " + ("header row" if header else "no header row") + " (given)"
    if header:
        columns = list(first)
    else:
        columns = ["user", "item", "rating", "timestamp", *(
            f"column {k + 1}" for k in range(4, len(first)))][: len(first)]
        how += ": columns taken by position as " + ", ".join(columns)
    return CsvLayout(sep=sep, header=header, columns=columns, reason=how)


def _bad_text_message(path: str, layout: CsvLayout, encoding: str) -> str:
    """Where a file first fails to decode: line number, column, the bytes."""
    where = ""
    sep = layout.sep.encode(encoding, errors="replace")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                for k, field in enumerate(raw.rstrip(b"\r\n").split(sep)):
                    try:
                        field.decode(encoding)
                    except UnicodeDecodeError:
                        name = layout.columns[k] if k < len(layout.columns) else f"#{k + 1}"
                        where = f" at line {lineno}, column {name!r}: {field!r}"
                        break
                else:
                    where = f" at line {lineno}: {raw[:80]!r}"
                break
    return (
        f"fastmf.Interactions.from_csv: {path} is not valid {encoding} text{where}; save it "
        f"as {encoding}, or pass its real encoding (encoding='latin-1', CLI --encoding)"
    )


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
