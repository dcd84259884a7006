"""``fastmf.nn.Embedding`` and ``fastmf.nn.EmbeddingBag``: drop-in embedding layers on the
``embedding_bag`` kernels, with sparse COO gradients (the drop-in path: any optimizer that
takes sparse gradients steps them) or, after :func:`fastmf.optim.apply_in_backward`, the
optimizer applied inside the backward pass (exact: duplicate ids summed, one update per
unique row, no gradient tensor kept).

Shapes: ``Embedding(N, K)(ids)`` with ids int32/int64 of any shape -> ``(*ids.shape, K)``;
``EmbeddingBag(N, K)(ids, offsets)`` -> ``(num_bags, K)`` with ``torch.nn.EmbeddingBag``'s
conventions. Tables may be float32, float64, float16 or bfloat16; the output is float32 for
float16/bfloat16 tables (the lookup sums in float32; FBGEMM's default output), the table's
dtype otherwise.

``torch.compile(fullgraph=True)`` of forward + backward works on both paths (torch 2.13,
backends "aot_eager" and "inductor"; every kernel backend): the lookup and its backward are
opaque custom ops (``fastmf_nn::*``), so the compiled call gives the eager sparse gradient
(same stored rows) or, for a weight updated in backward, the same merged end-of-backward
update and no gradient. Dynamo re-traces when ``apply_in_backward`` is called for a weight
after compiling (it guards on what the lookup read). Not supported:

- with inductor, one table looked up more than once in one compiled function on the
  sparse-gradient path (or given a second gradient, such as a penalty on the whole
  weight): autograd sums the sparse gradients inside the graph, and
  inductor's code for that sum fails ("assert_size_stride ... stride 0==8" for a
  ``torch.ops.aten.add.Tensor``, or "Cannot access data pointer of Tensor that doesn't have
  storage" without size asserts). Look up the concatenated ids once, use
  ``backend="aot_eager"``, or the optimizer in backward (whose graph sums nothing);
- sparse tensors in the traced code itself: Dynamo refuses them ("Attempted to wrap sparse
  Tensor with VariableTracker"), which is why the gradient is built inside an op.

>>> import torch, fastmf
>>> bag = fastmf.nn.EmbeddingBag(100, 8, mode="mean")
>>> out = bag(torch.tensor([3, 7, 7, 42]), torch.tensor([0, 3]))   # bags [3, 7, 7] and [42]
>>> out.shape
torch.Size([2, 8])
>>> out.sum().backward(); bag.weight.grad.is_sparse
True
"""

from __future__ import annotations

import itertools
import weakref
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastmf import ops
from fastmf.memory import cat_rows, empty_table
from fastmf.ops import checks
from fastmf.ops.codes import Pooling
from fastmf.ops.reference.embedding_bag import per_sample_weights_grad

__all__ = ["Embedding", "EmbeddingBag", "grow"]


def embedding_kernels(backend: str, device) -> ModuleType:
    """The backend module that runs the embedding_bag family for ``device``'s tensors
    (``fastmf.ops.kernels`` asked for this family: "auto" is native only where the
    embedding_bag kernels exist for the device)."""
    return ops.kernels(backend, device, kernel="embedding_bag_forward")


class TableInfo(NamedTuple):
    """What a fastmf.nn module records about the weight it created."""

    name: str  # "Embedding(1000, 16)", for error messages
    stochastic_rounding: bool | None  # None: on for float16/bfloat16 tables
    seed: int  # keys the stochastic-rounding bits of this table


class _TensorMap:
    """tensor -> value by identity, dropping the entry when the tensor dies (a
    WeakKeyDictionary compares keys with ==, which tensors overload element-wise)."""

    def __init__(self):
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, tensor: Tensor, default=None):
        item = self._items.get(id(tensor))
        return item[1] if item is not None and item[0]() is tensor else default

    def __contains__(self, tensor: Tensor) -> bool:
        return self.get(tensor, self) is not self

    def __setitem__(self, tensor: Tensor, value) -> None:
        key, items = id(tensor), self._items

        def drop(ref: weakref.ref) -> None:
            if key in items and items[key][0] is ref:
                del items[key]

        items[key] = (weakref.ref(tensor, drop), value)

    def pop(self, tensor: Tensor, default=None):
        value = self.get(tensor, self)
        if value is self:
            return default
        del self._items[id(tensor)]
        return value

    def setdefault(self, tensor: Tensor, value):
        if tensor not in self:
            self[tensor] = value
        return self.get(tensor)


