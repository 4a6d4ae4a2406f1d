"""Malformed input: whatever a study's project.yaml or the jobs website sends, jr answers clearly.

`load_pipeline` may only raise ProjectValidationError, whose every error is one readable line;
jr-add-job --dry-run turns the same into exit 1 without a traceback; the jobs website client only
ever returns per-request problems or raises JobServerBadResponse, again with readable messages.
Generated inputs: 1 000 of each under JR_SOAK, fewer otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jobrunner_lib.pipeline.project import Pipeline, ProjectValidationError, load_pipeline
from jobrunner_lib.website.client import JobServerBadResponse, JobServerClient
from jobrunner_lib.website.wire import parse_job_request
from tests.reliability.conftest import SOAK
from tests.support.cli import run as run_tool
from tests.support.fake_jobserver import FakeJobServer
from tests.support.studies import git, make_study

TOKEN = "secret-token"
# What a Python object, a traceback or an unescaped value looks like when it leaks into a message.
LEAKS = ("<object", " object at 0x", "Traceback", "<class ", "<function ", "<built-in")


def assert_readable(line: Any, limit: int = 1000) -> None:
    """One non-empty line of text, no Python object reprs, no secret, not huge."""
    assert isinstance(line, str) and line.strip(), repr(line)
    assert not any(c in line for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), repr(line)
    assert not any(leak in line for leak in LEAKS), line
    assert TOKEN not in line, line
    assert len(line) <= limit, f"{len(line)} characters: {line[:200]}..."


# ---- project.yaml ------------------------------------------------------------------------------

VALID = {
    "version": "3.0",
    "expectations": {"population_size": 10},
    "actions": {
        "extract": {
            "run": "python:v1 analysis/extract.py",
            "outputs": {"highly_sensitive": {"data": "output/data.csv"}},
        },
        "model": {
            "run": "r:v1 analysis/model.R --flag",
            "needs": ["extract"],
            "config": {"alpha": 0.05},
            "outputs": {"moderately_sensitive": {"table": "output/table_*.csv"}},
        },
    },
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["python:v1", "run_all", "output/*.csv", "../x", "/abs", "a\nb", "x" * 300]),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Where in a valid project a wrong value goes.
PATHS = [
    (),
    ("version",),
    ("expectations",),
    ("expectations", "population_size"),
    ("actions",),
    ("actions", "extract"),
    ("actions", "extract", "run"),
    ("actions", "extract", "outputs"),
    ("actions", "extract", "outputs", "highly_sensitive"),
    ("actions", "extract", "outputs", "highly_sensitive", "data"),
    ("actions", "model", "needs"),
    ("actions", "model", "config"),
    ("actions", "model", "dummy_data_file"),
    ("actions", "model", "outputs", "moderately_sensitive", "table"),
    ("actions", "model", "unexpected"),
    ("unexpected",),
]


def with_value(path: tuple, value: Any) -> dict | Any:
    """VALID with the value at path replaced (or added)."""
    if not path:
        return value
    data = json.loads(json.dumps(VALID))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def without(path: tuple) -> dict:
    """VALID without the key at path."""
    data = json.loads(json.dumps(VALID))
    target = data
    for key in path[:-1]:
        target = target[key]
    target.pop(path[-1], None)
    return data


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def laughs(levels: int, where: str) -> str:
    """A "billion laughs": each anchor lists the previous one nine times."""
    lines = ["version: '3.0'", "expectations: {population_size: 10}", "l0: &l0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    top = f"*l{levels}"
    action = {
        "config": f"    run: python:v1 a.py\n    config: {{x: {top}}}\n",
        "needs": f"    run: python:v1 a.py\n    needs: {top}\n",
        "run": f"    run: {top}\n",
    }[where]
    outputs = "    outputs: {highly_sensitive: {a: o/a.csv}}\n"
    return "\n".join(lines) + "\nactions:\n  a:\n" + action + outputs


YAML_TRICKS = [
    "version: &v [*v]\nactions: {}\n",
    "&t {version: '3.0', actions: *t}\n",
    "version: '3.0'\nactions:\n  a: &a {run: python:v1 a.py, needs: [*a], outputs: {x: 1}}\n",
    "version: '3.0'\nexpectations: {population_size: " + "9" * 5000 + "}\nactions: {}\n",
    "version: !!python/object:os.system ls\n",
    "version: !!binary aGk=\nactions: {}\n",
    "version: '3.0'\nactions: !!set {a, b}\n",
    "version: '3.0'\nactions: !!omap [{a: 1}, {b: 2}]\n",
    "version: '3.0'\n---\nversion: '3.0'\n",
    "%YAML 1.1\n---\nversion: 3\nactions: {on: {run: python:v1 a, outputs: {highly_sensitive: {a: a.csv}}}}\n",
    "version: '3.0'\nactions:\n  ? [a, b]\n  : {run: python:v1 a.py}\n",
    "version: '3.0'\nactions:\n  ? {a: b}\n  : {run: python:v1 a.py}\n",
    "version: '3.0'\nbase: &b {run: python:v1 a.py}\nactions:\n  a: {<<: *b, <<: [1, 2]}\n",
    "version: '3.0'\nactions:\n  a: {run: 'python:v1 \"unbalanced', outputs: {highly_sensitive: {a: a.csv}}}\n",
    "version: '3.0'\nexpectations: {population_size: 10}\nactions:\n  a: {run: python:v1 a, outputs: {highly_sensitive: {a: a.csv}}}\n  a: {run: python:v1 b}\n",
    "\ufeffversion: '3.0'\nactions: {}\n",
    "version: '3.0'\nactions: {\"a\\u2028b\\x1b[31m\": {run: python:v1 a}}\n",
    "\x00\x01\x02",
    "",
    "   ",
    "- just\n- a\n- list\n",
    "version: .nan\nactions: {}\n",
    "version: 1e999\nactions: {}\n",
]

project_texts = st.one_of(
    st.binary(max_size=500),
    st.text(max_size=500),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(min_value=1, max_value=300).map(
        lambda n: "".join(f"{'  ' * i}k{i}:\n" for i in range(n)) + "  " * n + "v"
    ),
    st.tuples(st.sampled_from(PATHS[1:]), st.integers(10_000, 300_000)).map(
        lambda pv: dump(with_value(pv[0], "x" * pv[1]))
    ),
    st.tuples(st.sampled_from(PATHS), values).map(lambda pv: dump(with_value(*pv))),
    st.sampled_from(PATHS[1:]).map(lambda path: dump(without(path))),
    st.builds(
        lambda lv, where: laughs(lv, where),
        st.integers(1, 9),
        st.sampled_from(["config", "needs", "run"]),
    ),
    st.sampled_from(YAML_TRICKS),
    # Valid text cut anywhere, or with a byte flipped.
    st.tuples(st.integers(0, len(dump(VALID))), st.binary(min_size=1, max_size=3)).map(
        lambda cut: dump(VALID).encode()[: cut[0]] + cut[1] + dump(VALID).encode()[cut[0] :]
    ),
)


def check_project(text: str | bytes) -> Pipeline | None:
    """load_pipeline's answer, checked: a Pipeline, or only a readable ProjectValidationError."""
    started = time.monotonic()
    try:
        return load_pipeline(text)
    except ProjectValidationError as exc:
        assert exc.errors, "an error without a problem listed"
        for line in exc.errors:
            assert_readable(line)
        return None
    finally:
        # Generous: the point is that no input makes parsing hang (billion laughs, deep nesting).
        assert time.monotonic() - started < 30


