"""``fastmf.fit``: epochs of fused training steps over an :class:`Interactions` set, with
validation, early stopping, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fastmf import checkpoint as checkpoint_module
from fastmf import metrics as metrics_module
from fastmf.checkpoint import check_save_target
from fastmf.data import Interactions, NegativeSampler
from fastmf.ops.checks import accumulation_dtype
from fastmf.optim import SparseAdagrad, check_steps_its_tables
from fastmf.recommender import EXPLICIT, IMPLICIT, Recommender, seed_of

# A model's own ``defaults`` are merged over these.
DEFAULTS = {
    # Explicit: chosen for MF on inner validation splits of four sets, never on reported rows
    # (benchmarks/README.md, "Accuracy on MovieLens ml-latest-small": "Explicit defaults").
    "explicit": dict(lr=0.15, reg=0.1, batch_size=4096, epochs=6),
    # Implicit: chosen on inner validation splits (each user's latest training interaction
    # held out) of six data sets: ml-latest-small by user activity and by time, and
    # synthetic sets of different sparsity and popularity skew, each curve the mean of 3
    # seeds; BPR and BCE both chose it (benchmarks/implicit_feedback.py --tune --seeds 3;
    # benchmarks/README.md, "Implicit feedback").
    "implicit": dict(lr=0.1, reg=0.01, batch_size=4096, epochs=40, num_negatives=4),
}


def suggest_dim(n: int, rule: str = "fastai") -> int:
    """A factor count for ``n`` users or items, from one of two rules of thumb:

    - ``"fastai"``: fast.ai's ``min(600, round(1.6 * n ** 0.56))``;
    - ``"fourth_root"``: ``round(n ** 0.25)`` (the TensorFlow feature-columns guide's rule).

    ``fastmf demo``/``fastmf train`` use ``"fastai"`` on the smaller side (items or users),
    capped at 128 (larger factor counts seldom pay on explicit ratings).

    >>> suggest_dim(10_000), suggest_dim(10_000, "fourth_root")
    (278, 10)
    """
    if n < 1:
        raise ValueError(f"fastmf.suggest_dim: n must be >= 1, got {n}")
    if rule == "fastai":
        return int(min(600, round(1.6 * n**0.56)))
    if rule == "fourth_root":
        return max(1, int(round(n**0.25)))
    raise ValueError(f"fastmf.suggest_dim: unknown rule {rule!r}; use 'fastai' or 'fourth_root'")


@dataclass
class History:
    """Per-epoch records: ``loss``, ``samples_per_s``, ``seconds`` and validation metrics.

    ``history["rmse"]`` lists a metric over the epochs; ``best_epoch`` (0-based) and
    ``best`` refer to the monitored metric when validation ran.
    """

    epochs: list[dict] = field(default_factory=list)
    monitor: str | None = None
    best_epoch: int | None = None
    stopped_early: bool = False

    def __getitem__(self, key: str) -> list:
        return [row.get(key) for row in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def best(self) -> dict | None:
        return None if self.best_epoch is None else self.epochs[self.best_epoch]

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "monitor": self.monitor, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, data: dict) -> History:
        """The History of :meth:`to_dict`'s output, checked (it comes from a checkpoint
        file): ValueError naming the first field that is not as ``fit`` writes it."""
        def bad(what: str, value) -> ValueError:
            return ValueError(f"fastmf.History.from_dict: {what}, got {value!r:.60}")

        def number(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        if not isinstance(data, dict) or not set(data) <= {
                "epochs", "monitor", "best_epoch", "stopped_early"}:
            raise bad("expected an object with epochs, monitor, best_epoch, stopped_early",
                      data)
        epochs = data.get("epochs", [])
        if not isinstance(epochs, list):
            raise bad("epochs must be a list of per-epoch records", epochs)
        for n, row in enumerate(epochs):
            if not isinstance(row, dict) or not all(isinstance(k, str) for k in row):
                raise bad(f"epoch record {n} must be an object", row)
            if not number(row.get("loss")):
                raise bad(f"epoch record {n} must hold a numeric loss", row.get("loss"))
            epoch = row.get("epoch", n + 1)
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise bad(f"epoch record {n}'s epoch must be an int >= 0", epoch)
        best = data.get("best_epoch")
        if best is not None and (isinstance(best, bool) or not isinstance(best, int)
                                 or not 0 <= best < len(epochs)):
            raise bad(f"best_epoch must be null or an int in [0, {len(epochs)})", best)
        if not isinstance(data.get("monitor"), str | None):
            raise bad("monitor must be null or a metric name", data.get("monitor"))
        if not isinstance(data.get("stopped_early", False), bool):
            raise bad("stopped_early must be true or false", data.get("stopped_early"))
        return cls(**data)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.epochs)


def _seed_of(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch): each epoch's shuffle and negatives depend only on
    these, so a resumed run draws exactly what a straight run does."""
    return seed_of(*parts)


