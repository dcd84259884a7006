"""``fastmf.models.Hybrid``: LightFM's hybrid model on fastmf's fused embedding bags.

A user's vector is the weighted sum of the embeddings of its features (and of its own
identity row), an item's likewise, and so are the biases::

    p_u = Σ_f w_uf e_f      b_u = Σ_f w_uf c_f      (f over u's features and identity)
    q_i = Σ_g w_ig e'_g     b_i = Σ_g w_ig c'_g
    forward(u, i) = <p_u, q_i> + b_u + b_i

Each side is one :class:`fastmf.nn.EmbeddingBag` ``(F + N, dim)`` (mode "sum" with
per-sample weights: F feature rows, then with ``identity=True`` one row per user/item) and
one ``(F + N, 1)`` bias bag; the optimizer runs inside the backward pass. A side without
features is plain matrix factorisation (identity rows only). Because vectors come from
features, a new user or item is scored from its features alone (see
:mod:`fastmf.models.coldstart`), and :meth:`Hybrid.add_items` / :meth:`Hybrid.add_users`
grow the model while training continues.

>>> import pandas as pd, fastmf
>>> from fastmf.data import Features
>>> movies = pd.DataFrame({"movieId": [10, 20, 30], "genres": ["Comedy|Drama", "Drama", ""]})
>>> feats = Features.from_pandas(movies, "movieId", multi="genres")
>>> model = fastmf.models.Hybrid(4, 3, dim=8, item_features=feats)
>>> model(torch.tensor([0, 1]), torch.tensor([0, 2])).shape
torch.Size([2])
"""

from __future__ import annotations

import json
import warnings
from types import ModuleType
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from fastmf import checkpoint
from fastmf.data.features import Features
from fastmf.models._rows import pair_users, table_kernels
from fastmf.models._state import check_csr_state
from fastmf.models.base import IMPLICIT, Recommender, pointwise_loss
from fastmf.nn import EmbeddingBag
from fastmf.nn.embedding import fused_optimizer
from fastmf.ops.args import PooledSide
from fastmf.ops.checks import accumulation_dtype, table_dtype
from fastmf.ops.codes import Pooling
from fastmf.ops.reference.pooled import rank_backward, rank_forward
from fastmf.optim import has_step_hooks
from fastmf.recommender import warp_choice

__all__ = ["Hybrid"]

# The largest feature vocabulary (JSON bytes) a config keeps: checkpoints store the config
# in config.json, which fastmf.load reads up to 16 MiB.
MAX_VOCABULARY_BYTES = 4 * 2**20


