"""What the CUDA kernels must do, as checks shared by two targets:

- ``cuda``: the real kernels on a GPU (tests/test_cuda_ops.py);
- ``emulated``: the same kernel source run on the CPU through the stand-in runtime of
  tests/cuda_emulation (tests/test_cuda_emulated.py), so a machine without a GPU still
  exercises their logic.

Every expectation is computed by fastmf.ops.reference on CPU tensors; losses and
optimizers are named by fastmf.ops.codes (the kernels read the same codes from
csrc/codes.h), never by bare numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs, PairwiseLoss, reference
from fastmf.ops.checks import row_state_shapes
from fastmf.ops.codes import STEP_OPTIMIZERS, Pooling, WeightDecay, names
from fastmf.testing import (
    clone_all,
    make_batch,
    make_tables,
    make_topk_candidates,
    make_topk_exclude,
    make_topk_items,
    make_topk_queries,
    tolerance,
    zipf_ids,
)

LOSS_NAMES = names(Loss)
# The optimizers of the fused MF steps and sparse updates (the Adams belong to the
# embedding_bag family only: ROW_OPT_NAMES).
OPT_NAMES = tuple(m.name.lower() for m in STEP_OPTIMIZERS)
ROW_OPT_NAMES = tuple(m.name.lower() for m in Optimizer)
LR, EPS = 0.05, 1e-8
MSE, BPR = int(Loss.MSE), int(PairwiseLoss.BPR)
SGD, ADAGRAD = int(Optimizer.SGD), int(Optimizer.ADAGRAD)


@dataclass
class Target:
    name: str
    device: str
    ops: object  # the torch.ops namespace holding the kernels
    check_errors: Callable[[], None]

    def to(self, *tensors):
        return tuple(None if t is None else t.to(self.device) for t in tensors)


def cpu(*tensors):
    return tuple(None if t is None else t.detach().cpu() for t in tensors)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.cpu(), expected, **tolerance(dtype))


def assert_close_to_exact(name, got, ref, exact, dtype) -> None:
    """A float32 result that sums long runs of a row's occurrences, held to the float64
    reference `exact` (the same rounded inputs): within the usual tolerance plus four times
    the float32 reference `ref`'s own largest error in that row.

    The float32 reference sums a row's occurrences one after another; over the ~50,000 to
    150,000 occurrences of a hot row its rounding walks ~1e-4 of the terms' scale away from
    the exact sum, so a kernel that sums in any other order (GPU tiles, CPU chunks) can be
    closer to the exact value than the reference is and still fail a plain comparison with
    it. The float32 reference's error, measured row by row on these inputs, is the spread
    any summation order has; a dropped or doubled occurrence moves a sum by a whole term."""
    tol = tolerance(dtype)
    exact = exact.double()
    slack = (ref.double() - exact).abs()
    if slack.dim() > 1:
        slack = slack.amax(dim=tuple(range(1, slack.dim())), keepdim=True)
    diff = (got.detach().cpu().double() - exact).abs()
    allowed = tol["atol"] + tol["rtol"] * exact.abs() + 4 * slack
    bad = diff > allowed
    if bad.any():
        worst = int((diff - allowed).argmax())
        index = tuple(int(i) for i in np.unravel_index(worst, diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements are further from the exact "
            f"result than allowed; worst at {index}: got {float(got.flatten()[worst])}, exact "
            f"{float(exact.flatten()[worst])}, float32 reference {float(ref.flatten()[worst])}"
            f", allowed {float(allowed.flatten()[worst]):.3g}")


def assert_loss(got, expected, dtype) -> None:
    """A step's loss: a 0-d tensor of the tables' dtype, close to the reference's."""
    assert got.shape == () and got.dtype == dtype
    assert_close(got, expected, dtype)


def assert_tables_close(target: Target, got, expected, dtype) -> None:
    """No error recorded, and every table and state close to the reference's."""
    target.check_errors()
    for g, e in zip(got, expected, strict=False):
        if e is not None:
            assert_close(g, e, dtype)


def clear_errors(target: Target) -> None:
    try:
        target.check_errors()
    except (IndexError, ValueError):
        pass


def loss_code(name: str) -> int:
    return int(Loss[name.upper()])


def optimizer_code(name: str) -> int:
    return int(Optimizer[name.upper()])


def reference_bundles(tensors, optimizer: str):
    """The reference's (tables, states, OptimizerArgs) for the flat list of the four tables
    and their four states (the op schemas' order)."""
    tables = MFTables(*tensors[:4])
    states = None if optimizer == "sgd" else MFTables(*tensors[4:8])
    return tables, states, OptimizerArgs(Optimizer[optimizer.upper()], LR, EPS)


def make_states(optimizer: str, p, q, bu, bi):
    """Optimizer states that have seen earlier steps: uniform in [0.1, 1.1), never zero.

    From all-zero states Adagrad's first step is lr * g / sqrt(g^2 + eps): with eps = 1e-8
    it turns a rounding error d in a gradient sum that cancels to near zero into a weight
    error of up to lr * d / sqrt(eps) = 500 d. Any other summation order (a GPU's tree
    against the reference's sequential sum) then differs by ~1e-4 on a few elements of a
    4,096-sample batch, a property of the inputs, not of the kernel. A state >= 0.1 bounds
    that gain by lr / sqrt(0.1) = 0.16. (The zero-state first step keeps its cases on every
    backend in the op families' own suites, with small batches.)"""
    if optimizer == "sgd":
        return None, None, None, None
    gen = torch.Generator().manual_seed(1234)

    def start(rows, like):
        shape = (rows,) if rows is not None else like.shape
        return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1).to(
            device=like.device, dtype=like.dtype)

    full = lambda t: None if t is None else start(None, t)  # noqa: E731
    if optimizer == "adagrad":
        return full(p), full(q), full(bu), full(bi)
    return start(p.shape[0], p), start(q.shape[0], q), full(bu), full(bi)


# ----------------------------------------------------------------------------------------
# mf_forward / mf_backward


def check_forward(target, batch, user_dtype, item_dtype, dtype, bias, dim=16, seed=0):
    p, q, bu, bi = make_tables(60, 40, dim, dtype=dtype, bias=bias, seed=seed)
    users, items, _ = make_batch(60, 40, batch, dtype=dtype, seed=seed)
    users, items = users.to(user_dtype), items.to(item_dtype)
    expected = reference.mf_forward(users, items, p, q, bu, bi, 3.5)
    got = target.ops.mf_forward(*target.to(users, items, p, q, bu, bi), 3.5)
    assert got.dtype == dtype and got.shape == (batch,)
    assert_close(got, expected, dtype)


def check_backward(target, batch, user_dtype, item_dtype, dtype, dim=16, seed=0):
    p, q, _, _ = make_tables(60, 40, dim, dtype=dtype, bias=False, seed=seed)
    users, items, _ = make_batch(60, 40, batch, dtype=dtype, seed=seed)
    users, items = users.to(user_dtype), items.to(item_dtype)
    grad = torch.randn(batch, dtype=dtype)
    exp_p, exp_q = reference.mf_backward(grad, users, items, p, q)
    got_p, got_q = target.ops.mf_backward(*target.to(grad, users, items, p, q))
    assert_close(got_p, exp_p, dtype)
    assert_close(got_q, exp_q, dtype)
    # The same rows summed into the tables' gradients (60 users, 40 items: rows repeat).
    exp_p, exp_q = reference.mf_backward_dense(grad, users, items, p, q)
    got_p, got_q = target.ops.mf_backward_dense(*target.to(grad, users, items, p, q))
    assert got_p.shape == p.shape and got_q.shape == q.shape
    assert_close(got_p, exp_p, dtype)
    assert_close(got_q, exp_q, dtype)


# ----------------------------------------------------------------------------------------
# sparse_adagrad_update / sparse_sgd_update


