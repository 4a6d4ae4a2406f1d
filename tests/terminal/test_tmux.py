"""jr's tools on a real terminal: a private tmux server, keys sent, the screen read back.

Pickers (iterfzf) and confirmations only appear on a terminal, so these tests are the only place
they are exercised end to end. Every wait polls the screen with a timeout (no fixed sleeps);
the tmux server is killed in a finalizer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrunner_lib.core.models import State, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.store import queries as db_queries
from tests.integration.test_look_tools import Backend, ambiguous_jobs
from tests.support.cli import BIN, ROOT, tool_env
from tests.support.factories import insert_job
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (make test installs it via scripts/test-prereqs)",
)

WAIT = 30.0


class Tmux:
    """One tmux server on a private socket with one 200x50 pane running bash without rc files."""

    def __init__(self, env: dict[str, str]):
        self.socket = f"jrtest-{uuid.uuid4().hex[:12]}"
        self.env = {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "TERM": "xterm-256color"}
        self.markers = 0
        self.cmd(
            "new-session", "-d", "-s", "jr", "-x", "200", "-y", "50", "bash --norc --noprofile"
        )
        self.socket_path = Path(self.cmd("display-message", "-p", "#{socket_path}").strip())
        self.run("PS1='$ '")

    def cmd(self, *args: str) -> str:
        """A tmux command against this server; its stdout."""
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def keys(self, *keys: str) -> None:
        """Press keys (tmux key names such as Enter, Tab, C-c)."""
        self.cmd("send-keys", "-t", "jr", *keys)

    def type(self, text: str) -> None:
        """Type text literally."""
        self.cmd("send-keys", "-t", "jr", "-l", text)

    def screen(self) -> str:
        """What the pane shows now."""
        return self.cmd("capture-pane", "-p", "-t", "jr")

    def wait_for(
        self, check: str | Callable[[str], bool], what: str = "", timeout: float = WAIT
    ) -> str:
        """Poll the screen until it contains the text (or check(screen) holds); return the screen."""
        test = (lambda s: check in s) if isinstance(check, str) else check
        screen = ""

        def shows() -> bool:
            nonlocal screen
            screen = self.screen()
            return test(screen)

        wait_for(shows, timeout, what or repr(check), 0.1, lambda: f"the screen shows:\n{screen}")
        return screen

    def run(self, command: str) -> str:
        """Type a command and Enter; it will print `END<n>:<exit code>` when done. Returns the marker."""
        self.markers += 1
        marker = f"END{self.markers}:"
        self.type(f'{command}; echo "{marker}$?"')
        self.keys("Enter")
        return marker

    def exit_code(self, marker: str, timeout: float = WAIT) -> int:
        """Wait for a command's end marker; its exit code."""
        pattern = re.compile(rf"^{marker}(\d+)\s*$", re.MULTILINE)
        screen = self.wait_for(lambda s: bool(pattern.search(s)), marker, timeout)
        match = pattern.search(screen)
        assert match is not None
        return int(match.group(1))

    def output(self, marker: str) -> list[str]:
        """The lines a finished command printed (between its command line and its end marker)."""
        lines = self.screen().splitlines()
        start = next(i for i, line in enumerate(lines) if f'echo "{marker}$?"' in line)
        end = next(i for i, line in enumerate(lines) if re.match(rf"^{marker}\d+\s*$", line))
        return lines[start + 1 : end]

    def kill(self) -> None:
        """Stop the server and everything in it, and remove its socket (tmux leaves it)."""
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"],
            env=self.env,
            capture_output=True,
            timeout=30,
        )
        self.socket_path.unlink(missing_ok=True)


@pytest.fixture
def terminal(store) -> Iterator[Tmux]:
    """A terminal whose tools use the private workdir."""
    workdir, _ = store
    tmux = Tmux(tool_env(workdir))
    try:
        yield tmux
    finally:
        tmux.kill()


def pick_in_fzf(tmux: Tmux, wanted: str, other: str) -> None:
    """Wait for the picker to list both jobs, type part of the wanted id, choose it."""
    tmux.wait_for(lambda s: wanted in s and other in s, "the picker listing both jobs")
    tmux.type(wanted[-6:])
    tmux.wait_for(lambda s: wanted in s and other not in s, "the picker narrowed to the wanted job")
    tmux.keys("Enter")


def test_ls_pick_chooses_between_ambiguous_jobs_with_the_picker(store, terminal):
    _, conn = store
    fragment, (other, wanted) = ambiguous_jobs(conn)
    marker = terminal.run(f"jr-ls {fragment} --pick -o ids")
    pick_in_fzf(terminal, wanted.id, other.id)
    assert terminal.exit_code(marker) == 0
    assert terminal.output(marker) == [wanted.id]


def test_kill_of_an_ambiguous_fragment_picks_then_confirms_on_the_terminal(store, terminal):
    _, conn = store
    fragment, (other, wanted) = ambiguous_jobs(conn)
    marker = terminal.run(f"jr-kill {fragment}")
    pick_in_fzf(terminal, wanted.id, other.id)
    terminal.wait_for("[y/N]", "the confirmation question")
    terminal.type("y")
    terminal.keys("Enter")
    assert terminal.exit_code(marker) == 0
    killed, untouched = db_queries.get_job(conn, wanted.id), db_queries.get_job(conn, other.id)
    assert killed is not None and untouched is not None
    assert (killed.state, killed.status_code) == (State.FAILED, StatusCode.KILLED_BY_ADMIN)
    assert untouched.state is State.RUNNING


def test_tab_completes_a_job_id_from_three_characters(store, terminal):
    _, conn = store
    job = insert_job(conn, State.SUCCEEDED, StatusCode.SUCCEEDED, "Completed successfully")
    assert terminal.exit_code(terminal.run(f"source {ROOT / 'completions' / 'jr.bash'}")) == 0
    terminal.type(f"jr-ls {job.id[5:8]}")
    terminal.keys("Tab")
    completed = re.compile(rf"^\$ jr-ls {job.id}\s*$", re.MULTILINE)
    terminal.wait_for(lambda s: bool(completed.search(s)), "the completed id on the command line")


@pytest.fixture
def running(tmp_path) -> Iterator[Backend]:
    """A scratch backend on real Docker with two running jobs that print lines."""
    try:
        docker.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Docker here"
        pytest.skip(f"Docker not available: {exc}")
    backend = Backend(tmp_path / "scratch")
    try:
        backend.ids = backend.start("sleeper", "ticker")
        yield backend
    finally:
        backend.close()


@pytest.mark.docker
def test_watch_logs_without_an_id_picks_a_running_job_and_follows_it_until_ctrl_c(running):
    sleeper, ticker = running.ids
    tmux = Tmux(running.tool_env())
    try:
        marker = tmux.run("jr-watch-logs")
        pick_in_fzf(tmux, ticker, sleeper)
        tmux.wait_for(
            lambda s: len(re.findall(r"^tick \d+$", s, re.MULTILINE)) >= 3, "the ticker's lines"
        )
        tmux.keys("C-c")
        assert tmux.exit_code(marker) == 130
        assert "sleeper started" not in tmux.screen()
    finally:
        tmux.kill()
