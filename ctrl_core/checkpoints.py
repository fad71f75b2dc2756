"""Fetch a pretrained checkpoint into a local folder, safely.

``fetch_checkpoint(source, dest, sha256=None)`` accepts

* ``builtin:<name>`` -- a checkpoint shipped with the package (only ``builtin:digits``);
* a local file or directory;
* ``s3://bucket/key`` -- one object, or everything under a prefix (s3.py: endpoint, key checks, verified
  downloads with retries);
* a Hugging Face id, ``hf:org/name[@revision]`` or ``org/name`` (when that is not an existing local path),
  read from the local Hugging Face cache only: nothing goes to the network at run time.

Of a diffusers pipeline folder only the files a step loads are fetched, the same from every source (layout.py).
Whatever the source, the files are first put in a temporary directory next to ``dest`` (same filesystem),
checked (weights must be safetensors, by suffix and header; the expected ``sha256`` when one is given),
described in ``dest/manifest.json`` (``{source, sha256, size_bytes, files}``) and only then renamed to
``dest``. On any failure the temporary directory is removed and ``dest`` is left as it was.

The checkpoint hash (``Manifest.sha256``, the ``sha256`` argument) is :func:`tree_sha256` of the files:
for a single-file checkpoint it is simply that file's sha256 (what ``sha256sum model.safetensors`` prints);
for several files it is the sha256 of the sorted ``"relpath\\tsha256\\n"`` lines. ``manifest.json`` itself
is never part of the hash, and a top-level ``manifest.json`` in the source is replaced by ours.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import UnsafeWeightsError, atomic_folder, atomic_write_json, require_safetensors, sha256_file
from .layout import (
    HF_ALLOW_PATTERNS,
    CheckpointError,
    is_pipeline_layout,
    refuse_unsafe,
    select_pipeline_files,
)
from .s3 import S3_ALLOWED_PREFIX_ENV, S3_BODY_ATTEMPTS, s3_fetcher

__all__ = [
    "BUILTIN_CHECKPOINTS",
    "MANIFEST_NAME",
    "S3_ALLOWED_PREFIX_ENV",
    "S3_BODY_ATTEMPTS",
    "CheckpointError",
    "Manifest",
    "fetch_checkpoint",
    "tree_sha256",
]

MANIFEST_NAME = "manifest.json"
BUILTIN_CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "digits": ("digits_unet.safetensors", "digits_config.json", "digits_classifier.safetensors"),
}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class Manifest:
    source: str
    sha256: str
    size_bytes: int
    files: dict[str, str] = field(default_factory=dict)  # relpath (posix) -> sha256
    skipped: list[str] = field(default_factory=list)  # source files not fetched (see select_pipeline_files)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            source=str(d["source"]),
            sha256=str(d["sha256"]),
            size_bytes=int(d["size_bytes"]),
            files={str(k): str(v) for k, v in dict(d["files"]).items()},
            skipped=[str(x) for x in d.get("skipped", [])],
        )


def tree_sha256(files: dict[str, str]) -> str:
    """The checkpoint hash of ``{relpath: sha256}``.

    One file: that file's own sha256. Several: sha256 of the sorted ``"relpath\\tsha256\\n"`` lines (utf-8),
    so the hash covers names as well as contents and does not depend on listing order.
    """
    if not files:
        raise ValueError("tree_sha256 of an empty file set")
    if len(files) == 1:
        return next(iter(files.values()))
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]}\n".encode())
    return h.hexdigest()


def fetch_checkpoint(
    source: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    builtin_dir: Path | None = None,
    allowed_prefix: str | None = None,
) -> Manifest:
    """Materialise ``source`` in the folder ``dest`` and return its :class:`Manifest`.

    ``sha256``: the expected checkpoint hash (see :func:`tree_sha256`); a mismatch raises
    :class:`CheckpointError` naming both hashes. ``builtin_dir``: where ``builtin:`` checkpoints live
    (default ``ctrl_core.embedded.WEIGHTS_DIR``). ``allowed_prefix``: for ``s3://`` sources, every object must
    lie under it -- either a key prefix (``"models/"``) or a full ``s3://bucket/prefix`` URI; it is a plain
    string prefix, so end it with ``/`` to mean a folder. Default: ``$CTRL_S3_ALLOWED_PREFIX`` for s3://
    sources (unset: any key under the requested one).

    If ``dest`` already holds a manifest for the same source (and the same ``sha256``, when one is given)
    whose files are all still present with the recorded hashes, it is returned as is, without fetching
    anything. Otherwise the new copy replaces ``dest`` (old folder renamed away, new one renamed in, old one
    removed).
    """
    source = str(source).strip()
    if not source:
        raise CheckpointError("empty checkpoint source")
    expected = _normalise_sha256(sha256, source)
    dest = Path(dest).expanduser()
    if dest.name in ("", ".", ".."):
        dest = dest.resolve()

    if allowed_prefix is None and source.startswith("s3://"):
        allowed_prefix = os.environ.get(S3_ALLOWED_PREFIX_ENV, "").strip() or None
    if source.startswith("s3://"):
        s3_fetcher(source, allowed_prefix)  # cheap key/prefix checks, even when dest is already current

    current = _existing_manifest(dest)
    if current is not None and current.source == source and (expected is None or current.sha256 == expected):
        return current

    fetch = _resolve(source, builtin_dir=builtin_dir, allowed_prefix=allowed_prefix, dest=dest)

    created = _make_parents(dest.parent)
    try:
        # no fsync (a fetch is repeated, not resumed) and no cleaning of other writers' temporary folders: two
        # attempts of the fetch step may fill dest at once, the last rename wins
        with atomic_folder(dest, durable=False, clean_stale=False) as tmp:
            skipped = fetch(tmp) or []  # fetchers return what they left out (select_pipeline_files)
            manifest = _verify_tree(tmp, source, expected)
            manifest.skipped = skipped
            atomic_write_json(manifest.to_dict(), tmp / MANIFEST_NAME)
    except BaseException:
        for d in reversed(created):  # parents we created for dest: leave nothing behind
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return manifest


# -- common machinery ------------------------------------------------------------------------------------


def _normalise_sha256(sha256: str | None, source: str) -> str | None:
    if sha256 is None:
        return None
    s = str(sha256).strip().lower().removeprefix("sha256:")
    if not _SHA256_RE.match(s):
        raise CheckpointError(f"{source}: expected sha256 must be 64 hex digits, got {sha256!r}")
    return s


def _existing_manifest(dest: Path) -> Manifest | None:
    """The manifest of an intact previous fetch into ``dest``, else None."""
    path = dest / MANIFEST_NAME
    if not dest.is_dir() or not path.is_file():
        return None
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
        if not manifest.files or tree_sha256(manifest.files) != manifest.sha256:
            return None
        for rel, digest in manifest.files.items():
            f = dest / rel
            if not f.is_file() or f.is_symlink() or sha256_file(f) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _make_parents(parent: Path) -> list[Path]:
    """``mkdir -p parent``; returns the directories it created, outermost first."""
    missing = []
    p = parent.absolute()
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _verify_tree(root: Path, source: str, expected: str | None) -> Manifest:
    """Check every file under ``root`` and describe them. Drops a top-level manifest.json from the source."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    files: dict[str, str] = {}
    size = 0
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() or not p.is_file():
                raise CheckpointError(f"{source}: {rel} is not a regular file")
            rels.append(rel)
    if not rels:
        raise CheckpointError(f"{source}: the checkpoint is empty (no files)")
    refuse_unsafe(source, rels)
    for rel in rels:
        p = root / rel
        if rel.lower().endswith(".safetensors"):
            try:
                require_safetensors(p)
            except UnsafeWeightsError as e:
                raise CheckpointError(
                    f"{source}: refusing {rel}: not a valid safetensors file (a renamed pickle?): {e}"
                ) from e
        files[rel] = sha256_file(p)
        size += p.stat().st_size
    actual = tree_sha256(files)
    if expected is not None and actual != expected:
        kind = "file" if len(files) == 1 else "tree"
        raise CheckpointError(
            f"{source}: sha256 mismatch: expected {expected}, got {actual} ({kind} hash of {len(files)} file(s))"
        )
    return Manifest(source=source, sha256=actual, size_bytes=size, files=files)


