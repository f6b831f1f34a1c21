"""Check the simulator against the real backend: one workload run both ways, step and request level.

The measured side is run_workload(realtime=True) on LlamaCppBackend wrapped in TimedBackend,
whose step time is the step's wall time plus the driver's own work since the previous step
(commit, records, SimPy, schedule) while the engine is busy: so the SimPy real-time clock
follows the wall clock instead of silently dropping the scheduler's time, and it measures
the same quantity `tokenstep calibrate` fits. The predicted side is the same workload, seed,
policy and SchedulerConfig in virtual time on SyntheticBackend(profile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.cost.table import price_run
from backends.cost.wakeup import wakeup_cost
from calib.fit_table import percent_errors
from scheduler import SchedulerConfig
from scheduler.messages import StepPlan, StepResult
from sim.arrivals import poisson
from sim.metrics import summarize
from sim.model import run_workload
from sim.records import RunResult
from sim.workload import Workload

RATE_FACTORS = (0.3, 0.7, 1.2)  # of the profile's estimated capacity: light, medium, saturated
METRICS = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")
NOISE_RUNS = 20  # simulated reruns with noisy step prices: a 21st draw of the same noise lands inside their range
ENSEMBLE_RUNS = 20  # noisy reruns whose median is the prediction (validate --ensemble-runs)
# with odds 19/21
TARGET_PCT = {"mean": 5.0, "p90": 10.0, "p99": 10.0, "throughput_rps": 5.0}  # p50 is reported, not targeted
TTFT_NOTE = ("TTFT on both sides: when the first token is computed (end of the step that sampled it), on the run's "
             "clock (measured: SimPy real time, following the wall clock; predicted: virtual time).")


class ProfileMismatch(ValueError):
    """The profile was calibrated on another model or llama.cpp build."""


def check_profile(profile: Any, profile_name: str, model: dict, build: dict, machine: dict,
                  force: bool = False) -> list[str]:
    """Refuse a profile from another model or build unless force; return warnings (machine, forced problems)."""
    meta = getattr(profile, "meta", {}) or {}
    problems: list[str] = []
    pm = meta.get("model")
    if not isinstance(pm, dict):
        problems.append("it names no model (it was not made by `tokenstep calibrate`)")
    elif pm.get("sha256") and pm.get("sha256") != model.get("sha256"):
        problems.append(f"it was calibrated on model {pm.get('name')!r} ({pm.get('file')}, sha256 "
                        f"{str(pm.get('sha256'))[:12]}...) but this run uses {model.get('name')!r} "
                        f"({model.get('file')}, sha256 {str(model.get('sha256'))[:12]}...)")
    elif not pm.get("sha256") and (pm.get("name"), pm.get("size_bytes")) != (model.get("name"),
                                                                                model.get("size_bytes")):
        problems.append(f"it was calibrated on model {pm.get('name')!r} ({pm.get('size_bytes')} bytes) but this "
                        f"run uses {model.get('name')!r} ({model.get('size_bytes')} bytes)")
    built = meta.get("llama_cpp_python")
    if built != build.get("llama_cpp_python"):
        problems.append(f"it was calibrated with llama-cpp-python {built or 'of unknown version'} but "
                        f"{build.get('llama_cpp_python')} is installed")
    if problems and not force:
        raise ProfileMismatch(f"profile {profile_name!r} does not fit this backend: {'; '.join(problems)}. "
                              "Calibrate this model and build with `tokenstep calibrate --model NAME --out FILE` "
                              "and pass --profile FILE, or pass --force to compare anyway.")
    warnings = [f"forced: {p}" for p in problems]
    pmach = meta.get("machine") or {}
    for key in ("cpu_model", "nproc"):
        if pmach.get(key) is not None and pmach.get(key) != machine.get(key):
            warnings.append(f"profile {key} {pmach.get(key)!r} differs from this machine's {machine.get(key)!r}")
    return warnings


def check_instances(profile: Any, profile_name: str, instances: int, force: bool = False) -> list[str]:
    """Refuse a profile calibrated for another number of instances sharing the machine, unless force.

    A step's time depends on the cores its instance has and on what the other instances run meanwhile,
    so a profile of one instance with the machine to itself misprices each of two sharing it (here a
    B = 4 decode on 1 thread took 1.9x its 2-thread time) and the reverse.
    """
    ctx = (getattr(profile, "meta", {}) or {}).get("context") or {}
    calibrated = int(ctx.get("instances", 1))
    if calibrated == instances:
        return []
    problem = (f"profile {profile_name!r} was calibrated as one of {calibrated} instance(s) sharing the machine "
               f"({ctx.get('n_threads', '?')} thread(s) each) but this run has {instances}")
    if not force:
        raise ProfileMismatch(f"{problem}. Calibrate one with `tokenstep calibrate --instances {instances} --out FILE` "
                              "and pass --profile FILE, or pass --force to compare anyway.")
    return [f"forced: {problem}"]


def retime(workload: Workload, rate: float, seed: int) -> Workload:
    """The workload with Poisson arrivals at rate (req/s), seeded; lengths and order kept."""
    n = len(workload.requests)
    times = poisson(np.random.default_rng(seed), n, rate).tolist()
    requests = tuple(dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(workload.requests, times, strict=True))
    source = {"kind": "retimed", "base": workload.source, "arrival": "poisson", "rate": rate, "seed": seed}
    return Workload(requests, f"{workload.description}; arrivals re-timed: Poisson {rate:.4g} req/s, seed {seed}",
                    source)


class TimedBackend:
    """Wraps a real backend: step time = wall time of the step + the driver's work since the last busy step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.samples: list[tuple[StepPlan, float, float, bool]] = []  # (plan, seconds, of which driver, after idle)
        self.idle_s: list[float | None] = []  # each sample's idle wait before it on the run's clock (None: unknown)
        self._last: tuple[float, float] | None = None  # (run-clock end of the last step, wall clock at its return)

    def clear_kv(self) -> None:
        """Empty the KV cache and forget the previous step."""
        self.inner.clear_kv()
        self._last = None

    def step(self, plan: StepPlan) -> StepResult:
        """Run the step; charge its wall time plus the gap since the last step when the engine never idled."""
        t0 = time.perf_counter()
        result = self.inner.step(plan)
        t1 = time.perf_counter()
        # plan.now_s equals the last step's end exactly when the engine went straight from commit to schedule
        busy = self._last is not None and plan.now_s == self._last[0]
        gap = t0 - self._last[1] if busy else 0.0
        elapsed = (t1 - t0) + gap
        idle = None if self._last is None else (plan.now_s - self._last[0] if not busy else 0.0)
        self._last = (plan.now_s + elapsed, t1)
        self.samples.append((plan, elapsed, gap, not busy and bool(plan.chunks)))
        self.idle_s.append(idle)
        return StepResult(result.sampled_token_ids, elapsed, result.failed)


