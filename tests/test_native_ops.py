"""The native CPU kernels (fastmf._C) against the spec in fastmf.reference.

Every op is compared with its reference on fresh random tables and Zipf ids (many
duplicates), over id dtype x weight dtype x batch size, plus losses, optimizers and reg for
the fused step; then determinism, opcheck, gradcheck and bad inputs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fastmf import reference as ref
from fastmf._extension import LOAD_ERROR, native_available
from fastmf.testing import (
    BATCH_SIZES,
    ID_DTYPES,
    WEIGHT_DTYPES,
    clone_all,
    make_batch,
    make_tables,
    tolerance,
    zipf_ids,
)

if not native_available():
    pytest.skip(f"fastmf._C is not available: {LOAD_ERROR}", allow_module_level=True)

from fastmf import ops  # noqa: E402  (registers the fake kernels and autograd)

NUM_USERS, NUM_ITEMS, DIM = 300, 200, 13
LOSSES = list(range(len(ref.LOSSES)))
OPTIMIZERS = list(range(len(ref.OPTIMIZERS)))


def _states(tables, optimizer, seed=7):
    """Random positive optimizer states for (P, Q, b_u, b_i): None for SGD, per-row
    vectors for the row-wise Adagrad factor tables."""
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


def _reference(fn, *args):
    """Runs a reference op on one thread: its many small torch ops gain nothing from a
    second thread, and on a busy machine OpenMP's waits made them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _train_both(got, want, users, items, targets, *hyper):
    """One native step on the tables `got` and one reference step on `want`: the losses."""
    return (ops.train_step(*got, users, items, targets, *hyper),
            _reference(ref.train_step, *want, users, items, targets, *hyper))


def _assert_all_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tolerance(dtype))


def _grad_rows(n, width, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if width is None else (n, width)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


# ---------------------------------------------------------------------------------------
# Each op against the reference


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_mf_forward(id_dtype, dtype, batch, bias):
    P, Q, bu, bi = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=batch)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, seed=batch)
    got = ops.mf_forward(users, items, P, Q, bu, bi, 3.5)
    want = _reference(ref.mf_forward, users, items, P, Q, bu, bi, 3.5)
    assert got.dtype == dtype and got.shape == (batch,)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_mf_backward(id_dtype, dtype, batch):
    P, Q, _, _ = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=False, seed=batch)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, seed=batch)
    grad = _grad_rows(batch, None, dtype, seed=batch)
    got = ops.mf_backward(grad, users, items, P, Q)
    want = _reference(ref.mf_backward, grad, users, items, P, Q)
    for g, w in zip(got, want):
        assert g.shape == (batch, DIM)
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("table", ["factors", "bias"])
@pytest.mark.parametrize("rowwise", [False, True])
def test_sparse_adagrad_update(id_dtype, dtype, batch, table, rowwise):
    width = DIM if table == "factors" else None
    weight = make_tables(NUM_USERS, 1, DIM, dtype=dtype, seed=batch)[0 if width else 2]
    per_row = rowwise and weight.dim() == 2
    state = (torch.rand(weight.shape[:1] if per_row else weight.shape, dtype=torch.float64)
             * 0.1 + 0.01).to(dtype)
    ids = zipf_ids(NUM_USERS, batch, generator=np.random.default_rng(batch), dtype=id_dtype)
    grad = _grad_rows(batch, width, dtype, seed=batch + 1)
    w_got, s_got = weight.clone(), state.clone()
    ops.sparse_adagrad_update(w_got, s_got, ids, grad, 0.05, 1e-8, rowwise)
    _reference(ref.sparse_adagrad_update, weight, state, ids, grad, 0.05, 1e-8, rowwise)
    _assert_all_close((w_got, s_got), (weight, state), dtype)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("table", ["factors", "bias"])
def test_sparse_sgd_update(id_dtype, dtype, batch, table):
    width = DIM if table == "factors" else None
    weight = make_tables(NUM_USERS, 1, DIM, dtype=dtype, seed=batch)[0 if width else 2]
    ids = zipf_ids(NUM_USERS, batch, generator=np.random.default_rng(batch), dtype=id_dtype)
    grad = _grad_rows(batch, width, dtype, seed=batch + 1)
    got = weight.clone()
    ops.sparse_sgd_update(got, ids, grad, 0.1)
    _reference(ref.sparse_sgd_update, weight, ids, grad, 0.1)
    torch.testing.assert_close(got, weight, **tolerance(dtype))


