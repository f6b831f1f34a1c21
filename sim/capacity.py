"""One configuration's capacity search (bracketing, then bisection), and the SLO misses that load does not cause.

search() probes rates in order: start; double while passing or halve while
failing, until the answer is bracketed; then bisect. While halving, when a lower
rate does not raise SLO attainment, the requests that still miss are replayed
one at a time on an idle engine (each arrives after the previous one finished):
those that miss alone, with the rejected ones, miss at every load. When they
alone keep attainment below the target, no rate can pass and the search stops
there, naming them (by reason, with request ids), instead of halving on.

capacity_task() is the executor's task: one configuration's whole search, in
order, in whichever process runs it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from sim.cli_runs import Context, RunSpec, execute
from sim.metrics import SLO_KEYS, is_finished, meets_slo, reason, request_latencies
from sim.study import Study, context
from sim.workload import Workload

MAX_BRACKET_STEPS = 12  # doublings or halvings: a factor of 4096 either way
NUM_NAMED = 5  # request ids named per reason
_METRIC = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s"}


def _category(detail: str) -> str:
    """A rejection's detail without its numbers and advice, so that like rejections group together."""
    text = re.sub(r"\s*\([^)]*\)|\s*=\s*[\d.]+", "", detail.split(";")[0])
    return " ".join(text.split())


def _miss_reason(record, slo: dict[str, float]) -> str | None:
    """Why one request missed the SLO (None: it met it): its rejection, unfinished, or the first bound it broke."""
    if not is_finished(record):
        why = reason(record) or "unfinished"
        return f"{why} ({_category(record.detail)})" if record.detail else why
    lat = request_latencies(record)
    if meets_slo(lat, slo):
        return None
    for key in SLO_KEYS:
        value = lat[_METRIC[key]]
        if key in slo and (value is None and key != "tpot" or value is not None and value > slo[key]):
            return f"{key.upper()} above {slo[key]:g} s alone"
    return "SLO missed alone"


def load_independent_misses(ctx: Context, spec: RunSpec, workload: Workload, run) -> dict:
    """The requests that miss the SLO at any load: rejected ones, and those that miss alone on an idle engine."""
    slo = ctx.slo
    missed = [r for r in run.records if _miss_reason(r, slo) is not None]
    always = {r.request_id: _miss_reason(r, slo) for r in missed if not is_finished(r) and reason(r) == "rejected"}
    rest = {r.request_id for r in missed if r.request_id not in always}
    if rest:
        # far enough apart that each runs alone: longer than any of them took under load, at least a second
        slowest = max((r.finish_s - r.arrival_s for r in run.records if r.finish_s is not None), default=0.0)
        gap_s = max(1.0, 4 * slowest)
        requests = [w for w in workload.requests if w.request_id in rest]
        alone = Workload(tuple(replace(w, arrival_s=i * gap_s) for i, w in enumerate(requests)),
                         f"{len(requests)} requests of {workload.description}, {gap_s:g} s apart",
                         {"kind": "isolated", "base": workload.source, "gap_s": gap_s})
        alone_run, _ = execute(ctx, spec, alone, progress=False)
        for r in alone_run.records:
            why = _miss_reason(r, slo)
            if why is not None:
                always[r.request_id] = why
    order = {r.request_id: i for i, r in enumerate(run.records)}
    by_reason: dict[str, list[str]] = {}
    for rid in sorted(always, key=order.__getitem__):
        by_reason.setdefault(always[rid], []).append(rid)
    counts = Counter({why: len(ids) for why, ids in by_reason.items()})
    n = len(run.records)
    return {"num_requests": n, "num_misses": len(always), "max_attainment": (n - len(always)) / n if n else None,
            "reasons": [{"reason": why, "count": count, "request_ids": by_reason[why][:NUM_NAMED]}
                        for why, count in counts.most_common()]}


def search(ctx: Context, spec: RunSpec, at, start: float, attainment: float, tolerance: float,
           max_runs: int) -> dict:
    """Bracket and bisect one configuration's capacity; every probe is kept in order (the best one's run too)."""
    probes: list[dict] = []
    best: dict | None = None
    last_run = None  # the latest probe's run, for the misses check (only the best one is kept)

    def probe(rate: float) -> bool:
        nonlocal best, last_run
        run_, summary = execute(ctx, spec, at(rate), extra={"rate": rate}, progress=ctx.llama is not None)
        value = summary.get("slo_attainment")
        ok = value is not None and value >= attainment
        summary["slo_pass"] = ok
        probes.append({"rate": rate, "pass": ok, "summary": summary})
        last_run = run_
        if ok and (best is None or rate > best["rate"]):
            best = {"rate": rate, "run": run_, "summary": summary}
        return ok

    lo = hi = None
    stop = misses = None
    rate = start
    if probe(rate):
        lo = rate
        for _ in range(MAX_BRACKET_STEPS):
            if len(probes) >= max_runs:
                break
            rate *= 2
            if not probe(rate):
                hi = rate
                break
            lo = rate
    else:
        hi = rate
        for _ in range(MAX_BRACKET_STEPS):
            if len(probes) >= max_runs:
                break
            before = probes[-1]["summary"]["slo_attainment"] or 0.0
            rate /= 2
            if probe(rate):
                lo = rate
                break
            hi = rate
            if misses is None and (probes[-1]["summary"]["slo_attainment"] or 0.0) <= before:
                misses = load_independent_misses(ctx, spec, at(rate), last_run)
                if misses["max_attainment"] is not None and misses["max_attainment"] < attainment:
                    stop = "lowering the rate no longer helps"
                    break
    last_run = None
    while lo is not None and hi is not None and (hi - lo) / hi > tolerance and len(probes) < max_runs:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    result = {"policy": spec.label, "capacity_rps": lo, "lowest_failing_rps": hi,
              "bracketed": lo is not None and hi is not None, "best": best, "probes": probes}
    if stop is not None:
        result["stopped"] = stop
        result["load_independent_misses"] = misses
    return result


def capacity_task(study: Study, spec: RunSpec, start: float) -> dict:
    """One task: one configuration's whole search, in order (the best run comes back, the others' summaries)."""
    sc = context(study)
    args = sc.ctx.args
    return search(sc.ctx, spec, sc.rates.at, start, args.attainment, args.tolerance, args.max_runs)
