"""Output glob matching and routing (docs/outputs.md, docs/reference.md#finalize)."""

from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.core.outputs import (
    PRIVACY_LEVELS,
    claim_outputs,
    declared_high,
    glob_to_regex,
    is_safe_relative_path,
    match_outputs,
    medium_privacy_files,
    neighbours,
    obsolete_outputs,
    unmatched_files,
)
from jobrunner_lib.pipeline import rules as pipeline_rules

HIGH, MODERATE, MINIMAL = PRIVACY_LEVELS
segment = st.text(alphabet="ab.+()$^{}|-_ *", min_size=1, max_size=8)


def matches(pattern: str, path: str) -> bool:
    return glob_to_regex(pattern).match(path) is not None


def test_privacy_levels_are_the_same_as_the_pipeline_rules() -> None:
    assert PRIVACY_LEVELS == pipeline_rules.PRIVACY_LEVELS


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("output/*.csv", "output/a.csv", True),
        ("output/*.csv", "output/.hidden.csv", True),  # leading dots are matched
        ("output/*.csv", "output/.csv", True),
        ("output/*.csv", "output/sub/a.csv", False),  # `*` never crosses `/`
        ("output/*.csv", "output/a.csv.gz", False),  # the whole path must match
        ("output/*.csv", "x/output/a.csv", False),
        ("output/*/t.csv", "output/a/t.csv", True),
        ("output/t_*_*.png", "output/t_1_2.png", True),
        ("output/a.csv", "output/aXcsv", False),  # `.` is literal
        ("out/a+(1).csv", "out/a+(1).csv", True),  # regex-special characters are literal
        ("out/a+(1).csv", "out/aa(1).csv", False),
        ("out/$x^.csv", "out/$x^.csv", True),
        ("output/a.csv", "output/a.csv\n", False),
    ],
)
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


@given(st.lists(segment, min_size=1, max_size=4), st.text(alphabet="ab/.", max_size=6))
def test_star_never_matches_a_slash(parts: list[str], filler: str) -> None:
    pattern = "/".join(parts) + "*"  # at least one star
    path = pattern.replace("*", filler)
    assert matches(pattern, path) is ("/" not in filler)


@given(st.lists(segment, min_size=1, max_size=4))
def test_a_glob_without_stars_matches_only_itself_literally(parts: list[str]) -> None:
    literal = "/".join(part.replace("*", "") or "x" for part in parts)
    assert matches(literal, literal)
    # regex metacharacters are literal, so swapping one for another character breaks the match
    for i, char in enumerate(literal):
        if char in ".+()$^{}|":
            assert not matches(literal, literal[:i] + "Z" + literal[i + 1 :])


def test_glob_to_regex_returns_a_compiled_pattern() -> None:
    assert isinstance(glob_to_regex("a/*.csv"), re.Pattern)


def test_match_outputs_assigns_levels_and_lists_unmatched_patterns() -> None:
    spec = {
        "highly_sensitive": {"data": "output/input.csv"},
        "moderately_sensitive": {"tables": "output/table_*.csv", "missing": "output/none.png"},
    }
    files = ["output/input.csv", "output/table_1.csv", "output/table_2.csv", "other.txt"]
    assert match_outputs(spec, files) == (
        {
            "output/input.csv": "highly_sensitive",
            "output/table_1.csv": "moderately_sensitive",
            "output/table_2.csv": "moderately_sensitive",
        },
        ["output/none.png"],
    )


def test_a_file_matching_several_levels_gets_the_most_sensitive() -> None:
    spec = {
        "moderately_sensitive": {"all": "output/*.csv"},
        "highly_sensitive": {"one": "output/a.csv"},
    }
    matched, _ = match_outputs(spec, ["output/a.csv", "output/b.csv"])
    assert matched == {"output/a.csv": "highly_sensitive", "output/b.csv": "moderately_sensitive"}


def test_a_pattern_is_not_satisfied_by_a_longer_file_name() -> None:
    spec = {"highly_sensitive": {"all": "out/*", "one": "out/a.csv"}}
    matched, unmatched = match_outputs(spec, ["out/a.csv.gz"])
    assert matched == {"out/a.csv.gz": "highly_sensitive"}
    assert unmatched == ["out/a.csv"]


