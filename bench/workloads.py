"""End-to-end workloads: generated studies run by jr on real Docker, next to their physical floors.

Each run of a workload is a fresh WORKDIR, a real git study (tests/support/studies.py), one
`bin/jr-add-job` and one `service/jr-service --until-idle`, timed from the submission to the last
job's "Completed successfully" line in workers.log (the worker's own timestamp, in ms). Every job
must succeed or the workload fails loudly (a broken bench never prints a figure).

Workloads:
  W1        one trivial action                      floor: one `docker run --rm` doing the same
  W10       ten independent trivial actions         floor: docker run x 10 / MAX_WORKERS
  W20chain  twenty actions, each needing the last   floor: docker run x 20 (per job: target <= 1.5x)
  W50fan    one, 48 parallel needing it, one after  floor: docker run x (2 + 48 / MAX_WORKERS)
  Wbig      500 MB highly_sensitive out, then read  floor: the same with the docker CLI (run,
            by a second action                        docker cp out, docker cp in, start); <= 1.5x
  lag       the largest gap between status posts of a running job while another job's 5 GB
            input is copied in, with jr-sync talking to the fake jobs website on the service's
            normal loop (POLL_INTERVAL=2, MAX_WORKERS=2); floor POLL_INTERVAL, target <= 2x

Usage: .venv/bin/python bench/workloads.py [--quick] [--only W1,W10,...]
Every Docker object carries `org.jr.bench=<uuid>` (JR_EXTRA_LABELS) and is removed at the end.
"""

from __future__ import annotations

import argparse
import calendar
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import ROOT, report

from jobrunner_lib.core.config import load_config
from jobrunner_lib.core.ids import job_id, new_request_id
from jobrunner_lib.core.models import JobRequest, Msg, State, StatusCode, new_job
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import tool_env
from tests.support.studies import make_study

IMAGE = "python:v1"  # as project.yaml names it; jr runs jr-demo/python:v1
FULL_IMAGE = "jr-demo/python:v1"
HELPER_IMAGE = "jr-busybox:latest"
PY = sys.executable
MB = 1 << 20
GB = 1 << 30
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})Z ")
TRIVIAL = 'mkdir -p output\necho "$1" > "output/$1.txt"\n'
# Write the file in one go, as a real extraction would (busybox dd).
BIG_WRITE = "mkdir -p output\ndd if=/dev/zero of=output/big.bin bs=1048576 count=$1 2>/dev/null\n"
BIG_READ = "mkdir -p output\nwc -c < output/big.bin > output/size.txt\n"


def note(text: str) -> None:
    """A comment line among the figures (kept in the README table, ignored by parsers)."""
    print(f"# {text}", flush=True)


def default_storage() -> str:
    """VOLUME_STORAGE as jr decides it when nothing sets it (host on Linux with a local daemon)."""
    return load_config(environ=dict(os.environ), env_file=Path(os.devnull) / "none").volume_storage


def default_max_workers() -> float:
    """MAX_WORKERS as jr computes it when nothing sets it (CPUs - 1, at least 1)."""
    return load_config(environ={}, env_file=Path(os.devnull) / "none").max_workers


# ---- Docker housekeeping --------------------------------------------------------------------------


class Labels:
    """One `org.jr.bench=<uuid>` label per bench process; removes exactly its own objects."""

    def __init__(self) -> None:
        self.value = f"org.jr.bench={uuid.uuid4().hex}"

    def remove_objects(self) -> None:
        from jobrunner_lib.docker import engine as jr_docker

        client = jr_docker.client()
        for container in client.containers.list(all=True, filters={"label": self.value}):
            container.remove(force=True)
        for volume in client.volumes.list(filters={"label": self.value}):
            volume.remove(force=True)


def check_images() -> None:
    """The demo images must be built already (`make images`); say so instead of a stack trace."""
    for image in (FULL_IMAGE, HELPER_IMAGE):
        found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
        if found.returncode != 0:
            raise SystemExit(f"bench: Docker image {image} is missing: run `make images` first")


def docker(*args: str, label: str | None = None, quiet: bool = True) -> None:
    """Run the docker CLI (the floor's way of doing things); fail loudly."""
    argv = ["docker", *args]
    if label is not None:  # `docker run/create ... --label` must come before the image
        argv = ["docker", args[0], "--label", label, *args[1:]]
    subprocess.run(
        argv, check=True, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE
    )


