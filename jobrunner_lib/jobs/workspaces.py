"""Writing into the workspaces: staged, placed whole, one finalize at a time per workspace.

Everything finalize puts in a workspace (outputs, the action logs, the medium-privacy manifest)
is first written in full to a staging directory of the job, `<base>/.jr-staging/<job id>/`, on
the same file system as the tree (beside `workspaces/`, so no reader of a workspace sees it),
and only then renamed into place. A worker killed (or a job killed by jr-kill) part-way through
a copy therefore leaves no partial file in either tree, only a staging directory that the next
attempt, jr-kill and the job's cleanup remove.

The last part of finalize (deciding which files are the job's, placing them, writing the action
logs, saving the outcome, deleting obsolete outputs) holds the workspace's lock, so two actions
finishing at once in one workspace cannot both claim a path, and jr-kill's rewrite of the action
log comes after a worker's, never before it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobrunner_lib.core import outputs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobError
from jobrunner_lib.core.models import Job, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

STAGING = ".jr-staging"
# Longest wait for another finalize in the same workspace (its locked part is short).
LOCK_TIMEOUT = 600.0


def high(config: Config, workspace: str) -> Path:
    """`$HIGH/workspaces/<workspace>`."""
    return config.high_privacy_storage_base / "workspaces" / workspace


def medium(config: Config, workspace: str) -> Path:
    """`$MEDIUM/workspaces/<workspace>`."""
    return config.medium_privacy_storage_base / "workspaces" / workspace


def action_log(root: Path, action: str) -> Path:
    """`<workspace>/metadata/<action>.log`."""
    return workspace_path(root, f"{outputs.METADATA_DIR}/{action}.log")


def log_dir(high_privacy_base: Path, job_id: str, completed_at: int) -> Path:
    """`$HIGH/logs/YYYY-MM/os-job-<id>/`.

    YYYY-MM is the UTC month of completion, not the host's local date as in the old backend:
    every tool and host then agrees on it from `completed_at` alone, whatever its timezone.
    """
    month = time.strftime("%Y-%m", time.gmtime(completed_at))
    return high_privacy_base / "logs" / month / docker.container_name(job_id)


def lock_path(config: Config, workspace: str) -> Path:
    """The workspace's lock file (named by a digest: workspace names come from the website)."""
    digest = hashlib.sha256(workspace.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return config.workdir / "locks" / f"workspace-{digest}.lock"


@contextmanager
def locked(config: Config, workspace: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the workspace's lock (released by the OS if this process dies)."""
    import filelock

    path = lock_path(config, workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path), timeout=timeout):
        yield


class Staging:
    """A job's staging directories, one per privacy tree: files are written here, then placed."""

    def __init__(self, config: Config, job_id: str):
        self.roots = {
            "high": config.high_privacy_storage_base / STAGING / job_id,
            "medium": config.medium_privacy_storage_base / STAGING / job_id,
        }

    def path(self, tree: str, rel: str) -> Path:
        """Where rel of the given tree ("high" or "medium") is staged."""
        if not outputs.is_safe_relative_path(rel):
            raise RuntimeError(f"refusing unsafe output path {rel!r}")
        return self.roots[tree].joinpath(*rel.split("/"))

    def discard(self) -> list[Path]:
        """Remove both staging directories and what is in them; those that existed."""
        removed = []
        for root in self.roots.values():
            try:
                shutil.rmtree(root)
            except FileNotFoundError:
                continue
            removed.append(root)
        return removed


def discard_staging(config: Config, job_id: str) -> list[Path]:
    """Remove what an interrupted finalize of the job left staged (safe when there is none)."""
    return Staging(config, job_id).discard()


def place(staged: Path, dest: Path) -> None:
    """Move a staged file over dest (atomic); across file systems, copy it beside dest first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staged, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        extract.atomic_copy(staged, dest)  # a tree mounted apart from its base: still whole


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


def files_under(root: Path) -> list[str]:
    """Every regular file below root (not through links), relative, jr's own files left out."""
    found = []
    for directory, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "":
            dirs[:] = [d for d in dirs if d.casefold() != outputs.METADATA_DIR]
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if os.path.isfile(os.path.join(directory, name)) and not os.path.islink(
                os.path.join(directory, name)
            ):
                found.append(rel)
    return found


def delete(root: Path, rel: str) -> bool:
    """Delete the file rel under root if it is one; whether it was there."""
    try:
        path = workspace_path(root, rel)
    except (JobError, RuntimeError):
        return False
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    return False


def place_outputs(
    job: Job, staging: Staging, claimed: dict[str, str], high: Path, medium: Path
) -> None:
    """Rename the staged outputs into both trees; medium copies only for medium levels."""
    to_medium = set(outputs.medium_privacy_files(claimed))
    checked: set[str] = set()
    for path in sorted(claimed):
        place(staging.path("high", path), workspace_path(high, path, checked))
        if path in to_medium:
            dest = workspace_path(medium, path, checked)
            place(staging.path("medium", path), dest)
        elif delete(medium, path):
            # Now declared more sensitive than before: its old medium-privacy copy must go.
            log.info(f"Deleting medium privacy copy of {path}", extra={"job": job})


def neighbours(conn: sqlite3.Connection, job: Job) -> outputs.Workspace:
    """The rest of the job's workspace as the store has it now (outputs.neighbours)."""
    produced, declared = db_queries.workspace_outputs(conn, job.workspace, job.id)
    return outputs.neighbours(job.action, produced, declared)


def purge_declared_high(config: Config, job: Job) -> None:
    """At a job's start: its declarations are the workspace's newest, so medium copies of what it
    declares highly_sensitive go now, not only when (and if) it reaches finalize. Only its own
    declarations: every other action's were applied when its own jobs started and finished."""
    if not (job.output_spec.get(outputs.HIGH)) or not medium(config, job.workspace).is_dir():
        return
    with locked(config, job.workspace):
        purge_medium(job, medium(config, job.workspace), {}, outputs.Workspace())


def purge_medium(job: Job, medium: Path, claimed: dict[str, str], ws: outputs.Workspace) -> None:
    """Delete medium-privacy copies of paths that any action now declares highly_sensitive.

    Whoever wrote them: privacy only goes up. The high-privacy copy stays.
    """
    declares = bool(ws.high_paths or ws.high_patterns or job.output_spec.get(outputs.HIGH))
    if not declares or not medium.is_dir():
        return
    ours = set(outputs.medium_privacy_files(claimed))
    for path in files_under(medium):
        if path not in ours and outputs.declared_high(path, job.output_spec, ws):
            if delete(medium, path):
                log.info(
                    f"Deleting medium privacy copy of {path}: it is declared highly_sensitive",
                    extra={"job": job},
                )


def write_action_logs(
    config: Config, job: Job, logs_txt: Path, staging: Staging | None = None
) -> None:
    """metadata/<action>.log in both trees (a copy of logs.txt) and the medium-privacy rump
    manifest, still read by the release tooling: staged whole, then renamed into place."""
    staging = staging or Staging(config, job.id)
    manifest = json.dumps({"repo": job.repo_url, "workspace": job.workspace}, indent=2)
    for tree, root in (
        ("high", high(config, job.workspace)),
        ("medium", medium(config, job.workspace)),
    ):
        rel = f"{outputs.METADATA_DIR}/{job.action}.log"
        staged = staging.path(tree, rel)
        staged.parent.mkdir(parents=True, exist_ok=True)
        extract.atomic_copy(logs_txt, staged)
        place(staged, action_log(root, job.action))
        if tree == "high":
            log.info(f"Logs written to: {action_log(root, job.action)}", extra={"job": job})
        else:
            rel = f"{outputs.METADATA_DIR}/manifest.json"
            staged = staging.path(tree, rel)
            extract.atomic_write(staged, manifest)
            place(staged, workspace_path(root, rel))


def rewrite_action_logs(
    config: Config, job: Job, logs_txt: Path, was: StatusCode | None = None
) -> bool:
    """After jr-kill: make the action logs say what the store says, if they speak of this job.

    Called holding the workspace lock, once the job's worker is stopped. An action log naming
    this job (a worker killed between writing it and saving the outcome) or a job killed while
    finalizing (`was`, its step before the kill) gets the killed job's log; one about an earlier
    job is left alone. Whether it did.
    """
    path = action_log(high(config, job.workspace), job.action)
    mentions = _names_job(path, job.id)
    if not (mentions or was is StatusCode.FINALIZING):
        return False
    staging = Staging(config, job.id)
    try:
        write_action_logs(config, job, logs_txt, staging)
    finally:
        staging.discard()
    return True


def _names_job(path: Path, job_id: str) -> bool:
    """Whether an action log's trailer says it is job_id's (read from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            return f"\njob_id: {job_id}\n".encode() in f.read()
    except OSError:
        return False


def delete_obsolete(
    job: Job, previous: Job | None, ws: outputs.Workspace, high: Path, medium: Path
) -> None:
    """After a success: remove what this action's previous successful job produced and this run
    did not, unless another action owns it now; from the medium tree only where it was there."""
    if previous is None or not previous.outputs:
        return
    for path, in_medium in sorted(
        outputs.obsolete_outputs(previous.outputs, job.outputs or {}, ws).items()
    ):
        log.info(f"Deleting obsolete output file: {path}", extra={"job": job})
        for root in (high, medium) if in_medium else (high,):
            try:
                delete(root, path)
            except OSError as exc:  # e.g. now a directory: leave it
                log.warning(f"Could not delete {path}: {exc}", extra={"job": job})
