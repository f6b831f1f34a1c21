"""tokenstep serve on the real default model, checked with the official openai client over 127.0.0.1.

One server (a subprocess) for the module; requests are small (short prompts, max_tokens <= 16). The last
test stops it with SIGTERM while a stream is in flight.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from serve_proc import wait_ready

READY_TIMEOUT_S = 240  # loads in seconds; far slower while other work shares the cores
MODEL = "gemma3-270m"
GREEDY = {"temperature": 0.0, "model": MODEL}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, stderr_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """`tokenstep serve` as a subprocess on a free port, once /health answers 200."""
    port = free_port()
    err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "serve", "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, READY_TIMEOUT_S)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then wait; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def metrics(url: str) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            key = re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{").replace("{}", "")
            out[key] = float(value)
    return out


def client(url: str) -> openai.OpenAI:
    """The official client, no retries (a 429 must reach the test)."""
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-num-seqs", "8", "--kv-tokens", "4096", "--max-queue", "64")
    yield proc, url
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope="module")
def api(server):
    return client(server[1])


def test_completion_plain_and_streamed_agree(api):
    prompt = "The capital of France is"
    full = api.completions.create(prompt=prompt, max_tokens=8, **GREEDY)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert 1 <= full.usage.completion_tokens <= 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(api.completions.create(prompt=prompt, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    body = chunks[:-1]
    assert "".join(c.choices[0].text for c in body) == choice.text  # alone both times: the same batch, same tokens
    assert body[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.usage is None for c in body)


def test_prompt_as_token_ids(api):
    by_text = api.completions.create(prompt="Hello, my name is", max_tokens=6, logprobs=0, **GREEDY)
    ids = [2, 9259, 236764, 1041, 1463, 563]  # <bos> "Hello, my name is" in gemma-3's vocabulary
    by_ids = api.completions.create(prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_streams_role_with_first_token(api):
    messages = [{"role": "user", "content": "Name a colour."}]
    full = api.chat.completions.create(messages=messages, max_tokens=8, **GREEDY)
    assert full.choices[0].message.role == "assistant"
    assert full.object == "chat.completion"
    chunks = list(api.chat.completions.create(messages=messages, max_tokens=8, stream=True, **GREEDY))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content  # no empty chunk ahead of the first token
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_max_tokens_and_max_completion_tokens(api):
    messages = [{"role": "user", "content": "Count to twenty."}]
    a = api.chat.completions.create(messages=messages, max_completion_tokens=3, extra_body={"ignore_eos": True},
                                    **GREEDY)
    b = api.chat.completions.create(messages=messages, max_tokens=5, extra_body={"ignore_eos": True}, **GREEDY)
    assert (a.usage.completion_tokens, a.choices[0].finish_reason) == (3, "length")
    assert (b.usage.completion_tokens, b.choices[0].finish_reason) == (5, "length")


def test_stop_string_ends_the_text_before_it(api):
    prompt = "One, two, three, four, five, six,"
    free = api.completions.create(prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY)
    text = free.choices[0].text
    words = [w for w in re.findall(r"\w+", text) if len(w) >= 3]
    assert words, f"greedy text {text!r} has no word to stop on"
    stop = words[1] if len(words) > 1 else words[0]
    cut = api.completions.create(prompt=prompt, max_tokens=12, stop=[stop, "never-there"], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = list(api.completions.create(prompt=prompt, max_tokens=12, stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(api):
    comp = api.completions.create(prompt="The sky is", max_tokens=4, logprobs=3, **GREEDY)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert "".join(lp.tokens) == comp.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert chosen >= max(top.values()) - 1e-6  # greedy: the chosen token is the most likely
    chat = api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True,
                                       top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                                logprobs=True, top_logprobs=2, stream=True, **GREEDY))
    got = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == pytest.approx([e.logprob for e in content])
    plain = api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_n_choices(api):
    out = api.completions.create(model=MODEL, prompt="A short poem:", max_tokens=6, n=3, temperature=1.0, seed=7,
                                 extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 18 and out.usage.prompt_tokens < 10
    again = api.completions.create(model=MODEL, prompt="A short poem:", max_tokens=6, n=3, temperature=1.0, seed=7,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: repeatable
    chunks = list(api.completions.create(prompt="A short poem:", max_tokens=4, n=2, stream=True, **GREEDY,
                                         extra_body={"ignore_eos": True}))
    for i in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == i]
        assert mine and mine[-1].choices[0].finish_reason == "length"


def test_cached_tokens_under_a_shared_system_prompt(api):
    system = ("You are a terse assistant for the tokenstep cached-token test. " * 6).strip()
    ask = [{"role": "system", "content": system}]
    first = api.chat.completions.create(messages=ask + [{"role": "user", "content": "Hello."}], max_tokens=2,
                                        **GREEDY)
    second = api.chat.completions.create(messages=ask + [{"role": "user", "content": "Goodbye."}], max_tokens=2,
                                         **GREEDY)
    assert first.usage.prompt_tokens >= 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 48 <= cached < second.usage.prompt_tokens and cached % 16 == 0  # whole blocks of the shared prefix


def test_errors_in_openai_shape(api, server):
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert bad.value.status_code == 400 and "max_tokens" in bad.value.message
    assert bad.value.body["code"] == 400 and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        api.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    assert "max_model_len" in long.value.message and "\n" not in long.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "no-such-model" in missing.value.message
    ok = api.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"no_such_field": 1, "priority": 3})
    assert ok.usage.completion_tokens == 1  # unknown fields are ignored
    req = urllib.request.Request(server[1] + "/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=30)
    assert raw.value.code == 400 and b'"error"' in raw.value.read()


def test_models_and_health(server):
    import json

    with urllib.request.urlopen(server[1] + "/v1/models", timeout=10) as r:
        body = json.loads(r.read())
    model = body["data"][0]
    assert model["id"] == "gemma3-270m" and model["object"] == "model"
    ts = model["tokenstep"]
    assert ts["backend"] == "llama" and ts["policy"] == "continuous" and ts["cost"] is None
    assert ts["scheduler_config"]["max_num_seqs"] == 8 and ts["n_ctx"] >= 4096
    assert ts["model_path"].endswith(".gguf")
    with urllib.request.urlopen(server[1] + "/health", timeout=10) as r:
        assert r.status == 200


def test_eight_concurrent_streams_share_steps(api, server):
    before = metrics(server[1])
    spans: dict[int, tuple[float, float, int]] = {}

    def one(i: int) -> None:
        stream = api.completions.create(prompt=f"Story number {i}:", max_tokens=12, stream=True,
                                        extra_body={"ignore_eos": True}, **GREEDY)
        times = [time.monotonic() for c in stream if c.choices and c.choices[0].text]
        spans[i] = (times[0], times[-1], len(times))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(spans) == 8
    assert max(s[0] for s in spans.values()) < min(s[1] for s in spans.values())  # all eight were live at once
    after = metrics(server[1])
    steps = after["tokenstep:batch_size_count"] - before["tokenstep:batch_size_count"]
    alone = after['tokenstep:batch_size_bucket{le="1.0"}'] - before['tokenstep:batch_size_bucket{le="1.0"}']
    assert steps - alone > 0  # some steps ran several requests together
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] >= 8 * 12
    itls = after["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"]
    assert itls == 8 * 11  # one gap between each request's consecutive tokens
    assert after["vllm:num_requests_running"] == 0


def test_disconnect_frees_the_request(server):
    import http.client
    import json

    url = server[1]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"prompt": "Tell me everything.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:
        line = resp.fp.readline()
        seen += line.startswith(b"data: {")
    assert metrics(url)["vllm:num_requests_running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.2)
    m = metrics(url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m['vllm:request_success_total{finished_reason="abort"}'] >= 1
    assert m["vllm:generation_tokens_total"] > 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    proc, url = server
    api = client(url)
    got: dict[str, object] = {}

    def stream() -> None:
        chunks = list(api.completions.create(prompt="Once upon a time", max_tokens=10, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}, **GREEDY))
        got["chunks"] = chunks

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 120
    while metrics(url)["vllm:num_requests_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert stop_server(proc) == 0
    t.join(60)
    chunks = got["chunks"]
    assert chunks[-1].usage.completion_tokens == 10  # nothing lost: the stream ran to its end
    assert chunks[-2].choices[0].finish_reason == "length"
