"""Configuration: defaults for the embedded mode, .env handling, and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner_lib.core.config import LOCAL_BACKEND, load_config
from jobrunner_lib.core.errors import EXIT_CONFIG, ConfigError
from jobrunner_lib.core.values import LogLimit, normalise_path, to_windows_path


def cfg(tmp_path: Path, **env: str):
    return load_config(environ=env, env_file=tmp_path / "missing.env")


def test_embedded_defaults_need_no_env_at_all(tmp_path):
    config = cfg(tmp_path)
    assert config.backend == LOCAL_BACKEND
    assert config.using_dummy_data_backend is True
    assert config.has_job_server is False
    assert config.workdir.name == "workdir"
    assert config.high_privacy_storage_base == config.workdir / "high_privacy"
    assert config.medium_privacy_storage_base == config.workdir / "medium_privacy"
    assert config.allow_local_repos is True
    assert config.docker_registry == "jr-demo"
    assert config.image_name("python:v1") == "jr-demo/python:v1"


def test_production_backend_gets_spec_defaults(tmp_path):
    config = cfg(
        tmp_path,
        BACKEND="tpp",
        JOB_SERVER_ENDPOINT="https://jobs.example.org/api/v2",
        JOB_SERVER_TOKEN="s3cret-token",
        DEFAULT_DATABASE_URL="mssql://db/default",
    )
    assert config.using_dummy_data_backend is False
    assert config.allow_local_repos is False
    assert config.docker_registry == "ghcr.io/opensafely-core"
    assert config.git_proxy_host == "github-proxy.opensafely.org"
    assert config.job_server_endpoint == "https://jobs.example.org/api/v2/"
    assert "ehrql" in config.allowed_images


def test_dotenv_is_read_and_real_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BACKEND=fromfile\nPOLL_INTERVAL=7\nWORKDIR=relative/work\n")
    config = load_config(
        environ={"BACKEND": "fromenv", "DEFAULT_DATABASE_URL": "mssql://db"}, env_file=env_file
    )
    assert config.backend == "fromenv"
    assert config.poll_interval == 7.0
    assert config.workdir.is_absolute() and config.workdir.parts[-2:] == ("relative", "work")


def test_legacy_work_dir_name_is_accepted(tmp_path):
    assert cfg(tmp_path, WORK_DIR=str(tmp_path / "w")).workdir == tmp_path / "w"


def test_dummy_data_flag_accepts_spec_truthy_values(tmp_path):
    for value in ("true", "1", "YES"):
        assert cfg(tmp_path, BACKEND="tpp", USING_DUMMY_DATA_BACKEND=value).using_dummy_data_backend


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BACKEND": "bad name"}, "BACKEND="),
        ({"BACKEND": "-x"}, "BACKEND="),
        ({"JOB_SERVER_ENDPOINT": "ftp://x"}, "JOB_SERVER_ENDPOINT="),
        ({"JOB_SERVER_ENDPOINT": "https://jobs.example.org/api/v2/"}, "JOB_SERVER_TOKEN is empty"),
        (
            {"JOB_SERVER_ENDPOINT": "https://jobs.example.org/api/v2/", "JOB_SERVER_TOKEN": "  "},
            "JOB_SERVER_TOKEN is empty",
        ),
        (
            {
                "JOB_SERVER_ENDPOINT": "https://jobs.example.org/api/v2/",
                "JOB_SERVER_TOKEN": "token",
            },
            "placeholder",
        ),
        ({"POLL_INTERVAL": "soon"}, "POLL_INTERVAL="),
        ({"MAX_WORKERS": "-1"}, "MAX_WORKERS="),
        ({"USING_DUMMY_DATA_BACKEND": "maybe"}, "USING_DUMMY_DATA_BACKEND="),
        ({"LOGLEVEL": "LOUD"}, "LOGLEVEL="),
        ({"PRESTO_TLS_CERT_PATH": "/x"}, "PRESTO_TLS_CERT_PATH and PRESTO_TLS_KEY_PATH"),
        ({"JOB_MEMORY_LIMIT": "lots"}, "JOB_MEMORY_LIMIT="),
        ({"ALLOWED_IMAGES": " , "}, "ALLOWED_IMAGES"),
        ({"JOB_PIDS_LIMIT": "3"}, "JOB_PIDS_LIMIT="),
        ({"JOB_LOG_LIMIT": "lots"}, "JOB_LOG_LIMIT='lots' is not a size or a line count"),
        ({"JOB_LOG_LIMIT": "100 words"}, "expected e.g. JOB_LOG_LIMIT=32M"),
        ({"JOB_LOG_LIMIT": "-5M"}, "JOB_LOG_LIMIT="),
        ({"JOB_LOG_LIMIT": "1.5 lines"}, "JOB_LOG_LIMIT="),
        ({"JOB_LOG_LIMIT": "100"}, "JOB_LOG_LIMIT='100' is too small: expected at least 1K"),
        ({"JOB_LOG_LIMIT": "0 lines"}, "is too small: expected at least 1 line"),
    ],
)
def test_invalid_settings_name_the_variable_and_exit_78(tmp_path, env, needle):
    with pytest.raises(ConfigError) as info:
        cfg(tmp_path, **env)
    assert needle in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG
    assert "\n" not in str(info.value)


def test_presto_files_must_exist_and_their_contents_are_used(tmp_path):
    with pytest.raises(ConfigError, match="PRESTO_TLS_CERT_PATH=.*cannot be read"):
        cfg(
            tmp_path,
            PRESTO_TLS_CERT_PATH=str(tmp_path / "no"),
            PRESTO_TLS_KEY_PATH=str(tmp_path / "no"),
        )
    (tmp_path / "c").write_text("CERT")
    (tmp_path / "k").write_text("KEY")
    config = cfg(
        tmp_path, PRESTO_TLS_CERT_PATH=str(tmp_path / "c"), PRESTO_TLS_KEY_PATH=str(tmp_path / "k")
    )
    assert (config.presto_tls_cert, config.presto_tls_key) == ("CERT", "KEY")


def test_memory_limit_sizes(tmp_path):
    assert cfg(tmp_path, JOB_MEMORY_LIMIT="16G").job_memory_limit == 16 * 2**30
    assert cfg(tmp_path, JOB_MEMORY_LIMIT="512m").job_memory_limit == 512 * 2**20


@pytest.mark.parametrize(
    ("value", "expected", "shown"),
    [
        ("32M", LogLimit(32 * 2**20), "32M"),
        ("20MB", LogLimit(20 * 2**20), "20M"),
        ("512K", LogLimit(512 * 2**10), "512K"),
        ("512kib", LogLimit(512 * 2**10), "512K"),
        ("1.5G", LogLimit(1536 * 2**20), "1536M"),
        ("1048576", LogLimit(2**20), "1M"),
        ("5000", LogLimit(5000), "5000"),
        (" 64m ", LogLimit(64 * 2**20), "64M"),
        ("100000 lines", LogLimit(100_000, lines=True), "100000 lines"),
        ("1 line", LogLimit(1, lines=True), "1 line"),
        ("250Lines", LogLimit(250, lines=True), "250 lines"),
    ],
)
def test_job_log_limit_is_a_size_or_a_line_count(tmp_path, value, expected, shown):
    limit = cfg(tmp_path, JOB_LOG_LIMIT=value).job_log_limit
    assert limit == expected and str(limit) == shown


def test_job_log_limit_defaults_to_32_mib(tmp_path):
    assert cfg(tmp_path).job_log_limit == LogLimit(32 * 2**20)
    assert cfg(tmp_path, JOB_LOG_LIMIT="").job_log_limit == LogLimit(32 * 2**20)


def test_database_urls_are_collected(tmp_path):
    config = cfg(tmp_path, FULL_DATABASE_URL="mssql://x", SLICE_DATABASE_URL="")
    assert dict(config.database_urls) == {"full": "mssql://x"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/e/high_privacy", "E:\\high_privacy"),
        ("/e/high_privacy/workspaces", "E:\\high_privacy\\workspaces"),
        ("E:\\high_privacy", "E:\\high_privacy"),
        ("e:/high_privacy", "E:\\high_privacy"),
        ("D:\\a//b", "D:\\a\\b"),
        ("/c", "C:\\"),
        ("\\\\server\\share\\x", "\\\\server\\share\\x"),
        ("relative/dir", "relative\\dir"),
    ],
)
def test_windows_path_normaliser(given, expected):
    assert to_windows_path(given) == expected


def test_posix_paths_are_resolved_against_the_base(tmp_path):
    assert normalise_path("sub/dir", base=tmp_path) == tmp_path / "sub" / "dir"
    assert normalise_path(str(tmp_path)) == tmp_path


def test_stats_default_to_the_workdir_and_can_be_turned_off(tmp_path):
    assert (
        cfg(tmp_path, WORKDIR=str(tmp_path / "w")).stats_database_file
        == tmp_path / "w" / "stats.sqlite"
    )
    assert cfg(tmp_path, STATS_DATABASE_FILE="off").stats_database_file is None
    assert cfg(tmp_path, STATS_DATABASE_FILE="").stats_database_file is None
    assert (
        cfg(tmp_path, STATS_DATABASE_FILE=str(tmp_path / "s.db")).stats_database_file
        == tmp_path / "s.db"
    )


def test_any_database_name_maps_to_its_upper_cased_setting(tmp_path):
    # Today's jobs website sends `default` and `include_t1oo`; 2021's sent full/slice/dummy.
    config = cfg(
        tmp_path,
        BACKEND="tpp",
        DEFAULT_DATABASE_URL="mssql://db/default",
        INCLUDE_T1OO_DATABASE_URL="mssql://db/t1oo",
        FULL_DATABASE_URL=" ",  # blank: not configured
        **{"BAD-NAME_DATABASE_URL": "x", "_DATABASE_URL": "y"},
    )
    assert config.database_urls == {
        "default": "mssql://db/default",
        "include_t1oo": "mssql://db/t1oo",
    }


def test_a_real_data_backend_without_any_database_url_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="no database configured.*DEFAULT_DATABASE_URL"):
        cfg(tmp_path, BACKEND="tpp", USING_DUMMY_DATA_BACKEND="false")
    # A dummy-data backend needs none.
    assert cfg(tmp_path, BACKEND="tpp", USING_DUMMY_DATA_BACKEND="true").database_urls == {}


def test_the_checkout_dir_is_the_repository_root():
    # Workers put it on PYTHONPATH: jobrunner_lib/ there would shadow the Docker SDK (`docker`).
    from jobrunner_lib.core.config import CHECKOUT_DIR

    assert (CHECKOUT_DIR / "bin" / "jr-ls").is_file()
    assert (CHECKOUT_DIR / "jobrunner_lib" / "__init__.py").is_file()


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("http://proxy.example.org", "GIT_PROXY_HOST=proxy.example.org, and GIT_PROXY_SCHEME=http"),
        ("https://proxy.example.org:8443/", "GIT_PROXY_HOST=proxy.example.org:8443)"),
        ("proxy example", "expected host or host:port"),
        ("proxy.example.org/path", "expected host or host:port"),
    ],
)
def test_git_proxy_host_is_a_bare_host_not_a_url(tmp_path, value, hint):
    with pytest.raises(ConfigError, match="GIT_PROXY_HOST=") as exc:
        cfg(tmp_path, GIT_PROXY_HOST=value)
    assert hint in str(exc.value)
    assert exc.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("value", ["github-proxy.opensafely.org", "10.0.0.5:3128", "[::1]:8080"])
def test_git_proxy_host_accepts_host_and_port(tmp_path, value):
    assert cfg(tmp_path, GIT_PROXY_HOST=value).git_proxy_host == value
    assert cfg(tmp_path, GIT_PROXY_HOST=value).git_proxy_scheme == "https"
    assert cfg(tmp_path, GIT_PROXY_HOST=value, GIT_PROXY_SCHEME="HTTP").git_proxy_scheme == "http"
    with pytest.raises(ConfigError, match="GIT_PROXY_SCHEME='ftp' is invalid"):
        cfg(tmp_path, GIT_PROXY_HOST=value, GIT_PROXY_SCHEME="ftp")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_number_setting_must_be_finite(tmp_path, value):
    # MAX_WORKERS=nan would remove the capacity limit; WORKER_STALL_TIMEOUT=nan kill every worker.
    for name in ("MAX_WORKERS", "WORKER_STALL_TIMEOUT", "POLL_INTERVAL"):
        with pytest.raises(ConfigError, match=f"{name}='{value}' is not a number"):
            cfg(tmp_path, **{name: value})
