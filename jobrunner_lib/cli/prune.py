"""jr-prune: free disk from what this backend left behind in Docker and in $WORKDIR/temp, and only that."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.models import Job, StatusCode
from jobrunner_lib.docker import images as docker_images
from jobrunner_lib.docker import mounts, volumes
from jobrunner_lib.ops import objects as service
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import parse_since

log = logging.getLogger(__name__)

COLUMNS = ["kind", "name", "job_id", "size_bytes", "result"]
TABLE_COLUMNS = ["kind", "name", "job_id", "size", "result"]
TEMP_MAX_AGE = 86400  # a checkout lives for minutes; a day-old one was abandoned by a crash
JOB_ID_LABEL = "org.jr.job-id"
# Labels scripts/build-images puts on the images it builds: the name it was built as.
IMAGE_NAME_LABEL = "org.jr.image"


@dataclass
class Item:
    """One thing to remove: a Docker object, a temp file or directory, or a stale hung flag."""

    kind: str  # container | helper | volume | image | temp | flag
    name: str
    job_id: str = ""
    size: int | None = None
    ref: str = ""  # what to remove by: Docker id or name, path, flag name

    def row(self, result: str) -> dict[str, Any]:
        """The item as an output row."""
        return {
            "id": self.name,
            "kind": self.kind,
            "name": self.name,
            "job_id": self.job_id,
            "size_bytes": "" if self.size is None or self.size < 0 else str(self.size),
            "size": service.human_size(self.size),
            "result": result,
        }


def prunable(job: Job | None, include_failed: bool, cutoff: float | None) -> bool:
    """May this job's leftovers go? Final or unknown jobs, except kept internal errors."""
    if job is None:
        return True  # unknown to the state store: nothing will ever use it
    if not job.state.is_final:
        return False
    if job.status_code is StatusCode.INTERNAL_ERROR and not include_failed:
        # Kept on purpose for jr-retry, unless older than --older-than.
        finished = job.completed_at or job.updated_at
        return cutoff is not None and finished < cutoff
    return True


def job_id_of(labels: Mapping[str, str] | None, name: str) -> str:
    """The job an object belongs to: its job-id label, else parsed from its name."""
    if labels and labels.get(JOB_ID_LABEL):
        return labels[JOB_ID_LABEL]
    for prefix, suffix in (("os-volume-", "-manager"), ("os-volume-", ""), ("os-job-", "")):
        if name.startswith(prefix) and name.endswith(suffix):
            return name[len(prefix) : len(name) - len(suffix)] if suffix else name[len(prefix) :]
    return ""


def container_kind(name: str) -> str:
    """`helper` for a volume's manager container, else `container`."""
    return "helper" if name.endswith("-manager") else "container"


def repository(reference: str) -> str:
    """`reg:5000/org/python:v1` or `.../python@sha256:…` -> `reg:5000/org/python`."""
    reference = reference.split("@", 1)[0]
    head, _, last = reference.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def dangling_images(
    images: Iterable[Mapping[str, Any]], repos: set[str], used: set[str]
) -> list[Mapping[str, Any]]:
    """Untagged images that came from one of our repositories and no container uses."""
    found = []
    for image in images:
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        if tags or image.get("Id") in used:
            continue
        names = list(image.get("RepoDigests") or [])
        if (image.get("Labels") or {}).get(IMAGE_NAME_LABEL):
            names.append(image["Labels"][IMAGE_NAME_LABEL])
        if any(repository(n) in repos for n in names if not n.startswith("<none>")):
            found.append(image)
    return found


def tree_stats(path: Path) -> tuple[float, int]:
    """(newest mtime, total bytes) of a file or directory tree, never following symlinks."""
    st = path.lstat()
    newest, total = st.st_mtime, st.st_size
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    s = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                newest = max(newest, s.st_mtime)
                total += s.st_size if name in files else 0
    return newest, total


