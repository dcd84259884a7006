"""The model protocol: :class:`Recommender`, :class:`Batch` and the loss helpers.

Their public home is :mod:`fastmf.models.base`; they live in this module because
``fastmf.MF`` is a Recommender and ``import fastmf`` imports it, while importing anything
under ``fastmf.models`` runs that package's ``__init__``, which imports every model file
(and model files may build on ``fastmf.MF``). This module imports only torch and numpy
at the top; pandas and scipy load where a method needs them.

A model implements the training hooks ``fit`` calls (``check_data``, ``prepare``,
``make_optimizer``, ``batches``, ``training_step``) and the scoring hooks the serving code
uses (``forward``; ``user_vectors``/``item_vectors`` for dot-product models, else
``score_items``). Everything else (``recommend``, ``similar_items``, ``predict``,
``analogy``, ``save``) is here, once for every model.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmf import checkpoint, ops
from fastmf._arrays import array_to_tensor
from fastmf.ops import checks
from fastmf.ops.codes import Loss, PairwiseLoss, names

__all__ = ["EXPLICIT", "IMPLICIT", "FIT_LOSSES", "KERNEL_LOSSES", "MODEL_LOSSES", "Batch",
           "FactorTables", "NegativeDraw", "Recommender", "loss_kind", "pairwise_loss",
           "pointwise_loss", "warp_choice", "warp_loss", "warp_term"]

# fit's loss names. The kernels' vocabulary (fastmf/ops/codes.py): the implicit ones (BCE
# against sampled negatives, the pairwise losses) and the rating (explicit) ones. Then the
# ranking losses no kernel computes, only autograd training steps (the default one and
# Hybrid's): a model trains with them only when it lists them in ``losses``, so they are
# not in the default ``Recommender.losses`` (KERNEL_LOSSES, what MF's fused steps run).
MODEL_LOSSES = ("warp",)
# The fused steps' pairwise losses also include hinge, which fit offers only inside MF's
# WARP step (its violators are picked first), not as a loss of its own.
KERNEL_IMPLICIT = (Loss.BCE.name.lower(), PairwiseLoss.BPR.name.lower())
IMPLICIT = KERNEL_IMPLICIT + MODEL_LOSSES
EXPLICIT = tuple(name for name in names(Loss) if name not in IMPLICIT)
FIT_LOSSES = EXPLICIT + IMPLICIT
KERNEL_LOSSES = EXPLICIT + KERNEL_IMPLICIT
HUBER_DELTA = 1.0
# score_items and the ranking of models without item vectors materialise (users x items)
# scores in chunks of about this many, so that a large catalog does not exhaust memory.
SCORE_CHUNK = 1 << 22
_INT32_MAX = 2**31 - 1


def _index_dtype(n: int) -> torch.dtype:
    """The narrowest index dtype that holds positions [0, n): int32, or int64."""
    return torch.int32 if n <= _INT32_MAX else torch.int64


def inference(method):
    """Run ``method`` like ``torch.no_grad()`` and in eval mode (dropout off: a prediction
    must not depend on a random mask), restoring the module's train/eval mode after."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            if was_training:
                self.train()

    return wrapper


class FactorTables:
    """``num_users``, ``num_items`` and ``dim`` of a model that keeps ``user_factors``
    (num_users, dim) and ``item_factors`` (num_items, dim) tables (MF, ALS): mixed in before
    :class:`Recommender`, they follow the tables when those grow."""

    @property
    def num_users(self) -> int:
        return self.user_factors.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    @property
    def dim(self) -> int:
        return self.user_factors.shape[1]


class NegativeDraw(NamedTuple):
    """Uniform negatives left for the training step to draw (:class:`fastmf.MF`: the fused
    ``train_step_pairwise_sampled`` op for bpr, ``train_step_sampled`` for bce):
    ``num_negatives`` per positive against the positives' CSR (``indptr``, ``indices``),
    from (``seed``, ``step``) — the same items :meth:`fastmf.data.NegativeSampler.sample_step`
    returns."""

    indptr: Tensor
    indices: Tensor
    num_negatives: int
    seed: int
    step: int


class Batch(NamedTuple):
    """One training batch, as :meth:`Recommender.batches` yields it.

    ``users``/``items`` (B,) int64 (the positives for implicit losses); ``targets`` (B,)
    ratings for explicit losses; ``negatives`` (B, n) sampled items for implicit ones;
    ``weights`` (B,) per-interaction confidence; ``timestamps`` (B,); ``draw`` instead of
    ``negatives`` where the model's step samples them itself (:class:`NegativeDraw`)."""

    users: Tensor
    items: Tensor
    targets: Tensor | None = None
    negatives: Tensor | None = None
    weights: Tensor | None = None
    timestamps: Tensor | None = None
    draw: NegativeDraw | None = None


def loss_kind(loss: str) -> str:
    """``"explicit"`` for mse/huber, ``"implicit"`` for bce/bpr (ValueError otherwise)."""
    if loss in EXPLICIT:
        return "explicit"
    if loss in IMPLICIT:
        return "implicit"
    raise ValueError(f"fastmf.models.loss_kind: unknown loss {loss!r}; expected one of "
                     f"{FIT_LOSSES}")


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if values.numel() == 0:
        return values.sum()
    if weights is None:
        return values.mean()
    return (values * weights.to(values.dtype)).mean()


def pointwise_loss(scores: Tensor, targets: Tensor, loss: str,
                   weights: Tensor | None = None) -> Tensor:
    """Mean per-pair loss of ``scores`` (B,) against ``targets`` (B,): ``"mse"``,
    ``"huber"`` (delta 1) or ``"bce"`` (``scores`` are logits, ``targets`` 0/1 labels).
    ``weights`` (B,) scale each pair's term (confidence); the mean is over B either way,
    so weights of 1 give the unweighted loss. The numbers of the fused ``train_step``."""
    targets = targets.to(scores.dtype)
    if loss == "mse":
        per_pair = (scores - targets).square()
    elif loss == "huber":
        per_pair = F.huber_loss(scores, targets, delta=HUBER_DELTA, reduction="none")
    elif loss == "bce":
        per_pair = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
    else:
        raise ValueError(f"fastmf.models.pointwise_loss: unknown loss {loss!r}; expected "
                         "'mse', 'huber' or 'bce'")
    return _weighted_mean(per_pair, weights)


