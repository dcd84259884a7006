"""Checkpoints: a folder with ``model.safetensors`` (weights, optimizer state, id maps,
titles — tensors only, so loading runs no code) and ``config.json`` (model class, shapes,
settings, training progress and checksums).

Saving
    Only into a new folder, an empty one, or an existing fastmf checkpoint
    (:func:`check_save_target`); files in the folder other than fastmf's own are never
    touched. The new files are written under temporary names inside the folder
    (``.config.json.new-<tag>``, ``.model.safetensors.new-<tag>``) and flushed to disk; then
    one ``os.replace`` puts the new ``config.json`` in place — the commit — and a second
    one the weights. ``config.json`` records the size and sha256 of its weights and the tag
    of its save, so after a crash between the two replaces loading finds the committed
    weights under their temporary name. A crash at any point leaves the previous
    checkpoint or the new one, complete; the next save removes the temporaries.

Loading
    Never trusts the files: ``config.json`` (at most 16 MiB) is checked against a schema,
    the safetensors header against the config (names, dtypes, shapes, byte ranges) before
    anything is allocated (models other than MF are first built on the "meta" device, which
    allocates nothing, to learn the tensor names, shapes and dtypes their config implies),
    and both files against the checksums written at save. Problems
    raise :class:`CheckpointError` (``FileNotFoundError`` when the folder is missing). The
    model class comes from the :data:`MODELS` registry by name; nothing the file names is
    imported or run. Format-1 checkpoints (no checksums, written by fastmf before
    checksums existed) still load, with every check but the checksums.

>>> import fastmf, tempfile, os
>>> model = fastmf.MF(10, 5, dim=4)
>>> path = model.save(os.path.join(tempfile.mkdtemp(), "ckpt"))
>>> fastmf.load(path).dim
4
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmf._version import __version__

__all__ = ["MODELS", "Checkpoint", "CheckpointError", "check_save_target", "load",
           "load_checkpoint", "register_model", "save"]

FORMAT = "fastmf-checkpoint"
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")
MAX_CONFIG_BYTES = 16 * 2**20
# safetensors' own reader refuses headers above 100 MB.
MAX_HEADER_BYTES = 100 * 2**20
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# safetensors dtype codes of the tensors fastmf writes, with their item sizes.
_ST_DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "I64": (torch.int64, 8),
              "U8": (torch.uint8, 1), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
              "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
              "BOOL": (torch.bool, 1)}
_ST_CODES = {dtype: code for code, (dtype, _) in _ST_DTYPES.items()}
# dtype names a model config may give (get_config's "dtype"), for torch.dtype arguments.
_CONFIG_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                  "float16": torch.float16, "bfloat16": torch.bfloat16}
# Limits on a generic model config (get_config()), checked before anything is built.
_MAX_CONFIG_INT = 2**40
_MAX_CONFIG_DEPTH = 8
_PENDING = re.compile(r"\.(?:config\.json|model\.safetensors)\.new-[0-9a-f]{32}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_ROWS = 2**40


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or does not match its config, or a
    save target that is not a fastmf checkpoint."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: Any
    optimizer: Any | None
    config: dict
    extra: dict = field(default_factory=dict)


# -- model registry -------------------------------------------------------------------------

MODELS: dict[str, type] = {}
"""Model classes checkpoints may name, by class name (see :func:`register_model`)."""


def register_model(cls: type) -> type:
    """Class decorator: let checkpoints name ``cls`` (by ``cls.__name__``) as their model.

    A registered :class:`fastmf.models.base.Recommender` is saved as ``get_config()`` and
    its ``state_dict()`` and rebuilt by :func:`load_checkpoint` as ``cls(**config)``;
    ``fastmf.MF`` and its subclasses keep MF's own format.
    Registering the same class again is a no-op (a class re-created by a module reload
    replaces its earlier self); another class under a taken name is refused.
    """
    if not isinstance(cls, type):
        raise TypeError(f"fastmf.checkpoint.register_model: expected a class, got "
                        f"{type(cls).__name__}")
    name = cls.__name__
    known = MODELS.get(name)
    if known is not None and known is not cls and (
            (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__)):
        raise ValueError(f"fastmf.checkpoint.register_model: the name {name!r} is taken by "
                         f"{known.__module__}.{known.__qualname__}; cannot register "
                         f"{cls.__module__}.{cls.__qualname__} under it")
    MODELS[name] = cls
    return cls


# -- raw ids and strings as tensors ----------------------------------------------------------

def _encode_strings(values) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def _decode_strings(data: torch.Tensor, offsets: torch.Tensor, name: str) -> list[str]:
    raw = data.numpy().tobytes()
    bounds = offsets.numpy()
    if len(bounds) == 0 or bounds[0] != 0 or bounds[-1] != len(raw) or (
            np.diff(bounds) < 0).any():
        raise CheckpointError(f"fastmf.load: {name}.offsets are not 0..{len(raw)} ascending")
    try:
        return [raw[bounds[k]:bounds[k + 1]].decode("utf-8") for k in range(len(bounds) - 1)]
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"fastmf.load: {name} is not valid UTF-8 ({exc})") from None


def _put_raw_ids(tensors: dict, name: str, raw_ids: np.ndarray) -> str:
    """Store raw ids as int64, float64 or UTF-8 tensors; returns the kind stored."""
    if raw_ids.dtype.kind in "iub":
        tensors[name] = torch.from_numpy(raw_ids.astype(np.int64))
        return "int"
    if raw_ids.dtype.kind == "f":
        tensors[name] = torch.from_numpy(raw_ids.astype(np.float64))
        return "float"
    if all(isinstance(v, str) for v in raw_ids.tolist()):
        tensors[name + ".utf8"], tensors[name + ".offsets"] = _encode_strings(raw_ids.tolist())
        return "str"
    raise CheckpointError(f"fastmf.save: {name} must be ints, floats or strings")


def _get_raw_ids(tensors: dict, name: str, kind: str) -> np.ndarray:
    if kind == "str":
        return np.asarray(_decode_strings(tensors[name + ".utf8"], tensors[name + ".offsets"],
                                          name), dtype=object)
    return tensors[name].numpy()


def put_data(model, tensors: dict, prefix: str = "") -> dict:
    """Add what ``model`` knows of its training data (raw-id maps, titles, item popularity)
    to ``tensors`` under ``prefix``; returns the id-map kinds ({"user": "int", ...}) the
    loader needs."""
    kinds = {}
    for side in ("user", "item"):
        id_map = getattr(model, f"{side}_map", None)
        if id_map is not None:
            kinds[side] = _put_raw_ids(tensors, f"{prefix}{side}_ids", id_map.raw_ids)
    titles = getattr(model, "item_titles", None)
    if titles:
        index = np.fromiter(titles.keys(), dtype=np.int64, count=len(titles))
        tensors[f"{prefix}titles.index"] = torch.from_numpy(index)
        tensors[f"{prefix}titles.utf8"], tensors[f"{prefix}titles.offsets"] = _encode_strings(
            titles.values())
    popularity = getattr(model, "item_popularity", None)
    if popularity is not None:
        tensors[f"{prefix}item_popularity"] = torch.as_tensor(
            np.asarray(popularity, dtype=np.int64))
    return kinds


def get_data(model, tensors: dict, kinds: dict, prefix: str = "") -> None:
    """The inverse of :func:`put_data`: set ``model``'s id maps, titles and popularity from
    ``tensors``, checking each (CheckpointError naming the tensor)."""
    from fastmf.data import IdMap

    for side, kind in kinds.items():
        raw = _get_raw_ids(tensors, f"{prefix}{side}_ids", kind)
        expected = model.num_users if side == "user" else model.num_items
        if len(raw) != expected:
            raise CheckpointError(f"fastmf.load: {prefix}{side}_ids holds {len(raw)} ids for "
                                  f"{expected} {side}s")
        try:
            setattr(model, f"{side}_map", IdMap(raw, kind=side))
        except ValueError as exc:
            raise CheckpointError(f"fastmf.load: {prefix}{side}_ids: {exc}") from None
    if f"{prefix}titles.index" in tensors:
        index = tensors[f"{prefix}titles.index"].numpy()
        if ((index < 0) | (index >= model.num_items)).any() or len(np.unique(index)) != len(
                index):
            raise CheckpointError(f"fastmf.load: {prefix}titles.index must hold distinct "
                                  f"items in [0, {model.num_items})")
        titles = _decode_strings(tensors[f"{prefix}titles.utf8"],
                                 tensors[f"{prefix}titles.offsets"], "titles")
        model.item_titles = dict(zip(index.tolist(), titles, strict=True))
    if f"{prefix}item_popularity" in tensors:
        popularity = tensors[f"{prefix}item_popularity"].numpy()
        if popularity.shape != (model.num_items,) or (popularity < 0).any():
            raise CheckpointError(f"fastmf.load: {prefix}item_popularity must hold "
                                  f"{model.num_items} non-negative counts")
        model.item_popularity = popularity


# -- save targets ---------------------------------------------------------------------------

def _open_regular(file: Path, who: str) -> int:
    """A read-only descriptor of ``file`` if it is a regular file (symlinks followed).
    O_NONBLOCK: opening a FIFO planted under our name must not hang."""
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{who}: {file} is not a regular file")
    return fd


def _read_bounded(file: Path, limit: int, who: str) -> bytes:
    fd = _open_regular(file, who)
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{who}: {file} is larger than {limit} bytes; not a fastmf "
                              "checkpoint file")
    return data


def _parse_json(data: bytes, file: Path, who: str):
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{who}: {file} is not valid UTF-8 ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{who}: {file} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal past Python's limit
        raise CheckpointError(f"{who}: {file} is not valid JSON ({exc})") from None


def _read_config(folder: Path, who: str) -> dict:
    file = folder / CONFIG
    if not os.path.lexists(file):
        raise CheckpointError(f"{who}: {folder} has no {CONFIG}; not a fastmf checkpoint")
    config = _parse_json(_read_bounded(file, MAX_CONFIG_BYTES, who), file, who)
    if not isinstance(config, dict):
        raise CheckpointError(f"{who}: {file} holds a JSON {type(config).__name__}, "
                              "expected an object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{who}: {file} is not a {FORMAT} config")
    return config


def _is_checkpoint_folder(folder: Path) -> bool:
    """Empty, a fastmf checkpoint, or only the temporaries of an interrupted first save."""
    entries = os.listdir(folder)
    if CONFIG in entries:
        try:
            _read_config(folder, "fastmf.save")
        except CheckpointError:
            return False
        return True
    return all(_PENDING.fullmatch(name) for name in entries)


def _check_target(path: Path, who: str) -> Path:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    if info is None and os.path.lexists(path):  # a link to nothing: not ours to follow
        raise CheckpointError(f"{who}: cannot save to {path}: it is a link to "
                              f"{os.readlink(path)}, which does not exist")
    if info is None:
        check_creatable(path, who)
        return path
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{who}: {path} is a file, not a fastmf checkpoint folder; "
                              "refusing to replace it")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(f"{who}: cannot save to {path}: the folder is not writable")
    if not _is_checkpoint_folder(path):
        names = sorted(os.listdir(path))
        shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise CheckpointError(
            f"{who}: refusing to save to {path}: it is not a fastmf checkpoint (it holds "
            f"{shown}) and saving never replaces other files; choose a new or empty folder")
    return path


def check_creatable(path: Path, where: str) -> None:
    """A save can create the missing folder ``path``: missing parents are created by the
    save, so the nearest existing one decides; it must be a writable folder
    (CheckpointError ``"{where}: cannot save to {path}: ..."`` otherwise)."""
    ancestor = Path(os.path.abspath(path)).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"{where}: cannot save to {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"{where}: cannot save to {path}: the folder {ancestor} is not "
                              "writable")


def check_save_target(path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a checkpoint may be saved there, else
    :class:`CheckpointError` saying why.

    Allowed: a path that does not exist yet whose nearest existing parent is a writable
    folder, an empty writable folder, or a writable folder holding a fastmf checkpoint
    (its other files are kept). Refused: a file, and a folder holding anything else. Call it
    before a long training run that ends in a save.
    """
    return _check_target(Path(path), "fastmf.check_save_target")