def test_sparse_update_touches_only_given_rows():
    weight, _, _, _ = make_tables(1000, 1, 8, seed=0)
    state = torch.rand(1000, 8)
    ids = torch.tensor([5, 900, 5, 17])
    before_w, before_s = weight.clone(), state.clone()
    ops.sparse_adagrad_update(weight, state, ids, _grad_rows(4, 8, torch.float32, 0), 0.1, 1e-8,
                              False)
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(weight[untouched], before_w[untouched])
    assert torch.equal(state[untouched], before_s[untouched])
    assert not torch.equal(weight[ids], before_w[ids])


def test_sparse_update_wide_id_range():
    """Many rows: the radix sort needs several digit passes over the ids."""
    num_rows = 5_000_000
    weight = torch.rand(num_rows, dtype=torch.float64)
    rng = np.random.default_rng(3)
    ids = torch.from_numpy(np.concatenate([rng.integers(0, num_rows, 3000),
                                           rng.integers(0, 50, 3000)]))
    grad = _grad_rows(ids.numel(), None, torch.float64, seed=4)
    got = weight.clone()
    ops.sparse_sgd_update(got, ids, grad, 0.5)
    _reference(ref.sparse_sgd_update, weight, ids, grad, 0.5)
    torch.testing.assert_close(got, weight, **tolerance(torch.float64))


def _train_inputs(dtype, id_dtype, batch, loss, optimizer, bias=True, dim=DIM, seed=0):
    tables = make_tables(NUM_USERS, NUM_ITEMS, dim, dtype=dtype, bias=bias, seed=seed)
    states = _states(tables, optimizer, seed=seed + 1)
    batch_ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, dtype=dtype,
                        seed=seed + 2, implicit=loss == 2)
    return tables + states, batch_


