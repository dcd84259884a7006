"""fastmf.optim on fastmf.nn tables: 20 unfused and 20 fused (apply_in_backward) steps
against torch.optim.SGD / Adagrad / SparseAdam on textbook modules with identical initial
weights; weight decay (dense: torch's numbers; sparse: touched rows, against a hand-written
loop); the row-wise variants against their formulas; bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastmf
from fastmf.ops import reference
from fastmf.testing import BACKENDS, ID_DTYPES, tolerance, zipf_ids

N, K, STEPS = 50, 8, 20
TOL = tolerance(torch.float32)


def _batch(rng, size, id_dtype=torch.int64):
    ids = zipf_ids(N, size, generator=rng, dtype=id_dtype)
    return ids, torch.from_numpy(rng.uniform(-1, 1, size)).float()


def _loss(out, targets, proj):
    return ((out * proj).sum(1) - targets).pow(2).mean()


TORCH_OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.2),
            lambda p: fastmf.optim.SparseSGD(p, lr=0.2)),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.2),
                lambda p: fastmf.optim.SparseAdagrad(p, lr=0.2)),
    "adam": (lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.99)),
             lambda p: fastmf.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.99))),
}


def twins(name: str, fused: bool, module: str = "Embedding", backend: str = "auto"):
    """(ours, theirs, opt_ours, opt_theirs): a fastmf table and torch's sparse one from the
    same weights, each with optimizer ``name`` (ours in backward when ``fused``)."""
    torch.manual_seed(0)
    if module == "Embedding":
        ours = fastmf.nn.Embedding(N, K, backend=backend)
        theirs = torch.nn.Embedding(N, K, sparse=True)
    else:
        ours = fastmf.nn.EmbeddingBag(N, K, "mean", backend=backend)
        theirs = torch.nn.EmbeddingBag(N, K, mode="mean", sparse=True)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    make_torch, make_ours = TORCH_OPTIMIZERS[name]
    opt_theirs, opt_ours = make_torch(theirs.parameters()), make_ours(ours.parameters())
    if fused:
        fastmf.optim.apply_in_backward(opt_ours)
    return ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("module", ["Embedding", "EmbeddingBag"])
def test_twenty_steps_match_torch(backend, name, fused, id_dtype, module):
    ours, theirs, opt_ours, opt_theirs = twins(name, fused, module, backend)
    rng = np.random.default_rng(1)
    proj = torch.randn(K)
    for step in range(STEPS):
        size = 0 if step == 3 else 64  # an empty batch still counts as a step (torch too)
        ids, targets = _batch(rng, size * 3 if module == "EmbeddingBag" else size, id_dtype)
        if module == "EmbeddingBag":
            offsets = torch.arange(0, ids.numel(), 3, dtype=id_dtype)
            targets = targets[:size]
            calls = ((ours, (ids, offsets)), (theirs, (ids, offsets)))
        else:
            calls = ((ours, (ids,)), (theirs, (ids,)))
        for (m, args), opt in zip(calls, (opt_ours, opt_theirs)):
            opt.zero_grad()
            _loss(m(*args), targets, proj).backward()
            opt.step()
        if fused:
            assert ours.weight.grad is None
    torch.testing.assert_close(ours.weight.detach(), theirs.weight.detach(), **TOL)
    state_ours, state_theirs = opt_ours.state[ours.weight], opt_theirs.state[theirs.weight]
    for key in ("sum", "exp_avg", "exp_avg_sq"):
        if key in state_theirs:
            torch.testing.assert_close(state_ours[key], state_theirs[key], **TOL)
    if name == "adam":
        assert state_ours["step"] == state_theirs["step"] == STEPS


# --- weight decay ---------------------------------------------------------------------------

DENSE_WITH_DECAY = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
            lambda p: fastmf.optim.SparseSGD(p, lr=0.1, weight_decay=0.05)),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.05),
                lambda p: fastmf.optim.SparseAdagrad(p, lr=0.1, weight_decay=0.05)),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
             lambda p: fastmf.optim.SparseAdam(p, lr=0.01, weight_decay=0.05)),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
              lambda p: fastmf.optim.SparseAdam(p, lr=0.01, weight_decay=0.05,
                                                decoupled_weight_decay=True)),
}


@pytest.mark.parametrize("name", list(DENSE_WITH_DECAY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_gradients_give_torch_numbers(name, dtype):
    """Dense gradients (an MLP, or a table used through F.linear) step as torch's optimizer
    with the same weight decay, including a 1-D and a 0-D parameter."""
    torch.manual_seed(3)
    params = [torch.randn(6, 4, dtype=dtype), torch.randn(4, dtype=dtype),
              torch.randn((), dtype=dtype)]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    make_torch, make_ours = DENSE_WITH_DECAY[name]
    opt_ours, opt_theirs = make_ours(ours), make_torch(theirs)
    x = torch.randn(16, 6, dtype=dtype)
    for _ in range(STEPS):
        for ps, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ((x @ ps[0] + ps[1]) * ps[2]).tanh().pow(2).sum().backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance(dtype))


def _hand_written_step(weight, states, ids, grad_rows, name, lr, eps, betas, decay, decoupled,
                       step):
    """One sparse step written as a loop over the unique ids (float64)."""
    w = weight.double().clone()
    states = [None if s is None else s.double().clone() for s in states]
    b1, b2 = betas
    for r in sorted(set(ids.tolist())):
        g = grad_rows[ids == r].double().sum(0)
        if decay and not decoupled:
            g = g + decay * w[r]
        if decay and decoupled:
            w[r] = w[r] - lr * decay * w[r]
        if name == "sgd":
            w[r] -= lr * g
        elif name == "adagrad":
            states[0][r] += g * g
            w[r] -= lr * g / (states[0][r].sqrt() + eps)
        elif name == "rowwise_adagrad":
            states[0][r] += (g * g).mean()
            w[r] -= lr * g / (states[0][r].sqrt() + eps)
        elif name == "adam":
            states[0][r] = b1 * states[0][r] + (1 - b1) * g
            states[1][r] = b2 * states[1][r] + (1 - b2) * g * g
            size = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
            w[r] -= size * states[0][r] / (states[1][r].sqrt() + eps)
        else:  # rowwise_adam (FBGEMM PARTIAL_ROWWISE_ADAM)
            states[0][r] = b1 * states[0][r] + (1 - b1) * g
            states[1][r] = b2 * states[1][r] + (1 - b2) * (g * g).mean()
            v_hat = states[1][r] / (1 - b2 ** step)
            w[r] -= lr / (1 - b1 ** step) * states[0][r] / (v_hat.sqrt() + eps)
    return w, states


def _fastmf_optimizer(name, params, decay, decoupled=False, backend="reference"):
    if name == "sgd":
        return fastmf.optim.SparseSGD(params, lr=0.1, weight_decay=decay, backend=backend)
    if name in ("adagrad", "rowwise_adagrad"):
        return fastmf.optim.SparseAdagrad(params, lr=0.1, eps=1e-6, weight_decay=decay,
                                          rowwise=name == "rowwise_adagrad", backend=backend)
    return fastmf.optim.SparseAdam(params, lr=0.05, betas=(0.8, 0.95), eps=1e-6,
                                   rowwise=name == "rowwise_adam", weight_decay=decay,
                                   decoupled_weight_decay=decoupled, backend=backend)


NAMES = ["sgd", "adagrad", "rowwise_adagrad", "adam", "rowwise_adam"]


# decoupled weight decay is a SparseAdam option
DECAY_CASES = [(name, decay) for name in NAMES for decay in (0.0, 0.1)] + [
    ("adam", "decoupled"), ("rowwise_adam", "decoupled")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,decay", DECAY_CASES)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_sparse_steps_match_hand_written_loop(backend, name, decay, fused):
    """Every optimizer, with and without (L2 / decoupled) weight decay, fused or not: the
    touched rows change as the loop says, the others do not change at all."""
    decoupled = decay == "decoupled"
    decay = 0.1 if decoupled else decay
    torch.manual_seed(5)
    emb = fastmf.nn.Embedding(N, K, backend=backend)
    opt = _fastmf_optimizer(name, emb.parameters(), decay, decoupled, backend)
    if fused:
        fastmf.optim.apply_in_backward(opt)
    group = opt.param_groups[0]
    rng = np.random.default_rng(6)
    for step in range(1, 6):
        ids, targets = _batch(rng, 40)
        upstream = torch.randn(40, K)
        before = emb.weight.detach().clone()
        states = [t.clone() if isinstance(t, torch.Tensor) else None
                  for t in _states(opt, emb.weight)]
        grad_rows = upstream  # d(sum(out * upstream))/d(row) = upstream
        expected, expected_states = _hand_written_step(
            before, states, ids, grad_rows, name, group["lr"], group.get("eps", 0.0),
            group.get("betas", (0.9, 0.999)), decay, decoupled, step)
        opt.zero_grad()
        (emb(ids) * upstream).sum().backward()
        opt.step()
        torch.testing.assert_close(emb.weight.detach().double(), expected, **TOL)
        for got, want in zip(_states(opt, emb.weight), expected_states):
            if want is not None:
                torch.testing.assert_close(got.double(), want, **TOL)
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[ids] = False
        assert torch.equal(emb.weight.detach()[untouched], before[untouched])


def _states(opt, weight):
    state = opt.state[weight]
    if "sum" in state:
        return state["sum"], None
    if "exp_avg" in state:
        return state["exp_avg"], state["exp_avg_sq"]
    return None, None


@pytest.mark.parametrize("name", NAMES)
def test_rowwise_memory_and_state_dtypes(name):
    """State per row: Adagrad K, row-wise Adagrad 1, Adam 2K, row-wise Adam K + 1; float32
    for half tables."""
    emb = fastmf.nn.Embedding(N, K, dtype=torch.float16)
    opt = _fastmf_optimizer(name, emb.parameters(), 0.0)
    states = [s for s in _states(opt, emb.weight) if s is not None]
    per_row = sum(s.numel() for s in states) // N
    assert per_row == {"sgd": 0, "adagrad": K, "rowwise_adagrad": 1, "adam": 2 * K,
                       "rowwise_adam": K + 1}[name]
    assert all(s.dtype == torch.float32 for s in states)


def _ulp(values, dtype):
    """The spacing of ``dtype`` (float16/bfloat16, normal range) at each float64 value."""
    mantissa_bits = 10 if dtype == torch.float16 else 7
    exponent = torch.floor(torch.log2(values.abs().clamp(min=2.0 ** -14)))
    return torch.pow(2.0, exponent - mantissa_bits)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [True, False])
def test_half_tables_step_in_float32(name, dtype, stochastic):
    """A half table's fused step is the float32 step of its rows written back to one of the
    two neighbouring half values (stochastic rounding; reproducible with the module's seed),
    or to the nearest one (stochastic_rounding=False)."""
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        emb = fastmf.nn.Embedding(N, K, dtype=dtype, stochastic_rounding=stochastic)
        opt = fastmf.optim.apply_in_backward(_fastmf_optimizer(name, emb.parameters(), 0.0))
        ids = zipf_ids(N, 30, generator=np.random.default_rng(8))
        upstream = torch.randn(30, K, generator=torch.Generator().manual_seed(9))
        before = emb.weight.detach().clone()
        states = [None if s is None else s.clone() for s in _states(opt, emb.weight)]
        group = opt.param_groups[0]
        expected, _ = _hand_written_step(before, states, ids, upstream, name, group["lr"],
                                         group.get("eps", 0.0), group.get("betas", (0.9, 0.999)),
                                         0.0, False, 1)
        (emb(ids) * upstream).sum().backward()
        got = emb.weight.detach().double()
        # one of the two neighbours (stochastic) or the nearest; 1e-3 ulp of slack for the
        # float32 arithmetic against this float64 loop
        bound = _ulp(expected, dtype) * (1.001 if stochastic else 0.501)
        assert bool(((got - expected).abs() <= bound).all())
        results.append(got)
    assert torch.equal(results[0], results[1])


# --- bad settings and misuse: clear errors, nothing written --------------------------------

@pytest.mark.parametrize("setting", ["lr", "eps", "beta1", "beta2", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_bad_settings_write_nothing(setting, value, fused):
    emb = fastmf.nn.Embedding(N, K)
    opt = fastmf.optim.SparseAdam(emb.parameters(), lr=0.01)
    if fused:
        fastmf.optim.apply_in_backward(opt)
    group = opt.param_groups[0]
    if setting.startswith("beta"):
        betas = list(group["betas"])
        betas[int(setting[-1]) - 1] = value
        group["betas"] = tuple(betas)
    else:
        group[setting] = value
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"fastmf\.SparseAdam\.step: {setting} must be"):
        emb(torch.tensor([1, 2, 2])).sum().backward()
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert opt.state[emb.weight].get("step", 0) == 0
    with pytest.raises(ValueError, match=rf"fastmf\.SparseAdam: {setting} must be"):
        kw = {"betas": (value, 0.9) if setting == "beta1" else (0.9, value)} \
            if setting.startswith("beta") else {setting: value}
        fastmf.optim.SparseAdam(emb.parameters(), **kw)


def test_beta_of_one_is_refused():
    emb = fastmf.nn.Embedding(N, K)
    with pytest.raises(ValueError, match=r"fastmf\.SparseAdam: beta2 must be in \[0, 1\), "
                                         "got 1.0"):
        fastmf.optim.SparseAdam(emb.parameters(), betas=(0.9, 1.0))


def test_apply_in_backward_misuse():
    emb = fastmf.nn.Embedding(N, K)
    with pytest.raises(TypeError, match=r"apply_in_backward: optimizer must be a fastmf\.optim "
                                        "sparse optimizer.*got Adagrad"):
        fastmf.optim.apply_in_backward(torch.optim.Adagrad(emb.parameters()))
    with pytest.raises(ValueError, match="holds no fastmf.nn Embedding/EmbeddingBag weight"):
        fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD([torch.nn.Parameter(
            torch.rand(3))]))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        twice = fastmf.optim.SparseSGD([emb.weight, emb.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"holds the Embedding\(50, 8\) weight twice"):
        fastmf.optim.apply_in_backward(twice)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"the Embedding\(50, 8\) weight is already updated "
                                           "in backward"):
        fastmf.optim.apply_in_backward(opt)
    with pytest.raises(RuntimeError, match="already updated in backward"):
        fastmf.optim.apply_in_backward(fastmf.optim.SparseAdam(emb.parameters()))
    # the failed calls changed nothing: the first optimizer still owns the weight
    before = emb.weight.detach().clone()
    emb(torch.tensor([4])).sum().backward()
    torch.testing.assert_close(emb.weight.detach()[4], before[4] - 0.1)


def test_deleted_optimizer_returns_the_weight_to_sparse_gradients():
    emb = fastmf.nn.Embedding(N, K)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.1))
    del opt
    emb(torch.tensor([4, 4])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse


def test_step_with_every_weight_updated_in_backward(monkeypatch):
    """step() returns at once when an optimizer in backward holds every weight (the fused
    updates ran in the backward pass), unless a step hook is registered (on the optimizer
    or for all optimizers) or a closure is given; an LR scheduler sees its steps."""
    import warnings

    rng = np.random.default_rng(3)
    emb = fastmf.nn.Embedding(N, K)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(emb.parameters(), lr=0.1))
    wrapped = []
    real = opt._hooked_step
    monkeypatch.setattr(opt, "_hooked_step", lambda closure=None: (wrapped.append(1),
                                                                   real(closure))[1])

    def train_step():
        ids, targets = _batch(rng, 16, torch.int32)
        before = emb.weight.detach().clone()
        ((emb(ids).sum(1) - targets) ** 2).mean().backward()
        assert not torch.equal(emb.weight.detach(), before)  # stepped in backward
        assert opt.step() is None
        opt.zero_grad()

    train_step()
    assert wrapped == [] and opt.state[emb.weight]["step"] == 1
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    train_step()
    assert seen == ["pre", "post"] and len(wrapped) == 1
    pre.remove()
    post.remove()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append("global"))
    try:
        train_step()
    finally:
        handle.remove()
    assert seen == ["pre", "post", "global"] and len(wrapped) == 2
    train_step()
    assert len(wrapped) == 2 and opt.state[emb.weight]["step"] == 4
    assert opt.step(lambda: torch.tensor(2.5)) == 2.5 and len(wrapped) == 3
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            train_step()
            scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_zero_grad_and_step_of_a_partly_fused_optimizer():
    """An optimizer holding a weight updated in backward and a dense parameter steps the
    dense one as torch.optim.Adagrad does; zero_grad() clears every .grad (set_to_none, the
    default) or zeroes it."""
    torch.manual_seed(0)
    emb = fastmf.nn.Embedding(N, K)
    dense = torch.nn.Parameter(torch.randn(K))
    twin = torch.nn.Parameter(dense.detach().clone())
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(
        [{"params": [emb.weight]}, {"params": [dense]}], lr=0.1))
    ref = torch.optim.Adagrad([twin], lr=0.1)
    ids = torch.tensor([3, 7, 7, 41])
    for _ in range(3):
        rows = emb(ids)
        (rows.detach().clone() @ twin).square().sum().backward()
        (rows @ dense).square().sum().backward()  # also steps emb's rows in backward
        assert emb.weight.grad is None
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        assert dense.grad is None
    torch.testing.assert_close(dense.detach(), twin.detach(), rtol=0, atol=0)
    emb.weight.grad = torch.rand(N, K)  # set by hand: cleared too
    dense.grad = torch.rand(K)
    opt.zero_grad(set_to_none=False)
    assert not emb.weight.grad.any() and not dense.grad.any()
    opt.zero_grad()
    assert emb.weight.grad is None and dense.grad is None


@pytest.mark.parametrize("name", ["adagrad", "adam"])
@pytest.mark.parametrize("groups", ["one", "two"])
def test_apply_fused_pair_equals_two_updates(name, groups, monkeypatch):
    """apply_fused_pair (a table and its bias column over the same bags, one kernel call
    when both are in one group) leaves the weights, states and step counts that
    apply_fused on each leaves; with the two in different groups (here different lr) it
    applies each group's settings."""
    from fastmf.ops.codes import Pooling

    rng = np.random.default_rng(11)
    make = TORCH_OPTIMIZERS[name][1]

    def build():
        torch.manual_seed(0)
        table, bias = fastmf.nn.EmbeddingBag(N, K), fastmf.nn.EmbeddingBag(N, 1)
        params = ([{"params": [table.weight, bias.weight]}] if groups == "one" else
                  [{"params": [table.weight]}, {"params": [bias.weight], "lr": 0.01}])
        return table, bias, fastmf.optim.apply_in_backward(make(params))

    pair, two = build(), build()
    kernels = pair[2].fused_kernels(torch.device("cpu"))
    calls = []
    real = kernels.embedding_bag_backward_update_pair
    monkeypatch.setattr(kernels, "embedding_bag_backward_update_pair",
                        lambda *args: (calls.append(1), real(*args)))
    for _ in range(3):
        ids = zipf_ids(N, 90, generator=rng)
        offsets = torch.arange(0, 91, 3)
        psw = torch.from_numpy(rng.uniform(0.5, 1.5, 90)).float()
        grad = torch.randn(30, K, dtype=torch.float32)
        grad_b = torch.randn(30, 1, dtype=torch.float32)
        bags = (ids, offsets, psw, Pooling.SUM)
        table, bias, opt = pair
        opt.apply_fused_pair(table.weight, grad, bias.weight, grad_b, *bags)
        table, bias, opt = two
        opt.apply_fused(table.weight, grad, *bags)
        opt.apply_fused(bias.weight, grad_b, *bags)
    (t1, b1, o1), (t2, b2, o2) = pair, two
    for w1, w2 in ((t1.weight, t2.weight), (b1.weight, b2.weight)):
        assert torch.equal(w1, w2) and o1.state[w1]["step"] == o2.state[w2]["step"] == 3
        for s1, s2 in zip(o1.states(w1), o2.states(w2)):
            assert (s1 is None and s2 is None) or torch.equal(s1, s2)
    assert len(calls) == (3 if groups == "one" else 0)  # one call a step for one group
    fresh = build()
    assert not torch.equal(b1.weight, fresh[1].weight)
    assert not torch.equal(t1.weight, fresh[0].weight)


def test_fused_mf_step_refuses_adam_codes_and_weight_decay():
    from fastmf.ops import MFTables, Optimizer, OptimizerArgs

    tables = MFTables(torch.rand(4, 2), torch.rand(3, 2))
    states = MFTables(torch.rand(4, 2), torch.rand(3, 2))
    u, i, t = torch.tensor([0, 1]), torch.tensor([2, 0]), torch.rand(2)
    for code in (Optimizer.ADAM, Optimizer.ROWWISE_ADAM):
        with pytest.raises(ValueError, match=rf"fastmf\.train_step: unknown optimizer code "
                                             rf"{int(code)}; expected 0\.\.2"):
            reference.train_step(tables, states, u, i, t, 0.0, "mse", 0.0,
                                 OptimizerArgs(code, 0.1, 1e-8))
    model = fastmf.MF(4, 3, dim=2, sparse=True)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"fastmf\.train_step: the fused MF step has no "
                                         "weight_decay"):
        fastmf.train_step(model, opt, u, i, t)