# Weights created by fastmf.nn modules, and the optimizer applied in backward to each (a weak
# reference: a deleted optimizer leaves its weights to the plain sparse-gradient path). The
# updates waiting for the end of a backward pass are in _PASSES, below.
_TABLES = _TensorMap()
_FUSED = _TensorMap()
_SEQUENCE = itertools.count()
# Backend name -> its module, as embedding_kernels returned it.
_BACKEND_MODULES: dict[str, ModuleType] = {}


def table_info(weight: Tensor) -> TableInfo | None:
    """The record of a fastmf.nn weight; None for any other tensor."""
    return _TABLES.get(weight)


def stochastic_rounding_of(weight: Tensor) -> tuple[bool, int]:
    """(stochastic rounding on, seed) for writes to ``weight``: the module's setting, or by
    default on for float16/bfloat16 tensors, with seed 0 for tensors no module created."""
    info = _TABLES.get(weight)
    half = weight.dtype in checks.HALF_DTYPES
    if info is None:
        return half, 0
    setting = half if info.stochastic_rounding is None else info.stochastic_rounding
    return bool(setting) and half, info.seed


def fused_optimizer(weight: Tensor):
    """The optimizer applied in backward to ``weight``, or None."""
    ref = _FUSED.get(weight)
    return None if ref is None else ref()


def register_fused(weight: Tensor, optimizer) -> None:
    """Mark ``weight`` as updated in backward by ``optimizer`` (fastmf.optim.apply_in_backward
    checks first that no live optimizer has it already)."""
    _FUSED[weight] = weakref.ref(optimizer)


class BagUse(NamedTuple):
    """One forward use of a fused table, kept until the end of the backward pass."""

    sequence: int
    grad_output: Tensor
    indices: Tensor
    offsets: Tensor
    per_sample_weights: Tensor | None
    pooling: Pooling


def merge_uses(uses: list[BagUse]) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Pooling]:
    """One bag structure for several uses of a table (in forward order): indices
    concatenated, offsets shifted, per-sample weights concatenated (ones where absent). When
    the uses mix SUM and MEAN, MEAN is folded into per-sample weights 1/bag size so a single
    SUM call covers them. Returns (grad_output, indices, offsets, per_sample_weights,
    pooling)."""
    if len(uses) == 1:
        u = uses[0]
        return u.grad_output, u.indices, u.offsets, u.per_sample_weights, u.pooling
    poolings = {u.pooling for u in uses}
    mixed = len(poolings) > 1
    pooling = Pooling.SUM if mixed else poolings.pop()
    any_weights = any(u.per_sample_weights is not None for u in uses)
    grad_output = torch.cat([u.grad_output for u in uses])
    indices = torch.cat([u.indices.long() for u in uses])
    starts, weights, base = [], [], 0
    for u in uses:
        o = u.offsets.long()
        starts.append(o[:-1] + base)
        base += u.indices.shape[0]
        if mixed and u.pooling == Pooling.MEAN:
            sizes = o[1:] - o[:-1]
            bag = torch.searchsorted(o[1:], torch.arange(u.indices.shape[0],
                                                         device=o.device), right=True)
            weights.append(1.0 / sizes[bag].to(grad_output.dtype))
        elif u.per_sample_weights is not None:
            weights.append(u.per_sample_weights)
        else:
            weights.append(torch.ones(u.indices.shape[0], dtype=grad_output.dtype,
                                      device=grad_output.device))
    offsets = torch.cat(starts + [torch.tensor([base], device=indices.device)])
    psw = torch.cat(weights) if (mixed or any_weights) else None
    return grad_output, indices, offsets, psw, pooling


def _flush(weight: Tensor, uses: list[BagUse]) -> None:
    """Apply ``uses`` of a fused ``weight`` (one backward pass's) with one fused update."""
    optimizer = fused_optimizer(weight)
    if optimizer is None:
        return
    if len(uses) > 1:
        uses.sort(key=lambda u: u.sequence)
    grad_output, indices, offsets, psw, pooling = merge_uses(uses)
    optimizer.apply_fused(weight, grad_output, indices, offsets, psw, pooling)


