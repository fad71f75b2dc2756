"""fetch_checkpoint against a real local S3 server (moto over HTTP, real boto3), local paths, builtin, HF."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from ctrl_core.checkpoints import MANIFEST_NAME, CheckpointError, Manifest, fetch_checkpoint, tree_sha256


@pytest.fixture
def bucket(s3_endpoint):
    """(client, bucket name): a fresh bucket per test."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def st_bytes(seed: int = 0) -> bytes:
    return st_save({"w": torch.arange(4, dtype=torch.float32) + seed})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pickle_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def assert_nothing_left(parent: Path, before: set[str] | None = None) -> None:
    names = {p.name for p in parent.iterdir()} if parent.exists() else set()
    assert names == (before or set()), f"left behind in {parent}: {sorted(names - (before or set()))}"


def read_manifest(dest: Path) -> dict:
    return json.loads((dest / MANIFEST_NAME).read_text())


# -- S3 ------------------------------------------------------------------------------------------------


def test_s3_single_object(bucket, tmp_path):
    client, b = bucket
    data = st_bytes()
    client.put_object(Bucket=b, Key="models/v1/unet.safetensors", Body=data, Metadata={"sha256": sha(data)})
    dest = tmp_path / "out" / "ckpt"
    m = fetch_checkpoint(f"s3://{b}/models/v1/unet.safetensors", dest, sha256=sha(data))
    assert (dest / "unet.safetensors").read_bytes() == data
    assert m == Manifest(
        f"s3://{b}/models/v1/unet.safetensors", sha(data), len(data), {"unet.safetensors": sha(data)}
    )
    assert read_manifest(dest) == m.to_dict()
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST_NAME, "unet.safetensors"]
    assert_nothing_left(dest.parent, {"ckpt"})


def test_s3_prefix_with_and_without_slash(bucket, tmp_path):
    client, b = bucket
    objects = {
        "unet.safetensors": st_bytes(0),
        "config.json": b'{"a": 1}',
        "tokenizer/vocab.txt": b"a\nb\n",
    }
    for rel, body in objects.items():
        client.put_object(Bucket=b, Key=f"ckpt/{rel}", Body=body)
    client.put_object(Bucket=b, Key="ckpt/", Body=b"")  # a "folder" marker, as consoles create
    client.put_object(Bucket=b, Key="ckpt-old/model.bin", Body=b"not ours")  # sibling prefix: not included
    expected = tree_sha256({rel: sha(body) for rel, body in objects.items()})

    m = fetch_checkpoint(f"s3://{b}/ckpt", tmp_path / "a", sha256=expected)  # not an object -> prefix ckpt/
    assert m.sha256 == expected and m.files == {rel: sha(body) for rel, body in objects.items()}
    assert m.size_bytes == sum(map(len, objects.values()))
    for rel, body in objects.items():
        assert (tmp_path / "a" / rel).read_bytes() == body
    assert read_manifest(tmp_path / "a") == m.to_dict()

    m2 = fetch_checkpoint(f"s3://{b}/ckpt/", tmp_path / "b", sha256=expected.upper())
    assert m2.sha256 == expected and m2.files == m.files
    assert_nothing_left(tmp_path, {"a", "b"})


def test_s3_wrong_sha256_leaves_nothing(bucket, tmp_path):
    client, b = bucket
    data = st_bytes()
    client.put_object(Bucket=b, Key="m/unet.safetensors", Body=data)
    client.put_object(Bucket=b, Key="m/config.json", Body=b"{}")
    wrong = "0" * 64
    parent = tmp_path / "new" / "deeper"  # parents that did not exist are not left behind either
    with pytest.raises(CheckpointError) as e:
        fetch_checkpoint(f"s3://{b}/m/", parent / "ckpt", sha256=wrong)
    actual = tree_sha256({"unet.safetensors": sha(data), "config.json": sha(b"{}")})
    assert wrong in str(e.value) and actual in str(e.value) and f"s3://{b}/m/" in str(e.value)
    assert not (tmp_path / "new").exists()
    assert_nothing_left(tmp_path)

    with pytest.raises(CheckpointError, match=sha(data)):  # single object: its own file hash
        fetch_checkpoint(f"s3://{b}/m/unet.safetensors", tmp_path / "ckpt", sha256=wrong)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("bad", ["model.bin", "weights/model.pt", "x.ckpt", "flax_model.msgpack"])
