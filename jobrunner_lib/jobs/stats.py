"""Resource stats: the stats SQLite file (docs/reference.md#files-and-directories) and per-job usage sampling.

Each worker samples its own container while it runs. Samples go to STATS_DATABASE_FILE when one
is configured, and always feed the job's usage summary (peak memory, CPU time) that finalising
writes into metadata.json.
"""

from __future__ import annotations

import datetime
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner_lib.docker import engine as docker

log = logging.getLogger(__name__)

SCHEMA = "CREATE TABLE IF NOT EXISTS stats (timestamp TEXT, data TEXT)"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the stats database; autocommit, WAL, shared by many workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(SCHEMA)
    return conn


def record(
    conn: sqlite3.Connection, data: dict[str, Any], at: datetime.datetime | None = None
) -> None:
    """Insert one row: `timestamp` is UTC ISO without `Z` (the old format), `data` is JSON."""
    at = at or datetime.datetime.now(datetime.timezone.utc)
    stamp = at.astimezone(datetime.timezone.utc).replace(tzinfo=None).isoformat()
    conn.execute("INSERT INTO stats (timestamp, data) VALUES (?, ?)", (stamp, json.dumps(data)))


@dataclass
class Sample:
    """What one Docker stats reading tells us about a container."""

    cpu_ns: int
    system_ns: int
    online_cpus: int
    memory_used: int
    memory_peak: int


def parse_sample(raw: dict[str, Any]) -> Sample | None:
    """Reduce a Docker stats dict to a Sample (None when the container is not running)."""
    cpu = raw.get("cpu_stats") or {}
    memory = raw.get("memory_stats") or {}
    if not memory.get("usage"):
        return None
    details = memory.get("stats") or {}
    # Like `docker stats`: page cache is reclaimable, so it is not counted as used.
    cache = details.get(
        "total_inactive_file", details.get("inactive_file", details.get("cache", 0))
    )
    used = max(0, int(memory["usage"]) - int(cache or 0))
    return Sample(
        cpu_ns=int((cpu.get("cpu_usage") or {}).get("total_usage") or 0),
        system_ns=int(cpu.get("system_cpu_usage") or 0),
        online_cpus=int(cpu.get("online_cpus") or 1),
        memory_used=used,
        # cgroup v1 reports the high-water mark; v2 does not, so samples are all we have there.
        memory_peak=max(used, int(memory.get("max_usage") or 0)),
    )


class Usage:
    """Running summary of a container's resource use across samples."""

    def __init__(self) -> None:
        self.samples = 0
        self.peak_memory = 0
        self.cpu_ns = 0
        self._previous: Sample | None = None

    def add(self, sample: Sample) -> float | None:
        """Fold in a sample; return the CPU percentage since the previous one, if known."""
        self.samples += 1
        self.peak_memory = max(self.peak_memory, sample.memory_peak)
        self.cpu_ns = max(self.cpu_ns, sample.cpu_ns)
        previous, self._previous = self._previous, sample
        if previous is None or sample.system_ns <= previous.system_ns:
            return None
        cpu_delta = sample.cpu_ns - previous.cpu_ns
        return round(
            100.0 * cpu_delta / (sample.system_ns - previous.system_ns) * sample.online_cpus, 2
        )

    def summary(self) -> dict[str, Any]:
        """The metadata.json `resource_usage` block (None values when nothing was sampled)."""
        return {
            "peak_memory_bytes": self.peak_memory if self.samples else None,
            "cpu_time_seconds": round(self.cpu_ns / 1e9, 3) if self.samples else None,
            "samples": self.samples,
        }


# Seconds into a job before its first resource sample.
FIRST_SAMPLE_AFTER = 1.0


class Sampler:
    """A thread sampling one container every `interval` seconds until stopped."""

    def __init__(self, container: str, job_id: str, interval: float, stats_file: Path | None):
        self.container = container
        self.job_id = job_id
        self.interval = interval
        self.stats_file = stats_file
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stats {job_id}", daemon=True)

    def start(self) -> Sampler:
        """Start sampling; the first sample after FIRST_SAMPLE_AFTER seconds (or the interval, if
        shorter). A stats call makes the daemon work beside the job: a job of a few hundred
        milliseconds finishes sooner without one, and its usage is not worth knowing."""
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling and return the usage summary."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.usage.summary()

    def _run(self) -> None:
        conn = None
        try:
            if self._stop.wait(min(self.interval, FIRST_SAMPLE_AFTER)):
                return  # over before its first sample
            if self.stats_file is not None:
                conn = connect(self.stats_file)
            while not self._stop.is_set():
                self.sample_once(conn)
                self._stop.wait(self.interval)
        except Exception:
            # Stats are a nice-to-have: never let them disturb the job.
            log.warning("Stats sampling for %s stopped", self.container, exc_info=True)
        finally:
            if conn is not None:
                conn.close()

    def sample_once(self, conn: sqlite3.Connection | None) -> None:
        """Take one sample, fold it into the summary and record it if a stats file is set."""
        raw = docker.container_stats(self.container)
        sample = parse_sample(raw) if raw else None
        if sample is None:
            return
        percentage = self.usage.add(sample)
        if conn is not None:
            record(
                conn,
                {
                    "containers": {
                        self.container: {
                            "job_id": self.job_id,
                            "cpu_percentage": percentage,
                            "memory_used": sample.memory_used,
                            "cpu_time_ns": sample.cpu_ns,
                        }
                    }
                },
            )
