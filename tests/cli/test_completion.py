"""Bash completion: generated from the parsers, checked in, and working in plain bash."""

from __future__ import annotations

import subprocess

import pytest

from jobrunner_lib.cli import completion
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import ROOT, tool_env
from tests.support.factories import make_job, make_request

SCRIPT = ROOT / "completions" / "jr.bash"


def test_checked_in_script_is_up_to_date():
    assert SCRIPT.read_text() == completion.generate(), (
        "run `make completions` and commit completions/jr.bash"
    )


def complete(words: list[str], env: dict[str, str]) -> list[str]:
    """Run bash (no bash-completion package) with COMP_WORDS/COMP_CWORD set; return COMPREPLY."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = (
        f"source {SCRIPT}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _jr_complete; "
        "printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def env(tmp_path):
    workdir = tmp_path / "workdir"
    conn = db.connect(workdir / "db.sqlite")
    req = make_request(id="aaaaqqqqzzzz2222")
    db_queries.insert_request(conn, req, [make_job(req, "extract"), make_job(req, "model")])
    other = make_request(id="bbbbqqqqyyyy3333")
    db_queries.insert_request(conn, other, [make_job(other, "report")])
    return tool_env(workdir)


def test_every_tool_is_registered_for_completion():
    text = SCRIPT.read_text()
    for name, _cls in completion.tool_classes():
        assert f"    {name})" in text
    assert "complete -F _jr_complete" in text


def test_flags_complete(env):
    assert complete(["jr-ls", "--sta"], env) == ["--state", "--status-code"]


def test_choices_complete_after_their_flag(env):
    assert complete(["jr-ls", "-o", "j"], env) == ["jsonl"]


def test_a_unique_fragment_completes_to_the_full_job_id(env):
    from jobrunner_lib.core.ids import job_id

    full = job_id("aaaaqqqqzzzz2222", "extract")
    assert complete(["jr-ls", full[4:8]], env) == [full]


def test_several_matches_show_the_action_beside_each_id(env):
    shown = complete(["jr-ls", "qqqq"], env)
    assert sorted(shown) == ["aaaaqqqqzzzz2222(request)", "bbbbqqqqyyyy3333(request)"]


def test_no_id_completion_for_option_values(env):
    assert complete(["jr-ls", "--workspace", "qqq"], env) == []


def test_jr_flags_completes_its_actions_and_flag_names(env):
    assert complete(["jr-flags", "cl"], env) == ["clear"]
    assert complete(["jr-flags", "set", "man"], env) == ["manual-db-maintenance"]
    assert complete(["jr-flags", "-o", "t"], env) == ["table", "tsv"]
