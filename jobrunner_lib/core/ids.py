"""Job and job-request IDs (docs/reference.md#ids-and-names) and resolving what an operator types into jobs.

A fragment of 3 or more characters matches any job id or request id containing it
(case-insensitive). A matching request stands for all of its jobs. One target: go on; several:
the caller's chooser picks one or the resolution fails as ambiguous (exit 4); none: exit 3.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from jobrunner_lib.core.errors import AmbiguousError, NoMatchError, UsageError
from jobrunner_lib.core.models import Job

MIN_FRAGMENT = 3
ID_RE = re.compile(r"^[a-z2-7]{16}$")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").lower()


def job_id(request_id: str, action: str) -> str:
    """Deterministic job id: base32 of the first 10 bytes of SHA-1("<request id>\\n<action>")."""
    return _b32(hashlib.sha1(f"{request_id}\n{action}".encode()).digest()[:10])


def new_request_id() -> str:
    """A fresh request id in the website's form: 10 random bytes, base32, lower-case."""
    return _b32(os.urandom(10))


@dataclass(frozen=True)
class Target:
    """What a fragment may mean: one job, or one request (all its jobs)."""

    kind: str  # "job" or "request"
    id: str
    jobs: tuple[Job, ...]

    def describe(self) -> str:
        """One line for pickers and the ambiguity list: id, action, state, workspace."""
        if self.kind == "job":
            job = self.jobs[0]
            return f"{job.id}  {job.action}  {job.state.value}  {job.workspace}"
        workspace = self.jobs[0].workspace if self.jobs else ""
        return f"{self.id}  (request: {len(self.jobs)} jobs)  {workspace}"


def targets_for(fragment: str, candidates: Iterable[Job]) -> list[Target]:
    """The distinct targets a fragment matches among candidate jobs (pure)."""
    frag = fragment.lower()
    jobs: dict[str, Target] = {}
    requests: dict[str, list[Job]] = {}
    for job in candidates:
        if frag in job.id.lower():
            jobs[job.id] = Target("job", job.id, (job,))
        if frag in job.job_request_id.lower():
            requests.setdefault(job.job_request_id, []).append(job)
    targets = list(jobs.values()) + [
        Target("request", rid, tuple(js)) for rid, js in requests.items()
    ]
    exact = [t for t in targets if t.id.lower() == frag]
    return exact[:1] if exact else targets


def read_ids(stream: TextIO) -> list[str]:
    """IDs from a pipe: the first field of each line, skipping blanks, comments and a header."""
    found = []
    for line in stream:
        fields = line.split()
        if not fields or fields[0].startswith("#") or fields[0].lower() in ("id", "job_id"):
            continue
        found.append(fields[0])
    return found


Chooser = Callable[[str, Sequence[Target]], Target]


def expand_args(args: Sequence[str], stdin: TextIO | None) -> list[str]:
    """Replace `-` by the IDs read from standard input; check every fragment's length."""
    fragments: list[str] = []
    for arg in args:
        if arg == "-":
            if stdin is None:
                raise UsageError("'-' given but standard input is not available")
            fragments.extend(read_ids(stdin))
        else:
            fragments.append(arg.strip())
    for frag in fragments:
        if len(frag) < MIN_FRAGMENT:
            raise UsageError(
                f"ID fragment {frag!r} is too short: give at least {MIN_FRAGMENT} characters"
            )
    return fragments


def resolve(
    search: Callable[[str], Iterable[Job]], fragments: Sequence[str], choose: Chooser | None
) -> list[Job]:
    """Resolve fragments to jobs (request targets expand to all their jobs), first seen first.

    `search(fragment)` gives the jobs whose id or request id may contain it (the store's
    queries.search_ids). `choose` is called for an ambiguous fragment; without one, ambiguity
    raises AmbiguousError listing the candidates. A fragment that matches nothing raises
    NoMatchError.
    """
    chosen: dict[str, Job] = {}
    for frag in fragments:
        targets = targets_for(frag, search(frag))
        if not targets:
            raise NoMatchError(f"No jobs found matching '{frag}'")
        if len(targets) > 1:
            if choose is None:
                listing = "\n".join("  " + t.describe() for t in targets[:50])
                more = f"\n  ... and {len(targets) - 50} more" if len(targets) > 50 else ""
                raise AmbiguousError(
                    f"'{frag}' matches {len(targets)} jobs or requests; give more "
                    f"characters or use --pick:\n{listing}{more}"
                )
            targets = [choose(frag, targets)]
        for job in targets[0].jobs:
            chosen.setdefault(job.id, job)
    return list(chosen.values())
