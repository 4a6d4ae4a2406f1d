"""Study repos: fetch single commits into local bare repos and read code out of them.

Each repo gets a bare repo `repos_dir/<name>.git` holding only the commits jobs asked for
(depth 1, no branches, no tags except our own `fetched/<sha>` markers).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from jobrunner_lib.git.runner import GitError, GitNetworkError, _git, _git_stream, _Result, mask

if TYPE_CHECKING:
    from jobrunner_lib.core.config import Config

log = logging.getLogger(__name__)

# Injectable so tests can check the back-off without sleeping.
_sleep: Callable[[float], None] = time.sleep

ATTEMPTS = 5
# Archives up to this size are kept in memory, per process, for the jobs that follow.
ARCHIVE_CACHE_BYTES = 16 * 2**20
_archives: dict[tuple[str, str], bytes] = {}
FETCHED_TAG_PREFIX = "refs/tags/fetched/"
# git's magic number for "all of history" (see git's Documentation/technical/shallow.txt).
_FULL_DEPTH = 2147483647
_SHA_RE = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
# stderr of git/curl that means "network trouble, retry later" rather than "no such commit".
_NETWORK_ERRORS = re.compile(
    r"GnuTLS recv error|SSL_read: Connection was reset|Connection refused|Connection reset"
    r"|Couldn't connect to server|Failed to connect to|unable to connect to|Could not resolve host"
    r"|unable to look up|timed out|Operation too slow|RPC failed; curl"
    r"|The requested URL returned error: 50[234]",
    re.IGNORECASE,
)


def repo_name(repo_url: str) -> str:
    """Name of the local bare repo for a URL or path: its last segment without `.git`."""
    name = re.split(r"[/\\]", repo_url.rstrip("/\\"))[-1]
    name = name.removesuffix(".git")
    # scp-like "host:repo" has no slash before the name
    name = name.rsplit(":", 1)[-1]
    if name in ("", ".", ".."):
        raise GitError(f"Cannot name a local repo for {mask(repo_url)}")
    return name


def fetch_url(repo_url: str, proxy_host: str | None, proxy_scheme: str = "https") -> str:
    """URL to fetch from: `https://github.com/...` goes through the proxy host when one is set
    (over plain HTTP only where GIT_PROXY_SCHEME=http says so)."""
    parts = urlsplit(repo_url)
    if proxy_host and parts.scheme == "https" and parts.hostname == "github.com":
        return urlunsplit(parts._replace(scheme=proxy_scheme, netloc=proxy_host))
    if _is_local(repo_url):
        # git runs elsewhere (in the bare repo), so relative paths must be made absolute
        return str(Path(repo_url).resolve())
    return repo_url


def _basic_auth(user: str, token: str) -> str:
    return base64.b64encode(f"{user}:{token}".encode()).decode()


def _is_local(repo_url: str) -> bool:
    if "://" in repo_url:
        return False
    first = re.split(r"[/\\]", repo_url)[0]
    # "host:path" is scp-like ssh; "C:" is a Windows drive
    return ":" not in first or os.path.isabs(repo_url)


def _auth_env(
    fetch_url: str, token: str | None, backend: str, proxy_host: str | None
) -> dict[str, str]:
    """Environment that gives git our token, only for https to the proxy host (never in clear
    over a plain-HTTP proxy)."""
    parts = urlsplit(fetch_url)
    if not (token and proxy_host and parts.scheme == "https" and parts.netloc == proxy_host):
        return {}
    return _header_env(f"https://{proxy_host}/", f"jobrunner-{backend}", token)


def _header_env(url_prefix: str, user: str, token: str) -> dict[str, str]:
    # Config from the environment stays out of the process list (unlike `-c` or a URL) and the
    # url-scoped key means git sends it to no other host.
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"http.{url_prefix}.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {_basic_auth(user, token)}",
    }


def _repo_git(repo_dir: Path, *args: str) -> _Result:
    # An explicit --git-dir stops git from walking up into an enclosing checkout.
    return _git(f"--git-dir={repo_dir}", *args)


def _check_sha(commit: str) -> None:
    # Also keeps anything option-like off git's command line.
    if not _SHA_RE.fullmatch(commit):
        raise GitError(f"'{commit}' is not a full commit SHA")


def _has_tag(repo_dir: Path, commit: str) -> bool:
    if not (repo_dir / "HEAD").exists():
        return False
    if _has_loose_tag(repo_dir, commit):
        return True
    result = _repo_git(repo_dir, "rev-parse", "-q", "--verify", FETCHED_TAG_PREFIX + commit)
    return result.returncode == 0


def _has_loose_tag(repo_dir: Path, commit: str) -> bool:
    """The marker as a loose ref file: the cheap look (no git process) that suffices most times.

    Only written (by update-ref) once the commit is fetched; a gc may pack it, so its absence
    proves nothing and the caller asks git.
    """
    return (repo_dir / FETCHED_TAG_PREFIX / commit).is_file()


def _lock(repos_dir: Path, name: str):  # -> filelock.FileLock
    import filelock  # slow to import; only fetching needs it

    repos_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(repos_dir / f"{name}.git.lock"))


def _init(repo_dir: Path) -> None:
    # Re-running init is harmless, and repairs a repo whose first init was interrupted.
    result = _git("init", "--bare", "--quiet", "--template=", str(repo_dir))
    if result.returncode != 0:
        raise GitError(f"Cannot create {repo_dir}: {result.stderr.decode(errors='replace')}")
    # Highest-precedence attributes: `git archive` must give every file exactly as committed,
    # like a checkout, whatever export-ignore/export-subst the study's .gitattributes says.
    attributes = repo_dir / "info" / "attributes"
    if not attributes.exists():
        attributes.parent.mkdir(exist_ok=True)
        attributes.write_text("* -export-ignore -export-subst\n")


@dataclass(frozen=True)
class Access:
    """How to reach remote repos: the token (hosted repos only), the backend, proxy, retry pace."""

    token: str | None = None
    backend: str = "expectations"
    proxy_host: str | None = None
    retry_delay: float = 4.0
    proxy_scheme: str = "https"

    @classmethod
    def for_repo(cls, config: Config, repo_url: str) -> Access:
        """This backend's access to repo_url: its token only for hosted repos, its proxy."""
        token = None if is_local_repo(repo_url) else config.private_repo_access_token
        return cls(
            token, config.backend, config.git_proxy_host, proxy_scheme=config.git_proxy_scheme
        )


