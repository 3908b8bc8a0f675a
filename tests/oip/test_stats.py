import math

import numpy as np
import pytest

from oip import stats


def test_interleave_rotates_and_balances_positions():
    schedule = stats.interleave(["a", "b", "c"], 6)
    assert schedule[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for name in "abc":
        positions = [r.index(name) for r in schedule]
        assert sorted(positions) == [0, 0, 1, 1, 2, 2]


def test_interleave_rejects_duplicates_and_negative_rounds():
    with pytest.raises(ValueError, match="distinct"):
        stats.interleave(["a", "a"], 2)
    with pytest.raises(ValueError, match="rounds"):
        stats.interleave(["a"], -1)
    assert stats.interleave([], 2) == [[], []]


def test_percentile_and_summary():
    samples = list(range(1, 101))  # 1..100
    assert stats.percentile(samples, 50) == pytest.approx(50.5)
    assert stats.percentile(samples, 0) == 1
    assert stats.percentile(samples, 100) == 100
    assert math.isnan(stats.percentile([], 50))
    s = stats.summarize([0.001, 0.002, 0.003])
    assert s.n == 3 and s.median == pytest.approx(0.002) and s.minimum == pytest.approx(0.001)
    assert s.as_ms()["p50_ms"] == pytest.approx(2.0)
    assert stats.summarize([]).n == 0
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_ratio_ci_covers_a_known_ratio_and_excludes_one():
    rng = np.random.default_rng(1)
    noise = rng.lognormal(0, 0.05, 60)  # shared per round: paired noise cancels
    base = 0.010 * noise
    fast = 0.008 * noise * rng.lognormal(0, 0.01, 60)
    ci = stats.ratio_ci(base, fast)
    assert ci.contains(0.8)
    assert ci.high < 1.0
    assert ci.low <= ci.estimate <= ci.high


def test_ratio_ci_of_identical_distributions_contains_one():
    rng = np.random.default_rng(2)
    a = rng.lognormal(-4, 0.2, 80)
    b = rng.lognormal(-4, 0.2, 80)
    assert stats.ratio_ci(a, b, paired=False).contains(1.0)


def test_paired_bootstrap_is_tighter_than_unpaired_under_shared_noise():
    rng = np.random.default_rng(3)
    drift = rng.lognormal(0, 0.3, 50)  # the machine slows down and speeds up between rounds
    a, b = 0.01 * drift, 0.009 * drift
    paired = stats.ratio_ci(a, b, paired=True)
    unpaired = stats.ratio_ci(a, b, paired=False)
    assert (paired.high - paired.low) < (unpaired.high - unpaired.low)


def test_paired_bootstrap_needs_equal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        stats.ratio_ci([1.0, 2.0], [1.0])
    assert math.isnan(stats.ratio_ci([], []).estimate)


def test_gain_captured():
    assert stats.gain_captured(10.0, 9.0, 8.0) == pytest.approx(0.5)
    assert stats.gain_captured(10.0, 8.0, 8.0) == pytest.approx(1.0)
    assert stats.gain_captured(10.0, 11.0, 8.0) == pytest.approx(-0.5)
    assert math.isnan(stats.gain_captured(10.0, 9.0, 10.0))  # no bound to capture
    assert math.isnan(stats.gain_captured(10.0, 9.0, 10.5))


def test_gain_captured_ci_brackets_the_truth():
    rng = np.random.default_rng(4)
    drift = rng.lognormal(0, 0.05, 40)
    u, v, n = 0.010 * drift, 0.0095 * drift, 0.009 * drift
    ci = stats.gain_captured_ci(u, v, n)
    assert ci.estimate == pytest.approx(0.5, abs=1e-9)
    assert ci.contains(0.5)


def test_medians_by_label_keeps_first_appearance_order_and_each_labels_own_rows():
    rows = [{"label": "rest", "p50_ms": 1.0, "p99_ms": 3.0, "throughput_rps": 900},
            {"label": "grpc", "p50_ms": 2.0, "p99_ms": 5.0, "throughput_rps": 700},
            {"label": "rest", "p50_ms": 9.0, "p99_ms": 9.0, "throughput_rps": 100},
            {"label": "rest", "p50_ms": 2.0, "p99_ms": 4.0, "throughput_rps": 800}]
    medians = stats.medians_by_label(rows)
    assert list(medians) == ["rest", "grpc"]
    assert medians["rest"] == {"p50_ms": 2.0, "p99_ms": 4.0, "throughput_rps": 800}
    assert medians["grpc"] == {"p50_ms": 2.0, "p99_ms": 5.0, "throughput_rps": 700}
    assert stats.medians_by_label(rows, ("p50_ms",))["rest"] == {"p50_ms": 2.0}
    assert stats.medians_by_label([]) == {}
