"""The top-k op family and fastmf.retrieval: every top-k backend against the spec
(fastmf.ops.reference.topk).

Most cases use quantised factors (multiples of 1/4, K=8), so every score is exact in any
summation order and ties are everywhere; duplicated item rows plant more. Backends must
then agree with the reference bit for bit, tie order included.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fastmf.ops import native
from fastmf.ops.reference import topk as reference
from fastmf.retrieval import ANNIndex, popular_items, similar, topk_scores
from fastmf.testing import (
    ID_DTYPES,
    WEIGHT_DTYPES,
    make_topk_candidates,
    make_topk_exclude,
    make_topk_items,
    make_topk_queries,
    requires_native,
    requires_numba,
    tolerance,
)

requires_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed (fastmf[ann])"
)
requires_hnswlib = pytest.mark.skipif(
    importlib.util.find_spec("hnswlib") is None, reason="hnswlib is not installed (fastmf[ann])"
)

BACKENDS = [
    pytest.param("native", marks=requires_native),
    pytest.param("numba", marks=requires_numba),
    "reference",
    "auto",
]
FAST_BACKENDS = BACKENDS[:2]


def assert_same_topk(got, expected):
    """Bit-identical scores and indices (the data is exact)."""
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].dtype == torch.int64
    assert torch.equal(got[1], expected[1])


def assert_valid_topk(got, expected, queries, items, bias, exclude=None):
    """For inexact (random float) data: scores close to the reference rank by rank, and each
    returned index scores what is returned for it and is not excluded. Near-ties may order
    differently when the dot products are summed in another order."""
    scores, ids = got
    tol = tolerance(queries.dtype)
    torch.testing.assert_close(scores, expected[0], **tol)
    valid = ids >= 0
    assert torch.equal(valid, expected[1] >= 0)
    rescored = torch.einsum("bk,bjk->bj", queries.double(), items.double()[ids.clamp(min=0)])
    if bias is not None:
        rescored += bias.double()[ids.clamp(min=0)]
    torch.testing.assert_close(scores.double()[valid], rescored[valid], **tol)
    for row in ids:
        kept = row[row >= 0]
        assert kept.unique().numel() == kept.numel()
    if exclude is not None:
        indptr, indices = exclude
        for b in range(ids.shape[0]):
            banned = set(indices[int(indptr[b]) : int(indptr[b + 1])].tolist())
            assert not banned & set(ids[b].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_matches_reference_with_ties(backend, dtype, k):
    items, bias = make_topk_items(1500, dtype=dtype)
    queries = make_topk_queries(70, dtype=dtype)
    expected = reference.topk_scores(queries, items, bias, k)
    assert_same_topk(topk_scores(queries, items, bias, k, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("sort_rows", [False, True], ids=["unsorted", "sorted"])
def test_exclude_and_candidates(backend, id_dtype, k, sort_rows):
    items, bias = make_topk_items(900)
    queries = make_topk_queries(23)
    exclude = make_topk_exclude(23, 900, id_dtype=id_dtype, sort_rows=sort_rows)
    original = exclude[1].clone()
    candidates = make_topk_candidates(900, 400, id_dtype=id_dtype)
    for exclude_csr, cands in ((exclude, None), ((None, None), candidates), (exclude, candidates)):
        kwargs = dict(exclude=exclude_csr if exclude_csr[0] is not None else None,
                      candidates=cands)
        expected = reference.topk_scores(queries, items, bias, k, *exclude_csr, cands)
        got = topk_scores(queries, items, bias, k, backend=backend, **kwargs)
        assert_same_topk(got, expected)
        # The query that excludes every item gets nothing but padding.
        if kwargs["exclude"] is not None:
            assert (got[1][1] == -1).all() and (got[0][1] == float("-inf")).all()
    assert torch.equal(exclude[1], original)  # the caller's rows are not sorted in place


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_above_candidate_count_pads(backend):
    items, bias = make_topk_items(50)
    queries = make_topk_queries(4)
    candidates = torch.tensor([7, 3, 3, 40, 12], dtype=torch.int32)  # 4 unique
    scores, ids = topk_scores(queries, items, bias, 6, candidates=candidates, backend=backend)
    assert (ids[:, 4:] == -1).all() and (scores[:, 4:] == float("-inf")).all()
    assert sorted(ids[0, :4].tolist()) == [3, 7, 12, 40]
    scores, ids = topk_scores(queries, items, bias, 60, backend=backend)
    assert (ids[:, 50:] == -1).all() and (ids[:, :50] >= 0).all()
    assert_same_topk((scores, ids), reference.topk_scores(queries, items, bias, 60))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_random_float_data(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    items = torch.randn(3000, 32, generator=gen, dtype=dtype)
    bias = torch.randn(3000, generator=gen, dtype=dtype)
    queries = torch.randn(130, 32, generator=gen, dtype=dtype)
    exclude = make_topk_exclude(130, 3000)
    expected = reference.topk_scores(queries, items, bias, 20, *exclude)
    got = topk_scores(queries, items, bias, 20, exclude=exclude, backend=backend)
    assert_valid_topk(got, expected, queries, items, bias, exclude)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("batch", [1, 3, 200])
def test_large_item_range_small_batch(backend, batch):
    # Few queries and many items: the kernels split the item range across threads and
    # merge partial heaps.
    items, bias = make_topk_items(40_000, dtype=torch.float64)
    queries = make_topk_queries(batch, dtype=torch.float64)
    exclude = make_topk_exclude(batch, 40_000, max_len=3000)
    for k in (10, 100):
        expected = reference.topk_scores(queries, items, bias, k, *exclude)
        got = topk_scores(queries, items, bias, k, exclude=exclude, backend=backend)
        assert_same_topk(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_nan_scores(backend):
    items, _ = make_topk_items(300, bias=False)
    items[17] = float("nan")
    items[40] = float("-inf")
    queries = make_topk_queries(5)
    queries[:, 0] = 1.0  # makes the -inf row score -inf (or NaN), never +inf
    expected = reference.topk_scores(queries, items, None, 300)
    got = topk_scores(queries, items, None, 300, backend=backend)
    assert_same_topk(got, expected)
    assert (got[1] >= 0).all()  # NaN and -inf items are ranked, not dropped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_empty_inputs(backend, dtype):
    items, bias = make_topk_items(20, dtype=dtype)
    scores, ids = topk_scores(make_topk_queries(0, dtype=dtype), items, bias, 5, backend=backend)
    assert scores.shape == (0, 5) and ids.shape == (0, 5) and scores.dtype == dtype
    empty = torch.zeros(0, 8, dtype=dtype)
    scores, ids = topk_scores(make_topk_queries(3, dtype=dtype), empty, None, 4, backend=backend)
    assert (ids == -1).all() and (scores == float("-inf")).all()
    scores, ids = topk_scores(
        make_topk_queries(3, dtype=dtype), items, bias, 4,
        candidates=torch.zeros(0, dtype=torch.int64), backend=backend,
    )
    assert (ids == -1).all()


# torch's CSR constructor warns that it is in beta and does not check invariants (these
# rows are unsorted on purpose, which torch's invariants forbid).
@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_forms_and_batching(backend):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    items, bias = make_topk_items(400)
    queries = make_topk_queries(37)
    indptr, indices = make_topk_exclude(37, 400, id_dtype=torch.int32)
    expected = reference.topk_scores(queries, items, bias, 10, indptr, indices)
    data = np.ones(indices.shape[0])
    matrix = scipy_sparse.csr_matrix((data, indices.numpy(), indptr.numpy()), shape=(37, 400))
    torch_csr = torch.sparse_csr_tensor(indptr.long(), indices.long(), torch.ones(len(data)),
                                        (37, 400))
    for exclude in ((indptr, indices), matrix, torch_csr):
        for batch_size in (None, 8):
            got = topk_scores(queries, items, bias, 10, exclude=exclude, backend=backend,
                              batch_size=batch_size)
            assert_same_topk(got, expected)


def test_read_only_arrays_are_copied():
    """NumPy ``exclude``/``candidates`` arrays may be read-only (pandas' copy-on-write hands
    such column arrays out): accepted without torch's non-writable-array warning, and left
    as they were."""
    items, bias = make_topk_items(300)
    queries = make_topk_queries(11)
    indptr, indices = make_topk_exclude(11, 300, id_dtype=torch.int64)
    candidates = make_topk_candidates(300, 120, id_dtype=torch.int32)
    expected = reference.topk_scores(queries, items, bias, 7, indptr, indices, candidates)
    arrays = [indptr.numpy().copy(), indices.numpy().copy(), candidates.numpy().copy()]
    before = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = topk_scores(queries, items, bias, 7, exclude=(arrays[0], arrays[1]),
                          candidates=arrays[2])
    assert_same_topk(got, expected)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


@requires_native
def test_native_same_result_alone_or_batched():
    # A query's top-k must not depend on which other queries share the call.
    gen = torch.Generator().manual_seed(9)
    items, bias = torch.randn(20_000, 16, generator=gen), torch.randn(20_000, generator=gen)
    queries = torch.randn(150, 16, generator=gen)
    batched = topk_scores(queries, items, bias, 10, backend="native")
    for b in (0, 77, 149):
        alone = topk_scores(queries[b : b + 1], items, bias, 10, backend="native")
        assert torch.equal(alone[1][0], batched[1][b])
        assert torch.equal(alone[0][0], batched[0][b])


_KERNEL_SET_CHECK = """
import torch
from fastmf.ops.reference import topk as reference
from fastmf.retrieval import topk_scores
from fastmf.testing import (make_topk_candidates, make_topk_exclude, make_topk_items,
                            make_topk_queries)
