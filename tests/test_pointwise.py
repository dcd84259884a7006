"""The pointwise op family (``mf_forward``, ``mf_backward``, ``mf_backward_dense``,
``sparse_adagrad_update``,
``sparse_sgd_update``, ``train_step``) on every backend and device, through
``fastmf.ops.kernels(backend, device)``.

Each op is compared with the spec (``fastmf.ops.reference`` on CPU) on fresh random tables
and Zipf ids (many duplicates), over id dtype × weight dtype × batch size (empty included),
plus every loss, optimizer and reg for the fused step; ``train_step`` is also compared with
textbook PyTorch (``nn.Embedding(sparse=True)`` + ``torch.optim``) on every backend, the
spec included. Then in-place semantics, determinism, and bad inputs (the right exception
and message on every backend, nothing written). What only one backend has is in
``test_native_only.py`` and ``test_numba_only.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmf import ops
from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs
from fastmf.ops import reference as spec
from fastmf.ops.codes import STEP_OPTIMIZERS
from fastmf.testing import (
    ALL_KERNELS,
    BATCH_SIZES,
    CHECKED_KERNELS,
    ID_DTYPES,
    ID_PAIRS,
    KERNELS,
    WEIGHT_DTYPES,
    assert_bit_identical,
    assert_close_all,
    clone_all,
    clone_bundle,
    idfn,
    kernel_params,
    make_batch,
    make_grad_rows,
    make_state,
    make_states,
    make_tables,
    num_threads,
    refuses_strided_tables,
    single_threaded,
    textbook_optimizer,
    to_device,
    zipf_ids,
)

NUM_USERS, NUM_ITEMS, DIM = 300, 200, 13
GLOBAL_MEAN = 3.0
LOSSES = list(Loss)
OPTIMIZERS = list(STEP_OPTIMIZERS)  # the optimizers the fused MF steps apply
# The backends whose kernels promise bit-identical results run after run.
DETERMINISTIC_KERNELS = kernel_params(("numba", "native"))
# The backends with a CPU thread pool of their own.
THREADED_BACKENDS = [p for p in kernel_params(("numba", "native"), ("cpu",))]


def run_spec(name: str, *args):
    """The reference op ``name`` on the CPU inputs ``args``: the expected value."""
    return single_threaded(getattr(spec, name), *args)


def settings(optimizer, lr=0.05, eps=1e-8) -> OptimizerArgs:
    return OptimizerArgs(optimizer, lr, eps)


def train_inputs(dtype, id_pair, batch, loss, optimizer, *, bias=True, dim=DIM, seed=0,
                 num_users=NUM_USERS, num_items=NUM_ITEMS):
    """(tables, states, (users, items, targets)) on CPU; 0/1 targets for BCE."""
    tables = make_tables(num_users, num_items, dim, dtype=dtype, bias=bias, seed=seed)
    states = make_states(tables, optimizer, seed=seed + 1)
    users, items, targets = make_batch(num_users, num_items, batch, id_dtype=id_pair[0],
                                       dtype=dtype, seed=seed + 2, implicit=loss == Loss.BCE)
    return tables, states, (users, items.to(id_pair[1]), targets)


def step_both(kernels, device, tables, states, batch, loss, reg, optimizer: OptimizerArgs):
    """One step of ``kernels`` on copies of ``tables``/``states`` on ``device`` and one step
    of the spec on CPU copies: ``(loss_got, loss_want, got, want)`` (got/want are
    ``(tables, states)``)."""
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    want = (clone_bundle(tables), clone_bundle(states))
    value = kernels.train_step(*got, *to_device(batch, device), GLOBAL_MEAN, loss, reg,
                               optimizer)
    expected = run_spec("train_step", *want, *batch, GLOBAL_MEAN, loss, reg, optimizer)
    return value, expected, got, want


# ---------------------------------------------------------------------------------------
# mf_forward and mf_backward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_pair", ID_PAIRS, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_mf_forward(backend, device, id_pair, dtype, batch, bias):
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=batch)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_pair[0], seed=batch)
    items = items.to(id_pair[1])
    got = ops.kernels(backend, device).mf_forward(*to_device((users, items), device),
                                                  *to_device(tables, device), 3.5)
    want = run_spec("mf_forward", users, items, *tables, 3.5)
    assert got.dtype == dtype and got.shape == (batch,) and got.device.type == device
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("shape", [(NUM_USERS, NUM_ITEMS, DIM), (5, 3, 64), (40, 900, 1)],
                         ids=idfn)
@pytest.mark.parametrize("batch", BATCH_SIZES + [20000])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_pair", ID_PAIRS, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_mf_backward_dense(backend, device, id_pair, dtype, batch, shape):
    # The tables' dense gradients against the spec (the same bits on the CPU backends: each
    # row's terms in batch order), against mf_backward's rows summed by scatter_rows, and
    # against autograd of the textbook dot over gathered rows. Zipf ids (hot rows hit
    # thousands of times at batch 20,000), tables smaller than the batch, one column.
    num_users, num_items, dim = shape
    P, Q, _, _ = make_tables(num_users, num_items, dim, dtype=dtype, bias=False, seed=batch)
    users, items, _ = make_batch(num_users, num_items, batch, id_dtype=id_pair[0], seed=batch)
    items = items.to(id_pair[1])
    grad = make_grad_rows(batch, None, dtype, seed=batch + 1)
    kernels = ops.kernels(backend, device)
    got = kernels.mf_backward_dense(*to_device((grad, users, items, P, Q), device))
    want = run_spec("mf_backward_dense", grad, users, items, P, Q)
    for g, table in zip(got, (P, Q)):
        assert g.shape == table.shape and g.dtype == dtype and g.device.type == device
    if device == "cpu":
        assert_bit_identical(got, want)
        rows = kernels.mf_backward(grad, users, items, P, Q)
        assert_bit_identical(got, (kernels.scatter_rows(users, rows[0], num_users),
                                   kernels.scatter_rows(items, rows[1], num_items)))
    else:
        assert_close_all(got, want, dtype)
    p, q = P.clone().requires_grad_(True), Q.clone().requires_grad_(True)
    (grad * (p[users.long()] * q[items.long()]).sum(1)).sum().backward()
    assert_close_all(got, (p.grad, q.grad), dtype)
    if batch:
        assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0


@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_mf_backward_dense_does_not_depend_on_threads(backend, device):
    P, Q, _, _ = make_tables(50, 70, 16, dtype=torch.float32, bias=False, seed=3)
    users, items, _ = make_batch(50, 70, 30000, seed=4)
    grad = make_grad_rows(30000, None, torch.float32, seed=5)
    kernels = ops.kernels(backend, device)
    results = []
    for threads in (1, 2, 3, 5):
        with num_threads(backend, threads):
            results.append(kernels.mf_backward_dense(grad, users, items, P, Q))
    for other in results[1:]:
        assert_bit_identical(results[0], other)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_mf_backward_dense_bad_input(backend, device):
    P, Q, _, _ = make_tables(6, 4, 3, dtype=torch.float32, bias=False, seed=1)
    users, items = torch.tensor([0, 5, 2]), torch.tensor([3, 1, 1])
    grad = torch.tensor([0.5, -1.0, 2.0])
    kernels = ops.kernels(backend, device)
    args = lambda *a: to_device(a, device)  # noqa: E731
    if device == "cpu":  # the CUDA kernels record bad ids on the device instead
        with pytest.raises(IndexError, match="fastmf.mf_backward_dense: users id 6 out of"):
            kernels.mf_backward_dense(*args(grad, torch.tensor([0, 6, 2]), items, P, Q))
        with pytest.raises(IndexError, match="fastmf.mf_backward_dense: items id -1 out of"):
            kernels.mf_backward_dense(*args(grad, users, torch.tensor([3, -1, 1]), P, Q))
    with pytest.raises(ValueError, match="mf_backward_dense"):
        kernels.mf_backward_dense(*args(grad[:2], users, items, P, Q))
    with pytest.raises(ValueError, match="mf_backward_dense"):
        kernels.mf_backward_dense(*args(grad, users, items, P, Q[:, :2]))
    with pytest.raises((TypeError, ValueError), match="mf_backward_dense"):
        kernels.mf_backward_dense(*args(grad.double(), users, items, P, Q))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_pair", ID_PAIRS, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_mf_backward(backend, device, id_pair, dtype, batch):
    P, Q, _, _ = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=False, seed=batch)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_pair[0], seed=batch)
    items = items.to(id_pair[1])
    grad = make_grad_rows(batch, None, dtype, seed=batch)
    got = ops.kernels(backend, device).mf_backward(*to_device((grad, users, items, P, Q),
                                                              device))
    want = run_spec("mf_backward", grad, users, items, P, Q)
    for g in got:
        assert g.shape == (batch, DIM) and g.dtype == dtype and g.device.type == device
    assert_close_all(got, want, dtype)


# ---------------------------------------------------------------------------------------
# Sparse optimizer updates


def sparse_update(kernels, optimizer, weight, state, ids, grad, lr=0.1, eps=1e-8):
    if optimizer == Optimizer.SGD:
        kernels.sparse_sgd_update(weight, ids, grad, lr)
    else:
        kernels.sparse_adagrad_update(weight, state, ids, grad, lr, eps,
                                      optimizer == Optimizer.ROWWISE_ADAGRAD)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("table", ["factors", "bias"])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_sparse_update(backend, device, id_dtype, dtype, batch, table, optimizer):
    width = DIM if table == "factors" else None
    tables = make_tables(NUM_USERS, 1, DIM, dtype=dtype, seed=batch)
    weight = tables.user_factors if width else tables.user_bias
    state = make_state(weight, optimizer, seed=batch + 2)
    ids = zipf_ids(NUM_USERS, batch, generator=np.random.default_rng(batch), dtype=id_dtype)
    grad = make_grad_rows(batch, width, dtype, seed=batch + 1)
    got = to_device(clone_all(weight, state), device)
    want = clone_all(weight, state)
    sparse_update(ops.kernels(backend, device), optimizer, got[0], got[1],
                  *to_device((ids, grad), device))
    single_threaded(sparse_update, spec, optimizer, want[0], want[1], ids, grad)
    assert_close_all(got, want, dtype)
    if batch == 0:
        assert torch.equal(got[0].cpu(), weight)
    else:
        assert not torch.equal(got[0].cpu(), weight)


@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_sparse_update_touches_only_given_rows(backend, device):
    weight = make_tables(1000, 1, 8, seed=0).user_factors.to(device)
    state = make_state(weight, Optimizer.ADAGRAD, seed=1)
    ids = torch.tensor([5, 900, 5, 17], device=device)
    before_w, before_s = weight.clone(), state.clone()
    ops.kernels(backend, device).sparse_adagrad_update(
        weight, state, ids, make_grad_rows(4, 8, torch.float32, seed=0, device=device), 0.1,
        1e-8, False)
    untouched = torch.ones(1000, dtype=torch.bool, device=device)
    untouched[ids] = False
    assert torch.equal(weight[untouched], before_w[untouched])
    assert torch.equal(state[untouched], before_s[untouched])
    assert not torch.equal(weight[ids], before_w[ids])
    assert not torch.equal(state[ids], before_s[ids])


@pytest.mark.parametrize("backend, device", KERNELS)
def test_sparse_update_wide_id_range(backend, device):
    """Many rows: a radix sort over the ids needs several digit passes."""
    num_rows = 5_000_000
    weight = torch.rand(num_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(3)
    ids = torch.from_numpy(np.concatenate([rng.integers(0, num_rows, 3000),
                                           rng.integers(0, 50, 3000)]))
    grad = make_grad_rows(ids.numel(), None, torch.float64, seed=4)
    got, want = weight.clone().to(device), weight.clone()
    ops.kernels(backend, device).sparse_sgd_update(got, *to_device((ids, grad), device), 0.5)
    run_spec("sparse_sgd_update", want, ids, grad, 0.5)
    assert_close_all(got, want, torch.float64)
    assert not torch.equal(want, weight)


# ---------------------------------------------------------------------------------------
# train_step against the spec


def train_grid():
    """Every loss × optimizer × reg × batch × weight dtype for int32 and int64 ids; mixed
    users/items dtypes (which only change the id conversion) on the diagonal of the
    loss × optimizer grid."""
    diagonal = set(zip(LOSSES, OPTIMIZERS))
    for id_pair in ID_PAIRS:
        for dtype in WEIGHT_DTYPES:
            for batch in BATCH_SIZES:
                for loss in LOSSES:
                    for optimizer in OPTIMIZERS:
                        if id_pair[0] != id_pair[1] and (loss, optimizer) not in diagonal:
                            continue
                        for reg in (0.0, 0.05):
                            name = "-".join([idfn(id_pair), idfn(dtype), str(batch), idfn(loss),
                                             idfn(optimizer), f"reg{reg}"])
                            yield pytest.param(id_pair, dtype, batch, loss, optimizer, reg,
                                               id=name)


@pytest.mark.parametrize("id_pair, dtype, batch, loss, optimizer, reg", list(train_grid()))
@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step(backend, device, id_pair, dtype, batch, loss, optimizer, reg):
    tables, states, data = train_inputs(dtype, id_pair, batch, loss, optimizer,
                                        seed=batch + int(loss))
    value, expected, got, want = step_both(ops.kernels(backend, device), device, tables,
                                           states, data, loss, reg, settings(optimizer))
    assert value.shape == () and value.dtype == dtype and value.device.type == device
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if batch == 0:
        assert float(value) == 0.0
        assert_bit_identical(to_device(got, "cpu"), (tables, states))
    else:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("loss", LOSSES, ids=idfn)
@pytest.mark.parametrize("batch", [0, 7, 4096])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_without_bias(backend, device, dtype, batch, loss, optimizer):
    tables, states, data = train_inputs(dtype, (torch.int64, torch.int32), batch, loss,
                                        optimizer, bias=False, seed=10)
    value, expected, got, want = step_both(ops.kernels(backend, device), device, tables,
                                           states, data, loss, 0.03, settings(optimizer))
    assert value.shape == () and value.dtype == dtype
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if batch == 0:
        assert float(value) == 0.0
        assert_bit_identical(to_device(got, "cpu"), (tables, states))


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("dim", [1, 8, 64, 130])
@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_dims_without_bias(backend, device, dim, optimizer):
    """Odd and large K (tails of the vector loops, several Adagrad chunks); no biases."""
    tables, states, data = train_inputs(torch.float64, (torch.int64, torch.int64), 512,
                                        Loss.MSE, optimizer, bias=False, dim=dim)
    value, expected, got, want = step_both(ops.kernels(backend, device), device, tables,
                                           states, data, Loss.MSE, 0.01, settings(optimizer))
    assert_close_all(value, expected, torch.float64)
    assert_close_all(got, want, torch.float64)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_single_hot_row(backend, device):
    """Every sample on one user and one item: one long group per table."""
    dtype = torch.float64
    tables, states, (_, _, targets) = train_inputs(dtype, (torch.int64, torch.int64), 4096,
                                                   Loss.HUBER, Optimizer.ROWWISE_ADAGRAD)
    data = (torch.full((4096,), 42), torch.full((4096,), 7), targets)
    value, expected, got, want = step_both(ops.kernels(backend, device), device, tables,
                                           states, data, Loss.HUBER, 0.01,
                                           settings(Optimizer.ROWWISE_ADAGRAD))
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_large_tables_and_batch(backend, device):
    """Ids that need several radix digits, a batch spanning many blocks and chunks."""
    dtype = torch.float32
    tables = make_tables(70_000, 5_000, 8, dtype=dtype, seed=15)
    states = make_states(tables, Optimizer.ADAGRAD, seed=16)
    data = make_batch(70_000, 5_000, 20_000, dtype=dtype, seed=17)
    value, expected, got, want = step_both(ops.kernels(backend, device), device, tables,
                                           states, data, Loss.HUBER, 0.01,
                                           settings(Optimizer.ADAGRAD))
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("loss", LOSSES, ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_20_steps(backend, device, dtype, loss, optimizer):
    """20 steps on fresh Zipf batches track 20 spec steps (errors do not compound)."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, 32, dtype=dtype, seed=13)
    states = make_states(tables, optimizer, seed=14)
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    want = (clone_bundle(tables), clone_bundle(states))
    kernels = ops.kernels(backend, device)
    for step in range(20):
        data = make_batch(NUM_USERS, NUM_ITEMS, 1024, dtype=dtype, seed=100 + step,
                          implicit=loss == Loss.BCE)
        value = kernels.train_step(*got, *to_device(data, device), GLOBAL_MEAN, loss, 0.02,
                                   settings(optimizer, lr=0.02))
        expected = run_spec("train_step", *want, *data, GLOBAL_MEAN, loss, 0.02,
                            settings(optimizer, lr=0.02))
        assert_close_all(value, expected, dtype, msg=lambda m, step=step: f"step {step}: {m}")
    assert_close_all(got, want, dtype)
    assert not torch.equal(got[0].user_factors.cpu(), tables.user_factors)


