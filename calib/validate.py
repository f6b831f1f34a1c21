"""Check the simulator against the real backend: one load run both ways, its real side repeated.

A load is a workload re-timed at one arrival rate. Its real side runs `repeats` times (calib.measure); the
prediction is the simulator on the same workload with the profile (its run factors bracketed by speed
probes, calib.speed). calib.judge sets the verdict: each statistic's error against the repeats' mean, next to
the repeats' spread. The rest is diagnosis: the real steps priced by kind, bootstrap intervals, the
simulator at the run's own speed, and (when asked for) noisy reruns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calib.judge import judge, rel_errors, repeat_summary
from calib.measure import predict, step_breakdown
from calib.noise import (
    StepNoise,
    ensemble_predict,
    error_interval,
    noise_spread,
    sampling_noise,
    step_noise,
)
from calib.speed import run_speed_factors
from scheduler import SchedulerConfig
from sim.metrics import summarize

RATE_FACTORS = (0.3, 0.7, 1.2)  # of the profile's estimated capacity: light, medium, saturated
TTFT_NOTE = ("TTFT on both sides: when the first token is computed (end of the step that sampled it), on the run's "
             "clock (measured: SimPy real time, following the wall clock; predicted: virtual time).")


def merge_repeats(repeats: Sequence[dict]) -> dict:
    """Several measure_load results of one load (same workload, rate and seed) as one: every repeat's run in
    "measured_runs", their steps pooled (each repeat's first step starts a fresh context, as price_samples
    expects), the first repeat's run as "measured_run" (for per-request CSVs and plots)."""
    if not repeats:
        raise ValueError("a load needs at least one real run")
    first = repeats[0]
    known = all(r.get("idle_s") is not None for r in repeats)
    return {**first, "measured_runs": [r["measured_run"] for r in repeats],
            "samples": [s for r in repeats for s in r["samples"]],
            "idle_s": [d for r in repeats for d in r["idle_s"]] if known else None,
            "cpu_load": {"before": first["cpu_load"]["before"], "after": repeats[-1]["cpu_load"]["after"]}}


def compare_load(m: dict, profile: Any, policy: Any, config: SchedulerConfig, seed: int,
                 router: str = "least_outstanding", noise_runs: int = 0,
                 ensemble_noise: StepNoise | None = None, ensemble_runs: int = 0,
                 executor: Any = None) -> dict:
    """A measured load (measure_load, or merge_repeats of several) against its prediction with profile.

    The measured value of each statistic is its mean over the real repeats, and the verdict (judge) allows
    each cell max(target, the repeats' spread). executor (sim.executor; None: this process) runs the noisy
    reruns. With ensemble_noise (the speed probes' step noise) and ensemble_runs > 0, the prediction is the
    median of that many noisy reruns (ensemble_predict) and the noiseless run is kept as "deterministic";
    otherwise the noiseless run is the prediction. noise_runs > 0 adds the step-noise range of the error.
    """
    w, samples, instances = m["workload"], m["samples"], m["instances"]
    runs = m.get("measured_runs") or [m["measured_run"]]
    measured = runs[0]
    predicted = predict(w, policy, config, profile, instances, router)
    for r in runs:
        r.policy = "measured"
    predicted.policy = "predicted"
    sm, spread = repeat_summary([summarize(r) for r in runs])
    sp = summarize(predicted)
    deterministic = None
    if ensemble_noise is not None and ensemble_runs > 0:
        ens = ensemble_predict(w, policy, config, profile, instances, router, ensemble_noise, ensemble_runs, seed,
                               executor)
        deterministic = {"predicted": sp, "rel_error": rel_errors(sm, sp)}
        predicted, sp = ens.pop("run"), {**ens.pop("summary"), "policy": "predicted"}
        predicted.policy = "predicted"
        deterministic["ensemble"] = ens
    rel = rel_errors(sm, sp)
    idle_s = m.get("idle_s")
    noise = noise_spread(w, policy, config, profile, instances, router, sm, step_noise(samples, profile, idle_s),
                         runs=noise_runs, seed=seed, executor=executor) if noise_runs else None
    at_speed = None
    speed = run_speed_factors(samples, profile, idle_s)
    if speed is not None:
        sa = summarize(predict(w, policy, config, speed, instances, router))
        at_speed = {"run_factor": speed.run_factor, "prefill_run_factor": speed.prefill_run_factor,
                    "predicted": sa, "rel_error": rel_errors(sm, sa)}
    overhead = [s[2] for s in samples]
    step_s = [s[1] for s in samples]
    return {"rate": m["rate"], "workload": w, "measured_run": measured, "predicted_run": predicted,
            "measured": sm, "predicted": sp, "rel_error": rel, "repeats": len(runs), "repeat_spread": spread,
            "verdict": judge(rel, spread, len(runs)),
            "steps": step_breakdown(samples, profile, idle_s),
            "sampling_noise": sampling_noise(measured, seed),
            "rel_error_interval": error_interval(measured, predicted, seed), "at_run_speed": at_speed,
            "step_noise": noise, "cpu_load": m["cpu_load"], "deterministic": deterministic,
            "driver_overhead": {"mean_ms": float(np.mean(overhead)) * 1e3 if overhead else None,
                                "share_pct": float(sum(overhead) / sum(step_s) * 100) if step_s else None},
            "parallel_instances": measured.config.get("parallel_instances")}
