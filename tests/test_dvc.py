"""dvc.yaml end to end, with the real ``dvc`` and ``ctrl`` executables in subprocesses (no mocks).

One tiny ``dvc repro`` in a throwaway git + DVC repository (and its MLflow database) is made once per session;
every test works on a copy of its own, so one that fails or times out leaves nothing behind for the next:

* the five stages run (``ctrl step NAME``, the code the KFP components wrap) and leave their outputs;
* a second ``dvc repro`` skips the four cached stages, reruns only ``register`` (always_changed) and
  reuses its MLflow model version instead of adding one;
* ``dvc exp run -S optimize.beta=...`` reruns ctrl_optimize and downstream, not fetch/pretrain_value;
* ``dvc push`` / ``dvc pull`` round-trip every output byte for byte through a real local S3 server
  (moto over HTTP, ``endpointurl`` remote, credentials from the environment only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from s3_server import DUMMY_AWS_ENV, HIDDEN_AWS_ENV, local_s3_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: ctrl and dvc live next to this python
WEIGHTS = REPO / "ctrl_core" / "weights"
STAGES = ("fetch_checkpoint", "pretrain_value", "ctrl_optimize", "evaluate", "register")
CACHED = STAGES[:4]  # register is always_changed
OUTS = {
    "fetch_checkpoint": "data/checkpoint",
    "pretrain_value": "data/value",
    "ctrl_optimize": "data/optimize",
    "evaluate": "data/evaluate",
}

#: Only sizes differ from the repository's params.yaml (same keys, same algorithm, reward and checkpoint): the
#: smallest that still shows two candidate links, two iterations, two step counts and both samplers.
TINY = {
    "value": {"num_paths": 8, "steps": 4, "epochs": 1, "candidates": ["cos_sin", "rm_only"]},
    "optimize": {
        "iterations": 2,
        "batch_size": 4,
        "train_steps": 4,
        "train_timesteps": 2,
        "minibatch_size": 4,
        "checkpoint_every": 0,
    },
    "evaluate": {"steps": [2, 4], "num_samples": 4, "samplers": ["sde", "ode"]},
}


@dataclass
class Project:
    repo: Path
    env: dict[str, str]
    tracking_uri: str
    model_name: str
    first: str  # output of the first `dvc repro`
    lock_after_first: str


@dataclass(frozen=True)
class Template:
    """A repository after its first ``dvc repro`` and its baseline commit, with the MLflow database beside it."""

    root: Path  # root/repo, root/mlflow.db
    model_name: str
    first: str
    lock_after_first: str


def _env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=tracking_uri,
        GIT_AUTHOR_NAME="ctrl-test",
        GIT_AUTHOR_EMAIL="ctrl-test@example.invalid",
        GIT_COMMITTER_NAME="ctrl-test",
        GIT_COMMITTER_EMAIL="ctrl-test@example.invalid",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600, merge: bool = True) -> str:
    p = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert p.returncode == 0, (
        f"`{' '.join(args)}` exited with {p.returncode}:\n{p.stdout[-8000:]}{p.stderr or ''}"
    )
    return p.stdout


def _dvc(project_dir: Path, env: dict[str, str], *args: str, merge: bool = True) -> str:
    return _run([str(BIN / "dvc"), *args], project_dir, env, merge=merge)


def _git(project_dir: Path, env: dict[str, str], *args: str) -> str:
    return _run(["git", *args], project_dir, env)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _tree_hashes(root: Path, algo: str = "sha256") -> dict[str, str]:
    """{relative path: hex digest} of every file of the stage outputs under ``root``."""
    out = {}
    for rel in OUTS.values():
        for p in sorted((root / rel).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.new(algo, p.read_bytes()).hexdigest()
    return out


def _model_versions(tracking_uri: str, name: str) -> list:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri).search_model_versions(f"name='{name}'")


def _tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def _relocate(db: Path, old: Path, new: Path) -> None:
    """Rewrite the absolute paths MLflow stored under ``old`` (artifact locations of the experiment, the runs
    and the model versions, under repo/mlruns) to ``new``, so a copy's runs write under the copy, not the template."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(k in (kind or "").upper() for k in ("CHAR", "TEXT", "CLOB")):
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (str(old), str(new), str(old)),
                    )
        con.commit()
    finally:
        con.close()


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Template:
    """Made once: a git + DVC repository with the tiny params, its first ``dvc repro`` and a baseline commit."""
    missing = [
        n
        for n in ("digits_unet.safetensors", "digits_config.json", "digits_classifier.safetensors")
        if not (WEIGHTS / n).is_file()
    ]
    assert not missing, f"built-in checkpoint files missing from {WEIGHTS}: {missing}"
    for exe in ("ctrl", "dvc"):
        assert (BIN / exe).is_file(), (
            f"{BIN / exe} not found: run the tests with the project's virtualenv python"
        )

    root = tmp_path_factory.mktemp("dvc-template")
    repo = root / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "prompts", repo / "prompts")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for block, values in TINY.items():
        assert set(values) <= set(params[block]), (
            f"params.yaml lost keys of {block}: {set(values) - set(params[block])}"
        )
        params[block].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text(
        "/mlruns/\n"
    )  # MLflow's local artifact store (cwd of the register stage)
    env = _env(_tracking_uri(root))

    _git(repo, env, "init", "-q")
    _git(repo, env, "config", "user.name", "ctrl-test")
    _git(repo, env, "config", "user.email", "ctrl-test@example.invalid")
    _git(repo, env, "config", "commit.gpgsign", "false")
    _dvc(repo, env, "init", "-q")

    first = _dvc(repo, env, "repro")
    lock_after_first = (repo / "dvc.lock").read_text()
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "tiny pipeline")  # dvc exp run needs a baseline commit
    return Template(root, params["register"]["model_name"], first, lock_after_first)