def estimate_capacity(profile: Any, workload: Workload, policy: Any, config: SchedulerConfig, instances: int = 1,
                      router: str = "least_outstanding") -> float:
    """Requests/s the profile predicts for `instances` instances when the whole workload arrives at once."""
    burst = Workload(tuple(dataclasses.replace(r, arrival_s=0.0) for r in workload.requests), workload.description,
                     workload.source)
    s = summarize(predict(burst, policy, config, profile, instances, router))
    if not s["throughput_rps"]:
        raise ValueError("the profile predicts no finished request for this workload; give --rates explicitly")
    return float(s["throughput_rps"])


def rel_errors(measured: dict, predicted: dict) -> dict:
    """(predicted - measured) / measured of each latency statistic and of throughput (None where undefined)."""
    def rel(p, m):
        return None if p is None or m is None or m == 0 else (p - m) / m

    out = {k: {s: rel(predicted[k][s], measured[k][s]) for s in STATS} for k in METRICS}
    out["throughput_rps"] = rel(predicted["throughput_rps"], measured["throughput_rps"])
    return out


BOOTSTRAP = 2000  # resamples for the measured statistics' sampling intervals
QUANTILES = {"p50": 50, "p90": 90, "p99": 99}


def _stats_by_row(a: np.ndarray) -> dict:
    """Each STATS statistic of every row of a 2-D array (one row per resample)."""
    return {"mean": a.mean(axis=1), **{s: np.percentile(a, q, axis=1) for s, q in QUANTILES.items()}}


def _finished_latencies(run: RunResult) -> dict:
    """request_latencies of each finished request, by request id."""
    from sim.metrics import is_finished, request_latencies

    return {r.request_id: request_latencies(r) for r in run.records if is_finished(r)}


def sampling_noise(run: RunResult, seed: int = 0) -> dict:
    """95% bootstrap interval of each measured statistic, relative to its value: how far the same statistic
    could land on another draw of this many requests from the same system.

    A p99 of 200 requests is about the second largest value; when the largest values are requests of
    a few tokens whose inter-token gap did or did not coincide with a long prefill step, another draw
    moves it by tens of percent. This says whether a prediction error is larger than that.
    """
    lat = _finished_latencies(run).values()
    rng = np.random.default_rng(seed)
    out: dict = {}
    for k in METRICS:
        v = np.asarray([x[k] for x in lat if x[k] is not None], dtype=float)
        if v.size < 2:
            out[k] = {s: None for s in STATS}
            continue
        draws = v[rng.integers(0, v.size, size=(BOOTSTRAP, v.size))]
        point = {"mean": v.mean(), **{s: np.percentile(v, q) for s, q in QUANTILES.items()}}
        boot = _stats_by_row(draws)
        out[k] = {s: [float(np.percentile(boot[s], q) / point[s] - 1) for q in (2.5, 97.5)] if point[s] else None
                  for s in STATS}
    return out


def error_interval(measured: RunResult, predicted: RunResult, seed: int = 0) -> dict:
    """95% paired-bootstrap interval of each statistic's relative error (predicted - measured) / measured.

    Both runs serve the same requests, so each resample draws request ids and takes them from both sides.
    The interval says how much of an error is carried by a few requests: when a p99 of 200 requests falls in
    the gap between two order statistics, one request predicted 40 % slow moves it by 30 %, and the
    interval shows that the same comparison over another draw of the requests lands anywhere from 0 to 30 %.
    """
    m, p = _finished_latencies(measured), _finished_latencies(predicted)
    rng = np.random.default_rng(seed)
    out: dict = {}
    for k in METRICS:
        ids = [i for i in m if i in p and m[i][k] is not None and p[i][k] is not None]
        if len(ids) < 2:
            out[k] = {s: None for s in STATS}
            continue
        mv = np.asarray([m[i][k] for i in ids], dtype=float)
        pv = np.asarray([p[i][k] for i in ids], dtype=float)
        pick = rng.integers(0, len(ids), size=(BOOTSTRAP, len(ids)))
        bm, bp = _stats_by_row(mv[pick]), _stats_by_row(pv[pick])
        out[k] = {}
        for s in STATS:
            ok = bm[s] != 0
            rel = bp[s][ok] / bm[s][ok] - 1
            out[k][s] = [float(np.percentile(rel, q)) for q in (2.5, 97.5)] if rel.size else None
    return out


def _missed_cells(rel: dict) -> list[tuple[str, str | None, float]]:
    """(metric, statistic or None for throughput, relative error) of each cell outside the targets."""
    out: list[tuple[str, str | None, float]] = []
    for k in METRICS:
        for s in ("mean", "p90", "p99"):
            v = rel[k][s]
            if v is not None and abs(v) * 100 > TARGET_PCT[s]:
                out.append((k, s, v))
    v = rel["throughput_rps"]
    if v is not None and abs(v) * 100 > TARGET_PCT["throughput_rps"]:
        out.append(("throughput_rps", None, v))
    return out


