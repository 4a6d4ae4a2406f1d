"""Privacy routing as a property: what reaches the medium-privacy (level 4) tree, for any outputs.

The rule: a file may match patterns at several levels. The old runner let the last level assigned
win (docs/reference.md#the-old-backend), so a file declared highly_sensitive that a broader moderately_sensitive glob
also matched reached the medium-privacy tree. jr gives the file the MOST sensitive level that
matches it, whatever order project.yaml lists the levels in. Moderately and minimally sensitive
files go to the medium-privacy tree (jr's decision, docs/reference.md#the-old-backend); highly sensitive
never.

The fast properties drive the real routing functions (`outputs.match_outputs`,
`outputs.medium_privacy_files`, `pipeline.load_pipeline`) against a reference written here; a few
examples also run as real jobs whose script writes the generated files.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jobrunner_lib.core.outputs import PRIVACY_LEVELS, match_outputs, medium_privacy_files
from jobrunner_lib.jobs import processes, run
from jobrunner_lib.jobs.worker import drive_job
from jobrunner_lib.pipeline.project import load_pipeline
from jobrunner_lib.pipeline.rules import validate_output_path
from jobrunner_lib.store import db
from tests.reliability.conftest import SOAK, make_config, script
from tests.support.cli import run as run_tool
from tests.support.studies import commit_files, make_study

HIGH, MODERATE, MINIMAL = PRIVACY_LEVELS
MEDIUM_LEVELS = (MODERATE, MINIMAL)

# Directories have no dot and file names always do, so no generated file is another's directory.
DIRS = ("output", "a", "b")
NAMES = ("x.csv", "y.csv", "data.csv", "t.txt", "p.png", ".hidden.csv")
DIR_PATTERNS = (*DIRS, "*", "o*")
NAME_PATTERNS = (*NAMES, "*.csv", "*.txt", "*", "d*.csv", "*a*.csv")

files_st = st.lists(
    st.builds(
        lambda dirs, name: "/".join([*dirs, name]),
        st.lists(st.sampled_from(DIRS), min_size=0, max_size=2),
        st.sampled_from(NAMES),
    ),
    min_size=0,
    max_size=12,
    unique=True,
)
pattern_st = st.builds(
    lambda dirs, name: "/".join([*dirs, name]),
    st.lists(st.sampled_from(DIR_PATTERNS), min_size=0, max_size=2),
    st.sampled_from(NAME_PATTERNS),
)
# Levels in any order (project.yaml may list them so), each with one to three patterns.
spec_st = st.permutations(PRIVACY_LEVELS).flatmap(
    lambda order: st.tuples(
        *(st.lists(pattern_st, min_size=0, max_size=3, unique=True) for _ in order)
    ).map(
        lambda groups, order=order: {
            level: {f"{level[:3]}{i}": p for i, p in enumerate(patterns)}
            for level, patterns in zip(order, groups, strict=True)
            if patterns
        }
    )
)


def glob_matches(pattern: str, path: str) -> bool:
    """The reference glob: `*` is any run of characters within one path segment."""
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, glob)
        for glob, part in zip(pattern_parts, path_parts, strict=True)
    )


def expected_routing(spec: dict, files: list[str]) -> tuple[dict[str, str], list[str]]:
    """({file: level}, unmatched patterns): the most sensitive level matching a file wins."""
    levels: dict[str, str] = {}
    unmatched = []
    for level, patterns in spec.items():
        for pattern in patterns.values():
            hits = [f for f in files if glob_matches(pattern, f)]
            if not hits:
                unmatched.append(pattern)
            for f in hits:
                if f not in levels or PRIVACY_LEVELS.index(level) < PRIVACY_LEVELS.index(levels[f]):
                    levels[f] = level
    return levels, unmatched


def canonical(spec: dict) -> dict:
    """The spec with its levels in PRIVACY_LEVELS order, as the pipeline stores it."""
    return {level: spec[level] for level in PRIVACY_LEVELS if level in spec}


def check_routing(spec: dict, files: list[str]) -> dict[str, str]:
    """match_outputs and medium_privacy_files against the reference; the routing found."""
    matched, unmatched = match_outputs(spec, files)
    assert (matched, unmatched) == expected_routing(spec, files)
    medium = medium_privacy_files(matched)
    assert len(medium) == len(set(medium))
    assert set(medium) == {f for f, level in matched.items() if level in MEDIUM_LEVELS}
    assert not any(matched[f] == HIGH for f in medium)
    for f in files:
        only_high = all(
            not glob_matches(p, f) or level == HIGH
            for level, patterns in spec.items()
            for p in patterns.values()
        )
        if only_high:
            assert f not in medium, f"{f} matched only highly_sensitive patterns"
    return matched


@settings(max_examples=1000 if SOAK else 300, deadline=None)
@given(spec=spec_st, files=files_st)
def test_routing_of_any_outputs_follows_the_rule(spec: dict, files: list[str]) -> None:
    check_routing(spec, files)


@settings(max_examples=500 if SOAK else 150, deadline=None)
@given(spec=spec_st, files=files_st)
def test_the_order_levels_are_written_in_never_changes_the_routing(
    spec: dict, files: list[str]
) -> None:
    # Keep only what project.yaml may declare (one spelling of each path in an action).
    seen: set[str] = set()
    declared: dict = {}
    for level, patterns in spec.items():
        kept = {}
        for name, pattern in patterns.items():
            if pattern not in seen and validate_output_path(pattern, level) is None:
                seen.add(pattern)
                kept[name] = pattern
        if kept:
            declared[level] = kept
    assume(declared)  # nothing project.yaml may declare: not an example of this property
    text = yaml.safe_dump(
        {
            "version": "3.0",
            "expectations": {"population_size": 10},
            "actions": {"a": {"run": "python:v1 a.py", "outputs": declared}},
        },
        sort_keys=False,
    )
    stored = load_pipeline(text).actions["a"].outputs
    assert list(stored) == [level for level in PRIVACY_LEVELS if level in declared]
    assert stored == canonical(declared)
    matched = check_routing(stored, files)
    assert matched == expected_routing(canonical(declared), files)[0]


def test_a_file_matching_two_levels_gets_the_most_sensitive() -> None:
    files = ["output/data.csv", "output/summary.csv", "output/note.txt"]
    written_moderate_first = {
        MODERATE: {"tables": "output/*.csv"},
        HIGH: {"data": "output/data.csv"},
        MINIMAL: {"note": "output/note.txt", "summary": "output/summary.csv"},
    }
    text = yaml.safe_dump(
        {"version": "3.0", "expectations": {"population_size": 10},
         "actions": {"a": {"run": "python:v1 a.py", "outputs": written_moderate_first}}},
        sort_keys=False,
    )  # fmt: skip
    stored = load_pipeline(text).actions["a"].outputs
    matched, unmatched = match_outputs(stored, files)
    # data.csv is declared highly sensitive; the broader moderately sensitive glob does not
    # demote it (the old runner's last-level-wins rule would have sent it to medium privacy).
    assert matched == {
        "output/data.csv": HIGH,
        "output/summary.csv": MODERATE,  # both levels go to medium; the stricter one is kept
        "output/note.txt": MINIMAL,
    }
    assert unmatched == []
    assert sorted(medium_privacy_files(matched)) == ["output/note.txt", "output/summary.csv"]


# ---- the same through real jobs ----------------------------------------------------------------

WRITE_FILES = """
    for f in "$@"; do
        mkdir -p "$(dirname "$f")"
        printf '%s' "$f" > "$f"
    done
