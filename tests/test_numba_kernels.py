"""The Numba backend against the spec (fastmf.reference): every kernel, every loss and
optimizer, both id and weight dtypes, empty to large batches; determinism across runs and
thread counts; and the input checks.

The kernels compile once per weight dtype (ids are widened to int64 and absent tables are
empty arrays), so the grid below costs eight compilations on a cold cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmf import reference
from fastmf.testing import BATCH_SIZES, ID_DTYPES, WEIGHT_DTYPES, make_batch, make_tables, tolerance

numba = pytest.importorskip("numba")
nk = pytest.importorskip("fastmf.numba_kernels")

KERNELS_AT_IMPORT = [
    f for f in vars(nk).values() if isinstance(f, numba.core.dispatcher.Dispatcher)
]
COMPILED_AT_IMPORT = sum(len(f.signatures) for f in KERNELS_AT_IMPORT)

NUM_USERS, NUM_ITEMS, DIM = 300, 200, 12
LOSSES = list(reference.LOSSES)
OPTIMIZERS = list(reference.OPTIMIZERS)
# (users dtype, items dtype): the two may differ.
ID_PAIRS = [(d, d) for d in ID_DTYPES] + [(torch.int32, torch.int64)]


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **tolerance(dtype))


def rand_state(shape, dtype, seed):
    """Positive, never-zero Adagrad accumulators."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.05).to(dtype)


def make_states(tables, optimizer, seed):
    """States for ``optimizer`` (None for SGD), random and never zero."""
    if optimizer == "sgd":
        return (None,) * 4
    rowwise = optimizer == "rowwise_adagrad"
    return tuple(
        None if t is None else rand_state(t.shape[:1] if rowwise else t.shape, t.dtype, seed + k)
        for k, t in enumerate(tables)
    )


def batch_for(batch, id_pair, dtype, loss, seed, num_users=NUM_USERS, num_items=NUM_ITEMS):
    users, items, targets = make_batch(num_users, num_items, batch, id_dtype=id_pair[0],
                                       dtype=dtype, seed=seed, implicit=loss == "bce")
    return users, items.to(id_pair[1]), targets


def clones(*tensors):
    return tuple(None if t is None else t.clone() for t in tensors)


def assert_all_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            close(a, e, dtype)


# ---------------------------------------------------------------------------------------------
# Each kernel against the reference


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_pair", ID_PAIRS)
def test_mf_forward(id_pair, dtype, batch, bias):
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=1)
    users, items, _ = batch_for(batch, id_pair, dtype, "mse", seed=2)
    out = nk.mf_forward(users, items, *tables, 3.25)
    assert out.shape == (batch,) and out.dtype == dtype
    close(out, reference.mf_forward(users, items, *tables, 3.25), dtype)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_pair", ID_PAIRS)
def test_mf_backward(id_pair, dtype, batch):
    P, Q, _, _ = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=3)
    users, items, _ = batch_for(batch, id_pair, dtype, "mse", seed=4)
    grad_out = torch.randn(batch, generator=torch.Generator().manual_seed(5), dtype=dtype)
    grad_p, grad_q = nk.mf_backward(grad_out, users, items, P, Q)
    assert grad_p.shape == grad_q.shape == (batch, DIM)
    expected_p, expected_q = reference.mf_backward(grad_out, users, items, P, Q)
    close(grad_p, expected_p, dtype)
    close(grad_q, expected_q, dtype)


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_sparse_updates(id_dtype, dtype, batch, optimizer, ndim):
    P, _, bu, _ = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=6)
    weight = P if ndim == 2 else bu
    ids, _, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    grad_rows = torch.randn((batch,) + tuple(weight.shape[1:]), generator=gen, dtype=dtype)
    rowwise = optimizer == "rowwise_adagrad"
    ours, theirs = weight.clone(), weight.clone()
    if optimizer == "sgd":
        nk.sparse_sgd_update(ours, ids, grad_rows, 0.1)
        reference.sparse_sgd_update(theirs, ids, grad_rows, 0.1)
    else:
        state = rand_state(weight.shape[:1] if rowwise else weight.shape, dtype, seed=9)
        our_state, their_state = state.clone(), state.clone()
        nk.sparse_adagrad_update(ours, our_state, ids, grad_rows, 0.1, 1e-8, rowwise)
        reference.sparse_adagrad_update(theirs, their_state, ids, grad_rows, 0.1, 1e-8, rowwise)
        close(our_state, their_state, dtype)
    close(ours, theirs, dtype)
    if batch == 0:
        assert torch.equal(ours, weight)