class _PassUpdates:
    """The fused updates of one backward pass (one autograd graph task): the uses of each
    fused weight, applied by one callback when the whole graph is done (what DDP does), so
    every use of a table in the graph is in by then. Uses belong to the pass that made them:
    a pass that raises never runs its callback, and its uses are dropped when the engine
    releases the callback (the ``weakref.finalize`` below), never applied by a later pass. A
    registry shared by all passes (one list per weight, "callback queued" while non-empty)
    stopped updating for good after one backward that raised."""

    def __init__(self):
        # id(weight) -> (the weight, held here; its uses), in the order of first use.
        self.uses: dict[int, tuple[Tensor, list[BagUse]]] = {}

    def add(self, weight: Tensor, use: BagUse) -> None:
        self.uses.setdefault(id(weight), (weight, []))[1].append(use)

    def apply(self) -> None:
        """One fused update per weight, in the order the pass first reached each. (Smaller
        tables first, while their gradients are still in cache, was tried on
        benchmarks/bench_embedding.py's bag step: faster in alternated windows of one
        process, within the noise across processes, so not kept.)"""
        for weight, uses in self.uses.values():
            _flush(weight, uses)


# Graph task id -> the fused updates of that backward pass, until its callback runs or the
# engine releases the callback unrun.
_PASSES: dict[int, _PassUpdates] = {}


class _PassCallback:
    """What the engine holds for one pass: applies its updates once."""

    def __init__(self, task: int):
        self.task = task

    def __call__(self) -> None:
        updates = _PASSES.pop(self.task, None)
        if updates is not None:
            updates.apply()


def _queue_use(weight: Tensor, use: BagUse) -> None:
    task = torch._C._current_graph_task_id()
    updates = _PASSES.get(task) if task >= 0 else None
    if updates is None:
        updates = _PassUpdates()
        if task >= 0:
            callback = _PassCallback(task)
            try:
                torch.autograd.Variable._execution_engine.queue_callback(callback)
            except RuntimeError:
                task = -1
            else:
                _PASSES[task] = updates
                weakref.finalize(callback, _PASSES.pop, task, None)
    updates.add(weight, use)
    if task < 0:
        updates.apply()  # not inside a backward pass: nothing more will come


def _pass_accumulates(ctx) -> bool | None:
    """Whether this backward pass accumulates into the weight (the first input) of the
    lookup whose backward node is ``ctx``: True for ``backward()`` (and ``backward(inputs=)``
    naming the weight), None for ``backward(inputs=...)`` without it, False under
    ``torch.autograd.grad`` (which returns gradients and accumulates none). An optimizer in
    backward updates its weight only in the first case: ``autograd.grad(out,
    [per_sample_weights])`` for a gradient penalty had stepped the table (torch leaves a
    weight alone there), and ``autograd.grad(out, [weight])`` now returns the weight's
    sparse gradient as for any other table."""
    node = ctx.next_functions[0][0]
    if node is None:
        return None
    try:
        return True if torch._C._will_engine_execute_node(node) else None
    except RuntimeError:  # "... running autograd.grad(). This is currently not supported."
        return False


class _EmbeddingBagFunction(torch.autograd.Function):
    """Bag lookup with the embedding_bag kernels; the weight's gradient is sparse COO (one
    row per index, uncoalesced, like nn.EmbeddingBag(sparse=True)), or, for a fused weight,
    none: the optimizer runs at the end of the backward pass."""

    @staticmethod
    def forward(ctx, weight, indices, offsets, per_sample_weights, pooling, kernels,
                sequence):
        out = kernels.embedding_bag_forward(weight.detach(), indices, offsets,
                                            per_sample_weights, pooling)
        ctx.kernels, ctx.pooling, ctx.sequence = kernels, pooling, sequence
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.weight_ref = weakref.ref(weight)
        # The weight itself is needed only for the gradient of the per-sample weights.
        saved_weight = weight if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(indices, offsets, per_sample_weights, saved_weight)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets, psw, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[3]:
            grad_psw = per_sample_weights_grad(grad_output, weight, indices, offsets)
        if ctx.needs_input_grad[0]:
            table = ctx.weight_ref()
            fused = table is not None and fused_optimizer(table) is not None
            accumulates = _pass_accumulates(ctx) if fused else True
            if fused and accumulates:
                _queue_use(table, BagUse(ctx.sequence, grad_output, indices, offsets,
                                         None if psw is None else psw.detach(), ctx.pooling))
            elif fused and accumulates is None:
                pass  # backward(inputs=...) without this weight: nothing to update
            else:
                rows = ctx.kernels.embedding_bag_backward(grad_output, indices, offsets,
                                                          None if psw is None else psw.detach(),
                                                          ctx.pooling)
                grad_weight = torch.sparse_coo_tensor(
                    indices.long().unsqueeze(0), rows.to(ctx.weight_dtype), ctx.weight_shape,
                    is_coalesced=False, check_invariants=False)  # ids checked in forward
        return grad_weight, None, None, grad_psw, None, None, None


