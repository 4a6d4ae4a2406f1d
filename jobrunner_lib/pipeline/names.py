"""jr's own naming rules for project.yaml: action names and image (reusable action) names.

The official parser takes any YAML key as an action name and any first word of `run` as an
image. jr writes action names into log lines and file names (`metadata/<action>.log`, on Linux
and Windows hosts), and builds a reusable action's repository URL as
`ACTIONS_BASE_URL/<image>`, so it refuses names that could forge a log line, leave a directory,
not be a file name on either system, or point outside ACTIONS_BASE_URL. Pure and stdlib-only,
so that any module can call it.
"""

from __future__ import annotations

import re

MAX_NAME_CHARS = 100
# Linux file names are at most 255 bytes: 100 four-byte characters plus `.log` would not fit.
MAX_NAME_BYTES = 200
# C0, DEL, C1, the Unicode line and paragraph separators, and lone surrogates (not text at all).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_WINDOWS_FORBIDDEN = '<>:"|?*'
# As Windows (and Python 3.13's ntpath.isreserved) has them; matched case-insensitively, on the
# part before the first dot, so `nul.x` and `com1.log` are devices too.
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"}
)
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
IMAGE_NAME_RULE = (
    "image and reusable action names (e.g. `python`, `cohort-joiner`) may contain only ASCII"
    " letters, digits, `.`, `_` and `-`, must start with a letter or digit, may not contain `..`"
    f" and are at most {MAX_NAME_CHARS} characters; a reusable action is a repository directly"
    " under the actions organisation"
)


def action_name_problem(name: str) -> str | None:
    """Why jr refuses this action name (one line, ending in what to do), or None if it is fine."""
    reason = _action_name_reason(name)
    return f"Action names {reason}; rename the action" if reason else None


def _action_name_reason(name: str) -> str | None:
    if name == "":
        return "may not be empty"
    control = _CONTROL.search(name)
    if control:
        found = f"U+{ord(control.group()):04X}"
        return f"may not contain control characters or line breaks (found {found})"
    chars, size = len(name), len(name.encode("utf-8"))
    if chars > MAX_NAME_CHARS:
        return f"may be at most {MAX_NAME_CHARS} characters long (this one has {chars})"
    if size > MAX_NAME_BYTES:
        return (
            f"may be at most {MAX_NAME_BYTES} bytes long in UTF-8 (this one has {chars}"
            f" characters, {size} bytes)"
        )
    if "/" in name or "\\" in name:
        return "may not contain / or \\ (the name becomes a file name, metadata/<action>.log)"
    if ".." in name:
        return "may not contain '..'"
    if name[0].isspace() or name[-1].isspace():
        return "may not start or end with a space or other whitespace"
    if name.endswith("."):
        return "may not end with a dot"
    forbidden = [c for c in _WINDOWS_FORBIDDEN if c in name]
    if forbidden:
        return (
            f"may not contain {' '.join(forbidden)} (Windows does not allow"
            f" {' '.join(_WINDOWS_FORBIDDEN)} in file names)"
        )
    if name.partition(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return (
            "may not be Windows device names (CON, PRN, AUX, NUL, COM1-9, LPT1-9), with or"
            " without an extension"
        )
    return None


def image_name_problem(image: str) -> str | None:
    """Why `image` is not a plain image or reusable action name (IMAGE_NAME_RULE), or None."""
    if _IMAGE_NAME.fullmatch(image) and ".." not in image and len(image) <= MAX_NAME_CHARS:
        return None
    return IMAGE_NAME_RULE