# ---- studies --------------------------------------------------------------------------------------


def action(
    name: str,
    script: str,
    *,
    args: str = "",
    needs: Sequence[str] = (),
    moderately: dict[str, str] | None = None,
    highly: dict[str, str] | None = None,
) -> str:
    """One action of a v4 project.yaml."""
    lines = [f"  {name}:", f"    run: {IMAGE} {script}{' ' + args if args else ''}"]
    if needs:
        lines.append(f"    needs: [{', '.join(needs)}]")
    lines.append("    outputs:")
    for level, outs in (("moderately_sensitive", moderately), ("highly_sensitive", highly)):
        if outs:
            lines.append(f"      {level}:")
            lines += [f"        {k}: {v}" for k, v in outs.items()]
    return "\n".join(lines)


def trivial(name: str, needs: Sequence[str] = ()) -> str:
    return action(
        name, "analysis/x.sh", args=name, needs=needs, moderately={"out": f"output/{name}.txt"}
    )


def project(actions: Sequence[str]) -> str:
    return 'version: "4.0"\n\nactions:\n' + "\n\n".join(actions) + "\n"


FILES = {"analysis/x.sh": TRIVIAL, "analysis/big.sh": BIG_WRITE, "analysis/read.sh": BIG_READ}


# ---- one end-to-end run ---------------------------------------------------------------------------


def log_time(line: str) -> float | None:
    """Unix time of a house-format log line (`2021-07-21 18:54:58.792Z ...`)."""
    m = LOG_TIME.match(line)
    if not m:
        return None
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def log_events(workdir: Path, message: str) -> dict[str, float]:
    """{job id: time of the first workers.log line whose message starts with `message`}."""
    events: dict[str, float] = {}
    path = workdir / "logs" / "workers.log"
    wanted = re.compile(r"\dZ \S+\s+" + re.escape(message))
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if wanted.search(line) and (m := re.search(r" id=(\S+)", line)):
            at = log_time(line)
            if at is not None:
                events.setdefault(m.group(1), at)
    return events


def job_states(workdir: Path) -> dict[str, tuple[str, str, str]]:
    """{job id: (action, state, status message)} straight from the store."""
    conn = sqlite3.connect(workdir / "db.sqlite")
    try:
        return {
            r[0]: (r[1], r[2], r[3] or "")
            for r in conn.execute("SELECT id, action, state, status_message FROM job")
        }
    finally:
        conn.close()


