"""params.yaml validation (errors name the key, nothing is written) and the compiled KFP pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ctrl_core.params import BLOCKS, Params, ParamsError, flatten, load, unflatten
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_is_valid_and_complete():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load(REPO / "params.yaml")
    assert set(raw) == set(BLOCKS)
    for block, fields in Params().model_dump().items():
        assert set(raw[block]) == set(fields), f"params.yaml block {block} must list every key of the schema"
    assert unflatten(flatten(params)) == params


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optimize.betaa=0.1"], "optimize.betaa"),
        (["optimize.beta=-1"], "optimize.beta"),
        (["optimize.iterations=many"], "optimize.iterations"),
        (["evaluate.steps=[]"], "evaluate.steps"),
        (["evaluate.steps=[0, 10]"], "evaluate.steps"),
        (["reward.name=imagereward9"], "reward.name"),
        (["value.candidates=[cos_sin, sigmoid]"], "value.candidates"),
        (["checkpoint.sha256=abc"], "checkpoint.sha256"),
        (["nosuchblock.x=1"], "nosuchblock"),
        (["evaluate.samplers=[sde, euler]"], "evaluate.samplers"),
    ],
)
def test_bad_params_name_the_key(overrides, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load(None, overrides)


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "optimize.beta=-0.5"], "optimize.beta"),
        (["--set", "evaluate.steps=[]"], "evaluate.steps"),
        (["--set", "optimize.nope=1"], "optimize.nope"),
        (["--params", "missing.yaml"], "missing.yaml"),
    ],
)
def test_ctrl_run_rejects_bad_params_before_writing_anything(tmp_path, monkeypatch, args, key):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert list(tmp_path.iterdir()) == []  # no outputs/, no mlflow.db


def test_compiled_pipeline_has_the_dag_and_every_parameter(tmp_path):
    from pipelines.pipeline import compile_pipeline

    params = load(REPO / "params.yaml")
    out = compile_pipeline(tmp_path / "p.yaml", params, git_sha="abc123")
    spec = yaml.safe_load(Path(out).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"resolve-params", "fetch-checkpoint", "pretrain-value", "ctrl-optimize", "evaluate", "register"}

    def upstream(name):
        return set(tasks[name].get("dependentTasks", []))

    # every step reads the validated parameters of resolve-params, which takes all pipeline parameters
    assert upstream("fetch-checkpoint") == {"resolve-params"}
    assert upstream("pretrain-value") == {"resolve-params", "fetch-checkpoint"}
    assert upstream("ctrl-optimize") == {"resolve-params", "fetch-checkpoint", "pretrain-value"}
    assert upstream("evaluate") == {"resolve-params", "fetch-checkpoint", "ctrl-optimize"}
    assert upstream("register") >= {"evaluate", "ctrl-optimize", "pretrain-value"}
    resolve_inputs = tasks["resolve-params"]["inputs"]["parameters"]
    assert set(resolve_inputs) == set(flatten(params))
    assert tasks["register"]["cachingOptions"] == {}  # caching off: it reads the registry's champion
    assert tasks["ctrl-optimize"]["cachingOptions"] == {"enableCache": True}
    declared = spec["root"]["inputDefinitions"]["parameters"]
    flat = flatten(params)
    assert set(declared) == set(flat)
    for name, value in flat.items():
        assert declared[name].get("defaultValue", None) == value, name
    assert tasks["register"]["inputs"]["parameters"]["git_sha"]["runtimeValue"]["constant"] == "abc123"


def test_every_pipeline_parameter_is_documented_for_the_kfp_ui(tmp_path):
    from pipelines.pipeline import compile_pipeline, parameter_descriptions

    params = load(REPO / "params.yaml")
    spec = yaml.safe_load(Path(compile_pipeline(tmp_path / "p.yaml", params)).read_text())
    declared = spec["root"]["inputDefinitions"]["parameters"]
    descriptions = parameter_descriptions(params)
    for name in flatten(params):
        assert declared[name].get("description") == descriptions[name], name
    assert descriptions["optimize__beta"].startswith("KL weight")  # OptimConfig's field comments count as help
