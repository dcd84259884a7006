"""fastmf.nn.Embedding / EmbeddingBag and the embedding_bag ops: every backend against the
reference and against textbook PyTorch (nn.Embedding / nn.EmbeddingBag with sparse=True and
identical initial weights), on Zipf ids with many duplicates."""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmf
from fastmf.nn.embedding import embedding_kernels
from fastmf.ops import reference
from fastmf.ops.codes import Optimizer, Pooling, WeightDecay
from fastmf.testing import (
    BACKENDS,
    BATCH_SIZES,
    DEVICES,
    ID_DTYPES,
    idfn,
    requires_native,
    tolerance,
    zipf_ids,
)

N, K = 60, 8
RATINGS = Path("/work/shared/data/ml-latest-small/ratings.csv")


def _rng(seed):
    return np.random.default_rng(seed)


def _bags(batch, *, seed, id_dtype=torch.int64, max_size=6, num_rows=N):
    """(ids (L,), starts (B,)): Zipf ids in bags of 0..max_size ids (empty bags included)."""
    rng = _rng(seed)
    sizes = rng.integers(0, max_size + 1, size=batch)
    if batch > 2:
        sizes[1] = 0  # always at least one empty bag
    ids = zipf_ids(num_rows, int(sizes.sum()), generator=rng, dtype=id_dtype)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if batch else np.zeros(0)
    return ids, torch.from_numpy(starts.astype(np.int64)).to(id_dtype)