def check_sparse_update(target, kind, batch, id_dtype, dtype, dim, num_rows=50, seed=0,
                        exponent=1.0):
    """kind: sgd, adagrad, rowwise_adagrad; dim 0 means a 1-D (bias) table."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_rows,) if dim == 0 else (num_rows, dim)
    weight = (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
    ids = zipf_ids(num_rows, batch, exponent=exponent, dtype=id_dtype,
                   generator=np.random.default_rng(seed))
    grad_rows = torch.randn((batch,) + shape[1:], generator=gen, dtype=torch.float64).to(dtype)
    # float32 tables: the reference also runs in float64 on the same (rounded) inputs, the
    # exact target (assert_close_to_exact).
    wide = torch.float64 if dtype == torch.float32 else None
    expected_w = weight.clone()
    exact_w = None if wide is None else weight.to(wide)
    got_w = weight.clone().to(target.device)
    if kind == "sgd":
        reference.sparse_sgd_update(expected_w, ids, grad_rows, LR)
        if wide is not None:
            reference.sparse_sgd_update(exact_w, ids, grad_rows.to(wide), LR)
        target.ops.sparse_sgd_update(got_w, *target.to(ids, grad_rows), LR)
        pairs = [("weight", got_w, expected_w, exact_w)]
    else:
        rowwise = kind == "rowwise_adagrad"
        state = weight.new_zeros(num_rows) if rowwise and dim else torch.zeros_like(weight)
        state += 0.01  # a state that has seen earlier steps
        expected_s = state.clone()
        got_s = state.clone().to(target.device)
        reference.sparse_adagrad_update(expected_w, expected_s, ids, grad_rows, LR, EPS, rowwise)
        exact_s = None
        if wide is not None:
            exact_s = state.to(wide)
            reference.sparse_adagrad_update(exact_w, exact_s, ids, grad_rows.to(wide), LR, EPS,
                                            rowwise)
        target.ops.sparse_adagrad_update(got_w, got_s, *target.to(ids, grad_rows), LR, EPS,
                                         rowwise)
        pairs = [("state", got_s, expected_s, exact_s), ("weight", got_w, expected_w, exact_w)]
    for name, got, expected, exact in pairs:
        if exact is None:
            assert_close(got, expected, dtype)
        else:
            assert_close_to_exact(name, got, expected, exact, dtype)


def check_sparse_update_bad_ids(target, kind):
    """A bad id is left out of the update and reported by check_errors, not by the op."""
    clear_errors(target)
    dtype = torch.float32
    weight = torch.rand(20, 8, dtype=dtype)
    ids = torch.tensor([3, 25, 3, 7, -2, 19])
    grad_rows = torch.randn(6, 8, dtype=dtype)
    keep = (ids >= 0) & (ids < 20)
    expected_w = weight.clone()
    got_w = weight.clone().to(target.device)
    if kind == "sgd":
        reference.sparse_sgd_update(expected_w, ids[keep], grad_rows[keep], LR)
        target.ops.sparse_sgd_update(got_w, *target.to(ids, grad_rows), LR)
        op = "sparse_sgd_update"
    else:
        state = torch.zeros(20, 8, dtype=dtype)
        expected_s, got_s = state.clone(), state.clone().to(target.device)
        reference.sparse_adagrad_update(expected_w, expected_s, ids[keep], grad_rows[keep], LR,
                                        EPS, False)
        target.ops.sparse_adagrad_update(got_w, got_s, *target.to(ids, grad_rows), LR, EPS,
                                         False)
        assert_close(got_s, expected_s, dtype)
        op = "sparse_adagrad_update"
    assert_close(got_w, expected_w, dtype)
    with pytest.raises(IndexError, match=rf"fastmf\.{op}: ids id (25|-2) out of range \[0, 20\)"):
        target.check_errors()
    target.check_errors()  # cleared


# ----------------------------------------------------------------------------------------
# train_step


def run_train_steps(target, loss, optimizer, steps, batch, user_dtype, item_dtype, dtype,
                    bias=True, dim=16, num_users=80, num_items=40, reg=0.01, seed=0):
    """`steps` fused steps on fresh Zipf batches, on the target and with the reference;
    compares the loss of every step and every table and state at the end."""
    p, q, bu, bi = make_tables(num_users, num_items, dim, dtype=dtype, bias=bias, seed=seed)
    expected = list(clone_all(p, q, bu, bi))
    expected += list(make_states(optimizer, *expected))
    got = list(target.to(*clone_all(*expected)))
    lcode, ocode = loss_code(loss), optimizer_code(optimizer)
    for step in range(steps):
        users, items, targets = make_batch(num_users, num_items, batch, dtype=dtype,
                                           seed=seed * 1000 + step, implicit=loss == "bce")
        users, items = users.to(user_dtype), items.to(item_dtype)
        tables, states, opt = reference_bundles(expected, optimizer)
        exp_loss = reference.train_step(tables, states, users, items, targets, 3.0, Loss(lcode),
                                        reg, opt)
        got_loss = target.ops.train_step(*got, *target.to(users, items, targets), 3.0, lcode,
                                         reg, ocode, LR, EPS)
        assert got_loss.shape == () and got_loss.dtype == dtype
        assert_close(got_loss, exp_loss, dtype)
    for name, g, e in zip(("P", "Q", "bu", "bi", "P_state", "Q_state", "bu_state", "bi_state"),
                          got, expected, strict=False):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g.cpu(), e, **tolerance(dtype),
                                   msg=lambda m, n=name: f"{n}: {m}")
    return got


def train_twice_bitwise(target, loss, optimizer, batch, dtype, steps=3, **kw):
    """Two runs from the same start: bit-identical tables and losses."""
    outs = []
    for _ in range(2):
        p, q, bu, bi = make_tables(200, 30, 24, dtype=dtype, seed=5)
        tables = list(target.to(p, q, bu, bi))
        tables += list(make_states(optimizer, *tables))
        losses = []
        for step in range(steps):
            users, items, targets = make_batch(200, 30, batch, dtype=dtype, seed=step,
                                               implicit=loss == "bce")
            losses.append(target.ops.train_step(*tables, *target.to(users, items, targets), 3.0,
                                                loss_code(loss), 0.01,
                                                optimizer_code(optimizer), LR, EPS))
        outs.append((cpu(*tables), cpu(*losses)))
    (t1, l1), (t2, l2) = outs
    for a, b in zip(t1 + l1, t2 + l2, strict=False):
        if a is not None:
            assert torch.equal(a, b)


def check_train_step_bad_samples(target, what):
    """A bad id or a NaN target: the step runs, leaves that sample out of every update,
    returns a NaN loss, and check_errors raises as the CPU kernels would."""
    clear_errors(target)
    dtype = torch.float32
    p, q, bu, bi = make_tables(30, 20, 8, dtype=dtype, seed=3)
    users, items, targets = make_batch(30, 20, 64, dtype=dtype, seed=3)
    if what == "users":
        users[5] = 30
        pattern = r"fastmf\.train_step: users id 30 out of range \[0, 30\)"
        error = IndexError
    elif what == "items":
        items[9] = -1
        pattern = r"fastmf\.train_step: items id -1 out of range \[0, 20\)"
        error = IndexError
    else:
        targets[7] = float("nan")
        pattern = r"fastmf\.train_step: targets contains a non-finite value \(nan\)"
        error = ValueError
    tables = list(target.to(p, q, bu, bi)) + list(target.to(*make_states("adagrad", p, q, bu, bi)))
    loss = target.ops.train_step(*tables, *target.to(users, items, targets), 3.0, MSE, 0.01,
                                 ADAGRAD, LR, EPS)
    assert torch.isnan(loss.cpu())
    for t in tables:
        assert torch.isfinite(t.cpu()).all()
    with pytest.raises(error, match=pattern):
        target.check_errors()
    target.check_errors()


def check_forward_bad_ids(target):
    clear_errors(target)
    p, q, bu, bi = make_tables(10, 10, 8, seed=0)
    users = torch.tensor([1, 2, 11, 3])
    items = torch.tensor([0, 1, 2, 3])
    out = target.ops.mf_forward(*target.to(users, items, p, q, bu, bi), 0.0).cpu()
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()
    message = "fastmf.mf_forward: users id 11 out of range [0, 10)"
    with pytest.raises(IndexError, match=re.escape(message)):
        target.check_errors()
    gp, gq = target.ops.mf_backward(*target.to(torch.ones(4), users, items, p, q))
    assert (gp.cpu()[2] == 0).all() and (gq.cpu()[2] == 0).all()
    with pytest.raises(IndexError, match="mf_backward: users id 11"):
        target.check_errors()


def check_host_side_errors(target):
    """Errors that need no device data are raised by the op itself, as on the CPU."""
    p, q, bu, bi = target.to(*make_tables(10, 10, 8, seed=0))
    users, items, targets = target.to(*make_batch(10, 10, 5, seed=0))
    with pytest.raises(TypeError, match="int32 or int64"):
        target.ops.mf_forward(users.float(), items, p, q, bu, bi, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        target.ops.mf_forward(users, items[:3], p, q, bu, bi, 0.0)
    with pytest.raises(ValueError, match="both be given or both None"):
        target.ops.mf_forward(users, items, p, q, bu, None, 0.0)
    with pytest.raises(ValueError, match=f"unknown loss code 7; expected 0..{len(Loss) - 1}"):
        target.ops.train_step(p, q, bu, bi, None, None, None, None, users, items, targets, 0.0,
                              7, 0.0, SGD, LR, EPS)
    with pytest.raises(ValueError, match="adagrad needs user_factors_state"):
        target.ops.train_step(p, q, bu, bi, None, None, None, None, users, items, targets, 0.0,
                              MSE, 0.0, ADAGRAD, LR, EPS)
    with pytest.raises(TypeError, match="targets has dtype"):
        target.ops.train_step(p, q, bu, bi, None, None, None, None, users, items,
                              targets.double(), 0.0, MSE, 0.0, SGD, LR, EPS)
    # A layout only the CUDA kernels need: every other check passes.
    strided = p.t().contiguous().t()
    with pytest.raises(ValueError, match="weight must be contiguous to be updated in place"):
        target.ops.sparse_sgd_update(strided, users, torch.zeros_like(p)[:5], LR)
    with pytest.raises(ValueError, match=r"lengths differ \(ids has 5, grad_rows has 4\)"):
        target.ops.sparse_sgd_update(p, users, torch.zeros_like(p)[:4], LR)
    with pytest.raises(ValueError, match="grad_rows has 7 columns, weight has 8"):
        target.ops.sparse_sgd_update(p, users, torch.zeros_like(p)[:5, :7], LR)


# ----------------------------------------------------------------------------------------
# train_step_pairwise


def make_triples(num_users, num_items, batch, *, seed, user_dtype=torch.int64,
                 item_dtype=torch.int64, exponent=1.0):
    """(users, pos_items, neg_items), Zipf. Every fifth negative is another sample's
    positive and every seventh the sample's own positive, so item rows sum positive and
    negative gradients, and one sample can hold the same item twice."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(num_users, batch, generator=rng)
    pos = zipf_ids(num_items, batch, exponent=exponent, generator=rng)
    neg = zipf_ids(num_items, batch, exponent=exponent, generator=rng)
    if batch:
        neg[::5] = pos.roll(1)[::5]
        neg[::7] = pos[::7]
    return users.to(user_dtype), pos.to(item_dtype), neg.to(item_dtype)


def pairwise_step(target, tables, users, pos, neg, reg, optimizer):
    return target.ops.train_step_pairwise(*tables, *target.to(users, pos, neg), BPR, reg,
                                          optimizer_code(optimizer), LR, EPS)


