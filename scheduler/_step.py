"""How one step is planned: running requests first, then admissions (vLLM v1 order)."""

from __future__ import annotations

from bisect import insort
from dataclasses import replace
from typing import TYPE_CHECKING

from .kv import CACHED
from .messages import KVCopy, KVRemove, ScheduledChunk, StepPlan, new_chunk
from .request import Request, RequestStatus

if TYPE_CHECKING:  # pragma: no cover
    from .core import Scheduler

WAITING, RUNNING = RequestStatus.WAITING, RequestStatus.RUNNING


class _Builder:
    """Accumulates one plan's chunks, KV operations and cost counters."""

    __slots__ = ("chunks", "removes", "copies", "prefill", "decode", "context", "sum_sq", "pad", "copied", "budget",
                 "preempted")

    def __init__(self, removes: list[KVRemove], budget: int) -> None:
        self.chunks: list[ScheduledChunk] = []
        self.removes = removes
        self.copies: list[KVCopy] = []
        self.prefill = self.decode = self.context = self.sum_sq = self.pad = self.copied = 0
        self.budget = budget
        self.preempted = False

    def add(self, r: Request, start: int, n: int, pad: int = 0) -> None:
        end = start + n
        num_tokens = r.num_tokens
        is_decode = n == 1 and end == num_tokens and start >= len(r.prompt_token_ids)
        chunk = new_chunk(r.request_id, r.slot, start, r.token_at(start, end) if n else (), n > 0 and end == num_tokens,
                          pad, is_decode, r.sampling)
        self.chunks.append(chunk)
        self.budget -= n
        self.pad += pad
        if is_decode:
            self.decode += 1
            self.context += end
        elif n:
            self.prefill += n
            self.context += end
            self.sum_sq += n * end

    def drop(self, request_id: str) -> None:
        """Take a chunk back out (its request was preempted later in the same step)."""
        chunks = self.chunks
        for i in range(len(chunks) - 1, -1, -1):  # rare (preemption): a scan beats indexing every chunk
            if chunks[i].request_id == request_id:
                break
        else:
            return
        c = chunks.pop(i)
        n = len(c.token_ids)
        self.budget += n
        self.pad -= c.num_pad_tokens
        if c.is_decode:
            self.decode -= 1
            self.context -= c.start_pos + 1
        elif n:
            self.prefill -= n
            self.context -= c.start_pos + n
            self.sum_sq -= n * (c.start_pos + n)


def _victim(s: Scheduler) -> Request:
    rule = s.config.preemption_victim
    running = s.running
    if rule == "newest":
        return max(running, key=lambda r: (r.arrival_s, r.request_id))
    if rule == "lowest_priority":
        return max(running, key=lambda r: (r.priority, r.arrival_s, r.request_id))
    return min(running, key=lambda r: (r.num_computed_tokens, -r.arrival_s))


def _preempt(s: Scheduler, victim: Request, b: _Builder) -> None:
    """Recompute preemption: the victim's KV becomes cache, the request waits again."""
    b.drop(victim.request_id)
    s.running.remove(victim)
    if s.pool.release(victim.slot, keep_cached=True):
        b.removes.append(KVRemove(victim.slot))
    s._lost[victim.request_id] = victim.num_computed_tokens
    victim.slot = None
    victim.num_computed_tokens = 0
    victim.num_preemptions += 1
    victim.status = WAITING
    s.stats.num_preemptions += 1
    insort(s.waiting, victim, key=lambda r: r.arrival_s)
    b.preempted = True


def _make_room(s: Scheduler, r: Request, need: int, b: _Builder) -> bool:
    """Evict cached slots, then preempt, until need blocks are free; False if r itself was preempted."""
    pool = s.pool
    while pool.num_free_blocks < need:
        if pool.num_evictable:
            b.removes.append(KVRemove(pool.evict_one()))
            s.stats.num_evictions += 1
            continue
        victim = _victim(s)
        if victim.padding:  # a padded request is already done: end it instead of recomputing it
            b.drop(victim.request_id)
            s._pending_outputs.append(s._finish(victim, victim.finish_reason, s._now_s))
            continue
        _preempt(s, victim, b)
        if victim is r:
            return False
    return True


