"""What every jr tool shares: flags, output formats, ID resolution, confirmation, exit codes.

A tool is a subclass of `Tool` that declares its arguments and implements `run()`; `Tool.main()`
owns configuration, logging and the mapping of every error to STYLE.md's exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from .. import __version__, db, ids, logs, models
from ..config import Config, load_config
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    IllegalTransition,
    JrError,
    TemporaryFailure,
    UsageError,
)
from ..models import Job

log = logging.getLogger(__name__)

FORMATS = ("table", "tsv", "jsonl", "ids")

# Every tool, for completion and the README table; a module is listed once it exists.
TOOLS: dict[str, str] = {
    "jr-ls": "jobrunner_lib.cli.ls",
    "jr-add-job": "jobrunner_lib.cli.add_job",
    "jr-sync": "jobrunner_lib.cli.sync",
    "jr-run-once": "jobrunner_lib.cli.run_once",
    "jr-watch-logs": "jobrunner_lib.cli.watch_logs",
    "jr-mount": "jobrunner_lib.cli.mount",
    "jr-kill": "jobrunner_lib.cli.kill",
    "jr-retry": "jobrunner_lib.cli.retry",
    "jr-reboot-prep": "jobrunner_lib.cli.reboot_prep",
    "jr-pull-image": "jobrunner_lib.cli.pull_image",
    "jr-prune": "jobrunner_lib.cli.prune",
}


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


def human_age(seconds: float | None) -> str:
    """`45s`, `12m`, `3h`, `5d`: short ages for tables."""
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def iso(ts: int | float | None) -> str:
    """Unix seconds as `2021-11-03T09:12:51Z` (empty for None)."""
    return models.iso(ts) or ""


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


class Context:
    """What a running tool has: its parsed args, configuration, state store and streams."""

    def __init__(
        self,
        tool: Tool,
        args: argparse.Namespace,
        config: Config | None,
        stdin: TextIO,
        stdout: TextIO,
        stderr: TextIO,
    ):
        self.tool, self.args, self.config = tool, args, config
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        """The state store, opened (and migrated) on first use."""
        if self._conn is None:
            assert self.config is not None
            self._conn = db.connect(self.config.db_path)
        return self._conn

    @property
    def interactive(self) -> bool:
        """A person is at a terminal (or --pick says so: mintty does not report one)."""
        return bool(getattr(self.args, "pick", False)) or (
            is_terminal(self.stdin) and is_terminal(self.stderr)
        )

    def say(self, message: str) -> None:
        """A line for the person (stderr), unless --quiet."""
        if not getattr(self.args, "quiet", False):
            self.stderr.write(message + "\n")
            self.stderr.flush()

    @property
    def output_format(self) -> str:
        """-o as given, else table on a terminal and tsv otherwise."""
        fmt = getattr(self.args, "output", None)
        return fmt or ("table" if is_terminal(self.stdout) else "tsv")

    def emit(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], **table: Any) -> None:
        """Write data rows to stdout in the chosen format."""
        write_rows(rows, columns, self.output_format, self.stdout, **table)
        self.stdout.flush()

    def resolve_jobs(self, fragments: Sequence[str]) -> list[Job]:
        """Turn ID arguments (fragments, `-`) into jobs, picking interactively when allowed."""
        expanded = ids.expand_args(fragments, self.stdin)
        if not expanded:
            return []
        return ids.resolve(self.conn, expanded, self.pick if self.interactive else None)

    def pick(self, fragment: str, targets: Sequence[ids.Target]) -> ids.Target:
        """Show an fzf picker of the targets (never empty, only with a terminal)."""
        if not targets:
            raise UsageError(f"nothing to pick for '{fragment}'")
        from iterfzf import iterfzf  # lazily: fzf is only for people

        now = time.time()
        lines = []
        for target in targets:
            job = target.jobs[0]
            label = job.action if target.kind == "job" else f"request ({len(target.jobs)} jobs)"
            lines.append(
                f"{target.id}  {label}  {job.state.value}  {job.workspace}  "
                f"{human_age(now - job.created_at)}"
            )
        # Exact substring matching: operators type ID fragments, and fuzzy matching would let a
        # fragment match across columns (an id's letters, then the "d" of an age).
        choice = iterfzf(
            lines, prompt=f"{fragment}> ", header="id  action  state  workspace  age", exact=True
        )
        if not choice:
            raise KeyboardInterrupt
        chosen_id = choice.split()[0]
        return next(t for t in targets if t.id == chosen_id)

    def confirm(self, plan: Sequence[str], verb: str) -> bool:
        """Show the plan; True to go ahead. --dry-run: False. No terminal and no --yes: refuse (exit 2)."""
        for line in plan:
            self.stderr.write(line + "\n")
        if getattr(self.args, "dry_run", False):
            self.stderr.write("dry run: nothing changed\n")
            return False
        if getattr(self.args, "yes", False):
            return True
        if not (is_terminal(self.stdin) and is_terminal(self.stderr)):
            raise UsageError(
                f"refusing to {verb} without a terminal to confirm: add --yes (or --dry-run)"
            )
        self.stderr.write(f"{verb.capitalize()}? [y/N] ")
        self.stderr.flush()
        answer = self.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            self.stderr.write("nothing changed\n")
            return False
        return True


class Tool:
    """Base of every jr tool: subclasses set the class attributes and implement run()."""

    name = "jr"
    component: str | None = None
    description = ""
    epilog = ""
    takes_ids: str | None = None  # None, "+" (one or more) or "*" (optional)
    output = False
    destructive = False
    needs_config = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the tool's own arguments."""

    def run(self, ctx: Context) -> int:
        """Do the work; return an exit code."""
        raise NotImplementedError

    def build_parser(self) -> argparse.ArgumentParser:
        """The full parser: shared flags plus the tool's own."""
        parser = argparse.ArgumentParser(
            prog=self.name,
            description=self.description,
            epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        verbosity = parser.add_mutually_exclusive_group()
        verbosity.add_argument(
            "-v", "--verbose", action="store_true", help="log DEBUG detail on stderr"
        )
        verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
        if self.output:
            parser.add_argument(
                "-o",
                "--output",
                choices=FORMATS,
                metavar="FORMAT",
                help="table|tsv|jsonl|ids (default: table on a terminal, tsv otherwise)",
            )
        if self.takes_ids:
            arg = parser.add_argument(
                "ids",
                nargs=self.takes_ids,
                metavar="ID",
                help="job or request ID, or a fragment of 3+ characters; - reads IDs "
                "from stdin (first field of each line)",
            )
            arg.jr_complete = "ids"  # type: ignore[attr-defined]
            parser.add_argument(
                "--pick",
                action="store_true",
                help="always offer a picker for ambiguous IDs (for terminals that hide "
                "themselves, like mintty)",
            )
        if self.destructive:
            parser.add_argument("-y", "--yes", action="store_true", help="do it without asking")
            parser.add_argument(
                "-n", "--dry-run", action="store_true", help="show the plan, change nothing"
            )
        self.add_arguments(parser)
        return parser

    def load_config(self) -> Config:
        """The configuration (a hook so tests and tools without config can override)."""
        return load_config()

    def main(
        self,
        argv: Sequence[str] | None = None,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> int:
        """Parse, run and map every outcome to an exit code (never a traceback on the terminal)."""
        stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        args = self.build_parser().parse_args(argv)
        config: Config | None = None
        try:
            config = self.load_config() if self.needs_config else None
            level = (
                "DEBUG"
                if args.verbose
                else "ERROR"
                if args.quiet
                else (config.loglevel if config else "INFO")
            )
            logs.setup(
                self.component or self.name,
                level,
                stream=stderr,
                debug_log_file=config.debug_log_file if config else None,
            )
            if config:
                for secret in (
                    config.job_server_token,
                    config.private_repo_access_token,
                    *config.database_urls.values(),
                ):
                    logs.register_secret(secret)
            ctx = Context(self, args, config, stdin, stdout, stderr)
            return self.run(ctx)
        except JrError as exc:
            stderr.write(f"{self.name}: {logs.mask(str(exc))}\n")
            return exc.exit_code
        except KeyboardInterrupt:
            stderr.write(f"{self.name}: interrupted\n")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`| head`): not an error; silence the flush at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                stderr.write(f"{self.name}: the state store is busy ({exc}); try again\n")
                return TemporaryFailure.exit_code
            return self._internal_error(exc, config, stderr)
        except (IllegalTransition, Exception) as exc:  # noqa: B014 - named for the reader
            return self._internal_error(exc, config, stderr)

    def _internal_error(self, exc: BaseException, config: Config | None, stderr: TextIO) -> int:
        """Log the traceback to a file and say one line naming it (exit 70)."""
        path = (
            config.internal_log_file
            if config
            else Path(os.environ.get("TMPDIR", "/tmp")) / "jr-internal-errors.log"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"--- {iso(time.time())} {self.name} (pid {os.getpid()})\n")
                fh.write(logs.mask("".join(traceback.format_exception(exc))))
            where = f"traceback in {path}"
        except OSError:
            where = "traceback could not be written"
        stderr.write(
            f"{self.name}: internal error: {type(exc).__name__}: {logs.mask(logs.one_line(str(exc)))} "
            f"({where})\n"
        )
        return EXIT_INTERNAL


def run_tool(tool_class: type[Tool], argv: Iterable[str] | None = None) -> None:
    """Entry point for bin/ launchers: run the tool and exit with its code."""
    try:
        code = tool_class().main(list(argv) if argv is not None else None)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    except ConfigError as exc:  # pragma: no cover - main() already maps it
        sys.stderr.write(f"{tool_class.name}: {exc}\n")
        code = exc.exit_code
    sys.exit(code)
