"""What :func:`fastmf.fit` does differently when the model is sharded: :class:`FitContext`.

``fastmf.fit`` keeps one training loop; with a sharded model (``fastmf.distributed.shard``,
or ``fit(..., distributed=True)``) it asks a :class:`FitContext` for the few things that
differ from one process:

- ``make_optimizer``: the model's own optimizer choice rebuilt over its shards (fastmf
  sparse optimizers on the sharded tables, stepped after the backward; ``torch.optim``
  on the replicated layers, whose gradients :class:`ShardedOptimizer` sums over the ranks
  before stepping);
- ``local_batches``: every rank draws the same global batches (the same seeds) and trains
  on its :func:`~fastmf.distributed.local_slice` of each, under
  :func:`~fastmf.distributed.loss_share` so that a step's mean loss over the slice
  counts as its share of the global mean;
- ``all_sum`` / ``agree``: epoch totals summed over the ranks, rank 0's epoch record (and
  so every early-stopping decision) broadcast to all;
- ``evaluate``: validation metrics computed once and broadcast (rating metrics from the
  sharded predictions of every rank's slice; ranking metrics on rank 0 from the gathered
  tables, see :func:`gather_model`);
- ``check_target`` / ``save_progress`` / ``resume``: sharded checkpoints
  (:func:`fastmf.distributed.save`, each rank its shard plus a manifest, committed
  atomically) that resume at any world size.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastmf.checkpoint import model_kwargs
from fastmf.optim import CombinedOptimizer
from fastmf.recommender import Batch, Recommender

from . import checkpoint as sharded_checkpoint
from .modules import ShardedMF, is_sharded, local_slice, loss_share, shard, sync_dense_grads
from .routing import local_rows, world

__all__ = ["FitContext", "ShardedOptimizer", "check_target", "gather_model"]


def _src(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def _broadcast(value, group):
    box = [value]
    dist.broadcast_object_list(box, src=_src(group), group=group)
    return box[0]


class ShardedOptimizer(CombinedOptimizer):
    """The parts of a sharded model's optimizer driven as one
    (:class:`fastmf.optim.CombinedOptimizer`); :meth:`step` first sums the replicated
    parameters' gradients over the group (:func:`~fastmf.distributed.sync_dense_grads`)."""

    def __init__(self, optimizers, model: nn.Module, group=None):
        super().__init__(optimizers)
        self.model, self.group = model, group

    def step(self, closure=None):
        sync_dense_grads(self.model, self.group)
        return super().step(closure)


def _rebuild(part, names: dict[int, str], mine: dict):
    """An optimizer of ``part``'s class and group settings over this model's parameters of
    the same names."""
    from fastmf.optim import _SparseOptimizer

    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [mine[names[id(p)]] for p in g["params"]]} for g in part.param_groups]
    if isinstance(part, _SparseOptimizer):
        return type(part)(groups, backend=part.backend)
    return type(part)(groups)


