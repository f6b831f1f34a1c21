"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest

from scheduler.request import FinishReason
from sim.metrics import inter_token_latencies, parse_slo, percentiles, request_latencies, summarize
from sim.records import RequestRecord, RunResult, StepSample

approx = pytest.approx


def _rec(rid, arrival, sched, first, finish, tokens, prompt, cached=0, reason="stop"):
    return RequestRecord(
        request_id=rid,
        arrival_s=arrival,
        num_prompt_tokens=prompt,
        max_tokens=16,
        first_scheduled_s=sched,
        first_token_s=first,
        finish_s=finish,
        token_times_s=list(tokens),
        num_output_tokens=len(tokens),
        num_cached_tokens=cached,
        finish_reason=reason,
    )


def make_run(policy="continuous", duration_s=3.0) -> RunResult:
    """Three finished requests (A, B, C) and one each of rejected, aborted, error and unfinished."""
    records = [
        # A: TTFT 1.0, TPOT 0.5, E2E 2.0, queue 0.5, gaps 0.5 0.5
        _rec("A", 0.0, 0.5, 1.0, 2.0, [1.0, 1.5, 2.0], prompt=10, cached=4, reason="stop"),
        # B: TTFT 0.2, TPOT 0.45, E2E 2.0, queue 0.0, gaps 0.2 0.2 0.6 0.8
        _rec("B", 1.0, 1.0, 1.2, 3.0, [1.2, 1.4, 1.6, 2.2, 3.0], prompt=20, reason=FinishReason.LENGTH),
        # C: TTFT 1.0, no TPOT (one token), E2E 1.0, queue 0.5
        _rec("C", 2.0, 2.5, 3.0, 3.0, [3.0], prompt=10, cached=6, reason="stop"),
        _rec("D", 0.5, None, None, 0.5, [], prompt=5000, reason="rejected"),
        _rec("E", 0.2, 0.3, 0.6, 0.7, [0.6, 0.7], prompt=10, cached=10, reason=FinishReason.ABORT),
        _rec("F", 0.3, 0.3, None, 0.4, [], prompt=10, reason="error"),
        _rec("G", 2.9, None, None, None, [], prompt=10, reason=None),
    ]
    steps = [
        StepSample(0, 0.0, 0.5, num_seqs=1, num_prefill_tokens=10, num_decode_seqs=0, num_waiting=2,
                   num_running=1, kv_used_blocks=2, kv_total_blocks=10),
        StepSample(0, 0.5, 1.0, num_seqs=2, num_prefill_tokens=0, num_decode_seqs=2, num_waiting=1,
                   num_running=2, kv_used_blocks=5, kv_total_blocks=10),
        StepSample(0, 1.0, 1.5, num_seqs=3, num_prefill_tokens=0, num_decode_seqs=3, num_waiting=0,
                   num_running=3, kv_used_blocks=8, kv_total_blocks=10),
    ]  # fmt: skip
    return RunResult(policy, records, steps, duration_s, num_preemptions=2, num_recomputed_tokens=17)


def test_percentiles_known_values():
    p = percentiles([4.0, 1.0, 3.0, 2.0])
    assert p == {"mean": 2.5, "p50": 2.5, "p90": approx(3.7), "p99": approx(3.97)}
    assert all(isinstance(v, float) for v in p.values())


