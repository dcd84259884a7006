"""Sharded versions of fastmf's embedding tables and :func:`shard`, which swaps them in."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastmf.layers import MF
from fastmf.memory import empty_table
from fastmf.nn.embedding import Embedding, EmbeddingBag
from fastmf.ops import checks
from fastmf.ops.codes import HUBER_DELTA, Loss, PairwiseLoss
from fastmf.recommender import IMPLICIT, Batch, Recommender
from fastmf.step import _fused_optimizer, _parse_loss

from .routing import Route, local_rows, split_columns, timings, world

__all__ = ["ShardedEmbedding", "ShardedEmbeddingBag", "ShardedMF", "is_sharded", "loss_share",
           "shard", "sync_dense_grads", "local_slice"]

_SHARD_DTYPES = (torch.float32, torch.float64)


class ShardInfo:
    """What a sharded parameter records: the global row count and the map it follows."""

    def __init__(self, num_rows: int, rank: int, world_size: int):
        self.num_rows, self.rank, self.world_size = num_rows, rank, world_size


def is_sharded(param: Tensor) -> bool:
    """True for a parameter created by :func:`shard` (a local row shard)."""
    return getattr(param, "fastmf_shard", None) is not None


class _Share:
    """The weight of this rank's loss in the global loss while :func:`loss_share` is on."""

    value = 1.0


_SHARE = _Share()


@contextmanager
def loss_share(fraction: float):
    """Within this block, sharded lookups scale the gradient rows they send to the owners
    by ``fraction`` (and :func:`sync_dense_grads` the dense gradients): a rank whose loss is
    the MEAN over its ``b`` samples of a global batch of ``B`` passes ``b / B``, which
    turns its loss into its share of the global mean. ``fastmf.fit`` uses it, so a model's
    ordinary ``training_step`` (a mean over the batch it is given) trains exactly as one
    process on the whole batch."""
    previous = _SHARE.value
    _SHARE.value = float(fraction)
    try:
        yield
    finally:
        _SHARE.value = previous


def _check_table(who: str, name: str, weight: Tensor, world_size: int) -> None:
    if weight.dtype not in _SHARD_DTYPES:
        raise TypeError(f"fastmf.distributed.shard: {who}.{name} is {weight.dtype}; sharded "
                        "tables must be float32 or float64")
    if weight.shape[0] < world_size:
        raise ValueError(f"fastmf.distributed.shard: {who}.{name} has {weight.shape[0]} rows, "
                         f"fewer than the world size {world_size}: every rank must own at "
                         "least one row")


def _shard_param(weight: Tensor, rank: int, world_size: int, init_scale: float | None,
                 generator_seed: int, device) -> nn.Parameter:
    """This rank's rows of ``weight`` as a new parameter. A weight on the meta device (a
    model built without memory) gets its rows allocated here: uniform(-init_scale,
    init_scale) from a generator seeded by (seed, rank), or zeros when init_scale is None."""
    n = local_rows(weight.shape[0], rank, world_size)
    if weight.is_meta:
        device = device if device is not None else "cpu"
        data = empty_table((n, *weight.shape[1:]), dtype=weight.dtype, device=device)
        if init_scale is None:
            data.zero_()
        else:
            gen = torch.Generator(device=device).manual_seed(generator_seed * 1_000_003 + rank)
            data.uniform_(-init_scale, init_scale, generator=gen)
    else:
        data = weight.detach()[rank::world_size].clone()
        if device is not None:
            data = data.to(device)
    param = nn.Parameter(data)
    param.fastmf_shard = ShardInfo(weight.shape[0], rank, world_size)
    return param


