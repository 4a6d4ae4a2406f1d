"""`make bench`: every benchmark, one TSV line per figure, then the targets met or missed.

Output (stdout): a header, then `name value unit floor ratio runs` lines (the median of the runs;
min and max go to bench/results/minmax.tsv), `# ...` note lines, and at the end one
`# target ...` line per target saying met or MISSED. A time never makes this fail: only a broken
benchmark does (exit 1, naming it, after running the others).

A full run (no --quick, no --only) also writes the table into bench/README.md between the
`<!-- figures:start -->` and `<!-- figures:end -->` markers (--no-readme: only print it).

Usage: .venv/bin/python bench/run_all.py [--quick] [--only W1,tick,...] [--no-readme]
Parts: W1 W10 W20chain W50fan Wbig lag (bench/workloads.py), tick mem ls (bench/bench_store.py),
pipeline sync (bench_pipeline.py, bench_sync.py; not in --quick).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_store  # noqa: E402
import workloads  # noqa: E402
from benchlib import HEADER, ROOT  # noqa: E402

README = ROOT / "bench" / "README.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
QUICK_SKIPS = ("pipeline", "sync")


def _pipeline(_quick: bool) -> None:
    import bench_pipeline

    bench_pipeline.main()


def _sync(_quick: bool) -> None:
    import bench_sync

    bench_sync.main()


@dataclass(frozen=True)
class Group:
    parts: tuple[str, ...]
    run: Callable[[Sequence[str], bool], None]


GROUPS = (
    Group(tuple(workloads.WORKLOADS), workloads.run),
    Group(bench_store.PARTS, bench_store.run),
    Group(("pipeline",), lambda _names, quick: _pipeline(quick)),
    Group(("sync",), lambda _names, quick: _sync(quick)),
)
PARTS = tuple(p for g in GROUPS for p in g.parts)


@dataclass(frozen=True)
class Target:
    pattern: str  # regex on the figure name
    field: str  # "ratio" or "value"
    limit: float
    what: str

    def check(self, figures: dict[str, dict[str, str]]) -> list[str]:
        lines = []
        for name, fig in figures.items():
            if not re.fullmatch(self.pattern, name) or not fig.get(self.field):
                continue
            value = float(fig[self.field])
            shown = f"{value:.2f}x" if self.field == "ratio" else f"{value:.3g} {fig['unit']}"
            limit = f"{self.limit:g}x" if self.field == "ratio" else f"{self.limit:g} {fig['unit']}"
            verdict = "met" if value <= self.limit else "MISSED"
            lines.append(f"# target {verdict}: {name} {shown} (target <= {limit}: {self.what})")
        return lines


TARGETS = (
    Target(r"W\d+chain_per_job", "ratio", 1.5, "per-job time vs one docker run --rm"),
    Target(r"W10_e2e", "ratio", 1.5, "vs docker run x jobs / MAX_WORKERS"),
    Target(r"W\d+fan_e2e", "ratio", 1.5, "vs docker run x critical path at MAX_WORKERS"),
    Target(r"Wbig_.*_e2e", "ratio", 1.5, "vs the same with docker run / docker cp"),
    Target(
        r"lag_max_post_gap_.*", "ratio", 2.0, "largest gap between status posts vs POLL_INTERVAL"
    ),
    Target(r"tick_run_once_.*_beyond_startup", "value", 0.2, "one pass beyond interpreter start"),
    Target(r"rss_jr_.*", "value", 100, "peak RSS"),
    Target(r"jr-ls_.*_jobs", "value", 0.3, "jr-ls"),
    Target(r"completion_3char_.*_jobs", "value", 0.15, "tab completion"),
)


class Tee(io.TextIOBase):
    """stdout that is also kept, so the figures can go into the README."""

    def __init__(self, out: io.TextIOBase):
        self.out, self.text = out, []

    def write(self, s: str) -> int:
        self.text.append(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def load() -> str:
    """The 1-minute load average (others' work on the machine skews every figure)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def parse(lines: Sequence[str]) -> dict[str, dict[str, str]]:
    """{name: figure} from the TSV lines (comments and the header skipped)."""
    keys = HEADER.split("\t")
    figures = {}
    for line in lines:
        cells = line.split("\t")
        if line.startswith("#") or line == HEADER or len(cells) != len(keys):
            continue
        figures[cells[0]] = dict(zip(keys, cells, strict=True))
    return figures


def markdown(lines: Sequence[str], verdicts: Sequence[str], seconds: float) -> str:
    """The README section: machine, the table, notes and verdicts."""
    keys = HEADER.split("\t")
    rows = [
        line.split("\t")
        for line in lines
        if not line.startswith("#") and line != HEADER and line.strip()
    ]
    notes = [
        line[2:] for line in lines if line.startswith("# ") and not line.startswith("# target")
    ]
    docker_version = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    out = [
        f"Full run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} min: "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, Docker {docker_version or '?'}.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "|".join(["---", "---:", "---", "---:", "---:", "---:"]) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        *(f"- {n}" for n in notes),
        "",
        "Targets:",
        "",
        *(f"- {v[len('# target ') :]}" for v in verdicts),
    ]
    return "\n".join(out)


def write_readme(section: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"bench: {README} has no {START} ... {END} markers; the table:\n{section}")
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{section}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs and smaller sizes: a smoke test"
    )
    parser.add_argument("--only", help=f"comma-separated parts, from {', '.join(PARTS)}")
    parser.add_argument("--no-readme", action="store_true", help="do not write bench/README.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(PARTS)).split(",") if n.strip()]
    if unknown := [n for n in names if n not in PARTS]:
        parser.error(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    if args.quick:
        names = [n for n in names if n not in QUICK_SKIPS]

    started = time.monotonic()
    tee = Tee(sys.stdout)
    saved, sys.stdout = sys.stdout, tee
    failed: list[str] = []
    try:
        print(HEADER, flush=True)
        if args.quick:
            print("# --quick: one run per workload, smaller sizes; not comparable to a full run")
        for group in GROUPS:
            chosen = [p for p in group.parts if p in names]
            if not chosen:
                continue
            print(f"# load average before {','.join(chosen)}: {load()}", flush=True)
            try:
                group.run(chosen, args.quick)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - report it, run the rest
                failed.append(f"{','.join(chosen)}: {exc}")
                traceback.print_exc(file=sys.stderr)
        lines = "".join(tee.text).splitlines()
        verdicts = [v for t in TARGETS for v in t.check(parse(lines))]
        for line in verdicts:
            print(line)
        print(f"# total {time.monotonic() - started:.0f} s", flush=True)
    finally:
        sys.stdout = saved
    if failed:
        for f in failed:
            print(f"bench: FAILED {f}", file=sys.stderr)
        return 1
    if not args.quick and not args.only and not args.no_readme:
        write_readme(markdown(lines, verdicts, time.monotonic() - started))
        print(f"bench: wrote the table into {README.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
