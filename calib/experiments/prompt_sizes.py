"""Time single prompts of given sizes on the real backend against a profile's price: where the cost model bends.

    python calib/experiments/prompt_sizes.py [--sizes 240,256,264,...] [--start P] [--repeats 5]
        [--profile NAME|FILE ...]

Each size is one step of one sequence: a prompt chunk of n tokens at position P (after a first chunk of P
tokens in the same slot when P > 0, untimed), sampled at its last token, on the default model with the
profile's context settings. Sizes run in a shuffled order, each --repeats times, the KV cache cleared
before each; the table gives the median and fastest wall time and each profile's grid price (run factors
set aside, so a machine slower or faster than at calibration shifts every row alike: read the rows
against each other). Several --profile options price the same timings side by side; the context settings
are the first one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from backends.cost import load_cost_model  # noqa: E402
from backends.cost.table import TableCostModel  # noqa: E402
from calib.cli_validate import _llama_options  # noqa: E402
from calib.samples import plan_from_row  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402

DEFAULT_SIZES = "64,96,128,160,192,240,256,264,272,288,320,352,384,400,409,448,500"


def chunk(slot: int, start: int, n: int, sample: bool):
    return plan_from_row({"chunks": [[slot, start, n, 0, int(sample), 0]], "removes": [], "copies": []})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"prompt tokens, comma-separated (default {DEFAULT_SIZES})")
    ap.add_argument("--start", type=int, default=0, help="position of the timed chunk (default 0)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per size (default 5)")
    ap.add_argument("--profile", action="append", help="profile to price with, repeatable (default: bundled)")
    args = ap.parse_args(argv)
    names = args.profile or ["cpu-gemma3-270m"]
    try:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--sizes: comma-separated integers expected, got {args.sizes!r}")
    try:
        profiles = [load_cost_model(name) for name in names]
    except ValueError as exc:  # CostModelError: no such profile, or a broken one
        ap.error(f"--profile: {exc}")
    for name, profile in zip(names, profiles, strict=True):
        if not isinstance(profile, TableCostModel):
            ap.error(f"--profile {name}: a table profile (from tokenstep calibrate) is needed")
    profile = profiles[0]
    limit = min(p.n_batch for p in profiles)
    if not sizes or any(n < 1 or args.start + n > 512 or n > limit for n in sizes) or args.start < 0:
        ap.error(f"--sizes/--start: each chunk must be 1..{limit} tokens and end by position 512 (one slot)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    grids = [dataclasses.replace(p, run_factor=1.0, prefill_run_factor=None) for p in profiles]
    backends, _ = make_llama_instances(None, 1, _llama_options(profile))
    backend = backends[0]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        for _ in range(2):  # the first decode of a context allocates its compute graph
            backend.clear_kv()
            backend.step(chunk(0, 0, 64, True))
        rng = np.random.default_rng(0)
        for _ in range(args.repeats):
            for n in rng.permutation(sizes):
                backend.clear_kv()
                if args.start:
                    backend.step(chunk(0, 0, args.start, False))
                plan = chunk(0, args.start, int(n), True)
                t0 = time.perf_counter()
                backend.step(plan)
                times[int(n)].append(time.perf_counter() - t0)
    finally:
        close_instances(backends)
    print(f"one prompt chunk at position {args.start}, {args.repeats} timings each; grid prices (run factors set "
          "aside) of " + ", ".join(f"[{i + 1}] {name}" for i, name in enumerate(names)))
    print(f"{'tokens':>6} {'median ms':>10} {'fastest ms':>11} {'ms/token':>9}"
          + "".join(f" {f'[{i + 1}] ms':>9} {f'[{i + 1}] vs median':>15}" for i in range(len(grids))))
    errors: list[list[float]] = [[] for _ in grids]
    for n in sizes:
        med = float(np.median(times[n]))
        line = f"{n:>6} {med * 1e3:>10.1f} {min(times[n]) * 1e3:>11.1f} {med * 1e3 / n:>9.2f}"
        for i, grid in enumerate(grids):
            price = grid.time_s(chunk(0, args.start, n, True), False, None)  # after another shape: a graph built
            errors[i].append((price / med - 1) * 100)
            line += f" {price * 1e3:>9.1f} {errors[i][-1]:>+14.1f}%"
        print(line)
    for i, errs in enumerate(errors):
        e = np.array(errs)
        print(f"[{i + 1}] priced vs median: {e.min():+.1f} ... {e.max():+.1f} %, spread {e.max() - e.min():.1f} points "
              f"(a constant offset is the machine's speed; the spread is the model's shape)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
