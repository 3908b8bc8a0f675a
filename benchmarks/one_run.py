"""`normfuse bench all`'s second half: every other benchmark section measured in the same run, one process each.

`bench all` measures the engines, serving, capacity and trained-in-norms sections in-process and writes
BENCHMARKS.md whole; then each section below runs as its own `normfuse bench NAME` (a fresh interpreter, so one
section's sessions and servers cannot slow the next) and splices its section into the same file. A section left
out with `--skip` is rendered from its last results file, which names its own date; a section whose run fails is
replaced by a line that says so. The header then lists which sections this run measured, how long each took, and
the CPU (model and flags) they ran on, so no section of BENCHMARKS.md can pass for a run it did not come from.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS = Path("benchmarks/results")
RUN_BEGIN, RUN_END = "<!-- run:begin -->", "<!-- run:end -->"
IN_PROCESS = ("engines", "serving", "capacity", "norms")


@dataclass(frozen=True)
class Section:
    name: str
    argv: tuple[str, ...]          # after `normfuse bench NAME`; {repo} {work} {model} filled in
    quick: tuple[str, ...]         # added for `bench all --quick`
    render: tuple[str, ...]        # after `normfuse bench`: re-render from {results}, measuring nothing
    takes_plots: bool = True


SECTIONS = (
    Section("plans", ("--repo", "{work}/plans-repo", "--work", "{work}"), ("--quick",),
            ("plans", "--render", "--json", "{results}")),
    Section("int8", ("--work", "{work}"), ("--rounds", "2", "--skip-accuracy"), ("int8-report", "--results", "{results}")),
    Section("grpc", ("--repo", "{repo}", "--model", "{model}"), ("--quick",), ("grpc-report", "--results", "{results}")),
    Section("reload", ("--repo", "{repo}", "--model", "{model}"), ("--swaps", "1", "--gap-s", "2"),
            ("reload", "--render", "{results}")),
    Section("overload", ("--repo", "{repo}", "--model", "{model}"), ("--quick",),
            ("overload", "--report-only", "--json", "{results}"), takes_plots=False),
    Section("hostile", ("--work", "{work}/hostile"), ("--quick",), ("hostile", "--report-only", "--json", "{results}"),
            takes_plots=False),
)
NAMES = IN_PROCESS + tuple(s.name for s in SECTIONS)


def results_dir(args) -> Path:
    """Where the sections' results files go: the committed benchmarks/results for a full run, beside the
    repository for a --quick one (a smoke run must not overwrite the numbers BENCHMARKS.md is rendered from)."""
    return Path(args.repo).parent / "results" if args.quick else RESULTS


def argv_for(section: Section, args, *, measure: bool) -> list[str]:
    """`normfuse bench ...` for `section`: measure it, or re-render its section from its results file."""
    results = results_dir(args) / f"{section.name}.json"
    fill = {"repo": str(args.repo), "work": str(Path(args.repo).parent), "model": args.serving_model,
            "results": str(results)}
    common = ["--out", str(args.out)] + (["--plots", str(args.plots)] if section.takes_plots else [])
    if not measure:
        return [part.format(**fill) for part in section.render] + common
    own = [part.format(**fill) for part in section.argv]
    return [section.name, *own, "--json", str(results), *common, *(section.quick if args.quick else ())]


def run_sections(args, notes: list[str]) -> dict[str, str]:
    """Measure every section not in `args.skip`, re-render the skipped ones from their results; return
    {name: "measured in N s" | "kept from its results file" | "failed: ..." | "not measured (no results)"}."""
    done = {}
    for section in SECTIONS:
        measure = section.name not in args.skip
        results = results_dir(args) / f"{section.name}.json"
        if not measure and not results.is_file():
            done[section.name] = "not measured (no results file)"
            continue
        command = [sys.executable, "-m", "normfuse.cli", "bench", *argv_for(section, args, measure=measure)]
        log.info("%s: %s", section.name, " ".join(command[3:]))
        began = time.perf_counter()
        finished = subprocess.run(command, check=False)
        took = time.perf_counter() - began
        if finished.returncode == 0:
            done[section.name] = f"measured in {took:.0f} s" if measure else "kept from its results file"
        else:
            done[section.name] = f"failed (exit {finished.returncode}; its log is above)"
            notes.append(f"the {section.name} benchmark failed with exit {finished.returncode}; its section is "
                         "missing or from an earlier run")
    return done


def header(command: str, started: str, wall_s: float, cpu: str, status: dict[str, str]) -> str:
    """The paragraph under BENCHMARKS.md's title: the run, the machine, and where each section came from."""
    measured = [n for n, s in status.items() if s.startswith("measured")]
    other = [n for n, s in status.items() if not s.startswith("measured")]
    lines = [RUN_BEGIN,
             f"Generated by `{command}`, started {started}, {wall_s / 60:.0f} min in all, on one machine: "
             f"**{cpu}**. Re-run `make bench` to regenerate this file and its plots.", "",
             "| section | in this run |", "|---|---|"]
    lines += [f"| {name} | {text} |" for name, text in status.items()]
    lines.append("")
    lines.append(f"{len(measured)} of {len(status)} sections were measured in this run"
                 + ("; a section kept from its results file says the date it was measured." if other else "."))
    lines.append(RUN_END)
    return "\n".join(lines)


def put_header(out: Path, block: str) -> None:
    """Replace the run paragraph (between RUN_BEGIN and RUN_END) of `out`."""
    text = Path(out).read_text()
    head, rest = text.split(RUN_BEGIN, 1)
    Path(out).write_text(head + block + rest.split(RUN_END, 1)[1])
