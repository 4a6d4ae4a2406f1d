"""How a job is run: the Executor interface and its local Docker implementation.

The worker drives a job through prepare -> execute -> finalize -> cleanup and re-derives where it
is from `status()` alone, so an executor for another platform (a cluster) can be added without
touching the run loop. Every step may be repeated after a crash: prepare starts from a fresh
volume, execute tolerates a started container, finalize rewrites the same files.
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from jobrunner_lib.core import outputs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobError
from jobrunner_lib.core.models import Job, Outcome
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract, hostfs, tarstream, volumes
from jobrunner_lib.docker import files as docker_files
from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.git import runner as git
from jobrunner_lib.jobs import workspaces
from jobrunner_lib.jobs.finalize import finalize_job
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)


class ExecutorState(str, Enum):
    """Where a job is, as far as the executor can tell."""

    UNKNOWN = "unknown"  # nothing usable exists: prepare from scratch
    PREPARED = "prepared"  # volume filled, container created but not started
    EXECUTING = "executing"
    EXECUTED = "executed"  # container stopped: finalize
    ERROR = "error"  # the executor's objects are in a state it cannot use


class Executor(ABC):
    """The steps of running one job somewhere; each must be safe to repeat."""

    @abstractmethod
    def prepare(self, job: Job) -> None:
        """Get code and inputs in place and the job ready to start (JobError if it cannot be)."""

    @abstractmethod
    def execute(self, job: Job) -> None:
        """Start the prepared job."""

    @abstractmethod
    def status(self, job: Job) -> ExecutorState:
        """Where the job is, from the platform alone."""

    @abstractmethod
    def finalize(self, job: Job, outcome: Outcome) -> Job:
        """Decide the outcome, write logs, metadata and outputs, and save it through outcome."""

    @abstractmethod
    def cleanup(self, job: Job) -> None:
        """Remove everything the job left on the platform."""

    @abstractmethod
    def kill(self, job: Job) -> None:
        """Stop a running job (cancellation); it then finalizes as usual."""

    def wait(self, job: Job, timeout: float) -> bool:
        """Wait up to timeout seconds for the job to stop running; True once it has."""
        time.sleep(timeout)
        return self.status(job) is not ExecutorState.EXECUTING


def parse_run_command(run_command: str) -> tuple[str, list[str]]:
    """`python:v1 analysis/x.sh a b` -> ("python:v1", ["analysis/x.sh", "a", "b"])."""
    parts = shlex.split(run_command)
    if not parts:
        raise JobError("Job has no command to run")
    return parts[0], parts[1:]


def job_user_ids(job_user: str | None) -> tuple[int | None, int | None]:
    """Numeric uid and gid to own the volume's files, or (None, None) to make them world-writable."""
    if not job_user:
        return None, None
    uid, _, gid = job_user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        return None, None
    return int(uid), int(gid or uid)


def job_environment(config: Config, job: Job, image: str) -> dict[str, str]:
    """The job's environment (docs/reference.md#what-jobs-receive): secrets only where the job needs them."""
    env = {"OPENSAFELY_BACKEND": config.backend}
    if job.requires_db and not config.using_dummy_data_backend:
        url = config.database_urls.get((job.database_name or "").lower())
        if not url:
            raise JobError(f"Database {job.database_name} is not configured on this backend")
        env["DATABASE_URL"] = url
        optional = {
            "TEMP_DATABASE_NAME": config.temp_database_name,
            "EMIS_ORGANISATION_HASH": config.emis_organisation_hash,
        }
        env.update({k: v for k, v in optional.items() if v})
        if config.presto_tls_cert and config.presto_tls_key:
            env.update(PRESTO_TLS_CERT=config.presto_tls_cert, PRESTO_TLS_KEY=config.presto_tls_key)
    if image.startswith("stata-mp") and config.stata_license:
        env["STATA_LICENSE"] = config.stata_license  # never the string "None" when unset
    return env


def job_network(config: Config, job: Job) -> str:
    """No network at all, except for database jobs on a real-data backend."""
    if job.requires_db and not config.using_dummy_data_backend:
        # DATABASE_NETWORK is the operator's network that reaches only the database; without it
        # the job gets Docker's default bridge, as the old backend did.
        return config.database_network or "bridge"
    return "none"


