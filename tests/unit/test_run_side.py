"""Pure parts of the run side: tar streams, the hung-copy guard, listings, environment, log trailer."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from jobrunner_lib.core.config import load_config
from jobrunner_lib.core.models import Job, State, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract, tarstream
from jobrunner_lib.jobs import stats
from jobrunner_lib.jobs.executor import (
    job_environment,
    job_network,
    job_user_ids,
    parse_run_command,
    remove_stale_temps,
)
from jobrunner_lib.jobs.finalize import REDACTED, decide, redact_environment, trailer


def config(**env: str):
    return load_config(environ={"JR_ENV_FILE": "/nonexistent", **env})


def job(**fields) -> Job:
    return Job(id="abcdabcdabcdabcd", job_request_id="r", state=State.RUNNING, **fields)


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


# -- names and labels --


def test_names_and_labels_carry_the_job_id_and_extra_test_labels(monkeypatch):
    monkeypatch.setenv(docker.EXTRA_LABELS_ENV, "org.jr.test=abc, k2=v2")
    assert docker.container_name("j1") == "os-job-j1"
    assert docker.volume_name("j1") == "os-volume-j1"
    assert docker.helper_name("j1") == "os-volume-j1-manager"
    assert docker.labels("tpp", "j1") == {
        "job-runner": "true",
        "org.jr.backend": "tpp",
        "org.jr.job-id": "j1",
        "org.jr.test": "abc",
        "k2": "v2",
    }
    job_labels = docker.labels("tpp", "j1", workspace="ws", action="a")
    assert job_labels["jobrunner-local"] == "true"
    assert (job_labels["workspace"], job_labels["action"]) == ("ws", "a")


# -- the hung-copy guard --


class Clock:
    """tarstream's clock, moved on by the test: the guard sees exactly the time the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WatchedProgress(tarstream.Progress):
    """Progress that lets the copy wait until the guard has looked at it."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0
        self.looked = threading.Condition()

    def idle_for(self) -> float:
        idle = super().idle_for()
        with self.looked:
            self.looks += 1
            self.looked.notify_all()
        return idle

    def guard_looks_again(self) -> bool:
        """Wait until the guard has looked at the progress as it is now."""
        with self.looked:
            # The second look from now: the first may have read the clock before this call.
            after = self.looks + 1
            return self.looked.wait_for(lambda: self.looks > after, timeout=30)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(tarstream, "time", clock)
    return clock


def test_guard_abandons_a_copy_that_stops_moving(clock):
    progress = tarstream.Progress()
    release, finished = threading.Event(), threading.Event()

    def stuck() -> None:
        clock.advance(0.3 + 0.01)  # no byte moves for longer than the stall timeout ...
        release.wait(10)  # ... while the copy hangs (until the test lets it go)
        finished.set()

    with pytest.raises(tarstream.CopyStalled, match="copy made no progress for 0.3s"):
        tarstream.run_guarded(stuck, progress, 0.3, "copy")
    assert progress.abandoned.is_set() and not finished.is_set()  # given up, not waited out
    release.set()
    with pytest.raises(tarstream.CopyStalled):
        progress.tick(1)  # the abandoned copy stops at its next chunk


def test_guard_lets_a_slow_but_moving_copy_finish(clock):
    progress = WatchedProgress()

    def slow() -> str:
        for _ in range(6):  # 1.2 s in all, well over the stall timeout, but never idle that long
            clock.advance(0.2)
            progress.tick(10)
            assert progress.guard_looks_again()
        return "done"

    assert tarstream.run_guarded(slow, progress, 0.3, "copy") == "done"
    assert progress.bytes == 60


def test_guard_passes_errors_through():
    with pytest.raises(ValueError, match="boom"):
        tarstream.run_guarded(
            lambda: (_ for _ in ()).throw(ValueError("boom")), tarstream.Progress(), 5, "x"
        )


# -- tar streams --


def test_rewrite_tar_prefixes_names_and_sets_the_owner():
    source = tar_bytes(regular("analysis/a.sh", b"echo hi\n"))
    out = (
        b"".join(
            tarstream.rewrite_tar(
                io.BytesIO(source),
                prefix="workspace",
                uid=1000,
                gid=1000,
                progress=tarstream.Progress(),
            )
        )
        + tarstream.end_of_archive()
    )
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.uid, member.gid) == ("workspace/analysis/a.sh", 1000, 1000)
        assert tar.extractfile(member).read() == b"echo hi\n"


def test_rewrite_tar_refuses_escaping_names():
    source = tar_bytes(regular("../etc/x", b"x"))
    with pytest.raises(tarstream.UnsafeArchive):
        list(
            tarstream.rewrite_tar(
                io.BytesIO(source), prefix="w", uid=1, gid=1, progress=tarstream.Progress()
            )
        )


def test_file_entry_streams_a_file_from_disk(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * (tarstream.CHUNK + 7))
    progress = tarstream.Progress()
    chunks = list(
        tarstream.file_entry(
            tmp_path / "big.bin", "workspace/out/big.bin", uid=1000, gid=1000, progress=progress
        )
    )
    assert max(len(c) for c in chunks) <= tarstream.CHUNK
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks) + tarstream.end_of_archive())) as tar:
        (member,) = tar.getmembers()
        assert member.size == tarstream.CHUNK + 7 and member.uid == 1000
    assert progress.bytes == tarstream.CHUNK + 7


def test_extract_one_file_writes_atomically(tmp_path):
    data = tar_bytes(regular("a.csv", b"1,2\n"))
    reader = extract.IterReader([data[:100], data[100:]], tarstream.Progress())
    assert (
        extract.extract_one_file(reader, "a.csv", tmp_path / "out" / "a.csv", tarstream.Progress())
        == 4
    )
    assert (tmp_path / "out" / "a.csv").read_bytes() == b"1,2\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.csv"]


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE]
)
def test_extract_one_file_refuses_anything_but_a_regular_file(tmp_path, kind):
    info = tarfile.TarInfo("a.csv")
    info.type, info.linkname = kind, "/etc/passwd"
    data = tar_bytes((info, None))
    with pytest.raises(tarstream.UnsafeArchive):
        extract.extract_one_file(
            io.BytesIO(data), "a.csv", tmp_path / "a.csv", tarstream.Progress()
        )
    assert list(tmp_path.iterdir()) == []


def test_parse_listing_handles_any_name_but_nul():
    out = b"./a b.csv\0./odd\nname.txt\0\x0012 1700000000\n0 1700000001\n"
    files = tarstream.parse_listing(out)
    assert files == [
        tarstream.VolumeFile("a b.csv", 12, 1700000000),
        tarstream.VolumeFile("odd\nname.txt", 0, 1700000001),
    ]
    assert tarstream.parse_listing(b"\0") == []


# -- job environment and container settings --


def test_dummy_backend_job_gets_only_the_backend_name_and_no_network():
    cfg = config(FULL_DATABASE_URL="mssql://secret")
    db_job = job(requires_db=True, database_name="full")
    assert job_environment(cfg, db_job, "python:v1") == {"OPENSAFELY_BACKEND": "expectations"}
    assert job_network(cfg, db_job) == "none"


def test_database_job_on_real_backend_gets_url_and_database_network():
    cfg = config(
        BACKEND="tpp",
        FULL_DATABASE_URL="mssql://secret",
        TEMP_DATABASE_NAME="tmp",
        DATABASE_NETWORK="dbnet",
    )
    env = job_environment(
        cfg, job(requires_db=True, database_name="full"), "cohortextractor:latest"
    )
    assert env == {
        "OPENSAFELY_BACKEND": "tpp",
        "DATABASE_URL": "mssql://secret",
        "TEMP_DATABASE_NAME": "tmp",
    }
    assert job_network(cfg, job(requires_db=True)) == "dbnet"
    assert job_network(config(BACKEND="tpp", X_DATABASE_URL="u"), job(requires_db=True)) == "bridge"
    assert job_network(cfg, job(requires_db=False)) == "none"
    assert "DATABASE_URL" not in job_environment(cfg, job(), "python:v1")


def test_stata_license_only_for_stata_images_and_only_when_set():
    assert (
        job_environment(config(STATA_LICENSE="lic"), job(), "stata-mp:latest")["STATA_LICENSE"]
        == "lic"
    )
    assert "STATA_LICENSE" not in job_environment(config(STATA_LICENSE="lic"), job(), "python:v1")
    assert "STATA_LICENSE" not in job_environment(config(), job(), "stata-mp:latest")


def test_job_user_and_run_command_parsing():
    assert job_user_ids("1000:1000") == (1000, 1000)
    assert job_user_ids("1001") == (1001, 1001)
    assert job_user_ids("jobuser") == (None, None)
    assert parse_run_command("python:v1 analysis/x.sh 'a b'") == (
        "python:v1",
        ["analysis/x.sh", "a b"],
    )


# -- finalizing --


def test_redaction_keeps_only_safe_values():
    info = {
        "Config": {"Env": ["PATH=/bin", "DATABASE_URL=mssql://secret", "OPENSAFELY_BACKEND=tpp"]}
    }
    assert redact_environment(info)["Config"]["Env"] == [
        "PATH=/bin",
        f"DATABASE_URL={REDACTED}",
        "OPENSAFELY_BACKEND=tpp",
    ]
    assert info["Config"]["Env"][1] == "DATABASE_URL=mssql://secret"  # the input is not changed


def test_exit_137_hints_at_memory():
    result = decide(job(), 137, False, {}, [], None, None, 0)
    assert (result.status_code, result.message) == (
        StatusCode.NONZERO_EXIT,
        "Job exited with error code 137: likely means it ran out of memory",
    )


def test_trailer_includes_exit_code_zero_and_lists_unmatched_files():
    meta = {
        "state": "failed",
        "commit": "c" * 40,
        "docker_image_id": "sha256:x",
        "action_repo_url": None,
        "job_id": "j",
        "run_by_user": "",
        "created_at": "2021-11-03T09:12:51Z",
        "exit_code": 0,
        "status_message": "No outputs found matching patterns:\n - out/*.csv",
        "unmatched_outputs": ["out/a.txt"],
        "outputs": {},
    }
    assert trailer(meta) == (
        f"state: failed\ncommit: {'c' * 40}\ndocker_image_id: sha256:x\njob_id: j\n"
        "created_at: 2021-11-03T09:12:51Z\nexit_code: 0\n\n"
        "No outputs found matching patterns:\n - out/*.csv\n\n"
        "Did you mean to match one of these files instead?\n - out/a.txt\n\n"
        "outputs:\n  (no outputs)\n"
    )


# -- stats --


def test_usage_tracks_peak_memory_cpu_time_and_percentage(tmp_path):
    usage = stats.Usage()
    first = stats.parse_sample(
        {
            "memory_stats": {"usage": 300, "max_usage": 500, "stats": {"total_inactive_file": 100}},
            "cpu_stats": {
                "cpu_usage": {"total_usage": 1_000_000_000},
                "system_cpu_usage": 10_000_000_000,
                "online_cpus": 2,
            },
        }
    )
    second = stats.parse_sample(
        {
            "memory_stats": {"usage": 900},
            "cpu_stats": {
                "cpu_usage": {"total_usage": 2_000_000_000},
                "system_cpu_usage": 20_000_000_000,
                "online_cpus": 2,
            },
        }
    )
    assert first.memory_used == 200 and usage.add(first) is None
    assert usage.add(second) == 20.0
    assert usage.summary() == {"peak_memory_bytes": 900, "cpu_time_seconds": 2.0, "samples": 2}
    assert stats.parse_sample({"memory_stats": {}}) is None

    conn = stats.connect(tmp_path / "stats.sqlite")
    stats.record(conn, {"containers": {}})
    ((stamp, data),) = conn.execute("SELECT timestamp, data FROM stats").fetchall()
    assert "T" in stamp and not stamp.endswith("Z") and data == '{"containers": {}}'


class SeenWaiting(threading.Event):
    """A Sampler's stop event that tells the test once the sampler waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_a_job_over_before_its_first_sample_is_not_sampled_a_longer_one_is(monkeypatch):
    calls: list[str] = []
    two_samples = threading.Event()
    sample = {"memory_stats": {"usage": 500}, "cpu_stats": {"cpu_usage": {"total_usage": 10**9}}}

    def container_stats(name: str) -> dict:
        calls.append(name)
        if len(calls) >= 2:
            two_samples.set()
        return sample

    monkeypatch.setattr(docker, "container_stats", container_stats)
    monkeypatch.setattr(stats, "FIRST_SAMPLE_AFTER", 60.0)
    # A trivial job: it ends while the sampler still waits for its first sample.
    short = stats.Sampler("os-job-short", "short", 60.0, None)
    short._stop = SeenWaiting()
    short.start()
    assert short._stop.waiting.wait(30)
    assert short.stop()["samples"] == 0 and calls == []
    # A longer one is sampled every interval (the interval is shorter than FIRST_SAMPLE_AFTER).
    longer = stats.Sampler("os-job-long", "long", 0.01, None).start()
    assert two_samples.wait(30)
    summary = longer.stop()
    assert summary["samples"] == len(calls) >= 2 and summary["peak_memory_bytes"] == 500
    assert set(calls) == {"os-job-long"}


def test_remove_stale_temps_removes_only_temp_files_of_writers_that_no_longer_run(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    out = tmp_path / "output"
    out.mkdir()
    names = [
        f".jr-tmp-big.bin.{dead}.140702679733952",  # a copy-out cut short
        f".jr-tmp-logs.txt.{dead}",  # finalize's logs.txt, no thread id
        f".jr-tmp-big.bin.{os.getpid()}.1",  # a writer still running
        f".jr-tmp-other.csv.{dead}.1",  # beside a file this job did not write
        "big.bin",
        "logs.txt",
        ".jr-tmp-big.bin.notapid",
    ]
    for name in names:
        (out / name).write_text("x")
    removed = remove_stale_temps([out / "big.bin", out / "logs.txt", tmp_path / "none" / "x"])
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in out.iterdir()) == sorted(names[2:])
