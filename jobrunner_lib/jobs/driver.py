"""A job's steps, driven in its worker: prepare, execute (wait, sample stats), finalize, cleanup.

The Driver re-derives where the job is from the executor each time round, so a worker killed at
any moment is simply started again, and turns each failure into the job's final state and message:
a JobError, a full disk (naming the disk), a hung copy, the Docker daemon restarting under the job.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from functools import partial

from jobrunner_lib.core import logs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobError
from jobrunner_lib.core.faults import fault
from jobrunner_lib.core.models import (
    FinalResult,
    Job,
    Msg,
    State,
    StatusCode,
    apply_result,
    iso,
    transition,
)
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker.engine import BrokenContainerError, DiskFull, DockerUnavailable
from jobrunner_lib.jobs import cleanup as cleanup_debt
from jobrunner_lib.jobs import stats, workspaces
from jobrunner_lib.jobs.executor import Executor, ExecutorState, LocalDockerExecutor, input_files
from jobrunner_lib.jobs.outage import DockerOutage, disk_name, full_disk_name, store_unusable
from jobrunner_lib.jobs.processes import process_info
from jobrunner_lib.pipeline.names import action_name_problem
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

# Longest wait on the container between looks at the job row (cancellation, jr-kill).
WAIT_SLICE = 2.0
DOCKER_RESTARTED = "the Docker daemon restarted while the job was running; please try again"
# Exit codes of a container stopped by a signal (SIGKILL, SIGTERM), as a stopping daemon does.
SIGNAL_EXIT_CODES = (137, 143)
# How long before a worker first found Docker gone a killed container may have stopped and still
# count as stopped by the daemon: the daemon closes its API first, then stops containers, so the
# container normally finishes after (or within a second of) the outage being noticed.
RESTART_WINDOW = 60.0
# How long a worker whose job has ended waits for Docker to come back to remove its objects.
CLEANUP_PATIENCE = 300.0
CLEANUP_RETRY_INTERVAL = 2.0


AroundFinal = Callable[[Callable[[], Job]], Job]


class DaemonRestarted(JobError):
    """The job's container was stopped by the Docker daemon shutting down (detail: why we think so)."""


