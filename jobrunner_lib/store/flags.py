"""Backend-wide flags in the state store: `paused`, database maintenance (`mode`,
`manual-db-maintenance`), and jr's own bookkeeping flags (`cleanup:`, `hung:`, ...)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.flags import Flag
from jobrunner_lib.store.db import transaction


def get_flag(conn: sqlite3.Connection, name: str) -> str | None:
    """A backend-wide flag such as `paused`."""
    row = conn.execute("SELECT value FROM flag WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def set_flag(conn: sqlite3.Connection, name: str, value: str | None) -> None:
    """Set (or with None, clear) a backend-wide flag."""
    with transaction(conn):
        if value is None:
            conn.execute("DELETE FROM flag WHERE name = ?", (name,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO flag (name, value, updated_at) VALUES (?, ?, strftime('%s','now'))",
                (name, value),
            )


def flag_rows(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, Flag]:
    """The stored rows of these flags (a cleared one too, with value None), by name; a flag
    never set has no row."""
    names = list(names)
    rows = conn.execute(
        f"SELECT name, value, updated_at FROM flag WHERE name IN ({','.join('?' * len(names))})",
        names,
    )
    found = {row[0]: Flag(row[0], row[1], row[2]) for row in rows}
    return {name: found[name] for name in names if name in found}


def backend_flags(conn: sqlite3.Connection) -> dict[str, Flag]:
    """The backend flags (core/flags.py) that have a row, in their usual order."""
    return flag_rows(conn, core_flags.NAMES)


def put_flag(
    conn: sqlite3.Connection,
    name: str,
    value: str | None,
    *,
    at: float | None = None,
    unless: str | None = None,
) -> tuple[Flag, bool]:
    """Set a flag, or with None clear it keeping its row and time (as upstream does, so the jobs
    website learns when it was cleared); (the flag as it is now, whether it changed).

    A flag already at that value is left alone, time included. unless: change nothing while that
    other flag is on (read in the same transaction).
    """
    at = time.time() if at is None else at
    with transaction(conn):
        row = conn.execute("SELECT value, updated_at FROM flag WHERE name = ?", (name,)).fetchone()
        current = Flag(name, row[0], row[1]) if row else None
        if current is not None and current.value == value:
            return current, False
        if unless is not None:
            other = conn.execute("SELECT value FROM flag WHERE name = ?", (unless,)).fetchone()
            if other is not None and core_flags.is_on(other[0]):
                return current or Flag(name, None, None), False
        # Clearing a flag never set still records it, cleared now (upstream's set_flag does).
        conn.execute(
            "INSERT OR REPLACE INTO flag (name, value, updated_at) VALUES (?, ?, ?)",
            (name, value, at),
        )
    return Flag(name, value, at), current is not None or value is not None


def flags(conn: sqlite3.Connection, prefix: str) -> dict[str, str]:
    """Every flag whose name starts with prefix: name -> value."""
    rows = conn.execute(
        "SELECT name, value FROM flag WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
    )
    return {row[0]: row[1] or "" for row in rows}
