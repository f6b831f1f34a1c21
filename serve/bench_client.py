"""The load generator's transport: OpenAI-compatible streaming requests over aiohttp, every SSE chunk timed.

One request is one POST with ``stream: true`` and ``stream_options.include_usage``. Each network read is
stamped with ``time.perf_counter()`` as it returns, and every SSE event it completes carries that stamp.
A *token chunk* is an event whose first choice carries non-empty text (``text`` on /v1/completions,
``delta.content`` on /v1/chat/completions): a chat chunk that only names the role, a prompt-progress
chunk and a trailing chunk with only ``finish_reason`` carry no token. The output token count is the
server's ``usage.completion_tokens`` (read from whichever chunk carries it: vLLM sends it in a chunk of
its own, llama-server beside the finish reason) and otherwise the number of token chunks.

A request fails, with a one-line reason, on an HTTP status other than 200, an ``{"error": ...}`` event,
a connection error or reset, a stream that ends before ``[DONE]`` or a finish reason, a stream with no
token chunk, or its timeout. The run goes on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CONNECT_TIMEOUT_S = 10.0  # reaching the server at all; a request's own timeout is --request-timeout


class ServerError(ValueError):
    """The server cannot be reached or cannot serve the endpoint (exit status 2)."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: when (seconds after the run starts), what, and how many tokens to ask for."""

    request_id: str
    arrival_s: float
    prompt: tuple[int, ...] | str | None  # token ids or text (completions); None with messages
    max_tokens: int
    num_prompt_tokens: int | None = None  # the prompt's length in the model's tokens, when known here
    messages: tuple | None = None  # chat messages (dicts)


@dataclass(slots=True)
class RequestResult:
    """What one request did, on the client's clock (seconds after the run started)."""

    request_id: str
    arrival_s: float  # when the workload asked for it
    max_tokens: int
    num_prompt_tokens: int | None
    sent_s: float | None = None  # when the POST went out (later than arrival_s under --max-concurrency)
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token chunk
    end_s: float | None = None  # the last chunk carrying a choice (vLLM's end of a request)
    num_output_tokens: int = 0
    output_count_source: str = "chunks"  # "usage" when the server reported completion_tokens
    num_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    finish_reason: str | None = None
    success: bool = False
    error: str = ""
    status: int | None = None
    text: str = ""
    length_mismatch: bool = False  # the server sent another number of tokens than asked (see check_lengths)

    @property
    def ttft_s(self) -> float | None:
        """Send to the first token chunk."""
        return self.token_times_s[0] - self.sent_s if self.token_times_s and self.sent_s is not None else None

    @property
    def e2el_s(self) -> float | None:
        """Send to the last chunk carrying a choice."""
        return self.end_s - self.sent_s if self.end_s is not None and self.sent_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1), for two or more output tokens."""
        if self.num_output_tokens < 2 or self.e2el_s is None or self.ttft_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        """Gaps between consecutive token chunks."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def client_queue_s(self) -> float | None:
        """Arrival to send: time spent waiting for a --max-concurrency place."""
        return None if self.sent_s is None else self.sent_s - self.arrival_s


