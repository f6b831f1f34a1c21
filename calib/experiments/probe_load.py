"""Does a speed probe read the machine's speed differently at another load? Probes at two loads, interleaved.

    python calib/experiments/probe_load.py [--loads 0.7,1.2] [--repeats 3] [--requests 64 | --requests 64,200]

`validate` prices every load at the run factors of real-time probes run at 0.7x the capacity the profile
predicts (calib.probes.probe_run_factor: requests drawn from validate's default workload, continuous batching). A
saturated load keeps the engine busy without a pause and runs larger batches; a light one idles between
bursts. This runs the same probe at each of --loads in turn, --repeats times (ABAB...), in one process, and
prints each probe's two factors (decode-only steps, steps with prompt tokens) and the mean difference of
each load's factors from the first load's, over the repeats, with the neighbouring probes as the reference.
--requests takes one count for every load or one per load: a long run at a saturated load (say 200 requests
at 1.3x, about a minute without a pause) against 0.7x probes of validate's size asks whether a long busy
stretch runs at the speed the probes around it read.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from calib.cli_validate import _workload  # noqa: E402
from calib.probes import probe_run_factor  # noqa: E402
from sim.cli import build_parser  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402


def loads_and_counts(ap: argparse.ArgumentParser, loads: str, requests: str) -> tuple[list[float], list[int]]:
    """--loads "0.7,1.2" and --requests "64" or "64,200": the loads, and one request count per load."""
    shares = [float(x) for x in loads.split(",")]
    counts = [int(x) for x in requests.split(",")]
    if len(counts) not in (1, len(shares)):
        ap.error(f"--requests: give one count or {len(shares)} (one per load), not {len(counts)}")
    return shares, counts * len(shares) if len(counts) == 1 else counts


def main() -> int:
    """Probe, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", default="0.7,1.2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", default="64", help="one count, or one per load (comma-separated)")
    ap.add_argument("--profile", default="cpu-gemma3-270m")
    args = ap.parse_args()
    loads, counts = loads_and_counts(ap, args.loads, args.requests)
    counts = dict(zip(loads, counts, strict=True))
    profile = load_cost_model(args.profile)
    parser, _ = build_parser("validate")
    workload = _workload(parser.parse_args(["validate", "--quiet"]))  # validate's default workload
    backends, config = make_llama_instances(None, 1)
    rows = []
    try:
        for rep in range(args.repeats):
            for load in loads:
                p = probe_run_factor(backends, config, profile, False, 0, lambda _t: None, requests=counts[load],
                                     sample_of=workload, policy="continuous", load=load)
                rows.append((rep, load, p["run_factor"], p["prefill_run_factor"], p["steps"], p["wall_s"]))
                print(f"repeat {rep + 1} load {load:g}x: decode-only x{p['run_factor']:.4f}, with prompt tokens "
                      f"x{p['prefill_run_factor']:.4f} ({p['steps']} steps, {p['wall_s']:.0f} s)", flush=True)
    finally:
        close_instances(backends)
    # each probe against the mean of the first load's probes just before and after it (or the one there is)
    for k, name in ((2, "decode-only"), (3, "with prompt tokens")):
        for load in loads[1:]:
            diffs = []
            for i, r in enumerate(rows):
                if r[1] != load:
                    continue
                ref = [x[k] for x in (rows[i - 1] if i else None, rows[i + 1] if i + 1 < len(rows) else None)
                       if x is not None and x[1] == loads[0]]
                if ref:
                    diffs.append(r[k] / np.mean(ref) - 1)
            print(f"{name}: {load:g}x against {loads[0]:g}x: " + ", ".join(f"{d:+.1%}" for d in diffs)
                  + f"; mean {np.mean(diffs):+.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
