"""A fault-injecting HTTP proxy for S3 tests: forwards to the moto server, breaking some requests.

    with FaultProxy(s3_endpoint, [Fault("503", every=4, limit=5)]) as proxy:
        ... use proxy.url as the S3 endpoint ...
    assert proxy.injected["503"] == 5

A `Fault` fires on the first `first` requests it matches and/or on every `every`-th one, at most
`limit` times; the first rule that fires decides the request's fate. Kinds:

    "503"         503 SlowDown (S3's throttling reply)
    "500"         500 InternalError
    "403"         403 AccessDenied (a bucket policy or IAM refusal)
    "reset"       TCP reset before the request reaches the server
    "close"       connection closed without a reply (curl: empty reply from server)
    "reset-after" forwarded to the server, then the reply is lost to a reset (tests idempotency)

The proxy is bounded (faults are limited per rule, one thread per connection with an idle timeout)
and self-stopping: it shuts down when its context exits or after `max_lifetime_s`, whichever comes
first, so a failing test never leaves it running.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("503", "500", "403", "reset", "close", "reset-after")
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect",
               "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    kind: str
    first: int = 0  # fail the first N matching requests
    every: int = 0  # and/or every k-th matching request (0 = never)
    limit: int = 1_000_000  # at most this many faults from this rule
    method: str | None = None  # only requests with this HTTP method (e.g. "GET")
    path_contains: str | None = None  # only requests whose path contains this

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or method == self.method)
                and (self.path_contains is None or self.path_contains in path))


class FaultProxy:
    def __init__(self, upstream: str, faults: list[Fault] | None = None,
                 max_lifetime_s: float = 300.0) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults = list(faults or [])
        self.max_lifetime_s = max_lifetime_s
        self.injected: Counter[str] = Counter()  # kind -> faults injected
        self.requests = 0  # every request received, faulted or not
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault kind or "ok")
        self._seen = [0] * len(self.faults)  # matching requests per rule
        self._fired = [0] * len(self.faults)  # faults injected per rule
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True, name="fault-proxy").start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- schedule -------------------------------------------------------------------------------

    def decide(self, method: str, path: str) -> str | None:
        """The fault to inject for this request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            chosen = None
            for i, rule in enumerate(self.faults):
                if not rule.matches(method, path):
                    continue
                self._seen[i] += 1
                n = self._seen[i]
                fires = n <= rule.first or (rule.every > 0 and n % rule.every == 0)
                if chosen is None and fires and self._fired[i] < rule.limit:
                    self._fired[i] += 1
                    chosen = rule.kind
            if chosen:
                self.injected[chosen] += 1
            self.log.append((method, path, chosen or "ok"))
            return chosen

    def set_faults(self, faults: list[Fault]) -> None:
        """Replace the schedule (counters restart) while the proxy keeps running."""
        with self._lock:
            self.faults = list(faults)
            self._seen = [0] * len(self.faults)
            self._fired = [0] * len(self.faults)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # injected resets make handler threads fail; that is the point, not news


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>faultproxy</RequestId>"
            f"<HostId>faultproxy</HostId></Error>").encode()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    timeout = 30  # an idle keep-alive connection frees its thread after this

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        fault = self.owner.decide(self.command, self.path)
        body = self._body()
        if fault == "reset":
            return self._reset()
        if fault == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            payload = b"" if self.command == "HEAD" else _error_xml(code, message)
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return None
        status, reason, headers, payload = self._forward(body)
        if fault == "reset-after":
            return self._reset()
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            length = next((v for n, v in headers if n.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        return None

    def _forward(self, body: bytes):
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            connection.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
