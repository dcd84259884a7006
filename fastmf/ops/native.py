"""The native backend: thin typed wrappers over ``torch.ops.fastmf.*`` with fake kernels
(for ``torch.compile``) and autograd formulas, registered when this module is imported (at
``import fastmf``). The meaning of each op is in :mod:`fastmf.ops.reference`; the schemas
are in ``csrc/fastmf.cpp``, the kernels in ``csrc/cpu/<family>.cpp`` and
``csrc/cuda/<family>.cu``. Device dispatch (CPU/CUDA) is PyTorch's, not ours."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastmf._extension import native_available
from fastmf.ops import checks
from fastmf.ops.args import MFTables, OptimizerArgs, PooledSide
from fastmf.ops.checks import accumulation_dtype
from fastmf.ops.codes import Loss, Optimizer, PairwiseLoss, Pooling, WeightDecay, parse
from fastmf.ops.reference.embedding_bag import add_rows, per_sample_weights_grad

NAME = "native"

__all__ = [
    "NAME",
    "has_kernel",
    "topk_scores",
    "mf_forward",
    "mf_backward",
    "mf_backward_dense",
    "sparse_adagrad_update",
    "sparse_sgd_update",
    "train_step",
    "train_step_pairwise",
    "train_step_pairwise_sampled",
    "train_steps_pairwise_sampled",
    "train_step_sampled",
    "train_steps_sampled",
    "sample_negatives",
    "permutation",
    "scatter_rows",
    "unique_bags",
    "check_device_errors",
    "embedding_bag_forward",
    "embedding_bag_backward",
    "sparse_update",
    "embedding_bag_backward_update",
    "embedding_bag_backward_update_pair",
    "pooled_rank_steps",
]


def mf_forward(
    users: Tensor,
    items: Tensor,
    user_factors: Tensor,
    item_factors: Tensor,
    user_bias: Tensor | None,
    item_bias: Tensor | None,
    global_mean: float,
) -> Tensor:
    """Predictions (B,): ``global_mean + b_u + b_i + <P[u], Q[i]>``. Differentiable (dense
    gradients) with respect to the four tables.

    >>> pred = mf_forward(users, items, P, Q, bu, bi, 3.5)  # doctest: +SKIP
    """
    # Under no_grad (Hybrid's and NCF's graph-free steps, scoring) straight to the kernel.
    return _differentiable(torch.ops.fastmf.mf_forward.default, users, items, user_factors,
                           item_factors, user_bias, item_bias, float(global_mean))


def mf_backward(
    grad_out: Tensor, users: Tensor, items: Tensor, user_factors: Tensor, item_factors: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample gradient rows (B, K) for the user and item tables."""
    return torch.ops.fastmf.mf_backward.default(grad_out, users, items, user_factors, item_factors)


def mf_backward_dense(
    grad_out: Tensor, users: Tensor, items: Tensor, user_factors: Tensor, item_factors: Tensor
) -> tuple[Tensor, Tensor]:
    """The tables' dense gradients (U, K) and (I, K): see
    :func:`fastmf.ops.reference.pointwise.mf_backward_dense`."""
    return torch.ops.fastmf.mf_backward_dense.default(grad_out, users, items, user_factors,
                                                      item_factors)


def sparse_adagrad_update(
    weight: Tensor, state: Tensor, ids: Tensor, grad_rows: Tensor, lr: float, eps: float,
    rowwise: bool,
) -> None:
    """In-place exact sparse Adagrad (duplicates summed, one update per unique row)."""
    with torch.no_grad():
        torch.ops.fastmf.sparse_adagrad_update.default(
            weight, state, ids, grad_rows, float(lr), float(eps), bool(rowwise))
    _written(weight, state)


def sparse_sgd_update(weight: Tensor, ids: Tensor, grad_rows: Tensor, lr: float) -> None:
    """In-place sparse SGD (duplicates summed, one update per unique row)."""
    with torch.no_grad():
        torch.ops.fastmf.sparse_sgd_update.default(weight, ids, grad_rows, float(lr))
    _written(weight)


def _written(*tensors: Tensor | None) -> None:
    """Bump the version counters of what a mutating op wrote, as PyTorch's own in-place
    ops do, so autograd refuses a backward through a tensor saved before the step. (The
    ops are registered for CPU/CUDA only, so no ADInplaceOrView kernel does it for them.)
    The fused steps are optimizer steps, run under no_grad: their loss is a plain value."""
    written = tuple(t for t in tensors if t is not None)
    if written and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(written)


def _flat(tables: MFTables, states: MFTables | None) -> tuple:
    """The eight table and state arguments of the flat schema."""
    return (*tables, *(states if states is not None else (None,) * 4))


def train_step(tables: MFTables, states: MFTables | None, users: Tensor, items: Tensor,
               targets: Tensor, global_mean: float, loss: Loss | int | str, reg: float,
               optimizer: OptimizerArgs, weights: Tensor | None = None) -> Tensor:
    """Fused forward + loss + backward + optimizer update; returns the loss (0-d). See
    :func:`fastmf.ops.reference.pointwise.train_step`."""
    with torch.no_grad():
        loss_value = torch.ops.fastmf.train_step.default(
            *_flat(tables, states), users, items, targets, float(global_mean),
            int(parse(Loss, loss, "train_step", "loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, "train_step", "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights)
    _written(*_flat(tables, states))
    return loss_value


def train_step_pairwise(tables: MFTables, states: MFTables | None, users: Tensor,
                        pos_items: Tensor, neg_items: Tensor, loss: PairwiseLoss | int | str,
                        reg: float, optimizer: OptimizerArgs,
                        weights: Tensor | None = None) -> Tensor:
    """Fused pairwise (BPR) step; returns the loss (0-d). See
    :func:`fastmf.ops.reference.pairwise.train_step_pairwise`."""
    with torch.no_grad():
        loss_value = torch.ops.fastmf.train_step_pairwise.default(
            *_flat(tables, states), users, pos_items, neg_items,
            int(parse(PairwiseLoss, loss, "train_step_pairwise", "pairwise loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, "train_step_pairwise", "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights)
    _written(*_flat(tables, states))
    return loss_value


def train_step_pairwise_sampled(tables: MFTables, states: MFTables | None, users: Tensor,
                                pos_items: Tensor, pos_indptr: Tensor, pos_indices: Tensor,
                                num_negatives: int, seed: int, step: int,
                                loss: PairwiseLoss | int | str, reg: float,
                                optimizer: OptimizerArgs,
                                weights: Tensor | None = None) -> Tensor:
    """Fused pairwise (BPR) step on uniform negatives it draws; returns the loss (0-d). See
    :func:`fastmf.ops.reference.pairwise.train_step_pairwise_sampled`."""
    op = "train_step_pairwise_sampled"
    with torch.no_grad():
        loss_value = torch.ops.fastmf.train_step_pairwise_sampled.default(
            *_flat(tables, states), users, pos_items, pos_indptr, pos_indices,
            int(num_negatives), int(seed), int(step),
            int(parse(PairwiseLoss, loss, op, "pairwise loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, op, "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights)
    _written(*_flat(tables, states))
    return loss_value


def train_steps_pairwise_sampled(tables: MFTables, states: MFTables | None, users: Tensor,
                                 pos_items: Tensor, pos_indptr: Tensor, pos_indices: Tensor,
                                 num_negatives: int, batch_size: int, seed: int, step: int,
                                 loss: PairwiseLoss | int | str, reg: float,
                                 optimizer: OptimizerArgs, weights: Tensor | None = None,
                                 order: Tensor | None = None) -> Tensor:
    """The sampled pairwise step on each run of ``batch_size`` positives in turn; returns
    the steps' losses. See
    :func:`fastmf.ops.reference.pairwise.train_steps_pairwise_sampled`."""
    op = "train_steps_pairwise_sampled"
    with torch.no_grad():
        losses = torch.ops.fastmf.train_steps_pairwise_sampled.default(
            *_flat(tables, states), users, pos_items, pos_indptr, pos_indices,
            int(num_negatives), int(batch_size), int(seed), int(step),
            int(parse(PairwiseLoss, loss, op, "pairwise loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, op, "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights, order)
    _written(*_flat(tables, states))
    return losses


def train_step_sampled(tables: MFTables, states: MFTables | None, users: Tensor,
                       pos_items: Tensor, pos_indptr: Tensor, pos_indices: Tensor,
                       num_negatives: int, seed: int, step: int, global_mean: float,
                       loss: Loss | int | str, reg: float, optimizer: OptimizerArgs,
                       weights: Tensor | None = None) -> Tensor:
    """Fused pointwise step on the positives (label 1) and uniform negatives it draws
    (label 0); returns the loss (0-d). See
    :func:`fastmf.ops.reference.pointwise.train_step_sampled`."""
    op = "train_step_sampled"
    with torch.no_grad():
        loss_value = torch.ops.fastmf.train_step_sampled.default(
            *_flat(tables, states), users, pos_items, pos_indptr, pos_indices,
            int(num_negatives), int(seed), int(step), float(global_mean),
            int(parse(Loss, loss, op, "loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, op, "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights)
    _written(*_flat(tables, states))
    return loss_value


def train_steps_sampled(tables: MFTables, states: MFTables | None, users: Tensor,
                        pos_items: Tensor, pos_indptr: Tensor, pos_indices: Tensor,
                        num_negatives: int, batch_size: int, seed: int, step: int,
                        global_mean: float, loss: Loss | int | str, reg: float,
                        optimizer: OptimizerArgs, weights: Tensor | None = None,
                        order: Tensor | None = None) -> Tensor:
    """The sampled pointwise step on each run of ``batch_size`` positives in turn; returns
    the steps' losses. See :func:`fastmf.ops.reference.pointwise.train_steps_sampled`."""
    op = "train_steps_sampled"
    with torch.no_grad():
        losses = torch.ops.fastmf.train_steps_sampled.default(
            *_flat(tables, states), users, pos_items, pos_indptr, pos_indices,
            int(num_negatives), int(batch_size), int(seed), int(step), float(global_mean),
            int(parse(Loss, loss, op, "loss")), float(reg),
            int(parse(Optimizer, optimizer.optimizer, op, "optimizer")),
            float(optimizer.lr), float(optimizer.eps), weights, order)
    _written(*_flat(tables, states))
    return losses


def _differentiable(op, *args):
    """``op(*args)`` for an op with a Python autograd formula: through the formula when a
    graph may be recorded; otherwise straight to the kernel, past the formula's wrapper and
    its redispatch (about 40 us a call for scatter_rows)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def embedding_bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor,
                          per_sample_weights: Tensor | None, pooling) -> Tensor:
    """Bag sums (B, K) in the accumulation type: see
    :func:`fastmf.ops.reference.embedding_bag.embedding_bag_forward`. ``pooling``: a
    :class:`~fastmf.ops.codes.Pooling` member, code or name. Differentiable with respect to
    ``weight`` (a dense gradient) and ``per_sample_weights``.

    >>> out = embedding_bag_forward(weight, ids, offsets, None, "mean")  # doctest: +SKIP
    """
    op = "embedding_bag_forward"
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    # fastmf.nn's autograd.Function runs its forward here, with no graph to record.
    return _differentiable(torch.ops.fastmf.embedding_bag_forward.default, weight, indices,
                           offsets, per_sample_weights, pooling)


def embedding_bag_backward(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Tensor | None, pooling) -> Tensor:
    """Gradient rows (L, K) in grad_output's dtype: see
    :func:`fastmf.ops.reference.embedding_bag.embedding_bag_backward`."""
    op = "embedding_bag_backward"
    return torch.ops.fastmf.embedding_bag_backward.default(
        grad_output, indices, offsets, per_sample_weights,
        int(parse(Pooling, pooling, op, "pooling")))


def _row_settings(op: str, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                  step, seed, stochastic_rounding) -> tuple:
    """The flat optimizer arguments of the schemas, with the codes parsed."""
    return (int(parse(Optimizer, optimizer, op, "optimizer")), float(lr), float(eps),
            float(beta1), float(beta2), float(weight_decay),
            int(parse(WeightDecay, weight_decay_mode, op, "weight_decay_mode")), int(step),
            int(seed), bool(stochastic_rounding))


def unique_bags(ids: Tensor, indptr: Tensor, indices: Tensor,
                weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The bags of a batch's distinct rows of a CSR matrix, ``(distinct, inverse,
    bag_indices, bag_offsets, bag_weights)``: see
    :func:`fastmf.ops.reference.embedding_bag.unique_bags`. Not differentiable (its outputs
    are ids and copied weights)."""
    op = torch.ops.fastmf.unique_bags.default
    if torch.compiler.is_compiling():
        return op(ids, indptr, indices, weights)
    # Past the autograd fallback and its redispatch: the op has no gradient to record.
    with torch._C._AutoDispatchBelowAutograd():
        return op(ids, indptr, indices, weights)


def sparse_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None, ids: Tensor,
                  grad_rows: Tensor, optimizer, lr: float, eps: float, beta1: float,
                  beta2: float, weight_decay: float, weight_decay_mode, step: int, seed: int,
                  stochastic_rounding: bool) -> None:
    """In place: the exact deduplicated sparse step (see
    :func:`fastmf.ops.reference.embedding_bag.sparse_update`)."""
    settings = _row_settings("sparse_update", optimizer, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode, step, seed, stochastic_rounding)
    with torch.no_grad():
        torch.ops.fastmf.sparse_update.default(weight, state1, state2, ids, grad_rows,
                                               *settings)
    _written(weight, state1, state2)


def embedding_bag_backward_update(weight: Tensor, state1: Tensor | None, state2: Tensor | None,
                                  grad_output: Tensor, indices: Tensor, offsets: Tensor,
                                  per_sample_weights: Tensor | None, pooling, optimizer,
                                  lr: float, eps: float, beta1: float, beta2: float,
                                  weight_decay: float, weight_decay_mode, step: int, seed: int,
                                  stochastic_rounding: bool) -> None:
    """In place: the backward of :func:`embedding_bag_forward` fused with
    :func:`sparse_update`, without forming the (L, K) gradient rows (see
    :func:`fastmf.ops.reference.embedding_bag.embedding_bag_backward_update`)."""
    op = "embedding_bag_backward_update"
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    settings = _row_settings(op, optimizer, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode, step, seed, stochastic_rounding)
    with torch.no_grad():
        torch.ops.fastmf.embedding_bag_backward_update.default(
            weight, state1, state2, grad_output, indices, offsets, per_sample_weights, pooling,
            *settings)
    _written(weight, state1, state2)


def embedding_bag_backward_update_pair(
        weight: Tensor, state1: Tensor | None, state2: Tensor | None, grad_output: Tensor,
        weight_b: Tensor, state1_b: Tensor | None, state2_b: Tensor | None,
        grad_output_b: Tensor, indices: Tensor, offsets: Tensor,
        per_sample_weights: Tensor | None, pooling, optimizer, lr: float, eps: float,
        beta1: float, beta2: float, weight_decay: float, weight_decay_mode, step: int,
        seed: int, stochastic_rounding: bool, step_b: int, seed_b: int,
        stochastic_rounding_b: bool) -> None:
    """In place: :func:`embedding_bag_backward_update` of two tables over the same bags,
    the bags read and grouped once on the CPU (see
    :func:`fastmf.ops.reference.embedding_bag.embedding_bag_backward_update_pair`)."""
    op = "embedding_bag_backward_update_pair"
    pooling = int(parse(Pooling, pooling, op, "pooling"))
    settings = _row_settings(op, optimizer, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode, step, seed, stochastic_rounding)
    with torch.no_grad():
        torch.ops.fastmf.embedding_bag_backward_update_pair.default(
            weight, state1, state2, grad_output, weight_b, state1_b, state2_b, grad_output_b,
            indices, offsets, per_sample_weights, pooling, *settings, int(step_b),
            int(seed_b), bool(stochastic_rounding_b))
    _written(weight, state1, state2, weight_b, state1_b, state2_b)


def check_device_errors(device: int | str | torch.device | None = None) -> None:
    """Raise the first bad id or non-finite target that the CUDA kernels met on ``device``
    (default: the current CUDA device) since the last check, and clear it.

    The CUDA ops never synchronise with the host, so they cannot raise: they leave a bad
    sample out (NaN prediction or loss, no update through it) and record the error on the
    device. This synchronises the device and raises it as the CPU kernels would
    (``IndexError`` for ids, ``ValueError`` for targets). Call it outside CUDA graph
    capture, where a sync is cheap: after an epoch, before evaluation, in tests. Without a
    CUDA build or a GPU there is nothing to check.

    >>> loss = train_step(...)        # doctest: +SKIP
    >>> check_device_errors()         # doctest: +SKIP
    """
    if not native_available() or not torch.cuda.is_available():
        return
    if not hasattr(torch.ops.fastmf, "check_device_errors"):
        return  # built before the op existed
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastmf::check_device_errors", "CompositeImplicitAutograd"
    ):
        return  # a CPU-only build records nothing
    if device is None:
        index = torch.cuda.current_device()
    else:
        index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if index.type != "cuda":
            return
        index = index.index if index.index is not None else torch.cuda.current_device()
    torch.ops.fastmf.check_device_errors.default(int(index))


def has_kernel(device: torch.device | str, op: str = "mf_forward") -> bool:
    """Whether the extension registered a kernel of ``op`` for ``device``'s type (csrc/cpu
    and csrc/cuda mirror each other, but an extension built before an op family existed
    lacks that family: ask for the op you need)."""
    if not native_available():
        return False
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _has_kernel(device_type, op)


@functools.cache
def _has_kernel(device_type: str, op: str) -> bool:
    # Registrations are fixed once the extension is loaded; the dispatcher query costs a few
    # microseconds, which every step would otherwise pay.
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmf::{op}", key)
    except RuntimeError:  # an extension built before the op existed
        return False


def topk_scores(
    queries: Tensor,
    item_factors: Tensor,
    item_bias: Tensor | None,
    k: int,
    exclude_indptr: Tensor | None,
    exclude_indices: Tensor | None,
    candidates: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(scores (B, k), indices (B, k) int64)``: see :mod:`fastmf.ops.reference.topk`."""
    return torch.ops.fastmf.topk_scores.default(
        queries, item_factors, item_bias, int(k), exclude_indptr, exclude_indices, candidates
    )


def permutation(out: Tensor, seed: int) -> None:
    """Fills ``out`` with a random permutation of ``0..n-1`` at ``seed``. See
    :func:`fastmf.ops.reference.sampling.permutation`."""
    torch.ops.fastmf.permutation.default(out, int(seed))
    _written(out)


def sample_negatives(users: Tensor, pos_indptr: Tensor, pos_indices: Tensor, num_items: int,
                     num_negatives: int, seed: int, step: int,
                     op: str = "train_step_pairwise_sampled") -> Tensor:
    """(B, num_negatives) int64 uniform negatives, the items the sampled steps draw; see
    :func:`fastmf.ops.reference.sampling.sample_negatives`. ``op`` names the caller in
    the errors."""
    return torch.ops.fastmf.sample_negatives.default(
        users, pos_indptr, pos_indices, int(num_items), int(num_negatives), int(seed),
        int(step), str(op))


def scatter_rows(ids: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """The dense gradient of a row gather, ``out[ids[j]] += rows[j]`` in index order: see
    :func:`fastmf.ops.reference.embedding_bag.scatter_rows`. Differentiable with respect to
    ``rows``."""
    # A backward pass (the NCF models' gathers) runs it with grad disabled.
    return _differentiable(torch.ops.fastmf.scatter_rows.default, ids, rows, num_rows)


def pooled_rank_steps(users_side: PooledSide, items_side: PooledSide, users: Tensor,
                      pos_items: Tensor, weights: Tensor | None, pos_indptr: Tensor,
                      pos_indices: Tensor, num_items: int, num_negatives: int,
                      batch_size: int, seed: int, loss: str, reg: float) -> Tensor:
    """In place: the ranking steps of each run of ``batch_size`` positives in turn, in one
    call (``csrc/pooled_steps.cpp``: the loop of
    :func:`fastmf.ops.reference.pooled.pooled_rank_steps` in C++ over the native kernels);
    returns the runs' losses."""
    op = "pooled_rank_steps"
    checks.check_pooled_rank_steps(op, users_side, items_side, users, pos_items, weights,
                                   num_negatives, batch_size, loss, reg)
    a = users_side.table_args
    sides = (users_side, items_side)
    per_table = [(side.table_args, side.bias_args) for side in sides]
    args = [x for pair in per_table for x in pair]
    tables = [t for side in sides for t in (side.table, *side.table_states, side.bias,
                                            *side.bias_states)]
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        losses = torch.ops.fastmf.pooled_rank_steps.default(
            *tables, users_side.indptr, users_side.indices, users_side.weights,
            items_side.indptr, items_side.indices, items_side.weights, users, pos_items,
            weights, pos_indptr, pos_indices, int(num_items), int(num_negatives),
            int(batch_size), int(seed), str(loss), float(reg), int(a.optimizer),
            float(a.lr), float(a.eps), float(a.beta1), float(a.beta2), float(a.weight_decay),
            int(a.weight_decay_mode), [int(x.step) for x in args], [int(x.seed) for x in args],
            [int(bool(x.stochastic_rounding)) for x in args])
    _written(*tables)
    return losses


def _tensors_by_name(names, args, kwargs):
    """(argument name, tensor) of every tensor argument, lists of tensors included."""
    for name, value in [*zip(names, args), *kwargs.items()]:
        values = value if isinstance(value, (list, tuple)) else (value,)
        for v in values:
            if isinstance(v, Tensor):
                yield name, v


def _register_fake(qualname: str):
    """``torch.library.register_fake(qualname)`` with the kernels' one-device rule in front:
    every tensor argument on the first one's device, else the kernels' ValueError. A fake
    also serves as the op's Meta kernel, so a call that mixes meta tensors with real ones
    (ids on the meta device for a model on the CPU) reaches it, and its empty result on the
    real device would be returned as uninitialised memory."""
    op = qualname.split("::")[1]
    names = [a.name for a in getattr(torch.ops.fastmf, op).default._schema.arguments]

    def register(fake):
        @functools.wraps(fake)
        def checked(*args, **kwargs):
            first = None
            for name, t in _tensors_by_name(names, args, kwargs):
                if first is None:
                    first = (name, t.device)
                elif t.device != first[1]:
                    raise ValueError(f"fastmf.{op}: {name} is on {t.device} but {first[0]} "
                                     f"is on {first[1]}; move them to one device")
            return fake(*args, **kwargs)

        return torch.library.register_fake(qualname)(checked)

    return register


if native_available():

    @_register_fake("fastmf::mf_forward")
    def _mf_forward_fake(users, items, user_factors, item_factors, user_bias, item_bias,
                         global_mean):
        torch._check(users.dim() == 1 and items.dim() == 1, lambda: "ids must be 1-D")
        torch._check(users.shape[0] == items.shape[0], lambda: "users and items differ in length")
        torch._check(user_factors.dim() == 2 and item_factors.dim() == 2)
        torch._check(user_factors.shape[1] == item_factors.shape[1])
        return user_factors.new_empty((users.shape[0],))

    @_register_fake("fastmf::mf_backward")
    def _mf_backward_fake(grad_out, users, items, user_factors, item_factors):
        torch._check(grad_out.shape[0] == users.shape[0])
        batch, dim = users.shape[0], user_factors.shape[1]
        return user_factors.new_empty((batch, dim)), user_factors.new_empty((batch, dim))

    if hasattr(torch.ops.fastmf, "mf_backward_dense"):

        @_register_fake("fastmf::mf_backward_dense")
        def _mf_backward_dense_fake(grad_out, users, items, user_factors, item_factors):
            torch._check(grad_out.shape[0] == users.shape[0])
            return user_factors.new_empty(user_factors.shape), item_factors.new_empty(
                item_factors.shape)

    @_register_fake("fastmf::sparse_adagrad_update")
    def _sparse_adagrad_update_fake(weight, state, ids, grad_rows, lr, eps, rowwise):
        return None

    @_register_fake("fastmf::sparse_sgd_update")
    def _sparse_sgd_update_fake(weight, ids, grad_rows, lr):
        return None

    @_register_fake("fastmf::train_step")
    def _train_step_fake(user_factors, *args, **kwargs):
        return user_factors.new_empty(())

    @_register_fake("fastmf::train_step_pairwise")
    def _train_step_pairwise_fake(user_factors, *args, **kwargs):
        return user_factors.new_empty(())

    # An extension built before this op lacks it; everything else still works.
    if hasattr(torch.ops.fastmf, "train_step_pairwise_sampled"):

        @_register_fake("fastmf::train_step_pairwise_sampled")
        def _train_step_pairwise_sampled_fake(user_factors, *args, **kwargs):
            return user_factors.new_empty(())

    def _run_length(users, order, args, at):
        """The positives of a multi-step sampled op's run: len(order) when it has one
        (positional argument ``at`` after batch_size, or the keyword), else len(users)."""
        if order is None and len(args) > at:
            order = args[at]
        return users.shape[0] if order is None else order.shape[0]

    if hasattr(torch.ops.fastmf, "train_steps_pairwise_sampled"):

        @_register_fake("fastmf::train_steps_pairwise_sampled")
        def _train_steps_pairwise_sampled_fake(user_factors, item_factors, user_bias,
                                               item_bias, user_factors_state,
                                               item_factors_state, user_bias_state,
                                               item_bias_state, users, pos_items, pos_indptr,
                                               pos_indices, num_negatives, batch_size, *args,
                                               order=None, **kwargs):
            n = _run_length(users, order, args, 8)
            return user_factors.new_empty((n // batch_size + (n % batch_size != 0),))

    if hasattr(torch.ops.fastmf, "train_steps_sampled"):

        @_register_fake("fastmf::train_steps_sampled")
        def _train_steps_sampled_fake(user_factors, item_factors, user_bias, item_bias,
                                      user_factors_state, item_factors_state, user_bias_state,
                                      item_bias_state, users, pos_items, pos_indptr,
                                      pos_indices, num_negatives, batch_size, *args,
                                      order=None, **kwargs):
            n = _run_length(users, order, args, 9)
            return user_factors.new_empty((n // batch_size + (n % batch_size != 0),))

    if hasattr(torch.ops.fastmf, "permutation"):

        @_register_fake("fastmf::permutation")
        def _permutation_fake(out, seed):
            return None

    if hasattr(torch.ops.fastmf, "sample_negatives"):

        @_register_fake("fastmf::sample_negatives")
        def _sample_negatives_fake(users, pos_indptr, pos_indices, num_items, num_negatives,
                                   *args, **kwargs):
            return users.new_empty((users.shape[0], num_negatives), dtype=torch.int64)

    if hasattr(torch.ops.fastmf, "train_step_sampled"):

        @_register_fake("fastmf::train_step_sampled")
        def _train_step_sampled_fake(user_factors, *args, **kwargs):
            return user_factors.new_empty(())

    def _mf_forward_setup(ctx, inputs, output):
        users, items, user_factors, item_factors, user_bias, item_bias, _ = inputs
        ctx.save_for_backward(users, items, user_factors, item_factors)
        ctx.num_users, ctx.num_items = user_factors.shape[0], item_factors.shape[0]
        ctx.has_bias = user_bias is not None

    def _mf_forward_backward(ctx, grad):
        users, items, user_factors, item_factors = ctx.saved_tensors
        grad = grad.contiguous()
        grad_p = grad_q = grad_bu = grad_bi = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_p, grad_q = mf_backward_dense(grad, users, items, user_factors, item_factors)
        if ctx.has_bias:
            grad_bu = scatter_rows(users, grad, ctx.num_users)
            grad_bi = scatter_rows(items, grad, ctx.num_items)
        return None, None, grad_p, grad_q, grad_bu, grad_bi, None

    torch.library.register_autograd(
        "fastmf::mf_forward", _mf_forward_backward, setup_context=_mf_forward_setup
    )


    @_register_fake("fastmf::topk_scores")
    def _topk_scores_fake(queries, item_factors, item_bias, k, exclude_indptr, exclude_indices,
                          candidates):
        torch._check(k > 0, lambda: f"fastmf.topk_scores: k must be positive, got {k}")
        torch._check(queries.dim() == 2 and item_factors.dim() == 2)
        torch._check(queries.shape[1] == item_factors.shape[1])
        torch._check(queries.dtype == item_factors.dtype)
        if item_bias is not None:
            torch._check(item_bias.shape == (item_factors.shape[0],))
        if exclude_indptr is not None:
            torch._check(exclude_indptr.shape[0] == queries.shape[0] + 1)
        batch = queries.shape[0]
        return (
            queries.new_empty((batch, k)),
            queries.new_empty((batch, k), dtype=torch.int64),
        )

    def _topk_setup(ctx, inputs, output):
        queries, item_factors, item_bias = inputs[:3]
        _, indices = output
        ctx.save_for_backward(queries, item_factors, indices)
        ctx.has_bias = item_bias is not None

    def _topk_backward(ctx, grad_scores, _grad_indices):
        # score[b, j] = bias[idx] + <queries[b], item_factors[idx]>; padding (idx -1) is a
        # constant -inf and passes no gradient.
        queries, item_factors, indices = ctx.saved_tensors
        grad_q = grad_items = grad_bias = None
        if grad_scores is None:
            return None, None, None, None, None, None, None
        valid = indices >= 0
        idx = indices.clamp(min=0)
        g = torch.where(valid, grad_scores, torch.zeros_like(grad_scores))
        if ctx.needs_input_grad[0]:
            grad_q = torch.einsum("bj,bjk->bk", g, item_factors[idx])
        if ctx.needs_input_grad[1]:
            rows = (g.unsqueeze(-1) * queries.unsqueeze(1)).reshape(-1, queries.shape[1])
            # add_rows: index_add_ on the CPU; on CUDA a fixed-order sum where index_add_
            # adds with atomics, so the gradient has the same bits on every call there.
            grad_items = add_rows(torch.zeros_like(item_factors), idx.reshape(-1), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = add_rows(item_factors.new_zeros(item_factors.shape[0]),
                                 idx.reshape(-1), g.reshape(-1))
        return grad_q, grad_items, grad_bias, None, None, None, None

    torch.library.register_autograd(
        "fastmf::topk_scores", _topk_backward, setup_context=_topk_setup
    )

    # The embedding_bag family: the forward has an autograd formula with a dense weight
    # gradient, like mf_forward's (fastmf.nn's Function calls the ops itself for sparse
    # gradients or the optimizer in backward); the two steps are mutating, training-only ops
    # (Tensor(a!) in their schemas).
    if hasattr(torch.ops.fastmf, "embedding_bag_forward"):

        @_register_fake("fastmf::embedding_bag_forward")
        def _embedding_bag_forward_fake(weight, indices, offsets, per_sample_weights, pooling):
            torch._check(weight.dim() == 2, lambda: "fastmf.embedding_bag_forward: weight "
                         "must be 2-D")
            torch._check(indices.dim() == 1 and offsets.dim() == 1)
            torch._check(offsets.shape[0] >= 1)
            if per_sample_weights is not None:
                torch._check(per_sample_weights.shape == indices.shape)
            return weight.new_empty((offsets.shape[0] - 1, weight.shape[1]),
                                    dtype=accumulation_dtype(weight.dtype))

        @_register_fake("fastmf::embedding_bag_backward")
        def _embedding_bag_backward_fake(grad_output, indices, offsets, per_sample_weights,
                                         pooling):
            torch._check(grad_output.dim() == 2 and indices.dim() == 1)
            torch._check(grad_output.shape[0] == offsets.shape[0] - 1)
            return grad_output.new_empty((indices.shape[0], grad_output.shape[1]))

        @_register_fake("fastmf::sparse_update")
        def _sparse_update_fake(weight, state1, state2, ids, grad_rows, *settings):
            return None

        @_register_fake("fastmf::embedding_bag_backward_update")
        def _embedding_bag_backward_update_fake(weight, state1, state2, grad_output, *rest):
            return None

        @_register_fake("fastmf::embedding_bag_backward_update_pair")
        def _embedding_bag_backward_update_pair_fake(*args):
            return None

    if hasattr(torch.ops.fastmf, "pooled_rank_steps"):

        @_register_fake("fastmf::pooled_rank_steps")
        def _pooled_rank_steps_fake(user_table, *args, **kwargs):
            users, batch_size = args[17], args[24]
            n = users.shape[0]
            dtype = accumulation_dtype(user_table.dtype)
            return user_table.new_empty((n // batch_size + (n % batch_size != 0),),
                                        dtype=dtype)

        def _embedding_bag_forward_setup(ctx, inputs, output):
            weight, indices, offsets, per_sample_weights, pooling = inputs
            ctx.pooling = pooling
            ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
            saved_weight = weight if ctx.needs_input_grad[3] else None
            ctx.save_for_backward(indices, offsets, per_sample_weights, saved_weight)

        def _embedding_bag_forward_backward(ctx, grad):
            indices, offsets, psw, weight = ctx.saved_tensors
            grad = grad.contiguous()
            grad_weight = grad_psw = None
            if ctx.needs_input_grad[0]:
                rows = embedding_bag_backward(grad, indices, offsets,
                                              None if psw is None else psw.detach(),
                                              ctx.pooling)
                grad_weight = scatter_rows(indices.long(), rows.to(ctx.weight_dtype),
                                           ctx.weight_shape[0])
            if ctx.needs_input_grad[3]:
                grad_psw = per_sample_weights_grad(grad, weight, indices, offsets)
            return grad_weight, None, None, grad_psw, None

        torch.library.register_autograd("fastmf::embedding_bag_forward",
                                        _embedding_bag_forward_backward,
                                        setup_context=_embedding_bag_forward_setup)

    # unique_bags: its output sizes (distinct ids, bag entries) depend on the values.
    if hasattr(torch.ops.fastmf, "unique_bags"):

        @_register_fake("fastmf::unique_bags")
        def _unique_bags_fake(ids, indptr, indices, weights):
            op = "fastmf.unique_bags"
            for name, t in (("ids", ids), ("indptr", indptr), ("indices", indices),
                            ("weights", weights)):
                torch._check(t.dim() == 1, lambda name=name: f"{op}: {name} must be 1-D")
            torch._check(weights.shape[0] == indices.shape[0],
                         lambda: f"{op}: weights must have one entry per index")
            ctx = torch.library.get_ctx()
            num_distinct, total = ctx.new_dynamic_size(), ctx.new_dynamic_size()
            return (ids.new_empty(num_distinct, dtype=torch.int64),
                    ids.new_empty(ids.shape[0], dtype=torch.int64), indices.new_empty(total),
                    indices.new_empty(num_distinct + 1), weights.new_empty(total))

    # scatter_rows: the backward of a row gather (fastmf.models' NCF towers, the dense
    # gradients above); its own gradient is the gather.
    if hasattr(torch.ops.fastmf, "scatter_rows"):

        @_register_fake("fastmf::scatter_rows")
        def _scatter_rows_fake(ids, rows, num_rows):
            torch._check(ids.dim() == 1, lambda: "fastmf.scatter_rows: ids must be 1-D")
            torch._check(rows.dim() in (1, 2),
                         lambda: "fastmf.scatter_rows: rows must be 1-D or 2-D")
            torch._check(rows.shape[0] == ids.shape[0],
                         lambda: "fastmf.scatter_rows: rows must have one row per id")
            return rows.new_empty((num_rows,) + tuple(rows.shape[1:]))

        def _scatter_rows_setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        def _scatter_rows_backward(ctx, grad):
            (ids,) = ctx.saved_tensors
            return None, grad.index_select(0, ids.long()), None

        torch.library.register_autograd("fastmf::scatter_rows", _scatter_rows_backward,
                                        setup_context=_scatter_rows_setup)
