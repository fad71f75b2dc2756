"""A step on several nodes: the TrainJob its placement compiles (validated through the Kubeflow Trainer API's
published models), the chart's checks and RBAC for it, and its launcher run against a local server that
answers as the Kubernetes API does (tests/k8s_api_server.py) with the official client: a job that completes
(outputs copied into the task's artifact), one that fails (the error names the reason) and a cancelled one
(the TrainJob deleted). What only a cluster can show (the Trainer's webhook and controller, JobSet, torchrun
across nodes, SIGTERM from a cancelled KFP run reaching the task) is not verified here (docs/deploy.md)."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components import trainjob as T
from ctrl_core.params import Params
from pipelines import placement as P
from pipelines.pipeline import compile_pipeline
from tests.k8s_api_server import K8sApiServer, Script

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ctrl-pipeline"
CI_VALUES = CHART / "ci" / "test-values.yaml"
EXAMPLE = CHART / "examples" / "multinode-values.yaml"
ON_TWO_NODES = {
    "pipeline": {
        "steps": {
            "pretrain_value": {"nodes": 2},
            "ctrl_optimize": {"nodes": 2},
        }
    }
}


def _write(tmp_path: Path, values: dict, name: str = "v.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(values))
    return str(f)


def _executors(out: str) -> tuple[dict, dict]:
    spec, platform = (d for d in yaml.safe_load_all(Path(out).read_text()) if d)
    return spec["deploymentSpec"]["executors"], platform["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]


def _env(executor: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in executor["container"].get("env", [])}


# --- compile: the TrainJob of every golden placement -------------------------------------------------------


@pytest.mark.parametrize("values_name", ["defaults", "ci"])
def test_every_golden_placement_gives_a_trainjob_the_api_models_accept(tmp_path, values_name):
    """The golden compile tests' placements (the chart's defaults, the CI values) with the data-parallel steps on
    two nodes: each TrainJob reads back unchanged through the published models and carries the step's pool,
    GPUs, resources, /dev/shm, PVC and environment."""
    files = [] if values_name == "defaults" else [str(CI_VALUES)]
    one = P.load(CHART, files)
    two = P.load(CHART, [*files, _write(tmp_path, ON_TWO_NODES)])
    for step in ("pretrain_value", "ctrl_optimize"):
        s, doc = one.steps[step], two.steps[step].trainjob
        assert one.steps[step].trainjob is None  # one node: no TrainJob
        assert T.validated(doc) == doc  # raises on a field the API does not have or a mistyped value
        trainer = doc["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, s.gpus)
        assert doc["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "ClusterTrainingRuntime",
            "name": "torch-distributed",
        }
        assert trainer["image"] == one.image
        res = trainer["resourcesPerNode"]
        assert res["limits"] == {"cpu": s.cpu_limit, "memory": s.memory_limit, "nvidia.com/gpu": str(s.gpus)}
        assert res["requests"] == {
            "cpu": s.cpu_request,
            "memory": s.memory_request,
            "nvidia.com/gpu": str(s.gpus),
        }
        (patch,) = doc["spec"]["runtimePatches"]
        (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert rjob["name"] == "node"
        pod = rjob["template"]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == s.node_selector and pod["tolerations"] == s.tolerations
        assert pod["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": s.shm_size}
        assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "ctrl-pipeline-cache"}
        (container,) = pod["containers"]
        assert container == {
            "name": "node",
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "cache", "mountPath": "/cache"},
            ],
        }
        job_env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert job_env == {**s.env, P.NUM_PROCESSES_ENV: "1"}  # under torchrun `ctrl step` runs its own rank
        assert job_env["CTRL_CHECKPOINT_ROOT"] == "/cache/checkpoints"  # resumable across TrainJobs
        assert not set(job_env) & set(T.TORCHRUN_RESERVED)


def test_a_multi_node_step_compiles_to_its_launcher_and_nothing_else_changes(tmp_path):
    """CI values, the data-parallel steps on two nodes: their tasks carry the TrainJob ($CTRL_TRAINJOB), no GPU
    and no node pool, the PVC and their pod's identity; every other executor compiles exactly as on one node."""
    one = P.load(CHART, [str(CI_VALUES)])
    two = P.load(CHART, [str(CI_VALUES), _write(tmp_path, ON_TWO_NODES)])
    ex1, pl1 = _executors(compile_pipeline(tmp_path / "one.yaml", Params(), "abc", placement=one))
    ex2, pl2 = _executors(compile_pipeline(tmp_path / "two.yaml", Params(), "abc", placement=two))
    for step, exe in (("pretrain_value", "exec-pretrain-value"), ("ctrl_optimize", "exec-ctrl-optimize")):
        env = _env(ex2[exe])
        assert json.loads(env[T.TRAINJOB_ENV]) == two.steps[step].trainjob
        c = ex2[exe]["container"]
        assert "from components.trainjob import run_step" in c["command"][-1]  # the launcher's body
        assert "accelerator" not in c["resources"]
        assert (c["resources"]["resourceCpuLimit"], c["resources"]["resourceMemoryLimit"]) == ("1", "2Gi")
        assert env[T.WORKDIR_ENV] == "/cache/trainjobs" and env[T.POLL_ENV] == "10"
        platform = pl2[exe]
        assert (
            "nodeSelector" not in platform
            and "tolerations" not in platform
            and "emptyDirMounts" not in platform
        )
        assert [m["mountPath"] for m in platform["pvcMount"]] == ["/cache"]
        assert {f["name"]: f["fieldPath"] for f in platform["fieldPathAsEnv"]} == {
            T.NAMESPACE_ENV: "metadata.namespace",
            T.POD_NAME_ENV: "metadata.name",
            T.POD_UID_ENV: "metadata.uid",
        }
        assert "secretAsEnv" not in platform  # the Secrets go to the TrainJob's nodes, not to the launcher
        assert platform["securityContext"] == pl1[exe]["securityContext"]
    for exe in set(ex1) - {"exec-pretrain-value", "exec-ctrl-optimize"}:
        assert ex1[exe] == ex2[exe] and pl1.get(exe) == pl2.get(exe), exe