@pytest.mark.parametrize("reg", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_train_step(id_dtype, dtype, batch, loss, optimizer, reg):
    tensors, (users, items, targets) = _train_inputs(dtype, id_dtype, batch, loss, optimizer,
                                                     seed=batch + loss)
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss_got, loss_want = _train_both(got, want, users, items, targets, 3.0, loss, reg,
                                      optimizer, 0.05, 1e-8)
    assert loss_got.shape == () and loss_got.dtype == dtype
    torch.testing.assert_close(loss_got, loss_want, **tolerance(dtype))
    _assert_all_close(got, want, dtype)
    if batch == 0:
        assert all(g is None or torch.equal(g, t) for g, t in zip(got, tensors))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dim", [1, 8, 64, 130])
def test_train_step_dims_without_bias(dim, optimizer):
    """Odd and large K (tails of the vector loops, several Adagrad chunks); no biases."""
    tensors, (users, items, targets) = _train_inputs(torch.float64, torch.int64, 512, 0,
                                                     optimizer, bias=False, dim=dim)
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss_got, loss_want = _train_both(got, want, users, items, targets, 3.0, 0, 0.01,
                                      optimizer, 0.05, 1e-8)
    torch.testing.assert_close(loss_got, loss_want, **tolerance(torch.float64))
    _assert_all_close(got, want, torch.float64)


def test_train_step_mixed_id_dtypes_and_strided_inputs():
    """int32 users with int64 items; strided ids, targets and tables (updated in place)."""
    dtype = torch.float64
    tensors, (users, items, targets) = _train_inputs(dtype, torch.int64, 600, 0, 1)
    wide = torch.zeros(NUM_USERS, DIM * 2, dtype=dtype)
    wide[:, ::2] = tensors[0]
    strided_p = wide[:, ::2]
    assert not strided_p.is_contiguous()
    users2 = users.to(torch.int32).repeat_interleave(2)[::2]
    items2 = items.repeat_interleave(2)[::2]
    targets2 = targets.repeat_interleave(2)[::2]
    got = (strided_p,) + clone_all(*tensors[1:])
    want = clone_all(*tensors)
    loss_got, loss_want = _train_both(got, want, users2, items2, targets2, 3.0, 0, 0.01, 1,
                                      0.05, 1e-8)
    torch.testing.assert_close(loss_got, loss_want, **tolerance(dtype))
    _assert_all_close(got, want, dtype)
    assert torch.equal(wide[:, 1::2], torch.zeros(NUM_USERS, DIM, dtype=dtype))


def test_train_step_single_hot_row():
    """Every sample on one user and one item: one long group per table."""
    dtype = torch.float64
    tensors, (_, _, targets) = _train_inputs(dtype, torch.int64, 4096, 1, 2)
    users = torch.full((4096,), 42)
    items = torch.full((4096,), 7)
    got, want = clone_all(*tensors), clone_all(*tensors)
    loss_got, loss_want = _train_both(got, want, users, items, targets, 3.0, 1, 0.01, 2, 0.05,
                                      1e-8)
    torch.testing.assert_close(loss_got, loss_want, **tolerance(dtype))
    _assert_all_close(got, want, dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_20_steps(dtype, loss, optimizer):
    tensors, _ = _train_inputs(dtype, torch.int64, 1, loss, optimizer, dim=32)
    got, want = clone_all(*tensors), clone_all(*tensors)
    rng = np.random.default_rng(11)
    for step in range(20):
        users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 1024, dtype=dtype,
                                           seed=int(rng.integers(1 << 30)),
                                           implicit=loss == 2)
        loss_got, loss_want = _train_both(got, want, users, items, targets, 3.0, loss, 0.02,
                                          optimizer, 0.02, 1e-8)
        torch.testing.assert_close(loss_got, loss_want, **tolerance(dtype),
                                   msg=lambda m, step=step: f"step {step}: {m}")
    _assert_all_close(got, want, dtype)


# ---------------------------------------------------------------------------------------
# Determinism: bit-identical run after run, and whatever the thread count


def _run_all_ops(dtype, seed=5):
    tensors, (users, items, targets) = _train_inputs(dtype, torch.int64, 8192, 0, 1,
                                                     dim=64, seed=seed)
    tensors = clone_all(*tensors)
    out = [ops.mf_forward(users, items, *tensors[:4], 3.0)]
    out += list(ops.mf_backward(targets, users, items, *tensors[:2]))
    for _ in range(3):
        out.append(ops.train_step(*tensors, users, items, targets, 3.0, 0, 0.01, 1, 0.05,
                                  1e-8))
    grad = _grad_rows(users.numel(), 64, dtype, seed)
    ops.sparse_adagrad_update(tensors[0], tensors[4], users, grad, 0.1, 1e-8, False)
    ops.sparse_sgd_update(tensors[1], items, grad, 0.1)
    return out + list(tensors)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_deterministic_across_runs_and_threads(dtype):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _run_all_ops(dtype), _run_all_ops(dtype)
        torch.set_num_threads(1)
        single = _run_all_ops(dtype)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) and
# gradcheck of the registered autograd formula


