"""llama.cpp's compute-graph reuse in the table model: keys, prices, the simulator's fast-forward, the fit."""

from __future__ import annotations

import dataclasses

import pytest

from backends.cost import load_cost_model
from backends.cost.graph import kv_cells
from backends.cost.table import TableCostModel, price_run
from backends.cost.ubatch import split_ubatches
from backends.synthetic import SyntheticBackend
from calib.fit_table import fit_table, graph_chain
from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan

BUILD_S, BUILD_SEQ_S = 5e-4, 2e-5


def _decode(slot: int, pos: int) -> ScheduledChunk:
    return ScheduledChunk(f"d{slot}", slot, pos, (11,), True, is_decode=True)


def _decodes(slots, pos: int) -> StepPlan:
    return StepPlan(0, 0.0, tuple(_decode(s, pos) for s in slots))


def _prompt(slot: int, pos: int, n: int) -> StepPlan:
    return StepPlan(0, 0.0, (ScheduledChunk(f"p{slot}", slot, pos, (11,) * n, True),))


@pytest.fixture(scope="module")
def model() -> TableCostModel:
    """The bundled profile with known graph prices, and no wake-up: the plans here are hand-made, all at time 0,
    so a simulated backend would take every step after the first for one after idle."""
    return dataclasses.replace(load_cost_model("cpu-gemma3-270m"), per_graph_build_s=BUILD_S,
                               per_graph_build_seq_s=BUILD_SEQ_S, idle_wakeup_s=0.0, idle_wakeup_curve=())


def _keys(plan: StepPlan) -> list[tuple]:
    return [u.graph for u in split_ubatches(plan)]


def test_graph_keys_follow_llama_cpps_reuse_rule():
    # the same sequences a token further on: the same graph, until the KV length passes 256 cells
    assert _keys(_decodes(range(4), 100)) == _keys(_decodes(range(4), 101))
    assert _keys(_decodes(range(4), 254)) == _keys(_decodes(range(4), 255))  # ends at 255 and 256 cells
    assert _keys(_decodes(range(4), 255)) != _keys(_decodes(range(4), 256))  # 257 cells: n_kv 512
    assert (kv_cells(1), kv_cells(256), kv_cells(257), kv_cells(513)) == (256, 256, 512, 768)
    # other sequences, another count of them, or other outputs: another graph
    assert _keys(_decodes(range(4), 100)) != _keys(_decodes(range(1, 5), 100))
    assert _keys(_decodes(range(4), 100)) != _keys(_decodes(range(3), 100))
    a, b = _keys(_decodes((0, 2), 100))
    assert a != b  # two runs of slots: two ubatches with different keys
    assert _keys(_prompt(0, 0, 16)) != _keys(_prompt(0, 0, 17))
    # a ubatch over one KV stream for all sequences carries no key: it always builds
    assert [u.graph for u in split_ubatches(_decodes(range(4), 100), kv_unified=True)] == [()]


def test_a_step_pays_for_the_graphs_it_builds(model):
    plain = dataclasses.replace(model, per_graph_build_s=None, per_graph_build_seq_s=None)
    f = model.run_factor
    one = _decodes(range(4), 100)
    first, key = model.step_after(one, None)
    again, _ = model.step_after(one, key)
    assert first - again == pytest.approx((BUILD_S + 4 * BUILD_SEQ_S) * f, rel=1e-9)
    assert again == pytest.approx(plain.step_time_s(one), rel=1e-12)  # reused: no build
    assert model.step_time_s(one) == pytest.approx(plain.step_time_s(one), rel=1e-12)  # default: follows itself
    # a step of two ubatches builds both, every time: each replaces the other's graph
    two = _decodes((0, 1, 3), 100)
    _, k = model.step_after(two, None)
    assert model.step_after(two, k)[0] - plain.step_time_s(two) == pytest.approx(
        (2 * BUILD_S + 3 * BUILD_SEQ_S) * f, rel=1e-9)
    # a prefix copy resets llama.cpp's scheduler: nothing is reused after it, even in a step of KV ops only
    copy = dataclasses.replace(one, copies=(KVCopy(5, 0, 32),))
    assert model.step_after(copy, key)[0] > model.step_after(one, key)[0]
    _, after_copy = model.step_after(StepPlan(0, 0.0, (), copies=(KVCopy(5, 6, 32),)), key)
    _, after_remove = model.step_after(StepPlan(0, 0.0, (), removes=(KVRemove(7),)), key)
    assert after_copy is None and after_remove == key


