"""Run one workload on the real backend and in the simulator with a calibrated profile; compare them.

Both sides get the same workload, seed, policy and SchedulerConfig (the real context's
capacity, with the scheduler flags on top). The measured side runs the real backend in
SimPy real time; the predicted side runs SyntheticBackend(profile) in virtual time. At each
load (--rates, default 0.3x, 0.7x and 1.2x of the capacity the profile predicts for the
workload) arrivals are re-timed as a Poisson process at that rate with --seed, keeping
the workload's lengths. Default workload: the bundled default trace slice at length
scale 0.1 with its 32-token shared prefixes, all 200 requests (about 10 minutes here).
Around each load, 30 s real-time probes (64 requests drawn from the workload, at 0.7x
capacity) just before and just after it refit a table profile's two run factors to the
machine's speed during the load (the mean of the two), each with a 13 s wake-up probe
(prefills after idle waits of 0.1-2.5 s) that prices a step after idle by its wait. The
prediction is the median of 20 simulated runs with step noise drawn from the probes' steps.

Prints measured vs predicted TTFT, TPOT, E2E (mean, p50, p90, p99) and throughput with
(predicted - measured) / measured, against the targets (means and throughput within 5%,
p90/p99 within 10%), and the real run's steps priced by the profile per step kind. Writes
per-load folders (summary, requests_measured.csv, requests_predicted.csv, steps CSVs,
latency_cdfs.png) and validation.json. A profile calibrated on another model file or
llama-cpp-python version is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backends.cost.table import describe_batch_factors
from backends.cost.wakeup import describe_wakeup
from calib.validate import (
    ENSEMBLE_RUNS,
    NOISE_RUNS,
    STATS,
    TARGET_PCT,
    bracket_factors,
    merge_noise,
    misses,
    misses_within,
)
from sim.cli_common import (
    DEFAULT_COST_MODELS,
    UsageError,
    add_scheduler_args,
    add_workload_args,
    build_config,
    build_workload,
    default_profile,
    float_list,
    nonnegative_int,
    workload_kind,
)
from sim.cli_output import out_dir
from sim.executor import add_executor_arg, make_executor
from sim.report import _plain as plain

DEFAULT_LIMIT = 200  # the whole bundled slice: a p99 of fewer requests is one or two requests
PROBE_REQUESTS = 64  # requests of each speed probe, drawn from the validated workload (about 30 s here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """validate's flags."""
    parser.add_argument("--profile", metavar="NAME|FILE",
                        help=f"calibrated profile (default: the bundled {DEFAULT_COST_MODELS[0]}, or its -xN "
                             "variant with --instances N)")
    parser.add_argument("--model", metavar="NAME|PATH", help="GGUF model of the real run (default gemma3-270m)")
    parser.add_argument("--policy", default="continuous", metavar="SPEC", help="policy spec (default continuous)")
    parser.add_argument("--rates", type=float_list, metavar="R1,R2,...",
                        help="arrival rates, req/s (default: 0.3x, 0.7x, 1.2x of the profile's estimated capacity)")
    parser.add_argument("--force", action="store_true", help="compare even with a profile of another model or build")
    parser.add_argument("--probe-requests", type=nonnegative_int, default=None, metavar="N",
                        help="requests, drawn from the workload, of the real-time probe runs before and after each "
                             "load whose mean refits a table profile's run factors to the machine's speed during it "
                             f"(default {PROBE_REQUESTS}; 0: use the profile's factors as they are)")
    parser.add_argument("--no-wakeup-probe", dest="wakeup_probe", action="store_false",
                        help="skip the wake-up probe run with each speed probe (prefills after idle waits of "
                             "0.1-2.5 s, about 13 s), and price a step after idle at the profile's wake-up (its "
                             "curve, or its flat price when it has none)")
    parser.add_argument("--ensemble-runs", type=nonnegative_int, default=ENSEMBLE_RUNS, metavar="N",
                        help="simulated runs, each with every step's price scattered as the speed probes' steps "
                             "scattered around theirs, whose median is the prediction "
                             f"(default {ENSEMBLE_RUNS}; 0, or no probes: one noiseless run)")
    parser.add_argument("--noise-runs", type=nonnegative_int, default=NOISE_RUNS, metavar="N",
                        help="reruns of each prediction with every step's price scattered as much as the real "
                             "run's steps scattered around theirs, for the step-noise column "
                             f"(default {NOISE_RUNS}; 0: none)")
    add_workload_args(parser)
    add_scheduler_args(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="result folder (default results/validate-<timestamp>)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress or log lines on stderr")
    add_executor_arg(parser)


