"""Fetch a pretrained checkpoint into a local folder, safely.

``fetch_checkpoint(source, dest, sha256=None)`` accepts

* ``builtin:<name>`` -- a checkpoint shipped with the package (only ``builtin:digits``);
* a local file or directory;
* ``s3://bucket/key`` -- one object, or everything under a prefix (a key ending in ``/``, or a key that is
  not an object, is read as the prefix ``key/``); the endpoint comes from ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``, so MinIO and other S3-compatible stores work;
* a Hugging Face id, ``hf:org/name[@revision]`` or ``org/name`` (when that is not an existing local path),
  read from the local Hugging Face cache only: nothing goes to the network at run time.

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
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .io import UnsafeWeightsError, atomic_write_json, require_safetensors, sha256_file

MANIFEST_NAME = "manifest.json"
#: Suffixes of weight formats that can hold pickles (or that we cannot vet): refused everywhere.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
HF_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model"]
BUILTIN_CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "digits": ("digits_unet.safetensors", "digits_config.json", "digits_classifier.safetensors"),
}
S3_ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
#: Operator-configured S3 prefix (``s3://bucket/prefix/`` or a key prefix): when set, s3:// checkpoints are
#: read only from under it (the ``allowed_prefix`` argument, when given, takes precedence).
S3_ALLOWED_PREFIX_ENV = "CTRL_S3_ALLOWED_PREFIX"
#: Attempts per S3 request (botocore "standard" retries: 5xx, throttling, dropped connections, with jittered
#: exponential backoff). The body of a GetObject is retried separately (``S3_BODY_ATTEMPTS``).
S3_MAX_ATTEMPTS = 5

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint could not be fetched or failed verification (the message names the source)."""


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
        _s3_fetcher(source, allowed_prefix)  # cheap key/prefix checks, even when dest is already current

    current = _existing_manifest(dest)
    if current is not None and current.source == source and (expected is None or current.sha256 == expected):
        return current

    fetch = _resolve(source, builtin_dir=builtin_dir, allowed_prefix=allowed_prefix, dest=dest)

    created = _make_parents(dest.parent)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become dest's; this one follows the umask
    try:
        skipped = fetch(tmp) or []  # fetchers return what they left out (select_pipeline_files)
        manifest = _verify_tree(tmp, source, expected)
        manifest.skipped = skipped
        atomic_write_json(manifest.to_dict(), tmp / MANIFEST_NAME)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


