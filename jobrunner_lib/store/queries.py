"""Jobs, requests and flags in the state store: rows decoded into Jobs, and every query on them.

Writes that must not be half done take db.transaction(); a job is saved by compare-and-set on its
revision (update_job), so a change made meanwhile by another process is never overwritten. Every
change to a job goes through change_job, which decides again on the fresh row after a lost race.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

from jobrunner_lib.core.errors import ConflictError, JobKeepsChanging
from jobrunner_lib.core.models import Job, JobRequest, State, StatusCode
from jobrunner_lib.store.db import transaction

JSON_COLUMNS = {
    "requires_outputs_from",
    "wait_for_job_ids",
    "output_spec",
    "outputs",
    "unmatched_outputs",
    "input_files",
}
# A job that ran (or will run) something: not a request's "nothing to do" answer (jobs.create),
# a succeeded job of an action with no command and no outputs, which must never stand for it.
RAN = "COALESCE(run_command, '') != ''"
BOOL_COLUMNS = {"cancelled", "requires_db"}
JOB_COLUMNS = [f.name for f in fields(Job)]
# The run side never writes `cancelled` (sync owns it), so a cancel is never overwritten; liveness
# columns are written only by touch(), so a heartbeat never races a lifecycle change.
LIVENESS_COLUMNS = ("heartbeat_at", "progress_at")
RUN_SIDE_COLUMNS = [
    c for c in JOB_COLUMNS if c not in ("id", "cancelled", "rev", *LIVENESS_COLUMNS)
]
ACTIVE_STATES = (State.PENDING.value, State.RUNNING.value)


def _q(column: str) -> str:
    return '"commit"' if column == "commit" else column


def _encode(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column in BOOL_COLUMNS:
        return int(bool(value))
    if isinstance(value, (State, StatusCode)):
        return value.value
    return value


def job_from_row(row: sqlite3.Row | dict[str, Any]) -> Job:
    """Decode a `job` row into a Job."""
    data = dict(row)
    values: dict[str, Any] = {}
    for name in JOB_COLUMNS:
        value = data.get(name)
        if name in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif name in BOOL_COLUMNS:
            value = bool(value)
        elif name == "state":
            value = State(value)
        elif name == "status_code":
            value = _status_code(value)
        values[name] = value
    for name in ("requires_outputs_from", "wait_for_job_ids"):
        values[name] = values[name] or []
    values["output_spec"] = values["output_spec"] or {}
    values["rev"] = values["rev"] or 0
    values["created_at"] = values["created_at"] or 0
    values["updated_at"] = values["updated_at"] or 0
    return Job(**values)


def _status_code(value: str | None) -> StatusCode | None:
    if not value:
        return None
    try:
        return StatusCode(value)
    except ValueError:
        # Old files stored the enum's repr (`StatusCode.NONZERO_EXIT`); accept that too.
        name = value.split(".", 1)[-1]
        return StatusCode[name] if name in StatusCode.__members__ else None


def insert_request(conn: sqlite3.Connection, request: JobRequest, jobs: Sequence[Job]) -> None:
    """Insert a request and its jobs in one transaction (nothing half-written)."""
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO job_request (id, original, created_at) VALUES (?, ?, "
            "strftime('%s','now'))",
            (request.id, json.dumps(request.original)),
        )
        insert_jobs(conn, jobs)


def insert_jobs(conn: sqlite3.Connection, jobs: Iterable[Job]) -> None:
    """Insert jobs (inside the caller's transaction)."""
    cols = ", ".join(_q(c) for c in JOB_COLUMNS)
    marks = ", ".join("?" for _ in JOB_COLUMNS)
    conn.executemany(
        f"INSERT INTO job ({cols}) VALUES ({marks})",
        [[_encode(c, getattr(j, c)) for c in JOB_COLUMNS] for j in jobs],
    )


def update_job(conn: sqlite3.Connection, job: Job) -> Job:
    """Save a job the caller read earlier, unless someone changed it since (compare-and-set on rev).

    Returns the saved job with its new revision; raises ConflictError if the row moved on.
    """
    sets = ", ".join(f"{_q(c)} = ?" for c in RUN_SIDE_COLUMNS)
    values = [_encode(c, getattr(job, c)) for c in RUN_SIDE_COLUMNS]
    cur = conn.execute(
        f"UPDATE job SET {sets}, rev = rev + 1 WHERE id = ? AND rev = ?", [*values, job.id, job.rev]
    )
    if cur.rowcount != 1:
        raise ConflictError(
            f"job {job.id} was changed by another process (expected revision {job.rev})"
        )
    return job.copy(rev=job.rev + 1)


def touch(
    conn: sqlite3.Connection,
    job_id: str,
    *,
    heartbeat: float | None = None,
    progress: float | None = None,
    refresh_updated_at: bool = False,
    refresh_after: int = 60,
) -> None:
    """Record a worker's liveness (and, once `refresh_after` seconds old, bump updated_at for the website)."""
    sets, args = [], []
    if heartbeat is not None:
        sets.append("heartbeat_at = ?")
        args.append(heartbeat)
    if progress is not None:
        sets.append("progress_at = ?")
        args.append(progress)
    if refresh_updated_at:
        sets.append(
            "updated_at = CASE WHEN updated_at <= CAST(strftime('%s','now') AS INT) - ? "
            "THEN CAST(strftime('%s','now') AS INT) ELSE updated_at END"
        )
        args.append(max(1, int(refresh_after)))
    if sets:
        conn.execute(f"UPDATE job SET {', '.join(sets)} WHERE id = ?", [*args, job_id])


def save_job(conn: sqlite3.Connection, job: Job) -> Job:
    """update_job in its own short transaction."""
    with transaction(conn):
        return update_job(conn, job)


# Lost races in a row before change_job gives up. A race is lost only to another lifecycle write
# of the same job (heartbeats do not bump the revision), so even two loses in a row are rare.
CONFLICT_RETRIES = 10


def change_job(
    conn: sqlite3.Connection, job: Job, change: Callable[[Job], Job | None]
) -> tuple[Job | None, bool]:
    """Save change(job) by compare-and-set; after a lost race, re-read the row and change that.

    `change` decides on the job as it is now: it returns the job to save, or None (or the job it
    was given, unchanged) when there is nothing to do; it may raise to stop. It is called first
    with `job` as the caller read it, then once per lost race with the fresh row.
    Returns (the job as saved, True), (the job as it is, False) when change decided nothing is to
    be done, or (None, False) when the row is gone. After CONFLICT_RETRIES lost races it gives up
    with JobKeepsChanging (a TemporaryFailure: a tool exits 75, a loop looks again next pass).
    """
    for _ in range(CONFLICT_RETRIES):
        new = change(job)
        if new is None or new is job:
            return job, False
        try:
            return save_job(conn, new), True
        except ConflictError:
            fresh = get_job(conn, job.id)
            if fresh is None:
                return None, False
            job = fresh
    raise JobKeepsChanging(
        f"job {job.id} keeps changing (another process changed it {CONFLICT_RETRIES} times "
        "while we were changing it); try again"
    )


def get_job(conn: sqlite3.Connection, job_id: str) -> Job | None:
    """One job by full id."""
    row = conn.execute("SELECT * FROM job WHERE id = ?", (job_id,)).fetchone()
    return job_from_row(row) if row else None


def get_jobs(conn: sqlite3.Connection, ids: Iterable[str]) -> list[Job]:
    """Jobs by full id, in the order given (unknown ids are left out)."""
    ids = list(dict.fromkeys(ids))
    found: dict[str, Job] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        rows = conn.execute(f"SELECT * FROM job WHERE id IN ({','.join('?' * len(part))})", part)
        found.update({r["id"]: job_from_row(r) for r in rows})
    return [found[i] for i in ids if i in found]


def active_jobs(conn: sqlite3.Connection) -> list[Job]:
    """Pending and running jobs (uses the partial state index; never loads history)."""
    # Spelled exactly like the partial index's condition, and unordered, so SQLite uses that index
    # (IN (?, ?) or ORDER BY created_at would scan the whole history instead).
    rows = conn.execute("SELECT * FROM job WHERE state NOT IN ('failed', 'succeeded')")
    return sorted((job_from_row(r) for r in rows), key=lambda j: (j.created_at, j.id))


def jobs_for_request(conn: sqlite3.Connection, request_id: str) -> list[Job]:
    """Every job of one request, oldest first."""
    rows = conn.execute(
        "SELECT * FROM job WHERE job_request_id = ? ORDER BY created_at, id", (request_id,)
    )
    return [job_from_row(r) for r in rows]


def request_exists(conn: sqlite3.Connection, request_id: str) -> bool:
    """Whether any job (or the request row) exists for this request id."""
    return (
        conn.execute(
            "SELECT 1 FROM job WHERE job_request_id = ? UNION "
            "SELECT 1 FROM job_request WHERE id = ? LIMIT 1",
            (request_id, request_id),
        ).fetchone()
        is not None
    )


def latest_jobs_by_action(conn: sqlite3.Connection, workspace: str) -> dict[str, Job]:
    """The workspace state: per action, its newest job that is not cancelled and not `__error__`
    (nor a request's "nothing to do" answer, which ran nothing: no run_command)."""
    rows = conn.execute(
        "SELECT * FROM job WHERE workspace = ? AND action != '__error__' AND NOT cancelled "
        f"AND {RAN} ORDER BY action, created_at, rowid",
        (workspace,),
    )
    latest: dict[str, Job] = {}
    for row in rows:
        latest[row["action"]] = job_from_row(row)
    return latest


def original_request(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """The request as received (for metadata.json), if it was stored and is valid JSON."""
    row = conn.execute("SELECT original FROM job_request WHERE id = ?", (request_id,)).fetchone()
    try:
        return json.loads(row[0]) if row and row[0] else None
    except ValueError:
        return None


def latest_succeeded_job(
    conn: sqlite3.Connection, workspace: str, action: str, exclude_id: str | None = None
) -> Job | None:
    """The newest succeeded job of an action in a workspace (whose outputs are on disk)."""
    row = conn.execute(
        "SELECT * FROM job WHERE workspace = ? AND action = ? AND state = 'succeeded' AND id != ? "
        f"AND {RAN} ORDER BY created_at DESC, rowid DESC LIMIT 1",
        (workspace, action, exclude_id or ""),
    ).fetchone()
    return job_from_row(row) if row else None


def workspace_outputs(
    conn: sqlite3.Connection, workspace: str, exclude_id: str | None = None
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, dict[str, str]]]]:
    """Who holds what in a workspace: per action, the outputs of its newest succeeded job, and
    the output spec of its newest job of any state (what it declares now); `exclude_id` left out.
    """
    rows = conn.execute(
        "SELECT action, state, output_spec, outputs FROM job "
        f"WHERE workspace = ? AND action != '__error__' AND id != ? AND {RAN} "
        "ORDER BY action, created_at, rowid",
        (workspace, exclude_id or ""),
    )
    produced: dict[str, dict[str, str]] = {}
    declared: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        declared[row["action"]] = json.loads(row["output_spec"] or "{}")
        if row["state"] == State.SUCCEEDED.value:
            produced[row["action"]] = json.loads(row["outputs"] or "{}") or {}
    return produced, declared


