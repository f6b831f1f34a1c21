"""KV accounting: slots, blocks with reference counts, and a prefix index over full blocks.

A slot is a llama.cpp sequence id. A slot holds the KV of one token sequence as a
list of physical blocks. A block is shared between slots only through a prefix
copy (``llama_memory_seq_cp``), never because two slots computed equal tokens:
those are separate cells in llama.cpp, so they stay separate blocks here.

Slots are FREE (empty), RUNNING (owned by a running request) or CACHED (the KV of
a finished or preempted request, kept for prefix reuse until its space or slot is
needed, evicted least recently used first). Used blocks = live physical blocks;
evictable blocks = blocks no running slot holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate, islice
from operator import sub

FREE, RUNNING, CACHED = 0, 1, 2


def one_run(slots: Sequence[int]) -> bool:
    """True if the slots are consecutive ids (or fewer than two): llama.cpp decodes them in one forward pass."""
    return len(slots) < 2 or max(slots) - min(slots) == len(slots) - 1


def _running_neighbours(slot: int, running: set[int]) -> int:
    """How many of the slot's two neighbours run (llama.cpp batches runs of consecutive slot ids)."""
    return (slot - 1 in running) + (slot + 1 in running)
ROOT_HASH = hash(("tokenstep-prefix-root",))  # the parent of a first block in the hash chains


