"""jr-ls: list jobs, newest first, with filters; or a summary per state and workspace."""

from __future__ import annotations

import argparse
import time

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.models import State, StatusCode, iso
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import human_age, parse_since

COLUMNS = [
    "id",
    "request",
    "workspace",
    "action",
    "state",
    "status_code",
    "status_message",
    "created_at",
    "updated_at",
]
TABLE_COLUMNS = ["id", "request", "workspace", "action", "state", "status_code", "age", "updated"]
TABLE_LIMIT = 100
DB_COLUMNS = [
    "id",
    "job_request_id",
    "workspace",
    "action",
    "state",
    "status_code",
    "status_message",
    "created_at",
    "updated_at",
]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class Ls(Tool):
    name = "jr-ls"
    description = (
        "List jobs, newest first. Reads only the state store (never Docker or the website)."
    )
    epilog = """examples:
  jr-ls                                  the newest jobs
  jr-ls --state running,pending          what is active
  jr-ls --state failed --since 1d -o ids | jr-retry --yes -
  jr-ls abcd                             jobs whose id or request id contains 'abcd'
  jr-ls --summary                        counts per state and workspace"""
    takes_ids = "*"
    output = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        states = ",".join(s.value for s in State)
        parser.add_argument(
            "--state", type=_csv, default=[], metavar="STATE[,STATE]", help=f"one of {states}"
        )
        parser.add_argument(
            "--status-code",
            type=_csv,
            default=[],
            metavar="CODE[,CODE]",
            help="e.g. nonzero_exit,internal_error",
        )
        parser.add_argument("--workspace", type=_csv, default=[], metavar="NAME[,NAME]")
        parser.add_argument(
            "--request", type=_csv, default=[], metavar="ID[,ID]", help="full job-request IDs"
        )
        parser.add_argument("--action", type=_csv, default=[], metavar="NAME[,NAME]")
        parser.add_argument(
            "--since", metavar="AGE|DATE", help="created since: 30m, 2h, 7d or 2021-11-03"
        )
        parser.add_argument(
            "--limit",
            type=int,
            metavar="N",
            help=f"at most N jobs (0: all; default {TABLE_LIMIT} in a table, all otherwise)",
        )
        parser.add_argument(
            "--summary", action="store_true", help="counts per state, per workspace"
        )

    def run(self, ctx: Context) -> int:
        args = ctx.args
        for state in args.state:
            if state not in {s.value for s in State}:
                raise UsageError(
                    f"--state {state!r}: expected one of {', '.join(s.value for s in State)}"
                )
        for code in args.status_code:
            if code not in {c.value for c in StatusCode}:
                raise UsageError(
                    f"--status-code {code!r} is unknown: e.g. {StatusCode.NONZERO_EXIT.value}"
                )
        if args.summary:
            return self.summary(ctx)
        since = parse_since(args.since) if args.since else None
        limit = (
            args.limit
            if args.limit is not None
            else (TABLE_LIMIT if ctx.output_format == "table" else 0)
        )
        filters = dict(
            states=args.state,
            codes=args.status_code,
            workspaces=args.workspace,
            requests=args.request,
            actions=args.action,
            since=since,
            ids=[j.id for j in ctx.resolve_jobs(args.ids)] if args.ids else None,
        )
        found = db_queries.find_jobs(
            ctx.conn, limit=(limit + 1) if limit else None, columns=DB_COLUMNS, **filters
        )
        more = bool(limit) and len(found) > limit
        found = found[:limit] if limit else found
        now = time.time()
        rows = [
            {
                "id": r[0],
                "request": r[1],
                "workspace": r[2],
                "action": r[3],
                "state": r[4],
                "status_code": r[5] or "",
                "status_message": r[6] or "",
                "created_at": iso(r[7]) or "",
                "updated_at": iso(r[8]) or "",
            }
            for r in found
        ]
        table_rows = None
        if ctx.output_format == "table":
            table_rows = [
                {**row, "age": human_age(now - r[7]), "updated": human_age(now - r[8]) + " ago"}
                for row, r in zip(rows, found, strict=True)
            ]
        ctx.emit(rows, COLUMNS, table_rows=table_rows, table_columns=TABLE_COLUMNS)
        if more:
            ctx.say(f"(showing the newest {limit}; --limit 0 shows all)")
        return 0

    def summary(self, ctx: Context) -> int:
        states = [s.value for s in State]
        per_ws: dict[str, dict[str, int]] = {}
        for workspace, state, count in db_queries.count_by(ctx.conn, "workspace"):
            per_ws.setdefault(workspace, dict.fromkeys(states, 0))[state] = count
        totals = dict.fromkeys(states, 0)
        rows = []
        for workspace, counts in per_ws.items():
            for s in states:
                totals[s] += counts[s]
            rows.append(
                {
                    "workspace": workspace,
                    **{s: str(counts[s]) for s in states},
                    "total": str(sum(counts.values())),
                }
            )
        rows.append(
            {
                "workspace": "(all)",
                **{s: str(totals[s]) for s in states},
                "total": str(sum(totals.values())),
            }
        )
        flags = store_flags.backend_flags(ctx.conn)
        if core_flags.paused(flags):
            flag = flags[core_flags.PAUSED]
            # An older jr stored who paused it as the value.
            why = flag.value if flag.value != "true" else f"since {iso(flag.timestamp)}"
            ctx.stderr.write(
                f"Backend is PAUSED ({why}): no new jobs start; "
                "`jr-reboot-prep --resume` lifts it\n"
            )
        if core_flags.db_maintenance(flags):
            mode = flags.get(core_flags.MODE)
            since = f" since {iso(mode.timestamp)}" if mode and mode.timestamp else ""
            ctx.stderr.write(
                f"Database maintenance mode{since}: database jobs wait until it ends; "
                "`jr-flags` shows the flags\n"
            )
        rows = [{"id": r["workspace"], **r} for r in rows]
        ctx.emit(rows, ["workspace", *states, "total"])
        return 0


def main() -> None:
    """Entry point."""
    run_tool(Ls)
