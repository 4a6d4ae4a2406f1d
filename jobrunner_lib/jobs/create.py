"""Turn a job request into jobs (docs/lifecycle.md#creating-jobs): validate, fetch, read project.yaml, decide.

Every outcome is written in one transaction: the request's jobs, or a single `__error__` job that
tells the researcher why (the protocol has no other way to reject a request), or a succeeded
"All actions have already run" job. Network trouble writes nothing: the caller retries later.
"""

from __future__ import annotations

import logging
import re
import shlex
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner_lib.core.config import Config, database_name_problem
from jobrunner_lib.core.ids import job_id
from jobrunner_lib.core.models import (
    ERROR_ACTION,
    RUN_ALL,
    Job,
    JobRequest,
    Msg,
    State,
    StatusCode,
    new_job,
)
from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.git import runner as git
from jobrunner_lib.pipeline.names import image_name_problem
from jobrunner_lib.pipeline.project import Pipeline, ProjectValidationError, load_pipeline
from jobrunner_lib.pipeline.rules import one_line
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
GITHUB_RE = re.compile(r"^https://github\.com/([^/]+)/([^/]+?)/?$")


class JobRequestError(Exception):
    """The request cannot be run as asked; becomes an `__error__` job with this message."""


class UnknownActionError(JobRequestError):
    """A requested action is not in project.yaml."""


class ReusableActionError(JobRequestError):
    """A reusable action could not be resolved."""


class StaleCodelistError(JobRequestError):
    """The website says the workspace's codelists are out of date and a database action would
    run: the whole request fails (status code stale_codelists), as the upstream runner does."""


class RetryLater(Exception):
    """Network trouble (git): nothing was written; try the request again on a later pass."""


@dataclass
class Outcome:
    """What handling one request did."""

    jobs: list[Job]
    error: str | None = None
    created: bool = True


def validate_request(config: Config, request: JobRequest) -> None:
    """The request-level checks that need no network (docs/lifecycle.md#creating-jobs)."""
    url = request.repo_url
    if git_repos.is_local_repo(url):
        if not config.allow_local_repos:
            raise JobRequestError(
                f"Repository {url} is a local path, which this backend does not allow "
                "(set ALLOW_LOCAL_REPOS=true to allow it)"
            )
    else:
        m = GITHUB_RE.match(url)
        if not m:
            raise JobRequestError(
                f"Repository URL was not of the expected format: {url} "
                "(expected https://github.com/<org>/<repo>)"
            )
        if m.group(1) not in config.allowed_github_orgs:
            raise JobRequestError(
                f"Repositories can only be accessed from the following organisations: "
                f"{', '.join(config.allowed_github_orgs)}"
            )
        if not request.branch or "/" in request.branch:
            raise JobRequestError(
                f"Branch name must not be empty or contain '/': {request.branch!r}"
            )
    if not request.requested_actions:
        raise JobRequestError("At least one action must be supplied")
    if not request.workspace.strip() or not WORKSPACE_RE.match(request.workspace):
        raise JobRequestError(
            f"Invalid workspace name (allowed are alphanumeric, dash and underscore): "
            f"{request.workspace!r}"
        )
    problem = database_name_problem(request.database_name)
    if problem and not config.using_dummy_data_backend:
        raise JobRequestError(f"Database name {request.database_name!r} is invalid: {problem}")
    if not config.using_dummy_data_backend:
        if request.database_name.lower() not in config.database_urls:
            raise JobRequestError(
                f"Database name {request.database_name!r} is not currently defined for "
                f"backend {config.backend!r}"
            )


