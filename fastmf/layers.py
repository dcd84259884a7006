"""``fastmf.MF``: the textbook biased matrix-factorization model as one layer whose
forward and backward run on fused kernels."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from fastmf import checkpoint, ops
from fastmf.ops import checks, native


def sparse_rows_grad(ids: Tensor, rows: Tensor, shape) -> Tensor:
    """The gradient ``nn.Embedding(sparse=True)`` produces: an uncoalesced COO tensor with
    one row per sample."""
    return torch.sparse_coo_tensor(
        ids.long().unsqueeze(0), rows, shape, check_invariants=False, is_coalesced=False
    )


def _int64_ids(ids, what: str) -> np.ndarray:
    """``ids`` (array-like of integers) as int64, refusing floats and values int64 cannot
    hold (a uint64 id of 2**63 would otherwise wrap to a negative one). An empty list is
    an empty batch, not a float64 array."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integer ids, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8:
        too_big = array > np.iinfo(np.int64).max
        if too_big.any():
            raise IndexError(f"{what}: id {int(array[too_big].flat[0])} is out of range "
                             "(ids must fit in int64)")
    return array.astype(np.int64, copy=False)


class _KernelForward(torch.autograd.Function):
    """Forward and backward through a backend's ``mf_forward``/``mf_backward`` kernels,
    with dense or sparse (``nn.Embedding(sparse=True)``-style) gradients."""

    @staticmethod
    def forward(ctx, kernels, sparse, users, items, user_factors, item_factors, user_bias,
                item_bias, global_mean):
        ctx.kernels, ctx.sparse = kernels, sparse
        ctx.has_bias = user_bias is not None
        ctx.shapes = (user_factors.shape, item_factors.shape)
        ctx.save_for_backward(users, items, user_factors, item_factors)
        return kernels.mf_forward(users, items, user_factors, item_factors, user_bias,
                                  item_bias, global_mean)

    @staticmethod
    def backward(ctx, grad):
        users, items, user_factors, item_factors = ctx.saved_tensors
        grad = grad.contiguous()
        rows_p, rows_q = ctx.kernels.mf_backward(grad, users, items, user_factors,
                                                 item_factors)
        (num_users, dim), (num_items, _) = ctx.shapes
        if ctx.sparse:
            grads = [sparse_rows_grad(users, rows_p, (num_users, dim)),
                     sparse_rows_grad(items, rows_q, (num_items, dim))]
            if ctx.has_bias:
                grads += [sparse_rows_grad(users, grad, (num_users,)),
                          sparse_rows_grad(items, grad, (num_items,))]
        else:
            grads = [native.scatter_rows(users.long(), rows_p, num_users),
                     native.scatter_rows(items.long(), rows_q, num_items)]
            if ctx.has_bias:
                grads += [native.scatter_rows(users.long(), grad, num_users),
                          native.scatter_rows(items.long(), grad, num_items)]
        if not ctx.has_bias:
            grads += [None, None]
        return (None, None, None, None, *grads, None)


