"""The default pick: which variant a server runs unless told otherwise.

unfused and each other variant are timed interleaved on ONNX Runtime (A B, B A, ...); a variant becomes the
default only when it is servable, lost no fusion, and is faster beyond noise: its median paired ratio
(variant/unfused) is at most 1 - NOISE and a distribution-free 95% upper bound of that median (a binomial
quantile: `median_upper_bound`) is below 1. Otherwise `unfused` stays the default.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from convert.export import ort_session
from convert.memory import release_memory
from engines.manifest import VariantInfo

if TYPE_CHECKING:
    from convert.context import Context

log = logging.getLogger(__name__)

NOISE = 0.03  # a variant must be ≥ 3% faster (median of paired ratios, its 95% bound below 1) to become the default
REPEATS = 3  # each timing is the best of 3 runs: noise on a shared machine only ever adds time
BUDGET_S = 6.0  # seconds per (unfused, variant) pair; fewer rounds (at least 3) for slow models


BOTH_SESSIONS_MAX_BYTES = 256 * 1024**2  # two ONNX files at most this large are benchmarked with both sessions open


def benchmark(ctx: Context, built: dict[str, VariantInfo], rounds: int, batch: int, *, progress: bool,
              allow_lossy: bool = False) -> str:
    """Time unfused against each other variant, interleaved (A B, B A, ...); record the timings in `built` and
    return the default variant (unfused unless a variant is a safe default: `is_safe_default`)."""
    inputs = ctx.source.sample_inputs(batch)
    paths = {name: ctx.staging / info.files["onnx"].path for name, info in built.items()}
    others = [v for v in built if v != "unfused"]
    key = f"ort_cpu_b{batch}"
    baseline_times, pairs = [], {}
    with tqdm(total=rounds * len(others), desc="benchmark", unit="round", disable=not progress) as bar:
        for variant in others:
            times = time_pair(paths["unfused"], paths[variant], inputs, rounds, threads=ctx.threads, bar=bar)
            baseline_times += times["unfused"]
            pairs[variant] = [b / a for a, b in zip(times["unfused"], times["variant"], strict=True)]
            record(built[variant], key, times["variant"], pairs[variant])
    built["unfused"].latency_ms = {f"{key}_median": statistics.median(baseline_times) * 1e3}
    ratios = {v: statistics.median(paired) for v, paired in pairs.items()}
    faster = [v for v in others if (built[v].exact or allow_lossy) and is_safe_default(built[v], pairs[v])]
    log.info("benchmark ratios vs unfused: %s", {v: round(r, 3) for v, r in ratios.items()})
    return min(faster, key=ratios.__getitem__) if faster else "unfused"


def time_pair(unfused: Path, variant: Path, inputs: dict[str, np.ndarray], rounds: int, *, threads: int | None,
              bar) -> dict[str, list[float]]:
    """{"unfused": [...], "variant": [...]}: one time per round for each model, interleaved A B, B A, ...

    `rounds` rounds, fewer (at least 3) for slow models so a pair takes about BUDGET_S. The order A B B A A B ...
    runs each model twice in a row, so when the two ONNX files together are over BOTH_SESSIONS_MAX_BYTES only one
    session is open at a time (reopened once per round: GPT-2-small's two sessions together would hold 1.5 GB);
    smaller models keep both open. Each time is the best of REPEATS runs, so the first run of a reopened session
    does not count against it.
    """
    pair = Sessions(unfused, variant, threads=threads)
    warm = max(timed(pair.get(name), inputs) for name in ("variant", "unfused"))  # warm-up; round 0 starts with unfused
    pair_rounds = max(3, min(rounds, int(BUDGET_S / (2 * REPEATS * warm))))
    times = {"unfused": [], "variant": []}
    for r in range(pair_rounds):
        for name in (("unfused", "variant") if r % 2 == 0 else ("variant", "unfused")):
            session = pair.get(name)
            times[name].append(min(timed(session, inputs) for _ in range(REPEATS)))
            del session
        bar.update()
    bar.update(rounds - pair_rounds)
    pair.close()
    return times


def record(info: VariantInfo, key: str, times: list[float], paired: list[float]) -> None:
    """A variant's timings in its manifest entry: its median, the median paired ratio to unfused, the share of
    rounds it won, and the ratio's upper 95% bound when there are rounds enough for one."""
    info.latency_ms = {f"{key}_median": statistics.median(times) * 1e3,
                       f"{key}_vs_unfused": statistics.median(paired),
                       f"{key}_win_rate": sum(r < 1 for r in paired) / len(paired)}
    if math.isfinite(bound := median_upper_bound(paired)):
        info.latency_ms[f"{key}_vs_unfused_upper95"] = bound


MIN_ROUNDS = 5  # fewer paired rounds cannot exclude 1 at 95% with a sign-based interval


def median_upper_bound(ratios: list[float], confidence: float = 0.95) -> float:
    """A distribution-free one-sided upper confidence bound of the median paired ratio (variant/unfused).

    The true median is ≤ the j-th smallest ratio with probability P(Binomial(n, ½) ≤ j−1); take the
    smallest j reaching `confidence` (with n = 5 that is the largest ratio: all five rounds must be won).
    inf when there are too few rounds for any bound.
    """
    from scipy.stats import binom

    ordered, n = sorted(ratios), len(ratios)
    below = int(binom.ppf(confidence, n, 0.5))  # j - 1: the smallest k with P(Binomial(n, ½) ≤ k) ≥ confidence
    return ordered[below] if below < n else math.inf


def is_safe_default(info: VariantInfo, paired: list[float]) -> bool:
    """A fused variant becomes the default only when it is servable, lost no fusion, ran MIN_ROUNDS rounds,
    its median ratio clears NOISE, and the upper 95% bound of that median excludes 1 (it is faster)."""
    if not info.servable or any(flag.startswith("lost-fusion") for flag in info.flags) or len(paired) < MIN_ROUNDS:
        return False
    return statistics.median(paired) <= 1 - NOISE and median_upper_bound(paired) < 1.0


class Sessions:
    """The benchmark's two ONNX Runtime sessions: both open for small models, one at a time for large ones."""

    def __init__(self, *paths: Path, threads: int | None) -> None:
        self.paths = dict(zip(("unfused", "variant"), paths, strict=True))
        self.threads = threads
        self.both = sum(p.stat().st_size for p in paths) <= BOTH_SESSIONS_MAX_BYTES
        self.open: dict[Path, object] = {}
        self.opened = 0  # sessions created (a test reads it)

    def get(self, name: str):
        path = self.paths["unfused" if name == "unfused" else "variant"]
        if path not in self.open:
            if not self.both:
                self.close()  # the other session's memory is given back before this one is built
            self.open[path] = ort_session(path, threads=self.threads)
            self.opened += 1
        return self.open[path]

    def close(self) -> None:
        self.open.clear()
        release_memory()


def timed(session, inputs: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, inputs)
    return time.perf_counter() - start
