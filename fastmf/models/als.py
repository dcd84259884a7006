"""``fastmf.models.ALS``: implicit-feedback matrix factorisation by alternating least squares.

The objective (Hu, Koren & Volinsky 2008) over every user-item pair::

    sum_{u,i} c_ui (p_ui - <x_u, y_i>)^2 + sum_u reg_u |x_u|^2 + sum_i reg_i |y_i|^2

with preference ``p_ui = 1`` for an observed pair and 0 for every other, and confidence
``c_ui`` = the pair's weight (``Interactions.weights``, e.g. from
:meth:`fastmf.data.Interactions.with_confidence`) or ``1 + alpha`` on data without weights,
and 1 for unobserved pairs. With the item factors fixed, each user's factors solve
``(Y^T C_u Y + reg_u I) x_u = Y^T C_u p_u``; ``Y^T C_u Y = Y^T Y + Y_u^T (C_u - I) Y_u``
needs ``Y^T Y`` once per sweep and then only the user's own items. The solve is a few
conjugate-gradient steps warm-started from the previous factors (Takács, Pilászy & Tikk
2011, "Applications of the conjugate gradient method for implicit feedback collaborative
filtering"; the solver of the ``implicit`` library). Regularisation is ``reg`` for every
row, or scaled by frequency with ``reg_exponent = nu > 0`` (Rendle et al. 2021, "Revisiting
the Performance of iALS on Item Recommendation Benchmarks"):
``reg_u = reg * (n_u + num_items / alpha) ** nu`` (``n_u``: the user's items; their
unobserved weight ``alpha_0`` is ``1 / alpha`` in this class's units), the same for items.

One epoch is one sweep: every user solved from the items, then every item from the users.
Rows are independent and ``Y^T Y`` is summed in a fixed order, so results do not depend on
the thread count (Numba ``prange`` over rows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor, nn

from fastmf import checkpoint
from fastmf._arrays import array_to_tensor
from fastmf.memory import empty_table
from fastmf.models.base import Batch, Recommender
from fastmf.recommender import FactorTables

__all__ = ["ALS"]


# ---------------------------------------------------------------------------- kernels


@njit(parallel=True, cache=True, fastmath=True)
def _gram(Y):
    """``Y^T Y`` in float64; each entry summed over rows in row order (thread-count free)."""
    n, d = Y.shape
    out = np.zeros((d, d), dtype=np.float64)
    for a in prange(d):
        row = out[a]
        for i in range(n):
            ya = np.float64(Y[i, a])
            if ya != 0.0:
                for b in range(d):
                    row[b] += ya * Y[i, b]
    return out


_BLOCK = 64  # rows per parallel task: scratch vectors are allocated once per block


@njit(inline="always", fastmath=True)
def _cg_row(X, Y, gram, u, lo, hi, indices, conf, lam, cg_steps, x, r, p, ap):
    d = X.shape[1]
    for a in range(d):
        x[a] = X[u, a]
    # r = b - A x
    for a in range(d):
        acc = 0.0
        for b in range(d):
            acc += gram[a, b] * x[b]
        r[a] = -acc - lam * x[a]
    for k in range(lo, hi):
        i = indices[k]
        c = np.float64(conf[k])
        dot = 0.0
        for a in range(d):
            dot += Y[i, a] * x[a]
        scale = c - (c - 1.0) * dot
        for a in range(d):
            r[a] += scale * Y[i, a]
    rs_old = 0.0
    for a in range(d):
        p[a] = r[a]
        rs_old += r[a] * r[a]
    for _ in range(cg_steps):
        if rs_old < 1e-20:
            break
        for a in range(d):
            acc = 0.0
            for b in range(d):
                acc += gram[a, b] * p[b]
            ap[a] = acc + lam * p[a]
        for k in range(lo, hi):
            i = indices[k]
            c1 = np.float64(conf[k]) - 1.0
            if c1 != 0.0:
                dot = 0.0
                for a in range(d):
                    dot += Y[i, a] * p[a]
                dot *= c1
                for a in range(d):
                    ap[a] += dot * Y[i, a]
        pap = 0.0
        for a in range(d):
            pap += p[a] * ap[a]
        if pap <= 0.0:
            break
        step = rs_old / pap
        rs_new = 0.0
        for a in range(d):
            x[a] += step * p[a]
            r[a] -= step * ap[a]
            rs_new += r[a] * r[a]
        beta = rs_new / rs_old
        for a in range(d):
            p[a] = r[a] + beta * p[a]
        rs_old = rs_new
    for a in range(d):
        X[u, a] = x[a]


@njit(parallel=True, cache=True, fastmath=True)
def _cg_sweep(X, Y, gram, indptr, indices, conf, reg, cg_steps):
    """Solve every row ``u`` of ``X`` from ``Y``: a warm-started conjugate-gradient run of at
    most ``cg_steps`` steps on ``(gram + sum_i (c_i - 1) y_i y_i^T + reg[u] I) x = sum_i c_i
    y_i`` over the row's entries ``indices[indptr[u]:indptr[u+1]]`` with confidences
    ``conf``. A row without entries gets zeros (its exact solution)."""
    n, d = X.shape
    for block in prange((n + _BLOCK - 1) // _BLOCK):
        x = np.empty(d, dtype=np.float64)
        r = np.empty(d, dtype=np.float64)
        p = np.empty(d, dtype=np.float64)
        ap = np.empty(d, dtype=np.float64)
        for u in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            lo, hi = indptr[u], indptr[u + 1]
            if lo == hi:
                for a in range(d):
                    X[u, a] = 0.0
            else:
                _cg_row(X, Y, gram, u, lo, hi, indices, conf, reg[u], cg_steps, x, r, p, ap)


@njit(parallel=True, cache=True, fastmath=True)
def _positive_terms(X, Y, indptr, indices, conf):
    """Per row: ``sum_i c_i (1 - s_i)^2 - s_i^2`` over the row's entries, ``s_i = <x, y_i>``:
    the observed pairs' share of the objective beyond ``sum_{all pairs} s^2``."""
    n, d = X.shape
    out = np.zeros(n, dtype=np.float64)
    for u in prange(n):
        acc = 0.0
        for k in range(indptr[u], indptr[u + 1]):
            i = indices[k]
            s = 0.0
            for a in range(d):
                s += np.float64(X[u, a]) * Y[i, a]
            acc += conf[k] * (1.0 - s) * (1.0 - s) - s * s
        out[u] = acc
    return out


