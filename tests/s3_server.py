"""A real, local S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1, over HTTP.

    with local_s3_server() as endpoint:   # e.g. "http://127.0.0.1:54321"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="b")

While it runs, dummy credentials are set in the environment (AWS_ACCESS_KEY_ID=test, ...) and the
user's AWS config/credentials files and profile are hidden, so nothing real can be reached or used; the
previous environment is restored at exit. Requests go over a socket to the server thread: boto3 is not
mocked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: unset while the server runs (they would point boto3 at a real profile, session or endpoint)
HIDDEN_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def patched_env(set_vars: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*set_vars, *unset)}
    try:
        for k in unset:
            os.environ.pop(k, None)
        os.environ.update(set_vars)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_s3_server(host: str = "127.0.0.1") -> Iterator[str]:
    """Start the server on a free port; yield its endpoint URL; stop it (and restore the env) at exit."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    # an empty AWS config (not /dev/null: dvc-s3 accepts only a regular file) keeps real profiles out
    with tempfile.TemporaryDirectory() as cfg_dir:
        empty = os.path.join(cfg_dir, "aws-config")
        open(empty, "w").close()
        files = {"AWS_CONFIG_FILE": empty, "AWS_SHARED_CREDENTIALS_FILE": empty}
        with patched_env({**DUMMY_AWS_ENV, **files}, HIDDEN_AWS_ENV), _moto(host) as endpoint:
            yield endpoint


@contextlib.contextmanager
def _moto(host: str) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=free_port(host), verbose=False)
    server.start()
    try:
        bound_host, port = server.get_host_and_port()
        yield f"http://{bound_host}:{port}"
    finally:
        server.stop()
