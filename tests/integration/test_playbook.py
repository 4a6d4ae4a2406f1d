"""docs/playbook.md cannot go stale: every `$ ` command of its ```console blocks runs here, in order,
against a scratch backend (real jobs, real Docker, a real registry), and must exit as the playbook
implies: 0, unless the next command is `echo $?`, whose output line is the expected code.

The scratch backend is configured by its own `.env` in its own directory (the commands run there,
as an operator runs them in the checkout), with a BACKEND name of its own so that jr-prune and
jr-reboot-prep see only its Docker objects. `<ID>` is replaced by the job a section is about.
"""

from __future__ import annotations

import io
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobrunner_lib.docker import engine as docker
from tests.integration.test_look_tools import Backend
from tests.integration.test_pull_image import free_port
from tests.support.cli import BIN, ROOT
from tests.support.studies import SIMPLE_PROJECT, SIMPLE_SCRIPTS

pytestmark = pytest.mark.docker

PLAYBOOK = ROOT / "docs" / "playbook.md"
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9-]*>")
# Which job `<ID>` means, by a word of the section's heading; other sections: a succeeded job.
SECTION_JOBS = (("stuck", "analyse"), ("kill", "analyse"), ("internal error", "summary"))
DEFAULT_JOB = "extract"

PROJECT = (
    SIMPLE_PROJECT
    + """\
  summary:
    run: python:v1 analysis/summary.sh
    needs: [model]
    outputs:
      moderately_sensitive:
        summary: output/summary.txt
  analyse:
    run: python:v1 analysis/analyse.sh
    needs: [extract]
    outputs:
      moderately_sensitive:
        results: output/results.csv
"""
)
SCRIPTS = {
    **SIMPLE_SCRIPTS,
    "analysis/extract.sh": "echo extracting 2 patients\n" + SIMPLE_SCRIPTS["analysis/extract.sh"],
    "analysis/summary.sh": "mkdir -p output\necho summarising\ncat output/table.csv > output/summary.txt\n",
    # Hangs, as a stuck job does (bounded, so nothing outlives a crashed test for long).
    "analysis/analyse.sh": "echo loading output/data.csv\necho fitting the model\nexec sleep 900\n",
}


@dataclass
class Command:
    """One `$ ` line of a console block."""

    line: int
    section: str
    text: str
    expected: int = 0


def commands(markdown: str) -> list[Command]:
    """Every command of the ```console blocks, in order, with the exit code the playbook implies."""
    found: list[Command] = []
    section, fence, awaiting_code = "", None, False
    for number, raw in enumerate(markdown.splitlines(), 1):
        line = raw.strip()  # blocks may be indented inside lists
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            awaiting_code = False
            continue
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            continue
        if fence != "console":
            continue
        if line.startswith("$ "):
            text = line[2:].strip()
            awaiting_code = text == "echo $?"
            if awaiting_code:
                assert found, f"line {number}: `echo $?` with no command before it"
            else:
                found.append(Command(number, section, text))
        elif awaiting_code:
            found[-1].expected = int(line.strip())
            awaiting_code = False
    return found


def job_for(section: str) -> str:
    """The action whose job `<ID>` stands for in a section."""
    heading = section.lower()
    return next((action for word, action in SECTION_JOBS if word in heading), DEFAULT_JOB)


PLAYBOOK_COMMANDS = commands(PLAYBOOK.read_text()) if PLAYBOOK.exists() else []


