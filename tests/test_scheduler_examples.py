"""One example per strategy for its defining behaviour, plus rejection, abort and preemption rules."""

import dataclasses
import subprocess
import sys

import pytest

from backends.synthetic import SyntheticBackend
from scheduler import FinishReason, Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.policies import make_policy
from scheduler.testing import check_invariants


def req(i, n_prompt=8, max_tokens=4, arrival=0.0, priority=0, prefix=()):
    prompt = tuple(prefix) + tuple(1000 + i * 100 + j for j in range(n_prompt))
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), priority=priority, arrival_s=arrival)


def run(s, backend=None, now=0.0, max_steps=10_000):
    backend = backend or SyntheticBackend()
    plans = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return plans
        plan = s.schedule(now)
        if plan.is_empty:
            now = plan.wake_at_s if plan.wake_at_s is not None else now
            continue
        plans.append(plan)
        res = backend.step(plan)
        now += res.elapsed_s
        s.commit(plan, res, now)
    raise AssertionError("did not drain")


def step(s, backend, now=0.0):
    plan = s.schedule(now)
    s.commit(plan, backend.step(plan), now + 1)
    return plan


CFG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4, max_model_len=512)


def test_static_admits_nothing_until_drained():
    s = Scheduler(CFG, "static", batch_size=2)
    be = SyntheticBackend()
    s.add_request(req(0, max_tokens=2))
    s.add_request(req(1, max_tokens=6))
    s.add_request(req(2, max_tokens=2))
    p = step(s, be)
    assert {c.request_id for c in p.chunks} == {"r0", "r1"}
    # r0 finishes after its second token; r2 must still wait until r1 drains
    while s.requests["r1"].status.value == "running":
        p = step(s, be)
        assert "r2" not in {c.request_id for c in p.chunks}
    p = step(s, be)
    assert [c.request_id for c in p.chunks] == ["r2"]


def test_static_wait_to_fill_sets_a_wakeup():
    s = Scheduler(CFG, "static", batch_size=3, wait_s=2.0)
    s.add_request(req(0, arrival=1.0), 1.0)
    plan = s.schedule(1.5)
    assert not plan.chunks and plan.wake_at_s == pytest.approx(3.0)
    assert [c.request_id for c in s.schedule(3.0).chunks] == ["r0"]


def test_static_padding_runs_to_the_longest():
    s = Scheduler(CFG, "static", batch_size=2, padding=True)
    s.add_request(req(0, n_prompt=4, max_tokens=1))
    s.add_request(req(1, n_prompt=10, max_tokens=5))
    plans = run(s)
    assert plans[0].num_pad_tokens == 6  # r0's prompt padded to r1's length
    assert len(plans) == 5 and all(len(p.chunks) == 2 for p in plans)  # r0 occupies its slot throughout
    assert s.requests["r0"].finish_s == s.requests["r1"].finish_s
    assert s.requests["r0"].output_token_ids and len(s.requests["r0"].output_token_ids) == 1


def test_continuous_refills_on_next_step():
    s = Scheduler(CFG, "continuous")
    be = SyntheticBackend()
    for i in range(4):
        s.add_request(req(i, max_tokens=2 if i == 0 else 8))
    s.add_request(req(4))
    step(s, be)
    step(s, be)  # r0 gets its 2nd token and finishes here
    assert s.requests["r0"].is_finished
    p = step(s, be)
    assert "r4" in {c.request_id for c in p.chunks}


def test_chunked_never_exceeds_budget_and_decodes_first():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=256, block_size=4)
    s = Scheduler(cfg, "chunked")
    s.add_request(req(0, n_prompt=5, max_tokens=10))
    s.add_request(req(1, n_prompt=40, max_tokens=3))
    plans = run(s)
    assert all(p.num_scheduled_tokens <= 16 for p in plans)
    split = [p for p in plans if any(c.request_id == "r1" and not c.sample for c in p.chunks)]
    assert len(split) >= 2  # the 40-token prompt was chunked
    for p in plans:
        kinds = [c.is_decode for c in p.chunks]
        assert kinds == sorted(kinds, reverse=True)  # decodes before prefill chunks