def wait_workers(workdir: Path, limit: float = 120) -> None:
    """Wait for every job worker to exit (one may still be cleaning up after its job ended)."""
    if not (workdir / "db.sqlite").exists():
        return
    conn = sqlite3.connect(workdir / "db.sqlite")
    try:
        pids = {
            r[0] for r in conn.execute("SELECT worker_pid FROM job WHERE worker_pid IS NOT NULL")
        }
    finally:
        conn.close()
    deadline = time.monotonic() + limit
    for pid in pids:
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def run_e2e(study: Path, labels: Labels, jobs: int, timeout: float = 900, **settings: str) -> float:
    """Submit run_all of `study` in a fresh WORKDIR, run the service until idle; return seconds
    from the submission to the last job's completion. `settings` go in jr's environment."""
    with tempfile.TemporaryDirectory(prefix="jr-bench-") as tmp:
        workdir = Path(tmp) / "workdir"
        env = tool_env(workdir, JR_EXTRA_LABELS=labels.value, **settings)
        service_log = Path(tmp) / "service.log"
        start = time.time()
        subprocess.run(
            [PY, str(ROOT / "bin" / "jr-add-job"), str(study), "--workspace", "bench", "-o", "ids"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        with open(service_log, "wb") as err:
            done = subprocess.run(
                [str(ROOT / "service" / "jr-service"), "--until-idle"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=timeout,
            )
        states = job_states(workdir)
        bad = {j: s for j, s in states.items() if s[1] != State.SUCCEEDED.value}
        if done.returncode != 0 or bad or len(states) != jobs:
            tail = service_log.read_text(errors="replace")[-3000:]
            raise SystemExit(
                f"bench: run failed (service exit {done.returncode}, {len(states)} jobs of "
                f"{jobs}, not succeeded: {list(bad.values())[:5]}):\n{tail}"
            )
        wait_workers(workdir)
        finished = log_events(workdir, f"{Msg.SUCCEEDED} status=")
        if len(finished) != jobs:
            raise SystemExit(
                f"bench: found {len(finished)} completion lines in workers.log, expected {jobs}"
            )
        labels.remove_objects()  # none should be left; this keeps a leak from skewing the next run
        return max(finished.values()) - start


def floor_docker_run(labels: Labels, runs: int) -> list[float]:
    """`docker run --rm` of the same image doing the same trivial thing, per job."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        docker(
            "run",
            "--rm",
            "--network",
            "none",
            FULL_IMAGE,
            "-c",
            "mkdir -p /tmp/output && echo a > /tmp/output/a.txt",
            label=labels.value,
        )
        times.append(time.perf_counter() - start)
    return times


def run_trivial_job(api: Any, binds: dict, labels: dict[str, str], name: str) -> str:
    """Create, start and wait for a job container writing one output; inspect it and read its
    log, as jr's finalize does. Its id."""
    job = api.create_container(
        FULL_IMAGE,
        ["-c", "mkdir -p /workspace/output && echo a > /workspace/output/a.txt"],
        host_config=binds,
        labels=labels,
        name=name,
    )["Id"]
    api.start(job)
    api.wait(job)
    api.inspect_container(job)
    api.logs(job, timestamps=True)
    return job


def floor_host_volume_job(labels: Labels, runs: int) -> list[float]:
    """The work jr's host storage (VOLUME_STORAGE=host) does for one trivial job, bare, per job.

    A directory with the code written in it, the job container created with it bind-mounted,
    started and waited for, inspected, its log read, the output read on the host, the container
    removed and the directory deleted: `docker run --rm`'s work plus a few file operations.
    """
    from jobrunner_lib.docker import engine as jr_docker

    api = jr_docker.client().api
    key, _, value = labels.value.partition("=")
    times = []
    with tempfile.TemporaryDirectory(prefix="jr-bench-floor-") as tmp:
        for _ in range(runs):
            name = f"jr-bench-floor-{uuid.uuid4().hex[:12]}"
            start = time.perf_counter()
            root = Path(tmp) / name
            (root / "analysis").mkdir(parents=True)
            (root / "analysis/x.sh").write_text(TRIVIAL)
            root.chmod(0o777)
            binds = api.create_host_config(
                binds={str(root): {"bind": "/workspace", "mode": "rw"}}, network_mode="none"
            )
            job = run_trivial_job(api, binds, {key: value}, name)
            (root / "output/a.txt").read_bytes()
            api.remove_container(job)
            shutil.rmtree(root)
            times.append(time.perf_counter() - start)
    return times


def floor_volume_job(labels: Labels, runs: int) -> list[float]:
    """The Docker work jr's Docker storage (VOLUME_STORAGE=docker) does for one trivial job, as
    bare SDK calls, per job.

    A volume, a stopped helper holding it, the code copied in (put_archive), the job container
    created, started and waited for, inspected, its log read, one output stat'd and copied out
    (get_archive), then all three removed: what a job costs the daemon before any of jr's own
    work, to set beside `docker run --rm` (which copies nothing in or out).
    """
    import io
    import tarfile

    from jobrunner_lib.docker import engine as jr_docker

    api = jr_docker.client().api
    key, _, value = labels.value.partition("=")
    label = {key: value}
    code = io.BytesIO()
    with tarfile.open(fileobj=code, mode="w") as tar:
        info = tarfile.TarInfo("workspace/analysis/x.sh")
        info.size = len(TRIVIAL)
        tar.addfile(info, io.BytesIO(TRIVIAL.encode()))
    times = []
    for _ in range(runs):
        name = f"jr-bench-floor-{uuid.uuid4().hex[:12]}"
        start = time.perf_counter()
        api.create_volume(name, labels=label)
        binds = api.create_host_config(
            binds={name: {"bind": "/workspace", "mode": "rw"}}, network_mode="none"
        )
        helper = api.create_container(
            "jr-busybox", ["true"], host_config=binds, labels=label, name=f"{name}-h"
        )["Id"]
        api.put_archive(helper, "/", code.getvalue())
        job = run_trivial_job(api, binds, label, name)
        api.head(api._url("/containers/{0}/archive", helper), params={"path": "/workspace/output"})
        stream, _stat = api.get_archive(helper, "/workspace/output/a.txt")
        b"".join(stream)
        api.remove_container(job)
        api.remove_container(helper)
        api.remove_volume(name)
        times.append(time.perf_counter() - start)
    return times


# ---- the workloads --------------------------------------------------------------------------------


@dataclass
class Ctx:
    quick: bool
    labels: Labels
    tmp: Path
    max_workers: float
    floors: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        # Five: a trivial job's time varies by a tenth from run to run on a shared machine.
        return 1 if self.quick else 5

    def floor_sample(self) -> float:
        """The per-job floor now: the median of three `docker run --rm`. Measured right before
        each jr run, so that both see the same machine (others' work comes and goes)."""
        sample = statistics.median(floor_docker_run(self.labels, 3))
        self.floors.append(sample)
        return sample

    def volume_floor_sample(self, storage: str) -> float:
        """The per-job floor of jr's design now with this VOLUME_STORAGE, the median of three."""
        floor = floor_host_volume_job if storage == "host" else floor_volume_job
        return statistics.median(floor(self.labels, 3))


def e2e(
    ctx: Ctx,
    name: str,
    actions: Sequence[str],
    files: dict[str, str] | None = None,
    volume_floor: list[float] | None = None,
    storage: str | None = None,
) -> tuple[list[float], list[float]]:
    """(jr's end-to-end seconds, the per-job floor measured just before) for each run.

    storage sets VOLUME_STORAGE (None: jr's default here). Given a list, volume_floor gets the
    per-job floor of jr's design with that storage, measured alongside.
    """
    study, _sha = make_study(ctx.tmp / name, project(actions), files or FILES)
    settings = {"VOLUME_STORAGE": storage} if storage else {}
    jr, floor = [], []
    for _ in range(ctx.runs):
        floor.append(ctx.floor_sample())
        if volume_floor is not None:
            volume_floor.append(ctx.volume_floor_sample(storage or default_storage()))
        jr.append(run_e2e(study, ctx.labels, len(actions), **settings))
    return jr, floor


def scaled(samples: Sequence[float], factor: float) -> list[float]:
    return [s * factor for s in samples]


def w1(ctx: Ctx) -> None:
    samples, floor = e2e(ctx, "W1", [trivial("a00")])
    report("W1_e2e", samples, floor=floor)


def w10(ctx: Ctx) -> None:
    n = 10
    samples, floor = e2e(ctx, "W10", [trivial(f"a{i:02d}") for i in range(n)])
    report("W10_e2e", samples, floor=scaled(floor, n / ctx.max_workers))


def w20chain(ctx: Ctx) -> None:
    n = 5 if ctx.quick else 20
    names = [f"c{i:02d}" for i in range(n)]
    actions = [trivial(a, needs=names[i - 1 : i]) for i, a in enumerate(names)]
    design: list[float] = []
    samples, floor = e2e(ctx, "W20chain", actions, volume_floor=design)
    storage = default_storage()
    note(f"W{n}chain: VOLUME_STORAGE={storage} (jr's default here)")
    report(f"W{n}chain_e2e", samples, floor=scaled(floor, n))
    report(f"W{n}chain_per_job", scaled(samples, 1 / n), floor=floor)
    # The same per-job time against the bare work of jr's design (floor_host_volume_job).
    report(f"W{n}chain_per_job_vs_design_floor", scaled(samples, 1 / n), floor=design)
    report(f"floor_{storage}_volume_job_vs_docker_run", design, floor=floor)
    if storage == "docker" or ctx.quick:
        return
    # The other storage, side by side: volumes in Docker, files through its archive API.
    design = []
    samples, floor = e2e(ctx, "W20chain", actions, volume_floor=design, storage="docker")
    report(f"W{n}chain_docker_storage_per_job", scaled(samples, 1 / n), floor=floor)
    report(f"W{n}chain_docker_storage_vs_design_floor", scaled(samples, 1 / n), floor=design)
    report("floor_docker_volume_job_vs_docker_run", design, floor=floor)


def w50fan(ctx: Ctx) -> None:
    width = 8 if ctx.quick else 48
    fan = [f"f{i:02d}" for i in range(width)]
    actions = [
        trivial("root"),
        *(trivial(f, needs=["root"]) for f in fan),
        trivial("combine", needs=fan),
    ]
    samples, floor = e2e(ctx, "W50fan", actions)
    # The critical path: root, the fan `MAX_WORKERS` at a time, then combine (jobs / concurrency
    # when MAX_WORKERS is 1).
    factor = 2 + width / ctx.max_workers
    report(f"W{width + 2}fan_e2e", samples, floor=scaled(floor, factor))
    report(f"W{width + 2}fan_per_job", scaled(samples, 1 / factor), floor=floor)


def big_floor(ctx: Ctx, size_mb: int) -> tuple[float, float, float, float]:
    """One run of the docker-CLI equivalent of Wbig, and its parts: (whole, cp out, cp in, host cp)."""
    label = ctx.labels.value
    with tempfile.TemporaryDirectory(prefix="jr-bench-floor-", dir=ctx.tmp) as tmp:
        name = f"jr-bench-{uuid.uuid4().hex[:12]}"
        local = Path(tmp) / "big.bin"
        start = time.perf_counter()
        docker(
            "run",
            "--name",
            f"{name}-w",
            "--network",
            "none",
            FULL_IMAGE,
            "-c",
            f"mkdir -p /o && dd if=/dev/zero of=/o/big.bin bs=1048576 count={size_mb} 2>/dev/null",
            label=label,
        )
        t0 = time.perf_counter()
        docker("cp", f"{name}-w:/o/big.bin", str(local))
        cp_out = time.perf_counter() - t0
        docker("rm", f"{name}-w")
        docker(
            "create",
            "--name",
            f"{name}-r",
            "--network",
            "none",
            FULL_IMAGE,
            "-c",
            "wc -c < /big.bin > /size.txt",
            label=label,
        )
        t0 = time.perf_counter()
        docker("cp", str(local), f"{name}-r:/big.bin")
        cp_in = time.perf_counter() - t0
        docker("start", "-a", f"{name}-r")
        docker("cp", f"{name}-r:/size.txt", str(Path(tmp) / "size.txt"))
        docker("rm", f"{name}-r")
        whole = time.perf_counter() - start
        t0 = time.perf_counter()
        shutil.copyfile(local, Path(tmp) / "copy.bin")
        with open(Path(tmp) / "copy.bin", "rb+") as fh:
            os.fsync(fh.fileno())  # the copy's data on disk, not only in the page cache
        host = time.perf_counter() - t0
    return whole, cp_out, cp_in, host


def wbig(ctx: Ctx) -> None:
    size_mb = 50 if ctx.quick else 500
    free = shutil.disk_usage(ctx.tmp).free
    if free < 5 * size_mb * MB + 2 * GB:  # the volume, the workspace copy, the floor's two copies
        size_mb = max(10, int((free - 2 * GB) / 5 / MB))
        note(f"Wbig: only {free / GB:.1f} GB free: scaled down to {size_mb} MB")
    actions = [
        action("write", "analysis/big.sh", args=str(size_mb), highly={"big": "output/big.bin"}),
        action("read", "analysis/read.sh", needs=["write"], moderately={"size": "output/size.txt"}),
    ]
    study, _sha = make_study(ctx.tmp / "Wbig", project(actions), FILES)
    samples, whole, cp_out, cp_in, host = [], [], [], [], []
    for _ in range(ctx.runs):  # floor and jr alternately, so both see the same machine
        for acc, value in zip((whole, cp_out, cp_in, host), big_floor(ctx, size_mb), strict=True):
            acc.append(value)
        samples.append(run_e2e(study, ctx.labels, len(actions)))
    report(f"floor_host_cp_{size_mb}MB", host)
    report(
        f"floor_docker_cp_out_in_{size_mb}MB",
        [a + b for a, b in zip(cp_out, cp_in, strict=True)],
        floor=scaled(host, 2),
    )
    report(f"Wbig_{size_mb}MB_e2e", samples, floor=whole)


# ---- check-in lag ---------------------------------------------------------------------------------


def lag(ctx: Ctx) -> None:
    """Largest gap between status posts of a running job while another job copies a big input in."""
    from tests.support.fake_jobserver import FakeJobServer

    poll, max_workers = 2.0, 2
    size = 500 * MB if ctx.quick else 5 * GB
    consumers = 1 if ctx.quick else 3
    free = shutil.disk_usage(ctx.tmp).free
    if free < 2 * size + 2 * GB:  # the seeded input and one job volume at a time
        size = max(50 * MB, int((free - 2 * GB) / 2))
        note(f"lag: only {free / GB:.1f} GB free: input scaled down to {size / GB:.2f} GB")
    label_size = f"{size / GB:g}GB" if size >= GB else f"{size // MB}MB"
    note(
        f"lag: POLL_INTERVAL={poll:g} MAX_WORKERS={max_workers}, {consumers} copy-in(s) of {label_size}"
    )
    names = [f"consumer{i}" for i in range(consumers)]
    actions = [
        action("producer", "analysis/big.sh", args="1", highly={"big": "output/big.bin"}),
        action("sleeper", "analysis/sleep.sh", moderately={"out": "output/sleeper.txt"}),
        *(
            action(
                n,
                "analysis/consume.sh",
                args=n,
                needs=["producer"],
                moderately={"out": f"output/{n}.txt"},
            )
            for n in names
        ),
    ]
    files = {
        **FILES,
        "analysis/sleep.sh": "sleep 3600\n",
        "analysis/consume.sh": 'mkdir -p output\nls -l output/big.bin > "output/$1.txt"\n',
    }
    study, sha = make_study(ctx.tmp / "lag", project(actions), files)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    with (
        tempfile.TemporaryDirectory(prefix="jr-bench-lag-", dir=ctx.tmp) as tmp,
        FakeJobServer() as server,
    ):
        workdir = Path(tmp) / "workdir"
        seed_producer(workdir, study, sha, size)
        env = tool_env(
            workdir,
            JOB_SERVER_ENDPOINT=server.url,
            JOB_SERVER_TOKEN=server.token,
            POLL_INTERVAL=f"{poll:g}",
            MAX_WORKERS=str(max_workers),
            JR_EXTRA_LABELS=ctx.labels.value,
            NO_PROXY="127.0.0.1,localhost",
        )
        workspace = {"name": "lag", "repo": str(study), "branch": "main"}
        service_log = Path(tmp) / "service.log"
        with open(service_log, "wb") as err:
            service = subprocess.Popen(
                [str(ROOT / "service" / "jr-service")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            # The sleeper first, alone, so it is surely running before any copy starts.
            first = server.add_request(sha=sha, requested_actions=["sleeper"], workspace=workspace)
            sleeper = wait_for(
                workdir,
                lambda s: any(
                    a == "sleeper" and st == "running" and m == Msg.RUNNING
                    for a, st, m in s.values()
                ),
                120,
                service_log,
            )
            sleeper_id = next(j for j, (a, _st, _m) in sleeper.items() if a == "sleeper")
            server.add_request(sha=sha, requested_actions=names, workspace=workspace)
            limit = 120 + consumers * size / (20 * MB)  # very generous: 20 MB/s
            wait_for(
                workdir,
                lambda s: (
                    sum(a in names and st in ("succeeded", "failed") for a, st, _m in s.values())
                    == consumers
                ),
                limit,
                service_log,
            )
            server.cancel(first["identifier"])
            states = wait_for(
                workdir,
                lambda s: all(st in ("succeeded", "failed") for _a, st, _m in s.values()),
                120,
                service_log,
            )
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=120)
            except subprocess.TimeoutExpired:
                service.kill()
            wait_workers(workdir)
        bad = [(a, m) for a, st, m in states.values() if a in names and st != "succeeded"]
        if bad:
            raise SystemExit(
                f"bench: lag consumers failed: {bad}\n{service_log.read_text()[-3000:]}"
            )
        starts = log_events(workdir, "Copying input file")
        ends = log_events(workdir, "Started status=")  # the container starts right after the copy
        consumer_ids = [j for j, (a, _st, _m) in states.items() if a in names]
        offset = time.time() - time.monotonic()  # the fake server stamps posts with monotonic time
        posts = sorted(
            at + offset for at, job in server.history[sleeper_id] if job["status"] == "running"
        )
        gaps, copies = [], []
        for cid in consumer_ids:
            a, b = starts[cid], ends[cid]
            copies.append(b - a)
            inside = [t for t in posts if a <= t <= b]
            before = [t for t in posts if t < a][-1:]
            after = [t for t in posts if t > b][:1]
            seq = before + inside + after
            if len(seq) < 2:
                raise SystemExit(
                    f"bench: fewer than two status posts around the copy window {a}..{b}"
                )
            gaps.append(max(y - x for x, y in zip(seq, seq[1:], strict=False)))
        ctx.labels.remove_objects()
    report(f"lag_copy_in_{label_size}", copies)
    report(f"lag_max_post_gap_during_{label_size}_copy_in", gaps, floor=[poll])


def seed_producer(workdir: Path, study: Path, sha: str, size: int) -> None:
    """The big input as if `producer` had made it: the file in the workspace, a succeeded job."""
    target = workdir / "high_privacy" / "workspaces" / "lag" / "output" / "big.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    chunk = b"\0" * (8 * MB)
    with open(target, "wb") as fh:  # real blocks (not a sparse file): reading them costs disk I/O
        left = size
        while left > 0:
            left -= fh.write(chunk[: min(left, len(chunk))])
        fh.flush()
        os.fsync(fh.fileno())
    request = JobRequest(
        id=new_request_id(),
        repo_url=str(study),
        commit=sha,
        branch="main",
        requested_actions=["producer"],
        cancelled_actions=[],
        workspace="lag",
        database_name="full",
    )
    job = new_job(
        job_id(request.id, "producer"),
        request,
        "producer",
        State.SUCCEEDED,
        StatusCode.SUCCEEDED,
        Msg.SUCCEEDED,
        run_command=f"{IMAGE} analysis/big.sh 1",
        output_spec={"highly_sensitive": {"big": "output/big.bin"}},
        outputs={"output/big.bin": "highly_sensitive"},
    )
    conn = db.connect(workdir / "db.sqlite")
    db_queries.insert_request(conn, request, [job])
    conn.close()


def wait_for(workdir: Path, done: Callable[[dict], bool], limit: float, log: Path) -> dict:
    """Poll the store until `done(states)`; fail loudly after `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (workdir / "db.sqlite").exists():
            states = job_states(workdir)
            if states and done(states):
                return states
        time.sleep(0.25)
    raise SystemExit(
        f"bench: timed out after {limit:.0f}s; service log:\n{log.read_text()[-3000:]}"
    )


# ---- main -----------------------------------------------------------------------------------------

WORKLOADS: dict[str, Callable[[Ctx], None]] = {
    "W1": w1,
    "W10": w10,
    "W20chain": w20chain,
    "W50fan": w50fan,
    "Wbig": wbig,
    "lag": lag,
}


def run(names: Sequence[str], quick: bool) -> None:
    """Run the named workloads (in WORKLOADS order), removing every Docker object they made."""
    check_images()
    labels = Labels()
    max_workers = default_max_workers()
    note(
        f"MAX_WORKERS={max_workers:g} (jr's default here: CPUs - 1, at least 1; {os.cpu_count()} CPUs)"
    )
    note(
        "POLL_INTERVAL=5 (jr's default) for W*; a job's worker starts what its end unblocks at once"
    )
    with tempfile.TemporaryDirectory(prefix="jr-bench-") as tmp:
        ctx = Ctx(quick=quick, labels=labels, tmp=Path(tmp), max_workers=max_workers)
        try:
            for name, workload in WORKLOADS.items():
                if name in names:
                    workload(ctx)
            if ctx.floors:
                report("floor_docker_run_rm", ctx.floors)  # every sample behind the ratios above
        finally:
            labels.remove_objects()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one run each, smaller sizes (a smoke test)"
    )
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="comma-separated workloads to run"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}: choose from {list(WORKLOADS)}")
    run(names, args.quick)


if __name__ == "__main__":
    main()
