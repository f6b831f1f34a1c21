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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from backends.cost.kvcells import kv_ranges
from backends.cost.table import TableCostModel
from backends.cost.wakeup import wakeup_curve
from calib.fit_table import fit_table, graph_chain, percent_errors
from calib.grid import Scenario, drive, grid
from calib.measure import step_kind
from calib.probes import WAKEUP_QUICK, probe_run_factor, probe_wakeup
from calib.provenance import build_info, load_snapshot, machine_info, model_fingerprint
from calib.samples import read_samples
from scheduler import SchedulerConfig
from scheduler.messages import StepPlan

HOLD_OUT_EVERY = 4
CLEAN_RATIO = 1.10  # repeats slower than this times a step's fastest repeat count as contention
TRIM_FACTOR, TRIM_MIN = 4.0, 0.10  # refit without training steps off by more than 4x the median error (>= 10 %)
SHARED_CPU_PSI = 20.0  # PSI "some" avg10 above this: other processes compete for the CPU
TIMING = ("wall time of Scheduler.schedule + LlamaCppBackend.step + Scheduler.commit per step; median of the "
          "repeats within 1.10x of the fastest")


def _signature(plan: StepPlan) -> tuple:
    return (tuple((c.slot, c.start_pos, len(c.token_ids), c.num_pad_tokens, c.sample) for c in plan.chunks),
            len(plan.removes), tuple((c.src_slot, c.dst_slot, c.num_tokens) for c in plan.copies))


@dataclass
class Calibration:
    """Measured samples, the fitted table model, and statistics."""

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


def fit_and_score(samples: list[tuple[StepPlan, float, bool]], split: dict, name: str, meta: dict,
                  runs: list | None = None) -> Calibration:
    """Fit the table model on all but every HOLD_OUT_EVERY-th sample; score it on those. runs: the run (scenario
    or serving run) of each sample; with one unified KV stream of split["kv_size"] cells, each run's steps are
    replayed through llama.cpp's cell allocation from an empty cache (backends.cost.kvcells) for their KV ranges."""
    # the graph key before each step, from the whole sequence the steps ran in (see backends.cost.graph)
    layout = TableCostModel(**{k: split[k] for k in ("n_batch", "n_ubatch", "kv_unified") if k in split})
    plans = [p for p, _, _ in samples]
    if split.get("kv_unified") and split.get("kv_size"):
        ranges = kv_ranges(plans, layout.n_batch, layout.n_ubatch, int(split["kv_size"]), runs)
    else:
        ranges = [()] * len(samples)
    keyed = [(p, t, idle, g, r) for (p, t, idle), g, r in
             zip(samples, graph_chain([(p, idle) for p, _, idle in samples], layout), ranges, strict=True)]
    held = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(samples))]
    train = [s for s, h in zip(keyed, held, strict=True) if not h]
    test = [s for s, h in zip(keyed, held, strict=True) if h]
    model = fit_table(train, name=name, meta=meta, **split)
    # One trimming pass: a step that another process slowed in most of its repeats would pull the fit.
    resid = np.array([abs(model.time_s(p, idle, g, r) / t - 1) for p, t, idle, g, r in train])
    keep = resid <= max(TRIM_MIN, TRIM_FACTOR * float(np.median(resid)))
    if not keep.all():
        model = fit_table([s for s, k in zip(train, keep, strict=True) if k], name=name, meta=meta, **split)

    def score(m, rows):
        return percent_errors([m.time_s(p, idle, g, r) for p, _, idle, g, r in rows], [r[1] for r in rows])

    by_kind = {}
    for kind in sorted({step_kind(p, idle) for p, _, idle, _g, _r in test}):
        by_kind[kind] = score(model, [s for s in test if step_kind(s[0], s[2]) == kind])
    stats = {"held_out": score(model, test), "train": score(model, train), "by_kind_held_out": by_kind,
             "trimmed_from_fit": int((~keep).sum()),
             "hold_out": f"every {HOLD_OUT_EVERY}th step (index % {HOLD_OUT_EVERY} == {HOLD_OUT_EVERY - 1})"}
    model = replace(model, meta={**meta, "fit": stats})
    return Calibration(samples, held, model, stats, model.meta, split=dict(split))


