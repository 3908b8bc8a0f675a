"""The conversion-time default pick is statistically safe: a fused variant becomes the default only when its
speed-up's 95% interval excludes 1 over enough rounds, and never when it lost a fusion."""

import pytest

from convert.default_pick import MIN_ROUNDS, NOISE, is_safe_default, median_upper_bound
from engines.manifest import VariantInfo


def info(flags=(), servable=True):
    return VariantInfo(name="affine", description="", exact=True, benchmark_only=False, servable=servable,
                       files={}, parity=[], op_census={"total": 1}, flags=list(flags))


def test_the_bound_needs_every_round_won_with_five_rounds():
    assert median_upper_bound([0.9, 0.9, 0.9, 0.9, 0.95]) == 0.95
    assert median_upper_bound([0.9, 0.9, 0.9, 0.9, 1.2]) == 1.2
    assert median_upper_bound([0.9, 0.9, 0.9]) == float("inf")  # 3 rounds can never exclude 1


def test_the_bound_allows_one_lost_round_of_eight():
    assert median_upper_bound([0.9] * 7 + [1.3]) < 1.0  # P(Bin(8, ½) ≤ 6) = 0.965


@pytest.mark.parametrize(("ratios", "flags", "servable", "expected"), [
    ([0.9] * 7, (), True, True),
    ([0.9] * 7 + [1.05], (), True, True),  # one slower round of 8 still bounds the median below 1
    ([0.9] * 6 + [1.05], (), True, False),  # one of 7: the interval reaches above 1 (a flip between runs)
    ([1 - NOISE / 2] * 7, (), True, False),  # consistently faster, but by less than the noise margin
    ([0.9] * 7, ("lost-fusion:SkipLayerNormalization (0 Skip* ops vs 2 in unfused)",), True, False),
    ([0.9] * 7, (), False, False),
    ([0.5] * (MIN_ROUNDS - 1), (), True, False),
])
def test_is_safe_default(ratios, flags, servable, expected):
    assert is_safe_default(info(flags, servable), ratios) is expected
