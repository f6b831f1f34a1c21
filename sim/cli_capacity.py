"""Find the highest arrival rate each policy serves within latency SLOs (bracketing + bisection).

A rate passes when SLO attainment >= --attainment (default 0.9): at least that
fraction of ALL requests (rejected and unfinished ones count as misses) finished
and met every bound of --slo (ttft, tpot, e2e; a request with one output token
meets a TPOT bound). With a single bound this is "its p90 is within the SLO";
with several it is stricter, as each request must meet all of them at once.

Search: start at --rate (default 1 req/s); double while passing or halve while
failing to bracket the answer, then bisect until the bracket is within
--tolerance (relative, default 5 %) or --max-runs runs per configuration. While
halving, when a lower rate does not raise attainment, the requests still missing
are replayed one at a time on an idle engine: those that miss alone, and the
rejected ones, miss at any load; when they alone keep attainment below
--attainment the search stops and names them. Without
--trace each probe is the synthetic workload of the chosen arrival process
regenerated at that rate with --seed; with --trace the trace is time-scaled to
the rate. Few requests make high rates look easy (the queue has no time to
grow): raise --num-requests for a firmer answer. The answer is the highest
passing rate probed.

Configurations (--policies x each --param key=v1,v2) are searched in parallel on
--executor, each one's probes in order; results stream to results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from sim.capacity import capacity_task
from sim.cli_common import add_backend_args, add_output_args, add_scheduler_args, add_workload_args, positive_float
from sim.cli_output import emit, finish, log, out_dir, resolved_config
from sim.cli_rates import RateWorkloads, rate_row, rate_row_header
from sim.cli_runs import close, parse_run_spec, prepare, run_config, split_specs
from sim.cli_sweep import parse_params
from sim.executor import Task, add_executor_arg
from sim.report import format_table, format_time, safe_name, unique_stems, write_run_files
from sim.study import register, report_failures, run_study, start_executor

DEFAULT_POLICIES = "static,continuous,chunked"
RUNS_DIR = ".runs"  # <out>/.runs/<task index>/: each task's best run's CSVs, moved into <out> at the end


def best_name(best: dict) -> str:
    """The best run's name: its policy at its rate (its files are requests_/steps_<safe name>.csv)."""
    return f"{best['summary']['policy']} @ {best['rate']:.3g}"


def capacity_point(study, spec, start: float, run_dir: str | None = None) -> dict:
    """One task: capacity_task, then (run_dir given) the best run's CSVs written there by the task itself.

    Only the summaries then travel back (best["run"] is None): the parent does not write 12 full-trace
    runs one after another at the end.
    """
    result = capacity_task(study, spec, start)
    best = result["best"]
    if run_dir is not None and best is not None:
        write_run_files(run_dir, best["run"], safe_name(best_name(best)))
        result["best"] = {**best, "run": None}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """capacity's flags."""
    parser.add_argument("--policies", "--policy", default=DEFAULT_POLICIES, metavar="A,B,...",
                        help=f"strategies (default {DEFAULT_POLICIES})")
    parser.add_argument("--attainment", type=float, default=0.9,
                        help="fraction of requests that must meet every SLO bound (default 0.9)")
    parser.add_argument("--tolerance", type=positive_float, default=0.05,
                        help="stop when (high - low) / high is below this (default 0.05)")
    parser.add_argument("--max-runs", type=int, default=20, help="runs per configuration at most (default 20)")
    parser.add_argument("--param", action="append", metavar="KEY=V1,V2",
                        help="also search each value of a policy or scheduler parameter (repeatable: a grid)")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    add_output_args(parser)
    add_executor_arg(parser)


def _answer(result: dict) -> str:
    lo, hi = result["capacity_rps"], result["lowest_failing_rps"]
    misses = result.get("load_independent_misses")
    if misses is not None:
        reasons = "".join(f"\n    {m['count']} {m['reason']}: {', '.join(m['request_ids'])}"
                          f"{', ...' if m['count'] > len(m['request_ids']) else ''}" for m in misses["reasons"])
        return (f"{result['policy']}: no rate passes ({result['stopped']}; stopped at {hi:.3g} req/s): "
                f"{misses['num_misses']} of {misses['num_requests']} requests miss the SLO at any load, so at most "
                f"{100 * misses['max_attainment']:.1f} % can meet it:{reasons}")
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
    keys = ("policy", "capacity_rps", "lowest_failing_rps", "bracketed", "stopped", "load_independent_misses")
    return {**{k: result[k] for k in keys if k in result}, "steps": steps}