def _opcheck_cases():
    P, Q, bu, bi = make_tables(40, 30, 8, seed=1)
    states = _states((P, Q, bu, bi), 1)
    rowwise_states = _states((P, Q, bu, bi), 2)
    users, items, targets = make_batch(40, 30, 64, seed=2)
    grad = _grad_rows(64, 8, torch.float32, 3)
    req = [t.clone().requires_grad_() for t in (P, Q, bu, bi)]
    return {
        "mf_forward": (torch.ops.fastmf.mf_forward.default,
                       (users, items, *req, 3.0)),
        "mf_forward_no_bias": (torch.ops.fastmf.mf_forward.default,
                               (users, items, P, Q, None, None, 3.0)),
        "mf_backward": (torch.ops.fastmf.mf_backward.default,
                        (targets, users, items, P, Q)),
        "sparse_adagrad_update": (torch.ops.fastmf.sparse_adagrad_update.default,
                                  (P.clone(), states[0].clone(), users, grad, 0.1, 1e-8,
                                   False)),
        "sparse_adagrad_update_rowwise": (torch.ops.fastmf.sparse_adagrad_update.default,
                                          (P.clone(), rowwise_states[0].clone(), users, grad,
                                           0.1, 1e-8, True)),
        "sparse_sgd_update": (torch.ops.fastmf.sparse_sgd_update.default,
                              (Q.clone(), items, grad, 0.1)),
        "train_step_adagrad": (torch.ops.fastmf.train_step.default,
                               (*clone_all(P, Q, bu, bi, *states), users, items, targets, 3.0,
                                0, 0.01, 1, 0.05, 1e-8)),
        "train_step_sgd_no_bias": (torch.ops.fastmf.train_step.default,
                                   (*clone_all(P, Q), None, None, None, None, None, None,
                                    users, items, targets, 3.0, 1, 0.0, 0, 0.05, 1e-8)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_train_step_under_compile():
    """fullgraph torch.compile: the fake kernel traces, and the in-place updates survive
    functionalization."""
    tensors, (users, items, targets) = _train_inputs(torch.float32, torch.int64, 64, 0, 1,
                                                     dim=8)
    got, want = clone_all(*tensors), clone_all(*tensors)

    def step(*args):
        return ops.train_step(*args, 3.0, 0, 0.01, 1, 0.05, 1e-8)

    loss_got = torch.compile(step, fullgraph=True)(*got, users, items, targets)
    loss_want = _reference(ref.train_step, *want, users, items, targets, 3.0, 0, 0.01, 1, 0.05,
                           1e-8)
    torch.testing.assert_close(loss_got, loss_want, **tolerance(torch.float32))
    _assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_mf_forward_gradcheck(bias):
    P, Q, bu, bi = make_tables(12, 9, 4, dtype=torch.float64, bias=bias, seed=0)
    users, items, _ = make_batch(12, 9, 16, id_dtype=torch.int32, seed=1)
    inputs = [t.clone().requires_grad_() for t in (P, Q, bu, bi) if t is not None]

    def fn(*tables):
        tables = tables + (None, None) if not bias else tables
        return ops.mf_forward(users, items, *tables, 3.0)

    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------
# Bad inputs: the right exception, a message naming the problem, and nothing written


def _bad_train_step_cases():
    P, Q, bu, bi = make_tables(20, 10, 4, seed=0)
    states = _states((P, Q, bu, bi), 1)
    rowwise = _states((P, Q, bu, bi), 2)
    users, items, targets = make_batch(20, 10, 6, seed=1)
    good = dict(P=P, Q=Q, bu=bu, bi=bi, Ps=states[0], Qs=states[1], bus=states[2],
                bis=states[3], users=users, items=items, targets=targets, loss=0, opt=1)
    nan_targets = targets.clone()
    nan_targets[3] = float("nan")
    inf_targets = targets.clone()
    inf_targets[0] = float("inf")
    bad_items = items.clone()
    bad_items[2] = 12
    neg_users = users.clone()
    neg_users[4] = -1
    cases = {
        "float users": (dict(users=users.float()), TypeError, "users must be int32 or int64"),
        "2-D items": (dict(items=items.view(2, 3)), ValueError, "items must be 1-D"),
        "item out of range": (dict(items=bad_items), IndexError,
                              re.escape("fastmf.train_step: items id 12 out of range [0, 10)")),
        "negative user": (dict(users=neg_users), IndexError,
                          re.escape("fastmf.train_step: users id -1 out of range [0, 20)")),
        "int weights": (dict(P=P.to(torch.int32)), TypeError,
                        "user_factors must be float32 or float64"),
        "mixed weight dtypes": (dict(Q=Q.double()), TypeError, "item_factors has dtype"),
        "dims differ": (dict(Q=torch.rand(10, 5)), ValueError, "dim 4 but item_factors has dim 5"),
        "one bias": (dict(bi=None), ValueError, "both be given or both None"),
        "bias rows": (dict(bu=torch.rand(21)), ValueError, "user_bias has 21 rows"),
        "lengths differ": (dict(items=items[:5]), ValueError, "lengths differ"),
        "targets length": (dict(targets=targets[:5]), ValueError, "lengths differ"),
        "targets dtype": (dict(targets=targets.double()), TypeError, "targets has dtype"),
        "nan targets": (dict(targets=nan_targets), ValueError,
                        r"targets contains a non-finite value \(nan\)"),
        "inf targets": (dict(targets=inf_targets), ValueError, "targets.*non-finite"),
        "loss code": (dict(loss=3), ValueError, "unknown loss code 3"),
        "optimizer code": (dict(opt=-1), ValueError, "unknown optimizer code -1"),
        "missing state": (dict(Qs=None), ValueError, "adagrad needs item_factors_state"),
        "missing bias state": (dict(bus=None), ValueError, "adagrad needs user_bias_state"),
        "rowwise needs state": (dict(opt=2, Ps=None), ValueError,
                                "rowwise_adagrad needs user_factors_state"),
        "state shape": (dict(opt=2), ValueError, "user_factors_state"),
        "rowwise state shape": (dict(Ps=rowwise[0]), ValueError, "user_factors_state"),
        "state dtype": (dict(Qs=states[1].double()), TypeError, "item_factors_state has dtype"),
    }
    return good, cases


@pytest.mark.parametrize("case", list(_bad_train_step_cases()[1]))
def test_train_step_bad_inputs(case):
    good, cases = _bad_train_step_cases()
    change, exc, pattern = cases[case]
    args = {**good, **change}
    tables = [args[k] for k in ("P", "Q", "bu", "bi", "Ps", "Qs", "bus", "bis")]
    before = clone_all(*tables)
    with pytest.raises(exc, match=pattern):
        ops.train_step(*tables, args["users"], args["items"], args["targets"], 3.0,
                       args["loss"], 0.01, args["opt"], 0.1, 1e-8)
    for t, b in zip(tables, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"


def _bad_sparse_cases():
    w, _, b, _ = make_tables(10, 1, 4, seed=0)
    s = torch.rand(10, 4)
    ids = torch.tensor([1, 2, 2, 9])
    g = torch.rand(4, 4)
    adagrad = ops.sparse_adagrad_update
    return {
        "id out of range": (lambda: adagrad(w, s, torch.tensor([1, 10]), g[:2], 0.1, 1e-8,
                                            False),
                            IndexError,
                            re.escape("fastmf.sparse_adagrad_update: ids id 10 out of range "
                                      "[0, 10)")),
        "float ids": (lambda: adagrad(w, s, ids.float(), g, 0.1, 1e-8, False), TypeError,
                      "ids must be int32 or int64"),
        "grad columns": (lambda: adagrad(w, s, ids, torch.rand(4, 3), 0.1, 1e-8, False),
                         ValueError, "grad_rows has 3 columns"),
        "grad length": (lambda: adagrad(w, s, ids, g[:3], 0.1, 1e-8, False), ValueError,
                        "lengths differ"),
        "grad dtype": (lambda: adagrad(w, s, ids, g.double(), 0.1, 1e-8, False), TypeError,
                       "grad_rows has dtype"),
        "bias grad 2-D": (lambda: adagrad(b, torch.rand(10), ids, g, 0.1, 1e-8, False),
                          ValueError, "grad_rows must be 1-D"),
        "state shape": (lambda: adagrad(w, torch.rand(10), ids, g, 0.1, 1e-8, False),
                        ValueError, "state"),
        "rowwise state shape": (lambda: adagrad(w, s, ids, g, 0.1, 1e-8, True), ValueError,
                                "state"),
        "3-D weight": (lambda: adagrad(w.view(10, 2, 2), s, ids, g, 0.1, 1e-8, False),
                       ValueError, "weight must be 1-D or 2-D"),
        "int weight": (lambda: ops.sparse_sgd_update(w.int(), ids, g, 0.1), TypeError,
                       "weight must be float32 or float64"),
        "sgd out of range": (lambda: ops.sparse_sgd_update(w, torch.tensor([-3]), g[:1], 0.1),
                             IndexError, "sparse_sgd_update: ids id -3 out of range"),
        "forward one bias": (lambda: ops.mf_forward(ids, ids, w, w, b, None, 0.0), ValueError,
                             "both be given or both None"),
        "forward out of range": (lambda: ops.mf_forward(ids, torch.tensor([0, 1, 2, 11]), w,
                                                        w, None, None, 0.0),
                                 IndexError, "mf_forward: items id 11 out of range"),
        "backward grad length": (lambda: ops.mf_backward(torch.rand(3), ids, ids, w, w),
                                 ValueError, "lengths differ"),
        "backward grad dtype": (lambda: ops.mf_backward(torch.rand(4).double(), ids, ids, w,
                                                        w),
                                TypeError, "grad_out has dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_sparse_cases()))
def test_other_ops_bad_inputs(case):
    fn, exc, pattern = _bad_sparse_cases()[case]
    with pytest.raises(exc, match=pattern):
        fn()
