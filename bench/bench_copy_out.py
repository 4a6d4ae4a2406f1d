"""Copying one big file out of a container: `docker cp` (the floor), jr's old path and its current one.

The file (`dd` from /dev/zero) sits in a volume mounted at /workspace of a stopped container, as a
job's output does. Samples are interleaved, the order rotating each round (floor, old, new, read;
old, new, read, floor; ...), so a change in the machine's load hits every figure alike. Each copy writes to a fresh name in a scratch directory
on the same disk; before each one (untimed) the last file is removed and `sync` run, so no copy
pays for the write-back of the one before.

Figures: `copy_out_<N>MB_docker_cp` (floor), `copy_out_<N>MB_old` (get_archive in 1 MB pieces
through IterReader and tarfile, as copy_file_out did before), `copy_out_<N>MB_jr`
(`docker_files.copy_file_out` as it is now) and `copy_out_<N>MB_read_only` (the archive stream
drained, nothing written: what the socket alone costs through the SDK). `#` lines give min-max
and the CPU seconds this process spent (all its threads; `docker cp`'s own CPU is not counted),
which vary far less than wall time when other work loads the machine.

Usage: .venv/bin/python bench/bench_copy_out.py [--runs N] [--mb N]
Every Docker object carries `org.jr.bench=<uuid>` and is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import report
from workloads import HELPER_IMAGE, Labels, check_images, docker, note

from jobrunner_lib.docker import engine as jr_docker
from jobrunner_lib.docker import extract, tarstream
from jobrunner_lib.docker import files as docker_files


def old_copy_file_out(container: str, path: str, dest: Path) -> int:
    """copy_file_out as it was before the single-file fast path (the bench's "before")."""
    progress = tarstream.Progress()
    stream, _stat = jr_docker.client().api.get_archive(container, path, chunk_size=tarstream.CHUNK)
    try:
        reader = extract.IterReader(stream, progress)
        return extract.extract_one_file(reader, path.rsplit("/", 1)[-1], dest, progress)
    finally:
        stream.close()


def read_only(container: str, path: str) -> int:
    """Drain the archive stream and write nothing."""
    stream, _stat = jr_docker.client().api.get_archive(container, path, chunk_size=tarstream.CHUNK)
    try:
        return sum(len(piece) for piece in stream)
    finally:
        stream.close()


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="samples of each figure (default 5)")
    parser.add_argument("--mb", type=int, default=500, help="size of the file (default 500)")
    args = parser.parse_args()
    check_images()
    labels = Labels()
    name = f"jr-bench-copy-out-{labels.value.rsplit('=', 1)[1][:12]}"
    scratch = Path(tempfile.mkdtemp(prefix="jr-bench-copy-out-"))
    try:
        docker("volume", "create", "--label", labels.value, name)
        docker(
            "run",
            "--name",
            name,
            "-v",
            f"{name}:/workspace",
            HELPER_IMAGE,
            "dd",
            "if=/dev/zero",
            "of=/workspace/big.bin",
            "bs=1048576",
            f"count={args.mb}",
            label=labels.value,
        )
        size = args.mb << 20
        path = "/workspace/big.bin"
        samples: dict[str, list[float]] = {"docker_cp": [], "old": [], "jr": [], "read_only": []}
        cpu: dict[str, list[float]] = {key: [] for key in samples}
        dest = scratch / "big.bin"

        def copy_cli() -> None:
            subprocess.run(
                ["docker", "cp", f"{name}:{path}", str(dest)], check=True, capture_output=True
            )

        def copy_jr() -> None:
            written = docker_files.copy_file_out(
                name, path, dest, progress=tarstream.Progress(), stall_timeout=60
            )
            assert written == size

        def copy_old() -> None:
            assert old_copy_file_out(name, path, dest) == size

        def drain() -> None:
            assert read_only(name, path) > size

        steps: dict[str, Callable[[], None]] = {
            "docker_cp": copy_cli,
            "old": copy_old,
            "jr": copy_jr,
            "read_only": drain,
        }
        note(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        copy_cli()  # warm the page cache and the daemon's side once, untimed
        keys = list(steps)
        for run in range(args.runs):
            for key in keys[run % len(keys) :] + keys[: run % len(keys)]:
                dest.unlink(missing_ok=True)
                os.sync()
                start, start_cpu = time.perf_counter(), cpu_seconds()
                steps[key]()
                samples[key].append(time.perf_counter() - start)
                cpu[key].append(cpu_seconds() - start_cpu)
        floor = samples["docker_cp"]
        report(f"copy_out_{args.mb}MB_docker_cp", floor)
        for key in ("old", "jr", "read_only"):
            report(f"copy_out_{args.mb}MB_{key}", samples[key], floor=floor)
        for key, values in samples.items():
            note(
                f"{key}: min {min(values):.3f} s, max {max(values):.3f} s; "
                f"CPU of this process {statistics.median(cpu[key]):.3f} s"
            )
        note(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        labels.remove_objects()


if __name__ == "__main__":
    main()