def run_pairwise_steps(target, optimizer, steps, batch, user_dtype, item_dtype, dtype,
                       bias=True, dim=16, num_users=80, num_items=40, reg=0.01, seed=0,
                       exponent=1.0):
    """`steps` fused BPR steps on fresh Zipf triples, on the target and with the reference;
    compares the loss of every step and every table and state at the end (user_bias and
    its state included: the step must leave them as they were)."""
    p, q, bu, bi = make_tables(num_users, num_items, dim, dtype=dtype, bias=bias, seed=seed)
    expected = list(clone_all(p, q, bu, bi))
    expected += list(make_states(optimizer, *expected))
    got = list(target.to(*clone_all(*expected)))
    for step in range(steps):
        users, pos, neg = make_triples(num_users, num_items, batch, seed=seed * 1000 + step,
                                       user_dtype=user_dtype, item_dtype=item_dtype,
                                       exponent=exponent)
        tables, states, opt = reference_bundles(expected, optimizer)
        exp_loss = reference.train_step_pairwise(tables, states, users, pos, neg,
                                                 PairwiseLoss.BPR, reg, opt)
        got_loss = pairwise_step(target, got, users, pos, neg, reg, optimizer)
        assert got_loss.shape == () and got_loss.dtype == dtype
        assert_close(got_loss, exp_loss, dtype)
    for name, g, e in zip(("P", "Q", "bu", "bi", "P_state", "Q_state", "bu_state", "bi_state"),
                          got, expected, strict=False):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g.cpu(), e, **tolerance(dtype),
                                   msg=lambda m, n=name: f"{n}: {m}")
    return got


def run_hinge_steps(target, optimizer, batch, dtype=torch.float32, steps=2, num_users=80,
                    num_items=40, dim=16):
    """The margin ranking hinge (PairwiseLoss.HINGE) against the reference, on tables large
    enough that some samples are past the margin (no gradient) and the rest inside it."""
    tables = [12 * t for t in make_tables(num_users, num_items, dim, dtype=dtype, seed=13)]
    expected = list(clone_all(*tables)) + list(make_states(optimizer, *tables))
    got = list(target.to(*clone_all(*expected)))
    hinge = int(PairwiseLoss.HINGE)
    for step in range(steps):
        users, pos, neg = make_triples(num_users, num_items, batch, seed=40 + step)
        ref_tables, states, opt = reference_bundles(expected, optimizer)
        exp_loss = reference.train_step_pairwise(ref_tables, states, users, pos, neg,
                                                 PairwiseLoss.HINGE, 0.01, opt)
        got_loss = target.ops.train_step_pairwise(*got, *target.to(users, pos, neg), hinge,
                                                  0.01, optimizer_code(optimizer), LR, EPS)
        assert_loss(got_loss, exp_loss, dtype)
    assert_tables_close(target, got, expected, dtype)


def pairwise_twice_bitwise(target, optimizer, batch, dtype, steps=3, num_items=30,
                           exponent=1.0):
    """Two BPR runs from the same start: bit-identical tables and losses."""
    outs = []
    for _ in range(2):
        p, q, bu, bi = make_tables(200, num_items, 24, dtype=dtype, seed=5)
        tables = list(target.to(p, q, bu, bi))
        tables += list(make_states(optimizer, *tables))
        losses = []
        for step in range(steps):
            users, pos, neg = make_triples(200, num_items, batch, seed=step, exponent=exponent)
            losses.append(pairwise_step(target, tables, users, pos, neg, 0.01, optimizer))
        outs.append((cpu(*tables), cpu(*losses)))
    (t1, l1), (t2, l2) = outs
    for a, b in zip(t1 + l1, t2 + l2, strict=False):
        if a is not None:
            assert torch.equal(a, b)


def check_pairwise_same_item(target, optimizer, dtype=torch.float32):
    """Samples whose positive is their negative: x = b_i - b_i + <p, 0> = 0, the item's two
    gradient rows cancel, and only the reg term (counted twice) moves the row."""
    p, q, bu, bi = make_tables(20, 10, 8, dtype=dtype, seed=4)
    expected = list(clone_all(p, q, bu, bi)) + list(make_states(optimizer, p, q, bu, bi))
    got = list(target.to(*clone_all(*expected)))
    users = torch.tensor([3, 3, 7, 1, 3])
    items = torch.tensor([2, 5, 2, 9, 2])
    tables, states, opt = reference_bundles(expected, optimizer)
    exp_loss = reference.train_step_pairwise(tables, states, users, items, items,
                                             PairwiseLoss.BPR, 0.1, opt)
    got_loss = pairwise_step(target, got, users, items, items.clone(), 0.1, optimizer)
    assert_close(got_loss, exp_loss, dtype)
    for g, e in zip(got, expected, strict=False):
        if e is not None:
            assert_close(g, e, dtype)


def check_pairwise_bad_samples(target, what):
    """A bad id: the step runs, leaves that sample out of every update (and reads none of
    its rows), returns a NaN loss, and check_errors raises as the CPU kernel would."""
    clear_errors(target)
    dtype = torch.float32
    p, q, bu, bi = make_tables(30, 20, 8, dtype=dtype, seed=3)
    users, pos, neg = make_triples(30, 20, 64, seed=3)
    if what == "users":
        users[5] = 30
        pattern = r"fastmf\.train_step_pairwise: users id 30 out of range \[0, 30\)"
    elif what == "items":
        pos[9] = -1
        pattern = r"fastmf\.train_step_pairwise: items id -1 out of range \[0, 20\)"
    else:
        neg[11] = 1 << 40
        pattern = rf"fastmf\.train_step_pairwise: neg_items id {1 << 40} out of range \[0, 20\)"
    # Rows only the bad sample touches stay as they were.
    keep = torch.ones(64, dtype=torch.bool)
    keep[{"users": 5, "items": 9, "neg_items": 11}[what]] = False
    start = list(clone_all(p, q, bu, bi))
    tables = list(target.to(p, q, bu, bi)) + list(target.to(*make_states("adagrad", p, q, bu,
                                                                           bi)))
    loss = pairwise_step(target, tables, users, pos, neg, 0.01, "adagrad")
    assert torch.isnan(loss.cpu())
    for t in tables:
        assert torch.isfinite(t.cpu()).all()
    untouched_users = torch.ones(30, dtype=torch.bool)
    untouched_users[users[keep]] = False
    untouched_items = torch.ones(20, dtype=torch.bool)
    untouched_items[torch.cat([pos[keep], neg[keep]])] = False
    assert torch.equal(tables[0].cpu()[untouched_users], start[0][untouched_users])
    assert torch.equal(tables[1].cpu()[untouched_items], start[1][untouched_items])
    assert torch.equal(tables[2].cpu(), start[2])  # user_bias: never written
    with pytest.raises(IndexError, match=pattern):
        target.check_errors()
    target.check_errors()


# ----------------------------------------------------------------------------------------
# The sampled steps: train_step_pairwise_sampled (BPR) and train_step_sampled (BCE)

SAMPLED_OPS = ("train_step_pairwise_sampled", "train_step_sampled")
SAMPLED_MU = 0.125


