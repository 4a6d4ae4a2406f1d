"""Every jr tool keeps the command-line conventions (docs/architecture.md#command-line-conventions), checked the same way for all of them, as
csvkit and sqlite-utils test every command: `--help` with an example, `--version`, a usage error
(exit 2) for a bad flag or format, no destructive change without a terminal or `--yes`, and each
`-o` format.

The tools run as bin/jr-* subprocesses against a private workdir, without a terminal (stdin, stdout
and stderr are pipes), as in a pipeline. The checks that need a real Docker engine ask for it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobrunner_lib import __version__
from jobrunner_lib.cli.common import TOOLS as REGISTERED
from jobrunner_lib.cli.formats import FORMATS
from jobrunner_lib.core.ids import ID_RE
from jobrunner_lib.core.models import Msg, State, StatusCode
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import BIN, run, tool_env
from tests.support.factories import insert_job
from tests.support.studies import make_study

TOOLS = sorted(path.name for path in BIN.glob("jr-*"))
# What a tool needs besides flags, so that a usage error is about the flag under test.
POSITIONAL = {
    "jr-add-job": ["."],
    "jr-kill": ["abcd"],
    "jr-retry": ["abcd"],
    "jr-pull-image": ["python:v2"],
}
DESTRUCTIVE = ("jr-kill", "jr-prune", "jr-reboot-prep", "jr-retry")
REFUSAL = "without a terminal to confirm: add --yes"


def test_every_tool_in_bin_is_registered_and_checked_here():
    assert TOOLS == sorted(REGISTERED)
    assert set(OUTPUT) <= set(TOOLS) and set(DESTRUCTIVE) <= set(OUTPUT)


@pytest.fixture(scope="module")
def help_of(tmp_path_factory) -> Callable[[str], subprocess.CompletedProcess[str]]:
    """`<tool> --help`, run once per tool."""
    workdir = tmp_path_factory.mktemp("help") / "workdir"
    return functools.cache(lambda tool: run(tool, "--help", workdir=workdir))


def examples(help_text: str) -> list[str]:
    """The lines of the help's `examples:` section (up to the next blank line)."""
    lines = help_text.splitlines()
    start = lines.index("examples:") + 1 if "examples:" in lines else len(lines)
    section = []
    for line in lines[start:]:
        if not line.strip():
            break
        section.append(line.strip())
    return section


# ---- --help, --version, a bad flag -----------------------------------------------------------


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0_with_the_usage_and_an_example(tool, help_of):
    result = help_of(tool)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"usage: {tool} ")
    assert "-v, --verbose" in result.stdout and "-q, --quiet" in result.stdout
    assert any(line.startswith(f"{tool} ") or line == tool for line in examples(result.stdout)), (
        result.stdout
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_version_prints_the_tool_and_its_version(tool, tmp_path):
    result = run(tool, "--version", workdir=tmp_path / "workdir")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{tool} {__version__}\n", "")


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_flag_exits_2_with_the_usage_on_stderr(tool, tmp_path):
    result = run(tool, *POSITIONAL.get(tool, []), "--no-such-flag", workdir=tmp_path / "workdir")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"usage: {tool} ")
    assert result.stderr.endswith(f"{tool}: error: unrecognized arguments: --no-such-flag\n")


# ---- destructive tools: no terminal and no --yes, no change -----------------------------------


def stale_temp_file(workdir: Path) -> Path:
    """A file in $WORKDIR/temp untouched for two days: jr-prune removes such files."""
    path = workdir / "temp" / "left-behind.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    old = time.time() - 2 * 86400
    os.utime(path, (old, old))
    return path


def private_backend() -> dict[str, str]:
    """A backend and registry of the test's own, so jr-prune only ever sees what the test made."""
    name = f"conformance{uuid.uuid4().hex[:8]}"
    return {
        "BACKEND": name,
        "USING_DUMMY_DATA_BACKEND": "true",
        "DOCKER_REGISTRY": name,
        "ALLOWED_IMAGES": "python",
    }


