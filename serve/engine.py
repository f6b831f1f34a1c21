"""Text in, text out on the real backend: an offline ``LLM.generate`` and a threaded online engine.

Both drive the same three calls as every other driver (schedule, step, commit);
this module adds tokenization, incremental detokenization, stop strings and
per-request timing. TTFT here is taken when the first token is *delivered*
(its text piece handed to the caller), the same instant it is computed except for
text held back by a pending stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler import FinishReason, Request, RequestOutput, SamplingParams, Scheduler
from scheduler.loop import run_step


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished request: its text, tokens, finish reason and timings (seconds)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_s: float
    first_token_s: float | None
    finish_s: float
    num_cached_tokens: int = 0
    detail: str | None = None
    # per output token (SamplingParams.logprobs set): (logprob, ((token_id, logprob), ...) most likely first)
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        """Arrival to finish."""
        return self.finish_s - self.arrival_s


class _Tracked:
    """Text state of one live request."""

    __slots__ = ("request", "detok", "stops", "text", "first_s", "sink", "logprobs")

    def __init__(self, request: Request, detok: Any, stops: Any, sink: Any) -> None:
        self.request = request
        self.detok = detok
        self.stops = stops
        self.text: list[str] = []
        self.first_s: float | None = None
        self.sink = sink
        # one entry per output token when the request asks for logprobs (StepResult.logprobs)
        self.logprobs: list | None = [] if request.sampling.logprobs is not None else None


class EngineCore:
    """Scheduler + real backend + text handling, stepped by a caller (one thread)."""

    def __init__(self, backend: Any, policy: Any = "continuous", **config_overrides: Any) -> None:
        from backends.text import IncrementalDetokenizer, StopStringMatcher

        self._detok_cls, self._stop_cls = IncrementalDetokenizer, StopStringMatcher
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.scheduler = Scheduler(backend.scheduler_config(**config_overrides), policy)
        self._live: dict[str, _Tracked] = {}
        self._ended: list[Completion] = []  # finished outside a step (rejected at add, aborted): next step()
        self._clock0 = time.perf_counter()
        self._counter = 0
        self.last_step: Any = None  # the last step's scheduler.loop.StepDone (plan, result, outputs, time)
        self._changed = False  # a request was added or ended outside a step since the last step

    def now(self) -> float:
        """Seconds since the engine started."""
        return time.perf_counter() - self._clock0

    def encode(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
               prompt_token_ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """Token ids for a raw prompt, chat messages (the model's template) or given ids."""
        if prompt_token_ids is not None:
            return tuple(int(t) for t in prompt_token_ids)
        if messages is not None:
            return tuple(self.tokenizer.encode_chat(messages))
        if prompt is None:
            raise ValueError("a request needs prompt, messages or prompt_token_ids")
        return tuple(self.tokenizer.encode(prompt))

    def add(self, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
            request_id: str | None = None, priority: int = 0, sink: Any = None,
            arrival_s: float | None = None) -> str:
        """Queue a request; events go to sink(completion_or_piece) if given. Returns its id.

        arrival_s (engine clock, now() by default) lets a server stamp the moment the request reached it.
        A sink with a bind(tracked) method gets the request's text state before any event.
        """
        if request_id is None:
            request_id = f"req-{self._counter}"
        self._counter += 1
        sampling = sampling or SamplingParams()
        req = Request(request_id, tuple(prompt_token_ids), sampling, priority=priority,
                      arrival_s=self.now() if arrival_s is None else arrival_s)
        tracked = _Tracked(req, self._detok_cls(self.tokenizer), self._stop_cls(sampling.stop) if sampling.stop
                           else None, sink)
        self._live[request_id] = tracked
        self._changed = True
        bind = getattr(sink, "bind", None)
        if bind is not None:
            bind(tracked)
        out = self.scheduler.add_request(req, req.arrival_s)
        if out is not None:
            self._ended.append(self._deliver(tracked, out, req.arrival_s))
        return request_id

    def abort(self, request_id: str, detail: str | None = None) -> None:
        """Abort a live request (no-op if it already finished); detail states why."""
        if request_id in self._live:
            self._changed = True
            out = self.scheduler.abort(request_id, self.now(), FinishReason.ABORT, detail)
            if out is not None:
                self._ended.append(self._deliver(self._live[request_id], out, self.now()))

    def has_work(self) -> bool:
        """True while requests are live or KV clean-up is pending."""
        return self.scheduler.has_unfinished() or self.scheduler.has_pending_kv_ops()

    def idle_until(self) -> float | None:
        """When stepping can next change anything, for a loop that waits for requests between steps.

        0.0: step now. A time (engine clock): the last step ran nothing and its policy holds requests until then.
        None: nothing changes until a request is added or aborted (no work, or the last step ran nothing and its
        plan named no wake-up time: the scheduler's contract is that such a plan changes only with a request).
        """
        if not self.has_work():
            return None
        ran = self.last_step
        if self._changed or ran is None or ran.result is not None:
            return 0.0
        return ran.plan.wake_at_s

    def step(self) -> list[Completion]:
        """Run one step; return the requests that finished in it (and any rejected or aborted since the last)."""
        finished, self._ended = self._ended, []
        self._changed = False
        ran = self.last_step = run_step(self.scheduler, self.backend, self.now)
        now = ran.now_s
        if ran.result is not None and ran.result.logprobs:
            self._keep_logprobs(ran.result.logprobs)
        for out in ran.outputs:
            tracked = self._live.get(out.request_id)
            if tracked is not None:
                done = self._deliver(tracked, out, now)
                if done is not None:
                    finished.append(done)
        return finished

    def _keep_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        for request_id, entry in logprobs.items():
            tracked = self._live.get(request_id)
            if tracked is not None and tracked.logprobs is not None:
                tracked.logprobs.append(entry)

    def _deliver(self, t: _Tracked, out: RequestOutput, now: float) -> Completion | None:
        piece = ""
        for token in out.new_token_ids:
            if out.finished and out.finish_reason == "stop" and token in self.scheduler.config.eos_token_ids:
                continue  # the EOS token has no text
            piece += t.detok.push(token)
        stop_hit = False
        if t.stops is not None and piece:
            piece, stop_hit = t.stops.push(piece)
        if out.finished or stop_hit:
            piece += t.detok.flush() if not stop_hit else ""
            if t.stops is not None and not stop_hit:
                piece += t.stops.flush()
        if piece:
            if t.first_s is None:
                t.first_s = now
            t.text.append(piece)
            if t.sink is not None:
                t.sink(piece)
        if stop_hit and not out.finished:
            out = self.scheduler.abort(t.request.request_id, now, FinishReason.STOP, detail="stop string")
        if out is None or not out.finished:
            return None
        r = t.request
        del self._live[r.request_id]
        comp = Completion(r.request_id, "".join(t.text), tuple(r.output_token_ids), out.finish_reason,
                          r.num_prompt_tokens, r.num_output_tokens, r.arrival_s,
                          t.first_s if t.first_s is not None else r.first_token_s, now, r.num_cached_tokens,
                          out.detail, None if t.logprobs is None else tuple(t.logprobs))
        if t.sink is not None:
            t.sink(comp)
        return comp

    def release_cache(self) -> None:
        """Empty the prefix cache so the KV ends clean; runs the removal step."""
        self.scheduler.release_cache()
        while self.has_work():
            self.step()


class LLM:
    """Offline batched generation: ``LLM().generate(prompts, SamplingParams(max_tokens=64))``."""

    def __init__(self, model: Any = None, policy: Any = "continuous", *, n_ctx: int = 4096, max_num_seqs: int = 16,
                 n_threads: int = 2, backend: Any = None, **backend_options: Any) -> None:
        if backend is None:
            from backends.llamacpp import LlamaCppBackend
            from backends.models import DEFAULT_MODEL

            backend = LlamaCppBackend(model or DEFAULT_MODEL, n_ctx=n_ctx, n_seq_max=max_num_seqs,
                                      n_threads=n_threads, **backend_options)
        self.backend = backend
        self.core = EngineCore(backend, policy)

    def generate(self, prompts: Sequence[str | Mapping[str, Any]], sampling: SamplingParams | None = None,
                 progress: Any = None) -> list[Completion]:
        """Completions in input order; a prompt may be text or a dict with prompt/messages/sampling fields."""
        ids = []
        for i, p in enumerate(prompts):
            item = {"prompt": p} if isinstance(p, str) else dict(p)
            sp = item.get("sampling") or sampling or SamplingParams()
            tokens = self.core.encode(item.get("prompt"), item.get("messages"), item.get("prompt_token_ids"))
            ids.append(self.core.add(tokens, sp, request_id=str(item.get("id", f"gen-{i}")),
                                     priority=int(item.get("priority", 0))))
        wanted = set(ids)
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for comp in self.core.step():
                if comp.request_id in wanted:  # not a completion left over from an earlier call
                    done[comp.request_id] = comp
                    if progress is not None:
                        progress(len(done), len(ids))
        return [done[i] for i in ids]

    def close(self) -> None:
        """Free the model and context."""
        self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RequestStream:
    """Text pieces of one request as they are generated; iterate, then read .completion."""

    _END = object()

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._q: queue.Queue = queue.Queue()
        self.completion: Completion | None = None

    def _put(self, item: Any) -> None:
        if isinstance(item, Completion):
            self.completion = item
            self._q.put(self._END)
        else:
            self._q.put(item)

    def __iter__(self) -> Iterator[str]:
        while (item := self._q.get()) is not self._END:
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the finished request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.completion is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self._q.get(timeout=remaining)
            if item is self._END:
                break
        return self.completion


class EngineLoop:
    """The engine thread every online driver runs: take operations, apply them, step, after-step hooks.

    Other threads post operations to the inbox (post); the thread applies them between steps (apply_op)
    and steps the core while it has work. It waits on the inbox when stepping would change nothing: while
    the core has no work, while the last plan ran nothing and named no wake-up time (only a request changes
    it), or until the plan's wake-up time. ("stop",) ends the loop. Subclasses override the hooks.
    """

    def __init__(self, core: EngineCore, name: str = "tokenstep-engine") -> None:
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def post(self, op: tuple) -> None:
        """Queue an operation for the engine thread (any thread)."""
        self._inbox.put(op)

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the thread to stop after the current step and wait for it."""
        self._inbox.put(("stop",))
        self._thread.join(timeout_s)

    # ---- hooks (engine thread) ------------------------------------------------------------
    def apply_op(self, op: tuple) -> None:
        """Apply one operation other than stop."""
        raise ValueError(f"unknown engine operation {op[0]!r}")

    def after_step(self, finished: list[Completion]) -> None:
        """Right after each core.step(), with the requests that finished in it."""

    def after_round(self) -> None:
        """After each round of the loop, whether or not it stepped."""

    def on_error(self, exc: Exception) -> None:
        """An operation, a step or a hook raised; the loop has stopped. Re-raises by default."""
        raise exc

    def on_exit(self) -> None:
        """The loop has ended (stop, or an error that on_error handled)."""

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            core = self.core
            while self._apply(self._take_ops()):
                if core.has_work():
                    self.after_step(core.step())
                self.after_round()
        except Exception as exc:  # noqa: BLE001 - handed to the hook, which re-raises unless it handles it
            self.on_error(exc)
        self.on_exit()

    def _take_ops(self) -> list[tuple]:
        """The inbox's operations, after waiting as long as stepping would change nothing."""
        inbox, ops = self._inbox, []
        until = self.core.idle_until()
        try:
            if until is None:
                ops.append(inbox.get())
            elif until > 0.0:
                timeout = until - self.core.now()
                if timeout > 0.0:
                    ops.append(inbox.get(timeout=timeout))
        except queue.Empty:
            pass
        return ops + self._drain()

    def _drain(self) -> list[tuple]:
        """The operations waiting in the inbox now, without waiting."""
        ops = []
        while True:
            try:
                ops.append(self._inbox.get_nowait())
            except queue.Empty:
                return ops

    def _apply(self, ops: list[tuple]) -> bool:
        """Apply operations in order; False once asked to stop."""
        for op in ops:
            if op[0] == "stop":
                return False
            self.apply_op(op)
        return True


class OnlineEngine(EngineLoop):
    """Accepts requests from any thread while a background thread steps the engine."""

    def __init__(self, core: EngineCore) -> None:
        super().__init__(core)
        self._closed = False
        self.start()

    def submit(self, prompt: str | None = None, sampling: SamplingParams | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None, prompt_token_ids: Sequence[int] | None = None,
               request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Queue a request; returns its stream at once."""
        if self._closed:
            raise RuntimeError("the engine is shut down; create a new OnlineEngine")
        tokens = self.core.encode(prompt, messages, prompt_token_ids)
        request_id = request_id or f"online-{id(tokens)}-{time.perf_counter_ns()}"
        stream = RequestStream(request_id)
        self.post(("add", tokens, sampling, request_id, priority, stream))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; applied between steps."""
        self.post(("abort", request_id))

    def apply_op(self, op: tuple) -> None:
        """Add or abort a request."""
        if op[0] == "add":
            _, tokens, sampling, rid, priority, stream = op
            self.core.add(tokens, sampling, rid, priority, sink=stream._put)
        elif op[0] == "abort":
            self.core.abort(op[1])
        else:
            super().apply_op(op)

    def shutdown(self) -> None:
        """Stop the engine thread after the current step; live requests, and requests submitted while it
        stopped, end with finish reason abort."""
        self._closed = True
        self.stop()
        for op in self._drain():  # submitted behind the stop: add them so that their streams end with a reason
            if op[0] == "add":
                self.apply_op(op)
        for rid in list(self.core._live):
            self.core.abort(rid, "the engine was shut down")
