"""Sharded checkpoints: every rank writes its rows, one manifest describes the whole, and
loading re-shards to any world size.

Layout of a checkpoint folder ``path``::

    path/CURRENT                      {"version": "v-<tag>"}: the committed version
    path/v-<tag>/manifest.json        world size, row map, tables, optimizer settings
    path/v-<tag>/dense.safetensors    replicated parameters, buffers, their optimizer state
    path/v-<tag>/shard-00000.safetensors ...  each rank's rows and their optimizer state

Saving (a collective) writes the version into a temporary folder ``path/.tmp-<tag>``: each
rank its shard, then rank 0 the dense file and the manifest, every file flushed to disk.
The ranks agree that all writes succeeded (an ``all_reduce`` of error flags, so a failure
on one rank raises on every rank and nobody waits forever), then rank 0 renames the folder
to ``path/v-<tag>`` and commits with one ``os.replace`` of ``CURRENT``. A crash or error at
any point before that replace leaves ``CURRENT`` naming the previous version, complete; the
next save removes the leftovers. The folder must be on storage every rank can see (one host,
or a shared file system).

Loading (a collective) reads the manifest, checks the model's tables against it (names,
global shapes, dtypes) and gives each rank the rows ``g`` with ``g % W == rank`` for the
current world size ``W``, read from whichever old shards hold them in chunks of rows, so no
rank ever holds more than its shard plus one chunk. Optimizer states of sharded tables are
re-sharded the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fastmf.checkpoint import (
    _ST_DTYPES,
    MAX_CONFIG_BYTES,
    CheckpointError,
    _fsync,
    _parse_json,
    _read_bounded,
    check_loaded_values,
    get_data,
    put_data,
)

from .modules import is_sharded
from .routing import local_rows, world

__all__ = ["load", "load_model", "save"]

FORMAT = "fastmf-sharded-1"
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
# Prefix, in the dense file, of the raw-id maps, titles and popularity (rank 0's).
DATA = "data/"
_CHUNK_ROWS = 1 << 20
# The names save() gives a version and its temporary folder (secrets.token_hex(6)): CURRENT
# must name one of these, and only entries so named are ever removed.
_VERSION = re.compile(r"v-[0-9a-f]{12}")
_LEFTOVER = re.compile(r"(\.tmp-|v-)[0-9a-f]{12}")


@contextlib.contextmanager
def _open(file: Path):
    """A checkpoint's safetensors file; one that safetensors cannot read (truncated, a bad
    header) raises CheckpointError naming it."""
    try:
        handle = safe_open(file, framework="pt")
    except SafetensorError as exc:
        raise CheckpointError(f"fastmf.distributed.load: cannot read {file}: {exc}") from None
    with handle as f:
        yield f


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _write_json(path: Path, value) -> None:
    with open(path, "x", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    _fsync(path)


def _agree(ok: bool, group, device) -> bool:
    """True when ``ok`` holds on every rank (one all_reduce)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, group=group)
    return int(flag) == 0


def _broadcast_str(value: str | None, group) -> str:
    box = [value]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _portable(error: BaseException) -> BaseException:
    """``error`` if it pickles back as itself (same type and text), else a RuntimeError
    with its type and text: what :func:`_broadcast_error` can send."""
    try:
        back = pickle.loads(pickle.dumps(error))
        if type(back) is type(error) and str(back) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any pickling failure: send the text
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def _broadcast_error(error: BaseException | None, group) -> BaseException | None:
    """Rank 0's ``error`` (None: no error) on every rank, of the same type and text where
    it pickles (:func:`_portable`); a collective."""
    box = [None if error is None else _portable(error)]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _comm_device(group):
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _optimizer_parts(model: nn.Module, optimizer, index: int):
    """(sharded tensors, dense tensors, JSON record) of one optimizer's state."""
    names = _names(model)
    sharded, dense, record = {}, {}, {"class": type(optimizer).__name__, "groups": [],
                                      "scalars": {}}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("fastmf.distributed.save: an optimizer holds a parameter "
                                 "that is not in the model")
            params.append(names[id(p)])
        settings = {k: v for k, v in group.items() if k != "params"}
        record["groups"].append({"params": params, "settings": settings})
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for key, value in state.items():
            full = f"optim{index}/{name}/{key}"
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                (sharded if is_sharded(p) else dense)[full] = value
            elif isinstance(value, torch.Tensor):
                dense[full] = value
            else:
                record["scalars"][full] = value
    return sharded, dense, record


