"""Load-test a running OpenAI-compatible server with a workload, measured as vLLM's bench serve measures.

Replays the workload simulate would run (a trace, a synthetic load or the bundled default, with the
shared-prefix overlay) against --base-url: prompts as token ids on /v1/completions, as text of the same
token length on /v1/chat/completions; output lengths forced with max_tokens and ignore_eos, and each
received count checked (a server that ignores the limit is reported, not averaged in). Requests go out at
the workload's arrival times (open loop) or through --max-concurrency (closed loop; client queueing reported
apart). Prints vLLM's result table and writes vllm_result.json (vLLM's field names), summary.json/csv,
requests.csv/jsonl, latency CDFs and a client-side timeline. --predict runs the simulator on the same
requests with the server's configuration (tokenstep serve reports it in /v1/models; flags override) and
prints predicted against measured. TTFT here is when the first token reaches the client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.bench_client import ENDPOINTS, BenchTarget, ServerError, check_endpoint, run_requests, server_info
from serve.bench_metrics import (
    calculate_metrics,
    check_lengths,
    failure_reasons,
    format_vllm_table,
    parse_goodput,
    parse_percentiles,
)
from sim.cli_common import (
    SYNTHETIC_DEFAULTS,
    UsageError,
    add_output_args,
    add_scheduler_args,
    add_workload_args,
    build_workload,
    nonnegative_int,
    positive_float,
    positive_int,
    workload_kind,
)
from sim.cli_output import emit, log, out_dir

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_REQUEST_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """bench's flags."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL",
                   help=f"the server (default {DEFAULT_BASE_URL})")
    g.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                   help="/v1/completions (token-id prompts; default) or /v1/chat/completions (text prompts)")
    g.add_argument("--model", metavar="NAME", help="model name in requests (default: the first in /v1/models)")
    g.add_argument("--tokenizer", metavar="NAME|PATH",
                   help="GGUF model whose vocabulary makes text prompts (default: the server's model_path when it is "
                        "tokenstep serve, else gemma3-270m)")
    g = parser.add_argument_group("load")
    g.add_argument("--max-concurrency", type=positive_int, metavar="N",
                   help="at most N requests in flight (closed loop); arrivals past it wait in a client queue")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="force output lengths: ignore_eos with max_tokens, and check each count (default on)")
    g.add_argument("--num-warmups", type=nonnegative_int, default=0, metavar="N",
                   help="send the first request N times before the run, untimed (default 0)")
    g.add_argument("--request-timeout", type=positive_float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                   help=f"a request still streaming after S seconds fails (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    g.add_argument("--max-duration", type=positive_float, metavar="S",
                   help="send nothing after S seconds and cut off what still streams then (default: no limit)")
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default: the server's)")
    g.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="SLOs for goodput in milliseconds, KEY one of ttft, tpot, e2el, e.g. ttft:500 tpot:50")
    g.add_argument("--metric-percentiles", default="99", metavar="P,P",
                   help="percentiles of TTFT/TPOT/ITL/E2EL in the table and vllm_result.json (default 99, as vLLM)")
    add_workload_args(parser)
    g = parser.add_argument_group("prediction")
    g.add_argument("--predict", action="store_true",
                   help="run the simulator on the same requests with the server's configuration and print "
                        "predicted against measured")
    g.add_argument("--policy", metavar="SPEC", help="--predict: the server's policy (default: as the server "
                                                    "reports, else continuous)")
    g.add_argument("--cost", metavar="NAME|FILE", help="--predict: cost model (default: as the server reports, "
                                                       "else the bundled profile)")
    add_scheduler_args(parser)
    add_output_args(parser, slo=False, config=False)


PREDICT_ONLY = ("policy", "cost", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_blocks", "kv_tokens",
                "block_size", "max_prefill_chunk_tokens", "preemption_victim", "slot_choice")


def _check_flags(args: argparse.Namespace) -> tuple[dict, list[float]]:
    goodput = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.metric_percentiles)
    if not args.predict:
        given = [f"--{n.replace('_', '-')}" for n in PREDICT_ONLY if getattr(args, n, None) not in (None, False)]
        given += ["--no-prefix-caching"] if args.no_prefix_caching else []
        given += ["--instances"] if args.instances != 1 else []
        if given:
            raise UsageError(f"{', '.join(given)} describe the server for --predict; add --predict or drop them")
    if not args.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {args.base_url!r} must start with http:// or https://")
    return goodput, percentiles


