"""IDs: deterministic job ids, and resolving fragments typed or piped by an operator."""

from __future__ import annotations

import base64
import hashlib
import io
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.core import ids
from jobrunner_lib.core.errors import AmbiguousError, NoMatchError, UsageError
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.factories import make_job, make_request


def test_job_id_is_sha1_of_request_and_action_in_base32():
    digest = hashlib.sha1(b"k3v7q2m4x6z8b2c4\nextract").digest()[:10]
    assert ids.job_id("k3v7q2m4x6z8b2c4", "extract") == base64.b32encode(digest).decode().lower()
    assert ids.job_id("k3v7q2m4x6z8b2c4", "extract") == ids.job_id("k3v7q2m4x6z8b2c4", "extract")
    assert ids.ID_RE.match(ids.job_id("r", "a"))


def test_request_ids_look_like_the_websites():
    minted = {ids.new_request_id() for _ in range(100)}
    assert len(minted) == 100 and all(ids.ID_RE.match(i) for i in minted)


@pytest.fixture
def store(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    req = make_request(id="aaaaqqqqzzzz2222", actions=["extract", "model"])
    extract, model = make_job(req, "extract"), make_job(req, "model")
    other = make_request(id="bbbbqqqqyyyy3333")
    report = make_job(other, "report")
    db_queries.insert_request(conn, req, [extract, model])
    db_queries.insert_request(conn, other, [report])
    return conn, req, extract, model, report


def test_a_unique_fragment_resolves_to_its_job(store):
    conn, _req, extract, _model, _report = store
    assert [
        j.id
        for j in ids.resolve(partial(db_queries.search_ids, conn), [extract.id[5:9].upper()], None)
    ] == [extract.id]


def test_a_request_id_expands_to_all_its_jobs(store):
    conn, req, extract, model, _ = store
    assert {j.id for j in ids.resolve(partial(db_queries.search_ids, conn), [req.id], None)} == {
        extract.id,
        model.id,
    }
    assert {j.id for j in ids.resolve(partial(db_queries.search_ids, conn), ["zzzz22"], None)} == {
        extract.id,
        model.id,
    }


def test_an_ambiguous_fragment_without_a_picker_lists_candidates(store):
    conn, *_ = store
    with pytest.raises(AmbiguousError) as info:
        ids.resolve(partial(db_queries.search_ids, conn), ["qqqq"], None)
    assert "aaaaqqqqzzzz2222" in str(info.value) and "bbbbqqqqyyyy3333" in str(info.value)
    assert info.value.exit_code == 4


def test_an_ambiguous_fragment_with_a_picker_takes_its_choice(store):
    conn, _req, _e, _m, report = store
    seen = []

    def choose(fragment, targets):
        seen.append((fragment, [t.id for t in targets]))
        return next(t for t in targets if t.id == "bbbbqqqqyyyy3333")

    assert [j.id for j in ids.resolve(partial(db_queries.search_ids, conn), ["qqqq"], choose)] == [
        report.id
    ]
    assert seen and len(seen[0][1]) == 2


def test_nothing_matching_is_exit_3(store):
    conn, *_ = store
    with pytest.raises(NoMatchError, match="No jobs found matching 'xyzxyz'") as info:
        ids.resolve(partial(db_queries.search_ids, conn), ["xyzxyz"], None)
    assert info.value.exit_code == 3


def test_like_wildcards_are_literal(store):
    conn, *_ = store
    with pytest.raises(NoMatchError):
        ids.resolve(partial(db_queries.search_ids, conn), ["%%%"], None)
    with pytest.raises(NoMatchError):
        ids.resolve(partial(db_queries.search_ids, conn), ["___"], None)


def test_short_fragments_are_a_usage_error():
    with pytest.raises(UsageError, match="at least 3"):
        ids.expand_args(["ab"], None)


def test_dash_reads_first_fields_from_stdin_skipping_header_and_blanks():
    text = "id\trequest\taction\nabcdabcdabcdabcd\tr\tx\n\n# note\nefghefghefghefgh\n"
    assert ids.expand_args(["-", "zzz"], io.StringIO(text)) == [
        "abcdabcdabcdabcd",
        "efghefghefghefgh",
        "zzz",
    ]


def test_piped_ids_resolve_to_those_jobs(store):
    conn, _req, extract, _model, report = store
    fragments = ids.expand_args(["-"], io.StringIO(f"{extract.id}\n{report.id}\n"))
    assert [j.id for j in ids.resolve(partial(db_queries.search_ids, conn), fragments, None)] == [
        extract.id,
        report.id,
    ]


@given(st.data())
def test_any_substring_of_an_id_finds_that_job(data):
    action = data.draw(st.text(min_size=1, max_size=10))
    req = make_request(id=ids.new_request_id())
    job = make_job(req, action)
    start = data.draw(st.integers(0, 13))
    end = data.draw(st.integers(start + 3, 16))
    targets = ids.targets_for(job.id[start:end], [job])
    assert any(job in t.jobs for t in targets)


def test_the_picker_matches_id_fragments_exactly_not_fuzzily(store, monkeypatch):
    import iterfzf

    from jobrunner_lib.cli.common import Context
    from jobrunner_lib.cli.ls import Ls

    conn, req, extract, model, report = store
    seen = {}

    def fake_iterfzf(lines, **kwargs):
        seen.update(kwargs, lines=list(lines))
        return seen["lines"][0]

    monkeypatch.setattr(iterfzf, "iterfzf", fake_iterfzf)
    ctx = Context(
        Ls(), Ls().build_parser().parse_args([]), None, io.StringIO(), io.StringIO(), io.StringIO()
    )
    targets = ids.targets_for("qqqq", [extract, model, report])
    chosen = ctx.pick("qqqq", targets)
    assert seen["exact"] is True
    assert chosen.id == seen["lines"][0].split()[0]
