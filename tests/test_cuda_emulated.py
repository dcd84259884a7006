"""The CUDA kernels' own source, run on the CPU through tests/cuda_emulation (each CUDA
thread a fiber, barriers for __syncthreads and shuffles), against fastmf.ops.reference:
the checks of tests/test_cuda_ops.py at sizes a CPU emulation can afford. Catches logic
errors in the kernels on machines without a GPU. Under AddressSanitizer (+ UBSan) it also
catches every out-of-bounds access:

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0 FASTMF_EMU_SANITIZE=address pytest tests/test_cuda_emulated.py

and under ThreadSanitizer, with several blocks at once, data races: a missing
__syncthreads, or two blocks writing the same memory (what a GPU's race checker finds):

    LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" OMP_NUM_THREADS=1 \
    FASTMF_EMU_SANITIZE=thread FASTMF_EMU_BLOCKS=4 pytest tests/test_cuda_emulated.py -k hot

(the sanitizer builds run one OS thread per CUDA thread, which makes them slow: a minute
or more per case; OMP_NUM_THREADS=1 because it reports torch's own OpenMP threads, which
it cannot see synchronise; a race makes the process exit with status 66).

Skipped without a C++ compiler or ninja, or with FASTMF_SKIP_CUDA_EMULATION=1. The first
run builds the emulation into build/fastmf_emu (a few minutes on two cores).

The host-side rules both devices share (csrc/checks.h: no shared memory, finite settings)
and the one place they differ on purpose (the CUDA row-width limit) are also run against
the native CPU kernels, when built, so the two stay the same."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import _cuda_cases as cases
import pytest
import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emulation"))

if os.environ.get("FASTMF_SKIP_CUDA_EMULATION") == "1":
    pytest.skip("FASTMF_SKIP_CUDA_EMULATION=1", allow_module_level=True)
if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the emulation", allow_module_level=True)
if not cpp_extension.is_ninja_available():
    pytest.skip("ninja is needed to build the emulation (pip install ninja)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def emu():
    import emulation_build

    torch.ops.load_library(emulation_build.build())
    target = cases.Target("emulated", "cpu", torch.ops.fastmf_emu,
                          lambda: torch.ops.fastmf_emu.check_device_errors(0))
    cases.clear_errors(target)
    return target


def _native_cpu_target():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastmf::train_step", "CPU"):
        pytest.skip("fastmf built without its CPU kernels")
    return cases.Target("native-cpu", "cpu", torch.ops.fastmf, lambda: None)


@pytest.fixture(params=["emulated", "native-cpu"])
def both(request):
    """The emulated CUDA kernels and the native CPU ones."""
    if request.param == "emulated":
        return request.getfixturevalue("emu")
    import fastmf  # noqa: F401  (loads the extension)

    return _native_cpu_target()


ID_PAIRS = [(torch.int64, torch.int64), (torch.int32, torch.int64)]


@pytest.mark.parametrize("batch", [0, 1, 7, 300])
@pytest.mark.parametrize("ids", ID_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [16, 3, 130])
def test_mf_forward_backward(emu, batch, ids, dtype, dim):
    cases.check_forward(emu, batch, *ids, dtype, True, dim=dim)
    cases.check_forward(emu, batch, *ids, dtype, False, dim=dim)
    cases.check_backward(emu, batch, *ids, dtype, dim=dim)


@pytest.mark.parametrize("kind", cases.OPT_NAMES)
@pytest.mark.parametrize("batch", [0, 1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, 8, 33, 64])
def test_sparse_update(emu, kind, batch, dtype, dim):
    cases.check_sparse_update(emu, kind, batch, torch.int32 if dim % 2 else torch.int64, dtype,
                              dim)


@pytest.mark.parametrize("kind", cases.OPT_NAMES)
@pytest.mark.parametrize("batch", [3000, 40000])
def test_sparse_update_hot_rows(emu, kind, batch):
    # 3000: runs across tens of 4-slot tiles; 40000: 8-slot tiles and a run of thousands
    # of slots, past kSuperTile tiles, summed by a whole block.
    cases.check_sparse_update(emu, kind, batch, torch.int64, torch.float32, 8, num_rows=5,
                              exponent=1.5)


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_sparse_update_bad_ids(emu, kind):
    cases.check_sparse_update_bad_ids(emu, kind)


@pytest.mark.parametrize("loss", cases.LOSS_NAMES)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_step(emu, loss, optimizer, dtype):
    cases.run_train_steps(emu, loss, optimizer, 3, 257, torch.int64, torch.int32, dtype)


@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("dim", [1, 3, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_train_step_shapes(emu, batch, dim, bias):
    cases.run_train_steps(emu, "mse", "rowwise_adagrad", 2, batch, torch.int32, torch.int32,
                          torch.float32, dim=dim, bias=bias)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_hot_rows(emu, optimizer):
    cases.run_train_steps(emu, "huber", optimizer, 2, 3000, torch.int64, torch.int64,
                          torch.float32, num_users=2000, num_items=4, dim=8)


def test_train_step_bit_identical(emu):
    cases.train_twice_bitwise(emu, "mse", "adagrad", 500, torch.float32, steps=2)


@pytest.mark.parametrize("what", ["users", "items", "targets"])
def test_train_step_bad_samples(emu, what):
    cases.check_train_step_bad_samples(emu, what)


def test_forward_bad_ids(emu):
    cases.check_forward_bad_ids(emu)


def test_host_side_errors(emu):
    cases.check_host_side_errors(emu)


# train_step_pairwise (BPR)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("dtype,ids", [(torch.float32, (torch.int64, torch.int32)),
                                       (torch.float64, (torch.int32, torch.int64))])
@pytest.mark.parametrize("bias", [True, False])
def test_train_step_pairwise_20_steps(emu, optimizer, dtype, ids, bias):
    cases.run_pairwise_steps(emu, optimizer, 20, 130, *ids, dtype, bias=bias)


@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("dim", [1, 3, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_train_step_pairwise_shapes(emu, batch, dim, bias):
    cases.run_pairwise_steps(emu, "rowwise_adagrad", 2, batch, torch.int32, torch.int32,
                             torch.float32, dim=dim, bias=bias)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_pairwise_hot_rows(emu, optimizer):
    # 2 * 1500 item slots over 4 items: runs of hundreds of slots, past kSuperTile 4-slot
    # tiles, summed by a whole block, with positive and negative slots in one run.
    cases.run_pairwise_steps(emu, optimizer, 2, 1500, torch.int64, torch.int64, torch.float32,
                             num_users=2000, num_items=4, dim=8)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
def test_train_step_pairwise_same_item(emu, optimizer):
    cases.check_pairwise_same_item(emu, optimizer)


def test_train_step_pairwise_bit_identical(emu):
    cases.pairwise_twice_bitwise(emu, "adagrad", 1500, torch.float32, steps=2, num_items=4)


@pytest.mark.parametrize("what", ["users", "items", "neg_items"])
def test_train_step_pairwise_bad_samples(emu, what):
    cases.check_pairwise_bad_samples(emu, what)


def test_train_step_pairwise_host_side_errors(emu):
    cases.check_pairwise_host_side_errors(emu)


@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("batch,dtype", [(0, torch.float32), (7, torch.float64),
                                         (300, torch.float32)])
def test_train_step_pairwise_hinge(both, optimizer, batch, dtype):
    cases.run_hinge_steps(both, optimizer, batch, dtype)


@pytest.mark.parametrize("op", cases.SAMPLED_OPS)
@pytest.mark.parametrize("optimizer", cases.OPT_NAMES)
@pytest.mark.parametrize("batch,k", [(0, 2), (1, 1), (7, 3), (300, 4)])
def test_sampled_steps(emu, op, optimizer, batch, k):
    cases.run_sampled(emu, op, optimizer, batch, k)


@pytest.mark.parametrize("op", cases.SAMPLED_OPS)
@pytest.mark.parametrize("dtype,id_dtype", [(torch.float64, torch.int32)])
def test_sampled_steps_dtypes(emu, op, dtype, id_dtype):
    cases.run_sampled(emu, op, "adagrad", 130, 2, dtype=dtype, id_dtype=id_dtype)


@pytest.mark.parametrize("op", cases.SAMPLED_OPS)
@pytest.mark.parametrize("what", ["full", "row"])
def test_sampled_steps_bad_rows(emu, op, what):
    cases.check_sampled_bad_rows(emu, op, what)


@pytest.mark.parametrize("batch,k,id_dtype", [(0, 2, torch.int64), (1, 1, torch.int32),
                                              (300, 4, torch.int64), (77, 3, torch.int32)])
def test_sample_negatives(emu, batch, k, id_dtype):
    cases.check_sample_negatives(emu, batch, k, id_dtype)


@pytest.mark.parametrize("what", ["user", "full", "row"])
def test_sample_negatives_bad(both, what):
    cases.check_sample_negatives_bad(both, what)


@pytest.mark.parametrize("op", cases.STEPS_OPS)
@pytest.mark.parametrize("n,batch_size,k,weighted,ordered",
                         [(0, 4, 1, False, False), (150, 64, 2, True, False),
                          (40, 100, 1, False, False), (0, 4, 1, False, True),
                          (150, 64, 2, True, True)])
def test_sampled_steps_in_one_call(emu, op, n, batch_size, k, weighted, ordered):
    cases.run_sampled_steps(emu, op, n, batch_size, k, weighted=weighted, ordered=ordered)


@pytest.mark.parametrize("op", cases.STEPS_OPS)
@pytest.mark.parametrize("bad", [30, -1])
def test_sampled_steps_bad_order(emu, op, bad):
    cases.check_sampled_steps_bad_order(emu, op, bad)


@pytest.mark.parametrize("op", cases.STEP_OPS)
@pytest.mark.parametrize("batch,optimizer,dtype,id_dtype", [
    (0, "adagrad", torch.float32, torch.int64),
    (150, "rowwise_adagrad", torch.float32, torch.int32),
    (150, "sgd", torch.float64, torch.int64),
])
def test_weighted_steps(both, op, batch, optimizer, dtype, id_dtype):
    cases.run_weighted(both, op, optimizer, batch, dtype=dtype, id_dtype=id_dtype)


@pytest.mark.parametrize("op", cases.STEP_OPS)
@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf")])
def test_weighted_steps_bad_weights(emu, op, bad):
    cases.check_bad_weights(emu, op, bad)


# topk_scores: 1 query takes the narrow tile (3000 items: 12 tiles of 256, split over 4
# blocks and merged); 17 queries, one past kNarrowBatch, take the wide tile, ragged (1500
# items: 12 tiles of 128, 4 splits). The emulation's cost grows with the queries: at k 100,
# 37 queries took 41 s a dtype.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("batch", [1, 17])
def test_topk_matches_reference(emu, dtype, k, batch):
    cases.check_topk(emu, batch, 3000 if batch == 1 else 1500, k, dtype)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_topk_exclude_and_candidates(emu, id_dtype, k):
    cases.check_topk(emu, 17, 600, k, torch.float32, id_dtype=id_dtype, exclude=True)
    cases.check_topk(emu, 17, 600, k, torch.float32, id_dtype=id_dtype, candidates=300)
    cases.check_topk(emu, 6, 600, k, torch.float64, id_dtype=id_dtype, exclude=True,
                     candidates=300)


@pytest.mark.parametrize("dim", [0, 1, 3, 13, 37])
def test_topk_dims(emu, dim):
    # Dims that are no multiple of 4 (unaligned rows) and past one staged chunk of 16.
    cases.check_topk(emu, 5, 700, 10, torch.float32, dim=dim, bias=dim % 2 == 1)


@pytest.mark.parametrize("batch", [3, 40])
def test_topk_misaligned_rows(emu, batch):
    cases.check_topk(emu, batch, 700, 10, torch.float32, dim=8, misaligned=True)


def test_topk_k_above_candidate_count(emu):
    cases.check_topk(emu, 4, 50, 60, torch.float32)
    cases.check_topk(emu, 4, 50, 6, torch.float32, candidates=5, exclude=True)


def test_topk_nan_and_inf_scores(emu):
    cases.check_topk(emu, 5, 300, 300, torch.float32, bias=False, nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_empty(emu, dtype):
    cases.check_topk_empty(emu, dtype)


def test_topk_batch_independent(emu):
    cases.check_topk_batch_independent(emu, torch.float32, num_items=1000)


def test_topk_bad_ids(emu):
    cases.check_topk_bad_ids(emu)


def test_topk_host_errors(emu):
    cases.check_topk_host_errors(emu)


# Preconditions checked before anything is written, on both devices (csrc/checks.h).


def test_refuses_shared_memory(both):
    cases.check_refuses_shared_memory(both)


def test_refuses_bad_settings(both):
    cases.check_refuses_bad_settings(both)


def test_wide_rows_with_misaligned_state(both):
    cases.check_wide_rows_with_misaligned_state(both)


# Run in a fresh interpreter, with glibc's mmap threshold pinned at 128 KiB: left dynamic, it
# rises to the largest block freed so far (up to 32 MiB), after which blocks below it come
# from the heap and stay in the process when freed. Measured in the test session's own
# process after thousands of other tests, RSS grew 61 MB across the step with the scratch
# released all the same; pinned, every block of the scratch is its own mapping, so RSS moves
# with what the kernels keep and nothing else.
_SCRATCH_SCRIPT = """
import sys
import torch
import fastmf  # noqa: F401
import _cuda_cases as cases
from fastmf.testing import make_batch, make_tables