class FitContext:
    """The distributed side of one :func:`fastmf.fit` run on a sharded ``model`` over
    ``group`` (None: the default group). :meth:`of` builds it (and shards the model when
    asked to)."""

    def __init__(self, model: Recommender, group=None):
        self.model, self.group = model, group
        self.rank, self.world_size = world(group)
        self.is_main = self.rank == 0
        self.device = sharded_checkpoint._comm_device(group)
        self.global_batch = 0  # the size of the global batch local_batches last sliced

    @classmethod
    def of(cls, model: Recommender, distributed: bool) -> FitContext | None:
        """None for a model without shards unless ``distributed`` (then it is sharded over
        the default group: in place for tables that are submodules, a new
        :class:`~fastmf.distributed.ShardedMF` for a :class:`fastmf.MF`). A sharded model's
        context is over the group its tables were sharded over (:func:`model_group`)."""
        if not any(is_sharded(p) for p in model.parameters()):
            if not distributed:
                return None
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("fastmf.fit: distributed=True needs torch.distributed "
                                   "initialised (torch.distributed.init_process_group(), "
                                   "e.g. under torchrun)")
            model = shard(model)
        return cls(model, model_group(model))

    # -- agreement ----------------------------------------------------------------------------
    def check_same(self, error: BaseException | None, record: dict | None, seed):
        """Before training, one ``all_gather_object`` over the group: when a rank's checks
        failed (``error``: its own data out of the model's range, say), the first failing
        rank's error is raised on every rank (of the same type and text where it pickles);
        when a rank's ``record`` (its data digest and settings, as text) differs from rank
        0's, the same ValueError on every rank names what differs and where. Returns rank
        0's ``seed``, which every rank then uses."""
        sent = None if error is None else sharded_checkpoint._portable(error)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (sent, record, seed), group=self.group)
        for rank, (theirs, _, _) in enumerate(gathered):
            if theirs is None:
                continue
            if rank == self.rank and error is not None:
                raise error
            theirs.add_note(f"(fastmf.fit: raised on rank {rank}, where the check failed; "
                            "every rank of the fit raises it)")
            raise theirs from error
        first = gathered[0][1]
        changed = []
        for rank in range(1, self.world_size):
            mine, differ = gathered[rank][1], []
            for key in list(first) + [key for key in mine if key not in first]:
                # Another optimizer (model) class: its settings differ too, unsaid.
                if first.get(key) != mine.get(key) and not any(
                        key.startswith(f"{other} ") for other in differ):
                    differ.append(key)
                    changed.append(f"rank {rank} has {key} {mine.get(key, '(none)')} where "
                                   f"rank 0 has {first.get(key, '(none)')}")
        if changed:
            shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more"
                                              if len(changed) > 8 else "")
            raise ValueError(
                f"fastmf.fit: the ranks of a sharded fit must pass the same data, model and "
                f"settings, but {shown}")
        return gathered[0][2]

    # -- optimizer --------------------------------------------------------------------------
    def make_optimizer(self, name: str | None, lr: float):
        """The optimizer the model's ``make_optimizer(name, lr)`` builds, over its shards.
        A :class:`ShardedMF` takes MF's (its fused steps run it); other models get their
        choice (read from a copy built on the meta device) as a :class:`ShardedOptimizer`."""
        model = self.model
        if isinstance(model, ShardedMF):
            return model.make_optimizer(name, lr)
        replica = type(model)(**model_kwargs(model.get_config()), device="meta")
        built = replica.make_optimizer(name, lr)
        names = {id(p): n for n, p in replica.named_parameters()}
        mine = dict(model.named_parameters())
        parts = [_rebuild(part, names, mine)
                 for part in getattr(built, "optimizers", [built])]
        covered = {id(p) for part in parts for g in part.param_groups for p in g["params"]}
        missing = [n for n, p in mine.items() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"fastmf.fit: {model.public_name()}.make_optimizer leaves "
                             f"{missing} out; a sharded model needs every parameter trained")
        return ShardedOptimizer(parts, model, self.group)

    def optimizer(self, optimizer, lr: float):
        """fit's ``optimizer`` argument for the sharded model: a name (or None) goes to
        :meth:`make_optimizer`; an optimizer object over a model with replicated
        parameters is wrapped in a :class:`ShardedOptimizer` unless it is one, so that
        their gradients are summed over the ranks before each step."""
        if optimizer is None or isinstance(optimizer, str):
            return self.make_optimizer(optimizer, lr)
        replicated = any(p.requires_grad and not is_sharded(p)
                         for p in self.model.parameters())
        if not replicated or isinstance(optimizer, ShardedOptimizer):
            return optimizer
        return ShardedOptimizer(getattr(optimizer, "optimizers", [optimizer]), self.model,
                                self.group)

    # -- batches ----------------------------------------------------------------------------
    def local_batches(self, batches):
        """This rank's slice of each global batch, each step under its loss share."""
        for batch in batches:
            total = len(batch.users)
            part = local_slice(total, self.group)
            local = Batch(*(None if f is None else f[part] for f in batch))
            self.global_batch = total
            share = (part.stop - part.start) / total if total else 0.0
            with loss_share(share):
                yield local

    def all_sum(self, *values) -> list[float]:
        """Each value summed over the ranks (one all_reduce, float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def agree(self, value):
        """Rank 0's ``value`` on every rank."""
        return _broadcast(value, self.group)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, valid, *, train, metrics, k: int) -> dict:
        """``fastmf.evaluate`` of the sharded model, the same dict on every rank."""
        from fastmf import metrics as M
        from fastmf.evaluate import RATING_METRICS, evaluate

        bases = {M._parse_metric(m, "fastmf.evaluate")[0] for m in metrics}
        if bases <= set(RATING_METRICS) and valid.ratings is not None:
            pred = self._predict(valid.users, valid.items)
            out = {}
            if self.is_main:
                for name in metrics:
                    out[M.metric_key(name)] = float(getattr(M, M.metric_key(name))(
                        pred, valid.ratings))
            return self.agree(out)
        full = gather_model(self.model, self.group)
        out = error = None
        if self.is_main:
            try:
                full.prepare(train)
                out = evaluate(full, valid, train=train, metrics=metrics, k=k)
            except Exception as exc:  # raised on every rank below, not only here
                error = exc
        out, sent = self.agree((out, None if error is None
                                else sharded_checkpoint._portable(error)))
        if error is not None:
            raise error
        if sent is not None:
            raise sent
        return out

    @torch.no_grad()
    def _predict(self, users, items, chunk: int = 1 << 16) -> np.ndarray | None:
        """Predictions for the pairs, every rank scoring its slice of each chunk (the
        lookups are collectives); the whole array on rank 0, None elsewhere."""
        device = self.model._param_device()
        users = torch.as_tensor(np.asarray(users), dtype=torch.int64)
        items = torch.as_tensor(np.asarray(items), dtype=torch.int64)
        mine = []
        was_training = self.model.training
        self.model.eval()  # as fastmf.evaluate scores: dropout off
        try:
            for lo in range(0, len(users), chunk):
                u, i = users[lo:lo + chunk], items[lo:lo + chunk]
                part = local_slice(len(u), self.group)
                mine.append(self.model(u[part].to(device), i[part].to(device)).double().cpu())
        finally:
            self.model.train(was_training)
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, gathered, dst=_src(self.group), group=self.group)
        if not self.is_main:
            return None
        if not mine:
            return np.zeros(0)
        # Chunk by chunk, rank by rank: the original order.
        return torch.cat([parts[c] for c in range(len(mine)) for parts in gathered]).numpy()

    # -- checkpoints ------------------------------------------------------------------------
    def check_target(self, path) -> Path:
        return check_target(path, self.group, "fastmf.fit: checkpoint")

    def _parts(self, optimizer) -> list:
        return list(getattr(optimizer, "optimizers", [optimizer]))

    def save_progress(self, optimizer, path: Path, history, epoch: int, improved: bool,
                      early_stopping, run: dict | None = None) -> None:
        """As ``fastmf.train._save_progress``: the sharded weights, optimizer states and
        progress, with the fit's settings and data (``run``) for a resume to compare."""
        if improved and early_stopping:
            sharded_checkpoint.save(_best_path(path), self.model, process_group=self.group,
                                    extra={"epoch": epoch + 1})
        extra = {"epoch": epoch + 1, "history": history.to_dict()}
        if run is not None:
            extra["run"] = run
        sharded_checkpoint.save(path, self.model, self._parts(optimizer),
                                process_group=self.group, extra=extra)

    def resume(self, optimizer, path: Path, run: dict | None = None):
        """As ``fastmf.train._resume`` for a sharded checkpoint: ``(start epoch, history or
        None, best state)`` or None when ``path`` holds none yet; the main rank warns when
        ``run`` (this fit's settings and data) differs from the one it was saved with."""
        from fastmf.train import _check_same_run, _saved_history

        if sharded_checkpoint._committed(path) is None:
            if self.is_main:
                warnings.warn(f"fastmf.fit: resume=True but {path} holds no checkpoint yet; "
                              "starting from scratch", stacklevel=3)
            return None
        parts = self._parts(optimizer)
        _check_rowwise(path, parts)
        # As the one-process resume: the state comes back, this run's settings (lr, ...)
        # stay (load puts the saved ones in the groups).
        kept = [[{k: v for k, v in g.items() if k != "params"} for g in part.param_groups]
                for part in parts]
        extra = sharded_checkpoint.load(path, self.model, parts, process_group=self.group)
        for part, groups in zip(parts, kept, strict=True):
            for group, settings in zip(part.param_groups, groups, strict=True):
                group.update(settings)
        progress = _saved_history(SimpleNamespace(extra=extra), path)
        if progress is None:
            return 0, None, None
        if self.is_main:
            _check_same_run(extra, run, path)
        epoch, history = progress
        best_state = None
        best = _best_path(path)
        if history.best_epoch is not None and sharded_checkpoint._committed(best) is not None:
            current = copy.deepcopy(self.model.state_dict())
            sharded_checkpoint.load(best, self.model, process_group=self.group)
            best_state = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(current)
        return epoch, history, best_state


