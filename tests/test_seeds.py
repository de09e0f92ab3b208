"""Seeded comparisons: mean ± sd, and 'tie' under 2 sd of the difference."""

import pytest

from moe_tutorial.seeds import combined_sd, describe, mean_sd, verdict, verdict_of_stats


def test_mean_sd_is_the_sample_sd_and_refuses_one_seed():
    mean, sd = mean_sd([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == 1.0  # sample (n - 1) standard deviation
    with pytest.raises(ValueError, match="at least 2 runs"):
        mean_sd([1.0])


def test_verdict_calls_only_differences_beyond_two_sd():
    base = [2.00, 2.01, 1.99]  # sd 0.01
    assert verdict([1.90, 1.91, 1.89], base) == "lower"  # 0.10 apart, 2 sd of the difference = 0.028
    assert verdict([2.10, 2.11, 2.09], base) == "higher"
    assert verdict([1.98, 1.99, 1.97], base) == "tie"  # 0.02 apart: under 0.028
    assert verdict([1.90, 2.10, 2.00], base) == "tie"  # same gap as none, but noisy


def test_describe_says_tie_and_both_means():
    text = describe("MoE", [1.98, 1.99, 1.97], "dense", [2.00, 2.01, 1.99])
    assert "MoE 1.9800 ± 0.0100 vs dense 2.0000 ± 0.0100" in text and "-0.0200" in text and "a tie" in text
    assert "lower by more than 2 sd" in describe("MoE", [1.90, 1.91, 1.89], "dense", [2.00, 2.01, 1.99])


def test_the_rule_from_summaries_is_the_same_rule():
    assert verdict_of_stats(1.90, 0.01, 2.00, 0.01) == "lower"
    assert verdict_of_stats(2.10, 0.01, 2.00, 0.01) == "higher"
    assert verdict_of_stats(1.98, 0.01, 2.00, 0.01) == "tie"  # 0.02 <= 2 * sqrt(2) * 0.01


def test_combined_sd_is_the_spread_the_rule_measures_a_difference_against():
    a, b = [1.0, 2.0, 3.0], [2.0, 2.0, 5.0]  # sds 1 and sqrt(3)
    assert combined_sd(a, b) == pytest.approx(2.0)
    assert combined_sd(a, b, a, b) == pytest.approx(8 ** 0.5)  # a difference of two differences
    assert verdict_of_stats(0.0, 1.0, 4.0, 3 ** 0.5) == "tie" and 4.0 <= 2 * combined_sd(a, b)  # at the boundary
    with pytest.raises(ValueError, match="at least 2 runs"):
        combined_sd(a, [1.0])
