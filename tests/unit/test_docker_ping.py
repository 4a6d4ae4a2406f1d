"""docker.ping_socket: the SDK-free ping of a local daemon socket, against a fake daemon."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from jobrunner_lib.docker import engine as docker

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")


def fake_daemon(path: Path, answer: bytes) -> threading.Thread:
    """A one-connection server on a Unix socket that reads a request and sends `answer`."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                request = conn.recv(1024)
                assert request.startswith(b"GET /_ping HTTP/1.0\r\n")
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_daemon_answering_200_is_up(tmp_path, monkeypatch):
    sock = tmp_path / "d.sock"
    served = fake_daemon(sock, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    assert docker.ping_socket() is True
    served.join(5)


def test_a_daemon_answering_an_error_is_unavailable_with_its_answer(tmp_path, monkeypatch):
    sock = tmp_path / "d.sock"
    fake_daemon(sock, b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    with pytest.raises(docker.DockerUnavailable, match="500 Internal Server Error"):
        docker.ping_socket()


def test_no_socket_is_unavailable_naming_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'missing.sock'}")
    with pytest.raises(docker.DockerUnavailable, match="No such file or directory"):
        docker.ping_socket()


def test_other_hosts_are_left_to_the_sdk(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert docker.ping_socket() is False
