"""The chart's optional KServe InferenceService (``serving.enabled``), rendered offline by Helm (helm-python-sdk)
and validated against KServe's own API: the InferenceService CRD of KServe v0.20.0 (vendored unmodified in
tests/fixtures/kserve), whose ``openAPIV3Schema`` is what the API server checks the object against, applied with
the API server's strict field validation (unknown fields refused, as ``kubectl apply`` does by default); the
PodSpec parts of the predictor also strictly against Kubernetes 1.34 (kubernetes-validate), the metadata by
KServe's name rule. Bad values fail the chart's schema or its template checks with the key named. Last, the
predictor container's rendered command line is run here against a registered champion and answers the request
that docs/deploy.md shows."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="the k8s extra (make setup installs it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

sys.path.insert(0, str(Path(__file__).parent))
from champion_run import NAME, _env, served  # noqa: E402 - conftest's champion fixture: the registered tiny model
from mlflow_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ctrl-pipeline"
CI_VALUES = yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text())
TEMPLATE = "ctrl-pipeline/templates/inferenceservice.yaml"
K8S_VERSION = "1.34.0"
CRD_FILE = REPO / "tests" / "fixtures" / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz"
CRD_BLOB = "1e37d05b7a741eb40b9eb01c378dc9dc80eab3d9"  # git blob of the file at kserve v0.20.0 (SOURCE.md)
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # KServe's IsvcNameFmt (its admission webhook)
# the predictor's PodSpec fields the chart sets (checked as a Pod) and KServe's own component fields
POD_FIELDS = {"containers", "volumes", "nodeSelector", "tolerations", "imagePullSecrets", "serviceAccountName",
              "automountServiceAccountToken"}  # fmt: skip
KSERVE_FIELDS = {"minReplicas", "maxReplicas", "timeout", "labels", "annotations"}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


@pytest.fixture(scope="module")
def crd() -> dict:
    raw = gzip.decompress(CRD_FILE.read_bytes())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return {"blob": hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest(), **yaml.load(raw, Loader=loader)}


def strict(node):
    """A CRD's structural ``openAPIV3Schema`` as a JSON schema with the API server's strict field validation:
    an object with declared properties refuses any other (unless it preserves unknown fields), ``nullable``
    admits null. Everything else (types, formats, enums, patterns, required, int-or-string) is used as it is."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = strict(node[key])
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@pytest.fixture(scope="module")
def validator(crd):
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1" and v["served"]]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def validate_isvc(doc: dict, validator) -> None:
    """Raise on anything KServe's API would refuse: the CRD schema (strict), the PodSpec parts (Kubernetes,
    strict), the metadata (ObjectMeta, strict) and KServe's name rule."""
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise jsonschema.ValidationError(
            "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        )
    assert ISVC_NAME.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
    predictor = doc["spec"]["predictor"]
    assert set(predictor) <= POD_FIELDS | KSERVE_FIELDS, set(predictor) - POD_FIELDS - KSERVE_FIELDS
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {k: v for k, v in predictor.items() if k in POD_FIELDS}}  # fmt: skip
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def nodepool_resources(pool: str) -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())["nodePools"][pool]["resources"]


def with_serving(serving: dict, base: dict | None = None) -> dict:
    values = copy.deepcopy(CI_VALUES if base is None else base)
    values["serving"] = {"enabled": True, **serving}
    return values


def render_isvc(chart, values: dict) -> dict:
    out = chart.render(values, name="ctrl", namespace="ml", is_install=True)
    (doc,) = [d for d in yaml.safe_load_all(out[TEMPLATE]) if d]
    return doc


def test_the_crd_is_kserves_file_unmodified(crd):
    assert crd["blob"] == CRD_BLOB  # what `git hash-object` gives for KServe's file at v0.20.0
    assert crd["spec"]["group"] == "serving.kserve.io" and crd["spec"]["names"]["kind"] == "InferenceService"
    assert "x-kubernetes-validations" not in json.dumps(crd)  # no CEL rules that this check would miss


@pytest.mark.parametrize("values", [{}, CI_VALUES], ids=["defaults", "ci"])
def test_serving_is_off_by_default_and_renders_nothing(chart, values):
    out = chart.render(values, name="ctrl", namespace="ml", is_install=True)
    assert not [d for d in yaml.safe_load_all(out.get(TEMPLATE, "")) if d]
    assert not any("InferenceService" in text for text in out.values())