def _check_weight_array(op: str, what: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{op}: {what} holds NaN/inf feature weights")


class FeatureSide(nn.Module):
    """One side (users or items) of :class:`Hybrid`: the feature matrix as CSR buffers
    (``indptr`` (N+1,), ``indices`` (nnz,), ``weights`` (nnz,); identity columns included)
    and the embedding and bias bags over its ``F (+ N)`` rows."""

    def __init__(self, op: str, name: str, num_rows: int, dim: int, features, identity: bool,
                 *, init_scale: float, backend: str, dtype, device):
        super().__init__()
        self.op, self.name = op, name
        # A side without features is identity-only whatever ``identity`` says: it would
        # have no representation otherwise.
        self.identity = bool(identity) or features is None or (
            isinstance(features, dict) and features.get("num_features") == 0)
        if isinstance(features, dict):
            # Built from a config (fastmf.load): shapes only; load_state_dict fills them.
            spec = _check_spec(op, f"{name}_features", features)
            self.num_features, self.normalize = spec["num_features"], spec["normalize"]
            self.signed = spec["signed"]
            self.vocabulary = spec.get("vocabulary")
            nnz = spec["nnz"]
            indptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
            indices = torch.zeros(nnz, dtype=torch.int64, device=device)
            weights = torch.zeros(nnz, dtype=torch.float32, device=device)
        else:
            matrix, self.num_features, self.normalize = self._matrix(features, num_rows)
            indptr = torch.as_tensor(matrix.indptr.astype(np.int64), device=device)
            indices = torch.as_tensor(matrix.indices.astype(np.int64), device=device)
            weights = torch.as_tensor(matrix.data.astype(np.float32), device=device)
        self.register_buffer("indptr", indptr)
        self.register_buffer("indices", indices)
        self.register_buffer("weights", weights)
        rows = self.num_features + (num_rows if self.identity else 0)
        self.table = EmbeddingBag(rows, dim, "sum", backend=backend, dtype=dtype,
                                  device=device, init_scale=init_scale)
        self.bias = EmbeddingBag(rows, 1, "sum", backend=backend, dtype=dtype, device=device,
                                 init_scale=init_scale)
        with torch.no_grad():
            self.bias.weight.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Every lookup's bags are cut from this matrix; its weights scale the rows pooled.
        check_csr_state(self.op, f"{self.name}_features", self.indptr, self.indices,
                        self.table.num_embeddings, self.weights, signed=self.signed)

    def _matrix(self, features, num_rows: int) -> tuple[sp.csr_matrix, int, bool]:
        """(final CSR weights with identity columns, F, normalize) from Features, a scipy
        matrix (weights used as given, identity weight 1) or None."""
        op, arg = self.op, f"{self.name}_features"
        self.signed = False
        self.vocabulary = None
        if features is None:
            raw, normalize = sp.csr_matrix((num_rows, 0), dtype=np.float32), False
        elif isinstance(features, Features):
            if features.identity and not self.identity:
                raise ValueError(f"{op}: {arg} has identity=True but the model identity=False; "
                                 "the model adds the identity rows itself, pass one setting")
            raw, normalize = features.raw, features.normalize
            self.signed = features.signed
            self.vocabulary = features.vocabulary()
        elif sp.issparse(features) or isinstance(features, np.ndarray):
            raw, normalize = sp.csr_matrix(features, dtype=np.float32), False
            if raw.ndim != 2:
                raise ValueError(f"{op}: {arg} must be 2-D")
            _check_weight_array(op, arg, raw.data)
            if (raw.data < 0).any():
                raise ValueError(f"{op}: {arg} holds {int((raw.data < 0).sum())} negative "
                                 "weight(s); feature weights must be >= 0")
        else:
            raise TypeError(f"{op}: {arg} must be fastmf.data.Features, a scipy sparse matrix "
                            f"or None, got {type(features).__name__}")
        if raw.shape[0] != num_rows:
            raise ValueError(f"{op}: {arg} has {raw.shape[0]} rows but the model has "
                             f"{num_rows} {self.name}s; the rows must be the {self.name} "
                             f"indices (build the features with id_map=train.{self.name}_map)")
        self.normalize = normalize
        matrix = self.new_rows(raw, 0, num_rows)
        return matrix, raw.shape[1], normalize

    def new_rows(self, raw: sp.csr_matrix, first: int, total: int) -> sp.csr_matrix:
        """Final weights of rows ``first ..`` from their raw features: identity columns
        ``F + first + r`` (of ``total`` identity columns) appended, then normalised. Raises
        on rows left empty (no feature and no identity)."""
        raw = sp.csr_matrix(raw, dtype=np.float32)
        raw.sum_duplicates()
        n, num_features = raw.shape
        if self.identity:
            eye = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), first + np.arange(n))),
                                shape=(n, total))
            raw = sp.hstack([raw, eye], format="csr")
        raw.eliminate_zeros()
        empty = np.flatnonzero(np.diff(raw.indptr) == 0)
        if len(empty):
            raise ValueError(f"{self.op}: {len(empty)} {self.name}(s) have no feature "
                             f"(first: {self.name} {first + int(empty[0])}) and identity=False, "
                             "so they have no vector; give them a feature or use identity=True")
        if self.normalize:
            sums = np.asarray(abs(raw).sum(axis=1)).ravel()
            raw = sp.csr_matrix(sp.diags((1.0 / sums).astype(np.float32)) @ raw)
        raw.sort_indices()
        return raw

    @property
    def num_rows(self) -> int:
        return self.indptr.shape[0] - 1

    def spec(self) -> dict:
        spec = {"num_features": self.num_features, "nnz": int(self.indices.shape[0]),
                "normalize": self.normalize, "signed": self.signed}
        if self.vocabulary is not None:
            size = len(json.dumps(self.vocabulary))
            if size <= MAX_VOCABULARY_BYTES:
                spec["vocabulary"] = self.vocabulary
            else:
                # config.json (where checkpoints keep it) is read up to 16 MiB.
                warnings.warn(f"{self.op}: the {self.name} feature vocabulary takes {size} "
                              f"bytes of JSON, over {MAX_VOCABULARY_BYTES}; the config (and "
                              "so a checkpoint) leaves it out, so a loaded model cannot "
                              "encode new rows by feature name (build the Features with "
                              "hash_buckets to need no vocabulary)", stacklevel=3)
        return spec

    def bags(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, offsets (B,), per-sample weights) of the bags of ``ids``."""
        ids = ids.reshape(-1).to(device=self.indptr.device, dtype=torch.int64)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_rows:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{self.op}: {self.name} index {bad} out of range "
                                 f"[0, {self.num_rows})")
        # index_select, not tensor[ids]: the same gather, and on the CPU a fifth of the
        # time of advanced indexing (20 against 80 us a call in a Hybrid step on
        # ml-latest-small, torch.profiler), which had been 11 % of the step.
        take = torch.index_select
        if self.indices.shape[0] == self.num_rows:
            # One entry per row (identity only: rows are never empty), so row r's entry
            # is at position r and the bags are plain gathers.
            return (take(self.indices, 0, ids), torch.arange(ids.shape[0], device=ids.device),
                    take(self.weights, 0, ids))
        starts = take(self.indptr, 0, ids)
        lengths = take(self.indptr, 0, ids + 1) - starts
        offsets = torch.cumsum(lengths, 0) - lengths
        total = int(lengths.sum())
        pos = torch.arange(total, device=ids.device) + torch.repeat_interleave(
            starts - offsets, lengths, output_size=total)
        return take(self.indices, 0, pos), offsets, take(self.weights, 0, pos)

    def pool(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(vectors (B, dim), biases (B,)) of ``ids``."""
        indices, offsets, weights = self.bags(ids)
        weights = weights.to(self.table.weight.dtype)
        vec = self.table(indices, offsets, per_sample_weights=weights)
        bias = self.bias(indices, offsets, per_sample_weights=weights)
        return vec, bias.squeeze(1)

    def distinct_bags(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(distinct, inverse, indices, offsets (D+1,), weights)``: ``ids``' distinct rows
        (ascending), the position of each id among them, and their bags in the ops' CSR
        form, by the tables' backend's ``unique_bags`` (one call where forming them with
        torch took about fifteen: 0.37 ms of a 2.0 ms BPR step on ml-latest-small, two
        threads)."""
        ids = ids.reshape(-1).to(device=self.indptr.device, dtype=torch.int64)
        kernels = table_kernels(self, ids.device, kernel="unique_bags")
        try:
            return kernels.unique_bags(ids, self.indptr, self.indices, self.weights)
        except IndexError:
            lo, hi = int(ids.min()), int(ids.max())
            if lo >= 0 and hi < self.num_rows:
                raise
            bad = lo if lo < 0 else hi
            raise IndexError(f"{self.op}: {self.name} index {bad} out of range "
                             f"[0, {self.num_rows})") from None

    def pool_distinct(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ids``' distinct rows pooled once: ``(vectors (D, dim), biases (D,), inverse
        (len(ids),))``, so that ``vectors[inverse]`` is :meth:`pool`'s result. A training
        batch repeats ids (at batch 4096 with 4 negatives on MovieLens-latest-small's warm
        split its 20,480 item ids hold about 6,000 distinct items, its 4,096 users about
        550), and the bag kernels then run on the distinct rows, forward and backward; each
        row's gradients are summed over its occurrences first, so the result differs from
        :meth:`pool`'s by float summation order only."""
        _, inverse, indices, offsets, weights = self.distinct_bags(ids)
        weights = weights.to(self.table.weight.dtype)
        # torch.nn.EmbeddingBag's offsets: the start of each bag.
        starts = offsets[:-1]
        vec = self.table(indices, starts, per_sample_weights=weights)
        bias = self.bias(indices, starts, per_sample_weights=weights)
        return vec, bias.squeeze(1), inverse

    def updated_in_backward(self) -> bool:
        """Whether both tables are :class:`fastmf.nn.EmbeddingBag` modules (not sharded)
        whose weights an optimizer updates in backward (:func:`fastmf.optim.apply_in_backward`,
        how :func:`fastmf.fit` trains them)."""
        if torch.compiler.is_compiling():  # the updates are Python side effects
            return False
        return all(type(t) is EmbeddingBag and fused_optimizer(t.weight) is not None
                   for t in (self.table, self.bias))

    def pool_rows(self, raw: sp.csr_matrix) -> tuple[Tensor, Tensor]:
        """(vectors, biases) of new rows given as raw feature weights (n, F): features only,
        normalised like the training rows (no identity row exists for them)."""
        raw = sp.csr_matrix(raw, dtype=np.float32)
        raw.sum_duplicates()
        raw.eliminate_zeros()
        if self.normalize:
            sums = np.asarray(abs(raw).sum(axis=1)).ravel()
            scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
            raw = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ raw)
        device, dtype = self.table.weight.device, self.table.weight.dtype
        indices = torch.as_tensor(raw.indices.astype(np.int64), device=device)
        offsets = torch.as_tensor(raw.indptr[:-1].astype(np.int64), device=device)
        weights = torch.as_tensor(raw.data, device=device, dtype=dtype)
        with torch.no_grad():
            vec = self.table(indices, offsets, per_sample_weights=weights)
            bias = self.bias(indices, offsets, per_sample_weights=weights)
        return vec, bias.squeeze(1)