def _resolve(source: str, *, builtin_dir: Path | None, allowed_prefix: str | None, dest: Path) -> Callable:
    """Pick the source kind; returns ``fetch(tmp_dir)``. Cheap checks (names, existence) happen here."""
    if allowed_prefix is not None and not source.startswith("s3://"):
        raise CheckpointError(f"{source}: allowed_prefix={allowed_prefix!r} applies to s3:// sources only")
    if source.startswith("builtin:"):
        return _builtin_fetcher(source, builtin_dir)
    if source.startswith("s3://"):
        return s3_fetcher(source, allowed_prefix)
    if source.startswith("hf:"):
        return _hf_fetcher(source, source[3:])
    local = Path(source).expanduser()
    if local.exists():
        return _local_fetcher(source, local, dest)
    if "://" not in source and _HF_ID_RE.match(source):
        return _hf_fetcher(source, source)
    raise CheckpointError(
        f"{source}: no such local file or directory, and not a builtin:<name>, s3://bucket/key or "
        "Hugging Face org/name source"
    )


# -- builtin and local -----------------------------------------------------------------------------------


def _builtin_fetcher(source: str, builtin_dir: Path | None) -> Callable:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_CHECKPOINTS:
        known = ", ".join(f"builtin:{k}" for k in sorted(BUILTIN_CHECKPOINTS))
        raise CheckpointError(f"{source}: unknown builtin checkpoint {name!r}; known: {known}")
    if builtin_dir is None:
        from .embedded import WEIGHTS_DIR

        builtin_dir = WEIGHTS_DIR
    folder = Path(builtin_dir)
    names = BUILTIN_CHECKPOINTS[name]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{source}: missing {', '.join(missing)} in {folder}; build the embedded model with "
            "`python -m ctrl_core.embedded`"
        )

    def fetch(tmp: Path) -> None:
        for n in names:
            shutil.copyfile(folder / n, tmp / n)

    return fetch