def make_positive_csr(num_users, num_items, *, seed, id_dtype=torch.int64):
    """Sorted distinct positives per user: some users none, user 1 every item but one."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        deg = 0 if u % 5 == 0 else int(rng.integers(1, num_items // 2))
        if u == 1:
            deg = num_items - 1
        rows.append(np.sort(rng.choice(num_items, size=deg, replace=False)))
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return (torch.from_numpy(indptr).to(id_dtype),
            torch.from_numpy(np.concatenate(rows)).to(id_dtype))


def sampled_step(target, tables, users, pos, csr, k, seed, step, reg, optimizer,
                 op="train_step_pairwise_sampled"):
    ids = target.to(users, pos, *csr)
    if op == "train_step_pairwise_sampled":
        return target.ops.train_step_pairwise_sampled(
            *tables, *ids, k, seed, step, BPR, reg, optimizer_code(optimizer), LR, EPS)
    return target.ops.train_step_sampled(*tables, *ids, k, seed, step, SAMPLED_MU,
                                         int(Loss.BCE), reg, optimizer_code(optimizer), LR,
                                         EPS)


def reference_sampled(op, tables, states, users, pos, csr, k, seed, step, reg, opt):
    if op == "train_step_pairwise_sampled":
        return reference.train_step_pairwise_sampled(tables, states, users, pos, *csr, k, seed,
                                                     step, PairwiseLoss.BPR, reg, opt)
    return reference.train_step_sampled(tables, states, users, pos, *csr, k, seed, step,
                                        SAMPLED_MU, Loss.BCE, reg, opt)


def sampled_start(target, optimizer, num_users, num_items, dim, dtype, id_dtype, *, seed):
    """(reference tables and states, the target's copies, a positives' CSR) to step from."""
    p, q, bu, bi = make_tables(num_users, num_items, dim, dtype=dtype, seed=seed)
    expected = list(clone_all(p, q, bu, bi)) + list(make_states(optimizer, p, q, bu, bi))
    got = list(target.to(*clone_all(*expected)))
    return expected, got, make_positive_csr(num_users, num_items, seed=seed + 1,
                                            id_dtype=id_dtype)


def run_sampled(target, op, optimizer, batch, k, dtype=torch.float32, id_dtype=torch.int64,
                steps=2, num_users=80, num_items=40, dim=16):
    """A step that draws its own negatives (``op``, one of SAMPLED_OPS) against the
    reference's: the negatives are integer hashes, so the same items, and then the same
    step."""
    expected, got, csr = sampled_start(target, optimizer, num_users, num_items, dim, dtype,
                                       id_dtype, seed=9)
    for step in range(steps):
        users, pos, _ = make_triples(num_users, num_items, batch, seed=20 + step,
                                     user_dtype=id_dtype, item_dtype=id_dtype)
        tables, states, opt = reference_bundles(expected, optimizer)
        exp_loss = reference_sampled(op, tables, states, users, pos, csr, k, -7, step, 0.01,
                                     opt)
        got_loss = sampled_step(target, got, users, pos, csr, k, -7, step, 0.01, optimizer, op)
        assert_loss(got_loss, exp_loss, dtype)
    assert_tables_close(target, got, expected, dtype)


# The multi-step ops: each sampled step on every run of batch_size positives, in one call.
STEPS_OPS = ("train_steps_pairwise_sampled", "train_steps_sampled")


def run_sampled_steps(target, op, n, batch_size, k, *, weighted=False, num_users=80,
                      num_items=40, dim=16, ordered=False):
    """``op`` (one of STEPS_OPS) against the reference's run of steps: every step's loss,
    the tables and states after them. ``ordered``: the run read through an int32 order of n
    positions (repeats included) into n + 7 positives."""
    expected, got, csr = sampled_start(target, "adagrad", num_users, num_items, dim,
                                       torch.float32, torch.int64, seed=13)
    m = n + 7 if ordered else n
    users, pos, _ = make_triples(num_users, num_items, m, seed=40)
    weights = positive_weights(m, torch.float32, seed=41) if weighted else None
    order = None
    if ordered:
        gen = torch.Generator().manual_seed(42)
        order = torch.cat([torch.randperm(m, generator=gen)[:n - n // 4],
                           torch.randint(0, m, (n // 4,), generator=gen)]).to(torch.int32)
    tables, states, opt = reference_bundles(expected, "adagrad")
    pairwise = op == "train_steps_pairwise_sampled"
    mu, loss = ((), PairwiseLoss.BPR) if pairwise else ((SAMPLED_MU,), Loss.BCE)
    exp_losses = getattr(reference, op)(tables, states, users, pos, *csr, k, batch_size, 5, 2,
                                        *mu, loss, 0.01, opt, weights, order)
    got_losses = getattr(target.ops, op)(
        *got, *target.to(users, pos, *csr), k, batch_size, 5, 2, *mu, int(loss), 0.01,
        optimizer_code("adagrad"), LR, EPS, *target.to(weights), *target.to(order))
    assert got_losses.shape == exp_losses.shape
    for g, e in zip(cpu(got_losses)[0], exp_losses):
        assert_loss(g, e, torch.float32)
    assert_tables_close(target, got, expected, torch.float32)


def check_sampled_steps_bad_order(target, op, bad):
    """An order entry outside the run of positives: an IndexError naming the order and the
    entry (the smallest when one is negative, else the largest) before any step runs, and
    the tables untouched."""
    _, got, csr = sampled_start(target, "adagrad", 80, 40, 16, torch.float32, torch.int64,
                                seed=13)
    users, pos, _ = make_triples(80, 40, 30, seed=40)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(42))
    order[11] = bad
    order[3] = bad - 1 if bad < 0 else bad + 1  # a second bad entry, further out
    before = [cpu(t)[0].clone() for t in got]
    mu, loss = (((), PairwiseLoss.BPR) if op == "train_steps_pairwise_sampled"
                else ((SAMPLED_MU,), Loss.BCE))
    worst = bad - 1 if bad < 0 else bad + 1
    with pytest.raises(IndexError, match=rf"fastmf\.{op}: order id {worst} out of range "
                                         r"\[0, 30\)"):
        getattr(target.ops, op)(*got, *target.to(users, pos, *csr), 1, 8, 5, 2, *mu,
                                int(loss), 0.01, optimizer_code("adagrad"), LR, EPS, None,
                                *target.to(order))
    for t, b in zip(got, before):
        assert torch.equal(cpu(t)[0], b)


def broken_positive_csr(indptr, indices, what):
    """make_positive_csr(30, 20)'s CSR broken for user 2: "full", every one of the 20 items
    among its positives; otherwise (a row) its row's end past the end of pos_indices (which
    also breaks user 3's row, which starts there)."""
    indptr = indptr.clone()
    if what == "full":
        start = int(indptr[2])
        indices = torch.cat([indices[:start], torch.arange(20), indices[int(indptr[3]):]])
        indptr[3:] += 20 - int(indptr[3] - indptr[2])
    else:
        indptr[3] = len(indices) + 5
    return indptr, indices


def check_sampled_bad_rows(target, op, what):
    """A user with every item among its positives, or a row past the end of pos_indices:
    recorded under ``op`` (ValueError from check_errors), the pair left out, no NaN in the
    tables."""
    clear_errors(target)
    p, q, bu, bi = make_tables(30, 20, 8, seed=3)
    indptr, indices = make_positive_csr(30, 20, seed=4)
    users, pos, _ = make_triples(30, 20, 64, seed=5)
    users[7] = 2
    indptr, indices = broken_positive_csr(indptr, indices, what)
    pattern = (rf"{op}: user 2 has 20 positives of 20 items" if what == "full"
               else rf"{op}: pos_indptr gives user \d+ the row")
    tables = list(target.to(p, q, bu, bi)) + list(target.to(*make_states("adagrad", p, q, bu,
                                                                           bi)))
    sampled_step(target, tables, users, pos, (indptr, indices), 2, 0, 0, 0.01, "adagrad", op)
    for t in tables:
        assert torch.isfinite(t.cpu()).all()
    with pytest.raises(ValueError, match=pattern):
        target.check_errors()
    target.check_errors()


def check_sample_negatives(target, batch, k, id_dtype=torch.int64, num_users=80,
                           num_items=40):
    """sample_negatives (the sampling family) against the reference: the same items, to the
    bit, on Zipf users with repeats (rows with none, some and all but one of the items)."""
    indptr, indices = make_positive_csr(num_users, num_items, seed=15, id_dtype=id_dtype)
    users = zipf_ids(num_users, batch, generator=np.random.default_rng(16), dtype=id_dtype)
    got = target.ops.sample_negatives(*target.to(users, indptr, indices), num_items, k, -3, 8,
                                      "sample_negatives")
    target.check_errors()
    expected = reference.sample_negatives(users, indptr, indices, num_items, k, -3, 8)
    assert got.dtype == torch.int64 and got.shape == (batch, k)
    assert torch.equal(cpu(got)[0], expected)


def check_sample_negatives_bad(target, what):
    """A bad user id (IndexError), a row past the end of pos_indices or a user with every
    item (ValueError): the CPU kernel raises at once, the CUDA one records it under
    sample_negatives, sets those draws to -1 and draws the others."""
    clear_errors(target)
    indptr, indices = make_positive_csr(30, 20, seed=4)
    users = torch.arange(30).repeat(3)
    users[7] = 2
    if what == "user":
        users[9] = 30
        error, pattern = IndexError, r"sample_negatives: users id 30 out of range \[0, 30\)"
    else:
        indptr, indices = broken_positive_csr(indptr, indices, what)
        error, pattern = ValueError, (
            r"sample_negatives: user 2 has 20 positives of 20 items" if what == "full"
            else r"sample_negatives: pos_indptr gives user \d+ the row")
    args = (*target.to(users, indptr, indices), 20, 2, 0, 0, "sample_negatives")
    if target.device == "cpu" and target.name != "emulated":
        with pytest.raises(error, match=pattern):
            target.ops.sample_negatives(*args)
        return
    got = cpu(target.ops.sample_negatives(*args))[0]
    with pytest.raises(error, match=pattern):
        target.check_errors()
    target.check_errors()
    # "row": user 3's row starts at the broken pointer too.
    bad = {"user": users == 30, "full": users == 2, "row": (users == 2) | (users == 3)}[what]
    assert (got[bad] == -1).all()
    # Every other draw as the reference draws it: a pair's item depends only on its own
    # counter and its user's row, so the bad users are replaced by user 0 (no positives).
    ok = reference.sample_negatives(users.masked_fill(bad, 0), indptr, indices, 20, 2, 0, 0)
    assert torch.equal(got[~bad], ok[~bad])


STEP_OPS = ("train_step", "train_step_pairwise") + SAMPLED_OPS