class _ShardedLookup(torch.autograd.Function):
    """Rows of the sharded ``weights`` for ``route``'s ids; the backward sends the gradient
    rows to their owners, each weight's gradient a sparse COO tensor of its local shard with
    one row per received id, in the global batch's order (uncoalesced, like
    nn.Embedding(sparse=True)): the fastmf sparse optimizers sum them in that order."""

    @staticmethod
    def forward(ctx, route: Route, *weights):
        ctx.route = route
        ctx.scale = _SHARE.value
        ctx.shapes = [(w.shape, w.dtype) for w in weights]
        return route.gather([w.detach() for w in weights])

    @staticmethod
    def backward(ctx, grad):
        route = ctx.route
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        rows = route.scatter(grad.contiguous())
        grads, start = [], 0
        ids = route.local_ids.unsqueeze(0)
        for shape, dtype in ctx.shapes:
            width = 1 if len(shape) == 1 else shape[1]
            part = rows[:, start:start + width]
            part = part.reshape(-1) if len(shape) == 1 else part
            start += width
            grads.append(torch.sparse_coo_tensor(ids, part.to(dtype).contiguous(), shape,
                                                 is_coalesced=False, check_invariants=False))
        return (None, *grads)


def _lookup(route: Route, weights: list[Tensor]) -> list[Tensor]:
    return split_columns(_ShardedLookup.apply(route, *weights), weights)


class _ShardedTable(nn.Module):
    # Like fastmf.nn's tables: the default training step penalises its outputs.
    is_embedding_table = True

    def __init__(self, source, group, device, seed: int):
        super().__init__()
        self.group = group
        rank, w = world(group)
        who = type(source).__name__
        _check_table(who, "weight", source.weight, w)
        self.num_embeddings, self.dim = source.num_embeddings, source.dim
        self.backend, self.init_scale = source.backend, source.init_scale
        self.rank, self.world_size = rank, w
        self.weight = _shard_param(source.weight, rank, w, source.init_scale, seed, device)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.dim}, rows {self.weight.shape[0]} on rank "
                f"{self.rank} of {self.world_size} (row g on rank g % {self.world_size})")


