"""service/jr-service: the bash loop around jr-sync and jr-run-once, run as NSSM/systemd would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import ROOT, tool_env
from tests.support.waiting import wait_for

SERVICE = ROOT / "service" / "jr-service"

pytestmark = pytest.mark.skipif(os.name == "nt", reason="signals are sent the POSIX way here")


class Service:
    """A running jr-service in its own process group, stderr captured in a file."""

    def __init__(self, tmp_path: Path, *args: str, **env: str):
        self.workdir = tmp_path / "workdir"
        self.err_path = tmp_path / "service.err.log"
        self.err = open(self.err_path, "w")
        # Its own process group, like the foreground job a terminal sends Ctrl-C to.
        self.proc = subprocess.Popen(
            ["bash", str(SERVICE), *args],
            env=tool_env(self.workdir, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            start_new_session=True,
            cwd=str(tmp_path),
        )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.err.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.err.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(*args: str, **env: str) -> Service:
        started.append(Service(tmp_path, *args, **env))
        return started[-1]

    yield start
    for svc in started:
        svc.stop()


FAKE_RUN_ONCE = """
import os, signal, sys, time
from pathlib import Path
fake = Path(os.environ["FAKE_DIR"])
calls = fake / "run-once.calls"
n = int(calls.read_text()) + 1 if calls.exists() else 1
calls.write_text(str(n))
codes = os.environ.get("FAKE_RUN_CODES", "0").split(",")
if os.environ.get("FAKE_RUN_BLOCK"):
    sigint = signal.getsignal(signal.SIGINT)
    (fake / "started").write_text(str(sigint))
    while not (fake / "go").exists():
        time.sleep(0.02)
    (fake / "finished").write_text("yes")
if os.environ.get("FAKE_RUN_PRINT") and n == 1:
    print("somejobid")
sys.exit(int(codes[min(n, len(codes)) - 1]))
"""

FAKE_SYNC = """
import os, sys
from pathlib import Path
if "--help" in sys.argv:
    print("usage: jr-sync [-o FORMAT] [--output FORMAT]")
    sys.exit(0)
calls = Path(os.environ["FAKE_DIR"]) / "sync.calls"
n = int(calls.read_text()) + 1 if calls.exists() else 1
calls.write_text(str(n))
if os.environ.get("FAKE_SYNC_PRINT") and n == 1:
    print("newjobid")
sys.exit(int(os.environ.get("FAKE_SYNC_CODE", "0")))
"""

FAKE_LS = """
import os
from pathlib import Path
calls = Path(os.environ["FAKE_DIR"]) / "run-once.calls"
n = int(calls.read_text()) if calls.exists() else 0
if n < int(os.environ.get("FAKE_BUSY_UNTIL", "0")):
    print("somejobid")
"""


def fake_bin(tmp_path: Path) -> dict[str, str]:
    """Stand-in tools (run by the service with its python), and the env that selects them."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("jr-run-once", FAKE_RUN_ONCE), ("jr-sync", FAKE_SYNC), ("jr-ls", FAKE_LS)):
        (bin_dir / name).write_text(text)
    return {
        "JR_SERVICE_BIN": str(bin_dir),
        "FAKE_DIR": str(tmp_path),
        "JOB_SERVER_ENDPOINT": "http://127.0.0.1:9/api/v2/",
        "JOB_SERVER_TOKEN": "a-real-looking-token",  # valid settings: the service starts
    }


# ---- with the real tools ----------------------------------------------------------------------


@pytest.mark.docker
def test_once_on_an_empty_workdir_exits_0(service: Callable[..., Service]) -> None:
    svc = service("--once")
    assert svc.wait() == 0, svc.stderr
    assert " serv jr-service started (mode once, POLL_INTERVAL 5s, " in svc.stderr
    assert svc.proc.stdout is not None and svc.proc.stdout.read() == ""


@pytest.mark.docker
def test_until_idle_on_an_empty_workdir_exits_0(service: Callable[..., Service]) -> None:
    svc = service("--until-idle")
    assert svc.wait() == 0, svc.stderr
    assert " serv no job is pending or running: done\n" in svc.stderr


