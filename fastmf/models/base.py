"""The model protocol: :class:`Recommender` (the base class of every fastmf model),
:class:`Batch` and the loss helpers :func:`pointwise_loss` / :func:`pairwise_loss` /
:func:`warp_loss`.

The code lives in :mod:`fastmf.recommender`: ``fastmf.MF`` is a Recommender and ``import
fastmf`` must not run this package's ``__init__`` (it imports every model file). Import
the names from here: ``from fastmf.models.base import Batch, Recommender``.
"""

from fastmf.optim import CombinedOptimizer
from fastmf.recommender import (
    EXPLICIT,
    FIT_LOSSES,
    IMPLICIT,
    SCORE_CHUNK,
    Batch,
    Recommender,
    loss_kind,
    pairwise_loss,
    pointwise_loss,
    seed_of,
    warp_loss,
)

__all__ = ["EXPLICIT", "IMPLICIT", "FIT_LOSSES", "SCORE_CHUNK", "Batch", "CombinedOptimizer",
           "Recommender", "loss_kind", "pairwise_loss", "pointwise_loss", "seed_of",
           "warp_loss"]