@pytest.mark.parametrize("order,expected", [("priority", ["r2", "r1", "r0"]), ("sjf", ["r1", "r2", "r0"])])
def test_queue_orders(order, expected):
    s = Scheduler(SchedulerConfig(max_num_seqs=1, num_kv_blocks=256, block_size=4), "continuous", order=order)
    s.add_request(req(0, n_prompt=30, priority=5))
    s.add_request(req(1, n_prompt=5, priority=3))
    s.add_request(req(2, n_prompt=10, priority=1))
    first = []
    for p in run(s):
        for c in p.chunks:
            if c.request_id not in first:
                first.append(c.request_id)
    assert first == expected


def test_sequential_runs_one_at_a_time():
    s = Scheduler(CFG, "sequential")
    for i in range(3):
        s.add_request(req(i))
    assert all(len(p.chunks) == 1 for p in run(s))


def test_adaptive_batch_grows_with_queue():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, num_kv_blocks=256, block_size=4), "adaptive", min_num_seqs=1)
    s.add_request(req(0))
    assert s.policy.max_num_seqs(s) == 2  # 1 + one waiting
    for i in range(1, 8):
        s.add_request(req(i))
    assert s.policy.max_num_seqs(s) == 8


@pytest.mark.parametrize("rule,victim", [("newest", "r2"), ("lowest_priority", "r0"), ("fewest_computed", "r1")])
def test_preemption_victim_rule(rule, victim):
    # 3 requests fill the KV; the next block any of them needs forces a preemption
    cfg = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=256, num_kv_blocks=9, block_size=4,
                          max_model_len=36, preemption_victim=rule, enable_prefix_caching=False)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    s.add_request(Request("r0", tuple(range(10, 22)), SamplingParams(max_tokens=20), priority=9, arrival_s=0))
    s.add_request(Request("r1", tuple(range(30, 38)), SamplingParams(max_tokens=20), priority=0, arrival_s=1))
    s.add_request(Request("r2", tuple(range(50, 62)), SamplingParams(max_tokens=20), priority=0, arrival_s=2))
    for _ in range(10):
        step(s, be)
        if s.stats.num_preemptions:
            break
    assert s.stats.num_preemptions == 1
    assert s.requests[victim].status.value == "waiting" and s.requests[victim].num_preemptions == 1
    run(s, be)
    assert s.stats.num_recomputed_tokens > 0
    assert all(len(r.output_token_ids) == 20 for r in s.requests.values())


def test_no_admission_on_a_preempting_step():
    cfg = SchedulerConfig(max_num_seqs=3, num_kv_blocks=6, block_size=4, max_model_len=24, enable_prefix_caching=False)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    s.add_request(Request("a", tuple(range(10, 18)), SamplingParams(max_tokens=12)))
    s.add_request(Request("b", tuple(range(20, 28)), SamplingParams(max_tokens=12)))
    step(s, be)
    s.add_request(Request("c", (5, 6), SamplingParams(max_tokens=2)))
    preempting_steps = 0
    for _ in range(40):
        if not s.has_unfinished():
            break
        waiting_before = {r.request_id for r in s.waiting}
        before = s.stats.num_preemptions
        p = s.schedule(0)
        if s.stats.num_preemptions > before:
            preempting_steps += 1
            assert not waiting_before & {c.request_id for c in p.chunks}
        s.commit(p, be.step(p), 1)
    assert preempting_steps >= 1 and not s.has_unfinished()


def test_prefix_hit_skips_cached_tokens():
    cfg = SchedulerConfig(max_num_seqs=4, num_kv_blocks=256, block_size=4)
    s = Scheduler(cfg, "continuous")
    system = tuple(range(500, 540))  # 40 tokens = 10 full blocks
    s.add_request(req(0, n_prompt=6, prefix=system))
    run(s)
    s.add_request(req(1, n_prompt=6, prefix=system))
    plans = run(s)
    first = plans[0].chunks[0]
    assert first.start_pos == 40 and len(first.token_ids) == 6
    assert s.requests["r1"].num_cached_tokens == 40


