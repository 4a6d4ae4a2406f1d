"""project.yaml parsing and validation: one test per rule of docs/pipeline.md, plus jr's own."""

from __future__ import annotations

import json
import shlex
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner_lib.pipeline import document as pipeline_yaml
from jobrunner_lib.pipeline.commands import split_command
from jobrunner_lib.pipeline.names import IMAGE_NAME_RULE, action_name_problem, image_name_problem
from jobrunner_lib.pipeline.project import (
    Pipeline,
    ProjectValidationError,
    find_cycle,
    load_pipeline,
    topological_order,
    validate_output_path,
)
from jobrunner_lib.pipeline.rules import one_line

DROP = object()  # marks a key to leave out of an action


def act(name: str, **fields: Any) -> dict:
    """A valid action whose run command and output path are unique to `name`."""
    body = {
        "run": f"python:v2 analysis/{name}.py",
        "outputs": {"highly_sensitive": {"data": f"output/{name}.csv"}},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not DROP}


def project(*actions: tuple[str, dict], version: Any = 5, **top: Any) -> str:
    """YAML text for a project with the given (name, body) actions."""
    data = {"version": version, **top, "actions": dict(actions)}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors(text: str | bytes, filename: str = "project.yaml") -> list[str]:
    """The error lines for an invalid project (failing the test if it is accepted)."""
    with pytest.raises(ProjectValidationError) as info:
        load_pipeline(text, filename)
    assert str(info.value) == f"Invalid project: {filename}\n" + "\n".join(info.value.errors)
    assert info.value.errors, "a rejection must say why"
    return info.value.errors


def rejected(text: str | bytes, gist: str) -> list[str]:
    """Assert some error line carries the official gist; return all lines."""
    found = errors(text)
    assert any(gist in line for line in found), found
    return found


# --- §0: inputs that crash the official parser are clean errors ------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_document_is_rejected_cleanly(text: str) -> None:
    rejected(text, "the file is empty; it must be a mapping with `version` and `actions`")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_rejected_cleanly(text: str) -> None:
    rejected(text, "it must be a mapping with `version` and `actions` keys")


def test_non_string_needs_entry_is_rejected_cleanly() -> None:
    text = project(("2017", act("a")), ("b", act("b", needs=[2017])))
    found = rejected(text, "`needs` section for action b must be a list of action names")
    assert "2017 is not a name" in found[0]


def test_unbalanced_quote_in_run_is_rejected_cleanly() -> None:
    text = project(("a", act("a", run="python:v2 'unclosed")))
    rejected(text, "`run` section for action a is not a valid command: No closing quotation")


@pytest.mark.parametrize("version", [6, "7.5", ".inf"])
def test_version_above_5_is_rejected_cleanly(version: Any) -> None:
    text = f"version: {version}\nactions: {{}}\n"
    found = rejected(text, "`version` must be a number between 1 and 5")
    assert "The latest version is v5, but got v" in found[0]


def test_yaml_error_without_context_mark_is_rejected_with_quote_hint() -> None:
    text = "version: 5\nactions:\n  a:\n    run: python: a.py\n"
    found = rejected(text, "mapping values are not allowed here (line 4, column 16)")
    assert "a value containing ': ' must be quoted" in found[0]


@pytest.mark.parametrize("run", ["   ", "\t\n"])
def test_whitespace_only_run_is_rejected_as_empty(run: str) -> None:
    rejected(project(("a", act("a", run=run))), "run must have a value, a has an empty run key")


@pytest.mark.parametrize("key", ["action_id", "cls"])
def test_keys_that_clash_with_upstream_arguments_are_unexpected_parameters(key: str) -> None:
    rejected(project(("a", act("a", **{key: 1}))), f"Unexpected parameters ({key}) in action a")


def test_population_size_infinity_is_not_a_number() -> None:
    text = "version: 3\nexpectations: {population_size: .inf}\nactions: {}\n"
    rejected(text, "Project expectations population size must be a number")


def test_deeply_nested_document_is_rejected_cleanly() -> None:
    rejected("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply")


# --- §1: the YAML layer -------------------------------------------------------------------------


def test_yaml_syntax_error_carries_line_and_column() -> None:
    text = "version: 5\nactions:\n  a:\n    run: python:v2 a.py\n   outputs: x\n"
    found = rejected(text, "while parsing a block mapping (line 3, column 3)")
    assert "expected <block end>, but found '<block mapping start>' (line 5, column 4)" in found[0]


def test_duplicate_key_at_top_level_is_rejected() -> None:
    text = "version: 5\nversion: 4\nactions: {}\n"
    found = rejected(text, 'found duplicate key "version" with value "4" (original value: "5")')
    assert found[0].endswith("(line 2)")


def test_duplicate_action_name_is_rejected() -> None:
    text = dedent("""
        version: 5
        actions:
          a: {run: python:v2 a.py, outputs: {highly_sensitive: {x: a.csv}}}
          a: {run: python:v2 b.py, outputs: {highly_sensitive: {x: b.csv}}}
    """)
    found = rejected(text, 'found duplicate key "a"')
    assert "in `actions` (line 4)" in found[0]


def test_duplicate_key_inside_outputs_is_rejected() -> None:
    text = dedent("""
        version: 5
        actions:
          extract:
            run: python:v2 a.py
            outputs:
              highly_sensitive:
                cohort: output/a.csv
                cohort: output/b.csv
    """)
    assert errors(text) == [
        "project.yaml: action 'extract': found duplicate key \"cohort\" with value"
        ' "output/b.csv" (original value: "output/a.csv") in `outputs.highly_sensitive` (line 8)'
    ]


def test_duplicate_key_inside_config_is_rejected() -> None:
    text = dedent("""
        version: 5
        actions:
          a:
            run: python:v2 a.py
            config: {p: 1, p: 2}
            outputs: {highly_sensitive: {x: a.csv}}
    """)
    rejected(text, 'action \'a\': found duplicate key "p" with value "2" (original value: "1")')


def test_every_duplicate_key_is_reported_along_with_other_problems() -> None:
    text = dedent("""
        version: 5
        version: 5
        actions:
          a:
            run: python:v2 a.py
            run: python:v2 b.py
            outputs: {highly_sensitive: {x: a.csv}}
            needs: [nope]
    """)
    found = errors(text)
    assert [line for line in found if "duplicate key" in line] == [
        'project.yaml: found duplicate key "version" with value "5" (original value: "5") (line 2)',
        'project.yaml: action \'a\': found duplicate key "run" with value "python:v2 b.py"'
        ' (original value: "python:v2 a.py") (line 6)',
    ]
    assert any("references an unknown action in its `needs` list: nope" in line for line in found)


