"""Backend flags (docs/reference.md#backend-flags): `paused`, `mode` and `manual-db-maintenance`,
kept as the upstream job-runner keeps them and sent to the jobs website in the `Flags` header.

Pure: their names, the values they take, what they mean for the run pass, and the time format
the website receives. The state store keeps them (store/queries.py, table `flag`, each with the
time of its last change); jr-flags sets them; the run pass obeys them; jobs/maintenance.py's
periodic check sets `mode` from the database's own answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PAUSED = "paused"
MODE = "mode"
MANUAL_DB_MAINTENANCE = "manual-db-maintenance"
DB_MAINTENANCE = "db-maintenance"

# Each flag and the one value it takes (as upstream sets them: `paused=true`, `mode=db-maintenance`,
# `manual-db-maintenance=on`); clearing a flag keeps its row with no value and the time it was
# cleared, as upstream's does.
VALUES: dict[str, str] = {PAUSED: "true", MODE: DB_MAINTENANCE, MANUAL_DB_MAINTENANCE: "on"}
NAMES = tuple(VALUES)
# Values that mean "off" (a flag set by hand in an old store, or by an older jr).
OFF = {"", "false", "0", "no", "off", "none"}


@dataclass(frozen=True)
class Flag:
    """A flag as stored: its value (None once cleared) and when it last changed (Unix seconds)."""

    name: str
    value: str | None
    timestamp: float | None = None


def is_on(value: str | None) -> bool:
    """Whether a flag's value sets it (any value but none or an "off" word: older jr stored
    `paused` as a sentence saying who paused the backend)."""
    return value is not None and value.strip().lower() not in OFF


def paused(flags: Mapping[str, Flag]) -> bool:
    """No job starts (jr-reboot-prep --drain, `jr-flags set paused`)."""
    flag = flags.get(PAUSED)
    return flag is not None and is_on(flag.value)


def db_maintenance(flags: Mapping[str, Flag]) -> bool:
    """Database jobs neither start nor keep running: `mode` is db-maintenance, or an operator
    set manual-db-maintenance (which also sets `mode`; both are read, so neither alone is lost)."""
    mode = flags.get(MODE)
    manual = flags.get(MANUAL_DB_MAINTENANCE)
    return (mode is not None and mode.value == DB_MAINTENANCE) or (
        manual is not None and is_on(manual.value)
    )


def check(name: str, value: str | None) -> str | None:
    """Why `name=value` is not a flag jr can set (None: it is); a value of None clears it."""
    if name not in VALUES:
        return f"unknown flag {name!r}: expected one of {', '.join(NAMES)}"
    if value is not None and value != VALUES[name]:
        return f"{name}={value}: {name} can only be {VALUES[name]} (or cleared)"
    return None


def timestamp_isoformat(ts: float | None) -> str | None:
    """A flag's time as upstream writes it: UTC, ISO 8601 with microseconds when it has them,
    and `Z` (`2024-11-08T16:07:29.123456Z`), i.e. `datetime.utcfromtimestamp(ts).isoformat() + "Z"`."""
    if ts is None:
        return None
    from datetime import datetime, timezone  # lazily: jr-ls and completion must start fast

    return datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat() + "Z"