@settings(
    max_examples=1000 if SOAK else 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=project_texts)
@example(text=laughs(9, "config"))
@example(text=dump(VALID))
def test_any_project_yaml_gives_a_pipeline_or_readable_errors(text: str | bytes) -> None:
    check_project(text)


def test_the_valid_base_project_is_valid() -> None:
    assert check_project(dump(VALID)) is not None


@pytest.mark.parametrize("text", YAML_TRICKS)
def test_yaml_tricks(text: str) -> None:
    check_project(text)


MALFORMED_FOR_THE_TOOL = {
    "random bytes": b"\xff\xfe\x00\x9c\x01garbage\x80",
    "billion laughs": laughs(9, "config"),
    "deep nesting": "[" * 5000,
    "huge value": dump(
        with_value(
            ("actions", "extract", "outputs", "highly_sensitive", "data"), "o/" + "x" * 200_000
        )
    ),
    "wrong types": dump(with_value(("actions", "model", "needs"), {"extract": [1, None]})),
    "needs cycle": dump(with_value(("actions", "extract", "needs"), ["model"])),
    "control characters": dump(with_value(("actions", "model", "needs"), ["ex\ntract\x1b[2J"])),
}


@pytest.mark.parametrize("name", list(MALFORMED_FOR_THE_TOOL))
def test_jr_add_job_dry_run_rejects_malformed_projects_cleanly(name: str, tmp_path: Path) -> None:
    content = MALFORMED_FOR_THE_TOOL[name]
    repo, _ = make_study(tmp_path / "study", "version: '3.0'\nactions: {}\n", {})
    (repo / "project.yaml").write_bytes(content if isinstance(content, bytes) else content.encode())
    git(repo, "commit", "-q", "-am", name)
    result = run_tool("jr-add-job", "--dry-run", str(repo), workdir=tmp_path / "workdir")
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and any("project.yaml is invalid" in line for line in lines), result.stderr
    for line in lines:
        assert_readable(line)


