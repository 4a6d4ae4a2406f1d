"""YAML scalar types as ruamel resolves them, for document.py's builder.

The YAML 1.2 implicit rules (1.1's under `%YAML 1.1`) turn a plain scalar's text into a bool,
int, float, null or timestamp; explicitly tagged scalars (`!!str 12`, `!!binary ...`) are built
as the safe loaders build them.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import yaml
from yaml.nodes import ScalarNode

_TAG = "tag:yaml.org,2002:"

# YAML 1.2 implicit types, as ruamel resolves them; `%YAML 1.1` switches to the 1.1 set (so `on`
# is a bool only there). Entries are tried in this order for scalars starting with `first`.
_INT_12 = r"[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+"
_INT_11 = (
    r"[-+]?0b[0-1_]+|[-+]?0?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
    r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
)
_FLOAT_12 = (
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_FLOAT_11 = (
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_BOOL_12 = r"true|True|TRUE|false|False|FALSE"
_BOOL_11 = r"y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
_TIMESTAMP = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}"
    r":[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?"
)
_NUMERIC_FIRST = "-+0123456789."


def _table(bool_re: str, float_re: str, int_re: str) -> dict[str, list[tuple[re.Pattern, str]]]:
    """Index the implicit resolvers by first character, like PyYAML does."""
    rules = [
        (bool_re, "bool", "tTfFyYnNoO"),
        (float_re, "float", _NUMERIC_FIRST),
        (int_re, "int", "-+0123456789"),
        ("<<", "merge", "<"),
        ("~|null|Null|NULL", "null", "~nN"),
        (_TIMESTAMP, "timestamp", "0123456789"),
    ]
    table: dict[str, list[tuple[re.Pattern, str]]] = {}
    for pattern, kind, first in rules:
        regex = re.compile(f"(?:{pattern})\\Z")
        for char in first:
            table.setdefault(char, []).append((regex, kind))
    return table


_RESOLVE = {
    (1, 2): _table(_BOOL_12, _FLOAT_12, _INT_12),
    (1, 1): _table(_BOOL_11, _FLOAT_11, _INT_11),
}
_SAFE = yaml.constructor.SafeConstructor()
# Explicitly tagged scalars that the safe loaders build (`!!str 12`, `!!binary ...`)
_SCALAR_TAGS = frozenset(("str", "int", "float", "bool", "null", "timestamp", "binary", "merge"))


def _int(value: str, v11: bool) -> int:
    text = value.replace("_", "")
    sign = -1 if text[:1] == "-" else 1
    text = text.lstrip("+-")
    for prefix, base in (("0b", 2), ("0x", 16), ("0o", 8)):
        if text.startswith(prefix):
            return sign * int(text[2:], base)
    if v11 and ":" in text:
        result = 0
        for part in text.split(":"):
            result = result * 60 + int(part)
        return sign * result
    if v11 and len(text) > 1 and text[0] == "0":
        return sign * int(text, 8)
    # YAML 1.2 reads a leading zero as decimal (ruamel: `017` is 17)
    return sign * int(text)


def _float(value: str) -> float:
    text = value.replace("_", "").lower()
    sign = -1.0 if text[:1] == "-" else 1.0
    text = text.lstrip("+-")
    if text == ".inf":
        return sign * float("inf")
    if text == ".nan":
        return float("nan")
    if ":" in text:  # YAML 1.1 sexagesimal
        result = 0.0
        for part in text.split(":"):
            result = result * 60 + float(part)
        return sign * result
    return sign * float(text)


def _convert(kind: str, value: str, v11: bool) -> Any:
    if kind == "bool":
        return value.lower() in ("true", "yes", "on", "y")
    if kind == "int":
        return _int(value, v11)
    if kind == "float":
        return _float(value)
    if kind == "null":
        return None
    if kind == "timestamp":
        return _SAFE.construct_yaml_timestamp(ScalarNode(_TAG + "timestamp", value))
    if kind == "binary":
        return base64.decodebytes(value.encode("ascii"))
    return value