def test_help_and_bad_arguments(tmp_path: Path) -> None:
    shown = subprocess.run(
        ["bash", str(SERVICE), "--help"], capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0 and shown.stdout.startswith("usage: jr-service")
    bad = subprocess.run(
        ["bash", str(SERVICE), "--bogus"], capture_output=True, text=True, timeout=30
    )
    assert (bad.returncode, bad.stderr) == (
        2,
        "jr-service: unknown argument --bogus (see --help)\n",
    )


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group"])
def test_signal_while_sleeping_exits_0_promptly(
    service: Callable[..., Service], tmp_path: Path, how: str
) -> None:
    svc = service(POLL_INTERVAL="300", LOGLEVEL="DEBUG", **fake_bin(tmp_path))
    wait_for(lambda: " serv sleeping up to 29" in svc.stderr, 20, "the service to sleep")
    # The operator tools find the running service through its pid file.
    assert (svc.workdir / "service.pid").read_text() == f"{svc.proc.pid}\n"
    if how == "SIGTERM":
        svc.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(svc.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert svc.wait(timeout=10) == 0
    assert not (svc.workdir / "service.pid").exists()
    name = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    assert f" serv {name} received: stopping after the current step\n" in svc.stderr
    assert svc.stderr.endswith(" serv jr-service stopped\n")


# ---- the loop's logic, with stand-in tools ----------------------------------------------------


def test_ctrl_c_during_a_pass_lets_the_pass_finish(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service(POLL_INTERVAL="300", FAKE_RUN_BLOCK="1", **fake_bin(tmp_path))
    wait_for(lambda: (tmp_path / "started").exists(), 20, "the pass to start")
    os.killpg(svc.proc.pid, signal.SIGINT)
    wait_for(lambda: "SIGINT received" in svc.stderr, 20, "the service to see the SIGINT")
    assert svc.proc.poll() is None  # still waiting for the pass
    (tmp_path / "go").write_text("")
    assert svc.wait(timeout=10) == 0
    assert (tmp_path / "finished").exists()
    # The pass ran with SIGINT ignored (Handlers.SIG_IGN) and is not run again after the stop.
    assert (tmp_path / "started").read_text() == str(signal.SIG_IGN)
    assert (tmp_path / "run-once.calls").read_text() == "1"
    assert "failed" not in svc.stderr


def test_failures_never_stop_the_loop(service: Callable[..., Service], tmp_path: Path) -> None:
    svc = service(
        "--until-idle",
        POLL_INTERVAL="0.05",
        FAKE_RUN_CODES="1,75,0",
        FAKE_BUSY_UNTIL="3",
        **fake_bin(tmp_path),
    )
    assert svc.wait() == 0, svc.stderr
    assert " serv jr-run-once failed (exit 1): next try in 0.25s\n" in svc.stderr
    assert " serv jr-run-once could not run now (exit 75): next try in 0.05s\n" in svc.stderr
    assert (tmp_path / "run-once.calls").read_text() == "3"


def test_sync_failure_does_not_hold_up_job_passes_but_until_idle_says_so_at_the_end(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service(
        "--until-idle",
        POLL_INTERVAL="0.05",
        FAKE_SYNC_CODE="75",
        FAKE_BUSY_UNTIL="3",
        **fake_bin(tmp_path),
    )
    # The jobs ran, but the website could not hear their final states: not a clean exit.
    assert svc.wait() == 75, svc.stderr
    assert " serv jr-sync failed (exit 75): next sync in 0.25s; job passes go on\n" in svc.stderr
    assert "but the last jr-sync failed (exit 75)" in svc.stderr
    assert (tmp_path / "run-once.calls").read_text() == "3"


@pytest.mark.parametrize("tool", ["jr-sync", "jr-run-once"])
def test_a_configuration_error_stops_the_service_with_78(
    service: Callable[..., Service], tmp_path: Path, tool: str
) -> None:
    code = {"FAKE_SYNC_CODE": "78"} if tool == "jr-sync" else {"FAKE_RUN_CODES": "78"}
    svc = service(POLL_INTERVAL="0.05", **code, **fake_bin(tmp_path))
    assert svc.wait(timeout=30) == 78, svc.stderr
    assert f" serv configuration error ({tool} exit 78; see the line above)" in svc.stderr


def test_invalid_settings_at_start_stop_the_service_with_78(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service(POLL_INTERVAL="0.05", MAX_WORKERS="lots", **fake_bin(tmp_path))
    assert svc.wait(timeout=30) == 78, svc.stderr
    assert " serv configuration error: MAX_WORKERS='lots' is not a number" in svc.stderr
    assert not (tmp_path / "run-once.calls").exists()


FAKE_SLOW_SYNC = """
import os, sys, time
from pathlib import Path
if "--help" in sys.argv:
    print("usage: jr-sync [-o FORMAT] [--output FORMAT]")
    sys.exit(0)
fake = Path(os.environ["FAKE_DIR"])
calls = fake / "sync.calls"
calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
while not (fake / "website-back").exists():  # a stalled website
    time.sleep(0.05)
"""


def test_a_stalled_website_never_holds_up_job_passes(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    env = fake_bin(tmp_path)
    (Path(env["JR_SERVICE_BIN"]) / "jr-sync").write_text(FAKE_SLOW_SYNC)
    svc = service(POLL_INTERVAL="0.1", **env)
    try:
        # Passes go on (many of them) while the one jr-sync is stuck on the website.
        wait_for(
            lambda: (
                int((tmp_path / "run-once.calls").read_text() or 0) >= 5
                if (tmp_path / "run-once.calls").exists()
                else False
            ),
            30,
            "job passes while jr-sync is stuck",
        )
        assert (tmp_path / "sync.calls").read_text() == "1"  # never two at once
        (tmp_path / "website-back").write_text("yes")
        wait_for(lambda: (tmp_path / "sync.calls").read_text() != "1", 30, "the next jr-sync")
    finally:
        (tmp_path / "website-back").write_text("yes")
        svc.stop()


def test_sync_output_counts_as_a_change(service: Callable[..., Service], tmp_path: Path) -> None:
    svc = service(
        "--until-idle",
        POLL_INTERVAL="300",
        LOGLEVEL="DEBUG",
        FAKE_SYNC_PRINT="1",
        FAKE_BUSY_UNTIL="2",
        **fake_bin(tmp_path),
    )
    assert svc.wait() == 0, svc.stderr
    # Two passes, then one last sync so the website hears the final states before exiting.
    assert (tmp_path / "sync.calls").read_text() == "3"
    assert "sleeping" not in svc.stderr


def test_without_a_jobs_website_sync_is_not_run(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service("--once", **{**fake_bin(tmp_path), "JOB_SERVER_ENDPOINT": ""})
    assert svc.wait() == 0
    assert " serv no JOB_SERVER_ENDPOINT: embedded mode" in svc.stderr
    assert not (tmp_path / "sync.calls").exists()
    assert (tmp_path / "run-once.calls").read_text() == "1"


def test_once_returns_the_pass_exit_code(service: Callable[..., Service], tmp_path: Path) -> None:
    svc = service("--once", FAKE_RUN_CODES="75", **fake_bin(tmp_path))
    assert svc.wait() == 75


def test_poll_interval_comes_from_the_env_file(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    env_file = tmp_path / "jr.env"
    env_file.write_text(
        'BACKEND=test\r\nUSING_DUMMY_DATA_BACKEND=yes\r\nPOLL_INTERVAL="0.5"  # seconds\r\n'
    )
    svc = service("--once", JR_ENV_FILE=str(env_file), **fake_bin(tmp_path))
    assert svc.wait() == 0
    assert "(mode once, POLL_INTERVAL 0.5s, " in svc.stderr


def test_changes_skip_the_sleep(service: Callable[..., Service], tmp_path: Path) -> None:
    # The first pass reports a change; the second pass must follow without the 300 s sleep.
    svc = service(
        "--until-idle",
        POLL_INTERVAL="300",
        LOGLEVEL="DEBUG",
        FAKE_RUN_PRINT="1",
        FAKE_BUSY_UNTIL="2",
        **fake_bin(tmp_path),
    )
    assert svc.wait() == 0, svc.stderr
    assert (tmp_path / "run-once.calls").read_text() == "2"
    assert "sleeping" not in svc.stderr


def test_log_lines_use_the_house_format(service: Callable[..., Service], tmp_path: Path) -> None:
    svc = service("--once", **fake_bin(tmp_path))
    assert svc.wait() == 0
    first = svc.stderr.splitlines()[0]
    stamp, component = first[:24], first[24:30]
    assert time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S") and stamp[19] == "." and stamp[23] == "Z"
    assert stamp[20:23].isdigit() and component == " serv "
