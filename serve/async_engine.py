"""The engine thread behind the HTTP server, and its bridge to asyncio.

One thread steps the EngineCore (schedule -> step -> commit); the event loop owns the HTTP side. Requests
and aborts cross into the engine through one queue, read between steps. Text pieces and finishes cross back
once per step: the step's events are gathered in a list and handed to the loop with a single
loop.call_soon_threadsafe, which puts each on its HTTP request's asyncio.Queue. So a step costs one thread
hop whatever the batch size, and the engine never waits on a client.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from scheduler import SamplingParams
from serve.engine import Completion, EngineCore, EngineLoop
from serve.metrics import ServerMetrics
from serve.protocol import ProtocolError

SHUTDOWN_DETAIL = "server shutting down"


class ChoiceSink:
    """One request's events: gathered on the engine thread, delivered to an asyncio.Queue on the loop."""

    __slots__ = ("engine", "queue", "index", "request_id", "arrival_s", "tracked", "num_logprobs_sent",
                 "first_token_s", "last_token_s", "num_cached_tokens")

    def __init__(self, engine: AsyncEngine, q: asyncio.Queue, index: int, request_id: str, arrival_s: float) -> None:
        self.engine, self.queue, self.index, self.request_id, self.arrival_s = engine, q, index, request_id, arrival_s
        self.tracked: Any = None
        self.num_logprobs_sent = 0
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache, at first token

    def bind(self, tracked: Any) -> None:
        """EngineCore.add hands over the request's text state (for its logprobs)."""
        self.tracked = tracked

    def __call__(self, item: str | Completion) -> None:
        """Engine thread: a text piece or the finished request; kept until the end of the step."""
        lps = None
        t = self.tracked
        if t is not None and t.logprobs is not None and len(t.logprobs) > self.num_logprobs_sent:
            ids, have = t.request.output_token_ids, len(t.logprobs)
            lps = [(ids[j] if j < len(ids) else -1, *t.logprobs[j]) for j in range(self.num_logprobs_sent, have)]
            self.num_logprobs_sent = have
        self.engine._pending.append((self, item, lps))
        if isinstance(item, Completion):
            self.engine._finished.append((self, item))