def remove_stale_temps(files: Iterable[Path]) -> list[Path]:
    """Remove the temporary files that writers no longer running left beside these files.

    Each file is written as `.jr-tmp-<name>.<pid>[.<thread>]` (extract.temp_path) and renamed
    into place. A worker killed part-way through a copy leaves its temporary file (up to the whole
    size of the output) and the next attempt writes under its own pid, so without this they pile
    up in the workspaces. A temporary file whose pid runs is left alone: it may be in use.
    """
    from jobrunner_lib.jobs.processes import worker_alive

    stems: dict[Path, set[str]] = {}
    for path in files:
        # The temporary name without its ".<pid>.<thread>" (finalize's logs.txt has no thread).
        stems.setdefault(path.parent, set()).add(extract.temp_path(path).name.rsplit(".", 2)[0])
    removed = []
    for directory, names in stems.items():
        try:
            entries = [e for e in os.scandir(directory) if e.name.startswith(".jr-tmp-")]
        except OSError:
            continue  # no such directory: nothing was written there
        for entry in entries:
            parts = entry.name.split(".")
            for ids in (parts[-2:], parts[-1:]):
                stem = entry.name[: -len(".".join(ids)) - 1]
                if stem in names and all(i.isdigit() for i in ids):
                    break
            else:
                continue
            if worker_alive(int(ids[0]), None) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def input_files(config: Config, conn: sqlite3.Connection, job: Job) -> dict[str, str]:
    """path -> action for every output of every needed action (its latest successful job's):
    what prepare copies into the volume (checking each file is there), recorded in the job
    before the copy. JobError if a needed action has no successful run."""
    files: dict[str, str] = {}
    for action in job.requires_outputs_from:
        producer = db_queries.latest_succeeded_job(conn, job.workspace, action)
        if producer is None:
            raise JobError(
                f"No successful run of action {action} in workspace {job.workspace} "
                "to take inputs from"
            )
        files.update({path: action for path in sorted(producer.outputs or {})})
    return files


