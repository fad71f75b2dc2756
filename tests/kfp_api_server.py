"""A local stand-in for the Kubeflow Pipelines v2beta1 REST API that records every request.

No KFP server can run on these machines, so ``ctrl submit`` / ``ctrl schedule`` are tested against this: a
threaded ``http.server`` on 127.0.0.1 answering the endpoints ``kfp.Client`` (kfp 2.17) calls, with the
JSON shapes of ``kfp_server_api``'s models (snake_case fields; ``recurringRuns`` in the list response, as
the generated client expects). It keeps pipelines, versions (with the uploaded spec), experiments, runs
and recurring runs in memory and applies ``display_name`` EQUALS filters like the real server.

    with KfpApiServer() as server:
        client = kfp.Client(host=server.url)
        ...
        server.requests  # [Request(method, path, query, headers, body, files), ...]
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

PREFIX = "/apis/v2beta1"
NOW = "2026-01-01T00:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def _filter_name(query: dict[str, str]) -> str | None:
    """The display_name of an EQUALS filter (what kfp.Client sends to find by name), else None."""
    if not query.get("filter"):
        return None
    for p in json.loads(query["filter"]).get("predicates", []):
        if p.get("key") in ("display_name", "name") and p.get("operation") in ("EQUALS", 1):
            return p.get("stringValue", p.get("string_value"))
    return None


class KfpApiServer:
    def __init__(self, multi_user: bool = False) -> None:
        self.multi_user = multi_user
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> KfpApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def calls(self, method: str, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == PREFIX + suffix]

    # --- the API ----------------------------------------------------------------------------------------
    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}-{uuid.uuid4().hex[:6]}"

    def _new_version(self, pipeline_id: str, name: str, description: str, package: bytes) -> dict:
        vid = self._id("version")
        docs = [d for d in yaml.safe_load_all(package) if d]
        # as the server stores it: one document, or the pipeline spec with the platform (Kubernetes) spec
        spec = docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}
        v = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": vid,
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": NOW,
            "pipeline_spec": spec,
        }
        self.versions[vid] = v
        return v

    def handle(self, req: Request) -> tuple[int, dict]:
        path = req.path.removeprefix(PREFIX)
        parts = [p for p in path.split("/") if p]
        m = req.method
        if m == "GET" and path == "/healthz":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if m == "POST" and path == "/pipelines/upload":
            name = req.query.get("name") or req.query.get("display_name")
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return 409, {"error_message": f"pipeline {name} already exists", "code": 6}
            pid = self._id("pipeline")
            p = {
                "pipeline_id": pid,
                "display_name": name,
                "name": name,
                "description": req.query.get("description", ""),
                "created_at": NOW,
                "namespace": req.query.get("namespace", ""),
            }
            self.pipelines[pid] = p
            self._new_version(pid, name, p["description"], req.files["uploadfile"])  # as KFP: a first version
            return 200, p
        if m == "POST" and path == "/pipelines/upload_version":
            pid = req.query.get("pipelineid")
            if pid not in self.pipelines:
                return 404, {"error_message": f"pipeline {pid} not found", "code": 5}
            name = req.query["name"]
            if any(v["pipeline_id"] == pid and v["display_name"] == name for v in self.versions.values()):
                return 409, {"error_message": f"version {name} already exists", "code": 6}
            v = self._new_version(pid, name, req.query.get("description", ""), req.files["uploadfile"])
            return 200, {k: v[k] for k in v if k != "pipeline_spec"}
        if m == "GET" and path == "/pipelines":
            name = _filter_name(req.query)
            found = [p for p in self.pipelines.values() if name is None or p["display_name"] == name]
            return 200, ({"pipelines": found, "total_size": len(found)} if found else {})
        if m == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            name = _filter_name(req.query)
            found = [
                {k: v[k] for k in v if k != "pipeline_spec"}
                for v in self.versions.values()
                if v["pipeline_id"] == parts[1] and (name is None or v["display_name"] == name)
            ]
            return 200, ({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if m == "GET" and len(parts) == 4 and parts[0] == "pipelines" and parts[2] == "versions":
            v = self.versions.get(parts[3])
            return (200, v) if v else (404, {"error_message": "not found", "code": 5})
        if m == "GET" and path == "/experiments":
            name = _filter_name(req.query)
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if m == "POST" and path == "/experiments":
            eid = self._id("experiment")
            e = {**req.body, "experiment_id": eid, "created_at": NOW, "storage_state": "AVAILABLE"}
            self.experiments[eid] = e
            return 200, e
        if m == "POST" and path == "/runs":
            rid = self._id("run")
            r = {
                **req.body,
                "run_id": rid,
                "created_at": NOW,
                "state": "PENDING",
                "storage_state": "AVAILABLE",
            }
            self.runs[rid] = r
            return 200, r
        if m == "GET" and path == "/recurringruns":
            name = _filter_name(req.query)
            exp = req.query.get("experiment_id")
            found = [
                r
                for r in self.recurring_runs.values()
                if (name is None or r["display_name"] == name) and (exp is None or r["experiment_id"] == exp)
            ]
            return 200, ({"recurringRuns": found, "total_size": len(found)} if found else {})
        if m == "POST" and path == "/recurringruns":
            rid = self._id("recurring")
            r = {
                **req.body,
                "recurring_run_id": rid,
                "created_at": NOW,
                "updated_at": NOW,
                "status": "ENABLED",
            }
            self.recurring_runs[rid] = r
            return 200, r
        if m == "DELETE" and len(parts) == 2 and parts[0] == "recurringruns":
            if self.recurring_runs.pop(parts[1], None) is None:
                return 404, {"error_message": "not found", "code": 5}
            return 200, {}
        return 404, {"error_message": f"no route {m} {req.path}", "code": 12}

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
                body, files = None, {}
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        f"Content-Type: {ctype}\r\n\r\n".encode() + raw
                    )
                    for part in msg.iter_parts():
                        files[part.get_param("name", header="content-disposition")] = part.get_payload(
                            decode=True
                        )
                elif raw:
                    body = json.loads(raw)
                req = Request(
                    self.command,
                    url.path,
                    query,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    files,
                )
                with server._lock:
                    server.requests.append(req)
                    try:
                        status, payload = server.handle(req)
                    except Exception as err:  # noqa: BLE001 - answer like a server, the test sees the 500
                        status, payload = 500, {"error_message": f"{type(err).__name__}: {err}", "code": 13}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        return Handler
