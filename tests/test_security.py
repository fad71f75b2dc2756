"""Security: pickled weights are refused everywhere (and never run), no secret ever reaches an output.

* A pickle whose ``__reduce__`` would create a marker file is offered to every loading path -- under each
  pickle-capable suffix, and renamed to ``.safetensors`` -- and must be refused with the marker never created.
* The project's sources never call ``torch.load`` without ``weights_only=True``, nor pickle/joblib/dill loads.
* With credential-like values in the environment, the compiled pipeline YAML, the dumped params, the
  captured logs and everything MLflow stores for a registration (params, tags, metrics, artifacts) are
  scanned for those values and for generic credential patterns.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from ctrl_core.checkpoints import CheckpointError, fetch_checkpoint
from ctrl_core.io import UNSAFE_WEIGHT_SUFFIXES, UnsafeWeightsError, load_weights, require_safetensors

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls ``pathlib.Path(marker).touch()``: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _malicious_pickle(marker: Path, torch_format: bool) -> bytes:
    if torch_format:  # what a real .bin/.pt/.ckpt looks like: torch's zip container holding data.pkl
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, buf)
        return buf.getvalue()
    return pickle.dumps({"evil": _Payload(marker)})


def test_the_payload_really_fires_when_unpickled(tmp_path):
    """Guard against a vacuous test: a plain unpickle does execute the payload."""
    marker = tmp_path / "fired"
    pickle.loads(_malicious_pickle(marker, torch_format=False))  # noqa: S301 - that is the point
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):  # and torch's safe loader refuses it
        torch.load(io.BytesIO(_malicious_pickle(marker, torch_format=True)), weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [*UNSAFE_WEIGHT_SUFFIXES, ".safetensors"])
@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_pickles_are_refused_by_every_loader(tmp_path, suffix, torch_format):
    marker = tmp_path / "PWNED"
    data = _malicious_pickle(marker, torch_format)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / f"model{suffix}"
    weights.write_bytes(data)

    with pytest.raises(UnsafeWeightsError):
        load_weights(weights)
    with pytest.raises(UnsafeWeightsError):
        require_safetensors(weights)
    with pytest.raises(CheckpointError, match="refusing"):
        fetch_checkpoint(str(folder), tmp_path / "fetched")  # local folder
    with pytest.raises(CheckpointError, match="refusing"):
        fetch_checkpoint(str(weights), tmp_path / "fetched")  # local file
    assert not (tmp_path / "fetched").exists()

    # the adapter loader (ctrl_core.models) reads only adapter_model.safetensors, through require_safetensors
    from ctrl_core.models import DiffusersScoreModel

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(data)
    with pytest.raises(UnsafeWeightsError):
        DiffusersScoreModel.load_adapter(object.__new__(DiffusersScoreModel), str(adapter))
    assert not marker.exists()


def test_pickles_are_refused_from_s3(s3_endpoint, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="security-pickles")
    marker = tmp_path / "PWNED"
    for suffix in (".bin", ".safetensors"):
        client.put_object(
            Bucket="security-pickles", Key=f"m{suffix}/model{suffix}", Body=_malicious_pickle(marker, True)
        )
        with pytest.raises(CheckpointError, match="refusing"):
            fetch_checkpoint(f"s3://security-pickles/m{suffix}/", tmp_path / "x")
    assert not marker.exists() and not (tmp_path / "x").exists()


_UNSAFE_CALLS = re.compile(
    r"\b(pickle|cPickle|dill|joblib|cloudpickle)\.loads?\(|\bnp\.load\([^)]*allow_pickle=True"
)


def test_sources_never_unpickle():
    """Static guard: every torch.load passes weights_only=True; no pickle/joblib/dill loads in the project."""
    offenders = []
    for folder in ("ctrl_core", "pipelines", "components", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start() : text.find(")", m.start()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(REPO)}: {call}")
            offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in _UNSAFE_CALLS.finditer(text)]
            if "use_safetensors=False" in text:
                offenders.append(f"{path.relative_to(REPO)}: use_safetensors=False")
    assert offenders == []


# -- secrets ------------------------------------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAQWERTYUIOPASDFGH",
    "AWS_SECRET_ACCESS_KEY": "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",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKENzzz",
    "MLFLOW_TRACKING_PASSWORD": "hunter2-mlflow-Pa55",
    "MLFLOW_TRACKING_TOKEN": "mlf_tok_0123456789abcdef",
    "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyzABCD",
    "KFP_BEARER_TOKEN": "kfp-bearer-9f8e7d6c5b4a",
}
GENERIC = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"(password|passwd|token)\s*[:=]\s*['\"]?[^\s'\"]{6,}", re.I),
]


def scan(text: str, where: str) -> list[str]:
    hits = [f"{where}: value of {name}" for name, value in SECRETS.items() if value in text]
    hits += [
        f"{where}: pattern {p.pattern!r}: {m.group(0)[:40]!r}" for p in GENERIC for m in p.finditer(text)
    ]
    return hits


@pytest.fixture
def secret_env(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    return SECRETS


def test_scanner_finds_what_it_should():
    assert scan(f"x {SECRETS['HF_TOKEN']} y", "t") and scan("AKIAABCDEFGHIJKLMNOP", "t")
    assert scan("aws_secret_access_key = abc", "t") and scan("password: 'letmein1'", "t")
    assert not scan('{"optimize__lr": 0.001, "checkpoint__sha256": ""}', "t")


def test_no_secrets_in_compiled_pipeline_or_params(secret_env, tmp_path):
    from ctrl_core.params import flatten, load
    from pipelines.pipeline import compile_pipeline

    params = load(REPO / "params.yaml")
    out = compile_pipeline(str(tmp_path / "pipeline.yaml"), params, "0" * 40)
    compiled = Path(out).read_text()
    assert "optimize__beta" in compiled  # it is the real pipeline
    hits = scan(compiled, "compiled pipeline")
    hits += scan(yaml.safe_dump(params.model_dump()), "params") + scan(
        json.dumps(flatten(params)), "flat params"
    )
    assert hits == []


def test_no_secrets_in_mlflow_or_logs(secret_env, tmp_path, caplog, capfd, monkeypatch):
    """A registration through register_from_outputs (the pipeline's own step) with credentials in the env."""
    from mlflow import MlflowClient

    from ctrl_core.io import atomic_save_weights
    from ctrl_core.params import load
    from pipelines.register_step import register_from_outputs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load(REPO / "params.yaml", ["register.model_name=security-scan"])
    ckpt, adapter = tmp_path / "ckpt", tmp_path / "opt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"sha256": "ab" * 32, "source": "builtin:digits"}))
    (adapter / "adapter").mkdir(parents=True)
    atomic_save_weights({"w": torch.zeros(2)}, adapter / "adapter" / "adapter_model.safetensors")
    (adapter / "metrics.json").write_text(json.dumps({"summary": {"final_reward": 1.0}}))
    cell = {"base": 0.1, "tuned": 0.2, "gain": 0.1, "kl": 0.01}
    evaluation = {"evaluation": {"sde": {"10": cell}}, "robustness_ratio": 1.0}
    with caplog.at_level(logging.DEBUG):
        out = register_from_outputs(params, str(ckpt), str(adapter), evaluation, {"chosen": "linear", "mse": {}},
                                    sha="f" * 40)  # fmt: skip
    assert out["version"] == 1

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(out["run_id"])
    stored = json.dumps([run.data.params, run.data.tags, run.data.metrics], sort_keys=True)
    mv = client.get_model_version("security-scan", "1")
    stored += json.dumps([mv.tags, mv.source, mv.description or ""])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    for f in artifacts.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".txt", ".md", ".html", ""):
            stored += f.read_text(errors="replace")
    captured = capfd.readouterr()
    hits = (
        scan(stored, "MLflow")
        + scan(caplog.text, "logs")
        + scan(captured.out + captured.err, "stdout/stderr")
    )
    assert "optimize.beta" in run.data.params or "optimize__beta" in run.data.params
    assert hits == []
