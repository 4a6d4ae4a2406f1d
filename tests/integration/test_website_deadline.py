"""A jobs website that drip-feeds its answer cannot hold a call past its time limit (issue 17.6).

Socket timeouts bound each wait, so a server sending one byte every half second never trips
them; the client's deadline must hold over the whole call: connect, headers and body. The
server here is a real socket on loopback that does exactly that (headers or body), and stops
by itself.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from jobrunner_lib.website.client import JobServerClient, JobServerUnavailable

BODY = b'{"results": [], "next": null}'


class DripServer:
    """Accepts connections and answers one byte at a time, `interval` apart, for `lifetime`."""

    def __init__(self, part: str, interval: float = 0.3, lifetime: float = 20.0):
        self.part, self.interval, self.lifetime = part, interval, lifetime
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
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
    started = time.monotonic()
    with pytest.raises(JobServerUnavailable, match="no complete answer within the 2s time limit"):
        client.fetch_job_requests()
    elapsed = time.monotonic() - started
    # The limit plus the grace, not the minutes the drip would take (read timeout is 30 s).
    assert elapsed < 10, elapsed  # the drip alone would take 27 s (headers) or hours (body)
    client.close()
