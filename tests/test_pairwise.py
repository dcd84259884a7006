"""The pairwise op family (the fused BPR step ``train_step_pairwise``) on every backend and
device, through ``fastmf.ops.kernels(backend, device)``, against the spec
(``fastmf.ops.reference`` on CPU) and against textbook PyTorch.

Fresh random tables and Zipf ids, with items that are positives in some samples and
negatives in others (and both in one sample), over id dtype × weight dtype × batch size ×
optimizer × reg × bias; 20 repeated steps; determinism across runs and thread counts; and
bad inputs, whose errors must read the same on every backend. The native op's opcheck and
torch.compile tests are in ``test_native_only.py``, the Numba-only errors in
``test_numba_only.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmf import ops
from fastmf.ops import MFTables, Optimizer, OptimizerArgs, PairwiseLoss
from fastmf.ops import reference as spec
from fastmf.ops.codes import STEP_OPTIMIZERS
from fastmf.testing import (
    ALL_KERNELS,
    BATCH_SIZES,
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
    make_triples,
    num_threads,
    refuses_strided_tables,
    single_threaded,
    textbook_optimizer,
    to_device,
    zipf_ids,
)

NUM_USERS, NUM_ITEMS, DIM = 300, 60, 13
OPTIMIZERS = list(STEP_OPTIMIZERS)  # the optimizers the fused MF steps apply
BPR = PairwiseLoss.BPR
DETERMINISTIC_KERNELS = kernel_params(("numba", "native"))
THREADED_BACKENDS = kernel_params(("numba", "native"), ("cpu",))


def settings(optimizer, lr=0.05, eps=1e-8) -> OptimizerArgs:
    return OptimizerArgs(optimizer, lr, eps)


def step_both(backend, device, tables, states, triples, reg, optimizer: OptimizerArgs,
              expected_triples=None, loss=BPR):
    """One step of ``backend`` on copies of the tables and states on ``device`` and one step
    of the spec on CPU copies: ``(loss_got, loss_want, got, want)``."""
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    want = (clone_bundle(tables), clone_bundle(states))
    value = ops.kernels(backend, device).train_step_pairwise(
        *got, *to_device(triples, device), loss, reg, optimizer)
    expected = single_threaded(spec.train_step_pairwise, *want,
                               *(expected_triples or triples), loss, reg, optimizer)
    return value, expected, got, want


# ---------------------------------------------------------------------------------------
# Against the spec


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reg", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_matches_reference(backend, device, id_dtype, dtype, batch, optimizer, reg, bias):
    seed = batch + 10 * int(optimizer)
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=seed)
    states = make_states(tables, optimizer, seed=seed + 1)
    triples = make_triples(NUM_USERS, NUM_ITEMS, batch, seed=seed + 2, id_dtype=id_dtype)
    if batch >= 7:
        assert np.intersect1d(triples[1].numpy(), triples[2].numpy()).size > 0
    value, expected, got, want = step_both(backend, device, tables, states, triples, reg,
                                           settings(optimizer))
    assert value.shape == () and value.dtype == dtype and value.device.type == device
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if bias:
        # user_bias cancels in x: neither it nor its state is ever written.
        assert torch.equal(got[0].user_bias.cpu(), tables.user_bias)
        assert states is None or torch.equal(got[1].user_bias.cpu(), states.user_bias)
    if batch == 0:
        assert float(value) == 0.0
        assert_bit_identical(to_device(got, "cpu"), (tables, states))
    else:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("batch, dtype, id_dtype", [
    (0, torch.float32, torch.int64), (7, torch.float64, torch.int32),
    (4096, torch.float32, torch.int32), (4096, torch.float64, torch.int64)], ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_hinge_matches_reference(backend, device, batch, dtype, id_dtype, optimizer):
    """The margin ranking hinge relu(1 - x): tables scaled so that about half the samples
    are past the margin (no gradient) and the rest inside it."""
    seed = 70 + batch + int(optimizer)
    tables = MFTables(*(12 * t for t in make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype,
                                                    seed=seed)))
    states = make_states(tables, optimizer, seed=seed + 1)
    triples = make_triples(NUM_USERS, NUM_ITEMS, batch, seed=seed + 2, id_dtype=id_dtype)
    if batch >= 4096:
        u, i, j = (t.long() for t in triples)
        x = (tables.item_bias[i] - tables.item_bias[j]
             + (tables.user_factors[u] * (tables.item_factors[i] - tables.item_factors[j])).sum(1))
        assert 0.2 < float((x < 1).double().mean()) < 0.9
    value, expected, got, want = step_both(backend, device, tables, states, triples, 0.05,
                                           settings(optimizer), loss=PairwiseLoss.HINGE)
    assert value.shape == () and value.dtype == dtype
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_names_and_hot_rows(backend, device):
    """One user and one item on both sides of every sample; the Python backends also take
    the loss and optimizer by name (the native op takes codes)."""
    dtype = torch.float64
    tables = make_tables(NUM_USERS, NUM_ITEMS, 64, dtype=dtype, seed=3)
    states = make_states(tables, Optimizer.ROWWISE_ADAGRAD, seed=4)
    users = torch.full((2048,), 5)
    pos = torch.full((2048,), 9)
    neg = zipf_ids(NUM_ITEMS, 2048, generator=np.random.default_rng(5))
    neg[1::2] = 9
    value, expected, got, want = step_both(backend, device, tables, states, (users, pos, neg),
                                           0.01, settings(Optimizer.ROWWISE_ADAGRAD))
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if backend != "native":
        named = to_device((clone_bundle(tables), clone_bundle(states)), device)
        ops.kernels(backend, device).train_step_pairwise(
            *named, *to_device((users, pos, neg), device), "bpr", 0.01,
            settings("rowwise_adagrad"))
        assert_bit_identical(named, got)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_mixed_id_dtypes_and_strided_inputs(backend, device):
    """int32 users, int64 positives, int32 negatives; strided ids and a strided table,
    updated in place."""
    dtype = torch.float64
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=20)
    states = make_states(tables, Optimizer.ADAGRAD, seed=21)
    wide = torch.zeros(NUM_ITEMS, DIM * 2, dtype=dtype, device=device)
    wide[:, ::2] = tables.item_factors.to(device)
    users, pos, neg = make_triples(NUM_USERS, NUM_ITEMS, 600, seed=22)
    strided = tuple(x.repeat_interleave(2)[::2] for x in (users.int(), pos, neg.int()))
    assert not strided[1].is_contiguous()
    got = (MFTables(tables.user_factors.to(device), wide[:, ::2],
                    *to_device(clone_all(*tables[2:]), device)),
           to_device(clone_bundle(states), device))
    want = (clone_bundle(tables), clone_bundle(states))
    if refuses_strided_tables(backend, device):
        # Refused with a clear error and unwritten; the ids stay strided.
        with pytest.raises(ValueError, match=r"fastmf\.train_step_pairwise: item_factors must "
                                             r"be contiguous to be updated in place"):
            ops.kernels(backend, device).train_step_pairwise(
                *got, *to_device(strided, device), BPR, 0.01, settings(Optimizer.ADAGRAD))
        assert torch.equal(wide[:, ::2].cpu(), tables.item_factors)
        got = (MFTables(got[0][0], wide[:, ::2].contiguous(), *got[0][2:]), got[1])
    value = ops.kernels(backend, device).train_step_pairwise(
        *got, *to_device(strided, device), BPR, 0.01, settings(Optimizer.ADAGRAD))
    expected = single_threaded(spec.train_step_pairwise, *want, users, pos, neg, BPR, 0.01,
                               settings(Optimizer.ADAGRAD))
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    assert torch.equal(wide[:, 1::2].cpu(), torch.zeros(NUM_ITEMS, DIM, dtype=dtype))


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_large_margins(backend, device, dtype):
    """|x| far beyond softplus's threshold of 20, both signs: finite, and as the spec."""
    tables = MFTables(*(t * 60 for t in make_tables(50, 40, 4, dtype=dtype, seed=6)))
    states = make_states(tables, Optimizer.ADAGRAD, seed=7)
    users, pos, neg = make_triples(50, 40, 512, seed=8)
    P, Q, _, bi = tables
    x = bi[pos] - bi[neg] + (P[users] * (Q[pos] - Q[neg])).sum(1)
    assert x.max() > 20 and x.min() < -20
    value, expected, got, want = step_both(backend, device, tables, states, (users, pos, neg),
                                           0.0, settings(Optimizer.ADAGRAD))
    assert torch.isfinite(value)
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_loss_just_below_the_threshold(backend, device, dtype):
    """Every pair's softplus argument in (18.5, 19.5), just below the threshold of 20: the
    loss terms the native step sums as the log of a product of 1 + e^z (up to 2^28 each,
    32 to a product), on 512 pairs, as the spec sums them."""
    P, Q, bu, bi = make_tables(50, 40, 4, dtype=dtype, seed=16)
    users, pos, neg = make_triples(50, 40, 512, seed=17)
    pos, neg = pos - pos % 2, neg - neg % 2 + 1  # positives even, negatives odd
    items = torch.arange(40)
    # x = b_i - b_j + <p, q_i - q_j>: about -19 from the biases, the dots within 0.1.
    bi = torch.where(items % 2 == 0, -9.5, 9.5).to(dtype) + (bi - bi.mean()) * 0.05
    tables = MFTables(P * 0.1, Q * 0.1, bu, bi)
    states = make_states(tables, Optimizer.ADAGRAD, seed=18)
    x = bi[pos] - bi[neg] + (tables[0][users] * (tables[1][pos] - tables[1][neg])).sum(1)
    assert (-x).min() > 18.5 and (-x).max() < 19.5
    value, expected, got, want = step_both(backend, device, tables, states, (users, pos, neg),
                                           0.0, settings(Optimizer.ADAGRAD))
    assert 18.5 < float(value) < 19.5
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_20_steps(backend, device, dtype, optimizer):
    tables = make_tables(NUM_USERS, NUM_ITEMS, 32, dtype=dtype, seed=9)
    states = make_states(tables, optimizer, seed=10)
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    want = (clone_bundle(tables), clone_bundle(states))
    kernels = ops.kernels(backend, device)
    for k in range(20):
        triples = make_triples(NUM_USERS, NUM_ITEMS, 1024, seed=100 + k)
        value = kernels.train_step_pairwise(*got, *to_device(triples, device), BPR, 0.02,
                                            settings(optimizer))
        expected = single_threaded(spec.train_step_pairwise, *want, *triples, BPR, 0.02,
                                   settings(optimizer))
        assert_close_all(value, expected, dtype, msg=lambda m, k=k: f"step {k}: {m}")
    assert_close_all(got, want, dtype)
    assert not torch.equal(got[0].user_factors.cpu(), tables.user_factors)


