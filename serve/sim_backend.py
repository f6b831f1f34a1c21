"""`tokenstep serve --backend sim`: the simulator's backend in real time, behind the same API.

Steps are priced by a cost model and last exactly that long (the engine thread sleeps out the rest);
token ids are synthetic (backends.synthetic: deterministic per request, never an EOS, so every request
runs to max_tokens). Text goes through the real model's tokenizer when llama-cpp-python and the model
file are there (a vocab-only load: no weights), else through ByteTokenizer, a deterministic byte-level
stand-in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from scheduler import SchedulerConfig
from scheduler.messages import StepPlan, StepResult

# Back-to-back steps leave this much time between them (the engine's own work); waits longer than this are idle
# time, which the cost model's wake-up prices.
BACK_TO_BACK_S = 0.002


class ByteTokenizer:
    """Deterministic byte-level stand-in: ids 0-2 are pad, BOS, EOS; id 3 + b is the byte b.

    Synthetic outputs are drawn from ids below BYTE_OUTPUT_VOCAB (ASCII); control bytes other than tab and
    newline render as a space.
    """

    name = "byte-level stand-in"
    bos_token_id = 1
    eog_token_ids = (2,)
    vocab_size = 3 + 256
    output_vocab_size = 3 + 128

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """BOS, then one id per UTF-8 byte."""
        return ([self.bos_token_id] if add_special else []) + [3 + b for b in text.encode("utf-8")]

    def token_to_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The byte of an id (specials and printable-unsafe control bytes as described above)."""
        b = token_id - 3
        if not 0 <= b < 256:
            return b""
        if (b < 32 and b not in (9, 10)) or b == 127:
            return b" "
        return bytes((b,))

    def decode(self, token_ids: Sequence[int], *, special: bool = False) -> str:
        """Text of ids."""
        return b"".join(self.token_to_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        """True for the EOS id."""
        return token_id in self.eog_token_ids

    def encode_chat(self, messages: Iterable[Mapping[str, str]], **kwargs: object) -> list[int]:
        """A plain 'role: content' transcript ending with 'assistant:'."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)


class _VocabOnlyModel:
    """The parts of backends.models.LlamaModel a Tokenizer reads, from a vocab-only load (no weights)."""

    def __init__(self, path: Any) -> None:
        import llama_cpp as L

        from backends.models import _install_llama_logging, llama_log_tail

        _install_llama_logging()  # llama.cpp's load log goes to Python logging, as for a full model
        params = L.llama_model_default_params()
        params.vocab_only = True
        ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ValueError(f"llama.cpp could not read the vocabulary of {path}: {' | '.join(llama_log_tail(3))}")
        self.ptr, self.path = ptr, path
        self.vocab = L.llama_model_get_vocab(ptr)
        self.vocab_size = L.llama_vocab_n_tokens(self.vocab)
        self.eog_token_ids = tuple(t for t in range(self.vocab_size) if L.llama_vocab_is_eog(self.vocab, t))
        self.bos_token_id = L.llama_vocab_bos(self.vocab)
        template = L.llama_model_chat_template(ptr, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.architecture = self._meta(L, "general.architecture") or ""
        self.name = self._meta(L, "general.name") or path.stem
        self.closed = False

    def _meta(self, L: Any, key: str) -> str | None:  # noqa: N803 - the llama_cpp module
        import ctypes

        buf = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")


def load_tokenizer(model: str | None) -> tuple[Any, str, str | None]:
    """(tokenizer, description, model path or None): the model's own vocabulary if it can be read, else bytes."""
    try:
        from backends.models import DEFAULT_MODEL, resolve_model
        from backends.text import Tokenizer

        path = resolve_model(model or DEFAULT_MODEL)
        vocab = _VocabOnlyModel(path)
    except (ImportError, ValueError, OSError) as exc:
        if model is not None:
            raise ValueError(f"--model {model}: cannot read its vocabulary for --backend sim ({exc})") from None
        return ByteTokenizer(), "byte-level stand-in (llama-cpp-python or the default model is not available)", None
    return Tokenizer(vocab), f"{vocab.name} vocabulary (vocab-only load of {path.name})", str(path)


class RealTimeSyntheticBackend:
    """A SyntheticBackend whose steps take the time its cost model prices (the engine thread sleeps it out)."""

    def __init__(self, cost_model: Any, config: SchedulerConfig, tokenizer: Any) -> None:
        from backends.synthetic import SyntheticBackend

        vocab = getattr(tokenizer, "output_vocab_size", tokenizer.vocab_size)
        self.inner = SyntheticBackend(cost_model, vocab_size=vocab, eos_token_id=-1)
        self.config = replace(config, eos_token_ids=())  # synthetic tokens never end a request early
        self.tokenizer = tokenizer
        self.cost_model = cost_model

    def scheduler_config(self, **overrides: Any) -> SchedulerConfig:
        """The configured limits, overrides on top."""
        return replace(self.config, **overrides) if overrides else self.config

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop finished requests' token counters."""
        self.inner.forget(request_ids)

    def step(self, plan: StepPlan) -> StepResult:
        """Price the plan, sleep until that much time has passed since the step began, return its tokens."""
        t0 = time.perf_counter()
        inner = self.inner
        if inner.end_s is not None and 0.0 <= plan.now_s - inner.end_s < BACK_TO_BACK_S:
            inner.end_s = plan.now_s  # back to back: no idle wake-up to charge
        result = inner.step(plan)
        logprobs = None
        for c in plan.chunks:
            if c.sample and c.sampling is not None and c.sampling.logprobs is not None:
                token = result.sampled_token_ids.get(c.request_id)
                if token is not None:  # a deterministic token has probability 1
                    logprobs = logprobs or {}
                    logprobs[c.request_id] = (0.0, ((token, 0.0),) if c.sampling.logprobs else ())
        remaining = result.elapsed_s - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        return replace(result, logprobs=logprobs) if logprobs else result

    def close(self) -> None:
        """Nothing to free."""
