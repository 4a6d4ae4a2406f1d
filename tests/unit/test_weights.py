"""Job weights from the configured ini file (docs/reference.md#job-weights, the old defects fixed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner_lib.core.errors import ConfigError
from jobrunner_lib.core.weights import load_weights, parse_weights

SAMPLE = """
[covid-vax]
generate_cohort.* = 4
Analyse_Big = 2.5
.* = 0.5

[other]
report = 3
"""


def test_first_matching_key_wins_within_the_workspace() -> None:
    weights = parse_weights(SAMPLE)
    assert weights.weight("covid-vax", "generate_cohort_2021") == 4.0
    assert weights.weight("covid-vax", "anything_else") == 0.5
    assert weights.weight("other", "report") == 3.0


def test_key_must_match_the_whole_action_name() -> None:
    weights = parse_weights(SAMPLE)
    assert weights.weight("other", "report_2") == 1.0
    assert weights.weight("other", "my_report") == 1.0


def test_keys_keep_their_case() -> None:
    weights = parse_weights(SAMPLE)
    assert weights.weight("covid-vax", "Analyse_Big") == 2.5
    # The lower-cased spelling is a different action: it falls to the catch-all rule.
    assert weights.weight("covid-vax", "analyse_big") == 0.5


def test_unknown_workspace_and_action_weigh_one() -> None:
    weights = parse_weights(SAMPLE)
    assert weights.weight("elsewhere", "generate_cohort") == 1.0
    assert parse_weights("").weight("covid-vax", "x") == 1.0


def test_missing_file_means_default_weights(tmp_path: Path) -> None:
    assert load_weights(tmp_path / "absent.ini").weight("ws", "a") == 1.0
    assert load_weights(None).weight("ws", "a") == 1.0


def test_file_is_read_from_the_configured_path_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "job-resource-weights.ini").write_text("[ws]\na = 9\n")
    configured = tmp_path / "conf" / "weights.ini"
    configured.parent.mkdir()
    configured.write_text("[ws]\na = 2\n")
    monkeypatch.chdir(tmp_path)
    assert load_weights(configured).weight("ws", "a") == 2.0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[ws]\nbroken line without a value\n", "malformed"),
        ("a = 1\n", "malformed"),  # no section header
        ("[ws]\ngen( = 2\n", "not a valid regex"),
        ("[ws]\na = heavy\n", "expected a number"),
        ("[ws]\na = -1\n", "expected a number >= 0"),
    ],
)
def test_malformed_file_is_a_config_error_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "weights.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_weights(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert info.value.exit_code == 78