# --- copies, hooks, registry identity, fully sparse gradients, dtype changes, betas ------

SPARSE_CLASSES = {"sgd": lambda p: fastmf.optim.SparseSGD(p, lr=0.2),
                  "adagrad": lambda p: fastmf.optim.SparseAdagrad(p, lr=0.2),
                  "adam": lambda p: fastmf.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.99))}


def _copy(obj, how):
    import copy
    import io
    import pickle

    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _train(rng, emb, opt, head=None):
    ids, targets = _batch(rng, 16)
    out = emb(ids)
    pred = head(out).squeeze(1) if head is not None else out.sum(1)
    ((pred - targets) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", list(SPARSE_CLASSES))
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_copied_optimizer_steps_like_the_original(how, name, fused):
    """A copy keeps the backend, steps (it is not in backward: its weights are new objects)
    and gives the numbers the original gives on the same batches."""
    torch.manual_seed(0)
    emb = fastmf.nn.Embedding(N, K, backend="reference")
    opt = SPARSE_CLASSES[name](emb.parameters())
    opt.backend = "reference"
    if fused:
        fastmf.optim.apply_in_backward(opt)
    rng = np.random.default_rng(5)
    _train(rng, emb, opt)
    emb2, opt2 = _copy((emb, opt), how)
    assert opt2.backend == "reference" and opt2.param_groups[0]["params"][0] is emb2.weight
    assert fastmf.nn.embedding.fused_optimizer(emb2.weight) is None
    for seed in (6, 7):
        _train(np.random.default_rng(seed), emb, opt)
        _train(np.random.default_rng(seed), emb2, opt2)
        torch.testing.assert_close(emb2.weight.detach(), emb.weight.detach(), **TOL)
        for key, value in opt.state[emb.weight].items():
            torch.testing.assert_close(opt2.state[emb2.weight][key], value, **TOL)
    fastmf.optim.apply_in_backward(opt2)  # and a copy can be put in backward in turn
    _train(np.random.default_rng(8), emb2, opt2)
    assert emb2.weight.grad is None


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copied_combined_optimizer_works(how):
    torch.manual_seed(0)
    emb, head = fastmf.nn.Embedding(N, K), torch.nn.Linear(K, 1)
    c = fastmf.optim.CombinedOptimizer([
        fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(emb.parameters(), lr=0.1)),
        torch.optim.Adam(head.parameters(), lr=0.01)])
    c.register_step_pre_hook(lambda o, args, kwargs: None)
    _train(np.random.default_rng(1), emb, c, head)
    emb2, head2, c2 = _copy((emb, head, c), how)
    assert len(c2.optimizers) == 2 and all(a is not b for a, b in zip(c.optimizers,
                                                                       c2.optimizers))
    assert not c2._optimizer_step_pre_hooks  # as torch's copies: no hooks
    assert "SparseAdagrad" in repr(c2) and len(c2.param_groups) == 2
    for seed in (2, 3):
        _train(np.random.default_rng(seed), emb, c, head)
        _train(np.random.default_rng(seed), emb2, c2, head2)
    torch.testing.assert_close(emb2.weight.detach(), emb.weight.detach(), **TOL)
    torch.testing.assert_close(head2.weight.detach(), head.weight.detach(), **TOL)
    c2.load_state_dict(c.state_dict())


