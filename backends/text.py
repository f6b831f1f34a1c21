"""Text around token ids: a Tokenizer over a model's vocab, streaming detokenization, stop strings."""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Iterable, Mapping, Sequence

import llama_cpp as L

from .models import LlamaModel

# Models whose GGUF lacks a chat template, mapped to llama.cpp's built-in template of their family.
FALLBACK_CHAT_TEMPLATES: dict[str, str] = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


class Tokenizer:
    """Tokenize, detokenize and apply chat templates with a loaded model's vocabulary."""

    def __init__(self, model: LlamaModel) -> None:
        if model.closed:
            raise ValueError("the LlamaModel is closed")
        self.model = model
        self._vocab = model.vocab
        self.vocab_size = model.vocab_size
        self.bos_token_id = model.bos_token_id
        self.eog_token_ids = model.eog_token_ids
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text; add_special adds BOS as the model wants, parse_special reads <tags>."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def token_to_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token's piece (may be part of a UTF-8 character)."""
        key = (token_id, special)
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
            piece = buf.raw[:n]
            self._pieces[key] = piece
        return piece

    def decode(self, token_ids: Sequence[int], *, special: bool = False) -> str:
        """Text of token_ids (llama_detokenize); special=True renders control tokens such as <eos>."""
        n_ids = len(token_ids)
        ids = (L.llama_token * max(n_ids, 1))(*token_ids)
        cap = 16 * n_ids + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_detokenize(self._vocab, ids, n_ids, buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n

    def is_eog(self, token_id: int) -> bool:
        """True for end-of-generation tokens (llama_vocab_is_eog)."""
        return bool(L.llama_vocab_is_eog(self._vocab, token_id))

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        template: str | None = None,
    ) -> str:
        """Render {'role', 'content'} messages with the model's template (or a named built-in one)."""
        tmpl = template or self.model.chat_template or FALLBACK_CHAT_TEMPLATES.get(self.model.architecture)
        if tmpl is None:
            builtin = ", ".join(builtin_chat_templates())
            raise ValueError(f"{self.model.name} has no chat template; pass template= one of: {builtin}")
        msgs = list(messages)
        keep = [(m["role"].encode(), m["content"].encode()) for m in msgs]
        chat = (L.llama_chat_message * max(len(keep), 1))()
        for i, (role, content) in enumerate(keep):
            chat[i].role = role
            chat[i].content = content
        cap = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_chat_apply_template(tmpl.encode(), chat, len(keep), add_generation_prompt, buf, cap)
            if n < 0:
                raise ValueError(f"llama.cpp does not support the chat template {tmpl[:60]!r}")
            if n <= cap:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = n

    def encode_chat(self, messages: Iterable[Mapping[str, str]], **kwargs: object) -> list[int]:
        """Token ids of a chat prompt: the template applied, special tags parsed, BOS added."""
        text = self.apply_chat_template(messages, **kwargs)  # type: ignore[arg-type]
        ids = self.encode(text, add_special=True, parse_special=True)
        if len(ids) > 1 and ids[0] == ids[1] == self.bos_token_id:
            ids = ids[1:]  # the template already wrote <bos>
        return ids


def builtin_chat_templates() -> list[str]:
    """Names of llama.cpp's built-in chat templates."""
    n = L.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    L.llama_chat_builtin_templates(arr, n)
    return [s.decode() for s in arr if s]


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        # The incremental decoder holds back the bytes of an unfinished character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is incomplete)."""
        return self._decoder.decode(self.tokenizer.token_to_bytes(token_id, special=self.special))

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (invalid bytes become U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopStringMatcher:
    """Find stop strings across streamed pieces, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None  # the stop string found, once found

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, True once a stop string was seen)."""
        if self.stopped is not None:
            return "", True
        buf = self._held + text
        cut, hit = -1, None
        for stop in self.stops:
            i = buf.find(stop)
            if i != -1 and (cut == -1 or i < cut):
                cut, hit = i, stop
        if hit is not None:
            self.stopped = hit
            self._held = ""
            return buf[:cut], True
        keep = self._hold_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def _hold_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Text held back when the stream ends without a stop string."""
        out, self._held = self._held, ""
        return out