def stale_temp(temp_dir: Path, now: float) -> list[Item]:
    """Entries of $WORKDIR/temp nothing has touched for a day."""
    items = []
    try:
        entries = sorted(temp_dir.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            newest, total = tree_stats(entry)
        except OSError:
            continue
        if now - newest > TEMP_MAX_AGE:
            items.append(Item("temp", str(entry), size=total, ref=str(entry)))
    return items


def docker_usage(*, outage_ok: bool = False) -> dict[str, Any] | None:
    """Docker's own disk usage (`docker system df`), or None if it cannot be had.

    A daemon that cannot be reached is DockerUnavailable (exit 75) unless outage_ok: after the
    removals, when only the report's numbers are missing.
    """
    from jobrunner_lib.docker import engine as docker

    try:
        return docker_images.disk_usage()
    except docker.DockerUnavailable as exc:
        if not outage_ok:
            raise
        log.warning(f"Could not read Docker's disk usage: {exc}")
    except (docker.DockerTimeout, OSError) as exc:  # the SDK's APIError is an OSError
        log.warning(f"Could not read Docker's disk usage: {exc}")
    return None


def usage_total(df: Mapping[str, Any] | None) -> int | None:
    """Bytes Docker uses for images, containers and volumes."""
    if df is None:
        return None
    total = int(df.get("LayersSize") or 0)
    total += sum(max(0, c.get("SizeRw") or 0) for c in df.get("Containers") or [])
    total += sum(
        max(0, (v.get("UsageData") or {}).get("Size") or 0) for v in df.get("Volumes") or []
    )
    return total


class Prune(Tool):
    name = "jr-prune"
    component = "prune"
    description = """Free disk from what this backend made, and only that: containers, helpers and
volumes labelled job-runner and org.jr.backend=$BACKEND, and volume directories in $VOLUMES_DIR
(VOLUME_STORAGE=host), whose job is final (or unknown to the state store), except those of jobs that failed with internal_error (kept for jr-retry) unless
--include-failed or older than --older-than; never anything of a pending or running job. Also
stale files in $WORKDIR/temp (older than a day) and untagged images of the allowed repositories
that no container uses. Containers the copy guard flagged as hung are listed, never touched.
Prints what it removed, the space Docker reports reclaimed and the size of the files removed."""
    epilog = """examples:
  jr-prune --dry-run                      what would go, and how much space
  jr-prune --yes                          remove it without asking
  jr-prune --include-failed --yes         also the kept internal-error leftovers
  jr-prune --older-than 14d --yes         also internal-error leftovers finished over 14 days ago"""
    output = True
    destructive = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--include-failed",
            action="store_true",
            help="also remove leftovers of internal_error jobs (kept for jr-retry otherwise)",
        )
        parser.add_argument(
            "--older-than",
            metavar="AGE",
            help="also remove internal_error leftovers of jobs finished before AGE (7d, 2h, a date)",
        )

    def run(self, ctx: Context) -> int:
        from jobrunner_lib.docker import engine as docker

        args, config = ctx.args, ctx.config
        assert config is not None
        try:
            cutoff = parse_since(args.older_than) if args.older_than else None
        except UsageError:
            raise UsageError(
                f"--older-than {args.older_than!r}: expected an age like 7d or 12h, or a date "
                "like 2021-11-03"
            ) from None
        docker.ping()
        before = docker_usage()
        hung = service.hung_containers(ctx.conn)
        items, warnings = self.collect(ctx, hung, cutoff, before)
        for line in warnings:
            ctx.stderr.write(f"warning: {line}\n")
        if not items:
            ctx.say("nothing to prune")
            ctx.emit([], COLUMNS, table_columns=TABLE_COLUMNS)
            return 0
        sizes = [i.size for i in items if i.size is not None and i.size > 0]
        plan = [f"About to remove {len(items)} item(s), about {service.human_size(sum(sizes))}:"]
        plan += [
            f"  {i.kind:<9} {i.name}  {i.job_id}  {service.human_size(i.size)}".rstrip()
            for i in items
        ]
        if not ctx.confirm(plan, "prune"):
            if args.dry_run:
                rows = [i.row("would remove") for i in items]
                ctx.emit(rows, COLUMNS, table_rows=rows, table_columns=TABLE_COLUMNS)
            return 0
        rows, failed, temp_freed = [], False, 0
        for item in items:
            try:
                self.remove(ctx, item)
            except Exception as exc:  # noqa: BLE001 - one stuck object must not stop the rest
                if isinstance(exc, docker.DockerUnavailable):
                    raise
                failed = True
                result = f"failed: {type(exc).__name__}: {exc}"
                ctx.stderr.write(f"{self.name}: {item.kind} {item.name}: {result}\n")
            else:
                result = "removed"
                if item.kind == "temp" or Path(item.ref).is_absolute():
                    temp_freed += item.size or 0
                log.info(f"Removed {item.kind} {item.name}")
            rows.append(item.row(result))
        ctx.emit(rows, COLUMNS, table_rows=rows, table_columns=TABLE_COLUMNS)
        after = docker_usage(outage_ok=True)
        total_before, total_after = usage_total(before), usage_total(after)
        docker_freed = (
            service.human_size(max(0, total_before - total_after))
            if total_before is not None and total_after is not None
            else "an unknown amount"
        )
        ctx.say(
            f"reclaimed {docker_freed} in Docker (docker system df before and after)"
            + (f" and {service.human_size(temp_freed)} of files" if temp_freed else "")
        )
        return 1 if failed else 0

    def collect(
        self, ctx: Context, hung: dict[str, str], cutoff: float | None, df: Mapping[str, Any] | None
    ) -> tuple[list[Item], list[str]]:
        """Everything that may go, in removal order (containers before volumes), and warnings."""
        from jobrunner_lib.docker import engine as docker

        config = ctx.config
        assert config is not None
        # Docker first, then the store: a job's row exists before any of its objects, so an
        # object whose job we cannot find really has no job.
        containers = docker.list_containers(config.backend)
        docker_volumes = docker.list_volumes(config.backend)
        host_volumes = volumes.host_volumes(config)
        ids = (
            {
                job_id_of(c.get("Labels"), c["Names"][0].lstrip("/"))
                for c in containers
                if c.get("Names")
            }
            | {job_id_of(v.get("Labels"), v["Name"]) for v in docker_volumes}
            | set(host_volumes)
        )
        jobs = {job.id: job for job in db_queries.get_jobs(ctx.conn, sorted(i for i in ids if i))}
        sizes = {c["Id"]: c.get("SizeRw") for c in (df or {}).get("Containers") or []}
        vsizes = {
            v["Name"]: (v.get("UsageData") or {}).get("Size")
            for v in (df or {}).get("Volumes") or []
        }
        args = ctx.args
        warnings: list[str] = []
        stuck_jobs = set()
        names = set()
        for c in containers:
            name = (c.get("Names") or ["/?"])[0].lstrip("/")
            names.add(name)
            if name in hung:
                job_id = job_id_of(c.get("Labels"), name)
                stuck_jobs.add(job_id)
                warnings.append(
                    f"hung container {name} (job {job_id}, flagged {hung[name]}): not touched; "
                    "restarting Docker clears it"
                )
        for c in containers:
            labels = c.get("Labels") or {}
            if mounts.is_mount(labels) and c.get("State") == "running":
                # An operator is looking inside with jr-mount: not now.
                job_id = job_id_of(labels, "")
                stuck_jobs.add(job_id)
                warnings.append(f"jr-mount is open on job {job_id}: its objects are left alone")
        items: list[Item] = []
        for c in containers:
            name = c["Names"][0].lstrip("/") if c.get("Names") else c["Id"]
            job_id = job_id_of(c.get("Labels"), name)
            if job_id in stuck_jobs or not prunable(jobs.get(job_id), args.include_failed, cutoff):
                continue
            items.append(Item(container_kind(name), name, job_id, sizes.get(c["Id"]), c["Id"]))
        for v in docker_volumes:
            job_id = job_id_of(v.get("Labels"), v["Name"])
            if job_id in stuck_jobs or not prunable(jobs.get(job_id), args.include_failed, cutoff):
                continue
            items.append(Item("volume", v["Name"], job_id, vsizes.get(v["Name"]), v["Name"]))
        for job_id, path in sorted(host_volumes.items()):
            # A host-stored volume (VOLUME_STORAGE=host): the directory is the volume.
            if job_id in stuck_jobs or not prunable(jobs.get(job_id), args.include_failed, cutoff):
                continue
            items.append(Item("volume", str(path), job_id, tree_stats(path)[1], str(path)))
        items += self.images(config, df)
        items += stale_temp(config.temp_dir, time.time())
        for name in sorted(set(hung) - names):
            items.append(Item("flag", f"hung:{name}", ref=f"hung:{name}"))
        return items, warnings

    @staticmethod
    def images(config: Any, df: Mapping[str, Any] | None) -> list[Item]:
        """Untagged images of the configured registry's allowed repositories no container uses."""
        repos = {repository(config.image_name(name)) for name in config.allowed_images}
        used = {str(c.get("ImageID")) for c in docker_images.all_containers()}
        sizes = {i["Id"]: i for i in (df or {}).get("Images") or []}
        items = []
        for image in dangling_images(docker_images.list_images(dangling=True), repos, used):
            info = sizes.get(image["Id"]) or image
            size = info.get("Size")
            shared = info.get("SharedSize")
            if size is not None and shared is not None and shared >= 0:
                size -= shared
            digests = [d for d in image.get("RepoDigests") or [] if not d.startswith("<none>")]
            label = (image.get("Labels") or {}).get(IMAGE_NAME_LABEL)
            shown = repository(digests[0]) if digests else repository(label or "")
            items.append(Item("image", f"{shown}@{image['Id'][:19]}", size=size, ref=image["Id"]))
        return items

    @staticmethod
    def remove(ctx: Context, item: Item) -> None:
        """Remove one item."""
        from jobrunner_lib.docker import engine as docker

        if item.kind in ("container", "helper"):
            docker.remove_container(item.ref)
        elif item.kind == "volume" and Path(item.ref).is_absolute():
            assert ctx.config is not None
            volumes.remove_host_dir(ctx.config, Path(item.ref))
        elif item.kind == "volume":
            docker.remove_volume(item.ref)
        elif item.kind == "image":
            docker_images.remove_image(item.ref)
        elif item.kind == "temp":
            path = Path(item.ref)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        elif item.kind == "flag":
            store_flags.set_flag(ctx.conn, item.ref, None)


def main() -> None:
    """Entry point."""
    run_tool(Prune)