def test_combined_optimizer_runs_its_hooks_as_torch_does():
    """Step, state_dict and load_state_dict hooks run in torch's order with torch's
    arguments (the same calls on torch.optim.SGD give the same record)."""
    torch.manual_seed(0)
    emb, head = fastmf.nn.Embedding(N, K), torch.nn.Linear(K, 1)
    c = fastmf.optim.CombinedOptimizer([
        fastmf.optim.SparseAdagrad(emb.parameters(), lr=0.1),
        torch.optim.SGD(head.parameters(), lr=0.1)])
    plain = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)

    def record(opt):
        calls = []
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(
            ("pre", o is opt, args == (opt,), kwargs, emb.weight.detach().clone())))
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(
            ("post", o is opt, args == (opt,), kwargs, emb.weight.detach().clone())))
        opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o is opt)))
        opt.register_state_dict_post_hook(lambda o, sd: calls.append(
            ("sd_post", o is opt)) or {**sd, "extra": 1})
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(
            ("load_pre", o is opt, sd.get("extra"))) or {k: v for k, v in sd.items()
                                                        if k != "extra"})
        opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post",
                                                                       o is opt)))
        return calls

    ours, theirs = record(c), record(plain)
    for opt, inputs in ((c, torch.tensor([1, 2, 2])), (plain, None)):
        if inputs is not None:
            head(emb(inputs)).sum().backward()
        opt.step()
        saved = opt.state_dict()
        assert saved["extra"] == 1
        opt.load_state_dict(saved)
    strip = [call[:4] for call in ours]
    assert strip == [call[:4] for call in theirs] == [
        ("pre", True, True, {}), ("post", True, True, {}), ("sd_pre", True),
        ("sd_post", True), ("load_pre", True, 1), ("load_post", True)]
    assert torch.equal(ours[0][4], ours[1][4]) is False  # the parts step between them
    assert fastmf.optim.has_step_hooks(c)


