"""Logging in the house format: `2021-07-21 18:54:58.792Z run  message tags` on stderr.

Lines about a job carry `status= project= action= id= req=` tags (docs/reference.md#log-lines) when the call
passes `extra={"job": job}`, so an operator can search four ID characters with `less`.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import time
from pathlib import Path
from typing import Any

_COMPONENT = "jr"
# Secrets that must never reach a log line, registered at start-up by whoever reads them.
_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this value (a token, a database URL) wherever it would appear in a log line."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def mask(text: str) -> str:
    """Replace every registered secret in text by `********`."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "********")
    return text


def tag_value(value: Any) -> str:
    """value as one word: whitespace, control and other unprintable characters and `\\` escaped.

    Tag values come from project.yaml, the jobs website and old state stores; unescaped, a
    newline would start a forged log line and a space (`x id=forged`) a forged tag.
    """
    text = str(value)
    if text.isprintable() and " " not in text and "\\" not in text:
        return text  # isprintable() is False for every other whitespace character
    return "".join(_escape(c) for c in text)


def _escape(char: str) -> str:
    if char == " ":
        return "\\x20"
    if char == "\\" or not char.isprintable():
        return ascii(char)[1:-1]  # `\n`, `\x85`, `\u2028`, `\\`
    return char


def job_tags(job: Any) -> str:
    """`status=… project=… action=… id=… req=…` for a job-like object, each only when known."""
    tags = []
    code = getattr(job, "status_code", None)
    if code:
        tags.append(f"status={tag_value(getattr(code, 'value', code))}")
    for key, attr in (
        ("project", "project"),
        ("action", "action"),
        ("id", "id"),
        ("req", "job_request_id"),
    ):
        value = getattr(job, attr, None)
        if value:
            tags.append(f"{key}={tag_value(value)}")
    return " ".join(tags)


class JrFormatter(logging.Formatter):
    """UTC time with milliseconds and `Z`, the component padded to 4, the message, then job tags."""

    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        job = getattr(record, "job", None)
        if job is not None:
            message = f"{message} {job_tags(job)}"
        elif record.__dict__.get("req"):
            message = f"{message} req={tag_value(record.__dict__['req'])}"
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        component = getattr(record, "component", None) or self.component
        return mask(f"{stamp}.{int(record.msecs):03d}Z {component:<4} {message}")


def setup(
    component: str, level: str = "INFO", *, debug_log_file: Path | None = None, stream: Any = None
) -> None:
    """Configure the root logger once for a tool: stderr at `level`, plus an optional DEBUG file."""
    global _COMPONENT
    _COMPONENT = component
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JrFormatter(component))
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    if debug_log_file is not None:
        debug_log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.TimedRotatingFileHandler(
            debug_log_file, when="midnight", utc=True, backupCount=14
        )
        rotating.setFormatter(JrFormatter(component))
        rotating.setLevel(logging.DEBUG)
        root.addHandler(rotating)
        root.setLevel(logging.DEBUG)
    for noisy in ("urllib3", "docker", "sh", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_process(component: str, config: Any) -> None:
    """setup() for a background process (a worker, the maintenance check) from its config: its
    level and debug file, and every secret it holds masked."""
    setup(component, config.loglevel, debug_log_file=config.debug_log_file)
    for secret in config.secrets:
        register_secret(secret)


def component() -> str:
    """The component name given to setup() (the tool's name, `run` or `sync`)."""
    return _COMPONENT


def squash_whitespace(text: str) -> str:
    """Runs of whitespace (newlines too) as one space, so an error fits one line. Other control
    characters stay, and nothing is cut (pipeline.rules.one_line escapes them and cuts)."""
    return re.sub(r"\s+", " ", text).strip()
