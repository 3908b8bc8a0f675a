"""`normfuse bench before-after`: the serving benchmarks against two source trees in one run, interleaved.

One `normfuse serve` per tree, each at its own default settings, both up for the whole run and serving the same
model repository; a server runs its tree's code because it starts with PYTHONSAFEPATH=1 (the working directory
is not put on sys.path) and PYTHONPATH=TREE (which comes before the venv's editable install) — checked before
measuring by asking a child started the same way where `normfuse`, `oip` and `service` import from.

Each round gives every tree one turn, the order alternating (old new, new old, …: A B B A), so noise shared by
a round falls on both. A turn is the two serving scenarios, reusing their benchmark functions on that tree's
server: `bench grpc`'s (REST binary and gRPC, batch 1, concurrency 1 p50 and concurrency 32 throughput) and
`bench overload`'s overload part (capacity, unloaded p50, the 256-client flood, unloaded p50 again), with
shorter steps. The JSON decode of a 4,096-row body (`oip.codec.decode_request`) is timed the same way, in a
child process per tree and round. Ratios are new ÷ old of the medians over the rounds with a paired bootstrap
95% interval (`oip.stats.ratio_ci`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import grpc_bench, loadgen, overload_bench
from benchmarks.engines_bench import input_specs
from benchmarks.inputs import random_inputs
from benchmarks.peers import launch
from benchmarks.report import machine
from oip import codec
from oip.stats import ratio_ci

log = logging.getLogger(__name__)
OLD, NEW = "old", "new"
PACKAGES = ("normfuse", "oip", "service")

# (key, scenario, measure, which way is better): what each turn records and the report compares
METRICS = (
    ("rest_c1_p50_ms", "gRPC vs REST", "REST binary, concurrency 1, p50 ms", "lower"),
    ("grpc_c1_p50_ms", "gRPC vs REST", "gRPC, concurrency 1, p50 ms", "lower"),
    ("rest_c32_rps", "gRPC vs REST", "REST binary, concurrency 32, req/s", "higher"),
    ("grpc_c32_rps", "gRPC vs REST", "gRPC, concurrency 32, req/s", "higher"),
    ("capacity_items_per_s", "overload", "capacity before the flood (closed loop 32), items/s", "higher"),
    ("unloaded_p50_ms_before", "overload", "unloaded p50 before the flood, ms", "lower"),
    ("goodput_items_per_s", "overload", "goodput during the flood, items/s", "higher"),
    ("small_answered_per_s", "overload", "batch-1 requests answered during the flood, per s", "higher"),
    ("unloaded_p50_ms_after", "overload", "unloaded p50 right after the flood, ms", "lower"),
    ("decode_ms", "JSON decode", "decode_request of the large body, ms (in process, no server)", "lower"),
)


@dataclass(frozen=True)
class BeforeAfterConfig:
    old: Path                         # the source tree before (its root: normfuse/, oip/, service/ …)
    new: Path                         # the source tree after
    model: str = "vit-digits"
    rounds: int = 6                   # turns per tree, alternating A B, B A, …
    clients: int = 256                # the flood as `bench overload` runs it at its defaults …
    big_rows: int = 4096
    flood_s: float = 8.0              # … with shorter steps (its defaults: 20 s, 8 s, 300 requests)
    capacity_s: float = 3.0
    unloaded_requests: int = 150
    grpc_step_s: float = 2.0          # per protocol and concurrency (`bench grpc`: 4 s)
    grpc_step_requests: int = 4000
    decode_repeats: int = 5           # timed decodes per child process (median kept)
    log_dir: Path = field(default=Path(".bench/logs"))

    def overload_config(self) -> overload_bench.OverloadConfig:
        return overload_bench.OverloadConfig(model=self.model, clients=self.clients, flood_s=self.flood_s,
                                             big_rows=self.big_rows, capacity_s=self.capacity_s,
                                             unloaded_requests=self.unloaded_requests, log_dir=self.log_dir)


def tree_env(tree: Path) -> dict[str, str]:
    """The environment under which `python -m normfuse.cli` (or `-c`) imports the project from `tree`."""
    return {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(Path(tree).resolve())}


def _child(tree: Path, code: str, *args: str, timeout: float = 120) -> dict:
    """Run `code` under `tree_env(tree)`; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **tree_env(tree)},
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child python for {tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


WHERE = ("import importlib, json, pathlib\n"
         f"print(json.dumps({{p: str(pathlib.Path(importlib.import_module(p).__file__).resolve().parent.parent) "
         f"for p in {PACKAGES!r}}}))")


def describe_tree(tree: Path) -> dict:
    """The tree's commit (and whether it has changes) and where a server started on it imports the project
    from; refuses a tree whose code would not be the code that runs."""
    tree = Path(tree).resolve()
    where = _child(tree, WHERE)
    wrong = {p: w for p, w in where.items() if Path(w) != tree}
    if wrong:
        raise RuntimeError(f"a server started on {tree} would import {wrong}, not that tree's code")
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=False)
    return {"path": str(tree), "commit": commit.stdout.strip() or None,
            "changes": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None, "imports_from": where}


