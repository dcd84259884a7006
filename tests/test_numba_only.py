"""What only the Numba backend has: lazy compilation, its serial path for small batches,
and the errors for inputs that only it refuses (tensors off the CPU, user and item tables
that share memory). Its values are tested against the spec with every other backend in
``test_pointwise.py``, ``test_pairwise.py`` and ``test_topk.py``; its thread-count
determinism there too, next to the native kernels'."""

from __future__ import annotations

import pytest
import torch

from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs, PairwiseLoss
from fastmf.testing import (
    assert_bit_identical,
    make_batch,
    make_grad_rows,
    make_state,
    make_states,
    make_tables,
    make_triples,
)

numba = pytest.importorskip("numba")
import fastmf.ops.numba as nb  # noqa: E402  (after the skip: needs numba)
from fastmf.ops.numba import _common as nb_common  # noqa: E402
from fastmf.ops.numba import pairwise as nb_pairwise  # noqa: E402
from fastmf.ops.numba import pointwise as nb_pointwise  # noqa: E402
from fastmf.ops.numba import topk as nb_topk  # noqa: E402

KERNELS_AT_IMPORT = [
    f for module in (nb_pointwise, nb_pairwise, nb_topk) for f in vars(module).values()
    if isinstance(f, numba.core.dispatcher.Dispatcher)
]
COMPILED_AT_IMPORT = sum(len(f.signatures) for f in KERNELS_AT_IMPORT)

NUM_USERS, NUM_ITEMS, DIM = 300, 200, 12
ADAGRAD = OptimizerArgs(Optimizer.ADAGRAD, 0.05, 1e-8)


def test_import_does_not_compile():
    # Counted when this module was imported, during collection, before any test ran.
    assert KERNELS_AT_IMPORT, "no jitted kernels found"
    assert COMPILED_AT_IMPORT == 0


def run_steps(dtype, steps=2):
    """A few pointwise and pairwise steps on batches above and below the parallel cut."""
    tables = make_tables(2_000, 1_000, 16, dtype=dtype, seed=23)
    states = make_states(tables, Optimizer.ADAGRAD, seed=24)
    losses = []
    for step in range(steps):
        for batch in (8192, 300):
            users, items, targets = make_batch(2_000, 1_000, batch, dtype=dtype,
                                               seed=200 + step)
            losses.append(nb.train_step(tables, states, users, items, targets, 3.0, Loss.MSE,
                                        0.02, ADAGRAD))
            triples = make_triples(2_000, 1_000, batch, seed=300 + step)
            losses.append(nb.train_step_pairwise(tables, states, *triples, PairwiseLoss.BPR,
                                                 0.02, ADAGRAD))
    return losses, tables, states


def test_serial_path_matches_parallel_path(monkeypatch):
    """Small batches skip the thread pool; the same batch through the pool is bit-identical."""
    monkeypatch.setattr(nb_common, "PARALLEL_MIN_SAMPLES", 1 << 62)
    serial = run_steps(torch.float64)
    monkeypatch.setattr(nb_common, "PARALLEL_MIN_SAMPLES", 0)
    parallel = run_steps(torch.float64)
    assert_bit_identical(serial, parallel)


def test_rejects_other_devices():
    """The Numba kernels read CPU memory; any other device is refused by name (a meta
    tensor stands in for a GPU one), before anything is written."""
    message = "numba backend runs on CPU tensors only; use backend='native' for CUDA"
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=27)
    states = make_states(tables, Optimizer.ADAGRAD, seed=28)
    users, items, targets = make_batch(NUM_USERS, NUM_ITEMS, 16, seed=29)
    meta = torch.empty(NUM_USERS, DIM, device="meta")
    before = [t.clone() for t in tables + states]
    with pytest.raises(ValueError, match=message):
        nb.train_step(MFTables(meta, *tables[1:]), states, users, items, targets, 3.0,
                      Loss.MSE, 0.01, ADAGRAD)
    with pytest.raises(ValueError, match=message):
        nb.mf_forward(users, items, tables.user_factors.to("meta"), *tables[1:], 0.0)
    grad = make_grad_rows(16, DIM, torch.float32, seed=30)
    with pytest.raises(ValueError, match=message):
        nb.sparse_adagrad_update(tables.user_factors.to("meta"), states.user_factors, users,
                                 grad, 0.1, 1e-8, False)
    with pytest.raises(ValueError, match=message):
        nb.mf_backward(grad[:, 0].to("meta"), users, items, *tables[:2])
    triples = make_triples(NUM_USERS, NUM_ITEMS, 6, seed=3)
    with pytest.raises(ValueError, match=message):
        nb.train_step_pairwise(MFTables(tables.user_factors.to("meta"), tables.item_factors),
                               None, *triples, PairwiseLoss.BPR, 0.0,
                               OptimizerArgs(Optimizer.SGD, 0.1))
    assert_bit_identical(before, tables + states)


def test_sparse_update_rejects_other_devices():
    P = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=32).user_factors
    ids, _, _ = make_batch(NUM_USERS, NUM_ITEMS, 50, seed=33)
    grads = make_grad_rows(50, DIM, torch.float32, seed=34)
    state = make_state(P, Optimizer.ADAGRAD, seed=35)
    with pytest.raises(ValueError, match="numba backend runs on CPU tensors only"):
        nb.sparse_adagrad_update(P.to("meta"), state, ids, grads, 0.1, 1e-8, False)
    with pytest.raises(ValueError, match="numba backend runs on CPU tensors only"):
        nb.sparse_sgd_update(P.clone(), ids, grads.to("meta"), 0.1)


@pytest.mark.parametrize("family", ["pointwise", "pairwise"])
def test_rejects_shared_tables(family):
    """The fused kernels update user rows while still reading item rows, so one storage
    for both would race; the error says so."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, DIM, seed=27)
    shared = MFTables(tables.user_factors, tables.user_factors, tables.user_bias,
                      tables.user_bias)
    users, _, targets = make_batch(NUM_USERS, NUM_ITEMS, 16, seed=29)
    sgd = OptimizerArgs(Optimizer.SGD, 0.05)
    with pytest.raises(ValueError, match="share memory"):
        if family == "pointwise":
            nb.train_step(shared, None, users, users, targets, 3.0, Loss.MSE, 0.01, sgd)
        else:
            nb.train_step_pairwise(shared, None, users, users.flip(0), users,
                                   PairwiseLoss.BPR, 0.01, sgd)
