"""Golden compile tests of GPU placement: the chart's values -> the compiled KFP IR (deploymentSpec resources
and the Kubernetes platform spec), every setting asserted, and bad values refused with the key named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ctrl_core.params import Params
from pipelines import placement as P
from pipelines.cli import main
from pipelines.pipeline import compile_pipeline

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ctrl-pipeline"
CI_VALUES = CHART / "ci" / "test-values.yaml"
EXEC = {s: "exec-" + s.replace("_", "-") for s in P.STEPS}
TASK = {s: s.replace("_", "-") for s in P.STEPS}


def _compile(tmp_path: Path, placement=None, image=None, name="p.yaml") -> tuple[dict, dict]:
    out = compile_pipeline(tmp_path / name, Params(), "abc123", placement=placement, image=image)
    docs = [d for d in yaml.safe_load_all(Path(out).read_text()) if d]
    return docs[0], (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The default chart values merged with the CI values (a second GPU pool, a digest-pinned image)."""
    placement = P.load(CHART, [str(CI_VALUES)])
    spec, platform = _compile(tmp_path_factory.mktemp("golden"), placement)
    return placement, spec, platform


def test_gpu_steps_request_their_gpus_in_both_accelerator_fields(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    expected = {"pretrain_value": 1, "ctrl_optimize": 8, "evaluate": 2}
    for step, n in expected.items():
        acc = executors[EXEC[step]]["container"]["resources"]["accelerator"]
        # kfp #11374: SDK 2.10 wrote only resourceType/resourceCount and older backends dropped the GPUs;
        # both the current and the deprecated fields must survive compilation
        assert acc == {
            "resourceType": "nvidia.com/gpu",
            "resourceCount": str(n),
            "type": "nvidia.com/gpu",
            "count": str(n),
        }, step
    for step in ("resolve_params", "fetch_checkpoint", "register"):
        assert "accelerator" not in executors[EXEC[step]]["container"].get("resources", {}), step


def test_cpu_and_memory_requests_and_limits(compiled):
    _, spec, _ = compiled
    res = {s: spec["deploymentSpec"]["executors"][EXEC[s]]["container"]["resources"] for s in P.STEPS}
    assert (
        res["ctrl_optimize"]["resourceCpuRequest"] == "32"
        and res["ctrl_optimize"]["resourceCpuLimit"] == "64"
    )
    assert res["ctrl_optimize"]["resourceMemoryRequest"] == "256Gi"
    assert res["ctrl_optimize"]["resourceMemoryLimit"] == "512Gi"
    assert res["ctrl_optimize"]["cpuLimit"] == 64.0  # the deprecated numeric fields for older backends
    # evaluate moved to the CI values' a100 pool: that pool's resources
    assert (res["evaluate"]["resourceCpuRequest"], res["evaluate"]["resourceMemoryLimit"]) == ("8", "96Gi")
    assert (
        res["fetch_checkpoint"]["resourceCpuRequest"],
        res["fetch_checkpoint"]["resourceMemoryLimit"],
    ) == ("2", "16Gi")
    assert (res["resolve_params"]["resourceCpuRequest"], res["resolve_params"]["resourceMemoryRequest"]) == (
        "500m",
        "1Gi",
    )


def test_node_selectors_and_tolerations(compiled):
    _, _, platform = compiled
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    gpu_toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for step in ("pretrain_value", "ctrl_optimize"):
        assert platform[EXEC[step]]["nodeSelector"] == {"labels": h100}, step
        assert platform[EXEC[step]]["tolerations"] == gpu_toleration, step
    assert platform[EXEC["evaluate"]]["nodeSelector"] == {
        "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "cloud.google.com/gke-nodepool": "a100"}
    }
    assert platform[EXEC["evaluate"]]["tolerations"] == gpu_toleration
    for step in ("resolve_params", "fetch_checkpoint", "register"):  # CPU pool: no GPU taint tolerated
        assert "tolerations" not in platform[EXEC[step]] and "nodeSelector" not in platform[EXEC[step]], step


def test_shm_cache_pvc_secrets_env_and_security_context(compiled):
    _, spec, platform = compiled
    shm = {s: platform[EXEC[s]].get("emptyDirMounts") for s in P.STEPS}
    assert shm["ctrl_optimize"] == [
        {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "32Gi"}
    ]
    assert shm["pretrain_value"][0]["sizeLimit"] == "8Gi" and shm["evaluate"][0]["medium"] == "Memory"
    assert shm["register"] is None and shm["resolve_params"] is None
    for step in ("fetch_checkpoint", "pretrain_value", "ctrl_optimize", "evaluate"):
        (pvc,) = platform[EXEC[step]]["pvcMount"]
        assert pvc["mountPath"] == "/cache"
        assert pvc["pvcNameParameter"]["runtimeValue"]["constant"] == "ctrl-pipeline-cache"
    assert "pvcMount" not in platform[EXEC["register"]]
    secrets = {
        s: {
            e["secretName"]: {k["envVar"]: k["secretKey"] for k in e["keyToEnv"]}
            for e in platform[EXEC[s]].get("secretAsEnv", [])
        }
        for s in P.STEPS
    }
    s3 = {"AWS_ACCESS_KEY_ID": "access-key-id", "AWS_SECRET_ACCESS_KEY": "secret-access-key"}
    assert secrets["fetch_checkpoint"] == {"ctrl-s3-credentials": s3}
    assert secrets["register"] == {
        "ctrl-s3-credentials": s3,
        "ctrl-mlflow-credentials": {
            "MLFLOW_TRACKING_USERNAME": "username",
            "MLFLOW_TRACKING_PASSWORD": "password",
        },
    }
    assert secrets["ctrl_optimize"] == {} and secrets["resolve_params"] == {}
    for step in P.STEPS:
        assert platform[EXEC[step]]["securityContext"] == {
            "runAsUser": "1000",
            "runAsGroup": "1000",
            "runAsNonRoot": True,
        }
    env = {
        s: {
            e["name"]: e["value"]
            for e in spec["deploymentSpec"]["executors"][EXEC[s]]["container"].get("env", [])
        }
        for s in P.STEPS
    }
    assert env["ctrl_optimize"][P.NUM_PROCESSES_ENV] == "8"  # one process per GPU for the multi-GPU step
    assert env["evaluate"][P.NUM_PROCESSES_ENV] == "2" and env["register"][P.NUM_PROCESSES_ENV] == "1"
    assert env["ctrl_optimize"]["HF_HOME"] == "/cache/huggingface"
    assert env["ctrl_optimize"]["CTRL_CHECKPOINT_ROOT"] == "/cache/checkpoints"
    assert (
        env["register"]["MLFLOW_TRACKING_URI"] == "http://ctrl-mlflow:5000"
    )  # the chart's server (enabled in CI values)
    assert env["register"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.minio.svc:9000"


def test_image_caching_and_no_secret_values(compiled):
    placement, spec, _ = compiled
    image = "ghcr.io/ctrl-pipeline/ctrl-pipeline@sha256:" + "0123456789abcdef" * 4
    assert placement.image == image and placement.service_account == "ctrl-pipeline-runner"
    for step in P.STEPS:
        assert spec["deploymentSpec"]["executors"][EXEC[step]]["container"]["image"] == image
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["register"]["cachingOptions"] == {}  # off: it reads the registry's current champion
    assert all(tasks[TASK[s]]["cachingOptions"] == {"enableCache": True} for s in P.STEPS if s != "register")
    # credentials reach steps only as Secret references (platform spec); no plain env var carries one
    secretish = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.I)
    for step in P.STEPS:
        names = [
            e["name"] for e in spec["deploymentSpec"]["executors"][EXEC[step]]["container"].get("env", [])
        ]
        assert not [n for n in names if secretish.search(n)], step


def test_local_pipeline_has_no_cluster_settings(tmp_path):
    spec, platform = _compile(tmp_path)
    assert platform == {}
    for step in P.STEPS:
        c = spec["deploymentSpec"]["executors"][EXEC[step]]["container"]
        assert "resources" not in c and "env" not in c, step
    assert spec["root"]["dag"]["tasks"]["register"]["cachingOptions"] == {}
    spec2, _ = _compile(tmp_path, image="registry.example.com/ctrl@sha256:" + "a" * 64, name="q.yaml")
    assert {e["container"]["image"] for e in spec2["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/ctrl@sha256:" + "a" * 64
    }


def test_placement_is_not_a_run_parameter(compiled):
    _, spec, _ = compiled
    declared = set(spec["root"]["inputDefinitions"]["parameters"])
    assert not any(name.startswith(("placement", "nodePools", "pipeline")) for name in declared)
    assert (
        "placement" not in Params.model_fields
    )  # and so not in Params.digest(): same params, same run identity


def _write(tmp_path: Path, values: dict) -> str:
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    return str(f)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-b200", "gpus": 8}}}},
            r"pipeline\.steps\.ctrl_optimize\.pool: node pool 'gpu-b200' is not defined",
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 0}}}},
            r"pipeline\.steps\.ctrl_optimize\.gpus: zero GPUs for a step on GPU pool 'gpu-h100'",
        ),
        (
            {"pipeline": {"steps": {"resolve_params": {"pool": "gpu-h100"}}}},
            r"pipeline\.steps\.resolve_params\.gpus: zero GPUs",
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 16}}}},
            r"ctrl_optimize\.gpus: 16 GPUs, but a node of pool 'gpu-h100' has 8",
        ),
        (
            {"pipeline": {"steps": {"register": {"pool": "cpu", "gpus": 1}}}},
            r"register\.gpus: 1 GPUs requested on pool 'cpu', which has none",
        ),
        (
            {"secrets": {"s3": {"name": ""}}},
            r"secrets\.s3\.name: missing Secret name \(used by step fetch_checkpoint\)",
        ),
        (
            {"pipeline": {"steps": {"register": {"pool": "cpu", "secrets": ["vault"]}}}},
            r"register\.secrets: 'vault' is not defined under secrets",
        ),
        ({"modelCache": {"claimName": ""}}, r"modelCache\.claimName: missing PVC name"),
        ({"nodePools": {"gpu-h100": {"gpu": {"type": "", "count": 8}}}}, r"nodePools\.gpu-h100\.gpu\.type"),
        # schema violations (the same schema helm install checks)
        (
            {"nodePools": {"cpu": {"nodeSelectr": {}}}},
            r"nodePools\.cpu: Additional properties are not allowed \('nodeSelectr'",
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimise": {"pool": "cpu"}}}},
            r"pipeline\.steps: Additional properties",
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": -1}}}},
            r"ctrl_optimize\.gpus: -1 is less than",
        ),
        ({"image": {"tag": "latest"}}, r"image\.tag"),
        (
            {"nodePools": {"cpu": {"tolerations": [{"key": "x", "effect": "NoSchedul"}]}}},
            r"tolerations\.0\.effect",
        ),
        (
            {"secrets": {"s3": {"password": "hunter2"}}},
            r"secrets\.s3: Additional properties are not allowed \('password'",
        ),
        (
            {
                "pipeline": {
                    "steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 8, "launcher": "deepspeed"}}
                }
            },
            r"ctrl_optimize\.launcher: 'deepspeed' is not one of",
        ),
        (
            {"pipeline": {"env": {"CTRL_LAUNCHER": "mpirun"}}},
            r"pipeline\.env\.CTRL_LAUNCHER: 'mpirun' is not a launcher",
        ),
        (
            {"pipeline": {"steps": {"evaluate": {"pool": "gpu-h100", "gpus": 1, "retry": {"count": -1}}}}},
            r"evaluate\.retry\.count: -1 is less than",
        ),
        (
            {
                "pipeline": {
                    "steps": {"evaluate": {"pool": "gpu-h100", "gpus": 1, "retry": {"backoff": "1 minute"}}}
                }
            },
            r"evaluate\.retry\.backoff: '1 minute' does not match",
        ),
    ],
)
def test_bad_values_fail_compile_naming_the_key(tmp_path, values, message):
    with pytest.raises(P.PlacementError, match=message):
        P.load(CHART, [_write(tmp_path, values)])