def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

if not torch._C._dispatch_has_kernel_for_dispatch_key("fastmf::train_step", "CPU"):
    print("no-cpu-kernels")
    sys.exit(0)
p, q, bu, bi = make_tables(5000, 3000, 16, seed=1)
states = cases.make_states("adagrad", p, q, bu, bi)
users, items, targets = make_batch(5000, 3000, 2_000_000, seed=1)
def step(n):
    return torch.ops.fastmf.train_step(p, q, bu, bi, *states, users[:n], items[:n],
                                       targets[:n], 3.0, cases.MSE, 0.0, cases.ADAGRAD,
                                       cases.LR, cases.EPS)
step(1000)
before = rss_mb()
loss = step(len(users))
assert torch.isfinite(loss)
print(before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_native_cpu_scratch_is_released_after_a_huge_batch():
    """The CPU kernels keep their scratch between calls, but not more than
    kMaxRetainedScratchBytes (32 MiB, csrc/cpu/common.h): a 2M-sample step (~180 MiB of
    scratch) must not leave the process that much larger."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _SCRATCH_SCRIPT], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    if done.stdout.strip() == "no-cpu-kernels":
        pytest.skip("fastmf built without its CPU kernels")
    before, after = map(float, done.stdout.split())
    assert after - before < 40, f"RSS {before:.0f} -> {after:.0f} MB after a 2M-sample step"


# The embedding_bag family: against the reference, and bit for bit against the native CPU
# kernels where they are built (same sum order, same stochastic rounding).

BAG_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_forward_backward(emu, dtype, pooling, weighted):
    # Odd seeds take half gradients in the backward; id dtypes alternate.
    seed = BAG_DTYPES.index(dtype) + 2 * weighted
    cases.check_bag_forward_backward(emu, dtype, cases.Pooling[pooling.upper()], weighted,
                                     id_dtype=torch.int32 if seed % 2 else torch.int64,
                                     seed=seed)


@pytest.mark.parametrize("dim", [1, 3, 37, 130])
def test_embedding_bag_forward_backward_dims(emu, dim):
    # One lane (1), a partial group (3), a partial warp (37), several passes per row (130).
    cases.check_bag_forward_backward(emu, torch.float32, cases.Pooling.MEAN, False, dim=dim,
                                     seed=dim)
    cases.check_bag_forward_backward(emu, torch.bfloat16, cases.Pooling.SUM, True, dim=dim,
                                     seed=dim)


# Every optimizer on every table dtype, fused and through sparse_update; the weight decay
# mode, pooling and per-sample weights vary with the case.
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step(emu, optimizer, dtype, fused):
    o = cases.ROW_OPT_NAMES.index(optimizer)
    d = BAG_DTYPES.index(dtype)
    cases.check_bag_step(emu, optimizer, dtype, fused=fused,
                         pooling=cases.Pooling.MEAN if (o + d) % 3 == 2 else cases.Pooling.SUM,
                         weighted=(o + d) % 2 == 0, decay=cases.WeightDecay((o + d) % 3),
                         id_dtype=torch.int32 if d % 2 else torch.int64,
                         half_grad=d >= 2 and o % 2 == 1, seed=o * 4 + d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_pair(emu, optimizer, dtype):
    o = cases.ROW_OPT_NAMES.index(optimizer)
    cases.check_bag_step_pair(emu, optimizer, dtype,
                              pooling=cases.Pooling.MEAN if o % 2 else cases.Pooling.SUM,
                              id_dtype=torch.int32 if o % 3 == 1 else torch.int64, seed=o)


@pytest.mark.parametrize("dim,optimizer", [(3, "adam"), (37, "rowwise_adam"),
                                           (130, "rowwise_adagrad")])
def test_embedding_bag_step_dims(emu, optimizer, dim):
    # A partial group (3), a partial warp (37), two passes per row (130; the row-wise mean
    # square is then summed across passes).
    cases.check_bag_step(emu, optimizer, torch.float16, dim=dim, num_bags=8, seed=dim)


@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_hot_rows(emu, optimizer):
    # Two runs past kHotChunk (2048) occurrences, one ending and one starting in the same
    # window of chunk slots: summed in chunks by stage 1 and added in chunk order, as the
    # CPU kernel does (which the bitwise comparison checks).
    ids, _ = cases.make_bags(2, 1700, seed=1, max_size=8, exponent=0.5)  # check_bag_step's
    assert int(torch.bincount(ids).min()) > 2048
    cases.check_bag_step(emu, optimizer, torch.bfloat16, num_rows=2, num_bags=1700,
                         max_size=8, exponent=0.5, steps=1, weighted=True,
                         decay=cases.WeightDecay.L2)


@pytest.mark.parametrize("optimizer", cases.ROW_OPT_NAMES)
def test_embedding_bag_step_1d(emu, optimizer):
    cases.check_bag_step_1d(emu, optimizer)


def test_embedding_bag_empty(emu):
    cases.check_bag_empty(emu)


def test_embedding_bag_bit_identical(emu):
    cases.check_bag_twice_bitwise(emu, "rowwise_adam", torch.float16)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding_bag_bad_ids(emu, id_dtype):
    cases.check_bag_bad_ids(emu, id_dtype)


@pytest.mark.parametrize("case", sorted(cases.BAD_OFFSETS))
def test_embedding_bag_bad_offsets(emu, case):
    cases.check_bag_bad_offsets(emu, case)


@pytest.mark.parametrize("id_dtype,index_dtype,length",
                         [(torch.int64, torch.int64, 200), (torch.int32, torch.int32, 2_000),
                          (torch.int32, torch.int64, 0)])
def test_unique_bags(emu, id_dtype, index_dtype, length):
    # Both of the CPU kernel's paths (an id range within twice the batch, and past it), no
    # ids; half weights ride along as 16 bits.
    cases.check_unique_bags(emu, id_dtype=id_dtype, index_dtype=index_dtype,
                            weight_dtype=torch.bfloat16 if length else torch.float32,
                            length=length, seed=length)


@pytest.mark.parametrize("dtype", BAG_DTYPES)
@pytest.mark.parametrize("dim,length", [(0, 40), (8, 0), (8, 300), (37, 120)])
def test_scatter_rows(emu, dtype, dim, length):
    # 1-D rows (dim 0), no ids, duplicates under Zipf, a partial warp (37); id dtypes
    # alternate.
    seed = BAG_DTYPES.index(dtype) + dim + length
    cases.check_scatter_rows(emu, dtype, id_dtype=torch.int32 if seed % 2 else torch.int64,
                             length=length, dim=dim, seed=seed)
