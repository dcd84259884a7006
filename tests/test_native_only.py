"""What only the native backend has: the ``torch.ops.fastmf`` registrations.

``torch.library.opcheck`` (schema and what it mutates, fake kernel, autograd registration,
AOT dispatch) of the pointwise, pairwise and embedding_bag ops, ``torch.compile(fullgraph=True)``
of the fused steps, and gradcheck of ``mf_forward``'s registered autograd formula. The ops' values
are tested against the spec with every other backend in ``test_pointwise.py``,
``test_pairwise.py`` and ``test_embedding.py``; the top-k op's registrations in
``test_topk.py``. Here also: the embedding_bag ops' input errors equal the reference's, word
for word, and their hot-row sums do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs, PairwiseLoss, native
from fastmf.ops import reference as spec
from fastmf.ops.checks import row_state_shapes
from fastmf.ops.codes import Pooling, WeightDecay
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
    tolerance,
    zipf_ids,
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
        "mf_backward_dense": (ops.mf_backward_dense.default, (targets, users, items, P, Q)),
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


# --- the embedding_bag family -----------------------------------------------------------

def _bag_inputs(num_rows, dim, num_bags, *, seed, max_size=5, id_dtype=torch.int64,
                dtype=torch.float32):
    """weight (N, K), Zipf indices in bags of 0..max_size (bag 1 empty), offsets (B+1,),
    per-sample weights and grad_output in the accumulation type."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sizes = rng.integers(0, max_size + 1, size=num_bags)
    sizes[min(1, num_bags - 1)] = 0
    indices = zipf_ids(num_rows, int(sizes.sum()), generator=rng, dtype=id_dtype)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])).to(id_dtype)
    weight = (torch.randn(num_rows, dim, generator=gen) * 0.1).to(dtype)
    psw = torch.rand(indices.numel(), generator=gen, dtype=acc) + 0.5
    grad_output = torch.randn(num_bags, dim, generator=gen, dtype=acc)
    return weight, indices, offsets, psw, grad_output


def _states(optimizer, weight, seed):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return [None if shape is None else torch.rand(shape, generator=gen, dtype=acc)
            for shape in row_state_shapes(optimizer, weight)]


def _settings(optimizer, *, stochastic=False):
    """(optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode, step, seed,
    stochastic_rounding) as the flat schemas take them."""
    return (int(optimizer), 0.05, 1e-3, 0.8, 0.95, 0.01, int(WeightDecay.L2), 3, 77,
            stochastic)


def embedding_opcheck_cases():
    weight, indices, offsets, psw, grad_output = _bag_inputs(30, 8, 12, seed=11)
    half, *_ = _bag_inputs(30, 8, 12, seed=11, dtype=torch.bfloat16)
    rows = spec.embedding_bag_backward(grad_output, indices, offsets, psw, Pooling.SUM)
    adam = _states(Optimizer.ADAM, weight, 12)
    rowwise = _states(Optimizer.ROWWISE_ADAGRAD, weight, 13)
    half_states = _states(Optimizer.ROWWISE_ADAM, half, 14)
    ops = torch.ops.fastmf
    return {
        "forward_sum_psw": (ops.embedding_bag_forward.default,
                            (weight, indices, offsets, psw, int(Pooling.SUM))),
        "forward_requires_grad": (ops.embedding_bag_forward.default,
                                  (weight.clone().requires_grad_(), indices, offsets,
                                   psw.clone().requires_grad_(), int(Pooling.SUM))),
        "forward_mean_int32": (ops.embedding_bag_forward.default,
                               (weight, indices.int(), offsets.int(), None,
                                int(Pooling.MEAN))),
        "forward_bfloat16": (ops.embedding_bag_forward.default,
                             (half, indices, offsets, None, int(Pooling.SUM))),
        "backward_mean": (ops.embedding_bag_backward.default,
                          (grad_output, indices, offsets, None, int(Pooling.MEAN))),
        "sparse_update_adam": (ops.sparse_update.default,
                               (weight.clone(), *clone_all(*adam), indices, rows,
                                *_settings(Optimizer.ADAM))),
        "sparse_update_sgd_bias": (ops.sparse_update.default,
                                   (weight[:, 0].clone(), None, None, indices, rows[:, 0],
                                    *_settings(Optimizer.SGD))),
        "backward_update_rowwise": (ops.embedding_bag_backward_update.default,
                                    (weight.clone(), rowwise[0].clone(), None, grad_output,
                                     indices, offsets, psw, int(Pooling.SUM),
                                     *_settings(Optimizer.ROWWISE_ADAGRAD))),
        "backward_update_bfloat16_stochastic": (
            ops.embedding_bag_backward_update.default,
            (half.clone(), *clone_all(*half_states), grad_output, indices, offsets, None,
             int(Pooling.MEAN), *_settings(Optimizer.ROWWISE_ADAM, stochastic=True))),
        "backward_update_pair_adam": (
            ops.embedding_bag_backward_update_pair.default,
            (weight.clone(), *clone_all(*adam), grad_output, weight[:, :1].clone(),
             *clone_all(*_states(Optimizer.ADAM, weight[:, :1], 15)),
             grad_output[:, :1].contiguous(), indices, offsets, psw, int(Pooling.SUM),
             *_settings(Optimizer.ADAM), 4, 78, False)),
    }


