"""tokenstep bench against scripted servers on 127.0.0.1: metric definitions, failures, bad input.

The scripted server (aiohttp.web in a thread) streams tokens at set times, so the client's metrics have
known values. Timing tolerance: TOL_S = 40 ms. A chunk crosses loopback in well under a millisecond, but on
this shared 2-core machine the server's asyncio.sleep and the client's event loop can each wake up late by
a few to tens of milliseconds while other work runs. The scripted gaps differ from the values a wrong
definition would give by 100 ms or more (TTFT at the role-only chunk: -400 ms; E2EL at [DONE]: +300 ms;
GuideLLM's TPOT, E2EL / tokens = 0.8 / 4: +100 ms; TTFT counted as an ITL gap: mean +100 ms), so the
tolerance still tells every such definition apart. The definitions themselves are checked exactly, without a
network, in the calculate_metrics tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web

from serve.bench_client import BenchRun, RequestResult
from serve.bench_metrics import calculate_metrics, check_lengths, parse_goodput
from sim.cli import main

TOL_S = 0.040
TTFT_S = 0.50  # first token, after a role-only chunk at ROLE_S (chat)
ROLE_S = 0.10
GAPS_S = (0.05, 0.15, 0.10)  # between the 4 tokens: ITL mean 0.10, TPOT (0.30) / 3 = 0.10
TAIL_S = 0.30  # after the last token, before the usage chunk and [DONE]


class ScriptedServer:
    """An OpenAI-shaped streaming server with scripted timing and faults, on 127.0.0.1 in a thread."""

    def __init__(self, mode: str = "ok", chat: bool = True) -> None:
        self.mode, self.chat = mode, chat
        self.sent: dict[str, list[float]] = {}  # request id -> perf_counter of each token chunk sent
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        if chat:
            app.router.add_post("/v1/chat/completions", self.complete)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)  # cancels a hanging handler at close
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def complete(self, request):
        body = await request.json()
        self.bodies.append(body)
        rid = request.headers.get("x-request-id", "")
        index = int(rid[1:]) if rid[:1] == "r" and rid[1:].isdigit() else -1
        if (self.mode == "500" and index >= 0 and index % 2 == 1 or self.mode == "500probe" and index < 0
                or self.mode == "500all"):
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error",
                                                "code": 500}}, status=500)
        chat = request.path.endswith("/chat/completions")
        n = int(body["max_tokens"])
        if self.mode == "short":
            n -= 1  # a server that ignores the limit
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        t0 = time.perf_counter()
        times = self.sent.setdefault(rid, [])

        async def send(obj) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))

        if chat:
            await at(ROLE_S)
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        t = TTFT_S
        for i in range(n):
            await at(t)
            if self.mode == "reset" and index >= 0 and index % 2 == 1 and i == 2:
                request.transport.close()  # the connection drops mid-stream
                return resp
            if self.mode == "hang" and index == 1 and i == 1:
                await asyncio.sleep(3600)
            piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
            last = i == n - 1 and self.mode != "llama"
            await send({"choices": [{"index": 0, **piece, "finish_reason": "length" if last else None}]})
            times.append(time.perf_counter())
            t += GAPS_S[i % len(GAPS_S)]
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        if self.mode == "llama":  # llama-server: the finish reason and usage in one last chunk, no token in it
            await at(t - GAPS_S[(n - 1) % len(GAPS_S)] + 0.20)
            await send({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage})
            await send(b"[DONE]")
            return resp
        await at(t - GAPS_S[(n - 1) % len(GAPS_S)] + TAIL_S)
        await send({"choices": [], "usage": usage})
        await send(b"[DONE]")
        return resp


@pytest.fixture
def server(request):
    s = ScriptedServer(getattr(request, "param", "ok"))
    yield s
    s.close()


def bench(url: str, tmp_path, *extra: str, n: int = 4, quiet: bool = True) -> tuple[int, dict]:
    argv = ["bench", "--base-url", url, "--num-requests", str(n), "--rate", "50", "--prompt-len", "8",
            "--output-len", "4", "--out", str(tmp_path / "out"), "--no-plots", "--json",
            "--request-timeout", "5", *extra] + (["--quiet"] if quiet else [])
    code = main(argv)
    return code, (json.loads((tmp_path / "out" / "vllm_result.json").read_text()) if code == 0 else {})


# ---- definitions, exactly (no network) --------------------------------------------------------------------


def _result(rid: str, sent: float, tokens: list[float], end: float, n: int | None = None) -> RequestResult:
    r = RequestResult(rid, sent, len(tokens) if n is None else n, 8, sent_s=sent, token_times_s=tokens, end_s=end,
                      num_output_tokens=len(tokens) if n is None else n, success=True, finish_reason="length")
    return r


def test_metrics_follow_vllm_definitions_exactly():
    a = _result("a", 0.0, [0.3, 0.35, 0.5, 0.6], 0.6)  # (unrelated to the scripted server's timing)
    b = _result("b", 1.0, [1.1, 1.3], 1.3)
    run = BenchRun([a, b], 2.0, 0.0, 0)
    m = calculate_metrics(run, {"ttft": 250, "tpot": 150}, [50, 99], None)
    assert m["completed"] == 2 and m["failed"] == 0
    assert m["ttfts"] == pytest.approx([0.3, 0.1])
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT excludes the first token: (E2EL - TTFT) / (n - 1)
    assert m["mean_tpot_ms"] == pytest.approx(((0.6 - 0.3) / 3 + (0.3 - 0.1) / 1) / 2 * 1000)
    assert m["itls"][0] == pytest.approx([0.05, 0.15, 0.1]) and m["itls"][1] == pytest.approx([0.2])
    assert m["mean_itl_ms"] == pytest.approx(np_mean([0.05, 0.15, 0.1, 0.2]) * 1000)
    assert m["mean_e2el_ms"] == pytest.approx(450.0) and m["latencies"] == pytest.approx([0.6, 0.3])
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx((6 + 16) / 2)
    # goodput: a (TTFT 300 ms) misses ttft:250; b meets both (TPOT 200 ms > 150 misses!) -> 0 good
    assert m["request_goodput"] == pytest.approx(0.0)
    m2 = calculate_metrics(run, {"ttft": 350}, [99], None)
    assert m2["request_goodput"] == pytest.approx(1.0)
    assert m["max_concurrent_requests"] == 1


def np_mean(xs):
    return sum(xs) / len(xs)


def test_length_check_fails_a_server_that_ignores_the_limit():
    ok = _result("ok", 0.0, [0.1, 0.2], 0.2)
    short = _result("short", 0.0, [0.1], 0.1)
    long = _result("long", 0.0, [0.1, 0.2, 0.3], 0.3)
    for r in (ok, short, long):
        r.max_tokens = 2
    assert check_lengths([ok, short, long], ignore_eos=True) == 2
    assert ok.success and not short.success and not long.success
    assert "asked for 2 tokens with ignore_eos, received 1" in short.error
    short.success, long.success = True, True
    assert check_lengths([short, long], ignore_eos=False) == 1  # fewer is fine without ignore_eos; more is not
    assert short.success and not long.success


def test_goodput_flags_are_checked():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["ttft=500"], ["queue:5"], ["ttft:x"], ["ttft:1", "ttft:2"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


# ---- the same definitions over a real loopback stream -------------------------------------------------------


def test_chat_stream_metrics_match_the_script(server, tmp_path):
    code, m = bench(server.url, tmp_path, "--endpoint", "/v1/chat/completions", "--tokenizer", "gemma3-270m")
    assert code == 0 and m["completed"] == 4 and m["failed"] == 0
    assert m["output_lens"] == [4, 4, 4, 4]
    for ttft in m["ttfts"]:  # the first token, not the role-only chunk at 100 ms
        assert ttft == pytest.approx(TTFT_S, abs=TOL_S)
    for lat in m["latencies"]:  # the last token chunk, not [DONE] 300 ms later
        assert lat == pytest.approx(TTFT_S + sum(GAPS_S), abs=TOL_S)
    for gaps in m["itls"]:
        assert gaps == pytest.approx(list(GAPS_S), abs=TOL_S)
    assert m["mean_tpot_ms"] == pytest.approx(sum(GAPS_S) / 3 * 1000, abs=TOL_S * 1000)
    timed = {k: v for k, v in server.sent.items() if k != "bench-probe"}  # the 1-token endpoint check
    assert len(timed) == 4 and all(len(v) == 4 for v in timed.values())
    body = server.bodies[-1]
    assert body["ignore_eos"] is True and body["max_completion_tokens"] == 4 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and isinstance(body["messages"][0]["content"], str)


def test_completions_send_token_ids_and_vllm_fields(server, tmp_path, capsys):
    code, m = bench(server.url, tmp_path)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for field in ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                  "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "std_ttft_ms", "mean_tpot_ms", "p99_itl_ms",
                  "mean_e2el_ms", "itls", "ttfts", "input_lens", "output_lens", "errors", "duration"):
        assert field in m
    assert out["vllm"]["completed"] == 4 and "itls" not in out["vllm"]
    body = [b for b in server.bodies if b["max_tokens"] == 4][0]
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 8 and all(type(t) is int for t in body["prompt"])
    assert m["ttfts"][0] == pytest.approx(TTFT_S, abs=TOL_S)
    lines = (tmp_path / "out" / "requests.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["num_prompt_tokens"] == 8 and rec["num_output_tokens"] == 4 and rec["ttft_s"] > 0
    assert rec["e2e_s"] == pytest.approx(TTFT_S + sum(GAPS_S), abs=TOL_S)
    # the workload as sent replays with --trace: same ids, same lengths
    from sim.traces import load_trace

    replay = load_trace(tmp_path / "out" / "workload.jsonl", "jsonl")
    assert any(list(r.prompt_token_ids) == body["prompt"] for r in replay.requests)
    assert [r.request_id for r in replay.requests] == [json.loads(x)["request_id"] for x in lines]


@pytest.mark.parametrize("server", ["llama"], indirect=True)
def test_usage_beside_the_finish_reason_is_read(server, tmp_path):
    # llama-server's completions stream: no usage-only chunk; usage rides on the finish chunk, which has no token
    code, m = bench(server.url, tmp_path, n=2)
    assert code == 0 and m["completed"] == 2 and m["output_lens"] == [4, 4]
    for gaps, lat in zip(m["itls"], m["latencies"], strict=True):
        assert len(gaps) == 3  # the empty finish chunk is not a token
        assert lat == pytest.approx(TTFT_S + sum(GAPS_S) + 0.20, abs=TOL_S)  # E2EL: to the last choice chunk (vLLM)
    lines = [json.loads(x) for x in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert all(rec["output_count_source"] == "usage" for rec in lines)


def test_closed_loop_reports_client_queueing(server, tmp_path):
    code, m = bench(server.url, tmp_path, "--max-concurrency", "1", n=3)
    assert code == 0 and m["completed"] == 3
    # one at a time: each waits for the ones ahead (0.8 s of tokens + 0.3 s tail each) beyond its own arrival
    assert m["queue_times"][0] == pytest.approx(0.0, abs=TOL_S)
    assert m["queue_times"][2] > 1.0
    assert m["ttfts"][2] == pytest.approx(TTFT_S, abs=TOL_S)  # TTFT from the send, not the arrival
    assert "mean_client_queue_time_ms" in m and "mean_e2el_including_client_queue_ms" in m


# ---- failures: counted, listed, nothing hangs, exit 0 -------------------------------------------------------


@pytest.mark.parametrize("server", ["500", "reset"], indirect=True)
def test_failures_are_counted_and_listed(server, tmp_path, capsys):
    start = time.monotonic()
    code, m = bench(server.url, tmp_path, n=6, quiet=False)
    assert code == 0 and time.monotonic() - start < 30
    assert m["completed"] == 3 and m["failed"] == 3
    errors = [e for e in m["errors"] if e]
    want = "HTTP 500: scripted failure" if server.mode == "500" else "connection error"
    assert len(errors) == 3 and all(want in e for e in errors)
    report = capsys.readouterr().err
    assert "failed requests: 3" in report and "r00001" in report


@pytest.mark.parametrize("server", ["hang"], indirect=True)
def test_a_hanging_request_times_out(server, tmp_path):
    start = time.monotonic()
    code, m = bench(server.url, tmp_path, "--request-timeout", "2", n=3)
    assert code == 0 and time.monotonic() - start < 30
    assert m["failed"] == 1 and "timed out after 2 s" in m["errors"][1]


@pytest.mark.parametrize("server", ["short"], indirect=True)
def test_a_server_ignoring_the_limit_is_reported_not_averaged(server, tmp_path, capsys):
    code, m = bench(server.url, tmp_path, n=2, quiet=False)
    assert code == 0 and m["completed"] == 0 and m["failed"] == 2
    assert "asked for 4 tokens with ignore_eos, received 3" in m["errors"][0]
    assert m["mean_ttft_ms"] is None
    assert "not averaged in" in capsys.readouterr().err


# ---- bad input: exit 2 with one line ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_exits_2(tmp_path, capsys):
    code = main(["bench", "--base-url", f"http://127.0.0.1:{_free_port()}", "--num-requests", "2",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach a server at" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_endpoint_exits_2(tmp_path, capsys):
    s = ScriptedServer(chat=False)
    try:
        code = main(["bench", "--base-url", s.url, "--endpoint", "/v1/chat/completions", "--num-requests", "2",
                     "--tokenizer", "gemma3-270m", "--out", str(tmp_path / "o"), "--quiet"])
    finally:
        s.close()
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 404" in err and "--endpoint /v1/completions" in err


@pytest.mark.parametrize("argv", [["--endpoint", "/v1/embeddings"], ["--goodput", "ttft=5"],
                                  ["--base-url", "localhost:8000"], ["--max-num-seqs", "4"],
                                  ["--metric-percentiles", "0"]])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
    code = main(["bench", "--num-requests", "2", "--out", str(tmp_path / "o"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip()


@pytest.mark.parametrize("server", ["500probe"], indirect=True)
def test_a_server_error_on_the_endpoint_check_does_not_stop_the_run(server, tmp_path, capsys):
    code, m = bench(server.url, tmp_path, n=2, quiet=False)
    assert code == 0 and m["completed"] == 2
    assert "warning: a 1-token test request" in capsys.readouterr().err


def test_max_duration_bounds_the_run(server, tmp_path):
    # 8 requests at 4 req/s arrive over ~2 s; each streams for 0.8 s (+0.3 s tail): at 0.5 s nothing has finished
    start = time.monotonic()
    code, m = bench(server.url, tmp_path, "--rate", "4", "--max-duration", "0.5", "--num-warmups", "1", n=8)
    assert code == 0 and time.monotonic() - start < 10
    assert m["completed"] == 0 and m["failed"] >= 1 and len(m["errors"]) < 8  # later arrivals were never sent
    assert all("cut off at --max-duration 0.5 s" in e for e in m["errors"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["measured"]["num_not_sent"] == 8 - len(m["errors"])


def test_server_config_from_models_metadata():
    from serve.bench_predict import server_config, tokenstep_meta

    models = {"data": [{"id": "m", "tokenstep": {"backend": "llama", "policy": "continuous", "scheduler_config": {
        "max_num_seqs": 4, "max_num_batched_tokens": 256, "eos_token_ids": [1], "a_future_field": 3}}}]}
    meta = tokenstep_meta(models)
    config = server_config(meta)
    assert config.max_num_seqs == 4 and config.max_num_batched_tokens == 256 and config.eos_token_ids == (1,)
    with pytest.raises(ValueError, match="scheduler_config is not usable"):
        server_config({"scheduler_config": {"max_num_seqs": 0}})
    assert tokenstep_meta({"data": [{"id": "llama"}]}) is None


@pytest.mark.parametrize("server", ["short"], indirect=True)
def test_prediction_replays_but_leaves_out_wrong_counts(server, tmp_path):
    code, m = bench(server.url, tmp_path, "--predict", n=2)
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    predicted = summary["predicted"]
    # the server ran both requests (with 3 tokens each): the simulator does too, and both stay out of the stats
    assert predicted["num_requests"] == 2 and predicted["num_finished"] == 0 and predicted["num_errors"] == 2
    assert summary["prediction"]["config_from"].startswith("flags and defaults")


@pytest.mark.parametrize("server", ["500all"], indirect=True)
def test_prediction_with_nothing_completed_keeps_the_results(server, tmp_path, capsys):
    code, m = bench(server.url, tmp_path, "--predict", n=2, quiet=False)
    assert code == 0 and m["failed"] == 2
    assert "no prediction: no request succeeded" in capsys.readouterr().err


def test_bad_prediction_flags_exit_2_before_any_request(server, tmp_path, capsys):
    code, _ = bench(server.url, tmp_path, "--predict", "--cost", "no-such-profile", n=2)
    assert code == 2 and "no-such-profile" in capsys.readouterr().err
    assert server.bodies == []  # not even the endpoint check went out


def test_prediction_takes_the_servers_prompt_length():
    from serve.bench_client import BenchRequest
    from serve.bench_predict import prediction_workload

    ids = tuple(range(20, 30))
    reqs = [BenchRequest("a", 0.0, ids, 4, 10), BenchRequest("b", 0.5, ids, 4, 10), BenchRequest("c", 0.7, ids, 4, 10)]
    results = [_result("a", 1.0, [1.1, 1.2, 1.3, 1.4], 1.4), _result("b", 1.5, [1.6, 1.7, 1.8, 1.9], 1.9),
               _result("c", 1.6, [1.7, 1.8, 1.9, 2.0], 2.0)]
    results[0].num_prompt_tokens, results[1].num_prompt_tokens, results[2].num_prompt_tokens = 12, 6, 10
    w, notes = prediction_workload(reqs, results, "/v1/completions", None, True, 0)
    a, b, c = w.requests
    assert len(a.prompt_token_ids) == 12 and a.prompt_token_ids[:10] == ids  # the server added 2 (a template)
    assert b.prompt_token_ids == ids[:6] and c.prompt_token_ids == ids
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 0.5, 0.6])  # send times, from the first send
    assert any("2 prompt(s) cut or padded" in n for n in notes)
