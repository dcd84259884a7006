"""Per-sample weights of the four fused MF steps (``train_step``, ``train_step_pairwise``,
``train_step_pairwise_sampled``, ``train_step_sampled``) on every backend and device,
through ``fastmf.ops.kernels(backend, device)``: against the spec (``fastmf.ops.reference``)
on fresh Zipf batches with confidence-like weights (exact zeros and large ones included),
weights of 1 bit for bit the unweighted step, against textbook PyTorch (``nn.Embedding``
and ``torch.optim`` on ``mean(w * loss)``), bad weights refused with the same message on
every backend before anything is written, and ``fastmf.fit`` handing the interactions'
weights to MF's fused steps. The CUDA kernels run the same checks in
``tests/_cuda_cases.py`` (``run_weighted``, ``check_bad_weights``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmf
from fastmf import ops
from fastmf.ops import Loss, Optimizer, OptimizerArgs, PairwiseLoss
from fastmf.ops import reference as spec
from fastmf.testing import (
    ALL_KERNELS,
    CHECKED_KERNELS,
    KERNELS,
    assert_bit_identical,
    assert_close_all,
    clone_bundle,
    idfn,
    kernel_params,
    make_batch,
    make_states,
    make_tables,
    make_triples,
    single_threaded,
    textbook_optimizer,
    to_device,
)

OPS = ("train_step", "train_step_pairwise", "train_step_pairwise_sampled",
       "train_step_sampled")
NUM_USERS, NUM_ITEMS, DIM = 300, 60, 13
MU, K = 0.25, 3


def confidences(batch, dtype, *, seed):
    """``1 + 2 log(1 + count)`` of Zipf-like counts, every seventh weight 0."""
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.zipf(1.5, size=batch), 10_000)
    w = torch.from_numpy(1 + 2 * np.log1p(counts)).to(dtype)
    w[::7] = 0
    return w


def positives_csr(id_dtype, seed=5):
    """Sorted distinct positives per user (some users none)."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(NUM_ITEMS, size=int(rng.integers(0, NUM_ITEMS // 2)),
                               replace=False)) for _ in range(NUM_USERS)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return (torch.from_numpy(indptr).to(id_dtype),
            torch.from_numpy(np.concatenate(rows)).to(id_dtype))


def inputs(op, batch, dtype, id_dtype, seed):
    """The op's batch arguments after the tables and states, before its settings."""
    if op == "train_step":
        users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype,
                                           dtype=dtype, seed=seed)
        return (users, items, targets), users
    users, pos, neg = make_triples(NUM_USERS, NUM_ITEMS, batch, seed=seed, id_dtype=id_dtype)
    if op == "train_step_pairwise":
        return (users, pos, neg), users
    return (users, pos, *positives_csr(id_dtype), K, 17, seed), users


def move(args, device):
    """The batch arguments on ``device`` (the sampled ops' counts stay ints)."""
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def call(module, op, tables, states, args, optimizer, weights, reg=0.02):
    """``op`` of ``module`` (a backend's kernels or the spec) with its usual settings."""
    fn = getattr(module, op)
    if op == "train_step":
        return fn(tables, states, *args, MU, Loss.MSE, reg, optimizer, weights)
    if op == "train_step_sampled":
        return fn(tables, states, *args, MU, Loss.BCE, reg, optimizer, weights)
    return fn(tables, states, *args, PairwiseLoss.BPR, reg, optimizer, weights)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch, dtype, id_dtype, optimizer", [
    (0, torch.float32, torch.int64, Optimizer.ADAGRAD),
    (1, torch.float64, torch.int32, Optimizer.SGD),
    (7, torch.float32, torch.int32, Optimizer.ROWWISE_ADAGRAD),
    (2048, torch.float32, torch.int64, Optimizer.ADAGRAD),
    (2048, torch.float64, torch.int64, Optimizer.ROWWISE_ADAGRAD),
], ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_matches_reference(backend, device, batch, dtype, id_dtype, optimizer, op):
    """Three weighted steps of the backend equal three of the spec: losses, tables, states."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=1)
    states = make_states(tables, optimizer, seed=2)
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    want = (clone_bundle(tables), clone_bundle(states))
    kernels = ops.kernels(backend, device)
    settings = OptimizerArgs(optimizer, 0.05, 1e-8)
    for step in range(3):
        args, users = inputs(op, batch, dtype, id_dtype, seed=10 + step)
        weights = confidences(len(users), dtype, seed=step)
        value = call(kernels, op, *got, move(args, device), settings,
                     to_device(weights, device))
        expected = single_threaded(call, spec, op, *want, args, settings, weights)
        assert value.shape == () and value.dtype == dtype
        assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", kernel_params(("numba", "native")))
def test_weights_of_one_are_the_unweighted_step(backend, device, op):
    """Weights of 1 multiply exactly: the same step as no weights, bit for bit (the spec
    reduces the unweighted loss with torch's own mean instead, so it agrees to rounding)."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=3)
    states = make_states(tables, Optimizer.ADAGRAD, seed=4)
    kernels = ops.kernels(backend, device)
    settings = OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8)
    args, users = inputs(op, 700, torch.float32, torch.int64, seed=5)
    args = move(args, device)
    runs = []
    for weights in (None, torch.ones(len(users))):
        bundles = to_device((clone_bundle(tables), clone_bundle(states)), device)
        value = call(kernels, op, *bundles, args, settings, to_device(weights, device))
        runs.append((value, bundles))
    assert_bit_identical(runs[0], runs[1])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", kernel_params(("numba", "native")))