# ---------------------------------------------------------------------------------------
# Against textbook PyTorch: nn.Embedding(sparse=True) + torch.optim, loss by autograd


@pytest.mark.parametrize("loss", list(PairwiseLoss), ids=idfn)
@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAGRAD], ids=idfn)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_matches_textbook(backend, device, dtype, optimizer, loss):
    """Five fused BPR (or hinge) steps equal five steps of the textbook model, where an
    item's positive and negative lookups are one sparse gradient that torch.optim
    coalesces."""
    lr, eps, reg, init = 0.05, 1e-10, 0.02, 0.1
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=30)
    if loss == PairwiseLoss.HINGE:  # about a third of the samples past the margin
        tables = MFTables(*(12 * t for t in tables))
    p = nn.Embedding.from_pretrained(tables.user_factors.clone(), freeze=False, sparse=True)
    q = nn.Embedding.from_pretrained(tables.item_factors.clone(), freeze=False, sparse=True)
    bi = nn.Embedding.from_pretrained(tables.item_bias[:, None].clone(), freeze=False,
                                      sparse=True)
    torch_opt, states = textbook_optimizer([p.weight, q.weight, bi.weight], tables, optimizer,
                                           lr, eps, init)
    got = to_device((clone_bundle(tables), states), device)
    kernels = ops.kernels(backend, device)
    for step in range(5):
        users, pos, neg = make_triples(NUM_USERS, NUM_ITEMS, 700, seed=31 + step)
        value = kernels.train_step_pairwise(*got, *to_device((users, pos, neg), device), loss,
                                            reg, settings(optimizer, lr=lr, eps=eps))
        pu, qi, qj = p(users), q(pos), q(neg)
        bpos, bneg = bi(pos)[:, 0], bi(neg)[:, 0]
        x = bpos - bneg + (pu * (qi - qj)).sum(1)
        penalty = (pu.pow(2).sum(1) + qi.pow(2).sum(1) + qj.pow(2).sum(1) + bpos.pow(2)
                   + bneg.pow(2)).mean()
        data = F.softplus(-x) if loss == PairwiseLoss.BPR else F.relu(1 - x)
        total = data.mean() + reg * penalty
        torch_opt.zero_grad()
        total.backward()
        torch_opt.step()
        assert_close_all(value, total.detach(), dtype)
    assert_close_all(got[0], (p.weight, q.weight, tables.user_bias, bi.weight[:, 0]), dtype)
    if states is not None:
        assert_close_all(got[1].item_factors, torch_opt.state[q.weight]["sum"], dtype)