def _local_fetcher(source: str, path: Path, dest: Path) -> Callable:
    src = path.resolve()
    target = dest.absolute().resolve()
    if src.is_dir() and (target == src or src in target.parents):
        raise CheckpointError(f"{source}: dest {dest} is the source directory or inside it")

    def fetch(tmp: Path) -> list[str]:
        try:
            if src.is_dir():
                rels = sorted(
                    Path(root, f).relative_to(src).as_posix()  # follows symlinked folders, as copytree did
                    for root, _, files in os.walk(src, followlinks=True)
                    for f in files
                )
                keep, skipped = select_pipeline_files(rels)
                refuse_unsafe(source, keep)  # before copying gigabytes
                for rel in keep:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel, tmp / rel)  # follows symlinks: copies their contents
                return skipped
            if src.is_file():
                shutil.copyfile(src, tmp / src.name)
                return []
            raise CheckpointError(f"{source}: not a regular file or directory")
        except OSError as e:
            raise CheckpointError(f"{source}: could not copy: {e}") from e

    return fetch


# -- Hugging Face (offline, from the local cache) ----------------------------------------------------------


def _hf_cache_dir() -> str:
    """The hub cache as huggingface_hub would compute it now. Not ``huggingface_hub.constants.HF_HUB_CACHE``:
    that is read once, when the library is first imported (diffusers and transformers import it early), so an
    ``HF_HOME`` set later in the same process (a test, a notebook) would be ignored."""
    home = os.path.expandvars(
        os.path.expanduser(
            os.environ.get(
                "HF_HOME",
                os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"),
            )
        )
    )
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return os.path.expandvars(os.path.expanduser(os.environ.get("HF_HUB_CACHE", legacy)))


def _hf_fetcher(source: str, spec: str) -> Callable:
    repo_id, _, revision = spec.partition("@")
    if not _HF_ID_RE.match(repo_id):
        raise CheckpointError(f"{source}: not a Hugging Face repo id (expected org/name[@revision])")

    def fetch(tmp: Path) -> list[str]:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise CheckpointError(f"{source}: huggingface_hub is not installed") from e
        cache_dir = _hf_cache_dir()
        try:
            snap = snapshot_download(
                repo_id,
                revision=revision or None,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=HF_ALLOW_PATTERNS,
            )
        except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError, ...
            home = os.environ.get("HF_HOME", "<unset>")
            # the plain "not found" text suggests going online (local_files_only=False): not an option here
            detail = "" if type(e).__name__ == "LocalEntryNotFoundError" else f" ({type(e).__name__}: {e})"
            raise CheckpointError(
                f"{source}: {repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face "
                f"cache (HF_HOME={home}, hub cache {cache_dir}); run offline with a pre-populated cache or "
                f"use a local path / s3:// URI{detail}"
            ) from e
        snap_dir = Path(snap)
        all_rels = [p.relative_to(snap_dir).as_posix() for p in sorted(snap_dir.rglob("*")) if p.is_file()]
        if is_pipeline_layout(all_rels):
            wanted = select_pipeline_files(all_rels)[0]
            refuse_unsafe(source, wanted)  # a component with pickled weights only
        else:
            wanted = [r for r in all_rels if any(fnmatch.fnmatch(r, pat) for pat in HF_ALLOW_PATTERNS)]
        skipped = sorted(set(all_rels) - set(wanted))  # not fetched: unneeded, or not weights and configs
        if not any(r.endswith(".safetensors") for r in wanted):
            # a repo with only pickled weights: say so rather than hand back a config without weights
            refuse_unsafe(source, all_rels)
        for rel in wanted:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snap_dir / rel, out)  # snapshot entries are symlinks into blobs/: copy contents
        return skipped

    return fetch
