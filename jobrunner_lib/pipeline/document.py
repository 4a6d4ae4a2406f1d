"""Read project.yaml into plain Python data, remembering the line of every key.

The official parser reads YAML with ruamel (YAML 1.2 types, duplicate keys refused, merge keys
allowed). This module gives the same data with PyYAML: libyaml's C parser when available, the
pure-Python one otherwise. Objects are built straight from the parser's event stream: several
times faster than PyYAML's own compose-then-construct, and it lets every duplicate key be
collected (with its line and path) instead of stopping at the first. How a scalar's text
becomes a typed value is yaml_types.py's.
"""

from __future__ import annotations

import binascii
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from jobrunner_lib.pipeline.yaml_types import _RESOLVE, _SCALAR_TAGS, _TAG, _convert

if yaml.__with_libyaml__:

    class _CLoader(yaml.CSafeLoader):
        """libyaml's parser; only its event stream is used."""

    FAST_LOADER: type | None = _CLoader
else:
    FAST_LOADER = None


class _PyLoader(yaml.SafeLoader):
    """Pure-Python parser: the fallback, and the source of PyYAML's wording for syntax errors."""


class YamlProblem(Exception):
    """A problem found while reading the YAML, with where it was found."""

    def __init__(self, message: str, line: int | None, path: tuple = ()) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


@dataclass
class YamlDocument:
    """Parsed data plus line numbers: key_lines[id(mapping)][key], item_lines[id(list)][i]."""

    data: Any
    key_lines: dict[int, dict[Any, int]] = field(default_factory=dict)
    item_lines: dict[int, list[int]] = field(default_factory=dict)
    problems: list[YamlProblem] = field(default_factory=list)

    def line_of(self, mapping: Any, key: Any) -> int | None:
        """Line of `key` in `mapping`, if it came from this document."""
        return self.key_lines.get(id(mapping), {}).get(key)

    def item_line(self, sequence: Any, index: int) -> int | None:
        """Line of item `index` of `sequence`, if it came from this document."""
        lines = self.item_lines.get(id(sequence))
        return lines[index] if lines is not None and index < len(lines) else None


class _Builder:
    """Builds dicts and lists from parser events, recording key lines and duplicate keys."""

    def __init__(self, next_event: Callable[[], Any]) -> None:
        self.next = next_event
        self.anchors: dict[str, Any] = {}
        self.doc = YamlDocument(None)
        self.path: list[Any] = []
        self.table = _RESOLVE[(1, 2)]
        self.v11 = False

    def error(self, message: str, event: Any) -> YamlProblem:
        """A problem at `event`, inside the current key path."""
        return YamlProblem(message, event.start_mark.line + 1, tuple(self.path))

    def node(self, event: Any) -> Any:
        """The value that starts with `event`."""
        kind = type(event)
        if kind is ScalarEvent:
            value = self.scalar(event)
            if event.anchor is not None:
                self.anchors[event.anchor] = value
            return value
        if kind is MappingStartEvent:
            return self.mapping(event)
        if kind is SequenceStartEvent:
            return self.sequence(event)
        if kind is AliasEvent:
            try:
                return self.anchors[event.anchor]
            except KeyError:
                raise self.error(f"found undefined alias {event.anchor!r}", event) from None
        raise self.error(f"unexpected YAML event {kind.__name__}", event)

    def scalar(self, event: ScalarEvent) -> Any:
        """A scalar, typed by its tag or by the YAML 1.2 (or 1.1) implicit rules."""
        value = event.value
        tag = event.tag
        if tag is None or tag == "!":
            if event.implicit[0]:
                for regex, kind in self.table.get(value[:1], ()):
                    if regex.match(value):
                        if kind == "merge":
                            return value
                        try:
                            return _convert(kind, value, self.v11)
                        except ValueError:  # e.g. more digits than Python converts
                            message = f"cannot read {_shown(value)} as a number"
                            raise self.error(message, event) from None
                if not value:
                    return None
            return value
        if tag.startswith(_TAG) and tag[len(_TAG) :] in _SCALAR_TAGS:
            try:
                return _convert(tag[len(_TAG) :], value, self.v11)
            except (ValueError, TypeError, binascii.Error):
                raise self.error(f"invalid value {value!r} for tag {tag!r}", event) from None
        raise self.error(f"could not determine a constructor for the tag {tag!r}", event)

    def mapping(self, start: MappingStartEvent) -> Any:
        """A mapping: records key lines, reports duplicate keys, applies `<<` merges."""
        data: dict[Any, Any] = {}
        if start.anchor is not None:
            self.anchors[start.anchor] = data
        lines: dict[Any, int] = {}
        merges: list[dict] = []
        next_event = self.next
        while True:
            event = next_event()
            if type(event) is MappingEndEvent:
                break
            line = event.start_mark.line + 1
            is_merge = type(event) is ScalarEvent and (
                (event.value == "<<" and event.tag is None and event.implicit[0])
                or event.tag == _TAG + "merge"
            )
            key = self.node(event)
            if type(key) is list:
                key = tuple(key)  # as ruamel does, so `? [a, b]` is a usable key
            self.path.append(key)
            value = self.node(next_event())
            self.path.pop()
            try:
                seen = key in lines
            except TypeError:
                self.doc.problems.append(self.error("found unhashable key", event))
                continue
            if seen:
                original = data.get(key)
                shown = (
                    f' with value "{_shown(value)}" (original value: "{_shown(original)}")'
                    if not is_merge
                    else ""
                )
                self.doc.problems.append(
                    YamlProblem(f'found duplicate key "{key}"{shown}', line, tuple(self.path))
                )
            lines[key] = line
            if is_merge:
                merges.extend(self.merge_sources(value, event))
            else:
                data[key] = value
        if merges:
            # explicit keys win over merged ones; earlier merge sources win over later ones
            explicit, explicit_lines = dict(data), {k: v for k, v in lines.items() if k in data}
            data.clear()
            lines = {}
            for source in reversed(merges):
                data.update(source)
                lines.update(self.doc.key_lines.get(id(source), {}))
            data.update(explicit)
            lines.update(explicit_lines)
        self.doc.key_lines[id(data)] = lines
        return self.tagged_collection(start, data)

    def merge_sources(self, value: Any, event: Any) -> list[dict]:
        """The mappings a `<<` value names."""
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(source, dict) for source in sources):
            self.doc.problems.append(
                self.error("expected a mapping or list of mappings for merging", event)
            )
            return []
        return sources

    def sequence(self, start: SequenceStartEvent) -> Any:
        """A list, recording the line of each item."""
        data: list[Any] = []
        if start.anchor is not None:
            self.anchors[start.anchor] = data
        lines: list[int] = []
        next_event = self.next
        path = self.path
        while True:
            event = next_event()
            if type(event) is SequenceEndEvent:
                break
            lines.append(event.start_mark.line + 1)
            path.append(len(data))
            data.append(self.node(event))
            path.pop()
        self.doc.item_lines[id(data)] = lines
        return self.tagged_collection(start, data)

    def tagged_collection(self, start: Any, data: Any) -> Any:
        """Apply an explicit collection tag (`!!set`, `!!omap`, `!!pairs`)."""
        tag = start.tag
        if tag is None or tag == "!" or tag in (_TAG + "map", _TAG + "seq"):
            return data
        # The rarely used standard collection tags, as the official (safe) loader builds them
        if tag == _TAG + "set" and isinstance(data, dict):
            result: Any = set(data)
        elif tag in (_TAG + "omap", _TAG + "pairs") and isinstance(data, list):
            pairs = [pair for item in data if isinstance(item, dict) for pair in item.items()]
            result = dict(pairs) if tag.endswith("omap") else pairs
        else:
            raise self.error(f"could not determine a constructor for the tag {tag!r}", start)
        if start.anchor is not None:
            self.anchors[start.anchor] = result
        return result


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _shown(value: Any) -> str:
    """A value as an error message quotes it: as written if short, else abbreviated.

    Never the whole of a huge value (an alias can stand for billions of items).
    """
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return _REPR.repr(value)
    return str(value)[:80]


