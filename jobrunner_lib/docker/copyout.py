"""Copying a job's matched outputs out of its volume in a few Docker calls instead of one per file.

A `get_archive` call costs tens of milliseconds whatever its size, so a job writing 100 000 small
files would spend hours in finalize with one call per file. Where a directory holds many of the
wanted files, one archive of that directory is streamed instead and only the wanted members are
written (each through a temporary file renamed into place, as for single files). A directory
archive also carries the files we do not want (inputs, code, unmatched files), so it is used only
when those are a small part of it; everything else is copied file by file. Non-regular members
are never written: they go through the single-file path, which refuses them.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract, tarstream
from jobrunner_lib.docker import files as docker_files

# A directory archive pays off from a handful of files (each single copy costs a Docker call).
DIRECTORY_MIN_FILES = 8
# Bytes of unwanted files a directory archive may carry beyond the wanted bytes it brings.
UNWANTED_BYTES_ALLOWED = 64 * 2**20


@dataclass
class CopyPlan:
    """Directories to archive (with the wanted paths each brings) and paths to copy one by one."""

    directories: dict[str, list[str]] = field(default_factory=dict)
    single: list[str] = field(default_factory=list)


def plan_copies(
    files: Sequence[tarstream.VolumeFile],
    wanted: Iterable[str],
    *,
    min_files: int | None = None,
    unwanted_allowed: int | None = None,
) -> CopyPlan:
    """Choose directory archives for wanted paths from a volume listing (paths relative to it)."""
    min_files = DIRECTORY_MIN_FILES if min_files is None else min_files
    if unwanted_allowed is None:
        unwanted_allowed = UNWANTED_BYTES_ALLOWED
    wanted = list(dict.fromkeys(wanted))
    wanted_set = set(wanted)
    sizes = {f.path: f.size for f in files}
    # Bytes under each directory (recursively), all files and wanted ones: what an archive carries.
    total: Counter[str] = Counter()
    useful: Counter[str] = Counter()
    for path, size in sizes.items():
        for directory in _ancestors(path):
            total[directory] += size
            if path in wanted_set:
                useful[directory] += size
    direct = Counter(posixpath.dirname(path) for path in wanted)
    plan = CopyPlan()
    chosen: list[str] = []
    # Shallowest first: an archive of a directory also brings its subdirectories' files.
    for directory in sorted(direct, key=lambda d: (d.count("/") if d else -1, d)):
        if direct[directory] < min_files or any(_under(directory, c) for c in chosen):
            continue
        unwanted = total[directory] - useful[directory]
        if unwanted > max(useful[directory], unwanted_allowed):
            continue  # e.g. output/ also holds large inputs: copy its outputs one by one
        chosen.append(directory)
    for path in wanted:
        home = next((c for c in chosen if _under(posixpath.dirname(path), c)), None)
        if home is None:
            plan.single.append(path)
        else:
            plan.directories.setdefault(home, []).append(path)
    return plan


def _ancestors(path: str) -> list[str]:
    """Every directory containing path, the volume root ("") included."""
    parts = path.split("/")[:-1]
    return [""] + ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _under(directory: str, ancestor: str) -> bool:
    return ancestor == "" or directory == ancestor or directory.startswith(ancestor + "/")


def member_name(directory: str, path: str) -> str:
    """The name `path` has in an archive of `/workspace/<directory>` (rooted at its base name)."""
    root = posixpath.basename(f"{docker.WORKSPACE}/{directory}".rstrip("/"))
    rest = path[len(directory) + 1 :] if directory else path
    return f"{root}/{rest}"


def copy_outputs(
    helper: str,
    files: Sequence[tarstream.VolumeFile],
    destinations: Mapping[str, Sequence[Path]],
    *,
    progress: tarstream.Progress,
    stall_timeout: float,
    starting: Callable[[str], None] = lambda path: None,
) -> None:
    """Copy every path in destinations (relative to the volume) to each of its destinations.

    `starting(path)` is called before each file's copy begins (for the log). Raises
    tarstream.UnsafeArchive for a path that is not a regular file, and BrokenContainerError if a
    copy stops moving for stall_timeout seconds.
    """
    plan = plan_copies(files, destinations)
    single = list(plan.single)
    for directory, paths in plan.directories.items():
        for path in paths:
            starting(path)
        by_member = {member_name(directory, p): p for p in paths}
        written, _refused = _copy_directory(
            helper,
            directory,
            {m: destinations[p] for m, p in by_member.items()},
            progress=progress,
            stall_timeout=stall_timeout,
        )
        # Not a plain file in the archive, or not in it at all: the single-file copy decides
        # (it copies a regular file and refuses anything else).
        single.extend(p for m, p in by_member.items() if m not in written)
    for path in single:
        starting(path)
        first, *others = destinations[path]
        docker_files.copy_file_out(
            helper,
            f"{docker.WORKSPACE}/{path}",
            first,
            progress=progress,
            stall_timeout=stall_timeout,
        )
        for other in others:
            extract.atomic_copy(first, other)


def _copy_directory(
    helper: str,
    directory: str,
    wanted: Mapping[str, Sequence[Path]],
    *,
    progress: tarstream.Progress,
    stall_timeout: float,
) -> tuple[set[str], set[str]]:
    source = f"{docker.WORKSPACE}/{directory}" if directory else docker.WORKSPACE
    what = f"copy of {source} out of {helper}"

    def call() -> tuple[set[str], set[str]]:
        # engine.py's own error translation and files.py's hang guard, as for single files.
        with docker.calls(what):
            stream, _stat = docker.client().api.get_archive(
                helper, source, chunk_size=tarstream.CHUNK
            )
            try:
                reader = cast(IO[bytes], extract.IterReader(stream, progress))
                return extract.extract_members(reader, wanted, progress)
            finally:
                getattr(stream, "close", lambda: None)()

    return docker_files.guarded(call, helper, progress, stall_timeout, what)
