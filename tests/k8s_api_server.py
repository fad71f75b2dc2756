"""A local stand-in for the Kubernetes API as a TrainJob's launcher uses it, recording every request.

No cluster runs on these machines, so components/trainjob.py is tested against this: a threaded ``http.server``
on 127.0.0.1 answering the endpoints that the official ``kubernetes`` client calls for TrainJobs
(``trainer.kubeflow.org/v1alpha1``: create, get, delete) and for pods (list with a label selector, read a log),
with the JSON shapes of the API. A created TrainJob is read through the Trainer API's published models first
(a field the models do not know, or a value of the wrong type, is answered 422 as a strict API server does).

Each TrainJob then plays its :class:`Script`: every GET moves it one state on (created -> running -> ended),
as the Trainer controller would between two polls. Running, its rank-0 pod exists (the JobSet's labels) and
has a log; ended, it carries the ``Complete`` or ``Failed`` condition the Trainer copies from its JobSet, and
``on_complete`` (what rank 0 would have written) runs just before ``Complete`` is shown. A script with
``end=None`` runs until deleted.

    with K8sApiServer(Script(end="Complete", log="step 1\\n")) as server:
        client = server.api_client()
        ...
        server.requests  # [Request(method, path, query, body), ...]
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

NOW = "2026-01-01T00:00:00Z"
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
# the Failed / Complete conditions as the Trainer copies them from its JobSet (jobset's constants)
FAILED = {"reason": "FailedJobs", "message": "jobset failed due to one or more job failures"}
COMPLETE = {"reason": "AllJobsCompleted", "message": "jobset completed successfully"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None = None


@dataclass
class Script:
    """How every TrainJob created on the server goes: ``end`` is ``Complete``, ``Failed`` or None (runs until
    deleted); ``log`` is rank 0's log; ``on_complete(job)`` runs when it completes."""

    end: str | None = "Complete"
    log: str = ""
    failure: dict = field(default_factory=lambda: dict(FAILED))
    on_complete: Callable[[dict], None] | None = None
    running_after: int = 1  # GETs before it runs (its pods scheduled)
    ended_after: int = 3  # GETs before it ends


