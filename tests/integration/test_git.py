"""runner.py and repos.py against real git and real repos made here, with both process runners."""

import base64
import dataclasses
import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobrunner_lib.core.config import load_config
from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.git import runner as git

TOKEN = "tok-SECRET-0123456789abcdef"
MISSING_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True, params=["sh", "subprocess"])
def backend(request, monkeypatch):
    """Run every test with the `sh` runner and with the plain subprocess fallback."""
    if request.param == "sh":
        pytest.importorskip("sh")
    monkeypatch.setattr(git, "_USE_SH", request.param == "sh")
    # Neither the user's nor the system's git config may change what these tests see.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return request.param


def run(*args, cwd=None, input=None) -> str:
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(
        ["git", *args], cwd=cwd, input=input, env=env, check=True, capture_output=True
    ).stdout.decode()


def _fast_import_stream() -> bytes:
    """50 commits: main (30), feature off main's 20th (10), other off main's 6th (10); tags."""
    out = []

    def blob(path, content):
        data = content.encode()
        out.append(f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n")

    def commit(ref, mark, parent, files):
        msg = f"commit {mark}".encode()
        out.append(f"commit {ref}\nmark :{mark}\n".encode())
        out.append(f"committer A <a@example.com> {1600000000 + mark} +0000\n".encode())
        out.append(f"data {len(msg)}\n".encode() + msg + b"\n")
        if parent:
            out.append(f"from :{parent}\n".encode())
        for path, content in files.items():
            blob(path, content)

    for i in range(1, 31):
        files = {"project.yaml": f"version: '3.0'\n# {i}\n", f"analysis/step{i % 4}.py": f"{i}\n"}
        if i == 1:
            files |= {".gitattributes": "secret.txt export-ignore\n", "secret.txt": "kept\n"}
        if i == 30:  # more than a pipe buffer, to test closing an archive stream early
            files["data/big.txt"] = "0123456789abcdef\n" * 40000
        commit("refs/heads/main", i, i - 1, files)
    for i in range(31, 41):
        commit("refs/heads/feature", i, 20 if i == 31 else i - 1, {f"feature/{i}.txt": "f\n"})
    for i in range(41, 51):
        commit("refs/heads/other", i, 6 if i == 41 else i - 1, {f"other/{i}.txt": "o\n"})
    tag_msg = b"release"
    out.append(b"tag v1.0\nfrom :25\ntagger A <a@example.com> 1600000100 +0000\n")
    out.append(f"data {len(tag_msg)}\n".encode() + tag_msg + b"\n")
    out.append(b"reset refs/tags/light\nfrom :15\n\n")
    return b"".join(out)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study repo with 50 commits on three branches (read-only: copy it to change it)."""
    path = tmp_path_factory.mktemp("remote") / "study"
    run("init", "--quiet", "--initial-branch=main", str(path))
    run("fast-import", "--quiet", cwd=path, input=_fast_import_stream())
    return path


def sha(repo: Path, rev: str) -> str:
    return run("rev-parse", f"{rev}^{{commit}}", cwd=repo).strip()


def objects_in(repo: Path) -> set[str]:
    return set(
        run("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", cwd=repo).split()
    )


def objects_of_one_commit(repo: Path, commit: str) -> set[str]:
    """The commit, its root tree and every tree and blob below it."""
    root = run("rev-parse", f"{commit}^{{tree}}", cwd=repo).strip()
    entries = run("ls-tree", "-r", "-t", "--format=%(objectname)", commit, cwd=repo).split()
    return {commit, root, *entries}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ensure_commit_fetches_only_that_commits_objects(study, tmp_path):
    commit = sha(study, "main~7")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path / "repos")

    assert repo == tmp_path / "repos" / "study.git"
    assert objects_in(repo) == objects_of_one_commit(study, commit)
    assert len(objects_in(repo)) < len(objects_in(study)) / 3
    assert run("for-each-ref", "--format=%(refname)", cwd=repo).split() == [
        f"refs/tags/fetched/{commit}"
    ]


def test_fetched_commit_needs_no_remote(study, tmp_path):
    remote = tmp_path / "remote" / "study"
    shutil.copytree(study, remote)
    commit = sha(remote, "feature")
    repos = tmp_path / "repos"
    repo = git_repos.ensure_commit(str(remote), commit, repos_dir=repos)
    shutil.rmtree(remote)

    assert git_repos.ensure_commit(str(remote), commit, repos_dir=repos) == repo
    with pytest.raises(git.GitError):  # proof that the remote really is gone
        git_repos.ensure_commit(str(remote), sha(study, "other"), repos_dir=repos)


def test_file_urls_and_relative_paths_share_one_bare_repo(study, tmp_path, monkeypatch):
    monkeypatch.chdir(study.parent)
    repos = tmp_path / "repos"
    first, second = sha(study, "main"), sha(study, "other~2")
    repo = git_repos.ensure_commit(study.as_uri(), first, repos_dir=repos)
    assert git_repos.ensure_commit("./study", second, repos_dir=repos) == repo
    assert git_repos.read_file(repo, first, "project.yaml") == b"version: '3.0'\n# 30\n"
    assert git_repos.read_file(repo, second, "other/48.txt") == b"o\n"


def test_two_processes_fetching_the_same_repo_both_succeed(study, tmp_path, backend):
    commit = sha(study, "main~3")
    script = (
        "import sys; from pathlib import Path; "
        "from jobrunner_lib.git import runner as git, repos as git_repos; "
        f"git._USE_SH = {backend == 'sh'}; "
        "print(git_repos.ensure_commit(sys.argv[1], sys.argv[2], repos_dir=Path(sys.argv[3])))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(git.__file__).parents[2]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(study), commit, str(tmp_path / "repos")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], results
    assert {out.strip() for out, _ in results} == {str(tmp_path / "repos" / "study.git").encode()}
    assert (
        git_repos.read_file(tmp_path / "repos" / "study.git", commit, "analysis/step3.py")
        == b"27\n"
    )


def test_threads_fetching_different_commits_of_one_repo_all_succeed(study, tmp_path):
    commits = [sha(study, rev) for rev in ("main", "main~1", "feature", "other", "other~4")]
    with ThreadPoolExecutor(len(commits)) as pool:
        repos = set(
            pool.map(lambda c: git_repos.ensure_commit(str(study), c, repos_dir=tmp_path), commits)
        )
    (repo,) = repos
    for commit in commits:
        assert git_repos.read_file(repo, commit, "project.yaml") is not None


def test_unknown_commit_raises_git_error_without_retrying(study, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(git_repos, "_sleep", sleeps.append)
    with pytest.raises(git.GitError) as exc:
        git_repos.ensure_commit(str(study), MISSING_SHA, repos_dir=tmp_path)
    assert not isinstance(exc.value, git.GitNetworkError)
    assert str(exc.value) == f"Error fetching commit {MISSING_SHA} from {study}"
    assert sleeps == []


def test_missing_repo_path_raises_git_error(tmp_path):
    url = str(tmp_path / "no-such-repo")
    with pytest.raises(git.GitError) as exc:
        git_repos.ensure_commit(
            url, MISSING_SHA, repos_dir=tmp_path / "repos", access=git_repos.Access(retry_delay=0)
        )
    assert not isinstance(exc.value, git.GitNetworkError)
    assert str(exc.value) == f"Error fetching commit {MISSING_SHA} from {url}"


def test_partial_sha_is_refused(study, tmp_path):
    with pytest.raises(git.GitError, match="not a full commit SHA"):
        git_repos.ensure_commit(str(study), sha(study, "main")[:12], repos_dir=tmp_path)
    with pytest.raises(git.GitError, match="not a full commit SHA"):
        git_repos.ensure_commit(str(study), "--upload-pack=false", repos_dir=tmp_path)


@pytest.mark.parametrize("scheme", ["git", "http"])
def test_unreachable_host_raises_network_error_after_backed_off_retries(
    tmp_path, monkeypatch, scheme
):
    sleeps = []
    monkeypatch.setattr(git_repos, "_sleep", sleeps.append)
    url = f"{scheme}://127.0.0.1:{closed_port()}/opensafely/study"
    with pytest.raises(git.GitNetworkError) as exc:
        git_repos.ensure_commit(
            url, MISSING_SHA, repos_dir=tmp_path, access=git_repos.Access(retry_delay=4)
        )
    assert str(exc.value).startswith(f"Error fetching commit {MISSING_SHA} from {url}")
    assert sleeps == [4, 8, 16, 32]  # 5 attempts


def test_token_never_appears_in_errors_logs_or_command_lines(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    argvs = []
    real_git = git._git
    monkeypatch.setattr(git_repos, "_git", lambda *a, **kw: argvs.append(a) or real_git(*a, **kw))
    proxy = f"127.0.0.1:{closed_port()}"  # https to a closed port, so the token is in play
    url = "https://github.com/opensafely/private-study"
    secrets = [TOKEN, base64.b64encode(f"jobrunner-tpp:{TOKEN}".encode()).decode()]
    access = git_repos.Access(TOKEN, "tpp", proxy, retry_delay=0)

    errors = []
    for call in (
        lambda: git_repos.ensure_commit(url, MISSING_SHA, repos_dir=tmp_path, access=access),
        lambda: git_repos.resolve_ref(url, "main", access=access),
    ):  # fmt: skip
        with pytest.raises(git.GitNetworkError) as exc:
            call()
        errors.append(str(exc.value))

    assert errors[0].startswith(f"Error fetching commit {MISSING_SHA} from {url}")
    assert proxy in caplog.text  # the proxy was used...
    everything = " ".join([*errors, caplog.text, *(" ".join(a) for a in argvs)])
    for secret in secrets:  # ...but the token went nowhere visible
        assert secret not in everything


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen.append((self.headers["Host"], self.headers.get("Authorization")))
        if "private" in self.path:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1], _Recorder.seen
    server.shutdown()
    server.server_close()


def test_token_reaches_only_the_host_it_is_scoped_to(http_server):
    port, seen = http_server
    env = git_repos._header_env(f"http://127.0.0.1:{port}/", "jobrunner-tpp", TOKEN)
    git._git("ls-remote", f"http://127.0.0.1:{port}/opensafely/study", env=env)
    git._git("ls-remote", f"http://localhost:{port}/opensafely/study", env=env)

    expected = "Basic " + base64.b64encode(f"jobrunner-tpp:{TOKEN}".encode()).decode()
    assert {auth for host, auth in seen if host.startswith("127.0.0.1")} == {expected}
    assert {auth for host, auth in seen if host.startswith("localhost")} == {None}


@pytest.mark.timeout(20)
def test_auth_challenge_fails_without_prompting(http_server, tmp_path, monkeypatch):
    port, seen = http_server
    # askpass programs an operator's environment may carry must not be asked either
    monkeypatch.setenv("GIT_ASKPASS", "echo")
    monkeypatch.setenv("SSH_ASKPASS", "echo")
    url = f"http://127.0.0.1:{port}/opensafely/private-study"
    with pytest.raises(git.GitError) as exc:
        git_repos.ensure_commit(
            url, MISSING_SHA, repos_dir=tmp_path, access=git_repos.Access(retry_delay=0)
        )
    assert not isinstance(exc.value, git.GitNetworkError)
    assert seen and {auth for _, auth in seen} == {None}


def test_read_file_at_a_commit(study, tmp_path):
    old, new = sha(study, "main~20"), sha(study, "feature")
    repo = git_repos.ensure_commit(str(study), old, repos_dir=tmp_path)
    git_repos.ensure_commit(str(study), new, repos_dir=tmp_path)

    assert git_repos.read_file(repo, old, "project.yaml") == b"version: '3.0'\n# 10\n"
    assert git_repos.read_file(repo, new, "feature/40.txt") == b"f\n"
    assert git_repos.read_file(repo, old, "feature/40.txt") is None  # not at that commit
    assert git_repos.read_file(repo, old, "analysis") is None  # a directory
    assert git_repos.read_file(repo, old, "--help") is None
    with pytest.raises(git.GitError, match="is not in"):
        git_repos.read_file(repo, sha(study, "other"), "project.yaml")


def test_archive_contains_exactly_the_tree(study, tmp_path):
    commit = sha(study, "feature~2")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path)
    files = set(run("ls-tree", "-r", "--name-only", commit, cwd=study).split())

    with git_repos.archive(repo, commit) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        members = {}
        for member in tar:
            if member.isfile():
                members[member.name] = tar.extractfile(member).read()

    assert set(members) == files
    assert "secret.txt" in members  # export-ignore must not drop files from job code
    assert members["feature/38.txt"] == b"f\n"


def git_children() -> set[int]:
    """PIDs of this process's child processes named git (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
        if comm == "git" and int(rest.split()[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


@pytest.mark.timeout(20)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_archive_closed_early_reaps_git(study, tmp_path, monkeypatch):
    monkeypatch.setattr(git_repos, "ARCHIVE_CACHE_BYTES", 1024)  # streamed, not kept
    commit = sha(study, "main")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path)
    before = git_children()
    stream = git_repos.archive(repo, commit)
    assert len(stream.read(10)) == 10
    running = git_children() - before
    assert running  # blocked writing the rest of a tar bigger than the pipe buffer
    stream.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in running)  # gone, not a zombie


def test_a_small_archive_comes_from_git_once_and_a_big_one_streams_whole(
    study, tmp_path, monkeypatch
):
    commit = sha(study, "main")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path)
    monkeypatch.setattr(git_repos, "_archives", {})
    runs = []
    real = git_repos._git_stream
    monkeypatch.setattr(git_repos, "_git_stream", lambda *a: runs.append(a) or real(*a))
    with git_repos.archive(repo, commit) as first, git_repos.archive(repo, commit) as second:
        whole = first.read()
        assert second.read() == whole and len(runs) == 1  # the second from memory
    assert len(whole) > 10_000  # several pipe reads' worth
    # Over the limit: what was read to find out, then the rest of git's stream, unchanged.
    monkeypatch.setattr(git_repos, "_archives", {})
    monkeypatch.setattr(git_repos, "ARCHIVE_CACHE_BYTES", 1000)
    with git_repos.archive(repo, commit) as streamed:
        assert streamed.read() == whole
    assert git_repos._archives == {} and len(runs) == 2