# The third part of the seed of an epoch's draws from torch's global generators.
_GLOBAL_DRAWS = 1


@contextlib.contextmanager
def _epoch_rng(seed: int, device: torch.device):
    """torch's global generator of ``device`` (and the CPU's) seeded with ``seed`` for the
    block, and put back as it was after. A model that draws from it in training (dropout in
    NeuMF's and MLP's towers) then draws per epoch what it drew when the epoch first ran: a
    resumed fit ended up to 0.024 away from the uninterrupted one without it."""
    devices = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


def _higher_is_better(metric: str) -> bool:
    return metric != "loss" and metrics_module.higher_is_better(metric)


_USER_COLUMNS = ("user", "userId", "user_id")
_ITEM_COLUMNS = ("item", "itemId", "item_id", "movieId")


def _in_model_maps(model, train: Interactions) -> Interactions:
    """``train`` in the id maps of a model that has some (from the data it was trained on
    or attached, grown by add_users/add_items), when ``train`` numbers its users and items
    otherwise (read with maps of its own): re-indexed through the raw ids. Its indices taken
    as they stand gave the model's rows of some users to others where the sizes matched,
    silently. Data with the model's maps or with identity maps (built from indices) is
    taken as it is. Raw ids the model does not know are a ValueError: grow it first."""
    user_map, item_map = getattr(model, "user_map", None), getattr(model, "item_map", None)
    if user_map is None or item_map is None or train.same_ids(user_map, item_map) or (
            train.user_map.is_identity and train.item_map.is_identity):
        return train
    try:
        out = train.reindex(user_map, item_map)
    except ValueError:  # no row left
        out = None
    unknown = len(train) - (0 if out is None else len(out))
    if unknown:
        raise ValueError(f"fastmf.fit: {unknown:,} of the {len(train):,} training interactions "
                         "have raw user or item ids the model does not know (its id maps are "
                         "those of the data it was trained on); add them first "
                         "(model.add_users / add_items with raw_ids=) or train a new model")
    if train.item_titles:  # kept, by raw id (reindex leaves them behind)
        old = np.fromiter(train.item_titles, dtype=np.int64, count=len(train.item_titles))
        new = item_map.lookup(train.item_map.raw_ids[old])
        out.item_titles = {int(n): train.item_titles[int(o)]
                           for o, n in zip(old, new, strict=True) if n >= 0}
    return out


def _as_interactions(data, name: str, like: Interactions | None = None) -> Interactions:
    """``data`` as Interactions: an Interactions, a scipy.sparse user x item matrix (its
    values are the ratings) or a pandas DataFrame with user/item (and rating/timestamp)
    columns. ``like``: the training set whose index space a validation set must use (a
    DataFrame's rows with raw ids unknown to it are dropped)."""
    if isinstance(data, Interactions):
        if like is None:
            return data
        return data.in_maps_of(like.user_map, like.item_map, "fastmf.fit", name)
    if hasattr(data, "tocsr") and hasattr(data, "nnz"):
        converted = Interactions.from_scipy(data)
        if like is not None and converted.shape != like.shape:
            raise ValueError(f"fastmf.fit: {name} is a {converted.shape[0]} x "
                             f"{converted.shape[1]} matrix but train has {like.shape[0]} "
                             f"users x {like.shape[1]} items")
        return converted
    if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):
        columns = [str(c) for c in data.columns]
        user = next((c for c in _USER_COLUMNS if c in columns), None)
        item = next((c for c in _ITEM_COLUMNS if c in columns), None)
        if user is None or item is None:
            raise ValueError(f"fastmf.fit: {name} is a DataFrame without user and item "
                             f"columns (expected 'user'/'item', optionally 'rating' and "
                             f"'timestamp'); it has {columns}")
        rating = "rating" if "rating" in columns else None
        time = "timestamp" if "timestamp" in columns else None
        kwargs = {}
        if like is not None:
            kwargs = dict(user_map=like.user_map, item_map=like.item_map, unknown="drop")
        converted = Interactions.from_pandas(data, user_col=user, item_col=item,
                                             rating_col=rating, time_col=time, **kwargs)
        if like is not None and len(converted) < len(data):
            warnings.warn(f"fastmf.fit: {len(data) - len(converted)} of {len(data)} {name} "
                          "rows have users or items train does not know; they are left out",
                          stacklevel=3)
        return converted
    raise TypeError(f"fastmf.fit: {name} must be fastmf.data.Interactions, a scipy.sparse "
                    f"user x item matrix or a pandas DataFrame, got {type(data).__name__}")