def test_step_updates_a_new_weight_on_the_address_of_a_dead_one():
    """step() skips only the weights the registry says this optimizer updates in backward:
    a new parameter that lands on a freed weight's id() is stepped."""
    import gc

    torch.manual_seed(0)
    emb = fastmf.nn.Embedding(N, K)
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.1))
    old_id = id(emb.weight)
    opt.param_groups[0]["params"] = []
    emb.weight = torch.nn.Parameter(torch.randn(N, K))
    gc.collect()
    keep, p = [], None
    for _ in range(2000):
        p = torch.nn.Parameter(torch.randn(N, K))
        keep.append(p)
        if id(p) == old_id:
            break
    emb.weight = p
    opt.param_groups[0]["params"] = [p]
    before = p.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    assert p.grad is not None and p.grad.is_sparse
    opt.step()
    torch.testing.assert_close(p.detach()[1:3], before[1:3] - 0.1)
    # and the registry decides: a weight taken out of it is stepped too
    emb2 = fastmf.nn.Embedding(N, K)
    opt2 = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb2.parameters(), lr=0.1))
    fastmf.nn.embedding._FUSED.pop(emb2.weight)
    emb2(torch.tensor([3])).sum().backward()
    before = emb2.weight.detach().clone()
    opt2.step()
    torch.testing.assert_close(emb2.weight.detach()[3], before[3] - 0.1)


