"""Configuration from the environment and `.env` (docs/reference.md#configuration), validated once, as one frozen object.

A real environment variable wins over `.env`. Every problem names the variable and the form it
expects, and stops the tool with exit 78 (ConfigError).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from jobrunner_lib.core.errors import ConfigError
from jobrunner_lib.core.values import (
    CHECKOUT_DIR,
    DEFAULT_JOB_LOG_LIMIT,
    LogLimit,
    Reader,
    docker_host,
    normalise_path,
    read_env,
)

# A bare host (a name, IPv4, or [IPv6]) with an optional port: the git proxy replaces github.com.
PROXY_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)
BACKEND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*[A-Za-z0-9]$")
PLACEHOLDER_TOKENS = {"token", "changeme", "change-me", "placeholder", "xxx"}
# A database name from the jobs website (`default`, `include_t1oo`, or 2021's `full`, `slice`,
# `dummy`) maps to the setting <NAME>_DATABASE_URL, so a new name needs no code change.
DATABASE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
DATABASE_URL_SUFFIX = "_DATABASE_URL"
# The names the jobs website is known to send (2021: full, slice, dummy; today: default,
# include_t1oo). Any other name works the same way.
DATABASE_NAMES = ("default", "include_t1oo", "full", "slice", "dummy")
VOLUME_STORAGES = ("auto", "host", "docker")
# The backend used for local runs on dummy data; jr's embedded mode keys its defaults off it.
LOCAL_BACKEND = "expectations"

# Upstream's check (its service.py): `cohortextractor maintenance --current-mode <mode>`, whose
# last line of output says `db-maintenance` while the database is in maintenance.
DEFAULT_MAINTENANCE_CHECK_COMMAND = "maintenance --current-mode {current_mode}"
# The databases whose URL the check is given, in order of preference (upstream: `default`).
MAINTENANCE_CHECK_DATABASES = ("default", "full")

PRODUCTION_IMAGES = (
    "ehrql",
    "databuilder",
    "cohortextractor",
    "cohortextractor-v2",
    "python",
    "r",
    "stata-mp",
    "jupyter",
    "sqlrunner",
)


@dataclass(frozen=True)
class Config:
    """Every setting jr reads, already parsed and checked."""

    backend: str = LOCAL_BACKEND
    using_dummy_data_backend: bool = True
    job_server_endpoint: str | None = None
    job_server_token: str | None = None
    poll_interval: float = 5.0
    sync_time_limit: float = 60.0
    job_loop_interval: float = 1.0
    workdir: Path = CHECKOUT_DIR / "workdir"
    high_privacy_storage_base: Path = CHECKOUT_DIR / "workdir" / "high_privacy"
    medium_privacy_storage_base: Path = CHECKOUT_DIR / "workdir" / "medium_privacy"
    stats_database_file: Path | None = None
    stats_poll_interval: float = 10.0
    debug_log_file: Path | None = None
    loglevel: str = "INFO"
    private_repo_access_token: str | None = None
    allowed_github_orgs: tuple[str, ...] = ("opensafely",)
    allow_local_repos: bool = True
    git_proxy_host: str | None = None
    git_proxy_scheme: str = "https"
    actions_base_url: str = "https://github.com/opensafely-actions"
    max_workers: float = 1.0
    job_resource_weights_file: Path = CHECKOUT_DIR / "job-resource-weights.ini"
    docker_registry: str = "jr-demo"
    allowed_images: tuple[str, ...] = ("python", "r")
    helper_image: str = "jr-busybox:latest"
    tools_image: str = "jr-tools:latest"
    pull_registry: str | None = None
    job_memory_limit: int | None = None
    job_cpu_count: float | None = None
    job_pids_limit: int = 1024
    job_user: str | None = "1000:1000"
    job_log_limit: LogLimit = DEFAULT_JOB_LOG_LIMIT
    volume_storage: str = "docker"
    volumes_path: Path | None = None
    copy_stall_timeout: float = 120.0
    worker_stall_timeout: float = 300.0
    status_refresh_interval: float = 60.0
    database_urls: Mapping[str, str] = field(default_factory=dict)
    database_network: str | None = None
    temp_database_name: str | None = None
    emis_organisation_hash: str | None = None
    presto_tls_cert: str | None = None
    presto_tls_key: str | None = None
    stata_license: str | None = None
    # The database maintenance check (jobs/maintenance.py): off without an image.
    maintenance_check_image: str | None = None
    maintenance_check_command: str = DEFAULT_MAINTENANCE_CHECK_COMMAND
    maintenance_check_interval: float = 300.0

    @property
    def secrets(self) -> tuple[str | None, ...]:
        """The settings that must never reach a log (logs.register_secret masks them)."""
        return (
            self.job_server_token,
            self.private_repo_access_token,
            *self.database_urls.values(),
        )

    @property
    def db_path(self) -> Path:
        """The main state store."""
        return self.workdir / "db.sqlite"

    @property
    def repos_dir(self) -> Path:
        """Bare study repositories, one per repo name."""
        return self.workdir / "repos"

    @property
    def temp_dir(self) -> Path:
        """Short-lived files; anything stale here is fair game for jr-prune."""
        return self.workdir / "temp"

    @property
    def volumes_dir(self) -> Path:
        """Where host-stored job volumes keep their files (VOLUME_STORAGE=host; see volumes.py)."""
        return self.volumes_path or self.workdir / "volumes"

    @property
    def run_lock_path(self) -> Path:
        """Held by whoever runs a pass of the run loop (one at a time)."""
        return self.workdir / ".run.lock"

    def job_lock_path(self, job_id: str) -> Path:
        """Held by the worker driving that job (one at a time)."""
        return self.workdir / "locks" / f"job-{job_id}.lock"

    @property
    def wake_path(self) -> Path:
        """Touched when a job ends, so the service loop passes again at once instead of sleeping."""
        return self.workdir / ".wake"

    @property
    def internal_log_file(self) -> Path:
        """Where tracebacks of internal errors are written (the one-line error names it)."""
        return self.workdir / "logs" / "internal-errors.log"

    @property
    def has_job_server(self) -> bool:
        """True when a jobs website is configured (otherwise jr runs embedded)."""
        return bool(self.job_server_endpoint)

    def image_name(self, image: str) -> str:
        """The full local name of a runtime image, e.g. `python:v2` -> `<registry>/python:v2`."""
        return f"{self.docker_registry}/{image}" if self.docker_registry else image


def load_config(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> Config:
    """Read and check every setting; raise ConfigError naming the first bad variable."""
    env = read_env(env_file, environ)
    r = Reader(env)
    backend = r.text("BACKEND", LOCAL_BACKEND)
    if not BACKEND_RE.match(backend):
        raise ConfigError(
            f"BACKEND={backend!r} is invalid: expected letters, digits, '_' or '-' "
            "(e.g. BACKEND=tpp)"
        )
    local = backend == LOCAL_BACKEND
    dummy = r.flag("USING_DUMMY_DATA_BACKEND", local)

    endpoint = r.text("JOB_SERVER_ENDPOINT")
    token = env.get("JOB_SERVER_TOKEN")
    if endpoint is not None:
        if not re.match(r"^https?://[^/\s]+", endpoint):
            raise ConfigError(
                f"JOB_SERVER_ENDPOINT={endpoint!r} is not an http(s) URL: expected e.g. "
                "JOB_SERVER_ENDPOINT=https://jobs.opensafely.org/api/v2/"
            )
        endpoint = endpoint.rstrip("/") + "/"
        # An empty token makes the website hand out every backend's work (docs/reference.md#jobs-website).
        if token is None or token.strip() == "":
            raise ConfigError(
                "JOB_SERVER_TOKEN is empty: set it to this backend's token from the jobs website"
            )
        if token.strip().lower() in PLACEHOLDER_TOKENS:
            raise ConfigError(
                "JOB_SERVER_TOKEN is still the placeholder: set it to this backend's token "
                "from the jobs website"
            )
        token = token.strip()
    else:
        token = None

    workdir = (
        r.path("WORKDIR", Path(), CHECKOUT_DIR)
        if r.text("WORKDIR")
        else (r.path("WORK_DIR", CHECKOUT_DIR / "workdir", CHECKOUT_DIR))
    )
    high = r.path("HIGH_PRIVACY_STORAGE_BASE", workdir / "high_privacy", CHECKOUT_DIR)
    medium = r.path("MEDIUM_PRIVACY_STORAGE_BASE", workdir / "medium_privacy", CHECKOUT_DIR)
    stats = r.text("STATS_DATABASE_FILE")
    debug_log = r.text("DEBUG_LOG_FILE")

    loglevel = (r.text("LOGLEVEL", "INFO") or "INFO").upper()
    if loglevel not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(
            f"LOGLEVEL={loglevel!r} is invalid: expected DEBUG, INFO, WARNING or ERROR"
        )

    orgs = tuple(
        o.strip()
        for o in (r.text("ALLOWED_GITHUB_ORGS", "opensafely") or "").split(",")
        if o.strip()
    )

    cpu_default = max(1, (os.cpu_count() or 2) - 1)
    proxy_host = r.text("GIT_PROXY_HOST", None if local else "github-proxy.opensafely.org")
    if proxy_host is not None and not PROXY_HOST_RE.fullmatch(proxy_host):
        hint = (
            f" (without the scheme: GIT_PROXY_HOST={urlsplit(proxy_host).netloc}"
            + (
                ", and GIT_PROXY_SCHEME=http for a plain-HTTP proxy)"
                if proxy_host.startswith("http:")
                else ")"
            )
            if "://" in proxy_host
            else ""
        )
        raise ConfigError(
            f"GIT_PROXY_HOST={proxy_host!r} is not a host name: expected host or host:port, "
            f"e.g. GIT_PROXY_HOST=github-proxy.opensafely.org{hint}"
        )
    proxy_scheme = (r.text("GIT_PROXY_SCHEME", "https")).lower()
    if proxy_scheme not in ("https", "http"):
        raise ConfigError(
            f"GIT_PROXY_SCHEME={proxy_scheme!r} is invalid: expected https (the default) or http"
        )

    database_urls = database_urls_from(env)
    if not dummy and not database_urls:
        raise ConfigError(
            "no database configured: a backend on real data (USING_DUMMY_DATA_BACKEND is false) "
            "needs <NAME>_DATABASE_URL for each database name the jobs website sends, "
            "e.g. DEFAULT_DATABASE_URL=mssql://..."
        )

    cert_path, key_path = r.text("PRESTO_TLS_CERT_PATH"), r.text("PRESTO_TLS_KEY_PATH")
    if bool(cert_path) != bool(key_path):
        raise ConfigError(
            "PRESTO_TLS_CERT_PATH and PRESTO_TLS_KEY_PATH must be set together (or neither)"
        )
    cert = key = None
    if cert_path and key_path:
        cert = _read_secret_file(
            "PRESTO_TLS_CERT_PATH", normalise_path(cert_path, base=CHECKOUT_DIR)
        )
        key = _read_secret_file("PRESTO_TLS_KEY_PATH", normalise_path(key_path, base=CHECKOUT_DIR))

    images_default = "python,r" if local else ",".join(PRODUCTION_IMAGES)
    allowed_images = tuple(
        i.strip() for i in (r.text("ALLOWED_IMAGES", images_default) or "").split(",") if i.strip()
    )
    if not allowed_images:
        raise ConfigError("ALLOWED_IMAGES is empty: expected a comma-separated list, e.g. python,r")

    job_user: str | None = r.text("JOB_USER", "1000:1000")
    if job_user is not None and job_user.lower() in {"image", "default"}:
        job_user = None  # run as the image's own user, for images that need it

    storage = (r.text("VOLUME_STORAGE", "auto") or "auto").lower()
    if storage not in VOLUME_STORAGES:
        raise ConfigError(f"VOLUME_STORAGE={storage!r} is invalid: expected auto, host or docker")
    if storage == "auto":
        storage = "host" if daemon_shares_files(env) else "docker"

    registry = (
        r.text("DOCKER_REGISTRY", "jr-demo" if local else "ghcr.io/opensafely-core") or ""
    ).rstrip("/")
    check_image, check_command, check_interval = _maintenance_check(
        r, registry, dummy, database_urls
    )

    return Config(
        backend=backend,
        using_dummy_data_backend=dummy,
        job_server_endpoint=endpoint,
        job_server_token=token,
        poll_interval=r.number("POLL_INTERVAL", 5.0),
        sync_time_limit=r.number("SYNC_TIME_LIMIT", 60.0, minimum=1.0),
        job_loop_interval=r.number("JOB_LOOP_INTERVAL", 1.0),
        workdir=workdir,
        high_privacy_storage_base=high,
        medium_privacy_storage_base=medium,
        stats_database_file=_stats_file(env, stats, workdir),
        stats_poll_interval=r.number("STATS_POLL_INTERVAL", 10.0, minimum=0.1),
        debug_log_file=normalise_path(debug_log, base=CHECKOUT_DIR) if debug_log else None,
        loglevel=loglevel,
        private_repo_access_token=r.text("PRIVATE_REPO_ACCESS_TOKEN"),
        allowed_github_orgs=orgs,
        allow_local_repos=r.flag("ALLOW_LOCAL_REPOS", local),
        git_proxy_host=proxy_host,
        git_proxy_scheme=proxy_scheme,
        actions_base_url=(
            r.text("ACTIONS_BASE_URL", "https://github.com/opensafely-actions") or ""
        ).rstrip("/"),
        max_workers=r.number("MAX_WORKERS", float(cpu_default), minimum=0.1),
        job_resource_weights_file=r.path(
            "JOB_RESOURCE_WEIGHTS_FILE", CHECKOUT_DIR / "job-resource-weights.ini", CHECKOUT_DIR
        ),
        docker_registry=registry,
        allowed_images=allowed_images,
        helper_image=r.text(
            "HELPER_IMAGE", "jr-busybox:latest" if local else "ghcr.io/opensafely-core/busybox"
        ),
        tools_image=r.text(
            "TOOLS_IMAGE", "jr-tools:latest" if local else "ghcr.io/opensafely-core/tools"
        ),
        pull_registry=r.text(
            "PULL_REGISTRY", None if local else "docker-proxy.opensafely.org/opensafely-core"
        ),
        job_memory_limit=r.size("JOB_MEMORY_LIMIT"),
        job_cpu_count=r.number("JOB_CPU_COUNT", 0.0) or None,
        job_pids_limit=int(r.number("JOB_PIDS_LIMIT", 1024, minimum=16)),
        job_user=job_user,
        job_log_limit=r.log_limit("JOB_LOG_LIMIT", DEFAULT_JOB_LOG_LIMIT),
        volume_storage=storage,
        volumes_path=r.path("VOLUMES_DIR", workdir / "volumes", CHECKOUT_DIR),
        copy_stall_timeout=r.number("COPY_STALL_TIMEOUT", 120.0, minimum=1.0),
        worker_stall_timeout=r.number("WORKER_STALL_TIMEOUT", 300.0, minimum=1.0),
        status_refresh_interval=r.number("STATUS_REFRESH_INTERVAL", 60.0, minimum=1.0),
        database_urls=database_urls,
        database_network=r.text("DATABASE_NETWORK"),
        temp_database_name=r.text("TEMP_DATABASE_NAME"),
        emis_organisation_hash=r.text("EMIS_ORGANISATION_HASH"),
        presto_tls_cert=cert,
        presto_tls_key=key,
        stata_license=r.text("STATA_LICENSE"),
        maintenance_check_image=check_image,
        maintenance_check_command=check_command,
        maintenance_check_interval=check_interval,
    )


def _maintenance_check(
    r: Reader, registry: str, dummy: bool, database_urls: Mapping[str, str]
) -> tuple[str | None, str, float]:
    """(image, command, interval) of the database maintenance check; no image: no check.

    Upstream's own settings work too: ENABLE_MAINTENANCE_MODE_THREAD=true runs its image
    (`<DOCKER_REGISTRY>/cohortextractor`), MAINTENANCE_POLL_INTERVAL is the interval.
    """
    image = r.text("MAINTENANCE_CHECK_IMAGE")
    if image is None and r.flag("ENABLE_MAINTENANCE_MODE_THREAD", False):
        image = f"{registry}/cohortextractor" if registry else "cohortextractor"
    command = r.text("MAINTENANCE_CHECK_COMMAND", DEFAULT_MAINTENANCE_CHECK_COMMAND)
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(
            f"MAINTENANCE_CHECK_COMMAND={command!r} cannot be split into words ({exc}): "
            f"expected e.g. MAINTENANCE_CHECK_COMMAND='{DEFAULT_MAINTENANCE_CHECK_COMMAND}'"
        ) from None
    if not words:
        raise ConfigError("MAINTENANCE_CHECK_COMMAND is empty")
    interval = r.number(
        "MAINTENANCE_CHECK_INTERVAL",
        r.number("MAINTENANCE_POLL_INTERVAL", 300.0, minimum=1.0),
        minimum=1.0,
    )
    if image is not None:
        if dummy:
            raise ConfigError(
                f"MAINTENANCE_CHECK_IMAGE={image!r} is set, but this backend has no database "
                "(USING_DUMMY_DATA_BACKEND is true): unset it, or set the backend's database"
            )
        if not any(database_urls.get(name) for name in MAINTENANCE_CHECK_DATABASES):
            raise ConfigError(
                f"MAINTENANCE_CHECK_IMAGE={image!r} needs the database to check: set "
                "DEFAULT_DATABASE_URL"
            )
    return image, command, interval


def database_urls_from(env: Mapping[str, str]) -> dict[str, str]:
    """name -> URL for every non-empty <NAME>_DATABASE_URL (the name lower-cased)."""
    found = {}
    for key, value in env.items():
        name = key[: -len(DATABASE_URL_SUFFIX)]
        if key.endswith(DATABASE_URL_SUFFIX) and DATABASE_NAME_RE.fullmatch(name) and value.strip():
            found[name.lower()] = value.strip()
    return found


def database_name_problem(name: str) -> str | None:
    """Why a database name from the jobs website cannot name a setting, or None."""
    if not DATABASE_NAME_RE.fullmatch(name or ""):
        return "it must be a letter then letters, digits or '_', at most 63 characters"
    return None


def daemon_shares_files(env: Mapping[str, str]) -> bool:
    """Whether the Docker daemon sees this machine's files: Linux, talking to a local socket.

    Docker Desktop (Windows, macOS) runs the daemon in a virtual machine, and DOCKER_HOST may
    name another machine: there a volume's files can only go through the daemon's archive API.
    """
    return sys.platform.startswith("linux") and docker_host(env).startswith("unix://")


def _stats_file(env: Mapping[str, str], value: str | None, workdir: Path) -> Path | None:
    """Stats go to `$WORKDIR/stats.sqlite` unless STATS_DATABASE_FILE names another file or `off`."""
    if value is None:
        # Set but empty means off, as the old backend read an unset variable.
        return None if "STATS_DATABASE_FILE" in env else workdir / "stats.sqlite"
    if value.lower() in ("off", "none", "false", "0"):
        return None
    return normalise_path(value, base=CHECKOUT_DIR)


def _read_secret_file(name: str, path: Path) -> str:
    """Read a file named by a setting, or fail naming the setting."""
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"{name}={str(path)!r} cannot be read ({exc.strerror}): expected an existing file"
        ) from None
