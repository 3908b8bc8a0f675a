"""Statistics for honest latency comparisons: interleaved schedules, percentiles, bootstrap intervals.

The one implementation the benchmarks and the server's /compare (service.shadow) both use. Pure functions over
lists/arrays of seconds; nothing here runs a model. Comparisons between variants
are *paired*: the variants run interleaved (A B C, B C A, …), round i of every variant shares the same
moment of machine noise, so the bootstrap resamples whole rounds rather than each list on its own.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
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


STEP_FIGURES = ("p50_ms", "p99_ms", "throughput_rps")  # what a load-generator step row reports


def medians_by_label(rows: Sequence[Mapping], keys: Sequence[str] = STEP_FIGURES) -> dict[str, dict[str, float]]:
    """label -> {key: median over the rows of that label}, labels in the order they first appear: each target's
    figures over a benchmark's rounds (rows are dicts with a "label" and each of `keys`)."""
    labels = dict.fromkeys(row["label"] for row in rows)
    return {label: {key: statistics.median(row[key] for row in rows if row["label"] == label) for key in keys}
            for label in labels}


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
    """Percentile bootstrap interval of `statistic(*samples)`, resampled by `scipy.stats.bootstrap`.

    paired=True resamples the same indices in every sample (they must have equal lengths: round i of
    each variant ran back to back); paired=False resamples each sample on its own. A statistic taking an
    `axis` keyword (np.median; the ones below) is evaluated on all resamples at once. NaN results of the
    statistic on a resample (e.g. an undefined ratio) are dropped; an all-NaN bootstrap gives NaN bounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if not arrays or any(a.size == 0 for a in arrays):
        return Interval(math.nan, math.nan, math.nan, confidence)
    if paired and len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired bootstrap needs equal lengths, got {[a.size for a in arrays]}")
    estimate = float(statistic(*arrays))
    if min(a.size for a in arrays) < 2:  # every resample of one value is that value (scipy refuses to resample it)
        return Interval(estimate, estimate, estimate, confidence) if not math.isnan(estimate) else \
            Interval(estimate, math.nan, math.nan, confidence)
    values = _resampled(statistic, arrays, paired, resamples, np.random.default_rng(seed))
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan, confidence)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), confidence)


def _resampled(statistic: Callable[..., float], arrays: list[np.ndarray], paired: bool, resamples: int,
               rng: np.random.Generator) -> np.ndarray:
    """The statistic on each of `resamples` bootstrap resamples (scipy draws them; we take the percentiles
    ourselves so that a NaN resample is dropped rather than turning the whole interval into NaN)."""
    from scipy.stats import DegenerateDataWarning
    from scipy.stats import bootstrap as scipy_bootstrap

    # scipy warns when its own interval is NaN (some resample's statistic was NaN): we drop those instead
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = scipy_bootstrap(tuple(arrays), statistic, n_resamples=resamples, paired=paired,
                                 method="percentile", rng=rng)
    return np.asarray(result.bootstrap_distribution, dtype=np.float64).reshape(-1)


def median_ratio(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """median(candidate) / median(baseline): below 1 means the candidate is faster."""
    return float(np.median(candidate) / np.median(baseline))


def ratio_ci(baseline: Sequence[float], candidate: Sequence[float], **kwargs) -> Interval:
    """median(candidate) ÷ median(baseline) with a (paired by default) bootstrap interval."""

    def statistic(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:  # every resample at once
        return np.median(c, axis=axis) / np.median(b, axis=axis)

    return bootstrap(statistic, baseline, candidate, **kwargs)


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

    def statistic(u: np.ndarray, v: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:  # every resample at once
        t_u, t_v, t_n = (np.median(x, axis=axis) for x in (u, v, n))
        bound = t_u - t_n
        return np.where(bound > 0, (t_u - t_v) / np.where(bound > 0, bound, 1.0), np.nan)  # gain_captured's rule

    return bootstrap(statistic, unfused, variant, nonorm, **kwargs)