def _count(name: str, value, least: int) -> int:
    """``value`` as an int >= ``least``; a float, bool or string is an error, not rounded."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"fastmf.fit: {name} must be an int >= {least}, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    """``value`` (an int or float, numpy's too) as a float; a bool or string is an error,
    not converted (lr=True trained at 1.0, reg="0.5" at 0.5). Ranges are the optimizers'."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"fastmf.fit: {name} must be a number, got {type(value).__name__} "
                        f"{value!r}")
    return float(value)


def fit(
    model: Recommender,
    train,
    *,
    loss: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer=None,
    lr: float | None = None,
    reg: float | None = None,
    num_negatives: int | None = None,
    negative_distribution: str = "uniform",
    valid=None,
    metrics: tuple[str, ...] | None = None,
    k: int = 10,
    early_stopping: int | None = None,
    monitor: str | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    seed: int | None = 0,
    progress: bool = True,
    set_global_mean: bool = True,
    distributed: bool = False,
) -> History:
    """Train ``model`` (any :class:`fastmf.models.base.Recommender`) on ``train``; returns a
    :class:`History`. ``fit`` drives the model's hooks: ``check_data``, ``prepare``,
    ``make_optimizer``, ``batches`` and ``training_step`` (``fastmf.MF``: fused steps), or
    ``train_epoch`` for a model that runs a whole epoch in one call (``fastmf.MF`` with
    bpr/bce and uniform negatives).

    - ``train``/``valid``: :class:`~fastmf.data.Interactions`, a scipy.sparse user x item
      matrix (values: ratings) or a pandas DataFrame with ``user``/``item`` columns (and
      ``rating``/``timestamp``); a DataFrame ``valid`` is mapped through ``train``'s ids.
    - ``loss`` (default: ``model.default_loss``; one of ``model.losses``):
      ``"mse"``/``"huber"`` on the ratings (explicit), or ``"bce"`` (each positive plus
      ``num_negatives`` sampled negatives labelled 0) / ``"bpr"`` (each positive against
      ``num_negatives`` sampled negatives) on the interactions (implicit), or ``"warp"``
      for the models that list it (the ``num_negatives`` are each positive's candidates);
      ``num_negatives`` defaults like ``lr`` (4, or the model's ``defaults``).
      Negatives exclude the user's training items; ``negative_distribution`` is
      ``"uniform"`` or ``"popularity"``. Uniform negatives are counter-based in (seed,
      epoch, batch, position), the same for every model, backend and thread count; MF with
      bpr or bce draws them inside its fused steps (one kernel call per epoch).
    - ``optimizer``: an optimizer over the model, or a name ``model.make_optimizer`` builds
      with ``lr`` (MF: ``"adagrad"`` (default), ``"rowwise_adagrad"``, ``"sgd"``; models on
      fastmf.nn tables also ``"adam"``, ``"rowwise_adam"``). ``epochs``, ``batch_size``,
      ``lr``, ``reg`` default per loss kind (``DEFAULTS``, with ``model.defaults`` over them:
      per kind, then per loss name, e.g. MF's ``"warp"``).
    - ``valid``: held-out interactions; explicit losses report ``rmse``/``mae``, implicit
      ones full-catalog ranking metrics at ``k`` (training items excluded).
    - ``early_stopping``: patience in epochs on ``monitor`` (default ``rmse`` or
      ``ndcg@k``); the best epoch's weights are restored at the end.
    - ``checkpoint``: a folder saved after every epoch (weights, optimizer, history); it
      must be new, empty or a fastmf checkpoint (checked before training, see
      :func:`fastmf.checkpoint.check_save_target`). ``resume=True`` continues from it and
      ends with the same weights as an uninterrupted run; with no checkpoint there yet it
      warns and starts fresh, and from a ``model.save`` folder it starts from those weights
      at epoch 0 with an empty history (and a warning). Resuming Adagrad state needs the
      same ``rowwise`` setting. ``seed`` fixes shuffling and negatives.
    - ``set_global_mean``: for explicit losses, set ``mu`` to the mean training rating
      (models with a ``set_global_mean`` method, such as MF).
    - Sharded training (under ``torchrun``, after ``torch.distributed.init_process_group``):
      pass a model sharded by :func:`fastmf.distributed.shard`, or ``distributed=True`` to
      shard it here (``history.model`` is the sharded model: a new
      ``fastmf.distributed.ShardedMF`` for a ``fastmf.MF``). Every rank passes the same data
      and seed and trains on its slice of each global batch; the run equals one process
      within float rounding. Only rank 0 shows progress; validation metrics and early
      stopping are the same on every rank; ``checkpoint`` is a sharded checkpoint
      (:func:`fastmf.distributed.save`) that resumes at any world size.

    >>> import fastmf
    >>> data = fastmf.datasets.synthetic(num_users=200, num_items=100, num_interactions=5000)
    >>> model = fastmf.MF(data.num_users, data.num_items, dim=16)
    >>> history = fastmf.fit(model, data, epochs=2, progress=False)
    >>> len(history)
    2
    """
    from fastmf.evaluate import evaluate

    if not isinstance(model, Recommender):
        raise TypeError(f"fastmf.fit: model must be a fastmf.models.base.Recommender, got "
                        f"{type(model).__name__}")
    dctx = None
    if distributed or any(getattr(p, "fastmf_shard", None) is not None
                          for p in model.parameters()):
        from fastmf.distributed.fit import FitContext

        dctx = FitContext.of(model, distributed)
        model = dctx.model
        progress = progress and dctx.is_main
    # Distributed: a check that fails on one rank only (its data, its arguments) must not
    # leave the others waiting in a collective, so the checks run under try and every rank
    # learns the outcome, with each rank's data and settings, in one collective below.
    problem = agreed = None
    try:
        # In the model's id maps first, when it has some: valid then follows train's.
        train = _in_model_maps(model, _as_interactions(train, "train"))
        if valid is not None:
            valid = _as_interactions(valid, "valid", like=train)
        name = model.public_name()
        if loss is None:
            loss = model.default_loss
        if loss not in EXPLICIT + IMPLICIT:
            raise ValueError(f"fastmf.fit: unknown loss {loss!r}; expected one of "
                             f"{EXPLICIT + IMPLICIT}")
        if loss not in model.losses:
            raise ValueError(f"fastmf.fit: {name} does not train with loss {loss!r}; its losses "
                             f"are {tuple(model.losses)}")
        implicit = loss in IMPLICIT
        kind = "implicit" if implicit else "explicit"
        # The model's own defaults: per loss kind, then per loss (MF's "warp").
        own = model.defaults or {}
        defaults = {**DEFAULTS[kind], **own.get(kind, {}), **own.get(loss, {})}
        epochs = _count("epochs", defaults["epochs"] if epochs is None else epochs, 0)
        batch_size = _count("batch_size",
                            defaults["batch_size"] if batch_size is None else batch_size, 1)
        reg = defaults["reg"] if reg is None else _real("reg", reg)
        lr = defaults["lr"] if lr is None else _real("lr", lr)
        if not implicit and not (isinstance(negative_distribution, str)
                                 and negative_distribution == "uniform"):
            raise ValueError(f"fastmf.fit: negative_distribution={negative_distribution!r} applies "
                             f"to the implicit losses {IMPLICIT}, not {loss!r}, which draws no "
                             "negatives")
        # An implicit loss with no negatives would train nothing (every step's loss is 0).
        num_negatives = _count("num_negatives", defaults.get("num_negatives", 4)
                               if num_negatives is None else num_negatives, 1 if implicit else 0)
        if early_stopping is not None:
            # Patience in epochs: 0 or less would stop after the first epoch whatever it scored.
            early_stopping = _count("early_stopping", early_stopping, 1)
            if valid is None:
                raise ValueError("fastmf.fit: early_stopping needs valid= (the held-out "
                                 "interactions it monitors)")
        model.check_data(train)
        if train.weights is not None and not model.uses_weights:
            raise ValueError(
                f"fastmf.fit: the interactions carry per-row weights, which "
                f"{type(model).__name__}'s training step does not use; train without them "
                "(train.with_weights(None)) or a model that uses them (fastmf.MF, "
                "fastmf.models.ALS, Hybrid, GMF, MLP, NeuMF)")
        if not implicit and train.ratings is None:
            raise ValueError(f"fastmf.fit: loss {loss!r} needs ratings; these interactions have "
                             "none (use loss='bpr' or 'bce' for implicit feedback)")
        seed = (int(np.random.SeedSequence().entropy % (2**31)) if seed is None
                else _count("seed", seed, 0))
        k = _count("k", k, 1)
        if resume and checkpoint is None:
            raise ValueError("fastmf.fit: resume=True needs checkpoint=<folder>")
        if checkpoint is not None and dctx is None:
            # Refuse a folder the saves could not use now, not after the first epoch.
            checkpoint = check_save_target(checkpoint)
            if early_stopping and valid is not None:
                check_save_target(_best_path(checkpoint))
            if checkpoint_module.MODELS.get(type(model).__name__) is not type(model):
                raise ValueError(f"fastmf.fit: checkpoint= needs a registered model class; "
                                 f"decorate {type(model).__qualname__} with "
                                 "fastmf.checkpoint.register_model")
        if dctx is not None:
            optimizer = dctx.optimizer(optimizer, lr)
            agreed = _agreement_record(
                model, train, valid, optimizer, loss=loss, epochs=epochs, batch_size=batch_size,
                lr=lr, reg=reg, num_negatives=num_negatives,
                negative_distribution=negative_distribution, metrics=metrics, k=k,
                early_stopping=early_stopping, monitor=monitor, checkpoint=checkpoint,
                resume=resume, set_global_mean=set_global_mean)
        elif optimizer is None or isinstance(optimizer, str):
            optimizer = model.make_optimizer(optimizer, lr)
        else:
            check_steps_its_tables(optimizer, model.parameters(), "fastmf.fit")
    except Exception as exc:
        if dctx is None:
            raise
        problem = exc
    if dctx is not None:
        # The same error on every rank when a rank's checks failed or its data or settings
        # differ from rank 0's; every rank slices the same global batches: rank 0's seed.
        seed = dctx.check_same(problem, agreed, seed)
        if checkpoint is not None:
            checkpoint = dctx.check_target(checkpoint)
    model.prepare(train)

    metric_names = tuple(metrics) if metrics else (
        (f"ndcg@{k}", f"hr@{k}") if implicit else ("rmse", "mae"))
    # Canonical names ("Hit@10" -> "hr@10"), as evaluate keys its results; a bad name fails
    # here, before the first epoch.
    metric_names = tuple(metrics_module.metric_key(m) for m in metric_names)
    monitor = monitor or metric_names[0]
    if monitor != "loss":
        monitor = metrics_module.metric_key(monitor)
        if valid is not None and monitor not in metric_names:
            # Found out only after the first epoch otherwise, as a bare KeyError.
            raise ValueError(f"fastmf.fit: monitor {monitor!r} is not among the validation "
                             f"metrics {metric_names}; add it to metrics= (or set k=) or "
                             "monitor one of them")
    history = History(monitor=monitor if valid is not None else None)
    start_epoch = 0
    best_state = None
    resumed = None
    # What a resumed run must repeat to end as an uninterrupted one would.
    run = None if checkpoint is None else _run_record(
        train, loss=loss, batch_size=batch_size, lr=lr, reg=reg, num_negatives=num_negatives,
        negative_distribution=str(negative_distribution), seed=seed)
    if resume:
        resumed = (dctx.resume(optimizer, checkpoint, run) if dctx is not None
                   else _resume(model, optimizer, checkpoint, run))
    if resumed is not None:
        start_epoch, saved_history, best_state = resumed
        if saved_history is not None:
            history = saved_history
    elif set_global_mean and not implicit and hasattr(model, "set_global_mean"):
        model.set_global_mean(float(np.mean(train.ratings, dtype=np.float64)))

    device = model._param_device()
    sampler = NegativeSampler(train, distribution=negative_distribution) if implicit else None
    n = len(train)
    bad_epochs = 0
    if history.best_epoch is not None:
        bad_epochs = len(history) - 1 - history.best_epoch

    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(_seed_of(seed, epoch))
        bar = _progress(progress, n, f"epoch {epoch + 1}/{epochs}")
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        samples = seen = 0
        start = time.perf_counter()
        # A model that runs the whole epoch in one call (MF with bpr/bce) returns its batches'
        # losses; the rest train batch by batch. Both accumulate the loss the same way.
        # Draws of the model's own from torch's global generator (dropout) come from
        # (seed, epoch) too, so a resumed run repeats them; the caller's state is restored.
        with _epoch_rng(_seed_of(seed, epoch, _GLOBAL_DRAWS), device):
            whole = None if dctx is not None else model.train_epoch(
                train, optimizer, batch_size=batch_size, loss=loss, num_negatives=num_negatives,
                sampler=sampler, generator=gen, reg=reg)
            batches = ()
            if whole is not None:
                losses, sizes, samples = whole
                weighted = 0.0
                for value, size in zip(losses.double().tolist(), sizes):
                    weighted += value * size  # in float64, in batch order, as below
                total_loss += weighted
                seen = sum(sizes)
                if bar is not None:
                    bar.update(seen)
            else:
                batches = model.batches(train, batch_size=batch_size, loss=loss,
                                        num_negatives=num_negatives, sampler=sampler,
                                        generator=gen)
            if dctx is not None:
                batches = dctx.local_batches(batches)
            for b, batch in enumerate(batches):
                step_loss, count = model.training_step(batch, optimizer, loss=loss, reg=reg)
                size = len(batch.users)
                total_loss += step_loss.double().to(device) * size
                samples += count
                seen += size
                if bar is not None:
                    bar.update(size if dctx is None else dctx.global_batch)
                    if b % 20 == 0:
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(loss=f"{float(step_loss):.4f}",
                                        samples_s=f"{samples / elapsed:.3g}")
        seconds = time.perf_counter() - start
        if dctx is not None:
            total_loss, samples, seen = dctx.all_sum(total_loss, samples, seen)
        row = {"epoch": epoch + 1, "loss": float(total_loss) / max(seen, 1), "seconds": seconds,
               "samples_per_s": samples / max(seconds, 1e-9)}
        # Diverged: the steps wrote NaN or inf, and every later epoch, evaluation,
        # checkpoint and recommendation would carry them on. A batch's loss is taken before
        # its update, so the weights themselves are checked too (a pass over them) where
        # they are about to be evaluated, saved or returned. Stopped before this epoch's
        # checkpoint, so a checkpoint keeps the last finite epoch.
        what = None
        if not np.isfinite(row["loss"]):
            what = f"the training loss is {row['loss']}"
        elif valid is not None or checkpoint is not None or epoch == epochs - 1:
            bad = _non_finite_weights(model)
            if dctx is not None:
                bad = int(dctx.all_sum(bad)[0])  # the same decision on every rank
            if bad:
                what = "the weights hold NaN, inf or values too large to score with"
        if what is not None:
            if bar is not None:
                bar.close()
            raise FloatingPointError(
                f"fastmf.fit: {what} in epoch {epoch + 1}: training diverged; lower lr (now "
                f"{lr}), raise reg (now {reg}) or use an adaptive optimizer (adagrad, the "
                "default for most models)")
        if valid is not None and dctx is not None:
            row.update(dctx.evaluate(valid, train=train, metrics=metric_names, k=k))
        elif valid is not None:
            row.update(evaluate(model, valid, train=train, metrics=metric_names, k=k))
        if dctx is not None:
            row = dctx.agree(row)  # the same record, so the same decisions, on every rank
        if bar is not None:
            bar.set_postfix({key: f"{v:.4g}" for key, v in row.items()
                             if key not in ("epoch", "seconds")})
            bar.close()
        history.epochs.append(row)
        improved = False
        if valid is not None:
            value = row[monitor]
            best = None if history.best_epoch is None else history.best[monitor]
            better = _higher_is_better(monitor)
            if best is None or (value > best if better else value < best):
                history.best_epoch, improved, bad_epochs = epoch, True, 0
                best_state = copy.deepcopy(model.state_dict()) if early_stopping else None
            else:
                bad_epochs += 1
        if checkpoint is not None:
            save = (partial(dctx.save_progress, run=run) if dctx is not None
                    else partial(_save_progress, model, run=run))
            save(optimizer, checkpoint, history, epoch, improved, early_stopping)
        if early_stopping and valid is not None and bad_epochs >= early_stopping:
            history.stopped_early = True
            break
    if early_stopping and best_state is not None:
        model.load_state_dict(best_state)
    if dctx is not None:
        history.model = model
    return history


