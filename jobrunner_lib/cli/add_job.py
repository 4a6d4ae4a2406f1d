"""jr-add-job: submit a job request locally, without a jobs website (also a project.yaml validator)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from jobrunner_lib.core.errors import OperationFailed, TemporaryFailure, UsageError
from jobrunner_lib.core.ids import new_request_id
from jobrunner_lib.core.models import RUN_ALL, JobRequest, iso
from jobrunner_lib.core.values import user_name
from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.git import runner as git
from jobrunner_lib.jobs.create import (
    JobRequestError,
    RetryLater,
    plan_jobs,
    record_jobs,
)
from jobrunner_lib.pipeline.project import ProjectValidationError

from .common import Context, Tool, run_tool

COLUMNS = ["id", "request", "workspace", "action", "state", "status_code", "status_message"]


class AddJob(Tool):
    name = "jr-add-job"
    component = "add"
    description = (
        "Create a job request for a study repo (a local path or URL) and the actions to run; "
        "prints the new jobs. With --dry-run, only validates project.yaml and shows the plan."
    )
    epilog = """examples:
  jr-add-job . run_all                         every action of the study in the current directory
  jr-add-job ~/studies/covid --branch main model report
  jr-add-job . run_all -o ids | jr-ls -        submit, then list what was created
  jr-add-job --dry-run .                       validate project.yaml (exit 1 listing every problem)"""
    output = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("repo", metavar="REPO", help="study repository: a local path or a URL")
        parser.add_argument(
            "actions",
            nargs="*",
            metavar="ACTION",
            default=[],
            help=f"actions to run (default: {RUN_ALL})",
        )
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--commit", metavar="SHA", help="full commit sha to run")
        where.add_argument(
            "--branch", metavar="NAME", help="run the head of this branch (default: HEAD)"
        )
        parser.add_argument(
            "--workspace", default="test", metavar="NAME", help="output workspace (default: test)"
        )
        parser.add_argument(
            "--database",
            default="dummy",
            metavar="NAME",
            help="full, slice or dummy (default: dummy)",
        )
        parser.add_argument(
            "-f",
            "--force-run-dependencies",
            action="store_true",
            help="re-run every dependency even if it already succeeded",
        )
        parser.add_argument(
            "-n", "--dry-run", action="store_true", help="validate and show the plan; write nothing"
        )

    def run(self, ctx: Context) -> int:
        args, config = ctx.args, ctx.config
        assert config is not None
        repo_url = self.repo_url(args.repo)
        branch = args.branch or "HEAD"
        try:
            commit = args.commit or git_repos.resolve_ref(
                repo_url, branch, access=git_repos.Access.for_repo(config, repo_url)
            )
        except git.GitNetworkError as exc:
            raise TemporaryFailure(f"cannot reach {repo_url}: {exc}") from None
        except git.GitError as exc:
            raise OperationFailed(f"cannot find {branch!r} in {repo_url}: {exc}") from None
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise UsageError(f"--commit {commit!r}: give the full 40-character sha")
        actions = args.actions or [RUN_ALL]
        request_id = new_request_id()
        user = user_name()
        original = {
            "identifier": request_id,
            "sha": commit,
            "requested_actions": actions,
            "cancelled_actions": [],
            "force_run_dependencies": args.force_run_dependencies,
            "backend": config.backend,
            "created_by": user,
            "created_at": iso(time.time()),
            "database_name": args.database,
            "workspace": {
                "name": args.workspace,
                "repo": repo_url,
                "branch": branch,
                "db": args.database,
            },
        }
        request = JobRequest(
            id=request_id,
            repo_url=repo_url,
            commit=commit,
            branch=branch,
            requested_actions=actions,
            cancelled_actions=[],
            workspace=args.workspace,
            database_name=args.database,
            force_run_dependencies=args.force_run_dependencies,
            created_by=user,
            original=original,
        )
        try:
            jobs = plan_jobs(config, ctx.conn, request)
        except (git.GitNetworkError, RetryLater) as exc:
            raise TemporaryFailure(f"cannot fetch {repo_url}: {exc}") from None
        except ProjectValidationError as exc:
            errors = getattr(exc, "errors", None) or [str(exc)]
            for line in errors:
                ctx.stderr.write(f"{line}\n")
            raise OperationFailed(
                f"{args.repo}: project.yaml is invalid ({len(errors)} problem"
                f"{'s' if len(errors) != 1 else ''}); nothing was submitted"
            ) from None
        except (JobRequestError, git.GitError) as exc:
            raise OperationFailed(f"{type(exc).__name__}: {exc}") from None
        if not args.dry_run:
            record_jobs(ctx.conn, request, jobs)
        else:
            ctx.say(f"dry run: project.yaml is valid; {len(jobs)} job(s) would be created")
        rows = [
            {
                "id": j.id,
                "request": j.job_request_id,
                "workspace": j.workspace,
                "action": j.action,
                "state": j.state.value,
                "status_code": j.status_code.value if j.status_code else "",
                "status_message": j.status_message or "",
            }
            for j in jobs
        ]
        ctx.emit(rows, COLUMNS)
        return 0

    @staticmethod
    def repo_url(repo: str) -> str:
        """A local path becomes absolute (so the job can find it later); URLs pass through."""
        if git_repos.is_local_repo(repo) and not repo.startswith("file://"):
            path = Path(repo).expanduser().resolve()
            if not path.exists():
                raise UsageError(f"repository {repo!r} does not exist")
            return str(path)
        return repo


def main() -> None:
    """Entry point."""
    run_tool(AddJob)
