"""What every jr tool shares: flags, ID resolution, confirmation, exit codes.

A tool is a subclass of `Tool` that declares its arguments and implements `run()`; `Tool.main()`
owns configuration, logging and the mapping of every error to its exit code (docs/architecture.md#errors-and-exit-codes). The output
formats, and the ages and times in them, are formats.py's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from jobrunner_lib import __version__
from jobrunner_lib.core import ids, logs
from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    IllegalTransition,
    JrError,
    TemporaryFailure,
    UsageError,
)
from jobrunner_lib.core.models import Job, iso
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries

from .formats import FORMATS, human_age, is_terminal, write_rows

log = logging.getLogger(__name__)

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
    "jr-flags": "jobrunner_lib.cli.flags",
    "jr-pull-image": "jobrunner_lib.cli.pull_image",
    "jr-prune": "jobrunner_lib.cli.prune",
}


def fzf_pick(lines: Sequence[str], *, prompt: str, header: str, multi: bool = False) -> list[str]:
    """The fzf picker every tool shows: lines that start with an ID; the IDs of the lines chosen
    (TAB marks several with multi). Only with a terminal and never with no lines (the callers
    check); choosing nothing (Esc) is an interrupt."""
    from iterfzf import iterfzf  # lazily: fzf is only for people

    # Exact substring matching: operators type ID fragments, and fuzzy matching would let a
    # fragment match across columns (an id's letters, then the "d" of an age).
    chosen = iterfzf(lines, prompt=prompt, header=header, multi=multi, exact=True)
    if not chosen:
        raise KeyboardInterrupt
    return [line.split()[0] for line in ([chosen] if isinstance(chosen, str) else chosen)]


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
        search = partial(db_queries.search_ids, self.conn)
        return ids.resolve(search, expanded, self.pick if self.interactive else None)

    def pick(self, fragment: str, targets: Sequence[ids.Target]) -> ids.Target:
        """Show an fzf picker of the targets (never empty, only with a terminal)."""
        if not targets:
            raise UsageError(f"nothing to pick for '{fragment}'")
        now = time.time()
        lines = []
        for target in targets:
            job = target.jobs[0]
            label = job.action if target.kind == "job" else f"request ({len(target.jobs)} jobs)"
            lines.append(
                f"{target.id}  {label}  {job.state.value}  {job.workspace}  "
                f"{human_age(now - job.created_at)}"
            )
        chosen_id = fzf_pick(
            lines, prompt=f"{fragment}> ", header="id  action  state  workspace  age"
        )[0]
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
                for secret in config.secrets:
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
            f"{self.name}: internal error: {type(exc).__name__}: {logs.mask(logs.squash_whitespace(str(exc)))} "
            f"({where})\n"
        )
        return EXIT_INTERNAL


def run_tool(tool_class: type[Tool], argv: Iterable[str] | None = None) -> None:
    """Entry point for bin/ launchers: run the tool and exit with its code."""
    sys.exit(tool_class().main(list(argv) if argv is not None else None))