def check_train_step(id_pair, dtype, batch, loss, optimizer, reg, bias):
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=10)
    states = make_states(tables, optimizer, seed=11)
    users, items, targets = batch_for(batch, id_pair, dtype, loss, seed=12)
    ours_t, ours_s = clones(*tables), clones(*states)
    theirs_t, theirs_s = clones(*tables), clones(*states)
    # loss and optimizer by name for one half of the grid, by code for the other
    codes = id_pair[0] == torch.int64
    loss_arg = reference.LOSS_CODES[loss] if codes else loss
    opt_arg = reference.OPTIMIZER_CODES[optimizer] if codes else optimizer
    value = nk.train_step(*ours_t, *ours_s, users, items, targets, 3.0, loss_arg, reg, opt_arg,
                          0.05, 1e-8)
    expected = reference.train_step(*theirs_t, *theirs_s, users, items, targets, 3.0, loss, reg,
                                     optimizer, 0.05, 1e-8)
    assert value.shape == () and value.dtype == dtype
    close(value, expected, dtype)
    assert_all_close(ours_t, theirs_t, dtype)
    assert_all_close(ours_s, theirs_s, dtype)
    if batch == 0:
        assert float(value) == 0.0
        assert_all_close(ours_t, tables, dtype)


def train_grid():
    """Every loss x optimizer x reg x batch x weight dtype with int64 ids; int32 and mixed
    ids (which only change the id conversion) on a diagonal of the loss x optimizer grid."""
    diagonal = set(zip(LOSSES, OPTIMIZERS))
    for id_pair in ID_PAIRS:
        for dtype in WEIGHT_DTYPES:
            for batch in BATCH_SIZES:
                for loss in LOSSES:
                    for optimizer in OPTIMIZERS:
                        if id_pair != (torch.int64, torch.int64) and (
                                (loss, optimizer) not in diagonal):
                            continue
                        for reg in (0.0, 0.03):
                            name = "-".join([str(id_pair[0])[6:], str(id_pair[1])[6:],
                                             str(dtype)[6:], str(batch), loss, optimizer,
                                             f"reg{reg}"])
                            yield pytest.param(id_pair, dtype, batch, loss, optimizer, reg,
                                               id=name)


