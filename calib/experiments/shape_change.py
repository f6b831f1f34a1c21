"""Price error of calibration steps by whether the step's micro-batch shapes repeat the previous step's.

    python calib/experiments/shape_change.py SAMPLES [--profile NAME|FILE]

SAMPLES is a `tokenstep calibrate --samples` file. llama.cpp reuses the previous step's compute graph
when the new micro-batches have the same shapes, and builds a new one when they do not; the table
model prices a step without knowing its predecessor. This prints, for the decode-only steps of each
batch-size class (after-idle steps left out), the mean relative price error (priced / measured - 1,
grid price without run factors) of the steps whose shapes repeat the previous step's in the same
scenario, and of those that follow another kind of step. The steps are priced in the order they ran,
so a profile that prices graph builds (per_graph_build_s) charges them where llama.cpp built a graph.
Give --profile twice or more to price the same steps with several profiles side by side. It runs no model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from backends.cost.table import TableCostModel, price_run  # noqa: E402
from calib.samples import read_samples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", help="a --samples file written by tokenstep calibrate")
    ap.add_argument("--profile", action="append", help="profile to price with, repeatable (default: bundled)")
    args = ap.parse_args(argv)
    names = args.profile or ["cpu-gemma3-270m"]
    if not os.path.isfile(args.samples):
        ap.error(f"{args.samples}: no such file (write one with `tokenstep calibrate --samples FILE`)")
    try:
        _, rows = read_samples(args.samples)
    except (ValueError, KeyError, TypeError) as exc:
        ap.error(f"{args.samples}: not a calibration samples file ({exc})")
    prices = []
    for name in names:
        try:
            profile = load_cost_model(name)
        except ValueError as exc:  # CostModelError: no such profile, or a broken one
            ap.error(f"--profile {name}: {exc}")
        if not isinstance(profile, TableCostModel):
            ap.error(f"--profile {name}: a table profile (from tokenstep calibrate) is needed")
        grid = dataclasses.replace(profile, run_factor=1.0, prefill_run_factor=None)
        prices.append(price_run(grid, [(r["plan"], bool(r.get("after_idle"))) for r in rows]))
    errors: dict[tuple[str, str], list[list[float]]] = {}
    prev = None  # (scenario, shapes, kind) of the previous step
    for i, row in enumerate(rows):
        plan, kind = row["plan"], row["kind"]
        shapes = tuple((u.n_tokens, u.n_seqs, u.n_outputs) for u in grid.shape(plan).ubatches)
        same_scenario = prev is not None and prev[0] == row["scenario"]
        if kind.startswith("decode") and not row.get("after_idle"):
            if same_scenario and prev[1] == shapes:
                after = "same shapes"
            else:
                after = f"after {prev[2].split(' ')[0] if same_scenario else 'scenario start'}"
            measured = statistics.median(row["repeats_s"])
            errs = errors.setdefault((kind.split(" +")[0], after), [[] for _ in names])
            for e, p in zip(errs, prices, strict=True):
                e.append(p[i] / measured - 1)
        prev = (row["scenario"], shapes, kind)
    print(f"decode-only steps of {args.samples}: mean error of the grid price (run factors set aside)")
    for k, name in enumerate(names):
        print(f"  [{k + 1}] {name}")
    heads = "".join(f" {f'[{k + 1}]':>9}" for k in range(len(names)))
    print(f"{'kind':<14} {'previous step':<22} {'steps':>6}{heads}")
    for (kind, after), errs in sorted(errors.items()):
        cells = "".join(f" {statistics.fmean(e) * 100:>+8.2f}%" for e in errs)
        print(f"{kind:<14} {after:<22} {len(errs[0]):>6}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
