"""The `normfuse` command: one CLI whose subcommands belong to the stage that owns them.

Each stage module exposes `register(subparsers)`. Only the module of the command being run is imported (and the
heavy stacks, torch, onnxruntime, uvicorn, only inside its handlers), so `normfuse --help` and `normfuse serve
--help` answer at once; the other commands are listed from the table below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module whose register(subparsers) adds it, its one-line help for `normfuse --help`)
COMMANDS = {
    "convert": ("convert.cli", "rewrite a model's normalization layers, export and verify every variant"),
    "tune": ("convert.tune", "re-time a converted model's plans on this machine and update its default plan"),
    "serve": ("service.cli", "serve a model repository over the Open Inference Protocol v2"),
    "bench": ("benchmarks.cli", "benchmark engines and servers; write BENCHMARKS.md"),
    "loadgen": ("benchmarks.cli", "closed-loop sweep and open-loop Poisson load on an OIP v2 server"),
    "capacity": ("benchmarks.cli", "replicas needed for a request rate and a p99 SLO"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser with the stages of `command` registered ("*": every stage; None: none, listing only)."""
    parser = argparse.ArgumentParser(prog="normfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {m for m, _ in COMMANDS.values()} if command == "*" else {COMMANDS[command][0]} if command else set()
    for name in sorted(modules):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a stage not installed in this environment
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)  # listed; parsed only when it is the command
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
