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
    assert set(tasks) == {
        "resolve-params",
        "fetch-checkpoint",
        "pretrain-value",
        "ctrl-optimize",
        "evaluate",
        "register",
    }

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
    descriptions = parameter_descriptions()
    for name in flatten(params):
        assert declared[name].get("description") == descriptions[name], name
        assert len(descriptions[name]) > 10 and descriptions[name] != name.replace("__", "."), (
            name
        )  # real help
    assert descriptions["optimize__beta"].startswith("KL weight")
    assert "the weight of the reward" in descriptions["qlearning__reward_weight"]  # the qlearning block too


def test_resolve_params_is_a_real_function_run_by_kfps_executor(tmp_path):
    """The compiled resolve-params task runs KFP's executor on components/resolve_params/component.py (no source
    copied into the pipeline) and takes every parameter, typed and described as the config declares it."""
    import inspect

    from components.resolve_params import component as rp
    from ctrl_core.params import kfp_parameter_types, parameter_descriptions
    from pipelines.pipeline import compile_pipeline

    assert inspect.getfullargspec(rp.resolve_params).annotations == {**kfp_parameter_types(), "return": str}
    params = load(REPO / "params.yaml", ["optimize.beta=0.5"])
    assert Params.model_validate_json(rp.resolve_params(**flatten(params))) == params
    with pytest.raises(ParamsError, match="optimize.beta"):
        rp.resolve_params(optimize__beta=-1.0)
    spec = yaml.safe_load(Path(compile_pipeline(tmp_path / "p.yaml", params)).read_text())
    container = spec["deploymentSpec"]["executors"]["exec-resolve-params"]["container"]
    assert container["command"] == rp.COMMAND and "kfp.dsl.executor_main" in container["command"][2]
    assert container["args"] == ["--executor_input", "{{$}}", "--function_to_execute", "resolve_params"]
    inputs = spec["components"]["comp-resolve-params"]["inputDefinitions"]["parameters"]
    assert {n: p.get("description") for n, p in inputs.items()} == parameter_descriptions()
    kinds = {
        "NUMBER_DOUBLE": float,
        "NUMBER_INTEGER": int,
        "BOOLEAN": bool,
        "STRING": str,
        "LIST": list,
        "STRUCT": dict,
    }
    assert {n: kinds[p["parameterType"]] for n, p in inputs.items()} == kfp_parameter_types()


def test_resolve_params_module_folder_holds_only_that_module():
    """KFP's executor puts the module's folder first on sys.path: nothing there may shadow a module."""
    folder = REPO / "components" / "resolve_params"
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == [
        "__init__.py",
        "component.py",
    ]


def test_dvc_yaml_params_name_real_keys():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    fields = {b: set(type(getattr(Params(), b)).model_fields) for b in BLOCKS}
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            block, _, key = entry.partition(".")
            assert block in fields, f"dvc.yaml stage {name}: {entry} is not a params.yaml block"
            assert not key or key in fields[block], f"dvc.yaml stage {name}: {entry} is not a params.yaml key"


def _placed(spec: dict, platform: dict | None) -> bool:
    """Whether a compiled pipeline carries the chart's placement: the GPU request of ctrl-optimize and the
    Kubernetes platform settings (node selectors, tolerations, /dev/shm)."""
    container = spec["deploymentSpec"]["executors"]["exec-ctrl-optimize"]["container"]
    return "accelerator" in container.get("resources", {}) and bool(platform)


def test_compile_defaults_to_the_charts_values(tmp_path, monkeypatch):
    """Without --chart/-f the steps are placed by the chart's own values ($CTRL_CHART, where the image carries
    the chart, else the repository's chart, found from any folder); a generic pipeline only with --no-placement."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CTRL_CHART", raising=False)

    def compiled(*args: str):
        result = CliRunner().invoke(main, ["compile", "--out", "p.yaml", *args])
        assert result.exit_code == 0, result.output
        docs = [d for d in yaml.safe_load_all((tmp_path / "p.yaml").read_text()) if d]
        return docs[0], (docs[1] if len(docs) > 1 else None)

    assert _placed(*compiled())
    assert not _placed(*compiled("--no-placement"))
    refused = CliRunner().invoke(main, ["compile", "--out", "q.yaml", "--no-placement", "-f", "values.yaml"])
    assert (
        refused.exit_code == 2 and "--no-placement" in refused.output and not (tmp_path / "q.yaml").exists()
    )
    monkeypatch.setenv("CTRL_CHART", str(tmp_path))  # the image's chart location comes first
    moved = CliRunner().invoke(main, ["compile", "--out", "q.yaml"])
    assert (
        moved.exit_code == 2 and "values.schema.json" in moved.output and not (tmp_path / "q.yaml").exists()
    )


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_submit_and_schedule_default_to_the_charts_values(command, tmp_path, monkeypatch):
    from kfp_api_server import KfpApiServer  # tests/ is on sys.path (conftest.py)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CTRL_CHART", raising=False)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    extra = ["--cron", "0 3 * * 1"] if command == "schedule" else []
    with KfpApiServer() as kfp:
        for version, flag in (("placed", []), ("generic", ["--no-placement"])):
            result = CliRunner().invoke(
                main, [command, "--host", kfp.url, "--version-name", version, *extra, *flag]
            )
            assert result.exit_code == 0, result.output + repr(result.exception)
        # (the server keeps a one-document package as it is, a two-document one as pipeline_spec + platform_spec)
        stored = {v["display_name"]: v["pipeline_spec"] for v in kfp.versions.values()}
    assert _placed(stored["placed"]["pipeline_spec"], stored["placed"]["platform_spec"])
    assert "pipeline_spec" not in stored["generic"] and not _placed(stored["generic"], None)


def test_ctrl_help_keeps_each_usage_line_as_a_line():
    """click re-wraps a help paragraph unless it is marked with \\b: each `ctrl X` usage line stays whole."""
    from click.testing import CliRunner

    from pipelines.cli import main

    out = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    usage = [line.strip() for line in out.splitlines() if line.strip().startswith("ctrl ")]
    for command in ("run", "params", "compile", "submit", "schedule", "promote", "step", "export"):
        assert sum(line.startswith(f"ctrl {command} ") for line in usage) == 1, (command, usage)
    assert all(line.count("ctrl ") == 1 for line in usage), usage