def commits_between(old: dict, new: dict) -> int | None:
    """How many commits `new` has that `old` lacks (None unless both are commits of one repository): what the
    comparison covers besides the change it is run for."""
    if not (old["commit"] and new["commit"]):
        return None
    done = subprocess.run(["git", "-C", new["path"], "rev-list", "--count", f"{old['commit']}..{new['commit']}"],
                          capture_output=True, text=True, check=False)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip().isdigit() else None


DECODE = ("import json, sys, time\n"
          "from oip import codec\n"
          "body = open(sys.argv[1], 'rb').read()\n"
          "codec.decode_request(body, None)\n"
          "times = []\n"
          "for _ in range(int(sys.argv[2])):\n"
          "    start = time.perf_counter(); codec.decode_request(body, None)\n"
          "    times.append(time.perf_counter() - start)\n"
          "print(json.dumps({'times': times, 'codec': codec.__file__}))")


def order(round_: int) -> tuple[str, str]:
    """A B, B A, A B, …: each tree goes first in half the rounds."""
    return (OLD, NEW) if round_ % 2 == 0 else (NEW, OLD)


def measure_decode(trees: dict[str, Path], config: BeforeAfterConfig, specs: list[dict]) -> dict:
    """Per round and tree: the median of `decode_repeats` decodes of one `big_rows`-row JSON body (the flood's
    large body) by that tree's `oip.codec.decode_request`, in a fresh child process."""
    body, _ = codec.encode_request(random_inputs(specs, config.big_rows, seed=1), binary=False)
    path = config.log_dir / f"decode-body-{config.big_rows}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    out: dict = {"rows": config.big_rows, "bytes": len(body), OLD: [], NEW: [], "codec": {}}
    for round_ in range(config.rounds):
        for name in order(round_):
            child = _child(trees[name], DECODE, str(path), str(config.decode_repeats))
            out[name].append(statistics.median(child["times"]) * 1e3)
            out["codec"][name] = child["codec"]
    return out


def grpc_vs_rest(server: launch.Server, config: BeforeAfterConfig, specs: list[dict]) -> dict:
    """`bench grpc`'s two normfuse targets on `server`: batch-1 p50 at concurrency 1, req/s at 32."""
    rest = loadgen.make_target(server.base_url, config.model, specs, binary=True, label=grpc_bench.REST)
    request = grpc_bench.grpc_request(config.model, random_inputs(specs, 1, seed=1))
    bounds = {"max_requests": config.grpc_step_requests, "max_seconds": config.grpc_step_s}

    def both(concurrency: int) -> tuple[dict, dict]:
        return (asyncio.run(loadgen.closed_loop(rest, concurrency, **bounds)).to_dict(),
                asyncio.run(grpc_bench.closed_loop_grpc(server.grpc_address, request, concurrency,
                                                        label=grpc_bench.GRPC, **bounds)).to_dict())

    (rest_1, grpc_1), (rest_32, grpc_32) = both(1), both(32)
    return {"rest_c1_p50_ms": rest_1["p50_ms"], "grpc_c1_p50_ms": grpc_1["p50_ms"],
            "rest_c32_rps": rest_32["throughput_rps"], "grpc_c32_rps": grpc_32["throughput_rps"],
            "step_codes": {"rest c1": rest_1["codes"], "grpc c1": grpc_1["codes"], "rest c32": rest_32["codes"],
                           "grpc c32": grpc_32["codes"]}}


