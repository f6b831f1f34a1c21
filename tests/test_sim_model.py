"""The SimPy model: completion, ordering, determinism, equivalence with a plain loop, strategy effects."""

import dataclasses

import pytest

from backends.cost import LinearCostModel
from backends.synthetic import SyntheticBackend
from scheduler import Scheduler, SchedulerConfig
from sim.metrics import summarize
from sim.model import run_workload, to_request
from sim.traces import load_trace
from sim.workload import synthetic_workload

COST = LinearCostModel()
CFG = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, num_kv_blocks=512, block_size=16,
                      max_model_len=2048)


def bursty(seed=1, n=120, rate=6.0):
    return synthetic_workload("gamma", rate, n, "uniform:16,96", "uniform:8,48", seed, cv=3.0)


def run(w, policy, cfg=CFG, **kw):
    return run_workload(w, policy, cfg, [SyntheticBackend(COST)], **kw)


@pytest.mark.parametrize("policy", ["sequential", "static", "continuous", "chunked", "adaptive", "sjf"])
def test_every_request_completes_with_ordered_timestamps(policy):
    w = bursty(n=60)
    res = run(w, policy)
    assert len(res.records) == 60
    for r in res.records:
        assert r.finish_reason == "length" and r.num_output_tokens == r.max_tokens
        assert r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s
        assert r.token_times_s == sorted(r.token_times_s) and len(r.token_times_s) == r.max_tokens


def test_same_seed_same_results_and_different_seed_differs():
    a, b, c = run(bursty(seed=3), "continuous"), run(bursty(seed=3), "continuous"), run(bursty(seed=4), "continuous")
    key = lambda res: [(r.request_id, r.first_token_s, r.finish_s) for r in res.records]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_simpy_driver_and_plain_loop_make_the_same_plans():
    w = bursty(seed=5, n=50)
    plans_sim = []

    class Spy(SyntheticBackend):
        def step(self, plan):
            plans_sim.append(plan)
            return super().step(plan)

    run_workload(w, "chunked", CFG, [Spy(COST)], fast_forward=False)
    # plain loop: same arrivals, same clock rule, no SimPy
    s = Scheduler(CFG, "chunked")
    be = SyntheticBackend(COST)
    pending = sorted(w.requests, key=lambda r: r.arrival_s)
    now, i, plans_loop = 0.0, 0, []
    while i < len(pending) or s.has_unfinished():
        while i < len(pending) and pending[i].arrival_s <= now:
            s.add_request(to_request(pending[i]), now)
            i += 1
        plan = s.schedule(now)
        if plan.is_empty:
            now = pending[i].arrival_s
            continue
        plans_loop.append(plan)
        res = be.step(plan)
        now += res.elapsed_s
        s.commit(plan, res, now)
    strip = lambda p: (p.chunks, p.removes, p.copies, p.finished_request_ids)  # noqa: E731
    # the driver ends with one plan that only hands the prefix cache back (KV removals)
    assert not plans_sim[-1].chunks and plans_sim[-1].removes
    assert [strip(p) for p in plans_sim[:-1]] == [strip(p) for p in plans_loop]


def test_continuous_beats_static_on_a_bursty_workload():
    w = bursty(seed=7, n=150, rate=8.0)
    st, co = summarize(run(w, "static")), summarize(run(w, "continuous"))
    assert co["ttft_s"]["mean"] < st["ttft_s"]["mean"]
    assert co["ttft_s"]["p99"] < st["ttft_s"]["p99"]
    assert co["throughput_rps"] >= st["throughput_rps"]
    assert co["e2e_s"]["mean"] < st["e2e_s"]["mean"]


def test_prefix_sharing_lowers_ttft_when_prompts_share_a_prefix():
    w = synthetic_workload("poisson", 4.0, 80, "uniform:8,32", "fixed:16", 11, shared_prefix_tokens=256)
    on = summarize(run(w, "continuous"))
    off_cfg = SchedulerConfig(**{**{f: getattr(CFG, f) for f in CFG.__dataclass_fields__},
                                 "enable_prefix_caching": False})
    off = summarize(run(w, "continuous", off_cfg))
    assert on["prefix_hit_rate"] > 0.8 and off["prefix_hit_rate"] == 0
    assert on["ttft_s"]["mean"] < 0.5 * off["ttft_s"]["mean"]


def test_mooncake_trace_exercises_real_prefix_reuse():
    import json

    path = "tests/fixtures/mooncake_synthetic_50.jsonl"
    seen, total, reused = set(), 0, 0
    for line in open(path):
        for h in json.loads(line)["hash_ids"]:
            total += 1
            reused += h in seen
            seen.add(h)
    w = load_trace(path, "mooncake", length_scale=0.05)
    # slots enough, taken without preferring a cached one next to the running ones, that the shared prefix
    # stays cached until it is asked for: the hit must not depend on how the run's timing shuffles the slots
    big = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, num_kv_blocks=4096, max_model_len=8192,
                          slot_choice="any")
    res = summarize(run(w, "continuous", big))
    assert res["num_finished"] == len(w.requests)
    # the trace's own block reuse (4% in this slice) shows up as prefix hits
    assert 0.8 * reused / total <= res["prefix_hit_rate"] <= reused / total + 0.01