def positive_weights(batch, dtype, *, seed):
    """Confidence-like weights: log-count shaped, with exact zeros and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (batch,), generator=g).to(dtype)
    w = 1 + 2.0 * torch.log1p(counts)
    w[::7] = 0
    return w


def weighted_step(target, op, tables, users, pos, other, weights, reg, optimizer, k=2,
                  csr=None, step=0):
    """One ``op`` step on the target with per-sample ``weights`` (train_step: ``other`` are
    targets; train_step_pairwise: negatives; the sampled ops draw theirs from ``csr``)."""
    o = optimizer_code(optimizer)
    (w,) = target.to(weights)
    if op == "train_step":
        return target.ops.train_step(*tables, *target.to(users, pos, other), 3.0, MSE, reg, o,
                                     LR, EPS, w)
    if op == "train_step_pairwise":
        return target.ops.train_step_pairwise(*tables, *target.to(users, pos, other), BPR, reg,
                                              o, LR, EPS, w)
    ids = target.to(users, pos, *csr)
    if op == "train_step_pairwise_sampled":
        return target.ops.train_step_pairwise_sampled(*tables, *ids, k, 3, step, BPR, reg, o,
                                                      LR, EPS, w)
    return target.ops.train_step_sampled(*tables, *ids, k, 3, step, SAMPLED_MU,
                                         int(Loss.BCE), reg, o, LR, EPS, w)


def reference_weighted(op, tables, states, users, pos, other, weights, reg, opt, k=2, csr=None,
                       step=0):
    if op == "train_step":
        return reference.train_step(tables, states, users, pos, other, 3.0, Loss.MSE, reg, opt,
                                    weights)
    if op == "train_step_pairwise":
        return reference.train_step_pairwise(tables, states, users, pos, other,
                                             PairwiseLoss.BPR, reg, opt, weights)
    if op == "train_step_pairwise_sampled":
        return reference.train_step_pairwise_sampled(tables, states, users, pos, *csr, k, 3,
                                                     step, PairwiseLoss.BPR, reg, opt, weights)
    return reference.train_step_sampled(tables, states, users, pos, *csr, k, 3, step,
                                        SAMPLED_MU, Loss.BCE, reg, opt, weights)


def run_weighted(target, op, optimizer, batch, dtype=torch.float32, id_dtype=torch.int64,
                 steps=2, num_users=80, num_items=40, dim=16):
    """Steps of ``op`` (one of STEP_OPS) with per-sample weights on Zipf batches, against
    the reference: every loss, every table and state at the end."""
    expected, got, csr = sampled_start(target, optimizer, num_users, num_items, dim, dtype,
                                       id_dtype, seed=11)
    for step in range(steps):
        users, pos, neg = make_triples(num_users, num_items, batch, seed=30 + step,
                                       user_dtype=id_dtype, item_dtype=id_dtype)
        other = (neg if op == "train_step_pairwise" else
                 torch.rand(batch, generator=torch.Generator().manual_seed(step)).to(dtype) * 4)
        weights = positive_weights(batch, dtype, seed=step)
        tables, states, opt = reference_bundles(expected, optimizer)
        exp_loss = reference_weighted(op, tables, states, users, pos, other, weights, 0.01, opt,
                                      csr=csr, step=step)
        got_loss = weighted_step(target, op, got, users, pos, other, weights, 0.01, optimizer,
                                 csr=csr, step=step)
        assert_loss(got_loss, exp_loss, dtype)
    assert_tables_close(target, got, expected, dtype)


def check_bad_weights(target, op, bad):
    """A NaN, infinite or negative weight: recorded under ``op`` (ValueError from
    check_errors, the CPU kernels' message), its sample left out, no NaN in the tables."""
    clear_errors(target)
    p, q, bu, bi = make_tables(30, 20, 8, seed=3)
    csr = make_positive_csr(30, 20, seed=4)
    users, pos, neg = make_triples(30, 20, 64, seed=5)
    other = neg if op == "train_step_pairwise" else torch.rand(64) * 4
    weights = positive_weights(64, torch.float32, seed=1)
    weights[9] = bad
    tables = list(target.to(p, q, bu, bi)) + list(target.to(*make_states("adagrad", p, q, bu,
                                                                           bi)))
    weighted_step(target, op, tables, users, pos, other, weights, 0.01, "adagrad", csr=csr)
    for t in tables:
        assert torch.isfinite(t.cpu()).all()
    with pytest.raises(ValueError, match=rf"fastmf\.{op}: weights must be finite and >= 0, "
                                         rf"got {re.escape(str(bad))}"):
        target.check_errors()
    target.check_errors()


def check_pairwise_host_side_errors(target):
    """Errors that need no device data are raised by the op itself, as on the CPU."""
    p, q, bu, bi = target.to(*make_tables(10, 10, 8, seed=0))
    users, pos, neg = target.to(*make_triples(10, 10, 5, seed=0))
    op = target.ops.train_step_pairwise
    none4 = (None, None, None, None)
    with pytest.raises(ValueError, match="unknown pairwise loss code 3; expected 0..1"):
        op(p, q, bu, bi, *none4, users, pos, neg, 3, 0.0, SGD, LR, EPS)
    with pytest.raises(ValueError, match="unknown optimizer code 5"):
        op(p, q, bu, bi, *none4, users, pos, neg, BPR, 0.0, 5, LR, EPS)
    with pytest.raises(ValueError, match="rowwise_adagrad needs user_factors_state, got None"):
        op(p, q, bu, bi, *none4, users, pos, neg, BPR, 0.0, int(Optimizer.ROWWISE_ADAGRAD), LR,
           EPS)
    with pytest.raises(ValueError, match=r"lengths differ \(users has 5, pos_items has 5, "
                                         r"neg_items has 3\)"):
        op(p, q, bu, bi, *none4, users, pos, neg[:3], BPR, 0.0, SGD, LR, EPS)
    with pytest.raises(TypeError, match="neg_items must be int32 or int64"):
        op(p, q, bu, bi, *none4, users, pos, neg.float(), BPR, 0.0, SGD, LR, EPS)
    with pytest.raises(ValueError, match="item_factors_state has shape"):
        op(p, q, bu, bi, p.new_zeros(10, 8), q.new_zeros(9, 8), bu.new_zeros(10),
           bi.new_zeros(10), users, pos, neg, BPR, 0.0, ADAGRAD, LR, EPS)


# topk_scores, on fastmf.testing's quantised top-k data (exact scores, planted ties): the
# kernels must agree with fastmf.ops.reference bit for bit, tie order included.


def assert_same_topk(got, expected):
    scores, ids = cpu(*got)
    assert scores.dtype == expected[0].dtype and ids.dtype == torch.int64
    assert scores.shape == expected[0].shape and ids.shape == expected[1].shape
    torch.testing.assert_close(scores, expected[0], rtol=0, atol=0)
    assert torch.equal(ids, expected[1])


def _misaligned(t, device):
    """A contiguous copy of t on device whose data starts one element past a 16-byte
    boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def check_topk(target, batch, num_items, k, dtype, *, dim=8, id_dtype=torch.int64,
               exclude=False, candidates=None, bias=True, nan=False, misaligned=False,
               seed=0):
    """candidates: None, or how many candidate ids to draw (with repeats). misaligned:
    queries and items that start off a 16-byte boundary (the kernels must not use packed
    loads on them)."""
    items, b = make_topk_items(num_items, dim, dtype=dtype, seed=seed, bias=bias)
    queries = make_topk_queries(batch, dim, dtype=dtype, seed=seed + 1)
    if nan and num_items > 5:
        items[3] = float("nan")
        items[5] = float("-inf")
        queries[:, 0] = 1.0
    indptr = indices = cands = None
    if exclude:
        indptr, indices = make_topk_exclude(batch, num_items, id_dtype=id_dtype, seed=seed + 2)
    if candidates is not None:
        cands = make_topk_candidates(num_items, candidates, seed=seed + 3, id_dtype=id_dtype)
    expected = reference.topk_scores(queries, items, b, k, indptr, indices, cands)
    original = None if indices is None else indices.clone()
    queries_dev, items_dev, b_dev = target.to(queries, items, b)
    if misaligned:
        queries_dev = _misaligned(queries, target.device)
        items_dev = _misaligned(items, target.device)
        assert items_dev.data_ptr() % 16 != 0
    got = target.ops.topk_scores(queries_dev, items_dev, b_dev, k,
                                 *target.to(indptr, indices, cands))
    assert_same_topk(got, expected)
    if exclude and batch > 1:
        assert (got[1][1].cpu() == -1).all()  # the query that excludes everything
    if original is not None:
        assert torch.equal(indices, original)
    target.check_errors()  # nothing recorded


def check_topk_batch_independent(target, dtype, num_items=3000, dim=13):
    """Random (inexact) data: a query's results are bit-identical alone (narrow tile) and in
    a large batch (wide tile), and close to the reference."""
    gen = torch.Generator().manual_seed(7)
    items = torch.randn(num_items, dim, generator=gen, dtype=dtype)
    bias = torch.randn(num_items, generator=gen, dtype=dtype)
    queries = torch.randn(40, dim, generator=gen, dtype=dtype)
    batched = cpu(*target.ops.topk_scores(*target.to(queries, items, bias), 10, None, None, None))
    torch.testing.assert_close(batched[0], reference.topk_scores(queries, items, bias, 10)[0],
                               **tolerance(dtype))
    for b in (0, 39):
        alone = cpu(*target.ops.topk_scores(*target.to(queries[b : b + 1], items, bias), 10,
                                            None, None, None))
        assert torch.equal(alone[0][0], batched[0][b]) and torch.equal(alone[1][0], batched[1][b])


def check_topk_bad_ids(target):
    """Bad exclude/candidate ids are left out and reported by check_errors; a bad indptr is
    reported as the CPU kernel's ValueError."""
    clear_errors(target)
    items, bias = make_topk_items(10, 8)
    queries = make_topk_queries(3, 8)
    indptr, indices = torch.tensor([0, 1, 1, 4]), torch.tensor([0, 7, 12, 4])
    got = target.ops.topk_scores(*target.to(queries, items, bias), 4,
                                 *target.to(indptr, indices), None)
    expected = reference.topk_scores(queries, items, bias, 4, torch.tensor([0, 1, 1, 3]),
                                     torch.tensor([0, 7, 4]))
    assert_same_topk(got, expected)
    with pytest.raises(IndexError, match=re.escape(
            "fastmf.topk_scores: exclude id 12 out of range [0, 10)")):
        target.check_errors()
    target.check_errors()  # cleared

    cands = torch.tensor([1, -3, 5, 5, 9], dtype=torch.int32)
    got = target.ops.topk_scores(*target.to(queries, items, bias), 4, None, None,
                                 *target.to(cands))
    expected = reference.topk_scores(queries, items, bias, 4, None, None, torch.tensor([1, 5, 9]))
    assert_same_topk(got, expected)
    with pytest.raises(IndexError, match=re.escape(
            "fastmf.topk_scores: candidates id -3 out of range [0, 10)")):
        target.check_errors()

    for indptr, message in (
        (torch.tensor([0, 1, 1, 5]), "exclude_indptr spans [0, 5) but exclude_indices has 4"),
        (torch.tensor([0, 2, 1, 3]), "exclude_indptr must be non-decreasing, got 2 then 1 at "
                                     "query 1"),
    ):
        target.ops.topk_scores(*target.to(queries, items, bias), 4,
                               *target.to(indptr, torch.tensor([0, 7, 2, 4])), None)
        with pytest.raises(ValueError, match=re.escape("fastmf.topk_scores: " + message)):
            target.check_errors()
    target.check_errors()


def check_topk_host_errors(target):
    """The CPU kernel's host-side checks, raised by the op itself."""
    items, bias = target.to(*make_topk_items(10, 8))
    queries = target.to(make_topk_queries(3, 8))[0]
    ok_ptr, ok_ind = target.to(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 9]))
    op = target.ops.topk_scores
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        op(queries, items, bias, 0, None, None, None)
    with pytest.raises(TypeError, match="candidates must be int32 or int64"):
        op(queries, items, bias, 3, None, None, target.to(torch.tensor([1.0]))[0])
    with pytest.raises(ValueError, match=re.escape(
            "exclude_indptr must have one entry per query plus one (4), got 3")):
        op(queries, items, bias, 3, ok_ptr[:3], ok_ind, None)
    with pytest.raises(ValueError, match="must both be given or both None"):
        op(queries, items, bias, 3, ok_ptr, None, None)
    with pytest.raises(ValueError, match="queries has dim 4 but item_factors has dim 8"):
        op(queries[:, :4].contiguous(), items, bias, 3, None, None, None)
    with pytest.raises(ValueError, match="item_bias has 5 rows, item_factors has 10"):
        op(queries, items, bias[:5], 3, None, None, None)
    with pytest.raises(TypeError, match="item_factors has dtype"):
        op(queries, items.double(), bias, 3, None, None, None)
    with pytest.raises(TypeError, match="queries must be float32 or float64"):
        op(queries.long(), items, bias, 3, None, None, None)


