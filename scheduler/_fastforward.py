"""Skipping ahead over steps in which nothing but decoding can happen.

Between two events (an arrival, a finish, an abort, a KV shortfall, an admission)
a continuous-batching engine repeats the same pure-decode step with every context
one token longer. A driver that knows the tokens in advance (a simulated backend
that never stops early) can apply K such steps at once through the scheduler's
``fast_forward`` (a FastForward): ``decode_horizon`` says
how many steps are certain to be pure decode up to the first finish,
``decode_run_horizon`` how many when finishes change nothing but the batch (no
request waits, finished KV stays cached and, with slot compaction, no finish
leaves a gap), and ``apply_decode_steps`` applies them;
``finish_decode_steps`` retires the requests that got their last token. The
result is the state K plain schedule/commit rounds would leave (tests prove it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .kv import one_run
from .messages import RequestOutput
from .request import FinishReason, Request

if TYPE_CHECKING:  # pragma: no cover
    from .core import Scheduler


def _decode_horizon(s: Scheduler) -> int:
    """Upcoming steps certain to be identical pure-decode steps, absent arrivals and aborts (0: none)."""
    running = s.running
    # finished ids still to announce are fine (they change no chunk and no cost); KV removals are not
    if not running or s._in_flight is not None or s.planner.removes or s._pending_aborts or s.planner.outputs:
        return 0
    policy = s.policy
    if policy.padding:
        return 0
    n = len(running)
    if s.config.slot_choice == "compact" and not one_run([r.slot for r in running]):
        return 0  # the next plan moves a request into the gap
    if s.waiting and n < policy.max_num_seqs(s):
        return 0  # the policy might admit a waiting request
    if policy.uses_token_budget and n > s.config.max_num_batched_tokens:
        return 0
    k = 1 << 62
    eos = s._eos
    for r in running:
        sp = r.sampling
        if sp.stop_token_ids or (eos and not sp.ignore_eos):
            return 0  # a sampled token could end it early
        out = len(r.output_token_ids)
        if out == 0 or r.num_computed_tokens != len(r.prompt_token_ids) + out - 1:
            return 0  # a prefill (chunk or recompute) is still pending
        left = sp.max_tokens - out
        if left < k:
            k = left  # up to and including the step where the first one finishes
    return _kv_capped(s, k)


def _new_blocks(s: Scheduler, steps: int) -> int:
    """Blocks the running requests need to run up to `steps` more decode steps, each to its max_tokens."""
    pool = s.pool
    bs = pool.block_size
    slot_blocks = pool.slot_blocks
    total = 0
    for r in s.running:
        left = r.sampling.max_tokens - len(r.output_token_ids)
        # positions num_computed + its steps must fit: ceil((num_computed + steps) / bs) blocks
        need = -(-(r.num_computed_tokens + (left if left < steps else steps)) // bs) - len(slot_blocks[r.slot])
        if need > 0:
            total += need
    return total


def _kv_capped(s: Scheduler, k: int) -> int:
    """The most steps, up to k, whose new blocks are all free (an eviction or preemption would change the plan)."""
    free = s.pool.num_free_blocks
    if _new_blocks(s, k) <= free:
        return k
    lo, hi = 0, k  # _new_blocks is monotone in the number of steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _new_blocks(s, mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _decode_run_horizon(s: Scheduler) -> int:
    """Steps a decode run may take across finishes (each request stops at its own max_tokens), or 0.

    Finishes may be skipped over only when nothing else changes at them: no request waits (none can
    be admitted into the freed slot) and finished KV stays cached (no KVRemove joins the next plan).
    The run is bounded by the last finish and by the free blocks: it may never need an eviction.
    Call after decode_horizon() > 0.
    """
    if s.waiting or not s.pool.enable_prefix_caching:
        return 0
    left = {r.slot: r.sampling.max_tokens - len(r.output_token_ids) for r in s.running}
    k = max(left.values())
    if s.config.slot_choice == "compact":  # up to the first finish that leaves a gap: the next plan moves
        for steps in sorted(set(left.values())):
            rest = [slot for slot, n in left.items() if n > steps]
            if not one_run(rest):
                k = steps
                break
    return _kv_capped(s, k)


def _apply_decode_steps(s: Scheduler, steps: int, take_tokens: Callable[[str, int], list[int]]
                       ) -> tuple[list[str], list[tuple[int, Request]], list[int]]:
    """Apply up to `steps` pure-decode steps at once; each request stops at its max_tokens.

    take_tokens(request_id, k) gives a request's next k tokens. Returns (announced, done, adds): the
    finished ids the next plan would have announced to the backend; (step, request) for each request
    that got its last token at that step (0-based), by step then batch order (not finished here: pass
    them to finish_decode_steps); and adds[j], the blocks newly reserved by step j.
    """
    announced = s.planner.take_finished()
    pool = s.pool
    bs = pool.block_size
    slot_blocks, slot_hashes, slot_tokens = pool.slot_blocks, pool.slot_hashes, pool.slot_tokens
    caching = pool.enable_prefix_caching
    done = []
    adds = [0] * steps
    for r in s.running:
        out = r.output_token_ids
        left = r.sampling.max_tokens - len(out)
        n = left if left < steps else steps
        out += take_tokens(r.request_id, n)
        if n == left:
            done.append((n - 1, r))
        computed = r.num_computed_tokens
        end = computed + n
        r.num_computed_tokens = end
        slot = r.slot
        capacity = len(slot_blocks[slot]) * bs
        if end > capacity:
            # step j computes position computed + j, so it needs a new block from j = capacity - computed on
            for j in range(max(capacity - computed, 0), n, bs):
                adds[j] += 1
        if end > capacity or (caching and end >= (len(slot_hashes[slot]) + 1) * bs):  # new block or a full one
            pool.decoded(slot, end, len(r.prompt_token_ids), out, r.token_at)
        else:
            slot_tokens[slot] = end  # pool.decoded's whole effect otherwise
    done.sort(key=lambda x: x[0])  # stable: batch order within a step
    s.stats.num_steps += steps
    s.planner.skipped(steps)
    return announced, done, adds


def _finish_decode_steps(s: Scheduler, done: list[Request], now_s: float) -> list[tuple[Request, RequestOutput]]:
    """Finish (length) requests that got their last token in a skipped step ending at now_s, in batch order."""
    return [(r, s._finish(r, FinishReason.LENGTH, now_s)) for r in done]


def _take_announced(s: Scheduler) -> list[str]:
    """Finished ids pending for the next plan, taken now: a skipped step's plan announced them."""
    return s.planner.take_finished()


class FastForward:
    """Skips pure-decode steps for the scheduler that owns it (``Scheduler.fast_forward``)."""

    __slots__ = ("_s",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    def decode_horizon(self) -> int:
        """Upcoming steps certain to be identical pure-decode steps, absent arrivals and aborts (0: none)."""
        return _decode_horizon(self._s)

    def decode_run_horizon(self) -> int:
        """Steps a decode run may take across finishes, or 0 (call after decode_horizon() > 0)."""
        return _decode_run_horizon(self._s)

    def apply_decode_steps(self, steps: int, take_tokens: Callable[[str, int], list[int]]
                           ) -> tuple[list[str], list[tuple[int, Request]], list[int]]:
        """Apply up to steps pure-decode steps at once: (announced ids, (step, request) done, blocks added by step)."""
        return _apply_decode_steps(self._s, steps, take_tokens)

    def finish_decode_steps(self, done: list[Request], now_s: float) -> list[tuple[Request, RequestOutput]]:
        """Finish (length) requests that got their last token in a skipped step ending at now_s."""
        return _finish_decode_steps(self._s, done, now_s)

    def take_announced(self) -> list[str]:
        """Finished ids pending for the next plan, taken now: a skipped step's plan announced them."""
        return _take_announced(self._s)
