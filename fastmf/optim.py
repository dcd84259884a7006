"""Optimizers whose sparse step is one fused kernel: duplicate rows summed, then one
update per unique row — never a dense pass over the table.

- :class:`SparseSGD`: ``w -= lr·g``. No state.
- :class:`SparseAdagrad` (``rowwise=False``): the numbers of ``torch.optim.Adagrad``
  (lr_decay=0); ``rowwise=True``: FBGEMM's exact row-wise Adagrad::

      element-wise:  G += g²;          w -= lr·g / (√G + eps)        state: K floats per row
      row-wise:      G += mean_k(g²);  w -= lr·g / (√G_row + eps)    state: 1 float per row

- :class:`SparseAdam` (``rowwise=False``): the numbers of ``torch.optim.SparseAdam`` (2K
  floats per row); ``rowwise=True``: FBGEMM's PARTIAL_ROWWISE_ADAM (K + 1 floats per row).

Every optimizer takes ``weight_decay``. Dense gradients get torch's numbers
(``torch.optim.SGD/Adagrad/Adam(weight_decay=...)``, AdamW for decoupled decay). Sparse
gradients and steps in backward decay only the rows the step touches (FBGEMM's
``WeightDecayMode.L2``: ``g += weight_decay·w``; ``SparseAdam(decoupled_weight_decay=True)``:
``w -= lr·weight_decay·w``); torch's own sparse optimizers refuse weight decay.

States are float32 for float16/bfloat16 (and float32) parameters, float64 for float64
ones. Updates of float16/bfloat16 parameters are computed in float32 and written back with
stochastic rounding (the fastmf.nn module's setting; on by default for half tables).

:func:`apply_in_backward` moves the update of every fastmf.nn embedding weight an optimizer
holds into the backward pass (see :mod:`fastmf.nn`).
"""

from __future__ import annotations

import math
from collections import ChainMap, OrderedDict

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from fastmf import ops
from fastmf.memory import cat_rows, empty_table
from fastmf.nn import embedding as nn_embedding
from fastmf.nn.embedding import embedding_kernels, stochastic_rounding_of, table_info
from fastmf.ops import checks
from fastmf.ops.args import RowOptimizerArgs
from fastmf.ops.codes import Optimizer, Pooling, WeightDecay
from fastmf.ops.reference.embedding_bag import random_bits, stochastic_round

__all__ = ["CombinedOptimizer", "SparseAdagrad", "SparseAdam", "SparseSGD", "apply_in_backward",
           "grown_state"]


def _sparse_parts(grad: Tensor, op: str = "fastmf.optim") -> tuple[Tensor, Tensor]:
    """(ids (nnz,), rows (nnz, ...)) of a COO gradient, coalesced or not.

    A gradient with more than one sparse dimension (``Tensor.to_sparse()`` of a 2-D
    gradient: one value per nonzero element) is grouped by row first, as torch's sparse
    optimizers take it: one row per distinct first index, zeros where that row has no
    element. That allocates (distinct rows, ...) values, never the whole table."""
    sparse_dim = grad.sparse_dim()
    if sparse_dim == 1:
        return grad._indices()[0], grad._values()
    if sparse_dim == 0:
        raise ValueError(f"{op}: a sparse gradient with no sparse dimension (shape "
                         f"{tuple(grad.shape)}, sparse_dim 0) is not supported; give the "
                         "parameter a dense gradient or a row-sparse one (to_sparse(1))")
    grad = grad.coalesce()
    indices, values = grad._indices(), grad._values()
    # coalesced: indices sorted row-major, so the rows come out in increasing order
    ids, rows_of = torch.unique_consecutive(indices[0], return_inverse=True)
    rows = values.new_zeros((ids.numel(), *grad.shape[1:]))
    rows[(rows_of, *indices[1:])] = values
    return ids, rows


def _step_hooks_registered(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step pre- or post-hook is registered on ``optimizer``
    (``register_step_pre_hook``) or for every optimizer
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``); True where torch keeps
    them elsewhere than this reads, so that such hooks are never skipped."""
    registries = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
                  getattr(optimizer, "_optimizer_step_post_hooks", None),
                  getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
                  getattr(torch_optimizer, "_global_optimizer_post_hooks", None))
    return any(r is None or len(r) > 0 for r in registries)


def has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step hook is registered on ``optimizer``, on one of its parts (a
    :class:`CombinedOptimizer`) or for every optimizer: then a training loop must call
    step() batch by batch, and an op that runs an epoch's steps in one call may not."""
    parts = getattr(optimizer, "optimizers", ())
    return _step_hooks_registered(optimizer) or any(has_step_hooks(p) for p in parts)