def _non_finite_weights(model) -> int:
    """How many of the model's floating parameters hold a NaN or an inf, or a row whose
    squared norm overflows (this process's part, for a sharded model). Rows of finite norm²
    have finite dot products (Cauchy-Schwarz); a step with a huge learning rate can leave
    finite weights of 1e30 whose every score is inf or NaN."""
    bad = 0
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        rows = p.detach().reshape(-1, p.shape[-1] if p.dim() >= 2 else 1)
        # In chunks of rows: the squares of a whole 10M x 64 table would be 2.5 GB more.
        finite = True
        for lo in range(0, rows.shape[0], _CHECK_ROWS):
            chunk = rows[lo:lo + _CHECK_ROWS].to(accumulation_dtype(p.dtype))
            finite = finite and bool(torch.isfinite(chunk.square().sum(-1)).all())
            if not finite:
                break
        bad += not finite
    return bad


_CHECK_ROWS = 1 << 16


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, leave=True)


def _best_path(path: Path) -> Path:
    return path.with_name(path.name + ".best")


def _save_progress(model, optimizer, path: Path, history, epoch, improved, early_stopping,
                   run=None):
    if improved and early_stopping:
        model.save(_best_path(path))
    extra = {"epoch": epoch + 1, "history": history.to_dict()}
    if run is not None:
        extra["run"] = run
    model.save(path, optimizer=optimizer, extra=extra)