def _schedule_running(s: Scheduler, b: _Builder) -> None:
    """One chunk per running request: decodes on a fast path, the rest through _schedule_other."""
    pool = s.pool
    use_budget = s.policy.uses_token_budget
    slot_blocks = pool.slot_blocks
    bs = pool.block_size
    append = b.chunks.append
    budget, decode, context = b.budget, b.decode, b.context  # locals on the hot path, synced around the rest
    for r in list(s.running):  # a copy: preemption removes requests from s.running mid-loop
        if r.status is not RUNNING:
            continue
        start = r.num_computed_tokens
        out = r.output_token_ids
        num_prompt = len(r.prompt_token_ids)
        slot = r.slot
        room = len(slot_blocks[slot]) * bs - start  # reserved positions ahead
        # a decode (one generated token fed back) that fits, or that one free block makes fit: b.add, inlined
        if (num_prompt + len(out) - start == 1 and start >= num_prompt and not r.padding
                and (budget > 0 or not use_budget) and (room > 0 or (room == 0 and pool.reserve_free_block(slot)))):
            append(new_chunk(r.request_id, slot, start, (out[-1],), True, 0, True, r.sampling))
            budget -= 1
            decode += 1
            context += start + 1
            continue
        b.budget, b.decode, b.context = budget, decode, context
        _schedule_other(s, b, r)
        budget, decode, context = b.budget, b.decode, b.context
    b.budget, b.decode, b.context = budget, decode, context


def _schedule_other(s: Scheduler, b: _Builder, r: Request) -> None:
    """A running request's chunk when it is not a plain decode: padding, a prefill chunk, or KV is short."""
    if r.padding:
        b.add(r, r.num_computed_tokens, 0, pad=1)
        return
    pool = s.pool
    policy = s.policy
    start = r.num_computed_tokens
    n = r.num_tokens - start
    if n > 1 and policy.chunked_prefill:
        n = min(n, s.config.max_prefill_chunk_tokens or s.config.max_num_batched_tokens)
    if policy.uses_token_budget and n > b.budget:
        if not policy.chunked_prefill or b.budget <= 0:
            return
        n = b.budget
    need = pool.blocks_for(start + n) - len(pool.slot_blocks[r.slot])
    if need > 0 and not _make_room(s, r, need, b):
        return
    pool.reserve(r.slot, start + n)
    b.add(r, start, n)