@checkpoint.register_model
class MF(nn.Module):
    """Biased matrix factorisation: ``pred = mu + b_u + b_i + <P[u], Q[i]>``.

    A drop-in for the textbook model (``nn.Embedding`` users/items, biases, a dot
    product). Parameters: ``user_factors`` (U, dim), ``item_factors`` (I, dim),
    ``user_bias`` (U,), ``item_bias`` (I,) (absent when ``bias=False``); ``global_mean``
    (mu) is a buffer. Gradients are dense, or sparse COO like ``nn.Embedding(sparse=True)``
    when ``sparse=True``.

    ``backend``: ``"reference"`` (plain PyTorch, the spec), ``"numba"`` (Numba CPU
    kernels), ``"native"`` (C++/CUDA ops, dispatched by device) or ``"auto"`` (native if
    built, else numba, else reference); :func:`fastmf.ops.kernels` picks the kernels.
    All backends share the same parameters, so
    ``model.backend = "numba"`` on a trained model changes only how it computes.

    Init: factors uniform(-init_scale, init_scale) from the global torch RNG (users first,
    then items), biases zero — the same for every backend under the same seed.

    >>> import torch, fastmf
    >>> model = fastmf.MF(100, 50, dim=8, global_mean=3.5)
    >>> model(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
    torch.Size([2])
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *, bias: bool = True,
                 global_mean: float = 0.0, backend: str = "auto", sparse: bool = False,
                 init_scale: float = 0.05, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"fastmf.MF: {name} must be a positive int, got {value!r}")
        if dtype not in checks.WEIGHT_DTYPES:
            raise TypeError(f"fastmf.MF: dtype must be float32 or float64, got {dtype}")
        factory = dict(dtype=dtype, device=device)
        self.user_factors = nn.Parameter(torch.empty(num_users, dim, **factory))
        self.item_factors = nn.Parameter(torch.empty(num_items, dim, **factory))
        if bias:
            self.user_bias = nn.Parameter(torch.zeros(num_users, **factory))
            self.item_bias = nn.Parameter(torch.zeros(num_items, **factory))
        else:
            self.register_parameter("user_bias", None)
            self.register_parameter("item_bias", None)
        self.register_buffer("global_mean", torch.tensor(float(global_mean), **factory))
        self._global_mean_value = float(global_mean)
        self.sparse = bool(sparse)
        self.init_scale = float(init_scale)
        self.backend = backend
        # Filled from the training data (fastmf.fit / attach_data): raw-id maps, titles and
        # popularity for recommendations by raw id and the cold-start fallback.
        self.user_map = None
        self.item_map = None
        self.item_titles = None
        self.item_popularity = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.user_factors.uniform_(-self.init_scale, self.init_scale)
        self.item_factors.uniform_(-self.init_scale, self.init_scale)
        if self.user_bias is not None:
            self.user_bias.zero_()
            self.item_bias.zero_()

    # -- configuration -------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend in use (``"auto"`` is resolved when set)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = ops.resolve_backend(name, op="fastmf.MF")

    @property
    def num_users(self) -> int:
        return self.user_factors.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    @property
    def dim(self) -> int:
        return self.user_factors.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.user_bias is not None

    @property
    def mu(self) -> float:
        """The global mean as a Python float (no device sync)."""
        return self._global_mean_value

    def set_global_mean(self, value: float) -> None:
        self._global_mean_value = float(value)
        self.global_mean.fill_(float(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._global_mean_value = float(self.global_mean)

    def extra_repr(self) -> str:
        return (f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
                f"bias={self.has_bias}, sparse={self.sparse}, backend={self.backend!r}")

    def tables(self):
        """(user_factors, item_factors, user_bias, item_bias) — biases None without bias."""
        return self.user_factors, self.item_factors, self.user_bias, self.item_bias

    # -- compute ----------------------------------------------------------------------------
    def as_ids(self, ids, name: str) -> Tensor:
        """Tensor ids on the model's device (numpy arrays and lists accepted)."""
        if isinstance(ids, Tensor):
            return ids
        return torch.as_tensor(_int64_ids(ids, f"fastmf.MF: {name}"),
                               device=self.user_factors.device)

    def forward(self, users, items) -> Tensor:
        """``users``, ``items``: (B,) int32/int64 -> predictions (B,)."""
        users, items = self.as_ids(users, "users"), self.as_ids(items, "items")
        p, q, bu, bi = self.tables()
        if self._backend == "native" and not self.sparse:
            # The op's registered autograd gives dense gradients and works under torch.compile.
            return native.mf_forward(users, items, p, q, bu, bi, self._global_mean_value)
        kernels = ops.kernels(self._backend, p.device)
        return _KernelForward.apply(kernels, self.sparse, users, items, p, q, bu, bi,
                                    self._global_mean_value)

    def attach_data(self, data) -> MF:
        """Keep ``data``'s (an :class:`fastmf.data.Interactions`) id maps, item titles and
        item popularity, so the model answers in raw ids and has a cold-start fallback."""
        if data.num_users != self.num_users or data.num_items != self.num_items:
            raise ValueError(
                f"fastmf.MF: data has {data.num_users} users x {data.num_items} items, the "
                f"model {self.num_users} x {self.num_items}")
        self.user_map, self.item_map = data.user_map, data.item_map
        self.item_titles = data.item_titles
        self.item_popularity = np.bincount(data.items, minlength=self.num_items)
        return self

    def save(self, path, *, optimizer=None, extra: dict | None = None):
        """Save to the checkpoint folder ``path`` atomically (see :mod:`fastmf.checkpoint`)."""
        return checkpoint.save(self, path, optimizer=optimizer, extra=extra)

    # -- serving -----------------------------------------------------------------------------
    def _exclusion_rows(self, exclude, users: np.ndarray):
        """Per-query CSR rows of ``exclude`` (Interactions or a (num_users, num_items) sparse
        matrix indexed by user)."""
        import scipy.sparse as sp

        from fastmf.data import Interactions

        if exclude is None:
            return None
        if isinstance(exclude, Interactions):
            exclude = exclude.to_csr(binary=True)
        if not sp.issparse(exclude):
            raise TypeError("fastmf.MF.recommend: exclude must be Interactions or a scipy "
                            f"sparse matrix, got {type(exclude).__name__}")
        if exclude.shape != (self.num_users, self.num_items):
            raise ValueError(f"fastmf.MF.recommend: exclude has shape {exclude.shape}, "
                             f"expected (num_users, num_items) = "
                             f"{(self.num_users, self.num_items)}")
        return sp.csr_matrix(exclude)[users]

    def _index_of(self, ids, side: str, raw_ids: bool) -> np.ndarray:
        """Indices (int64 numpy) of ``ids``; with ``raw_ids``, unknown raw ids become -1."""
        id_map = getattr(self, f"{side}_map")
        if raw_ids:
            if id_map is None:
                raise ValueError(f"fastmf.MF: raw_ids=True but the model holds no {side} id "
                                 "map (train it with fastmf.fit or call attach_data)")
            return id_map.lookup(ids)
        array = _int64_ids(ids.detach().cpu().numpy() if isinstance(ids, Tensor) else ids,
                           f"fastmf.MF: {side}s").reshape(-1)
        limit = self.num_users if side == "user" else self.num_items
        bad = (array < 0) | (array >= limit)
        if bad.any():
            raise IndexError(f"fastmf.MF: {side} index {int(array[bad][0])} out of range "
                             f"[0, {limit}) (pass raw_ids=True for raw ids)")
        return array

    def _warn_unknown(self, users, known: np.ndarray) -> None:
        """Unknown raw users get the popular-items fallback; say so, and say when the cause
        is probably the id's type (the string "1" where the ids are integers)."""
        values = np.asarray(users.cpu() if isinstance(users, Tensor) else users,
                            dtype=object).reshape(-1)
        unknown = values[~known]
        map_kind = self.user_map.raw_ids.dtype.kind
        hint = ""
        typed = [v for v in unknown[:5]
                 if isinstance(v, str) != (map_kind in "OUS")]
        if typed:
            hint = (f"; {typed[0]!r} is a {type(typed[0]).__name__} but the model's raw user "
                    f"ids are {self.user_map.raw_ids.dtype}")
        warnings.warn(f"fastmf.MF.recommend: {len(unknown)} unknown raw user id(s) "
                      f"{list(unknown[:5])} get the popular-items fallback{hint}",
                      stacklevel=3)

    def _to_raw(self, indices: Tensor):
        """Item indices (with -1 padding) -> raw item ids (numpy; None for padding)."""
        idx = indices.cpu().numpy()
        raw = self.item_map.raw_ids[np.where(idx >= 0, idx, 0)]
        if (idx < 0).any():
            raw = raw.astype(object)
            raw[idx < 0] = None
        return raw

    @torch.no_grad()
    def recommend(self, users, k: int = 10, *, exclude=None, items=None,
                  batch_size: int | None = None, raw_ids: bool = False):
        """Exact top-``k`` items for each user: ``(items (B, k), scores (B, k))``.

        Ranks by ``b_i + <P[u], Q[i]>`` (``mu`` and ``b_u`` do not change a user's order) and
        returns the true predicted scores ``mu + b_u + b_i + <P[u], Q[i]>``. Equal scores go
        to the lower item index. Where fewer than ``k`` items remain (``k`` above the
        candidates, everything excluded) rows are padded with index ``-1`` and score
        ``-inf``.

        - ``exclude``: items to leave out per user, usually their training items: an
          :class:`~fastmf.data.Interactions` or a (num_users, num_items) sparse matrix.
        - ``items``: rank only these candidate items.
        - ``raw_ids``: users and ``items`` are raw ids and raw item ids come back (numpy;
          ``None`` marks padding). A raw user id the model has never seen gets the
          cold-start fallback: the most popular training items (``item_popularity``),
          scored ``mu + b_i``; unknown candidate items are never returned.

        >>> items, scores = model.recommend([0, 1], k=10, exclude=train)  # doctest: +SKIP
        """
        from fastmf import retrieval

        k = checks.check_k("MF.recommend", k)
        index = self._index_of(users, "user", raw_ids)
        known = index >= 0
        if raw_ids and not known.all():
            self._warn_unknown(users, known)
        candidates = None
        if items is not None:
            candidates = self._index_of(items, "item", raw_ids)
            candidates = torch.as_tensor(candidates[candidates >= 0],
                                         device=self.user_factors.device)
        device = self.user_factors.device
        batch = len(index)
        out_items = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        out_scores = torch.full((batch, k), float("-inf"), dtype=self.user_factors.dtype,
                                device=device)
        bias = self.item_bias.detach() if self.has_bias else None
        if known.any():
            rows = index[known]
            user_rows = torch.as_tensor(rows, device=device)
            scores, top = retrieval.topk_scores(
                self.user_factors.detach()[user_rows], self.item_factors.detach(), bias, k,
                exclude=self._exclusion_rows(exclude, rows), candidates=candidates,
                backend=self._backend, batch_size=batch_size)
            shift = self.mu + (self.user_bias.detach()[user_rows] if self.has_bias else 0.0)
            scores = torch.where(top >= 0, scores + (shift.unsqueeze(1) if self.has_bias
                                                     else shift), scores)
            mask = torch.as_tensor(known, device=device)
            out_items[mask], out_scores[mask] = top, scores
        if not known.all():
            top = self._most_popular(k, candidates)
            scores = torch.full((k,), float("-inf"), dtype=out_scores.dtype, device=device)
            found = top >= 0
            scores[found] = self.mu + (bias[top[found]] if bias is not None else 0.0)
            mask = torch.as_tensor(~known, device=device)
            out_items[mask], out_scores[mask] = top, scores
        if raw_ids:
            return self._to_raw(out_items), out_scores.cpu().numpy()
        return out_items, out_scores

    def _most_popular(self, k: int, candidates: Tensor | None) -> Tensor:
        """(k,) the most-interacted training items (among ``candidates``): the cold-start
        ranking. Without popularity counts every item ties, so the lowest indices win."""
        from fastmf import retrieval

        device = self.user_factors.device
        counts = np.zeros(self.num_items) if self.item_popularity is None else (
            self.item_popularity)
        counts = torch.as_tensor(counts, dtype=torch.float64, device=device)
        _, top = retrieval.topk_scores(counts.new_zeros((1, 0)), counts.new_zeros((len(counts), 0)),
                                       counts, k, candidates=candidates,
                                       backend=self._backend)
        return top[0]

    @torch.no_grad()
    def _similar(self, table: Tensor, ids, side: str, k: int, metric: str, raw_ids: bool):
        from fastmf import retrieval

        index = self._index_of(ids, side, raw_ids)
        if raw_ids and (index < 0).any():
            raise KeyError(f"fastmf.MF: unknown raw {side} id(s): "
                           f"{list(np.asarray(ids)[index < 0][:5])}")
        scores, top = retrieval.similar(table.detach(), torch.as_tensor(index), k, metric,
                                        backend=self._backend)
        if raw_ids:
            id_map = getattr(self, f"{side}_map")
            raw = id_map.raw_ids[np.where(top.numpy() >= 0, top.numpy(), 0)]
            return raw, scores.numpy()
        return top, scores

    def similar_items(self, items, k: int = 10, metric: str = "cosine", *,
                      raw_ids: bool = False):
        """The ``k`` items most similar to each query item by their factors (``"cosine"`` or
        ``"dot"``), the query itself left out: ``(items (B, k), scores (B, k))``."""
        return self._similar(self.item_factors, items, "item", k, metric, raw_ids)

    def similar_users(self, users, k: int = 10, metric: str = "cosine", *,
                      raw_ids: bool = False):
        """The ``k`` users most similar to each query user (see :meth:`similar_items`)."""
        return self._similar(self.user_factors, users, "user", k, metric, raw_ids)

    @torch.no_grad()
    def predict(self, users, items) -> Tensor:
        """Predictions without building an autograd graph."""
        return self.forward(users, items)

    @torch.no_grad()
    def analogy(self, positive=(), negative=(), k: int = 10, *, metric: str = "cosine",
                side: str = "item", raw_ids: bool = False, exclude=None,
                vectors: dict | None = None):
        """Latent arithmetic: the ``k`` items (or users) nearest to
        ``sum(positive) - sum(negative)``, as in word2vec's "king - man + woman".

        With ``metric="cosine"`` every term is normalised to unit length first and the
        result ranked by cosine similarity (gensim's ``most_similar``); with ``"dot"`` the
        raw vectors are summed and ranked by the dot product (no biases). The query's own
        items (or users) and those in ``exclude`` are left out.

        - ``positive``, ``negative``: item ids (user ids with ``side="user"``; raw ids with
          ``raw_ids=True``) or names of ``vectors``. A single id may be passed bare.
          ``positive`` must not be empty.
        - ``vectors``: ``{name: (dim,) vector}``, arbitrary vectors the lists may name, e.g.
          a genre's mean item vector. A name must not also be a raw id.
        - ``exclude``: further ids (raw with ``raw_ids``) never returned.

        Returns ``(ids (k,), scores (k,))``: index tensors, or with ``raw_ids`` numpy raw
        ids and scores. Where fewer than ``k`` remain the tail is padded with ``-1``
        (``None`` for raw ids) and ``-inf``, as in :meth:`recommend`.

        >>> items, scores = model.analogy([shrek], ["Animation"], vectors={  # doctest: +SKIP
        ...     "Animation": model.item_factors[animated].mean(0)}, raw_ids=True)
        """
        return _analogy(self, positive, negative, k, metric=metric, side=side,
                        raw_ids=raw_ids, exclude=exclude, vectors=vectors)


