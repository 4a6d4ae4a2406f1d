"""Output ownership as a property (issue 16): random workspaces, random patterns, random re-runs.

Each example is a workspace of three actions with random, overlapping output patterns (`*`,
`*/x`, patterns matching inputs and `metadata/`), random privacy levels and random `needs`,
run as real jobs (real Docker, real git) in a random order with random files written each time.
After every run, whatever its outcome:
- no file that any action declares (its newest job's spec) or recorded (its newest successful
  job) highly_sensitive is in the medium-privacy tree;
- no file owned by another action's newest successful job was deleted or changed;
- `metadata/` holds only jr's own files: one log per action that has run, naming its newest
  job, and the medium tree's manifest;
- nothing temporary or staged is left in either tree.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobrunner_lib.core.outputs import HIGH, PRIVACY_LEVELS, glob_to_regex
from jobrunner_lib.jobs.worker import drive_job
from jobrunner_lib.store import queries as db_queries
from tests.integration.test_executor import (
    STORAGES,
    labelled,  # noqa: F401 - an autouse fixture: labels and removes this module's objects
    make_config,
)
from tests.integration.test_output_ownership import command, files, leftovers
from tests.integration.test_output_ownership import study as study  # noqa: F401 - a fixture
from tests.reliability.conftest import SOAK
from tests.support.factories import Jobs

pytestmark = pytest.mark.docker

ACTIONS = ("a", "b", "c")
PATHS = (
    "output/x.csv",
    "output/y.csv",
    "Output/X.csv",
    "out/z.csv",
    "output/n.txt",
    "metadata/a.log",
    "metadata/manifest.json",
)
PATTERNS = (
    "output/*.csv",
    "*/*.csv",
    "output/x.csv",
    "out/*.csv",
    "*/*.txt",
    "*/a.log",
    "*/*.log",
    "*/*.json",
    "output/y.csv",
)

spec_st = st.dictionaries(
    st.sampled_from(PRIVACY_LEVELS),
    st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2, unique=True).map(
        lambda patterns: {f"o{i}": p for i, p in enumerate(patterns)}
    ),
    min_size=1,
    max_size=2,
)
workspace_st = st.fixed_dictionaries(
    {
        "specs": st.fixed_dictionaries({action: spec_st for action in ACTIONS}),
        # b may need a; c may need a and/or b (no cycles).
        "needs": st.fixed_dictionaries(
            {
                "a": st.just([]),
                "b": st.sampled_from([[], ["a"]]),
                "c": st.sampled_from([[], ["a"], ["b"], ["a", "b"]]),
            }
        ),
        "runs": st.lists(
            st.tuples(
                st.sampled_from(ACTIONS),
                st.lists(st.sampled_from(PATHS), min_size=1, max_size=4, unique=True),
            ),
            min_size=2,
            max_size=5,
        ),
    }
)


@pytest.fixture(params=STORAGES)
def config(request, tmp_path):
    return make_config(tmp_path, request.param)


def declared_high(conn, workspace: str, path: str) -> str | None:
    """Which action declares (newest job) or recorded (newest success) path highly_sensitive."""
    produced, declared = db_queries.workspace_outputs(conn, workspace)
    for action, spec in declared.items():
        for pattern in (spec.get(HIGH) or {}).values():
            if glob_to_regex(pattern.casefold()).match(path.casefold()):
                return f"{action} declares {pattern}"
    for action, outputs in produced.items():
        if outputs.get(path) == HIGH:
            return f"{action} recorded it"
    return None


def owned_files(conn, workspace: str, high: Path, but: str) -> dict[str, str]:
    """path -> content of every output of every other action's newest successful job."""
    produced, declared = db_queries.workspace_outputs(conn, workspace)
    found = {}
    for action, outputs in produced.items():
        if action == but:
            continue
        for path in outputs:
            found[path] = (high / path).read_text()
    return found


@settings(
    max_examples=40 if SOAK else 4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(example=workspace_st)
def test_any_workspace_keeps_outputs_with_their_owner_and_privacy_only_goes_up(
    config, conn, study, example
) -> None:
    jobs = Jobs(conn, *study)
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    high = config.high_privacy_storage_base / "workspaces" / ws
    medium = config.medium_privacy_storage_base / "workspaces" / ws
    ran: dict[str, str] = {}  # action -> its newest finished job
    for action, written in example["runs"]:
        before = owned_files(conn, ws, high, but=action)
        job = jobs.add(
            action,
            command(action, ["write.sh", *written]),
            example["specs"][action],
            needs=example["needs"][action],
            workspace=ws,
        )
        done = drive_job(config, job.id)
        assert done is not None and done.state.is_final
        if done.exit_code is not None:  # it reached finalize (not failed before it started)
            ran[action] = done.id

        # Privacy only goes up.
        for path in files(medium):
            why = declared_high(conn, ws, path)
            assert why is None, (
                f"{path} is in the medium tree, but {why} highly_sensitive "
                f"(after {action}: {done.status_message})"
            )
        # Nothing another action owned was deleted or changed.
        after = files(high)
        for path, content in before.items():
            assert after.get(path) == content, f"{action} changed {path}, owned by another action"
        # metadata/ holds jr's files only, each action's log naming its newest finished job.
        logs = {f"{a}.log" for a in ran}
        assert {p.name for p in (high / "metadata").glob("*")} <= logs
        assert {p.name for p in (medium / "metadata").glob("*")} <= logs | {"manifest.json"}
        for log in (high / "metadata").glob("*.log"):
            assert f"job_id: {ran[log.stem]}\n" in log.read_text()
        for tree in (high, medium):
            if (tree / "metadata" / "manifest.json").exists():
                assert tree == medium
                assert (tree / "metadata" / "manifest.json").read_text().startswith("{")
        assert leftovers(config) == []