def test_null_levels_in_the_spec_are_skipped() -> None:
    assert match_outputs({"highly_sensitive": None}, ["a.csv"]) == ({}, [])


def test_unmatched_files_lists_files_no_pattern_matched_once_each() -> None:
    files = ["a.csv", "b.csv", "b.csv", "c.log"]
    assert unmatched_files(files, {"a.csv": "highly_sensitive"}) == ["b.csv", "c.log"]


def test_medium_privacy_files_are_moderately_and_minimally_sensitive() -> None:
    outputs = {
        "a.csv": "highly_sensitive",
        "b.csv": "moderately_sensitive",
        "c.csv": "minimally_sensitive",
    }
    assert medium_privacy_files(outputs) == ["b.csv", "c.csv"]


@given(st.dictionaries(st.text(max_size=10), st.sampled_from(PRIVACY_LEVELS)))
def test_medium_privacy_files_never_include_highly_sensitive_outputs(outputs: dict) -> None:
    medium = medium_privacy_files(outputs)
    assert all(outputs[path] != "highly_sensitive" for path in medium)
    assert set(medium) == {p for p, level in outputs.items() if level != "highly_sensitive"}


def reference_match(pattern: str, path: str) -> bool:
    """Independent model of the glob rules: same segments, fnmatch within each segment."""
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, glob)
        for glob, part in zip(pattern_parts, path_parts, strict=True)
    )


globs = st.sampled_from(["o/*.csv", "o/a.csv", "o/*", "*.csv", "o/b.*", "*/*.csv", "o/.*"])
files = st.lists(
    st.sampled_from(["o/a.csv", "o/b.csv", "o/.x.csv", "a.csv", "o/b.txt", "o/s/a.csv"])
)
specs = st.dictionaries(
    st.sampled_from(PRIVACY_LEVELS),
    st.dictionaries(st.text(alphabet="xyz", min_size=1, max_size=2), globs, max_size=3),
)


@given(specs, files)
def test_matching_agrees_with_an_independent_model(spec: dict, paths: list[str]) -> None:
    matched, unmatched = match_outputs(spec, paths)
    for path in paths:
        levels = [
            lvl for lvl, group in spec.items() for g in group.values() if reference_match(g, path)
        ]
        most = max(levels, key=PRIVACY_LEVELS[::-1].index) if levels else None
        assert matched.get(path) == most
    expected = [g for group in spec.values() for g in group.values()
                if not any(reference_match(g, path) for path in paths)]  # fmt: skip
    assert unmatched == expected


@given(specs, files)
def test_routing_never_sends_a_file_whose_final_level_is_highly_sensitive(spec, paths) -> None:
    matched, _ = match_outputs(spec, paths)
    for path in medium_privacy_files(matched):
        levels = [
            lvl for lvl, group in spec.items() for g in group.values() if reference_match(g, path)
        ]
        assert levels[-1] != "highly_sensitive"


def test_obsolete_outputs_are_previous_paths_not_produced_now() -> None:
    previous = {"o/a.csv": "highly_sensitive", "o/b.csv": "moderately_sensitive"}
    current = {"o/a.csv": "highly_sensitive", "o/c.csv": "moderately_sensitive"}
    # o/b.csv was copied to the medium tree too, so it goes from both
    assert obsolete_outputs(previous, current) == {"o/b.csv": True}


def test_obsolete_outputs_compare_paths_case_insensitively() -> None:
    previous = {"Output/Table.CSV": "moderately_sensitive", "output/gone.csv": "highly_sensitive"}
    current = {"output/table.csv": "moderately_sensitive"}
    # highly sensitive: only ever in the high tree, so never deleted from the medium one
    assert obsolete_outputs(previous, current) == {"output/gone.csv": False}


def test_obsolete_outputs_never_name_another_actions_file_or_jr_files() -> None:
    previous = {
        "output/dataset.csv": "moderately_sensitive",  # recorded by an old jr: extract's input
        "output/moved.csv": "moderately_sensitive",  # now produced by action `a`
        "metadata/other.log": "moderately_sensitive",
        "output/gone.csv": "minimally_sensitive",
    }
    ws = neighbours(
        "b",
        {"extract": {"output/dataset.csv": HIGH}, "a": {"Output/Moved.csv": MODERATE}},
        {},
    )
    assert obsolete_outputs(previous, {}, ws) == {"output/gone.csv": True}


