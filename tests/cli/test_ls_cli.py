"""jr-ls as an operator runs it: stdout, stderr and exit codes exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from jobrunner_lib.core.models import State, StatusCode
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import run, tool_env
from tests.support.factories import make_job, make_request

HEADER = (
    "id\trequest\tworkspace\taction\tstate\tstatus_code\tstatus_message\tcreated_at\tupdated_at\n"
)


@pytest.fixture
def jobs(tmp_path):
    workdir = tmp_path / "workdir"
    conn = db.connect(workdir / "db.sqlite")
    req = make_request(workspace="covid", id="aaaaqqqqzzzz2222")
    extract = make_job(
        req, "extract", State.SUCCEEDED, code=StatusCode.SUCCEEDED, message="Completed successfully"
    )
    model = make_job(
        req,
        "model",
        State.FAILED,
        code=StatusCode.NONZERO_EXIT,
        message="Job exited with error code 1",
    )
    other = make_request(workspace="flu", id="bbbbqqqqyyyy3333")
    report = make_job(other, "report", State.RUNNING, code=StatusCode.EXECUTING, message="Running")
    db_queries.insert_request(conn, req, [extract, model])
    db_queries.insert_request(conn, other, [report])
    return workdir, extract, model, report


def test_empty_workdir_prints_an_empty_table_and_exits_0(tmp_path):
    result = run("jr-ls", workdir=tmp_path / "workdir")
    assert (result.returncode, result.stdout, result.stderr) == (0, HEADER, "")


def test_lists_newest_first_as_tsv_when_piped(jobs):
    workdir, extract, model, report = jobs
    result = run("jr-ls", workdir=workdir)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] + "\n" == HEADER
    assert [line.split("\t")[0] for line in lines[1:]] == [report.id, model.id, extract.id]
    assert lines[1].split("\t")[1:7] == [
        "bbbbqqqqyyyy3333",
        "flu",
        "report",
        "running",
        "executing",
        "Running",
    ]


def test_filters_combine(jobs):
    workdir, extract, model, _ = jobs
    result = run(
        "jr-ls", "--workspace", "covid", "--state", "failed,succeeded", "-o", "ids", workdir=workdir
    )
    assert result.stdout == f"{model.id}\n{extract.id}\n"
    result = run("jr-ls", "--status-code", "nonzero_exit", "-o", "ids", workdir=workdir)
    assert result.stdout == f"{model.id}\n"


def test_jsonl_has_every_column(jobs):
    workdir, *_ = jobs
    result = run("jr-ls", "-o", "jsonl", "--limit", "1", workdir=workdir)
    row = json.loads(result.stdout)
    assert list(row) == HEADER.strip().split("\t")


def test_ids_piped_back_in_select_those_jobs(jobs):
    workdir, extract, model, _ = jobs
    result = run("jr-ls", "-o", "ids", "-", workdir=workdir, input=f"{model.id}\n{extract.id}\n")
    assert result.stdout == f"{model.id}\n{extract.id}\n"


def test_request_fragment_lists_the_requests_jobs(jobs):
    workdir, extract, model, _ = jobs
    assert (
        run("jr-ls", "-o", "ids", "zzzz2", workdir=workdir).stdout == f"{model.id}\n{extract.id}\n"
    )


def test_ambiguous_fragment_without_terminal_exits_4_listing_candidates(jobs):
    workdir, *_ = jobs
    result = run("jr-ls", "qqqq", workdir=workdir)
    assert result.returncode == 4 and result.stdout == ""
    assert result.stderr.startswith(
        "jr-ls: 'qqqq' matches 2 jobs or requests; give more characters or use --pick:"
    )
    assert "aaaaqqqqzzzz2222" in result.stderr and "bbbbqqqqyyyy3333" in result.stderr


def test_unknown_id_exits_3(jobs):
    workdir, *_ = jobs
    result = run("jr-ls", "nomatch", workdir=workdir)
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        "",
        "jr-ls: No jobs found matching 'nomatch'\n",
    )


def test_bad_state_is_a_usage_error(tmp_path):
    result = run("jr-ls", "--state", "stuck", workdir=tmp_path / "w")
    assert result.returncode == 2
    assert (
        result.stderr
        == "jr-ls: --state 'stuck': expected one of pending, running, failed, succeeded\n"
    )


def test_summary_counts_per_workspace_and_shows_pause(jobs):
    workdir, *_ = jobs
    result = run("jr-ls", "--summary", workdir=workdir)
    assert result.stdout.splitlines() == [
        "workspace\tpending\trunning\tfailed\tsucceeded\ttotal",
        "covid\t0\t0\t1\t1\t2",
        "flu\t0\t1\t0\t0\t1",
        "(all)\t0\t1\t1\t1\t3",
    ]
    assert result.stderr == ""
    store_flags.set_flag(db.connect(workdir / "db.sqlite"), "paused", "draining for reboot")
    result = run("jr-ls", "--summary", workdir=workdir)
    assert "Backend is PAUSED (draining for reboot)" in result.stderr
    # As jr-reboot-prep and jr-flags set it now (`true`, as upstream): since when.
    assert (
        run("jr-flags", "set", "paused", "manual-db-maintenance", workdir=workdir).returncode == 0
    )
    result = run("jr-ls", "--summary", workdir=workdir)
    assert re.search(r"Backend is PAUSED \(since \d{4}-\d\d-\d\dT[\d:]{8}Z\)", result.stderr)
    assert "Database maintenance mode since " in result.stderr


def test_bad_configuration_exits_78_naming_the_variable(tmp_path):
    result = run("jr-ls", workdir=tmp_path / "w", LOGLEVEL="LOUD")
    assert result.returncode == 78
    assert (
        result.stderr
        == "jr-ls: LOGLEVEL='LOUD' is invalid: expected DEBUG, INFO, WARNING or ERROR\n"
    )


def test_help_has_an_example_and_version_works(tmp_path):
    assert "examples:" in run("jr-ls", "--help", workdir=tmp_path / "w").stdout
    assert run("jr-ls", "--version", workdir=tmp_path / "w").stdout.startswith("jr-ls ")


def test_jr_ls_imports_neither_docker_nor_requests(tmp_path):
    code = (
        "import sys\nfrom jobrunner_lib.cli.ls import Ls\nimport io\n"
        "rc = Ls().main([], stdout=io.StringIO(), stderr=io.StringIO())\n"
        "print(rc, sorted(m for m in ('docker', 'requests', 'urllib3', 'sh') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=tool_env(tmp_path / "w"),
        check=True,
    )
    assert result.stdout.strip() == "0 []"


def test_internal_error_is_one_line_naming_the_traceback_file(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "db.sqlite").write_text("this is not a database")
    result = run("jr-ls", workdir=workdir)
    assert result.returncode == 70
    assert result.stderr.startswith("jr-ls: internal error: DatabaseError:")
    assert str(workdir / "logs" / "internal-errors.log") in result.stderr
    assert "Traceback" in (workdir / "logs" / "internal-errors.log").read_text()