def pairwise_loss(positive: Tensor, negative: Tensor, loss: str = "bpr",
                  weights: Tensor | None = None) -> Tensor:
    """BPR: mean over every (positive, negative) pair of ``softplus(neg - pos)``
    (= ``-log sigmoid(pos - neg)``). ``positive`` (B,), ``negative`` (B, n) scores;
    ``weights`` (B,) scale each positive's n terms."""
    if loss != "bpr":
        raise ValueError(f"fastmf.models.pairwise_loss: unknown loss {loss!r}; expected 'bpr'")
    if negative.dim() != 2 or negative.shape[0] != positive.shape[0]:
        raise ValueError(f"fastmf.models.pairwise_loss: negative must be (B, n) with B = "
                         f"{positive.shape[0]}, got shape {tuple(negative.shape)}")
    per_pair = F.softplus(negative - positive.unsqueeze(1))
    if weights is not None:
        weights = weights.to(per_pair.dtype).unsqueeze(1).expand_as(per_pair)
    return _weighted_mean(per_pair.reshape(-1), None if weights is None
                          else weights.reshape(-1))


# LightFM's cap on the rank weight of one WARP update (MAX_LOSS in _lightfm_fast).
WARP_MAX_WEIGHT = 10.0


def warp_choice(positive: Tensor, candidates: Tensor, num_items: int) -> tuple[Tensor, Tensor]:
    """WARP's pick for each positive: ``(first (B,) int64, weight (B,))``.

    ``positive`` (B,) scores of the positives, ``candidates`` (B, n) scores of n sampled
    candidate negatives in draw order. ``first`` is the index of the first candidate that
    violates the margin, ``s_j > s_i - 1`` (0 where none does); ``weight`` is the rank
    weight ``min(log(max(1, floor((num_items - 1) / N))), 10)`` with ``N = first + 1`` the
    trials it took, 0 where no candidate violates. That is what LightFM 1.17's ``fit_warp``
    computes (``log`` of the rank estimate, not Weston et al.'s harmonic sum, and clipped at
    its ``MAX_LOSS`` of 10). No gradient: the scores are only compared."""
    positive, candidates = positive.detach(), candidates.detach()
    if candidates.dim() != 2 or candidates.shape[0] != positive.shape[0]:
        raise ValueError(f"fastmf.models.warp_choice: candidates must be (B, n) with B = "
                         f"{positive.shape[0]}, got shape {tuple(candidates.shape)}")
    if (isinstance(num_items, bool) or not isinstance(num_items, int | np.integer)
            or num_items < 1):
        raise ValueError(f"fastmf.models.warp_choice: num_items must be an int >= 1, got "
                         f"{num_items!r}")
    num_items = int(num_items)
    size, n = candidates.shape
    violates = candidates > positive.unsqueeze(1) - 1  # NaN never violates
    order = torch.arange(n, device=candidates.device).expand(size, n)
    first = torch.where(violates, order, n).amin(1) if n else order.new_zeros(size)
    found = first < n
    trials = (first + 1).to(torch.float64)
    rank = torch.floor((num_items - 1) / trials).clamp_min(1.0)
    weight = torch.where(found, torch.log(rank).clamp_max(WARP_MAX_WEIGHT), 0.0)
    return torch.where(found, first, 0), weight.to(positive.dtype)


def warp_term(positive: Tensor, chosen: Tensor, weight: Tensor,
              weights: Tensor | None = None) -> Tensor:
    """Mean over B of ``weight * (1 - positive + chosen)`` (0 where ``weight`` is 0):
    WARP's loss once :func:`warp_choice` picked the violator ``chosen`` (B,) scores;
    ``weights`` (B,) scale each positive's term."""
    hinge = torch.where(weight > 0, weight * (1.0 - positive + chosen),
                        torch.zeros((), dtype=positive.dtype, device=positive.device))
    return _weighted_mean(hinge, weights)


def warp_loss(positive: Tensor, candidates: Tensor, num_items: int,
              weights: Tensor | None = None) -> Tensor:
    """WARP (Weston et al. 2011, as LightFM trains it) of ``positive`` (B,) scores against
    ``candidates`` (B, n) scores of sampled negatives in draw order: for each positive the
    first candidate violating the margin (``s_j > s_i - 1``) at trial N contributes
    ``min(log(max(1, floor((num_items - 1) / N))), 10) * (1 - s_i + s_j)``; a positive with
    no violator among its n contributes 0. The mean is over B (``weights`` (B,) scale each
    term). Gradients reach ``s_i`` and the chosen ``s_j`` only (the rank weight is a
    constant). Batched: the n candidates of every positive are compared at once, which
    picks exactly what LightFM's draw-until-violation loop with ``max_sampled = n`` picks
    from the same draws. One difference lies in the draws: fit's candidates
    (:class:`fastmf.data.NegativeSampler`, uniform by default) are never the user's
    positives, while LightFM draws from every item and skips a violating positive (the
    trial still counts in N)."""
    first, weight = warp_choice(positive, candidates, num_items)
    if candidates.shape[1] == 0:
        chosen = torch.zeros_like(positive)
    else:
        chosen = candidates.gather(1, first.unsqueeze(1)).squeeze(1)
    return warp_term(positive, chosen, weight, weights)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, batch...): what a batch draws depends only
    on these, so a resumed run draws exactly what a straight run does."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def int64_ids(ids, what: str) -> np.ndarray:
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


_SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd", "adam", "rowwise_adam")


