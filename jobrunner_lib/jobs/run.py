"""One bounded pass of the run loop: schedule pending jobs, claim them, supervise their workers.

A pass reads only active jobs (and, by primary key, the jobs they wait for), decides, writes each
change with compare-and-set, and returns. The slow work after a claim happens in a detached worker
process (`python -m jobrunner_lib.jobs.worker <id>`); the pass only starts workers and restarts dead or
stalled ones, so it stays well under a second however much history the store holds.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobKeepsChanging
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.core.weights import Weights, load_weights
from jobrunner_lib.jobs import cleanup, maintenance
from jobrunner_lib.jobs.outage import DockerOutage, store_unusable
from jobrunner_lib.jobs.processes import (
    kill_worker,
    process_info,
    reap_children,
    spawn_worker,
    worker_alive,
    worker_holds,
)
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
WORKER_DIED = "Internal error: the job's worker died 3 times; see the run log"

# A worker that exited because Docker was unreachable is restarted without counting an attempt
# (the daemon being restarted is not the job's fault), but only this many times per job, so a
# worker that keeps failing that way while Docker answers the pass's ping cannot spin forever.
FREE_DOCKER_RESTARTS = 10
# How long a pass waits for the worker of a job it stops for database maintenance to be gone
# before it removes the job's container and volume.
WORKER_EXIT_WAIT = 2.0

Spawn = Callable[[Config, str], tuple[int, float]]
IsAlive = Callable[[int, float | None], bool]
Kill = Callable[[int, float | None], None]
RemoveObjects = Callable[[Config, str], list[str]]
StartCheck = Callable[[Config, sqlite3.Connection], Any]
# What to do once a decided change of a job is saved (log, record, start a worker), given the
# job as saved; a decision is the job to save (compare-and-set) and that.
Then = Callable[[Job], None]
Decision = tuple[Job, Then]


@dataclass(frozen=True)
class Change:
    """One change made by a pass (what jr-run-once prints).

    `message` is the job's new status message, or for a restarted worker a note saying why.
    """

    job_id: str
    action: str
    workspace: str
    old_state: str
    new_state: str
    status_code: str
    message: str

    def row(self) -> dict[str, str]:
        """The change as an output row (columns id, action, workspace, from, to, status_code, message)."""
        return {
            "id": self.job_id,
            "action": self.action,
            "workspace": self.workspace,
            "from": self.old_state,
            "to": self.new_state,
            "status_code": self.status_code,
            "message": self.message,
        }


def run_pass(
    config: Config,
    conn: sqlite3.Connection,
    *,
    spawn: Spawn = spawn_worker,
    is_alive: IsAlive = worker_alive,
    kill: Kill = kill_worker,
    now: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    remove_objects: RemoveObjects | None = None,
    start_check: StartCheck = maintenance.start_if_due,
) -> list[Change]:
    """Look at every active job once: supervise running ones, then schedule pending ones.

    remove_objects: how a job's Docker objects are removed (docker.jobobjects'); start_check:
    starts the database maintenance check when it is due (jobs/maintenance.py).
    """
    reap_children()
    weights = load_weights(config.job_resource_weights_file)
    jobs = db_queries.active_jobs(conn)
    # Shuffled so that one big request cannot hog capacity (docs/lifecycle.md#the-run-pass).
    (rng or random).shuffle(jobs)
    run = _Pass(config, conn, weights, spawn, is_alive, kill, now)
    run.remove_objects = remove_objects or _remove_job_objects
    run.jobs = {job.id: job for job in jobs}
    if jobs:
        flags = store_flags.backend_flags(conn)
        run.paused = core_flags.paused(flags)
        run.db_maintenance = core_flags.db_maintenance(flags)
    # Supervision first: a job failed for good frees its capacity for this pass's claims.
    for job in jobs:
        if job.state is State.RUNNING:
            run.handle(job)
    run.running_weight = sum(
        weights.weight(j.workspace, j.action) for j in run.jobs.values() if j.state is State.RUNNING
    )
    pending = [job for job in jobs if job.state is State.PENDING]
    if pending:
        # Jobs put back to pending whose Docker objects may still be there (database
        # maintenance, a reboot, a retry): removed before such a job is claimed again.
        run.owed = cleanup.owed(conn)
        wanted = {d for job in pending for d in job.wait_for_job_ids if d not in run.jobs}
        run.others = {dep.id: dep for dep in db_queries.get_jobs(conn, sorted(wanted))}
        for job in pending:
            run.handle(run.jobs[job.id])
    # Finished jobs whose worker died before removing their Docker objects (bounded per pass).
    cleanup.sweep(config, conn, is_alive)
    start_check(config, conn)
    return run.changes


def _remove_job_objects(config: Config, job_id: str) -> list[str]:
    from jobrunner_lib.docker.jobobjects import remove_job_objects  # lazily: only when needed

    return remove_job_objects(config, job_id)


class _Pass:
    """The state of one pass: the jobs as last seen, capacity in use, and the changes made."""

    def __init__(
        self,
        config: Config,
        conn: sqlite3.Connection,
        weights: Weights,
        spawn: Spawn,
        is_alive: IsAlive,
        kill: Kill,
        now: Callable[[], float],
    ):
        self.config, self.conn, self.weights = config, conn, weights
        self.spawn, self.is_alive, self.kill, self.now = spawn, is_alive, kill, now
        self.jobs: dict[str, Job] = {}
        self.others: dict[str, Job] = {}
        self.running_weight = 0.0
        self.paused = False
        self.db_maintenance = False
        self.owed: set[str] = set()
        self.remove_objects: RemoveObjects = _remove_job_objects
        self.changes: list[Change] = []

    def handle(self, job: Job) -> None:
        """Decide for one job, save the decision, then carry it out; never raise.

        The save is store.queries.change_job's: after a lost race the job is read again and
        decided again from scratch, so a job someone moved on meanwhile (a worker, jr-kill) is
        judged as it is now.
        """
        then: list[Then] = []

        def decide(current: Job) -> Job | None:
            if current is not job:
                log.debug("Job changed while deciding; looking again", extra={"job": current})
            self.jobs[current.id] = current
            then.clear()
            if current.state is State.RUNNING:
                decision = self.supervise(current)
            elif current.state is State.PENDING:
                decision = self.schedule(current)
            else:
                decision = None
            if decision is None:
                return None
            new, after = decision
            then.append(after)
            return new

        try:
            saved, changed = db_queries.change_job(self.conn, job, decide)
            if saved is not None:
                self.jobs[saved.id] = saved
            if changed:
                assert saved is not None
                then[0](saved)
        except JobKeepsChanging:
            log.warning("Job kept changing; the next pass looks again", extra={"job": job})
        except Exception as exc:
            if store_unusable(exc):
                # Not this job's problem: every other job would hit it too. The caller
                # (jr-run-once) reports it in one line; the next pass carries on.
                raise
            # One job's problem must not stop the others (nor crash the service).
            log.exception("Unexpected error while handling job", extra={"job": job})

    # -- pending jobs --

    def schedule(self, job: Job) -> Decision | None:
        """Cancelled, dependencies, pause flag, database maintenance, capacity: then claim it."""
        if job.cancelled:
            return self.cancel(job)
        failed, waiting = self.dependencies(job)
        if failed is not None:
            message = f"{Msg.DEPENDENCY_FAILED}: {failed.action} ({failed.id})"
            return self.change(job, State.FAILED, StatusCode.DEPENDENCY_FAILED, message)
        if waiting:
            return self.wait(job, StatusCode.WAITING_ON_DEPENDENCIES, Msg.WAITING_ON_DEPENDENCIES)
        if self.paused:
            if job.status_code is StatusCode.WAITING_ON_REBOOT:
                return self.wait(job, job.status_code, job.status_message or Msg.WAITING_ON_REBOOT)
            return self.wait(job, StatusCode.PAUSED, Msg.PAUSED)
        if self.db_maintenance and job.requires_db:
            return self.wait(job, StatusCode.WAITING_DB_MAINTENANCE, Msg.WAITING_DB_MAINTENANCE)
        weight = self.weights.weight(job.workspace, job.action)
        # A job heavier than the whole capacity still starts once nothing else runs; the old
        # runner left it waiting forever.
        if self.running_weight > 0 and self.running_weight + weight > self.config.max_workers:
            message = Msg.WAITING_ON_WORKERS_HEAVY if weight > 1 else Msg.WAITING_ON_WORKERS
            return self.wait(job, StatusCode.WAITING_ON_WORKERS, message)
        if job.id in self.owed and not self.clear_leftovers(job):
            return None  # its old container could pass for this run's: tried again next pass
        return self.claim(job, weight)

    def clear_leftovers(self, job: Job) -> bool:
        """Remove what an earlier run of a pending job may have left in Docker; True once gone.

        A container left by a run that was stopped (for database maintenance, a reboot) would
        be taken by the job's next worker for its own: an exited one would be finalized as
        this run's result.
        """
        try:
            removed = self.remove_objects(self.config, job.id)
        except Exception:  # noqa: BLE001 - the job waits; the next pass tries again
            log.warning(
                "Could not remove what an earlier run left in Docker; the job starts once it "
                "is gone",
                exc_info=True,
                extra={"job": job},
            )
            return False
        if removed:
            log.info(f"Removed what an earlier run left: {', '.join(removed)}", extra={"job": job})
        cleanup.settled(self.conn, job.id)
        self.owed.discard(job.id)
        return True

    def dependencies(self, job: Job) -> tuple[Job | None, bool]:
        """(the first failed awaited job, whether any awaited job has not succeeded yet)."""
        waiting = False
        for dep_id in job.wait_for_job_ids:
            dep = self.jobs.get(dep_id) or self.others.get(dep_id)
            if dep is None:
                continue  # as the old runner: an unknown job id does not hold anything up
            if dep.state is State.FAILED:
                return dep, True
            waiting = waiting or dep.state is not State.SUCCEEDED
        return None, waiting

    def wait(self, job: Job, code: StatusCode, message: str) -> Decision | None:
        """Keep a job pending with this status, writing only when it changes."""
        if job.status_code is code and job.status_message == message:
            if self.now() - job.updated_at >= self.config.status_refresh_interval:
                # Keeps the website's "last updated" fresh without a revision bump.
                db_queries.touch(
                    self.conn,
                    job.id,
                    refresh_updated_at=True,
                    refresh_after=int(self.config.status_refresh_interval),
                )
            return None
        return self.change(job, State.PENDING, code, message)

    def cancel(self, job: Job) -> Decision:
        """A job cancelled before it started passes through RUNNING (for started_at) to FAILED."""
        at = int(self.now())
        started = transition(job, State.RUNNING, job.status_code, job.status_message, at=at)
        return self.change(
            started, State.FAILED, StatusCode.CANCELLED_BY_USER, Msg.CANCELLED, old=job
        )

    def claim(self, job: Job, weight: float) -> Decision:
        """pending -> running/preparing, then start its worker."""
        claimed, logged = self.change(
            job,
            State.RUNNING,
            StatusCode.PREPARING,
            Msg.PREPARING,
            attempts=job.attempts + 1,
            worker_pid=None,
            worker_started_at=None,
            error_detail=None,
            exit_code=None,
        )

        def then(saved: Job) -> None:
            logged(saved)
            self.running_weight += weight
            self.start_worker(saved)

        return claimed, then

    # -- running jobs --

    def supervise(self, job: Job) -> Decision | None:
        """Restart a dead or stalled worker, or give up on the job after MAX_ATTEMPTS workers.

        A job with no worker recorded (a pass cut short between its claim or spawn and saving
        the pid) gets one without using up an attempt: no worker of it has failed.
        During database maintenance a database job is stopped and put back to pending first.
        """
        if self.db_maintenance and job.requires_db and self.uses_database(job):
            return self.stop_for_maintenance(job)
        pid = job.worker_pid
        died = False
        if pid is not None and self.is_alive(pid, job.worker_started_at):
            last = max(
                (t for t in (job.heartbeat_at, job.worker_started_at) if t is not None),
                default=None,
            )
            silent = self.now() - last if last is not None else 0.0
            if silent <= self.config.worker_stall_timeout:
                return None
            reason = f"worker pid {pid} stalled (no heartbeat for {silent:.0f}s)"
            self.kill(pid, job.worker_started_at)
        elif worker_holds(self.config, job.id):
            # A worker we have no (live) pid for is driving it: it records itself shortly.
            log.debug("Job driven by an unrecorded worker; leaving it", extra={"job": job})
            return None
        elif pid is not None:
            reason, died = f"worker pid {pid} died", True
        else:
            # A claim or spawn cut short, or jr-retry handing the job back (attempts 0).
            reason = "no worker recorded"
            return self.restart_worker(job, reason, counted=job.attempts < 1)
        outage = DockerOutage.parse(job.error_detail)
        if died and outage is not None and outage.pid == pid:
            if outage.count <= FREE_DOCKER_RESTARTS:
                # It exited because Docker was unreachable, and passes run only once Docker
                # answers again: the daemon's restart is not a failed attempt of the job.
                reason = f"worker pid {pid} exited while Docker was unavailable"
                return self.restart_worker(job, reason, counted=False)
            reason += f" ({outage.count} times Docker was unavailable)"
        if job.attempts >= MAX_ATTEMPTS:
            # Container and volume are kept, so an operator can look and use jr-retry.
            code, message = StatusCode.INTERNAL_ERROR, WORKER_DIED
            if job.cancelled:
                code, message = StatusCode.CANCELLED_BY_USER, Msg.CANCELLED
            log.error(
                f"Giving up on job: {reason} (attempt {job.attempts} of {MAX_ATTEMPTS})",
                extra={"job": job},
            )
            return self.change(
                job,
                State.FAILED,
                code,
                message,
                error_detail=f"{reason}; {job.attempts} workers failed",
            )
        return self.restart_worker(job, reason, counted=True)

    @staticmethod
    def uses_database(job: Job) -> bool:
        """Whether a running database job may still use the database: it has not finished (a
        finalizing job only copies its outputs out) and is not being cancelled (its worker ends
        it)."""
        return not job.cancelled and job.status_code is not StatusCode.FINALIZING

    def stop_for_maintenance(self, job: Job) -> Decision:
        """running -> pending/waiting_db_maintenance; then its worker is stopped and its
        container and volume removed, as jr-reboot-prep resets a job (ops/reboot.py): the row
        first, so a worker we fail to kill sees the job is no longer its own."""
        message = Msg.WAITING_DB_MAINTENANCE
        reset = transition(
            job,
            State.PENDING,
            StatusCode.WAITING_DB_MAINTENANCE,
            message,
            at=int(self.now()),
            worker_pid=None,
            worker_started_at=None,
            attempts=0,
        )

        def then(saved: Job) -> None:
            log.warning(
                "DB maintenance mode active: stopping the database job and putting it back to "
                "pending",
                extra={"job": saved},
            )
            self.record(job, saved, message)
            self.stop_worker(job)
            if self.clear_leftovers(saved):
                return
            cleanup.owe(self.conn, saved.id)  # not claimed again until they are gone
            self.owed.add(saved.id)

        return reset, then

    def stop_worker(self, job: Job) -> None:
        """Kill the job's worker (with its process group) and wait a moment for it to be gone."""
        pid, started = job.worker_pid, job.worker_started_at
        if pid is None or pid == os.getpid() or not self.is_alive(pid, started):
            return
        self.kill(pid, started)
        deadline = time.monotonic() + WORKER_EXIT_WAIT
        while self.is_alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart_worker(self, job: Job, reason: str, *, counted: bool) -> Decision:
        """Forget the old worker, count an attempt unless told not to, and start another."""
        attempts = job.attempts + 1 if counted else job.attempts
        forgotten = job.copy(attempts=attempts, worker_pid=None, worker_started_at=None)

        def then(again: Job) -> None:
            if counted:
                note = f"Restarting worker: {reason} (attempt {again.attempts} of {MAX_ATTEMPTS})"
            else:
                note = f"Restarting worker: {reason} (not counted as an attempt)"
            level = logging.WARNING if job.worker_pid is not None else logging.INFO
            log.log(level, note, extra={"job": again})
            self.record(job, again, note)
            self.start_worker(again)

        return forgotten, then

    def start_worker(self, job: Job) -> None:
        """Spawn the job's worker and record who it is; a failure is left to the next pass."""
        try:
            pid, started = self.spawn(self.config, job.id)
        except OSError:
            log.exception("Could not start a worker (the next pass retries)", extra={"job": job})
            return
        log.info(f"Started worker pid {pid}", extra={"job": job})

        def record_worker(current: Job) -> Job | None:
            # After a lost race the new worker may already have moved the job on, or ended it.
            if current.state.is_final:
                return None
            return current.copy(worker_pid=pid, worker_started_at=started)

        saved, _ = db_queries.change_job(self.conn, job, record_worker)
        if saved is not None:
            self.jobs[job.id] = saved

    # -- writing --

    def change(
        self,
        job: Job,
        state: State,
        code: StatusCode,
        message: str,
        *,
        old: Job | None = None,
        **changes: Any,
    ) -> Decision:
        """Move a job with the state machine; once it is saved, log and record the change."""
        new = transition(job, state, code, message, at=int(self.now()), **changes)

        def then(saved: Job) -> None:
            log.info(message, extra={"job": saved})
            self.record(old or job, saved, message)

        return new, then

    def record(self, old: Job, new: Job, message: str) -> None:
        """Remember a change for the caller."""
        self.changes.append(
            Change(
                new.id,
                new.action,
                new.workspace,
                old.state.value,
                new.state.value,
                new.status_code.value if new.status_code else "",
                message,
            )
        )