def _agreement_record(model, train, valid, optimizer, **settings) -> dict:
    """What every rank of a sharded fit must share, as text for
    :meth:`fastmf.distributed.fit.FitContext.check_same` to compare: the data (size and
    digest, as :func:`_run_record` keeps them), the settings, the model's config and the
    optimizer's class and group settings (not the seed: rank 0's is used)."""
    def text(value) -> str:
        if isinstance(value, np.ndarray | torch.Tensor):
            array = np.ascontiguousarray(np.asarray(value))
            return (f"array {array.dtype} {array.shape} sha256 "
                    f"{hashlib.sha256(array.tobytes()).hexdigest()[:16]}")
        if isinstance(value, Path):
            return repr(str(value))
        return repr(value)

    record = {key: text(value) for key, value in settings.items()}
    record["data"] = _run_record(train)["data"]
    record["valid"] = "none" if valid is None else _run_record(valid)["data"]
    record["model"] = type(model).__qualname__
    try:
        config = model.get_config()
    except Exception:  # noqa: BLE001 - a model without a config: its class only
        config = {}
    for key, value in sorted(config.items()):
        if key not in ("device", "backend"):  # may differ per rank without harm
            record[f"model {key}"] = text(value)
    parts = list(getattr(optimizer, "optimizers", [optimizer]))
    for index, part in enumerate(parts):
        name = "optimizer" if len(parts) == 1 else f"optimizer[{index}]"
        record[name] = type(part).__qualname__
        record[f"{name} groups"] = str(len(part.param_groups))
        for number, group in enumerate(part.param_groups):
            record[f"{name} group {number} params"] = str(len(group["params"]))
            for key, value in group.items():
                if key != "params":
                    record[f"{name} group {number} {key}"] = text(value)
    return record


