"""The CUDA kernels against fastmf.ops.reference (computed on the CPU): every op, both id and
weight dtypes, Zipf batches with hot rows, all losses and optimizers over 20 steps,
bit-identical reruns, CUDA-graph replay, and bad ids / NaN targets. Skipped without a GPU;
tests/test_cuda_emulated.py runs the same checks on the CPU through the kernels' source."""

import _cuda_cases as cases
import numpy as np
import pytest
import torch

import fastmf.ops
from fastmf._extension import native_build_info
from fastmf.testing import (
    BATCH_SIZES,
    ID_DTYPES,
    WEIGHT_DTYPES,
    make_batch,
    make_tables,
    requires_cuda,
)

pytestmark = [
    requires_cuda,
    pytest.mark.skipif(not native_build_info().get("cuda"), reason="fastmf built without CUDA"),
]

CUDA = cases.Target("cuda", "cuda", torch.ops.fastmf, fastmf.ops.check_device_errors)
ID_PAIRS = [(torch.int64, torch.int64), (torch.int32, torch.int32), (torch.int32, torch.int64)]


@pytest.fixture(autouse=True)
def no_leftover_errors():
    cases.clear_errors(CUDA)
    yield
    cases.clear_errors(CUDA)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("ids", ID_PAIRS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dim", [16, 3, 64, 130])
def test_mf_forward(batch, ids, dtype, bias, dim):
    cases.check_forward(CUDA, batch, *ids, dtype, bias, dim=dim)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("ids", ID_PAIRS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("dim", [16, 5, 128])
def test_mf_backward(batch, ids, dtype, dim):
    cases.check_backward(CUDA, batch, *ids, dtype, dim=dim)


@pytest.mark.parametrize("kind", cases.OPT_NAMES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 8, 32, 33, 64, 256])
def test_sparse_update(kind, batch, id_dtype, dtype, dim):
    cases.check_sparse_update(CUDA, kind, batch, id_dtype, dtype, dim)


@pytest.mark.parametrize("kind", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("batch", [20000, 300000])
def test_sparse_update_hot_rows(kind, dtype, batch):
    # Few rows and a steep Zipf: the hottest row spans thousands of slots, so it goes
    # through the multi-tile and the block-per-row paths.
    cases.check_sparse_update(CUDA, kind, batch, torch.int64, dtype, 64, num_rows=7,
                              exponent=1.5)


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_sparse_update_bad_ids(kind):
    cases.check_sparse_update_bad_ids(CUDA, kind)


@pytest.mark.parametrize("loss", cases.LOSS_NAMES)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("ids", ID_PAIRS[:2])
@pytest.mark.parametrize("bias", [True, False])
def test_train_step_20_steps(loss, optimizer, dtype, ids, bias):
    cases.run_train_steps(CUDA, loss, optimizer, 20, 4096, *ids, dtype, bias=bias)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dim", [1, 3, 16, 64, 128, 200])
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_shapes(batch, dim, optimizer):
    cases.run_train_steps(CUDA, "mse", optimizer, 2, batch, torch.int64, torch.int32,
                          torch.float32, dim=dim)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_hot_rows(optimizer):
    # 200k samples over 50 items: runs of thousands of slots in the item table.
    cases.run_train_steps(CUDA, "mse", optimizer, 3, 200_000, torch.int64, torch.int64,
                          torch.float32, num_users=100_000, num_items=50, dim=32)


@pytest.mark.parametrize("loss", cases.LOSS_NAMES)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_bit_identical(loss, optimizer, dtype):
    cases.train_twice_bitwise(CUDA, loss, optimizer, 4096, dtype)


@pytest.mark.parametrize("what", ["users", "items", "targets"])
def test_train_step_bad_samples(what):
    cases.check_train_step_bad_samples(CUDA, what)


def test_forward_bad_ids():
    cases.check_forward_bad_ids(CUDA)


def test_host_side_errors():
    cases.check_host_side_errors(CUDA)


def test_check_device_errors_refuses_capture():
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="graph"):
        with torch.cuda.graph(g):
            fastmf.ops.check_device_errors()


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_cuda_graph_replay_equals_eager(optimizer, dtype):
    """A captured train_step replayed on new batches gives exactly the eager results: no
    host sync, no data-dependent allocation."""
    n_users, n_items, dim, batch, steps = 500, 100, 32, 4096, 5
    ocode = cases.optimizer_code(optimizer)
    start = make_tables(n_users, n_items, dim, dtype=dtype, seed=11)
    eager = [t.cuda() for t in start]
    eager += list(cases.make_states(optimizer, *eager))
    graphed = [None if t is None else t.clone() for t in eager]
    batches = [CUDA.to(*make_batch(n_users, n_items, batch, dtype=dtype, seed=100 + s))
               for s in range(steps)]
    static = [t.clone() for t in batches[0]]

    # Warm up on a side stream (first-use initialisation stays out of the graph), then
    # restore the tables.
    backup = [None if t is None else t.clone() for t in graphed]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.ops.fastmf.train_step(*graphed, *static, 3.0, cases.MSE, 0.01, ocode, cases.LR,
                                        cases.EPS)
    torch.cuda.current_stream().wait_stream(side)
    for t, b in zip(graphed, backup, strict=False):
        if t is not None:
            t.copy_(b)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = torch.ops.fastmf.train_step(*graphed, *static, 3.0, cases.MSE, 0.01, ocode,
                                                  cases.LR, cases.EPS)
    for batch in batches:
        eager_loss = torch.ops.fastmf.train_step(*eager, *batch, 3.0, cases.MSE, 0.01, ocode,
                                                 cases.LR, cases.EPS)
        for s, b in zip(static, batch, strict=False):
            s.copy_(b)
        graph.replay()
        assert torch.equal(static_loss, eager_loss)
    for a, b in zip(graphed, eager, strict=False):
        if a is not None:
            assert torch.equal(a, b)


def test_cpu_and_cuda_agree():
    """Same batch, same start: the CPU kernels (when built) and the CUDA kernels give the
    same tables to rounding, so switching devices does not change the model."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastmf::train_step", "CPU"):
        pytest.skip("CPU kernels not built")
    p, q, bu, bi = make_tables(300, 50, 32, seed=2)
    users, items, targets = make_batch(300, 50, 4096, seed=2)
    tables_cpu = [p.clone(), q.clone(), bu.clone(), bi.clone()]
    tables_cpu += list(cases.make_states("adagrad", *tables_cpu))
    tables_gpu = [t.cuda() for t in tables_cpu]
    for _ in range(3):
        l_cpu = torch.ops.fastmf.train_step(*tables_cpu, users, items, targets, 3.0, cases.MSE,
                                            0.01, cases.ADAGRAD, cases.LR, cases.EPS)
        l_gpu = torch.ops.fastmf.train_step(*tables_gpu, *CUDA.to(users, items, targets), 3.0,
                                            cases.MSE, 0.01, cases.ADAGRAD, cases.LR, cases.EPS)
        cases.assert_close(l_gpu, l_cpu, torch.float32)
    for a, b in zip(tables_gpu, tables_cpu, strict=False):
        cases.assert_close(a, b, torch.float32)


# train_step_pairwise (BPR)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("ids", ID_PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_train_step_pairwise_20_steps(optimizer, dtype, ids, bias):
    cases.run_pairwise_steps(CUDA, optimizer, 20, 4096, *ids, dtype, bias=bias)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dim", [1, 3, 16, 64, 128, 200])
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_pairwise_shapes(batch, dim, optimizer):
    cases.run_pairwise_steps(CUDA, optimizer, 2, batch, torch.int64, torch.int32,
                             torch.float32, dim=dim)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_pairwise_hot_rows(optimizer, dtype):
    # 2 * 200k item slots over 50 Zipf items: the hottest runs span thousands of slots
    # (the block-per-row path) and mix positive and negative slots.
    cases.run_pairwise_steps(CUDA, optimizer, 3, 200_000, torch.int64, torch.int64, dtype,
                             num_users=100_000, num_items=50, dim=32, exponent=1.2)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_pairwise_same_item(optimizer):
    cases.check_pairwise_same_item(CUDA, optimizer)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_train_step_pairwise_bit_identical(optimizer, dtype):
    cases.pairwise_twice_bitwise(CUDA, optimizer, 65_536, dtype, num_items=200, exponent=1.2)


@pytest.mark.parametrize("what", ["users", "items", "neg_items"])
def test_train_step_pairwise_bad_samples(what):
    cases.check_pairwise_bad_samples(CUDA, what)


def test_train_step_pairwise_host_side_errors():
    cases.check_pairwise_host_side_errors(CUDA)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_pairwise_cuda_graph_replay_equals_eager(optimizer, dtype):
    """A captured train_step_pairwise replayed on new batches gives exactly the eager
    results: no host sync, no data-dependent allocation."""
    n_users, n_items, dim, batch, steps = 500, 100, 32, 4096, 5
    ocode = cases.optimizer_code(optimizer)
    start = make_tables(n_users, n_items, dim, dtype=dtype, seed=11)
    eager = [t.cuda() for t in start]
    eager += list(cases.make_states(optimizer, *eager))
    graphed = [None if t is None else t.clone() for t in eager]
    batches = [CUDA.to(*cases.make_triples(n_users, n_items, batch, seed=100 + s))
               for s in range(steps)]
    static = [t.clone() for t in batches[0]]

    def step(tables, ids):
        return torch.ops.fastmf.train_step_pairwise(*tables, *ids, cases.BPR, 0.01, ocode,
                                                    cases.LR, cases.EPS)

    # Warm up on a side stream (first-use initialisation stays out of the graph), then
    # restore the tables.
    backup = [None if t is None else t.clone() for t in graphed]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(graphed, static)
    torch.cuda.current_stream().wait_stream(side)
    for t, b in zip(graphed, backup, strict=False):
        if t is not None:
            t.copy_(b)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, static)
    for ids in batches:
        eager_loss = step(eager, ids)
        for s, b in zip(static, ids, strict=False):
            s.copy_(b)
        graph.replay()
        assert torch.equal(static_loss, eager_loss)
    for a, b in zip(graphed, eager, strict=False):
        if a is not None:
            assert torch.equal(a, b)


def test_pairwise_cpu_and_cuda_agree():
    """Same triples, same start: the CPU kernel (when built) and the CUDA kernel give the
    same tables to rounding."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastmf::train_step_pairwise", "CPU"):
        pytest.skip("CPU kernels not built")
    p, q, bu, bi = make_tables(300, 50, 32, seed=2)
    users, pos, neg = cases.make_triples(300, 50, 4096, seed=2)
    tables_cpu = [p.clone(), q.clone(), bu.clone(), bi.clone()]
    tables_cpu += list(cases.make_states("adagrad", *tables_cpu))
    tables_gpu = [t.cuda() for t in tables_cpu]
    for _ in range(3):
        l_cpu = torch.ops.fastmf.train_step_pairwise(*tables_cpu, users, pos, neg, cases.BPR,
                                                     0.01, cases.ADAGRAD, cases.LR, cases.EPS)
        l_gpu = torch.ops.fastmf.train_step_pairwise(*tables_gpu, *CUDA.to(users, pos, neg),
                                                     cases.BPR, 0.01, cases.ADAGRAD, cases.LR,
                                                     cases.EPS)
        cases.assert_close(l_gpu, l_cpu, torch.float32)
    for a, b in zip(tables_gpu, tables_cpu, strict=False):
        cases.assert_close(a, b, torch.float32)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("batch", [0, 4096])
