"""The project.yaml validation rules (docs/pipeline.md), collecting every problem found.

Each message carries the official parser's own words (opensafely 2.0.4) so that anyone who
searches for the official message finds jr's; jr adds the action, the line and, where it can, a
hint. The order of checks follows docs/pipeline.md §9, so the first message is the one the
official parser would have shown.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from jobrunner_lib.pipeline.commands import (
    config_json,
    expected_for_output,
    output_argument,
    patterns_match_output,
    split_command,
)
from jobrunner_lib.pipeline.document import YamlDocument

LATEST_VERSION = 5
RUN_ALL = "run_all"
# Also in jobrunner_lib.core.outputs, which must stay stdlib-only; a unit test keeps the two equal.
PRIVACY_LEVELS = ("highly_sensitive", "moderately_sensitive", "minimally_sensitive")
TOP_LEVEL_KEYS = ("version", "actions", "expectations")
ACTION_KEYS = ("run", "outputs", "needs", "config", "dummy_data_file")
# Level-4 (releasable) file types; the last suffix counts and the match is case-sensitive.
MODERATELY_SENSITIVE_TYPES = frozenset(
    (".csv", ".jpg", ".jpeg", ".png", ".svg", ".svgz", ".html", ".txt", ".log", ".json", ".md")
)
# `\d` (not [0-9]) and `$` as upstream, so the same odd tags (`v1.`, `v1..2`) are let through.
TAG_REGEX = re.compile(r"^((v[\d.]+(-pre)?)|dev|latest)$")
_TYPE_NAMES = {str: "string", dict: "dictionary of key/value pairs", list: "list"}


@dataclass(frozen=True)
class Features:
    """What a `version` turns on (upstream's feature flags)."""

    unique_output_path: bool
    expectations_population: bool
    no_cohortextractor: bool
    no_run_all: bool
    no_latest_tag: bool


def features_for(version: float) -> Features:
    """Feature flags for a version no greater than LATEST_VERSION (fractions compare as numbers)."""
    return Features(
        unique_output_path=2 <= version,
        expectations_population=3 <= version <= 3,
        no_cohortextractor=4 <= version,
        no_run_all=5 <= version,
        no_latest_tag=5 <= version,
    )


@dataclass
class Problem:
    """One validation failure: the message, where it is, and the action it belongs to."""

    message: str
    line: int | None = None
    action: str | None = None

    def format(self, filename: str) -> str:
        """`<file>: action '<name>': <message> (line N)`, leaving out what is unknown.

        Always one readable line: control characters from the file (a newline in a quoted
        name) are escaped, and a message quoting a huge value is cut short.
        """
        where = f"action '{one_line(self.action, 100)}': " if self.action is not None else ""
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{filename}: {where}{one_line(self.message, MAX_MESSAGE)}{line}"


MAX_MESSAGE = 500
# Lone surrogates too: they are not text, and printing one to a UTF-8 stream raises.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str, limit: int) -> str:
    """text with control characters escaped (`\\n`), cut to about limit characters."""
    text = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ActionSpec:
    """What the rules learned about one action, for pipeline.Action."""

    name: str
    run: str | None  # None when missing or not a string
    parts: list[str] | None  # None when `run` could not be split into words
    needs: list[str]
    outputs: dict[str, dict[str, str]]
    config: dict | None
    dummy_data_file: str | None
    line: int | None
    run_line: int | None = None
    needs_lines: list[int | None] = field(default_factory=list)


@dataclass
class ProjectCheck:
    """Outcome of validating a whole parsed file (filled in by pipeline.load_pipeline)."""

    version: float | None = None
    actions: list[ActionSpec] = field(default_factory=list)
    population_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def validate_output_path(path: str, level: str) -> str | None:
    """Why an output glob is invalid (the official reason text), or None if it is fine."""
    if "\\" in path:
        return "contains back slashes (use forward slashes only)"
    for expr in ("**", "?", "["):
        if expr in path:
            return f"contains '{expr}' (only the * wildcard character is supported)"
    normal = posixpath.normpath(path) == path
    # Upstream takes the name from pathlib, which collapses `//` and `/./`; for a path already
    # in normal form that is simply the last segment (and pathlib is slow).
    shown = path if normal else str(PurePosixPath(path))
    name = shown.rpartition("/")[2]
    # Python 3.11's suffix rule, spelled out so that a newer Python cannot change the verdict
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot < len(name) - 1 else ""
    if suffix == "" or suffix.endswith("*"):
        return "output paths must have a file type extension at the end"
    if level == "moderately_sensitive" and suffix not in MODERATELY_SENSITIVE_TYPES:
        return f"{shown} is not an allowed file type for moderately_sensitive outputs"
    if not normal:
        return "is not in standard form (contains double slashes or '..' elements)"
    if path == "metadata" or path.startswith("metadata/"):
        return "should not include the metadata directory"
    # `c:/x` is absolute on Windows, where some backends run (PureWindowsPath is slow: pre-check)
    if path.startswith("/") or (path[1:2] == ":" and PureWindowsPath(path).is_absolute()):
        return "is an absolute path"
    return None


def close_match_hint(word: Any, choices: Any) -> str:
    """`; did you mean 'x'?` for a likely typo, else ""."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.75)
    return f"; did you mean '{match[0]}'?" if match else ""


def unexpected_parameters(keys: list[Any], where: str, allowed: tuple[str, ...]) -> str:
    """The official `Unexpected parameters (k1, k2) in <where>` message, plus a typo hint."""
    hint = close_match_hint(keys[0], allowed) if len(keys) == 1 else ""
    return f"Unexpected parameters ({', '.join(map(str, keys))}) in {where}{hint}"


def _type_ok(value: Any, expected: type, optional: bool = False) -> bool:
    return (optional and value is None) or isinstance(value, expected)


def check_action(
    doc: YamlDocument, name: str, body: Any, line: int | None, problems: list[Problem]
) -> ActionSpec | None:
    """Apply the per-action rules (§9 step 5), appending to `problems`; None if not a mapping."""
    return _ActionChecker(doc, name, body, line, problems).check()


class _ActionChecker:
    """Checks one action (§9 step 5); problems go to the shared list."""

    def __init__(self, doc: YamlDocument, name: str, body: Any, line: int | None, out: list):
        self.doc, self.name, self.body, self.line, self.out = doc, name, body, line, out

    def problem(self, message: str, line: int | None = None) -> None:
        """Record a problem of this action (at its own line unless told)."""
        self.out.append(Problem(message, line or self.line, self.name))

    def key_line(self, key: str) -> int | None:
        """Line of one of this action's keys."""
        return self.doc.line_of(self.body, key)

    def check(self) -> ActionSpec | None:
        """Validate the action; returns what could be read even when there are problems."""
        name, body = self.name, self.body
        if not isinstance(body, dict):
            self.problem(f"Configuration for action {name} must be a dictionary of key/value pairs")
            return None
        for key in ("run", "outputs"):
            if key not in body:
                self.problem(f"Action {name} must contain a configuration for '{key}'")
        unknown = [k for k in body if k not in ACTION_KEYS]
        if unknown:
            where = f"action {name}"
            self.problem(
                unexpected_parameters(unknown, where, ACTION_KEYS), self.key_line(unknown[0])
            )
        ok = self.check_types()
        outputs, usable = self.check_outputs(body["outputs"]) if ok["outputs"] else ({}, False)
        run = body["run"] if ok["run"] else None
        parts = self.check_run(run) if run is not None else None
        needs, needs_lines = self.check_needs(body.get("needs") or []) if ok["needs"] else ([], [])
        config = body.get("config") if ok["config"] else None
        if config is not None:
            try:
                config_json(config)
            except (TypeError, ValueError) as exc:  # the official job-runner crashes here
                self.problem(
                    f"`config` section for action {name} cannot be passed on as JSON: {exc}",
                    self.key_line("config"),
                )
        if usable and run is not None and parts:
            self.check_generate_commands(run, parts, outputs)
        dummy = body.get("dummy_data_file") if ok["dummy_data_file"] else None
        return ActionSpec(
            name,
            run,
            parts,
            needs,
            outputs,
            config,
            dummy,
            self.line,
            self.key_line("run"),
            needs_lines,
        )

    def check_types(self) -> dict[str, bool]:
        """The type checks, in upstream order; which fields are usable."""
        body, name = self.body, self.name
        checks = (
            ("outputs", dict, False),
            ("run", str, False),
            ("needs", list, True),
            ("config", dict, True),
            ("dummy_data_file", str, True),
        )
        ok = {}
        for key, expected, optional in checks:
            ok[key] = key in body and _type_ok(body[key], expected, optional)
            if key in body and not ok[key]:
                what = _TYPE_NAMES[expected]
                message = f"`{key}` section for action {name} must be a {what}"
                self.problem(message, self.key_line(key))
            ok[key] = ok[key] or (optional and key not in body)
        return ok

    def check_outputs(self, outputs: dict) -> tuple[dict[str, dict[str, str]], bool]:
        """The non-null levels (string paths only) and whether the section is well-formed."""
        name, usable = self.name, True
        at = self.key_line("outputs")
        if all(outputs.get(level) is None for level in PRIVACY_LEVELS):
            self.problem("must specify at least one output of: " + ", ".join(PRIVACY_LEVELS), at)
            usable = False
        unknown = [k for k in outputs if k not in PRIVACY_LEVELS]
        if unknown:
            where = f"`outputs` section for action {name}"
            line = self.doc.line_of(outputs, unknown[0]) or at
            self.problem(unexpected_parameters(unknown, where, PRIVACY_LEVELS), line)
        levels: dict[str, dict[str, str]] = {}
        for level in PRIVACY_LEVELS:
            group = outputs.get(level)
            if group is None:
                continue
            line = self.doc.line_of(outputs, level) or at
            if not isinstance(group, dict):
                self.problem(
                    f"`{level}` section for action {name} must be a dictionary of key/value pairs",
                    line,
                )
                usable = False
                continue
            for output_name, path in group.items():
                if not isinstance(path, str):
                    message = f"`{output_name}` output for action {name} must be a string"
                    self.problem(message, self.doc.line_of(group, output_name) or line)
                    usable = False
                    continue
                reason = validate_output_path(path, level)
                if reason:
                    message = f"Output path {path} is invalid: {reason}"
                    self.problem(message, self.doc.line_of(group, output_name) or line)
            levels[level] = {str(k): v for k, v in group.items() if isinstance(v, str)}
        return levels, usable

    def check_run(self, run: str) -> list[str] | None:
        """The command split into words (even with a bad tag), or None if it cannot be split."""
        name, at = self.name, self.key_line("run")
        try:
            parts = split_command(run)
        except ValueError as exc:  # the official parser crashes here
            self.problem(f"`run` section for action {name} is not a valid command: {exc}", at)
            return None
        if not parts:  # "" upstream; whitespace-only crashes it
            self.problem(f"run must have a value, {name} has an empty run key", at)
            return None
        image, _, tag = parts[0].partition(":")
        if not TAG_REGEX.match(tag):
            self.problem(
                f"Action command {image} must have a version specified in the form :vN"
                f" (e.g. {image}:v2)",
                at,
            )
        return parts

    def check_needs(self, needs: list) -> tuple[list[str], list[int | None]]:
        """The usable (string, comma-separated) entries and their lines."""
        names, lines = [], []
        for index, need in enumerate(needs):
            at = self.doc.item_line(needs, index) or self.key_line("needs")
            if not isinstance(need, str):  # the official parser crashes here (TypeError)
                self.problem(
                    f"`needs` section for action {self.name} must be a list of action names:"
                    f" {need!r} is not a name (quote names that YAML reads as numbers etc.)",
                    at,
                )
            elif " " in need:
                self.problem(
                    f"`needs` actions should be separated with commas, but {self.name}"
                    f" needs `{need}`",
                    at,
                )
            else:
                names.append(need)
                lines.append(at)
        return names, lines

    def check_generate_commands(self, run: str, parts: list[str], outputs: dict) -> None:
        """§6.5: outputs of cohortextractor generate_cohort and ehrQL generate-dataset."""
        name = self.name
        at = self.key_line("outputs")
        if re.match(r"cohortextractor:\S+ generate_cohort", run):
            if len(outputs) != 1:
                self.problem(
                    f"A `generate_cohort` action must have exactly one output; {name} had"
                    f" {len(outputs)}",
                    at,
                )
            paths = [p for group in outputs.values() for p in group.values()]
            dirs = sorted({str(PurePosixPath(p).parent) for p in paths})
            has_dir = any(a == "--output-dir" or a.startswith("--output-dir=") for a in parts)
            if len(dirs) != 1 and not has_dir:
                listed = ", ".join(f"{d}/" for d in dirs)
                self.problem(
                    "generate_cohort command should produce output in only one directory,"
                    f" found {len(dirs)}: {listed}",
                    at,
                )
        if re.match(r"(ehrql|databuilder):\S+ generate[-_]dataset", run):
            if outputs.get("moderately_sensitive") or outputs.get("minimally_sensitive"):
                self.problem(
                    f"`{name}` action uses `generate-dataset` and so all outputs must be"
                    " labelled `highly_sensitive`",
                    at,
                )
            spec = output_argument(parts)
            patterns = list(outputs.get("highly_sensitive", {}).values())
            if not spec:
                self.problem(
                    f"`{name}` action does not provide an `--output` argument specifying"
                    " where the results of `generate-dataset` should be stored",
                    self.key_line("run"),
                )
            elif not patterns_match_output(spec, patterns):
                self.problem(
                    "output specification must match the `--output` argument in the `run`"
                    f" command; got: {', '.join(patterns)} but was expecting:"
                    f" {expected_for_output(spec)}",
                    at,
                )
