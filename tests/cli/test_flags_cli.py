"""bin/jr-flags (show, set and clear the backend flags) and the `Flags` header jr-sync sends the
jobs website with them, as an operator runs the tools (subprocesses, no terminal)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests

from jobrunner_lib.cli.formats import read_tsv
from jobrunner_lib.core.flags import timestamp_isoformat
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from tests.support.cli import run
from tests.support.fake_jobserver import FakeJobServer

BAD_REPO = "https://example.com/not/github"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
UPSTREAM_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def flags(workdir: Path, *args: str, **env: str):
    return run("jr-flags", *args, workdir=workdir, **env)


def table(result) -> dict[str, dict[str, str]]:
    assert result.returncode == 0, result.stderr
    return {row["flag"]: row for row in read_tsv(result.stdout)}


def test_show_lists_every_flag_even_never_set(workdir):
    shown = table(flags(workdir))
    assert list(shown) == ["paused", "mode", "manual-db-maintenance"]
    assert all(row["value"] == row["since"] == "" for row in shown.values())
    jsonl = flags(workdir, "-o", "jsonl")
    assert json.loads(jsonl.stdout.splitlines()[1]) == {
        "flag": "mode",
        "value": None,
        "since": None,
    }
    assert flags(workdir, "get", "paused", "-o", "ids").stdout == "paused\n"


def test_set_and_clear_say_what_changed_and_keep_the_time(workdir):
    result = flags(workdir, "set", "paused")
    shown = table(result)
    assert shown["paused"]["value"] == "true" and ISO.fullmatch(shown["paused"]["since"])
    assert "set paused=true (was never set): no new job starts" in result.stderr
    again = flags(workdir, "set", "paused=true")
    assert "paused: already true since " in again.stderr and "unchanged" in again.stderr
    assert table(again)["paused"] == shown["paused"]

    cleared = flags(workdir, "clear", "paused")
    assert "cleared paused (was true since " in cleared.stderr
    row = table(cleared)["paused"]
    assert row["value"] == "" and ISO.fullmatch(row["since"])
    # Upstream's way to clear works too.
    flags(workdir, "set", "mode=db-maintenance")
    assert table(flags(workdir, "set", "mode="))["mode"]["value"] == ""


def test_manual_maintenance_sets_the_mode_and_clearing_it_ends_both(workdir):
    result = flags(workdir, "set", "manual-db-maintenance")
    shown = table(result)
    assert shown["manual-db-maintenance"]["value"] == "on"
    assert shown["mode"]["value"] == "db-maintenance"
    assert "set mode=db-maintenance (was never set): database jobs wait" in result.stderr
    refused = flags(workdir, "clear", "mode")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (
        "jr-flags: manual-db-maintenance is set and holds mode at db-maintenance: "
        "jr-flags clear manual-db-maintenance\n"
    )
    # No check configured: nothing else would end the mode it set.
    ended = table(flags(workdir, "clear", "manual-db-maintenance"))
    assert ended["mode"]["value"] == ended["manual-db-maintenance"]["value"] == ""


def test_with_a_check_clearing_manual_maintenance_leaves_the_mode_to_the_check(workdir):
    check = {
        "BACKEND": "tpp",
        "DEFAULT_DATABASE_URL": "mssql://db/x",
        "MAINTENANCE_CHECK_IMAGE": "jr-demo/python:v1",
    }
    flags(workdir, "set", "manual-db-maintenance", **check)
    result = flags(workdir, "clear", "manual-db-maintenance", **check)
    assert table(result)["mode"]["value"] == "db-maintenance"
    assert "the maintenance check runs at the next pass" in result.stderr
    conn = db.connect(workdir / "db.sqlite")
    try:
        last = store_flags.flag_rows(conn, ["maintenance-check"])["maintenance-check"]
    finally:
        conn.close()
    assert last.timestamp == 0  # due at once
    assert "maintenance check: jr-demo/python:v1 every 300s" in flags(workdir, **check).stderr


def test_dry_run_changes_nothing(workdir):
    result = flags(workdir, "set", "manual-db-maintenance", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run: would set manual-db-maintenance=on (now never set)" in result.stderr
    assert "dry run: would set mode=db-maintenance (now never set)" in result.stderr
    assert result.stderr.endswith("dry run: nothing changed\n")
    assert all(row["value"] == "" for row in table(result).values())
    assert all(row["since"] == "" for row in table(flags(workdir)).values())


def test_unknown_flags_and_values_exit_2_with_one_line(workdir):
    cases = {
        ("set", "foo"): "jr-flags: unknown flag 'foo': expected one of paused, mode, "
        "manual-db-maintenance\n",
        ("get", "foo"): "jr-flags: unknown flag 'foo': expected one of paused, mode, "
        "manual-db-maintenance\n",
        ("set", "paused=yes"): "jr-flags: paused=yes: paused can only be true (or cleared)\n",
        ("set", "mode=manual-db-maintenance"): "jr-flags: mode=manual-db-maintenance: mode can "
        "only be db-maintenance (or cleared); for maintenance only you end, jr-flags set "
        "manual-db-maintenance\n",
        ("clear", "mode=db-maintenance"): "jr-flags: clear takes flag names only, not "
        "'mode=db-maintenance': jr-flags clear mode\n",
        ("set",): "jr-flags: set what? e.g. jr-flags set manual-db-maintenance\n",
    }
    for args, message in cases.items():
        result = flags(workdir, *args)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message), args
    assert all(row["since"] == "" for row in table(flags(workdir)).values())


# ---- the Flags header --------------------------------------------------------------------------


def sync(workdir: Path, server: FakeJobServer):
    return run(
        "jr-sync", workdir=workdir, JOB_SERVER_ENDPOINT=server.url, JOB_SERVER_TOKEN=server.token
    )


def test_jr_sync_sends_the_stores_flags_on_every_get_and_post(workdir, fake_jobserver):
    fake_jobserver.add_request(workspace={"repo": BAD_REPO})  # one __error__ job to post
    flags(workdir, "set", "manual-db-maintenance")
    flags(workdir, "set", "paused")
    flags(workdir, "clear", "paused")
    conn = db.connect(workdir / "db.sqlite")
    try:
        stored = store_flags.backend_flags(conn)
    finally:
        conn.close()

    result = sync(workdir, fake_jobserver)
    assert result.returncode == 0, result.stderr
    methods = [c["method"] for c in fake_jobserver.calls]
    assert "GET" in methods and "POST" in methods
    expected = {
        name: {"v": flag.value, "ts": timestamp_isoformat(flag.timestamp)}
        for name, flag in stored.items()
    }
    assert list(expected) == ["paused", "mode", "manual-db-maintenance"]
    assert expected["paused"]["v"] is None and expected["mode"]["v"] == "db-maintenance"
    for call in fake_jobserver.calls:
        header = call["flags"]
        assert json.loads(header) == expected
        assert header == json.dumps(expected, separators=(",", ":"))  # compact, as upstream
        assert all(UPSTREAM_ISO.fullmatch(v["ts"]) for v in json.loads(header).values())
    assert fake_jobserver.jobrunner_state == expected


def test_with_no_flag_ever_set_the_header_is_an_empty_object(workdir, fake_jobserver):
    assert sync(workdir, fake_jobserver).returncode == 0
    assert [c["flags"] for c in fake_jobserver.calls] == ["{}"]
    assert fake_jobserver.jobrunner_state == {}  # what the website's status page needs


def test_the_fake_website_fails_as_the_real_one_on_a_header_that_is_not_json(fake_jobserver):
    request = fake_jobserver.add_request()
    job = {
        "identifier": "abcdabcdabcdabcd",
        "job_request_id": request["identifier"],
        "action": "a",
        "run_command": "python:v1 a.sh",
        "status": "pending",
        "status_code": "created",
        "status_message": "Created",
        "created_at": "2021-11-03T09:12:51Z",
        "updated_at": "2021-11-03T09:12:51Z",
        "started_at": None,
        "completed_at": None,
    }
    headers = {"Authorization": fake_jobserver.token, "Flags": "{not json"}
    posted = requests.post(f"{fake_jobserver.url}jobs/", json=[job], headers=headers, timeout=10)
    assert posted.status_code == 500 and posted.headers["Content-Type"] == "text/html"
    assert "abcdabcdabcdabcd" in fake_jobserver.jobs  # saved before the header was read
    listed = requests.get(f"{fake_jobserver.url}job-requests/", headers=headers, timeout=10)
    assert listed.status_code == 500
    assert fake_jobserver.bad_flags == ["{not json", "{not json"]
    assert fake_jobserver.jobrunner_state is None
    # Without a token the list is answered and the header ignored, as the website does.
    anonymous = requests.get(
        f"{fake_jobserver.url}job-requests/", headers={"Flags": "{not json"}, timeout=10
    )
    assert anonymous.status_code == 200