def test_train_step_pairwise_hinge(optimizer, batch):
    cases.run_hinge_steps(CUDA, optimizer, batch, num_users=2000, num_items=500)


@pytest.mark.parametrize("op", cases.SAMPLED_OPS)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("batch,k", [(0, 2), (1, 1), (4096, 4)])
def test_sampled_steps(op, optimizer, batch, k):
    cases.run_sampled(CUDA, op, optimizer, batch, k, num_users=2000, num_items=500)


@pytest.mark.parametrize("op", cases.STEPS_OPS)
@pytest.mark.parametrize("n,batch_size,k,weighted,ordered",
                         [(0, 4, 1, False, False), (10_000, 4096, 1, True, False),
                          (5_000, 1024, 4, False, False), (10_000, 4096, 1, True, True)])
def test_sampled_steps_in_one_call(op, n, batch_size, k, weighted, ordered):
    cases.run_sampled_steps(CUDA, op, n, batch_size, k, weighted=weighted, num_users=2000,
                            num_items=500, ordered=ordered)


@pytest.mark.parametrize("op", cases.STEPS_OPS)
@pytest.mark.parametrize("bad", [30, -1])
def test_sampled_steps_bad_order(op, bad):
    cases.check_sampled_steps_bad_order(CUDA, op, bad)