def _prefix_hashes(s: Scheduler, r: Request) -> list[int]:
    """The chained hashes of r's full blocks, cached until its token count changes (commit reuses them)."""
    cached = s._hashes.get(r.request_id)
    if cached is not None and cached[0] == r.num_tokens:
        return cached[1]
    tokens = r.token_at(0, r.num_tokens)
    hashes = s.pool.chain_hashes(tokens, (r.num_tokens - 1) // s.pool.block_size)
    s._hashes[r.request_id] = (r.num_tokens, hashes)
    return hashes


def _selection(s: Scheduler, now_s: float, limit: int) -> list[Request]:
    """The policy's picks, checked before any admission, so that a bad selection changes nothing."""
    policy = s.policy
    selected = list(policy.select(s, now_s, limit))[:limit]  # every admission pass admits one or stops
    seen: set[str] = set()
    for r in selected:
        if r.status is not WAITING or s.requests.get(r.request_id) is not r:
            raise ValueError(f"policy {policy.name!r} selected request {r.request_id!r}, which is not waiting")
        if r.request_id in seen:
            raise ValueError(f"policy {policy.name!r} selected request {r.request_id!r} twice in one step")
        seen.add(r.request_id)
    return selected


def _admit(s: Scheduler, b: _Builder, now_s: float) -> list[int]:
    """Admit waiting requests in the policy's order while slots, budget and KV allow."""
    pool = s.pool
    policy = s.policy
    c = s.config
    limit = policy.max_num_seqs(s) - len(s.running)
    use_budget = policy.uses_token_budget
    if limit <= 0 or not s.waiting or (use_budget and b.budget <= 0):
        return []
    cap = c.max_prefill_chunk_tokens or c.max_num_batched_tokens
    admitted: list[int] = []
    for r in _selection(s, now_s, limit):
        if len(admitted) >= limit or (use_budget and b.budget <= 0) or not pool.has_slot():
            break
        near = [o.slot for o in s.running] if c.slot_choice != "any" else ()
        depth, src = pool.match_prefix(_prefix_hashes(s, r), near) if c.enable_prefix_caching else (0, None)
        m = depth * c.block_size
        n = r.num_tokens - m
        if policy.chunked_prefill:  # without a token budget a chunk is capped per request only
            n = min(n, cap, b.budget) if use_budget else min(n, cap)
        alone = False
        if not policy.chunked_prefill and use_budget and n > b.budget and b.chunks:
            if admitted or n <= c.max_num_batched_tokens:
                break  # a whole prompt that does not fit waits for the next step (head of line)
            alone = True  # longer than any step's budget: it runs in a step of its own, the decodes pause
        reuse = src is not None and pool.slot_state[src] == CACHED
        pinned = sum(1 for blk in pool.slot_blocks[src][:depth] if pool.running_holders[blk] == 0) if reuse else 0
        need = pool.blocks_for(m + n) - depth
        if not pool.can_reserve(need + pinned):
            break  # nothing changed: the request keeps its place
        if alone:
            for chunk in list(b.chunks):
                b.drop(chunk.request_id)
        if reuse:
            held = pool.slot_tokens[src]
            pool.reuse_cached(src, depth)
            slot = src
            if held > m:
                b.removes.append(KVRemove(slot, m))
        else:
            slot, evicted = pool.acquire_slot(near)
            if evicted is not None:
                b.removes.append(KVRemove(evicted))
                s.stats.num_evictions += 1
            if depth:
                pool.copy_prefix(src, slot, depth)
                b.copies.append(KVCopy(src, slot, m))
                b.copied += m
        while pool.num_free_blocks < need:
            b.removes.append(KVRemove(pool.evict_one()))
            s.stats.num_evictions += 1
        pool.reserve(slot, m + n)
        s.waiting.remove(r)
        s.running.append(r)
        r.status = RUNNING
        r.slot = slot
        r.num_computed_tokens = m  # the prefix arrives by copy (or stays in place) before the batch runs
        if r.first_scheduled_s is None:  # a prefix hit is counted once: prompt tokens cached at first admission
            r.first_scheduled_s = now_s
            r.num_cached_tokens = min(m, r.num_prompt_tokens)
            s.stats.num_prompt_tokens += r.num_prompt_tokens
            s.stats.num_prefix_hit_tokens += r.num_cached_tokens
        lost = s._lost.pop(r.request_id, 0)
        if lost:
            recomputed = max(0, lost - m)
            r.num_recomputed_tokens += recomputed
            s.stats.num_recomputed_tokens += recomputed
        admitted.append(len(b.chunks))
        b.add(r, m, n)
    return admitted


def _pad_prompts(s: Scheduler, b: _Builder, admitted: list[int]) -> None:
    """Padded static batching: every admitted prompt is padded to the batch's longest."""
    longest = max(s.requests[b.chunks[i].request_id].num_tokens for i in admitted)
    for i in admitted:
        c = b.chunks[i]
        pad = longest - s.requests[c.request_id].num_tokens
        if pad:
            b.chunks[i] = replace(c, num_pad_tokens=c.num_pad_tokens + pad)
            b.pad += pad


def _compact(s: Scheduler, b: _Builder) -> None:
    """slot_choice "compact": move running requests into the gaps between running slots.

    Runs last, when the batch is known: a moved request's chunk is rewritten to its new slot, and its
    KVCopy(move=True) comes after every other copy (one that fills its old slot, or reads from it, runs
    first), so the backend moves exactly the KV the chunk continues from.
    """
    pool = s.pool
    moves = pool.compaction_moves([r.slot for r in s.running])
    if not moves:
        return
    by_slot = {r.slot: r for r in s.running}
    new_slot = {}
    for src, dst in moves:
        r = by_slot[src]
        n = pool.slot_tokens[src]
        if pool.move(src, dst) is not None:
            s.stats.num_evictions += 1
            if not n:
                b.removes.append(KVRemove(dst))
        if n:
            b.copies.append(KVCopy(src, dst, n, move=True))
            b.copied += n
        r.slot = dst
        new_slot[r.request_id] = dst
    s.stats.num_slot_moves += len(moves)
    b.chunks = [replace(c, slot=new_slot[c.request_id]) if c.request_id in new_slot else c for c in b.chunks]


def build_plan(s: Scheduler, now_s: float) -> StepPlan:
    """Plan one step for scheduler s.

    The policy's code (max_num_seqs, select, wake_at_s) runs before any admission or slot move; if it
    raises, the KV removals and finished ids taken for this plan go back to the scheduler, so the next
    plan hands them to the backend and the pool and the backend stay in agreement.
    """
    s._now_s = now_s
    removes, s._pending_removes = s._pending_removes, []
    finished, s._pending_finished = s._pending_finished, []
    b = _Builder(removes, s.config.max_num_batched_tokens)
    try:
        _schedule_running(s, b)
        if not b.preempted:
            admitted = _admit(s, b, now_s)
            if admitted and s.policy.padding:
                _pad_prompts(s, b, admitted)
        wake = s.policy.wake_at_s(s, now_s) if not b.chunks and s.waiting else None
    except BaseException:
        s._pending_removes = b.removes + s._pending_removes
        s._pending_finished = finished + s._pending_finished
        raise
    if s.config.slot_choice == "compact":
        _compact(s, b)
    finished.extend(s._pending_finished)  # requests finished while planning (padding victims)
    s._pending_finished = []
    b.removes.extend(s._pending_removes)  # their slots too: removals run before this batch
    s._pending_removes = []
    s._step_id += 1
    return StepPlan(s._step_id, now_s, tuple(b.chunks), tuple(b.removes), tuple(b.copies), b.prefill, b.decode,
                    b.context, b.sum_sq, b.pad, b.copied, wake, tuple(finished))


class Planner:
    """Plans the steps of the scheduler that owns it (``Scheduler.planner``)."""

    __slots__ = ("_s",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    def build(self, now_s: float) -> StepPlan:
        """The next StepPlan at now_s (see build_plan)."""
        return build_plan(self._s, now_s)