@pytest.mark.parametrize(
    "path", ["a.csv", "output/a.csv", "out/.hidden", "a b/c d.txt", "out/x:y.csv", "..a/b..c"]
)
def test_safe_relative_paths(path: str) -> None:
    assert is_safe_relative_path(path)


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "//server/share", "c:/x", "C:x", "x:y.csv", "../x", "a/../../x", "a/..", "a\\b",
     "a\0b", "a//b", "a/", "./a", "a/./b"],
)  # fmt: skip
def test_unsafe_paths_are_refused(path: str) -> None:
    assert not is_safe_relative_path(path)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "c.d"]), min_size=1, max_size=5))
def test_safe_paths_never_leave_the_workspace(segments: list[str]) -> None:
    path = "/".join(segments)
    if is_safe_relative_path(path):
        depth = 0
        for part in path.split("/"):
            depth += -1 if part == ".." else 1
            assert depth > 0


def test_a_highly_sensitive_file_is_never_routed_to_medium_whatever_else_matches_it() -> None:
    for order in (
        ("highly_sensitive", "moderately_sensitive"),
        ("moderately_sensitive", "highly_sensitive"),
    ):
        spec = {order[0]: {"x": "out/*.csv"}, order[1]: {"y": "out/secret.csv"}}
        if order[0] == "highly_sensitive":
            spec = {
                "highly_sensitive": {"y": "out/secret.csv"},
                "moderately_sensitive": {"x": "out/*.csv"},
            }
        matched, _ = match_outputs(spec, ["out/secret.csv", "out/table.csv"])
        assert "out/secret.csv" not in medium_privacy_files(matched)
        assert "out/table.csv" in medium_privacy_files(matched)


# ---- ownership: which files a job may claim ----------------------------------------------------


def test_an_input_matched_by_a_broad_glob_is_not_claimed_and_the_log_says_why() -> None:
    # The leak of issue 16: `tables` needs `extract`, whose highly sensitive dataset.csv sits in
    # its volume; its moderately sensitive glob output/*.csv matches it.
    ws = neighbours("tables", {"extract": {"output/dataset.csv": HIGH}}, {})
    claim = claim_outputs(
        "tables",
        {MODERATE: {"tables": "output/*.csv"}},
        ["output/dataset.csv", "output/table_counts.csv", "analysis/tables.py"],
        {"output/dataset.csv": "extract"},
        ws,
    )
    assert claim.outputs == {"output/table_counts.csv": MODERATE}
    assert claim.unmatched_patterns == []
    assert claim.left_out == {"output/dataset.csv": "it is an input, copied in from action extract"}
    assert claim.notes() == [
        "Not an output: 'output/dataset.csv': it is an input, copied in from action extract"
    ]
    assert medium_privacy_files(claim.outputs) == ["output/table_counts.csv"]


def test_a_pattern_matching_only_files_that_are_not_the_jobs_is_unmatched() -> None:
    claim = claim_outputs(
        "tables",
        {MODERATE: {"t": "output/*.csv"}},
        ["output/dataset.csv"],
        {"output/dataset.csv": "extract"},
        neighbours("tables", {}, {}),
    )
    assert claim.outputs == {} and claim.unmatched_patterns == ["output/*.csv"]


@pytest.mark.parametrize(
    "path",
    ["metadata/victim.log", "metadata/tables.log", "METADATA/x.log", "metadata/manifest.json",
     ".opensafely-timestamp", "metadata/sub/x.csv"],
)  # fmt: skip
def test_jr_files_are_never_outputs_whatever_the_pattern(path: str) -> None:
    spec = {MODERATE: {"a": "*/victim.log", "b": "*/*.log", "c": "*/*.json", "d": "*"}}
    spec[HIGH] = {"e": "*/*/*.csv", "f": ".opensafely-timestamp", "g": path}
    claim = claim_outputs("tables", spec, [path], {}, neighbours("tables", {}, {}))
    assert claim.outputs == {}
    assert path in claim.left_out


