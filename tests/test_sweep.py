"""`ctrl sweep`: which --set sweeps and which is refused, the compiled sweep (a ParallelFor with its parallelism,
the collect step, register after it), the front and the best child, and a local 2x2 sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from components.child_params.overrides import apply
from components.collect_front import front_points
from ctrl_core.params import Params, ParamsError
from pipelines.cli import main
from pipelines.sweep import SweepError, compile_sweep, plan, split_sets

REPO = Path(__file__).resolve().parents[1]

#: the smallest CTRL run that trains and evaluates (tests/test_pipeline_e2e.py's TINY, one link, one cell)
TINY = {
    "value": {"num_paths": 8, "steps": 4, "epochs": 1, "candidates": ["linear"]},
    "optimize": {
        "iterations": 2,
        "batch_size": 4,
        "train_steps": 4,
        "train_timesteps": 2,
        "minibatch_size": 4,
    },
    "evaluate": {"steps": [4], "samplers": ["sde"], "num_samples": 4},
    "register": {"model_name": "ctrl-sweep"},
}


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for block, values in TINY.items():
        raw[block].update(values)
    raw["run"]["checkpoint_root"] = str(tmp_path / "checkpoints")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- which --set sweeps ---------------------------------------------------------------------------------


def test_a_list_sweeps_a_scalar_key_and_the_children_are_the_product():
    s = plan(None, ["optimize.beta=[0.003,0.03]", "run.seed=[0,1,2]", "optimize.iterations=3"])
    assert s.keys == ["optimize.beta", "run.seed"]
    assert len(s.children) == 6 and s.children[1] == {"optimize.beta": 0.003, "run.seed": 1}
    assert [(p.optimize.beta, p.run.seed, p.optimize.iterations) for p in s.params][-1] == (0.03, 2, 3)
    assert s.base.optimize.iterations == 3 and s.base.optimize.beta == Params().optimize.beta


def test_a_list_typed_key_sweeps_with_a_list_of_lists_and_is_set_by_a_list():
    fixed, swept = split_sets(["optimize.kl_form=[continuous,exact]", "evaluate.steps=[4,8]"])
    assert fixed == ["evaluate.steps=[4,8]"] and swept == {"optimize.kl_form": ["continuous", "exact"]}
    with pytest.raises(SweepError, match=r"evaluate\.steps.*evaluated alike"):
        split_sets(["evaluate.steps=[[4],[8]]"])
    with pytest.raises(SweepError, match=r"value\.candidates.*pretrained once"):
        split_sets(["value.candidates=[[linear],[cos_sin]]"])
    with pytest.raises(SweepError, match=r"list of lists"):
        split_sets(["value.candidates=[[linear],cos_sin]"])


@pytest.mark.parametrize(
    "item, key",
    [
        ("checkpoint.source=[builtin:digits,/x]", "checkpoint.source"),
        ("model.lora_rank=[4,8]", "model.lora_rank"),
        ("reward.name=[jpeg_compressibility,quadratic]", "reward.name"),
        ("value.num_paths=[8,16]", "value.num_paths"),
        ("optimize.solver=[ddpm,euler_maruyama]", "optimize.solver"),
        ("register.min_gain=[0,1]", "register.min_gain"),
        ("run.name=[a,b]", "run.name"),
    ],
)
def test_what_is_shared_cannot_sweep(item, key):
    with pytest.raises(SweepError, match=rf"cannot sweep {key}"):
        plan(None, [item])


def test_every_child_is_checked_before_anything_runs():
    with pytest.raises(
        SweepError, match=r"(?s)sweep child 1 \(optimize\.beta=-1\).*optimize\.beta: must be >= 0"
    ):
        plan(None, ["optimize.beta=[0.01,-1]"])
    with pytest.raises(SweepError, match=r"lacks optimize\.train_steps=30"):
        plan(None, ["optimize.train_steps=[20,30]"])
    with pytest.raises(SweepError, match=r"listed twice"):
        plan(None, ["optimize.beta=[0.01,0.01]"])
    with pytest.raises(SweepError, match=r"nothing to sweep"):
        plan(None, ["optimize.beta=0.01"])


def test_a_child_is_the_base_with_its_values_and_an_error_names_the_key():
    child = apply(Params().model_dump_json(), {"optimize.beta": 0.1, "run.seed": 3})
    assert (child.optimize.beta, child.run.seed, child.optimize.lr) == (0.1, 3, Params().optimize.lr)
    with pytest.raises(ParamsError, match=r"optimize\.lr"):
        apply(Params(), {"optimize.lr": -1.0})


def test_sweeping_the_algorithm_pretrains_the_value_net_for_ctrl():
    s = plan(None, ["optimize.algorithm=[ctrl,ddpo]", "optimize.batch_size=8"])
    assert s.base.optimize.algorithm == "ctrl"
    s = plan(None, ["optimize.algorithm=ddpo", "optimize.lr=[0.001,0.003]", "optimize.batch_size=8"])
    assert s.base.optimize.algorithm == "ddpo"


# --- the compiled sweep --------------------------------------------------------------------------------


def test_the_compiled_sweep_fans_out_in_a_parallel_for_and_registers_after_the_collect_step(tmp_path):
    s = plan(None, ["optimize.beta=[0.003,0.01,0.03]", "run.seed=[0,1]"])
    spec = yaml.safe_load(
        Path(compile_sweep(str(tmp_path / "sweep.yaml"), s, parallelism=3, max_kl=0.5)).read_text()
    )
    root = spec["root"]["dag"]["tasks"]
    loops = {name: t for name, t in root.items() if "parameterIterator" in t}
    assert len(loops) == 1
    ((loop_name, loop),) = loops.items()
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert len(json.loads(loop["parameterIterator"]["items"]["raw"])) == 6
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"child-params", "ctrl-optimize", "evaluate"}
    assert loop_name in root["collect-front"]["dependentTasks"]
    assert "collect-front" in root["register"]["dependentTasks"]
    assert {"fetch-checkpoint", "pretrain-value"} <= set(root) and loop_name not in root[
        "pretrain-value"
    ].get("dependentTasks", [])  # fetched and pretrained once, before the children
    assert root["collect-front"]["inputs"]["parameters"]["max_kl"]["runtimeValue"]["constant"] == 0.5
    assert not root["register"]["cachingOptions"].get("enableCache")  # reads the registry's champion


def test_ctrl_sweep_out_takes_its_parallelism_from_the_chart(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("sweep:\n  parallelism: 4\n")
    out = tmp_path / "sweep.yaml"
    r = CliRunner().invoke(main, ["sweep", "--params", str(REPO / "params.yaml"), "--set",
                                  "optimize.beta=[0.003,0.03]", "-f", str(values), "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    tasks = next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
    (loop,) = [t for t in tasks.values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    r = CliRunner().invoke(main, ["sweep", "--set", "model.lora_rank=[4,8]", "--out", str(out)])
    assert r.exit_code == 2 and "cannot sweep model.lora_rank" in r.output


# --- the front and the best child -----------------------------------------------------------------------


def _cell(gain: float, kl: float) -> dict:
    return {"gain": gain, "gain_ci": 0.01, "kl_exact": kl, "kl_thm31": kl, "kl": kl}


def test_the_best_child_is_the_best_mean_gain_within_the_kl_budget_and_its_best_seed():
    s = plan(None, ["optimize.beta=[0.003,0.03]", "run.seed=[0,1]"])
    # beta 0.003: more gain, more KL; beta 0.03: less of both (children: (0.003,0) (0.003,1) (0.03,0) (0.03,1))
    cells = [_cell(0.30, 2.0), _cell(0.20, 1.6), _cell(0.10, 0.3), _cell(0.14, 0.5)]
    evals = [{"evaluation": {"sde": {"20": c}}, "wall_s": 1.0} for c in cells]
    swept = [front_points.swept_values(p, s.keys) for p in s.params]
    points = front_points.points(s.params, swept, evals, [{"wall_s": 2.0}] * 4)
    assert [(p["knob"], p["value"], p["seed"], p["alg"]) for p in points][1] == (
        "optimize.beta",
        0.003,
        1,
        "ctrl",
    )
    assert points[0]["trajectories"] == Params().value.num_paths + 30 * 32 and points[0]["seconds"] == 3.0
    unlimited = front_points.summarise(points)
    assert front_points.best_child(points, unlimited) == 0
    budget = front_points.summarise(points, 1.0)
    assert budget["gain_at_kl"]["ctrl"]["1"]["value"] == 0.03
    assert front_points.best_child(points, budget, 1.0) == 3
    with pytest.raises(ValueError, match=r"within --max-kl 0\.1"):
        front_points.best_child(points, front_points.summarise(points, 0.1), 0.1)


# --- end to end -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_2x2_sweep_writes_one_front_and_registers_only_the_best_child(
    tmp_path, monkeypatch, tiny_params
):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["sweep", "--params", str(tiny_params), "--set", "optimize.beta=[0.003,0.03]", "--set", "run.seed=[0,1]",
            "--local", "--summary-out", "s.json"]  # fmt: skip
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s = json.loads(Path("s.json").read_text())

    doc = json.loads(Path(s["front"]).read_text())
    assert len(doc["points"]) == 4 and Path(s["plot"]).is_file()
    assert {"settings", "gain_at_kl", "reach_target", "trajectories_to_reach", "sweep"} <= set(doc)
    for p in doc["points"]:
        assert {
            "alg",
            "knob",
            "value",
            "seed",
            "gain_sde",
            "gain_ci",
            "kl_exact",
            "kl_thm31",
            "trajectories",
        } <= set(p)
        assert p["kl_exact"] is not None and p["knob"] == "optimize.beta"
    assert sorted((p["value"], p["seed"]) for p in doc["points"]) == [
        (0.003, 0),
        (0.003, 1),
        (0.03, 0),
        (0.03, 1),
    ]
    assert len(doc["settings"]) == 2 and all(r["seeds"] == [0, 1] for r in doc["settings"])
    best = doc["sweep"]["best"]
    mean_gain = {r["value"]: r["gain"] for r in doc["settings"]}
    assert mean_gain[doc["points"][best]["value"]] == max(mean_gain.values())

    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions("name='ctrl-sweep'")
    assert len(versions) == 1 and s["registered"]["version"] == 1
    run = client.get_run(versions[0].run_id)
    assert float(run.data.params["optimize__beta"]) == doc["points"][best]["swept"]["optimize.beta"]
    assert int(run.data.params["run__seed"]) == doc["points"][best]["swept"]["run.seed"]
    assert {"evaluation/front.json", "evaluation/front.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "evaluation")
    }
    # the shared steps' and the other children's live runs are finished; the best child's became the version's
    runs = client.search_runs([client.get_experiment_by_name("ctrl-digits").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.info.run_id for r in runs if r.data.tags.get("ctrl.sweep") != "not registered"] == [
        run.info.run_id
    ]
    assert "registered ctrl-sweep v1" in r.output and "optimize.beta" in r.output


def test_the_sweep_compiles_without_torch():
    from test_layers import imported_in_fresh_interpreter

    modules = [
        "pipelines.sweep",
        "components.collect_front.front_points",
        "components.child_params.component",
    ]
    assert not imported_in_fresh_interpreter(modules, ("torch",))


def test_ctrl_sweep_host_uploads_the_sweep_and_starts_one_run(monkeypatch, tmp_path):
    """``ctrl sweep --host``: the compiled sweep (its ParallelFor with the chart's parallelism) is uploaded as a
    version of pipeline ctrl-sweep and run once with the shared base parameters, against a local server that
    answers as the KFP v2beta1 API does (tests/kfp_api_server.py)."""
    from click.testing import CliRunner
    from kfp_api_server import KfpApiServer

    from pipelines.cli import main
    from pipelines.sweep import SWEEP_NAME

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    with KfpApiServer() as kfp:
        result = CliRunner().invoke(main, ["sweep", "--set", "optimize.beta=[0.003,0.01]", "--set", "run.seed=[0,1]",
                                           "--host", kfp.url, "--version-name", "0" * 40])  # fmt: skip
        assert result.exit_code == 0, result.output + repr(result.exception)
        out = json.loads(result.stdout.strip().splitlines()[-1])
        (upload,) = kfp.calls("POST", "/pipelines/upload")
        assert upload.query["name"] == SWEEP_NAME
        stored = kfp.versions[out["version_id"]]["pipeline_spec"]["pipeline_spec"]
        loops = [t for t in stored["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
        assert len(loops) == 1 and len(json.loads(loops[0]["parameterIterator"]["items"]["raw"])) == 4
        assert (
            loops[0]["iteratorPolicy"]["parallelismLimit"] == out["parallelism"] == 2
        )  # the chart's default
        (run,) = kfp.runs.values()
        assert run["pipeline_version_reference"]["pipeline_version_id"] == out["version_id"]
        assert out["children"] == 4
