"""The registered version is a real MLflow model: a tiny pipeline run (fetch, value pretraining, optimisation,
evaluation, registration: the pipeline's steps themselves) registers a champion, then, in fresh processes and
through MLflow's own loaders, ``mlflow.pyfunc.load_model("models:/NAME@champion").predict`` and a real
``mlflow models serve`` process return images bitwise equal to the pipeline's own sampler (the evaluate step's
tuned samples, ``ctrl_core.evaluate.evaluate``) for the same seed, and the version carries a model card.

Bitwise, not to a tolerance: the pyfunc runs the same engine code (``steps.load_problem``, ``load_adapter``,
``policy.sample``) on the same weights, conditions and generator seeds, on the CPU with one intra-op thread in
every process (OMP_NUM_THREADS=1 here too), so every float operation is the same; float32 values survive the
REST JSON exactly (each prints as a float64 that parses back to itself).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from champion_run import LABELS, NAME, SEED, TINY, _env, served  # noqa: E402, F401

_PREDICT = r"""
import json, sys
import mlflow, pandas as pd
out = {}
model = mlflow.pyfunc.load_model(f"models:/{sys.argv[1]}@champion")
for sampler in ("sde", "ode"):
    df = model.predict(pd.DataFrame({"label": json.loads(sys.argv[2])}),
                       params={"steps": 4, "sampler": sampler, "seed": int(sys.argv[3]), "pixels": True})
    out[sampler] = df.to_dict(orient="list")
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def reference(champion) -> dict[str, np.ndarray]:
    """The pipeline's own sampler: the evaluate step's code on the run's checkpoint and adapter, 12 tuned samples
    per sampler at 4 steps, as (12, 1, 8, 8) float32."""
    import torch

    from ctrl_core.evaluate import evaluate
    from ctrl_core.params import load
    from ctrl_core.steps import load_problem, make_reward_fn

    params = load(REPO / "params.yaml", TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        problem = load_problem(params, champion / "checkpoint")
        problem.policy.model.load_adapter(str(champion / "optimize" / "adapter"))
        _, kept = evaluate(problem.policy, make_reward_fn(params, problem), problem.x_shape, [4], ["sde", "ode"],
                           len(LABELS), problem.eval_conditions, seed=SEED, keep_samples=len(LABELS))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert problem.eval_conditions(len(LABELS)).tolist() == LABELS
    return {s: kept["tuned"][f"{s}/4"].numpy() for s in ("sde", "ode")}


def _check_images(rows: dict, expected: np.ndarray) -> None:
    """``rows``: the pyfunc's output columns; pixels bitwise equal, PNGs the same images as uint8."""
    import torch
    from PIL import Image

    from ctrl_core.imageprep import to_uint8

    assert rows["shape"] == [[1, 8, 8]] * len(LABELS)
    pixels = np.asarray(rows["pixels"], dtype=np.float32).reshape(expected.shape)
    assert np.array_equal(pixels, expected), float(np.abs(pixels - expected).max())
    pngs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in rows["image"]])
    assert np.array_equal(pngs, to_uint8(torch.from_numpy(expected))[..., 0])


def test_champion_loads_in_a_fresh_process_and_equals_the_pipelines_sampler(champion, reference):
    proc = subprocess.run([sys.executable, "-c", _PREDICT, NAME, json.dumps(LABELS), str(SEED)], cwd=champion,
                          env=_env(champion), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for sampler in ("sde", "ode"):
        _check_images(out[sampler], reference[sampler])
    assert not np.array_equal(reference["sde"], reference["ode"])  # the sampler param reaches the sampler


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_models_serve_answers_rest_with_the_images(champion, reference):
    port = free_port()
    cli = Path(sys.executable).with_name("mlflow")
    env = _env(champion)
    env["PATH"] = (
        f"{cli.parent}{os.pathsep}{env.get('PATH', '')}"  # the scoring server runs this venv's uvicorn
    )
    url = f"http://127.0.0.1:{port}"
    argv = [str(cli), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with served(argv, cwd=champion, env=env, log_path=champion / "serve.log", url=url):
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": v} for v in LABELS],
                                                    "params": {"steps": 4, "sampler": "sde", "seed": SEED,
                                                               "pixels": True}})  # fmt: skip
        assert status == 200, body
        rows = body["predictions"]
        _check_images({k: [r[k] for r in rows] for k in ("image", "shape", "pixels")}, reference["sde"])
        status, body = _post(
            f"{url}/invocations", {"dataframe_records": [{"label": 3}], "params": {"steps": 2}}
        )
        assert status == 200 and set(body["predictions"][0]) == {"image", "shape"}  # no pixels unless asked
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 12}]})
        assert status >= 400 and "0..9" in json.dumps(body)  # a bad label is the client's error, named


def test_the_version_is_a_logged_model_with_a_model_card(champion):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    uri = f"sqlite:///{champion / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(NAME, "champion")
    model_id = mv.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert mv.source.startswith("models:/m-") and logged.status == LoggedModelStatus.READY
    assert (
        logged.source_run_id == mv.run_id and client.get_run(mv.run_id).data.tags["ctrl.model_id"] == model_id
    )
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location, tracking_uri=uri,
                                                     dst_path=str(champion / "download")))  # fmt: skip

    m = Model.load(str(local / "MLmodel"))
    assert "python_function" in m.flavors and m.model_id == model_id and m.run_id == mv.run_id
    assert {p.name for p in m.signature.params.params} == {"steps", "sampler", "seed", "batch_size", "pixels"}
    assert m.signature.inputs.input_names() == ["label"] and m.load_input_example(str(local)) is not None
    reqs = (local / "requirements.txt").read_text().splitlines()
    assert "ctrl-pipeline==0.1.0" in reqs and any(r.startswith("torch==") for r in reqs)
    assert any(r.startswith("diffusers==") for r in reqs) and any(r.startswith("mlflow==") for r in reqs)
    art = local / "artifacts"
    assert (art / "checkpoint" / "digits_unet.safetensors").is_file()  # bundled: loads with no network
    assert m.metadata["ctrl"]["checkpoint"]["bundled"] is True
    assert (art / "adapter" / "adapter_model.safetensors").is_file() and not (
        art / "adapter" / "README.md"
    ).exists()
    assert json.loads((art / "params.json").read_text())["optimize"]["train_steps"] == 4

    card = (local / "README.md").read_text()
    for section in ("## Base model", "## Method and parameters", "## Evaluation", "## Samples", "## Lineage",
                    "## How to load it"):  # fmt: skip
        assert section in card, section
    manifest = json.loads((champion / "checkpoint" / "manifest.json").read_text())
    assert manifest["sha256"] in card and "`builtin:digits`" in card and "bundled" in card
    assert "| optimize.beta | 0.01 |" in card and "| optimize.train_steps | 4 |" in card
    evaluation = json.loads((champion / "evaluation" / "evaluation.json").read_text())["evaluation"]
    cell = evaluation["sde"]["4"]
    assert (
        f"| sde | 4 | {cell['base']:.4f} | {cell['tuned']:.4f} | {cell['gain']:+.4f} ± {cell['gain_ci']:.4f} |"
        in card
    )
    assert mv.run_id in card and model_id in card and "0" * 40 in card and "params digest" in card
    assert "DVC revision" in card
    assert f'mlflow.pyfunc.load_model("models:/{NAME}@champion")' in card and "ctrl export --fused" in card
    assert "More Information Needed" not in card
    assert "![tuned samples](sample_grid.png)" in card
    assert (local / "sample_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local / "sample_grid_base.png").is_file()
