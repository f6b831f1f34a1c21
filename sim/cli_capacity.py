"""Find the highest arrival rate each policy serves within latency SLOs (bracketing + bisection).

A rate passes when SLO attainment >= --attainment (default 0.9): at least that
fraction of ALL requests (rejected and unfinished ones count as misses) finished
and met every bound of --slo (ttft, tpot, e2e; a request with one output token
meets a TPOT bound). With a single bound this is "its p90 is within the SLO";
with several it is stricter, as each request must meet all of them at once.

Search: start at --rate (default 1 req/s); double while passing or halve while
failing to bracket the answer, then bisect until the bracket is within
--tolerance (relative, default 5 %) or --max-runs runs per policy. Without
--trace each probe is the synthetic workload of the chosen arrival process
regenerated at that rate with --seed; with --trace the trace is time-scaled to
the rate. Few requests make high rates look easy (the queue has no time to
grow): raise --num-requests for a firmer answer. The answer is the highest
passing rate probed.
"""

from __future__ import annotations

import argparse

from sim.cli_common import add_backend_args, add_output_args, add_scheduler_args, add_workload_args, positive_float
from sim.cli_output import emit, finish, log, out_dir, resolved_config
from sim.cli_rates import RateWorkloads, rate_row, rate_row_header
from sim.cli_runs import Context, RunSpec, close, execute, parse_run_specs, prepare
from sim.report import format_table, format_time

DEFAULT_POLICIES = "static,continuous,chunked"
MAX_BRACKET_STEPS = 12  # doublings or halvings: a factor of 4096 either way


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """capacity's flags."""
    parser.add_argument("--policies", "--policy", default=DEFAULT_POLICIES, metavar="A,B,...",
                        help=f"strategies (default {DEFAULT_POLICIES})")
    parser.add_argument("--attainment", type=float, default=0.9,
                        help="fraction of requests that must meet every SLO bound (default 0.9)")
    parser.add_argument("--tolerance", type=positive_float, default=0.05,
                        help="stop when (high - low) / high is below this (default 0.05)")
    parser.add_argument("--max-runs", type=int, default=20, help="runs per policy at most (default 20)")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    add_output_args(parser)


def _passes(summary: dict, attainment: float) -> bool:
    value = summary.get("slo_attainment")
    return value is not None and value >= attainment


def search(ctx: Context, spec: RunSpec, workloads: RateWorkloads, start: float, width: int) -> dict:
    """Bracket and bisect one policy's capacity; every probe is kept in order."""
    args = ctx.args
    probes: list[dict] = []

    def probe(rate: float) -> bool:
        run_, summary = execute(ctx, spec, workloads.at(rate), extra={"rate": rate})
        ok = _passes(summary, args.attainment)
        summary["slo_pass"] = ok
        probes.append({"rate": rate, "pass": ok, "run": run_, "summary": summary})
        emit(args, f"  step {len(probes):>2}: {rate_row(spec.label, rate, summary, True, format_time, width)}  "
                   f"{'pass' if ok else 'FAIL'}")
        return ok

    lo = hi = None
    rate = start
    if probe(rate):
        lo = rate
        for _ in range(MAX_BRACKET_STEPS):
            if len(probes) >= args.max_runs:
                break
            rate *= 2
            if not probe(rate):
                hi = rate
                break
            lo = rate
    else:
        hi = rate
        for _ in range(MAX_BRACKET_STEPS):
            if len(probes) >= args.max_runs:
                break
            rate /= 2
            if probe(rate):
                lo = rate
                break
            hi = rate
    while lo is not None and hi is not None and (hi - lo) / hi > args.tolerance and len(probes) < args.max_runs:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    best = max((p for p in probes if p["pass"]), key=lambda p: p["rate"], default=None)
    return {"policy": spec.label, "capacity_rps": lo, "lowest_failing_rps": hi, "bracketed": lo is not None and
            hi is not None, "best": best, "probes": probes}


def _answer(result: dict) -> str:
    lo, hi = result["capacity_rps"], result["lowest_failing_rps"]
    if lo is None:
        return f"{result['policy']}: no rate passed (lowest tried {hi:.3g} req/s)"
    if hi is None:
        return f"{result['policy']}: at least {lo:.3g} req/s (no failing rate found; raise --num-requests?)"
    return f"{result['policy']}: {lo:.3g} req/s (fails at {hi:.3g} req/s)"


def _capacity_entry(result: dict) -> dict:
    """The answer for one policy with every probe's rate, verdict and p90 latencies (capacity.json)."""
    steps = []
    for p in result["probes"]:
        s = p["summary"]
        steps.append({"rate": p["rate"], "pass": p["pass"], "slo_attainment": s.get("slo_attainment"),
                      **{f"{m}_p90_s": s[f"{m}_s"]["p90"] for m in ("ttft", "tpot", "e2e")}})
    keys = ("policy", "capacity_rps", "lowest_failing_rps", "bracketed")
    return {**{k: result[k] for k in keys}, "steps": steps}


def run(args: argparse.Namespace) -> int:
    """Search every policy; print the steps and the answers; write results."""
    if not args.slo:
        raise ValueError("capacity needs --slo, e.g. --slo ttft=1,tpot=0.2")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment {args.attainment} must be in (0, 1]")
    specs = parse_run_specs(args.policies)
    workloads = RateWorkloads(args, "capacity")
    ctx = prepare(args, "capacity")
    try:
        out = out_dir(args, "capacity")
        start = args.rate or 1.0
        slo_text = ", ".join(f"{k} <= {format_time(v)}" for k, v in ctx.slo.items())
        emit(args, ctx.header() + "\nworkload: " + workloads.describe(start))
        emit(args, f"SLO: {slo_text}; a rate passes when >= {100 * args.attainment:g} % of requests meet it\n")
        results = []
        width = max(len("policy"), *(len(spec.label) for spec in specs))
        for spec in specs:
            emit(args, f"{spec.label}:\n{' ' * 11}{rate_row_header(True, width)}")
            results.append(search(ctx, spec, workloads, start, width))
        answers = "\n".join("  " + _answer(r) for r in results)
        best_runs = [r["best"] for r in results if r["best"] is not None]
        runs = [p["run"] for p in best_runs]
        summaries = [p["summary"] for p in best_runs]
        for run_, p in zip(runs, best_runs, strict=True):
            run_.policy = f"{p['summary']['policy']} @ {p['rate']:.3g}"
        table = format_table(summaries, columns=[r.policy for r in runs]) if summaries else "(no passing run)"
        report = f"capacity (highest passing rate):\n{answers}\n\nat capacity:\n{table}"
        capacity = [_capacity_entry(r) for r in results]
        config = resolved_config(ctx, None, {"workload": workloads.config(start), "attainment": args.attainment,
                                             "tolerance": args.tolerance, "start_rate": start})
        points = [{"policy": r["policy"], "rate": p["rate"], "summary": p["summary"]} for r in results
                  for p in r["probes"]]
        from sim.plots import plot_rate_curves

        jobs = [("capacity_probes.png", lambda p: plot_rate_curves(points, p))]
        log(args, f"capacity: {sum(len(r['probes']) for r in results)} runs")
        return finish(ctx, out, runs, summaries, config, report, jobs, extra_json={"capacity": capacity},
                      extra_files={"capacity.json": capacity})
    finally:
        close(ctx)
