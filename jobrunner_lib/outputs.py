"""Output files: match declared globs against what a job produced, and route them by privacy.

Pure (stdlib only): callers pass file listings in and get decisions back. Paths are relative to
the workspace and use forward slashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

# Also in jobrunner_lib.pipeline_rules; a unit test keeps the two equal.
PRIVACY_LEVELS = ("highly_sensitive", "moderately_sensitive", "minimally_sensitive")
# Levels copied to the medium-privacy (level 4) tree. jr's decision (SPEC §2 [IMPROVE]): the tree
# is described as "medium and lower", so minimally_sensitive outputs go there too.
MEDIUM_PRIVACY_LEVELS = ("moderately_sensitive", "minimally_sensitive")

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
    """Paths to copy to the medium-privacy tree: moderately and minimally sensitive, never highly."""
    return [path for path, level in outputs.items() if level in MEDIUM_PRIVACY_LEVELS]


def obsolete_outputs(previous: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """Paths of the previous run that this run did not produce, compared case-insensitively.

    Windows and macOS file systems ignore case, so deleting `Out/A.csv` after a run that wrote
    `out/a.csv` would delete the new file; casefold() errs on the side of keeping files.
    """
    produced = {path.casefold() for path in current}
    return [path for path in previous if path.casefold() not in produced]


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
