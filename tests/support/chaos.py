"""Checks shared by the crash tests: a workload run under SIGKILLs against a clean run of it.

After the kills every job must end as in the clean run, with the same output bytes (compared by
sha256, so a 1 GB output is never held in memory), exactly one log directory, exactly one start of
its container, no log line showing it active again after it finished, and no container or volume
left behind. Problems are collected in `Figures`, one line each naming the job and workspace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.e2e import Rig

# Where in a job's life a kill may be aimed (status codes in order; "done" is any final state).
PHASES = ("preparing", "executing", "finalizing", "done")
# level -> path -> sha256 of every file of a workspace in the two privacy trees.
Outputs = dict[str, dict[str, str]]


def reached(rig: Rig, ids: list[str], action: str, phase: str) -> bool:
    """Whether the action's job (one of ids) has got to (or past) this phase."""
    job = next(j for j in rig.jobs(ids).values() if j["action"] == action)
    if job["state"] in ("succeeded", "failed"):
        return True
    return job["status_code"] in PHASES[PHASES.index(phase) :]


def sha256(path: Path) -> str:
    """The file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def outputs(rig: Rig, workspace: str) -> Outputs:
    """The workspace's files in both trees, without metadata/ (logs name the job and the time)."""
    found: Outputs = {}
    for level, root in (("high", rig.high), ("medium", rig.medium)):
        base = root / "workspaces" / workspace
        found[level] = {
            p.relative_to(base).as_posix(): sha256(p)
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.relative_to(base).parts[0] != "metadata"
        }
    return found


@dataclass
class Figures:
    """What the kills did and what went wrong (one entry per problem)."""

    kills: int = 0
    workers_killed: int = 0
    jobs: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"kills {self.kills} (workers killed {self.workers_killed}), jobs {self.jobs}, "
            f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
            f"leftovers {len(self.leftovers)}"
        )

    def add(self, other: Figures) -> None:
        """Add another's counts and problems to these (e.g. one lane's to the total)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def problems(self) -> list[str]:
        return self.lost + self.duplicated + self.leftovers


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z) ")
JOB_ID = re.compile(r" id=(\w+)")
ACTIVE = re.compile(r" status=(preparing|executing|finalizing)\b")
FINAL = re.compile(r" status=(succeeded|nonzero_exit)\b")


def active_after_final(rig: Rig, ids: Iterable[str]) -> list[str]:
    """Jobs logged as preparing/executing/finalizing after they were logged as finished.

    Reads the workers' log and every service log (the passes log there), in time order.
    """
    wanted = set(ids)
    lines: dict[str, list[tuple[str, str]]] = {}
    for path in [rig.workdir / "logs" / "workers.log", *sorted(rig.base.glob("service-*.log"))]:
        for line in path.read_text(errors="replace").splitlines():
            stamp, job = STAMP.match(line), JOB_ID.search(line)
            if stamp and job and job.group(1) in wanted:
                lines.setdefault(job.group(1), []).append((stamp.group(1), line))
    bad = []
    for jid in sorted(lines):
        finished = None
        for stamp, line in sorted(lines[jid], key=lambda item: item[0]):
            if FINAL.search(line) and finished is None:
                finished = stamp
            elif ACTIVE.search(line) and finished is not None and stamp > finished:
                bad.append(f"{jid}: {line}")
                break
    return bad


def job_objects(rig: Rig, ids: Iterable[str]) -> list[str]:
    """Names of the containers and volumes of these jobs that still exist."""
    mine = set(ids)
    names = [
        c["Names"][0].lstrip("/")
        for c in rig.containers()
        if c["Labels"].get("org.jr.job-id") in mine
    ]
    names += [
        v["Name"] for v in rig.volumes() if (v.get("Labels") or {}).get("org.jr.job-id") in mine
    ]
    return sorted(names)


def check_jobs(
    rig: Rig,
    ids: list[str],
    workspace: str,
    expected: Mapping[str, tuple[str, str]],
    clean: Outputs,
    starts: Mapping[str, int],
    figures: Figures,
    got: Outputs | None = None,
) -> None:
    """Compare one workspace's finished jobs with the clean run; note what is lost, doubled or left.

    expected: action -> (state, status_code) of the clean run; got: the workspace's outputs if
    taken already (by default they are read now).
    """
    jobs = rig.jobs(ids)
    for jid, job in jobs.items():
        where = f"{workspace}/{job['action']} ({jid})"
        state = (job["state"], job["status_code"])
        if state != expected[job["action"]] or not job["completed_at"]:
            figures.lost.append(
                f"{where}: {state} {job['status_message']!r} {job['error_detail']!r}"
            )
        dirs = rig.log_dirs(jid)
        if len(dirs) != 1 or not all((d / "logs.txt").is_file() for d in dirs):
            figures.duplicated.append(f"{where}: {len(dirs)} log directories")
        if starts.get(jid, 0) != 1:
            figures.duplicated.append(f"{where}: container started {starts.get(jid, 0)} times")
    for line in active_after_final(rig, ids):
        figures.duplicated.append(f"{workspace}: active again after finishing: {line}")
    got = outputs(rig, workspace) if got is None else got
    for level in ("high", "medium"):
        for path in sorted(set(clean[level]) | set(got[level])):
            if clean[level].get(path) != got[level].get(path):
                figures.lost.append(f"{workspace}: {level} {path} differs from the clean run")
    for action in expected:
        if not (rig.high / "workspaces" / workspace / "metadata" / f"{action}.log").is_file():
            figures.lost.append(f"{workspace}: no metadata/{action}.log")
    for name in job_objects(rig, ids):
        figures.leftovers.append(f"{workspace}: {name}")