# ---------------------------------------------------------------------------------------
# Determinism: bit-identical run after run, and on one thread or two


def run_steps(backend, device, dtype):
    tables = make_tables(5_000, 2_000, 64, dtype=dtype, seed=11)
    states = make_states(tables, Optimizer.ADAGRAD, seed=12)
    tables, states = to_device((tables, states), device)
    kernels = ops.kernels(backend, device)
    losses = []
    for k in range(3):
        triples = make_triples(5_000, 2_000, 8192, seed=200 + k, device=device)
        losses.append(kernels.train_step_pairwise(tables, states, *triples, BPR, 0.01,
                                                  settings(Optimizer.ADAGRAD)))
    return losses, tables, states


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", DETERMINISTIC_KERNELS)
def test_bit_identical_across_runs(backend, device, dtype):
    first, second = run_steps(backend, device, dtype), run_steps(backend, device, dtype)
    assert_bit_identical(first, second)
    assert not torch.equal(first[1].item_factors.cpu(),
                           make_tables(5_000, 2_000, 64, dtype=dtype, seed=11).item_factors)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_bit_identical_across_thread_counts(backend, device, dtype):
    with num_threads(backend, 2):
        two = run_steps(backend, device, dtype)
    with num_threads(backend, 1):
        one = run_steps(backend, device, dtype)
    assert_bit_identical(one, two)


