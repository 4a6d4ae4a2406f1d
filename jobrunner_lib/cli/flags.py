"""jr-flags: show, set and clear the backend flags (core/flags.py): `paused`, `mode`,
`manual-db-maintenance`, as upstream's `flags` tool does, with jr's checks and messages."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.flags import DB_MAINTENANCE, MANUAL_DB_MAINTENANCE, MODE, PAUSED, Flag
from jobrunner_lib.core.models import iso
from jobrunner_lib.store import flags as store_flags

from .common import Context, Tool, run_tool

COLUMNS = ["flag", "value", "since"]
ACTIONS = ("show", "get", "set", "clear")
# What each flag does, said when it is set.
EFFECT = {
    PAUSED: "no new job starts (running jobs go on)",
    MODE: "database jobs wait, and running ones are stopped and put back to pending",
    MANUAL_DB_MAINTENANCE: "database maintenance until you clear it, whatever the check says",
}


class Flags(Tool):
    name = "jr-flags"
    component = "flag"
    description = """Show, set and clear the backend flags (the jobs website receives them with
every call jr-sync makes):

  paused=true                no new job starts (what jr-reboot-prep --drain sets)
  mode=db-maintenance        database maintenance: database jobs do not start, running ones
                             are stopped and put back to pending (not failed); other jobs go
                             on. The maintenance check (MAINTENANCE_CHECK_IMAGE) sets and
                             clears it from the database's own answer.
  manual-db-maintenance=on   database maintenance that only you end: sets mode too, and the
                             check leaves it alone.

