"""Negative sampling: items a user has not interacted with, drawn in compiled code.

:func:`sample_negatives` (one call) and :class:`NegativeSampler` (precomputes the user rows
and the item distribution once, for a training loop) draw, for each requested user,
``num_negatives`` item indices that are not among that user's positives (the distinct
items of the user's CSR row).

Distributions:

- ``"uniform"``: uniform over the user's non-positive items. Drawn without rejection: a
  uniform rank ``r`` in ``[0, num_items - deg)`` is mapped to the ``r``-th non-positive
  item by a binary search over the sorted row (``row[t] - t`` counts the non-positives
  below ``row[t]``), so even a user who has seen 99.9% of the catalogue costs
  ``O(log deg)`` per draw.
- ``"popularity"``: proportional to ``popularity(train) ** alpha`` restricted to the
  user's non-positives; or pass your own (num_items,) non-negative weights. Drawn by
  rejection (an O(1) alias-table draw, membership by binary search in the sorted row); a
  row that keeps rejecting (its positives hold most of the mass) switches to an exact
  method: binary searches over the cumulative weights and the row's positive-weight
  prefix sums.

Randomness: each output row ``b`` has its own counter-based stream (SplitMix64 seeded by
``(seed, b)``), so results depend only on ``seed`` and the inputs, never on the number of
threads or on how rows are scheduled.

>>> train = Interactions([0, 0, 1], [0, 1, 2], user_map=2, item_map=5)
>>> sample_negatives(train, np.array([0, 1, 1]), 4, seed=0).shape
(3, 4)
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import scipy.sparse as sp
import torch
from numba import njit, prange

from fastmf.data.interactions import Interactions

__all__ = ["NegativeSampler", "sample_negatives", "popularity"]

# ----------------------------------------------------------------------------- RNG
# SplitMix64 (Steele, Lea & Flood 2014): a 64-bit counter pushed through a bijective mixer.
# Cheap, statistically good for sampling, and trivially splittable into independent
# per-row streams, which is what makes parallel results thread-count independent.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_INV_2_53 = 1.0 / 9007199254740992.0
_SEED_MASK = (1 << 64) - 1


@njit(inline="always")
def mix64(z):
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(inline="always")
def stream_state(seed, stream):
    """Initial state of stream ``stream`` (int) under ``seed`` (uint64)."""
    return mix64(seed ^ mix64(np.uint64(stream) * _GOLDEN + _GOLDEN))


@njit(inline="always")
def next_float(state):
    """(new state, uniform float64 in [0, 1)) with 53 random bits."""
    state = state + _GOLDEN
    return state, np.float64(mix64(state) >> _S11) * _INV_2_53


@njit(inline="always")
def next_below(state, m):
    """(new state, uniform int64 in [0, m)), m >= 1. Bias below 2**-53 * m."""
    state, u = next_float(state)
    x = np.int64(u * m)
    if x >= m:
        x = m - 1
    return state, x


def resolve_seed(seed: Any) -> np.uint64:
    """int / None (fresh entropy) / numpy Generator -> uint64 kernel seed."""
    if seed is None:
        seed = np.random.default_rng()
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2**63))
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"fastmf: seed must be an int, None or a numpy Generator, got {seed!r}")
    return np.uint64(int(seed) & _SEED_MASK)


# ----------------------------------------------------------------------------- kernels


@njit(cache=True)
def build_alias(weights):
    """Walker/Vose alias table of non-negative ``weights`` (n,), sum > 0: (prob (n,)
    float64, alias (n,) int64). Item i is drawn as ``i`` with probability ``prob[i]`` of
    slot i, else ``alias[i]``; an O(1) draw instead of a binary search whose dependent
    loads miss the cache on large catalogues."""
    n = weights.shape[0]
    prob = weights * (n / weights.sum())
    alias = np.arange(n)
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    n_small = 0
    n_large = 0
    for i in range(n):
        if prob[i] < 1.0:
            small[n_small] = i
            n_small += 1
        else:
            large[n_large] = i
            n_large += 1
    while n_small > 0 and n_large > 0:
        n_small -= 1
        s = small[n_small]
        n_large -= 1
        g = large[n_large]
        alias[s] = g
        prob[g] = prob[g] + prob[s] - 1.0
        if prob[g] < 1.0:
            small[n_small] = g
            n_small += 1
        else:
            large[n_large] = g
            n_large += 1
    # Leftovers differ from 1 only by rounding.
    for t in range(n_large):
        prob[large[t]] = 1.0
    for t in range(n_small):
        prob[small[t]] = 1.0 if weights[small[t]] > 0 else 0.0
    return prob, alias


@njit(inline="always")
def alias_draw(prob, alias, f):
    """Item for the uniform ``f`` in [0, 1): its high part picks the slot, the rest the
    coin (53 random bits are plenty for both below ~2**30 items)."""
    scaled = f * prob.shape[0]
    slot = np.int64(scaled)
    if slot >= prob.shape[0]:
        slot = prob.shape[0] - 1
    return slot if scaled - slot < prob[slot] else alias[slot]



@njit(inline="always")
def _row_contains(indices, start, deg, item):
    lo = start
    hi = start + deg
    while lo < hi:
        mid = (lo + hi) >> 1
        v = indices[mid]
        if v == item:
            return True
        if v < item:
            lo = mid + 1
        else:
            hi = mid
    return False


@njit(inline="always")
def _rank_to_item(indices, start, deg, rank):
    """The rank-th (0-based) item not in the sorted row indices[start:start+deg]."""
    # positives p_t at position t: p_t - t non-positives lie below p_t (nondecreasing in t).
    lo = 0
    hi = deg
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[start + mid] - mid <= rank:
            lo = mid + 1
        else:
            hi = mid
    return rank + lo


@njit(inline="always")
def _search_cumulative(cumw, n, v):
    """Largest x in [0, n) with cumw[x] <= v (cumw: (n+1,), cumw[0] = 0, nondecreasing)."""
    lo = 0
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if cumw[mid] <= v:
            lo = mid
        else:
            hi = mid
    return lo


@njit(inline="always")
def _seen_in_row(out, row, count, item):
    for t in range(count):
        if out[row, t] == item:
            return True
    return False


_LINEAR_SCAN_MAX = 16


@njit(inline="always")
def _set_insert(table, value):
    """Insert value (>= 0) into an open-addressing set of size 2**m filled with -1;
    False when it was already there."""
    mask = table.shape[0] - 1
    h = (value * 0x9E3779B1 >> 12) & mask
    while table[h] != -1:
        if table[h] == value:
            return False
        h = (h + 1) & mask
    table[h] = value
    return True


@njit(cache=True)
def group_rows(keys, num_keys):
    """Counting sort: (rows grouped by key in a stable order, (num_keys + 1,) offsets).
    O(N + num_keys), no comparison sort."""
    offsets = np.zeros(num_keys + 1, dtype=np.int64)
    for key in keys:
        offsets[key + 1] += 1
    for g in range(num_keys):
        offsets[g + 1] += offsets[g]
    fill = offsets[:-1].copy()
    order = np.empty(keys.shape[0], dtype=np.int64)
    for row in range(keys.shape[0]):
        key = keys[row]
        order[fill[key]] = row
        fill[key] += 1
    return order, offsets


@njit(parallel=True, cache=True)
def _uniform_kernel(indptr, indices, users, visit, num_items, seed, replace, out):
    k = out.shape[1]
    for pos in prange(visit.shape[0]):
        row = visit[pos]
        u = users[row]
        start = indptr[u]
        deg = indptr[u + 1] - start
        free = num_items - deg
        state = stream_state(seed, row)
        if replace:
            for j in range(k):
                state, r = next_below(state, free)
                out[row, j] = _rank_to_item(indices, start, deg, r)
        else:
            # Floyd's algorithm: k distinct ranks of [0, free) in k draws, then shuffle
            # (Floyd's output order is not uniform) and map ranks to items. Membership of
            # the ranks drawn so far: a linear scan for short rows, a hash set otherwise.
            table = np.empty(0, dtype=np.int64)
            if k > _LINEAR_SCAN_MAX:
                size = 16
                while size < 2 * k:
                    size *= 2
                table = np.full(size, -1, dtype=np.int64)
            for j in range(k):
                top = free - k + j
                state, t = next_below(state, top + 1)
                if k > _LINEAR_SCAN_MAX:
                    if _set_insert(table, t):
                        out[row, j] = t
                    else:  # top is new: every earlier pick is below it
                        _set_insert(table, top)
                        out[row, j] = top
                else:
                    out[row, j] = top if _seen_in_row(out, row, j, t) else t
            for j in range(k - 1, 0, -1):
                state, s = next_below(state, j + 1)
                tmp = out[row, j]
                out[row, j] = out[row, s]
                out[row, s] = tmp
            for j in range(k):
                out[row, j] = _rank_to_item(indices, start, deg, out[row, j])


_MAX_MISSES = 32
_GROUP_MIN_ROWS = 1 << 16
# Up to this many draws a call runs on one thread: a draw is tens of nanoseconds, so a small
# batch costs less than waking the thread pool, and far less than a pool barrier on a loaded
# machine (1,024 draws: 0.06 ms on one thread, ~4 ms on two busy cores). Rows draw from their
# own streams, so the output does not depend on the thread count.
_SERIAL_MAX_DRAWS = 1 << 12


def _run_kernel(kernel, draws: int, *args) -> None:
    if draws > _SERIAL_MAX_DRAWS:
        kernel(*args)
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # this thread's setting only
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


@njit(parallel=True, cache=True)
def _weighted_kernel(
    indptr, indices, users, visit, cumw, prob, alias, weighted_items, seed, replace, out, status
):
    k = out.shape[1]
    n = cumw.shape[0] - 1
    total = cumw[n]
    for pos in prange(visit.shape[0]):
        row = visit[pos]
        u = users[row]
        start = indptr[u]
        deg = indptr[u + 1] - start
        state = stream_state(seed, row)
        j = 0
        misses = 0
        exact = False
        prefix = np.empty(1, dtype=np.float64)
        free_mass = 0.0
        while j < k:
            state, f = next_float(state)
            if not exact:
                x = alias_draw(prob, alias, f)
            else:
                # Sample in the free mass: skip the m positives whose free mass below them
                # is <= v, then map back to the global cumulative scale.
                v = f * free_mass
                lo = 0
                hi = deg
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if cumw[indices[start + mid]] - prefix[mid] <= v:
                        lo = mid + 1
                    else:
                        hi = mid
                x = _search_cumulative(cumw, n, v + prefix[lo])
            ok = cumw[x + 1] > cumw[x] and not _row_contains(indices, start, deg, x)
            if ok and not replace:
                ok = not _seen_in_row(out, row, j, x)
            if ok:
                out[row, j] = x
                j += 1
                misses = 0
                continue
            misses += 1
            if exact or misses < _MAX_MISSES:
                continue
            # Many rejections in a row: check feasibility once, then sample exactly.
            prefix = np.empty(deg + 1, dtype=np.float64)
            prefix[0] = 0.0
            weighted_positives = 0
            for t in range(deg):
                p = indices[start + t]
                w = cumw[p + 1] - cumw[p]
                prefix[t + 1] = prefix[t] + w
                if w > 0:
                    weighted_positives += 1
            free_items = weighted_items - weighted_positives
            if free_items < (1 if replace else k):
                status[row] = 1
                break
            free_mass = total - prefix[deg]
            exact = True


# ----------------------------------------------------------------------------- Python API


def _positive_rows(train: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(indptr int64, sorted distinct indices int64, num_users, num_items) of the positives."""
    if isinstance(train, Interactions):
        indptr, indices = train.positive_structure()
        return indptr, indices, train.num_users, train.num_items
    if sp.issparse(train):
        csr = sp.csr_matrix(train)
        if not csr.has_canonical_format or (csr.data == 0).any():
            csr = csr.copy()
            csr.sum_duplicates()
            csr.eliminate_zeros()
        num_users, num_items = csr.shape
        return (
            csr.indptr.astype(np.int64, copy=False),
            csr.indices.astype(np.int64, copy=False),
            num_users,
            num_items,
        )
    raise TypeError(
        f"fastmf: train must be Interactions or a scipy.sparse matrix, got {type(train).__name__}"
    )


