"""benchmarks/plans_served.py: the arithmetic of its summary (the per-label medians it shares with grpc_bench via
oip.stats.medians_by_label, and served ÷ engine within a round); the run itself is a benchmark, not a test."""

import pytest

from benchmarks.plans_served import ENGINE, summarize_rounds


def row(round_, label, level, p50, rps, batches=None):
    return {"round": round_, "label": label, "level": level, "p50_ms": p50, "p99_ms": 2 * p50,
            "throughput_rps": rps, "ok": 100, "batches": batches or {"sum": 100.0, "count": 25.0}}


def test_medians_per_label_and_the_served_share_of_the_engine_per_round():
    rows = [row(r, label, level, p50, rps)
            for r, scale in enumerate((1.0, 2.0, 1.0))          # round 1: the machine twice as slow for all
            for level in (1, 32)
            for label, p50, rps in ((ENGINE, 1.0, 1000.0), ("rest", 2.0, 900.0), ("grpc", 3.0, 800.0))
            for p50, rps in [(p50 * scale, rps / scale)]]
    summary = summarize_rounds(rows)
    c1 = summary["1"]
    assert list(c1["medians"]) == [ENGINE, "rest", "grpc"]
    assert c1["medians"]["rest"]["p50_ms"] == pytest.approx(2.0) and c1["medians"]["rest"]["p99_ms"] == 4.0
    assert c1["medians"]["grpc"]["throughput_rps"] == pytest.approx(800.0)
    assert c1["medians"]["rest"]["mean_batch"] == pytest.approx(4.0)
    assert c1["vs_engine"]["rest"]["rounds"] == pytest.approx([0.9, 0.9, 0.9])  # paired within each round
    assert c1["vs_engine"]["grpc"]["estimate"] == pytest.approx(0.8)
    assert ENGINE not in c1["vs_engine"] and set(summary) == {"1", "32"}