def _cell_name(k: str, s: str | None, v: float) -> str:
    return f"{k} {s} {v * 100:+.1f}%" if s else f"throughput {v * 100:+.1f}%"


def misses(rel: dict) -> list[str]:
    """Cells outside the targets (means and throughput within 5 %, p90/p99 within 10 %)."""
    return [_cell_name(*cell) for cell in _missed_cells(rel)]


def misses_within(rel: dict, ranges: dict) -> list[str]:
    """The misses whose error range (noise_spread's or price_sensitivity's rel_error_range) holds 0: the
    measured value lies among the reruns' predictions."""
    out = []
    for k, s, v in _missed_cells(rel):
        span = ranges.get(k) if s is None else (ranges.get(k) or {}).get(s)
        if span and span[0] <= 0 <= span[1]:
            out.append(_cell_name(k, s, v))
    return out


def price_samples(model: Any, samples: Sequence[tuple[StepPlan, float, float, bool]],
                  idle_s: Sequence[float | None] | None = None) -> list[float]:
    """A real run's steps (TimedBackend.samples) priced in the order they ran (price_run). idle_s: each step's
    idle wait before it (TimedBackend.idle_s); a step after idle then pays the wake-up its wait costs
    (wakeup_cost: by the model's idle_wakeup_curve, else its flat idle_wakeup_s) on top of its price, run
    factor apart, as the simulator charges it (backends.synthetic.SyntheticBackend.step). Without idle_s, the
    model's own after-idle price (price_run)."""
    if idle_s is None:
        return price_run(model, [(plan, idle) for plan, _t, _gap, idle in samples])
    # a step with no known wait is the first on a fresh context (TimedBackend), where llama.cpp's graph starts
    # afresh: this also keeps apart the instances of a multi-instance run, whose samples come one after another
    steps = [(plan, False) for plan, *_ in samples]
    starts = sorted({0} | {i for i, d in enumerate(idle_s) if d is None})
    ends = starts[1:] + [len(steps)]
    prices = [p for a, b in zip(starts, ends, strict=True) for p in price_run(model, steps[a:b])]
    return [p + (wakeup_cost(model, d) if idle and plan.chunks else 0.0)
            for p, (plan, _t, _gap, idle), d in zip(prices, samples, idle_s, strict=True)]


def step_breakdown(samples: Sequence[tuple[StepPlan, float, float, bool]], profile: Any,
                   idle_s: Sequence[float | None] | None = None) -> list[dict]:
    """The real run's steps priced by the profile, by step kind: where the cost model is off."""
    prices = price_samples(profile, samples, idle_s)
    groups: dict[str, list[tuple[float, float]]] = {}
    for (plan, t, _gap, idle), price in zip(samples, prices, strict=True):
        groups.setdefault(step_kind(plan, idle), []).append((price, t))
    groups["all"] = [pt for v in list(groups.values()) for pt in v]
    rows = []
    for kind, pts in sorted(groups.items(), key=lambda kv: (kv[0] == "all", -sum(m for _, m in kv[1]))):
        pred, meas = [p for p, _ in pts], [m for _, m in pts]
        stats = percent_errors(pred, meas)
        rows.append({"kind": kind, "n": len(pts), "measured_total_s": float(sum(meas)),
                     "predicted_total_s": float(sum(pred)), "total_error_pct": (sum(pred) / sum(meas) - 1) * 100,
                     "median_measured_ms": float(np.median(meas)) * 1e3, "mape": stats["mape"],
                     "bias_pct": stats["bias_pct"]})
    return rows


