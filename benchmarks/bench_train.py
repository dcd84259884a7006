"""Training throughput, every backend side by side in one run (pytest-benchmark).

100k users × 20k items, Zipf(1.0) users and items, K ∈ {32, 64, 128},
batch ∈ {1024, 8192, 65536}. Each case asserts its path is correct (against the
reference, on the same model) before it is timed, and reports samples/s in extra_info.
Each path is timed on 8 distinct batches with the same hot rows (see DISTINCT_BATCHES).

    pytest benchmarks/bench_train.py --benchmark-json=out.json
    python benchmarks/report.py out.json       # the table for benchmarks/README.md
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmf
from fastmf.ops import Loss, MFTables, Optimizer, OptimizerArgs
from fastmf.ops import reference as spec
from fastmf.testing import (
    BACKENDS,
    make_batch,
    requires_native,
    requires_numba,
    tolerance,
    zipf_ids,
)

NUM_USERS, NUM_ITEMS = 100_000, 20_000
DIMS = [32, 64, 128]
BATCHES = [1024, 8192, 65536]
LR = 0.05
# Each timed path cycles through this many distinct batches whose hot users and items are the
# same (one rank -> id permutation per table), as consecutive batches of a training set are.
# Before 2026-12-05 one batch was repeated, which kept every row it touches in cache.
DISTINCT_BATCHES = 8


def stream_batches(batch: int, count: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``count`` (users, items, ratings) batches of Zipf(1.0) ids with the same hot rows."""
    out = []
    for s in range(count):
        rng = np.random.default_rng(7 + s)
        users, items = (zipf_ids(n, batch, generator=rng,
                                 permutation=np.random.default_rng(n).permutation(n))
                        for n in (NUM_USERS, NUM_ITEMS))
        out.append((users, items, torch.from_numpy(rng.uniform(1.0, 5.0, batch)).float()))
    return out


class Textbook(nn.Module):
    """The plain model: nn.Embedding users/items/biases, mu + b_u + b_i + <p_u, q_i>."""

    def __init__(self, dim, sparse):
        super().__init__()
        self.p = nn.Embedding(NUM_USERS, dim, sparse=sparse)
        self.q = nn.Embedding(NUM_ITEMS, dim, sparse=sparse)
        self.bu = nn.Embedding(NUM_USERS, 1, sparse=sparse)
        self.bi = nn.Embedding(NUM_ITEMS, 1, sparse=sparse)
        for e in (self.p, self.q):
            nn.init.uniform_(e.weight, -0.05, 0.05)
        for e in (self.bu, self.bi):
            nn.init.zeros_(e.weight)
        self.mu = 3.5

    def forward(self, u, i):
        return (self.mu + self.bu(u).squeeze(1) + self.bi(i).squeeze(1)
                + (self.p(u) * self.q(i)).sum(1))


def textbook_step(model, opt):
    def step(u, i, r):
        opt.zero_grad()
        loss = F.mse_loss(model(u, i), r)
        loss.backward()
        opt.step()
        return loss
    return step


def compiled_dense_step(model, opt):
    """The best plain-PyTorch path: dense gradients, torch.compile on the forward/loss and on
    Adagrad.step."""
    loss_fn = torch.compile(lambda u, i, r: F.mse_loss(model(u, i), r))
    opt_step = torch.compile(opt.step)

    def step(u, i, r):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(u, i, r)
        loss.backward()
        opt_step()
        return loss
    return step


def fastmf_model(backend, dim, sparse=False):
    torch.manual_seed(0)
    return fastmf.MF(NUM_USERS, NUM_ITEMS, dim, global_mean=3.5, backend=backend, sparse=sparse)


def confidences(r):
    """Per-sample weights from the ratings, ``1 + log1p(r)`` (confidence-shaped)."""
    return 1.0 + torch.log1p(r)


def fused_step(backend, dim, weighted=False):
    model = fastmf_model(backend, dim)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=LR)
    if not weighted:
        return model, lambda u, i, r: fastmf.train_step(model, opt, u, i, r)
    made = {}  # a batch's weights are made once, as a data loader would hand them over

    def step(u, i, r):
        if id(r) not in made:
            made[id(r)] = (r, confidences(r))
        return fastmf.train_step(model, opt, u, i, r, weights=made[id(r)][1])
    return model, step