class LocalDockerExecutor(Executor):
    """Runs each job in a locked-down container on the local Docker engine."""

    def __init__(
        self, config: Config, conn: sqlite3.Connection, progress: tarstream.Progress | None = None
    ):
        self.config = config
        self.conn = conn
        self.progress = progress or tarstream.Progress()
        # Filled by the worker from its stats sampler, read by finalize for metadata.json.
        self.resource_usage: dict[str, dict[str, Any]] = {}

    def status(self, job: Job) -> ExecutorState:
        """From the job container: none -> unknown, created -> prepared, then executing/executed."""
        info = docker.inspect_container(docker.container_name(job.id))
        if info is None:
            return ExecutorState.UNKNOWN
        state = info["State"]["Status"]
        if state == "created":
            return ExecutorState.PREPARED
        if state in ("running", "paused", "restarting"):
            return ExecutorState.EXECUTING
        if state == "exited":
            return ExecutorState.EXECUTED
        return ExecutorState.ERROR  # dead or being removed

    def prepare(self, job: Job) -> None:
        """Fresh volume with code, inputs and the marker; then create (not start) the container."""
        image, args = parse_run_command(job.run_command)
        full_image = self.config.image_name(image)
        # Checked first, so a missing image fails the job before any copying.
        if not docker.image_exists(full_image):
            log.info(
                f"Image not found, may need to run: docker pull {full_image}", extra={"job": job}
            )
            raise JobError(f"Docker image {image} is not currently available")
        environment = job_environment(self.config, job, image)
        inputs = self._input_files(job)

        # Whatever an interrupted attempt left behind is half-filled: start again from nothing.
        volumes.reset(self.config, job.id)
        host_root = volumes.create(self.config, job.id)

        repo_url = job.action_repo_url or job.repo_url
        commit = job.action_commit or job.commit or ""
        try:
            repo_dir = git_repos.ensure_commit(
                repo_url,
                commit,
                repos_dir=self.config.repos_dir,
                access=git_repos.Access.for_repo(self.config, repo_url),
            )
            code = git_repos.archive(repo_dir, commit)
        except git.GitError as exc:
            raise JobError(str(exc)) from exc
        marked = time.time()  # see _volume_tar
        try:
            if host_root:
                # The code first, then the inputs file to file in the kernel (a copy through a
                # tar stream costs two more passes over the data), then the marker.
                owner = volumes.host_owner(*job_user_ids(self.config.job_user))
                code_only = self._volume_tar(
                    job, repo_url, commit, code, {}, marked, owner, marker=False
                )
                hostfs.extract_on_host(host_root, code_only, owner, self.progress)
                for path, (action, source) in inputs.items():
                    log.info(f"Copying input file {action}: {path}", extra={"job": job})
                    hostfs.copy_into_host(host_root, path, source, owner, self.progress)
                hostfs.extract_on_host(
                    host_root, self._marker_tar(owner, marked), owner, self.progress
                )
            else:
                helper = docker_files.create_helper(self.config, job.id)
                docker_files.put_archive(
                    helper,
                    "/",
                    self._volume_tar(job, repo_url, commit, code, inputs, marked),
                    progress=self.progress,
                    stall_timeout=self.config.copy_stall_timeout,
                    what=f"copy of code and inputs into {helper}",
                )
        finally:
            # After an abandoned copy the stalled thread may still be reading: leave it the stream.
            if not self.progress.abandoned.is_set():
                code.close()

        docker.create_job_container(
            self.config,
            job.id,
            full_image,
            args,
            environment=environment,
            network=job_network(self.config, job),
            container_labels=docker.labels(
                self.config.backend, job.id, workspace=job.workspace, action=job.action
            ),
        )

    def _input_files(self, job: Job) -> dict[str, tuple[str, Path]]:
        """path -> (action, file) for the inputs recorded in the job (JobError if one is missing);
        taken from the workspace now for a job that has none recorded."""
        recorded = job.input_files
        if recorded is None:
            recorded = input_files(self.config, self.conn, job)
        workspace = workspaces.high(self.config, job.workspace)
        files: dict[str, tuple[str, Path]] = {}
        for path, action in sorted(recorded.items()):
            source = workspace / path
            if (
                not outputs.is_safe_relative_path(path)
                or not source.is_file()
                or source.is_symlink()
            ):
                raise JobError(
                    f"The file {path} doesn't exist in workspace {job.workspace} "
                    f"as requested for job {job.id}"
                )
            files[path] = (action, source)
        return files

    def _volume_tar(
        self,
        job: Job,
        repo_url: str,
        commit: str,
        code: Any,
        inputs: dict[str, tuple[str, Path]],
        marked: float,
        owner: hostfs.Owner | None = None,
        *,
        marker: bool = True,
    ) -> Iterator[bytes]:
        """One tar stream, extracted at `/`: the volume root, code, inputs, then the marker
        (unless not marker: then the archive ends after the inputs; see _marker_tar).

        Owned by the job user (JOB_USER), or by `owner` when given (None: writable by all).
        """
        uid, gid = owner or job_user_ids(self.config.job_user)
        root = docker.WORKSPACE.strip("/")
        # The root entry hands the volume's top directory to the job user (extracting "." does not).
        yield tarstream.dir_entry(root, uid=uid, gid=gid)
        log.info(f"Copying in code from {repo_url}@{commit}", extra={"job": job})
        # The marker's time dates the files the job writes (the "did you mean" hint): the code
        # must look older than it, even when committed this very second.
        yield from tarstream.rewrite_tar(
            code, prefix=root, uid=uid, gid=gid, progress=self.progress, not_after=marked - 2
        )
        made: set[str] = set()
        for path, (action, source) in inputs.items():
            log.info(f"Copying input file {action}: {path}", extra={"job": job})
            parts = path.split("/")[:-1]
            for depth in range(
                1, len(parts) + 1
            ):  # a tar may create the parents docker cp could not
                parent = "/".join(parts[:depth])
                if parent not in made:
                    made.add(parent)
                    yield tarstream.dir_entry(f"{root}/{parent}", uid=uid, gid=gid)
            yield from tarstream.file_entry(
                source, f"{root}/{path}", uid=uid, gid=gid, progress=self.progress
            )
        if marker:
            yield from self._marker_tar((uid, gid), marked)
        else:
            yield tarstream.end_of_archive()

    @staticmethod
    def _marker_tar(owner: hostfs.Owner, marked: float) -> Iterator[bytes]:
        """The marker and the archive's end. Last, so its presence means everything before it
        arrived; its mtime dates the files the job writes."""
        uid, gid = owner
        root = docker.WORKSPACE.strip("/")
        yield tarstream.bytes_entry(
            f"{root}/{docker.MARKER}", b"jr\n", uid=uid, gid=gid, mtime=marked
        )
        yield tarstream.end_of_archive()

    def execute(self, job: Job) -> None:
        """Start the container created by prepare."""
        name = docker.container_name(job.id)
        docker.start_container(name)
        log.info("Started", extra={"job": job})
        log.info(f"View live logs using: docker logs -f {name}", extra={"job": job})

    def wait(self, job: Job, timeout: float) -> bool:
        """Block on the container (its exit is noticed at once, not on the next poll)."""
        return docker.wait_container(docker.container_name(job.id), timeout) is not None

    def kill(self, job: Job) -> None:
        """Kill the job's container (its logs stay for finalize)."""
        docker.kill_container(docker.container_name(job.id))

    def finalize(self, job: Job, outcome: Outcome) -> Job:
        """See finalize.finalize_job; then remove what an interrupted earlier finalize left."""
        final = finalize_job(self, job, outcome)
        logs = workspaces.log_dir(
            self.config.high_privacy_storage_base, job.id, final.completed_at or 0
        )
        for stale in remove_stale_temps([logs / "logs.txt", logs / "metadata.json"]):
            # Tagged with the final job: the store already says how it ended.
            log.info(f"Removed {stale}, left by an interrupted copy", extra={"job": final})
        return final

    def cleanup(self, job: Job) -> None:
        """Remove the job container, the helper, the volume and anything left staged."""
        log.info("Cleaning up container and volume", extra={"job": job})
        docker.remove_container(docker.container_name(job.id))
        docker.remove_container(docker.helper_name(job.id))
        volumes.remove(self.config, job.id)
        workspaces.discard_staging(self.config, job.id)
