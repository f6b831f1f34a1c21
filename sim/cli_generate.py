"""Generate completions on the real model: JSONL prompts in, JSONL completions out, batched."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from scheduler import SamplingParams
from sim.cli_common import add_gpu_args, gpu_layers
from sim.metrics import percentiles
from sim.progress import Progress, progress_enabled

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "ignore_eos")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `tokenstep generate`."""
    parser.add_argument("--input", required=True, help="JSONL prompts ({'prompt': ...} or {'messages': [...]}), or -")
    parser.add_argument("--output", default="-", help="JSONL completions, in input order (default: stdout)")
    parser.add_argument("--model", default=None, help="model name (gemma3-270m, smollm2-135m) or GGUF path")
    parser.add_argument("--max-tokens", type=int, default=64, help="default max_tokens per request (64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="default sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past EOS")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="slots: requests decoded together (16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="KV cells of the context (4096)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    add_gpu_args(parser)
    parser.add_argument("--policy", default="continuous", help="scheduling policy (continuous)")
    parser.add_argument("--json", action="store_true", help="print a one-object summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Parse the JSONL input; errors name the line and the field."""
    name = "<stdin>" if path == "-" else path
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read --input {path}: {exc.strerror}") from None
    items = []
    with stream:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not ({"prompt", "messages"} & obj.keys()):
                raise ValueError(f"{name} line {lineno}: expected an object with 'prompt' or 'messages'")
            if "prompt" in obj and not isinstance(obj["prompt"], str):
                raise ValueError(f"{name} line {lineno}, field 'prompt': must be a string")
            if "messages" in obj and not (isinstance(obj["messages"], list)
                                          and all(isinstance(m, dict) and "content" in m for m in obj["messages"])):
                raise ValueError(f"{name} line {lineno}, field 'messages': must be a list of "
                                 "{'role': ..., 'content': ...} objects")
            obj["_line"] = lineno
            items.append(obj)
    if not items:
        raise ValueError(f"{name}: no prompts found")
    return items


def sampling_for(item: dict[str, Any], args: argparse.Namespace, name: str) -> SamplingParams:
    """Per-line sampling fields over the command's defaults."""
    fields: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
                              "ignore_eos": args.ignore_eos}
    for key in SAMPLING_FIELDS:
        if key in item:
            fields[key] = tuple(item[key]) if key == "stop" and isinstance(item[key], list) else item[key]
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} line {item['_line']}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """Generate every prompt, write completions, print the summary."""
    from serve.engine import LLM

    items = read_prompts(args.input)
    name = "<stdin>" if args.input == "-" else args.input
    prompts = []
    for i, item in enumerate(items):
        prompts.append({"id": str(item.get("id", i)), "prompt": item.get("prompt"), "messages": item.get("messages"),
                        "priority": item.get("priority", 0), "sampling": sampling_for(item, args, name)})
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: duplicate 'id' values; ids must be unique")
    llm = LLM(args.model, args.policy, n_ctx=args.n_ctx, max_num_seqs=args.max_num_seqs, n_threads=args.threads,
              n_gpu_layers=gpu_layers(args) or 0)
    try:
        with Progress("generate", enabled=progress_enabled(args.quiet)) as bar:
            completions = llm.generate(prompts, progress=bar)
    finally:
        llm.close()
    to_stdout = args.output == "-"
    with contextlib.nullcontext(sys.stdout) if to_stdout else open(args.output, "w", encoding="utf-8") as out:
        for c in completions:
            out.write(json.dumps({"id": c.request_id, "text": c.text, "finish_reason": c.finish_reason,
                                  "num_prompt_tokens": c.num_prompt_tokens, "num_output_tokens": c.num_output_tokens,
                                  "ttft_s": c.ttft_s, "e2e_s": c.e2e_s, "detail": c.detail},
                                 ensure_ascii=False) + "\n")
    summary = summarize_completions(completions)
    if args.json and args.output != "-":
        print(json.dumps(summary))
    else:
        print(f"{summary['num_requests']} requests, {summary['output_tokens_per_s']:.1f} output tok/s, "
              f"TTFT p50 {summary['ttft_s']['p50']:.3f} s, E2E p50 {summary['e2e_s']['p50']:.3f} s "
              f"(TTFT taken when the first text is delivered)", file=sys.stderr)
    return 0


def summarize_completions(completions: list) -> dict[str, Any]:
    """num_requests, output tokens/s over the whole run, TTFT and E2E percentiles."""
    start = min(c.arrival_s for c in completions)
    end = max(c.finish_s for c in completions)
    tokens = sum(c.num_output_tokens for c in completions)
    return {"num_requests": len(completions), "duration_s": end - start,
            "output_tokens_per_s": tokens / (end - start) if end > start else 0.0,
            "ttft_s": percentiles([c.ttft_s for c in completions if c.ttft_s is not None]),
            "e2e_s": percentiles([c.e2e_s for c in completions]),
            "finish_reasons": {r: sum(c.finish_reason == r for c in completions)
                               for r in sorted({c.finish_reason for c in completions})},
            "ttft_timing": "delivered"}