@dataclass
class Case:
    """A state in which a tool has one thing to do, and how to run it there."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # What `-o ids` prints: the one job in the store (None), or these names.
    names: set[str] | None = None
    docker: bool = True


def kill_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    pending = insert_job(conn, State.PENDING, StatusCode.CREATED, Msg.CREATED)
    return Case([pending.id], docker=False)  # a pending job is killed in the store alone


def retry_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    broken = insert_job(conn, State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_FINALIZING)
    return Case([broken.id])


def reboot_prep_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    insert_job(conn, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    return Case([])


def prune_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    return Case([], private_backend(), names={str(stale_temp_file(workdir))})


def ls_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    insert_job(conn, State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)
    return Case([], docker=False)


def run_once_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    # Cancelled before it started: the pass fails it without starting a worker.
    job = insert_job(conn, State.PENDING, StatusCode.CREATED, Msg.CREATED)
    db_queries.set_cancelled(conn, job.job_request_id, [job.action])
    return Case([])


def add_job_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    repo, _ = make_study(workdir.parent / "study")
    return Case([str(repo), "extract"], docker=False)


def sync_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    return Case([], docker=False)  # completed by the test with the fake website's request


def flags_case(workdir: Path, conn: sqlite3.Connection) -> Case:
    # Every backend flag is listed, set or not; one is set, so a row has a value and a time.
    return Case(["set", "paused"], names={"paused", "mode", "manual-db-maintenance"}, docker=False)


DESTRUCTIVE_CASES = {
    "jr-kill": kill_case,
    "jr-retry": retry_case,
    "jr-reboot-prep": reboot_prep_case,
    "jr-prune": prune_case,
}


def snapshot(workdir: Path) -> tuple[list[str], list[str]]:
    """The state store's content and the workdir's files (SQLite's own files aside)."""
    conn = db.connect(workdir / "db.sqlite")
    try:
        dump = list(conn.iterdump())
    finally:
        conn.close()
    files = sorted(
        p.relative_to(workdir).as_posix()
        for p in workdir.rglob("*")
        if not p.name.startswith("db.sqlite")
    )
    return dump, files


def prepare(request, store, make_case: Callable[[Path, sqlite3.Connection], Case]) -> Case:
    """The case's state in the `store` fixture's workdir (with Docker, if it needs it)."""
    workdir, conn = store
    case = make_case(workdir, conn)
    if case.docker:
        request.getfixturevalue("docker_ready")
    return case


@pytest.mark.parametrize("tool", DESTRUCTIVE)
def test_a_destructive_tool_without_a_terminal_or_yes_exits_2_and_changes_nothing(
    tool, request, store
):
    case = prepare(request, store, DESTRUCTIVE_CASES[tool])
    workdir = store[0]
    before = snapshot(workdir)
    result = run(tool, *case.args, workdir=workdir, **case.env)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.endswith(f"{REFUSAL} (or --dry-run)\n"), result.stderr
    assert snapshot(workdir) == before


# ---- -o table|tsv|jsonl|ids ------------------------------------------------------------------

# Every tool with -o, and a state in which it prints one row (the destructive ones told --yes, or
# for jr-prune --dry-run).
OUTPUT: dict[str, Callable[[Path, sqlite3.Connection], Case]] = {
    "jr-add-job": add_job_case,
    "jr-flags": flags_case,
    "jr-kill": lambda w, c: _with(kill_case(w, c), "--yes"),
    "jr-ls": ls_case,
    "jr-prune": lambda w, c: _with(prune_case(w, c), "--dry-run"),
    "jr-reboot-prep": lambda w, c: _with(reboot_prep_case(w, c), "--yes"),
    "jr-retry": lambda w, c: _with(retry_case(w, c), "--yes"),
    "jr-run-once": run_once_case,
    "jr-sync": sync_case,
}
BAD_REPO = "https://example.com/not/github"


def _with(case: Case, *args: str) -> Case:
    case.args = [*args, *case.args]
    return case


@pytest.mark.parametrize("tool", TOOLS)
def test_the_tools_with_output_formats_are_the_ones_checked_here(tool, help_of):
    assert ("-o FORMAT, --output FORMAT" in help_of(tool).stdout) is (tool in OUTPUT)


@pytest.mark.parametrize("tool", sorted(OUTPUT))
def test_an_unknown_output_format_exits_2_with_the_usage_on_stderr(tool, tmp_path):
    result = run(tool, *POSITIONAL.get(tool, []), "-o", "xml", workdir=tmp_path / "workdir")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"usage: {tool} ")
    assert "error: argument -o/--output: invalid choice: 'xml'" in result.stderr


def rows_of(fmt: str, stdout: str) -> list[str]:
    """The data rows of the output, checked to be well-formed in that format."""
    lines = stdout.splitlines()
    assert stdout.endswith("\n") and all(lines), stdout
    if fmt == "table":
        assert re.fullmatch(r"[- ]+", lines[1]) and len(lines[1]) >= len(lines[0].rstrip())
        return lines[2:]
    if fmt == "tsv":
        header = lines[0].split("\t")
        assert all(header) and all(len(line.split("\t")) == len(header) for line in lines)
        return lines[1:]
    if fmt == "jsonl":
        assert all(isinstance(json.loads(line), dict) for line in lines)
        return lines
    assert all(len(line.split()) == 1 for line in lines)
    return lines


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tool", sorted(OUTPUT))
def test_each_output_format_prints_the_rows_in_that_format(tool, fmt, request, store):
    case = prepare(request, store, OUTPUT[tool])
    workdir, conn = store
    if tool == "jr-sync":
        server = request.getfixturevalue("fake_jobserver")
        server.add_request(workspace={"repo": BAD_REPO})  # one job at once: an __error__ job
        case.env.update(JOB_SERVER_ENDPOINT=server.url, JOB_SERVER_TOKEN=server.token)
    result = run(tool, *case.args, "-o", fmt, workdir=workdir, **case.env)
    assert result.returncode == 0, result.stderr
    rows = rows_of(fmt, result.stdout)
    if case.names is None:  # one row per job in the store: the job the tool acted on
        jobs = {job.id for job in db_queries.find_jobs(conn)}
        assert len(rows) == len(jobs) == 1
        if fmt == "ids":
            assert set(rows) == jobs and all(ID_RE.match(row) for row in rows)
        if fmt == "jsonl":
            assert {json.loads(row)["id"] for row in rows} == jobs
    else:
        assert len(rows) == len(case.names)
        if fmt == "ids":
            assert set(rows) == case.names


# ---- a reader that goes away -----------------------------------------------------------------


def test_a_reader_that_has_gone_is_not_an_error(store):
    workdir, conn = store
    insert_job(conn, State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `jr-ls | head -1` once head has its line, before jr-ls writes
    try:
        result = subprocess.run(
            [sys.executable, str(BIN / "jr-ls"), "-o", "tsv"],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=tool_env(workdir),
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")