def check_topk_empty(target, dtype):
    items, bias = make_topk_items(20, 8, dtype=dtype)
    queries = make_topk_queries(3, 8, dtype=dtype)
    scores, ids = cpu(*target.ops.topk_scores(*target.to(queries[:0], items, bias), 5, None,
                                              None, None))
    assert scores.shape == (0, 5) and ids.shape == (0, 5) and scores.dtype == dtype
    empty_ptr = torch.zeros(1, dtype=torch.int64)
    scores, ids = cpu(*target.ops.topk_scores(*target.to(queries[:0], items, bias), 5,
                                              *target.to(empty_ptr, empty_ptr[:0]), None))
    assert scores.shape == (0, 5)
    for args in ((items[:0], None, None), (items, bias, torch.zeros(0, dtype=torch.int32))):
        scores, ids = cpu(*target.ops.topk_scores(*target.to(queries, args[0], args[1]), 4,
                                                  None, None, *target.to(args[2])))
        assert (ids == -1).all() and (scores == float("-inf")).all() and ids.shape == (3, 4)
    target.check_errors()


# ----------------------------------------------------------------------------------------
# Preconditions every backend checks before writing anything (csrc/checks.h): shared
# memory, settings, and (CUDA only) the row width of both tables.


def _step_inputs(target, optimizer="adagrad", dim=8, seed=6):
    p, q, bu, bi = make_tables(12, 9, dim, seed=seed)
    tables = list(target.to(p, q, bu, bi)) + list(target.to(*make_states(optimizer, p, q, bu,
                                                                           bi)))
    users, items, targets = target.to(*make_batch(12, 9, 40, seed=seed))
    neg = target.to(make_batch(12, 9, 40, seed=seed + 1)[1])[0]
    return tables, users, items, targets, neg


def _target_step(target, op, tensors, ids, reg, lr, eps):
    """One Adagrad step of `op` (MSE / BPR) on the target; ids: (users, items, targets) or
    (users, pos_items, neg_items)."""
    if op == "train_step":
        return target.ops.train_step(*tensors, *ids, 3.0, MSE, reg, ADAGRAD, lr, eps)
    return target.ops.train_step_pairwise(*tensors, *ids, BPR, reg, ADAGRAD, lr, eps)


def _reference_step(op, tensors, ids, reg):
    tables, states, opt = reference_bundles(tensors, "adagrad")
    if op == "train_step":
        return reference.train_step(tables, states, *ids, 3.0, Loss.MSE, reg, opt)
    return reference.train_step_pairwise(tables, states, *ids, PairwiseLoss.BPR, reg, opt)


def _assert_unchanged(before, after):
    for b, a in zip(before, after, strict=True):
        if b is not None:
            assert torch.equal(b.cpu(), a.cpu())


def check_refuses_shared_memory(target):
    """Tables or states that share memory would make the fused steps read rows another
    group writes: refused with a ValueError naming both, before anything is written."""
    tables, users, items, targets, neg = _step_inputs(target)
    p, q, bu, bi, sp, sq, sbu, sbi = tables

    def steps(t):
        yield "train_step", lambda: target.ops.train_step(*t, users, items, targets, 3.0, MSE,
                                                          0.01, ADAGRAD, LR, EPS)
        yield "train_step_pairwise", lambda: target.ops.train_step_pairwise(
            *t, users, items, neg, BPR, 0.01, ADAGRAD, LR, EPS)

    same = torch.empty(12, 8, device=p.device)
    same.copy_(p)
    big = torch.rand(30, 8, device=p.device)
    cases = [
        # the user table passed as the item table too
        ([same, same[:9], bu, bi, sp, sq, sbu, sbi], "user_factors and item_factors"),
        # a state aliasing a weight
        ([p, q, bu, bi, p.clone(), q, sbu, sbi], "item_factors and item_factors_state"),
        # overlapping views of one buffer
        ([big[:12], big[10:19], bu, bi, sp, sq, sbu, sbi], "user_factors and item_factors"),
        ([p, q, bu, bi, sp, sq, sbu, bi], "item_bias and item_bias_state"),
    ]
    for t, names_ in cases:
        before = [x.clone() for x in t]
        for op, run in steps(t):
            message = f"fastmf.{op}: {names_} share memory; each table and state needs memory " \
                      "of its own"
            with pytest.raises(ValueError, match=re.escape(message)):
                run()
            _assert_unchanged(before, t)
    # user_bias is never read by the pairwise step: sharing it is harmless there.
    user_bias = torch.rand(12, device=p.device)
    t = [p, q, user_bias, user_bias[:9], sp, sq, sbu, sbi]
    before = [x.clone() for x in t]
    with pytest.raises(ValueError, match="user_bias and item_bias share memory"):
        target.ops.train_step(*t, users, items, targets, 3.0, MSE, 0.01, ADAGRAD, LR, EPS)
    _assert_unchanged(before, t)
    target.ops.train_step_pairwise(*t, users, items, neg, BPR, 0.01, ADAGRAD, LR, EPS)

    weight = torch.rand(12, 8, device=p.device)
    grads = torch.randn(40, 8, device=p.device)
    with pytest.raises(ValueError, match=re.escape(
            "fastmf.sparse_adagrad_update: weight and state share memory")):
        target.ops.sparse_adagrad_update(weight, weight, users, grads, LR, EPS, False)
    target.check_errors()


def check_refuses_bad_settings(target):
    """NaN, inf or negative lr / eps / reg: a ValueError before anything is written."""
    tables, users, items, targets, neg = _step_inputs(target)
    before = [t.clone() for t in tables]
    nan, inf = float("nan"), float("inf")
    for name, lr, eps, reg, shown in (("lr", nan, EPS, 0.01, "nan"), ("eps", LR, nan, 0.01, "nan"),
                                      ("lr", inf, EPS, 0.01, "inf"), ("reg", LR, EPS, inf, "inf"),
                                      ("lr", -0.5, EPS, 0.01, "-0.5"),
                                      ("reg", LR, EPS, -1.0, "-1")):
        for op, ids in (("train_step", (users, items, targets)),
                        ("train_step_pairwise", (users, items, neg))):
            message = f"fastmf.{op}: {name} must be finite and >= 0, got {shown}"
            with pytest.raises(ValueError, match=re.escape(message)):
                _target_step(target, op, tables, ids, reg, lr, eps)
    grads = torch.randn(40, 8, device=tables[0].device)
    p, sp = tables[0], tables[4]
    with pytest.raises(ValueError, match=re.escape(
            "fastmf.sparse_adagrad_update: eps must be finite and >= 0, got nan")):
        target.ops.sparse_adagrad_update(p, sp, users, grads, LR, nan, False)
    with pytest.raises(ValueError, match=re.escape(
            "fastmf.sparse_sgd_update: lr must be finite and >= 0, got inf")):
        target.ops.sparse_sgd_update(p, users, grads, inf)
    _assert_unchanged(before, tables)
    target.check_errors()


def check_wide_rows_with_misaligned_state(target, dim=264):
    """K = 264 (a multiple of 4, over the 256 the CUDA update holds unpacked) with an
    element-wise Adagrad item_factors_state that starts off a 16-byte boundary: the user
    rows could move as packs, the item rows cannot. The CUDA kernels must refuse the step
    before writing either table (they used to update P, then raise on Q); the CPU kernels
    have no width limit and must match the reference."""
    p, q, bu, bi = make_tables(12, 9, dim, seed=8)
    states = list(make_states("adagrad", p, q, bu, bi))
    users, items, targets = make_batch(12, 9, 40, seed=8)
    neg = make_batch(12, 9, 40, seed=9)[1]
    for op in ("train_step", "train_step_pairwise"):
        got = list(target.to(*clone_all(p, q, bu, bi))) + list(target.to(*clone_all(*states)))
        got[5] = _misaligned(states[1], target.device)
        assert got[5].data_ptr() % 16 != 0
        expected = list(clone_all(p, q, bu, bi)) + list(clone_all(*states))
        ids = (users, items, targets) if op == "train_step" else (users, items, neg)
        if target.name == "native-cpu":
            got_loss = _target_step(target, op, got, target.to(*ids), 0.01, LR, EPS)
            assert_close(got_loss, _reference_step(op, expected, ids, 0.01), torch.float32)
            for g, e in zip(got, expected, strict=True):
                assert_close(g, e, torch.float32)
            continue
        before = [t.clone() for t in got]
        message = (f"fastmf.{op}: item_factors rows of {dim} values are too wide for the CUDA "
                   "update kernels (at most 256 here; 1024 when")
        with pytest.raises(ValueError, match=re.escape(message)):
            _target_step(target, op, got, target.to(*ids), 0.01, LR, EPS)
        _assert_unchanged(before, got)
    target.check_errors()


# ----------------------------------------------------------------------------------------
# The embedding_bag family: embedding_bag_forward, embedding_bag_backward, sparse_update,
# embedding_bag_backward_update. Expected values come from fastmf.ops.reference; where the
# native CPU kernels are built they are also compared bit for bit, since the CUDA kernels
# sum in the CPU kernels' order (hot runs in the same chunks) and round as they do.

HALF_TOLERANCES = {torch.float16: dict(rtol=2.0 ** -8, atol=1e-5),
                   torch.bfloat16: dict(rtol=2.0 ** -6, atol=1e-5)}


