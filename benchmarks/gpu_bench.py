"""GPU training throughput: fastmf's fused CUDA train_step against the ways people train a
matrix-factorization model in PyTorch today, at recommender scale.

Model: 1M users x 200K items, K in {32, 64, 128}, biases, MSE, element-wise Adagrad
(lr 0.05, eps 1e-10), fp32. Batches of {8192, 65536, 262144} samples: users uniform,
items Zipf(1.0) (a few items appear thousands of times per batch).

Methods (each checked against fastmf.ops.reference on a small case before any timing):
  ref_sparse    nn.Embedding(sparse=True) + torch.optim.Adagrad       (the baseline)
  ref_dense     nn.Embedding(sparse=False) + torch.optim.Adagrad
  compiled      dense grads, torch.compile on forward/loss and on Adagrad.step
  native_ops    fastmf mf_forward, autograd for dLoss/dpred, mf_backward's per-sample
                rows, sparse_adagrad_update on the 4 tables
  native_dense  fastmf mf_forward with autograd (dense grads) + torch.optim.Adagrad
  train_step    fastmf's fused train_step (one op per batch)

The last thing printed is the table: samples/s, ratio to ref_sparse, and the fraction of
the memory roofline, copy bandwidth / (32 K + 44) bytes per sample (two rows of weights
and Adagrad state read and written, biases, the sample), with the copy bandwidth
measured in the same run. A method that fails is reported and the run goes on.

A second, smaller section times the pairwise (BPR) step at K=64, batches 65536 and
262144: fastmf's fused train_step_pairwise against the textbook PyTorch BPR step (sparse
nn.Embedding and torch.optim.Adagrad), positives Zipf(1.0), negatives uniform, item
biases, fp32. Its table is printed after the first one; its roofline counts three rows
per sample, (48 K + 56) bytes.

Top-k retrieval (printed as the third table, last): exact top-10 of item_bias[i] +
<q, item_factors[i]> over 1M and 100K items, K=64, fp32, batches of 1, 128 and 4096
queries: `torch.topk(q @ X.T + b, 10)` (the reference, which writes the whole score
matrix) against fastmf's fused topk_scores kernel. Each result is checked against the
reference before timing: scores equal to tolerance rank by rank, every returned index
rescored in float64 to its returned score, no index twice (random data, so near-ties may
order differently).

    python benchmarks/gpu_bench.py [--quick] [--budget SECONDS] [--no-topk]

One fused step, kernel by kernel (benchmarks/gpu_first.sh runs these in order):

    python benchmarks/gpu_bench.py --step [--batches 8192,65536,262144] [--dim 64]
        [--ops train_step,train_step_pairwise] [--iters 50] [--json FILE]
    python benchmarks/gpu_bench.py --ncu-step [--batches 262144]   # under ncu --nvtx
    python benchmarks/gpu_bench.py --ncu-table ncu.csv [--batches 262144]
    python benchmarks/gpu_bench.py --byte-model [--batches ...]   # no GPU needed
    python benchmarks/gpu_bench.py --ptxas-summary build.log      # no GPU needed

--step: per (op, batch) at K=64 on the 1M x 200K Zipf workload, event-timed medians of
eager steps and of CUDA-graph replays, the host time of one call (submit), and one eager
step under torch.profiler as a table of its kernels beside the byte model of
benchmarks/README.md ("GPU: byte model per kernel"); first the copy bandwidths (device to
device, pinned host to device and back). It ends with a summary table. --ncu-step runs
one step per batch inside the NVTX range "fastmf_step" for Nsight Compute; --ncu-table
turns ncu's raw CSV of it into the same per-kernel table (DRAM and L2 bytes per sample
against the model, L2 hit rate, achieved occupancy, registers). --ptxas-summary lists
the kernels that spill and the ones with the most registers from a build log made with
NVCC_APPEND_FLAGS="-Xptxas -v". The GPU modes exit with status 2 and say why when there
is no GPU or no CUDA build of fastmf.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
from torch import nn

NUM_USERS, NUM_ITEMS = 1_000_000, 200_000
DIMS = (32, 64, 128)
BATCHES = (8192, 65536, 262144)
LR, EPS, MU = 0.05, 1e-10, 3.5
METHODS = ("ref_sparse", "ref_dense", "compiled", "native_ops", "native_dense", "train_step")


def adagrad():
    """The fused ops' optimizer settings: element-wise Adagrad at LR and EPS, as the
    torch.optim.Adagrad of the plain methods. (fastmf is imported inside the functions
    that use it, so that a failing import is reported, not fatal.)"""
    from fastmf.ops import Optimizer, OptimizerArgs

    return OptimizerArgs(Optimizer.ADAGRAD, LR, EPS)


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------
# Data


class ZipfItems:
    """Zipf(exponent) ranks drawn on the GPU by inverse CDF, ranks shuffled over ids."""

    def __init__(self, num_rows, exponent=1.0, device="cuda", seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w = 1.0 / torch.arange(1, num_rows + 1, dtype=torch.float64) ** exponent
        self.cdf = (w.cumsum(0) / w.sum()).to(device)
        self.perm = torch.randperm(num_rows, generator=gen).to(device)
        self.num_rows = num_rows

    def sample(self, n, gen):
        u = torch.rand(n, device=self.cdf.device, dtype=torch.float64, generator=gen)
        ranks = torch.searchsorted(self.cdf, u).clamp_(max=self.num_rows - 1)
        return self.perm[ranks]


def make_batches(num_users, items: ZipfItems, batch, count, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(count):
        users = torch.randint(0, num_users, (batch,), device="cuda", generator=gen)
        it = items.sample(batch, gen)
        targets = torch.rand(batch, device="cuda", generator=gen) * 4 + 1
        out.append((users, it, targets))
    return out


def make_tables(num_users, num_items, dim, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, device="cuda", generator=gen) * 0.2 - 0.1

    return rand(num_users, dim), rand(num_items, dim), rand(num_users), rand(num_items)


# ----------------------------------------------------------------------------------------
# Methods: make(tables) -> (step(users, items, targets), read_tables())


class EmbeddingMF(nn.Module):
    def __init__(self, p, q, bu, bi, sparse):
        super().__init__()
        self.users = nn.Embedding.from_pretrained(p.clone(), freeze=False, sparse=sparse)
        self.items = nn.Embedding.from_pretrained(q.clone(), freeze=False, sparse=sparse)
        self.user_bias = nn.Embedding.from_pretrained(bu.clone()[:, None], freeze=False,
                                                      sparse=sparse)
        self.item_bias = nn.Embedding.from_pretrained(bi.clone()[:, None], freeze=False,
                                                      sparse=sparse)

    def forward(self, users, items):
        dot = (self.users(users) * self.items(items)).sum(1) + MU
        return dot + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0]

    def tables(self):
        return (self.users.weight, self.items.weight, self.user_bias.weight[:, 0],
                self.item_bias.weight[:, 0])


def make_reference(tables, sparse):
    model = EmbeddingMF(*tables, sparse=sparse)
    opt = torch.optim.Adagrad(model.parameters(), lr=LR, eps=EPS)

    def step(users, items, targets):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(users, items), targets)
        loss.backward()
        opt.step()
        return loss

    return step, model.tables


def make_compiled(tables):
    model = EmbeddingMF(*tables, sparse=False)
    opt = torch.optim.Adagrad(model.parameters(), lr=LR, eps=EPS)

    @torch.compile
    def loss_fn(users, items, targets):
        return F.mse_loss(model(users, items), targets)

    @torch.compile
    def opt_step():
        opt.step()

    def step(users, items, targets):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(users, items, targets)
        loss.backward()
        opt_step()
        return loss

    return step, model.tables


def make_native_ops(tables):
    from fastmf.ops import native

    p, q, bu, bi = (t.clone() for t in tables)
    states = [torch.zeros_like(t) for t in (p, q, bu, bi)]

    def step(users, items, targets):
        # Autograd for the loss only; the per-sample rows come from mf_backward, so no
        # table-sized gradient is ever formed.
        pred = native.mf_forward(users, items, p, q, bu, bi, MU).requires_grad_()
        loss = F.mse_loss(pred, targets)
        (grad_out,) = torch.autograd.grad(loss, pred)
        rows_p, rows_q = native.mf_backward(grad_out, users, items, p, q)
        native.sparse_adagrad_update(p, states[0], users, rows_p, LR, EPS, False)
        native.sparse_adagrad_update(q, states[1], items, rows_q, LR, EPS, False)
        native.sparse_adagrad_update(bu, states[2], users, grad_out, LR, EPS, False)
        native.sparse_adagrad_update(bi, states[3], items, grad_out, LR, EPS, False)
        return loss

    return step, lambda: (p, q, bu, bi)


def make_native_dense(tables):
    from fastmf.ops import native

    params = [nn.Parameter(t.clone()) for t in tables]
    opt = torch.optim.Adagrad(params, lr=LR, eps=EPS)

    def step(users, items, targets):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(native.mf_forward(users, items, *params, MU), targets)
        loss.backward()
        opt.step()
        return loss

    return step, lambda: tuple(params)


def make_train_step(tables):
    from fastmf.ops import Loss, MFTables, native

    weights = MFTables(*(t.clone() for t in tables))
    states = MFTables(*(torch.zeros_like(t) for t in weights))
    opt = adagrad()  # built once: a step's host time is the op's own

    def step(users, items, targets):
        return native.train_step(weights, states, users, items, targets, MU, Loss.MSE, 0.0,
                                 opt)

    return step, lambda: tuple(weights)


MAKERS = {
    "ref_sparse": lambda t: make_reference(t, True),
    "ref_dense": lambda t: make_reference(t, False),
    "compiled": make_compiled,
    "native_ops": make_native_ops,
    "native_dense": make_native_dense,
    "train_step": make_train_step,
}


# ----------------------------------------------------------------------------------------
# Pairwise (BPR): fused train_step_pairwise against the textbook PyTorch BPR step


BPR_DIM, BPR_BATCHES = 64, (65536, 262144)
BPR_METHODS = ("bpr_ref_sparse", "train_step_pairwise")


def make_bpr_reference(tables):
    """nn.Embedding(sparse=True) + torch.optim.Adagrad; no user bias (it cancels in x)."""
    p, q, _, bi = tables
    users = nn.Embedding.from_pretrained(p.clone(), freeze=False, sparse=True)
    items = nn.Embedding.from_pretrained(q.clone(), freeze=False, sparse=True)
    item_bias = nn.Embedding.from_pretrained(bi.clone()[:, None], freeze=False, sparse=True)
    params = [users.weight, items.weight, item_bias.weight]
    opt = torch.optim.Adagrad(params, lr=LR, eps=EPS)

    def step(u, i, j):
        opt.zero_grad(set_to_none=True)
        x = (users(u) * (items(i) - items(j))).sum(1) + item_bias(i)[:, 0] - item_bias(j)[:, 0]
        loss = F.softplus(-x).mean()
        loss.backward()
        opt.step()
        return loss

    return step, lambda: (users.weight, items.weight, item_bias.weight[:, 0])


def make_bpr_native(tables):
    from fastmf.ops import MFTables, PairwiseLoss, native

    weights = MFTables(*(t.clone() for t in tables))
    states = MFTables(*(torch.zeros_like(t) for t in weights))
    opt = adagrad()

    def step(u, i, j):
        return native.train_step_pairwise(weights, states, u, i, j, PairwiseLoss.BPR, 0.0, opt)

    return step, lambda: (weights.user_factors, weights.item_factors, weights.item_bias)


BPR_MAKERS = {"bpr_ref_sparse": make_bpr_reference, "train_step_pairwise": make_bpr_native}


def make_triples(num_users, num_items, items: ZipfItems, batch, count, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(count):
        users = torch.randint(0, num_users, (batch,), device="cuda", generator=gen)
        neg = torch.randint(0, num_items, (batch,), device="cuda", generator=gen)
        out.append((users, items.sample(batch, gen), neg))
    return out


def time_bpr_step(step, batches, iters=20):
    """Seconds per step after two warm-up steps; 20 steps stay well under a second each."""
    for b in batches[:2]:
        step(*b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(iters):
        step(*batches[k % len(batches)])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def bench_pairwise(started, budget):
    """Checks both BPR methods against fastmf.ops.reference on a small case, then times
    them. Returns {(batch, method): samples/s or why not}."""
    from fastmf.ops import MFTables, PairwiseLoss
    from fastmf.ops import reference as spec

    status = {}
    for name in BPR_METHODS:
        try:
            tables = make_tables(2000, 300, 16, seed=1)
            triples = make_triples(2000, 300, ZipfItems(300, seed=1), 2048, 2, seed=1)
            expected = MFTables(*(t.clone() for t in tables))
            expected_states = MFTables(*(torch.zeros_like(t) for t in tables))
            step, read = BPR_MAKERS[name](tables)
            for u, i, j in triples:
                spec.train_step_pairwise(expected, expected_states, u, i, j, PairwiseLoss.BPR,
                                         0.0, adagrad())
                step(u, i, j)
            torch.cuda.synchronize()
            for got, exp in zip(read(), (expected[0], expected[1], expected[3]), strict=True):
                torch.testing.assert_close(got.detach(), exp, rtol=1e-4, atol=1e-5)
            status[name] = "ok"
            log(f"correctness {name}: ok")
        except Exception as exc:  # noqa: BLE001
            status[name] = f"incorrect/failed: {type(exc).__name__}: {str(exc)[:200]}"
            log(f"correctness {name}: FAILED\n{traceback.format_exc(limit=3)}")

    results = {}
    tables = make_tables(NUM_USERS, NUM_ITEMS, BPR_DIM, seed=0)
    items = ZipfItems(NUM_ITEMS, 1.0, seed=0)
    for batch in BPR_BATCHES:
        data = make_triples(NUM_USERS, NUM_ITEMS, items, batch, 4, seed=batch)
        for name in BPR_METHODS:
            if status[name] != "ok":
                results[(batch, name)] = status[name]
                continue
            if time.perf_counter() - started > 1.5 * budget:
                results[(batch, name)] = "budget"
                continue
            try:
                step, _ = BPR_MAKERS[name](tables)
                seconds = time_bpr_step(step, data)
                results[(batch, name)] = batch / seconds
                log(f"BPR K={BPR_DIM} B={batch:7d} {name:19s} {batch / seconds / 1e6:9.2f} "
                    f"M samples/s")
            except Exception as exc:  # noqa: BLE001
                results[(batch, name)] = f"failed: {type(exc).__name__}"
                log(f"BPR B={batch} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.empty_cache()
        del data
    del tables
    torch.cuda.empty_cache()
    return results


def print_pairwise_table(results, bandwidth):
    roofline = bandwidth / (48 * BPR_DIM + 56)
    log("")
    log(f"BPR: 1M users x 200K items, users uniform, positives Zipf(1.0), negatives uniform, "
        f"item biases, element-wise Adagrad, fp32, K={BPR_DIM}; roofline = bandwidth / "
        f"(48K+56) B per sample.")
    log("")
    log("| K | batch | method | M samples/s | vs bpr_ref_sparse | of roofline |")
    log("|---:|---:|---|---:|---:|---:|")
    for batch in BPR_BATCHES:
        base = results.get((batch, "bpr_ref_sparse"))
        for name in BPR_METHODS:
            r = results.get((batch, name), "not run")
            if isinstance(r, float):
                ratio = f"{r / base:.1f}x" if isinstance(base, float) else "-"
                log(f"| {BPR_DIM} | {batch} | {name} | {r / 1e6:.2f} | {ratio} | "
                    f"{100 * r / roofline:.0f}% |")
            else:
                log(f"| {BPR_DIM} | {batch} | {name} | {r[:60]} | - | - |")


# ----------------------------------------------------------------------------------------
# Correctness on a small case, then timing


def check_correct(name):
    from fastmf.ops import Loss, MFTables
    from fastmf.ops import reference as spec

    n_users, n_items, dim, batch = 2000, 300, 16, 2048
    tables = make_tables(n_users, n_items, dim, seed=1)
    batches = make_batches(n_users, ZipfItems(n_items, seed=1), batch, 2, seed=1)
    expected = MFTables(*(t.clone() for t in tables))
    expected_states = MFTables(*(torch.zeros_like(t) for t in tables))
    step, read = MAKERS[name](tables)
    for users, items, targets in batches:
        spec.train_step(expected, expected_states, users, items, targets, MU, Loss.MSE, 0.0,
                        adagrad())
        step(users, items, targets)
    torch.cuda.synchronize()
    for got, exp in zip(read(), expected, strict=False):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-4, atol=1e-5)


def time_method(name, tables, batches, min_seconds=0.25, max_iters=40):
    """Seconds per step of method `name`, cycling through `batches`."""
    step, _ = MAKERS[name](tables)
    step(*batches[1 % len(batches)])  # warm-up (and compilation) on a second batch too
    cycle = itertools.cycle(batches)
    return time_call(lambda: step(*next(cycle)), min_seconds, max_iters)


def copy_bandwidth(gib=1.0):
    n = int(gib * 2**30 / 4)
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    iters = 10
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * n * 4 * iters / (time.perf_counter() - t0)  # read + write


# ----------------------------------------------------------------------------------------
# Top-k retrieval

TOPK_ITEMS = (1_000_000, 100_000)
TOPK_BATCHES = (1, 128, 4096)
TOPK_DIM, TOPK_K = 64, 10
TOPK_METHODS = ("reference", "fused")


def topk_reference(queries, items, bias, k):
    return torch.topk(queries @ items.T + bias, k)


def topk_fused(queries, items, bias, k):
    return torch.ops.fastmf.topk_scores(queries, items, bias, k, None, None, None)


def check_topk(queries, items, bias, k, chunk=256):
    scores, ids = topk_fused(queries, items, bias, k)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        expected = topk_reference(q, items, bias, k).values
        torch.testing.assert_close(scores[start : start + chunk], expected, rtol=1e-5, atol=1e-4)
    rescored = torch.einsum("bd,bjd->bj", queries.double(), items.double()[ids])
    rescored += bias.double()[ids]
    torch.testing.assert_close(scores.double(), rescored, rtol=1e-5, atol=1e-4)
    sorted_ids = ids.sort(dim=1).values
    assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()), "an index returned twice"


def time_call(fn, min_seconds=0.2, max_iters=50):
    """Seconds per call of fn: one warm-up, one call to size the loop, then a timed loop of
    enough calls for min_seconds (3 to max_iters)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(3, math.ceil(min_seconds / one))))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def run_topk():
    """{(items, batch, method): queries/s, or a string saying why not}."""
    from fastmf.ops import native  # loads the extension: torch.ops.fastmf

    results = {}
    if not native.has_kernel("cuda", "topk_scores"):
        log("top-k: this build of fastmf has no CUDA topk_scores kernel")
        return results
    gen = torch.Generator(device="cuda").manual_seed(3)
    for num_items in TOPK_ITEMS:
        items = torch.randn(num_items, TOPK_DIM, device="cuda", generator=gen) * 0.1
        bias = torch.randn(num_items, device="cuda", generator=gen) * 0.1
        for batch in TOPK_BATCHES:
            queries = torch.randn(batch, TOPK_DIM, device="cuda", generator=gen)
            try:
                check_topk(queries, items, bias, TOPK_K)
                log(f"top-k correctness I={num_items} B={batch}: ok")
            except Exception as exc:  # noqa: BLE001
                log(f"top-k correctness I={num_items} B={batch}: FAILED\n"
                    f"{traceback.format_exc(limit=3)}")
                for name in TOPK_METHODS:
                    results[(num_items, batch, name)] = f"incorrect: {type(exc).__name__}"
                continue
            for name, fn in (("reference", topk_reference), ("fused", topk_fused)):
                try:
                    args = (queries, items, bias, TOPK_K)
                    seconds = time_call(lambda f=fn, a=args: f(*a))
                    results[(num_items, batch, name)] = batch / seconds
                    log(f"top-k I={num_items:8d} B={batch:5d} {name:10s} "
                        f"{batch / seconds:12.0f} queries/s ({seconds * 1e3:.3f} ms)")
                except Exception as exc:  # noqa: BLE001
                    results[(num_items, batch, name)] = f"failed: {type(exc).__name__}"
                    log(f"top-k I={num_items} B={batch} {name}: FAILED {exc!s:.300}")
                torch.cuda.empty_cache()
        del items, bias
        torch.cuda.empty_cache()
    return results


