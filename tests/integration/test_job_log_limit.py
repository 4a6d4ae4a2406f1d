"""JOB_LOG_LIMIT against real Docker: a job printing megabytes keeps only the end of its log.

logs.txt and both action logs (copies of it) keep the last JOB_LOG_LIMIT of the output, cut at a
line, under a note saying what was cut; Docker's own log of the job is bounded too. Every Docker
object made here carries test_executor's session label and is removed after each test (its autouse
`labelled` fixture, imported below). Both volume storages, as in test_executor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobrunner_lib.core import joblog
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import State
from jobrunner_lib.core.values import LogLimit
from jobrunner_lib.jobs.worker import drive_job
from tests.integration.test_executor import (
    STORAGES,
    git,
    labelled,  # noqa: F401 - an autouse fixture: labels and removes this module's objects
    log_dir,
    make_config,
    workspaces,
)

pytestmark = pytest.mark.docker

LINES = 100_000
LINE = "line %07d of the loud job, printed to fill its log"  # 53 bytes printed: 5.3 MB in all
LOUD = """
    awk 'BEGIN { for (i = 1; i <= COUNT; i++) printf "LINE\\n", i }'
    mkdir -p output
    echo done > output/done.txt
    echo "the loud job's last line"
""".replace("LINE", LINE).replace("COUNT", str(LINES))
NOTE = re.compile(
    rb"\[jr: the job's log had at least (\d+) bytes \((\d+) lines\); only the last (\d+) bytes "
    rb"\((\d+) lines\) are kept here \(JOB_LOG_LIMIT=1M\)\]"
)
TIMESTAMP = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z "


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("loud-study") / "study"
    (repo / "analysis").mkdir(parents=True)
    (repo / "project.yaml").write_text("version: '3.0'\nactions: {}\n")
    text = "\n".join(line.strip() for line in LOUD.strip().splitlines()) + "\n"
    (repo / "analysis" / "loud.sh").write_text(text)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "study", cwd=repo)
    return repo, git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture(params=STORAGES)
def config(request, tmp_path) -> Config:
    config = make_config(tmp_path, request.param, JOB_LOG_LIMIT="1M")
    assert config.job_log_limit == LogLimit(2**20)
    return config


def test_loud_job_keeps_the_end_of_its_log_in_every_copy_and_bounds_dockers(config, jobs):
    spec = {"moderately_sensitive": {"done": "output/done.txt"}}
    done = drive_job(config, jobs.add("loud", "python:v1 analysis/loud.sh", spec).id)
    assert done.state is State.SUCCEEDED, done.status_message

    logs_txt = (log_dir(config, done) / "logs.txt").read_bytes()
    high, medium = workspaces(config)
    assert (high / "metadata/loud.log").read_bytes() == logs_txt
    assert (medium / "metadata/loud.log").read_bytes() == logs_txt

    note, _, rest = logs_txt.partition(b"\n")
    m = NOTE.fullmatch(note)
    assert m, note
    print(f"\n{note.decode()}")
    total_bytes, total_lines, kept_bytes, kept_lines = map(int, m.groups())
    body, separator, trailer = rest.partition(b"\n\nstate: ")
    assert separator and trailer.startswith(b"succeeded\n")
    assert trailer.endswith(b"outputs:\n  output/done.txt  - moderately_sensitive\n")
    kept = body + b"\n"
    # The end of the output, cut at a line, as much of the limit as whole lines fill.
    assert (len(kept), kept.count(b"\n")) == (kept_bytes, kept_lines)
    assert 2**20 - 100 < kept_bytes <= 2**20
    lines = kept.splitlines()
    assert all(
        re.fullmatch(TIMESTAMP + LINE.replace("%07d", r"\d{7}").encode(), line)
        for line in lines[:-1]
    ), lines[:2]
    assert re.fullmatch(TIMESTAMP + rb"the loud job's last line", lines[-1])
    assert lines[-2].endswith((LINE % LINES).encode())
    # What Docker still had: at least what logs.txt keeps, at most all the job printed.
    printed = len(lines[-2]) * LINES + len(lines[-1]) + LINES + 1  # timestamps and newlines
    assert kept_bytes < total_bytes <= printed and kept_lines < total_lines <= LINES + 1

    container = json.loads((log_dir(config, done) / "metadata.json").read_text())[
        "container_metadata"
    ]
    assert container["HostConfig"]["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(2 * 2**20), "max-file": "4"},
    }
    assert container["Config"]["Labels"][joblog.LIMIT_LABEL] == "1M"
