"""Slot choices in the simulator (`any`, `adjacent`, `compact`), side by side on the validation workload.

    python benchmarks/bench_slot_choice.py [--choices any,adjacent,compact] [--profile NAME|FILE] [--real RATE] [--json]

The bundled Azure slice (200 requests, lengths x0.1, 32-token shared prefixes from 4 groups), arrivals
re-timed as Poisson at 1.11, 2.6 and 4.45 req/s (about 0.3x, 0.7x and 1.2x of capacity), `continuous` and
`chunked` (budget 128), on the calibrated profile, which prices llama.cpp's micro-batches from the slots
(a KV stream per slot: one forward pass per run of consecutive slot ids). Every choice runs on the same
workload in one process; the table gives TPOT and E2E means with their ratios to the first choice, forward
passes per step, moves per request (compaction) and the prefix hit rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends.cost import load_cost_model  # noqa: E402
from backends.cost.ubatch import split_ubatches  # noqa: E402
from backends.synthetic import SyntheticBackend  # noqa: E402
from calib.measure import retime  # noqa: E402
from scheduler import SchedulerConfig  # noqa: E402
from scheduler.config import SLOT_CHOICES  # noqa: E402
from sim.metrics import summarize  # noqa: E402
from sim.model import run_workload  # noqa: E402

RATES = (1.11, 2.6, 4.45)
POLICIES = {"continuous": {}, "chunked": {"max_num_batched_tokens": 128}}


class PassCounter(SyntheticBackend):
    """Counts llama.cpp forward passes (micro-batches) per step, as the profile splits them (run it step by
    step: the decode fast-forward skips step())."""

    def __init__(self, cost_model) -> None:
        super().__init__(cost_model)
        self.passes: list[int] = []
        self.moves = 0

    def step(self, plan):
        """The inner step; records the plan's micro-batch count and slot moves."""
        self.moves += sum(c.move for c in plan.copies)
        if plan.chunks:
            m = self.cost_model
            self.passes.append(len(split_ubatches(plan, m.n_batch, m.n_ubatch, m.kv_unified)))
        return super().step(plan)


def run_real(workload, profile, base: SchedulerConfig, rate: float, choices: list[str]) -> list[dict]:
    """Continuous at `rate` on the real backend, the slot choices in turn, twice (a, b, a, b)."""
    from calib.cli_validate import _llama_options
    from calib.measure import TimedBackend
    from sim.real import close_instances, make_llama_instances

    backends, real = make_llama_instances(None, 1, _llama_options(profile))
    out = []
    try:
        w = retime(workload, rate, 0)
        for choice in choices * 2:
            cfg = dataclasses.replace(real, slot_choice=choice)
            s = summarize(run_workload(w, "continuous", cfg, [TimedBackend(backends[0])], realtime=True))
            out.append({"slot_choice": choice, "tpot_mean_s": s["tpot_s"]["mean"], "e2e_mean_s": s["e2e_s"]["mean"],
                        "ttft_mean_s": s["ttft_s"]["mean"], "throughput_rps": s["throughput_rps"],
                        "prefix_hit_rate": s["prefix_hit_rate"]})
    finally:
        close_instances(backends)
    return out


def main() -> int:
    """Run the slot choices; print a table (or --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-gemma3-270m")
    ap.add_argument("--choices", default="any,adjacent,compact",
                    help="comma-separated slot choices; ratios are to the first (default: any,adjacent,compact)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--real", type=float, metavar="RATE",
                    help="also run continuous at RATE req/s on the real backend (gemma3-270m, the profile's context) "
                         "with each slot choice in turn, twice, in real time")
    args = ap.parse_args()
    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    for c in choices:
        if c not in SLOT_CHOICES:
            ap.error(f"--choices: unknown slot choice {c!r}; choose from {', '.join(SLOT_CHOICES)}")
    profile = load_cost_model(args.profile)
    from calib import cli_validate
    from sim.cli import _parse

    workload = cli_validate._workload(_parse(["validate", "--quiet"]))  # validate's default workload
    base = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=512,
                           block_size=16)
    rows = []
    for policy, limits in POLICIES.items():
        for rate in RATES:
            w = retime(workload, rate, 0)
            row = {"policy": policy, "rate": rate}
            for choice in choices:
                backend = PassCounter(profile)
                cfg = dataclasses.replace(base, slot_choice=choice, **limits)
                records = run_workload(w, policy, cfg, [backend], fast_forward=False)
                s = summarize(records)
                row[choice] = {"tpot_mean_s": s["tpot_s"]["mean"], "e2e_mean_s": s["e2e_s"]["mean"],
                               "throughput_rps": s["throughput_rps"], "prefix_hit_rate": s["prefix_hit_rate"],
                               "passes_per_step": sum(backend.passes) / len(backend.passes),
                               "moves_per_request": backend.moves / len(records.records)}
            rows.append(row)
    real = run_real(workload, profile, base, args.real, choices) if args.real else []
    if args.json:
        print(json.dumps({"profile": args.profile, "choices": choices, "rows": rows, "real": real}))
        return 0
    for r in real:
        print(f"real continuous {args.real} req/s, {r['slot_choice']:>8}: TPOT mean {r['tpot_mean_s'] * 1e3:.1f} ms, "
              f"E2E mean {r['e2e_mean_s']:.2f} s, TTFT mean {r['ttft_mean_s'] * 1e3:.0f} ms, "
              f"throughput {r['throughput_rps']:.2f} req/s, hit rate {r['prefix_hit_rate'] * 100:.0f}%")
    first = choices[0]
    print("policy     rate  choice   | TPOT mean        | E2E mean        | passes/step | moves/req | hit rate")
    for r in rows:
        a = r[first]
        for c in choices:
            b = r[c]
            tpot, e2e = b["tpot_mean_s"], b["e2e_mean_s"]
            print(f"{r['policy']:<10} {r['rate']:4.2f}  {c:<8} | {tpot * 1e3:6.1f} ms ({tpot / a['tpot_mean_s']:.2f}x)"
                  f" | {e2e:5.2f} s ({e2e / a['e2e_mean_s']:.2f}x) | {b['passes_per_step']:11.2f}"
                  f" | {b['moves_per_request']:9.2f} | {b['prefix_hit_rate'] * 100:.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
