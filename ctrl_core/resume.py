"""Resumable step checkpoints: a preempted or killed step restarts where its last checkpoint left it.

A checkpoint is one folder ``<root>/<step>/<run_key>/ckpt-<iteration>/`` holding ``state.safetensors`` (every
tensor of the state: weights, optimiser moments, RNG states) and ``meta.json`` (the state's structure with
tensors replaced by references, the iteration, the run key and the sha256 of the tensor file). It is written
into a temporary folder, flushed to disk and renamed into place, so a reader sees a complete checkpoint or none.
Loading takes the newest checkpoint that verifies (its hash matches and its run key is ours) and ignores the
rest; nothing but safetensors and JSON is ever read (no pickles).

``run_key`` identifies "the same run": a hash of the step's parameters and the digests of its inputs. A
checkpoint of another run (other params, another base checkpoint) is never resumed.

Two attempts of the same run can be alive at once: a KFP retry starts while the old pod still terminates on a lost
node, or a user starts the same run twice. The folder has one writer at a time, the attempt that started last:
``acquire`` writes a lease naming it, and the writer checks the lease before every change it makes (save, clear).
An attempt that finds itself superseded raises :class:`SupersededError` and touches nothing; its work continues in
the newer attempt, which resumed from the same checkpoints. Without this the two cleared each other's temporary
folders, the first to finish deleted the other's checkpoints and snapshots, and a crash in either lost work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_folder, atomic_write_json, fsync_path, sha256_file

DEFAULT_ROOT_ENV = "CTRL_CHECKPOINT_ROOT"
DEFAULT_ROOT = ".ctrl-checkpoints"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder whose content does not match its metadata."""


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint of this run whose state this code cannot take (written by another version of the code)."""


def code_version() -> str:
    """Which code writes a checkpoint: the package version and, in the image or a checkout, the git SHA."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = f"ctrl-pipeline {version('ctrl-pipeline')}"
    except PackageNotFoundError:
        v = "ctrl-pipeline (not installed)"
    sha = os.environ.get("CTRL_GIT_SHA", "")
    return f"{v} at {sha[:12]}" if sha else v


def _layout_error(err: BaseException) -> bool:
    """Errors that mean "this state does not fit": missing or renamed keys, shapes, structure. Not out-of-memory,
    CUDA or other runtime failures, which must surface as themselves (a retry may well resume)."""
    if isinstance(err, KeyError | IndexError | TypeError | ValueError):
        return True
    text = str(err)  # nn.Module.load_state_dict's own RuntimeError
    return type(err) is RuntimeError and ("Error(s) in loading state_dict" in text or "size mismatch" in text)


def restore(store: CheckpointStore, found: tuple[int, Any, dict], load: Callable[[Any], Any]) -> Any:
    """Hand a checkpoint's state to ``load``. The run key covers parameters and inputs, not code: a new image can
    meet a checkpoint whose state layout it does not know. That is a clear error naming both versions and the
    way out, not a KeyError from deep inside the trainer."""
    iteration, state, extra = found
    try:
        return load(state)
    except Exception as err:
        if not _layout_error(err):
            raise
        written, this = extra.get("written_by", "an unrecorded version"), code_version()
        way_out = (f"It was written by {written}, this is {this}: run the version that wrote it, or set run.resume: "
                   "false to start this step over (the folder is cleared)." if written != this else
                   f"The same code ({this}) wrote it, so the checkpoint is damaged or this is a bug: please report "
                   "it; run.resume: false starts this step over (the folder is cleared).")  # fmt: skip
        raise IncompatibleCheckpointError(
            f"{store.dir}: cannot resume from its checkpoint at {iteration}: the "
            f"state does not fit this code ({type(err).__name__}: {err}). {way_out}"
        ) from err


class SupersededError(RuntimeError):
    """A newer attempt of the same run took over its checkpoint folder: this attempt must stop writing."""


