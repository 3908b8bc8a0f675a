"""Timing plans against `unfused` on this CPU and picking the default plan (at conversion, and by `normfuse tune`).

The statistics are the conversion's default pick's (convert.pipeline): interleaved rounds (unfused, plan), (plan,
unfused), ..., each timing the best of REPEATS runs, the median paired ratio plan/unfused, and a distribution-free
upper 95% bound of that median. A plan can be the default only when its median clears NOISE and its bound is
below 1, and only when it is exact, reduced precision within its gate, or int8 with --allow-lossy-default.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from convert.default_pick import BUDGET_S, MIN_ROUNDS, NOISE, REPEATS, median_upper_bound
from engines.cpu import detect
from engines.manifest import Manifest, read_manifest, write_manifest
from engines.plans import Plan, admissible, runnable

log = logging.getLogger(__name__)

REFERENCE = "unfused"


def timing_batch(held_out: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`batch` rows of the held-out inputs (repeated when there are fewer)."""
    rows = len(next(iter(held_out.values())))
    index = np.arange(batch) % rows
    return {k: np.ascontiguousarray(v[index]) for k, v in held_out.items()}


def timed(engine, inputs: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    engine.infer(inputs)
    return time.perf_counter() - start


def promising(times: dict[str, list[float]], name: str) -> bool:
    """The plan's median paired ratio so far clears NOISE: worth the MIN_ROUNDS rounds that can make it the
    default (a slow model's time budget allows fewer; a plan that is not faster is not topped up)."""
    ratios = [b / a for a, b in zip(times[REFERENCE], times[name], strict=True)]
    return bool(ratios) and statistics.median(ratios) <= 1 - NOISE


def time_plans(model_dir: Path, manifest: Manifest, plans: dict[str, Plan], held_out: dict[str, np.ndarray],
               options) -> dict[str, list[float]]:
    """Time every servable plan against unfused, paired; record latency_ms on each plan; return the paired ratios.
    `options`: convert.plans.PlanOptions (batch, rounds, threads)."""
    from convert.plans import open_plan

    inputs = timing_batch(held_out, options.batch)
    names = [n for n, p in plans.items() if p.servable and n != REFERENCE]
    key = f"cpu_b{options.batch}"
    baseline, pairs = [], {}
    reference = open_plan(model_dir, manifest, plans[REFERENCE], options.threads)
    try:
        for name in names:
            with open_plan(model_dir, manifest, plans[name], options.threads) as engine:
                pair = {REFERENCE: reference, name: engine}
                warm = max(timed(e, inputs) for e in (engine, reference))  # warm-up; round 0 starts with unfused
                repeats = REPEATS if 3 * 2 * REPEATS * warm <= BUDGET_S else 1  # slow models: single runs
                rounds = max(3, min(options.rounds, int(BUDGET_S / (2 * repeats * warm))))
                times = {REFERENCE: [], name: []}
                r = 0
                while r < rounds or (r < MIN_ROUNDS and promising(times, name)):  # a likely winner gets the
                    for which in ((REFERENCE, name) if r % 2 == 0 else (name, REFERENCE)):  # rounds its bound needs
                        times[which].append(min(timed(pair[which], inputs) for _ in range(repeats)))
                    r += 1
            baseline += times[REFERENCE]
            pairs[name] = [b / a for a, b in zip(times[REFERENCE], times[name], strict=True)]
            plans[name].latency_ms = {f"{key}_median": statistics.median(times[name]) * 1e3,
                                      f"{key}_vs_unfused": statistics.median(pairs[name])}
            bound = median_upper_bound(pairs[name])
            if bound != float("inf"):
                plans[name].latency_ms[f"{key}_vs_unfused_upper95"] = bound
    finally:
        reference.close()
    if baseline:
        plans[REFERENCE].latency_ms = {f"{key}_median": statistics.median(baseline) * 1e3}
    log.info("plan ratios vs unfused: %s", {n: round(statistics.median(p), 3) for n, p in pairs.items()})
    return pairs


def pick_default(plans: dict[str, Plan], pairs: dict[str, list[float]], manifest: Manifest,
                 options) -> tuple[str, str]:
    """(the default plan, why): the fastest admissible plan faster than unfused beyond noise; else the manifest's
    default variant."""
    faster = {n: statistics.median(p) for n, p in pairs.items()
              if admissible(plans[n], manifest, options.allow_lossy_default) and len(p) >= MIN_ROUNDS
              and statistics.median(p) <= 1 - NOISE and median_upper_bound(p) < 1.0}
    if not faster:
        fallback = manifest.default_variant if manifest.default_variant in plans else REFERENCE
        return fallback, f"no admissible plan beat unfused beyond noise ({NOISE:.0%}, 95% bound): {fallback}"
    best = min(faster, key=faster.__getitem__)
    plan = plans[best]
    kind = "exact" if plan.exact else f"{plan.precision} within its gate"
    return best, f"fastest admissible plan ({kind}): {faster[best]:.3f}x unfused's time"


def retime(model_dir: Path, options) -> Manifest:
    """`normfuse tune`: re-time a converted model's plans on this CPU (plans it cannot run natively are not
    timed and cannot be the default), update the default and the CPU, rewrite the manifest; return it. An int8
    plan may become the default only if the model was converted with --allow-lossy-default."""
    from convert.tensorrt.parity import parity_inputs

    manifest = read_manifest(model_dir)
    if manifest.plans is None:
        raise ValueError(f"{model_dir} has no plans: re-convert it with `normfuse convert ... --engines "
                         "onnxruntime,openvino` first")
    cpu = detect()
    plans = {n: p.model_copy(deep=True) for n, p in manifest.plans.plans.items()}
    for plan in plans.values():
        ok, why = runnable(plan, cpu)
        if plan.servable and not ok:
            plan.latency_ms = {}
            log.warning("plan %s is not timed on this CPU: %s", plan.name, why)
    timed_here = {n: p for n, p in plans.items() if not p.servable or runnable(p, cpu)[0]}
    pairs = time_plans(model_dir, manifest, timed_here, parity_inputs(model_dir, manifest.inputs), options)
    options = replace(options, allow_lossy_default=manifest.allow_lossy_default)  # the conversion decided that
    default, why = pick_default(plans, pairs, manifest, options)
    updated = manifest.plans.model_copy(update={"cpu": cpu, "plans": plans, "default": default,
                                                "timing": {**manifest.plans.timing, "default_reason": why,
                                                           "retimed": "normfuse tune"}})
    manifest = manifest.model_copy(update={"plans": updated})
    write_manifest(model_dir, manifest)
    return manifest
