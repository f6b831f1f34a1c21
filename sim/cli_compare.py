"""Compare several strategies on the same workload in one side-by-side table.

Default policies: static, continuous, chunked and continuous+noprefix
("continuous (no prefix sharing)": the same policy with shared-prefix KV reuse
turned off for that run). With no flags it replays the bundled default workload
(the Azure conversation slice, scaled for the 2-CPU gemma-3-270m cost model) in
the simulator. With --backend llama every strategy runs on real llama.cpp in
real time, and after each measured run the simulator replays the same workload
and config on the cost model; its predictions appear as "<policy> (sim)" columns.
The table's ratio columns compare against the (measured) static run when present.
"""

from __future__ import annotations

import argparse

from sim.cli_common import (
    add_backend_args,
    add_output_args,
    add_scheduler_args,
    add_workload_args,
    build_workload,
    workload_kind,
)
from sim.cli_output import baseline_index, finish, log, out_dir, resolved_config
from sim.cli_runs import close, execute, parse_run_specs, prepare
from sim.report import format_table, safe_name

DEFAULT_POLICIES = "static,continuous,chunked,continuous+noprefix"
# the main job on real compute: what 2 CPU cores serve in a few minutes
LLAMA_DEFAULT_POLICIES = "static,continuous,continuous+noprefix"
LLAMA_DEFAULT_LIMIT = 60
LLAMA_DEFAULT_TIME_SCALE = 0.4  # about 3.3 req/s: near what 2 cores serve with these lengths (saturation)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """compare's flags."""
    parser.add_argument("--policies", "--policy", default=DEFAULT_POLICIES, metavar="A,B,...",
                        help=f"strategies to compare (default {DEFAULT_POLICIES}; with --backend llama: "
                             f"{LLAMA_DEFAULT_POLICIES} on the first {LLAMA_DEFAULT_LIMIT} requests at time scale "
                             f"{LLAMA_DEFAULT_TIME_SCALE})")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Run every strategy on one workload; print and write the comparison."""
    if args.backend == "llama":
        if args.policies == DEFAULT_POLICIES:
            args.policies = LLAMA_DEFAULT_POLICIES
        if workload_kind(args) == "default" and args.limit is None:
            args.limit = LLAMA_DEFAULT_LIMIT
        if workload_kind(args) == "default" and args.time_scale is None:
            args.time_scale = LLAMA_DEFAULT_TIME_SCALE
    specs = parse_run_specs(args.policies)
    workload = build_workload(args)
    ctx = prepare(args, "compare")
    try:
        out = out_dir(args, "compare")
        log(args, f"compare: {len(specs)} strategies on {len(workload.requests)} requests, backend {ctx.backend}")
        runs, summaries = [], []
        for spec in specs:
            log(args, f"running {spec.label} ...")
            run_, summary = execute(ctx, spec, workload)
            runs.append(run_)
            summaries.append(summary)
            if ctx.llama is not None:
                run_, summary = execute(ctx, spec, workload, simulate=True, label=f"{spec.label} (sim)")
                runs.append(run_)
                summaries.append(summary)
        base = baseline_index(summaries)
        table = format_table(summaries, title="", baseline=base)
        report = ctx.header(workload) + "\n\n" + table
        measured = [r for r in runs if not r.policy.endswith("(sim)")]
        plot_jobs = _plot_jobs(runs, measured)
        config = resolved_config(ctx, workload, {"runs": [s["policy"] for s in summaries]})
        return finish(ctx, out, runs, summaries, config, report, plot_jobs)
    finally:
        close(ctx)


def _plot_jobs(runs, measured):
    from sim.plots import plot_compare_timelines, plot_latency_cdfs, plot_timeline

    jobs = [("latency_cdfs.png", lambda p: plot_latency_cdfs(runs, p)),
            ("timelines.png", lambda p: plot_compare_timelines(measured, p))]
    for r in runs:
        jobs.append((f"timeline_{safe_name(r.policy)}.png", lambda p, r=r: plot_timeline(r, p)))
    return jobs
