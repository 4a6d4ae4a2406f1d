"""Output formats: tsv and jsonl carry every column exactly, whatever the values hold."""

from __future__ import annotations

import io
import json

from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.cli.formats import human_age, parse_since, read_tsv, write_rows

COLUMNS = ["id", "action", "status_message", "workspace"]
cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(st.lists(st.fixed_dictionaries({c: cell for c in COLUMNS}), max_size=8))
def test_tsv_and_jsonl_round_trip_every_column(rows):
    tsv, jsonl = io.StringIO(), io.StringIO()
    write_rows(rows, COLUMNS, "tsv", tsv)
    write_rows(rows, COLUMNS, "jsonl", jsonl)
    assert read_tsv(tsv.getvalue()) == rows
    assert [json.loads(line) for line in jsonl.getvalue().splitlines()] == rows
    assert tsv.getvalue().count("\n") == len(rows) + 1


def test_ids_format_prints_one_id_per_line():
    out = io.StringIO()
    write_rows([{"id": "a"}, {"id": "b"}], ["id"], "ids", out)
    assert out.getvalue() == "a\nb\n"


def test_table_keeps_numeric_looking_text_verbatim():
    out = io.StringIO()
    write_rows([{"id": "007", "n": "1e5"}], ["id", "n"], "table", out)
    assert "007" in out.getvalue() and "1e5" in out.getvalue()


def test_human_age_and_since():
    assert [human_age(s) for s in (5, 125, 7200, 200000)] == ["5s", "2m", "2h", "2d"]
    assert parse_since("2h", now=10_000) == 10_000 - 7200
    assert parse_since("2021-11-03") == 1635897600