def autograd_step(backend, dim):
    model = fastmf_model(backend, dim, sparse=True)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=LR)
    return model, textbook_step(model, opt)


def check_against_reference(model, step, dim, weighted=False):
    """One step of ``step`` on a fresh batch equals fastmf.ops.reference.train_step on a
    copy (Adagrad from fresh, zero accumulators, as the optimizer starts)."""
    tables = MFTables(*(t.detach().clone() for t in model.tables()))
    states = MFTables(*(torch.zeros_like(t) for t in tables))
    u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 2048, seed=123)
    step(u, i, r)
    spec.train_step(tables, states, u, i, r, model.mu, Loss.MSE, 0.0,
                    OptimizerArgs(Optimizer.ADAGRAD, LR, 1e-10),
                    confidences(r) if weighted else None)
    for got, want in zip(model.tables(), tables, strict=True):
        torch.testing.assert_close(got.detach(), want, **tolerance(torch.float32))


PATHS = {
    "reference_sparse_adagrad": None,
    "reference_dense_adagrad": None,
    "reference_compiled_dense": None,
    "numba_train_step": requires_numba,
    "native_train_step": requires_native,
    # The same step with per-sample weights (confidences): what weighting costs.
    "numba_train_step_weighted": requires_numba,
    "native_train_step_weighted": requires_native,
    "native_autograd_sparse_adagrad": requires_native,
}


def build(path, dim):
    """(step function, samples-per-call multiplier) for one path, after a correctness check."""
    if path.startswith("reference"):
        torch.manual_seed(0)
        sparse = path == "reference_sparse_adagrad"
        model = Textbook(dim, sparse)
        opt = torch.optim.Adagrad(model.parameters(), lr=LR)
        step = (compiled_dense_step if path == "reference_compiled_dense" else textbook_step)(
            model, opt)
        u, i, r = make_batch(NUM_USERS, NUM_ITEMS, 2048, seed=5)
        before = model.q.weight.detach().clone()
        loss = step(u, i, r)
        assert torch.isfinite(loss) and not torch.equal(before, model.q.weight)
        return step
    backend = path.split("_")[0]
    weighted = path.endswith("_weighted")
    if "train_step" in path:
        model, step = fused_step(backend, dim, weighted)
    else:
        model, step = autograd_step(backend, dim)
    check_against_reference(model, step, dim, weighted)
    return step


def params(paths):
    out = []
    for path in paths:
        mark = PATHS[path]
        out.append(pytest.param(path, marks=mark) if mark else path)
    return out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("path", params(PATHS))
def test_train(benchmark, path, dim, batch):
    if path == "reference_compiled_dense" and benchmark.disabled and (dim, batch) != (32, 1024):
        pytest.skip("compiling is slow; one compiled case checks the path in --benchmark-disable")
    step = build(path, dim)
    batches = stream_batches(batch, 1 if benchmark.disabled else DISTINCT_BATCHES)
    step(*batches[0])  # warm-up (JIT, compile, allocator)
    benchmark.group = f"train K={dim} batch={batch}"
    benchmark.extra_info.update(path=path, dim=dim, batch=batch, kind="train",
                                distinct_batches=len(batches))
    cycle = itertools.cycle(batches)
    benchmark.pedantic(lambda: step(*next(cycle)), rounds=5,
                       iterations=max(1, 65536 // batch), warmup_rounds=1)
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_s"] = batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend, dim, batch):
    model = fastmf_model(backend, dim)
    u, i, _ = make_batch(NUM_USERS, NUM_ITEMS, batch, seed=9)
    with torch.no_grad():
        want = spec.mf_forward(u, i, *model.tables(), model.mu)
        torch.testing.assert_close(model(u, i), want, **tolerance(torch.float32))
    benchmark.group = f"forward K={dim} batch={batch}"
    benchmark.extra_info.update(path=f"{backend}_forward", dim=dim, batch=batch, kind="forward")
    benchmark.pedantic(model.predict, args=(u, i), rounds=5, iterations=max(1, 65536 // batch),
                       warmup_rounds=1)
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_s"] = batch / benchmark.stats.stats.mean