# ---- the jobs website --------------------------------------------------------------------------


def good_request(i: int = 0) -> dict:
    """A well-formed job request as the website sends it."""
    return {
        "identifier": f"req{i:012d}",
        "sha": "a" * 40,
        "requested_actions": ["run_all"],
        "cancelled_actions": [],
        "force_run_dependencies": False,
        "backend": "test",
        "created_by": "alice",
        "created_at": "2021-06-01T12:00:00Z",
        "workspace": {"name": "ws", "repo": "https://github.com/opensafely/x", "branch": "main"},
        "database_name": "full",
    }


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.just(TOKEN),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = list(good_request()) + ["workspace.name", "workspace.repo", "workspace.branch"]


@st.composite
def broken_requests(draw) -> Any:
    """A job request with some fields missing or of the wrong type, or not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    request = good_request(draw(st.integers(0, 10**6)))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        target, key = request, field
        if "." in field:
            target, key = request.get("workspace"), field.split(".")[1]
            if not isinstance(target, dict):
                continue
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return request


HTML_PAGES = [
    b"<!DOCTYPE html><html><body><h1>Server Error (500)</h1></body></html>",
    b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    b"Service Unavailable",
    b"",
]


@st.composite
def bodies(draw) -> bytes:
    """A 200 response body for `GET job-requests/`: JSON of any shape, or not JSON at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return draw(st.sampled_from(HTML_PAGES))
    if kind == 2:
        depth = draw(st.integers(100, 100_000))
        return b"[" * depth + b"]" * depth
    if kind == 3:
        return json.dumps(draw(json_values)).encode()
    if kind == 4:  # a huge list: the same request many times, and broken ones
        n = draw(st.integers(1_000, 20_000))
        return json.dumps({"results": [good_request(i) for i in range(n)] + [1, None]}).encode()
    body: dict[str, Any] = {
        "count": draw(json_values),
        "results": draw(st.lists(broken_requests(), max_size=6)),
    }
    if draw(st.booleans()):
        body["results"] = draw(json_values)  # not a list, or a list of anything
    if draw(st.booleans()):
        body["next"] = draw(
            json_values
            | st.sampled_from(
                [
                    "http://evil.example/steal?offset=100",
                    "?offset=abc",
                    "?offset=0",
                    "?offset=-5",
                    "?offset=1e3",
                    "?offset=99999999999999999999",
                ]
            )
        )
    if draw(st.booleans()):
        body.pop("results")
    text = json.dumps(body).encode()
    if kind == 9:  # not UTF-8 inside otherwise fine JSON
        text = text.replace(b'"', b'"\xff', 1)
    return text


