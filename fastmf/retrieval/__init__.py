"""Top-k retrieval over factor tables: exact fused top-k (:func:`topk_scores`), similar
rows (:func:`similar`), the popularity fallback (:func:`popular_items`) and approximate
candidate generation (:class:`ANNIndex`, needs ``pip install fastmf[ann]``). The meaning of
the exact functions is :mod:`fastmf.ops.reference.topk`."""

from fastmf.retrieval.ann import ANNIndex
from fastmf.retrieval.topk import popular_items, similar, topk_scores

__all__ = ["ANNIndex", "popular_items", "similar", "topk_scores"]
