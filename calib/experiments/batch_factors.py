"""Decode steps priced by batch size: how well the speed probes around a load predict its step times.

    python calib/experiments/batch_factors.py [--loads 0.3,0.75,1.3] [--requests 100,200,200] [--repeats 2]

`validate` prices each load at the run factors of two real-time probes (64 requests drawn from the workload,
at 0.7x capacity), one just before and one just after it. A probe at 0.7x runs mostly decodes of 1-4
sequences; a saturated load runs mostly full batches. When the machine's speed does not move every batch
size alike, one decode-only factor fitted on the probe's mix misprices the load's mix.

This runs, in one process, probe / load / probe / load / ... / probe (each load between two probes, the
probe after one load the probe before the next), each load being --requests requests drawn from validate's
default workload and re-timed at that share of the capacity the profile predicts, and prices each load's
own steps (its real plans, in the order they ran) with the probes around it in several ways:
  one factor     the mean of the two probes' decode-only factors (as before decode_batch_factors)
  by batch, k=K  decode-only steps by their number of sequences, both probes' steps pooled, each batch
                 size pulled toward the one factor by K pseudo-steps (calib.speed.batch_factor_knots;
                 validate uses k=BATCH_SHRINK_STEPS)
and prints, per load, the error of the priced against the measured sum of its decode-only steps and of
all its steps, then the mean |error| of each way over the loads, and the probes' per-batch-size factors.
A saturated load's TTFT moves several times as much as its step times, so a step-time error of 1.5 % is a
TTFT error of about 6 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from probe_load import loads_and_counts  # noqa: E402  (calib/experiments/, the script's own folder)

from backends.cost import load_cost_model  # noqa: E402
from calib.cli_validate import PROBE_REQUESTS, _workload  # noqa: E402
from calib.measure import price_samples  # noqa: E402
from calib.probes import probe_run_factor  # noqa: E402
from calib.speed import BATCH_SHRINK_STEPS, batch_factor_knots, bracket_factors, pool_by_batch  # noqa: E402
from sim.cli import build_parser  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402

SHRINKS = (0, BATCH_SHRINK_STEPS, 10, 20, 50)


def run(backends, config, profile, workload, n: int, load: float) -> tuple[dict, list]:
    """One real-time run of n requests drawn from the workload at load x capacity: its fit and its steps."""
    steps: list = []
    fit = probe_run_factor(backends, config, profile, False, 0, lambda _t: None, requests=n, sample_of=workload,
                           policy="continuous", load=load, samples_out=steps)
    return fit, steps


def priced_errors(model, steps: list) -> tuple[float, float]:
    """(decode-only, all steps) relative error of the model's prices against the measured step times."""
    samples, idle = steps[0]
    prices = price_samples(model, samples, idle)
    dec = [(p, t) for (plan, t, _g, _i), p in zip(samples, prices, strict=True)
           if plan.chunks and plan.num_prefill_tokens == 0]
    every = [(p, t) for (plan, t, _g, _i), p in zip(samples, prices, strict=True) if plan.chunks]
    return tuple(sum(p for p, _ in rows) / sum(t for _, t in rows) - 1 for rows in (dec, every))


def main() -> int:
    """Run the series, price, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", default="0.3,0.75,1.3", help="loads as shares of the predicted capacity")
    ap.add_argument("--requests", default="100,200,200", help="requests of each load (one count, or one per load)")
    ap.add_argument("--probe-requests", type=int, default=PROBE_REQUESTS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", default="cpu-gemma3-270m")
    args = ap.parse_args()
    loads, counts = loads_and_counts(ap, args.loads, args.requests)
    profile = load_cost_model(args.profile)
    parser, _ = build_parser("validate")
    workload = _workload(parser.parse_args(["validate", "--quiet"]))  # validate's default workload
    backends, config = make_llama_instances(None, 1)
    ways: dict[str, list] = {}
    try:
        probe, _ = run(backends, config, profile, workload, args.probe_requests, 0.7)
        for rep in range(args.repeats):
            for load, n in zip(loads, counts, strict=True):
                fit, steps = run(backends, config, profile, workload, n, load)
                after, _ = run(backends, config, profile, workload, args.probe_requests, 0.7)
                _, by_batch = bracket_factors(profile, probe, after)
                one = dataclasses.replace(by_batch, decode_batch_factors=())
                pooled = pool_by_batch([probe["by_batch"], after["by_batch"]])
                models = {"one factor": one}
                for k in SHRINKS:
                    models[f"by batch, k={k}"] = dataclasses.replace(
                        one, decode_batch_factors=batch_factor_knots(pooled, one.run_factor, k))
                print(f"repeat {rep + 1}, load {load:g}x ({n} requests, {fit['steps']} steps, {fit['wall_s']:.0f} s; "
                      f"its own decode-only factor x{fit['run_factor']:.4f}, the probes' x{probe['run_factor']:.4f} "
                      f"and x{after['run_factor']:.4f}):", flush=True)
                for name, model in models.items():
                    dec, every = priced_errors(model, steps)
                    ways.setdefault(name, []).append((load, dec, every))
                    print(f"  {name:16s} decode-only steps {dec:+.2%}, all steps {every:+.2%}", flush=True)
                own = {b: m / p for b, m, p, _s in fit["by_batch"]}
                print("  by batch size, the load's own / the probes': " + ", ".join(
                    f"B={b} x{own[b]:.3f}/x{m / p:.3f}" for b, m, p, s in pooled if b in own and s >= 10))
                probe = after
    finally:
        close_instances(backends)
    print("mean |error| over the loads (decode-only steps / all steps):")
    for name, rows in ways.items():
        per_load = "; ".join(
            f"{load:g}x {np.mean([abs(d) for ld, d, _ in rows if ld == load]):.2%}" for load in loads)
        print(f"  {name:16s} {np.mean([abs(d) for _, d, _ in rows]):.2%} / {np.mean([abs(e) for *_, e in rows]):.2%}"
              f"   (decode-only by load: {per_load})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
