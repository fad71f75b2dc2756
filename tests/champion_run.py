"""A tiny pipeline run registered as a champion (the steps themselves, then register_from_outputs), in a local
sqlite tracking store: what the MLflow-model and the KServe serving tests load and serve. One run per test
session (conftest.py's ``champion`` fixture)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "ctrl-tiny"
TINY = ["value.num_paths=16", "value.steps=4", "value.epochs=1", 'value.candidates=["cos_sin","rm_only"]',
        "optimize.iterations=2", "optimize.batch_size=8", "optimize.train_steps=4", "optimize.train_timesteps=2",
        "optimize.minibatch_size=8", "optimize.checkpoint_every=0", "evaluate.steps=[2,4]", "evaluate.num_samples=8",
        f"register.model_name={NAME}", "register.min_gain=-1000"]  # fmt: skip  # any gain passes: a champion
LABELS = [*range(10), 0, 1]  # the evaluate step's conditions for 12 samples: arange(12) % 10
SEED = 1234  # params.yaml's evaluate.seed

_PIPELINE = r"""
import json, sys
from pathlib import Path
from ctrl_core import steps
from ctrl_core.params import load
from pipelines.register_step import register_from_outputs
repo, root, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
p = load(repo / "params.yaml", [*overrides, f"run.checkpoint_root={root / 'resume'}"])
steps.fetch(p, root / "checkpoint")
link = steps.pretrain_value(p, root / "checkpoint", root / "value")
steps.optimize(p, root / "checkpoint", root / "value", root / "optimize")
ev = steps.evaluate(p, root / "checkpoint", root / "optimize" / "adapter", root / "evaluation")
out = register_from_outputs(p, str(root / "checkpoint"), str(root / "optimize"), ev, link, sha="0" * 40,
                            evaluation_dir=str(root / "evaluation"))
(root / "registered.json").write_text(json.dumps(out))
"""


def _env(root: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip


def run_champion(root: Path) -> Path:
    """A tiny pipeline run registered as the champion of NAME, in a local sqlite tracking store (cwd: its root)."""
    proc = subprocess.run([sys.executable, "-c", _PIPELINE, str(REPO), str(root), json.dumps(TINY)], cwd=root,
                          env=_env(root), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    registered = json.loads((root / "registered.json").read_text())
    assert registered["promoted"] and registered["version"] == 1, registered
    return root


@contextlib.contextmanager
def served(argv: list[str], *, cwd: Path, env: dict, log_path: Path, url: str, ready_path: str = "/ping"):
    """A scoring server started from ``argv`` (its own process group, output to ``log_path``), once ``url +
    ready_path`` answers 200 (within 240 s, failing with the log's end if it dies or never answers); stopped with
    its workers on exit (SIGTERM, then SIGKILL)."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no {ready_path} answer:\n" + log_path.read_text()[-4000:]
            try:
                with urllib.request.urlopen(url + ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        yield server
    finally:  # the server and its uvicorn worker: its own process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()
