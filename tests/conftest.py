"""Session-wide real servers: a local S3-compatible server (moto) and an ``mlflow server`` process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from champion_run import run_champion  # noqa: E402
from mlflow_server import mlflow_server as _run_mlflow_server  # noqa: E402
from s3_server import local_s3_server, patched_env  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server for the session; AWS_ENDPOINT_URL_S3 points at it while it runs."""
    with local_s3_server() as endpoint, patched_env({"AWS_ENDPOINT_URL_S3": endpoint}):
        yield endpoint


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real ``mlflow server`` (sqlite backend, proxied artifacts) shared by the session."""
    with _run_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (tests comparing against 1-thread subprocesses do) gives it back,
    so no test runs at a thread count another test left behind (tests fail one at a time)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def champion(tmp_path_factory):
    """A tiny pipeline run registered as the champion of champion_run.NAME (sqlite store in the returned folder);
    shared by the MLflow-model and the KServe serving tests."""
    return run_champion(tmp_path_factory.mktemp("mlflow-model"))
