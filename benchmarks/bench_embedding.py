"""The fused embedding layer side by side with textbook PyTorch and FBGEMM's CPU TBE
(pytest-benchmark), on three model shapes, Zipf(1.0) ids, 2 threads.

Paths (every one on the same tables, initial weights and batches):

- ``textbook-<opt>``: ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(mode="sum",
  sparse=True)`` + ``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam``;
- ``fbgemm-<opt>-<dtype>``: FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` on CPU
  (EXACT_SGD / EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD, float32 or float16 tables), all tables
  of a model in one TBE, the optimizer in backward; skipped when fbgemm_gpu is not
  importable (see ``_fbgemm.py``);
- ``<backend>-<opt>-<dtype>``: ``fastmf.nn.Embedding`` / ``EmbeddingBag`` with
  ``fastmf.optim.apply_in_backward`` (SparseSGD, SparseAdagrad element- and row-wise,
  SparseAdam element- and row-wise), float32 / float16 / bfloat16 tables, for each backend
  ("native", "numba") that has the embedding_bag kernels; skipped for a backend without
  them. The reference backend (the spec in plain PyTorch) is far too slow to time; it is
  checked against the textbook path at the smallest size only (``test_reference_layer``);
- ``floor`` (the command line only, not a pytest case): torch's gathers of tables no
  optimizer steps, the same model and its backward (NeuMF's MLP with its Adam step too): what
  any path pays besides the tables' updates. Its first loss must equal the textbook
  model's from the same start, and it must write no table (``test_floor_path``).

Workloads, K ∈ {32, 64, 128}, batch ∈ {1024, 8192, 65536}:

1. ``mf``: user table 100k, item table 20k, one id each, ``(p*q).sum(1)``, MSE on 1–5
   ratings.
2. ``bag``: per sample a user bag (1 user id + 5 ids of a 1M-row feature table) and an item
   bag (1 item id + 10 feature ids), weighted sum pooling (per-sample weights in [0.5, 1.5)),
   dot, BCE with random 0/1 labels. The feature table serves both bags.
3. ``neumf``: GMF user/item and MLP user/item tables (dim K each), an MLP 2K → 64 → 32 → 16
   and an output layer on [GMF product, MLP output], BCE; the MLP is stepped by
   ``torch.optim.Adam``, the tables by the path's optimizer.

Each timed path cycles through the same 8 distinct batches (``--distinct-batches``), whose
hot rows are the same (one rank -> id permutation per table), as consecutive batches of a
training set are; before 2026-12-05 one batch was repeated, which kept the rows it touches
in cache.

Correctness first: before a path is timed, it takes 3 steps on 3 fresh batches from the
same start as the textbook path of its optimizer (row-wise optimizers: the textbook model
with a hand-written row-wise step, as FBGEMM's tests do), and every table and MLP weight
must match: float32 within rtol 1e-4 / atol 1e-5; float16/bfloat16 tables (the textbook
stays float32) within 4 units in the last place of the table's type (rtol 2^-8 for
float16, 2^-5 for bfloat16, atol 1e-5) — three roundings of the update and the small changes
they make to later gradients. A few elements may fall outside (at most 1e-5 of them for
float32, 1e-3 for float16/bfloat16), but never by more than 2·lr: where a row's summed
gradient nearly cancels, Adagrad's and Adam's normalised step lr·g/(|g| + eps) depends on
the summation order (float32) or on the rounded weights (half tables), and can move that
element by up to 2·lr. eps is 1e-6 here (not 1e-8/1e-10) so such elements are rare.

    PYTHONPATH=/tmp/fbgemm pytest benchmarks/bench_embedding.py -k "mf and 64 and 8192"
    pytest benchmarks/bench_embedding.py --benchmark-disable      # CI: correctness only

With ``--benchmark-disable`` or the ``CI`` environment variable set, only the smallest K and
batch of each workload are collected (the run stays under a minute);
``FASTMF_BENCH_FULL=1`` collects the full grid anyway.

For a loaded machine, the script runs the paths interleaved (round-robin, repeated) and
prints medians with the spread as a markdown table; ``--profile`` adds where a fastmf step
spends its time (kernels vs the rest):

    PYTHONPATH=/tmp/fbgemm python benchmarks/bench_embedding.py --workloads mf bag \
        --dims 64 --batches 8192 --repeats 7 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import _fbgemm
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmf
from fastmf import ops
from fastmf.ops import reference as spec
from fastmf.testing import zipf_ids

QUICK = bool(os.environ.get("CI")) or "--benchmark-disable" in sys.argv
if os.environ.get("FASTMF_BENCH_FULL") == "1":
    QUICK = False
# Timing runs use 2 threads. Correctness-only runs use one: the numbers do not depend on it,
# and on a loaded 2-core machine every small op of a 2-thread run waits for its second
# OpenMP thread to be scheduled (~2 ms instead of ~0.01 ms per op measured here).
TIMING_OFF = "--benchmark-disable" in sys.argv
THREADS = int(os.environ.get("FASTMF_BENCH_THREADS", "1" if TIMING_OFF else "2"))
torch.set_num_threads(THREADS)
if ops.numba_available():
    import numba

    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))

# Correctness-only runs use a 100k-row feature table (every path still sees the same sizes):
# building and copying 1M-row tables for every case would dominate them.
NUM_USERS, NUM_ITEMS, NUM_FEATURES = 100_000, 20_000, 100_000 if QUICK else 1_000_000
USER_FEATURES, ITEM_FEATURES = 5, 10
MLP_SIZES = (64, 32, 16)
DIMS = [32, 64, 128]
BATCHES = [1024, 8192, 65536]
WORKLOADS = ("mf", "bag", "neumf")
# Tables of each workload, and which table each feature (one bag per sample) reads.
TABLES = {
    "mf": (NUM_USERS, NUM_ITEMS),
    "bag": (NUM_USERS, NUM_ITEMS, NUM_FEATURES),
    "neumf": (NUM_USERS, NUM_ITEMS, NUM_USERS, NUM_ITEMS),
}
FEATURE_TABLE_MAP = {"mf": [0, 1], "bag": [0, 1, 2, 2], "neumf": [0, 1, 2, 3]}

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "rowwise_adam")
TEXTBOOK_TIMED = ("sgd", "adagrad", "adam")  # torch's own; the row-wise ones only check
LR = {"sgd": 0.5, "adagrad": 0.05, "rowwise_adagrad": 0.05, "adam": 1e-3, "rowwise_adam": 1e-3}
# eps 1e-6 rather than the libraries' 1e-8/1e-10: where a row's summed gradient cancels
# down to ~eps, the normalised step lr·g/(|g| + eps) turns on the summation order, which
# differs between paths; a larger eps keeps those rare elements within the tolerance.
ADAGRAD_EPS, ADAM_EPS, BETAS = 1e-6, 1e-6, (0.9, 0.999)
MLP_LR = 1e-3
FAST_BACKENDS = ("native", "numba")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

CHECK_BATCH, CHECK_STEPS = 512, 3
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# float16/bfloat16 tables: 4 ulps of the table's type relative to the value (their relative
# spacing is at most 2^-10 / 2^-7).
RTOL = {torch.float32: 1e-4, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-5}
ATOL = 1e-5
# Elements allowed outside that bound (still within 2·lr of the textbook): see the module
# docstring.
OUTLIER_FRACTION = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def has_embedding_kernels(backend: str) -> bool:
    """Whether ``backend`` runs the embedding_bag family itself (fastmf.nn falls back to the
    reference for a backend without it, which must not be timed under that backend's name)."""
    if backend not in ops.available_backends():
        return False
    module = ops.kernels(backend, "cpu")
    if getattr(module, "embedding_bag_backward_update", None) is None:
        return False
    if backend == "native":
        try:  # the Python wrapper may be newer than the compiled extension
            return ops.native.has_kernel("cpu", "embedding_bag_backward_update")
        except RuntimeError:  # "operator fastmf::... does not exist"
            return False
    return True


# --- data -------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch of a workload, plus the same lookups in FBGEMM's TBE layout (built once,
    as a data loader would hand them over, so no path pays for the conversion)."""

    users: Tensor  # (B,) int64
    items: Tensor  # (B,) int64
    target: Tensor  # (B,) float32: ratings 1–5 (mf) or 0/1 labels
    user_features: Tensor | None = None  # (B, 5) feature ids (bag)
    item_features: Tensor | None = None  # (B, 10)
    user_weight: Tensor | None = None  # (B, 1) weight of the user id in its bag
    user_feature_weights: Tensor | None = None  # (B, 5)
    item_weight: Tensor | None = None  # (B, 1)
    item_feature_weights: Tensor | None = None  # (B, 10)
    tbe_indices: Tensor | None = None
    tbe_offsets: Tensor | None = None
    tbe_weights: Tensor | None = None

    def __len__(self) -> int:
        return self.users.shape[0]


# How many distinct batches a timed path cycles through (the hot rows the same in each, see
# make_batch). Timing one batch over and over kept every row it touches in cache, which
# flattered the paths whose time is in their kernels: mf, K = 64, batch 8,192, 2 threads,
# 2-core AMD EPYC, two runs each way alternated: fastmf row-wise Adagrad 5.70 / 4.80 M
# samples/s on one batch, 3.63 / 3.47 on 8; textbook Adagrad 1.50 / 1.43 and 1.52 / 1.34
# (its time is in torch's sparse-gradient bookkeeping). A batch of 8,192 Zipf ids reaches
# 3,650-3,720 rows of the 100k user table, three quarters of them not in the batch before.
DISTINCT_BATCHES = 8


def timed_batches(workload: str, batch: int, count: int = DISTINCT_BATCHES) -> list[Batch]:
    """The distinct batches a timed path cycles through (the same for every path), with the
    same hot rows."""
    return [make_batch(workload, batch, seed=7 + s, stream=True) for s in range(count)]


_HOT_ROWS: dict[int, np.ndarray] = {}


def make_batch(workload: str, batch: int, seed: int, stream: bool = False) -> Batch:
    """A batch of Zipf(1.0) ids. ``stream``: every such batch has the same hot rows (one
    rank -> id permutation per table size, as a training set's popular items stay popular),
    for timing; otherwise each batch has its own, for the correctness checks (whose
    tolerances for half tables were set on those: rows shared by the 3 check batches take
    more roundings)."""
    rng = np.random.default_rng(seed)

    def stream_ids(num_rows: int, size: int) -> Tensor:
        if not stream:
            return zipf_ids(num_rows, size, generator=rng)
        if num_rows not in _HOT_ROWS:
            _HOT_ROWS[num_rows] = np.random.default_rng(num_rows).permutation(num_rows)
        return zipf_ids(num_rows, size, generator=rng, permutation=_HOT_ROWS[num_rows])

    users = stream_ids(NUM_USERS, batch)
    items = stream_ids(NUM_ITEMS, batch)
    if workload == "mf":
        target = torch.from_numpy(rng.integers(1, 6, batch)).float()
    else:
        target = torch.from_numpy(rng.integers(0, 2, batch)).float()
    x = Batch(users, items, target)
    if workload == "mf":
        x.tbe_indices = torch.cat([users, items])
        x.tbe_offsets = torch.arange(2 * batch + 1)
    elif workload == "neumf":
        x.tbe_indices = torch.cat([users, items, users, items])
        x.tbe_offsets = torch.arange(4 * batch + 1)
    else:
        def weights(*shape):
            return torch.from_numpy(rng.uniform(0.5, 1.5, shape).astype(np.float32))

        x.user_features = stream_ids(NUM_FEATURES, batch * USER_FEATURES).view(
            batch, USER_FEATURES)
        x.item_features = stream_ids(NUM_FEATURES, batch * ITEM_FEATURES).view(
            batch, ITEM_FEATURES)
        x.user_weight, x.item_weight = weights(batch, 1), weights(batch, 1)
        x.user_feature_weights = weights(batch, USER_FEATURES)
        x.item_feature_weights = weights(batch, ITEM_FEATURES)
        x.tbe_indices = torch.cat([users, items, x.user_features.reshape(-1),
                                   x.item_features.reshape(-1)])
        ones = torch.arange(batch)
        x.tbe_offsets = torch.cat([
            ones, batch + ones, 2 * batch + USER_FEATURES * ones,
            (2 + USER_FEATURES) * batch + ITEM_FEATURES * ones,
            torch.tensor([(2 + USER_FEATURES + ITEM_FEATURES) * batch])])
        x.tbe_weights = torch.cat([x.user_weight.view(-1), x.item_weight.view(-1),
                                   x.user_feature_weights.reshape(-1),
                                   x.item_feature_weights.reshape(-1)])
    return x


_CHECK_BATCHES: dict[str, list[Batch]] = {}


def check_batches(workload: str) -> list[Batch]:
    if workload not in _CHECK_BATCHES:
        _CHECK_BATCHES[workload] = [make_batch(workload, CHECK_BATCH, 100 + s)
                                    for s in range(CHECK_STEPS)]
    return _CHECK_BATCHES[workload]


_INIT: dict[tuple[str, int], list[Tensor]] = {}


def initial_tables(workload: str, dim: int) -> list[Tensor]:
    """The start of every path's tables: uniform(-0.05, 0.05) rounded to bfloat16, magnitudes
    at least 2^-13, so float32, float16 and bfloat16 tables hold exactly the same values.
    One workload's tables are cached at a time (they reach 0.6 GB)."""
    key = (workload, dim)
    if key not in _INIT:
        _INIT.clear()
        tables = []
        for t, rows in enumerate(TABLES[workload]):
            gen = torch.Generator().manual_seed(1000 + t)
            w = torch.empty(rows, dim).uniform_(-0.05, 0.05, generator=gen)
            w = w.to(torch.bfloat16).float()
            tiny = w.abs() < 2.0**-13
            w[tiny] = torch.where(w[tiny] < 0, -(2.0**-13), 2.0**-13)
            tables.append(w)
        _INIT[key] = tables
    return _INIT[key]


# --- models -------------------------------------------------------------------------------


def make_mlp(dim: int) -> tuple[nn.Module, nn.Module]:
    """NeuMF's tower 2K -> 64 -> 32 -> 16 and output layer, the same numbers on every path."""
    torch.manual_seed(4321)
    layers, width = [], 2 * dim
    for size in MLP_SIZES:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers), nn.Linear(dim + MLP_SIZES[-1], 1)