# -- writing --------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    fd = _open_regular(path, "fastmf.load")
    with open(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _config_digest(config: dict) -> str:
    """sha256 of ``config`` without its own digest, over a canonical JSON text (sorted keys,
    no spaces), so the digest does not depend on formatting."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialize saves into one folder across processes (advisory, where flock exists): a
    concurrent save's cleanup must not remove the other's uncommitted weights."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporaries of earlier saves (fastmf's names only, plain files only)."""
    for name in os.listdir(folder):
        if not _PENDING.fullmatch(name):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(folder / name).st_mode):
                os.unlink(folder / name)


def _is_mf(cls) -> bool:
    """MF and its subclasses keep MF's checkpoint format (named tables, schema'd config)."""
    return getattr(cls, "checkpoint_format", None) == "mf"


def _model_config(model) -> dict:
    return {
        "num_users": model.num_users, "num_items": model.num_items, "dim": model.dim,
        "bias": model.has_bias, "global_mean": model.mu, "sparse": model.sparse,
        "init_scale": model.init_scale,
        "dtype": str(model.user_factors.dtype).removeprefix("torch."),
    }


def _generic_model_config(model) -> dict:
    """``model.get_config()``, checked: JSON-able, no backend/device, within the limits
    loading enforces (so that what is saved loads)."""
    name = type(model).__name__
    config = model.get_config()
    if not isinstance(config, dict):
        raise CheckpointError(f"fastmf.save: {name}.get_config() returned a "
                              f"{type(config).__name__}, expected a dict")
    try:
        config = json.loads(json.dumps(config, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"fastmf.save: {name}.get_config() is not JSON-able: "
                              f"{exc}") from None
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"fastmf.save: {name}.get_config(): {problem}")
    return config


