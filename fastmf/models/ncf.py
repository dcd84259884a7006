"""Neural collaborative filtering (He et al., WWW 2017): ``GMF``, ``MLP`` and ``NeuMF``.

Each model is the paper's (and its reference code's) architecture:

- ``GMF``: ``logit = h·(p_u ⊙ q_i) + b``, separate user/item tables of ``dim`` columns. A
  dot-product model (user vector ``p_u ⊙ h``, item vector ``q_i``), so ``recommend`` uses the
  fused exact top-k.
- ``MLP``: ``z = [p_u, q_i]`` (user and item tables of ``layers[0] // 2`` columns each), then
  ``z = relu(W_l z + b_l)`` for each hidden size ``layers[1:]``, ``logit = h·z + b``.
- ``NeuMF``: a GMF tower and an MLP tower with their own tables, ``logit = h·[φ_GMF, φ_MLP] +
  b``; :meth:`NeuMF.from_pretrained` starts it from trained towers (the paper's pretraining).

Init as in the paper's code: tables N(0, 0.01²), hidden layers Glorot-uniform, the output
layer LeCun-uniform, biases zero. Dropout (``dropout``) precedes every hidden linear layer
(on the concatenated embeddings first) and is active in training mode only.

The embedding tables are :class:`fastmf.nn.Embedding` (their optimizer can run inside the
backward pass, :func:`fastmf.optim.apply_in_backward`); the dense layers are ``nn.Linear``.

>>> import torch, fastmf
>>> model = fastmf.models.NeuMF(100, 50, gmf_dim=8, layers=(32, 16, 8))
>>> model(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
torch.Size([2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastmf import checkpoint
from fastmf.models._rows import table_kernels, unique_ids
from fastmf.models.base import (
    SCORE_CHUNK,
    CombinedOptimizer,
    Recommender,
    pairwise_loss,
    pointwise_loss,
)
from fastmf.nn import Embedding

__all__ = ["GMF", "MLP", "NeuMF"]

_DTYPES = (torch.float32, torch.float64)


# -- argument checks ---------------------------------------------------------------------------

def _positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"fastmf.models.{op}: {name} must be a positive int, got {value!r}")
    return int(value)


def _check_layers(op: str, layers) -> tuple[int, ...]:
    """``layers`` as a tuple: non-empty, positive ints, an even first entry (the user and
    item embeddings each take half of it). A list is accepted (JSON configs hold lists)."""
    if not isinstance(layers, tuple | list) or len(layers) == 0:
        raise ValueError(f"fastmf.models.{op}: layers must be a non-empty tuple of positive "
                         f"ints, got {layers!r}")
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"fastmf.models.{op}: layers must be a non-empty tuple of "
                             f"positive ints, got {layers!r}")
    if layers[0] % 2:
        raise ValueError(f"fastmf.models.{op}: layers[0] must be even (the user and item "
                         f"embeddings are layers[0] // 2 wide each), got {layers!r}")
    return tuple(int(v) for v in layers)


def _check_dropout(op: str, dropout) -> float:
    if (isinstance(dropout, bool) or not isinstance(dropout, int | float | np.floating)
            or not 0.0 <= float(dropout) < 1.0):
        raise ValueError(f"fastmf.models.{op}: dropout must be a float in [0, 1), got "
                         f"{dropout!r}")
    return float(dropout)


def _check_dtype(op: str, dtype) -> torch.dtype:
    """``dtype`` as a torch dtype; its name is accepted too (configs hold names)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in _DTYPES:
        raise TypeError(f"fastmf.models.{op}: dtype must be float32 or float64, got {dtype}")
    return dtype


# -- building blocks -----------------------------------------------------------------------------

def _table(num: int, dim: int, backend: str, device, dtype) -> Embedding:
    table = Embedding(num, dim, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        table.weight.normal_(0.0, 0.01)
    return table


def _hidden_layers(layers: tuple[int, ...], device, dtype) -> nn.ModuleList:
    out = nn.ModuleList()
    for fan_in, fan_out in zip(layers[:-1], layers[1:], strict=True):
        linear = nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.xavier_uniform_(linear.weight)
            linear.bias.zero_()
        out.append(linear)
    return out


def _output_layer(fan_in: int, device, dtype) -> nn.Linear:
    linear = nn.Linear(fan_in, 1, device=device, dtype=dtype)
    with torch.no_grad():
        bound = math.sqrt(3.0 / fan_in)  # LeCun uniform
        linear.weight.uniform_(-bound, bound)
        linear.bias.zero_()
    return linear


def _relu_backward_(grad: Tensor, out: Tensor) -> Tensor:
    """``grad`` zeroed where the relu's output ``out`` is 0, in place (autograd's own relu
    backward, written into ``grad``: a fresh tensor nobody else holds)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0.0, grad_input=grad)


def _broadcasts_into(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` itself (so ``add_`` can write in place).
    torch.broadcast_shapes answers the same in 57 us a call here, half a percent of an NCF
    step."""
    return len(shape) <= len(target) and _broadcast_shape(shape, target) == tuple(target)


def _broadcast_shape(a, b) -> tuple[int, ...]:
    """The shape ``a`` and ``b`` broadcast to (torch.broadcast_shapes' answer without its
    cost, see :func:`_broadcasts_into`). For shapes that do not broadcast it means nothing,
    except that it equals ``b`` exactly when ``a``, no longer than ``b``, broadcasts to
    ``b`` itself."""
    a, b = (1,) * (len(b) - len(a)) + tuple(a), (1,) * (len(a) - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b, strict=True))


