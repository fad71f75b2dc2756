"""fetch_checkpoint through a fault-injecting HTTP proxy in front of the real local S3 server.

The proxy (tests/s3_faults.py) answers 500/503, drops connections, cuts bodies mid-stream, sends short but
well-formed bodies or flips bytes, on the first k matching requests. Retries (botocore's standard mode for
requests, our own loop for bodies) must absorb transient faults; persistent ones must fail with a clear
CheckpointError; and in no case may a partial or corrupted object reach ``dest``.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3_faults import Fault, FaultyS3Proxy
from safetensors.torch import save as st_save

from ctrl_core import checkpoints
from ctrl_core.checkpoints import CheckpointError, fetch_checkpoint, tree_sha256

MAX_ATTEMPTS = 3  # AWS_MAX_ATTEMPTS for these tests: keeps botocore's jittered backoff (1 s, 2 s, ...) short


def _st(seed: int, n: int = 4096) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return st_save({"w": torch.randn(n, generator=g)})


@pytest.fixture
def store(s3_endpoint):
    """A fresh bucket with one object ``one/unet.safetensors`` and a two-file prefix ``tree/``."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    files = {"unet.safetensors": _st(0), "sub/extra.safetensors": _st(1, 2048)}
    # "one/" is uploaded without a flexible checksum (like older SDKs and many tools): then our own size and
    # ETag checks are the only defence, and the tests below see them work. "tree/" carries botocore's CRC32.
    plain = boto3.client(
        "s3", endpoint_url=s3_endpoint, config=Config(request_checksum_calculation="when_required")
    )
    plain.put_object(Bucket=bucket, Key="one/unet.safetensors", Body=files["unet.safetensors"])
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"tree/{rel}", Body=data)
    return {
        "client": client,
        "bucket": bucket,
        "one": (f"s3://{bucket}/one/unet.safetensors", hashlib.sha256(files["unet.safetensors"]).hexdigest()),
        "tree": (
            f"s3://{bucket}/tree/",
            tree_sha256({rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}),
        ),
        "files": files,
    }


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    with FaultyS3Proxy(s3_endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
        yield p


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def _assert_verified(dest: Path, store: dict, which: str) -> None:
    """dest holds exactly the uploaded bytes (never a partial or corrupted object)."""
    if which == "one":
        assert (dest / "unet.safetensors").read_bytes() == store["files"]["unet.safetensors"]
    else:
        for rel, data in store["files"].items():
            assert (dest / rel).read_bytes() == data


# (kind, method, path filter): body faults target object GETs, not the ListObjects GET of a prefix
TRANSIENT = [
    ("status", "GET", ".safetensors", 500),
    ("status", "HEAD", "", 503),
    ("status", "GET", "list-type", 503),
    ("drop", "GET", ".safetensors", 500),
    ("drop", "HEAD", "", 500),
    ("truncate", "GET", ".safetensors", 500),
    ("short", "GET", ".safetensors", 500),
    ("corrupt", "GET", ".safetensors", 500),
]


@pytest.mark.parametrize(
    "kind,method,path,status", TRANSIENT, ids=[f"{k}-{m}-{p or 'any'}" for k, m, p, _ in TRANSIENT]
)
def test_transient_faults_are_retried(store, proxy, tmp_path, kind, method, path, status):
    which = "tree" if path == "list-type" else "one"
    source, expected = store[which]
    # one fewer than the attempts available: request faults get MAX_ATTEMPTS, bodies S3_BODY_ATTEMPTS
    k = MAX_ATTEMPTS - 1 if kind in ("status", "drop") else checkpoints.S3_BODY_ATTEMPTS - 1
    proxy.add(Fault(kind, times=k, status=status, method=method, path_contains=path))
    manifest = fetch_checkpoint(source, tmp_path / "ckpt", expected)
    assert proxy.pending() == 0, f"the faults were not all injected: {proxy.log}"
    assert manifest.sha256 == expected
    _assert_verified(tmp_path / "ckpt", store, which)
    assert _leftovers(tmp_path) == ["ckpt"]


PERSISTENT = [
    ("status", "GET", ".safetensors", "S3 error InternalError"),
    ("drop", "HEAD", "", "S3 error"),
    ("truncate", "GET", ".safetensors", "after 4 attempts"),
    ("short", "GET", ".safetensors", "the listing says"),  # HEAD size vs the (self-consistent) short body
    ("corrupt", "GET", ".safetensors", "does not match the ETag"),
]


@pytest.mark.parametrize("kind,method,path,message", PERSISTENT, ids=[k for k, *_ in PERSISTENT])
def test_persistent_faults_fail_cleanly_and_keep_the_previous_copy(
    store, proxy, tmp_path, kind, method, path, message
):
    source, _ = store["one"]
    dest = tmp_path / "ckpt"
    # a previous, good checkpoint of another source sits in dest: it must survive the failed fetch untouched
    other_source, other_sha = store["tree"]
    fetch_checkpoint(other_source, dest, other_sha)
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    proxy.add(Fault(kind, times=1000, method=method, path_contains=path))
    with pytest.raises(CheckpointError, match=message) as info:
        fetch_checkpoint(source, dest)
    assert source in str(info.value)
    assert _leftovers(tmp_path) == ["ckpt"]  # no temporary folder, no partial file beside dest
    after = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before


def test_fresh_dest_is_not_created_when_the_fetch_fails(store, proxy, tmp_path):
    proxy.add(Fault("truncate", times=1000, method="GET", path_contains="sub/extra"))
    with pytest.raises(CheckpointError, match="sub/extra.safetensors"):
        fetch_checkpoint(store["tree"][0], tmp_path / "deep" / "ckpt")
    assert _leftovers(tmp_path) == []  # not even the parent folder it had to create


def test_random_fault_schedules_never_yield_a_partial_checkpoint(store, proxy, tmp_path):
    """Mixed random schedules: success means the exact bytes; failure means no dest and no leftovers."""
    rng = random.Random(7)
    kinds = [("status", "GET"), ("status", "HEAD"), ("drop", "GET"), ("truncate", "GET"), ("short", "GET"),
             ("corrupt", "GET")]  # fmt: skip
    outcomes = []
    for i in range(4):
        proxy.clear()
        for _ in range(rng.randint(1, 3)):
            kind, method = rng.choice(kinds)
            body = kind in ("truncate", "short", "corrupt")
            proxy.add(
                Fault(
                    kind, times=rng.randint(1, 2), method=method, path_contains=".safetensors" if body else ""
                )
            )
        which = rng.choice(["one", "tree"])
        source, expected = store[which]
        dest = tmp_path / f"ckpt{i}"
        try:
            manifest = fetch_checkpoint(source, dest, expected)
        except CheckpointError:
            outcomes.append("failed")
            assert not dest.exists()
        else:
            outcomes.append("ok")
            assert manifest.sha256 == expected
            _assert_verified(dest, store, which)
        assert not [n for n in _leftovers(tmp_path) if n.startswith(".")], _leftovers(tmp_path)
    assert "ok" in outcomes


# -- keys and prefixes ------------------------------------------------------------------------------------


def test_configured_prefix_env_confines_reads(store, s3_endpoint, tmp_path, monkeypatch):
    b = store["bucket"]
    monkeypatch.setenv(checkpoints.S3_ALLOWED_PREFIX_ENV, f"s3://{b}/tree/")
    with pytest.raises(CheckpointError, match="outside the allowed prefix"):
        fetch_checkpoint(store["one"][0], tmp_path / "x")
    with pytest.raises(CheckpointError, match="outside the allowed prefix"):
        fetch_checkpoint(f"s3://{b}/", tmp_path / "x")  # the whole bucket lists one/ too
    assert _leftovers(tmp_path) == []
    assert fetch_checkpoint(store["tree"][0], tmp_path / "x").sha256 == store["tree"][1]
    # a dest already holding a disallowed source is not handed back either
    monkeypatch.delenv(checkpoints.S3_ALLOWED_PREFIX_ENV)
    fetch_checkpoint(store["one"][0], tmp_path / "y")
    monkeypatch.setenv(checkpoints.S3_ALLOWED_PREFIX_ENV, "tree/")
    with pytest.raises(CheckpointError, match="outside the allowed prefix"):
        fetch_checkpoint(store["one"][0], tmp_path / "y")
    # builtin/local sources are not S3: the setting does not apply to them
    assert fetch_checkpoint("builtin:digits", tmp_path / "z").files


_SEGMENTS = st.sampled_from(["a", "b.safetensors", "..", ".", "", "c", "%2e%2e", "..\\x"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.lists(_SEGMENTS, min_size=1, max_size=4).map("/".join), min_size=1, max_size=3))
def test_object_keys_never_escape_the_destination(store, tmp_path, keys):
    """Whatever keys sit under the prefix, every file lands inside dest under its key minus the prefix."""
    client, b = store["client"], store["bucket"]
    prefix = f"p{uuid.uuid4().hex[:8]}/"
    work = tmp_path / uuid.uuid4().hex[:8]
    work.mkdir()
    for i, key in enumerate(keys):
        client.put_object(Bucket=b, Key=prefix + key, Body=_st(i, 16))
    try:
        manifest = fetch_checkpoint(f"s3://{b}/{prefix}", work / "ckpt")
    except CheckpointError:
        assert _leftovers(work) == []
    else:
        dest = (work / "ckpt").resolve()
        for rel in manifest.files:
            assert ".." not in rel.split("/") and not rel.startswith("/")
            assert dest in (dest / rel).resolve().parents
        assert sorted(manifest.files) == sorted({k for k in keys if not k.endswith("/")})
    escaped = [p for p in tmp_path.rglob("*") if p.is_file() and "ckpt" not in p.relative_to(tmp_path).parts]
    assert escaped == []