def test_prefix_copy_from_a_running_request():
    cfg = SchedulerConfig(max_num_seqs=4, num_kv_blocks=256, block_size=4)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    system = tuple(range(500, 540))
    s.add_request(req(0, n_prompt=6, max_tokens=20, prefix=system))
    step(s, be)
    s.add_request(req(1, n_prompt=6, prefix=system))
    p = step(s, be)
    assert [(c.src_slot, c.dst_slot, c.num_tokens) for c in p.copies] == [(s.requests["r0"].slot,
                                                                           s.requests["r1"].slot, 40)]
    assert [c for c in p.chunks if c.request_id == "r1"][0].start_pos == 40


def test_prefix_sharing_off_recomputes():
    cfg = SchedulerConfig(max_num_seqs=4, num_kv_blocks=256, block_size=4, enable_prefix_caching=False)
    s = Scheduler(cfg, "continuous")
    system = tuple(range(500, 540))
    s.add_request(req(0, prefix=system))
    run(s)
    s.add_request(req(1, prefix=system))
    assert run(s)[0].chunks[0].start_pos == 0


def test_rejections_have_reasons():
    s = Scheduler(SchedulerConfig(max_model_len=32, num_kv_blocks=64, block_size=4), "continuous")
    out = s.add_request(Request("long", tuple(range(10, 40)), SamplingParams(max_tokens=8)))
    assert out.finished and out.finish_reason == "rejected" and "max_model_len" in out.detail
    out = s.add_request(Request("empty", (), SamplingParams(max_tokens=8)))
    assert out.finish_reason == "rejected" and "empty prompt" in out.detail
    out = s.add_request(Request("zero", (5,), SamplingParams(max_tokens=0)))
    assert out.finish_reason == "rejected" and "max_tokens" in out.detail
    with pytest.raises(ValueError, match="duplicate request_id"):
        s.add_request(Request("zero", (5,), SamplingParams(max_tokens=1)))
    assert not s.has_unfinished()


def test_bad_configuration_and_policy_names():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="preemption_victim"):
        SchedulerConfig(preemption_victim="oldest")
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="batch_size"):
        make_policy("static:batch_size=zero")
    with pytest.raises(ValueError, match="key=value"):
        make_policy("static:batch_size")
    with pytest.raises(ValueError, match="no attribute"):
        make_policy("scheduler.policies:Nope")


def test_policy_by_module_attribute():
    assert make_policy("scheduler.policies:Chunked").name == "chunked"


def test_abort_returns_slot_and_blocks_through_next_plan():
    s = Scheduler(CFG, "continuous")
    be = SyntheticBackend()
    s.add_request(req(0, max_tokens=50))
    step(s, be)
    slot = s.requests["r0"].slot
    out = s.abort("r0", 1.0)
    assert out.finish_reason == "abort"
    s.release_cache()
    p = s.schedule(2.0)
    assert slot in {r.slot for r in p.removes} and "r0" in p.finished_request_ids
    s.commit(p, be.step(p), 2.0)
    assert s.pool.num_used_blocks == 0


def test_abort_while_a_plan_is_in_flight_is_applied_at_commit():
    s = Scheduler(CFG, "continuous")
    be = SyntheticBackend()
    s.add_request(req(0, max_tokens=50))
    p = s.schedule(0)
    assert s.abort("r0", 0.5) is None
    outs = s.commit(p, be.step(p), 1.0)
    assert outs[-1].finish_reason == FinishReason.ABORT.value and s.requests["r0"].is_finished


def test_scheduler_import_loads_no_heavy_packages():
    code = "import sys, scheduler; bad = {'simpy', 'numpy', 'llama_cpp', 'hypothesis'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "set()"


