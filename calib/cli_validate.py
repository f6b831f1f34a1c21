"""Run one workload on the real backend and in the simulator with a calibrated profile; compare them.

Both sides get the same workload, seed, policy and SchedulerConfig (the real context's capacity, with the
scheduler flags on top). The measured side runs the real backend in SimPy real time, --repeats times (default
3) per load; the predicted side runs SyntheticBackend(profile) in virtual time. At each load (--rates, default
0.3x, 0.7x and 1.2x of the capacity the profile predicts for the workload) arrivals are re-timed as a Poisson
process at that rate with --seed, keeping the workload's lengths. Default workload: the bundled default trace
slice at length scale 0.1 with its 32-token shared prefixes, all 200 requests. Around each load, real-time
probes (64 requests drawn from the workload, at 0.7x capacity) just before and just after its repeats refit a
table profile's two run factors to the machine's speed during them (the mean of the two), each with a wake-up
probe (prefills after idle waits of 0.1-2.5 s) that prices a step after idle by its wait.

Prints measured (the repeats' mean) vs predicted TTFT, TPOT, E2E (mean, p50, p90, p99) and throughput with
(predicted - measured) / measured next to the repeats' spread; a cell passes when |error| <= max(target,
spread), targets 5 % for means and throughput and 10 % for p90/p99 (calib.judge). Also the real run's steps
priced by the profile per step kind. Writes per-load folders (summary, requests_measured.csv,
requests_predicted.csv, steps CSVs, latency_cdfs.png) and validation.json. A profile calibrated on another
model file or llama-cpp-python version is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from calib.judge import MIN_REPEATS, misses
from calib.noise import ENSEMBLE_RUNS, NOISE_RUNS, merge_noise
from calib.speed import bracket_factors
from calib.validate_report import format_load
from sim.cli_common import (
    DEFAULT_COST_MODELS,
    UsageError,
    add_gpu_args,
    add_output_args,
    add_scheduler_args,
    add_workload_args,
    build_config,
    build_workload,
    default_profile,
    float_list,
    gpu_layers,
    nonnegative_int,
    positive_int,
    workload_kind,
)
from sim.cli_output import out_dir
from sim.executor import add_executor_arg, make_executor
from sim.report import _plain as plain

DEFAULT_LIMIT = 200  # the whole bundled slice: a p99 of fewer requests is one or two requests
PROBE_REQUESTS = 64  # requests of each speed probe, drawn from the validated workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """validate's flags."""
    parser.add_argument("--profile", metavar="NAME|FILE",
                        help=f"calibrated profile (default: the bundled {DEFAULT_COST_MODELS[0]}, or its -xN "
                             "variant with --instances N)")
    parser.add_argument("--model", metavar="NAME|PATH", help="GGUF model of the real run (default gemma3-270m)")
    parser.add_argument("--policy", default="continuous", metavar="SPEC", help="policy spec (default continuous)")
    add_gpu_args(parser)  # default: the layers the profile was calibrated with
    parser.add_argument("--recorded", metavar="DIR",
                        help="judge --profile against the real runs of an earlier validate (its result folder), "
                             "without running the model: only the prediction reruns; give the workload flags "
                             "that run used")
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
    parser.add_argument("--repeats", type=positive_int, default=MIN_REPEATS, metavar="N",
                        help="real runs of each load; each statistic's measured value is their mean and their "
                             f"spread widens what the cell allows (default {MIN_REPEATS}; fewer than "
                             f"{MIN_REPEATS}: the fixed targets alone)")
    parser.add_argument("--ensemble-runs", type=nonnegative_int, default=0, metavar="N",
                        help="predict with the median of N simulated runs, each with every step's price scattered "
                             "as the speed probes' steps scattered around theirs (default 0: one noiseless run; "
                             f"{ENSEMBLE_RUNS} is a useful N)")
    parser.add_argument("--noise-runs", type=nonnegative_int, default=0, metavar="N",
                        help="add a step-noise column: the error's range over N reruns with every step's price "
                             "scattered as much as the real run's steps scattered around theirs (default 0: none; "
                             f"{NOISE_RUNS} is a useful N)")
    parser.add_argument("--samples", metavar="FILE",
                        help="also write every real run's timed steps as JSON lines (shape, seconds, driver "
                             "seconds, idle wait): serving steps that `calibrate --refit GRID --refit FILE` fits with "
                             "the grid's")
    add_workload_args(parser)
    add_scheduler_args(parser)
    add_output_args(parser, slo=False, config=False)
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
    from calib.measure import estimate_capacity
    from calib.provenance import build_info, check_instances, check_profile, machine_info, model_fingerprint
    from calib.validate import RATE_FACTORS, compare_load
    from scheduler import make_policy
    from sim.real import close_instances, make_llama_instances

    profile, profile_name = _profile(args)
    if args.recorded:
        return _rejudge(args, profile, profile_name)
    policy = make_policy(args.policy).describe()  # a bad spec fails before the model loads
    workload = _workload(args)
    warnings = check_instances(profile, profile_name, args.instances, force=args.force)
    executor = make_executor(args.executor, args.seed)  # the simulated reruns; real runs stay in this process
    options = _llama_options(profile)
    if gpu_layers(args) is not None:
        options["n_gpu_layers"] = gpu_layers(args)
    backends, real = make_llama_instances(args.model, args.instances, options)
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
        loads, serving = [], []
        if any(getattr(b.model, "n_gpu_layers", 0) for b in backends):
            # the first real-time run on a fresh GPU context read its steps with prompt tokens 30-40 % slow even
            # after untimed warm-up steps (new shapes); one probe's worth of the workload, discarded, absorbs it
            _log(args, "validate: a warm-up probe on the GPU (discarded)")
            _speed_probe(args, backends, config, profile, workload, PROBE_REQUESTS)
        probe, noise = _speed_probe(args, backends, config, profile, workload)
        for i, (rate, label) in enumerate(zip(rates, labels, strict=True)):
            measured = _measure_repeats(args, backends, workload, rate, config, serving)
            after, noise_after = _speed_probe(args, backends, config, profile, workload)
            speed, load_profile = bracket_factors(profile, probe, after)
            load = compare_load(measured, load_profile, args.policy, config, args.seed, args.router,
                                noise_runs=args.noise_runs, ensemble_noise=merge_noise([noise, noise_after]),
                                ensemble_runs=args.ensemble_runs, executor=executor)
            load["factor_label"], load["speed_probe"], probe, noise = label, speed, after, noise_after
            _write_load(args, out / f"load{i + 1}-{rate:.3g}rps", load, profile_name, config, policy)
            loads.append(load)
            bad = misses(load["rel_error"], load["repeat_spread"], load["repeats"])
            _log(args, f"validate: load {i + 1}/{len(rates)} done: "
                       + ("every cell passed" if not bad else "missed " + ", ".join(bad)))
        if args.samples:
            _write_serving(args, serving, backends[0], options, policy, workload, profile_name)
    finally:
        close_instances(backends)
        executor.close()
    c = config
    setup = (f"workload: {workload.description}; arrivals re-timed at each rate as a Poisson process "
             f"(seed {args.seed}), lengths kept; {args.repeats} real run(s) of each load\n"
             f"scheduler (both sides, from the real context): max_num_seqs={c.max_num_seqs}, "
             f"max_num_batched_tokens={c.max_num_batched_tokens}, max_model_len={c.max_model_len}, "
             f"kv={c.num_kv_blocks}x{c.block_size} tokens, prefix caching {'on' if c.enable_prefix_caching else 'off'}"
             + (f"\ninstances: {args.instances} on both sides, router {args.router}; the real ones step at the same "
                "time, each on its own thread" if args.instances > 1 else ""))
    return _finish(args, out, profile, profile_name, policy, loads, warnings, setup)