def _optimizer_parts(optimizer) -> tuple[str, list]:
    from fastmf.optim import CombinedOptimizer

    if isinstance(optimizer, CombinedOptimizer):
        return "CombinedOptimizer", list(optimizer.optimizers)
    return type(optimizer).__name__, [optimizer]


def _generic_optimizer(model, optimizer, tensors: dict) -> dict:
    """The JSON record of ``optimizer`` (a fastmf sparse optimizer, torch.optim.Adam or a
    CombinedOptimizer of them) over ``model``'s named parameters; its state tensors go to
    ``tensors`` as ``optimizer.<part>.<parameter>.<key>``."""
    from fastmf.nn.embedding import fused_optimizer

    kind, parts = _optimizer_parts(optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    records = []
    for k, part in enumerate(parts):
        part_type = type(part).__name__
        schema = _OPTIMIZER_PARTS.get(part_type)
        if schema is None or type(part) is not _optimizer_class(part_type):
            raise CheckpointError(
                f"fastmf.save: cannot save a {part_type}; checkpoints hold fastmf.optim "
                "SparseSGD/SparseAdagrad/SparseAdam, torch.optim.Adam or a CombinedOptimizer "
                "of them (or save its state_dict yourself)")
        groups, state = [], {}
        in_backward = False
        for group in part.param_groups:
            params = []
            for p in group["params"]:
                if id(p) not in names:
                    raise CheckpointError(f"fastmf.save: the {part_type} holds a parameter "
                                          f"that is not the model's")
                params.append(names[id(p)])
                in_backward |= fused_optimizer(p) is part
            settings = {key: group[key] for key in schema}
            if "betas" in settings:
                settings["betas"] = [float(b) for b in settings["betas"]]
            groups.append({"params": params, **settings})
            for p in group["params"]:
                entries = part.state.get(p, {})
                record = {"tensors": [], "scalars": {}}
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer.{k}.{names[id(p)]}.{key}"] = (
                            value.detach().cpu().contiguous().clone())
                        record["tensors"].append(key)
                    else:
                        record["scalars"][key] = value
                if entries:
                    state[names[id(p)]] = record
        records.append({"type": part_type, "in_backward": in_backward, "groups": groups,
                        "state": state})
    return {"type": kind, "parts": records}


def save(model, path, *, optimizer=None, extra: dict | None = None) -> Path:
    """Save ``model`` (and ``optimizer``'s state, and JSON-able ``extra``) to the folder
    ``path``, atomically. Id maps, titles and item popularity the model holds go too.

    ``path`` must pass :func:`check_save_target`; its other files are kept. The model's
    class must be registered (:func:`register_model`) so that the checkpoint can load.
    MF (and subclasses) write their tables and MF's config; every other model its
    ``get_config()`` and ``state_dict()`` (tensors ``model.<name>``). Optimizers: MF's
    SparseAdagrad/SparseSGD; for other models also SparseAdam, ``torch.optim.Adam`` and a
    :class:`fastmf.optim.CombinedOptimizer` of them (state tensors plus JSON settings).
    """
    from fastmf.optim import SparseAdagrad, SparseSGD

    path = _check_target(Path(path), "fastmf.save")
    model_class = type(model).__name__
    if MODELS.get(model_class) is not type(model):
        raise CheckpointError(
            f"fastmf.save: the model class {type(model).__module__}.{type(model).__qualname__}"
            " is not registered, so its checkpoint could not be loaded; decorate it with "
            "fastmf.checkpoint.register_model")
    tensors: dict[str, torch.Tensor] = {}
    legacy = _is_mf(type(model))
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastmf_version": __version__,
        "model_class": model_class,
        "model": _model_config(model) if legacy else _generic_model_config(model),
        "optimizer": None,
        "id_maps": {},
        "extra": extra or {},
    }
    if legacy:
        names = dict(zip(TABLES, model.tables(), strict=True))
        for name, table in names.items():
            if table is not None:
                tensors[name] = table.detach().cpu().contiguous()
    else:
        for name, value in model.state_dict().items():
            if value.dtype not in _ST_CODES:
                raise CheckpointError(f"fastmf.save: {model_class}.{name} has dtype "
                                      f"{value.dtype}, which checkpoints do not store")
            tensors[f"model.{name}"] = value.detach().cpu().contiguous().clone()
    if optimizer is not None and not legacy:
        config["optimizer"] = _generic_optimizer(model, optimizer, tensors)
    elif optimizer is not None:
        if isinstance(optimizer, SparseAdagrad):
            group = optimizer.param_groups[0]
            config["optimizer"] = {"type": "SparseAdagrad", **{
                k: group[k] for k in ("lr", "eps", "initial_accumulator_value", "rowwise")}}
            for name, table in names.items():
                if table is not None:
                    tensors[f"optimizer.{name}"] = optimizer.state_for(table).detach().cpu()
        elif isinstance(optimizer, SparseSGD):
            config["optimizer"] = {"type": "SparseSGD", "lr": optimizer.param_groups[0]["lr"]}
        else:
            raise CheckpointError(
                f"fastmf.save: cannot save a {type(optimizer).__name__}; use "
                "fastmf.optim.SparseAdagrad or SparseSGD (or save its state_dict yourself)")
    config["id_maps"] = put_data(model, tensors)
    # Round trip through JSON first: the digest is over what loading will see (string keys,
    # lists for tuples), and a value that is not JSON-able fails before anything is written.
    config = json.loads(json.dumps(config, default=_json_default))
    if not legacy:
        # What loading checks, checked now: a checkpoint that saves must load.
        _check_generic_optimizer(path / CONFIG, config.get("optimizer"))
    _write_checkpoint(path, tensors, config)
    return path