class KVPool:
    """Block accounting for one scheduler (one llama.cpp context)."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.slot_state = [FREE] * num_slots
        self.slot_blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self.slot_hashes: list[list[int]] = [[] for _ in range(num_slots)]  # hashes of computed full blocks
        self.slot_tokens = [0] * num_slots  # tokens whose KV is in the slot (computed)
        # per physical block id (0 .. num_blocks - 1); lists, not dicts: a replay makes millions of blocks
        self.holders = [0] * num_blocks  # slots holding the block (stale while it is free)
        self.running_holders = [0] * num_blocks  # RUNNING slots holding it
        self._free_ids = list(range(num_blocks - 1, -1, -1))  # free block ids; pop() gives the lowest
        self.index: dict[int, int] = {}  # chained hash -> block id
        self.cached_lru: OrderedDict[int, None] = OrderedDict()  # CACHED slots, least recent first
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self.num_evictable = 0  # live blocks with no running holder

    # ---- queries -------------------------------------------------------------
    @property
    def num_used_blocks(self) -> int:
        """Live physical blocks."""
        return self.num_blocks - len(self._free_ids)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not holding any KV."""
        return len(self._free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_new_blocks: int) -> bool:
        """True if that many blocks can be had, evicting cached slots if needed."""
        return num_new_blocks <= self.num_free_blocks + self.num_evictable

    def has_slot(self) -> bool:
        """True if a slot is free or can be freed by evicting a cached one."""
        return bool(self.free_slots) or bool(self.cached_lru)

    # ---- prefix index ----------------------------------------------------------
    def chain_hashes(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Chained hashes of the first max_blocks full blocks of token_ids.

        A sequence with a prefix_hashes(block_size, max_blocks) method is asked first: it gives these very
        hashes, or None when it does not know them (sim.workload's compact prompts compute them for a whole
        trace at once, from their arrays).
        """
        known = getattr(token_ids, "prefix_hashes", None)
        if known is not None:
            hashes = known(self.block_size, max_blocks)
            if hashes is not None:
                return hashes
        bs = self.block_size
        out = []
        append = out.append
        parent = ROOT_HASH
        # zip over bs references to one iterator yields the full blocks as tuples, equal to the slices
        for block in islice(zip(*[iter(token_ids)] * bs, strict=False), max(max_blocks, 0)):
            parent = hash((parent, block))
            append(parent)
        return out

    def match_prefix(self, hashes: list[int], near: Sequence[int] = ()) -> tuple[int, int | None]:
        """(number of matched blocks, a slot holding them), preferring a CACHED holder.

        Among CACHED holders, the one next to the most running slots `near` (then the lowest id): a
        request that takes over a cached slot runs there, and llama.cpp batches only runs of consecutive
        slots (see acquire_slot).
        """
        if not self.enable_prefix_caching:
            return 0, None
        index = self.index
        depth = 0
        block = -1
        for h in hashes:
            b = index.get(h)
            if b is None:
                break
            block = b
            depth += 1
        if depth == 0:
            return 0, None
        j = depth - 1
        slot_blocks, slot_hashes = self.slot_blocks, self.slot_hashes
        # CACHED slots first (usually few), then the lowest RUNNING holder: no scan of every slot per admission
        cached = [slot for slot in self.cached_lru
                  if len(slot_blocks[slot]) > j and slot_blocks[slot][j] == block and len(slot_hashes[slot]) > j]
        if cached:
            if near and len(cached) > 1:
                occupied = set(near)
                return depth, max(cached, key=lambda c: (_running_neighbours(c, occupied), -c))
            return depth, min(cached)
        for slot in range(self.num_slots):
            blocks = slot_blocks[slot]
            if len(blocks) > j and blocks[j] == block and len(slot_hashes[slot]) > j:
                return depth, slot
        return 0, None  # index and slots disagree: never share what no slot holds

    # ---- mutations (the scheduler emits the matching KV operations) -------------
    def _new_blocks(self, n: int) -> list[int]:
        """n free block ids, now held by one RUNNING slot."""
        free = self._free_ids
        if n > len(free):
            raise RuntimeError(f"KV pool: {n} blocks asked for, {len(free)} free (reserve without can_reserve)")
        new = free[len(free) - n:]
        del free[len(free) - n:]
        holders, running_holders = self.holders, self.running_holders
        for b in new:
            holders[b] = 1
            running_holders[b] = 1
        return new

    def _drop(self, blocks: list[int], hashes: list[int], was_running: bool) -> None:
        """One slot lets go of blocks; a block nobody holds any more dies (lookups hoisted: often many blocks).

        hashes are the slot's chained hashes of those blocks, aligned with them (shorter when the last
        blocks are not full): a dying block leaves the prefix index if the index points at it.
        """
        holders, running_holders, index = self.holders, self.running_holders, self.index
        free = self._free_ids
        if not was_running and blocks and max(map(holders.__getitem__, blocks)) == 1:
            # the common eviction: a cached slot that shares nothing, so every block dies; bulk, in C loops
            # (a free block's holder count is never read again before _new_blocks sets it)
            free += blocks
            self.num_evictable -= len(blocks)
            if list(map(index.get, hashes)) == blocks[: len(hashes)]:
                for h in hashes:
                    del index[h]
            else:
                for h, b in zip(hashes, blocks, strict=False):
                    if index.get(h) == b:
                        del index[h]
            return
        evictable = self.num_evictable
        num_hashed = len(hashes)
        for j, b in enumerate(blocks):
            n = holders[b] - 1
            holders[b] = n
            if was_running:
                r = running_holders[b] - 1
                running_holders[b] = r
                if n:
                    if r == 0:
                        evictable += 1  # only cached slots hold it now
                    continue
            elif n:
                continue  # a cached slot let go of a block others still hold: nothing else changes
            else:
                evictable -= 1  # the last holder was a cached slot: it was evictable
            free.append(b)
            if j < num_hashed and index.get(hashes[j]) == b:
                del index[hashes[j]]
        self.num_evictable = evictable

    def acquire_slot(self, near: Sequence[int] = ()) -> tuple[int, int | None]:
        """Take a slot next to the running slots `near` if one is free or cached, else any free slot, else
        evict the least recently used cached one.

        llama.cpp with a KV stream per slot batches only runs of consecutive slot ids, one forward pass per
        run: a slot that closes a gap between two running slots (or extends a run) saves passes on every
        decode step the request shares with them. So the slot next to the most running slots wins; a free
        one before a cached one (a cached slot is evicted only when it joins more running slots than any
        free slot does); then the lowest id. Returns (slot, evicted slot or None); the caller emits a
        KVRemove for an eviction.
        """
        if near:
            state, n = self.slot_state, self.num_slots
            occupied = set(near)
            best, best_key = -1, (0, False, 0)
            for s in occupied:
                for c in (s - 1, s + 1):
                    if 0 <= c < n and c not in occupied and state[c] != RUNNING:
                        key = (_running_neighbours(c, occupied), state[c] == FREE, -c)
                        if key > best_key:
                            best, best_key = c, key
            if best >= 0:
                return best, self._take(best)
        if self.free_slots:
            slot = self.free_slots.pop()
            self.slot_state[slot] = RUNNING
            return slot, None
        slot = next(iter(self.cached_lru))
        self._evict(slot)
        self.free_slots.remove(slot)
        self.slot_state[slot] = RUNNING
        return slot, slot

    def _take(self, slot: int) -> int | None:
        """Mark a FREE or CACHED slot RUNNING, evicting its cache; return the slot if it was evicted."""
        evicted = None
        if self.slot_state[slot] == CACHED:
            self._evict(slot)
            evicted = slot
        self.free_slots.remove(slot)
        self.slot_state[slot] = RUNNING
        return evicted

    def evict_one(self) -> int | None:
        """Evict the least recently used cached slot; return it (None if none)."""
        if not self.cached_lru:
            return None
        slot = next(iter(self.cached_lru))
        self._evict(slot)
        return slot

    def _evict(self, slot: int) -> None:
        del self.cached_lru[slot]
        self._drop(self.slot_blocks[slot], self.slot_hashes[slot], was_running=False)
        self.slot_blocks[slot] = []
        self.slot_hashes[slot] = []
        self.slot_tokens[slot] = 0
        self.slot_state[slot] = FREE
        self.free_slots.append(slot)

    def reuse_cached(self, slot: int, num_blocks: int) -> None:
        """Take over a CACHED slot for a new request, keeping its first num_blocks blocks."""
        del self.cached_lru[slot]
        blocks = self.slot_blocks[slot]
        self._drop(blocks[num_blocks:], self.slot_hashes[slot][num_blocks:], was_running=False)
        kept = blocks[:num_blocks]
        running_holders = self.running_holders
        for b in kept:
            r = running_holders[b]
            if r == 0:
                self.num_evictable -= 1
            running_holders[b] = r + 1
        self.slot_blocks[slot] = kept
        self.slot_hashes[slot] = self.slot_hashes[slot][:num_blocks]
        self.slot_tokens[slot] = num_blocks * self.block_size
        self.slot_state[slot] = RUNNING

    def copy_prefix(self, src: int, dst: int, num_blocks: int) -> None:
        """Make RUNNING slot dst share the first num_blocks blocks of src."""
        blocks = self.slot_blocks[src][:num_blocks]
        for b in blocks:
            self.holders[b] += 1
            r = self.running_holders[b]
            if r == 0:
                self.num_evictable -= 1
            self.running_holders[b] = r + 1
        self.slot_blocks[dst] = list(blocks)
        self.slot_hashes[dst] = self.slot_hashes[src][:num_blocks]
        self.slot_tokens[dst] = num_blocks * self.block_size

    def move(self, src: int, dst: int) -> int | None:
        """A RUNNING slot's KV moves to dst (FREE or CACHED; a cached one is evicted); src becomes FREE.

        The blocks, their counts and the prefix index stay as they are: only the slot changes. Returns
        the evicted slot (dst) or None; the caller emits the KVCopy(move=True), and a KVRemove for an
        eviction when no copy clears dst.
        """
        state = self.slot_state
        if state[src] != RUNNING or state[dst] == RUNNING:
            raise RuntimeError(f"KV pool: move {src}->{dst} needs a running source and a free or cached target")
        evicted = self._take(dst)
        self.slot_blocks[dst], self.slot_blocks[src] = self.slot_blocks[src], []
        self.slot_hashes[dst], self.slot_hashes[src] = self.slot_hashes[src], []
        self.slot_tokens[dst], self.slot_tokens[src] = self.slot_tokens[src], 0
        state[src] = FREE
        self.free_slots.append(src)
        return evicted

    def compaction_moves(self, running: Sequence[int]) -> list[tuple[int, int]]:
        """(src, dst) moves that make the running slots one run of consecutive ids (none if they are).

        The run goes where it needs the fewest moves, then evicts the fewest cached slots, then lowest.
        Running slots outside it move, in slot order, into its free slots first, then into its cached
        ones, least recently used first.
        """
        if one_run(running):
            return []
        k = len(running)
        n = self.num_slots
        occupied = set(running)
        state = self.slot_state
        # every run [a, a + k) at once, from prefix sums (C loops: a replay calls this often, over 256 slots):
        # key = running slots inside * (n + 1) + free slots inside; max() keeps the first, i.e. the lowest run
        weight = list(map(FREE.__eq__, state))  # 1 per free slot, 0 per cached one, n + 1 per running one
        for s in running:
            weight[s] = n + 1
        sums = list(accumulate(weight, initial=0))
        keys = list(map(sub, sums[k:], sums[: n - k + 1]))
        best = max(range(n - k + 1), key=keys.__getitem__)
        window = range(best, best + k)
        lru = {slot: i for i, slot in enumerate(self.cached_lru)}
        targets = sorted((s for s in window if s not in occupied), key=lambda s: (state[s] != FREE, lru.get(s, 0), s))
        sources = sorted(s for s in occupied if s not in window)
        return list(zip(sources, targets, strict=True))

    def reserve(self, slot: int, num_tokens: int) -> int:
        """Give a RUNNING slot blocks to hold num_tokens positions; return blocks added.

        The caller checks can_reserve first and evicts cached slots until the
        blocks are free, so a reservation that cannot be met never happens.
        """
        blocks = self.slot_blocks[slot]
        need = -(-num_tokens // self.block_size) - len(blocks)
        if need <= 0:
            return 0
        blocks += self._new_blocks(need)
        return need

    def reserve_free_block(self, slot: int) -> bool:
        """Give a RUNNING slot one more block if one is free (never evicts); False if none is."""
        if not self._free_ids:
            return False
        self.slot_blocks[slot] += self._new_blocks(1)
        return True

    def computed(self, slot: int, num_tokens: int, token_source, known: list[int] | tuple[int, ...] = ()) -> None:
        """Record that the slot now holds num_tokens computed positions; index new full blocks.

        token_source(start, stop) returns the token ids at those positions. known may
        give chain_hashes of the same tokens (computed at admission) to skip rehashing.
        """
        self.slot_tokens[slot] = num_tokens
        if not self.enable_prefix_caching:
            return
        hashes = self.slot_hashes[slot]
        full = num_tokens // self.block_size
        done = len(hashes)
        if done >= full:
            return
        bs = self.block_size
        parent = hashes[-1] if hashes else ROOT_HASH
        if done and (len(known) < done or known[done - 1] != parent):
            known = ()  # not this slot's chain: hash from the tokens
        blocks = self.slot_blocks[slot]
        index = self.index
        if len(known) >= full:  # a prefill of known prompt blocks: index them in bulk when none is there yet
            new = dict(zip(known[done:full], blocks[done:full], strict=True))
            hashes += known[done:full]
            if index.keys().isdisjoint(new):
                index.update(new)
            else:
                for h, b in zip(known[done:full], blocks[done:full], strict=True):
                    index.setdefault(h, b)
            return
        for j in range(done, full):
            parent = known[j] if j < len(known) else hash((parent, tuple(token_source(j * bs, (j + 1) * bs))))
            hashes.append(parent)
            index.setdefault(parent, blocks[j])

    def decoded(self, slot: int, num_tokens: int, num_prompt_tokens: int, output_token_ids: list[int],
                token_source) -> None:
        """reserve(slot, num_tokens) and computed(slot, num_tokens, token_source) after decode steps, in one call.

        Decode steps only add generated tokens, so a new full block is hashed from output_token_ids
        directly (token_source, for positions [start, stop), serves a block that still holds prompt tokens).
        """
        self.reserve(slot, num_tokens)
        self.slot_tokens[slot] = num_tokens
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = self.slot_hashes[slot]
        done = len(hashes)
        full = num_tokens // bs
        if done >= full:
            return
        parent = hashes[-1] if hashes else ROOT_HASH
        blocks, index = self.slot_blocks[slot], self.index
        for j in range(done, full):
            lo = j * bs - num_prompt_tokens
            block = tuple(output_token_ids[lo : lo + bs]) if lo >= 0 else tuple(token_source(j * bs, (j + 1) * bs))
            parent = hash((parent, block))
            hashes.append(parent)
            index.setdefault(parent, blocks[j])

    def release(self, slot: int, keep_cached: bool) -> bool:
        """A RUNNING slot's request left: keep its computed KV as cache, or free it.

        Blocks reserved beyond the computed tokens are returned either way.
        Returns True when the slot was freed (the caller emits a KVRemove).
        """
        blocks = self.slot_blocks[slot]
        keep = self.blocks_for(self.slot_tokens[slot]) if keep_cached and self.enable_prefix_caching else 0
        self._drop(blocks[keep:], self.slot_hashes[slot][keep:], was_running=True)
        kept = blocks[:keep]
        running_holders = self.running_holders
        if kept and max(map(running_holders.__getitem__, kept)) == 1:  # common: no other running slot shares them
            for b in kept:
                running_holders[b] = 0
            self.num_evictable += len(kept)
        else:
            for b in kept:
                r = running_holders[b] - 1
                running_holders[b] = r
                if r == 0:
                    self.num_evictable += 1
        if keep:
            self.slot_blocks[slot] = kept
            self.slot_state[slot] = CACHED
            self.cached_lru[slot] = None
            return False
        self.slot_blocks[slot] = []
        self.slot_hashes[slot] = []
        self.slot_tokens[slot] = 0
        self.slot_state[slot] = FREE
        self.free_slots.append(slot)
        return True

    def check(self) -> None:
        """Recount everything from the slots and raise AssertionError on any mismatch (tests)."""
        holders: dict[int, int] = {}
        running: dict[int, int] = {}
        for slot in range(self.num_slots):
            state = self.slot_state[slot]
            blocks = self.slot_blocks[slot]
            if state == FREE:
                assert not blocks and self.slot_tokens[slot] == 0, f"free slot {slot} holds KV"
                assert slot in self.free_slots and slot not in self.cached_lru
            else:
                assert slot not in self.free_slots, f"slot {slot} is both used and free"
                assert (state == CACHED) == (slot in self.cached_lru), f"slot {slot} LRU mismatch"
            assert len(set(blocks)) == len(blocks), f"slot {slot} holds a block twice"
            assert len(self.slot_hashes[slot]) <= len(blocks)
            for b in blocks:
                holders[b] = holders.get(b, 0) + 1
                running[b] = running.get(b, 0) + (state == RUNNING)
        free_ids = set(self._free_ids)
        assert len(free_ids) == len(self._free_ids), "a block id is free twice"
        live = {b: n for b, n in enumerate(self.holders) if b not in free_ids}  # a free block's count is stale
        assert holders == live, "block reference counts disagree with the slots"
        assert running == {b: self.running_holders[b] for b in live}, "running reference counts disagree"
        assert all(self.running_holders[b] == 0 for b in range(self.num_blocks) if b not in live), \
            "a free block keeps a running count"
        assert self.num_evictable == sum(1 for b in holders if running[b] == 0), "evictable count is off"
        assert len(self.free_slots) == len(set(self.free_slots))
        block_hash: dict[int, int] = {}
        for slot in range(self.num_slots):
            for b, h in zip(self.slot_blocks[slot], self.slot_hashes[slot], strict=False):
                assert block_hash.setdefault(b, h) == h, f"slots disagree on the hash of block {b}"
        for h, b in self.index.items():
            assert b in holders and block_hash.get(b) == h, "prefix index points at a dead or unhashed block"