def test_weights_of_one_report_the_unweighted_loss(backend, device, op):
    """The reported loss too, on many batches: the native BPR and BCE steps sum an
    unweighted sample's log term through a product of factors, and a weight of 1 must take
    the same path (a per-sample log1p rounds differently: with it the float64 losses of
    most of these batches differed, and the float32 loss of the BPR sampled step's batch
    40)."""
    kernels = ops.kernels(backend, device)
    settings = OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8)
    for dtype, seeds in ((torch.float64, range(10)), (torch.float32, range(45))):
        for seed in seeds:
            tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=seed, dtype=dtype)
            states = make_states(tables, Optimizer.ADAGRAD, seed=seed + 1)
            args, users = inputs(op, 300, dtype, torch.int64, seed=seed + 2)
            args = move(args, device)
            values = []
            for weights in (None, torch.ones(len(users), dtype=dtype)):
                bundles = to_device((clone_bundle(tables), clone_bundle(states)), device)
                values.append(call(kernels, op, *bundles, args, settings,
                                   to_device(weights, device)))
            assert torch.equal(values[0], values[1]), (dtype, seed)


@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAGRAD], ids=idfn)
@pytest.mark.parametrize("op", ["train_step", "train_step_pairwise"])
@pytest.mark.parametrize("backend, device", ALL_KERNELS)
def test_matches_textbook(backend, device, op, optimizer):
    """Five weighted fused steps equal five steps of textbook biased MF (``nn.Embedding``
    with sparse gradients, ``torch.optim``) on ``mean(w * loss) + reg * penalty``."""
    dtype, lr, eps, reg, init = torch.float64, 0.05, 1e-10, 0.02, 0.1
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, seed=30)
    emb = [nn.Embedding.from_pretrained(t.clone() if t.dim() == 2 else t[:, None].clone(),
                                        freeze=False, sparse=True) for t in tables]
    params = [e.weight for e in emb]
    if op == "train_step_pairwise":
        params = [params[0], params[1], params[3]]  # the user bias cancels
    torch_opt, states = textbook_optimizer(params, tables, optimizer, lr, eps, init)
    got = to_device((clone_bundle(tables), states), device)
    kernels = ops.kernels(backend, device)
    p, q, bu, bi = emb
    for step in range(5):
        args, users = inputs(op, 700, dtype, torch.int64, seed=40 + step)
        weights = confidences(len(users), dtype, seed=50 + step)
        value = call(kernels, op, *got, move(args, device),
                     OptimizerArgs(optimizer, lr, eps), to_device(weights, device))
        if op == "train_step":
            u, i, targets = args
            pu, qi, b_u, b_i = p(u), q(i), bu(u)[:, 0], bi(i)[:, 0]
            pred = (pu * qi).sum(1) + MU + b_u + b_i
            data = (weights * (pred - targets) ** 2).mean()
            penalty = pu.pow(2).sum(1) + qi.pow(2).sum(1) + b_u.pow(2) + b_i.pow(2)
        else:
            u, i, j = args
            pu, qi, qj, b_i, b_j = p(u), q(i), q(j), bi(i)[:, 0], bi(j)[:, 0]
            x = b_i - b_j + (pu * (qi - qj)).sum(1)
            data = (weights * F.softplus(-x)).mean()
            penalty = (pu.pow(2).sum(1) + qi.pow(2).sum(1) + qj.pow(2).sum(1) + b_i.pow(2)
                       + b_j.pow(2))
        total = data + reg * penalty.mean()
        torch_opt.zero_grad()
        total.backward()
        torch_opt.step()
        assert_close_all(value, total.detach(), dtype)
    assert_close_all(got[0], tuple(e.weight.reshape(t.shape) for e, t in zip(emb, tables)),
                     dtype)