def _remove_leftovers(path: Path, keep: str | None) -> None:
    """Remove the versions and temporaries of earlier saves other than ``keep``: only
    folders named as save() names them."""
    for entry in os.listdir(path):
        if entry == keep or not _LEFTOVER.fullmatch(entry):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path / entry)


def _read_object(file: Path, who: str) -> dict:
    """A JSON object from a checkpoint file, read within MAX_CONFIG_BYTES."""
    value = _parse_json(_read_bounded(file, MAX_CONFIG_BYTES, who), file, who)
    if not isinstance(value, dict):
        raise CheckpointError(f"{who}: {file} holds a JSON {type(value).__name__}, expected "
                              "an object")
    return value


def _committed(path: Path, who: str = "fastmf.distributed.load") -> str | None:
    """The version CURRENT names (None without CURRENT), checked: a name save() gives, of a
    folder of ``path`` holding a manifest. Anything else is not a sharded checkpoint (or a
    damaged one), and neither loading nor saving goes on: saving removes the other
    versions' folders, which must not be a user's."""
    file = path / CURRENT
    if not os.path.lexists(file):
        return None
    version = _read_object(file, who).get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise CheckpointError(f"{who}: {file} names version {version!r}; a sharded fastmf "
                              "checkpoint's CURRENT names a folder v-<12 hex digits> beside it")
    if not (path / version / MANIFEST).is_file():
        raise CheckpointError(f"{who}: {file} names {version}, but {path / version} holds no "
                              f"{MANIFEST}; not a complete sharded fastmf checkpoint")
    return version


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a sharded checkpoint: its CURRENT names one of its versions
    (:func:`_committed`). A folder that merely holds a file named CURRENT is not one, and
    must not be taken for one: saving removes the other versions' folders."""
    try:
        return _committed(folder, "fastmf.distributed") is not None
    except (CheckpointError, OSError):
        return False


def save(path, model: nn.Module, optimizers=(), *, process_group=None,
         extra: dict | None = None) -> Path:
    """Save the sharded ``model`` (and ``optimizers``' states) to the folder ``path``,
    atomically as a whole (see the module docstring). A collective: every rank calls it
    with the same ``path``. ``extra``: JSON-able data kept in the manifest (rank 0's).
    Returns the folder of the committed version."""
    rank, w = world(process_group)
    device = _comm_device(process_group)
    path = Path(path)
    error: BaseException | None = None
    tag = None
    if rank == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if any(path.iterdir()) and not (path / CURRENT).exists():
                raise FileExistsError(f"fastmf.distributed.save: {path} exists and is not a "
                                      "sharded fastmf checkpoint; refusing to write into it")
            _remove_leftovers(path, _committed(path, "fastmf.distributed.save"))
            tag = secrets.token_hex(6)
            (path / f".tmp-{tag}").mkdir()
        except Exception as exc:  # reported on every rank below
            error, tag = exc, None
    tag, sent = _broadcast_str((tag, None if error is None else _portable(error)),
                               process_group)
    if tag is None:
        if error is not None:
            raise error
        if sent is not None:  # rank 0's error, with its text, here too
            raise sent
        raise RuntimeError(f"fastmf.distributed.save: rank 0 could not prepare {path}")
    tmp = path / f".tmp-{tag}"
    try:
        shard_tensors = {name: p for name, p in model.named_parameters() if is_sharded(p)}
        dense = {name: t for name, t in model.state_dict().items()
                 if name not in shard_tensors}
        records = []
        for index, optimizer in enumerate(optimizers):
            sharded, dense_state, record = _optimizer_parts(model, optimizer, index)
            shard_tensors.update(sharded)
            dense.update(dense_state)
            records.append(record)
        _write_shard(tmp / _shard_name(rank), shard_tensors)
        if rank == 0:
            id_maps = put_data(model, dense, DATA)
            _write_tensors(tmp / DENSE, dense)
            tables = {}
            for name, p in model.named_parameters():
                if is_sharded(p):
                    tables[name] = {"rows": p.fastmf_shard.num_rows,
                                    "shape": [p.fastmf_shard.num_rows, *p.shape[1:]],
                                    "dtype": str(p.dtype).removeprefix("torch.")}
            manifest = {"format": FORMAT, "world_size": w, "row_map": "modulo",
                        "tables": tables, "optimizers": records, "extra": extra or {},
                        "id_maps": id_maps, **_model_record(model)}
            _write_json(tmp / MANIFEST, manifest)
    except Exception as exc:
        error = exc
    if not _agree(error is None, process_group, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"fastmf.distributed.save: another rank failed to write its part "
                           f"of {path}; the previous checkpoint is kept")
    final = path / f"v-{tag}"
    if rank == 0:
        try:
            _fsync(tmp)
            os.rename(tmp, final)
            _fsync(path)
            pending = path / f".{CURRENT}.new-{tag}"
            _write_json(pending, {"version": final.name})
            os.replace(pending, path / CURRENT)  # the commit
            _fsync(path)
            _remove_leftovers(path, final.name)
        except Exception as exc:
            error = exc
    if not _agree(error is None, process_group, device):
        if error is not None:
            raise error
        raise RuntimeError(f"fastmf.distributed.save: rank 0 failed to commit {path}")
    return final


