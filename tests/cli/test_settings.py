"""`python -m jobrunner_lib.cli.settings`: the settings service/jr-service takes from the library.

The service loop used to parse `.env` with grep and sed; it now evals this command's `--shell`
output, so it reads every value exactly as the tools do (load_config), quoting and all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner_lib.cli.settings import seconds
from jobrunner_lib.core.config import load_config
from tests.support.cli import ROOT, tool_env

SERVICE = ROOT / "service" / "jr-service"
NAMES = ("WORKDIR", "POLL_INTERVAL", "LOGLEVEL", "JOB_SERVER_ENDPOINT", "CONFIG_ERROR")
# Run the command as the service does, and print what bash's eval made of each line.
EVAL = 'out=$("$@"); eval "$out"; printf "%s\\0" ' + " ".join(f'"${n}"' for n in NAMES)


def settings_env(tmp_path: Path, env_text: str, **extra: str) -> dict[str, str]:
    """A tool environment whose settings come from a `.env` (no WORKDIR of its own)."""
    env_file = tmp_path / "jr.env"
    env_file.write_bytes(env_text.encode())
    env = tool_env(tmp_path / "unused", JR_ENV_FILE=str(env_file), **extra)
    del env["WORKDIR"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def evaluated(env: dict[str, str]) -> tuple[dict[str, str], int]:
    """The settings as bash sees them after `eval "$(... --shell)"`, and the command's exit code."""
    command = [sys.executable, "-m", "jobrunner_lib.cli.settings", "--shell"]
    code = subprocess.run(command, env=env, capture_output=True, timeout=60).returncode
    shown = subprocess.run(
        ["bash", "-c", EVAL, "bash", *command], env=env, capture_output=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    values = shown.stdout.decode().split("\0")[:-1]
    return dict(zip(NAMES, values, strict=True)), code


def test_a_dotenv_the_old_bash_parser_handled_reads_the_same(tmp_path: Path) -> None:
    # `export`, double quotes, a trailing comment and CRLF line ends, as Windows editors write.
    env = settings_env(tmp_path, 'export POLL_INTERVAL="0.5"  # seconds\r\nLOGLEVEL=debug\r\n')
    values, code = evaluated(env)
    assert code == 0
    assert values["POLL_INTERVAL"] == "0.5"
    assert values["LOGLEVEL"] == "DEBUG"
    assert values["JOB_SERVER_ENDPOINT"] == values["CONFIG_ERROR"] == ""
    assert values["WORKDIR"] == str(load_config(env).workdir)


def test_values_with_spaces_quotes_and_hashes_survive_eval_intact(tmp_path: Path) -> None:
    workdir = tmp_path / "my work dir" / "it's #1 $HOME `x`"
    env = settings_env(
        tmp_path,
        f'WORKDIR="{workdir}"\n'
        "JOB_SERVER_ENDPOINT=https://jobs.example.org/api/v2\n"
        "JOB_SERVER_TOKEN='s3cret token'\n",
    )
    values, code = evaluated(env)
    assert code == 0
    assert values["WORKDIR"] == str(workdir)
    assert values["JOB_SERVER_ENDPOINT"] == "https://jobs.example.org/api/v2/"
    assert "s3cret" not in "".join(values.values())  # only what the loop needs is printed


def test_what_the_old_bash_parser_got_wrong_now_agrees_with_the_tools(tmp_path: Path) -> None:
    # A single-quoted ` #` was cut as a comment, `${VAR}` was taken literally, and a relative
    # path was resolved by hand: load_config does all three its own way, and so now does the loop.
    env = settings_env(
        tmp_path,
        f"BASE={tmp_path}\nWORKDIR='${{BASE}}/jr #1'\nPOLL_INTERVAL=2\n",
    )
    values, _ = evaluated(env)
    assert values["WORKDIR"] == str(load_config(env).workdir) == f"{tmp_path}/jr #1"
    relative = settings_env(tmp_path, "WORK_DIR=state/here\n")
    values, _ = evaluated(relative)
    assert values["WORKDIR"] == str(load_config(relative).workdir)
    assert Path(values["WORKDIR"]).is_absolute()


def test_an_invalid_configuration_still_gives_each_setting_and_exits_78(tmp_path: Path) -> None:
    env = settings_env(
        tmp_path,
        f"WORKDIR={tmp_path}/w\nPOLL_INTERVAL=-1\nJOB_SERVER_ENDPOINT=http://127.0.0.1:9/api/v2/\n",
    )
    values, code = evaluated(env)
    assert code == 78
    assert values["WORKDIR"] == f"{tmp_path}/w"
    assert values["POLL_INTERVAL"] == "5"  # its own value is invalid: the default
    # Set, though unusable without a token: jr-sync runs and says what is wrong every time.
    assert values["JOB_SERVER_ENDPOINT"] == "http://127.0.0.1:9/api/v2/"
    assert "JOB_SERVER_TOKEN" in values["CONFIG_ERROR"]


def test_plain_output_is_one_name_value_line_each(tmp_path: Path) -> None:
    env = settings_env(tmp_path, f"WORKDIR={tmp_path}/a b\n")
    shown = subprocess.run(
        [sys.executable, "-m", "jobrunner_lib.cli.settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        f"WORKDIR={tmp_path}/a b",
        "POLL_INTERVAL=5",
        "LOGLEVEL=INFO",
        "JOB_SERVER_ENDPOINT=",
        "CONFIG_ERROR=",
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [(5.0, "5"), (300.0, "300"), (0.05, "0.05"), (0.5, "0.5"), (1e-05, "0.00001"), (1e3, "1000")],
)
def test_seconds_are_plain_decimals_for_awk(value: float, text: str) -> None:
    assert seconds(value) == text


@pytest.mark.skipif(os.name == "nt", reason="the service runs under git-bash there")
def test_the_service_loop_takes_its_workdir_from_the_library(tmp_path: Path) -> None:
    workdir = tmp_path / "state dir" / "o'clock"
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    # The pass records whether the service's pid file is where the tools look for it.
    (bin_dir / "jr-run-once").write_text(
        "import os\nfrom pathlib import Path\n"
        "pid = Path(os.environ['EXPECTED_WORKDIR']) / 'service.pid'\n"
        "Path(os.environ['FAKE_DIR'], 'pid-seen').write_text(str(pid.exists()))\n"
    )
    env = settings_env(
        tmp_path,
        f'WORKDIR="{workdir}"\r\nPOLL_INTERVAL=0.25\r\n',
        JR_SERVICE_BIN=str(bin_dir),
        FAKE_DIR=str(tmp_path),
        EXPECTED_WORKDIR=str(workdir),
    )
    ran = subprocess.run(
        ["bash", str(SERVICE), "--once"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert ran.returncode == 0, ran.stderr
    assert "(mode once, POLL_INTERVAL 0.25s, " in ran.stderr
    assert "configuration error" not in ran.stderr
    assert (tmp_path / "pid-seen").read_text() == "True"
    assert (workdir / "logs" / "workers.log").exists()


@pytest.mark.skipif(os.name == "nt", reason="the service runs under git-bash there")
def test_the_service_says_once_what_is_wrong_with_the_configuration(tmp_path: Path) -> None:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "jr-run-once").write_text("import sys\nsys.exit(78)\n")
    env = settings_env(
        tmp_path, f"WORKDIR={tmp_path}/w\nLOGLEVEL=chatty\n", JR_SERVICE_BIN=str(bin_dir)
    )
    ran = subprocess.run(
        ["bash", str(SERVICE), "--once"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert ran.returncode == 78  # --once: the pass's exit code
    assert ran.stderr.count(" serv configuration error: LOGLEVEL=") == 1
    assert not (tmp_path / "w" / "service.pid").exists()  # removed on exit, as always
