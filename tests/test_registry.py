"""MLflow registration + promotion gate (pipelines/registry.py) against a REAL mlflow server (no mocks).

One ``mlflow server`` subprocess is shared by the session; tests isolate themselves by model name and
run_key. Only the gate tests and the local-sqlite test run without the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import registry
from pipelines.registry import GateConfig, champion, evaluation_gate, promote, register_run

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _cell(base: float, tuned: float, kl: float = 0.05) -> dict:
    return {"base": base, "tuned": tuned, "gain": tuned - base, "kl": kl}


GOOD = {"ddim": {"10": _cell(0.50, 0.70), "50": _cell(0.60, 0.80)}, "euler": {"20": _cell(0.55, 0.75)}}
# Still improves on its base everywhere, but is worse than GOOD at ddim@50.
WORSE = {"ddim": {"10": _cell(0.50, 0.70), "50": _cell(0.60, 0.65)}, "euler": {"20": _cell(0.55, 0.75)}}


@pytest.fixture
def model_name(request) -> str:
    return f"{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def adapter_dir(tmp_path) -> str:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return str(d)


def _register(uri: str | None, name: str, key: str, evaluation: dict, **kw):
    kw.setdefault("artifacts", {})
    kw.setdefault("gate", GateConfig())
    return register_run(
        model_name=name, run_key=key, params={"train": {"lr": 1e-4, "steps": 10}, "sampler": "ddim"},
        metrics={"loss": 0.25}, evaluation=evaluation, lineage={"dataset": "toy-v1", "git": "abc123"},
        tracking_uri=uri, **kw,
    )  # fmt: skip


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _live_versions(uri: str, name: str) -> list[int]:
    return sorted(int(v.version) for v in _client(uri).search_model_versions(f"name = '{name}'"))


def _active_runs(uri: str, key: str) -> list:
    from mlflow.entities import ViewType

    c = _client(uri)
    exp = c.get_experiment_by_name("ctrl-pipeline")
    return c.search_runs(
        [exp.experiment_id], f"tags.`ctrl.run_key` = '{key}'", run_view_type=ViewType.ACTIVE_ONLY
    )


# ------------------------------------------------------------------------------------ gate (no MLflow)


def test_gate_passes_without_champion():
    ok, reason = evaluation_gate(GOOD, None, GateConfig(min_gain=0.1))
    assert ok, reason
    assert "no champion" in reason


def test_gate_fails_on_one_cell_and_names_it():
    ev = json.loads(json.dumps(GOOD))
    ev["euler"]["20"] = _cell(0.55, 0.56)
    ok, reason = evaluation_gate(ev, None, GateConfig(min_gain=0.1))
    assert not ok
    assert "euler@20" in reason and "ddim@" not in reason
    assert "1/3" in reason


def test_gate_rejects_missing_or_nan_gain_and_empty_evaluation():
    assert not evaluation_gate(
        {"ddim": {"10": {"base": 0.5, "tuned": 0.6, "gain": float("nan")}}}, None, GateConfig()
    )[0]
    # gain absent -> derived from tuned - base
    assert evaluation_gate({"ddim": {"10": {"base": 0.5, "tuned": 0.6}}}, None, GateConfig(min_gain=0.05))[0]
    assert not evaluation_gate({}, None, GateConfig())[0]


def test_gate_champion_comparison_and_tolerance():
    ok, reason = evaluation_gate(WORSE, GOOD, GateConfig())
    assert not ok and "ddim@50" in reason and "champion" in reason
    assert "ddim@10" not in reason
    # 0.65 >= 0.80 - 0.2: within tolerance
    assert evaluation_gate(WORSE, GOOD, GateConfig(tolerance=0.2))[0]
    assert not evaluation_gate(WORSE, GOOD, GateConfig(tolerance=0.1))[0]
    assert evaluation_gate(WORSE, GOOD, GateConfig(require_no_worse_than_champion=False))[0]
    assert evaluation_gate(GOOD, WORSE, GateConfig())[0]
    assert evaluation_gate(GOOD, GOOD, GateConfig())[0]  # equal is not worse


def test_gate_compares_only_shared_cells():
    champ = {"ddim": {"50": _cell(0.6, 0.79)}, "dpm": {"8": _cell(0.1, 0.99)}}  # dpm absent from candidate
    ok, reason = evaluation_gate(GOOD, champ, GateConfig())
    assert ok and "1 shared" in reason
    ok, reason = evaluation_gate(GOOD, {"dpm": {"8": _cell(0.1, 0.2)}}, GateConfig())
    assert not ok and "not comparable" in reason


# ------------------------------------------------------------------------------ local sqlite, no server


def test_default_sqlite_uri_failed_run_and_large_evaluation_tag(tmp_path, monkeypatch, model_name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    # A logging failure marks the run FAILED and creates no version.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(registry, "_log_run", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _register(None, model_name, "local-k1", GOOD)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///mlflow.db"
    assert (tmp_path / "mlflow.db").exists()  # the documented default, relative to the cwd
    assert [r.info.status for r in _active_runs(uri, "local-k1")] == ["FAILED"]
    assert _live_versions(uri, model_name) == []

    # Evaluation JSON too long for a version tag -> stored as a pointer to the run's evaluation.json.
    monkeypatch.setattr(registry, "_VERSION_TAG_VALUE_LIMIT", 10)
    r1 = _register(None, model_name, "local-k1", GOOD)
    assert (r1.version, r1.created, r1.aliases) == (1, True, ["challenger", "champion"])
    tag = _client(uri).get_model_version(model_name, "1").tags["ctrl.evaluation"]
    assert tag == f"runs:/{r1.run_id}/evaluation.json"
    # The champion's evaluation is read back through that pointer: the worse model is refused.
    r2 = _register(None, model_name, "local-k2", WORSE)
    assert (r2.version, r2.promoted, r2.gate_passed) == (2, False, False)
    assert "ddim@50" in r2.gate_reason
    assert champion(model_name) == 1


# ------------------------------------------------------------------------------------ real MLflow server


def test_register_idempotent_gate_and_promote(mlflow_server, model_name, adapter_dir, tmp_path):
    uri = mlflow_server
    cfg = tmp_path / "config.yaml"
    cfg.write_text("lr: 1e-4\n")
    r1 = _register(
        uri, model_name, f"{model_name}-a", GOOD, artifacts={"config": str(cfg)}, model_dir=adapter_dir
    )
    assert (r1.version, r1.created, r1.promoted, r1.gate_passed) == (1, True, True, True)
    assert r1.aliases == ["challenger", "champion"]

    c = _client(uri)
    mv = c.get_model_version(model_name, "1")
    assert mv.source.endswith(f"{r1.run_id}/artifacts/model")
    assert mv.tags["ctrl.run_key"] == f"{model_name}-a" and mv.tags["gate.passed"] == "true"
    assert json.loads(mv.tags["ctrl.evaluation"]) == GOOD
    run = c.get_run(r1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0001" and run.data.tags["lineage.dataset"] == "toy-v1"
    assert run.data.metrics["eval/ddim/steps50/tuned"] == pytest.approx(0.80)
    assert run.data.metrics["loss"] == pytest.approx(0.25)
    paths = {f.path for f in c.list_artifacts(r1.run_id)}
    assert {"config", "evaluation.json", "model"} <= paths
    assert {f.path for f in c.list_artifacts(r1.run_id, "model")} == {
        "model/adapter_config.json", "model/adapter_model.safetensors",
    }  # fmt: skip

    # Same run_key again: same version, nothing new.
    again = _register(uri, model_name, f"{model_name}-a", GOOD)
    assert (again.version, again.run_id, again.created) == (1, r1.run_id, False)
    assert _live_versions(uri, model_name) == [1]
    assert len(_active_runs(uri, f"{model_name}-a")) == 1

    # A worse model: challenger only, champion stays.
    r2 = _register(uri, model_name, f"{model_name}-b", WORSE)
    assert (r2.version, r2.created, r2.promoted, r2.gate_passed) == (2, True, False, False)
    assert r2.aliases == ["challenger"]
    assert "ddim@50" in r2.gate_reason
    assert champion(model_name, tracking_uri=uri) == 1

    ok, msg = promote(model_name, 2, tracking_uri=uri)
    assert not ok and "ddim@50" in msg
    assert champion(model_name, tracking_uri=uri) == 1
    with pytest.raises(ValueError):
        promote(model_name, 2, force=True, tracking_uri=uri)
    with pytest.raises(ValueError):
        promote(model_name, 2, force=True, reason="  ", tracking_uri=uri)
    ok, msg = promote(model_name, 2, force=True, reason="x", tracking_uri=uri)
    assert ok and "forced" in msg
    assert champion(model_name, tracking_uri=uri) == 2
    tags = c.get_model_version(model_name, "2").tags
    assert tags["promotion.forced"] == "true" and tags["promotion.reason"] == "x"
    assert promote(model_name, 2, tracking_uri=uri) == (True, "v2 is already the champion")
    # Gated promotion back to the better model passes and is not marked forced.
    ok, msg = promote(model_name, 1, tracking_uri=uri)
    assert ok, msg
    assert champion(model_name, tracking_uri=uri) == 1
    assert "promotion.forced" not in c.get_model_version(model_name, "1").tags


def test_crash_between_version_and_alias_converges(mlflow_server, model_name, monkeypatch):
    uri = mlflow_server
    real = registry._apply_aliases

    def crash(*a, **k):
        raise ConnectionError("simulated crash after create_model_version")

    monkeypatch.setattr(registry, "_apply_aliases", crash)
    with pytest.raises(ConnectionError):
        _register(uri, model_name, f"{model_name}-k", GOOD)
    assert _live_versions(uri, model_name) == [1]
    assert _client(uri).get_model_version(model_name, "1").aliases == []

    monkeypatch.setattr(registry, "_apply_aliases", real)
    r = _register(uri, model_name, f"{model_name}-k", GOOD)
    assert (r.version, r.created, r.aliases, r.promoted) == (1, False, ["challenger", "champion"], True)
    assert _live_versions(uri, model_name) == [1]
    assert len(_active_runs(uri, f"{model_name}-k")) == 1


def test_losing_a_race_deletes_own_version_and_run(mlflow_server, model_name, monkeypatch):
    """Deterministic race: after we saw no run/version, a rival registers the same run_key completely."""
    uri = mlflow_server
    key = f"{model_name}-race"
    real = registry._create_run
    rival = {}

    def rival_first(*a, **k):
        monkeypatch.setattr(registry, "_create_run", real)  # the rival itself runs unpatched
        rival["result"] = _register(uri, model_name, key, GOOD)
        return real(*a, **k)

    monkeypatch.setattr(registry, "_create_run", rival_first)
    r = _register(uri, model_name, key, GOOD)
    assert rival["result"].created is True
    assert (r.version, r.created, r.run_id) == (1, False, rival["result"].run_id)
    assert r.aliases == ["challenger", "champion"]
    assert _live_versions(uri, model_name) == [1]  # our version 2 was deleted ...
    assert [x.info.run_id for x in _active_runs(uri, key)] == [r.run_id]  # ... and so was our run


_WORKER = r"""
import dataclasses, json, os, sys, time
uri, name, key, ready, go = sys.argv[1:6]
from pipelines.registry import GateConfig, register_run
import mlflow  # pay the import cost before the start barrier
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
ev = {"ddim": {"10": {"base": 0.5, "tuned": 0.7, "gain": 0.2, "kl": 0.05}}}
res = register_run(model_name=name, run_key=key, params={"p": 1}, metrics={"loss": 0.1}, evaluation=ev,
                   artifacts={}, lineage={}, gate=GateConfig(), tracking_uri=uri)
