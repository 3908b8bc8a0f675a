"""`normfuse bench {engines,serving,capacity,reload,grpc,grpc-report,overload,int8,int8-report,all}`,
`normfuse loadgen URL` and `normfuse capacity {plan,report}`: the flags. What each command does is in
benchmarks/commands.py (heavy imports happen in its handlers).

The flags most commands share (--repo, --model, --threads, --quick, --json, --out, --plots, --results) are
declared once, in SHARED; a command takes the ones it needs with `shared(parser, ...)`, changing a default or
help where its meaning differs (a benchmark whose --json has a fixed home, a --threads that means one replica).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import before_after_cli, commands


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


SHARED: dict[str, dict] = {
    "repo": {"type": Path, "required": True, "help": "model repository (REPO/NAME/manifest.json)"},
    "model": {"default": "vit-digits"},
    "threads": {"type": int, "default": None, "help": "ONNX Runtime intra-op threads (default: all cores)"},
    "quick": {"action": "store_true", "help": "tiny counts and short steps: a smoke run, not numbers"},
    "json": {"type": Path, "default": None, "help": "also write the raw results here"},
    "out": {"type": Path, "default": None, "help": "also render this benchmark's section into this BENCHMARKS.md"},
    "plots": {"type": Path, "default": Path("benchmarks/plots")},
    "results": {"type": Path},
}


def shared(parser: argparse.ArgumentParser, *names: str, **changes: dict) -> None:
    """Add the SHARED flags `names` to `parser`; `changes[name]` overrides parts of one flag's spec."""
    for name in names:
        parser.add_argument(f"--{name}", **(SHARED[name] | changes.get(name, {})))


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark engines and servers; write BENCHMARKS.md")
    modes = bench.add_subparsers(dest="mode", required=True, metavar="MODE")
    _register_engines_serving_all(modes)
    _register_capacity_bench(modes)
    _register_reload(modes)
    _register_grpc(modes)
    _register_overload(modes)
    _register_int8(modes)
    from benchmarks import (  # light: heavy imports happen in their handlers
        gpu_check,
        hostile_bench,
        plans_bench,
    )

    gpu_check.register(modes)
    plans_bench.register(modes)
    hostile_bench.register(modes)
    before_after_cli.register(modes, shared)
    _register_loadgen(subparsers)
    _register_capacity(subparsers)


def _register_engines_serving_all(modes) -> None:
    engines_p = modes.add_parser("engines", help="every variant vs unfused and the no-norm bound, in-process")
    serving_p = modes.add_parser("serving", help="the server vs the raw engine, a plain endpoint, LitServe, Triton")
    all_p = modes.add_parser("all", help="prepare the repository, run the benchmarks, write the report")
    for p in (engines_p, all_p):
        p.add_argument("--models", type=_names, default=None, help="comma list (default: all in the repo)")
        p.add_argument("--batch-sizes", type=_ints, default=None, help="default 1,8")
        p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per batch size (default 20)")
        p.add_argument("--backends", type=_names, default=("onnxruntime", "tensorrt"),
                       help="a backend that cannot run here is listed as skipped")
    for p in (serving_p, all_p):
        p.add_argument("--serving-model", default="vit-digits")
        p.add_argument("--serving-variant", default="unfused")
        p.add_argument("--servers", type=_names, default=("normfuse", "plain", "litserve", "triton"))
        p.add_argument("--concurrency", type=_ints, default=None, help="default 1,4,16,32")
        p.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                       help="every batching server's queue delay (default 0: opportunistic batching)")
    for p in (engines_p, serving_p, all_p):
        shared(p, "repo", "threads", "quick", "json")
    shared(all_p, "out", "plots", out={"default": Path("BENCHMARKS.md"), "help": None}, plots={"help": None})
    all_p.add_argument("--no-prepare", action="store_true", help="benchmark what is in --repo; convert nothing")
    all_p.add_argument("--reconvert", action="store_true", help="convert every model again (new rewrites landed)")
    all_p.add_argument("--skip", type=_names, default=(),
                       help="comma list of sections not to measure (engines, serving, capacity, norms, plans, int8, "
                       "grpc, reload, overload, hostile): each is rendered from its last results file, which names "
                       "its date, if there is one (default: measure every section)")
    all_p.add_argument("--capacity-results", type=Path, default=Path("benchmarks/results/capacity.json"),
                       help="with --skip capacity: render the capacity section from these results")
    engines_p.set_defaults(handler=commands.run_engines)
    serving_p.set_defaults(handler=commands.run_serving)
    all_p.set_defaults(handler=commands.run_all)