@pytest.mark.parametrize("id_pair, dtype, batch, loss, optimizer, reg", list(train_grid()))
def test_train_step(id_pair, dtype, batch, loss, optimizer, reg):
    check_train_step(id_pair, dtype, batch, loss, optimizer, reg, bias=True)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batch", [0, 7, 4096])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_without_bias(dtype, batch, loss, optimizer):
    check_train_step((torch.int64, torch.int32), dtype, batch, loss, optimizer, 0.03, bias=False)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_repeated(dtype, optimizer, loss):
    """20 steps on fresh Zipf batches track 20 reference steps (errors do not compound)."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=13)
    states = make_states(tables, optimizer, seed=14)
    ours_t, ours_s = clones(*tables), clones(*states)
    theirs_t, theirs_s = clones(*tables), clones(*states)
    for step in range(20):
        users, items, targets = batch_for(512, (torch.int64, torch.int64), dtype, loss,
                                          seed=100 + step)
        value = nk.train_step(*ours_t, *ours_s, users, items, targets, 3.0, loss, 0.01,
                              optimizer, 0.05, 1e-8)
        expected = reference.train_step(*theirs_t, *theirs_s, users, items, targets, 3.0,
                                         loss, 0.01, optimizer, 0.05, 1e-8)
        close(value, expected, dtype)
    assert_all_close(ours_t, theirs_t, dtype)
    assert_all_close(ours_s, theirs_s, dtype)


def test_large_tables_and_batch():
    """Ids that need several radix digits, a batch spanning many blocks and chunks."""
    dtype = torch.float32
    tables = make_tables(70_000, 5_000, 8, dtype=dtype, seed=15)
    states = make_states(tables, "adagrad", seed=16)
    users, items, targets = make_batch(70_000, 5_000, 20_000, dtype=dtype, seed=17)
    ours_t, ours_s = clones(*tables), clones(*states)
    value = nk.train_step(*ours_t, *ours_s, users, items, targets, 3.0, "huber", 0.01,
                          "adagrad", 0.05, 1e-8)
    expected = reference.train_step(*tables, *states, users, items, targets, 3.0, "huber",
                                     0.01, "adagrad", 0.05, 1e-8)
    close(value, expected, dtype)
    assert_all_close(ours_t, tables, dtype)
    assert_all_close(ours_s, states, dtype)


# ---------------------------------------------------------------------------------------------
# In-place semantics


def test_updates_land_in_non_contiguous_tables():
    dtype = torch.float64
    P, Q, bu, bi = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=18)
    wide = torch.cat([P, torch.ones_like(P)], dim=1)  # P as a strided column slice
    strided_p = wide[:, :DIM]
    assert not strided_p.is_contiguous()
    states = make_states((P, Q, bu, bi), "adagrad", seed=19)
    strided_state = states[0].t().contiguous().t()
    assert not strided_state.is_contiguous()
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 256, dtype=dtype, seed=20)
    ours = (strided_p, Q.clone(), bu.clone(), bi.clone())
    ours_s = (strided_state,) + clones(*states[1:])
    nk.train_step(*ours, *ours_s, users, items, targets, 3.0, "mse", 0.0, "adagrad", 0.05, 1e-8)
    theirs, theirs_s = clones(P, Q, bu, bi), clones(*states)
    reference.train_step(*theirs, *theirs_s, users, items, targets, 3.0, "mse", 0.0, "adagrad",
                         0.05, 1e-8)
    close(wide[:, :DIM], theirs[0], dtype)
    assert torch.equal(wide[:, DIM:], torch.ones_like(P))
    close(strided_state, theirs_s[0], dtype)

    weight = P.t().contiguous().t()
    grad_rows = torch.randn(256, DIM, dtype=dtype)
    expected = P.clone()
    nk.sparse_sgd_update(weight, users, grad_rows, 0.1)
    reference.sparse_sgd_update(expected, users, grad_rows, 0.1)
    close(weight, expected, dtype)


def test_parameters_that_require_grad():
    P, Q, bu, bi = (torch.nn.Parameter(t) for t in make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=21))
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=22)
    before = P.detach().clone()
    value = nk.train_step(P, Q, bu, bi, None, None, None, None, users, items, targets, 3.0,
                          "mse", 0.0, "sgd", 0.05, 0.0)
    assert not value.requires_grad
    assert not torch.equal(P.detach(), before)
    pred = nk.mf_forward(users, items, P, Q, bu, bi, 3.0)
    close(pred, reference.mf_forward(users, items, P, Q, bu, bi, 3.0).detach(), torch.float32)


def test_in_place_updates_bump_the_version():
    """As PyTorch's own in-place ops do, so autograd notices a modified saved tensor."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=35)
    states = make_states(tables, "adagrad", seed=36)
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=37)
    before = [t._version for t in tables + states]
    nk.train_step(*tables, *states, users, items, targets, 3.0, "mse", 0.0, "adagrad", 0.05,
                  1e-8)
    assert all(t._version > v for t, v in zip(tables + states, before))
    weight, state = tables[0], states[0]
    versions = weight._version, state._version
    nk.sparse_adagrad_update(weight, state, users, torch.ones(64, DIM), 0.1, 1e-8, False)
    assert weight._version > versions[0] and state._version > versions[1]