class AsyncEngine(EngineLoop):
    """Runs an EngineCore in its own thread (EngineLoop); submit() and abort() are called from the event loop."""

    def __init__(self, core: EngineCore, metrics: ServerMetrics, loop: asyncio.AbstractEventLoop,
                 max_queue: int | None = None) -> None:
        super().__init__(core)
        self.metrics, self.loop, self.max_queue = metrics, loop, max_queue
        self._pending: list[tuple[ChoiceSink, Any, Any]] = []  # engine thread: this step's events
        self._finished: list[tuple[ChoiceSink, Completion]] = []  # engine thread: finishes to account
        self._sinks: dict[str, ChoiceSink] = {}  # engine thread: live requests
        # engine thread: choices 1..n-1 of an n > 1 request, held until choice 0's prompt is computed so that
        # they find it in the prefix cache: first request id -> (prompt, priority, [(sink, sampling), ...])
        self._deferred: dict[str, tuple[tuple[int, ...], int, list[tuple[ChoiceSink, SamplingParams]]]] = {}
        self.num_in_flight = 0  # event loop: accepted requests not yet finished
        self.num_running = 0  # engine thread writes after each step; the loop reads it for the queue bound
        self.accepting = True
        self.error: str | None = None
        self._num_preemptions = 0
        self._counter = 0
        self.start()

    # ---- event loop side ----------------------------------------------------------------
    def submit(self, prompt_token_ids: Sequence[int], samplings: Sequence[SamplingParams], priority: int = 0,
               request_id: str | None = None) -> tuple[asyncio.Queue, list[ChoiceSink]]:
        """Queue one request per sampling (n choices); their events arrive on the returned queue."""
        if self.error is not None:
            raise ProtocolError(f"the engine stopped after an internal error: {self.error}", 500, "server_error")
        if not self.accepting:
            raise ProtocolError("the server is shutting down and accepts no new requests", 503,
                                "service_unavailable")
        n = len(samplings)
        if self.max_queue is not None and max(0, self.num_in_flight - self.num_running) + n > self.max_queue:
            self.metrics.num_requests_rejected.inc()
            raise ProtocolError(f"the waiting queue is full ({self.max_queue} requests, --max-queue); retry later",
                                429, "rate_limit_error")
        self._counter += 1
        base = request_id or f"req-{self._counter}"
        q: asyncio.Queue = asyncio.Queue()
        arrival = self.core.now()
        sinks = [ChoiceSink(self, q, i, base if n == 1 else f"{base}-{i}", arrival) for i in range(n)]
        self.num_in_flight += n
        self.post(("add", tuple(prompt_token_ids), tuple(samplings), priority, sinks))
        return q, sinks

    def abort(self, request_ids: Sequence[str], detail: str | None = None) -> None:
        """Abort requests (a client went away); applied before the next step."""
        self.post(("abort", tuple(request_ids), detail))

    def abort_all(self, detail: str) -> None:
        """Abort every live request with a stated reason (shutdown past its grace period)."""
        self.post(("abort_all", detail))

    def close(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, stop the engine thread and wait for it."""
        self.accepting = False
        self.stop(timeout_s)

    def _dispatch(self, batch: list[tuple[ChoiceSink, Any, Any]]) -> None:
        """Event loop: hand a step's events to their requests' queues."""
        for sink, item, lps in batch:
            sink.queue.put_nowait((sink.index, item, lps))
            if isinstance(item, Completion):
                self.num_in_flight -= 1

    # ---- engine thread (EngineLoop's hooks) ------------------------------------------------
    def after_step(self, finished: list[Completion]) -> None:
        """Metrics and first tokens of the step just run."""
        self._observe()

    def after_round(self) -> None:
        """Account finished requests and hand the round's events to the event loop."""
        self._account_finished()
        self._flush()

    def on_error(self, exc: Exception) -> None:
        """A bug or a backend failure: fail every request with the reason; the loop has stopped."""
        self.error = f"{type(exc).__name__}: {exc}"
        print(f"tokenstep serve: engine error: {self.error}", file=sys.stderr)
        traceback.print_exception(exc)
        self._fail_all(f"engine error: {self.error}")

    def on_exit(self) -> None:
        """Shutdown drain: what is still live ends with the shutdown reason, and every event goes out."""
        self._abort_live(SHUTDOWN_DETAIL)
        self._account_finished()
        self._flush()

    def apply_op(self, op: tuple) -> None:
        """Run an add, an abort or an abort of everything."""
        core = self.core
        kind = op[0]
        if kind == "add":
            _, tokens, samplings, priority, sinks = op
            choices = list(zip(sinks, samplings, strict=True))
            cfg = core.scheduler.config
            if len(choices) > 1 and cfg.enable_prefix_caching and len(tokens) > cfg.block_size:
                self._deferred[sinks[0].request_id] = (tokens, priority, choices[1:])
                choices = choices[:1]
            self._add(tokens, priority, choices)
        elif kind == "abort":
            for rid in op[1]:
                self._cancel_deferred(rid, op[2])
                core.abort(rid, op[2])
        elif kind == "abort_all":
            self._abort_live(op[1])
        else:
            super().apply_op(op)

    def _add(self, tokens: tuple[int, ...], priority: int, choices: list[tuple[ChoiceSink, SamplingParams]]) -> None:
        for sink, sp in choices:
            self._sinks[sink.request_id] = sink
            self.core.add(tokens, sp, sink.request_id, priority, sink=sink, arrival_s=sink.arrival_s)

    def _release_deferred(self, request_id: str) -> None:
        """Choice 0's prompt is in the cache (or it ended): add the other choices."""
        entry = self._deferred.pop(request_id, None)
        if entry is not None:
            self._add(*entry)

    def _cancel_deferred(self, request_id: str, detail: str | None) -> None:
        """Choice 0 was aborted before the others were added: they end with the same reason."""
        entry = self._deferred.pop(request_id, None)
        if entry is None:
            return
        tokens, _, choices = entry
        now = self.core.now()
        for sink, _sp in choices:
            sink(Completion(sink.request_id, "", (), "abort", len(tokens), 0, sink.arrival_s, None, now, 0, detail))

    def _abort_live(self, detail: str) -> None:
        for rid in list(self._deferred):
            self._cancel_deferred(rid, detail)
        for rid in list(self._sinks):
            self.core.abort(rid, detail)

    def _fail_all(self, detail: str) -> None:
        """After an engine error: every live request ends with the error (the scheduler is not trusted)."""
        for rid in list(self._deferred):
            self._cancel_deferred(rid, detail)
        for rid, sink in list(self._sinks.items()):
            t = sink.tracked
            r = t.request if t is not None else None
            comp = Completion(rid, "".join(t.text) if t is not None else "", tuple(r.output_token_ids) if r else (),
                              "error", r.num_prompt_tokens if r else 0, r.num_output_tokens if r else 0,
                              sink.arrival_s, sink.first_token_s, self.core.now(), 0, detail)
            sink(comp)

    def _observe(self) -> None:
        """Per-step metrics, first-token accounting (TTFT, prefix-cache hits) and inter-token latencies."""
        core, m = self.core, self.metrics
        ran = core.last_step
        sched = core.scheduler
        if ran.result is not None:
            plan, now = ran.plan, ran.now_s
            if plan.chunks:  # a step that only ran KV removals is not a batch
                m.step_time.observe(ran.result.elapsed_s)
                m.batch_size.observe(plan.num_seqs)
                m.batched_tokens.observe(plan.num_scheduled_tokens)
            sinks = self._sinks
            num_tokens = 0
            gaps: dict[float, int] = {}  # previous token time -> requests: a step's decodes share one gap
            for out in ran.outputs:
                k = len(out.new_token_ids)
                sink = sinks.get(out.request_id) if k else None
                if sink is None:
                    continue
                num_tokens += k
                last = sink.last_token_s
                if last is None:
                    self._first_token(sink, now)
                    if self._deferred:
                        self._release_deferred(out.request_id)
                else:
                    gaps[last] = gaps.get(last, 0) + 1
                sink.last_token_s = now
            for last, count in gaps.items():
                m.inter_token_latency.observe(now - last, count)
            if num_tokens:
                m.generation_tokens.inc(num_tokens)
        self.num_running = len(sched.running)
        m.num_requests_running.set(self.num_running)
        m.num_requests_waiting.set(len(sched.waiting))
        self._report_kv_usage()
        if sched.stats.num_preemptions != self._num_preemptions:
            m.num_preemptions.inc(sched.stats.num_preemptions - self._num_preemptions)
            self._num_preemptions = sched.stats.num_preemptions

    def _first_token(self, sink: ChoiceSink, now: float) -> None:
        m = self.metrics
        r = sink.tracked.request
        sink.first_token_s = now
        sink.num_cached_tokens = r.num_cached_tokens
        m.time_to_first_token.observe(now - sink.arrival_s)
        if r.first_scheduled_s is not None:
            m.request_queue_time.observe(max(0.0, r.first_scheduled_s - sink.arrival_s))
        m.prompt_tokens.inc(r.num_prompt_tokens)
        m.prefix_cache_queries.inc(r.num_prompt_tokens)
        m.prefix_cache_hits.inc(r.num_cached_tokens)

    def _account_finished(self) -> None:
        if not self._finished:
            return
        m = self.metrics
        for sink, comp in self._finished:
            self._sinks.pop(sink.request_id, None)
            if self._deferred:  # choice 0 ended before its first token (rejected, failed): the others still run
                self._release_deferred(sink.request_id)
            m.finished(comp.finish_reason)
            if comp.finish_reason in ("stop", "length"):
                m.e2e_request_latency.observe(comp.finish_s - sink.arrival_s)
        self._finished.clear()
        if not self.core.has_work():  # nothing will step again soon: report the idle state now
            m.num_requests_running.set(0)
            m.num_requests_waiting.set(0)
            self.num_running = 0
            self._report_kv_usage()

    def _report_kv_usage(self) -> None:
        """KV blocks held by live requests (cached blocks nobody uses count as free), as vLLM reports it."""
        pool = self.core.scheduler.pool
        self.metrics.kv_cache_usage_perc.set((pool.num_used_blocks - pool.num_evictable) / pool.num_blocks)

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self.loop.call_soon_threadsafe(self._dispatch, batch)
