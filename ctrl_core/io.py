"""Safe weight I/O: safetensors only, atomic writes (write to a temporary file, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)


class UnsafeWeightsError(ValueError):
    """Raised for weight files that are not safetensors (pickles can run code when loaded)."""


def require_safetensors(path: str | os.PathLike) -> str:
    """Check that ``path`` exists and is a safetensors file (by its header, not only its name)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix != ".safetensors":
        raise UnsafeWeightsError(f"{p}: only .safetensors weights are accepted (pickled checkpoints can execute code)")
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsafeWeightsError(f"{p}: truncated, not a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000 or not fh.read(1) == b"{":
            raise UnsafeWeightsError(f"{p}: bad safetensors header")
    return str(p)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(require_safetensors(path))


def atomic_save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save to ``path`` so that a reader sees either the old file or the complete new one, never half."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are read by other users/containers
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to disk (a folder: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