def test_the_inferenceservice_serves_the_champion_and_validates_against_kserve(chart, validator):
    doc = render_isvc(chart, with_serving({}))
    validate_isvc(doc, validator)
    assert doc["metadata"] == {
        "name": "ctrl-champion", "namespace": "ml",
        "labels": {**doc["metadata"]["labels"], "app.kubernetes.io/part-of": "ctrl-pipeline"},
        "annotations": {"serving.kserve.io/deploymentMode": "Standard"},
    }  # fmt: skip
    predictor = doc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    assert c["image"] == "ghcr.io/ctrl-pipeline/ctrl-pipeline@sha256:" + "0123456789abcdef" * 4
    assert c["command"] == ["mlflow", "models", "serve"]
    assert c["args"][:4] == ["--model-uri=models:/ctrl-digits@champion", "--env-manager=local",
                             "--host=0.0.0.0", "--port=8080"]  # fmt: skip
    assert c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    env = {e["name"]: e for e in c["env"]}
    assert (
        env["MLFLOW_TRACKING_URI"]["value"] == "http://ctrl-mlflow:5000"
    )  # the chart's server, as the steps
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"  # pipeline.env
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ctrl-s3-credentials"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ctrl-mlflow-credentials"
    assert "PYTHONPATH" not in env  # KServe's webhook refuses it
    assert c["resources"] == nodepool_resources("cpu")  # serving.resources {}: the pool's
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert predictor["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}]
    assert predictor["annotations"] == {"ctrl-pipeline/model-uri": "models:/ctrl-digits@champion"}
    assert predictor["automountServiceAccountToken"] is False and "nodeSelector" not in predictor


def test_notes_and_lint_with_serving(chart):
    values = with_serving({"model": {"name": "ctrl-digits", "alias": "champion", "version": 7}})
    notes = chart.render(values, name="ctrl", namespace="ml")["ctrl-pipeline/templates/NOTES.txt"]
    assert "InferenceService ctrl-champion (Standard) serves models:/ctrl-digits/7" in notes
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.34.0")
    assert not report.get("errors"), report
    assert not [m for m in report.get("messages", []) if m.get("severity", 0) >= 2], report


def test_a_pinned_version_on_a_gpu_pool_with_knative(chart, validator):
    doc = render_isvc(chart, with_serving({
        "model": {"name": "ctrl-sd", "alias": "champion", "version": 7}, "deploymentMode": "Knative",
        "minReplicas": 0, "maxReplicas": 3, "pool": "gpu-a100", "gpus": 1, "rolloutId": "2026-12-01",
        "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "48Gi"}},
        "secrets": ["s3"], "env": {"MLFLOW_TRACKING_URI": "https://mlflow.example.org"}, "scratchSize": "",
        "serviceAccountName": "ctrl-serving",
    }))  # fmt: skip
    validate_isvc(doc, validator)
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    predictor = doc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 3)
    assert predictor["annotations"] == {"ctrl-pipeline/model-uri": "models:/ctrl-sd/7",
                                        "ctrl-pipeline/rollout-id": "2026-12-01"}  # fmt: skip
    assert predictor["nodeSelector"] == CI_VALUES["nodePools"]["gpu-a100"]["nodeSelector"]
    assert predictor["tolerations"] == CI_VALUES["nodePools"]["gpu-a100"]["tolerations"]
    assert (
        predictor["serviceAccountName"] == "ctrl-serving" and "automountServiceAccountToken" not in predictor
    )
    (c,) = predictor["containers"]
    assert c["args"][0] == "--model-uri=models:/ctrl-sd/7"
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": 1},
                              "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 1}}  # fmt: skip
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.org"  # serving.env wins
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "AWS_ACCESS_KEY_ID" in env
    assert predictor["volumes"] == [{"name": "tmp", "emptyDir": {}}]


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "predictor", "minReplica"), 1),  # a misspelt KServe field
        (("spec", "predictor", "containers", 0, "imagePullPolicyy"), "Always"),  # a misspelt Container field
        (("spec", "predictor", "minReplicas"), "one"),  # a mistyped one
        (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "path"), 8080),
        (("spec", "predictr"), {}),
    ],
)
def test_the_kserve_check_refuses_unknown_and_mistyped_fields(chart, validator, path, value):
    doc = render_isvc(chart, with_serving({}))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=re.escape(str(path[-1]))):
        validate_isvc(doc, validator)


@pytest.mark.parametrize(
    "serving, message",
    [
        ({"deploymentMode": "RawDeployment"}, "/serving/deploymentMode"),  # KServe 0.20 refuses updates of it
        ({"name": "1-champion"}, "/serving/name"),
        ({"name": "Champion"}, "/serving/name"),
        (
            {"model": {"name": "ctrl-digits", "alias": "champion", "version": "latest"}},
            "/serving/model/version",
        ),
        ({"model": {"name": "ctrl-digits", "alias": "champion", "version": 0}}, "/serving/model/version"),
        ({"model": {"name": "ctrl digits", "alias": "champion"}}, "/serving/model/name"),
        ({"replicas": 2}, "replicas"),
        ({"gpus": -1}, "/serving/gpus"),
        ({"workers": 0}, "/serving/workers"),
        ({"scratchSize": "lots"}, "/serving/scratchSize"),
        ({"env": {"mlflow-uri": "x"}}, "mlflow-uri"),  # Helm names the bad key, not its path
    ],
)
def test_bad_serving_values_fail_the_schema(chart, serving, message):
    values = with_serving(serving)
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="ctrl", namespace="ml")