class CannedClient(JobServerClient):
    """The real client with the network swapped for canned responses (first page, then empty)."""

    def __init__(self, body: bytes, status: int = 200):
        super().__init__("http://127.0.0.1:9/api/v2/", TOKEN, "test")
        self.body, self.status, self.pages = body, status, 0

    def _request(self, method: str, url: str, deadline: float, **kwargs: Any) -> Any:
        self.pages += 1
        response = requests.Response()
        response.status_code = self.status
        response._content = self.body if self.pages == 1 else b'{"results": []}'
        response.url = url
        response.headers["Content-Type"] = "application/json"
        return response


def check_answer(client: JobServerClient) -> tuple[list, list] | None:
    """fetch_job_requests, checked: parsed requests and readable problems, or JobServerBadResponse."""
    try:
        found, problems = client.fetch_job_requests()
    except JobServerBadResponse as exc:
        assert_readable(str(exc))
        return None
    for problem in problems:
        assert_readable(problem)
    for request in found:
        assert isinstance(request["id"], str) and request["id"]
        for key in ("repo_url", "commit", "branch", "workspace", "database_name"):
            assert isinstance(request[key], str), (key, request[key])
        for key in ("requested_actions", "cancelled_actions"):
            assert all(isinstance(a, str) for a in request[key]), (key, request[key])
        assert isinstance(request["force_run_dependencies"], bool)
    return found, problems


@settings(max_examples=1000 if SOAK else 300, deadline=None)
@given(body=bodies())
@example(body=b"[" * 100_000 + b"]" * 100_000)
@example(
    body=json.dumps({"results": [{"identifier": "a\nb 2021-01-01 forged", "sha": 1}]}).encode()
)
@example(body=json.dumps({"results": [{"identifier": "x" * 100_000}]}).encode())
@example(body=b"<html>" + TOKEN.encode() + b"</html>")
def test_any_response_body_gives_requests_problems_or_a_bad_response(body: bytes) -> None:
    with CannedClient(body) as client:
        check_answer(client)


@settings(max_examples=1000 if SOAK else 300, deadline=None)
@given(obj=broken_requests())
def test_parse_job_request_accepts_or_says_why(obj: Any) -> None:
    try:
        parsed = parse_job_request(obj)
    except ValueError as exc:
        assert_readable(str(exc))
    else:
        assert parsed["id"] and isinstance(parsed["workspace"], str)


@settings(
    max_examples=100 if SOAK else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=bodies())
def test_malformed_bodies_over_real_http(fake_jobserver: FakeJobServer, body: bytes) -> None:
    # The fake website serves the body as-is (its "garbage" fault), over a real connection.
    fake_jobserver.garbage_body = body
    fake_jobserver.set_fault("garbage")
    with JobServerClient(fake_jobserver.url, TOKEN, "test", total_limit=20) as client:
        check_answer(client)


def test_broken_stored_requests_are_problems_over_real_http(fake_jobserver: FakeJobServer) -> None:
    good = fake_jobserver.add_request()
    broken = [
        fake_jobserver.add_request(workspace="not an object"),
        fake_jobserver.add_request(requested_actions="run_all"),
        fake_jobserver.add_request(sha=None),
        fake_jobserver.add_request(identifier="evil\nline" + "x" * 500),
    ]
    with JobServerClient(fake_jobserver.url, TOKEN, "test") as client:
        answer = check_answer(client)
    assert answer is not None
    found, problems = answer
    assert [r["id"] for r in found if not r.get("problem")] == [good["identifier"]]
    # Those with a usable identifier are answered (an __error__ job saying why); the others,
    # which nothing could answer, are reported.
    answered = {r["id"]: r["problem"] for r in found if r.get("problem")}
    assert set(answered) == {b["identifier"] for b in broken[:3]}
    for problem in answered.values():
        assert_readable(problem)
    assert len(problems) == 1
