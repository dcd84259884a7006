"""Train/test splits of :class:`~fastmf.data.Interactions`.

Every split returns subsets of its input that share the input's id maps (one index space)
and keep the input's row order within each side. For every split:

- no interaction (row) is on both sides, and every row is on exactly one side
  (``len(train) + len(test) == len(data)``);
- the result depends only on the data and ``seed`` (not on thread count or platform);
  ``seed`` is an int >= 0, ``None`` (fresh entropy) or a :class:`numpy.random.Generator`.

>>> train, test = random_split(data, test_fraction=0.2, seed=0)  # doctest: +SKIP
>>> train, test = leave_one_out(data, by="time")  # doctest: +SKIP
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
from numba import njit, prange

from fastmf.data.interactions import Interactions
from fastmf.data.sampling import group_rows

__all__ = ["random_split", "kfold", "leave_one_out", "temporal_split"]


def _check_fraction(test_fraction: Any, where: str) -> float:
    """``test_fraction`` as a float in (0, 1): TypeError for anything but a real number (a
    string such as "0.2" failed deep inside numpy), ValueError outside (0, 1) or NaN."""
    if isinstance(test_fraction, bool | np.bool_) or not isinstance(test_fraction,
                                                                    numbers.Real):
        raise TypeError(f"fastmf.{where}: test_fraction must be a number in (0, 1), got "
                        f"{test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"fastmf.{where}: test_fraction must be in (0, 1), got {test_fraction}")
    return float(test_fraction)


def _rng(seed: Any, where: str) -> np.random.Generator:
    """numpy Generator of ``seed``: an int >= 0, None (fresh entropy) or a Generator (used
    as it is); anything else is refused naming the function (numpy's own errors name
    neither it nor ``seed``)."""
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, int | np.integer):
        raise TypeError(f"fastmf.{where}: seed must be an int >= 0, None or a numpy "
                        f"Generator, got {seed!r}")
    if seed < 0:
        raise ValueError(f"fastmf.{where}: seed must be an int >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def _per_user_count(test_fraction: float, size: np.ndarray) -> np.ndarray:
    """floor(f * n_u + 0.5) rows per user, at most n_u - 1."""
    return np.minimum(np.floor(test_fraction * size + 0.5), size - 1)


def _split(data: Interactions, test_mask: np.ndarray, where: str) -> tuple[Interactions, ...]:
    n_test = int(test_mask.sum())
    if n_test == 0 or n_test == len(data):
        side = "test" if n_test == 0 else "train"
        raise ValueError(
            f"fastmf.{where}: the {side} side would have no interactions "
            f"({len(data)} interactions in all); use a different test_fraction or more data"
        )
    return data.subset(~test_mask), data.subset(test_mask)


@njit(parallel=True, cache=True)
def _sort_groups(order, offsets, keys):
    """Sort each user's rows by key; the sort is stable, so ties keep row order."""
    for u in prange(offsets.shape[0] - 1):
        lo, hi = offsets[u], offsets[u + 1]
        if hi - lo > 1:
            rows = order[lo:hi].copy()
            perm = np.argsort(keys[rows], kind="mergesort")
            for t in range(hi - lo):
                order[lo + t] = rows[perm[t]]


def _latest_per_user(data: Interactions, keys: np.ndarray, take) -> np.ndarray:
    """Boolean test mask: for each user, the rows with the largest keys (ties: later rows
    count as later), ``take(sizes)`` of them per user (an array of counts per user)."""
    order, offsets = group_rows(data.users, data.num_users)
    if keys.dtype.kind == "M":
        keys = keys.view(np.int64)
    _sort_groups(order, offsets, keys)
    sizes = np.diff(offsets)
    n_test = take(sizes).astype(np.int64)
    # Position of each grouped row counted from the end of its group.
    group_end = np.repeat(offsets[1:], sizes)
    from_end = group_end - 1 - np.arange(len(order))
    test = np.zeros(len(order), dtype=bool)
    test[order[from_end < np.repeat(n_test, sizes)]] = True
    return test