@pytest.mark.parametrize("batch,k,id_dtype", [(0, 2, torch.int64), (1, 1, torch.int32),
                                              (65_536, 4, torch.int64)])
def test_sample_negatives(batch, k, id_dtype):
    cases.check_sample_negatives(CUDA, batch, k, id_dtype, num_users=2000, num_items=500)


@pytest.mark.parametrize("what", ["user", "full", "row"])
def test_sample_negatives_bad(what):
    cases.check_sample_negatives_bad(CUDA, what)


@pytest.mark.parametrize("op", cases.SAMPLED_OPS)
@pytest.mark.parametrize("what", ["full", "row"])
def test_sampled_steps_bad_rows(op, what):
    cases.check_sampled_bad_rows(CUDA, op, what)


@pytest.mark.parametrize("op", cases.STEP_OPS)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("batch", [0, 4096])
def test_weighted_steps(op, optimizer, batch):
    cases.run_weighted(CUDA, op, optimizer, batch, num_users=2000, num_items=500)


@pytest.mark.parametrize("op", cases.STEP_OPS)
@pytest.mark.parametrize("bad", [float("nan"), -0.5])
def test_weighted_steps_bad_weights(op, bad):
    cases.check_bad_weights(CUDA, op, bad)


def test_fastmf_train_step_pairwise_on_cuda():
    """The public API routes CUDA tensors to the CUDA kernel through the dispatcher."""
    model = fastmf.MF(100, 50, dim=16, backend="native", device="cuda")
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    users, pos, neg = CUDA.to(*cases.make_triples(100, 50, 512, seed=1))
    before = model.item_factors.detach().clone()
    loss = fastmf.train_step_pairwise(model, opt, users, pos, neg, reg=0.01)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert not torch.equal(model.item_factors.detach(), before)
    fastmf.ops.check_device_errors()