def test_stream_raises_when_git_fails(study, tmp_path):
    repo = git_repos.ensure_commit(str(study), sha(study, "main"), repos_dir=tmp_path)
    with git._git_stream(f"--git-dir={repo}", "archive", MISSING_SHA) as stream:
        with pytest.raises(git.GitError, match="git exited with 128: fatal: not a tree object"):
            stream.read()


def test_archive_of_absent_commit_raises(study, tmp_path):
    repo = git_repos.ensure_commit(str(study), sha(study, "main"), repos_dir=tmp_path)
    with pytest.raises(git.GitError):
        git_repos.archive(repo, sha(study, "main~1"))


def test_resolve_ref_finds_branches_and_tags(study):
    url = str(study)
    assert git_repos.resolve_ref(url, "main") == sha(study, "main")
    assert git_repos.resolve_ref(url, "feature") == sha(study, "feature")
    assert git_repos.resolve_ref(url, "v1.0") == sha(study, "main~5")  # annotated, peeled
    assert git_repos.resolve_ref(url, "light") == sha(study, "main~15")
    with pytest.raises(git.GitError, match="Could not find ref 'nope'"):
        git_repos.resolve_ref(url, "nope")


def test_resolve_ref_of_missing_repo_raises(tmp_path):
    with pytest.raises(git.GitError, match="Could not read from"):
        git_repos.resolve_ref(
            str(tmp_path / "nope"), "main", access=git_repos.Access(retry_delay=0)
        )