class _PooledBags:
    """One side's distinct ids of a step pooled once without an autograd graph, with the
    bags that pooled them: the step forms the pooled rows' gradients itself and hands them
    to the tables' optimizers, as the end of a backward pass would (both tables updated in
    backward: :meth:`FeatureSide.updated_in_backward`). The bags reach the kernels as
    :meth:`FeatureSide.pool`'s lookups pass them, so the values are the same bits."""

    def __init__(self, side: FeatureSide, ids: Tensor):
        _, self.inverse, indices, offsets, weights = side.distinct_bags(ids)
        dtype = side.table.weight.dtype
        # EmbeddingBag.forward's form: the weights in the table's dtype (pool), then in the
        # accumulation type.
        weights = weights.to(dtype).to(accumulation_dtype(dtype))
        self.side, self.bags = side, (indices, offsets, weights, Pooling.SUM)
        self.vec = side.table.lookup_without_graph(*self.bags)
        self.bias = side.bias.lookup_without_graph(*self.bags).squeeze(1)

    def update(self, grad_vec: Tensor, grad_bias: Tensor) -> None:
        """One fused update of each table with the pooled rows' gradients: the table and
        its bias in one call where one optimizer updates both
        (:meth:`fastmf.optim.SparseAdagrad.apply_fused_pair`: the bags grouped once; they
        had been half of the item bias update's time), else each on its own."""
        table, bias = self.side.table, self.side.bias
        optimizer = fused_optimizer(table.weight)
        if optimizer is not None and fused_optimizer(bias.weight) is optimizer:
            optimizer.apply_fused_pair(table.weight, grad_vec, bias.weight, grad_bias[:, None],
                                       *self.bags)
            return
        for module, grad in ((table, grad_vec), (bias, grad_bias[:, None])):
            if not module.update_in_backward(grad, *self.bags):
                raise RuntimeError(f"{self.side.op}: the {self.side.name} tables are no "
                                   "longer updated in backward")