def _rejudge(args: argparse.Namespace, profile, profile_name: str) -> int:
    """--recorded: the recorded loads against a new prediction; exit 0, or 1 when a cell misses."""
    from calib.recorded import format_rejudged, rejudge

    root = Path(args.recorded)
    loads = rejudge(root, _workload(args), profile, args.instances, args.router)
    if args.json:
        doc = {"profile": profile_name, "recorded": str(root), "loads": loads}
        sys.stdout.write(json.dumps(plain(doc), allow_nan=False) + "\n")
    else:
        print(format_rejudged(loads, profile_name, root), flush=True)
    return 1 if any(ld["misses"] for ld in loads) else 0


def _measure_repeats(args: argparse.Namespace, backends, workload, rate: float, config, serving: list) -> dict:
    """The load's real side, --repeats times with the same arrivals (each on a cleared KV cache), merged; each
    run's (label, steps, idle waits) appended to serving."""
    from calib.measure import measure_load
    from calib.validate import merge_repeats
    from sim.progress import Progress, progress_enabled

    runs = []
    for k in range(args.repeats):
        _warm_gpu(backends, config)
        label = f"validate {rate:.3g} req/s, run {k + 1}/{args.repeats} (real time)"
        with Progress(label, enabled=progress_enabled(args.quiet)) as bar:
            runs.append(measure_load(backends, workload, rate, args.policy, config, args.seed, args.router, bar))
        serving.append((f"serving {args.policy} {rate:.3g} req/s run {k + 1}", runs[-1]["samples"], runs[-1]["idle_s"]))
    return merge_repeats(runs)