# topk_scores: batches 1 and 7 take the narrow tile, 300 and 4096 the wide one; 40k items
# split the item range over many blocks.
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("batch", [1, 7, 300, 4096])
def test_topk_matches_reference(dtype, k, batch):
    cases.check_topk(CUDA, batch, 40_000 if batch < 1000 else 3000, k, dtype)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("batch", [3, 130])
def test_topk_exclude_and_candidates(id_dtype, k, batch):
    for dtype in WEIGHT_DTYPES:
        cases.check_topk(CUDA, batch, 5000, k, dtype, id_dtype=id_dtype, exclude=True)
        cases.check_topk(CUDA, batch, 5000, k, dtype, id_dtype=id_dtype, candidates=3000)
        cases.check_topk(CUDA, batch, 5000, k, dtype, id_dtype=id_dtype, exclude=True,
                         candidates=3000)


@pytest.mark.parametrize("dim", [0, 1, 3, 13, 37, 64, 130])
@pytest.mark.parametrize("batch", [2, 100])
def test_topk_dims(dim, batch):
    cases.check_topk(CUDA, batch, 7000, 10, torch.float32, dim=dim, bias=dim % 2 == 1)


@pytest.mark.parametrize("k", [300, 2000])
def test_topk_large_k(k):
    cases.check_topk(CUDA, 5, 5000, k, torch.float32, exclude=True)
    cases.check_topk(CUDA, 70, 1500, k, torch.float64)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("batch", [3, 40])
def test_topk_misaligned_rows(dtype, batch):
    cases.check_topk(CUDA, batch, 7000, 10, dtype, dim=8, misaligned=True)