# ---------------------------------------------------------------------------------------------
# Determinism


def run_steps(dtype, optimizer, steps=3):
    tables = make_tables(2_000, 1_000, 16, dtype=dtype, seed=23)
    states = make_states(tables, optimizer, seed=24)
    losses = []
    for step in range(steps):
        users, items, targets = make_batch(2_000, 1_000, 8192, dtype=dtype, seed=200 + step)
        losses.append(nk.train_step(*tables, *states, users, items, targets, 3.0, "mse", 0.02,
                                    optimizer, 0.05, 1e-8))
    return [t for t in tables + states + tuple(losses) if t is not None]


def assert_bit_identical(first, second):
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bit_identical_across_runs(optimizer):
    assert_bit_identical(run_steps(torch.float32, optimizer), run_steps(torch.float32, optimizer))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bit_identical_across_thread_counts(optimizer):
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_steps(torch.float32, optimizer)
        users, items, _ = make_batch(2_000, 1_000, 8192, seed=25)
        tables = make_tables(2_000, 1_000, 16, seed=26)
        forward_one = nk.mf_forward(users, items, *tables, 3.0)
        numba.set_num_threads(2)
        two = run_steps(torch.float32, optimizer)
        forward_two = nk.mf_forward(users, items, *tables, 3.0)
    finally:
        numba.set_num_threads(saved)
    assert_bit_identical(one, two)
    assert torch.equal(forward_one, forward_two)


def test_serial_path_matches_parallel_path(monkeypatch):
    """Small batches skip the thread pool; the same batch through the pool is bit-identical."""
    monkeypatch.setattr(nk, "_PARALLEL_MIN_SAMPLES", 1 << 62)
    serial = run_steps(torch.float64, "adagrad", steps=2)
    monkeypatch.setattr(nk, "_PARALLEL_MIN_SAMPLES", 0)
    parallel = run_steps(torch.float64, "adagrad", steps=2)
    assert_bit_identical(serial, parallel)


# ---------------------------------------------------------------------------------------------
# Input checks


def good_step_args(optimizer="adagrad", dtype=torch.float32):
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=27)
    states = make_states(tables, optimizer, seed=28)
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 16, dtype=dtype, seed=29)
    return dict(
        user_factors=tables[0], item_factors=tables[1], user_bias=tables[2],
        item_bias=tables[3], user_factors_state=states[0], item_factors_state=states[1],
        user_bias_state=states[2], item_bias_state=states[3], users=users, items=items,
        targets=targets, global_mean=3.0, loss="mse", reg=0.01, optimizer=optimizer, lr=0.05,
        eps=1e-8,
    )


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def bad_step_cases():
    a = good_step_args()
    n = a["users"].shape[0]
    meta = torch.empty(NUM_USERS, DIM, device="meta")
    return [
        ("user id high", dict(users=with_value(a["users"], -1, NUM_USERS)), IndexError,
         rf"users id {NUM_USERS} out of range \[0, {NUM_USERS}\)"),
        ("user id negative", dict(users=with_value(a["users"], 3, -2)), IndexError,
         rf"users id -2 out of range \[0, {NUM_USERS}\)"),
        ("item id high", dict(items=with_value(a["items"], 0, NUM_ITEMS + 5)), IndexError,
         rf"items id {NUM_ITEMS + 5} out of range"),
        ("float ids", dict(users=a["users"].double()), TypeError, "users must be int32 or int64"),
        ("2-D ids", dict(items=a["items"][:, None]), ValueError, "items must be 1-D"),
        ("int weights", dict(user_factors=a["user_factors"].int()), TypeError,
         "user_factors must be float32 or float64"),
        ("mixed weights", dict(item_factors=a["item_factors"].double()), TypeError,
         "item_factors has dtype"),
        ("dims differ", dict(item_factors=a["item_factors"][:, :-1].contiguous()), ValueError,
         "dim"),
        ("one bias", dict(item_bias=None), ValueError, "both"),
        ("bias rows", dict(user_bias=a["user_bias"][:-1]), ValueError, "user_bias has"),
        ("lengths", dict(items=a["items"][:-1]), ValueError, "lengths differ"),
        ("target length", dict(targets=a["targets"][:-1]), ValueError, "lengths differ"),
        ("nan target", dict(targets=with_value(a["targets"], n - 1, float("nan"))), ValueError,
         "targets contains a non-finite value"),
        ("inf target", dict(targets=with_value(a["targets"], 0, float("inf"))), ValueError,
         "targets contains a non-finite value"),
        ("target dtype", dict(targets=a["targets"].double()), TypeError, "targets has dtype"),
        ("missing state", dict(item_factors_state=None), ValueError,
         "adagrad needs item_factors_state"),
        ("state shape", dict(user_factors_state=a["user_factors_state"][:, :2]), ValueError,
         "user_factors_state has shape"),
        ("rowwise state shape", dict(optimizer="rowwise_adagrad"), ValueError,
         "user_factors_state must be 1-D"),
        ("state dtype", dict(user_bias_state=a["user_bias_state"].double()), TypeError,
         "user_bias_state has dtype"),
        ("loss name", dict(loss="hinge"), ValueError, "unknown loss"),
        ("loss code", dict(loss=7), ValueError, "unknown loss code 7"),
        ("optimizer name", dict(optimizer="adam"), ValueError, "unknown optimizer"),
        ("optimizer code", dict(optimizer=-1), ValueError, "unknown optimizer code -1"),
        ("not on cpu", dict(user_factors=meta), ValueError,
         "numba backend runs on CPU tensors only; use backend='native' for CUDA"),
    ]


