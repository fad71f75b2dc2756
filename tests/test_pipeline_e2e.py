"""`ctrl run` end to end through kfp.local against a real `mlflow server`: all five steps, the summary, one
registered version per identical run, and a gate that refuses a worse model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]

#: The smallest run that still shows two candidate links, a checkpoint before the last iteration, two step
#: counts and both samplers.
TINY = {
    "value": {"num_paths": 8, "steps": 4, "epochs": 1, "candidates": ["cos_sin", "rm_only"]},
    "optimize": {
        "iterations": 2,
        "batch_size": 4,
        "train_steps": 4,
        "train_timesteps": 2,
        "minibatch_size": 4,
        "checkpoint_every": 1,
    },
    "evaluate": {"steps": [2, 4], "num_samples": 4},
    "register": {"model_name": "ctrl-e2e"},
}


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for block, values in TINY.items():
        raw[block].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, ["run", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(Path(args[args.index("--summary-out") + 1]).read_text())


@pytest.mark.slow
def test_ctrl_run_end_to_end(tmp_path, monkeypatch, mlflow_server, tiny_params):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    s1 = _run("--params", str(tiny_params), "--summary-out", "s1.json")

    # the summary a user reads
    assert s1["link"]["chosen"] in {"cos_sin", "rm_only"} and set(s1["link"]["mse"]) == {"cos_sin", "rm_only"}
    for sampler in ("sde", "ode"):
        for steps in ("2", "4"):
            cell = s1["evaluation"][sampler][steps]
            assert {"base", "tuned", "gain", "kl", "gain_ci"} <= set(cell)
            assert cell["gain"] == pytest.approx(cell["tuned"] - cell["base"], abs=1e-5)
    assert s1["robustness_ratio"] is None or isinstance(s1["robustness_ratio"], float)
    assert set(s1["wall_s"]) >= {
        "fetch_checkpoint",
        "pretrain_value",
        "ctrl_optimize",
        "evaluate",
        "register",
    }
    reg = s1["registered"]
    assert reg["name"] == "ctrl-e2e" and reg["version"] == 1 and "challenger" in reg["aliases"]
    assert Path(s1["report"]).is_file()
    optimize_dirs = list(Path(s1["outputs_dir"]).rglob("adapter/adapter_model.safetensors"))
    assert optimize_dirs, "the LoRA adapter is written in the peft format"
    assert list(Path(s1["outputs_dir"]).rglob("checkpoints/iter-00001/adapter_model.safetensors"))

    client = mlflow.MlflowClient(mlflow_server)
    # one MLflow run, opened by `ctrl run` before the first step: the curves arrived per iteration while the
    # steps ran (each point is older than the registration's metrics), and the registration closed it
    run = client.get_run(s1["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ctrl.local_run"] == s1["run_id"]
    rewards = client.get_metric_history(run.info.run_id, "ctrl_optimize/reward_mean")
    assert [m.step for m in rewards] == [1, 2]
    registered_at = client.get_metric_history(run.info.run_id, "train/final_reward")[0].timestamp
    assert max(m.timestamp for m in rewards) < registered_at
    assert {m.step for m in client.get_metric_history(run.info.run_id, "ctrl_optimize/kl")} == {1, 2}
    assert set(run.data.metrics) >= {"pretrain_value/mse/cos_sin", "pretrain_value/mse/rm_only"}
    assert "evaluate/gain/sde/4" in run.data.metrics
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert any(p.endswith(".png") for p in grids), grids

    # a repeated identical run adds no version; its own run is closed as a duplicate of the first
    s2 = _run("--params", str(tiny_params), "--summary-out", "s2.json")
    assert s2["registered"]["version"] == 1 and s2["registered"]["created"] is False
    assert len(client.search_model_versions("name='ctrl-e2e'")) == 1
    again = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`ctrl.local_run` = '{s2['run_id']}'"
    )
    assert len(again) == 1 and again[0].info.status == "FINISHED"
    assert again[0].data.tags["ctrl.duplicate_of"] == run.info.run_id
    assert client.get_metric_history(again[0].info.run_id, "ctrl_optimize/reward_mean")

    # a run whose gate cannot pass is registered as challenger only; the champion does not move
    champion_before = client.get_registered_model("ctrl-e2e").aliases.get("champion")
    s3 = _run("--params", str(tiny_params), "--set", "register.min_gain=1000", "--summary-out", "s3.json")
    assert s3["registered"]["version"] == 2
    assert s3["registered"]["aliases"] == ["challenger"] and not s3["registered"]["promoted"]
    assert "gain" in s3["registered"]["gate_reason"]
    assert client.get_registered_model("ctrl-e2e").aliases.get("champion") == champion_before
