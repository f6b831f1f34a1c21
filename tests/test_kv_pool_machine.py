"""The KV pool under random operations, checked against a simple model of what each slot holds."""

import copy

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.kv import CACHED, FREE, RUNNING, KVPool

PREFIXES = [tuple(range(100 + 50 * i, 130 + 50 * i)) for i in range(3)]


def snapshot(pool):
    keys = ("slot_state", "slot_blocks", "slot_hashes", "slot_tokens", "holders", "running_holders", "index",
            "free_slots", "num_evictable")
    return {k: copy.deepcopy(getattr(pool, k)) for k in keys} | {"lru": list(pool.cached_lru)}


class KVPoolMachine(RuleBasedStateMachine):
    """Model: each slot holds a token sequence; the pool must agree and never over-allocate."""

    @initialize(num_blocks=st.integers(2, 40), block_size=st.sampled_from([1, 2, 4, 8]),
                num_slots=st.integers(1, 5), caching=st.booleans())
    def setup(self, num_blocks, block_size, num_slots, caching):
        self.pool = KVPool(num_blocks, block_size, num_slots, caching)
        self.content = {}  # slot -> tokens the model says it holds (computed)
        self.failed_allocations = 0

    def _admit_tokens(self, tokens):
        pool = self.pool
        hashes = pool.chain_hashes(tokens, (len(tokens) - 1) // pool.block_size)
        depth, src = pool.match_prefix(hashes)
        m = depth * pool.block_size
        if depth:
            # sharing is only correct if the source really holds these tokens
            assert tuple(self.content[src][:m]) == tuple(tokens[:m])
        reuse = src is not None and pool.slot_state[src] == CACHED
        pinned = sum(1 for b in pool.slot_blocks[src][:depth] if pool.running_holders[b] == 0) if reuse else 0
        need = pool.blocks_for(len(tokens)) - depth
        if not pool.has_slot() or not pool.can_reserve(need + pinned):
            return None
        if reuse:
            pool.reuse_cached(src, depth)
            slot = src
        else:
            slot, evicted = pool.acquire_slot()
            if evicted is not None:
                self.content.pop(evicted, None)
            if depth:
                pool.copy_prefix(src, slot, depth)
        while pool.num_free_blocks < need:
            self.content.pop(pool.evict_one(), None)
        pool.reserve(slot, len(tokens))
        pool.computed(slot, len(tokens), lambda a, b: tokens[a:b])
        self.content[slot] = list(tokens)
        return slot

    @rule(prefix=st.sampled_from([(), *PREFIXES]), cut=st.integers(0, 30),
          suffix=st.lists(st.integers(1, 50), min_size=1, max_size=30))
    def admit(self, prefix, cut, suffix):
        before = snapshot(self.pool)
        if self._admit_tokens(tuple(prefix[:cut]) + tuple(suffix)) is None:
            assert snapshot(self.pool) == before, "a failed allocation changed the pool"
            self.failed_allocations += 1

    @precondition(lambda self: any(s == RUNNING for s in self.pool.slot_state))
    @rule(data=st.data(), n=st.integers(1, 9))
    def grow(self, data, n):
        pool = self.pool
        slot = data.draw(st.sampled_from([s for s in range(pool.num_slots) if pool.slot_state[s] == RUNNING]))
        tokens = self.content[slot] + [7] * n
        need = pool.blocks_for(len(tokens)) - len(pool.slot_blocks[slot])
        if need > 0 and pool.num_free_blocks < need:
            before = snapshot(pool)
            if not pool.can_reserve(need):
                assert snapshot(pool) == before
                return
            while pool.num_free_blocks < need:
                self.content.pop(pool.evict_one(), None)
        pool.reserve(slot, len(tokens))
        pool.computed(slot, len(tokens), lambda a, b: tuple(tokens[a:b]))
        self.content[slot] = tokens

    @precondition(lambda self: any(s == RUNNING for s in self.pool.slot_state))
    @rule(data=st.data(), keep=st.booleans())
    def release(self, data, keep):
        pool = self.pool
        slot = data.draw(st.sampled_from([s for s in range(pool.num_slots) if pool.slot_state[s] == RUNNING]))
        if pool.release(slot, keep_cached=keep):
            del self.content[slot]

    @rule()
    def evict(self):
        slot = self.pool.evict_one()
        if slot is not None:
            del self.content[slot]

    @invariant()
    def agrees_with_model(self):
        pool = self.pool
        pool.check()
        assert pool.num_used_blocks <= pool.num_blocks
        for slot in range(pool.num_slots):
            if pool.slot_state[slot] == FREE:
                assert slot not in self.content
            else:
                assert pool.slot_tokens[slot] == len(self.content[slot])
                assert len(pool.slot_blocks[slot]) >= pool.blocks_for(pool.slot_tokens[slot])

    def teardown(self):
        pool = self.pool
        for slot in range(pool.num_slots):
            if pool.slot_state[slot] == RUNNING:
                pool.release(slot, keep_cached=True)
        while pool.evict_one() is not None:
            pass
        pool.check()
        assert pool.num_used_blocks == 0 and pool.num_evictable == 0 and not pool.index


KVPoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVPool = KVPoolMachine.TestCase