def after_job(config: Config, lock: Any, *, take_next: bool = False) -> str | None:
    """A job just ended: run a pass now (lock: the run lock, held by the caller, or None if busy).

    Without the lock no pass runs (someone else's is running). With take_next the first job the
    pass starts is recorded as driven by this process (the finishing worker, warm and connected)
    instead of a new one; its id is returned. The wake file is touched afterwards (the service
    loop then syncs and passes again without sleeping) when the service has something to do: a
    jobs website to tell of the new state, or a pass to run because this one could not, or to
    notice that this worker drives nothing more (the queue may be empty). A service pass after
    every job of a warm worker would otherwise only redo this one, on the CPUs the jobs use.
    """
    taken: list[str] = []
    handed_over = False
    try:
        if lock is None:
            return None
        conn = db.connect(config.db_path)

        def spawn(config: Config, job_id: str) -> tuple[int, float]:
            if take_next and not taken:
                taken.append(job_id)
                # This process may be old: a fresh heartbeat keeps the job from looking stalled
                # until its own heartbeat thread starts.
                db_queries.touch(conn, job_id, heartbeat=time.time())
                started = process_info(os.getpid())[1]
                return os.getpid(), started if started is not None else time.time()
            return spawn_worker(config, job_id)

        try:
            run_pass(config, conn, spawn=spawn)
        finally:
            conn.close()
        handed_over = bool(taken)
        return taken[0] if taken else None
    finally:
        if config.has_job_server or not handed_over:
            try:
                config.wake_path.touch()
            except OSError:
                pass
