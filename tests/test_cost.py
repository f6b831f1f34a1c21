"""Cost models: pricing plans, NNLS fitting, roofline presets, JSON round trips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from backends.cost import (
    COST_MODELS,
    ROOFLINE_PRESETS,
    CostModel,
    LinearCostModel,
    RooflineCostModel,
    StepFeatures,
    features,
    known_cost_models,
    load_cost_model,
    save_cost_model,
)
from backends.cost.base import CostModelError
from calib.nnls import nnls
from scheduler.config import SchedulerConfig
from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan


def make_plan(prefill=(), decode=(), copies=(), removes=(), pad=0) -> StepPlan:
    """A plan with prefill chunks (start_pos, len), decodes at given contexts, and KV ops."""
    chunks, slot = [], 0
    for start, length in prefill:
        chunks.append(
            ScheduledChunk(f"p{slot}", slot, start, (1,) * length, sample=True)
        )
        slot += 1
    for ctx in decode:
        chunks.append(
            ScheduledChunk(f"d{slot}", slot, ctx - 1, (1,), sample=True, is_decode=True)
        )
        slot += 1
    return StepPlan(
        step_id=0,
        now_s=0.0,
        chunks=tuple(chunks),
        removes=tuple(KVRemove(s) for s in removes),
        copies=tuple(KVCopy(s, d, n) for s, d, n in copies),
        num_prefill_tokens=sum(n for _, n in prefill),
        num_decode_seqs=len(decode),
        num_context_tokens=sum(s + n for s, n in prefill) + sum(decode),
        sum_sq_prefill_tokens=sum(n * (s + n) for s, n in prefill),
        num_pad_tokens=pad,
        num_copied_tokens=sum(n for _, _, n in copies),
    )


EMPTY = StepPlan(step_id=0, now_s=0.0, chunks=())
ALL_MODELS = [load_cost_model(n) for n in known_cost_models()]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
def test_empty_plan_costs_zero_and_any_work_costs_more(model):
    assert model.step_time_s(EMPTY) == 0.0
    assert model.step_time_s(make_plan(removes=[3])) > 0
    assert model.step_time_s(make_plan(decode=[10])) > 0
    assert isinstance(model.describe(), str) and "\n" not in model.describe()


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
def test_cost_grows_with_decode_batch_and_prefill_tokens(model):
    decode = [model.step_time_s(make_plan(decode=[64] * b)) for b in (1, 4, 16, 64)]
    prefill = [model.step_time_s(make_plan(prefill=[(0, n)])) for n in (16, 256, 4096)]
    assert decode == sorted(decode) and decode[0] < decode[-1]
    assert prefill == sorted(prefill) and prefill[0] < prefill[-1]


def test_features_fold_padding_into_prefill():
    f = features(
        make_plan(
            prefill=[(0, 8)], decode=[5, 7], copies=[(0, 1, 4)], removes=[2], pad=3
        )
    )
    assert (f.num_prefill_tokens, f.num_pad_tokens, f.num_decode_seqs) == (11, 3, 2)
    assert (f.num_context_tokens, f.sum_sq_prefill_tokens) == (8 + 5 + 7, 64)
    assert (f.num_seqs, f.num_removes, f.num_copies, f.num_copied_tokens) == (
        3,
        1,
        1,
        4,
    )
    with pytest.raises(ValueError, match="num_decode_seqs"):
        StepFeatures(num_decode_seqs=-1)


def test_linear_prices_the_stated_formula():
    m = LinearCostModel(0.01, 0.001, 0.005, 1e-6, 2e-6)
    t = m.step_time_s(
        make_plan(prefill=[(0, 100)], decode=[50, 50], copies=[(0, 1, 10)])
    )
    assert t == pytest.approx(0.01 + 0.1 + 0.01 + 200e-6 + 20e-6)


def test_placeholder_profile_matches_batched_bench_roughly():
    m = load_cost_model("cpu-gemma3-270m-placeholder")
    assert "not calibrated" in m.meta["note"]
    for b, tok_s in ((1, 53.9), (4, 91.3), (16, 138.6)):
        measured = b / tok_s
        assert m.step_time_s(make_plan(decode=[48] * b)) == pytest.approx(
            measured, rel=0.12
        )


def test_nnls_never_returns_negative_coefficients():
    for seed in range(20):
        r = np.random.default_rng(seed)
        a, b = r.standard_normal((30, 6)), r.standard_normal(30)
        x = nnls(a, b)
        assert (x >= 0).all()
        # KKT: the gradient is <= 0 on zero coefficients and ~0 on positive ones.
        grad = a.T @ (b - a @ x)
        assert (grad[x == 0] <= 1e-9).all() and np.allclose(grad[x > 0], 0, atol=1e-9)


@pytest.mark.parametrize(
    "model",
    [
        LinearCostModel(name="x", meta={"threads": 2}),
        load_cost_model("cpu-gemma3-270m"),
        ROOFLINE_PRESETS["a100-llama3-70b"],
    ],
    ids=lambda m: m.to_dict()["kind"],
)
def test_json_round_trip_gives_identical_predictions(model, tmp_path):
    path = save_cost_model(model, tmp_path / "profile.json")
    loaded = load_cost_model(str(path))
    assert type(loaded) is type(model) and loaded.name == "profile"
    assert loaded.meta == model.meta and loaded.to_dict() == model.to_dict()
    for p in (
        make_plan(decode=[100] * 7),
        make_plan(prefill=[(32, 900)], decode=[5], copies=[(0, 1, 64)]),
    ):
        assert loaded.step_time_s(p) == model.step_time_s(p)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown cost model 'h200-llama'.*h100-llama3-8b.*linear-default",
    ):
        load_cost_model("h200-llama")
    with pytest.raises(ValueError, match="no cost model file"):
        load_cost_model("/nonexistent/profile.json")
    assert set(COST_MODELS) == {"linear", "roofline", "table"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"params": {}}', "missing field 'kind'"),
        (
            '{"kind": "cubic", "params": {}}',
            "unknown kind 'cubic'.*linear, roofline, table",
        ),
        (
            '{"kind": "linear", "params": {"base_s": 0.01}}',
            "missing params per_prefill_token_s",
        ),
        ('{"kind": "linear", "prams": {}}', "unknown top-level fields prams"),
        ('{"kind": "fitted", "params": {"step_s": 0.01}}', "unknown kind 'fitted'.*linear, roofline, table"),
        (
            '{"kind": "linear", "params": [], "meta": {}}',
            "'params' of a linear cost model must be an object",
        ),
        ('{"kind": "linear", "params": {}, "meta": 3}', "'meta' must be an object"),
    ],
)
def test_broken_files_raise_value_error_naming_file_and_field(
    tmp_path, content, problem
):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"broken.json.*{problem}"):
        load_cost_model(str(path))


def test_bad_param_values_are_named(tmp_path):
    data = LinearCostModel().to_dict()
    data["params"]["per_decode_seq_s"] = -0.1
    path = tmp_path / "neg.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="neg.json.*per_decode_seq_s.*>= 0"):
        load_cost_model(path)
    data = ROOFLINE_PRESETS["h100-llama3-8b"].to_dict()
    data["params"]["num_layers"] = 31.5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="neg.json.*num_layers.*integer"):
        load_cost_model(path)
    data["params"]["num_layers"], data["params"]["hbm_gib"] = 32, 16.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="neg.json.*add GPUs"):
        load_cost_model(path)


def test_roofline_small_decode_is_memory_bound():
    for name, m in ROOFLINE_PRESETS.items():
        f = features(make_plan(decode=[128] * 4))
        assert m.memory_s(f) > 10 * m.compute_s(f), name
        weights_s = m.weight_bytes / (m.num_gpus * m.hbm_tb_s * 1e12 * m.mbu)
        assert m.predict_s(f) - m.overhead_s == pytest.approx(weights_s, rel=0.02), name
    h100 = ROOFLINE_PRESETS["h100-llama3-8b"]
    # 16.06 GB of weights at 3.35 TB/s: 4.8 ms at full bandwidth, 6.0 ms at 80%.
    assert 0.0048 < h100.step_time_s(make_plan(decode=[1])) - h100.overhead_s < 0.0062


def test_roofline_large_prefill_is_compute_bound():
    for name, m in ROOFLINE_PRESETS.items():
        f = features(make_plan(prefill=[(0, 8192)]))
        assert m.compute_s(f) > 3 * m.memory_s(f), name
        assert m.predict_s(f) == pytest.approx(m.compute_s(f) + m.overhead_s)


def test_roofline_70b_slower_than_8b_and_a100_slower_than_h100():
    for p in (
        make_plan(decode=[512] * 32),
        make_plan(prefill=[(0, 4096)]),
        make_plan(prefill=[(0, 64)], decode=[900] * 200),
    ):
        t = {name: m.step_time_s(p) for name, m in ROOFLINE_PRESETS.items()}
        assert (
            t["h100-llama3-70b"] > t["h100-llama3-8b"]
            and t["a100-llama3-70b"] > t["a100-llama3-8b"]
        )
        assert (
            t["a100-llama3-8b"] > t["h100-llama3-8b"]
            and t["a100-llama3-70b"] > t["h100-llama3-70b"]
        )


def test_roofline_capacity_sizes_a_scheduler():
    m = ROOFLINE_PRESETS["h100-llama3-8b"]
    config = SchedulerConfig(**m.capacity())
    # (0.9 * 80 GiB - 16.06 GB) / 128 KiB per token of bf16 KV.
    assert config.kv_capacity_tokens == m.kv_capacity_tokens
    assert 450_000 < config.kv_capacity_tokens < 470_000
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (
        16,
        256,
        8192,
    )
    big = ROOFLINE_PRESETS["h100-llama3-70b"]
    assert isinstance(big, RooflineCostModel) and big.num_gpus == 4
    for fact in (
        "4x H100",
        "989 TFLOP/s",
        "3.35 TB/s",
        "80 layers",
        "8 KV heads",
        "16-bit",
    ):
        assert fact in big.describe(), fact


def test_roofline_decode_pricer_gives_the_same_floats_as_pricing_the_plan():
    # the simulator's fast-forward prices skipped decode steps with decode_pricer; results must be bit-identical
    for name, m in ROOFLINE_PRESETS.items():
        for contexts in ([5], [100, 2000, 37], [4096] * 64, list(range(1, 257))):
            plan = make_plan(decode=contexts)
            price = m.decode_pricer(list(range(len(contexts))))
            assert price(plan.num_context_tokens) == m.step_time_s(plan), (name, len(contexts))


def test_a_wakeup_curve_prices_a_step_after_idle_by_its_wait():
    from backends.cost.wakeup import wakeup_cost, wakeup_from_curve

    curve = ((0.1, 0.001), (1.0, 0.020), (2.5, 0.030))
    assert wakeup_from_curve(curve, 0.0) == 0.0
    assert wakeup_from_curve(curve, 0.05) == pytest.approx(0.0005)  # from (0, 0) to the first knot
    assert wakeup_from_curve(curve, 0.55) == pytest.approx(0.0105)  # linear between knots
    assert wakeup_from_curve(curve, 9.0) == pytest.approx(0.030)  # flat beyond the last
    prof = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), idle_wakeup_curve=())
    assert wakeup_cost(prof, 1.0) == prof.idle_wakeup_s  # no curve: the flat price whatever the wait
    with_curve = dataclasses.replace(prof, idle_wakeup_curve=curve)
    assert wakeup_cost(with_curve, 1.0) == pytest.approx(0.020)
    assert wakeup_cost(with_curve, None) == prof.idle_wakeup_s  # wait unknown: the flat price


def test_a_wakeup_curve_survives_a_profile_file_and_a_bad_one_is_refused(tmp_path):
    prof = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), idle_wakeup_curve=((0.3, 0.01), (1.0, 0.02)))
    path = tmp_path / "p.json"
    save_cost_model(prof, path)
    assert load_cost_model(path).idle_wakeup_curve == ((0.3, 0.01), (1.0, 0.02))
    doc = json.loads(path.read_text())
    doc["params"]["idle_wakeup_curve"] = [[0.3]]
    path.write_text(json.dumps(doc))
    with pytest.raises(CostModelError, match="idle_wakeup_curve"):
        load_cost_model(path)
    # knots out of order, or a negative price, would interpolate to nonsense: refused, naming the file
    for bad in ([[1.0, 0.02], [0.3, 0.01]], [[0.3, -0.01]], [[0.0, 0.01]]):
        doc["params"]["idle_wakeup_curve"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(CostModelError, match=r"p\.json.*idle_wakeup_curve must be .* rising order"):
            load_cost_model(path)


def test_the_simulator_charges_a_step_after_idle_the_wakeup_of_its_wait():
    from backends.synthetic import SyntheticBackend

    prof = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), idle_wakeup_curve=((0.1, 0.0), (2.0, 0.040)))
    plan = lambda now: StepPlan(0, now, (ScheduledChunk("r", 0, 0, tuple(range(16)), True),))  # noqa: E731
    # the same steps priced without any wake-up
    backend, plain = SyntheticBackend(prof), SyntheticBackend(dataclasses.replace(prof, idle_wakeup_s=0.0,
                                                                                  idle_wakeup_curve=()))
    first = backend.step(plan(0.0)).elapsed_s  # the wait before a run's first step is unknown: flat price
    assert first == pytest.approx(plain.step(plan(0.0)).elapsed_s + prof.idle_wakeup_s)
    end = first
    busy = backend.step(plan(end)).elapsed_s  # straight from the last step: no wake-up
    assert busy == pytest.approx(plain.step(plan(end)).elapsed_s)
    end += busy
    after = backend.step(plan(end + 1.05)).elapsed_s  # a wait of 1.05 s: halfway up the curve
    assert after == pytest.approx(plain.step(plan(end + 1.05)).elapsed_s + 0.020)


def test_decode_batch_factors_price_a_decode_step_by_its_batch_size():
    prof = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), run_factor=1.0, prefill_run_factor=1.1)
    by_batch = dataclasses.replace(prof, decode_batch_factors=((1, 0.9), (3, 1.1), (8, 1.2)))
    decode = lambda b: StepPlan(0, 0.0, tuple(ScheduledChunk(f"r{i}", i, 40, (7,), True)  # noqa: E731
                                              for i in range(b)))
    for b, factor in ((1, 0.9), (2, 1.0), (3, 1.1), (8, 1.2), (16, 1.2)):  # linear between knots, flat beyond
        assert by_batch.step_time_s(decode(b)) == pytest.approx(prof.step_time_s(decode(b)) * factor)
    prompt = StepPlan(0, 0.0, (ScheduledChunk("p", 0, 0, tuple(range(64)), True),
                               ScheduledChunk("d", 1, 40, (7,), True)))
    assert by_batch.step_time_s(prompt) == prof.step_time_s(prompt)  # steps with prompt tokens: unchanged
    # the fast-forward's pricers give the step's price bit for bit
    for b in (1, 2, 5):
        slots = tuple(range(b))
        assert by_batch.decode_pricer(slots)(41 * b) == by_batch.step_time_s(decode(b))
        stretch = by_batch.decode_stretch(slots, (41,) * b, None)
        assert stretch.price(0, 41 * b) == by_batch.time_s(decode(b), prev_graph=None)
    # scaled(): every decode-only factor moves, the prompt-step factor apart
    moved = by_batch.scaled(1.05, 0.9)
    assert [f for _, f in moved.decode_batch_factors] == pytest.approx([0.945, 1.155, 1.26])
    assert moved.factor(True) == pytest.approx(0.99) and moved.run_factor == pytest.approx(1.05)
    assert by_batch.grid().decode_batch_factors == () and by_batch.grid().factor(True) == 1.0
    assert "x0.900 at B=1" in by_batch.describe()


def test_decode_batch_factors_survive_a_profile_file_and_bad_ones_are_refused(tmp_path):
    prof = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), decode_batch_factors=((1, 0.95), (16, 1.02)))
    path = tmp_path / "p.json"
    save_cost_model(prof, path)
    assert load_cost_model(path).decode_batch_factors == ((1, 0.95), (16, 1.02))
    doc = json.loads(path.read_text())
    for bad, match in (([[1]], "decode_batch_factors' must be a list"),
                       ([[4, 1.0], [2, 1.0]], r"p\.json.*decode_batch_factors must be .* rising order"),
                       ([[0, 1.0]], r"p\.json.*decode_batch_factors must be"),
                       ([[1.5, 1.0]], r"p\.json.*whole sequences"),
                       ([[1, 3.0]], r"p\.json.*factors in \[0\.5, 2\]")):
        doc["params"]["decode_batch_factors"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(CostModelError, match=match):
            load_cost_model(path)


def test_each_model_declares_the_optional_capabilities_it_has():
    from backends.cost import PricesDecodeRuns, PricesGraphReuse, SizesScheduler, WakesAfterIdle

    def caps(name):
        m = load_cost_model(name)
        assert isinstance(m, CostModel)
        return {c.__name__ for c in (PricesDecodeRuns, PricesGraphReuse, SizesScheduler, WakesAfterIdle)
                if isinstance(m, c)}

    assert caps("linear-default") == set()
    assert caps("h100-llama3-8b") == {"PricesDecodeRuns", "SizesScheduler"}
    assert caps("cpu-gemma3-270m") == {"PricesDecodeRuns", "PricesGraphReuse", "WakesAfterIdle"}
    # what a capability promises holds: the table's graph-carrying price of a step after itself is its plain price
    table = load_cost_model("cpu-gemma3-270m")
    plan = make_plan(decode=[40, 41, 42])
    _, graph = table.step_after(plan, None)
    assert table.step_after(plan, graph)[0] == table.step_time_s(plan)