def _write_checkpoint(path: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        _fsync(path.parent)
    with _locked(path):
        _check_target(path, "fastmf.save")  # another process may have written meanwhile
        tag = uuid.uuid4().hex
        weights_tmp = path / f".{WEIGHTS}.new-{tag}"
        config_tmp = path / f".{CONFIG}.new-{tag}"
        committed = False
        try:
            save_file(tensors, weights_tmp)
            _fsync(weights_tmp)
            digest, size = _sha256_file(weights_tmp)
            config["weights"] = {"sha256": digest, "bytes": size}
            config["save_id"] = tag
            config["config_sha256"] = _config_digest(config)
            _write_file(config_tmp, json.dumps(config, indent=1).encode("utf-8"))
            _fsync(path)
            os.replace(config_tmp, path / CONFIG)
            committed = True
            _fsync(path)
            os.replace(weights_tmp, path / WEIGHTS)
            _fsync(path)
        except BaseException:
            # After the commit the new config names weights_tmp: it must stay until a later
            # save, as loading falls back to it.
            if not committed:
                for tmp in (weights_tmp, config_tmp):
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            raise
        _remove_leftovers(path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"fastmf.save: extra holds a {type(value).__name__}, not JSON-able")


# -- config schema --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _rows(v) -> bool:
    return _is_int(v) and 1 <= v <= _MAX_ROWS


def _non_negative(v) -> bool:
    return _is_number(v) and v >= 0


# key -> (check, what is expected); every key is required.
_MODEL_SCHEMA = {
    "num_users": (_rows, f"an int in [1, {_MAX_ROWS}]"),
    "num_items": (_rows, f"an int in [1, {_MAX_ROWS}]"),
    "dim": (_rows, f"an int in [1, {_MAX_ROWS}]"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "global_mean": (_is_number, "a finite number"),
    "sparse": (lambda v: isinstance(v, bool), "true or false"),
    "init_scale": (_non_negative, "a finite number >= 0"),
    "dtype": (lambda v: isinstance(v, str) and v in _DTYPES,
              " or ".join(repr(k) for k in _DTYPES)),
}
_OPTIMIZER_SCHEMAS = {
    "SparseAdagrad": {
        "lr": (_non_negative, "a finite number >= 0"),
        # > 0, as SparseAdagrad requires (0 gives 0/0 on a zero gradient and sum).
        "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "initial_accumulator_value": (_non_negative, "a finite number >= 0"),
        "rowwise": (lambda v: isinstance(v, bool), "true or false"),
    },
    "SparseSGD": {"lr": (_non_negative, "a finite number >= 0")},
}
_ID_KINDS = ("int", "float", "str")


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(file: Path, key: str, expected: str, found) -> CheckpointError:
    return CheckpointError(f"fastmf.load: {file}: {key} must be {expected}, found {_short(found)}")


def _check_section(file: Path, section: str, values, schema: dict) -> None:
    if not isinstance(values, dict):
        raise _bad(file, section, "an object", values)
    for key, (check, expected) in schema.items():
        if key not in values:
            raise CheckpointError(f"fastmf.load: {file}: {section}.{key} is missing "
                                  f"(expected {expected})")
        if not check(values[key]):
            raise _bad(file, f"{section}.{key}", expected, values[key])


def _validate_config(config: dict, file: Path) -> None:
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise _bad(file, "format_version", f"an int in [1, {FORMAT_VERSION}]", version)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"fastmf.load: checkpoint format {version} is newer than this fastmf "
            f"({__version__}) reads; upgrade fastmf")
    if not isinstance(config.get("fastmf_version", ""), str):
        raise _bad(file, "fastmf_version", "a string", config["fastmf_version"])
    name = config.get("model_class", "MF")
    if not isinstance(name, str) or name not in MODELS:
        known = ", ".join(sorted(MODELS)) or "none"
        raise CheckpointError(f"fastmf.load: {file}: unknown model class {_short(name)}; "
                              f"registered: {known}")
    if not _is_mf(MODELS[name]):
        spec = config.get("model")
        problem = _config_problem(spec) if isinstance(spec, dict) else (
            f"must be an object, found {_short(spec)}")
        if problem:
            raise CheckpointError(f"fastmf.load: {file}: model {problem}")
        _check_generic_optimizer(file, config.get("optimizer"))
    else:
        _check_section(file, "model", config.get("model"), _MODEL_SCHEMA)
    opt = config.get("optimizer")
    if opt is not None and _is_mf(MODELS[name]):
        if not isinstance(opt, dict) or not isinstance(opt.get("type"), str) or (
                opt["type"] not in _OPTIMIZER_SCHEMAS):
            kinds = " or ".join(repr(k) for k in _OPTIMIZER_SCHEMAS)
            raise _bad(file, "optimizer", f"null or an object with type {kinds}", opt)
        _check_section(file, "optimizer", opt, _OPTIMIZER_SCHEMAS[opt["type"]])
    maps = config.get("id_maps", {})
    if not isinstance(maps, dict) or not set(maps) <= {"user", "item"} or any(
            kind not in _ID_KINDS for kind in maps.values()):
        raise _bad(file, "id_maps", f"an object mapping 'user'/'item' to one of {_ID_KINDS}",
                   maps)
    if not isinstance(config.get("extra", {}), dict):
        raise _bad(file, "extra", "an object", config["extra"])
    # Format 1 had no checksums; from format 2 on they are required.
    required = version >= 2
    checks = {
        "weights": (lambda v: isinstance(v, dict) and set(v) == {"sha256", "bytes"}
                    and isinstance(v["sha256"], str) and _HEX64.fullmatch(v["sha256"])
                    and _is_int(v["bytes"]) and v["bytes"] >= 8,
                    'an object {"sha256": 64 hex digits, "bytes": int >= 8}'),
        "save_id": (lambda v: isinstance(v, str) and _HEX32.fullmatch(v), "32 hex digits"),
        "config_sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
                          "64 hex digits"),
    }
    for key, (check, expected) in checks.items():
        if key not in config:
            if required:
                raise CheckpointError(f"fastmf.load: {file}: {key} is missing (expected "
                                      f"{expected})")
        elif not check(config[key]):
            raise _bad(file, key, expected, config[key])