def test_anchors_aliases_and_merge_keys_are_resolved() -> None:
    text = dedent("""
        version: 5
        actions:
          base: &base
            run: python:v2 a.py
            outputs: &out {highly_sensitive: {x: output/a.csv}}
            config: &cfg {alpha: 1}
          derived:
            <<: *base
            run: python:v2 b.py
            outputs: {highly_sensitive: {x: output/b.csv}}
          listed:
            <<: [{run: python:v2 c.py}, {needs: [base]}]
            config: *cfg
            outputs: {moderately_sensitive: {t: output/c.csv}}
    """)
    actions = load_pipeline(text).actions
    assert actions["derived"].run == "python:v2 b.py"  # explicit keys win over merged ones
    assert actions["derived"].config == {"alpha": 1}
    assert actions["listed"].needs == ("base",)
    assert actions["listed"].config is actions["base"].config


def test_merge_key_must_name_a_mapping() -> None:
    text = "version: 5\nactions:\n  a:\n    <<: 5\n    run: python:v2 a.py\n"
    rejected(text, "expected a mapping or list of mappings for merging")


def test_undefined_alias_is_rejected_with_line() -> None:
    found = rejected("version: 5\nactions:\n  a: *nope\n", "found undefined alias 'nope'")
    assert found[0].endswith("(line 3)")


def test_redefined_anchor_refers_to_the_latest_definition() -> None:
    text = dedent("""
        version: 5
        actions:
          a: {run: &r python:v2 a.py, outputs: {highly_sensitive: {x: a.csv}}}
          b: {run: &r python:v2 b.py, outputs: {highly_sensitive: {x: b.csv}}}
          c: {run: *r, outputs: {highly_sensitive: {x: c.csv}}}
    """)
    rejected(text, "Action c has the same 'run' command as other actions: b")


def test_more_than_one_document_is_rejected() -> None:
    rejected("version: 5\nactions: {}\n---\nversion: 4\n", "expected a single document")


def test_unknown_tag_is_rejected() -> None:
    text = project(("a", act("a"))).replace("run: python", "run: !custom python")
    rejected(text, "could not determine a constructor for the tag '!custom'")


def test_yaml_1_2_reads_yes_and_on_as_text_like_the_official_parser() -> None:
    text = project(("on", act("on")), ("yes", act("yes", needs=["on"])))
    text = text.replace("'on'", "on").replace("'yes'", "yes")  # unquoted, as a user writes them
    assert load_pipeline(text).actions["yes"].needs == ("on",)


def test_yaml_1_1_directive_reads_on_as_a_boolean() -> None:
    text = "%YAML 1.1\n---\nversion: 5\nactions:\n  b:\n    run: python:v2 b.py\n"
    text += "    needs: [on]\n    outputs: {highly_sensitive: {x: b.csv}}\n"
    rejected(text, "True is not a name")


@pytest.mark.parametrize(
    ("literal", "value"),
    [("04", 4.0), ("0x4", 4.0), ("4e0", 4.0), ("'4'", 4.0), ("4_0e-1", 4.0), ("true", 1.0)],
)
def test_version_numbers_are_read_as_yaml_1_2_numbers(literal: str, value: float) -> None:
    assert load_pipeline(f"version: {literal}\nactions: {{}}\n").version == value


def test_explicit_core_tags_are_honoured() -> None:
    text = project(("a", act("a"))).replace("run: python", "run: !!str python")
    text = text.replace("version: 5", "version: !!float '5'")
    assert load_pipeline(text).version == 5.0


def test_folded_multi_line_run_is_split_like_a_shell_command() -> None:
    text = "version: 5\nactions:\n  a:\n    run: >\n      python:v2\n      a.py --x 'b c'\n"
    text += "    outputs: {highly_sensitive: {x: a.csv}}\n"
    assert load_pipeline(text).actions["a"].args == ("a.py", "--x", "b c")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_bytes_input_is_decoded_by_its_byte_order_mark(encoding: str) -> None:
    text = project(("dé", act("dé")))
    assert load_pipeline(text.encode(encoding)).all_actions() == ["dé"]


def test_invalid_utf8_bytes_are_rejected() -> None:
    rejected(b"version: 5\nactions: {}\n# \xff\n", "invalid start byte")


def test_control_characters_are_rejected() -> None:
    rejected("version: 5\nactions: {}\n\x00", "unacceptable character #x0000")


def test_the_c_loader_is_used_when_libyaml_is_available() -> None:
    assert yaml.__with_libyaml__
    assert issubclass(pipeline_yaml.FAST_LOADER, yaml.CSafeLoader)


def test_pure_python_fallback_gives_the_same_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    text = big_project(30)
    fast = load_pipeline(text)
    monkeypatch.setattr(pipeline_yaml, "FAST_LOADER", None)
    assert load_pipeline(text) == fast
    found = rejected("version: 5\nactions:\n  a: {\n", "expected the node content")
    assert "(line 4, column 1)" in found[0]


# --- §2 top level ---------------------------------------------------------------------------------


def test_unknown_top_level_keys_are_listed_together() -> None:
    text = "version: 5\nactions: {}\nfoo: 1\nbar: 2\n"
    assert errors(text) == ["project.yaml: Unexpected parameters (foo, bar) in project (line 3)"]


def test_unknown_top_level_key_suggests_the_likely_key() -> None:
    rejected("version: 5\naction: {}\nactions: {}\n", "in project; did you mean 'actions'?")


@pytest.mark.parametrize("actions", ["", "actions:\n", "actions: [a, b]\n", "actions: x\n"])
def test_actions_section_must_be_a_mapping(actions: str) -> None:
    rejected("version: 5\n" + actions, "Project `actions` section must be a dictionary")


def test_empty_actions_mapping_is_accepted() -> None:
    assert load_pipeline("version: 5\nactions: {}\n").actions == {}


# --- §3 versions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["actions: {}\n", "version:\nactions: {}\n"])
def test_missing_or_null_version_is_rejected(text: str) -> None:
    rejected(text, "Project file must have a `version` attribute")


@pytest.mark.parametrize("version", ["latest", "test", "[5]", "{a: 1}", "2020-01-01"])
def test_version_must_be_a_number(version: str) -> None:
    rejected(f"version: {version}\nactions: {{}}\n", "`version` must be a number between 1 and 5")


@pytest.mark.parametrize(
    ("literal", "value"), [("1", 1.0), ("'1.0'", 1.0), ('"4"', 4.0), ("5", 5.0)]
)
def test_version_accepts_anything_float_accepts(literal: str, value: float) -> None:
    assert load_pipeline(f"version: {literal}\nactions: {{}}\n").version == value