class _Pooled:
    """One side's distinct ids of a step, pooled once (:meth:`FeatureSide.pool_distinct`)."""

    def __init__(self, side: FeatureSide, ids: Tensor):
        self.vec, self.bias, self.inverse = side.pool_distinct(ids)

    def take(self, at: Tensor) -> tuple[Tensor, Tensor]:
        """(vectors, biases) of the occurrences ``at`` (positions into the distinct rows)."""
        return self.vec.index_select(0, at), self.bias.index_select(0, at)

    def penalty(self) -> Tensor:
        """Sum over the occurrences of ``||vector||² + bias²``, as a count-weighted sum over
        the distinct rows."""
        counts = torch.bincount(self.inverse, minlength=len(self.vec)).to(self.vec.dtype)
        return (counts * (self.vec.square().sum(1) + self.bias.square())).sum()


class _RankLoss(torch.autograd.Function):
    """A ranking step's loss from the rows pooled once, with a hand-written backward:
    BPR (:func:`pairwise_loss`) or BCE (:func:`pointwise_loss`, positives labelled 1 and
    negatives 0), each weighted by the positives' ``weights``, plus ``reg`` times the squared
    pooled outputs of every occurrence over B, as :meth:`Hybrid.training_step` defines it;
    or WARP's update once the violators are chosen (``"warp"``, one negative per positive,
    the chosen violator): :func:`fastmf.recommender.warp_term` summed over the positives
    with ``weights`` their rank weights (times their own weights), over ``batch`` (the
    whole batch's B, of which these are the positives with a violator), and the penalty
    over ``batch`` too.

    ``p`` (U, dim), ``bu`` (U,): the distinct users' pooled vectors and biases; ``q``
    (I, dim), ``bi`` (I,): the distinct items' (positives and negatives together);
    ``user_at`` (B,), ``pos_at`` (B,), ``neg_at`` (B, n): each occurrence's row.
    ``kernels``: the tables' backend module. The pairs are scored by its ``mf_forward`` on
    the distinct rows; the backward sums each pair's two gradient rows into the distinct
    rows with ``mf_backward_dense``. Through
    autograd the same step (gathers, a broadcast product, the loss, the penalty) made about
    twenty passes over the (pairs, dim) intermediates and summed them back with
    ``index_add_``.
    """

    @staticmethod
    def forward(ctx, p: Tensor, bu: Tensor, q: Tensor, bi: Tensor, user_at: Tensor,
                pos_at: Tensor, neg_at: Tensor, loss: str, weights: Tensor | None, reg: float,
                kernels: ModuleType, batch: int | None = None) -> Tensor:
        value, saved, ctx.counts = rank_forward(p, bu, q, bi, user_at, pos_at, neg_at, loss,
                                                weights, reg, kernels, batch)
        ctx.save_for_backward(p, bu, q, bi, *saved)
        ctx.kernels = kernels
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = rank_backward(grad, *ctx.saved_tensors, ctx.counts, ctx.kernels)
        return *grads, None, None, None, None, None, None, None, None


