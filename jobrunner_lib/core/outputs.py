"""Output files: which files a job may claim, at which privacy level, and what it may delete.

Pure (stdlib only): callers pass file listings and the workspace's state in and get decisions
back. Paths are relative to the workspace and use forward slashes.

The ownership model (docs/outputs.md): a file in a workspace belongs to the action whose job
produced it. A job claims as outputs only files its own run produced: never a file copied into
its volume as an input, never a path another action's latest successful job owns, never
anything under `metadata/` (jr's logs) or jr's own marker file, whatever its patterns match. A
file's privacy level only goes up: a path that any action of the workspace declares (or
recorded) highly_sensitive never reaches the medium-privacy tree, even through another action's
broader pattern. Deleting an obsolete output removes only what this action's previous
successful job produced and no other action owns now. `claim_outputs`, `medium_privacy_files`
and `obsolete_outputs` are the only places these rules are written; finalize and every copy
path go through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

# Also in jobrunner_lib.pipeline.rules; a unit test keeps the two equal.
PRIVACY_LEVELS = ("highly_sensitive", "moderately_sensitive", "minimally_sensitive")
# Levels copied to the medium-privacy (level 4) tree. jr's decision (docs/reference.md#the-old-backend): the tree
# is described as "medium and lower", so minimally_sensitive outputs go there too.
MEDIUM_PRIVACY_LEVELS = ("moderately_sensitive", "minimally_sensitive")
HIGH = "highly_sensitive"
# jr's own files in a job's volume and in a workspace: never a job's output, whatever it declares.
MARKER = ".opensafely-timestamp"
METADATA_DIR = "metadata"

_DRIVE = re.compile(r"[A-Za-z]:")
# C0 and C1 controls and the Unicode line separators (str.splitlines breaks lines at all of them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@lru_cache(maxsize=4096)
def glob_to_regex(pattern: str) -> re.Pattern:
    """Regex for an output glob: `*` is any run of characters but `/` (dot files included)."""
    body = "[^/]*".join(re.escape(piece) for piece in pattern.split("*"))
    # \A...\Z rather than ^...$ so that a trailing newline in a file name cannot sneak through
    return re.compile(rf"\A{body}\Z")


# Higher is more sensitive; unknown levels (rejected by the parser anyway) count as the most.
_SENSITIVITY = {"minimally_sensitive": 0, "moderately_sensitive": 1, "highly_sensitive": 2}


def match_outputs(
    output_spec: Mapping[str, Mapping[str, str]], files: Iterable[str]
) -> tuple[dict[str, str], list[str]]:
    """({path: privacy level}, patterns matching no file); the most sensitive matching level wins.

    The old runner let the last level written win, so a file declared highly_sensitive that a broader
    moderately_sensitive glob also matched went to the medium-privacy tree. jr never does that.
    """
    files = list(files)
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for level, patterns in output_spec.items():
        for pattern in (patterns or {}).values():
            # full match only: out/a.csv is not satisfied by out/a.csv.gz (the old prefix quirk)
            regex = glob_to_regex(pattern)
            hits = [path for path in files if regex.match(path)]
            if not hits:
                unmatched.append(pattern)
            for path in hits:
                if path not in matched or _SENSITIVITY[level] > _SENSITIVITY[matched[path]]:
                    matched[path] = level
    return matched, unmatched


def unmatched_files(files: Iterable[str], matched: Mapping[str, str]) -> list[str]:
    """Files no pattern matched (for the "Did you mean to match one of these files" hint)."""
    return list(dict.fromkeys(path for path in files if path not in matched))


def medium_privacy_files(outputs: Mapping[str, str]) -> list[str]:
    """Paths to copy to the medium-privacy tree: moderately and minimally sensitive, never highly.

    A claimed output declared highly_sensitive anywhere in its workspace already has that level
    (claim_outputs raises it), so this is the only test every copy path needs.
    """
    return [path for path, level in outputs.items() if level in MEDIUM_PRIVACY_LEVELS]


def _key(path: str) -> str:
    # Ownership compares paths case-insensitively: on Windows (and macOS) hosts `Output/A.csv`
    # and `output/a.csv` are one file, so treating them as one errs on the side of keeping files.
    return path.casefold()


def is_jr_file(path: str) -> bool:
    """jr's own files: everything under `metadata/` (the action logs, the manifest) and the marker."""
    key = _key(path)
    return key.split("/", 1)[0] == METADATA_DIR or key == MARKER