@pytest.mark.parametrize("version", [0, 0.5, 4.5, -1])
def test_versions_below_1_and_fractions_are_accepted(version: float) -> None:
    assert load_pipeline(project(version=version)).version == version


def test_old_version_gives_the_official_warning() -> None:
    assert load_pipeline(project(version=3, expectations={"population_size": 10})).warnings == (
        "ProjectWarning: Your project file is using an old version (3.0); consider updating to"
        " version 5",
    )


def test_version_5_gives_no_warning() -> None:
    assert load_pipeline(project(version="5.0")).warnings == ()


def test_v1_allows_the_same_output_path_twice() -> None:
    same = {"highly_sensitive": {"x": "output/same.csv"}}
    text = project(("a", act("a", outputs=same)), ("b", act("b", outputs=same)), version=1)
    assert load_pipeline(text).actions["b"].outputs == same


@pytest.mark.parametrize("version", [2, 3.5, 5])
def test_from_v2_an_output_path_may_appear_only_once(version: float) -> None:
    same = {"highly_sensitive": {"x": "output/same.csv"}}
    text = project(("a", act("a", outputs=same)), ("b", act("b", outputs=same)), version=version)
    found = rejected(text, "Output path output/same.csv is not unique")
    assert "action 'b'" in found[-1] and "also an output of action 'a'" in found[-1]


def test_same_output_path_twice_within_one_action_is_not_unique() -> None:
    outputs = {"highly_sensitive": {"x": "o/a.csv"}, "moderately_sensitive": {"y": "o/a.csv"}}
    rejected(project(("a", act("a", outputs=outputs))), "Output path o/a.csv is not unique")


def test_overlapping_globs_are_accepted() -> None:
    outputs = {"moderately_sensitive": {"all": "output/*.csv", "one": "output/a.csv"}}
    assert load_pipeline(project(("a", act("a", outputs=outputs)))).actions["a"].outputs == outputs


@pytest.mark.parametrize(("version", "size"), [(1, 1000), (2, 1000), (3.5, 1000), (4, None)])
def test_population_size_defaults_by_version(version: float, size: int | None) -> None:
    assert load_pipeline(project(version=version)).population_size == size


def test_v1_and_v2_ignore_whatever_expectations_holds() -> None:
    assert load_pipeline(project(version=2, expectations=["junk"])).population_size == 1000


def test_v3_requires_expectations() -> None:
    rejected(project(version=3), "Project must include `expectations` section")


@pytest.mark.parametrize(
    ("expectations", "gist"),
    [
        ("x", "Project `expectations` section must be a dictionary"),
        ({}, "Project `expectations` section must include `population_size` section"),
        ({"population_size": "test"}, "Project expectations population size must be a number"),
        ({"population_size": "1000.5"}, "Project expectations population size must be a number"),
        ({"population_size": 1, "x": 2}, "Unexpected parameters (x) in project `expectations`"),
    ],
)
def test_v3_expectations_rules(expectations: Any, gist: str) -> None:
    rejected(project(version=3, expectations=expectations), gist)


@pytest.mark.parametrize(("value", "size"), [(1000, 1000), ("1000", 1000), (99.9, 99), (True, 1)])
def test_v3_population_size_is_converted_with_int(value: Any, size: int) -> None:
    text = project(version=3, expectations={"population_size": value})
    assert load_pipeline(text).population_size == size


@pytest.mark.parametrize("version", [4, 5])
def test_from_v4_expectations_are_refused(version: int) -> None:
    text = project(version=version, expectations={"population_size": 10})
    rejected(
        text, "Project includes `expectations` section, which is not supported in this version"
    )


def test_null_expectations_count_as_absent_from_v4() -> None:
    assert load_pipeline("version: 4\nexpectations:\nactions: {}\n").population_size is None


@pytest.mark.parametrize("image", ["cohortextractor:latest", "cohortextractor-v2:v0.1"])
def test_from_v4_cohortextractor_images_are_refused(image: str) -> None:
    text = project(("a", act("a", run=f"{image} generate_cohort")), version=4)
    rejected(
        text, "Action a uses cohortextractor actions, which are not supported in this version."
    )


def test_v3_allows_cohortextractor() -> None:
    text = project(
        ("extract", act("extract", run="cohortextractor:latest generate_cohort")),
        version=3,
        expectations={"population_size": 10},
    )
    assert load_pipeline(text).actions["extract"].is_database_action


def test_v5_refuses_the_latest_tag_even_after_leading_spaces() -> None:
    text = project(("a", act("a", run="  python:latest a.py")))
    rejected(text, "Action a uses `python:latest`, which is not supported. Provide a version")


def test_v4_allows_the_latest_tag() -> None:
    assert load_pipeline(project(("a", act("a", run="r:latest a.R")), version=4)).actions[
        "a"
    ].tag == ("latest")


def test_before_v5_run_all_warns_is_kept_and_left_out_of_all_actions() -> None:
    text = project(("run_all", act("run_all")), ("a", act("a")), version=4)
    pipeline = load_pipeline(text)
    assert (
        "ProjectWarning: `run_all` is a reserved action name; user-defined actions with this"
        in (pipeline.warnings[1])
    )
    assert list(pipeline.actions) == ["run_all", "a"]
    assert pipeline.all_actions() == ["a"]


def test_before_v5_a_user_run_all_is_still_validated() -> None:
    text = project(("run_all", act("run_all", run="python a.py")), version=4)
    rejected(text, "Action command python must have a version specified")


def test_from_v5_run_all_is_refused() -> None:
    text = project(("run_all", act("run_all")))
    rejected(
        text, "`run_all` is a reserved action name and is not allowed for user-defined actions."
    )


# --- §4 actions -----------------------------------------------------------------------------------


def test_real_world_action_names_are_accepted_and_keep_file_order() -> None:
    names = ["z-last", "a.b", "1st", "dé", "_x"]
    pipeline = load_pipeline(project(*((n, act(f"n{i}")) for i, n in enumerate(names))))
    assert pipeline.all_actions() == names


def test_int_action_key_is_named_by_its_text() -> None:
    text = "version: 5\nactions:\n  2017:\n    run: python:v2 a.py\n"
    text += "    outputs: {highly_sensitive: {x: a.csv}}\n"
    assert load_pipeline(text).actions["2017"].name == "2017"


def test_needs_naming_an_int_key_as_text_is_unknown_like_upstream() -> None:
    text = "version: 5\nactions:\n  2017:\n    run: python:v2 a.py\n"
    text += "    outputs: {highly_sensitive: {x: a.csv}}\n"
    text += "  b:\n    run: python:v2 b.py\n    needs: ['2017']\n"
    text += "    outputs: {highly_sensitive: {x: b.csv}}\n"
    found = rejected(text, "Action `b` references an unknown action in its `needs` list: 2017")
    assert "quote it where it is defined" in found[0]