def calibrate(model: str | None = None, options: dict | None = None, quick: bool = False, repeats: int | None = None,
              seed: int = 0, name: str = "calibrated", progress: Callable[[str], None] | None = None,
              instances: int = 1, wakeup: bool = True, serving: int | None = None) -> Calibration:
    """Profile the real backend on the grid and fit a TableCostModel; meta says where it came from.

    serving: requests of each real-time serving run whose steps join the grid's in the fit (add_serving_steps);
    None: SERVING_REQUESTS on a GPU context, none on the CPU, where the grid alone transfers.

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
        if serving is None:
            serving = SERVING_REQUESTS if b.model.n_gpu_layers else 0
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
                 "fa_heads": b.model.n_head, "fa_threads": b.n_threads, "sparse_outputs": bool(b.model.n_gpu_layers)}
        if b.kv_unified:  # the stream's cells: each step's KV range is replayed (backends.cost.kvcells)
            split["kv_size"] = b.n_ctx
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
        labels = [label for label, _ in raw]
        cal = fit_and_score(samples, split, name, meta, labels)
        cal.labels, cal.repeat_times = labels, [ts for _, ts in raw]
        if serving:
            cal = add_serving_steps(cal, backends, config, serving, seed, say)
        if wakeup:
            wake = probe_wakeup(b, config, seed, lambda text: say(f"calibrate: {text}"),
                                **(WAKEUP_QUICK if quick else {}))
            cal.model = replace(cal.model, idle_wakeup_curve=wakeup_curve(wake["knots"]),
                                meta={**cal.model.meta, "wakeup": wake})
            cal.stats["wakeup"] = wake
        if serving:  # the serving runs are real-time runs already, longer than a probe: the factors come from them
            rows = [{"plan": p, "measured_s": t, "after_idle": idle, "scenario": label}
                    for (p, t, idle), label in zip(cal.samples, cal.labels, strict=True)
                    if is_serving(label)]
            probe = serving_factors(rows, cal.model, "the calibration's serving runs")
        else:
            probe = probe_run_factor(backends, config, cal.model, quick, seed, lambda text: say(f"calibrate: {text}"))
        cal.model = replace(cal.model, run_factor=probe["run_factor"],
                            prefill_run_factor=probe["prefill_run_factor"], meta={**cal.model.meta, "run_probe": probe})
        cal.meta, cal.stats["run_probe"] = cal.model.meta, probe
        return cal
    finally:
        close_instances(backends)


SERVING_REQUESTS = 300  # of each serving run a GPU calibration adds to its grid
# the overloaded run's workload: long-tailed prompts and outputs (a few long requests decode on long after the
# queue drains, over whatever cells the queue left them), with shared prefixes
LONG_TAIL = {"prompt": "lognormal:120,1.0", "output": "lognormal:24,0.9", "shared_prefix_tokens": 32,
             "prefix_groups": 4}
# its serving runs: (policy, arrival rate as a share of the capacity the grid's fit predicts, workload: None for
# the probe's uniform one, else LONG_TAIL); the overloaded run queues hundreds of requests, which spreads a
# unified KV stream's live cells (backends.cost.kvcells)
SERVING_RUNS = (("continuous", 0.25, None), ("chunked", 0.25, None), ("continuous", 2.0, "long-tail"))


def long_tail_workload(requests: int, seed: int):
    """LONG_TAIL's synthetic workload of `requests` requests (Poisson arrivals, re-timed by the probe)."""
    from sim.workload import synthetic_workload

    return synthetic_workload("poisson", 1.0, requests, LONG_TAIL["prompt"], LONG_TAIL["output"], seed + 104729,
                              shared_prefix_tokens=LONG_TAIL["shared_prefix_tokens"],
                              num_prefix_groups=LONG_TAIL["prefix_groups"])