def test_secrets_reach_the_nodes_as_secret_references(tmp_path):
    values = {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 8, "nodes": 4, "cache": True,
                                                       "secrets": ["s3", "mlflow"]}}}}  # fmt: skip
    doc = P.load(CHART, [_write(tmp_path, values)]).steps["ctrl_optimize"].trainjob
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in doc["spec"]["trainer"]["env"] if "valueFrom" in e
    }
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "ctrl-s3-credentials", "key": "access-key-id", "optional": False},
        "AWS_SECRET_ACCESS_KEY": {
            "name": "ctrl-s3-credentials",
            "key": "secret-access-key",
            "optional": False,
        },
        "MLFLOW_TRACKING_USERNAME": {"name": "ctrl-mlflow-credentials", "key": "username", "optional": True},
        "MLFLOW_TRACKING_PASSWORD": {"name": "ctrl-mlflow-credentials", "key": "password", "optional": True},
    }
    assert doc["spec"]["trainer"]["numNodes"] == 4


def test_the_models_check_can_fail():
    doc = P.load(CHART, [str(EXAMPLE)]).steps["ctrl_optimize"].trainjob
    typo = copy.deepcopy(doc)
    typo["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(ValueError, match=r"spec\.trainer\.numNode: not a field of the API"):
        T.validated(typo)
    mistyped = copy.deepcopy(doc)
    mistyped["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError):
        T.validated(mistyped)
    with pytest.raises(ValueError, match="PET_NNODES"):
        T.template(**{**_template_args(), "env": {"PET_NNODES": "2"}})


def _template_args() -> dict:
    return dict(step="optimize", image="img:1", runtime="torch-distributed", nodes=2, gpus=0, accelerator="",
                requests={}, limits={}, node_selector={}, tolerations=[], shm_size="", cache_claim="c",
                cache_mount="/cache", env={}, secret_env=[])  # fmt: skip


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {**ON_TWO_NODES, "modelCache": {"accessModes": ["ReadWriteOnce"]}},
            r"modelCache\.accessModes: .*ReadWriteOnce.* \(a step with nodes > 1 shares its folders through the cache PVC",
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 8, "nodes": 0}}}},
            r"nodes: 0 is less",
        ),
        (
            {"pipeline": {"steps": {"evaluate": {"pool": "gpu-h100", "gpus": 1, "nodes": 2, "cache": True}}}},
            r"pipeline\.steps\.evaluate\.nodes: 2 nodes, but only the data-parallel steps",
        ),
        (
            {
                "pipeline": {
                    "steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 8, "nodes": 2, "cache": False}}
                }
            },
            r"pipeline\.steps\.ctrl_optimize\.cache: a step on 2 nodes",
        ),
        ({"pipeline": {"trainJob": {"runtime": "Torch Distributed"}}}, r"pipeline\.trainJob\.runtime"),
    ],
)
def test_bad_multi_node_values_fail_compile_naming_the_key(tmp_path, values, message):
    with pytest.raises(P.PlacementError, match=message):
        P.load(CHART, [_write(tmp_path, values)])