def test_action_must_be_a_mapping() -> None:
    rejected(project(("a", "python:v2 a.py")), "Configuration for action a must be a dictionary")


def test_action_requires_run_and_outputs_and_both_are_reported() -> None:
    assert errors(project(("a", {"needs": []}))) == [
        "project.yaml: action 'a': Action a must contain a configuration for 'run' (line 3)",
        "project.yaml: action 'a': Action a must contain a configuration for 'outputs' (line 3)",
    ]


def test_unknown_action_key_is_rejected_with_a_typo_hint() -> None:
    found = rejected(
        project(("a", act("a", need=["b"]))), "Unexpected parameters (need) in action a"
    )
    assert "did you mean 'needs'?" in found[0]


@pytest.mark.parametrize(
    ("key", "value", "gist"),
    [
        ("outputs", ["x"], "`outputs` section for action a must be a dictionary"),
        ("outputs", None, "`outputs` section for action a must be a dictionary"),
        ("run", 5, "`run` section for action a must be a string"),
        ("run", None, "`run` section for action a must be a string"),
        ("needs", "b", "`needs` section for action a must be a list"),
        ("config", ["x"], "`config` section for action a must be a dictionary"),
        ("dummy_data_file", 5, "`dummy_data_file` section for action a must be a string"),
    ],
)
def test_action_field_types_are_checked(key: str, value: Any, gist: str) -> None:
    rejected(project(("a", act("a", **{key: value}))), gist)


def test_null_optional_fields_are_accepted() -> None:
    action = load_pipeline(project(("a", act("a", needs=None, config=None)))).actions["a"]
    assert (action.needs, action.config, action.dummy_data_file) == ((), None, None)


def test_dummy_data_file_can_be_any_string() -> None:
    text = project(("a", act("a", dummy_data_file="../anything here.csv")))
    assert load_pipeline(text).actions["a"].dummy_data_file == "../anything here.csv"


# --- §5 run -----------------------------------------------------------------------------------------


def test_empty_run_is_rejected() -> None:
    rejected(project(("a", act("a", run=""))), "run must have a value, a has an empty run key")


@pytest.mark.parametrize(
    "tag", ["v1", "v2", "v1.2", "v1.2.3", "v0.0.37", "v1-pre", "v1.2-pre", "dev", "latest", "v1."]
)
def test_accepted_image_tags(tag: str) -> None:
    action = load_pipeline(project(("a", act("a", run=f"r:{tag} a.R")), version=4)).actions["a"]
    assert (action.image, action.tag) == ("r", tag)


@pytest.mark.parametrize(
    "first_word", ["python", "python:", "python:v", "python:other", "python:vnotdigits",
                   "python:v1x1", "python:pre", "python:2", "python:v2-rc1", "a:v1:x"]
)  # fmt: skip
def test_rejected_image_tags(first_word: str) -> None:
    image = first_word.partition(":")[0]
    text = project(("a", act("a", run=f"{first_word} a.py")))
    rejected(text, f"Action command {image} must have a version specified in the form :vN")


def test_run_is_split_into_image_tag_and_shell_style_arguments() -> None:
    action = load_pipeline(project(("a", act("a", run=' r:v1 a.R --x \'b c\' "d\\"e" '))))
    assert action.actions["a"].args == ("a.R", "--x", "b c", 'd"e')


def test_an_unknown_plain_image_name_is_accepted_as_a_reusable_action() -> None:
    text = project(("km", act("km", run="kaplan-meier-function:v0.0.3 --df output/a.csv")))
    assert load_pipeline(text).actions["km"].image == "kaplan-meier-function"


def test_duplicate_run_commands_are_rejected() -> None:
    text = project(("a", act("a", run="r:v1 x.R")), ("b", act("b", run="r:v1 x.R")))
    found = rejected(text, "Action b has the same 'run' command as other actions: a")
    assert found[0].startswith("project.yaml: action 'b': ")


def test_run_commands_differing_only_in_spacing_are_different() -> None:
    text = project(("a", act("a", run="r:v1 x.R")), ("b", act("b", run="r:v1  x.R")))
    assert len(load_pipeline(text).actions) == 2


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("ehrql:v1 generate-dataset d.py --output o/d.arrow", True),
        ("ehrql:v1 generate-measures m.py --output o/m.csv", True),
        ("ehrql:v1 dump-dataset-sql d.py", False),
        ("sqlrunner:v1 q.sql", True),
        ("sqlrunner:v1", True),
        ("cohortextractor:latest generate_cohort", True),
        ("cohortextractor:latest generate_codelist_report", True),
        ("cohortextractor:latest generate_measures", False),
        ("databuilder:v0 generate-dataset d.py --output o/d.csv", True),
        ("databuilder:v0 generate-measures m.py", False),
        ("python:v2 generate-dataset", False),
        ("ehrql:v1", False),
    ],
)
def test_database_action_flag(run: str, expected: bool) -> None:
    outputs = {"highly_sensitive": {"d": "o/d.arrow" if "d.arrow" in run else "o/d.csv"}}
    text = project(
        ("a", act("a", run=run, outputs=outputs)), version=3, expectations={"population_size": 1}
    )
    assert load_pipeline(text).actions["a"].is_database_action is expected


def test_command_args_append_config_as_json_with_single_quotes_escaped() -> None:
    config = {"label": "it's", "n": [1, None], "nested": {"a": True}}
    action = load_pipeline(project(("a", act("a", run="r:v1 a.R --x", config=config)))).actions["a"]
    assert action.command_args() == [
        "a.R",
        "--x",
        "--config",
        '{"label": "it\\u0027s", "n": [1, null], "nested": {"a": true}}',
    ]
    assert shlex.split(f"--config '{action.command_args()[-1]}'")[1] == action.command_args()[-1]


def test_command_args_without_config_are_the_run_arguments() -> None:
    assert load_pipeline(project(("a", act("a")))).actions["a"].command_args() == ["analysis/a.py"]


def test_dates_in_config_are_passed_as_iso_text() -> None:
    text = project(("a", act("a"))).replace("  a:\n", "  a:\n    config: {start: 2020-01-31}\n", 1)
    assert load_pipeline(text).actions["a"].command_args()[-1] == '{"start": "2020-01-31"}'


