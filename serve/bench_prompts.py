"""Workload requests as the load generator sends them: token ids where the endpoint takes them, else text.

/v1/completions takes a list of token ids as its prompt (tokenstep serve, llama-server and vLLM do), so a
workload of ids goes out unchanged. /v1/chat/completions takes text only: ids become a user message of the
same number of tokens in the model's vocabulary (decode, re-encode, trim or pad until the count matches),
so prompts that share their first tokens still share their first text. The chat template then adds its own
few tokens on the server; the server's usage.prompt_tokens is what the results report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.bench_client import BenchRequest
from sim.workload import Workload, WorkloadRequest

FIT_ROUNDS = 8  # decode/re-encode rounds; random ids settle in two or three


def load_tokenizer(model: str) -> Any:
    """backends.text.Tokenizer over the model's vocabulary (a known model name or a GGUF path)."""
    try:
        from backends.models import LlamaModel
        from backends.text import Tokenizer
    except ImportError as exc:
        raise ValueError(f"text prompts need the model's tokenizer, which needs llama-cpp-python: pip install -e "
                         f"'.[llama]' ({exc})") from None
    return Tokenizer(LlamaModel(model))


def text_of_length(tokenizer: Any, ids: Sequence[int], num_tokens: int) -> str:
    """Text that the tokenizer turns into num_tokens tokens (no BOS), starting with the text of ids."""
    filler = tokenizer.encode(" the", add_special=False) or [ids[0]]
    text = tokenizer.decode(list(ids))
    for _ in range(FIT_ROUNDS):
        got = tokenizer.encode(text, add_special=False)
        if len(got) == num_tokens:
            return text
        if len(got) > num_tokens:
            text = tokenizer.decode(got[:num_tokens])
        else:
            text += tokenizer.decode((filler * num_tokens)[: num_tokens - len(got)])
    return text  # within a token or two; the server's usage reports the exact count


def needs_tokenizer(workload: Workload, endpoint: str) -> bool:
    """Whether sending this workload to this endpoint turns token ids into text."""
    chat = endpoint.endswith("/chat/completions")
    return chat and any(r.messages is None and r.prompt is None for r in workload.requests)


def to_bench_requests(workload: Workload, endpoint: str, tokenizer: Any = None) -> list[BenchRequest]:
    """One BenchRequest per workload request, in arrival order."""
    chat = endpoint.endswith("/chat/completions")
    out = []
    for r in workload.requests:
        n = len(r.prompt_token_ids) or None
        if r.messages is not None:
            if not chat:
                raise ValueError(f"request {r.request_id} carries chat messages; send it with --endpoint "
                                 "/v1/chat/completions")
            out.append(BenchRequest(r.request_id, r.arrival_s, None, r.max_tokens, None, tuple(r.messages)))
        elif r.prompt is not None:
            out.append(BenchRequest(r.request_id, r.arrival_s, r.prompt, r.max_tokens, n))
        elif chat:
            if tokenizer is None:
                raise ValueError("chat prompts of token ids need the model's tokenizer (give --tokenizer)")
            text = text_of_length(tokenizer, r.prompt_token_ids, len(r.prompt_token_ids))
            out.append(BenchRequest(r.request_id, r.arrival_s, text, r.max_tokens, n))
        else:
            out.append(BenchRequest(r.request_id, r.arrival_s, tuple(r.prompt_token_ids), r.max_tokens, n))
    return out


def prompt_ids(req: BenchRequest, endpoint: str, tokenizer: Any) -> tuple[int, ...] | None:
    """The token ids the server saw for this request, as far as the client can tell (None: unknown)."""
    if isinstance(req.prompt, tuple):
        return req.prompt
    if tokenizer is None:
        return None
    if endpoint.endswith("/chat/completions"):
        messages = req.messages or ({"role": "user", "content": req.prompt},)
        return tuple(tokenizer.encode_chat(list(messages)))
    return tuple(tokenizer.encode(req.prompt))


def probe_request(req: BenchRequest) -> BenchRequest:
    """A 1-token request shaped like req, to check the endpoint before the run."""
    if isinstance(req.prompt, tuple):
        return BenchRequest("bench-probe", 0.0, req.prompt[:1], 1, 1)
    return BenchRequest("bench-probe", 0.0, "Hi" if req.messages is None else None, 1, None,
                        None if req.messages is None else ({"role": "user", "content": "Hi"},))


def workload_request(req: BenchRequest, arrival_s: float, ids: tuple[int, ...], max_tokens: int) -> WorkloadRequest:
    """A simulator request standing for one sent request."""
    return WorkloadRequest(req.request_id, arrival_s, ids, max_tokens)