@pytest.mark.parametrize("case", bad_step_cases(), ids=lambda c: c[0])
def test_train_step_rejects(case):
    _, change, error, message = case
    args = good_step_args()
    args.update(change)
    before = [t.clone() for t in args.values() if isinstance(t, torch.Tensor) and t.is_cpu]
    with pytest.raises(error, match=message):
        nk.train_step(**args)
    after = [t for t in args.values() if isinstance(t, torch.Tensor) and t.is_cpu]
    assert_bit_identical(before, after)  # a rejected step writes nothing


def test_train_step_rejects_shared_tables():
    args = good_step_args(optimizer="sgd")
    args.update(item_factors=args["user_factors"], item_bias=args["user_bias"],
                items=args["users"])
    with pytest.raises(ValueError, match="share memory"):
        nk.train_step(**args)


def test_train_step_empty_batch_still_checks():
    args = good_step_args()
    args.update(users=args["users"][:0].float(), items=args["items"][:0],
                targets=args["targets"][:0])
    with pytest.raises(TypeError, match="users must be int32 or int64"):
        nk.train_step(**args)


def forward_args():
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=30)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, 2000, seed=31)
    return users, items, tables


@pytest.mark.parametrize("where", [0, 1999])
def test_forward_and_backward_reject_bad_ids(where):
    users, items, (P, Q, bu, bi) = forward_args()
    bad_items = with_value(items, where, NUM_ITEMS)
    with pytest.raises(IndexError, match=rf"fastmf.mf_forward: items id {NUM_ITEMS} out of"):
        nk.mf_forward(users, bad_items, P, Q, bu, bi, 0.0)
    grad = torch.ones(users.shape[0])
    with pytest.raises(IndexError, match="fastmf.mf_backward: users id -1 out of range"):
        nk.mf_backward(grad, with_value(users, where, -1), items, P, Q)