def test_retry_policies_reach_the_ir(compiled, tmp_path):
    """Preempted GPU pods are retried (the steps resume from their checkpoints): the chart's retry policies are
    the tasks' retryPolicy; resolve_params has none."""
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks[TASK["ctrl_optimize"]]["retryPolicy"] == {
        "maxRetryCount": 3,
        "backoffDuration": "60s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "86400s",
    }
    assert {s: tasks[TASK[s]].get("retryPolicy", {}).get("maxRetryCount") for s in P.STEPS} == {
        "resolve_params": None,
        "fetch_checkpoint": 2,
        "pretrain_value": 3,
        "ctrl_optimize": 3,
        "evaluate": 3,
        "register": 2,
    }
    values = {
        "pipeline": {
            "steps": {
                "ctrl_optimize": {
                    "pool": "gpu-h100",
                    "gpus": 8,
                    "retry": {"count": 5, "backoff": "2m", "maxDuration": "2d"},
                }
            }
        }
    }
    spec2, _ = _compile(tmp_path, P.load(CHART, [_write(tmp_path, values)]))
    assert spec2["root"]["dag"]["tasks"][TASK["ctrl_optimize"]]["retryPolicy"] == {
        "maxRetryCount": 5,
        "backoffDuration": "120s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "172800s",
    }