@pytest.mark.parametrize("config", ["{s: !!set {a, b}}", "&c {self: *c}", "{b: !!binary aGk=}"])
def test_config_that_cannot_be_json_is_rejected(config: str) -> None:
    text = project(("a", act("a"))).replace("  a:\n", f"  a:\n    config: {config}\n", 1)
    rejected(text, "`config` section for action a cannot be passed on as JSON")


# --- §6 outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outputs", [{}, {"weird": {"x": "a.csv"}}, {"highly_sensitive": None}]
)  # fmt: skip
def test_outputs_need_at_least_one_privacy_level(outputs: dict) -> None:
    text = project(("a", act("a", outputs=outputs)))
    rejected(text, "must specify at least one output of: highly_sensitive, moderately_sensitive,"
                   " minimally_sensitive")  # fmt: skip


def test_unknown_output_level_next_to_a_valid_one_is_rejected() -> None:
    outputs = {"highly_sensitive": {"x": "a.csv"}, "moderatly_sensitive": {"y": "b.csv"}}
    found = rejected(
        project(("a", act("a", outputs=outputs))),
        "Unexpected parameters (moderatly_sensitive) in `outputs` section for action a",
    )
    assert "did you mean 'moderately_sensitive'?" in found[0]


def test_output_level_must_be_a_mapping() -> None:
    text = project(("a", act("a", outputs={"highly_sensitive": ["a.csv"]})))
    rejected(text, "`highly_sensitive` section for action a must be a dictionary")


def test_output_path_must_be_a_string() -> None:
    text = project(("a", act("a", outputs={"highly_sensitive": {"x": 5}})))
    rejected(text, "`x` output for action a must be a string")


@pytest.mark.parametrize(
    ("path", "level", "reason"),
    [
        ("out\\a.csv", "highly_sensitive", "contains back slashes (use forward slashes only)"),
        ("out/**/a.csv", "highly_sensitive", "contains '**' (only the * wildcard character"),
        ("out/?.csv", "highly_sensitive", "contains '?' (only the * wildcard character"),
        ("out/[ab].csv", "highly_sensitive", "contains '[' (only the * wildcard character"),
        ("output/*", "highly_sensitive", "output paths must have a file type extension at the end"),
        ("outputs/foo.*", "highly_sensitive", "must have a file type extension at the end"),
        ("metadata", "highly_sensitive", "must have a file type extension at the end"),
        ("output/dir/", "highly_sensitive", "must have a file type extension at the end"),
        ("output/x_*", "highly_sensitive", "must have a file type extension at the end"),
        ("output/.csv", "highly_sensitive", "must have a file type extension at the end"),
        ("output/a.", "highly_sensitive", "must have a file type extension at the end"),
        ("o/a.CSV", "moderately_sensitive", "o/a.CSV is not an allowed file type for moderately"),
        ("o/a.csv.gz", "moderately_sensitive", "is not an allowed file type for moderately"),
        ("a//b.xls", "moderately_sensitive", "a/b.xls is not an allowed file type"),
        ("a//b.csv", "highly_sensitive", "is not in standard form (contains double slashes or"),
        ("out/../a.csv", "highly_sensitive", "is not in standard form"),
        ("./a.csv", "highly_sensitive", "is not in standard form"),
        ("a/./b.csv", "highly_sensitive", "is not in standard form"),
        ("a.csv/", "highly_sensitive", "is not in standard form"),
        ("metadata/a.csv", "highly_sensitive", "should not include the metadata directory"),
        ("/abs/a.csv", "highly_sensitive", "is an absolute path"),
        ("c:/a.csv", "highly_sensitive", "is an absolute path"),
    ],
)
def test_invalid_output_paths_give_the_official_reason(path: str, level: str, reason: str) -> None:
    found = validate_output_path(path, level)
    assert found is not None and reason in found
    outputs = {level: {"x": path}}
    found = rejected(project(("a", act("a", outputs=outputs))), f"Output path {path} is invalid: ")
    assert reason in found[0]


@pytest.mark.parametrize(
    ("path", "level"),
    [
        ("output/*.csv", "moderately_sensitive"),
        ("output/a_*_b.png", "moderately_sensitive"),
        ("analysis/x.csv", "moderately_sensitive"),
        ("tpp_coverage.rds", "highly_sensitive"),
        ("o/a.csv.gz", "highly_sensitive"),
        ("o/a.xlsx", "minimally_sensitive"),
        ("c:x.csv", "highly_sensitive"),
        ("1:/x.csv", "highly_sensitive"),  # Python 3.11's Windows paths: only letters are drives
        ("metadata.csv", "highly_sensitive"),
    ] + [(f"o/a{ext}", "moderately_sensitive") for ext in (
        ".csv", ".jpg", ".jpeg", ".png", ".svg", ".svgz", ".html", ".txt", ".log", ".json", ".md"
    )],
)  # fmt: skip
def test_valid_output_paths(path: str, level: str) -> None:
    assert validate_output_path(path, level) is None


def test_output_path_checks_run_in_the_official_order() -> None:
    assert validate_output_path("/a\\b", "highly_sensitive").startswith("contains back slashes")
    assert validate_output_path("/a/*", "highly_sensitive").startswith("output paths must have")
    assert validate_output_path("metadata//a.csv", "highly_sensitive").startswith("is not in")


def test_each_output_path_problem_names_the_action_and_line() -> None:
    text = dedent("""
        version: 5
        actions:
          model:
            run: python:v2 a.py
            outputs:
              moderately_sensitive:
                table: output/a.xlsx
                log: logs\\a.log
    """)
    assert errors(text) == [
        "project.yaml: action 'model': Output path output/a.xlsx is invalid: output/a.xlsx is not"
        " an allowed file type for moderately_sensitive outputs (line 7)",
        "project.yaml: action 'model': Output path logs\\a.log is invalid: contains back slashes"
        " (use forward slashes only) (line 8)",
    ]


def test_only_non_null_levels_are_kept_in_spec_order() -> None:
    outputs = {"moderately_sensitive": {"t": "o/t.csv"}, "minimally_sensitive": None,
               "highly_sensitive": {"d": "o/d.rds"}}  # fmt: skip
    action = load_pipeline(project(("a", act("a", outputs=outputs)))).actions["a"]
    assert list(action.outputs) == ["highly_sensitive", "moderately_sensitive"]


def cohort_project(outputs: dict, run: str = "cohortextractor:latest generate_cohort") -> str:
    extract = act("extract", run=run, outputs=outputs)
    return project(("extract", extract), version=3, expectations={"population_size": 10})


def test_generate_cohort_needs_exactly_one_output_level() -> None:
    outputs = {"highly_sensitive": {"a": "o/a.csv"}, "moderately_sensitive": {"b": "o/b.csv"}}
    rejected(
        cohort_project(outputs),
        "A `generate_cohort` action must have exactly one output; extract had 2",
    )