@contextmanager
def scratch_backend(root: Path) -> Iterator[Backend]:
    """A backend like the playbook's: three succeeded jobs run by the service loop (its log in
    service.err.log), one kept after an internal error, one stuck; a registry holding python:v2."""
    state = root / "registry.state"
    registry_env = {"JR_REGISTRY_STATE": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    started = subprocess.run(
        [str(ROOT / "scripts" / "registry"), "start", str(free_port())],
        capture_output=True,
        text=True,
        env=registry_env,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    registry = started.stdout.strip()
    backend = None
    try:
        settings = {
            "BACKEND": f"pb{uuid.uuid4().hex[:8]}",
            "USING_DUMMY_DATA_BACKEND": "true",
            "ALLOW_LOCAL_REPOS": "true",
            "DOCKER_REGISTRY": "jr-demo",
            "ALLOWED_IMAGES": "python,r",
            "HELPER_IMAGE": "jr-busybox:latest",
            "TOOLS_IMAGE": "jr-tools:latest",
            "PULL_REGISTRY": f"{registry}/jr-demo",
            "MAX_WORKERS": "4",
            "POLL_INTERVAL": "1",
            "LOGLEVEL": "INFO",
        }
        backend = Backend(root, PROJECT, SCRIPTS, settings=settings)
        backend.registry_push = lambda variant: push_image(registry, backend.label, variant)  # type: ignore[attr-defined]
        backend.registry_push("1")
        ids = dict(
            zip(
                ["extract", "model", "report"],
                backend.add("extract", "model", "report"),
                strict=True,
            )
        )
        with open(root / "service.err.log", "ab") as log:
            service = subprocess.run(
                [str(ROOT / "service" / "jr-service"), "--until-idle"],
                cwd=root,
                env=backend.tool_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                timeout=300,
            )
        assert service.returncode == 0, (root / "service.err.log").read_text()
        ids["summary"] = backend.start("summary", fault="finalize")[0]
        ids["analyse"] = backend.start("analyse")[0]
        backend.ids = ids  # type: ignore[attr-defined]
        yield backend
    finally:
        try:
            if backend is not None:
                backend.close()
                api = docker.client().api
                for image in api.images(filters={"label": backend.label}):
                    api.remove_image(image["Id"], force=True)
        finally:
            subprocess.run(
                [str(ROOT / "scripts" / "registry"), "stop"],
                capture_output=True,
                env=registry_env,
                timeout=60,
            )


def push_image(registry: str, label: str, variant: str) -> None:
    """Push a python:v2 of our own (labelled, so it is removed afterwards) to the registry."""
    dockerfile = f"FROM jr-demo/python:v1\nLABEL {label} org.jr.variant={variant}\n".encode()
    client = docker.client()
    image, _ = client.images.build(
        fileobj=io.BytesIO(dockerfile), tag=f"{registry}/jr-demo/python:v2", rm=True
    )
    for event in client.api.push(f"{registry}/jr-demo/python", tag="v2", stream=True, decode=True):
        assert "error" not in event, event
    client.api.remove_image(image.id, force=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Iterator[Backend]:
    """The scratch backend the playbook's commands run against, in order."""
    try:
        docker.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Docker here"
        pytest.skip(f"Docker not available: {exc}")
    for image in ("jr-busybox:latest", "jr-demo/python:v1", "jr-demo/r:v1", "jr-tools:latest"):
        if not docker.image_exists(image):
            pytest.skip(f"image {image} missing: run scripts/build-images")
    with scratch_backend(tmp_path_factory.mktemp("playbook")) as backend:
        yield backend


def run_command(backend: Backend, command: Command) -> subprocess.CompletedProcess[str]:
    """Run one playbook command in the backend's directory, with jr's bin/ on PATH and no terminal."""
    job_id = backend.ids[job_for(command.section)]  # type: ignore[attr-defined]
    text = command.text.replace("<ID>", job_id)
    env = backend.tool_env()
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    del env["WORKDIR"]  # the .env says where it is, as in a checkout
    return subprocess.run(
        ["bash", "-c", text],
        cwd=backend.root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_playbook_has_console_commands_and_only_known_placeholders():
    assert PLAYBOOK.exists(), "docs/playbook.md is missing"
    assert len(PLAYBOOK_COMMANDS) >= 20
    for command in PLAYBOOK_COMMANDS:
        assert set(PLACEHOLDER.findall(command.text)) <= {"<ID>"}, (
            f"line {command.line}: {command.text}"
        )


def test_commands_are_parsed_with_their_expected_exit_codes():
    markdown = """# A
```console
$ jr-ls
id
$ jr-kill abcd
$ echo $?
3
```
```text
$ nssm start jr
```
## B
  ```console
  $ jr-ls x
  ```
```console
$ jr-ls <ID>
```
"""
    assert commands(markdown) == [
        Command(3, "A", "jr-ls"),
        Command(5, "A", "jr-kill abcd", 3),
        Command(14, "B", "jr-ls x"),
        Command(17, "B", "jr-ls <ID>"),
    ]


@pytest.mark.parametrize("command", PLAYBOOK_COMMANDS, ids=lambda c: f"L{c.line} {c.text[:40]}")
def test_playbook_command_exits_as_the_playbook_shows(scratch, command):
    result = run_command(scratch, command)
    assert result.returncode == command.expected, (
        f"docs/playbook.md line {command.line} ({command.section}): `{command.text}` exited "
        f"{result.returncode}, the playbook implies {command.expected}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}"
    )