def test_another_actions_current_output_is_not_claimed() -> None:
    ws = neighbours("b", {"a": {"output/x.csv": MODERATE}, "b": {"output/x.csv": MODERATE}}, {})
    claim = claim_outputs(
        "b", {MODERATE: {"x": "output/*.csv"}}, ["output/x.csv", "output/y.csv"], {}, ws
    )
    assert claim.outputs == {"output/y.csv": MODERATE}
    assert claim.left_out == {"output/x.csv": "it is an output of action a"}


def test_a_path_another_action_declares_highly_sensitive_stays_high() -> None:
    ws = neighbours(
        "tables",
        {"old": {"output/old.csv": HIGH}},
        {"extract": {HIGH: {"d": "output/data*.csv"}}, "tables": {HIGH: {"t": "output/t.csv"}}},
    )
    claim = claim_outputs(
        "tables",
        {MODERATE: {"t": "output/*.csv"}, MINIMAL: {"n": "notes/*.txt"}},
        ["output/dataset.csv", "output/table.csv", "Output/Data2.CSV", "notes/n.txt"],
        {},
        ws,
    )
    # Own files (nobody owns them yet) but declared highly_sensitive elsewhere: level goes up.
    assert claim.outputs == {
        "output/dataset.csv": HIGH,
        "output/table.csv": MODERATE,
        "notes/n.txt": MINIMAL,
    }
    assert claim.raised == {
        "output/dataset.csv": "action extract declares output/data*.csv highly_sensitive"
    }
    assert sorted(medium_privacy_files(claim.outputs)) == ["notes/n.txt", "output/table.csv"]
    assert declared_high("output/old.csv", {}, ws)
    assert declared_high("output/data9.csv", {}, ws)
    assert declared_high("output/t.csv", {HIGH: {"t": "output/t.csv"}}, ws)
    assert not declared_high("output/t.csv", {}, ws)  # the job's own action: its current spec


paths_st = st.lists(
    st.builds(
        lambda d, n: f"{d}/{n}",
        st.sampled_from(["output", "metadata", "Output", "out"]),
        st.sampled_from(["a.csv", "b.csv", "victim.log", "A.CSV", "x.txt"]),
    ),
    max_size=8,
    unique=True,
)
pattern_st = st.builds(
    lambda d, n: f"{d}/{n}",
    st.sampled_from(["output", "*", "metadata", "out*"]),
    st.sampled_from(["*.csv", "a.csv", "*", "victim.log", "*.*"]),
)
level_st = st.sampled_from(PRIVACY_LEVELS)
specs_st = st.dictionaries(
    level_st,
    st.dictionaries(st.text("abc", min_size=1, max_size=2), pattern_st, max_size=3),
    max_size=3,
)


@given(
    files=paths_st,
    inputs=paths_st,
    others=st.dictionaries(st.sampled_from(["x", "y", "me"]), st.dictionaries(st.sampled_from(
        ["output/a.csv", "Output/b.csv", "out/x.txt"]), level_st, max_size=3), max_size=3),
    declared=st.dictionaries(st.sampled_from(["x", "y", "me"]), specs_st, max_size=3),
    spec=specs_st,
)  # fmt: skip
def test_a_claim_never_takes_what_is_not_the_jobs_and_never_lowers_privacy(
    files, inputs, others, declared, spec
) -> None:
    ws = neighbours("me", others, declared)
    claim = claim_outputs("me", spec, files + inputs, {p: "x" for p in inputs}, ws)
    folded_inputs = {p.casefold() for p in inputs}
    for path, level in claim.outputs.items():
        assert not path.casefold().startswith("metadata/")
        assert path.casefold() not in folded_inputs
        owner = ws.owner(path)
        assert owner is None or owner == "me"
        if declared_high(path, spec, ws):
            assert level == HIGH
    for path in medium_privacy_files(claim.outputs):
        assert not declared_high(path, spec, ws)
    # left out paths and claimed paths never overlap; every claimed path matched a pattern
    assert not set(claim.left_out) & set(claim.outputs)
    assert set(claim.outputs) <= set(match_outputs(spec, files + inputs)[0])