def _pair(cls_name, backend, *, mode="sum", include_last_offset=False, dtype=torch.float32):
    """(fastmf module, torch module) with identical weights."""
    torch.manual_seed(0)
    if cls_name == "Embedding":
        ours = fastmf.nn.Embedding(N, K, backend=backend, dtype=dtype)
        theirs = torch.nn.Embedding(N, K, sparse=True, dtype=dtype)
    else:
        ours = fastmf.nn.EmbeddingBag(N, K, mode, include_last_offset=include_last_offset,
                                      backend=backend, dtype=dtype)
        theirs = torch.nn.EmbeddingBag(N, K, mode=mode, sparse=True,
                                       include_last_offset=include_last_offset, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    return ours, theirs


def _dense(grad):
    return grad.coalesce().to_dense()


# --- forward and gradients vs torch ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("shape", ["1d", "2d"])
def test_embedding_matches_torch(backend, id_dtype, batch, shape):
    ours, theirs = _pair("Embedding", backend)
    ids = zipf_ids(N, batch * 3 if shape == "2d" else batch, generator=_rng(batch),
                   dtype=id_dtype)
    if shape == "2d":
        ids = ids.view(batch, 3)
    out_ours, out_theirs = ours(ids), theirs(ids)
    assert out_ours.shape == (*ids.shape, K) and out_ours.dtype == torch.float32
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=0)
    upstream = torch.randn(out_theirs.shape)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    g = ours.weight.grad
    assert g.is_sparse and (batch <= 1 or not g.is_coalesced())
    assert torch.equal(g._indices()[0], ids.reshape(-1).long())  # one row per id
    torch.testing.assert_close(_dense(g), _dense(theirs.weight.grad), **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("form", ["offsets", "last_offset", "2d", "weighted", "mean",
                                  "mean_2d", "weighted_2d"])
def test_embedding_bag_matches_torch(backend, id_dtype, batch, form):
    mode = "mean" if form.startswith("mean") else "sum"
    ours, theirs = _pair("EmbeddingBag", backend, mode=mode,
                         include_last_offset=form == "last_offset")
    psw = None
    if form in ("2d", "mean_2d", "weighted_2d"):
        ids = zipf_ids(N, batch * 4, generator=_rng(batch), dtype=id_dtype).view(batch, 4)
        offsets = None
        if form == "weighted_2d":
            psw = torch.rand(batch, 4) + 0.5
    else:
        ids, offsets = _bags(batch, seed=batch, id_dtype=id_dtype)
        if form == "last_offset":
            offsets = torch.cat([offsets, torch.tensor([ids.numel()], dtype=id_dtype)])
        if form == "weighted":
            psw = torch.rand(ids.numel()) + 0.5
    psw_ours = None if psw is None else psw.clone().requires_grad_()
    psw_theirs = None if psw is None else psw.clone().requires_grad_()
    out_ours = ours(ids, offsets, psw_ours)
    out_theirs = theirs(ids, offsets, per_sample_weights=psw_theirs)
    torch.testing.assert_close(out_ours, out_theirs, **tolerance(torch.float32))
    upstream = torch.randn(out_theirs.shape)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    torch.testing.assert_close(_dense(ours.weight.grad), _dense(theirs.weight.grad),
                               **tolerance(torch.float32))
    if psw is not None:
        torch.testing.assert_close(psw_ours.grad, psw_theirs.grad, **tolerance(torch.float32))


def test_include_last_offset_ignores_trailing_ids_like_torch():
    ours, theirs = _pair("EmbeddingBag", "reference", include_last_offset=True)
    ids, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3])
    torch.testing.assert_close(ours(ids, offsets), theirs(ids, offsets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_table_dtypes(dtype):
    """Half tables keep their dtype and give float32 outputs (the lookup sums in float32);
    float64 tables give float64."""
    ours = fastmf.nn.EmbeddingBag(N, K, dtype=dtype)
    assert ours.weight.dtype == dtype
    ids, offsets = _bags(7, seed=3)
    out = ours(ids, offsets)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype
    wide = ours.weight.detach().to(expected_dtype)
    expected = torch.nn.functional.embedding_bag(ids, wide, offsets, mode="sum")
    torch.testing.assert_close(out, expected, **tolerance(expected_dtype))
    out.sum().backward()
    assert ours.weight.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=idfn)
@pytest.mark.parametrize("form", ["sum", "weighted", "mean"])
@pytest.mark.parametrize("dim", [K, 37])
def test_bags_of_one_id_match_the_bag_loop(backend, dtype, form, dim):
    """Offsets 0, 1, ..., B (every Embedding lookup): the kernels gather rows instead of
    running the bag loop. Same bits as the reference and as the same bags followed by an
    empty one (which takes the bag loop), with -0.0 rows, per-sample weights and MEAN; 37
    columns leave a tail past the 8-wide vectors (float16 on F16C)."""
    rng = _rng(11)
    ids = zipf_ids(N, 300, generator=rng)
    weight = torch.from_numpy(rng.standard_normal((N, dim))).to(dtype)
    weight[3, :2] = -0.0  # 0 + (-0.0) is +0.0, as the bag loop's sum from zero gives
    ids[:5] = 3
    offsets = torch.arange(ids.numel() + 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    psw = torch.from_numpy(rng.random(ids.numel()) + 0.5).to(acc) if form == "weighted" \
        else None
    pooling = "mean" if form == "mean" else "sum"
    k = embedding_kernels(backend, torch.device("cpu"))
    got = k.embedding_bag_forward(weight, ids, offsets, psw, pooling)
    assert torch.equal(got, reference.embedding_bag_forward(weight, ids, offsets, psw, pooling))
    looped = k.embedding_bag_forward(weight, ids, torch.cat([offsets, offsets[-1:]]), psw,
                                     pooling)
    assert torch.equal(got, looped[:-1]) and not looped[-1].any()
    assert got[0, :2].eq(0).all() and not got[0, :2].signbit().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=idfn)
@pytest.mark.parametrize("form", ["sum", "weighted", "mean"])
def test_width_one_bags_match_reference(backend, dtype, form):
    """Bags over a one-column table (a bias), which the native kernel sums with the width
    known at compile time: the reference's bits, empty bags included."""
    rng = _rng(12)
    ids, starts = _bags(500, seed=12)
    offsets = torch.cat([starts, torch.tensor([ids.numel()])])
    weight = torch.from_numpy(rng.standard_normal((N, 1))).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    psw = torch.from_numpy(rng.random(ids.numel()) + 0.5).to(acc) if form == "weighted" \
        else None
    pooling = "mean" if form == "mean" else "sum"
    got = embedding_kernels(backend, torch.device("cpu")).embedding_bag_forward(
        weight, ids, offsets, psw, pooling)
    assert got.shape == (500, 1)
    assert torch.equal(got, reference.embedding_bag_forward(weight, ids, offsets, psw, pooling))
    assert got.ne(0).any()


def test_reference_forward_sums_in_index_order():
    """The spec's float32 sum runs j ascending: bit-equal to a plain loop."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(N, K, generator=gen) * torch.logspace(-4, 4, K)
    ids, offsets = _bags(9, seed=9)
    offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
    psw = torch.rand(ids.numel(), generator=gen)
    out = reference.embedding_bag_forward(weight, ids, offsets, psw, "sum")
    for b in range(9):
        acc = torch.zeros(K)
        for j in range(int(offsets[b]), int(offsets[b + 1])):
            acc = acc + psw[j] * weight[ids[j]]
        assert torch.equal(out[b], acc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_of_special_values_matches_reference(backend, dtype):
    """An SGD step on half rows that land on values stochastic rounding leaves to round to
    nearest (NaN, infinity, float16's subnormals and |v| >= 65504, bfloat16's carry to
    infinity) beside ordinary ones, in every 64-wide block and in the tail: the same bits
    as the reference (NaN for NaN)."""
    k = embedding_kernels(backend, "cpu")
    gen = torch.Generator().manual_seed(7)
    rows, dim = 12, 150
    target = torch.randn(rows, dim, generator=gen) * 0.05
    big = 65500.0 if dtype == torch.float16 else 3.3e38
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e-6, -5e-5, 2.0 ** -14,
                            -(2.0 ** -15), big, -big, 65519.0, 1e-40, -0.0])
    cols = torch.randperm(dim, generator=gen)[:special.numel()]
    for r in range(0, rows, 2):  # special values in half the rows, spread over the blocks
        target[r, cols] = special
    weight = (torch.randn(rows, dim, generator=gen) * 0.05).to(dtype)
    ids = torch.arange(rows)
    # SGD with lr 1: the new row is w - g, so g = w - target lands it on the target values
    # before rounding (inf - finite stays inf; NaN stays NaN).
    grad = weight.float() - target
    settings = (Optimizer.SGD, 1.0, 0.0, 0.9, 0.999, 1e-8, WeightDecay.NONE, 5, 3, True)
    got, want = weight.clone(), weight.clone()
    k.sparse_update(got, None, None, ids, grad, *settings)
    reference.sparse_update(want, None, None, ids, grad, *settings)
    # NaN payloads aside (torch's bfloat16 conversion keeps them, the kernels write the
    # canonical 0x7FC0), the same bits.
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and bool(nan.any())
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert got.float().isinf().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", list(Optimizer))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pooling", list(Pooling))
def test_backward_update_equals_composition(backend, optimizer, dtype, pooling):
    """embedding_bag_backward_update == sparse_update(embedding_bag_backward(...)), bit for
    bit, states included (stochastic rounding on for half tables)."""
    k = embedding_kernels(backend, "cpu")
    gen = torch.Generator().manual_seed(int(optimizer) * 10 + int(pooling))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.randn(N, K, generator=gen) * 0.1).to(dtype)
    ids, starts = _bags(40, seed=int(optimizer))
    offsets = torch.cat([starts, torch.tensor([ids.numel()])])
    psw = torch.rand(ids.numel(), generator=gen, dtype=acc) if pooling == Pooling.SUM else None
    grad_output = torch.randn(40, K, generator=gen, dtype=acc)
    shapes = fastmf.ops.checks.row_state_shapes(optimizer, weight)
    states = [None if s is None else torch.rand(s, generator=gen, dtype=acc) for s in shapes]
    settings = (optimizer, 0.05, 1e-3, 0.8, 0.95, 0.01, WeightDecay.L2, 3, 77, True)
    w1, s1 = weight.clone(), [None if s is None else s.clone() for s in states]
    k.embedding_bag_backward_update(w1, *s1, grad_output, ids, offsets, psw, pooling, *settings)
    w2, s2 = weight.clone(), [None if s is None else s.clone() for s in states]
    rows = k.embedding_bag_backward(grad_output, ids, offsets, psw, pooling)
    k.sparse_update(w2, *s2, ids, rows, *settings)
    assert not torch.equal(w1, weight)
    assert torch.equal(w1, w2)
    for a, b in zip(s1, s2):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", list(Optimizer))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=idfn)
@pytest.mark.parametrize("pooling", list(Pooling))
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
def test_backward_update_pair_equals_two_updates(backend, optimizer, dtype, pooling,
                                                 id_dtype):
    """embedding_bag_backward_update_pair (a table and a one-column table over the same
    bags, as Hybrid's table and bias) == embedding_bag_backward_update on each, bit for bit,
    states included, each table with its own step, seed and rounding; on Zipf bags with
    empty bags, a row hit past kHotChunk (2048) times, and an empty batch."""
    k = embedding_kernels(backend, "cpu")
    rng = _rng(int(optimizer) * 7 + int(pooling))
    gen = torch.Generator().manual_seed(int(optimizer) * 7 + int(pooling))
    acc, num_rows = torch.float32, 400
    settings = (optimizer, 0.05, 1e-3, 0.8, 0.95, 0.01, WeightDecay.L2)

    def table(dim):
        weight = (torch.randn(num_rows, dim, generator=gen) * 0.1).to(dtype)
        shapes = fastmf.ops.checks.row_state_shapes(optimizer, weight)
        return [weight] + [None if s is None else torch.rand(s, generator=gen, dtype=acc)
                           for s in shapes]

    def copy(t):
        return [None if x is None else x.clone() for x in t]

    bag_sizes = rng.integers(0, 13, size=600)  # about 3,600 ids, 2,100 of them row 5
    bag_sizes[1] = 0
    n = int(bag_sizes.sum())
    all_ids = zipf_ids(num_rows, n, generator=rng, dtype=id_dtype)
    all_ids[torch.from_numpy(rng.permutation(n)[:2100])] = 5
    assert n > 3000 and len(all_ids.unique()) > 100
    for ids, sizes in ((all_ids, bag_sizes), (all_ids[:0], np.zeros(3, np.int64))):
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])).to(id_dtype)
        psw = torch.rand(len(ids), generator=gen, dtype=acc) if pooling == Pooling.SUM \
            else None
        bags = (ids, offsets, psw, pooling)
        a, b = table(K), table(1)
        grad_a = torch.randn(len(sizes), K, generator=gen, dtype=acc)
        grad_b = torch.randn(len(sizes), 1, generator=gen, dtype=acc)
        pair_a, pair_b = copy(a), copy(b)
        k.embedding_bag_backward_update_pair(*pair_a, grad_a, *pair_b, grad_b, *bags,
                                             *settings, 3, 77, True, 4, 78, False)
        one_a, one_b = copy(a), copy(b)
        k.embedding_bag_backward_update(*one_a, grad_a, *bags, *settings, 3, 77, True)
        k.embedding_bag_backward_update(*one_b, grad_b, *bags, *settings, 4, 78, False)
        assert torch.equal(pair_a[0], a[0]) == (len(ids) == 0)
        for got, want in zip(pair_a + pair_b, one_a + one_b):
            assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_update_pair_checks_both_tables_first(backend):
    """Bad input to either table of the pair: a clear error, and neither table written."""
    k = embedding_kernels(backend, "cpu")
    gen = torch.Generator().manual_seed(5)
    ids, starts = _bags(30, seed=5)
    offsets = torch.cat([starts, torch.tensor([ids.numel()])])
    settings = (Optimizer.ADAGRAD, 0.05, 1e-3, 0.9, 0.999, 0.0, WeightDecay.NONE)
    weight, state = torch.rand(N, K, generator=gen), torch.rand(N, K, generator=gen)
    bias, bias_state = torch.rand(N, 1, generator=gen), torch.rand(N, 1, generator=gen)
    grad, grad_b = torch.randn(30, K, generator=gen), torch.randn(30, 1, generator=gen)
    before = [t.clone() for t in (weight, state, bias, bias_state)]
    cases = [
        ((weight, state, None, grad, bias, bias_state, None, grad_b[:5]), "grad_output"),
        ((weight, state, None, grad, bias, None, None, grad_b), "state1"),
        ((weight, state, None, grad, torch.rand(N + 1, 1), torch.rand(N + 1, 1), None, grad_b),
         r"weight has 60 rows, weight_b 61; the bags index both"),
        ((weight, state, None, grad, weight, state, None, grad), "shares memory with"),
        ((weight, state, None, grad, bias, state[:, :1], None, grad_b),
         "state1_b shares memory with state1"),
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            k.embedding_bag_backward_update_pair(*tensors, ids, offsets, None, Pooling.SUM,
                                                 *settings, 1, 0, False, 1, 0, False)
        for t, b in zip((weight, state, bias, bias_state), before):
            assert torch.equal(t, b)
    bad = ids.clone()
    bad[-1] = N
    with pytest.raises(IndexError, match="out of range"):
        k.embedding_bag_backward_update_pair(weight, state, None, grad, bias, bias_state, None,
                                             grad_b, bad, offsets, None, Pooling.SUM,
                                             *settings, 1, 0, False, 1, 0, False)
    for t, b in zip((weight, state, bias, bias_state), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("optimizer", list(Optimizer))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=idfn)
@pytest.mark.parametrize("kind", ["sparse_update", "bag_sum", "bag_mean"])
def test_width_one_tables_match_reference(backend, optimizer, dtype, kind):
    """Tables of one column (biases: 1-D for sparse_update, (N, 1) for the bag update),
    which the native kernels step with the width known at compile time: the reference's
    numbers, states included, on Zipf ids with a row hit past kHotChunk (2048) times."""
    k = embedding_kernels(backend, "cpu")
    rng = _rng(int(optimizer) + 200)
    gen = torch.Generator().manual_seed(int(optimizer) + 200)
    acc, num_rows, n = torch.float32, 500, 5000
    ids = zipf_ids(num_rows, n, generator=rng)
    ids[rng.permutation(n)[:2500]] = 3
    shape = (num_rows,) if kind == "sparse_update" else (num_rows, 1)
    weight = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    shapes = fastmf.ops.checks.row_state_shapes(optimizer, weight)
    states = [None if s is None else torch.rand(s, generator=gen, dtype=acc) for s in shapes]
    settings = (optimizer, 0.05, 1e-3, 0.8, 0.95, 0.01, WeightDecay.L2, 3, 77, True)
    if kind == "sparse_update":
        grad = torch.randn(n, generator=gen, dtype=acc)
        args = (ids, grad)
    else:
        starts = np.sort(rng.choice(np.arange(1, n), 1500, replace=False))
        offsets = torch.from_numpy(np.concatenate([[0], starts, [n]]))
        pooling = Pooling.SUM if kind == "bag_sum" else Pooling.MEAN
        psw = torch.rand(n, generator=gen, dtype=acc) if pooling == Pooling.SUM else None
        grad = torch.randn(len(offsets) - 1, 1, generator=gen, dtype=acc)
        args = (grad, ids, offsets, psw, pooling)

    def run(kernels):
        w, st = weight.clone(), [None if s is None else s.clone() for s in states]
        if kind == "sparse_update":
            kernels.sparse_update(w, *st, *args, *settings)
        else:
            kernels.embedding_bag_backward_update(w, *st, *args, *settings)
        return w, st

    (w, st), (w_ref, st_ref) = run(k), run(reference)
    assert not torch.equal(w, weight)
    # A bfloat16 row: one (stochastic) rounding of the float32 step.
    tol = tolerance(acc) if dtype == acc else dict(rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(w.float(), w_ref.float(), **tol)
    for a, b in zip(st, st_ref):
        assert (a is None and b is None) or torch.allclose(a, b, **tolerance(acc))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", list(Optimizer))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
def test_increasing_ids_match_reference(backend, optimizer, dtype, id_dtype):
    """Ids already strictly increasing (each distinct id looked up once, as the NCF models'
    training step passes them) are grouped without a sort, and float tables step their rows
    in place: the same bits as the same rows in shuffled order (grouped by the sort), and the
    reference's numbers. Ids that stop increasing only at the last id, and an empty batch,
    take the general path."""
    k = embedding_kernels(backend, "cpu")
    rng = _rng(int(optimizer) + 100)
    gen = torch.Generator().manual_seed(int(optimizer) + 100)
    num_rows = 300
    acc = torch.float32
    distinct = torch.from_numpy(np.unique(zipf_ids(num_rows, 400, generator=rng).numpy()))
    assert len(distinct) > 50
    shuffle = torch.from_numpy(rng.permutation(len(distinct)))
    repeated = torch.cat([distinct, distinct[-1:]])  # increasing but for the last id
    weight = (torch.randn(num_rows, K, generator=gen) * 0.1).to(dtype)
    shapes = fastmf.ops.checks.row_state_shapes(optimizer, weight)
    states = [None if s is None else torch.rand(s, generator=gen, dtype=acc) for s in shapes]
    settings = (optimizer, 0.05, 1e-3, 0.8, 0.95, 0.01, WeightDecay.L2, 3, 77, True)

    def run(kernels, ids, rows, psw):
        w, st = weight.clone(), [None if s is None else s.clone() for s in states]
        offsets = torch.arange(len(ids) + 1, dtype=id_dtype)
        kernels.embedding_bag_backward_update(w, *st, rows, ids.to(id_dtype), offsets, psw,
                                              Pooling.SUM, *settings)
        w2, st2 = weight.clone(), [None if s is None else s.clone() for s in states]
        kernels.sparse_update(w2, *st2, ids.to(id_dtype), rows * psw.unsqueeze(1), *settings)
        return (w, st), (w2, st2)

    # A half table's rows: one rounding of the fp32 step (an ulp of float16 is ~1e-3).
    tol = tolerance(acc) if dtype == acc else dict(rtol=2e-3, atol=2e-3)
    state_tol = tolerance(acc)
    for ids in (distinct, repeated, distinct[:0]):
        rows = torch.randn(len(ids), K, generator=gen, dtype=acc)
        psw = torch.rand(len(ids), generator=gen, dtype=acc)
        ours = run(k, ids, rows, psw)
        spec = run(reference, ids, rows, psw)
        for (w, st), (w_ref, st_ref) in zip(ours, spec):
            if len(ids):
                assert not torch.equal(w, weight)
            else:
                assert torch.equal(w, weight)
            torch.testing.assert_close(w.float(), w_ref.float(), **tol)
            for a, b in zip(st, st_ref):
                assert (a is None and b is None) or torch.allclose(a, b, **state_tol)
        if ids is distinct:
            mixed = run(k, ids[shuffle], rows[shuffle], psw[shuffle])
            for (w, st), (w_mixed, st_mixed) in zip(ours, mixed):
                assert torch.equal(w, w_mixed)
                for a, b in zip(st, st_mixed):
                    assert (a is None and b is None) or torch.equal(a, b)


# --- optimizer in backward: several uses of one table, an MLP alongside ----------------------

def _two_use_loss(table, ids_a, offsets_a, ids_b, offsets_b, psw_b):
    """One table used twice in one graph: as a mean bag (one module) and as a weighted sum
    bag (a second module sharing the weight)."""
    first = table[0](ids_a, offsets_a)
    second = table[1](ids_b, offsets_b, psw_b)
    return ((first * second).sum(1) - 1.0).pow(2).mean() + first.pow(2).sum() * 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["sgd", "adagrad", "rowwise_adagrad", "adam",
                                      "rowwise_adam"])
def test_table_used_twice_fused_equals_unfused(backend, opt_name):
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        mean_bag = fastmf.nn.EmbeddingBag(N, K, "mean", backend=backend)
        sum_bag = fastmf.nn.EmbeddingBag(N, K, "sum", backend=backend)
        sum_bag.weight = mean_bag.weight  # one table, two modes
        opt = _make_optimizer(opt_name, [mean_bag.weight], weight_decay=0.01)
        if fused:
            fastmf.optim.apply_in_backward(opt)
        for step in range(5):
            ids_a, offsets_a = _bags(16, seed=100 + step)
            ids_b, offsets_b = _bags(16, seed=200 + step)
            psw_b = torch.rand(ids_b.numel()) + 0.5
            opt.zero_grad()
            _two_use_loss((mean_bag, sum_bag), ids_a, offsets_a, ids_b, offsets_b,
                          psw_b).backward()
            if fused:
                assert mean_bag.weight.grad is None
            opt.step()
        results.append((mean_bag.weight.detach().clone(),
                        [t.clone() for t in opt.state[mean_bag.weight].values()
                         if isinstance(t, torch.Tensor)], opt.state[mean_bag.weight]["step"]))
    (w0, s0, n0), (w1, s1, n1) = results
    torch.testing.assert_close(w1, w0, **tolerance(torch.float32))
    for a, b in zip(s0, s1):
        torch.testing.assert_close(b, a, **tolerance(torch.float32))
    assert n0 == n1 == 5


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["sgd", "adagrad", "rowwise_adagrad", "adam",
                                      "rowwise_adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=idfn)
def test_layers_train_on_the_device_as_the_spec_on_the_cpu(device, opt_name, dtype):
    """An Embedding and a weighted-sum EmbeddingBag under one optimizer applied in backward,
    five steps on Zipf ids with duplicates, empty bags and one empty batch: the native
    kernels on ``device`` (the CUDA ones where there is a GPU) train them as the reference
    does on the CPU, weights and optimizer state."""

    def train(backend, dev):
        torch.manual_seed(3)
        emb = fastmf.nn.Embedding(N, K, backend=backend, dtype=dtype, device=dev)
        bag = fastmf.nn.EmbeddingBag(N, K, "sum", backend=backend, dtype=dtype, device=dev)
        start = [w.detach().float().cpu().clone() for w in (emb.weight, bag.weight)]
        opt = _make_optimizer(opt_name, [emb.weight, bag.weight], weight_decay=0.01)
        fastmf.optim.apply_in_backward(opt)
        for step in range(5):
            batch = 0 if step == 2 else 48
            ids = zipf_ids(N, batch, generator=_rng(10 + step))
            bag_ids, offsets = _bags(batch, seed=20 + step)
            psw = torch.rand(bag_ids.numel(), generator=torch.Generator().manual_seed(step))
            a = emb(ids.to(dev)).float()
            b = bag(bag_ids.to(dev), offsets.to(dev), psw.to(dev) + 0.5).float()
            loss = ((a * b).sum(1) - 1.0).pow(2).sum() / max(batch, 1)
            loss.backward()
            opt.step()
            opt.zero_grad()
        states = [t.detach().float().cpu() for w in (emb.weight, bag.weight)
                  for t in opt.state[w].values() if isinstance(t, torch.Tensor)]
        trained = [emb.weight.detach().float().cpu(), bag.weight.detach().float().cpu()]
        assert not any(torch.equal(t, s) for t, s in zip(trained, start))
        return trained, states

    (got_w, got_s), (want_w, want_s) = train("native", device), train("reference", "cpu")
    assert len(got_s) == len(want_s) and (len(got_s) > 0 or opt_name == "sgd")
    # float16 weights: one stochastic rounding may land a half's ulp away (2^-10 of the
    # value) where the float32 arithmetic before it rounded differently.
    tol = dict(rtol=2.0 ** -8, atol=1e-5) if dtype == torch.float16 else tolerance(dtype)
    for got, want in zip(got_w + got_s, want_w + want_s):
        torch.testing.assert_close(got, want, **tol)


def _make_optimizer(name, params, **kw):
    if name == "sgd":
        return fastmf.optim.SparseSGD(params, lr=0.1, **kw)
    if name in ("adagrad", "rowwise_adagrad"):
        return fastmf.optim.SparseAdagrad(params, lr=0.1, rowwise=name == "rowwise_adagrad",
                                          **kw)
    return fastmf.optim.SparseAdam(params, lr=0.01, rowwise=name == "rowwise_adam", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_mlp_in_the_same_optimizer(backend, fused):
    """Two tables and an MLP in one SparseAdam: the tables as torch.optim.SparseAdam, the MLP
    as torch.optim.Adam (its dense gradients), fused or not."""
    torch.manual_seed(2)
    users = fastmf.nn.Embedding(N, K, backend=backend)
    items = fastmf.nn.Embedding(N, K, backend=backend)
    mlp = torch.nn.Sequential(torch.nn.Linear(2 * K, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    t_users = torch.nn.Embedding(N, K, sparse=True)
    t_items = torch.nn.Embedding(N, K, sparse=True)
    t_mlp = torch.nn.Sequential(torch.nn.Linear(2 * K, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 1))
    with torch.no_grad():
        t_users.weight.copy_(users.weight)
        t_items.weight.copy_(items.weight)
        t_mlp.load_state_dict(mlp.state_dict())
    opt = fastmf.optim.SparseAdam([*users.parameters(), *items.parameters(),
                                   *mlp.parameters()], lr=0.01)
    if fused:
        fastmf.optim.apply_in_backward(opt)
    t_sparse = torch.optim.SparseAdam([t_users.weight, t_items.weight], lr=0.01)
    t_dense = torch.optim.Adam(t_mlp.parameters(), lr=0.01)
    rng = _rng(3)
    for _ in range(20):
        u = zipf_ids(N, 32, generator=rng)
        i = zipf_ids(N, 32, generator=rng)
        y = torch.from_numpy(rng.uniform(-1, 1, 32)).float()
        for emb_u, emb_i, net, opts in ((users, items, mlp, (opt,)),
                                        (t_users, t_items, t_mlp, (t_sparse, t_dense))):
            for o in opts:
                o.zero_grad()
            pred = net(torch.cat([emb_u(u), emb_i(i)], 1)).squeeze(1)
            (pred - y).pow(2).mean().backward()
            for o in opts:
                o.step()
    for a, b in ((users.weight, t_users.weight), (items.weight, t_items.weight),
                 *zip(mlp.parameters(), t_mlp.parameters())):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance(torch.float32))


# --- bad input: clear errors, nothing written ----------------------------------------------

BAD_BAG_INPUTS = {
    "offsets not at 0": (dict(offsets=[1, 2]), ValueError,
                         re.escape("offsets must start at 0, got offsets[0] = 1")),
    "offsets decreasing": (dict(offsets=[0, 3, 2]), ValueError,
                           "offsets must be non-decreasing, got 3 then 2"),
    "offsets past the end": (dict(offsets=[0, 9]), ValueError,
                             re.escape("offsets[1] = 9 is past the end of indices (5 ids)")),
    "psw wrong length": (dict(psw=4), ValueError,
                         r"per_sample_weights has shape \(4,\), expected \(5,\)"),
    "psw with mean": (dict(psw=5, mode="mean"), ValueError,
                      "per_sample_weights is only supported with mode='sum'"),
    "id out of range": (dict(ids=[0, 1, 2, 3, N]), IndexError,
                        re.escape(f"indices id {N} out of range [0, {N})")),
    "negative id": (dict(ids=[0, -1, 2, 3, 4]), IndexError, "indices id -1 out of range"),
    "float ids": (dict(ids=[0.0, 1.0]), TypeError, "ids must be int32 or int64"),
    "2-D ids with offsets": (dict(ids=[[0, 1], [2, 3]]), ValueError,
                             "offsets must be None when ids is 2-D"),
    "1-D ids without offsets": (dict(offsets=None), ValueError, "offsets is required"),
    "float offsets": (dict(offsets=[0.0, 2.0]), TypeError, "offsets must be int32 or int64"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_BAG_INPUTS))
def test_bad_bag_input(backend, case):
    args, error, message = BAD_BAG_INPUTS[case]
    bag = fastmf.nn.EmbeddingBag(N, K, args.get("mode", "sum"), backend=backend)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(bag.parameters(), lr=0.1))
    before = bag.weight.detach().clone()
    ids = torch.tensor(args.get("ids", [0, 1, 2, 3, 4]))
    offsets = args.get("offsets", [0, 2])
    offsets = None if offsets is None else torch.tensor(offsets)
    psw = torch.rand(args["psw"]) if "psw" in args else None
    with pytest.raises(error, match=r"fastmf\.[\w.]+: .*" + message):
        bag(ids, offsets, psw).sum().backward()
    assert torch.equal(bag.weight.detach(), before)
    assert opt.state[bag.weight].get("step", 0) == 0


def test_bad_module_arguments():
    with pytest.raises(ValueError, match=r"fastmf\.nn\.EmbeddingBag: mode 'max' is not "
                                         "supported"):
        fastmf.nn.EmbeddingBag(N, K, "max")
    with pytest.raises(ValueError, match=r"fastmf\.nn\.Embedding: dim must be a positive int"):
        fastmf.nn.Embedding(N, 0)
    with pytest.raises(TypeError, match=r"fastmf\.nn\.Embedding: dtype must be"):
        fastmf.nn.Embedding(N, K, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"init_scale must be finite"):
        fastmf.nn.Embedding(N, K, init_scale=float("nan"))
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        fastmf.nn.Embedding(N, K, backend="gpu")


def test_op_checks_name_the_op():
    w = torch.rand(N, K)
    ids, offsets = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_forward: the last offset must "
                                         r"equal the number of indices \(3\), got offsets\[1\]"):
        reference.embedding_bag_forward(w, ids, offsets[:2], None, "sum")
    with pytest.raises(TypeError, match=r"fastmf\.embedding_bag_forward: offsets has dtype "
                                        "torch.int32, expected torch.int64"):
        reference.embedding_bag_forward(w, ids, offsets.int(), None, "sum")
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_forward: unknown pooling 'max'"):
        reference.embedding_bag_forward(w, ids, offsets, None, "max")
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_backward: grad_output has 3 "
                                         r"rows, expected one per bag \(2\)"):
        reference.embedding_bag_backward(torch.rand(3, K), ids, offsets, None, "sum")


# --- scatter_rows: the dense gradient of a row gather ---------------------------------------

SCATTER_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _scatter_kernels(backend):
    return fastmf.ops.kernels(backend, torch.device("cpu"), kernel="scatter_rows")


def _scatter_case(batch, dtype, id_dtype, shape, seed):
    """(ids, rows): Zipf ids (many duplicates), standard normal rows (L, K) or (L,)."""
    rng = _rng(seed)
    ids = zipf_ids(N, batch, generator=rng, dtype=id_dtype)
    size = (batch, K) if shape == "2d" else (batch,)
    rows = torch.from_numpy(rng.standard_normal(size)).to(dtype)
    return ids, rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", SCATTER_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("shape", ["1d", "2d"])
def test_scatter_rows_matches_reference_and_autograd(backend, dtype, id_dtype, batch, shape):
    ids, rows = _scatter_case(batch, dtype, id_dtype, shape, seed=batch + len(shape))
    got = _scatter_kernels(backend).scatter_rows(ids, rows, N)
    assert got.dtype == dtype and got.shape == (N,) + tuple(rows.shape[1:])
    # The same adds in the same order (index order) as the spec: the same bits.
    assert torch.equal(got, reference.scatter_rows(ids, rows, N))
    # Textbook: autograd's gradient of the gather table[ids], in the accumulation type.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    table = torch.zeros((N,) + tuple(rows.shape[1:]), dtype=acc, requires_grad=True)
    table.index_select(0, ids.long()).backward(rows.to(acc))
    assert torch.equal(got, table.grad.to(dtype))
    if batch:
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[ids.long()] = False
        assert got[untouched].eq(0).all() and got[~untouched].ne(0).any()


@requires_native
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("shape", ["1d", "2d"])
def test_scatter_rows_threads_give_the_same_bits(id_dtype, shape):
    """Past kScatterParallelValues (2^21 values) the native kernel splits the output rows
    among threads; every row still sums its terms in index order (one-column rows too,
    which take the compile-time width of one)."""
    if shape == "2d":
        ids, rows = _scatter_case(70_000, torch.float32, id_dtype, "2d", seed=5)
        rows = rows.repeat(1, 4)  # (70,000, 32): 2.24M values
    else:
        ids, rows = _scatter_case(2_200_000, torch.float32, id_dtype, "1d", seed=5)
    expected = reference.scatter_rows(ids, rows, N)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(_scatter_kernels("native").scatter_rows(ids, rows, N), expected)
    finally:
        torch.set_num_threads(threads)


BAD_SCATTER_INPUTS = {
    "id past the end": (dict(ids=[0, N, 2]), IndexError, rf"ids id {N} out of range \[0, {N}\)"),
    "negative id": (dict(ids=[0, -1, 2]), IndexError, rf"ids id -1 out of range \[0, {N}\)"),
    "float ids": (dict(ids=[0.0, 1.0, 2.0]), TypeError, "ids must be int32 or int64"),
    "2-D ids": (dict(ids=[[0, 1, 2]]), ValueError, "ids must be 1-D"),
    "int rows": (dict(rows=torch.ones(3, K, dtype=torch.int64)), TypeError,
                 "rows must be float32, float64, float16 or bfloat16"),
    "3-D rows": (dict(rows=torch.ones(3, K, 1)), ValueError, "rows must be 1-D or 2-D"),
    "one row short": (dict(rows=torch.ones(2, K)), ValueError,
                      r"rows has 2 rows, expected one per id \(3\)"),
    "negative num_rows": (dict(num_rows=-1), ValueError, "num_rows must be >= 0, got -1"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_SCATTER_INPUTS))
def test_scatter_rows_bad_input(backend, case):
    args, error, message = BAD_SCATTER_INPUTS[case]
    ids = torch.tensor(args.get("ids", [0, 1, 2]))
    rows = args.get("rows", torch.rand(3, K))
    with pytest.raises(error, match=r"fastmf\.scatter_rows: " + message):
        _scatter_kernels(backend).scatter_rows(ids, rows, args.get("num_rows", N))


@requires_native
def test_scatter_rows_op_autograd_and_fake():
    gen = torch.Generator().manual_seed(6)
    ids = zipf_ids(N, 50, generator=np.random.default_rng(6))
    rows = torch.randn(50, K, generator=gen, dtype=torch.float64, requires_grad=True)
    op = torch.ops.fastmf.scatter_rows.default
    assert torch.autograd.gradcheck(lambda r: op(ids, r, N), (rows,))
    torch.library.opcheck(op, (ids, rows.detach().float(), N))
    torch.library.opcheck(op, (ids[:0], torch.randn(0), 4))


# --- unique_bags: a batch's distinct rows of a CSR matrix as bags ---------------------------

def _unique_bags_kernels(backend):
    return fastmf.ops.kernels(backend, torch.device("cpu"), kernel="unique_bags")


def _csr(num_rows, *, seed, index_dtype=torch.int64, weight_dtype=torch.float32,
         identity=False, max_size=4):
    """(indptr, indices, weights) of a feature matrix: rows of 0..max_size entries (empty
    rows included), or exactly one entry a row (identity features only); random feature
    ids and positive weights."""
    rng = _rng(seed)
    lengths = (np.ones(num_rows, np.int64) if identity
               else rng.integers(0, max_size + 1, num_rows))
    if num_rows > 2 and not identity:
        lengths[1] = 0
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    nnz = int(indptr[-1])
    indices = torch.from_numpy(rng.integers(0, 10 * num_rows + 1, nnz)).to(index_dtype)
    weights = torch.from_numpy(rng.random(nnz) + 0.1).to(weight_dtype)
    return indptr, indices, weights


def _textbook_unique_bags(ids, indptr, indices, weights):
    """What the outputs mean, by hand: NumPy's sorted unique, then each row sliced out."""
    distinct, inverse = np.unique(ids.long().numpy(), return_inverse=True)
    ptr = indptr.tolist()
    rows = [range(ptr[r], ptr[r + 1]) for r in distinct.tolist()]
    positions = torch.tensor([j for row in rows for j in row], dtype=torch.int64)
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    return (torch.from_numpy(distinct).long(), torch.from_numpy(inverse.reshape(-1)).long(),
            indices[positions], torch.from_numpy(offsets).to(indices.dtype), weights[positions])


def _assert_same_outputs(got, want):
    for name, a, b in zip(("distinct", "inverse", "bag_indices", "bag_offsets", "bag_weights"),
                          got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("index_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("rows", ["few", "many", "identity"])
def test_unique_bags_matches_reference_and_textbook(backend, id_dtype, index_dtype, batch,
                                                    rows):
    # "few": 60 rows, Zipf ids, so a large batch repeats them (the native kernel's counting
    # sort); "many": 50,000 rows, more than twice any batch here (its radix sort).
    num_rows = 50_000 if rows == "many" else N
    seed = batch + 3 * len(rows) + (id_dtype == torch.int32) + 2 * (index_dtype == torch.int32)
    indptr, indices, weights = _csr(num_rows, seed=seed, index_dtype=index_dtype,
                                    identity=rows == "identity")
    ids = zipf_ids(num_rows, batch, generator=_rng(seed + 1), dtype=id_dtype)
    got = _unique_bags_kernels(backend).unique_bags(ids, indptr, indices, weights)
    want = _textbook_unique_bags(ids, indptr, indices, weights)
    _assert_same_outputs(got, want)
    _assert_same_outputs(got, reference.unique_bags(ids, indptr, indices, weights))
    distinct, inverse = got[0], got[1]
    assert torch.equal(distinct[inverse], ids.long())
    if batch == 4096:  # Zipf ids repeat
        assert len(distinct) < batch
    if rows == "identity":  # one entry a row: the bags are a gather
        assert torch.equal(got[2], indices[distinct])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", SCATTER_DTYPES, ids=idfn)
def test_unique_bags_weight_dtypes(backend, weight_dtype):
    indptr, indices, weights = _csr(N, seed=9, weight_dtype=weight_dtype)
    ids = zipf_ids(N, 300, generator=_rng(10))
    got = _unique_bags_kernels(backend).unique_bags(ids, indptr, indices, weights)
    _assert_same_outputs(got, _textbook_unique_bags(ids, indptr, indices, weights))


@requires_native
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
def test_unique_bags_threads_give_the_same_values(id_dtype):
    """From 2^15 ids on the native kernel groups them on the intra-op threads (a parallel
    radix sort): the same groups for any thread count."""
    indptr, indices, weights = _csr(200_000, seed=11)
    ids = zipf_ids(200_000, 70_000, generator=_rng(12), dtype=id_dtype)
    expected = reference.unique_bags(ids, indptr, indices, weights)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _assert_same_outputs(
                _unique_bags_kernels("native").unique_bags(ids, indptr, indices, weights),
                expected)
    finally:
        torch.set_num_threads(threads)


# (arguments replaced, error, message): 5 rows, row 3 empty; ids [0, 2, 4, 2].
BAD_UNIQUE_BAGS_INPUTS = {
    "id past the end": (dict(ids=[0, 5]), IndexError, r"ids id 5 out of range \[0, 5\)"),
    "negative id": (dict(ids=[-2, 1]), IndexError, r"ids id -2 out of range \[0, 5\)"),
    "float ids": (dict(ids=[0.0, 1.0]), TypeError, "ids must be int32 or int64"),
    "2-D ids": (dict(ids=[[0, 1]]), ValueError, "ids must be 1-D"),
    "float indptr": (dict(indptr=torch.zeros(6)), TypeError, "indptr must be int32 or int64"),
    "empty indptr": (dict(indptr=torch.zeros(0, dtype=torch.int64)), ValueError,
                     r"indptr must hold num_rows \+ 1 >= 1 entries, got 0"),
    "2-D indices": (dict(indices=torch.zeros(1, 7, dtype=torch.int64)), ValueError,
                    "indices must be 1-D"),
    "int weights": (dict(weights=torch.ones(7, dtype=torch.int64)), TypeError,
                    "weights must be float32, float64, float16 or bfloat16"),
    "one weight short": (dict(weights=torch.ones(6)), ValueError,
                         r"weights has 6 entries, expected one per index \(7\)"),
    "decreasing row": (dict(indptr=[0, 2, 3, 1, 4, 7]), ValueError,
                       r"indptr\[2\] = 3 and indptr\[3\] = 1 do not bound a row of the 7"),
    "row past the entries": (dict(indptr=[0, 2, 3, 4, 4, 9]), ValueError,
                             r"indptr\[4\] = 4 and indptr\[5\] = 9 do not bound"),
    "negative start": (dict(indptr=[-1, 2, 3, 4, 4, 7]), ValueError,
                       r"indptr\[0\] = -1 and indptr\[1\] = 2 do not bound"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_UNIQUE_BAGS_INPUTS))
def test_unique_bags_bad_input(backend, case):
    args, error, message = BAD_UNIQUE_BAGS_INPUTS[case]
    ids = torch.tensor(args.get("ids", [0, 2, 4, 2]))
    indptr = torch.as_tensor(args.get("indptr", [0, 2, 3, 4, 4, 7]))
    indices = args.get("indices", torch.arange(7) * 3 + 1)
    weights = args.get("weights", torch.rand(7) + 0.5)
    with pytest.raises(error, match=r"fastmf\.unique_bags: " + message):
        _unique_bags_kernels(backend).unique_bags(ids, indptr, indices, weights)
    # A row pointer that no id names is not read.
    if case == "decreasing row":
        got = _unique_bags_kernels(backend).unique_bags(torch.tensor([0, 4]), indptr, indices,
                                                        weights)
        _assert_same_outputs(got, _textbook_unique_bags(torch.tensor([0, 4]), indptr, indices,
                                                        weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_bags_refuses_bags_past_int32_offsets(backend):
    """Named rows may share entries (pointers may go down between them, across rows no id
    names): 2,049 rows each spanning all 2^20 int32 indices would need offsets past int32.
    Refused before the bags are allocated."""
    nnz, named = 2 ** 20, 2049
    # indptr 0, nnz, 0, nnz, ...: every even row is [0, nnz); the odd rows are not named.
    indptr = torch.tensor([0, nnz] * named + [0], dtype=torch.int64)
    ids = torch.arange(0, 2 * named, 2)
    indices = torch.arange(nnz, dtype=torch.int32)
    weights = torch.rand(nnz)
    with pytest.raises(ValueError, match=r"fastmf\.unique_bags: the bags hold more than "
                                         r"2147483647 entries, past what torch\.int32 offsets"):
        _unique_bags_kernels(backend).unique_bags(ids, indptr, indices, weights)
    # Two such rows fit.
    got = _unique_bags_kernels(backend).unique_bags(ids[:2], indptr, indices, weights)
    assert got[3].tolist() == [0, nnz, 2 * nnz] and torch.equal(got[2][nnz:], indices)


@requires_native
def test_unique_bags_op_fake_and_compile():
    indptr, indices, weights = _csr(N, seed=13)
    ids = zipf_ids(N, 40, generator=_rng(14))
    op = torch.ops.fastmf.unique_bags.default
    torch.library.opcheck(op, (ids, indptr, indices, weights))
    torch.library.opcheck(op, (ids[:0], indptr, indices, weights))
    compiled = torch.compile(fastmf.ops.native.unique_bags, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = compiled(ids, indptr, indices, weights)
    _assert_same_outputs(got, reference.unique_bags(ids, indptr, indices, weights))


# --- autograd machinery ---------------------------------------------------------------------

class _Densify(torch.autograd.Function):
    """Identity whose backward densifies a sparse gradient: gradcheck compares dense ones."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


@pytest.mark.parametrize("pooling", list(Pooling))
def test_gradcheck_float64(pooling):
    """The layer's gradients w.r.t. the table and (sum) the per-sample weights."""
    gen = torch.Generator().manual_seed(4)
    ids, starts = _bags(5, seed=4, num_rows=12)
    offsets = torch.cat([starts, torch.tensor([ids.numel()])])
    weight = torch.rand(12, 3, dtype=torch.float64, generator=gen).requires_grad_()
    psw = (torch.rand(ids.numel(), dtype=torch.float64, generator=gen) + 0.5).requires_grad_()

    def f(weight, *psw):
        return fastmf.nn.embedding._EmbeddingBagFunction.apply(
            _Densify.apply(weight), ids, offsets, psw[0] if psw else None, pooling, reference, 0)

    inputs = (weight, psw) if pooling == Pooling.SUM else (weight,)
    assert torch.autograd.gradcheck(f, inputs)


# torch.compile(fullgraph=True) of forward + backward: tests/test_compile.py.


def test_outside_backward_applies_immediately():
    """A use queued outside a backward pass (no graph task to queue a callback on) is
    applied at once."""
    emb = fastmf.nn.Embedding(N, K, backend="reference")
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.5))
    before = emb.weight.detach().clone()
    fastmf.nn.embedding._queue_use(emb.weight, fastmf.nn.embedding.BagUse(
        0, torch.ones(1, K), torch.tensor([3]), torch.tensor([0, 1]), None, Pooling.SUM))
    torch.testing.assert_close(emb.weight.detach()[3], before[3] - 0.5)
    assert opt.state[emb.weight]["step"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_a_pass_that_accumulates_into_the_table_updates_it(backend):
    """An optimizer in backward steps its table only in a pass that would accumulate the
    table's gradient: autograd.grad(out, [per_sample_weights]) (a gradient penalty) and
    backward(inputs=[per_sample_weights]) had stepped it, where torch leaves a weight alone;
    autograd.grad(out, [weight]) returns the weight's gradient, as torch's sparse one."""
    rng = np.random.default_rng(3)
    emb = fastmf.nn.EmbeddingBag(N, K, backend=backend)
    plain = torch.nn.EmbeddingBag(N, K, mode="sum", sparse=True)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.1))
    ids = torch.as_tensor(rng.integers(0, N, 12))
    offsets = torch.tensor([0, 5, 5, 9])
    psw = torch.as_tensor(rng.uniform(0.5, 1.5, 12), dtype=torch.float32).requires_grad_()

    def loss(module):
        return (module(ids, offsets, per_sample_weights=psw) ** 2).sum()

    before = emb.weight.detach().clone()
    got, = torch.autograd.grad(loss(emb), [psw])
    want, = torch.autograd.grad(loss(plain), [psw])
    torch.testing.assert_close(got, want)
    loss(emb).backward(inputs=[psw])
    assert torch.equal(emb.weight.detach(), before) and "step" not in opt.state[emb.weight]
    got, = torch.autograd.grad(loss(emb), [emb.weight])
    want, = torch.autograd.grad(loss(plain), [plain.weight])
    assert got.is_sparse and torch.equal(emb.weight.detach(), before)
    torch.testing.assert_close(got.to_dense(), want.to_dense())
    loss(emb).backward()  # a pass that accumulates: the one update
    torch.testing.assert_close(emb.weight.detach(), before - 0.1 * want.to_dense())
    assert opt.state[emb.weight]["step"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_with_int64_offsets(backend):
    """int64 offsets were narrowed to int32 ids' dtype before they were checked: [0, 2**32]
    became [0, 0] and built other bags without a word. Now the pair is read in int64."""
    rng = np.random.default_rng(4)
    bag = fastmf.nn.EmbeddingBag(N, K, backend=backend)
    ids = torch.as_tensor(rng.integers(0, N, 9), dtype=torch.int32)
    for bad in ([0, 2**32], [0, 2**32 + 1]):
        with pytest.raises(ValueError, match=rf"offsets\[1\] = {bad[1]} is past the end"):
            bag(ids, torch.tensor(bad))
    offsets = torch.tensor([0, 4, 4, 7])
    want = torch.nn.functional.embedding_bag(ids.long(), bag.weight.detach(), offsets,
                                             mode="sum")
    torch.testing.assert_close(bag(ids, offsets).detach(), want)


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises: a backward pass that fails after the fused tables'
    backward has run (their node is later in the graph, so the engine runs it first)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed on purpose")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_backward_applies_nothing_and_training_goes_on(backend):
    """A backward pass that raises applies none of its fused updates, leaves nothing
    pending, and later passes update exactly as they would have without it (once, a
    registry shared by all passes stopped every later update)."""
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        user = fastmf.nn.Embedding(N, K, backend=backend)
        item = fastmf.nn.EmbeddingBag(N, K, "sum", backend=backend)
        opt = fastmf.optim.apply_in_backward(
            fastmf.optim.SparseAdagrad([user.weight, item.weight], lr=0.1))
        models.append((user, item, opt))
    rng = np.random.default_rng(5)
    ids = [zipf_ids(N, 12, generator=rng) for _ in range(4)]
    bags = [_bags(12, seed=300 + s) for s in range(4)]

    def loss_of(user, item, step):
        return (user(ids[step]) * item(*bags[step])).sum()

    user, item, opt = models[0]
    before = [user.weight.detach().clone(), item.weight.detach().clone()]
    x = torch.ones(3, requires_grad=True)
    failing = _FailingBackward.apply(x).sum()  # made first: its backward runs last
    with pytest.raises(RuntimeError, match="failed on purpose"):
        (failing + loss_of(user, item, 0)).backward()
    gc.collect()
    assert not fastmf.nn.embedding._PASSES
    assert torch.equal(user.weight, before[0]) and torch.equal(item.weight, before[1])
    assert opt.state[user.weight].get("step", 0) == 0
    for user, item, opt in models:
        for step in range(1, 4):
            loss_of(user, item, step).backward()
            opt.step()
    (u0, i0, o0), (u1, i1, o1) = models
    assert torch.equal(u0.weight, u1.weight) and torch.equal(i0.weight, i1.weight)
    assert not torch.equal(u0.weight, before[0]) and not torch.equal(i0.weight, before[1])
    assert o0.state[u0.weight]["step"] == o1.state[u1.weight]["step"] == 3
    assert not fastmf.nn.embedding._PASSES


def test_one_pass_updates_every_table_once(monkeypatch):
    """All the fused tables of one backward pass are updated at its end, each table once
    with its uses merged, whatever the order the engine reaches them in."""
    small = fastmf.nn.Embedding(N, K, backend="reference")
    large = fastmf.nn.EmbeddingBag(N, K, "sum", backend="reference")
    opt = fastmf.optim.apply_in_backward(
        fastmf.optim.SparseSGD([large.weight, small.weight], lr=0.1))
    calls = []
    apply_fused = type(opt).apply_fused

    def record(self, weight, *args):
        calls.append((weight is small.weight, int(args[1].numel())))
        return apply_fused(self, weight, *args)

    monkeypatch.setattr(type(opt), "apply_fused", record)
    ids_a, offsets_a = _bags(16, seed=400)
    ids_b, offsets_b = _bags(16, seed=401)
    ids = torch.tensor([1, 2, 2])
    for small_first in (True, False):
        calls.clear()
        parts = [small(ids).sum(),
                 (large(ids_a, offsets_a).sum(1) * large(ids_b, offsets_b).sum(1)).sum()]
        if not small_first:
            parts.reverse()
        (parts[0] + parts[1]).backward()
        assert sorted(calls) == [(False, ids_a.numel() + ids_b.numel()), (True, 3)]
    assert opt.state[small.weight]["step"] == opt.state[large.weight]["step"] == 2


# --- fp16 / bf16 tables train as well as fp32 ------------------------------------------------

class _MF(torch.nn.Module):
    def __init__(self, num_users, num_items, dim, dtype, mean):
        super().__init__()
        self.p = fastmf.nn.Embedding(num_users, dim, dtype=dtype, backend="reference")
        self.q = fastmf.nn.Embedding(num_items, dim, dtype=dtype, backend="reference")
        self.bu = fastmf.nn.Embedding(num_users, 1, dtype=dtype, backend="reference",
                                      init_scale=0.0)
        self.bi = fastmf.nn.Embedding(num_items, 1, dtype=dtype, backend="reference",
                                      init_scale=0.0)
        self.mean = mean

    def forward(self, u, i):
        """(predictions, the rows' squared norms for an L2 penalty)."""
        p, q = self.p(u), self.q(i)
        pred = (p * q).sum(1) + self.bu(u).squeeze(1) + self.bi(i).squeeze(1) + self.mean
        return pred, p.pow(2).sum(1) + q.pow(2).sum(1)


@pytest.mark.skipif(not RATINGS.exists(), reason=f"{RATINGS} is not on this machine")
def test_half_tables_reach_fp32_rmse_on_movielens():
    import pandas as pd

    frame = pd.read_csv(RATINGS)
    users = torch.from_numpy(pd.factorize(frame["userId"])[0])
    items = torch.from_numpy(pd.factorize(frame["movieId"])[0])
    ratings = torch.from_numpy(frame["rating"].to_numpy(copy=True)).float()
    perm = torch.randperm(len(ratings), generator=torch.Generator().manual_seed(0))
    cut = int(0.9 * len(perm))
    train, valid = perm[:cut], perm[cut:]
    mean = float(ratings[train].mean())
    rmse = {}
    start = time.perf_counter()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = _MF(int(users.max()) + 1, int(items.max()) + 1, 32, dtype, mean)
        opt = fastmf.optim.apply_in_backward(
            fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05))
        order = torch.Generator().manual_seed(1)
        for _ in range(4):
            shuffled = train[torch.randperm(len(train), generator=order)]
            for batch in shuffled.split(4096):
                pred, norms = model(users[batch], items[batch])
                ((pred - ratings[batch]).pow(2) + 0.02 * norms).mean().backward()
                opt.step()  # a no-op for the fused tables; kept to show the usual loop
        with torch.no_grad():
            pred = model(users[valid], items[valid])[0].clamp(0.5, 5.0)
            rmse[dtype] = float((pred - ratings[valid]).pow(2).mean().sqrt())
    elapsed = time.perf_counter() - start
    print(f"validation RMSE {rmse} in {elapsed:.1f} s")
    assert rmse[torch.float32] < 1.0
    assert abs(rmse[torch.float16] - rmse[torch.float32]) < 0.01
    assert abs(rmse[torch.bfloat16] - rmse[torch.float32]) < 0.01
