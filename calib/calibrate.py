"""Calibrate a cost model on the real backend: drive real Scheduler plans over a grid of step shapes.

Each scenario is a small set of requests (some arriving at a given step) run by a real
Scheduler on a LlamaCppBackend in a plain loop; a step's measured time is the wall time
of schedule() + step() + commit(), so the profile includes scheduling, batch building,
sampling and bookkeeping, not only llama_decode. Scenarios are deterministic, so the
same step of a scenario has the same shape in every repeat: repeats run round-robin
over the whole grid and each step keeps the median of its repeats within 1.10x of the
fastest (a burst of load from another process spoils one repeat, not the sample; see
step_time). Every 4th step is held out of the fit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from backends.cost.table import TableCostModel
from backends.cost.wakeup import describe_wakeup, wakeup_curve
from calib.fit_table import fit_table, graph_chain, percent_errors
from calib.validate import build_info, load_snapshot, machine_info, model_fingerprint, step_kind
from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan
from sim.model import run_workload

HOLD_OUT_EVERY = 4
CLEAN_RATIO = 1.10  # repeats slower than this times a step's fastest repeat count as contention
TRIM_FACTOR, TRIM_MIN = 4.0, 0.10  # refit without training steps off by more than 4x the median error (>= 10 %)
SHARED_CPU_PSI = 20.0  # PSI "some" avg10 above this: other processes compete for the CPU
TIMING = ("wall time of Scheduler.schedule + LlamaCppBackend.step + Scheduler.commit per step; median of the "
          "repeats within 1.10x of the fastest")
VOCAB_HI = 32000  # token ids drawn from [10, 32000): valid in every supported vocabulary


@dataclass(frozen=True)
class Scenario:
    """Requests (at_step, prompt_len, max_tokens, shared prefix tokens) run by one policy."""

    label: str
    policy: str
    arrivals: tuple[tuple[int, int, int, int], ...]
    overrides: dict = field(default_factory=dict)
    idle_s: float = 0.0  # sleep before every step: the engine waits for work, as between sparse arrivals


def _decode_grid(quick: bool, max_len: int) -> list[Scenario]:
    out = []
    # every batch size at a short context (decode cost is not smooth in B: 8, 12, 16 beat their neighbours),
    # a few at longer contexts for the attention term
    sizes = {24: range(1, 17), 160: (1, 2, 4, 6, 8, 12, 16)} if not quick else {32: (1, 2, 4, 6, 8, 12, 16)}
    for length, batch_sizes in sizes.items():
        for b in batch_sizes:
            out.append(Scenario(f"decode B={b} L={length}", "continuous", ((0, length, 8 if quick else 12, 0),) * b))
    long = min(320, max_len - 16)
    if not quick and long > 200:
        for b in (1, 4, 12):
            out.append(Scenario(f"decode B={b} L={long}", "continuous", ((0, long, 8, 0),) * b))
    patterns = [[12 if i % 2 == 0 else 3 for i in range(16)], [2 if i % 3 == 1 else 12 for i in range(16)],
                [3 + (7 * i) % 11 for i in range(16)], [12 if 4 <= i < 12 else 2 for i in range(16)]]
    for k, pattern in enumerate(patterns[:2] if quick else patterns):
        out.append(Scenario(f"fragmented decode {k}", "continuous", tuple((0, 40, t, 0) for t in pattern)))
    return out


def _prefill_grid(quick: bool, max_len: int) -> list[Scenario]:
    top = min(500, max_len - 2)
    # flash attention's cost jumps just past multiples of 128 tokens (see backends.cost.ubatch.fa_tiles):
    # sizes on both sides of 128, 256 and 384
    sizes = (16, 128, top) if quick else tuple(sorted({8, 16, 32, 64, 96, 128, 144, 192} | {
        min(n, top) for n in (256, 264, 320, 384, 400, 448)} | {top}))
    out = [Scenario("prefill sizes", "sequential", tuple((0, p, 2, 0) for p in sizes))]
    for cap in ((64,) if quick else (32, 64, 128)):
        out.append(Scenario(f"chunked prefill {cap}", "chunked", ((0, min(250, top), 2, 0),),
                            {"max_prefill_chunk_tokens": cap}))
    if not quick:  # chunks deep into a long prompt: attention over up to top positions of context
        for cap in (64, 128, 256):
            out.append(Scenario(f"chunked prefill {cap} long", "chunked", ((0, top, 2, 0),),
                                {"max_prefill_chunk_tokens": cap}))
    out.append(Scenario("unequal prompts", "continuous", tuple((0, p, 3, 0) for p in (40, 80, 120, 160))))
    if not quick:
        out.append(Scenario("unequal prompts 8", "continuous",
                            tuple((0, p, 4, 0) for p in (17, 150, 33, 96, 64, 200, 8, 120))))
        out.append(Scenario("padded static", "static:padding=true",
                            tuple((0, p, t, 0) for p, t in ((20, 2), (60, 4), (100, 8), (140, 12)))))
    return out


def _mixed_grid(quick: bool) -> list[Scenario]:
    out = []
    for b in ((4, 15) if quick else (1, 4, 8, 15)):
        for p in ((64,) if quick else (16, 64, 200)):
            arrivals = ((0, 32, 14, 0),) * b + ((3, p, 4, 0),)
            out.append(Scenario(f"mixed B={b}+P={p}", "continuous", arrivals))
    budget = 96 if quick else 128
    out.append(Scenario(f"chunked mixed budget {budget}", "chunked", ((0, 32, 16, 0),) * 8 + ((3, 240, 3, 0),),
                        {"max_num_batched_tokens": budget}))
    for shared in ((128,) if quick else (48, 128, 176)):
        arrivals = ((0, 192, 1, 192),) + ((2, shared + 16, 3, shared),) * 4 + ((2, 32, 3, 0),)
        out.append(Scenario(f"prefix copy {shared}", "continuous", arrivals))
    # the first step after the engine waited for an arrival wakes llama.cpp's threads: light loads are made of them
    prompts = (16, 96) if quick else (8, 24, 48, 96, 160)
    out.append(Scenario("after idle", "sequential", tuple((0, p, 2, 0) for p in prompts), idle_s=0.25))
    if not quick:
        out.append(Scenario("after idle B=4", "continuous", ((0, 32, 5, 0),) * 4, idle_s=0.25))
    return out


def grid(quick: bool = False, max_len: int = 512) -> list[Scenario]:
    """The calibration scenarios (prompts up to max_len tokens): decodes, prefills, mixed steps, prefix copies."""
    if max_len < 220:
        raise ValueError(f"calibration needs a context of at least 220 tokens per slot, got {max_len}; "
                         "raise n_ctx or lower n_seq_max")
    return _decode_grid(quick, max_len) + _prefill_grid(quick, max_len) + _mixed_grid(quick)


def _requests(s: Scenario, tag: str, rng: np.random.Generator) -> list[tuple[int, Request]]:
    base = rng.integers(10, VOCAB_HI, size=256).tolist()  # prompts with a shared prefix start with these tokens
    out = []
    for i, (at, n, max_tokens, shared) in enumerate(s.arrivals):
        own = rng.integers(10, VOCAB_HI, size=n).tolist()
        prompt = base[:shared] + own[shared:]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # what sim.model.to_request gives a trace row
        out.append((at, Request(f"{tag}-{i}", tuple(prompt), sp)))
    return out


def drive(backend, config: SchedulerConfig, scenario: Scenario, tag: str,
          rng: np.random.Generator) -> list[tuple[StepPlan, float]]:
    """Run one scenario; return each step's plan and the wall time of schedule + step + commit."""
    sched = Scheduler(replace(config, **scenario.overrides), scenario.policy)
    pending = _requests(scenario, tag, rng)
    out: list[tuple[StepPlan, float]] = []
    now, step = 0.0, 0
    backend.clear_kv()
    while True:
        while pending and pending[0][0] <= step:
            sched.add_request(pending.pop(0)[1], now)
        if scenario.idle_s:
            time.sleep(scenario.idle_s)
        t0 = time.perf_counter()
        plan = sched.schedule(now)
        if plan.is_empty:
            if not pending:
                break
            step = pending[0][0]
            continue
        result = backend.step(plan)
        sched.commit(plan, result, now)
        elapsed = time.perf_counter() - t0
        if result.failed:
            raise RuntimeError(f"calibration scenario {scenario.label!r}: the backend failed: {result.failed}")
        out.append((plan, elapsed))
        now += elapsed
        step += 1
    backend.clear_kv()
    return out