def test_generate_cohort_outputs_must_share_a_directory() -> None:
    outputs = {"highly_sensitive": {"a": "o1/a.csv", "b": "o2/b.csv"}}
    rejected(cohort_project(outputs), "generate_cohort command should produce output in only one"
             " directory, found 2: o1/, o2/")  # fmt: skip


@pytest.mark.parametrize("flag", ["--output-dir out", "--output-dir=out"])
def test_generate_cohort_with_output_dir_may_span_directories(flag: str) -> None:
    outputs = {"highly_sensitive": {"a": "o1/a.csv", "b": "o2/b.csv"}}
    run = f"cohortextractor:latest generate_cohort {flag}"
    assert load_pipeline(cohort_project(outputs, run)).actions["extract"].args[-1].endswith("out")


def ehrql(run: str, outputs: dict) -> str:
    return project(("extract", act("extract", run=run, outputs=outputs)))


def test_generate_dataset_outputs_must_all_be_highly_sensitive() -> None:
    outputs = {"highly_sensitive": {"d": "o/d.arrow"}, "moderately_sensitive": {"s": "o/s.csv"}}
    rejected(
        ehrql("ehrql:v1 generate-dataset d.py --output o/d.arrow", outputs),
        "`extract` action uses `generate-dataset` and so all outputs must be labelled"
        " `highly_sensitive`",
    )


def test_generate_dataset_needs_an_output_argument() -> None:
    outputs = {"highly_sensitive": {"d": "o/d.arrow"}}
    rejected(ehrql("ehrql:v1 generate-dataset d.py", outputs),
             "`extract` action does not provide an `--output` argument")  # fmt: skip


@pytest.mark.parametrize(
    ("run", "path"),
    [
        ("ehrql:v1 generate-dataset d.py --output o/d.arrow", "o/d.arrow"),
        ("ehrql:v1 generate-dataset d.py --output=o/d.arrow", "o/d.arrow"),
        ("ehrql:v1 generate_dataset d.py --output o/d.arrow", "o/d.arrow"),
        ("databuilder:v0 generate-dataset d.py --output o/d.csv", "o/d.csv"),
        ("ehrql:v1 generate-dataset d.py --output o/tables:csv", "o/tables/*.csv"),
        ("ehrql:v1 generate-dataset d.py --output o/tables:csv", "o/tables/patients.csv"),
    ],
)
def test_generate_dataset_outputs_that_match_the_output_argument(run: str, path: str) -> None:
    assert load_pipeline(ehrql(run, {"highly_sensitive": {"d": path}})).actions["extract"]


@pytest.mark.parametrize(
    ("run", "path", "expected"),
    [
        ("ehrql:v1 generate-dataset d.py --output o/d.arrow", "o/other.arrow", "o/d.arrow"),
        (
            "ehrql:v1 generate-dataset d.py --output o/tables:csv",
            "o/tables/*.arrow",
            "o/tables/:csv",
        ),
    ],
)
def test_generate_dataset_outputs_that_contradict_the_output_argument(
    run: str, path: str, expected: str
) -> None:
    found = rejected(
        ehrql(run, {"highly_sensitive": {"d": path}}),
        "output specification must match the `--output` argument in the `run` command",
    )
    assert f"got: {path} but was expecting: {expected}" in found[0]


def test_unusual_spacing_skips_the_generate_dataset_checks_like_upstream() -> None:
    outputs = {"moderately_sensitive": {"s": "o/s.csv"}}
    assert load_pipeline(ehrql("ehrql:v1  generate-dataset d.py", outputs)).actions["extract"]


# --- §7 needs -------------------------------------------------------------------------------------


def test_needs_may_name_actions_defined_later_and_repeat_entries() -> None:
    text = project(("b", act("b", needs=["a", "a"])), ("a", act("a")))
    pipeline = load_pipeline(text)
    assert pipeline.actions["b"].needs == ("a", "a")
    assert pipeline.dependencies("b") == ["a"]


def test_unknown_need_is_rejected_with_action_and_line() -> None:
    text = dedent("""
        version: 5
        actions:
          model:
            run: python:v2 model.py
            needs:
              - extract
            outputs: {moderately_sensitive: {t: output/t.csv}}
    """)
    assert errors(text) == [
        "project.yaml: action 'model': Action `model` references an unknown action in its `needs`"
        " list: extract (line 6)"
    ]


def test_unknown_need_suggests_a_close_name() -> None:
    text = project(("extract", act("extract")), ("model", act("model", needs=["extrcat"])))
    rejected(text, "in its `needs` list: extrcat; did you mean 'extract'?")


def test_need_with_a_space_gets_the_comma_hint() -> None:
    text = project(("a", act("a")), ("b", act("b")), ("c", act("c", needs=["a b"])))
    found = rejected(text, "`needs` actions should be separated with commas, but c needs `a b`")
    assert len(found) == 1  # not also reported as an unknown action


def test_null_or_empty_needs_mean_no_dependencies() -> None:
    pipeline = load_pipeline(project(("a", act("a", needs=None)), ("b", act("b", needs=[]))))
    assert pipeline.dependencies("a") == pipeline.dependencies("b") == []


def test_cycle_in_needs_is_rejected_naming_the_cycle() -> None:
    text = project(
        ("a", act("a", needs=["c"])), ("b", act("b", needs=["a"])), ("c", act("c", needs=["b"]))
    )
    assert errors(text) == [
        "project.yaml: action 'a': needs form a cycle: a -> c -> b -> a (line 3)"
    ]


def test_action_that_needs_itself_is_rejected() -> None:
    rejected(project(("a", act("a", needs=["a"]))), "`needs` of action a includes itself")


def test_every_separate_cycle_is_reported() -> None:
    text = project(
        ("a", act("a", needs=["b"])), ("b", act("b", needs=["a"])),
        ("c", act("c", needs=["d"])), ("d", act("d", needs=["c"])),
    )  # fmt: skip
    found = errors(text)
    assert [line.split(": ", 2)[2] for line in found] == [
        "needs form a cycle: a -> b -> a (line 3)",
        "needs form a cycle: c -> d -> c (line 17)",
    ]


# --- jr's own naming rules (pipeline_names): safe in log lines, file names and URLs ------------


@pytest.mark.parametrize(
    "name",
    ["z-last", "a.b", "1st", "dé", "_x", "generate_dataset_2019-20", "km.v2_final", "αβγ", "名前",
     "a b", ".hidden", "run_all_2", "con-1", "conx", "com10", "nul_x", "lpt", "x" * 100, "名" * 66,
     "it's", "a(1)", "a,b", "a=b", "#1", "a$b", "a&b"]
)  # fmt: skip
def test_action_names_that_are_safe_everywhere_are_accepted(name: str) -> None:
    assert action_name_problem(name) is None
    assert load_pipeline(project((name, act("a")))).all_actions() == [name]