def predict(workload: str, parts: list[Tensor], mlp=None, out=None) -> Tensor:
    """The model on top of the lookups (one (B, K) tensor per feature, TBE order)."""
    if workload == "mf":
        p, q = parts
        return (p * q).sum(1)
    if workload == "bag":
        user, item, user_features, item_features = parts
        return ((user + user_features) * (item + item_features)).sum(1)
    gmf_user, gmf_item, mlp_user, mlp_item = parts
    hidden = mlp(torch.cat([mlp_user, mlp_item], 1))
    return out(torch.cat([gmf_user * gmf_item, hidden], 1)).squeeze(1)


def loss_of(workload: str, prediction: Tensor, target: Tensor) -> Tensor:
    if workload == "mf":
        return F.mse_loss(prediction, target)
    return F.binary_cross_entropy_with_logits(prediction, target)


class Model(nn.Module):
    """A workload on embedding modules (torch's or fastmf's: same call conventions)."""

    def __init__(self, workload: str, dim: int, embedding, embedding_bag):
        super().__init__()
        self.workload = workload
        make = embedding_bag if workload == "bag" else embedding
        self.tables = nn.ModuleList([make(rows, dim) for rows in TABLES[workload]])
        self.mlp = self.out = None
        if workload == "neumf":
            self.mlp, self.out = make_mlp(dim)
        with torch.no_grad():
            for table, init in zip(self.tables, initial_tables(workload, dim), strict=True):
                table.weight.copy_(init)

    def forward(self, x: Batch) -> Tensor:
        t = self.tables
        if self.workload == "bag":
            parts = [t[0](x.users[:, None], per_sample_weights=x.user_weight),
                     t[1](x.items[:, None], per_sample_weights=x.item_weight),
                     t[2](x.user_features, per_sample_weights=x.user_feature_weights),
                     t[2](x.item_features, per_sample_weights=x.item_feature_weights)]
        elif self.workload == "mf":
            parts = [t[0](x.users), t[1](x.items)]
        else:
            parts = [t[0](x.users), t[1](x.items), t[2](x.users), t[3](x.items)]
        return predict(self.workload, parts, self.mlp, self.out)

    def table_parameters(self) -> list[Tensor]:
        return [table.weight for table in self.tables]

    def table_weights(self) -> list[Tensor]:
        return [table.weight.detach().float().clone() for table in self.tables]


