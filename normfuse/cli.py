"""The `normfuse` command: one CLI whose subcommands belong to the stage that owns them.

Each stage module exposes `register(subparsers)`; heavy imports (torch, onnxruntime, uvicorn) happen
inside the handlers, so `normfuse --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) — each module has register(subparsers) adding its subcommand(s).
STAGES = (
    "convert.cli",
    "service.cli",
    "benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a stage not installed in this environment
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
