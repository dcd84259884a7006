"""Every host-side input check of the Python backends (reference, Numba), in one place;
the native ops make the same checks in C++ (csrc/checks.h) with the same exception types
and messages:

- ids out of range or negative            -> IndexError
  ("fastmf.<op>: <arg> id <v> out of range [0, <n>)")
- float ids, weights not float32/float64  -> TypeError
- mismatched lengths, shapes, devices,
  NaN/inf targets, negative or NaN/inf
  per-sample weights of a fused step      -> ValueError
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastmf.ops.codes import STEP_OPTIMIZERS, Loss, Optimizer, PairwiseLoss, Pooling, WeightDecay

ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float64)


def check_code(op: str, enum, code: int, what: str) -> None:
    """``code`` is one of ``enum``'s codes (the native ops check the same in csrc/checks.h)."""
    if not 0 <= code < len(enum):
        raise ValueError(f"fastmf.{op}: unknown {what} code {code}; expected 0..{len(enum) - 1}")


def check_step_optimizer(op: str, code: int) -> None:
    """The fused MF steps apply SGD/Adagrad/row-wise Adagrad only (codes 0..2, as
    ``kNumOptimizers`` in csrc/checks.h); Adam is an embedding-op optimizer."""
    if not 0 <= code < len(STEP_OPTIMIZERS):
        raise ValueError(f"fastmf.{op}: unknown optimizer code {code}; expected "
                         f"0..{len(STEP_OPTIMIZERS) - 1}")


def check_ids(op: str, name: str, ids: torch.Tensor, num_rows: int | None) -> None:
    """ids: (B,) int32/int64 in [0, num_rows). Reads the ids (a host sync on a GPU)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"fastmf.{op}: {name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or num_rows is None:  # None: the structure only
        return
    lo, hi = torch.aminmax(ids)
    bad = None
    if int(lo) < 0:
        bad = int(lo)
    elif int(hi) >= num_rows:
        bad = int(hi)
    if bad is not None:
        raise IndexError(f"fastmf.{op}: {name} id {bad} out of range [0, {num_rows})")


def check_weight(op: str, name: str, weight: torch.Tensor, dim: int, like=None) -> None:
    """weight: float32/float64 with ``dim`` dimensions, same dtype and device as ``like``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be float32 or float64, got {weight.dtype}")
    if weight.dim() != dim:
        raise ValueError(
            f"fastmf.{op}: {name} must be {dim}-D, got shape {tuple(weight.shape)}"
        )
    if like is not None:
        if weight.dtype != like.dtype:
            raise TypeError(
                f"fastmf.{op}: {name} has dtype {weight.dtype}, expected {like.dtype}"
            )
        if weight.device != like.device:
            raise ValueError(
                f"fastmf.{op}: {name} is on {weight.device}, expected {like.device}"
            )


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"fastmf.{op}: {name} is on {t.device} but {reference_name} is on "
                f"{reference.device}; move them to one device"
            )


def check_same_length(op: str, **tensors) -> None:
    lengths = {name: t.shape[0] for name, t in tensors.items() if t is not None}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{n} has {v}" for n, v in lengths.items())
        raise ValueError(f"fastmf.{op}: lengths differ ({desc})")


def first_rejected(values: torch.Tensor, bad: torch.Tensor) -> float | None:
    """The first of ``values`` that the mask ``bad`` marks, or None (csrc/checks.h
    first_rejected)."""
    if values.numel() and bool(bad.any()):
        return values[bad][0].item()
    return None


def check_finite(op: str, name: str, values: torch.Tensor) -> None:
    bad = first_rejected(values, ~torch.isfinite(values))
    if bad is not None:
        raise ValueError(f"fastmf.{op}: {name} contains a non-finite value ({bad})")


def check_mf_inputs(op, users, items, user_factors, item_factors, user_bias, item_bias):
    """The checks every MF op makes (the C++ ops make the same)."""
    check_weight(op, "user_factors", user_factors, 2)
    check_weight(op, "item_factors", item_factors, 2, like=user_factors)
    if user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError(
            f"fastmf.{op}: user_factors has dim {user_factors.shape[1]} but item_factors "
            f"has dim {item_factors.shape[1]}"
        )
    if (user_bias is None) != (item_bias is None):
        raise ValueError(f"fastmf.{op}: user_bias and item_bias must both be given or both None")
    if user_bias is not None:
        check_weight(op, "user_bias", user_bias, 1, like=user_factors)
        check_weight(op, "item_bias", item_bias, 1, like=user_factors)
        if user_bias.shape[0] != user_factors.shape[0]:
            raise ValueError(f"fastmf.{op}: user_bias has {user_bias.shape[0]} rows, "
                             f"user_factors has {user_factors.shape[0]}")
        if item_bias.shape[0] != item_factors.shape[0]:
            raise ValueError(f"fastmf.{op}: item_bias has {item_bias.shape[0]} rows, "
                             f"item_factors has {item_factors.shape[0]}")
    check_same_device(op, "user_factors", user_factors, users=users, items=items)
    # Lengths before id ranges: the order csrc/checks.h checks them in, so an input with
    # both faults gets the same error on every backend.
    check_ids(op, "users", users, None)
    check_ids(op, "items", items, None)
    check_same_length(op, users=users, items=items)
    check_ids(op, "users", users, user_factors.shape[0])
    check_ids(op, "items", items, item_factors.shape[0])