def model_group(model: nn.Module):
    """The process group ``model``'s shards live on (None: the default group), which
    :func:`fastmf.fit` then slices batches, sums and checkpoints over. ValueError when its
    sharded tables are over different groups."""
    from .modules import _ShardedTable

    default = dist.GroupMember.WORLD
    found = []
    for module in model.modules():
        if isinstance(module, ShardedMF | _ShardedTable):
            group = None if module.group is default else module.group
            if not any(group is seen for seen in found):
                found.append(group)
    if len(found) > 1:
        raise ValueError(f"fastmf.fit: {type(model).__name__}'s sharded tables are over "
                         f"{len(found)} different process groups; shard the whole model over "
                         "one (fastmf.distributed.shard(model, process_group=...))")
    return found[0] if found else None


def _check_rowwise(path: Path, parts) -> None:
    """ValueError (on every rank: each reads the same manifest) when the checkpoint's
    optimizer groups were rowwise and this run's are not, or the other way round, as the
    one-process resume refuses it."""
    records = sharded_checkpoint._read_manifest(path)[1].get("optimizers", [])
    names = {True: "'rowwise_adagrad'", False: "'adagrad'"}
    for part, record in zip(parts, records, strict=False):
        for group, saved in zip(part.param_groups, record.get("groups", []), strict=False):
            mine, theirs = group.get("rowwise"), saved.get("settings", {}).get("rowwise")
            if mine != theirs and mine is not None and theirs is not None:
                kind = type(part).__name__
                raise ValueError(
                    f"fastmf.fit: checkpoint {path} holds {kind}(rowwise={theirs}) state but "
                    f"this run's optimizer is {kind}(rowwise={mine}); resume with "
                    f"optimizer={names.get(theirs, 'the same optimizer')} or start a new "
                    "checkpoint")