"""


def tree(root: Path) -> dict[str, str]:
    """Every file under root except jr's metadata: relative path -> content."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "metadata"
    }


def run_action(base: Path, outputs: dict, files: list[str]) -> tuple:
    """Commit a one-action study (made on first use) declaring outputs, submit it with
    jr-add-job, and run its job in workspace `ws`; (job, high tree, medium tree)."""
    project = {
        "version": "3.0",
        "expectations": {"population_size": 10},
        "actions": {
            "write": {"run": "python:v1 analysis/write.sh " + " ".join(files), "outputs": outputs}
        },
    }
    text = yaml.safe_dump(project, sort_keys=False)
    repo = base / "study"
    if repo.exists():
        commit_files(repo, text)
    else:
        make_study(repo, text, {"analysis/write.sh": script(WRITE_FILES)})
    config = make_config(base)
    added = run_tool(
        "jr-add-job", str(repo), "write", "--workspace", "ws", "-o", "ids", workdir=config.workdir
    )
    assert added.returncode == 0, added.stderr
    (job_id,) = added.stdout.split()
    conn = db.connect(config.db_path)
    try:
        # The real pass claims the job; the worker then runs here rather than in a new process.
        me = (os.getpid(), processes.process_info(os.getpid())[1] or time.time())
        run.run_pass(config, conn, spawn=lambda _config, _id: me)
        job = drive_job(config, job_id)
    finally:
        conn.close()
    assert job is not None and job.state.is_final, job
    high = config.high_privacy_storage_base / "workspaces" / "ws"
    medium = config.medium_privacy_storage_base / "workspaces" / "ws"
    return job, tree(high), tree(medium)


@pytest.mark.docker
@pytest.mark.timeout(300)
@settings(
    max_examples=20 if SOAK else 5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=spec_st, files=files_st.filter(bool))
def test_real_jobs_route_their_outputs_by_the_rule(
    labelled: str, tmp_path: Path, spec: dict, files: list[str]
) -> None:
    declared = {
        level: {n: p for n, p in patterns.items() if validate_output_path(p, level) is None}
        for level, patterns in spec.items()
    }
    seen: set[str] = set()
    for patterns in declared.values():
        for name in [n for n, p in patterns.items() if p in seen or seen.add(p)]:
            del patterns[name]
    declared = {level: patterns for level, patterns in declared.items() if patterns}
    assume(declared)  # nothing project.yaml may declare: not an example of this property
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    job, high, medium = run_action(base, declared, files)

    expected, unmatched = expected_routing(canonical(declared), files)
    assert job.outputs == expected
    assert bool(unmatched) is (job.status_code.value == "unmatched_patterns"), job.status_message
    assert high == {f: f for f in expected}  # outputs are copied even when the job fails
    assert medium == {f: f for f, level in expected.items() if level in MEDIUM_LEVELS}
    assert not any(expected[f] == HIGH for f in medium)


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_an_output_reclassified_as_highly_sensitive_leaves_the_medium_tree(labelled, tmp_path):
    files = ["output/table.csv", "output/other.csv"]
    first = {MODERATE: {"t": "output/table.csv", "o": "output/other.csv"}}
    job, high, medium = run_action(tmp_path, first, files)
    assert job.state.value == "succeeded" and set(medium) == set(files)

    # The same action in the same workspace, now saying that table.csv is highly sensitive.
    second = {HIGH: {"t": "output/table.csv"}, MODERATE: {"o": "output/other.csv"}}
    job, high, medium = run_action(tmp_path, second, files)
    assert job.state.value == "succeeded", job.status_message
    assert set(high) == set(files)
    assert set(medium) == {"output/other.csv"}
