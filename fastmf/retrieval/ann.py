"""Approximate top-k by inner product (candidate generation) over faiss or hnswlib.

MF scores are ``b_i + <p_u, q_i>``; the bias is folded into the index as one more
dimension (items ``[q_i, b_i]``, queries ``[p_u, 1]``), so a plain inner-product index
ranks by the full score. Whatever the index returns is re-scored exactly from the factor
tables and ordered like :func:`fastmf.retrieval.topk_scores` (score, then lower index), so
the only approximation is which items are found.

Optional dependencies: ``pip install fastmf[ann]`` (faiss-cpu and hnswlib).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import Tensor

from fastmf.ops.checks import check_exclude_csr, check_k, check_weight
from fastmf.retrieval._inputs import exclude_csr

OP = "ANNIndex"

# The knobs each (backend, index) takes, with their defaults.
_KNOBS = {
    ("faiss", "hnsw"): {"M": 32, "ef_construction": 200, "ef_search": 128},
    ("faiss", "ivf"): {"nlist": None, "nprobe": 16},
    ("faiss", "flat"): {},
    ("hnswlib", "hnsw"): {"M": 32, "ef_construction": 200, "ef_search": 128, "num_threads": -1},
}
_MODULES = {"faiss": "faiss", "hnswlib": "hnswlib"}
# The least value of each knob: faiss aborts, crashes or hangs on an HNSW graph with M < 2,
# and a search with ef_search or nprobe 0 finds nothing (or fails in faiss). nlist None
# picks the default; num_threads any int (hnswlib: <= 0 for all cores).
_LEAST = {"M": 2, "ef_construction": 1, "ef_search": 1, "nlist": 1, "nprobe": 1,
          "num_threads": None}
_C_INT = (-(1 << 31), (1 << 31) - 1)  # faiss and hnswlib take the knobs as C ints


def _check_knob(name: str, value) -> int | None:
    """``value`` as an int, after checking it is an int (not a bool) in a C int's range
    and at least the knob's least value; nlist may be None (the default count)."""
    if name == "nlist" and value is None:
        return None
    low = _LEAST[name]
    want = "an int" if low is None else f"an int >= {low}"
    if name == "nlist":
        want = f"None (4·√I lists) or {want}"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"fastmf.{OP}: {name} must be {want}, got {type(value).__name__} {value!r}"
        )
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"fastmf.{OP}: {name} must be {want}, got {value}")
    if not _C_INT[0] <= value <= _C_INT[1]:
        raise ValueError(
            f"fastmf.{OP}: {name} must fit in a C int (at most {_C_INT[1]}), got {value}"
        )
    return value


def _import(backend: str):
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError as exc:
        raise ImportError(
            f"fastmf.{OP}: backend={backend!r} needs the {backend} package, which is not "
            f"installed ({exc}). Install the extra: `pip install fastmf[ann]`"
        ) from exc