def _steps(result: dict, width: int) -> str:
    """One configuration's block of probe lines, printed when its search is done (in configuration order)."""
    lines = [f"{result['policy']}:", f"{' ' * 11}{rate_row_header(True, width)}"]
    for i, p in enumerate(result["probes"], 1):
        row = rate_row(result["policy"], p["rate"], p["summary"], True, format_time, width)
        lines.append(f"  step {i:>2}: {row}  {'pass' if p['pass'] else 'FAIL'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Search every configuration (in parallel, each one's probes in order); print the steps and answers."""
    if not args.slo:
        raise ValueError("capacity needs --slo, e.g. --slo ttft=1,tpot=0.2")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment {args.attainment} must be in (0, 1]")
    combos = parse_params(args.param)
    specs = [parse_run_spec(s, combo) for combo in combos for s in split_specs(args.policies)]
    # the workers start (and read the trace) while this process reads it
    executor, study = start_executor(args, "capacity", len(specs))
    ctx = None
    try:
        workloads = RateWorkloads(args, "capacity")
        ctx = prepare(args, "capacity")
        for spec in specs:
            run_config(ctx, spec)  # a bad value fails now, not after the other searches
        register(study, ctx, rates=workloads)
        out = out_dir(args, "capacity")
        start = args.rate or 1.0
        slo_text = ", ".join(f"{k} <= {format_time(v)}" for k, v in ctx.slo.items())
        emit(args, ctx.header() + "\nworkload: " + workloads.describe(start))
        emit(args, f"SLO: {slo_text}; a rate passes when >= {100 * args.attainment:g} % of requests meet it\n")
        width = max(len("policy"), *(len(spec.label) for spec in specs))
        # each task writes its best run's CSVs where the workers share this machine's files (by full path:
        # a Ray worker runs in another folder)
        runs_dir = Path(os.path.abspath(out)) / RUNS_DIR if executor.shares_files else None
        tasks = [Task(spec.label, (study, spec, start, str(runs_dir / str(i)) if runs_dir else None))
                 for i, spec in enumerate(specs)]
        shown = 0
        done: dict[int, object] = {}

        def show(index, outcome) -> None:  # blocks in configuration order, each as soon as it and those before are in
            nonlocal shown
            done[index] = outcome
            while shown in done:
                o = done.pop(shown)
                emit(args, _steps(o.value, width) if o.ok else f"{o.label}: FAILED ({o.error})")
                shown += 1

        outcomes = run_study(args, executor, capacity_point, tasks, out, _capacity_entry, "capacity", show,
                             bar=ctx.llama is None)
        done_tasks = [(o.value, t.args[3]) for o, t in zip(outcomes, tasks, strict=True) if o.ok]
        results = [value for value, _ in done_tasks]
        status = report_failures(args, "capacity", outcomes)
        if not results:
            return status
        run_files = _place_runs(out, [(r["best"], d) for r, d in done_tasks if r["best"] is not None], runs_dir)
        return _finish(ctx, out, results, workloads, start, run_files) or status
    finally:
        executor.close()
        if ctx is not None:
            close(ctx)


def _place_runs(out: Path, bests: list[tuple[dict, str | None]], runs_dir: Path | None) -> dict[str, Path] | None:
    """Move each task's best-run CSVs from its folder into out under the run's unique stem; None: none written."""
    if runs_dir is None:
        return None
    paths: dict[str, Path] = {}
    for (best, run_dir), stem in zip(bests, unique_stems([best_name(b) for b, _ in bests]), strict=True):
        for kind in ("requests", "steps"):
            name = f"{kind}_{stem}.csv"
            os.replace(Path(run_dir) / f"{kind}_{safe_name(best_name(best))}.csv", out / name)
            paths[name] = out / name
    shutil.rmtree(runs_dir, ignore_errors=True)
    return paths


def _finish(ctx, out, results: list[dict], workloads: RateWorkloads, start: float,
            run_files: dict[str, Path] | None = None) -> int:
    """Answers, the table at capacity, capacity.json and the probe plot (run_files: the CSVs tasks wrote)."""
    args = ctx.args
    answers = "\n".join("  " + _answer(r) for r in results)
    best_runs = [r["best"] for r in results if r["best"] is not None]
    summaries = [p["summary"] for p in best_runs]
    names = [best_name(p) for p in best_runs]
    runs = None
    if run_files is None:  # the runs came back whole: written here
        runs = [p["run"] for p in best_runs]
        for run_, name in zip(runs, names, strict=True):
            run_.policy = name
    table = format_table(summaries, columns=names) if summaries else "(no passing run)"
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
                  extra_files={"capacity.json": capacity}, run_files=run_files)