@pytest.mark.parametrize("case", list(embedding_opcheck_cases()))
def test_embedding_opcheck(case):
    op, args = embedding_opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_embedding_has_kernel():
    for op in ("embedding_bag_forward", "embedding_bag_backward", "sparse_update",
               "embedding_bag_backward_update", "embedding_bag_backward_update_pair"):
        assert native.has_kernel("cpu", op)


def test_embedding_step_under_compile():
    """fullgraph torch.compile of a bag forward and the fused backward + Adam step (the
    native ops' fake kernels; the in-place updates survive functionalization)."""
    weight, indices, offsets, psw, _ = _bag_inputs(40, 8, 16, seed=21)
    states = _states(Optimizer.ADAM, weight, 22)
    target = torch.randn(16, 8, generator=torch.Generator().manual_seed(23))

    def step(kernels, weight, exp_avg, exp_avg_sq):
        out = kernels.embedding_bag_forward(weight, indices, offsets, psw, Pooling.SUM)
        grad = 2 * (out - target) / out.numel()
        kernels.embedding_bag_backward_update(weight, exp_avg, exp_avg_sq, grad, indices,
                                              offsets, psw, Pooling.SUM, Optimizer.ADAM, 0.01,
                                              1e-8, 0.9, 0.999, 0.0, WeightDecay.NONE, 1, 0,
                                              False)
        return out

    got = clone_all(weight, *states)
    want = clone_all(weight, *states)
    out = torch.compile(lambda *t: step(native, *t), fullgraph=True)(*got)
    expected = single_threaded(step, spec, *want)
    assert_close_all(out, expected, torch.float32)
    assert_close_all(got, want, torch.float32)
    assert not torch.equal(got[0], weight)


def _call_both(name, *args):
    """(exception type, message) of the reference and of the native op for one call."""
    raised = []
    for module in (spec, native):
        with pytest.raises((TypeError, ValueError, IndexError)) as info:
            getattr(module, name)(*args)
        raised.append((info.type, str(info.value).splitlines()[0]))
    return raised


