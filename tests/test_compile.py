"""``torch.compile(fullgraph=True)`` of forward + backward through fastmf.nn: on the
sparse-gradient path the compiled call gives the eager call's sparse COO gradient (same
rows after coalesce), the per-sample weights' gradient, and the same weights after optimizer
steps; with the optimizer applied in backward, the same tables as eager. Fresh Zipf ids
with duplicates, int32 and int64.

Compiled with ``backend="aot_eager"``: Dynamo and AOTAutograd, the stages that decide what
is traceable, without inductor's C++ code generation (minutes of compiler time on a small
CI machine); one test runs inductor where a C++ compiler is present."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

import fastmf
from fastmf._extension import native_available
from fastmf.nn.embedding import stochastic_rounding_of
from fastmf.testing import BACKENDS, ID_DTYPES, idfn, zipf_ids

N, K = 300, 8
requires_native = pytest.mark.skipif(not native_available(),
                                     reason="the native extension is not built")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no recompile limit carried between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, backend="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=backend)


def _case(case: str, id_dtype, seed: int):
    """(module, loss(module, *inputs), inputs, per-sample weights or None): a lookup and a
    loss whose gradient differs per id and per column."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ids = zipf_ids(N, 240, generator=rng, dtype=id_dtype)
    scale = torch.linspace(0.5, 2.0, K)
    psw = None
    if case == "embedding-2d":
        module = fastmf.nn.Embedding(N, K, backend="native")
        inputs = (ids.view(40, 6),)
    elif case == "bag-mean-2d":
        module = fastmf.nn.EmbeddingBag(N, K, "mean", backend="native")
        inputs = (ids.view(30, 8),)
    elif case == "bag-sum-offsets-weights":
        module = fastmf.nn.EmbeddingBag(N, K, "sum", backend="native")
        offsets = torch.tensor([0, 7, 7, 90, 200], dtype=id_dtype)  # an empty bag
        psw = (torch.rand(ids.shape[0]) + 0.5).requires_grad_()
        inputs = (ids, offsets, psw)
    elif case == "bag-last-offset":
        module = fastmf.nn.EmbeddingBag(N, K, "sum", include_last_offset=True,
                                        backend="native")
        offsets = torch.tensor([0, 50, 120, 200], dtype=id_dtype)  # ids past 200 ignored
        psw = (torch.rand(ids.shape[0]) + 0.5).requires_grad_()
        inputs = (ids, offsets, psw)
    else:
        raise AssertionError(case)

    def loss(m, *args):
        return (m(*args) * scale).pow(2).sum()

    return module, loss, inputs, psw


def _grads(module, loss, inputs, psw):
    """(weight gradient, per-sample weights' gradient or None) of one backward pass."""
    module.weight.grad = None
    if psw is not None:
        psw.grad = None
    loss(module, *inputs).backward()
    return module.weight.grad, None if psw is None else psw.grad.clone()


