"""Checkpoints: a folder with ``model.safetensors`` (weights, optimizer state, id maps,
titles — tensors only, so loading runs no code) and ``config.json`` (shapes, settings,
training progress).

Saving is atomic: the folder is written under a temporary name, flushed to disk, then
renamed into place, so a crash mid-save leaves the previous checkpoint (or none), never a
broken one.

>>> import fastmf, tempfile, os
>>> model = fastmf.MF(10, 5, dim=4)
>>> path = model.save(os.path.join(tempfile.mkdtemp(), "ckpt"))
>>> fastmf.load(path).dim
4
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmf._version import __version__

FORMAT = "fastmf-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: Any
    optimizer: Any | None
    config: dict
    extra: dict = field(default_factory=dict)


# -- raw ids and strings as tensors ----------------------------------------------------------

def _encode_strings(values) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def _decode_strings(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw = data.numpy().tobytes()
    bounds = offsets.numpy()
    return [raw[bounds[k]:bounds[k + 1]].decode("utf-8") for k in range(len(bounds) - 1)]


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
        return np.asarray(_decode_strings(tensors[name + ".utf8"], tensors[name + ".offsets"]),
                          dtype=object)
    return tensors[name].numpy()


# -- writing --------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_dir(path: Path, files: dict[str, callable]) -> None:
    """Write ``files`` (name -> writer(path)) into a fresh folder and rename it to ``path``."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = parent / f".{path.name}.tmp-{tag}"
    old = parent / f".{path.name}.old-{tag}"
    tmp.mkdir()
    try:
        for name, writer in files.items():
            writer(tmp / name)
            _fsync(tmp / name)
        _fsync(tmp)
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"fastmf.save: {path} exists and is not a checkpoint folder")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save(model, path, *, optimizer=None, extra: dict | None = None) -> Path:
    """Save ``model`` (and ``optimizer``'s state, and JSON-able ``extra``) to the folder
    ``path``, atomically. Id maps, titles and item popularity the model holds go too."""
    from fastmf.optim import SparseAdagrad, SparseSGD

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    names = dict(zip(TABLES, model.tables(), strict=True))
    for name, table in names.items():
        if table is not None:
            tensors[name] = table.detach().cpu().contiguous()
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastmf_version": __version__,
        "model": {
            "num_users": model.num_users, "num_items": model.num_items, "dim": model.dim,
            "bias": model.has_bias, "global_mean": model.mu, "sparse": model.sparse,
            "init_scale": model.init_scale,
            "dtype": str(model.user_factors.dtype).removeprefix("torch."),
        },
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

    from safetensors.torch import save_file

    _atomic_write_dir(path, {
        WEIGHTS: lambda p: save_file(tensors, str(p)),
        CONFIG: lambda p: p.write_text(json.dumps(config, indent=1, default=_json_default)),
    })
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"fastmf.save: extra holds a {type(value).__name__}, not JSON-able")


# -- reading --------------------------------------------------------------------------------

def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_dir():
        raise FileNotFoundError(f"fastmf.load: no checkpoint folder at {path}")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"fastmf.load: {path} has no {name}; not a fastmf checkpoint")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"fastmf.load: {path / CONFIG} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"fastmf.load: {path / CONFIG} is not a {FORMAT} config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"fastmf.load: checkpoint format {config['format_version']} is newer than this "
            f"fastmf ({__version__}) reads; upgrade fastmf")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"fastmf.load: cannot read {path / WEIGHTS}: {exc}") from None
    return config, tensors


def _expect(tensors, name, shape, dtype):
    if name not in tensors:
        raise CheckpointError(f"fastmf.load: the checkpoint has no tensor {name!r}")
    got = tensors[name]
    if tuple(got.shape) != tuple(shape):
        raise CheckpointError(f"fastmf.load: {name} has shape {tuple(got.shape)}, the config "
                              f"says {tuple(shape)}")
    if dtype is not None and got.dtype != dtype:
        raise CheckpointError(f"fastmf.load: {name} has dtype {got.dtype}, expected {dtype}")
    return got


def load_checkpoint(path, *, device=None, backend: str = "auto") -> Checkpoint:
    """Model, optimizer (if saved) and config from a checkpoint folder, validated."""
    from fastmf.data import IdMap
    from fastmf.layers import MF
    from fastmf.optim import SparseAdagrad, SparseSGD

    path = Path(path)
    config, tensors = _read(path)
    spec = config["model"]
    try:
        dtype = _DTYPES[spec["dtype"]]
        model = MF(spec["num_users"], spec["num_items"], spec["dim"], bias=spec["bias"],
                   global_mean=spec["global_mean"], backend=backend, sparse=spec["sparse"],
                   init_scale=spec["init_scale"], dtype=dtype, device=device)
    except KeyError as exc:
        raise CheckpointError(f"fastmf.load: config.json lacks model setting {exc}") from None
    with torch.no_grad():
        for name, table in zip(TABLES, model.tables(), strict=True):
            if table is not None:
                table.copy_(_expect(tensors, name, table.shape, dtype))
    maps = config.get("id_maps", {})
    for side, num in (("user", model.num_users), ("item", model.num_items)):
        if side in maps:
            raw = _get_raw_ids(tensors, f"{side}_ids", maps[side])
            if len(raw) != num:
                raise CheckpointError(f"fastmf.load: {len(raw)} raw {side} ids for {num} rows")
            setattr(model, f"{side}_map", IdMap(raw, kind=side))
    if "titles.index" in tensors:
        titles = _decode_strings(tensors["titles.utf8"], tensors["titles.offsets"])
        model.item_titles = dict(zip(tensors["titles.index"].tolist(), titles, strict=True))
    if "item_popularity" in tensors:
        model.item_popularity = _expect(tensors, "item_popularity", (model.num_items,),
                                        torch.int64).numpy()
    optimizer = None
    opt_spec = config.get("optimizer")
    if opt_spec and opt_spec["type"] == "SparseAdagrad":
        settings = {k: opt_spec[k] for k in ("lr", "eps", "initial_accumulator_value",
                                             "rowwise")}
        optimizer = SparseAdagrad(model.parameters(), **settings)
        with torch.no_grad():
            for name, table in zip(TABLES, model.tables(), strict=True):
                if table is not None:
                    state = optimizer.state_for(table)
                    state.copy_(_expect(tensors, f"optimizer.{name}", state.shape, dtype))
    elif opt_spec and opt_spec["type"] == "SparseSGD":
        optimizer = SparseSGD(model.parameters(), lr=opt_spec["lr"])
    return Checkpoint(model=model, optimizer=optimizer, config=config,
                      extra=config.get("extra", {}))


def load(path, *, device=None, backend: str = "auto"):
    """The model saved in the checkpoint folder ``path`` (with its id maps and titles)."""
    return load_checkpoint(path, device=device, backend=backend).model