def _check_spec(op: str, arg: str, spec: dict) -> dict:
    keys = {"num_features", "nnz", "normalize", "signed"}
    # "vocabulary" (Features.vocabulary()) is optional: models built from a matrix, and
    # checkpoints written before it was kept, have none.
    if not keys <= set(spec) <= keys | {"vocabulary"}:
        raise ValueError(f"{op}: {arg} as a dict must have the keys {sorted(keys)} (and "
                         f"optionally 'vocabulary'), got {sorted(spec)}")
    for key in ("num_features", "nnz"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{op}: {arg}[{key!r}] must be an int >= 0, got {value!r}")
    for key in ("normalize", "signed"):
        if not isinstance(spec[key], bool):
            raise ValueError(f"{op}: {arg}[{key!r}] must be a bool, got {spec[key]!r}")
    if spec.get("vocabulary") is not None:
        vocab = Features.from_vocabulary(spec["vocabulary"], op=f"{op}: {arg}['vocabulary']")
        if vocab.num_features != spec["num_features"] or (
                vocab.normalize, vocab.signed) != (spec["normalize"], spec["signed"]):
            raise ValueError(f"{op}: {arg}['vocabulary'] has {vocab.num_features} features "
                             f"(normalize={vocab.normalize}, signed={vocab.signed}) but the "
                             f"spec {spec['num_features']} (normalize={spec['normalize']}, "
                             f"signed={spec['signed']})")
    return spec


def raw_feature_rows(op: str, arg: str, features, n: int, num_features: int) -> sp.csr_matrix:
    """``features`` for ``n`` new rows as a checked (n, F) float32 CSR of raw weights."""
    if isinstance(features, Features):
        features = features.raw
    if not (sp.issparse(features) or isinstance(features, np.ndarray)):
        raise TypeError(f"{op}: {arg} must be a scipy sparse matrix, a numpy array or "
                        f"fastmf.data.Features (rows from Features.transform), got "
                        f"{type(features).__name__}")
    raw = sp.csr_matrix(features, dtype=np.float32)
    if raw.shape != (n, num_features):
        raise ValueError(f"{op}: {arg} has shape {raw.shape}, expected ({n}, {num_features}) "
                         "(one row per new row, the model's feature columns)")
    _check_weight_array(op, arg, raw.data)
    return raw


@checkpoint.register_model
class Hybrid(Recommender):
    """LightFM's hybrid model (see the module docstring).

    Args:
        num_users, num_items: table sizes (the rows of the feature matrices).
        dim: embedding size.
        user_features, item_features: :class:`fastmf.data.Features` (rows in the
            Interactions' index order; normalised per its ``normalize``), a scipy sparse
            (rows, F) matrix of non-negative weights used as given, or None (identity only).
            Checkpoints store them as buffers (their shapes in the config).
        identity: one identity row per user/item besides its features (LightFM's default
            dataset); with ``identity=False`` every row needs a feature. A side without
            features always has identity rows (plain matrix factorisation on that side).
        init_scale: embeddings start uniform(-init_scale, init_scale); biases at 0.

    Losses: ``"bpr"`` (default), ``"bce"``, ``"warp"`` (LightFM's best ranking loss; the
    ``num_negatives`` of :func:`fastmf.fit` are its candidates per positive, LightFM's
    ``max_sampled``: 10 by default, as LightFM's) and, with ratings, ``"mse"``/``"huber"``.

    Items in the catalogue without any training interaction still have identity rows:
    training moves them only as sampled negatives (one never sampled keeps its initial
    values). :meth:`item_vectors` includes them, as LightFM's representations with the
    identity columns do; :func:`fastmf.models.coldstart.item_vectors_from_features` scores
    items from their features alone.
    """

    losses = ("bpr", "bce", "warp", "mse", "huber")
    default_loss = "bpr"
    test_config: ClassVar[dict] = {"dim": 4}
    # Its steps never read them: batches() need not shuffle them every epoch.
    uses_timestamps: ClassVar[bool] = False
    # Chosen on inner validation splits of MovieLens-latest-small and of a synthetic
    # low-rank set of a different shape (benchmarks/coldstart.py, scenarios accumulator and
    # batch): adagrad with the fused step, reg on the pooled vectors. The ranking losses
    # were first tuned at batch 1024, lr 0.05, 20 epochs; at the same training time batch
    # 4096 for 40 epochs (lr 0.05; BCE 0.1) scored as well or better on the cold-item and
    # warm inner splits of both sets (mean NDCG@10 relative to the best of the finalists,
    # three seeds: BPR 0.961 vs 0.958, BCE 0.957 vs 0.919, WARP 0.959 vs 0.953); batch
    # 1024 for 40 epochs scored higher for BPR and WARP (0.984, 0.966) at twice the time.
    # WARP was tuned with 10 candidates per positive (LightFM's max_sampled), its default
    # here. The squared losses keep the first tuning.
    defaults = {"implicit": dict(lr=0.05, reg=1e-4, epochs=40, batch_size=4096),
                "bce": dict(lr=0.1), "warp": dict(num_negatives=10),
                "explicit": dict(lr=0.05, reg=1e-3, epochs=20, batch_size=1024)}

    def __init__(self, num_users: int, num_items: int, dim: int = 64, user_features=None,
                 item_features=None, identity: bool = True, *, init_scale: float = 0.05,
                 backend: str = "auto", device=None,
                 dtype: torch.dtype | str = torch.float32):
        super().__init__()
        op = "fastmf.models.Hybrid"
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
        dtype = table_dtype(op, dtype)  # by name too, as the config keeps it
        self.dim, self.init_scale = int(dim), float(init_scale)
        self._backend_name = backend
        common = dict(init_scale=init_scale, backend=backend, dtype=dtype, device=device)
        self.users = FeatureSide(op, "user", int(num_users), self.dim, user_features, identity,
                                 **common)
        self.items = FeatureSide(op, "item", int(num_items), self.dim, item_features, identity,
                                 **common)
        self.identity = bool(identity)

    # -- configuration -------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return self.users.num_rows

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    def get_config(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "user_features": self.users.spec(), "item_features": self.items.spec(),
                "identity": self.identity, "init_scale": self.init_scale,
                "dtype": str(self.users.table.weight.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return (f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
                f"user_features={self.users.num_features}, "
                f"item_features={self.items.num_features}, identity={self.identity}")

    def features(self, side: str = "item") -> Features:
        """A row-less :class:`~fastmf.data.Features` with the vocabulary of ``side``'s
        features (``"user"`` or ``"item"``), kept in checkpoints: its
        :meth:`~fastmf.data.Features.transform` turns a table of new users/items into the
        raw feature rows that :mod:`fastmf.models.coldstart` and :meth:`add_items` take.
        ValueError when the side was built without a :class:`Features` (a matrix or none).

        >>> rows = model.features("user").transform(new_users)  # doctest: +SKIP
        >>> coldstart.recommend_from_features(model, rows, k=10)  # doctest: +SKIP
        """
        op = self._op("features")
        if side not in ("user", "item"):
            raise ValueError(f"{op}: side must be 'user' or 'item', got {side!r}")
        vocabulary = (self.users if side == "user" else self.items).vocabulary
        if vocabulary is None:
            raise ValueError(f"{op}: the {side} side was built without fastmf.data.Features "
                             "(a matrix or no features), so it has no feature names")
        return Features.from_vocabulary(vocabulary, kind=side, op=op)

    # -- scoring -----------------------------------------------------------------------------
    def forward(self, users, items) -> Tensor:
        """(B,) logits/ratings ``<p_u, q_i> + b_u + b_i``; ids checked as MF's
        (:meth:`pair_ids`). The training steps pool their batches themselves, without it."""
        users, items = self.pair_ids(users, items)
        p, bu = self.users.pool(users)
        q, bi = self.items.pool(items)
        return (p * q).sum(1) + bu + bi

    def user_vectors(self, users) -> tuple[Tensor, Tensor]:
        """``(pooled user vectors (B, dim), user biases (B,))``; ``users`` (B,) int32/int64
        in [0, num_users)."""
        users = self.as_ids(users, "users", self.num_users, method="user_vectors")
        return self.users.pool(users)

    def item_vectors(self) -> tuple[Tensor, Tensor]:
        device = self.items.indptr.device
        chunks = [self.items.pool(torch.arange(lo, min(lo + 65536, self.num_items),
                                               device=device))
                  for lo in range(0, self.num_items, 65536)]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, optimizer, *, loss: str, reg: float):
        """One update as the base class defines it (:func:`pointwise_loss` /
        :func:`pairwise_loss`, ``reg`` times the squared pooled outputs over B). Each side's
        distinct ids are pooled once (:meth:`FeatureSide.pool_distinct`: the users once,
        the positives and negatives together) and gathered per pair; the penalty is taken
        on the distinct rows, each weighted by its count (the same sum). The ranking
        losses run as :class:`_RankLoss`, whose backward writes the distinct rows'
        gradients directly."""
        if loss == "warp":
            return self._warp_step(batch, optimizer, reg)
        users, items = batch.users, batch.items
        size = users.shape[0]
        if loss in IMPLICIT:
            if batch.negatives is None:
                raise ValueError(f"{self._op('training_step')}: loss {loss!r} needs "
                                 "batch.negatives")
            negatives = batch.negatives
            n = negatives.shape[1]
            optimizer.zero_grad()
            total = self._rank_update(users, torch.cat([items.reshape(-1),
                                                        negatives.reshape(-1)]),
                                      n, loss, batch.weights, reg)
            optimizer.step()
            return total, size * n if loss == "bpr" else size * (n + 1)
        if batch.targets is None:
            raise ValueError(f"{self._op('training_step')}: loss {loss!r} needs "
                             "batch.targets")
        pu = _Pooled(self.users, users)
        p, bu = pu.take(pu.inverse)
        pi = _Pooled(self.items, items)
        q, bi = pi.take(pi.inverse)
        total = pointwise_loss((p * q).sum(1) + bu + bi, batch.targets, loss, batch.weights)
        if reg:
            total = total + reg * (pu.penalty() + pi.penalty()) / max(size, 1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return total.detach(), size

    def train_epoch(self, train, optimizer, *, batch_size: int, loss: str,
                    num_negatives: int, sampler, generator: torch.Generator,
                    reg: float) -> tuple[Tensor, list[int], int] | None:
        """bpr and bce with uniform negatives, all four tables updated in backward by one
        optimizer with one group (as :func:`fastmf.fit` trains them): the epoch as one
        ``pooled_rank_steps`` call on the tables' backend (the batches, negatives and
        updates of :meth:`batches` and :meth:`training_step`, bit for bit; the native op is
        their loop in C++). Five epochs on ml-latest-small's warm split (BPR, batch 4,096,
        two threads) took 47-54 ms this way against 70-76 ms batch by batch, alternated in
        one process: the per-batch Python between the kernels is gone
        (benchmarks/README.md, "Hybrid's epoch in one call"). None otherwise (fit runs the
        batches)."""
        if loss not in ("bpr", "bce") or sampler is None or sampler.distribution != "uniform":
            return None
        # A subclass that changes how batches are made or stepped keeps its own hooks.
        cls = type(self)
        if cls.batches is not Recommender.batches or cls.training_step is not Hybrid.training_step:
            return None
        fused = self._fused_sides(optimizer)
        if fused is None:
            return None
        opt, sides = fused
        device = self._param_device()
        kernels = table_kernels(self, device, kernel="pooled_rank_steps")
        # Batch by batch the optimizer's own backend applies the updates: the one call
        # only where that is the tables' backend, so that it repeats them bit for bit.
        if opt.fused_kernels(device) is not kernels:
            return None
        users, items, _, weights, _ = self._shuffled(train, loss, generator)
        indptr, indices = sampler.csr(device)
        optimizer.zero_grad()
        losses = kernels.pooled_rank_steps(*sides, users, items, weights, indptr, indices,
                                           sampler.num_items, num_negatives, batch_size,
                                           generator.initial_seed(), loss, float(reg))
        for side in (self.users, self.items):
            for module in (side.table, side.bias):
                opt.count_steps(module.weight, len(losses))
        n = users.shape[0]
        pairs = n * num_negatives if loss == "bpr" else n * (1 + num_negatives)
        return losses, [min(batch_size, n - lo) for lo in range(0, n, batch_size)], pairs

    def _fused_sides(self, optimizer) -> tuple[object, tuple[PooledSide, PooledSide]] | None:
        """(the optimizer, both sides as ``pooled_rank_steps`` takes them) when one fused
        optimizer updates all four tables in backward with one group's settings, on one
        device, no step hook would be skipped and ``optimizer`` holds nothing else (so its
        step() has nothing to do); else None."""
        if not (self.users.updated_in_backward() and self.items.updated_in_backward()):
            return None
        modules = [m for side in (self.users, self.items) for m in (side.table, side.bias)]
        weights = [m.weight for m in modules]
        opt = fused_optimizer(weights[0])
        if any(fused_optimizer(w) is not opt for w in weights):
            return None
        group = opt.hyperparameters(weights[0])
        if any(opt.hyperparameters(w) is not group for w in weights) \
                or len({w.device for w in weights}) > 1:
            return None
        if has_step_hooks(optimizer) or has_step_hooks(opt):
            return None
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if any(all(p is not w for w in weights) for p in held):
            return None
        sides = tuple(PooledSide(side.table.weight.detach(), opt.states(side.table.weight),
                                 opt.next_row_args(side.table.weight),
                                 side.bias.weight.detach(), opt.states(side.bias.weight),
                                 opt.next_row_args(side.bias.weight), side.indptr,
                                 side.indices, side.weights)
                      for side in (self.users, self.items))
        return opt, sides

    def _rank_update(self, users: Tensor, items: Tensor, n: int, loss: str,
                     weights: Tensor | None, reg: float, batch: int | None = None) -> Tensor:
        """Pool ``users`` (B,) and ``items`` (the B positives, then their (B, n) negatives
        row by row) once per distinct id, take the ranking loss (:class:`_RankLoss`) and
        update the tables; returns the loss. When both sides' tables are updated in
        backward (as :func:`fastmf.fit` trains them) the step runs without an autograd
        graph: :func:`~fastmf.ops.reference.pooled.rank_forward` and
        :func:`~fastmf.ops.reference.pooled.rank_backward` on the same values, and each
        table's fused update with its pooled rows' gradient, which is what the
        backward pass computes and queues; the same kernels in the same order on the same
        inputs, so the same bits. Otherwise it is a backward pass through
        :class:`_RankLoss`. (The graph, its engine and the queued updates were about a
        seventh of a BPR step at batch 4,096 on ml-latest-small, on one thread and on two:
        "Hybrid's step without an autograd graph" in benchmarks/README.md.)"""
        size = users.shape[0]
        kernels = table_kernels(self, self.users.indptr.device)
        if self.users.updated_in_backward() and self.items.updated_in_backward():
            with torch.no_grad():
                return self._rank_update_without_graph(users, items, n, loss, weights,
                                                       reg, batch, kernels)
        pu, pi = _Pooled(self.users, users), _Pooled(self.items, items)
        pos_at, neg_at = pi.inverse.split([size, size * n])
        total = _RankLoss.apply(pu.vec, pu.bias, pi.vec, pi.bias, pu.inverse, pos_at,
                                neg_at.view(size, n), loss, weights, float(reg), kernels,
                                batch)
        total.backward()
        return total.detach()

    def _rank_update_without_graph(self, users: Tensor, items: Tensor, n: int, loss: str,
                                   weights: Tensor | None, reg: float, batch: int | None,
                                   kernels: ModuleType) -> Tensor:
        """:meth:`_rank_update` when both sides' tables are updated in backward, run under
        ``no_grad``: the ops then go straight to their kernels, past the autograd formulas'
        Python wrappers and their redispatch (the four lookups, ``mf_forward`` and
        ``mf_backward_dense``: each such call cost tens of microseconds in a step of about
        1.4 ms), with the same kernels on the same inputs."""
        size = users.shape[0]
        pu, pi = _PooledBags(self.users, users), _PooledBags(self.items, items)
        pos_at, neg_at = pi.inverse.split([size, size * n])
        value, saved, counts = rank_forward(pu.vec, pu.bias, pi.vec, pi.bias, pu.inverse,
                                            pos_at, neg_at.view(size, n), loss, weights,
                                            float(reg), kernels, batch)
        grad_p, grad_bu, grad_q, grad_bi = rank_backward(
            torch.ones_like(value), pu.vec, pu.bias, pi.vec, pi.bias, *saved, counts, kernels)
        pu.update(grad_p, grad_bu)
        pi.update(grad_q, grad_bi)
        return value

    def _rank_scores(self, users: _Pooled, items: Tensor,
                     negatives: Tensor) -> tuple[Tensor, Tensor]:
        """Scores without a graph of the B positives ``items`` and their negatives (B, n)
        for the users pooled in ``users``: (the positives' (B,), the negatives' (B, n)). The
        items are pooled once; each pair's score is ``mf_forward`` on the pooled rows (dot
        plus both biases, on the tables' backend), so no (B, n, dim) block of gathered rows
        is written: WARP's ten candidates per positive at batch 4096 and dim 64 made that
        block 10.5 MB, and gathering it and its dots took about 6 ms of a 38 ms step."""
        size, n = negatives.shape
        pi = _Pooled(self.items, torch.cat([items.reshape(-1), negatives.reshape(-1)]))
        kernels = table_kernels(self, users.vec.device, kernel="mf_forward")
        scores = kernels.mf_forward(pair_users(users.inverse, n), pi.inverse, users.vec,
                                    pi.vec, users.bias, pi.bias, 0.0)
        return scores[:size], scores[size:].view(size, n)

    def _warp_step(self, batch, optimizer, reg: float):
        """WARP (:func:`fastmf.recommender.warp_loss`, LightFM's ``loss="warp"``): the
        ``num_negatives`` sampled items of each positive are its candidates (LightFM's
        ``max_sampled``, 10 there). Every candidate is scored in one batched pass without a
        graph; only the positives with a violator and their violators are pooled again with
        the graph, so the backward pass and the optimizer touch what LightFM's update
        touches (the loss of that second pass through :class:`_RankLoss`). The penalty is
        ``reg`` times the squared pooled outputs of that second pass, over B."""
        if batch.negatives is None:
            raise ValueError(f"{self._op('training_step')}: loss 'warp' needs batch.negatives "
                             "(the candidates)")
        users, items, neg = batch.users, batch.items, batch.negatives
        size, n = neg.shape
        with torch.no_grad():
            pos, cand = self._rank_scores(_Pooled(self.users, users), items, neg)
        first, weight = warp_choice(pos, cand, self.num_items)
        found = weight > 0
        m = int(found.sum())
        optimizer.zero_grad()
        if m == 0:  # no violator in the batch: nothing to update
            return torch.zeros((), dtype=pos.dtype, device=pos.device), size
        chosen = neg.gather(1, first.unsqueeze(1)).squeeze(1)
        rank = weight[found]
        if batch.weights is not None:
            rank = rank * batch.weights[found].to(rank.dtype)
        total = self._rank_update(users[found], torch.cat([items[found], chosen[found]]), 1,
                                  "warp", rank, reg, size)
        optimizer.step()
        return total, size

    # -- growing -------------------------------------------------------------------------------
    def add_users(self, n: int, features=None, *, optimizer=None, raw_ids=None) -> range:
        """Append ``n`` users (see :meth:`add_items`); returns their indices."""
        from fastmf.models import coldstart

        return coldstart.grow_hybrid(self, "user", n, features, optimizer, raw_ids=raw_ids)

    def add_items(self, n: int, features=None, *, optimizer=None, raw_ids=None) -> range:
        """Append ``n`` items and return their indices (a range). ``features``: their raw
        feature rows ((n, F) scipy/numpy, or :meth:`Features.transform` output), None for
        none. With ``identity`` the tables grow by ``n`` identity rows, started at the
        weighted mean of the row's feature embeddings (the default init without features);
        ``optimizer``: the optimizer training the model (required when it steps the tables
        in backward): its state grows too so training continues. ``raw_ids``: the new
        items' raw ids, required when the model holds an item id map (after fit). Item
        popularity grows with zeros. All-or-nothing."""
        from fastmf.models import coldstart

        return coldstart.grow_hybrid(self, "item", n, features, optimizer, raw_ids=raw_ids)