def _write_serving(args: argparse.Namespace, serving: list, backend, options: dict, policy: str, workload,
                   profile_name: str) -> None:
    """--samples: the real runs' steps, with what they ran on (calib.samples.write_serving_samples)."""
    import datetime as dt

    from calib.provenance import build_info, machine_info, model_fingerprint
    from calib.samples import write_serving_samples

    meta = {"note": "real-time serving steps recorded by `tokenstep validate`", "model":
            model_fingerprint(backend.model), **build_info(), "context": options, "machine": machine_info(),
            "policy": policy, "workload": workload.description, "profile": profile_name,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    split = {"n_batch": backend.n_batch, "n_ubatch": backend.n_ubatch, "kv_unified": backend.kv_unified,
             "n_seq_max": backend.num_slots}
    n = write_serving_samples(args.samples, meta, split, serving)
    _log(args, f"validate: {n} serving steps written to {args.samples}")


def _speed_probe(args: argparse.Namespace, backends, config, profile, workload,
                 requests: int | None = None) -> tuple[dict | None, Any]:
    """A real-time probe run that fits a table profile's two run factors to the machine's speed now, and the
    scatter of its steps around their prices (calib.noise.StepNoise); (None, None): no probe.

    A shared machine's speed drifts (other tenants of a host: up to 7 % within a quarter of an hour), so each
    load's run factors come from probes run just before and just after it (calib.speed.bracket_factors),
    against the profile's unchanged grid fit. A probe is --probe-requests requests drawn at random from the
    validated workload (a fixed draw, not the run itself), re-timed at 0.7x the capacity the profile predicts
    for them, under the validated policy and scheduler limits, so its mix of step shapes is the workload's.
    With several instances it runs on all of them at once (that many requests each), as the load does.
    requests: this many instead of --probe-requests (the GPU's discarded warm-up probe runs even without probes).
    """
    from calib.probes import speed_probe

    n = requests if requests is not None else PROBE_REQUESTS if args.probe_requests is None else args.probe_requests
    if n:
        _warm_gpu(backends, config)
    return speed_probe(backends, profile, config, args.seed, lambda text: _log(args, f"validate: {text}"), n,
                       workload, args.policy, wakeup=args.wakeup_probe)


GPU_WARM_S = 1.0  # of untimed steps before each real-time run on a GPU context


def _warm_up(backend, config, seconds: float = 0.0) -> None:
    """Untimed steps: a few first (the first llama_decode of a context allocates its compute graph), repeated
    until `seconds` have passed. An idle GPU drops its clocks (an H200 read 345 MHz between runs) and a
    real-time run that starts cold pays the climb back on its first steps: a 2 s speed probe right after a
    pause read steps with prompt tokens 40 % slow, the load after it 5 % fast."""
    import time

    import numpy as np

    from calib.grid import Scenario, drive

    t0 = time.perf_counter()
    while True:
        drive(backend, config, Scenario("warm-up", "continuous", ((0, 48, 4, 0),) * 4), "warm",
              np.random.default_rng(0))
        if time.perf_counter() - t0 >= seconds:
            return


def _warm_gpu(backends, config) -> None:
    """GPU_WARM_S of untimed steps on each offloaded instance (nothing on the CPU), right before a timed run."""
    for b in backends:
        if getattr(b.model, "n_gpu_layers", 0):
            _warm_up(b, config, GPU_WARM_S)


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
                      "predicted": ld["predicted"], "rel_error": ld["rel_error"], "repeats": ld["repeats"],
                      "repeat_spread": ld["repeat_spread"], "verdict": ld["verdict"],
                      "sampling_noise": ld.get("sampling_noise"),
                      "rel_error_interval": ld.get("rel_error_interval"), "speed_probe": ld.get("speed_probe"),
                      "step_noise": ld.get("step_noise"),
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
        from calib.measure import relabel
        from sim.plots import plot_latency_cdfs

        runs = [relabel(ld[k], f"{k.split('_')[0]} {ld['rate']:.3g} req/s") for ld in loads
                for k in ("measured_run", "predicted_run")]
        plot_latency_cdfs(runs, out / "latency_cdfs.png")
    if args.json:
        sys.stdout.write(json.dumps(plain(doc), allow_nan=False) + "\n")
    else:
        print(text + f"\n\nresults in {out}/", flush=True)
    return 0
