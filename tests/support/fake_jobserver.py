"""A fake jobs website on 127.0.0.1: the server side of docs/reference.md#jobs-website, with switchable faults."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

API_PREFIX = "/api/v2/"
ROUTES = {"job-requests/": "GET", "jobs/": "POST"}
FAULTS = (None, "slow", "500", "garbage", "reset", "403")

# Field rules of today's JobAPIUpdate serializer: (may be blank, may be null, is a datetime).
JOB_FIELDS = {
    "identifier": (False, False, False),
    "job_request_id": (False, False, False),
    "action": (True, False, False),
    "status": (False, False, False),
    "status_code": (True, False, False),
    "status_message": (True, False, False),
    "run_command": (True, False, False),
    "created_at": (False, False, True),
    "updated_at": (False, True, True),
    "started_at": (False, True, True),
    "completed_at": (False, True, True),
}
DATETIME_ERROR = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)


def new_request_id() -> str:
    """Mint a job request id the way the website does: 10 random bytes, base32, lower-case."""
    return base64.b32encode(os.urandom(10)).decode().lower()


def iso_now(offset_us: int = 0) -> str:
    """Now in UTC as the website writes it, shifted by some microseconds."""
    moment = datetime.fromtimestamp(time.time() + offset_us / 1e6, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_job(item: Any) -> dict[str, list[str]]:
    """Errors for one posted job as the server reports them ({} when valid)."""
    if not isinstance(item, dict):
        name = type(item).__name__
        return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {name}."]}
    errors: dict[str, list[str]] = {}
    for field, (blank_ok, null_ok, is_datetime) in JOB_FIELDS.items():
        if field not in item:
            errors[field] = ["This field is required."]
            continue
        value = item[field]
        if value is None:
            if not null_ok:
                errors[field] = ["This field may not be null."]
        elif is_datetime:
            if not _is_datetime(value):
                errors[field] = [DATETIME_ERROR]
        elif isinstance(value, (bool, dict, list)):
            errors[field] = ["Not a valid string."]
        elif str(value) == "" and not blank_ok:
            errors[field] = ["This field may not be blank."]
    return errors


def _is_datetime(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeJobServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up on a slow or reset reply are part of the tests, not errors.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = fake._take_fault()
        fake.calls.append(
            {
                "method": method,
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "flags": self.headers.get("Flags"),
                "fault": fault,
            }
        )
        if fault == "reset":
            return self._reset()
        if fault == "slow":
            fake._stopping.wait(fake.slow_seconds)
        elif fault == "500":
            return self._send(500, b"<h1>Server Error (500)</h1>", "text/html")
        elif fault == "garbage":
            return self._send(200, fake.garbage_body, "text/html")
        elif fault == "403":
            return self._json(403, {"detail": "Invalid token"})

        parts = urlsplit(self.path)
        route = parts.path[len(API_PREFIX) :] if parts.path.startswith(API_PREFIX) else None
        if route is not None and route + "/" in ROUTES:
            # Django's APPEND_SLASH: a redirect that loses any POST body.
            location = parts.path + "/" + (f"?{parts.query}" if parts.query else "")
            return self._send(301, b"", "text/html", {"Location": location})
        if route not in ROUTES:
            return self._json(404, {"detail": "Not found."})
        if method != ROUTES[route]:
            return self._json(405, {"detail": f'Method "{method}" not allowed.'})
        if route == "jobs/":
            return self._post_jobs(parts.path, body)
        return self._get_job_requests(parts.path, parts.query)

    def _get_job_requests(self, path: str, query: str) -> None:
        fake = self.server.fake
        token = self.headers.get("Authorization")
        # Auth is optional here: no (or an empty) token lists every backend's requests.
        backend = None
        if token:
            if token != fake.token:
                return self._json(403, {"detail": "Invalid token"})
            backend = fake.backend
        params = dict(parse_qsl(query))
        limit = _positive_int(params.get("limit"), fake.page_size)
        offset = max(_positive_int(params.get("offset"), 0), 0)
        with fake.lock:
            # Keyed by the store, not the objects: tests break stored objects on purpose.
            keys = [
                key
                for key, r in fake.requests.items()
                if fake.is_active(key) and backend in (None, r.get("backend"))
            ]
            keys.sort(
                key=lambda k: (str(fake.requests[k].get("created_at")), fake._order[k]),
                reverse=True,
            )
            active = [fake.requests[k] for k in keys]
            page = json.loads(json.dumps(active[offset : offset + limit]))
            if backend is not None:
                fake.last_seen[path] = time.time()
        base = f"http://{self.headers.get('Host') or fake.address}{path}"
        nxt = prev = None
        if offset + limit < len(active):
            nxt = _with_params(base, params, limit=limit, offset=offset + limit)
        if offset > 0:
            prev = _with_params(base, params, limit=limit, offset=max(offset - limit, 0))
        # Only an authenticated call with a good answer updates the backend's state.
        if backend is not None and not self._update_backend_state():
            return None
        self._json(200, {"count": len(active), "next": nxt, "previous": prev, "results": page})

    def _update_backend_state(self) -> bool:
        """The website's update_backend_state: a non-empty `Flags` header becomes the backend's
        `jobrunner_state` (what its status pages read). A header that is not JSON makes the
        website fail with its HTML error page (False: that page was sent), after whatever the
        call had already saved."""
        fake = self.server.fake
        flags = self.headers.get("Flags", "")
        if not flags:
            return True
        try:
            state = json.loads(flags)
        except ValueError:
            fake.bad_flags.append(flags)
            self._send(500, b"<h1>Server Error (500)</h1>", "text/html")
            return False
        with fake.lock:
            fake.jobrunner_state = state
        return True

    def _post_jobs(self, path: str, body: bytes) -> None:
        fake = self.server.fake
        token = self.headers.get("Authorization")
        if token is None:
            return self._json(403, {"detail": "Authorization header is missing"})
        if token == "":
            return self._json(403, {"detail": "Authorization header is empty"})
        if token != fake.token:
            return self._json(403, {"detail": "Invalid token"})
        try:
            data = json.loads(body)
        except ValueError as exc:
            fake.posts.append(body.decode(errors="replace"))
            return self._json(400, {"detail": f"JSON parse error - {exc}"})
        fake.posts.append(data)
        if not isinstance(data, list):
            name = type(data).__name__
            return self._json(
                400, {"non_field_errors": [f'Expected a list of items but got type "{name}".']}
            )
        errors = [validate_job(item) for item in data]
        if any(errors):
            return self._json(400, errors)
        with fake.lock:
            unknown = list(dict.fromkeys(j["job_request_id"] for j in data))
            unknown = [i for i in unknown if i not in fake.requests]
            if unknown and fake.strict_unknown_requests:
                return self._json(400, [f"Unknown JobRequest IDs: {', '.join(unknown)}"])
            fake._store(data)
            fake.last_seen[path] = time.time()
        if not self._update_backend_state():  # after the jobs are saved, as the website does
            return None
        self._json(200, {"status": "success"})

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into a TCP RST: the client sees a reset, not a clean EOF.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def _positive_int(value: str | None, default: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return number if number > 0 else default


def _with_params(base: str, params: dict[str, str], **paging: int) -> str:
    merged = {**params, **{k: str(v) for k, v in paging.items()}}
    if merged.get("offset") == "0":
        del merged["offset"]  # as DRF writes the first page's link
    return f"{base}?{urlencode(merged)}"


class FakeJobServer:
    """In-process stand-in for the jobs website API v2, served over real HTTP on loopback."""

    def __init__(
        self,
        token: str = "secret-token",
        backend: str = "expectations",
        page_size: int = 100,
        *,
        strict_unknown_requests: bool = False,
    ) -> None:
        self.token = token
        self.backend = backend
        self.page_size = page_size
        # True: answer 400 "Unknown JobRequest IDs" like the 2021 server; False: ignore, like today.
        self.strict_unknown_requests = strict_unknown_requests
        self.lock = threading.RLock()
        self.requests: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.history: dict[str, list[tuple[float, dict]]] = defaultdict(list)
        self.posts: list[Any] = []
        self.calls: list[dict] = []
        self.deleted: list[str] = []
        self.last_seen: dict[str, float] = {}
        # The backend's `jobrunner_state` as the website stores it from the `Flags` header
        # (None: never sent), and the headers it could not parse.
        self.jobrunner_state: Any = None
        self.bad_flags: list[str] = []
        self.fault: str | None = None
        self.fault_count: int | None = None
        self.slow_seconds = 5.0
        self.garbage_body = b"<html><body>Service temporarily rerouted</body></html>"
        self._order: dict[str, int] = {}
        self._counter = itertools.count()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeJobServer:
        """Listen on a free loopback port and serve in a background thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-jobserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; slow replies still sleeping are woken so this returns at once."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeJobServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        if self._server is None:
            raise RuntimeError("FakeJobServer is not started")
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        """The API base, as JOB_SERVER_ENDPOINT would be set (ends in /api/v2/)."""
        return f"http://{self.address}{API_PREFIX}"

    # ------------------------------------------------------------ state

    def add_request(self, shape: str | None = None, **overrides: Any) -> dict:
        """Add a job request (docs/reference.md#fetching-requests) and return the stored dict; edit it to make it odd.

        shape: None for today's shape plus workspace.db (both db fields), "window" (workspace.db only,
        no later fields) or "today" (top-level database_name, no workspace.db).
        A `workspace` override is merged into the default workspace when both are dicts.
        """
        order = next(self._counter)
        created_at = iso_now(order)
        workspace = {
            "name": "test-workspace",
            "repo": "https://github.com/opensafely/test-study",
            "branch": "main",
            "db": "full",
            "created_by": "alice",
            "created_at": "2021-06-01T12:00:00Z",
        }
        request: dict[str, Any] = {
            "identifier": new_request_id(),
            "sha": os.urandom(20).hex(),
            "requested_actions": ["run_all"],
            "cancelled_actions": [],
            "force_run_dependencies": False,
            "backend": self.backend,
            "created_by": "alice",
            "created_at": created_at,
            "workspace": workspace,
            "database_name": "full",
            "project": "test-study",
            "orgs": ["test-org"],
            "codelists_ok": True,
        }
        if shape == "window":
            for key in ("database_name", "project", "orgs", "codelists_ok"):
                del request[key]
        elif shape == "today":
            del workspace["db"]
        elif shape is not None:
            raise ValueError(f"unknown shape {shape!r}")
        if isinstance(overrides.get("workspace"), dict):
            overrides["workspace"] = {**workspace, **overrides["workspace"]}
        request.update(overrides)
        with self.lock:
            self.requests[str(request["identifier"])] = request
            self._order[str(request["identifier"])] = order
        return request

    def cancel(self, request_id: str, actions: list[str] | None = None) -> None:
        """Add actions (default: all requested ones, as the website does) to cancelled_actions."""
        with self.lock:
            request = self.requests[request_id]
            wanted = request["requested_actions"] if actions is None else actions
            request["cancelled_actions"] = list(
                dict.fromkeys([*request["cancelled_actions"], *wanted])
            )

    def is_active(self, request_id: str) -> bool:
        """Active as the server sees it: no jobs yet, or some job with completed_at null."""
        with self.lock:
            jobs = [j for j in self.jobs.values() if j["job_request_id"] == request_id]
        return not jobs or any(j["completed_at"] is None for j in jobs)

    def jobs_for(self, request_id: str) -> dict[str, dict]:
        """The stored jobs of one request, by identifier."""
        with self.lock:
            return {k: j for k, j in self.jobs.items() if j["job_request_id"] == request_id}

    def set_fault(self, fault: str | None, count: int | None = None) -> None:
        """Make the next `count` requests (None: all) fail with `fault`."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        with self.lock:
            self.fault, self.fault_count = fault, count

    def _take_fault(self) -> str | None:
        with self.lock:
            fault = self.fault
            if fault is None or self.fault_count is None:
                return fault
            if self.fault_count <= 0:
                self.fault = None
                return None
            self.fault_count -= 1
            if self.fault_count == 0:
                self.fault = None
            return fault

    def _store(self, data: list[dict]) -> None:
        # The website's rule (docs/reference.md#posting-job-states), including its flaw: each *consecutive run* of a request replaces
        # that request's job set, so a request split across the payload loses its earlier jobs.
        received = time.monotonic()
        for request_id, run in itertools.groupby(data, key=lambda j: j["job_request_id"]):
            if request_id not in self.requests:
                continue
            group = list(run)
            keep = {j["identifier"] for j in group}
            for identifier in list(self.jobs_for(request_id)):
                if identifier not in keep:
                    del self.jobs[identifier]
                    self.deleted.append(identifier)
            for job in group:
                self.jobs[job["identifier"]] = dict(job)
                self.history[job["identifier"]].append((received, dict(job)))
