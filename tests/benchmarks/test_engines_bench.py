import math

import pytest

from benchmarks import engines_bench
from benchmarks.engines_bench import EngineBenchConfig


def test_measure_interleaves_and_respects_min_rounds():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = engines_bench.measure(runners, rounds=10, min_rounds=3, max_seconds=0.0)
    assert {len(t) for t in times.values()} == {3}  # deadline already passed: stop at min_rounds
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        EngineBenchConfig(rounds=1, min_rounds=2)
    with pytest.raises(ValueError):
        EngineBenchConfig(batch_sizes=(0,))


def test_rows_compute_ratio_and_gain():
    times = {"unfused": [10.0] * 5, "affine": [9.0] * 5, "nonorm": [8.0] * 5}
    rows = {r["variant"]: r for r in engines_bench.rows_for("m", "onnxruntime", 4, times, {"affine": True})}
    assert rows["affine"]["ratio"] == pytest.approx(0.9)
    assert rows["affine"]["gain"] == pytest.approx(0.5)
    assert rows["unfused"]["ratio"] == pytest.approx(1.0) and "gain" not in rows["unfused"]
    assert "gain" not in rows["nonorm"] and rows["nonorm"]["exact"] is False
    assert rows["affine"]["items_per_s"] == pytest.approx(4 / 9.0)


def test_bench_runs_every_variant_of_a_real_repo(bench_repo):
    config = EngineBenchConfig(batch_sizes=(1, 4), rounds=4, min_rounds=2, warmup=1, threads=1,
                               backends=("onnxruntime", "no-such-backend"))
    result = engines_bench.run(bench_repo, config)
    rows = result["rows"]
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in ("unfused", "affine", "nonorm")
                                                          for b in (1, 4)}
    assert all(r["rounds"] == 4 and r["p50_ms"] > 0 for r in rows)
    affine = next(r for r in rows if r["variant"] == "affine" and r["batch"] == 4)
    assert affine["ratio_low"] <= affine["ratio"] <= affine["ratio_high"]
    assert "gain" in affine and (math.isnan(affine["gain"]) or math.isfinite(affine["gain"]))
    assert "tiny/no-such-backend" in result["skipped"]
    assert result["not_applicable"] == {"tiny": {}}


def test_calls_per_sample_makes_samples_long_enough():
    import time

    assert engines_bench.calls_per_sample(lambda: time.sleep(0.03), 0.02) == 1
    assert engines_bench.calls_per_sample(lambda: None, 0.02) > 100
    calls = []
    times = engines_bench.measure({"a": lambda: calls.append(1)}, rounds=3, min_rounds=2, max_seconds=10, calls=5)
    assert len(times["a"]) == 3 and len(calls) == 15
