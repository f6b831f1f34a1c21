"""validate's pass rule on recorded numbers: |error| <= max(target, the real repeats' spread) for each cell."""

from __future__ import annotations

import pytest

from calib.judge import MIN_REPEATS, judge, misses, rel_errors, repeat_summary

STATS = ("mean", "p50", "p90", "p99")


def summary(ttft_mean: float, ttft_p99: float = 2.0, tpot_mean: float = 0.05, throughput: float = 1.0) -> dict:
    """A run summary with the fields the rule reads (the other statistics fixed)."""
    return {"ttft_s": {"mean": ttft_mean, "p50": 0.5, "p90": 1.5, "p99": ttft_p99},
            "tpot_s": {"mean": tpot_mean, "p50": 0.05, "p90": 0.08, "p99": 0.1},
            "e2e_s": {"mean": 3.0, "p50": 2.5, "p90": 5.0, "p99": 7.0},
            "throughput_rps": throughput, "num_requests": 200, "num_finished": 200}


# three real repeats of one load as a shared machine gives them: TTFT mean 1.00 / 1.08 / 0.96 s (a spread of
# 11.8 % of their mean), TTFT p99 within 2 %, TPOT and throughput identical
REPEATS = [summary(1.00, 2.00), summary(1.08, 2.04), summary(0.96, 2.01)]


def test_the_measured_value_is_the_repeats_mean_and_the_spread_their_range_over_it():
    measured, spread = repeat_summary(REPEATS)
    assert measured["ttft_s"]["mean"] == pytest.approx(1.0133333)
    assert spread["ttft_s"]["mean"] == pytest.approx(0.12 / 1.0133333)
    assert spread["ttft_s"]["p99"] == pytest.approx(0.04 / (6.05 / 3))
    assert spread["tpot_s"]["mean"] == 0.0 and spread["throughput_rps"] == 0.0
    assert measured["num_repeats"] == 3 and measured["num_finished"] == 200
    one, none_spread = repeat_summary(REPEATS[:1])
    assert one["ttft_s"]["mean"] == 1.00 and none_spread["ttft_s"]["mean"] is None


def test_an_error_inside_the_repeats_spread_passes_though_it_is_over_the_target():
    measured, spread = repeat_summary(REPEATS)
    predicted = summary(1.10, 2.05)  # TTFT mean +8.6 %: over 5 %, inside the 11.8 % spread
    rel = rel_errors(measured, predicted)
    verdict = judge(rel, spread, num_repeats=3)
    cell = verdict["ttft_s"]["mean"]
    assert cell["error"] == pytest.approx(0.0855, abs=1e-3) and cell["allowed"] == pytest.approx(0.1184, abs=1e-3)
    assert cell["pass"] is True
    # p99 +1.6 % against a 2 % spread and a 10 % target: the target sets the bound
    assert verdict["ttft_s"]["p99"]["allowed"] == 0.10 and verdict["ttft_s"]["p99"]["pass"] is True
    assert misses(rel, spread, 3) == []


def test_an_error_over_both_the_target_and_the_spread_misses():
    measured, spread = repeat_summary(REPEATS)
    rel = rel_errors(measured, summary(1.20, 2.30, tpot_mean=0.0526, throughput=0.94))
    verdict = judge(rel, spread, 3)
    assert verdict["ttft_s"]["mean"]["pass"] is False  # +18 % > 11.8 %
    assert verdict["ttft_s"]["p99"]["pass"] is False  # +14 % > max(10 %, 2 %)
    assert verdict["tpot_s"]["mean"]["pass"] is False  # +5.2 % > max(5 %, 0 %)
    assert verdict["throughput_rps"]["pass"] is False  # -6 % > 5 %
    assert misses(rel, spread, 3) == ["ttft_s mean +18.4%", "ttft_s p99 +14.0%", "tpot_s mean +5.2%",
                                      "throughput -6.0%"]


def test_fewer_repeats_than_the_minimum_judge_by_the_targets_alone():
    measured, spread = repeat_summary(REPEATS[:2])  # TTFT mean 1.00 / 1.08: spread 7.7 %
    rel = rel_errors(measured, summary(1.10, 2.05))  # +5.8 %
    assert judge(rel, spread, num_repeats=2)["ttft_s"]["mean"]["pass"] is False
    assert judge(rel, spread, num_repeats=MIN_REPEATS)["ttft_s"]["mean"]["pass"] is True
    assert judge(rel)["ttft_s"]["mean"]["allowed"] == 0.05


def test_p50_is_reported_not_judged_and_an_undefined_error_neither_passes_nor_misses():
    measured, spread = repeat_summary(REPEATS)
    rel = rel_errors(measured, summary(1.0, 2.0))
    verdict = judge(rel, spread, 3)
    assert set(verdict["ttft_s"]) == {"mean", "p90", "p99"}
    rel["e2e_s"]["p90"] = None  # e.g. no request finished on one side
    assert judge(rel, spread, 3)["e2e_s"]["p90"]["pass"] is None
    assert misses(rel, spread, 3) == []
