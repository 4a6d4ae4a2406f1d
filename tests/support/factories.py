"""Small builders for requests and jobs in tests (no I/O but insert_job's database write)."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

from jobrunner_lib.core.ids import job_id, new_request_id
from jobrunner_lib.core.models import (
    Job,
    JobRequest,
    Msg,
    State,
    StatusCode,
    new_job,
    now,
    transition,
)

_clock = itertools.count(1_700_000_000)


def make_request(workspace: str = "ws", actions: list[str] | None = None, **kw) -> JobRequest:
    """A job request with sensible defaults."""
    return JobRequest(
        id=kw.pop("id", None) or new_request_id(),
        repo_url=kw.pop("repo_url", "/repos/study"),
        commit=kw.pop("commit", "c" * 40),
        branch="main",
        requested_actions=actions or ["run_all"],
        cancelled_actions=[],
        workspace=workspace,
        database_name=kw.pop("database_name", "dummy"),
        **kw,
    )


def make_job(request: JobRequest, action: str, state: State = State.PENDING, **kw) -> Job:
    """A job of that request, each one created a second after the last."""
    at = kw.pop("at", None) or next(_clock)
    code = kw.pop("code", StatusCode.CREATED)
    message = kw.pop("message", "Created")
    if state is State.RUNNING:  # only the state machine makes running jobs
        job = new_job(
            job_id(request.id, action),
            request,
            action,
            State.PENDING,
            StatusCode.CREATED,
            "Created",
            at=at,
            **kw,
        )
        return transition(job, State.RUNNING, code, message, at=at)
    return new_job(job_id(request.id, action), request, action, state, code, message, at=at, **kw)


def insert_job(conn, state: State, code: StatusCode, message: str, action: str = "extract") -> Job:
    """One job of a new request, in that state, written to the store behind conn."""
    from jobrunner_lib.store import queries as db_queries

    request = make_request()
    job = make_job(request, action, state, code=code, message=message)
    db_queries.insert_request(conn, request, [job])
    return job


class Jobs:
    """Inserts claimed jobs (running/preparing, as a pass leaves them) of a real study's commit."""

    def __init__(self, conn, repo: Path, commit: str):
        self.conn, self.repo, self.commit = conn, repo, commit

    def add(
        self,
        action: str,
        command: str | list[str],
        outputs: dict,
        *,
        needs: list[str] | None = None,
        workspace: str = "ws",
        **fields,
    ) -> Job:
        """A claimed job running `command` (a string, or image and arguments to quote)."""
        from jobrunner_lib.store import queries as db_queries

        if not isinstance(command, str):
            command = shlex.join(command)
        request = make_request(
            workspace,
            [action],
            repo_url=str(self.repo),
            commit=self.commit,
            created_by="alice",
            original={"identifier": "x", "created_by": "alice", "sha": self.commit},
        )
        job = make_job(
            request,
            action,
            at=now(),
            run_command=command,
            output_spec=outputs,
            requires_outputs_from=needs or [],
            **fields,
        )
        job = transition(job, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING, attempts=1)
        db_queries.insert_request(self.conn, request, [job])
        return job
