"""Flags shared by the CLI's subcommands, and the workload, cost model and scheduler config they build.

Reusable by any subcommand module: add_workload_args, add_scheduler_args,
add_backend_args and add_output_args declare the flags; build_workload,
resolve_cost_model and build_config turn parsed args into objects.

Which workload a run gets: --trace PATH reads a trace; else any synthetic flag
(--arrival, --rate, --cv, --num-requests, --prompt-len, --output-len,
--arrival-param) makes a seeded synthetic workload; else the bundled default
workload (sim.traces.default_workload) at DEFAULT_WORKLOAD scales.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import fields, replace

import numpy as np

from backends.cost.base import SizesScheduler
from scheduler import ROUTERS, SchedulerConfig
from scheduler.config import SLOT_CHOICES, VICTIM_RULES
from sim.arrivals import ARRIVALS
from sim.traces import FORMATS, TraceWarning, default_workload, load_trace
from sim.workload import MIN_TOKEN_ID, Workload, scale_workload, synthetic_workload

# Preferred bundled cost model first; the placeholder stands in until a calibrated profile is bundled.
DEFAULT_COST_MODELS = ("cpu-gemma3-270m", "cpu-gemma3-270m-placeholder")
# N instances on this machine share its cores: cpu-gemma3-270m-x2 is one of two instances with a thread each,
# calibrated while the other served (`tokenstep calibrate --instances 2`).
SHARED_PROFILE = "{}-x{}"
# The bundled Azure conversation slice (200 requests over 61 s, prompts ~900 and outputs ~235 tokens)
# on the 2-CPU gemma-3-270m profile: lengths / 10 and gaps x 1.5 offer 2.2 req/s against ~2 req/s
# served by continuous batching, so the load sits just past saturation during the trace's bursts.
# A 32-token prefix from 4 groups (a system prompt) overlays each prompt so prefix sharing shows.
DEFAULT_WORKLOAD = {"time_scale": 1.5, "length_scale": 0.1, "shared_prefix": 32, "prefix_groups": 4}
# Synthetic defaults mirror the default workload's scaled lengths (medians 89 and 18 tokens).
SYNTHETIC_DEFAULTS = {"arrival": "poisson", "rate": 1.0, "num_requests": 200,
                      "prompt_len": "lognormal:90,1.0", "output_len": "lognormal:18,0.9"}  # fmt: skip
SYNTHETIC_FLAGS = ("arrival", "rate", "cv", "num_requests", "prompt_len", "output_len", "arrival_param")
VOCAB_SIZE = 32000


class UsageError(ValueError):
    """Bad usage the user can fix (exit status 2)."""


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def float_list(text: str) -> list[float]:
    """argparse type: "1,2,4" -> [1.0, 2.0, 4.0], every value a finite number > 0."""
    items = [t for t in (s.strip() for s in str(text).split(",")) if t]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} lists no numbers; write e.g. 0.5,1,2")
    return [positive_float(t) for t in items]


def window(text: str) -> tuple[float, float]:
    """argparse type: "START,END" seconds of trace time."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be START,END in seconds, e.g. 0,600") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
        raise argparse.ArgumentTypeError(f"{text!r} must satisfy 0 <= START < END")
    return start, end


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and shape the workload."""
    d = DEFAULT_WORKLOAD
    g = parser.add_argument_group(
        "workload (trace, synthetic, or the bundled default when neither is given)",
        f"--trace replays a trace; any of --arrival/--rate/--cv/--num-requests/--prompt-len/--output-len makes a "
        f"seeded synthetic workload; otherwise the bundled default workload (200 requests of the Azure "
        f"conversation trace 2023) runs at time_scale {d['time_scale']:g}, length_scale {d['length_scale']:g}, "
        f"with a {d['shared_prefix']}-token shared prefix from {d['prefix_groups']} groups (each overridable).")
    g.add_argument("--trace", metavar="PATH", help="replay this trace file")
    g.add_argument("--trace-format", choices=list(FORMATS), help="trace format (detected when omitted)")
    g.add_argument("--arrival", choices=list(ARRIVALS),
                   help=f"synthetic arrival process (default {SYNTHETIC_DEFAULTS['arrival']})")
    g.add_argument("--rate", type=positive_float, metavar="R",
                   help=f"arrival rate, req/s (default {SYNTHETIC_DEFAULTS['rate']})")
    g.add_argument("--cv", type=positive_float, metavar="X", help="gap coefficient of variation (gamma arrivals)")
    g.add_argument("--arrival-param", action="append", metavar="KEY=VALUE",
                   help="extra arrival parameter, e.g. rate_end=4 for ramp (repeatable)")
    g.add_argument("--num-requests", type=positive_int, metavar="N",
                   help=f"synthetic requests (default {SYNTHETIC_DEFAULTS['num_requests']})")
    g.add_argument("--prompt-len", metavar="SPEC", help=f"prompt lengths (default {SYNTHETIC_DEFAULTS['prompt_len']})")
    g.add_argument("--output-len", metavar="SPEC", help=f"output lengths (default {SYNTHETIC_DEFAULTS['output_len']})")
    g.add_argument("--shared-prefix", type=nonnegative_int, metavar="N",
                   help="shared prefix tokens: synthetic prompts get it prepended; trace prompts get their "
                        "first N tokens replaced by it (trace lengths kept)")
    g.add_argument("--prefix-groups", type=positive_int, metavar="G", help="number of distinct shared prefixes")
    g.add_argument("--time-scale", type=positive_float, metavar="X", help="multiply arrival times (2 = half the rate)")
    g.add_argument("--length-scale", type=positive_float, metavar="X", help="multiply prompt and output lengths")
    g.add_argument("--window", type=window, metavar="START,END", help="trace: keep [START, END) seconds")
    g.add_argument("--limit", type=positive_int, metavar="N", help="trace or default workload: first N requests")
    g.add_argument("--sample", type=float, metavar="F", help="trace: keep each row with probability F")
    g.add_argument("--time-unit", choices=["s", "ms", "ns"],
                   help="JSONL trace: unit of a time field whose name gives none (timestamp, arrival_time, time)")
    g.add_argument("--repeat", type=positive_int, metavar="N",
                   help="trace: play it N times back to back, each copy one span plus one mean gap later, "
                        "with prefixes of its own (before --window, --sample and --limit)")
    g.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed for synthetic workloads and token ids (default 0)")


def add_scheduler_args(parser: argparse.ArgumentParser) -> None:
    """Scheduler limits and multi-instance flags (unset limits come from the backend or the cost model)."""
    g = parser.add_argument_group("scheduler limits (unset: SchedulerConfig defaults or the backend's)")
    g.add_argument("--max-num-seqs", type=positive_int, metavar="N", help="slots: requests running at once")
    g.add_argument("--max-num-batched-tokens", type=positive_int, metavar="N", help="token budget of one step")
    g.add_argument("--max-model-len", type=positive_int, metavar="N", help="longest prompt + output of one request")
    g.add_argument("--kv-blocks", type=positive_int, metavar="N", help="KV capacity in blocks")
    g.add_argument("--kv-tokens", type=positive_int, metavar="N",
                   help="KV capacity in tokens (rounded up to whole blocks)")
    g.add_argument("--block-size", type=positive_int, metavar="N", help="tokens per KV block")
    g.add_argument("--max-prefill-chunk-tokens", type=positive_int, metavar="N", help="per-request prefill chunk cap")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn shared-prefix KV reuse off for every run")
    g.add_argument("--preemption-victim", choices=list(VICTIM_RULES), help="which request to preempt")
    g.add_argument("--slot-choice", choices=list(SLOT_CHOICES),
                   help="compact (default): a new request goes next to the running slots and running requests "
                        "move into gaps; adjacent: no moves; any: any free slot")
    g.add_argument("--instances", type=positive_int, default=1, metavar="N", help="independent engines (default 1)")
    g.add_argument("--router", choices=list(ROUTERS), default="least_outstanding",
                   help="how requests are spread over instances (default least_outstanding)")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """--backend, --model and --cost."""
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", choices=["sim", "llama"], default="sim",
                   help="sim: SimPy + cost model (default); llama: real llama.cpp in real time")
    g.add_argument("--model", metavar="NAME|PATH", help="GGUF model for --backend llama (default gemma3-270m)")
    g.add_argument("--cost", metavar="NAME|FILE", help="cost model (default: see below)")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="--backend llama: CPU threads per context (default: the machine's 2 shared among the "
                        "instances, at least 1 each)")
    g.add_argument("--llama-option", action="append", metavar="KEY=VALUE",
                   help="--backend llama: context option such as n_ubatch=256, kv_unified=true (repeatable)")
    g.add_argument("--virtual-time", action="store_true",
                   help="--backend llama: advance a virtual clock by each measured step instead of replaying in "
                        "real time (arrivals need not wait; latencies as if the steps ran back to back)")
    add_gpu_args(g)


# --device shorthands: how many of the model's layers llama.cpp offloads (99 = every layer of any model)
DEVICE_GPU_LAYERS = {"cpu": 0, "cuda": 99, "gpu": 99}


def add_gpu_args(parser) -> None:
    """--n-gpu-layers N and --device cpu|cuda (a parser or an argument group)."""
    parser.add_argument("--n-gpu-layers", type=nonnegative_int, metavar="N",
                        help="real backend: offload N layers to the GPU (llama.cpp built with CUDA, Metal or "
                             "Vulkan; 99 = all; default 0, the CPU)")
    parser.add_argument("--device", choices=list(DEVICE_GPU_LAYERS),
                        help="real backend: cuda (or gpu) = --n-gpu-layers 99, cpu = 0")


def gpu_layers(args: argparse.Namespace) -> int | None:
    """The layers to offload from --n-gpu-layers / --device; None when neither is given."""
    n, device = getattr(args, "n_gpu_layers", None), getattr(args, "device", None)
    if n is not None and device is not None and n != DEVICE_GPU_LAYERS[device]:
        raise UsageError(f"--device {device} means --n-gpu-layers {DEVICE_GPU_LAYERS[device]}, but "
                         f"--n-gpu-layers {n} was given; give one of them")
    return n if n is not None else (DEVICE_GPU_LAYERS[device] if device is not None else None)


def add_output_args(parser: argparse.ArgumentParser, slo: bool = True, config: bool = True) -> None:
    """Output flags (--out, --json, --no-plots, --quiet), with the SLO and config-file flags unless told not to."""
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="result folder (default results/<command>-<timestamp>)")
    if slo:
        g.add_argument("--slo", metavar="SPEC", help="latency targets, e.g. ttft=0.5,tpot=50ms,e2e=10 (adds goodput)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    if config:
        g.add_argument("--config", metavar="FILE.toml", help="read flag values from a TOML file (flags win)")


def workload_kind(args: argparse.Namespace) -> str:
    """'trace', 'synthetic' or 'default' (see the module docstring)."""
    if args.trace:
        return "trace"
    if any(getattr(args, name, None) is not None for name in SYNTHETIC_FLAGS):
        return "synthetic"
    return "default"


def _arrival_params(args: argparse.Namespace) -> dict[str, float]:
    params: dict[str, float] = {}
    for item in getattr(args, "arrival_param", None) or []:
        key, eq, value = str(item).partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            raise UsageError(f"--arrival-param {item!r} must look like key=number, e.g. rate_end=4")
    return params


def check_kind_flags(args: argparse.Namespace, kind: str) -> None:
    """Reject flags that do not apply to this kind of workload."""
    if kind != "trace":
        for flag in ("window", "sample", "trace_format", "repeat", "time_unit"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} applies to --trace only")
    if kind == "synthetic" and args.limit is not None:
        raise UsageError("--limit applies to a trace or the default workload; use --num-requests for synthetic")
    if kind == "trace":
        given = [f"--{n.replace('_', '-')}" for n in ("arrival", "cv", "num_requests", "prompt_len", "output_len",
                                                      "arrival_param") if getattr(args, n, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} make a synthetic workload and cannot be combined with --trace")


def synthetic(args: argparse.Namespace, rate: float) -> Workload:
    """The seeded synthetic workload at this rate (same seed: same lengths and prompts at every rate)."""
    d = SYNTHETIC_DEFAULTS
    w = synthetic_workload(args.arrival or d["arrival"], rate, args.num_requests or d["num_requests"],
                           args.prompt_len or d["prompt_len"], args.output_len or d["output_len"], args.seed,
                           cv=args.cv, shared_prefix_tokens=args.shared_prefix or 0,
                           num_prefix_groups=args.prefix_groups or 1, vocab_size=VOCAB_SIZE,
                           **_arrival_params(args))
    if args.length_scale is not None and args.length_scale != 1.0:
        w = scale_workload(w, 1.0, args.length_scale)
    return w


def build_workload(args: argparse.Namespace, with_time_scale: bool = True) -> Workload:
    """The workload the flags describe (with_time_scale=False leaves arrival times for the caller to scale)."""
    kind = workload_kind(args)
    check_kind_flags(args, kind)
    time_scale = args.time_scale if with_time_scale and args.time_scale is not None else 1.0
    if kind == "synthetic":
        w = synthetic(args, args.rate if args.rate is not None else SYNTHETIC_DEFAULTS["rate"])
        return scale_workload(w, time_scale, 1.0) if time_scale != 1.0 else w
    if kind == "trace":
        if with_time_scale and args.rate is not None:
            raise UsageError("--rate makes a synthetic workload; change a trace's rate with --time-scale")
        with warnings.catch_warnings(record=True) as caught:  # a trace's warnings, one stderr line each
            warnings.simplefilter("always", TraceWarning)
            w = load_trace(args.trace, args.trace_format, time_scale, args.length_scale or 1.0, window_s=args.window,
                           limit=args.limit, sample=args.sample, seed=args.seed, vocab_size=VOCAB_SIZE,
                           repeat=getattr(args, "repeat", None) or 1, time_unit=getattr(args, "time_unit", None))
        for item in caught:
            if not issubclass(item.category, TraceWarning):
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
            elif not getattr(args, "quiet", False):
                print(f"tokenstep: warning: {item.message}", file=sys.stderr, flush=True)
        prefix, groups = args.shared_prefix or 0, args.prefix_groups or 1
    else:
        d = DEFAULT_WORKLOAD
        if with_time_scale and args.time_scale is None:
            time_scale = d["time_scale"]
        length_scale = args.length_scale if args.length_scale is not None else d["length_scale"]
        w = default_workload(time_scale, length_scale, limit=args.limit)
        prefix = d["shared_prefix"] if args.shared_prefix is None else args.shared_prefix
        groups = args.prefix_groups or d["prefix_groups"]
    return overlay_prefix(w, prefix, groups, args.seed) if prefix else w


def overlay_prefix(w: Workload, num_tokens: int, num_groups: int, seed: int) -> Workload:
    """Replace the first num_tokens of every prompt by one of num_groups seeded prefixes; lengths stay."""
    if any(not r.prompt_token_ids for r in w.requests):
        raise UsageError("--shared-prefix needs prompts of token ids; this trace carries text prompts")
    rng = np.random.default_rng([seed, num_tokens, num_groups])
    table = rng.integers(MIN_TOKEN_ID, VOCAB_SIZE, size=(num_groups, num_tokens)).tolist()
    groups = rng.integers(0, num_groups, size=len(w.requests)).tolist()
    requests = []
    for r, g in zip(w.requests, groups, strict=True):
        ids = r.prompt_token_ids
        head = tuple(table[g][: len(ids)])
        requests.append(replace(r, prompt_token_ids=head + ids[len(head):]))
    which = "a shared prefix" if num_groups == 1 else f"one of {num_groups} shared prefixes"
    desc = f"{w.description}; first {num_tokens} prompt tokens replaced by {which} (seed {seed})"
    source = {"kind": "prefix_overlay", "base": w.source, "shared_prefix_tokens": num_tokens,
              "num_prefix_groups": num_groups, "seed": seed}
    return Workload(tuple(requests), desc, source)


def default_profile(instances: int = 1) -> tuple[str, str]:
    """(name, note) of the bundled profile for `instances` instances sharing this machine.

    One instance: the first of DEFAULT_COST_MODELS that is bundled. N > 1: its -xN variant (one of N
    instances sharing the cores) when bundled, else the one-instance profile, which prices each instance
    as if it had a machine of its own.
    """
    from backends.cost import known_cost_models

    known = known_cost_models()
    for name in DEFAULT_COST_MODELS:
        if name not in known:
            continue
        note = "default" if name == DEFAULT_COST_MODELS[0] else (
            f"default; {DEFAULT_COST_MODELS[0]} is not bundled yet, so the uncalibrated placeholder is used")
        if instances > 1:
            shared = SHARED_PROFILE.format(name, instances)
            if shared in known:
                return shared, (f"default for {instances} instances: one of {instances} sharing this machine's cores "
                                f"(give --cost {name} to price each instance as a machine of its own)")
            note += (f"; no bundled profile for {instances} instances sharing one machine, so each instance is "
                     "priced as a machine of its own")
        return name, note
    raise UsageError(f"none of the default cost models {', '.join(DEFAULT_COST_MODELS)} is bundled; give --cost")


def resolve_cost_model(args: argparse.Namespace):
    """(cost model, name, note): --cost, else the bundled default for --instances (default_profile)."""
    from backends.cost import load_cost_model

    if args.cost:
        return load_cost_model(args.cost), str(args.cost), "given by --cost"
    name, note = default_profile(getattr(args, "instances", 1) or 1)
    return load_cost_model(name), name, note


_LIMITS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "max_prefill_chunk_tokens",
           "preemption_victim", "slot_choice")


def gpu_profile_limits(cost_model) -> dict:
    """A table profile calibrated on a GPU context: the scheduler limits that context served (256 slots, 8k-token
    steps, its KV cells: meta["scheduler"]), which the simulator takes unless flags say otherwise; {} for any other
    model (the CPU profiles keep the scheduler's defaults)."""
    meta = getattr(cost_model, "meta", None) or {}
    if not (meta.get("context") or {}).get("n_gpu_layers"):
        return {}
    limits = meta.get("scheduler") or {}
    keys = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks", "block_size")
    return {k: int(limits[k]) for k in keys if isinstance(limits.get(k), int) and limits[k] > 0}


def build_config(args: argparse.Namespace, cost_model=None, base: SchedulerConfig | None = None) -> SchedulerConfig:
    """The SchedulerConfig: base (else the cost model's capacity, else defaults) with the flags given on top."""
    if base is None:
        base = SchedulerConfig(**cost_model.capacity()) if isinstance(cost_model, SizesScheduler) else SchedulerConfig()
        served = gpu_profile_limits(cost_model)
        if served:
            base = replace(base, **served)
    overrides = {name: getattr(args, name) for name in _LIMITS if getattr(args, name, None) is not None}
    if args.kv_blocks is not None and args.kv_tokens is not None:
        raise UsageError("give --kv-blocks or --kv-tokens, not both")
    block_size = overrides.get("block_size", base.block_size)
    if args.kv_blocks is not None:
        overrides["num_kv_blocks"] = args.kv_blocks
    elif args.kv_tokens is not None:
        overrides["num_kv_blocks"] = -(-args.kv_tokens // block_size)
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    return replace(base, **overrides)


CONFIG_FIELDS = tuple(f.name for f in fields(SchedulerConfig))