# --- the path under torch.compile ------------------------------------------------------
# Dynamo refuses sparse tensors anywhere in what it traces ("Attempted to wrap sparse Tensor
# with VariableTracker"), and the optimizer in backward is Python side effects (registries,
# an end-of-backward callback) that a traced backward would not replay. So under
# torch.compile the lookup is one opaque custom op whose registered backward (traced by
# AOTAutograd, not by Dynamo) calls a second opaque op: one that returns the sparse COO
# gradient (one stored row per id, uncoalesced; its fake kernel returns a sparse fake
# tensor of the same shape) or, for a weight updated in backward, one that queues the use
# for the end-of-backward update (at run time, as _EmbeddingBagFunction does) and returns
# nothing, the weight's gradient being None. Which of the two is chosen while tracing
# (Dynamo guards on the registry it read) and checked again at run time. (One op with a
# dynamic row count, empty when fused, does not work in torch 2.13: AOTAutograd finds no
# unbacked size inside a sparse output, and adding two such gradients, a table used
# twice, fails in fake mode.)
# Tables travel through the ops' schemas (which take no Python objects) as integer keys.
# Eager calls keep _EmbeddingBagFunction: a Python custom op costs a redispatch per call.

_TABLE_KEYS = itertools.count()
# key -> weak reference to the weight registered under it.
_WEIGHT_OF_KEY: dict[int, weakref.ref] = {}


def _key_weight(weight: Tensor) -> int:
    """A new key naming ``weight`` in the compiled ops (dropped when the weight dies)."""
    key = next(_TABLE_KEYS)
    _WEIGHT_OF_KEY[key] = weakref.ref(weight, lambda _: _WEIGHT_OF_KEY.pop(key, None))
    return key


def _backend_module(name: str) -> ModuleType:
    """The backend module a module resolved when built."""
    return _BACKEND_MODULES[name]


@torch.library.custom_op("fastmf_nn::embedding_bag", mutates_args=())
def _compiled_lookup(weight: Tensor, indices: Tensor, offsets: Tensor,
                     per_sample_weights: Tensor | None, pooling: int, backend: str,
                     table: int, fused: bool) -> tuple[Tensor, Tensor]:
    """(bag rows, this use's sequence number as a 0-d int64 CPU tensor: the optimizer in
    backward merges the uses of a table in forward order)."""
    # The offsets' values are read here, at run time: under Dynamo reading them would
    # break the graph.
    checks.check_offsets_values("nn.EmbeddingBag", offsets, indices.shape[0])
    out = _backend_module(backend).embedding_bag_forward(weight.detach(), indices, offsets,
                                                         per_sample_weights, Pooling(pooling))
    return out, torch.tensor(next(_SEQUENCE))


@_compiled_lookup.register_fake
def _compiled_lookup_fake(weight, indices, offsets, per_sample_weights, pooling, backend,
                          table, fused):
    out = weight.new_empty((offsets.shape[0] - 1, weight.shape[1]),
                           dtype=checks.accumulation_dtype(weight.dtype))
    return out, torch.empty((), dtype=torch.long)


def _traced_weight(table: int, fused: bool) -> Tensor:
    """The weight registered under ``table``, checked to be (``fused``) or not be updated
    in backward, as it was when the calling function was compiled."""
    ref = _WEIGHT_OF_KEY.get(table)
    weight = None if ref is None else ref()
    if weight is None or (fused_optimizer(weight) is not None) != fused:
        info = None if weight is None else table_info(weight)
        name = "a fastmf.nn table" if info is None else f"the {info.name} table"
        now = "is" if weight is not None and fused_optimizer(weight) is not None else "is not"
        raise RuntimeError(
            f"fastmf.nn: {name} {now} updated in backward (fastmf.optim.apply_in_backward) "
            "now, but was the other way when this function was compiled; compile it again "
            "(e.g. torch._dynamo.reset() first)")
    return weight


@torch.library.custom_op("fastmf_nn::embedding_bag_weight_grad", mutates_args=())
def _compiled_weight_grad(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                          per_sample_weights: Tensor | None, pooling: int, backend: str,
                          table: int, num_embeddings: int, dtype: torch.dtype) -> Tensor:
    _traced_weight(table, False)
    rows = _backend_module(backend).embedding_bag_backward(
        grad_output.contiguous(), indices, offsets, per_sample_weights, Pooling(pooling))
    return torch.sparse_coo_tensor(indices.long().unsqueeze(0), rows.to(dtype),
                                   (num_embeddings, grad_output.shape[1]), is_coalesced=False,
                                   check_invariants=False)


