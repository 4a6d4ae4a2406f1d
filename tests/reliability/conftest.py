"""Shared fixtures for the reliability tests: real jobs on the real Docker engine, driven in-process.

Every Docker object a test makes carries its own `org.jr.test=<uuid>` label (the `docker_label`
fixture, passed to jr through JR_EXTRA_LABELS) and is removed afterwards, pass or fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.docker import engine as docker
from tests.support.studies import make_study

SOAK = os.environ.get("JR_SOAK") == "1"


@pytest.fixture
def labelled(docker_ready: None, docker_label: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's Docker label, set for every object jr creates (removed by docker_label)."""
    monkeypatch.setenv(docker.EXTRA_LABELS_ENV, docker_label)
    return docker_label


def make_config(base: Path, **env: str) -> Config:
    """A backend whose workdir and privacy trees all live under base."""
    return load_config(
        environ={
            "JR_ENV_FILE": str(base / "no.env"),
            "WORKDIR": str(base / "workdir"),
            "COPY_STALL_TIMEOUT": "60",
            **env,
        }
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A dummy-data backend in tmp_path."""
    return make_config(tmp_path)


def script(body: str) -> str:
    """A job script from an indented block (leading whitespace stripped from each line)."""
    return "\n".join(line.strip() for line in body.strip().splitlines()) + "\n"


def study_with(path: Path, scripts: dict[str, str]) -> tuple[Path, str]:
    """A git study repo holding analysis/<name> for each script; (path, commit)."""
    files = {f"analysis/{name}": script(body) for name, body in scripts.items()}
    return make_study(
        path, "version: '3.0'\nexpectations: {population_size: 10}\nactions: {}\n", files
    )