# ---------------------------------------------------------------------------- data


class _Structure:
    """The training data as the solver reads it: CSR (users -> items) and CSC (items ->
    users) with float32 confidences, and the per-row regularisation of both sides."""

    def __init__(self, train, alpha: float, reg: float, reg_exponent: float, where: str):
        num_users, num_items = train.num_users, train.num_items
        if train.weights is not None:
            conf = train.weights.astype(np.float64)
        else:
            conf = np.full(len(train), 1.0 + alpha)
        key = train.users * np.int64(num_items) + train.items
        # Rows of one (user, item) pair count once; Interactions.with_confidence gives all
        # of them the pair's confidence, so the largest is that one.
        order = np.lexsort((-conf, key))
        first = np.r_[True, key[order][1:] != key[order][:-1]]
        rows = order[first]
        users, items, conf = train.users[rows], train.items[rows], conf[rows]
        self.nnz = len(rows)
        self.csr = self._compressed(users, items, conf, num_users)
        self.csc = self._compressed(items, users, conf, num_items)
        self.sum_conf = float(conf.sum())
        n_u = np.diff(self.csr[0]).astype(np.float64)
        n_i = np.diff(self.csc[0]).astype(np.float64)
        if reg_exponent > 0:
            self.reg_users = reg * (n_u + num_items / alpha) ** reg_exponent
            self.reg_items = reg * (n_i + num_users / alpha) ** reg_exponent
        else:
            self.reg_users = np.full(num_users, reg)
            self.reg_items = np.full(num_items, reg)

    @staticmethod
    def _compressed(rows, cols, values, n):
        order = np.lexsort((cols, rows))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return (indptr, cols[order].astype(np.int64),
                values[order].astype(np.float32))


# ---------------------------------------------------------------------------- model