def _is_legacy_dtype(param: Tensor) -> bool:
    """float32/float64 parameters: the dtypes sparse_sgd_update/sparse_adagrad_update take."""
    return param.dtype in checks.WEIGHT_DTYPES


class _TensorSet(nn_embedding._TensorMap):
    """A set of tensors by identity, each dropped when it dies (weak references, as
    fastmf.nn.embedding's maps): a raw ``id()`` kept instead could name a new tensor that
    reuses the address of a freed one."""

    def add(self, tensor: Tensor) -> None:
        self[tensor] = True

    def discard(self, tensor: Tensor | int) -> None:
        """Drop ``tensor``; an int is the ``id()`` of a live tensor (fastmf.recommender
        passes one): an entry under it is that tensor, since dead ones are dropped."""
        if isinstance(tensor, int):
            self._items.pop(tensor, None)
        else:
            self.pop(tensor)

    def __len__(self) -> int:
        return len(self._items)


class _SparseOptimizer(torch.optim.Optimizer):
    SETTINGS = ("lr", "weight_decay")

    def __init__(self, params, defaults, backend: str):
        super().__init__(params, defaults)
        if backend != "auto":
            ops.resolve_backend(backend)
        self.backend = backend
        # The parameters apply_in_backward registered for this optimizer: step() looks for
        # them (fastmf.nn.embedding.fused_optimizer(p) is self) only when there are some.
        self._in_backward = _TensorSet()

    def __getstate__(self) -> dict:
        """torch's state (defaults, state, param_groups) and the backend. Not the kernel
        cache (modules do not pickle), nor which parameters are updated in backward: a copy
        (copy.deepcopy, pickle, torch.save/load) holds new parameter objects, so it steps
        them in step() unless apply_in_backward is called on it. Hooks are dropped, as
        torch drops them."""
        state = super().__getstate__()
        state["backend"] = self.backend
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self._in_backward = _TensorSet()

    def check_groups(self) -> None:
        """Every group's settings are finite and >= 0 (betas in [0, 1)); they can be edited
        between steps, e.g. by a scheduler: checked for all groups before any write."""
        for group in self.param_groups:
            self.check_group(group)

    def check_group(self, group: dict) -> None:
        """One group's settings, as :meth:`check_groups` checks them."""
        op = f"{type(self).__name__}.step"
        checks.check_settings(op, **{k: group[k] for k in self.SETTINGS})
        if "eps" in self.SETTINGS:
            checks.check_positive(op, eps=group["eps"])
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, tuple | list) or len(betas) != 2:
                raise ValueError(f"fastmf.{type(self).__name__}: betas must be a pair, got "
                                 f"{betas!r}")
            checks.check_betas(op, *betas)

    def hyperparameters(self, param: Tensor) -> dict:
        """The group settings that apply to ``param`` (KeyError if it is not optimised)."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("fastmf: this parameter is not in the optimizer")

    # --- what each optimizer defines ------------------------------------------------------
    def row_optimizer(self, group: dict) -> Optimizer:
        raise NotImplementedError

    def states(self, param: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(state1, state2) of ``param`` as the embedding ops take them."""
        return None, None

    def weight_decay_mode(self, group: dict) -> WeightDecay:
        return WeightDecay.L2 if group["weight_decay"] else WeightDecay.NONE

    def element_sparse_step(self, param: Tensor, grad: Tensor, group: dict,
                            step: int) -> bool:
        """A step with a gradient of several sparse dimensions (one value per element) that
        the row form (:func:`_sparse_parts`: absent elements of a touched row are zeros)
        would not give torch's numbers for; False where it does (SGD, Adagrad: a zero
        gradient leaves an element as it is)."""
        return False

    def dense_update(self, param: Tensor, grad: Tensor, group: dict, step: int) -> None:
        """Torch's update for a dense gradient, in place on ``param`` (float32/float64;
        a float32 copy of a half parameter)."""
        raise NotImplementedError

    # --- shared machinery -----------------------------------------------------------------
    def _row_args(self, group: dict, param: Tensor, step: int) -> tuple:
        """The flat optimizer arguments of sparse_update/embedding_bag_backward_update."""
        stochastic, seed = stochastic_rounding_of(param)
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        return (int(self.row_optimizer(group)), float(group["lr"]), float(group.get("eps", 0.0)),
                float(beta1), float(beta2), float(group["weight_decay"]),
                int(self.weight_decay_mode(group)), step, seed, stochastic)

    def _next_step(self, param: Tensor) -> int:
        return self.state[param].get("step", 0) + 1

    def sparse_step(self, param: Tensor, group: dict, ids: Tensor, rows: Tensor,
                    step: int) -> None:
        """One exact sparse step through the sparse_update kernel."""
        embedding_kernels(self.backend, param.device).sparse_update(
            param.detach(), *self.states(param), ids, rows.contiguous(),
            *self._row_args(group, param, step))

    def _dense_step(self, param: Tensor, grad: Tensor, group: dict, step: int) -> None:
        if _is_legacy_dtype(param):
            self.dense_update(param, grad, group, step)
            return
        # Half parameters: the update in float32, written back rounded like the sparse path
        # (the counter of element i is its flat index, as r·K + c is for a 2-D table).
        work = param.detach().float()
        self.dense_update(work, grad.float(), group, step)
        stochastic, seed = stochastic_rounding_of(param)
        if stochastic:
            flat = torch.arange(work.numel(), device=work.device)
            bits = random_bits(flat, 1, seed, step).view(work.shape)
            param.copy_(stochastic_round(work, param.dtype, bits))
        else:
            param.copy_(work)

    def step(self, closure=None):
        """torch's step (hooks, profiler label, then :meth:`_step`), except that it returns
        at once when every parameter is updated in backward (:func:`apply_in_backward`:
        then there is nothing to step here, whatever ``.grad`` holds) and no step hook is
        registered: the usual loop with fused tables (``fastmf.fit``, the models' training
        steps) calls step() and zero_grad() around each backward pass. Through torch's
        wrappers, right after a backward pass, they took 37 + 23 us of a 1,340 us Hybrid
        step on ml-latest-small (two threads) and 60-100 + 15-23 us of a 1.4 ms
        ``fastmf.nn.Embedding`` MF step (8,192 pairs), for nothing: the Python that
        follows the kernels runs from cold caches (benchmarks/README.md)."""
        if closure is None and self._all_in_backward() and not _step_hooks_registered(self):
            return None
        return self._hooked_step(closure)

    # torch.optim.Optimizer wraps a class's step in profile_hook_step unless it is marked
    # hooked; ours calls the wrapped _step itself, so the wrapper runs once.
    step.hooked = True

    def _all_in_backward(self) -> bool:
        """Whether this optimizer updates every parameter in backward (step() then skips
        them all)."""
        if not self._in_backward:
            return False
        fused_optimizer = nn_embedding.fused_optimizer
        return all(fused_optimizer(p) is self for group in self.param_groups
                   for p in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; with ``set_to_none`` (the default) a plain loop that sets
        every ``.grad`` to None, without torch's profiler label (see :meth:`step` for what
        that cost after a backward pass)."""
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    @torch.no_grad()
    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_groups()
        # The registry, not a list of ours: it forgets a weight that dies, and a new
        # parameter is never mistaken for it.
        fused_optimizer = nn_embedding.fused_optimizer if self._in_backward else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or (fused_optimizer is not None
                                      and fused_optimizer(p) is self):
                    continue
                step = self._next_step(p)
                if p.grad.is_sparse:
                    if p.grad.sparse_dim() < 2 or not self.element_sparse_step(p, p.grad,
                                                                               group, step):
                        ids, rows = _sparse_parts(p.grad,
                                                  f"fastmf.{type(self).__name__}.step")
                        self.sparse_step(p, group, ids, rows, step)
                else:
                    self._dense_step(p, p.grad, group, step)
                self.state[p]["step"] = step
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def apply_fused(self, weight: Tensor, grad_output: Tensor, indices: Tensor,
                    offsets: Tensor, per_sample_weights: Tensor | None,
                    pooling: Pooling) -> None:
        """The step of a weight updated in backward: one embedding_bag_backward_update call
        with the group's settings now (checked first: only this weight is written), then
        the weight's step count advances. No no_grad() here: the kernels' wrappers run
        their ops under no_grad, and nothing else here records a graph."""
        group = self.hyperparameters(weight)
        self.check_group(group)
        step = self._next_step(weight)
        self.fused_kernels(weight.device).embedding_bag_backward_update(
            weight.detach(), *self.states(weight), grad_output, indices, offsets,
            per_sample_weights, int(pooling), *self._row_args(group, weight, step))
        self.state[weight]["step"] = step

    def apply_fused_pair(self, weight: Tensor, grad_output: Tensor, weight_b: Tensor,
                         grad_output_b: Tensor, indices: Tensor, offsets: Tensor,
                         per_sample_weights: Tensor | None, pooling: Pooling) -> None:
        """:meth:`apply_fused` of two weights pooled by the same bags (a table and its bias
        column), in one embedding_bag_backward_update_pair call when both are in the same
        group (so the same settings) and on the same device: the bags are read and grouped
        once. Otherwise :meth:`apply_fused` on each. The same numbers either way."""
        group = self.hyperparameters(weight)
        if self.hyperparameters(weight_b) is not group or weight_b.device != weight.device:
            self.apply_fused(weight, grad_output, indices, offsets, per_sample_weights, pooling)
            self.apply_fused(weight_b, grad_output_b, indices, offsets, per_sample_weights,
                             pooling)
            return
        self.check_group(group)
        step, step_b = self._next_step(weight), self._next_step(weight_b)
        settings = self._row_args(group, weight, step)
        # (step, seed, stochastic rounding) of the second weight: its own.
        own_b = self._row_args(group, weight_b, step_b)[-3:]
        self.fused_kernels(weight.device).embedding_bag_backward_update_pair(
            weight.detach(), *self.states(weight), grad_output, weight_b.detach(),
            *self.states(weight_b), grad_output_b, indices, offsets, per_sample_weights,
            int(pooling), *settings, *own_b)
        self.state[weight]["step"] = step
        self.state[weight_b]["step"] = step_b

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, then the states of float16/bfloat16 weights in the
        accumulation type the kernels keep them in (float32): torch casts every floating
        state to its parameter's dtype, which rounded the saved float32 sums and moments to
        half precision and left them in a dtype the fused updates refuse (a resumed fit of
        a half-precision model failed at its first step)."""
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, param in zip(saved_ids, params):
            if param.dtype not in checks.HALF_DTYPES:
                continue
            dtype = checks.accumulation_dtype(param.dtype)
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, dtype=dtype,
                                                      copy=True)

    def next_row_args(self, weight: Tensor) -> RowOptimizerArgs:
        """The settings of ``weight``'s next fused step, as :meth:`apply_fused` passes them to
        the kernels: its group's, checked now, with the step count after this step, its
        seed and its rounding. For an op that runs several steps in one call (step + t at
        its t-th), which then counts them with :meth:`count_steps`."""
        group = self.hyperparameters(weight)
        self.check_group(group)
        return RowOptimizerArgs(*self._row_args(group, weight, self._next_step(weight)))

    def count_steps(self, weight: Tensor, count: int) -> None:
        """Advance ``weight``'s step count by ``count`` fused steps an op ran in one call."""
        if count:
            self.state[weight]["step"] = self._next_step(weight) + count - 1

    def fused_kernels(self, device: torch.device):
        """embedding_kernels(self.backend, device), resolved once per device."""
        cache = self.__dict__.setdefault("_fused_kernels_by_device", {})
        key = (self.backend, device)
        kernels = cache.get(key)
        if kernels is None:
            kernels = cache[key] = embedding_kernels(self.backend, device)
        return kernels