for dtype in (torch.float32, torch.float64):
    for dim in (5, 37):
        items, bias = make_topk_items(5000, dim, dtype=dtype)
        for batch in (1, 70):
            queries = make_topk_queries(batch, dim, dtype=dtype)
            exclude = make_topk_exclude(batch, 5000)
            candidates = make_topk_candidates(5000, 3000)
            for k in (1, 100):
                got = topk_scores(queries, items, bias, k, exclude=exclude,
                                  candidates=candidates, backend="native")
                want = reference.topk_scores(queries, items, bias, k, *exclude, candidates)
                assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
print("ok")
"""


@requires_native
@pytest.mark.parametrize("kernel_set", ["avx2", "portable"])
def test_lesser_kernel_sets(kernel_set):
    # The CPU picks one kernel set at run time; the others are checked by forcing them in
    # a fresh process (a CPU without the set falls back to the next one down).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTMF_CPU_KERNELS=kernel_set,
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _KERNEL_SET_CHECK], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def bad_inputs():
    items, bias = make_topk_items(10)
    queries = make_topk_queries(3)
    ok_ptr, ok_ind = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 9])
    return [
        ("k0", dict(k=0), ValueError, "k must be positive, got 0"),
        ("kneg", dict(k=-3), ValueError, "k must be positive, got -3"),
        ("cand_range", dict(candidates=torch.tensor([1, 12])), IndexError,
         "fastmf.topk_scores: candidates id 12 out of range [0, 10)"),
        ("cand_negative", dict(candidates=torch.tensor([-1])), IndexError,
         "candidates id -1 out of range [0, 10)"),
        ("cand_float", dict(candidates=torch.tensor([1.0])), TypeError, "int32 or int64"),
        ("excl_range", dict(exclude=(ok_ptr, torch.tensor([0, 10]))), IndexError,
         "fastmf.topk_scores: exclude id 10 out of range [0, 10)"),
        ("indptr_len", dict(exclude=(torch.tensor([0, 1, 2]), ok_ind)), ValueError,
         "exclude_indptr must have one entry per query plus one (4), got 3"),
        ("indptr_span", dict(exclude=(torch.tensor([0, 1, 1, 5]), ok_ind)), ValueError,
         "exclude_indptr spans [0, 5) but exclude_indices has 2 entries"),
        ("indptr_order", dict(exclude=(torch.tensor([0, 2, 1, 2]), ok_ind)), ValueError,
         "exclude_indptr must be non-decreasing"),
        ("dim", dict(queries=make_topk_queries(3, dim=4)), ValueError,
         "queries has dim 4 but item_factors has dim 8"),
        ("bias_len", dict(item_bias=bias[:5]), ValueError,
         "item_bias has 5 rows, item_factors has 10"),
        ("dtype_mix", dict(item_factors=items.double()), TypeError, "dtype"),
        ("int_queries", dict(queries=queries.long()), TypeError, "float32 or float64"),
    ], items, bias, queries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(13))
def test_bad_inputs(backend, case):
    cases, items, bias, queries = bad_inputs()
    _, change, error, message = cases[case]
    args = dict(queries=queries, item_factors=items, item_bias=bias, k=3)
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        topk_scores(args.pop("queries"), args.pop("item_factors"), args.pop("item_bias"),
                    args.pop("k"), backend=backend, **args)


def test_bad_backend_and_exclude_rows():
    items, bias = make_topk_items(10)
    with pytest.raises(ValueError, match="unknown backend"):
        topk_scores(make_topk_queries(2), items, bias, 3, backend="gpu")
    with pytest.raises(ValueError, match="exclude has 3 rows but there are 2 queries"):
        scipy_sparse = pytest.importorskip("scipy.sparse")
        topk_scores(make_topk_queries(2), items, bias, 3, exclude=scipy_sparse.csr_matrix((3, 10)))


@requires_native
def test_opcheck():
    items, bias = make_topk_items(300)
    queries = make_topk_queries(9)
    indptr, indices = make_topk_exclude(9, 300, id_dtype=torch.int32)
    candidates = make_topk_candidates(300, 100)
    op = torch.ops.fastmf.topk_scores.default
    for args in (
        (queries, items, bias, 5, indptr, indices, candidates),
        (queries.double(), items.double(), None, 400, None, None, None),
        (queries.requires_grad_(), items.requires_grad_(), bias.requires_grad_(), 7, None,
         None, None),
    ):
        torch.library.opcheck(op, args)


@requires_native
def test_gradients_match_reference():
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(6, 5, generator=gen, dtype=torch.float64),
               torch.randn(40, 5, generator=gen, dtype=torch.float64),
               torch.randn(40, generator=gen, dtype=torch.float64)]
    exclude = make_topk_exclude(6, 40)
    weights = torch.randn(6, 45, generator=gen, dtype=torch.float64)
    grads = []
    for backend in ("native", "reference"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        scores, _ = topk_scores(*leaves, 45, exclude=exclude, backend=backend)
        (torch.where(torch.isfinite(scores), scores, 0) * weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for fused, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fused, ref)


@requires_native
def test_compile_fullgraph():
    items, bias = make_topk_items(200)
    queries = make_topk_queries(5)

    @torch.compile(fullgraph=True, backend="eager")
    def recommend(q):
        scores, ids = native.topk_scores(q * 2, items, bias, 7, None, None, None)
        return scores + 1, ids

    got = recommend(queries)
    expected = reference.topk_scores(queries * 2, items, bias, 7)
    assert_same_topk((got[0] - 1, got[1]), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_similar(backend, metric):
    gen = torch.Generator().manual_seed(6)
    vectors = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    vectors[5] = vectors[3] * 2  # cosine 1 with row 3
    vectors[8] = 0  # a zero row: cosine 0 to everything
    query_ids = torch.tensor([3, 8, 299, 3])
    scores, ids = similar(vectors, query_ids, 5, metric, backend=backend)
    table = vectors if metric == "dot" else torch.nn.functional.normalize(vectors, dim=1)
    full = table[query_ids] @ table.T
    full[torch.arange(4), query_ids] = float("-inf")
    for b in range(4):
        assert query_ids[b].item() not in ids[b].tolist()
        torch.testing.assert_close(scores[b], full[b].sort(descending=True).values[:5])
    if metric == "cosine":
        assert ids[0, 0] == 5
        torch.testing.assert_close(scores[1], torch.zeros(5, dtype=torch.float64))
        assert ids[1].tolist() == [0, 1, 2, 3, 4]  # all tie at 0: lowest indices
    with pytest.raises(IndexError, match="query_ids id 300 out of range"):
        similar(vectors, [300], 5, metric, backend=backend)
    with pytest.raises(ValueError, match="unknown metric"):
        similar(vectors, [0], 5, "l2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_popular_items(backend):
    counts = torch.tensor([5, 9, 1, 9, 0, 7, 9, 2])
    scores, ids = popular_items(counts, 4, backend=backend)
    assert ids.tolist() == [1, 3, 6, 5]
    assert scores.tolist() == [9.0, 9.0, 9.0, 7.0]
    exclude = (torch.tensor([0, 2, 2, 10]), torch.tensor([3, 1, 0, 1, 2, 3, 4, 5, 6, 7]))
    scores, ids = popular_items(counts.numpy(), 3, exclude, backend=backend)
    assert ids.tolist() == [[6, 5, 0], [1, 3, 6], [-1, -1, -1]]
    assert scores[2].tolist() == [float("-inf")] * 3
    assert popular_items([4, 4], 3)[1].tolist() == [0, 1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_popular_items_checks_its_exclusion_csr(backend):
    counts = [5, 9, 1, 9]
    with pytest.raises(ValueError, match="popular_items: exclude_indptr must be non-decreasing, "
                                         "got 2 then 1 at query 1"):
        popular_items(counts, 2, (torch.tensor([0, 2, 1]), torch.tensor([1, 3])),
                      backend=backend)
    with pytest.raises(ValueError, match=r"popular_items: exclude_indptr spans \[0, 5\) but "
                                         "exclude_indices has 2 entries"):
        popular_items(counts, 2, (torch.tensor([0, 1, 5]), torch.tensor([1, 3])),
                      backend=backend)
    with pytest.raises(IndexError, match="popular_items: exclude id 4 out of range"):
        popular_items(counts, 2, (torch.tensor([0, 1]), torch.tensor([4])), backend=backend)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_vectors_are_scored_in_float32(backend, half):
    """A half-precision model's vectors (SVD++, Item2Vec train them): the same ranking as
    their float32 values, scores in float32."""
    items, bias = make_topk_items(50, 8, seed=3)
    queries = make_topk_queries(6, 8, seed=4)
    items, bias, queries = (t.to(half) for t in (items, bias, queries))
    got = topk_scores(queries, items, bias, 7, backend=backend)
    want = topk_scores(queries.float(), items.float(), bias.float(), 7, backend=backend)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    got = similar(items, [0, 5], 4, backend=backend)
    want = similar(items.float(), [0, 5], 4, backend=backend)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def recall_at(found, exact):
    hits = sum(len(set(f.tolist()) & set(e.tolist()) - {-1}) for f, e in zip(found, exact,
                                                                             strict=True))
    return hits / int((exact >= 0).sum())


ANN_CASES = [
    pytest.param("faiss", "hnsw", dict(ef_search=64), 0.9, marks=requires_faiss),
    pytest.param("faiss", "ivf", dict(nprobe=8), 0.6, marks=requires_faiss),
    pytest.param("faiss", "flat", {}, 1.0, marks=requires_faiss),
    pytest.param("hnswlib", "hnsw", dict(ef_search=64), 0.9, marks=requires_hnswlib),
]


@pytest.mark.parametrize("backend,index,knobs,min_recall", ANN_CASES)
def test_ann_recall(backend, index, knobs, min_recall):
    gen = torch.Generator().manual_seed(8)
    items = torch.randn(4000, 16, generator=gen)
    bias = torch.randn(4000, generator=gen) * 0.5
    queries = torch.randn(100, 16, generator=gen)
    exclude = make_topk_exclude(100, 4000)
    ann = ANNIndex(items, bias, backend=backend, index=index, **knobs)
    exact = topk_scores(queries, items, bias, 10, exclude=exclude)
    scores, ids = ann.search(queries, 10, exclude=exclude)
    assert ids.shape == (100, 10) and ids.dtype == torch.int64
    assert recall_at(ids, exact[1]) >= min_recall
    # Scores are exact for what was found, and no excluded item comes back.
    assert_valid_topk((scores[2:], ids[2:]), (scores[2:], ids[2:]), queries[2:], items, bias)
    for b in range(100):
        banned = set(exclude[1][int(exclude[0][b]) : int(exclude[0][b + 1])].tolist())
        assert not banned & set(ids[b].tolist())
    assert (ids[1] == -1).all()  # the query that excludes everything
    if index == "flat":
        torch.testing.assert_close(scores, exact[0], **tolerance(torch.float32))


@requires_faiss
def test_ann_knobs_and_errors():
    items = torch.randn(500, 8)
    ann = ANNIndex(items, backend="faiss", index="hnsw", ef_search=16)
    ann.ef_search = 200
    assert ann.ef_search == 200 and ann._index.hnsw.efSearch == 200
    with pytest.raises(AttributeError, match="nprobe is an IVF knob"):
        ann.nprobe = 3
    ivf = ANNIndex(items, backend="faiss", index="ivf", nlist=8, nprobe=1)
    ivf.nprobe = 8  # every list: exact
    assert ivf.nprobe == 8 and ivf._index.nprobe == 8
    queries = torch.randn(4, 8)
    assert torch.equal(ivf.search(queries, 5)[1], topk_scores(queries, items, None, 5)[1])
    with pytest.raises(TypeError, match="unknown knobs"):
        ANNIndex(items, backend="faiss", index="hnsw", nprobe=3)
    with pytest.raises(ValueError, match="has no index"):
        ANNIndex(items, backend="hnswlib", index="ivf")
    assert ANNIndex(items[:3], backend="faiss", index="flat").search(
        torch.randn(2, 8), 5)[1][:, 3:].eq(-1).all()


def test_ann_missing_dependency_message(monkeypatch):
    import fastmf.retrieval.ann as ann

    monkeypatch.setitem(ann._MODULES, "faiss", "fastmf_no_such_module")
    with pytest.raises(ImportError, match=r"pip install fastmf\[ann\]"):
        ANNIndex(torch.randn(10, 4), backend="faiss")


# The knobs' checks run right after the knobs are merged, before the backend is imported:
# these tests run without faiss or hnswlib. (knob, bad value, error, what the message says)
BAD_ANN_KNOBS = [
    ("M", 0, ValueError, "M must be an int >= 2, got 0"),
    ("M", 1, ValueError, "M must be an int >= 2, got 1"),
    ("M", -1, ValueError, "M must be an int >= 2, got -1"),
    ("M", 16.0, TypeError, "M must be an int >= 2, got float 16.0"),
    ("M", True, TypeError, "M must be an int >= 2, got bool True"),
    ("M", 1 << 31, ValueError, f"M must fit in a C int (at most {(1 << 31) - 1}), got "
                               f"{1 << 31}"),
    ("ef_construction", 0, ValueError, "ef_construction must be an int >= 1, got 0"),
    ("ef_construction", None, TypeError, "ef_construction must be an int >= 1, got NoneType"),
    ("ef_search", 0, ValueError, "ef_search must be an int >= 1, got 0"),
    ("ef_search", -1, ValueError, "ef_search must be an int >= 1, got -1"),
    ("ef_search", "a", TypeError, "ef_search must be an int >= 1, got str 'a'"),
    ("ef_search", np.float64(64.0), TypeError, "ef_search must be an int >= 1, got float64"),
    ("nlist", 0, ValueError, "nlist must be None (4·√I lists) or an int >= 1, got 0"),
    ("nlist", -3, ValueError, "nlist must be None (4·√I lists) or an int >= 1, got -3"),
    ("nlist", 8.5, TypeError, "nlist must be None (4·√I lists) or an int >= 1, got float"),
    ("nprobe", 0, ValueError, "nprobe must be an int >= 1, got 0"),
    ("nprobe", -1, ValueError, "nprobe must be an int >= 1, got -1"),
    ("nprobe", 2.7, TypeError, "nprobe must be an int >= 1, got float 2.7"),
    ("num_threads", 1.5, TypeError, "num_threads must be an int, got float 1.5"),
]
ANN_KNOB_KINDS = {  # the (backend, index) pairs that take each knob
    "M": [("faiss", "hnsw"), ("hnswlib", "hnsw")],
    "ef_construction": [("faiss", "hnsw"), ("hnswlib", "hnsw")],
    "ef_search": [("faiss", "hnsw"), ("hnswlib", "hnsw")],
    "nlist": [("faiss", "ivf")],
    "nprobe": [("faiss", "ivf")],
    "num_threads": [("hnswlib", "hnsw")],
}


class _UntouchableIndex:
    """Stands in for a backend's index: a check that lets a bad value through fails here
    instead of reaching faiss (where M=0 aborts the process and M=1 crashes it)."""

    def __getattr__(self, name):
        raise AssertionError(f"the index was touched ({name}) before the arguments were checked")

    def __setattr__(self, name, value):
        raise AssertionError(f"the index was touched ({name}) before the arguments were checked")


@pytest.fixture
def ann_without_backend(monkeypatch):
    """ANNIndex with neither faiss nor hnswlib imported: builds an _UntouchableIndex."""
    import fastmf.retrieval.ann as ann

    monkeypatch.setattr(ann, "_import", lambda backend: None)
    monkeypatch.setattr(ann.ANNIndex, "_build", lambda self, data: _UntouchableIndex())


@pytest.mark.parametrize("backend,index,name,value,error,message", [
    pytest.param(backend, index, name, value, error, message,
                 id=f"{backend}-{index}-{name}={value!r}")
    for name, value, error, message in BAD_ANN_KNOBS
    for backend, index in ANN_KNOB_KINDS[name]
])
def test_ann_bad_knobs(ann_without_backend, backend, index, name, value, error, message):
    items = torch.randn(60, 6, generator=torch.Generator().manual_seed(31))
    with pytest.raises(error, match=re.escape(f"fastmf.ANNIndex: {message}")):
        ANNIndex(items, backend=backend, index=index, **{name: value})


@pytest.mark.parametrize("backend,index,name", [
    ("faiss", "hnsw", "ef_search"), ("hnswlib", "hnsw", "ef_search"), ("faiss", "ivf", "nprobe")
])
def test_ann_bad_knob_setters(ann_without_backend, backend, index, name):
    items = torch.randn(60, 6, generator=torch.Generator().manual_seed(32))
    ann = ANNIndex(items, backend=backend, index=index)
    before = dict(ann.knobs)
    for knob, value, error, message in BAD_ANN_KNOBS:
        if knob == name:
            with pytest.raises(error, match=re.escape(f"fastmf.ANNIndex: {message}")):
                setattr(ann, name, value)
            assert ann.knobs == before


def test_ann_knobs_accepted_and_knobs_of_other_kinds(ann_without_backend):
    items = torch.randn(60, 6, generator=torch.Generator().manual_seed(33))
    ann = ANNIndex(items, backend="faiss", index="hnsw", M=np.int64(2), ef_construction=1,
                   ef_search=np.int32(1))
    assert ann.knobs == {"M": 2, "ef_construction": 1, "ef_search": 1}
    assert all(type(v) is int for v in ann.knobs.values())
    ann = ANNIndex(items, backend="faiss", index="ivf", nlist=None, nprobe=1)
    assert ann.knobs == {"nlist": None, "nprobe": 1}
    ann = ANNIndex(items, backend="hnswlib", index="hnsw", num_threads=-1)
    assert ann.knobs["num_threads"] == -1
    # A knob the index does not take is refused as unknown, whatever its value; the
    # attribute of another kind's knob stays an AttributeError.
    with pytest.raises(TypeError, match=re.escape("unknown knobs ['M'] for faiss flat")):
        ANNIndex(items, backend="faiss", index="flat", M=0)
    with pytest.raises(TypeError, match=re.escape("unknown knobs ['ef_search'] for faiss ivf")):
        ANNIndex(items, backend="faiss", index="ivf", ef_search=0)
    with pytest.raises(TypeError, match=re.escape("unknown knobs ['nprobe'] for hnswlib hnsw")):
        ANNIndex(items, backend="hnswlib", index="hnsw", nprobe=-1)
    with pytest.raises(AttributeError, match="ef_search is an HNSW knob; this is flat"):
        ANNIndex(items, backend="faiss", index="flat").ef_search = 0
    with pytest.raises(AttributeError, match="nprobe is an IVF knob; this is hnsw"):
        ANNIndex(items, backend="hnswlib", index="hnsw").nprobe = 0


def bad_exclusions(batch, num_items, seed):
    """(indptr, indices) pairs topk_scores refuses, with random ids where they are valid:
    an id past the end or negative (which would alias another query's row), a decreasing
    indptr, an indptr past the indices, one row pointer too few."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_items, size=3 * batch)
    indptr = np.sort(rng.integers(1, len(ids), size=batch - 1))
    indptr = np.concatenate([[0], indptr, [len(ids)]])
    for b, bad in ((1, num_items + 39), (batch - 1, -12)):
        wrong = ids.copy()
        wrong[indptr[b]] = bad
        yield indptr, wrong
    decreasing = indptr.copy()
    decreasing[1], decreasing[2] = indptr[2] + 1, indptr[2]
    yield decreasing, ids
    past = indptr.copy()
    past[-1] = len(ids) + 4
    yield past, ids
    yield indptr[:-1], ids


@pytest.mark.parametrize("backend,index", [
    pytest.param(None, None, id="no-backend"),
    pytest.param("faiss", "flat", marks=requires_faiss),
    pytest.param("faiss", "hnsw", marks=requires_faiss),
    pytest.param("hnswlib", "hnsw", marks=requires_hnswlib),
])
def test_ann_checks_its_exclusion_csr_as_topk_scores(request, backend, index):
    """ANNIndex.search refuses the exclusion CSRs topk_scores refuses, with the same error."""
    if backend is None:
        request.getfixturevalue("ann_without_backend")
    gen = torch.Generator().manual_seed(34)
    items, bias = torch.randn(40, 6, generator=gen), torch.randn(40, generator=gen)
    queries = torch.randn(5, 6, generator=gen)
    ann = ANNIndex(items, bias, backend=backend or "faiss", index=index or "flat")
    for indptr, indices in bad_exclusions(5, 40, seed=35):
        for dtype in (torch.int32, torch.int64):
            exclude = (torch.from_numpy(indptr).to(dtype), torch.from_numpy(indices).to(dtype))
            with pytest.raises((IndexError, ValueError)) as want:
                topk_scores(queries, items, bias, 4, exclude=exclude)
            message = str(want.value).replace("fastmf.topk_scores:", "fastmf.ANNIndex:")
            assert message.startswith("fastmf.ANNIndex:")
            with pytest.raises(want.type, match=re.escape(message)):
                ann.search(queries, 4, exclude=exclude)


@pytest.mark.parametrize("backend", [
    pytest.param("faiss", marks=requires_faiss),
    pytest.param("hnswlib", marks=requires_hnswlib),
])
def test_ann_hnsw_k_above_ef_search(backend):
    """k (plus the longest exclusion row) above ef_search: full rows, not rows padded with
    -1 after ef_search results; ef_search itself is left as set. Asked for every item, the
    search (ef raised to 300) finds them all: the exact ranking, up to near-ties."""
    gen = torch.Generator().manual_seed(36)
    items, bias = torch.randn(300, 8, generator=gen), torch.randn(300, generator=gen) * 0.5
    queries = torch.randn(7, 8, generator=gen)
    ann = ANNIndex(items, bias, backend=backend, index="hnsw", ef_search=16)
    exclude = make_topk_exclude(7, 300, seed=37, max_len=60)
    for k, ex in ((300, None), (200, None), (180, exclude), (100, None)):
        scores, ids = ann.search(queries, k, exclude=ex)
        want = topk_scores(queries, items, bias, k, exclude=ex)
        assert ids.shape == (7, k)
        # Full rows where the exact top-k has them (row 1 of ``exclude`` bans every item),
        # each score exact for its item, nothing excluded.
        assert torch.equal(ids >= 0, want[1] >= 0)
        assert (ids[torch.arange(7) != 1] >= 0).all()
        assert_valid_topk((scores, ids), (scores, ids), queries, items, bias, ex)
        if k == 300:  # every item, ranked as the exact path ranks them
            assert torch.equal(ids.sort(1).values, torch.arange(300).expand(7, 300))
            assert_valid_topk((scores, ids), want, queries, items, bias)
        else:
            assert recall_at(ids, want[1]) >= 0.98
        assert ann.ef_search == 16
        if backend == "faiss":
            assert ann._index.hnsw.efSearch == 16