# ---------------------------------------------------------------------------------------
# Bad inputs: the right exception and message, the same on every backend, nothing written

OP = "fastmf.train_step_pairwise: "


def bad_cases():
    tables = make_tables(20, 10, 4, seed=0)
    states = make_states(tables, Optimizer.ADAGRAD, seed=1)
    rowwise = make_states(tables, Optimizer.ROWWISE_ADAGRAD, seed=2)
    users, pos, neg = make_triples(20, 10, 6, seed=3)

    def with_id(ids, k, value):
        ids = ids.clone()
        ids[k] = value
        return ids

    good = dict(P=tables[0], Q=tables[1], bu=tables[2], bi=tables[3], Ps=states[0],
                Qs=states[1], bus=states[2], bis=states[3], users=users, pos=pos, neg=neg,
                loss=BPR, opt=Optimizer.ADAGRAD)
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
        "loss code": (dict(loss=2), ValueError, "unknown pairwise loss code 2"),
        "negative loss code": (dict(loss=-1), ValueError, "unknown pairwise loss code -1"),
        "optimizer code": (dict(opt=3), ValueError, "unknown optimizer code 3"),
        "one bias": (dict(bu=None), ValueError, "both be given or both None"),
        "rowwise state for adagrad": (dict(Ps=rowwise[0]), ValueError,
                                      r"user_factors_state must be 2-D, got shape .20,?."),
        "adagrad state for rowwise": (dict(opt=Optimizer.ROWWISE_ADAGRAD, Ps=states[0],
                                           Qs=rowwise[1]), ValueError,
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


BAD_CASES = list(bad_cases()[1])
# The cases whose messages print no dtype or shape: C++ spells those its own way
# ("Float", "[20, 4]"), the Python checks torch's ("torch.float32", "(20, 4)").
VERBATIM_CASES = ["neg out of range", "negative neg", "pos out of range", "negative user",
                  "neg shorter", "pos shorter", "loss code", "negative loss code",
                  "optimizer code", "one bias", "missing user bias state"]


def call_bad(backend, device, case):
    good, cases = bad_cases()
    change, exc, pattern = cases[case]
    args = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v
            for k, v in {**good, **change}.items()}
    tables = MFTables(*(args[k] for k in ("P", "Q", "bu", "bi")))
    states = MFTables(*(args[k] for k in ("Ps", "Qs", "bus", "bis")))
    before = clone_all(*tables, *states)
    with pytest.raises(exc, match=pattern) as info:
        ops.kernels(backend, device).train_step_pairwise(
            tables, states, args["users"], args["pos"], args["neg"], args["loss"], 0.01,
            settings(args["opt"], lr=0.1))
    for t, b in zip(tables + states, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"
    return str(info.value)


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_bad_inputs(backend, device, case):
    call_bad(backend, device, case)


@pytest.mark.parametrize("case", VERBATIM_CASES)
def test_bad_input_messages_agree(case):
    names = ops.available_backends()
    if len(names) < 2:
        pytest.skip("needs a backend besides the reference")
    messages = {name: call_bad(name, "cpu", case) for name in names}
    # The native error also carries a C++ location on the following lines.
    first = {name: m.splitlines()[0] for name, m in messages.items()}
    assert len(set(first.values())) == 1, first


@pytest.mark.parametrize("backend, device", kernel_params(("reference", "numba"), ("cpu",),
                                                          spec_on_cpu=True))
def test_rejects_unknown_loss_name(backend, device):
    """The Python backends also take the loss by name; an unknown one is named."""
    tables = make_tables(20, 10, 4, bias=False, seed=0)
    triples = make_triples(20, 10, 6, seed=3)
    before = clone_all(*tables)
    with pytest.raises(ValueError, match="unknown pairwise loss 'warp'"):
        ops.kernels(backend, device).train_step_pairwise(
            tables, None, *triples, "warp", 0.0, settings(Optimizer.SGD, lr=0.1))
    assert_bit_identical(before, tables)