def embedding_error_cases():
    w, idx, off, psw, go = _bag_inputs(20, 4, 6, seed=31)
    adagrad = _states(Optimizer.ADAGRAD, w, 32)
    rows = spec.embedding_bag_backward(go, idx, off, None, Pooling.SUM)
    sgd = _settings(Optimizer.SGD)
    bad_id = idx.clone()
    bad_id[2] = 20
    negative = idx.clone()
    negative[0] = -3
    drop = off.clone()
    drop[3] = drop[2] - 1 if int(drop[2]) > 0 else 5
    fwd = "embedding_bag_forward"
    bwd = "embedding_bag_backward"
    upd = "sparse_update"
    fused = "embedding_bag_backward_update"
    return {
        "forward_int_weight": (fwd, w.int(), idx, off, None, 0),
        "forward_1d_weight": (fwd, w[:, 0], idx, off, None, 0),
        "forward_float_ids": (fwd, w, idx.float(), off, None, 0),
        "forward_2d_ids": (fwd, w, idx.view(1, -1), off, None, 0),
        "forward_offsets_dtype": (fwd, w, idx, off.int(), None, 0),
        "forward_no_offsets": (fwd, w, idx, off[:0], None, 0),
        "forward_pooling_code": (fwd, w, idx, off, None, 2),
        "forward_psw_mean": (fwd, w, idx, off, psw, 1),
        "forward_psw_dtype": (fwd, w, idx, off, psw.double(), 0),
        "forward_psw_shape": (fwd, w, idx, off, psw[1:], 0),
        "forward_offsets_start": (fwd, w, idx, off + 1, None, 0),
        "forward_offsets_order": (fwd, w, idx, drop, None, 0),
        "forward_offsets_past_end": (fwd, w, idx[:-1], off, None, 0),
        "forward_offsets_short": (fwd, w, torch.cat([idx, idx[:1]]), off, None, 0),
        "forward_id_high": (fwd, w, bad_id, off, None, 0),
        "forward_id_negative": (fwd, w, negative, off, None, 0),
        "backward_rows": (bwd, go[1:], idx, off, None, 0),
        "backward_int32_offsets": (bwd, go, idx, off.int(), None, 1),
        "update_lr": (upd, w, None, None, idx, rows, 0, float("nan"), *sgd[2:]),
        "update_beta": (upd, w, *adagrad, idx, rows, 1, 0.1, 0.0, 1.0, 0.9, 0.0, 0, 1, 0,
                        False),
        "update_step": (upd, w, None, None, idx, rows, 0, 0.1, 0.0, 0.9, 0.9, 0.0, 0, 0, 0,
                        False),
        "update_optimizer": (upd, w, None, None, idx, rows, 5, *sgd[1:]),
        "update_decay_mode": (upd, w, None, None, idx, rows, 0, 0.1, 0.0, 0.9, 0.9, 0.0, 3,
                              1, 0, False),
        "update_grad_dtype": (upd, w, None, None, idx, rows.double(), *sgd),
        "update_grad_columns": (upd, w, None, None, idx, rows[:, :3], *sgd),
        "update_missing_state": (upd, w, None, None, idx, rows, *_settings(Optimizer.ADAM)),
        "update_extra_state": (upd, w, adagrad[0], None, idx, rows, *sgd),
        "update_state_shape": (upd, w, adagrad[0][:, :2], None, idx, rows,
                               *_settings(Optimizer.ADAGRAD)),
        "update_state_dtype": (upd, w, adagrad[0].double(), None, idx, rows,
                               *_settings(Optimizer.ADAGRAD)),
        "update_shared_memory": (upd, w, w, None, idx, rows, *_settings(Optimizer.ADAGRAD)),
        "update_lengths": (upd, w, None, None, idx[1:], rows, *sgd),
        "update_id_high": (upd, w, None, None, bad_id, rows, *sgd),
        "update_half_grad_dtype": (upd, w.half(), None, None, idx, rows.double(), *sgd),
        "fused_1d_weight": (fused, w[:, 0], None, None, go, idx, off, None, 0, *sgd),
        "fused_grad_columns": (fused, w, None, None, go[:, :3], idx, off, None, 0, *sgd),
        "fused_grad_dtype": (fused, w, None, None, go.double(), idx, off, None, 0, *sgd),
        "fused_rowwise_state": (fused, w, adagrad[0], None, go, idx, off, None, 0,
                                *_settings(Optimizer.ROWWISE_ADAGRAD)),
        "fused_id_negative": (fused, w, None, None, go, negative, off, None, 0, *sgd),
        "fused_decay": (fused, w, None, None, go, idx, off, None, 0, 0, 0.1, 0.0, 0.9, 0.9,
                        -1.0, 1, 1, 0, False),
        "fused_seed": (fused, w, None, None, go, idx, off, None, 0, 0, 0.1, 0.0, 0.9, 0.9,
                       0.0, 1, 1, -1, False),
    }