def _assert_same_sparse(compiled, eager, num_ids):
    assert compiled.is_sparse and compiled.shape == eager.shape
    assert compiled._nnz() == num_ids  # one stored row per id used, as eager stores them
    assert eager._nnz() == num_ids
    compiled, eager = compiled.coalesce(), eager.coalesce()
    assert torch.equal(compiled.indices(), eager.indices())
    torch.testing.assert_close(compiled.values(), eager.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("case", ["embedding-2d", "bag-mean-2d", "bag-sum-offsets-weights",
                                  "bag-last-offset"])
@requires_native
def test_compiled_gradients_equal_eager(case, id_dtype):
    module, loss, inputs, psw = _case(case, id_dtype, seed=11 + len(case))
    eager_weight, eager_psw = _grads(module, loss, inputs, psw)
    compiled_loss = _compile(loss)
    torch.testing.assert_close(compiled_loss(module, *inputs), loss(module, *inputs))
    weight_grad, psw_grad = _grads(module, compiled_loss, inputs, psw)
    used = 200 if case == "bag-last-offset" else 240
    _assert_same_sparse(weight_grad, eager_weight, used)
    if psw is not None:
        torch.testing.assert_close(psw_grad, eager_psw, rtol=1e-5, atol=1e-6)
        if case == "bag-last-offset":
            assert psw_grad[used:].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_every_backend(backend):
    """The mechanism is the same for every backend: the ops are opaque to the compiler."""
    torch.manual_seed(3)
    bag = fastmf.nn.EmbeddingBag(N, K, "mean", backend=backend)
    ids = zipf_ids(N, 96, generator=np.random.default_rng(3)).view(24, 4)

    def loss(m, ids):
        return m(ids).pow(2).sum()

    eager, _ = _grads(bag, loss, (ids,), None)
    compiled, _ = _grads(bag, _compile(loss), (ids,), None)
    _assert_same_sparse(compiled, eager, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=idfn)
@requires_native
def test_compiled_training_equals_eager(dtype):
    """Steps of a sparse optimizer on compiled and eager gradients give the same tables
    (bit for bit: the same kernels on the same rows); the batch size changes between steps
    (recompiled with dynamic shapes); a deep copy keeps its stochastic-rounding seed."""
    torch.manual_seed(5)
    eager = fastmf.nn.Embedding(N, K, backend="native", dtype=dtype)
    compiled = copy.deepcopy(eager)
    start = eager.weight.detach().clone()
    assert stochastic_rounding_of(compiled.weight) == stochastic_rounding_of(eager.weight)
    opts = [fastmf.optim.SparseAdam(m.parameters(), lr=0.05, rowwise=True)
            for m in (eager, compiled)]

    def loss(m, ids):
        return (m(ids) - 0.3).pow(2).sum()

    step = _compile(loss)
    rng = np.random.default_rng(5)
    for batch in (64, 100, 37, 64):
        ids = zipf_ids(N, batch, generator=rng, dtype=torch.int32)
        for module, fn, opt in ((eager, loss, opts[0]), (compiled, step, opts[1])):
            fn(module, ids).backward()
            assert module.weight.grad.is_sparse
            opt.step()
            opt.zero_grad()
        assert torch.equal(compiled.weight, eager.weight), batch
    assert not torch.equal(compiled.weight, start)


def test_compiled_bad_offsets_raise_at_run_time():
    """The offsets' values are checked inside the compiled op, with the eager message."""
    bag = fastmf.nn.EmbeddingBag(N, K, backend="native" if native_available() else "reference")
    fn = _compile(lambda m, ids, offsets: m(ids, offsets).sum())
    ids = zipf_ids(N, 10, generator=np.random.default_rng(7))
    assert fn(bag, ids, torch.tensor([0, 4])).isfinite()
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, got 4 then 2"):
        fn(bag, ids, torch.tensor([0, 4, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=idfn)
def test_compiled_optimizer_in_backward_equals_eager(dtype):
    """apply_in_backward under compile: one merged update per table per backward pass (the
    user table is looked up twice), no gradient kept, the same tables as eager bit for
    bit, also when the batch size changes."""
    torch.manual_seed(13)
    backend = "native" if native_available() else "reference"
    users = fastmf.nn.Embedding(N, K, backend=backend, dtype=dtype)
    items = fastmf.nn.EmbeddingBag(N // 2, K, "mean", backend=backend, dtype=dtype)
    twins = copy.deepcopy(users), copy.deepcopy(items)
    opts = [fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(
        [*u.parameters(), *i.parameters()], lr=0.1, rowwise=True))
        for u, i in ((users, items), twins)]

    def loss(u, i, a, b, c):
        return ((u(a) * i(b)).sum(1) - 1.0).pow(2).mean() + 0.01 * u(c).pow(2).sum()

    step = _compile(loss)
    rng = np.random.default_rng(13)
    for batch in (48, 80, 48):
        a, c = (zipf_ids(N, batch, generator=rng) for _ in range(2))
        b = zipf_ids(N // 2, batch * 3, generator=rng, dtype=torch.int32).view(batch, 3)
        loss(users, items, a, b, c).backward()
        step(*twins, a, b, c).backward()
        for ours, theirs in zip((users, items), twins, strict=True):
            assert theirs.weight.grad is None
            assert torch.equal(theirs.weight, ours.weight), batch
    assert opts[1].state[twins[0].weight]["step"] == 3


def test_compiled_follows_apply_in_backward_later():
    """A function compiled before apply_in_backward updates the weight in backward after
    it (Dynamo re-traces: it guards on what the lookup read), and gives sparse gradients
    again once that optimizer is gone."""
    emb = fastmf.nn.Embedding(N, K)
    fn = _compile(lambda m, ids: m(ids).pow(2).sum())
    ids = zipf_ids(N, 20, generator=np.random.default_rng(17))
    fn(emb, ids).backward()
    assert emb.weight.grad.is_sparse and emb.weight.grad._nnz() == 20
    emb.weight.grad = None
    opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseSGD(emb.parameters(), lr=0.5))
    before = emb.weight.detach().clone()
    fn(emb, ids).backward()
    assert emb.weight.grad is None and opt.state[emb.weight]["step"] == 1
    assert not torch.equal(emb.weight, before)
    del opt
    fn(emb, ids).backward()
    assert emb.weight.grad.is_sparse


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler (none on PATH)")
def test_compiled_with_inductor():
    """The default backend: inductor keeps the custom ops as calls and compiles the rest."""
    torch.manual_seed(9)
    emb = fastmf.nn.Embedding(N, K, backend="native" if native_available() else "reference")
    ids = zipf_ids(N, 128, generator=np.random.default_rng(9), dtype=torch.int32)

    def loss(m, ids):
        return m(ids).pow(2).sum()

    eager, _ = _grads(emb, loss, (ids,), None)
    compiled, _ = _grads(emb, _compile(loss, backend="inductor"), (ids,), None)
    _assert_same_sparse(compiled, eager, 128)
