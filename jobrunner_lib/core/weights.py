"""Job weights (docs/reference.md#job-weights): how many units of MAX_WORKERS capacity a job takes.

The ini file's sections are workspace names; each key is a regex that must match the whole action
name and its value is a float; the first matching key wins, and anything unmatched weighs 1.
Unlike the old runner, keys keep their case and the file is the configured one, not whatever
`job-resource-weights.ini` happens to sit in the current directory.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass, field
from pathlib import Path

from jobrunner_lib.core.errors import ConfigError
from jobrunner_lib.core.logs import squash_whitespace

DEFAULT_WEIGHT = 1.0


@dataclass(frozen=True)
class Weights:
    """Per workspace, the (action regex, weight) rules in file order."""

    rules: dict[str, list[tuple[re.Pattern[str], float]]] = field(default_factory=dict)

    def weight(self, workspace: str, action: str) -> float:
        """The weight of one action in one workspace (first full match wins; default 1)."""
        for pattern, value in self.rules.get(workspace, ()):
            if pattern.fullmatch(action):
                return value
        return DEFAULT_WEIGHT


def parse_weights(text: str, source: str = "<weights>") -> Weights:
    """Parse the ini text; any problem is a ConfigError naming `source`."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # action names are case-sensitive
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError(
            f"job resource weights file {source} is malformed: {squash_whitespace(str(exc))}"
        ) from None
    rules: dict[str, list[tuple[re.Pattern[str], float]]] = {}
    for workspace in parser.sections():
        entries = []
        for key, raw in parser.items(workspace):
            where = f"job resource weights file {source}, [{workspace}] {key}"
            try:
                pattern = re.compile(key)
            except re.error as exc:
                raise ConfigError(f"{where}: not a valid regex ({exc})") from None
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{where} = {raw!r}: expected a number, e.g. {key} = 2") from None
            if value < 0 or value != value:  # NaN would make every capacity check false
                raise ConfigError(f"{where} = {raw!r}: expected a number >= 0")
            entries.append((pattern, value))
        rules[workspace] = entries
    return Weights(rules)


def load_weights(path: Path | None) -> Weights:
    """Read the weights file; a missing file means every job weighs 1."""
    if path is None:
        return Weights()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Weights()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job resource weights file {path} cannot be read: {exc}") from None
    return parse_weights(text, str(path))