def bag_tolerance(dtype):
    return HALF_TOLERANCES[dtype] if dtype in HALF_TOLERANCES else tolerance(dtype)


def check_unique_bags(target, *, id_dtype=torch.int64, index_dtype=torch.int64,
                      weight_dtype=torch.float32, num_rows=500, length=300, seed=0):
    """unique_bags on Zipf ids over a feature matrix with empty rows against the reference
    (ids and copies: equal), and the native CPU kernel; then a bad id and a bad row
    pointer, which raise the CPU's errors (the op synchronises to size its outputs)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 5, num_rows)
    lengths[::7] = 0
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    nnz = int(indptr[-1])
    indices = torch.from_numpy(rng.integers(0, 3 * num_rows, nnz)).to(index_dtype)
    weights = torch.from_numpy(rng.random(nnz) + 0.1).to(weight_dtype)
    ids = zipf_ids(num_rows, length, generator=rng, dtype=id_dtype)
    expected = reference.unique_bags(ids, indptr, indices, weights)
    got = cpu(*target.ops.unique_bags(*target.to(ids, indptr, indices, weights)))
    native = native_cpu_ops()
    others = [expected] + ([native.unique_bags(ids, indptr, indices, weights)] if native else [])
    for want in others:
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(IndexError, match=rf"fastmf\.unique_bags: ids id {num_rows} out of "
                                         rf"range \[0, {num_rows}\)"):
        target.ops.unique_bags(*target.to(torch.tensor([0, num_rows]), indptr, indices,
                                          weights))
    bad = indptr.clone()
    bad[num_rows] = nnz + 1
    with pytest.raises(ValueError, match=rf"fastmf\.unique_bags: indptr\[{num_rows - 1}\] "):
        target.ops.unique_bags(*target.to(torch.tensor([num_rows - 1]), bad, indices, weights))
    target.check_errors()


def native_cpu_ops():
    """torch.ops.fastmf when the native CPU kernels of the family are built, else None."""
    import fastmf  # noqa: F401  (loads the extension)

    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastmf::embedding_bag_backward_update", "CPU"):
        return None
    return torch.ops.fastmf


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_bags(num_rows, num_bags, *, seed, id_dtype=torch.int64, max_size=6, exponent=1.0,
              empty_every=5):
    """(indices, offsets): Zipf ids (duplicates within and across bags), bag sizes 0..max_size
    with every `empty_every`-th bag empty."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, size=num_bags)
    sizes[::empty_every] = 0
    offsets = torch.zeros(num_bags + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.cumsum(sizes))
    ids = zipf_ids(num_rows, int(offsets[-1]), exponent=exponent, generator=rng)
    return ids.to(id_dtype), offsets.to(id_dtype)


def _table(num_rows, dim, dtype, gen):
    return (torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype)


def check_bag_forward_backward(target, dtype, pooling, weighted, *, id_dtype=torch.int64,
                               num_rows=30, num_bags=23, dim=8, seed=0):
    pooling = Pooling(pooling)
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    weight = _table(num_rows, dim, dtype, gen)
    indices, offsets = make_bags(num_rows, num_bags, seed=seed, id_dtype=id_dtype)
    psw = torch.rand(indices.numel(), generator=gen, dtype=acc) if weighted else None
    forward_psw = psw
    expected = reference.embedding_bag_forward(weight, indices, offsets, psw, pooling)
    got = target.ops.embedding_bag_forward(*target.to(weight, indices, offsets, psw),
                                           int(pooling))
    assert got.dtype == acc and got.shape == (num_bags, dim)
    assert_close(got, expected, acc)
    grad_output = torch.randn(num_bags, dim, generator=gen, dtype=acc)
    if dtype != torch.float64 and seed % 2 == 1:
        grad_output = grad_output.to(dtype)  # a half gradient, as a half model produces
        psw = None if psw is None else psw.to(dtype)
    exp_rows = reference.embedding_bag_backward(grad_output, indices, offsets, psw, pooling)
    got_rows = target.ops.embedding_bag_backward(*target.to(grad_output, indices, offsets, psw),
                                                 int(pooling))
    assert got_rows.dtype == grad_output.dtype and got_rows.shape == (indices.numel(), dim)
    torch.testing.assert_close(got_rows.cpu(), exp_rows, **bag_tolerance(grad_output.dtype))
    native = native_cpu_ops()
    if native is not None:
        assert torch.equal(got.cpu(), native.embedding_bag_forward(
            weight, indices, offsets, forward_psw, int(pooling)))
        assert torch.equal(got_rows.cpu(), native.embedding_bag_backward(
            grad_output, indices, offsets, psw, int(pooling)))
    target.check_errors()


def _row_settings(optimizer, decay, step=3, seed=77, stochastic=True):
    return (int(optimizer), 0.05, 1e-3, 0.8, 0.95, 0.01 if decay else 0.0,
            int(decay), step, seed, stochastic)


def doubled(*tensors):
    """Floating tensors as float64 (ids, offsets and None as they are)."""
    return tuple(t.double() if t is not None and t.is_floating_point() else t
                 for t in tensors)


def check_bag_step_pair(target, optimizer, dtype, *, pooling=Pooling.SUM,
                        id_dtype=torch.int64, num_rows=40, num_bags=30, dim=8, seed=0):
    """embedding_bag_backward_update_pair (a table and a one-column table over the same
    bags, as Hybrid's table and bias) against embedding_bag_backward_update on each, bit for
    bit on the same target, each table with its own step and seed; and against the native
    CPU pair where built."""
    optimizer = Optimizer[optimizer.upper()] if isinstance(optimizer, str) else optimizer
    pooling = Pooling(pooling)
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    indices, offsets = make_bags(num_rows, num_bags, seed=seed, id_dtype=id_dtype)
    psw = (torch.rand(indices.numel(), generator=gen, dtype=acc) if pooling == Pooling.SUM
           else None)
    tables, grads = [], []
    for width in (dim, 1):
        weight = _table(num_rows, width, dtype, gen)
        tables.append([weight] + [None if sh is None else torch.rand(sh, generator=gen,
                                                                      dtype=acc)
                                  for sh in row_state_shapes(optimizer, weight)])
        grads.append(torch.randn(num_bags, width, generator=gen, dtype=acc))
    settings = _row_settings(optimizer, WeightDecay.L2)[:7]
    own = ((3, 77, True), (4, 78, True))
    bags = (indices, offsets, psw)
    pair = [list(target.to(*clone_all(*t))) for t in tables]
    target.ops.embedding_bag_backward_update_pair(
        *pair[0], *target.to(grads[0]), *pair[1], *target.to(grads[1]), *target.to(*bags),
        int(pooling), *settings, *own[0], *own[1])
    single = [list(target.to(*clone_all(*t))) for t in tables]
    for t, g, o in zip(single, grads, own):
        target.ops.embedding_bag_backward_update(*t, *target.to(g), *target.to(*bags),
                                                 int(pooling), *settings, *o)
    target.check_errors()
    native = native_cpu_ops()
    mirror = None
    if native is not None:
        mirror = [list(clone_all(*t)) for t in tables]
        native.embedding_bag_backward_update_pair(*mirror[0], grads[0], *mirror[1], grads[1],
                                                  *bags, int(pooling), *settings, *own[0],
                                                  *own[1])
    for k in range(2):
        assert not torch.equal(pair[k][0].cpu(), tables[k][0])
        for i, (p, s) in enumerate(zip(pair[k], single[k])):
            assert (p is None) == (s is None)
            if p is not None:
                assert torch.equal(p.cpu(), s.cpu())
                if mirror is not None:
                    assert torch.equal(p.cpu(), mirror[k][i]), "differs from the native CPU pair"


def check_bag_step(target, optimizer, dtype, *, fused=True, pooling=Pooling.SUM,
                   weighted=True, decay=WeightDecay.L2, id_dtype=torch.int64, num_rows=40,
                   num_bags=30, dim=8, exponent=1.0, max_size=6, half_grad=False, seed=0,
                   steps=2):
    """`steps` steps of embedding_bag_backward_update (fused) or sparse_update on Zipf bags,
    against the reference (and, bit for bit, the native CPU kernel): weight and states."""
    optimizer, pooling, decay = Optimizer[optimizer.upper()] if isinstance(
        optimizer, str) else optimizer, Pooling(pooling), WeightDecay(decay)
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    weight = _table(num_rows, dim, dtype, gen)
    shapes = row_state_shapes(optimizer, weight)
    states = [None if sh is None else torch.rand(sh, generator=gen, dtype=acc) for sh in shapes]
    expected = [weight.clone()] + [None if t is None else t.clone() for t in states]
    # Where the sums are float32 (float32 and half tables), the reference also runs in
    # float64 on the same inputs: the exact target (assert_close_to_exact).
    wide = acc == torch.float32
    exact = [t if t is None else t.double() for t in expected] if wide else None
    got = list(target.to(*clone_all(weight, *states)))
    native = native_cpu_ops()
    mirror = [weight.clone()] + [None if t is None else t.clone() for t in states]
    grad_dtype = dtype if half_grad else acc
    for step in range(1, steps + 1):
        indices, offsets = make_bags(num_rows, num_bags, seed=seed * 100 + step,
                                     id_dtype=id_dtype, max_size=max_size, exponent=exponent)
        settings = _row_settings(optimizer, decay, step=step)
        psw = (torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(grad_dtype)
               if weighted and pooling == Pooling.SUM else None)
        if fused:
            grad_output = torch.randn(num_bags, dim, generator=gen,
                                      dtype=torch.float64).to(grad_dtype)
            args = (grad_output, indices, offsets, psw)
            reference.embedding_bag_backward_update(*expected, *args, pooling, *settings)
            if wide:
                reference.embedding_bag_backward_update(*exact, *doubled(*args), pooling,
                                                        *settings)
            target.ops.embedding_bag_backward_update(*got, *target.to(*args), int(pooling),
                                                     *settings)
            if native is not None:
                native.embedding_bag_backward_update(*mirror, *args, int(pooling), *settings)
        else:
            grad_rows = torch.randn(indices.numel(), dim, generator=gen,
                                    dtype=torch.float64).to(grad_dtype)
            reference.sparse_update(*expected, indices, grad_rows, *settings)
            if wide:
                reference.sparse_update(*exact, indices, grad_rows.double(), *settings)
            target.ops.sparse_update(*got, *target.to(indices, grad_rows), *settings)
            if native is not None:
                native.sparse_update(*mirror, indices, grad_rows, *settings)
    target.check_errors()
    assert not torch.equal(got[0].cpu(), weight)
    for i, (name, g, e, m) in enumerate(zip(("weight", "state1", "state2"), got, expected,
                                            mirror)):
        if e is None:
            assert g is None
            continue
        if native is not None:
            assert torch.equal(g.cpu(), m), f"{name} differs from the native CPU kernel"
        if wide and e.dtype == torch.float32:
            assert_close_to_exact(name, g, e, exact[i], e.dtype)
        else:  # float64, and half weights (their tolerance is a half's rounding)
            torch.testing.assert_close(g.cpu(), e, **bag_tolerance(e.dtype),
                                       msg=lambda msg, n=name: f"{n}: {msg}")