def popularity(train: Any) -> np.ndarray:
    """(num_items,) int64 interaction count of each item.

    For :class:`Interactions` every row counts (a repeated pair counts twice); for a sparse
    matrix, every stored nonzero of the column.

    >>> popularity(Interactions([0, 1, 1], [2, 2, 0])).tolist()
    [1, 0, 2]
    """
    if isinstance(train, Interactions):
        return np.bincount(train.items, minlength=train.num_items).astype(np.int64)
    if sp.issparse(train):
        csr = sp.csr_matrix(train)
        csr = csr.copy() if (csr.data == 0).any() else csr
        csr.eliminate_zeros()
        return np.bincount(csr.indices, minlength=csr.shape[1]).astype(np.int64)
    raise TypeError(
        f"fastmf.popularity: train must be Interactions or a scipy.sparse matrix, "
        f"got {type(train).__name__}"
    )


def _check_alpha(alpha: Any) -> float:
    """The popularity exponent as a float: a real number (TypeError), finite and >= 0
    (ValueError): NaN or inf make every weight NaN/inf, and with alpha < 0 the items with
    count 0 get weight ``0 ** alpha = inf``."""
    if isinstance(alpha, bool | np.bool_) or not isinstance(alpha, int | float | np.integer
                                                             | np.floating):
        raise TypeError(f"fastmf.NegativeSampler: alpha must be a number, got {alpha!r}")
    if not np.isfinite(alpha):
        raise ValueError(f"fastmf.NegativeSampler: alpha must be finite and >= 0, got {alpha}")
    if alpha < 0:
        raise ValueError(
            f"fastmf.NegativeSampler: alpha must be finite and >= 0, got {alpha}: the items "
            "nobody interacted with would get weight 0 ** alpha = inf (pass distribution= an "
            "array of weights for another scheme)"
        )
    return float(alpha)


