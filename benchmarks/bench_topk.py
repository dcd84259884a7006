"""Top-10 recommendation throughput, every path side by side (pytest-benchmark).

100K items × K=64 (also 1M items with FASTMF_BENCH_LARGE=1: the reference then needs
4 GB per 1K queries, so it stops at 128, and the HNSW indexes, minutes to build on two
cores, are left out), query batches 1 / 128 / 4096. Item factors are
clustered (1,000 centres plus noise, like trained embeddings rather than i.i.d. noise,
which no ANN index handles well), with a bias per item; every path ranks by
``b_i + <p_u, q_i>``.

- reference: ``torch.topk(torch.addmm(b, X, Q.T), 10)`` (the full score matrix; the bias
  rides in the GEMM)
- native: the fused kernel (``fastmf.retrieval.topk_scores(backend="native")``)
- numba: the Numba backend
- faiss-flat: faiss IndexFlatIP over ``[Q | b]`` (exact, brute force)
- faiss-hnsw / faiss-ivf / hnswlib-hnsw: ``fastmf.retrieval.ANNIndex``; recall@10 against
  the exact top-10 goes in extra_info
- native+exclude: the fused kernel leaving out 200 items per query, against a reference
  that masks them in the full score matrix

Each case checks its result (exact paths against the reference, ANN recall) before it is
timed, and reports queries/s and the ratio to the reference at the same batch in
extra_info:

    pytest benchmarks/bench_topk.py --benchmark-json=out.json \
        --benchmark-columns=mean,stddev,rounds
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from fastmf.ops.native import has_kernel
from fastmf.retrieval import ANNIndex, topk_scores

K_TOP = 10
DIM = 64
BATCHES = [1, 128, 4096]
LARGE = os.environ.get("FASTMF_BENCH_LARGE") == "1"
SIZES = [100_000] + ([1_000_000] if LARGE else [])
# The reference materialises batch × items scores; past this it is not run.
REFERENCE_MAX_SCORES = 600_000_000
EXCLUDED_PER_QUERY = 200
ANN_KNOBS = {
    "faiss-hnsw": dict(backend="faiss", index="hnsw", M=16, ef_construction=100, ef_search=128),
    "faiss-ivf": dict(backend="faiss", index="ivf", nprobe=32),
    "hnswlib-hnsw": dict(backend="hnswlib", index="hnsw", M=16, ef_construction=100,
                         ef_search=128),
}
ANN_MIN_RECALL = 0.5  # a sanity floor: far below what these knobs reach here

_REFERENCE_QPS: dict[tuple[int, int, str], float] = {}
_DATA: dict[int, tuple] = {}
_INDEXES: dict[tuple[int, str], tuple] = {}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def data(num_items: int):
    """(items (I, K), bias (I,), queries (4096, K), exclude CSR for 4096 queries)."""
    if num_items not in _DATA:
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn(1000, DIM, generator=gen)
        items = centres[torch.randint(0, 1000, (num_items,), generator=gen)]
        items = (items + 0.5 * torch.randn(num_items, DIM, generator=gen)) * 0.1
        bias = 0.1 * torch.randn(num_items, generator=gen)
        queries = centres[torch.randint(0, 1000, (max(BATCHES),), generator=gen)]
        queries = (queries + 0.5 * torch.randn(max(BATCHES), DIM, generator=gen)) * 0.1
        indptr = torch.arange(max(BATCHES) + 1) * EXCLUDED_PER_QUERY
        indices = torch.randint(0, num_items, (int(indptr[-1]),), generator=gen)
        _DATA[num_items] = (items, bias, queries, (indptr, indices))
    return _DATA[num_items]


def reference_topk(queries, items, bias):
    return torch.topk(torch.addmm(bias, queries, items.T), K_TOP)


def reference_topk_excluding(queries, items, bias, indptr, indices):
    scores = torch.addmm(bias, queries, items.T)
    rows = torch.repeat_interleave(torch.arange(queries.shape[0]), indptr[1:] - indptr[:-1])
    scores[rows, indices[int(indptr[0]) : int(indptr[-1])]] = float("-inf")
    return torch.topk(scores, K_TOP)


def exact_check(got, queries, items, bias, exclude=None):
    """Scores equal to the reference's rank by rank (to fp32 rounding), and every index
    returned scores what is reported for it: near-ties may be ordered differently only
    when the dot products round differently."""
    check = queries[:256]
    if exclude is None:
        expected = reference_topk(check, items, bias)
    else:
        indptr, indices = exclude
        indptr = indptr[: check.shape[0] + 1]
        expected = reference_topk_excluding(check, items, bias, indptr, indices)
    scores, ids = got[0][: check.shape[0]], got[1][: check.shape[0]]
    torch.testing.assert_close(scores, expected.values, rtol=1e-4, atol=1e-5)
    rescored = (check.double().unsqueeze(1) * items.double()[ids]).sum(-1) + bias.double()[ids]
    torch.testing.assert_close(scores.double(), rescored, rtol=1e-4, atol=1e-5)


def recall_at_10(ids, queries, items, bias):
    exact = reference_topk(queries[:512], items, bias).indices
    found = ids[:512]
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
    return hits / exact.numel()


def ann_index(num_items: int, name: str):
    if (num_items, name) not in _INDEXES:
        items, bias, _, _ = data(num_items)
        start = time.perf_counter()
        index = ANNIndex(items, bias, **ANN_KNOBS[name])
        _INDEXES[(num_items, name)] = (index, time.perf_counter() - start)
    return _INDEXES[(num_items, name)]


def faiss_flat(num_items: int):
    if (num_items, "faiss-flat") not in _INDEXES:
        items, bias, _, _ = data(num_items)
        _INDEXES[(num_items, "faiss-flat")] = (ANNIndex(items, bias, backend="faiss",
                                                        index="flat"), 0.0)
    return _INDEXES[(num_items, "faiss-flat")][0]


METHODS = ["reference", "native", "numba", "faiss-flat", "faiss-hnsw", "faiss-ivf",
           "hnswlib-hnsw", "reference+exclude", "native+exclude"]
NEEDS = {
    "native": has_kernel("cpu", "topk_scores"),
    "native+exclude": has_kernel("cpu", "topk_scores"),
    "numba": installed("numba"),
    "faiss-flat": installed("faiss"),
    "faiss-hnsw": installed("faiss"),
    "faiss-ivf": installed("faiss"),
    "hnswlib-hnsw": installed("hnswlib"),
}
# Reference first within each (size, batch), so every other case can report its ratio.
SLOW_TO_BUILD = {"faiss-hnsw", "hnswlib-hnsw"}
CASES = [
    pytest.param(num_items, batch, method,
                 marks=[pytest.mark.skipif(not NEEDS.get(method, True),
                                           reason=f"{method} is not available here")],
                 id=f"{num_items // 1000}K-B{batch}-{method}")
    for num_items in SIZES for batch in BATCHES for method in METHODS
    if not (num_items > 100_000 and method in SLOW_TO_BUILD)
]


def rounds_for(batch: int, method: str) -> int:
    slow = method.startswith("reference") or method == "numba"
    if batch >= 4096:
        return 2 if slow else 3
    if batch >= 128:
        return 5
    return 30


@pytest.mark.parametrize("num_items,batch,method", CASES)
def test_top10(benchmark, num_items, batch, method):
    items, bias, all_queries, (indptr, indices) = data(num_items)
    queries = all_queries[:batch]
    exclude = (indptr[: batch + 1], indices)
    if method.startswith("reference") and batch * num_items > REFERENCE_MAX_SCORES:
        pytest.skip(f"the reference would materialise {batch * num_items:,} scores")
    benchmark.group = f"top{K_TOP} {num_items // 1000}K items x K={DIM}, batch {batch}"
    info = benchmark.extra_info
    info.update(items=num_items, dim=DIM, batch=batch, method=method,
                threads=torch.get_num_threads())

    if method == "reference":
        fn = lambda: reference_topk(queries, items, bias)  # noqa: E731
    elif method == "reference+exclude":
        fn = lambda: reference_topk_excluding(queries, items, bias, *exclude)  # noqa: E731
    elif method in ("native", "numba"):
        fn = lambda: topk_scores(queries, items, bias, K_TOP, backend=method)  # noqa: E731
        exact_check(fn(), queries, items, bias)
    elif method == "native+exclude":
        fn = lambda: topk_scores(  # noqa: E731
            queries, items, bias, K_TOP, exclude=exclude, backend="native")
        exact_check(fn(), queries, items, bias, exclude)
    elif method == "faiss-flat":
        index = faiss_flat(num_items)
        fn = lambda: index.search(queries, K_TOP)  # noqa: E731
        exact_check(fn(), queries, items, bias)
    else:
        index, build_s = ann_index(num_items, method)
        fn = lambda: index.search(queries, K_TOP)  # noqa: E731
        recall = recall_at_10(fn()[1], queries, items, bias)
        assert recall >= ANN_MIN_RECALL, f"{method} recall@10 {recall:.3f}"
        info.update(recall_at_10=round(recall, 4), build_s=round(build_s, 1),
                    knobs=str(index.knobs))

    benchmark.pedantic(fn, rounds=rounds_for(batch, method), iterations=1, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable: the checks above ran, nothing was timed
        return
    qps = batch / benchmark.stats.stats.mean
    info["queries_per_s"] = round(qps, 1)
    baseline = "reference+exclude" if method.endswith("+exclude") else "reference"
    if method == baseline:
        _REFERENCE_QPS[(num_items, batch, baseline)] = qps
    elif (num_items, batch, baseline) in _REFERENCE_QPS:
        info["vs_reference"] = round(qps / _REFERENCE_QPS[(num_items, batch, baseline)], 2)
