"""tokenstep bench against a live tokenstep serve (a subprocess on 127.0.0.1): the simulator behind the API,
and the real default model. Every request completes, the result file carries vLLM's fields, and --predict
prints the simulator's errors. Small on purpose: a few requests, short outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from serve_proc import wait_ready

from sim.cli import main

VLLM_FIELDS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
               "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
               "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
               "mean_e2el_ms", "p99_e2el_ms", "input_lens", "output_lens", "ttfts", "itls", "latencies", "errors",
               "generated_texts", "max_concurrent_requests")
READY_TIMEOUT_S = 180  # the real model loads in a few seconds, far slower while other work shares the cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str, proc: subprocess.Popen) -> None:
    wait_ready(url, proc, READY_TIMEOUT_S)


def _serve(*flags: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "serve", "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def sim_server():
    yield from _serve("--backend", "sim", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def llama_server():
    yield from _serve("--backend", "llama", "--max-num-seqs", "4", "--kv-tokens", "1024", "--threads", "2")


def _bench(url: str, tmp_path, *extra: str) -> tuple[int, dict, dict, str]:
    out = tmp_path / "out"
    code = main(["bench", "--base-url", url, "--out", str(out), "--no-plots", "--json", *extra])
    return code, json.loads((out / "vllm_result.json").read_text()), json.loads((out / "summary.json").read_text()), \
        str(out)


def _check(code: int, vllm: dict, summary: dict, n: int, output_len: int) -> None:
    assert code == 0
    assert vllm["completed"] == n and vllm["failed"] == 0, vllm["errors"]
    for field in VLLM_FIELDS:
        assert field in vllm, field
    assert vllm["output_lens"] == [output_len] * n
    assert all(t > 0 for t in vllm["ttfts"]) and vllm["mean_tpot_ms"] > 0
    assert summary["server"]["backend"] in ("sim", "llama")  # read from /v1/models


def test_bench_sim_server_with_prediction(sim_server, tmp_path, capsys):
    code, vllm, summary, _ = _bench(sim_server, tmp_path, "--num-requests", "6", "--rate", "8", "--prompt-len", "40",
                                    "--output-len", "6", "--shared-prefix", "32", "--predict")
    _check(code, vllm, summary, 6, 6)
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["rel_error"]["TTFT mean"] is not None and doc["rel_error"]["throughput"] is not None
    assert "simulator's prediction" in captured.err and "configuration from the server's /v1/models" in captured.err
    assert summary["prediction"]["policy"] == "continuous" and summary["prediction"]["scheduler"]["max_num_seqs"] == 8
    # the shared 32-token prefix is served from the prefix cache after its first use
    lines = [json.loads(x) for x in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert sum(rec["num_cached_tokens"] or 0 for rec in lines) > 0


def test_bench_sim_server_chat_text_prompts(sim_server, tmp_path):
    code, vllm, summary, _ = _bench(sim_server, tmp_path, "--endpoint", "/v1/chat/completions", "--num-requests",
                                    "3", "--rate", "8", "--prompt-len", "30", "--output-len", "4",
                                    "--max-concurrency", "2")
    _check(code, vllm, summary, 3, 4)
    # 30 tokens of text, plus the few the chat template adds
    assert all(30 <= n <= 45 for n in vllm["input_lens"]), vllm["input_lens"]


def test_bench_real_server_with_prediction(llama_server, tmp_path, capsys):
    code, vllm, summary, _ = _bench(llama_server, tmp_path, "--num-requests", "3", "--rate", "4", "--prompt-len",
                                    "16", "--output-len", "4", "--predict")
    _check(code, vllm, summary, 3, 4)
    assert summary["server"]["backend"] == "llama"
    assert vllm["input_lens"] == [16, 16, 16]  # token-id prompts reach the model unchanged
    captured = capsys.readouterr()
    assert "simulator's prediction" in captured.err and "%" in captured.err
    assert json.loads(captured.out)["rel_error"]["E2E mean"] is not None


def test_bench_payloads_parse_as_the_server_reads_them():
    # the load generator's bodies go through tokenstep serve's own request models unchanged
    from serve.bench_client import BenchRequest, build_payload
    from serve.protocol import ChatRequest, CompletionRequest, parse

    ids = BenchRequest("r1", 0.0, (11, 12, 13), 7, 3)
    req = parse(CompletionRequest, build_payload("/v1/completions", "m", ids, True, {"temperature": 0}))
    assert req.one_prompt() == [11, 12, 13] and req.max_tokens == 7 and req.ignore_eos and req.include_usage()
    assert req.temperature == 0
    text = BenchRequest("r2", 0.0, "hello there", 5, 2)
    chat = parse(ChatRequest, build_payload("/v1/chat/completions", "m", text, False, None))
    assert chat.messages[0].text(0) == "hello there" and chat.max_completion_tokens == 5 and not chat.ignore_eos
