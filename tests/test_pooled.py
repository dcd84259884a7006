"""The pooled family: ``pooled_rank_steps``, ranking steps of two-sided pooled embeddings (a
user and an item each the weighted sum of its feature rows) over an epoch's batches in one
call. Every backend against the reference on fresh random tables, states and Zipf ids
(duplicates on purpose), int32 and int64; the reference against textbook PyTorch (dense
feature matrices, autograd, torch.optim.Adagrad); an empty run; its input errors on every
backend; ``opcheck`` of the native registration; and ``Hybrid``'s fit, whose epoch runs as
one call, against the same fit batch by batch, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmf
from fastmf import ops
from fastmf.models import Hybrid
from fastmf.ops.args import PooledSide, RowOptimizerArgs
from fastmf.ops.codes import Optimizer
from fastmf.testing import (
    assert_bit_identical,
    kernel_params,
    requires_native,
    requires_numba,
    tolerance,
    zipf_ids,
)

OTHERS = kernel_params(("numba", "native"))
EVERY = kernel_params(spec_on_cpu=True)


def _bags(num_rows: int, num_features: int, rng: np.random.Generator) -> tuple:
    """A features CSR of ``num_rows`` rows over ``num_features`` feature rows then one
    identity row each: 0-3 Zipf features per row (repeats kept) with weights in (0.1, 1),
    then the row's identity with weight 1."""
    indptr, indices, weights = [0], [], []
    for r in range(num_rows):
        k = int(rng.integers(0, 4))
        if num_features and k:
            indices += zipf_ids(num_features, k, generator=rng).tolist()
            weights += rng.uniform(0.1, 1.0, k).tolist()
        indices.append(num_features + r)
        weights.append(1.0)
        indptr.append(len(indices))
    return (torch.tensor(indptr), torch.tensor(indices), torch.tensor(weights,
                                                                      dtype=torch.float32))