print("RESULT " + json.dumps(dataclasses.asdict(res)))
"""


def test_concurrent_same_run_key_leaves_one_version(mlflow_server, model_name, tmp_path):
    uri = mlflow_server
    key = f"{model_name}-conc"
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        args = [sys.executable, "-c", _WORKER, uri, model_name, key, str(ready[-1]), str(go)]
        procs.append(
            subprocess.Popen(
                args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in ready):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for (out, err), p in zip(outs, procs, strict=True):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    assert results[0]["version"] == results[1]["version"]
    assert results[0]["run_id"] == results[1]["run_id"]
    assert sorted(r["created"] for r in results) == [False, True]
    assert _live_versions(uri, model_name) == [results[0]["version"]]
    assert [r.info.run_id for r in _active_runs(uri, key)] == [results[0]["run_id"]]
    assert champion(model_name, tracking_uri=uri) == results[0]["version"]


# ------------------------------------------- crash (SIGKILL) at every point of a registration, then retry

_CRASH_WORKER = r"""
import json, sys
uri, name, key, ev = sys.argv[1:5]
from pipelines.registry import GateConfig, register_run
register_run(model_name=name, run_key=key, params={"p": 1}, metrics={"loss": 0.1}, evaluation=json.loads(ev),
             artifacts={}, lineage={}, gate=GateConfig(), tracking_uri=uri)
