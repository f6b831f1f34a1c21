"""Compare several strategies on the same workload in one side-by-side table.

Default policies: static, continuous, chunked and continuous+noprefix
("continuous (no prefix sharing)": the same policy with shared-prefix KV reuse
turned off for that run). With no flags it replays the bundled default workload
(the Azure conversation slice, scaled for the 2-CPU gemma-3-270m cost model) in
the simulator. With --backend llama every strategy runs on real llama.cpp in
real time, and after each measured run the simulator replays the same workload
and config on the cost model; its predictions appear as "<policy> (sim)" columns.
The table's ratio columns compare against the (measured) static run when present.

With --backend llama and a calibrated profile, a short real-time speed probe runs
before the first strategy and after each one (--probe-requests requests drawn
from the workload, continuous, at 0.7x the capacity the profile predicts, as
`tokenstep validate` does around each load); each prediction uses the mean run
factors of the two probes around its run, so it prices steps at the machine's
speed of the moment, and a table of the simulator's relative errors follows.
"""

from __future__ import annotations

import argparse
import dataclasses

from calib.judge import rel_errors
from calib.speed import bracket_factors
from sim.cli_common import (
    UsageError,
    add_backend_args,
    add_output_args,
    add_scheduler_args,
    add_workload_args,
    build_workload,
    nonnegative_int,
    workload_kind,
)
from sim.cli_output import baseline_index, finish, log, out_dir, resolved_config
from sim.cli_runs import RunSpec, close, execute, parse_run_specs, prepare
from sim.executor import Task, add_executor_arg
from sim.report import format_table, safe_name
from sim.study import Study, context, register, report_failures, run_study, start_executor

DEFAULT_POLICIES = "static,continuous,chunked,continuous+noprefix"
# the main job on real compute: what 2 CPU cores serve in a few minutes
LLAMA_DEFAULT_POLICIES = "static,continuous,continuous+noprefix"
LLAMA_DEFAULT_LIMIT = 60
LLAMA_DEFAULT_TIME_SCALE = 0.4  # about 3.3 req/s: near what 2 cores serve with these lengths (saturation)
# requests of each speed probe (before the first strategy and after each one): about 9 s each here; the
# predictions' mean absolute error on the main job, 13.0 % and 9.9 % at the profile's own factors, was 5.2 % and
# 5.3 % with them (calib/experiments/compare_probe.py, docs/BENCHMARKS.md)
LLAMA_PROBE_REQUESTS = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """compare's flags."""
    parser.add_argument("--policies", "--policy", default=DEFAULT_POLICIES, metavar="A,B,...",
                        help=f"strategies to compare (default {DEFAULT_POLICIES}; with --backend llama: "
                             f"{LLAMA_DEFAULT_POLICIES} on the first {LLAMA_DEFAULT_LIMIT} requests at time scale "
                             f"{LLAMA_DEFAULT_TIME_SCALE})")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_backend_args(parser)
    parser.add_argument("--probe-requests", type=nonnegative_int, default=None, metavar="N",
                        help="--backend llama: requests, drawn from the workload, of the real-time speed probes run "
                             f"before the first strategy and after each one (default {LLAMA_PROBE_REQUESTS}; 0: none, "
                             "the predictions use the profile's own run factors)")
    add_output_args(parser)
    add_executor_arg(parser)


def run(args: argparse.Namespace) -> int:
    """Run every strategy on one workload; print and write the comparison."""
    if args.backend == "llama":
        if args.policies == DEFAULT_POLICIES:
            args.policies = LLAMA_DEFAULT_POLICIES
        if workload_kind(args) == "default" and args.limit is None:
            args.limit = LLAMA_DEFAULT_LIMIT
        if workload_kind(args) == "default" and args.time_scale is None:
            args.time_scale = LLAMA_DEFAULT_TIME_SCALE
    elif args.probe_requests is not None:
        raise UsageError("--probe-requests applies to --backend llama (it times the real backend)")
    specs = parse_run_specs(args.policies)
    # simulator only: the strategies are tasks on --executor, whose workers start while the workload is built
    executor, study = start_executor(args, "compare", len(specs), build="workload")
    ctx = None
    try:
        workload = build_workload(args)
        ctx = prepare(args, "compare")
        out = out_dir(args, "compare")
        log(args, f"compare: {len(specs)} strategies on {len(workload.requests)} requests, backend {ctx.backend}")
        if ctx.llama is None:
            status, specs, measured, probes = _simulate_all(ctx, executor, study, specs, workload, out)
            if not measured:
                return status
        else:
            status = 0
            probes = [_speed_probe(ctx, workload)]
            measured = []
            for spec in specs:
                log(args, f"running {spec.label} ...")
                measured.append(execute(ctx, spec, workload))
                probes.append(_speed_probe(ctx, workload))
        runs, summaries = [], []
        for i, (spec, (run_, summary)) in enumerate(zip(specs, measured, strict=True)):
            runs.append(run_)
            summaries.append(summary)
            if ctx.llama is None:
                continue
            # each prediction at the speed read just before and just after its own run: on this shared host
            # the speed moves by several percent within a minute
            speed, model = bracket_factors(ctx.cost, probes[i], probes[i + 1], "this strategy's run")
            sim_run, sim_summary = execute(dataclasses.replace(ctx, cost=model), spec, workload, simulate=True,
                                           label=f"{spec.label} (sim)")
            sim_summary["rel_error"] = rel_errors(summary, sim_summary)
            if hasattr(model, "run_factor"):
                sim_summary["run_factors"] = {"decode": model.run_factor, "prompt": model.factor(True),
                                              "decode_by_batch": [list(k) for k in model.decode_batch_factors],
                                              "from": "speed probes" if speed else "profile"}
            sim_summary["speed_probe"] = speed
            runs.append(sim_run)
            summaries.append(sim_summary)
        base = baseline_index(summaries)
        table = format_table(summaries, title="", baseline=base)
        report = ctx.header(workload) + "\n\n" + table
        if ctx.llama is not None:
            report += "\n\n" + prediction_report(summaries, probes, ctx.cost)
        measured_runs = [r for r in runs if not r.policy.endswith("(sim)")]
        plot_jobs = _plot_jobs(runs, measured_runs)
        extra = {"runs": [s["policy"] for s in summaries]}
        if ctx.llama is not None:
            extra["speed_probes"] = probes
        config = resolved_config(ctx, workload, extra)
        return finish(ctx, out, runs, summaries, config, report, plot_jobs,
                      extra_json={"speed_probes": probes} if ctx.llama is not None else None) or status
    finally:
        executor.close()
        if ctx is not None:
            close(ctx)


