"""A checkpoint from S3 or an S3-compatible store: the client, the plan of objects to read, and verified
downloads with retries.

``s3://bucket/key`` names one object, or everything under a prefix (a key ending in ``/``, or a key that is not
an object, is read as the prefix ``key/``). The endpoint comes from ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``, so MinIO and other S3-compatible stores work. Every object
key is checked before anything is written (no absolute keys, no ``.``/``..`` segments, nothing outside the
requested or the allowed prefix), the pipeline's file selection (layout.py) and the refused weight formats
apply before any download, and every body is verified (its size, its ETag's MD5, its sha256 metadata).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .layout import CheckpointError, refuse_unsafe, select_pipeline_files

S3_ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
#: Operator-configured S3 prefix (``s3://bucket/prefix/`` or a key prefix): when set, s3:// checkpoints are
#: read only from under it (the ``allowed_prefix`` argument, when given, takes precedence).
S3_ALLOWED_PREFIX_ENV = "CTRL_S3_ALLOWED_PREFIX"
#: Attempts per S3 request (botocore "standard" retries: 5xx, throttling, dropped connections, with jittered
#: exponential backoff). The body of a GetObject is retried separately (``S3_BODY_ATTEMPTS``).
S3_MAX_ATTEMPTS = 5
#: GetObject attempts when the *body* fails (dropped mid-stream, truncated, corrupted): botocore's own retries
#: (``S3_MAX_ATTEMPTS``) stop once the response headers arrive, so the body is retried here.
#: Why not s3transfer (boto3's download_file): it does not check a body against the listed/HEAD size, the
#: ETag's MD5 or a sha256 in the metadata (a short but well-formed or a corrupted body passes), does not retry a
#: body that fails botocore's CRC check (FlexibleChecksumError), and retries dropped bodies at once without
#: backoff; checks around it would make two nested retry loops whose attempts differ from this one budget.
S3_BODY_ATTEMPTS = 4
_BODY_BACKOFF_S = 0.1  # base of the exponential backoff between body attempts (with full jitter)
_CHUNK = 1 << 20


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


def s3_client():
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


def s3_fetcher(source: str, allowed_prefix: str | None) -> Callable[[Path], list[str]]:
    """``fetch(tmp)`` for an ``s3://`` source: writes the selected objects under ``tmp`` and returns the skipped
    ones (see ``layout.select_pipeline_files``). The cheap key and prefix checks happen here, at once."""
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

        client = s3_client()
        try:
            objects = _plan(client, source, bucket, key)
            for obj_key, _, _ in objects:
                if not allowed_key(obj_key):
                    raise CheckpointError(
                        f"{source}: object s3://{bucket}/{obj_key} is outside the allowed prefix {allowed_prefix!r}"
                    )
            keep, skipped = select_pipeline_files([rel for _, rel, _ in objects])
            kept = set(keep)
            objects = [o for o in objects if o[1] in kept]
            refuse_unsafe(source, [rel for _, rel, _ in objects])  # before downloading anything
            for obj_key, rel, size in objects:
                _download(client, source, bucket, obj_key, tmp, rel, size)
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


def _plan(client, source: str, bucket: str, key: str) -> list[tuple[str, str, int | None]]:
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


def _download(client, source: str, bucket: str, key: str, tmp: Path, rel: str, listed: int | None) -> None:
    """Download one object to ``tmp/rel``, verified; a failed attempt's partial file is removed.

    Verified: bytes received == ``ContentLength`` == the listed / HEAD size; the MD5 in a single-part ``ETag``
    (not for SSE-KMS/SSE-C objects, whose ETag is not an MD5); the ``sha256`` user metadata when present.
    A dropped or truncated body, or a mismatch, is retried ``S3_BODY_ATTEMPTS`` times with jittered
    exponential backoff; then it raises :class:`CheckpointError` and nothing is left at ``tmp/rel``.
    """
    out = tmp.joinpath(*rel.split("/"))
    root = tmp.resolve()
    if root not in out.resolve().parents:  # belt and braces after _safe_relpath
        raise CheckpointError(f"{source}: object key {key!r} would be written outside the destination")
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"s3://{bucket}/{key}"
    retryable = (*_body_errors(), _IntegrityError)
    for attempt in range(1, S3_BODY_ATTEMPTS + 1):
        try:
            _download_once(client, source, bucket, key, out, listed, where)
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


def _download_once(
    client, source: str, bucket: str, key: str, out: Path, listed: int | None, where: str
) -> None:
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
    if (
        re.fullmatch(r"[0-9a-f]{32}", etag)
        and not sse.startswith("aws:kms")
        and not resp.get("SSECustomerAlgorithm")
    ):
        if md5.hexdigest() != etag:
            raise _IntegrityError(
                f"{source}: {where}: MD5 {md5.hexdigest()} does not match the ETag {etag} (corrupted?)"
            )
    meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
    want = (meta.get("sha256") or "").strip().lower()
    if want and want != h.hexdigest():
        raise _IntegrityError(
            f"{source}: {where}: sha256 mismatch with its metadata: expected {want}, got {h.hexdigest()}"
        )