def check_mf_backward(op, grad_out, users, items, user_factors, item_factors):
    """The checks of mf_backward and mf_backward_dense (csrc's check_mf_backward): the MF
    inputs without biases, and grad_out (B,) like the factors."""
    check_mf_inputs(op, users, items, user_factors, item_factors, None, None)
    check_weight(op, "grad_out", grad_out, 1, like=user_factors)
    check_same_length(op, grad_out=grad_out, users=users)


def check_sparse_update(op, weight, state, ids, grad_rows, rowwise=False):
    """Checks of sparse_adagrad_update / sparse_sgd_update (``state`` None for SGD)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
        raise ValueError(f"fastmf.{op}: weight must be 1-D or 2-D, got {shape}")
    check_weight(op, "weight", weight, weight.dim())
    check_weight(op, "grad_rows", grad_rows, weight.dim(), like=weight)
    if weight.dim() == 2 and grad_rows.shape[1] != weight.shape[1]:
        raise ValueError(f"fastmf.{op}: grad_rows has {grad_rows.shape[1]} columns, "
                         f"weight has {weight.shape[1]}")
    if state is not None:
        expected = weight.shape[:1] if rowwise else weight.shape
        check_weight(op, "state", state, len(expected), like=weight)
        if state.shape != expected:
            raise ValueError(f"fastmf.{op}: state has shape {tuple(state.shape)}, "
                             f"expected {tuple(expected)}")
    check_same_device(op, "weight", weight, ids=ids)
    check_ids(op, "ids", ids, weight.shape[0])
    check_same_length(op, ids=ids, grad_rows=grad_rows)


def check_train_step(op, tables, states, users, items, targets, loss, optimizer):
    """Checks of train_step. ``tables``: (P, Q, b_u, b_i); ``states`` likewise (None for
    SGD); ``loss`` and ``optimizer`` are codes."""
    user_factors, item_factors, user_bias, item_bias = tables
    check_code(op, Loss, loss, "loss")
    check_step_optimizer(op, optimizer)
    check_mf_inputs(op, users, items, user_factors, item_factors, user_bias, item_bias)
    # A (B, 1) column would broadcast against the (B,) predictions into a (B, B) loss.
    check_per_sample(op, "targets", targets, user_factors, users, "a tensor", "the weights")
    check_finite(op, "targets", targets)
    check_states(op, tables, states, optimizer)
    check_separate(op, tables, states)


def check_per_sample(op, name, values, user_factors, users, kinds: str, like: str) -> None:
    """One value per sample (targets, weights): a tensor (else a TypeError naming
    ``kinds``), in user_factors' dtype (TypeError: "expected ... like ``like``"), 1-D, on
    its device, as long as ``users``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be {kinds}, got {type(values).__name__}")
    if values.dtype != user_factors.dtype:
        raise TypeError(f"fastmf.{op}: {name} has dtype {values.dtype}, expected "
                        f"{user_factors.dtype} like {like}")
    if values.dim() != 1:
        raise ValueError(f"fastmf.{op}: {name} must be 1-D, got shape {list(values.shape)}")
    check_same_device(op, "user_factors", user_factors, **{name: values})
    check_same_length(op, users=users, **{name: values})


def check_step_weights(op, weights, user_factors, users) -> None:
    """The per-sample weights of a fused step (None, or (B,) like ``users``, in the
    tables' dtype and on their device, finite and >= 0): csrc/checks.h check_step_weights
    and check_weight_values."""
    if weights is None:
        return
    check_per_sample(op, "weights", weights, user_factors, users, "a tensor or None",
                     "user_factors")
    bad = first_rejected(weights, ~(weights >= 0) | torch.isinf(weights))  # NaN fails >= 0
    if bad is not None:
        raise ValueError(f"fastmf.{op}: weights must be finite and >= 0, got {bad}")


TABLE_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias")
STATE_NAMES = tuple(f"{name}_state" for name in TABLE_NAMES)


def check_settings(op: str, **settings: float) -> None:
    """Optimizer and loss settings (lr, eps, reg, ...) are finite and >= 0: a NaN lr would
    otherwise fill every row a step touches with NaN while the loss still looks normal."""
    for name, value in settings.items():
        # Fast path for the plain float every step passes (NaN fails ``>= 0``): this runs
        # on every step, and numpy's isfinite on a Python float costs about a microsecond.
        if type(value) is float and 0.0 <= value < math.inf:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating
                                                     | np.integer):
            raise TypeError(f"fastmf.{op}: {name} must be a number, got {type(value).__name__}")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"fastmf.{op}: {name} must be finite and >= 0, got {value}")


def check_finite_number(op: str, **values: float) -> float:
    """Real numbers of any sign that must be finite (a model's global mean: a NaN one makes
    every prediction NaN, and the checkpoint it saves is one fastmf.load refuses). Returns
    the last value as a float."""
    out = 0.0
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating
                                                     | np.integer):
            raise TypeError(f"fastmf.{op}: {name} must be a number, got {type(value).__name__}")
        if not np.isfinite(value):
            raise ValueError(f"fastmf.{op}: {name} must be finite, got {value}")
        out = float(value)
    return out