def test_s3_pickle_formats_refused(bucket, tmp_path, bad):
    client, b = bucket
    client.put_object(Bucket=b, Key="c/unet.safetensors", Body=st_bytes())
    client.put_object(Bucket=b, Key=f"c/{bad}", Body=pickle_bytes())
    with pytest.raises(
        CheckpointError, match=r"refusing non-safetensors weights: .*convert to \.safetensors"
    ):
        fetch_checkpoint(f"s3://{b}/c", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="refusing non-safetensors"):
        fetch_checkpoint(f"s3://{b}/c/{bad}", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


def test_s3_renamed_pickle_refused(bucket, tmp_path):
    client, b = bucket
    client.put_object(Bucket=b, Key="p/x.safetensors", Body=pickle_bytes())
    with pytest.raises(CheckpointError, match="x.safetensors.*not a valid safetensors"):
        fetch_checkpoint(f"s3://{b}/p/x.safetensors", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "key", ["c/../evil.safetensors", "c/sub/../../evil.safetensors", "c/./x.safetensors"]
)
def test_s3_dotdot_keys_refused(bucket, tmp_path, key):
    client, b = bucket
    client.put_object(Bucket=b, Key="c/ok.safetensors", Body=st_bytes())
    client.put_object(Bucket=b, Key=key, Body=st_bytes(1))  # S3 keeps the key literally
    assert key in [o["Key"] for o in client.list_objects_v2(Bucket=b)["Contents"]]
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError, match=r"refusing object key .*path segments"):
        fetch_checkpoint(f"s3://{b}/c/", work / "ckpt")
    assert_nothing_left(work)
    assert not list(tmp_path.rglob("evil.safetensors"))