def test_the_loader_refuses_a_shared_step_without_rwx_even_without_the_schema():
    """from_values (no schema: values assembled in code) checks the access mode itself and names both keys."""
    values = P.deep_merge(P.load_values(CHART), ON_TWO_NODES)
    values["modelCache"]["accessModes"] = ["ReadWriteOnce"]
    with pytest.raises(
        P.PlacementError, match=r"modelCache\.accessModes: .*pipeline\.steps\.pretrain_value\.nodes"
    ):
        P.from_values(values)


# --- the chart: schema, template checks, RBAC, the example values ------------------------------------------

helm = pytest.importorskip("helm_python", reason="the k8s extra (make setup installs it)")


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def _render(chart, values: dict) -> list[dict]:
    out = chart.render(values, name="ctrl", namespace="ml", is_install=True)
    return [d for p, t in out.items() if not p.endswith(".txt") for d in yaml.safe_load_all(t) if d]


def test_chart_refuses_several_nodes_without_a_read_write_many_cache(chart):
    values = {**ON_TWO_NODES, "modelCache": {"accessModes": ["ReadWriteOnce"]}}
    with pytest.raises(helm.HelmError, match="accessModes"):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="ctrl", namespace="ml")
    with pytest.raises(helm.HelmError, match=r"pipeline\.steps\.evaluate\.nodes: 2 nodes, but only"):
        chart.render({"pipeline": {"steps": {"evaluate": {"pool": "gpu-h100", "gpus": 1, "nodes": 2, "cache": True}}}},
                     name="ctrl", namespace="ml")  # fmt: skip


def test_runner_gets_the_trainjob_verbs_only_when_a_step_uses_them(chart):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    example = yaml.safe_load(EXAMPLE.read_text())

    def role(values):
        (r,) = [d for d in _render(chart, values) if d["kind"] == "Role"]
        return r

    assert not [r for r in role({})["rules"] if "trainer.kubeflow.org" in r["apiGroups"]]
    docs = _render(chart, example)
    for d in docs:
        kubernetes_validate.validate(d, "1.34.0", strict=True)
    rules = role(example)["rules"]
    assert [r for r in rules if "trainer.kubeflow.org" in r["apiGroups"]] == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["create", "get", "delete"],
        }
    ]
    # what the launcher reads of rank 0 (granted to every run already): its pod and its log
    assert {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]} in rules
    assert any(r["resources"] == ["pods"] and {"get", "list"} <= set(r["verbs"]) for r in rules)


def test_the_example_values_file_places_ctrl_optimize_on_two_nodes(chart):
    placement = P.load(CHART, [str(EXAMPLE)])
    s = placement.steps["ctrl_optimize"]
    assert (s.nodes, s.gpus, placement.steps["pretrain_value"].nodes) == (2, 8, 1)
    chart.validate_schema(yaml.safe_load(EXAMPLE.read_text()))


