"""Trace readers on slices of real traces, broken inputs, mooncake prefix blocks, the default workload."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.traces import TraceError, _azure_time, default_workload, detect_format, load_trace
from sim.workload import synthetic_workload, workload_from_source, workload_to_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN = FIXTURES / "broken"


def csv_rows(name: str) -> list[dict]:
    with (FIXTURES / name).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["azure_conv_50.csv", "azure_code_50.csv"])
def test_azure_slice(name):
    rows = csv_rows(name)
    w = load_trace(FIXTURES / name, seed=1)
    assert len(w.requests) == 50
    assert [r.num_prompt_tokens for r in w.requests] == [int(r["ContextTokens"]) for r in rows]
    assert [r.max_tokens for r in w.requests] == [int(r["GeneratedTokens"]) for r in rows]
    assert w.requests[0].arrival_s == 0.0
    assert w.requests[0].request_id == "r00000" and w.requests[-1].request_id == "r00049"
    assert "azure trace" in w.description and "50 rows read, none skipped" in w.description


def test_azure_seven_digit_fractions():
    w = load_trace(FIXTURES / "azure_conv_50.csv")
    # 18:15:50.9951690 - 18:15:46.6805900 and 18:15:51.2224670 - 18:15:46.6805900
    assert w.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-9)
    assert w.requests[2].arrival_s == pytest.approx(4.541877, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    when=st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2100, 1, 1)),
    ticks=st.integers(0, 9_999_999),
)
def test_azure_time_matches_datetime(when, ticks):
    base = when.replace(microsecond=0)
    raw = f"{base:%Y-%m-%d %H:%M:%S}.{ticks:07d}"
    expected = (base - dt.datetime(1970, 1, 1)).total_seconds() + ticks / 1e7
    whole, frac = _azure_time("x.csv", 2, raw)
    assert whole + frac == pytest.approx(expected, abs=1e-6)
    assert frac == ticks / 1e7


def test_vidur_matches_azure_it_came_from():
    a = load_trace(FIXTURES / "azure_conv_50.csv")
    v = load_trace(FIXTURES / "vidur_from_azure_conv_50.csv")
    assert [r.num_prompt_tokens for r in v.requests] == [r.num_prompt_tokens for r in a.requests]
    assert [r.max_tokens for r in v.requests] == [r.max_tokens for r in a.requests]
    assert [r.arrival_s for r in v.requests] == pytest.approx([r.arrival_s for r in a.requests], abs=1e-6)


def test_burstgpt_skips_and_counts_failures_and_sorts():
    w = load_trace(FIXTURES / "burstgpt_format.csv")
    assert [r.max_tokens for r in w.requests] == [18, 233, 505, 121, 77]  # 19 s row sorted before 20.5 s
    assert [r.arrival_s for r in w.requests] == [0.0, 14.0, 15.5, 39.0, 58.0]
    assert "8 rows read, 3 skipped" in w.description
    assert "2 with 0 response tokens" in w.description and "1 with 0 request tokens" in w.description
    assert "1 rows out of time order, sorted stably" in w.description
    assert "ChatGPT x3" in w.description


def test_mooncake_slice_and_prefix_blocks():
    rows = [json.loads(line) for line in (FIXTURES / "mooncake_synthetic_50.jsonl").open()]
    w = load_trace(FIXTURES / "mooncake_synthetic_50.jsonl")
    assert [r.num_prompt_tokens for r in w.requests] == [r["input_length"] for r in rows]
    assert [r.max_tokens for r in w.requests] == [r["output_length"] for r in rows]
    assert w.requests[-1].arrival_s == pytest.approx((rows[-1]["timestamp"] - rows[0]["timestamp"]) / 1000)
    blocks: dict[int, tuple] = {}
    shared = 0
    for row, req in zip(rows, w.requests, strict=True):
        for j, h in enumerate(row["hash_ids"][:-1]):  # full blocks only; the last one is cut
            block = req.prompt_token_ids[512 * j : 512 * (j + 1)]
            shared += h in blocks
            assert blocks.setdefault(h, block) == block
    assert shared > 10  # the slice does reuse blocks
    assert len(set(blocks.values())) == len(blocks)  # different ids, different tokens


def test_mooncake_scaled_blocks_keep_sharing():
    rows = [json.loads(line) for line in (FIXTURES / "mooncake_synthetic_50.jsonl").open()]
    w = load_trace(FIXTURES / "mooncake_synthetic_50.jsonl", length_scale=0.1)
    block = 51  # round(512 * 0.1)
    assert [r.num_prompt_tokens for r in w.requests] == [max(1, int(r["input_length"] * 0.1 + 0.5)) for r in rows]
    seen: dict[int, tuple] = {}
    for row, req in zip(rows, w.requests, strict=True):
        for j, h in enumerate(row["hash_ids"][:-1]):
            got = req.prompt_token_ids[block * j : block * (j + 1)]
            if len(got) == block:
                assert seen.setdefault(h, got) == got
    assert "length_scale=0.1" in w.description


def test_tokenstep_jsonl():
    w = load_trace(FIXTURES / "tokenstep.jsonl")
    r = w.requests
    assert [q.request_id for q in r] == ["r00000", "r00001", "custom-a", "r00003", "r00004"]
    assert r[0].prompt == "Tell me a joke." and r[0].prompt_token_ids == ()
    assert r[1].messages[0] == {"role": "system", "content": "Be brief."} and r[1].priority == 1
    assert r[2].prompt_token_ids == (11, 12, 13, 14, 15) and r[2].arrival_s == 1.25
    assert r[3].num_prompt_tokens == 32 and r[4].num_prompt_tokens == 6 and r[4].prompt.startswith("Same")
    with pytest.raises(TraceError, match="line 1.*text prompt cannot be scaled"):
        load_trace(FIXTURES / "tokenstep.jsonl", length_scale=2.0)


def test_jsonl_round_trip_is_byte_identical(tmp_path):
    w = synthetic_workload("poisson", 3.0, 30, "lognormal:40,0.7", 8, seed=11)
    first = workload_to_jsonl(w, tmp_path / "w.jsonl")
    back = load_trace(first)
    assert back.requests == w.requests
    assert workload_to_jsonl(back, tmp_path / "again.jsonl").read_bytes() == first.read_bytes()


def test_window_sample_limit_and_time_scale():
    full = load_trace(FIXTURES / "azure_conv_50.csv")
    win = load_trace(FIXTURES / "azure_conv_50.csv", window_s=(5.0, 15.0))
    inside = [r for r in full.requests if 5.0 <= r.arrival_s < 15.0]
    assert [r.max_tokens for r in win.requests] == [r.max_tokens for r in inside]
    assert win.requests[0].arrival_s == pytest.approx(inside[0].arrival_s - 5.0)
    assert "window [5, 15)" in win.description
    slow = load_trace(FIXTURES / "azure_conv_50.csv", time_scale=2.0, limit=10)
    assert len(slow.requests) == 10
    assert [r.arrival_s for r in slow.requests] == pytest.approx([2 * r.arrival_s for r in full.requests[:10]])
    s1 = load_trace(FIXTURES / "azure_conv_50.csv", sample=0.5, seed=3)
    s2 = load_trace(FIXTURES / "azure_conv_50.csv", sample=0.5, seed=3)
    assert s1.requests == s2.requests and 10 < len(s1.requests) < 40
    assert workload_from_source(s1.source).requests == s1.requests
    with pytest.raises(ValueError, match="sample"):
        load_trace(FIXTURES / "azure_conv_50.csv", sample=0.0)
    with pytest.raises(ValueError, match="window_s"):
        load_trace(FIXTURES / "azure_conv_50.csv", window_s=(10.0, 5.0))


def test_length_scale_on_csv_trace():
    w = load_trace(FIXTURES / "azure_conv_50.csv", length_scale=0.01)
    rows = csv_rows("azure_conv_50.csv")
    assert [r.num_prompt_tokens for r in w.requests] == [
        max(1, int(int(r["ContextTokens"]) * 0.01 + 0.5)) for r in rows
    ]
    assert min(r.max_tokens for r in w.requests) == 1


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("azure_conv_50.csv", "azure"),
        ("vidur_from_azure_conv_50.csv", "vidur"),
        ("burstgpt_format.csv", "burstgpt"),
        ("mooncake_synthetic_50.jsonl", "mooncake"),
        ("tokenstep.jsonl", "jsonl"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(FIXTURES / name) == fmt


def test_unknown_format_lists_formats():
    with pytest.raises(TraceError, match="unknown trace format.*azure.*vidur.*mooncake.*burstgpt.*jsonl"):
        load_trace(BROKEN / "unknown_format.csv")


@pytest.mark.parametrize(
    ("name", "fmt", "where"),
    [
        ("azure_bad_int.csv", None, "azure_bad_int.csv line 4, field 'ContextTokens': 'abc' is not an integer"),
        ("azure_bad_timestamp.csv", None, "line 5, field 'TIMESTAMP': '2023-11-16 25:15:51.391' is not a timestamp"),
        ("azure_missing_column.csv", "azure", "line 1, field 'GeneratedTokens': missing column"),
        ("azure_zero_generated.csv", None, "line 3, field 'GeneratedTokens': '0' is not allowed"),
        ("azure_ragged.csv", None, "line 3: 2 fields, expected 3"),
        ("azure_header_only.csv", None, "line 2: no data rows"),
        ("empty.csv", None, "empty.csv line 1: file is empty"),
        ("empty.csv", "azure", "empty.csv line 1: file is empty"),
        ("empty.jsonl", "jsonl", "line 1: file is empty"),
        ("mooncake_bad_json.jsonl", None, "mooncake_bad_json.jsonl line 3: bad JSON"),
        ("mooncake_missing_field.jsonl", None, "line 2, field 'output_length': missing field"),
        ("mooncake_bad_hash_ids.jsonl", None, "line 1, field 'hash_ids': expected a list of ceil"),
        ("jsonl_unknown_field.jsonl", None, "line 2, field 'max_tokens': missing field"),
        ("jsonl_zero_max_tokens.jsonl", None, "line 1, field 'max_tokens': 0 is not allowed"),
        ("jsonl_duplicate_id.jsonl", None, "line 2, field 'request_id'"),
        ("vidur_negative.csv", None, "line 3, field 'num_prefill_tokens': '-3' is not allowed"),
    ],
)
def test_broken_inputs_name_file_line_and_field(name, fmt, where):
    with pytest.raises(TraceError) as info:
        load_trace(BROKEN / name, fmt=fmt)
    assert where in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.line >= 1


def test_missing_file_and_bad_format_name():
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(FIXTURES / "nope.csv")
    with pytest.raises(ValueError, match="unknown trace format 'csv'"):
        load_trace(FIXTURES / "azure_conv_50.csv", fmt="csv")


def test_default_workload():
    w = default_workload()
    assert len(w.requests) == 200 and w.requests[0].arrival_s == 0.0
    assert "Splitwise" in w.description and "sim/data/azure_conv_slice.csv" in w.description
    small = default_workload(time_scale=2.0, length_scale=0.5, limit=20)
    assert len(small.requests) == 20
    assert small.requests[5].arrival_s == pytest.approx(2 * w.requests[5].arrival_s)
    assert small.source == {"kind": "default", "time_scale": 2.0, "length_scale": 0.5, "limit": 20}
    assert workload_from_source(small.source).requests == small.requests