`set NAME` gives a flag its one value; `clear NAME` (or upstream's `set NAME=`) clears it. A flag
keeps the time of its last change. Prints the flags as they are after the change; what changed is
said on stderr. Unknown flags or values: exit 2."""
    epilog = """examples:
  jr-flags                                 show the flags
  jr-flags set manual-db-maintenance       hold database jobs until you clear it
  jr-flags clear manual-db-maintenance     end it (the check, if configured, has its say)
  jr-flags set mode=db-maintenance         as upstream's tool writes it
  jr-flags set paused --dry-run            say what would change, change nothing"""
    output = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        words = parser.add_argument(
            "words",
            nargs="*",
            metavar="ACTION FLAG[=VALUE]",
            help="show (the default; `get` also works), set or clear, then flag names",
        )
        words.jr_complete = [*ACTIONS[:1], *ACTIONS[2:], *core_flags.NAMES]  # type: ignore[attr-defined]
        parser.add_argument(
            "-n", "--dry-run", action="store_true", help="say what would change, change nothing"
        )

    def run(self, ctx: Context) -> int:
        words = list(ctx.args.words)
        action = words.pop(0) if words and words[0] in ACTIONS else "show"
        if action in ("show", "get"):
            return self.show(ctx, [self.known(name) for name in words])
        if not words:
            raise UsageError(f"{action} what? e.g. jr-flags {action} {MANUAL_DB_MAINTENANCE}")
        wanted = [self.parse(word, action) for word in words]
        return self.change(ctx, wanted)

    # -- arguments --

    @staticmethod
    def known(name: str) -> str:
        problem = core_flags.check(name, None)
        if problem:
            raise UsageError(problem)
        return name

    def parse(self, word: str, action: str) -> tuple[str, str | None]:
        """(name, value to set or None to clear) from `NAME`, `NAME=VALUE` or `NAME=`."""
        name, equals, value = word.partition("=")
        self.known(name)
        if action == "clear":
            if equals:
                raise UsageError(
                    f"clear takes flag names only, not {word!r}: jr-flags clear {name}"
                )
            return name, None
        if not equals:
            return name, core_flags.VALUES[name]
        if value == "":
            return name, None  # upstream's way to clear: `set NAME=`
        problem = core_flags.check(name, value)
        if problem:
            if name == MODE and value == MANUAL_DB_MAINTENANCE:
                problem += f"; for maintenance only you end, jr-flags set {MANUAL_DB_MAINTENANCE}"
            raise UsageError(problem)
        return name, value

    # -- show --

    def show(self, ctx: Context, names: Sequence[str]) -> int:
        flags = store_flags.backend_flags(ctx.conn)
        self.emit(ctx, flags, names or core_flags.NAMES)
        self.say_check(ctx)
        return 0

    @staticmethod
    def emit(ctx: Context, flags: dict[str, Flag], names: Sequence[str]) -> None:
        rows = []
        for name in names:
            flag = flags.get(name)
            rows.append(
                {
                    "id": name,
                    "flag": name,
                    "value": flag.value if flag else None,
                    "since": iso(flag.timestamp) if flag and flag.timestamp else None,
                }
            )
        ctx.emit(rows, COLUMNS)

    @staticmethod
    def say_check(ctx: Context) -> None:
        """How the maintenance check stands, when there is one."""
        config = ctx.config
        assert config is not None
        if not config.maintenance_check_image:
            return
        from jobrunner_lib.jobs import maintenance

        last = maintenance.last_check(ctx.conn)
        ctx.say(
            f"maintenance check: {config.maintenance_check_image} every "
            f"{config.maintenance_check_interval:g}s; last: "
            + ((last.value or "?") if last else "never run")
        )

    # -- set and clear --

    def change(self, ctx: Context, wanted: list[tuple[str, str | None]]) -> int:
        config = ctx.config
        assert config is not None
        flags = store_flags.backend_flags(ctx.conn)
        check = bool(config.maintenance_check_image)
        explicit = dict(wanted)  # each flag once, its last word wins
        plan: list[tuple[str, str | None]] = []
        notes: list[str] = []
        for name, value in explicit.items():
            plan.append((name, value))
            implied = MODE not in explicit
            if name == MANUAL_DB_MAINTENANCE and value is not None and implied:
                plan.append((MODE, DB_MAINTENANCE))  # at once, not at the next check
            elif name == MANUAL_DB_MAINTENANCE and value is None and not check and implied:
                # Nothing else would end it: the mode it set goes with it.
                plan.append((MODE, None))
            elif name == MANUAL_DB_MAINTENANCE:
                notes.append(
                    f"the maintenance check runs at the next pass and sets {MODE} from the "
                    "database's answer"
                )
            elif name == MODE and check and not _on(flags, MANUAL_DB_MAINTENANCE):
                notes.append(
                    f"the maintenance check (every {config.maintenance_check_interval:g}s) sets "
                    f"{MODE} from the database's answer; to hold it, jr-flags set "
                    f"{MANUAL_DB_MAINTENANCE}"
                )
        manual_stays = explicit.get(MANUAL_DB_MAINTENANCE, "unchanged") is not None
        if manual_stays and MODE in explicit and explicit[MODE] is None:
            if explicit.get(MANUAL_DB_MAINTENANCE) or _on(flags, MANUAL_DB_MAINTENANCE):
                raise UsageError(
                    f"{MANUAL_DB_MAINTENANCE} is set and holds {MODE} at {DB_MAINTENANCE}: "
                    f"jr-flags clear {MANUAL_DB_MAINTENANCE}"
                )
        changed = False
        for name, value in plan:
            current = flags.get(name)
            was = _describe(current)
            if (current.value if current else None) == value:
                ctx.say(f"{name}: {'already ' if current else ''}{was}; unchanged")
                continue
            what = f"{name}={value}" if value is not None else name
            if ctx.args.dry_run:
                ctx.say(f"dry run: would {'set' if value else 'clear'} {what} (now {was})")
                continue
            flags[name], _ = store_flags.put_flag(ctx.conn, name, value)
            changed = True
            effect = f": {EFFECT[name]}" if value is not None else ""
            ctx.say(f"{'set' if value else 'cleared'} {what} (was {was}){effect}")
        if changed:
            if check and any(n == MANUAL_DB_MAINTENANCE and v is None for n, v in plan):
                from jobrunner_lib.jobs import maintenance

                # The check decides at once (the next pass starts it), not an interval later.
                store_flags.put_flag(
                    ctx.conn, maintenance.CHECK_FLAG, f"due: {MANUAL_DB_MAINTENANCE} cleared", at=0
                )
            try:
                config.wake_path.touch()  # the service passes and syncs now, not after a sleep
            except OSError:
                pass
        for note in notes:
            ctx.say(f"note: {note}")
        if ctx.args.dry_run:
            ctx.say("dry run: nothing changed")
        self.emit(ctx, flags, core_flags.NAMES)
        return 0


def _on(flags: dict[str, Flag], name: str) -> bool:
    flag = flags.get(name)
    return flag is not None and core_flags.is_on(flag.value)


def _describe(flag: Flag | None) -> str:
    if flag is None or flag.timestamp is None:
        return "never set"
    if flag.value is None:
        return f"cleared {iso(flag.timestamp)}"
    return f"{flag.value} since {iso(flag.timestamp)}"


def main() -> None:
    """Entry point."""
    run_tool(Flags)
