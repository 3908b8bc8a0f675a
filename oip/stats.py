"""Statistics for honest latency comparisons: interleaved schedules, percentiles, bootstrap intervals.

The one implementation the benchmarks and the server's /compare (service.shadow) both use. Pure functions over
lists/arrays of seconds; nothing here runs a model. Comparisons between variants
are *paired*: the variants run interleaved (A B C, B C A, …), round i of every variant shares the same
moment of machine noise, so the bootstrap resamples whole rounds rather than each list on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def interleave(names: Sequence[str], rounds: int) -> list[list[str]]:
    """One list per round holding every name once; the order rotates each round (A B C, B C A, C A B…).

    Rotation keeps each name's position in the round balanced, so a warm cache or a noisy neighbour
    favours no variant systematically.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    n = len(names)
    return [names[r % n:] + names[: r % n] if n else [] for r in range(rounds)]


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation; NaN for no samples."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if len(samples) == 0:
        return math.nan
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


@dataclass(frozen=True)
class Summary:
    """Order statistics of one set of latency samples (seconds)."""

    n: int
    median: float
    p90: float
    p99: float
    mean: float
    minimum: float

    def as_ms(self) -> dict[str, float]:
        return {
            "n": self.n,
            "p50_ms": self.median * 1e3,
            "p90_ms": self.p90 * 1e3,
            "p99_ms": self.p99 * 1e3,
            "mean_ms": self.mean * 1e3,
            "min_ms": self.minimum * 1e3,
        }


def summarize(samples: Sequence[float]) -> Summary:
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Summary(int(a.size), float(p50), float(p90), float(p99), float(a.mean()), float(a.min()))


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    statistic: Callable[..., float],
    *samples: Sequence[float],
    paired: bool = True,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of `statistic(*samples)`.

    paired=True resamples the same indices in every sample (they must have equal lengths: round i of
    each variant ran back to back); paired=False resamples each sample on its own. NaN results of the
    statistic on a resample (e.g. an undefined ratio) are dropped; an all-NaN bootstrap gives NaN bounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if not arrays or any(a.size == 0 for a in arrays):
        return Interval(math.nan, math.nan, math.nan, confidence)
    if paired and len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired bootstrap needs equal lengths, got {[a.size for a in arrays]}")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*arrays))
    values = np.empty(resamples)
    for i in range(resamples):
        if paired:
            idx = rng.integers(0, arrays[0].size, arrays[0].size)
            drawn = [a[idx] for a in arrays]
        else:
            drawn = [a[rng.integers(0, a.size, a.size)] for a in arrays]
        values[i] = statistic(*drawn)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan, confidence)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), confidence)


def median_ratio(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """median(candidate) / median(baseline): below 1 means the candidate is faster."""
    return float(np.median(candidate) / np.median(baseline))


def ratio_ci(baseline: Sequence[float], candidate: Sequence[float], **kwargs) -> Interval:
    """median(candidate) ÷ median(baseline) with a (paired by default) bootstrap interval."""
    return bootstrap(median_ratio, baseline, candidate, **kwargs)


def gain_captured(t_unfused: float, t_variant: float, t_nonorm: float) -> float:
    """(T_unfused − T_variant) / (T_unfused − T_nonorm): the share of the no-norm bound a variant takes.

    1.0 means the variant is as fast as having no norms at all, 0 means no gain, negative means slower
    than unfused. NaN when the bound is not positive (removing the norms did not help measurably, so
    there is nothing to capture and the ratio would be noise divided by noise).
    """
    bound = t_unfused - t_nonorm
    if not bound > 0:
        return math.nan
    return (t_unfused - t_variant) / bound


def gain_captured_ci(
    unfused: Sequence[float], variant: Sequence[float], nonorm: Sequence[float], **kwargs
) -> Interval:
    """gain_captured on medians, with a paired bootstrap interval over interleaved rounds."""

    def statistic(u: np.ndarray, v: np.ndarray, n: np.ndarray) -> float:
        return gain_captured(float(np.median(u)), float(np.median(v)), float(np.median(n)))

    return bootstrap(statistic, unfused, variant, nonorm, **kwargs)