@_compiled_weight_grad.register_fake
def _compiled_weight_grad_fake(grad_output, indices, offsets, per_sample_weights, pooling,
                               backend, table, num_embeddings, dtype):
    num_ids, dim = indices.shape[0], grad_output.shape[1]
    return torch.sparse_coo_tensor(indices.new_empty((1, num_ids), dtype=torch.long),
                                   grad_output.new_empty((num_ids, dim), dtype=dtype),
                                   (num_embeddings, dim), is_coalesced=False,
                                   check_invariants=False)


@torch.library.custom_op("fastmf_nn::embedding_bag_fused_use", mutates_args=())
def _compiled_fused_use(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                        per_sample_weights: Tensor | None, pooling: int, table: int,
                        sequence: Tensor) -> None:
    """Queue one use of a weight updated in backward (its optimizer runs at the end of the
    backward pass, merged with the table's other uses, as in eager)."""
    weight = _traced_weight(table, True)
    _queue_use(weight, BagUse(int(sequence), grad_output.contiguous(), indices, offsets,
                              per_sample_weights, Pooling(pooling)))


@_compiled_fused_use.register_fake
def _compiled_fused_use_fake(grad_output, indices, offsets, per_sample_weights, pooling,
                             table, sequence):
    return None


# It returns nothing: without this mark the compiled backward would drop it as dead code.
torch.fx.node.has_side_effect(torch.ops.fastmf_nn.embedding_bag_fused_use.default)


@torch.library.custom_op("fastmf_nn::leading_ids", mutates_args=())
def _compiled_leading_ids(ids: Tensor, offsets: Tensor) -> Tensor:
    """``ids[:offsets[-1]]`` (include_last_offset), a copy: how many ids stay is known only
    at run time, which the fake kernel says with a dynamic size."""
    checks.check_offsets_values("nn.EmbeddingBag", offsets, ids.shape[0], last="at_most")
    return ids[:int(offsets[-1])].clone()


@_compiled_leading_ids.register_fake
def _compiled_leading_ids_fake(ids, offsets):
    num_ids = torch.library.get_ctx().new_dynamic_size()
    torch._check(num_ids <= ids.shape[0])
    return ids.new_empty((num_ids,))


def _compiled_lookup_setup(ctx, inputs, output) -> None:
    weight, indices, offsets, per_sample_weights, pooling, backend, table, fused = inputs
    ctx.pooling, ctx.backend, ctx.table, ctx.fused = pooling, backend, table, fused
    ctx.num_embeddings, ctx.weight_dtype = weight.shape[0], weight.dtype
    saved_weight = weight if ctx.needs_input_grad[3] else None
    ctx.save_for_backward(indices, offsets, per_sample_weights, saved_weight, output[1])


def _compiled_lookup_backward(ctx, grad_output, _grad_sequence):
    indices, offsets, psw, weight, sequence = ctx.saved_tensors
    grad_weight = grad_psw = None
    psw_values = None if psw is None else psw.detach()
    if ctx.needs_input_grad[0] and ctx.fused:
        _compiled_fused_use(grad_output, indices, offsets, psw_values, ctx.pooling, ctx.table,
                            sequence)
    elif ctx.needs_input_grad[0]:
        grad_weight = _compiled_weight_grad(grad_output, indices, offsets, psw_values,
                                            ctx.pooling, ctx.backend, ctx.table,
                                            ctx.num_embeddings, ctx.weight_dtype)
    if ctx.needs_input_grad[3]:
        grad_psw = per_sample_weights_grad(grad_output.contiguous(), weight, indices, offsets)
    return grad_weight, None, None, grad_psw, None, None, None, None


_compiled_lookup.register_autograd(_compiled_lookup_backward,
                                   setup_context=_compiled_lookup_setup)