class SparseAdagrad(_SparseOptimizer):
    """Adagrad with an exact fused sparse step (see the module docstring).

    Args: ``lr``, ``eps``, ``initial_accumulator_value`` as in ``torch.optim.Adagrad``;
    ``rowwise``: one accumulator per row; ``backend``: which kernels apply sparse steps;
    ``weight_decay``: dense gradients as ``torch.optim.Adagrad(weight_decay=...)``, sparse
    ones decay the touched rows only (``g += weight_decay·w``).

    Memory per row of a (N, K) table: K floats (element-wise) or 1 float (row-wise).

    >>> import fastmf
    >>> model = fastmf.MF(100, 50, dim=8, sparse=True)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    """

    SETTINGS = ("lr", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, rowwise: bool = False,
                 backend: str = "auto", *, weight_decay: float = 0.0):
        checks.check_settings("SparseAdagrad", lr=lr, eps=eps,
                              initial_accumulator_value=initial_accumulator_value,
                              weight_decay=weight_decay)
        checks.check_positive("SparseAdagrad", eps=eps)
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                        rowwise=bool(rowwise), weight_decay=weight_decay)
        super().__init__(params, defaults, backend)
        for group in self.param_groups:
            for p in group["params"]:
                self.state_for(p)

    def state_for(self, param: Tensor) -> Tensor:
        """The accumulator of ``param``: shaped like it, or (N,) when row-wise."""
        state = self.state[param]
        dtype = checks.accumulation_dtype(param.dtype)
        if "sum" not in state:
            group = self.hyperparameters(param)
            shape = param.shape[:1] if group["rowwise"] else param.shape
            state["sum"] = empty_table(shape, dtype=dtype, device=param.device).fill_(
                group["initial_accumulator_value"])
        elif state["sum"].dtype != dtype:
            # The parameter changed dtype (module.double(), .float()): as torch's optimizers
            # go on, the sums go on in the new accumulation type.
            state["sum"] = state["sum"].to(dtype)
        return state["sum"]

    def row_optimizer(self, group: dict) -> Optimizer:
        return Optimizer.ROWWISE_ADAGRAD if group["rowwise"] else Optimizer.ADAGRAD

    def states(self, param: Tensor):
        return self.state_for(param), None

    def sparse_step(self, param, group, ids, rows, step) -> None:
        if group["weight_decay"] == 0 and _is_legacy_dtype(param):
            ops.kernels(self.backend, param.device).sparse_adagrad_update(
                param.detach(), self.state_for(param), ids, rows.contiguous(), group["lr"],
                group["eps"], group["rowwise"])
        else:
            super().sparse_step(param, group, ids, rows, step)

    def dense_update(self, param, grad, group, step) -> None:
        state = self.state_for(param)
        lr, eps = group["lr"], group["eps"]
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        if group["rowwise"] and param.dim() == 2:
            state.add_(grad.pow(2).mean(1))
            param.sub_(lr * grad / state.sqrt().add_(eps).unsqueeze(1))
        else:
            state.addcmul_(grad, grad, value=1.0)
            param.addcdiv_(grad, state.sqrt().add_(eps), value=-lr)