@pytest.mark.parametrize("key", ["2017", "1.5", "true", "null", "0x1F"])
def test_non_string_action_keys_are_checked_by_their_text_and_still_accepted(key: str) -> None:
    text = f"version: 5\nactions:\n  {key}:\n    run: python:v2 a.py\n"
    text += "    outputs: {highly_sensitive: {x: a.csv}}\n"
    assert len(load_pipeline(text).actions) == 1


REFUSED_NAMES = [
    ("", "may not be empty"),
    ("a\nb", "may not contain control characters or line breaks (found U+000A)"),
    ("a\rb", "may not contain control characters or line breaks (found U+000D)"),
    ("a\tb", "may not contain control characters or line breaks (found U+0009)"),
    ("\x00a", "may not contain control characters or line breaks (found U+0000)"),
    ("a\x1b[31m", "may not contain control characters or line breaks (found U+001B)"),
    ("a\x7f", "may not contain control characters or line breaks (found U+007F)"),
    ("a\x85b", "may not contain control characters or line breaks (found U+0085)"),
    ("a\x9b", "may not contain control characters or line breaks (found U+009B)"),
    ("a\u2028b", "may not contain control characters or line breaks (found U+2028)"),
    ("a\u2029b", "may not contain control characters or line breaks (found U+2029)"),
    ("a\ud800", "may not contain control characters or line breaks (found U+D800)"),
    ("x" * 101, "may be at most 100 characters long (this one has 101)"),
    ("x" * 300, "may be at most 100 characters long (this one has 300)"),
    ("名" * 67, "may be at most 200 bytes long in UTF-8 (this one has 67 characters, 201 bytes)"),
    ("a/b", "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"),
    ("/abs", "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"),
    ("../up", "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"),
    ("a\\b", "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"),
    ("c:\\x", "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"),
    ("..", "may not contain '..'"),
    ("a..b", "may not contain '..'"),
    ("..a", "may not contain '..'"),
    (" a", "may not start or end with a space or other whitespace"),
    ("a ", "may not start or end with a space or other whitespace"),
    ("\u3000a", "may not start or end with a space or other whitespace"),
    ("a\u00a0", "may not start or end with a space or other whitespace"),
    ("a.", "may not end with a dot"),
    (".", "may not end with a dot"),
    *((f"a{c}b", f"may not contain {c} (Windows does not allow < > : \" | ? * in file names)")
      for c in '<>:"|?*'),
    ("a:b*", "may not contain : * (Windows does not allow < > : \" | ? * in file names)"),
    *((device, "may not be Windows device names (CON, PRN, AUX, NUL, COM1-9, LPT1-9), with or"
               " without an extension")
      for device in ["CON", "con", "Prn", "aux", "NUL", "nul.x", "nul.tar.gz", "nul .txt",
                     "COM1", "com9", "LPT1", "lpt9.log", "COM\u00b9", "conin$", "CONOUT$"]),
]  # fmt: skip


def with_action_named(name: str) -> str:
    """A valid project whose second action (at line 6) has this name, written as YAML escapes."""
    key = json.dumps(name)  # \uXXXX escapes: YAML would fold a raw U+0085 into a space
    return dedent(f"""
        version: 5
        actions:
          first:
            run: python:v2 first.py
            outputs: {{highly_sensitive: {{x: first.csv}}}}
          {key}:
            run: python:v2 a.py
            outputs: {{highly_sensitive: {{x: a.csv}}}}
    """)


@pytest.mark.parametrize(
    ("name", "gist"), REFUSED_NAMES, ids=[ascii(n)[:30] for n, _ in REFUSED_NAMES]
)
def test_unsafe_action_names_are_refused_naming_the_action_and_line(name: str, gist: str) -> None:
    message = f"Action names {gist}; rename the action"
    assert action_name_problem(name) == message
    shown = one_line(name, 100)
    found = errors(with_action_named(name))
    assert found == [f"project.yaml: action '{shown}': {message} (line 6)"]
    # shown escaped: one line, no control character, and printable to a UTF-8 stream
    assert found[0].splitlines() == found and found[0].encode("utf-8")
    assert not any(0x7F <= ord(c) <= 0x9F or ord(c) < 0x20 for c in found[0])


def test_a_refused_name_is_reported_after_the_official_problems_of_the_file() -> None:
    text = project(("a/b", act("a", run="python a.py")))
    found = errors(text)
    assert len(found) == 2
    assert "must have a version specified" in found[0] and "may not contain /" in found[1]


def test_each_action_with_an_unsafe_name_is_reported() -> None:
    text = project(("a\nb", act("a")), ("ok", act("ok")), ("c..d", act("c")))
    assert [line.split(": Action names")[0] for line in errors(text)] == [
        "project.yaml: action 'a\\nb'",
        "project.yaml: action 'c..d'",
    ]


@pytest.mark.parametrize(
    "image",
    ["python", "r", "ehrql", "stata-mp", "cohortextractor-v2", "kaplan-meier-function", "cox-ipw",
     "A.b_c-1", "3rd", "x" * 100],
)  # fmt: skip
def test_plain_image_names_are_accepted(image: str) -> None:
    assert image_name_problem(image) is None
    text = project(
        ("a", act("a", run=f"{image}:v1 x")), version=3, expectations={"population_size": 1}
    )
    assert load_pipeline(text).actions["a"].image == image


@pytest.mark.parametrize(
    "image",
    ["../other/act", "other/act", "/abs/act", "act/..", "a..b", "..", "-x", ".x", "_x", "",
     "x" * 101, "a@b", "a b", "act\n", "ａct", "act%2F..", "~act"],
)  # fmt: skip
def test_an_image_that_is_not_a_plain_name_is_refused_naming_the_action_and_line(
    image: str,
) -> None:
    text = project(("a", act("a", run=f"{shlex.quote(image + ':v1')} x.py")))
    assert errors(text) == [
        f"project.yaml: action 'a': `run` uses image `{one_line(image, 60)}`, which is not a"
        f" valid name: {IMAGE_NAME_RULE} (line 4)"
    ]
    assert image_name_problem(image) == IMAGE_NAME_RULE


# --- collecting, ordering and formatting problems -------------------------------------------------