def _signature(plan: StepPlan) -> tuple:
    return (tuple((c.slot, c.start_pos, len(c.token_ids), c.num_pad_tokens, c.sample) for c in plan.chunks),
            len(plan.removes), tuple((c.src_slot, c.dst_slot, c.num_tokens) for c in plan.copies))




@dataclass
class Calibration:
    """Measured samples, the fitted table model, the linear fit for comparison, and statistics."""

    samples: list[tuple[StepPlan, float, bool]]  # (plan, seconds, after an idle wait)
    held_out: list[bool]
    model: TableCostModel
    stats: dict
    meta: dict
    labels: list[str] = field(default_factory=list)  # scenario of each sample
    repeat_times: list[list[float]] = field(default_factory=list)  # every repeat's seconds of each sample
    split: dict = field(default_factory=dict)  # how llama.cpp split batches on the calibrated context


def measure(backend, config: SchedulerConfig, scenarios: list[Scenario], repeats: int, seed: int,
            progress: Callable[[str], None] | None = None) -> tuple[list[tuple[StepPlan, float, bool]], dict, list]:
    """Run every scenario `repeats` times round-robin: (plan, seconds, after idle) per step, noise, raw rows."""
    say = progress or (lambda _text: None)
    drive(backend, config, Scenario("warm-up", "continuous", ((0, 64, 4, 0),) * 4), "warm", np.random.default_rng(0))
    times: dict[int, list[list[float]]] = {}
    plans: dict[int, list[StepPlan]] = {}
    for rep in range(repeats):
        t_rep = time.perf_counter()
        for i, sc in enumerate(scenarios):
            steps = drive(backend, config, sc, f"s{i}r{rep}", np.random.default_rng([seed, i]))
            if rep == 0:
                plans[i], times[i] = [p for p, _ in steps], [[t] for _, t in steps]
            else:
                for j, (p, t) in enumerate(steps[: len(plans[i])]):
                    if _signature(p) == _signature(plans[i][j]):
                        times[i][j].append(t)
        say(f"calibrate: repeat {rep + 1}/{repeats}: {len(scenarios)} scenarios, "
            f"{sum(len(v) for v in plans.values())} steps in {time.perf_counter() - t_rep:.1f} s")
    samples, raw = [], []
    for i in range(len(scenarios)):
        for p, ts in zip(plans[i], times[i], strict=True):
            samples.append((p, step_time(ts), scenarios[i].idle_s > 0))
            raw.append((scenarios[i].label, ts))
    noise = noise_stats([ts for _, ts in raw], repeats)
    return samples, noise, raw


def step_time(repeats_s: list[float]) -> float:
    """A step's time from its repeats: the median of those within CLEAN_RATIO of the fastest.

    Another process can only add time to a step, so on a shared CPU a slow repeat is
    contention, not the step; on an idle CPU every repeat is within the ratio and this
    is the plain median.
    """
    fastest = min(repeats_s)
    return float(np.median([t for t in repeats_s if t <= CLEAN_RATIO * fastest]))


def noise_stats(repeat_lists: list[list[float]], repeats: int) -> dict:
    """How much a step's repeats disagreed, and how many were dropped as contention."""
    spreads = [(max(ts) - min(ts)) / min(ts) * 100 for ts in repeat_lists if len(ts) > 1]
    kept = [[t for t in ts if t <= CLEAN_RATIO * min(ts)] for ts in repeat_lists]
    kept_spreads = [(max(k) - min(k)) / min(k) * 100 for k in kept if len(k) > 1]
    n = sum(len(ts) for ts in repeat_lists)
    return {"repeats": repeats, "clean_ratio": CLEAN_RATIO,
            "steps_with_all_repeats": sum(len(ts) == repeats for ts in repeat_lists),
            "median_repeat_spread_pct": float(np.median(spreads)) if spreads else None,
            "p90_repeat_spread_pct": float(np.percentile(spreads, 90)) if spreads else None,
            "repeats_dropped_as_contention_pct": (n - sum(map(len, kept))) / n * 100 if n else None,
            "median_kept_spread_pct": float(np.median(kept_spreads)) if kept_spreads else None}


def fit_and_score(samples: list[tuple[StepPlan, float, bool]], split: dict, name: str, meta: dict) -> Calibration:
    """Fit the table model on all but every HOLD_OUT_EVERY-th sample; score it and the linear form on those."""
    from backends.cost import features, fit

    # the graph key before each step, from the whole sequence the steps ran in (see backends.cost.graph)
    layout = TableCostModel(**{k: split[k] for k in ("n_batch", "n_ubatch", "kv_unified") if k in split})
    keyed = [(p, t, idle, g) for (p, t, idle), g in
             zip(samples, graph_chain([(p, idle) for p, _, idle in samples], layout), strict=True)]
    held = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(samples))]
    train = [s for s, h in zip(keyed, held, strict=True) if not h]
    test = [s for s, h in zip(keyed, held, strict=True) if h]
    model = fit_table(train, name=name, meta=meta, **split)
    # One trimming pass: a step that another process slowed in most of its repeats would pull the fit.
    resid = np.array([abs(model.time_s(p, idle, g) / t - 1) for p, t, idle, g in train])
    keep = resid <= max(TRIM_MIN, TRIM_FACTOR * float(np.median(resid)))
    if not keep.all():
        model = fit_table([s for s, k in zip(train, keep, strict=True) if k], name=name, meta=meta, **split)
    linear = fit([(features(p), t) for p, t, *_ in train], name="fitted")

    def score(m, rows):
        price = m.time_s if hasattr(m, "time_s") else (lambda p, _idle, _g: m.step_time_s(p))
        return percent_errors([price(p, idle, g) for p, _, idle, g in rows], [r[1] for r in rows])

    by_kind = {}
    for kind in sorted({step_kind(p, idle) for p, _, idle, _g in test}):
        by_kind[kind] = score(model, [s for s in test if step_kind(s[0], s[2]) == kind])
    stats = {"held_out": score(model, test), "train": score(model, train), "by_kind_held_out": by_kind,
             "linear_fitted_held_out": score(linear, test), "linear_fitted_params": linear.to_dict()["params"],
             "trimmed_from_fit": int((~keep).sum()),
             "hold_out": f"every {HOLD_OUT_EVERY}th step (index % {HOLD_OUT_EVERY} == {HOLD_OUT_EVERY - 1})"}
    model = replace(model, meta={**meta, "fit": stats})
    return Calibration(samples, held, model, stats, model.meta, split=dict(split))