@dataclass(frozen=True)
class Workspace:
    """What the rest of a workspace holds, as one action's job sees it (built by `neighbours`).

    owners: path -> the other action whose latest successful job recorded it as an output.
    high_paths: path -> the other action whose latest successful job recorded it highly_sensitive.
    high_patterns: highly_sensitive glob -> the other action whose latest job declares it.
    Keys of owners and high_paths are compared case-insensitively.
    """

    owners: Mapping[str, str] = field(default_factory=dict)
    high_paths: Mapping[str, str] = field(default_factory=dict)
    high_patterns: Mapping[str, str] = field(default_factory=dict)

    def owner(self, path: str) -> str | None:
        """The other action owning path, if any."""
        return self.owners.get(_key(path))

    def high_reason(self, path: str) -> str | None:
        """Why path must stay highly_sensitive because of another action, or None."""
        key = _key(path)
        if key in self.high_paths:
            return f"action {self.high_paths[key]} recorded it as highly_sensitive"
        for pattern, action in self.high_patterns.items():
            if glob_to_regex(pattern.casefold()).match(key):
                return f"action {action} declares {pattern} highly_sensitive"
        return None


def neighbours(
    action: str,
    latest_succeeded: Mapping[str, Mapping[str, str] | None],
    latest_specs: Mapping[str, Mapping[str, Mapping[str, str]] | None],
) -> Workspace:
    """The Workspace seen by `action`'s job, from every other action's latest successful job's
    outputs ({action: {path: level}}) and its latest job's output spec ({action: spec}).

    An action owns a path its latest successful job produced only while its latest job still
    declares it (a pattern of any level matches it): an output that moves from one action to
    another in a new version of project.yaml is released by the old one once a job of it from
    that version exists, and can then be claimed by the new one.
    """
    owners: dict[str, str] = {}
    high_paths: dict[str, str] = {}
    for other, produced in sorted(latest_succeeded.items()):
        if other == action:
            continue
        spec = latest_specs.get(other)
        for path, level in (produced or {}).items():
            if spec is not None and not match_outputs(spec, [path])[0]:
                continue  # no longer declared by its action: released
            owners.setdefault(_key(path), other)
            if level == HIGH:
                high_paths.setdefault(_key(path), other)
    high_patterns: dict[str, str] = {}
    for other, spec in sorted(latest_specs.items()):
        if other != action:
            for pattern in ((spec or {}).get(HIGH) or {}).values():
                high_patterns.setdefault(pattern, other)
    return Workspace(owners, high_paths, high_patterns)


@dataclass
class Claim:
    """The outputs a job may claim: its own files, each at its level, and what was left out."""

    outputs: dict[str, str]  # path -> privacy level (after raising)
    unmatched_patterns: list[str]
    left_out: dict[str, str] = field(default_factory=dict)  # matched path -> why not an output
    raised: dict[str, str] = field(default_factory=dict)  # path -> why it is highly_sensitive

    def notes(self) -> list[str]:
        """One line per decision, for the job's log."""
        lines = [
            f"Not an output: {printable(p)}: {why}" for p, why in sorted(self.left_out.items())
        ]
        lines += [
            f"Kept highly_sensitive: {printable(p)}: {why}"
            for p, why in sorted(self.raised.items())
        ]
        return lines


