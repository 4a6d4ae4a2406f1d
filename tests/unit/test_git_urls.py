import base64
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.git import runner as git

PROXY = "github-proxy.opensafely.org"


@pytest.mark.parametrize(
    "url,name",
    [
        ("https://github.com/opensafely/my-study", "my-study"),
        ("https://github.com/opensafely/my-study.git", "my-study"),
        ("https://github.com/opensafely/my-study/", "my-study"),
        ("file:///srv/repos/study.git", "study"),
        ("/srv/repos/study", "study"),
        ("./study", "study"),
        ("C:\\Users\\op\\study.git", "study"),
        ("git@github.com:opensafely/study.git", "study"),
        ("host:study", "study"),
    ],
)
def test_repo_name_is_last_segment_without_dot_git(url, name):
    assert git_repos.repo_name(url) == name


@pytest.mark.parametrize("url", ["", "/", "https://github.com/..", "."])
def test_repo_name_rejects_urls_without_a_name(url):
    with pytest.raises(git.GitError):
        git_repos.repo_name(url)


def test_fetch_url_sends_github_https_through_the_proxy():
    assert (
        git_repos.fetch_url("https://github.com/opensafely/study", PROXY)
        == f"https://{PROXY}/opensafely/study"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://github.com/opensafely/study",  # not https
        "https://gitlab.com/opensafely/study",  # not github
        "https://github.com.evil.example/opensafely/study",
        "file:///srv/study",
        "git@github.com:opensafely/study.git",
    ],
)
def test_fetch_url_leaves_other_urls_alone(url):
    assert git_repos.fetch_url(url, PROXY) == url


def test_fetch_url_without_proxy_is_unchanged():
    url = "https://github.com/opensafely/study"
    assert git_repos.fetch_url(url, None) == url


def test_fetch_url_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(git_repos.fetch_url("./study", PROXY)) == (tmp_path / "study").resolve()
    assert os.path.isabs(git_repos.fetch_url("study", None))


def test_auth_env_scopes_basic_auth_header_to_the_proxy():
    url = git_repos.fetch_url("https://github.com/opensafely/study", PROXY)
    env = git_repos._auth_env(url, "tok123", "tpp", PROXY)
    assert env["GIT_CONFIG_COUNT"] == "1"
    assert env["GIT_CONFIG_KEY_0"] == f"http.https://{PROXY}/.extraHeader"
    scheme, value = env["GIT_CONFIG_VALUE_0"].removeprefix("Authorization: ").split()
    assert scheme == "Basic"
    assert base64.b64decode(value).decode() == "jobrunner-tpp:tok123"


@pytest.mark.parametrize(
    "url,token,proxy",
    [
        (f"https://{PROXY}/opensafely/study", None, PROXY),  # no token
        (f"https://{PROXY}/opensafely/study", "", PROXY),  # empty token
        ("https://github.com/opensafely/study", "tok", None),  # no proxy configured
        (f"http://{PROXY}/opensafely/study", "tok", PROXY),  # not https
        ("https://example.com/opensafely/study", "tok", PROXY),  # another host
        ("/srv/study", "tok", PROXY),
    ],
)
def test_auth_env_gives_no_credentials_except_https_to_the_proxy(url, token, proxy):
    assert git_repos._auth_env(url, token, "tpp", proxy) == {}


def test_mask_hides_token_url_password_and_auth_header():
    text = (
        "fatal: https://jobrunner-tpp:tok123@proxy/x failed; token=tok123; "
        "Authorization: Basic am9icnVubmVyOnRvazEyMw=="
    )
    masked = git.mask(text, "tok123")
    assert "tok123" not in masked
    assert "am9icnVubmVyOnRvazEyMw==" not in masked
    assert "https://jobrunner-tpp:********@proxy/x" in masked
    assert "Authorization: Basic ********" in masked


def test_mask_without_token_still_hides_url_passwords():
    assert git.mask("https://u:p4ss@host/r") == "https://u:********@host/r"


@given(
    token=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=8, max_size=40),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_mask_never_leaves_the_token(token, before, after):
    assert token not in git.mask(before + token + after + token, token)


@pytest.mark.parametrize(
    "stderr",
    [
        "error: RPC failed; curl 56 GnuTLS recv error (-9): A TLS packet with unexpected length",
        "fatal: unable to access 'https://x/': OpenSSL SSL_read: Connection was reset, errno 10054",
        "fatal: unable to access 'http://127.0.0.1:1/x/': Failed to connect to 127.0.0.1 port 1"
        " after 0 ms: Couldn't connect to server",
        "fatal: unable to connect to 127.0.0.1:\n127.0.0.1[0: 127.0.0.1]: errno=Connection refused",
        "fatal: unable to access 'https://x/': Could not resolve host: x",
        "fatal: unable to access 'https://x/': Connection timed out after 300000 milliseconds",
        "fatal: unable to access 'https://x/': The requested URL returned error: 502",
    ],
)
def test_network_trouble_is_recognised(stderr):
    assert git_repos._NETWORK_ERRORS.search(stderr)


@pytest.mark.parametrize(
    "stderr",
    [
        "fatal: remote error: upload-pack: not our ref 1234567890123456789012345678901234567890",
        "fatal: '/nope' does not appear to be a git repository",
        "remote: Repository not found.\nfatal: repository 'https://x/' not found",
        "fatal: unable to access 'https://x/': The requested URL returned error: 403",
        "fatal: could not read Username for 'https://x': terminal prompts disabled",
    ],
)
def test_other_failures_are_not_network_trouble(stderr):
    assert not git_repos._NETWORK_ERRORS.search(stderr)