def test_restarts_come_from_the_charts_training_runtime_which_the_api_models_accept(chart, tmp_path):
    """maxRestarts > 0: the chart installs a namespaced TrainingRuntime whose JobSet restarts the whole group (the
    TrainJob cannot patch a failure policy), read back unchanged through the Trainer API's models, and the
    compiled TrainJob references it; with 0 (the default) nothing is rendered and torch-distributed is used."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime

    example = yaml.safe_load(EXAMPLE.read_text())
    assert not [d for d in _render(chart, example) if d["kind"] == "TrainingRuntime"]
    values = copy.deepcopy(example)
    values["pipeline"]["trainJob"]["maxRestarts"] = 3
    chart.validate_schema(values)
    (rt,) = [d for d in _render(chart, values) if d["kind"] == "TrainingRuntime"]
    assert TrainerV1alpha1TrainingRuntime.from_dict(rt).to_dict() == rt  # no field the API does not have
    spec = rt["spec"]["template"]["spec"]
    assert rt["metadata"] == {**rt["metadata"], "name": "ctrl-torch-elastic", "namespace": "ml"}
    assert spec["failurePolicy"]["maxRestarts"] == 3 and rt["spec"]["mlPolicy"] == {
        "numNodes": 1,
        "torch": {},
    }
    (node,) = spec["replicatedJobs"]
    assert node["name"] == T.NODE and node["template"]["spec"]["backoffLimit"] == 0
    assert node["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == T.NODE
    assert node["template"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    # the compiled TrainJob references it
    s = P.load(CHART, [_write(tmp_path, values)]).steps["ctrl_optimize"]
    assert s.trainjob["spec"]["runtimeRef"] == {**s.trainjob["spec"]["runtimeRef"], "kind": "TrainingRuntime",
                                                "name": "ctrl-torch-elastic"}  # fmt: skip
    default = P.load(CHART, [str(EXAMPLE)]).steps["ctrl_optimize"]
    assert default.trainjob["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
    with pytest.raises(helm.HelmError, match="maxRestarts"):
        chart.validate_schema({"pipeline": {"trainJob": {"maxRestarts": -1}}})


# --- the launcher against the local Kubernetes API -----------------------------------------------------


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The example's TrainJob template with the cache PVC at a local folder (the launcher and the nodes see it
    at the same path), inputs as the launcher's artifacts would be, and the pod's downward-API env."""
    cache = tmp_path / "cache"
    placement = P.load(CHART, [str(EXAMPLE), _write(tmp_path, {"modelCache": {"mountPath": str(cache)}})])
    ckpt, value = tmp_path / "artifacts" / "checkpoint", tmp_path / "artifacts" / "value"
    for d, f in ((ckpt, "model_index.json"), (value, "value.safetensors")):
        d.mkdir(parents=True)
        (d / f).write_text("{}")
    monkeypatch.setenv(T.NAMESPACE_ENV, "ml")
    monkeypatch.setenv(T.POD_NAME_ENV, "ctrl-run-abc-system-container-impl-123")
    monkeypatch.setenv(T.POD_UID_ENV, "6f1c0e4e-0000-4000-8000-000000000001")
    return {
        "template": placement.steps["ctrl_optimize"].trainjob,
        "workdir": cache / "trainjobs",
        "checkpoint": ckpt,
        "value": value,
        "params": json.dumps(Params().model_dump()),
    }


def _arg(argv: list[str], option: str) -> Path:
    return Path(argv[argv.index(option) + 1])


def test_a_completed_trainjob_has_its_outputs_copied_and_is_deleted(cluster, tmp_path):
    seen = {}

    def rank0_writes_outputs(job):  # what `ctrl step optimize` on rank 0 leaves in --optimize-dir
        argv = job["spec"]["trainer"]["command"]
        seen["argv"] = argv
        seen["inputs"] = sorted(p.name for p in _arg(argv, "--checkpoint").iterdir())
        seen["value"] = sorted(p.name for p in _arg(argv, "--value").iterdir())
        seen["params"] = yaml.safe_load(_arg(argv, "--params").read_text())
        out = _arg(argv, "--optimize-dir")
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_config.json").write_text("{}")
        (out / "metrics.json").write_text(json.dumps({"summary": {"algorithm": "ctrl", "final_reward": 0.5}}))

    out_dir, log = tmp_path / "adapter-artifact", io.StringIO()
    with K8sApiServer(
        Script(end="Complete", log="iteration 1 reward 0.5\n", on_complete=rank0_writes_outputs)
    ) as s:
        result = T.run_step("optimize", cluster["params"], str(cluster["checkpoint"]), str(out_dir),
                            str(cluster["value"]), template_doc=cluster["template"], workdir=str(cluster["workdir"]),
                            client=s.api_client(), poll_s=0.01, out=log)  # fmt: skip
        (create,) = s.calls("POST")
        (delete,) = s.calls("DELETE")
        log_reads = s.calls("GET", "log")
    assert result == {"algorithm": "ctrl", "final_reward": 0.5}
    assert (out_dir / "adapter" / "adapter_config.json").is_file() and (out_dir / "metrics.json").is_file()
    job = create.body
    name = job["metadata"]["name"]
    assert create.path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"
    assert T.validated(job) == job and len(name) <= 63 and name.startswith("ctrl-optimize-")
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "ctrl-run-abc-system-container-impl-123",
         "uid": "6f1c0e4e-0000-4000-8000-000000000001"}
    ]  # fmt: skip
    argv = seen["argv"]
    assert argv[:5] == ["torchrun", "--no-python", "ctrl", "step", "optimize"]
    assert all(
        str(cluster["workdir"] / name) in str(_arg(argv, o))
        for o in ("--params", "--checkpoint", "--optimize-dir")
    )
    assert seen["inputs"] == ["model_index.json"] and seen["value"] == ["value.safetensors"]
    assert Params.model_validate(seen["params"]) == Params()
    assert delete.path.endswith(f"/trainjobs/{name}")
    assert (
        log_reads
        and log_reads[0].query["container"] == "node"
        and log_reads[0].query["follow"].lower() == "true"
    )
    assert "iteration 1 reward 0.5" in log.getvalue()
    assert not (cluster["workdir"] / name).exists()  # the work folder does not pile up on the PVC