def test_tag_commit_resolves_tags_only(study):
    assert git_repos.tag_commit(str(study), "v1.0") == sha(study, "main~5")
    assert git_repos.tag_commit(str(study), "light") == sha(study, "main~15")
    with pytest.raises(git.GitError, match="Could not find tag 'main'"):
        git_repos.tag_commit(str(study), "main")


def test_commit_reachable_from_branch(study, tmp_path):
    url, repos = str(study), tmp_path / "repos"
    # a shallow copy of an old commit must not hide its place in history
    git_repos.ensure_commit(url, sha(study, "main~25"), repos_dir=repos)

    assert git_repos.commit_reachable_from(url, sha(study, "main"), "main", repos_dir=repos)
    assert git_repos.commit_reachable_from(url, sha(study, "main~3"), "main", repos_dir=repos)
    assert git_repos.commit_reachable_from(url, sha(study, "main~25"), "main", repos_dir=repos)
    assert not git_repos.commit_reachable_from(url, sha(study, "feature"), "main", repos_dir=repos)
    assert git_repos.commit_reachable_from(url, sha(study, "main~15"), "feature", repos_dir=repos)
    with pytest.raises(git.GitError, match="Could not find branch 'nope'"):
        git_repos.commit_reachable_from(url, sha(study, "main"), "nope", repos_dir=repos)