def _model_record(model: nn.Module) -> dict:
    """{"model_class", "model"}: what :func:`load_model` rebuilds the model from, for a
    registered model (a sharded MF is saved as the MF it shards); {} for any other."""
    from fastmf.checkpoint import MODELS

    from .modules import ShardedMF

    name = "MF" if isinstance(model, ShardedMF) else type(model).__name__
    if name not in MODELS or not hasattr(model, "get_config"):
        return {}
    return {"model_class": name, "model": model.get_config()}


def _write_shard(file: Path, tensors: dict) -> None:
    """Write one rank's shard (a seam the tests use to fail a save midway)."""
    _write_tensors(file, tensors)


def _read_manifest(path: Path) -> tuple[Path, dict]:
    version = _committed(path)
    if version is None:
        if not path.exists():
            raise FileNotFoundError(f"fastmf.distributed.load: no checkpoint at {path}")
        raise ValueError(f"fastmf.distributed.load: {path} has no {CURRENT} file (not a "
                         "sharded fastmf checkpoint, or no save was ever committed)")
    folder = path / version
    manifest = _read_object(folder / MANIFEST, "fastmf.distributed.load")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"fastmf.distributed.load: {folder / MANIFEST} has format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("row_map") != "modulo":
        raise ValueError(f"fastmf.distributed.load: unknown row map {manifest.get('row_map')!r}")
    return folder, manifest


def _reshard(folder: Path, old_world: int, key: str, target: torch.Tensor, num_rows: int,
             rank: int, world_size: int) -> None:
    """Fill ``target`` (this rank's rows of a (num_rows, ...) tensor) from the old shards."""
    mine = local_rows(num_rows, rank, world_size)
    if target.shape[0] != mine:
        raise ValueError(f"fastmf.distributed.load: {key} holds {target.shape[0]} rows on "
                         f"rank {rank}, expected {mine}")
    filled = 0
    for old in range(old_world):
        with _open(folder / _shard_name(old)) as f:
            if key not in f.keys():
                raise ValueError(f"fastmf.distributed.load: {_shard_name(old)} has no {key}")
            part = f.get_slice(key)
            count = part.get_shape()[0]
            if count != local_rows(num_rows, old, old_world) or \
                    tuple(part.get_shape()[1:]) != tuple(target.shape[1:]):
                raise ValueError(f"fastmf.distributed.load: {key} in {_shard_name(old)} has "
                                 f"shape {part.get_shape()}, which does not fit a "
                                 f"{num_rows}-row table")
            # Old local row l is global row old + l * old_world. Chunks bound the memory a
            # rank needs beyond its shard when it reads a larger old shard.
            for start in range(0, count, _CHUNK_ROWS):
                stop = min(start + _CHUNK_ROWS, count)
                g = torch.arange(start, stop) * old_world + old
                keep = torch.remainder(g, world_size) == rank
                if not bool(keep.any()):
                    continue
                block = part[start:stop]
                target[torch.div(g[keep], world_size, rounding_mode="floor").to(
                    target.device)] = block[keep].to(device=target.device, dtype=target.dtype)
                filled += int(keep.sum())
    if filled != mine:
        raise ValueError(f"fastmf.distributed.load: {key}: found {filled} of this rank's "
                         f"{mine} rows")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@torch.no_grad()