class ShardedEmbedding(_ShardedTable):
    """:class:`fastmf.nn.Embedding` with its rows sharded over a process group (built by
    :func:`shard`). ``forward(ids)`` is a collective: every rank of the group must call it
    in the same order, and every rank's loss must depend on the result so that the backward
    (also a collective) runs everywhere."""

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype not in checks.ID_DTYPES:
            raise TypeError("fastmf.distributed.ShardedEmbedding: ids must be an int32/int64 "
                            f"tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        route = Route([ids], self.num_embeddings, self.group, "ShardedEmbedding")
        (rows,) = _lookup(route, [self.weight])
        return rows.view(*ids.shape, self.dim)


class ShardedEmbeddingBag(_ShardedTable):
    """:class:`fastmf.nn.EmbeddingBag` with its rows sharded over a process group: the
    ids are routed, the owners send their rows, and the bags are pooled locally
    (``torch.nn.functional.embedding_bag`` over the gathered rows, so per-sample weights get
    their gradient too). Same calling rules as :class:`ShardedEmbedding`."""

    def __init__(self, source: EmbeddingBag, group, device, seed: int):
        super().__init__(source, group, device, seed)
        self.mode, self.include_last_offset = source.mode, source.include_last_offset

    def forward(self, ids: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        op = "distributed.ShardedEmbeddingBag"
        if not isinstance(ids, Tensor) or ids.dtype not in checks.ID_DTYPES:
            raise TypeError(f"fastmf.{op}: ids must be an int32/int64 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(f"fastmf.{op}: per_sample_weights is only supported with "
                                 f"mode='sum', got mode={self.mode!r}")
            if per_sample_weights.shape != ids.shape:
                raise ValueError(f"fastmf.{op}: per_sample_weights has shape "
                                 f"{tuple(per_sample_weights.shape)}, expected "
                                 f"{tuple(ids.shape)} like ids")
            per_sample_weights = per_sample_weights.reshape(-1).to(self.weight.dtype)
        # The bag structure follows fastmf.nn.EmbeddingBag exactly (same checks, same CSR).
        flat, offsets = EmbeddingBag._bags(self, op, ids, offsets)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights[:flat.shape[0]]
        route = Route([flat], self.num_embeddings, self.group, "ShardedEmbeddingBag")
        (rows,) = _lookup(route, [self.weight])
        positions = torch.arange(flat.shape[0], device=flat.device)
        return F.embedding_bag(positions, rows, offsets.long(), mode=self.mode,
                               per_sample_weights=per_sample_weights, include_last_offset=True)


def apply_sparse(optimizer, param: Tensor, ids: Tensor, rows: Tensor) -> None:
    """One step of a fastmf sparse optimizer on ``param`` with gradient rows ``rows`` for
    local rows ``ids`` (duplicates summed in order), advancing the parameter's step count as
    ``optimizer.step()`` would."""
    group = optimizer.hyperparameters(param)
    step = optimizer._next_step(param)
    optimizer.sparse_step(param, group, ids, rows.contiguous(), step)
    optimizer.state[param]["step"] = step


class ShardedMF(Recommender):
    """:class:`fastmf.MF` with its four tables row-sharded over a process group (built by
    :func:`shard`). ``forward(users, items)`` and the fused :meth:`train_step` /
    :meth:`train_step_pairwise` are collectives: every rank calls them with its own slice of
    the global batch (possibly empty).

    A :class:`fastmf.models.base.Recommender` for :func:`fastmf.fit`'s training hooks
    (``make_optimizer`` and ``training_step`` are MF's, on the sharded fused steps); scoring
    and ``recommend`` need the full tables (``fastmf.distributed.fit.gather_model``)."""

    losses = ("mse", "huber", "bce", "bpr")  # what the sharded fused steps run
    default_loss = "mse"

    def __init__(self, source: MF, group, device, seed: int):
        super().__init__()
        self.group = group
        rank, w = world(group)
        self.rank, self.world_size = rank, w
        for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
            table = getattr(source, name)
            if table is None:
                self.register_parameter(name, None)
                continue
            _check_table("MF", name, table, w)
            init = source.init_scale if name.endswith("factors") else None
            setattr(self, name, _shard_param(table, rank, w, init, seed + len(name), device))
        self.register_buffer("global_mean", source.global_mean.detach().clone()
                             if not source.global_mean.is_meta
                             else torch.tensor(source.mu, dtype=source.user_factors.dtype))
        self._global_mean_value = source.mu
        self.num_users, self.num_items, self.dim = source.num_users, source.num_items, source.dim
        self.has_bias, self.init_scale = source.has_bias, source.init_scale
        self.backend, self.sparse = source.backend, True

    @property
    def mu(self) -> float:
        return self._global_mean_value

    @classmethod
    def public_name(cls) -> str:
        return "fastmf.distributed.ShardedMF"

    def set_global_mean(self, value: float) -> None:
        self._global_mean_value = float(value)
        self.global_mean.fill_(float(value))

    def get_config(self) -> dict:
        """The config of the :class:`fastmf.MF` this model shards."""
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "bias": self.has_bias, "global_mean": self.mu, "sparse": False,
                "init_scale": self.init_scale,
                "dtype": str(self.user_factors.dtype).removeprefix("torch.")}

    make_optimizer = MF.make_optimizer

    def training_step(self, batch: Batch, optimizer, *, loss: str,
                      reg: float) -> tuple[Tensor, int]:
        """:meth:`fastmf.MF.training_step` on the sharded fused steps: ``batch`` is this
        rank's slice of the global batch; the loss returned is the global one."""
        u, i, w = batch.users, batch.items, batch.weights
        if loss not in IMPLICIT:
            return self.train_step(optimizer, u, i, batch.targets, loss=loss, reg=reg,
                                   weights=w), len(u)
        neg = batch.negatives
        k = neg.shape[1]
        if loss == "bpr":
            return self.train_step_pairwise(optimizer, u.repeat_interleave(k),
                                            i.repeat_interleave(k), neg.reshape(-1),
                                            reg=reg, weights=None if w is None
                                            else w.repeat_interleave(k)), len(u) * k
        users = torch.cat([u, u.repeat_interleave(k)])
        items = torch.cat([i, neg.reshape(-1)])
        labels = torch.cat([torch.ones(len(u)), torch.zeros(len(u) * k)]).to(
            dtype=self.user_factors.dtype, device=u.device)
        if w is not None:  # the negatives' rows weigh 1, as in fastmf.MF.training_step
            w = torch.cat([w.to(labels.dtype), labels.new_ones(len(u) * k)])
        return self.train_step(optimizer, users, items, labels, loss="bce",
                               reg=reg, weights=w), len(users)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._global_mean_value = float(self.global_mean)

    def extra_repr(self) -> str:
        return (f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
                f"bias={self.has_bias}, rank {self.rank} of {self.world_size}")

    def tables(self):
        return self.user_factors, self.item_factors, self.user_bias, self.item_bias

    def _user_tables(self) -> list[Tensor]:
        return [self.user_factors] + ([self.user_bias] if self.has_bias else [])

    def _item_tables(self) -> list[Tensor]:
        return [self.item_factors] + ([self.item_bias] if self.has_bias else [])

    def _check_ids(self, name: str, ids) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype not in checks.ID_DTYPES:
            raise TypeError(f"fastmf.distributed.ShardedMF: {name} must be an int32/int64 "
                            f"tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        return ids.reshape(-1)

    def _check_weights(self, who: str, weights, users: Tensor) -> Tensor | None:
        """``weights`` (None, or (B,) floats like ``users``) in the tables' dtype, checked as
        the fused steps check theirs (checks.check_step_weights)."""
        if weights is None:
            return None
        if not isinstance(weights, Tensor) or not weights.is_floating_point():
            raise TypeError(f"fastmf.{who}: weights must be a floating point tensor, got "
                            f"{getattr(weights, 'dtype', type(weights).__name__)}")
        weights = weights.reshape(-1).to(self.user_factors.dtype)
        checks.check_step_weights(who, weights, self.user_factors, users)
        return weights

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        users, items = self._check_ids("users", users), self._check_ids("items", items)
        checks.check_same_length("distributed.ShardedMF", users=users, items=items)
        route_u = Route([users], self.num_users, self.group, "ShardedMF")
        route_i = Route([items], self.num_items, self.group, "ShardedMF")
        user_rows = _lookup(route_u, self._user_tables())
        item_rows = _lookup(route_i, self._item_tables())
        pred = (user_rows[0] * item_rows[0]).sum(1) + self.mu
        if self.has_bias:
            pred = pred + user_rows[1] + item_rows[1]
        return pred

    def _update(self, optimizer, route: Route, tables: list[Tensor], grad_rows: Tensor):
        rows = route.scatter(grad_rows)
        with timings.phase("update"):
            for table, part in zip(tables, split_columns(rows, tables), strict=True):
                apply_sparse(optimizer, table, route.local_ids, part)

    @torch.no_grad()
    def train_step(self, optimizer, users: Tensor, items: Tensor, targets: Tensor, *,
                   loss: str = "mse", reg: float = 0.0, weights: Tensor | None = None
                   ) -> Tensor:
        """The sharded form of :func:`fastmf.train_step` (no autograd graph): route the ids,
        gather the rows, compute each sample's gradient coefficient locally, route the
        gradient rows back, and let each owner apply ``optimizer`` (SparseAdagrad or
        SparseSGD over this model's shards) once per unique row. Each rank passes its slice
        of the global batch; the mean loss and the reg term use the global batch size, so
        the result equals one process running the whole batch. ``weights`` (None or this
        slice's (B,) finite weights >= 0) scale each sample's data term as in
        :func:`fastmf.train_step`: ``mean_b(w_b * loss_b) + reg term``. Returns the global
        loss (the same 0-d tensor on every rank)."""
        code = _parse_loss(Loss, loss, "distributed.ShardedMF.train_step")
        _fused_optimizer(self, optimizer)
        optimizer.check_groups()
        checks.check_settings("distributed.ShardedMF.train_step", reg=reg)
        users, items = self._check_ids("users", users), self._check_ids("items", items)
        checks.check_same_length("distributed.ShardedMF.train_step", users=users, items=items,
                                 targets=targets)
        targets = targets.to(self.user_factors.dtype)
        weights = self._check_weights("distributed.ShardedMF.train_step", weights, users)
        route_u = Route([users], self.num_users, self.group, "ShardedMF.train_step")
        route_i = Route([items], self.num_items, self.group, "ShardedMF.train_step")
        batch = route_u.global_batch
        if batch == 0:
            return self.user_factors.new_zeros(())
        u_tables, i_tables = self._user_tables(), self._item_tables()
        u_rows = split_columns(route_u.gather(u_tables), u_tables)
        i_rows = split_columns(route_i.gather(i_tables), i_tables)
        with timings.phase("compute"):
            p, q = u_rows[0], i_rows[0]
            pred = (p * q).sum(1) + self.mu
            per_sample = p.pow(2).sum(1) + q.pow(2).sum(1)
            if self.has_bias:
                pred = pred + u_rows[1] + i_rows[1]
                per_sample = per_sample + u_rows[1].pow(2) + i_rows[1].pow(2)
            diff = pred - targets
            if code == Loss.MSE:
                terms, dloss = diff.pow(2), 2.0 * diff
            elif code == Loss.HUBER:
                small = diff.abs() <= HUBER_DELTA
                terms = torch.where(small, 0.5 * diff.pow(2),
                                    HUBER_DELTA * (diff.abs() - 0.5 * HUBER_DELTA))
                dloss = diff.clamp(-HUBER_DELTA, HUBER_DELTA)
            else:
                terms = F.binary_cross_entropy_with_logits(pred, targets, reduction="none")
                dloss = torch.sigmoid(pred) - targets
            if weights is not None:
                terms, dloss = terms * weights, dloss * weights
            coef = (dloss / batch).unsqueeze(1)
            two_reg = 2.0 * reg / batch
            grad_u = [coef * q + two_reg * p]
            grad_i = [coef * p + two_reg * q]
            if self.has_bias:
                grad_u.append(coef + two_reg * u_rows[1].unsqueeze(1))
                grad_i.append(coef + two_reg * i_rows[1].unsqueeze(1))
            total = torch.stack([terms.sum(), per_sample.sum()])
            dist.all_reduce(total, group=self.group)
        self._update(optimizer, route_u, u_tables, torch.cat(grad_u, 1))
        self._update(optimizer, route_i, i_tables, torch.cat(grad_i, 1))
        return (total[0] + reg * total[1]) / batch

    @torch.no_grad()
    def train_step_pairwise(self, optimizer, users: Tensor, pos_items: Tensor,
                            neg_items: Tensor, *, loss: str = "bpr",
                            reg: float = 0.0, weights: Tensor | None = None) -> Tensor:
        """The sharded form of :func:`fastmf.train_step_pairwise` (BPR): as
        :meth:`train_step`, with the item ids routed as two segments (positives, then
        negatives) so each item row sums its gradients in the single-process order
        (all positives of the global batch, then all negatives). ``weights`` (None or
        this slice's (B,)) scale each sample's softplus term (the reg term is not
        weighted)."""
        who = "distributed.ShardedMF.train_step_pairwise"
        _parse_loss(PairwiseLoss, loss, who)
        _fused_optimizer(self, optimizer)
        optimizer.check_groups()
        checks.check_settings(who, reg=reg)
        users = self._check_ids("users", users)
        pos_items = self._check_ids("pos_items", pos_items)
        neg_items = self._check_ids("neg_items", neg_items)
        checks.check_same_length(who, users=users, pos_items=pos_items, neg_items=neg_items)
        weights = self._check_weights(who, weights, users)
        route_u = Route([users], self.num_users, self.group, "ShardedMF.train_step_pairwise")
        route_i = Route([pos_items, neg_items], self.num_items, self.group,
                        "ShardedMF.train_step_pairwise")
        batch = route_u.global_batch
        if batch == 0:
            return self.user_factors.new_zeros(())
        i_tables = self._item_tables()
        p = route_u.gather([self.user_factors])
        i_rows = split_columns(route_i.gather(i_tables), i_tables)
        with timings.phase("compute"):
            n = users.numel()
            qi, qj = i_rows[0][:n], i_rows[0][n:]
            x = (p * (qi - qj)).sum(1)
            per_sample = p.pow(2).sum(1) + qi.pow(2).sum(1) + qj.pow(2).sum(1)
            if self.has_bias:
                bi, bj = i_rows[1][:n], i_rows[1][n:]
                x = x + bi - bj
                per_sample = per_sample + bi.pow(2) + bj.pow(2)
            dloss, terms = -torch.sigmoid(-x), F.softplus(-x)
            if weights is not None:
                dloss, terms = dloss * weights, terms * weights
            coef = (dloss / batch).unsqueeze(1)
            two_reg = 2.0 * reg / batch
            grad_p = coef * (qi - qj) + two_reg * p
            grad_items = [torch.cat([coef * p + two_reg * qi, -coef * p + two_reg * qj])]
            if self.has_bias:
                grad_items.append(torch.cat([coef + two_reg * bi.unsqueeze(1),
                                             -coef + two_reg * bj.unsqueeze(1)]))
            total = torch.stack([terms.sum(), per_sample.sum()])
            dist.all_reduce(total, group=self.group)
        rows = route_u.scatter(grad_p)
        with timings.phase("update"):
            apply_sparse(optimizer, self.user_factors, route_u.local_ids, rows)
        self._update(optimizer, route_i, i_tables, torch.cat(grad_items, 1))
        return (total[0] + reg * total[1]) / batch


def shard(model: nn.Module, process_group=None, *, device=None, seed: int = 0) -> nn.Module:
    """Row-shard every fastmf embedding table of ``model`` over ``process_group`` (None:
    the default group); returns the model (a new :class:`ShardedMF` when ``model`` is a
    :class:`fastmf.MF`, a sharded module when it is a fastmf.nn table, else ``model`` with
    its fastmf.nn.Embedding/EmbeddingBag submodules and MF submodules replaced in place).

    Row ``g`` of a table lives on rank ``g % world_size`` (local row ``g // world_size``).
    Every rank must call this with the same architecture. A model built with real weights
    (the same seed on every rank) keeps them: each rank copies its rows, so the sharded
    model starts from exactly the single-process weights. A model built on the meta device
    (``device="meta"``; no memory for the full tables) gets its shards allocated here on
    ``device`` (default CPU) and initialised uniform(-init_scale, init_scale) from a
    generator seeded by (``seed``, rank), biases zero.

    Other parameters (an MLP) stay replicated: keep them in sync with
    :func:`sync_dense_grads` (or DDP) after each backward.

    Raises TypeError for tables that are not float32/float64, ValueError for a table with
    fewer rows than the world size.
    """
    if isinstance(model, MF):
        return ShardedMF(model, process_group, device, seed)
    if isinstance(model, EmbeddingBag):
        return ShardedEmbeddingBag(model, process_group, device, seed)
    if isinstance(model, Embedding):
        return ShardedEmbedding(model, process_group, device, seed)
    for index, (name, child) in enumerate(list(model.named_children())):
        if isinstance(child, MF | Embedding | EmbeddingBag):
            setattr(model, name, shard(child, process_group, device=device,
                                       seed=seed + 7919 * (index + 1)))
        elif not isinstance(child, ShardedMF | _ShardedTable):
            shard(child, process_group, device=device, seed=seed + 7919 * (index + 1))
    if device is not None:
        for param in model.parameters():
            if not is_sharded(param) and param.device != torch.device(device):
                raise ValueError("fastmf.distributed.shard: device= places the shards only; "
                                 "move the dense parameters with model.to() first")
    return model


def sync_dense_grads(model: nn.Module, process_group=None) -> None:
    """Sum the gradients of ``model``'s replicated (not sharded) parameters over the group
    with one ``all_reduce`` per parameter. With each rank's loss its share of the global
    loss (sum over its samples / global batch size), the sum is the single-process gradient;
    the sharded tables need nothing (their gradients already went to the owners). Inside
    :func:`loss_share` each gradient is first scaled by the rank's share."""
    scale = _SHARE.value
    for param in model.parameters():
        if is_sharded(param) or not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)  # every rank must join every all_reduce
        elif scale != 1.0:
            param.grad.mul_(scale)
        dist.all_reduce(param.grad, group=process_group)


def local_slice(batch_size: int, process_group=None) -> slice:
    """This rank's contiguous slice of a global batch of ``batch_size`` samples (the first
    ``batch_size % W`` ranks take one more), in rank order: concatenated they are the
    batch, so routed gradients keep the single-process order."""
    rank, w = world(process_group)
    base, extra = divmod(int(batch_size), w)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
