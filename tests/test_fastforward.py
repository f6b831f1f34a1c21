"""The decode fast-forward against plain steps, on the scheduler directly (no SimPy)."""

import pytest

from backends.synthetic import SyntheticBackend
from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.testing import check_invariants


def _scheduler(caching: bool, slot_choice: str = "adjacent") -> tuple[Scheduler, SyntheticBackend]:
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, num_kv_blocks=200, block_size=4,
                          max_model_len=1024, enable_prefix_caching=caching, slot_choice=slot_choice)
    s = Scheduler(cfg, "chunked")
    # prompts of several lengths, so generated blocks start mid-block and straddle the prompt's end; more
    # requests than slots, so some runs stop at a finish (a request waits) and later ones run across them
    for i, (n, m) in enumerate([(5, 23), (8, 40), (13, 17), (3, 31), (9, 12), (6, 25), (4, 9), (7, 33)]):
        sp = SamplingParams(max_tokens=m, ignore_eos=True)
        s.add_request(Request(f"r{i}", tuple(range(100 + i, 100 + i + n)), sp), 0.0)
    return s, SyntheticBackend()


def _plain(s: Scheduler, b: SyntheticBackend, now: float) -> None:
    plan = s.schedule(now)
    s.commit(plan, b.step(plan), now)


@pytest.mark.parametrize("slot_choice", ["adjacent", "compact"])
@pytest.mark.parametrize("caching", [True, False])
def test_skipped_steps_leave_the_state_plain_steps_leave(caching, slot_choice):
    plain, pb = _scheduler(caching, slot_choice)
    fast, fb = _scheduler(caching, slot_choice)
    jumps = runs = 0
    now = 0.0
    while fast.has_unfinished():
        now += 1.0
        _plain(fast, fb, now)
        _plain(plain, pb, now)
        ff = fast.fast_forward
        k = ff.decode_horizon()
        if k:
            jumps += 1
            k = ff.decode_run_horizon() or k  # across finishes when nothing else changes at them
            runs += k > ff.decode_horizon()
            _, done, _ = ff.apply_decode_steps(k, fb.take_tokens)
            for step, r in done:
                ff.finish_decode_steps([r], now + step + 1)
            fb.forget(ff.take_announced())
            for j in range(k):
                _plain(plain, pb, now + j + 1)
            now += k
            assert [r.finish_s for r in fast.requests.values()] == [r.finish_s for r in plain.requests.values()]
        check_invariants(fast)  # includes: each slot's block hashes are those of its computed tokens
        check_invariants(plain)
        state = lambda s: [(r.request_id, r.slot, r.num_computed_tokens, list(r.output_token_ids),  # noqa: E731
                            s.pool.slot_hashes[r.slot]) for r in s.running]
        assert state(fast) == state(plain)
        assert fast.pool.num_used_blocks == plain.pool.num_used_blocks
        assert sorted(fast.pool.index) == sorted(plain.pool.index)
    assert jumps >= 3 and not plain.has_unfinished()
    assert runs >= 1 if caching else runs == 0  # runs across finishes only when finished KV stays cached
    assert {r: x.output_token_ids for r, x in fast.requests.items()} == \
        {r: x.output_token_ids for r, x in plain.requests.items()}
    # compaction moved requests on both sides alike (a finish in the middle slot leaves a gap)
    assert fast.stats.num_slot_moves == plain.stats.num_slot_moves
    assert (plain.stats.num_slot_moves > 0) == (slot_choice == "compact")