def load(path, model: nn.Module, optimizers=(), *, process_group=None) -> dict:
    """Load a checkpoint written by :func:`save` at any world size into ``model`` (already
    sharded over ``process_group`` with the same architecture) and ``optimizers`` (built
    over it as when saved: same classes, same parameter groups). A collective. Returns the
    manifest's ``extra``.

    Raises ValueError when the tables differ from the checkpoint's (names, shapes, dtypes)
    or the optimizers do not match (before anything is written), CheckpointError (a
    ValueError) when a loaded value is NaN or infinite or an optimizer's sum of squares is
    negative (after loading: the model and optimizers then hold the damaged values),
    FileNotFoundError when there is no checkpoint. Errors are raised on every rank."""
    rank, w = world(process_group)
    device = _comm_device(process_group)
    error = None
    try:
        _load(Path(path), model, optimizers, rank, w)
    except Exception as exc:
        error = exc
    if not _agree(error is None, process_group, device):
        if error is not None:
            raise error
        raise RuntimeError("fastmf.distributed.load: another rank failed to load "
                           f"{path}; see its error")
    return _read_manifest(Path(path))[1].get("extra", {})


def _load(path: Path, model: nn.Module, optimizers, rank: int, w: int) -> None:
    folder, manifest = _read_manifest(path)
    old_world = int(manifest["world_size"])
    tables = manifest["tables"]
    params = dict(model.named_parameters())
    sharded = {n for n, p in params.items() if is_sharded(p)}
    if sharded != set(tables):
        raise ValueError(f"fastmf.distributed.load: the model's sharded tables "
                         f"{sorted(sharded)} differ from the checkpoint's {sorted(tables)}")
    for name in sorted(sharded):
        p, spec = params[name], tables[name]
        shape = [p.fastmf_shard.num_rows, *p.shape[1:]]
        if shape != spec["shape"] or _dtype_name(p) != spec["dtype"]:
            raise ValueError(f"fastmf.distributed.load: table {name} is {shape} "
                             f"{_dtype_name(p)} in the model, {spec['shape']} {spec['dtype']} "
                             "in the checkpoint")
    records = manifest["optimizers"]
    if len(records) != len(optimizers):
        raise ValueError(f"fastmf.distributed.load: the checkpoint has {len(records)} "
                         f"optimizer(s), {len(optimizers)} given")
    for index, (record, optimizer) in enumerate(zip(records, optimizers, strict=True)):
        if record["class"] != type(optimizer).__name__:
            raise ValueError(f"fastmf.distributed.load: optimizer {index} is "
                             f"{type(optimizer).__name__}, the checkpoint's is "
                             f"{record['class']}")
        names = _names(model)
        groups = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
        if groups != [g["params"] for g in record["groups"]]:
            raise ValueError(f"fastmf.distributed.load: optimizer {index}'s parameter groups "
                             "differ from the checkpoint's")
    # Everything checked: now write.
    for name in sorted(sharded):
        p = params[name]
        _reshard(folder, old_world, name, p.data, p.fastmf_shard.num_rows, rank, w)
    with _open(folder / DENSE) as f:
        dense_keys = set(f.keys())
        state = model.state_dict()
        for name, tensor in state.items():
            if name in sharded:
                continue
            if name not in dense_keys:
                raise ValueError(f"fastmf.distributed.load: the checkpoint has no {name}")
            value = f.get_tensor(name)
            if value.shape != tensor.shape:
                raise ValueError(f"fastmf.distributed.load: {name} is {tuple(tensor.shape)} in "
                                 f"the model, {tuple(value.shape)} in the checkpoint")
            tensor.copy_(value)
        model.load_state_dict(state, strict=True)
        _load_data(model, f, dense_keys, manifest)
        for index, (record, optimizer) in enumerate(zip(records, optimizers, strict=True)):
            for group, saved in zip(optimizer.param_groups, record["groups"], strict=True):
                for key, value in saved["settings"].items():
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
            optimizer.state.clear()
            for name, p in params.items():
                prefix = f"optim{index}/{name}/"
                for key, value in record["scalars"].items():
                    if key.startswith(prefix):
                        optimizer.state[p][key[len(prefix):]] = value
                for key in dense_keys:
                    if key.startswith(prefix):
                        optimizer.state[p][key[len(prefix):]] = f.get_tensor(key).to(p.device)
    for index, optimizer in enumerate(optimizers):
        with _open(folder / _shard_name(0)) as f:
            shard_keys = [k for k in f.keys() if k.startswith(f"optim{index}/")]
        for key in shard_keys:
            _, name, state_key = key.split("/", 2)
            p = params[name]
            info = p.fastmf_shard
            with _open(folder / _shard_name(0)) as f:
                row_shape = f.get_slice(key).get_shape()[1:]
                dtype = f.get_slice(key).get_dtype()
            target = torch.empty((p.shape[0], *row_shape), device=p.device,
                                 dtype=_torch_dtype(dtype))
            _reshard(folder, old_world, key, target, info.num_rows, rank, w)
            optimizer.state[p][state_key] = target
    check_loaded_values(model.state_dict().items(), folder, "fastmf.distributed.load")
    names = _names(model)
    for index, optimizer in enumerate(optimizers):
        for p, state in optimizer.state.items():
            check_loaded_values(((f"optim{index}/{names.get(id(p))}/{key}", value)
                                 for key, value in state.items()), folder,
                                "fastmf.distributed.load")


