"""Checkpoints edited by hand: what the model tests load to see a tampered file refused."""

from __future__ import annotations


def resealed(path, change):
    """``change`` applied to the saved tensors of the checkpoint at ``path``, with its
    checksums recomputed: a hand-edited file that passes the integrity checks."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from fastmf import checkpoint

    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")
    data = (path / "model.safetensors").read_bytes()
    config = json.loads((path / "config.json").read_text())
    config["weights"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    config["config_sha256"] = checkpoint._config_digest(config)
    (path / "config.json").write_text(json.dumps(config))


def set_entry(name, index, value):
    """A change for :func:`resealed`: tensors[name][index] = value."""
    def change(tensors):
        tensors[name][index] = value
    return change