def is_local_repo(repo_url: str) -> bool:
    """A path or file:// URL (embedded mode and tests), as opposed to a hosted repository."""
    return repo_url.startswith("file://") or "://" not in repo_url


@dataclass
class _Remote:
    """A remote repo and how to reach it (proxy, token, retries)."""

    repo_url: str
    access: Access

    @property
    def token(self) -> str | None:
        return self.access.token

    @property
    def proxy_host(self) -> str | None:
        return self.access.proxy_host

    @property
    def url(self) -> str:
        return fetch_url(self.repo_url, self.proxy_host, self.access.proxy_scheme)

    @property
    def shown(self) -> str:
        return mask(self.repo_url, self.token)

    def run(self, *args: str, error: str) -> _Result:
        """Run git against the remote, retrying network trouble with back-off."""
        env = _auth_env(self.url, self.token, self.access.backend, self.proxy_host)
        for attempt in range(1, ATTEMPTS + 1):
            result = _git(*args, env=env)
            if result.returncode == 0:
                return result
            detail = mask(result.stderr.decode(errors="replace").strip(), self.token)
            log.warning("%s (attempt %d/%d): %s", error, attempt, ATTEMPTS, detail)
            if not _NETWORK_ERRORS.search(detail):
                raise GitError(error)
            if attempt < ATTEMPTS:
                _sleep(self.access.retry_delay * 2 ** (attempt - 1))
        raise GitNetworkError(f"{error} (network error; this may work if you try again later)")

    def ls(self, *patterns: str) -> dict[str, str]:
        """Remote refs matching the patterns, as {ref: sha}."""
        result = self.run(
            "ls-remote", "--quiet", "--", self.url, *patterns,
            error=f"Could not read from {self.shown}",
        )  # fmt: skip
        lines = result.stdout.decode().splitlines()
        return {ref: sha for sha, _, ref in (line.partition("\t") for line in lines)}

    def fetch(self, repo_dir: Path, commit: str, depth: int) -> None:
        """Fetch one commit (and `depth`-1 ancestors) into repo_dir and mark it fetched."""
        log.info("Fetching commit %s from %s (depth %d)", commit, self.shown, depth)
        self.run(
            f"--git-dir={repo_dir}", "fetch", "--no-tags", "--no-recurse-submodules",
            f"--depth={depth}", "--", self.url, commit,
            error=f"Error fetching commit {commit} from {self.shown}",
        )  # fmt: skip
        # Written only after a complete fetch: an interrupted one leaves no tag and is redone.
        tag = _repo_git(repo_dir, "update-ref", FETCHED_TAG_PREFIX + commit, commit)
        if tag.returncode != 0:
            raise GitError(f"Cannot tag {commit} in {repo_dir}: {tag.stderr.decode()}")


