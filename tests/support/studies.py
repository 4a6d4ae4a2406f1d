"""Real git study repositories for tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}

SIMPLE_PROJECT = """\
version: "5"
actions:
  extract:
    run: python:v1 analysis/extract.sh
    outputs:
      highly_sensitive:
        data: output/data.csv
  model:
    run: python:v1 analysis/model.sh
    needs: [extract]
    outputs:
      moderately_sensitive:
        table: output/table.csv
  report:
    run: r:v1 analysis/report.sh
    needs: [model]
    outputs:
      moderately_sensitive:
        report: output/report.txt
"""

SIMPLE_SCRIPTS = {
    "analysis/extract.sh": "mkdir -p output\nprintf 'id,age\\n1,40\\n2,50\\n' > output/data.csv\n",
    "analysis/model.sh": "mkdir -p output\nwc -l < output/data.csv > output/table.csv\n",
    "analysis/report.sh": "mkdir -p output\necho report > output/report.txt\n",
}


def git(repo: Path, *args: str) -> str:
    """Run git in repo and return its stdout."""
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def make_study(
    path: Path,
    project: str | None = SIMPLE_PROJECT,
    files: dict[str, str] | None = None,
    branch: str = "main",
) -> tuple[Path, str]:
    """Create a git repo with project.yaml and files committed; return (path, commit sha)."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    return path, commit_files(path, project, SIMPLE_SCRIPTS if files is None else files)


def commit_files(
    path: Path, project: str | None, files: dict[str, str] | None = None, message: str = "update"
) -> str:
    """Write (or with project=None, remove) project.yaml and files, commit, return the sha."""
    if project is None:
        (path / "project.yaml").unlink(missing_ok=True)
    else:
        (path / "project.yaml").write_text(project)
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD")
