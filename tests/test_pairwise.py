"""The fused pairwise (BPR) step, native and Numba, against fastmf.reference.train_step_pairwise.

Fresh random tables and Zipf ids, with items that are positives in some samples and
negatives in others (and both in one sample), over id dtype x weight dtype x batch size x
optimizer x reg x bias; 20 repeated steps; determinism across runs and thread counts;
opcheck of the native op; and bad inputs, whose errors must read the same on every backend.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fastmf import backends
from fastmf import reference as ref
from fastmf.testing import (
    BATCH_SIZES,
    ID_DTYPES,
    WEIGHT_DTYPES,
    clone_all,
    make_tables,
    requires_native,
    requires_numba,
    tolerance,
    zipf_ids,
)

NUM_USERS, NUM_ITEMS, DIM = 300, 60, 13
OPTIMIZERS = list(range(len(ref.OPTIMIZERS)))
FAST = [pytest.param("numba", marks=requires_numba),
        pytest.param("native", marks=requires_native)]
ALL = [pytest.param("reference")] + FAST


def kernel(backend):
    """The train_step_pairwise of ``backend``; the reference behind the shared checks."""
    if backend == "native":
        from fastmf import ops

        return ops.train_step_pairwise
    if backend == "numba":
        from fastmf import numba_pairwise

        return numba_pairwise.train_step_pairwise
    return backends.get("reference").train_step_pairwise


def reference_step(*args):
    """The reference on one thread: its many small torch ops gain nothing from a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ref.train_step_pairwise(*args)
    finally:
        torch.set_num_threads(threads)


def make_states(tables, optimizer, seed):
    """Random positive states (None for SGD; per-row vectors for row-wise factor tables)."""
    if optimizer == 0:
        return (None,) * 4
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in tables:
        if t is None:
            out.append(None)
            continue
        shape = t.shape[:1] if optimizer == 2 else t.shape
        out.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 0.1 + 0.01)
                   .to(t.dtype))
    return tuple(out)


