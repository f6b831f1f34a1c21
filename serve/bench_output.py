"""The load generator's files: vLLM's result JSON, tokenstep's summary and per-request logs, and plots.

Per-request records (requests.csv, requests.jsonl) are on the client's clock, seconds after the run
started: arrival_s (when the workload asked), sent_s (when the POST went out), token_times_s (each token
chunk's arrival); ttft_s, tpot_s and e2e_s follow serve.bench_metrics. requests.jsonl is the log a later
calibration reads: one JSON object per request sent, with its prompt and output lengths.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

from serve.bench_client import RequestResult
from sim.records import RequestRecord, RunResult
from sim.report import _plain as plain
from sim.report import flatten, versions

REQUEST_COLUMNS = ("request_id", "arrival_s", "sent_s", "client_queue_s", "num_prompt_tokens", "max_tokens",
                   "num_output_tokens", "output_count_source", "num_cached_tokens", "ttft_s", "tpot_s", "e2e_s",
                   "finish_reason", "success", "length_mismatch", "status", "error")


def request_row(r: RequestResult) -> dict:
    """One request's record (REQUEST_COLUMNS)."""
    return {"request_id": r.request_id, "arrival_s": r.arrival_s, "sent_s": r.sent_s,
            "client_queue_s": r.client_queue_s, "num_prompt_tokens": r.num_prompt_tokens,
            "max_tokens": r.max_tokens, "num_output_tokens": r.num_output_tokens,
            "output_count_source": r.output_count_source, "num_cached_tokens": r.num_cached_tokens,
            "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2el_s, "finish_reason": r.finish_reason,
            "success": r.success, "length_mismatch": r.length_mismatch, "status": r.status, "error": r.error}


def measured_run(results: Sequence[RequestResult], label: str = "measured", for_plot: bool = False) -> RunResult:
    """The client's records as a RunResult (TTFT 'delivered'), so sim.metrics and sim.plots read them.

    For summaries a request arrives when it is sent (vLLM's origin of TTFT and E2EL); for_plot keeps the
    workload's arrival and marks the send as its first scheduling, so client queueing shows as queued.
    """
    records = []
    for r in results:
        if r.sent_s is None:
            continue
        rec = RequestRecord(r.request_id, r.arrival_s if for_plot else r.sent_s, r.num_prompt_tokens or 0,
                            r.max_tokens, first_scheduled_s=r.sent_s if for_plot else None,
                            first_token_s=r.token_times_s[0] if r.token_times_s else None,
                            finish_s=r.end_s if r.success else None, token_times_s=list(r.token_times_s),
                            num_output_tokens=r.num_output_tokens, num_cached_tokens=r.num_cached_tokens or 0,
                            finish_reason=(r.finish_reason if r.finish_reason in ("stop", "length") else "length")
                            if r.success else "error", detail=r.error or None)
        records.append(rec)
    sent = [r.sent_s for r in results if r.sent_s is not None]
    ends = [r.end_s for r in results if r.success and r.end_s is not None]
    duration = max(ends) - min(sent) if sent and ends else 0.0
    return RunResult(label, records, [], duration, ttft_timing="delivered")


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def write_files(out: Path, results: Sequence[RequestResult], vllm_result: dict, summary: dict) -> dict[str, Path]:
    """vllm_result.json, summary.json, summary.csv, requests.csv and requests.jsonl; paths by file name."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def put(name: str, text: str) -> None:
        path = out / name
        path.write_text(text)
        paths[name] = path

    put("vllm_result.json", json.dumps(plain(vllm_result), allow_nan=False) + "\n")
    doc = {**plain(summary), "versions": versions(),
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    put("summary.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    runs = [("measured", summary["measured"])] + ([("predicted", summary["predicted"])]
                                                  if summary.get("predicted") else [])
    flat = [{"run": name, **flatten(plain(s))} for name, s in runs]
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns]
    paths["summary.csv"] = _write_csv(out / "summary.csv", columns, flat)
    rows = [request_row(r) for r in results]
    paths["requests.csv"] = _write_csv(out / "requests.csv", REQUEST_COLUMNS, rows)
    with (out / "requests.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
        for r, row in zip(results, rows, strict=True):
            fh.write(json.dumps(plain({**row, "token_times_s": r.token_times_s}), allow_nan=False) + "\n")
    paths["requests.jsonl"] = out / "requests.jsonl"
    return paths


def plot_client_timeline(results: Sequence[RequestResult], path, max_requests: int = 40) -> Path:
    """Per-request bars (client queue, waiting for the first token, streaming) over in-flight requests."""
    from sim.plots import _draw_requests, _pyplot, _save

    plt = _pyplot()
    run = measured_run(results, "client side", for_plot=True)
    shown = min(len(run.records), max_requests)
    fig, (ax_req, ax_load) = plt.subplots(2, 1, figsize=(12, 3 + 0.18 * shown + 2), sharex=True,
                                          layout="constrained", gridspec_kw={"height_ratios": [3, 1]})
    _draw_requests(ax_req, run, max_requests)
    ax_req.set_title(f"first {shown} of {len(run.records)} requests sent (queued: client queue; prefill: sent "
                     "until the first token arrived; decode: streaming)", fontsize=9)
    events = sorted([(r.sent_s, 1) for r in results if r.sent_s is not None]
                    + [(r.end_s if r.end_s is not None else r.sent_s, -1) for r in results if r.sent_s is not None])
    waits = sorted([(r.arrival_s, 1) for r in results if r.sent_s is not None]
                   + [(r.sent_s, -1) for r in results if r.sent_s is not None])
    for events_, label, style in ((events, "requests in flight", "-"), (waits, "client queue", "--")):
        xs, ys, level = [0.0], [0], 0
        for t, d in events_:
            xs.append(t)
            ys.append(level)
            level += d
            xs.append(t)
            ys.append(level)
        ax_load.plot(xs, ys, style, lw=1.2, label=label)
    ax_load.set_ylabel("requests")
    ax_load.set_xlabel("time since the run started (s)")
    ax_load.set_ylim(bottom=0)
    ax_load.grid(alpha=0.3)
    ax_load.legend(loc="best", fontsize=7)
    fig.suptitle("Client-side timeline")
    return _save(fig, path)