@pytest.fixture
def project(template, tmp_path) -> Project:
    """This test's own copy of the template: repository, git and DVC state, DVC cache, outputs and MLflow."""
    root = tmp_path / "project"
    shutil.copytree(template.root, root)
    _relocate(root / "mlflow.db", template.root, root)
    tracking_uri = _tracking_uri(root)
    return Project(
        root / "repo",
        _env(tracking_uri),
        tracking_uri,
        template.model_name,
        template.first,
        template.lock_after_first,
    )


def test_repro_runs_the_five_stages(project):
    repo = project.repo
    assert _ran(project.first) == set(STAGES), project.first[-4000:]
    lock = _lock(repo)
    assert set(lock) == set(STAGES)
    for stage, out in OUTS.items():
        assert [o["path"] for o in lock[stage]["outs"]] == [out]
        assert lock[stage]["outs"][0]["md5"].endswith(".dir")  # a folder output, cached as a tree
    assert lock["ctrl_optimize"]["params"]["params.yaml"]["optimize"]["iterations"] == 2

    manifest = json.loads((repo / "data/checkpoint/manifest.json").read_text())
    assert manifest["source"] == "builtin:digits" and len(manifest["sha256"]) == 64
    assert {"digits_unet.safetensors", "digits_config.json", "digits_classifier.safetensors"} <= set(
        manifest["files"]
    )

    link = json.loads((repo / "data/value/link.json").read_text())
    assert link["chosen"] in TINY["value"]["candidates"] and set(link["mse"]) == set(
        TINY["value"]["candidates"]
    )
    assert (repo / "data/value/value.safetensors").stat().st_size > 0

    assert (repo / "data/optimize/adapter/adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads((repo / "data/optimize/metrics.json").read_text())
    assert metrics["summary"]["algorithm"] == "ctrl" and metrics["summary"]["iterations"] == 2
    assert len(metrics["history"]) == 2

    evaluation = json.loads((repo / "data/evaluate/evaluation.json").read_text())
    assert set(evaluation["evaluation"]) == {"sde", "ode"}
    for sampler, cells in evaluation["evaluation"].items():
        assert set(cells) == {"2", "4"}, sampler
        for cell in cells.values():
            assert {"base", "tuned", "gain", "kl"} <= set(cell)
    assert evaluation["train_steps"] == 4

    versions = _model_versions(project.tracking_uri, project.model_name)
    assert len(versions) == 1


def test_second_repro_only_reruns_register(project):
    second = _dvc(project.repo, project.env, "repro")
    assert _ran(second) == {"register"}, second[-4000:]
    assert _skipped(second) == set(CACHED), second[-4000:]
    assert (project.repo / "dvc.lock").read_text() == project.lock_after_first
    versions = _model_versions(project.tracking_uri, project.model_name)
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]  # same run_key: no second version