print("NOT KILLED")
"""


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One local sqlite tracking store for the module (its schema migration is the slow part)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('sqlite-mlflow') / 'mlflow.db'}"
    registry._client(uri).search_experiments()
    return uri


BETTER = {"ddim": {"10": _cell(0.50, 0.75), "50": _cell(0.60, 0.85)}, "euler": {"20": _cell(0.55, 0.80)}}


@pytest.mark.parametrize(
    "point,evaluation,champion_after",
    [
        ("after_create_run", BETTER, 2),
        ("after_create_version", BETTER, 2),
        ("after_gate_tags", WORSE, 1),
        ("after_challenger_alias", BETTER, 2),
    ],
    ids=["after_create_run", "after_create_version", "after_gate_tags-worse", "after_challenger_alias"],
)
def test_sigkill_during_registration_then_retry_converges(
    sqlite_uri, tmp_path, model_name, point, evaluation, champion_after
):
    """A process SIGKILLed anywhere in register_run (CTRL_FAULT_INJECT hook) leaves a state that one retry
    turns into exactly one version for the run_key, with aliases set and the gate respected."""
    uri = sqlite_uri
    assert _register(uri, model_name, f"{model_name}-champion", GOOD).promoted  # v1
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{registry.FAULT_ENV: point})
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_WORKER, uri, model_name, f"{model_name}-new", json.dumps(evaluation)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert champion(model_name, tracking_uri=uri) == 1  # a crash never promotes anything

    key = f"{model_name}-new"
    r = _register(uri, model_name, key, evaluation)  # the retry
    assert r.version == 2 and r.created is (point == "after_create_run")
    assert _live_versions(uri, model_name) == [1, 2]
    assert [x.info.status for x in _active_runs(uri, key)] == ["FINISHED"]
    assert r.aliases == (["challenger", "champion"] if champion_after == 2 else ["challenger"])
    assert champion(model_name, tracking_uri=uri) == champion_after
    tags = _client(uri).get_model_version(model_name, "2").tags
    assert tags["ctrl.aliases_applied"] == "true" and tags["gate.passed"] == str(champion_after == 2).lower()
    again = _register(uri, model_name, key, evaluation)  # and a further retry changes nothing
    assert (again.version, again.created, again.aliases) == (2, False, r.aliases)


# -------------------------------------------------------------- the gate never promotes a worse model

_SAMPLERS = st.sampled_from(["sde", "ode"])
_STEPS = st.sampled_from(["10", "20", "50"])
_REWARD = st.floats(-10, 10, allow_nan=False)


@st.composite
def _evaluations(draw, min_cells: int = 1) -> dict:
    cells = draw(
        st.dictionaries(st.tuples(_SAMPLERS, _STEPS), st.tuples(_REWARD, _REWARD), min_size=min_cells)
    )
    out: dict = {}
    for (sampler, steps), (base, tuned) in cells.items():
        cell = _cell(base, tuned)
        if draw(st.integers(0, 20)) == 0:  # now and then a broken cell
            cell["tuned"] = draw(st.sampled_from([float("nan"), None, "x"]))
        out.setdefault(sampler, {})[steps] = cell
    return out


def _worse_than(candidate: dict, champ: dict, tolerance: float) -> bool:
    """Independent oracle: a shared cell where the candidate is below the champion by more than tolerance
    (or not comparable: non-numeric / NaN)."""
    for sampler, cells in candidate.items():
        for steps, cell in cells.items():
            if steps in champ.get(sampler, {}):
                try:
                    mine, theirs = float(cell["tuned"]), float(champ[sampler][steps]["tuned"])
                except (TypeError, ValueError):
                    return True
                if not mine >= theirs - tolerance:
                    return True
    return False


@settings(max_examples=150, deadline=None)
@given(candidate=_evaluations(), champ=_evaluations(), tolerance=st.floats(0, 1), min_gain=st.floats(-1, 1))
def test_gate_never_passes_a_model_worse_than_the_champion(candidate, champ, tolerance, min_gain):
    ok, reason = evaluation_gate(candidate, champ, GateConfig(min_gain=min_gain, tolerance=tolerance))
    if _worse_than(candidate, champ, tolerance):
        assert not ok, reason
    if ok:
        shared = {(s, k) for s, c in candidate.items() for k in c} & {
            (s, k) for s, c in champ.items() for k in c
        }
        assert shared, reason  # never promoted blind
        assert all(float(c["gain"]) >= min_gain for cells in candidate.values() for c in cells.values())


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sequence=st.lists(_evaluations(min_cells=2), min_size=3, max_size=5),
    tolerance=st.sampled_from([0.0, 0.1]),
)
def test_registering_a_sequence_never_moves_champion_to_a_worse_model(sqlite_uri, sequence, tolerance):
    uri = sqlite_uri
    name = f"seq-{uuid.uuid4().hex[:6]}"
    champ_eval = None
    for i, evaluation in enumerate(sequence):
        r = _register(uri, name, f"{name}-k{i}", evaluation, gate=GateConfig(tolerance=tolerance))
        if r.promoted:
            assert champ_eval is None or not _worse_than(evaluation, champ_eval, tolerance), r.gate_reason
            champ_eval = evaluation
        assert champion(name, tracking_uri=uri) == (
            r.version if r.promoted else champion(name, tracking_uri=uri)
        )


# ------------------------------------------------ the version's model as an MLflow LoggedModel (logged_model=)

_BUILD = r"""
def build(path, mlflow_model):  # a minimal MLflow model folder (the pipeline's is pipelines.mlflow_model.build_model)
    import os
    os.makedirs(path)
    mlflow_model.add_flavor("ctrl_test")
    mlflow_model.save(os.path.join(path, "MLmodel"))
    with open(os.path.join(path, "weights.txt"), "w") as fh:
        fh.write("w")
