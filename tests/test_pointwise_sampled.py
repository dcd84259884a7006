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
from test_pairwise_sampled import (
    DEVICE_RECORDED,
    NUM_ITEMS,
    NUM_USERS,
    ORDER_SHAPES,
    ROW_KINDS,
    STEPS_SHAPES,
    bad_cases,
    call_bad,
    check_fit_epoch_call,
    check_fit_uses_sampled_step,
    check_steps_draw_as_the_step,
    check_steps_in_turn,
    check_steps_thread_counts,
    check_steps_through_order,
    check_thread_counts,
    make_batch,
    make_csr,
    messages_agree,
    settings,
    steps_extra_cases,
)

from fastmf import ops
from fastmf.ops import Loss, Optimizer
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
    clone_bundle,
    idfn,
    kernel_params,
    make_states,
    make_tables,
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


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_bit_identical_across_thread_counts(backend, device, dtype):
    check_thread_counts(backend, device, dtype, op=OP_NAME, loss=Loss.BCE,
                        optimizer=Optimizer.ROWWISE_ADAGRAD)


# ---------------------------------------------------------------------------------------
# Bad inputs: the cases of the pairwise sampled op (same checks), with this op's loss codes,
# and tables it writes that the pairwise op does not (user_bias)


def own_cases(tables, states, prefix):
    return {
        "loss code": (dict(loss=7), ValueError, "unknown loss code 7"),
        "tied biases": (dict(bi=lambda args: args["bu"][:10]), ValueError,
                        re.escape(prefix + "user_bias and item_bias share memory")),
    }


def cases_of():
    return bad_cases(OP_NAME, Loss.BCE, own_cases)


BAD_CASES = list(cases_of()[1])


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_bad_inputs(backend, device, case):
    call_bad(backend, device, case, cases_of, OP_NAME)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if "dtype" not in c and "2-D" not in c])
def test_bad_input_messages_agree(case):
    messages_agree(case, cases_of, OP_NAME)


@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_fit_mf_bce_uses_the_sampled_step(backend, device, monkeypatch):
    """Fused or not, the same rows in the same order through the same kernels: bit for bit
    (fit runs each epoch as one train_steps_sampled call)."""
    check_fit_uses_sampled_step(backend, monkeypatch, "bce", STEPS_OP, exact=True)


# ---------------------------------------------------------------------------------------
# train_steps_sampled: the steps of consecutive slices, in one call

STEPS_OP = "train_steps_sampled"


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n, batch_size, k", STEPS_SHAPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_steps_are_the_steps_in_turn(backend, device, id_dtype, n, batch_size, k, weighted):
    check_steps_in_turn(backend, device, id_dtype, n, batch_size, k, weighted, STEPS_OP)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("m, n, batch_size, k", ORDER_SHAPES)
@pytest.mark.parametrize("order_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_steps_through_an_order(backend, device, id_dtype, order_dtype, m, n, batch_size, k,
                                weighted):
    check_steps_through_order(backend, device, id_dtype, order_dtype, m, n, batch_size, k,
                              weighted, STEPS_OP)


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", kernel_params())
def test_steps_draw_as_the_step_on_any_rows(backend, device, kind, id_dtype):
    check_steps_draw_as_the_step(backend, device, kind, id_dtype, STEPS_OP)


@pytest.mark.parametrize("backend, device", THREADED_BACKENDS)
def test_steps_bit_identical_across_thread_counts(backend, device):
    check_steps_thread_counts(backend, device, STEPS_OP)


def steps_cases_of():
    def extra(tables, states, prefix):
        return {**own_cases(tables, states, prefix),
                **steps_extra_cases(tables, states, prefix)}
    return bad_cases(STEPS_OP, Loss.BCE, extra)


STEPS_BAD_CASES = list(steps_cases_of()[1])


@pytest.mark.parametrize("case", STEPS_BAD_CASES)
@pytest.mark.parametrize("backend, device", CHECKED_KERNELS)
def test_steps_bad_inputs(backend, device, case):
    if device == "cuda" and case in DEVICE_RECORDED:
        pytest.skip("recorded on the device step by step")
    call_bad(backend, device, case, steps_cases_of, STEPS_OP)


@pytest.mark.parametrize("case", [c for c in STEPS_BAD_CASES
                                  if "dtype" not in c and "2-D" not in c])
def test_steps_bad_input_messages_agree(case):
    messages_agree(case, steps_cases_of, STEPS_OP)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend, device", ALL_CPU)
def test_fit_mf_bce_epoch_call_equals_the_batches(backend, device, weighted):
    check_fit_epoch_call(backend, "bce", weighted)