def test_commit_reachable_from_fetches_only_that_branch(study, tmp_path):
    url = str(study)
    assert not git_repos.commit_reachable_from(url, MISSING_SHA, "main", repos_dir=tmp_path)
    repo = tmp_path / "study.git"
    main_history = set(run("rev-list", "main", cwd=study).split())
    assert set(run("rev-list", "--all", cwd=repo).split()) == main_history


def test_falls_back_to_subprocess_when_sh_cannot_import(study, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sh", None)  # what Windows looks like
    monkeypatch.setattr(git, "_USE_SH", None)
    commit = sha(study, "main")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path)
    assert git._USE_SH is False
    assert git_repos.read_file(repo, commit, "secret.txt") == b"kept\n"


def test_inherited_git_dir_does_not_redirect_commands(study, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_DIR", str(study / ".git"))  # as inside a git hook
    commit = sha(study, "other")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path)
    assert git_repos.read_file(repo, commit, "other/50.txt") == b"o\n"
    assert "fetched/" not in run("tag", cwd=study)


def test_a_file_of_a_fetched_commit_is_read_with_one_git_process(study, tmp_path, monkeypatch):
    commit = sha(study, "main")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path / "repos")
    calls: list[tuple[str, ...]] = []
    real = git_repos._repo_git
    monkeypatch.setattr(
        git_repos,
        "_repo_git",
        lambda repo_dir, *args, **kw: calls.append(args) or real(repo_dir, *args, **kw),
    )
    assert git_repos.read_file(repo, commit, "project.yaml") is not None
    assert [a[:2] for a in calls] == [("cat-file", "blob")]  # the marker vouches for the commit
    with pytest.raises(git.GitError):  # without it, git is asked (and says no)
        git_repos.read_file(repo, sha(study, "main~1"), "project.yaml")


