"""Parse and validate a generated project.yaml of 2 000 actions (about 1 MB); plan a request of a
study whose actions mostly run a few reusable actions.

Targets: the load well under 0.5 s (floor: PyYAML's plain libyaml load (yaml.CSafeLoader) of the
same text, which checks nothing and records no lines). Planning 1 200 actions, 600 of which run
3 distinct reusable actions (the shape of a real study: 1 211 actions, 589 of them one
reusable action), with `jr-add-job --dry-run`, side by side with the same study with built-in
images only (the floor): the reusable actions cost a few git calls per distinct action, not
per action.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from benchlib import ROOT, report, run_cmd, timed

from jobrunner_lib.pipeline.project import load_pipeline


def generate(actions: int = 2000) -> str:
    """A v4 project: every 10th action extracts a dataset, the others model it."""
    lines = ["version: '4.0'", "", "actions:"]
    for i in range(actions):
        lines.append(f"  action_{i:05d}:")
        if i % 10 == 0:
            lines += [
                "    run: >",
                f"      ehrql:v1 generate-dataset analysis/dataset_definition_{i}.py",
                f"      --output output/dataset_{i}.arrow",
                "    outputs:",
                "      highly_sensitive:",
                f"        dataset: output/dataset_{i}.arrow",
            ]
            continue
        lines += [
            f"    run: r:v2 analysis/model_{i}.R --alpha 0.05 --label 'model {i}'",
            f"    needs: [action_{i - i % 10:05d}, action_{i - 1:05d}]",
            "    config:",
            "      alpha: 0.05",
            f'      label: "it\'s model {i}"',
            "      groups: [age, sex, region, imd, ethnicity]  # covariates",
            "    outputs:",
            "      moderately_sensitive:",
            f"        table: output/model_{i}/table_*.csv",
            f"        figure: output/model_{i}/figure.png",
            f"        log: logs/model_{i}.log",
            f"        summary: output/model_{i}/summary.json",
            "      highly_sensitive:",
            f"        data: output/model_{i}/data.rds",
        ]
    return "\n".join(lines) + "\n"


def study_of(actions: int, reusable: tuple[str, ...]) -> str:
    """A v5 project: every other action runs one of `reusable` (none: python:v1)."""
    lines = ['version: "5"', "actions:"]
    for i in range(actions):
        image = f"{reusable[i % len(reusable)]}:v1" if reusable and i % 2 else "python:v1"
        lines += [
            f"  a{i:05d}:",
            f"    run: {image} analysis/a.py --n {i}",
            "    outputs:",
            "      moderately_sensitive:",
            f"        table: output/t_{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def git_repo(path: Path, files: dict[str, str], tag: str | None = None) -> None:
    """A git repo at path holding files, committed on main (and tagged)."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@example.com",
               GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@example.com")  # fmt: skip
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "x"]):
        run_cmd(["git", "-C", str(path), *args], env=env)
    if tag:
        run_cmd(["git", "-C", str(path), "tag", tag], env=env)


def planning() -> None:
    """jr-add-job --dry-run of 1 200 actions with 3 reusable actions, and without (the floor)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        names = ("cox-ipw", "kaplan-meier", "cohort-joiner")
        for name in names:
            git_repo(base / "actions" / name, {"action.yaml": "run: python:v1 action.py\n"}, "v1")
        git_repo(base / "reusable", {"project.yaml": study_of(1200, names)})
        git_repo(base / "builtin", {"project.yaml": study_of(1200, ())})
        env = dict(
            os.environ,
            WORKDIR=str(base / "workdir"),
            JR_ENV_FILE=str(base / "no.env"),
            ACTIONS_BASE_URL=(base / "actions").as_uri(),
        )
        tool = [sys.executable, str(ROOT / "bin" / "jr-add-job"), "--dry-run"]

        def plan(study: str) -> None:
            subprocess.run([*tool, str(base / study)], env=env, check=True, capture_output=True)

        plan("reusable")  # fail loudly before printing a figure
        floor = timed(lambda: plan("builtin"), runs=3)
        report(
            "plan_1200_actions_600_reusable_3_distinct",
            timed(lambda: plan("reusable"), runs=3),
            "s",
            floor,
        )


def main() -> None:
    """Print the median of 5 loads, next to the floor; then the planning figure."""
    text = generate()
    pipeline = load_pipeline(text)  # fail loudly before printing any figure
    if len(pipeline.actions) != 2000 or len(text) < 900_000:
        raise SystemExit(
            f"bench input is wrong: {len(pipeline.actions)} actions, {len(text)} bytes"
        )
    floor = timed(lambda: yaml.load(text, Loader=yaml.CSafeLoader))
    report("pipeline_load_2000_actions", timed(lambda: load_pipeline(text)), "s", floor)
    planning()


if __name__ == "__main__":
    main()
