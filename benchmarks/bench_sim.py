"""Simulator speed: replay the full Azure 2023 conversation trace under `chunked` on the H100/Llama-3-8B roofline.

    python benchmarks/bench_sim.py [--trace PATH] [--limit N] [--compare-plain N]

Prints trace-loading time and replay time separately, simulated duration / replay wall time
("x real time"), and, with --compare-plain N, the step-by-step and fast-forward replays of the
first N requests side by side (same process), with their ratio and a check that results are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends.cost import load_cost_model  # noqa: E402
from backends.synthetic import SyntheticBackend  # noqa: E402
from scheduler import SchedulerConfig  # noqa: E402
from sim.metrics import summarize  # noqa: E402
from sim.model import run_workload  # noqa: E402
from sim.traces import load_trace  # noqa: E402

DEFAULT_TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "azure2023",
                             "AzureLLMInferenceTrace_conv.csv")


def replay(workload, fast_forward: bool):
    """One replay; returns (run, wall seconds)."""
    cost = load_cost_model("h100-llama3-8b")
    cfg = SchedulerConfig(**cost.capacity())
    t0 = time.perf_counter()
    run = run_workload(workload, "chunked", cfg, [SyntheticBackend(cost)], fast_forward=fast_forward)
    return run, time.perf_counter() - t0


def main() -> int:
    """Run the benchmark and print a report (and --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--compare-plain", type=int, default=0, metavar="N")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    w = load_trace(args.trace, "azure", limit=args.limit)
    load_s = time.perf_counter() - t0
    run, wall = replay(w, True)
    s = summarize(run)
    out = {"requests": len(w.requests), "load_s": load_s, "replay_s": wall, "simulated_s": run.duration_s,
           "x_real_time": run.duration_s / wall, "steps": len(run.steps), "throughput_rps": s["throughput_rps"],
           "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"],
           "python": platform.python_version(), "cpus": os.cpu_count()}
    if args.compare_plain:
        part = type(w)(w.requests[: args.compare_plain], w.description, w.source)
        plain, plain_s = replay(part, False)
        fast, fast_s = replay(part, True)
        fields = lambda run: [[getattr(r, f) for f in r.__dataclass_fields__] for r in run.records]  # noqa: E731
        same = fields(plain) == fields(fast)
        out.update({"plain_requests": len(part.requests), "plain_s": plain_s, "fast_s": fast_s,
                    "fast_speedup": plain_s / fast_s, "identical_records": same})
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