"""
_namespace: dict = {}
exec(_BUILD, _namespace)  # noqa: S102 - the same builder in this process and in the crash worker
_build = _namespace["build"]

_MODEL_CRASH_WORKER = (
    _BUILD
    + r"""
import json, sys
uri, name, key, ev = sys.argv[1:5]
from pipelines.registry import GateConfig, register_run
register_run(model_name=name, run_key=key, params={"p": 1}, metrics={"loss": 0.1}, evaluation=json.loads(ev),
             artifacts={}, lineage={}, gate=GateConfig(), tracking_uri=uri, logged_model=build)
print("NOT KILLED")
"""
)


def _logged_models(uri: str, key: str) -> list:
    c = _client(uri)
    exp = c.get_experiment_by_name("ctrl-pipeline")
    return list(c.search_logged_models([exp.experiment_id], filter_string=f"tags.`ctrl.run_key` = '{key}'"))


def test_logged_model_is_the_versions_source_and_survives_a_crash_and_a_retry(
    sqlite_uri, tmp_path, model_name
):
    """The version's source is a READY LoggedModel of its run; a SIGKILL after the model's upload (before the run
    is FINISHED) leaves no version, and the retry makes one version with its own READY model; retries reuse it."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    uri, key = sqlite_uri, f"{model_name}-m"
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{registry.FAULT_ENV: "after_model_artifacts"}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _MODEL_CRASH_WORKER, uri, model_name, key, json.dumps(GOOD)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert (
        _live_versions(uri, model_name) == []
    )  # the run never finished: nothing to register, nothing reused
    assert [m.status for m in _logged_models(uri, key)] == [LoggedModelStatus.PENDING]

    r = _register(uri, model_name, key, GOOD, logged_model=_build)
    assert (r.version, r.created, r.promoted) == (1, True, True)
    c = _client(uri)
    mv = c.get_model_version(model_name, "1")
    assert mv.source == f"models:/{r.model_id}"
    model = c.get_logged_model(r.model_id)
    assert model.status == LoggedModelStatus.READY and model.source_run_id == r.run_id == mv.run_id
    assert c.get_run(r.run_id).data.tags["ctrl.model_id"] == r.model_id
    local = Path(c.download_artifacts(r.run_id, "", str(tmp_path / "run")))  # the run holds no model/ folder
    assert not (local / "model").exists()
    import mlflow

    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version_download_uri(model_name, "1"),
                                                   dst_path=str(tmp_path / "v"), tracking_uri=uri))  # fmt: skip
    assert (got / "weights.txt").read_text() == "w"
    assert (Model.load(str(got / "MLmodel")).model_id, Model.load(str(got / "MLmodel")).run_id) == (
        r.model_id,
        r.run_id,
    )

    again = _register(uri, model_name, key, GOOD, logged_model=_build)
    assert (again.version, again.created, again.model_id, again.run_id) == (1, False, r.model_id, r.run_id)
    assert sorted(m.status for m in _logged_models(uri, key)) == sorted(
        [LoggedModelStatus.PENDING, LoggedModelStatus.READY]
    )  # the crashed attempt's model stays, unreferenced (as its run does)
    with pytest.raises(ValueError, match="excludes model_dir"):
        _register(uri, model_name, f"{key}-2", GOOD, logged_model=_build, model_dir=str(tmp_path))
    assert _live_versions(uri, model_name) == [1]


