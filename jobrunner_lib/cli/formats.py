"""Output formats of every jr tool (`-o table|tsv|jsonl|ids`), and the ages and times in them.

write_rows writes rows in one of FORMATS and read_tsv reads its tsv back; parse_since reads the
ages and dates that `--since` takes; binary writes a container's raw output to a tool's stdout.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, TextIO, cast

from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.models import Job

FORMATS = ("table", "tsv", "jsonl", "ids")

RESULT_COLUMNS = ["id", "action", "workspace", "state", "status_code", "result"]


def result_row(job: Job, result: str) -> dict[str, str]:
    """One output row for a tool that changed (or declined to change) a job: what it did to it."""
    return {
        "id": job.id,
        "action": job.action,
        "workspace": job.workspace,
        "state": job.state.value,
        "status_code": job.status_code.value if job.status_code else "",
        "result": result,
    }


def is_terminal(stream: Any) -> bool:
    """True if the stream is attached to a terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def binary(stream: Any) -> BinaryIO:
    """The byte stream under a text stream (or an adapter for in-memory text streams)."""
    return getattr(stream, "buffer", None) or cast(BinaryIO, _TextWriter(stream))


class _TextWriter:
    """Write bytes to a text-only stream (tests hand tools StringIO)."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, data: bytes) -> int:
        return self.stream.write(data.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def human_age(seconds: float | None) -> str:
    """`45s`, `12m`, `3h`, `5d`: short ages for tables."""
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_since(text: str, now: float | None = None) -> int:
    """`30m`, `2h`, `7d`, `45s` ago, or an ISO date/time, as Unix seconds."""
    import calendar

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if text and text[-1] in units and text[:-1].isdigit():
        return int(now - int(text[:-1]) * units[text[-1]])
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text, fmt))
        except ValueError:
            continue
    raise UsageError(
        f"--since {text!r}: expected an age like 30m, 2h, 7d or a date like 2021-11-03"
    )


_TSV_SPECIAL = re.compile(r"[\\\t\n\r]")


def _tsv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if not _TSV_SPECIAL.search(text):
        return text
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    fmt: str,
    out: TextIO,
    *,
    table_rows: Sequence[Mapping[str, Any]] | None = None,
    table_columns: Sequence[str] | None = None,
) -> None:
    """Write rows in one of FORMATS; tables may use friendlier columns than machine formats."""
    if fmt == "ids":
        for row in rows:
            out.write(f"{row['id']}\n")
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps({c: row.get(c) for c in columns}) + "\n")
    elif fmt == "tsv":
        lines = ["\t".join(columns)]
        lines.extend("\t".join([_tsv_cell(row.get(c)) for c in columns]) for row in rows)
        out.write("\n".join(lines) + "\n")
    elif fmt == "table":
        from tabulate import tabulate  # lazily: only tables need it

        trows = table_rows if table_rows is not None else rows
        tcols = list(table_columns or columns)
        body = [["" if r.get(c) is None else str(r.get(c)) for c in tcols] for r in trows]
        out.write(tabulate(body, headers=tcols, tablefmt="simple", disable_numparse=True) + "\n")
    else:
        raise UsageError(f"unknown output format {fmt!r}: expected one of {', '.join(FORMATS)}")


def read_tsv(text: str) -> list[dict[str, str]]:
    """Parse write_rows' tsv back (for tests and for tools reading each other's output)."""
    # Only "\n" ends a record: splitlines() would also split on \x1e, \x85 and friends.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return []
    header = lines[0].split("\t")

    def unescape(cell: str) -> str:
        out, i = [], 0
        while i < len(cell):
            if cell[i] == "\\" and i + 1 < len(cell):
                out.append(
                    {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(cell[i + 1], cell[i + 1])
                )
                i += 2
            else:
                out.append(cell[i])
                i += 1
        return "".join(out)

    return [
        dict(zip(header, (unescape(c) for c in line.split("\t")), strict=False))
        for line in lines[1:]
    ]