def add_serving_steps(cal: Calibration, backends: list, config: SchedulerConfig, requests: int, seed: int,
                      say: Callable[[str], None]) -> Calibration:
    """The grid's fit again with the steps of real-time serving runs added: the probe's synthetic workload
    (uniform prompts and outputs, shared prefixes; other requests than any validation's), `requests` requests
    per run, each of SERVING_RUNS (a policy at a share of the fitted capacity).

    On an H200 the grid alone priced a light load's serving steps 10-15 % high at 2 to 32 sequences (its decode
    scenarios hold a batch steady; serving batches change every step), and the held-out error of the fit fell
    from 12.4 % to 5.5 % with these steps in it. The overloaded run is there for a unified KV stream: a long
    queue spreads the live sequences' cells far beyond their count and every step attends over the spread
    (the KV range, replayed per run from an empty cache and fitted as per_kv_cell_s and per_kv_token_cell_s);
    without it, synthetic long-queue runs read 45-73 % slower than predicted (docs/GPU.md)."""
    serving, labels = [], []
    for k, (policy, load, kind) in enumerate(SERVING_RUNS):
        steps: list = []
        probe_run_factor(backends, config, cal.model, False, seed + k,  # each run draws its own requests
                         lambda text, p=policy, x=load: say(f"calibrate: serving {p} at {x:g}x: {text}"),
                         requests=requests, policy=policy, samples_out=steps, load=load,
                         sample_of=long_tail_workload(requests * len(backends), seed + k) if kind else None)
        for j, (run, _idle) in enumerate(steps):
            for plan, t, _gap, idle in run:
                if plan.chunks:
                    serving.append((plan, t, idle))
                    # each run under its own name: it starts on an empty KV cache
                    labels.append(f"serving {policy} {load:g}x" + (f" {kind}" if kind else "")
                                  + (f" instance {j + 1}" if len(steps) > 1 else ""))
    meta = {k: v for k, v in cal.meta.items() if k != "fit"}
    runs = list(cal.labels or [None] * len(cal.samples)) + labels
    refitted = fit_and_score(cal.samples + serving, cal.split, cal.model.name, meta, runs)
    refitted.labels = runs
    grid_times = cal.repeat_times or [[t] for _p, t, _i in cal.samples]
    refitted.repeat_times = list(grid_times) + [[t] for _p, t, _i in serving]
    refitted.stats["serving"] = {"requests": requests, "runs": [list(r) for r in SERVING_RUNS], "long_tail": LONG_TAIL,
                                 "steps": len(serving),
                                 "grid_held_out": cal.stats["held_out"]}
    refitted.meta = {**refitted.meta, "serving": refitted.stats["serving"]}
    refitted.model = replace(refitted.model, meta=refitted.meta)
    say(f"calibrate: {len(serving)} serving steps added to the fit: held-out MAPE {cal.stats['held_out']['mape']:.1f}% "
        f"(grid alone) -> {refitted.stats['held_out']['mape']:.1f}%")
    return refitted


def is_serving(label: str | None) -> bool:
    """True for the run label (samples rows' "scenario") of a real-time serving run: calibrate's own serving runs
    and validate --samples' runs are named "serving ..."."""
    return str(label or "").startswith("serving ")


def serving_factors(rows: list[dict], model: TableCostModel, source: str) -> dict:
    """The run factors fitted on real-time serving steps (samples rows with "plan", "measured_s", "scenario"),
    against the model's fit, each run priced from a fresh context as it ran."""
    from calib.probes import PROBE_MIN_STEPS
    from calib.speed import fit_run_factors

    steps = [(r["plan"], r["measured_s"], r.get("driver_s") or 0.0, bool(r.get("after_idle"))) for r in rows]
    waits = [None if i == 0 or r["scenario"] != rows[i - 1]["scenario"] else r.get("idle_s") or 0.0
             for i, r in enumerate(rows)]
    fit = fit_run_factors(steps, model, PROBE_MIN_STEPS, idle_s=waits)
    return {"source": source, "steps": fit["steps"], "by_kind": fit["by_kind"], "overall_factor": fit["overall_factor"],
            "run_factor": fit["by_kind"]["decode"]["factor"], "prefill_run_factor": fit["by_kind"]["prefill"]["factor"]}


def refit(paths, name: str) -> Calibration:
    """Fit and score again from samples files (no measuring): the first written by calibrate --samples (its
    meta, probes and context layout), any others by validate --samples (real-time serving steps, fitted with
    the grid's). With serving steps (the files' or the calibration's own serving runs), the run factors are
    fitted again on them against the new fit."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    header, rows = read_samples(paths[0])
    if "meta" not in header or "split" not in header or header.get("source") == "serving":
        raise ValueError(f"samples file {str(paths[0])!r} was not written by tokenstep calibrate --samples; give "
                         "the grid's file first, then serving steps from validate --samples")
    serving = []
    for extra in paths[1:]:
        head, more = read_samples(extra)
        layout = ("n_batch", "n_ubatch", "kv_unified")
        if head.get("source") != "serving":
            raise ValueError(f"samples file {str(extra)!r} is not a validate --samples file; only the first --refit "
                             "may be a calibration grid's")
        if any(head["split"].get(k) != header["split"].get(k) for k in layout):
            theirs = ", ".join(f"{k}={head['split'].get(k)}" for k in layout)
            ours = ", ".join(f"{k}={header['split'].get(k)}" for k in layout)
            raise ValueError(f"samples file {str(extra)!r} ran on another context layout ({theirs}) than the grid's "
                             f"({ours}); refit with matching files")
        serving += more
    meta = {**header["meta"], "note": f"{header['meta'].get('note', '')}; refitted from "
            + ", ".join(os.path.basename(p) for p in paths), "timing": TIMING,
            "noise": noise_stats([r["repeats_s"] for r in rows], header["meta"].get("noise", {}).get("repeats", 1))}
    samples = [(r["plan"], step_time(r["repeats_s"]), bool(r.get("after_idle"))) for r in rows + serving]
    split = dict(header["split"])
    split.setdefault("sparse_outputs", bool(header["meta"].get("context", {}).get("n_gpu_layers")))
    if split.get("kv_unified") and header["meta"].get("context", {}).get("n_ctx"):
        split.setdefault("kv_size", int(header["meta"]["context"]["n_ctx"]))
    runs = [r["scenario"] for r in rows + serving]
    cal = fit_and_score(samples, split, name, meta, runs)
    cal.labels = runs
    cal.repeat_times = [r["repeats_s"] for r in rows + serving]
    # before the run factors, which calibrate also fits with the wake-up curve in place
    wake = header["meta"].get("wakeup")
    if isinstance(wake, dict) and wake.get("knots"):  # measured apart from the grid: kept as it was
        cal.model = replace(cal.model, idle_wakeup_curve=wakeup_curve(wake["knots"]))
        cal.stats["wakeup"] = wake
    probe = header["meta"].get("run_probe")
    # the calibration's own serving runs; every row of the other files is a serving step
    own = [r for r in rows if is_serving(r["scenario"])]
    served = own + serving
    if served:
        sources = paths if own else paths[1:]
        probe = serving_factors(served, cal.model, "serving steps of " + ", ".join(map(os.path.basename, sources)))
        cal.model = replace(cal.model, meta={**cal.model.meta, "run_probe": probe})
        cal.meta = cal.model.meta
    if isinstance(probe, dict) and "run_factor" in probe:
        # the probe's factors were fitted against the original grid fit; a refit of the same samples gives the
        # same fit, so they still apply (with serving steps, they were fitted again just above)
        pf = probe.get("prefill_run_factor")
        cal.model = replace(cal.model, run_factor=float(probe["run_factor"]),
                            prefill_run_factor=None if pf is None else float(pf))
        cal.stats["run_probe"] = probe
    return cal