def build_payload(endpoint: str, model: str, req: BenchRequest, ignore_eos: bool, extra: dict | None) -> dict:
    """The JSON body of one streamed request."""
    body: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                  "max_tokens": req.max_tokens}
    if endpoint.endswith("/chat/completions"):
        messages = req.messages
        if messages is None:
            messages = ({"role": "user", "content": req.prompt},)
        body["messages"] = list(messages)
        body["max_completion_tokens"] = req.max_tokens
    else:
        body["prompt"] = list(req.prompt) if isinstance(req.prompt, tuple) else req.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def _error_text(payload: object) -> str:
    """The message of an OpenAI-shaped error, else the payload itself, on one line."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            parts = [str(err.get(k)) for k in ("type", "code") if err.get(k) not in (None, "")]
            msg = str(err.get("message", err))
            return f"{msg} ({', '.join(parts)})" if parts else msg
        return str(err)
    return str(payload)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _token_text(choice: dict) -> str:
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


class _Stream:
    """SSE parsing state of one response."""

    def __init__(self, out: RequestResult, clock: Callable[[], float]) -> None:
        self.out, self.clock = out, clock
        self.buffer = b""
        self.done = False
        self.usage_tokens: int | None = None
        self.parts: list[str] = []

    def feed(self, data: bytes, stamp: float) -> None:
        """Parse the complete lines in data (all stamped with the read's time)."""
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (":"), event/id fields
            self.event(line[5:].strip(), stamp)

    def event(self, data: bytes, stamp: float) -> None:
        """One SSE data payload."""
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            raise _Failure(f"bad SSE data (not JSON): {_one_line(data.decode('utf-8', 'replace'), 120)}") from None
        if not isinstance(obj, dict):
            raise _Failure(f"bad SSE data (not a JSON object): {_one_line(str(obj), 120)}")
        if "error" in obj:
            raise _Failure(f"error event in the stream: {_one_line(_error_text(obj))}")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.out.num_prompt_tokens = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.out.num_cached_tokens = details["cached_tokens"]
        choices = obj.get("choices")
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        self.out.end_s = stamp
        text = _token_text(choice)
        if text:
            self.out.token_times_s.append(stamp)
            self.parts.append(text)
        if choice.get("finish_reason"):
            self.out.finish_reason = str(choice["finish_reason"])

    def finish(self) -> None:
        """Check the stream ended properly and fill the counts."""
        out = self.out
        out.text = "".join(self.parts)
        if not self.done and out.finish_reason is None:
            raise _Failure("the stream ended before [DONE] and before a finish_reason")
        if not out.token_times_s:
            raise _Failure("the stream carried no token chunk")
        if self.usage_tokens is not None:
            out.num_output_tokens, out.output_count_source = self.usage_tokens, "usage"
        else:
            out.num_output_tokens, out.output_count_source = len(out.token_times_s), "chunks"


class _Failure(Exception):
    """A request that failed, with its one-line reason."""


async def send_request(session: aiohttp.ClientSession, url: str, body: dict, out: RequestResult,
                       clock: Callable[[], float], timeout_s: float | None) -> RequestResult:
    """POST one streamed request and fill out; never raises (a failure is recorded in out)."""
    import aiohttp

    headers = {"x-request-id": out.request_id}
    stream = _Stream(out, clock)

    async def go() -> None:
        out.sent_s = clock()
        async with session.post(url, json=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                try:
                    detail = _error_text(json.loads(raw))
                except ValueError:
                    detail = raw.decode("utf-8", "replace") or (resp.reason or "")
                raise _Failure(f"HTTP {resp.status}: {_one_line(detail)}")
            async for data in resp.content.iter_any():
                stream.feed(data, clock())
            if stream.buffer.strip():
                stream.feed(b"\n", clock())
        stream.finish()

    try:
        if timeout_s is None:
            await go()
        else:
            await asyncio.wait_for(go(), timeout_s)
        out.success = True
    except _Failure as exc:
        out.error = str(exc)
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout_s:g} s (--request-timeout)"
    except aiohttp.ClientError as exc:
        out.error = f"connection error: {type(exc).__name__}: {_one_line(str(exc) or 'no detail')}"
    except OSError as exc:
        out.error = f"connection error: {type(exc).__name__}: {_one_line(str(exc))}"
    return out


@dataclass
class BenchRun:
    """Results of every request of one run, in workload order, and how long the run took."""

    results: list[RequestResult]
    duration_s: float  # the first send until every request has ended (vLLM's benchmark duration)
    started_at: float  # time.time() at the start, for the record
    num_not_sent: int  # requests left unsent when --max-duration ran out
    warmup_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BenchTarget:
    """Where requests go and how they are asked."""

    base_url: str
    endpoint: str
    model: str
    ignore_eos: bool = True
    extra_body: dict | None = None

    @property
    def url(self) -> str:
        """The endpoint's full URL."""
        return self.base_url.rstrip("/") + self.endpoint


def _session(max_concurrency: int | None) -> aiohttp.ClientSession:
    """A session with a connection pool of max_concurrency (unbounded when None)."""
    try:
        import aiohttp
    except ImportError:
        raise ServerError("tokenstep bench needs aiohttp, in the serve extra: pip install -e '.[serve]'") from None
    limit = max_concurrency or 0  # 0: no connection limit (open loop)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def run_requests(target: BenchTarget, requests: Sequence[BenchRequest], *, max_concurrency: int | None = None,
                       request_timeout_s: float | None = None, max_duration_s: float | None = None,
                       num_warmups: int = 0, progress: Callable[[int, int], None] | None = None) -> BenchRun:
    """Send every request at its arrival time (open loop) or through a --max-concurrency gate; gather results.

    The run's clock is the workload's: a request goes out arrival_s after the start, as vLLM replays a timed
    trace (a synthetic workload's first arrival is one gap in). Past max_duration_s no request is sent
    (they count in num_not_sent) and those still streaming are cut off and fail with that reason.
    """
    async with _session(max_concurrency) as session:
        warmup_errors = await _warmup(session, target, requests, num_warmups, max_concurrency, request_timeout_s)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        t0 = time.perf_counter()
        started_at = time.time()

        def clock() -> float:
            return time.perf_counter() - t0

        results: list[RequestResult] = []
        tasks: list[asyncio.Task] = []
        done_count = 0

        async def one(req: BenchRequest, out: RequestResult) -> RequestResult:
            nonlocal done_count
            async with gate:
                await send_request(session, target.url, build_payload(target.endpoint, target.model, req,
                                                                      target.ignore_eos, target.extra_body),
                                   out, clock, request_timeout_s)
            done_count += 1
            if progress is not None:
                progress(done_count, len(requests))
            return out

        not_sent = 0
        for i, req in enumerate(requests):
            arrival = req.arrival_s
            if max_duration_s is not None and arrival >= max_duration_s:
                not_sent = len(requests) - i
                break
            wait = arrival - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            out = RequestResult(req.request_id, arrival, req.max_tokens, req.num_prompt_tokens)
            results.append(out)
            tasks.append(asyncio.create_task(one(req, out)))
        await _wait_all(tasks, results, max_duration_s, clock)
        return BenchRun(results, clock(), started_at, not_sent, warmup_errors)


