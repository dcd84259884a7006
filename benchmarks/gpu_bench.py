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
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import time
import traceback
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

    def step(users, items, targets):
        return native.train_step(weights, states, users, items, targets, MU, Loss.MSE, 0.0,
                                 adagrad())

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

    def step(u, i, j):
        return native.train_step_pairwise(weights, states, u, i, j, PairwiseLoss.BPR, 0.0,
                                          adagrad())

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="K=64 and batch 65536 only")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for timing; slow methods are skipped once it is spent")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-topk", action="store_true", help="leave out the top-k section")
    args = ap.parse_args()
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
