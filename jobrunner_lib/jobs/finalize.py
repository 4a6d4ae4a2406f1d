"""Finalizing a job (docs/reference.md#finalize): decide the outcome, write its log and metadata, copy outputs.

Safe to repeat: every file is written under a temporary name and renamed into place, so a second
run (after a crash, or through jr-retry) just rewrites the same files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from jobrunner_lib.core import faults, outputs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobError
from jobrunner_lib.core.models import (
    FinalResult,
    Job,
    Msg,
    Outcome,
    State,
    StatusCode,
    apply_result,
    iso,
    now,
)
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract, tarstream, volumes
from jobrunner_lib.jobs import workspaces
from jobrunner_lib.store import queries as db_queries


class Finalizing(Protocol):
    """What finalize needs of the executor driving it (jobs.executor.LocalDockerExecutor)."""

    config: Config
    conn: sqlite3.Connection
    progress: tarstream.Progress
    resource_usage: dict[str, dict[str, Any]]


log = logging.getLogger(__name__)

# Environment variables whose values may appear in metadata.json; every other value is redacted
# (database URLs, licences and keys must never reach a file researchers can read).
SAFE_ENVIRONMENT_VARIABLES = frozenset(
    """
    PATH PYTHON_VERSION DEBIAN_FRONTEND DEBCONF_NONINTERACTIVE_SEEN UBUNTU_VERSION PYENV_SHELL
    PYENV_VERSION PYTHONUNBUFFERED OPENSAFELY_BACKEND TZ TEMP_DATABASE_NAME PYTHONPATH container
    LANG LC_ALL
""".split()
)
REDACTED = "xxxx-REDACTED-xxxx"
TRAILER_KEYS = (
    "state",
    "commit",
    "docker_image_id",
    "action_repo_url",
    "action_commit",
    "job_id",
    "run_by_user",
    "created_at",
    "completed_at",
    "exit_code",
)
OOM_EXIT_CODE = 137


def redact_environment(info: dict[str, Any]) -> dict[str, Any]:
    """A copy of `docker inspect` output with unsafe environment values replaced."""
    info = copy.deepcopy(info)
    env = (info.get("Config") or {}).get("Env") or []
    redacted = []
    for item in env:
        name, _, value = item.partition("=")
        redacted.append(
            f"{name}={value}" if name in SAFE_ENVIRONMENT_VARIABLES else f"{name}={REDACTED}"
        )
    if info.get("Config"):
        info["Config"]["Env"] = redacted
    return info


def decide(
    job: Job,
    exit_code: int,
    oom_killed: bool,
    matched: dict[str, str],
    unmatched_patterns: list[str],
    unmatched_files: list[str] | None,
    image_id: str | None,
    completed_at: int,
    job_error: str | None = None,
) -> FinalResult:
    """The job's outcome from its exit code and the outputs found (docs/reference.md#finalize).

    `job_error` says why some matched outputs cannot be copied (unsafe names, a clash with the
    workspace): the job then fails with that message rather than succeeding without them.
    """

    def result(state: State, code: StatusCode, message: str) -> FinalResult:
        return FinalResult(
            state,
            code,
            message,
            completed_at=completed_at,
            exit_code=exit_code,
            image_id=image_id,
            outputs=matched,
            unmatched_outputs=unmatched_files,
        )

    if job.cancelled:
        return result(State.FAILED, StatusCode.CANCELLED_BY_USER, Msg.CANCELLED)
    if exit_code != 0:
        message = f"Job exited with error code {exit_code}"
        if exit_code == OOM_EXIT_CODE or oom_killed:
            message += ": likely means it ran out of memory"
        return result(State.FAILED, StatusCode.NONZERO_EXIT, message)
    if job_error:
        return result(State.FAILED, StatusCode.JOB_ERROR, job_error)
    if unmatched_patterns:
        message = "\n".join([Msg.UNMATCHED, *(f" - {p}" for p in unmatched_patterns)])
        return result(State.FAILED, StatusCode.UNMATCHED_PATTERNS, message)
    return result(State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)


def refused_message(refused: list[str]) -> str:
    """`JobError: ...` naming (escaped, at most five) outputs whose names cannot be copied."""
    shown = ", ".join(outputs.printable(path) for path in refused[:5])
    more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
    return f"JobError: Output file names must be UTF-8 without control characters: {shown}{more}"


def job_metadata(
    job: Job, original: dict[str, Any] | None, info: dict[str, Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """metadata.json: every job column (timestamps ISO, enums as values) plus what Docker told us."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if f.name.endswith("_at") and value is not None:
            value = iso(value)
        data[f.name] = getattr(value, "value", value)
    data["job_request"] = original
    data["job_id"] = job.id
    data["run_by_user"] = job.run_by_user or (original or {}).get("created_by")
    data["docker_image_id"] = info.get("Image")
    data["exit_code"] = job.exit_code
    data["container_metadata"] = info
    data["resource_usage"] = usage or {
        "peak_memory_bytes": None,
        "cpu_time_seconds": None,
        "samples": 0,
    }
    return data