def check_target(path, group=None, who: str = "fastmf.distributed") -> Path:
    """``path`` as a Path if :func:`fastmf.distributed.save` can write there, checked on
    rank 0 before training, not after the first epoch, and refused on every rank with the
    same error: ValueError when it (or its ``.best`` sibling) exists and is not a sharded
    checkpoint folder, :class:`fastmf.checkpoint.CheckpointError` (a ValueError) when it
    could not be created or written (the rules of :func:`fastmf.check_save_target`: the
    nearest existing parent must be a writable folder), and rank 0's own error (e.g. an
    OSError for a name too long) when a check itself fails. A collective."""
    path = Path(path)
    error = None
    if dist.get_rank(group) == 0:
        try:
            _check_folder(path, who)
        except Exception as exc:  # raised on every rank below
            error = exc
    sent = sharded_checkpoint._broadcast_error(error, group)
    if error is not None:
        raise error
    if sent is not None:
        raise sent
    return path


def _check_folder(path: Path, who: str) -> None:
    """Rank 0's part of :func:`check_target`."""
    from fastmf.checkpoint import CheckpointError, check_creatable

    for folder in (path, _best_path(path)):
        try:  # any other OSError (a name too long, no permission) is the answer
            os.lstat(folder)
            exists = True
        except (FileNotFoundError, NotADirectoryError):
            exists = False
        if exists and (not folder.is_dir() or (
                any(folder.iterdir()) and not sharded_checkpoint.is_sharded_checkpoint(folder))):
            raise ValueError(f"{who}={str(path)!r}: {folder} exists and is not a sharded "
                             "fastmf checkpoint (a sharded run saves with "
                             "fastmf.distributed.save)")
        if folder.is_dir():
            if not os.access(folder, os.W_OK | os.X_OK):
                raise CheckpointError(f"{who}={str(path)!r}: cannot save to {folder}: the "
                                      "folder is not writable")
            continue
        check_creatable(folder, f"{who}={str(path)!r}")


def _best_path(path: Path) -> Path:
    return path.with_name(path.name + ".best")


@torch.no_grad()
def gather_model(model: Recommender, process_group=None) -> Recommender | None:
    """An unsharded copy of the sharded ``model`` on rank 0 (None on the other ranks): a
    ``fastmf.MF`` for a :class:`ShardedMF`, else the model's class rebuilt from its config,
    with every table gathered from the shards. A collective; rank 0 must hold the full
    tables."""
    rank, w = world(process_group)
    device = sharded_checkpoint._comm_device(process_group)
    state = model.state_dict()
    full_state = {}
    for name, p in model.named_parameters():
        if not is_sharded(p):
            continue
        rows = p.fastmf_shard.num_rows
        most = local_rows(rows, 0, w)
        padded = p.detach().new_zeros((most, *p.shape[1:])).to(device)
        padded[:p.shape[0]] = p.detach().to(device)
        parts = [torch.empty_like(padded) for _ in range(w)] if rank == 0 else None
        dist.gather(padded, parts, dst=_src(process_group), group=process_group)
        if rank == 0:
            full = p.new_empty((rows, *p.shape[1:]))
            for r, part in enumerate(parts):
                full[r::w] = part[:local_rows(rows, r, w)].to(full.device)
            full_state[name] = full
    if rank != 0:
        return None
    for name, value in state.items():
        full_state.setdefault(name, value)
    if isinstance(model, ShardedMF):
        from fastmf.layers import MF

        out = MF(**model_kwargs(model.get_config()), device=model._param_device())
    else:
        out = type(model)(**model_kwargs(model.get_config()), device=model._param_device())
    out.load_state_dict(full_state)
    for attr in ("user_map", "item_map", "item_titles", "item_popularity"):
        setattr(out, attr, getattr(model, attr, None))
    out.train(model.training)
    return out