def _load_data(model: nn.Module, f, keys, manifest: dict) -> None:
    """The raw-id maps, titles and popularity of a checkpoint (none in one saved before
    they were kept) onto ``model``."""
    kinds = manifest.get("id_maps", {})
    if not isinstance(kinds, dict) or not set(kinds) <= {"user", "item"} or any(
            kind not in ("int", "float", "str") for kind in kinds.values()):
        raise ValueError(f"fastmf.distributed.load: the manifest's id_maps {kinds!r} is not "
                         "an object mapping 'user'/'item' to 'int', 'float' or 'str'")
    get_data(model, {k: f.get_tensor(k) for k in keys if k.startswith(DATA)}, kinds, DATA)


@torch.no_grad()
def load_model(path, *, device=None, backend: str = "auto") -> nn.Module:
    """The model of the sharded checkpoint ``path`` as one ordinary (unsharded) model in
    this process, with its raw-id maps: what ``fastmf recommend`` serves from after
    ``torchrun ... fastmf train --distributed --out path``. Needs no process group (every
    table is re-sharded to one rank) and the memory of the whole model. The manifest must
    name a registered model class and its config (every checkpoint :func:`save` writes for
    such a model does); both are checked before anything is built, and every table against
    the model's shapes and dtypes."""
    from fastmf.checkpoint import build_model

    path = Path(path)
    folder, manifest = _read_manifest(path)
    if "model_class" not in manifest:
        raise ValueError(f"fastmf.distributed.load_model: {folder / MANIFEST} names no model "
                         "class (the model was not a registered fastmf model); build the "
                         "sharded model and use fastmf.distributed.load")
    old_world, tables = manifest.get("world_size"), manifest.get("tables")
    if isinstance(old_world, bool) or not isinstance(old_world, int) or not (
            1 <= old_world <= 1 << 20) or not isinstance(tables, dict):
        raise ValueError(f"fastmf.distributed.load_model: {folder / MANIFEST} has a bad "
                         f"world_size {old_world!r} or tables")
    # The model's sizes come from the manifest, which is not trusted: its tables are checked
    # against the model built on the meta device (no memory) and against the files' headers
    # before the model is built for real, so a manifest naming a huge model costs nothing.
    try:
        meta = build_model(manifest["model_class"], manifest.get("model"), folder / MANIFEST,
                           device="meta", backend=backend)
    except RuntimeError as exc:  # sizes whose product overflows, even on the meta device
        raise CheckpointError(f"fastmf.distributed.load_model: {folder / MANIFEST}: the "
                              f"model it describes cannot be built ({exc})") from None
    _check_files(folder, manifest, old_world, tables, meta)
    model = build_model(manifest["model_class"], manifest.get("model"), folder / MANIFEST,
                        device="cpu", backend=backend)
    state = model.state_dict()
    for name in sorted(tables):
        _reshard(folder, old_world, name, state[name], state[name].shape[0], 0, 1)
    with _open(folder / DENSE) as f:
        keys = set(f.keys())
        for name, tensor in state.items():
            if name not in tables:
                tensor.copy_(f.get_tensor(name))
        model.load_state_dict(state, strict=True)
        _load_data(model, f, keys, manifest)
    check_loaded_values(model.state_dict().items(), folder, "fastmf.distributed.load_model")
    return model.to(device) if device is not None else model