def test_exp_run_reruns_optimize_and_downstream_only(project):
    repo, env = project.repo, project.env
    before_lock = _lock(repo)
    before = _tree_hashes(repo)

    out = _dvc(repo, env, "exp", "run", "-S", "optimize.beta=0.02")
    assert _ran(out) == {"ctrl_optimize", "evaluate", "register"}, out[-4000:]
    assert {"fetch_checkpoint", "pretrain_value"} <= _skipped(out), out[-4000:]

    lock = _lock(repo)
    assert lock["ctrl_optimize"]["params"]["params.yaml"]["optimize"]["beta"] == 0.02
    for stage in ("fetch_checkpoint", "pretrain_value"):
        assert lock[stage] == before_lock[stage], stage
    after = _tree_hashes(repo)
    unchanged = {k: v for k, v in before.items() if k.startswith(("data/checkpoint/", "data/value/"))}
    assert unchanged and {k: after[k] for k in unchanged} == unchanged
    assert (
        after["data/optimize/adapter/adapter_model.safetensors"]
        != before["data/optimize/adapter/adapter_model.safetensors"]
    )
    assert lock["ctrl_optimize"]["outs"][0]["md5"] != before_lock["ctrl_optimize"]["outs"][0]["md5"]

    assert len(_dvc(repo, env, "exp", "list", "--name-only").split()) == 1
    # other parameters -> another run_key -> exactly one new version
    assert len(_model_versions(project.tracking_uri, project.model_name)) == 2


def test_prompt_sets_are_stage_dependencies(project):
    """Editing a prompt set (model.prompts points into prompts/) makes the stages that read prompts stale."""
    repo, env = project.repo, project.env
    f = repo / "prompts" / "simple_animals.txt"
    before = f.read_text()
    try:
        f.write_text(before + "narwhal\n")
        status = json.loads(_dvc(repo, env, "status", "--json", merge=False))
    finally:
        f.write_text(before)
    assert {"pretrain_value", "ctrl_optimize", "evaluate"} <= set(status), status
    assert "fetch_checkpoint" not in status
    assert json.loads(_dvc(repo, env, "status", "--json", merge=False)).keys() <= {"register"}


def test_push_pull_round_trip_through_s3(project):
    import boto3

    repo = project.repo
    with local_s3_server() as endpoint:
        env = {k: v for k, v in project.env.items() if k not in HIDDEN_AWS_ENV}
        env.update(DUMMY_AWS_ENV)  # the only credentials dvc can see: from the environment, not the repo
        # dvc-s3 parses $AWS_CONFIG_FILE with botocore's load_config, which refuses /dev/null (not a regular
        # file); an empty file hides the user's AWS config just as well.
        empty = repo.parent / "empty-aws-config"
        empty.write_text("")
        env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty))
        s3 = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"dvc-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)

        _dvc(repo, env, "remote", "add", "-d", "store", f"s3://{bucket}/dvcstore")
        _dvc(repo, env, "remote", "modify", "store", "endpointurl", endpoint)
        config = (repo / ".dvc" / "config").read_text()
        assert endpoint in config and "access_key" not in config and "secret" not in config

        pushed = _tree_hashes(repo)
        assert len(pushed) >= 8
        _dvc(repo, env, "push")

        keys = set()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="dvcstore/"):
            keys.update(o["Key"] for o in page.get("Contents", []))
        md5s = _tree_hashes(repo, "md5")
        missing = {rel for rel, h in md5s.items() if f"dvcstore/files/md5/{h[:2]}/{h[2:]}" not in keys}
        assert not missing, f"not in the remote: {sorted(missing)}; remote has {sorted(keys)[:20]}"
        for stage, out in OUTS.items():
            h = _lock(repo)[stage]["outs"][0]["md5"]  # the folder's .dir listing is pushed too
            assert f"dvcstore/files/md5/{h[:2]}/{h[2:]}" in keys, out

        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(repo / "data")
        assert _tree_hashes(repo) == {}
        _dvc(repo, env, "pull")

    assert _tree_hashes(repo) == pushed
    status = json.loads(_dvc(repo, project.env, "status", "--json", merge=False))
    assert set(status) <= {"register"}, status  # everything pulled is up to date; register is always_changed
