"""The op vocabulary: loss and optimizer codes, defined once for Python.

The C++/CUDA kernels read the same codes from ``csrc/codes.h``; ``tests/test_codes.py``
parses that header and proves the two agree. Every other place names these enums, never
a bare number. A code travels to the kernels as a plain int (the op schemas are flat).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Loss", "Optimizer", "PairwiseLoss", "Pooling", "STEP_OPTIMIZERS", "WeightDecay",
           "parse"]


class Loss(IntEnum):
    """Pointwise losses of ``train_step``, each a mean over the batch."""

    MSE = 0  # mean((pred - target)^2)
    HUBER = 1  # F.huber_loss(pred, target, delta=HUBER_DELTA)
    BCE = 2  # F.binary_cross_entropy_with_logits(pred, target)


class PairwiseLoss(IntEnum):
    """Losses of ``train_step_pairwise`` over (user, positive, negative) triples."""

    BPR = 0  # mean softplus(-(x_ui - x_uj))
    HINGE = 1  # mean max(0, 1 - (x_ui - x_uj)): the margin ranking loss (MF's WARP step)


class Optimizer(IntEnum):
    """Sparse optimizers the fused steps apply, one update per unique row."""

    SGD = 0  # w -= lr * g
    ADAGRAD = 1  # G += g^2; w -= lr * g / (sqrt(G) + eps)       (torch.optim.Adagrad)
    ROWWISE_ADAGRAD = 2  # G_row += mean_k(g^2); w -= lr * g / (sqrt(G_row) + eps)  (FBGEMM)
    ADAM = 3  # torch.optim.SparseAdam (lazy Adam: moments of touched rows only)
    ROWWISE_ADAM = 4  # FBGEMM PARTIAL_ROWWISE_ADAM: m per element, v one scalar per row


# The optimizers the fused MF steps (train_step, train_step_pairwise) apply; the embedding
# ops (sparse_update, embedding_bag_backward_update) take every Optimizer.
STEP_OPTIMIZERS = (Optimizer.SGD, Optimizer.ADAGRAD, Optimizer.ROWWISE_ADAGRAD)


class Pooling(IntEnum):
    """How an embedding bag combines its rows."""

    SUM = 0  # sum_j w_j * weight[indices[j]]
    MEAN = 1  # the sum divided by the bag size (an empty bag gives zeros)


class WeightDecay(IntEnum):
    """How the embedding ops apply ``weight_decay`` (to the rows a step touches only)."""

    NONE = 0
    L2 = 1  # g += weight_decay * w          (FBGEMM WeightDecayMode.L2)
    DECOUPLED = 2  # w -= lr * weight_decay * w    (AdamW; FBGEMM WeightDecayMode.DECOUPLE)


# The delta of the "huber" loss (F.huber_loss's default); csrc/codes.h has the same.
HUBER_DELTA = 1.0


def names(enum: type[IntEnum]) -> tuple[str, ...]:
    """The user-facing names of ``enum``'s members, in code order: ``("mse", "huber", "bce")``."""
    return tuple(member.name.lower() for member in enum)


def parse(enum: type[IntEnum], value, op: str, what: str) -> IntEnum:
    """``value`` (a member, its code or its lower-case name) as a member of ``enum``; a
    ValueError naming the op, the argument and the valid names otherwise."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum[value.upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum(value)
        except ValueError:
            raise ValueError(f"fastmf.{op}: unknown {what} code {value}; expected "
                             f"0..{len(enum) - 1}") from None
    raise ValueError(f"fastmf.{op}: unknown {what} {value!r}; expected one of {names(enum)}")