def _check_module_args(op: str, num_embeddings, dim, dtype, init_scale, backend) -> None:
    for name, value in (("num_embeddings", num_embeddings), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fastmf.{op}: {name} must be a positive int, got {value!r}")
    if dtype not in checks.EMBEDDING_DTYPES:
        raise TypeError(f"fastmf.{op}: dtype must be float32, float64, float16 or bfloat16, "
                        f"got {dtype}")
    checks.check_settings(op, init_scale=init_scale)
    ops.resolve_backend(backend, op=f"fastmf.{op}")


class _Table(nn.Module):
    """The weight, its registration and the lookup shared by both modules."""

    # The default training step penalises the outputs of every module that says this.
    is_embedding_table = True

    def __init__(self, op: str, num_embeddings: int, dim: int, backend: str, dtype,
                 device, init_scale: float, stochastic_rounding: bool | None):
        super().__init__()
        _check_module_args(op, num_embeddings, dim, dtype, init_scale, backend)
        self.num_embeddings, self.dim, self.backend = num_embeddings, dim, backend
        self.init_scale, self.stochastic_rounding = init_scale, stochastic_rounding
        # Drawn in float32 then cast, so tables of every dtype start from the same values.
        init = empty_table((num_embeddings, dim), dtype=torch.float32, device=device)
        init.uniform_(-init_scale, init_scale)
        if dtype != torch.float32:
            init = empty_table(init.shape, dtype=dtype, device=device).copy_(init)
        self.weight = nn.Parameter(init)
        self.seed = int(torch.randint(0, 2**62, ()))
        self._register()
        self._kernels(self.weight)  # resolved here, outside any traced call

    def __setstate__(self, state) -> None:
        # A deep copy or an unpickled module holds a new weight tensor: record it now, so
        # that a compiled lookup (which cannot write the registry) finds its settings.
        super().__setstate__(state)
        if "weight" in self._parameters:
            self._register()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._register()  # .to()/.half() may have made a new weight tensor
        return module

    def _register(self) -> None:
        name = f"{type(self).__name__}({self.num_embeddings}, {self.dim})"
        _TABLES[self.weight] = TableInfo(name, self.stochastic_rounding, self.seed)
        self.__dict__["_table_key"] = _key_weight(self.weight)

    def _kernels(self, weight: Tensor) -> ModuleType:
        """The backend module for the weight's device, resolved once per module and device
        (again only when the backend or the weight's device changes), not on every call.
        The module keeps the backend's name, not the Python module (modules do not
        deep-copy or pickle)."""
        key = (self.backend, weight.device)
        cached = self.__dict__.get("_kernels_cache")
        if cached is None or cached[0] != key:
            module = embedding_kernels(self.backend, weight.device)
            _BACKEND_MODULES[module.NAME] = module
            cached = (key, module.NAME)
            self.__dict__["_kernels_cache"] = cached
        return _BACKEND_MODULES[cached[1]]

    def _lookup(self, indices: Tensor, offsets: Tensor, per_sample_weights, pooling) -> Tensor:
        weight = self.weight
        if torch.compiler.is_compiling():
            return self._compiled_lookup(weight, indices, offsets, per_sample_weights, pooling)
        if weight not in _TABLES:
            self._register()  # a weight replaced after construction (copy, assignment)
        return _EmbeddingBagFunction.apply(weight, indices, offsets, per_sample_weights,
                                           pooling, self._kernels(weight), next(_SEQUENCE))

    def lookup_without_graph(self, indices: Tensor, offsets: Tensor,
                             per_sample_weights: Tensor | None, pooling: Pooling) -> Tensor:
        """The pooled rows of bags in the ops' CSR form (``offsets`` (B+1,), per-sample
        weights in the accumulation type), as the module's lookup computes them, without
        an autograd graph: for a training step that forms the pooled rows' gradient itself
        and hands it to :meth:`update_in_backward`."""
        weight = self.weight
        return self._kernels(weight).embedding_bag_forward(weight.detach(), indices, offsets,
                                                           per_sample_weights, pooling)

    def update_in_backward(self, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Tensor | None, pooling: Pooling) -> bool:
        """Step the weight with ``grad_output`` (the gradient of the pooled rows of
        :meth:`lookup_without_graph`'s bags) as a backward pass ends for a weight updated
        in backward (:func:`fastmf.optim.apply_in_backward`): one fused update by its
        optimizer. Returns False, changing nothing, when no optimizer updates the weight in
        backward."""
        if fused_optimizer(self.weight) is None:
            return False
        _flush(self.weight, [BagUse(0, grad_output, indices, offsets, per_sample_weights,
                                    pooling)])
        return True

    def _compiled_lookup(self, weight: Tensor, indices: Tensor, offsets: Tensor,
                         per_sample_weights, pooling) -> Tensor:
        """The lookup as Dynamo traces it: opaque ops; whether the weight is updated in
        backward is read here, while tracing (the backward op checks it again)."""
        fused = fused_optimizer(weight) is not None
        out, _ = _compiled_lookup(weight, indices, offsets, per_sample_weights, int(pooling),
                                  self._kernels(weight).NAME, self._table_key, fused)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.dim}, dtype={self.weight.dtype}, "
                f"backend={self.backend!r}")


def _check_ids(op: str, ids, weight: Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"fastmf.{op}: ids must be a tensor, got {type(ids).__name__}")
    if ids.dtype not in checks.ID_DTYPES:
        raise TypeError(f"fastmf.{op}: ids must be int32 or int64, got {ids.dtype}")
    if ids.device != weight.device:
        raise ValueError(f"fastmf.{op}: ids is on {ids.device} but weight is on "
                         f"{weight.device}; move them to one device")


