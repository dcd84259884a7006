"""What only the Numba backend has: lazy compilation, its serial path for small batches,
and the errors for inputs that only it refuses (tensors off the CPU, user and item tables
that share memory). Its values are tested against the spec with every other backend in
``test_pointwise.py``, ``test_pairwise.py`` and ``test_topk.py``; its thread-count
determinism there too, next to the native kernels'."""

from __future__ import annotations

import numpy as np
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
    tolerance,
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


# --- the embedding_bag family ----------------------------------------------------------------

from fastmf.ops import checks as op_checks  # noqa: E402
from fastmf.ops import reference as spec  # noqa: E402
from fastmf.ops.codes import Pooling, WeightDecay  # noqa: E402
from fastmf.ops.numba import embedding_bag as nb_embedding  # noqa: E402
from fastmf.testing import num_threads, zipf_ids  # noqa: E402

EMBEDDING_KERNELS = [f for f in vars(nb_embedding).values()
                     if isinstance(f, numba.core.dispatcher.Dispatcher)]
EMBEDDING_COMPILED_AT_IMPORT = sum(len(f.signatures) for f in EMBEDDING_KERNELS)
HALF_DTYPES = [torch.float16, torch.bfloat16]
TABLE_DTYPES = [torch.float32, torch.float64, *HALF_DTYPES]
EMB_ROWS, EMB_DIM = 300, 12


def test_embedding_import_does_not_compile():
    assert EMBEDDING_KERNELS and EMBEDDING_COMPILED_AT_IMPORT == 0


def _accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bag_batch(num_bags, *, seed, id_dtype=torch.int64, num_rows=EMB_ROWS, max_size=6):
    """(ids (L,), offsets (B+1,)): Zipf ids (hot rows, many duplicates) in bags of
    0..max_size ids."""
    gen = np.random.default_rng(seed)
    sizes = gen.integers(0, max_size + 1, size=num_bags)
    ids = zipf_ids(num_rows, int(sizes.sum()), generator=gen, dtype=id_dtype)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])).to(id_dtype)
    return ids, offsets


