"""Hostile jobs: a job's code is untrusted, so what it does must stay inside its container and volume.

Each test runs real jobs on the real Docker engine, driven in-process by the worker's own code
(`drive_job`), and checks what an attacker would try: the network, privileges, the PID table,
other jobs' volumes, and outputs built to trick the copy out (symlinks, odd names, FIFOs, huge
numbers of files, big files). Whatever the job does, the runner must end it with a clear result,
never crash, and never write outside the job's workspace directories.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import Job, State, StatusCode
from jobrunner_lib.docker import copyout
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker.tarstream import VolumeFile
from jobrunner_lib.jobs.executor import LocalDockerExecutor
from jobrunner_lib.jobs.worker import drive_job
from jobrunner_lib.store import db
from tests.reliability.conftest import SOAK, make_config, study_with
from tests.support.factories import Jobs
from tests.support.waiting import wait_for


def docker_test(test):
    """A test running real jobs: needs Docker, and labels (then removes) what it creates."""
    return pytest.mark.docker(pytest.mark.usefixtures("labelled")(test))


SCRIPTS = {
    # For each host:port argument: "open" if a TCP connection was made, else "closed <error>".
    "probe_net.sh": """
        mkdir -p output
        for t in "$@"; do
            if nc -w 3 "${t%:*}" "${t##*:}" </dev/null >/dev/null 2>/tmp/err; then
                echo "$t open" >> output/net.txt
            else
                echo "$t closed $(cat /tmp/err)" >> output/net.txt
            fi
        done
    """,
    "privileges.sh": """
        mkdir -p output
        {
            echo "uid=$(id -u) gid=$(id -g)"
            grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
            mkdir -p /tmp/m
            mount -t tmpfs none /tmp/m 2>/dev/null; echo "mount=$?"
            (echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null; echo "proc_sys=$?"
            mknod /tmp/null c 1 3 2>/dev/null; echo "mknod=$?"
            mknod output/device.txt c 1 3 2>/dev/null; echo "mknod_output=$?"
            ln /etc/passwd output/passwd.txt 2>/dev/null; echo "hardlink_etc=$?"
            unshare -r true 2>/dev/null; echo "user_namespace=$?"
            chroot / true 2>/dev/null; echo "chroot=$?"
            touch /etc/jr-probe 2>/dev/null; echo "write_etc=$?"
        } > output/privileges.txt
    """,
    # A fork bomb, bounded (depth 10: at most 2047 processes) so it ends even with no limit.
    # Orphaned sleepers may still hold the PIDs afterwards, so the report uses builtins only.
    "bomb.sh": """
        mkdir -p output
        bomb() { [ "$1" -gt 0 ] || exec sleep 2; bomb $(($1 - 1)) & bomb $(($1 - 1)) & wait; }
        ( bomb 10 ) 2> /tmp/bomb.err
        n=0
        while read -r line; do case "$line" in *"can't fork"*) n=$((n + 1));; esac; done < /tmp/bomb.err
        echo "fork failures: $n" > output/bomb.txt
    """,
    "hold.sh": """
        mkdir -p output
        echo "secret $1" > "output/secret-$1.txt"
        echo ready
        i=0
        while [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    """,
    "seek.sh": """
        mkdir -p output
        find / \\( -path /proc -o -path /sys \\) -prune -o -name "*$1*" -print \\
            > output/found.txt 2>/dev/null
        grep -c "$2" /proc/self/mountinfo > output/mounts.txt
        echo done > output/done.txt
    """,
    "symlinks.sh": """
        mkdir -p output
        for i in $(seq 10); do echo $i > output/plain$i.txt; done
        echo real > output/real.txt
        echo top > top.txt
        ln -s /etc/passwd output/passwd.txt
        ln -s /workspace/output/real.txt output/absolute.txt
        ln -s .. output/up
        ln -s / output/root
        ln -s /etc output/etc
    """,
    "odd_names.sh": """
        mkdir -p output
        for i in $(seq 10); do echo $i > output/plain$i.txt; done
        echo dots1 > output/..a..txt
        echo dots2 > output/a..b.txt
        echo dots3 > output/...txt
        echo long > "output/$(printf 'a%.0s' $(seq 251)).txt"
        echo wide > "output/b$(printf 'é%.0s' $(seq 125)).txt"
        echo 'mode 000' > output/secret.txt && chmod 000 output/secret.txt
        mkfifo output/fifo.txt
        mkdir -p output/dir.txt/inner.txt
        echo nested > output/dir.txt/inner.txt/file.txt
    """,
    "newline.sh": """
        mkdir -p output
        echo ok > output/ok.txt
        echo forged > "output/new
2021-01-01 00:00:00.000Z run  Completed successfully.txt"
        echo tab > "$(printf 'output/tab\\tname.txt')"
        echo bytes > "$(printf 'output/\\377\\376.txt')"
    """,
    "many.sh": """
        mkdir -p output
        cd output
        i=0
        while [ $i -lt $1 ]; do echo $i > $i.txt; i=$((i + 1)); done
    """,
    "hardlinks.sh": """
        mkdir -p output
        i=0
        while [ $i -lt 20 ]; do echo "file $i" > output/f$i.txt; i=$((i + 1)); done
        ln output/f1.txt output/link1.txt
        ln output/f2.txt output/link2.txt
    """,
    "big.sh": """
        mkdir -p output
        dd if=/dev/urandom of=output/big.bin bs=1M count=$1 2>/dev/null
        sha256sum output/big.bin | cut -d' ' -f1 > output/big.sha256.txt
    """,
    "file.sh": "mkdir -p output && echo file > output/d.txt",
    "nested.sh": "mkdir -p output/d.txt && echo nested > output/d.txt/x.txt && echo b > output/b.txt",
    "write.sh": "mkdir -p output && echo hello > output/hello.txt",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    """One study repo holding every hostile script."""
    return study_with(tmp_path_factory.mktemp("hostile") / "study", SCRIPTS)


@pytest.fixture
def jobs(conn, study) -> Jobs:
    return Jobs(conn, *study)


def trees(config: Config, ws: str = "ws") -> tuple[Path, Path]:
    return (
        config.high_privacy_storage_base / "workspaces" / ws,
        config.medium_privacy_storage_base / "workspaces" / ws,
    )


def log_text(config: Config, job: Job) -> str:
    (directory,) = (config.high_privacy_storage_base / "logs").glob(f"*/os-job-{job.id}")
    return (directory / "logs.txt").read_text()


def finished(job: Job | None) -> Job:
    """The job, checked to have ended cleanly (a final state, never an internal error)."""
    assert job is not None and job.state.is_final, job
    assert job.status_code is not StatusCode.INTERNAL_ERROR, (job.status_message, job.error_detail)
    return job


# ---- what a job may write on the host ------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under root (never following links): relative path -> (mode, size, mtime_ns)."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            entries[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return entries


@contextmanager
def confined(base: Path, config: Config, *workspaces: str) -> Iterator[None]:
    """Check that whatever happens inside writes only where a job's results belong."""
    before = snapshot(base)
    yield
    after = snapshot(base)
    work = config.workdir
    allowed = [
        *(tree for ws in workspaces or ("ws",) for tree in trees(config, ws)),
        config.high_privacy_storage_base / "logs",
        *(work / d for d in ("repos", "temp", "locks", "logs")),
    ]
    for rel, (mode, _size, _mtime) in after.items():
        if before.get(rel) == (mode, _size, _mtime) or stat.S_ISDIR(mode):
            continue
        path = base / rel
        if path.parent == work and ".sqlite" in path.name:
            continue  # the job store and the stats store (and their journals)
        if path.is_relative_to(config.volumes_dir):
            continue  # inside a job's own volume (host storage): whatever the job made
        assert any(path.is_relative_to(a) for a in allowed), f"written outside: {path}"
        assert stat.S_ISREG(mode), f"not a regular file: {path} ({stat.filemode(mode)})"
        assert not path.name.startswith(".jr-tmp-"), f"temporary file left behind: {path}"
    for rel in set(before) - set(after):
        path = base / rel
        if path.is_relative_to(config.volumes_dir):
            continue  # a job's volume, removed with it
        assert any(path.is_relative_to(a) for a in allowed), f"deleted outside: {path}"


# ---- network -------------------------------------------------------------------------------------


class Listener:
    """A TCP listener on the host counting the connections it accepts."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def bridge_gateway() -> str | None:
    """The docker0 address, if the default bridge is usable here."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"docker0"))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def outside_address() -> str:
    """The host's own address on its default route (as seen by anything outside)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        return s.getsockname()[0]


@pytest.fixture
def neighbour(docker_label: str) -> Iterator[str]:
    """A labelled busybox web server on the default bridge; its ip:port."""
    gateway = bridge_gateway()
    if gateway is None:
        pytest.skip(
            "no docker0 bridge on this host (a dockerd started with --bridge=none deletes it)"
        )
    key, _, value = docker_label.partition("=")
    container = docker.client().containers.run(
        "jr-busybox:latest",
        ["httpd", "-f", "-p", "8080", "-h", "/etc"],
        detach=True,
        labels={key: value},
        network_mode="bridge",
    )
    try:
        container.reload()
        ip = container.attrs["NetworkSettings"]["IPAddress"]
        # Reachable from the host: the probe below must be what tells it apart, not a dead server.
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((ip, 8080), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the neighbour container at {ip}:8080 never answered")
                time.sleep(0.1)
        yield f"{ip}:8080"
    finally:
        container.remove(force=True)


def probe_results(config: Config) -> dict[str, str]:
    lines = (trees(config)[0] / "output/net.txt").read_text().splitlines()
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}


@docker_test
@pytest.mark.timeout(240)
def test_job_reaches_no_network_unless_it_needs_the_database(tmp_path, study, neighbour):
    gateway = bridge_gateway()
    assert gateway is not None
    listeners = [Listener("127.0.0.1"), Listener(gateway), Listener(outside_address())]
    targets = [
        *(listener.address for listener in listeners),
        neighbour,
        "1.1.1.1:53",  # a public DNS server: no lookups, no exfiltration through DNS
        "93.184.215.14:80",  # a public web server
    ]
    # A real-data backend: only database jobs get a network there (docs/architecture.md#docker-objects-and-labels).
    config = make_config(
        tmp_path,
        BACKEND="tpp",
        USING_DUMMY_DATA_BACKEND="false",
        DUMMY_DATABASE_URL="mssql://db/x",
        DOCKER_REGISTRY="jr-demo",
        HELPER_IMAGE="jr-busybox:latest",
    )
    conn = db.connect(config.db_path)
    jobs = Jobs(conn, *study)
    spec = {"moderately_sensitive": {"net": "output/net.txt"}}
    try:
        with confined(tmp_path, config):
            job = finished(
                drive_job(
                    config,
                    jobs.add("probe", ["python:v1", "analysis/probe_net.sh", *targets], spec).id,
                )
            )
        assert job.state is State.SUCCEEDED, job.status_message
        results = probe_results(config)
        print("\nno-network job:", *(f"{k} -> {v}" for k, v in results.items()), sep="\n  ")
        assert set(results) == set(targets)
        assert all(v.startswith("closed") for v in results.values()), results
        # 127.0.0.1 inside the container is the container's own loopback, never the host's.
        assert "Connection refused" in results[listeners[0].address]
        for target in targets[1:]:
            assert "Network is unreachable" in results[target], (target, results[target])
        assert [listener.accepted for listener in listeners] == [0, 0, 0]

        # The same probe as a database job: it gets the default bridge (no DATABASE_NETWORK set),
        # which shows that the probe does detect a reachable address.
        db_job = jobs.add(
            "probe_db",
            ["python:v1", "analysis/probe_net.sh", neighbour],
            spec,
            workspace="db",
            requires_db=True,
        )
        db_job = drive_job(config, db_job.id)
        if bridge_gateway() is None:  # see the neighbour fixture
            pytest.skip("docker0 was deleted while the test ran; the control job proves nothing")
        assert finished(db_job).state is State.SUCCEEDED, db_job.status_message
        net = (trees(config, "db")[0] / "output/net.txt").read_text()
        assert f"{neighbour} open" in net, net
    finally:
        conn.close()
        for listener in listeners:
            listener.close()


# ---- privileges and limits -----------------------------------------------------------------------


@docker_test
def test_job_runs_without_privileges(config, jobs, tmp_path):
    spec = {"moderately_sensitive": {"p": "output/privileges.txt"}}
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("privileges", "python:v1 analysis/privileges.sh", spec).id)
        )
    assert job.state is State.SUCCEEDED, job.status_message
    lines = (trees(config)[0] / "output/privileges.txt").read_text().splitlines()
    print("\n" + "\n".join(lines))
    found = dict(
        line.replace(":\t", "=").split("=", 1) for line in lines if "=" in line or ":\t" in line
    )
    assert lines[0] == "uid=1000 gid=1000"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(found[cap], 16) == 0, (cap, found[cap])
    assert found["NoNewPrivs"] == "1" and found["Seccomp"] == "2"
    for attempt in (
        "mount",
        "proc_sys",
        "mknod",
        "mknod_output",  # so a device node can never reach the outputs (none is copied anyway)
        "hardlink_etc",
        "user_namespace",
        "chroot",
        "write_etc",
    ):
        assert found[attempt] != "0", f"{attempt} succeeded inside the job"
    assert not (trees(config)[0] / "output/device.txt").exists()
    assert not (trees(config)[0] / "output/passwd.txt").exists()


@docker_test
@pytest.mark.timeout(240)
def test_fork_bomb_is_contained_and_other_jobs_are_fine(tmp_path, study):
    config = make_config(tmp_path, JOB_PIDS_LIMIT="64")
    conn = db.connect(config.db_path)
    try:
        jobs = Jobs(conn, *study)
        bomb = jobs.add(
            "bomb", "python:v1 analysis/bomb.sh", {"moderately_sensitive": {"b": "output/bomb.txt"}}
        )
        other = jobs.add(
            "write",
            "python:v1 analysis/write.sh",
            {"moderately_sensitive": {"h": "output/hello.txt"}},
            workspace="other",
        )
        results: dict[str, Job | None] = {}
        neighbour = threading.Thread(
            target=lambda: results.update(other=drive_job(config, other.id))
        )
        started = time.monotonic()
        with confined(tmp_path, config, "ws", "other"):
            neighbour.start()
            results["bomb"] = drive_job(config, bomb.id)
            neighbour.join(120)
        elapsed = time.monotonic() - started
        bombed = finished(results["bomb"])
        assert finished(results["other"]).state is State.SUCCEEDED
        report = (trees(config)[0] / "output/bomb.txt").read_text().strip()
        print(
            f"\nfork bomb under JOB_PIDS_LIMIT=64: {bombed.state.value}, {report}, {elapsed:.1f}s"
        )
        assert int(report.split(": ")[1]) > 0, "the bomb never hit the PID limit"
        # The runner keeps working: a job started after the bomb runs normally.
        after = jobs.add(
            "write",
            "python:v1 analysis/write.sh",
            {"moderately_sensitive": {"h": "output/hello.txt"}},
            workspace="after",
        )
        assert finished(drive_job(config, after.id)).state is State.SUCCEEDED
    finally:
        conn.close()


@docker_test
@pytest.mark.timeout(240)
def test_a_job_cannot_see_another_jobs_volume(config, jobs, tmp_path):
    token = uuid.uuid4().hex
    holder = jobs.add(
        "hold",
        ["python:v1", "analysis/hold.sh", token],
        {"highly_sensitive": {"s": "output/secret-*.txt"}},
        workspace="a",
    )
    results: dict[str, Job | None] = {}
    thread = threading.Thread(target=lambda: results.update(holder=drive_job(config, holder.id)))
    thread.start()
    try:
        wait_for_log(docker.container_name(holder.id), b"ready", 60)
        seeker = jobs.add(
            "seek",
            ["python:v1", "analysis/seek.sh", token, docker.volume_name(holder.id)],
            {"moderately_sensitive": {"f": "output/*.txt"}},
            workspace="b",
        )
        seeker = finished(drive_job(config, seeker.id))
        assert seeker.state is State.SUCCEEDED, seeker.status_message
        high_b = trees(config, "b")[0]
        assert (high_b / "output/done.txt").exists()
        assert (high_b / "output/found.txt").read_text() == "", "the other job's file was found"
        assert (high_b / "output/mounts.txt").read_text().strip() == "0"
    finally:
        with db.connect(config.db_path) as c:
            c.execute("UPDATE job SET cancelled = 1 WHERE id = ?", (holder.id,))
        thread.join(60)
    assert finished(results["holder"]).status_code is StatusCode.CANCELLED_BY_USER


def wait_for_log(container: str, text: bytes, timeout: float) -> None:
    """Wait until the container exists and has printed text."""
    wait_for(
        lambda: (
            docker.inspect_container(container) is not None
            and text in b"".join(docker.container_logs(container, timestamps=False))
        ),
        timeout,
        f"{container} to print {text!r}",
        interval=0.1,
    )


# ---- outputs built to trick the copy -------------------------------------------------------------


@pytest.fixture(params=["archive", "per-file"])
def copy_mode(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Copy outputs out through directory archives where possible, or always one by one."""
    monkeypatch.setattr(copyout, "DIRECTORY_MIN_FILES", 2 if request.param == "archive" else 10**9)
    return request.param


@docker_test
def test_symlinked_outputs_are_never_followed(config, jobs, tmp_path, copy_mode):
    spec = {
        "moderately_sensitive": {
            "all": "output/*.txt",
            "up": "output/up/*.txt",
            "etc": "output/etc/*",
            "root": "output/root/etc/passwd",
        }
    }
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("symlinks", "python:v1 analysis/symlinks.sh", spec).id)
        )
    assert (job.state, job.status_code) == (State.FAILED, StatusCode.UNMATCHED_PATTERNS)
    assert job.status_message.splitlines()[1:] == [
        " - output/up/*.txt",
        " - output/etc/*",
        " - output/root/etc/passwd",
    ]
    expected = ["real.txt", *(f"plain{i}.txt" for i in range(1, 11))]
    assert job.outputs == {f"output/{name}": "moderately_sensitive" for name in expected}
    for tree in trees(config):
        assert sorted(p.name for p in (tree / "output").iterdir()) == sorted(expected)
    everything = b"".join(
        p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and "study" not in p.parts
    )
    assert b"root:x:0:0" not in everything


