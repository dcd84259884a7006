"""Modules users compose into recommenders: :class:`Embedding` and :class:`EmbeddingBag`,
the fused embedding layer (sparse gradients, or the optimizer applied in backward with
:func:`fastmf.optim.apply_in_backward`; float16/bfloat16 tables with stochastic rounding).

>>> import torch, fastmf
>>> users, items = fastmf.nn.Embedding(100, 8), fastmf.nn.Embedding(50, 8)
>>> opt = fastmf.optim.apply_in_backward(
...     fastmf.optim.SparseAdagrad([*users.parameters(), *items.parameters()], lr=0.1))
>>> u, i = torch.tensor([1, 2, 2]), torch.tensor([5, 5, 7])
>>> loss = ((users(u) * items(i)).sum(1) - 1.0).pow(2).mean()
>>> loss.backward()          # both tables are updated here; no .grad is kept
>>> users.weight.grad is None
True
"""

from fastmf.nn.embedding import Embedding, EmbeddingBag, grow

__all__ = ["Embedding", "EmbeddingBag", "grow"]
