"""jr-add-job on real git repos made by the test: output, exit codes, and bad input."""

from __future__ import annotations

import json
import re

import pytest

from jobrunner_lib.pipeline.names import IMAGE_NAME_RULE
from jobrunner_lib.pipeline.rules import one_line
from jobrunner_lib.store import db
from tests.support.cli import run
from tests.support.studies import SIMPLE_PROJECT, commit_files, git, make_study


@pytest.fixture
def study(tmp_path):
    repo, sha = make_study(tmp_path / "study")
    return tmp_path / "workdir", repo, sha


def job_count(workdir):
    path = workdir / "db.sqlite"
    return (
        db.connect(path).execute("SELECT COUNT(*) FROM job").fetchone()[0] if path.exists() else 0
    )


def test_run_all_creates_every_action_and_prints_the_jobs(study):
    workdir, repo, sha = study
    result = run("jr-add-job", str(repo), workdir=workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "id\trequest\tworkspace\taction\tstate\tstatus_code\tstatus_message"
    assert [line.split("\t")[3:5] for line in lines[1:]] == [
        ["extract", "pending"],
        ["model", "pending"],
        ["report", "pending"],
    ]
    assert "Created 3 new jobs req=" in result.stderr
    assert job_count(workdir) == 3


def test_ids_output_pipes_into_jr_ls(study):
    workdir, repo, _ = study
    ids = run(
        "jr-add-job", str(repo), "model", "-o", "ids", "--workspace", "w1", workdir=workdir
    ).stdout
    assert len(ids.split()) == 2
    listed = run("jr-ls", "-o", "ids", "-", workdir=workdir, input=ids)
    assert sorted(listed.stdout.split()) == sorted(ids.split())


def test_branch_and_commit_select_what_runs(study):
    workdir, repo, sha = study
    git(repo, "checkout", "-q", "-b", "other")
    other = commit_files(repo, SIMPLE_PROJECT, message="other")
    out = run(
        "jr-add-job", str(repo), "extract", "--branch", "other", "-o", "jsonl", workdir=workdir
    )
    assert out.returncode == 0, out.stderr
    conn = db.connect(workdir / "db.sqlite")
    assert conn.execute('SELECT "commit" FROM job').fetchone()[0] == other
    out = run(
        "jr-add-job", str(repo), "extract", "--commit", sha, "--workspace", "b", workdir=workdir
    )
    assert out.returncode == 0
    assert conn.execute("SELECT \"commit\" FROM job WHERE workspace = 'b'").fetchone()[0] == sha


def test_dry_run_validates_and_writes_nothing(study):
    workdir, repo, _ = study
    result = run("jr-add-job", "--dry-run", str(repo), workdir=workdir)
    assert result.returncode == 0
    assert "dry run: project.yaml is valid; 3 job(s) would be created" in result.stderr
    assert len(result.stdout.splitlines()) == 4
    assert job_count(workdir) == 0


def test_invalid_project_lists_every_problem_and_exits_1(study):
    workdir, repo, _ = study
    bad = SIMPLE_PROJECT.replace("needs: [extract]", "needs: [nothere]").replace(
        "r:v1 analysis", "r analysis"
    )
    commit_files(repo, bad)
    result = run("jr-add-job", "--dry-run", str(repo), workdir=workdir)
    assert result.returncode == 1 and result.stdout == ""
    assert "nothere" in result.stderr and "must have a version specified" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"jr-add-job: {repo}: project.yaml is invalid (2 problems); nothing was submitted"
    )
    assert "Traceback" not in result.stderr and job_count(workdir) == 0


def test_invalid_yaml_syntax(study):
    workdir, repo, _ = study
    commit_files(repo, "version: '5'\nactions:\n  a: [unclosed\n")
    result = run("jr-add-job", str(repo), workdir=workdir)
    assert result.returncode == 1 and "line" in result.stderr and "Traceback" not in result.stderr
    assert job_count(workdir) == 0


def test_missing_project_yaml(study):
    workdir, repo, _ = study
    commit_files(repo, None)
    result = run("jr-add-job", str(repo), workdir=workdir)
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"jr-add-job: JobRequestError: No project.yaml file found in {repo}"
    )
    assert job_count(workdir) == 0


def test_unknown_action(study):
    workdir, repo, _ = study
    result = run("jr-add-job", str(repo), "nope", workdir=workdir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "jr-add-job: UnknownActionError: Action 'nope' not found in project.yaml"
    )
    assert job_count(workdir) == 0


def test_unknown_commit(study):
    workdir, repo, _ = study
    result = run("jr-add-job", str(repo), "--commit", "e" * 40, workdir=workdir)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"jr-add-job: GitError: Error fetching commit {'e' * 40}")
    )
    assert job_count(workdir) == 0


def test_short_commit_is_a_usage_error(study):
    workdir, repo, sha = study
    result = run("jr-add-job", str(repo), "--commit", sha[:7], workdir=workdir)
    assert result.returncode == 2 and "full 40-character sha" in result.stderr


def test_missing_repository_path(tmp_path):
    result = run("jr-add-job", str(tmp_path / "nowhere"), workdir=tmp_path / "w")
    assert result.returncode == 2
    assert result.stderr == f"jr-add-job: repository '{tmp_path / 'nowhere'}' does not exist\n"