def _check_files(folder: Path, manifest: dict, old_world: int, tables: dict,
                 meta: nn.Module) -> None:
    """load_model's checks before anything is allocated: the manifest's tables are the
    model's (names, shapes, dtypes), every shard holds its rows of each table, and the dense
    file every other tensor of the model, at the model's shapes and dtypes."""
    state = meta.state_dict()
    params = dict(meta.named_parameters())
    if not set(tables) <= set(params):
        raise ValueError(f"fastmf.distributed.load_model: the checkpoint's tables "
                         f"{sorted(tables)} are not all parameters of "
                         f"{manifest['model_class']} ({sorted(params)})")
    for name in sorted(tables):
        p = state[name]
        if tables[name] != {"rows": p.shape[0], "shape": list(p.shape),
                            "dtype": _dtype_name(p)}:
            raise ValueError(f"fastmf.distributed.load_model: table {name} is "
                             f"{list(p.shape)} {_dtype_name(p)} in the model, {tables[name]!r} "
                             "in the checkpoint")
    for old in range(old_world):
        with _open(folder / _shard_name(old)) as f:
            keys = set(f.keys())
            for name in sorted(tables):
                p = state[name]
                want = [local_rows(p.shape[0], old, old_world), *p.shape[1:]]
                got = f.get_slice(name).get_shape() if name in keys else None
                if got != want:
                    raise ValueError(f"fastmf.distributed.load_model: {_shard_name(old)} holds "
                                     f"{name} as {got}, expected {want} (rows {old}, "
                                     f"{old} + {old_world}, ... of {p.shape[0]})")
    with _open(folder / DENSE) as f:
        keys = set(f.keys())
        for name, tensor in state.items():
            if name in tables:
                continue
            if name not in keys:
                raise ValueError(f"fastmf.distributed.load_model: the checkpoint has no "
                                 f"{name}")
            part = f.get_slice(name)
            shape = list(part.get_shape())
            dtype = _ST_DTYPES.get(part.get_dtype(), (None,))[0]
            if shape != list(tensor.shape) or dtype != tensor.dtype:
                raise ValueError(f"fastmf.distributed.load_model: {name} is "
                                 f"{tuple(tensor.shape)} {tensor.dtype} in the model, "
                                 f"{tuple(shape)} {part.get_dtype()} in the checkpoint")


# The safetensors codes an optimizer state may have (of fastmf.checkpoint's table).
_STATE_CODES = ("F32", "F64", "F16", "BF16", "I64", "I32")


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _STATE_CODES:
        raise ValueError(f"fastmf.distributed.load: unsupported state dtype {name}")
    return _ST_DTYPES[name][0]