def ensure_commit(
    repo_url: str,
    commit: str,
    *,
    repos_dir: Path,
    access: Access = Access(),
) -> Path:
    """Make sure `commit` is in the local bare repo (no network if already fetched); return it."""
    _check_sha(commit)
    name = repo_name(repo_url)
    repo_dir = Path(repos_dir) / f"{name}.git"
    if _has_tag(repo_dir, commit):
        return repo_dir
    with _lock(Path(repos_dir), name):
        if not _has_tag(repo_dir, commit):  # another process may have fetched it meanwhile
            _init(repo_dir)
            _Remote(repo_url, access).fetch(repo_dir, commit, 1)
    return repo_dir


def resolve_ref(
    repo_url: str,
    ref: str,
    *,
    access: Access = Access(),
) -> str:
    """The commit sha a remote branch or tag (or HEAD) points at."""
    remote = _Remote(repo_url, access)
    refs = remote.ls(ref, f"{ref}^{{}}")
    # A peeled annotated tag (`^{}`) is the commit; the tag itself is a tag object.
    for candidate in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"):
        if candidate in refs:
            return refs[candidate]
    raise GitError(f"Could not find ref '{ref}' in {remote.shown}")


def tag_commit(
    repo_url: str,
    tag: str,
    *,
    access: Access = Access(),
) -> str:
    """The commit a remote tag points at (for reusable actions); GitError if no such tag."""
    remote = _Remote(repo_url, access)
    ref = f"refs/tags/{tag}"
    refs = remote.ls(ref, f"{ref}^{{}}")
    sha = refs.get(f"{ref}^{{}}") or refs.get(ref)
    if sha is None:
        raise GitError(f"Could not find tag '{tag}' in {remote.shown}")
    return sha


def commit_reachable_from(
    repo_url: str,
    commit: str,
    branch: str,
    *,
    repos_dir: Path,
    access: Access = Access(),
) -> bool:
    """Whether `commit` is in the history of the remote `branch` (fetching only that branch)."""
    _check_sha(commit)
    remote = _Remote(repo_url, access)
    head = remote.ls(f"refs/heads/{branch}").get(f"refs/heads/{branch}")
    if head is None:
        raise GitError(f"Could not find branch '{branch}' in {remote.shown}")
    if head == commit:  # the usual case: the request is for the branch head
        return True
    name = repo_name(repo_url)
    repo_dir = Path(repos_dir) / f"{name}.git"
    with _lock(Path(repos_dir), name):
        _init(repo_dir)
        # Usually a recent commit, so try the last few first; the full history can be big.
        for depth in (10, _FULL_DEPTH):
            remote.fetch(repo_dir, head, depth)
            if _repo_git(repo_dir, "merge-base", "--is-ancestor", commit, head).returncode == 0:
                return True
    return False


def read_file(repo_dir: Path, commit: str, path: str) -> bytes | None:
    """Contents of `path` at `commit` in a local repo; None if there is no such file there."""
    _check_sha(commit)
    if not _has_loose_tag(repo_dir, commit):  # with the marker the commit is known to be there
        _check_commit_present(repo_dir, commit)
    # The argument starts with the sha, so a path can never be taken for an option.
    result = _repo_git(repo_dir, "cat-file", "blob", f"{commit}:{path}")
    return result.stdout if result.returncode == 0 else None


def archive(repo_dir: Path, commit: str) -> IO[bytes]:
    """A stream of `git archive --format=tar` of `commit`; the caller must close it.

    A small archive is kept in memory (a commit's tree never changes): a worker drives many jobs
    of one request, and their code then comes from git once, not once a job.
    """
    _check_sha(commit)
    key = (str(repo_dir), commit)
    if key in _archives:
        return io.BytesIO(_archives[key])
    if not _has_loose_tag(repo_dir, commit):  # with the marker the commit is known to be there
        _check_commit_present(repo_dir, commit)
    stream = _git_stream(f"--git-dir={repo_dir}", "archive", "--format=tar", commit)
    try:
        head = stream.read(ARCHIVE_CACHE_BYTES + 1)  # all of it, or more than we keep
    except BaseException:
        stream.close()
        raise
    if len(head) > ARCHIVE_CACHE_BYTES:
        return io.BufferedReader(_Prefixed(head, stream))
    stream.close()  # at its end: git's exit status has been checked
    if sum(map(len, _archives.values())) + len(head) > ARCHIVE_CACHE_BYTES:
        _archives.clear()
    _archives[key] = head
    return io.BytesIO(head)


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self._head, self._rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(buffer)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._rest.close()
        super().close()


def _check_commit_present(repo_dir: Path, commit: str) -> None:
    _check_sha(commit)
    if _repo_git(repo_dir, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise GitError(f"Commit {commit} is not in {repo_dir}")
