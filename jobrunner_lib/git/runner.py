"""Running git: via `sh`, or plain subprocess where `sh` cannot import (Windows); git's errors.

Every call gets the same config and environment (no prompts, no credential helpers, nothing
inherited from a parent git), and mask() keeps tokens and passwords out of what is logged or
raised. Fetching commits into the study repos and reading code out of them is repos.py's.
"""

import io
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)

# Which runner executes git: None decides on first use. `sh` is slow to import and absent on
# Windows, so it is imported lazily and plain subprocess takes over when it cannot import.
_USE_SH: bool | None = None

MASK = "********"

# Config for every git call, on the command line so it beats any user or system config.
_BASE_CONFIG = (
    # Protocol v2's upload-pack serves any object it has, so a bare sha can be fetched from
    # GitHub and from local/file:// repos alike, without uploadpack.allow*SHA1InWant there.
    "protocol.version=2",
    # Run auto-gc in the foreground: inside our repo lock, inside the process we reap.
    "gc.autoDetach=false",
    # Abort a stalled transfer (under 1 byte/s for 5 min) instead of hanging forever.
    "http.lowSpeedLimit=1",
    "http.lowSpeedTime=300",
    # No stored credentials or credential-manager pop-ups: we supply our own token, or none.
    "credential.helper=",
    # An empty askpass (here and in GIT_ASKPASS) beats SSH_ASKPASS, so no dialog can pop up.
    "core.askPass=",
)
# git must never prompt: there is nobody to answer.
_BASE_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "GCM_INTERACTIVE": "never"}
# Inherited from a parent git (e.g. a hook) these would redirect commands to another repo.
_STRIP_ENV = re.compile(
    r"GIT_(DIR|WORK_TREE|INDEX_FILE|OBJECT_DIRECTORY|ALTERNATE_OBJECT_DIRECTORIES|COMMON_DIR"
    r"|NAMESPACE|PREFIX|CONFIG_PARAMETERS|CONFIG_COUNT|CONFIG_KEY_\d+|CONFIG_VALUE_\d+)"
)

_Result = subprocess.CompletedProcess


class GitError(Exception):
    """A git operation failed; the message is safe to show to users."""


class GitNetworkError(GitError):
    """The remote could not be reached after retries; try again later."""


def mask(text: str, token: str | None = None) -> str:
    """Text with the token, any Authorization header value and any URL password masked."""
    if token:
        text = text.replace(token, MASK)
    text = re.sub(r"(Authorization:\s*\w+\s+)\S+", rf"\g<1>{MASK}", text, flags=re.IGNORECASE)
    return re.sub(r"(://[^/@\s:]*:)[^/@\s]*@", rf"\g<1>{MASK}@", text)


def _backend_sh():  # -> the `sh` module, or None for subprocess
    global _USE_SH
    if _USE_SH is False:
        return None
    try:
        import sh
    except ImportError:
        if _USE_SH:
            raise
        _USE_SH = False
        return None
    _USE_SH = True
    # sh logs every command and chunk at DEBUG/INFO, which would flood the debug log.
    if logging.getLogger("sh").level == logging.NOTSET:
        logging.getLogger("sh").setLevel(logging.WARNING)
    return sh


def _git(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> _Result:
    """Run git (via `sh`, or subprocess where `sh` is missing) and capture its output."""
    argv, full_env = _command(args, env)
    sh = _backend_sh()
    if sh is None:
        return subprocess.run(argv, env=full_env, input=input, capture_output=True)
    try:
        cmd = sh.Command("git")(
            *argv[1:], _env=full_env, _in=input, _tty_out=False, _return_cmd=True,
            _ok_code=list(range(256)),
        )  # fmt: skip
    except sh.ErrorReturnCode as e:  # killed by a signal
        return _Result(argv, -1, e.stdout, e.stderr)
    return _Result(argv, cmd.exit_code, cmd.stdout, cmd.stderr)


def _git_stream(*args: str) -> IO[bytes]:
    """Run git (via `sh`, or subprocess where `sh` is missing) and return its stdout as a stream."""
    argv, env = _command(args, None)
    sh = _backend_sh()
    # git writes straight into a pipe we read from: back-pressure, no buffering in between.
    # stderr goes to a file so a chatty git can never block on it.
    read_fd, write_fd = os.pipe()
    stderr = tempfile.TemporaryFile()
    try:
        if sh is None:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=stderr
            )
            wait: Callable[[], int] = proc.wait
        else:
            cmd = sh.Command("git")(
                *argv[1:], _env=env, _out=write_fd, _err=stderr, _bg=True, _bg_exc=False,
                _ok_code=list(range(256)),
            )  # fmt: skip

            def wait() -> int:
                try:
                    return cmd.wait().exit_code
                except sh.ErrorReturnCode:  # killed by a signal
                    return -1
    except BaseException:
        os.close(read_fd)
        stderr.close()
        raise
    finally:
        os.close(write_fd)
    return io.BufferedReader(_GitStream(read_fd, wait, stderr), buffer_size=1 << 16)


def _command(args: tuple[str, ...], env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    argv = ["git"]
    for setting in _BASE_CONFIG:
        argv += ["-c", setting]
    argv += args
    full_env = {k: v for k, v in os.environ.items() if not _STRIP_ENV.fullmatch(k)}
    full_env.update(_BASE_ENV)
    full_env.update(env or {})
    log.debug("running %s", mask(" ".join(argv)))
    return argv, full_env


class _GitStream(io.RawIOBase):
    """stdout of a running git; EOF checks its exit code, close() reaps it."""

    def __init__(self, fd: int, wait: Callable[[], int], stderr: IO[bytes]):
        self._fd, self._wait, self._stderr = fd, wait, stderr
        self._reaped = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = os.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        if not data and not self._reaped:
            self._reaped = True
            if (returncode := self._wait()) != 0:
                self._stderr.seek(0)
                detail = mask(self._stderr.read().decode(errors="replace").strip())
                raise GitError(f"git exited with {returncode}: {detail}")
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        os.close(self._fd)  # so a git still writing gets EPIPE and exits: no kill needed
        if not self._reaped:
            self._reaped = True
            self._wait()
        self._stderr.close()
        super().close()