def check_positive(op: str, **settings: float) -> None:
    """Settings that must be > 0: an optimizer's eps, since with eps == 0 a row whose
    accumulator and gradient entry are both 0 computes 0 / 0 and turns NaN. (The ops
    themselves accept eps == 0, as torch.optim.Adagrad does; fastmf's optimizers refuse
    it.)"""
    for name, value in settings.items():
        if not value > 0:
            raise ValueError(f"fastmf.{op}: {name} must be > 0, got {value} (with {name} = 0 "
                             "a zero gradient on a zero accumulator gives 0/0 = NaN)")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address a tensor can touch (its strides may skip some)."""
    if t.numel() == 0:
        return (0, -1)
    start = t.data_ptr()
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + (span + 1) * t.element_size() - 1


def check_separate(op: str, tables, states) -> None:
    """No two of the tables and states overlap in memory: a fused step writes some rows
    while it still reads others, so tied tables (``model.item_factors =
    model.user_factors``) would make the result depend on the schedule."""
    named = [(n, t) for n, t in zip(TABLE_NAMES + STATE_NAMES, (*tables, *states))
             if t is not None]
    # Tensors on different storages cannot overlap: the byte ranges are only needed for
    # tensors that share one (the common case, separate tables, costs one pointer each).
    bases = [t.untyped_storage().data_ptr() for _, t in named]
    if len(set(bases)) == len(bases):
        return
    ranges = [(n, _byte_range(t)) for n, t in named]
    for a in range(len(ranges)):
        for b in range(a + 1, len(ranges)):
            (name_a, (lo_a, hi_a)), (name_b, (lo_b, hi_b)) = ranges[a], ranges[b]
            if lo_a <= hi_b and lo_b <= hi_a:
                raise ValueError(f"fastmf.{op}: {name_a} and {name_b} share memory; each "
                                 "table and state needs memory of its own")


def pairwise_written(tables, states) -> tuple[tuple, tuple]:
    """The tables and states a pairwise step touches: user_bias cancels in x_ui - x_uj and
    is never read or written, so it (and its state) may share memory with anything."""
    tables, states = tuple(tables), tuple(states)
    return (tables[0], tables[1], None, tables[3]), (states[0], states[1], None, states[3])


def check_separate_update(op: str, weight, state) -> None:
    """A sparse update's weight and state do not overlap (the state is read after the
    weight row is written)."""
    if state is not None and _overlap(weight, state):
        raise ValueError(f"fastmf.{op}: weight and state share memory; each table and state "
                         "needs memory of its own")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    lo_a, hi_a = _byte_range(a)
    lo_b, hi_b = _byte_range(b)
    return lo_a <= hi_b and lo_b <= hi_a


def check_states(op, tables, states, optimizer):
    """Optimizer states: None for SGD (code 0); shaped like each table (element-wise
    Adagrad) or (N,) (row-wise Adagrad)."""
    if optimizer == Optimizer.SGD:
        return
    rowwise = optimizer == Optimizer.ROWWISE_ADAGRAD
    for name, table, state in zip(STATE_NAMES, tables, states):
        if table is None:
            continue
        if state is None:
            raise ValueError(f"fastmf.{op}: {Optimizer(optimizer).name.lower()} needs {name}, "
                             "got None")
        expected = table.shape[:1] if rowwise else table.shape
        check_weight(op, name, state, len(expected), like=table)
        if state.shape != expected:
            raise ValueError(f"fastmf.{op}: {name} has shape {tuple(state.shape)}, "
                             f"expected {tuple(expected)}")


def check_train_step_pairwise(op, tables, states, users, pos_items, neg_items, loss,
                              optimizer):
    """Checks of train_step_pairwise (``loss``/``optimizer`` are codes)."""
    check_code(op, PairwiseLoss, loss, "pairwise loss")
    check_step_optimizer(op, optimizer)
    check_mf_inputs(op, users, pos_items, *tables)
    check_same_device(op, "user_factors", tables[0], neg_items=neg_items)
    check_ids(op, "neg_items", neg_items, tables[1].shape[0])
    check_same_length(op, users=users, pos_items=pos_items, neg_items=neg_items)
    check_states(op, tables, states, optimizer)
    check_separate(op, *pairwise_written(tables, states))


# train_step_pairwise_sampled draws ranks below the item count with 32 random bits, and
# expands B positives into B * num_negatives pairs held in int32 positions (as
# train_step_pairwise's at most 2^30 - 1 samples).
MAX_SAMPLED_ITEMS = (1 << 31) - 1
MAX_PAIRWISE_SAMPLES = (1 << 30) - 1


def check_int(op: str, name: str, value, low: int | None = None) -> int:
    """``value`` is an int (not a bool) in int64's range, and >= ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"fastmf.{op}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"fastmf.{op}: {name} must fit in int64, got {value}")
    if low is not None and value < low:
        raise ValueError(f"fastmf.{op}: {name} must be >= {low}, got {value}")
    return value


