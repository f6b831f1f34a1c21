"""Both sides of a load: the real run, timed step by step (TimedBackend), and the simulated run of the same workload.

The measured side is run_workload(realtime=True) on LlamaCppBackend wrapped in TimedBackend, whose step time is
the step's wall time plus the driver's own work since the previous step (commit, records, SimPy, schedule)
while the engine is busy: so the SimPy real-time clock follows the wall clock instead of silently dropping the
scheduler's time, and it measures the same quantity `tokenstep calibrate` fits. The predicted side is the same
workload, seed, policy and SchedulerConfig in virtual time on SyntheticBackend(profile).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.cost.base import PricesGraphReuse
from backends.cost.table import price_run
from backends.cost.wakeup import wakeup_cost
from calib.fit_table import percent_errors
from calib.provenance import load_snapshot
from scheduler import SchedulerConfig
from scheduler.messages import StepPlan, StepResult
from sim.arrivals import poisson
from sim.metrics import summarize
from sim.model import run_workload
from sim.records import RunResult
from sim.workload import Workload


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


def predict(workload: Workload, policy: Any, config: SchedulerConfig, model: Any, instances: int,
            router: str = "least_outstanding") -> RunResult:
    """The simulated run of a workload on `instances` SyntheticBackend(model)s (which charge a step after idle
    the model's wake-up for its wait). A table model's run skips decode stretches (exact: the fast-forward
    prices them as its steps would); a noisy one (NoisyModel) goes step by step, one draw a step."""
    from backends.synthetic import SyntheticBackend

    return run_workload(workload, policy, config, [SyntheticBackend(model) for _ in range(instances)],
                        router=router, fast_forward=None if isinstance(model, PricesGraphReuse) else False)


def estimate_capacity(profile: Any, workload: Workload, policy: Any, config: SchedulerConfig, instances: int = 1,
                      router: str = "least_outstanding") -> float:
    """Requests/s the profile predicts for `instances` instances when the whole workload arrives at once."""
    burst = Workload(tuple(dataclasses.replace(r, arrival_s=0.0) for r in workload.requests), workload.description,
                     workload.source)
    s = summarize(predict(burst, policy, config, profile, instances, router))
    if not s["throughput_rps"]:
        raise ValueError("the profile predicts no finished request for this workload; give --rates explicitly")
    return float(s["throughput_rps"])


def relabel(run: RunResult, label: str) -> RunResult:
    """A shallow copy of a run with another label (for plots that show several loads)."""
    return dataclasses.replace(run, policy=label)