def test_s3_absolute_key_refused(bucket, tmp_path):
    client, b = bucket
    client.put_object(Bucket=b, Key="/etc/evil.safetensors", Body=st_bytes())
    with pytest.raises(CheckpointError, match="refusing unsafe object key"):
        fetch_checkpoint(f"s3://{b}/", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


def test_s3_file_and_folder_with_one_name_refused(bucket, tmp_path):
    client, b = bucket
    client.put_object(Bucket=b, Key="c/a", Body=b"x")
    client.put_object(Bucket=b, Key="c/a/b.safetensors", Body=st_bytes())
    with pytest.raises(CheckpointError, match="both a file and a folder"):
        fetch_checkpoint(f"s3://{b}/c/", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


def test_s3_allowed_prefix(bucket, tmp_path):
    client, b = bucket
    client.put_object(Bucket=b, Key="models/a.safetensors", Body=st_bytes())
    client.put_object(Bucket=b, Key="scratch/b.safetensors", Body=st_bytes())
    with pytest.raises(CheckpointError, match="outside the allowed prefix"):
        fetch_checkpoint(f"s3://{b}/scratch/b.safetensors", tmp_path / "x", allowed_prefix="models/")
    with pytest.raises(CheckpointError, match="outside the allowed prefix"):
        fetch_checkpoint(f"s3://{b}/", tmp_path / "x", allowed_prefix=f"s3://{b}/models/")
    client.put_object(Bucket=b, Key="models", Body=st_bytes())  # the object "models" is not under "models/"
    with pytest.raises(CheckpointError, match=f"object s3://{b}/models is outside the allowed prefix"):
        fetch_checkpoint(f"s3://{b}/models", tmp_path / "x", allowed_prefix="models/")
    assert_nothing_left(tmp_path)
    m = fetch_checkpoint(f"s3://{b}/models/", tmp_path / "x", allowed_prefix=f"s3://{b}/models/")
    assert list(m.files) == ["a.safetensors"]


def test_s3_metadata_sha256_verified(bucket, tmp_path):
    client, b = bucket
    client.put_object(Bucket=b, Key="c/a.safetensors", Body=st_bytes(), Metadata={"sha256": "f" * 64})
    with pytest.raises(CheckpointError, match=f"metadata: expected {'f' * 64}"):
        fetch_checkpoint(f"s3://{b}/c/", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


def test_s3_missing_object_and_bucket(bucket, tmp_path):
    _, b = bucket
    with pytest.raises(CheckpointError, match=f"s3://{b}/nothing/here.*no such object"):
        fetch_checkpoint(f"s3://{b}/nothing/here", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="s3://no-such-bucket-xyz/k.*NoSuchBucket"):
        fetch_checkpoint("s3://no-such-bucket-xyz/k", tmp_path / "ckpt")
    assert_nothing_left(tmp_path)


def test_s3_idempotent_then_replaced(bucket, tmp_path):
    client, b = bucket
    data = st_bytes()
    client.put_object(Bucket=b, Key="c/a.safetensors", Body=data)
    client.put_object(Bucket=b, Key="c/config.json", Body=b"{}")
    dest = tmp_path / "ckpt"
    m = fetch_checkpoint(f"s3://{b}/c/", dest)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    for key in ("c/a.safetensors", "c/config.json"):  # a re-download would now fail
        client.delete_object(Bucket=b, Key=key)
    assert fetch_checkpoint(f"s3://{b}/c/", dest, sha256=m.sha256) == m
    assert fetch_checkpoint(f"s3://{b}/c/", dest) == m
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes

    # a failed fetch into an existing dest leaves it as it was
    with pytest.raises(CheckpointError):
        fetch_checkpoint(f"s3://{b}/c/", dest, sha256="1" * 64)  # sha differs -> must re-fetch -> gone
    assert read_manifest(dest) == m.to_dict() and (dest / "a.safetensors").read_bytes() == data
    assert_nothing_left(tmp_path, {"ckpt"})

    # another source replaces it
    new = st_bytes(7)
    client.put_object(Bucket=b, Key="d/b.safetensors", Body=new)
    m2 = fetch_checkpoint(f"s3://{b}/d/b.safetensors", dest, sha256=sha(new))
    assert sorted(p.name for p in dest.iterdir()) == ["b.safetensors", MANIFEST_NAME]
    assert read_manifest(dest) == m2.to_dict()
    assert_nothing_left(tmp_path, {"ckpt"})


def test_s3_corrupted_dest_is_refetched(bucket, tmp_path):
    client, b = bucket
    data = st_bytes()
    client.put_object(Bucket=b, Key="c/a.safetensors", Body=data)
    dest = tmp_path / "ckpt"
    m = fetch_checkpoint(f"s3://{b}/c/a.safetensors", dest)
    (dest / "a.safetensors").write_bytes(st_bytes(3))  # same source, but the files no longer match
    assert fetch_checkpoint(f"s3://{b}/c/a.safetensors", dest) == m
    assert (dest / "a.safetensors").read_bytes() == data


# -- local, builtin ------------------------------------------------------------------------------------


def test_local_directory_and_file(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "unet.safetensors").write_bytes(st_bytes())
    (src / "sub" / "config.json").write_text("{}")
    (src / MANIFEST_NAME).write_text('{"stale": true}')  # a previous manifest is replaced, not hashed
    m = fetch_checkpoint(str(src), tmp_path / "dest")
    assert m.files == {"unet.safetensors": sha(st_bytes()), "sub/config.json": sha(b"{}")}
    assert (tmp_path / "dest" / "sub" / "config.json").read_text() == "{}"
    assert read_manifest(tmp_path / "dest") == m.to_dict() and m.source == str(src)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "dest").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    f = fetch_checkpoint(str(src / "unet.safetensors"), tmp_path / "dest2", sha256=sha(st_bytes()))
    assert f.sha256 == sha(st_bytes()) and list(f.files) == ["unet.safetensors"]

    with pytest.raises(CheckpointError, match="inside it"):
        fetch_checkpoint(str(src), src / "copy")
    with pytest.raises(CheckpointError, match="no such local file"):
        fetch_checkpoint(str(tmp_path / "missing"), tmp_path / "dest3")
    assert_nothing_left(tmp_path, {"src", "dest", "dest2"})


def test_local_renamed_pickle_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.zeros(2)}, src / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        fetch_checkpoint(str(src / "x.safetensors"), tmp_path / "dest")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        fetch_checkpoint(str(src), tmp_path / "dest")
    assert_nothing_left(tmp_path, {"src"})


def test_builtin(tmp_path):
    bdir = tmp_path / "weights"
    bdir.mkdir()
    (bdir / "digits_unet.safetensors").write_bytes(st_bytes(0))
    (bdir / "digits_classifier.safetensors").write_bytes(st_bytes(1))
    (bdir / "digits_config.json").write_text('{"unet": {}}')
    m = fetch_checkpoint("builtin:digits", tmp_path / "ckpt", builtin_dir=bdir)
    assert sorted(m.files) == [
        "digits_classifier.safetensors",
        "digits_config.json",
        "digits_unet.safetensors",
    ]
    assert (
        m.source == "builtin:digits"
        and (tmp_path / "ckpt" / "digits_config.json").read_text() == '{"unet": {}}'
    )

    with pytest.raises(CheckpointError, match="known: builtin:digits"):
        fetch_checkpoint("builtin:imagenet", tmp_path / "x", builtin_dir=bdir)
    (bdir / "digits_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing digits_config.json"):
        fetch_checkpoint("builtin:digits", tmp_path / "x", builtin_dir=bdir)
    assert_nothing_left(tmp_path, {"weights", "ckpt"})


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(CheckpointError, match="64 hex digits"):
        fetch_checkpoint("builtin:digits", tmp_path / "x", sha256="abc")


def test_tree_sha256():
    assert tree_sha256({"a.safetensors": "ab" * 32}) == "ab" * 32
    two = {"a": "1" * 64, "b/c": "2" * 64}
    assert tree_sha256(two) == tree_sha256(dict(reversed(two.items())))
    assert tree_sha256(two) == sha(f"a\t{'1' * 64}\nb/c\t{'2' * 64}\n".encode())
    assert tree_sha256(two) != tree_sha256({"a": "1" * 64, "b/d": "2" * 64})


# -- Hugging Face (offline) ----------------------------------------------------------------------------


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/model" is not an existing local path
    return home


@pytest.mark.parametrize("source", ["hf:some-org/some-model", "some-org/some-model"])
def test_hf_not_in_cache(hf_home, tmp_path, source):
    with pytest.raises(CheckpointError) as e:
        fetch_checkpoint(source, tmp_path / "ckpt")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and f"HF_HOME={hf_home}" in msg
    assert "use a local path / s3:// URI" in msg and source in msg
    assert_nothing_left(tmp_path, {"hf"})


def _fake_hf_snapshot(hf_home: Path, repo: str, files: dict[str, bytes]) -> None:
    commit = "a" * 40
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for rel, body in files.items():
        p = root / "snapshots" / commit / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)


