"""Log lines: job tags stay one line and one word each, whatever the names they carry."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.core.logs import JrFormatter, job_tags, tag_value
from jobrunner_lib.core.models import StatusCode
from tests.support.factories import make_job, make_request

TAG = re.compile(r"(status|project|action|id|req)=\S*")
FORGED = "x\n2026-11-28 11:20:19.328Z run  Completed successfully id=forged"


def log_line(job, message: str = "Completed successfully", **extra) -> str:
    """What the house formatter writes for one INFO record about job."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JrFormatter("run"))
    logger = logging.getLogger("tests.unit.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info(message, extra={"job": job, **extra} if job is not None else extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_ordinary_tags_are_unchanged() -> None:
    job = SimpleNamespace(
        status_code=StatusCode.CREATED,
        project="example-study",
        action="generate_dataset.v2",
        id="iiygt3y34ugln4bx",
        job_request_id="vfb5m64w45frcahn",
    )
    assert job_tags(job) == (
        "status=created project=example-study action=generate_dataset.v2 id=iiygt3y34ugln4bx"
        " req=vfb5m64w45frcahn"
    )


def test_a_newline_or_a_space_in_a_name_cannot_forge_a_line_or_a_tag() -> None:
    job = SimpleNamespace(
        status_code=None, project="p", action=FORGED, id="real", job_request_id=""
    )
    tags = job_tags(job)
    assert tags == (
        "project=p action=x\\n2026-11-28\\x2011:20:19.328Z\\x20run\\x20\\x20Completed"
        "\\x20successfully\\x20id=forged id=real"
    )
    assert tags.split(" ") == ["project=p", tags.split(" ")[1], "id=real"]


def test_a_job_from_an_old_state_store_logs_on_one_line() -> None:
    job = make_job(make_request(), FORGED)  # created before names were checked
    line = log_line(job)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert len(re.findall(r"(?<= )id=", line)) == 1
    assert "\u2028" not in log_line(make_job(make_request(), "a\u2028b"))


def test_a_request_id_tag_is_escaped_too() -> None:
    line = log_line(None, "Created 3 new jobs", req="r1 id=forged\nnext")
    assert line.endswith(" req=r1\\x20id=forged\\nnext\n") and line.count("\n") == 1


def test_tag_values_escape_backslashes_so_escapes_are_unambiguous() -> None:
    assert tag_value("a\\nb") == "a\\\\nb"
    assert tag_value("a\nb") == "a\\nb"
    assert tag_value("dé-名前") == "dé-名前"


@given(
    st.text(),
    st.text(),
    st.text(),
    st.text(),
    st.sampled_from([None, StatusCode.CREATED, StatusCode.EXECUTING]),
)
def test_job_tags_are_one_line_of_exactly_one_word_per_known_value(
    project: str, action: str, job_id: str, req: str, code: StatusCode | None
) -> None:
    job = SimpleNamespace(
        status_code=code, project=project, action=action, id=job_id, job_request_id=req
    )
    tags = job_tags(job)
    assert tags.isprintable(), "no control, format or other unprintable character, no newline"
    expected = [
        key
        for key, value in (
            ("status", code),
            ("project", project),
            ("action", action),
            ("id", job_id),
            ("req", req),
        )
        if value
    ]
    words = tags.split(" ") if tags else []
    assert [TAG.fullmatch(word) and word.partition("=")[0] for word in words] == expected