def handle_request(config: Config, conn: sqlite3.Connection, request: JobRequest) -> Outcome:
    """Create the request's jobs exactly once; a repeat of the same request creates nothing."""
    if db_queries.request_exists(conn, request.id):
        return Outcome(db_queries.jobs_for_request(conn, request.id), created=False)
    try:
        jobs = plan_jobs(config, conn, request)
        error = None
    except (git.GitNetworkError, RetryLater) as exc:
        raise RetryLater(str(exc)) from exc
    except StaleCodelistError as exc:
        error = str(exc)
        jobs = [_error_job(request, error, StatusCode.STALE_CODELISTS)]
    except (JobRequestError, ProjectValidationError, git.GitError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        jobs = [_error_job(request, error)]
    except Exception:  # noqa: BLE001 - a bug must not stop other requests; the user sees a short reason
        log.exception("Uncaught error while creating jobs", extra={"req": request.id})
        error = "JobRequestError: Internal error"
        jobs = [_error_job(request, error)]
    record_jobs(conn, request, jobs, error)
    return Outcome(jobs, error=error)


def record_jobs(
    conn: sqlite3.Connection, request: JobRequest, jobs: list[Job], error: str | None = None
) -> None:
    """Write the request and its jobs in one transaction, flag cancelled actions, and log it."""
    db_queries.insert_request(conn, request, jobs)
    if request.cancelled_actions:
        db_queries.set_cancelled(conn, request.id, request.cancelled_actions)
    if error:
        log.info("JobRequest failed:\n%s", error, extra={"req": request.id})
    else:
        created = [j for j in jobs if j.status_message != Msg.ALREADY_RAN]
        log.info("Created %d new jobs", len(created), extra={"req": request.id})


def _error_job(request: JobRequest, message: str, code: StatusCode | None = None) -> Job:
    return new_job(
        job_id(request.id, ERROR_ACTION), request, ERROR_ACTION, State.FAILED, code, message
    )


def load_project(config: Config, request: JobRequest) -> tuple[Pipeline, Path]:
    """Fetch the request's commit and parse its project.yaml (raises GitError/ProjectValidationError)."""
    repo_dir = fetch(config, request.repo_url, request.commit or "")
    text = git_repos.read_file(repo_dir, request.commit or "", "project.yaml")
    if text is None:
        raise JobRequestError(f"No project.yaml file found in {request.repo_url}")
    return load_pipeline(text, "project.yaml"), repo_dir


def fetch(config: Config, repo_url: str, commit: str) -> Path:
    """ensure_commit with this backend's credentials and proxy."""
    if not re.fullmatch(r"[0-9a-f]{40}", commit or ""):
        raise JobRequestError(f"Commit {commit!r} is not a full 40-character sha")
    return git_repos.ensure_commit(
        repo_url,
        commit,
        repos_dir=config.repos_dir,
        access=git_repos.Access.for_repo(config, repo_url),
    )


def plan_jobs(config: Config, conn: sqlite3.Connection, request: JobRequest) -> list[Job]:
    """Decide the request's jobs (docs/lifecycle.md#creating-jobs), without writing anything."""
    if request.problem:
        raise JobRequestError(
            f"The jobs website sent a request jr cannot run: {request.problem}; "
            "check the workspace on the website (its repository, branch and database)"
        )
    validate_request(config, request)
    pipeline, _repo_dir = load_project(config, request)
    if not git_repos.is_local_repo(request.repo_url) and request.branch:
        if not git_repos.commit_reachable_from(
            request.repo_url,
            request.commit or "",
            request.branch,
            repos_dir=config.repos_dir,
            access=git_repos.Access.for_repo(config, request.repo_url),
        ):
            raise JobRequestError(
                f"Could not find commit {request.commit} on branch {request.branch}"
            )
    run_all = RUN_ALL in request.requested_actions
    targets = pipeline.all_actions() if run_all else list(dict.fromkeys(request.requested_actions))
    for action in targets:
        if action not in pipeline.actions:
            # the name comes from the jobs website: escaped, it cannot forge a line in the log
            raise UnknownActionError(f"Action '{one_line(action, 100)}' not found in project.yaml")
    # run_all means "everything not already done": its actions are not explicitly requested, so
    # succeeded ones are reused and failed ones re-run (the old runner refused: docs/reference.md#the-old-backend).
    requested = set() if run_all else set(targets)
    latest = db_queries.latest_jobs_by_action(conn, request.workspace)
    decided: dict[str, Job] = {}
    new_jobs: list[Job] = []
    # Each reusable action resolved once per name and tag in a request, however many actions
    # use it (a real study runs one action 589 times): a few git calls, not a thousand.
    reusable: ReusableCache = {}
    at = None

    def visit(action: str) -> Job:
        nonlocal at
        if action in decided:
            return decided[action]
        spec = pipeline.actions[action]
        deps = [visit(dep) for dep in spec.needs]
        previous = latest.get(action)
        rerun = action in requested or request.force_run_dependencies
        if previous is not None and (
            previous.state in (State.PENDING, State.RUNNING)
            or (not rerun and previous.state is State.SUCCEEDED)
            or (not rerun and not run_all and previous.state is State.FAILED)
        ):
            decided[action] = previous
            return previous
        job = _new_action_job(config, pipeline, request, action, deps, reusable)
        at = job.created_at if at is None else at
        job.created_at = job.updated_at = at
        decided[action] = job
        new_jobs.append(job)
        return job

    for action in targets:
        visit(action)
    if not request.codelists_ok:
        for job in new_jobs:
            if pipeline.actions[job.action].is_database_action:
                raise StaleCodelistError(
                    f"Codelists are out of date (required by action {one_line(job.action, 100)}): "
                    "update them (opensafely codelists update), commit, and run the request again"
                )
    if not new_jobs:
        # Nothing to do is a success, as the upstream runner answers it (a job of the first
        # requested action, running nothing): everything already ran, or is already scheduled.
        done = all(decided[a].state is State.SUCCEEDED for a in targets)
        first = request.requested_actions[0]
        return [
            new_job(
                job_id(request.id, first),
                request,
                first,
                State.SUCCEEDED,
                StatusCode.SUCCEEDED,
                Msg.ALREADY_RAN if done else Msg.ALREADY_SCHEDULED,
            )
        ]
    return new_jobs


def _new_action_job(
    config: Config,
    pipeline: Pipeline,
    request: JobRequest,
    action: str,
    deps: list[Job],
    reusable: ReusableCache | None = None,
) -> Job:
    """A new job for one action: its command, inputs and what it waits for."""
    spec = pipeline.actions[action]
    failed = [d for d in deps if d.state is State.FAILED]
    waits = [d.id for d in deps if d.state in (State.PENDING, State.RUNNING)]
    action_repo = action_commit = None
    args = list(spec.command_args())
    image = f"{spec.image}:{spec.tag}"
    if spec.image not in config.allowed_images:
        image, args, action_repo, action_commit = resolve_reusable_action(
            config, action, spec.image, spec.tag, args, reusable
        )
    args = _cohort_args(config, pipeline, spec, args)
    fields: dict[str, Any] = dict(
        requires_outputs_from=list(spec.needs),
        wait_for_job_ids=waits,
        run_command=shlex.join([image, *args]),
        output_spec={k: dict(v) for k, v in spec.outputs.items()},
        action_repo_url=action_repo,
        action_commit=action_commit,
        requires_db=bool(spec.is_database_action) and not config.using_dummy_data_backend,
    )
    jid = job_id(request.id, action)
    if failed:
        names = ", ".join(f"{d.action} ({d.id})" for d in failed)
        return new_job(
            jid,
            request,
            action,
            State.FAILED,
            StatusCode.DEPENDENCY_FAILED,
            f"{Msg.DEPENDENCY_FAILED}: {names} failed; request it again to re-run it",
            **fields,
        )
    code, message = (
        (StatusCode.WAITING_ON_DEPENDENCIES, Msg.WAITING_ON_DEPENDENCIES)
        if waits
        else (StatusCode.CREATED, Msg.CREATED)
    )
    return new_job(jid, request, action, State.PENDING, code, message, **fields)


def _cohort_args(config: Config, pipeline: Pipeline, spec, args: list[str]) -> list[str]:
    """Dummy-data arguments for cohort extraction on a dummy-data backend (docs/pipeline.md#commands)."""
    if not (spec.image.startswith("cohortextractor") and args[:1] == ["generate_cohort"]):
        return args
    if config.using_dummy_data_backend:
        if spec.dummy_data_file:
            args = [*args, f"--dummy-data-file={spec.dummy_data_file}"]
        elif pipeline.population_size is not None:
            args = [*args, f"--expectations-population={pipeline.population_size}"]
    if not any(a.startswith("--output-dir") for a in args):
        dirs = {str(Path(p).parent) for paths in spec.outputs.values() for p in paths.values()}
        if len(dirs) == 1:
            args = [*args, f"--output-dir={dirs.pop()}"]
    return args


# (name, tag) of a reusable action -> (its command's words, repo url, commit).
ReusableCache = dict[tuple[str, str], tuple[list[str], str, str]]


def resolve_reusable_action(
    config: Config,
    action: str,
    image: str,
    tag: str,
    user_args: list[str],
    cache: ReusableCache | None = None,
) -> tuple[str, list[str], str, str]:
    """Resolve `<image>:<tag>` as a reusable action (docs/pipeline.md#reusable-actions): (image, args, repo url, commit).

    With a cache (one per request), each name and tag is looked up over the network once.
    """
    if cache is not None and (image, tag) in cache:
        words, repo_url, commit = cache[(image, tag)]
    else:
        words, repo_url, commit = _resolve_reusable(config, action, image, tag)
        if cache is not None:
            cache[(image, tag)] = (words, repo_url, commit)
    return words[0], [*words[1:], *user_args], repo_url, commit


def _resolve_reusable(
    config: Config, action: str, image: str, tag: str
) -> tuple[list[str], str, str]:
    """The command words of a reusable action's action.yaml, its repo url and commit."""
    where = f"in '{one_line(action, 100)}: {one_line(image, 60)}:{one_line(tag, 20)}'"
    # Before the URL is built: git would resolve `../other/act` to outside ACTIONS_BASE_URL.
    problem = image_name_problem(image)
    if problem:
        raise ReusableActionError(
            f"{where}: `{one_line(image, 60)}` is not a valid reusable action name: {problem}"
        )
    repo_url = f"{config.actions_base_url}/{image}"
    access = git_repos.Access.for_repo(config, repo_url)
    try:
        commit = git_repos.tag_commit(repo_url, tag, access=access)
        repo_dir = fetch(config, repo_url, commit)
        on_main = git_repos.commit_reachable_from(
            repo_url, commit, "main", repos_dir=config.repos_dir, access=access
        )
    except git.GitNetworkError:
        raise
    except git.GitError as exc:
        raise ReusableActionError(
            f"{where}: cannot find tag {tag} of {repo_url} ({exc}); is "
            f"'{image}' a known image ({', '.join(config.allowed_images)})?"
        ) from None
    if not on_main:
        raise ReusableActionError(f"{where}: tag {tag} has not been merged into the main branch")
    text = git_repos.read_file(repo_dir, commit, "action.yaml")
    if text is None:
        raise ReusableActionError(f"{where}: there is no action.yaml in {repo_url} at {tag}")
    import yaml

    try:
        data = yaml.safe_load(text)
        run = data["run"]
        words = shlex.split(run)
    except Exception:  # noqa: BLE001 - any malformed action.yaml gets the same clear message
        raise ReusableActionError(
            f"{where}: action.yaml must be a mapping with a 'run' command"
        ) from None
    inner_image = words[0].split(":", 1)[0] if words else ""
    if inner_image not in config.allowed_images:
        raise ReusableActionError(
            f"{where}: the action's image {words[0] if words else ''!r} is not one of "
            f"{', '.join(config.allowed_images)}"
        )
    if inner_image.startswith("cohortextractor") and words[1:2] == ["generate_cohort"]:
        raise ReusableActionError(f"{where}: re-usable actions cannot invoke cohortextractor")
    return words, repo_url, commit
