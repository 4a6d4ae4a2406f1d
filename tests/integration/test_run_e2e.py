"""The run side end to end through the real tools: jr-add-job, then `jr-service --until-idle`.

Each test has its own WORKDIR (privacy trees inside it), a real git study made by make_study and
a unique Docker label on every object jr makes for it; the rig removes exactly those objects and
kills exactly its own workers afterwards, pass or fail.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner_lib.core.config import LOCAL_BACKEND
from tests.support.e2e import ContainerCounter, Rig, read_json, rig_at, tree, wait_for
from tests.support.studies import make_study

pytestmark = pytest.mark.docker

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z ")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with rig_at(tmp_path) as r:
        yield r


def project(actions: str) -> str:
    return f'version: "5"\nactions:\n{actions}'


def no_objects_left(rig: Rig) -> None:
    # A worker cleans up after saving its job's final state: let it finish (a host-stored
    # volume holding gigabytes takes a moment to delete).
    rig.wait_workers_gone(timeout=60)
    assert rig.containers() == [], [c["Names"] for c in rig.containers()]
    assert rig.volumes() == [], [v["Name"] for v in rig.volumes()]


# ---- outcomes -------------------------------------------------------------------------------


def test_a_successful_action_succeeds_and_its_output_lands_in_the_workspace(rig, tmp_path):
    repo, commit = make_study(
        tmp_path / "study",
        project(
            "  hello:\n"
            "    run: python:v1 analysis/hello.sh world\n"
            "    outputs:\n"
            "      moderately_sensitive:\n"
            "        greeting: output/hello.txt\n"
        ),
        {"analysis/hello.sh": 'mkdir -p output\necho "hello $1" > output/hello.txt\n'},
    )
    (jid,) = rig.add(repo, "hello")
    rig.until_idle(timeout=90)

    job = rig.jobs([jid])[jid]
    assert (job["state"], job["status_code"], job["status_message"]) == (
        "succeeded",
        "succeeded",
        "Completed successfully",
    )
    assert job["exit_code"] == 0
    assert job["commit"] == commit
    assert job["started_at"] and job["completed_at"] >= job["started_at"]
    assert json.loads(job["outputs"]) == {"output/hello.txt": "moderately_sensitive"}
    ws = rig.high / "workspaces" / "test"
    assert (ws / "output/hello.txt").read_text() == "hello world\n"
    no_objects_left(rig)


def test_a_nonzero_exit_fails_the_job_with_the_exit_code_in_its_message(rig, tmp_path):
    repo, _ = make_study(
        tmp_path / "study",
        project(
            "  broken:\n"
            "    run: python:v1 analysis/broken.sh\n"
            "    outputs:\n"
            "      moderately_sensitive:\n"
            "        t: output/t.csv\n"
        ),
        {"analysis/broken.sh": "mkdir -p output\necho partial > output/t.csv\necho oops\nexit 7\n"},
    )
    (jid,) = rig.add(repo, "broken")
    rig.until_idle(timeout=90)

    job = rig.jobs([jid])[jid]
    assert (job["state"], job["status_code"]) == ("failed", "nonzero_exit")
    assert job["status_message"] == "Job exited with error code 7"
    assert job["exit_code"] == 7
    (log_dir,) = rig.log_dirs(jid)
    logs = (log_dir / "logs.txt").read_text()
    assert "oops" in logs and "exit_code: 7" in logs and "state: failed" in logs
    # A failed job's outputs are still copied out (docs/reference.md#finalize).
    assert (rig.high / "workspaces/test/output/t.csv").read_text() == "partial\n"
    no_objects_left(rig)


def test_missing_outputs_fail_the_job_naming_the_unmatched_glob(rig, tmp_path, monkeypatch):
    # Committed an hour ago: the listing compares whole-second mtimes with the marker, so code
    # committed in the same second as the job was prepared would show up in the hint too.
    monkeypatch.setenv("GIT_COMMITTER_DATE", f"{int(time.time()) - 3600} +0000")
    repo, _ = make_study(
        tmp_path / "study",
        project(
            "  typo:\n"
            "    run: python:v1 analysis/typo.sh\n"
            "    outputs:\n"
            "      moderately_sensitive:\n"
            "        results: output/results_*.csv\n"
        ),
        {"analysis/typo.sh": "mkdir -p output\necho 1 > output/result.csv\n"},
    )
    (jid,) = rig.add(repo, "typo")
    rig.until_idle(timeout=90)

    job = rig.jobs([jid])[jid]
    assert (job["state"], job["status_code"]) == ("failed", "unmatched_patterns")
    assert job["status_message"].startswith("No outputs found matching patterns:")
    assert "output/results_*.csv" in job["status_message"]
    assert json.loads(job["unmatched_outputs"]) == ["output/result.csv"]
    (log_dir,) = rig.log_dirs(jid)
    logs = (log_dir / "logs.txt").read_text()
    assert "Did you mean to match one of these files instead?\n - output/result.csv\n" in logs
    no_objects_left(rig)


def test_a_chain_of_five_dependent_actions_runs_in_order_each_reading_the_last_output(
    rig, tmp_path
):
    actions, files = "", {}
    for i in range(1, 6):
        needs = f"    needs: [step{i - 1}]\n" if i > 1 else ""
        actions += (
            f"  step{i}:\n"
            f"    run: python:v1 analysis/step.sh {i}\n{needs}"
            f"    outputs:\n"
            f"      highly_sensitive:\n"
            f"        out: output/step{i}.txt\n"
        )
    files["analysis/step.sh"] = (
        "set -e\nmkdir -p output\n"
        'if [ "$1" -gt 1 ]; then cat "output/step$(($1 - 1)).txt" > "output/step$1.txt"; fi\n'
        'echo "line $1" >> "output/step$1.txt"\n'
    )
    repo, _ = make_study(tmp_path / "study", project(actions), files)
    ids = rig.add(repo, "step5")
    assert len(ids) == 5
    # A poll interval longer than the timeout: the service's first pass starts step1, each
    # finishing worker starts the next step itself, and the last one wakes the service to end.
    rig.until_idle(timeout=150, POLL_INTERVAL="600")

    jobs = rig.by_action(ids)
    assert {a: j["state"] for a, j in jobs.items()} == {
        f"step{i}": "succeeded" for i in range(1, 6)
    }
    for i in range(2, 6):  # each started only once the one before had finished
        assert jobs[f"step{i}"]["started_at"] >= jobs[f"step{i - 1}"]["completed_at"]
    final = (rig.high / "workspaces/test/output/step5.txt").read_text()
    assert final == "".join(f"line {i}\n" for i in range(1, 6))
    # Each finishing worker drove the step it unblocked itself: one process for the chain.
    assert len({j["worker_pid"] for j in jobs.values()}) == 1, jobs
    no_objects_left(rig)


# ---- capacity -------------------------------------------------------------------------------


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant (an end before a start at a tie)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def test_ten_parallel_actions_never_run_more_than_max_workers_containers_at_once(tmp_path):
    actions = "".join(
        f"  p{i:02d}:\n"
        f"    run: python:v1 analysis/timed.sh p{i:02d}\n"
        f"    outputs:\n"
        f"      moderately_sensitive:\n"
        f"        t: output/p{i:02d}.txt\n"
        for i in range(1, 11)
    )
    # /proc/uptime is the host kernel's, so stamps from different containers compare.
    script = (
        "mkdir -p output\nread start _ < /proc/uptime\nsleep 1\nread end _ < /proc/uptime\n"
        'echo "$start $end" > "output/$1.txt"\n'
    )
    repo, _ = make_study(tmp_path / "study", project(actions), {"analysis/timed.sh": script})
    with rig_at(tmp_path, MAX_WORKERS="3") as rig:
        ids = rig.add(repo, "run_all")
        assert len(ids) == 10
        with ContainerCounter(rig) as counter:
            took = rig.until_idle(timeout=150)
        assert counter.error is None, counter.error

        jobs = rig.jobs(ids)
        assert {j["state"] for j in jobs.values()} == {"succeeded"}
        ws = rig.high / "workspaces/test/output"
        intervals = []
        for i in range(1, 11):
            start, end = map(float, (ws / f"p{i:02d}.txt").read_text().split())
            intervals.append((start, end))
        overlap = max_overlap(intervals)
        print(
            f"\n10 x 1s actions, MAX_WORKERS=3: {took:.1f}s; max overlap from stamps {overlap}, "
            f"max running containers seen by Docker {counter.max} ({counter.samples} samples)"
        )
        assert overlap <= 3
        assert counter.max <= 3
        assert overlap >= 2, "the actions did not run in parallel at all"
        # The sampler saw every job container, so its maximum is a real measurement.
        assert counter.seen == {f"os-job-{jid}" for jid in ids}
        no_objects_left(rig)


# ---- privacy levels -------------------------------------------------------------------------


def test_outputs_are_routed_by_privacy_level_and_highly_sensitive_never_reaches_medium(
    rig, tmp_path
):
    marker = f"HIGHLY-SENSITIVE-{rig.label}"
    repo, _ = make_study(
        tmp_path / "study",
        project(
            "  extract:\n"
            "    run: python:v1 analysis/extract.sh\n"
            "    outputs:\n"
            "      highly_sensitive:\n"
            "        rows: output/rows/*.csv\n"
            "      moderately_sensitive:\n"
            "        table: output/table.csv\n"
            "      minimally_sensitive:\n"
            "        count: output/count.txt\n"
            "  derive:\n"
            "    run: r:v1 analysis/derive.sh\n"
            "    needs: [extract]\n"
            "    outputs:\n"
            "      highly_sensitive:\n"
            "        joined: output/joined.csv\n"
            "      moderately_sensitive:\n"
            "        summary: output/summary.txt\n"
        ),
        {
            "analysis/extract.sh": (
                f"mkdir -p output/rows\necho '{marker} a' > output/rows/a.csv\n"
                f"echo '{marker} b' > output/rows/b.csv\necho 'n,2' > output/table.csv\n"
                "echo 2 > output/count.txt\n"
            ),
            "analysis/derive.sh": (
                "cat output/rows/*.csv > output/joined.csv\n"
                "wc -l < output/joined.csv > output/summary.txt\n"
            ),
        },
    )
    ids = rig.add(repo, "run_all")
    rig.until_idle(timeout=90)
    assert {j["state"] for j in rig.jobs(ids).values()} == {"succeeded"}

    high = tree(rig.high / "workspaces" / "test")
    medium = tree(rig.medium / "workspaces" / "test")
    highly = {"output/rows/a.csv", "output/rows/b.csv", "output/joined.csv"}
    lower = {"output/table.csv", "output/count.txt", "output/summary.txt"}
    assert highly | lower <= set(high)
    assert lower <= set(medium)
    assert not highly & set(medium)
    assert {p for p in medium if not p.startswith("metadata/")} == lower
    for path in lower:
        assert medium[path] == high[path]
    assert high["output/summary.txt"].strip() == b"2"
    assert set(medium) - lower == {
        "metadata/extract.log",
        "metadata/derive.log",
        "metadata/manifest.json",
    }
    # Walk the whole medium tree: no byte of a highly sensitive file anywhere in it.
    for path in (p for p in rig.medium.rglob("*") if p.is_file()):
        assert marker.encode() not in path.read_bytes(), path
    no_objects_left(rig)


# ---- logs and metadata ----------------------------------------------------------------------


@pytest.fixture
def secret_image(rig) -> Iterator[tuple[str, str]]:
    """A runtime image with a secret in its environment, in a registry only this test uses."""
    from jobrunner_lib.docker import engine as docker

    registry = f"jr-e2e-{rig.label[:12]}"
    secret = f"s3cret-{rig.label}"
    dockerfile = io.BytesIO(f"FROM jr-demo/python:v1\nENV API_TOKEN={secret}\n".encode())
    api = docker.client().api
    tag = f"{registry}/python:v1"
    for _ in api.build(
        fileobj=dockerfile, tag=tag, labels={"org.jr.test": rig.label}, rm=True, decode=True
    ):
        pass
    try:
        yield registry, secret
    finally:
        rig.cleanup()  # containers first, then the image they use
        api.remove_image(tag, force=True)


def test_logs_txt_and_metadata_json_record_the_run_with_secrets_redacted(
    rig, tmp_path, secret_image
):
    registry, secret = secret_image
    rig.env["DOCKER_REGISTRY"] = registry
    repo, commit = make_study(
        tmp_path / "study",
        project(
            "  report:\n"
            "    run: python:v1 analysis/report.sh\n"
            "    outputs:\n"
            "      moderately_sensitive:\n"
            "        table: output/table.csv\n"
            "      highly_sensitive:\n"
            "        rows: output/rows.csv\n"
        ),
        {
            "analysis/report.sh": (
                "echo 'first line'\necho 'to stderr' >&2\necho 'last line'\n"
                "mkdir -p output\necho t > output/table.csv\necho r > output/rows.csv\n"
            )
        },
    )
    (jid,) = rig.add(repo, "report")
    rig.until_idle(timeout=90)
    job = rig.jobs([jid])[jid]
    assert job["state"] == "succeeded"

    (log_dir,) = rig.log_dirs(jid)
    assert log_dir.name == f"os-job-{jid}"
    logs = (log_dir / "logs.txt").read_text()
    output, _, rest = logs.partition("\n\n")
    lines = output.splitlines()
    assert all(TIMESTAMP.match(line) for line in lines), lines
    texts = [TIMESTAMP.sub("", line) for line in lines]
    # stdout and stderr are interleaved by Docker: only the order within one stream is kept.
    assert sorted(texts) == ["first line", "last line", "to stderr"]
    assert texts.index("first line") < texts.index("last line")

    trailer, _, tail = rest.partition("\n\n")
    keys = [line.split(":", 1)[0] for line in trailer.splitlines()]
    assert keys == [
        "state",
        "commit",
        "docker_image_id",
        "job_id",
        "run_by_user",
        "created_at",
        "completed_at",
        "exit_code",
    ]
    fields = dict(line.split(": ", 1) for line in trailer.splitlines())
    assert fields["state"] == "succeeded"
    assert fields["commit"] == commit
    assert fields["docker_image_id"].startswith("sha256:")
    assert fields["job_id"] == jid
    assert fields["run_by_user"] == "tester"
    assert fields["exit_code"] == "0"
    assert tail.startswith("Completed successfully\n\noutputs:\n")
    assert tail.endswith(
        "outputs:\n  output/rows.csv   - highly_sensitive\n  output/table.csv  - moderately_sensitive\n"
    )

    meta = read_json(log_dir / "metadata.json")
    columns = {row["name"] for row in rig.query("PRAGMA table_info(job)")}
    assert columns <= set(meta), columns - set(meta)
    assert {"job_request", "exit_code", "container_metadata"} <= set(meta)
    assert meta["id"] == jid and meta["state"] == "succeeded" and meta["commit"] == commit
    assert meta["status_code"] == "succeeded" and meta["exit_code"] == 0
    assert meta["action"] == "report" and meta["workspace"] == "test"
    assert meta["outputs"] == {
        "output/rows.csv": "highly_sensitive",
        "output/table.csv": "moderately_sensitive",
    }
    assert meta["job_request"]["identifier"] == job["job_request_id"]
    assert meta["job_request"]["sha"] == commit
    env = meta["container_metadata"]["Config"]["Env"]
    assert "API_TOKEN=xxxx-REDACTED-xxxx" in env
    assert f"OPENSAFELY_BACKEND={LOCAL_BACKEND}" in env  # on the safelist: kept
    assert any(e.startswith("PATH=/") for e in env)
    # The secret reaches no file jr wrote, at any privacy level.
    for root in (rig.high, rig.medium):
        for path in (p for p in root.rglob("*") if p.is_file()):
            assert secret.encode() not in path.read_bytes(), path
    # The action log in both workspaces is the job's logs.txt.
    assert (rig.high / "workspaces/test/metadata/report.log").read_text() == logs
    assert (rig.medium / "workspaces/test/metadata/report.log").read_text() == logs
    no_objects_left(rig)


# ---- Docker unreachable ---------------------------------------------------------------------


def test_run_once_with_docker_unreachable_exits_75_with_one_line_and_changes_no_row(rig, tmp_path):
    repo, _ = make_study(tmp_path / "study")  # SIMPLE_PROJECT: extract -> model -> report
    rig.add(repo, "run_all")
    before = rig.dump()
    assert 'INSERT INTO "job"' in before

    result = rig.tool("jr-run-once", timeout=60, DOCKER_HOST="unix:///nonexistent.sock")
    assert result.returncode == 75, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Docker is not reachable" in result.stderr
    assert rig.dump() == before
    assert rig.worker_pids() == {}
    no_objects_left(rig)


# ---- check-ins while a worker copies a large input ------------------------------------------


@pytest.mark.slow
def test_run_passes_keep_completing_while_a_worker_copies_a_2gb_input(rig, tmp_path):
    repo, _ = make_study(
        tmp_path / "study",
        project(
            "  big:\n"
            "    run: python:v1 analysis/big.sh\n"
            "    outputs:\n"
            "      highly_sensitive:\n"
            "        blob: output/big.bin\n"
            "  reader:\n"
            "    run: python:v1 analysis/reader.sh\n"
            "    needs: [big]\n"
            "    outputs:\n"
            "      moderately_sensitive:\n"
            "        size: output/size.txt\n"
        ),
        {
            "analysis/big.sh": "mkdir -p output\ndd if=/dev/zero of=output/big.bin bs=1M count=2048 2>&1\n",
            "analysis/reader.sh": "wc -c < output/big.bin | tr -d ' ' > output/size.txt\n",
        },
    )
    big_file = rig.high / "workspaces" / "test" / "output" / "big.bin"
    try:
        ids = rig.add(repo, "run_all")
        jobs = rig.by_action(ids)
        big, reader = jobs["big"]["id"], jobs["reader"]["id"]

        first = rig.tool("jr-run-once", "-o", "ids", timeout=60)
        assert first.returncode == 0, first.stderr
        assert first.stdout.split() == [big] or big in first.stdout.split()
        wait_for(lambda: rig.jobs([big])[big]["state"] == "succeeded", 180, "the 1 GB file")
        # big's worker goes on to drive the reader itself (worker.next_job); wait until it has,
        # so no other pass can hold the run lock while ours run.
        wait_for(lambda: big not in rig.worker_pids().values(), 60, "big's worker to finish it")
        wait_for(lambda: rig.jobs([reader])[reader]["state"] == "running", 30, "reader claimed")

        durations: list[float] = []
        during_copy = 0
        deadline = time.monotonic() + 300
        while rig.jobs([reader])[reader]["status_code"] == "preparing":
            assert time.monotonic() < deadline, "reader still preparing after 300s"
            before = rig.jobs([reader])[reader]["status_code"]
            start = time.monotonic()
            result = rig.tool("jr-run-once", "-o", "ids", timeout=60)
            durations.append(time.monotonic() - start)
            assert result.returncode == 0, (result.returncode, result.stderr)
            if before == rig.jobs([reader])[reader]["status_code"] == "preparing":
                during_copy += 1
        print(
            f"\njr-run-once passes while a worker copied 2 GiB in: {len(durations)} passes "
            f"({during_copy} wholly during the copy), durations "
            + ", ".join(f"{d:.2f}s" for d in durations)
        )
        assert during_copy >= 1, "no pass ran while the input was being copied in"

        rig.until_idle(timeout=240)
        final = rig.jobs(ids)
        assert {j["state"] for j in final.values()} == {"succeeded"}, final
        size = (rig.high / "workspaces/test/output/size.txt").read_text().strip()
        assert size == str(2 * 1024 * 1024 * 1024)
        assert (rig.medium / "workspaces/test/output/size.txt").exists()
        no_objects_left(rig)
    finally:
        big_file.unlink(missing_ok=True)
        shutil.rmtree(rig.workdir / "temp", ignore_errors=True)
