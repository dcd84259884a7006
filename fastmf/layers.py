"""``fastmf.MF``: the textbook biased matrix-factorization model as one layer whose
forward and backward run on fused kernels."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fastmf import checkpoint, ops
from fastmf._arrays import array_to_tensor
from fastmf.memory import empty_table
from fastmf.ops import checks, native
from fastmf.recommender import IMPLICIT, KERNEL_LOSSES, Batch, FactorTables, Recommender

# The fused op that draws its own uniform negatives, per implicit loss.
_SAMPLED_OPS = {"bpr": "train_step_pairwise_sampled", "bce": "train_step_sampled"}
# Their runs over an epoch's batches in one call (MF.train_epoch).
_STEPS_OPS = {"bpr": "train_steps_pairwise_sampled", "bce": "train_steps_sampled"}


def sparse_rows_grad(ids: Tensor, rows: Tensor, shape) -> Tensor:
    """The gradient ``nn.Embedding(sparse=True)`` produces: an uncoalesced COO tensor with
    one row per sample."""
    return torch.sparse_coo_tensor(
        ids.long().unsqueeze(0), rows, shape, check_invariants=False, is_coalesced=False
    )




class _KernelForward(torch.autograd.Function):
    """Forward and backward through a backend's ``mf_forward``/``mf_backward`` kernels,
    with dense or sparse (``nn.Embedding(sparse=True)``-style) gradients."""

    @staticmethod
    def forward(ctx, kernels, sparse, users, items, user_factors, item_factors, user_bias,
                item_bias, global_mean):
        ctx.kernels, ctx.sparse = kernels, sparse
        ctx.has_bias = user_bias is not None
        ctx.shapes = (user_factors.shape, item_factors.shape)
        ctx.save_for_backward(users, items, user_factors, item_factors)
        return kernels.mf_forward(users, items, user_factors, item_factors, user_bias,
                                  item_bias, global_mean)

    @staticmethod
    def backward(ctx, grad):
        users, items, user_factors, item_factors = ctx.saved_tensors
        grad = grad.contiguous()
        rows_p, rows_q = ctx.kernels.mf_backward(grad, users, items, user_factors,
                                                 item_factors)
        (num_users, dim), (num_items, _) = ctx.shapes
        if ctx.sparse:
            grads = [sparse_rows_grad(users, rows_p, (num_users, dim)),
                     sparse_rows_grad(items, rows_q, (num_items, dim))]
            if ctx.has_bias:
                grads += [sparse_rows_grad(users, grad, (num_users,)),
                          sparse_rows_grad(items, grad, (num_items,))]
        else:
            grads = [native.scatter_rows(users.long(), rows_p, num_users),
                     native.scatter_rows(items.long(), rows_q, num_items)]
            if ctx.has_bias:
                grads += [native.scatter_rows(users.long(), grad, num_users),
                          native.scatter_rows(items.long(), grad, num_items)]
        if not ctx.has_bias:
            grads += [None, None]
        return (None, None, None, None, *grads, None)


@checkpoint.register_model
class MF(FactorTables, Recommender):
    """Biased matrix factorisation: ``pred = mu + b_u + b_i + <P[u], Q[i]>``.

    A drop-in for the textbook model (``nn.Embedding`` users/items, biases, a dot
    product). Parameters: ``user_factors`` (U, dim), ``item_factors`` (I, dim),
    ``user_bias`` (U,), ``item_bias`` (I,) (absent when ``bias=False``); ``global_mean``
    (mu) is a buffer. Gradients are dense, or sparse COO like ``nn.Embedding(sparse=True)``
    when ``sparse=True``.

    ``backend``: ``"reference"`` (plain PyTorch, the spec), ``"numba"`` (Numba CPU
    kernels), ``"native"`` (C++/CUDA ops, dispatched by device) or ``"auto"`` (native if
    built, else numba, else reference); :func:`fastmf.ops.kernels` picks the kernels.
    All backends share the same parameters, so
    ``model.backend = "numba"`` on a trained model changes only how it computes.

    Init: factors uniform(-init_scale, init_scale) from the global torch RNG (users first,
    then items), biases zero — the same for every backend under the same seed.

    >>> import torch, fastmf
    >>> model = fastmf.MF(100, 50, dim=8, global_mean=3.5)
    >>> model(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
    torch.Size([2])

    A :class:`fastmf.models.base.Recommender`: ``recommend``, ``similar_items``,
    ``analogy``, ``predict``, ``attach_data`` and ``save`` come from there; training runs
    the fused :func:`fastmf.train_step`. Checkpoints keep MF's own format.
    """

    # Checkpoints of MF and its subclasses use the MF format (fastmf.checkpoint).
    checkpoint_format: ClassVar[str] = "mf"
    # The fused steps never read them, so batches() need not shuffle them every epoch.
    uses_timestamps: ClassVar[bool] = False
    # The fused steps take the interactions' weights (each positive's data term).
    uses_weights: ClassVar[bool] = True
    # WARP: violators picked by the fused forward, then the fused hinge step.
    losses: ClassVar[tuple[str, ...]] = (*KERNEL_LOSSES, "warp")
    # WARP's own fit defaults (the implicit ones otherwise), chosen on the inner splits of
    # seven data sets (benchmarks/implicit_feedback.py --tune-warp; benchmarks/README.md,
    # "MF with WARP"): 30 candidates, lr 0.05, 10 epochs; WARP overfits the implicit
    # defaults' 40 epochs at lr 0.1 within a few epochs on most sets.
    defaults: ClassVar[dict] = {"warp": dict(lr=0.05, reg=1e-2, batch_size=4096, epochs=10,
                                             num_negatives=30)}

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *, bias: bool = True,
                 global_mean: float = 0.0, backend: str = "auto", sparse: bool = False,
                 init_scale: float = 0.05, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"fastmf.MF: {name} must be a positive int, got {value!r}")
        if dtype not in checks.WEIGHT_DTYPES:
            raise TypeError(f"fastmf.MF: dtype must be float32 or float64, got {dtype}")
        global_mean = checks.check_finite_number("MF", global_mean=global_mean)
        checks.check_settings("MF", init_scale=init_scale)
        factory = dict(dtype=dtype, device=device)
        self.user_factors = nn.Parameter(empty_table((num_users, dim), **factory))
        self.item_factors = nn.Parameter(empty_table((num_items, dim), **factory))
        if bias:
            self.user_bias = nn.Parameter(empty_table((num_users,), **factory).zero_())
            self.item_bias = nn.Parameter(empty_table((num_items,), **factory).zero_())
        else:
            self.register_parameter("user_bias", None)
            self.register_parameter("item_bias", None)
        self.register_buffer("global_mean", torch.tensor(float(global_mean), **factory))
        self._global_mean_value = float(global_mean)
        self.sparse = bool(sparse)
        self.init_scale = float(init_scale)
        self.backend = backend
        # Filled from the training data (fastmf.fit / attach_data): raw-id maps, titles and
        # popularity for recommendations by raw id and the cold-start fallback.
        self.user_map = None
        self.item_map = None
        self.item_titles = None
        self.item_popularity = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.user_factors.uniform_(-self.init_scale, self.init_scale)
        self.item_factors.uniform_(-self.init_scale, self.init_scale)
        if self.user_bias is not None:
            self.user_bias.zero_()
            self.item_bias.zero_()

    # -- configuration -------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend in use (``"auto"`` is resolved when set)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = ops.resolve_backend(name, op="fastmf.MF")

    @property
    def has_bias(self) -> bool:
        return self.user_bias is not None

    @property
    def mu(self) -> float:
        """The global mean as a Python float (no device sync)."""
        return self._global_mean_value

    def set_global_mean(self, value: float) -> None:
        self._global_mean_value = checks.check_finite_number("MF.set_global_mean", value=value)
        self.global_mean.fill_(self._global_mean_value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._global_mean_value = float(self.global_mean)

    def extra_repr(self) -> str:
        return (f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
                f"bias={self.has_bias}, sparse={self.sparse}, backend={self.backend!r}")

    def tables(self):
        """(user_factors, item_factors, user_bias, item_bias) — biases None without bias."""
        return self.user_factors, self.item_factors, self.user_bias, self.item_bias

    # -- compute ----------------------------------------------------------------------------
    def forward(self, users, items) -> Tensor:
        """``users``, ``items``: (B,) int32/int64 -> predictions (B,)."""
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        p, q, bu, bi = self.tables()
        if self._backend == "native" and not self.sparse:
            # The op's registered autograd gives dense gradients and works under torch.compile.
            return native.mf_forward(users, items, p, q, bu, bi, self._global_mean_value)
        kernels = ops.kernels(self._backend, p.device)
        return _KernelForward.apply(kernels, self.sparse, users, items, p, q, bu, bi,
                                    self._global_mean_value)

    # -- the model protocol (fastmf.models.base.Recommender) --------------------------------
    def get_config(self) -> dict:
        return {
            "num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
            "bias": self.has_bias, "global_mean": self.mu, "sparse": self.sparse,
            "init_scale": self.init_scale,
            "dtype": str(self.user_factors.dtype).removeprefix("torch."),
        }

    def user_vectors(self, users) -> tuple[Tensor, Tensor]:
        """``(P[users], mu + b_u)``: the offset shifts a user's scores alike."""
        users = self.as_ids(users, "users", self.num_users, method="user_vectors")
        vectors = self.user_factors.detach()[users]
        if self.has_bias:
            return vectors, self.mu + self.user_bias.detach()[users]
        return vectors, torch.full((len(users),), self.mu, dtype=vectors.dtype,
                                   device=vectors.device)

    def item_vectors(self) -> tuple[Tensor, Tensor | None]:
        return self.item_factors.detach(), (self.item_bias.detach() if self.has_bias
                                            else None)

    def all_user_vectors(self) -> Tensor:
        return self.user_factors.detach()

    def add_users(self, n: int, features=None, **kwargs) -> range:
        """Append ``n`` users and return their indices (see :meth:`add_items`)."""
        from fastmf.models import coldstart

        return coldstart.add_rows(self, "user", n, features, **kwargs)

    def add_items(self, n: int, features=None, **kwargs) -> range:
        """Append ``n`` items and return their indices (a range):
        :func:`fastmf.models.coldstart.add_rows` on this model's factors and bias
        (keywords ``catalog_features``, ``optimizer``, ``raw_ids``, ``generator``). New rows
        start at the default init, or with ``features`` and ``catalog_features`` at the
        mean of the items sharing their features; ``optimizer`` grows with them."""
        from fastmf.models import coldstart

        return coldstart.add_rows(self, "item", n, features, **kwargs)

    def make_optimizer(self, name: str | None, lr: float):
        """``"adagrad"`` (default), ``"rowwise_adagrad"`` or ``"sgd"``: the optimizers the
        fused step runs."""
        from fastmf.optim import SparseAdagrad, SparseSGD

        name = name or "adagrad"
        if name == "adagrad":
            return SparseAdagrad(self.parameters(), lr=lr)
        if name == "rowwise_adagrad":
            return SparseAdagrad(self.parameters(), lr=lr, rowwise=True)
        if name == "sgd":
            return SparseSGD(self.parameters(), lr=lr)
        raise ValueError(f"fastmf.fit: unknown optimizer {name!r}; use 'adagrad', "
                         "'rowwise_adagrad', 'sgd' or a fastmf.optim optimizer")

    def draws_negatives(self, loss: str) -> bool:
        """bpr and bce with uniform negatives run as one fused op per batch that draws them
        (:func:`fastmf.step.train_step_pairwise_sampled`,
        :func:`fastmf.step.train_step_sampled`), where the backend has it."""
        op = _SAMPLED_OPS.get(loss)
        return op is not None and (self._backend != "native" or native.has_kernel(
            self.user_factors.device, op))

    def train_epoch(self, train, optimizer, *, batch_size: int, loss: str,
                    num_negatives: int, sampler, generator: torch.Generator,
                    reg: float) -> tuple[Tensor, list[int], int] | None:
        """bpr and bce with uniform negatives: the epoch as one
        :func:`fastmf.step.train_steps_pairwise_sampled` or
        :func:`fastmf.step.train_steps_sampled` call (the batches, negatives and updates of
        :meth:`batches` and :meth:`training_step`, bit for bit), where the backend has the
        op. On ml-latest-small (batch 4,096, 2 threads) an epoch ran 1.1-1.6x faster this
        way than batch by batch in alternated runs on a quiet machine, and 1.0-1.1x with two
        busy processes on its 2 cores (benchmarks/README.md): no per-batch Python or
        dispatch. None otherwise (fit runs the batches)."""
        from fastmf.step import train_steps_pairwise_sampled, train_steps_sampled

        op = _STEPS_OPS.get(loss)
        if op is None or sampler is None or sampler.distribution != "uniform" \
                or not self.draws_negatives(loss):
            return None
        # A subclass that changes how batches are made or stepped keeps its own hooks.
        cls = type(self)
        if cls.batches is not Recommender.batches or cls.training_step is not MF.training_step:
            return None
        if self._backend == "native" and not native.has_kernel(self.user_factors.device, op):
            return None
        # The op reads the epoch's interactions through its permutation: gathering them
        # first (Recommender._shuffled) took 0.1-0.2 ms more of an 8.5-8.8 ms BPR epoch on
        # ml-latest-small (2 threads). Same run, same bits.
        users, items, _, order = self._epoch_order(train, generator, id_dtype=torch.int32)
        weights = None
        if train.weights is not None and self.uses_weights:
            weights = array_to_tensor(train.weights, self.user_factors.device)
        indptr, indices = sampler.csr(self.user_factors.device)
        run = train_steps_pairwise_sampled if loss == "bpr" else train_steps_sampled
        losses = run(self, optimizer, users, items, indptr, indices, num_negatives,
                     batch_size=batch_size, seed=generator.initial_seed(), step=0, loss=loss,
                     reg=reg, weights=weights, order=order)
        n = order.shape[0]
        pairs = n * num_negatives if loss == "bpr" else n * (1 + num_negatives)
        return losses, [min(batch_size, n - lo) for lo in range(0, n, batch_size)], pairs

    def _warp_step(self, batch: Batch, optimizer, reg: float) -> tuple[Tensor, int]:
        """WARP (as LightFM trains it) on the fused kernels: the n negatives of each positive
        are its candidates, scored by the fused forward without a graph to pick each
        positive's first violator and rank weight (:func:`fastmf.models.warp_choice`); then
        one :func:`fastmf.train_step_pairwise` with the margin ranking hinge on the m
        positives that have one, each weighted by its rank weight. Weights and reg are
        scaled by m / B, so the step minimises, over the batch's B positives::

            sum_found w_rank * relu(1 - x_uij) / B
            + reg * sum_found(||P[u]||² + ||Q[i]||² + ||Q[j]||² + b_i² + b_j²) / B

        (x_uij = s_ui - s_uj; the interactions' weights, when given, multiply w_rank). The
        hinge is the default step's ``1 - s_i + s_j`` wherever the pick saw a violation,
        i.e. everywhere up to rounding. Returns (loss, B)."""
        from fastmf.step import train_step_pairwise

        size = len(batch.users)
        chosen, weight = self._warp_choice(batch)
        found = weight > 0
        m = int(found.sum())
        if m == 0:  # no violator anywhere: nothing to update
            return self.user_factors.new_zeros(()), size
        scale = m / size
        weights = weight[found] * scale
        if batch.weights is not None:
            weights = weights * batch.weights[found].to(weights.dtype)
        loss = train_step_pairwise(self, optimizer, batch.users[found], batch.items[found],
                                   chosen[found], loss="hinge", reg=reg * scale,
                                   weights=weights)
        return loss, size

    def training_step(self, batch: Batch, optimizer, *, loss: str,
                      reg: float) -> tuple[Tensor, int]:
        """One fused step (:func:`fastmf.train_step`; :func:`fastmf.train_step_pairwise`
        for bpr, each positive against each of its negatives; or, when the batch leaves the
        uniform negatives to the step, :func:`fastmf.step.train_step_pairwise_sampled` for
        bpr and :func:`fastmf.step.train_step_sampled` for bce). ``"warp"``: see
        :meth:`_warp_step`."""
        from fastmf.step import (
            train_step,
            train_step_pairwise,
            train_step_pairwise_sampled,
            train_step_sampled,
        )

        u, i, w = batch.users, batch.items, batch.weights
        if loss == "warp":
            return self._warp_step(batch, optimizer, reg)
        if loss not in IMPLICIT:
            return train_step(self, optimizer, u, i, batch.targets, loss=loss, reg=reg,
                              weights=w), len(u)
        draw = batch.draw
        if draw is not None:
            k = draw.num_negatives
            if loss == "bpr":
                return train_step_pairwise_sampled(
                    self, optimizer, u, i, draw.indptr, draw.indices, k, seed=draw.seed,
                    step=draw.step, reg=reg, weights=w), len(u) * k
            return train_step_sampled(self, optimizer, u, i, draw.indptr, draw.indices, k,
                                      seed=draw.seed, step=draw.step, loss=loss, reg=reg,
                                      weights=w), len(u) * (1 + k)
        neg = batch.negatives
        k = neg.shape[1]
        if loss == "bpr":
            return train_step_pairwise(self, optimizer, u.repeat_interleave(k),
                                       i.repeat_interleave(k), neg.reshape(-1), reg=reg,
                                       weights=None if w is None else w.repeat_interleave(k)
                                       ), len(u) * k
        users = torch.cat([u, u.repeat_interleave(k)])
        items = torch.cat([i, neg.reshape(-1)])
        labels = torch.cat([torch.ones(len(u)), torch.zeros(len(u) * k)]).to(
            dtype=self.user_factors.dtype, device=u.device)
        if w is not None:  # the negatives' rows weigh 1, as in train_step_sampled
            w = torch.cat([w.to(labels.dtype), labels.new_ones(len(u) * k)])
        return train_step(self, optimizer, users, items, labels, loss="bce", reg=reg,
                          weights=w), len(users)