def _check_number(where: str, name: str, value, *, low: float = 0.0, strict: bool = False,
                  integer: bool = False):
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        kind = "an int" if integer else "a finite number"
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{where}: {name} must be {kind} {bound}, got {value!r}")


@checkpoint.register_model
class ALS(FactorTables, Recommender):
    """Implicit ALS with confidence weights and conjugate-gradient solves (see the module
    docstring for the objective).

    - ``dim``: factors; ``reg``: L2 regularisation (per row, scaled by frequency when
      ``reg_exponent`` > 0); ``alpha``: on data without weights, every observed pair has
      confidence ``1 + alpha`` (data with ``weights`` uses them as the confidences);
      ``cg_steps``: conjugate-gradient steps per row and sweep (3 is the usual choice;
      ``>= dim`` solves exactly); ``iterations``: the sweeps :meth:`fit` runs by default.
    - Scoring is the dot product ``<x_u, y_i>`` (no biases): a dot-product
      :class:`~fastmf.models.base.Recommender`, so ``recommend``, ``similar_items`` and
      ``evaluate`` work as for :class:`fastmf.MF`.
    - Training: :meth:`fit` here, or :func:`fastmf.fit` (one sweep per epoch through the
      protocol's ``batches``/``training_step`` hooks; fit's ``lr``, ``reg``, ``batch_size``
      and negatives do not apply). Counts: ``train.with_confidence(...)`` first.
    - Init: both tables normal(0, ``init_std``) from the global torch RNG (users first).

    Defaults (``reg``, ``alpha``, ``iterations``) were chosen on inner validation splits of
    ml-latest-small subsets (by user activity and by time) and synthetic data of different
    sparsity and popularity skew, never on the reported rows (benchmarks/README.md,
    "Implicit feedback").

    >>> import fastmf
    >>> from fastmf.models.als import ALS
    >>> data = fastmf.datasets.synthetic(200, 100, 5_000, implicit=True)
    >>> model = ALS(data.num_users, data.num_items, dim=16)
    >>> history = model.fit(data, epochs=2)
    >>> model.recommend([0], k=3, exclude=data)[0].shape
    torch.Size([1, 3])
    """

    # fit's loss names also say which kind of data a model trains on. ALS always minimises
    # its weighted squared objective; fit has no name for that, so it declares "bce" for the
    # implicit-feedback path (ranking validation, no ratings needed). fit's lr, reg,
    # batch_size and negatives do not apply: the knobs are the constructor's.
    losses: ClassVar[tuple[str, ...]] = ("bce",)
    default_loss: ClassVar[str] = "bce"
    defaults: ClassVar[dict] = {"implicit": dict(epochs=12)}
    test_config: ClassVar[dict] = dict(dim=8)

    # Defaults (reg 10, alpha 0 i.e. confidence 1 on binary data, 12 sweeps) chosen by
    # benchmarks/implicit_feedback.py --tune: the best mean over six data sets (ml-latest-small
    # subsets by activity and time, synthetic sets of different sparsity, skew and counts) of
    # the inner-split NDCG@10 relative to each set's best, from reg {0.1, 1, 10} x alpha
    # {0, 2, 10, 40} and frequency-scaled reg, 2-20 sweeps.
    def __init__(self, num_users: int, num_items: int, dim: int = 64, *, reg: float = 10.0,
                 alpha: float = 0.0, iterations: int = 12, cg_steps: int = 3,
                 reg_exponent: float = 0.0, init_std: float = 0.01, backend: str = "auto",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        where = "fastmf.models.ALS"
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim),
                            ("iterations", iterations), ("cg_steps", cg_steps)):
            _check_number(where, name, value, low=1 if name != "iterations" else 0,
                          integer=True)
        _check_number(where, "reg", reg)
        _check_number(where, "alpha", alpha)
        _check_number(where, "reg_exponent", reg_exponent)
        _check_number(where, "init_std", init_std)
        if reg_exponent > 0 and alpha == 0:
            raise ValueError(f"{where}: reg_exponent > 0 needs alpha > 0 (the unobserved "
                             "weight in the frequency scaling is 1 / alpha)")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: dtype must be float32 or float64, got {dtype}")
        self.reg, self.alpha = float(reg), float(alpha)
        self.iterations, self.cg_steps = int(iterations), int(cg_steps)
        self.reg_exponent, self.init_std = float(reg_exponent), float(init_std)
        self.backend = backend
        factory = dict(dtype=dtype, device=device)
        self.user_factors = nn.Parameter(empty_table((num_users, dim), **factory),
                                         requires_grad=False)
        self.item_factors = nn.Parameter(empty_table((num_items, dim), **factory),
                                         requires_grad=False)
        self._structure: tuple[Any, _Structure] | None = None
        self._gram_cache: tuple[int, int, np.ndarray] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.user_factors.normal_(0.0, self.init_std)
        self.item_factors.normal_(0.0, self.init_std)

    def get_config(self) -> dict:
        return dict(num_users=self.num_users, num_items=self.num_items, dim=self.dim,
                    reg=self.reg, alpha=self.alpha, iterations=self.iterations,
                    cg_steps=self.cg_steps, reg_exponent=self.reg_exponent,
                    init_std=self.init_std,
                    dtype=str(self.user_factors.dtype).removeprefix("torch."))

    def extra_repr(self) -> str:
        return (f"{self.num_users}, {self.num_items}, dim={self.dim}, reg={self.reg:g}, "
                f"alpha={self.alpha:g}, cg_steps={self.cg_steps}")

    # ------------------------------------------------------------------ scoring

    def user_vectors(self, users) -> tuple[Tensor, None]:
        """``(X[users] (B, dim), None)``; ``users`` (B,) int32/int64 in [0, num_users)."""
        users = self.as_ids(users, "users", self.num_users, method="user_vectors")
        return self.user_factors[users.long()], None

    def item_vectors(self) -> tuple[Tensor, None]:
        return self.item_factors, None

    def forward(self, users, items) -> Tensor:
        """``<x_u, y_i>`` (B,) of the pairs; ids checked as MF's (:meth:`pair_ids`). Training
        (the CG sweeps) never calls it."""
        users, items = self.pair_ids(users, items)
        return (self.user_factors[users.long()] * self.item_factors[items.long()]).sum(-1)

    # ------------------------------------------------------------------ training

    def check_data(self, train) -> None:
        from fastmf.data import Interactions

        if not isinstance(train, Interactions):
            raise TypeError(f"fastmf.models.ALS: train must be fastmf.data.Interactions, got "
                            f"{type(train).__name__}")
        if (train.num_users, train.num_items) != (self.num_users, self.num_items):
            raise ValueError(
                f"fastmf.models.ALS: train has {train.num_users} users x {train.num_items} "
                f"items but the model has {self.num_users} x {self.num_items}")

    def _data(self, train) -> _Structure:
        """The solver's view of ``train``, built once per data set (cached by identity)."""
        if self._structure is None or self._structure[0] is not train:
            self.check_data(train)
            self._structure = (train, _Structure(train, self.alpha, self.reg,
                                                 self.reg_exponent, "fastmf.models.ALS"))
        return self._structure[1]

    def _item_gram(self, Y: np.ndarray) -> np.ndarray:
        """``Y^T Y``, reused from the end of the previous sweep while the item table is
        unchanged (any in-place torch write, e.g. ``load_state_dict``, bumps its version)."""
        cached = self._gram_cache
        if cached is not None and cached[0] == self.item_factors._version \
                and cached[1] == self.item_factors.data_ptr():
            return cached[2]
        return _gram(Y)

    @torch.no_grad()
    def fit_epoch(self, train) -> dict:
        """One alternating sweep (users, then items) on ``train``; returns ``{"loss": the
        objective per observed pair after the sweep, "seconds": ..., "samples": observed
        pairs}``."""
        if self.user_factors.device.type != "cpu":
            raise ValueError("fastmf.models.ALS.fit_epoch: training runs on the CPU; the "
                             f"model is on {self.user_factors.device}")
        data = self._data(train)
        start = time.perf_counter()
        X = self.user_factors.data.numpy()
        Y = self.item_factors.data.numpy()
        self._gram_cache = None
        indptr, indices, conf = data.csr
        _cg_sweep(X, Y, self._item_gram(Y), indptr, indices, conf, data.reg_users,
                  self.cg_steps)
        gram_x = _gram(X)
        indptr, indices, conf = data.csc
        _cg_sweep(Y, X, gram_x, indptr, indices, conf, data.reg_items, self.cg_steps)
        gram_y = _gram(Y)
        self._gram_cache = (self.item_factors._version, self.item_factors.data_ptr(), gram_y)
        loss = self._objective(data, X, Y, gram_x, gram_y)
        return {"loss": loss / max(data.nnz, 1), "seconds": time.perf_counter() - start,
                "samples": data.nnz}

    @staticmethod
    def _objective(data: _Structure, X, Y, gram_x, gram_y) -> float:
        indptr, indices, conf = data.csr
        every_pair = float(np.sum(gram_x * gram_y))  # sum_{u,i} <x_u, y_i>^2
        observed = float(_positive_terms(X, Y, indptr, indices, conf).sum())
        penalty = float(data.reg_users @ np.square(X, dtype=np.float64).sum(1)
                        + data.reg_items @ np.square(Y, dtype=np.float64).sum(1))
        return every_pair + observed + penalty

    @torch.no_grad()
    def objective(self, train) -> float:
        """The full objective (module docstring) of the current factors on ``train``."""
        X = self.user_factors.data.numpy()
        Y = self.item_factors.data.numpy()
        return self._objective(self._data(train), X, Y, _gram(X), _gram(Y))

    # -- the protocol's training hooks: fit runs one alternating sweep per epoch ----------------
    def make_optimizer(self, name: str | None, lr: float) -> torch.optim.Optimizer:
        """ALS takes no gradient steps (the sweep is :meth:`training_step`), but fit and
        checkpoints hold a torch optimizer: an Adam over the factors that is never stepped
        (the factors need no gradient, so even a stray ``step()`` changes nothing), whose
        state stays empty. ``name`` and ``lr`` do not apply."""
        return torch.optim.Adam([self.user_factors, self.item_factors], lr=lr or 1e-3)

    def batches(self, train, **_ignored) -> Iterator[Any]:
        """One "batch" per epoch: the whole of ``train``, which :meth:`training_step` sweeps
        (negatives, shuffling and batch sizes do not apply to ALS)."""
        self._sweep_data = train
        users, items, _ = train.to_torch(self.user_factors.device)
        yield Batch(users, items, weights=None if train.weights is None
                    else array_to_tensor(train.weights))

    def training_step(self, batch, optimizer, *, loss: str, reg: float) -> tuple[Tensor, int]:
        """One alternating sweep over the data of the last :meth:`batches` call; returns
        (the objective per observed pair, observed pairs). ``reg`` of fit does not apply
        (the constructor's ``reg`` does)."""
        train = getattr(self, "_sweep_data", None)
        if train is None:
            raise ValueError("fastmf.models.ALS.training_step: call batches(train) first; an "
                             "ALS step is a sweep over the whole training set")
        row = self.fit_epoch(train)
        return torch.tensor(row["loss"], dtype=torch.float64), row["samples"]

    def fit(self, train, *, epochs: int | None = None, valid=None, k: int = 10,
            metrics: tuple[str, ...] | None = None, progress: bool = False) -> list[dict]:
        """``epochs`` (default ``iterations``) alternating sweeps on ``train``; returns one
        record per sweep (``loss``, ``seconds``, ``samples_per_s`` and, with ``valid``,
        ranking metrics at ``k`` with the training items excluded)."""
        from fastmf.evaluate import evaluate

        epochs = self.iterations if epochs is None else epochs
        _check_number("fastmf.models.ALS.fit", "epochs", epochs, integer=True)
        self.check_data(train)
        self.prepare(train)
        metrics = tuple(metrics) if metrics else (f"ndcg@{k}", f"hr@{k}")
        history = []
        for epoch in range(int(epochs)):
            row = self.fit_epoch(train)
            row = {"epoch": epoch + 1, "loss": row["loss"], "seconds": row["seconds"],
                   "samples_per_s": row["samples"] / max(row["seconds"], 1e-9)}
            if valid is not None:
                row.update(evaluate(self, valid, train=train, metrics=metrics, k=k))
            if progress:
                print(" ".join(f"{key} {v:.4g}" for key, v in row.items()), flush=True)
            history.append(row)
        return history