@pytest.mark.parametrize("case", list(embedding_error_cases()))
def test_embedding_errors_match_reference(case):
    """Every bad input raises the reference's exception type and message, before any
    write."""
    name, *args = embedding_error_cases()[case]
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    want, got = _call_both(name, *args)
    assert got == want
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_hot_rows_do_not_depend_on_thread_count(optimizer):
    """Runs long enough to be summed in chunks (Zipf over a tiny table): the same bits on
    1 and 2 threads, for the fused and the unfused step, and the reference's numbers."""
    weight, indices, offsets, psw, grad_output = _bag_inputs(12, 16, 8000, seed=41,
                                                             max_size=8)
    counts = torch.bincount(indices)
    assert int(counts.max()) > 3 * 2048  # several chunks in the hottest run
    states = _states(optimizer, weight, 42)
    settings = _settings(optimizer)
    results = []
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fused = clone_all(weight, *[s for s in states if s is not None])
            table = [fused[0], None, None]
            table[1:1 + len(fused) - 1] = fused[1:]
            native.embedding_bag_backward_update(*table, grad_output, indices, offsets, psw,
                                                 Pooling.SUM, *settings)
            unfused = clone_all(weight, *[s for s in states if s is not None])
            table2 = [unfused[0], None, None]
            table2[1:1 + len(unfused) - 1] = unfused[1:]
            rows = native.embedding_bag_backward(grad_output, indices, offsets, psw,
                                                 Pooling.SUM)
            native.sparse_update(*table2, indices, rows, *settings)
        finally:
            torch.set_num_threads(saved)
        for a, b in zip(fused, unfused):
            assert torch.equal(a, b)
        results.append(fused)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expected = clone_all(weight, *[s for s in states if s is not None])
    table3 = [expected[0], None, None]
    table3[1:1 + len(expected) - 1] = expected[1:]
    spec.embedding_bag_backward_update(*table3, grad_output, indices, offsets, psw,
                                       Pooling.SUM, *settings)
    # Chunked sums of ~10^4 float32 terms that largely cancel differ from the sequential
    # ones by more than the usual tolerance; a chunk left out or counted twice would be off
    # by a whole chunk's sum.
    for a, b in zip(results[0], expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert not torch.equal(results[0][0], weight)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_large_batches_do_not_depend_on_thread_count(id_dtype):
    """From 2^15 ids on, ids are widened and grouped on the intra-op threads (a parallel
    radix sort and run search, csrc/cpu/segments.h): the fused and unfused embedding steps,
    the bag forward and the sparse Adagrad/SGD updates give the same bits on 1, 2 and 3
    threads, and the reference's numbers. Zipf ids over 50,000 rows, so runs cross the
    chunk boundaries; 9,000 bags of up to 8 ids (about 36,000 ids) and one batch of 70,000
    ids."""
    weight, indices, offsets, psw, grad_output = _bag_inputs(50_000, 16, 9000, seed=51,
                                                             max_size=8, id_dtype=id_dtype)
    assert indices.numel() >= 2**15
    rng = np.random.default_rng(52)
    ids = zipf_ids(50_000, 70_000, generator=rng, dtype=id_dtype)
    grad_rows = torch.randn(70_000, 16, generator=torch.Generator().manual_seed(53))
    optimizer = Optimizer.ROWWISE_ADAM
    states = _states(optimizer, weight, 54)
    settings = _settings(optimizer)

    def run():
        bag_table = clone_all(weight, *states)
        native.embedding_bag_backward_update(*bag_table, grad_output, indices, offsets, psw,
                                             Pooling.SUM, *settings)
        rows = native.embedding_bag_backward(grad_output, indices, offsets, psw, Pooling.SUM)
        unfused = clone_all(weight, *states)
        native.sparse_update(*unfused, indices, rows, *settings)
        forward = native.embedding_bag_forward(weight, indices, offsets, psw, Pooling.SUM)
        adagrad = clone_all(weight, states[1].unsqueeze(1).expand(-1, 16).contiguous())
        native.sparse_adagrad_update(*adagrad, ids, grad_rows, 0.05, 1e-3, False)
        sgd = weight.clone()
        native.sparse_sgd_update(sgd, ids, grad_rows, 0.05)
        return [*bag_table, *unfused, forward, *adagrad, sgd]

    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    fused, unfused = results[0][:3], results[0][3:6]
    for a, b in zip(fused, unfused, strict=True):
        assert torch.equal(a, b)
    expected = clone_all(weight, *states)
    spec.embedding_bag_backward_update(*expected, grad_output, indices, offsets, psw,
                                       Pooling.SUM, *settings)
    for a, b in zip(fused, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    want_sgd = weight.clone().index_add_(0, ids.long(), grad_rows, alpha=-0.05)
    torch.testing.assert_close(results[0][-1], want_sgd, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused[0], weight)


@pytest.mark.parametrize("bad", [-3, 50_000])
def test_large_batch_bad_id_is_reported_like_a_small_one(bad):
    """The chunked id check names the same id as the serial one, on any chunk, and nothing
    is written."""
    weight, indices, offsets, psw, grad_output = _bag_inputs(50_000, 8, 9000, seed=55,
                                                             max_size=8)
    states = _states(Optimizer.ADAGRAD, weight, 56)
    for position in (0, indices.numel() // 2 + 1, indices.numel() - 1):
        bad_indices = indices.clone()
        bad_indices[position] = bad
        table = clone_all(weight, *states)
        saved = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            with pytest.raises(IndexError, match=f"indices id {bad} out of range"):
                native.embedding_bag_backward_update(
                    *table, grad_output, bad_indices, offsets, psw, Pooling.SUM,
                    *_settings(Optimizer.ADAGRAD))
        finally:
            torch.set_num_threads(saved)
        assert torch.equal(table[0], weight) and torch.equal(table[1], states[0])


def test_strided_table_is_updated_in_place():
    """A non-contiguous table (a column slice) is updated through a copy written back;
    the rows no id touches keep their values."""
    weight, indices, offsets, psw, grad_output = _bag_inputs(30, 6, 10, seed=51)
    wide = torch.randn(30, 10, generator=torch.Generator().manual_seed(52))
    wide[:, 2:8] = weight
    view = wide[:, 2:8]
    assert not view.is_contiguous()
    expected = weight.clone()
    settings = (int(Optimizer.SGD), 0.1, 0.0, 0.9, 0.999, 0.0, 0, 1, 0, False)
    spec.embedding_bag_backward_update(expected, None, None, grad_output, indices, offsets,
                                       psw, Pooling.SUM, *settings)
    untouched = wide.clone()
    native.embedding_bag_backward_update(view, None, None, grad_output, indices, offsets, psw,
                                         Pooling.SUM, *settings)
    torch.testing.assert_close(view, expected, **tolerance(torch.float32))
    assert torch.equal(wide[:, :2], untouched[:, :2]) and torch.equal(wide[:, 8:],
                                                                     untouched[:, 8:])


@pytest.mark.parametrize("lr", [-1.0, -0.1, -1e-05, -0.0001, -123.25, -1e16, -1.5e22,
                                -1234567890123456.0, float("-inf")])
def test_setting_messages_print_floats_as_python(lr):
    """The C++ checks show a bad setting as Python's repr() does (-1.0, -1e-05, -1e+16)."""
    w, idx, off, _, _ = _bag_inputs(20, 4, 6, seed=61)
    rows = torch.ones(idx.numel(), 4)
    settings = (int(Optimizer.SGD), lr, *_settings(Optimizer.SGD)[2:])
    want, got = _call_both("sparse_update", w, None, None, idx, rows, *settings)
    assert got == want
    assert want[1].endswith(f"got {lr!r}")


@pytest.mark.parametrize("pooling", list(Pooling))
def test_embedding_bag_forward_gradcheck(pooling):
    """The registered autograd formula: a dense weight gradient and, with SUM, the
    per-sample weights' gradient."""
    weight, indices, offsets, psw, _ = _bag_inputs(12, 3, 7, seed=71, dtype=torch.float64,
                                                   id_dtype=torch.int32)
    inputs = [weight.requires_grad_()]
    if pooling == Pooling.SUM:
        inputs.append(psw.requires_grad_())

    def fn(weight, *psw):
        return native.embedding_bag_forward(weight, indices, offsets, psw[0] if psw else None,
                                            pooling)

    assert torch.autograd.gradcheck(fn, inputs)