@pytest.mark.parametrize("slots", [(0,), (2, 3, 4), (0, 2, 5), (1, 3, 4, 6, 9, 12, 14, 15)])
@pytest.mark.parametrize("prev", ["none", "same", "other"])
def test_a_decode_stretch_prices_every_step_like_the_plan(model, slots, prev):
    """The simulator's fast-forward prices skipped steps with decode_stretch: bit for bit as step_after,
    across KV lengths of 256 and 512 cells."""
    ends = [230 + 7 * i for i in range(len(slots))]
    first = StepPlan(0, 0.0, tuple(_decode(s, e - 1) for s, e in zip(slots, ends, strict=True)))
    before = {"none": None, "same": _keys(first)[-1], "other": _keys(_decodes((7,), 40))[0]}[prev]
    stretch = model.decode_stretch(slots, ends, before)
    graph = before
    for i in range(600):
        plan = StepPlan(0, 0.0, tuple(_decode(s, e - 1 + i) for s, e in zip(slots, ends, strict=True)))
        t, graph = model.step_after(plan, graph)
        assert stretch.price(i, sum(ends) + i * len(slots)) == t, i
        assert stretch.graph_after(i) == graph


def test_the_simulators_backend_carries_the_graph_from_step_to_step(model):
    backend = SyntheticBackend(model)
    plan = _decodes(range(4), 100)
    first, second = backend.step(plan).elapsed_s, backend.step(plan).elapsed_s
    assert first - second == pytest.approx((BUILD_S + 4 * BUILD_SEQ_S) * model.run_factor, rel=1e-9)
    assert backend.graph == _keys(plan)[-1]


def _true_cost(plans: list[StepPlan]) -> list[float]:
    """Per pass: concave in tokens, plus a graph build for each pass llama.cpp could not reuse."""
    layout = TableCostModel()
    out = []
    for plan, prev in zip(plans, graph_chain([(p, False) for p in plans], layout), strict=True):
        t = 0.0
        for u in split_ubatches(plan):
            t += 0.015 + 0.006 * u.n_tokens ** 0.8 + 2e-6 * u.attention_pairs
            if u.graph != prev:
                t += BUILD_S + BUILD_SEQ_S * u.n_seqs
            prev = u.graph
        out.append(t)
    return out


def test_the_fit_recovers_the_price_of_a_graph_build():
    plans = []
    for b in (1, 2, 3, 4, 6, 8, 12, 16):
        plans += [_decodes(range(b), 100 + i) for i in range(6)]  # one shape for six steps: one build
        plans += [_decodes(range(0, 2 * b, 2), 100)] * 2  # b passes that build every step
        plans += [_prompt(0, 0, 8 * b), _prompt(1, 40, 4 * b)]
    samples = list(zip(plans, _true_cost(plans), strict=True))
    fitted = fit_table(samples, name="t")
    assert fitted.per_graph_build_s == pytest.approx(BUILD_S, rel=0.15)
    priced = price_run(fitted, [(p, False) for p in plans])
    assert max(abs(p / t - 1) for p, (_, t) in zip(priced, samples, strict=True)) < 0.02
    again = TableCostModel.from_dict(fitted.to_dict()["params"], {}, "again", "test")
    assert price_run(again, [(p, False) for p in plans]) == priced
    # without steps of one shape repeating, a build cannot be told from a pass: no graph prices
    every = [_decodes(range(b), 100) for b in range(1, 17)] + [_prompt(0, 0, n) for n in (8, 32, 100, 300)]
    assert fit_table(list(zip(every, _true_cost(every), strict=True)), name="t").per_graph_build_s is None
    assert fit_table(samples, name="t", graphs=False).per_graph_build_s is None


@pytest.mark.parametrize("change, message", [
    ({"per_graph_build_seq_s": None}, "per_graph_build_s, per_graph_build_seq_s go together"),
    ({"per_graph_build_s": -1e-4}, "per_graph_build_s"),
    ({"per_fa_tile_s": None, "fa_heads": None, "fa_threads": None, "kv_unified": True},
     "graph building is priced for one KV stream per sequence"),
])
def test_a_profile_with_broken_graph_params_is_refused(model, change, message):
    params = model.to_dict()["params"]
    with pytest.raises(ValueError, match=message):
        TableCostModel.from_dict({**params, **change}, {}, "broken", "bad.json")


def test_a_multi_instance_runs_steps_are_priced_each_on_its_own_context(model):
    """validate concatenates the instances' timed steps; each instance's first step (wait unknown) starts on
    a fresh graph, not after the other instance's last step."""
    from calib.measure import price_samples

    a = [_decodes([0, 1], 40), _decodes([0, 1], 41)]
    b = [_decodes([0, 1], 42), _decodes([0, 1], 43)]  # the same shape as a's last step: no build if chained
    sample = lambda plan: (plan, 0.03, 0.0, False)  # noqa: E731
    together = price_samples(model, [sample(p) for p in a + b], [None, 0.0, None, 0.0])
    apart = price_samples(model, [sample(p) for p in a], [None, 0.0]) + price_samples(model, [sample(p) for p in b],
                                                                                        [None, 0.0])
    assert together == apart
    chained = price_run(model, [(p, False) for p in a + b])
    # b's first step builds its graph (times the run factor)
    assert together[2] - chained[2] == pytest.approx((BUILD_S + 2 * BUILD_SEQ_S) * model.run_factor)
