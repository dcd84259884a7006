"""fastmf.MF, its optimizers and train_step on every backend against the textbook
nn.Embedding model with torch.optim (the spec users already trust)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmf
from fastmf.ops import Loss
from fastmf.ops.codes import names
from fastmf.ops.reference import pointwise as reference
from fastmf.testing import (
    BACKENDS,
    BATCH_SIZES,
    ID_DTYPES,
    WEIGHT_DTYPES,
    make_batch,
    requires_native,
    tolerance,
)

NUM_USERS, NUM_ITEMS, DIM = 50, 30, 8


class Textbook(nn.Module):
    """The model users write today."""

    def __init__(self, mf: fastmf.MF, sparse: bool):
        super().__init__()
        self.users = nn.Embedding(mf.num_users, mf.dim, sparse=sparse, dtype=mf.user_factors.dtype)
        self.items = nn.Embedding(mf.num_items, mf.dim, sparse=sparse, dtype=mf.user_factors.dtype)
        self.user_bias = nn.Embedding(mf.num_users, 1, sparse=sparse, dtype=mf.user_factors.dtype)
        self.item_bias = nn.Embedding(mf.num_items, 1, sparse=sparse, dtype=mf.user_factors.dtype)
        self.mu = mf.mu
        with torch.no_grad():
            self.users.weight.copy_(mf.user_factors)
            self.items.weight.copy_(mf.item_factors)
            self.user_bias.weight.copy_(mf.user_bias.unsqueeze(1))
            self.item_bias.weight.copy_(mf.item_bias.unsqueeze(1))

    def forward(self, u, i):
        u, i = u.long(), i.long()
        return (self.mu + self.user_bias(u).squeeze(1) + self.item_bias(i).squeeze(1)
                + (self.users(u) * self.items(i)).sum(1))

    def tables(self):
        return (self.users.weight, self.items.weight, self.user_bias.weight.squeeze(1),
                self.item_bias.weight.squeeze(1))


def make_model(backend, dtype=torch.float32, sparse=False, seed=0, bias_scale=0.1):
    torch.manual_seed(seed)
    model = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, global_mean=3.1, backend=backend,
                      sparse=sparse, dtype=dtype, init_scale=0.3)
    with torch.no_grad():  # non-zero biases, so their paths are exercised
        model.user_bias.uniform_(-bias_scale, bias_scale)
        model.item_bias.uniform_(-bias_scale, bias_scale)
    return model


def assert_tables_close(model, expected_tables, dtype):
    for got, want in zip(model.tables(), expected_tables, strict=True):
        torch.testing.assert_close(got.detach(), want.detach().reshape(got.shape),
                                   **tolerance(dtype))


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_forward_matches_textbook(backend, id_dtype, dtype, batch):
    model = make_model(backend, dtype)
    u, i, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, dtype=dtype, seed=batch)
    torch.testing.assert_close(model(u, i), Textbook(model, False)(u, i), **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("batch", [1, 7, 4096])
def test_gradients_match_textbook(backend, sparse, id_dtype, batch):
    dtype = torch.float64
    model = make_model(backend, dtype, sparse=sparse)
    textbook = Textbook(model, sparse)
    u, i, r = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, dtype=dtype, seed=3)
    weights = torch.rand(batch, dtype=dtype) + 0.5  # a loss whose gradient differs per sample
    (model(u, i) * weights).sum().backward()
    (textbook(u, i) * weights).sum().backward()
    for param in model.parameters():
        assert param.grad.is_sparse == sparse
    expected = [textbook.users.weight.grad, textbook.items.weight.grad,
                textbook.user_bias.weight.grad, textbook.item_bias.weight.grad]
    for param, want in zip(model.tables(), expected, strict=True):
        torch.testing.assert_close(dense(param.grad), dense(want).reshape(param.shape),
                                   **tolerance(dtype))


def run_steps(model, optimizer, step_fn, steps=20, batch=512, dtype=torch.float32,
              id_dtype=torch.int64):
    for s in range(steps):
        u, i, r = make_batch(NUM_USERS, NUM_ITEMS, batch, id_dtype=id_dtype, dtype=dtype, seed=s)
        step_fn(model, optimizer, u, i, r)


def unfused_mse(model, optimizer, u, i, r):
    optimizer.zero_grad()
    F.mse_loss(model(u, i), r).backward()
    optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_adagrad_matches_torch_adagrad(backend, dtype, sparse):
    model = make_model(backend, dtype, sparse=sparse)
    textbook = Textbook(model, sparse=True)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, initial_accumulator_value=0.1,
                                     backend=backend)
    torch_opt = torch.optim.Adagrad(textbook.parameters(), lr=0.05,
                                    initial_accumulator_value=0.1)
    run_steps(model, opt, unfused_mse, dtype=dtype)
    run_steps(textbook, torch_opt, unfused_mse, dtype=dtype)
    assert_tables_close(model, textbook.tables(), dtype)
    torch.testing.assert_close(opt.state_for(model.item_factors),
                               torch_opt.state[textbook.items.weight]["sum"], **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adagrad_matches_reference(backend, sparse):
    dtype = torch.float32
    model = make_model(backend, dtype, sparse=sparse)
    textbook = Textbook(model, sparse=True)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, rowwise=True, backend=backend)
    states = [torch.zeros(t.shape[0], dtype=dtype) for t in textbook.tables()]

    def hand_written_rowwise(model, _, u, i, r):
        for p in model.parameters():
            p.grad = None
        F.mse_loss(model(u, i), r).backward()
        params = [textbook.users.weight, textbook.items.weight, textbook.user_bias.weight,
                  textbook.item_bias.weight]
        for p, state in zip(params, states, strict=True):
            g = p.grad.coalesce()
            ids, rows = g.indices()[0], g.values()
            with torch.no_grad():
                state[ids] += rows.pow(2).mean(1)
                p[ids] -= 0.05 * rows / (state[ids].sqrt() + 1e-10).unsqueeze(1)

    run_steps(model, opt, unfused_mse, dtype=dtype)
    run_steps(textbook, None, hand_written_rowwise, dtype=dtype)
    assert_tables_close(model, textbook.tables(), dtype)
    assert opt.state_for(model.user_factors).shape == (NUM_USERS,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_sgd_matches_torch_sgd(backend, sparse):
    dtype = torch.float64
    model = make_model(backend, dtype, sparse=sparse)
    textbook = Textbook(model, sparse=True)
    opt = fastmf.optim.SparseSGD(model.parameters(), lr=0.5, backend=backend)
    run_steps(model, opt, unfused_mse, dtype=dtype)
    run_steps(textbook, torch.optim.SGD(textbook.parameters(), lr=0.5), unfused_mse, dtype=dtype)
    assert_tables_close(model, textbook.tables(), dtype)


def make_optimizer(kind, model, backend="auto"):
    if kind == "sgd":
        return fastmf.optim.SparseSGD(model.parameters(), lr=0.3, backend=backend)
    return fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, rowwise=kind == "rowwise",
                                      initial_accumulator_value=0.01, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", names(Loss))
@pytest.mark.parametrize("kind", ["adagrad", "rowwise", "sgd"])
@pytest.mark.parametrize("reg", [0.0, 0.05])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_train_step_matches_unfused(backend, loss, kind, reg, id_dtype):
    dtype = torch.float32
    fused = make_model(backend, dtype)
    unfused = make_model("reference", dtype, sparse=True)
    fused_opt = make_optimizer(kind, fused)
    unfused_opt = make_optimizer(kind, unfused, backend="reference")
    for s in range(20):
        u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 700, id_dtype=id_dtype, dtype=dtype, seed=s,
                             implicit=loss == "bce")
        got = fastmf.train_step(fused, fused_opt, u, i, r, loss=loss, reg=reg)
        pred = unfused(u, i)
        total = reference.pointwise_loss(pred, r, loss) + reference.reg_term(
            u, i, *unfused.tables(), reg)
        total.backward()
        unfused_opt.step()
        unfused_opt.zero_grad()
        torch.testing.assert_close(got, total.detach(), **tolerance(dtype))
    assert_tables_close(fused, unfused.tables(), dtype)
    if kind != "sgd":
        for a, b in zip(fused.tables(), unfused.tables(), strict=True):
            torch.testing.assert_close(fused_opt.state_for(a), unfused_opt.state_for(b),
                                       **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_matches_torch_adagrad_textbook(backend):
    """The fused step equals the textbook model trained with torch.optim.Adagrad."""
    dtype = torch.float64
    model = make_model(backend, dtype)
    textbook = Textbook(model, sparse=True)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    torch_opt = torch.optim.Adagrad(textbook.parameters(), lr=0.05)
    run_steps(model, opt, lambda m, o, u, i, r: fastmf.train_step(m, o, u, i, r), dtype=dtype)
    run_steps(textbook, torch_opt, unfused_mse, dtype=dtype)
    assert_tables_close(model, textbook.tables(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_is_deterministic(backend):
    results = []
    for _ in range(2):
        model = make_model(backend)
        opt = make_optimizer("adagrad", model)
        run_steps(model, opt, lambda m, o, u, i, r: fastmf.train_step(m, o, u, i, r, reg=0.01),
                  steps=5, batch=4096)
        results.append([t.detach().clone() for t in model.tables()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_is_a_no_op(backend):
    model = make_model(backend)
    opt = make_optimizer("adagrad", model)
    before = [t.detach().clone() for t in model.tables()]
    empty = torch.empty(0, dtype=torch.int64)
    loss = fastmf.train_step(model, opt, empty, empty, torch.empty(0))
    assert float(loss) == 0.0
    assert model(empty, empty).shape == (0,)
    for a, b in zip(before, model.tables(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_is_the_same_for_every_backend(backend):
    torch.manual_seed(7)
    a = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, backend=backend)
    torch.manual_seed(7)
    b = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, backend="reference")
    for x, y in zip(a.tables(), b.tables(), strict=True):
        assert torch.equal(x, y)
    assert a.user_factors.abs().max() <= 0.05 and a.user_factors.std() > 0.01
    assert torch.equal(a.user_bias, torch.zeros(NUM_USERS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_backend_keeps_parameters(backend):
    model = make_model("reference")
    u, i, _ = make_batch(NUM_USERS, NUM_ITEMS, 100, seed=1)
    expected = model(u, i)
    params = [id(p) for p in model.parameters()]
    model.backend = backend
    assert model.backend == backend
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(model(u, i), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_model(backend):
    torch.manual_seed(0)
    model = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, bias=False, backend=backend, global_mean=1.5)
    assert model.user_bias is None and len(list(model.parameters())) == 2
    u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 64, seed=2)
    expected = (model.user_factors[u] * model.item_factors[i]).sum(1) + 1.5
    torch.testing.assert_close(model(u, i), expected)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.1)
    ref = fastmf.MF(NUM_USERS, NUM_ITEMS, DIM, bias=False, backend="reference", global_mean=1.5)
    ref.load_state_dict(model.state_dict())
    ref_opt = fastmf.optim.SparseAdagrad(ref.parameters(), lr=0.1, backend="reference")
    fastmf.train_step(model, opt, u, i, r)
    unfused_mse(ref, ref_opt, u, i, r)
    for a, b in zip(model.tables()[:2], ref.tables()[:2], strict=True):
        torch.testing.assert_close(a, b)


def test_numpy_inputs_are_accepted():
    model = make_model("auto")
    u = np.array([0, 1, 2], dtype=np.int32)
    i = np.array([3, 4, 5])
    torch.testing.assert_close(model(u, i), model(torch.from_numpy(u), torch.from_numpy(i)))
    opt = make_optimizer("adagrad", model)
    loss = fastmf.train_step(model, opt, u, i, np.array([1.0, 2.0, 3.0]))
    assert loss.ndim == 0 and loss > 0


def test_global_mean_survives_state_dict():
    a = fastmf.MF(5, 5, 4, global_mean=3.7)
    b = fastmf.MF(5, 5, 4)
    b.load_state_dict(a.state_dict())
    assert b.mu == pytest.approx(3.7)
    u = torch.tensor([1, 2])
    torch.testing.assert_close(a(u, u), b(u, u))


def test_auto_backend_prefers_native_then_numba():
    expected = fastmf.build_info()["backends"][-1]
    assert fastmf.MF(3, 3, 2).backend == expected


def test_build_info_reports_what_was_built():
    info = fastmf.build_info()
    assert info["version"] == fastmf.__version__
    assert info["cpu_kernels"] == ("native" in info["backends"])
    if info["cpu_kernels"]:
        assert info["torch_built_against"].split(".")[:2] == torch.__version__.split(".")[:2]
        assert info["openmp"], "the native kernels were built without OpenMP"
    else:
        assert "not built" in info["native_error"]


@requires_native
def test_compile_fullgraph_forward_backward():
    model = make_model("native")
    u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 256, seed=5)

    def loss_fn(u, i, r):
        return F.mse_loss(model(u, i), r)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(u, i, r)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_fn(u, i, r).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


@requires_native
def test_compile_fullgraph_inductor():
    model = make_model("native")
    u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 256, seed=6)
    compiled = torch.compile(lambda u, i: model(u, i), fullgraph=True)
    torch.testing.assert_close(compiled(u, i), model(u, i))
