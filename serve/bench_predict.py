"""The simulator's prediction for a benchmarked server: the same requests, at the times the server got them.

The server's configuration comes from tokenstep serve's ``GET /v1/models`` (each model's ``"tokenstep"``
field: backend, policy, scheduler_config, cost, model_path, n_ctx) or from flags, flags winning. The
prediction replays the requests that succeeded, each arriving when its POST went out (under
--max-concurrency that is after its client queueing), with its prompt's token ids and the number of
tokens it received, through the simulator on the cost model. Its TTFT is taken when the first token is
computed; the measurement's when the chunk reaches the client (HTTP and streaming included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from scheduler import SchedulerConfig
from serve.bench_client import BenchRequest, RequestResult
from serve.bench_prompts import prompt_ids, workload_request
from sim.metrics import summarize
from sim.workload import MIN_TOKEN_ID, Workload

# (row label, summary key, statistic): p90s, as compare's error table (a p99 of a few dozen requests is its
# slowest one)
ERROR_ROWS = (("TTFT mean", "ttft_s", "mean"), ("TTFT p50", "ttft_s", "p50"), ("TTFT p90", "ttft_s", "p90"),
              ("TPOT mean", "tpot_s", "mean"), ("TPOT p90", "tpot_s", "p90"), ("E2E mean", "e2e_s", "mean"),
              ("E2E p90", "e2e_s", "p90"), ("throughput", "throughput_rps", None))
CONFIG_FIELDS = {f.name for f in fields(SchedulerConfig)}


def tokenstep_meta(models: dict | None) -> dict | None:
    """The "tokenstep" object of tokenstep serve's /v1/models (in the first model, or at the top), if any."""
    if not isinstance(models, dict):
        return None
    data = models.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("tokenstep"), dict):
        return data[0]["tokenstep"]
    meta = models.get("tokenstep")
    return meta if isinstance(meta, dict) else None


def server_config(meta: dict) -> SchedulerConfig:
    """The SchedulerConfig the server reported; ValueError naming the field it could not use."""
    raw = meta.get("scheduler_config")
    if not isinstance(raw, dict):
        raise ValueError("the server's /v1/models field tokenstep.scheduler_config is missing or not an object; "
                         "give the scheduler flags (--max-num-seqs, ...) instead")
    known = {k: v for k, v in raw.items() if k in CONFIG_FIELDS}
    try:
        return SchedulerConfig(**known)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the server's tokenstep.scheduler_config is not usable ({exc})") from None


def prediction_workload(requests: Sequence[BenchRequest], results: Sequence[RequestResult], endpoint: str,
                        tokenizer: Any, ignore_eos: bool, seed: int) -> tuple[Workload, list[str]]:
    """The requests the server completed as a workload arriving at their send times; notes on what was
    approximated."""
    by_id = {r.request_id: r for r in requests}
    # a request with a wrong token count still ran on the server: it is replayed with the count it got
    done = sorted((r for r in results if (r.success or r.length_mismatch) and r.sent_s is not None),
                  key=lambda r: r.sent_s)
    notes: list[str] = []
    left_out = sum(1 for r in results if not r.success and not r.length_mismatch)
    if left_out:
        notes.append(f"{left_out} failed request(s) left out of the prediction")
    if not done:
        raise ValueError("no request succeeded, so there is nothing to predict")
    rng = np.random.default_rng(seed)
    t0 = done[0].sent_s
    out, guessed, resized = [], 0, 0
    for r in done:
        req = by_id[r.request_id]
        ids = prompt_ids(req, endpoint, tokenizer)
        if ids is None:
            n = r.num_prompt_tokens or req.num_prompt_tokens
            if not n:
                raise ValueError(f"request {r.request_id}: neither the server nor a tokenizer gave its prompt "
                                 "length; give --tokenizer to predict")
            ids = tuple(rng.integers(MIN_TOKEN_ID, 32000, size=n).tolist())
            guessed += 1
        elif r.num_prompt_tokens and r.num_prompt_tokens != len(ids):
            # the server counted otherwise (its chat template, a BOS): keep the ids' prefix, match its length
            n = r.num_prompt_tokens
            ids = ids[:n] + tuple(rng.integers(MIN_TOKEN_ID, 32000, size=max(0, n - len(ids))).tolist())
            resized += 1
        max_tokens = req.max_tokens if ignore_eos and r.success else max(1, r.num_output_tokens)
        out.append(workload_request(req, r.sent_s - t0, ids, max_tokens))
    if guessed:
        notes.append(f"{guessed} text prompt(s) stand as random ids of the length the server reported (no "
                     "--tokenizer): prefix sharing among them is not predicted")
    if resized:
        notes.append(f"{resized} prompt(s) cut or padded to the length the server reported (usage.prompt_tokens)")
    desc = f"{len(out)} requests as sent to the server (arrival = send time)"
    return Workload(tuple(out), desc, {"kind": "bench_log", "num_requests": len(out)}), notes


def predict(workload: Workload, policy: str, config: SchedulerConfig, cost_model: Any, instances: int = 1,
            router: str = "least_outstanding", exclude: frozenset[str] = frozenset()):
    """(RunResult, summary) of the simulator on the workload; requests in exclude load the simulated server
    but stay out of the statistics, as their measured counterparts do."""
    from backends.synthetic import SyntheticBackend
    from sim.model import run_workload

    backends = [SyntheticBackend(cost_model) for _ in range(instances)]
    run = run_workload(workload, policy, config, backends, router=router)
    run.policy = "predicted"
    for rec in run.records:
        if rec.request_id in exclude:
            rec.finish_reason, rec.detail = "error", "left out: the measured request got a wrong token count"
    return run, summarize(run)


def rel_errors(measured: dict, predicted: dict) -> dict[str, float | None]:
    """(predicted - measured) / measured for each ERROR_ROWS entry (None where undefined)."""
    out = {}
    for label, key, stat in ERROR_ROWS:
        m = measured.get(key) if stat is None else (measured.get(key) or {}).get(stat)
        p = predicted.get(key) if stat is None else (predicted.get(key) or {}).get(stat)
        out[label] = None if m in (None, 0) or p is None else (p - m) / m
    return out


def _cell(value, key: str) -> str:
    if value is None:
        return "-"
    if key == "throughput_rps":
        return f"{value:.2f} req/s"
    return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"


def format_prediction(measured: dict, predicted: dict, errors: dict, how: str, notes: Sequence[str]) -> str:
    """Predicted against measured, one row per statistic, with the simulator's relative error."""
    rows = [("metric", "measured", "predicted", "error")]
    for label, key, stat in ERROR_ROWS:
        m = measured.get(key) if stat is None else (measured.get(key) or {}).get(stat)
        p = predicted.get(key) if stat is None else (predicted.get(key) or {}).get(stat)
        e = errors[label]
        rows.append((label, _cell(m, key), _cell(p, key), "n/a" if e is None else f"{e * 100:+.1f} %"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"simulator's prediction ({how}); error = (predicted - measured) / measured",
             " | ".join([rows[0][0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(rows[0][1:], widths[1:],
                                                                                       strict=True)]),
             "-+-".join("-" * w for w in widths)]
    for r in rows[1:]:
        lines.append(" | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                                     strict=True)]))
    lines.append("TTFT measured: when the first token reaches the client; predicted: when it is computed.")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
