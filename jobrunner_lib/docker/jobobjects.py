"""A job's Docker objects taken together: which of them exist, and removing them all.

Used by the run side (cleanup after a worker that died) and by the operator tools (jr-kill
--cleanup, jr-retry, jr-reboot-prep). Each call goes through engine.py (missing objects are
fine, so removing twice is removing once).
"""

from __future__ import annotations

from pathlib import Path

from jobrunner_lib.core.config import Config
from jobrunner_lib.docker import engine as docker


def job_objects(config: Config, job_id: str) -> list[tuple[str, str]]:
    """(kind, name) of the job's objects that exist: container, helper, volume (a Docker volume's
    name, or a host-stored volume's directory)."""
    from jobrunner_lib.docker import volumes  # lazily: the tools that import this start fast

    found = []
    for kind, name in (
        ("container", docker.container_name(job_id)),
        ("helper", docker.helper_name(job_id)),
    ):
        if docker.inspect_container(name) is not None:
            found.append((kind, name))
    if docker.volume_exists(docker.volume_name(job_id)):
        found.append(("volume", docker.volume_name(job_id)))
    if volumes.on_host(config, job_id):
        found.append(("volume", str(volumes.host_dir(config, job_id))))
    return found


def remove_job_objects(config: Config, job_id: str) -> list[str]:
    """Remove the job's containers, helper and volume (containers first); the names removed."""
    from jobrunner_lib.docker import volumes

    present = job_objects(config, job_id)
    for kind, name in present:
        if kind != "volume":
            docker.remove_container(name)
    for kind, name in present:
        if kind == "volume" and name == docker.volume_name(job_id):
            docker.remove_volume(name)
        elif kind == "volume":
            volumes.remove_host_dir(config, Path(name))
    return [name for _, name in present]