@pytest.mark.parametrize(
    "serving, base, message",
    [
        ({"pool": "gpu-b200"}, None, 'serving.pool: node pool "gpu-b200" is not defined'),
        ({"pool": "gpu-h100"}, None, 'serving.gpus: zero GPUs on GPU pool "gpu-h100"'),
        ({"pool": "gpu-a100", "gpus": 5}, None, 'serving.gpus: 5 GPUs, but a node of pool "gpu-a100" has 4'),
        (
            {"minReplicas": 3, "maxReplicas": 2},
            None,
            "serving.minReplicas: 3 is more than serving.maxReplicas",
        ),
        (
            {"model": {"name": "ctrl-digits", "alias": "latest"}},
            None,
            'serving.model.alias: "latest" is reserved',
        ),
        ({"model": {"name": "", "alias": "champion"}}, None, "serving.model.name"),
        ({"env": {"PYTHONPATH": "/opt"}}, None, "serving.env: PYTHONPATH is refused"),
        ({"secrets": ["vault"]}, None, "serving.secrets: secrets.vault is not defined"),
        ({}, {}, "MLFLOW_TRACKING_URI is unknown"),  # defaults: no MLflow server, no tracking URI
    ],
)
def test_bad_serving_values_fail_to_render(chart, serving, base, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(with_serving(serving, base), name="ctrl", namespace="ml")


def test_a_model_uri_needs_no_tracking_server_and_the_compile_accepts_serving_values(
    chart, validator, tmp_path
):
    uri = "s3://ctrl-mlflow/artifacts/1/models/m-0123/artifacts"
    doc = render_isvc(chart, with_serving({"model": {"name": "", "alias": "champion", "uri": uri}}, base={}))
    validate_isvc(doc, validator)
    assert doc["spec"]["predictor"]["containers"][0]["args"][0] == f"--model-uri={uri}"
    from pipelines import placement

    f = tmp_path / "values.yaml"  # `ctrl compile -f` checks the same schema (jsonschema) and ignores serving
    f.write_text(yaml.safe_dump(with_serving({"model": {"name": "x", "alias": "champion", "version": 3}})))
    assert placement.load(CHART, [str(f)]) == placement.load(CHART, [str(CHART / "ci" / "test-values.yaml")])


def _docs_request() -> dict:
    """The JSON body of the curl example in docs/deploy.md's serving section."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("Serving the champion with KServe\n", 1)[1].split("\n## ", 1)[0]
    (body,) = re.findall(r"-d '(\{.*?\})'", section, re.S)
    return json.loads(body)


def test_the_rendered_predictor_command_serves_the_champion(chart, champion, tmp_path):  # noqa: F811
    """The container's command line as rendered (bar host and port: this machine's loopback and a free port),
    with its rendered environment, answers /ping and the documented request with the champion's images."""
    tracking = f"sqlite:///{champion / 'mlflow.db'}"
    doc = render_isvc(chart, with_serving({"model": {"name": NAME, "alias": "champion"}, "secrets": [],
                                           "env": {"MLFLOW_TRACKING_URI": tracking}}))  # fmt: skip
    (c,) = doc["spec"]["predictor"]["containers"]
    port = free_port()
    args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=8080", f"--port={port}")
            for a in c["args"]]  # fmt: skip
    assert args != c["args"] and len(args) == len(c["args"])
    cli = Path(sys.executable).with_name(c["command"][0])  # the image has `mlflow` on PATH; here: this venv's
    env = {**_env(champion), **{e["name"]: e["value"] for e in c["env"]}, "HOME": str(tmp_path)}
    env["PATH"] = f"{cli.parent}{os.pathsep}{env.get('PATH', '')}"
    url = f"http://127.0.0.1:{port}"
    with served([str(cli), *c["command"][1:], *args], cwd=tmp_path, env=env, log_path=tmp_path / "serve.log",
                url=url, ready_path=c["readinessProbe"]["httpGet"]["path"]):  # fmt: skip
        body = _docs_request()
        req = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            rows = json.loads(resp.read())["predictions"]
        assert len(rows) == len(body["dataframe_records"])
        for row in rows:
            assert row["shape"] == [1, 8, 8]
            assert base64.b64decode(row["image"])[:8] == b"\x89PNG\r\n\x1a\n"