class Embedding(_Table):
    """A lookup table: ``forward(ids) -> weight[ids]``, shape ``(*ids.shape, dim)``.

    ids: int32/int64 of any shape, each in [0, num_embeddings). ``weight``
    (num_embeddings, dim) is initialised uniform(-init_scale, init_scale) from the global
    torch RNG. Its gradient is sparse COO like ``nn.Embedding(sparse=True)``'s; or, after
    :func:`fastmf.optim.apply_in_backward`, the optimizer steps it inside the backward pass.
    float16/bfloat16 tables give float32 outputs, and fastmf optimizers write their updates
    back with stochastic rounding unless ``stochastic_rounding=False``.

    >>> import torch, fastmf
    >>> emb = fastmf.nn.Embedding(1000, 16)
    >>> emb(torch.tensor([[1, 2], [3, 3]])).shape
    torch.Size([2, 2, 16])
    """

    def __init__(self, num_embeddings: int, dim: int, *, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, device=None, init_scale: float = 0.05,
                 stochastic_rounding: bool | None = None):
        super().__init__("nn.Embedding", num_embeddings, dim, backend, dtype, device,
                         init_scale, stochastic_rounding)

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids("nn.Embedding", ids, self.weight)
        flat = ids.reshape(-1)
        out = self._lookup(flat, self._unit_offsets(flat), None, Pooling.SUM)
        return out.view(*ids.shape, self.dim)

    def _unit_offsets(self, flat: Tensor) -> Tensor:
        """0, 1, ..., n: one bag per id. Kept between calls (steady training repeats the
        batch size): the ops only read offsets, and merge_uses builds new tensors from them."""
        n, dtype, device = flat.shape[0], flat.dtype, flat.device
        if torch.compiler.is_compiling():
            return torch.arange(n + 1, dtype=dtype, device=device)
        cached = self.__dict__.get("_offsets_cache")
        if cached is None or cached.shape[0] != n + 1 or cached.dtype != dtype or \
                cached.device != device:
            cached = torch.arange(n + 1, dtype=dtype, device=device)
            self.__dict__["_offsets_cache"] = cached
        return cached


