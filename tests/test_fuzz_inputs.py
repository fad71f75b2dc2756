"""Property-based tests over params.yaml and the CLI's flags (hypothesis).

Every invalid input -- wrong type, out-of-range or non-finite number, unknown block or key, unknown enum
value, malformed YAML, malformed ``--set`` -- must be rejected by ``ctrl_core.params`` with a message that
names the offending field, and through the real ``ctrl`` CLI before any heavy work: exit code 2 (usage
error), no output folder, no MLflow database (so no run and no model version), in well under a second.
The strategies are derived from the schema itself, so a new field is fuzzed without touching this file.
"""

from __future__ import annotations

import json
import math
import os
import time
import typing

import annotated_types
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrl_core.params import (
    BLOCKS,
    Params,
    ParamsError,
    flatten,
    from_json,
    load,
    parse_override,
    unflatten,
    validate,
)
from pipelines.cli import main

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI_BUDGET_S = 3.0  # an invalid invocation must return long before any step could have started

# -- the schema, read from the models ---------------------------------------------------------------------

FIELDS: dict[tuple[str, str], typing.Any] = {
    (block, key): info
    for block, block_info in Params.model_fields.items()
    for key, info in block_info.annotation.model_fields.items()
}


def _kind(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "list"
    if origin is dict or annotation is dict:
        return "dict"
    if origin is typing.Literal:
        return "str"
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation]


KIND = {path: _kind(info.annotation) for path, info in FIELDS.items()}

# Range rules: the pydantic constraints (ge/gt/le) plus the config models' own rules (ctrl_core/config.py).
RANGES: dict[tuple[str, str], tuple[str, float]] = {}
for (block, key), info in FIELDS.items():
    for m in info.metadata:
        for cls, op in ((annotated_types.Ge, "ge"), (annotated_types.Gt, "gt"), (annotated_types.Le, "le")):
            if isinstance(m, cls):
                RANGES[(block, key)] = (op, getattr(m, op))
RANGES.update({
    ("optimize", k): v for k, v in {
        "iterations": ("ge", 0), "batch_size": ("ge", 2), "train_steps": ("ge", 2), "train_timesteps": ("ge", 1),
        "beta": ("ge", 0), "fd_scale": ("gt", 0), "clip_range": ("gt", 0), "ppo_epochs": ("ge", 1),
        "minibatch_size": ("ge", 1), "lr": ("gt", 0), "value_lr": ("gt", 0), "value_batch_size": ("ge", 1),
        "checkpoint_every": ("ge", 0), "max_grad_norm": ("gt", 0), "weight_decay": ("ge", 0),
        "advantage_clip": ("ge", 0),
    }.items()
})  # fmt: skip
RANGES.update({
    ("qlearning", k): v for k, v in {
        "iterations": ("ge", 0), "batch_size": ("ge", 2), "train_steps": ("ge", 2), "reward_weight": ("ge", 0),
        "theta": ("gt", 0), "ratio_samples": ("ge", 0), "lr": ("gt", 0), "critic_lr": ("gt", 0),
        "actor_epochs": ("ge", 1), "max_grad_norm": ("gt", 0), "delta_clip": ("ge", 0),
    }.items()
})  # fmt: skip
ENUMS = {
    ("qlearning", "start"), ("qlearning", "rollout_solver"), ("qlearning", "critic_target"), ("qlearning", "baseline"),
    ("optimize", "algorithm"), ("optimize", "advantage"), ("optimize", "advantage_norm"),
    ("optimize", "time_sampling"), ("optimize", "value_xhat"), ("optimize", "lr_decay"), ("optimize", "solver"),
    ("reward", "name"),
}  # fmt: skip

# -- strategies -----------------------------------------------------------------------------------------------

_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "t", "f", "nan", "inf"}
words = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda w: w not in _YAML_WORDS)
junk_list = st.lists(st.integers(-5, 5), min_size=1, max_size=3)
junk_dict = st.dictionaries(words, st.integers(), min_size=1, max_size=2)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
fractional = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x))

