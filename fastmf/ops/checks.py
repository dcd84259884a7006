"""Every host-side input check of the Python backends (reference, Numba), in one place;
the native ops make the same checks in C++ (csrc/checks.h) with the same exception types
and messages:

- ids out of range or negative            -> IndexError
  ("fastmf.<op>: <arg> id <v> out of range [0, <n>)")
- float ids, weights not float32/float64  -> TypeError
- mismatched lengths, shapes, devices,
  NaN/inf targets                         -> ValueError
"""

from __future__ import annotations

import numpy as np
import torch

from fastmf.ops.codes import Loss, Optimizer, PairwiseLoss

ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float64)


def check_code(op: str, enum, code: int, what: str) -> None:
    """``code`` is one of ``enum``'s codes (the native ops check the same in csrc/checks.h)."""
    if not 0 <= code < len(enum):
        raise ValueError(f"fastmf.{op}: unknown {what} code {code}; expected 0..{len(enum) - 1}")


def check_ids(op: str, name: str, ids: torch.Tensor, num_rows: int) -> None:
    """ids: (B,) int32/int64 in [0, num_rows). Reads the ids (a host sync on a GPU)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"fastmf.{op}: {name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"fastmf.{op}: {name} must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"fastmf.{op}: {name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
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


def check_finite(op: str, name: str, values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = values[~torch.isfinite(values)][0].item()
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
    check_ids(op, "users", users, user_factors.shape[0])
    check_ids(op, "items", items, item_factors.shape[0])
    check_same_length(op, users=users, items=items)


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
    check_code(op, Optimizer, optimizer, "optimizer")
    check_mf_inputs(op, users, items, user_factors, item_factors, user_bias, item_bias)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"fastmf.{op}: targets must be a tensor, got {type(targets).__name__}")
    if targets.dtype != user_factors.dtype:
        raise TypeError(f"fastmf.{op}: targets has dtype {targets.dtype}, expected "
                        f"{user_factors.dtype} like the weights")
    if targets.dim() != 1:
        # A (B, 1) column would broadcast against the (B,) predictions into a (B, B) loss.
        raise ValueError(f"fastmf.{op}: targets must be 1-D, got shape {list(targets.shape)}")
    check_same_device(op, "user_factors", user_factors, targets=targets)
    check_same_length(op, users=users, targets=targets)
    check_finite(op, "targets", targets)
    check_states(op, tables, states, optimizer)
    check_separate(op, tables, states)


TABLE_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias")
STATE_NAMES = tuple(f"{name}_state" for name in TABLE_NAMES)


def check_settings(op: str, **settings: float) -> None:
    """Optimizer and loss settings (lr, eps, reg, ...) are finite and >= 0: a NaN lr would
    otherwise fill every row a step touches with NaN while the loss still looks normal."""
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating
                                                     | np.integer):
            raise TypeError(f"fastmf.{op}: {name} must be a number, got {type(value).__name__}")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"fastmf.{op}: {name} must be finite and >= 0, got {value}")


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
    ranges = [(n, _byte_range(t)) for n, t in named]
    for a in range(len(ranges)):
        for b in range(a + 1, len(ranges)):
            (name_a, (lo_a, hi_a)), (name_b, (lo_b, hi_b)) = ranges[a], ranges[b]
            if lo_a <= hi_b and lo_b <= hi_a:
                raise ValueError(f"fastmf.{op}: {name_a} and {name_b} share memory; the "
                                 "fused step needs separate tensors")


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
    check_code(op, Optimizer, optimizer, "optimizer")
    check_mf_inputs(op, users, pos_items, *tables)
    check_same_device(op, "user_factors", tables[0], neg_items=neg_items)
    check_ids(op, "neg_items", neg_items, tables[1].shape[0])
    check_same_length(op, users=users, pos_items=pos_items, neg_items=neg_items)
    check_states(op, tables, states, optimizer)
    check_separate(op, tables, states)


def check_k(op: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"fastmf.{op}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"fastmf.{op}: k must be positive, got {k}")
    return int(k)


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
        for name, t in (("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices)):
            if t.dtype not in ID_DTYPES:
                raise TypeError(f"fastmf.topk_scores: {name} must be int32 or int64, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"fastmf.topk_scores: {name} must be 1-D, got shape "
                                 f"{tuple(t.shape)}")
        if exclude_indptr.shape[0] != batch + 1:
            raise ValueError(
                f"fastmf.topk_scores: exclude_indptr must have one entry per query plus one "
                f"({batch + 1}), got {exclude_indptr.shape[0]}"
            )
        indptr = exclude_indptr.long()
        start, stop, nnz = int(indptr[0]), int(indptr[-1]), exclude_indices.shape[0]
        if start < 0 or stop > nnz:
            raise ValueError(
                f"fastmf.topk_scores: exclude_indptr spans [{start}, {stop}) but "
                f"exclude_indices has "
                f"{nnz} entries"
            )
        steps = indptr[1:] - indptr[:-1]
        if batch and bool((steps < 0).any()):
            b = int(torch.nonzero(steps < 0)[0, 0])
            raise ValueError(
                f"fastmf.topk_scores: exclude_indptr must be non-decreasing, got {int(indptr[b])} "
                f"then {int(indptr[b + 1])} at query {b}"
            )
        check_ids("topk_scores", "exclude", exclude_indices[start:stop], num_items)
    if candidates is not None:
        check_ids("topk_scores", "candidates", candidates, num_items)