def turn(server: launch.Server, config: BeforeAfterConfig, specs: list[dict]) -> dict:
    """One tree's turn in a round: gRPC vs REST, then the overload scenario, on its server."""
    row = grpc_vs_rest(server, config, specs)
    flood = overload_bench.overload(server, config.overload_config(), specs)
    small = flood["codes"]["small"].get("200", 0)
    return {**row, **{k: flood[k] for k in ("capacity_items_per_s", "unloaded_p50_ms_before", "goodput_items_per_s",
                                            "unloaded_p50_ms_after", "admitted_p99_ms", "rss_growth_mib")},
            "small_answered_per_s": small / flood["elapsed_s"], "flood_codes": flood["codes"]}


def run(repo: Path, config: BeforeAfterConfig) -> dict:
    import engines

    started, load_at_start, wall = datetime.now(timezone.utc), os.getloadavg(), time.perf_counter()
    trees = {OLD: Path(config.old).resolve(), NEW: Path(config.new).resolve()}
    specs = input_specs(engines.read_manifest(Path(repo) / config.model), 128)
    result = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "model": config.model,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "trees": {name: describe_tree(tree) for name, tree in trees.items()}}
    result["trees"][NEW]["commits_after_old"] = commits_between(result["trees"][OLD], result["trees"][NEW])
    result["decode"] = measure_decode(trees, config, specs)
    turns: dict[str, list[dict]] = {OLD: [], NEW: []}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(launch.start("normfuse", log_dir=config.log_dir, repo=str(repo),
                                                          max_batch_size=None, max_queue_delay_ms=None,
                                                          env=tree_env(tree)))
                   for name, tree in trees.items()}
        for round_ in range(config.rounds):
            for name in order(round_):
                turns[name].append({"round": round_, **turn(servers[name], config, specs)})
                log.info("round %d %s: %s", round_, name, {k: round(turns[name][-1][k], 2) for k, *_ in METRICS
                                                           if k in turns[name][-1]})
    for name in (OLD, NEW):  # the decode's rounds are the serving rounds' pairs: one table of paired rows
        for row, ms in zip(turns[name], result["decode"][name], strict=True):
            row["decode_ms"] = ms
    result["turns"], result["ratios"] = turns, ratios(turns)
    result["machine"], result["load_at_start"] = machine(load_at_start), list(load_at_start)
    result["load_at_end"], result["cpu"] = list(os.getloadavg()), cpu()
    result["wall_s"] = time.perf_counter() - wall
    return result


def ratios(turns: dict[str, list[dict]]) -> dict[str, dict]:
    """Per metric: each tree's median over the rounds and new ÷ old with its paired bootstrap 95% interval."""
    out = {}
    for key, *_ in METRICS:
        old, new = [r[key] for r in turns[OLD]], [r[key] for r in turns[NEW]]
        ci = ratio_ci(old, new)
        out[key] = {"old": statistics.median(old), "new": statistics.median(new), "ratio": ci.estimate,
                    "low": ci.low, "high": ci.high, "within_noise": bool(ci.contains(1.0))}
    return out


SIMD = ("avx", "amx", "fma", "f16c", "sse4")


def cpu() -> dict:
    """/proc/cpuinfo's first processor: model name, family and model numbers, and its vector-instruction flags
    (what the engines' kernels can use)."""
    fields: dict = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value
            if not line.strip() and fields:  # the end of the first processor's block
                break
    fields["flags"] = [f for f in fields.get("flags", "").split() if f.startswith(SIMD)]
    return fields
