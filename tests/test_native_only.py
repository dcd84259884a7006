"""What only the native backend has: the ``torch.ops.fastmf`` registrations.

``torch.library.opcheck`` (schema and what it mutates, fake kernel, autograd registration,
AOT dispatch) of the pointwise and pairwise ops, ``torch.compile(fullgraph=True)`` of the
fused steps, and gradcheck of ``mf_forward``'s registered autograd formula. The ops' values
are tested against the spec with every other backend in ``test_pointwise.py`` and
``test_pairwise.py``; the top-k op's registrations in ``test_topk.py``.
"""

from __future__ import annotations

import pytest
import torch

from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs, PairwiseLoss, native
from fastmf.ops import reference as spec
from fastmf.testing import (
    assert_close_all,
    clone_all,
    clone_bundle,
    kernel_params,
    make_batch,
    make_grad_rows,
    make_states,
    make_tables,
    make_triples,
    requires_native,
    single_threaded,
    to_device,
)

pytestmark = requires_native

NATIVE = kernel_params(("native",))


def flat(tables, states):
    """The eight table and state arguments of the flat op schemas."""
    return (*tables, *(states if states is not None else (None,) * 4))


def opcheck_cases(device):
    tables = to_device(make_tables(40, 30, 8, seed=1), device)
    P, Q, bu, bi = tables
    adagrad = make_states(tables, Optimizer.ADAGRAD, seed=2)
    rowwise = make_states(tables, Optimizer.ROWWISE_ADAGRAD, seed=3)
    users, items, targets = make_batch(40, 30, 64, seed=4, device=device)
    grad = make_grad_rows(64, 8, torch.float32, seed=5, device=device)
    req = [t.clone().requires_grad_() for t in tables]
    triples = make_triples(40, 30, 64, seed=6, device=device)
    ops = torch.ops.fastmf
    return {
        "mf_forward": (ops.mf_forward.default, (users, items, *req, 3.0)),
        "mf_forward_no_bias": (ops.mf_forward.default, (users, items, P, Q, None, None, 3.0)),
        "mf_backward": (ops.mf_backward.default, (targets, users, items, P, Q)),
        "sparse_adagrad_update": (ops.sparse_adagrad_update.default,
                                  (P.clone(), adagrad[0].clone(), users, grad, 0.1, 1e-8,
                                   False)),
        "sparse_adagrad_update_rowwise": (ops.sparse_adagrad_update.default,
                                          (P.clone(), rowwise[0].clone(), users, grad, 0.1,
                                           1e-8, True)),
        "sparse_sgd_update": (ops.sparse_sgd_update.default, (Q.clone(), items, grad, 0.1)),
        "train_step_adagrad": (ops.train_step.default,
                               (*flat(clone_bundle(tables), clone_bundle(adagrad)), users,
                                items, targets, 3.0, int(Loss.MSE), 0.01,
                                int(Optimizer.ADAGRAD), 0.05, 1e-8)),
        "train_step_sgd_no_bias": (ops.train_step.default,
                                   (*flat(MFTables(*clone_all(P, Q)), None), users, items,
                                    targets, 3.0, int(Loss.HUBER), 0.0, int(Optimizer.SGD),
                                    0.05, 1e-8)),
        "pairwise_adagrad_bias": (ops.train_step_pairwise.default,
                                  (*flat(clone_bundle(tables), clone_bundle(adagrad)),
                                   *triples, int(PairwiseLoss.BPR), 0.01,
                                   int(Optimizer.ADAGRAD), 0.05, 1e-8)),
        "pairwise_rowwise_int32": (ops.train_step_pairwise.default,
                                   (*flat(clone_bundle(tables), clone_bundle(rowwise)),
                                    *(t.int() for t in triples), int(PairwiseLoss.BPR), 0.0,
                                    int(Optimizer.ROWWISE_ADAGRAD), 0.05, 1e-8)),
        "pairwise_sgd_no_bias": (ops.train_step_pairwise.default,
                                 (*flat(MFTables(*clone_all(P, Q)), None), *triples,
                                  int(PairwiseLoss.BPR), 0.01, int(Optimizer.SGD), 0.05,
                                  0.0)),
    }


@pytest.mark.parametrize("case", list(opcheck_cases("cpu")))
@pytest.mark.parametrize("backend, device", NATIVE)
def test_opcheck(backend, device, case):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def test_train_step_under_compile():
    """fullgraph torch.compile: the fake kernel traces, and the in-place updates survive
    functionalization."""
    tables = make_tables(300, 200, 8, seed=0)
    states = make_states(tables, Optimizer.ADAGRAD, seed=1)
    users, items, targets = make_batch(300, 200, 64, seed=2)
    got = (clone_bundle(tables), clone_bundle(states))
    want = (clone_bundle(tables), clone_bundle(states))
    settings = OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8)

    def step(tables, states, users, items, targets):
        return native.train_step(tables, states, users, items, targets, 3.0, Loss.MSE, 0.01,
                                 settings)

    value = torch.compile(step, fullgraph=True)(*got, users, items, targets)
    expected = single_threaded(spec.train_step, *want, users, items, targets, 3.0, Loss.MSE,
                               0.01, settings)
    assert_close_all(value, expected, torch.float32)
    assert_close_all(got, want, torch.float32)
    assert not torch.equal(got[0].user_factors, tables.user_factors)


def test_train_step_pairwise_under_compile():
    """fullgraph torch.compile of the fused BPR step."""
    tables = make_tables(40, 30, 8, seed=23)
    states = make_states(tables, Optimizer.ADAGRAD, seed=24)
    users, pos, neg = make_triples(40, 30, 64, seed=25)
    got = (clone_bundle(tables), clone_bundle(states))
    want = (clone_bundle(tables), clone_bundle(states))
    settings = OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8)

    def step(tables, states, users, pos, neg):
        return native.train_step_pairwise(tables, states, users, pos, neg, PairwiseLoss.BPR,
                                          0.01, settings)

    value = torch.compile(step, fullgraph=True)(*got, users, pos, neg)
    expected = single_threaded(spec.train_step_pairwise, *want, users, pos, neg,
                               PairwiseLoss.BPR, 0.01, settings)
    assert_close_all(value, expected, torch.float32)
    assert_close_all(got, want, torch.float32)
    assert not torch.equal(got[0].item_factors, tables.item_factors)


@pytest.mark.parametrize("bias", [True, False])
def test_mf_forward_gradcheck(bias):
    P, Q, bu, bi = make_tables(12, 9, 4, dtype=torch.float64, bias=bias, seed=0)
    users, items, _ = make_batch(12, 9, 16, id_dtype=torch.int32, seed=1)
    inputs = [t.clone().requires_grad_() for t in (P, Q, bu, bi) if t is not None]

    def fn(*tables):
        tables = tables + (None, None) if not bias else tables
        return native.mf_forward(users, items, *tables, 3.0)

    assert torch.autograd.gradcheck(fn, inputs)