def test_every_problem_is_reported_at_once_in_the_official_order() -> None:
    text = dedent("""
        version: 5
        actions:
          extract:
            run: python:latest extract.py
            outputs:
              highly_sensitive: {data: output/data.csv}
          model:
            run: python:v2 model.py
            need: [extract]
            outputs:
              moderately_sensitive: {table: output/table.xlsx}
          report:
            run: python:v2 model.py
            needs: [modle]
            outputs:
              highly_sensitive: {data: output/data.csv}
        extra: 1
    """)
    assert errors(text, "study/project.yaml") == [
        "study/project.yaml: Unexpected parameters (extra) in project (line 17)",
        "study/project.yaml: action 'model': Unexpected parameters (need) in action model; did you"
        " mean 'needs'? (line 9)",
        "study/project.yaml: action 'model': Output path output/table.xlsx is invalid:"
        " output/table.xlsx is not an allowed file type for moderately_sensitive outputs (line 11)",
        "study/project.yaml: action 'extract': Action extract uses `python:latest`, which is not"
        " supported. Provide a version e.g. `:v2` instead (line 4)",
        "study/project.yaml: action 'report': Action report has the same 'run' command as other"
        " actions: model (line 13)",
        "study/project.yaml: action 'report': Output path output/data.csv is not unique (also an"
        " output of action 'extract') (line 12)",
        "study/project.yaml: action 'report': Action `report` references an unknown action in its"
        " `needs` list: modle; did you mean 'model'? (line 14)",
    ]


def test_action_line_is_the_line_of_its_key() -> None:
    text = "version: 5\n\nactions:\n  # first\n  a:\n    run: python:v2 a.py\n"
    text += "    outputs: {highly_sensitive: {x: a.csv}}\n  b: {run: python:v2 b.py,"
    text += " outputs: {highly_sensitive: {x: b.csv}}}\n"
    actions = load_pipeline(text).actions
    assert (actions["a"].line, actions["b"].line) == (5, 8)


# --- the Pipeline object and the graph helpers ------------------------------------------------------


def test_dependencies_are_transitive_and_in_dependency_order() -> None:
    text = project(
        ("extract", act("extract")),
        ("clean", act("clean", needs=["extract"])),
        ("model", act("model", needs=["clean", "extract"])),
        ("report", act("report", needs=["model", "clean"])),
        ("other", act("other")),
    )
    pipeline = load_pipeline(text)
    assert pipeline.dependencies("report") == ["extract", "clean", "model"]
    assert pipeline.dependencies("extract") == []


def test_dependencies_of_an_unknown_action_raise_key_error() -> None:
    with pytest.raises(KeyError, match="Action 'nope' not found in project.yaml"):
        load_pipeline(project(("a", act("a")))).dependencies("nope")


def test_find_cycle_returns_none_for_an_acyclic_graph() -> None:
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b", "unknown"]}) is None


def test_find_cycle_returns_a_closed_path() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]


def test_topological_order_raises_naming_the_cycle() -> None:
    with pytest.raises(ValueError, match="needs form a cycle: b -> c -> b"):
        topological_order({"a": ["b"], "b": ["c"], "c": ["b"]}, ["a"])


def test_long_dependency_chains_do_not_hit_the_recursion_limit() -> None:
    graph = {f"a{i}": [f"a{i - 1}"] if i else [] for i in range(5000)}
    assert topological_order(graph, ["a4999"])[:2] == ["a0", "a1"]
    graph["a0"] = ["a4999"]
    assert len(find_cycle(graph) or []) == 5001


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """Random DAGs: node i may only need nodes with a smaller index, then names are shuffled."""
    size = draw(st.integers(1, 25))
    names = draw(st.permutations([f"n{i}" for i in range(size)]))
    return {
        names[i]: draw(st.lists(st.sampled_from(names[:i]), max_size=4)) if i else []
        for i in range(size)
    }


@given(dags(), st.data())
def test_topological_order_puts_every_dependency_before_its_dependants(graph, data) -> None:
    targets = data.draw(st.lists(st.sampled_from(sorted(graph)), min_size=1, max_size=5))
    order = topological_order(graph, targets)
    position = {name: i for i, name in enumerate(order)}
    assert len(position) == len(order)  # each action once
    assert set(targets) <= set(order)
    for name in order:
        for need in graph[name]:
            assert position[need] < position[name]


@given(dags(), st.data())
def test_an_injected_cycle_is_found_and_is_a_real_cycle(graph, data) -> None:
    names = sorted(graph)
    start = data.draw(st.sampled_from(names))
    end = data.draw(st.sampled_from(names))
    # add a path end -> ... and an edge back, so start -> end -> start closes (or self-loop)
    graph[start] = [*graph[start], end]
    graph[end] = [*graph[end], start]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    for here, there in zip(cycle, cycle[1:], strict=False):
        assert there in graph[here]
    with pytest.raises(ValueError, match="needs form a cycle"):
        topological_order(graph, names)
    actions = [(name, act(name, needs=needs)) for name, needs in graph.items()]
    rejected(project(*actions), "needs form a cycle")


@given(st.text(alphabet=" \t\n\r\x0babc'\"\\#$", max_size=20))
def test_split_command_is_shlex_split(run: str) -> None:
    try:
        expected: Any = shlex.split(run)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: Any = split_command(run)
    except ValueError as exc:
        got = str(exc)
    assert got == expected


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_any_text_is_accepted_or_rejected_with_a_validation_error(text: str) -> None:
    try:
        result: Any = load_pipeline(text)
    except ProjectValidationError as exc:
        result = exc
    assert isinstance(result, Pipeline | ProjectValidationError)


def big_project(actions: int) -> str:
    """A realistic generated project: every tenth action extracts, the others model."""
    lines = ["version: '4.0'", "actions:"]
    for i in range(actions):
        base = i - i % 10
        if i == base:
            lines += [
                f"  extract_{i}:",
                f"    run: ehrql:v1 generate-dataset d{i}.py --output output/d{i}.arrow",
                f"    outputs: {{highly_sensitive: {{dataset: output/d{i}.arrow}}}}",
            ]
        else:
            lines += [
                f"  model_{i}:",
                f"    run: r:v2 model.R --n {i} --label 'model {i}'",
                f"    needs: [extract_{base}]",
                f'    config: {{alpha: 0.05, label: "it\'s {i}"}}',
                "    outputs:",
                f"      moderately_sensitive: {{table: output/m{i}/*.csv, log: logs/m{i}.log}}",
            ]
    return "\n".join(lines) + "\n"


def test_a_2000_action_project_loads() -> None:
    pipeline = load_pipeline(big_project(2000))
    assert len(pipeline.actions) == 2000
    assert pipeline.dependencies("model_1999") == ["extract_1990"]
    assert sum(a.is_database_action for a in pipeline.actions.values()) == 200