def _register_capacity_bench(modes) -> None:
    p = modes.add_parser("capacity", help="one replica's latency curve, the queueing model fitted to it, checked "
                         "against two replicas; replicas at fleet scale, fused vs unfused")
    shared(p, "repo", "threads", "quick", "json", "model",
           threads={"default": 1, "help": "ONNX Runtime intra-op threads per process: one replica (default 1)"},
           json={"help": "write the raw results here (default: capacity.json beside the server logs: .bench/ for "
                         "a repository in the working directory, else the repository's parent)"})
    p.add_argument("--fused", default=None, help="the fused variant (default: the manifest's default if it is "
                   "not unfused, else rmsnorm)")
    p.add_argument("--slo-ms", type=float, default=10.0, help="p99 SLO of the 1-vs-2-process check (default 10)")
    p.add_argument("--fractions", type=_floats, default=None,
                   help="open-loop rates as fractions of one process's saturation (default 0.2,0.4,0.6,0.7,0.8,0.9)")
    p.add_argument("--fleet-slo-ms", type=_floats, default=(10.0, 50.0), help="p99 SLOs of the fleet table")
    p.add_argument("--fleet-rates", type=_floats, default=(1e3, 1e4, 1e5), help="req/s rows of the fleet table")
    p.add_argument("--no-pin", action="store_true", help="do not pin each server process to its own core")
    shared(p, "out", "plots")
    p.set_defaults(handler=commands.run_capacity)


def _register_reload(modes) -> None:
    p = modes.add_parser("reload", help="latency and failed requests while re-conversions are swapped into a "
                         "server in poll mode (docs/serving.md, Model control)")
    shared(p, "repo", "model", repo={"required": False, "default": None, "help": "model repository holding --model "
                                     "(required unless --render); the model is copied, the repository is not touched"})
    p.add_argument("--swaps", type=int, default=5, help="re-conversions swapped in (default 5)")
    p.add_argument("--gap-s", type=float, default=6.0, help="seconds between re-conversions (default 6)")
    p.add_argument("--poll-s", type=float, default=1.0, help="the server's --repository-poll-secs (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop workers (default 4)")
    shared(p, "json", json={"help": "write the raw results here (default: reload.json beside the server logs)"})
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS",
                   help="measure nothing: render --out's reload section from this results JSON")
    shared(p, "out", "plots")
    p.set_defaults(handler=commands.run_reload)


def _register_grpc(modes) -> None:
    p = modes.add_parser("grpc", help="OIP v2 over gRPC vs REST binary on one normfuse serve (its defaults), "
                         "beside Triton's gRPC (pytriton), at concurrency 1 and 32")
    shared(p, "repo", "model")
    p.add_argument("--concurrency", type=_ints, default=(1, 32))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--step-seconds", type=float, default=4.0, help="per target, concurrency and round")
    p.add_argument("--no-triton", action="store_true", help="leave Triton (pytriton) out")
    shared(p, "threads", "quick", "json", "out", "plots",
           threads={"help": "ONNX Runtime intra-op threads (default: the server's default)"},
           quick={"help": "1 round of 1 s: a smoke run, not numbers"},
           json={"help": "where the results go (default: grpc.json beside the server logs, like capacity.json)"})
    p.set_defaults(handler=commands.run_grpc)
    _report_parser(modes, "grpc-report", "gRPC", Path("benchmarks/results/grpc.json"), commands.run_grpc_report)


def _report_parser(modes, name: str, what: str, results: Path, handler) -> None:
    """`NAME --results --out --plots`: re-render WHAT's section of BENCHMARKS.md from its results JSON."""
    p = modes.add_parser(name, help=f"render BENCHMARKS.md's {what} section and plot from a results JSON")
    shared(p, "results", "out", "plots", results={"default": results},
           out={"default": Path("BENCHMARKS.md"), "help": None})
    p.set_defaults(handler=handler)


