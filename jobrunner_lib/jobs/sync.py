"""One sync pass with the jobs website (docs/reference.md#jobs-website): fetch, cancel, post, then create.

Status posts for known jobs go out before any git fetch for new requests, so a slow clone never
delays what the website shows about running jobs (as the old backend's did). What was last posted
successfully is remembered in `job_post`, so jobs of requests the website no longer lists still
get their final state posted, and an outage is caught up in full on the first good pass.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import Job, JobRequest
from jobrunner_lib.jobs.create import RetryLater, handle_request
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from jobrunner_lib.website.client import (
    JobServerClient,
    JobServerError,
    JobServerRejected,
    JobServerUnavailable,
)
from jobrunner_lib.website.wire import group_contiguously, job_to_wire

log = logging.getLogger(__name__)

BATCH_SIZE = 200
# Jobs created before this horizon and final ever since are history (perhaps from before
# job_post existed): their requests finished on the website long ago, so they are not looked at.
CATCHUP_HORIZON = 7 * 86400
# Job creation stops when less than this share of the time limit is left, keeping time to post.
CREATE_RESERVE = 0.25
WIRE_KEYS = ("id", "job_request_id", "action", "state", "status_code", "status_message",
             "run_command", "created_at", "updated_at", "started_at", "completed_at")  # fmt: skip


@dataclass
class SyncResult:
    """What one pass did."""

    requests_seen: int = 0  # well-formed active requests the website listed
    requests_new: int = 0  # of those, handled for the first time this pass
    requests_deferred: int = 0  # new requests left for a later pass (network trouble, time limit)
    jobs_created: int = 0
    jobs_cancelled: int = 0  # jobs newly flagged as cancelled
    jobs_posted: int = 0  # jobs the website accepted
    problems: int = 0  # malformed requests, rejected posts, requests that could not be handled
    # Jobs created, or posted with a state/updated_at the website had not seen: the tool's output.
    changed: dict[str, Job] = field(default_factory=dict)


def sync_pass(
    config: Config, conn: sqlite3.Connection, client: JobServerClient, *, deadline: float
) -> SyncResult:
    """One pass; raises JobServerError (its `sync_result` holding what was done) if it must stop."""
    result = SyncResult()
    try:
        _run(config, conn, client, deadline, result)
    except JobServerError as exc:
        exc.sync_result = result  # type: ignore[attr-defined]
        raise
    log.debug(
        "Sync pass: %d requests (%d new, %d deferred), %d jobs created, %d cancelled, "
        "%d posted, %d problems",
        result.requests_seen,
        result.requests_new,
        result.requests_deferred,
        result.jobs_created,
        result.jobs_cancelled,
        result.jobs_posted,
        result.problems,
    )
    return result


def _run(
    config: Config,
    conn: sqlite3.Connection,
    client: JobServerClient,
    deadline: float,
    result: SyncResult,
) -> None:
    limit = config.sync_time_limit
    log.debug("Polling for JobRequests at: %s", display_endpoint(client.endpoint))
    with _time_limit(client, deadline, limit):
        parsed, problems = client.fetch_job_requests()
    for problem in problems:
        log.warning("Skipping malformed JobRequest: %s", problem)
    result.problems += len(problems)
    requests = _only_ours(conn, config, _to_requests(parsed, result), result)
    result.requests_seen = len(requests)

    listed = _jobs_by_request(conn, [r.id for r in requests])
    new = [r for r in requests if r.id not in listed and not db_queries.request_exists(conn, r.id)]
    for request in requests:
        if request.id in listed:
            result.jobs_cancelled += _flag_cancelled(conn, request, listed[request.id])

    # Every job of every listed request (this repairs whatever the website lost, e.g. siblings
    # a single-job post made it delete), then whole requests with unposted changes.
    changed = _changed_since_post(conn)
    catch_up = [rid for rid in dict.fromkeys(changed.values()) if rid not in listed]
    groups = {**listed, **_jobs_by_request(conn, catch_up)}
    _post(conn, client, groups, set(changed), deadline, limit, result)

    # Only now the slow part: git fetches for new requests, oldest first (the website lists
    # newest first, and a later request of a workspace should see an earlier one's jobs).
    created = _create(config, conn, list(reversed(new)), deadline, result)
    if created:
        if deadline - time.monotonic() <= 0:
            log.info(
                "Out of time: the %d new jobs will be posted on the next pass", result.jobs_created
            )
            return
        fresh = _jobs_by_request(conn, created)
        ids = {job.id for jobs in fresh.values() for job in jobs}
        _post(conn, client, fresh, ids, deadline, limit, result)


def _to_requests(parsed: Iterable[dict[str, Any]], result: SyncResult) -> list[JobRequest]:
    requests = []
    for item in parsed:
        try:
            requests.append(JobRequest(**item))
        except TypeError as exc:  # the wire parser and the model disagree: report, do not crash
            log.warning("Skipping malformed JobRequest %s: %s", item.get("id"), exc)
            result.problems += 1
    return requests


def _only_ours(
    conn: sqlite3.Connection, config: Config, requests: list[JobRequest], result: SyncResult
) -> list[JobRequest]:
    """The requests meant for this backend. The website picks what it lists by the token, not by
    `?backend=`, so a token of another backend (or a website bug) lists another backend's work:
    it is never run nor answered here, and said once per request in the log."""
    ours = []
    for request in requests:
        if request.backend is None or request.backend == config.backend:
            ours.append(request)
            continue
        result.problems += 1
        flag = f"foreign-request:{request.id}"
        if store_flags.get_flag(conn, flag) is None:
            log.warning(
                "Ignoring JobRequest for backend %r: this is backend %r (is JOB_SERVER_TOKEN "
                "this backend's token?)",
                request.backend,
                config.backend,
                extra={"req": request.id},
            )
            store_flags.set_flag(conn, flag, request.backend)
    return ours


def _jobs_by_request(conn: sqlite3.Connection, request_ids: Sequence[str]) -> dict[str, list[Job]]:
    """Every job of these requests, grouped by request in the order given (requests with none left out)."""
    ids = list(dict.fromkeys(request_ids))
    found: dict[str, list[Job]] = {}
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-variable limit
        for job in db_queries.find_jobs(conn, requests=ids[start : start + 500]):
            found.setdefault(job.job_request_id, []).append(job)
    return {
        rid: sorted(found[rid], key=lambda j: (j.created_at, j.id)) for rid in ids if rid in found
    }


def _flag_cancelled(conn: sqlite3.Connection, request: JobRequest, jobs: list[Job]) -> int:
    if not request.cancelled_actions:
        return 0
    wanted = set(request.cancelled_actions)
    # Checked in memory first, so a request cancelled long ago costs no write lock every pass.
    if not any(j.action in wanted and not j.cancelled and not j.state.is_final for j in jobs):
        return 0
    count = db_queries.set_cancelled(conn, request.id, request.cancelled_actions)
    if count:
        log.debug("Cancelling actions: %s", sorted(wanted), extra={"req": request.id})
    return count


def _changed_since_post(conn: sqlite3.Connection) -> dict[str, str]:
    """{job id: request id} of jobs whose state or updated_at differs from what was last posted."""
    return db_queries.changed_since_posted(conn, int(time.time()) - CATCHUP_HORIZON)


def _record_posted(conn: sqlite3.Connection, jobs: Sequence[Job]) -> None:
    # The values as read before posting: if the run side moved a job on meanwhile, it still
    # differs from this record and goes out again on the next pass.
    db_queries.record_posted(conn, jobs)


def _post(
    conn: sqlite3.Connection,
    client: JobServerClient,
    groups: dict[str, list[Job]],
    changed: set[str],
    deadline: float,
    limit: float,
    result: SyncResult,
) -> None:
    """POST whole requests, contiguously, recording each accepted batch in job_post."""
    wire: list[dict[str, Any]] = []
    by_id: dict[str, Job] = {}
    for request_id, jobs in groups.items():
        try:
            items = [job_to_wire({k: getattr(j, k) for k in WIRE_KEYS}) for j in jobs]
        except ValueError as exc:
            # Posting the rest would make the website delete the job left out (docs/reference.md#posting-job-states).
            log.error("Cannot post this request's jobs: %s", exc, extra={"req": request_id})
            result.problems += 1
            continue
        wire.extend(items)
        by_id.update((j.id, j) for j in jobs)
    if not wire:
        return
    log.debug("Syncing %d jobs back to job-server", len(wire))
    for batch in group_contiguously(wire, BATCH_SIZE):
        _post_batch(conn, client, batch, by_id, changed, deadline, limit, result)


def _post_batch(
    conn: sqlite3.Connection,
    client: JobServerClient,
    batch: list[dict[str, Any]],
    by_id: dict[str, Job],
    changed: set[str],
    deadline: float,
    limit: float,
    result: SyncResult,
) -> None:
    try:
        with _time_limit(client, deadline, limit):
            client.post_jobs(batch, batch_size=len(batch))
    except JobServerRejected as exc:
        request_ids = list(dict.fromkeys(item["job_request_id"] for item in batch))
        if len(request_ids) > 1:
            # Nothing of a rejected batch is saved: post its requests one by one, so one bad
            # request cannot hold back the others.
            log.debug(
                "The jobs website rejected %d requests' jobs together; posting them one by one",
                len(request_ids),
            )
            for request_id in request_ids:
                part = [item for item in batch if item["job_request_id"] == request_id]
                _post_batch(conn, client, part, by_id, changed, deadline, limit, result)
            return
        log.error(
            "The jobs website rejected this request's jobs: %s", exc, extra={"req": request_ids[0]}
        )
        result.problems += 1
        return
    jobs = [by_id[item["identifier"]] for item in batch]
    _record_posted(conn, jobs)
    result.jobs_posted += len(jobs)
    result.changed.update((j.id, j) for j in jobs if j.id in changed)


def _create(
    config: Config,
    conn: sqlite3.Connection,
    requests: list[JobRequest],
    deadline: float,
    result: SyncResult,
) -> list[str]:
    """Create the jobs of new requests while time allows; return the ids of requests handled."""
    reserve = CREATE_RESERVE * config.sync_time_limit
    handled: list[str] = []
    for index, request in enumerate(requests):
        if deadline - time.monotonic() < reserve:
            left = len(requests) - index
            log.info("Leaving %d new JobRequests for the next pass (sync time limit)", left)
            result.requests_deferred += left
            break
        extra = {"req": request.id}
        log.info("Handling new JobRequest:\n%s", describe_request(request), extra=extra)
        try:
            outcome = handle_request(config, conn, request)
        except RetryLater as exc:
            log.warning("Cannot create jobs yet, will retry on a later pass: %s", exc, extra=extra)
            result.requests_deferred += 1
            continue
        except Exception as exc:  # noqa: BLE001 - one request's trouble must not stop the others
            log.exception(
                "Uncaught error while creating jobs (%s: %s); will retry on a later pass",
                type(exc).__name__,
                exc,
                extra=extra,
            )
            result.problems += 1
            continue
        handled.append(request.id)
        if not outcome.created:  # another process got there first
            log.debug("Ignoring already processed JobRequest", extra=extra)
            continue
        result.requests_new += 1
        result.jobs_created += len(outcome.jobs)
        result.changed.update((j.id, j) for j in outcome.jobs)
    return handled


def describe_request(request: JobRequest) -> str:
    """The request's repr without the raw JSON it came from (that is stored, not logged)."""
    parts = (
        f"{f.name}={getattr(request, f.name)!r}" for f in fields(request) if f.name != "original"
    )
    return f"JobRequest({', '.join(parts)})"


def display_endpoint(endpoint: str) -> str:
    """The endpoint with any user:password@ masked, fit for a log line."""
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="********@" + parts.netloc.rsplit("@", 1)[1])
    return urlunsplit(parts)


@contextmanager
def _time_limit(client: JobServerClient, deadline: float, limit: float) -> Iterator[None]:
    """Cap the client's own time limit for one call at what is left of the pass."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise JobServerUnavailable(f"gave up: the sync pass is over its {limit:g}s time limit")
    saved = client.total_limit
    client.total_limit = min(saved, left)
    try:
        yield
    finally:
        client.total_limit = saved
