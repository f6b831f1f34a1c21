"""One engine with the machine's threads against N engines sharing them, on the real backend, side by side.

    python benchmarks/multi_instance.py [--instances 2] [--limit 120] [--time-scale 0.4] [--policy continuous]

Runs `tokenstep compare --backend llama --instances 1` and then `--instances N` on the same workload in one
process (the default trace slice, lengths x0.1), each real run followed by its simulated prediction with the
default profile for that instance count (cpu-gemma3-270m, cpu-gemma3-270m-x2). Prints N engines / one engine
for the measured runs and for the predictions: whether the simulator predicts what splitting the machine does.
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

KEYS = [("throughput_rps",), ("output_tokens_per_s",), ("ttft_s", "mean"), ("ttft_s", "p50"), ("ttft_s", "p99"),
        ("tpot_s", "mean"), ("e2e_s", "mean"), ("e2e_s", "p99")]


def get(summary: dict, path: tuple) -> float:
    """A nested value."""
    for p in path:
        summary = summary[p]
    return summary


def compare(instances: int, args: argparse.Namespace) -> tuple[dict, dict, str]:
    """(measured summary, predicted summary, cost model) of one real run with `instances` engines."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(["compare", "--backend", "llama", "--instances", str(instances), "--policies", args.policy,
                    "--limit", str(args.limit), "--time-scale", str(args.time_scale), "--seed", str(args.seed),
                    "--json", "--no-plots", "--quiet"])
    if code != 0:
        raise SystemExit(f"tokenstep compare --instances {instances} exited {code}")
    doc = json.loads(buf.getvalue())
    runs = {r["policy"].endswith("(sim)"): r for r in doc["runs"]}
    return runs[False], runs[True], doc["cost_model"]


def main() -> int:
    """Run both and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--time-scale", type=float, default=0.4)
    ap.add_argument("--policy", default="continuous")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    one, one_sim, cost_one = compare(1, args)
    many, many_sim, cost_many = compare(args.instances, args)
    print(f"{args.instances} engines / 1 engine, {args.policy}, {args.limit} requests at time scale {args.time_scale}; "
          f"predicted with {cost_one} and {cost_many}")
    print(f"{'':>20} {'measured':>10} {'predicted':>10}   (1 engine -> {args.instances} engines, measured)")
    rows = []
    for k in KEYS:
        name = "_".join(k)
        m = get(many, k) / get(one, k) if get(one, k) else None
        p = get(many_sim, k) / get(one_sim, k) if get(one_sim, k) else None
        rows.append({"metric": name, "measured_ratio": m, "predicted_ratio": p, "one": get(one, k),
                     "many": get(many, k), "one_sim": get(one_sim, k), "many_sim": get(many_sim, k)})
        print(f"{name:>20} {m:>9.3f}x {p:>9.3f}x   ({get(one, k):.4g} -> {get(many, k):.4g})")
    print(json.dumps({"instances": args.instances, "cost_models": [cost_one, cost_many], "policy": args.policy,
                      "limit": args.limit, "time_scale": args.time_scale, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