def print_topk_table(results, dev):
    log("")
    log(f"## fastmf GPU top-k retrieval — {dev}, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"Exact top-{TOPK_K}, K={TOPK_DIM}, fp32, item bias; reference = "
        f"torch.topk(q @ X.T + b, {TOPK_K}).")
    log("")
    log("| items | batch | method | queries/s | ms per batch | vs reference |")
    log("|---:|---:|---|---:|---:|---:|")
    for num_items in TOPK_ITEMS:
        for batch in TOPK_BATCHES:
            base = results.get((num_items, batch, "reference"))
            for name in TOPK_METHODS:
                r = results.get((num_items, batch, name), "not run")
                if isinstance(r, float):
                    ratio = f"{r / base:.1f}x" if isinstance(base, float) else "-"
                    log(f"| {num_items} | {batch} | {name} | {r:.0f} | "
                        f"{1e3 * batch / r:.3f} | {ratio} |")
                else:
                    log(f"| {num_items} | {batch} | {name} | {r[:60]} | - | - |")


# ----------------------------------------------------------------------------------------
# One fused step, kernel by kernel (--step, --ncu-step, --ncu-table, --byte-model,
# --ptxas-summary; benchmarks/gpu_first.sh runs them). The byte model is documented in
# benchmarks/README.md ("GPU: byte model per kernel"); the code below is its source of
# numbers, so the README, the profiler table and the ncu table use one count.

