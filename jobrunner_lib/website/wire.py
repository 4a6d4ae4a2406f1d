"""The jobs website's wire format (docs/reference.md#jobs-website), pure: parse job requests, encode jobs, batch them,
and the `Flags` header.

No HTTP here (that is client.py): a malformed request raises ValueError saying what is wrong,
so the client can report it and go on with the others.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

from jobrunner_lib.core.flags import Flag, timestamp_isoformat
from jobrunner_lib.core.models import iso

Kind = type | tuple[type, ...]


def _require(obj: Mapping[str, Any], key: str, kind: Kind, where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in obj or obj[key] is None:
        raise ValueError(f"missing '{name}'")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass, but a JSON true is never a valid identifier
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"'{name}' must be {expected}, got {type(value).__name__}")
    return value


def _optional(obj: Mapping[str, Any], key: str, kind: Kind, default: Any, where: str = "") -> Any:
    if obj.get(key) is None:
        return default
    return _require(obj, key, kind, where)


def _str_list(obj: Mapping[str, Any], key: str, *, required: bool) -> list[str]:
    if not required and obj.get(key) is None:
        return []
    values = _require(obj, key, list)
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a list of strings, found {type(value).__name__}")
    return list(values)


MAX_IDENTIFIER = 100


class MalformedRequest(ValueError):
    """A request with a usable identifier but a field jr cannot use (a workspace with no repo,
    a missing sha, ...): it gets an answer on the website, an `__error__` job saying why."""

    def __init__(self, identifier: str, problem: str):
        # The identifier stays out of the text: whoever shows it names the request (masked).
        super().__init__(problem)
        self.identifier, self.problem = identifier, problem


_BAD_IDENTIFIER = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def parse_job_request(obj: dict) -> dict:
    """Normalise one wire job request (2021's or today's shape) into JobRequest's fields.

    The fields: docs/reference.md#fetching-requests.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"not an object but {type(obj).__name__}")
    identifier = _require(obj, "identifier", (str, int))
    if str(identifier) == "":
        raise ValueError("'identifier' is empty")
    # It becomes a `req=` log tag, a database key and a path in the operator tools: a real one
    # is 16 base32 characters, so anything long or with spaces or control characters is refused.
    if len(str(identifier)) > MAX_IDENTIFIER or _BAD_IDENTIFIER.search(str(identifier)):
        raise ValueError(
            f"'identifier' must be at most {MAX_IDENTIFIER} characters without spaces or "
            "control characters"
        )
    try:
        return _fields(obj, str(identifier))
    except ValueError as exc:
        raise MalformedRequest(str(identifier), str(exc)) from None


def _fields(obj: dict, identifier: str) -> dict:
    workspace = _require(obj, "workspace", dict)
    # Today's server drops workspace.db for a top-level database_name; old servers only have db.
    database_name = obj.get("database_name")
    if not isinstance(database_name, str) or not database_name:
        database_name = _optional(workspace, "db", str, "", "workspace.")
    return {
        "id": identifier,
        "repo_url": _require(workspace, "repo", str, "workspace."),
        "commit": _require(obj, "sha", str),
        # A missing branch becomes "" so request validation (docs/lifecycle.md#creating-jobs) fails it visibly as an
        # __error__ job instead of the request being skipped where only the log shows it.
        "branch": _optional(workspace, "branch", str, "", "workspace."),
        "requested_actions": _str_list(obj, "requested_actions", required=True),
        "cancelled_actions": _str_list(obj, "cancelled_actions", required=False),
        "workspace": _require(workspace, "name", str, "workspace."),
        "database_name": database_name,
        "force_run_dependencies": _optional(obj, "force_run_dependencies", bool, False),
        "codelists_ok": _optional(obj, "codelists_ok", bool, True),
        "created_by": _optional(obj, "created_by", str, None),
        # Which backend the website meant it for (the token decides what it lists, not ?backend=).
        "backend": _optional(obj, "backend", str, None),
        "original": obj,
    }


def malformed_request(exc: MalformedRequest, obj: Any) -> dict:
    """JobRequest fields for a malformed request: what could be read, and the problem."""
    obj = obj if isinstance(obj, dict) else {}
    workspace = obj.get("workspace") if isinstance(obj.get("workspace"), dict) else {}

    def text(value: Any) -> str:
        return value if isinstance(value, str) else ""

    return {
        "id": exc.identifier,
        "repo_url": text(workspace.get("repo")),
        "commit": text(obj.get("sha")),
        "branch": text(workspace.get("branch")),
        "requested_actions": [],
        "cancelled_actions": [],
        "workspace": text(workspace.get("name")),
        "database_name": text(obj.get("database_name")) or text(workspace.get("db")),
        "force_run_dependencies": False,
        "codelists_ok": True,
        "created_by": None,
        "backend": obj.get("backend") if isinstance(obj.get("backend"), str) else None,
        "problem": exc.problem,
        "original": obj,
    }


def _wire_text(value: Any) -> str:
    return "" if value is None else str(value.value if isinstance(value, Enum) else value)


def _wire_time(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be unix seconds, got {type(value).__name__}")
    # Whole seconds with a literal Z: the format the website has always received (docs/reference.md#posting-job-states).
    return iso(value)


def job_to_wire(job: Mapping[str, Any]) -> dict:
    """Encode a job mapping as one item of the `POST jobs/` body (docs/reference.md#posting-job-states)."""
    created_at = _wire_time(job.get("created_at"), "created_at")
    if created_at is None:
        raise ValueError(f"job {job.get('id')} has no created_at, which the website requires")
    return {
        "identifier": str(job["id"]),
        "job_request_id": str(job["job_request_id"]),
        "action": _wire_text(job["action"]),
        "status": _wire_text(job["state"]),
        "status_code": _wire_text(job.get("status_code")),
        "status_message": _wire_text(job.get("status_message")),
        "run_command": _wire_text(job.get("run_command")),
        "created_at": created_at,
        "updated_at": _wire_time(job.get("updated_at"), "updated_at"),
        "started_at": _wire_time(job.get("started_at"), "started_at"),
        "completed_at": _wire_time(job.get("completed_at"), "completed_at"),
    }


def group_contiguously(jobs: list[dict], batch_size: int) -> list[list[dict]]:
    """Split jobs into batches keeping each request's jobs together and contiguous."""
    # The website deletes a request's jobs missing from each consecutive run of that request in
    # a POST (docs/reference.md#posting-job-states), so a request must never be split within or across batches.
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        if "job_request_id" not in job:
            raise ValueError(f"job {job.get('identifier', job.get('id'))} has no job_request_id")
        groups.setdefault(job["job_request_id"], []).append(job)
    batches: list[list[dict]] = []
    current: list[dict] = []
    for group in groups.values():
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current = current + group
        if len(current) >= batch_size:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches


def flags_header(flags: Iterable[Flag]) -> str:
    """The `Flags` header of every call (docs/reference.md#backend-flags): compact JSON of each
    stored flag, `{"<name>": {"v": <value or null>, "ts": <time as upstream writes it>}}`,
    exactly as upstream's `api_request` builds it. ASCII only (json escapes the rest), as a
    header must be."""
    data = {f.name: {"v": f.value, "ts": timestamp_isoformat(f.timestamp)} for f in flags}
    return json.dumps(data, separators=(",", ":"))