# ---------------------------------------------------------------------------------------
# In-place semantics: strided tables and ids, parameters, version counters


@pytest.mark.parametrize("backend, device", KERNELS)
def test_train_step_mixed_id_dtypes_and_strided_inputs(backend, device):
    """int32 users with int64 items; strided ids, targets and tables (updated in place)."""
    dtype = torch.float64
    tables, states, (users, items, targets) = train_inputs(
        dtype, (torch.int64, torch.int64), 600, Loss.MSE, Optimizer.ADAGRAD)
    wide = torch.zeros(NUM_USERS, DIM * 2, dtype=dtype, device=device)
    wide[:, ::2] = tables.user_factors.to(device)
    strided_p = wide[:, ::2]
    assert not strided_p.is_contiguous()
    strided = tuple(t.repeat_interleave(2)[::2] for t in (users.int(), items, targets))
    assert not strided[0].is_contiguous()
    got = (MFTables(strided_p, *to_device(clone_all(*tables[1:]), device)),
           to_device(clone_bundle(states), device))
    want = (clone_bundle(tables), clone_bundle(states))
    if refuses_strided_tables(backend, device):
        # Refused with a clear error and unwritten; the ids and targets stay strided.
        with pytest.raises(ValueError, match=r"user_factors must be contiguous to be "
                                             r"updated in place"):
            ops.kernels(backend, device).train_step(*got, *to_device(strided, device),
                                                    GLOBAL_MEAN, Loss.MSE, 0.01,
                                                    settings(Optimizer.ADAGRAD))
        assert torch.equal(strided_p.cpu(), tables.user_factors)
        got = (MFTables(strided_p.contiguous(), *got[0][1:]), got[1])
    value = ops.kernels(backend, device).train_step(*got, *to_device(strided, device),
                                                    GLOBAL_MEAN, Loss.MSE, 0.01,
                                                    settings(Optimizer.ADAGRAD))
    expected = run_spec("train_step", *want, users, items, targets, GLOBAL_MEAN, Loss.MSE,
                        0.01, settings(Optimizer.ADAGRAD))
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    assert torch.equal(wide[:, 1::2].cpu(), torch.zeros(NUM_USERS, DIM, dtype=dtype))


