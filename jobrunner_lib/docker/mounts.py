"""jr-mount's helper containers: a job's /workspace and PID namespace for an operator's tools.

Named and labelled here like every object jr makes (engine.labels), plus `org.jr.role=mount`, so
jr-prune leaves a job alone while someone is looking inside it. Every call goes through
engine.py's `calls()` (an unreachable daemon is DockerUnavailable, exit 75).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from jobrunner_lib.docker.engine import WORKSPACE, calls, client, labels

ROLE_LABEL = "org.jr.role"
MOUNT_ROLE = "mount"


def mount_name(job_id: str) -> str:
    """A fresh name for one jr-mount helper of this job (several operators may look at once)."""
    return f"jr-mount-{job_id}-{os.urandom(3).hex()}"


def is_mount(container_labels: Mapping[str, str] | None) -> bool:
    """Whether a container (by its labels) is a jr-mount helper."""
    return (container_labels or {}).get(ROLE_LABEL) == MOUNT_ROLE


def create_mount_container(
    backend: str,
    job_id: str,
    name: str,
    *,
    image: str,
    source: str,
    command: Sequence[str],
    pid_of: str | None,
    shell: bool,
) -> None:
    """Create (not start) a helper with `source` (a volume or host directory) at /workspace.

    pid_of: the running job container whose processes it shares. shell: a terminal and stdin
    for an interactive shell (attached by the docker CLI, which owns raw TTY mode).
    """
    with calls("create mount container"):
        api = client().api
        host_config = api.create_host_config(
            binds={source: {"bind": WORKSPACE, "mode": "rw"}},
            # Just enough to strace the job's processes: `--privileged` (the old tool's choice)
            # grants every capability, which some engines refuse and none of which we need.
            cap_add=["SYS_PTRACE"],
            network_mode="none",
            pid_mode=f"container:{pid_of}" if pid_of else None,
        )
        api.create_container(
            image,
            list(command),
            name=name,
            host_config=host_config,
            labels={**labels(backend, job_id), ROLE_LABEL: MOUNT_ROLE},
            working_dir=WORKSPACE,
            user="0:0",
            tty=shell,
            stdin_open=shell,
            environment={"PS1": f"jr-mount {job_id} \\w # "} if shell else None,
            detach=True,
        )


def wait_exit(name: str) -> int:
    """Wait for the helper to stop, however long its command runs; its exit code."""
    with calls("wait for mount container"):
        return int(client().api.wait(name)["StatusCode"])
