"""Run metrics: per-request latencies, their percentiles, throughput, goodput and step statistics.

Definitions (names follow vLLM's benchmark and Vidur; all times in seconds on the run's clock):

- TTFT = first_token_s - arrival_s. ``RunResult.ttft_timing`` says whether first_token_s is when the
  token was computed (end of the step that sampled it) or when the client received it; every summary
  carries that flag as ``ttft_timing``.
- TPOT = (finish_s - first_token_s) / (num_output_tokens - 1), for requests with >= 2 output tokens.
- ITL = gaps between consecutive token_times_s; the gaps of all finished requests are pooled.
- E2E = finish_s - arrival_s.
- Queueing delay = first_scheduled_s - arrival_s (until first admission into a batch).
- Only requests with finish_reason "stop" or "length" count as finished and enter latency statistics;
  rejected, aborted and errored requests are counted separately (num_rejected, num_aborted, num_errors),
  and requests that never finished are counted in num_unfinished. finish_reasons counts every request by
  its finish reason ("unfinished" for none), so its counts add up to num_requests; rejected_reasons,
  aborted_reasons and error_reasons count those requests by the kind of their stated detail (per-request
  numbers left out, e.g. "prompt longer than max_model_len 8192"; "no reason given" when there is none).
- instance_load (runs over more than one instance): per instance, num_requests routed to it, their
  num_prompt_tokens, and num_output_tokens produced.
- duration_s = run.duration_s (first arrival to last finish); throughput_rps = num_finished / duration_s;
  output_tokens_per_s = output tokens of finished requests / duration_s; total_tokens_per_s adds their
  prompt tokens. Rates are None when duration_s <= 0.
- Goodput (only when SLOs are given): goodput_rps = finished requests meeting every given SLO
  (ttft, tpot, e2e; each an upper bound in seconds) / duration_s. A request with one output token has no
  TPOT and meets a TPOT SLO. slo_attainment = those requests / num_requests (all requests, so rejected
  and aborted requests count as misses).
- prefix_hit_rate = sum(num_cached_tokens) / sum(num_prompt_tokens) over finished requests, where a request's
  num_cached_tokens is its prompt tokens served from the prefix cache at its first admission (a readmission
  after preemption does not count again), as the scheduler's SchedulerStats counts them: at most 1.
- Step statistics, plain means over step samples (all instances pooled): mean_batch_size (num_seqs),
  mean_kv_usage and max_kv_usage (kv_used_blocks / kv_total_blocks), mean_queue_depth (num_waiting),
  num_steps.
- Percentiles use numpy's default linear interpolation; every statistic is None when there is no data.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from sim.records import RequestRecord, RunResult, step_columns

FINISHED_REASONS = ("stop", "length")
_ABORTED_REASONS = ("abort", "aborted")
SLO_KEYS = ("ttft", "tpot", "e2e")
_SLO_METRIC = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s"}
_ITL_GROUP = 1024  # requests whose token times are joined into one array at a time


def reason(record: RequestRecord) -> str | None:
    """The finish reason as a plain string (accepts str enums such as scheduler.request.FinishReason)."""
    value = record.finish_reason
    if value is None:
        return None
    return str(getattr(value, "value", value))


def is_finished(record: RequestRecord) -> bool:
    """Whether the request finished normally (stop or length) and so enters latency statistics."""
    return reason(record) in FINISHED_REASONS


def _diff(end: float | None, start: float | None) -> float | None:
    if end is None or start is None:
        return None
    return end - start


def request_latencies(record: RequestRecord) -> dict[str, float | None]:
    """ttft_s, tpot_s, e2e_s and queue_s of one request (None where undefined)."""
    tpot = None
    if record.num_output_tokens >= 2 and record.first_token_s is not None and record.finish_s is not None:
        tpot = (record.finish_s - record.first_token_s) / (record.num_output_tokens - 1)
    return {
        "ttft_s": _diff(record.first_token_s, record.arrival_s),
        "tpot_s": tpot,
        "e2e_s": _diff(record.finish_s, record.arrival_s),
        "queue_s": _diff(record.first_scheduled_s, record.arrival_s),
    }


def inter_token_latencies(records: Iterable[RequestRecord]) -> np.ndarray:
    """All gaps between consecutive token times of the given records, pooled (an array: a replay has
    millions, which as a list of floats cost ~30 bytes each)."""
    times = [r.token_times_s for r in records if len(r.token_times_s) > 1]
    gaps = np.empty(sum(len(t) - 1 for t in times))
    at = 0
    for i in range(0, len(times), _ITL_GROUP):  # filled in place: per-request arrays would hold them all twice
        group = times[i : i + _ITL_GROUP]
        counts = [len(t) for t in group]
        joined = np.fromiter(itertools.chain.from_iterable(group), dtype=float, count=sum(counts))
        # the gaps of the requests one after the other, less those from one request's last time to the next's first
        d = np.delete(np.diff(joined), np.cumsum(counts[:-1], dtype=np.int64) - 1)
        gaps[at : at + len(d)] = d
        at += len(d)
    return gaps


def percentiles(values: Iterable[float | None], reorder: bool = False) -> dict[str, float | None]:
    """mean, p50, p90 and p99 of the values (None entries ignored; all None when there are none).

    reorder=True lets a float array of values be reordered in place instead of copied (one that nobody
    else reads: a replay's millions of inter-token gaps).
    """
    if isinstance(values, np.ndarray):
        arr = values.astype(float, copy=False)
    else:
        arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    mean = float(arr.mean())  # before the partitioning, which may reorder arr
    p50, p90, p99 = np.percentile(arr, [50, 90, 99], overwrite_input=reorder or arr is not values)
    return {"mean": mean, "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _parse_seconds(item: str, raw: str) -> float:
    text = raw.strip().lower()
    scale = 1.0
    if text.endswith("ms"):
        text, scale = text[:-2], 1e-3
    elif text.endswith("s"):
        text = text[:-1]
    try:
        value = float(text) * scale
    except ValueError:
        raise ValueError(f"SLO item {item!r}: {raw!r} is not a number of seconds (e.g. 0.5, 0.5s, 500ms)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"SLO item {item!r}: the bound must be a positive number of seconds")
    return value


def parse_slo(spec: str) -> dict[str, float]:
    """Parse "ttft=0.5,tpot=0.05,e2e=10" (seconds; "500ms" also accepted) into {"ttft": 0.5, ...}."""
    slo: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip().lower().removesuffix("_s")
        if not sep:
            raise ValueError(f"SLO item {item!r}: expected name=seconds, e.g. ttft=0.5")
        if key not in SLO_KEYS:
            raise ValueError(f"SLO item {item!r}: unknown metric {key!r}; use one of {', '.join(SLO_KEYS)}")
        if key in slo:
            raise ValueError(f"SLO item {item!r}: {key} is given twice")
        slo[key] = _parse_seconds(item, raw)
    if not slo:
        raise ValueError(f"SLO spec {spec!r} names no metric; use e.g. ttft=0.5,tpot=0.05,e2e=10")
    return slo


def _normalize_slo(slo: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in slo.items():
        name = str(key).lower().removesuffix("_s")
        if name not in SLO_KEYS:
            raise ValueError(f"SLO metric {key!r} is unknown; use one of {', '.join(SLO_KEYS)}")
        out[name] = float(value)
    return out


def meets_slo(latencies: dict[str, float | None], slo: dict[str, float]) -> bool:
    """Whether one finished request's latencies meet every bound in slo (an undefined TPOT meets it)."""
    for key, bound in slo.items():
        value = latencies[_SLO_METRIC[key]]
        if value is None:
            if key == "tpot":
                continue
            return False
        if value > bound:
            return False
    return True


# The scheduler's rejection text names the request's own numbers; a summary groups by the limit alone.
_TOO_LONG = re.compile(r"prompt \((\d+) tokens\) \+ max_tokens \((\d+)\) = \d+ exceeds (.+?) \((\d+) tokens\)")
MAX_REASON_KINDS = 10  # kinds listed per finish reason; the rest are pooled as "other"


def reason_kind(detail: str | None) -> str:
    """A finish detail without its per-request numbers, so equal causes count together."""
    if not detail:
        return "no reason given"
    m = _TOO_LONG.match(detail)
    if m:
        prompt, limit, limit_tokens = int(m[1]), m[3], int(m[4])
        what = "prompt" if prompt > limit_tokens else "prompt + max_tokens"
        return f"{what} longer than {limit} {limit_tokens}"
    if detail.startswith("max_tokens=") and "at least one token" in detail:
        return "max_tokens < 1"
    return detail.split("; ")[0].strip() or "no reason given"  # the cause, without its suggested fix


def reason_counts(records: Iterable[RequestRecord], reasons: tuple[str, ...]) -> dict[str, int]:
    """Requests whose finish reason is one of reasons, counted by reason_kind of their detail, most first."""
    counts = Counter(reason_kind(r.detail) for r in records if reason(r) in reasons)
    ranked = counts.most_common()
    if len(ranked) <= MAX_REASON_KINDS:
        return dict(ranked)
    kept = dict(ranked[: MAX_REASON_KINDS - 1])
    rest = ranked[MAX_REASON_KINDS - 1 :]
    kept[f"other ({len(rest)} kinds)"] = sum(n for _, n in rest)
    return kept


def finish_reasons(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Every request counted by finish reason ("unfinished" when it has none), most first."""
    return dict(Counter(reason(r) or "unfinished" for r in records).most_common())


def instance_load(run: RunResult) -> dict[str, dict[str, int]]:
    """Requests, prompt tokens and output tokens per instance (every instance, idle ones included)."""
    count = int(run.config.get("num_instances") or 0) if isinstance(run.config, dict) else 0
    count = max([count, *(r.instance + 1 for r in run.records)])
    load = {str(i): {"num_requests": 0, "num_prompt_tokens": 0, "num_output_tokens": 0} for i in range(count)}
    for r in run.records:
        entry = load[str(r.instance)]
        entry["num_requests"] += 1
        entry["num_prompt_tokens"] += r.num_prompt_tokens
        entry["num_output_tokens"] += r.num_output_tokens
    return load


def _rate(count: float, duration_s: float) -> float | None:
    return count / duration_s if duration_s > 0 else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def step_stats(run: RunResult) -> dict:
    """Batch size, KV usage and queue depth statistics from the run's step samples."""
    cols = step_columns(run.steps)
    total = cols["kv_total_blocks"]
    kv = cols["kv_used_blocks"][total > 0] / total[total > 0]
    mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    return {
        "mean_batch_size": mean(cols["num_seqs"]),
        "mean_kv_usage": mean(kv),
        "max_kv_usage": float(kv.max()) if len(kv) else None,
        "mean_queue_depth": mean(cols["num_waiting"]),
        "num_steps": len(total),
    }


def summarize(run: RunResult, slo: dict | None = None) -> dict:
    """The summary dict of one run (see the module docstring for definitions)."""
    reasons = [reason(r) for r in run.records]
    finished = [r for r in run.records if is_finished(r)]
    lat = [request_latencies(r) for r in finished]
    out_tokens = sum(r.num_output_tokens for r in finished)
    prompt_tokens = sum(r.num_prompt_tokens for r in finished)
    cached_tokens = sum(r.num_cached_tokens for r in finished)
    duration = float(run.duration_s)
    summary = {
        "policy": run.policy,
        "num_requests": len(run.records),
        "num_finished": len(finished),
        "num_rejected": reasons.count("rejected"),
        "num_aborted": sum(reasons.count(a) for a in _ABORTED_REASONS),
        "num_errors": reasons.count("error"),
        "num_unfinished": reasons.count(None),
        "finish_reasons": finish_reasons(run.records),
        "rejected_reasons": reason_counts(run.records, ("rejected",)),
        "aborted_reasons": reason_counts(run.records, _ABORTED_REASONS),
        "error_reasons": reason_counts(run.records, ("error",)),
        "duration_s": duration,
        "throughput_rps": _rate(len(finished), duration),
        "output_tokens_per_s": _rate(out_tokens, duration),
        "total_tokens_per_s": _rate(out_tokens + prompt_tokens, duration),
        "ttft_s": percentiles(x["ttft_s"] for x in lat),
        "tpot_s": percentiles(x["tpot_s"] for x in lat),
        "itl_s": percentiles(inter_token_latencies(finished), reorder=True),
        "e2e_s": percentiles(x["e2e_s"] for x in lat),
        "queue_s": percentiles(x["queue_s"] for x in lat),
        "preemptions": run.num_preemptions,
        "recomputed_tokens": run.num_recomputed_tokens,
        "prefix_hit_rate": cached_tokens / prompt_tokens if prompt_tokens > 0 else None,
        **step_stats(run),
        "ttft_timing": run.ttft_timing,
    }
    load = instance_load(run)
    if len(load) > 1:
        summary["instance_load"] = load
    if slo is not None:
        bounds = _normalize_slo(slo)
        good = sum(meets_slo(x, bounds) for x in lat)
        summary["slo"] = bounds
        summary["goodput_rps"] = _rate(good, duration)
        summary["slo_attainment"] = good / len(run.records) if run.records else None
    return summary
