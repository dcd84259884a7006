"""SVD++ (Koren 2008) and timeSVD++ (Koren 2009) on fastmf's fused embedding layers.

``SVDpp``::

    r̂(u, i) = mu + b_u + b_i + <q_i, p_u + |N(u)|^-1/2 · sum_{j in N(u)} y_j>

N(u) is the set of items ``u`` rated in the data the model was prepared with
(:meth:`SVDpp.prepare`, kept as CSR buffers). The implicit sum is one
``fastmf.nn.EmbeddingBag`` bag per UNIQUE user of a batch, not one per rating: its
backward hands the optimizer one summed gradient per (user, history item) pair of the
batch, and each y row touched gets one fused update per step. A user without history has
an empty bag: the implicit term is 0 and the prediction is the plain biased MF one.

``TimeSVDpp`` adds Koren's time-aware baseline::

    b_u(t) = b_u + alpha_u · dev_u(t) + b_{u,day(t)},  dev_u(t) = sign(t - t_u)·|t - t_u|^beta
    b_i(t) = b_i + b_{i,Bin(t)}

with ``t`` in days, ``t_u`` the mean day of u's training ratings, and ``num_bins`` equal
bins over the training time range.

Every table (factors, implicit factors, biases as 1-wide tables, time tables) is a
``fastmf.nn`` table, so the optimizer runs inside the backward pass
(:func:`fastmf.optim.apply_in_backward`).

>>> import fastmf
>>> data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=500)
>>> model = fastmf.models.SVDpp.from_interactions(data, dim=8)
>>> model.predict(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
torch.Size([2])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastmf import checkpoint
from fastmf.models._state import check_csr_state
from fastmf.models.base import Recommender
from fastmf.nn import Embedding, EmbeddingBag
from fastmf.ops.checks import check_finite_number
from fastmf.optim import (
    SparseAdagrad,
    SparseAdam,
    SparseSGD,
    _SparseOptimizer,
    apply_in_backward,
)

__all__ = ["SVDpp", "TimeSVDpp"]

SECONDS_PER_DAY = 86400
HUBER_DELTA = 1.0


def _check_count(op: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"fastmf.models.{op}: {name} must be an int >= {minimum}, got "
                         f"{value!r}")
    return int(value)


def _check_float(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            np.isfinite(value) and value >= 0):
        raise ValueError(f"fastmf.models.{op}: {name} must be a finite number >= 0, got "
                         f"{value!r}")
    return float(value)


def _explicit_loss(pred: Tensor, targets: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return F.mse_loss(pred, targets)
    if loss == "huber":
        return F.huber_loss(pred, targets, delta=HUBER_DELTA)
    raise ValueError(f"unknown loss {loss!r}; expected 'mse' or 'huber'")


def _ids(op: str, name: str, ids, device) -> Tensor:
    """int32/int64 ids as an int64 tensor on ``device`` (lists and numpy arrays accepted)."""
    if not isinstance(ids, Tensor):
        array = np.asarray(ids)
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"fastmf.models.{op}: {name} must be integer ids, got dtype "
                            f"{array.dtype}")
        ids = torch.as_tensor(array.astype(np.int64, copy=False))
    elif ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastmf.models.{op}: {name} must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"fastmf.models.{op}: {name} must be 1-D, got shape "
                         f"{tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64)


def _check_range(op: str, name: str, ids: Tensor, limit: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise IndexError(f"fastmf.models.{op}: {name} index {int(bad)} out of range "
                         f"[0, {limit})")


def timestamps_to_days(timestamps) -> Tensor:
    """Whole days since the Unix epoch (int64 tensor) of ``timestamps``: numbers are
    seconds since the epoch (what ``Interactions`` holds for MovieLens); numpy datetime64
    values are converted first."""
    # A NaN or infinite time (or NaT) has no day: cast to int64 it became the most
    # negative day, and a prediction tens of thousands of stars away.
    bad = "fastmf.models.TimeSVDpp: timestamps must be finite, got "
    if isinstance(timestamps, Tensor):
        if timestamps.is_floating_point():
            finite = torch.isfinite(timestamps)
            if not bool(finite.all()):
                raise ValueError(bad + f"{float(timestamps[~finite][0])}")
            return torch.floor(timestamps.double() / SECONDS_PER_DAY).long()
        return torch.div(timestamps.long(), SECONDS_PER_DAY, rounding_mode="floor")
    array = np.asarray(timestamps)
    if array.dtype.kind == "M":
        if np.isnat(array).any():
            raise ValueError(bad + "NaT")
        array = array.astype("datetime64[s]").astype(np.int64)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"fastmf.models.TimeSVDpp: timestamps must be numbers (seconds) or "
                        f"datetime64, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(bad + f"{array[~finite].flat[0]}")
        return torch.as_tensor(np.floor(array / SECONDS_PER_DAY).astype(np.int64))
    return torch.as_tensor(np.floor_divide(array.astype(np.int64), SECONDS_PER_DAY))


@checkpoint.register_model
class SVDpp(Recommender):
    """SVD++: biased MF whose user vector adds ``|N(u)|^-1/2 · sum_{j in N(u)} y_j`` over
    the items the user rated (module docstring).

    Tables (``fastmf.nn``): ``user_factors`` p (U, dim), ``item_factors`` q (I, dim),
    ``implicit_factors`` y (I, dim, an EmbeddingBag), ``user_bias``/``item_bias`` (U, 1),
    (I, 1). Buffers: ``global_mean`` mu, ``history_offsets`` (U+1,) and ``history_items``
    (history_size,): N(u) as CSR, filled by :meth:`prepare` (``history_size`` is in the
    config so that checkpoints load before any data is seen).

    Regularisation: Koren's L2 on p, q (fit's ``reg``), y (``implicit_reg``; None: fit's
    ``reg``) and the biases (``bias_reg``), divided by the batch size; ``reg_form`` says
    how often a row is penalised in a batch (see :meth:`training_step`):

    - ``"rows"``: once per DISTINCT row the batch reads (the penalty is the sparse
      optimizer's weight decay, no extra lookup);
    - ``"ratings"``: once per rating that reads it, as Koren's per-rating SGD does: p_u,
      b_u once per rating of u, q_i, b_i once per rating of i, and every y_j, j in N(u),
      once per rating of u (the penalty is added to the loss).

    Learning rates: the optimizer's ``lr`` (fit's) times ``implicit_lr_scale`` for y and
    ``bias_lr_scale`` for the biases. ``init_scale``: p, q, y start uniform in
    (-init_scale, init_scale), biases at 0.
    """

    losses = ("mse", "huber")
    default_loss = "mse"
    test_config = {"dim": 4}
    # Its step takes the plain mean over the ratings: fit refuses weighted data.
    uses_weights = False
    # Only TimeSVDpp's time terms read them; SVD++ skips their per-epoch shuffle.
    uses_timestamps = False
    # Chosen on two inner validation splits of ml-latest-small built from fold 0's TRAINING
    # rows only (never a reported test row): "dense", 20% of the rows held out at random
    # (every user has >= 20 ratings), and "sparse", each user cut to <= 15 random ratings
    # then their latest 20% held out. Optuna (TPE) over reg_form, reg, dim, batch, lr, the
    # y/bias/time coefficients and lr scales and init_scale, every epoch scored by the mean
    # of the two validation RMSEs, epochs capped so that a fit on a fold's training rows
    # stays within ~1 CPU s (benchmarks/accuracy_svdpp.py --tune; benchmarks/README.md,
    # "SVD++ and timeSVD++"): ~80 trials per model, then 250 more for SVDpp started from
    # that point. Its best, rounded to two digits and rescored (mean 0.946 vs 0.950), gives
    # the constructor defaults below (dim 64, implicit_reg 4.9, implicit_lr_scale 0.13,
    # bias_lr_scale 2.8, init_scale 0.011, bias_reg 0.0041) and these fit settings;
    # TimeSVDpp shares them (with them its own time terms also scored better there, 0.940
    # vs 0.943). The "rows" penalty needs larger reg values than fit's per-sample reg (it
    # is taken once per batch, not once per rating).
    defaults = {"explicit": dict(lr=0.044, reg=2.7, batch_size=16384, epochs=7)}
    default_bias_reg = 0.0041

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *,
                 history_size: int = 0, global_mean: float = 0.0,
                 bias_reg: float | None = None, init_scale: float = 0.011,
                 implicit_reg: float | None = 4.9, implicit_lr_scale: float = 0.13,
                 bias_lr_scale: float = 2.8, reg_form: str = "rows",
                 backend: str = "auto", device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        op = type(self).__name__
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None) if dtype in ("float32", "float64", "float16",
                                                              "bfloat16") else dtype
        self.num_users = _check_count(op, "num_users", num_users, 1)
        self.num_items = _check_count(op, "num_items", num_items, 1)
        self.dim = _check_count(op, "dim", dim, 1)
        history_size = _check_count(op, "history_size", history_size, 0)
        global_mean = check_finite_number(f"models.{op}", global_mean=global_mean)
        self.bias_reg = _check_float(op, "bias_reg", self.default_bias_reg if bias_reg is None
                                     else bias_reg)
        self.init_scale = _check_float(op, "init_scale", init_scale)
        self.implicit_reg = (None if implicit_reg is None
                             else _check_float(op, "implicit_reg", implicit_reg))
        self.implicit_lr_scale = _check_float(op, "implicit_lr_scale", implicit_lr_scale)
        self.bias_lr_scale = _check_float(op, "bias_lr_scale", bias_lr_scale)
        if reg_form not in ("rows", "ratings"):
            raise ValueError(f"fastmf.models.{op}: reg_form must be 'rows' or 'ratings', got "
                             f"{reg_form!r}")
        self.reg_form = reg_form
        self.backend = backend
        table = dict(backend=backend, device=device, dtype=dtype)
        self.user_factors = Embedding(num_users, dim, init_scale=init_scale, **table)
        self.item_factors = Embedding(num_items, dim, init_scale=init_scale, **table)
        self.implicit_factors = EmbeddingBag(num_items, dim, mode="sum",
                                             include_last_offset=True,
                                             init_scale=init_scale, **table)
        self.user_bias = self._zero_table(num_users, **table)
        self.item_bias = self._zero_table(num_items, **table)
        self.register_buffer("global_mean", torch.tensor(float(global_mean), device=device,
                                                         dtype=torch.float64))
        self._mu = float(global_mean)
        self.register_buffer("history_offsets",
                             torch.zeros(num_users + 1, dtype=torch.int64, device=device))
        self.register_buffer("history_items",
                             torch.zeros(history_size, dtype=torch.int64, device=device))
        self._set_history_sizes()

    @staticmethod
    def _zero_table(n: int, **table) -> Embedding:
        emb = Embedding(n, 1, **table)
        with torch.no_grad():
            emb.weight.zero_()
        return emb

    # -- config and data ----------------------------------------------------------------------
    def get_config(self) -> dict:
        return dict(num_users=self.num_users, num_items=self.num_items, dim=self.dim,
                    history_size=int(self.history_items.numel()), global_mean=self._mu,
                    bias_reg=self.bias_reg, init_scale=self.init_scale,
                    implicit_reg=self.implicit_reg, implicit_lr_scale=self.implicit_lr_scale,
                    bias_lr_scale=self.bias_lr_scale, reg_form=self.reg_form,
                    dtype=str(self.user_factors.weight.dtype).removeprefix("torch."))

    @classmethod
    def from_interactions(cls, train, **kwargs):
        """A model sized for ``train`` with N(u) (and mu, for rated data) built from it."""
        model = cls(train.num_users, train.num_items, **kwargs)
        model.prepare(train)
        return model

    @property
    def mu(self) -> float:
        return self._mu

    def set_global_mean(self, value: float) -> None:
        self._mu = check_finite_number(f"models.{type(self).__name__}.set_global_mean", value=value)
        self.global_mean.fill_(self._mu)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._check_loaded()
        self._mu = float(self.global_mean)
        self._set_history_sizes()

    def _check_loaded(self) -> None:
        """N(u) and mu as loaded (fastmf.models._state): the bags of :meth:`_implicit` are
        cut from N(u) without further checks."""
        op = f"fastmf.models.{type(self).__name__}"
        check_csr_state(op, "history", self.history_offsets, self.history_items,
                        self.num_items)
        check_finite_number(op.removeprefix("fastmf."), global_mean=float(self.global_mean))

    def _set_history_sizes(self) -> None:
        """|N(u)|^-1/2 per user (0 for users without history), cached from the CSR."""
        sizes = (self.history_offsets[1:] - self.history_offsets[:-1])
        self._history_sizes = sizes
        self._history_norm = torch.where(sizes > 0, sizes.clamp_min(1).double().rsqrt(), 0.0)

    def prepare(self, train) -> None:
        """Build N(u) from ``train`` (the distinct items each user rated), set mu to its
        mean rating (rated data) and keep its id maps, titles and item popularity."""
        self.check_data(train)
        csr = train.to_csr(binary=True)
        device = self.history_offsets.device
        self.history_offsets = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
        self.history_items = torch.as_tensor(csr.indices.astype(np.int64), device=device)
        self._set_history_sizes()
        if train.ratings is not None and len(train):
            self.set_global_mean(float(np.mean(train.ratings, dtype=np.float64)))
        super().prepare(train)

    # -- compute -------------------------------------------------------------------------------
    def _implicit(self, users: Tensor) -> Tensor:
        """(len(users), dim): |N(u)|^-1/2 · sum_{j in N(u)} y_j, one bag per given user."""
        offsets = self.history_offsets
        starts = offsets[users]
        sizes = self._history_sizes[users]
        bag_offsets = torch.zeros(len(users) + 1, dtype=torch.int64, device=users.device)
        torch.cumsum(sizes, 0, out=bag_offsets[1:])
        total = int(bag_offsets[-1])
        # Position of every bag entry in history_items: its bag's CSR start plus its rank.
        shift = torch.repeat_interleave(starts - bag_offsets[:-1], sizes, output_size=total)
        ids = self.history_items[torch.arange(total, device=users.device) + shift]
        summed = self.implicit_factors(ids, bag_offsets)
        norm = self._history_norm[users].to(summed.dtype)
        return summed * norm.unsqueeze(1), ids

    def _time_terms(self, users, items, timestamps, touched):
        """Extra (B,) terms of the prediction: none for SVD++."""
        return None

    def _predict(self, users, items, timestamps=None, touched=None) -> Tensor:
        """(B,) predictions; ``touched`` (a dict) receives the ids each table was read at."""
        op = type(self).__name__
        device = self.history_offsets.device
        users, items = _ids(op, "users", users, device), _ids(op, "items", items, device)
        if users.shape != items.shape:
            raise ValueError(f"fastmf.models.{op}: users and items must have the same length, "
                             f"got {users.numel()} and {items.numel()}")
        _check_range(op, "user", users, self.num_users)
        _check_range(op, "item", items, self.num_items)
        unique, inverse = torch.unique(users, return_inverse=True)
        implicit, ids = self._implicit(unique)
        q = self.item_factors(items)
        vectors = self.user_factors(users) + implicit.index_select(0, inverse)
        pred = torch.linalg.vecdot(vectors, q) + self._mu
        pred = pred + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0]
        extra = self._time_terms(users, items, timestamps, touched)
        if extra is not None:
            pred = pred + extra
        if touched is not None:
            if self.reg_form == "ratings":
                # Each bag entry is read once per rating of its user in the batch.
                counts = torch.bincount(inverse, minlength=unique.numel())
                ids = (ids, torch.repeat_interleave(counts, self._history_sizes[unique],
                                                    output_size=ids.numel()))
            touched.update(user_factors=users, item_factors=items, implicit_factors=ids,
                           user_bias=users, item_bias=items)
        return pred

    def forward(self, users, items) -> Tensor:
        """(B,) predicted ratings for (users[b], items[b]); users/items (B,) int32/int64."""
        return self._predict(users, items)

    def user_vectors(self, users) -> tuple[Tensor, Tensor]:
        """(p_u + |N(u)|^-1/2 sum y_j (B, dim), offset mu + b_u (B,))."""
        users = _ids(type(self).__name__, "users", users, self.history_offsets.device)
        _check_range(type(self).__name__, "user", users, self.num_users)
        unique, inverse = torch.unique(users, return_inverse=True)
        implicit, _ = self._implicit(unique)
        vectors = self.user_factors(users) + implicit[inverse]
        return vectors, self.user_bias(users)[:, 0] + self._mu

    def item_vectors(self) -> tuple[Tensor, Tensor]:
        """(q (I, dim), b_i (I,))."""
        return self.item_factors.weight, self.item_bias.weight[:, 0]

    # -- training --------------------------------------------------------------------------------
    # The optimizer group of every table, by attribute name: tables of one kind share an L2
    # coefficient and a learning rate (table_settings).
    table_kinds = {"user_factors": "factors", "item_factors": "factors",
                   "implicit_factors": "implicit", "user_bias": "bias", "item_bias": "bias"}

    def table_settings(self, reg: float) -> dict[str, tuple[float, float]]:
        """{kind: (L2 coefficient, learning-rate scale)} for each kind of table in
        :attr:`table_kinds`, with ``reg`` the factors' (fit's) coefficient."""
        implicit = float(reg) if self.implicit_reg is None else self.implicit_reg
        return {"factors": (float(reg), 1.0), "implicit": (implicit, self.implicit_lr_scale),
                "bias": (self.bias_reg, self.bias_lr_scale)}

    def training_step(self, batch, optimizer, *, loss: str, reg: float):
        """One update on ``batch`` (``users``, ``items``, ``targets``; ``timestamps`` for
        TimeSVDpp): backward of the mean loss plus the L2 penalty, optimizer step.
        Returns (mean loss without the penalty, batch size).

        The penalty (Koren's L2 on every parameter of a rating) is ``sum_r c_r · n_r ·
        |w_r|² / B`` over the rows ``r`` the batch reads, with ``c_r`` the coefficient of
        the row's table (:meth:`table_settings`) and ``n_r`` 1 (``reg_form="rows"``) or the
        number of the batch's ratings that read the row (``"ratings"``). In the "rows" form
        its gradient, ``(2·c/B)·w_r`` on exactly the rows the step updates, is what a fastmf
        sparse optimizer's weight decay adds: with the groups :meth:`make_optimizer` builds,
        the step sets their weight decay and reads no row twice (the y bags are the largest
        lookups); otherwise (the "ratings" form, other optimizers) the penalty is added to
        the loss."""
        op = type(self).__name__
        if loss not in self.losses:
            raise ValueError(f"fastmf.models.{op}.training_step: loss {loss!r} is not "
                             f"supported; expected one of {self.losses}")
        if batch.targets is None:
            raise ValueError(f"fastmf.models.{op}.training_step: the batch has no targets "
                             "(explicit losses need ratings)")
        size = int(batch.users.shape[0])
        if size == 0:
            return torch.zeros(()), 0
        groups = self._decay_groups(optimizer)
        settings = self.table_settings(reg)
        decayed = groups is not None and self.reg_form == "rows"
        touched = None if decayed else {}
        pred = self._predict(batch.users, batch.items, getattr(batch, "timestamps", None),
                             touched)
        targets = batch.targets.to(device=pred.device, dtype=pred.dtype)
        data = _explicit_loss(pred, targets, loss)
        total = data
        for group, kind in groups or ():
            group["weight_decay"] = 2.0 * settings[kind][0] / size if decayed else 0.0
        if not decayed:
            total = data + self.penalty(touched, reg) / size
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return data.detach(), size

    def penalty(self, touched: dict, reg: float) -> Tensor:
        """``sum_r c_r · n_r · |w_r|²`` over the rows of each table in ``touched`` (table
        name -> ids read, or (ids, multiplicity of each id)); ``c_r`` from
        :meth:`table_settings`, ``n_r`` 1 (``reg_form="rows"``: distinct rows) or how many
        times the row was read (``"ratings"``)."""
        total = torch.zeros((), dtype=torch.float64, device=self.history_offsets.device)
        settings = self.table_settings(reg)
        for name, ids in touched.items():
            ids, multiplicity = ids if isinstance(ids, tuple) else (ids, None)
            table = getattr(self, name)
            coef = settings[self.table_kinds[name]][0]
            if self.reg_form == "ratings":
                counts = torch.bincount(ids, weights=None if multiplicity is None
                                        else multiplicity.double(),
                                        minlength=table.num_embeddings)
                rows = counts.nonzero()[:, 0]
                scale = counts[rows].double() * coef
            else:
                # Distinct rows by a mark per row (cheaper than sorting the y bags).
                marks = torch.zeros(table.num_embeddings, dtype=torch.bool, device=ids.device)
                marks[ids] = True
                rows = marks.nonzero()[:, 0]
                scale = None
            if rows.numel():
                w = table(rows.unsqueeze(1)) if isinstance(table, EmbeddingBag) else table(rows)
                squares = (w * w).sum(1)
                total = total + (coef * squares.sum() if scale is None
                                 else (scale * squares).sum())
        return total

    def _decay_groups(self, optimizer):
        """[(group, kind)] when fastmf sparse optimizers (L2 decay mode) hold every table in
        groups of one kind each (:attr:`table_kinds`); else None."""
        opts = optimizer.optimizers if hasattr(optimizer, "optimizers") else [optimizer]
        kinds = {id(getattr(self, n).weight): k for n, k in self.table_kinds.items()}
        found, seen = [], set()
        for opt in opts:
            if not isinstance(opt, _SparseOptimizer):
                continue
            for group in opt.param_groups:
                mine = [kinds.get(id(p)) for p in group["params"]]
                if all(k is None for k in mine):
                    continue
                if None in mine or len(set(mine)) != 1 or group.get("decoupled_weight_decay"):
                    return None
                found.append((group, mine[0]))
                seen.update(id(p) for p in group["params"])
        return found if seen == set(kinds) else None

    def make_optimizer(self, name: str | None, lr: float):
        """A fastmf sparse optimizer (``name``: "adagrad" (default), "rowwise_adagrad",
        "sgd", "adam", "rowwise_adam") over every table, applied in backward, one group per
        kind of table (:attr:`table_kinds`) with learning rate ``lr`` times the kind's scale
        (:meth:`table_settings`); the groups' weight decays are the L2 penalty in the
        "rows" form (see :meth:`training_step`)."""
        makers = {"adagrad": lambda g: SparseAdagrad(g, lr=lr),
                  "rowwise_adagrad": lambda g: SparseAdagrad(g, lr=lr, rowwise=True),
                  "sgd": lambda g: SparseSGD(g, lr=lr),
                  "adam": lambda g: SparseAdam(g, lr=lr),
                  "rowwise_adam": lambda g: SparseAdam(g, lr=lr, rowwise=True)}
        name = name or "adagrad"
        if name not in makers:
            raise ValueError(f"fastmf.models.{type(self).__name__}.make_optimizer: unknown "
                             f"optimizer {name!r}; expected one of {sorted(makers)}")
        scales = {kind: scale for kind, (_, scale) in self.table_settings(0.0).items()}
        groups = {}
        for table, kind in self.table_kinds.items():
            groups.setdefault(kind, []).append(getattr(self, table).weight)
        return apply_in_backward(makers[name]([
            {"params": params, "lr": lr * scales[kind]} for kind, params in groups.items()]))

    def extra_repr(self) -> str:
        return (f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
                f"history_size={self.history_items.numel()}")


@checkpoint.register_model
class TimeSVDpp(SVDpp):
    """timeSVD++: SVD++ with Koren's (2009) time-aware biases (module docstring).

    Extra tables: ``user_alpha`` (U, 1), ``user_day_bias`` (one row per (user, day) pair of
    the training data, compactly numbered; ``num_user_days`` in the config),
    ``item_bin_bias`` (I · num_bins, 1). Buffers: ``user_mean_day`` t_u (U,),
    ``user_last_day`` (U,), ``user_day_keys`` (num_user_days,) sorted keys
    ``user · span + (day - first day)``, ``day_range`` (first, last training day).

    Time: timestamps are seconds since the Unix epoch (or datetime64); ``day(t)`` is the
    whole day. A (user, day) pair not seen in training has no day bias (0); times outside
    the training range fall in the first or last bin. Without timestamps, a user is
    predicted at their latest training day (users without history: the last training day,
    no alpha term) — this is also the time :meth:`recommend` ranks at: ``user_vectors``
    carry a one-hot of that bin and ``item_vectors`` the item's bin biases, so
    ``<user_vec, item_vec> + b_i + offset`` is exactly the prediction.
    """

    table_kinds = dict(SVDpp.table_kinds, user_alpha="alpha", user_day_bias="time",
                       item_bin_bias="time")
    # SVDpp's settings (see there); the time terms' knobs from the first search, which
    # had them in it.
    defaults = {"explicit": dict(SVDpp.defaults["explicit"])}
    uses_timestamps = True
    default_bias_reg = SVDpp.default_bias_reg

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *,
                 num_bins: int = 30, beta: float = 0.4, num_user_days: int = 0,
                 history_size: int = 0, global_mean: float = 0.0,
                 bias_reg: float | None = None, init_scale: float = 0.011,
                 implicit_reg: float | None = 4.9, implicit_lr_scale: float = 0.13,
                 bias_lr_scale: float = 2.8, reg_form: str = "rows",
                 time_reg: float | None = 3.8, time_lr_scale: float = 0.64,
                 alpha_reg: float | None = 11.0, alpha_lr_scale: float = 0.02,
                 backend: str = "auto", device=None, dtype: torch.dtype = torch.float32):
        super().__init__(num_users, num_items, dim, history_size=history_size,
                         global_mean=global_mean, bias_reg=bias_reg, init_scale=init_scale,
                         implicit_reg=implicit_reg, implicit_lr_scale=implicit_lr_scale,
                         bias_lr_scale=bias_lr_scale, reg_form=reg_form,
                         backend=backend, device=device, dtype=dtype)
        self.time_reg = None if time_reg is None else _check_float("TimeSVDpp", "time_reg",
                                                                   time_reg)
        self.alpha_reg = None if alpha_reg is None else _check_float("TimeSVDpp", "alpha_reg",
                                                                     alpha_reg)
        self.time_lr_scale = _check_float("TimeSVDpp", "time_lr_scale", time_lr_scale)
        self.alpha_lr_scale = _check_float("TimeSVDpp", "alpha_lr_scale", alpha_lr_scale)
        self.num_bins = _check_count("TimeSVDpp", "num_bins", num_bins, 1)
        self.beta = _check_float("TimeSVDpp", "beta", beta)
        num_user_days = _check_count("TimeSVDpp", "num_user_days", num_user_days, 0)
        table = dict(backend=backend, device=device, dtype=self.user_factors.weight.dtype)
        self.user_alpha = self._zero_table(num_users, **table)
        # At least one row (a table needs one); with no pairs no key matches it.
        self.user_day_bias = self._zero_table(max(num_user_days, 1), **table)
        self.item_bin_bias = self._zero_table(num_items * self.num_bins, **table)
        self.register_buffer("user_mean_day", torch.zeros(num_users, dtype=torch.float64,
                                                          device=device))
        self.register_buffer("user_last_day", torch.zeros(num_users, dtype=torch.int64,
                                                          device=device))
        self.register_buffer("user_day_keys", torch.zeros(num_user_days, dtype=torch.int64,
                                                          device=device))
        # (first, last) training day; last < first until prepared.
        self.register_buffer("day_range", torch.tensor([0, -1], dtype=torch.int64,
                                                       device=device))

    def _check_loaded(self) -> None:
        """SVDpp's checks, and the time state as :meth:`prepare` leaves it: the training
        days (first <= last, or unprepared), each user's last day and (for users with
        ratings) mean day inside them, the
        (user, day) keys ascending and inside users x days. An edited last day of -10^15
        had predicted ratings of about -876."""
        super()._check_loaded()
        op = "fastmf.models.TimeSVDpp"
        first, last = (int(v) for v in self.day_range.cpu())
        if last < first:
            if (first, last) != (0, -1):
                raise ValueError(f"{op}: day_range must be (first, last) training days with "
                                 f"first <= last, or (0, -1) before training; got "
                                 f"({first}, {last})")
            return
        # t_u of a user without ratings is 0 and unused (dev_u is 0 there).
        rated = (self.history_offsets[1:] > self.history_offsets[:-1]).cpu()
        mean, latest = self.user_mean_day.cpu()[rated], self.user_last_day.cpu()
        for name, days in (("user_mean_day", mean), ("user_last_day", latest)):
            outside = ~((days >= first) & (days <= last))
            if bool(outside.any()):
                raise ValueError(f"{op}: {name} holds {days[outside][0].item()}, outside "
                                 f"the training days [{first}, {last}]")
        keys = self.user_day_keys.cpu()
        limit = self.num_users * (last - first + 1)
        if keys.numel() and (int(keys[0]) < 0 or int(keys[-1]) >= limit
                             or bool((keys[1:] <= keys[:-1]).any())):
            raise ValueError(f"{op}: user_day_keys must ascend strictly inside [0, {limit})")

    def get_config(self) -> dict:
        return dict(super().get_config(), num_bins=self.num_bins, beta=self.beta,
                    num_user_days=int(self.user_day_keys.numel()), time_reg=self.time_reg,
                    time_lr_scale=self.time_lr_scale, alpha_reg=self.alpha_reg,
                    alpha_lr_scale=self.alpha_lr_scale)

    def table_settings(self, reg: float) -> dict[str, tuple[float, float]]:
        """SVDpp's, plus the day and bin biases ("time": ``time_reg``, None: ``bias_reg``;
        ``time_lr_scale``) and alpha_u ("alpha": ``alpha_reg``, None: ``bias_reg``;
        ``alpha_lr_scale``)."""
        time = self.bias_reg if self.time_reg is None else self.time_reg
        alpha = self.bias_reg if self.alpha_reg is None else self.alpha_reg
        return dict(super().table_settings(reg), time=(time, self.time_lr_scale),
                    alpha=(alpha, self.alpha_lr_scale))

    def check_data(self, train) -> None:
        super().check_data(train)
        if train.timestamps is None:
            raise ValueError("fastmf.models.TimeSVDpp: the interactions have no timestamps; "
                             "timeSVD++ needs the time of each rating (Interactions("
                             "..., timestamps=...))")

    def prepare(self, train) -> None:
        """SVDpp.prepare, plus the time state: training day range, t_u, each user's last
        day and the (user, day) pairs, all from ``train``. The day table is rebuilt (zeros)
        when the number of pairs changes: prepare before making the optimizer."""
        super().prepare(train)
        device = self.history_offsets.device
        days = timestamps_to_days(train.timestamps).numpy()
        users = np.asarray(train.users, dtype=np.int64)
        first, last = int(days.min()), int(days.max())
        span = last - first + 1
        counts = np.bincount(users, minlength=self.num_users)
        sums = np.bincount(users, weights=days.astype(np.float64), minlength=self.num_users)
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        latest = np.full(self.num_users, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(latest, users, days)
        last_day = np.where(counts > 0, latest, last)
        keys = np.unique(users * span + (days - first))
        old_rows = self._carried_day_rows(keys, first, span)
        self.user_mean_day = torch.as_tensor(mean, device=device)
        self.user_last_day = torch.as_tensor(last_day, device=device)
        self.user_day_keys = torch.as_tensor(keys, device=device)
        self.day_range = torch.tensor([first, last], dtype=torch.int64, device=device)
        weight = self.user_day_bias.weight
        if self.user_day_bias.num_embeddings != max(len(keys), 1) or old_rows is not None:
            table = self._zero_table(max(len(keys), 1), backend=self.user_day_bias.backend,
                                     device=weight.device, dtype=weight.dtype)
            if old_rows is not None:
                new_pos, values = old_rows
                with torch.no_grad():
                    table.weight[new_pos] = values
            self.user_day_bias = table

    def _carried_day_rows(self, keys: np.ndarray, first: int, span: int):
        """(rows in the new day table, their trained values) for the (user, day) pairs the
        model already had, so that preparing again (attach_data with other data) keeps
        them; None when nothing is to be carried over."""
        old_first, old_last = (int(v) for v in self.day_range)
        old_keys = self.user_day_keys.cpu().numpy()
        if old_last < old_first or not len(old_keys) or not len(keys):
            return None
        old_span = old_last - old_first + 1
        if old_first == first and old_span == span and np.array_equal(old_keys, keys):
            return None
        pairs = np.stack([old_keys // old_span, old_keys % old_span + old_first])
        moved = pairs[0] * span + (pairs[1] - first)
        pos = np.clip(np.searchsorted(keys, moved), 0, len(keys) - 1)
        hit = (keys[pos] == moved) & (pairs[1] >= first) & (pairs[1] < first + span)
        device = self.user_day_bias.weight.device
        values = self.user_day_bias.weight.detach()[torch.as_tensor(np.flatnonzero(hit),
                                                                    device=device)]
        return torch.as_tensor(pos[hit], device=device), values.clone()

    def _days(self, users: Tensor, timestamps) -> Tensor:
        if timestamps is None:
            return self.user_last_day[users]
        days = timestamps_to_days(timestamps).to(users.device).reshape(-1)
        if days.shape != users.shape:
            raise ValueError(f"fastmf.models.TimeSVDpp: timestamps must have one entry per "
                             f"rating ({users.numel()}), got {days.numel()}")
        return days

    def _bins(self, days: Tensor) -> Tensor:
        first, last = (int(v) for v in self.day_range)
        span = max(last - first + 1, 1)
        return torch.div((days - first) * self.num_bins, span,
                         rounding_mode="floor").clamp_(0, self.num_bins - 1)

    def _user_time_bias(self, users: Tensor, days: Tensor, touched) -> Tensor:
        """alpha_u · dev_u(t) + b_{u,day(t)} (B,)."""
        has_history = self._history_sizes[users] > 0
        delta = days.double() - self.user_mean_day[users]
        dev = torch.sign(delta) * delta.abs().pow(self.beta)
        dev = torch.where(has_history, dev, 0.0)
        alpha = self.user_alpha(users)[:, 0]
        out = alpha * dev.to(alpha.dtype)
        first, last = (int(v) for v in self.day_range)
        keys = self.user_day_keys
        inside = (days >= first) & (days <= last)
        query = users * (last - first + 1) + (days - first)
        pos = torch.searchsorted(keys, query).clamp_(max=max(keys.numel() - 1, 0))
        found = inside & (keys.numel() > 0)
        if keys.numel():
            found = found & (keys[pos] == query)
        day_bias = torch.zeros_like(out)
        if bool(found.any()):
            rows = pos[found]
            day_bias = day_bias.index_put((found,), self.user_day_bias(rows)[:, 0])
        else:
            rows = pos[:0]
        if touched is not None:
            touched.update(user_alpha=users, user_day_bias=rows)
        return out + day_bias

    def _time_terms(self, users, items, timestamps, touched):
        days = self._days(users, timestamps)
        bin_rows = items * self.num_bins + self._bins(days)
        bin_bias = self.item_bin_bias(bin_rows)[:, 0]
        if touched is not None:
            touched["item_bin_bias"] = bin_rows
        return self._user_time_bias(users, days, touched) + bin_bias

    def forward(self, users, items, timestamps=None) -> Tensor:
        """(B,) predicted ratings at ``timestamps`` (B,) (seconds; see the class docstring
        for predictions without them)."""
        return self._predict(users, items, timestamps)

    @torch.no_grad()
    def predict(self, users, items, timestamps=None, *, raw_ids: bool = False):
        """Recommender.predict at ``timestamps`` (B,) (None: each user's latest training
        day)."""
        if timestamps is None:
            return super().predict(users, items, raw_ids=raw_ids)
        if raw_ids:
            users = self._index_of(users, "user", True)
            items = self._index_of(items, "item", True)
            if (users < 0).any() or (items < 0).any():
                raise KeyError("fastmf.models.TimeSVDpp.predict: unknown raw user or item id")
            return self.forward(users, items, timestamps).double().cpu().numpy()
        return self.forward(users, items, timestamps)

    def training_step(self, batch, optimizer, *, loss: str, reg: float):
        if getattr(batch, "timestamps", None) is None:
            raise ValueError("fastmf.models.TimeSVDpp.training_step: the batch has no "
                             "timestamps; timeSVD++ trains on timed ratings")
        return super().training_step(batch, optimizer, loss=loss, reg=reg)

    def user_vectors(self, users) -> tuple[Tensor, Tensor]:
        """([p_u + implicit, one-hot of Bin(t_last_u)] (B, dim + num_bins), offset
        mu + b_u(t_last_u) (B,)): ranking at each user's latest training time."""
        vectors, offset = super().user_vectors(users)
        users = _ids("TimeSVDpp", "users", users, self.history_offsets.device)
        days = self.user_last_day[users]
        onehot = F.one_hot(self._bins(days), self.num_bins).to(vectors.dtype)
        offset = offset + self._user_time_bias(users, days, None)
        return torch.cat([vectors, onehot], 1), offset

    def item_vectors(self) -> tuple[Tensor, Tensor]:
        """([q_i, b_{i,bin} for every bin] (I, dim + num_bins), b_i (I,))."""
        bins = self.item_bin_bias.weight.view(self.num_items, self.num_bins)
        return torch.cat([self.item_factors.weight, bins], 1), self.item_bias.weight[:, 0]
