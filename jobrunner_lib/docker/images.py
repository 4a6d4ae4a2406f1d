"""Images as the operator tools handle them: list, inspect, pull, tag, remove; and Docker's disk usage.

Each call goes through engine.py's client and `calls()` (timeout, "Docker is not available" as
DockerUnavailable, exit 75). The run side only asks whether an image is present
(engine.image_exists); pulling and removing are jr-pull-image's and jr-prune's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jobrunner_lib.docker.engine import calls, client


class ImageInUse(Exception):
    """The daemon refused to remove an image (409): a container or another image still needs it.

    str() is the daemon's explanation, e.g. `conflict: unable to delete … image is being used by …`.
    """


def inspect_image(ref: str) -> dict[str, Any] | None:
    """`docker image inspect` of an image (by name or id), or None if there is no such image."""
    with calls("inspect image", missing_ok=True):
        return client().api.inspect_image(ref)
    return None


def list_images(*, dangling: bool | None = None) -> list[dict[str, Any]]:
    """`docker images -a` as the API lists them; dangling=True: only untagged ones."""
    filters = {} if dangling is None else {"dangling": dangling}
    with calls("list images"):
        return client().api.images(filters=filters)


def all_containers() -> list[dict[str, Any]]:
    """Every container on the host, whoever made it: what keeps an image in use."""
    with calls("list all containers"):
        return client().api.containers(all=True)


def pull(repository: str, tag: str) -> Iterator[dict[str, Any]]:
    """Pull `repository:tag`, yielding the daemon's progress events (dicts, `error` on failure).

    A registry the daemon cannot reach or an image it cannot find is an APIError raised before
    the first event, or an `error` event; the caller words it (jr-pull-image's classify).
    """
    with calls(f"pull {repository}:{tag}"):
        yield from client().api.pull(repository, tag=tag, stream=True, decode=True)


def tag(image: str, repository: str, tag: str) -> None:
    """Point `repository:tag` at the image, moving the name if another image had it."""
    with calls(f"tag {repository}:{tag}"):
        client().api.tag(image, repository=repository, tag=tag, force=True)


def remove_image(ref: str, *, noprune: bool = False, missing_ok: bool = False) -> bool:
    """Remove an image or one of its names; True if removed, False if missing (with missing_ok).

    Never forced: ImageInUse when a container or a child image still needs it. noprune keeps
    untagged parents (untagging a pull name must not take the image it names with it).
    """
    import docker

    removed = False
    try:
        with calls(f"remove image {ref}", missing_ok=missing_ok):
            client().api.remove_image(ref, noprune=noprune)
            removed = True
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise ImageInUse(exc.explanation or str(exc)) from exc
        raise
    return removed


def disk_usage() -> dict[str, Any]:
    """`docker system df`: what images, containers, volumes and the build cache take."""
    with calls("disk usage"):
        return client().api.df()