def _side(num_rows, num_features, dim, dtype, optimizer, rng, device, first_step):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    rows = num_features + num_rows
    table = (torch.rand(rows, dim, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
    bias = (torch.rand(rows, 1, generator=gen, dtype=torch.float64) - 0.5).to(dtype)

    def states(t):
        if optimizer == Optimizer.ADAGRAD:
            return (torch.rand(t.shape, generator=gen, dtype=torch.float64).to(torch.float32
                    if dtype != torch.float64 else dtype).add_(0.01), None)
        state_dtype = torch.float32 if dtype != torch.float64 else dtype
        return ((torch.rand(t.shape, generator=gen, dtype=torch.float64) - 0.5).to(state_dtype),
                torch.rand(t.shape, generator=gen, dtype=torch.float64).to(state_dtype))

    lr = 0.05 if optimizer == Optimizer.ADAGRAD else 0.01
    args = RowOptimizerArgs(optimizer, lr, 1e-6, 0.9, 0.999, 0.0, 0, first_step, 0, False)
    indptr, indices, weights = _bags(num_rows, num_features, rng)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return PooledSide(table.to(device), tuple(map(to, states(table))), args, bias.to(device),
                      tuple(map(to, states(bias))), args._replace(step=first_step + 2),
                      indptr.to(device), indices.to(device), weights.to(device))


def _positives(num_users, num_items, n, rng, id_dtype, device):
    """n Zipf (user, item) positives and the CSR of each user's distinct items."""
    users = zipf_ids(num_users, n, generator=rng)
    items = zipf_ids(num_items, n, generator=rng)
    pairs = sorted(set(zip(users.tolist(), items.tolist())))
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.add.at(indptr, np.array([u for u, _ in pairs], dtype=np.int64) + 1, 1)
    indptr = np.cumsum(indptr)
    indices = torch.tensor([i for _, i in pairs], dtype=torch.int64)
    return (users.to(id_dtype).to(device), items.to(id_dtype).to(device),
            torch.from_numpy(indptr).to(device), indices.to(device))


def _case(seed, *, dtype=torch.float32, optimizer=Optimizer.ADAGRAD, id_dtype=torch.int64,
          n=300, weighted=False, device="cpu", num_users=40, num_items=60):
    rng = np.random.default_rng(seed)
    users_side = _side(num_users, 5, 8, dtype, optimizer, rng, device, 3)
    items_side = _side(num_items, 12, 8, dtype, optimizer, rng, device, 1)
    items_side = items_side._replace(
        table_args=items_side.table_args._replace(seed=7),
        bias_args=items_side.bias_args._replace(seed=9))
    users, items, indptr, indices = _positives(num_users, num_items, n, rng, id_dtype, device)
    weights = None
    if weighted:
        weights = torch.from_numpy(rng.uniform(0.2, 2.0, n)).to(dtype=torch.float32,
                                                                 device=device)
    return users_side, items_side, (users, items, weights, indptr, indices, num_items)


def _clone(side: PooledSide) -> PooledSide:
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    return side._replace(table=side.table.clone(), bias=side.bias.clone(),
                         table_states=tuple(map(copy, side.table_states)),
                         bias_states=tuple(map(copy, side.bias_states)))


def _written(side: PooledSide) -> list:
    return [side.table, *side.table_states, side.bias, *side.bias_states]


RUNS = [  # (loss, weighted, reg, num_negatives, batch_size, id dtype)
    ("bpr", False, 0.0, 1, 64, torch.int64),
    ("bpr", True, 0.01, 3, 50, torch.int32),
    ("bce", False, 0.02, 2, 1000, torch.int64),
    ("bce", True, 0.0, 1, 7, torch.int32),
]


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-w{int(r[1])}-reg{r[2]}-n{r[3]}"
                                                    f"-b{r[4]}-{str(r[5])[6:]}")
@pytest.mark.parametrize("dtype, optimizer", [(torch.float32, Optimizer.ADAGRAD),
                                              (torch.float64, Optimizer.ADAM),
                                              (torch.float16, Optimizer.ADAGRAD)],
                         ids=["f32-adagrad", "f64-adam", "f16-adagrad"])
@pytest.mark.parametrize("backend, device", OTHERS)
def test_matches_reference(backend, device, dtype, optimizer, run):
    loss, weighted, reg, negatives, batch_size, id_dtype = run
    if backend == "numba" and dtype == torch.float16:
        pytest.skip("the Numba bag kernels take float32/float64 tables")
    us, it, data = _case(11, dtype=dtype, optimizer=optimizer, id_dtype=id_dtype,
                         weighted=weighted, device=device)
    want_sides = (_clone(us), _clone(it))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    want = ops.reference.pooled_rank_steps(*want_sides, *data[:5], data[5], negatives,
                                           batch_size, 5, loss, reg)
    got = ops.kernels(backend, device, kernel="pooled_rank_steps").pooled_rank_steps(
        us, it, *data[:5], data[5], negatives, batch_size, 5, loss, reg)
    assert got.shape == (-(-len(data[0]) // batch_size),)
    assert got.dtype == want.dtype
    # float16 tables round their updates to float16: one step's rounding feeds the next
    # batch's scores, so the runs drift apart by about that rounding.
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.float16 else tolerance(dtype)
    pairs = [(got, want)] + [(cpu(a), cpu(b)) for side, expected in zip((us, it), want_sides)
                             for a, b in zip(_written(side), _written(expected))]
    for a, b in pairs:
        if b is not None:
            torch.testing.assert_close(a.cpu(), b.cpu(), **tol)
    # The tables moved: the call is no no-op that matches an untouched reference.
    assert not torch.equal(us.table.cpu(), _case(11, dtype=dtype, optimizer=optimizer,
                                                 id_dtype=id_dtype)[0].table)


def _textbook(users_side, items_side, users, items, negatives, loss, reg, weights):
    """One step in textbook PyTorch: dense feature matrices times the tables, the loss by
    formula, autograd, torch.optim.Adagrad with the sides' states as its sums."""
    def dense(side, rows):
        m = torch.zeros(rows, side.table.shape[0], dtype=torch.float64)
        for r in range(rows):
            for j in range(int(side.indptr[r]), int(side.indptr[r + 1])):
                m[r, side.indices[j]] += float(side.weights[j])
        return m

    params = [p.clone().requires_grad_() for side in (users_side, items_side)
              for p in (side.table, side.bias)]
    ut, ub, it, ib = params
    mu = dense(users_side, len(users_side.indptr) - 1)
    mi = dense(items_side, len(items_side.indptr) - 1)
    P, BU, Q, BI = mu @ ut, (mu @ ub)[:, 0], mi @ it, (mi @ ib)[:, 0]
    u, i, j = users.long(), items.long(), negatives.long()
    s_pos = (P[u] * Q[i]).sum(1) + BU[u] + BI[i]
    s_neg = (P[u][:, None] * Q[j]).sum(2) + BU[u][:, None] + BI[j]
    w = torch.ones(len(u), dtype=torch.float64) if weights is None else weights.double()
    if loss == "bpr":
        value = (torch.nn.functional.softplus(s_neg - s_pos[:, None]) * w[:, None]).mean()
    else:
        terms = (torch.nn.functional.softplus(-s_pos) * w).sum() \
            + torch.nn.functional.softplus(s_neg).sum()
        value = terms / (s_neg.numel() + len(u))
    all_items = torch.cat([i, j.reshape(-1)])
    penalty = (P[u].square().sum() + BU[u].square().sum() + Q[all_items].square().sum()
               + BI[all_items].square().sum())
    value = value + reg * penalty / len(u)
    value.backward()
    optimizer = torch.optim.Adagrad(params, lr=users_side.table_args.lr,
                                    eps=users_side.table_args.eps)
    sums = [side_states[0] for side in (users_side, items_side)
            for side_states in (side.table_states, side.bias_states)]
    for p, s in zip(params, sums):
        optimizer.state[p]["sum"].copy_(s)
    optimizer.step()
    return [p.detach() for p in params], [optimizer.state[p]["sum"] for p in params], value


@pytest.mark.parametrize("loss, weighted, reg", [("bpr", True, 0.01), ("bce", False, 0.02)])
def test_reference_matches_textbook(loss, weighted, reg):
    us, it, (users, items, weights, indptr, indices, num_items) = _case(
        3, dtype=torch.float64, n=120, weighted=weighted)
    negatives = ops.reference.sample_negatives(users.long(), indptr, indices, num_items, 2, 8,
                                               0, "test")
    want_tables, want_sums, want_loss = _textbook(us, it, users, items, negatives, loss, reg,
                                                  weights)
    got = ops.reference.pooled_rank_steps(us, it, users, items, weights, indptr, indices,
                                          num_items, 2, 1000, 8, loss, reg)
    torch.testing.assert_close(got[0], want_loss.detach())
    for got_t, want_t in zip([us.table, us.bias, it.table, it.bias], want_tables):
        torch.testing.assert_close(got_t, want_t)
    for got_s, want_s in zip([us.table_states[0], us.bias_states[0], it.table_states[0],
                              it.bias_states[0]], want_sums):
        torch.testing.assert_close(got_s, want_s)


@pytest.mark.parametrize("backend, device", EVERY)
def test_empty_run_writes_nothing(backend, device):
    us, it, (users, items, weights, indptr, indices, num_items) = _case(5, device=device)
    before = [t.clone() for t in _written(us) + _written(it) if t is not None]
    got = ops.kernels(backend, device, kernel="pooled_rank_steps").pooled_rank_steps(
        us, it, users[:0], items[:0], None, indptr, indices, num_items, 2, 16, 0, "bpr", 0.0)
    assert got.shape == (0,) and got.dtype == torch.float32
    assert_bit_identical([t for t in _written(us) + _written(it) if t is not None], before)


BAD = [
    ("batch_size", dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("num_negatives", dict(num_negatives=0), ValueError, "num_negatives must be >= 1"),
    ("loss", dict(loss="warp"), ValueError, "loss must be 'bpr' or 'bce'"),
    ("reg", dict(reg=float("nan")), ValueError, "reg must be finite and >= 0"),
    ("lengths", dict(cut_items=True), ValueError, "lengths differ"),
    ("weights_dim", dict(weights_2d=True), ValueError, "weights must be 1-D"),
    ("users_dtype", dict(float_users=True), TypeError, "users must be int32 or int64"),
    ("settings", dict(other_lr=True), ValueError, "optimizer settings"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend, device", EVERY)
def test_bad_input_is_refused_before_any_write(backend, device, case):
    _, change, error, message = case
    us, it, (users, items, weights, indptr, indices, num_items) = _case(6, device=device,
                                                                      weighted=True)
    before = [t.clone() for t in _written(us) + _written(it) if t is not None]
    kw = dict(num_negatives=2, batch_size=16, loss="bpr", reg=0.0)
    kw.update({k: v for k, v in change.items() if k in kw})
    if change.get("cut_items"):
        items = items[:-1]
    if change.get("weights_2d"):
        weights = weights[:, None]
    if change.get("float_users"):
        users = users.float()
    if change.get("other_lr"):
        it = it._replace(bias_args=it.bias_args._replace(lr=0.5))
    run = ops.kernels(backend, device, kernel="pooled_rank_steps").pooled_rank_steps
    with pytest.raises(error, match=f"pooled_rank_steps: .*{message}"):
        run(us, it, users, items, weights, indptr, indices, num_items, kw["num_negatives"],
            kw["batch_size"], 0, kw["loss"], kw["reg"])
    assert_bit_identical([t for t in _written(us) + _written(it) if t is not None], before)


@requires_native
def test_native_op_checks_its_own_arguments():
    """Called through torch.ops directly (past the Python wrapper), the op checks its run."""
    us, it, (users, items, weights, indptr, indices, num_items) = _case(8)
    tables = [t for side in (us, it) for t in (side.table, *side.table_states, side.bias,
                                               *side.bias_states)]
    bags = [t for side in (us, it) for t in (side.indptr, side.indices, side.weights)]
    op = torch.ops.fastmf.pooled_rank_steps.default
    base = (*tables, *bags, users, items, weights, indptr, indices, num_items, 2, 16, 0)
    tail = (0.0, 1, 0.05, 1e-6, 0.9, 0.999, 0.0, 0, [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="pooled_rank_steps: loss must be 'bpr' or 'bce'"):
        op(*base, "mse", *tail)
    with pytest.raises(ValueError, match="one value per table"):
        op(*base, "bpr", *tail[:-1], [0])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        op(*base[:-2], 0, 0, "bpr", *tail)


@requires_native
def test_opcheck():
    us, it, (users, items, weights, indptr, indices, num_items) = _case(9, weighted=True)
    tables = [t for side in (us, it) for t in (side.table, *side.table_states, side.bias,
                                               *side.bias_states)]
    bags = [t for side in (us, it) for t in (side.indptr, side.indices, side.weights)]
    args = (*tables, *bags, users, items, weights, indptr, indices, num_items, 2, 64, 3, "bpr",
            0.01, int(Optimizer.ADAGRAD), 0.05, 1e-6, 0.9, 0.999, 0.0, 0, [1, 1, 1, 1],
            [0, 0, 0, 0], [0, 0, 0, 0])
    torch.library.opcheck(torch.ops.fastmf.pooled_rank_steps.default, args)


# ------------------------------------------------------------------ Hybrid's fit
def _hybrid_data(seed: int, weighted: bool):
    rng = np.random.default_rng(seed)
    n_users, n_items, n = 50, 70, 900
    users = zipf_ids(n_users, n, generator=rng).numpy()
    items = zipf_ids(n_items, n, generator=rng).numpy()
    weights = rng.uniform(0.5, 2.0, n) if weighted else None
    data = fastmf.data.Interactions(users, items, weights=weights, user_map=n_users,
                                    item_map=n_items)
    rows = [(i, f"g{g}") for i in range(n_items) for g in rng.choice(6, 2, replace=False)]
    import scipy.sparse as sp

    feats = sp.csr_matrix((np.ones(len(rows)), ([r for r, _ in rows],
                                                [int(g[1:]) for _, g in rows])),
                          shape=(n_items, 6))
    return data, feats


def _fit(data, feats, backend, loss, monkeypatch, whole: bool):
    """Hybrid fit on ``backend`` (its optimizer too): each epoch in one call (``whole``,
    checked to be taken) or batch by batch."""
    torch.manual_seed(0)
    model = Hybrid(data.num_users, data.num_items, dim=8, item_features=feats, backend=backend)
    optimizer = fastmf.optim.CombinedOptimizer([fastmf.optim.apply_in_backward(
        fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, backend=backend))])
    taken = []
    original = Hybrid.train_epoch

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs) if whole else None
        taken.append(result is not None)
        return result

    monkeypatch.setattr(Hybrid, "train_epoch", spy)
    history = fastmf.fit(model, data, loss=loss, epochs=2, batch_size=64, num_negatives=2,
                         reg=0.01, progress=False, seed=4, optimizer=optimizer)
    monkeypatch.undo()
    assert taken == [whole, whole]
    return model, optimizer, history


@pytest.mark.parametrize("loss, weighted", [("bpr", True), ("bce", False)])
@pytest.mark.parametrize("backend", [pytest.param("native", marks=requires_native),
                                     pytest.param("numba", marks=requires_numba),
                                     "reference"])
def test_hybrid_epoch_in_one_call_is_its_batches(backend, loss, weighted, monkeypatch):
    data, feats = _hybrid_data(1, weighted)
    whole, opt_whole, h_whole = _fit(data, feats, backend, loss, monkeypatch, True)
    batches, opt_batches, h_batches = _fit(data, feats, backend, loss, monkeypatch, False)
    assert_bit_identical(list(whole.state_dict().values()),
                         list(batches.state_dict().values()))
    for a, b in zip(whole.parameters(), batches.parameters()):
        assert opt_whole.state[a]["step"] == opt_batches.state[b]["step"] == 2 * 15
        assert_bit_identical(opt_whole.optimizers[0].states(a),
                             opt_batches.optimizers[0].states(b))
    assert [r["loss"] for r in h_whole.epochs] == [r["loss"] for r in h_batches.epochs]
    assert h_whole.epochs[0]["loss"] != h_whole.epochs[1]["loss"]


def test_hybrid_takes_the_one_call_only_when_one_optimizer_steps_all_four():
    data, feats = _hybrid_data(2, False)
    model = Hybrid(data.num_users, data.num_items, dim=8, item_features=feats)
    sampler = fastmf.data.NegativeSampler(data)
    gen = torch.Generator().manual_seed(3)
    kw = dict(batch_size=64, loss="bpr", num_negatives=1, sampler=sampler, generator=gen,
              reg=0.0)
    opt = model.make_optimizer(None, lr=0.05)
    whole = model.train_epoch(data, opt, **kw)
    assert whole is not None and len(whole[0]) == len(whole[1]) == -(-len(data) // 64)
    assert whole[2] == len(data)
    assert model.train_epoch(data, opt, **dict(kw, loss="warp")) is None
    hook = opt.register_step_pre_hook(lambda *a: None)
    assert model.train_epoch(data, opt, **kw) is None
    hook.remove()
    # Two groups (the user side at another learning rate): batch by batch.
    model = Hybrid(data.num_users, data.num_items, dim=8, item_features=feats)
    sparse = fastmf.optim.SparseAdagrad(
        [{"params": list(model.users.parameters()), "lr": 0.1},
         {"params": list(model.items.parameters())}], lr=0.05)
    split = fastmf.optim.apply_in_backward(sparse)
    assert model.train_epoch(data, split, **kw) is None
