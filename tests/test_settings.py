"""Bad settings and tied tables never reach the tables: NaN/inf/negative lr, eps and reg,
(B, 1) targets and tables that share memory are refused with a clear error before
anything is written, on every backend and through every entry point."""

from __future__ import annotations

import math

import pytest
import torch

import fastmf
from fastmf.ops import MFTables, Optimizer, OptimizerArgs
from fastmf.testing import BACKENDS, make_batch

BAD_VALUES = [float("nan"), float("inf"), -float("inf"), -0.5]


def _model(backend, num_users=60, num_items=40, seed=0):
    torch.manual_seed(seed)
    return fastmf.MF(num_users, num_items, dim=8, backend=backend)


def _snapshot(model, optimizer):
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _unchanged(before, model, optimizer):
    return all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, optimizer)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", ["lr", "eps", "reg"])
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("pairwise", [False, True])
def test_bad_settings_refused_before_any_write(backend, setting, value, pairwise):
    model = _model(backend)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    users, items, targets = make_batch(60, 40, 256, seed=1)
    reg = 0.01
    if setting == "reg":
        reg = value
    else:
        opt.param_groups[0][setting] = value
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=f"{setting} must be finite and >= 0, got"):
        if pairwise:
            fastmf.train_step_pairwise(model, opt, users, items, items.flip(0), reg=reg)
        else:
            fastmf.train_step(model, opt, users, items, targets, reg=reg)
    assert _unchanged(before, model, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_unfused_optimizer_step_refuses_bad_lr(backend, optimizer):
    model = fastmf.MF(60, 40, dim=8, backend=backend, sparse=True)
    cls = fastmf.optim.SparseSGD if optimizer == "sgd" else fastmf.optim.SparseAdagrad
    opt = cls(model.parameters(), lr=0.05, backend=backend)
    users, items, targets = make_batch(60, 40, 128, seed=2)
    torch.nn.functional.mse_loss(model(users, items), targets).backward()
    opt.param_groups[0]["lr"] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="lr must be finite and >= 0, got nan"):
        opt.step()
    assert _unchanged(before, model, opt)


@pytest.mark.parametrize("cls", [fastmf.optim.SparseSGD, fastmf.optim.SparseAdagrad])
def test_optimizer_constructor_refuses_bad_lr(cls):
    model = fastmf.MF(5, 5, dim=2)
    for value in BAD_VALUES:
        with pytest.raises(ValueError, match="lr must be finite"):
            cls(model.parameters(), lr=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_refuse_bad_settings_directly(backend):
    """The backend functions themselves (below fastmf.train_step) refuse them too."""
    kernels = fastmf.ops.kernels(backend, torch.device("cpu"))
    model = _model(backend)
    users, items, targets = make_batch(60, 40, 64, seed=3)
    tables = MFTables(*(t.detach() for t in model.tables()))
    before = [t.clone() for t in tables]
    for lr in (math.nan, math.inf):
        with pytest.raises(ValueError, match="lr must be finite"):
            kernels.train_step(tables, None, users, items, targets, 0.0, 0, 0.0,
                               OptimizerArgs(Optimizer.SGD, lr))
        with pytest.raises(ValueError, match="lr must be finite"):
            kernels.sparse_sgd_update(tables.user_factors, users,
                                      torch.ones(64, 8) * 0.25, lr)
    assert all(torch.equal(a, b) for a, b in zip(before, tables))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairwise", [False, True])
def test_tied_tables_refused(backend, pairwise):
    model = _model(backend, num_users=50, num_items=50)
    model.item_factors = model.user_factors
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    users, items, targets = make_batch(50, 50, 128, seed=4)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="user_factors and item_factors share memory"):
        if pairwise:
            fastmf.train_step_pairwise(model, opt, users, items, items.flip(0))
        else:
            fastmf.train_step(model, opt, users, items, targets)
    assert _unchanged(before, model, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_views_refused_by_the_kernels(backend):
    """Two views of one buffer that overlap are refused; disjoint views are fine."""
    kernels = fastmf.ops.kernels(backend, torch.device("cpu"))
    buffer = torch.rand(90, 8) * 0.2 - 0.1
    users, items, targets = make_batch(50, 40, 64, seed=5)
    overlapping = MFTables(buffer[:50], buffer[40:80])
    with pytest.raises(ValueError, match="share memory"):
        kernels.train_step(overlapping, None, users, items, targets, 0.0, "mse", 0.0,
                           OptimizerArgs(Optimizer.SGD, 0.1))
    disjoint = MFTables(buffer[:50], buffer[50:90])
    reference = MFTables(buffer[:50].clone(), buffer[50:90].clone())
    kernels.train_step(disjoint, None, users, items, targets, 0.0, "mse", 0.0,
                       OptimizerArgs(Optimizer.SGD, 0.1))
    fastmf.ops.reference.train_step(reference, None, users, items, targets, 0.0, "mse", 0.0,
                                    OptimizerArgs(Optimizer.SGD, 0.1))
    torch.testing.assert_close(disjoint.user_factors, reference.user_factors)
    torch.testing.assert_close(disjoint.item_factors, reference.item_factors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_targets_refused(backend):
    model = _model(backend)
    opt = fastmf.optim.SparseSGD(model.parameters(), lr=0.05)
    users, items, targets = make_batch(60, 40, 32, seed=6)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"targets must be 1-D, got shape \[32, 1\]"):
        fastmf.train_step(model, opt, users, items, targets[:, None])
    assert _unchanged(before, model, opt)