def make_triples(batch, seed, id_dtype=torch.int64, num_users=NUM_USERS, num_items=NUM_ITEMS):
    """(users, pos_items, neg_items), Zipf; a third of the negatives are the positives of
    other samples and every seventh the sample's own positive, so hot items are updated
    from both sides."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(num_users, batch, generator=rng)
    pos = zipf_ids(num_items, batch, generator=rng)
    neg = zipf_ids(num_items, batch, generator=rng)
    if batch > 1:
        neg[::3] = pos.roll(1)[::3]
        neg[::7] = pos[::7]
    return users.to(id_dtype), pos.to(id_dtype), neg.to(id_dtype)


def assert_all_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tolerance(dtype))


# ---------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reg", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("backend", FAST)
def test_matches_reference(backend, id_dtype, dtype, batch, optimizer, reg, bias):
    seed = batch + 10 * optimizer
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=seed)
    tensors = tables + make_states(tables, optimizer, seed + 1)
    users, pos, neg = make_triples(batch, seed + 2, id_dtype)
    if batch >= 7:
        assert np.intersect1d(pos.numpy(), neg.numpy()).size > 0
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss = kernel(backend)(*got, users, pos, neg, 0, reg, optimizer, 0.05, 1e-8)
    expected = reference_step(*want, users, pos, neg, "bpr", reg, optimizer, 0.05, 1e-8)
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss, expected, **tolerance(dtype))
    assert_all_close(got, want, dtype)
    if bias:
        # user_bias cancels in x: neither it nor its state is ever written.
        assert torch.equal(got[2], tensors[2])
        assert got[6] is None or torch.equal(got[6], tensors[6])
    if batch == 0:
        assert float(loss) == 0.0
        assert all(g is None or torch.equal(g, t) for g, t in zip(got, tensors))
    else:
        assert not torch.equal(got[1], tensors[1])


@pytest.mark.parametrize("backend", FAST)
def test_names_and_hot_rows(backend):
    """Loss and optimizer by name; one user and one item on both sides of every sample."""
    dtype = torch.float64
    tables = make_tables(NUM_USERS, NUM_ITEMS, 64, dtype=dtype, seed=3)
    tensors = tables + make_states(tables, 2, seed=4)
    users = torch.full((2048,), 5)
    pos = torch.full((2048,), 9)
    neg = zipf_ids(NUM_ITEMS, 2048, generator=np.random.default_rng(5))
    neg[1::2] = 9
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss = kernel(backend)(*got, users, pos, neg, 0, 0.01, 2, 0.05, 1e-8)
    expected = reference_step(*want, users, pos, neg, "bpr", 0.01, "rowwise_adagrad", 0.05,
                              1e-8)
    torch.testing.assert_close(loss, expected, **tolerance(dtype))
    assert_all_close(got, want, dtype)
    if backend == "numba":
        named = clone_all(*tensors)
        kernel(backend)(*named, users, pos, neg, "bpr", 0.01, "rowwise_adagrad", 0.05, 1e-8)
        assert all(a is None or torch.equal(a, b) for a, b in zip(named, got))


@pytest.mark.parametrize("backend", FAST)
def test_mixed_id_dtypes_and_strided_inputs(backend):
    """int32 users, int64 positives, int32 negatives; strided ids and a strided table,
    updated in place."""
    dtype = torch.float64
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=20)
    tensors = tables + make_states(tables, 1, seed=21)
    wide = torch.zeros(NUM_ITEMS, DIM * 2, dtype=dtype)
    wide[:, ::2] = tensors[1]
    users, pos, neg = make_triples(600, 22)
    users2, pos2, neg2 = (x.repeat_interleave(2)[::2] for x in (users.int(), pos, neg.int()))
    assert not pos2.is_contiguous()
    got = (tensors[0].clone(), wide[:, ::2]) + clone_all(*tensors[2:])
    want = clone_all(*tensors)
    loss = kernel(backend)(*got, users2, pos2, neg2, 0, 0.01, 1, 0.05, 1e-8)
    expected = reference_step(*want, users, pos, neg, 0, 0.01, 1, 0.05, 1e-8)
    torch.testing.assert_close(loss, expected, **tolerance(dtype))
    assert_all_close(got, want, dtype)
    assert torch.equal(wide[:, 1::2], torch.zeros(NUM_ITEMS, DIM, dtype=dtype))


@requires_native
def test_native_under_compile():
    """fullgraph torch.compile: the fake kernel traces and the in-place updates survive
    functionalization."""
    from fastmf import ops

    tables = make_tables(40, 30, 8, seed=23)
    tensors = tables + make_states(tables, 1, seed=24)
    users, pos, neg = make_triples(64, 25, num_users=40, num_items=30)
    got, want = clone_all(*tensors), clone_all(*tensors)

    def step(*args):
        return ops.train_step_pairwise(*args, 0, 0.01, 1, 0.05, 1e-8)

    loss = torch.compile(step, fullgraph=True)(*got, users, pos, neg)
    expected = reference_step(*want, users, pos, neg, 0, 0.01, 1, 0.05, 1e-8)
    torch.testing.assert_close(loss, expected, **tolerance(torch.float32))
    assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("backend", FAST)
def test_large_margins(backend, dtype):
    """|x| far beyond softplus's threshold of 20, both signs: finite, and as the reference."""
    tables = make_tables(50, 40, 4, dtype=dtype, seed=6)
    P, Q, bu, bi = (t * 60 for t in tables)
    tensors = (P, Q, bu, bi) + make_states((P, Q, bu, bi), 1, seed=7)
    users, pos, neg = make_triples(512, 8, num_users=50, num_items=40)
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss = kernel(backend)(*got, users, pos, neg, 0, 0.0, 1, 0.05, 1e-8)
    expected = reference_step(*want, users, pos, neg, 0, 0.0, 1, 0.05, 1e-8)
    x = bi[pos] - bi[neg] + (P[users] * (Q[pos] - Q[neg])).sum(1)
    assert x.max() > 20 and x.min() < -20
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, **tolerance(dtype))
    assert_all_close(got, want, dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("backend", FAST)
def test_20_steps(backend, dtype, optimizer):
    tables = make_tables(NUM_USERS, NUM_ITEMS, 32, dtype=dtype, seed=9)
    tensors = tables + make_states(tables, optimizer, seed=10)
    got, want = clone_all(*tensors), clone_all(*tensors)
    step = kernel(backend)
    for k in range(20):
        users, pos, neg = make_triples(1024, 100 + k)
        loss = step(*got, users, pos, neg, 0, 0.02, optimizer, 0.05, 1e-8)
        expected = reference_step(*want, users, pos, neg, 0, 0.02, optimizer, 0.05, 1e-8)
        torch.testing.assert_close(loss, expected, **tolerance(dtype),
                                   msg=lambda m, k=k: f"step {k}: {m}")
    assert_all_close(got, want, dtype)


# ---------------------------------------------------------------------------------------
# Determinism: bit-identical run after run, and on one thread or two


def _run(backend, dtype):
    tables = make_tables(5_000, 2_000, 64, dtype=dtype, seed=11)
    tensors = clone_all(*tables, *make_states(tables, 1, seed=12))
    step = kernel(backend)
    losses = []
    for k in range(3):
        users, pos, neg = make_triples(8192, 200 + k, num_users=5_000, num_items=2_000)
        losses.append(step(*tensors, users, pos, neg, 0, 0.01, 1, 0.05, 1e-8))
    return losses + list(tensors)


def _set_threads(backend, n):
    if backend == "numba":
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:
        torch.set_num_threads(n)


def _get_threads(backend):
    if backend == "numba":
        import numba

        return numba.get_num_threads()
    return torch.get_num_threads()


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("backend", FAST)
def test_deterministic_across_runs_and_threads(backend, dtype):
    saved = _get_threads(backend)
    try:
        _set_threads(backend, 2)
        first, second = _run(backend, dtype), _run(backend, dtype)
        _set_threads(backend, 1)
        single = _run(backend, dtype)
    finally:
        _set_threads(backend, saved)
    for a, b, c in zip(first, second, single):
        if a is None:
            continue
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------
# opcheck: schema (what is mutated), fake kernel, autograd registration, AOT dispatch


def _opcheck_cases():
    tables = make_tables(40, 30, 8, seed=13)
    users, pos, neg = make_triples(64, 14, num_users=40, num_items=30)
    return {
        "adagrad_bias": (*clone_all(*tables, *make_states(tables, 1, 15)), users, pos, neg, 0,
                         0.01, 1, 0.05, 1e-8),
        "rowwise_int32": (*clone_all(*tables, *make_states(tables, 2, 16)),
                          users.int(), pos.int(), neg.int(), 0, 0.0, 2, 0.05, 1e-8),
        "sgd_no_bias": (*clone_all(*tables[:2]), None, None, None, None, None, None, users, pos,
                        neg, 0, 0.01, 0, 0.05, 0.0),
    }


@requires_native
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    import fastmf.ops  # noqa: F401  (registers the fake kernel)

    torch.library.opcheck(torch.ops.fastmf.train_step_pairwise.default, _opcheck_cases()[case])


# ---------------------------------------------------------------------------------------
# Bad inputs: the right exception and message, the same on every backend, nothing written

OP = "fastmf.train_step_pairwise: "


def _bad_cases():
    tables = make_tables(20, 10, 4, seed=0)
    states = make_states(tables, 1, seed=1)
    rowwise = make_states(tables, 2, seed=2)
    users, pos, neg = make_triples(6, 3, num_users=20, num_items=10)

    def with_id(ids, k, value):
        ids = ids.clone()
        ids[k] = value
        return ids

    good = dict(P=tables[0], Q=tables[1], bu=tables[2], bi=tables[3], Ps=states[0],
                Qs=states[1], bus=states[2], bis=states[3], users=users, pos=pos, neg=neg,
                loss=0, opt=1)
    cases = {
        "neg out of range": (dict(neg=with_id(neg, 2, 12)), IndexError,
                             re.escape(OP + "neg_items id 12 out of range [0, 10)")),
        "negative neg": (dict(neg=with_id(neg, 4, -1)), IndexError,
                         re.escape(OP + "neg_items id -1 out of range [0, 10)")),
        "pos out of range": (dict(pos=with_id(pos, 0, 10)), IndexError,
                             re.escape(OP) + r"(pos_)?items id 10 out of range \[0, 10\)"),
        "negative user": (dict(users=with_id(users, 1, -3)), IndexError,
                          re.escape(OP + "users id -3 out of range [0, 20)")),
        "neg shorter": (dict(neg=neg[:5]), ValueError, "lengths differ"),
        "pos shorter": (dict(pos=pos[:5]), ValueError, "lengths differ"),
        "float neg": (dict(neg=neg.float()), TypeError, "neg_items must be int32 or int64"),
        "float users": (dict(users=users.double()), TypeError, "users must be int32 or int64"),
        "2-D neg": (dict(neg=neg.view(2, 3)), ValueError, "neg_items must be 1-D"),
        "loss code": (dict(loss=1), ValueError, "unknown pairwise loss code 1"),
        "negative loss code": (dict(loss=-1), ValueError, "unknown pairwise loss code -1"),
        "optimizer code": (dict(opt=3), ValueError, "unknown optimizer code 3"),
        "one bias": (dict(bu=None), ValueError, "both be given or both None"),
        "rowwise state for adagrad": (dict(Ps=rowwise[0]), ValueError,
                                      r"user_factors_state must be 2-D, got shape .20,?."),
        "adagrad state for rowwise": (dict(opt=2, Ps=states[0], Qs=rowwise[1]), ValueError,
                                      r"user_factors_state must be 1-D, got shape .20, 4."),
        "state rows": (dict(Qs=torch.rand(11, 4)), ValueError,
                       r"item_factors_state has shape .11, 4., expected .10, 4."),
        "item bias state shape": (dict(bis=torch.rand(11)), ValueError,
                                  "item_bias_state has shape"),
        "missing user bias state": (dict(bus=None), ValueError,
                                    "adagrad needs user_bias_state, got None"),
        "state dtype": (dict(Qs=states[1].double()), TypeError, "item_factors_state has dtype"),
        "weights dtype": (dict(Q=tables[1].double()), TypeError, "item_factors has dtype"),
    }
    return good, cases


BAD_CASES = list(_bad_cases()[1])
# The cases whose messages print no dtype or shape: C++ spells those its own way
# ("Float", "[20, 4]"), the Python checks torch's ("torch.float32", "(20, 4)").
VERBATIM_CASES = ["neg out of range", "negative neg", "pos out of range", "negative user",
                  "neg shorter", "pos shorter", "loss code", "negative loss code",
                  "optimizer code", "one bias", "missing user bias state"]


def _call_bad(backend, case):
    good, cases = _bad_cases()
    change, exc, pattern = cases[case]
    args = {**good, **change}
    tensors = [args[k] for k in ("P", "Q", "bu", "bi", "Ps", "Qs", "bus", "bis")]
    before = clone_all(*tensors)
    with pytest.raises(exc, match=pattern) as info:
        kernel(backend)(*tensors, args["users"], args["pos"], args["neg"], args["loss"], 0.01,
                        args["opt"], 0.1, 1e-8)
    for t, b in zip(tensors, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"
    return str(info.value)


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("backend", ALL)
def test_bad_inputs(backend, case):
    _call_bad(backend, case)


@pytest.mark.parametrize("case", VERBATIM_CASES)
def test_bad_input_messages_agree(case):
    names = ["reference"] + [b for b in ("numba", "native") if b in backends.available_backends()]
    if len(names) < 2:
        pytest.skip("needs a fast backend")
    messages = {name: _call_bad(name, case) for name in names}
    # The native error also carries a C++ location on the following lines.
    first = {name: m.splitlines()[0] for name, m in messages.items()}
    assert len(set(first.values())) == 1, first


@requires_numba
def test_numba_rejects_other_devices():
    from fastmf import numba_pairwise

    tables = make_tables(20, 10, 4, bias=False, seed=0)
    users, pos, neg = make_triples(6, 3, num_users=20, num_items=10)
    with pytest.raises(ValueError, match="numba backend runs on CPU tensors only"):
        numba_pairwise.train_step_pairwise(tables[0].to("meta"), tables[1], None, None, None,
                                           None, None, None, users, pos, neg, 0, 0.0, 0, 0.1,
                                           0.0)
    with pytest.raises(ValueError, match="unknown pairwise loss 'warp'"):
        numba_pairwise.train_step_pairwise(*tables, None, None, None, None, users, pos, neg,
                                           "warp", 0.0, 0, 0.1, 0.0)