def test_percentiles_empty_and_none_ignored():
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert percentiles([None, 2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}


def test_request_latencies():
    lat = request_latencies(make_run().records[0])
    assert lat == {"ttft_s": 1.0, "tpot_s": 0.5, "e2e_s": 2.0, "queue_s": 0.5}
    single = request_latencies(make_run().records[2])
    assert single["tpot_s"] is None


def test_counts_and_throughput():
    s = summarize(make_run())
    assert s["policy"] == "continuous"
    assert s["num_requests"] == 7
    assert s["num_finished"] == 3
    assert (s["num_rejected"], s["num_aborted"], s["num_errors"], s["num_unfinished"]) == (1, 1, 1, 1)
    assert s["duration_s"] == 3.0
    assert s["throughput_rps"] == approx(1.0)
    assert s["output_tokens_per_s"] == approx(9 / 3)  # 3 + 5 + 1 output tokens
    assert s["total_tokens_per_s"] == approx((9 + 40) / 3)
    assert (s["preemptions"], s["recomputed_tokens"]) == (2, 17)
    assert s["ttft_timing"] == "computed"


def test_latency_stats_exclude_unfinished():
    s = summarize(make_run())
    assert s["ttft_s"]["mean"] == approx((1.0 + 0.2 + 1.0) / 3)
    assert s["ttft_s"]["p50"] == approx(1.0)
    assert s["tpot_s"] == {"mean": approx(0.475), "p50": approx(0.475), "p90": approx(0.495), "p99": approx(0.4995)}
    assert s["e2e_s"]["mean"] == approx(5 / 3)
    assert s["e2e_s"]["p50"] == approx(2.0)
    assert s["queue_s"]["mean"] == approx(1 / 3)
    assert s["queue_s"]["p50"] == approx(0.5)


def test_itl_pools_all_gaps():
    run = make_run()
    gaps = sorted(inter_token_latencies(run.records[:3]))
    assert gaps == approx([0.2, 0.2, 0.5, 0.5, 0.6, 0.8])
    s = summarize(run)  # E's gap (aborted) is excluded
    assert s["itl_s"]["mean"] == approx(2.8 / 6)
    assert s["itl_s"]["p50"] == approx(0.5)
    assert s["itl_s"]["p99"] == approx(0.6 + 0.95 * 0.2)


def test_prefix_hit_rate_over_finished():
    assert summarize(make_run())["prefix_hit_rate"] == approx((4 + 0 + 6) / 40)


def test_step_stats():
    s = summarize(make_run())
    assert s["mean_batch_size"] == approx(2.0)
    assert s["mean_kv_usage"] == approx(0.5)
    assert s["max_kv_usage"] == approx(0.8)
    assert s["mean_queue_depth"] == approx(1.0)
    assert s["num_steps"] == 3


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        ({"ttft": 0.5}, 1),  # only B
        ({"ttft": 1.0, "tpot": 0.48}, 2),  # A misses TPOT; C has no TPOT and meets it
        ({"e2e": 1.5}, 1),  # only C
        ({"ttft_s": 10, "tpot_s": 10, "e2e_s": 10}, 3),
    ],
)
def test_goodput(slo, good):
    s = summarize(make_run(), slo=slo)
    assert s["goodput_rps"] == approx(good / 3.0)
    assert s["slo_attainment"] == approx(good / 7)


def test_no_goodput_keys_without_slo():
    s = summarize(make_run())
    assert "goodput_rps" not in s and "slo_attainment" not in s


def test_unknown_slo_metric_in_summarize():
    with pytest.raises(ValueError, match="latency"):
        summarize(make_run(), slo={"latency": 1.0})


def test_empty_run_does_not_crash():
    s = summarize(RunResult("empty", [], [], 0.0), slo={"ttft": 1.0})
    assert s["num_requests"] == s["num_finished"] == s["num_steps"] == 0
    assert s["throughput_rps"] is None and s["goodput_rps"] is None and s["slo_attainment"] is None
    assert s["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert s["prefix_hit_rate"] is None and s["mean_kv_usage"] is None and s["max_kv_usage"] is None


def test_only_rejected_run():
    run = RunResult("r", [_rec("D", 0.0, None, None, 0.0, [], prompt=5, reason="rejected")], [], 0.0)
    s = summarize(run)
    assert s["num_rejected"] == 1 and s["num_finished"] == 0 and s["e2e_s"]["mean"] is None


def test_parse_slo():
    assert parse_slo("ttft=0.5,tpot=0.05,e2e=10") == {"ttft": 0.5, "tpot": 0.05, "e2e": 10.0}
    assert parse_slo(" ttft = 500ms , e2e=2s ") == {"ttft": 0.5, "e2e": 2.0}


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("ttft=0.5,tpot", "tpot"),
        ("ttft=0.5,latency=1", "latency=1"),
        ("ttft=abc", "ttft=abc"),
        ("e2e=-1", "e2e=-1"),
        ("ttft=1,ttft=2", "ttft=2"),
        ("tpot=nan", "tpot=nan"),
        ("", "names no metric"),
    ],
)
def test_parse_slo_errors_name_the_item(spec, bad):
    with pytest.raises(ValueError, match=bad):
        parse_slo(spec)


def test_itl_over_many_requests_is_each_requests_gaps_in_order():
    import itertools

    import numpy as np

    rng = np.random.default_rng(2)
    records = []
    for i in range(2500):  # more than one group of requests joined at once
        times = np.cumsum(rng.random(int(rng.integers(0, 6)))).tolist()
        records.append(RequestRecord(f"r{i}", 0.0, 1, 8, token_times_s=times))
    want = [b - a for r in records for a, b in itertools.pairwise(r.token_times_s)]
    assert inter_token_latencies(records).tolist() == want
    assert inter_token_latencies(records[:1] + records[2:3]).tolist() == [
        b - a for r in (records[0], records[2]) for a, b in itertools.pairwise(r.token_times_s)]


def test_percentiles_reordering_in_place_give_the_same_numbers():
    import numpy as np

    values = np.random.default_rng(4).random(10_001)
    kept = values.copy()
    assert percentiles(values) == percentiles(values.tolist())
    assert values.tolist() == kept.tolist()  # not reordered unless allowed
    assert percentiles(values, reorder=True) == percentiles(kept)
