"""``train_step_sampled``: the fused pointwise step (bce for implicit feedback) drawing its
own uniform negatives, on every backend and device, against the spec
(``fastmf.ops.reference``).

The negatives are the counter-hash draws of ``fastmf.ops.reference.sampling``
(``tests/test_pairwise_sampled.py`` tests the draws themselves); given them, the step must
be ``train_step`` on the positives labelled 1 followed by the negatives labelled 0 (same
backend, bit for bit). Also: the results do not depend on the thread count, bad inputs
raise the same errors everywhere and write nothing, and ``fastmf.fit`` runs the op for MF
with bce, with the same result as the unfused path.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_pairwise_sampled import NUM_ITEMS, NUM_USERS, make_batch, make_csr, settings

import fastmf
from fastmf import ops
from fastmf.data import Interactions
from fastmf.ops import Loss, MFTables, Optimizer
from fastmf.ops import reference as spec
from fastmf.ops.codes import STEP_OPTIMIZERS
from fastmf.ops.reference.sampling import sample_negatives
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

DIM = 11
OP_NAME = "train_step_sampled"
THREADED_BACKENDS = kernel_params(("numba", "native"), ("cpu",))
ALL_CPU = kernel_params(devices=("cpu",), spec_on_cpu=True)


def run_sampled(backend, device, tables, states, users, pos, csr, k, seed, step, mu, loss,
                reg, optimizer):
    got = to_device((clone_bundle(tables), clone_bundle(states)), device)
    value = ops.kernels(backend, device, kernel=OP_NAME).train_step_sampled(
        *got, *to_device((users, pos, *csr), device), k, seed, step, mu, loss, reg, optimizer)
    return value, got


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("optimizer", list(STEP_OPTIMIZERS), ids=idfn)
@pytest.mark.parametrize("batch", [0, 1, 7, 2048])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", KERNELS)
def test_matches_reference(backend, device, id_dtype, dtype, batch, optimizer, bias):
    seed = batch + 10 * int(optimizer) + 1
    k = 1 + batch % 3
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, dtype=dtype, bias=bias, seed=seed)
    states = make_states(tables, optimizer, seed=seed + 1)
    csr = make_csr(NUM_USERS, NUM_ITEMS, seed=seed + 2, id_dtype=id_dtype)
    users, pos = make_batch(batch, seed=seed + 3, id_dtype=id_dtype)
    mu, reg = 0.25, 0.03
    value, got = run_sampled(backend, device, tables, states, users, pos, csr, k, 7, 5, mu,
                             Loss.BCE, reg, settings(optimizer))
    want = (clone_bundle(tables), clone_bundle(states))
    expected = single_threaded(spec.train_step_sampled, *want, users, pos, *csr, k, 7, 5, mu,
                               Loss.BCE, reg, settings(optimizer))
    assert value.shape == () and value.dtype == dtype and value.device.type == device
    assert_close_all(value, expected, dtype)
    assert_close_all(got, want, dtype)
    if batch == 0:
        assert float(value) == 0.0
        assert_bit_identical(to_device(got, "cpu"), (tables, states))
    else:
        assert not torch.equal(got[0].item_factors.cpu(), tables.item_factors)
        assert not torch.equal(got[0].user_factors.cpu(), tables.user_factors)


@pytest.mark.parametrize("loss", [Loss.BCE, Loss.MSE, Loss.HUBER], ids=idfn)
@pytest.mark.parametrize("num_users, num_items", [(NUM_USERS, NUM_ITEMS), (200, 3000)])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_is_train_step_on_the_drawn_negatives(backend, device, dtype, num_users, num_items,
                                              loss):
    """The op is its backend's train_step on the positives (label 1) then the spec's
    negatives (label 0), bit for bit: the same negatives, rows in the same order."""
    tables = make_tables(num_users, num_items, DIM, dtype=dtype, seed=31)
    states = make_states(tables, Optimizer.ADAGRAD, seed=32)
    csr = make_csr(num_users, num_items, seed=33)
    rng = np.random.default_rng(34)
    users = zipf_ids(num_users, 999, generator=rng)
    pos = zipf_ids(num_items, 999, generator=rng)
    k = 3
    value, got = run_sampled(backend, device, tables, states, users, pos, csr, k, 2**40 + 3,
                             19, 0.5, loss, 0.01, settings(Optimizer.ADAGRAD))
    neg = sample_negatives(users, *csr, num_items, k, 2**40 + 3, 19)
    labels = torch.cat([torch.ones(999), torch.zeros(999 * k)]).to(dtype)
    want = to_device((clone_bundle(tables), clone_bundle(states)), device)
    expected = ops.kernels(backend, device).train_step(
        *want, *to_device((torch.cat([users, users.repeat_interleave(k)]),
                           torch.cat([pos, neg.reshape(-1)]), labels), device),
        0.5, loss, 0.01, settings(Optimizer.ADAGRAD))
    assert_bit_identical((value, got), (expected, want))


def run_steps(backend, device, dtype):
    tables = make_tables(5_000, 2_000, 64, dtype=dtype, seed=41)
    states = make_states(tables, Optimizer.ROWWISE_ADAGRAD, seed=42)
    tables, states = to_device((tables, states), device)
    csr = to_device(make_csr(5_000, 2_000, seed=43, max_degree=300), device)
    kernels = ops.kernels(backend, device, kernel=OP_NAME)
    losses = []
    rng = np.random.default_rng(44)
    for step in range(3):
        users = zipf_ids(5_000, 4096, generator=rng, device=device)
        pos = zipf_ids(2_000, 4096, generator=rng, device=device)
        losses.append(kernels.train_step_sampled(
            tables, states, users, pos, *csr, 3, 99, step, 0.0, Loss.BCE, 0.01,
            settings(Optimizer.ROWWISE_ADAGRAD)))
    return losses, tables, states


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_bit_identical_across_thread_counts(backend, device, dtype):
    with num_threads(backend, 2):
        two = run_steps(backend, device, dtype)
    with num_threads(backend, 1):
        one = run_steps(backend, device, dtype)
    assert_bit_identical(one, two)
    assert not torch.equal(one[1].item_factors.cpu(),
                           make_tables(5_000, 2_000, 64, dtype=dtype, seed=41).item_factors)


# ---------------------------------------------------------------------------------------
# Bad inputs: the same exception and message on every backend, nothing written

OP = f"fastmf.{OP_NAME}: "


def bad_cases():
    tables = make_tables(20, 10, 4, seed=3)
    states = make_states(tables, Optimizer.ADAGRAD, seed=4)
    indptr, indices = make_csr(20, 10, seed=5, max_degree=6)
    users = torch.tensor([3, 1, 4, 1, 5, 9])
    pos = torch.tensor([2, 7, 1, 8, 2, 8])

    def with_value(ids, at, value):
        ids = ids.clone()
        ids[at] = value
        return ids

    # User 5's row made to hold all ten items.
    full_indptr = indptr.clone()
    full_indptr[6:] += 10 - int(indptr[6] - indptr[5])
    full_indices = torch.cat([indices[:int(indptr[5])], torch.arange(10),
                              indices[int(indptr[6]):]])
    good = dict(P=tables[0], Q=tables[1], bu=tables[2], bi=tables[3], Ps=states[0],
                Qs=states[1], bus=states[2], bis=states[3], users=users, pos=pos,
                indptr=indptr, indices=indices, k=3, loss=Loss.BCE, opt=Optimizer.ADAGRAD)
    n = int(indptr[-1])
    cases = {
        "user out of range": (dict(users=with_value(users, 2, 20)), IndexError,
                              re.escape(OP + "users id 20 out of range [0, 20)")),
        "pos out of range": (dict(pos=with_value(pos, 0, -1)), IndexError,
                             re.escape(OP + "items id -1 out of range [0, 10)")),
        "no negatives": (dict(k=0), ValueError,
                         re.escape(OP + "num_negatives must be >= 1, got 0")),
        "indptr length": (dict(indptr=indptr[:-1]), ValueError,
                          re.escape(OP + "pos_indptr has 20 entries, expected "
                                    "num_users + 1 = 21")),
        "indptr dtype": (dict(indptr=indptr.float()), TypeError,
                         "pos_indptr must be int32 or int64"),
        "indptr past the end": (dict(indptr=with_value(indptr, 5, n + 3)), ValueError,
                                re.escape(OP + f"pos_indptr gives user 4 the row "
                                          f"[{int(indptr[4])}, {n + 3}), not an ordered "
                                          f"range within [0, {n}] (len(pos_indices))")),
        "user with every item": (dict(indptr=full_indptr, indices=full_indices), ValueError,
                                 re.escape(OP + "user 5 has 10 positives of 10 items; no "
                                           "item is left to sample as a negative")),
        "lengths": (dict(pos=pos[:5]), ValueError, "lengths differ"),
        "optimizer code": (dict(opt=3), ValueError, "unknown optimizer code 3"),
        "loss code": (dict(loss=7), ValueError, "unknown loss code 7"),
        "tied tables": (dict(bi=tables[2][:10]), ValueError,
                        re.escape(OP + "user_bias and item_bias share memory")),
    }
    return good, cases


BAD_CASES = list(bad_cases()[1])


def call_bad(backend, device, case):
    good, cases = bad_cases()
    change, exc, pattern = cases[case]
    args = {key: to_device(v, device) if isinstance(v, torch.Tensor) else v
            for key, v in {**good, **change}.items()}
    tables = MFTables(*(args[key] for key in ("P", "Q", "bu", "bi")))
    states = MFTables(*(args[key] for key in ("Ps", "Qs", "bus", "bis")))
    before = clone_all(*tables, *states)
    kernels = ops.kernels(backend, device, kernel=OP_NAME)
    with pytest.raises(exc, match=pattern) as info:
        kernels.train_step_sampled(
            tables, states, args["users"], args["pos"], args["indptr"], args["indices"],
            args["k"], 5, 6, 0.0, args["loss"], 0.01, settings(args["opt"], lr=0.1))
    for t, b in zip(tables + states, before):
        assert t is None or torch.equal(t, b), "a failed call must not write"
    return str(info.value)


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_bad_inputs(backend, device, case):
    call_bad(backend, device, case)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if "dtype" not in c])
def test_bad_input_messages_agree(case):
    names = ops.available_backends()
    if len(names) < 2:
        pytest.skip("needs a backend besides the reference")
    first = {name: call_bad(name, "cpu", case).splitlines()[0] for name in names}
    assert len(set(first.values())) == 1, first


# ---------------------------------------------------------------------------------------
# fastmf.fit: MF with bce runs the sampled op and matches the unfused path


@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_fit_mf_bce_uses_the_sampled_step(backend, device, monkeypatch):
    rng = np.random.default_rng(9)
    train = Interactions(zipf_ids(60, 1500, generator=rng).numpy(),
                         zipf_ids(40, 1500, generator=rng).numpy(), user_map=60, item_map=40)

    def fit(sampled: bool):
        torch.manual_seed(0)
        model = fastmf.MF(60, 40, dim=8, backend=backend)
        if not sampled:
            monkeypatch.setattr(model, "draws_negatives", lambda loss: False)
        history = fastmf.fit(model, train, loss="bce", epochs=2, batch_size=256, seed=3,
                             num_negatives=3, progress=False)
        return model, history

    calls = []
    original = ops.kernels

    def spy(*args, **kwargs):
        module = original(*args, **kwargs)
        calls.append(kwargs.get("kernel"))
        return module

    monkeypatch.setattr(ops, "kernels", spy)
    fused, fused_history = fit(True)
    assert OP_NAME in calls
    calls.clear()
    unfused, unfused_history = fit(False)
    assert OP_NAME not in calls
    # The same rows in the same order through the same kernels: bit for bit.
    assert fused_history["loss"] == unfused_history["loss"]
    assert_bit_identical(tuple(fused.tables()), tuple(unfused.tables()))
    assert fused_history["loss"][1] < fused_history["loss"][0]
