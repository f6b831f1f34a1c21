"""Strategies on the real backend, side by side in one process, reported as ratios.

    python benchmarks/bench_real_strategies.py [--quick]

1. continuous vs static on a scaled slice of the Azure 2023 conversation trace near saturation;
2. prefix sharing on vs off on a workload whose prompts share a system prompt;
3. prefix sharing on vs off on a scaled slice of the Mooncake trace (its real block reuse).
Each is one `tokenstep compare --backend llama --json` run; the ratios are computed from its summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sim.cli import main as cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MOONCAKE = os.path.join(HERE, "..", "..", "shared", "traces", "mooncake", "synthetic_trace.jsonl")
if not os.path.exists(MOONCAKE):
    MOONCAKE = os.path.join(HERE, "..", "tests", "fixtures", "mooncake_synthetic_50.jsonl")

SCENARIOS = {
    "azure: continuous vs static": ["--policies", "static,continuous", "--limit", "60", "--time-scale", "0.4",
                                    "--length-scale", "0.1", "--shared-prefix", "0"],
    "system prompt: prefix sharing on vs off": ["--policies", "continuous+noprefix,continuous", "--arrival", "poisson",
                                                "--rate", "2", "--num-requests", "60", "--prompt-len",
                                                "uniform:8,32", "--output-len", "fixed:16", "--shared-prefix",
                                                "160", "--prefix-groups", "1"],
    "mooncake: prefix sharing on vs off": ["--policies", "continuous+noprefix,continuous", "--trace", MOONCAKE,
                                           "--limit", "50", "--length-scale", "0.004", "--time-scale", "2"],
}
KEYS = [("throughput_rps",), ("output_tokens_per_s",), ("ttft_s", "p50"), ("ttft_s", "p99"), ("e2e_s", "p50"),
        ("e2e_s", "p99")]


def get(summary, path):
    """A nested value."""
    for p in path:
        summary = summary[p]
    return summary


def run(name: str, flags: list[str], quick: bool) -> dict:
    """One compare on the real backend; returns its summaries and ratios (second run / first run)."""
    if quick:
        flags = [*flags, "--limit", "20"] if "--limit" not in flags else flags
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(["compare", "--backend", "llama", "--json", "--no-plots", "--quiet", *flags])
    if code != 0:
        raise SystemExit(f"{name}: tokenstep compare exited {code}")
    runs = [r for r in json.loads(buf.getvalue())["runs"] if not r["policy"].endswith("(sim)")]
    base, other = runs
    ratios = {"_".join(k): get(other, k) / get(base, k) for k in KEYS if get(base, k)}
    return {"scenario": name, "baseline": base["policy"], "candidate": other["policy"], "ratios": ratios,
            "baseline_summary": {"_".join(k): get(base, k) for k in KEYS},
            "candidate_summary": {"_".join(k): get(other, k) for k in KEYS},
            "prefix_hit_rate": [base["prefix_hit_rate"], other["prefix_hit_rate"]]}


def main() -> int:
    """Run every scenario and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 requests per scenario")
    ap.add_argument("--only", help="run only scenarios whose name contains this")
    args = ap.parse_args()
    results = [run(n, f, args.quick) for n, f in SCENARIOS.items() if not args.only or args.only in n]
    for r in results:
        print(f"{r['scenario']}: {r['candidate']} / {r['baseline']}")
        for k, v in r["ratios"].items():
            print(f"  {k:>20}: {v:6.2f}x   ({r['baseline_summary'][k]:.3f} -> {r['candidate_summary'][k]:.3f})")
        print(f"  {'prefix hit rate':>20}: {r['prefix_hit_rate'][0]:.1%} -> {r['prefix_hit_rate'][1]:.1%}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