def run(args: argparse.Namespace) -> int:
    """Benchmark the server; print and write the results."""
    goodput, percentiles = _check_flags(args)
    workload = build_workload(args)
    if not workload.requests:
        raise UsageError("the workload has no requests")
    models = asyncio.run(server_info(args.base_url))
    model = args.model or _first_model(models)
    from serve.bench_predict import tokenstep_meta
    from serve.bench_prompts import needs_tokenizer, probe_request, to_bench_requests

    meta = tokenstep_meta(models)
    tokenizer = None
    text_prompts = any(r.prompt is not None or r.messages is not None for r in workload.requests)
    if needs_tokenizer(workload, args.endpoint) or (args.predict and (text_prompts or args.tokenizer)):
        tokenizer = _tokenizer(args, meta)
    requests = to_bench_requests(workload, args.endpoint, tokenizer)
    extra = {"temperature": args.temperature} if args.temperature is not None else None
    target = BenchTarget(args.base_url, args.endpoint, model, args.ignore_eos, extra)
    setup = _prediction_setup(args, meta)
    warning = asyncio.run(check_endpoint(target, probe_request(requests[0]), min(args.request_timeout, 120.0)))
    if warning:
        log(args, f"bench: warning: {warning}")
    out = out_dir(args, "bench")
    log(args, f"bench: {len(requests)} requests to {target.url} (model {model}), "
              + (f"at most {args.max_concurrency} in flight" if args.max_concurrency else "open loop"))
    from sim.cli_runs import make_progress

    with make_progress(args, "bench") as bar:
        bench = asyncio.run(run_requests(target, requests, max_concurrency=args.max_concurrency,
                                         request_timeout_s=args.request_timeout, max_duration_s=args.max_duration,
                                         num_warmups=args.num_warmups, progress=bar))
    return _report(args, workload, requests, bench, model, meta, tokenizer, setup, goodput, percentiles, out)


def _first_model(models: dict | None) -> str:
    data = models.get("data") if isinstance(models, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
        return str(data[0]["id"])
    raise ServerError("the server lists no model at /v1/models; give --model")


def _tokenizer(args: argparse.Namespace, meta: dict | None):
    from serve.bench_prompts import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if meta and meta.get("model_path") and Path(str(meta["model_path"])).is_file():  # the server's own vocabulary
        return load_tokenizer(str(meta["model_path"]))
    from backends.models import DEFAULT_MODEL

    return load_tokenizer(DEFAULT_MODEL)


def _request_rate(args: argparse.Namespace) -> float | None:
    if workload_kind(args) != "synthetic":
        return None
    return args.rate if args.rate is not None else SYNTHETIC_DEFAULTS["rate"]


def _burstiness(args: argparse.Namespace) -> float | None:
    """vLLM's burstiness (the gamma shape of the gaps, 1 / CV^2) of a synthetic workload; None for a trace."""
    if workload_kind(args) != "synthetic" or (args.arrival or "poisson") not in ("poisson", "gamma"):
        return None
    return 1.0 / args.cv ** 2 if args.cv else 1.0


def _report(args, workload, requests, bench, model, meta, tokenizer, setup, goodput, percentiles, out) -> int:
    """Metrics, prediction, the printed report, files and plots."""
    import datetime as dt

    from serve.bench_output import measured_run, plot_client_timeline, write_files
    from sim.metrics import summarize

    results = bench.results
    num_mismatch = check_lengths(results, args.ignore_eos)
    result = {"date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai", "backend": "openai",
              "label": "tokenstep-bench", "model_id": model, "tokenizer_id": args.tokenizer,
              "num_prompts": len(requests), "request_rate": _request_rate(args) or "trace",
              "burstiness": _burstiness(args), "max_concurrency": args.max_concurrency}
    result.update(calculate_metrics(bench, goodput, percentiles, args.max_concurrency))
    measured = summarize(measured_run(results))
    if all(r.num_cached_tokens is None for r in results):
        measured["prefix_hit_rate"] = None  # the server does not report usage.prompt_tokens_details.cached_tokens
    failures = failure_reasons(results)
    measured.update({"num_sent": len(results), "num_not_sent": bench.num_not_sent,
                     "num_length_mismatches": num_mismatch, "failures": failures,
                     "client_queue_s": _queue_stats(results)})
    lines = [f"tokenstep bench: {args.base_url}{args.endpoint}, model {model}" + (
        f" (tokenstep serve, backend {meta.get('backend')}, policy {meta.get('policy')})" if meta else ""),
        f"workload: {workload.description}",
        "load: " + (f"closed loop, at most {args.max_concurrency} in flight" if args.max_concurrency
                    else "open loop at the workload's arrival times")
        + f"; output lengths {'forced (ignore_eos)' if args.ignore_eos else 'up to max_tokens'}", "",
        format_vllm_table(result, percentiles, goodput, args.max_concurrency, _request_rate(args))]
    lines += _failure_lines(failures, bench, num_mismatch)
    summary = {"command": "bench", "argv": list(getattr(args, "_argv", [])), "base_url": args.base_url,
               "endpoint": args.endpoint, "model": model, "server": meta, "workload": {
                   "description": workload.description, "source": workload.source,
                   "num_requests": len(workload.requests)}, "measured": measured, "predicted": None}
    runs = [measured_run(results)]
    if setup is not None:
        text, predicted_run, extra = _predict(args, setup, requests, results, tokenizer, measured)
        lines += ["", text]
        summary.update(extra)
        if predicted_run is not None:
            runs.append(predicted_run)
    report = "\n".join(lines)
    paths = write_files(out, results, result, summary)
    from sim.workload import workload_to_jsonl

    # the requests as built, replayable with --trace and joined to requests.jsonl by request_id
    paths["workload.jsonl"] = workload_to_jsonl(workload, out / "workload.jsonl")
    pngs = []
    if not args.no_plots and any(r.success for r in results):
        from sim.plots import plot_latency_cdfs

        pngs = [plot_latency_cdfs(runs, out / "latency_cdfs.png"), plot_client_timeline(results, out / "timeline.png")]
    emit(args, report)
    emit(args, f"results in {out}/: {', '.join(sorted(paths) + [p.name for p in pngs])}")
    if args.json:
        import json

        from sim.report import _plain

        skip = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
                "generated_texts", "errors")
        doc = {"command": "bench", "vllm": {k: v for k, v in result.items() if k not in skip},
               "measured": measured, "predicted": summary.get("predicted"), "rel_error": summary.get("rel_error"),
               "out_dir": str(out)}
        sys.stdout.write(json.dumps(_plain(doc), allow_nan=False) + "\n")
    return 0