def _run_record(train, **settings) -> dict:
    """The settings and data of a fit, as its checkpoint keeps them: a resumed run with
    others does not end as the uninterrupted one would, and ``_resume`` says so. The data
    enter as their size and a digest of their rows (about a millisecond for 100,000)."""
    digest = hashlib.sha256()
    for a in (train.users, train.items, train.ratings, train.weights):
        if a is not None:
            digest.update(np.ascontiguousarray(a).tobytes())
    return {**settings, "data": f"{len(train)} rows, {train.num_users} users x "
                                f"{train.num_items} items, sha256 {digest.hexdigest()[:16]}"}


def _check_same_run(saved: dict, run: dict | None, path: Path) -> None:
    """Warns when this fit resumes ``path`` with settings or data other than those it was
    saved with (``run``: :func:`_run_record`). The epoch count may differ: resuming to
    train longer is what it is for. Checkpoints written before the record say nothing."""
    record = saved.get("run")
    if run is None or not isinstance(record, dict):
        return
    changed = [f"{key} {record.get(key)!r} -> {value!r}" for key, value in run.items()
               if record.get(key) != value]
    if changed:
        warnings.warn(f"fastmf.fit: resuming {path} with other settings than it was saved "
                      f"with ({'; '.join(changed)}); the run will not end as an "
                      "uninterrupted one would", stacklevel=4)


