"""jr-pull-image: update a runtime image from the configured registry or proxy.

Pulls `<PULL_REGISTRY>/<name>:<tag>` (every pull goes through it), tags the result with the name
jobs run (`config.image_name`), drops the pull name, then removes the image that name used to
point at, unless something still needs it: another tag, a container (a running job's), or an
active job recorded as using it. Progress goes to stderr, one summary line per image to stdout.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import ConfigError, OperationFailed, TemporaryFailure, UsageError
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import images
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool

NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# How the daemon words "cannot reach the registry": worth retrying later (exit 75).
UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "dial tcp",
    "network is unreachable",
    "tls handshake timeout",
    "connection reset",
    "server misbehaving",
    "timeout exceeded",
    "eof",
)
NOT_FOUND = ("manifest unknown", "not found", "repository does not exist", "pull access denied")


@dataclass(frozen=True)
class ImageRef:
    """An allowed runtime image: bare name and tag."""

    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_image(text: str, allowed: tuple[str, ...]) -> ImageRef:
    """`python:v2` -> ImageRef; no tag means `latest`. OperationFailed unless the name is allowed."""
    name, sep, tag = text.partition(":")
    tag = tag if sep else "latest"
    if name not in allowed or not NAME_RE.match(name):
        raise OperationFailed(
            f"{text!r} is not an allowed image: expected one of {', '.join(allowed)} "
            "(set by ALLOWED_IMAGES), with an optional :TAG"
        )
    if not TAG_RE.match(tag):
        raise UsageError(f"{text!r}: {tag!r} is not a valid image tag")
    return ImageRef(name, tag)


def short_id(image_id: str | None) -> str:
    """`sha256:0123…` -> `0123456789ab` (as `docker images` shows it)."""
    return (image_id or "").split(":", 1)[-1][:12]


def classify_pull_error(source: str, message: str) -> Exception:
    """The right error for a failed pull: unreachable (75), not there (1), or other (1)."""
    low = message.lower()
    if any(phrase in low for phrase in NOT_FOUND) and "dial tcp" not in low:
        return OperationFailed(f"{source} was not found in the registry: {message.strip()}")
    if any(phrase in low for phrase in UNREACHABLE):
        return TemporaryFailure(
            f"cannot reach the registry for {source} (PULL_REGISTRY): {message.strip()}"
        )
    return OperationFailed(f"pulling {source} failed: {message.strip()}")


def progress_lines(events: Iterator[dict[str, Any]], source: str) -> Iterator[str]:
    """`docker pull`-like lines from the SDK's pull events: one per layer status change."""
    last: dict[str, str] = {}
    for event in events:
        if "error" in event:
            raise classify_pull_error(source, str(event.get("error")))
        status, layer = str(event.get("status", "")), str(event.get("id", ""))
        if not status or last.get(layer) == status:
            continue  # byte-count updates of the same status
        last[layer] = status
        yield f"{layer}: {status}" if layer else status


class PullImage(Tool):
    name = "jr-pull-image"
    component = "pull"
    description = """Update runtime images: pull IMAGE[:TAG] (default tag: latest) from PULL_REGISTRY
(the registry or proxy every pull must use), tag it with the name jobs run, and remove the image it
replaces unless a pending or running job still needs it. IMAGE must be one of ALLOWED_IMAGES.
Prints `pulled <name> <id> (was <old id>|new|unchanged)` per image."""
    epilog = """examples:
  jr-pull-image python:v2               update one image
  jr-pull-image r:latest stata-mp:latest"""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("images", nargs="+", metavar="IMAGE[:TAG]", help="e.g. python:v2")

    def run(self, ctx: Context) -> int:
        config = ctx.config
        assert config is not None
        if not config.pull_registry:
            raise ConfigError(
                "PULL_REGISTRY is not set: set it to the registry or proxy images are "
                "pulled through, e.g. PULL_REGISTRY=docker-proxy.opensafely.org/opensafely-core"
            )
        refs = [parse_image(text, config.allowed_images) for text in ctx.args.images]
        docker.ping()
        failed = 0
        for ref in dict.fromkeys(refs):
            try:
                self.pull(ctx, config, ref)
            except OperationFailed as exc:  # this image only: go on with the others
                ctx.stderr.write(f"{self.name}: {exc}\n")
                failed += 1
        return 1 if failed else 0

    def pull(self, ctx: Context, config: Config, ref: ImageRef) -> None:
        """Pull one image, retag it, tidy the one it replaces, print the summary line."""
        assert config.pull_registry is not None
        source_repo = f"{config.pull_registry.rstrip('/')}/{ref.name}"
        source = f"{source_repo}:{ref.tag}"
        target_repo = config.image_name(ref.name)
        target = f"{target_repo}:{ref.tag}"
        old_id = docker.image_id(target)
        ctx.say(f"pulling {source}")
        try:
            for line in progress_lines(images.pull(source_repo, ref.tag), source):
                ctx.say(line)
        except (OperationFailed, TemporaryFailure):  # already classified (Docker down is one too)
            raise
        except Exception as exc:
            # The daemon reports registry trouble as an API error (500) before any event.
            explanation = getattr(exc, "explanation", None) or str(exc)
            raise classify_pull_error(source, str(explanation)) from None
        new_id = docker.image_id(source)
        if new_id is None:
            raise OperationFailed(f"pulled {source} but Docker does not show it")
        images.tag(new_id, target_repo, ref.tag)
        if source != target:
            # Jobs use only the target name; the pull name would keep the image alive in prune's eyes.
            images.remove_image(source, noprune=True, missing_ok=True)
        if old_id is None:
            was = "new"
        elif old_id == new_id:
            was = "unchanged"
        else:
            was = f"was {short_id(old_id)}"
            self.remove_superseded(ctx, old_id, target)
        ctx.stdout.write(f"pulled {target} {short_id(new_id)} ({was})\n")
        ctx.stdout.flush()

    def remove_superseded(self, ctx: Context, old_id: str, target: str) -> None:
        """Remove the image `target` used to name, unless it is still tagged or in use."""
        info = images.inspect_image(old_id)
        if info is None:
            return  # gone already
        tags = info.get("RepoTags") or []
        if tags:
            ctx.say(f"kept superseded image {short_id(old_id)}: still tagged {', '.join(tags)}")
            return
        users = self.image_users(ctx, old_id)
        if users:
            ctx.say(
                f"kept superseded image {short_id(old_id)} (was {target}): in use by {', '.join(users)}"
            )
            return
        try:
            removed = images.remove_image(old_id, missing_ok=True)
        except images.ImageInUse as exc:  # a container appeared meanwhile
            ctx.say(f"kept superseded image {short_id(old_id)} (was {target}): {exc}")
            return
        if removed:
            ctx.say(f"removed superseded image {short_id(old_id)} (was {target})")

    def image_users(self, ctx: Context, image_id: str) -> list[str]:
        """What still needs the image: active jobs recorded with it, and any container made from it."""
        users = [
            f"job {job.id} ({job.state.value})"
            for job in db_queries.active_jobs(ctx.conn)
            if job.image_id == image_id
        ]
        for container in images.all_containers():
            if container.get("ImageID") != image_id:
                continue
            job_id = (container.get("Labels") or {}).get("org.jr.job-id")
            name = (container.get("Names") or ["?"])[0].lstrip("/")
            label = (
                f"job {job_id} (container {name}, {container.get('State')})"
                if job_id
                else f"container {name}"
            )
            if label not in users:
                users.append(label)
        return users


def main() -> None:
    """Entry point."""
    run_tool(PullImage)