def _queue_stats(results) -> dict:
    from sim.metrics import percentiles

    return percentiles(r.client_queue_s for r in results if r.success)


def _failure_lines(failures, bench, num_mismatch: int) -> list[str]:
    lines = []
    if failures:
        lines += ["", f"failed requests: {sum(n for _, n, _ in failures)} (by reason, first request id):"]
        lines += [f"  {n} x {kind} (first: {rid})" for kind, n, rid in failures]
    if num_mismatch:
        lines.append(f"  {num_mismatch} request(s) got another number of tokens than asked: the server ignores "
                     "the length limit or ignore_eos, so they are not averaged in")
    if bench.num_not_sent:
        lines.append(f"{bench.num_not_sent} request(s) not sent: --max-duration ran out first")
    if bench.warmup_errors:
        lines.append(f"{len(bench.warmup_errors)} warm-up request(s) failed: {bench.warmup_errors[0]}")
    return lines


@dataclass(frozen=True)
class _Setup:
    """What --predict simulates: the server's policy, scheduler config and cost model, and where they came from."""

    spec: Any
    config: Any
    cost: Any
    cost_name: str
    source: str


def _prediction_setup(args: argparse.Namespace, meta: dict | None) -> _Setup | None:
    """The --predict configuration, checked before any request goes out (bad flags: exit 2 at once)."""
    if not args.predict:
        return None
    from backends.cost import load_cost_model
    from serve.bench_predict import server_config
    from sim.cli_common import build_config, default_profile
    from sim.cli_runs import parse_run_specs

    cost_name = args.cost or (meta or {}).get("cost") or default_profile(args.instances)[0]
    cost = load_cost_model(cost_name)
    base = server_config(meta) if meta else None  # flags override single fields on top of it
    config = build_config(args, cost, base=base)
    policy = args.policy or (meta or {}).get("policy") or "continuous"
    specs = parse_run_specs(policy)
    if len(specs) != 1:
        raise UsageError(f"--policy {policy!r} names {len(specs)} policies; a server runs one")
    source = "the server's /v1/models" if meta else "flags and defaults (the server does not report its setup)"
    if meta and _any_config_flag(args):
        source += ", flags on top"
    return _Setup(specs[0], config, cost, str(cost_name), source)


def _predict(args, setup: _Setup, requests, results, tokenizer, measured):
    """The simulator's run on the same requests; (report text, RunResult or None, summary fields)."""
    from dataclasses import asdict

    from serve.bench_predict import format_prediction, predict, prediction_workload, rel_errors

    c = setup.config
    info = {"policy": setup.spec.label, "cost_model": setup.cost_name, "scheduler": asdict(c),
            "config_from": setup.source}
    try:
        workload, notes = prediction_workload(requests, results, args.endpoint, tokenizer, args.ignore_eos,
                                              args.seed)
    except ValueError as exc:  # nothing to replay: the run's results stand alone
        return f"no prediction: {exc}", None, {"prediction": {**info, "error": str(exc)}}
    mismatched = frozenset(r.request_id for r in results if r.length_mismatch)
    run_, predicted = predict(workload, setup.spec.policy, c, setup.cost, args.instances, args.router, mismatched)
    errors = rel_errors(measured, predicted)
    how = (f"policy {setup.spec.label}, cost model {setup.cost_name}, max_num_seqs={c.max_num_seqs}, "
           f"max_num_batched_tokens={c.max_num_batched_tokens}, kv={c.num_kv_blocks}x{c.block_size}; "
           f"configuration from {setup.source}")
    text = format_prediction(measured, predicted, errors, how, notes)
    return text, run_, {"predicted": predicted, "rel_error": errors, "prediction": {**info, "notes": notes}}


def _any_config_flag(args) -> bool:
    names = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_blocks", "kv_tokens", "block_size",
             "max_prefill_chunk_tokens", "preemption_victim", "slot_choice")
    return any(getattr(args, n, None) is not None for n in names) or args.no_prefix_caching