def _build(loader_cls: type, text: str | bytes) -> YamlDocument:
    loader = loader_cls(text)
    try:
        builder = _Builder(loader.get_event)
        loader.get_event()  # stream start
        event = loader.get_event()
        if type(event) is StreamEndEvent:
            return builder.doc  # an empty file: data stays None
        if isinstance(event, DocumentStartEvent) and event.version == (1, 1):
            builder.table, builder.v11 = _RESOLVE[(1, 1)], True
        builder.doc.data = builder.node(loader.get_event())
        loader.get_event()  # document end
        event = loader.get_event()
        if type(event) is not StreamEndEvent:
            raise YamlProblem(
                "expected a single document in the stream, but found another document",
                event.start_mark.line + 1,
            )
        return builder.doc
    finally:
        loader.dispose()


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a PyYAML error, keeping its own words and its line/column."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = []
        if exc.context:
            parts.append(exc.context + _where(exc.context_mark))
        if exc.problem:
            parts.append(exc.problem + _where(exc.problem_mark))
        if exc.problem == "mapping values are not allowed here":
            # almost always `run: python: a.py` or a `: ` inside an unquoted value
            parts.append("a value containing ': ' must be quoted")
        return ": ".join(parts) or "invalid YAML"
    if isinstance(exc, yaml.reader.ReaderError):
        # its text names the stream "<unicode string>"; keep only the first line
        return f"{str(exc).splitlines()[0]} (position {exc.position})"
    return " ".join(str(exc).split())


def load_yaml(text: str | bytes) -> YamlDocument:
    """Parse one YAML document; raises YamlProblem for syntax errors, nesting too deep, and
    aliases that expand the document beyond MAX_EXPANDED_VALUES values."""
    try:
        doc = None
        if FAST_LOADER is not None:
            try:
                doc = _build(FAST_LOADER, text)
            except yaml.YAMLError:
                pass  # re-read below: PyYAML's messages match the official wording better
        if doc is None:
            try:
                doc = _build(_PyLoader, text)
            except yaml.YAMLError as exc:
                # the line and column are in the message already
                raise YamlProblem(describe_yaml_error(exc), None) from None
        _check_expansion(doc.data)
        return doc
    except RecursionError:
        raise YamlProblem("the document is nested too deeply", None) from None


# An alias stands for its anchor's whole value, so a few lines can describe a value of billions
# of items ("billion laughs") that every later step would walk, print or serialise; a real
# project.yaml is nowhere near this many values even with its aliases expanded.
MAX_EXPANDED_VALUES = 100_000


def _check_expansion(data: Any) -> None:
    """YamlProblem if aliases expand the document beyond MAX_EXPANDED_VALUES values."""
    sizes: dict[int, int] = {}  # by id: each shared (aliased) value is counted once, memoized
    open_ids: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            return 1  # a value containing itself: the rules report it where it matters
        open_ids.add(key)
        total = 1
        for item in value.items() if isinstance(value, dict) else value:
            total += size(item[0]) + size(item[1]) if isinstance(value, dict) else size(item)
            if total > MAX_EXPANDED_VALUES:
                raise YamlProblem(
                    f"the document has more than {MAX_EXPANDED_VALUES} values once its aliases"
                    " are expanded",
                    None,
                )
        open_ids.discard(key)
        sizes[key] = total
        return total

    size(data)