def test_a_failed_trainjob_raises_its_reason_and_is_kept(cluster, tmp_path):
    failure = {"reason": "FailedJobs", "message": "jobset failed due to one or more job failures"}
    with K8sApiServer(Script(end="Failed", log="CUDA error: out of memory\n", failure=failure)) as s:
        with pytest.raises(
            T.TrainJobFailed, match="FailedJobs: jobset failed due to one or more job failures"
        ):
            T.run_step("optimize", cluster["params"], str(cluster["checkpoint"]), str(tmp_path / "out"),
                       str(cluster["value"]), template_doc=cluster["template"], workdir=str(cluster["workdir"]),
                       client=s.api_client(), poll_s=0.01, out=io.StringIO())  # fmt: skip
        assert s.deleted == [] and len(s.trainjobs) == 1  # kept for `kubectl describe`; no GPUs held
    assert list(cluster["workdir"].iterdir()) == []


def test_batches_that_do_not_split_over_the_nodes_are_refused_before_anything_is_created(cluster, tmp_path):
    from ctrl_core.launch import LaunchError

    params = Params().model_dump()
    params["optimize"]["batch_size"] = 24  # 2 nodes × 8 processes: not a multiple of 16
    with K8sApiServer() as s:
        with pytest.raises(LaunchError, match=r"optimize\.batch_size = 24: must be a multiple .* \(16\)"):
            T.run_step(
                "optimize",
                json.dumps(params),
                str(cluster["checkpoint"]),
                str(tmp_path / "out"),
                template_doc=cluster["template"],
                workdir=str(cluster["workdir"]),
                client=s.api_client(),
            )
        assert s.requests == []


_CANCELLED_CHILD = r"""
import json, sys
from components import trainjob
a = json.loads(sys.argv[1])
trainjob.run_step("optimize", a["params"], a["checkpoint"], a["out"], a["value"], template_doc=a["template"],
                  workdir=a["workdir"], poll_s=0.05)
"""


def test_a_cancelled_launcher_deletes_its_trainjob(cluster, tmp_path):
    """SIGTERM (what a cancelled run's pod gets) while the TrainJob runs: the launcher deletes it and exits
    failing. The launcher runs in its own process with the official client's kubeconfig loading."""
    with K8sApiServer(Script(end=None, log="iteration 1\n")) as s:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(s.kubeconfig())
        args = {k: str(v) for k, v in cluster.items() if k != "template"}
        args["template"], args["out"] = cluster["template"], str(tmp_path / "out")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen([sys.executable, "-c", _CANCELLED_CHILD, json.dumps(args)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert s.running.wait(60), "the TrainJob never ran"
            time.sleep(0.2)  # a few polls while it runs
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode != 0
        assert "Cancelled: signal SIGTERM" in output, output
        (name,) = [r.body["metadata"]["name"] for r in s.calls("POST")]
        assert s.deleted == [name] and s.trainjobs == {}
    assert list(cluster["workdir"].iterdir()) == []
