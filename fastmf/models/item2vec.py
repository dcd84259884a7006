"""``fastmf.models.Item2Vec``: skip-gram with negative sampling over item sequences
(Barkan & Koenigstein 2016, "Item2Vec: Neural Item Embedding for Collaborative Filtering",
on word2vec's SGNS, Mikolov et al. 2013).

Each user's items in time order (or explicit sequences) are the "sentences". Every epoch:

1. Items seen fewer than ``min_count`` times are removed from the sequences (word2vec's
   vocabulary cut). Frequent-item subsampling: item ``i`` with corpus frequency
   ``f_i = count_i / total`` is kept with probability ``min(1, sqrt(t / f_i))`` (the
   paper's discard probability ``1 - sqrt(t / f_i)``, ``t = subsample``; the word2vec C
   code's variant ``sqrt(t/f) + t/f`` is not used). One uniform draw per position, in
   sequence order; discarded positions are removed before the window is applied, as
   word2vec does.
2. Pairs: every (center, context) of kept positions at distance ``1..window`` in the same
   sequence, both directions (a fixed window, not word2vec's randomly shrunk one).
3. Negatives: ``num_negatives`` per pair from the unigram distribution raised to ``power``
   (0.75), counted over the training corpus after the ``min_count`` cut and before
   subsampling; drawn with replacement and not filtered (one may equal the context item).
4. Loss per pair: ``-log σ(<v_c, u_o>) - Σ_n log σ(-<v_c, u_n>)`` averaged over the batch,
   ``v`` the input (item) table and ``u`` the output (context) table, both
   ``fastmf.nn.Embedding`` updated by the fused sparse optimizer inside the backward pass
   (:func:`fastmf.optim.apply_in_backward`).

Everything random in an epoch comes from the generator ``batches`` is given, so training is
deterministic given ``fastmf.fit``'s seed (and the global torch seed for the initial
weights).

Serving: the item vectors are the input table. ``similar_items`` ranks by cosine on them,
``analogy`` does latent arithmetic on them; a user is the mean input vector of the items in
their training history (stored as CSR buffers ``history_indptr``/``history_items``, their
sizes in ``get_config``), so ``recommend``/``evaluate`` score ``<mean_h v_h, v_i>``. A user
without history gets the zero vector (every item scores 0; ties go to the lower index).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastmf import checkpoint
from fastmf import nn as fnn
from fastmf.models._state import check_csr_state
from fastmf.models.base import Batch, Recommender
from fastmf.ops.checks import table_dtype

__all__ = ["Item2Vec", "keep_probability", "sequences_to_interactions", "skipgram_pairs",
           "unigram_distribution"]

OP = "fastmf.models.Item2Vec"


# -- the corpus --------------------------------------------------------------------------------

def keep_probability(counts: np.ndarray, threshold: float | None) -> np.ndarray | None:
    """Per-item probability of keeping an occurrence: ``min(1, sqrt(t / f))`` with ``f`` the
    item's share of all occurrences; None (keep everything) when ``threshold`` is None or
    0. Items that never occur get 1."""
    if not threshold:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    freq = counts / max(counts.sum(), 1.0)
    with np.errstate(divide="ignore"):
        keep = np.sqrt(threshold / freq)
    return np.minimum(keep, 1.0)


def unigram_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """The negative-sampling distribution ``count^power / sum`` (float64)."""
    weights = np.asarray(counts, dtype=np.float64) ** power
    weights[np.asarray(counts) == 0] = 0.0  # 0 ** 0 would give unseen items mass
    return weights / weights.sum()


def skipgram_pairs(tokens: np.ndarray, offsets: np.ndarray, window: int,
                   keep: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centers, contexts) of the sequences ``tokens[offsets[s]:offsets[s+1]]``.

    With ``keep`` (per-item keep probabilities), position ``j`` survives when
    ``rng.random(len(tokens))[j] < keep[tokens[j]]`` (one draw per position, in order) and
    the window runs over the survivors. Pairs come grouped by distance ``d = 1..window``:
    for each ``d`` first (earlier, later) then (later, earlier), in sequence order."""
    tokens = np.asarray(tokens, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    if keep is not None:
        kept = rng.random(len(tokens)) < keep[tokens]
        tokens, seq = tokens[kept], seq[kept]
    centers, contexts = [], []
    for d in range(1, window + 1):
        if d >= len(tokens):
            break
        same = seq[:-d] == seq[d:]
        early, late = tokens[:-d][same], tokens[d:][same]
        centers += [early, late]
        contexts += [late, early]
    if not centers:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(centers), np.concatenate(contexts)


def drop_rare(tokens: np.ndarray, offsets: np.ndarray, num_items: int,
              min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, offsets, counts) without the occurrences of items seen fewer than
    ``min_count`` times (word2vec's vocabulary cut: they are removed from the sequences
    before the window, and get no pairs and no negatives)."""
    counts = np.bincount(tokens, minlength=num_items)
    if min_count <= 1:
        return tokens, offsets, counts
    kept = counts[tokens] >= min_count
    sequence = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    sizes = np.bincount(sequence[kept], minlength=len(offsets) - 1)
    new_offsets = np.zeros_like(offsets)
    new_offsets[1:] = np.cumsum(sizes)
    counts = np.where(counts >= min_count, counts, 0)
    return tokens[kept], new_offsets, counts


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{OP}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _as_sequences(sequences, num_items: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A list of item-index arrays as CSR (tokens, offsets), checked."""
    if isinstance(sequences, np.ndarray | Tensor) or not isinstance(sequences, Sequence):
        raise TypeError(f"{OP}.{where}: sequences must be a list of item-index arrays or "
                        f"fastmf.data.Interactions, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{OP}.{where}: sequences is empty")
    parts = []
    for s, seq in enumerate(sequences):
        array = np.asarray(seq.detach().cpu() if isinstance(seq, Tensor) else seq)
        if array.size == 0:
            raise ValueError(f"{OP}.{where}: sequences[{s}] is empty")
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(f"{OP}.{where}: sequences[{s}] must be a 1-D array of integer "
                            f"item indices, got shape {array.shape} dtype {array.dtype}")
        bad = (array < 0) | (array >= num_items)
        if bad.any():
            raise IndexError(f"{OP}.{where}: sequences[{s}] holds item {int(array[bad][0])}, "
                             f"out of range [0, {num_items})")
        parts.append(array.astype(np.int64))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    return np.concatenate(parts), offsets


def sequences_of(data, num_items: int, where: str = "prepare") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets): one sequence per user of an Interactions (by timestamp when it has
    them, else in row order; users without rows give empty sequences), or the given list of
    item-index arrays."""
    from fastmf.data import Interactions

    if not isinstance(data, Interactions):
        return _as_sequences(data, num_items, where)
    if data.num_items != num_items:
        raise ValueError(f"{OP}.{where}: the data has {data.num_items} items, the model "
                         f"{num_items}")
    if data.timestamps is not None:
        order = np.lexsort((data.timestamps, data.users))  # stable: ties keep row order
    else:
        order = np.argsort(data.users, kind="stable")
    offsets = np.zeros(data.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(data.users, minlength=data.num_users))
    return data.items[order], offsets


def sequences_to_interactions(sequences, num_items: int):
    """Explicit sequences as :class:`fastmf.data.Interactions`: user ``s`` is
    ``sequences[s]``, its positions the timestamps, so ``fastmf.fit`` trains an Item2Vec on
    them (and ``prepare`` rebuilds the same sequences).

    >>> data = sequences_to_interactions([[3, 1, 3], [2, 0]], num_items=5)
    >>> data.num_users, data.num_items, data.items.tolist()
    (2, 5, [3, 1, 3, 2, 0])
    """
    from fastmf.data import Interactions

    num_items = _check_positive_int("num_items", num_items)
    tokens, offsets = _as_sequences(sequences, num_items, "sequences_to_interactions")
    sizes = np.diff(offsets)
    users = np.repeat(np.arange(len(sizes)), sizes)
    positions = np.arange(len(tokens)) - np.repeat(offsets[:-1], sizes)
    return Interactions(users, tokens, timestamps=positions, user_map=len(sizes),
                        item_map=num_items)


def _epoch_rng(generator) -> np.random.Generator:
    """A numpy generator drawn from ``generator`` (a torch.Generator, an int seed or a numpy
    Generator), so an epoch's draws depend on it alone."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    elif generator is None:
        seed = int(torch.randint(0, 2**62, ()))
    else:
        seed = int(generator)
    return np.random.default_rng(seed)


