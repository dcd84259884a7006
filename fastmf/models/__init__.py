"""fastmf's models: every one a :class:`~fastmf.models.base.Recommender`, trained by
:func:`fastmf.fit`, scored by :func:`fastmf.evaluate`, saved by :func:`fastmf.save` and
served by ``recommend``/``similar_items``.

Adding a model: one file ``fastmf/models/<name>.py`` defining a registered Recommender
subclass (see the "Models" section of the README), plus ONE import line below and its
names in ``__all__``. ``fastmf.MF`` (fastmf/layers.py) is a Recommender too.
"""

from fastmf.layers import MF
from fastmf.models.base import Batch, Recommender, pairwise_loss, pointwise_loss

# One import line per model file:
from fastmf.models.hybrid import Hybrid

__all__ = ["MF", "Batch", "Hybrid", "Recommender", "pairwise_loss", "pointwise_loss"]