@pytest.mark.parametrize("backend, device", KERNELS)
def test_updates_land_in_non_contiguous_tables(backend, device):
    """A table that is a column slice and a state that is a transposed copy: the fused
    step and the sparse update write through to the caller's storage."""
    dtype = torch.float64
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=18)
    states = make_states(tables, Optimizer.ADAGRAD, seed=19)
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 256, dtype=dtype, seed=20)
    ones = torch.ones_like(tables.user_factors, device=device)
    wide = torch.cat([tables.user_factors.to(device), ones], dim=1)
    strided_p = wide[:, :DIM]
    strided_state = states.user_factors.to(device).t().contiguous().t()
    assert not strided_p.is_contiguous() and not strided_state.is_contiguous()
    kernels = ops.kernels(backend, device)
    got = (MFTables(strided_p, *to_device(clone_all(*tables[1:]), device)),
           MFTables(strided_state, *to_device(clone_all(*states[1:]), device)))
    if refuses_strided_tables(backend, device):
        before = clone_all(*got[0], *got[1])
        with pytest.raises(ValueError, match=r"fastmf\.train_step: user_factors must be "
                                             r"contiguous to be updated in place"):
            kernels.train_step(*got, *to_device((users, items, targets), device),
                               GLOBAL_MEAN, Loss.MSE, 0.0, settings(Optimizer.ADAGRAD))
        assert_bit_identical(clone_all(*got[0], *got[1]), before)  # nothing written
        weight = tables.user_factors.to(device).t().contiguous().t()
        with pytest.raises(ValueError, match=r"fastmf\.sparse_sgd_update: weight must be "
                                             r"contiguous"):
            kernels.sparse_sgd_update(weight, *to_device(
                (users, make_grad_rows(256, DIM, dtype, seed=21)), device), 0.1)
        assert torch.equal(weight.cpu(), tables.user_factors)
        return
    kernels.train_step(*got, *to_device((users, items, targets), device), GLOBAL_MEAN,
                       Loss.MSE, 0.0, settings(Optimizer.ADAGRAD))
    want = (clone_bundle(tables), clone_bundle(states))
    run_spec("train_step", *want, users, items, targets, GLOBAL_MEAN, Loss.MSE, 0.0,
             settings(Optimizer.ADAGRAD))
    assert_close_all(wide[:, :DIM], want[0].user_factors, dtype)
    assert torch.equal(wide[:, DIM:], ones)
    assert_close_all(strided_state, want[1].user_factors, dtype)

    weight = tables.user_factors.to(device).t().contiguous().t()
    grad = make_grad_rows(256, DIM, dtype, seed=21)
    expected = tables.user_factors.clone()
    kernels.sparse_sgd_update(weight, *to_device((users, grad), device), 0.1)
    run_spec("sparse_sgd_update", expected, users, grad, 0.1)
    assert_close_all(weight, expected, dtype)


@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_parameters_that_require_grad(backend, device):
    """Tables that are nn.Parameters: the step updates them in place and the forward
    reads them."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=21, device=device)
    params = MFTables(*(nn.Parameter(t.clone()) for t in tables))
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=22, device=device)
    kernels = ops.kernels(backend, device)
    value = kernels.train_step(params, None, users, items, targets, GLOBAL_MEAN, Loss.MSE, 0.0,
                               settings(Optimizer.SGD, eps=0.0))
    want = clone_bundle(to_device(tables, "cpu"))
    expected = run_spec("train_step", want, None, *to_device((users, items, targets), "cpu"),
                        GLOBAL_MEAN, Loss.MSE, 0.0, settings(Optimizer.SGD, eps=0.0))
    assert_close_all(value.detach(), expected, torch.float32)
    assert_close_all(tuple(p.detach() for p in params), want, torch.float32)
    assert not torch.equal(params.user_factors.detach(), tables.user_factors)
    pred = kernels.mf_forward(users, items, *params, GLOBAL_MEAN)
    assert_close_all(pred.detach(), run_spec("mf_forward", *to_device((users, items), "cpu"),
                                             *want, GLOBAL_MEAN), torch.float32)


@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_step_on_parameters_returns_a_plain_loss(backend, device):
    """The fused step is an optimizer step, not part of a graph: its loss has no grad."""
    params = MFTables(*(nn.Parameter(t) for t in make_tables(NUM_USERS, NUM_ITEMS, DIM,
                                                              seed=21, device=device)))
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=22, device=device)
    value = ops.kernels(backend, device).train_step(params, None, users, items, targets,
                                                    GLOBAL_MEAN, Loss.MSE, 0.0,
                                                    settings(Optimizer.SGD, eps=0.0))
    assert torch.isfinite(value) and float(value) > 0
    assert not value.requires_grad


@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_in_place_updates_bump_the_version(backend, device):
    """As PyTorch's own in-place ops do, so autograd notices a modified saved tensor."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=35, device=device)
    states = make_states(tables, Optimizer.ADAGRAD, seed=36)
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=37, device=device)
    kernels = ops.kernels(backend, device)
    before = [t._version for t in tables + states]
    kernels.train_step(tables, states, users, items, targets, GLOBAL_MEAN, Loss.MSE, 0.0,
                       settings(Optimizer.ADAGRAD))
    assert all(t._version > v for t, v in zip(tables + states, before))
    weight, state = tables.user_factors, states.user_factors
    versions = weight._version, state._version
    kernels.sparse_adagrad_update(weight, state, users,
                                  make_grad_rows(64, DIM, torch.float32, seed=38, device=device),
                                  0.1, 1e-8, False)
    assert weight._version > versions[0] and state._version > versions[1]
    versions = weight._version
    kernels.sparse_sgd_update(weight, users,
                              make_grad_rows(64, DIM, torch.float32, seed=39, device=device),
                              0.1)
    assert weight._version > versions