class _Tower(torch.autograd.Function):
    """``h·relu-MLP([p, q]) + c`` over user rows ``p`` (..., D) and item rows ``q`` (..., D)
    broadcast against each other, with a hand-written backward.

    The first layer is split, ``W [p, q] + b = (W_u p + b) + W_i q``: each side goes through
    its half once before broadcasting, so one user against 1 + n items costs one user row,
    not 1 + n (and its gradient is summed over its items before the user's half of the
    backward matmuls). The relus run in place, the backward zeroes the gradients in place,
    and the output layer (one unit) is a product and a sum instead of a matmul: the same
    numbers as autograd on the concatenation, up to float summation order, with fewer
    passes over the (pairs, width) intermediates that dominate the step.

    ``params``: ``W_1, b_1, W_2, b_2, ...`` of the hidden layers; ``h`` (1, layers[-1]);
    ``c`` a 0-d or (1,) bias (the output layer's) added to every logit. ``user_at`` /
    ``item_at`` (:class:`_Positions`, or None): the row of ``p`` / ``q`` each pair takes
    (the training step passes the distinct rows and (B, 1) / (B, 1 + n) positions);
    without them ``p`` and ``q`` are the pairs' rows, broadcast.
    """

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, user_at: _Positions | None, item_at: _Positions | None,
                h: Tensor, c: Tensor, *params: Tensor) -> Tensor:
        d = p.shape[-1]
        w1, b1 = params[0], params[1]
        z = _side(q, w1[:, d:], None, item_at)
        zu = _side(p, w1[:, :d], b1, user_at)
        z = z.add_(zu) if _broadcasts_into(zu.shape, z.shape) else z + zu
        out, acts = _tower_rest(z, params, h, c)
        ctx.save_for_backward(p, q, h, *params, *acts)
        ctx.num_params, ctx.bias_shape = len(params), c.shape
        ctx.user_at, ctx.item_at = user_at, item_at
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        p, q, h = saved[:3]
        params, acts = saved[3:3 + ctx.num_params], saved[3 + ctx.num_params:]
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (6 + len(params))
        last = acts[-1]
        flat = grad.reshape(-1)
        if needs[4]:
            grads[4] = (flat @ last.reshape(-1, last.shape[-1])).reshape(h.shape)
        if needs[5]:
            grads[5] = flat.sum().reshape(ctx.bias_shape)
        # In the last activation's layout (feature-major for a narrow layer, see
        # _hidden_linear): the relu backward then reads both in one order (0.7 ms a default
        # step slower when the two layouts differ).
        gz = torch.mul(grad.unsqueeze(-1), h.reshape(-1), out=torch.empty_like(last))
        for layer in range(len(acts) - 1, -1, -1):
            gz = _relu_backward_(gz, acts[layer])
            if layer == 0:
                break  # its bias's gradient is summed below, over the users' rows
            g2 = gz.reshape(-1, gz.shape[-1])
            if needs[6 + 2 * layer + 1]:
                grads[6 + 2 * layer + 1] = g2.sum(0)
            w = params[2 * layer]
            if needs[6 + 2 * layer]:
                grads[6 + 2 * layer] = g2.t() @ acts[layer - 1].reshape(-1, w.shape[1])
            gz = gz @ w
        # The first layer: each side's gradient summed over the pairs it was broadcast (or
        # gathered) to, then through its half of W_1.
        w1, d = params[0], p.shape[-1]
        gq = _side_grad(gz, q, ctx.item_at)
        gp = _side_grad(gz, p, ctx.user_at)
        width = gz.shape[-1]
        if needs[7]:
            # Every pair's gradient sits in exactly one user row of gp: the sum over the
            # pairs from 610 rows instead of 20,480 in a default step (about 90 us).
            grads[7] = gp.reshape(-1, width).sum(0)
        if needs[6]:
            grads[6] = torch.cat([gp.reshape(-1, width).t() @ p.reshape(-1, d),
                                  gq.reshape(-1, width).t() @ q.reshape(-1, d)], 1)
        if needs[0]:
            grads[0] = gp @ w1[:, :d]
        if needs[1]:
            grads[1] = gq @ w1[:, d:]
        return tuple(grads)


# MKL's sgemm, one thread, 20,480 rows (a default NCF step's pairs): a layer under 16 outputs
# wide takes 1.7-9.5x less time computed feature-major, W X^T, than as X W^T (16 -> 8:
# 716 vs 143 us; 32 -> 8: 985 vs 244 us); from 16 outputs on the two are within 0.8-1.15x
# of each other, so wider layers stay row-major.
_FEATURE_MAJOR_BELOW = 16