def test_a_fetched_commit_is_archived_with_one_git_process_packed_marker_or_not(
    study, tmp_path, monkeypatch
):
    monkeypatch.setattr(git_repos, "ARCHIVE_CACHE_BYTES", 0)  # each archive asks git
    commit = sha(study, "main~2")
    repo = git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path / "repos")
    expected = tarfile.open(fileobj=git_repos.archive(repo, commit), mode="r|").getnames()
    calls: list[tuple[str, ...]] = []
    real = git_repos._repo_git

    def counting(repo_dir, *args, **kwargs):
        calls.append(args)
        return real(repo_dir, *args, **kwargs)

    monkeypatch.setattr(git_repos, "_repo_git", counting)
    assert git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path / "repos") == repo
    with git_repos.archive(repo, commit) as stream:
        assert tarfile.open(fileobj=stream, mode="r|").getnames() == expected
    assert calls == []  # only `git archive` itself ran: the marker is a loose ref file

    run("pack-refs", "--all", cwd=repo)  # a gc packs the marker: git is asked instead
    assert not (repo / "refs/tags/fetched" / commit).exists()
    assert git_repos.ensure_commit(str(study), commit, repos_dir=tmp_path / "repos") == repo
    with git_repos.archive(repo, commit) as stream:
        assert tarfile.open(fileobj=stream, mode="r|").getnames() == expected
    assert [args[0] for args in calls] == ["rev-parse", "cat-file"]


def test_a_plain_http_proxy_is_an_explicit_setting_and_never_gets_the_token(http_server, tmp_path):
    # GIT_PROXY_SCHEME=http: github.com URLs go to http://<proxy>/..., without the token (it
    # would cross the network in clear); https stays the default.
    port, seen = http_server
    config = load_config(
        environ={
            "WORKDIR": str(tmp_path / "w"),
            "GIT_PROXY_HOST": f"127.0.0.1:{port}",
            "GIT_PROXY_SCHEME": "http",
            "PRIVATE_REPO_ACCESS_TOKEN": TOKEN,
        },
        env_file=tmp_path / "none",
    )
    url = "https://github.com/opensafely/study"
    access = git_repos.Access.for_repo(config, url)
    assert git_repos.fetch_url(url, access.proxy_host, access.proxy_scheme) == (
        f"http://127.0.0.1:{port}/opensafely/study"
    )
    with pytest.raises(git.GitError):
        git_repos.resolve_ref(url, "main", access=dataclasses.replace(access, retry_delay=0))
    assert seen and {host for host, _ in seen} == {f"127.0.0.1:{port}"}
    assert {auth for _, auth in seen} == {None}
