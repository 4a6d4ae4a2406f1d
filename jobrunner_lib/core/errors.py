"""Error classes shared by the library and the tools, each carrying its exit code (docs/architecture.md#errors-and-exit-codes)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MATCH = 3
EXIT_AMBIGUOUS = 4
EXIT_INTERNAL = 70
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78
EXIT_INTERRUPTED = 130


class JrError(Exception):
    """An expected, operator-facing error: one line of text and an exit code."""

    exit_code = EXIT_FAILED


class OperationFailed(JrError):
    """The operation failed for at least one item."""

    exit_code = EXIT_FAILED


class UsageError(JrError):
    """Bad flags or arguments."""

    exit_code = EXIT_USAGE


class NoMatchError(JrError):
    """Nothing matched the given ID(s)."""

    exit_code = EXIT_NO_MATCH


class AmbiguousError(JrError):
    """An ID fragment matched several things and no picker could be shown."""

    exit_code = EXIT_AMBIGUOUS


class TemporaryFailure(JrError):
    """Docker, the jobs website or a lock is unavailable right now; retry later."""

    exit_code = EXIT_TEMPFAIL


class ConfigError(JrError):
    """A missing or invalid setting in the environment or .env."""

    exit_code = EXIT_CONFIG


class JobError(Exception):
    """An expected failure of one job: it fails with `JobError: <message>` and the loop goes on."""


class IllegalTransition(Exception):
    """A job state change the state machine forbids: always a bug (exit 70)."""


class ConflictError(Exception):
    """A compare-and-set update lost a race: someone else changed the job first."""


class JobKeepsChanging(ConflictError, TemporaryFailure):
    """store.queries.change_job lost every one of its races: a tool exits 75, a loop looks again
    on its next pass."""
