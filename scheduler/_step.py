"""How one step is planned: running requests first, then admissions (vLLM v1 order)."""

from __future__ import annotations

from bisect import insort
from dataclasses import replace
from typing import TYPE_CHECKING

from .kv import CACHED
from .messages import KVCopy, KVRemove, RequestOutput, ScheduledChunk, StepPlan, new_chunk
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
        chunk = new_chunk(r.request_id, r.slot, start, r.chunk_tokens(start, end) if n else (),
                          n > 0 and end == num_tokens, pad, is_decode, r.sampling)
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


class Planner:
    """Plans the steps of the scheduler that owns it (``Scheduler.planner``), and holds what planning carries
    from step to step: KV removals and finished ids to announce, finishes decided while planning, each
    waiting request's prompt block hashes and the tokens a preemption threw away."""

    __slots__ = ("_s", "removes", "finished", "outputs", "hashes", "lost", "step_id", "now_s")

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler
        self.removes: list[KVRemove] = []  # for the next plan
        self.finished: list[str] = []  # finished since the last plan: the next plan announces them
        self.outputs: list[RequestOutput] = []  # finishes decided while planning, delivered by the next commit
        self.hashes: dict[str, tuple[int, list[int]]] = {}  # request -> (num_tokens, its chain_hashes)
        self.lost: dict[str, int] = {}  # request -> computed tokens thrown away by preemption
        self.step_id = 0
        self.now_s = 0.0

    # ---- what the scheduler hands over between plans ----------------------------------------
    def remove_slot(self, slot: int) -> None:
        """The next plan drops slot's KV (a finish without caching, an eviction)."""
        self.removes.append(KVRemove(slot))

    def announce(self, request_id: str) -> None:
        """The next plan tells the backend that request_id finished."""
        self.finished.append(request_id)

    def forget(self, request_id: str) -> None:
        """A finished request's planning state goes."""
        self.hashes.pop(request_id, None)
        self.lost.pop(request_id, None)

    def has_pending_kv_ops(self) -> bool:
        """True if the next plan carries KV removals or finishes even with no request to run."""
        return bool(self.removes or self.finished)

    def take_outputs(self) -> list[RequestOutput]:
        """The finishes decided while planning, for the commit that follows."""
        outputs, self.outputs = self.outputs, []
        return outputs

    def take_finished(self) -> list[str]:
        """The finished ids pending for the next plan, taken now (skipped steps' plans announced them)."""
        finished, self.finished = self.finished, []
        return finished

    def skipped(self, steps: int) -> None:
        """Steps the fast-forward applied without a plan still count in the step ids."""
        self.step_id += steps

    # ---- planning -------------------------------------------------------------------------------
    def _victim(self) -> Request:
        """The running request to preempt, by the configured rule."""
        s = self._s
        rule = s.config.preemption_victim
        running = s.running
        if rule == "newest":
            return max(running, key=lambda r: (r.arrival_s, r.request_id))
        if rule == "lowest_priority":
            return max(running, key=lambda r: (r.priority, r.arrival_s, r.request_id))
        return min(running, key=lambda r: (r.num_computed_tokens, -r.arrival_s))

    def _preempt(self, victim: Request, b: _Builder) -> None:
        """Recompute preemption: the victim's KV becomes cache, the request waits again."""
        s = self._s
        b.drop(victim.request_id)
        s.running.remove(victim)
        if s.pool.release(victim.slot, keep_cached=True):
            b.removes.append(KVRemove(victim.slot))
        self.lost[victim.request_id] = victim.num_computed_tokens
        victim.slot = None
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = WAITING
        s.stats.num_preemptions += 1
        insort(s.waiting, victim, key=lambda r: r.arrival_s)
        b.preempted = True

    def _make_room(self, r: Request, need: int, b: _Builder) -> bool:
        """Evict cached slots, then preempt, until need blocks are free; False if r itself was preempted."""
        s = self._s
        pool = s.pool
        while pool.num_free_blocks < need:
            if pool.num_evictable:
                b.removes.append(KVRemove(pool.evict_one()))
                s.stats.num_evictions += 1
                continue
            victim = self._victim()
            if victim.padding:  # a padded request is already done: end it instead of recomputing it
                b.drop(victim.request_id)
                self.outputs.append(s._finish(victim, victim.finish_reason, self.now_s))
                continue
            self._preempt(victim, b)
            if victim is r:
                return False
        return True

    def _schedule_running(self, b: _Builder) -> None:
        """One chunk per running request: decodes on a fast path, the rest through _schedule_other."""
        s = self._s
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
            self._schedule_other(b, r)
            budget, decode, context = b.budget, b.decode, b.context
        b.budget, b.decode, b.context = budget, decode, context

    def _schedule_other(self, b: _Builder, r: Request) -> None:
        """A running request's chunk when it is not a plain decode: padding, a prefill chunk, or KV is short."""
        s = self._s
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
        if need > 0 and not self._make_room(r, need, b):
            return
        pool.reserve(r.slot, start + n)
        b.add(r, start, n)

    def _prefix_hashes(self, r: Request) -> list[int]:
        """The chained hashes of r's full blocks, cached until its token count changes (commit reuses them)."""
        s = self._s
        cached = self.hashes.get(r.request_id)
        if cached is not None and cached[0] == r.num_tokens:
            return cached[1]
        # the prompt as given while it is all there is: it may know its hashes (see KVPool.chain_hashes)
        tokens = r.token_at(0, r.num_tokens) if r.output_token_ids else r.prompt_token_ids
        hashes = s.pool.chain_hashes(tokens, (r.num_tokens - 1) // s.pool.block_size)
        self.hashes[r.request_id] = (r.num_tokens, hashes)
        return hashes

    def _selection(self, now_s: float, limit: int) -> list[Request]:
        """The policy's picks, checked before any admission, so that a bad selection changes nothing."""
        s = self._s
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

    def _admit(self, b: _Builder, now_s: float) -> list[int]:
        """Admit waiting requests in the policy's order while slots, budget and KV allow."""
        s = self._s
        pool = s.pool
        policy = s.policy
        c = s.config
        limit = policy.max_num_seqs(s) - len(s.running)
        use_budget = policy.uses_token_budget
        if limit <= 0 or not s.waiting or (use_budget and b.budget <= 0):
            return []
        cap = c.max_prefill_chunk_tokens or c.max_num_batched_tokens
        admitted: list[int] = []
        for r in self._selection(now_s, limit):
            if len(admitted) >= limit or (use_budget and b.budget <= 0) or not pool.has_slot():
                break
            near = [o.slot for o in s.running] if c.slot_choice != "any" else ()
            depth, src = pool.match_prefix(self._prefix_hashes(r), near) if c.enable_prefix_caching else (0, None)
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
            lost = self.lost.pop(r.request_id, 0)
            if lost:
                recomputed = max(0, lost - m)
                r.num_recomputed_tokens += recomputed
                s.stats.num_recomputed_tokens += recomputed
            admitted.append(len(b.chunks))
            b.add(r, m, n)
        return admitted

    def _pad_prompts(self, b: _Builder, admitted: list[int]) -> None:
        """Padded static batching: every admitted prompt is padded to the batch's longest."""
        s = self._s
        longest = max(s.requests[b.chunks[i].request_id].num_tokens for i in admitted)
        for i in admitted:
            c = b.chunks[i]
            pad = longest - s.requests[c.request_id].num_tokens
            if pad:
                b.chunks[i] = replace(c, num_pad_tokens=c.num_pad_tokens + pad)
                b.pad += pad

    def _compact(self, b: _Builder) -> None:
        """slot_choice "compact": move running requests into the gaps between running slots.

        Runs last, when the batch is known: a moved request's chunk is rewritten to its new slot, and its
        KVCopy(move=True) comes after every other copy (one that fills its old slot, or reads from it, runs
        first), so the backend moves exactly the KV the chunk continues from.
        """
        s = self._s
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

    def build(self, now_s: float) -> StepPlan:
        """Plan the scheduler's next step.

        The policy's code (max_num_seqs, select, wake_at_s) runs before any admission or slot move; if it
        raises, the KV removals and finished ids taken for this plan go back to the scheduler, so the next
        plan hands them to the backend and the pool and the backend stay in agreement.
        """
        s = self._s
        self.now_s = now_s
        removes, self.removes = self.removes, []
        finished, self.finished = self.finished, []
        b = _Builder(removes, s.config.max_num_batched_tokens)
        try:
            self._schedule_running(b)
            if not b.preempted:
                admitted = self._admit(b, now_s)
                if admitted and s.policy.padding:
                    self._pad_prompts(b, admitted)
            wake = s.policy.wake_at_s(s, now_s) if not b.chunks and s.waiting else None
        except BaseException:
            self.removes = b.removes + self.removes
            self.finished = finished + self.finished
            raise
        if s.config.slot_choice == "compact":
            self._compact(b)
        finished.extend(self.finished)  # requests finished while planning (padding victims)
        self.finished = []
        b.removes.extend(self.removes)  # their slots too: removals run before this batch
        self.removes = []
        self.step_id += 1
        return StepPlan(self.step_id, now_s, tuple(b.chunks), tuple(b.removes), tuple(b.copies), b.prefill, b.decode,
                        b.context, b.sum_sq, b.pad, b.copied, wake, tuple(finished))
