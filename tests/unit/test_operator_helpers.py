"""Pure parts of the operator tools (jr-kill, jr-retry, jr-reboot-prep, jr-prune) and ops/objects.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobrunner_lib.cli.prune import (
    container_kind,
    dangling_images,
    job_id_of,
    prunable,
    repository,
    stale_temp,
    usage_total,
)
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.models import Msg, State, StatusCode, transition
from jobrunner_lib.jobs import locks
from jobrunner_lib.ops import objects as service
from jobrunner_lib.ops.kill import kill_message
from jobrunner_lib.ops.retry import refusal
from tests.support.factories import make_job, make_request

NOW = 1_800_000_000


def job(state: State, code: StatusCode | None = None, message: str = "m", **kw):
    """A job in `state` (final ones completed at NOW unless given)."""
    base = make_job(make_request(), "a", State.RUNNING if state is not State.PENDING else state)
    if state.is_final:
        return transition(base, state, code, message, at=kw.pop("at", NOW), **kw)
    return base


# ---- service helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("90", 90),
        ("1.5h", 5400),
        (" 2H ", 7200),
    ],
)
def test_parse_duration_accepts_units(text, seconds):
    assert service.parse_duration(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "5 minutes", "m"])
def test_parse_duration_rejects_anything_else_naming_the_option(text):
    with pytest.raises(UsageError, match="--timeout"):
        service.parse_duration(text, "--timeout")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, ""),
        (-1, ""),
        (0, "0B"),
        (999, "999B"),
        (1500, "1.5KB"),
        (20_000_000, "20MB"),
        (3_200_000_000, "3.2GB"),
    ],
)
def test_human_size_uses_dockers_decimal_units(size, text):
    assert service.human_size(size) == text


def test_human_duration():
    assert [service.human_duration(s) for s in (5, 200, 7500)] == ["5s", "3m20s", "2h05m"]


@pytest.fixture
def cfg(tmp_path) -> Config:
    return Config(workdir=tmp_path)


def test_service_not_running_without_a_pid_file_or_with_garbage(cfg):
    assert service.service_pid(cfg) is None
    service.pid_file(cfg).write_text("not a pid\n")
    assert service.service_pid(cfg) is None


def test_service_not_running_when_its_pid_is_dead(cfg):
    proc = subprocess.Popen([sys.executable, "-c", "pass", "jr-service"])
    proc.wait()
    service.pid_file(cfg).write_text(f"{proc.pid}\n")
    assert service.service_pid(cfg) is None


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the command-line check is Linux only"
)
def test_service_running_only_if_the_live_pid_is_jr_service(cfg):
    service.pid_file(cfg).write_text(f"{os.getpid()}\n")  # alive, but pytest is not the service
    assert service.service_pid(cfg) is None
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "jr-service"])
    try:
        service.pid_file(cfg).write_text(f"{proc.pid}\n")
        assert service.service_pid(cfg) == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_operator_is_user_at_host(monkeypatch):
    monkeypatch.setenv("JR_USER", "alice")
    assert service.operator().startswith("alice@")


def test_run_lock_is_exclusive(cfg):
    with locks.holding_run_lock(cfg, 1, busy="busy"):
        assert locks.take_run_lock(cfg) is None
    lock = locks.take_run_lock(cfg)
    assert lock is not None
    lock.release()


# ---- jr-kill and jr-retry ----------------------------------------------------------------------


def test_kill_message_is_the_old_backends_and_a_cancelled_job_says_cancelled():
    active = job(State.PENDING)
    # Who killed it is jr's business (its log, error_detail), not the researcher's.
    assert kill_message(active, "bob@host") == (StatusCode.KILLED_BY_ADMIN, "Killed by admin")
    assert kill_message(active.copy(cancelled=True), "bob@host") == (
        StatusCode.CANCELLED_BY_USER,
        Msg.CANCELLED,
    )


def test_only_internal_errors_may_be_retried():
    assert refusal(job(State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_FINALIZING)) is None
    assert refusal(
        job(State.FAILED, StatusCode.NONZERO_EXIT, "Job exited with error code 3\nmore")
    ) == ("it failed with nonzero_exit (Job exited with error code 3), not internal_error")
    assert refusal(job(State.SUCCEEDED, StatusCode.SUCCEEDED)) == (
        "it is succeeded, not failed with internal_error"
    )
    assert refusal(job(State.PENDING)) == "it is pending, not failed with internal_error"


# ---- jr-prune ----------------------------------------------------------------------------------


def test_prunable_never_touches_active_jobs_and_keeps_internal_errors_unless_asked():
    assert prunable(None, False, None)  # unknown to the state store
    assert not prunable(job(State.PENDING), True, NOW + 10)
    assert not prunable(job(State.RUNNING), True, NOW + 10)
    assert prunable(job(State.SUCCEEDED, StatusCode.SUCCEEDED), False, None)
    assert prunable(job(State.FAILED, StatusCode.KILLED_BY_ADMIN), False, None)
    broken = job(State.FAILED, StatusCode.INTERNAL_ERROR)
    assert not prunable(broken, False, None)
    assert prunable(broken, True, None)
    assert not prunable(broken, False, NOW - 10)  # finished after the cutoff
    assert prunable(broken, False, NOW + 10)  # finished before it


def test_job_id_comes_from_the_label_or_the_name():
    assert job_id_of({"org.jr.job-id": "abc"}, "whatever") == "abc"
    assert job_id_of({}, "os-job-p5r7t2w4y6a3c5e7") == "p5r7t2w4y6a3c5e7"
    assert job_id_of(None, "os-volume-p5r7t2w4y6a3c5e7") == "p5r7t2w4y6a3c5e7"
    assert job_id_of(None, "os-volume-p5r7t2w4y6a3c5e7-manager") == "p5r7t2w4y6a3c5e7"
    assert job_id_of(None, "something-else") == ""
    assert container_kind("os-volume-x-manager") == "helper"
    assert container_kind("os-job-x") == "container"


@pytest.mark.parametrize(
    ("reference", "repo"),
    [
        ("ghcr.io/opensafely-core/python:v2", "ghcr.io/opensafely-core/python"),
        ("ghcr.io/opensafely-core/python@sha256:abc", "ghcr.io/opensafely-core/python"),
        ("127.0.0.1:5000/jr/r", "127.0.0.1:5000/jr/r"),
        ("127.0.0.1:5000/jr/r:v1", "127.0.0.1:5000/jr/r"),
        ("busybox:latest", "busybox"),
    ],
)
def test_repository_drops_tag_and_digest_but_not_a_registry_port(reference, repo):
    assert repository(reference) == repo


def test_dangling_images_only_untagged_ours_and_unused():
    repos = {"ghcr.io/opensafely-core/python"}
    images = [
        {
            "Id": "1",
            "RepoTags": ["<none>:<none>"],
            "RepoDigests": ["ghcr.io/opensafely-core/python@sha256:a"],
        },
        {"Id": "2", "RepoTags": None, "RepoDigests": ["ghcr.io/opensafely-core/python@sha256:b"]},
        {"Id": "3", "RepoTags": ["ghcr.io/opensafely-core/python:v2"], "RepoDigests": []},
        {"Id": "4", "RepoTags": None, "RepoDigests": ["docker.io/library/python@sha256:c"]},
        {
            "Id": "5",
            "RepoTags": None,
            "RepoDigests": ["<none>@<none>"],
            "Labels": {"org.jr.image": "ghcr.io/opensafely-core/python:v1"},
        },
        {"Id": "6", "RepoTags": None, "RepoDigests": None},
    ]
    found = dangling_images(images, repos, used={"2"})
    assert [i["Id"] for i in found] == ["1", "5"]


def test_stale_temp_goes_by_the_newest_file_in_each_entry(tmp_path):
    old_dir, busy_dir = tmp_path / "old", tmp_path / "busy"
    old_dir.mkdir()
    busy_dir.mkdir()
    (old_dir / "a").write_text("12345")
    (busy_dir / "a").write_text("x")
    (busy_dir / "fresh").write_text("y")
    (tmp_path / "old-file").write_text("z")
    then = time.time() - 2 * 86400
    for path in (old_dir / "a", old_dir, busy_dir / "a", busy_dir, tmp_path / "old-file"):
        os.utime(path, (then, then))
    items = stale_temp(tmp_path, time.time())
    assert sorted(Path(i.name).name for i in items) == ["old", "old-file"]
    assert stale_temp(tmp_path / "missing", time.time()) == []


def test_usage_total_adds_layers_containers_and_volumes():
    df = {
        "LayersSize": 100,
        "Containers": [{"SizeRw": 10}, {"SizeRw": None}],
        "Volumes": [{"UsageData": {"Size": 5}}, {"UsageData": {"Size": -1}}],
    }
    assert usage_total(df) == 115
    assert usage_total(None) is None
