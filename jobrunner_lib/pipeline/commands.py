"""What a `run` command means: its words, database access, `--config` and ehrQL `--output`.

Pure helpers for pipeline_rules and pipeline; no validation messages live here.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import re
import shlex
from pathlib import PurePosixPath
from typing import Any

# Which sub-commands of which images get database access ("*": all of them).
DB_COMMANDS: dict[str, tuple[str, ...] | str] = {
    "ehrql": ("generate-dataset", "generate-measures"),
    "sqlrunner": "*",
    "cohortextractor": ("generate_cohort", "generate_codelist_report"),
    "databuilder": ("generate-dataset",),
}
# shlex.split's POSIX rules as regexes: its only whitespace is these four characters
_SHELL_SPACE = " \t\r\n"
_SHELL_WORD = re.compile(r"""(?:[^ \t\r\n'"\\]+|\\[\s\S]|'[^']*'|"(?:[^"\\]|\\[\s\S])*")+""")
_SHELL_PIECE = re.compile(r"([^'\"\\]+)|\\([\s\S])|'([^']*)'|" r'"((?:[^"\\]|\\[\s\S])*)"')
_SHELL_DQ_ESCAPE = re.compile(r'\\([\\"])')


def split_command(run: str) -> list[str]:
    """shlex.split(run), about five times faster; shlex itself reports malformed commands."""
    words, end = [], 0
    for match in _SHELL_WORD.finditer(run):
        if run[end : match.start()].strip(_SHELL_SPACE):
            return shlex.split(run)  # an unbalanced quote or a trailing backslash: shlex raises
        words.append("".join(_unquote(piece) for piece in _SHELL_PIECE.finditer(match.group())))
        end = match.end()
    if run[end:].strip(_SHELL_SPACE):
        return shlex.split(run)
    return words


def _unquote(piece: re.Match) -> str:
    plain, escaped, single, double = piece.groups()
    if plain is not None:
        return plain
    if escaped is not None:
        return escaped
    if single is not None:
        return single
    # POSIX: inside double quotes a backslash escapes only `\` and `"`
    return _SHELL_DQ_ESCAPE.sub(r"\1", double)


def is_database_action(parts: list[str]) -> bool:
    """Whether a command (already split into words) gets database access."""
    if not parts:
        return False
    commands = DB_COMMANDS.get(parts[0].split(":")[0])
    if commands is None:
        return False
    return commands == "*" or (len(parts) > 1 and parts[1] in commands)


def config_json(config: Any) -> str:
    """`config` as the job-runner passes it: JSON with `'` escaped so it survives shell quoting."""

    def dates_as_text(value: Any) -> str:
        """JSON for values json cannot write itself."""
        # YAML reads 2020-01-01 as a date; the study code expects the text it wrote
        if isinstance(value, datetime.date):
            return value.isoformat()
        raise TypeError(f"{type(value).__name__} values cannot be written as JSON")

    return json.dumps(config, default=dates_as_text).replace("'", "\\u0027")


def output_argument(parts: list[str]) -> str | None:
    """The value of `--output P` or `--output=P`, if given."""
    for switch, value in zip(parts, parts[1:] + [""], strict=True):
        if switch == "--output":
            return value
        if switch.startswith("--output="):
            return switch.removeprefix("--output=")
    return None


def _split_output(spec: str) -> tuple[PurePosixPath, str]:
    # ehrQL's `dir:ext` form names a directory of tables, one file per table
    path = PurePosixPath(spec)
    name, separator, extension = path.name.rpartition(":")
    if not separator:
        return path, ""
    return (path.parent if not name else path.with_name(name)), f".{extension}"


def patterns_match_output(spec: str, patterns: list[str]) -> bool:
    """Whether declared output globs agree with ehrQL's `--output` (a file, or `dir:ext`)."""
    directory, extension = _split_output(spec)
    if extension:
        # fnmatchcase: upstream's fnmatch is case-sensitive on the Linux servers
        return all(fnmatch.fnmatchcase(p, f"{directory}/*{extension}") for p in patterns)
    return spec in patterns


def expected_for_output(spec: str) -> str:
    """What the outputs should have said, for the mismatch message."""
    directory, extension = _split_output(spec)
    return f"{directory}/:{extension[1:]}" if extension else spec