class Recommender(nn.Module):
    """Base class of fastmf's models (see the "Models" section of the README).

    Subclasses define ``__init__(num_users, num_items, <knobs>, *, backend="auto",
    device=None, dtype=torch.float32)`` keeping ``num_users``/``num_items`` as attributes,
    :meth:`get_config`, :meth:`forward`, and either both :meth:`user_vectors` and
    :meth:`item_vectors` (dot-product models: exact fused top-k, similar items, analogies)
    or nothing more (scores come from :meth:`score_items`, i.e. ``forward`` in chunks).
    Register the class with :func:`fastmf.checkpoint.register_model` so checkpoints can
    name it.

    Class attributes: ``losses`` (what :func:`fastmf.fit` may train it with),
    ``default_loss``, ``defaults`` (``{"explicit": {...}, "implicit": {...}}`` of
    lr/reg/epochs/batch_size merged over fit's, and optionally by loss name, e.g.
    ``{"warp": {...}}`` merged over its kind's), ``dense_lr`` (the Adam learning rate of
    parameters that are not embedding tables), ``test_config`` (small constructor
    kwargs for the protocol tests), ``uses_timestamps`` (whether :meth:`batches` hands
    :meth:`training_step` the interactions' timestamps; a model that never reads them sets
    it False and skips their per-epoch shuffle) and ``uses_weights`` (whether its training
    step honours ``batch.weights``, the interactions' per-row ``weights``: the default
    :meth:`training_step` does; :func:`fastmf.fit` refuses weighted data for a model that
    sets it False rather than train as if the weights were not there).
    """

    losses: ClassVar[tuple[str, ...]] = KERNEL_LOSSES
    default_loss: ClassVar[str] = "mse"
    defaults: ClassVar[dict] = {}
    dense_lr: ClassVar[float] = 1e-3
    test_config: ClassVar[dict] = {}
    uses_timestamps: ClassVar[bool] = True
    uses_weights: ClassVar[bool] = True

    # Filled from the training data (prepare / attach_data): raw-id maps, titles and
    # popularity for answers in raw ids and the cold-start fallback.
    user_map = None
    item_map = None
    item_titles = None
    item_popularity = None

    # -- names, device, dtype ---------------------------------------------------------------
    @classmethod
    def public_name(cls) -> str:
        """How errors name the class: ``fastmf.models.NeuMF``, ``fastmf.MF``, ``MyModel``."""
        module = cls.__module__
        if module.startswith("fastmf.models") or module == "fastmf.recommender":
            return f"fastmf.models.{cls.__name__}"
        if module.startswith("fastmf"):
            return f"fastmf.{cls.__name__}"
        return cls.__name__

    def _op(self, method: str | None = None) -> str:
        name = self.public_name()
        return name if method is None else f"{name}.{method}"

    def _first_tensor(self) -> Tensor | None:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return None

    # Methods with private names, not properties: subclasses often keep their own
    # ``self.device``/``self.dtype`` attributes.
    def _param_device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a model without any)."""
        tensor = self._first_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    def _param_dtype(self) -> torch.dtype:
        """The dtype of the model's first floating parameter (float32 without any)."""
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    @property
    def has_vectors(self) -> bool:
        """Whether the model is a dot-product model (defines user_vectors and item_vectors)."""
        cls = type(self)
        return (cls.user_vectors is not Recommender.user_vectors
                and cls.item_vectors is not Recommender.item_vectors)

    # -- configuration ------------------------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-able constructor kwargs that rebuild this architecture (``num_users`` and
        ``num_items`` included, ``backend``/``device`` not; ``dtype`` as its name)."""
        raise NotImplementedError(f"{self._op('get_config')}: the model class must define "
                                  "get_config() to be saved")

    @classmethod
    def from_interactions(cls, train, **kwargs):
        """A model sized for ``train`` (an :class:`~fastmf.data.Interactions`)."""
        return cls(train.num_users, train.num_items, **kwargs)

    # -- training hooks -----------------------------------------------------------------------
    def check_data(self, train) -> None:
        """Raise ValueError when ``train`` does not fit the model (default: its sizes)."""
        if (train.num_users, train.num_items) != (self.num_users, self.num_items):
            raise ValueError(
                f"{self._op()}: data has {train.num_users} users x {train.num_items} items, "
                f"the model {self.num_users} x {self.num_items}")

    def prepare(self, train) -> None:
        """Called before the first epoch and by :meth:`attach_data`: keep ``train``'s id
        maps, item titles and item popularity."""
        self.user_map, self.item_map = train.user_map, train.item_map
        self.item_titles = train.item_titles
        self.item_popularity = np.bincount(train.items, minlength=self.num_items)

    def make_optimizer(self, name: str | None, lr: float):
        """The optimizer ``fit`` uses: every fastmf.nn embedding table under a fastmf sparse
        optimizer (``name``: "adagrad" (default), "rowwise_adagrad", "sgd", "adam",
        "rowwise_adam") applied in backward, every other parameter under
        ``torch.optim.Adam(lr=self.dense_lr)``, the two joined in a
        :class:`fastmf.optim.CombinedOptimizer`."""
        from fastmf import optim
        from fastmf.nn import embedding as nn_embedding

        table_info = nn_embedding.table_info
        name = name or "adagrad"
        if name not in _SPARSE_OPTIMIZERS:
            raise ValueError(f"{self._op('make_optimizer')}: unknown optimizer {name!r}; use "
                             f"one of {_SPARSE_OPTIMIZERS} or pass an optimizer object")
        params = [p for p in self.parameters() if p.requires_grad]
        tables = [p for p in params if table_info(p) is not None]
        dense = [p for p in params if table_info(p) is None]
        parts = []
        if tables:
            # The newest optimizer takes the tables over: a second fit (or a resumed one)
            # must not fail because the previous run's optimizer is still referenced.
            for p in tables:
                previous = nn_embedding.fused_optimizer(p)
                if previous is not None:
                    nn_embedding._FUSED.pop(p)
                    previous._in_backward.discard(id(p))
            rowwise = name.startswith("rowwise_")
            if name.endswith("adagrad"):
                sparse = optim.SparseAdagrad(tables, lr=lr, rowwise=rowwise)
            elif name.endswith("adam"):
                sparse = optim.SparseAdam(tables, lr=lr, rowwise=rowwise)
            else:
                sparse = optim.SparseSGD(tables, lr=lr)
            parts.append(optim.apply_in_backward(sparse))
        if dense:
            parts.append(torch.optim.Adam(dense, lr=self.dense_lr))
        if not parts:
            raise ValueError(f"{self._op('make_optimizer')}: the model has no trainable "
                             "parameters")
        return optim.CombinedOptimizer(parts)

    def _epoch_order(self, train, generator: torch.Generator, *,
                     id_dtype: torch.dtype = torch.int64):
        """``(users, items, ratings, order)``: the interactions as tensors on the model's
        device, in their stored order, and the epoch's permutation (int32 when it fits),
        which :meth:`_shuffled` gathers them by and a multi-step op reads them through:
        the ``permutation`` op (:func:`fastmf.ops.reference.sampling.permutation`) at
        ``generator.initial_seed()``, the same on every backend and device. The ids are
        int64, or int32 when ``id_dtype`` asks for it and every id fits."""
        device = self._param_device()
        users, items, ratings = train.to_torch(device)
        n = len(train)
        # The same permutation in int32 as in int64 (tests/test_models_protocol.py holds
        # it to that); an int32 one is written and read in half the bytes. Drawn on the
        # host, a serial pass, for a model on any device. It replaced torch.randperm (a
        # 32-bit Mersenne Twister and a 64-bit modulo a swap): 0.22 against 0.34 ms for
        # ml-latest-small's 100,226 positives (2-core AMD EPYC), and an epoch's order that
        # no longer depends on torch's generator code.
        order = torch.empty(n, dtype=_index_dtype(n))
        ops.kernels("auto", "cpu", kernel="permutation").permutation(
            order, generator.initial_seed())
        order = order.to(device)
        if id_dtype == torch.int32 and max(train.num_users, train.num_items) <= _INT32_MAX:
            # The multi-step ops take int32 ids: gathering them in int32 halves the
            # bytes of the epoch's two random gathers. With the int32 permutation the
            # shuffle of ml-latest-small's 100,226 positives took 1.0 against 1.5 ms
            # between BPR epochs' op calls (2 threads, alternated; an epoch is 12-15 ms),
            # and 0.65 against 0.74 ms run back to back with warm caches.
            users, items = users.to(torch.int32), items.to(torch.int32)
        return users, items, ratings, order

    def _shuffled(self, train, loss: str, generator: torch.Generator, *,
                  id_dtype: torch.dtype = torch.int64):
        """The epoch's interactions in the order of one permutation drawn from
        ``generator``, as tensors on the model's device: ``(users, items, targets,
        weights, timestamps)``; targets (the ratings in the parameters' dtype) only for
        explicit losses, weights only when the data have them and the model
        :attr:`uses_weights`, timestamps only when it :attr:`uses_timestamps` (else None).
        The ids are int64, or int32 when ``id_dtype`` asks for it and every id fits. What
        :meth:`batches` slices, and what :meth:`train_epoch` hands a multi-step op."""
        device = self._param_device()
        users, items, ratings, order = self._epoch_order(train, generator, id_dtype=id_dtype)
        # index_select, not x[order] (CPU advanced indexing): an epoch's first batch of
        # 100,000 positives took 4.4-5.5 ms with it against 2.8-4.0 ms (1-2 threads).
        users, items = users.index_select(0, order), items.index_select(0, order)
        targets = None
        if loss not in IMPLICIT:
            targets = ratings.index_select(0, order).to(self._param_dtype())
        timestamps = None
        if train.timestamps is not None and self.uses_timestamps:
            stamps = train.timestamps
            if stamps.dtype.kind == "M":  # datetimes: seconds since the epoch
                stamps = stamps.astype("datetime64[s]").astype(np.int64)
            # np.array: a writable copy
            timestamps = torch.from_numpy(np.array(stamps)).to(device).index_select(0, order)
        weights = None
        if train.weights is not None and self.uses_weights:
            weights = array_to_tensor(train.weights, device).index_select(0, order)
        return users, items, targets, weights, timestamps

    def batches(self, train, *, batch_size: int, loss: str, num_negatives: int,
                sampler, generator: torch.Generator) -> Iterator[Batch]:
        """The batches of one epoch: the interactions shuffled by ``generator``, in slices
        of ``batch_size`` (with their ``weights`` when the data have them and the model
        :attr:`uses_weights`); for implicit losses each with ``num_negatives`` items per
        positive drawn by ``sampler`` (a :class:`fastmf.data.NegativeSampler`), seeded from
        ``generator``'s seed and the batch number."""
        device = self._param_device()
        users, items, targets, weights, timestamps = self._shuffled(train, loss, generator)
        n = len(train)
        implicit = loss in IMPLICIT
        base = generator.initial_seed()
        # Uniform negatives come from the counters of (epoch seed, batch number), as the
        # fused sampled BPR step draws them, so every model sees the same ones.
        uniform = implicit and sampler.distribution == "uniform"
        fused = uniform and self.draws_negatives(loss)
        csr = sampler.csr(device) if fused else None
        for b, lo in enumerate(range(0, n, batch_size)):
            u, i = users[lo:lo + batch_size], items[lo:lo + batch_size]
            negatives = draw = None
            if fused:
                draw = NegativeDraw(*csr, num_negatives, base, b)
            elif uniform:
                negatives = sampler.sample_step(u, num_negatives, seed=base, step=b)
            elif implicit:
                negatives = sampler.sample(u, num_negatives, seed=seed_of(base, b))
                negatives = torch.as_tensor(negatives, device=device)
            yield Batch(u, i, None if targets is None else targets[lo:lo + batch_size],
                        negatives, None if weights is None else weights[lo:lo + batch_size],
                        None if timestamps is None else timestamps[lo:lo + batch_size], draw)

    def draws_negatives(self, loss: str) -> bool:
        """Whether :meth:`training_step` draws uniform negatives itself for ``loss``: then
        :meth:`batches` hands it a :class:`NegativeDraw` instead of ``negatives``."""
        return False

    def train_epoch(self, train, optimizer, *, batch_size: int, loss: str,
                    num_negatives: int, sampler, generator: torch.Generator,
                    reg: float) -> tuple[Tensor, list[int], int] | None:
        """One epoch in fewer calls than one per batch, for a model that can: returns (the
        losses of the epoch's batches, (num_batches,); the batches' sizes; the number of
        scored pairs), training exactly as :meth:`batches` and :meth:`training_step` would
        with the same arguments. None (the default): :func:`fastmf.fit` runs the batches
        one by one."""
        return None

    def training_step(self, batch: Batch, optimizer, *, loss: str,
                      reg: float) -> tuple[Tensor, int]:
        """One update on ``batch`` through autograd: returns (the 0-d detached loss, the
        number of scored pairs).

        The data term is :func:`pointwise_loss` (mse/huber on the targets; bce with label 1
        for the positives and 0 for every negative) or :func:`pairwise_loss` (bpr, each
        positive against each of its negatives). The penalty is ``reg`` times the sum of
        squares of every embedding lookup output of the step (for ``Embedding`` tables: the
        rows the batch touched, once per use) divided by B.

        ``"warp"`` (for models that list it in ``losses``): the n negatives of each positive
        are WARP's candidates; they are scored once without a graph (and without the
        penalty) to pick each positive's violator (:func:`warp_choice`), then the positives
        that have one and their violators are scored again with the graph: the data term
        is ``sum(weight * (1 - s_i + s_j)) / B`` (:func:`warp_loss`) and the penalty covers
        those lookups only. Returns B as the count (one update per positive)."""
        users, items = batch.users, batch.items
        if loss == "warp":
            return self._warp_step(batch, optimizer, reg)
        outputs: list[Tensor] = []
        handles = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                   for module in self.modules() if _is_lookup(module)]
        try:
            if loss in EXPLICIT:
                if batch.targets is None:
                    raise ValueError(f"{self._op('training_step')}: loss {loss!r} needs "
                                     "batch.targets")
                data = pointwise_loss(self(users, items), batch.targets, loss, batch.weights)
                count = len(users)
            else:
                if batch.negatives is None:
                    raise ValueError(f"{self._op('training_step')}: loss {loss!r} needs "
                                     "batch.negatives")
                negatives = batch.negatives
                n = negatives.shape[1]
                repeated = users.repeat_interleave(n)
                if loss == "bpr":
                    positive = self(users, items)
                    negative = self(repeated, negatives.reshape(-1)).view(len(users), n)
                    data = pairwise_loss(positive, negative, loss, batch.weights)
                    count = len(users) * n
                elif loss == "bce":
                    scores = self(torch.cat([users, repeated]),
                                  torch.cat([items, negatives.reshape(-1)]))
                    labels = torch.cat([torch.ones(len(users)), torch.zeros(len(repeated))])
                    weights = None
                    if batch.weights is not None:
                        weights = torch.cat([batch.weights.to(scores.dtype),
                                             scores.new_ones(len(repeated))])
                    data = pointwise_loss(scores, labels.to(scores.device), loss, weights)
                    count = len(scores)
                else:
                    raise ValueError(f"{self._op('training_step')}: unknown loss {loss!r}")
        finally:
            for handle in handles:
                handle.remove()
        total = data
        if reg and outputs:
            penalty = sum(out.float().square().sum() for out in outputs)
            total = data + reg * penalty.to(data.dtype) / max(len(users), 1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return total.detach(), count

    def _warp_choice(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(violator item (B,), rank weight (B,)) of every positive of ``batch``, from
        scores computed without a graph."""
        if batch.negatives is None:
            raise ValueError(f"{self._op('training_step')}: loss 'warp' needs batch.negatives "
                             "(the candidates)")
        users, items, negatives = batch.users, batch.items, batch.negatives
        size, n = negatives.shape
        with torch.no_grad():
            positive = self(users, items)
            candidates = self(users.repeat_interleave(n), negatives.reshape(-1)).view(size, n)
        first, weight = warp_choice(positive, candidates, self.num_items)
        chosen = negatives.gather(1, first.unsqueeze(1)).squeeze(1) if n else items
        return chosen, weight

    def _warp_step(self, batch: Batch, optimizer, reg: float) -> tuple[Tensor, int]:
        """The default training step for ``loss="warp"`` (see :meth:`training_step`)."""
        size = len(batch.users)
        chosen, weight = self._warp_choice(batch)
        found = weight > 0
        users = batch.users[found]
        m = len(users)
        optimizer.zero_grad()
        if m == 0:  # no violator anywhere: nothing to update
            return torch.zeros((), dtype=self._param_dtype(), device=self._param_device()), size
        outputs: list[Tensor] = []
        handles = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                   for module in self.modules() if _is_lookup(module)]
        try:
            scores = self(torch.cat([users, users]), torch.cat([batch.items[found],
                                                                chosen[found]]))
        finally:
            for handle in handles:
                handle.remove()
        bw = None if batch.weights is None else batch.weights[found]
        total = warp_term(scores[:m], scores[m:], weight[found], bw) * (m / size)
        if reg and outputs:
            penalty = sum(out.float().square().sum() for out in outputs)
            total = total + reg * penalty.to(total.dtype) / size
        total.backward()
        optimizer.step()
        return total.detach(), size

    # -- scoring hooks ------------------------------------------------------------------------
    def user_vectors(self, users: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dot-product models: ``(vectors (B, D), offset (B,) or None)`` of ``users`` with
        ``forward(u, i) == <vectors[u], item_vectors[i]> + bias[i] + offset[u]``."""
        raise NotImplementedError(f"{self._op('user_vectors')}: not a dot-product model")

    def item_vectors(self) -> tuple[Tensor, Tensor | None]:
        """Dot-product models: ``(vectors (num_items, D), bias (num_items,) or None)``."""
        raise NotImplementedError(f"{self._op('item_vectors')}: not a dot-product model")

    def score_items(self, users: Tensor, items: Tensor) -> Tensor:
        """(B, M) scores of every user in ``users`` (B,) for every item in ``items`` (M,):
        ``forward`` on chunks of at most ~4M pairs. The ids are checked once
        (:meth:`as_ids` with the model's sizes)."""
        users = self.as_ids(users, "users", self.num_users, method="score_items")
        items = self.as_ids(items, "items", self.num_items, method="score_items")
        num_users, num_items = len(users), len(items)
        out = torch.empty((num_users, num_items), dtype=self._param_dtype(), device=users.device)
        rows = max(1, SCORE_CHUNK // max(num_items, 1))
        cols = min(num_items, SCORE_CHUNK)
        for lo in range(0, num_users, rows):
            u = users[lo:lo + rows]
            for start in range(0, num_items, cols):
                i = items[start:start + cols]
                scores = self(u.repeat_interleave(len(i)), i.repeat(len(u)))
                out[lo:lo + len(u), start:start + len(i)] = scores.view(len(u), len(i))
        return out

    def all_user_vectors(self) -> Tensor:
        """(num_users, D) vectors of every user (dot-product models)."""
        return self.user_vectors(torch.arange(self.num_users, device=self._param_device()))[0]

    def _vectors(self, side: str, method: str) -> Tensor:
        if not self.has_vectors:
            raise TypeError(f"{self._op(method)}: the model has no {side} vectors")
        table = self.item_vectors()[0] if side == "item" else self.all_user_vectors()
        return table.detach()

    # -- ids ----------------------------------------------------------------------------------
    def as_ids(self, ids, name: str, num_rows: int | None = None, *,
               method: str | None = None) -> Tensor:
        """``ids`` as a tensor: numpy arrays and lists of integers as int64 on the model's
        device, tensors as they are. With ``num_rows`` they are also checked as the ops
        check theirs (:func:`fastmf.ops.checks.check_ids`): a 1-D int32/int64 tensor
        (TypeError, ValueError) of ids in ``[0, num_rows)`` (IndexError; one min/max, a
        host sync on a GPU). Errors name ``method`` (e.g. ``"forward"``), ``name`` and the
        bad value: ``fastmf.models.ALS.forward: users id -1 out of range [0, 50)``."""
        op = self._op(method)
        if not isinstance(ids, Tensor):
            ids = torch.as_tensor(int64_ids(ids, f"{op}: {name}"), device=self._param_device())
        if num_rows is not None:
            checks.check_ids(op.removeprefix("fastmf."), name, ids, num_rows)
        return ids

    def pair_ids(self, users, items, method: str = "forward") -> tuple[Tensor, Tensor]:
        """``(users, items)`` of the pairs (users[b], items[b]) to score, as :meth:`as_ids`
        tensors checked as :class:`fastmf.MF`'s ``mf_forward`` checks them, in its order:
        int32/int64 and 1-D, then equal lengths (ValueError ``lengths differ``), then ids
        in ``[0, num_users)`` and ``[0, num_items)`` (IndexError). The check of the
        ``forward`` (and so ``predict``) of a model whose scoring does not check its ids
        itself; costs one min/max per argument."""
        users = self.as_ids(users, "users", method=method)
        items = self.as_ids(items, "items", method=method)
        op = self._op(method).removeprefix("fastmf.")
        checks.check_ids(op, "users", users, None)
        checks.check_ids(op, "items", items, None)
        checks.check_same_length(op, users=users, items=items)
        checks.check_ids(op, "users", users, self.num_users)
        checks.check_ids(op, "items", items, self.num_items)
        return users, items

    def _index_of(self, ids, side: str, raw_ids: bool) -> np.ndarray:
        """Indices (int64 numpy) of ``ids``; with ``raw_ids``, unknown raw ids become -1."""
        id_map = getattr(self, f"{side}_map")
        if raw_ids:
            if id_map is None:
                raise ValueError(f"{self._op()}: raw_ids=True but the model holds no {side} "
                                 "id map (train it with fastmf.fit or call attach_data)")
            return id_map.lookup(ids)
        array = int64_ids(ids.detach().cpu().numpy() if isinstance(ids, Tensor) else ids,
                          f"{self._op()}: {side}s").reshape(-1)
        limit = self.num_users if side == "user" else self.num_items
        bad = (array < 0) | (array >= limit)
        if bad.any():
            raise IndexError(f"{self._op()}: {side} index {int(array[bad][0])} out of range "
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
        warnings.warn(f"{self._op('recommend')}: {len(unknown)} unknown raw user id(s) "
                      f"{list(unknown[:5])} get the popular-items fallback{hint}",
                      stacklevel=3)

    def _to_raw(self, indices: Tensor, side: str = "item"):
        """Item (or with ``side="user"`` user) indices with -1 padding -> raw ids (numpy; an
        object array with None for padding where there is any)."""
        idx = indices.cpu().numpy()
        raw = getattr(self, f"{side}_map").raw_ids[np.where(idx >= 0, idx, 0)]
        if (idx < 0).any():
            raw = raw.astype(object)
            raw[idx < 0] = None
        return raw

    # -- data, checkpoints ----------------------------------------------------------------------
    def attach_data(self, data):
        """Keep ``data``'s (an :class:`fastmf.data.Interactions`) id maps, item titles and
        item popularity (:meth:`prepare`), so the model answers in raw ids and has a
        cold-start fallback."""
        self.check_data(data)
        self.prepare(data)
        return self

    def save(self, path, *, optimizer=None, extra: dict | None = None):
        """Save to the checkpoint folder ``path`` atomically (see :mod:`fastmf.checkpoint`)."""
        return checkpoint.save(self, path, optimizer=optimizer, extra=extra)

    # -- serving --------------------------------------------------------------------------------
    @inference
    def predict(self, users, items, *, raw_ids: bool = False):
        """Predictions for the pairs (users[b], items[b]) without an autograd graph: a (B,)
        tensor, or with ``raw_ids=True`` (raw user and item ids) a float64 numpy array.
        Unknown raw ids raise KeyError."""
        if not raw_ids:
            return self.forward(users, items)
        u = self._index_of(users, "user", True)
        i = self._index_of(items, "item", True)
        for side, index, ids in (("user", u, users), ("item", i, items)):
            if (index < 0).any():
                values = np.asarray(ids, dtype=object).reshape(-1)[index < 0]
                raise KeyError(f"{self._op('predict')}: unknown raw {side} id(s): "
                               f"{values[:5].tolist()}")
        checks.check_same_length(self._op("predict").removeprefix("fastmf."), users=u, items=i)
        device = self._param_device()
        out = self.forward(torch.as_tensor(u, device=device), torch.as_tensor(i, device=device))
        return out.double().cpu().numpy()

    def _exclusion_rows(self, exclude, users: np.ndarray, raw_ids: bool = False):
        """Per-query CSR rows of ``exclude`` (one per entry of ``users``, None without
        ``exclude``): Interactions or a (num_users, num_items) sparse matrix indexed by user
        (an unknown user, index -1, gets an empty row: it has none there); for a single
        query user, known or not, also its own (1, num_items) sparse row or a 1-D list,
        array or tensor of item ids (raw with ``raw_ids``; unknown raw items are skipped).
        Dense 2-D arrays are refused (ValueError): a 0/1 matrix would otherwise be read as
        the item ids 0 and 1."""
        import scipy.sparse as sp

        from fastmf.data import Interactions

        op = self._op("recommend")
        if exclude is None:
            return None
        by_user = isinstance(exclude, Interactions)
        if by_user:
            # In the model's index space (data read with id maps of its own re-indexed by
            # raw ids, as evaluate does), and at the model's size: data from before
            # add_users/add_items covers a prefix of its rows.
            exclude = exclude.in_maps_of(self.user_map, self.item_map, op, "exclude")
            if exclude.num_users <= self.num_users and exclude.num_items <= self.num_items:
                exclude = exclude.to_csr(binary=True, shape=(self.num_users, self.num_items))
            else:
                exclude = exclude.to_csr(binary=True)  # refused below, by its shape
        if sp.issparse(exclude):
            if exclude.ndim == 1:
                exclude = sp.csr_matrix(exclude.reshape(1, -1))
            if (not by_user and exclude.shape == (1, self.num_items)
                    and len(users) == 1):
                return sp.csr_matrix(exclude)
            if exclude.shape == (self.num_users, self.num_items):
                return _rows_of(sp.csr_matrix(exclude), users)
            single = " or (1, num_items) for one user" if len(users) == 1 else ""
            raise ValueError(f"{op}: exclude has shape {exclude.shape}, expected (num_users, "
                             f"num_items) = {(self.num_users, self.num_items)}{single}")
        kind = type(exclude).__name__
        if isinstance(exclude, Tensor):
            exclude = exclude.detach().cpu().numpy()
        if isinstance(exclude, list | tuple | np.ndarray | range):
            values = np.asarray(exclude)
            if values.ndim != 1:
                raise ValueError(f"{op}: exclude must be a 1-D list of item ids for one user "
                                 "or a sparse matrix (scipy.sparse / Interactions) with one "
                                 f"row per user; got a {values.shape} {kind}")
            if len(users) != 1:
                raise ValueError(f"{op}: exclude as a list of item ids is for one user; got "
                                 f"{len(users)} users (pass a sparse matrix or "
                                 "Interactions for several)")
            if raw_ids:
                index = self.item_map.lookup(values)
                index = index[index >= 0]
            else:
                index = self._index_of(values, "item", False)
            index = np.unique(index)
            return sp.csr_matrix((np.ones(len(index), dtype=np.float32),
                                  index.astype(np.int64), np.array([0, len(index)])),
                                 shape=(1, self.num_items))
        raise TypeError(f"{op}: exclude must be Interactions, a scipy sparse matrix or (for "
                        f"one user) a list of item ids, got {kind}")

    @inference
    def recommend(self, users, k: int = 10, *, exclude=None, items=None,
                  batch_size: int | None = None, raw_ids: bool = False,
                  as_frame: bool = False):
        """Exact top-``k`` items for each user: ``(items (B, k), scores (B, k))``.

        Returns the true predicted scores (dot-product models rank by ``b_i + <u, v_i>``,
        which orders a user's items as the full score does). Equal scores go to the lower
        item index. Where fewer than ``k`` items remain (``k`` above the candidates,
        everything excluded) rows are padded with index ``-1`` and score ``-inf``.

        - ``exclude``: items to leave out per user, usually their training items: an
          :class:`~fastmf.data.Interactions` or a (num_users, num_items) sparse matrix; for
          a single user also that user's (1, num_items) sparse row or a 1-D list (array,
          tensor) of item ids (raw ids with ``raw_ids``). Dense 2-D arrays are refused
          (ValueError): convert a 0/1 matrix with ``scipy.sparse.csr_matrix`` first.
        - ``items``: rank only these candidate items.
        - ``batch_size``: users scored per call (a positive int; default: the backend's
          choice).
        - ``raw_ids``: users and ``items`` are raw ids and raw item ids come back (numpy;
          ``None`` marks padding; half-precision scores as float32). A raw user id the
          model has never seen gets the cold-start fallback: the most popular training
          items (``item_popularity``), scored ``mu + b_i`` (dot-product models; NaN for
          others), without the items ``exclude`` holds for that user (its list or
          (1, num_items) row when it is the only user; a matrix indexed by user has no row
          for it); unknown candidate items are never returned.
        - ``as_frame``: a pandas DataFrame instead, one row per recommendation (padding
          left out): ``user``, ``rank`` (1 = best), ``item``, ``score`` and ``title`` when
          the model knows titles; raw ids where the model holds id maps.

        >>> items, scores = model.recommend([0, 1], k=10, exclude=train)  # doctest: +SKIP
        """
        op = self._op("recommend")
        k = checks.check_k(op.removeprefix("fastmf."), k)
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
                raise TypeError(f"{op}: batch_size must be a positive int or None, got "
                                f"{batch_size!r}")
            batch_size = checks.check_int(op.removeprefix("fastmf."), "batch_size",
                                          batch_size, 1)
        index = self._index_of(users, "user", raw_ids)
        known = index >= 0
        if raw_ids and not known.all():
            self._warn_unknown(users, known)
        device = self._param_device()
        candidates = None
        if items is not None:
            candidates = self._index_of(items, "item", raw_ids)
            candidates = torch.as_tensor(candidates[candidates >= 0], device=device)
        batch = len(index)
        dtype = self._param_dtype()
        out_items = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        out_scores = torch.full((batch, k), float("-inf"), dtype=dtype, device=device)
        vectors = self.has_vectors
        bias = None
        if vectors:
            item_vecs, bias = self.item_vectors()
            item_vecs = item_vecs.detach()
            bias = bias.detach() if bias is not None else None
        # Every query's row, unknown users' included (their fallback honours it too).
        exclusion = self._exclusion_rows(exclude, index, raw_ids)
        if known.any():
            rows = index[known]
            known_exclusion = exclusion
            if exclusion is not None and not known.all():
                known_exclusion = exclusion[np.flatnonzero(known)]
            if vectors:
                user_vecs, offset = self.user_vectors(torch.as_tensor(rows, device=device))
                scores, top = self._topk(user_vecs.detach(), item_vecs, bias, k,
                                         known_exclusion, candidates, batch_size)
                if offset is not None:
                    scores = torch.where(top >= 0, scores + offset.unsqueeze(1), scores)
            else:
                scores, top = self._rank_scored(rows, k, known_exclusion, candidates,
                                                batch_size)
            mask = torch.as_tensor(known, device=device)
            out_items[mask], out_scores[mask] = top, scores.to(dtype)
        if not known.all():
            unknown = np.flatnonzero(~known)
            top = self._most_popular(k, candidates, None if exclusion is None
                                     else exclusion[unknown], len(unknown))
            scores = torch.full(top.shape, float("-inf"), dtype=dtype, device=device)
            found = top >= 0
            scores[found] = self._cold_scores(top[found], bias).to(dtype)
            mask = torch.as_tensor(~known, device=device)
            out_items[mask], out_scores[mask] = top, scores
        if as_frame:
            return self._frame(users, index, out_items, out_scores, raw_ids)
        if raw_ids:
            if out_scores.dtype in checks.HALF_DTYPES:  # numpy has no bfloat16
                out_scores = out_scores.float()
            return self._to_raw(out_items), out_scores.cpu().numpy()
        return out_items, out_scores

    def _topk(self, queries, item_vecs, bias, k, exclusion, candidates, batch_size):
        from fastmf import retrieval

        return retrieval.topk_scores(queries, item_vecs, bias, k, exclude=exclusion,
                                     candidates=candidates,
                                     backend=getattr(self, "backend", "auto"),
                                     batch_size=batch_size)

    def _cold_scores(self, items: Tensor, bias: Tensor | None) -> Tensor:
        """Scores of the popular-items fallback: ``mu + b_i`` for dot-product models (mu:
        the model's ``mu`` if it has one), NaN for models without item vectors."""
        if not self.has_vectors:
            return torch.full(items.shape, float("nan"), dtype=self._param_dtype(),
                              device=items.device)
        mu = float(getattr(self, "mu", 0.0))
        if bias is None:
            return torch.full(items.shape, mu, dtype=self._param_dtype(), device=items.device)
        return mu + bias[items]

    def _rank_scored(self, rows: np.ndarray, k: int, exclusion, candidates, batch_size):
        """Top-k of models without item vectors: ``score_items`` on chunks of users, with
        the rules of the fused top-k (exclusions never returned, NaN ranked as -inf, equal
        scores to the lower item index, -1/-inf padding)."""
        device = self._param_device()
        if candidates is None:
            columns = torch.arange(self.num_items, device=device)
        else:
            columns = torch.unique(candidates.long())  # sorted: ties go to the lower index
        num_columns = len(columns)
        chunk = batch_size or max(1, SCORE_CHUNK // max(self.num_items, 1))
        keep = min(k, num_columns)
        dtype = self._param_dtype()
        out_scores = torch.full((len(rows), k), float("-inf"), dtype=dtype, device=device)
        out_items = torch.full((len(rows), k), -1, dtype=torch.int64, device=device)
        if keep == 0:
            return out_scores, out_items
        indptr = indices = None
        if exclusion is not None:
            csr = exclusion.tocsr()
            indptr = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
            indices = torch.as_tensor(csr.indices.astype(np.int64), device=device)
        for lo in range(0, len(rows), chunk):
            hi = min(len(rows), lo + chunk)
            users = torch.as_tensor(rows[lo:hi], device=device)
            scores = self.score_items(users, columns).to(dtype)
            scores = torch.nan_to_num(scores, nan=float("-inf"))
            hidden = torch.zeros((hi - lo, self.num_items), dtype=torch.bool, device=device)
            if indptr is not None:
                start, stop = int(indptr[lo]), int(indptr[hi])
                lengths = indptr[lo + 1:hi + 1] - indptr[lo:hi]
                which = torch.repeat_interleave(torch.arange(hi - lo, device=device), lengths)
                hidden[which, indices[start:stop]] = True
            hidden = hidden[:, columns]
            # Best first with ties in column order, then the excluded items moved behind
            # every other one (a stable sort keeps both orders).
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            pushed = torch.sort(hidden.gather(1, order).to(torch.uint8), dim=1,
                                stable=True).indices
            order = order.gather(1, pushed)[:, :keep]
            pad = hidden.gather(1, order)
            out_items[lo:hi, :keep] = torch.where(pad, -1, columns[order])
            out_scores[lo:hi, :keep] = torch.where(pad, float("-inf"), scores.gather(1, order))
        return out_scores, out_items

    def _most_popular(self, k: int, candidates: Tensor | None, exclusion=None,
                      count: int = 1) -> Tensor:
        """(count, k) the most-interacted training items (among ``candidates``, without
        the items of ``exclusion``'s row for each, a CSR with ``count`` rows or None): the
        cold-start ranking, padded with -1. Without popularity counts every item ties, so
        the lowest indices win."""
        from fastmf import retrieval

        device = self._param_device()
        counts = np.zeros(self.num_items) if self.item_popularity is None else (
            self.item_popularity)
        counts = torch.as_tensor(counts, dtype=torch.float64, device=device)
        _, top = retrieval.topk_scores(counts.new_zeros((count, 0)),
                                       counts.new_zeros((len(counts), 0)), counts, k,
                                       exclude=exclusion, candidates=candidates,
                                       backend=getattr(self, "backend", "auto"))
        return top

    def _frame(self, users, index: np.ndarray, items: Tensor, scores: Tensor, raw_ids: bool):
        """recommend's ``as_frame`` DataFrame: one row per (user, rank) with an item."""
        import pandas as pd

        top = items.cpu().numpy()
        values = scores.double().cpu().numpy()
        batch, k = top.shape
        keep = (top >= 0).reshape(-1)
        if raw_ids:
            user_values = np.asarray(users.cpu() if isinstance(users, Tensor) else users,
                                     dtype=object).reshape(-1)
        elif self.user_map is not None:
            user_values = self.user_map.raw_ids[index]
        else:
            user_values = index
        flat_items = top.reshape(-1)[keep]
        item_values = (self.item_map.raw_ids[flat_items] if self.item_map is not None
                       else flat_items)
        frame = pd.DataFrame({
            "user": np.repeat(user_values, k)[keep],
            "rank": np.tile(np.arange(1, k + 1), batch)[keep],
            "item": item_values,
            "score": values.reshape(-1)[keep],
        })
        if self.item_titles:
            frame["title"] = [self.item_titles.get(int(i)) for i in flat_items]
        return frame

    @inference
    def _similar(self, side: str, ids, k: int, metric: str, raw_ids: bool, method: str):
        from fastmf import retrieval

        table = self._vectors(side, method)
        index = self._index_of(ids, side, raw_ids)
        if raw_ids and (index < 0).any():
            raise KeyError(f"{self._op()}: unknown raw {side} id(s): "
                           f"{list(np.asarray(ids)[index < 0][:5])}")
        scores, top = retrieval.similar(table, torch.as_tensor(index), k, metric,
                                        backend=getattr(self, "backend", "auto"))
        if raw_ids:  # None marks padding (k >= the number of rows), as in recommend
            return self._to_raw(top, side), scores.cpu().numpy()
        return top, scores

    def similar_items(self, items, k: int = 10, metric: str = "cosine", *,
                      raw_ids: bool = False):
        """The ``k`` items most similar to each query item by their vectors (``"cosine"``
        or ``"dot"``), the query itself left out: ``(items (B, k), scores (B, k))``.
        Where fewer than ``k`` remain rows are padded with ``-1`` and ``-inf`` (with
        ``raw_ids``: numpy raw ids, ``None`` for padding, as in :meth:`recommend`).
        TypeError for models without item vectors."""
        return self._similar("item", items, k, metric, raw_ids, "similar_items")

    def similar_users(self, users, k: int = 10, metric: str = "cosine", *,
                      raw_ids: bool = False):
        """The ``k`` users most similar to each query user (see :meth:`similar_items`)."""
        return self._similar("user", users, k, metric, raw_ids, "similar_users")

    # -- cold start ---------------------------------------------------------------------------
    def fold_in(self, items, **kwargs) -> tuple[Tensor, float]:
        """The ``(vector (D,), offset)`` of a user the model has not seen, from the items
        they interacted with: :func:`fastmf.models.coldstart.fold_in` (same arguments).
        TypeError for models without item vectors."""
        from fastmf.models import coldstart

        self._need_vectors("fold_in")
        return coldstart.fold_in(self, items, **kwargs)

    def recommend_new_user(self, items, k: int = 10, **kwargs):
        """Top-``k`` ``(items (k,), scores (k,))`` for a user the model has not seen:
        :func:`fastmf.models.coldstart.recommend_new_user` (same arguments; the prior's or
        the popular items and a warning when no item is known). TypeError for models
        without item vectors."""
        from fastmf.models import coldstart

        self._need_vectors("recommend_new_user")
        return coldstart.recommend_new_user(self, items, k, **kwargs)

    def _need_vectors(self, method: str) -> None:
        if not self.has_vectors:
            raise TypeError(f"{self._op(method)}: the model has no item vectors (fold-in "
                            "needs a dot-product model)")

    @inference
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
        (``None`` for raw ids) and ``-inf``, as in :meth:`recommend`. TypeError for models
        without item vectors.

        >>> items, scores = model.analogy([shrek], ["Animation"], vectors={  # doctest: +SKIP
        ...     "Animation": model.item_factors[animated].mean(0)}, raw_ids=True)
        """
        return _analogy(self, positive, negative, k, metric=metric, side=side,
                        raw_ids=raw_ids, exclude=exclude, vectors=vectors)


def _rows_of(matrix, users: np.ndarray):
    """CSR rows ``users`` of ``matrix``, an empty row where ``users`` is -1 (an unknown
    raw user has no row in the model's index space)."""
    known = users >= 0
    rows = matrix[np.where(known, users, 0)]
    if known.all():
        return rows
    import scipy.sparse as sp

    lengths = np.diff(rows.indptr)
    keep = np.repeat(known, lengths)
    indptr = np.concatenate([[0], np.cumsum(np.where(known, lengths, 0))])
    return sp.csr_matrix((rows.data[keep], rows.indices[keep], indptr), shape=rows.shape)


def _is_lookup(module: nn.Module) -> bool:
    """Embedding tables (torch.nn's, and every fastmf table: ``fastmf.nn``'s and their
    sharded forms, which declare ``is_embedding_table``): their outputs are the rows the
    default training step penalises."""
    return (isinstance(module, nn.Embedding | nn.EmbeddingBag)
            or getattr(module, "is_embedding_table", False))


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


def _analogy(model: Recommender, positive, negative, k, *, metric, side, raw_ids, exclude,
             vectors):
    """:meth:`Recommender.analogy`."""
    from fastmf import retrieval

    op = model._op("analogy")
    if metric not in retrieval.topk.METRICS:
        raise ValueError(f"{op}: unknown metric {metric!r}; expected one of "
                         f"{retrieval.topk.METRICS}")
    if side not in ("item", "user"):
        raise ValueError(f"{op}: side must be 'item' or 'user', got {side!r}")
    k = checks.check_k(op.removeprefix("fastmf."), k)
    table = model._vectors(side, "analogy")
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
        backend=getattr(model, "backend", "auto"))
    top, scores = top[0], scores[0]
    if not raw_ids:
        return top, scores
    return model._to_raw(top, side), scores.cpu().numpy()
