"""ctrl_core/config.py: one declared config. Its defaults are params.yaml's, the engine's configurations are its
models, the names it validates against are the engine's, the documented table is generated from it, and it
(with the compile path) imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ctrl_core import config
from ctrl_core.params import ParamsError, flatten, load, unflatten, validate
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_schemas_defaults_are_params_yaml():
    """Loading with no file runs the experiment params.yaml describes: every key and every value equal."""
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = config.Params().model_dump()
    assert list(defaults) == list(shipped)
    for block, values in shipped.items():
        assert set(defaults[block]) == set(values), block
        for key, value in values.items():
            assert defaults[block][key] == value and type(defaults[block][key]) is type(value), (
                f"{block}.{key}"
            )
    assert load(None) == load(REPO / "params.yaml") == config.Params()


def test_the_engines_configurations_are_the_config_models():
    from ctrl_core.algorithms import OptimConfig
    from ctrl_core.qlearning import QLearningConfig

    assert OptimConfig is config.OptimizeConfig and QLearningConfig is config.QLearningConfig
    params = load(REPO / "params.yaml")
    assert params.optim_config() is params.optimize
    q = params.qlearning_config()
    assert type(q) is QLearningConfig and set(q.model_dump()) == set(params.qlearning.model_dump()) - {
        "start",
        "data",
        "width",
    }  # where the actor and the data come from: not the trainer's business
    assert q.reward_weight == params.qlearning.reward_weight == 2.0


def test_every_field_is_documented():
    for row in config.rows():
        assert len(row.description) > 10, row.key


def test_the_engines_names_are_the_configs():
    from ctrl_core import policy, value

    assert tuple(value.LINKS) == config.LINK_NAMES  # value.candidates is checked against these
    assert policy.SOLVERS is config.SOLVERS and policy.SOLVER_ALIASES is config.SOLVER_ALIASES
    assert {config.SOLVER_ALIASES.get(s, s) for s in config.ROLLOUT_SOLVERS} <= set(config.SOLVERS)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"optimize": {"beta": -1}}, "optimize.beta: must be >= 0, got -1.0"),
        (
            {"optimize": {"batch_size": 4, "reward_chunks": 5}},
            "optimize.reward_chunks: must be between 1 and",
        ),
        ({"optimize": {"solver": "rk4"}}, "optimize.solver: must be one of"),
        ({"optimize": {"max_grad_norm": -1}}, "optimize.max_grad_norm: must be > 0"),
        ({"optimize": {"weight_decay": -0.1}}, "optimize.weight_decay: must be >= 0"),
        ({"optimize": {"advantage_clip": -1}}, "optimize.advantage_clip: must be >= 0"),
        ({"optimize": {"eta": 0.5}}, "optimize.eta: must be -1 or 1 for CTRL"),
        ({"qlearning": {"theta": 0}}, "qlearning.theta: must be > 0"),
        ({"qlearning": {"rollout_solver": "heun"}}, "qlearning.rollout_solver: must be one of"),
        ({"qlearning": {"reward_weight": -2}}, "qlearning.reward_weight: must be >= 0"),
        (
            {"model": {"merged_sampling": True, "autocast": "bf16"}},
            "model.merged_sampling: must be false with",
        ),
        ({"reward": {"options": {"nope": 1}}}, "reward.options: got an unexpected keyword argument 'nope'"),
        ({"value": {"candidates": ["sigmoid"]}}, "value.candidates: unknown link function(s) ['sigmoid']"),
    ],
)
def test_rules_live_in_the_models_and_name_the_key_with_its_block(raw, message):
    with pytest.raises(ParamsError) as info:
        validate(raw)
    assert message in str(info.value)


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(ParamsError) as info:
        validate({"optimize": {"beta": -1, "lr": 0}, "qlearning": {"theta": 0}, "evaluate": {"steps": []}})
    text = str(info.value)
    assert all(k in text for k in ("optimize.beta:", "optimize.lr:", "qlearning.theta:", "evaluate.steps:"))


def test_the_old_qlearning_beta_is_refused_naming_its_new_name(tmp_path):
    want = (
        "qlearning.beta was renamed qlearning.reward_weight (the weight of the reward; optimize.beta is CTRL's "
        "KL weight)"
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"qlearning": {"beta": 2.0}}))
    for call in (
        lambda: load(path),
        lambda: load(None, ["qlearning.beta=2"]),
        lambda: unflatten({**flatten(config.Params()), "qlearning__beta": 2.0}),
    ):
        with pytest.raises(ParamsError) as info:
            call()
        assert want in str(info.value)
    with pytest.raises(ValueError, match="renamed qlearning.reward_weight"):
        config.QLearningConfig(beta=2.0)
    assert load(None, ["optimize.beta=0.5"]).optimize.beta == 0.5  # CTRL's KL weight keeps its name


def test_docs_params_md_is_the_generated_table():
    marker = "<!-- generated by `ctrl params --markdown`: edit ctrl_core/config.py, then regenerate -->\n"
    committed = (REPO / "docs" / "params.md").read_text()
    assert committed.split(marker, 1)[1] == config.markdown_table(), (
        "regenerate docs/params.md (ctrl params --markdown)"
    )
    assert CliRunner().invoke(main, ["params", "--markdown"]).output == config.markdown_table()


def test_ctrl_params_prints_every_key_type_default_and_description():
    out = CliRunner().invoke(main, ["params"]).output
    for row in config.rows():
        line = next(line for line in out.splitlines() if line.split()[:1] == [row.key])
        assert row.type in line and line.rstrip().endswith(json.dumps(row.default, ensure_ascii=False)), (
            row.key
        )
    assert "the weight of the reward" in out


def _fresh_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_config_and_the_compile_path_does_not_import_torch():
    loaded = _fresh_modules(
        "import ctrl_core, ctrl_core.config, ctrl_core.params, pipelines.pipeline, components"
    )
    assert "torch" not in loaded and "ctrl_core.algorithms" not in loaded
    assert "torch" not in _fresh_modules("import components.resolve_params.component as m; m.resolve_params")


def test_validating_and_compiling_does_not_import_torch(tmp_path):
    loaded = _fresh_modules(
        "from ctrl_core.params import load\nfrom pipelines.pipeline import compile_pipeline\n"
        f"compile_pipeline({str(tmp_path / 'p.yaml')!r}, load('params.yaml'))"
    )
    assert "torch" not in loaded


def test_resolve_params_runs_under_kfp_local(tmp_path):
    """The resolve-params component end to end through kfp.local's SubprocessRunner: KFP's executor loads
    components/resolve_params/component.py and returns the validated parameters."""
    from kfp import local

    from pipelines.pipeline import resolve_params

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    want = load(
        REPO / "params.yaml", ["optimize.beta=0.25", "qlearning.reward_weight=3", "evaluate.steps=[5]"]
    )
    task = resolve_params(**flatten(want))
    assert config.Params.model_validate_json(task.output) == want