def check_bag_step_1d(target, optimizer, dtype=torch.float32, seed=0):
    """sparse_update on a 1-D table (biases): row-wise variants act element-wise."""
    optimizer = Optimizer[optimizer.upper()]
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(25, generator=gen, dtype=dtype)
    shapes = row_state_shapes(optimizer, weight)
    states = [None if sh is None else torch.rand(sh, generator=gen, dtype=dtype)
              for sh in shapes]
    ids = zipf_ids(25, 60, generator=np.random.default_rng(seed))
    grad = torch.randn(60, generator=gen, dtype=dtype)
    settings = _row_settings(optimizer, WeightDecay.DECOUPLED)
    expected = [weight.clone()] + [None if t is None else t.clone() for t in states]
    got = list(target.to(*clone_all(weight, *states)))
    reference.sparse_update(*expected, ids, grad, *settings)
    target.ops.sparse_update(*got, *target.to(ids, grad), *settings)
    for g, e in zip(got, expected):
        if e is not None:
            assert_close(g, e, dtype)


def check_bag_empty(target, dtype=torch.float32):
    """No indices: zero bags for the forward, nothing written by the steps."""
    weight = target.to(torch.randn(10, 4, dtype=dtype))[0]
    indices = target.to(torch.zeros(0, dtype=torch.int64))[0]
    offsets = target.to(torch.zeros(4, dtype=torch.int64))[0]
    out = target.ops.embedding_bag_forward(weight, indices, offsets, None, int(Pooling.MEAN))
    assert out.shape == (3, 4) and not out.cpu().any()
    rows = target.ops.embedding_bag_backward(target.to(torch.randn(3, 4))[0], indices, offsets,
                                             None, int(Pooling.SUM))
    assert rows.shape == (0, 4)
    before = weight.clone()
    settings = _row_settings(Optimizer.SGD, WeightDecay.DECOUPLED)
    target.ops.embedding_bag_backward_update(weight, None, None,
                                             target.to(torch.randn(3, 4))[0], indices, offsets,
                                             None, int(Pooling.SUM), *settings)
    target.ops.sparse_update(weight, None, None, indices, target.to(torch.randn(0, 4))[0],
                             *settings)
    assert torch.equal(weight, before)
    target.check_errors()


def check_bag_twice_bitwise(target, optimizer, dtype, **kw):
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        weight = _table(6, 8, dtype, gen)
        shapes = row_state_shapes(Optimizer[optimizer.upper()], weight)
        tables = list(target.to(weight, *[None if sh is None else torch.rand(
            sh, generator=gen, dtype=acc_dtype(dtype)) for sh in shapes]))
        indices, offsets = make_bags(6, 900, seed=4, exponent=1.5, max_size=8)
        grad_output = torch.randn(900, 8, generator=gen, dtype=acc_dtype(dtype))
        target.ops.embedding_bag_backward_update(
            *tables, *target.to(grad_output, indices, offsets, None), int(Pooling.MEAN),
            *_row_settings(Optimizer[optimizer.upper()], WeightDecay.L2))
        outs.append(cpu(*tables))
    for a, b in zip(*outs):
        assert (a is None and b is None) or torch.equal(a, b)


def check_bag_bad_ids(target, id_dtype=torch.int64):
    """A bad id: its forward bag is NaN (the others exact), the steps leave its occurrences
    out, and check_errors raises the CPU kernel's IndexError."""
    clear_errors(target)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(20, 8, generator=gen)
    indices = torch.tensor([3, 25, 3, 7, -2, 19, 3], dtype=id_dtype)
    offsets = torch.tensor([0, 2, 3, 5, 7], dtype=id_dtype)
    out = target.ops.embedding_bag_forward(*target.to(weight, indices, offsets, None),
                                           int(Pooling.SUM)).cpu()
    assert torch.isnan(out[[0, 2]]).all()
    assert torch.equal(out[1], weight[3]) and torch.equal(out[3], weight[19] + weight[3])
    with pytest.raises(IndexError, match=r"fastmf\.embedding_bag_forward: indices id (25|-2) "
                                         r"out of range \[0, 20\)"):
        target.check_errors()
    keep = (indices >= 0) & (indices < 20)
    grad_output = torch.randn(4, 8, generator=gen)
    settings = _row_settings(Optimizer.ADAGRAD, WeightDecay.NONE, stochastic=False)
    state = torch.rand(20, 8, generator=gen)
    exp_w, exp_s = weight.clone(), state.clone()
    rows = reference.embedding_bag_backward(grad_output, indices, offsets, None, "sum")
    reference.sparse_update(exp_w, exp_s, None, indices[keep], rows[keep], *settings)
    got_w, got_s = target.to(weight.clone(), state.clone())
    target.ops.embedding_bag_backward_update(got_w, got_s, None,
                                             *target.to(grad_output, indices, offsets, None),
                                             int(Pooling.SUM), *settings)
    assert_close(got_w, exp_w, torch.float32)
    assert_close(got_s, exp_s, torch.float32)
    with pytest.raises(IndexError, match=r"fastmf\.embedding_bag_backward_update: indices id "
                                         r"(25|-2) out of range"):
        target.check_errors()
    got_w, got_s = target.to(weight.clone(), state.clone())
    target.ops.sparse_update(got_w, got_s, None, *target.to(indices, rows), *settings)
    assert_close(got_w, exp_w, torch.float32)
    with pytest.raises(IndexError, match=r"fastmf\.sparse_update: ids id (25|-2) out of range"):
        target.check_errors()
    target.check_errors()  # cleared


BAD_OFFSETS = {
    "start": ([1, 2, 4], r"offsets must start at 0, got offsets\[0\] = 1"),
    "order": ([0, 3, 2, 4], r"offsets must be non-decreasing, got 3 then 2 at offsets\[1\], "
                            r"offsets\[2\]"),
    "past_end": ([0, 2, 5], r"offsets\[2\] = 5 is past the end of indices \(4 ids\)"),
    "short": ([0, 2, 3], r"the last offset must equal the number of indices \(4\), got "
                         r"offsets\[2\] = 3"),
}


def check_bag_bad_offsets(target, case):
    """Bad offsets: the forward is all NaN, the backward all zeros, a step writes nothing;
    check_errors raises the CPU kernel's ValueError."""
    clear_errors(target)
    values, message = BAD_OFFSETS[case]
    weight = torch.randn(10, 4)
    indices = torch.tensor([1, 2, 3, 4])
    offsets = torch.tensor(values)
    num_bags = len(values) - 1
    out = target.ops.embedding_bag_forward(*target.to(weight, indices, offsets, None),
                                           int(Pooling.SUM))
    assert out.shape == (num_bags, 4) and torch.isnan(out.cpu()).all()
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_forward: " + message):
        target.check_errors()
    rows = target.ops.embedding_bag_backward(*target.to(torch.randn(num_bags, 4), indices,
                                                        offsets, None), int(Pooling.MEAN))
    assert rows.shape == (4, 4) and not rows.cpu().any()
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_backward: " + message):
        target.check_errors()
    got = target.to(weight.clone())[0]
    target.ops.embedding_bag_backward_update(
        got, None, None, *target.to(torch.randn(num_bags, 4), indices, offsets, None),
        int(Pooling.SUM), *_row_settings(Optimizer.SGD, WeightDecay.NONE))
    assert torch.equal(got.cpu(), weight)
    with pytest.raises(ValueError, match=r"fastmf\.embedding_bag_backward_update: " + message):
        target.check_errors()
    target.check_errors()


def check_scatter_rows(target, dtype, *, id_dtype=torch.int64, num_rows=30, length=300,
                       dim=8, exponent=1.0, seed=0):
    """scatter_rows on Zipf ids (dim 0: 1-D rows) against the reference, which sums in index
    order; bit for bit where no row is hit more than kHotChunk (2048) times, as the CUDA
    registration sums such runs chunk by chunk. Also the native CPU kernel, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = zipf_ids(num_rows, length, exponent=exponent, generator=rng, dtype=id_dtype)
    shape = (length, dim) if dim else (length,)
    rows = torch.randn(shape, generator=gen, dtype=acc_dtype(dtype)).to(dtype)
    expected = reference.scatter_rows(ids, rows, num_rows)
    got = target.ops.scatter_rows(*target.to(ids, rows), num_rows).cpu()
    assert got.dtype == dtype and got.shape == (num_rows,) + shape[1:]
    hot = length and int(torch.bincount(ids.long()).max()) > 2048
    if hot:
        torch.testing.assert_close(got, expected, **bag_tolerance(dtype))
    else:
        assert torch.equal(got, expected)
    native = native_cpu_ops()
    if native is not None and not hot:
        assert torch.equal(got, native.scatter_rows(ids, rows, num_rows))
    target.check_errors()