def test_topk_k_above_candidate_count():
    cases.check_topk(CUDA, 4, 50, 60, torch.float32)
    cases.check_topk(CUDA, 4, 50, 6, torch.float32, candidates=5, exclude=True)


def test_topk_nan_and_inf_scores():
    cases.check_topk(CUDA, 5, 300, 300, torch.float32, bias=False, nan=True)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_topk_empty(dtype):
    cases.check_topk_empty(CUDA, dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_topk_batch_independent(dtype):
    cases.check_topk_batch_independent(CUDA, dtype, num_items=200_000, dim=64)


def test_topk_bad_ids():
    cases.check_topk_bad_ids(CUDA)


def test_topk_host_errors():
    cases.check_topk_host_errors(CUDA)


def test_refuses_shared_memory():
    cases.check_refuses_shared_memory(CUDA)


def test_refuses_bad_settings():
    cases.check_refuses_bad_settings(CUDA)


def test_wide_rows_with_misaligned_state():
    cases.check_wide_rows_with_misaligned_state(CUDA)


def test_topk_retrieval_routes_cuda_to_the_kernel():
    from fastmf.ops import resolve_backend
    from fastmf.ops.native import has_kernel
    from fastmf.retrieval import topk_scores

    assert has_kernel("cuda", "topk_scores")
    assert resolve_backend("auto", torch.device("cuda")) == "native"
    items, bias = cases.make_topk_items(2000, 8)
    queries = cases.make_topk_queries(9, 8)
    exclude = cases.make_topk_exclude(9, 2000)
    expected = topk_scores(queries, items, bias, 10, exclude=exclude, backend="reference")
    got = topk_scores(*CUDA.to(queries, items, bias), 10, exclude=CUDA.to(*exclude))
    assert got[0].is_cuda
    cases.assert_same_topk(got, expected)


def test_topk_model_recommend_on_cuda():
    import fastmf

    items, bias = cases.make_topk_items(500, 8)
    model = fastmf.MF(40, 500, dim=8)
    with torch.no_grad():
        model.user_factors.copy_(cases.make_topk_queries(40, 8))
        model.item_factors.copy_(items)
        model.item_bias.copy_(bias)
    users = list(range(0, 40, 3))
    expected = model.recommend(users, k=10)
    got = model.to("cuda").recommend(users, k=10)
    assert got[0].is_cuda
    assert torch.equal(got[0].cpu(), expected[0])
    torch.testing.assert_close(got[1].cpu(), expected[1], rtol=0, atol=0)


# --- the embedding_bag family ------------------------------------------------------------

BAG_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_embedding_bag_has_kernel():
    for op in ("embedding_bag_forward", "embedding_bag_backward", "sparse_update",
               "embedding_bag_backward_update", "embedding_bag_backward_update_pair"):
        assert fastmf.ops.native.has_kernel("cuda", op), op


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dim", [1, 16, 37, 128, 300])
def test_embedding_bag_forward_backward(dtype, pooling, weighted, id_dtype, dim):
    for seed in (0, 1):  # float32 and half gradients
        cases.check_bag_forward_backward(CUDA, dtype, cases.Pooling[pooling.upper()],
                                         weighted, id_dtype=id_dtype, dim=dim, num_rows=500,
                                         num_bags=700, seed=seed)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
@pytest.mark.parametrize("dim", [8, 130])
def test_embedding_bag_step(optimizer, dtype, fused, dim):
    decay = cases.WeightDecay((cases.ROW_OPT_NAMES.index(optimizer) + dim) % 3)
    for pooling, weighted, half_grad in [("sum", True, False), ("mean", False, True)]:
        cases.check_bag_step(CUDA, optimizer, dtype, fused=fused,
                             pooling=cases.Pooling[pooling.upper()], weighted=weighted,
                             decay=decay, dim=dim, num_rows=300, num_bags=2000,
                             half_grad=half_grad and dtype != torch.float64, steps=3)


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_pair(optimizer, dtype):
    for pooling in (cases.Pooling.SUM, cases.Pooling.MEAN):
        cases.check_bag_step_pair(CUDA, optimizer, dtype, pooling=pooling, num_rows=300,
                                  num_bags=2000, dim=64)


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_hot_rows(optimizer, dtype):
    # Runs of tens of thousands of occurrences: many kHotChunk chunks, and two hot runs
    # sharing a window of chunk slots.
    cases.check_bag_step(CUDA, optimizer, dtype, num_rows=7, num_bags=20000, max_size=10,
                         exponent=1.5, dim=64, steps=2)


@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_1d(optimizer):
    cases.check_bag_step_1d(CUDA, optimizer)


def test_embedding_bag_empty():
    cases.check_bag_empty(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embedding_bag_bit_identical(dtype):
    cases.check_bag_twice_bitwise(CUDA, "rowwise_adam", dtype)
    cases.check_bag_twice_bitwise(CUDA, "adam", dtype)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_embedding_bag_bad_ids(id_dtype):
    cases.check_bag_bad_ids(CUDA, id_dtype)


@pytest.mark.parametrize("case", sorted(cases.BAD_OFFSETS))
def test_embedding_bag_bad_offsets(case):
    cases.check_bag_bad_offsets(CUDA, case)


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 32, 130])
@pytest.mark.parametrize("length", [0, 1, 20_480])
def test_scatter_rows(dtype, id_dtype, dim, length):
    cases.check_scatter_rows(CUDA, dtype, id_dtype=id_dtype, num_rows=9_000, length=length,
                             dim=dim, seed=dim + length)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("length", [0, 300, 20_480])
