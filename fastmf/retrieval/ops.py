"""The ``fastmf::topk_scores`` op: a thin typed wrapper, its fake kernel (for
``torch.compile``) and its autograd formula. Its meaning is
:func:`fastmf.retrieval.reference.topk_scores`; the schema is in ``csrc/fastmf.cpp``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastmf._extension import native_available

__all__ = ["topk_scores", "has_native_kernel"]


def has_native_kernel(device: torch.device | str) -> bool:
    """Whether the extension registered a topk_scores kernel for ``device``'s type."""
    if not native_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastmf::topk_scores", key
    )


def topk_scores(
    queries: Tensor,
    item_factors: Tensor,
    item_bias: Tensor | None,
    k: int,
    exclude_indptr: Tensor | None,
    exclude_indices: Tensor | None,
    candidates: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(scores (B, k), indices (B, k) int64)``: see :mod:`fastmf.retrieval.reference`."""
    return torch.ops.fastmf.topk_scores.default(
        queries, item_factors, item_bias, int(k), exclude_indptr, exclude_indices, candidates
    )


if native_available():

    @torch.library.register_fake("fastmf::topk_scores")
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
            grad_items = torch.zeros_like(item_factors).index_add_(0, idx.reshape(-1), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = item_factors.new_zeros(item_factors.shape[0]).index_add_(
                0, idx.reshape(-1), g.reshape(-1)
            )
        return grad_q, grad_items, grad_bias, None, None, None, None

    torch.library.register_autograd(
        "fastmf::topk_scores", _topk_backward, setup_context=_topk_setup
    )
