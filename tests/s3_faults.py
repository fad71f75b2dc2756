"""A real HTTP proxy that injects S3 faults in front of the local S3 server (tests/s3_server.py).

    with local_s3_server() as upstream, FaultyS3Proxy(upstream) as proxy:
        proxy.add(Fault("status", times=2, status=500, method="GET"))   # the next 2 GETs answer 500
        proxy.add(Fault("truncate", times=1, method="GET"))             # then one GET body cut in half
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint               # boto3 now talks to the proxy

Faults are consumed in order by the requests they match (``method`` and a substring of the path, both
optional); a request that matches no pending fault is forwarded untouched. Every request is recorded in
``proxy.log`` as ``(method, path, action)``. The kinds:

* ``status``    -- answer ``status`` (500, 503, ...) with an S3 XML error body; nothing is forwarded.
* ``drop``      -- close the connection without answering (nothing is forwarded).
* ``truncate``  -- forward, then send the headers with the true Content-Length and only half of the body,
  and close the connection (a connection lost mid-download).
* ``short``     -- forward, then send half of the body with a Content-Length *rewritten* to match: a
  well-formed but incomplete response that only a size or checksum check can catch.
* ``corrupt``   -- forward, then flip bytes in the body (same length): only a checksum can catch it.

Only the standard library is used: the bench (``bench/faults.py``) imports this module too.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

KINDS = ("status", "drop", "truncate", "short", "corrupt")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}
_STATUS_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclass
class Fault:
    """Inject ``kind`` into the next ``times`` requests that match ``method`` / ``path_contains``."""

    kind: str
    times: int = 1
    status: int = 500
    method: str | None = None  # GET, PUT, HEAD, ... (None: any)
    path_contains: str = ""
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.times
            and (self.method is None or self.method == method)
            and self.path_contains in urllib.parse.unquote(path)
        )


class FaultyS3Proxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="faulty-s3-proxy",
            daemon=True,
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, *faults: Fault) -> FaultyS3Proxy:
        with self._lock:
            self.faults.extend(faults)
        return self

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def pending(self) -> int:
        """Fault injections not yet consumed."""
        with self._lock:
            return sum(f.times - f.hits for f in self.faults)

    def injected(self) -> int:
        with self._lock:
            return sum(1 for *_, action in self.log if action != "forward")

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    self.log.append((method, path, f.kind))
                    return f
            self.log.append((method, path, "forward"))
            return None

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(proxy: FaultyS3Proxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive like a real S3 endpoint; faults close the connection

        def log_message(self, *args) -> None:  # quiet
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self) -> None:
            body = self._read_body()
            fault = proxy._take(self.command, self.path)
            if fault is not None and fault.kind == "drop":
                self._abort()
                return
            if fault is not None and fault.kind == "status":
                code = _STATUS_CODES.get(fault.status, "InternalError")
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected fault</Message><RequestId>fault</RequestId></Error>"
                ).encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            status, reason, headers, payload = self._forward(body)
            declared = len(payload)
            if fault is not None and payload and fault.kind in ("truncate", "short"):
                payload = payload[: len(payload) // 2]
                if fault.kind == "short":
                    declared = len(payload)
            elif fault is not None and payload and fault.kind == "corrupt":
                payload = bytes(b ^ 0xFF for b in payload[:16]) + payload[16:]
            self.send_response(status, reason)
            for k, v in headers:
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD":
                self.send_header(
                    "Content-Length", dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                )
            else:
                self.send_header("Content-Length", str(declared))
            if fault is not None and fault.kind == "truncate":
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            if fault is not None and fault.kind == "truncate":
                self.wfile.flush()
                self._abort()

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                return resp.status, resp.reason, resp.getheaders(), payload
            finally:
                conn.close()

        def _abort(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


def iter_kinds(methods: tuple[str, ...] = ("GET", "HEAD")) -> Iterator[tuple[str, str]]:
    """Every (kind, method) pair that makes sense for a download (body faults only on GET)."""
    for method in methods:
        for kind in KINDS:
            if kind in ("truncate", "short", "corrupt") and method != "GET":
                continue
            yield kind, method