def _check_sampled(op, tables, states, users, pos_items, pos_indptr, pos_indices,
                   num_negatives, seed, step, optimizer, positive_rows: int,
                   batch_size: int | None = None, positives: int | None = None):
    """What the two sampled steps share: the counts, the positives and the CSR's structure
    (short of the row pointers' values, which the sampling checks for the batch's users),
    and at most MAX_PAIRWISE_SAMPLES rows once each of the B positives is expanded to its
    ``num_negatives`` pairs (``positive_rows`` 0) or to its own row and one per negative
    (``positive_rows`` 1); ``batch_size``: the positives of one step when a call runs
    several (train_steps_pairwise_sampled); ``positives``: the run's length when it is not
    ``len(users)`` (a run read through an order: :func:`check_run_order`)."""
    check_step_optimizer(op, optimizer)
    num_negatives = check_int(op, "num_negatives", num_negatives, 1)
    check_int(op, "seed", seed)
    check_int(op, "step", step)
    check_mf_inputs(op, users, pos_items, *tables)
    for name, t in (("pos_indptr", pos_indptr), ("pos_indices", pos_indices)):
        check_ids(op, name, t, None)
        check_same_device(op, "user_factors", tables[0], **{name: t})
    num_users, num_items = tables[0].shape[0], tables[1].shape[0]
    if pos_indptr.shape[0] != num_users + 1:
        raise ValueError(f"fastmf.{op}: pos_indptr has {pos_indptr.shape[0]} entries, "
                         f"expected num_users + 1 = {num_users + 1}")
    if num_items > MAX_SAMPLED_ITEMS:
        raise ValueError(f"fastmf.{op}: item_factors has {num_items} rows; sampling supports "
                         f"at most {MAX_SAMPLED_ITEMS}")
    n = users.shape[0] if positives is None else positives
    step_positives = n if batch_size is None else min(n, batch_size)
    rows = step_positives * (num_negatives + positive_rows)
    if rows > MAX_PAIRWISE_SAMPLES:
        shape = (f"{num_negatives} negatives = {rows} pairs" if not positive_rows else
                 f"(1 + {num_negatives} negatives) = {rows} rows")
        raise ValueError(f"fastmf.{op}: {step_positives} positives x {shape}; at most "
                         f"{MAX_PAIRWISE_SAMPLES} are supported")
    check_states(op, tables, states, optimizer)


def check_permutation(op: str, out) -> None:
    """permutation's ``out``: a 1-D int32/int64 contiguous tensor; an int32 one holds at
    most 2**31 positions (csrc/checks.h check_permutation)."""
    check_ids(op, "out", out, None)
    if not out.is_contiguous():
        raise ValueError(f"fastmf.{op}: out must be contiguous")
    if out.dtype == torch.int32 and out.numel() > 1 << 31:
        raise ValueError(f"fastmf.{op}: {out.numel()} positions do not fit in int32; use an "
                         "int64 out")


def check_run_order(op: str, order, user_factors, users) -> int | None:
    """The order of a multi-step sampled op's run (None, or (n,) int32/int64 on the
    tables' device; its values are checked against ``len(users)`` after the other inputs):
    the run's length n, or None without an order (csrc/checks.h run_length)."""
    if order is None:
        return None
    check_ids(op, "order", order, None)
    check_same_device(op, "user_factors", user_factors, order=order)
    return order.shape[0]


def check_train_step_pairwise_sampled(op, tables, states, users, pos_items, pos_indptr,
                                      pos_indices, num_negatives, seed, step, loss,
                                      optimizer, batch_size: int | None = None,
                                      positives: int | None = None):
    """Checks of train_step_pairwise_sampled (``loss``/``optimizer`` are codes), short of
    the row pointers' values, which the sampling checks for the batch's users; with
    ``batch_size``, of train_steps_pairwise_sampled's run of such steps."""
    check_code(op, PairwiseLoss, loss, "pairwise loss")
    _check_sampled(op, tables, states, users, pos_items, pos_indptr, pos_indices,
                   num_negatives, seed, step, optimizer, 0, batch_size, positives)
    check_separate(op, *pairwise_written(tables, states))


def check_train_step_sampled(op, tables, states, users, pos_items, pos_indptr, pos_indices,
                             num_negatives, seed, step, loss, optimizer,
                             batch_size: int | None = None, positives: int | None = None):
    """Checks of train_step_sampled (``loss``/``optimizer`` are codes): as the pairwise
    one, with B * (1 + num_negatives) rows (each positive and its negatives); with
    ``batch_size``, of train_steps_sampled's run of such steps."""
    check_code(op, Loss, loss, "loss")
    _check_sampled(op, tables, states, users, pos_items, pos_indptr, pos_indices,
                   num_negatives, seed, step, optimizer, 1, batch_size, positives)
    check_separate(op, tables, states)


def check_k(op: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"fastmf.{op}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"fastmf.{op}: k must be positive, got {k}")
    return int(k)


def check_exclude_csr(op: str, exclude_indptr, exclude_indices, num_items: int,
                      batch: int | None = None) -> None:
    """An exclusion CSR (topk_scores' exclude, popular_items'): 1-D int32/int64 arrays,
    ``batch + 1`` row pointers when ``batch`` is given, non-decreasing within the indices,
    and item ids in ``[0, num_items)``."""
    for name, t in (("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices)):
        if t.dtype not in ID_DTYPES:
            raise TypeError(f"fastmf.{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"fastmf.{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if batch is not None and exclude_indptr.shape[0] != batch + 1:
        raise ValueError(
            f"fastmf.{op}: exclude_indptr must have one entry per query plus one "
            f"({batch + 1}), got {exclude_indptr.shape[0]}"
        )
    if exclude_indptr.shape[0] < 1:
        raise ValueError(f"fastmf.{op}: exclude_indptr must hold at least one entry")
    indptr = exclude_indptr.long()
    start, stop, nnz = int(indptr[0]), int(indptr[-1]), exclude_indices.shape[0]
    if start < 0 or stop > nnz:
        raise ValueError(
            f"fastmf.{op}: exclude_indptr spans [{start}, {stop}) but exclude_indices has "
            f"{nnz} entries"
        )
    steps = indptr[1:] - indptr[:-1]
    if steps.numel() and bool((steps < 0).any()):
        b = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(
            f"fastmf.{op}: exclude_indptr must be non-decreasing, got {int(indptr[b])} "
            f"then {int(indptr[b + 1])} at query {b}"
        )
    check_ids(op, "exclude", exclude_indices[start:stop], num_items)


def check_topk_inputs(
    queries, item_factors, item_bias, k, exclude_indptr, exclude_indices, candidates
) -> None:
    """Everything the native op checks, in the same order and words."""
    check_weight("topk_scores", "queries", queries, 2)
    check_weight("topk_scores", "item_factors", item_factors, 2, like=queries)
    if queries.shape[1] != item_factors.shape[1]:
        raise ValueError(
            f"fastmf.topk_scores: queries has dim {queries.shape[1]} but item_factors has dim "
            f"{item_factors.shape[1]}"
        )
    check_k("topk_scores", k)
    batch, num_items = queries.shape[0], item_factors.shape[0]
    if item_bias is not None:
        check_weight("topk_scores", "item_bias", item_bias, 1, like=queries)
        if item_bias.shape[0] != num_items:
            raise ValueError(
                f"fastmf.topk_scores: item_bias has {item_bias.shape[0]} rows, item_factors has "
                f"{num_items}"
            )
    if (exclude_indptr is None) != (exclude_indices is None):
        raise ValueError(
            "fastmf.topk_scores: exclude_indptr and exclude_indices must both be given or both None"
        )
    if exclude_indptr is not None:
        check_exclude_csr("topk_scores", exclude_indptr, exclude_indices, num_items, batch)
    if candidates is not None:
        check_ids("topk_scores", "candidates", candidates, num_items)


# --- the embedding_bag family (fastmf/ops/reference/embedding_bag.py) ---------------------

EMBEDDING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The tables' dtypes by the name a model's config keeps (str(dtype) without "torch.").
TABLE_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


def table_dtype(op: str, dtype):
    """``dtype``, a torch dtype or its name as a config keeps it; TypeError naming the
    choices for another name."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in TABLE_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {sorted(TABLE_DTYPES)}, got {dtype!r}")
    return TABLE_DTYPES[dtype]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the embedding ops compute in for ``dtype`` weights: float64 for float64,
    float32 otherwise (also the bag output's dtype and the optimizer states' dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_embedding_weight(op: str, name: str, weight, dims=(2,)) -> None:
    """weight: float32/float64/float16/bfloat16 with one of ``dims`` dimensions."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in EMBEDDING_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be float32, float64, float16 or bfloat16, "
                        f"got {weight.dtype}")
    if weight.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"fastmf.{op}: {name} must be {want}, got shape {tuple(weight.shape)}")


def check_scatter_rows(op: str, ids, rows, num_rows) -> None:
    """scatter_rows: num_rows an int >= 0; ids (L,) int32/int64; rows (L,) or (L, K) float
    on the ids' device (csrc/checks.h check_scatter_rows, in its order); then the ids'
    values in [0, num_rows) (a host sync on a GPU)."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int | np.integer):
        raise TypeError(f"fastmf.{op}: num_rows must be an int, got {type(num_rows).__name__}")
    if num_rows < 0:
        raise ValueError(f"fastmf.{op}: num_rows must be >= 0, got {num_rows}")
    check_index_tensor(op, "ids", ids)
    check_embedding_weight(op, "rows", rows, (1, 2))
    check_same_device(op, "ids", ids, rows=rows)
    if rows.shape[0] != ids.shape[0]:
        raise ValueError(f"fastmf.{op}: rows has {rows.shape[0]} rows, expected one per id "
                         f"({ids.shape[0]})")
    check_ids(op, "ids", ids, int(num_rows))


def check_unique_bags(op: str, ids, indptr, indices, weights) -> None:
    """unique_bags: ids (n,), indptr (R + 1,) with R >= 0, indices (nnz,) int32/int64;
    weights (nnz,) float; all on the ids' device (csrc/checks.h check_unique_bags, in its
    order); then the ids' values in [0, R) (a host sync on a GPU)."""
    check_index_tensor(op, "ids", ids)
    check_index_tensor(op, "indptr", indptr)
    if indptr.shape[0] < 1:
        raise ValueError(f"fastmf.{op}: indptr must hold num_rows + 1 >= 1 entries, got 0")
    check_index_tensor(op, "indices", indices)
    check_embedding_weight(op, "weights", weights, (1,))
    check_same_device(op, "ids", ids, indptr=indptr, indices=indices, weights=weights)
    if weights.shape[0] != indices.shape[0]:
        raise ValueError(f"fastmf.{op}: weights has {weights.shape[0]} entries, expected one "
                         f"per index ({indices.shape[0]})")
    check_ids(op, "ids", ids, indptr.shape[0] - 1)


def check_bag_row(op: str, row: int, start: int, end: int, nnz: int) -> None:
    """Row ``row``'s entries ``[start, end)`` of a CSR matrix with ``nnz`` entries, as
    unique_bags reads them (csrc/checks.h check_bag_row)."""
    if not 0 <= start <= end <= nnz:
        raise ValueError(f"fastmf.{op}: indptr[{row}] = {start} and indptr[{row + 1}] = "
                         f"{end} do not bound a row of the {nnz} indices")


def check_bag_rows(op: str, rows: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                   nnz: int) -> None:
    """:func:`check_bag_row` for every ``rows[g]``; the first that fails, in the order
    given, is named. Reads the values (a host sync on a GPU)."""
    bad = ((starts < 0) | (starts > ends) | (ends > nnz)).nonzero()
    if bad.numel():
        g = int(bad[0, 0])
        check_bag_row(op, int(rows[g]), int(starts[g]), int(ends[g]), nnz)


def check_bag_total(op: str, total: int, index_dtype: torch.dtype) -> None:
    """unique_bags' entries fit offsets of the indices' int type (rows may share entries,
    so the bags can outgrow it; csrc/checks.h check_bag_total)."""
    limit = torch.iinfo(index_dtype).max
    if total > limit:
        raise ValueError(f"fastmf.{op}: the bags hold more than {limit} entries, past what "
                         f"{index_dtype} offsets can hold; pass int64 indices")


def check_index_tensor(op: str, name: str, t) -> None:
    """A 1-D int32/int64 tensor (ids or offsets); reads no value."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in ID_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"fastmf.{op}: {name} must be 1-D, got shape {tuple(t.shape)}")


def check_offsets_values(op: str, offsets: torch.Tensor, num_indices: int, *,
                         last: str = "equal") -> None:
    """offsets[0] == 0, non-decreasing, and the last entry == ``num_indices`` (``last=
    "equal"``: the ops' CSR form) or <= it (``last="at_most"``: torch.nn.EmbeddingBag's
    include_last_offset, which ignores the ids past the last offset). Reads the offsets."""
    if offsets.numel() == 0:
        return
    if offsets.device.type == "cpu":
        # The same checks on a NumPy view of the offsets (no copy): about 5 against 30 us
        # a call for a few thousand bags, paid on every fastmf.nn.EmbeddingBag lookup.
        o = offsets.detach().numpy()
        if o[0] == 0 and (o.shape[0] == 1 or bool((o[1:] >= o[:-1]).all())) and (
                o[-1] <= num_indices if last != "equal" else o[-1] == num_indices):
            return
    o = offsets.long()
    if int(o[0]) != 0:
        raise ValueError(f"fastmf.{op}: offsets must start at 0, got offsets[0] = {int(o[0])}")
    steps = o[1:] - o[:-1]
    if steps.numel() and bool((steps < 0).any()):
        b = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"fastmf.{op}: offsets must be non-decreasing, got {int(o[b])} then "
                         f"{int(o[b + 1])} at offsets[{b}], offsets[{b + 1}]")
    end = int(o[-1])
    if end > num_indices:
        raise ValueError(f"fastmf.{op}: offsets[{o.numel() - 1}] = {end} is past the end of "
                         f"indices ({num_indices} ids)")
    if last == "equal" and end != num_indices:
        raise ValueError(f"fastmf.{op}: the last offset must equal the number of indices "
                         f"({num_indices}), got offsets[{o.numel() - 1}] = {end}")


def check_bag_structure(op: str, indices, offsets, per_sample_weights, pooling: int,
                        like=None) -> None:
    """indices (L,) and offsets (B+1,) CSR bags; per_sample_weights None or (L,) of
    ``like``'s dtype, with SUM pooling only. Reads the offsets (not the ids)."""
    check_code(op, Pooling, pooling, "pooling")
    check_index_tensor(op, "indices", indices)
    check_index_tensor(op, "offsets", offsets)
    if offsets.dtype != indices.dtype:
        raise TypeError(f"fastmf.{op}: offsets has dtype {offsets.dtype}, expected "
                        f"{indices.dtype} like indices")
    if offsets.numel() == 0:
        raise ValueError(f"fastmf.{op}: offsets must have one entry per bag plus one, got 0 "
                         "entries")
    if like is not None:
        check_same_device(op, "weight", like, indices=indices, offsets=offsets,
                          per_sample_weights=per_sample_weights)
    if per_sample_weights is not None:
        if pooling != Pooling.SUM:
            raise ValueError(f"fastmf.{op}: per_sample_weights needs sum pooling, got "
                             f"{Pooling(pooling).name.lower()}")
        if not isinstance(per_sample_weights, torch.Tensor):
            raise TypeError(f"fastmf.{op}: per_sample_weights must be a tensor, got "
                            f"{type(per_sample_weights).__name__}")
        if like is not None and per_sample_weights.dtype != like.dtype:
            raise TypeError(f"fastmf.{op}: per_sample_weights has dtype "
                            f"{per_sample_weights.dtype}, expected {like.dtype}")
        if per_sample_weights.shape != indices.shape:
            raise ValueError(f"fastmf.{op}: per_sample_weights has shape "
                             f"{tuple(per_sample_weights.shape)}, expected "
                             f"{tuple(indices.shape)} like indices")
    check_offsets_values(op, offsets, indices.shape[0])


def check_embedding_bag_forward(op, weight, indices, offsets, per_sample_weights,
                                pooling) -> None:
    """Checks of embedding_bag_forward: the bag structure, then the ids against weight."""
    check_embedding_weight(op, "weight", weight)
    out_like = torch.empty(0, dtype=accumulation_dtype(weight.dtype), device=weight.device)
    check_bag_structure(op, indices, offsets, per_sample_weights, pooling, like=out_like)
    check_ids(op, "indices", indices, weight.shape[0])


def check_embedding_bag_backward(op, grad_output, indices, offsets, per_sample_weights,
                                 pooling) -> None:
    """Checks of embedding_bag_backward: grad_output (B, K) float, one row per bag."""
    check_embedding_weight(op, "grad_output", grad_output)
    check_bag_structure(op, indices, offsets, per_sample_weights, pooling, like=grad_output)
    if grad_output.shape[0] != offsets.shape[0] - 1:
        raise ValueError(f"fastmf.{op}: grad_output has {grad_output.shape[0]} rows, expected "
                         f"one per bag ({offsets.shape[0] - 1})")


def check_betas(op: str, beta1, beta2) -> None:
    """Adam's betas: finite numbers in [0, 1)."""
    check_settings(op, beta1=beta1, beta2=beta2)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not value < 1:
            raise ValueError(f"fastmf.{op}: {name} must be in [0, 1), got {value}")


def check_row_optimizer_args(op: str, optimizer: int, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode: int, step, seed) -> None:
    """The settings of sparse_update / embedding_bag_backward_update, checked before any
    write: codes known, lr/eps/weight_decay finite and >= 0, betas in [0, 1), step >= 1,
    seed in [0, 2**63)."""
    check_code(op, Optimizer, optimizer, "optimizer")
    check_code(op, WeightDecay, weight_decay_mode, "weight_decay_mode")
    check_settings(op, lr=lr, eps=eps, weight_decay=weight_decay)
    check_betas(op, beta1, beta2)
    for name, value, lo in (("step", step, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"fastmf.{op}: {name} must be an int, got {type(value).__name__}")
        if not lo <= value < 2**63:
            raise ValueError(f"fastmf.{op}: {name} must be in [{lo}, 2**63), got {value}")


def row_state_shapes(optimizer: int, weight: torch.Tensor) -> tuple:
    """The shapes of (state1, state2) ``optimizer`` needs for ``weight`` (None: no state).
    Row-wise variants keep one value per row of a 2-D weight and behave element-wise on a
    1-D weight."""
    full, per_row = tuple(weight.shape), tuple(weight.shape[:1])
    return {
        Optimizer.SGD: (None, None),
        Optimizer.ADAGRAD: (full, None),
        Optimizer.ROWWISE_ADAGRAD: (per_row, None),
        Optimizer.ADAM: (full, full),
        Optimizer.ROWWISE_ADAM: (full, per_row),
    }[Optimizer(optimizer)]


def check_row_states(op: str, optimizer: int, weight, state1, state2) -> None:
    """state1/state2: exactly the states ``optimizer`` uses (see row_state_shapes), in the
    accumulation dtype (float32; float64 for float64 weights), on the weight's device, and
    not sharing memory with the weight or each other."""
    dtype = accumulation_dtype(weight.dtype)
    name = Optimizer(optimizer).name.lower()
    for slot, state, shape in zip(("state1", "state2"), (state1, state2),
                                  row_state_shapes(optimizer, weight)):
        if shape is None:
            if state is not None:
                raise ValueError(f"fastmf.{op}: {name} takes no {slot}, got a tensor of shape "
                                 f"{tuple(state.shape)}")
            continue
        if state is None:
            raise ValueError(f"fastmf.{op}: {name} needs {slot}, got None")
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"fastmf.{op}: {slot} must be a tensor, got "
                            f"{type(state).__name__}")
        if state.dtype != dtype:
            raise TypeError(f"fastmf.{op}: {slot} has dtype {state.dtype}, expected {dtype} "
                            f"for {weight.dtype} weights")
        if tuple(state.shape) != shape:
            raise ValueError(f"fastmf.{op}: {slot} has shape {tuple(state.shape)}, expected "
                             f"{shape}")
        check_same_device(op, "weight", weight, **{slot: state})
    named = [(n, t) for n, t in (("weight", weight), ("state1", state1), ("state2", state2))
             if t is not None]
    for a in range(len(named)):
        for b in range(a + 1, len(named)):
            (name_a, t_a), (name_b, t_b) = named[a], named[b]
            lo_a, hi_a = _byte_range(t_a)
            lo_b, hi_b = _byte_range(t_b)
            if lo_a <= hi_b and lo_b <= hi_a:
                raise ValueError(f"fastmf.{op}: {name_a} and {name_b} share memory; each "
                                 "table and state needs memory of its own")


def check_grad_rows_dtype(op: str, name: str, grad, weight) -> None:
    """Gradients of float32/float64 weights have the weight's dtype; those of float16/
    bfloat16 weights the weight's dtype or float32 (the bag output's dtype)."""
    allowed = (weight.dtype, torch.float32) if weight.dtype in HALF_DTYPES else (weight.dtype,)
    if grad.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise TypeError(f"fastmf.{op}: {name} has dtype {grad.dtype}, expected {want} for "
                        f"{weight.dtype} weights")


def check_sparse_update_inputs(op, weight, state1, state2, ids, grad_rows, optimizer, lr, eps,
                               beta1, beta2, weight_decay, weight_decay_mode, step, seed):
    """Every check of sparse_update, before any write."""
    check_row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode, step, seed)
    check_embedding_weight(op, "weight", weight, dims=(1, 2))
    check_embedding_weight(op, "grad_rows", grad_rows, dims=(weight.dim(),))
    check_grad_rows_dtype(op, "grad_rows", grad_rows, weight)
    if weight.dim() == 2 and grad_rows.shape[1] != weight.shape[1]:
        raise ValueError(f"fastmf.{op}: grad_rows has {grad_rows.shape[1]} columns, "
                         f"weight has {weight.shape[1]}")
    check_row_states(op, optimizer, weight, state1, state2)
    check_same_device(op, "weight", weight, ids=ids, grad_rows=grad_rows)
    check_ids(op, "ids", ids, weight.shape[0])
    check_same_length(op, ids=ids, grad_rows=grad_rows)


def check_backward_update_inputs(op, weight, state1, state2, grad_output, indices, offsets,
                                 per_sample_weights, pooling, optimizer, lr, eps, beta1, beta2,
                                 weight_decay, weight_decay_mode, step, seed):
    """Every check of embedding_bag_backward_update, before any write."""
    check_row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay,
                             weight_decay_mode, step, seed)
    check_embedding_weight(op, "weight", weight)
    check_embedding_bag_backward(op, grad_output, indices, offsets, per_sample_weights, pooling)
    check_grad_rows_dtype(op, "grad_output", grad_output, weight)
    if grad_output.shape[1] != weight.shape[1]:
        raise ValueError(f"fastmf.{op}: grad_output has {grad_output.shape[1]} columns, "
                         f"weight has {weight.shape[1]}")
    check_row_states(op, optimizer, weight, state1, state2)
    check_same_device(op, "weight", weight, grad_output=grad_output, indices=indices)
    check_ids(op, "indices", indices, weight.shape[0])