def docker_time(text: str | None) -> float | None:
    """Docker's `2021-11-03T09:12:51.123456789Z` as Unix seconds; None for its zero time."""
    import calendar

    if not text or text.startswith("0001-"):
        return None
    whole, _, rest = text.partition(".")
    fraction = rest.rstrip("Z").split("+")[0].split("-")[0]
    try:
        seconds = calendar.timegm(time.strptime(whole.rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    return seconds + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)


class _NotOurs(Exception):
    """The job row moved on without us (killed by an operator, reset): stop touching it."""


class _Outcome:
    """The Driver's compare-and-set, as finalize sees it (models.Outcome)."""

    def __init__(self, driver: Driver):
        self.driver = driver

    def current(self) -> Job:
        """The job row now; _NotOurs if an operator killed or reset it meanwhile."""
        return self.driver.refresh()

    def save(self, result: FinalResult) -> Job:
        """Save and log the final state (through around_final, as every final state)."""
        return self.driver.save_final(lambda j: apply_result(j, result))


class Driver:
    """Moves one running job through its steps; every write is compare-and-set on the job row."""

    def __init__(
        self,
        config: Config,
        conn: sqlite3.Connection,
        executor: Executor,
        job: Job,
        around_final: AroundFinal | None = None,
    ):
        self.config, self.conn, self.executor, self.job = config, conn, executor, job
        self.around_final = around_final

    def run(self) -> Job:
        """Drive the job to a final state (or until it is no longer ours); return it."""
        try:
            return self._steps()
        except _NotOurs:
            current = db_queries.get_job(self.conn, self.job.id)
            log.info(
                "Job was changed by someone else; leaving it", extra={"job": current or self.job}
            )
            return current or self.job

    def _steps(self) -> Job:
        phase = "starting"
        self.record_self()
        # Owed until cleanup() removes the objects: if we die first, a later pass removes them.
        cleanup_debt.owe(self.conn, self.job.id)
        # The state our own step just brought about, so it is not asked of Docker again.
        known: ExecutorState | None = None
        try:
            while True:
                job = self.refresh()
                state, known = known or self.executor.status(job), None
                if state in (ExecutorState.UNKNOWN, ExecutorState.PREPARED) and job.cancelled:
                    return self.finish_early(StatusCode.CANCELLED_BY_USER, Msg.CANCELLED)
                if state is ExecutorState.UNKNOWN:
                    if (
                        job.status_code in (StatusCode.EXECUTING, StatusCode.FINALIZING)
                        or job.status_message == Msg.RETRYING
                    ):
                        raise JobError("Job container has vanished")
                    self.set_step(StatusCode.PREPARING, Msg.PREPARING)
                    fault("prepare")
                    named = action_name_problem(job.action)
                    if named:  # a job from before names were checked: refuse it clearly
                        raise JobError(f"Action names {named}; rename the action")
                    # Its declarations are the workspace's newest now, whatever happens next.
                    workspaces.purge_declared_high(self.config, job)
                    # Recorded before anything is copied: finalize must know every input, even
                    # if the needed action runs again before this job ends.
                    inputs = input_files(self.config, self.conn, job)
                    self.save(partial(Job.copy, input_files=inputs))
                    self.executor.prepare(self.job)
                    known = ExecutorState.PREPARED
                elif state is ExecutorState.PREPARED:
                    fault("execute")
                    self.executor.execute(self.job)
                    self.set_step(StatusCode.EXECUTING, Msg.RUNNING)
                    known = ExecutorState.EXECUTING
                elif state is ExecutorState.EXECUTING:
                    phase = "running"
                    self.set_step(StatusCode.EXECUTING, Msg.RUNNING)
                    self.wait()
                    known = ExecutorState.EXECUTED  # wait() returns once the container stopped
                elif state is ExecutorState.EXECUTED:
                    phase = "finalizing"
                    self.set_step(StatusCode.FINALIZING, Msg.FINALIZING)
                    self.check_daemon_restart()
                    fault("finalize")
                    final = self.executor.finalize(self.job, _Outcome(self))
                    self.cleanup(final)
                    return final
                else:
                    raise RuntimeError(f"container of job {job.id} is in a state we cannot use")
        except _NotOurs:
            raise
        except DockerUnavailable as exc:
            # The job stays as it is; the pass starts another worker once Docker answers.
            self.note_docker_lost(exc)
            raise
        except DiskFull as exc:
            message = self.disk_full_message(exc)
            log.info(f"Job failed: {message}", extra={"job": self.job})
            return self.finish_early(StatusCode.JOB_ERROR, f"JobError: {message}")
        except BrokenContainerError as exc:
            # The container may hang every call made to it: touch nothing, tell jr-prune.
            log.error(f"Copy stalled, container left alone: {exc}", extra={"job": self.job})
            store_flags.set_flag(
                self.conn, f"hung:{exc.container_name}", f"{self.job.id} {iso(time.time())}"
            )
            return self.finish_early(
                StatusCode.JOB_ERROR, f"BrokenContainerError: {exc}", clean=False
            )
        except DaemonRestarted as exc:
            log.warning(f"Job failed: {DOCKER_RESTARTED} ({exc})", extra={"job": self.job})
            return self.finish_early(
                StatusCode.JOB_ERROR, f"JobError: {DOCKER_RESTARTED}", error_detail=str(exc)
            )
        except JobError as exc:
            log.info(f"Job failed: {exc}", extra={"job": self.job})
            return self.finish_early(StatusCode.JOB_ERROR, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            if store_unusable(exc):
                raise  # the state store cannot take the outcome: the next worker decides
            full = docker.disk_full_error(exc)
            if full is not None:  # a full disk is the job's expected failure, not ours
                message = self.disk_full_message(full)
                log.info(f"Job failed: {message}", extra={"job": self.job})
                return self.finish_early(StatusCode.JOB_ERROR, f"JobError: {message}")
            if self.docker_gone():
                # A copy cut off by the daemon stopping fails in odd ways (a truncated stream,
                # a reset connection): with Docker gone, that is an outage, not a job error.
                self.note_docker_lost(exc)
                raise DockerUnavailable(f"Docker is not available ({exc})") from exc
            message = {
                "starting": Msg.INTERNAL_STARTING,
                "finalizing": Msg.INTERNAL_FINALIZING,
            }.get(phase, Msg.INTERNAL)
            log.exception(
                f"{message} (container and volume kept for jr-retry)", extra={"job": self.job}
            )
            return self.finish_early(
                StatusCode.INTERNAL_ERROR,
                message,
                clean=False,
                error_detail=logs.squash_whitespace(f"{type(exc).__name__}: {exc}"),
            )

    def record_self(self) -> None:
        """Record this process as the job's worker, if the pass that started it could not.

        A pass killed between starting a worker and saving its pid leaves the job without one;
        the next pass would otherwise start another worker (which finds the lock held and exits).
        """
        if self.job.worker_pid == os.getpid():
            return
        started = process_info(os.getpid())[1] or time.time()
        self.save(lambda j: j.copy(worker_pid=os.getpid(), worker_started_at=started))

    def note_docker_lost(self, exc: BaseException) -> None:
        """Record in the job that Docker went away under this worker (see outage.DockerOutage)."""
        pid, at = os.getpid(), time.time()
        try:
            self.save(
                lambda j: j.copy(error_detail=DockerOutage.record(j.error_detail, pid, at).note())
            )
        except Exception:  # the record is a courtesy: the job is left for the next worker anyway
            log.warning(
                "Could not record the Docker outage", extra={"job": self.job}, exc_info=True
            )
        log.warning(
            f"Docker became unavailable: {logs.squash_whitespace(str(exc))}",
            extra={"job": self.job},
        )

    def docker_gone(self) -> bool:
        """True if this executor needs Docker and Docker does not answer now."""
        if not isinstance(self.executor, LocalDockerExecutor):
            return False
        try:
            docker.ping(fresh=True)
        except DockerUnavailable:
            return True
        except Exception:  # noqa: BLE001 - it answered, if strangely
            return False
        return False

    def check_daemon_restart(self) -> None:
        """JobError if the container was stopped by the Docker daemon going down under the job.

        Without live-restore a stopping daemon stops every container (exit 143, or 137 after its
        grace period). That is no fault of the job, so it fails saying so rather than with
        "Job exited with error code 143". We know it happened when a worker recorded losing
        Docker and the container was stopped by a signal around or after that moment.
        """
        job = self.job
        outage = DockerOutage.parse(job.error_detail)
        if outage is None or job.cancelled or not isinstance(self.executor, LocalDockerExecutor):
            return
        info = docker.inspect_container(docker.container_name(job.id))
        if info is None:
            return  # finalize reports the vanished container
        state = info.get("State") or {}
        finished = docker_time(state.get("FinishedAt"))
        if (
            state.get("ExitCode") in SIGNAL_EXIT_CODES
            and not state.get("OOMKilled")
            and finished is not None
            and finished >= outage.first - RESTART_WINDOW
        ):
            raise DaemonRestarted(
                f"container stopped with exit code {state.get('ExitCode')} at "
                f"{state.get('FinishedAt')}; {outage.note()}"
            )

    def disk_full_message(self, exc: DiskFull) -> str:
        """The disk-full message, naming the disk: from the file being written when known, else
        the one of the backend's disks that is (still) full."""
        if exc.where:
            return str(exc)
        if exc.path is not None:
            return docker.disk_full_message(disk_name(self.config, exc.path))
        return docker.disk_full_message(full_disk_name(self.config))

    def refresh(self) -> Job:
        """Re-read the job; _NotOurs if it is no longer running."""
        job = db_queries.get_job(self.conn, self.job.id)
        if job is None or job.state is not State.RUNNING:
            raise _NotOurs()
        self.job = job
        return job

    def save(self, change: Callable[[Job], Job]) -> Job:
        """Apply change to the job and save it (store.queries.change_job: re-read and re-applied
        after a lost race); _NotOurs if the job is no longer running."""

        def ours(job: Job) -> Job:
            if job.state is not State.RUNNING:
                raise _NotOurs()
            self.job = job
            return change(job)

        saved, _ = db_queries.change_job(self.conn, self.job, ours)
        if saved is None:
            raise _NotOurs()
        self.job = saved
        return saved

    def save_final(self, change: Callable[[Job], Job]) -> Job:
        """Save and log the job's final state, through around_final when there is one."""

        def save() -> Job:
            final = self.save(change)
            log.info(final.status_message, extra={"job": final})
            return final

        return save() if self.around_final is None else self.around_final(save)

    def set_step(self, code: StatusCode, message: str) -> None:
        """Record the step in progress (logged when it changes)."""
        if self.job.status_code is code and self.job.status_message == message:
            return
        self.save(lambda j: transition(j, State.RUNNING, code, message))
        log.info(message, extra={"job": self.job})

    def wait(self) -> None:
        """Wait for the container to stop, sampling its stats and killing it if cancelled."""
        sampler = stats.Sampler(
            docker.container_name(self.job.id),
            self.job.id,
            self.config.stats_poll_interval,
            self.config.stats_database_file,
        ).start()
        killed = False
        try:
            while not self.executor.wait(self.job, WAIT_SLICE):
                job = self.refresh()
                if job.cancelled and not killed:
                    log.info("Cancellation requested, killing job", extra={"job": job})
                    self.executor.kill(job)
                    killed = True
        finally:
            usage = getattr(self.executor, "resource_usage", None)
            summary = sampler.stop()
            if usage is not None:
                usage[self.job.id] = summary

    def finish_early(
        self, code: StatusCode, message: str, *, clean: bool = True, error_detail: str | None = None
    ) -> Job:
        """Fail the job without finalizing (cancelled before start, JobError, internal error)."""
        final = self.save_final(
            lambda j: transition(j, State.FAILED, code, message, error_detail=error_detail)
        )
        if clean:
            self.cleanup(final)
        return final

    def cleanup(self, job: Job) -> None:
        """Remove the job's Docker objects; a failure here leaves them for jr-prune.

        While Docker is down (restarting) we wait for it a while: once the job is final no other
        worker will come back to remove them.
        """
        deadline = time.monotonic() + CLEANUP_PATIENCE
        said = False
        while True:
            try:
                fault("cleanup")
                self.executor.cleanup(job)
                cleanup_debt.settled(self.conn, job.id)
                return
            except Exception as exc:
                if time.monotonic() < deadline and (
                    isinstance(exc, DockerUnavailable) or self.docker_gone()
                ):
                    if not said:
                        log.info(
                            "Docker is unavailable: cleaning up once it is back", extra={"job": job}
                        )
                        said = True
                    time.sleep(CLEANUP_RETRY_INTERVAL)
                    continue
                log.exception(
                    "Cleanup failed; leaving the objects for jr-prune", extra={"job": job}
                )
                return