@pytest.mark.parametrize("choice", ["adjacent", "any"])
def test_a_new_request_takes_the_slot_between_running_ones(choice):
    # slots 0, 1, 2 run; the request in slot 1 finishes first and its KV stays cached; then a request arrives.
    # adjacent: it takes slot 1 (evicting that cache), so slots 0-2 stay one run of consecutive ids, which
    # llama.cpp decodes in one forward pass; any: it takes free slot 3, leaving a gap (two passes per step).
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4,
                          max_model_len=512, slot_choice=choice)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    for i, m in enumerate((20, 2, 20)):
        s.add_request(req(i, max_tokens=m))
    step(s, be)
    while s.requests["r1"].status.value == "running":
        step(s, be)
    assert s.pool.slot_state[1] == 2  # CACHED
    s.add_request(req(3, max_tokens=4))
    p = step(s, be)
    new = next(c for c in p.chunks if c.request_id == "r3")
    assert sorted(r.slot for r in s.running) == ([0, 1, 2] if choice == "adjacent" else [0, 2, 3])
    assert new.slot == (1 if choice == "adjacent" else 3)
    assert [rm.slot for rm in p.removes] == ([1] if choice == "adjacent" else [])  # the evicted cache goes


@pytest.mark.parametrize("choice", ["adjacent", "any"])
def test_a_prefix_hit_takes_over_the_cached_holder_next_to_the_running_slots(choice):
    # r0 computes a shared prefix in slot 0; r2 copies it into slot 2 while r1 runs in slot 1 and r3 in slot 3.
    # When r0, r1 and r2 have finished, slots 0 and 2 both hold the prefix (the same blocks) and only r3 runs.
    # adjacent: a new request with the prefix takes over slot 2, next to r3 (one forward pass per decode step);
    # any: the lowest holder, slot 0, apart from r3 (two passes).
    prefix = tuple(range(500, 508))
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=256, block_size=4,
                          max_model_len=512, slot_choice=choice)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    s.add_request(req(0, max_tokens=3, prefix=prefix))
    step(s, be)
    for i, (pre, m) in enumerate((((), 2), (prefix, 2), ((), 30)), start=1):
        s.add_request(req(i, max_tokens=m, prefix=pre))
    p = step(s, be)
    assert [(c.src_slot, c.dst_slot) for c in p.copies] == [(0, 2)]
    assert [s.requests[f"r{i}"].slot for i in range(4)] == [0, 1, 2, 3]
    while any(s.requests[f"r{i}"].status.value == "running" for i in range(3)):
        step(s, be)
    assert s.pool.slot_state == [2, 2, 2, 1]  # CACHED x3, RUNNING
    assert s.pool.slot_blocks[0][:2] == s.pool.slot_blocks[2][:2]
    s.add_request(req(4, max_tokens=4, prefix=prefix))
    p = step(s, be)
    taken = 2 if choice == "adjacent" else 0
    assert s.requests["r4"].slot == taken and s.requests["r4"].num_cached_tokens == 8 and not p.copies
    assert [(rm.slot, rm.start_pos) for rm in p.removes] == [(taken, 8)]  # the rest of the taken-over cache goes


def test_slot_choice_is_checked():
    with pytest.raises(ValueError, match="slot_choice"):
        SchedulerConfig(slot_choice="nearest")


@pytest.mark.parametrize("choice", ["compact", "adjacent"])
def test_compaction_moves_a_running_request_into_the_gap(choice):
    # all 4 slots run; r1 (slot 1) finishes and nothing waits: a gap between slot 0 and slots 2-3, no free slot.
    # compact: the next plan moves one running request so that the running slots are one run again. Runs 0-2
    # (r3 into slot 1) and 1-3 (r0 into slot 1) both take one move and evict r1's cache; the lower one wins.
    # The plan carries one KVCopy(move=True) of r3's computed tokens, and r3's chunk runs in its new slot.
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4,
                          max_model_len=512, slot_choice=choice)
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    for i, m in enumerate((20, 2, 20, 20)):
        s.add_request(req(i, max_tokens=m))
    step(s, be)
    while s.requests["r1"].status.value == "running":
        step(s, be)
    assert sorted(r.slot for r in s.running) == [0, 2, 3] and s.pool.slot_state[1] == 2  # CACHED
    computed = s.requests["r3"].num_computed_tokens
    p = step(s, be)
    if choice == "adjacent":
        assert not p.copies and sorted(r.slot for r in s.running) == [0, 2, 3]
        return
    assert [(c.src_slot, c.dst_slot, c.num_tokens, c.move) for c in p.copies] == [(3, 1, computed, True)]
    assert sorted(r.slot for r in s.running) == [0, 1, 2] and s.requests["r3"].slot == 1
    assert next(c for c in p.chunks if c.request_id == "r3").slot == 1
    assert s.pool.slot_state[3] == 0 and s.stats.num_slot_moves == 1 and s.stats.num_evictions == 1
    check_invariants(s)
    # the next steps decode in place: no more moves
    p = step(s, be)
    assert not p.copies and sorted(c.slot for c in p.chunks) == [0, 1, 2]