def _filters(
    states: Sequence[str],
    codes: Sequence[str],
    workspaces: Sequence[str],
    requests: Sequence[str],
    actions: Sequence[str],
    since: int | None,
    ids: Sequence[str] | None,
) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, values in (
        ("state", states),
        ("status_code", codes),
        ("workspace", workspaces),
        ("job_request_id", requests),
        ("action", actions),
        ("id", ids or ()),
    ):
        if values:
            where.append(f"{column} IN ({','.join('?' * len(values))})")
            args.extend(values)
    if ids is not None and not ids:
        where.append("0")
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def find_jobs(
    conn: sqlite3.Connection,
    *,
    states: Sequence[str] = (),
    codes: Sequence[str] = (),
    workspaces: Sequence[str] = (),
    requests: Sequence[str] = (),
    actions: Sequence[str] = (),
    since: int | None = None,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> list[Any]:
    """Jobs matching every given filter, newest first: Jobs, or plain rows of `columns` (cheaper)."""
    where, args = _filters(states, codes, workspaces, requests, actions, since, ids)
    selected = ", ".join(_q(c) for c in columns) if columns else "*"
    sql = f"SELECT {selected} FROM job{where} ORDER BY created_at DESC, id DESC"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    rows = conn.execute(sql, args)
    return rows.fetchall() if columns else [job_from_row(r) for r in rows]


def search_ids(conn: sqlite3.Connection, fragment: str, *, limit: int = 1000) -> list[Job]:
    """Jobs whose id or request id contains the fragment (case-insensitive, no LIKE wildcards)."""
    frag = fragment.lower()
    rows = conn.execute(
        "SELECT * FROM job WHERE instr(lower(id), ?) > 0 OR instr(lower(job_request_id), ?) > 0 "
        "ORDER BY created_at DESC, id LIMIT ?",
        (frag, frag, limit),
    )
    return [job_from_row(r) for r in rows]


def ids_containing(conn: sqlite3.Connection, fragment: str, limit: int) -> list[tuple[str, str]]:
    """(job id, action) and (request id, `request`) pairs whose id contains the fragment (lower
    case), for tab completion: only two columns, so it stays quick whatever the history."""
    frag = fragment.lower()
    rows = conn.execute(
        "SELECT id, action FROM job WHERE instr(id, ?) > 0 UNION "
        "SELECT DISTINCT job_request_id, 'request' FROM job WHERE instr(job_request_id, ?) > 0 LIMIT ?",
        (frag, frag, limit),
    )
    return [(row[0], row[1]) for row in rows]


def set_cancelled(conn: sqlite3.Connection, request_id: str, actions: Iterable[str]) -> int:
    """Flag a request's non-final jobs for these actions as cancelled (sync side); returns the count."""
    actions = list(actions)
    if not actions:
        return 0
    with transaction(conn):
        cur = conn.execute(
            f"UPDATE job SET cancelled = 1 WHERE job_request_id = ? AND NOT cancelled AND "
            f"state IN (?, ?) AND action IN ({','.join('?' * len(actions))})",
            [request_id, *ACTIVE_STATES, *actions],
        )
    return cur.rowcount


# Jobs whose state or updated_at differs from what was last posted, found without reading the
# job history: active jobs (the partial state index, whose condition must be written exactly
# so), recently created jobs (created_at index), and jobs last posted while still active (a scan
# of job_post's small rows).
# Missed: a job created before the horizon that went final -> final (a retry) between two
# passes, in a request the website no longer lists; rare, and the website keeps the old failure.
_DIFFERS = (
    "(p.job_id IS NULL OR p.posted_updated_at IS NOT j.updated_at OR p.posted_state IS NOT j.state)"
)
_CHANGED_SINCE_POSTED = f"""
SELECT j.id, j.job_request_id FROM job j LEFT JOIN job_post p ON p.job_id = j.id
WHERE j.state NOT IN ('failed', 'succeeded') AND {_DIFFERS}
UNION
SELECT j.id, j.job_request_id FROM job j LEFT JOIN job_post p ON p.job_id = j.id
WHERE j.created_at >= ? AND {_DIFFERS}
UNION
SELECT j.id, j.job_request_id FROM job_post p JOIN job j ON j.id = p.job_id
WHERE p.posted_state NOT IN ('failed', 'succeeded') AND {_DIFFERS}
"""


def changed_since_posted(conn: sqlite3.Connection, created_since: int) -> dict[str, str]:
    """{job id: request id} of jobs whose state or updated_at differs from what was last posted
    to the jobs website (record_posted), among active jobs, jobs created since `created_since`
    and jobs last posted while active."""
    return {row[0]: row[1] for row in conn.execute(_CHANGED_SINCE_POSTED, (created_since,))}


def record_posted(conn: sqlite3.Connection, jobs: Sequence[Job]) -> None:
    """Remember what was posted of these jobs (their updated_at and state as given)."""
    with transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO job_post (job_id, posted_updated_at, posted_state) VALUES (?, ?, ?)",
            [(j.id, j.updated_at, j.state.value) for j in jobs],
        )


def count_by(conn: sqlite3.Connection, column: str) -> list[tuple[str, str, int]]:
    """(value, state, count) for a summary by `workspace` or `state`."""
    if column not in ("workspace", "state", "status_code"):
        raise ValueError(column)
    return [
        tuple(r)
        for r in conn.execute(
            f"SELECT {column}, state, COUNT(*) FROM job GROUP BY {column}, state ORDER BY {column}, state"
        )
    ]
