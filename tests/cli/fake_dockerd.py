"""A fake Docker daemon on a Unix socket that answers some calls, then dies mid-operation.

`FakeDockerd(path, routes)` answers each request whose method and path (without the `/v1.xx`
prefix) match a route with that route's status and body, and at the first request it has no
route for it dies the way a stopping daemon does: that connection is closed without an answer and
the socket disappears, so every later call fails too. `requests` lists what it was asked. No real
Docker is needed, so the outage can be placed exactly: after the tool's ping, before its Nth call.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API_VERSION = "1.43"


@dataclass(frozen=True)
class Route:
    """Answer `method` requests for paths matching `pattern` (re.fullmatch) with status and body.

    A dict or list body is sent as JSON; bytes as they are.
    """

    method: str
    pattern: str
    body: Any = None
    status: int = 200


@dataclass(frozen=True)
class Request:
    """One request the fake received: method, path (without the version), query and JSON body."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


# What every client asks first: the API version (docker.from_env) and a ping (engine.ping).
BASICS = (
    Route("GET", "/version", {"ApiVersion": API_VERSION, "Version": "24.0.0"}),
    Route("GET", "/_ping", b"OK"),
    Route("HEAD", "/_ping", b""),
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pooled connections expect
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _answer(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        path = re.sub(r"^/v\d+\.\d+", "", unquote(url.path))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw.startswith((b"{", b"[")) else raw
        fake.requests.append(Request(self.command, path, parse_qs(url.query), body))
        route = None if fake.dead.is_set() else fake.route(self.command, path)
        if route is None:
            fake.die()
            self.close_connection = True
            return
        answer = route.body
        text = isinstance(answer, bytes)
        data = answer if text else json.dumps(answer).encode()
        self.send_response(route.status)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = _answer


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeDockerd


class FakeDockerd:
    """The fake daemon, serving on `path` until stop() or its first unanswerable request."""

    def __init__(self, path: Path, routes: list[Route] | tuple[Route, ...] = ()):
        self.path = path
        self.routes = [*BASICS, *routes]
        self.requests: list[Request] = []
        self.dead = threading.Event()
        self._server = _Server(str(path), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        """The value for DOCKER_HOST."""
        return f"unix://{self.path}"

    def route(self, method: str, path: str) -> Route | None:
        """The first route for this request, if any."""
        for route in self.routes:
            if route.method == method and re.fullmatch(route.pattern, path):
                return route
        return None

    def die(self) -> None:
        """Stop answering and remove the socket: new connections fail, open ones get no answer."""
        if self.dead.is_set():
            return
        self.dead.set()
        self.path.unlink(missing_ok=True)
        threading.Thread(target=self._server.shutdown, daemon=True).start()

    def stop(self) -> None:
        """Shut down (after a test)."""
        self.die()
        self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> FakeDockerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