# ---------------------------------------------------------------------------------------
# Independent of the spec: a hand-computed loss, and textbook PyTorch


@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_loss_matches_numpy_on_a_hand_example(backend, device):
    """A tiny case checked by hand arithmetic, independent of the reference."""
    P = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64, device=device)
    Q = torch.tensor([[0.25, 1.0]], dtype=torch.float64, device=device)
    users = torch.tensor([0, 1, 0], device=device)
    items = torch.tensor([0, 0, 0], device=device)
    targets = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64, device=device)
    pred = np.array([0.25 + 2.0, 0.125 - 1.0, 0.25 + 2.0]) + 1.0
    expected = np.mean((pred - targets.cpu().numpy()) ** 2)
    value = ops.kernels(backend, device).train_step(
        MFTables(P.clone(), Q.clone()), None, users, items, targets, 1.0, Loss.MSE, 0.0,
        settings(Optimizer.SGD, lr=0.1, eps=0.0))
    assert float(value) == pytest.approx(expected, rel=1e-12)


class Textbook(nn.Module):
    """Biased MF as users write it: nn.Embedding(sparse=True) tables."""

    def __init__(self, tables: MFTables):
        super().__init__()
        p, q, bu, bi = tables
        self.p = nn.Embedding.from_pretrained(p.clone(), freeze=False, sparse=True)
        self.q = nn.Embedding.from_pretrained(q.clone(), freeze=False, sparse=True)
        self.bu = nn.Embedding.from_pretrained(bu[:, None].clone(), freeze=False, sparse=True)
        self.bi = nn.Embedding.from_pretrained(bi[:, None].clone(), freeze=False, sparse=True)

    def loss(self, users, items, targets, loss, reg):
        u, i = users.long(), items.long()
        p, q, bu, bi = self.p(u), self.q(i), self.bu(u)[:, 0], self.bi(i)[:, 0]
        pred = GLOBAL_MEAN + bu + bi + (p * q).sum(1)
        data = {Loss.MSE: F.mse_loss, Loss.HUBER: F.huber_loss,
                Loss.BCE: F.binary_cross_entropy_with_logits}[loss](pred, targets)
        penalty = (p.pow(2).sum(1) + q.pow(2).sum(1) + bu.pow(2) + bi.pow(2)).mean()
        return data + reg * penalty

    def tables(self):
        return MFTables(self.p.weight, self.q.weight, self.bu.weight[:, 0],
                        self.bi.weight[:, 0])


