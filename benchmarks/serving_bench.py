"""`normfuse bench serving`: the server against the raw engine and three peers, side by side in one run.

Every server serves the SAME ONNX file (one variant of one model) through the same ONNX Runtime engine
and receives the same pre-encoded payloads:

1. the raw engine in-process at each batch size (no HTTP): the floor;
2. `normfuse serve` (JSON and binary), the plain per-request FastAPI peer, LitServe with batching (JSON),
   and Triton via pytriton with its dynamic batcher (JSON and binary);
3. per server and protocol: a closed-loop concurrency sweep with batch-1 requests, concurrency 1 with
   batch-b requests (the overhead at the engine's batch sizes) and a few concurrent requests of the
   largest batch (throughput at the engine's batch size); for normfuse also open-loop Poisson arrivals
   per servable variant at fractions of its closed-loop peak.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import engines
from benchmarks import loadgen
from benchmarks.engines_bench import input_specs
from benchmarks.inputs import random_inputs
from benchmarks.peers import launch
from oip.stats import summarize

log = logging.getLogger(__name__)

PROTOCOLS = {"normfuse": ("json", "binary"), "plain": ("json", "binary"), "litserve": ("json",),
             "triton": ("json", "binary")}


@dataclass(frozen=True)
class ServingBenchConfig:
    model: str = "vit-digits"
    variant: str = "unfused"                          # the ONNX file every server serves
    servers: tuple[str, ...] = ("normfuse", "plain", "litserve", "triton")
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    batch_sizes: tuple[int, ...] = (1, 8, 16)         # raw engine, and batch-b requests at concurrency 1
    step_seconds: float = 6.0                         # per closed-loop step
    saturation_concurrency: int = 4                   # for requests carrying the largest batch size
    step_requests: int = 3000
    open_fractions: tuple[float, ...] = (0.3, 0.6)    # open-loop rates as fractions of the closed-loop peak
    open_timeout_s: float = 10.0                      # open loop: cancel what is still out this long after
    max_batch_size: int = 16                          # every batching server: same cap and queue delay;
    max_queue_delay_ms: float = 0.0                   # 0 = opportunistic batching (Triton's default)
    threads: int | None = None
    engine_rounds: int = 40
    seq_len: int = 128
    log_dir: Path = field(default=Path(".bench/logs"))


def raw_engine(repo: Path, config: ServingBenchConfig, specs: list[dict]) -> list[dict]:
    """The engine alone, in this process: p50/p99 per batch size and items/s at the median."""
    options = {"intra_op_threads": config.threads} if config.threads else {}
    rows = []
    with engines.load(repo, config.model, config.variant, benchmark=True, **options) as engine:
        for batch in config.batch_sizes:
            inputs = random_inputs(specs, batch, seed=batch)
            engine.infer(inputs)
            samples = []
            for _ in range(config.engine_rounds):
                start = time.perf_counter()
                engine.infer(inputs)
                samples.append(time.perf_counter() - start)
            s = summarize(samples)
            rows.append({"server": "engine", "protocol": "-", "batch": batch, "p50_ms": s.median * 1e3,
                         "p99_ms": s.p99 * 1e3, "items_per_s": batch / s.median})
    return rows


def _serve_repo(repo: Path, model: str, work: Path) -> Path:
    """A repository holding only `model` (a symlink), so the server loads and warms nothing else."""
    target = work / "serve-repo"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / model).symlink_to((repo / model).resolve(), target_is_directory=True)
    return target


def _server_onnx(repo: Path, config: ServingBenchConfig) -> Path:
    _, _, _, paths = engines.open_variant(repo, config.model, config.variant, benchmark=True)
    return paths["onnx"]


def sweep(base: str, config: ServingBenchConfig, specs: list[dict], *, server: str, protocol: str,
          version: str | None) -> list[dict]:
    """Closed loop: batch-1 requests over the concurrency sweep, then batch-b requests at concurrency 1."""
    binary = protocol == "binary"
    results = []
    for concurrency in config.concurrencies:
        target = loadgen.make_target(base, config.model, specs, version=version, binary=binary, batch=1)
        results.append(asyncio.run(loadgen.closed_loop(
            target, concurrency, max_requests=config.step_requests, max_seconds=config.step_seconds)))
    # batch-b requests at concurrency 1 (overhead at the engine's batch sizes), then the largest batch at
    # `saturation_concurrency` (throughput at the same batch size as the raw engine's)
    steps = [(batch, 1) for batch in config.batch_sizes[1:]] + [(max(config.batch_sizes), config.saturation_concurrency)]
    for batch, concurrency in steps:
        target = loadgen.make_target(base, config.model, specs, version=version, binary=binary, batch=batch)
        results.append(asyncio.run(loadgen.closed_loop(
            target, concurrency, max_requests=config.step_requests, max_seconds=config.step_seconds / 2)))
    return [{"server": server, "protocol": protocol, **r.to_dict()} for r in results]


def open_loop_per_variant(base: str, config: ServingBenchConfig, specs: list[dict], saturated_rps: float,
                          variants: list[str]) -> list[dict]:
    rows = []
    for fraction in config.open_fractions:
        rate = max(1.0, fraction * saturated_rps)
        for variant in variants:
            target = loadgen.make_target(base, config.model, specs, version=variant, binary=True,
                                         label=variant)
            result = asyncio.run(loadgen.open_loop(target, rate, max_requests=int(rate * config.step_seconds) + 1,
                                                   max_seconds=config.step_seconds,
                                                   timeout=config.open_timeout_s))
            rows.append({"server": "normfuse", "protocol": "binary", "variant": variant, "fraction": fraction,
                         **result.to_dict()})
    return rows


def run(repo: Path, config: ServingBenchConfig) -> dict:
    repo = Path(repo)
    manifest, _ = engines.open_model(repo, config.model)
    specs = input_specs(manifest, config.seq_len)
    onnx = _server_onnx(repo, config)
    result = {"model": config.model, "variant": config.variant, "engine": raw_engine(repo, config, specs),
              "closed": [], "open": [], "skipped": {},
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()}}
    serve_repo = _serve_repo(repo, config.model, config.log_dir.parent)
    for server in config.servers:
        try:
            with launch.start(server, log_dir=config.log_dir, onnx=str(onnx), model=config.model,
                              repo=str(serve_repo), threads=config.threads, max_batch_size=config.max_batch_size,
                              max_queue_delay_ms=config.max_queue_delay_ms,
                              env={"NORMFUSE_LOG_LEVEL": "warning",
                                   "NORMFUSE_WARMUP_BATCH_SIZES": ",".join(map(str, config.batch_sizes))}) as s:
                version = config.variant if server == "normfuse" else None
                for protocol in PROTOCOLS[server]:
                    rows = sweep(s.base_url, config, specs, server=server, protocol=protocol, version=version)
                    result["closed"] += rows
                    log.info("%s/%s: %s", server, protocol, ", ".join(
                        f"c{r['level']} b{r['batch']} {r['throughput_rps']:.0f} rps p50 {r['p50_ms']:.1f} ms"
                        for r in rows))
                if server == "normfuse" and config.open_fractions:
                    saturated = max(r["throughput_rps"] for r in result["closed"]
                                    if r["server"] == "normfuse" and r["batch"] == 1)
                    result["open"] = open_loop_per_variant(s.base_url, config, specs, saturated,
                                                           manifest.servable())
        except (RuntimeError, TimeoutError, OSError) as exc:
            result["skipped"][server] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("skipped server %s: %s", server, exc)
    return result
