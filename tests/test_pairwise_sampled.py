"""``train_step_pairwise_sampled``: the fused BPR step drawing its own uniform negatives, on
every backend and device, against the spec (``fastmf.ops.reference``); and
``train_steps_pairwise_sampled``, a run of such steps in one call.

The negatives are integer counter hashes, so every backend must draw exactly the items of
``fastmf.ops.reference.sampling.sample_negatives``; given them, the step must be
``train_step_pairwise`` on the repeated positives (same backend, bit for bit). Also: no
negative is ever a positive of its user, the draws are uniform over the rest, the results do
not depend on the thread count, and bad inputs raise the same errors everywhere.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastmf
from fastmf import ops
from fastmf.data import Interactions, NegativeSampler
from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs, PairwiseLoss
from fastmf.ops import reference as spec
from fastmf.ops.codes import STEP_OPTIMIZERS
from fastmf.ops.reference.pairwise import sample_negatives
from fastmf.testing import (
    CHECKED_KERNELS,
    ID_DTYPES,
    KERNELS,
    WEIGHT_DTYPES,
    assert_bit_identical,
    assert_close_all,
    clone_all,
    clone_bundle,
    idfn,
    kernel_params,
    make_states,
    make_tables,
    num_threads,
    single_threaded,
    to_device,
    zipf_ids,
)

NUM_USERS, NUM_ITEMS, DIM = 300, 60, 13
BPR = PairwiseLoss.BPR
THREADED_BACKENDS = kernel_params(("numba", "native"), ("cpu",))
ALL_CPU = kernel_params(devices=("cpu",), spec_on_cpu=True)


def settings(optimizer, lr=0.05, eps=1e-8) -> OptimizerArgs:
    return OptimizerArgs(optimizer, lr, eps)


OP_NAME = "train_step_pairwise_sampled"
STEPS_OP = "train_steps_pairwise_sampled"
# The batch size of train_steps_pairwise_sampled in the shared bad-input cases: their six
# positives run as two steps, so a fault in the second must still write nothing.
BAD_CASE_BATCH = 4


def call_sampled(kernels, op, tables, states, users, pos, indptr, indices, k, seed, step,
                 loss, reg, optimizer, batch_size=BAD_CASE_BATCH, order=None):
    """One call of the sampled op ``op`` (train_step_sampled with global mean 0;
    the multi-step ops with ``batch_size`` and ``order``)."""
    if op == STEPS_OP:
        return kernels.train_steps_pairwise_sampled(tables, states, users, pos, indptr,
                                                    indices, k, batch_size, seed, step, loss,
                                                    reg, optimizer, None, order)
    if op == "train_steps_sampled":
        return kernels.train_steps_sampled(tables, states, users, pos, indptr, indices, k,
                                           batch_size, seed, step, 0.0, loss, reg, optimizer,
                                           None, order)
    if op == "train_step_pairwise_sampled":
        return kernels.train_step_pairwise_sampled(tables, states, users, pos, indptr, indices,
                                                   k, seed, step, loss, reg, optimizer)
    return kernels.train_step_sampled(tables, states, users, pos, indptr, indices, k, seed,
                                      step, 0.0, loss, reg, optimizer)


def make_csr(num_users, num_items, *, seed, max_degree=None, id_dtype=torch.int64):
    """The positives' CSR: each user a random sorted set of distinct items (some users
    none, some almost all but a few), as (indptr, indices)."""
    rng = np.random.default_rng(seed)
    top = num_items - 1 if max_degree is None else max_degree
    rows = []
    for u in range(num_users):
        deg = 0 if u % 11 == 0 else int(rng.integers(1, top + 1))
        rows.append(np.sort(rng.choice(num_items, size=deg, replace=False)))
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return (torch.from_numpy(indptr).to(id_dtype), torch.from_numpy(indices).to(id_dtype))


def make_batch(batch, *, seed, id_dtype=torch.int64):
    rng = np.random.default_rng(seed)
    users = zipf_ids(NUM_USERS, batch, generator=rng, dtype=id_dtype)
    pos = zipf_ids(NUM_ITEMS, batch, generator=rng, dtype=id_dtype)
    return users, pos


def run_sampled(backend, device, tables, states, users, pos, csr, k, seed, step, reg,
                optimizer):
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    value = ops.kernels(backend, device, kernel="train_step_pairwise_sampled")\
        .train_step_pairwise_sampled(*got, *to_device((users, pos, *csr), device), k, seed,
                                     step, BPR, reg, optimizer)
    return value, got


# ---------------------------------------------------------------------------------------
# The draws


@pytest.mark.parametrize("batch", [1, 7, 4096])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
def test_negatives_are_never_positives(batch, id_dtype):
    indptr, indices = make_csr(NUM_USERS, NUM_ITEMS, seed=batch, id_dtype=id_dtype)
    users, _ = make_batch(batch, seed=batch + 1, id_dtype=id_dtype)
    neg = sample_negatives(users, indptr, indices, NUM_ITEMS, 5, seed=-3, step=9)
    assert neg.shape == (batch, 5) and neg.dtype == torch.int64
    assert int(neg.min()) >= 0 and int(neg.max()) < NUM_ITEMS
    for b in range(batch):
        u = int(users[b])
        row = set(indices[int(indptr[u]):int(indptr[u + 1])].tolist())
        assert not row & set(neg[b].tolist()), (b, u)
    # The draws move with the seed and the step.
    if batch > 1:
        assert not torch.equal(neg, sample_negatives(users, indptr, indices, NUM_ITEMS, 5,
                                                     seed=-3, step=10))
        assert not torch.equal(neg, sample_negatives(users, indptr, indices, NUM_ITEMS, 5,
                                                     seed=4, step=9))


def test_uniform_over_the_non_positives():
    """Chi-square over the free items of one user with a few positives, and of one who has
    all but three items."""
    num_items = 50
    for row in ([3, 17, 18, 40], [t for t in range(num_items) if t not in (0, 25, 49)]):
        indptr = torch.tensor([0, len(row)])
        indices = torch.tensor(row)
        draws = sample_negatives(torch.zeros(20_000, dtype=torch.long), indptr, indices,
                                 num_items, 3, seed=12345, step=2).reshape(-1)
        counts = torch.bincount(draws, minlength=num_items).double()
        assert counts[row].sum() == 0
        free = counts[[t for t in range(num_items) if t not in row]]
        expected = draws.numel() / free.numel()
        chi2 = float(((free - expected) ** 2 / expected).sum())
        dof = free.numel() - 1
        # Mean dof, sd sqrt(2 dof): 5 sd is a false alarm once in millions of runs.
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)


@pytest.mark.parametrize("backend, device", kernel_params(("numba", "native"), ("cpu",)))
def test_sampler_draws_the_op_negatives(backend, device):
    """NegativeSampler.sample_step (the unfused training path) draws the op's items, so a
    model trained either way sees the same negatives."""
    rng = np.random.default_rng(5)
    train = Interactions(zipf_ids(40, 500, generator=rng).numpy(),
                         zipf_ids(30, 500, generator=rng).numpy(), user_map=40, item_map=30)
    sampler = NegativeSampler(train)
    users = zipf_ids(40, 257, generator=rng)
    indptr, indices = sampler.csr()
    got = sampler.sample_step(users, 3, seed=77, step=5)
    want = sample_negatives(users, indptr, indices, 30, 3, seed=77, step=5)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# The step: the spec, and train_step_pairwise on the reconstructed negatives


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("optimizer", list(STEP_OPTIMIZERS), ids=idfn)
@pytest.mark.parametrize("batch", [0, 1, 7, 4096])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_matches_reference(backend, device, id_dtype, dtype, batch, optimizer, bias):
    seed = batch + 10 * int(optimizer)
    k = 1 + batch % 4
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=seed)
    states = make_states(tables, optimizer, seed=seed + 1)
    csr = make_csr(NUM_USERS, NUM_ITEMS, seed=seed + 2, id_dtype=id_dtype)
    users, pos = make_batch(batch, seed=seed + 3, id_dtype=id_dtype)
    reg = 0.03
    value, got = run_sampled(backend, device, tables, states, users, pos, csr, k, 11, 3, reg,
                             settings(optimizer))
    want = (clone_bundle(tables), clone_bundle(states))
    expected = single_threaded(spec.train_step_pairwise_sampled, *want, users, pos, *csr, k,
                               11, 3, BPR, reg, settings(optimizer))
    assert value.shape == () and value.dtype == dtype and value.device.type == device
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if batch == 0:
        assert float(value) == 0.0
        assert_bit_identical(to_device(got, "cpu"), (tables, states))
    else:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("num_users, num_items", [(NUM_USERS, NUM_ITEMS), (200, 3000)])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_is_train_step_pairwise_on_the_drawn_negatives(backend, device, dtype, num_users,
                                                        num_items):
    """The op's negatives are exactly the spec's. The larger catalog has rows of up to
    2,999 items, so the native kernel's interleaved searches run 12 rounds, with lanes
    of very different lengths (and empty rows) side by side."""
    tables = make_tables(num_users, num_items, DIM, dtype=dtype, seed=21)
    states = make_states(tables, Optimizer.ADAGRAD, seed=22)
    csr = make_csr(num_users, num_items, seed=23)
    rng = np.random.default_rng(24)
    users = zipf_ids(num_users, 999, generator=rng)
    pos = zipf_ids(num_items, 999, generator=rng)
    k = 4
    value, got = run_sampled(backend, device, tables, states, users, pos, csr, k, 2**40 + 1,
                             17, 0.01, settings(Optimizer.ADAGRAD))
    neg = sample_negatives(users, *csr, num_items, k, 2**40 + 1, 17)
    want = to_device((clone_bundle(tables), clone_bundle(states)), device)
    expected = ops.kernels(backend, device).train_step_pairwise(
        *want, *to_device((users.repeat_interleave(k), pos.repeat_interleave(k),
                           neg.reshape(-1)), device), BPR, 0.01, settings(Optimizer.ADAGRAD))
    assert_bit_identical((value, got), (expected, want))


# ---------------------------------------------------------------------------------------
# train_steps_pairwise_sampled: the steps of consecutive slices, in one call


STEPS_SHAPES = [(0, 5, 1), (1, 7, 2), (7, 7, 1), (1000, 300, 1), (1000, 64, 3), (999, 5000, 2)]
# Each multi-step op, its single step and its loss.
STEPS = {STEPS_OP: ("train_step_pairwise_sampled", BPR),
         "train_steps_sampled": ("train_step_sampled", Loss.BCE)}


def steps_setup(backend, device, op, id_dtype, seed, csr_seed):
    """What a multi-step ``op`` check starts from: (its single step, its loss, float32
    tables, Adagrad states, the positives' CSR, the backend's kernels, the settings, the
    global mean argument)."""
    single, loss = STEPS[op]
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=torch.float32, seed=seed)
    states = make_states(tables, Optimizer.ADAGRAD, seed=seed + 1)
    csr = make_csr(NUM_USERS, NUM_ITEMS, seed=csr_seed, id_dtype=id_dtype)
    kernels = ops.kernels(backend, device, kernel=op)
    mu = () if op == STEPS_OP else (0.25,)
    return single, loss, tables, states, csr, kernels, settings(Optimizer.ADAGRAD), mu


def check_steps_in_turn(backend, device, id_dtype, n, batch_size, k, weighted, op=STEPS_OP):
    """One call of the multi-step ``op`` equals the backend's own sampled step on each
    slice at step + t, bit for bit (tables, states, losses), with a short last slice, a
    slice larger than the data, and none at all; and the spec's run of steps to
    rounding."""
    single, loss, tables, states, csr, kernels, opt, mu = steps_setup(
        backend, device, op, id_dtype, n + k, n + 2)
    dtype = tables.user_factors.dtype
    users, pos = make_batch(n, seed=n + 3, id_dtype=id_dtype)
    weights = (torch.rand(n, generator=torch.Generator().manual_seed(n)) * 2
               if weighted else None)
    args = to_device((users, pos, *csr), device)
    w = to_device(weights, device) if weighted else None
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    losses = getattr(kernels, op)(*got, *args, k, batch_size, 41, 5, *mu, loss, 0.02, opt, w)
    one_by_one = to_device((clone_bundle(tables), clone_bundle(states)), device)
    each = [getattr(kernels, single)(
        *one_by_one, args[0][lo:lo + batch_size], args[1][lo:lo + batch_size], args[2],
        args[3], k, 41, 5 + t, *mu, loss, 0.02, opt, None if w is None else w[lo:lo + batch_size])
        for t, lo in enumerate(range(0, n, batch_size))]
    assert losses.shape == (-(-n // batch_size),) and losses.dtype == dtype
    assert_bit_identical((losses.cpu(), to_device(got, "cpu")),
                         (torch.stack(each).cpu() if each else torch.zeros(0),
                          to_device(one_by_one, "cpu")))
    spec_tables = (clone_bundle(tables), clone_bundle(states))
    expected = single_threaded(getattr(spec, op), *spec_tables, users, pos, *csr, k,
                               batch_size, 41, 5, *mu, loss, 0.02, opt, weights)
    assert_close_all(losses.cpu(), expected, dtype)
    assert_close_all(to_device(got, "cpu"), spec_tables, dtype)
    if n:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n, batch_size, k", STEPS_SHAPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_steps_are_the_steps_in_turn(backend, device, id_dtype, n, batch_size, k, weighted):
    check_steps_in_turn(backend, device, id_dtype, n, batch_size, k, weighted)


# (positives, run length, batch size, negatives): a permutation of the positives; a run
# longer than the positives (repeats); a short one; an empty one.
ORDER_SHAPES = [(1000, 1000, 300, 1), (400, 1100, 256, 2), (999, 50, 64, 1), (7, 0, 4, 1)]


def check_steps_through_order(backend, device, id_dtype, order_dtype, m, n, batch_size, k,
                              weighted, op=STEPS_OP):
    """The multi-step ``op`` with ``order`` (n positions into m Zipf positives: a
    shuffle of them, then positions drawn with repeats) equals the op on users[order],
    pos[order], weights[order] on the same backend, bit for bit (tables, states, losses),
    and the spec's run through the order to rounding."""
    _, loss, tables, states, csr, kernels, opt, mu = steps_setup(
        backend, device, op, id_dtype, m + n, m + 2)
    dtype = tables.user_factors.dtype
    users, pos = make_batch(m, seed=m + 3, id_dtype=id_dtype)
    gen = torch.Generator().manual_seed(n)
    weights = torch.rand(m, generator=gen) * 2 if weighted else None
    shuffled = torch.randperm(m, generator=gen)[:n]
    order = torch.cat([shuffled, torch.randint(0, m, (n - len(shuffled),), generator=gen)])
    order = order.to(order_dtype)
    assert len(order) == n and (n < 2 or len(set(order.tolist())) > 1)
    args = to_device((users, pos, *csr), device)
    w = to_device(weights, device) if weighted else None
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    losses = getattr(kernels, op)(*got, *args, k, batch_size, 41, 5, *mu, loss, 0.02, opt, w,
                                  to_device(order, device))
    gathered = to_device((clone_bundle(tables), clone_bundle(states)), device)
    idx = to_device(order.long(), device)
    expected_losses = getattr(kernels, op)(
        *gathered, args[0][idx], args[1][idx], args[2], args[3], k, batch_size, 41, 5, *mu,
        loss, 0.02, opt, None if w is None else w[idx])
    assert losses.shape == (-(-n // batch_size),) and losses.dtype == dtype
    assert_bit_identical((losses.cpu(), to_device(got, "cpu")),
                         (expected_losses.cpu(), to_device(gathered, "cpu")))
    spec_tables = (clone_bundle(tables), clone_bundle(states))
    expected = single_threaded(getattr(spec, op), *spec_tables, users, pos, *csr, k,
                               batch_size, 41, 5, *mu, loss, 0.02, opt, weights, order)
    assert_close_all(losses.cpu(), expected, dtype)
    assert_close_all(to_device(got, "cpu"), spec_tables, dtype)
    if n:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("m, n, batch_size, k", ORDER_SHAPES)
@pytest.mark.parametrize("order_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_steps_through_an_order(backend, device, id_dtype, order_dtype, m, n, batch_size, k,
                                weighted):
    check_steps_through_order(backend, device, id_dtype, order_dtype, m, n, batch_size, k,
                              weighted)


ROW_KINDS = ["clustered", "long", "unsorted", "repeats", "mixed"]


def make_rows(kind, num_users, num_items, *, seed, id_dtype=torch.int64):
    """A positives' CSR whose rows are of one ``kind``: "clustered" (each row one run of
    consecutive items: all its positives in one place of the rank space), "long" (all but 1
    to 8 items), "unsorted" (distinct items in random order: the reference does not check
    order, so its probes alone define the draws), "repeats" (sorted, with repeated items),
    or "mixed" (user u gets kind u % 4, and every seventh user no row)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        this = ROW_KINDS[u % 4] if kind == "mixed" else kind
        if kind == "mixed" and u % 7 == 0:
            rows.append(np.zeros(0, np.int64))
            continue
        if this == "long":
            deg = num_items - int(rng.integers(1, 9))
        else:
            deg = int(rng.integers(1, num_items // 2))
        if this == "clustered":
            first = int(rng.integers(0, num_items - deg + 1))
            row = np.arange(first, first + deg)
        else:
            row = np.sort(rng.choice(num_items, size=deg, replace=False))
        if this == "unsorted":
            row = rng.permutation(row)
        if this == "repeats":
            row = np.sort(np.concatenate([row[:deg // 2], row[:deg // 2]]))
        rows.append(row)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return (torch.from_numpy(indptr).to(id_dtype),
            torch.from_numpy(np.concatenate(rows)).to(id_dtype))


def check_steps_draw_as_the_step(backend, device, kind, id_dtype, op=STEPS_OP):
    """A multi-step op's draws on rows of ``kind`` (make_rows): the same tables, states and
    losses, bit for bit, as the backend's single step on each slice (a negative drawn
    differently would step another item's row). Each backend draws the multi-step op's
    negatives in its own loop (the CPU's team, Numba's and CUDA's steps in turn)."""
    single, loss = STEPS[op]
    num_users, num_items, n, batch_size, k = 97, 3_000, 2_500, 1_024, 2
    tables = make_tables(num_users, num_items, DIM, seed=61)
    states = make_states(tables, Optimizer.ADAGRAD, seed=62)
    csr = make_rows(kind, num_users, num_items, seed=63, id_dtype=id_dtype)
    rng = np.random.default_rng(64)
    users = zipf_ids(num_users, n, generator=rng, dtype=id_dtype)
    pos = zipf_ids(num_items, n, generator=rng, dtype=id_dtype)
    kernels = ops.kernels(backend, device, kernel=op)
    opt = settings(Optimizer.ADAGRAD)
    mu = () if op == STEPS_OP else (0.25,)
    args = to_device((users, pos, *csr), device)
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    losses = getattr(kernels, op)(*got, *args, k, batch_size, 7, 3, *mu, loss, 0.01, opt, None)
    each_tables = to_device((clone_bundle(tables), clone_bundle(states)), device)
    each = [getattr(kernels, single)(*each_tables, args[0][lo:lo + batch_size],
                                     args[1][lo:lo + batch_size], args[2], args[3], k, 7, 3 + t,
                                     *mu, loss, 0.01, opt)
            for t, lo in enumerate(range(0, n, batch_size))]
    assert_bit_identical((losses.cpu(), to_device(got, "cpu")),
                         (torch.stack(each).cpu(), to_device(each_tables, "cpu")))
    assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params())
def test_steps_draw_as_the_step_on_any_rows(backend, device, kind, id_dtype):
    check_steps_draw_as_the_step(backend, device, kind, id_dtype)


def check_steps_thread_counts(backend, device, op=STEPS_OP):
    loss = STEPS[op][1]
    mu = () if op == STEPS_OP else (0.25,)

    def run(k, weighted):
        tables = make_tables(5_000, 2_000, 64, seed=31)
        states = make_states(tables, Optimizer.ADAGRAD, seed=32)
        tables, states = to_device((tables, states), device)
        csr = to_device(make_csr(5_000, 2_000, seed=33, max_degree=300), device)
        rng = np.random.default_rng(34)
        users = zipf_ids(5_000, 10_000, generator=rng, device=device)
        pos = zipf_ids(2_000, 10_000, generator=rng, device=device)
        weights = (torch.from_numpy(rng.uniform(0.2, 3.0, 10_000)).to(tables.user_factors)
                   if weighted else None)
        losses = getattr(ops.kernels(backend, device, kernel=op), op)(
            tables, states, users, pos, *csr, k, 4096 // k, 9, 0, *mu, loss, 0.01,
            settings(Optimizer.ADAGRAD), weights)
        return losses, tables, states

    for k, weighted in ((1, False), (3, True)):
        with num_threads(backend, 1):
            one = run(k, weighted)
        # 5: more threads than CI's 2 cores, so the team's barrier also sleeps and wakes;
        # twice each, as which thread runs which piece of a phase changes from run to run.
        for threads in (2, 2, 5, 5):
            with num_threads(backend, threads):
                assert_bit_identical(one, run(k, weighted))


@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_steps_bit_identical_across_thread_counts(backend, device):
    check_steps_thread_counts(backend, device)


def run_steps(backend, device, dtype, op=OP_NAME, loss=BPR, optimizer=Optimizer.ADAGRAD):
    """Three steps of the sampled op ``op`` on Zipf batches of 4096 (k = 2): the losses and
    the tables and states after them."""
    tables = make_tables(5_000, 2_000, 64, dtype=dtype, seed=11)
    states = make_states(tables, optimizer, seed=12)
    tables, states = to_device((tables, states), device)
    csr = to_device(make_csr(5_000, 2_000, seed=13, max_degree=300), device)
    kernels = ops.kernels(backend, device, kernel=op)
    losses = []
    rng = np.random.default_rng(14)
    for step in range(3):
        users = zipf_ids(5_000, 4096, generator=rng, device=device)
        pos = zipf_ids(2_000, 4096, generator=rng, device=device)
        losses.append(call_sampled(kernels, op, tables, states, users, pos, *csr, 2, 99, step,
                                   loss, 0.01, settings(optimizer)))
    return losses, tables, states


def check_thread_counts(backend, device, dtype, **op):
    with num_threads(backend, 2):
        two = run_steps(backend, device, dtype, **op)
    with num_threads(backend, 1):
        one = run_steps(backend, device, dtype, **op)
    assert_bit_identical(one, two)
    assert not torch.equal(one[1].item_factors.cpu(),
                           make_tables(5_000, 2_000, 64, dtype=dtype, seed=11).item_factors)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_bit_identical_across_thread_counts(backend, device, dtype):
    check_thread_counts(backend, device, dtype)


# ---------------------------------------------------------------------------------------
# Bad inputs: the same exception and message on every backend, nothing written. The cases
# and the fit check serve both sampled ops (tests/test_pointwise_sampled.py runs them for
# train_step_sampled).

def bad_cases(op=OP_NAME, loss=BPR, extra=None):
    """(good arguments, {case: (change, exception, pattern)}) for the sampled op ``op``
    run with ``loss``; ``extra(tables, states, prefix)`` adds the op's own cases."""
    prefix = f"fastmf.{op}: "
    tables = make_tables(20, 10, 4, seed=0)
    states = make_states(tables, Optimizer.ADAGRAD, seed=1)
    indptr, indices = make_csr(20, 10, seed=2, max_degree=6)
    users = torch.tensor([3, 1, 4, 1, 5, 9])
    pos = torch.tensor([2, 7, 1, 8, 2, 8])

    def with_value(ids, at, value):
        ids = ids.clone()
        ids[at] = value
        return ids

    # User 5's row made to hold all ten items; user 4's pointer past the end.
    full_indptr = indptr.clone()
    full_indptr[6:] += 10 - int(indptr[6] - indptr[5])
    full_indices = torch.cat([indices[:int(indptr[5])], torch.arange(10),
                              indices[int(indptr[6]):]])
    good = dict(P=tables[0], Q=tables[1], bu=tables[2], bi=tables[3], Ps=states[0],
                Qs=states[1], bus=states[2], bis=states[3], users=users, pos=pos,
                indptr=indptr, indices=indices, k=3, loss=loss, opt=Optimizer.ADAGRAD)
    n = int(indptr[-1])
    cases = {
        "user out of range": (dict(users=with_value(users, 2, 20)), IndexError,
                              re.escape(prefix + "users id 20 out of range [0, 20)")),
        "pos out of range": (dict(pos=with_value(pos, 0, -1)), IndexError,
                             re.escape(prefix + "items id -1 out of range [0, 10)")),
        "no negatives": (dict(k=0), ValueError,
                         re.escape(prefix + "num_negatives must be >= 1, got 0")),
        "indptr length": (dict(indptr=indptr[:-1]), ValueError,
                          re.escape(prefix + "pos_indptr has 20 entries, expected "
                                    "num_users + 1 = 21")),
        "indptr dtype": (dict(indptr=indptr.float()), TypeError,
                         "pos_indptr must be int32 or int64"),
        "indices 2-D": (dict(indices=indices[:n - n % 2].view(2, -1)), ValueError,
                        "pos_indices must be 1-D"),
        "indptr past the end": (dict(indptr=with_value(indptr, 5, n + 3)), ValueError,
                                re.escape(prefix + f"pos_indptr gives user 4 the row "
                                          f"[{int(indptr[4])}, {n + 3}), not an ordered "
                                          f"range within [0, {n}] (len(pos_indices))")),
        "user with every item": (dict(indptr=full_indptr, indices=full_indices), ValueError,
                                 re.escape(prefix + "user 5 has 10 positives of 10 items; no "
                                           "item is left to sample as a negative")),
        "lengths": (dict(pos=pos[:5]), ValueError, "lengths differ"),
        "optimizer code": (dict(opt=3), ValueError, "unknown optimizer code 3"),
        "loss code": (dict(loss=5), ValueError, "unknown pairwise loss code 5"),
    }
    if extra is not None:
        cases.update(extra(tables, states, prefix))
    return good, cases


BAD_CASES = list(bad_cases()[1])


def steps_extra_cases(tables, states, prefix):
    """The multi-step ops' own cases: the batch size, a fault only the second step's
    slice holds, and a bad order (one past the six positives in the second step, a
    negative one, a float or 2-D order, a user out of range that the order skips)."""
    return {
        "batch_size 0": (dict(batch_size=0), ValueError,
                         re.escape(prefix + "batch_size must be >= 1, got 0")),
        "user out of range in the second step": (
            dict(users=torch.tensor([3, 1, 4, 1, 5, 21])), IndexError,
            re.escape(prefix + "users id 21 out of range [0, 20)")),
        "order out of range in the second step": (
            dict(order=torch.tensor([5, 0, 2, 2, 6], dtype=torch.int32)), IndexError,
            re.escape(prefix + "order id 6 out of range [0, 6)")),
        "order negative": (dict(order=torch.tensor([1, -2, 0])), IndexError,
                           re.escape(prefix + "order id -2 out of range [0, 6)")),
        "order dtype": (dict(order=torch.tensor([1.0, 0.0])), TypeError,
                        re.escape(prefix + "order must be int32 or int64")),
        "order 2-D": (dict(order=torch.tensor([[1, 0], [2, 3]])), ValueError,
                      re.escape(prefix + "order must be 1-D")),
        "user out of range outside the order": (
            dict(users=torch.tensor([3, 1, 4, 1, 5, 21]), order=torch.tensor([0, 1, 2])),
            IndexError, re.escape(prefix + "users id 21 out of range [0, 20)")),
    }


def steps_bad_cases():
    """The sampled step's cases for train_steps_pairwise_sampled (their faults sit in the
    first or the second of its two steps), and its own."""
    return bad_cases(STEPS_OP, extra=steps_extra_cases)


STEPS_BAD_CASES = list(steps_bad_cases()[1])


def call_bad(backend, device, case, cases_of=bad_cases, op=OP_NAME):
    good, cases = cases_of()
    change, exc, pattern = cases[case]
    args = {key: to_device(v, device) if isinstance(v, torch.Tensor) else v
            for key, v in {**good, **change}.items() if not callable(v)}
    # A change made of other arguments (a view of one) is made after the move, on the
    # device: moving a view on its own would give it storage of its own.
    args.update({key: v(args) for key, v in change.items() if callable(v)})
    tables = MFTables(*(args[key] for key in ("P", "Q", "bu", "bi")))
    states = MFTables(*(args[key] for key in ("Ps", "Qs", "bus", "bis")))
    before = clone_all(*tables, *states)
    kernels = ops.kernels(backend, device, kernel=op)
    with pytest.raises(exc, match=pattern) as info:
        call_sampled(kernels, op, tables, states, args["users"], args["pos"], args["indptr"],
                     args["indices"], args["k"], 5, 6, args["loss"], 0.01,
                     settings(args["opt"], lr=0.1),
                     batch_size=args.get("batch_size", BAD_CASE_BATCH), order=args.get("order"))
    for t, b in zip(tables + states, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"
    return str(info.value)


def messages_agree(case, cases_of=bad_cases, op=OP_NAME):
    names = ops.available_backends()
    if len(names) < 2:
        pytest.skip("needs a backend besides the reference")
    first = {name: call_bad(name, "cpu", case, cases_of, op).splitlines()[0]
             for name in names}
    assert len(set(first.values())) == 1, first


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_bad_inputs(backend, device, case):
    call_bad(backend, device, case)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if "dtype" not in c and "2-D" not in c])
def test_bad_input_messages_agree(case):
    messages_agree(case)


# Faults that the GPU's steps record on the device one step at a time, so the steps
# before a bad slice have run when the error is raised.
DEVICE_RECORDED = ("indptr past the end", "user with every item",
                   "user out of range in the second step")


@pytest.mark.parametrize("case", STEPS_BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_steps_bad_inputs(backend, device, case):
    if device == "cuda" and case in DEVICE_RECORDED:
        pytest.skip("recorded on the device step by step")
    call_bad(backend, device, case, steps_bad_cases, STEPS_OP)


@pytest.mark.parametrize("case", [c for c in STEPS_BAD_CASES
                                  if "dtype" not in c and "2-D" not in c])
def test_steps_bad_input_messages_agree(case):
    messages_agree(case, steps_bad_cases, STEPS_OP)


# ---------------------------------------------------------------------------------------
# fastmf.fit: MF with bpr runs the sampled op and sees the same negatives as the unfused path


def check_fit_uses_sampled_step(backend, monkeypatch, loss, op, *, exact):
    """``fastmf.fit(MF, loss=loss)`` calls ``op``, and trains as the unfused path (the
    sampler's draws, then the plain fused step) does: to the bit when ``exact``."""
    rng = np.random.default_rng(8)
    train = Interactions(zipf_ids(60, 1500, generator=rng).numpy(),
                         zipf_ids(40, 1500, generator=rng).numpy(), user_map=60, item_map=40)

    def fit(sampled: bool):
        torch.manual_seed(0)
        model = fastmf.MF(60, 40, dim=8, backend=backend)
        if not sampled:
            monkeypatch.setattr(model, "draws_negatives", lambda loss: False)
        history = fastmf.fit(model, train, loss=loss, epochs=2, batch_size=256, seed=3,
                             num_negatives=2, progress=False)
        return model, history

    calls = []
    original = ops.kernels

    def spy(*args, **kwargs):
        module = original(*args, **kwargs)
        calls.append(kwargs.get("kernel"))
        return module

    monkeypatch.setattr(ops, "kernels", spy)
    fused, fused_history = fit(True)
    assert op in calls
    calls.clear()
    unfused, unfused_history = fit(False)
    assert op not in calls
    if exact:
        assert fused_history["loss"] == unfused_history["loss"]
        assert_bit_identical(tuple(fused.tables()), tuple(unfused.tables()))
    else:
        assert fused_history["loss"] == pytest.approx(unfused_history["loss"], rel=1e-6)
        assert_close_all(tuple(fused.tables()), tuple(unfused.tables()), torch.float32)
    assert fused_history["loss"][1] < fused_history["loss"][0]


@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_fit_mf_bpr_uses_the_sampled_step(backend, device, monkeypatch):
    """fit runs MF's bpr epochs as one train_steps_pairwise_sampled call each."""
    check_fit_uses_sampled_step(backend, monkeypatch, "bpr", STEPS_OP, exact=False)


def check_fit_epoch_call(backend, loss, weighted):
    """The one-call epoch trains MF as the batch-by-batch loop over the same fused step
    does, to the bit (tables, optimizer state and the history's losses), weights
    included."""
    rng = np.random.default_rng(9)
    n = 1300
    train = Interactions(zipf_ids(60, n, generator=rng).numpy(),
                         zipf_ids(40, n, generator=rng).numpy(), user_map=60, item_map=40)
    if weighted:
        train = train.with_weights(rng.uniform(0.5, 2.0, n))

    def fit(whole: bool):
        torch.manual_seed(0)
        model = fastmf.MF(60, 40, dim=8, backend=backend)
        if not whole:
            model.train_epoch = lambda *args, **kwargs: None
        opt = model.make_optimizer(None, 0.05)
        history = fastmf.fit(model, train, loss=loss, epochs=3, batch_size=256, seed=4,
                             num_negatives=2, optimizer=opt, progress=False)
        return model, opt, history

    whole, whole_opt, whole_history = fit(True)
    batched, batched_opt, batched_history = fit(False)
    assert whole_history["loss"] == batched_history["loss"]
    assert whole_history["samples_per_s"][0] > 0
    assert_bit_identical(tuple(whole.tables()), tuple(batched.tables()))
    assert_bit_identical(tuple(whole_opt.state_for(t) for t in whole.tables() if t is not None),
                         tuple(batched_opt.state_for(t) for t in batched.tables()
                               if t is not None))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_fit_mf_bpr_epoch_call_equals_the_batches(backend, device, weighted):
    check_fit_epoch_call(backend, "bpr", weighted)


def test_fit_keeps_a_subclass_training_step():
    """An MF subclass that overrides training_step (or batches) is trained batch by batch
    through its own hook, not by the one-call epoch."""
    rng = np.random.default_rng(10)
    train = Interactions(zipf_ids(30, 600, generator=rng).numpy(),
                         zipf_ids(20, 600, generator=rng).numpy(), user_map=30, item_map=20)
    calls = []

    class Counted(fastmf.MF):
        def training_step(self, batch, optimizer, *, loss, reg):
            calls.append(len(batch.users))
            return super().training_step(batch, optimizer, loss=loss, reg=reg)

    for loss in ("bpr", "bce"):
        calls.clear()
        fastmf.fit(Counted(30, 20, dim=4), train, loss=loss, epochs=2, batch_size=128,
                   progress=False)
        assert calls == [128, 128, 128, 128, 88] * 2
    assert fastmf.MF(30, 20, dim=4).train_epoch(
        train, None, batch_size=128, loss="warp", num_negatives=2, sampler=None,
        generator=torch.Generator(), reg=0.0) is None


@pytest.mark.parametrize("op", [STEPS_OP, "train_steps_sampled"])
@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_public_steps_take_an_order(backend, device, op):
    """fastmf.step's multi-step functions take ``order`` as a tensor, a NumPy array or a
    list (the positions of the run), train as on the gathered run to the bit, and refuse
    an order out of range before anything is written."""
    from fastmf import step as public

    rng = np.random.default_rng(21)
    n = 700
    users = zipf_ids(60, n, generator=rng)
    items = zipf_ids(40, n, generator=rng)
    indptr, indices = make_csr(60, 40, seed=22, max_degree=30)
    order = np.concatenate([rng.permutation(n)[:500], rng.integers(0, n, 90)])
    run = getattr(public, op)

    def trained(u, i, **kw):
        torch.manual_seed(3)
        model = fastmf.MF(60, 40, dim=8, backend=backend)
        opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
        losses = run(model, opt, u, i, indptr, indices, 2, batch_size=128, seed=8, reg=0.01,
                     **kw)
        return losses, tuple(model.tables()), model, opt

    idx = torch.from_numpy(order)
    expected = trained(users[idx], items[idx])
    for given in (torch.from_numpy(order).int(), order, order.tolist()):
        got = trained(users, items, order=given)
        assert_bit_identical((got[0], got[1]), (expected[0], expected[1]))
    _, tables, model, opt = expected
    before = clone_all(*tables)
    with pytest.raises(IndexError, match=re.escape(f"fastmf.{op}: order id {n} out of range "
                                                   f"[0, {n})")):
        run(model, opt, users, items, indptr, indices, 2, batch_size=128, seed=8,
            order=[0, 5, n])
    assert all(torch.equal(a, b) for a, b in zip(model.tables(), before) if a is not None)