def trailer(metadata: dict[str, Any]) -> str:
    """The summary appended to logs.txt (docs/reference.md#finalize), exit code included even when 0."""
    lines = [
        f"{key}: {metadata[key]}"
        for key in TRAILER_KEYS
        if metadata.get(key) is not None and metadata.get(key) != ""
    ]
    text = "\n".join(lines) + f"\n\n{metadata['status_message']}\n"
    if metadata.get("unmatched_outputs"):
        text += "\nDid you mean to match one of these files instead?\n"
        text += "".join(f" - {path}\n" for path in metadata["unmatched_outputs"])
    if metadata.get("output_notes"):
        # Matched files that are not this job's outputs, and levels raised (outputs.Claim).
        text += "\nNot copied as this action's outputs, or kept highly_sensitive:\n"
        text += "".join(f" - {note}\n" for note in metadata["output_notes"])
    text += "\noutputs:\n"
    rows = sorted((metadata.get("outputs") or {}).items())
    if not rows:
        return text + "  (no outputs)\n"
    width = max(len(path) for path, _ in rows)
    return text + "".join(f"  {path:<{width}}  - {level}\n" for path, level in rows)


def _candidates(job: Job, files: list[tarstream.VolumeFile]) -> tuple[list[str], list[str]]:
    """(paths the job may have written under acceptable names, paths whose names are refused)."""
    candidates, unsafe = [], []
    for f in files:
        if f.path == outputs.MARKER:
            continue
        problem = outputs.name_problem(f.path)
        if problem:
            log.warning(f"Not copying {outputs.printable(f.path)}: {problem}", extra={"job": job})
            unsafe.append(f.path)
        else:
            candidates.append(f.path)
    return candidates, unsafe


def _inputs(executor: Finalizing, job: Job) -> dict[str, str]:
    """The inputs copied into the job's volume, as recorded before the copy (path -> action).

    A job prepared by a jr older than the record gets them from the needed actions' latest
    successful jobs, as prepare took them.
    """
    if job.input_files is not None:
        return dict(job.input_files)
    found: dict[str, str] = {}
    for action in job.requires_outputs_from:
        producer = db_queries.latest_succeeded_job(executor.conn, job.workspace, action)
        found.update({path: action for path in (producer.outputs or {})} if producer else {})
    return found