@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("shape", [(N, K), (N, 1)])
def test_fully_sparse_gradients_match_torch(name, shape):
    """Gradients of several sparse dimensions (Tensor.to_sparse()), coalesced or not, with
    rows partly present: torch's numbers over several steps."""
    torch.manual_seed(0)
    make_torch, make_ours = TORCH_OPTIMIZERS[name]
    theirs = torch.nn.Parameter(torch.randn(shape))
    ours = torch.nn.Parameter(theirs.detach().clone())
    opt_theirs, opt_ours = make_torch([theirs]), make_ours([ours])
    for step in range(4):
        g = torch.randn(shape) * (torch.rand(shape) < 0.3)
        sparse = g.to_sparse()
        if step % 2:  # an uncoalesced one: every value split in two halves
            sparse = torch.sparse_coo_tensor(sparse._indices().repeat(1, 2),
                                             torch.cat([sparse._values() / 2] * 2), shape)
        theirs.grad, ours.grad = sparse.clone(), sparse.clone()
        opt_theirs.step()
        opt_ours.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_steps_go_on_after_module_double_as_torch_does(name, fused):
    ours, theirs, opt_ours, opt_theirs = twins(name, fused)
    rng = np.random.default_rng(2)
    for convert in (None, "double", None, "float", None):
        if convert:
            getattr(ours, convert)()
            getattr(theirs, convert)()
        ids, targets = _batch(rng, 16)
        for module, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            targets = targets.to(module.weight.dtype)
            ((module(ids).sum(1) - targets) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert ours.weight.dtype == theirs.weight.dtype
        torch.testing.assert_close(ours.weight.detach(), theirs.weight.detach(), **TOL)
    assert ours.weight.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in opt_ours.state[ours.weight].values()
               if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), 0.9])
@pytest.mark.parametrize("where", ["param_groups", "add_param_group"])
def test_bad_betas_in_a_group_are_named_at_step(betas, where):
    emb, emb2 = fastmf.nn.Embedding(N, K), fastmf.nn.Embedding(N, K)
    opt = fastmf.optim.SparseAdam(emb.parameters(), lr=0.1)
    if where == "param_groups":
        opt.param_groups[0]["betas"] = betas
    else:
        opt.add_param_group({"params": emb2.parameters(), "betas": betas})
    torch.manual_seed(0)
    (emb(torch.tensor([1, 2])) * torch.randn(2, K)).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"fastmf\.SparseAdam: betas must be a pair, got "):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