def test_forward_and_backward_reject_bad_structure():
    users, items, (P, Q, bu, bi) = forward_args()
    with pytest.raises(TypeError, match="item_factors has dtype"):
        nk.mf_forward(users, items, P, Q.double(), bu, bi, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        nk.mf_forward(users, items[:-1], P, Q, bu, bi, 0.0)
    with pytest.raises(ValueError, match="both be given or both None"):
        nk.mf_forward(users, items, P, Q, bu, None, 0.0)
    with pytest.raises(ValueError, match="numba backend runs on CPU tensors only"):
        nk.mf_forward(users, items, P.to("meta"), Q, bu, bi, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        nk.mf_backward(torch.ones(5), users, items, P, Q)
    with pytest.raises(TypeError, match="grad_out has dtype"):
        nk.mf_backward(torch.ones(users.shape[0], dtype=torch.float64), users, items, P, Q)


def sparse_cases():
    P, _, bu, _ = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=32)
    ids, _, _ = make_batch(NUM_USERS, NUM_ITEMS, 50, seed=33)
    grads = torch.randn(50, DIM)
    state = rand_state(P.shape, torch.float32, seed=34)
    return P, bu, ids, grads, state


def test_sparse_updates_reject():
    P, bu, ids, grads, state = sparse_cases()
    op = "fastmf.sparse_adagrad_update"
    cases = [
        (dict(ids=with_value(ids, 49, NUM_USERS)), IndexError,
         rf"{op}: ids id {NUM_USERS} out of range \[0, {NUM_USERS}\)"),
        (dict(ids=with_value(ids, 0, -1)), IndexError, "ids id -1 out of range"),
        (dict(ids=ids.float()), TypeError, "ids must be int32 or int64"),
        (dict(grad_rows=grads[:-1]), ValueError, "lengths differ"),
        (dict(grad_rows=grads[:, :-1]), ValueError, "grad_rows has"),
        (dict(grad_rows=grads.double()), TypeError, "grad_rows has dtype"),
        (dict(state=state[:, :-1]), ValueError, "state has shape"),
        (dict(state=state[:, 0]), ValueError, "state must be 2-D"),
        (dict(weight=P.int()), TypeError, "weight must be float32 or float64"),
        (dict(weight=P.to("meta")), ValueError, "numba backend runs on CPU tensors only"),
    ]
    for change, error, message in cases:
        args = dict(weight=P.clone(), state=state.clone(), ids=ids, grad_rows=grads, lr=0.1,
                    eps=1e-8, rowwise=False)
        args.update(change)
        before = [t.clone() for t in args.values() if isinstance(t, torch.Tensor) and t.is_cpu]
        with pytest.raises(error, match=message):
            nk.sparse_adagrad_update(**args)
        after = [t for t in args.values() if isinstance(t, torch.Tensor) and t.is_cpu]
        assert_bit_identical(before, after)
    with pytest.raises(ValueError, match="state must be 1-D"):
        nk.sparse_adagrad_update(P.clone(), state, ids, grads, 0.1, 1e-8, True)
    with pytest.raises(IndexError, match="fastmf.sparse_sgd_update: ids id 300 out of range"):
        nk.sparse_sgd_update(bu.clone(), with_value(ids, 7, 300), grads[:, 0], 0.1)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        nk.sparse_sgd_update(P[None].clone(), ids, grads, 0.1)


# ---------------------------------------------------------------------------------------------
# Packaging


def test_import_does_not_compile():
    # Counted when this module was imported, during collection, before any test ran.
    assert KERNELS_AT_IMPORT, "no jitted kernels found"
    assert COMPILED_AT_IMPORT == 0


def test_loss_matches_numpy_on_a_hand_example():
    """A tiny case checked by hand arithmetic, independent of the reference."""
    P = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    Q = torch.tensor([[0.25, 1.0]], dtype=torch.float64)
    users = torch.tensor([0, 1, 0])
    items = torch.tensor([0, 0, 0])
    targets = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    pred = np.array([0.25 + 2.0, 0.125 - 1.0, 0.25 + 2.0]) + 1.0
    expected = np.mean((pred - targets.numpy()) ** 2)
    value = nk.train_step(P.clone(), Q.clone(), None, None, None, None, None, None, users, items,
                          targets, 1.0, "mse", 0.0, "sgd", 0.1, 0.0)
    assert float(value) == pytest.approx(expected, rel=1e-12)