WRONG_TYPE = {
    "int": st.one_of(words, junk_list, junk_dict, fractional),
    "float": st.one_of(words, junk_list, junk_dict, non_finite),
    "bool": st.one_of(words, junk_list, junk_dict, st.integers(2, 100)),
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), junk_list, junk_dict, st.booleans()),
    "list": st.one_of(st.integers(), words, junk_dict),
    "dict": st.one_of(st.integers(), words, junk_list),
}


def _below(op: str, bound: float, kind: str):
    """Values that violate ``op bound`` (ge/gt: too small; le: too large)."""
    if op == "le":
        return st.integers(int(bound) + 1, int(bound) + 10**6)
    top = bound - 1 if op == "ge" else bound
    ints = st.integers(-(10**6), int(math.floor(top)))
    if kind == "int":
        return ints
    return st.one_of(ints.map(float), st.floats(-1e6, top, allow_nan=False, exclude_max=op == "ge"))


@st.composite
def invalid_field(draw) -> tuple[dict, str]:
    """(raw params, the field name the error must mention)."""
    how = draw(st.sampled_from(["type", "range", "enum", "unknown_key", "unknown_block", "eta", "list_item"]))
    if how == "unknown_block":
        block = draw(words.filter(lambda w: w not in BLOCKS))
        return {block: {"x": 1}}, block
    if how == "eta":
        return {
            "optimize": {"eta": draw(st.floats(1.01, 1e3) | st.floats(-1e3, -1.01) | st.just(0.5))}
        }, "optimize.eta"
    if how == "list_item":
        path = draw(
            st.sampled_from([("value", "candidates"), ("evaluate", "steps"), ("evaluate", "samplers")])
        )
        bad = {
            "candidates": words,
            "steps": st.integers(-100, 0),
            "samplers": words.filter(lambda w: w not in ("sde", "ode", "heun")),
        }
        items = draw(st.lists(bad[path[1]], min_size=1, max_size=3))
        return {path[0]: {path[1]: items}}, ".".join(path)
    if how == "unknown_key":
        block = draw(st.sampled_from(BLOCKS))
        key = draw(words.filter(lambda w: (block, w) not in FIELDS))
        return {block: {key: 1}}, f"{block}.{key}"
    if how == "range":
        block, key = draw(st.sampled_from(sorted(RANGES)))
        op, bound = RANGES[(block, key)]
        return {block: {key: draw(_below(op, bound, KIND[(block, key)]))}}, f"{block}.{key}"
    if how == "enum":
        block, key = draw(st.sampled_from(sorted(ENUMS)))
        return {block: {key: draw(words.map(lambda w: w + "_x"))}}, f"{block}.{key}"
    block, key = draw(st.sampled_from(sorted(FIELDS)))
    value = draw(WRONG_TYPE[KIND[(block, key)]])
    return {block: {key: value}}, f"{block}.{key}"