def claim_outputs(
    action: str,
    output_spec: Mapping[str, Mapping[str, str]],
    files: Iterable[str],
    inputs: Mapping[str, str],
    workspace: Workspace,
) -> Claim:
    """The files of `files` (everything in the job's volume) that the job may claim as outputs.

    `inputs` maps each path copied into the volume as an input to the action it came from.
    A file is left out (even when a pattern matches it) if it is jr's own, an input, or another
    action's; a pattern matching only such files is unmatched. A claimed file's level is the most
    sensitive its own patterns give it, raised to highly_sensitive where any action of the
    workspace declares (or recorded) it so.
    """
    files = list(dict.fromkeys(files))
    input_keys = {_key(path): source for path, source in inputs.items()}
    why_not: dict[str, str] = {}
    for path in files:
        owner = workspace.owner(path)
        if is_jr_file(path):
            why_not[path] = "jr's own files (metadata/, the marker) are never outputs"
        elif _key(path) in input_keys:
            why_not[path] = f"it is an input, copied in from action {input_keys[_key(path)]}"
        elif owner is not None and owner != action:
            why_not[path] = f"it is an output of action {owner}"
    own = [path for path in files if path not in why_not]
    matched, unmatched = match_outputs(output_spec, own)
    every, _ = match_outputs(output_spec, files)
    left_out = {path: why_not[path] for path in every if path in why_not}
    raised = {}
    for path, level in matched.items():
        if level != HIGH:
            reason = high_reason(path, output_spec, workspace)
            if reason is not None:
                matched[path] = HIGH
                raised[path] = reason
    return Claim(matched, unmatched, left_out, raised)


def high_reason(
    path: str, output_spec: Mapping[str, Mapping[str, str]], workspace: Workspace
) -> str | None:
    """Why path is declared highly_sensitive, by this action's spec (compared case-insensitively,
    as a Windows host would) or anywhere around it; None if it is not."""
    key = _key(path)
    for pattern in ((output_spec or {}).get(HIGH) or {}).values():
        if glob_to_regex(pattern.casefold()).match(key):
            return f"this action declares {pattern} highly_sensitive"
    return workspace.high_reason(path)


def declared_high(
    path: str, output_spec: Mapping[str, Mapping[str, str]], workspace: Workspace
) -> bool:
    """Whether path is declared highly_sensitive by this action's spec or anywhere around it."""
    return high_reason(path, output_spec, workspace) is not None


def obsolete_outputs(
    previous: Mapping[str, str], current: Mapping[str, str], workspace: Workspace | None = None
) -> dict[str, bool]:
    """Outputs of this action's previous successful job that this run did not produce and that no
    other action owns now: path -> whether it also has a medium-privacy copy to delete.

    Compared case-insensitively: deleting `Out/A.csv` after a run that wrote `out/a.csv` would
    delete the new file on Windows and macOS, so casefold() errs on the side of keeping files.
    """
    workspace = workspace or Workspace()
    produced = {_key(path) for path in current}
    return {
        path: level in MEDIUM_PRIVACY_LEVELS
        for path, level in previous.items()
        if _key(path) not in produced
        and workspace.owner(path) is None
        and not is_jr_file(path)
        and is_safe_relative_path(path)
    }


def name_problem(path: str) -> str | None:
    """Why a file a job wrote cannot be copied to the workspaces under its name, or None if it can.

    Besides the escapes is_safe_relative_path rejects, names with control characters (a newline
    would forge lines in logs.txt, the run log and every listing) and names that are not UTF-8
    (they cannot be written to logs.txt, the database's JSON, or a Windows host) are refused.
    """
    if not is_safe_relative_path(path):
        return "it is not a plain relative path"
    if _CONTROL.search(path):
        return "it contains control characters"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    return None


def printable(path: str) -> str:
    """A file name quoted on one line: bad bytes as \\xff, control characters as \\n, \\t, \\x1b."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "'" + "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text) + "'"


def is_safe_relative_path(path: str) -> bool:
    """Whether a path may be written under a workspace: relative, normal, no escapes.

    Rejects empty paths, absolute paths (POSIX, Windows drive or UNC), backslashes, NUL, and
    empty, `.` or `..` segments, so the path cannot leave the workspace and has one spelling.
    """
    if not path or "\\" in path or "\0" in path or path.startswith("/"):
        return False
    if _DRIVE.match(path):  # `c:x` is relative to drive C's current directory on Windows
        return False
    return all(segment not in ("", ".", "..") for segment in path.split("/"))
