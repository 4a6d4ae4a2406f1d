"""The jobs website's answers as the deployed one gives them (issue 17): a drip-fed answer cannot
hold a call past its time limit, and a wrong endpoint is a configuration error, not "retry later".

A drip-fed answer (17.6):

Socket timeouts bound each wait, so a server sending one byte every half second never trips
them; the client's deadline must hold over the whole call: connect, headers and body. The
server here is a real socket on loopback that does exactly that (headers or body), and stops
by itself.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from jobrunner_lib.website.client import JobServerClient, JobServerUnavailable
from tests.support.cli import run

BODY = b'{"results": [], "next": null}'


class DripServer:
    """Accepts connections and answers one byte at a time, `interval` apart, for `lifetime`."""

    def __init__(self, part: str, interval: float = 0.3, lifetime: float = 20.0):
        self.part, self.interval, self.lifetime = part, interval, lifetime
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.answered = threading.Event()  # set once a whole answer has been sent
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def answer(self) -> tuple[bytes, bytes]:
        """(what is sent at once, what is dripped)."""
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        )
        return (b"", head + BODY) if self.part == "headers" else (head, BODY * 1000)

    def serve(self) -> None:
        end = time.monotonic() + self.lifetime
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.drip, args=(conn, end), daemon=True).start()

    def drip(self, conn: socket.socket, end: float) -> None:
        at_once, dripped = self.answer()
        try:
            conn.recv(65536)
            conn.sendall(at_once)
            for byte in dripped:
                if self.stop.is_set() or time.monotonic() > end:
                    break
                conn.sendall(bytes([byte]))
                time.sleep(self.interval)
            else:
                self.answered.set()
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture(params=["headers", "body"])
def drip(request) -> Iterator[DripServer]:
    server = DripServer(request.param)
    server.thread.start()
    yield server
    server.stop.set()
    server.thread.join(timeout=5)
    server.sock.close()


@pytest.mark.timeout(60)
def test_a_drip_fed_answer_is_given_up_at_the_time_limit(drip):
    client = JobServerClient(
        f"http://127.0.0.1:{drip.port}/api/v2/", "secret-token", "tpp", total_limit=2.0
    )
    with pytest.raises(JobServerUnavailable, match="no complete answer within the 2s time limit"):
        client.fetch_job_requests()
    # Given up at the deadline, not when the server finished: no whole answer was ever sent (the
    # drip takes 27 s for the headers, hours for the body).
    assert not drip.answered.is_set()
    client.close()


# ---- answers that are a configuration error, not a passing fault (issue 17.7) ----------------


class Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and body of the server it belongs to."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        status, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[Callable[[int, bytes], str]]:
    """A plain-HTTP server on loopback; set its answer, get its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.answer = (200, b"{}")  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answer(status: int, body: bytes) -> str:
        server.answer = (status, body)  # type: ignore[attr-defined]
        return f"127.0.0.1:{server.server_address[1]}"

    yield answer
    server.shutdown()
    server.server_close()


def jr_sync(tmp_path, endpoint: str):
    return run(
        "jr-sync",
        workdir=tmp_path / "workdir",
        BACKEND="tpp",
        USING_DUMMY_DATA_BACKEND="true",
        JOB_SERVER_ENDPOINT=endpoint,
        JOB_SERVER_TOKEN="a-real-looking-token",
        SYNC_TIME_LIMIT="10",
    )


def test_an_endpoint_answering_404_html_is_a_configuration_error(tmp_path, answering):
    host = answering(404, b"<html><body><h1>Not Found</h1></body></html>")
    result = jr_sync(tmp_path, f"http://{host}/wrong/")
    assert result.returncode == 78, result.stderr
    assert "not found (404)" in result.stderr and "check JOB_SERVER_ENDPOINT" in result.stderr


def test_tls_against_a_plain_http_server_is_a_configuration_error(tmp_path, answering):
    host = answering(200, b'{"results": [], "next": null}')
    result = jr_sync(tmp_path, f"https://{host}/api/v2/")
    assert result.returncode == 78, result.stderr
    assert "TLS failed" in result.stderr and "check JOB_SERVER_ENDPOINT" in result.stderr


def test_a_5xx_answer_says_the_website_is_erroring_and_is_temporary(tmp_path, answering):
    host = answering(502, b"<html>Bad Gateway</html>")
    result = jr_sync(tmp_path, f"http://{host}/api/v2/")
    assert result.returncode == 75, result.stderr
    assert "the jobs website is erroring: it answered 502" in result.stderr
    assert "unreachable" not in result.stderr
