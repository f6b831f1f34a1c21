"""Two real runs of the same validation against each other: how far the real engine moves between repeats.

    python calib/experiments/real_repeat.py DIR_A DIR_B [DIR_C ...]

Each DIR is a `tokenstep validate --out` folder of the same workload, seed and rates (its validation.json).
For each load, prints the measured side of each later folder relative to the first: (B - A) / A of TTFT,
TPOT and E2E (mean, p90, p99) and throughput, next to the prediction's own error in B for comparison, and
the run factors the real run's steps read (the machine's speed during it). A simulator cannot be expected to
predict a run more closely than the real engine repeats itself. It runs no model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STATS = [(k, s) for k in ("ttft_s", "tpot_s", "e2e_s") for s in ("mean", "p90", "p99")]


def read(folder: str, ap: argparse.ArgumentParser) -> dict:
    path = os.path.join(folder, "validation.json")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        doc["loads"][0]["measured"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        ap.error(f"{path}: not a validate result ({exc})")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="tokenstep validate --out folders of the same workload")
    args = ap.parse_args(argv)
    if len(args.dirs) < 2:
        ap.error("give at least two folders: the first is the reference")
    docs = [read(d, ap) for d in args.dirs]
    ref = docs[0]
    for d, doc in zip(args.dirs[1:], docs[1:], strict=True):
        if len(doc["loads"]) != len(ref["loads"]):
            ap.error(f"{d}: {len(doc['loads'])} loads, {args.dirs[0]}: {len(ref['loads'])}; not the same validation")
        for a, b in zip(ref["loads"], doc["loads"], strict=True):
            if abs(a["rate"] - b["rate"]) > 1e-6 * a["rate"] or a["policy"] != b["policy"]:
                ap.error(f"{d}: load at {b['rate']:.4g} req/s ({b['policy']}) against {a['rate']:.4g} req/s "
                         f"({a['policy']}) in {args.dirs[0]}: not the same validation")
            if a["measured"]["num_requests"] != b["measured"]["num_requests"]:
                ap.error(f"{d}: {b['measured']['num_requests']} requests against {a['measured']['num_requests']}")
    head = " ".join(f"{k[:4].upper()} {s:>4}" for k, s in STATS)
    print(f"measured relative to {args.dirs[0]} (in brackets: the prediction's own error in that folder)")
    print(f"{'folder':<24} {'rate':>5} {'speed d/p':>11} | {head} | thr")
    for d, doc in zip(args.dirs, docs, strict=True):
        for a, b in zip(ref["loads"], doc["loads"], strict=True):
            speed = b.get("at_run_speed") or {}
            sp = (f"{speed['run_factor']:.3f}/{speed['prefill_run_factor']:.3f}"
                  if speed.get("prefill_run_factor") else "")
            ma, mb = a["measured"], b["measured"]
            cells = []
            for k, s in STATS:
                rel = mb[k][s] / ma[k][s] - 1 if ma[k][s] else float("nan")
                cells.append(f"{rel * 100:+9.1f}")
            thr = mb["throughput_rps"] / ma["throughput_rps"] - 1
            print(f"{os.path.basename(os.path.normpath(d)):<24} {b['rate']:>5.2f} {sp:>11} | {' '.join(cells)} | "
                  f"{thr * 100:+.1f}")
            pred = b["rel_error"]
            print(f"{'':<24} {'':>5} {'':>11} | "
                  + " ".join(f"{'(' + format(pred[k][s] * 100, '+.1f') + ')':>9}" for k, s in STATS)
                  + f" | ({pred['throughput_rps'] * 100:+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
