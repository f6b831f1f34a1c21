"""serve.protocol and serve.render without a server: validation messages, sampling fields, SSE chunks."""

from __future__ import annotations

import json

import pytest

from serve.engine import Completion
from serve.protocol import (
    ChatRequest,
    CompletionRequest,
    ProtocolError,
    max_new_tokens,
    parse,
    sampling_params,
)
from serve.render import Chunker, ResponseMeta, usage_of
from serve.sim_backend import ByteTokenizer


@pytest.mark.parametrize(("kind", "body", "field"), [
    (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (CompletionRequest, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (CompletionRequest, {"max_tokens": 3}, "prompt"),
    (CompletionRequest, {"prompt": ["a", "b"]}, "prompt"),
    (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (CompletionRequest, {"prompt": "x", "echo": True}, "echo"),
    (ChatRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (ChatRequest, {"messages": []}, "messages"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
])
def test_bad_fields_get_one_line_naming_them(kind, body, field):
    with pytest.raises(ProtocolError) as err:
        req = parse(kind, body)
        req.one_prompt()
    assert err.value.status == 400 and err.value.param == field
    assert err.value.message.startswith(field + ":") and "\n" not in err.value.message
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_and_fields_map_to_sampling():
    req = parse(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_completion_tokens": 7, "max_tokens": 99, "top_k": -1, "stop": "END",
                              "seed": 5, "logprobs": True, "top_logprobs": 3, "ignore_eos": True,
                              "frequency_penalty": 0.5, "tool_choice": "none", "user": "u"})
    assert req.messages[0].text(0) == "hi"
    assert max_new_tokens(req, 10, 100) == 7  # max_completion_tokens wins
    sp = sampling_params(req, 7, index=2)
    assert (sp.max_tokens, sp.top_k, sp.stop, sp.seed, sp.logprobs, sp.ignore_eos) == (7, 0, ("END",), 7, 3, True)
    plain = parse(CompletionRequest, {"prompt": [5, 6, 7]})
    assert plain.one_prompt() == [5, 6, 7] and sampling_params(plain, 16).logprobs is None


def test_context_limits_name_max_model_len():
    req = parse(CompletionRequest, {"prompt": "x", "max_tokens": 50})
    with pytest.raises(ProtocolError, match=r"max_tokens: prompt \(60 tokens\) \+ max_tokens \(50\) = 110 exceeds "
                                            r"max_model_len \(100 tokens\); ask for at most 40"):
        max_new_tokens(req, 60, 100)
    chat = parse(ChatRequest, {"messages": [{"role": "user", "content": "x"}]})
    assert max_new_tokens(chat, 60, 100) == 40  # unset: what the context leaves
    with pytest.raises(ProtocolError, match="max_model_len"):
        max_new_tokens(chat, 100, 100)


def _comp(reason: str, n: int = 2, detail: str | None = None) -> Completion:
    return Completion("r", "", tuple(range(n)), reason, 5, n, 0.0, 0.1, 0.2, 3, detail)


def _events(lines: str) -> list[dict]:
    return [json.loads(x[len("data: "):]) for x in lines.split("\n\n") if x]


def test_chat_chunks_carry_role_with_first_token_and_finish_with_last():
    tok = ByteTokenizer()
    ch = Chunker(ResponseMeta("id1", 1, "m", True, tok), 1)
    first = _events(ch.lines([(0, "He", None)]))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    last = _events(ch.lines([(0, "llo", None), (0, _comp("length"), None)]))
    assert len(last) == 1  # the last piece and the finish are one chunk
    assert last[0]["choices"][0]["delta"] == {"content": "llo"}
    assert last[0]["choices"][0]["finish_reason"] == "length"
    eos = _events(ch.lines([(0, _comp("stop"), None)]))  # EOS: no text left, a bare finish chunk
    assert eos[0]["choices"][0]["delta"] == {} and eos[0]["choices"][0]["finish_reason"] == "stop"


def test_failed_finish_becomes_an_error_chunk():
    ch = Chunker(ResponseMeta("id2", 1, "m", False, ByteTokenizer()), 2)
    out = _events(ch.lines([(1, "ab", None), (1, _comp("abort", detail="server shutting down"), None)]))
    assert out[0]["choices"][0] == {"index": 1, "text": "ab", "logprobs": None, "finish_reason": None}
    assert out[1]["error"]["code"] == 503 and "server shutting down" in out[1]["error"]["message"]


def test_completion_logprobs_offsets_continue_across_chunks():
    tok = ByteTokenizer()
    ch = Chunker(ResponseMeta("id3", 1, "m", False, tok), 1)
    a = _events(ch.lines([(0, "hi", [(3 + ord("h"), -0.5, ((3 + ord("h"), -0.5),)),
                                      (3 + ord("i"), -0.25, ())])]))
    b = _events(ch.lines([(0, "!", [(3 + ord("!"), -1.0, ())])]))
    assert a[0]["choices"][0]["logprobs"]["text_offset"] == [0, 1]
    assert a[0]["choices"][0]["logprobs"]["top_logprobs"][1] == {"i": -0.25}  # the sampled token is always listed
    assert b[0]["choices"][0]["logprobs"] == {"tokens": ["!"], "token_logprobs": [-1.0], "top_logprobs": [{"!": -1.0}],
                                              "text_offset": [2]}


def test_usage_counts_the_prompt_once_and_cached_tokens_of_the_first_choice():
    class Sink:
        num_cached_tokens = 16

    u = usage_of([_comp("length", 3), _comp("length", 4)], [Sink(), Sink()], 40)
    assert u == {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
                 "prompt_tokens_details": {"cached_tokens": 16}}


def test_byte_tokenizer_round_trips_text():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "héllo\n"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[-len("assistant:"):] == tok.encode(
        "assistant:", add_special=False)


def test_batch_histogram_counts_many_observations_per_update():
    from serve.metrics import ServerMetrics

    m = ServerMetrics("m")
    m.inter_token_latency.observe(0.05, 7)  # on a bucket bound: counted in it (le)
    m.inter_token_latency.observe(0.051)
    text = m.exposition().decode()
    assert 'vllm:inter_token_latency_seconds_bucket{le="0.05",model_name="m"} 7.0' in text
    assert 'vllm:inter_token_latency_seconds_bucket{le="0.075",model_name="m"} 8.0' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="m"} 8.0' in text
