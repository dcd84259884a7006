"""fastmf's models: every one a :class:`~fastmf.models.base.Recommender`, trained by
:func:`fastmf.fit`, scored by :func:`fastmf.evaluate`, saved by :func:`fastmf.save` and
served by ``recommend``/``similar_items``.

Adding a model: one file ``fastmf/models/<name>.py`` defining a registered Recommender
subclass (see the "Models" section of the README), plus ONE import line below and its
names in ``__all__``. ``fastmf.MF`` (fastmf/layers.py) is a Recommender too.
"""

# One import line per model file (sorted):
from fastmf.layers import MF
from fastmf.models.als import ALS
from fastmf.models.base import Batch, Recommender, pairwise_loss, pointwise_loss
from fastmf.models.hybrid import Hybrid
from fastmf.models.item2vec import Item2Vec
from fastmf.models.ncf import GMF, MLP, NeuMF
from fastmf.models.svdpp import SVDpp, TimeSVDpp

__all__ = [
    "MF",
    "Batch",
    "Recommender",
    "pairwise_loss",
    "pointwise_loss",
    "ALS",
    "GMF",
    "Hybrid",
    "MLP",
    "NeuMF",
    "Item2Vec",
    "SVDpp",
    "TimeSVDpp",
]
