"""Jobs, job requests, their states and status codes, and the one place where a state may change.

Pure: no I/O. Every change of a job's lifecycle goes through `transition()`, which refuses any move
docs/lifecycle.md#transitions does not allow (IllegalTransition is a bug, exit 70).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from jobrunner_lib.core.errors import IllegalTransition


class State(str, Enum):
    """The four job states the jobs website knows."""

    PENDING = "pending"
    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"

    @property
    def is_final(self) -> bool:
        """Failed and succeeded jobs are never revisited by the run loop."""
        return self in (State.FAILED, State.SUCCEEDED)


class StatusCode(str, Enum):
    """Machine-readable companion of the status message (the richer set the website accepts)."""

    CREATED = "created"
    WAITING_ON_DEPENDENCIES = "waiting_on_dependencies"
    WAITING_ON_WORKERS = "waiting_on_workers"
    WAITING_ON_DB_WORKERS = "waiting_on_db_workers"
    WAITING_ON_REBOOT = "waiting_on_reboot"
    WAITING_DB_MAINTENANCE = "waiting_db_maintenance"
    PAUSED = "paused"
    PREPARING = "preparing"
    PREPARED = "prepared"
    EXECUTING = "executing"
    EXECUTED = "executed"
    FINALIZING = "finalizing"
    FINALIZED = "finalized"
    SUCCEEDED = "succeeded"
    DEPENDENCY_FAILED = "dependency_failed"
    NONZERO_EXIT = "nonzero_exit"
    CANCELLED_BY_USER = "cancelled_by_user"
    UNMATCHED_PATTERNS = "unmatched_patterns"
    INTERNAL_ERROR = "internal_error"
    KILLED_BY_ADMIN = "killed_by_admin"
    JOB_ERROR = "job_error"
    STALE_CODELISTS = "stale_codelists"


class Msg:
    """User-visible status messages (docs/lifecycle.md#states); the website shows these verbatim."""

    WAITING_ON_DEPENDENCIES = "Waiting on dependencies"
    WAITING_ON_WORKERS = "Waiting on available workers"
    WAITING_ON_WORKERS_HEAVY = "Waiting on available workers for resource intensive job"
    WAITING_ON_REBOOT = "Waiting for the backend to restart (its jobs were stopped for a reboot)"
    PAUSED = "Backend is paused for maintenance; job will start when it resumes"
    # Upstream's words, for a database job held (or stopped and put back) during maintenance.
    WAITING_DB_MAINTENANCE = "Waiting for database to finish maintenance"
    CREATED = "Created"
    PREPARING = "Preparing"
    RUNNING = "Running"
    FINALIZING = "Finished, checking status and extracting outputs"
    SUCCEEDED = "Completed successfully"
    NONZERO_EXIT = "Job exited with an error code"
    UNMATCHED = "No outputs found matching patterns:"
    DEPENDENCY_FAILED = "Not starting as dependency failed"
    CANCELLED = "Cancelled by user"
    KILLED = "Killed by admin"
    INTERNAL_STARTING = "Internal error when starting job"
    INTERNAL_FINALIZING = "Internal error when finalising job"
    INTERNAL = "Internal error"
    RETRYING = "Re-attempting to extract outputs"
    ALREADY_RAN = "All actions have already run"
    ALREADY_SCHEDULED = "All requested actions were already scheduled to run"


ERROR_ACTION = "__error__"
RUN_ALL = "run_all"

# Allowed (from, to) moves; None is "not yet created" (docs/lifecycle.md#transitions).
ALLOWED: frozenset[tuple[State | None, State]] = frozenset(
    {
        (None, State.PENDING),
        (None, State.FAILED),
        (None, State.SUCCEEDED),
        (State.PENDING, State.PENDING),
        (State.PENDING, State.RUNNING),
        (State.PENDING, State.FAILED),
        (State.RUNNING, State.RUNNING),
        (State.RUNNING, State.SUCCEEDED),
        (State.RUNNING, State.FAILED),
        (
            State.RUNNING,
            State.PENDING,
        ),  # reboot prep, database maintenance, and a worker's prepare step redone from scratch
        (State.FAILED, State.RUNNING),  # retry of an internal error with the container kept
        (State.FAILED, State.PENDING),  # retry when the container is gone: start over
    }
)


def iso(ts: float | None) -> str | None:
    """Unix seconds as `2021-11-03T09:12:51Z`, whole seconds, UTC (None stays None)."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def now() -> int:
    """Current time as whole Unix seconds (how every job timestamp is stored)."""
    return int(time.time())


@dataclass
class JobRequest:
    """A request from the website (or jr-add-job) to run some actions of a study at one commit."""

    id: str
    repo_url: str
    commit: str | None
    branch: str
    requested_actions: list[str]
    cancelled_actions: list[str]
    workspace: str
    database_name: str
    force_run_dependencies: bool = False
    codelists_ok: bool = True
    created_by: str | None = None
    original: dict[str, Any] = field(default_factory=dict)
    # The website's backend for it (None: an older website that does not say).
    backend: str | None = None
    # Why the request as received cannot be run (a field missing or of the wrong type).
    problem: str | None = None


@dataclass
class Job:
    """One action of one request: the row of the `job` table (docs/architecture.md#the-state-store)."""

    id: str
    job_request_id: str
    state: State
    repo_url: str = ""
    commit: str | None = None
    workspace: str = ""
    database_name: str | None = None
    action: str = ""
    action_repo_url: str | None = None
    action_commit: str | None = None
    requires_outputs_from: list[str] = field(default_factory=list)
    wait_for_job_ids: list[str] = field(default_factory=list)
    run_command: str = ""
    image_id: str | None = None
    output_spec: dict[str, dict[str, str]] = field(default_factory=dict)
    outputs: dict[str, str] | None = None
    unmatched_outputs: list[str] | None = None
    status_message: str | None = None
    status_code: StatusCode | None = None
    cancelled: bool = False
    created_at: int = 0
    updated_at: int = 0
    started_at: int | None = None
    completed_at: int | None = None
    # jr's own columns (schema v2).
    run_by_user: str | None = None
    requires_db: bool = False
    exit_code: int | None = None
    worker_pid: int | None = None
    worker_started_at: float | None = None
    heartbeat_at: float | None = None
    progress_at: float | None = None
    error_detail: str | None = None
    attempts: int = 0
    rev: int = 0
    # schema v3: path -> action for every file copied into the volume as an input (None: not yet).
    input_files: dict[str, str] | None = None

    @property
    def project(self) -> str:
        """The repo name (last URL segment without `.git`)."""
        return project_name(self.repo_url)

    def copy(self, **changes: Any) -> Job:
        """A copy with some fields changed (jobs are treated as values)."""
        return dataclasses.replace(self, **changes)


def project_name(repo_url: str) -> str:
    """Last path segment of a repo URL or path, without `.git`."""
    name = repo_url.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def transition(
    job: Job,
    state: State,
    code: StatusCode | None,
    message: str | None,
    *,
    at: int | None = None,
    **changes: Any,
) -> Job:
    """Return the job moved to `state` with its code and message, timestamps set by the rules.

    Raises IllegalTransition for a move docs/lifecycle.md#transitions does not allow. `started_at` is set on entering
    RUNNING, `completed_at` on entering a final state; both are cleared on a reset to PENDING.
    """
    if (job.state, state) not in ALLOWED:
        raise IllegalTransition(
            f"job {job.id}: {job.state.value} -> {state.value} is not allowed "
            f"(code {code.value if code else None})"
        )
    at = now() if at is None else at
    new = job.copy(state=state, status_code=code, status_message=message, updated_at=at, **changes)
    if state is State.RUNNING and (job.state is not State.RUNNING):
        new.started_at = job.started_at if job.state is State.FAILED and job.started_at else at
        new.completed_at = None
    if state.is_final and not job.state.is_final:
        new.completed_at = at
    if state is State.PENDING and job.state is not State.PENDING:
        new.started_at = None
        new.completed_at = None
    return new


def new_job(
    job_id: str,
    request: JobRequest,
    action: str,
    state: State,
    code: StatusCode | None,
    message: str | None,
    *,
    at: int | None = None,
    **fields: Any,
) -> Job:
    """Create a job in its first state, checked against the allowed creations."""
    if (None, state) not in ALLOWED:
        raise IllegalTransition(f"job {job_id}: cannot be created {state.value}")
    at = now() if at is None else at
    job = Job(
        id=job_id,
        job_request_id=request.id,
        state=state,
        repo_url=request.repo_url,
        commit=request.commit,
        workspace=request.workspace,
        database_name=request.database_name,
        action=action,
        status_code=code,
        status_message=message,
        created_at=at,
        updated_at=at,
        run_by_user=request.created_by,
        **fields,
    )
    if state.is_final:
        job.started_at = at
        job.completed_at = at
    return job


@dataclass
class FinalResult:
    """The outcome of finalizing a job, to be applied to the job row."""

    state: State
    status_code: StatusCode
    message: str
    completed_at: int
    exit_code: int | None = None
    image_id: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    unmatched_outputs: list[str] | None = None


def apply_result(job: Job, result: FinalResult) -> Job:
    """The job moved to its final state as the result says (not saved)."""
    return transition(
        job,
        result.state,
        result.status_code,
        result.message,
        at=result.completed_at,
        exit_code=result.exit_code,
        image_id=result.image_id or job.image_id,
        outputs=result.outputs,
        unmatched_outputs=result.unmatched_outputs,
    )


class Outcome(Protocol):
    """How an executor's finalize sees the job's row: re-read it, and save the outcome."""

    def current(self) -> Job:
        """The job as the store holds it now; raises if it is no longer this worker's to finish."""

    def save(self, result: FinalResult) -> Job:
        """Save the final state (compare-and-set); raises if the job is no longer ours."""