@docker_test
def test_odd_but_legal_names_fifos_and_directories(config, jobs, tmp_path, copy_mode):
    spec = {"moderately_sensitive": {"all": "output/*.txt"}}
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("odd", "python:v1 analysis/odd_names.sh", spec).id)
        )
    assert job.state is State.SUCCEEDED, job.status_message
    long_name = f"output/{'a' * 251}.txt"
    wide_name = f"output/b{'é' * 125}.txt"
    expected = {
        "output/..a..txt": "dots1\n",
        "output/a..b.txt": "dots2\n",
        "output/...txt": "dots3\n",
        long_name: "long\n",
        wide_name: "wide\n",
        "output/secret.txt": "mode 000\n",
        **{f"output/plain{i}.txt": f"{i}\n" for i in range(1, 11)},
    }
    assert len(os.fsencode(Path(long_name).name)) == 255 == len(os.fsencode(Path(wide_name).name))
    assert set(job.outputs) == set(expected)  # no FIFO, no directory named like an output
    for tree in trees(config):
        for path, content in expected.items():
            assert (tree / path).read_text() == content
        assert not (tree / "output/fifo.txt").exists() and not (tree / "output/dir.txt").exists()


@docker_test
def test_names_with_control_characters_or_bad_bytes_fail_the_job_clearly(
    config, jobs, tmp_path, copy_mode
):
    spec = {"moderately_sensitive": {"all": "output/*.txt"}}
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("newline", "python:v1 analysis/newline.sh", spec).id)
        )
    assert (job.state, job.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    print(f"\n{job.status_message}")
    assert job.status_message.startswith(
        "JobError: Output file names must be UTF-8 without control"
    )
    assert "\n" not in job.status_message and "\\n2021-01-01" in job.status_message
    assert "tab\\tname" in job.status_message and "output/\\xff\\xfe.txt" in job.status_message
    assert job.outputs == {"output/ok.txt": "moderately_sensitive"}
    for tree in trees(config):
        assert sorted(p.name for p in (tree / "output").iterdir()) == ["ok.txt"]
    # No forged line in the job's log: the name is only ever shown escaped.
    assert not any(line.startswith("2021-01-01") for line in log_text(config, job).splitlines())


@docker_test
def test_hard_links_inside_the_volume_are_copied_as_files(config, jobs, tmp_path, copy_mode):
    spec = {"moderately_sensitive": {"all": "output/*.txt"}}
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("links", "python:v1 analysis/hardlinks.sh", spec).id)
        )
    assert job.state is State.SUCCEEDED, job.status_message
    assert len(job.outputs) == 22
    for tree in trees(config):
        assert (tree / "output/link1.txt").read_text() == "file 1\n"
        assert (tree / "output/link2.txt").read_text() == "file 2\n"
        assert (tree / "output/f19.txt").read_text() == "file 19\n"
        assert (tree / "output/link1.txt").stat().st_nlink == 1


