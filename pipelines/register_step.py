"""The register step: lineage + MLflow registration through ``pipelines.registry`` (MLflow lives here, not in
ctrl_core). The version's model is an MLflow pyfunc model (``pipelines.mlflow_model``): base checkpoint, adapter,
run parameters and model card."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from ctrl_core.params import Params


def git_sha(default: str = "") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else default
    except (OSError, subprocess.SubprocessError):
        return default


def dvc_revision() -> str:
    """The DVC lock file's hash when the run happens inside a DVC project (lineage of the data stages)."""
    lock = Path("dvc.lock")
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else ""


def _live_run(params: Params) -> str | None:
    """The pipeline's live MLflow run, which the registration completes (components/tracking.py), if any."""
    from components import tracking

    if not tracking.enabled():
        return None
    try:
        return tracking.find_run(tracking.client(), params)
    except Exception as err:  # the registration does not depend on it: a new run holds it instead
        print(f"live MLflow run not found ({type(err).__name__}: {err}); registering into a new run")
        return None


def run_key(params: Params, checkpoint_sha256: str) -> str:
    """Identical parameters on the identical checkpoint give the identical key: a retried or repeated run
    reuses its registration instead of adding a version."""
    return hashlib.sha256(f"{params.digest()}:{checkpoint_sha256}".encode()).hexdigest()[:32]


def register_from_outputs(
    params: Params,
    checkpoint_dir: str,
    adapter_dir: str,
    evaluation: dict,
    link: dict,
    sha: str = "",
    evaluation_dir: str | None = None,
    bundle_checkpoint: bool | None = None,
) -> dict:
    """``bundle_checkpoint``: copy the base checkpoint into the MLflow model (None: when it is small enough,
    ``mlflow_model.BUNDLE_LIMIT_BYTES``), else reference it by source and sha256."""
    from functools import partial

    from ctrl_core.params import flatten

    from .mlflow_model import build_model
    from .registry import GateConfig, register_run

    manifest = json.loads((Path(checkpoint_dir) / "manifest.json").read_text())
    metrics_file = Path(adapter_dir) / "metrics.json"
    train = json.loads(metrics_file.read_text())["summary"] if metrics_file.is_file() else {}
    metrics = {
        f"train/{k}": float(v) for k, v in train.items() if isinstance(v, (int, float)) and v is not None
    }
    if evaluation.get("robustness_ratio") is not None:
        metrics["eval/robustness_ratio"] = float(evaluation["robustness_ratio"])
    for name, mse in link.get("mse", {}).items():
        metrics[f"value/mse/{name}"] = float(mse)
    artifacts = {
        k: str(Path(adapter_dir) / k)
        for k in ("metrics.json", "value.safetensors", "link.json")
        if (Path(adapter_dir) / k).exists()
    }
    if evaluation_dir and Path(evaluation_dir).is_dir():  # the plot, the sample grids and the report
        artifacts["evaluation"] = evaluation_dir
    rp = params.register
    lineage = {
        "git_sha": sha or git_sha(),
        "params_hash": params.digest(),
        "checkpoint_sha256": manifest["sha256"],
        "checkpoint_source": manifest["source"],
        "dvc_revision": dvc_revision(),
        "value_link": link.get("chosen", ""),
    }
    model = partial(build_model, params=params, checkpoint_dir=checkpoint_dir, adapter_dir=Path(adapter_dir) / "adapter",
                    evaluation=evaluation, lineage=lineage, model_name=rp.model_name, evaluation_dir=evaluation_dir,
                    bundle=bundle_checkpoint)  # fmt: skip
    result = register_run(
        model_name=rp.model_name,
        run_key=run_key(params, manifest["sha256"]),
        params={k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(params).items()},
        metrics=metrics,
        evaluation=evaluation["evaluation"],
        artifacts=artifacts,
        lineage=lineage,
        gate=GateConfig(
            min_gain=rp.min_gain,
            require_no_worse_than_champion=rp.require_no_worse_than_champion,
            tolerance=rp.tolerance,
        ),
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        experiment=params.run.name,
        logged_model=model,
        live_run_id=_live_run(params),
    )
    return {
        "name": result.name,
        "version": result.version,
        "aliases": sorted(result.aliases),
        "run_id": result.run_id,
        "promoted": result.promoted,
        "gate_passed": result.gate_passed,
        "gate_reason": result.gate_reason,
        "created": result.created,
        "model_uri": f"models:/{result.name}/{result.version}",
        "model_id": result.model_id,
    }