def check_backward_update_pair(op, tables, indices, offsets, per_sample_weights, pooling,
                               settings, steps):
    """Every check of embedding_bag_backward_update_pair, before any write: each of the two
    ``tables`` ((weight, state1, state2, grad_output)) as embedding_bag_backward_update
    checks it with its own ``steps`` ((step, seed)), the same number of rows, and no tensor
    written twice."""
    for (weight, state1, state2, grad_output), step in zip(tables, steps, strict=True):
        check_backward_update_inputs(op, weight, state1, state2, grad_output, indices,
                                     offsets, per_sample_weights, pooling, *settings, *step)
    (weight, *_), (weight_b, *_) = tables
    if weight_b.shape[0] != weight.shape[0]:
        raise ValueError(f"fastmf.{op}: weight has {weight.shape[0]} rows, weight_b "
                         f"{weight_b.shape[0]}; the bags index both")
    names = ("weight", "state1", "state2", "weight_b", "state1_b", "state2_b")
    written = [t for table in tables for t in table[:3]]
    for j, b in enumerate(written):
        for i in range(j):
            a = written[i]
            if a is not None and b is not None and \
                    a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                raise ValueError(f"fastmf.{op}: {names[j]} shares memory with {names[i]}")


def check_pooled_rank_steps(op: str, users_side, items_side, users: torch.Tensor,
                            pos_items: torch.Tensor, weights, num_negatives: int,
                            batch_size: int, loss: str, reg: float) -> None:
    """pooled_rank_steps' own arguments (csrc/checks.h check_pooled_rank_steps, in its
    order), and that the four tables share the optimizer settings (their args differ in
    step, seed and rounding only). The tables, bags and settings themselves are checked by
    the ops the steps call, before their first write."""
    check_index_tensor(op, "users", users)
    check_index_tensor(op, "pos_items", pos_items)
    check_same_length(op, users=users, pos_items=pos_items)
    check_same_device(op, "users", users, pos_items=pos_items)
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            what = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise TypeError(f"fastmf.{op}: weights must be a floating tensor, got {what}")
        if weights.dim() != 1:
            raise ValueError(f"fastmf.{op}: weights must be 1-D, got shape "
                             f"{tuple(weights.shape)}")
        check_same_length(op, users=users, weights=weights)
        check_same_device(op, "users", users, weights=weights)
    check_int(op, "batch_size", batch_size, 1)
    check_int(op, "num_negatives", num_negatives, 1)
    if loss not in ("bpr", "bce"):
        raise ValueError(f"fastmf.{op}: loss must be 'bpr' or 'bce', got {loss!r}")
    check_settings(op, reg=reg)
    shared = users_side.table_args[:7]
    for side, name in ((users_side, "user"), (items_side, "item")):
        for args, table in ((side.table_args, "table"), (side.bias_args, "bias")):
            if args[:7] != shared:
                raise ValueError(f"fastmf.{op}: the {name} {table}'s optimizer settings "
                                 f"{tuple(args[:7])} differ from the user table's "
                                 f"{tuple(shared)}; the four tables share them")
