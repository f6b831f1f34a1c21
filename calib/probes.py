"""Short real-time probe runs: the run factors a serving run adds to the grid's prices, and the wake-up curve.

The grid times steps in a plain loop; a real-time serving run also pays the driver's work between steps and
meets occasional slow steps. A probe runs requests drawn from a workload in real time and fits the table
profile's run factors to what it measured; the wake-up probe prices the first step after an idle wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from backends.cost.table import TableCostModel
from backends.cost.wakeup import describe_wakeup, wakeup_curve
from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.loop import run_step
from sim.model import run_workload

# -- the real-time run factor ---------------------------------------------------------------
PROBE = {"requests": 48, "quick_requests": 16, "prompt": "uniform:16,240", "output": "uniform:4,40",
         "shared_prefix_tokens": 32, "prefix_groups": 4, "load": 0.7, "policy": "continuous"}


PROBE_MIN_STEPS = 10  # steps of a kind (decodes only / with prompt tokens) needed to fit that kind's factor


def probe_sample(workload: Any, requests: int, seed: int) -> Any:
    """validate's probe: `requests` requests drawn at random without replacement from the workload (all of
    them if it has fewer), in their order; the same draw for the same seed."""
    from sim.workload import Workload

    pool = workload.requests
    n = min(requests, len(pool))
    pick = np.sort(np.random.default_rng(seed + 7919).choice(len(pool), size=n, replace=False))
    return Workload(tuple(pool[i] for i in pick), f"{n} requests drawn from {workload.description}",
                    {"kind": "sample", "base": workload.source, "n": n, "seed": seed + 7919})


def probe_run_factor(backends: Sequence[Any], config: SchedulerConfig, model: TableCostModel, quick: bool, seed: int,
                     say: Callable[[str], None], requests: int | None = None, sample_of: Any = None,
                     policy: Any = None, samples_out: list | None = None, load: float | None = None) -> dict:
    """Fit the run factors: sum of measured / sum of priced step times over a short real-time serving run,
    one for steps of decodes only (run_factor) and one for steps with prompt tokens (prefill_run_factor).

    The grid times steps back to back in a plain loop. A serving run also spends the driver's own work
    between steps (SimPy, records; 0.1-0.25 ms a step measured on a 2-vCPU VM) and meets occasional slow steps that
    the grid's median of repeats leaves out; both land on every latency. The probe is a synthetic
    workload (uniform prompts and outputs, shared prefixes, Poisson arrivals at 0.7x the capacity the
    fitted model predicts), run by the same real-time driver `tokenstep validate` measures with, so
    the factor is fitted on other requests than any validation workload.

    Two factors, because the two kinds of step gain differently in a serving run (measured on a 2-vCPU VM: decodes about
    +0.5 %, steps with prompt tokens about +3 %); one factor fitted on the probe's mix would price a
    workload with another mix (fewer prompt tokens per decode) off by the difference. A kind with fewer
    than PROBE_MIN_STEPS steps in the probe takes the factor of all steps.

    With sample_of (a Workload), the probe is instead `requests` requests drawn at random without
    replacement from it (all of them if it has fewer), in their order, re-timed as Poisson arrivals at
    the same 0.7x of the capacity the model predicts for the sample, under `policy`: so its mix of step
    shapes is that workload's (validate uses this; the synthetic mix read the prompt-step factor 1.2 %
    above the validated runs' own on average).

    samples_out: a list that receives the probe's timed steps, one (samples, idle_s) pair per instance
    (TimedBackend.samples and .idle_s). A model with an idle_wakeup_curve prices each step after idle by its
    wait (calib.measure.price_samples), so the factors do not take in the wake-ups.

    load: the probe's arrival rate as a share of the capacity the model predicts (default PROBE["load"], 0.7).

    backends: the instances sharing the machine (one or more); with several, the probe has
    `requests` requests per instance at their summed capacity, stepped at the same time (sim.rt), and the
    factors are fitted on every instance's steps.
    """
    from calib.measure import TimedBackend, estimate_capacity, retime
    from calib.speed import fit_run_factors
    from sim.workload import synthetic_workload

    n = requests if requests is not None else PROBE["quick_requests"] if quick else PROBE["requests"]
    n *= len(backends)
    policy = PROBE["policy"] if policy is None else policy
    if sample_of is None:
        base = synthetic_workload("poisson", 1.0, n, PROBE["prompt"], PROBE["output"], seed + 7919,
                                  shared_prefix_tokens=PROBE["shared_prefix_tokens"],
                                  num_prefix_groups=PROBE["prefix_groups"])
        shape = {k: PROBE[k] for k in ("prompt", "output", "shared_prefix_tokens", "prefix_groups")}
    else:
        base = probe_sample(sample_of, n, seed)
        n = len(base.requests)
        shape = {"drawn_from": sample_of.description}
    load = PROBE["load"] if load is None else load
    rate = load * estimate_capacity(model, base, policy, config, len(backends))
    say(f"real-time probe: {n} requests{'' if sample_of is None else ' drawn from the workload'} at {rate:.2f} "
        f"req/s ({load}x the fitted capacity"
        + (f" of {len(backends)} instances)" if len(backends) > 1 else ")"))
    timed = [TimedBackend(b) for b in backends]
    t0 = time.perf_counter()
    run_workload(retime(base, rate, seed + 7919), policy, config, timed, realtime=True)
    for b in backends:
        b.clear_kv()
    samples = [s for t in timed for s in t.samples]
    if samples_out is not None:
        samples_out.extend((t.samples, t.idle_s) for t in timed)
    fit = fit_run_factors(samples, model, PROBE_MIN_STEPS, idle_s=[d for t in timed for d in t.idle_s])
    if fit is None:
        raise RuntimeError("the real-time probe ran no step; the run factor cannot be fitted")
    kinds = fit["by_kind"]
    gaps = [g for _plan, _t, g, _idle in samples]
    probe = {**shape, "load": load, "policy": str(policy), "requests": n, "rate_rps": rate, **fit,
             "wall_s": round(time.perf_counter() - t0, 1),
             "run_factor": kinds["decode"]["factor"], "prefill_run_factor": kinds["prefill"]["factor"],
             "min_steps_per_kind": PROBE_MIN_STEPS,
             "driver_ms_per_step": float(np.mean(gaps)) * 1e3 if gaps else None,
             "note": "factor = sum of measured / sum of grid-priced step times of this real-time run: run_factor "
                     "over its steps of decodes only, prefill_run_factor over its steps with prompt tokens"}
    say(f"probe: {fit['steps']} steps, measured/priced {fit['overall_factor']:.4f} (decode-only steps "
        f"{probe['run_factor']:.4f}, steps with prompt tokens {probe['prefill_run_factor']:.4f}), driver "
        f"{probe['driver_ms_per_step']:.2f} ms/step, {probe['wall_s']} s")
    return probe


def speed_probe(backends: Sequence[Any], profile: Any, config: SchedulerConfig, seed: int,
                say: Callable[[str], None], requests: int, workload: Any, policy: Any,
                wakeup: bool = False) -> tuple[dict | None, Any]:
    """The probe `validate` runs around each load and `compare --backend llama` around each strategy: a
    real-time run of `requests` requests drawn from the workload (probe_run_factor, sample_of) that fits a
    table profile's run factors to the machine's speed now, and the scatter of its steps around their prices
    (calib.noise.StepNoise, summarised in the probe's "step_noise"). With wakeup, a wake-up probe
    (probe_wakeup) runs first, the run-factor probe prices its steps after idle by their waits, and the probe
    carries it as "wakeup". (None, None): no probe (requests 0, or a profile without run factors).
    """
    from calib.noise import merge_noise, step_noise

    if requests == 0 or not isinstance(profile, TableCostModel):
        return None, None
    wake = probe_wakeup(backends[0], config, seed, say) if wakeup else None
    model = replace(profile, idle_wakeup_curve=wakeup_curve(wake["knots"])) if wake else profile
    steps: list = []
    probe = probe_run_factor(backends, config, model, False, seed, say, requests=requests, sample_of=workload,
                             policy=policy, samples_out=steps)
    noise = merge_noise([step_noise(s, model, idle) for s, idle in steps])
    if noise is not None:
        probe["step_noise"] = {"sigma": noise.sigma, "slow_sigma": noise.slow_sigma,
                               "steps": sum(len(s) for s, _ in steps)}
    if wake:
        probe["wakeup"] = wake
    return probe, noise


WAKEUP = {"idles_s": (0.1, 0.3, 1.0, 2.5), "repeats": 3, "prompt": 16}


WAKEUP_QUICK = {"idles_s": (0.1, 1.0), "repeats": 2}  # calibrate --quick: about 2.5 s


def _timed_step(sched: Scheduler, backend, wait_s: float) -> float:
    """Run one step through the loop, waiting wait_s between planning it and running it; its seconds."""
    marks: list[float] = []

    def clock() -> float:  # read before planning and right after the step; the scheduler's time stays 0
        marks.append(time.perf_counter())
        return 0.0

    def wait_then_start(_plan) -> None:  # the plan is made: the idle wait, then the step starts
        if wait_s:
            time.sleep(wait_s)
        marks.append(time.perf_counter())

    done = run_step(sched, backend, clock, check=wait_then_start)
    if done.result is None:
        raise RuntimeError("the wake-up probe planned no prefill")
    if done.result.failed:
        raise RuntimeError(f"the wake-up probe's prefill failed: {done.result.failed}")
    return marks[2] - marks[1]


def prefill_after_idle(backend, config: SchedulerConfig, prompt_len: int, idle_s: float,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Seconds of one prompt's prefill step after the engine waited idle_s with nothing to do (time.sleep, as
    the real-time driver waits for an arrival), and of the same shape's prefill right after it, no wait."""
    sched = Scheduler(replace(config, enable_prefix_caching=False), "sequential")
    backend.clear_kv()
    times = []
    for k, wait in enumerate((idle_s, 0.0)):
        tokens = tuple(int(t) for t in rng.integers(100, 20000, prompt_len))
        sched.add_request(Request(f"wake-{k}", tokens, SamplingParams(max_tokens=1)), 0.0)
        times.append(_timed_step(sched, backend, wait))
    backend.clear_kv()
    return times[0], times[1]


def probe_wakeup(backend, config: SchedulerConfig, seed: int, say: Callable[[str], None],
                 idles_s: Sequence[float] = WAKEUP["idles_s"], repeats: int = WAKEUP["repeats"],
                 prompt_len: int = WAKEUP["prompt"]) -> dict:
    """What the first step after an idle wait costs beyond the same step without one, by the wait's length.

    The engine's threads, and the host under them, go to sleep while it waits for an arrival; waking them
    costs the next step time that grows with the wait (measured once on a 2-vCPU VM: +1 ms after 0.1 s, +13 ms after
    0.5 s, +26 ms after 2 s, the same for a 16- and a 200-token prompt: calib/experiments/idle_wakeup.py) and moves
    from day to day (the same machine's calibration grid read 0.8 ms after 0.25 s). Each wait runs `repeats`
    times in a shuffled order; each knot is the median over its repeats of (after the wait - right after),
    at least 0. Returns {"knots": [[idle_s, extra_s], ...], ...}: a TableCostModel's idle_wakeup_curve; and
    "times_s": [[idle_s, [[after the wait, right after], ...]], ...], every pair timed.
    """
    rng = np.random.default_rng(seed + 4099)
    order = [i for i in idles_s for _ in range(repeats)]
    rng.shuffle(order)
    t0 = time.perf_counter()
    prefill_after_idle(backend, config, prompt_len, 0.0, rng)  # warm
    pairs: dict[float, list[tuple[float, float]]] = {i: [] for i in idles_s}
    for idle in order:
        pairs[idle].append(prefill_after_idle(backend, config, prompt_len, idle, rng))
    knots = [[float(i), max(0.0, float(np.median([a - r for a, r in pairs[i]])))] for i in sorted(idles_s)]
    out = {"knots": knots, "repeats": repeats, "prompt_tokens": prompt_len,
           "times_s": [[float(i), [list(p) for p in pairs[i]]] for i in sorted(idles_s)],
           "wall_s": round(time.perf_counter() - t0, 1),
           "note": "extra seconds of a prefill after an idle wait of idle_s over the same prefill right after it "
                   "(median over repeats)"}
    say(f"wake-up probe: {describe_wakeup(knots)}, {out['wall_s']} s")
    return out
