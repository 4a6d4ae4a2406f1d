"""`python -m jobrunner_lib.cli.settings`: the settings service/jr-service needs, as jr reads them.

The service loop is a bash script, but it must agree with the tools about where the workdir is
(its pid file and wake file live there) and how often to poll. Rather than parse `.env` itself,
it asks this command once at start, so `.env`'s quoting, `export` and comments, `${VAR}`
references, a real environment variable winning, paths relative to the checkout and git-bash
paths are all read by core/config.py's load_config, exactly as every tool reads them:

    eval "$(python -m jobrunner_lib.cli.settings --shell)"

Printed, one `NAME=value` line each (with --shell, values quoted for bash's `eval`):

- WORKDIR: the resolved, absolute workdir
- POLL_INTERVAL: seconds between service passes when nothing changed
- LOGLEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL
- JOB_SERVER_ENDPOINT: the jobs website's API URL; empty when jr runs embedded
- CONFIG_ERROR: empty, or why the configuration is invalid (every tool then exits 78)

With an invalid configuration the command still prints every line, each setting resolved on its
own (a setting that is itself invalid gets its default), and exits 78: the service keeps looping,
and the tools report the problem every time they run, until `.env` is fixed. Exit 0 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.errors import EXIT_CONFIG, EXIT_INTERNAL, EXIT_OK, ConfigError
from jobrunner_lib.core.values import read_env

# Each printed setting and the variables it is read from: with an invalid configuration, a
# setting is resolved from these alone, so one bad variable does not hide the others.
SOURCES: dict[str, tuple[str, ...]] = {
    "WORKDIR": ("WORKDIR", "WORK_DIR"),
    "POLL_INTERVAL": ("POLL_INTERVAL",),
    "LOGLEVEL": ("LOGLEVEL",),
}
# load_config reads no file when told to read this one (the .env is already merged in).
NO_FILE = Path(os.devnull)


def seconds(value: float) -> str:
    """A number of seconds as plain decimals bash's arithmetic (awk) takes: `5`, `0.05`, `1e-05`
    as `0.00001`; anything not finite as Python writes it (the service then uses its default)."""
    if not math.isfinite(value):
        return str(value)
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _values(config: Config) -> dict[str, str]:
    return {
        "WORKDIR": str(config.workdir),
        "POLL_INTERVAL": seconds(config.poll_interval),
        "LOGLEVEL": config.loglevel,
        "JOB_SERVER_ENDPOINT": config.job_server_endpoint or "",
    }


def resolve(environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """(the settings as printed, the configuration error or None), read as load_config reads them.

    With an invalid configuration each setting is resolved from its own variables alone (its
    default if those are invalid too); the jobs website counts as configured when
    JOB_SERVER_ENDPOINT is set at all, so jr-sync runs and says what is wrong with it.
    """
    env = read_env(None, environ)  # `.env` (JR_ENV_FILE) merged under the environment
    try:
        return {**_values(load_config(env, NO_FILE)), "CONFIG_ERROR": ""}, None
    except ConfigError as exc:
        error = str(exc)
    defaults = _values(Config())
    values: dict[str, str] = {}
    for name, sources in SOURCES.items():
        own = {key: env[key] for key in sources if key in env}
        try:
            values[name] = _values(load_config(own, NO_FILE))[name]
        except ConfigError:
            values[name] = defaults[name]
    values["JOB_SERVER_ENDPOINT"] = (env.get("JOB_SERVER_ENDPOINT") or "").strip()
    values["CONFIG_ERROR"] = error
    return values, error


def main(argv: Sequence[str] | None = None) -> int:
    """Print the settings; exit 0, 78 if the configuration is invalid, 70 on a bug."""
    parser = argparse.ArgumentParser(
        prog="python -m jobrunner_lib.cli.settings",
        description="Print the settings service/jr-service needs, as jr resolves them from the "
        "environment and .env (JR_ENV_FILE names another file). Exit 78 (with every line "
        "printed all the same) if the configuration is invalid.",
        epilog='example: eval "$(python -m jobrunner_lib.cli.settings --shell)"',
    )
    parser.add_argument(
        "--shell", action="store_true", help="quote each value for bash's eval (NAME='value')"
    )
    args = parser.parse_args(argv)
    try:
        values, error = resolve()
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable .env: one line, not a traceback
        print(f"jr-settings: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    # "\n" also on Windows, and UTF-8: git-bash's eval must see no "\r" and the path as written.
    out = sys.stdout.buffer
    for name, value in values.items():
        shown = shlex.quote(value) if args.shell else value
        out.write(f"{name}={shown}\n".encode("utf-8", "surrogateescape"))
    out.flush()
    return EXIT_CONFIG if error is not None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