def _config_problem(config: dict) -> str | None:
    """What is wrong with a generic model config (``get_config()``), or None: it must give
    ``num_users``/``num_items``, not ``backend``/``device``, a known ``dtype`` name, and
    hold only JSON values of bounded depth and magnitude."""
    for key in ("num_users", "num_items"):
        if not _rows(config.get(key)):
            return f"{key} must be an int in [1, {_MAX_ROWS}], found {_short(config.get(key))}"
    for key in ("backend", "device"):
        if key in config:
            return f"holds {key!r}, which belongs to the loading call, not the config"
    if "dtype" in config and config["dtype"] not in _CONFIG_DTYPES:
        return (f"dtype must be one of {sorted(_CONFIG_DTYPES)}, found "
                f"{_short(config['dtype'])}")

    def walk(value, depth: int) -> str | None:
        if depth > _MAX_CONFIG_DEPTH:
            return f"is nested deeper than {_MAX_CONFIG_DEPTH} levels"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return None
        if isinstance(value, int):
            if abs(value) > _MAX_CONFIG_INT:
                return f"holds the int {value}, beyond +-{_MAX_CONFIG_INT}"
            return None
        if isinstance(value, float):
            return None if math.isfinite(value) else f"holds the number {value}"
        if isinstance(value, list):
            return next((p for v in value if (p := walk(v, depth + 1))), None)
        if isinstance(value, dict):
            return next((p for v in value.values() if (p := walk(v, depth + 1))), None)
        return f"holds a {type(value).__name__}"

    return walk(config, 0)


def _pair(v) -> bool:
    return (isinstance(v, list) and len(v) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in v))


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_RATE = (_non_negative, "a finite number >= 0")
# Optimizers a generic checkpoint holds: settings (all required), state tensors, scalars.
_OPTIMIZER_PARTS = {
    "SparseSGD": {"lr": _RATE, "weight_decay": _RATE},
    "SparseAdagrad": {"lr": _RATE, "eps": _RATE, "initial_accumulator_value": _RATE,
                      "rowwise": _BOOL, "weight_decay": _RATE},
    "SparseAdam": {"lr": _RATE, "betas": (_pair, "two numbers in [0, 1)"), "eps": _RATE,
                   "rowwise": _BOOL, "weight_decay": _RATE, "decoupled_weight_decay": _BOOL},
    "Adam": {"lr": _RATE, "betas": (_pair, "two numbers in [0, 1)"), "eps": _RATE,
             "weight_decay": _RATE, "amsgrad": _BOOL, "maximize": _BOOL},
}
_OPTIMIZER_STATE = {  # type -> (tensor keys, scalar keys)
    "SparseSGD": (set(), {"step"}),
    "SparseAdagrad": ({"sum"}, {"step"}),
    "SparseAdam": ({"exp_avg", "exp_avg_sq"}, {"step"}),
    "Adam": ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, set()),
}


def _optimizer_class(name: str):
    from fastmf import optim

    return torch.optim.Adam if name == "Adam" else getattr(optim, name)


def _check_generic_optimizer(file: Path, opt) -> None:
    """The JSON structure of a generic checkpoint's optimizer record (names are checked
    against the model later)."""
    if opt is None:
        return
    kinds = ["CombinedOptimizer", *_OPTIMIZER_PARTS]
    if not isinstance(opt, dict) or set(opt) != {"type", "parts"} or opt["type"] not in kinds:
        raise _bad(file, "optimizer", f'null or {{"type": one of {kinds}, "parts": [...]}}', opt)
    parts = opt["parts"]
    single = opt["type"] != "CombinedOptimizer"
    if not isinstance(parts, list) or not parts or (single and len(parts) != 1):
        raise _bad(file, "optimizer.parts", "one part per optimizer", parts)
    seen: set[str] = set()
    for k, part in enumerate(parts):
        where = f"optimizer.parts[{k}]"
        if not isinstance(part, dict) or set(part) != {"type", "in_backward", "groups",
                                                       "state"}:
            raise _bad(file, where, "an object with type, in_backward, groups, state", part)
        kind = part["type"]
        if kind not in _OPTIMIZER_PARTS or (single and kind != opt["type"]):
            raise _bad(file, f"{where}.type", f"one of {list(_OPTIMIZER_PARTS)}", kind)
        if not isinstance(part["in_backward"], bool) or (part["in_backward"]
                                                         and kind == "Adam"):
            raise _bad(file, f"{where}.in_backward", "true (fastmf optimizers) or false",
                       part["in_backward"])
        groups = part["groups"]
        if not isinstance(groups, list) or not groups:
            raise _bad(file, f"{where}.groups", "a non-empty list", groups)
        names: set[str] = set()
        for g, group in enumerate(groups):
            if not isinstance(group, dict):
                raise _bad(file, f"{where}.groups[{g}]", "an object", group)
            params = group.get("params")
            if not isinstance(params, list) or not params or not all(
                    isinstance(n, str) for n in params) or len(set(params)) != len(params):
                raise _bad(file, f"{where}.groups[{g}].params", "distinct parameter names",
                           params)
            if set(params) & (names | seen):
                raise _bad(file, f"{where}.groups[{g}].params", "names no other group holds",
                           params)
            names |= set(params)
            _check_section(file, f"{where}.groups[{g}]", group, _OPTIMIZER_PARTS[kind])
        tensor_keys, scalar_keys = _OPTIMIZER_STATE[kind]
        state = part["state"]
        if not isinstance(state, dict):
            raise _bad(file, f"{where}.state", "an object", state)
        for name, record in state.items():
            ok = (name in names and isinstance(record, dict)
                  and set(record) == {"tensors", "scalars"}
                  and isinstance(record["tensors"], list)
                  and set(record["tensors"]) <= tensor_keys
                  and len(set(record["tensors"])) == len(record["tensors"])
                  and isinstance(record["scalars"], dict)
                  and set(record["scalars"]) <= scalar_keys
                  and all(_is_int(v) and 0 <= v <= _MAX_CONFIG_INT
                          for v in record["scalars"].values()))
            if not ok:
                raise _bad(file, f"{where}.state[{name!r}]",
                           f"the state of one of the part's parameters (tensors from "
                           f"{sorted(tensor_keys)}, scalars from {sorted(scalar_keys)})", record)
        seen |= names


def _optimizer_tensors(opt: dict, params: dict) -> dict[str, tuple]:
    """Name -> (allowed dtype codes, shape) of the optimizer state tensors of a generic
    record, from the model's parameters ``params`` (name -> meta tensor)."""
    from fastmf.ops.checks import accumulation_dtype

    want = {}
    for k, part in enumerate(opt["parts"]):
        kind = part["type"]
        settings = {}
        for group in part["groups"]:
            for name in group["params"]:
                if name not in params:
                    raise CheckpointError(f"fastmf.load: the optimizer names the parameter "
                                          f"{name!r}, which the model does not have")
                settings[name] = group
        for name, record in part["state"].items():
            param, group = params[name], settings[name]
            shape = tuple(param.shape)
            acc = (_ST_CODES[accumulation_dtype(param.dtype)],) if param.is_floating_point() \
                else ()
            rows = shape[:1]
            for key in record["tensors"]:
                if kind == "Adam":
                    codes = ("F32", "F64") if key == "step" else (_ST_CODES.get(param.dtype),)
                    want_shape = () if key == "step" else shape
                elif key == "sum":
                    codes, want_shape = acc, rows if group["rowwise"] else shape
                elif key == "exp_avg_sq" and group["rowwise"] and len(shape) == 2:
                    codes, want_shape = acc, rows
                else:
                    codes, want_shape = acc, shape
                want[f"optimizer.{k}.{name}.{key}"] = (codes, want_shape)
    return want


# -- reading --------------------------------------------------------------------------------

def _weights_file(path: Path, config: dict) -> Path:
    """The weights ``config`` belongs to: ``model.safetensors``, or after a crash between a
    save's commit and its last rename, that save's pending file. Verified by checksum."""
    main = path / WEIGHTS
    record = config.get("weights")
    if record is None:
        if not os.path.lexists(main):
            raise CheckpointError(f"fastmf.load: {path} has no {WEIGHTS}; not a fastmf "
                                  "checkpoint")
        return main
    candidates = [main]
    if "save_id" in config:
        candidates.append(path / f".{WEIGHTS}.new-{config['save_id']}")
    found = None
    for file in candidates:
        if not os.path.lexists(file):
            continue
        digest, size = _sha256_file(file)  # refuses a non-regular file
        if (digest, size) == (record["sha256"], record["bytes"]):
            return file
        if found is None:
            found = (file, digest, size)
    if found is None:
        raise CheckpointError(f"fastmf.load: {path} has no {WEIGHTS}; not a fastmf checkpoint")
    file, digest, size = found
    raise CheckpointError(
        f"fastmf.load: {file} does not match the checksum in {CONFIG} (sha256 {digest[:16]}..."
        f", {size} bytes; expected {record['sha256'][:16]}..., {record['bytes']} bytes): the "
        "file is damaged or from another save")


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype code, shape) from a safetensors header, after checking that the byte
    ranges match the shapes and tile the data exactly. Reads at most the header."""
    fd = _open_regular(file, "fastmf.load")
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"fastmf.load: {file} is not a safetensors file (header "
                                  f"length {length}, file size {size})")
        header = _parse_json(f.read(length), file, "fastmf.load")
    if not isinstance(header, dict):
        raise CheckpointError(f"fastmf.load: {file}: the safetensors header is not an object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries, spans = {}, []
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (code in _ST_DTYPES and isinstance(shape, list)
                  and all(_is_int(n) and 0 <= n <= _MAX_ROWS for n in shape)
                  and _is_int(begin) and _is_int(end) and 0 <= begin <= end <= data_size
                  and end - begin == math.prod(shape) * _ST_DTYPES[code][1])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"fastmf.load: {file}: bad safetensors entry {name!r}: "
                                  f"{_short(info)}")
        entries[name] = (code, tuple(shape))
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CheckpointError(f"fastmf.load: {file}: tensor byte ranges overlap or leave "
                                  "gaps")
        position = end
    if position != data_size:
        raise CheckpointError(f"fastmf.load: {file}: {data_size - position} bytes after the "
                              "last tensor")
    return entries


def _expected_tensors(config: dict, header: dict,
                      model_tensors: dict | None = None) -> dict[str, tuple]:
    """Name -> (dtype code or codes, shape or None for free length) of every tensor
    ``config`` implies, given the optional groups ``header`` holds. ``model_tensors``: the
    model's and optimizer's tensors of a generic checkpoint (learnt from a meta build);
    None for MF's format."""
    spec = config["model"]
    users, items = spec["num_users"], spec["num_items"]
    if model_tensors is not None:
        want = dict(model_tensors)
    else:
        code = {"float32": "F32", "float64": "F64"}[spec["dtype"]]
        dim = spec["dim"]
        shapes = {"user_factors": (users, dim), "item_factors": (items, dim)}
        if spec["bias"]:
            shapes.update(user_bias=(users,), item_bias=(items,))
        want = {name: (code, shape) for name, shape in shapes.items()}
        opt = config.get("optimizer")
        if opt is not None and opt["type"] == "SparseAdagrad":
            for name, shape in shapes.items():
                want[f"optimizer.{name}"] = (code, shape[:1] if opt["rowwise"] else shape)
    for side, kind in config.get("id_maps", {}).items():
        rows = users if side == "user" else items
        if kind == "str":
            want[f"{side}_ids.utf8"] = ("U8", None)
            want[f"{side}_ids.offsets"] = ("I64", (rows + 1,))
        else:
            want[f"{side}_ids"] = ("I64" if kind == "int" else "F64", (rows,))
    if any(name.startswith("titles.") for name in header):
        count = header.get("titles.index", ("I64", (0,)))[1]
        count = count[0] if len(count) == 1 else 0
        want.update({"titles.index": ("I64", (count,)), "titles.utf8": ("U8", None),
                     "titles.offsets": ("I64", (count + 1,))})
    if "item_popularity" in header:
        want["item_popularity"] = ("I64", (items,))
    return want


