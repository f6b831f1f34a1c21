"""Response bodies and SSE chunks in OpenAI's shapes, built from the engine's events.

A streamed chunk is one small f-string around json.dumps of its new text: nothing of the response so far is
encoded again. Logprob entries arrive as (token_id, logprob, ((token_id, logprob), ...)).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from serve.engine import Completion
from serve.protocol import ProtocolError, usage

_dumps = json.dumps
OK_REASONS = ("stop", "length")


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Fields every chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool
    tokenizer: Any


def config_dict(config: Any) -> dict[str, Any]:
    """dataclasses.asdict of a SchedulerConfig, JSON-ready."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def models_body(info: Any, created: int) -> dict[str, Any]:
    """GET /v1/models: OpenAI's list, each model with a "tokenstep" object describing the server."""
    ts = {"backend": info.backend, "policy": info.policy, "scheduler_config": info.scheduler_config,
          "cost": info.cost, "model_path": info.model_path, "n_ctx": info.n_ctx, "tokenizer": info.tokenizer}
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "tokenstep", "root": info.model_path,
         "parent": None, "max_model_len": info.max_model_len, "tokenstep": ts}
        for name in info.served_model_names]}


def _token_text(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    raw = tokenizer.token_to_bytes(token_id) if token_id >= 0 else b""
    return raw.decode("utf-8", errors="replace"), raw


def chat_logprobs(tokenizer: Any, entries: list) -> dict[str, Any]:
    """Chat's logprobs object: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    content = []
    for token_id, lp, top in entries:
        text, raw = _token_text(tokenizer, token_id)
        alts = []
        for alt_id, alt_lp in top:
            alt_text, alt_raw = _token_text(tokenizer, alt_id)
            alts.append({"token": alt_text, "logprob": alt_lp, "bytes": list(alt_raw)})
        content.append({"token": text, "logprob": lp, "bytes": list(raw), "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(tokenizer: Any, entries: list, offset: int) -> tuple[dict[str, Any], int]:
    """The legacy completions logprobs object, and the text offset after it (the sampled token is always in
    top_logprobs, as in vLLM)."""
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, lp, top in entries:
        text, _ = _token_text(tokenizer, token_id)
        alts = {_token_text(tokenizer, a)[0]: alp for a, alp in top}
        alts.setdefault(text, lp)
        tokens.append(text)
        lps.append(lp)
        tops.append(alts)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset


def entries_of(comp: Completion) -> list:
    """A finished request's logprob entries with their token ids."""
    lps = comp.logprobs or ()
    return [(t, lp, top) for t, (lp, top) in zip(comp.token_ids, lps, strict=False)]


def failure(comp: Completion) -> ProtocolError | None:
    """The error a finish other than stop/length stands for, or None."""
    if comp.finish_reason in OK_REASONS:
        return None
    detail = comp.detail or comp.finish_reason
    if comp.finish_reason == "rejected":
        return ProtocolError(f"request rejected: {detail}", 400)
    if comp.finish_reason == "abort":
        return ProtocolError(f"request aborted: {detail}", 503, "service_unavailable")
    return ProtocolError(f"request failed: {detail}", 500, "server_error")


def raise_for_failure(comp: Completion) -> None:
    """Raise the ProtocolError of a failed finish."""
    err = failure(comp)
    if err is not None:
        raise err


def usage_of(comps: list[Completion], sinks: list, num_prompt_tokens: int) -> dict[str, Any]:
    """Usage of a response: the prompt counted once (as OpenAI does for n > 1), completions summed, cached
    tokens of the first choice (taken when its first token came, else at its finish)."""
    cached = sinks[0].num_cached_tokens if sinks and sinks[0].num_cached_tokens is not None else None
    if cached is None:
        cached = comps[0].num_cached_tokens if comps else 0
    return usage(num_prompt_tokens, sum(c.num_output_tokens for c in comps), cached)


def full_body(meta: ResponseMeta, comps: list[Completion], sinks: list, num_prompt_tokens: int) -> dict[str, Any]:
    """A non-streamed response."""
    choices = []
    for i, c in enumerate(comps):
        want = c.logprobs is not None
        if meta.chat:
            lp = chat_logprobs(meta.tokenizer, entries_of(c)) if want else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        else:
            lp = completion_logprobs(meta.tokenizer, entries_of(c), 0)[0] if want else None
            choices.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion", "created": meta.created,
            "model": meta.model, "choices": choices, "usage": usage_of(comps, sinks, num_prompt_tokens)}


def usage_line(meta: ResponseMeta, usage_obj: dict[str, Any]) -> str:
    """The include_usage chunk: no choices, the usage."""
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    return (f'data: {{"id":"{meta.id}","object":"{obj}","created":{meta.created},"model":{_dumps(meta.model)},'
            f'"choices":[],"usage":{_dumps(usage_obj, separators=(",", ":"))}}}\n\n')


class Chunker:
    """Turns one response's engine events into SSE `data:` lines."""

    def __init__(self, meta: ResponseMeta, n: int) -> None:
        self.meta = meta
        obj = "chat.completion.chunk" if meta.chat else "text_completion"
        self._head = (f'data: {{"id":"{meta.id}","object":"{obj}","created":{meta.created},'
                      f'"model":{_dumps(meta.model)},"choices":[{{"index":')
        self._role_sent = [False] * n
        self._offsets = [0] * n

    def lines(self, events: list[tuple[int, Any, Any]]) -> str:
        """SSE lines for a batch of (index, piece or Completion, logprob entries) events, in order.

        A piece directly followed by its request's finish becomes one chunk carrying the finish_reason.
        """
        out: list[str] = []
        i, n = 0, len(events)
        while i < n:
            index, item, lps = events[i]
            i += 1
            comp = None
            if isinstance(item, Completion):
                comp, text = item, ""
            else:
                text = item
                if i < n and events[i][0] == index and isinstance(events[i][1], Completion):
                    comp, more = events[i][1], events[i][2]
                    lps = (lps or []) + more if more else lps
                    i += 1
            err = failure(comp) if comp is not None else None
            if err is not None:
                if text or lps:
                    out.append(self._chunk(index, text, lps, None))
                out.append(f"data: {_dumps(err.body())}\n\n")
            else:
                out.append(self._chunk(index, text, lps, comp.finish_reason if comp is not None else None))
        return "".join(out)

    def _chunk(self, index: int, text: str, lps: list | None, finish: str | None) -> str:
        meta = self.meta
        fr = "null" if finish is None else f'"{finish}"'
        if meta.chat:
            lp = "null" if lps is None else _dumps(chat_logprobs(meta.tokenizer, lps))
            if not self._role_sent[index]:
                self._role_sent[index] = True
                delta = f'{{"role":"assistant","content":{_dumps(text)}}}'
            else:
                delta = f'{{"content":{_dumps(text)}}}' if text or finish is None else "{}"
            return f'{self._head}{index},"delta":{delta},"logprobs":{lp},"finish_reason":{fr}}}]}}\n\n'
        if lps is None:
            lp = "null"
        else:
            obj, self._offsets[index] = completion_logprobs(meta.tokenizer, lps, self._offsets[index])
            lp = _dumps(obj)
        return f'{self._head}{index},"text":{_dumps(text)},"logprobs":{lp},"finish_reason":{fr}}}]}}\n\n'
