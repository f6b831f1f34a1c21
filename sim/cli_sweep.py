"""Sweep arrival rates x policies (x parameter values) and plot throughput-latency curves.

Every point of --rates R1,R2,... x --policies A,B,... x each --param key=v1,v2
is one run. A --param key is a SchedulerConfig field (max_num_seqs,
max_num_batched_tokens, num_kv_blocks, ...) or a policy parameter (batch_size,
wait_s, ...); several --param flags form a grid. Without --trace the workload is
synthetic, regenerated at each rate with the same seed; with --trace the trace
is time-scaled to each rate. Writes rate_curves.png (plot_rate_curves).
"""

from __future__ import annotations

import argparse
import itertools
import os

from sim.cli_common import add_backend_args, add_output_args, add_scheduler_args, add_workload_args, float_list
from sim.cli_output import finish, log, out_dir, resolved_config
from sim.cli_rates import RateWorkloads, rate_row, rate_row_header
from sim.cli_runs import RunSpec, close, execute, parse_run_spec, prepare, run_config, split_specs
from sim.executor import Task, add_executor_arg
from sim.report import format_time, unique_stems, write_run_files
from sim.study import Study, context, register, report_failures, run_study, start_executor

DEFAULT_RATES = "0.5,1,1.5,2,2.5,3"
DEFAULT_POLICIES = "static,continuous,chunked"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """sweep's flags."""
    parser.add_argument("--rates", type=float_list, default=float_list(DEFAULT_RATES), metavar="R1,R2,...",
                        help=f"arrival rates in req/s (default {DEFAULT_RATES})")
    parser.add_argument("--policies", "--policy", default=DEFAULT_POLICIES, metavar="A,B,...",
                        help=f"strategies (default {DEFAULT_POLICIES})")
    parser.add_argument("--param", action="append", metavar="KEY=V1,V2",
                        help="also sweep a policy or scheduler parameter (repeatable: a grid)")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    add_output_args(parser)
    add_executor_arg(parser)


def parse_params(items: list[str] | None) -> list[dict[str, str]]:
    """--param key=v1,v2 flags -> every combination as {key: value} (one empty dict without flags)."""
    axes: dict[str, list[str]] = {}
    for item in items or []:
        key, eq, values = str(item).partition("=")
        key = key.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key or not vals:
            raise ValueError(f"--param {item!r} must look like key=v1,v2 (e.g. max_num_seqs=4,8,16)")
        if key in axes:
            raise ValueError(f"--param {key} is given twice; list all its values in one flag")
        axes[key] = vals
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def point_name(spec: RunSpec, rate: float) -> str:
    """A sweep point's run name (its files are requests_/steps_<safe name>.csv)."""
    return f"{spec.label} @ {rate:g}"


def sweep_point(study: Study, spec: RunSpec, rate: float, dest: tuple[str, str] | None = None) -> tuple:
    """One task: this spec at this rate, in whatever process the executor chose: (run, summary).

    dest=(out folder, stem): the task writes its run's CSVs there itself and returns (None, summary),
    so only the summary travels back and the parent's serial part stays small.
    """
    sc = context(study)
    real = sc.ctx.llama is not None  # real runs are long: a bar per run instead of one over the grid
    run_, summary = execute(sc.ctx, spec, sc.rates.at(rate), extra={"rate": rate}, progress=real)
    run_.policy = point_name(spec, rate)
    if dest is None:
        return run_, summary
    write_run_files(dest[0], run_, dest[1])
    return None, summary


def run(args: argparse.Namespace) -> int:
    """Run the grid, print one line per point, write results and the rate curves."""
    combos = parse_params(args.param)
    specs = [parse_run_spec(s, combo) for combo in combos for s in split_specs(args.policies)]
    if args.rate is not None:
        log(args, f"sweep: --rate {args.rate:g} ignored; the rates come from --rates")
    rates = sorted(args.rates)
    # the workers start (and read the trace) while this process reads it
    executor, study = start_executor(args, "sweep", len(rates) * len(specs))
    ctx = None
    try:
        workloads = RateWorkloads(args, "sweep")
        ctx = prepare(args, "sweep")
        for spec in specs:
            run_config(ctx, spec)  # a bad swept value fails now, not halfway through the grid
        register(study, ctx, rates=workloads)
        out = out_dir(args, "sweep")
        grid = [(spec, rate) for rate in rates for spec in specs]
        # each task writes its own run's CSVs where the workers see this machine's files
        stems = unique_stems([point_name(spec, rate) for spec, rate in grid]) if executor.shares_files else None
        tasks = [Task(f"{spec.label} @ {rate:g} req/s",
                      (study, spec, rate, (os.path.abspath(out), stems[i]) if stems else None))
                 for i, (spec, rate) in enumerate(grid)]
        log(args, f"sweep: {len(specs)} strategies x {len(rates)} rates = {len(tasks)} runs, backend {ctx.backend}")
        outcomes = run_study(args, executor, sweep_point, tasks, out, lambda value: value[1], "sweep",
                             bar=ctx.llama is None)
        runs, summaries, points, lines, run_files = [], [], [], [], {}
        slo = ctx.slo is not None
        width = max(len("policy"), *(len(spec.label) for spec in specs))
        for outcome, task in zip(outcomes, tasks, strict=True):
            if not outcome.ok:
                continue
            spec, rate, dest = task.args[1:]
            run_, summary = outcome.value
            runs.append(run_)
            if dest is not None:
                names = (f"{kind}_{dest[1]}.csv" for kind in ("requests", "steps"))
                run_files.update({name: out / name for name in names})
            summaries.append(summary)
            points.append({"policy": spec.label, "rate": rate, "summary": summary})
            lines.append(rate_row(spec.label, rate, summary, slo, format_time, width))
        status = report_failures(args, "sweep", outcomes)
        if not summaries:
            return status
        rank = {spec.label: i for i, spec in enumerate(specs)}
        order = sorted(range(len(points)), key=lambda i: (rank[points[i]["policy"]], points[i]["rate"]))
        table = "\n".join([rate_row_header(slo, width), *(lines[i] for i in order)])
        header = ctx.header() + "\nworkload: " + workloads.describe(rates[0])
        report = f"{header}\n\n{table}\nrate = offered arrival rate, served = finished requests / run duration (req/s)"
        config = resolved_config(ctx, None, {"workload": workloads.config(rates[0]), "rates": rates,
                                             "runs": [s.label for s in specs], "params": combos})
        from sim.plots import plot_rate_curves

        jobs = [("rate_curves.png", lambda p: plot_rate_curves(points, p))]
        written = stems is not None
        return finish(ctx, out, None if written else runs, summaries, config, report, jobs,
                      run_files=run_files) or status
    finally:
        executor.close()
        if ctx is not None:
            close(ctx)