def _saved_history(saved, path: Path) -> tuple[int, History] | None:
    """(epochs done, history) from a checkpoint written by ``fit``; None for one written by
    ``model.save`` (no training progress)."""
    extra = saved.extra
    if "epoch" not in extra and "history" not in extra:
        return None
    epoch, data = extra.get("epoch"), extra.get("history")
    try:
        history = History.from_dict(data)
    except ValueError as exc:
        history, problem = None, f"; {exc}"
    else:
        problem = ""
    ok = (history is not None and isinstance(epoch, int) and not isinstance(epoch, bool)
          and set(data) == {"epochs", "monitor", "best_epoch", "stopped_early"}
          and len(history.epochs) == epoch)
    if not ok:
        from fastmf.checkpoint import CheckpointError

        raise CheckpointError(f"fastmf.fit: checkpoint {path} holds no valid training progress "
                              f"(extra.epoch={epoch!r} and extra.history do not agree{problem})")
    return epoch, history


def _restore_optimizer(model: Recommender, optimizer, saved, path: Path) -> None:
    theirs = saved.optimizer
    if theirs is None:
        return
    if type(theirs) is not type(optimizer):
        warnings.warn(f"fastmf.fit: checkpoint {path} holds {type(theirs).__name__} state but "
                      f"this run uses {type(optimizer).__name__}; its optimizer state is not "
                      "restored, so the run will not match an uninterrupted one", stacklevel=4)
        return
    if getattr(model, "checkpoint_format", None) == "mf":
        _restore_mf_optimizer(model, optimizer, saved, path)
        return
    mine_parts = getattr(optimizer, "optimizers", [optimizer])
    their_parts = getattr(theirs, "optimizers", [theirs])
    layout = [(type(p).__name__, [(len(g["params"]), g.get("rowwise")) for g in p.param_groups])
              for p in mine_parts]
    saved_layout = [(type(p).__name__, [(len(g["params"]), g.get("rowwise"))
                                        for g in p.param_groups]) for p in their_parts]
    if layout != saved_layout:
        raise ValueError(f"fastmf.fit: checkpoint {path} holds optimizer state laid out as "
                         f"{saved_layout} (type, [(parameters, rowwise) per group]) but this "
                         f"run's optimizer is {layout}; resume with the same optimizer or start "
                         "a new checkpoint")
    # The saved optimizer holds the checkpoint model's parameters in the order this one
    # holds the live model's (same class, same config, same make_optimizer). torch's
    # load_state_dict replaces the groups' settings with the saved ones, and a checkpoint
    # keeps no implementation flags: NCF's fused Adam came back as the for-loop one, whose
    # rounding differs (a resumed NeuMF ended 5e-10 to 6e-8 away from an uninterrupted one).
    flags = [[{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in part.param_groups]
             for part in mine_parts]
    optimizer.load_state_dict(theirs.state_dict())
    for part, groups in zip(mine_parts, flags, strict=True):
        for group, kept in zip(part.param_groups, groups, strict=True):
            group.update(kept)


# How a torch optimizer computes its step, not what it computes: kept from the live optimizer.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _restore_mf_optimizer(model, optimizer, saved, path: Path) -> None:
    if not isinstance(optimizer, SparseAdagrad):
        return
    saved_rowwise = saved.config["optimizer"]["rowwise"]
    for mine in model.tables():
        if mine is None:
            continue
        rowwise = optimizer.hyperparameters(mine)["rowwise"]
        if rowwise != saved_rowwise:
            names = {True: "'rowwise_adagrad'", False: "'adagrad'"}
            raise ValueError(
                f"fastmf.fit: checkpoint {path} holds SparseAdagrad(rowwise={saved_rowwise}) "
                f"state but this run's optimizer is SparseAdagrad(rowwise={rowwise}); resume "
                f"with optimizer={names[saved_rowwise]} or start a new checkpoint")
    with torch.no_grad():
        for mine, other in zip(model.tables(), saved.model.tables(), strict=True):
            if mine is not None:
                optimizer.state_for(mine).copy_(saved.optimizer.state_for(other))


def _check_same_model(model: Recommender, saved, path: Path) -> None:
    other = saved.model
    if getattr(model, "checkpoint_format", None) == "mf":
        if (other.num_users, other.num_items, other.dim) != (
                model.num_users, model.num_items, model.dim):
            raise ValueError(f"fastmf.fit: checkpoint {path} holds a {other.num_users} x "
                             f"{other.num_items} x {other.dim} model, not "
                             f"{model.num_users} x {model.num_items} x {model.dim}")
        if other.has_bias != model.has_bias:
            raise ValueError(f"fastmf.fit: checkpoint {path} holds a model with "
                             f"bias={other.has_bias}, this one has bias={model.has_bias}")
        return
    if type(other) is not type(model):
        raise ValueError(f"fastmf.fit: checkpoint {path} holds a {type(other).__name__}, "
                         f"this model is a {type(model).__name__}")
    mine, theirs = model.get_config(), other.get_config()
    if mine != theirs:
        diff = {key: (theirs.get(key), mine.get(key)) for key in set(mine) | set(theirs)
                if mine.get(key) != theirs.get(key)}
        raise ValueError(f"fastmf.fit: checkpoint {path} holds a {type(model).__name__} with "
                         f"another config (saved, this model): {diff}")


def _resume(model: Recommender, optimizer, path: Path, run: dict | None = None):
    """Load weights, optimizer state and history from ``path`` into ``model``/``optimizer``:
    ``(start epoch, history or None, best state)``, or None when ``path`` holds no
    checkpoint yet (a fresh start). A folder from ``model.save`` gives its weights, epoch 0
    and no history."""
    from fastmf.checkpoint import CONFIG, load, load_checkpoint

    if not (path / CONFIG).exists():
        warnings.warn(f"fastmf.fit: resume=True but {path} holds no checkpoint yet; "
                      "starting from scratch", stacklevel=3)
        return None
    saved = load_checkpoint(path, device=model._param_device(),
                            backend=getattr(model, "backend", "auto"))
    _check_same_model(model, saved, path)
    progress = _saved_history(saved, path)
    _restore_optimizer(model, optimizer, saved, path)
    model.load_state_dict(saved.model.state_dict())
    if progress is None:
        warnings.warn(f"fastmf.fit: {path} was written by model.save and holds no training "
                      "progress; training starts from its weights at epoch 0", stacklevel=3)
        return 0, None, None
    _check_same_run(saved.extra, run, path)
    epoch, history = progress
    best_state = None
    best_path = _best_path(path)
    if history.best_epoch is not None and (best_path / CONFIG).exists():
        best_state = load(best_path, device=model._param_device()).state_dict()
    return epoch, history, best_state
