"""Run factors: the machine's speed during a real run against the calibration grid's prices, refitted on its steps
or bracketed by real-time probes before and after a load."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from backends.cost.base import WakesAfterIdle
from backends.cost.table import TableCostModel
from calib.measure import price_samples
from scheduler.messages import StepPlan


def run_speed_factors(samples: Sequence[tuple[StepPlan, float, float, bool]], profile: Any,
                      idle_s: Sequence[float | None] | None = None) -> Any:
    """The table profile with both run factors refitted on the measured run's own steps (None for other models).

    A diagnostic, not a prediction: it uses the measured run's step times (not its latencies) to say how
    much of an error is the machine's speed during the run (drift since the factors were fitted) and how
    much is the model's. At 1.2x capacity the TTFT mean moves about six times as much as the step time.
    """

    if not isinstance(profile, TableCostModel):
        return None
    fit = fit_run_factors(samples, profile, min_steps=1, idle_s=idle_s)
    if fit is None:  # no step ran: nothing to refit
        return dataclasses.replace(profile, prefill_run_factor=None, decode_batch_factors=())
    decode, prefill = fit["by_kind"]["decode"], fit["by_kind"]["prefill"]
    return dataclasses.replace(profile, run_factor=decode["factor"],
                               prefill_run_factor=prefill["factor"] if prefill["steps"] else None,
                               decode_batch_factors=batch_factor_knots(fit["by_batch"], decode["factor"]))


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
        # the wake-up by idle wait: each knot the mean of the two probes' (see calib.probes.probe_wakeup)
        curve = tuple((float(i), (b + a) / 2) for (i, b), (_, a) in zip(wb["knots"], wa["knots"], strict=True))
        speed["idle_wakeup_curve"] = [list(k) for k in curve]
        wakes = isinstance(profile, WakesAfterIdle)
        speed["profile_idle_wakeup_s"] = float(profile.idle_wakeup_s) if wakes else 0.0
        speed["profile_idle_wakeup_curve"] = [list(k) for k in profile.idle_wakeup_curve] if wakes else []
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
    machine's speed does not move every batch size alike (measured once on a 2-vCPU VM: B = 2 decodes ran at x0.85 of
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
