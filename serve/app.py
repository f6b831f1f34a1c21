"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

The model loads in a thread after the server starts listening (/health answers 503 until it is ready).
Responses are built from the engine's events (serve.async_engine); streams are SSE, one `data:` line per
chunk and `data: [DONE]` at the end. Client disconnects abort their requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import render
from serve.async_engine import SHUTDOWN_DETAIL, AsyncEngine, ChoiceSink
from serve.engine import Completion, EngineCore
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.protocol import (
    ChatRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
    max_new_tokens,
    new_id,
    now_unix,
    parse,
    sampling_params,
)

RETRY_AFTER_S = 1


@dataclass
class ServerInfo:
    """What /v1/models reports; scheduler_config and n_ctx are filled in once the engine is built."""

    served_model_names: tuple[str, ...]
    backend: str  # "llama" or "sim"
    policy: str
    cost: str | None
    model_path: str | None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    n_ctx: int | None = None
    max_model_len: int | None = None
    tokenizer: str | None = None


class ServerState:
    """The app's shared state: load status, the engine once built, metrics, shutdown."""

    def __init__(self, info: ServerInfo, loader: Callable[[], EngineCore], max_queue: int | None,
                 shutdown_timeout_s: float, on_load_error: Callable[[str], None] | None = None) -> None:
        self.info, self.loader, self.max_queue = info, loader, max_queue
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_load_error = on_load_error
        self.metrics = ServerMetrics(info.served_model_names[0])
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.draining = False
        self.created = now_unix()

    def ready(self) -> AsyncEngine:
        """The engine, or a 503 while the model loads."""
        if self.engine is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ProtocolError(msg, 503, "service_unavailable")
        return self.engine

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build the engine in a thread; /health turns 200 when it is ready."""
        def load() -> None:
            try:
                core = self.loader()
            except Exception as exc:  # shown to the user; the server then stops
                self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
                print(f"tokenstep: error: {self.load_error}", file=sys.stderr)
                if self.on_load_error is not None:
                    loop.call_soon_threadsafe(self.on_load_error, self.load_error)
                return
            cfg = core.scheduler.config
            self.info.scheduler_config = render.config_dict(cfg)
            self.info.max_model_len = min(cfg.max_model_len, cfg.kv_capacity_tokens)
            self.info.n_ctx = getattr(core.backend, "n_ctx", cfg.kv_capacity_tokens)
            loop.call_soon_threadsafe(self._set_engine, core, loop)

        threading.Thread(target=load, name="tokenstep-load", daemon=True).start()

    def _set_engine(self, core: EngineCore, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = AsyncEngine(core, self.metrics, loop, self.max_queue)
        cfg = core.scheduler.config
        print(f"tokenstep serve: ready ({cfg.max_num_seqs} slots, max_model_len {self.info.max_model_len}, "
              f"KV {cfg.kv_capacity_tokens} tokens, prefix caching {'on' if cfg.enable_prefix_caching else 'off'})",
              file=sys.stderr)
        if self.draining:
            self.engine.accepting = False

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop accepting; in-flight requests get shutdown_timeout_s to finish, then are aborted with a reason."""
        if self.draining:
            return
        self.draining = True
        if self.engine is not None:
            self.engine.accepting = False
            loop.call_later(self.shutdown_timeout_s, self.engine.abort_all, SHUTDOWN_DETAIL)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a ServerState."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading(asyncio.get_running_loop())
        yield
        if state.engine is not None:
            state.engine.close()
            closer = getattr(state.engine.core.backend, "close", None)
            if closer is not None:
                closer()

    app = FastAPI(title="tokenstep", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenstep = state

    @app.exception_handler(ProtocolError)
    async def protocol_error(_request: Request, exc: ProtocolError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), exc.status_code, kind), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> Response:
        if state.engine is None or state.engine.error is not None:
            reason = state.load_error or (state.engine.error if state.engine else None) or "loading"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "draining": state.draining})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        state.ready()
        return JSONResponse(render.models_body(state.info, state.created))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(state, request, ChatRequest)

    return app


