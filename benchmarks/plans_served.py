"""The served figures beside the plans table: `normfuse serve` at its defaults, c=1 and c=32, against the raw engine,
interleaved in one run.

One server process with its default settings serves MODEL's default version as the server chooses it on this CPU
(`service.plans.served_manifest`: an OpenVINO plan where the manifest has plans, else its default variant). The raw
engine is the same version opened in this process the way the server opens it (`service.plans.engine_and_options`
with the default settings: the same backend, precision, threads, hint and streams), and driven the way the batcher
drives it: at c=32, `engine.parallelism` threads each running batches of the server's max batch size back to back;
at c=1, one thread at batch 1. Every round runs the raw engine, REST binary and gRPC at each concurrency, the order
rotated each round, so the shared machine's noise hits all of them; the share of the engine the server delivers is
served req/s ÷ engine items/s within a round, reported as the ratio of medians with a paired bootstrap 95% interval.
The server's own batch-size histogram tells which batches it formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
ENGINE = "raw engine"
LEVELS = (1, 32)


def ensure_plans(model_dir: Path, *, rounds: int = 3) -> bool:
    """Give a manifest converted without plans (benchmarks/plans_models.py converts variants only) the PlanSet
    `normfuse convert`'s defaults attach (convert.plans.build_plans: OpenVINO plans gated and timed on this CPU), so
    the server serves what a default conversion serves. Gated on the conversion's saved held-out batch
    (parity_inputs.npz; without it the model is served as converted). True when plans were added."""
    import numpy as np

    from convert.plans import PlanOptions, build_plans
    from engines.manifest import read_manifest, write_manifest

    manifest = read_manifest(model_dir)
    if manifest.plans is not None or not (model_dir / "parity_inputs.npz").is_file():
        return False  # planned already, or no held-out batch to gate on (served as converted)
    with np.load(model_dir / "parity_inputs.npz") as saved:
        held_out = {k: saved[k] for k in saved.files}
    plans = build_plans(model_dir, manifest, held_out, PlanOptions(eval_samples=len(next(iter(held_out.values()))),
                                                                   rounds=rounds))
    write_manifest(model_dir, manifest.model_copy(update={"plans": plans}))
    log.info("%s: plans added, default %s (%s)", model_dir.name, plans.default, plans.timing.get("default_reason"))
    return True


def served_version(repo: Path, model: str, settings, version: str | None = None) -> tuple[str, str, dict]:
    """(default version, backend, engine options) of what `normfuse serve` with `settings` serves by default, or
    the backend and options it opens `version` with."""
    import engines
    from service.plans import engine_and_options, served_manifest
    from service.repository import backend_options

    manifest, _ = engines.open_model(repo, model)
    manifest = served_manifest(manifest, only_default=settings.openvino_plans == "default")
    backend, options = engine_and_options(manifest, version or manifest.default_variant, settings,
                                          backend_options(settings))
    return manifest.default_variant, backend, options


def engine_step(engine, inputs: dict, threads: int, seconds: float) -> dict:
    """`threads` callers running `inputs` back to back for `seconds`: items/s and the per-call p50."""
    from oip.stats import summarize

    batch = next(iter(inputs.values())).shape[0]
    calls: list[float] = []
    deadline = time.perf_counter() + seconds

    def caller() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            engine.infer(inputs)
            calls.append(time.perf_counter() - start)

    start = time.perf_counter()
    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    duration = time.perf_counter() - start
    s = summarize(calls)
    return {"label": ENGINE, "batch": batch, "threads": threads, "calls": len(calls), "ok": batch * len(calls),
            "duration_s": duration, "p50_ms": s.median * 1e3,
            "p99_ms": s.p99 * 1e3, "throughput_rps": batch * len(calls) / duration}


def batch_histogram(base_url: str) -> dict[str, float]:
    """The server's normfuse_batch_size buckets (cumulative counts by upper bound) and its sum and count."""
    import urllib.request

    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("normfuse_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(("normfuse_batch_size_sum", "normfuse_batch_size_count")):
            key = line.split("{", 1)[0].split(" ", 1)[0].rsplit("_", 1)[1]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _served_step(target: tuple, level: int, seconds: float) -> dict:
    from benchmarks import loadgen
    from benchmarks.grpc_bench import closed_loop_grpc

    kind, label, where, payload = target
    bounds = {"max_requests": 100_000, "max_seconds": seconds}
    if kind == "rest":
        result = asyncio.run(loadgen.closed_loop(payload, level, **bounds))
    else:
        result = asyncio.run(closed_loop_grpc(where, payload, level, label=label, **bounds))
    return {**result.to_dict(), "label": label}


def measure(repo: Path, model: str, log_dir: Path, *, rounds: int = 3, step_seconds: float = 8.0,
            env: dict[str, str] | None = None, version: str | None = None) -> dict:
    """Interleaved rounds of the raw engine and the server at c=1 and c=32 (`env`: NORMFUSE_* settings for both,
    e.g. to compare a hint; none = `normfuse serve`'s defaults; `version`: requests name this version instead of
    leaving the server's default to it)."""
    import os

    import engines
    from benchmarks import loadgen
    from benchmarks.engines_bench import input_specs
    from benchmarks.grpc_bench import GRPC, REST, grpc_request
    from benchmarks.inputs import random_inputs
    from benchmarks.peers import launch
    from benchmarks.serving_bench import _serve_repo
    from service.settings import Settings

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ensure_plans(Path(repo) / model)
    env = dict(env or {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the same settings for the raw engine's options as for the server
    try:
        settings = Settings(repo=Path(repo))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    default, backend, options = served_version(Path(repo), model, settings, version)
    asked, version = version, version or default
    manifest, _ = engines.open_model(Path(repo), model)
    specs = input_specs(manifest, 128)
    batch = min(settings.max_batch_size, manifest.max_batch_size)
    serve_repo = _serve_repo(Path(repo), model, Path(log_dir).parent)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(engines.load(Path(repo), model, version, backend, benchmark=True, **options))
        inputs = {level: random_inputs(specs, 1 if level == 1 else batch, seed=level) for level in LEVELS}
        for x in inputs.values():
            engine.infer(x)  # warm-up
        server = stack.enter_context(launch.start("normfuse", repo=str(serve_repo), log_dir=Path(log_dir),
                                                  model=model, max_batch_size=None, max_queue_delay_ms=None,
                                                  env={"NORMFUSE_LOG_LEVEL": "warning", **env}))
        targets = [("rest", REST, None, loadgen.make_target(server.base_url, model, specs, version=asked, binary=True,
                                                            label=REST)),
                   ("grpc", GRPC, server.grpc_address, grpc_request(model, random_inputs(specs, 1, seed=1),
                                                                    asked or ""))]
        names = [ENGINE, REST, GRPC]
        for r in range(rounds):
            order = names[r % 3:] + names[:r % 3]
            for level in LEVELS:
                for name in order:
                    before = batch_histogram(server.base_url)
                    cpu = cpu_seconds(), cpu_seconds(server.process.pid)
                    if name == ENGINE:
                        threads = 1 if level == 1 else engine.parallelism
                        row = engine_step(engine, inputs[level], threads, step_seconds)
                    else:
                        row = _served_step(next(t for t in targets if t[1] == name), level, step_seconds)
                    row.update(round=r, level=level, batches=_difference(batch_histogram(server.base_url), before),
                               bench_cpu_s=cpu_seconds() - cpu[0], server_cpu_s=cpu_seconds(server.process.pid) - cpu[1])
                    rows.append(row)
                    log.info("round %d c%d %s: %.2f /s, p50 %.1f ms", r, level, name, row["throughput_rps"],
                             row["p50_ms"])
        described = engine.describe() | {"parallelism": str(engine.parallelism)}
    return {"started": started, "model": model, "variant": version, "default": version == default, "backend": backend, "engine_described": described,
            "server_settings": {"max_batch_size": batch, "max_queue_delay_ms": settings.max_queue_delay_ms,
                                **{k: str(v) for k, v in env.items()}},
            "rows": rows, "summary": summarize_rounds(rows), "engine": engine_rows(rows, batch),
            "rounds": rounds, "step_seconds": step_seconds, "interleaved": True}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process `pid` (None: this one), all its threads."""
    import os

    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _difference(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def summarize_rounds(rows: list[dict]) -> dict:
    """Per concurrency: medians per target, and served ÷ engine (ratio of medians, paired bootstrap 95%)."""
    from oip.stats import medians_by_label, ratio_ci

    out = {}
    for level in LEVELS:
        at = [r for r in rows if r["level"] == level]
        medians = medians_by_label(at)
        labels = list(medians)
        engine = {r["round"]: r["throughput_rps"] for r in at if r["label"] == ENGINE}
        shares = {}
        for label in labels:
            paired = [(engine[r["round"]], r["throughput_rps"]) for r in at if r["label"] == label and r["round"] in engine]
            if label == ENGINE or not paired:
                continue
            ci = ratio_ci([p[0] for p in paired], [p[1] for p in paired])
            shares[label] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high,
                             "rounds": [s / e for e, s in paired]}
            batches = [r["batches"] for r in at if r["label"] == label]
            count = sum(b.get("count", 0.0) for b in batches)
            medians[label]["mean_batch"] = sum(b.get("sum", 0.0) for b in batches) / count if count else None
        for label in labels:
            medians[label]["cpu_ms_per_item"] = _cpu_per_item([r for r in at if r["label"] == label])
        out[str(level)] = {"medians": medians, "vs_engine": shares}
    return out


def _cpu_per_item(rows: list[dict]) -> dict[str, float] | None:
    """Median CPU milliseconds per item: the server's and the benchmark process's (the load generator, or the raw
    engine in its own rows). Items: the rows the server computed in the step (its batch-size histogram, warm-up
    requests included, as their CPU is), or the engine's."""
    import statistics

    per = []
    for r in rows:
        items = r["ok"] if r["label"] == ENGINE else r["batches"].get("sum", 0.0)
        if items and "bench_cpu_s" in r:
            per.append((1e3 * r["server_cpu_s"] / items, 1e3 * r["bench_cpu_s"] / items))
    if not per:
        return None
    return {"server": statistics.median(p[0] for p in per), "bench": statistics.median(p[1] for p in per)}


def engine_rows(rows: list[dict], batch: int) -> list[dict]:
    """The raw engine's medians at batch 1 and at `batch` (what the report's engine lines show)."""
    import statistics

    out = []
    for level, size in ((1, 1), (32, batch)):
        at = [r for r in rows if r["label"] == ENGINE and r["level"] == level]
        if at:
            out.append({"batch": size, "threads": at[0]["threads"],
                        "p50_ms": statistics.median(r["p50_ms"] for r in at),
                        "items_per_s": statistics.median(r["throughput_rps"] for r in at)})
    return out


def compare_hints(repo: Path, model: str, version: str, *, rounds: int = 8, step_seconds: float = 3.0) -> dict:
    """The OpenVINO plan `version` alone under each performance hint, in one process, interleaved per round: items/s
    at the max batch driven with `parallelism` threads, and the p50 of one caller at batch 1. THROUGHPUT ÷ LATENCY
    as ratios of medians with paired bootstrap 95% intervals (what the default hint is chosen from)."""
    import engines
    from benchmarks.engines_bench import input_specs
    from benchmarks.inputs import random_inputs
    from oip.stats import ratio_ci

    manifest, _ = engines.open_model(Path(repo), model)
    specs = input_specs(manifest, 128)
    batch = min(16, manifest.max_batch_size)
    big, one = random_inputs(specs, batch, seed=batch), random_inputs(specs, 1, seed=1)
    hints = ("LATENCY", "THROUGHPUT")
    opened = {h: engines.load(Path(repo), model, version, "openvino", benchmark=True, hint=h) for h in hints}
    try:
        for engine in opened.values():
            engine.infer(big), engine.infer(one)  # warm-up
        found = {h: {"items_per_s": [], "p50_ms_b1": []} for h in hints}
        for r in range(rounds):
            for h in hints if r % 2 == 0 else hints[::-1]:
                e = opened[h]
                found[h]["items_per_s"].append(engine_step(e, big, e.parallelism, step_seconds)["throughput_rps"])
                found[h]["p50_ms_b1"].append(engine_step(e, one, 1, step_seconds / 2)["p50_ms"])
        described = {h: e.describe() | {"parallelism": str(e.parallelism)} for h, e in opened.items()}
    finally:
        for engine in opened.values():
            engine.close()
    ratios = {k: ratio_ci(found["LATENCY"][k], found["THROUGHPUT"][k]) for k in ("items_per_s", "p50_ms_b1")}
    return {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model, "variant": version,
            "batch": batch, "rounds": rounds, "step_seconds": step_seconds, "described": described, "found": found,
            "throughput_over_latency": {k: {"estimate": v.estimate, "low": v.low, "high": v.high}
                                        for k, v in ratios.items()}}


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.plans_served --version V [--env K=V ...]`: one more served run (e.g. the fastest plan
    under each hint) added to the results file's `served.others`, then the section re-rendered."""
    import argparse
    import json

    from benchmarks import plans_report

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--repo", type=Path, default=Path(".bench/plans-repo"))
    p.add_argument("--model", default="vit-s16")
    p.add_argument("--version", default=None, help="the version requests name (default: the server's default)")
    p.add_argument("--env", action="append", default=[], help="NORMFUSE_NAME=VALUE for the server and the engine")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--step-seconds", type=float, default=8.0)
    p.add_argument("--hints", action="store_true", help="instead: --version alone under each hint (compare_hints)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/plans.json"))
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = dict(item.split("=", 1) for item in args.env)
    result = json.loads(args.json.read_text())
    if args.hints:
        result["served"]["hints"] = compare_hints(args.repo, args.model, args.version, rounds=args.rounds)
    else:
        result["served"].setdefault("others", []).append(measure(
            args.repo, args.model, Path(".bench/logs"), rounds=args.rounds, step_seconds=args.step_seconds, env=env,
            version=args.version))
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plans_report.write(args.out, result, plot_dir=Path("benchmarks/plots"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
