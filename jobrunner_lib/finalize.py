"""Finalizing a job (SPEC.md §6.6-6.7): decide the outcome, write its log and metadata, copy outputs.

Safe to repeat: every file is written under a temporary name and renamed into place, so a second
run (after a crash, or through jr-retry) just rewrites the same files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import docker, extract, outputs, tarstream, volumes
from .docker import JobError
from .models import Job, Msg, State, StatusCode, iso, now

if TYPE_CHECKING:
    from .executor import FinalResult, LocalDockerExecutor

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


def log_dir(high_privacy_base: Path, job_id: str, completed_at: int) -> Path:
    """`$HIGH/logs/YYYY-MM/os-job-<id>/`.

    YYYY-MM is the UTC month of completion, not the host's local date as in the old backend:
    every tool and host then agrees on it from `completed_at` alone, whatever its timezone.
    """
    month = time.strftime("%Y-%m", time.gmtime(completed_at))
    return high_privacy_base / "logs" / month / docker.container_name(job_id)


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
    """The job's outcome from its exit code and the outputs found (SPEC.md §6.6 step 3).

    `job_error` says why some matched outputs cannot be copied (unsafe names, a clash with the
    workspace): the job then fails with that message rather than succeeding without them.
    """
    from .executor import FinalResult

    common = dict(
        completed_at=completed_at,
        exit_code=exit_code,
        image_id=image_id,
        outputs=matched,
        unmatched_outputs=unmatched_files,
    )
    if job.cancelled:
        return FinalResult(State.FAILED, StatusCode.CANCELLED_BY_USER, Msg.CANCELLED, **common)
    if exit_code != 0:
        message = f"Job exited with error code {exit_code}"
        if exit_code == OOM_EXIT_CODE or oom_killed:
            message += ": likely means it ran out of memory"
        return FinalResult(State.FAILED, StatusCode.NONZERO_EXIT, message, **common)
    if job_error:
        return FinalResult(State.FAILED, StatusCode.JOB_ERROR, job_error, **common)
    if unmatched_patterns:
        message = "\n".join([Msg.UNMATCHED, *(f" - {p}" for p in unmatched_patterns)])
        return FinalResult(State.FAILED, StatusCode.UNMATCHED_PATTERNS, message, **common)
    return FinalResult(State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED, **common)


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
    """The summary appended to logs.txt (SPEC.md §6.7), exit code included even when 0."""
    lines = [
        f"{key}: {metadata[key]}"
        for key in TRAILER_KEYS
        if metadata.get(key) is not None and metadata.get(key) != ""
    ]
    text = "\n".join(lines) + f"\n\n{metadata['status_message']}\n"
    if metadata.get("unmatched_outputs"):
        text += "\nDid you mean to match one of these files instead?\n"
        text += "".join(f" - {path}\n" for path in metadata["unmatched_outputs"])
    text += "\noutputs:\n"
    rows = sorted((metadata.get("outputs") or {}).items())
    if not rows:
        return text + "  (no outputs)\n"
    width = max(len(path) for path, _ in rows)
    return text + "".join(f"  {path:<{width}}  - {level}\n" for path, level in rows)


def workspace_path(root: Path, rel: str, checked: set[str] | None = None) -> Path:
    """root/rel, refusing paths that could leave the workspace (a job's file names are untrusted).

    A file where rel needs a directory (or a directory where it needs a file), left by another
    action's outputs, is a JobError naming both: the job cannot be finalized into that workspace.
    `checked` remembers parent directories already checked, for callers placing many files.
    """
    if not outputs.is_safe_relative_path(rel):
        raise RuntimeError(f"refusing unsafe output path {rel!r}")
    parts = rel.split("/")
    parent = os.path.join(root, *parts[:-1])
    if checked is None or parent not in checked:
        current = root
        for depth, part in enumerate(parts[:-1], start=1):
            current = current / part
            if current.is_symlink():
                raise RuntimeError(f"refusing to write {rel!r}: {current} is a symlink")
            if current.exists() and not current.is_dir():
                where = "/".join(parts[:depth])
                raise JobError(f"Cannot write output {rel}: {where} is a file in the workspace")
        if checked is not None:
            checked.add(parent)
    dest = root.joinpath(*parts)
    if dest.is_dir() and not dest.is_symlink():
        raise JobError(f"Cannot write output {rel}: it is a directory in the workspace")
    return dest


def finalize_job(executor: LocalDockerExecutor, job: Job) -> FinalResult:
    """Inspect, list and match outputs, decide, write logs.txt + metadata.json, copy outputs out."""
    from .executor import apply_result, latest_succeeded_job

    config = executor.config
    info = docker.inspect_container(docker.container_name(job.id))
    if info is None:
        raise JobError("Job container has vanished")
    info = redact_environment(info)
    exit_code = int(info["State"]["ExitCode"])
    image_id = info.get("Image")

    matched: dict[str, str] = {}
    unmatched_patterns: list[str] = []
    unmatched: list[str] | None = None
    refused: list[str] = []
    clashes: list[str] = []
    files: list[tarstream.VolumeFile] = []
    destinations: dict[str, list[Path]] = {}
    high, medium = executor.high_workspace(job.workspace), executor.medium_workspace(job.workspace)
    if not job.cancelled:  # a cancelled job's files are never looked at
        files = volumes.output_files(config, job)
        marker = next((f for f in files if f.path == docker.MARKER), None)
        candidates = []
        unsafe = []
        for f in files:
            if f.path == docker.MARKER:
                continue
            problem = outputs.name_problem(f.path)
            if problem:
                log.warning(
                    f"Not copying {outputs.printable(f.path)}: {problem}", extra={"job": job}
                )
                unsafe.append(f.path)
                continue
            candidates.append(f)
        matched, unmatched_patterns = outputs.match_outputs(
            job.output_spec, [f.path for f in candidates]
        )
        matched = dict(matched)
        refused = sorted(outputs.match_outputs(job.output_spec, unsafe)[0])
        # Where each output goes, found before deciding: a clash with what the workspace holds
        # fails the job (and skips that file) instead of surfacing half-way through the copies.
        # Medium-privacy copies are written from the same read as the high-privacy ones.
        checked: set[str] = set()
        to_medium = set(outputs.medium_privacy_files(matched))
        for path in sorted(matched):
            try:
                destinations[path] = [workspace_path(high, path, checked)]
                if path in to_medium:
                    destinations[path].append(workspace_path(medium, path, checked))
            except JobError as exc:
                log.warning(str(exc), extra={"job": job})
                clashes.append(f"JobError: {exc}")
                destinations.pop(path, None)
                del matched[path]
        if unmatched_patterns:
            # Files the job wrote (newer than the marker) that no pattern matched: usually a typo.
            # Inputs copied in are not the job's own files, whatever their mtime says.
            inputs = set()
            for action in job.requires_outputs_from:
                producer = latest_succeeded_job(executor.conn, job.workspace, action)
                inputs.update((producer.outputs or {}) if producer else {})
            new = [
                f.path
                for f in candidates
                if (marker is None or f.mtime >= marker.mtime) and f.path not in inputs
            ]
            unmatched = list(outputs.unmatched_files(new, matched))

    result = decide(
        job,
        exit_code,
        bool(info["State"].get("OOMKilled")),
        matched,
        unmatched_patterns,
        unmatched,
        image_id,
        now(),
        refused_message(refused) if refused else (clashes[0] if clashes else None),
    )
    final = apply_result(job, result)
    metadata = job_metadata(
        final, _original_request(executor, job), info, executor.resource_usage.get(job.id)
    )
    logs_txt = write_job_logs(config.high_privacy_storage_base, final, metadata)
    if job.cancelled:
        return result  # SPEC.md §2.1: only the log and metadata; workspaces untouched

    action_log = workspace_path(high, f"metadata/{job.action}.log")
    extract.atomic_copy(logs_txt, action_log)
    log.info(f"Logs written to: {action_log}", extra={"job": job})
    extract.atomic_copy(logs_txt, workspace_path(medium, f"metadata/{job.action}.log"))

    # Host files, or few Docker calls however many files (volumes.py, copyout.py); each file is
    # still written through a temporary name and renamed into place, and only regular files are
    # ever written.
    volumes.copy_outputs(
        config,
        job,
        files,
        destinations,
        progress=executor.progress,
        starting=lambda path: log.info(f"Extracting output file: {path}", extra={"job": job}),
    )
    # A path now declared more sensitive than before must not keep its old medium-privacy copy.
    medium_checked: set[str] = set()
    for path, targets in destinations.items():
        if len(targets) > 1:
            continue
        try:
            stale = workspace_path(medium, path, medium_checked)
            if stale.is_file() or stale.is_symlink():
                log.info(f"Deleting medium privacy copy of {path}", extra={"job": job})
                stale.unlink()
        except (JobError, OSError) as exc:  # not a file there: nothing of this path to remove
            log.warning(f"Could not check {path} in the medium tree: {exc}", extra={"job": job})
    # The rump manifest, still read by the release tooling.
    manifest = json.dumps({"repo": job.repo_url, "workspace": job.workspace}, indent=2)
    extract.atomic_write(workspace_path(medium, "metadata/manifest.json"), manifest)

    if result.state is State.SUCCEEDED:
        # Only a success replaces the previous run's set of outputs; after a failure the old
        # run's files may still be what the workspace needs.
        previous = latest_succeeded_job(executor.conn, job.workspace, job.action, exclude_id=job.id)
        if previous is not None and previous.outputs:
            for path in sorted(outputs.obsolete_outputs(previous.outputs, matched)):
                log.info(f"Deleting obsolete output file: {path}", extra={"job": job})
                for root in (high, medium):
                    try:
                        workspace_path(root, path).unlink(missing_ok=True)
                    except (JobError, OSError) as exc:  # e.g. now a directory: leave it
                        log.warning(f"Could not delete {path}: {exc}", extra={"job": job})
    return result


def _original_request(executor: LocalDockerExecutor, job: Job) -> dict[str, Any] | None:
    row = executor.conn.execute(
        "SELECT original FROM job_request WHERE id = ?", (job.job_request_id,)
    ).fetchone()
    if not row or not row[0]:
        return None
    try:
        return json.loads(row[0])
    except ValueError:
        return None


def write_job_logs(high_privacy_base: Path, job: Job, metadata: dict[str, Any]) -> Path:
    """Write logs.txt (container output, then the trailer) and metadata.json; return logs.txt."""
    directory = log_dir(high_privacy_base, job.id, job.completed_at or now())
    directory.mkdir(parents=True, exist_ok=True)
    logs_txt = directory / "logs.txt"
    tmp = directory / f".jr-tmp-logs.txt.{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            last = b"\n"
            for chunk in docker.container_logs(docker.container_name(job.id), timestamps=True):
                if chunk:
                    out.write(chunk)
                    last = chunk[-1:]
            out.write(b"\n" if last == b"\n" else b"\n\n")  # then one blank line
            out.write(trailer(metadata).encode())
        os.replace(tmp, logs_txt)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    extract.atomic_write(directory / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    return logs_txt