def compare_run(study: Study, spec: RunSpec) -> tuple:
    """One task: this strategy on the study's workload (run, summary)."""
    sc = context(study)
    return execute(sc.ctx, spec, sc.workload)


def _simulate_all(ctx, executor, study, specs, workload, out) -> tuple[int, list, list, list]:
    """Every strategy in the simulator on the executor: (exit status, the specs that ran, their (run, summary),
    speed probes: none)."""
    args = ctx.args
    register(study, ctx, workload=workload)
    tasks = [Task(spec.label, (study, spec)) for spec in specs]
    outcomes = run_study(args, executor, compare_run, tasks, out, lambda value: value[1], "compare")
    status = report_failures(args, "compare", outcomes)
    ran = [spec for spec, o in zip(specs, outcomes, strict=True) if o.ok]
    return status, ran, [o.value for o in outcomes if o.ok], [None] * (len(ran) + 1)


def _speed_probe(ctx, workload) -> dict | None:
    """calib.probes.speed_probe on the real instances (None: no llama, no table profile, or --probe-requests
    0). The instances' KV is cleared after it; the runs take fresh backends anyway."""
    from calib.probes import speed_probe

    args = ctx.args
    if ctx.llama is None:
        return None
    n = LLAMA_PROBE_REQUESTS if args.probe_requests is None else args.probe_requests
    probe, _noise = speed_probe(ctx.llama.fresh_backends(), ctx.cost, ctx.config, args.seed,
                                lambda text: log(args, f"compare: {text}"), n, workload, "continuous")
    return probe


# p90s, not p99s: of the main job's 60 requests a p99 is the slowest one (--json has every statistic)
ERROR_COLUMNS = [("TTFT mean", "ttft_s", "mean"), ("TTFT p90", "ttft_s", "p90"), ("TPOT mean", "tpot_s", "mean"),
                 ("TPOT p90", "tpot_s", "p90"), ("E2E mean", "e2e_s", "mean"), ("E2E p90", "e2e_s", "p90"),
                 ("throughput", "throughput_rps", None)]


def prediction_report(summaries: list[dict], probes: list[dict | None], profile) -> str:
    """How the predictions were priced, and each one's relative error against its measured run."""
    rows = [s for s in summaries if "rel_error" in s]
    if any(p is None for p in probes):
        how = (f"at the profile's own run factors (x{profile.run_factor:.3f} decode-only steps, "
               f"x{profile.factor(True):.3f} steps with prompt tokens): no speed probe ran"
               if hasattr(profile, "run_factor") else "with the cost model as it is: no speed probe ran")
    else:
        how = (f"at the machine's speed: real-time probes ({probes[0]['requests']} requests drawn from the workload, "
               f"continuous) ran before the first strategy and after each one, and each prediction takes the mean run "
               f"factors of the probes around its run, decode-only steps by their batch size from both probes' "
               f"steps (the profile's own: x{profile.run_factor:.3f} decode-only "
               f"steps, x{profile.factor(True):.3f} steps with prompt tokens; the probes read "
               + ", ".join(f"x{p['run_factor']:.3f}/x{p['prefill_run_factor']:.3f}" for p in probes) + ")")
    columns = ERROR_COLUMNS + ([("decode x", None, None), ("prompt x", None, None)]
                               if all("run_factors" in s for s in rows) else [])
    width = max(len(s["policy"]) for s in rows)
    lines = [f"simulator's error, (predicted - measured) / measured; predictions priced {how}",
             f"{'prediction':<{width}} | " + " | ".join(f"{name:>10}" for name, *_ in columns),
             "-" * (width + 1) + "+" + "+".join("-" * 12 for _ in columns)]
    for s in rows:
        cells = []
        for name, key, stat in columns:
            if key is None:
                cells.append(f"{s['run_factors']['decode' if name.startswith('decode') else 'prompt']:>10.3f}")
                continue
            v = s["rel_error"][key] if stat is None else s["rel_error"][key][stat]
            cells.append(f"{'n/a' if v is None else f'{v * 100:+.1f} %':>10}")
        lines.append(f"{s['policy']:<{width}} | " + " | ".join(cells))
    lines.append("one run per strategy: near saturation its TTFT and tails turn on which step each prompt lands in; "
                 "`tokenstep validate` repeats loads from light to saturated and judges each error against the "
                 "repeats' spread")
    return "\n".join(lines)


def _plot_jobs(runs, measured):
    from sim.plots import plot_compare_timelines, plot_latency_cdfs, plot_timeline

    jobs = [("latency_cdfs.png", lambda p: plot_latency_cdfs(runs, p)),
            ("timelines.png", lambda p: plot_compare_timelines(measured, p))]
    for r in runs:
        jobs.append((f"timeline_{safe_name(r.policy)}.png", lambda p, r=r: plot_timeline(r, p)))
    return jobs