def rowwise_adagrad_step(params, sums, lr, eps):
    """FBGEMM's exact row-wise Adagrad, written out: one accumulator per row."""
    with torch.no_grad():
        for p, state in zip(params, sums):
            g = p.grad.coalesce()
            ids, rows = g.indices()[0], g.values()
            state[ids] += rows.pow(2).mean(1)
            p[ids] -= lr * rows / (state[ids].sqrt() + eps).unsqueeze(1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("loss", LOSSES, ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_train_step_matches_textbook(backend, device, dtype, loss, optimizer):
    """Five fused steps equal five steps of nn.Embedding(sparse=True) + torch.optim.SGD /
    torch.optim.Adagrad (row-wise Adagrad written out), loss and reg by autograd."""
    lr, eps, reg, init = 0.05, 1e-10, 0.03, 0.1
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=40)
    textbook = Textbook(tables)
    params = list(textbook.parameters())
    if optimizer != Optimizer.ROWWISE_ADAGRAD:
        torch_opt, states = textbook_optimizer(params, tables, optimizer, lr, eps, init)
    else:
        torch_opt = None
        sums = [torch.full((p.shape[0],), init, dtype=dtype) for p in params]
        states = MFTables(*(torch.full(t.shape[:1], init, dtype=dtype) for t in tables))
    got = to_device((clone_bundle(tables), states), device)
    kernels = ops.kernels(backend, device)
    for step in range(5):
        batch = make_batch(NUM_USERS, NUM_ITEMS, 700, dtype=dtype, seed=41 + step,
                           implicit=loss == Loss.BCE)
        value = kernels.train_step(*got, *to_device(batch, device), GLOBAL_MEAN, loss, reg,
                                   settings(optimizer, lr=lr, eps=eps))
        total = textbook.loss(*batch, loss, reg)
        for p in params:
            p.grad = None
        total.backward()
        if torch_opt is not None:
            torch_opt.step()
        else:
            rowwise_adagrad_step(params, sums, lr, eps)
        assert_close_all(value, total.detach(), dtype)
    assert_close_all(got[0], textbook.tables(), dtype)
    if optimizer == Optimizer.ADAGRAD:
        assert_close_all(got[1].item_factors, torch_opt.state[textbook.q.weight]["sum"], dtype)
    elif optimizer == Optimizer.ROWWISE_ADAGRAD:
        assert_close_all(got[1].user_factors, sums[0], dtype)


@pytest.mark.parametrize("backend, device", kernel_params(("reference", "numba"),
                                                          spec_on_cpu=True))
def test_loss_and_optimizer_spellings(backend, device):
    """The Python backends take a loss or optimizer as a member, its code or its name, with
    the same result (the native op takes codes; members are ints)."""
    tables, states, batch = train_inputs(torch.float64, (torch.int64, torch.int64), 300,
                                         Loss.HUBER, Optimizer.ROWWISE_ADAGRAD, seed=50)
    kernels = ops.kernels(backend, device)
    results = []
    for loss, optimizer in ((Loss.HUBER, Optimizer.ROWWISE_ADAGRAD), (1, 2),
                            ("huber", "rowwise_adagrad")):
        got = to_device((clone_bundle(tables), clone_bundle(states)), device)
        value = kernels.train_step(*got, *to_device(batch, device), GLOBAL_MEAN, loss, 0.01,
                                   settings(optimizer))
        results.append((value, got))
    assert_bit_identical(results[0], results[1])
    assert_bit_identical(results[0], results[2])
    assert not torch.equal(results[0][1][0].user_factors.cpu(), tables.user_factors)


# ---------------------------------------------------------------------------------------
# Determinism: bit-identical run after run, and whatever the thread count


def run_all_ops(backend, device, dtype, optimizer, seed=5):
    """Every op of the family on one set of tables: forward, backward, three fused steps
    and both sparse updates; returns all outputs and the final tables and states."""
    tables, states, data = train_inputs(dtype, (torch.int64, torch.int64), 8192, Loss.MSE,
                                        optimizer, dim=64, seed=seed, num_users=2_000,
                                        num_items=1_000)
    tables, states = to_device((tables, states), device)
    users, items, targets = to_device(data, device)
    kernels = ops.kernels(backend, device)
    out = [kernels.mf_forward(users, items, *tables, GLOBAL_MEAN)]
    out += list(kernels.mf_backward(targets, users, items, *tables[:2]))
    for _ in range(3):
        out.append(kernels.train_step(tables, states, users, items, targets, GLOBAL_MEAN,
                                      Loss.MSE, 0.01, settings(optimizer)))
    grad = make_grad_rows(users.numel(), 64, dtype, seed=seed, device=device)
    if states is not None:
        kernels.sparse_adagrad_update(tables.user_factors, states.user_factors, users, grad,
                                      0.1, 1e-8, optimizer == Optimizer.ROWWISE_ADAGRAD)
    kernels.sparse_sgd_update(tables.item_factors, items, grad, 0.1)
    return out, tables, states


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", DETERMINISTIC_KERNELS)
def test_bit_identical_across_runs(backend, device, dtype, optimizer):
    first = run_all_ops(backend, device, dtype, optimizer)
    second = run_all_ops(backend, device, dtype, optimizer)
    assert_bit_identical(first, second)
    assert not torch.equal(first[1].user_factors.cpu(), make_tables(
        2_000, 1_000, 64, dtype=dtype, seed=5).user_factors)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_bit_identical_across_thread_counts(backend, device, dtype, optimizer):
    with num_threads(backend, 1):
        one = run_all_ops(backend, device, dtype, optimizer)
    with num_threads(backend, 2):
        two = run_all_ops(backend, device, dtype, optimizer)
    assert_bit_identical(one, two)


# ---------------------------------------------------------------------------------------
# Bad inputs: the right exception, a message naming the op, argument and value, and
# nothing written, on every backend


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_USERS, BAD_ITEMS, BAD_DIM, BAD_BATCH = 20, 10, 4, 16


def bad_train_step_cases():
    """``(good arguments, {case: (change, exception, pattern)})`` for train_step."""
    tables = make_tables(BAD_USERS, BAD_ITEMS, BAD_DIM, seed=0)
    states = make_states(tables, Optimizer.ADAGRAD, seed=1)
    rowwise = make_states(tables, Optimizer.ROWWISE_ADAGRAD, seed=2)
    users, items, targets = make_batch(BAD_USERS, BAD_ITEMS, BAD_BATCH, seed=3)
    P, Q, bu, bi = tables
    good = dict(P=P, Q=Q, bu=bu, bi=bi, Ps=states[0], Qs=states[1], bus=states[2],
                bis=states[3], users=users, items=items, targets=targets, loss=Loss.MSE,
                opt=Optimizer.ADAGRAD)
    n = BAD_BATCH
    cases = {
        "float users": (dict(users=users.float()), TypeError, "users must be int32 or int64"),
        "2-D items": (dict(items=items.view(2, n // 2)), ValueError, "items must be 1-D"),
        "item out of range": (dict(items=with_value(items, 2, 12)), IndexError,
                              re.escape("fastmf.train_step: items id 12 out of range [0, 10)")),
        "first item id high": (dict(items=with_value(items, 0, BAD_ITEMS + 5)), IndexError,
                               rf"items id {BAD_ITEMS + 5} out of range"),
        "negative user": (dict(users=with_value(users, 4, -1)), IndexError,
                          re.escape("fastmf.train_step: users id -1 out of range [0, 20)")),
        "last user id high": (dict(users=with_value(users, n - 1, BAD_USERS)), IndexError,
                              rf"users id {BAD_USERS} out of range \[0, {BAD_USERS}\)"),
        "int weights": (dict(P=P.to(torch.int32)), TypeError,
                        "user_factors must be float32 or float64"),
        "mixed weight dtypes": (dict(Q=Q.double()), TypeError, "item_factors has dtype"),
        "dims differ": (dict(Q=torch.rand(10, 5)), ValueError,
                        "dim 4 but item_factors has dim 5"),
        "one bias": (dict(bi=None), ValueError, "both be given or both None"),
        "bias rows": (dict(bu=torch.rand(21)), ValueError, "user_bias has 21 rows"),
        "lengths differ": (dict(items=items[:5]), ValueError, "lengths differ"),
        "targets length": (dict(targets=targets[:5]), ValueError, "lengths differ"),
        "targets dtype": (dict(targets=targets.double()), TypeError, "targets has dtype"),
        "nan target": (dict(targets=with_value(targets, 3, float("nan"))), ValueError,
                       r"targets contains a non-finite value \(nan\)"),
        "last target nan": (dict(targets=with_value(targets, n - 1, float("nan"))),
                            ValueError, "targets contains a non-finite value"),
        "inf target": (dict(targets=with_value(targets, 0, float("inf"))), ValueError,
                       "targets.*non-finite"),
        "loss code": (dict(loss=3), ValueError, "unknown loss code 3"),
        "optimizer code": (dict(opt=-1), ValueError, "unknown optimizer code -1"),
        "missing state": (dict(Qs=None), ValueError, "adagrad needs item_factors_state"),
        "missing bias state": (dict(bus=None), ValueError, "adagrad needs user_bias_state"),
        "rowwise needs state": (dict(opt=Optimizer.ROWWISE_ADAGRAD, Ps=None), ValueError,
                                "rowwise_adagrad needs user_factors_state"),
        "adagrad state for rowwise": (dict(opt=Optimizer.ROWWISE_ADAGRAD), ValueError,
                                      "user_factors_state must be 1-D"),
        "rowwise state for adagrad": (dict(Ps=rowwise[0]), ValueError,
                                      "user_factors_state must be 2-D"),
        "state shape": (dict(Ps=states[0][:, :2]), ValueError, "user_factors_state has shape"),
        "state dtype": (dict(Qs=states[1].double()), TypeError, "item_factors_state has dtype"),
        "bias state dtype": (dict(bus=states[2].double()), TypeError,
                             "user_bias_state has dtype"),
    }
    return good, cases


TABLE_KEYS = ("P", "Q", "bu", "bi")
STATE_KEYS = ("Ps", "Qs", "bus", "bis")


@pytest.mark.parametrize("case", list(bad_train_step_cases()[1]))
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_train_step_bad_inputs(backend, device, case):
    good, cases = bad_train_step_cases()
    change, exc, pattern = cases[case]
    args = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v
            for k, v in {**good, **change}.items()}
    tables = MFTables(*(args[k] for k in TABLE_KEYS))
    states = MFTables(*(args[k] for k in STATE_KEYS))
    before = clone_all(*tables, *states)
    with pytest.raises(exc, match=pattern):
        ops.kernels(backend, device).train_step(
            tables, states, args["users"], args["items"], args["targets"], GLOBAL_MEAN,
            args["loss"], 0.01, settings(args["opt"], lr=0.1))
    for t, b in zip(tables + states, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"


@pytest.mark.parametrize("case", ["loss name", "optimizer name"])
@pytest.mark.parametrize("backend, device", kernel_params(("reference", "numba"), ("cpu",),
                                                          spec_on_cpu=True))
def test_train_step_rejects_unknown_names(backend, device, case):
    """The Python backends also take names; an unknown one is named in the error."""
    tables, states, batch = train_inputs(torch.float32, (torch.int64, torch.int64), 16,
                                         Loss.MSE, Optimizer.ADAGRAD, seed=27)
    loss, optimizer = ("hinge", Optimizer.ADAGRAD) if case == "loss name" else (Loss.MSE,
                                                                                "lbfgs")
    before = clone_all(*tables, *states)
    with pytest.raises(ValueError, match="unknown loss 'hinge'" if case == "loss name"
                       else "unknown optimizer 'lbfgs'"):
        ops.kernels(backend, device).train_step(tables, states, *batch, GLOBAL_MEAN, loss,
                                                0.01, settings(optimizer))
    assert_bit_identical(tables + states, before)


@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_train_step_empty_batch_still_checks(backend, device):
    tables, states, (users, items, targets) = to_device(train_inputs(
        torch.float32, (torch.int64, torch.int64), 16, Loss.MSE, Optimizer.ADAGRAD, seed=27),
        device)
    with pytest.raises(TypeError, match="users must be int32 or int64"):
        ops.kernels(backend, device).train_step(tables, states, users[:0].float(), items[:0],
                                                targets[:0], GLOBAL_MEAN, Loss.MSE, 0.01,
                                                settings(Optimizer.ADAGRAD))


def bad_other_op_cases(kernels, device):
    w, _, b, _ = to_device(make_tables(10, 1, 4, seed=0), device)
    s = make_state(w, Optimizer.ADAGRAD, seed=1)
    ids = torch.tensor([1, 2, 2, 9], device=device)
    g = make_grad_rows(4, 4, torch.float32, seed=2, device=device)

    def t(values, **kw):
        return torch.tensor(values, device=device, **kw)

    def rand(*shape, dtype=torch.float32):
        return make_grad_rows(shape[0], shape[1] if len(shape) > 1 else None, dtype, seed=3,
                              device=device)

    adagrad = kernels.sparse_adagrad_update
    return {
        "id out of range": (lambda: adagrad(w, s, t([1, 10]), g[:2], 0.1, 1e-8, False),
                            IndexError,
                            re.escape("fastmf.sparse_adagrad_update: ids id 10 out of range "
                                      "[0, 10)")),
        "float ids": (lambda: adagrad(w, s, ids.float(), g, 0.1, 1e-8, False), TypeError,
                      "ids must be int32 or int64"),
        "grad columns": (lambda: adagrad(w, s, ids, rand(4, 3), 0.1, 1e-8, False),
                         ValueError, "grad_rows has 3 columns"),
        "grad length": (lambda: adagrad(w, s, ids, g[:3], 0.1, 1e-8, False), ValueError,
                        "lengths differ"),
        "grad dtype": (lambda: adagrad(w, s, ids, g.double(), 0.1, 1e-8, False), TypeError,
                       "grad_rows has dtype"),
        "bias grad 2-D": (lambda: adagrad(b, rand(10).abs(), ids, g, 0.1, 1e-8, False),
                          ValueError, "grad_rows must be 1-D"),
        "state shape": (lambda: adagrad(w, rand(10).abs(), ids, g, 0.1, 1e-8, False),
                        ValueError, "state"),
        "rowwise state shape": (lambda: adagrad(w, s, ids, g, 0.1, 1e-8, True), ValueError,
                                "state"),
        "3-D weight": (lambda: adagrad(w.view(10, 2, 2), s, ids, g, 0.1, 1e-8, False),
                       ValueError, "weight must be 1-D or 2-D"),
        "int weight": (lambda: kernels.sparse_sgd_update(w.int(), ids, g, 0.1), TypeError,
                       "weight must be float32 or float64"),
        "sgd out of range": (lambda: kernels.sparse_sgd_update(w, t([-3]), g[:1], 0.1),
                             IndexError, "sparse_sgd_update: ids id -3 out of range"),
        "forward one bias": (lambda: kernels.mf_forward(ids, ids, w, w, b, None, 0.0),
                             ValueError, "both be given or both None"),
        "forward out of range": (lambda: kernels.mf_forward(ids, t([0, 1, 2, 11]), w, w, None,
                                                            None, 0.0),
                                 IndexError, "mf_forward: items id 11 out of range"),
        "backward grad length": (lambda: kernels.mf_backward(rand(3), ids, ids, w, w),
                                 ValueError, "lengths differ"),
        "backward grad dtype": (lambda: kernels.mf_backward(rand(4, dtype=torch.float64), ids,
                                                            ids, w, w),
                                TypeError, "grad_out has dtype"),
    }



def bad_other_op_params():
    """(backend, device, case) for every checked kernel and case; the spec's known gap
    marked."""
    params = []
    for kernel in CHECKED_KERNELS:
        for case in bad_other_op_cases(spec, "cpu"):
            params.append(pytest.param(*kernel.values, case, marks=kernel.marks,
                                       id=f"{kernel.id}-{case}"))
    return params


@pytest.mark.parametrize("backend, device, case", bad_other_op_params())
def test_other_ops_bad_inputs(backend, device, case):
    fn, exc, pattern = bad_other_op_cases(ops.kernels(backend, device), device)[case]
    with pytest.raises(exc, match=pattern):
        fn()


def forward_args(device):
    tables = to_device(make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=30), device)
    users, items, _ = make_batch(NUM_USERS, NUM_ITEMS, 2000, seed=31, device=device)
    return users, items, tables


@pytest.mark.parametrize("where", [0, 1999])
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_forward_and_backward_reject_bad_ids(backend, device, where):
    """A bad id first or last in a batch large enough to be split across threads."""
    users, items, (P, Q, bu, bi) = forward_args(device)
    kernels = ops.kernels(backend, device)
    with pytest.raises(IndexError, match=rf"fastmf.mf_forward: items id {NUM_ITEMS} out of"):
        kernels.mf_forward(users, with_value(items, where, NUM_ITEMS), P, Q, bu, bi, 0.0)
    grad = make_grad_rows(users.shape[0], None, torch.float32, seed=32, device=device)
    with pytest.raises(IndexError, match="fastmf.mf_backward: users id -1 out of range"):
        kernels.mf_backward(grad, with_value(users, where, -1), items, P, Q)


@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_forward_and_backward_reject_bad_structure(backend, device):
    users, items, (P, Q, bu, bi) = forward_args(device)
    kernels = ops.kernels(backend, device)
    grad = make_grad_rows(users.shape[0], None, torch.float32, seed=33, device=device)
    with pytest.raises(TypeError, match="item_factors has dtype"):
        kernels.mf_forward(users, items, P, Q.double(), bu, bi, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        kernels.mf_forward(users, items[:-1], P, Q, bu, bi, 0.0)
    with pytest.raises(ValueError, match="both be given or both None"):
        kernels.mf_forward(users, items, P, Q, bu, None, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        kernels.mf_backward(grad[:5], users, items, P, Q)
    # grad_out of another dtype: test_other_ops_bad_inputs[...-backward grad dtype]


@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_sparse_updates_reject(backend, device):
    P, _, bu, _ = to_device(make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=32), device)
    ids, _, _ = make_batch(NUM_USERS, NUM_ITEMS, 50, seed=33, device=device)
    grads = make_grad_rows(50, DIM, torch.float32, seed=34, device=device)
    state = make_state(P, Optimizer.ADAGRAD, seed=35)
    kernels = ops.kernels(backend, device)
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
    ]
    for change, error, message in cases:
        args = dict(weight=P.clone(), state=state.clone(), ids=ids, grad_rows=grads, lr=0.1,
                    eps=1e-8, rowwise=False)
        args.update(change)
        before = [t.clone() for t in args.values() if isinstance(t, torch.Tensor)]
        with pytest.raises(error, match=message):
            kernels.sparse_adagrad_update(**args)
        after = [t for t in args.values() if isinstance(t, torch.Tensor)]
        assert_bit_identical(before, after)
    with pytest.raises(ValueError, match="state must be 1-D"):
        kernels.sparse_adagrad_update(P.clone(), state, ids, grads, 0.1, 1e-8, True)
    with pytest.raises(IndexError, match="fastmf.sparse_sgd_update: ids id 300 out of range"):
        kernels.sparse_sgd_update(bu.clone(), with_value(ids, 7, 300), grads[:, 0], 0.1)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        kernels.sparse_sgd_update(P[None].clone(), ids, grads, 0.1)
