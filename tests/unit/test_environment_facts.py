"""Facts read from the environment in one place each (core/config.py, core/values.py): which settings are
secret, where Docker is, who runs a tool."""

from __future__ import annotations

import os

from jobrunner_lib.core import config, values


def test_secrets_are_the_tokens_and_every_database_url():
    settings = config.Config(
        job_server_token="tok",
        private_repo_access_token="ghp",
        database_urls={"full": "mssql://u:p@db/full", "slice": "mssql://u:p@db/slice"},
    )
    assert set(settings.secrets) == {"tok", "ghp", "mssql://u:p@db/full", "mssql://u:p@db/slice"}


def test_docker_host_is_the_setting_else_the_platform_default(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    default = "npipe:////./pipe/docker_engine" if os.name == "nt" else "unix:///var/run/docker.sock"
    assert values.docker_host() == default
    assert values.docker_host({"DOCKER_HOST": "tcp://from-dotenv:2375"}) == "tcp://from-dotenv:2375"
    monkeypatch.setenv("DOCKER_HOST", "ssh://elsewhere")
    assert values.docker_host() == "ssh://elsewhere"
    assert values.docker_host({"DOCKER_HOST": "tcp://from-dotenv:2375"}) == "tcp://from-dotenv:2375"


def test_user_name_is_jr_user_else_the_login_name_else_unknown(monkeypatch):
    import getpass

    monkeypatch.setenv("JR_USER", "alice")
    assert values.user_name() == "alice"
    monkeypatch.setenv("JR_USER", "")
    monkeypatch.setattr(getpass, "getuser", lambda: "bob")
    assert values.user_name() == "bob"

    def no_login_name() -> str:
        raise OSError("no login name")

    monkeypatch.setattr(getpass, "getuser", no_login_name)
    assert values.user_name() == "unknown"