UNSAFE_NAMES = {
    "newline": ("a\nb", "may not contain control characters or line breaks (found U+000A)"),
    "dots": ("..", "may not contain '..'"),
    "slash": ("../escape", "may not contain / or \\ (the name becomes a file name,"),
    "long": ("x" * 300, "may be at most 100 characters long (this one has 300)"),
}


@pytest.mark.parametrize(("name", "gist"), UNSAFE_NAMES.values(), ids=UNSAFE_NAMES)
def test_an_action_name_unsafe_in_logs_or_file_names_is_refused_and_creates_no_job(
    study, name, gist
):
    workdir, repo, _ = study
    commit_files(repo, SIMPLE_PROJECT.replace("  report:", f"  {json.dumps(name)}:"))
    result = run("jr-add-job", str(repo), workdir=workdir)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    (problem,) = [line for line in lines if line.startswith("project.yaml: ")]
    assert problem.startswith(f"project.yaml: action '{one_line(name, 100)}': Action names {gist}")
    assert problem.endswith("; rename the action (line 14)")
    assert (
        lines[-1]
        == f"jr-add-job: {repo}: project.yaml is invalid (1 problem); nothing was submitted"
    )
    # nothing else on stderr could pass for a line of its own: every line is a log line or ours
    assert all(re.match(r"\d{4}-\d\d-\d\d |project\.yaml: |jr-add-job: ", line) for line in lines)
    assert job_count(workdir) == 0


ACTION_PROJECT = """\
version: "5"
actions:
  a:
    run: {run} --flag
    outputs:
      moderately_sensitive:
        table: output/table.csv
"""


def make_action_repo(path):
    """A reusable action's repo: action.yaml on main, tagged v1."""
    files = {"action.yaml": "run: python:v1 action.py\n", "action.py": "print('hello')\n"}
    repo, sha = make_study(path, project=None, files=files)
    git(repo, "tag", "v1")
    return repo


def test_a_reusable_action_under_actions_base_url_is_fetched_and_planned(tmp_path):
    make_action_repo(tmp_path / "other" / "act")
    repo, _ = make_study(tmp_path / "study", ACTION_PROJECT.format(run="act:v1"))
    workdir = tmp_path / "workdir"
    base = (tmp_path / "other").as_uri()
    result = run("jr-add-job", str(repo), workdir=workdir, ACTIONS_BASE_URL=base)
    assert result.returncode == 0, result.stderr
    conn = db.connect(workdir / "db.sqlite")
    row = conn.execute("SELECT run_command, action_repo_url FROM job").fetchone()
    assert tuple(row) == ("python:v1 action.py --flag", f"{base}/act")
    assert (workdir / "repos" / "act.git").is_dir()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["submit", "dry-run"])
def test_a_reusable_action_outside_actions_base_url_is_refused_and_nothing_is_fetched(
    tmp_path, dry_run
):
    # ACTIONS_BASE_URL/../other/act is a real action repo: git would fetch it without the check
    (tmp_path / "actions").mkdir()
    make_action_repo(tmp_path / "other" / "act")
    repo, _ = make_study(tmp_path / "study", ACTION_PROJECT.format(run="../other/act:v1"))
    workdir = tmp_path / "workdir"
    base = (tmp_path / "actions").as_uri()
    result = run("jr-add-job", *dry_run, str(repo), workdir=workdir, ACTIONS_BASE_URL=base)
    assert result.returncode == 1 and result.stdout == ""
    assert (
        f"project.yaml: action 'a': `run` uses image `../other/act`, which is not a valid name:"
        f" {IMAGE_NAME_RULE} (line 4)"
    ) in result.stderr.splitlines()
    fetches = [line for line in result.stderr.splitlines() if "Fetching commit" in line]
    assert len(fetches) == 1 and fetches[0].endswith(f"from {repo} (depth 1)")
    assert job_count(workdir) == 0
    assert sorted(p.name for p in (workdir / "repos").glob("*.git")) == ["study.git"]


def many_reusable_actions(count: int, names: tuple[str, ...]) -> str:
    """A project of `count` actions, each running one of the reusable actions `names`."""
    lines = ['version: "5"', "actions:"]
    for i in range(count):
        lines += [
            f"  a{i}:",
            f"    run: {names[i % len(names)]}:v1 --n {i}",
            "    outputs:",
            "      moderately_sensitive:",
            f"        table: output/table_{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def test_each_reusable_action_is_resolved_once_per_request_however_many_actions_use_it(
    tmp_path,
):
    # The shape of a real study: 1 211 actions, 589 of them cox-ipw:v0.0.37 (here 60 and 2).
    for name in ("act", "other"):
        make_action_repo(tmp_path / "actions" / name)
    repo, _ = make_study(tmp_path / "study", many_reusable_actions(60, ("act", "other")))
    workdir = tmp_path / "workdir"
    trace = tmp_path / "git-trace"
    result = run(
        "jr-add-job",
        "--dry-run",
        str(repo),
        workdir=workdir,
        ACTIONS_BASE_URL=(tmp_path / "actions").as_uri(),
        GIT_TRACE=str(trace),
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + 60  # the header and every action's job
    calls = [line for line in trace.read_text().splitlines() if "trace: built-in: git" in line]
    ls_remotes = [line for line in calls if "git ls-remote" in line and "/actions/" in line]
    # Per reusable action: its tag, and its main branch (to check the tag is merged): 2 each.
    assert len(ls_remotes) == 4, "\n".join(ls_remotes)
    assert len(calls) < 40, f"{len(calls)} git calls for 60 actions"
