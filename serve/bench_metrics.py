"""The load generator's metrics, with vLLM `bench serve`'s definitions and result field names.

Per request (seconds on the client's clock; see serve.bench_client for what a token chunk is):
- TTFT: the POST going out to the first token chunk arriving.
- E2EL: the POST going out to the last chunk carrying a choice (vLLM's ``latency``).
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with two or more output tokens.
- ITL: the gaps between consecutive token chunks, pooled over requests.
- client queue time: the workload's arrival to the POST (non-zero only under --max-concurrency).

Over the run (duration: the first send until every request has ended):
- completed: requests that succeeded with the token count they asked for; failed: every other request sent
  (HTTP errors, resets, timeouts, and servers that sent another number of tokens than asked);
- request_throughput = completed / duration; output_throughput = their output tokens / duration;
  total_token_throughput adds their prompt tokens; request_goodput = completed requests meeting every
  --goodput bound / duration (a request with one token has TPOT 0 for goodput, as in vLLM);
- mean, median, std and the --metric-percentiles of TTFT, TPOT, ITL and E2EL, in milliseconds. vLLM writes 0
  for a statistic with no data; this writes null.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from serve.bench_client import BenchRun, RequestResult

MS = 1000.0
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
# (key, name in the table, section title), in vLLM's order
METRIC_SECTIONS = (("ttft", "TTFT", "Time to First Token"),
                   ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                   ("itl", "ITL", "Inter-token Latency"),
                   ("e2el", "E2EL", "End-to-end Latency"))
QUEUE_SECTIONS = (("client_queue_time", "Client Queue Time", "Client-side Queueing"),
                  ("e2el_including_client_queue", "E2EL incl. Client Queue", "Queue-inclusive End-to-end Latency"))


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """--goodput ttft:MS tpot:MS e2el:MS -> {"ttft": MS, ...}; ValueError naming a bad item."""
    out: dict[str, float] = {}
    for item in items or ():
        key, sep, raw = str(item).partition(":")
        key = key.strip().lower()
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MILLISECONDS with KEY one of "
                             f"{', '.join(GOODPUT_KEYS)}, e.g. ttft:500 tpot:50")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {raw!r} is not a number of milliseconds") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--goodput {item!r}: the bound must be a number of milliseconds >= 0")
        if key in out:
            raise ValueError(f"--goodput {item!r}: {key} is given twice")
        out[key] = value
    return out


def parse_percentiles(text: str) -> list[float]:
    """--metric-percentiles "50,90,99" -> [50.0, 90.0, 99.0]; ValueError outside (0, 100]."""
    values = []
    for item in (t.strip() for t in str(text).split(",")):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--metric-percentiles {text!r}: {item!r} is not a number; write e.g. 50,90,99") from None
        if not 0 < value <= 100:
            raise ValueError(f"--metric-percentiles {text!r}: {item} is outside (0, 100]")
        values.append(value)
    return values


def check_lengths(results: Sequence[RequestResult], ignore_eos: bool) -> int:
    """Fail successful requests whose token count is not what was asked (more than max_tokens, or fewer
    while lengths are forced with ignore_eos); return how many. They are reported, not averaged in."""
    count = 0
    for r in results:
        if not r.success:
            continue
        n, want = r.num_output_tokens, r.max_tokens
        if n > want or (ignore_eos and n != want):
            r.success, r.length_mismatch = False, True
            r.error = (f"output length: asked for {want} tokens{' with ignore_eos' if ignore_eos else ''}, "
                       f"received {n} (counted from {r.output_count_source}, finish_reason {r.finish_reason})")
            count += 1
    return count


def _stats(name: str, values: list[float], percentiles: Sequence[float]) -> dict:
    """mean/median/std/pXX of values (seconds) in ms, vLLM's key names; None where there is no data."""
    arr = np.asarray(values, dtype=float)
    out = {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None}
    for p in percentiles:
        out[f"p{_p_word(p)}_{name}_ms"] = None
    if arr.size:
        out.update({f"mean_{name}_ms": float(arr.mean() * MS), f"median_{name}_ms": float(np.median(arr) * MS),
                    f"std_{name}_ms": float(arr.std() * MS)})
        for p in percentiles:
            out[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(arr, p) * MS)
    return out


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _peaks(done: Sequence[RequestResult]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s (token chunks per one-second bucket) and peak concurrent requests."""
    if not done:
        return 0.0, 0
    start = min(r.sent_s for r in done)
    end = max(r.end_s for r in done)
    buckets = np.zeros(int(np.ceil(end - start)) + 1)
    for r in done:
        for t in r.token_times_s:
            buckets[int(t - start)] += 1
    events = sorted([(r.sent_s, 1) for r in done] + [(r.end_s, -1) for r in done])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(buckets.max()), peak


def _good(r: RequestResult, goodput: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.e2el_s}
    return all(bound / MS >= values[key] for key, bound in goodput.items())


def calculate_metrics(run: BenchRun, goodput: dict[str, float], percentiles: Sequence[float],
                      max_concurrency: int | None) -> dict:
    """vLLM's result fields (in its order) for a run whose lengths were already checked (check_lengths)."""
    results = run.results
    done = [r for r in results if r.success]
    dur = run.duration_s if run.duration_s > 0 else math.nan
    total_input = sum(r.num_prompt_tokens or 0 for r in done)
    total_output = sum(r.num_output_tokens for r in done)
    peak_tokens, peak_requests = _peaks(done)

    def rate(x: float) -> float | None:
        value = x / dur
        return value if math.isfinite(value) else None

    out = {
        "duration": run.duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": rate(len(done)),
        "request_goodput": rate(sum(_good(r, goodput) for r in done)) if goodput else None,
        "output_throughput": rate(total_output),
        "total_token_throughput": rate(total_input + total_output),
        "input_lens": [r.num_prompt_tokens or 0 for r in results],
        "output_lens": [r.num_output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft_s or 0.0 for r in results],
        "itls": [r.itls_s for r in results],
        "latencies": [r.e2el_s or 0.0 for r in results],
        "start_times": [r.sent_s for r in results],
        "queue_times": [r.client_queue_s or 0.0 for r in results],
        "generated_texts": [r.text for r in results],
        "errors": [r.error for r in results],
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
    }
    out.update(_stats("ttft", [r.ttft_s for r in done], percentiles))
    out.update(_stats("tpot", [r.tpot_s for r in done if r.tpot_s is not None], percentiles))
    out.update(_stats("itl", [g for r in done for g in r.itls_s], percentiles))
    out.update(_stats("e2el", [r.e2el_s for r in done], percentiles))
    if max_concurrency is not None:
        out.update(_stats("client_queue_time", [r.client_queue_s for r in done], percentiles))
        out.update(_stats("e2el_including_client_queue", [r.e2el_s + r.client_queue_s for r in done], percentiles))
    return out


def failure_reasons(results: Sequence[RequestResult]) -> list[tuple[str, int, str]]:
    """(kind, count, first request id) of failed requests, most common first; the kind drops numbers."""
    kinds: Counter = Counter()
    first: dict[str, str] = {}
    for r in results:
        if r.success:
            continue
        kind = r.error.split(":")[0] if r.length_mismatch else r.error
        kinds[kind] += 1
        first.setdefault(kind, r.request_id)
    return [(k, n, first[k]) for k, n in kinds.most_common()]


def _line(label: str, value, fmt: str = "") -> str:
    if value is None:
        return f"{label:<40} {'n/a':<10}"
    return f"{label:<40} {value:<10{fmt}}"


def format_vllm_table(result: dict, percentiles: Sequence[float], goodput: dict, max_concurrency: int | None,
                      request_rate: float | None) -> str:
    """vLLM `bench serve`'s result block, line for line."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             _line("Successful requests:", result["completed"]),
             _line("Failed requests:", result["failed"])]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if request_rate is not None:
        lines.append(_line("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [_line("Benchmark duration (s):", result["duration"], ".2f"),
              _line("Total input tokens:", result["total_input_tokens"]),
              _line("Total generated tokens:", result["total_output_tokens"]),
              _line("Request throughput (req/s):", result["request_throughput"], ".2f")]
    if goodput:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"], ".2f"))
    lines += [_line("Output token throughput (tok/s):", result["output_throughput"], ".2f"),
              _line("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f"),
              _line("Peak concurrent requests:", result["max_concurrent_requests"], ".2f"),
              _line("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")]
    sections = METRIC_SECTIONS + (QUEUE_SECTIONS if max_concurrency is not None else ())
    for key, name, header in sections:
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(_line(f"Mean {name} (ms):", result[f"mean_{key}_ms"], ".2f"))
        lines.append(_line(f"Median {name} (ms):", result[f"median_{key}_ms"], ".2f"))
        for p in percentiles:
            lines.append(_line(f"P{_p_word(p)} {name} (ms):", result[f"p{_p_word(p)}_{key}_ms"], ".2f"))
    lines.append("=" * 50)
    return "\n".join(line.rstrip() for line in lines)