# -- the model ---------------------------------------------------------------------------------

@checkpoint.register_model
class Item2Vec(Recommender):
    """Skip-gram with negative sampling over item sequences (see the module docstring).

    Args:
        num_items: catalog size.
        dim: vector size.
        window: context positions on each side of a center (>= 1).
        subsample: the frequent-item threshold ``t`` (None or 0: keep every occurrence).
            word2vec's 1e-5 suits corpora of billions of words; on ml-latest-small (100k
            ratings) it keeps too little (next-item HR@10 0.021 against 0.047 at 1e-3).
        min_count: items seen fewer times in the training data are left out of training
            (word2vec's vocabulary cut; their vectors keep their initial values).
        power: exponent of the unigram counts for negatives (0.75 as word2vec).
        num_users, num_history: sizes of the history buffers (set from the data by
            ``prepare``; given only to rebuild a trained model from its config).
        init_scale: the input table starts uniform(-init_scale, init_scale) (default
            ``0.5 / dim``, word2vec's); the output table starts at zero, as word2vec's.

    >>> import fastmf
    >>> from fastmf.models.item2vec import Item2Vec, sequences_to_interactions
    >>> data = sequences_to_interactions([[1, 2, 3, 2], [5, 6]], num_items=100)
    >>> model = Item2Vec.from_interactions(data, dim=16, window=2, min_count=1)
    >>> history = fastmf.fit(model, data, epochs=2, progress=False)
    >>> items, scores = model.similar_items([2], k=3)
    """

    losses: ClassVar[tuple[str, ...]] = ("bce",)
    default_loss: ClassVar[str] = "bce"
    # It trains on (item, context item) pairs of the sequences, not on the rows: fit refuses
    # weighted data rather than drop the weights.
    uses_weights: ClassVar[bool] = False
    # Chosen by benchmarks/item2vec.py --tune: next-item HR@10 (latest movie held out per
    # user) on two differently shaped subsets of ml-latest-small (movies with >= 20 ratings;
    # users with at most the median rating count), one knob at a time; the reported genre
    # agreement of neighbours was not looked at. Constructor defaults (dim 64, window 2,
    # subsample 1e-3, min_count 5) come from the same search, and so do the negatives per
    # pair fastmf.fit draws by default: 5 (mean HR@10 0.049 against 0.044 for 4). No weight
    # decay, as word2vec.
    defaults: ClassVar[dict] = {
        "implicit": dict(lr=0.05, reg=0.0, epochs=6, batch_size=4096, num_negatives=5),
    }
    test_config: ClassVar[dict] = {"dim": 4, "window": 2, "subsample": None, "min_count": 1}

    def __init__(self, num_items: int, dim: int = 64, window: int = 2, *,
                 subsample: float | None = 1e-3, min_count: int = 5, power: float = 0.75,
                 num_users: int = 0,
                 num_history: int = 0, init_scale: float | None = None,
                 backend: str = "auto", device=None, dtype: torch.dtype | str = torch.float32):
        super().__init__()
        num_items = _check_positive_int("num_items", num_items)
        dim = _check_positive_int("dim", dim)
        self.window = _check_positive_int("window", window)
        num_users = _check_positive_int("num_users", num_users, 0)
        self.min_count = _check_positive_int("min_count", min_count)
        num_history = _check_positive_int("num_history", num_history, 0)
        if subsample is not None and (isinstance(subsample, bool) or not isinstance(
                subsample, int | float) or not 0 <= subsample < float("inf")):
            raise ValueError(f"{OP}: subsample must be None or a finite number >= 0, got "
                             f"{subsample!r}")
        if isinstance(power, bool) or not isinstance(power, int | float) or not (
                0 <= power < float("inf")):
            raise ValueError(f"{OP}: power must be a finite number >= 0, got {power!r}")
        dtype = table_dtype(OP, dtype)
        self.subsample = None if subsample is None else float(subsample)
        self.power = float(power)
        self.init_scale = 0.5 / dim if init_scale is None else float(init_scale)
        self.backend = backend
        table = dict(backend=backend, dtype=dtype, device=device)
        self.item_embeddings = fnn.Embedding(num_items, dim, init_scale=self.init_scale,
                                             **table)
        self.context_embeddings = fnn.Embedding(num_items, dim, init_scale=self.init_scale,
                                                **table)
        with torch.no_grad():
            self.context_embeddings.weight.zero_()
        self.register_buffer("history_indptr", torch.zeros(num_users + 1, dtype=torch.int64,
                                                           device=device))
        self.register_buffer("history_items", torch.zeros(num_history, dtype=torch.int64,
                                                          device=device))

    # -- configuration -----------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return self.item_embeddings.num_embeddings

    @property
    def num_users(self) -> int:
        return self.history_indptr.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.item_embeddings.dim

    def get_config(self) -> dict:
        return {"num_items": self.num_items, "dim": self.dim, "window": self.window,
                "subsample": self.subsample, "min_count": self.min_count, "power": self.power,
                "num_users": self.num_users, "num_history": int(self.history_items.shape[0]),
                "init_scale": self.init_scale,
                "dtype": str(self.item_embeddings.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_interactions(cls, train, **kwargs) -> Item2Vec:
        """A model for ``train``'s items; ``prepare`` sizes the histories from its users."""
        return cls(train.num_items, **kwargs)

    # -- training hooks ----------------------------------------------------------------------
    def check_data(self, train) -> None:
        """Only the item count must match: the user count and histories come from the
        data."""
        if train.num_items != self.num_items:
            raise ValueError(f"{OP}: the data has {train.num_items} items, the model "
                             f"{self.num_items}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The user vectors are gathered from these rows without further checks.
        check_csr_state(OP, "history", self.history_indptr, self.history_items,
                        self.num_items)

    def prepare(self, train) -> None:
        """Build the per-user histories (the training sequences) from ``train``
        (Interactions or a list of item-index arrays, one per user)."""
        from fastmf.data import Interactions

        tokens, offsets = sequences_of(train, self.num_items, "prepare")
        if len(tokens) == 0:
            raise ValueError(f"{OP}.prepare: the data holds no items")
        device = self.history_indptr.device
        self.history_indptr = torch.as_tensor(offsets, device=device)
        self.history_items = torch.as_tensor(tokens, device=device)
        if isinstance(train, Interactions):
            super().prepare(train)  # id maps, titles, popularity
        else:
            self.user_map = self.item_map = self.item_titles = None
            self.item_popularity = np.bincount(tokens, minlength=self.num_items)

    def batches(self, train, *, batch_size: int, loss: str = "bce", num_negatives: int = 5,
                sampler=None, generator=None) -> Iterator[Batch]:
        """One epoch of shuffled skip-gram pairs: ``Batch.users`` the centers,
        ``Batch.items`` the contexts, ``Batch.negatives`` (B, num_negatives) from the
        unigram^power distribution (``sampler`` is not used). ``train``: Interactions or a
        list of item-index arrays."""
        batch_size = _check_positive_int("batch_size", batch_size)
        num_negatives = _check_positive_int("num_negatives", num_negatives)
        tokens, offsets = sequences_of(train, self.num_items, "batches")
        tokens, offsets, counts = drop_rare(tokens, offsets, self.num_items, self.min_count)
        if counts.sum() == 0:
            raise ValueError(f"{OP}.batches: no item occurs min_count={self.min_count} "
                             "times")
        rng = _epoch_rng(generator)
        centers, contexts = skipgram_pairs(tokens, offsets, self.window,
                                           keep_probability(counts, self.subsample), rng)
        order = rng.permutation(len(centers))
        centers, contexts = centers[order], contexts[order]
        cdf = np.cumsum(unigram_distribution(counts, self.power))
        device = self.history_indptr.device
        for lo in range(0, len(centers), batch_size):
            c = centers[lo:lo + batch_size]
            draws = rng.random((len(c), num_negatives)) * cdf[-1]
            negatives = np.minimum(np.searchsorted(cdf, draws, side="right"),
                                   self.num_items - 1)
            yield Batch(torch.as_tensor(c, device=device),
                        torch.as_tensor(contexts[lo:lo + batch_size], device=device),
                        negatives=torch.as_tensor(negatives, device=device))

    def training_step(self, batch: Batch, optimizer, *, loss: str = "bce",
                      reg: float = 0.0) -> tuple[Tensor, int]:
        """One SGNS update on a batch of pairs; returns (mean loss per pair, pairs)."""
        if loss != "bce":
            raise ValueError(f"{OP}.training_step: loss must be 'bce', got {loss!r}")
        if batch.negatives is None:
            raise ValueError(f"{OP}.training_step: the batch has no negatives")
        centers = self.item_embeddings(batch.users)
        contexts = self.context_embeddings(batch.items)
        negatives = self.context_embeddings(batch.negatives)
        positive = (centers * contexts).sum(-1)
        negative = torch.einsum("bd,bnd->bn", centers, negatives)
        size = batch.users.shape[0]
        value = (F.softplus(-positive).sum() + F.softplus(negative).sum()) / size
        objective = value
        if reg:
            objective = value + reg * (centers.pow(2).sum() + contexts.pow(2).sum()
                                       + negatives.pow(2).sum()) / size
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        return value.detach(), size

    # -- scoring hooks -----------------------------------------------------------------------
    def item_vectors(self) -> tuple[Tensor, None]:
        """(the input table (num_items, dim), no bias)."""
        return self.item_embeddings.weight.detach(), None

    def user_vectors(self, users) -> tuple[Tensor, None]:
        """(mean input vector of each user's history items (B, dim), no offset); ``users``
        (B,) int32/int64 in [0, num_users)."""
        users = self.as_ids(users, "users", self.num_users, method="user_vectors")
        return self._history_vectors(users), None

    def _history_vectors(self, users: Tensor) -> Tensor:
        """:meth:`user_vectors` of ``users`` already checked."""
        users = users.to(device=self.history_indptr.device, dtype=torch.int64)
        starts, stops = self.history_indptr[users], self.history_indptr[users + 1]
        sizes = stops - starts
        offsets = torch.zeros(len(users), dtype=torch.int64, device=users.device)
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
        # Each user's slice of history_items, concatenated.
        flat = torch.repeat_interleave(starts - offsets, sizes) + torch.arange(
            int(sizes.sum()), device=users.device)
        weight = self.item_embeddings.weight.detach()
        pooled = F.embedding_bag(self.history_items[flat], weight.float(), offsets, mode="mean")
        return pooled.to(weight.dtype)

    def forward(self, users, items) -> Tensor:
        """``<mean of the user's history input vectors, input vector of the item>`` (B,);
        ids checked as MF's (:meth:`pair_ids`). Training (:meth:`training_step`) never calls
        it."""
        users, items = self.pair_ids(users, items)
        vectors = self._history_vectors(users)
        return (vectors * self.item_embeddings.weight.detach()[items.long()]).sum(-1)