class K8sApiServer:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.requests: list[Request] = []
        self.trainjobs: dict[tuple[str, str], dict] = {}
        self.deleted: list[str] = []
        self._gets: dict[tuple[str, str], int] = {}
        self.running = threading.Event()  # set when a TrainJob first shows as running
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> K8sApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def api_client(self):
        """The official client, configured for this server (as a kubeconfig with ``server:`` would)."""
        from kubernetes.client import ApiClient, Configuration

        conf = Configuration(host=self.url)
        return ApiClient(conf)

    def kubeconfig(self) -> str:
        """A kubeconfig document naming this server (for a process that loads ``$KUBECONFIG``)."""
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": {"server": self.url}}],
                "users": [{"name": "local", "user": {"token": "local"}}],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local"}}],
                "current-context": "local",
            }
        )

    def calls(self, method: str, kind: str = "trainjobs") -> list[Request]:
        return [r for r in self.requests if r.method == method and f"/{kind}" in r.path]

    # --- the API ----------------------------------------------------------------------------------------
    def _state(self, key: tuple[str, str]) -> str:
        n = self._gets.get(key, 0)
        if self.script.end is not None and n >= self.script.ended_after:
            return self.script.end
        return "Running" if n >= self.script.running_after else "Created"

    def _with_status(self, key: tuple[str, str]) -> dict:
        job = dict(self.trainjobs[key])
        state = self._state(key)
        nodes = job["spec"]["trainer"].get("numNodes", 1)
        running = state == "Running"
        status: dict = {
            "jobsStatus": [
                {
                    "name": "node",
                    "active": nodes if running else 0,
                    "ready": nodes if running else 0,
                    "succeeded": nodes if state == "Complete" else 0,
                    "failed": 1 if state == "Failed" else 0,
                    "suspended": 0,
                }
            ]
        }
        if state in ("Complete", "Failed"):
            text = COMPLETE if state == "Complete" else self.script.failure
            status["conditions"] = [{"type": state, "status": "True", "lastTransitionTime": NOW, **text}]
        job["status"] = status
        return job

    def _pods(self, ns: str) -> list[dict]:
        pods = []
        for (jns, name), job in self.trainjobs.items():
            state = self._state((jns, name))
            if jns != ns or state == "Created":
                continue
            phase = {"Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}[state]
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"{name}-node-0-0-x7k2p",
                        "namespace": ns,
                        "creationTimestamp": NOW,
                        "labels": {
                            "jobset.sigs.k8s.io/jobset-name": name,
                            "jobset.sigs.k8s.io/replicatedjob-name": "node",
                            "batch.kubernetes.io/job-completion-index": "0",
                        },
                    },
                    "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]},
                    "status": {"phase": phase},
                }
            )
        return pods

    def handle(self, req: Request) -> tuple[int, dict | str]:
        parts = [p for p in req.path.split("/") if p]
        m = req.method
        if (
            len(parts) >= 6
            and parts[:3] == ["apis", "trainer.kubeflow.org", "v1alpha1"]
            and parts[5] == "trainjobs"
        ):
            ns = parts[4]
            if m == "POST" and len(parts) == 6:
                from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

                body = req.body or {}
                if TrainerV1alpha1TrainJob.from_dict(body).to_dict() != body:
                    return 422, _status(422, "Invalid", "TrainJob has fields the API does not know")
                key = (ns, body["metadata"]["name"])
                if key in self.trainjobs:
                    return 409, _status(409, "AlreadyExists", f'trainjobs "{key[1]}" already exists')
                meta = {
                    **body["metadata"],
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": NOW,
                    "generation": 1,
                }
                self.trainjobs[key] = {**body, "metadata": meta}
                return 201, self.trainjobs[key]
            key = (ns, parts[6]) if len(parts) == 7 else None
            if key is None or key not in self.trainjobs:
                return 404, _status(404, "NotFound", "trainjobs not found")
            if m == "GET":
                self._gets[key] = self._gets.get(key, 0) + 1
                state = self._state(key)
                if state == "Running":
                    self.running.set()
                if (
                    state == "Complete"
                    and self.script.on_complete
                    and self._gets[key] == self.script.ended_after
                ):
                    self.script.on_complete(self.trainjobs[key])
                return 200, self._with_status(key)
            if m == "DELETE":
                self.deleted.append(key[1])
                return 200, self.trainjobs.pop(key)
        if len(parts) >= 5 and parts[:2] == ["api", "v1"] and parts[4] == "pods":
            ns = parts[3]
            pods = self._pods(ns)
            if m == "GET" and len(parts) == 5:
                wanted = dict(kv.split("=", 1) for kv in req.query.get("labelSelector", "").split(",") if kv)
                items = [p for p in pods if wanted.items() <= p["metadata"]["labels"].items()]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if m == "GET" and len(parts) == 7 and parts[6] == "log":
                if not any(p["metadata"]["name"] == parts[5] for p in pods):
                    return 404, _status(404, "NotFound", f'pods "{parts[5]}" not found')
                return 200, self.script.log
        return 404, _status(404, "NotFound", f"no route {m} {req.path}")

    # --- HTTP plumbing ----------------------------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _serve(self) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Request(self.command, url.path, query, json.loads(raw) if raw else None)
                with server._lock:
                    server.requests.append(req)
                    try:
                        status, payload = server.handle(req)
                    except Exception as err:  # noqa: BLE001 - answer like a server, the test sees the 500
                        status, payload = 500, _status(500, "InternalError", f"{type(err).__name__}: {err}")
                text = isinstance(payload, str)
                data = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        return Handler


def _status(code: int, reason: str, message: str) -> dict:
    """A ``metav1.Status``, the body of every error answer."""
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip
