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
    anything is allocated, and both files against the checksums written at save. Problems
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
              "U8": (torch.uint8, 1)}
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

    A registered class is built by :func:`load_checkpoint` with ``MF``'s constructor
    arguments and saved through ``MF``'s attributes (``tables()``, ``num_users``, ...).
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
    if info is None:
        # Missing parents are created by the save; the nearest existing one decides.
        ancestor = Path(os.path.abspath(path)).parent
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CheckpointError(f"{who}: cannot save to {path}: {ancestor} is not a "
                                  "directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise CheckpointError(f"{who}: cannot save to {path}: the folder {ancestor} is "
                                  "not writable")
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


def _model_config(model) -> dict:
    return {
        "num_users": model.num_users, "num_items": model.num_items, "dim": model.dim,
        "bias": model.has_bias, "global_mean": model.mu, "sparse": model.sparse,
        "init_scale": model.init_scale,
        "dtype": str(model.user_factors.dtype).removeprefix("torch."),
    }


def save(model, path, *, optimizer=None, extra: dict | None = None) -> Path:
    """Save ``model`` (and ``optimizer``'s state, and JSON-able ``extra``) to the folder
    ``path``, atomically. Id maps, titles and item popularity the model holds go too.

    ``path`` must pass :func:`check_save_target`; its other files are kept. The model's
    class must be registered (:func:`register_model`) so that the checkpoint can load.
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
    names = dict(zip(TABLES, model.tables(), strict=True))
    for name, table in names.items():
        if table is not None:
            tensors[name] = table.detach().cpu().contiguous()
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastmf_version": __version__,
        "model_class": model_class,
        "model": _model_config(model),
        "optimizer": None,
        "id_maps": {},
        "extra": extra or {},
    }
    if optimizer is not None:
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
    for side in ("user", "item"):
        id_map = getattr(model, f"{side}_map", None)
        if id_map is not None:
            config["id_maps"][side] = _put_raw_ids(tensors, f"{side}_ids", id_map.raw_ids)
    titles = getattr(model, "item_titles", None)
    if titles:
        index = np.fromiter(titles.keys(), dtype=np.int64, count=len(titles))
        tensors["titles.index"] = torch.from_numpy(index)
        tensors["titles.utf8"], tensors["titles.offsets"] = _encode_strings(titles.values())
    popularity = getattr(model, "item_popularity", None)
    if popularity is not None:
        tensors["item_popularity"] = torch.as_tensor(np.asarray(popularity, dtype=np.int64))
    # Round trip through JSON first: the digest is over what loading will see (string keys,
    # lists for tuples), and a value that is not JSON-able fails before anything is written.
    config = json.loads(json.dumps(config, default=_json_default))
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
        "eps": (_non_negative, "a finite number >= 0"),
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
    _check_section(file, "model", config.get("model"), _MODEL_SCHEMA)
    opt = config.get("optimizer")
    if opt is not None:
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


def _expected_tensors(config: dict, header: dict) -> dict[str, tuple[str, tuple | None]]:
    """Name -> (dtype code, shape or None for free length) of every tensor ``config``
    implies, given the optional groups ``header`` holds."""
    spec = config["model"]
    code = {"float32": "F32", "float64": "F64"}[spec["dtype"]]
    users, items, dim = spec["num_users"], spec["num_items"], spec["dim"]
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


def _check_header(file: Path, config: dict, header: dict) -> None:
    want = _expected_tensors(config, header)
    for name, (code, shape) in want.items():
        if name not in header:
            raise CheckpointError(f"fastmf.load: the checkpoint has no tensor {name!r}")
        got_code, got_shape = header[name]
        if shape is not None and got_shape != shape:
            raise CheckpointError(f"fastmf.load: {name} has shape {got_shape}, the config "
                                  f"says {shape}")
        if shape is None and len(got_shape) != 1:
            raise CheckpointError(f"fastmf.load: {name} has shape {got_shape}, expected 1-D")
        if got_code != code:
            raise CheckpointError(f"fastmf.load: {name} has dtype {got_code}, expected {code}")
    unknown = sorted(set(header) - set(want))
    if unknown:
        raise CheckpointError(f"fastmf.load: {file} holds tensors the config does not "
                              f"describe: {unknown[:5]}")


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_dir():
        raise FileNotFoundError(f"fastmf.load: no checkpoint folder at {path}")
    config = _read_config(path, "fastmf.load")
    config_file = path / CONFIG
    _validate_config(config, config_file)
    weights = _weights_file(path, config)
    _check_header(weights, config, _read_header(weights))
    if "config_sha256" in config and _config_digest(config) != config["config_sha256"]:
        raise CheckpointError(f"fastmf.load: {config_file} does not match its checksum: it "
                              "was changed after saving or is damaged")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"fastmf.load: cannot read {weights}: {exc}") from None
    return config, tensors


def load_checkpoint(path, *, device=None, backend: str = "auto") -> Checkpoint:
    """Model, optimizer (if saved) and config from a checkpoint folder, validated.

    Raises ``FileNotFoundError`` if ``path`` is not a folder and :class:`CheckpointError`
    for anything wrong with its contents (see the module docstring).
    """
    from fastmf.data import IdMap
    from fastmf.optim import SparseAdagrad, SparseSGD

    path = Path(path)
    config, tensors = _read(path)
    spec = config["model"]
    dtype = _DTYPES[spec["dtype"]]
    cls = MODELS[config.get("model_class", "MF")]
    model = cls(spec["num_users"], spec["num_items"], spec["dim"], bias=spec["bias"],
                global_mean=spec["global_mean"], backend=backend, sparse=spec["sparse"],
                init_scale=spec["init_scale"], dtype=dtype, device=device)
    with torch.no_grad():
        for name, table in zip(TABLES, model.tables(), strict=True):
            if table is not None:
                table.copy_(tensors[name])
    for side, kind in config.get("id_maps", {}).items():
        raw = _get_raw_ids(tensors, f"{side}_ids", kind)
        try:
            setattr(model, f"{side}_map", IdMap(raw, kind=side))
        except ValueError as exc:
            raise CheckpointError(f"fastmf.load: {side}_ids: {exc}") from None
    if "titles.index" in tensors:
        index = tensors["titles.index"].numpy()
        if ((index < 0) | (index >= model.num_items)).any() or len(np.unique(index)) != len(
                index):
            raise CheckpointError(f"fastmf.load: titles.index must hold distinct items in "
                                  f"[0, {model.num_items})")
        titles = _decode_strings(tensors["titles.utf8"], tensors["titles.offsets"], "titles")
        model.item_titles = dict(zip(index.tolist(), titles, strict=True))
    if "item_popularity" in tensors:
        popularity = tensors["item_popularity"].numpy()
        if (popularity < 0).any():
            raise CheckpointError("fastmf.load: item_popularity holds negative counts")
        model.item_popularity = popularity
    optimizer = None
    opt_spec = config.get("optimizer")
    if opt_spec is not None and opt_spec["type"] == "SparseAdagrad":
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


def load(path, *, device=None, backend: str = "auto"):
    """The model saved in the checkpoint folder ``path`` (with its id maps and titles)."""
    return load_checkpoint(path, device=device, backend=backend).model