class ANNIndex:
    """An inner-product index over item vectors (bias folded in).

    Args:
        item_factors: (I, K) float32/float64.
        item_bias: (I,) or None.
        backend: ``"faiss"`` or ``"hnswlib"``.
        index: ``"hnsw"`` (both backends), ``"ivf"`` (faiss IVF-Flat) or ``"flat"`` (faiss
            IndexFlatIP: exact, a brute-force baseline).
        knobs: HNSW ``M``, ``ef_construction``, ``ef_search`` (and ``num_threads`` for
            hnswlib); IVF ``nlist`` (default ``4·√I``, at most I/39) and ``nprobe``.
            ``ef_search`` and ``nprobe`` can be changed later through the attributes of the
            same name. Each is an int: ``M`` >= 2, the others >= 1 (``nlist`` may be None);
            a bad one raises TypeError / ValueError before the backend is touched. A search
            for more results than ``ef_search`` raises ef to that count for the call.

    >>> import torch
    >>> index = ANNIndex(torch.randn(1000, 16), torch.randn(1000))  # doctest: +SKIP
    >>> scores, ids = index.search(torch.randn(5, 16), k=10)  # doctest: +SKIP
    """

    def __init__(self, item_factors: Tensor, item_bias: Tensor | None = None,
                 backend: str = "faiss", index: str = "hnsw", **knobs):
        if backend not in _MODULES:
            raise ValueError(
                f"fastmf.{OP}: unknown backend {backend!r}; expected 'faiss' or 'hnswlib'"
            )
        if (backend, index) not in _KNOBS:
            kinds = [kind for b, kind in _KNOBS if b == backend]
            raise ValueError(
                f"fastmf.{OP}: backend {backend!r} has no index {index!r}; expected one of "
                f"{kinds}"
            )
        defaults = _KNOBS[(backend, index)]
        unknown = sorted(set(knobs) - set(defaults))
        if unknown:
            raise TypeError(
                f"fastmf.{OP}: unknown knobs {unknown} for {backend} {index}; it takes "
                f"{sorted(defaults)}"
            )
        check_weight(OP, "item_factors", item_factors, 2)
        if item_bias is not None:
            check_weight(OP, "item_bias", item_bias, 1, like=item_factors)
            if item_bias.shape[0] != item_factors.shape[0]:
                raise ValueError(
                    f"fastmf.{OP}: item_bias has {item_bias.shape[0]} rows, item_factors has "
                    f"{item_factors.shape[0]}"
                )
        self.backend, self.kind = backend, index
        self.knobs = {name: _check_knob(name, value)
                      for name, value in {**defaults, **knobs}.items()}
        self.item_factors = item_factors.detach()
        self.item_bias = None if item_bias is None else item_bias.detach()
        self.num_items, self.dim = item_factors.shape
        self._lib = _import(backend)
        self._index = self._build(self._index_rows())

    def _index_rows(self) -> np.ndarray:
        rows = self.item_factors.cpu().to(torch.float32)
        if self.item_bias is not None:
            rows = torch.cat([rows, self.item_bias.cpu().to(torch.float32).unsqueeze(1)], 1)
        return np.ascontiguousarray(rows.numpy())

    def _query_rows(self, queries: Tensor) -> np.ndarray:
        rows = queries.detach().cpu().to(torch.float32)
        if self.item_bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        return np.ascontiguousarray(rows.numpy())

    def _build(self, data: np.ndarray):
        knobs, dim = self.knobs, data.shape[1]
        if self.backend == "hnswlib":
            index = self._lib.Index(space="ip", dim=dim)
            index.init_index(max_elements=max(1, len(data)), ef_construction=
                             knobs["ef_construction"], M=knobs["M"])
            if len(data):
                index.add_items(data, np.arange(len(data)), num_threads=knobs["num_threads"])
            index.set_ef(knobs["ef_search"])
            return index
        faiss = self._lib
        if self.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, knobs["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = knobs["ef_construction"]
            index.hnsw.efSearch = knobs["ef_search"]
        else:
            # faiss wants about 39 training points per list; 4·√I lists otherwise.
            nlist = knobs["nlist"] or max(1, min(int(4 * np.sqrt(len(data))), len(data) // 39))
            nlist = min(nlist, max(1, len(data)))
            self.knobs["nlist"] = nlist
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            if len(data):
                index.train(data)
            index.nprobe = knobs["nprobe"]
        if len(data):
            index.add(data)
        return index

    @property
    def ef_search(self) -> int:
        if self.kind != "hnsw":
            raise AttributeError(f"fastmf.{OP}: ef_search is an HNSW knob; this is {self.kind}")
        return self.knobs["ef_search"]

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.ef_search  # noqa: B018 - the kind check
        value = _check_knob("ef_search", value)
        if self.backend == "hnswlib":
            self._index.set_ef(value)
        else:
            self._index.hnsw.efSearch = value
        self.knobs["ef_search"] = value

    @property
    def nprobe(self) -> int:
        if self.kind != "ivf":
            raise AttributeError(f"fastmf.{OP}: nprobe is an IVF knob; this is {self.kind}")
        return self.knobs["nprobe"]

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.nprobe  # noqa: B018 - the kind check
        value = _check_knob("nprobe", value)
        self._index.nprobe = value
        self.knobs["nprobe"] = value

    def _raw_search(self, rows: np.ndarray, fetch: int) -> np.ndarray:
        if self.backend == "hnswlib":
            # hnswlib needs ef >= the number of results asked for.
            ef = self.knobs["ef_search"]
            self._index.set_ef(max(ef, fetch))
            try:
                labels, _ = self._index.knn_query(rows, k=fetch,
                                                  num_threads=self.knobs["num_threads"])
            finally:
                self._index.set_ef(ef)
            return labels.astype(np.int64)
        if self.kind == "hnsw" and fetch > self.knobs["ef_search"]:
            # faiss returns at most ef_search results per query (the rest -1); raise ef for
            # this call only, as above, leaving the index's efSearch as the user set it.
            params = self._lib.SearchParametersHNSW(efSearch=fetch)
            _, labels = self._index.search(rows, fetch, params=params)
        else:
            _, labels = self._index.search(rows, fetch)
        return labels.astype(np.int64)

    def search(self, queries: Tensor, k: int = 10, *, exclude=None) -> tuple[Tensor, Tensor]:
        """Approximate top-k: ``(scores (B, k), indices (B, k) int64)`` as
        :func:`fastmf.retrieval.topk_scores` returns them (exact scores of the items found,
        best first, padded with -inf / -1). ``exclude`` (one row per query, same forms as
        there) is applied by asking the index for ``k`` + the longest row and filtering."""
        k = check_k(OP, k)
        check_weight(OP, "queries", queries, 2)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"fastmf.{OP}: queries has dim {queries.shape[1]} but the index has dim "
                f"{self.dim}"
            )
        batch, device = queries.shape[0], self.item_factors.device
        indptr, indices = exclude_csr(OP, exclude, batch, device)
        if indptr is not None:
            # As topk_scores checks it: an id out of range would alias another query's
            # row in the (row, item) keys below and drop an item from that row.
            check_exclude_csr(OP, indptr, indices, self.num_items, batch)
        longest = int((indptr[1:] - indptr[:-1]).max()) if indptr is not None and batch else 0
        fetch = min(k + longest, self.num_items)
        dtype = self.item_factors.dtype
        if batch == 0 or fetch == 0:
            return (torch.full((batch, k), float("-inf"), dtype=dtype, device=device),
                    torch.full((batch, k), -1, dtype=torch.int64, device=device))
        ids = torch.from_numpy(self._raw_search(self._query_rows(queries), fetch)).to(device)
        found = ids >= 0
        if indptr is not None:
            indptr = indptr.long()
            lengths = indptr[1:] - indptr[:-1]
            rows = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
            seen = indices[int(indptr[0]) : int(indptr[-1])].long()
            pairs = torch.arange(batch, device=device).unsqueeze(1) * self.num_items + ids
            found &= ~torch.isin(pairs, rows * self.num_items + seen)
        safe = ids.clamp(min=0)
        q = queries.detach().to(device=device, dtype=dtype)
        scores = torch.einsum("bk,bjk->bj", q, self.item_factors[safe])
        if self.item_bias is not None:
            scores = scores + self.item_bias[safe]
        scores = torch.where(torch.isnan(scores), float("-inf"), scores)
        # Rank like the exact path: lower index, then higher score (stable), then found first.
        order = torch.sort(torch.where(found, ids, self.num_items), dim=1, stable=True).indices
        order = order.gather(1, torch.sort(scores.gather(1, order), dim=1, descending=True,
                                           stable=True).indices)
        order = order.gather(1, torch.sort((~found.gather(1, order)).to(torch.uint8), dim=1,
                                           stable=True).indices)
        order = order[:, :k]
        keep = found.gather(1, order)
        out_ids = torch.where(keep, ids.gather(1, order), -1)
        out_scores = torch.where(keep, scores.gather(1, order), float("-inf"))
        if out_ids.shape[1] < k:
            pad = k - out_ids.shape[1]
            out_ids = torch.cat([out_ids, out_ids.new_full((batch, pad), -1)], 1)
            out_scores = torch.cat([out_scores, out_scores.new_full((batch, pad), float("-inf"))],
                                   1)
        return out_scores, out_ids

    def __repr__(self) -> str:
        return (f"ANNIndex(backend={self.backend!r}, index={self.kind!r}, items={self.num_items},"
                f" dim={self.dim}, knobs={self.knobs})")