class EmbeddingBag(_Table):
    """Pooled lookups: ``forward(ids, offsets=None, per_sample_weights=None) -> (B, dim)``
    with ``torch.nn.EmbeddingBag``'s conventions:

    - ids 1-D (L,) with ``offsets`` (B,) bag starts (``offsets[0] == 0``, non-decreasing,
      at most L), or (B+1,) with ``include_last_offset=True`` (ids past the last offset are
      ignored, as torch does);
    - ids 2-D (B, L): B bags of L ids each, ``offsets`` None;
    - ``mode`` "sum" or "mean" ("max" is not supported); an empty bag gives zeros;
    - ``per_sample_weights`` shaped like ids, "sum" mode only: each row is scaled by its
      weight before the sum (their gradient is computed too).

    The weight's gradient is sparse COO, one row per id, as ``nn.EmbeddingBag(sparse=True)``
    gives. See :class:`Embedding` for init, dtypes and the optimizer in backward.

    >>> import torch, fastmf
    >>> bag = fastmf.nn.EmbeddingBag(1000, 16, mode="sum")
    >>> ids = torch.tensor([4, 8, 15, 16, 23, 42])
    >>> bag(ids, torch.tensor([0, 2, 2]), per_sample_weights=torch.rand(6)).shape
    torch.Size([3, 16])
    """

    def __init__(self, num_embeddings: int, dim: int, mode: str = "sum", *,
                 include_last_offset: bool = False, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, device=None, init_scale: float = 0.05,
                 stochastic_rounding: bool | None = None):
        if mode == "max":
            raise ValueError("fastmf.nn.EmbeddingBag: mode 'max' is not supported (its "
                             "gradient is not a weighted sum of rows); use 'sum' or 'mean'")
        if mode not in ("sum", "mean"):
            raise ValueError(f"fastmf.nn.EmbeddingBag: unknown mode {mode!r}; expected 'sum' "
                             "or 'mean'")
        super().__init__("nn.EmbeddingBag", num_embeddings, dim, backend, dtype, device,
                         init_scale, stochastic_rounding)
        self.mode, self.include_last_offset = mode, bool(include_last_offset)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mode={self.mode!r}"
                + (", include_last_offset=True" if self.include_last_offset else ""))

    def forward(self, ids: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        op = "nn.EmbeddingBag"
        _check_ids(op, ids, self.weight)
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(f"fastmf.{op}: per_sample_weights is only supported with "
                                 f"mode='sum', got mode={self.mode!r}")
            if not isinstance(per_sample_weights, torch.Tensor) or \
                    not per_sample_weights.is_floating_point():
                what = (per_sample_weights.dtype if isinstance(per_sample_weights, torch.Tensor)
                        else type(per_sample_weights).__name__)
                raise TypeError(f"fastmf.{op}: per_sample_weights must be a float tensor, got "
                                f"{what}")
            if per_sample_weights.shape != ids.shape:
                raise ValueError(f"fastmf.{op}: per_sample_weights has shape "
                                 f"{tuple(per_sample_weights.shape)}, expected "
                                 f"{tuple(ids.shape)} like ids")
            per_sample_weights = per_sample_weights.reshape(-1).to(
                checks.accumulation_dtype(self.weight.dtype))
        flat, offsets = self._bags(op, ids, offsets)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights[:flat.shape[0]]
        pooling = Pooling.SUM if self.mode == "sum" else Pooling.MEAN
        return self._lookup(flat, offsets, per_sample_weights, pooling)

    def _bags(self, op: str, ids: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor]:
        """(indices (L,), offsets (B+1,) of the ids' dtype) in the ops' CSR form."""
        if ids.dim() == 2:
            if offsets is not None:
                raise ValueError(f"fastmf.{op}: offsets must be None when ids is 2-D (B, L), "
                                 f"got a tensor of shape {tuple(offsets.shape)}")
            num_bags, size = ids.shape
            starts = torch.arange(num_bags + 1, dtype=ids.dtype, device=ids.device) * size
            return ids.reshape(-1), starts
        if ids.dim() != 1:
            raise ValueError(f"fastmf.{op}: ids must be 1-D (with offsets) or 2-D (B, L), got "
                             f"shape {tuple(ids.shape)}")
        if offsets is None:
            raise ValueError(f"fastmf.{op}: offsets is required when ids is 1-D")
        checks.check_index_tensor(op, "offsets", offsets)
        # Both in the wider of their dtypes: int64 offsets narrowed to int32 ids wrapped
        # (offsets [0, 2**32] became [0, 0]) before any check could see them.
        if offsets.dtype != ids.dtype:
            dtype = torch.promote_types(ids.dtype, offsets.dtype)
            ids = ids.to(dtype)
        offsets = offsets.to(device=ids.device, dtype=ids.dtype)
        num_ids = ids.shape[0]
        if not self.include_last_offset:
            if offsets.numel() == 0 and num_ids:
                raise ValueError(f"fastmf.{op}: offsets is empty but ids has {num_ids} ids")
            if not torch.compiler.is_compiling():  # compiled: the op checks them at run time
                checks.check_offsets_values(op, offsets, num_ids, last="at_most")
            # new_full, not torch.tensor([num_ids]): 9 against 16 us with the cat.
            return ids, torch.cat([offsets, offsets.new_full((1,), num_ids)])
        if offsets.numel() == 0:
            raise ValueError(f"fastmf.{op}: with include_last_offset, offsets needs one entry "
                             "per bag plus one, got 0 entries")
        if torch.compiler.is_compiling():
            return _compiled_leading_ids(ids, offsets), offsets
        checks.check_offsets_values(op, offsets, num_ids, last="at_most")
        return ids[:int(offsets[-1])], offsets


def grow(module: _Table, rows: Tensor) -> None:
    """Append ``rows`` (n, dim) to ``module``'s weight in place.

    The weight stays the same Parameter object (its data is replaced), so optimizers
    holding it and the optimizer applied in backward keep it; grow their state with
    :func:`fastmf.optim.grown_state` in the same breath, or their next step sees the old
    size. Raises before any change when the rows do not fit."""
    op = "fastmf.nn.grow"
    if not isinstance(module, _Table):
        raise TypeError(f"{op}: module must be a fastmf.nn Embedding or EmbeddingBag, got "
                        f"{type(module).__name__}")
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != module.dim:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{op}: rows must be a (n, {module.dim}) tensor, got {shape}")
    if rows.device != module.weight.device:
        raise ValueError(f"{op}: rows are on {rows.device} but the table on "
                         f"{module.weight.device}")
    if not torch.isfinite(rows).all():
        raise ValueError(f"{op}: rows hold NaN/inf")
    with torch.no_grad():
        module.weight.data = cat_rows([module.weight.data, rows.to(module.weight.dtype)])
    module.num_embeddings = module.weight.shape[0]
    module._register()  # the record's name carries the row count