async def _wait_all(tasks: list[asyncio.Task], results: list[RequestResult], max_duration_s: float | None,
                    clock: Callable[[], float]) -> None:
    """Wait for every task; past max_duration_s cancel the rest and mark them failed."""
    if not tasks:
        return
    remaining = None if max_duration_s is None else max(0.0, max_duration_s - clock())
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        for out in results:
            if not out.success and not out.error:
                out.error = f"cut off at --max-duration {max_duration_s:g} s" + (
                    "" if out.sent_s is not None else " before it was sent")


async def _warmup(session: aiohttp.ClientSession, target: BenchTarget, requests: Sequence[BenchRequest],
                  num_warmups: int, max_concurrency: int | None, timeout_s: float | None) -> list[str]:
    """Send the first request num_warmups times (as vLLM does); return the errors of those that failed."""
    if num_warmups <= 0 or not requests:
        return []
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    t0 = time.perf_counter()
    req = requests[0]

    async def one(i: int) -> RequestResult:
        async with gate:
            out = RequestResult(f"warmup-{i}", 0.0, req.max_tokens, req.num_prompt_tokens)
            body = build_payload(target.endpoint, target.model, req, target.ignore_eos, target.extra_body)
            return await send_request(session, target.url, body, out, lambda: time.perf_counter() - t0, timeout_s)

    outs = await asyncio.gather(*(one(i) for i in range(num_warmups)))
    return [o.error for o in outs if not o.success]


async def server_info(base_url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> dict | None:
    """GET /v1/models: the JSON, or None when the server has no such route; ServerError when unreachable."""
    session = _session(None)
    import aiohttp

    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session, session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                return None
            try:
                return await r.json(content_type=None)
            except ValueError:
                return None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        why = _one_line(str(exc) or type(exc).__name__, 160)
        raise ServerError(f"cannot reach a server at {base_url} ({why}); start the server or fix --base-url") from None


async def check_endpoint(target: BenchTarget, probe: BenchRequest, timeout_s: float) -> str | None:
    """Send one 1-token request. ServerError when the endpoint refuses it as a client error (4xx: no such
    route, or a request shape it does not take); a warning to show for any other failure (the run goes on)."""
    out = RequestResult("bench-probe", 0.0, 1, probe.num_prompt_tokens)
    body = build_payload(target.endpoint, target.model, probe, target.ignore_eos, target.extra_body)
    t0 = time.perf_counter()
    async with _session(None) as session:
        await send_request(session, target.url, body, out, lambda: time.perf_counter() - t0, timeout_s)
    if out.success:
        return None
    if out.status in (404, 405):
        other = [e for e in ENDPOINTS if e != target.endpoint]
        raise ServerError(f"{target.url} answered HTTP {out.status}: the server has no {target.endpoint} "
                          f"(try --endpoint {other[0]})")
    if out.status is not None and 400 <= out.status < 500 and out.status not in (408, 429):
        raise ServerError(f"{target.url} refused a 1-token test request: {out.error}; check --model and that the "
                          "server takes this kind of prompt")
    return f"a 1-token test request to {target.url} failed ({out.error}); running anyway"
