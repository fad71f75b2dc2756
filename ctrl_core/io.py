"""Safe weight I/O: safetensors only, the one list of refused weight formats, and atomic writes of files and
folders (write beside the target, then rename over it: a reader sees the old version or the new one, never half)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)

#: Suffixes of weight formats that can hold pickles (or that we cannot vet): refused everywhere.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")


class UnsafeWeightsError(ValueError):
    """Raised for weight files that are not safetensors (pickles can run code when loaded)."""


def is_unsafe_weight_name(name: str) -> bool:
    """A file name of a refused weight format (``UNSAFE_WEIGHT_SUFFIXES``, any case)."""
    return name.lower().endswith(UNSAFE_WEIGHT_SUFFIXES)


def require_safetensors(path: str | os.PathLike) -> str:
    """Check that ``path`` exists and is a safetensors file (by its header, not only its name)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix != ".safetensors":
        raise UnsafeWeightsError(
            f"{p}: only .safetensors weights are accepted (pickled checkpoints can execute code)"
        )
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


# --- atomic writes ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` to write; when the block ends without an error the file is
    made readable as the umask allows and renamed to ``path``, on any error it is removed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are read by other users/containers
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_weights(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Save to ``path`` so that a reader sees either the old file or the complete new one, never half."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


@contextlib.contextmanager
def atomic_folder(
    dest: str | os.PathLike,
    *,
    durable: bool = True,
    clean_stale: bool = True,
    before_commit: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yield a new empty folder beside ``dest`` (same filesystem) to fill; when the block ends without an error
    it replaces ``dest`` (:func:`replace_path`), on any error it is removed and ``dest`` is left as it was.

    ``durable``: flush every file and folder to disk before the rename, and the parent after it, so that a
    crash cannot leave a renamed but empty output. ``clean_stale``: first remove the temporary and set-aside
    folders of ``dest`` that a killed writer left (``.<name>.tmp-*``, ``.<name>.old-*``); leave it off where two
    writers may fill ``dest`` at once. ``before_commit``: runs just before the rename and may raise to abandon
    the folder (a writer that lost its lease)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        for stale in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
            _remove(stale)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become dest's; this one follows the umask
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)  # the data is on disk before the rename makes it the output
        if before_commit is not None:
            before_commit()
        replace_path(tmp, dest)
        if durable:
            fsync_path(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``. An existing ``dest`` (file, folder or link) is first renamed aside, put back if
    the rename fails, and removed after it succeeds: at no moment is there nothing at ``dest`` but for the
    instant between two renames, and a failure keeps the old one."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(new, dest)
        return
    old = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to disk (a folder: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """``fsync_path`` every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(folder) / f)
        fsync_path(folder)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