def _log(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _profile(args: argparse.Namespace):
    from backends.cost import load_cost_model

    if args.profile:
        return load_cost_model(args.profile), str(args.profile)
    name, _note = default_profile(args.instances)
    return load_cost_model(name), name


def _llama_options(profile) -> dict:
    """The context the profile was calibrated on (threads, n_ctx, slots, batch sizes, KV layout)."""
    from sim.real import DEFAULT_LLAMA_OPTIONS

    ctx = (getattr(profile, "meta", {}) or {}).get("context") or {}
    opts = dict(DEFAULT_LLAMA_OPTIONS)
    for key in ("n_threads", "n_ctx", "n_seq_max", "n_batch", "n_ubatch", "kv_unified", "swa_full", "n_gpu_layers"):
        if key in ctx:
            opts[key] = ctx[key]
    return opts


def _check_limits(config, real) -> None:
    for name, have in (("max_num_seqs", real.max_num_seqs), ("max_model_len", real.max_model_len),
                       ("num_kv_blocks", real.num_kv_blocks * real.block_size // config.block_size)):
        if getattr(config, name) > have:
            raise UsageError(f"{name}={getattr(config, name)} exceeds the real context's {have}; the real run "
                             "cannot hold it")


def _workload(args: argparse.Namespace):
    if workload_kind(args) != "synthetic" and args.limit is None:
        args.limit = DEFAULT_LIMIT
    if args.time_scale is not None:
        _log(args, "validate: --time-scale ignored; --rates decide the arrival times")
    return build_workload(args, with_time_scale=False)


def run(args: argparse.Namespace) -> int:
    """Validate the profile at each load; write the results; print the tables or one JSON object."""
    from calib.validate import (
        RATE_FACTORS,
        build_info,
        check_instances,
        check_profile,
        compare_load,
        estimate_capacity,
        machine_info,
        measure_load,
        model_fingerprint,
    )
    from scheduler import make_policy
    from sim.progress import Progress, progress_enabled
    from sim.real import close_instances, make_llama_instances

    profile, profile_name = _profile(args)
    policy = make_policy(args.policy).describe()  # a bad spec fails before the model loads
    workload = _workload(args)
    warnings = check_instances(profile, profile_name, args.instances, force=args.force)
    executor = make_executor(args.executor, args.seed)  # the simulated reruns; real runs stay in this process
    backends, real = make_llama_instances(args.model, args.instances, _llama_options(profile))
    try:
        warnings += check_profile(profile, profile_name, model_fingerprint(backends[0].model), build_info(),
                                  machine_info(), force=args.force)
        for w in warnings:
            _log(args, f"validate: warning: {w}")
        config = build_config(args, base=real)
        _check_limits(config, real)
        if args.rates:
            rates, labels = list(args.rates), ["given"] * len(args.rates)
        else:
            cap = estimate_capacity(profile, workload, args.policy, config, args.instances, args.router)
            rates, labels = [f * cap for f in RATE_FACTORS], [f"{f:g}x est. capacity {cap:.3g} req/s"
                                                              for f in RATE_FACTORS]
        for b in backends:
            _warm_up(b, config)
        out = out_dir(args, "validate")
        _log(args, f"validate: profile {profile_name}; {len(workload.requests)} requests; policy {policy}; "
                   + (f"{args.instances} instances ({backends[0].n_threads} thread(s) each, stepping "
                      f"at the same time), router {args.router}; " if args.instances > 1 else "")
                   + f"rates {', '.join(f'{r:.3g}' for r in rates)} req/s; results in {out}/")
        loads = []
        probe, noise = _speed_probe(args, backends, config, profile, workload)
        for i, (rate, label) in enumerate(zip(rates, labels, strict=True)):
            with Progress(f"validate {rate:.3g} req/s (real time)", enabled=progress_enabled(args.quiet)) as bar:
                measured = measure_load(backends, workload, rate, args.policy, config, args.seed, args.router, bar)
            after, noise_after = _speed_probe(args, backends, config, profile, workload)
            speed, load_profile = bracket_factors(profile, probe, after)
            # the prediction: the median of noisy reruns, with the step noise the probes around this load met
            load = compare_load(measured, load_profile, args.policy, config, args.seed, args.router,
                                noise_runs=args.noise_runs, ensemble_noise=merge_noise([noise, noise_after]),
                                ensemble_runs=args.ensemble_runs, executor=executor)
            load["factor_label"], load["speed_probe"], probe, noise = label, speed, after, noise_after
            _write_load(args, out / f"load{i + 1}-{rate:.3g}rps", load, profile_name, config, policy)
            loads.append(load)
            bad = misses(load["rel_error"])
            _log(args, f"validate: load {i + 1}/{len(rates)} done: "
                       + ("all targets met" if not bad else "missed " + ", ".join(bad)))
    finally:
        close_instances(backends)
        executor.close()
    c = config
    setup = (f"workload: {workload.description}; arrivals re-timed at each rate as a Poisson process "
             f"(seed {args.seed}), lengths kept\n"
             f"scheduler (both sides, from the real context): max_num_seqs={c.max_num_seqs}, "
             f"max_num_batched_tokens={c.max_num_batched_tokens}, max_model_len={c.max_model_len}, "
             f"kv={c.num_kv_blocks}x{c.block_size} tokens, prefix caching {'on' if c.enable_prefix_caching else 'off'}"
             + (f"\ninstances: {args.instances} on both sides, router {args.router}; the real ones step at the same "
                "time, each on its own thread" if args.instances > 1 else ""))
    return _finish(args, out, profile, profile_name, policy, loads, warnings, setup)


def _speed_probe(args: argparse.Namespace, backends, config, profile, workload) -> tuple[dict | None, Any]:
    """A real-time probe run that fits a table profile's two run factors to the machine's speed now, and the
    scatter of its steps around their prices (calib.validate.StepNoise); (None, None): no probe.

    This machine's speed drifts (other tenants of the host: up to 7 % within a quarter of an hour), so each
    load's run factors come from probes run just before and just after it (calib.validate.bracket_factors),
    against the profile's unchanged grid fit. A probe is --probe-requests requests drawn at random from the
    validated workload (a fixed draw, not the run itself), re-timed at 0.7x the capacity the profile predicts
    for them, under the validated policy and scheduler limits, so its mix of step shapes is the workload's.
    With several instances it runs on all of them at once (that many requests each), as the load does.
    """
    from calib.calibrate import speed_probe

    n = PROBE_REQUESTS if args.probe_requests is None else args.probe_requests
    return speed_probe(backends, profile, config, args.seed, lambda text: _log(args, f"validate: {text}"), n,
                       workload, args.policy, wakeup=args.wakeup_probe)


def _warm_up(backend, config) -> None:
    """A few untimed steps first: the first llama_decode of a context allocates its compute graph."""
    import numpy as np

    from calib.calibrate import Scenario, drive

    drive(backend, config, Scenario("warm-up", "continuous", ((0, 48, 4, 0),) * 4), "warm", np.random.default_rng(0))


def _write_load(args, folder: Path, load: dict, profile_name: str, config, policy: str) -> None:
    import dataclasses

    from sim.report import write_results

    cfg = {"command": "validate", "argv": list(getattr(args, "_argv", [])), "profile": profile_name,
           "policy": policy, "rate": load["rate"], "seed": args.seed, "scheduler": dataclasses.asdict(config),
           "workload": {"description": load["workload"].description, "source": load["workload"].source}}
    runs = [load["measured_run"], load["predicted_run"]]
    write_results(folder, runs, [load["measured"], load["predicted"]], cfg)
    (folder / "step_errors.json").write_text(json.dumps(plain(load["steps"]), indent=2) + "\n")
    if not args.no_plots:
        from sim.plots import plot_latency_cdfs

        plot_latency_cdfs(runs, folder / "latency_cdfs.png")


def _finish(args, out: Path, profile, profile_name, policy, loads, warnings, setup) -> int:
    from calib.validate import TTFT_NOTE

    meta = getattr(profile, "meta", {}) or {}
    prof = {"name": profile_name, "kind": profile.to_dict()["kind"], "describe": profile.describe(),
            "model": meta.get("model"), "llama_cpp_python": meta.get("llama_cpp_python"), "date": meta.get("date"),
            "machine": meta.get("machine")}
    doc = {"profile": prof, "ttft_timing": TTFT_NOTE, "setup": setup, "warnings": warnings, "out_dir": str(out),
           "loads": [{"rate": ld["rate"], "policy": policy, "label": ld["factor_label"], "measured": ld["measured"],
                      "predicted": ld["predicted"], "rel_error": ld["rel_error"],
                      "sampling_noise": ld.get("sampling_noise"),
                      "rel_error_interval": ld.get("rel_error_interval"), "speed_probe": ld.get("speed_probe"),
                      "price_sensitivity": ld.get("price_sensitivity"), "step_noise": ld.get("step_noise"),
                      "deterministic": ld.get("deterministic"),
                      "at_run_speed": ld.get("at_run_speed"),
                      "steps": ld["steps"],
                      "driver_overhead": ld["driver_overhead"], "cpu_load": ld["cpu_load"],
                      "parallel_instances": ld.get("parallel_instances")} for ld in loads]}
    text = "\n\n".join([f"tokenstep validate: profile {profile_name} ({prof['describe']})\n{TTFT_NOTE}\n{setup}"]
                       + [format_load(ld, policy) for ld in loads])
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(plain(doc), indent=2, allow_nan=False) + "\n")
    (out / "report.txt").write_text(text + "\n")
    if not args.no_plots and loads:
        from calib.validate import relabel
        from sim.plots import plot_latency_cdfs

        runs = [relabel(ld[k], f"{k.split('_')[0]} {ld['rate']:.3g} req/s") for ld in loads
                for k in ("measured_run", "predicted_run")]
        plot_latency_cdfs(runs, out / "latency_cdfs.png")
    if args.json:
        sys.stdout.write(json.dumps(plain(doc), allow_nan=False) + "\n")
    else:
        print(text + f"\n\nresults in {out}/", flush=True)
    return 0

def _fmt_time(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms" if abs(v) < 1 else f"{v:.3f} s"


def _means(rel: dict) -> str:
    """The relative errors of the three latency means and of throughput, for a diagnostic line."""
    return (", ".join(f"{label} mean {_fmt_rel(rel[k]['mean'], None)}" for k, label in
                      (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")))
            + f", throughput {_fmt_rel(rel['throughput_rps'], None)}")


def _fmt_rel(v: float | None, target: float | None) -> str:
    if v is None:
        return "-"
    mark = "" if target is None else ("  ok" if abs(v) * 100 <= target else "  MISS")
    return f"{v * 100:+.1f}%{mark}"


def _profile_wakeup(probe: dict) -> str:
    """The profile's own wake-up price, as the report names it."""
    curve = probe.get("profile_idle_wakeup_curve")
    if curve:
        return describe_wakeup(curve)
    return f"+{probe['profile_idle_wakeup_s'] * 1e3:.1f} ms whatever the wait"


def format_load(load: dict, policy: str) -> str:
    """The measured-vs-predicted table of one load, its misses and the step-kind breakdown."""
    m, p, r = load["measured"], load["predicted"], load["rel_error"]
    noise = load.get("sampling_noise") or {}
    paired = load.get("rel_error_interval") or {}

    def span(v: list | None) -> str:
        return f"{v[0] * 100:+.0f}..{v[1] * 100:+.0f}%" if v else ""

    def ci(d: dict, k: str, s: str) -> str:
        return span((d.get(k) or {}).get(s))

    sens = load.get("price_sensitivity")
    jitter = load.get("step_noise")
    # the range columns: (header, rel_error_range) of each rerun diagnostic the load has
    extra = ([(f"prices ±{sens['delta'] * 100:g}%", sens["rel_error_range"])] if sens else []) \
        + ([("step noise", jitter["rel_error_range"])] if jitter else [])

    rows = [("metric", "measured", "predicted", "rel. error", "error 95%", "sampling 95%")
            + tuple(head for head, _ in extra)]
    for k, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        for s in STATS:
            rows.append((f"{label} {s}", _fmt_time(m[k][s]), _fmt_time(p[k][s]), _fmt_rel(r[k][s], TARGET_PCT.get(s)),
                         ci(paired, k, s), ci(noise, k, s)) + tuple(ci(d, k, s) for _, d in extra))
    tp = r["throughput_rps"]
    rows.append(("throughput", f"{m['throughput_rps']:.3f} req/s" if m["throughput_rps"] else "-",
                 f"{p['throughput_rps']:.3f} req/s" if p["throughput_rps"] else "-",
                 _fmt_rel(tp, TARGET_PCT["throughput_rps"]), "", "")
                + tuple(span(d["throughput_rps"]) for _, d in extra))
    rows.append(("finished", str(m["num_finished"]), str(p["num_finished"]), "", "", "") + ("",) * len(extra))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"load: {load['rate']:.3g} req/s ({load.get('factor_label', 'given')}), policy {policy}, "
             f"{m['num_requests']} requests"]
    for i, row in enumerate(rows):
        lines.append(" | ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                                          strict=True)]))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    bad = misses(r)
    lines.append("targets (means and throughput within 5%, p90/p99 within 10%): "
                 + ("all met" if not bad else "missed " + ", ".join(bad)))
    det = load.get("deterministic")
    if det:
        ens = det["ensemble"]
        missed = misses(det["rel_error"])
        lines.append(f"predicted: the median of {ens['runs']} simulated runs, each with every step's price times noise "
                     f"of mean 1 drawn from the speed probes' own steps (each step's own, sigma "
                     f"{ens['sigma'] * 100:.1f}%, times a drift shared by each second, sigma "
                     f"{ens['slow_sigma'] * 100:.1f}%); CSVs and plots show the run nearest that median (run "
                     f"{ens['medoid'] + 1}). One noiseless run instead: " + _means(det["rel_error"])
                     + (f", {len(missed)} miss{'es' if len(missed) != 1 else ''}" if missed else ", no miss"))
    else:
        lines.append("predicted: one noiseless simulated run (no speed probe, or --ensemble-runs 0)")
    if paired:
        lines.append("error 95%: paired bootstrap interval of the relative error (the same resampled requests on both "
                     "sides): how much of the error a few requests carry")
    if noise:
        lines.append("sampling 95%: bootstrap interval of the measured statistic over its requests (how far another "
                     "draw of as many requests could move it)")
    if sens:
        d = f"{sens['delta'] * 100:g}%"
        lines.append(f"prices ±{d}: range of the relative error over the prediction and {sens['runs'] - 1} reruns "
                     f"with the decode-only and prompt-step prices each {d} lower or higher (a range much wider "
                     "than that: the statistic turns on step timing, not on the price level)")
    if jitter:
        inside = misses_within(r, jitter["rel_error_range"])
        drawn = ("lognormal, as this real run's steps scattered" if jitter["draws"] == "lognormal"
                 else "drawn from this real run's own steps' deviations from their prices")
        lines.append(f"step noise: range of the relative error over {jitter['runs']} reruns with every step's price "
                     f"times noise of mean 1 ({drawn}: each step's own, sigma {jitter['sigma'] * 100:.1f}%, times a "
                     f"drift shared by each {jitter['block_s']:g} s of steps, sigma "
                     f"{jitter['slow_sigma'] * 100:.1f}%): how far the order of events alone moves a run of this "
                     "workload (two real runs can land further apart: the machine's speed moves too)"
                     + (f"; {len(inside)} of {len(bad)} misses lie inside it ({', '.join(inside)})" if bad else ""))
    probe = load.get("speed_probe")
    if probe:
        b, a = probe["before"], probe["after"]
        lines.append("run factors refitted on real-time probes just before and just after this load "
                     f"({probe['requests']} requests drawn from this workload, at {b['rate_rps']:.2f} req/s; "
                     f"{probe['wall_s']:.0f} s): "
                     f"decode-only steps x{probe['run_factor']:.3f} (before x{b['run_factor']:.3f}, after "
                     f"x{a['run_factor']:.3f}; profile x{probe['profile_run_factor']:.3f}), steps with prompt tokens "
                     f"x{probe['prefill_run_factor']:.3f} (before x{b['prefill_run_factor']:.3f}, after "
                     f"x{a['prefill_run_factor']:.3f}; profile x{probe['profile_prefill_run_factor']:.3f})")
        if probe.get("decode_batch_factors"):
            lines.append("decode-only steps priced by their batch size, from both probes' steps: "
                         + describe_batch_factors(probe["decode_batch_factors"]))
        curve = probe.get("idle_wakeup_curve")
        if curve:
            lines.append("a step after idle priced by its wait, from wake-up probes before and after this load: "
                         + describe_wakeup(curve)
                         + " (linear between, flat beyond; profile: " + _profile_wakeup(probe) + ")")
    speed = load.get("at_run_speed")
    if speed:
        pf = speed["prefill_run_factor"]
        lines.append("diagnostic, the simulator at the real run's own speed (run factors refitted on its steps: "
                     f"x{speed['run_factor']:.3f}" + ("" if pf is None else f" / x{pf:.3f}") + "): "
                     + _means(speed["rel_error"]))
        over = speed.get("over_time")
        if over:
            n = len(over["windows"])
            lines.append(f"  and at its speed over time (both factors refitted on each {over['window_s']:.0f} s "
                         f"window's steps, {n} window{'s' if n != 1 else ''}): " + _means(over["rel_error"]))
    cpu = load["cpu_load"]
    if "cpu_pressure_some_avg10_pct" in cpu["before"] and "cpu_pressure_some_avg10_pct" in cpu["after"]:
        psi = cpu["before"]["cpu_pressure_some_avg10_pct"]
        lines.append(f"CPU shared during the real run: PSI some avg10 {psi:.0f}%"
                     f" before, {cpu['after']['cpu_pressure_some_avg10_pct']:.0f}% after (0% = nothing else competed)")
    oh = load["driver_overhead"]
    if oh["mean_ms"] is not None:
        lines.append(f"driver work charged to measured steps: {oh['mean_ms']:.2f} ms/step ({oh['share_pct']:.1f}% of "
                     "step time)")
    par = load.get("parallel_instances")
    if par:
        lines.append(f"instances stepping at the same time: {par['late_steps']} step end(s) reached after the clock "
                     f"had passed them (by at most {par['max_late_s'] * 1e3:.2f} ms; they end when reached)")
    lines.append("real run's steps priced by the profile (predicted vs measured step time):")
    lines.append(f"  {'step kind':<20} {'steps':>6} {'median ms':>10} {'total err':>10} {'MAPE':>7} {'bias':>7}")
    for s in load["steps"]:
        lines.append(f"  {s['kind']:<20} {s['n']:>6} {s['median_measured_ms']:>10.1f} {s['total_error_pct']:>+9.1f}% "
                     f"{s['mape']:>6.1f}% {s['bias_pct']:>+6.1f}%")
    return "\n".join(lines)
