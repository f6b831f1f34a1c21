"""Routing over several instances: prefix affinity within a load bound."""

import random

import pytest

from backends.synthetic import SyntheticBackend
from scheduler import Request, Router, SamplingParams, Scheduler, SchedulerConfig
from scheduler.router import BALANCE_REL_THRESHOLD
from sim.metrics import summarize
from sim.model import run_workload
from sim.workload import synthetic_workload

CFG = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, num_kv_blocks=512, block_size=16,
                      max_model_len=1024)
BOUND = 4  # a quarter of max_num_seqs: the default absolute threshold
SYSTEM = tuple(range(100, 164))  # a 64-token system prompt: four full blocks every prompt starts with


def req(i, prefix=SYSTEM, n=24, max_tokens=4):
    prompt = tuple(prefix) + tuple(10_000 + 50 * i + j for j in range(n))
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens))


def drain(s: Scheduler, backend=None, now=0.0) -> float:
    backend = backend or SyntheticBackend()
    while s.has_unfinished():
        plan = s.schedule(now)
        result = backend.step(plan)
        now += result.elapsed_s
        s.commit(plan, result, now)
    return now


def test_shared_first_block_spreads_within_the_bound():
    # every prompt starts with the same system block; nothing has run yet, so nothing is cached
    schedulers = [Scheduler(CFG, "continuous") for _ in range(4)]
    router = Router("prefix_affinity")
    for i in range(40):
        r = req(i)
        loads = [s.num_unfinished for s in schedulers]
        chosen = router.route(r, schedulers)
        assert router.within_bound(loads[chosen], min(loads), BOUND), (i, loads, chosen)
        schedulers[chosen].add_request(r, 0.0)
    loads = [s.num_unfinished for s in schedulers]
    assert sum(loads) == 40
    assert max(loads) - min(loads) <= BOUND + 1, loads


def test_cached_prefix_wins_while_load_is_balanced():
    schedulers = [Scheduler(CFG, "continuous") for _ in range(2)]
    router = Router("prefix_affinity")
    schedulers[1].add_request(req(0), 0.0)
    drain(schedulers[1])  # instance 1 now caches the system prompt; both instances are idle
    assert [s.num_unfinished for s in schedulers] == [0, 0]
    assert Router("least_outstanding").route(req(1), schedulers) == 0
    assert router.route(req(1), schedulers) == 1
    other = tuple(range(5000, 5064))
    assert router.route(req(2, prefix=other), schedulers) == 0  # nothing cached anywhere: least loaded


def test_cached_prefix_yields_past_the_bound():
    schedulers = [Scheduler(CFG, "continuous") for _ in range(2)]
    router = Router("prefix_affinity")
    schedulers[1].add_request(req(0), 0.0)
    drain(schedulers[1])
    unrelated = tuple(range(7000, 7064))
    assert router.abs_threshold(schedulers[0]) == BOUND
    for k in range(BOUND):  # instance 1 queues up to the bound: the cache still decides
        schedulers[1].add_request(req(100 + k, prefix=unrelated), 0.0)
        assert router.route(req(1), schedulers) == 1
    schedulers[1].add_request(req(200, prefix=unrelated), 0.0)  # one past it: the least loaded takes it
    assert router.route(req(1), schedulers) == 0


def test_the_bound_follows_the_relative_threshold_under_high_load():
    router = Router("prefix_affinity")
    assert router.within_bound(14, 10, 4)  # within the absolute threshold
    assert router.within_bound(int(BALANCE_REL_THRESHOLD * 100), 100, 4)  # 1.5x of a long queue
    assert not router.within_bound(int(BALANCE_REL_THRESHOLD * 100) + 1, 100, 4)
    assert not router.within_bound(5, 0, 4)


def test_the_absolute_threshold_scales_with_max_num_seqs():
    big = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192, num_kv_blocks=4096, block_size=16,
                          max_model_len=4096)
    one = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, num_kv_blocks=64, block_size=16,
                          max_model_len=512)
    router = Router("prefix_affinity")
    assert router.abs_threshold(Scheduler(big)) == 64  # SGLang's default, at its usual 256 sequences
    assert router.abs_threshold(Scheduler(one)) == 1
    assert Router("prefix_affinity", balance_abs_threshold=0).abs_threshold(Scheduler(big)) == 0


def test_every_choice_respects_the_bound_on_random_queues():
    rng = random.Random(0)
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4,
                          max_model_len=256)
    schedulers = [Scheduler(cfg, "continuous") for _ in range(3)]
    router = Router("prefix_affinity", balance_abs_threshold=2, balance_rel_threshold=1.2)
    backend = [SyntheticBackend() for _ in schedulers]
    now = 0.0
    heads = [tuple(range(100 * g, 100 * g + 8)) for g in range(3)]
    for i in range(300):
        r = req(i, prefix=rng.choice(heads), n=rng.randint(1, 12), max_tokens=rng.randint(1, 6))
        loads = [s.num_unfinished for s in schedulers]
        chosen = router.route(r, schedulers)
        assert router.within_bound(loads[chosen], min(loads), 2), (i, loads, chosen)
        schedulers[chosen].add_request(r, now)
        k = rng.randrange(3)  # one instance steps now and then, so caches and queues differ
        if schedulers[k].has_unfinished() and rng.random() < 0.6:
            plan = schedulers[k].schedule(now)
            result = backend[k].step(plan)
            now += result.elapsed_s
            schedulers[k].commit(plan, result, now)


@pytest.mark.parametrize("bad", [{"balance_abs_threshold": -1}, {"balance_abs_threshold": True},
                                 {"balance_rel_threshold": 0.5}, {"balance_rel_threshold": float("nan")}])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        Router("prefix_affinity", **bad)


def test_replay_with_one_system_prompt_uses_every_instance():
    # a busy multi-turn-like workload: every prompt starts with the same 64-token system prompt
    w = synthetic_workload("poisson", 200.0, 200, "uniform:16,64", "uniform:8,32", 0, shared_prefix_tokens=64)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=1024, block_size=16,
                          max_model_len=512)
    backends = [SyntheticBackend() for _ in range(4)]
    run = run_workload(w, "continuous", cfg, backends, router="prefix_affinity")
    s = summarize(run)
    counts = [v["num_requests"] for v in s["instance_load"].values()]
    assert len(counts) == 4 and sum(counts) == 200
    assert min(counts) >= 30, counts  # before the load bound: [200, 0, 0, 0]
    assert s["num_finished"] == 200
    assert s["prefix_hit_rate"] > 0.3  # each instance still reuses the system prompt it caches


def test_distinct_prefixes_get_distinct_homes_on_idle_instances():
    schedulers = [Scheduler(CFG, "continuous") for _ in range(4)]
    router = Router("prefix_affinity")
    heads = [tuple(range(1000 * g, 1000 * g + 64)) for g in range(4)]
    chosen = []
    for g, head in enumerate(heads):  # each group's first request finds every instance idle
        r = req(g, prefix=head)
        k = router.route(r, schedulers)
        schedulers[k].add_request(r, 0.0)
        drain(schedulers[k])
        chosen.append(k)
    assert sorted(chosen) == [0, 1, 2, 3]
    for g, head in enumerate(heads):  # later requests of a group follow their cached prefix
        assert router.route(req(10 + g, prefix=head), schedulers) == chosen[g]