def test_a_failing_model_build_fails_the_run_and_its_model_and_creates_no_version(sqlite_uri, model_name):
    from mlflow.entities import LoggedModelStatus

    uri, key = sqlite_uri, f"{model_name}-fail"

    def broken(path, mlflow_model):
        raise OSError("disk full while writing the model")

    with pytest.raises(OSError, match="disk full"):
        _register(uri, model_name, key, GOOD, logged_model=broken)
    assert _live_versions(uri, model_name) == []
    assert [x.info.status for x in _active_runs(uri, key)] == ["FAILED"]
    assert [m.status for m in _logged_models(uri, key)] == [LoggedModelStatus.FAILED]
    r = _register(uri, model_name, key, GOOD, logged_model=_build)  # a retry makes a new run and model
    assert (
        r.created
        and r.version == 1
        and _client(uri).get_logged_model(r.model_id).status == LoggedModelStatus.READY
    )


def test_losing_a_race_also_deletes_own_logged_model(sqlite_uri, model_name, monkeypatch):
    uri, key = sqlite_uri, f"{model_name}-race"
    real = registry._create_run
    rival = {}

    def rival_first(*a, **k):
        monkeypatch.setattr(registry, "_create_run", real)
        rival["result"] = _register(uri, model_name, key, GOOD, logged_model=_build)
        return real(*a, **k)

    monkeypatch.setattr(registry, "_create_run", rival_first)
    r = _register(uri, model_name, key, GOOD, logged_model=_build)
    assert (r.version, r.created, r.run_id, r.model_id) == (
        1,
        False,
        rival["result"].run_id,
        rival["result"].model_id,
    )
    assert _live_versions(uri, model_name) == [1]
    assert [m.model_id for m in _logged_models(uri, key)] == [r.model_id]  # ours was deleted with our run


def test_logged_model_through_a_tracking_server(mlflow_server, model_name, tmp_path, monkeypatch):
    """Over REST (proxied artifacts): the server resolves the models:/<model_id> source; the alias loads it."""
    import mlflow

    uri = mlflow_server
    r = _register(uri, model_name, f"{model_name}-srv", GOOD, logged_model=_build)
    assert r.promoted and _client(uri).get_model_version(model_name, "1").source == f"models:/{r.model_id}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@champion", dst_path=str(tmp_path)))
    assert (got / "weights.txt").read_text() == "w"