#: Folders of a diffusers pipeline that no step loads (Stable Diffusion's NSFW checker and its image processor).
PIPELINE_UNUSED_FOLDERS = ("safety_checker", "feature_extractor")
#: Top-level weight files of this project that a pipeline folder may carry (q-learning's data set).
PROJECT_TOP_FILES = ("data.safetensors",)
# name[-shard][.variant][-shard].safetensors: diffusers/transformers' current ("name.fp16-00001-of-00002") and
# legacy ("name-00001-of-00002.fp16") variant shard names
_WEIGHT_NAME_RE = re.compile(r"^(?P<base>[^.]+?)(?P<legacy_shard>-\d+-of-\d+)?(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                             r"(?P<shard>-\d+-of-\d+)?\.safetensors$", re.IGNORECASE)


def is_pipeline_layout(rels: list[str]) -> bool:
    """A diffusers pipeline folder: ``model_index.json`` at the top, or unet/, vae/ and text_encoder/ folders."""
    tops = {r.split("/", 1)[0] for r in rels if "/" in r}
    return "model_index.json" in rels or {"unet", "vae", "text_encoder"} <= tops


def weight_variant(names: list[str], base: str) -> str | None:
    """The variant of ``base``'s weights among a folder's file ``names`` that a loader should ask for: None when
    full-precision weights (plain or sharded) are there, else the one variant present (fp16 first)."""
    found = [m for m in map(_WEIGHT_NAME_RE.match, names) if m and m["base"] == base]
    if not found or any(not m["variant"] for m in found):
        return None
    variants = sorted({m["variant"] for m in found})
    return next((v for v in variants if v.lower() == "fp16"), variants[0])


def select_pipeline_files(rels: list[str]) -> tuple[list[str], list[str]]:
    """(files to fetch, files skipped) of a source. A diffusers pipeline folder as published on the hub carries
    much that no step loads: single-file checkpoints at the top (``v1-5-pruned.safetensors``, 4-8 GB each), the
    safety checker, pickled and Flax/TF twins of the safetensors weights, extra precisions (``.fp16``,
    ``.non_ema``) beside the full-precision weights, ONNX/OpenVINO exports, READMEs. Only safetensors weights
    (one precision per component: full, else fp16) and json/txt/model files are fetched, the same from a local
    folder, S3 or the HF cache; pickles in a folder without safetensors are kept, to be refused by name. Any
    other source is fetched whole (pickles in it are refused too)."""
    if not is_pipeline_layout(rels):
        return list(rels), []
    keep, skip = [], []
    by_folder: dict[str, list[str]] = {}
    for r in rels:
        folder, _, name = r.rpartition("/")
        weight = name.lower().endswith(".safetensors") or _is_unsafe_weight_name(name)
        if (not folder and weight and name not in PROJECT_TOP_FILES) or folder.split("/", 1)[0] in PIPELINE_UNUSED_FOLDERS:
            skip.append(r)  # a single-file checkpoint (the component folders hold the same weights), or unused
        else:
            by_folder.setdefault(folder, []).append(name)
    for folder, names in by_folder.items():
        has_safetensors = any(n.lower().endswith(".safetensors") for n in names)
        chosen = {b: weight_variant(names, b) for b in {m["base"] for m in map(_WEIGHT_NAME_RE.match, names) if m}}
        for n in names:
            m = _WEIGHT_NAME_RE.match(n)
            if m:
                ok = (m["variant"] or None) == chosen[m["base"]]
            elif _is_unsafe_weight_name(n):
                ok = not has_safetensors  # a twin of safetensors weights, or to be refused
            else:
                ok = n.lower().endswith(".safetensors") or any(fnmatch.fnmatch(n, pat) for pat in HF_ALLOW_PATTERNS)
            (keep if ok else skip).append(f"{folder}/{n}" if folder else n)
    return sorted(keep), sorted(skip)


def _is_unsafe_weight_name(name: str) -> bool:
    return name.lower().endswith(UNSAFE_WEIGHT_SUFFIXES)


def _refuse_unsafe(source: str, names: list[str]) -> None:
    bad = sorted(n for n in names if _is_unsafe_weight_name(n))
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{source}: refusing non-safetensors weights: {shown}; pickle-based formats can execute code "
            "when loaded, convert to .safetensors"
        )


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
    _refuse_unsafe(source, rels)
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


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists() and not dest.is_symlink():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _resolve(source: str, *, builtin_dir: Path | None, allowed_prefix: str | None, dest: Path) -> Callable:
    """Pick the source kind; returns ``fetch(tmp_dir)``. Cheap checks (names, existence) happen here."""
    if allowed_prefix is not None and not source.startswith("s3://"):
        raise CheckpointError(f"{source}: allowed_prefix={allowed_prefix!r} applies to s3:// sources only")
    if source.startswith("builtin:"):
        return _builtin_fetcher(source, builtin_dir)
    if source.startswith("s3://"):
        return _s3_fetcher(source, allowed_prefix)
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
                rels = sorted(Path(root, f).relative_to(src).as_posix()  # follows symlinked folders, as copytree did
                              for root, _, files in os.walk(src, followlinks=True) for f in files)
                keep, skipped = select_pipeline_files(rels)
                _refuse_unsafe(source, keep)  # before copying gigabytes
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
    """The hub cache as huggingface_hub would compute it now (its constants are frozen at import)."""
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
            _refuse_unsafe(source, wanted)  # a component with pickled weights only
        else:
            wanted = [r for r in all_rels if any(fnmatch.fnmatch(r, pat) for pat in HF_ALLOW_PATTERNS)]
        skipped = sorted(set(all_rels) - set(wanted))  # not fetched: unneeded, or not weights and configs
        if not any(r.endswith(".safetensors") for r in wanted):
            # a repo with only pickled weights: say so rather than hand back a config without weights
            _refuse_unsafe(source, all_rels)
        for rel in wanted:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snap_dir / rel, out)  # snapshot entries are symlinks into blobs/: copy contents
        return skipped

    return fetch