def bad_weights(case, batch):
    w = confidences(batch, torch.float32, seed=0)
    if case == "nan":
        w[3] = float("nan")
    elif case == "negative":
        w[5] = -0.5
    elif case == "inf":
        w[2] = float("inf")
    elif case == "length":
        w = w[:-1]
    elif case == "2-D":
        w = w[:, None]
    elif case == "dtype":
        w = w.double()
    return w


BAD = {"nan": (ValueError, r"weights must be finite and >= 0, got nan"),
       "negative": (ValueError, r"weights must be finite and >= 0, got -0.5"),
       "inf": (ValueError, r"weights must be finite and >= 0, got inf"),
       "length": (ValueError, r"lengths differ \(users has 40, weights has 39\)"),
       "2-D": (ValueError, r"weights must be 1-D, got shape \[40, 1\]"),
       "dtype": (TypeError, r"weights has dtype")}


def bad_call(backend, device, op, case):
    """(error, tables before, tables after) of ``op`` with bad weights."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=6)
    states = make_states(tables, Optimizer.ADAGRAD, seed=7)
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    args, users = inputs(op, 40, torch.float32, torch.int64, seed=8)
    error, pattern = BAD[case]
    with pytest.raises(error, match=rf"fastmf\.{op}: {pattern}") as info:
        call(ops.kernels(backend, device), op, *got, move(args, device),
             OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8),
             to_device(bad_weights(case, len(users)), device))
    assert_bit_identical(got, to_device((tables, states), device))  # nothing written
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_bad_weights(backend, device, op, case):
    bad_call(backend, device, op, case)


@pytest.mark.parametrize("case", [c for c in BAD if c != "dtype"])
@pytest.mark.parametrize("op", OPS)
def test_bad_weights_read_the_same_on_every_backend(op, case):
    names = ops.available_backends()
    if len(names) < 2:
        pytest.skip("needs a backend besides the reference")
    messages = {name: bad_call(name, "cpu", op, case) for name in names}
    assert len(set(messages.values())) == 1, messages


# ---------------------------------------------------------------------------------------
# The public steps and fit


def test_public_steps_take_weights_as_arrays():
    """``fastmf.train_step(..., weights=)`` takes a list or array as well as a tensor."""
    users, items, targets = make_batch(20, 10, 32, seed=1)
    w = confidences(32, torch.float32, seed=2)
    runs = []
    for weights in (w, w.tolist(), w.numpy()):
        torch.manual_seed(0)
        model = fastmf.MF(20, 10, dim=4, global_mean=3.0)
        opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
        runs.append((fastmf.train_step(model, opt, users, items, targets, weights=weights),
                     model.user_factors.detach().clone()))
    assert_bit_identical(runs[0], runs[1])
    assert_bit_identical(runs[0], runs[2])
    with pytest.raises(TypeError, match="weights must be floating point"):
        fastmf.train_step(model, opt, users, items, targets, weights=torch.ones(32, dtype=int))


@pytest.fixture(scope="module")
def interactions():
    return fastmf.datasets.synthetic(num_users=120, num_items=60, num_interactions=1500, seed=3)


@pytest.mark.parametrize("loss", ["mse", "bpr", "bce"])
def test_fit_trains_mf_on_weighted_interactions(interactions, loss):
    """fit hands the weights to MF's fused steps: weights of 1 train exactly as none do,
    log-count confidences train differently (and the loss stays finite)."""

    def run(data):
        torch.manual_seed(0)
        model = fastmf.MF(data.num_users, data.num_items, dim=8)
        history = fastmf.fit(model, data, loss=loss, epochs=2, batch_size=128, lr=0.05, seed=1,
                             progress=False)
        return model, history

    counts = 1 + np.arange(len(interactions)) % 9
    plain, plain_history = run(interactions)
    ones, ones_history = run(interactions.with_weights(np.ones(len(interactions))))
    varied, varied_history = run(interactions.with_weights(1 + 2 * np.log1p(counts)))
    assert ones_history["loss"] == plain_history["loss"]
    assert_bit_identical(tuple(ones.parameters()), tuple(plain.parameters()))
    assert varied_history["loss"] != plain_history["loss"]
    assert np.isfinite(varied_history["loss"]).all()
    assert not torch.equal(varied.user_factors, plain.user_factors)
