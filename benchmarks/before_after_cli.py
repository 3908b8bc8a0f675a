"""`normfuse bench before-after`: its flags and what it does (registered by benchmarks/cli.py, which passes in
its shared flags; the measuring modules are imported inside the handler, so registering costs nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(modes, shared) -> None:
    """Add `before-after` to `normfuse bench`'s MODEs; `shared` is benchmarks.cli's (passed in: no import circle)."""
    p = modes.add_parser("before-after", help="the overload and gRPC-vs-REST scenarios against a server from each "
                         "of two source trees, interleaved in one run: paired new ÷ old ratios (issue 24)")
    p.add_argument("--old", type=Path, help="the source tree before (e.g. a `git worktree add` of the old commit); "
                   "required to measure")
    p.add_argument("--new", type=Path, default=Path("."), help="the source tree after (default: this directory)")
    shared(p, "repo", "model", "json", "out", "quick",
           repo={"required": False, "help": "model repository both trees can read (convert with the older tree); "
                                            "required to measure"},
           json={"default": Path("benchmarks/results/before_after.json"),
                 "help": "results file: written when measuring, read with --report-only"},
           out={"default": Path("docs/before-after.md"), "help": "report to update (default docs/before-after.md: "
                                                                  "a change's effect, not a section of the one run)"},
           quick={"help": "tiny steps and 2 rounds: a smoke run, not numbers"})
    p.add_argument("--rounds", type=int, default=6, help="turns per tree, alternating old new, new old (default 6)")
    p.add_argument("--flood-s", type=float, default=8.0, help="seconds of each flood (default 8)")
    p.add_argument("--report-only", action="store_true", help="re-render the section from --json")
    p.set_defaults(handler=run_before_after)


QUICK = {"rounds": 2, "clients": 16, "big_rows": 64, "flood_s": 1.0, "capacity_s": 0.5, "unloaded_requests": 20,
         "grpc_step_s": 0.5, "grpc_step_requests": 200, "decode_repeats": 2}


def run_before_after(args) -> int:
    from benchmarks import before_after, before_after_report
    from benchmarks.commands import _dump, _log_dir, _setup_logging

    if not args.report_only:
        if args.repo is None or args.old is None:
            sys.stderr.write("normfuse bench before-after: --repo and --old are required to measure "
                             "(or --report-only)\n")
            return 2
        _setup_logging()
        config = before_after.BeforeAfterConfig(old=args.old, new=args.new, model=args.model, log_dir=_log_dir(
            args.repo), **({"rounds": args.rounds, "flood_s": args.flood_s} | (QUICK if args.quick else {})))
        _dump(before_after.run(args.repo, config), args.json)
    before_after_report.write(args.out, json.loads(args.json.read_text()))
    sys.stdout.write(f"wrote the before/after section of {args.out}\n")
    return 0
