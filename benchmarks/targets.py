"""The issue's performance targets, each checked against one run's results: measured value, met or missed.

Targets are goals reported against, not test assertions. A target whose inputs were not measured
(a peer skipped, no no-norm bound) is reported as "not measured" with the reason, never as met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Target:
    goal: str
    measured: str
    met: bool | None  # None: not measured / undefined

    @property
    def verdict(self) -> str:
        return {True: "met", False: "missed", None: "not measured"}[self.met]


def _closed(serving: dict, server: str, protocol: str, *, level: int | None = None, batch: int = 1) -> list[dict]:
    return [r for r in serving.get("closed", []) if r["server"] == server and r["protocol"] == protocol
            and r["batch"] == batch and (level is None or r["level"] == level) and r["ok"] > 0]


def _engine(serving: dict, batch: int) -> dict | None:
    return next((r for r in serving.get("engine", []) if r["batch"] == batch), None)


def gain_target(engine_rows: list[dict]) -> Target:
    exact = [r for r in engine_rows if r.get("exact") and r["variant"] != "unfused"]
    gains = [r for r in exact if "gain" in r]
    defined = [r for r in gains if not math.isnan(r["gain"])]
    if not defined:
        why = "no no-norm bound built" if not gains else "removing the norms gave no measurable gain"
        return Target("every exact variant captures ≥ 80% of the no-norm bound", why, None)
    worst = min(defined, key=lambda r: r["gain"])
    undefined = len(gains) - len(defined)
    text = (f"worst {worst['gain']:.0%} ({worst['model']} b{worst['batch']} {worst['variant']}); "
            f"{sum(r['gain'] >= 0.8 for r in defined)}/{len(defined)} cases ≥ 80%"
            + (f"; {undefined} cases undefined (bound ≤ 0)" if undefined else ""))
    return Target("every exact variant captures ≥ 80% of the no-norm bound", text,
                  all(r["gain"] >= 0.8 for r in defined))


def never_slower_target(engine_rows: list[dict]) -> Target:
    exact = [r for r in engine_rows if r.get("exact") and r["variant"] != "unfused" and "ratio" in r]
    if not exact:
        return Target("every exact variant is never slower than unfused", "no exact variant measured", None)
    slower = [r for r in exact if r["ratio_low"] > 1.0]
    worst = max(exact, key=lambda r: r["ratio"])
    text = (f"{len(slower)}/{len(exact)} cases significantly slower (95% CI above 1); worst median ratio "
            f"{worst['ratio']:.3f} [{worst['ratio_low']:.3f}, {worst['ratio_high']:.3f}] "
            f"({worst['model']} b{worst['batch']} {worst['variant']})")
    return Target("every exact variant is never slower than unfused", text, not slower)


def overhead_target(serving: dict, protocol: str, limit_ms: float) -> Target:
    goal = f"at concurrency 1 the server adds ≤ {limit_ms:g} ms ({protocol}) to the engine's p50"
    rows, engine = _closed(serving, "normfuse", protocol, level=1), _engine(serving, 1)
    if not rows or engine is None:
        return Target(goal, "normfuse or the raw engine not measured", None)
    added = rows[0]["p50_ms"] - engine["p50_ms"]
    return Target(goal, f"+{added:.2f} ms (server p50 {rows[0]['p50_ms']:.2f} ms, engine "
                        f"{engine['p50_ms']:.2f} ms, batch 1)", added <= limit_ms)


def saturation_target(serving: dict, max_batch: int) -> Target:
    goal = "saturated throughput ≥ 90% of the raw engine at the same batch size"
    engine = _engine(serving, max_batch)
    rows = [r for r in serving.get("closed", []) if r["server"] == "normfuse" and r["batch"] == max_batch
            and r["level"] > 1 and r["ok"]]
    if not rows or engine is None:
        return Target(goal, f"normfuse with concurrent batch-{max_batch} requests or the raw engine not measured",
                      None)
    best = max(rows, key=lambda r: r["items_per_s"])
    share = best["items_per_s"] / engine["items_per_s"]
    return Target(goal, f"{share:.0%}: {best['items_per_s']:.0f} items/s ({best['protocol']}, {best['level']} "
                        f"concurrent batch-{max_batch} requests) vs engine {engine['items_per_s']:.0f} items/s "
                        f"at batch {max_batch}", share >= 0.9)


def triton_target(serving: dict) -> Target:
    goal = "≥ Triton's throughput at concurrency 32 and a lower p50 at concurrency 1 (binary)"
    ours32, theirs32 = _closed(serving, "normfuse", "binary", level=32), _closed(serving, "triton", "binary", level=32)
    ours1, theirs1 = _closed(serving, "normfuse", "binary", level=1), _closed(serving, "triton", "binary", level=1)
    if not (ours32 and theirs32 and ours1 and theirs1):
        return Target(goal, serving.get("skipped", {}).get("triton", "normfuse or Triton not measured"), None)
    a, b = ours32[0]["throughput_rps"], theirs32[0]["throughput_rps"]
    p, q = ours1[0]["p50_ms"], theirs1[0]["p50_ms"]
    return Target(goal, f"c32: {a:.0f} vs {b:.0f} req/s ({a / b:.2f}×); c1 p50: {p:.2f} vs {q:.2f} ms",
                  a >= b and p < q)


def throughput_at_p99(rows: list[dict], p99_ms: float) -> float:
    """The best throughput among sweep points whose p99 is within `p99_ms` (0 if none)."""
    return max((r["throughput_rps"] for r in rows if r["p99_ms"] <= p99_ms), default=0.0)


def litserve_target(serving: dict) -> Target:
    goal = "≥ 1.5× LitServe's throughput at equal p99 (JSON)"
    ours, theirs = _closed(serving, "normfuse", "json"), _closed(serving, "litserve", "json")
    if not (ours and theirs):
        return Target(goal, serving.get("skipped", {}).get("litserve", "normfuse or LitServe not measured"), None)
    peak = max(theirs, key=lambda r: r["throughput_rps"])
    mine = throughput_at_p99(ours, peak["p99_ms"])
    ratio = mine / peak["throughput_rps"]
    return Target(goal, f"{ratio:.2f}×: LitServe peak {peak['throughput_rps']:.0f} req/s at p99 "
                        f"{peak['p99_ms']:.1f} ms; normfuse {mine:.0f} req/s within that p99", ratio >= 1.5)


def plain_target(serving: dict) -> Target:
    goal = "≥ 3× the per-request endpoint at concurrency 32 (per-item cost falls with batch size)"
    ours, theirs = _closed(serving, "normfuse", "binary", level=32), _closed(serving, "plain", "binary", level=32)
    e1, e16 = _engine(serving, 1), _engine(serving, max(r["batch"] for r in serving.get("engine", [{"batch": 1}])))
    if not (ours and theirs and e1 and e16):
        return Target(goal, serving.get("skipped", {}).get("plain", "normfuse or the plain peer not measured"), None)
    ratio = ours[0]["throughput_rps"] / theirs[0]["throughput_rps"]
    falls = e16["items_per_s"] / e1["items_per_s"]
    return Target(goal, f"{ratio:.2f}× ({ours[0]['throughput_rps']:.0f} vs {theirs[0]['throughput_rps']:.0f} "
                        f"req/s); engine items/s at b{e16['batch']} ÷ b1 = {falls:.2f}", ratio >= 3.0)


def evaluate(engine_rows: list[dict], serving: dict | None, max_batch: int = 16) -> list[Target]:
    targets = [gain_target(engine_rows), never_slower_target(engine_rows)]
    if serving:
        targets += [overhead_target(serving, "binary", 1.0), overhead_target(serving, "json", 2.0),
                    saturation_target(serving, max_batch), triton_target(serving), litserve_target(serving),
                    plain_target(serving)]
    return targets