class TBEModel(nn.Module):
    """A workload on one FBGEMM TBE holding all its tables."""

    def __init__(self, workload: str, dim: int, optimizer: str, dtype: torch.dtype):
        super().__init__()
        self.workload, self.dim = workload, dim
        self.tbe = _fbgemm.make_tbe(initial_tables(workload, dim), FEATURE_TABLE_MAP[workload],
                                    optimizer, LR[optimizer], ADAGRAD_EPS, dtype)
        self.mlp = self.out = None
        if workload == "neumf":
            self.mlp, self.out = make_mlp(dim)

    def forward(self, x: Batch) -> Tensor:
        out = self.tbe(x.tbe_indices, x.tbe_offsets, per_sample_weights=x.tbe_weights)
        return predict(self.workload, list(out.split(self.dim, 1)), self.mlp, self.out)

    def table_weights(self) -> list[Tensor]:
        return _fbgemm.table_weights(self.tbe)


# --- the row-wise optimizers written out for the textbook model ----------------------------


class RowwiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD on a textbook sparse gradient (coalesced: duplicate
    rows summed first): ``G_row += mean_k(g²); w -= lr·g / (√G_row + eps)``."""

    def __init__(self, params, lr: float, eps: float):
        super().__init__(params, dict(lr=lr, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce()
                ids, g = grad.indices()[0], grad.values()
                state = self.state[p].setdefault("sum", p.new_zeros(p.shape[0]))
                state[ids] += g.pow(2).mean(1)
                p[ids] -= group["lr"] * g / (state[ids].sqrt() + group["eps"]).unsqueeze(1)


class RowwiseAdam(torch.optim.Optimizer):
    """FBGEMM's PARTIAL_ROWWISE_ADAM on a textbook sparse gradient, lazily (touched rows
    only, as torch.optim.SparseAdam): ``m = b1·m + (1-b1)·g; v_row = b2·v_row +
    (1-b2)·mean_k(g²); w -= lr/(1-b1^t) · m / (√(v_row/(1-b2^t)) + eps)``."""

    def __init__(self, params, lr: float, eps: float, betas=BETAS):
        super().__init__(params, dict(lr=lr, eps=eps, betas=betas))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce()
                ids, g = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=p.new_zeros(p.shape[0]))
                state["step"] += 1
                t = state["step"]
                m = b1 * state["m"][ids] + (1 - b1) * g
                v = b2 * state["v"][ids] + (1 - b2) * g.pow(2).mean(1)
                state["m"][ids], state["v"][ids] = m, v
                denom = (v / (1 - b2**t)).sqrt() + group["eps"]
                p[ids] -= (group["lr"] / (1 - b1**t)) * m / denom.unsqueeze(1)


def textbook_optimizer(optimizer: str, params):
    lr = LR[optimizer]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS)
    if optimizer == "rowwise_adagrad":
        return RowwiseAdagrad(params, lr=lr, eps=ADAGRAD_EPS)
    if optimizer == "adam":
        return torch.optim.SparseAdam(params, lr=lr, betas=BETAS, eps=ADAM_EPS)
    return RowwiseAdam(params, lr=lr, eps=ADAM_EPS)


def fastmf_optimizer(optimizer: str, params, backend: str):
    lr = LR[optimizer]
    if optimizer == "sgd":
        return fastmf.optim.SparseSGD(params, lr=lr, backend=backend)
    if optimizer in ("adagrad", "rowwise_adagrad"):
        return fastmf.optim.SparseAdagrad(params, lr=lr, eps=ADAGRAD_EPS, backend=backend,
                                          rowwise=optimizer == "rowwise_adagrad")
    return fastmf.optim.SparseAdam(params, lr=lr, betas=BETAS, eps=ADAM_EPS, backend=backend,
                                   rowwise=optimizer == "rowwise_adam")


# --- paths --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    kind: str  # "textbook", "fbgemm", "floor" (see FloorEmbedding) or a fastmf backend
    optimizer: str
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        if self.kind == "floor":
            return "floor"
        if self.kind == "textbook":
            return f"textbook-{self.optimizer}"
        return f"{self.kind}-{self.optimizer}-{dtype_name(self.dtype)}"

    @classmethod
    def parse(cls, name: str) -> Path:
        if name == "floor":
            return cls("floor", "none")
        kind, optimizer, *rest = name.split("-") if "-" in name else (name, "")
        dtype = getattr(torch, rest[0], None) if len(rest) == 1 else torch.float32
        if not optimizer or len(rest) > 1 or not isinstance(dtype, torch.dtype):
            raise ValueError(f"path {name!r}: expected KIND-OPTIMIZER[-DTYPE] with DTYPE a "
                             "torch dtype name (float32, float16, bfloat16), as "
                             f"{DEFAULT_PATHS[2]!r}")
        return cls(kind, optimizer, dtype)


class FloorEmbedding(nn.Module):
    """The "floor" path's table: torch's gather (``F.embedding``) of a weight no optimizer
    steps, as a leaf that takes its gradient. A step of the floor path is what any path pays
    besides updating its tables: the gathers, the model, its backward and the autograd
    engine (NeuMF's MLP and its Adam step too); no row is written."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).requires_grad_()


class FloorEmbeddingBag(FloorEmbedding):
    """The floor path's bag table: ``F.embedding_bag`` (sum), as :class:`FloorEmbedding`."""

    def forward(self, ids: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        return F.embedding_bag(ids, self.weight, offsets, mode="sum",
                               per_sample_weights=per_sample_weights).requires_grad_()


class Trainer:
    """A path's model and optimizers; ``step(batch)`` is one training step."""

    def __init__(self, path: Path, workload: str, dim: int):
        self.path, self.workload = path, workload
        torch.manual_seed(0)  # fastmf tables draw their stochastic-rounding seed here
        if path.kind == "fbgemm":
            self.model = TBEModel(workload, dim, path.optimizer, path.dtype)
            self.optimizers = []
        elif path.kind == "floor":
            self.model = Model(workload, dim, FloorEmbedding, FloorEmbeddingBag)
            self.optimizers = []
        elif path.kind == "textbook":
            self.model = Model(
                workload, dim, lambda n, k: nn.Embedding(n, k, sparse=True),
                lambda n, k: nn.EmbeddingBag(n, k, mode="sum", sparse=True))
            self.optimizers = [textbook_optimizer(path.optimizer,
                                                  self.model.table_parameters())]
        else:
            backend, dtype = path.kind, path.dtype
            self.model = Model(
                workload, dim,
                lambda n, k: fastmf.nn.Embedding(n, k, backend=backend, dtype=dtype),
                lambda n, k: fastmf.nn.EmbeddingBag(n, k, mode="sum", backend=backend,
                                                    dtype=dtype))
            self.optimizers = [fastmf.optim.apply_in_backward(fastmf_optimizer(
                path.optimizer, self.model.table_parameters(), backend))]
        if self.model.mlp is not None:
            self.optimizers.append(torch.optim.Adam(
                [*self.model.mlp.parameters(), *self.model.out.parameters()], lr=MLP_LR))

    def step(self, x: Batch) -> Tensor:
        for opt in self.optimizers:
            opt.zero_grad()
        loss = loss_of(self.workload, self.model(x), x.target)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return loss.detach()

    def weights(self) -> list[tuple[str, Tensor]]:
        """(name, float32 copy) of every table and MLP weight."""
        out = [(f"table {t}", w) for t, w in enumerate(self.model.table_weights())]
        if self.model.mlp is not None:
            for name, p in [*self.model.mlp.named_parameters(prefix="mlp"),
                            *self.model.out.named_parameters(prefix="out")]:
                out.append((name, p.detach().clone()))
        return out


_TEXTBOOK: dict[tuple[str, str, int], list[tuple[str, Tensor]]] = {}


def textbook_weights(workload: str, optimizer: str, dim: int) -> list[tuple[str, Tensor]]:
    """The textbook path's weights after the check steps (one key cached at a time)."""
    key = (workload, optimizer, dim)
    if key not in _TEXTBOOK:
        _TEXTBOOK.clear()
        trainer = Trainer(Path("textbook", optimizer), workload, dim)
        for x in check_batches(workload):
            trainer.step(x)
        _TEXTBOOK[key] = trainer.weights()
    return _TEXTBOOK[key]


def assert_weights_match(got, want, dtype: torch.dtype, lr: float, what: str) -> None:
    for (name, g), (_, w) in zip(got, want, strict=True):
        error = (g - w).abs()
        bound = ATOL + RTOL[dtype] * w.abs()
        outside = int((error > bound).sum())
        worst = float(error.max())
        allowed = int(OUTLIER_FRACTION[dtype] * w.numel())
        assert outside <= allowed and worst <= 2 * lr + float(bound.max()), (
            f"{what}, {name}: {outside} of {w.numel()} elements differ from the textbook "
            f"float32 model by more than atol {ATOL} + rtol {RTOL[dtype]:.3g} ({allowed} "
            f"allowed); largest difference {worst:.3g} (allowed {2 * lr:.3g} + the bound)")


def check(trainer: Trainer, dim: int) -> None:
    """3 steps of ``trainer`` from the common start equal the textbook path's (see the module
    docstring for the tolerances); a textbook path only has to train."""
    path, workload = trainer.path, trainer.workload
    before = trainer.model.table_weights()
    losses = []
    for x in check_batches(workload):
        losses.append(trainer.step(x))
        assert torch.isfinite(losses[-1]), f"{path.name} on {workload}: loss {losses[-1]}"
    if path.kind == "floor":
        # The textbook model's loss from the same start, and no table written.
        x = check_batches(workload)[0]
        start = Trainer(Path("textbook", "sgd"), workload, dim).model
        torch.testing.assert_close(losses[0], loss_of(workload, start(x), x.target).detach())
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.table_weights(),
                                                     strict=True)), "the floor wrote a table"
        return
    before = before[0]
    if path.kind == "textbook":
        assert not torch.equal(before, trainer.model.table_weights()[0])
        return
    want = textbook_weights(workload, path.optimizer, dim)
    assert_weights_match(trainer.weights(), want, path.dtype, LR[path.optimizer],
                         f"{path.name} vs textbook-{path.optimizer} on {workload} K={dim}")


