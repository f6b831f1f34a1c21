"""The token-step scheduler: schedule(now_s) -> StepPlan, commit(plan, result, now_s) -> outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._fastforward import FastForward
from ._step import Planner
from .config import SchedulerConfig
from .kv import KVPool
from .messages import RequestOutput, StepPlan, StepResult, new_output
from .policies import Policy, make_policy
from .request import FinishReason, Request, RequestStatus

WAITING, RUNNING, FINISHED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.FINISHED


@dataclass(slots=True)
class SchedulerStats:
    """Counters over a scheduler's life."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    num_prefix_hit_tokens: int = 0  # of those, served from the prefix cache at first admission
    num_evictions: int = 0
    num_slot_moves: int = 0  # running requests moved to close a gap (slot_choice "compact")


class Scheduler:
    """Admits and retires requests at every step, within token, slot and KV limits.

    Read-only attributes a policy may use: ``config``, ``waiting`` (arrival order),
    ``running`` (admission order), ``requests``, ``pool`` and ``stats``. ``fast_forward``
    (a FastForward) lets a driver whose backend knows its tokens skip pure-decode stretches.
    """

    def __init__(self, config: SchedulerConfig | None = None, policy: str | Policy | Callable[..., Any] = "continuous",
                 **policy_params: Any) -> None:
        self.config = config or SchedulerConfig()
        self.policy = make_policy(policy, **policy_params)
        c = self.config
        self.pool = KVPool(c.num_kv_blocks, c.block_size, c.max_num_seqs, c.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._eos = frozenset(c.eos_token_ids)
        self._pending_aborts: list[tuple[str, FinishReason, str | None]] = []  # applied at commit
        self._in_flight: StepPlan | None = None
        self._max_len = min(c.max_model_len, c.kv_capacity_tokens)
        self.planner = Planner(self)  # plans each step (scheduler._step)
        self.fast_forward = FastForward(self)  # skips pure-decode stretches for drivers that know the tokens

    # ---- queries ---------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    def has_pending_kv_ops(self) -> bool:
        """True if the next plan carries KV removals even with no request to run."""
        return self.planner.has_pending_kv_ops()

    # ---- requests in and out -------------------------------------------------------
    def add_request(self, request: Request, now_s: float | None = None) -> RequestOutput | None:
        """Queue a request; return a finished output right away if it can never run."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}: request ids must be unique")
        if request.status is not WAITING or request.output_token_ids or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} was already scheduled; submit a fresh Request")
        self.requests[request.request_id] = request
        reason = self._reject_reason(request)
        if reason is not None:
            return self._finish(request, FinishReason.REJECTED, now_s if now_s is not None else request.arrival_s,
                                detail=reason, release=False)
        self.waiting.append(request)
        if len(self.waiting) > 1 and request.arrival_s < self.waiting[-2].arrival_s:
            self.waiting.sort(key=lambda r: r.arrival_s)
        return None

    def _reject_reason(self, r: Request) -> str | None:
        n = r.num_prompt_tokens
        if n == 0:
            return "empty prompt: a request needs at least one prompt token"
        if r.max_tokens < 1:
            return f"max_tokens={r.max_tokens}: a request must ask for at least one token"
        if n + r.max_tokens > self._max_len:
            limit = "max_model_len" if self.config.max_model_len <= self.config.kv_capacity_tokens else "KV capacity"
            return (f"prompt ({n} tokens) + max_tokens ({r.max_tokens}) = {n + r.max_tokens} exceeds "
                    f"{limit} ({self._max_len} tokens); shorten the prompt or lower max_tokens")
        return None

    def abort(self, request_id: str, now_s: float, reason: FinishReason = FinishReason.ABORT,
              detail: str | None = None) -> RequestOutput | None:
        """End a request at any time; its slot and blocks return through the next plan.

        Between schedule() and commit() the abort is applied at commit. Returns the
        finish event, or None if the request had already finished (or is deferred).
        """
        r = self.requests.get(request_id)
        if r is None:
            raise ValueError(f"unknown request_id {request_id!r}")
        if r.status is FINISHED:
            return None
        if self._in_flight is not None:
            self._pending_aborts.append((request_id, reason, detail))
            return None
        return self._finish(r, reason, now_s, detail=detail)

    def release_cache(self) -> None:
        """Evict every cached slot in the next plan (so the KV ends empty)."""
        while (slot := self.pool.evict_one()) is not None:
            self.planner.remove_slot(slot)
            self.stats.num_evictions += 1

    def _finish(self, r: Request, reason: FinishReason, now_s: float, detail: str | None = None,
                release: bool = True) -> RequestOutput:
        if r.status is WAITING and release:
            self.waiting.remove(r)
        elif r.status is RUNNING:
            self.running.remove(r)
            if r.slot is not None:
                keep = reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT)
                if self.pool.release(r.slot, keep_cached=keep):
                    self.planner.remove_slot(r.slot)
                r.slot = None
            self.planner.announce(r.request_id)
        r.status = FINISHED
        r.finish_reason = reason
        r.finish_detail = detail
        r.finish_s = now_s
        r.padding = False
        self.planner.forget(r.request_id)
        return RequestOutput(r.request_id, (), True, reason.value, detail)

    # ---- the step ------------------------------------------------------------------
    def schedule(self, now_s: float) -> StepPlan:
        """Plan one step: KV removals and copies, then one batch of chunks."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called twice without commit(); commit the previous plan first")
        plan = self.planner.build(now_s)
        if not plan.is_empty:
            self._in_flight = plan
        return plan

    def commit(self, plan: StepPlan, result: StepResult, now_s: float) -> list[RequestOutput]:
        """Apply a step's results: advance computed tokens, append samples, retire finished requests."""
        if plan.is_empty and self._in_flight is None:
            return []  # nothing ran; committing an empty plan is a no-op
        if plan is not self._in_flight:
            raise ValueError("commit() got a plan that is not the one in flight")
        self._in_flight = None
        self.stats.num_steps += 1
        outputs = self.planner.take_outputs()
        sampled = result.sampled_token_ids
        failed = result.failed
        requests = self.requests
        pool = self.pool
        slot_tokens = pool.slot_tokens
        slot_hashes = pool.slot_hashes
        caching = pool.enable_prefix_caching
        bs = pool.block_size
        eos = self._eos
        append = outputs.append
        padded_finish = False
        for chunk in plan.chunks:
            request_id = chunk.request_id
            r = requests[request_id]
            slot = r.slot
            if r.status is not RUNNING or slot != chunk.slot:
                continue
            if failed and request_id in failed:
                append(self._finish(r, FinishReason.ERROR, now_s, detail=failed[request_id]))
                continue
            if r.padding or not chunk.token_ids:
                continue
            end = chunk.start_pos + len(chunk.token_ids)
            r.num_computed_tokens = end
            if caching and end >= (len(slot_hashes[slot]) + 1) * bs:  # a block filled up: index its hash
                known = self.planner.hashes.get(request_id)  # the prompt's block hashes, from admission
                pool.computed(slot, end, r.token_at, known[1] if known and known[0] == r.num_tokens else ())
            else:
                slot_tokens[slot] = end  # pool.computed's whole effect otherwise
            if not chunk.sample:
                continue
            token = sampled.get(request_id)
            if token is None:
                append(self._finish(r, FinishReason.ERROR, now_s,
                                    detail="backend returned no token for a sampling chunk"))
                continue
            out = r.output_token_ids
            out.append(token)
            if r.first_token_s is None:
                r.first_token_s = now_s
            sp = r.sampling  # the stop rules, inlined: this runs once per request per step
            if (token in eos and not sp.ignore_eos) or token in sp.stop_token_ids:
                reason = FinishReason.STOP
            elif len(out) >= sp.max_tokens:
                reason = FinishReason.LENGTH
            else:
                append(new_output(request_id, (token,)))
                continue
            if self.policy.padding and any(not o.padding and o is not r for o in self.running):
                r.padding = True  # keeps its slot until the batch's longest request ends
                r.finish_reason = reason
                append(new_output(request_id, (token,)))
            else:
                padded_finish = True
                fin = self._finish(r, reason, now_s)
                append(new_output(request_id, (token,), True, fin.finish_reason))
        if padded_finish or (self.policy.padding and self.running and all(o.padding for o in self.running)):
            for o in [o for o in self.running if o.padding]:
                outputs.append(self._finish(o, o.finish_reason or FinishReason.LENGTH, now_s))
        for request_id, reason, detail in self._pending_aborts:
            out = self.abort(request_id, now_s, reason, detail)
            if out is not None:
                outputs.append(out)
        self._pending_aborts.clear()
        return outputs