def finalize_job(executor: Finalizing, job: Job, outcome: Outcome) -> Job:
    """Inspect, claim and stage outputs, then (holding the workspace lock) decide, write logs.txt
    and metadata.json, place the staged files, write the action logs, save the outcome and delete
    obsolete outputs. Returns the job as saved.

    A kill or crash at any point leaves whole files only: outputs and logs are staged first, and
    the action logs are written just before the save, under the lock jr-kill takes to rewrite
    them, so they never contradict the state the store holds.
    """
    config = executor.config
    info = docker.inspect_container(docker.container_name(job.id))
    if info is None:
        raise JobError("Job container has vanished")
    info = redact_environment(info)
    oom = bool(info["State"].get("OOMKilled"))
    exit_code, image_id = int(info["State"]["ExitCode"]), info.get("Image")
    if job.cancelled:  # a cancelled job's files are never looked at (docs/reference.md#finalize)
        result = decide(job, exit_code, oom, {}, [], None, image_id, now())
        _write_logs(executor, job, result, info)
        return outcome.save(result)

    staging = workspaces.Staging(config, job.id)
    staging.discard()  # what an interrupted attempt staged is redone from the volume
    high, medium = workspaces.high(config, job.workspace), workspaces.medium(config, job.workspace)
    try:
        files = volumes.output_files(config, job)
        marker = next((f for f in files if f.path == outputs.MARKER), None)
        candidates, unsafe = _candidates(job, files)
        inputs = _inputs(executor, job)
        claim = outputs.claim_outputs(
            job.action,
            job.output_spec,
            candidates,
            inputs,
            workspaces.neighbours(executor.conn, job),
        )
        # Where each output goes, found before copying: a clash with what the workspace holds
        # fails the job (and skips that file) instead of surfacing half-way through the copies.
        clashes: list[str] = []
        staged: dict[str, list[Path]] = {}
        checked: set[str] = set()
        to_medium = set(outputs.medium_privacy_files(claim.outputs))
        for path in sorted(claim.outputs):
            try:
                workspaces.workspace_path(high, path, checked)
                staged[path] = [staging.path("high", path)]
                if path in to_medium:
                    workspaces.workspace_path(medium, path, checked)
                    staged[path].append(staging.path("medium", path))
            except JobError as exc:
                log.warning(str(exc), extra={"job": job})
                clashes.append(f"JobError: {exc}")
                staged.pop(path, None)
        # The long part, before the lock: every file copied out of the volume into staging.
        volumes.copy_outputs(
            config,
            job,
            files,
            staged,
            progress=executor.progress,
            starting=lambda path: log.info(f"Extracting output file: {path}", extra={"job": job}),
        )
        faults.pause("staged")
        with workspaces.locked(config, job.workspace):
            job = outcome.current()  # killed meanwhile: nothing is placed
            # Claimed again against the workspace as it is now: another action's job may have
            # finished meanwhile. Only what was staged can be placed.
            ws = workspaces.neighbours(executor.conn, job)
            kept = [p for p in candidates if p in staged or p not in claim.outputs]
            claim = outputs.claim_outputs(job.action, job.output_spec, kept, inputs, ws)
            for path in [p for p in claim.outputs if p not in staged]:
                claim.left_out[path] = "it was another action's output when the copy began"
                del claim.outputs[path]
            for note in claim.notes():
                log.info(note, extra={"job": job})
            unmatched = None
            own_names = set(candidates)
            if claim.unmatched_patterns:
                # Files the job wrote (newer than the marker) that no pattern matched: usually a
                # typo. Inputs, jr's files and other actions' files are not the job's own.
                unmatched = outputs.unmatched_files(
                    [
                        f.path
                        for f in files
                        if f.path in own_names
                        and (marker is None or f.mtime >= marker.mtime)
                        and f.path not in claim.left_out
                        and f.path not in inputs
                        and not outputs.is_jr_file(f.path)
                    ],
                    claim.outputs,
                )
            refused = sorted(outputs.match_outputs(job.output_spec, unsafe)[0])
            result = decide(
                job,
                exit_code,
                oom,
                claim.outputs,
                claim.unmatched_patterns,
                unmatched,
                image_id,
                now(),
                refused_message(refused) if refused else (clashes[0] if clashes else None),
            )
            logs_txt = _write_logs(executor, job, result, info, claim.notes())
            workspaces.place_outputs(job, staging, claim.outputs, high, medium)
            workspaces.purge_medium(job, medium, claim.outputs, ws)
            faults.pause("placed")
            workspaces.write_action_logs(config, job, logs_txt, staging)
            faults.pause("logged")
            final = outcome.save(result)
            if final.state is State.SUCCEEDED:
                previous = db_queries.latest_succeeded_job(
                    executor.conn, job.workspace, job.action, exclude_id=job.id
                )
                workspaces.delete_obsolete(final, previous, ws, high, medium)
            return final
    finally:
        staging.discard()


def _write_logs(
    executor: Finalizing,
    job: Job,
    result: FinalResult,
    info: dict[str, Any],
    notes: list[str] | None = None,
) -> Path:
    """logs.txt and metadata.json of the job as the result leaves it; logs.txt's path."""
    final = apply_result(job, result)
    metadata = job_metadata(
        final,
        db_queries.original_request(executor.conn, job.job_request_id),
        info,
        executor.resource_usage.get(job.id),
    )
    if notes:
        metadata["output_notes"] = notes
    return write_job_logs(executor.config.high_privacy_storage_base, final, metadata)


def write_job_logs(high_privacy_base: Path, job: Job, metadata: dict[str, Any]) -> Path:
    """Write logs.txt (container output, then the trailer) and metadata.json; return logs.txt."""
    directory = workspaces.log_dir(high_privacy_base, job.id, job.completed_at or now())
    directory.mkdir(parents=True, exist_ok=True)
    logs_txt = directory / "logs.txt"
    tmp = directory / f".jr-tmp-logs.txt.{os.getpid()}"
    from jobrunner_lib.core import joblog

    # The limit the container was made with, which its Docker log was bounded to keep.
    limit = joblog.container_limit(metadata.get("container_metadata"))
    try:
        with open(tmp, "w+b") as out:  # read too: only the end is kept, compacted in place
            chunks = docker.container_logs(docker.container_name(job.id), timestamps=True)
            kept = joblog.write_capped(chunks, out, limit)
            out.write(b"\n" if kept.ends_line else b"\n\n")  # then one blank line
            out.write(trailer(metadata).encode())
        if kept.cut:
            log.info(
                f"Job log cut to its last {kept.kept_bytes} of at least {kept.total_bytes} bytes "
                f"(JOB_LOG_LIMIT={limit})",
                extra={"job": job},
            )
        os.replace(tmp, logs_txt)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    extract.atomic_write(directory / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    return logs_txt
