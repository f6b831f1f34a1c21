"""Step noise: how a real run's step times scatter around their prices, noisy simulated reruns, and bootstrap
intervals of the measured statistics. Diagnostics of an error; the pass rule is calib.judge's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from backends.cost.base import PricesGraphReuse, WakesAfterIdle
from calib.judge import METRICS, STATS, rel_errors
from calib.measure import predict, price_samples
from scheduler import SchedulerConfig
from scheduler.messages import StepPlan
from sim.metrics import summarize
from sim.records import RunResult
from sim.workload import Workload

# reruns with noisy step prices, when asked for (validate --ensemble-runs N / --noise-runs N; both off by default)
NOISE_RUNS = 20  # a 21st draw of the same noise lands inside the range of 20 with odds 19/21
ENSEMBLE_RUNS = 20  # noisy reruns whose median is the prediction
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


NOISE_BLOCK_S = 1.0  # the slow part of step-time noise: one draw per second of the run's clock


@dataclasses.dataclass(frozen=True)
class StepNoise:
    """How a real run's step times scatter around their prices, in two parts (standard deviations of the log).

    sigma: each step's own scatter; slow_sigma: a drift shared by the steps of each block_s seconds of the
    run's clock (the host's speed moves within seconds: consecutive steps' errors correlate, 0.4 at lag 1 and
    0.1 at lag 50 in a static run of gemma-3-270m on a 2-vCPU VM), which moves a batch's drain more than the
    same scatter step by step.
    """

    sigma: float
    slow_sigma: float
    block_s: float = NOISE_BLOCK_S
    # the run's own residuals, when known: each step's deviation from its block's mean, and the block means
    # (log, each pool shifted so exp() averages 1). NoisyModel draws from them instead of a lognormal, so the
    # rare slow step a real run meets (one 11 % over its price turned a request's TPOT from 26 to 670 ms in
    # a light sjf load on a 2-vCPU VM) shows up in the reruns too.
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
        wakes = isinstance(inner, WakesAfterIdle)
        self.idle_wakeup_s = inner.idle_wakeup_s if wakes else 0.0
        self.idle_wakeup_curve = inner.idle_wakeup_curve if wakes else ()
        self.tracks_kv_cells = getattr(inner, "tracks_kv_cells", False)
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
    if noise is None or not (noise.sigma or noise.slow_sigma) or runs < 1 or not isinstance(profile, PricesGraphReuse):
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
