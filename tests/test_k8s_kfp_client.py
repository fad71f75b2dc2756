"""``ctrl submit`` / ``ctrl schedule`` against a local server that answers as the KFP v2beta1 API does and
records every request (tests/kfp_api_server.py): what kfp.Client sends is asserted, not mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kfp_api_server import KfpApiServer  # tests/ is on sys.path (conftest.py)

from ctrl_core.params import flatten, load
from pipelines.cli import kfp_cron, main
from pipelines.pipeline import PIPELINE_NAME, parameter_descriptions
from pipelines.register_step import git_sha

REPO = Path(__file__).resolve().parents[1]
CI_VALUES = str(REPO / "charts" / "ctrl-pipeline" / "ci" / "test-values.yaml")
SHA = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")


@pytest.fixture()
def kfp(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the machine
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    with KfpApiServer() as server:
        yield server


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def test_submit_uploads_a_version_named_by_the_git_sha_with_documented_parameters(kfp):
    out = invoke(
        "submit",
        "--host",
        kfp.url,
        "--token",
        "t0ken",
        "--params",
        "params.yaml",
        "-f",
        CI_VALUES,
        "--version-name",
        SHA,
        "--run-name",
        "nightly",
    )
    assert [r.path.removeprefix("/apis/v2beta1") for r in kfp.requests] == [
        "/healthz",
        "/pipelines",
        "/pipelines/upload",
        f"/pipelines/{out['pipeline_id']}/versions",
        "/pipelines/upload_version",
        "/experiments",
        "/experiments",
        "/runs",
    ]
    assert all(r.headers.get("authorization") == "Bearer t0ken" for r in kfp.requests[1:])
    (upload,) = kfp.calls("POST", "/pipelines/upload")
    assert upload.query["name"] == PIPELINE_NAME and "continuous-time RL" in upload.query["description"]
    (uv,) = kfp.calls("POST", "/pipelines/upload_version")
    assert uv.query["name"] == SHA and uv.query["pipelineid"] == out["pipeline_id"]
    assert out["version"] == SHA and kfp.versions[out["version_id"]]["display_name"] == SHA
    # the spec the KFP UI shows: every parameter with its default (params.yaml) and description
    stored = kfp.versions[out["version_id"]]["pipeline_spec"]
    declared = stored["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    params = load(REPO / "params.yaml")
    descriptions = parameter_descriptions()
    for name, value in flatten(params).items():
        assert declared[name].get("defaultValue") == value, name
        assert declared[name]["description"] == descriptions[name], name
    assert declared["optimize__beta"]["description"].startswith("KL weight")
    # and the cluster placement travelled with it (kfp #11374: the GPU request is in the uploaded spec)
    ex = stored["pipeline_spec"]["deploymentSpec"]["executors"]["exec-ctrl-optimize"]["container"]
    assert ex["resources"]["accelerator"]["resourceCount"] == "8"
    assert (
        "exec-ctrl-optimize"
        in stored["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    )
    (run,) = kfp.calls("POST", "/runs")
    assert run.body["display_name"] == "nightly"
    assert run.body["pipeline_version_reference"] == {
        "pipeline_id": out["pipeline_id"],
        "pipeline_version_id": out["version_id"],
    }
    assert run.body["runtime_config"]["parameters"] == flatten(params)
    assert run.body["service_account"] == "ctrl-pipeline-runner"  # from the chart values
    assert run.body["experiment_id"] == out["experiment_id"]
    (exp,) = kfp.calls("POST", "/experiments")
    assert exp.body["display_name"] == "ctrl-pipeline"


def test_submit_again_reuses_the_version_and_a_different_package_gets_its_own(kfp):
    first = invoke("submit", "--host", kfp.url, "--version-name", SHA)
    again = invoke("submit", "--host", kfp.url, "--version-name", SHA)
    assert (
        again["version_id"] == first["version_id"]
        and len(kfp.calls("POST", "/pipelines/upload_version")) == 1
    )
    assert len(kfp.calls("POST", "/pipelines/upload")) == 1  # the pipeline exists: found by name
    other = invoke("submit", "--host", kfp.url, "--version-name", SHA, "--set", "optimize.iterations=5")
    assert other["version"].startswith(SHA + "-") and other["version_id"] != first["version_id"]
    assert len(kfp.runs) == 3


def test_version_defaults_to_the_git_sha(kfp, monkeypatch):
    sha = git_sha("") or SHA
    monkeypatch.setenv("CTRL_GIT_SHA", sha)  # used when not a git checkout (the image)
    out = invoke("submit", "--host", kfp.url)
    assert out["version"] == sha


def test_schedule_creates_one_recurring_run_without_catch_up(kfp):
    out = invoke("schedule", "--host", kfp.url, "--cron", "0 3 * * 1", "-f", CI_VALUES, "--version-name", SHA)
    (req,) = kfp.calls("POST", "/recurringruns")
    body = req.body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}  # KFP's 6-field cron (seconds first)
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["display_name"] == "ctrl-retrain" and body["service_account"] == "ctrl-pipeline-runner"
    assert body["pipeline_version_reference"]["pipeline_version_id"] == out["version_id"]
    assert body["runtime_config"]["parameters"] == flatten(load(REPO / "params.yaml"))
    # scheduling again replaces the schedule instead of adding a second one
    again = invoke(
        "schedule", "--host", kfp.url, "--cron", "0 0 4 * * *", "-f", CI_VALUES, "--version-name", SHA
    )
    assert again["replaced"] == [out["recurring_run_id"]]
    assert list(kfp.recurring_runs) == [again["recurring_run_id"]]
    assert kfp.recurring_runs[again["recurring_run_id"]]["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"


def test_bad_input_never_reaches_the_server(kfp, tmp_path):
    bad = tmp_path / "v.yaml"
    bad.write_text("pipeline:\n  steps:\n    ctrl_optimize: {pool: gpu-b200, gpus: 8}\n")
    for args in (
        ["submit", "-f", str(bad)],
        ["schedule", "--cron", "0 3 * * 1", "-f", str(bad)],
        ["schedule", "--cron", "every monday"],
        ["submit", "--set", "optimize.beta=-1"],
    ):
        result = CliRunner().invoke(main, [*args, "--host", kfp.url, "--version-name", SHA])
        assert result.exit_code == 2, result.output
    assert kfp.requests == []


def test_kfp_cron():
    assert kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert kfp_cron("30 0 3 * * 1") == "30 0 3 * * 1"
