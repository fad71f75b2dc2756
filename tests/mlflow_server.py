"""Start a real ``mlflow server`` subprocess for integration tests (no mocks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cli() -> str:
    # Prefer the CLI of the interpreter running the tests (the project's virtualenv).
    candidate = Path(sys.executable).with_name("mlflow")
    return str(candidate) if candidate.exists() else "mlflow"


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate the server and its worker children (it runs in its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def mlflow_server(
    root: str | os.PathLike | None = None, *, workers: int = 1, timeout: float = 90.0
) -> Iterator[str]:
    """Run ``mlflow server`` on a free localhost port and yield its URI (``http://127.0.0.1:<port>``).

    The backend store is ``sqlite:///<root>/mlflow.db`` and proxied artifacts go to ``<root>/artifacts``
    (``--serve-artifacts`` is the default, so runs get ``mlflow-artifacts:/`` URIs). ``root`` defaults to a
    fresh temporary directory removed on exit. The server and its workers are terminated on exit.
    """
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflow-server-"))
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        # MLflow 3.x also spawns a job runner + ~7 huey consumer processes (GenAI jobs) that the registry never
        # uses; on a small CI box they double the start-up time, so switch them off.
        env = dict(
            os.environ,
            MLFLOW_DISABLE_TELEMETRY="true",
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            OMP_NUM_THREADS="1",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        log = stack.enter_context(open(root / "server.log", "wb"))
        cmd = [
            _mlflow_cli(), "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
        ]  # fmt: skip
        # Own process group so that teardown reaches uvicorn's worker processes too.
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        stack.callback(_stop, proc)
        deadline = time.monotonic() + timeout
        while not _healthy(uri):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}:\n{_tail(root / 'server.log')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mlflow server not healthy after {timeout:.0f}s:\n{_tail(root / 'server.log')}"
                )
            time.sleep(0.25)
        yield uri


def _tail(path: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""
