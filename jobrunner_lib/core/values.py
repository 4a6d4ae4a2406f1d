"""The syntax of setting values, and where they come from: the environment and `.env`.

Sizes (`16G`, `512M`), log limits (a size or `N lines`), yes/no, finite numbers, paths (git-bash
or Windows form); every bad value a ConfigError naming the variable and an example. config.py
reads each setting through Reader.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from jobrunner_lib.core.errors import ConfigError

# The checkout: where `.env`, `job-resource-weights.ini` and the default workdir live.
CHECKOUT_DIR = Path(__file__).resolve().parents[2]  # jobrunner_lib/core/values.py

TRUTHY = {"true", "1", "yes", "on"}
FALSY = {"false", "0", "no", "off", ""}


# Sizes as JOB_MEMORY_LIMIT takes them (`16G`, `512m`, `20MB`, `1.5GiB`, plain bytes): binary units.
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?")
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
LINES_RE = re.compile(r"(\d+)\s*lines?")


@dataclass(frozen=True)
class LogLimit:
    """How much of a job's log to keep (JOB_LOG_LIMIT): its last `count` bytes, or lines."""

    count: int
    lines: bool = False

    def __str__(self) -> str:
        """The setting as it would be written: `32M`, `1536K`, `1000`, `100000 lines`."""
        if self.lines:
            return f"{self.count} line{'' if self.count == 1 else 's'}"
        for unit in ("T", "G", "M", "K"):
            scale = SIZE_UNITS[unit.lower()]
            if self.count >= scale and self.count % scale == 0:
                return f"{self.count // scale}{unit}"
        return str(self.count)


DEFAULT_JOB_LOG_LIMIT = LogLimit(32 * 2**20)
MIN_JOB_LOG_SIZE = 2**10


def parse_size(text: str) -> int | None:
    """Bytes from `16G`, `512m`, `20MB`, `1.5GiB` or `1024`; None if it is not a size."""
    m = SIZE_RE.fullmatch(text.strip().lower())
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)]) if m else None


def parse_log_limit(text: str) -> LogLimit | None:
    """A LogLimit from a size (`32M`) or a line count (`100000 lines`); None if it is neither."""
    m = LINES_RE.fullmatch(text.strip().lower())
    if m:
        return LogLimit(int(m.group(1)), lines=True)
    size = parse_size(text)
    return None if size is None else LogLimit(size)


def to_windows_path(value: str) -> str:
    """Rewrite a git-bash path (`/e/x/y`) or a mixed one (`e:/x`) into Windows form (`E:\\x\\y`)."""
    value = value.strip()
    m = re.match(r"^/([A-Za-z])(?:/(.*))?$", value)
    if m:
        value = f"{m.group(1).upper()}:/{m.group(2) or ''}"
    elif re.match(r"^[A-Za-z]:", value):
        value = value[0].upper() + value[1:]
    value = value.replace("/", "\\")
    return re.sub(r"\\{2,}", lambda _: "\\", value) if not value.startswith("\\\\") else value


def normalise_path(value: str, *, base: Path | None = None) -> Path:
    """Turn a configured path into an absolute Path (git-bash and Windows forms accepted on Windows)."""
    value = value.strip()
    if os.name == "nt":
        value = to_windows_path(value)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def read_env(
    env_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Merge `.env` (if any) under the real environment, which wins."""
    merged: dict[str, str] = {}
    environ = os.environ if environ is None else environ
    if env_file is None:
        explicit = environ.get("JR_ENV_FILE")
        env_file = Path(explicit) if explicit else CHECKOUT_DIR / ".env"
    if env_file.is_file():
        from dotenv import dotenv_values  # lazily: python-dotenv is only needed when a file exists

        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(environ)
    return merged


class Reader:
    """Typed access to raw settings, turning every bad value into a ConfigError."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    @overload
    def text(self, name: str) -> str | None: ...

    @overload
    def text(self, name: str, default: str) -> str: ...

    @overload
    def text(self, name: str, default: str | None) -> str | None: ...

    def text(self, name: str, default: str | None = None) -> str | None:
        """The value stripped of spaces; `default` when unset or blank."""
        value = self.env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # nan would switch a limit off, inf never time out
            raise ConfigError(
                f"{name}={raw!r} is not a number: expected e.g. {name}={default:g}"
            ) from None
        if value < minimum:
            raise ConfigError(f"{name}={raw!r} is too small: expected a number >= {minimum:g}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.env.get(name)
        if raw is None:
            return default
        low = raw.strip().lower()
        if low in TRUTHY:
            return True
        if low in FALSY:
            return False
        raise ConfigError(f"{name}={raw!r} is not a yes/no value: expected true or false")

    def path(self, name: str, default: Path, base: Path) -> Path:
        raw = self.text(name)
        return default if raw is None else normalise_path(raw, base=base)

    def size(self, name: str) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        size = parse_size(raw)
        if size is None:
            raise ConfigError(f"{name}={raw!r} is not a size: expected e.g. {name}=16G or 512M")
        return size

    def log_limit(self, name: str, default: LogLimit) -> LogLimit:
        raw = self.text(name)
        if raw is None:
            return default
        limit = parse_log_limit(raw)
        example = f"expected e.g. {name}=32M or {name}='100000 lines'"
        if limit is None:
            raise ConfigError(f"{name}={raw!r} is not a size or a line count: {example}")
        if limit.count < (1 if limit.lines else MIN_JOB_LOG_SIZE):
            least = "1 line" if limit.lines else str(LogLimit(MIN_JOB_LOG_SIZE))
            raise ConfigError(f"{name}={raw!r} is too small: expected at least {least}, {example}")
        return limit


def docker_host(env: Mapping[str, str] | None = None) -> str:
    """Where the Docker client looks for the daemon: DOCKER_HOST (from `env`, e.g. `.env`, then
    the environment), else the platform's default socket or named pipe."""
    host = (env or {}).get("DOCKER_HOST") or os.environ.get("DOCKER_HOST")
    if host:
        return host
    return "npipe:////./pipe/docker_engine" if os.name == "nt" else "unix:///var/run/docker.sock"


def user_name() -> str:
    """Who runs a tool: JR_USER, else the login name, else `unknown`."""
    user = os.environ.get("JR_USER")
    if user:
        return user
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name is not worth failing for
        return "unknown"
