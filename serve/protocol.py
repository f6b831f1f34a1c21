"""OpenAI request models, their validation into SamplingParams, and the error shape.

Unknown fields are ignored (clients send many); a bad field gets one line naming it.
Shared by the server and the load generator.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler import SamplingParams

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (and vLLM's default max_logprobs)
MAX_N = 16


class ProtocolError(ValueError):
    """A request the server refuses: HTTP status, OpenAI error type, the offending field, one-line message."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return error_body(self.message, self.status, self.type, self.param)


def error_body(message: str, status: int, type_: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} (code: the HTTP status, as vLLM)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class StreamOptions(BaseModel):
    """stream_options: include_usage adds a usage chunk before [DONE]."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0

    def include_usage(self) -> bool:
        """True when the stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    """One chat message; content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The content as one string; non-text parts are refused, naming the message."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError(f"messages[{index}].content: only text parts are supported "
                                    f"(got type {part.get('type')!r})", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def one_prompt(self) -> str | list[int]:
        """The single prompt (text or token ids); a batch of several is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ProtocolError("prompt: a list of several prompts is not supported; send one prompt per "
                                    "request (or use n for several completions)", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p or p == "":
            raise ProtocolError("prompt: must not be empty", param="prompt")
        return p


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a one-line ProtocolError naming the field."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _field_name(err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            raise ProtocolError(f"{loc}: required field is missing", param=loc) from None
        raise ProtocolError(f"{loc}: {msg} (got {_short(err.get('input'))})", param=loc) from None
    for name in ("echo", "suffix"):
        if getattr(req, name, None):
            raise ProtocolError(f"{name}: not supported by this server; leave it out", param=name)
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise ProtocolError("top_logprobs: needs logprobs=true", param="top_logprobs")
    return req


def _field_name(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union branch names (str, list[int]) are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "list[int]", "list[str]", "list[list[int]]", "list[dict[str,any]]") \
                or "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def max_new_tokens(req: _Common, num_prompt_tokens: int, max_model_len: int) -> int:
    """max_completion_tokens, else max_tokens, else what the context leaves; refused past the context."""
    wanted = req.max_completion_tokens or req.max_tokens
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ProtocolError(f"the prompt has {num_prompt_tokens} tokens; this server's context holds "
                            f"{max_model_len} tokens per request (max_model_len), prompt and output together: "
                            "shorten the prompt", param="messages" if isinstance(req, ChatRequest) else "prompt")
    if wanted is None:
        return room
    if wanted > room:
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ProtocolError(f"{field}: prompt ({num_prompt_tokens} tokens) + {field} ({wanted}) = "
                            f"{num_prompt_tokens + wanted} exceeds max_model_len ({max_model_len} tokens); "
                            f"ask for at most {room}", param=field)
    return wanted


def sampling_params(req: _Common, max_tokens: int, index: int = 0) -> SamplingParams:
    """SamplingParams for choice `index` (n > 1: seed + index, so seeded choices differ yet repeat)."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if isinstance(req, CompletionRequest):
        logprobs = req.logprobs
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    seed = None if req.seed is None else req.seed + index
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                          top_p=req.top_p, min_p=req.min_p, seed=seed, stop_token_ids=tuple(req.stop_token_ids or ()),
                          stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs)


def new_id(prefix: str) -> str:
    """A response id such as cmpl-3f2a... or chatcmpl-..."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_unix() -> int:
    """The created field: seconds since the epoch."""
    return int(time.time())


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
    """OpenAI usage, with prompt_tokens_details.cached_tokens (prompt tokens served from the prefix cache)."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}