def test_compaction_prefers_a_free_slot_to_a_cached_one():
    # r0 in slot 0, r1 in slot 1 finishes (cached), r2 in slot 2: gap at 1, and slot 3 is free.
    # The run 2-3 needs one move (r0 from slot 0 into free slot 3) and keeps r1's cache; 0-1 or 1-2 would evict it.
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4,
                          max_model_len=512, slot_choice="compact")
    s = Scheduler(cfg, "continuous")
    be = SyntheticBackend()
    for i, m in enumerate((20, 2, 20)):
        s.add_request(req(i, max_tokens=m))
    step(s, be)
    while s.requests["r1"].status.value == "running":
        step(s, be)
    p = step(s, be)
    assert [(c.src_slot, c.dst_slot, c.move) for c in p.copies] == [(0, 3, True)]
    assert sorted(r.slot for r in s.running) == [2, 3] and s.pool.slot_state[1] == 2  # r1's cache is kept
    assert s.stats.num_evictions == 0
    check_invariants(s)


def test_a_prefix_copy_reads_a_slot_before_compaction_moves_its_request_away():
    # found by the sjf state machine: q5 takes over q0's cached slot 0 (prefix (10,)), q6 copies that prefix from
    # slot 0 into slot 5, then compaction moves q5 from slot 0 into the gap at slot 3. The copy comes before
    # the move in the plan, so the backend reads slot 0 before the move empties it; the plan is valid.
    from scheduler.testing import DeterministicExecutor, check_plan

    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=4, max_model_len=16, num_kv_blocks=6, block_size=1,
                          slot_choice="compact")
    s = Scheduler(cfg, "sjf")
    for i, prompt in enumerate([(10,), (10,), (100,), (10,), (10,), (10, 10), (10, 10)]):
        s.add_request(Request(f"q{i}", prompt, SamplingParams(max_tokens=1)), 0.0)
    ex, now, plans = DeterministicExecutor(), 0.0, []
    while s.has_unfinished():
        plan = s.schedule(now)
        check_plan(s, plan)
        result = ex.step(plan)
        now += result.elapsed_s
        s.commit(plan, result, now)
        check_invariants(s)
        plans.append(plan)
    copies = [(c.src_slot, c.dst_slot, c.move) for c in plans[1].copies]
    assert copies == [(0, 5, False), (0, 3, True)]
    assert all(r.finish_reason == FinishReason.LENGTH for r in s.requests.values())
    # the reverse order would read an emptied slot: the checker refuses it
    bad = dataclasses.replace(plans[1], copies=tuple(reversed(plans[1].copies)))
    s2 = Scheduler(cfg, "sjf")
    for i, prompt in enumerate([(10,), (10,), (100,), (10,), (10,), (10, 10), (10, 10)]):
        s2.add_request(Request(f"q{i}", prompt, SamplingParams(max_tokens=1)), 0.0)
    p0 = s2.schedule(0.0)
    s2.commit(p0, DeterministicExecutor().step(p0), 1.0)
    s2.schedule(1.0)
    with pytest.raises(AssertionError, match="after a move"):
        check_plan(s2, bad)
