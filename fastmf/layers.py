"""``fastmf.MF``: the textbook biased matrix-factorization model as one layer whose
forward and backward run on fused kernels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmf import _checks, backends, ops


def sparse_rows_grad(ids: Tensor, rows: Tensor, shape) -> Tensor:
    """The gradient ``nn.Embedding(sparse=True)`` produces: an uncoalesced COO tensor with
    one row per sample."""
    return torch.sparse_coo_tensor(
        ids.long().unsqueeze(0), rows, shape, check_invariants=False, is_coalesced=False
    )


class _SparseGather(torch.autograd.Function):
    """``weight[ids]`` with a sparse COO gradient, for 1-D tables (``F.embedding`` only
    takes 2-D weights, and a sparse gradient cannot flow back through a view)."""

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.save_for_backward(ids)
        ctx.shape = weight.shape
        return weight[ids.long()]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return sparse_rows_grad(ids, grad.contiguous(), ctx.shape), None


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
            grads = [ops.scatter_rows(users.long(), rows_p, num_users),
                     ops.scatter_rows(items.long(), rows_q, num_items)]
            if ctx.has_bias:
                grads += [ops.scatter_rows(users.long(), grad, num_users),
                          ops.scatter_rows(items.long(), grad, num_items)]
        if not ctx.has_bias:
            grads += [None, None]
        return (None, None, None, None, *grads, None)


class MF(nn.Module):
    """Biased matrix factorisation: ``pred = mu + b_u + b_i + <P[u], Q[i]>``.

    A drop-in for the textbook model (``nn.Embedding`` users/items, biases, a dot
    product). Parameters: ``user_factors`` (U, dim), ``item_factors`` (I, dim),
    ``user_bias`` (U,), ``item_bias`` (I,) (absent when ``bias=False``); ``global_mean``
    (mu) is a buffer. Gradients are dense, or sparse COO like ``nn.Embedding(sparse=True)``
    when ``sparse=True``.

    ``backend``: ``"reference"`` (plain ``F.embedding``, the spec), ``"numba"`` (Numba CPU
    kernels), ``"native"`` (C++/CUDA ops, dispatched by device) or ``"auto"`` (native if
    built, else numba, else reference). All backends share the same parameters, so
    ``model.backend = "numba"`` on a trained model changes only how it computes.

    Init: factors uniform(-init_scale, init_scale) from the global torch RNG (users first,
    then items), biases zero — the same for every backend under the same seed.

    >>> import torch, fastmf
    >>> model = fastmf.MF(100, 50, dim=8, global_mean=3.5)
    >>> model(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
    torch.Size([2])
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *, bias: bool = True,
                 global_mean: float = 0.0, backend: str = "auto", sparse: bool = False,
                 init_scale: float = 0.05, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"fastmf.MF: {name} must be a positive int, got {value!r}")
        if dtype not in _checks.WEIGHT_DTYPES:
            raise TypeError(f"fastmf.MF: dtype must be float32 or float64, got {dtype}")
        factory = dict(dtype=dtype, device=device)
        self.user_factors = nn.Parameter(torch.empty(num_users, dim, **factory))
        self.item_factors = nn.Parameter(torch.empty(num_items, dim, **factory))
        if bias:
            self.user_bias = nn.Parameter(torch.zeros(num_users, **factory))
            self.item_bias = nn.Parameter(torch.zeros(num_items, **factory))
        else:
            self.register_parameter("user_bias", None)
            self.register_parameter("item_bias", None)
        self.register_buffer("global_mean", torch.tensor(float(global_mean), **factory))
        self._global_mean_value = float(global_mean)
        self.sparse = bool(sparse)
        self.init_scale = float(init_scale)
        self.backend = backend
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
        self._backend = backends.resolve(name)
        self._kernels = backends.get(self._backend)

    @property
    def num_users(self) -> int:
        return self.user_factors.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    @property
    def dim(self) -> int:
        return self.user_factors.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.user_bias is not None

    @property
    def mu(self) -> float:
        """The global mean as a Python float (no device sync)."""
        return self._global_mean_value

    def set_global_mean(self, value: float) -> None:
        self._global_mean_value = float(value)
        self.global_mean.fill_(float(value))

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
    def as_ids(self, ids, name: str) -> Tensor:
        """Tensor ids on the model's device (numpy arrays and lists accepted)."""
        if isinstance(ids, Tensor):
            return ids
        array = np.asarray(ids)
        if array.dtype.kind not in "iu":
            raise TypeError(f"fastmf.MF: {name} must be integer ids, got dtype {array.dtype}")
        return torch.as_tensor(array.astype(np.int64, copy=False),
                               device=self.user_factors.device)

    def forward(self, users, items) -> Tensor:
        """``users``, ``items``: (B,) int32/int64 -> predictions (B,)."""
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        p, q, bu, bi = self.tables()
        if self._backend == "reference":
            _checks.check_mf_inputs("mf_forward", users, items, p, q, bu, bi)
            u, i = users.long(), items.long()
            pred = (F.embedding(u, p, sparse=self.sparse) * F.embedding(i, q, sparse=self.sparse)
                    ).sum(1) + self._global_mean_value
            if bu is not None:
                if self.sparse:
                    pred = pred + _SparseGather.apply(bu, u) + _SparseGather.apply(bi, i)
                else:
                    pred = pred + bu[u] + bi[i]
            return pred
        if self._backend == "native" and not self.sparse:
            # The op's registered autograd gives dense gradients and works under torch.compile.
            return ops.mf_forward(users, items, p, q, bu, bi, self._global_mean_value)
        return _KernelForward.apply(self._kernels, self.sparse, users, items, p, q, bu, bi,
                                    self._global_mean_value)

    @torch.no_grad()
    def predict(self, users, items) -> Tensor:
        """Predictions without building an autograd graph."""
        return self.forward(users, items)