# --- state <-> (tensors, JSON structure) ----------------------------------------------------------------------
def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts with str/int keys, lists, tuples, tensors, numbers, strings, None) into a flat
    tensor dict for safetensors and a JSON-able structure that refers to the tensors by key."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = path or "t"
            tensors[key] = x.detach().cpu().clone().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise TypeError(
                        f"state key {k!r} at {path or '<root>'}: only str and int keys are supported"
                    )
            return {"__dict__": [[k, enc(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot checkpoint a {type(x).__name__} at {path or '<root>'}")

    return tensors, enc(obj, "")


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: dec(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            raise CorruptCheckpointError(f"unknown node {sorted(x)} in a checkpoint structure")
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(structure)


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to persist NaN/inf: a corrupt checkpoint would poison every resume after it."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"refusing to write a checkpoint: {key} holds non-finite values")


def run_key(step: str, config: Any, inputs: Iterable[str] = ()) -> str:
    """A short stable hash of (step, its JSON-able configuration, digests of its inputs)."""
    doc = json.dumps({"step": step, "config": config, "inputs": list(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


def dir_digest(directory: str | os.PathLike) -> str:
    """Digest of a step input folder: the fetch manifest's tree hash when there is one, else every file's hash."""
    d = Path(directory)
    if d.is_file():
        return "file:" + sha256_file(d)
    if not d.is_dir():
        raise FileNotFoundError(f"step input not found: {d}")
    manifest = d / "manifest.json"
    if manifest.is_file():
        try:
            return "manifest:" + json.loads(manifest.read_text())["sha256"]
        except (ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(d).as_posix()}\t{sha256_file(f)}\n".encode())
    return "files:" + h.hexdigest()


def default_root(configured: str = "") -> Path:
    return Path(configured or os.environ.get(DEFAULT_ROOT_ENV) or DEFAULT_ROOT)


class CheckpointStore:
    """The checkpoints of one run of one step."""

    PREFIX = "ckpt-"

    LEASE = ".lease.json"

    def __init__(self, root: str | os.PathLike, step: str, key: str, keep: int = 2):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.dir = Path(root) / step / key
        self.key, self.keep = key, keep
        self.owner: str | None = None  # set by acquire(): this attempt writes only while the lease names it

    def acquire(self) -> None:
        """Become the folder's writer. The newest attempt wins: an older one still alive finds the lease gone at
        its next save or clear and stops (SupersededError)."""
        self.owner = uuid.uuid4().hex
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            self.dir / self.LEASE,
        )
        fsync_path(self.dir)

    def holder(self, folder: Path | None = None) -> dict | None:
        """The lease's content (owner, host, pid, since) in the folder (or ``folder``), or None when no attempt
        holds it (no lease, or an unreadable one: atomic writes make that another writer's doing)."""
        try:
            return json.loads(((folder or self.dir) / self.LEASE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def check(self) -> None:
        """Raise SupersededError unless this attempt holds the lease (no-op for a store that never acquired)."""
        if self.owner is None:
            return
        lease = self.holder()
        if lease is None or lease.get("owner") != self.owner:
            who = (
                f"by the attempt started {lease.get('since')} on {lease.get('host')} (pid {lease.get('pid')})"
                if lease
                else "(the lease is gone: a newer attempt cleared the folder, because it finished or "
                "started over with run.resume: false)"
            )
            raise SupersededError(
                f"{self.dir}: a newer attempt of this run took over the checkpoint folder {who}; "
                "this attempt stops without writing: the run goes on there"
            )

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(
            (p for p in self.dir.iterdir() if p.name.startswith(self.PREFIX) and p.is_dir()), reverse=True
        )

    def save(self, iteration: int, state: Any, extra: dict | None = None) -> Path:
        """Write a checkpoint for ``iteration`` atomically; keeps the newest ``keep`` checkpoints."""
        tensors, structure = flatten_state(state)
        check_finite(tensors)
        self.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        # left by a process killed while writing (or by a superseded one): temporary and set-aside folders of any
        # iteration (".tmp-*": those of earlier versions of this code)
        for stale in [*self.dir.glob(".*tmp-*"), *self.dir.glob(f".{self.PREFIX}*.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        final = self.dir / f"{self.PREFIX}{iteration:08d}"
        try:
            # flushed to disk before the rename; the lease is checked last (taken over while writing: the newer
            # attempt may already be past this iteration); re-saving an iteration (a resumed run that reached it
            # again) replaces it
            with atomic_folder(final, clean_stale=False, before_commit=self.check) as tmp:
                save_file(tensors, str(tmp / "state.safetensors"))
                meta = {
                    "iteration": iteration,
                    "run_key": self.key,
                    "structure": structure,
                    "extra": extra or {},
                    "sha256": sha256_file(tmp / "state.safetensors"),
                    "written_by": code_version(),
                }
                (tmp / "meta.json").write_text(json.dumps(meta))
        except OSError:  # a newer attempt removed our temporary folder: say so, not ENOENT
            self.check()
            raise
        for old in self._complete()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _read(self, folder: Path) -> tuple[int, Any, dict]:
        meta_path, data_path = folder / "meta.json", folder / "state.safetensors"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{folder}: unreadable meta.json ({err})") from None
        if meta.get("run_key") != self.key:
            raise CorruptCheckpointError(
                f"{folder}: belongs to run {meta.get('run_key')!r}, not {self.key!r}"
            )
        if not data_path.is_file() or sha256_file(data_path) != meta.get("sha256"):
            raise CorruptCheckpointError(f"{folder}: state.safetensors does not match its recorded sha256")
        extra = {"written_by": meta.get("written_by", "an unrecorded version"), **meta.get("extra", {})}
        return int(meta["iteration"]), unflatten_state(load_file(str(data_path)), meta["structure"]), extra

    def load(self, iteration: int) -> tuple[int, Any, dict]:
        """The checkpoint of ``iteration`` (CorruptCheckpointError if it is missing or does not verify)."""
        return self._read(self.dir / f"{self.PREFIX}{iteration:08d}")

    def latest(self) -> tuple[int, Any, dict] | None:
        """(iteration, state, extra) of the newest checkpoint that verifies, or None (extra["written_by"]: the
        code version that wrote it)."""
        for folder in self._complete():
            try:
                return self._read(folder)
            except CorruptCheckpointError:
                continue  # a damaged newest checkpoint falls back to the one before it
        return None

    def clear(self) -> None:
        """Remove the folder (checkpoints, snapshots, lease): the run's output is committed or resume is off.
        The folder is first renamed aside and the lease checked again there, so a newer attempt that took it
        over between the check and the removal gets it back instead of losing it."""
        self.check()
        if self.dir.is_dir():
            aside = self.dir.with_name(f".{self.dir.name}.clearing-{uuid.uuid4().hex[:8]}")
            os.replace(self.dir, aside)
            lease = self.holder(aside) if self.owner is not None else None
            if lease is not None and lease.get("owner") != self.owner:
                # taken over meanwhile (the newer attempt has not written since: it checks its lease before every write)
                os.replace(aside, self.dir)
                self.owner = None
                return
            shutil.rmtree(aside, ignore_errors=True)
        for stale in self.dir.parent.glob(
            f".{self.dir.name}.clearing-*"
        ):  # left by a process killed mid-clear
            shutil.rmtree(stale, ignore_errors=True)
        self.owner = None