def _terms(ids, vectors: dict) -> tuple[list, list]:
    """``ids`` (a list or one bare id) split into (ids, names of ``vectors``)."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, str | bytes) or np.ndim(ids) == 0:
        ids = [ids]
    plain, named = [], []
    for value in (ids.reshape(-1) if isinstance(ids, np.ndarray) else ids):
        (named if isinstance(value, str) and value in vectors else plain).append(value)
    return plain, named


def _analogy(model, positive, negative, k, *, metric, side, raw_ids, exclude, vectors):
    """:meth:`MF.analogy` for any model with ``{side}_factors`` tables, ``{side}_map`` id
    maps, ``_index_of`` and ``backend``."""
    from fastmf import retrieval

    op = "fastmf.MF.analogy"
    if metric not in retrieval.topk.METRICS:
        raise ValueError(f"{op}: unknown metric {metric!r}; expected one of "
                         f"{retrieval.topk.METRICS}")
    if side not in ("item", "user"):
        raise ValueError(f"{op}: side must be 'item' or 'user', got {side!r}")
    k = checks.check_k("MF.analogy", k)
    table = getattr(model, f"{side}_factors").detach()
    vectors = dict(vectors or {})
    id_map = getattr(model, f"{side}_map")
    extra = {}
    for name, value in vectors.items():
        if not isinstance(name, str):
            raise TypeError(f"{op}: vectors keys must be names (str), got {name!r}")
        if raw_ids and id_map is not None and (id_map.lookup(np.asarray([name])) >= 0).all():
            raise ValueError(f"{op}: vectors name {name!r} is also a raw {side} id; rename it")
        vec = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, Tensor)
                                         else value, dtype=np.float64))
        if vec.shape != (table.shape[1],):
            raise ValueError(f"{op}: vectors[{name!r}] has shape {tuple(vec.shape)}, expected "
                             f"({table.shape[1]},) (the model's dim)")
        if not torch.isfinite(vec).all():
            raise ValueError(f"{op}: vectors[{name!r}] holds NaN or inf")
        extra[name] = vec.to(dtype=table.dtype, device=table.device)

    def rows(ids, what):
        plain, named = _terms(ids, vectors)
        index = np.zeros(0, dtype=np.int64)
        if plain:
            names = [v for v in plain if isinstance(v, str)]
            if names and not raw_ids:
                raise KeyError(f"{op}: {what} holds {names[0]!r}, which is no {side} index "
                               f"and no name in vectors (names: {sorted(vectors)})")
            mixed = len(names) not in (0, len(plain))
            # Mixed ids and names stay objects: numpy would turn 4306 into the string '4306'.
            values = np.asarray(plain, dtype=object if mixed else None)
            index = model._index_of(values, side, raw_ids)
            if raw_ids and (index < 0).any():
                hint = f" (names in vectors: {sorted(vectors)})" if vectors else ""
                raise KeyError(f"{op}: unknown raw {side} id(s) in {what}: "
                               f"{values[index < 0][:5].tolist()}{hint}")
        return index, [extra[name] for name in named]

    pos_index, pos_named = rows(positive, "positive")
    neg_index, neg_named = rows(negative, "negative")
    if len(pos_index) + len(pos_named) == 0:
        raise ValueError(f"{op}: positive is empty; give at least one {side} id or vectors "
                         "name")
    terms = [table[torch.as_tensor(pos_index, device=table.device)]]
    terms += [v.unsqueeze(0) for v in pos_named]
    signs = [1.0] * (len(pos_index) + len(pos_named))
    terms += [table[torch.as_tensor(neg_index, device=table.device)]]
    terms += [v.unsqueeze(0) for v in neg_named]
    signs += [-1.0] * (len(neg_index) + len(neg_named))
    stacked = torch.cat(terms)
    tiny = torch.finfo(table.dtype).tiny
    search = table
    if metric == "cosine":
        stacked = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(tiny)
        search = table / table.norm(dim=1, keepdim=True).clamp_min(tiny)
    query = (torch.as_tensor(signs, dtype=table.dtype, device=table.device).unsqueeze(1)
             * stacked).sum(0)
    norm = float(query.norm())
    if not norm > 0:
        raise ValueError(f"{op}: the query vector sum(positive) - sum(negative) is zero; "
                         "the terms cancel out")
    if metric == "cosine":
        query = query / norm

    skip = [pos_index, neg_index]
    if exclude is not None:
        skip.append(rows(exclude, "exclude")[0])
    skip = np.unique(np.concatenate(skip))
    scores, top = retrieval.topk_scores(
        query.unsqueeze(0), search, None, k,
        exclude=(torch.tensor([0, len(skip)], device=table.device),
                 torch.as_tensor(skip, device=table.device)),
        backend=model.backend)
    top, scores = top[0], scores[0]
    if not raw_ids:
        return top, scores
    idx = top.cpu().numpy()
    raw = id_map.raw_ids[np.where(idx >= 0, idx, 0)]
    if (idx < 0).any():
        raw = raw.astype(object)
        raw[idx < 0] = None
    return raw, scores.cpu().numpy()
