"""The Helm chart rendered offline (helm-python-sdk: Helm v4 as a library) and every manifest validated
strictly against the Kubernetes 1.34 schemas (kubernetes-validate); bad values fail the schema or the
chart's own checks with the key named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="the k8s extra (make setup installs it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ctrl-pipeline"
CI_VALUES = yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text())
K8S_VERSION = "1.34.0"


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def render(chart, values: dict | None = None) -> dict[str, list[dict]]:
    out = chart.render(values or {}, name="ctrl", namespace="ml", is_install=True)
    return {
        path: [d for d in yaml.safe_load_all(text) if d]
        for path, text in out.items()
        if not path.endswith(".txt")
    }


def manifests(rendered: dict[str, list[dict]]) -> list[dict]:
    return [d for docs in rendered.values() for d in docs]


@pytest.mark.parametrize("values_name", ["defaults", "ci"])
def test_every_rendered_manifest_is_valid_kubernetes(chart, values_name):
    values = {} if values_name == "defaults" else CI_VALUES
    docs = manifests(render(chart, values))
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
    if values_name == "ci":
        expected += ["CronJob", "Deployment", "Service"]
    assert kinds == sorted(expected)
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises on any unknown or mistyped field
        assert d["metadata"]["namespace"] == "ml"
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ctrl-pipeline"


def _pods(docs: list[dict]) -> list[dict]:
    out = []
    for d in docs:
        if d["kind"] == "Deployment":
            out.append(d["spec"]["template"]["spec"])
        elif d["kind"] == "CronJob":
            out.append(d["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return out


def test_pods_are_non_root_read_only_and_drop_capabilities(chart):
    pods = _pods(manifests(render(chart, CI_VALUES)))
    assert len(pods) == 2
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert c["image"] == "ghcr.io/ctrl-pipeline/ctrl-pipeline@sha256:" + "0123456789abcdef" * 4
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # writable scratch only


def test_mlflow_server_and_retrain_cronjob(chart):
    rendered = render(chart, CI_VALUES)
    (dep, svc) = rendered["ctrl-pipeline/templates/mlflow.yaml"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    assert "--default-artifact-root=s3://ctrl-mlflow/artifacts" in c["args"]
    hosts = next(a for a in c["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"ctrl-mlflow", "ctrl-mlflow:*", "ctrl-mlflow.ml.svc*"} <= set(hosts)
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql://mlflow@postgres.db.svc:5432/mlflow"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ctrl-mlflow-db", "key": "password"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ctrl-s3-credentials"
    assert svc["metadata"]["name"] == "ctrl-mlflow" and svc["spec"]["ports"][0]["port"] == 5000
    (cron,) = rendered["ctrl-pipeline/templates/retrain-cronjob.yaml"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["schedule"] == "0 3 * * 1"
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job["serviceAccountName"] == "ctrl-pipeline-runner"
    sub = job["containers"][0]
    assert sub["command"] == ["ctrl", "submit"] and "--values=/etc/ctrl/values.yaml" in sub["args"]
    assert "--params=/etc/ctrl/params.yaml" in sub["args"]
    token = next(v for v in job["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    (cm,) = rendered["ctrl-pipeline/templates/placement-configmap.yaml"]
    assert yaml.safe_load(cm["data"]["params.yaml"]) == {"optimize": {"iterations": 100}}


def test_placement_configmap_compiles_to_the_same_placement(chart, tmp_path):
    """What the CronJob compiles with (the rendered ConfigMap) places steps as the values do."""
    from pipelines import placement as P

    (cm,) = render(chart, CI_VALUES)["ctrl-pipeline/templates/placement-configmap.yaml"]
    f = tmp_path / "values.yaml"
    f.write_text(cm["data"]["values.yaml"])
    ci = tmp_path / "ci.yaml"
    ci.write_text(yaml.safe_dump(CI_VALUES))
    assert P.load(CHART, [str(f)]) == P.load(CHART, [str(ci)])


def test_rbac_pvc_and_service_account(chart):
    rendered = render(chart)
    (sa,) = rendered["ctrl-pipeline/templates/serviceaccount.yaml"]
    assert sa["metadata"]["name"] == "ctrl-pipeline-runner"
    role, binding = rendered["ctrl-pipeline/templates/rbac.yaml"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ctrl-pipeline-runner", "namespace": "ml"}
    ]
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["mlpipeline-minio-artifact"],
            "verbs": ["get"],
        }
    ]  # no blanket read of the namespace's Secrets
    assert not any("*" in r["verbs"] for r in role["rules"])
    (pvc,) = rendered["ctrl-pipeline/templates/pvc.yaml"]
    assert pvc["metadata"]["name"] == "ctrl-pipeline-cache" and pvc["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nodePools": {"cpu": {"nodeSelectr": {}}}}, "nodeSelectr"),
        ({"replicaCount": 2}, "replicaCount"),
        ({"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": "eight"}}}}, "gpus"),
        ({"image": {"digest": "sha256:short"}}, "digest"),
        ({"mlflow": {"service": {"port": 70000}}}, "port"),
        ({"retrain": {"schedule": "weekly"}}, "schedule"),
    ],
)
def test_bad_values_fail_the_schema(chart, values, message):
    with pytest.raises(helm.HelmError, match=message):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="ctrl", namespace="ml")


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-b200", "gpus": 8}}}},
            'node pool "gpu-b200" is not defined',
        ),
        (
            {"pipeline": {"steps": {"ctrl_optimize": {"pool": "gpu-h100", "gpus": 0}}}},
            "zero GPUs for a step on GPU pool",
        ),
        ({"pipeline": {"steps": {"evaluate": {"pool": "gpu-h100", "gpus": 9}}}}, "9 GPUs, but a node"),
        ({"secrets": {"s3": {"name": ""}}}, "secrets.s3.name: missing Secret name"),
        ({"mlflow": {"enabled": True}}, "mlflow.backendStore"),
    ],
)
def test_bad_placement_fails_to_render(chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name="ctrl", namespace="ml")


def test_values_are_documented_and_hold_no_secret_values():
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    # every top-level key carries a `# --` comment (helm-docs style), directly or on its first documented child
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]\w*:", line):
            block = "\n".join(lines[max(0, i - 3) : i + 4])
            assert "# --" in block, f"values.yaml: {line.split(':')[0]} is undocumented"
    values = yaml.safe_load(text)

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                if re.fullmatch(r"secrets\.[^.]+\.env\.", path):  # ENV_VAR -> the key's name in the Secret
                    assert re.fullmatch(r"[-._a-zA-Z0-9]{1,63}", v), (
                        f"{path}{k}: a Secret key name, not a value"
                    )
                    continue
                secretish = re.search(r"password|token|access.?key|secret.?key|credential", str(k), re.I)
                assert not (secretish and isinstance(v, str) and v), f"{path}{k} looks like a secret value"
                walk(v, f"{path}{k}.")

    walk(values)
    walk(CI_VALUES)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False

    def closed(node, path="#"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, (
                    f"{path}: objects must set additionalProperties: false"
                )
            for k, v in node.items():
                closed(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                closed(v, f"{path}/{i}")

    closed(schema)


def test_notes_and_lint(chart):
    notes = chart.render(CI_VALUES, name="ctrl", namespace="ml")["ctrl-pipeline/templates/NOTES.txt"]
    assert "ctrl_optimize: pool gpu-h100, 8 GPU(s)" in notes and "ctrl-s3-credentials" in notes
    report = helm.lint(str(CHART), strict=True, kube_version="v1.34.0")
    assert not report.get("errors"), report
    assert not [m for m in report.get("messages", []) if m.get("severity", 0) >= 2], report
