"""A job's worker: `python -m jobrunner_lib.jobs.worker JOB_ID` drives a claimed job to its end.

Started detached by the run pass after the claim. It re-derives where the job is from the
executor (no container: prepare; running: wait; exited: finalize), so it can be killed at any
moment and simply started again. Exactly one worker per job: a second one finds the job's lock
held and exits quietly. While it works it writes a heartbeat every few seconds, so the pass can
tell a stalled worker from a busy one. When its job ends it runs a pass, and drives the first
job that pass starts itself (up to MAX_JOBS_PER_WORKER jobs), saving a new interpreter per job.
The job's steps are taken by driver.Driver.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

from jobrunner_lib.core import logs
from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.errors import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    ConfigError,
)
from jobrunner_lib.core.models import Job, State
from jobrunner_lib.docker import tarstream
from jobrunner_lib.docker.engine import DockerUnavailable
from jobrunner_lib.jobs.driver import AroundFinal, Driver
from jobrunner_lib.jobs.executor import Executor, LocalDockerExecutor
from jobrunner_lib.jobs.outage import release_reserve, store_full, store_unusable
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 3.0
# A worker whose job ends drives the next startable job itself (no new interpreter, imports or
# Docker connection); after this many jobs it hands over to a fresh process.
MAX_JOBS_PER_WORKER = 50
# How long a worker waits for its job's lock before concluding another worker drives the job.
JOB_LOCK_WAIT = 2.0
# How long a finishing worker waits for a running pass to end before saving without the lock.
AFTER_JOB_LOCK_WAIT = 5.0


class Heartbeat:
    """A thread recording that the worker is alive (and when copies last moved) every few seconds."""

    def __init__(
        self,
        config: Config,
        job_id: str,
        progress: tarstream.Progress,
        interval: float = HEARTBEAT_INTERVAL,
    ):
        self.config, self.job_id, self.progress, self.interval = config, job_id, progress, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {job_id}", daemon=True)

    def start(self) -> Heartbeat:
        """Beat once now, then in the background."""
        self._conn = db.connect(self.config.db_path, migrate=False)  # one connection per thread
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Write heartbeat_at (and progress_at, and at most once a minute updated_at)."""
        db_queries.touch(
            self._conn,
            self.job_id,
            heartbeat=time.time(),
            progress=self.progress.last_moved,
            refresh_updated_at=True,
            refresh_after=int(self.config.status_refresh_interval),
        )

    def stop(self) -> None:
        """Stop beating."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a busy database must not kill the worker; the next beat retries
                log.warning("Heartbeat failed for job %s", self.job_id, exc_info=True)


def next_job(
    config: Config, save: Callable[[], Job], *, take: bool, taken: list[str | None]
) -> Job:
    """Save a job's final state and run the pass it calls for, both under the run lock.

    The pass starts what the job unblocked now rather than a poll interval later; with take, the
    first job it starts is left for this warm process to drive (its id goes in taken). Holding
    the lock across the save keeps a service pass from starting that job in a new process first.
    If a pass holds the lock for long, the state is saved anyway and that pass carries on.
    """
    from jobrunner_lib.jobs.locks import take_run_lock  # lazily: only when a job ends here
    from jobrunner_lib.jobs.run import after_job

    lock = take_run_lock(config, AFTER_JOB_LOCK_WAIT)
    if lock is None:
        final = save()
        after_job(config, None)
        return final
    try:
        final = save()
        try:
            taken.append(after_job(config, lock, take_next=take))
        except Exception:  # the job is final and saved: its cleanup must still happen
            log.exception("The pass after the job failed", extra={"job": final})
        return final
    finally:
        lock.release()


def drive_job(
    config: Config,
    job_id: str,
    executor: Executor | None = None,
    around_final: AroundFinal | None = None,
) -> Job | None:
    """Drive one claimed job to its end in this process (what `python -m` runs); return the job.

    around_final(save) is given the saving of the job's final state to do (see Driver).
    """
    import filelock

    conn = db.connect(config.db_path)
    lock_path = config.job_lock_path(job_id)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # A moment's patience: a pass may be looking whether the lock is held (processes.worker_holds).
    lock = filelock.FileLock(str(lock_path), timeout=JOB_LOCK_WAIT)
    try:
        try:
            lock.acquire()
        except filelock.Timeout:
            log.info(f"Another worker is driving job {job_id}; exiting")
            return db_queries.get_job(conn, job_id)
        try:
            job = db_queries.get_job(conn, job_id)
            if job is None or job.state is not State.RUNNING:
                log.info(
                    f"Job {job_id} is not running; nothing to do", extra={"job": job} if job else {}
                )
                return job
            if executor is None:
                executor = LocalDockerExecutor(config, conn)
            progress = getattr(executor, "progress", None) or tarstream.Progress()
            heartbeat = Heartbeat(config, job_id, progress).start()
            try:
                return Driver(config, conn, executor, job, around_final).run()
            finally:
                heartbeat.stop()
        finally:
            lock.release()
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m jobrunner_lib.jobs.worker JOB_ID`; exit 75 if Docker is unavailable."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m jobrunner_lib.jobs.worker JOB_ID", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup_process("run", config)
    return _drive_from(config, args[0])


def _drive_from(config: Config, job_id: str, *, may_free_reserve: bool = True) -> int:
    """Drive job_id, then the jobs this worker takes after it; the exit code."""
    try:
        for driven in range(1, MAX_JOBS_PER_WORKER + 1):
            taken: list[str | None] = []
            job = drive_job(
                config,
                job_id,
                around_final=partial(
                    next_job, config, take=driven < MAX_JOBS_PER_WORKER, taken=taken
                ),
            )
            if job is None or not job.state.is_final or not taken or taken[0] is None:
                break
            job_id = taken[0]
    except DockerUnavailable as exc:
        log.error(f"{exc}; job {job_id} left as it is for the next worker")
        return EXIT_TEMPFAIL
    except sqlite3.Error as exc:
        if not store_unusable(exc):
            log.exception(f"Worker for job {job_id} crashed")
            return EXIT_INTERNAL
        if may_free_reserve and store_full(exc) and release_reserve(config):
            # The job's volume may be what filled the disk: with room to record its end, the
            # volume goes, and the disk with it.
            log.warning(f"The state store's disk is full: freed its reserve for job {job_id}")
            return _drive_from(config, job_id, may_free_reserve=False)
        # A full disk under the state store: nothing can be recorded; the next worker carries on.
        log.error(f"The state store is unusable ({exc}); job {job_id} left for the next worker")
        return EXIT_TEMPFAIL
    except Exception:
        log.exception(f"Worker for job {job_id} crashed")
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