def calibrate(model: str | None = None, options: dict | None = None, quick: bool = False, repeats: int | None = None,
              seed: int = 0, name: str = "calibrated", progress: Callable[[str], None] | None = None,
              instances: int = 1, wakeup: bool = True) -> Calibration:
    """Profile the real backend on the grid and fit a TableCostModel; meta says where it came from.

    wakeup: a wake-up probe (probe_wakeup; the quick grid's shorter, WAKEUP_QUICK) gives the profile an
    idle_wakeup_curve, the price of a step after idle by the wait's length, kept in meta["wakeup"]; the
    grid's flat idle_wakeup_s stays for a step whose wait is unknown.

    instances > 1: a profile for one of that many instances sharing the machine. The grid is timed on one
    context while the others serve a steady load on their own threads (sim.neighbours), and the run
    factors' probe runs on all of them at once, as `validate --instances N` runs them. Without n_threads
    in options, each context gets the machine's threads shared out (sim.real.threads_per_instance).
    """
    from sim.neighbours import Neighbours
    from sim.real import close_instances, make_llama_instances

    say = progress or (lambda _text: None)
    repeats = repeats or (2 if quick else 3)
    before = load_snapshot()
    t0 = time.perf_counter()
    backends, config = make_llama_instances(model, instances, options)
    try:
        b = backends[0]
        if b.model.n_gpu_layers:
            from calib.gpu_grid import gpu_grid

            scenarios = gpu_grid(quick, config.max_model_len)
        else:
            scenarios = grid(quick, config.max_model_len)
        say(f"calibrate: {b.model.name} ({b.model.path.name}), {b.n_threads} threads, n_ctx {b.n_ctx}, "
            f"{b.num_slots} slots; {len(scenarios)} scenarios x {repeats} repeats"
            + (f"; {instances - 1} more instance(s) serving meanwhile" if instances > 1 else ""))
        if before.get("cpu_pressure_some_avg10_pct", 0.0) > SHARED_CPU_PSI:
            psi = before["cpu_pressure_some_avg10_pct"]
            say(f"calibrate: warning: the CPU is shared (tasks waited for a CPU {psi:.0f}% of the last 10 s)"
                ": step times will be inflated and noisy; the profile records the load")
        with Neighbours(backends[1:], config, seed) as busy:
            samples, noise, raw = measure(b, config, scenarios, repeats, seed, progress)
        split = {"n_batch": b.n_batch, "n_ubatch": b.n_ubatch, "kv_unified": b.kv_unified, "n_seq_max": b.num_slots,
                 "fa_heads": b.model.n_head, "fa_threads": b.n_threads}
        meta = {
            "note": f"calibrated by `tokenstep calibrate{' --quick' if quick else ''}` on the real backend",
            "model": model_fingerprint(b.model),
            **build_info(),
            "context": {"n_threads": b.n_threads, "n_ctx": b.n_ctx, "n_seq_max": b.num_slots,
                        "n_batch": b.n_batch, "n_ubatch": b.n_ubatch, "kv_unified": b.kv_unified,
                        "swa_full": b.swa_full, "use_extra_bufts": b.model.use_extra_bufts,
                        "n_gpu_layers": b.model.n_gpu_layers,
                        "instances": instances, "neighbour_steps": busy.num_steps},
            "scheduler": {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
                          "max_model_len": config.max_model_len, "num_kv_blocks": config.num_kv_blocks,
                          "block_size": config.block_size},
            "machine": machine_info(),
            "load": {"before": before},
            "grid": {"quick": quick, "scenarios": [s.label for s in scenarios], "num_steps": len(samples),
                     "seed": seed},
            "noise": noise,
            "timing": TIMING,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        meta["load"]["after"] = load_snapshot()
        meta["grid"]["wall_s"] = round(time.perf_counter() - t0, 1)
        cal = fit_and_score(samples, split, name, meta)
        cal.labels, cal.repeat_times = [label for label, _ in raw], [ts for _, ts in raw]
        if wakeup:
            wake = probe_wakeup(b, config, seed, lambda text: say(f"calibrate: {text}"),
                                **(WAKEUP_QUICK if quick else {}))
            cal.model = replace(cal.model, idle_wakeup_curve=wakeup_curve(wake["knots"]),
                                meta={**cal.model.meta, "wakeup": wake})
            cal.stats["wakeup"] = wake
        probe = probe_run_factor(backends, config, cal.model, quick, seed, lambda text: say(f"calibrate: {text}"))
        cal.model = replace(cal.model, run_factor=probe["run_factor"],
                            prefill_run_factor=probe["prefill_run_factor"], meta={**cal.model.meta, "run_probe": probe})
        cal.meta, cal.stats["run_probe"] = cal.model.meta, probe
        return cal
    finally:
        close_instances(backends)


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
    between steps (SimPy, records; about 0.1-0.25 ms a step here) and meets occasional slow steps that
    the grid's median of repeats leaves out; both land on every latency. The probe is a synthetic
    workload (uniform prompts and outputs, shared prefixes, Poisson arrivals at 0.7x the capacity the
    fitted model predicts), run by the same real-time driver `tokenstep validate` measures with, so
    the factor is fitted on other requests than any validation workload.

    Two factors, because the two kinds of step gain differently in a serving run (here decodes about
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
    wait (calib.validate.price_samples), so the factors do not take in the wake-ups.

    load: the probe's arrival rate as a share of the capacity the model predicts (default PROBE["load"], 0.7).

    backends: the instances sharing the machine (one or more); with several, the probe has
    `requests` requests per instance at their summed capacity, stepped at the same time (sim.rt), and the
    factors are fitted on every instance's steps.
    """
    from calib.validate import TimedBackend, estimate_capacity, fit_run_factors, retime
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
    (calib.validate.StepNoise, summarised in the probe's "step_noise"). With wakeup, a wake-up probe
    (probe_wakeup) runs first, the run-factor probe prices its steps after idle by their waits, and the probe
    carries it as "wakeup". (None, None): no probe (requests 0, or a profile without run factors).
    """
    from calib.validate import merge_noise, step_noise

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
        plan = sched.schedule(0.0)
        if wait:
            time.sleep(wait)
        t0 = time.perf_counter()
        result = backend.step(plan)
        times.append(time.perf_counter() - t0)
        if result.failed:
            raise RuntimeError(f"the wake-up probe's prefill failed: {result.failed}")
        sched.commit(plan, result, 0.0)
    backend.clear_kv()
    return times[0], times[1]


def probe_wakeup(backend, config: SchedulerConfig, seed: int, say: Callable[[str], None],
                 idles_s: Sequence[float] = WAKEUP["idles_s"], repeats: int = WAKEUP["repeats"],
                 prompt_len: int = WAKEUP["prompt"]) -> dict:
    """What the first step after an idle wait costs beyond the same step without one, by the wait's length.

    The engine's threads, and the host under them, go to sleep while it waits for an arrival; waking them
    costs the next step time that grows with the wait (here, one evening: +1 ms after 0.1 s, +13 ms after
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


# -- the measured steps as a file (for audits, re-fits and tests) -------------------------
def write_samples(cal: Calibration, path: str | os.PathLike) -> None:
    """A header line (meta, split), then one JSON line per step: shape, kind, scenario, seconds, held out or not."""
    with open(path, "w", encoding="utf-8") as fh:
        meta = {k: v for k, v in cal.meta.items() if k != "fit"}
        fh.write(json.dumps({"header": {"meta": meta, "split": cal.split}}) + "\n")
        for i, (plan, t, idle) in enumerate(cal.samples):
            row = {"scenario": cal.labels[i] if cal.labels else None, "kind": step_kind(plan, idle),
                   "held_out": cal.held_out[i], "measured_s": t, "after_idle": idle,
                   "repeats_s": cal.repeat_times[i] if cal.repeat_times else [t],
                   "chunks": [[c.slot, c.start_pos, len(c.token_ids), c.num_pad_tokens, int(c.sample),
                               int(c.is_decode)] for c in plan.chunks],
                   "removes": [[r.slot, r.start_pos] for r in plan.removes],
                   "copies": [[c.src_slot, c.dst_slot, c.num_tokens] for c in plan.copies]}
            fh.write(json.dumps(row) + "\n")


def plan_from_row(row: dict) -> StepPlan:
    """A StepPlan with the recorded shape (token ids are placeholders) and the scheduler's counters."""
    chunks, prefill, decode, context, sum_sq, pad = [], 0, 0, 0, 0, 0
    for i, (slot, start, n, pads, sample, is_decode) in enumerate(row["chunks"]):
        chunks.append(ScheduledChunk(f"r{i}", slot, start, (10,) * n, bool(sample), pads, bool(is_decode)))
        pad += pads
        if is_decode:
            decode, context = decode + 1, context + start + 1
        elif n:
            prefill, context, sum_sq = prefill + n, context + start + n, sum_sq + n * (start + n)
    copies = tuple(KVCopy(*c) for c in row["copies"])
    return StepPlan(0, 0.0, tuple(chunks), tuple(KVRemove(*r) for r in row["removes"]), copies, prefill, decode,
                    context, sum_sq, pad, sum(c.num_tokens for c in copies))


def read_samples(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, rows) of a samples file; each row gets its rebuilt "plan"."""
    header, rows = {}, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if "header" in row:
                header = row["header"]
                continue
            row["plan"] = plan_from_row(row)
            rows.append(row)
    if not rows:
        raise ValueError(f"samples file {str(path)!r} holds no measured step")
    return header, rows


def refit(path: str | os.PathLike, name: str) -> Calibration:
    """Fit and score again from a samples file written by write_samples (no measuring)."""
    header, rows = read_samples(path)
    if "meta" not in header or "split" not in header:
        raise ValueError(f"samples file {str(path)!r} has no header line; it was not written by tokenstep calibrate")
    meta = {**header["meta"], "note": f"{header['meta'].get('note', '')}; refitted from {os.path.basename(path)}",
            "timing": TIMING,
            "noise": noise_stats([r["repeats_s"] for r in rows], header["meta"].get("noise", {}).get("repeats", 1))}
    samples = [(r["plan"], step_time(r["repeats_s"]), bool(r.get("after_idle"))) for r in rows]
    cal = fit_and_score(samples, header["split"], name, meta)
    cal.labels, cal.repeat_times = [r["scenario"] for r in rows], [r["repeats_s"] for r in rows]
    probe = header["meta"].get("run_probe")
    if isinstance(probe, dict) and "run_factor" in probe:
        # kept: the probe's factor was fitted against the original grid fit; a refit of the same samples
        # gives the same fit, so the factor still applies
        pf = probe.get("prefill_run_factor")
        cal.model = replace(cal.model, run_factor=float(probe["run_factor"]),
                            prefill_run_factor=None if pf is None else float(pf))
        cal.stats["run_probe"] = probe
    wake = header["meta"].get("wakeup")
    if isinstance(wake, dict) and wake.get("knots"):  # measured apart from the grid: kept as it was
        cal.model = replace(cal.model, idle_wakeup_curve=wakeup_curve(wake["knots"]))
        cal.stats["wakeup"] = wake
    return cal