def _check_item_weights(weights: np.ndarray, what: str) -> None:
    """Item weights (given, or popularity ** alpha) are finite, >= 0, not all zero, and
    their sum is finite."""
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"fastmf.NegativeSampler: {what} must be finite and >= 0; {int(bad.sum())} are "
            f"not (first at item {first}: {weights[first]})"
        )
    if not weights.any():
        raise ValueError("fastmf.NegativeSampler: all item weights are zero")
    with np.errstate(over="ignore"):
        total = weights.sum()
    if not np.isfinite(total):
        raise ValueError(f"fastmf.NegativeSampler: {what} sum to inf; scale them down")


class NegativeSampler:
    """Reusable negative sampler over a fixed training set.

    ``train``: :class:`Interactions` or a (num_users, num_items) scipy.sparse matrix whose
    nonzeros are the positives. ``distribution``: ``"uniform"``, ``"popularity"``
    (``popularity(train) ** alpha``, e.g. ``alpha=0.75``; ``alpha`` must be finite and
    >= 0: a negative one would give the items nobody interacted with, count 0, an
    infinite weight, and ``alpha=0`` is uniform) or a (num_items,) array of finite,
    non-negative weights, not all zero. Building costs one pass over ``train``;
    :meth:`sample` then costs ``O(len(users) * num_negatives * log(deg))``.

    >>> sampler = NegativeSampler(train, distribution="popularity", alpha=0.75)  # doctest: +SKIP
    >>> for epoch in range(10):  # doctest: +SKIP
    ...     neg = sampler.sample(users, 4, seed=epoch)
    """

    def __init__(
        self,
        train: Any,
        *,
        distribution: str | Any = "uniform",
        alpha: float = 1.0,
    ) -> None:
        self._indptr, self._indices, self.num_users, self.num_items = _positive_rows(train)
        self._degree = np.diff(self._indptr)
        if isinstance(distribution, str):
            if distribution == "uniform":
                weights = None
            elif distribution == "popularity":
                alpha = _check_alpha(alpha)
                with np.errstate(over="ignore"):  # an overflow is reported just below
                    weights = popularity(train).astype(np.float64) ** alpha
                what = f"popularity ** alpha (alpha={alpha})"
            else:
                raise ValueError(
                    f"fastmf.NegativeSampler: distribution must be 'uniform', 'popularity' "
                    f"or an array of weights, got {distribution!r}"
                )
            self.distribution = distribution
        else:
            weights = np.asarray(
                distribution.detach().cpu() if isinstance(distribution, torch.Tensor)
                else distribution,
                dtype=np.float64,
            )
            if weights.shape != (self.num_items,):
                raise ValueError(
                    f"fastmf.NegativeSampler: weights must have shape ({self.num_items},), "
                    f"got {weights.shape}"
                )
            what = "weights"
            self.distribution = "weights"
        self.weights = weights
        if weights is not None:
            # Checked before the alias table and the cumulative weights are built: NaN or
            # inf weights (or a sum that overflows) leave no item drawable, and the exact
            # fallback of the weighted kernel would then search forever.
            _check_item_weights(weights, what)
            self._cumw = np.concatenate([[0.0], np.cumsum(weights)])
            self._prob, self._alias = build_alias(weights)
            self._weighted_items = int(np.count_nonzero(weights))

    def sample(
        self,
        users: Any,
        num_negatives: int,
        *,
        seed: Any = None,
        replace: bool = True,
    ) -> Any:
        """(len(users), num_negatives) int64 item indices, none a positive of its row's user.

        ``users``: (B,) user indices (numpy or torch; repeats allowed and get independent
        draws). ``replace=False`` makes the negatives within a row distinct (e.g. the 99
        negatives of the NCF protocol). ``seed``: int for reproducible draws, ``None`` for
        fresh entropy, or a numpy Generator. Returns a torch tensor on ``users``' device
        when ``users`` is a tensor, else a numpy array.

        Raises ValueError when a user has no non-positive item (or, without replacement,
        fewer than ``num_negatives``).
        """
        as_torch = isinstance(users, torch.Tensor)
        device = users.device if as_torch else None
        u = users.detach().cpu().numpy() if as_torch else np.asarray(users)
        if u.ndim != 1:
            raise ValueError(f"fastmf.sample_negatives: users must be 1-D, got shape {u.shape}")
        if u.size and u.dtype.kind not in "iu":
            raise TypeError(f"fastmf.sample_negatives: users must be integers, got {u.dtype}")
        u = u.astype(np.int64, copy=False)
        if int(num_negatives) != num_negatives or num_negatives < 0:
            raise ValueError(
                f"fastmf.sample_negatives: num_negatives must be an int >= 0, got {num_negatives}"
            )
        k = int(num_negatives)
        out = np.empty((len(u), k), dtype=np.int64)
        if len(u):
            lo, hi = int(u.min()), int(u.max())
            if lo < 0 or hi >= self.num_users:
                bad = lo if lo < 0 else hi
                raise IndexError(
                    f"fastmf.sample_negatives: user index {bad} out of range "
                    f"[0, {self.num_users})"
                )
        if len(u) == 0 or k == 0:
            return torch.from_numpy(out).to(device) if as_torch else out
        kernel_seed = resolve_seed(seed)
        # Each row draws from its own stream, so rows may be visited in any order: large
        # batches go user by user, turning random reads of the CSR rows into sequential
        # ones (several times faster on 10M rows). The output does not change.
        if len(u) >= _GROUP_MIN_ROWS and self.num_users <= 4 * len(u):
            visit = group_rows(u, self.num_users)[0]
        else:
            visit = np.arange(len(u), dtype=np.int64)
        if self.weights is None:
            free = self.num_items - self._degree[u]
            short = free < (1 if replace else k)
            if short.any():
                self._raise_short(int(u[np.argmax(short)]), int(free[np.argmax(short)]), k,
                                  replace)
            _run_kernel(
                _uniform_kernel, len(u) * k, self._indptr, self._indices, u, visit,
                np.int64(self.num_items), kernel_seed, bool(replace), out,
            )
        else:
            status = np.zeros(len(u), dtype=np.int8)
            _run_kernel(
                _weighted_kernel, len(u) * k, self._indptr, self._indices, u, visit,
                self._cumw, self._prob, self._alias, np.int64(self._weighted_items),
                kernel_seed, bool(replace), out, status,
            )
            if status.any():
                user = int(u[np.argmax(status)])
                row = self._indices[self._indptr[user]:self._indptr[user + 1]]
                free = self._weighted_items - int(np.count_nonzero(self.weights[row]))
                self._raise_short(user, free, k, replace, weighted=True)
        return torch.from_numpy(out).to(device) if as_torch else out

    def csr(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The positives' CSR as tensors on ``device``: ``indptr`` (U+1,) int64 and
        ``indices`` (nnz,), rows sorted and distinct, int32 when the item ids fit (else
        int64): what ``train_step_pairwise_sampled`` draws against. Each draw binary-searches
        its user's row, and on ml-latest-small (100k positives) int32 rows made a
        one-thread BPR epoch 3-5 % faster: half the bytes to keep in cache. Moved once per
        device and kept."""
        device = torch.device("cpu") if device is None else torch.device(device)
        cache = self.__dict__.setdefault("_csr_tensors", {})
        if device not in cache:
            indices = self._indices
            if self.num_items <= np.iinfo(np.int32).max:
                indices = indices.astype(np.int32)
            cache[device] = (torch.from_numpy(self._indptr).to(device),
                             torch.from_numpy(indices).to(device))
        return cache[device]

    def sample_step(self, users: torch.Tensor, num_negatives: int, *, seed: int,
                    step: int) -> torch.Tensor:
        """(len(users), num_negatives) int64 uniform negatives, the ones the fused
        ``train_step_pairwise_sampled`` op draws for the same (``seed``, ``step``): entry
        (b, k) from the counter b * num_negatives + k (see
        :func:`fastmf.ops.reference.sampling.sample_negatives`), so a training loop that
        samples here and one that lets the op sample see the same negatives. Uniform
        distribution only; on ``users``' device."""
        from fastmf import ops
        from fastmf.ops.checks import check_ids, check_int

        op = "NegativeSampler.sample_step"
        if self.weights is not None:
            raise ValueError(f"fastmf.{op}: draws uniform negatives only; this sampler's "
                             f"distribution is {self.distribution!r}")
        num_negatives = check_int(op, "num_negatives", num_negatives, 1)
        seed, step = check_int(op, "seed", seed), check_int(op, "step", step)
        check_ids(op, "users", users, None)
        device = users.device
        indptr, indices = self.csr(device)
        # The native kernel where built for the device (on ml-latest-small's rows, 4,096
        # draws took about 0.1 ms on 2 threads against 0.2-0.3 ms for the Numba kernel,
        # which searches one draw at a time), else Numba on the CPU, else the reference.
        kernels = ops.kernels("auto", device, kernel="sample_negatives")
        return kernels.sample_negatives(users, indptr, indices, self.num_items, num_negatives,
                                        seed, step, op)

    def _raise_short(self, user: int, free: int, k: int, replace: bool,
                     weighted: bool = False) -> None:
        what = "non-interacted items with nonzero weight" if weighted else "non-interacted items"
        if free == 0:
            raise ValueError(
                f"fastmf.sample_negatives: user {user} has no {what} "
                f"(interacted with all of them); no negatives to sample"
            )
        raise ValueError(
            f"fastmf.sample_negatives: user {user} has only {free} {what}, fewer than "
            f"num_negatives={k} without replacement (pass replace=True)"
        )


def sample_negatives(
    train: Any,
    users: Any,
    num_negatives: int,
    *,
    distribution: str | Any = "uniform",
    alpha: float = 1.0,
    seed: Any = None,
    replace: bool = True,
) -> Any:
    """(len(users), num_negatives) int64 items that the row's user has not interacted with.

    One-shot form of ``NegativeSampler(train, distribution=..., alpha=...).sample(users,
    num_negatives, seed=..., replace=...)``; build a :class:`NegativeSampler` once when
    sampling repeatedly from the same training set.

    >>> train = Interactions([0, 0, 1], [0, 1, 2], user_map=2, item_map=4)
    >>> neg = sample_negatives(train, np.array([0, 0, 1]), 3, seed=0)
    >>> neg.shape, bool(np.isin(neg[:2], [0, 1]).any())
    ((3, 3), False)
    """
    sampler = NegativeSampler(train, distribution=distribution, alpha=alpha)
    return sampler.sample(users, num_negatives, seed=seed, replace=replace)