def measure_load(backends: list, workload: Workload, rate: float, policy: Any, config: SchedulerConfig,
                 seed: int, router: str = "least_outstanding",
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """The real-time run of the workload re-timed at rate, with its timed steps and the CPU load around it."""
    w = retime(workload, rate, seed)
    timed = [TimedBackend(b) for b in backends]
    before = load_snapshot()
    measured = run_workload(w, policy, config, timed, router=router, realtime=True, progress=progress)
    after = load_snapshot()
    return {"rate": rate, "workload": w, "measured_run": measured, "instances": len(backends),
            "samples": [s for t in timed for s in t.samples], "idle_s": [d for t in timed for d in t.idle_s],
            "cpu_load": {"before": before, "after": after}}


def compare_load(m: dict, profile: Any, policy: Any, config: SchedulerConfig, seed: int,
                 router: str = "least_outstanding", noise_runs: int = NOISE_RUNS,
                 ensemble_noise: StepNoise | None = None, ensemble_runs: int = ENSEMBLE_RUNS,
                 executor: Any = None) -> dict:
    """A measured load (measure_load) against its prediction with profile: errors, intervals, diagnostics.

    executor (sim.executor; None: this process) runs the noisy reruns of the ensemble and the noise spread.

    With ensemble_noise (the speed probes' step noise, not this run's), the prediction is the median of
    ensemble_runs simulated runs with noisy step prices (ensemble_predict); the noiseless run is kept as
    "deterministic". Without it, the noiseless run is the prediction.
    """
    w, measured, samples, instances = m["workload"], m["measured_run"], m["samples"], m["instances"]
    predicted = predict(w, policy, config, profile, instances, router)
    measured.policy, predicted.policy = "measured", "predicted"
    sm, sp = summarize(measured), summarize(predicted)
    deterministic = None
    if ensemble_noise is not None and ensemble_runs > 0:
        ens = ensemble_predict(w, policy, config, profile, instances, router, ensemble_noise, ensemble_runs, seed,
                               executor)
        deterministic = {"predicted": sp, "rel_error": rel_errors(sm, sp)}
        predicted, sp = ens.pop("run"), {**ens.pop("summary"), "policy": "predicted"}
        predicted.policy = "predicted"
        deterministic["ensemble"] = ens
    rel = rel_errors(sm, sp)
    sensitivity = price_sensitivity(w, policy, config, profile, instances, router, sm, rel)
    idle_s = m.get("idle_s")
    noise = noise_spread(w, policy, config, profile, instances, router, sm, step_noise(samples, profile, idle_s),
                         runs=noise_runs, seed=seed, executor=executor) if noise_runs else None
    at_speed = None
    speed = run_speed_factors(samples, profile, idle_s)
    if speed is not None:
        sa = summarize(predict(w, policy, config, speed, instances, router))
        at_speed = {"run_factor": speed.run_factor, "prefill_run_factor": speed.prefill_run_factor,
                    "predicted": sa, "rel_error": rel_errors(sm, sa)}
        timeline = SpeedTimeline(speed, samples, idle_s=idle_s)
        st = summarize(predict(w, policy, config, timeline, instances, router))
        at_speed["over_time"] = {"window_s": timeline.window_s, "windows": timeline.factors,
                                 "predicted": st, "rel_error": rel_errors(sm, st)}
    overhead = [s[2] for s in samples]
    step_s = [s[1] for s in samples]
    return {"rate": m["rate"], "workload": w, "measured_run": measured, "predicted_run": predicted,
            "measured": sm, "predicted": sp, "rel_error": rel,
            "steps": step_breakdown(samples, profile, idle_s),
            "sampling_noise": sampling_noise(measured, seed),
            "rel_error_interval": error_interval(measured, predicted, seed), "at_run_speed": at_speed,
            "price_sensitivity": sensitivity, "step_noise": noise, "cpu_load": m["cpu_load"],
            "deterministic": deterministic,
            "driver_overhead": {"mean_ms": float(np.mean(overhead)) * 1e3 if overhead else None,
                                "share_pct": float(sum(overhead) / sum(step_s) * 100) if step_s else None},
            "parallel_instances": measured.config.get("parallel_instances")}


def predict(workload: Workload, policy: Any, config: SchedulerConfig, model: Any, instances: int,
            router: str = "least_outstanding") -> RunResult:
    """The simulated run of a workload on `instances` SyntheticBackend(model)s (which charge a step after idle
    the model's wake-up for its wait). A table model's run skips decode stretches (exact: the fast-forward
    prices them as its steps would); a noisy one (NoisyModel) goes step by step, one draw a step."""
    from backends.synthetic import SyntheticBackend

    return run_workload(workload, policy, config, [SyntheticBackend(model) for _ in range(instances)],
                        router=router, fast_forward=None if hasattr(model, "decode_stretch") else False)


PRICE_DELTA = 0.02  # step-price error a prediction is tested against: probe-to-run drift here was 0.1-3.9 %


def price_sensitivity(workload: Workload, policy: Any, config: SchedulerConfig, profile: Any, instances: int,
                      router: str, measured: dict, rel_error: dict, delta: float = PRICE_DELTA) -> dict | None:
    """How far each predicted statistic moves when the step prices are off by delta (None for non-table models).

    The predicted run is repeated with the decode-only factor and the prompt-step factor each scaled by
    1 - delta and 1 + delta (four runs). For each statistic: the lowest and highest relative error against
    the measured run over those runs and the prediction itself (whose errors are rel_error). A statistic
    whose range is much wider than 2 * delta is sensitive to step prices (at light load, a tail made of a
    few requests whose decodes did or did not meet another request's prompt chunk): no calibration that
    prices steps to within delta can promise it.
    """
    from backends.cost.table import TableCostModel

    if not isinstance(profile, TableCostModel):
        return None
    errors = [rel_error]
    for a in (1 - delta, 1 + delta):
        for b in (1 - delta, 1 + delta):
            model = profile.scaled(a, b)
            errors.append(rel_errors(measured, summarize(predict(workload, policy, config, model, instances, router))))
    return {"delta": delta, "runs": len(errors), "rel_error_range": _error_ranges(errors)}


NOISE_BLOCK_S = 1.0  # the slow part of step-time noise: one draw per second of the run's clock


@dataclasses.dataclass(frozen=True)
class StepNoise:
    """How a real run's step times scatter around their prices, in two parts (standard deviations of the log).

    sigma: each step's own scatter; slow_sigma: a drift shared by the steps of each block_s seconds of the
    run's clock (the host's speed moves within seconds: consecutive steps' errors correlate, 0.4 at lag 1 and
    0.1 at lag 50 in a static run here), which moves a batch's drain more than the same scatter step by step.
    """

    sigma: float
    slow_sigma: float
    block_s: float = NOISE_BLOCK_S
    # the run's own residuals, when known: each step's deviation from its block's mean, and the block means
    # (log, each pool shifted so exp() averages 1). NoisyModel draws from them instead of a lognormal, so the
    # rare slow step a real run meets (one 11 % over its price turned a request's TPOT from 26 to 670 ms in
    # a light sjf load here) shows up in the reruns too.
    own_draws: tuple[float, ...] = ()
    block_draws: tuple[float, ...] = ()


def step_noise(samples: Sequence[tuple[StepPlan, float, float, bool]], model: Any,
               idle_s: Sequence[float | None] | None = None) -> StepNoise | None:
    """A real run's step times around their prices: log(measured / priced) over its steps with work, each kind
    (decode-only, with prompt tokens) about its own median (so the machine's mean speed, which the run factors
    carry, is not counted), cut into a slow part (the variance of NOISE_BLOCK_S block means beyond what the
    steps' own scatter explains) and the rest. None with fewer than 12 steps.

    Robust: the total is 1.4826 x the median absolute deviation and block means use residuals clipped at 4
    of it, so a step slowed by another process now and then does not set either.
    """
    prices = price_samples(model, samples, idle_s)
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for (plan, t, _gap, _idle), price in zip(samples, prices, strict=True):
        if plan.chunks and price > 0 and t > 0:
            rows[plan.num_prefill_tokens > 0].append((plan.now_s, float(np.log(t / price))))
    when, resid = [], []
    for kind in rows.values():
        if kind:
            med = float(np.median([r for _, r in kind]))
            when += [w for w, _ in kind]
            resid += [r - med for _, r in kind]
    if len(resid) < 12:
        return None
    raw = np.asarray(resid)
    total = float(1.4826 * np.median(np.abs(raw)))
    x = np.clip(raw, -4 * total, 4 * total)
    var = x.var()  # all of the scatter counted as the steps' own in a block mean's variance: slow errs low
    block = (np.asarray(when) // NOISE_BLOCK_S).astype(int)
    means, spread, own, shared = [], [], [], []
    for b in np.unique(block):
        sel = block == b
        if sel.sum() >= 5:
            means.append(x[sel].mean())
            spread.append(var / sel.sum())
            shared.append(raw[sel].mean())
            own += list(raw[sel] - raw[sel].mean())
    if len(means) >= 5:
        slow = min(float(np.sqrt(max(np.var(means) - np.mean(spread), 0.0))), total)
    else:  # too few blocks to tell a drift: every step's own deviation, no shared draw
        slow, own, shared = 0.0, list(raw), []

    def pool(values: list) -> tuple[float, ...]:
        v = np.asarray(values, dtype=float)
        return tuple(float(a) for a in v - np.log(np.mean(np.exp(v)))) if v.size else ()

    return StepNoise(float(np.sqrt(total * total - slow * slow)), slow, NOISE_BLOCK_S, pool(own), pool(shared))


class NoisyModel:
    """A cost model whose every step price is multiplied by noise of mean 1 (seeded): a draw of its own times a
    draw shared by every step starting in the same block_s seconds of the run; from the noise's pools of a real
    run's residuals when it has them, else lognormal with sigma and slow_sigma.

    Real step times scatter around their price (the host, caches, the OS); in a policy whose decisions hang on
    which of two events comes first (static batching: does a request arrive before the batch drains?) a few
    milliseconds move a request into another batch, and the run's statistics with it. Reruns of the simulator
    with this noise show how far one real run can land from another by that alone.
    """

    def __init__(self, inner: Any, noise: StepNoise, seed: int) -> None:
        self.inner = inner
        self.noise = noise
        self.idle_wakeup_s = getattr(inner, "idle_wakeup_s", 0.0)
        self.idle_wakeup_curve = getattr(inner, "idle_wakeup_curve", ())
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._blocks: dict[int, float] = {}

    def _draw(self, plan: StepPlan) -> float:
        n = self.noise
        if n.own_draws:
            own = n.own_draws[int(self._rng.integers(len(n.own_draws)))]
        else:
            own = self._rng.normal(-n.sigma * n.sigma / 2, n.sigma)  # E[exp(N(-s^2/2, s))] = 1
        if not (n.block_draws or n.slow_sigma):
            return float(np.exp(own))
        b = int(plan.now_s // n.block_s)
        if b not in self._blocks:  # a block's draw depends on the seed and the block only, not on the order
            rng = np.random.default_rng((self._seed, b))
            self._blocks[b] = (n.block_draws[int(rng.integers(len(n.block_draws)))] if n.block_draws
                               else float(rng.normal(-n.slow_sigma * n.slow_sigma / 2, n.slow_sigma)))
        return float(np.exp(own + self._blocks[b]))

    def step_time_s(self, plan: StepPlan) -> float:
        """The inner price times a noise draw."""
        return self.inner.step_time_s(plan) * self._draw(plan)

    def step_after(self, plan: StepPlan, prev_graph, after_idle: bool = False) -> tuple[float, Any]:
        """The inner step_after's price times a noise draw, and its graph key."""
        t, key = self.inner.step_after(plan, prev_graph, after_idle)
        return t * self._draw(plan), key


def merge_noise(noises: Sequence[StepNoise | None]) -> StepNoise | None:
    """One StepNoise from several runs' (the speed probes before and after a load): their pools joined, their
    sigmas combined as root mean squares. None when none of them has noise."""
    got = [n for n in noises if n is not None]
    if not got:
        return None

    def rms(values: list[float]) -> float:
        return float(np.sqrt(np.mean(np.square(values))))

    own = tuple(d for n in got for d in n.own_draws) if all(n.own_draws for n in got) else ()
    blocks = tuple(d for n in got for d in n.block_draws) if all(n.block_draws for n in got) else ()
    return StepNoise(rms([n.sigma for n in got]), rms([n.slow_sigma for n in got]), got[0].block_s, own, blocks)


def noisy_summary(workload: Workload, policy: Any, config: SchedulerConfig, profile: Any, instances: int,
                  router: str, noise: StepNoise, seed: int) -> dict:
    """The summary of one prediction with NoisyModel(profile, noise, seed): one task of noisy_summaries."""
    return summarize(predict(workload, policy, config, NoisyModel(profile, noise, seed), instances, router))


def noisy_summaries(workload: Workload, policy: Any, config: SchedulerConfig, profile: Any, instances: int,
                    router: str, noise: StepNoise, seeds: Sequence[int], executor: Any = None) -> list[dict]:
    """noisy_summary for each seed, in order, on the executor (None: in this process); a failed rerun raises."""
    if executor is None:
        return [noisy_summary(workload, policy, config, profile, instances, router, noise, s) for s in seeds]
    from sim.executor import Task

    tasks = [Task(f"noisy rerun, seed {s}", (workload, policy, config, profile, instances, router, noise, s))
             for s in seeds]
    outcomes = executor.map(noisy_summary, tasks)
    for o in outcomes:
        if not o.ok:
            raise RuntimeError(f"{o.label} failed: {o.error}")
    return [o.value for o in outcomes]


ENSEMBLE_SEED = 104729  # the ensemble's reruns draw apart from noise_spread's


def ensemble_predict(workload: Workload, policy: Any, config: SchedulerConfig, profile: Any, instances: int,
                     router: str, noise: StepNoise, runs: int = ENSEMBLE_RUNS, seed: int = 0,
                     executor: Any = None) -> dict:
    """The prediction as the median of `runs` simulated runs with every step's price times noise of mean 1
    (NoisyModel): {"summary", "run", "runs", "medoid", "sigma", "slow_sigma"}.

    One noiseless run is one path of a system whose decisions hang on which of two events comes first: under
    static batching a request that arrives a millisecond before or after a batch starts rides in another
    batch, and the runs part from there. A real run is another such path. The median over noisy reruns sits
    at the centre of the paths, where one noiseless run can sit anywhere among them. summary: the medoid
    run's summary with every latency statistic and throughput replaced by its median over the reruns; run:
    the medoid, the rerun nearest those medians (sum of |log| ratios), for per-request CSVs and plots.
    """
    seeds = [seed + ENSEMBLE_SEED + k for k in range(runs)]
    sums = noisy_summaries(workload, policy, config, profile, instances, router, noise, seeds, executor)
    medians = _stat_medians(sums)

    def distance(x: dict) -> float:
        pairs = [(x[k][s], medians[k][s]) for k in METRICS for s in STATS]
        pairs.append((x["throughput_rps"], medians["throughput_rps"]))
        return sum(abs(np.log(a / b)) for a, b in pairs if a and b and a > 0 and b > 0)

    best = min(range(runs), key=lambda i: distance(sums[i]))
    summary = {**sums[best], **{k: {**sums[best][k], **medians[k]} for k in METRICS},
               "throughput_rps": medians["throughput_rps"]}
    medoid = predict(workload, policy, config, NoisyModel(profile, noise, seeds[best]), instances, router)
    return {"summary": summary, "run": medoid, "runs": runs, "medoid": best, "sigma": noise.sigma,
            "slow_sigma": noise.slow_sigma,
            "draws": "the speed probes' own residuals" if noise.own_draws else "lognormal"}


def noise_spread(workload: Workload, policy: Any, config: SchedulerConfig, profile: Any, instances: int,
                 router: str, measured: dict, noise: StepNoise | None, runs: int = NOISE_RUNS,
                 seed: int = 0, executor: Any = None) -> dict | None:
    """The range of each statistic's relative error over `runs` predictions with NoisyModel(profile, noise).

    A statistic whose range is wide turns on the order of events, not on the price level: one real run of it
    can land at least that far from another (real runs also differ in the machine's speed), so no prediction
    holds it closer than that. A miss whose range holds 0 is one another real run of the same workload could
    have shown. None without noise, or for cost models without step_after (the roofline presets).
    """
    if noise is None or not (noise.sigma or noise.slow_sigma) or runs < 1 or not hasattr(profile, "step_after"):
        return None
    sums = noisy_summaries(workload, policy, config, profile, instances, router, noise,
                           [seed + k for k in range(runs)], executor)
    errors = [rel_errors(measured, s) for s in sums]
    return {"sigma": noise.sigma, "slow_sigma": noise.slow_sigma, "block_s": noise.block_s, "runs": runs,
            "draws": "the run's own residuals" if noise.own_draws else "lognormal",
            "rel_error_range": _error_ranges(errors), "rel_error_median": _stat_medians(errors)}


def _stat_medians(docs: list[dict]) -> dict:
    """The median of each latency statistic and of throughput over several summaries or relative-error dicts
    (None where undefined). Over relative errors against one measured run, it is the error of the median
    prediction, since each statistic's measured value is the same in all."""
    def median(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    out: dict = {k: {s: median([d[k][s] for d in docs]) for s in STATS} for k in METRICS}
    out["throughput_rps"] = median([d["throughput_rps"] for d in docs])
    return out


def _error_ranges(errors: list[dict]) -> dict:
    """[lowest, highest] of each statistic's relative error over several predictions (None where undefined)."""
    def span(values: list) -> list[float] | None:
        values = [v for v in values if v is not None]
        return [min(values), max(values)] if values else None

    out: dict = {k: {s: span([e[k][s] for e in errors]) for s in STATS} for k in METRICS}
    out["throughput_rps"] = span([e["throughput_rps"] for e in errors])
    return out


def run_speed_factors(samples: Sequence[tuple[StepPlan, float, float, bool]], profile: Any,
                      idle_s: Sequence[float | None] | None = None) -> Any:
    """The table profile with both run factors refitted on the measured run's own steps (None for other models).

    A diagnostic, not a prediction: it uses the measured run's step times (not its latencies) to say how
    much of an error is the machine's speed during the run (drift since the factors were fitted) and how
    much is the model's. At 1.2x capacity the TTFT mean moves about six times as much as the step time.
    """
    from backends.cost.table import TableCostModel

    if not isinstance(profile, TableCostModel):
        return None
    fit = fit_run_factors(samples, profile, min_steps=1, idle_s=idle_s)
    if fit is None:  # no step ran: nothing to refit
        return dataclasses.replace(profile, prefill_run_factor=None, decode_batch_factors=())
    decode, prefill = fit["by_kind"]["decode"], fit["by_kind"]["prefill"]
    return dataclasses.replace(profile, run_factor=decode["factor"],
                               prefill_run_factor=prefill["factor"] if prefill["steps"] else None,
                               decode_batch_factors=batch_factor_knots(fit["by_batch"], decode["factor"]))


SPEED_WINDOW_S = 60.0  # the machine's speed here moves by a few percent within minutes
SPEED_MIN_STEPS = 5  # steps of a kind in a window needed to refit that kind's factor there


class SpeedTimeline:
    """A cost model whose two run factors follow the measured run's own speed, window by window.

    Diagnostic only: the run's steps are cut into SPEED_WINDOW_S windows of the run's clock (a plan's
    now_s, the same clock on both sides); in each, each kind's factor is refitted on that window's steps
    (a kind with fewer than SPEED_MIN_STEPS steps there keeps the whole run's factor). A simulated step is
    priced with the factors of the window its plan starts in. Where a saturated queue turns a speed that
    moved during the run into more waiting than its mean speed gives, this shows the model at that speed.
    The whole run's decode factors by batch size (run_model.decode_batch_factors) move with the window's
    decode-only factor, since a window holds too few steps of each batch size to refit them.
    """

    def __init__(self, run_model: Any, samples: Sequence[tuple[StepPlan, float, float, bool]],
                 window_s: float = SPEED_WINDOW_S, idle_s: Sequence[float | None] | None = None) -> None:
        self.window_s = window_s
        self.idle_wakeup_s = run_model.idle_wakeup_s
        self.idle_wakeup_curve = run_model.idle_wakeup_curve
        n = 1 + max((int(plan.now_s // window_s) for plan, *_ in samples), default=0)
        buckets: list[list] = [[] for _ in range(n)]
        prices: list[list] = [[] for _ in range(n)]
        grid = run_model.grid()
        for sample, price in zip(samples, price_samples(grid, samples, idle_s), strict=True):
            w = int(sample[0].now_s // window_s)
            buckets[w].append(sample)
            prices[w].append(price)
        self.models, self.factors = [], []
        for rows, priced in zip(buckets, prices, strict=True):
            fit = fit_run_factors(rows, run_model, 1, priced)
            decode, prefill = run_model.run_factor, run_model.factor(True)
            if fit is not None:
                kinds = fit["by_kind"]
                decode = kinds["decode"]["factor"] if kinds["decode"]["steps"] >= SPEED_MIN_STEPS else decode
                prefill = kinds["prefill"]["factor"] if kinds["prefill"]["steps"] >= SPEED_MIN_STEPS else prefill
            self.factors.append([decode, prefill])
            self.models.append(run_model.scaled(decode / run_model.run_factor, prefill / run_model.factor(True)))

    def _model(self, plan: StepPlan) -> Any:
        return self.models[min(int(plan.now_s // self.window_s), len(self.models) - 1)]

    def step_time_s(self, plan: StepPlan) -> float:
        """The step's price with the factors of the window it starts in (the last window's after the run)."""
        return self._model(plan).step_time_s(plan)

    def step_after(self, plan: StepPlan, prev_graph, after_idle: bool = False) -> tuple[float, Any]:
        """step_time_s after a ubatch of graph key prev_graph, and the key after it (see backends.cost.graph)."""
        return self._model(plan).step_after(plan, prev_graph, after_idle)


def bracket_factors(profile: Any, before: dict | None, after: dict | None,
                    what: str = "the load") -> tuple[dict | None, Any]:
    """(speed summary, profile for what ran between two probes): each run factor the mean of the probes before
    and after it (profile unchanged and None when either is missing), and the decode-only factor by batch size
    fitted on both probes' steps together (batch_factor_knots).

    Drift within an hour is smooth enough that the mean of the two probes around a load reads the machine's
    speed during it better than the probe before it alone (over sixteen loads, decode-only factor 1.1 % -> 0.6 %
    RMS error against the run's own), and one probe caught in a slow moment counts half. The machine's speed
    does not move every batch size alike, and a probe at 0.7x capacity runs mostly small batches while a
    saturated load runs mostly full ones (see batch_factor_knots).
    """
    if before is None or after is None:
        return None, profile
    speed = {"method": f"mean of the real-time probes just before and just after {what}",
             "requests": before["requests"], "wall_s": before["wall_s"] + after["wall_s"],
             "run_factor": (before["run_factor"] + after["run_factor"]) / 2,
             "prefill_run_factor": (before["prefill_run_factor"] + after["prefill_run_factor"]) / 2,
             "profile_run_factor": profile.run_factor, "profile_prefill_run_factor": profile.factor(True),
             "before": before, "after": after}
    changes = {"run_factor": speed["run_factor"], "prefill_run_factor": speed["prefill_run_factor"]}
    if "by_batch" in before and "by_batch" in after:
        knots = batch_factor_knots(pool_by_batch([before["by_batch"], after["by_batch"]]), speed["run_factor"])
        speed["decode_batch_factors"] = [list(k) for k in knots]
        changes["decode_batch_factors"] = knots
    wb, wa = before.get("wakeup"), after.get("wakeup")
    if wb and wa and [i for i, _ in wb["knots"]] == [i for i, _ in wa["knots"]]:
        # the wake-up by idle wait: each knot the mean of the two probes' (see calib.calibrate.probe_wakeup)
        curve = tuple((float(i), (b + a) / 2) for (i, b), (_, a) in zip(wb["knots"], wa["knots"], strict=True))
        speed["idle_wakeup_curve"] = [list(k) for k in curve]
        speed["profile_idle_wakeup_s"] = float(getattr(profile, "idle_wakeup_s", 0.0))
        speed["profile_idle_wakeup_curve"] = [list(k) for k in getattr(profile, "idle_wakeup_curve", ())]
        changes["idle_wakeup_curve"] = curve
    return speed, dataclasses.replace(profile, **changes)


def fit_run_factors(samples: Sequence[tuple[StepPlan, float, float, bool]], model: Any, min_steps: int,
                    grid_prices: Sequence[float] | None = None,
                    idle_s: Sequence[float | None] | None = None) -> dict | None:
    """A run's steps against the table model's grid fit (its run factors set aside): sum of measured / sum of
    priced step time over all steps, and over its steps of decodes only and its steps with prompt tokens,
    each clamped to [0.5, 2]. A kind with fewer than min_steps steps takes the factor of all steps. None
    when no step ran. Samples are TimedBackend.samples: (plan, seconds, of which driver, after idle), in the
    order they ran (the graph llama.cpp reuses passes from step to step); grid_prices, when given, are
    their grid prices already (for a slice of a run). "by_batch": the steps of decodes only by their number
    of sequences, [[B, measured s, priced s, steps], ...] in rising B (see batch_factor_knots).
    """
    if grid_prices is None:
        grid_prices = price_samples(model.grid(), samples, idle_s)
    priced = [(price, t, plan.num_prefill_tokens > 0, len(plan.chunks))
              for (plan, t, _gap, _idle), price in zip(samples, grid_prices, strict=True) if plan.chunks]
    if not priced:
        return None

    def ratio(rows: list) -> tuple[float, float, float]:
        measured, predicted = sum(r[1] for r in rows), sum(r[0] for r in rows)
        return measured, predicted, min(max(measured / predicted, 0.5), 2.0)

    measured, predicted, overall = ratio(priced)
    kinds = {}
    for name, prefill in (("decode", False), ("prefill", True)):
        rows = [r for r in priced if r[2] == prefill]
        m, p, f = ratio(rows) if len(rows) >= min_steps else (None, None, overall)
        kinds[name] = {"steps": len(rows), "measured_s": m, "predicted_s": p, "factor": f}
    by_batch = pool_by_batch([[(b, t, price, 1) for price, t, prefill, b in priced if not prefill]])
    return {"steps": len(priced), "measured_s": measured, "predicted_s": predicted, "overall_factor": overall,
            "by_kind": kinds, "by_batch": by_batch}


BATCH_SHRINK_STEPS = 5  # pseudo-steps at the decode-only factor added to each batch size's own (see below)


def pool_by_batch(tables: Sequence[Sequence[Sequence[float]]]) -> list[list]:
    """Several "by_batch" tables ([[B, measured s, priced s, steps], ...], as fit_run_factors gives them) summed
    batch size by batch size, in rising B."""
    pooled: dict[int, list] = {}
    for table in tables:
        for b, measured, predicted, steps in table:
            row = pooled.setdefault(int(b), [int(b), 0.0, 0.0, 0])
            row[1] += measured
            row[2] += predicted
            row[3] += steps
    return [pooled[b] for b in sorted(pooled)]


def batch_factor_knots(by_batch: Sequence[Sequence[float]], decode_factor: float,
                       shrink: float = BATCH_SHRINK_STEPS) -> tuple[tuple[int, float], ...]:
    """A TableCostModel's decode_batch_factors from a fit's "by_batch" table: at each batch size that ran, its
    steps' measured / priced time, pulled toward the decode-only factor as if `shrink` more steps had run
    at that factor (a batch size seen in 3 steps counts 3/8 its own, in 50 steps 50/55), clamped to [0.5, 2].
    Batch sizes that did not run take the line between their neighbours (flat beyond the ends).

    Why: a probe at 0.7x capacity runs mostly small batches and a saturated load mostly full ones, and the
    machine's speed does not move every batch size alike (one evening here B = 2 decodes ran at x0.85 of
    their price and B = 16 at x0.92). One decode factor fitted on the probe's mix then misprices the
    saturated load's steps by the difference (calib/experiments/batch_factors.py measures how much).
    """
    knots = []
    for b, measured, predicted, steps in by_batch:
        if steps <= 0 or predicted <= 0:
            continue
        w = steps / (steps + shrink)
        knots.append((int(b), min(max(w * measured / predicted + (1 - w) * decode_factor, 0.5), 2.0)))
    return tuple(knots)


def relabel(run: RunResult, label: str) -> RunResult:
    """A shallow copy of a run with another label (for plots that show several loads)."""
    return dataclasses.replace(run, policy=label)

def step_kind(plan: StepPlan, after_idle: bool = False) -> str:
    """Coarse step kind for error breakdowns: decode B=…, prefill, mixed, kv only (+copy, after idle)."""
    if not plan.chunks:
        kind = "kv only"
    elif plan.num_prefill_tokens + plan.num_pad_tokens == 0:
        b = plan.num_decode_seqs
        kind = "decode B=1" if b == 1 else "decode B=2-4" if b <= 4 else "decode B=5-8" if b <= 8 else "decode B>8"
    elif plan.num_decode_seqs == 0:
        kind = "prefill" if len(plan.chunks) == 1 else "prefill multi"
    else:
        kind = "mixed"
    return kind + (" +copy" if plan.copies else "") + (" after idle" if after_idle else "")


# -- where a profile came from ---------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict:
    """{"file", "size_bytes", "sha256"} of a model file (the hash is cached per size and mtime)."""
    p = Path(path)
    st = p.stat()
    return {"file": p.name, "size_bytes": st.st_size, "sha256": _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)}


def model_fingerprint(llama_model) -> dict:
    """Name, architecture, file name, size and sha256 of a loaded LlamaModel."""
    return {"name": llama_model.name, "architecture": llama_model.architecture, **file_fingerprint(llama_model.path)}


def build_info() -> dict:
    """llama-cpp-python version and llama.cpp's system info line."""
    import llama_cpp as L

    info = L.llama_print_system_info()
    return {"llama_cpp_python": getattr(L, "__version__", None),
            "llama_cpp_system_info": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info)}


def machine_info() -> dict:
    """CPU model, core counts, platform and Python version of this machine."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_model": cpu or platform.processor() or None, "nproc": affinity or os.cpu_count(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def load_snapshot() -> dict:
    """Load average and CPU pressure (PSI "some" avg10/avg60) now: how shared the CPU was."""
    out: dict = {}
    try:
        out["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        fields = dict(item.split("=") for item in some[1:])
        out["cpu_pressure_some_avg10_pct"] = float(fields["avg10"])
        out["cpu_pressure_some_avg60_pct"] = float(fields["avg60"])
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return out