def _yaml_scalar(value) -> str:
    """The text of ``--set block.key=<value>`` that YAML reads back as ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


# -- params.validate / load ------------------------------------------------------------------------------------


@FAST
@given(case=invalid_field())
def test_validate_rejects_and_names_the_field(case):
    raw, field = case
    with pytest.raises(ParamsError) as info:
        validate(raw)
    assert field in str(info.value), (raw, str(info.value))


@FAST
@given(case=invalid_field(), shape=st.sampled_from(["file", "set"]))
def test_load_rejects_from_a_file_or_an_override(tmp_path_factory, case, shape):
    raw, field = case
    ((block, inner),) = raw.items()
    ((key, value),) = inner.items()
    if shape == "file":
        path = tmp_path_factory.mktemp("p") / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        call = lambda: load(path)  # noqa: E731
    else:
        call = lambda: load(None, [f"{block}.{key}={_yaml_scalar(value)}"])  # noqa: E731
    with pytest.raises(ParamsError) as info:
        call()
    assert field in str(info.value), (raw, str(info.value))


@FAST
@given(item=st.one_of(
    words,  # no "="
    st.builds(lambda k, v: f"{k}={v}", words, words),  # no block
    st.builds(lambda k, v: f".{k}={v}", words, words),
    st.builds(lambda b, k: f"{b}..{k}=1", st.sampled_from(BLOCKS), words),
    st.builds(lambda b, k: f"{b}.{k}=", st.sampled_from(BLOCKS), words),  # an empty value is YAML null
    st.builds(lambda b, v: f"{b}.name=[{v}", st.sampled_from(["run", "register"]), words),  # bad YAML
))  # fmt: skip
def test_malformed_set_strings_are_rejected(item):
    key = item.split("=", 1)[0]
    with pytest.raises(ParamsError) as info:
        load(None, [item])
    message = str(info.value)
    assert key.strip() in message or item in message, message


MALFORMED_YAML = [
    "run: [1, 2\n",
    "run:\n  name: x\n bad: 1\n",
    "{{",
    "run: {name: x\n",
    "\t- tab\n",
    "!!python/object/apply:os.system ['touch PWNED']\n",  # safe_load refuses code-constructing tags
    "run: !!python/name:os.system\n",
]


@pytest.mark.parametrize("text", MALFORMED_YAML)
def test_malformed_yaml_is_rejected_without_side_effects(tmp_path, text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "just a string\n"])
def test_a_document_that_is_not_a_mapping_is_rejected(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="mapping of blocks"):
        load(path)


@FAST
@given(block=st.sampled_from(BLOCKS), value=st.one_of(st.integers(), words, junk_list))
def test_a_block_that_is_not_a_mapping_is_named(tmp_path_factory, block, value):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(yaml.safe_dump({block: value}))
    with pytest.raises(ParamsError, match=block):
        load(path)
    with pytest.raises(ParamsError, match=block):  # and an override into it says it is not a block
        load(path, [f"{block}.x=1"])


# -- valid parameters: round trips ----------------------------------------------------------------------------


@st.composite
def valid_params(draw) -> Params:
    return validate({
        "run": {"name": draw(words), "seed": draw(st.integers(0, 2**31)), "resume": draw(st.booleans())},
        "model": {"lora_rank": draw(st.integers(1, 256))},
        "value": {"candidates": draw(st.lists(st.sampled_from(["cos_sin", "linear", "rm_only", "f_only"]), min_size=1, max_size=4, unique=True)),
                  "lr": draw(st.floats(1e-6, 1.0))},
        "optimize": {"beta": draw(st.floats(0, 10)), "iterations": draw(st.integers(0, 1000)),
                     "algorithm": draw(st.sampled_from(["ctrl", "ddpo"])), "solver": "ddpm"},
        "evaluate": {"steps": draw(st.lists(st.integers(1, 1000), min_size=1, max_size=5)),
                     "samplers": draw(st.lists(st.sampled_from(["sde", "ode"]), min_size=1, max_size=2, unique=True))},
        "register": {"tolerance": draw(st.floats(0, 1)), "min_gain": draw(st.floats(-1, 1))},
    })  # fmt: skip


@FAST
@given(params=valid_params())
def test_valid_params_round_trip(params):
    assert unflatten(flatten(params)) == params
    # KFP hands dict/list parameters over as JSON strings: unflatten decodes them
    as_strings = {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flatten(params).items()}
    assert unflatten(as_strings) == params
    assert from_json(json.dumps(params.model_dump())) == params
    assert from_json(json.dumps(params.model_dump())).digest() == params.digest()
    overrides = [f"{k.replace('__', '.', 1)}={_yaml_scalar(v)}" for k, v in flatten(params).items()]
    assert load(None, overrides) == params


@settings(max_examples=20, deadline=None)
@given(block=st.sampled_from(BLOCKS))
def test_parse_override_reads_yaml_values(block):
    assert parse_override(f"{block}.k=[1, 2]") == ([block, "k"], [1, 2])
    assert parse_override(f"{block}.k = x=y") == ([block, "k"], "x=y")


# -- the real CLI ------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path):
    """Invoke ``ctrl`` in a fresh folder with MLflow pointed at a sqlite file there; report what it left."""
    runner = CliRunner()
    counter = iter(range(10**6))

    def invoke(args: list[str], files: dict[str, str] | None = None):
        work = tmp_path / f"w{next(counter)}"
        work.mkdir()
        for name, text in (files or {}).items():
            (work / name).write_text(text)
        db = work / "tracking.db"
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "CTRL_CHECKPOINT_ROOT": str(work / "ckpts")}
        cwd = os.getcwd()
        os.chdir(work)
        try:
            t0 = time.perf_counter()
            result = runner.invoke(main, args, env=env)
            elapsed = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
        left = sorted(p.name for p in work.iterdir() if p.name not in (files or {}))
        return result, elapsed, left, db

    return invoke


def _assert_rejected_cleanly(result, elapsed, left, db, field: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert field in result.output, result.output
    assert left == [], f"an invalid invocation left {left}"  # no outputs/, no mlflow.db, no checkpoints
    assert not db.exists()  # so no MLflow experiment, run or model version
    assert elapsed < CLI_BUDGET_S, f"took {elapsed:.2f}s: heavy work started before validation?"


@CLI
@given(case=invalid_field())
def test_cli_run_rejects_bad_overrides_before_any_work(cli, case):
    raw, field = case
    ((block, inner),) = raw.items()
    ((key, value),) = inner.items()
    result, elapsed, left, db = cli(["run", "--set", f"{block}.{key}={_yaml_scalar(value)}"])
    _assert_rejected_cleanly(result, elapsed, left, db, field)


@CLI
@given(case=invalid_field())
def test_cli_run_rejects_bad_params_files_before_any_work(cli, case):
    raw, field = case
    result, elapsed, left, db = cli(["run", "--params", "p.yaml"], files={"p.yaml": yaml.safe_dump(raw)})
    _assert_rejected_cleanly(result, elapsed, left, db, field)


@pytest.mark.parametrize(
    "args,field",
    [
        (["compile", "--out", "pipeline.yaml", "--set", "optimize.beta=-1"], "optimize.beta"),
        (["step", "fetch", "--set", "checkpoint.sha256=xyz"], "checkpoint.sha256"),
        (["step", "register", "--set", "register.tolerance=.inf"], "register.tolerance"),
        (["promote", "m", "1", "--set", "register.min_gain=abc"], "register.min_gain"),
        (["run", "--set", "evaluate.samplers=[]"], "evaluate.samplers"),
        (["run", "--set", "reward.options={nope: 1}"], "reward.options"),
        (["run", "--set", "optimize.solver=rk4"], "optimize.solver"),
        (["run", "--set", "optimize.max_grad_norm=-1"], "optimize.max_grad_norm"),
        (["run", "--params", "missing.yaml"], "missing.yaml"),
        (["run", "--set", "nodot=1"], "nodot"),
    ],
)
def test_every_command_validates_first(cli, args, field):
    _assert_rejected_cleanly(*cli(args), field)


def test_cli_malformed_yaml_file(cli):
    result, elapsed, left, db = cli(["run", "--params", "p.yaml"], files={"p.yaml": "run: [1, 2\n"})
    _assert_rejected_cleanly(result, elapsed, left, db, "not valid YAML")


def test_schema_is_fully_fuzzed():
    """Every field has a wrong-type strategy; a new field type would need one here."""
    assert set(KIND.values()) <= set(WRONG_TYPE)
    assert {b for b, _ in RANGES} >= {"optimize", "value", "evaluate", "model", "register"}