def test_multi_instance_router_spreads_load():
    w = bursty(seed=9, n=80)
    res = run_workload(w, "continuous", CFG, [SyntheticBackend(COST) for _ in range(3)], router="round_robin")
    assert {r.instance for r in res.records} == {0, 1, 2}
    assert all(r.finish_reason == "length" for r in res.records)


def test_rejected_requests_are_recorded_with_reason():
    w = synthetic_workload("poisson", 2.0, 10, "fixed:3000", "fixed:8", 2)
    res = run(w, "continuous")
    assert all(r.finish_reason == "rejected" and "max_model_len" in r.detail for r in res.records)


@pytest.mark.parametrize("policy,instances,caching,cost_name", [
    ("continuous", 1, True, "h100-llama3-8b"), ("chunked", 1, True, "h100-llama3-8b"),
    ("static", 1, True, "h100-llama3-8b"), ("adaptive", 1, True, "h100-llama3-8b"),
    ("chunked", 3, True, "h100-llama3-8b"), ("continuous", 2, False, "h100-llama3-8b"),
    ("continuous", 1, True, "cpu-gemma3-270m"), ("chunked", 2, True, "cpu-gemma3-270m"),
    ("continuous", 1, True, "graphs"), ("chunked", 1, True, "graphs")])
def test_fast_forward_gives_exactly_the_step_by_step_results(policy, instances, caching, cost_name):
    from backends.cost import load_cost_model

    # a roofline (prices counters) and the bundled table (prices slot layout); "graphs": the table with
    # graph builds priced (see backends.cost.graph), which the fast-forward follows across steps
    cost = load_cost_model("cpu-gemma3-270m" if cost_name == "graphs" else cost_name)
    if cost_name == "graphs":
        cost = dataclasses.replace(cost, per_graph_build_s=5e-4, per_graph_build_seq_s=2e-5)
    # a small KV pool so that preemption and eviction interleave with skipped stretches
    cfg = SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=256, num_kv_blocks=160, block_size=16,
                          max_model_len=2048, enable_prefix_caching=caching)
    w = synthetic_workload("gamma", 20.0, 150, "lognormal:120,0.8", "lognormal:90,0.7", 3, cv=2.0,
                           shared_prefix_tokens=48, num_prefix_groups=3)
    runs = [run_workload(w, policy, cfg, [SyntheticBackend(cost) for _ in range(instances)],
                         router="least_outstanding", fast_forward=ff) for ff in (False, True)]
    plain, fast = runs
    assert fast.config["fast_forward"] and not plain.config["fast_forward"]
    order = lambda steps: sorted(steps, key=lambda x: (x.instance, x.start_s))  # noqa: E731
    assert len(fast.steps) == len(plain.steps) and order(fast.steps) == order(plain.steps)
    assert len(fast.steps) > 1000  # long enough that skipped stretches happened
    assert [vars_of(r) for r in fast.records] == [vars_of(r) for r in plain.records]
    assert (fast.num_preemptions, fast.duration_s) == (plain.num_preemptions, plain.duration_s)


@pytest.mark.parametrize("policy", ["continuous", "static", "chunked"])
def test_fast_forward_keeps_the_wakeup_of_steps_after_idle_exact(policy):
    """A light load: most prompts arrive to an idle engine and pay the profile's wake-up for their wait; the
    fast-forward must leave the backend knowing when the last skipped step ended."""
    from backends.cost import load_cost_model

    cost = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), idle_wakeup_curve=((0.1, 0.002), (1.0, 0.02)))
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=256, block_size=16,
                          max_model_len=1024)
    w = synthetic_workload("poisson", 1.5, 120, "uniform:16,200", "uniform:4,60", 7)
    plain, fast = (run_workload(w, policy, cfg, [SyntheticBackend(cost)], fast_forward=ff) for ff in (False, True))
    assert [vars_of(r) for r in fast.records] == [vars_of(r) for r in plain.records]
    assert fast.duration_s == plain.duration_s
    if policy == "static":  # its batches form by timing, so a slower first step can even speed the run up
        return
    # the wake-up was charged: the same run without it finishes its requests sooner
    calm = run_workload(w, policy, cfg, [SyntheticBackend(dataclasses.replace(cost, idle_wakeup_s=0.0,
                                                                              idle_wakeup_curve=()))])
    e2e = lambda run: sum(r.finish_s - r.arrival_s for r in run.records)  # noqa: E731
    assert e2e(fast) > e2e(calm) + 0.002 * 30


def vars_of(record):
    return {f: getattr(record, f) for f in record.__dataclass_fields__}


def test_skipped_steps_land_simpys_clock_exactly_on_the_last_step_end():
    """The fast-forward moves SimPy's clock to the end of the last skipped step; when no single float
    delay lands there (now + d skips it), it goes through earlier step ends, as plain steps would."""
    import random

    from sim.model import _exact_delay, _reach

    rng = random.Random(5)
    fell_back = 0
    for _ in range(2000):
        now = rng.uniform(0.1, 0.5)
        path, t = [], now
        for _ in range(rng.randint(1, 40)):
            t += rng.uniform(0.01, 0.08)  # a step's price, added as SimPy adds a delay
            path.append(t)
        clock = now
        for d in _reach(now, path):
            clock += d
        assert clock == path[-1]
        fell_back += _exact_delay(now, path[-1]) is None
    assert fell_back > 0  # some ends cannot be reached in one delay: the fallback was exercised