class SparseSGD(_SparseOptimizer):
    """Plain SGD (``w -= lr·g``) with a fused sparse step for sparse gradients. No state
    (0 bytes per row). ``weight_decay``: dense gradients as ``torch.optim.SGD(weight_decay=
    ...)``, sparse ones decay the touched rows only (``g += weight_decay·w``).

    >>> import fastmf
    >>> model = fastmf.MF(100, 50, dim=8, sparse=True)
    >>> opt = fastmf.optim.SparseSGD(model.parameters(), lr=0.1)
    """

    def __init__(self, params, lr: float = 1e-2, backend: str = "auto", *,
                 weight_decay: float = 0.0):
        checks.check_settings("SparseSGD", lr=lr, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), backend)

    def row_optimizer(self, group: dict) -> Optimizer:
        return Optimizer.SGD

    def sparse_step(self, param, group, ids, rows, step) -> None:
        if group["weight_decay"] == 0 and _is_legacy_dtype(param):
            ops.kernels(self.backend, param.device).sparse_sgd_update(
                param.detach(), ids, rows.contiguous(), group["lr"])
        else:
            super().sparse_step(param, group, ids, rows, step)

    def dense_update(self, param, grad, group, step) -> None:
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        param.add_(grad, alpha=-group["lr"])


class SparseAdam(_SparseOptimizer):
    """Adam with an exact fused sparse step.

    ``rowwise=False``: the numbers of ``torch.optim.SparseAdam`` for sparse gradients (lazy
    Adam: the moments of the rows a step touches advance; the bias correction uses the
    parameter's step count, which every step() with a gradient advances, as torch does)::

        m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²
        w -= lr·√(1-b2^t)/(1-b1^t) · m / (√v + eps)

    Memory per row: 2K floats. ``rowwise=True``: FBGEMM's PARTIAL_ROWWISE_ADAM, ``v`` one
    scalar per row (K + 1 floats per row)::

        m = b1·m + (1-b1)·g;  v_row = b2·v_row + (1-b2)·mean_k(g²)
        w -= lr/(1-b1^t) · m / (√(v_row/(1-b2^t)) + eps)

    Dense gradients (torch's SparseAdam refuses them): ``torch.optim.Adam``'s numbers
    (AdamW's with ``decoupled_weight_decay``); row-wise, the formula above on every row.
    ``weight_decay``: L2 (``g += weight_decay·w``) or, with ``decoupled_weight_decay=True``,
    AdamW's ``w -= lr·weight_decay·w``; sparse steps decay the touched rows only.

    >>> import torch, fastmf
    >>> emb = fastmf.nn.Embedding(1000, 16)
    >>> opt = fastmf.optim.SparseAdam(emb.parameters(), lr=1e-3, rowwise=True)
    """

    SETTINGS = ("lr", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, rowwise: bool = False, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, backend: str = "auto"):
        checks.check_settings("SparseAdam", lr=lr, eps=eps, weight_decay=weight_decay)
        checks.check_positive("SparseAdam", eps=eps)
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"fastmf.SparseAdam: betas must be a pair, got {betas!r}")
        checks.check_betas("SparseAdam", *betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, rowwise=bool(rowwise),
                        weight_decay=weight_decay,
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults, backend)
        for group in self.param_groups:
            for p in group["params"]:
                self.states(p)

    def states(self, param: Tensor) -> tuple[Tensor, Tensor]:
        """(exp_avg like ``param``, exp_avg_sq like it or (N,) when row-wise)."""
        state = self.state[param]
        dtype = checks.accumulation_dtype(param.dtype)
        if "exp_avg" not in state:
            group = self.hyperparameters(param)
            state["exp_avg"] = empty_table(param.shape, dtype=dtype, device=param.device).zero_()
            shape = param.shape[:1] if group["rowwise"] and param.dim() == 2 else param.shape
            state["exp_avg_sq"] = empty_table(shape, dtype=dtype, device=param.device).zero_()
        elif state["exp_avg"].dtype != dtype or state["exp_avg_sq"].dtype != dtype:
            # The parameter changed dtype (module.double(), .float()): the moments go on in
            # the new accumulation type, as torch's optimizers go on.
            state["exp_avg"] = state["exp_avg"].to(dtype)
            state["exp_avg_sq"] = state["exp_avg_sq"].to(dtype)
        return state["exp_avg"], state["exp_avg_sq"]

    def row_optimizer(self, group: dict) -> Optimizer:
        return Optimizer.ROWWISE_ADAM if group["rowwise"] else Optimizer.ADAM

    def element_sparse_step(self, param, grad, group, step) -> bool:
        """Element-wise (``rowwise=False``): torch.optim.SparseAdam's numbers for a gradient
        of several sparse dimensions: only its elements' moments and weights move (in the
        row form the absent elements of a touched row would decay). In the accumulation
        type; half weights written back rounded as the sparse path rounds them. Row-wise
        Adam keeps the row form (one ``v`` per row)."""
        if group["rowwise"] or not param.is_contiguous():
            return False
        grad = grad.coalesce()
        sparse_dim, shape = grad.sparse_dim(), grad.shape
        indices = grad._indices()
        width = math.prod(shape[sparse_dim:])
        inner = torch.zeros_like(indices[0])
        for d in range(1, sparse_dim):
            inner = inner * shape[d] + indices[d]
        cols = (inner.unsqueeze(1) * width
                + torch.arange(width, device=inner.device)).reshape(-1)
        rows = indices[0].unsqueeze(1).expand(-1, width).reshape(-1)
        exp_avg, exp_avg_sq = self.states(param)
        dtype = exp_avg.dtype
        table = param.detach().view(shape[0], -1)
        m_all, v_all = exp_avg.view(shape[0], -1), exp_avg_sq.view(shape[0], -1)
        g = grad._values().reshape(-1).to(dtype)
        w = table[rows, cols].to(dtype)
        lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
        decay = group["weight_decay"]
        if decay and group["decoupled_weight_decay"]:
            w = w * (1 - lr * decay)
        elif decay:
            g = g + decay * w
        m, v = m_all[rows, cols], v_all[rows, cols]
        m = m + (g - m) * (1 - beta1)
        v = v + (g * g - v) * (1 - beta2)
        m_all[rows, cols], v_all[rows, cols] = m, v
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        w = w - step_size * (m / (v.sqrt() + eps))
        stochastic, seed = stochastic_rounding_of(param)
        if stochastic:
            bits = random_bits(rows, table.shape[1], seed, step)
            bits = bits.gather(1, cols.unsqueeze(1)).squeeze(1)
            w = stochastic_round(w.float(), param.dtype, bits)
        table[rows, cols] = w.to(param.dtype)
        return True

    def weight_decay_mode(self, group: dict) -> WeightDecay:
        if not group["weight_decay"]:
            return WeightDecay.NONE
        return WeightDecay.DECOUPLED if group["decoupled_weight_decay"] else WeightDecay.L2

    def dense_update(self, param, grad, group, step) -> None:
        exp_avg, exp_avg_sq = self.states(param)
        lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
        decay = group["weight_decay"]
        if decay and group["decoupled_weight_decay"]:
            param.mul_(1 - lr * decay)
        elif decay:
            grad = grad.add(param, alpha=decay)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        exp_avg.lerp_(grad, 1 - beta1)
        if group["rowwise"] and param.dim() == 2:
            exp_avg_sq.mul_(beta2).add_(grad.pow(2).mean(1), alpha=1 - beta2)
            denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps).unsqueeze(1)
            param.sub_((lr / bias_correction1) * exp_avg / denom)
        elif group["rowwise"]:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
            param.sub_((lr / bias_correction1) * exp_avg / denom)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def apply_in_backward(optimizer: _SparseOptimizer) -> _SparseOptimizer:
    """Apply ``optimizer``'s update of every fastmf.nn Embedding/EmbeddingBag weight it holds
    inside the backward pass; returns the optimizer.

    For each such weight, each backward pass ends with ONE ``embedding_bag_backward_update``
    call covering every use of the table in the graph (the uses are merged in forward order),
    with the group's settings at that time; the weight's step count then advances. No
    gradient is kept (``weight.grad`` stays None) and ``optimizer.step()`` skips the weight;
    the optimizer's other parameters (an MLP, biases of plain tensors) step as usual. The
    result equals ``backward(); step()`` within float32 rounding. A backward pass that raises
    applies none of its updates: they belong to that pass and are dropped with it, and the
    next pass trains as if it had not run.

    Raises TypeError for an optimizer that is not a fastmf sparse optimizer, ValueError when
    it holds no fastmf.nn weight or one weight twice, RuntimeError when a weight is already
    updated in backward (by this or another optimizer). Nothing is changed on error.

    >>> import torch, fastmf
    >>> emb = fastmf.nn.Embedding(100, 8)
    >>> opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdam(emb.parameters()))
    >>> emb(torch.tensor([1, 2, 2])).sum().backward()   # emb.weight is updated here
    """
    op = "fastmf.optim.apply_in_backward"
    if not isinstance(optimizer, _SparseOptimizer):
        raise TypeError(f"{op}: optimizer must be a fastmf.optim sparse optimizer (SparseSGD, "
                        f"SparseAdagrad, SparseAdam), got {type(optimizer).__name__}")
    optimizer.check_groups()
    tables, seen = [], set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            info = table_info(p)
            if info is None:
                continue
            if id(p) in seen:
                raise ValueError(f"{op}: the optimizer holds the {info.name} weight twice")
            seen.add(id(p))
            tables.append((p, info))
    if not tables:
        raise ValueError(f"{op}: the optimizer holds no fastmf.nn Embedding/EmbeddingBag "
                         "weight")
    for p, info in tables:
        if nn_embedding.fused_optimizer(p) is not None:
            raise RuntimeError(f"{op}: the {info.name} weight is already updated in backward "
                               "(apply_in_backward was called for it before)")
    for p, _ in tables:
        nn_embedding.register_fused(p, optimizer)
        optimizer._in_backward.add(p)
    return optimizer


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters driven as one (TorchRec's name for the
    same thing): e.g. a fastmf sparse optimizer for the embedding tables (applied in
    backward) and ``torch.optim.Adam`` for an MLP.

    ``step``, ``zero_grad``, ``state_dict``/``load_state_dict`` go to every part in order;
    ``param_groups`` lists the parts' groups (the same dicts, so an LR scheduler or an edit
    of ``group["lr"]`` reaches the part that owns it); ``state`` reads every part's state.
    ``optimizers`` holds the parts.

    Hooks registered on it run as a torch optimizer runs them: step pre/post hooks around
    the parts' steps (``hook(self, args, kwargs)``, ``args == (self,)`` or ``(self,
    closure)``), state_dict and load_state_dict hooks around theirs. Hooks registered for
    every optimizer (``torch.optim.optimizer.register_optimizer_step_pre_hook``) run once
    per part, in the part's step. A copy (``copy.deepcopy``, pickle, ``torch.save``) copies
    every part and, as torch's copies do, keeps no hook.

    >>> import torch, fastmf
    >>> emb, head = fastmf.nn.Embedding(100, 8), torch.nn.Linear(8, 1)
    >>> opt = fastmf.optim.CombinedOptimizer([
    ...     fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(emb.parameters())),
    ...     torch.optim.Adam(head.parameters(), lr=1e-3)])
    """

    def __init__(self, optimizers):
        op = "fastmf.optim.CombinedOptimizer"
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError(f"{op}: optimizers is empty")
        seen: dict[int, int] = {}
        for k, part in enumerate(optimizers):
            if not isinstance(part, torch.optim.Optimizer) or isinstance(part,
                                                                        CombinedOptimizer):
                raise TypeError(f"{op}: optimizers[{k}] must be a torch optimizer (not a "
                                f"CombinedOptimizer), got {type(part).__name__}")
            for group in part.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(f"{op}: a parameter is held by optimizers"
                                         f"[{seen[id(p)]}] and optimizers[{k}]")
                    seen[id(p)] = k
        self.optimizers = optimizers
        # What torch.optim.Optimizer.__init__ sets up besides the groups (hooks, defaults),
        # so that LR schedulers and hook registration work; the groups and state are the
        # parts' own (properties below).
        self.defaults = {}
        self._new_hooks()

    _HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
              "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
              "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

    def _new_hooks(self) -> None:
        for name in self._HOOKS:
            setattr(self, name, OrderedDict())

    def __getstate__(self) -> dict:
        """The parts (each copied through its own ``__getstate__``) and the defaults; no
        hooks, as torch's ``Optimizer.__getstate__`` keeps none (they are often lambdas,
        which do not pickle)."""
        return {"optimizers": self.optimizers, "defaults": self.defaults}

    def __setstate__(self, state: dict) -> None:
        self.optimizers = list(state["optimizers"])
        self.defaults = state.get("defaults", {})
        self._new_hooks()

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.optimizers for group in part.param_groups]

    @property
    def state(self):
        return ChainMap(*(part.state for part in self.optimizers))

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("fastmf.optim.CombinedOptimizer.add_param_group: add the "
                                  "group to one of its optimizers")

    def step(self, closure=None):
        """Every part's step; with step hooks registered on this optimizer, inside torch's
        profiler label and between its pre- and post-hooks (as
        ``torch.optim.Optimizer.profile_hook_step`` runs them; without, no label: see
        the sparse optimizers' step for what it costs)."""
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks:
            args = (self,) if closure is None else (self, closure)
            return self._hooked_step(args, {})
        return self._step(closure)

    step.hooked = True

    def _hooked_step(self, args: tuple, kwargs: dict):
        with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in list(self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"fastmf.optim.CombinedOptimizer.step: a step "
                                           "pre-hook must return None or a tuple (new_args, "
                                           f"new_kwargs), got {result!r}")
            out = type(self)._step(*args, **kwargs)
            for post_hook in list(self._optimizer_step_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.optimizers:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.optimizers:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """``{"optimizers": [each part's state_dict()]}``, after the state_dict pre-hooks
        (``hook(self)``) and through the post-hooks (``hook(self, state_dict)``, whose
        non-None result replaces it), as torch's state_dict runs them."""
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        state_dict = {"optimizers": [part.state_dict() for part in self.optimizers]}
        for post_hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Each part's load_state_dict, after the load_state_dict pre-hooks (``hook(self,
        state_dict)`` on a shallow copy; a non-None result replaces it) and before the
        post-hooks (``hook(self)``), as torch's load_state_dict runs them."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            count = len(parts) if isinstance(parts, list) else "no"
            raise ValueError(f"fastmf.optim.CombinedOptimizer.load_state_dict: expected "
                             f"{{'optimizers': [...]}} with {len(self.optimizers)} entries, "
                             f"got {count}")
        for part, saved in zip(self.optimizers, parts, strict=True):
            part.load_state_dict(saved)
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)

    def __repr__(self) -> str:
        inner = ",\n".join("  " + repr(part).replace("\n", "\n  ") for part in self.optimizers)
        return f"CombinedOptimizer(\n{inner}\n)"