def all_paths() -> list[Path]:
    """Every path, grouped by optimizer so the textbook result each check needs is cached."""
    paths = []
    for opt in OPTIMIZERS:
        if opt in TEXTBOOK_TIMED:
            paths.append(Path("textbook", opt))
        if opt in _fbgemm.OPTIMIZERS:
            paths += [Path("fbgemm", opt, d) for d in _fbgemm.DTYPES
                      if d == torch.float32 or opt == "rowwise_adagrad"]
        paths += [Path(b, opt, d) for b in FAST_BACKENDS for d in DTYPES]
    return paths


def path_param(path: Path, *values):
    marks = []
    if path.kind == "fbgemm" and _fbgemm.MISSING:
        marks.append(pytest.mark.skip(reason=_fbgemm.MISSING))
    if path.kind in FAST_BACKENDS and not has_embedding_kernels(path.kind):
        marks.append(pytest.mark.skip(
            reason=f"backend {path.kind!r} has no embedding_bag kernels in this build"))
    return pytest.param(*values, marks=marks,
                        id="-".join([*map(str, values[:-1]), path.name]))


def cases():
    sizes = [(w, d, b) for w in WORKLOADS for d in DIMS for b in BATCHES
             if not QUICK or (d, b) == (DIMS[0], BATCHES[0])]
    return [path_param(p, w, d, b, p) for w, d, b in sizes for p in all_paths()]


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("workload", "dim", "batch", "path"), cases())
def test_embedding(benchmark, workload, dim, batch, path):
    trainer = Trainer(path, workload, dim)
    check(trainer, dim)
    xs = timed_batches(workload, batch, 1 if benchmark.disabled else DISTINCT_BATCHES)
    trainer.step(xs[0])  # warm-up (JIT, allocator)
    benchmark.group = f"{workload} K={dim} batch={batch}"
    benchmark.extra_info.update(path=path.name, workload=workload, dim=dim, batch=batch,
                                threads=THREADS, distinct_batches=len(xs))
    batches = itertools.cycle(xs)
    benchmark.pedantic(lambda: trainer.step(next(batches)), rounds=5,
                       iterations=max(1, 65536 // batch), warmup_rounds=1)
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_s"] = batch / benchmark.stats.stats.mean


def reference_cases():
    out = []
    for workload in WORKLOADS:
        for opt in OPTIMIZERS:
            out.append(pytest.param(workload, Path("reference", opt),
                                    id=f"{workload}-reference-{opt}-float32"))
        for dtype in DTYPES[1:]:
            out.append(pytest.param(workload, Path("reference", "rowwise_adagrad", dtype),
                                    id=f"{workload}-reference-rowwise_adagrad-"
                                       f"{dtype_name(dtype)}"))
    return out


@pytest.mark.parametrize(("workload", "path"), reference_cases())
def test_reference_layer(workload, path):
    """The fastmf layer on the reference kernels (the spec) gives the textbook numbers on
    every workload: the models and the comparison above are right before any fast backend
    is measured. Smallest size only: the reference is not built for speed."""
    check(Trainer(path, workload, DIMS[0]), DIMS[0])


@pytest.mark.parametrize("workload", WORKLOADS)
def test_floor_path(workload):
    """The floor path (torch's gathers of tables nothing steps, the model, its backward)
    gives the textbook model's loss from the same start and writes no table."""
    check(Trainer(Path.parse("floor"), workload, 8), 8)
    with pytest.raises(ValueError, match="expected KIND-OPTIMIZER"):
        Path.parse("native")


def test_textbook_rowwise_optimizers_follow_the_spec():
    """The hand-written row-wise steps of the textbook model equal fastmf's spec."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(50, 8, generator=gen) - 0.5
    ids = torch.randint(0, 20, (64,), generator=gen)  # many duplicates
    rows = torch.randn(64, 8, generator=gen)
    for optimizer, code in (("rowwise_adagrad", "ROWWISE_ADAGRAD"),
                            ("rowwise_adam", "ROWWISE_ADAM")):
        p = nn.Parameter(weight.clone())
        opt = textbook_optimizer(optimizer, [p])
        want = weight.clone()
        if code == "ROWWISE_ADAGRAD":
            states = (torch.zeros(50), None)
        else:
            states = (torch.zeros(50, 8), torch.zeros(50))
        for step in (1, 2):
            p.grad = torch.sparse_coo_tensor(ids[None], rows * step, (50, 8))
            opt.step()
            spec.sparse_update(want, *states, ids, rows * step, code, LR[optimizer],
                               ADAGRAD_EPS if code == "ROWWISE_ADAGRAD" else ADAM_EPS,
                               *BETAS, 0.0, "NONE", step, 0, False)
        assert not torch.equal(want, weight)
        torch.testing.assert_close(p.detach(), want, **FP32_TOLERANCE)


# --- interleaved timing (python benchmarks/bench_embedding.py) ------------------------------

DEFAULT_PATHS = ("floor", "textbook-adagrad", "fbgemm-rowwise_adagrad-float32",
                 "fbgemm-adagrad-float32", "fbgemm-rowwise_adagrad-float16",
                 *(f"{b}-{o}-{d}" for b in FAST_BACKENDS for o, d in (
                     ("adagrad", "float32"), ("rowwise_adagrad", "float32"),
                     ("rowwise_adagrad", "float16"), ("rowwise_adagrad", "bfloat16"))))


def runnable(path: Path) -> str | None:
    """Why ``path`` cannot run here, or None."""
    if path.kind == "fbgemm":
        return _fbgemm.MISSING
    if path.kind in FAST_BACKENDS and not has_embedding_kernels(path.kind):
        return f"backend {path.kind!r} has no embedding_bag kernels in this build"
    return None


CLOCK = time.perf_counter  # main() may switch to time.process_time


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


@contextlib.contextmanager
def kernel_timer(backend: str, totals: dict):
    """Adds the time spent in the backend's embedding_bag forward and fused backward-update
    calls to ``totals`` (patched on the backend module for the duration; a diagnostic)."""
    module = ops.kernels(backend, "cpu")
    names = ("embedding_bag_forward", "embedding_bag_backward_update")
    originals = {name: getattr(module, name) for name in names}

    def timed(name):
        def call(*args, **kwargs):
            start = CLOCK()
            try:
                return originals[name](*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + CLOCK() - start
        return call

    for name in names:
        setattr(module, name, timed(name))
    try:
        yield totals
    finally:
        for name in names:
            setattr(module, name, originals[name])


def model_ops_seconds(workload: str, dim: int, x: Batch, steps: int) -> float:
    """Per step: the model's own PyTorch ops (combine, dot, loss, their backward) on leaf
    tensors shaped like the lookups, i.e. what any path pays on top of its tables (NeuMF's
    MLP and its Adam step excluded)."""
    parts = [torch.randn(len(x), dim, requires_grad=True)
             for _ in FEATURE_TABLE_MAP[workload]]
    if workload == "neumf":
        return float("nan")
    start = CLOCK()
    for _ in range(steps):
        loss_of(workload, predict(workload, parts), x.target).backward()
    return (CLOCK() - start) / steps


def profile(trainer: Trainer, xs: list[Batch], dim: int, steps: int) -> str:
    totals: dict[str, float] = {}
    with kernel_timer(trainer.path.kind, totals):
        start = CLOCK()
        for s in range(steps):
            trainer.step(xs[s % len(xs)])
        total = (CLOCK() - start) / steps
    forward = totals.get("embedding_bag_forward", 0.0) / steps
    update = totals.get("embedding_bag_backward_update", 0.0) / steps
    model = model_ops_seconds(trainer.workload, dim, xs[0], steps)
    rest = total - forward - update - (0 if model != model else model)
    ms = 1e3
    return (f"| {trainer.path.name} | {total * ms:.2f} | {forward * ms:.2f} | {update * ms:.2f}"
            f" | {model * ms:.2f} | {rest * ms:.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mf", "bag"], choices=WORKLOADS)
    parser.add_argument("--dims", nargs="+", type=int, default=[64])
    parser.add_argument("--batches", nargs="+", type=int, default=[8192])
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="about how long each timed window runs")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, which other jobs on a loaded machine "
                             "disturb less (use with --threads 1: idle OpenMP threads "
                             "spin and count as CPU time)")
    parser.add_argument("--distinct-batches", type=int, default=DISTINCT_BATCHES,
                        help="how many distinct batches each path cycles through (1: one "
                             "batch repeated, as runs before 2026-12-05 timed)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.distinct_batches < 1:
        parser.error(f"--distinct-batches must be at least 1, got {args.distinct_batches}")
    torch.set_num_threads(args.threads)
    if ops.numba_available():
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"machine: {machine()}; load average before: {os.getloadavg()}")
    paths = []
    for name in args.paths:
        try:
            path = Path.parse(name)
        except ValueError as e:
            parser.error(str(e))
        why = runnable(path)
        if why:
            print(f"skipped {name}: {why}")
        else:
            paths.append(path)
    for workload in args.workloads:
        for dim in args.dims:
            for batch in args.batches:
                run_size(workload, dim, batch, paths, args)
    print(f"load average after: {os.getloadavg()}")


def run_size(workload: str, dim: int, batch: int, paths: list[Path], args) -> None:
    xs = timed_batches(workload, batch, args.distinct_batches)
    trainers = {}
    for path in paths:
        trainer = Trainer(path, workload, dim)
        check(trainer, dim)
        trainer.step(xs[0])
        start = time.perf_counter()
        trainer.step(xs[-1])
        trainers[path.name] = (trainer, max(1, int(args.seconds
                                                  / (time.perf_counter() - start))))
    _TEXTBOOK.clear()
    _INIT.clear()
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            trainer, steps = trainers[name]
            start = CLOCK()
            for s in range(steps):
                trainer.step(xs[s % len(xs)])
            rates[name].append(steps * batch / (CLOCK() - start))
    medians = {name: statistics.median(v) for name, v in rates.items()}
    textbook = medians.get("textbook-adagrad")
    fbgemm = medians.get("fbgemm-rowwise_adagrad-float32")
    print(f"\n{workload} K={dim} batch={batch}, load average {os.getloadavg()}; "
          f"M samples/s ({args.clock} clock), median (min–max) of {args.repeats} "
          f"interleaved windows, {len(xs)} distinct batches")
    print("| path | M samples/s | × textbook Adagrad | × FBGEMM row-wise Adagrad |")
    print("|---|---:|---:|---:|")
    for name in names:
        v = rates[name]
        ratio = [f"{medians[name] / base:.2f}×" if base else "–" for base in (textbook, fbgemm)]
        print(f"| {name} | {medians[name] / 1e6:.2f} ({min(v) / 1e6:.2f}–{max(v) / 1e6:.2f})"
              f" | {ratio[0]} | {ratio[1]} |")
    if args.profile:
        print("\nms per step: total | embedding_bag_forward | embedding_bag_backward_update "
              "| model ops (dot, loss, backward) | the rest (modules, autograd, optimizers)")
        print("| path | step | forward kernels | fused update kernels | model ops | rest |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in names:
            trainer, steps = trainers[name]
            if trainer.path.kind not in ("textbook", "fbgemm", "floor"):
                print(profile(trainer, xs, dim, steps))


if __name__ == "__main__":
    main()