def _check_header(file: Path, config: dict, header: dict,
                  model_tensors: dict | None = None) -> None:
    want = _expected_tensors(config, header, model_tensors)
    for name, (code, shape) in want.items():
        if name not in header:
            raise CheckpointError(f"fastmf.load: the checkpoint has no tensor {name!r}")
        got_code, got_shape = header[name]
        if shape is not None and got_shape != shape:
            raise CheckpointError(f"fastmf.load: {name} has shape {got_shape}, the config "
                                  f"says {shape}")
        if shape is None and len(got_shape) != 1:
            raise CheckpointError(f"fastmf.load: {name} has shape {got_shape}, expected 1-D")
        codes = code if isinstance(code, tuple) else (code,)
        if got_code not in codes:
            expected = " or ".join(str(c) for c in codes)
            raise CheckpointError(f"fastmf.load: {name} has dtype {got_code}, expected "
                                  f"{expected}")
    unknown = sorted(set(header) - set(want))
    if unknown:
        raise CheckpointError(f"fastmf.load: {file} holds tensors the config does not "
                              f"describe: {unknown[:5]}")


def model_kwargs(spec: dict) -> dict:
    """The constructor keyword arguments of a ``get_config()`` dict (its ``dtype`` name
    made a ``torch.dtype``): ``type(model)(**model_kwargs(model.get_config()))``."""
    kwargs = dict(spec)
    if "dtype" in kwargs:
        kwargs["dtype"] = _CONFIG_DTYPES[kwargs["dtype"]]
    return kwargs


def build_model(name, spec, file: Path, *, device=None, backend: str = "auto"):
    """The registered model class ``name`` built from the config ``spec`` a checkpoint
    (``file``) gives, both checked first (CheckpointError naming ``file``); its weights are
    left at their init for the caller to fill."""
    if not isinstance(name, str) or name not in MODELS:
        known = ", ".join(sorted(MODELS)) or "none"
        raise CheckpointError(f"fastmf.load: {file}: unknown model class {_short(name)}; "
                              f"registered: {known}")
    cls = MODELS[name]
    if _is_mf(cls):
        _check_section(file, "model", spec, _MODEL_SCHEMA)
        return cls(spec["num_users"], spec["num_items"], spec["dim"], bias=spec["bias"],
                   global_mean=spec["global_mean"], backend=backend, sparse=spec["sparse"],
                   init_scale=spec["init_scale"], dtype=_DTYPES[spec["dtype"]],
                   device=device)
    problem = _config_problem(spec) if isinstance(spec, dict) else (
        f"must be an object, found {_short(spec)}")
    if problem:
        raise CheckpointError(f"fastmf.load: {file}: model {problem}")
    return _build(cls, spec, file, device=device, backend=backend)


def _build(cls, spec: dict, file: Path, *, device, backend: str):
    """``cls(**config)`` on ``device``; whatever a bad config makes the constructor raise
    becomes a CheckpointError."""
    try:
        return cls(**model_kwargs(spec), backend=backend, device=device)
    except CheckpointError:
        raise
    except Exception as exc:  # the constructor is the model's: any error means a bad config
        raise CheckpointError(f"fastmf.load: {file}: cannot build {cls.__name__} from its "
                              f"config ({type(exc).__name__}: {exc})") from None


def _meta_tensors(cls, config: dict, file: Path, backend: str) -> dict[str, tuple]:
    """The tensors a generic checkpoint must hold for its model and optimizer, from the
    model built on the "meta" device (no memory is allocated)."""
    meta = _build(cls, config["model"], file, device="meta", backend=backend)
    want = {}
    for name, tensor in meta.state_dict().items():
        code = _ST_CODES.get(tensor.dtype)
        if code is None:
            raise CheckpointError(f"fastmf.load: {cls.__name__} holds {name} of dtype "
                                  f"{tensor.dtype}, which checkpoints do not store")
        want[f"model.{name}"] = (code, tuple(tensor.shape))
    if config.get("optimizer") is not None:
        params = dict(meta.named_parameters())
        want.update(_optimizer_tensors(config["optimizer"], params))
    return want


