"""Arrival processes, length models and synthetic workloads: statistics, seeding, scaling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.arrivals import ARRIVAL_DESCRIPTIONS, ARRIVALS, generate_arrivals
from sim.lengths import Fixed, LogNormal, Zipf, as_length_model, parse_length_spec
from sim.workload import (
    Workload,
    WorkloadRequest,
    scale_workload,
    synthetic_workload,
    workload_from_source,
    workload_to_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures"


def gaps(times: np.ndarray) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], times]))


# ---------------------------------------------------------------- arrivals


def test_poisson_mean_gap_within_one_percent():
    t = generate_arrivals("poisson", np.random.default_rng(1), 100_000, 4.0)
    g = gaps(t)
    assert abs(g.mean() - 0.25) < 0.01 * 0.25
    assert abs(g.std() / g.mean() - 1.0) < 0.02
    assert g.max() > 3 / 4.0  # not clamped at 3/rate as Vidur does


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_rate_and_cv(cv):
    g = gaps(generate_arrivals("gamma", np.random.default_rng(2), 100_000, 2.0, cv=cv))
    assert abs(g.mean() - 0.5) < 0.02 * 0.5
    assert abs(g.std() / g.mean() - cv) < 0.03 * cv


def test_gamma_burstiness_is_one_over_cv_squared():
    a = generate_arrivals("gamma", np.random.default_rng(3), 100, 1.0, cv=2.0)
    b = generate_arrivals("gamma", np.random.default_rng(3), 100, 1.0, burstiness=0.25)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="disagree"):
        generate_arrivals("gamma", np.random.default_rng(3), 10, 1.0, cv=2.0, burstiness=1.0)


def test_constant_is_exact():
    t = generate_arrivals("constant", np.random.default_rng(0), 5, 2.0)
    assert t.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5]


def test_ramp_follows_linear_rate():
    n, r0, r1 = 100_000, 1.0, 9.0
    t = generate_arrivals("ramp", np.random.default_rng(4), n, r0, rate_end=r1)
    horizon = 2 * n / (r0 + r1)
    expected_half = r0 * horizon / 2 + (r1 - r0) * horizon / 8  # cumulative rate at T/2
    assert abs(np.sum(t < horizon / 2) - expected_half) < 0.02 * expected_half
    late = t[(t > 0.9 * horizon) & (t < horizon)]
    mean_rate_last_tenth = r0 + 0.95 * (r1 - r0)
    assert abs(late.size / (0.1 * horizon) - mean_rate_last_tenth) < 0.03 * mean_rate_last_tenth
    assert np.all(np.diff(t) >= 0)


def test_ramp_down_and_rate_start_alias():
    a = generate_arrivals("ramp", np.random.default_rng(5), 2000, None, rate_start=8.0, rate_end=1.0)
    b = generate_arrivals("ramp", np.random.default_rng(5), 2000, 8.0, rate_end=1.0)
    assert np.array_equal(a, b)
    assert np.sum(a < a[-1] / 4) > np.sum(a > 3 * a[-1] / 4)
    with pytest.raises(ValueError, match="rate_end"):
        generate_arrivals("ramp", np.random.default_rng(5), 10, 1.0)


def test_burst_on_off():
    t = generate_arrivals("burst", np.random.default_rng(6), 50_000, 2.0, burst_factor=4.0, on_s=5.0, off_s=15.0)
    assert np.all(np.mod(t, 20.0) < 5.0)  # nothing during the quiet 15 s
    assert abs(t.size / t[-1] - 2.0) < 0.03 * 2.0  # defaults keep the long-run mean at rate


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("poisson", {"rate": 0}, "rate"),
        ("poisson", {"rate": -1.0}, "rate"),
        ("poisson", {"rate": float("nan")}, "rate"),
        ("gamma", {"rate": 1.0, "cv": 0.0}, "cv"),
        ("gamma", {"rate": 1.0}, "cv"),
        ("burst", {"rate": 1.0, "on_s": 0.0}, "on_s"),
        ("burst", {"rate": 1.0, "off_s": -1.0}, "off_s"),
        ("burst", {"rate": 1.0, "burst_factor": "x"}, "burst_factor"),
        ("ramp", {"rate": 1.0, "rate_end": 0.0}, "rate_end"),
        ("poisson", {"rate": 1.0, "cv": 2.0}, "cv"),
        ("nope", {"rate": 1.0}, "nope"),
    ],
)
def test_bad_arrival_params_name_the_parameter(name, params, named):
    rate = params.pop("rate")
    with pytest.raises(ValueError, match=named):
        generate_arrivals(name, np.random.default_rng(0), 10, rate, **params)


def test_bad_count_and_registry_descriptions():
    with pytest.raises(ValueError, match="num_requests"):
        generate_arrivals("poisson", np.random.default_rng(0), -1, 1.0)
    assert set(ARRIVALS) == set(ARRIVAL_DESCRIPTIONS) == {"poisson", "gamma", "constant", "ramp", "burst"}
    assert all(d and "\n" not in d for d in ARRIVAL_DESCRIPTIONS.values())


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["poisson", "gamma", "constant", "ramp", "burst"]),
    n=st.integers(0, 200),
    rate=st.floats(0.01, 1000),
    seed=st.integers(0, 2**32),
)
def test_arrivals_are_sorted_finite_and_sized(name, n, rate, seed):
    params = {"gamma": {"cv": 1.7}, "ramp": {"rate_end": rate * 3}}.get(name, {})
    t = generate_arrivals(name, np.random.default_rng(seed), n, rate, **params)
    assert t.shape == (n,)
    assert np.all(np.isfinite(t)) and np.all(t >= 0) and np.all(np.diff(t) >= 0)


# ---------------------------------------------------------------- lengths


def test_length_specs_parse_and_sample():
    rng = np.random.default_rng(7)
    assert parse_length_spec("fixed:128").sample(rng, 3).tolist() == [128] * 3
    assert parse_length_spec("64") == Fixed(64)
    u = parse_length_spec("uniform:16,20").sample(rng, 2000)
    assert u.min() == 16 and u.max() == 20
    ln = parse_length_spec("lognormal:200,1.0").sample(rng, 50_000)
    assert abs(np.median(ln) - 200) < 0.03 * 200
    mean_ln = parse_length_spec("lognormal:mean=300,sigma=0.5").sample(rng, 50_000)
    assert abs(mean_ln.mean() - 300) < 0.03 * 300
    z = parse_length_spec("zipf:1.5,2048").sample(rng, 50_000)
    assert z.min() >= 1 and z.max() <= 2048
    p1 = 1 / np.sum(np.arange(1, 2049) ** -1.5)
    assert abs(np.mean(z == 1) - p1) < 0.02
    for spec in ["fixed:3", "uniform:1,9", "lognormal:200,1.0", "zipf:1.5,2048", "sharegpt-prompt"]:
        model = parse_length_spec(spec)
        assert parse_length_spec(model.spec).spec == model.spec
        assert model.sample(rng, 10).dtype == np.int64


def test_empirical_and_sharegpt_shortcuts():
    rng = np.random.default_rng(8)
    model = parse_length_spec(f"empirical:{FIXTURES / 'sharegpt_50.csv'}:num_decode_tokens")
    allowed = set(np.loadtxt(FIXTURES / "sharegpt_50.csv", delimiter=",", skiprows=1)[:, 1].astype(int))
    assert set(model.sample(rng, 500).tolist()) <= allowed
    prompt = parse_length_spec("sharegpt-prompt").sample(rng, 20_000)
    assert 1800 < prompt.mean() < 2800  # sample mean 2272 tokens
    assert parse_length_spec("sharegpt-output").describe().startswith("empirical sharegpt-output")


def test_lognormal_redraws_zeros_and_rejects_hopeless_models():
    model = LogNormal(1.0, 2.0)
    assert 0.3 < model.p_redraw < 0.4
    assert model.sample(np.random.default_rng(9), 10_000).min() >= 1
    assert "redrawn" in model.describe()
    with pytest.raises(ValueError, match="below 0.5 tokens"):
        LogNormal(0.2, 0.5)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty"),
        ("fixed:0", "fixed"),
        ("uniform:20,10", "greater"),
        ("uniform:5", "lo and hi"),
        ("lognormal:200", "sigma"),
        ("lognormal:x,1", "median"),
        ("zipf:0,100", "a="),
        ("zipf:1.2,0", "max"),
        ("weird:1", "unknown length model"),
        ("empirical:nofile.csv:col", "cannot read"),
    ],
)
def test_bad_length_specs(spec, named):
    with pytest.raises(ValueError, match=named):
        parse_length_spec(spec)


def test_empirical_rejects_zero_with_line(tmp_path):
    path = tmp_path / "lens.csv"
    path.write_text("n\n5\n0\n")
    with pytest.raises(ValueError, match=r"line 3, field 'n'"):
        parse_length_spec(f"empirical:{path}:n")
    with pytest.raises(ValueError, match="no column 'm'"):
        parse_length_spec(f"empirical:{path}:m")


@settings(max_examples=30, deadline=None)
@given(lo=st.integers(1, 500), width=st.integers(0, 500), seed=st.integers(0, 2**32))
def test_uniform_stays_in_range(lo, width, seed):
    x = as_length_model(f"uniform:{lo},{lo + width}").sample(np.random.default_rng(seed), 100)
    assert x.min() >= lo and x.max() <= lo + width


def test_zipf_is_a_model_object_too():
    assert as_length_model(Zipf(1.1, 10)).sample(np.random.default_rng(0), 5).max() <= 10
    with pytest.raises(ValueError):
        as_length_model(3.5)


# ---------------------------------------------------------------- workloads


def make(seed=0, **kw):
    args = dict(arrival="gamma", rate=5.0, num_requests=40, prompt_lengths="uniform:20,60",
                output_lengths="lognormal:50,0.5", seed=seed, cv=2.0)  # fmt: skip
    args.update(kw)
    return synthetic_workload(**args)


def test_seed_gives_byte_identical_workload(tmp_path):
    a = workload_to_jsonl(make(3), tmp_path / "a.jsonl").read_bytes()
    b = workload_to_jsonl(make(3), tmp_path / "b.jsonl").read_bytes()
    c = workload_to_jsonl(make(4), tmp_path / "c.jsonl").read_bytes()
    assert a == b and a != c


def test_synthetic_ids_order_and_unique_prompts():
    w = make(num_requests=300, prompt_lengths=16)
    assert [r.request_id for r in w.requests[:3]] == ["r00000", "r00001", "r00002"]
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(w.requests, w.requests[1:], strict=False))
    assert len({r.prompt_token_ids for r in w.requests}) == 300
    assert len({r.prompt_token_ids[:2] for r in w.requests}) == 300  # no accidental shared prefixes
    assert all(10 <= t < 32000 for r in w.requests for t in r.prompt_token_ids)
    assert w.source["kind"] == "synthetic" and "gamma" in w.description and "seed 0" in w.description


def test_shared_prefix_groups():
    w = make(num_requests=200, shared_prefix_tokens=24, num_prefix_groups=3, prompt_lengths=10, vocab_size=1000)
    assert all(r.num_prompt_tokens == 34 for r in w.requests)
    assert len({r.prompt_token_ids[:24] for r in w.requests}) == 3
    assert len({r.prompt_token_ids[24:] for r in w.requests}) == 200
    assert all(t < 1000 for r in w.requests for t in r.prompt_token_ids)
    assert "24-token shared prefix from 3 group(s)" in w.description


def test_synthetic_validation():
    with pytest.raises(ValueError, match="arrival='gamma'"):
        make(arrival="poisson", cv=2.0)
    assert len(make(arrival="poisson", cv=1.0).requests) == 40
    with pytest.raises(ValueError, match="cv"):
        make(arrival="constant")
    with pytest.raises(ValueError, match="shared_prefix_tokens"):
        make(shared_prefix_tokens=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        make(vocab_size=5)
    ramp = make(arrival="ramp", cv=None, rate_end=20.0)
    assert ramp.source["arrival_params"] == {"rate_end": 20.0}


def test_scale_workload_times_lengths_and_prefixes():
    w = make(shared_prefix_tokens=40, num_prefix_groups=2, prompt_lengths=20)
    s = scale_workload(w, time_scale=2.0, length_scale=0.5)
    for a, b in zip(w.requests, s.requests, strict=True):
        assert b.arrival_s == pytest.approx(2 * a.arrival_s)
        assert b.num_prompt_tokens == 30
        assert b.max_tokens == max(1, math.floor(a.max_tokens * 0.5 + 0.5))
        assert b.prompt_token_ids[:20] == a.prompt_token_ids[:40:2]
    assert len({r.prompt_token_ids[:20] for r in s.requests}) == 2  # shared prefixes stay shared
    assert len({r.prompt_token_ids[20:] for r in s.requests}) == len(s.requests)
    assert "time_scale=2, length_scale=0.5" in s.description
    grown = scale_workload(w, length_scale=3.0)
    assert grown.requests[0].num_prompt_tokens == 180
    tiny = scale_workload(w, length_scale=0.001)
    assert all(r.num_prompt_tokens == 1 and r.max_tokens == 1 for r in tiny.requests)
    with pytest.raises(ValueError, match="time_scale"):
        scale_workload(w, time_scale=0)


def test_scale_rejects_text_prompts():
    w = Workload((WorkloadRequest("a", 0.0, (), 5, prompt="hello"),), "one", {"kind": "test"})
    assert scale_workload(w, time_scale=3.0).requests[0].prompt == "hello"
    with pytest.raises(ValueError, match="text prompt"):
        scale_workload(w, length_scale=2.0)


def test_workload_from_source_repeats(tmp_path):
    w = scale_workload(make(5, arrival="burst", cv=None, on_s=2.0), 1.5, 0.5)
    again = workload_from_source(w.source)
    a = workload_to_jsonl(w, tmp_path / "a.jsonl").read_bytes()
    assert a == workload_to_jsonl(again, tmp_path / "b.jsonl").read_bytes()
    assert again.description == w.description
    with pytest.raises(ValueError, match="kind"):
        workload_from_source({"kind": "nope"})


def test_request_and_workload_validation():
    with pytest.raises(ValueError, match="max_tokens"):
        WorkloadRequest("a", 0.0, (11,), 0)
    with pytest.raises(ValueError, match="arrival_s"):
        WorkloadRequest("a", -1.0, (11,), 3)
    with pytest.raises(ValueError, match="give prompt_token_ids"):
        WorkloadRequest("a", 0.0, (), 3)
    r1, r2 = WorkloadRequest("a", 1.0, (11,), 3), WorkloadRequest("b", 0.5, (11,), 3)
    with pytest.raises(ValueError, match="before"):
        Workload((r1, r2), "", {})
    with pytest.raises(ValueError, match="twice"):
        Workload((r1, WorkloadRequest("a", 2.0, (11,), 3)), "", {})