# -- S3 ----------------------------------------------------------------------------------------------------


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from the environment (first of ``S3_ENDPOINT_ENV_VARS`` that is set), else None."""
    for var in S3_ENDPOINT_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name) or default))
    except ValueError:
        return default


def _s3_client():
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint_url()
    config = Config(
        # AWS_MAX_ATTEMPTS is the SDKs' own knob; an explicit Config would otherwise shadow it
        retries={"max_attempts": _env_int("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS), "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores (MinIO, ...) behind a plain host name do not resolve bucket.host
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _check_key_segments(source: str, key: str) -> None:
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise CheckpointError(f"{source}: refusing unsafe object key {key!r} (absolute or odd characters)")
    if any(seg in ("..", ".") for seg in key.split("/")):
        raise CheckpointError(f"{source}: refusing object key {key!r} with '.' or '..' path segments")


def _safe_relpath(source: str, key: str, prefix: str) -> str:
    _check_key_segments(source, key)
    if not key.startswith(prefix):
        raise CheckpointError(f"{source}: object key {key!r} is outside the requested prefix {prefix!r}")
    rel = key[len(prefix) :]
    parts = rel.split("/")
    if not rel or any(p == "" for p in parts) or PurePosixPath(rel).is_absolute():
        raise CheckpointError(f"{source}: refusing object key {key!r}: empty path segment")
    return rel


def _s3_fetcher(source: str, allowed_prefix: str | None) -> Callable:
    rest = source[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CheckpointError(f"{source}: expected s3://bucket/key")
    if key:
        _check_key_segments(source, key)
    if allowed_prefix is not None:
        allowed = allowed_prefix.strip()
        requested = source if allowed.startswith("s3://") else key
        # an object-or-prefix key is checked again per object below; here catch the obvious cases early
        if not (requested.startswith(allowed) or (requested + "/").startswith(allowed)):
            raise CheckpointError(f"{source}: outside the allowed prefix {allowed_prefix!r}")

    def allowed_key(k: str) -> bool:
        if allowed_prefix is None:
            return True
        a = allowed_prefix.strip()
        return (f"s3://{bucket}/{k}" if a.startswith("s3://") else k).startswith(a)

    def fetch(tmp: Path) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = _s3_client()
        try:
            objects = _s3_plan(client, source, bucket, key)
            for obj_key, _, _ in objects:
                if not allowed_key(obj_key):
                    raise CheckpointError(
                        f"{source}: object s3://{bucket}/{obj_key} is outside the allowed prefix {allowed_prefix!r}"
                    )
            keep, skipped = select_pipeline_files([rel for _, rel, _ in objects])
            kept = set(keep)
            objects = [o for o in objects if o[1] in kept]
            _refuse_unsafe(source, [rel for _, rel, _ in objects])  # before downloading anything
            for obj_key, rel, size in objects:
                _s3_download(client, source, bucket, obj_key, tmp, rel, size)
            return skipped
        except ClientError as e:
            err = e.response.get("Error", {})
            raise CheckpointError(
                f"{source}: S3 error {err.get('Code', '?')}: {err.get('Message', e)} "
                f"(endpoint {s3_endpoint_url() or 'AWS default'})"
            ) from e
        except BotoCoreError as e:
            raise CheckpointError(
                f"{source}: S3 error: {e} (endpoint {s3_endpoint_url() or 'AWS default'})"
            ) from e

    return fetch


def _s3_plan(client, source: str, bucket: str, key: str) -> list[tuple[str, str, int | None]]:
    """[(key, relpath, listed size)]: the one object ``key``, else everything under ``key/``."""
    from botocore.exceptions import ClientError

    if key and not key.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchKey", "NotFound"):
                raise
        else:
            name = key.rsplit("/", 1)[-1]
            return [(key, _safe_relpath(source, key, key[: len(key) - len(name)]), head.get("ContentLength"))]
        prefix = key + "/"
    else:
        prefix = key
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            k = obj["Key"]
            if k.endswith("/") and obj.get("Size", 0) == 0:
                continue  # "folder" marker object
            out.append((k, _safe_relpath(source, k, prefix), obj.get("Size")))
    if not out:
        raise CheckpointError(f"{source}: no such object, and no objects under s3://{bucket}/{prefix}")
    rels = [r for _, r, _ in out]
    folders = {"/".join(r.split("/")[:i]) for r in rels for i in range(1, r.count("/") + 1)}
    clash = folders.intersection(rels)
    if clash:
        raise CheckpointError(f"{source}: keys that are both a file and a folder: {sorted(clash)}")
    return out


#: GetObject attempts when the *body* fails (dropped mid-stream, truncated, corrupted): botocore's own retries
#: (``S3_MAX_ATTEMPTS``) stop once the response headers arrive, so the body is retried here.
S3_BODY_ATTEMPTS = 4
_BODY_BACKOFF_S = 0.1  # base of the exponential backoff between body attempts (with full jitter)


def _body_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    errors: tuple[type[BaseException], ...] = (
        ResponseStreamingError, IncompleteReadError, ConnectionClosedError, ReadTimeoutError,
    )  # fmt: skip
    try:
        # botocore validates the CRC32/SHA checksums a store sends back with an object uploaded with one
        from botocore.exceptions import FlexibleChecksumError

        errors += (FlexibleChecksumError,)
    except ImportError:  # pragma: no cover - older botocore
        pass
    return errors


class _IntegrityError(CheckpointError):
    """A downloaded body does not match its length or checksum (retried, then raised)."""


def _s3_download(client, source: str, bucket: str, key: str, tmp: Path, rel: str, listed: int | None) -> None:
    """Download one object to ``tmp/rel``, verified; a failed attempt's partial file is removed.

    Verified: bytes received == ``ContentLength`` == the listed / HEAD size; the MD5 in a single-part ``ETag``
    (not for SSE-KMS/SSE-C objects, whose ETag is not an MD5); the ``sha256`` user metadata when present.
    A dropped or truncated body, or a mismatch, is retried ``S3_BODY_ATTEMPTS`` times with jittered
    exponential backoff; then it raises :class:`CheckpointError` and nothing is left at ``tmp/rel``.
    """
    import random
    import time

    out = tmp.joinpath(*rel.split("/"))
    root = tmp.resolve()
    if root not in out.resolve().parents:  # belt and braces after _safe_relpath
        raise CheckpointError(f"{source}: object key {key!r} would be written outside the destination")
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"s3://{bucket}/{key}"
    retryable = (*_body_errors(), _IntegrityError)
    for attempt in range(1, S3_BODY_ATTEMPTS + 1):
        try:
            _s3_download_once(client, source, bucket, key, out, listed, where)
            return
        except retryable as e:
            out.unlink(missing_ok=True)
            if attempt == S3_BODY_ATTEMPTS:
                if isinstance(e, CheckpointError):
                    raise CheckpointError(f"{e} (after {attempt} attempts)") from e
                raise CheckpointError(
                    f"{source}: {where}: download failed after {attempt} attempts: {type(e).__name__}: {e}"
                ) from e
            time.sleep(random.random() * _BODY_BACKOFF_S * 2 ** (attempt - 1))
        except BaseException:
            out.unlink(missing_ok=True)
            raise


def _s3_download_once(client, source: str, bucket: str, key: str, out: Path, listed: int | None, where: str) -> None:
    resp = client.get_object(Bucket=bucket, Key=key)
    length = resp.get("ContentLength")
    h = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    n = 0
    with open(out, "xb") as fh:
        for chunk in resp["Body"].iter_chunks(_CHUNK):
            fh.write(chunk)
            h.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    if length is not None and n != length:
        raise _IntegrityError(f"{source}: {where}: got {n} bytes, ContentLength says {length} (truncated?)")
    if listed is not None and n != listed:
        raise _IntegrityError(f"{source}: {where}: got {n} bytes, the listing says {listed}")
    etag = str(resp.get("ETag") or "").strip().strip('"').lower()
    sse = str(resp.get("ServerSideEncryption") or "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not sse.startswith("aws:kms") and not resp.get("SSECustomerAlgorithm"):
        if md5.hexdigest() != etag:
            raise _IntegrityError(f"{source}: {where}: MD5 {md5.hexdigest()} does not match the ETag {etag} (corrupted?)")
    meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
    want = (meta.get("sha256") or "").strip().lower()
    if want and want != h.hexdigest():
        raise _IntegrityError(
            f"{source}: {where}: sha256 mismatch with its metadata: expected {want}, got {h.hexdigest()}"
        )
