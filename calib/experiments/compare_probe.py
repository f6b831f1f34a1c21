"""How much a real-time speed probe helps `compare --backend llama`'s prediction columns, on the real backend.

    python calib/experiments/compare_probe.py [--probe-requests 24] [--repeat 1] [compare's workload flags]

Runs the main job's strategies (static, continuous, continuous+noprefix on the default workload's first 60
requests at time scale 0.4) on real llama.cpp, once, with a real-time probe (requests drawn from the workload,
continuous, 0.7x the predicted capacity; calib.probes.probe_run_factor) before the first strategy, between
strategies and after the last. Then predicts every measured run several ways, side by side:

- bundled: the profile's own run factors (what compare printed before it had a probe);
- before: the factors of the one probe before the first strategy;
- ends: the mean of the probes before the first and after the last strategy;
- bracket: the mean of the probes just before and just after that strategy, one factor for every decode-only
  step (what compare and validate did before they priced decode-only steps by batch size);
- bracket/batch: bracket with decode-only steps priced by batch size from both probes' steps
  (calib.speed.bracket_factors: what compare and validate do);
- own: the factors read off that run's own steps (the best any probe could do); own/batch: the same with
  decode-only steps priced by batch size from the run's own steps;
- bracket+ens: bracket's factors, predicted as the median of 20 runs with step noise drawn from the two
  probes' steps (calib.noise.ensemble_predict, as validate predicts);
- bracket/flat, bracket/none: bracket with the profile's wake-up curve replaced by its flat price, or with
  no wake-up price at all (the probes' factors refitted for each: a step after idle is priced the same way
  in the fit and in the prediction).

--wakeup-probe also times the wake-up curve on the real backend after the first probe
(calib.probes.probe_wakeup, about 13 s) and adds bracket/probed: bracket with that curve.

Prints the relative error (predicted - measured) / measured of TTFT, TPOT and E2E means and throughput for
each, and the mean absolute error per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost.wakeup import wakeup_curve  # noqa: E402
from backends.synthetic import SyntheticBackend  # noqa: E402
from calib.measure import TimedBackend  # noqa: E402
from calib.noise import ENSEMBLE_RUNS, ensemble_predict, merge_noise, step_noise  # noqa: E402
from calib.probes import probe_run_factor, probe_wakeup  # noqa: E402
from calib.speed import batch_factor_knots, bracket_factors, fit_run_factors  # noqa: E402
from sim.cli import build_parser  # noqa: E402
from sim.cli_common import build_workload  # noqa: E402
from sim.cli_compare import LLAMA_DEFAULT_LIMIT, LLAMA_DEFAULT_POLICIES, LLAMA_DEFAULT_TIME_SCALE  # noqa: E402
from sim.cli_runs import close, parse_run_specs, prepare, run_config  # noqa: E402
from sim.metrics import summarize  # noqa: E402
from sim.model import run_workload  # noqa: E402

METRICS = [("ttft_s", "mean"), ("tpot_s", "mean"), ("e2e_s", "mean"), ("throughput_rps",)]


def get(summary: dict, path: tuple) -> float:
    """A nested value."""
    for p in path:
        summary = summary[p]
    return summary


def main() -> int:
    """Measure, probe, predict, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-requests", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=1, help="times to run the whole sequence")
    ap.add_argument("--wakeup-probe", action="store_true", help="also price with a wake-up curve timed now")
    opts, rest = ap.parse_known_args()  # the rest: compare's workload flags
    parser, _ = build_parser("compare")
    args = parser.parse_args(["compare", "--backend", "llama", "--quiet", *rest])
    if args.limit is None:
        args.limit = LLAMA_DEFAULT_LIMIT
    if args.time_scale is None:
        args.time_scale = LLAMA_DEFAULT_TIME_SCALE
    specs = parse_run_specs(LLAMA_DEFAULT_POLICIES if args.policies.startswith("static,continuous,chunked")
                            else args.policies)
    workload = build_workload(args)
    ctx = prepare(args, "compare")
    profile = ctx.cost
    totals: dict[str, list[float]] = {}
    try:
        for rep in range(opts.repeat):
            noises: list = []  # each probe's step noise
            variants = {"flat": dataclasses.replace(profile, idle_wakeup_curve=()),
                        "none": dataclasses.replace(profile, idle_wakeup_s=0.0, idle_wakeup_curve=())}
            probe_steps: list = []  # each probe's (samples, idle_s) per instance

            def probe(noises=noises, probe_steps=probe_steps):
                steps: list = []
                out = probe_run_factor(ctx.llama.fresh_backends(), ctx.config, profile, False, args.seed,
                                       lambda _t: None, requests=opts.probe_requests, sample_of=workload,
                                       policy="continuous", samples_out=steps)
                noises.append(merge_noise([step_noise(s, profile, idle) for s, idle in steps]))
                probe_steps.append(steps)
                return out

            t0 = time.perf_counter()
            probes = [probe()]
            if opts.wakeup_probe:
                wake = probe_wakeup(ctx.llama.fresh_backends()[0], ctx.config, args.seed, print)
                variants["probed"] = dataclasses.replace(profile, idle_wakeup_curve=wakeup_curve(wake["knots"]))
            runs = []
            for spec in specs:
                timed = [TimedBackend(b) for b in ctx.llama.fresh_backends()]
                config = run_config(ctx, spec)
                run = run_workload(workload, spec.policy, config, timed, router=args.router, realtime=True)
                own = fit_run_factors([s for t in timed for s in t.samples], profile, 10,
                                      idle_s=[d for t in timed for d in t.idle_s])
                runs.append((spec, config, summarize(run), own))
                probes.append(probe())
            wall = time.perf_counter() - t0

            def factors(p):
                return p["run_factor"], p["prefill_run_factor"]

            def mean(a, b):
                return tuple((x + y) / 2 for x, y in zip(factors(a), factors(b), strict=True))

            def refit(steps, model):
                """A probe's two factors with its steps priced by model (its wake-up price in particular)."""
                fit = fit_run_factors([s for samples, _ in steps for s in samples], model, 10,
                                      idle_s=[d for _, idle in steps for d in idle])
                return {"run_factor": fit["by_kind"]["decode"]["factor"],
                        "prefill_run_factor": fit["by_kind"]["prefill"]["factor"]}

            print(f"repeat {rep + 1}: {wall:.0f} s real time; probes (decode, prompt) "
                  + ", ".join(f"x{p['run_factor']:.3f}/x{p['prefill_run_factor']:.3f}" for p in probes)
                  + f"; profile x{profile.run_factor:.3f}/x{profile.factor(True):.3f}")
            for i, (spec, config, measured, own) in enumerate(runs):
                ways = {"bundled": (profile.run_factor, profile.factor(True)), "before": factors(probes[0]),
                        "ends": mean(probes[0], probes[-1]), "bracket": mean(probes[i], probes[i + 1]),
                        "own": (own["by_kind"]["decode"]["factor"], own["by_kind"]["prefill"]["factor"])}
                ways["bracket+ens"] = ways["bracket"]
                base = {}
                for name, variant in variants.items():
                    ways[f"bracket/{name}"] = mean(refit(probe_steps[i], variant), refit(probe_steps[i + 1], variant))
                    base[f"bracket/{name}"] = variant
                # decode-only steps priced by batch size: the probes' (as validate and compare do) and the run's own
                _, base["bracket/batch"] = bracket_factors(profile, probes[i], probes[i + 1])
                ways["bracket/batch"] = ways["bracket"]
                dec_own = own["by_kind"]["decode"]["factor"]
                base["own/batch"] = dataclasses.replace(
                    profile, decode_batch_factors=batch_factor_knots(own["by_batch"], dec_own))
                ways["own/batch"] = ways["own"]
                for way, (dec, pre) in ways.items():
                    model = dataclasses.replace(base.get(way, profile), run_factor=dec, prefill_run_factor=pre)
                    if way == "bracket+ens":  # the median of noisy reruns, noise from the two probes' steps
                        noise = merge_noise([noises[i], noises[i + 1]])
                        pred = ensemble_predict(workload, spec.policy, config, model, args.instances, args.router,
                                                noise, ENSEMBLE_RUNS, args.seed)["summary"]
                    else:
                        pred = summarize(run_workload(workload, spec.policy, config,
                                                      [SyntheticBackend(model) for _ in range(args.instances)],
                                                      router=args.router))
                    errs = [(get(pred, m) - get(measured, m)) / get(measured, m) * 100 for m in METRICS]
                    totals.setdefault(way, []).extend(abs(e) for e in errs)
                    print(f"  {spec.label:<32} {way:<14} x{dec:.3f}/x{pre:.3f}  "
                          + "  ".join(f"{'/'.join(m)} {e:+5.1f} %" for m, e in zip(METRICS, errs, strict=True)))
        print("mean |error| over every strategy and metric: "
              + ", ".join(f"{way} {sum(v) / len(v):.1f} %" for way, v in totals.items()))
    finally:
        close(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