STEP_BATCHES = (8192, 65536, 262144)
STEP_DIM = 64
STEP_OPS = ("train_step", "train_step_pairwise", "train_step_pairwise_sampled",
            "train_step_sampled")
# The sampled steps draw this many negatives per positive (fit's default).
SAMPLED_NEGATIVES = 4
# H200 HBM3e by the datasheet; the run also prints the copy bandwidth it measures.
HBM_BYTES_PER_S = 4.8e12
# The NVTX range around the one step that Nsight Compute profiles (gpu_first.sh passes
# --nvtx-include "fastmf_step/").
NVTX_RANGE = "fastmf_step"
# Metrics of the ncu pass; gpu_first.sh holds the same list (tests/test_gpu_scripts.py
# checks that they agree).
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_bytes.sum",
    "lts__t_sector_hit_rate.pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
)
# Key bits the one-sweep radix sort takes per pass (CUB's policy for 4-byte keys).
SORT_DIGIT_BITS = 8
THREADS = 256  # csrc/cuda/common.cuh kThreads
MAX_TILES = 8192  # csrc/cuda/segment_update_impl.cuh tile_size


def next_pow2(x):
    p = 1
    while p < x:
        p *= 2
    return p


def row_layout(dim, vec):
    """(vec, lanes, packs) of csrc/cuda/common.cuh row_layout: how a row is spread over a
    group of lanes."""
    num_packs = -(-dim // vec)
    lanes = 32 if num_packs >= 32 else next_pow2(max(num_packs, 1))
    per_lane = -(-num_packs // lanes)
    packs = 1 if per_lane <= 1 else next_pow2(per_lane)
    return vec, lanes, packs


def tile_size(n):
    """Slots per tile of the segment update (segment_update_impl.cuh tile_size)."""
    return min(max(next_pow2(-(-n // MAX_TILES)), 4), 32)


def key_bits(max_key):
    """Low key bits the sort looks at (segments.cu key_bits)."""
    bits = 1
    while bits < 32 and (max_key >> bits) != 0:
        bits += 1
    return bits


@dataclass
class RunStats:
    """How one table's sorted slots fall into runs (one per distinct row) and tiles."""

    slots: int
    tile: int
    tiles: int
    runs: int  # distinct rows
    cut_runs: int  # runs that cross a tile edge: summed and applied by stage 2
    pieces: int  # scratch rows those runs leave (one per tile they touch)


def run_stats(ids):
    """RunStats of one table's ids (any order; sorted here as the kernels sort them)."""
    ids = ids.detach().to("cpu", torch.int64).sort().values
    n = ids.numel()
    tile = tile_size(n)
    head = torch.ones(n, dtype=torch.bool)
    head[1:] = ids[1:] != ids[:-1]
    starts = head.nonzero().flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    first, last = starts // tile, (ends - 1) // tile
    cut = first != last
    return RunStats(n, tile, -(-n // tile), starts.numel(), int(cut.sum()),
                    int((last - first + 1)[cut].sum()))


@dataclass
class ModelRow:
    kernel: str  # the label of the profiler and ncu tables (label_kernels)
    formula: str  # bytes per sample, in the README's symbols
    bytes_per_sample: float


def step_byte_model(users, items, dim=STEP_DIM, num_users=NUM_USERS, num_items=NUM_ITEMS,
                    elem=4, id_bytes=8):
    """Bytes each kernel of one train_step (MSE, element-wise Adagrad, biases, reg 0) loads
    and stores per sample, counted from csrc/cuda at element granularity, for the batch
    (users, items). Returns (rows, minimum): the minimum reads the batch once and reads and
    writes each distinct row (weights, state, bias, bias state) once."""
    batch = users.numel()
    u, i = run_stats(users), run_stats(items)
    row = dim * elem
    vec = 16 // elem if dim % (16 // elem) == 0 else 1
    _, lanes, packs = row_layout(dim, vec)
    scratch = vec * lanes * packs * elem  # one padded row of stage-1 scratch
    update = 4 * row + 4 * elem  # weight and state rows read + written, bias and its state
    blocks = -(-batch // (THREADS // lanes))  # forward blocks: one loss-sum pair each
    passes = -(-key_bits(num_users + 1 + num_items) // SORT_DIGIT_BITS)
    rows = []

    def add(kernel, formula, total_bytes):
        rows.append(ModelRow(kernel, formula, total_bytes / batch))

    add("prepare", "2 id + 4 + 16: ids, target; 2 keys, 2 positions",
        batch * (2 * id_bytes + elem + 16))
    add("sort: histogram", "2 × 4: both slots' keys", 2 * batch * 4)
    for p in range(passes):
        add(f"sort: onesweep pass {p + 1}", "2 × 16: key + position, read + write",
            2 * batch * 16)
    add("run heads", "2 × 8: key read, head written", 2 * batch * 8)
    add("scan", "2 × 8: head read, run start written", 2 * batch * 8)
    add("forward", "3R + 24: P, Q rows, gradient row written; 2 keys, 2 biases, target, coef",
        batch * (3 * row + 8 + 4 * elem) + blocks * 16)

    def stage1(slot_bytes, s):
        applied = s.runs - s.cut_runs
        return (batch * slot_bytes + s.tiles * 8 + applied * update
                + s.pieces * (scratch + elem) + (s.pieces - s.cut_runs) * 4)

    def stage2(s):
        return s.tiles * 12 + s.pieces * (scratch + elem) + s.cut_runs * (8 + update)

    add("users: stage 1", "R + 16 + r_u (4R + 16) + scratch: Q row, coef, item key per slot",
        stage1(row + 16, u))
    add("users: stage 2", "cut runs: scratch pieces + their updates", stage2(u))
    add("items: stage 1", "R + 12 + r_i (4R + 16) + scratch: gradient row, coef per slot",
        stage1(row + 12, i))
    add("items: stage 2", "cut runs: scratch pieces + their updates", stage2(i))
    add("loss", "block sums", blocks * 16 + elem)
    minimum = (batch * (2 * id_bytes + elem) + (u.runs + i.runs) * update) / batch
    return rows, minimum, u, i


def sample_step_batch(batch, seed=0):
    """The benchmark's users (uniform) and items (Zipf 1.0) for one batch, drawn on the
    CPU, for the byte model without a GPU."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(0, NUM_USERS, (batch,), generator=gen)
    items = ZipfItems(NUM_ITEMS, 1.0, device="cpu", seed=seed).sample(batch, gen)
    return users, items


def format_byte_model(batches, dim=STEP_DIM, bandwidth=HBM_BYTES_PER_S):
    """Markdown: the model per kernel at each batch, the total, the minimum and the
    roofline (samples/s and microseconds per step at `bandwidth`)."""
    models = {b: step_byte_model(*sample_step_batch(b), dim=dim) for b in batches}
    first = models[batches[0]][0]
    lines = [f"Bytes per sample, K={dim} fp32, int64 ids, MSE + biases, element-wise Adagrad; "
             f"roofline at {bandwidth / 1e12:.1f} TB/s.", "",
             "| kernel | formula (R = 4K bytes) | "
             + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    for k, row in enumerate(first):
        cells = " | ".join(f"{models[b][0][k].bytes_per_sample:.0f}" for b in batches)
        lines.append(f"| {row.kernel} | {row.formula} | {cells} |")

    def cells(fn):
        return " | ".join(fn(b) for b in batches)

    total = {b: sum(r.bytes_per_sample for r in models[b][0]) for b in batches}
    lines += [
        f"| **total** | | {cells(lambda b: f'**{total[b]:.0f}**')} |",
        f"| minimum (distinct rows once) | 20 + (r_u + r_i)(4R + 16) | "
        f"{cells(lambda b: f'{models[b][1]:.0f}')} |",
        f"| r_u / r_i (distinct rows / B) | | "
        f"{cells(lambda b: f'{models[b][2].runs / b:.3f} / {models[b][3].runs / b:.3f}')} |",
        f"| roofline, total (G samples/s) | | "
        f"{cells(lambda b: f'{bandwidth / total[b] / 1e9:.2f}')} |",
        f"| roofline, minimum (G samples/s) | | "
        f"{cells(lambda b: f'{bandwidth / models[b][1] / 1e9:.2f}')} |",
        f"| step at roofline, total (µs) | | "
        f"{cells(lambda b: f'{total[b] * b / bandwidth * 1e6:.1f}')} |",
    ]
    return "\n".join(lines)


def label_kernels(names):
    """Labels of one step's kernels, in launch order, as the byte model names them. The
    segment stages run users first, then items (fused_step.cuh)."""
    labels, seen = [], {}
    rules = (("prepare_", "prepare"), ("Histogram", "sort: histogram"),
             ("ExclusiveSum", "sort: exclusive sum"), ("Onesweep", "sort: onesweep pass"),
             ("Upsweep", "sort: upsweep"), ("ScanBins", "sort: scan bins"),
             ("Downsweep", "sort: downsweep"), ("SingleTile", "sort: single tile"),
             ("mark_run_heads", "run heads"), ("DeviceScanInit", "scan: init"),
             ("DeviceScanKernel", "scan"), ("forward_kernel", "forward"),
             ("stage1_kernel", "stage 1"), ("stage2_kernel", "stage 2"),
             ("finish_loss", "loss"))
    for name in names:
        label = "memset" if "memset" in name.lower() else "other"
        for needle, what in rules:
            if needle in name:
                label = what
                break
        count = seen[label] = seen.get(label, 0) + 1
        if label == "sort: onesweep pass":
            label = f"sort: onesweep pass {count}"
        elif label.startswith("stage"):
            label = f"{('users', 'items')[min(count, 2) - 1]}: {label}"
        labels.append(label)
    return labels


def format_kernel_table(kernels, batch, model=None, bandwidth=HBM_BYTES_PER_S):
    """Markdown: one step's kernels (name, start µs, duration µs) in launch order, with
    the model's bytes per sample and the bandwidth that time implies."""
    by_label = {r.kernel: r.bytes_per_sample for r in model or ()}
    labels = label_kernels([k[0] for k in kernels])
    busy = sum(k[2] for k in kernels)
    span = (kernels[-1][1] + kernels[-1][2] - kernels[0][1]) if kernels else 0.0
    lines = ["| # | kernel | µs | % of kernel time | model B/sample | GB/s at model bytes | "
             "% of roofline |", "|---:|---|---:|---:|---:|---:|---:|"]
    for n, ((_, _, us), label) in enumerate(zip(kernels, labels, strict=True), 1):
        bytes_ = by_label.get(label)
        if bytes_ is None or us <= 0:
            rate = "-", "-"
        else:
            gbs = bytes_ * batch / (us * 1e-6) / 1e9
            rate = f"{gbs:.0f}", f"{100 * gbs * 1e9 / bandwidth:.0f}%"
        model_cell = "-" if bytes_ is None else f"{bytes_:.0f}"
        share = f"{100 * us / busy:.0f}%" if busy > 0 else "-"
        lines.append(f"| {n} | {label} | {us:.1f} | {share} | {model_cell} | {rate[0]} | "
                     f"{rate[1]} |")
    total = sum(r.bytes_per_sample for r in model) if model else None
    if total and busy > 0:
        gbs = total * batch / (busy * 1e-6) / 1e9
        lines.append(f"| | **kernels** | **{busy:.1f}** | | {total:.0f} | {gbs:.0f} | "
                     f"{100 * gbs * 1e9 / bandwidth:.0f}% |")
    else:
        lines.append(f"| | **kernels** | **{busy:.1f}** | | | | |")
    lines.append(f"| | first start to last end (gaps included) | {span:.1f} | | | | |")
    return "\n".join(lines)


def format_step_summary(results, bandwidth=None):
    """Markdown: one row per (op, batch) measured by --step."""
    lines = ["| op | batch | eager ms | graph ms | eager M/s | graph M/s | submit µs "
             "(eager / graph) | kernels µs | model B/sample | TB/s at model bytes (faster) | "
             "% of roofline |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peak = bandwidth or HBM_BYTES_PER_S

    def ms(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)[:40]

    for r in results:
        b = r["batch"]
        eager, graph = r.get("eager_ms"), r.get("graph_ms")
        rate = {k: (f"{b / (v * 1e-3) / 1e6:.1f}" if isinstance(v, float) else "-")
                for k, v in (("eager", eager), ("graph", graph))}
        sub = r.get("submit_us", {})
        submit = " / ".join(f"{sub[k]:.0f}" if isinstance(sub.get(k), float) else "-"
                            for k in ("eager", "graph"))
        kern = r.get("kernels_us")
        model = r.get("model_bytes_per_sample")
        best = min((v for v in (eager, graph) if isinstance(v, float)), default=None)
        if model and best:
            tbs = model * b / (best * 1e-3) / 1e12
            achieved, share = f"{tbs:.2f}", f"{100 * tbs * 1e12 / peak:.0f}%"
        else:
            achieved, share = "-", "-"
        lines.append(f"| {r['op']} | {b} | {ms(eager) if eager is not None else '-'} | "
                     f"{ms(graph) if graph is not None else '-'} | {rate['eager']} | "
                     f"{rate['graph']} | {submit} | "
                     f"{f'{kern:.1f}' if isinstance(kern, float) else '-'} | "
                     f"{f'{model:.0f}' if model else '-'} | {achieved} | {share} |")
    return "\n".join(lines)


# --- ncu report (CSV of `ncu --import R --csv --page raw --print-units base`)


def read_ncu_csv(text):
    """One dict per profiled kernel, in launch order, from ncu's CSV: the raw page (a
    column per metric) or the details page (a row per metric, pivoted here). ncu's own
    notes before the header and the units row after it are skipped."""
    rows = list(csv.reader(io.StringIO(text)))
    start = next((k for k, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        return []
    header = rows[start]
    long_form = "Metric Name" in header and "Metric Value" in header
    out, by_id = [], {}
    for r in rows[start + 1:]:
        if len(r) != len(header):
            continue
        rec = dict(zip(header, r, strict=True))
        if not rec.get("ID", "").strip().isdigit():  # the units row
            continue
        if not long_form:
            out.append(rec)
            continue
        kernel = by_id.get(rec["ID"])
        if kernel is None:
            kernel = by_id[rec["ID"]] = {"ID": rec["ID"], "Kernel Name": rec["Kernel Name"]}
            out.append(kernel)
        kernel[rec["Metric Name"]] = rec["Metric Value"]
    return out


def ncu_number(rec, name):
    """A metric of one ncu row as a float (thousands separators dropped), or None."""
    raw = rec.get(name, "").replace(",", "").strip()
    try:
        return float(raw)
    except ValueError:
        return None


def format_ncu_table(records, batches, dim=STEP_DIM):
    """Markdown per profiled step: each kernel's time, the model's bytes against L2 and
    DRAM bytes per sample, DRAM bandwidth, L2 hit rate, achieved occupancy, registers.
    Steps are split where a prepare kernel starts one, and matched to `batches` in order."""
    steps, current = [], []
    for rec in records:
        if "prepare_" in rec.get("Kernel Name", "") and current:
            steps.append(current)
            current = []
        current.append(rec)
    if current:
        steps.append(current)
    out = []
    for n, step in enumerate(steps):
        batch = batches[n] if n < len(batches) else None
        model = {}
        if batch is not None:
            rows, _, _, _ = step_byte_model(*sample_step_batch(batch), dim=dim)
            model = {r.kernel: r.bytes_per_sample for r in rows}
        out += ["", f"ncu: step {n + 1}, batch {batch if batch else '?'} "
                    f"({len(step)} kernels)", "",
                "| # | kernel | µs | model B/sample | L2 B/sample | DRAM B/sample | DRAM GB/s | "
                "L2 hit % | occupancy % | regs | grid |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        labels = label_kernels([r.get("Kernel Name", "") for r in step])
        tot = {"us": 0.0, "model": 0.0, "l2": 0.0, "dram": 0.0}
        for k, (rec, label) in enumerate(zip(step, labels, strict=True), 1):
            ns = ncu_number(rec, "gpu__time_duration.sum")
            rd, wr = ncu_number(rec, "dram__bytes_read.sum"), ncu_number(rec,
                                                                        "dram__bytes_write.sum")
            l2 = ncu_number(rec, "lts__t_bytes.sum")
            dram = rd + wr if rd is not None and wr is not None else None

            def per_sample(x, batch=batch):
                return f"{x / batch:.0f}" if x is not None and batch else "-"

            gbs = f"{dram / ns:.0f}" if dram is not None and ns else "-"  # bytes/ns = GB/s
            hit = ncu_number(rec, "lts__t_sector_hit_rate.pct")
            occ = ncu_number(rec, "sm__warps_active.avg.pct_of_peak_sustained_active")
            regs = ncu_number(rec, "launch__registers_per_thread")
            grid = ncu_number(rec, "launch__grid_size")
            mb = model.get(label)
            tot["us"] += (ns or 0) / 1e3
            tot["model"] += mb or 0
            tot["l2"] += l2 or 0
            tot["dram"] += dram or 0

            def fmt(x, spec):
                return "-" if x is None else format(x, spec)

            out.append(f"| {k} | {label} | {fmt(ns and ns / 1e3, '.1f')} | "
                       f"{fmt(mb, '.0f')} | {per_sample(l2)} | {per_sample(dram)} | {gbs} | "
                       f"{fmt(hit, '.0f')} | {fmt(occ, '.0f')} | {fmt(regs, '.0f')} | "
                       f"{fmt(grid, '.0f')} |")
        dram_rate = f"{tot['dram'] / (tot['us'] * 1e3):.0f}" if tot["us"] else "-"
        l2_all = f"{tot['l2'] / batch:.0f}" if batch else "-"
        dram_all = f"{tot['dram'] / batch:.0f}" if batch else "-"
        out.append(f"| | **step** | **{tot['us']:.1f}** | {tot['model']:.0f} | {l2_all} | "
                   f"{dram_all} | {dram_rate} | | | | |")
    return "\n".join(out).strip()


# --- ptxas -v report (registers, stack, spills per kernel) from the build log


PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    """{mangled kernel: {arch, regs, stack, spill_stores, spill_loads, smem}} from the
    `ptxas info` lines of nvcc -Xptxas -v."""
    kernels, entry, props = {}, None, None
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            entry = m.group(1)
            kernels.setdefault(entry, {"arch": m.group(2)})
        elif m := PTXAS_PROPS.search(line):
            props = m.group(1)
        elif (m := PTXAS_STACK.search(line)) and entry is not None and props == entry:
            kernels[entry].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif (m := PTXAS_USED.search(line)) and entry is not None:
            kernels[entry]["regs"] = int(m.group(1))
            s = PTXAS_SMEM.search(line)
            kernels[entry]["smem"] = int(s.group(1)) if s else 0
            entry = None
    return kernels


def demangle(names):
    """Demangled names through c++filt when it is installed, else the names as given."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                             timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return list(names)
    return out if len(out) == len(names) else list(names)


def short_kernel_name(name, width=100):
    name = re.sub(r"\(anonymous namespace\)::|fastmf::cuda::|fastmf::|cub::\w+::", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def format_ptxas(kernels, top=12):
    """Markdown: every kernel that spills or uses a stack frame, then the `top` kernels by
    register count."""
    if not kernels:
        return ("no `ptxas info` lines: was the build run with -Xptxas -v "
                "(NVCC_APPEND_FLAGS)?")
    names = list(kernels)
    pretty = dict(zip(names, demangle(names), strict=True))
    spills = [n for n in names if kernels[n].get("spill_stores", 0)
              or kernels[n].get("spill_loads", 0) or kernels[n].get("stack", 0)]
    by_regs = sorted(names, key=lambda n: -kernels[n].get("regs", 0))[:top]
    regs = [kernels[n].get("regs", 0) for n in names]
    lines = [f"{len(names)} kernels; registers per thread {min(regs)}..{max(regs)}; "
             f"{len(spills)} with a stack frame or spills.", "",
             "| kernel | arch | regs | stack B | spill st/ld B | smem B |",
             "|---|---|---:|---:|---:|---:|"]
    for n in spills + [n for n in by_regs if n not in spills]:
        k = kernels[n]
        lines.append(f"| {short_kernel_name(pretty[n])} | {k['arch']} | {k.get('regs', '-')} | "
                     f"{k.get('stack', '-')} | {k.get('spill_stores', '-')}/"
                     f"{k.get('spill_loads', '-')} | {k.get('smem', '-')} |")
    return "\n".join(lines)


# --- measurement on the GPU


def median(xs):
    return statistics.median(xs) if xs else None


def event_times_ms(fn, iters, before=None):
    """Per-call device time (ms) of fn(k), between events recorded around each call."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for k in range(iters):
        if before is not None:
            before(k)
        starts[k].record()
        fn(k)
        ends[k].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def submit_times_us(fn, iters):
    """Host time (µs) of fn(k) launched onto an idle device: what a call costs the CPU."""
    out = []
    for k in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(k)
        out.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return out


def profile_kernels(fn):
    """(name, start µs, duration µs) of every device activity of the second of two calls
    of fn(), in start order, from torch.profiler (CUPTI). The first call is the profiler's
    warm-up: a fresh profiling session can miss the first kernels it should record."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        for _ in range(2):
            fn()
            torch.cuda.synchronize()
            prof.step()
    # Device-side events only, without the GPU copies of annotations (ProfilerStep#N),
    # which span the whole step.
    found = [(e.time_range.start, e.name, e.time_range.elapsed_us()) for e in prof.events()
             if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
             and not e.name.startswith("ProfilerStep")]
    found.sort()
    return [(name, float(start), float(us)) for start, name, us in found]


def copy_bandwidths(mib=256, iters=5):
    """Device-to-device (read + write counted), pinned host-to-device and device-to-host
    bandwidth in bytes/s, event-timed medians."""
    n = mib * 2**20 // 4
    dev = torch.rand(n, device="cuda")
    dev2 = torch.empty_like(dev)
    host = torch.empty(n, pin_memory=True)
    size = n * 4
    out = {}
    for name, fn, moved in (("d2d", lambda k: dev2.copy_(dev), 2 * size),
                            ("h2d_pinned", lambda k: dev2.copy_(host, non_blocking=True), size),
                            ("d2h_pinned", lambda k: host.copy_(dev, non_blocking=True), size)):
        fn(0)
        out[name] = moved / (median(event_times_ms(fn, iters)) * 1e-3)
    return out


def capture_graph(step, static):
    """A CUDA graph of one step on the static inputs, after two warm-up steps on a side
    stream (first-use initialisation stays out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*static)
    return graph


def positives_csr(data, num_users, num_items):
    """The CSR (indptr, indices) of the distinct (user, item) pairs of ``data``'s batches,
    rows sorted: the positives the sampled steps draw their negatives around."""
    users = torch.cat([b[0] for b in data]).long()
    items = torch.cat([b[1] for b in data]).long()
    pairs = torch.unique(users * num_items + items)  # sorted: by user, then item
    counts = torch.bincount(pairs // num_items, minlength=num_users)
    indptr = torch.zeros(num_users + 1, dtype=torch.long, device=pairs.device)
    indptr[1:] = counts.cumsum(0)
    return indptr, pairs % num_items


def make_sampled_native(tables, op, csr):
    """The fused step that draws SAMPLED_NEGATIVES uniform negatives per positive around
    ``csr`` (``op``: train_step_pairwise_sampled, BPR; train_step_sampled, BCE); its step
    takes (users, positives, anything) and counts its calls as the draws' step."""
    from fastmf.ops import Loss, MFTables, PairwiseLoss, native

    weights = MFTables(*(t.clone() for t in tables))
    states = MFTables(*(torch.zeros_like(t) for t in weights))
    opt = adagrad()
    calls = [0]

    def step(u, i, _unused):
        calls[0] += 1
        if op == "train_step_pairwise_sampled":
            return native.train_step_pairwise_sampled(weights, states, u, i, *csr,
                                                      SAMPLED_NEGATIVES, 0, calls[0],
                                                      PairwiseLoss.BPR, 0.0, opt)
        return native.train_step_sampled(weights, states, u, i, *csr, SAMPLED_NEGATIVES, 0,
                                          calls[0], 0.0, Loss.BCE, 0.0, opt)

    return step, lambda: (weights.user_factors, weights.item_factors, weights.item_bias)


def step_setup(op, batch, dim, seed=0):
    """(step, batches) for op at this batch: fresh 1M x 200K tables and 4 batches (the
    sampled steps: of positives, each meeting SAMPLED_NEGATIVES drawn negatives)."""
    tables = make_tables(NUM_USERS, NUM_ITEMS, dim, seed=seed)
    items = ZipfItems(NUM_ITEMS, 1.0, seed=seed)
    if op == "train_step":
        step, _ = make_train_step(tables)
        data = make_batches(NUM_USERS, items, batch, 4, seed=batch)
    elif op == "train_step_pairwise":
        step, _ = make_bpr_native(tables)
        data = make_triples(NUM_USERS, NUM_ITEMS, items, batch, 4, seed=batch)
    else:
        data = make_triples(NUM_USERS, NUM_ITEMS, items, batch, 4, seed=batch)
        step, _ = make_sampled_native(tables, op, positives_csr(data, NUM_USERS, NUM_ITEMS))
    return step, data


def measure_step(op, batch, dim, iters, log_fn=log):
    """Everything --step times for one (op, batch); a part that fails is recorded as a
    string and the rest still runs. Returns the results and a function that profiles one
    step of the same set-up later, once every timing is done (so that the profiler cannot
    slow down any launch that is timed) and adds its kernels to the results."""
    res = {"op": op, "batch": batch, "dim": dim}
    step, data = step_setup(op, batch, dim)
    users, items = data[0][0], data[0][1]
    res["distinct_users"] = int(torch.unique(users).numel())
    res["distinct_items"] = int(torch.unique(items).numel())
    model = None
    if op == "train_step":
        model, minimum, _, _ = step_byte_model(users, items, dim=dim)
        res["model_bytes_per_sample"] = sum(r.bytes_per_sample for r in model)
        res["minimum_bytes_per_sample"] = minimum
    for _ in range(3):  # warm-up: first-use allocation, CUB temp sizes, module load
        step(*data[0])
    torch.cuda.synchronize()

    def attempt(key, fn):
        try:
            res[key] = fn()
        except Exception as exc:  # noqa: BLE001
            res[key] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            log_fn(f"{op} B={batch} {key}: FAILED\n{traceback.format_exc(limit=4)}")

    attempt("eager_ms", lambda: median(
        event_times_ms(lambda k: step(*data[k % len(data)]), iters)))
    static = [t.clone() for t in data[0]]
    graph = None

    def graphed():
        nonlocal graph
        graph = capture_graph(step, static)

        def load(k):
            for s, t in zip(static, data[k % len(data)], strict=True):
                s.copy_(t)

        return median(event_times_ms(lambda k: graph.replay(), iters, before=load))

    attempt("graph_ms", graphed)
    subs = {}
    attempt("submit_eager", lambda: median(submit_times_us(
        lambda k: step(*data[k % len(data)]), min(iters, 30))))
    subs["eager"] = res.pop("submit_eager")
    if graph is not None:
        attempt("submit_graph", lambda: median(submit_times_us(lambda k: graph.replay(),
                                                                 min(iters, 30))))
        subs["graph"] = res.pop("submit_graph")
    res["submit_us"] = subs

    def profile_later():
        kernels = []

        def profiled():
            kernels.extend(profile_kernels(lambda: step(*data[1])))
            return [list(k) for k in kernels]

        attempt("kernels", profiled)
        if kernels:
            res["kernels_us"] = sum(k[2] for k in kernels)
            log_fn(f"\n### {op}, batch {batch}, K={dim}: one eager step under torch.profiler "
                   f"(distinct users {res['distinct_users']}, items {res['distinct_items']})\n")
            log_fn(format_kernel_table(kernels, batch, model))
        return res

    return res, profile_later


def cuda_ready(mode, ops):
    """None when the GPU and fastmf's CUDA kernels of `ops` are there, else why not."""
    if not torch.cuda.is_available():
        return (f"gpu_bench {mode}: no CUDA device (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}); nothing measured")
    try:
        from fastmf.ops import native
    except Exception as exc:  # noqa: BLE001
        return f"gpu_bench {mode}: fastmf did not import ({type(exc).__name__}: {exc})"
    missing = [op for op in ops if not native.has_kernel("cuda", op)]
    if missing:
        return (f"gpu_bench {mode}: this fastmf build has no CUDA kernel for "
                f"{', '.join(missing)}; build it with FASTMF_CUDA=1")
    return None


def brief(x):
    """A measurement for a progress line: 3 decimals, or the reason it is missing."""
    return f"{x:.3f}" if isinstance(x, float) else str(x)[:80]


def append_json(path, record):
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_step_mode(args):
    why = cuda_ready("--step", args.ops)
    if why:
        log(why)
        return 2
    dev = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    env = {k: v for k, v in os.environ.items() if k.startswith("FASTMF_")}
    log(f"gpu_bench --step: {dev}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, K={args.dim}, batches {list(args.batches)}, "
        f"{args.iters} timed steps each; env {env or '{}'}")
    bw = {}
    try:
        bw = copy_bandwidths()
        torch.cuda.empty_cache()
        log("copy bandwidth: " + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items()))
    except Exception as exc:  # noqa: BLE001
        log(f"copy bandwidth: FAILED {type(exc).__name__}: {exc!s:.200}")
    append_json(args.json, {"kind": "copy_bandwidth", "device": dev, "env": env, **bw})
    results, later = [], []
    for op in args.ops:
        for batch in args.batches:
            try:
                res, profile_later = measure_step(op, batch, args.dim, args.iters)
                later.append(profile_later)
            except Exception as exc:  # noqa: BLE001
                log(f"{op} B={batch}: FAILED\n{traceback.format_exc(limit=4)}")
                res = {"op": op, "batch": batch, "eager_ms": f"failed: {type(exc).__name__}"}
                torch.cuda.empty_cache()
            results.append(res)
            append_json(args.json, {"kind": "step", "device": dev, "env": env, **res})
            sub = res.get("submit_us", {})
            log(f"{op} B={batch}: eager {brief(res.get('eager_ms'))} ms, graph "
                f"{brief(res.get('graph_ms'))} ms, submit eager {brief(sub.get('eager'))} / "
                f"graph {brief(sub.get('graph'))} µs")
    # The per-kernel tables, after every timing (their set-ups are still alive: a few GB).
    for profile_later in later:
        res = profile_later()
        append_json(args.json, {"kind": "kernels", "device": dev, "env": env, "op": res["op"],
                                "batch": res["batch"], "kernels": res.get("kernels")})
        res.pop("kernels", None)
    later.clear()
    torch.cuda.empty_cache()
    d2d = bw.get("d2d")
    log(f"\n## step summary — {dev}, K={args.dim}, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"Event-timed medians of {args.iters} steps; submit = host time of one call onto an "
        f"idle GPU; roofline {HBM_BYTES_PER_S / 1e12:.1f} TB/s (copy measured: "
        f"{f'{d2d / 1e12:.2f} TB/s' if d2d else 'n/a'}); model bytes: README 'GPU: byte "
        f"model per kernel'.\n")
    log(format_step_summary(results))
    return 0


def run_ncu_step(args):
    """The marked step(s) that Nsight Compute profiles: set-up and warm-up outside the
    NVTX range, then one step per batch inside it (also between cudaProfilerStart/Stop,
    for ncu --profile-from-start off)."""
    op = args.ops[0]
    why = cuda_ready("--ncu-step", [op])
    if why:
        log(why)
        return 2
    for batch in args.batches:
        step, data = step_setup(op, batch, args.dim)
        for _ in range(3):
            step(*data[0])
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        torch.cuda.nvtx.range_push(NVTX_RANGE)
        step(*data[1])
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        log(f"gpu_bench --ncu-step: {op} batch {batch}, K={args.dim}: one step marked "
            f"'{NVTX_RANGE}'")
        step = data = None
        torch.cuda.empty_cache()
    return 0


def positive_int_list(text):
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}")
    return values


def op_list(text):
    ops = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [op for op in ops if op not in STEP_OPS]
    if not ops or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(STEP_OPS)}, got {text!r}")
    return ops



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="fastmf GPU benchmarks (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="K=64 and batch 65536 only")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for timing; slow methods are skipped once it is spent")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-topk", action="store_true", help="leave out the top-k section")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--step", action="store_true",
                      help="one fused step kernel by kernel: eager, graph, submit, profiler")
    mode.add_argument("--ncu-step", action="store_true",
                      help=f"one step per batch in the NVTX range {NVTX_RANGE!r}, for ncu")
    mode.add_argument("--ncu-table", metavar="CSV",
                      help="per-kernel table of ncu's raw CSV (--csv --page raw)")
    mode.add_argument("--byte-model", action="store_true",
                      help="print the per-kernel byte model of train_step (no GPU needed)")
    mode.add_argument("--ptxas-summary", metavar="LOG",
                      help="registers and spills from a build log made with -Xptxas -v")
    ap.add_argument("--batches", type=positive_int_list, default=STEP_BATCHES,
                    help="batch sizes of the step modes (comma-separated)")
    ap.add_argument("--dim", type=int, default=STEP_DIM, help="K of the step modes")
    ap.add_argument("--ops", type=op_list, default=("train_step",),
                    help=f"ops of --step / --ncu-step, from {', '.join(STEP_OPS)}")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per measurement")
    ap.add_argument("--json", metavar="FILE", help="--step appends one JSON line per result")
    args = ap.parse_args(argv)
    if args.dim <= 0 or args.iters <= 0:
        ap.error(f"--dim and --iters must be positive, got {args.dim} and {args.iters}")
    return args


def read_text(path, what):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise SystemExit(f"gpu_bench {what}: cannot read {path!r}: {exc.strerror}") from None


def main(argv=None):
    args = parse_args(argv)
    if args.byte_model:
        log(format_byte_model(args.batches, args.dim))
        return 0
    if args.ptxas_summary:
        log(format_ptxas(parse_ptxas(read_text(args.ptxas_summary, "--ptxas-summary"))))
        return 0
    if args.ncu_table:
        records = read_ncu_csv(read_text(args.ncu_table, "--ncu-table"))
        if not records:
            log(f"gpu_bench --ncu-table: no kernel rows in {args.ncu_table!r}")
            return 1
        log(format_ncu_table(records, args.batches, args.dim))
        return 0
    if args.step:
        return run_step_mode(args)
    if args.ncu_step:
        return run_ncu_step(args)
    if not torch.cuda.is_available():
        log("gpu_bench: no CUDA device; nothing to measure")
        return 0
    started = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    dims = (64,) if args.quick else DIMS
    batches = (65536,) if args.quick else BATCHES
    dev = torch.cuda.get_device_name()
    log(f"gpu_bench: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"python {platform.python_version()}")
    try:
        import fastmf
        from fastmf._extension import native_build_info

        log(f"fastmf {fastmf.__version__}: {native_build_info()}")
    except Exception as exc:  # noqa: BLE001
        log(f"fastmf import failed: {exc}")

    status = {}
    for name in methods:
        try:
            check_correct(name)
            status[name] = "ok"
            log(f"correctness {name}: ok")
        except Exception as exc:  # noqa: BLE001
            status[name] = f"incorrect/failed: {type(exc).__name__}: {str(exc)[:200]}"
            log(f"correctness {name}: FAILED\n{traceback.format_exc(limit=3)}")

    # Top-k first: a fixed, small cost (about 10-20 s on an H100) that the training
    # budget below does not squeeze out.
    topk_results = None
    if not args.no_topk:
        try:
            topk_results = run_topk()
        except Exception as exc:  # noqa: BLE001
            topk_results = {}
            log(f"top-k: FAILED {type(exc).__name__}: {exc!s:.300}")
        torch.cuda.empty_cache()

    bandwidth = copy_bandwidth()
    log(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (device-to-device, read + write)")

    items = ZipfItems(NUM_ITEMS, 1.0, seed=0)
    results = {}
    for dim in dims:
        tables = make_tables(NUM_USERS, NUM_ITEMS, dim, seed=0)
        for batch in batches:
            data = make_batches(NUM_USERS, items, batch, 4, seed=dim + batch)
            for name in methods:
                key = (dim, batch, name)
                if status.get(name) != "ok":
                    results[key] = None
                    continue
                elapsed = time.perf_counter() - started
                slow = name in ("compiled", "ref_dense", "native_dense")
                if elapsed > args.budget and (slow or elapsed > 1.5 * args.budget):
                    results[key] = "budget"
                    continue
                if name == "compiled" and dim != 64:
                    results[key] = "skipped"  # compile time: one K is enough to compare
                    continue
                try:
                    seconds = time_method(name, tables, data)
                    results[key] = batch / seconds
                    rate = batch / seconds / 1e6
                    log(f"K={dim:4d} B={batch:7d} {name:13s} {rate:9.2f} M samples/s")
                except Exception as exc:  # noqa: BLE001
                    results[key] = f"failed: {type(exc).__name__}"
                    log(f"K={dim} B={batch} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                torch.cuda.empty_cache()
            del data
        del tables
        torch.cuda.empty_cache()

    pairwise_results = bench_pairwise(started, args.budget)

    log("")
    log(f"## fastmf GPU training throughput — {dev}, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"1M users x 200K items, users uniform, items Zipf(1.0), MSE + biases, element-wise "
        f"Adagrad, fp32. Copy bandwidth {bandwidth / 1e12:.2f} TB/s; roofline = bandwidth / "
        f"(32K+44) B per sample.")
    log("")
    log("| K | batch | method | M samples/s | vs ref_sparse | of roofline |")
    log("|---:|---:|---|---:|---:|---:|")
    for dim in dims:
        roofline = bandwidth / (32 * dim + 44)
        for batch in batches:
            base = results.get((dim, batch, "ref_sparse"))
            for name in methods:
                r = results.get((dim, batch, name))
                if isinstance(r, float):
                    ratio = f"{r / base:.1f}x" if isinstance(base, float) else "-"
                    log(f"| {dim} | {batch} | {name} | {r / 1e6:.2f} | {ratio} | "
                        f"{100 * r / roofline:.0f}% |")
                else:
                    why = r if isinstance(r, str) else status.get(name, "not run")
                    log(f"| {dim} | {batch} | {name} | {why[:60]} | - | - |")
    print_pairwise_table(pairwise_results, bandwidth)
    if topk_results is not None:
        print_topk_table(topk_results, dev)
    log(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
