"""tokenstep serve --backend sim: the simulator behind the same API in real time.

Its steps last what the cost model prices (checked against the same scheduler run in virtual time); the
bounded queue answers 429 with Retry-After; SIGTERM past the grace period aborts with a stated reason and
the server still exits 0.
"""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from test_serve import client, free_port, metrics, start_server, stop_server

MODEL = "gemma3-270m"
PROMPT_IDS = list(range(1000, 1040))  # 40 token ids


@pytest.fixture(scope="module")
def sim():
    proc, url = start_server("--backend", "sim")
    yield proc, url
    assert stop_server(proc) == 0


def _predicted(url: str, prompt_len: int, max_tokens: int) -> list[float]:
    """Step prices of one request alone, from the server's own config and cost model, in virtual time."""
    from backends.cost import load_cost_model
    from backends.synthetic import SyntheticBackend
    from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
    from scheduler.loop import run_step

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        ts = json.loads(r.read())["data"][0]["tokenstep"]
    assert ts["backend"] == "sim" and ts["cost"]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ts["scheduler_config"].items()}
    sched = Scheduler(SchedulerConfig(**cfg), ts["policy"])
    backend = SyntheticBackend(load_cost_model(ts["cost"]))
    sched.add_request(Request("r", tuple(range(100, 100 + prompt_len)), SamplingParams(max_tokens=max_tokens)), 0.0)
    now, prices = 0.0, []
    while sched.has_unfinished():
        ran = run_step(sched, backend, now)
        if ran.result is not None and ran.plan.chunks:
            prices.append(ran.result.elapsed_s)
        now = ran.now_s
    return prices


def test_sim_timings_follow_the_cost_model(sim):
    url = sim[1]
    prices = _predicted(url, len(PROMPT_IDS), 24)
    stamps = []
    start = time.monotonic()
    for chunk in client(url).completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=24, stream=True,
                                                temperature=0.0):
        if chunk.choices and chunk.choices[0].text is not None:
            stamps.append(time.monotonic())
    e2e = stamps[-1] - start
    predicted = sum(prices)
    # not instant (the steps are slept out) and not much slower than priced (HTTP and the wake-up after idle)
    assert 0.9 * predicted <= e2e <= 1.3 * predicted + 0.1, (e2e, predicted)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    decode = statistics.median(prices[1:])
    assert statistics.median(gaps) == pytest.approx(decode, rel=0.3)


def test_sim_serves_the_same_api(sim):
    url = sim[1]
    api = client(url)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=1)
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    assert [e.logprob for e in chat.choices[0].logprobs.content] == [0.0] * 5  # deterministic tokens
    chunks = list(api.completions.create(model=MODEL, prompt="Hello", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    assert metrics(url)["vllm:generation_tokens_total"] >= 9


def test_queue_bound_answers_429_with_retry_after():
    proc, url = start_server("--backend", "sim", "--max-num-seqs", "1", "--max-queue", "1")
    try:
        api = client(url)
        results: dict[int, object] = {}

        def one(i: int) -> None:
            try:
                results[i] = api.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=30)
            except openai.RateLimitError as exc:
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(120)
        refused = [r for r in results.values() if isinstance(r, openai.RateLimitError)]
        served = [r for r in results.values() if not isinstance(r, Exception)]
        assert refused and served and len(refused) + len(served) == 4
        err = refused[0]
        assert err.status_code == 429 and int(err.response.headers["retry-after"]) >= 1
        assert err.body["type"] == "rate_limit_error" and "--max-queue" in err.message
        assert all(r.usage.completion_tokens == 30 for r in served)
        assert metrics(url)["tokenstep:num_requests_rejected_total"] == len(refused)
    finally:
        assert stop_server(proc) == 0


def test_sigterm_past_the_grace_period_aborts_with_a_reason_and_exits_0():
    proc, url = start_server("--backend", "sim", "--shutdown-timeout", "0.5")
    api = client(url)
    stream = api.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=2000, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as aborted:
        for _ in stream:
            pass
    assert "server shutting down" in aborted.value.message
    assert stop_server(proc, 30) == 0


def test_health_is_503_while_the_model_loads_then_200():
    import uvicorn

    from backends.cost import load_cost_model
    from scheduler import SchedulerConfig
    from serve.app import ServerInfo, ServerState, create_app
    from serve.engine import EngineCore
    from serve.sim_backend import ByteTokenizer, RealTimeSyntheticBackend

    loaded = threading.Event()

    def loader() -> EngineCore:
        loaded.wait(60)
        backend = RealTimeSyntheticBackend(load_cost_model("cpu-gemma3-270m"), SchedulerConfig(), ByteTokenizer())
        return EngineCore(backend)

    state = ServerState(ServerInfo(("m",), "sim", "continuous", "cpu-gemma3-270m", None), loader, None, 1.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status("/health") == 503 and status("/v1/models") == 503
        loaded.set()
        deadline = time.monotonic() + 30
        while status("/health") != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status("/health") == 200 and status("/v1/models") == 200
        out = client(url).completions.create(model="m", prompt="hi", max_tokens=3)
        assert out.choices[0].text and out.usage.completion_tokens == 3  # byte-level stand-in: ASCII text
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(30)


def test_n_choices_share_the_prompt_through_the_prefix_cache(sim):
    url = sim[1]
    api = client(url)
    prompt = list(range(2000, 2040))  # 40 tokens: two whole blocks to share
    before = metrics(url)
    out = api.completions.create(model=MODEL, prompt=prompt, max_tokens=5, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 15
    after = metrics(url)
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 2 * 32
    chunks = list(api.completions.create(model=MODEL, prompt=list(range(3000, 3040)), max_tokens=3, n=2,
                                         stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    assert sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason) == [0, 1]


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(sim):
    import http.client
    import socket

    url = sim[1]
    host, port = url.removeprefix("http://").split(":")
    before = metrics(url)['vllm:request_success_total{finished_reason="abort"}']
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT_IDS, "max_tokens": 2000}),
                 {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while metrics(url)["vllm:num_requests_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 10
    while metrics(url)["vllm:num_requests_running"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = metrics(url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m['vllm:request_success_total{finished_reason="abort"}'] == before + 1
