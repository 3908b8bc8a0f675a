"""`normfuse bench engines`: every variant of every model against `unfused` and the no-norm bound, in-process.

Per model × backend × batch size, all variants (servable ones and the benchmark-only `nonorm` bound) run
interleaved on the same input batch: round r runs every variant once, in an order rotated each round.
A timed sample is the mean of enough back-to-back calls to last ≥ 20 ms (the same count for every variant
of a batch size), so sub-millisecond models are not timed at the timer's resolution.
Per variant we report the median and p99 latency, the ratio of its median to unfused's with a paired
bootstrap 95% interval, and — when the bound exists — gain captured = (T_unfused − T_v)/(T_unfused − T_nonorm).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import engines
from benchmarks.inputs import random_inputs
from engines.manifest import list_models, read_manifest
from oip.stats import gain_captured_ci, interleave, ratio_ci, summarize

log = logging.getLogger(__name__)

BASELINE, BOUND = "unfused", "nonorm"


@dataclass(frozen=True)
class EngineBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 20                  # interleaved rounds per batch size (fewer if max_seconds runs out)
    min_rounds: int = 5
    max_seconds: float = 90.0         # per model × backend × batch size (keeps `make bench` near 20 min)
    warmup: int = 1
    min_sample_s: float = 0.02        # one timed sample = enough back-to-back calls to last this long
    seq_len: int = 128                # for dynamic non-batch axes (text models)
    threads: int | None = None        # ORT intra-op threads (None: ORT's default, all cores)
    backends: tuple[str, ...] = ("onnxruntime", "tensorrt")  # one that cannot run here is reported as skipped
    models: tuple[str, ...] | None = None  # None: every model in the repository

    def __post_init__(self) -> None:
        if self.min_rounds < 2 or self.rounds < self.min_rounds:
            raise ValueError("need rounds >= min_rounds >= 2")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")


def input_specs(manifest, seq_len: int) -> list[dict]:
    """Manifest inputs with every dynamic axis but the batch fixed to `seq_len`."""
    return [{"name": t.name, "datatype": t.datatype,
             "shape": [t.shape[0]] + [seq_len if d < 0 else d for d in t.shape[1:]]} for t in manifest.inputs]


def calls_per_sample(run: Callable[[], object], min_sample_s: float) -> int:
    """How many back-to-back calls make one timed sample last at least `min_sample_s` (timeit's autorange):
    a sub-millisecond model timed one call at a time measures the timer and the scheduler."""
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, math.ceil(min_sample_s / once))


def measure(runners: dict[str, Callable[[], object]], rounds: int, min_rounds: int, max_seconds: float,
            calls: int = 1) -> dict[str, list[float]]:
    """Interleaved timing (seconds per call, each sample the mean of `calls` calls); stops early (after
    min_rounds) when time runs out."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    deadline = time.perf_counter() + max_seconds
    for r, order in enumerate(interleave(list(runners), rounds)):
        if r >= min_rounds and time.perf_counter() > deadline:
            break
        for name in order:
            run = runners[name]
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def rows_for(model: str, backend: str, batch: int, times: dict[str, list[float]], exact: dict[str, bool]) -> list[dict]:
    """One table row per variant: medians, p99, ratio to unfused with its interval, gain captured."""
    rows = []
    for variant, samples in times.items():
        s = summarize(samples)
        row = {"model": model, "backend": backend, "batch": batch, "variant": variant,
               "exact": exact.get(variant, False), "rounds": s.n, "p50_ms": s.median * 1e3,
               "p99_ms": s.p99 * 1e3, "items_per_s": batch / s.median if s.median > 0 else float("nan")}
        if BASELINE in times:
            ci = ratio_ci(times[BASELINE], samples)
            row.update(ratio=ci.estimate, ratio_low=ci.low, ratio_high=ci.high)
        if BASELINE in times and BOUND in times and variant not in (BASELINE, BOUND):
            gain = gain_captured_ci(times[BASELINE], samples, times[BOUND])
            row.update(gain=gain.estimate, gain_low=gain.low, gain_high=gain.high)
        rows.append(row)
    return rows


def bench_model(repo, model: str, backend: str, config: EngineBenchConfig) -> list[dict]:
    manifest = read_manifest(engines.open_model(repo, model)[1])
    # lossy variants are timed whether or not they passed their accuracy gate (random weights: speed only)
    variants = [v for v, info in manifest.variants.items()
                if info.servable or info.benchmark_only or info.accuracy is not None]
    exact = {v: manifest.variants[v].exact and not manifest.variants[v].benchmark_only for v in variants}
    options = {"intra_op_threads": config.threads} if backend == "onnxruntime" and config.threads else {}
    opened = {}
    try:
        for v in variants:
            opened[v] = engines.load(repo, model, v, backend, benchmark=True, **options)
        specs = input_specs(manifest, config.seq_len)
        rows = []
        for batch in config.batch_sizes:
            inputs = random_inputs(specs, batch, seed=batch)
            runners = {v: (lambda e=e, x=inputs: e.infer(x)) for v, e in opened.items()}
            for run in runners.values():
                for _ in range(config.warmup):
                    run()
            calls = calls_per_sample(runners[BASELINE if BASELINE in runners else next(iter(runners))],
                                     config.min_sample_s)
            times = measure(runners, config.rounds, config.min_rounds, config.max_seconds, calls)
            rows += rows_for(model, backend, batch, times, exact)
            log.info("%s/%s b%d: %s", model, backend, batch,
                     ", ".join(f"{v} {np.median(t) * 1e3:.1f} ms" for v, t in times.items()))
        return rows
    finally:
        for engine in opened.values():
            engine.close()


def run(repo, config: EngineBenchConfig) -> dict:
    """Benchmark every (selected) model on every available backend; skipped backends carry a reason."""
    rows, skipped, not_applicable = [], {}, {}
    for model in config.models or tuple(list_models(repo)):
        manifest = read_manifest(engines.open_model(repo, model)[1])
        not_applicable[model] = dict(manifest.not_applicable)
        for backend in config.backends:
            try:
                rows += bench_model(repo, model, backend, config)
            except (engines.EngineError, engines.ManifestError) as exc:
                skipped[f"{model}/{backend}"] = str(exc)
                log.warning("skipped %s on %s: %s", model, backend, exc)
    return {"rows": rows, "skipped": skipped, "not_applicable": not_applicable, "config": config.__dict__ | {"batch_sizes": list(config.batch_sizes)}}