def test_unique_bags(id_dtype, length):
    cases.check_unique_bags(CUDA, id_dtype=id_dtype, index_dtype=id_dtype,
                            weight_dtype=torch.float16, num_rows=9_000, length=length,
                            seed=length)


def test_scatter_rows_hot_rows():
    # Runs past kHotChunk: summed chunk by chunk on the GPU, within rounding of the spec.
    cases.check_scatter_rows(CUDA, torch.float32, num_rows=3, length=9_000, dim=16,
                             exponent=0.5, seed=3)


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_bag_cuda_graph_replay_equals_eager(optimizer, dtype):
    """Forward and fused backward update captured in one CUDA graph and replayed on new bags
    of the same sizes: exactly the eager results (no host sync, no data-dependent
    allocation)."""
    num_rows, dim, num_bags, steps = 400, 32, 512, 4
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(num_rows, dim, generator=gen) * 0.3).to(dtype)
    shapes = cases.row_state_shapes(cases.Optimizer[optimizer.upper()], weight)
    eager = [weight.cuda()] + [None if s is None else torch.rand(s, generator=gen).cuda()
                               for s in shapes]
    graphed = [None if t is None else t.clone() for t in eager]
    settings = cases._row_settings(cases.Optimizer[optimizer.upper()], cases.WeightDecay.L2)
    batches = []
    for s in range(steps):
        # Fixed sizes for every batch (a graph replays fixed shapes): 4 Zipf ids per bag.
        ids = cases.zipf_ids(num_rows, 4 * num_bags, generator=np.random.default_rng(s))
        offsets = torch.arange(0, 4 * num_bags + 1, 4)
        batches.append(CUDA.to(ids, offsets, torch.randn(num_bags, dim, generator=gen)))
    static = [t.clone() for t in batches[0]]

    def step(tables, ids, offsets, grad):
        out = torch.ops.fastmf.embedding_bag_forward(tables[0], ids, offsets, None,
                                                     int(cases.Pooling.MEAN))
        torch.ops.fastmf.embedding_bag_backward_update(*tables, grad * out, ids, offsets,
                                                       None, int(cases.Pooling.MEAN),
                                                       *settings)
        return out

    backup = [None if t is None else t.clone() for t in graphed]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(graphed, *static)
    torch.cuda.current_stream().wait_stream(side)
    for t, b in zip(graphed, backup, strict=False):
        if t is not None:
            t.copy_(b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(graphed, *static)
    for batch in batches:
        eager_out = step(eager, *batch)
        for s, b in zip(static, batch, strict=False):
            s.copy_(b)
        graph.replay()
        assert torch.equal(static_out, eager_out)
    for a, b in zip(graphed, eager, strict=False):
        if a is not None:
            assert torch.equal(a, b)
    fastmf.ops.check_device_errors()