@docker_test
def test_an_output_clashing_with_the_workspace_is_a_job_error(config, jobs, tmp_path):
    first = jobs.add(
        "file", "python:v1 analysis/file.sh", {"moderately_sensitive": {"d": "output/d.txt"}}
    )
    assert finished(drive_job(config, first.id)).state is State.SUCCEEDED
    spec = {"moderately_sensitive": {"x": "output/*/x.txt", "b": "output/b.txt"}}
    with confined(tmp_path, config):
        job = finished(
            drive_job(config, jobs.add("nested", "python:v1 analysis/nested.sh", spec).id)
        )
    assert (job.state, job.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    assert job.status_message == (
        "JobError: Cannot write output output/d.txt/x.txt: output/d.txt is a file in the workspace"
    )
    high, medium = trees(config)
    assert (high / "output/d.txt").read_text() == "file\n"  # the other action's output is intact
    assert (medium / "output/b.txt").read_text() == "b\n"  # the rest is still copied
    assert "state: failed" in log_text(config, job)


@docker_test
def test_a_big_output_is_copied_complete(config, jobs, tmp_path):
    megabytes = 1024 if SOAK else 200
    spec = {
        "highly_sensitive": {"big": "output/big.bin"},
        "moderately_sensitive": {"sum": "output/big.sha256.txt"},
    }
    started = time.monotonic()
    with confined(tmp_path, config):
        job = finished(
            drive_job(
                config, jobs.add("big", ["python:v1", "analysis/big.sh", str(megabytes)], spec).id
            )
        )
    assert job.state is State.SUCCEEDED, job.status_message
    high, medium = trees(config)
    digest = hashlib.sha256()
    with open(high / "output/big.bin", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    assert (high / "output/big.bin").stat().st_size == megabytes * 2**20
    assert digest.hexdigest() == (high / "output/big.sha256.txt").read_text().strip()
    assert not (medium / "output/big.bin").exists()
    print(f"\n{megabytes} MB output: job end to end {time.monotonic() - started:.1f}s")


@docker_test
@pytest.mark.timeout(600)
def test_many_tiny_outputs(config, conn, jobs, tmp_path):
    # 100 000 under JR_SOAK; 10 000 still takes ~15 minutes with one copy call per file.
    count = 100_000 if SOAK else 10_000
    spec = {"moderately_sensitive": {"all": "output/*.txt"}}
    job = jobs.add("many", ["python:v1", "analysis/many.sh", str(count)], spec)
    executor = LocalDockerExecutor(config, conn)
    started = time.monotonic()
    executor.prepare(job)
    executor.execute(job)
    assert docker.wait_container(docker.container_name(job.id), 300) == 0
    written = time.monotonic()
    with confined(tmp_path, config):
        job = finished(drive_job(config, job.id))  # finds the container exited: finalizes
    finalized = time.monotonic()
    print(
        f"\n{count} tiny outputs: the job wrote them in {written - started:.1f}s, "
        f"finalize (list, match, copy to both trees, clean up) took {finalized - written:.1f}s"
    )
    assert job.state is State.SUCCEEDED, job.status_message
    assert len(job.outputs) == count
    for tree in trees(config):
        names = os.listdir(tree / "output")
        assert len(names) == count
        for i in (0, 1, 4242, count - 1):
            assert (tree / f"output/{i}.txt").read_text() == f"{i}\n"
    # About 0.4 ms per file on a slow disk (two files written, both renamed); 90 ms with a
    # Docker call per file, as before.
    assert finalized - written < count * 0.002 + 30, "finalize is too slow for many small files"


# ---- how outputs are fetched (no Docker) ---------------------------------------------------------


def listing(**sizes: int) -> list[VolumeFile]:
    """A volume listing from `name=size` (`__` stands for `/`)."""
    return [VolumeFile(name.replace("__", "/"), size, 0) for name, size in sizes.items()]


def test_many_outputs_in_a_directory_come_in_one_archive() -> None:
    files = [VolumeFile(f"output/{i}.txt", 2, 0) for i in range(100)]
    files += [VolumeFile("output/sub/a.txt", 2, 0), VolumeFile("analysis/x.sh", 10, 0)]
    wanted = [f.path for f in files if f.path.endswith(".txt")]
    plan = copyout.plan_copies(files, wanted)
    assert plan.single == [] and list(plan.directories) == ["output"]
    assert sorted(plan.directories["output"]) == sorted(wanted)  # subdirectories come along
    assert copyout.member_name("output", "output/sub/a.txt") == "output/sub/a.txt"
    assert copyout.member_name("a/b", "a/b/c.txt") == "b/c.txt"
    assert copyout.member_name("", "c.txt") == "workspace/c.txt"


def test_a_directory_holding_big_unwanted_files_is_not_archived() -> None:
    # e.g. a large input beside the outputs: streaming it only to drop it would be waste.
    files = [VolumeFile(f"output/{i}.csv", 10, 0) for i in range(20)]
    files.append(VolumeFile("output/input.csv", 10 * 2**30, 0))
    wanted = [f"output/{i}.csv" for i in range(20)]
    plan = copyout.plan_copies(files, wanted)
    assert plan.directories == {} and plan.single == wanted


def test_a_few_outputs_are_copied_one_by_one() -> None:
    files = listing(output__a_csv=1, output__b_csv=1, c_txt=1)
    plan = copyout.plan_copies(files, ["output/a_csv", "c_txt"])
    assert plan.directories == {} and plan.single == ["output/a_csv", "c_txt"]