def _hidden_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` over the rows of ``x`` (..., in); a narrow layer's
    output is the transposed view of ``W x^T + b`` (the same dot products; only where
    the result lives differs)."""
    if weight.shape[0] >= _FEATURE_MAJOR_BELOW or x.dim() < 2:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias.unsqueeze(1), weight, flat.t()).t()
    return out.view(*x.shape[:-1], weight.shape[0])


def _tower_rest(z: Tensor, params, h: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor]]:
    """From the first layer's pre-activations ``z`` (a fresh tensor: the relu runs in
    place): (the logits, every hidden layer's output)."""
    acts = [z.relu_()]
    for i in range(2, len(params), 2):
        acts.append(_hidden_linear(acts[-1], params[i], params[i + 1]).relu_())
    return torch.matmul(acts[-1], h.reshape(-1)).add_(c.reshape(())), acts


def _tower_grid(layers: nn.ModuleList, p: Tensor, item_half: Tensor, h: Tensor,
                c: Tensor) -> Tensor:
    """Logits (R, M) of user rows ``p`` (R, D) against every item, given the items' half of
    the first layer ``item_half`` (M, H) (computed once per scoring call)."""
    first = layers[0]
    user_half = F.linear(p, first.weight[:, :p.shape[-1]], first.bias)
    return _tower_rest(user_half.unsqueeze(1) + item_half, _dense_params(layers), h, c)[0]


class _Positions(NamedTuple):
    """Where each pair's row sits among the distinct rows a training step looked up
    (``index``, shaped like the pairs), and the backend module whose ``scatter_rows`` sums
    the pairs' gradients back into those rows (the tables' backend)."""
    index: Tensor
    kernels: ModuleType


def _side(rows: Tensor, weight: Tensor, bias: Tensor | None, at: _Positions | None) -> Tensor:
    """One side's half of the first layer on its own rows, then gathered to the pairs by
    ``at`` when given: (*at.index.shape, width); else (*rows.shape[:-1], width)."""
    out = F.linear(rows, weight, bias)
    if at is None:
        return out
    return out.index_select(0, at.index.reshape(-1)).view(*at.index.shape, out.shape[-1])


def _side_grad(grad: Tensor, rows: Tensor, at: _Positions | None) -> Tensor:
    """The gradient of :func:`_side`'s output before its bias, from the pairs' ``grad``
    (..., width): summed over the pairs each row was broadcast or gathered to."""
    width = grad.shape[-1]
    if at is None:
        return grad.sum_to_size(*rows.shape[:-1], width)
    # Every pair's row straight into its row of ``rows``, the index broadcast to the pairs
    # (a user's (B, 1) positions against its 1 + n items): one pass, where summing over the
    # items first (sum_to_size) and then scattering took 175 against 130 us for a default
    # step's users.
    index = at.index.expand(grad.shape[:-1]).reshape(-1)
    return at.kernels.scatter_rows(index, grad.reshape(-1, width), rows.shape[0])


class _Gather(torch.autograd.Function):
    """``rows[index]`` (*index.shape, D), whose backward sums the pairs' gradients into the
    rows with ``kernels.scatter_rows``. Autograd's own backward of ``index_select`` is
    ``index_add_``, about 14 ns a row whatever the width here (280 us for the 20,480 pairs
    of a default NCF step, one thread); the native scatter_rows takes a fraction of that."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, kernels: ModuleType) -> Tensor:
        ctx.save_for_backward(index)
        ctx.kernels, ctx.num_rows = kernels, rows.shape[0]
        return rows.index_select(0, index.reshape(-1)).view(*index.shape, rows.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        return ctx.kernels.scatter_rows(index.reshape(-1), rows, ctx.num_rows), None, None


class _WeightedDot(torch.autograd.Function):
    """``h·(p[user_at] ⊙ q[item_at])`` (*item_at.shape,): GMF's logit before its bias, for
    the pairs of a training step over the distinct rows ``p`` (U, D) and ``q`` (I, D),
    ``user_at`` (B, 1) against ``item_at`` (B, 1 + n), ``h`` (D,).

    The forward is the tables' backend's ``mf_forward`` on the rows ``p ⊙ h`` (U rows, not
    one per pair); the backward sums each pair's two gradient rows into the distinct rows
    with ``mf_backward_dense`` (the rows never formed) and only then multiplies by ``h``:
    ``dp = h ⊙ Σ g q``, ``dq = h ⊙ Σ g p``, ``dh = Σ_rows q ⊙ (Σ g p)``. Through
    autograd the gathers, the broadcast product and the matmul with ``h`` made about ten
    passes over (pairs, D) blocks: at a default NeuMF step's shape (20,480 pairs of 8
    columns over 610 users and 8,500 items) forward and backward took 1.19 ms, against
    0.79 ms this way (one thread, medians of 50)."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, h: Tensor, user_at: _Positions,
                item_at: _Positions) -> Tensor:
        shape = _broadcast_shape(user_at.index.shape, item_at.index.shape)
        at_user = user_at.index.expand(shape).reshape(-1)
        at_item = item_at.index.expand(shape).reshape(-1)
        kernels = user_at.kernels
        out = kernels.mf_forward(at_user, at_item, p * h, q, None, None, 0.0)
        ctx.save_for_backward(p, q, h, at_user, at_item)
        ctx.kernels = kernels
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, q, h, at_user, at_item = ctx.saved_tensors
        kernels, needs = ctx.kernels, ctx.needs_input_grad
        # Σ g q per user, Σ g p per item
        sum_q, sum_p = kernels.mf_backward_dense(grad.reshape(-1).contiguous(), at_user,
                                                 at_item, p, q)
        grad_p = sum_q.mul_(h) if needs[0] else None
        grad_h = (q * sum_p).sum(0) if needs[2] else None
        grad_q = sum_p.mul_(h) if needs[1] else None
        return grad_p, grad_q, grad_h, None, None


def _gather(rows: Tensor, at: _Positions | None) -> Tensor:
    """``rows[at.index]`` (*at.index.shape, D); ``rows`` itself when ``at`` is None."""
    if at is None:
        return rows
    return _Gather.apply(rows, at.index, at.kernels)


def _dense_params(layers: nn.ModuleList) -> list[Tensor]:
    """``W_1, b_1, W_2, b_2, ...``: the hidden layers' parameters as :class:`_Tower` takes
    them."""
    return [t for layer in layers for t in (layer.weight, layer.bias)]


def _mlp_tower(layers: nn.ModuleList, dropout: float, training: bool, p: Tensor,
               q: Tensor) -> Tensor:
    """The MLP tower on user rows ``p`` (..., D) and item rows ``q`` (..., D), broadcast
    against each other: relu layers over ``[p, q]``, (..., layers[-1]). Used with dropout
    in training (and with no hidden layer); otherwise :class:`_Tower` runs the tower."""
    shape = torch.broadcast_shapes(p.shape, q.shape)
    z = torch.cat([p.expand(shape), q.expand(shape)], -1)
    for layer in layers:
        # Dropout masks each (user, item) pair's input on its own, as the textbook model does.
        z = torch.relu(layer(F.dropout(z, dropout, training) if dropout else z))
    return z


def _layer_penalty(hidden: nn.ModuleList, layer_reg: float) -> Tensor | float:
    """``layer_reg`` · the sum of squares of the hidden weights (Keras' ``l2``, as the
    paper's code regularises its dense layers; biases are left alone)."""
    if not layer_reg or not len(hidden):
        return 0.0
    return layer_reg * sum(layer.weight.pow(2).sum() for layer in hidden)


def _check_layer_reg(op: str, layer_reg) -> float:
    if (isinstance(layer_reg, bool) or not isinstance(layer_reg, int | float | np.floating)
            or not math.isfinite(float(layer_reg)) or float(layer_reg) < 0):
        raise ValueError(f"fastmf.models.{op}: layer_reg must be a finite float >= 0, got "
                         f"{layer_reg!r}")
    return float(layer_reg)


class _NCF(Recommender):
    """What the three models share: forward over broadcast ids, the training step, scoring,
    the optimizer."""

    losses = ("bce", "bpr")
    default_loss = "bce"
    # Its step never reads them: batches() need not shuffle them every epoch.
    uses_timestamps = False
    # Chosen on inner validation splits only (leave-one-out by time inside the training part
    # of ml-latest-small: all users, the heavier half, the lighter half; never the reported
    # test rows): `python benchmarks/ncf.py --tune`, benchmarks/README.md "Neural
    # collaborative filtering". Tables: SparseAdam in backward (make_optimizer's default
    # here); the batch is 16x the paper's 256, which is where the speed comes from.
    defaults: ClassVar[dict] = {"implicit": dict(lr=0.01, reg=0.0, epochs=20, batch_size=4096)}
    dense_lr: ClassVar[float] = 0.005

    def _embed(self, users: Tensor, items: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
        """(user rows, item rows) of each tower for ids of broadcastable shapes."""
        raise NotImplementedError

    def _head(self, rows: tuple[tuple[Tensor, Tensor], ...], user_at: _Positions | None = None,
              item_at: _Positions | None = None) -> Tensor:
        """Logits from the rows :meth:`_embed` looked up, broadcast against each other; with
        ``user_at`` / ``item_at``, the pairs are those rows gathered by them."""
        raise NotImplementedError

    def _logits(self, users: Tensor, items: Tensor) -> Tensor:
        return self._head(self._embed(users, items))

    def forward(self, users, items) -> Tensor:
        """``users``, ``items``: (B,) int32/int64 ids -> logits (B,)."""
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        if users.dim() != 1 or users.shape != items.shape:
            raise ValueError(f"{self._op()}: users and items must be 1-D of the same length, "
                             f"got {tuple(users.shape)} and {tuple(items.shape)}")
        return self._logits(users, items)

    def _widest(self) -> int:
        """The widest per-pair intermediate of the head (bounds score_items' chunks)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_items(self, users, items) -> Tensor:
        """Logits of every user in ``users`` (B,) against every item in ``items`` (M,):
        (B, M). Each side's embeddings (and its half of the MLP's first layer) are computed
        once per call and broadcast, in chunks of users whose (users, items, width)
        intermediates hold about ``SCORE_CHUNK`` numbers."""
        users = self.as_ids(users, "users").reshape(-1)
        items = self.as_ids(items, "items").reshape(-1)
        out = torch.empty((len(users), len(items)), dtype=self._param_dtype(),
                          device=self._param_device())
        if out.numel() == 0:
            return out
        rows = max(1, SCORE_CHUNK // (len(items) * self._widest()))
        prepared = self._item_side(items)
        for lo in range(0, len(users), rows):
            out[lo:lo + rows] = self._grid(users[lo:lo + rows], items, prepared)
        return out

    def _uses_tower(self) -> bool:
        """Whether the MLP tower runs as :class:`_Tower` (hidden layers, no active
        dropout)."""
        return bool(len(self.hidden)) and not (self.dropout and self.training)

    def _item_side(self, items: Tensor):
        """What :meth:`score_items` computes once per call for ``items`` (None: nothing)."""
        return None

    def _grid(self, users: Tensor, items: Tensor, prepared) -> Tensor:
        """Logits (R, M) of ``users`` (R,) against ``items`` (M,)."""
        return self._logits(users.unsqueeze(1), items.unsqueeze(0))

    def make_optimizer(self, name: str | None, lr: float):
        """The base class's optimizer (tables in backward, ``torch.optim.Adam`` at
        ``dense_lr`` for the layers) with Adam on the tables by default, as the paper
        trains NCF. The layers' Adam is torch's fused one where it runs (about a quarter of
        the per-step cost of the default loop over NCF's eight small tensors on CPU)."""
        combined = super().make_optimizer(name or "adam", lr)
        parts = list(combined.optimizers)
        for k, part in enumerate(parts):
            if type(part) is torch.optim.Adam and not part.state:
                params = [p for group in part.param_groups for p in group["params"]]
                try:
                    parts[k] = torch.optim.Adam(params, lr=self.dense_lr, fused=True)
                except (RuntimeError, ValueError):  # a device or dtype without the kernel
                    return combined
                return CombinedOptimizer(parts)
        return combined

    def _config(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items,
                "dtype": str(self._param_dtype()).removeprefix("torch.")}

    def _dense_l2(self) -> Tensor | float:
        """The L2 penalty on the hidden layers' weights (the paper's ``reg_layers``)."""
        return 0.0

    def training_step(self, batch, optimizer, *, loss: str, reg: float) -> tuple[Tensor, int]:
        """One update on ``batch`` (``users`` (B,), ``items`` (B,), ``negatives`` (B, n),
        optional ``weights`` (B,)), with the numbers of the base class's step: ``"bce"``
        labels each positive 1 and each negative 0 (mean over the B·(1+n) pairs), ``"bpr"``
        is ``-log σ(x_ui - x_uj)`` (mean over the B·n pairs); plus ``reg`` · the squared
        norms of the table rows looked up (a user's rows once per scored pair) / B; plus
        the hidden layers' L2 (``layer_reg``). Each distinct user and item of the batch is
        looked up (and put through its half of the MLP's first layer) once, then gathered
        for its pairs: the same gradients, with fewer rows through the tables and the
        first layer (about 8,600 distinct items among the 20,480 pairs of a default step on
        ml-latest-small; at most 610 users among its 4,096). Returns (the loss, detached,
        the pairs scored)."""
        op = self._op("training_step")
        if loss not in self.losses:
            raise ValueError(f"{op}: unsupported loss {loss!r}; expected one of {self.losses}")
        if batch.negatives is None or batch.negatives.dim() != 2:
            raise ValueError(f"{op}: loss {loss!r} needs negatives (B, n)")
        items = torch.cat([batch.items.unsqueeze(1), batch.negatives.to(batch.items.dtype)], 1)
        size, n = items.shape[0], items.shape[1] - 1
        users, user_index = unique_ids(batch.users.unsqueeze(1), self.num_users)
        items, item_index = unique_ids(items, self.num_items)
        rows = self._embed(users, items)
        kernels = table_kernels(self, users.device)
        logits = self._head(rows, _Positions(user_index, kernels),
                            _Positions(item_index, kernels))
        if loss == "bce":
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            weights = None
            if batch.weights is not None:
                weights = torch.ones_like(logits)
                weights[:, 0] = batch.weights.to(logits.dtype)
                weights = weights.reshape(-1)
            value = pointwise_loss(logits.reshape(-1), labels.reshape(-1), "bce", weights)
            count = size * (n + 1)
        else:
            value = pairwise_loss(logits[:, 0], logits[:, 1:], "bpr", batch.weights)
            count = size * n
        if reg and size:
            # Each distinct row once, weighted by how often the batch looked it up.
            user_count = torch.bincount(user_index.reshape(-1), minlength=len(users))
            item_count = torch.bincount(item_index.reshape(-1), minlength=len(items))
            penalty = sum((n + 1) * (user_count * pu.square().sum(-1)).sum()
                          + (item_count * qi.square().sum(-1)).sum() for pu, qi in rows)
            value = value + reg * penalty / size
        value = value + self._dense_l2()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return value.detach(), count


@checkpoint.register_model
class GMF(_NCF):
    """Generalized matrix factorization: ``logit = h·(P[u] ⊙ Q[i]) + b``.

    ``user_embedding`` (num_users, dim), ``item_embedding`` (num_items, dim):
    :class:`fastmf.nn.Embedding`; ``output``: ``nn.Linear(dim, 1)`` (h and b).

    >>> import torch, fastmf
    >>> model = fastmf.models.GMF(100, 50, dim=8)
    >>> model(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
    torch.Size([2])
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 8, *, backend: str = "auto",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        num_users = _positive_int("GMF", "num_users", num_users)
        num_items = _positive_int("GMF", "num_items", num_items)
        dim = _positive_int("GMF", "dim", dim)
        dtype = _check_dtype("GMF", dtype)
        self.user_embedding = _table(num_users, dim, backend, device, dtype)
        self.item_embedding = _table(num_items, dim, backend, device, dtype)
        self.output = _output_layer(dim, device, dtype)

    @property
    def num_users(self) -> int:
        return self.user_embedding.num_embeddings

    @property
    def num_items(self) -> int:
        return self.item_embedding.num_embeddings

    @property
    def dim(self) -> int:
        return self.user_embedding.dim

    test_config: ClassVar[dict] = {"dim": 4}

    def get_config(self) -> dict:
        return {**self._config(), "dim": self.dim}

    def _widest(self) -> int:
        return self.dim

    def _embed(self, users, items):
        return ((self.user_embedding(users), self.item_embedding(items)),)

    def _head(self, rows, user_at=None, item_at=None):
        (p, q), = rows
        if user_at is not None and item_at is not None:
            return _WeightedDot.apply(p, q, self.output.weight[0], user_at,
                                      item_at).add(self.output.bias[0])
        p, q = _gather(p, user_at), _gather(q, item_at)
        return F.linear(p * q, self.output.weight, self.output.bias).squeeze(-1)

    def user_vectors(self, users) -> tuple[Tensor, Tensor]:
        """``(P[u] ⊙ h (B, dim), b (B,))``: the logit is ``<P[u] ⊙ h, Q[i]> + b``."""
        users = self.as_ids(users, "users").reshape(-1)
        vectors = self.user_embedding(users) * self.output.weight[0]
        return vectors, self.output.bias.expand(users.shape[0])

    def item_vectors(self) -> tuple[Tensor, None]:
        """``(Q (num_items, dim), None)``: no per-item bias."""
        return self.item_embedding.weight, None


@checkpoint.register_model
class MLP(_NCF):
    """The NCF multi-layer perceptron: ``z = [P[u], Q[i]]``, then ``relu(W z + b)`` for each
    size in ``layers[1:]``, ``logit = h·z + b``.

    ``layers[0]`` is the width of the concatenated embeddings: ``user_embedding``
    (num_users, layers[0] // 2) and ``item_embedding`` (num_items, layers[0] // 2), as in the
    paper's code. ``hidden`` holds the ``nn.Linear`` layers, ``output`` the last one.

    >>> import torch, fastmf
    >>> model = fastmf.models.MLP(100, 50, layers=(64, 32, 16, 8))
    >>> model.user_embedding.dim, [layer.out_features for layer in model.hidden]
    (32, [32, 16, 8])
    """

    def __init__(self, num_users: int, num_items: int, layers: Sequence[int] = (64, 32, 16, 8),
                 dropout: float = 0.0, *, layer_reg: float = 0.0, backend: str = "auto",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        num_users = _positive_int("MLP", "num_users", num_users)
        num_items = _positive_int("MLP", "num_items", num_items)
        self.layers = _check_layers("MLP", layers)
        self.dropout = _check_dropout("MLP", dropout)
        self.layer_reg = _check_layer_reg("MLP", layer_reg)
        dtype = _check_dtype("MLP", dtype)
        half = self.layers[0] // 2
        self.user_embedding = _table(num_users, half, backend, device, dtype)
        self.item_embedding = _table(num_items, half, backend, device, dtype)
        self.hidden = _hidden_layers(self.layers, device, dtype)
        self.output = _output_layer(self.layers[-1], device, dtype)

    num_users = GMF.num_users
    num_items = GMF.num_items

    test_config: ClassVar[dict] = {"layers": (8, 4), "dropout": 0.1}

    def get_config(self) -> dict:
        return {**self._config(), "layers": list(self.layers), "dropout": self.dropout,
                "layer_reg": self.layer_reg}

    def _embed(self, users, items):
        return ((self.user_embedding(users), self.item_embedding(items)),)

    def _head(self, rows, user_at=None, item_at=None):
        (p, q), = rows
        if self._uses_tower():
            return _Tower.apply(p, q, user_at, item_at, self.output.weight,
                                self.output.bias, *_dense_params(self.hidden))
        p, q = _gather(p, user_at), _gather(q, item_at)
        z = _mlp_tower(self.hidden, self.dropout, self.training, p, q)
        return F.linear(z, self.output.weight, self.output.bias).squeeze(-1)

    def _dense_l2(self):
        return _layer_penalty(self.hidden, self.layer_reg)

    def _widest(self) -> int:
        return max(self.layers)

    def _item_side(self, items):
        if not self._uses_tower():
            return None
        q = self.item_embedding(items)
        return F.linear(q, self.hidden[0].weight[:, q.shape[-1]:])

    def _grid(self, users, items, prepared):
        if prepared is None:
            return super()._grid(users, items, prepared)
        return _tower_grid(self.hidden, self.user_embedding(users), prepared,
                           self.output.weight, self.output.bias)


@checkpoint.register_model
class NeuMF(_NCF):
    """Neural matrix factorization: a GMF tower (``gmf_dim``) and an MLP tower (``layers``,
    ``dropout``), each with its own user and item tables, joined by one output layer:
    ``logit = h·[P_g[u] ⊙ Q_g[i], MLP(P_m[u], Q_m[i])] + b``.

    Tables ``gmf_user_embedding``, ``gmf_item_embedding`` (gmf_dim wide),
    ``mlp_user_embedding``, ``mlp_item_embedding`` (layers[0] // 2 wide); ``hidden`` the
    MLP's ``nn.Linear`` layers; ``output`` ``nn.Linear(gmf_dim + layers[-1], 1)``.

    >>> import torch, fastmf
    >>> gmf = fastmf.models.GMF(100, 50, dim=8)
    >>> mlp = fastmf.models.MLP(100, 50, layers=(32, 16, 8))
    >>> model = fastmf.models.NeuMF.from_pretrained(gmf, mlp, alpha=0.5)
    >>> model.output.in_features
    16
    """

    def __init__(self, num_users: int, num_items: int, gmf_dim: int = 8,
                 layers: Sequence[int] = (64, 32, 16, 8), dropout: float = 0.0, *,
                 layer_reg: float = 0.0, backend: str = "auto", device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        num_users = _positive_int("NeuMF", "num_users", num_users)
        num_items = _positive_int("NeuMF", "num_items", num_items)
        gmf_dim = _positive_int("NeuMF", "gmf_dim", gmf_dim)
        self.layers = _check_layers("NeuMF", layers)
        self.dropout = _check_dropout("NeuMF", dropout)
        self.layer_reg = _check_layer_reg("NeuMF", layer_reg)
        dtype = _check_dtype("NeuMF", dtype)
        half = self.layers[0] // 2
        self.gmf_user_embedding = _table(num_users, gmf_dim, backend, device, dtype)
        self.gmf_item_embedding = _table(num_items, gmf_dim, backend, device, dtype)
        self.mlp_user_embedding = _table(num_users, half, backend, device, dtype)
        self.mlp_item_embedding = _table(num_items, half, backend, device, dtype)
        self.hidden = _hidden_layers(self.layers, device, dtype)
        self.output = _output_layer(gmf_dim + self.layers[-1], device, dtype)

    @property
    def num_users(self) -> int:
        return self.gmf_user_embedding.num_embeddings

    @property
    def num_items(self) -> int:
        return self.gmf_item_embedding.num_embeddings

    @property
    def gmf_dim(self) -> int:
        return self.gmf_user_embedding.dim

    test_config: ClassVar[dict] = {"gmf_dim": 4, "layers": (8, 4)}
    # As the other models' (see _NCF), but its validation HR peaked at 12 epochs.
    defaults: ClassVar[dict] = {"implicit": dict(lr=0.01, reg=0.0, epochs=12, batch_size=4096)}

    def get_config(self) -> dict:
        return {**self._config(), "gmf_dim": self.gmf_dim, "layers": list(self.layers),
                "dropout": self.dropout, "layer_reg": self.layer_reg}

    def _embed(self, users, items):
        return ((self.gmf_user_embedding(users), self.gmf_item_embedding(items)),
                (self.mlp_user_embedding(users), self.mlp_item_embedding(items)))

    def _dense_l2(self):
        return _layer_penalty(self.hidden, self.layer_reg)

    def _widest(self) -> int:
        return max(self.gmf_dim, *self.layers)

    def _item_side(self, items):
        if not self._uses_tower():
            return None
        q = self.mlp_item_embedding(items)
        return self.gmf_item_embedding(items), F.linear(q, self.hidden[0].weight[:, q.shape[-1]:])

    def _grid(self, users, items, prepared):
        if prepared is None:
            return super()._grid(users, items, prepared)
        gmf_items, item_half = prepared
        w, g = self.output.weight, self.gmf_dim
        # h_g·(p ⊙ q) = (p ⊙ h_g)·q: the GMF part of the whole grid is one matmul.
        gmf = (self.gmf_user_embedding(users) * w[0, :g]) @ gmf_items.t()
        return gmf + _tower_grid(self.hidden, self.mlp_user_embedding(users), item_half,
                                 w[:, g:], self.output.bias)

    def _head(self, rows, user_at=None, item_at=None):
        (pg, qg), (pm, qm) = rows
        # h·[a, b] = h_a·a + h_b·b: no (.., gmf_dim + layers[-1]) concatenation is built.
        w, g = self.output.weight, self.gmf_dim
        if user_at is not None and item_at is not None:
            gmf = _WeightedDot.apply(pg, qg, w[0, :g], user_at, item_at)
        else:
            gmf = torch.matmul(_gather(pg, user_at) * _gather(qg, item_at), w[0, :g])
        if self._uses_tower():
            return gmf + _Tower.apply(pm, qm, user_at, item_at, w[:, g:],
                                      self.output.bias, *_dense_params(self.hidden))
        pm, qm = _gather(pm, user_at), _gather(qm, item_at)
        mlp = _mlp_tower(self.hidden, self.dropout, self.training, pm, qm)
        return gmf + F.linear(mlp, w[:, g:], self.output.bias).squeeze(-1)

    @classmethod
    def from_pretrained(cls, gmf: GMF, mlp: MLP, alpha: float = 0.5, *,
                        gmf_dim: int | None = None, layers: Sequence[int] | None = None,
                        backend: str = "auto") -> NeuMF:
        """A NeuMF started from trained towers, as the paper pretrains it: the GMF tables
        from ``gmf``, the MLP tables and hidden layers from ``mlp``, and the output layer
        ``h = [alpha·h_GMF, (1 - alpha)·h_MLP]``, ``b = alpha·b_GMF + (1 - alpha)·b_MLP``,
        so its logit is ``alpha·gmf(u, i) + (1 - alpha)·mlp(u, i)``. ``dropout``,
        ``layer_reg``, device and dtype come from ``mlp``. ``gmf_dim`` and ``layers``, when
        given, are the architecture the caller expects: the towers must have it.

        Raises TypeError for towers of the wrong class; ValueError for ``alpha`` outside
        [0, 1], towers that disagree on num_users/num_items, device or dtype, towers whose
        tensors do not have their own config's shapes, or towers other than ``gmf_dim`` /
        ``layers``.
        """
        op = "fastmf.models.NeuMF.from_pretrained"
        if not isinstance(gmf, GMF):
            raise TypeError(f"{op}: gmf must be a fastmf.models.GMF, got {type(gmf).__name__}")
        if not isinstance(mlp, MLP):
            raise TypeError(f"{op}: mlp must be a fastmf.models.MLP, got {type(mlp).__name__}")
        if (isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating)
                or not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"{op}: alpha must be a float in [0, 1], got {alpha!r}")
        for name in ("num_users", "num_items"):
            if getattr(gmf, name) != getattr(mlp, name):
                raise ValueError(f"{op}: gmf has {name}={getattr(gmf, name)} but mlp has "
                                 f"{name}={getattr(mlp, name)}")
        if gmf_dim is not None and gmf_dim != gmf.dim:
            raise ValueError(f"{op}: gmf_dim={gmf_dim!r} but gmf has dim={gmf.dim}")
        if layers is not None and tuple(layers) != mlp.layers:
            raise ValueError(f"{op}: layers={tuple(layers)!r} but mlp has "
                             f"layers={mlp.layers}")
        _check_shapes(op, "gmf", gmf, GMF(1, 1, gmf.dim, device="meta"), gmf.num_users,
                      gmf.num_items)
        _check_shapes(op, "mlp", mlp, MLP(1, 1, mlp.layers, device="meta"), mlp.num_users,
                      mlp.num_items)
        gw, mw = gmf.output.weight, mlp.output.weight
        if (gw.device, gw.dtype) != (mw.device, mw.dtype):
            raise ValueError(f"{op}: gmf is {gw.dtype} on {gw.device} but mlp is {mw.dtype} "
                             f"on {mw.device}")
        alpha = float(alpha)
        model = cls(gmf.num_users, gmf.num_items, gmf.dim, mlp.layers, mlp.dropout,
                    layer_reg=mlp.layer_reg, backend=backend, device=mw.device,
                    dtype=mw.dtype)
        with torch.no_grad():
            model.gmf_user_embedding.weight.copy_(gmf.user_embedding.weight)
            model.gmf_item_embedding.weight.copy_(gmf.item_embedding.weight)
            model.mlp_user_embedding.weight.copy_(mlp.user_embedding.weight)
            model.mlp_item_embedding.weight.copy_(mlp.item_embedding.weight)
            model.hidden.load_state_dict(mlp.hidden.state_dict())
            model.output.weight.copy_(torch.cat([alpha * gw, (1.0 - alpha) * mw], 1))
            model.output.bias.copy_(alpha * gmf.output.bias + (1.0 - alpha) * mlp.output.bias)
        return model


def _check_shapes(op: str, name: str, tower: nn.Module, expected: nn.Module, num_users: int,
                  num_items: int) -> None:
    """Every tensor of ``tower`` has the shape its config gives (``expected``, a 1 x 1
    model of the same config on the meta device, its table rows scaled up): a tower whose
    layers or tables were swapped after construction is refused, not copied in part."""
    mine = tower.state_dict()
    for key, tensor in expected.state_dict().items():
        shape = tuple(tensor.shape)
        if key.endswith("user_embedding.weight"):
            shape = (num_users, *shape[1:])
        elif key.endswith("item_embedding.weight"):
            shape = (num_items, *shape[1:])
        found = tuple(mine[key].shape) if key in mine else None
        if found != shape:
            raise ValueError(f"{op}: {name}.{key} has shape {found}, but its config "
                             f"({type(tower).__name__}) gives {shape}")