def _register_overload(modes) -> None:
    p = modes.add_parser("overload", help="the server at its default settings: overhead at concurrency 1 "
                         "(Triton's client), throughput vs a 2 ms window, a 256-client flood")
    shared(p, "repo", "model", "json", "out", "quick",
           repo={"required": False, "help": "model repository (required to measure)"},
           model={"help": "the model to serve (default vit-digits)"},
           json={"default": Path("benchmarks/results/overload.json"),
                 "help": "results file: written when measuring, read with --report-only"},
           out={"default": Path("BENCHMARKS.md"), "help": "report to update"},
           quick={"help": "a smoke run (short steps), not numbers"})
    p.add_argument("--report-only", action="store_true", help="re-render the section from --json")
    p.set_defaults(handler=commands.run_overload)


def _register_int8(modes) -> None:
    p = modes.add_parser("int8", help="int8 and int8-plain beside the exact variants: speed (vit-s16, gpt2-small, "
                         "1 thread) and accuracy (vit-digits, all-MiniLM-L6-v2, an outlier-channel stress model)")
    p.add_argument("--work", type=Path, default=Path(".bench"), help="where models are built (default .bench)")
    shared(p, "json", "out", "plots", json={"default": Path("benchmarks/results/int8.json"), "help": None},
           out={"default": Path("BENCHMARKS.md"), "help": "render the int8 section into this file"})
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per model x batch size (default 8)")
    p.set_defaults(handler=commands.run_int8)
    _report_parser(modes, "int8-report", "int8", Path("benchmarks/results/int8.json"), commands.run_int8_report)


def _register_loadgen(subparsers) -> None:
    p = subparsers.add_parser("loadgen", help="closed-loop sweep and open-loop Poisson load on an OIP v2 server")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--variants", type=_names, default=(),
                   help="comma list of versions/variants; 'all' = every version the server lists; "
                        "default: the server's default")
    p.add_argument("--protocol", choices=("json", "binary"), default="binary")
    p.add_argument("--batch", type=int, default=1, help="items per request")
    p.add_argument("--seq-len", type=int, default=128, help="for dynamic non-batch axes")
    p.add_argument("--concurrency", type=_ints, default=(1, 4, 16), help="closed-loop sweep ('' = none)")
    p.add_argument("--rates", type=_floats, default=(), help="open-loop Poisson rates, req/s")
    p.add_argument("--max-requests", type=int, default=1000, help="per step")
    p.add_argument("--max-seconds", type=float, default=10.0, help="per step")
    p.add_argument("--timeout", type=float, default=30.0, help="per request")
    shared(p, "json", json={"help": None})
    p.set_defaults(handler=commands.run_loadgen)


def _register_capacity(subparsers) -> None:
    capacity = subparsers.add_parser("capacity", help="replicas needed for a request rate and a p99 SLO")
    modes = capacity.add_subparsers(dest="mode", required=True, metavar="MODE")
    p = modes.add_parser("plan", help="replicas per variant for request rates at a p99 SLO")
    shared(p, "results", results={"default": Path("benchmarks/results/capacity.json"), "help": "`normfuse bench "
                                  "capacity` JSON, or `normfuse loadgen --json` with open-loop --rates"})
    p.add_argument("--rate", type=_floats, required=True, help="req/s, comma list")
    p.add_argument("--p99-ms", type=float, required=True)
    p.add_argument("--variants", type=_names, default=(), help="default: every variant in the results")
    p.add_argument("--util-cap", type=float, default=0.8, help="largest utilisation per replica (default 0.8)")
    p.add_argument("--spare", type=int, default=1, help="replicas on top for a disruption budget (default 1)")
    p.add_argument("--mu", type=float, default=None, help="a curve by hand instead of --results: μ req/s")
    p.add_argument("--base-ms", type=float, default=0.0, help="with --mu: the fixed latency")
    p.add_argument("--kappa", type=float, default=1.0, help="with --mu: the queueing-term scale")
    p.set_defaults(handler=commands.run_capacity_plan)
    _report_parser(modes, "report", "capacity", Path("benchmarks/results/capacity.json"), commands.run_capacity_report)