def test_hf_from_local_cache(hf_home, tmp_path):
    _fake_hf_snapshot(
        hf_home,
        "org/good",
        {"model.safetensors": st_bytes(), "config.json": b"{}", "pytorch_model.bin": pickle_bytes()},
    )
    m = fetch_checkpoint("hf:org/good", tmp_path / "ckpt")
    assert sorted(m.files) == ["config.json", "model.safetensors"]  # the .bin twin is not copied
    assert not (tmp_path / "ckpt" / "pytorch_model.bin").exists()

    _fake_hf_snapshot(hf_home, "org/pickled", {"pytorch_model.bin": pickle_bytes(), "config.json": b"{}"})
    with pytest.raises(CheckpointError, match="refusing non-safetensors weights: pytorch_model.bin"):
        fetch_checkpoint("org/pickled", tmp_path / "ckpt2")
    assert_nothing_left(tmp_path, {"hf", "ckpt"})


# -- diffusers pipelines as the hub publishes them ------------------------------------------------------


def _hub_layout_sd(root: Path, fp16_only: bool = False) -> dict[str, bytes]:
    """A tiny SD folder laid out as runwayml/stable-diffusion-v1-5 is on the hub: single-file checkpoints at the
    top, a safety checker, pickled and Flax twins, fp16 and non-EMA variants beside the weights."""
    from safetensors.torch import load_file

    from ctrl_core.testing import save_tiny_sd

    src = save_tiny_sd(root / "plain")
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    unet = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    half = st_save({k: v.half() for k, v in unet.items()})
    files |= {"model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
              "v1-5-pruned.safetensors": st_bytes(1), "v1-5-pruned-emaonly.ckpt": pickle_bytes(),
              "unet/diffusion_pytorch_model.fp16.safetensors": half,
              "unet/diffusion_pytorch_model.non_ema.safetensors": files["unet/diffusion_pytorch_model.safetensors"],
              "unet/diffusion_pytorch_model.bin": pickle_bytes(), "unet/diffusion_flax_model.msgpack": b"\x80flax",
              "text_encoder/pytorch_model.bin": pickle_bytes(), "safety_checker/config.json": b"{}",
              "safety_checker/model.safetensors": st_bytes(2), "safety_checker/pytorch_model.bin": pickle_bytes(),
              "feature_extractor/preprocessor_config.json": b"{}"}  # fmt: skip
    if fp16_only:
        del (
            files["unet/diffusion_pytorch_model.safetensors"],
            files["unet/diffusion_pytorch_model.non_ema.safetensors"],
        )
    return files


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    return root