def _update_inputs(dtype, optimizer, num_bags, *, seed, dims=2, id_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    acc = _accumulation(dtype)
    shape = (EMB_ROWS, EMB_DIM) if dims == 2 else (EMB_ROWS,)
    weight = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    states = [None if s is None else torch.rand(s, generator=gen, dtype=acc)
              for s in op_checks.row_state_shapes(optimizer, weight)]
    ids, offsets = _bag_batch(num_bags, seed=seed, id_dtype=id_dtype)
    psw = torch.rand(ids.numel(), generator=gen, dtype=acc) + 0.5
    grad_output = torch.randn(num_bags, EMB_DIM, generator=gen, dtype=acc)
    return weight, states, ids, offsets, psw, grad_output


def _settings(optimizer, decay_mode=WeightDecay.L2, step=3, stochastic=True):
    return (optimizer, 0.05, 1e-3, 0.8, 0.95, 0.01, decay_mode, step, 77, stochastic)


def _convert(values, dtype, out_dtype, to_float16, to_bfloat16):
    """One of the Numba conversions between float32 and a half type (as uint16 bits), run
    element by element in nopython mode."""
    @numba.njit
    def convert(values, kind, out):
        for i in range(values.shape[0]):
            out[i] = to_float16(values[i]) if kind == nb_common.FLOAT16 else to_bfloat16(
                values[i])

    out = np.empty(values.shape[0], out_dtype)
    convert(values, nb_embedding._kind(dtype), out)
    return out


def _widen(bits, dtype):
    return _convert(bits, dtype, np.float32, nb_common.float16_to_float32,
                    nb_common.bfloat16_to_float32)


def _narrow(values, dtype):
    return _convert(values, dtype, np.uint16, nb_common.float32_to_float16,
                    nb_common.float32_to_bfloat16)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_conversions_are_pytorchs(dtype):
    """Every float16/bfloat16 bit pattern widens to PyTorch's float32 value, and float32
    values (random bit patterns: NaN, inf, subnormals, overflow, ties) narrow to PyTorch's
    rounding, bit for bit (any NaN for NaN)."""
    every = np.arange(1 << 16, dtype=np.uint16)
    widened = _widen(every, dtype)
    expected = torch.from_numpy(every.copy()).view(dtype).float().numpy()
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(widened), nan)
    assert np.array_equal(widened[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    gen = np.random.default_rng(5)
    values = np.concatenate([
        gen.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
        .view(np.float32),
        # ties and near-ties of both formats, the float16 edges
        (gen.integers(0, 1 << 16, size=20_000).astype(np.uint32) << 16 | 0x8000)
        .view(np.float32),
        (gen.integers(0, 1 << 19, size=20_000).astype(np.uint32) << 13 | 0x1000)
        .view(np.float32),
        np.array([65504, 65519.996, 65520, -65520, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                  2.0 ** -14, 0.0, -0.0, np.inf, -np.inf, 3.0e38], np.float32),
    ])
    narrowed = _narrow(values, dtype)
    expected = torch.from_numpy(values).to(dtype)
    nan = torch.isnan(expected).numpy()
    assert np.array_equal(narrowed[~nan], expected.view(torch.uint16).numpy()[~nan])
    assert torch.isnan(torch.from_numpy(narrowed[nan]).view(dtype)).all()


@pytest.mark.parametrize("dtype", TABLE_DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_and_backward_are_the_references_bits(dtype, id_dtype):
    """The bag sums run j ascending from zero as the reference's index_add_, and the
    backward forms each row as the reference does: bit for bit, half gradients included."""
    weight, _, ids, offsets, psw, grad_output = _update_inputs(dtype, Optimizer.SGD, 70,
                                                               seed=3, id_dtype=id_dtype)
    for pooling, weights in ((Pooling.SUM, None), (Pooling.SUM, psw), (Pooling.MEAN, None)):
        assert_bit_identical(nb.embedding_bag_forward(weight, ids, offsets, weights, pooling),
                             spec.embedding_bag_forward(weight, ids, offsets, weights, pooling))
        grads = grad_output.to(dtype)  # half gradients round each row to half
        weights = None if weights is None else weights.to(dtype)
        rows = nb.embedding_bag_backward(grads, ids, offsets, weights, pooling)
        assert rows.dtype == dtype
        assert_bit_identical(rows, spec.embedding_bag_backward(grads, ids, offsets, weights,
                                                                pooling))


@pytest.mark.parametrize("dtype", TABLE_DTYPES)
@pytest.mark.parametrize("optimizer", list(Optimizer))
@pytest.mark.parametrize("pooling", list(Pooling))
def test_backward_update_matches_the_reference(dtype, optimizer, pooling):
    """The fused step against the spec: bit for bit for SGD (the same float32 operations,
    stochastic rounding included), within the dtype's tolerance otherwise (PyTorch's
    vectorised sqrt and mean), and a half table lands on a neighbour of the spec's value."""
    weight, states, ids, offsets, psw, grad_output = _update_inputs(
        dtype, optimizer, 60, seed=int(optimizer) + 10 * int(pooling))
    psw = psw if pooling == Pooling.SUM else None
    for decay_mode in WeightDecay:
        ours = [weight.clone()] + [None if s is None else s.clone() for s in states]
        theirs = [weight.clone()] + [None if s is None else s.clone() for s in states]
        settings = _settings(optimizer, decay_mode)
        nb.embedding_bag_backward_update(*ours, grad_output, ids, offsets, psw, pooling,
                                         *settings)
        spec.embedding_bag_backward_update(*theirs, grad_output, ids, offsets, psw, pooling,
                                           *settings)
        assert not torch.equal(ours[0], weight)
        if optimizer == Optimizer.SGD:
            assert_bit_identical(ours, theirs)
        elif dtype in HALF_DTYPES:
            spacing = 2.0 ** (torch.floor(torch.log2(theirs[0].double().abs().clamp(
                min=2.0 ** -14))) - (10 if dtype == torch.float16 else 7))
            assert bool(((ours[0].double() - theirs[0].double()).abs()
                         <= 1.001 * spacing).all())
            assert_close_states(ours[1:], theirs[1:], torch.float32)
        else:
            assert_close_states(ours, theirs, dtype)


def assert_close_states(ours, theirs, dtype):
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize("dtype", TABLE_DTYPES)
@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_sparse_update_of_1d_tables(dtype, optimizer):
    """Biases: a 1-D table with 1-D gradient rows (half ones too) and 1-D states; the
    row-wise variants act element-wise."""
    weight, states, ids, _, _, _ = _update_inputs(dtype, optimizer, 80, seed=40, dims=1)
    gen = torch.Generator().manual_seed(41)
    grad_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    for rows in (torch.randn(ids.numel(), generator=gen, dtype=grad_dtype),
                 torch.randn(ids.numel(), generator=gen).to(dtype)):
        ours = [weight.clone()] + [None if s is None else s.clone() for s in states]
        theirs = [weight.clone()] + [None if s is None else s.clone() for s in states]
        settings = _settings(optimizer, WeightDecay.DECOUPLED, stochastic=False)
        nb.sparse_update(*ours, ids, rows, *settings)
        spec.sparse_update(*theirs, ids, rows, *settings)
        assert not torch.equal(ours[0], weight)
        if optimizer == Optimizer.SGD:
            assert_bit_identical(ours, theirs)
        else:
            tol = dtype if dtype not in HALF_DTYPES else torch.float32
            ours[0], theirs[0] = ours[0].double(), theirs[0].double()
            if dtype in HALF_DTYPES:  # nearest rounding: at most one half ulp apart
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-2, atol=1e-4)
                ours, theirs = ours[1:], theirs[1:]
            assert_close_states(ours, theirs, tol)


@pytest.mark.parametrize("dtype", TABLE_DTYPES)
def test_embedding_ops_do_not_depend_on_the_thread_count(monkeypatch, dtype):
    """Serial (small-batch path), one pool thread and every pool thread: the same bits."""
    weight, states, ids, offsets, psw, grad_output = _update_inputs(
        dtype, Optimizer.ROWWISE_ADAM, 2_000, seed=50)
    results = []
    for serial, threads in ((True, 1), (False, 1), (False, numba.config.NUMBA_NUM_THREADS)):
        monkeypatch.setattr(nb_common, "PARALLEL_MIN_SAMPLES", 1 << 62 if serial else 0)
        w = weight.clone()
        s = [None if t is None else t.clone() for t in states]
        with num_threads("numba", threads):
            out = nb.embedding_bag_forward(w, ids, offsets, psw, Pooling.SUM)
            rows = nb.embedding_bag_backward(grad_output, ids, offsets, None, Pooling.MEAN)
            nb.embedding_bag_backward_update(w, *s, grad_output, ids, offsets, psw,
                                             Pooling.SUM, *_settings(Optimizer.ROWWISE_ADAM))
            nb.sparse_update(w, *s, ids, rows, *_settings(Optimizer.ROWWISE_ADAM, step=4))
        results.append((out, rows, w, s))
    assert_bit_identical(results[0], results[1])
    assert_bit_identical(results[0], results[2])


def test_embedding_ops_compile_one_signature_per_storage_kind():
    """int32 and int64 ids, float16 and bfloat16 tables share compiled kernels."""
    for id_dtype in (torch.int32, torch.int64):
        for dtype in HALF_DTYPES:
            weight, states, ids, offsets, psw, grad_output = _update_inputs(
                dtype, Optimizer.ADAGRAD, 10, seed=60, id_dtype=id_dtype)
            nb.embedding_bag_forward(weight, ids, offsets, psw, Pooling.SUM)
            nb.embedding_bag_backward_update(weight, *states, grad_output, ids, offsets, None,
                                             Pooling.MEAN, *_settings(Optimizer.ADAGRAD))
    for kernel in (nb_embedding._forward_kernel, nb_embedding._update_kernel):
        half = [sig for sig in kernel.signatures if sig[0].dtype == numba.types.uint16]
        assert len(half) == 1, half


def test_empty_embedding_inputs():
    weight, states, _, _, _, _ = _update_inputs(torch.bfloat16, Optimizer.ADAM, 4, seed=70)
    before = [weight.clone()] + [s.clone() for s in states]
    no_ids = torch.zeros(0, dtype=torch.int64)
    out = nb.embedding_bag_forward(weight, no_ids, torch.zeros(4, dtype=torch.int64), None,
                                   Pooling.MEAN)
    assert out.shape == (3, EMB_DIM) and out.dtype == torch.float32 and not out.any()
    no_bags = torch.zeros(1, dtype=torch.int64)
    assert nb.embedding_bag_forward(weight, no_ids, no_bags, None, "sum").shape == (0, EMB_DIM)
    assert nb.embedding_bag_backward(torch.ones(3, EMB_DIM), no_ids,
                                     torch.zeros(4, dtype=torch.int64), None,
                                     "mean").shape == (0, EMB_DIM)
    nb.sparse_update(weight, *states, no_ids, torch.zeros(0, EMB_DIM), *_settings(3))
    nb.embedding_bag_backward_update(weight, *states, torch.ones(3, EMB_DIM), no_ids,
                                     torch.zeros(4, dtype=torch.int64), None, "sum",
                                     *_settings(3))
    assert_bit_identical(before, [weight] + states)


def _bad_embedding_calls(weight, states, ids, offsets, grad_output):
    """(name, call(module)) pairs, each with one bad input found only by reading values
    (or by the structural checks), for the numba kernels and the spec alike."""
    bad_offsets = offsets.clone()
    bad_offsets[0] = 1
    decreasing = offsets.clone()
    decreasing[2], decreasing[3] = decreasing[3] + 1, decreasing[2]
    bad_ids = ids.clone()
    bad_ids[-1] = EMB_ROWS
    rows = torch.ones(ids.numel(), EMB_DIM)
    settings = _settings(Optimizer.ADAGRAD)
    return {
        "forward offsets": lambda k: k.embedding_bag_forward(weight, ids, bad_offsets, None,
                                                             "sum"),
        "forward id": lambda k: k.embedding_bag_forward(weight, bad_ids, offsets, None, "sum"),
        "forward psw mean": lambda k: k.embedding_bag_forward(
            weight, ids, offsets, torch.ones(ids.numel()), "mean"),
        "backward offsets": lambda k: k.embedding_bag_backward(grad_output, ids, decreasing,
                                                               None, "sum"),
        "sparse id": lambda k: k.sparse_update(weight, *states, bad_ids, rows, *settings),
        "sparse rows": lambda k: k.sparse_update(weight, *states, ids, rows[1:], *settings),
        "sparse state": lambda k: k.sparse_update(weight, states[0][1:], None, ids, rows,
                                                  *settings),
        "sparse lr": lambda k: k.sparse_update(weight, *states, ids, rows, Optimizer.ADAGRAD,
                                               float("nan"), *settings[2:]),
        "fused offsets": lambda k: k.embedding_bag_backward_update(
            weight, *states, grad_output, ids, bad_offsets, None, "sum", *settings),
        "fused offsets and state": lambda k: k.embedding_bag_backward_update(
            weight, states[0].double(), None, grad_output, ids, decreasing, None, "sum",
            *settings),
        "fused id": lambda k: k.embedding_bag_backward_update(
            weight, *states, grad_output, bad_ids, offsets, None, "sum", *settings),
        "fused grad dtype": lambda k: k.embedding_bag_backward_update(
            weight, *states, grad_output.double(), ids, offsets, None, "sum", *settings),
    }


BAD_EMBEDDING_CASES = ["forward offsets", "forward id", "forward psw mean", "backward offsets",
                       "sparse id", "sparse rows", "sparse state", "sparse lr",
                       "fused offsets", "fused offsets and state", "fused id",
                       "fused grad dtype"]


@pytest.mark.parametrize("case", BAD_EMBEDDING_CASES)
def test_bad_embedding_inputs_raise_the_references_error(case):
    """The spec's exception and message (its checks' order too), and nothing written."""
    weight, states, ids, offsets, _, grad_output = _update_inputs(torch.float32,
                                                                  Optimizer.ADAGRAD, 20,
                                                                  seed=80)
    before = [weight.clone(), states[0].clone()]
    calls = _bad_embedding_calls(weight, states, ids, offsets, grad_output)
    assert sorted(calls) == sorted(BAD_EMBEDDING_CASES)
    call = calls[case]
    with pytest.raises(Exception) as expected:
        call(spec)
    with pytest.raises(type(expected.value)) as got:
        call(nb)
    assert str(got.value) == str(expected.value)
    assert_bit_identical(before, [weight, states[0]])


def test_embedding_ops_reject_other_devices():
    weight, states, ids, offsets, psw, grad_output = _update_inputs(torch.float32,
                                                                    Optimizer.ADAGRAD, 8,
                                                                    seed=90)
    message = "numba backend runs on CPU tensors only; use backend='native' for CUDA"
    meta = weight.to("meta")
    with pytest.raises(ValueError, match=message):
        nb.embedding_bag_forward(meta, ids, offsets, None, "sum")
    with pytest.raises(ValueError, match=message):
        nb.embedding_bag_backward(grad_output, ids, offsets.to("meta"), None, "sum")
    with pytest.raises(ValueError, match=message):
        nb.sparse_update(weight, states[0].to("meta"), None, ids, torch.ones(ids.numel(),
                                                                              EMB_DIM),
                         *_settings(Optimizer.ADAGRAD))
    before = weight.clone()
    with pytest.raises(ValueError, match=message):
        nb.embedding_bag_backward_update(weight, *states, grad_output.to("meta"), ids, offsets,
                                         None, "sum", *_settings(Optimizer.ADAGRAD))
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("stochastic", [True, False])
def test_half_write_back_is_the_references_bits(dtype, stochastic):
    """An SGD step with lr 1 from zero rows writes the float32 values v = -g exactly, so the
    half bits written are the rounding alone: the spec's, at its edges too (overflow,
    float16 subnormals, a carry to inf, NaN, inf), for each counter r * K + c."""
    values = torch.tensor([1.0, -1.0, 0.1, -0.1, 3.14159, 1e-3, -7e-4, 65000.0, -65503.0,
                           65519.0, 1e-5, -3e-6, 1e-40, 0.0, 70000.0, float("inf"),
                           float("-inf"), float("nan"), 3.0e38, -3.3e38, 123.456])
    gen = torch.Generator().manual_seed(100)
    rows = values[torch.randint(0, values.numel(), (values.numel() * 20, 3), generator=gen)]
    ids = torch.randperm(rows.shape[0], generator=gen)  # every row once, in shuffled order
    results = []
    for kernels in (nb, spec):
        weight = torch.zeros(rows.shape, dtype=dtype)
        kernels.sparse_update(weight, None, None, ids, -rows, Optimizer.SGD, 1.0, 0.0, 0.9,
                              0.999, 0.0, WeightDecay.NONE, 5, 2**62 + 9, stochastic)
        results.append(weight)
    assert_bit_identical(results[0], results[1])
