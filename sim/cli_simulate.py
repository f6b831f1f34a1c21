"""Run one configuration (one policy on one workload) and report it.

The workload is a trace (--trace), a synthetic one (any of --arrival, --rate,
--num-requests, --prompt-len, --output-len) or the bundled default workload.
Writes summary.json/CSVs and, unless --no-plots, a timeline and latency CDFs.
"""

from __future__ import annotations

import argparse

from sim.cli_common import add_backend_args, add_output_args, add_scheduler_args, add_workload_args, build_workload
from sim.cli_output import finish, log, out_dir, resolved_config, start_plots
from sim.cli_runs import close, execute, parse_run_specs, prepare
from sim.report import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """simulate's flags."""
    parser.add_argument("--policy", default="continuous", metavar="SPEC",
                        help="policy spec, e.g. static:batch_size=8 or continuous+noprefix (default continuous)")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Run the one configuration and write its results."""
    specs = parse_run_specs(args.policy)
    if len(specs) != 1:
        raise ValueError(f"simulate runs one policy; got {len(specs)} in {args.policy!r} (use compare)")
    spec = specs[0]
    workload = build_workload(args)
    ctx = prepare(args, "simulate")
    try:
        out = out_dir(args, "simulate")
        log(args, f"simulate: {spec.label} on {len(workload.requests)} requests, backend {ctx.backend} ...")
        plots = None

        def draw(run_) -> None:  # the plots are drawn (in a child process) while the run is summarized and written
            nonlocal plots
            from sim.plots import plot_latency_cdfs, plot_timeline

            plots = start_plots(args, out, [("timeline.png", lambda p: plot_timeline(run_, p)),
                                            ("latency_cdfs.png", lambda p: plot_latency_cdfs([run_], p))])

        try:
            run_, summary = execute(ctx, spec, workload, on_run=draw)
            report = ctx.header(workload) + "\n\n" + format_table([summary])
            config = resolved_config(ctx, workload, {"policy": spec.label})
        except BaseException:
            if plots is not None:
                plots.cancel()
            raise
        return finish(ctx, out, [run_], [summary], config, report, plots=plots)
    finally:
        close(ctx)