def random_split(
    data: Interactions,
    test_fraction: float = 0.2,
    *,
    seed: int = 0,
    by_user: bool = False,
) -> tuple[Interactions, Interactions]:
    """Random (train, test) split of the interactions.

    - ``by_user=False``: exactly ``round(test_fraction * N)`` random rows go to test.
    - ``by_user=True``: for each user, ``floor(test_fraction * n_u + 0.5)`` of their
      ``n_u`` rows (at most ``n_u - 1``) go to test, so every user with enough history
      appears on both sides and users with one interaction stay in train.

    >>> train, test = random_split(data, 0.1, seed=42)  # doctest: +SKIP
    """
    test_fraction = _check_fraction(test_fraction, "random_split")
    rng = _rng(seed, "random_split")
    n = len(data)
    test = np.zeros(n, dtype=bool)
    if not by_user:
        test[rng.permutation(n)[: int(round(test_fraction * n))]] = True
    else:
        test = _latest_per_user(data, rng.random(n), lambda size: _per_user_count(
            test_fraction, size))
    return _split(data, test, "random_split")


def kfold(
    data: Interactions, k: int = 5, *, seed: int = 0
) -> Iterator[tuple[Interactions, Interactions]]:
    """An iterator of ``k`` (train, test) pairs: the rows are shuffled once and cut into
    ``k`` folds of sizes differing by at most one; fold ``f`` is the test side of pair
    ``f``. Each row is in exactly one test fold. ``k`` and ``seed`` are checked when it is
    called, not at the first fold.

    >>> for train, test in kfold(data, k=5, seed=0):  # doctest: +SKIP
    ...     fit_and_score(train, test)
    """
    if int(k) != k or k < 2:
        raise ValueError(f"fastmf.kfold: k must be an integer >= 2, got {k}")
    n = len(data)
    if k > n:
        raise ValueError(f"fastmf.kfold: k={k} folds but only {n} interactions")
    rng = _rng(seed, "kfold")
    return _folds(data, int(k), rng)


def _folds(data: Interactions, k: int, rng: np.random.Generator
           ) -> Iterator[tuple[Interactions, Interactions]]:
    n = len(data)
    fold_of_row = np.empty(n, dtype=np.int64)
    fold_of_row[rng.permutation(n)] = np.arange(n) % k
    for fold in range(k):
        yield _split(data, fold_of_row == fold, "kfold")


def leave_one_out(
    data: Interactions,
    by: str = "time",
    *,
    seed: int = 0,
) -> tuple[Interactions, Interactions]:
    """Hold out one interaction per user: (train, test).

    - ``by="time"``: each user's latest interaction by timestamp; ties (equal timestamps)
      go to the row that comes last in ``data``. Needs timestamps.
    - ``by="random"``: a uniformly random interaction per user (seeded).

    Users with a single interaction stay entirely in train, so every user with at least two
    interactions has exactly one test row and keeps the rest in train.

    >>> train, test = leave_one_out(data, by="time")  # doctest: +SKIP
    >>> np.bincount(test.users).max()  # doctest: +SKIP
    1
    """
    rng = _rng(seed, "leave_one_out")  # checked for by="time" too, which does not use it
    if by == "time":
        if data.timestamps is None:
            raise ValueError(
                "fastmf.leave_one_out: by='time' needs timestamps; use by='random'"
            )
        keys = data.timestamps
    elif by == "random":
        keys = rng.random(len(data))
    else:
        raise ValueError(f"fastmf.leave_one_out: by must be 'time' or 'random', got {by!r}")
    test = _latest_per_user(data, keys, lambda size: (size >= 2).astype(np.int64))
    return _split(data, test, "leave_one_out")


def temporal_split(
    data: Interactions,
    test_fraction: float = 0.2,
    *,
    by_user: bool = False,
) -> tuple[Interactions, Interactions]:
    """Split by time: (train, test) with test the latest interactions.

    - ``by_user=False``: a global cut: the ``round(test_fraction * N)`` latest rows (by
      timestamp, ties in row order) are the test side, so every train timestamp is <= every
      test timestamp.
    - ``by_user=True``: each user's ``floor(test_fraction * n_u + 0.5)`` latest rows (at most
      ``n_u - 1``) are held out.

    >>> train, test = temporal_split(data, 0.2)  # doctest: +SKIP
    >>> train.timestamps.max() <= test.timestamps.min()  # doctest: +SKIP
    True
    """
    test_fraction = _check_fraction(test_fraction, "temporal_split")
    if data.timestamps is None:
        raise ValueError("fastmf.temporal_split: needs timestamps")
    n = len(data)
    test = np.zeros(n, dtype=bool)
    if not by_user:
        order = np.argsort(data.timestamps, kind="stable")
        n_test = int(round(test_fraction * n))
        if n_test:
            test[order[n - n_test:]] = True
    else:
        test = _latest_per_user(
            data, data.timestamps, lambda size: _per_user_count(test_fraction, size)
        )
    return _split(data, test, "temporal_split")