def _read(path: Path, backend: str = "auto") -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import fastmf.models  # noqa: F401  (registers the models a checkpoint may name)

    if not path.is_dir():
        raise FileNotFoundError(f"fastmf.load: no checkpoint folder at {path}")
    config = _read_config(path, "fastmf.load")
    config_file = path / CONFIG
    _validate_config(config, config_file)
    cls = MODELS[config.get("model_class", "MF")]
    model_tensors = None if _is_mf(cls) else _meta_tensors(cls, config, config_file, backend)
    weights = _weights_file(path, config)
    _check_header(weights, config, _read_header(weights), model_tensors)
    if "config_sha256" in config and _config_digest(config) != config["config_sha256"]:
        raise CheckpointError(f"fastmf.load: {config_file} does not match its checksum: it "
                              "was changed after saving or is damaged")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"fastmf.load: cannot read {weights}: {exc}") from None
    check_loaded_values(tensors.items(), weights, "fastmf.load")
    return config, tensors


# Optimizer states that are sums of squares: never negative (a negative one makes the next
# step's square root NaN).
SQUARE_STATES = ("sum", "exp_avg_sq", "max_exp_avg_sq")


def check_loaded_values(items, where, who: str) -> None:
    """Every floating tensor of ``items`` ((name, tensor) pairs) finite, and those named as
    optimizer sums of squares (the last dotted or slashed part of the name in SQUARE_STATES,
    or a table's Adagrad sum ``optimizer.<table>``) not negative. fastmf.fit refuses to train
    into NaN or inf and nothing saves such values, so a file holding them was damaged or
    edited (checksums can be recomputed), and a model loaded from it would predict NaN
    without a word (``fastmf evaluate`` printed rmse=nan)."""
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{who}: {where}: {name} holds {bad} NaN or infinite "
                                  "values; the checkpoint is damaged")
        last = name.replace("/", ".").rsplit(".", 1)[-1]
        square = last in SQUARE_STATES or (name.startswith("optimizer.") and
                                           name.count(".") == 1)
        negative = int((tensor < 0).sum()) if square else 0
        if negative:
            raise CheckpointError(f"{who}: {where}: optimizer state {name} holds {negative} "
                                  "negative values (it is a sum of squares); the checkpoint "
                                  "is damaged")


def load_checkpoint(path, *, device=None, backend: str = "auto") -> Checkpoint:
    """Model, optimizer (if saved) and config from a checkpoint folder, validated.

    Raises ``FileNotFoundError`` if ``path`` is not a folder and :class:`CheckpointError`
    for anything wrong with its contents (see the module docstring).
    """
    from fastmf.optim import SparseAdagrad, SparseSGD

    if device is not None:
        # Before reading: a device torch cannot use is the caller's error, not the file's.
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"fastmf.load: device {device!r} is not a torch device "
                             f"({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"fastmf.load: device {str(device)!r}: this torch has no usable "
                             "CUDA device (torch.cuda.is_available() is False)")
    path = Path(path)
    config, tensors = _read(path, backend)
    name = config.get("model_class", "MF")
    model = build_model(name, config["model"], path / CONFIG, device=device, backend=backend)
    legacy = _is_mf(MODELS[name])
    if legacy:
        with torch.no_grad():
            for name, table in zip(TABLES, model.tables(), strict=True):
                if table is not None:
                    table.copy_(tensors[name])
    else:
        state = {name.removeprefix("model."): value for name, value in tensors.items()
                 if name.startswith("model.")}
        try:
            model.load_state_dict(state, strict=True)
        except ValueError as exc:  # a model's own checks of what it loaded
            raise CheckpointError(f"fastmf.load: {path}: {exc}") from None
    get_data(model, tensors, config.get("id_maps", {}))
    optimizer = None
    opt_spec = config.get("optimizer")
    if opt_spec is not None and not legacy:
        optimizer = _rebuild_optimizer(model, opt_spec, tensors)
    elif opt_spec is not None and opt_spec["type"] == "SparseAdagrad":
        settings = {k: opt_spec[k] for k in ("lr", "eps", "initial_accumulator_value",
                                             "rowwise")}
        optimizer = SparseAdagrad(model.parameters(), **settings)
        with torch.no_grad():
            for name, table in zip(TABLES, model.tables(), strict=True):
                if table is not None:
                    optimizer.state_for(table).copy_(tensors[f"optimizer.{name}"])
    elif opt_spec is not None:
        optimizer = SparseSGD(model.parameters(), lr=opt_spec["lr"])
    return Checkpoint(model=model, optimizer=optimizer, config=config,
                      extra=config.get("extra", {}))


def _rebuild_optimizer(model, record: dict, tensors: dict):
    """The optimizer of a generic record over ``model``'s parameters, with its state."""
    from fastmf import optim

    params = dict(model.named_parameters())
    parts = []
    for k, part in enumerate(record["parts"]):
        cls = _optimizer_class(part["type"])
        groups = []
        for group in part["groups"]:
            settings = {key: group[key] for key in _OPTIMIZER_PARTS[part["type"]]}
            if "betas" in settings:
                settings["betas"] = tuple(settings["betas"])
            groups.append({"params": [params[name] for name in group["params"]], **settings})
        optimizer = cls(groups)
        for name, entry in part["state"].items():
            param = params[name]
            state = optimizer.state[param]
            for key in entry["tensors"]:
                value = tensors[f"optimizer.{k}.{name}.{key}"]
                if key in state and isinstance(state[key], torch.Tensor):
                    with torch.no_grad():
                        state[key].copy_(value)
                else:
                    state[key] = value.to(param.device if key != "step" else "cpu")
            state.update(entry["scalars"])
        if part["in_backward"]:
            optim.apply_in_backward(optimizer)
        parts.append(optimizer)
    if record["type"] == "CombinedOptimizer":
        return optim.CombinedOptimizer(parts)
    return parts[0]


def load(path, *, device=None, backend: str = "auto"):
    """The model saved in the checkpoint folder ``path`` (with its id maps and titles)."""
    return load_checkpoint(path, device=device, backend=backend).model