def test_a_steps_launcher_reaches_its_environment(tmp_path):
    """pipeline.steps.X.launcher sets CTRL_LAUNCHER (what `ctrl step` starts a multi-GPU step's ranks with) for
    that step only; pipeline.env's applies to the others; neither set: no variable (torchrun)."""
    assert all(P.LAUNCHER_ENV not in st.env for st in P.load(CHART).steps.values())
    values = {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 8, "launcher": "accelerate"}},
                           "env": {"CTRL_LAUNCHER": "torchrun"}}}  # fmt: skip
    steps = P.load(CHART, [_write(tmp_path, values)]).steps
    assert steps["ctrl_optimize"].env[P.LAUNCHER_ENV] == "accelerate"
    assert steps["pretrain_value"].env[P.LAUNCHER_ENV] == "torchrun"


def test_ctrl_compile_with_chart_values_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "p.yaml"
    ok = CliRunner().invoke(
        main, ["compile", "--out", str(out), "-f", str(CI_VALUES), "--image", "reg.example/ctrl:1"]
    )
    assert ok.exit_code == 0, ok.output
    spec, platform = (d for d in yaml.safe_load_all(out.read_text()) if d)
    assert (
        spec["deploymentSpec"]["executors"][EXEC["ctrl_optimize"]]["container"]["image"]
        == "reg.example/ctrl:1"
    )
    assert "exec-ctrl-optimize" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    bad = _write(tmp_path, {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-b200", "gpus": 8}}}})
    out2 = tmp_path / "bad.yaml"
    result = CliRunner().invoke(main, ["compile", "--out", str(out2), "--chart", str(CHART), "-f", bad])
    assert result.exit_code == 2 and "gpu-b200" in result.output and "nodePools" in result.output
    assert not out2.exists()  # nothing compiled, nothing to upload
    missing = CliRunner().invoke(main, ["compile", "--out", str(out2), "--chart", str(tmp_path)])
    assert missing.exit_code == 2 and "values.schema.json" in missing.output