def check_steps_its_tables(optimizer, params, op: str) -> None:
    """ValueError when a fastmf.nn weight among ``params`` is updated in backward by an
    optimizer other than ``optimizer`` (or one of its parts): a training loop that steps
    ``optimizer`` would train that weight with the other one's settings (the newest
    ``make_optimizer``, or an ``apply_in_backward`` call, takes the tables over)."""
    holders = {id(h) for h in _holders(optimizer)}
    for p in params:
        fused = nn_embedding.fused_optimizer(p)
        if fused is not None and id(fused) not in holders:
            info = table_info(p)
            name = info.name if info is not None else "a table"
            lr = fused.hyperparameters(p)["lr"]
            raise ValueError(f"{op}: the {name} weight is updated in backward by another "
                             f"optimizer ({type(fused).__name__}, lr {lr}) than the one given: "
                             "a later make_optimizer or apply_in_backward took the tables "
                             "over; pass that optimizer, or make this one again")


def _holders(optimizer) -> list:
    """The torch optimizers inside ``optimizer`` (itself, or the parts of a combined one)."""
    parts = getattr(optimizer, "optimizers", None)
    if isinstance(parts, list | tuple):
        return [p for part in parts for p in _holders(part)]
    return [optimizer]


def grown_state(optimizer, param: Tensor, extra_rows: int) -> tuple[dict, dict]:
    """The state of ``param`` in ``optimizer`` for ``param`` grown by ``extra_rows`` rows,
    computed without changing anything: ``(state, new)`` where ``state`` is the optimizer's
    state dict of ``param`` and ``new`` maps its keys to the grown tensors; the caller applies
    ``state.update(new)`` when every other part of the growth has succeeded.

    Row-shaped state tensors (first dimension = the parameter's rows) are extended: Adagrad
    accumulators with the group's ``initial_accumulator_value``, everything else (Adam's
    moments, row-wise sums) with zeros, as a fresh row would start. Step counts are kept.
    ``optimizer`` may be a combined optimizer with an ``optimizers`` list.

    Raises ValueError when no part of ``optimizer`` holds ``param``, RuntimeError when a
    state tensor is on another device than the parameter (the state lives elsewhere)."""
    op = "fastmf.optim.grown_state"
    rows = param.shape[0]
    for part in _holders(optimizer):
        group = next((g for g in getattr(part, "param_groups", [])
                      if any(p is param for p in g["params"])), None)
        if group is None:
            continue
        state = part.state[param]
        new = {}
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != rows:
                continue
            if value.device != param.device:
                raise RuntimeError(f"{op}: {type(part).__name__}'s {key!r} state is on "
                                   f"{value.device} but the parameter on {param.device}; "
                                   "move the optimizer state next to the model first")
            fill = group.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
            pad = torch.full((extra_rows, *value.shape[1:]), fill, dtype=value.dtype,
                             device=value.device)
            new[key] = cat_rows([value, pad])
        return state, new
    raise ValueError(f"{op}: the optimizer ({type(optimizer).__name__}) does not hold this "
                     f"parameter of shape {tuple(param.shape)}")