def test_hub_layout_pipelines_fetch_only_what_the_steps_load(tmp_path, bucket, hf_home):
    """Local folder, S3 prefix and HF cache alike: the single-file checkpoints, the safety checker, pickled and
    Flax twins and the extra precisions are skipped (before any download), nothing is refused, and the folder
    loads; a component published only in fp16 loads that variant."""
    from ctrl_core.latent import load_sd_folder
    from ctrl_core.layout import select_pipeline_files

    files = _hub_layout_sd(tmp_path)
    keep, skipped = select_pipeline_files(sorted(files))
    assert set(skipped) == {"v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
                            "unet/diffusion_pytorch_model.fp16.safetensors",
                            "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
                            "unet/diffusion_flax_model.msgpack", "text_encoder/pytorch_model.bin",
                            "safety_checker/config.json", "safety_checker/model.safetensors",
                            "safety_checker/pytorch_model.bin", "feature_extractor/preprocessor_config.json"}  # fmt: skip
    assert (
        "unet/diffusion_pytorch_model.safetensors" in keep
        and "prompts.txt" in keep
        and "model_index.json" in keep
    )
    assert select_pipeline_files(["a.bin", "w.safetensors"]) == (
        ["a.bin", "w.safetensors"],
        [],
    )  # not a pipeline
    # shards (current and legacy variant names), project files at the top, exports and READMEs, pickle-only folders
    k, sk = select_pipeline_files([
        "model_index.json", "data.safetensors", "README.md", "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "unet/model.onnx",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.non_ema.safetensors",
        "text_encoder/pytorch_model.bin"])  # fmt: skip
    assert k == [
        "data.safetensors",
        "model_index.json",
        "text_encoder/pytorch_model.bin",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    ], k  # (the .bin: refused by name)
    assert sk == ["README.md", "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "unet/model.onnx",
                  "vae/diffusion_pytorch_model.non_ema.safetensors"]  # fmt: skip

    client, b = bucket
    for rel, body in files.items():
        client.put_object(Bucket=b, Key=f"sd15/{rel}", Body=body)
    _fake_hf_snapshot(hf_home, "org/sd15", files)
    local = fetch_checkpoint(str(_write_tree(tmp_path / "hub", files)), tmp_path / "from-local")
    s3 = fetch_checkpoint(f"s3://{b}/sd15/", tmp_path / "from-s3")
    hf = fetch_checkpoint("hf:org/sd15", tmp_path / "from-hf")
    assert sorted(local.files) == keep and local.skipped == sorted(skipped)
    assert local.sha256 == s3.sha256 == hf.sha256 and s3.skipped == hf.skipped == local.skipped
    assert read_manifest(tmp_path / "from-s3")["skipped"] == sorted(skipped)
    reference = load_sd_folder(tmp_path / "plain")["unet"]
    unet = load_sd_folder(tmp_path / "from-s3")["unet"]
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), unet.parameters(), strict=True))

    linked = _write_tree(tmp_path / "linked", {k: v for k, v in files.items() if not k.startswith("vae/")})
    (linked / "vae").symlink_to(
        tmp_path / "hub" / "vae", target_is_directory=True
    )  # followed, as copytree did
    assert fetch_checkpoint(str(linked), tmp_path / "from-linked").sha256 == local.sha256

    _fake_hf_snapshot(
        hf_home,
        "org/pickled-sd",
        {
            "model_index.json": b"{}",
            "unet/config.json": b"{}",
            "unet/diffusion_pytorch_model.bin": pickle_bytes(),
        },
    )
    with pytest.raises(
        CheckpointError, match="refusing non-safetensors weights: unet/diffusion_pytorch_model.bin"
    ):
        fetch_checkpoint("hf:org/pickled-sd", tmp_path / "from-pickled")

    half = _hub_layout_sd(tmp_path / "half", fp16_only=True)
    fetched = fetch_checkpoint(str(_write_tree(tmp_path / "hub-half", half)), tmp_path / "from-half")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched.files
    unet16 = load_sd_folder(tmp_path / "from-half")["unet"]
    assert all(
        torch.equal(q, p.half().to(q.dtype))
        for p, q in zip(reference.parameters(), unet16.parameters(), strict=True)
    )