async def _generate(state: ServerState, request: Request, kind: type) -> Response:
    """Validate, tokenize, submit n choices; answer with a stream or one JSON body."""
    engine = state.ready()
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request body is not valid JSON ({exc})") from None
    req = parse(kind, body)
    names = state.info.served_model_names
    if req.model is not None and req.model not in names:
        raise ProtocolError(f"model: the model {req.model!r} does not exist; this server serves "
                            f"{', '.join(map(repr, names))}", 404, "not_found_error", "model")
    prompt_ids = _prompt_ids(engine, req)
    max_tokens = max_new_tokens(req, len(prompt_ids), state.info.max_model_len)
    samplings = [sampling_params(req, max_tokens, i) for i in range(req.n)]
    q, sinks = engine.submit(prompt_ids, samplings, req.priority)
    chat = kind is ChatRequest
    meta = render.ResponseMeta(new_id("chatcmpl" if chat else "cmpl"), now_unix(),
                               req.model or names[0], chat, engine.core.tokenizer)
    if req.stream:
        return StreamingResponse(_sse(engine, request, q, sinks, meta, len(prompt_ids), req.include_usage()),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    comps = await _collect(engine, request, q, sinks)
    return JSONResponse(render.full_body(meta, comps, sinks, len(prompt_ids)))


def _prompt_ids(engine: AsyncEngine, req: Any) -> list[int]:
    core = engine.core
    if isinstance(req, ChatRequest):
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        try:
            return list(core.encode(messages=messages))
        except ValueError as exc:
            raise ProtocolError(f"messages: {exc}", param="messages") from None
    prompt = req.one_prompt()
    if isinstance(prompt, str):
        return list(core.encode(prompt=prompt))
    vocab = core.tokenizer.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise ProtocolError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return list(prompt)


async def _watch_disconnect(request: Request, engine: AsyncEngine, sinks: list[ChoiceSink]) -> None:
    """Abort the request's choices when its client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.abort([s.request_id for s in sinks], "client disconnected")
            return


async def _collect(engine: AsyncEngine, request: Request, q: asyncio.Queue,
                   sinks: list[ChoiceSink]) -> list[Completion]:
    """Wait for every choice to finish (non-streamed); a disconnect aborts them."""
    watcher = asyncio.create_task(_watch_disconnect(request, engine, sinks))
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(sinks):
            index, item, _ = await q.get()
            if isinstance(item, Completion):
                done[index] = item
    finally:
        watcher.cancel()
        if len(done) < len(sinks):
            engine.abort([s.request_id for s in sinks], "client disconnected")
    comps = [done[i] for i in range(len(sinks))]
    for c in comps:
        render.raise_for_failure(c)
    return comps


async def _sse(engine: AsyncEngine, request: Request, q: asyncio.Queue, sinks: list[ChoiceSink],
               meta: render.ResponseMeta, num_prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream: each batch of engine events becomes one write of one or more `data:` lines."""
    watcher = asyncio.create_task(_watch_disconnect(request, engine, sinks))
    chunker = render.Chunker(meta, len(sinks))
    remaining = len(sinks)
    comps: dict[int, Completion] = {}
    try:
        while remaining:
            events = [await q.get()]
            while not q.empty():
                events.append(q.get_nowait())
            for _, item, _ in events:
                if isinstance(item, Completion):
                    remaining -= 1
                    comps[_index_of(sinks, item)] = item
            yield chunker.lines(events)
        if include_usage:
            yield render.usage_line(meta, render.usage_of(list(comps.values()), sinks, num_prompt_tokens))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if remaining:  # the client went away mid-stream (the generator was closed)
            engine.abort([s.request_id for s in sinks], "client disconnected")


def _index_of(sinks: list[ChoiceSink], comp: Completion) -> int:
    for s in sinks:
        if s.request_id == comp.request_id:
            return s.index
    raise KeyError(comp.request_id)
