"""Tokenizer, streaming detokenization and stop strings on the default model's vocab."""

from __future__ import annotations

import pytest

from backends.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer

# Rare characters gemma-3 spells with byte-fallback tokens (one token per UTF-8 byte),
# next to CJK, an emoji that is a single token, and combining/ASCII text.
MIXED_TEXT = "𠀋𠀍 𪚥 ꙮ 🫠 🦩 ‽ 𝔘𝔫𝔦 日本語のテキスト naïve café ᚠᛇᚻ 𓀀𓀁"


@pytest.fixture(scope="module")
def tokenizer(llama_model):
    return Tokenizer(llama_model)


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


def test_encode_decode_round_trip(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT, add_special=False)
    assert tokenizer.decode(ids) == MIXED_TEXT
    with_bos = tokenizer.encode("Hello", add_special=True)
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == tokenizer.encode("Hello", add_special=False)


def test_streaming_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT, add_special=False)
    split = [t for t in ids if _invalid_alone(tokenizer.token_to_bytes(t))]
    assert len(split) >= 10  # the text really exercises byte-level pieces
    pieces = _stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == MIXED_TEXT
    assert "" in pieces  # some tokens completed no character and were held back


def test_streaming_flush_reports_a_truncated_character(tokenizer):
    ids = tokenizer.encode("ok 𓀀", add_special=False)
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(t) for t in ids[:-1])
    assert text == "ok "
    assert detok.flush() == "\ufffd"  # the stream ended inside a character


def test_special_tokens_render_only_when_asked(tokenizer, llama_model):
    eot = 106
    assert eot in llama_model.eog_token_ids and tokenizer.is_eog(eot)
    assert IncrementalDetokenizer(tokenizer).push(eot) == ""
    assert IncrementalDetokenizer(tokenizer, special=True).push(eot) == "<end_of_turn>"


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages)
    # This GGUF carries no template: the gemma family falls back to llama.cpp's built-in one.
    assert text == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    ids = tokenizer.encode_chat(messages)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert 105 in ids and 106 in ids  # <start_of_turn>, <end_of_turn> parsed as single tokens
    assert tokenizer.apply_chat_template(messages, template="chatml").startswith("<|im_start|>user\nHi there")


@pytest.mark.parametrize(
    "pieces, expected, stopped",
    [
        (["Hello wor", "ld STO", "P and more"], "Hello world ", True),
        (["ab", "c"], "abc", False),
        (["x", "S", "T", "O", "P"], "x", True),
        (["no stop S", "TAR"], "no stop STAR", False),
        (["a\n\n", "b"], "a", True),
        (["STOPSTOP"], "", True),
    ],
)
def test_stop_strings_across_pieces(pieces, expected, stopped):
    matcher = StopStringMatcher(["STOP", "\n\n"])
    out, hit = [], False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    assert "".join(out) == expected and hit is stopped


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("result: 42 </ans") == ("result: 42 ", False)
    assert matcher.push("wer") == ("", False)
    assert matcher.push(">tail") == ("", True)
    assert matcher.stopped == "</answer>"
    assert matcher.push("more") == ("", True)
    other = StopStringMatcher(["</answer>"])
    assert other.push("a < b") == ("a < b", False)
    assert other.push(" </a") == (" ", False)
    assert other.push("bc") == ("</abc", False)


def test_streamed_tokens_with_stop_strings(tokenizer):
    text = "Answer: 日本語 then 𓀀 END and the rest"
    ids = tokenizer.encode(text, add_special=False)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["END"])
    out = []
    for t in ids:
        piece, hit = matcher.push(detok.push(t))
        out.append(piece)
        if hit:
            break
    assert "".join(out) == "Answer: 日本語 then 𓀀 "


def _invalid_alone(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
