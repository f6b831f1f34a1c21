"""Profile the real llama.cpp backend over a grid of step shapes and write a calibrated cost-model profile.

Drives real Scheduler plans (decodes at every batch size 1-16 and three context lengths,
fragmented decodes, prompts of 8-500 tokens, chunked prefill, mixed decode + prompt steps,
prefix copies, padded static batches, steps after an idle wait) through the backend; a
step's time is the wall time of schedule() + step() + commit(), the median of its repeats
within 1.10x of the fastest (on a shared CPU, slower repeats are contention). Fits a "table" cost model
(llama.cpp's micro-batch split replayed, piecewise-linear tables per micro-batch) and
reports its error on held-out steps (every 4th). A wake-up
probe then times prefills after idle waits of several lengths (the profile's idle_wakeup_curve)
and a short real-time serving run fits the run factors.
The profile's meta says which model file, llama-cpp-python build, context and machine
it came from, and how loaded the CPU was. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from backends.cost.wakeup import describe_wakeup
from sim.cli_common import add_gpu_args, gpu_layers, nonnegative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """calibrate's flags."""
    parser.add_argument("--model", metavar="NAME|PATH", help="GGUF model (default gemma3-270m)")
    parser.add_argument("--out", metavar="FILE", help="profile to write (default results/calibration-<timestamp>.json)")
    parser.add_argument("--quick", action="store_true", help="a short grid, 2 repeats: under a minute on an idle CPU")
    parser.add_argument("--repeats", type=positive_int, help="runs of the grid, round-robin (default 3, --quick 2)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of each context (default: the machine's 2 "
                                                             "shared among the instances, at least 1)")
    parser.add_argument("--instances", type=positive_int, default=1, metavar="N",
                        help="profile one of N instances sharing this machine: the grid is timed while the other "
                             "N-1 serve a steady load, and the probe runs on all N at once (default 1); for "
                             "`simulate/validate --instances N`")
    parser.add_argument("--no-wakeup-probe", action="store_true",
                        help="skip the wake-up probe (prefills after idle waits of 0.1-2.5 s, about 13 s; --quick: "
                             "0.1 and 1 s, about 3 s): the profile then prices every step after idle at the grid's "
                             "flat wake-up, whatever the wait")
    add_gpu_args(parser)
    parser.add_argument("--serving-requests", type=nonnegative_int, default=None, metavar="N",
                        help="requests of each real-time serving run (continuous and chunked at 0.25x the fitted "
                             "capacity, continuous at 2x on a long-tailed workload) whose steps join the grid's in "
                             "the fit and set the run factors (default 300 on a GPU context, 0 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids (default 0)")
    parser.add_argument("--samples", metavar="FILE", help="also write every measured step as JSON lines (shape, kind, "
                                                          "repeat times, held out or not)")
    parser.add_argument("--refit", metavar="SAMPLES", action="append",
                        help="fit again from a --samples file instead of measuring; repeat it to add real-time "
                             "serving steps written by validate --samples (their run factors are fitted again)")
    g = parser.add_argument_group("fit a roofline to another engine's request log instead (calib.fit_log)")
    g.add_argument("--from-log", metavar="FILE", help="JSONL of finished requests (arrival_s, num_prompt_tokens, "
                   "num_output_tokens, ttft_s, e2e_s; *_ms and vLLM names accepted): fit --cost's mfu, mbu, "
                   "overhead_s to it")
    g.add_argument("--cost", metavar="NAME|FILE",
                   help="--from-log: the roofline to start from (default h200-llama3-8b)")
    g.add_argument("--predict", action="append", metavar="FILE", help="--from-log: also report the fitted model's "
                   "errors on this log (repeatable)")
    g.add_argument("--log-policy", default="continuous", metavar="SPEC",
                   help="--from-log: the policy that stands for the engine (default continuous)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def default_out() -> Path:
    """results/calibration-<YYYYmmdd-HHMMSS>.json."""
    return Path("results") / f"calibration-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def _pct(stats: dict) -> str:
    if not stats.get("n"):
        return "no steps"
    return (f"MAPE {stats['mape']:.1f}%, p90 {stats['p90_abs_pct_error']:.1f}%, worst {stats['max_abs_pct_error']:.1f}%"
            f", bias {stats['bias_pct']:+.1f}% (n={stats['n']})")


def _load(snap: dict) -> str:
    parts = []
    if "loadavg_1m" in snap:
        parts.append(f"loadavg {snap['loadavg_1m']:.1f}")
    if "cpu_pressure_some_avg60_pct" in snap:
        parts.append(f"CPU pressure {snap['cpu_pressure_some_avg60_pct']:.0f}%")
    return ", ".join(parts) or "unknown"


def report(meta: dict, stats: dict, path: Path) -> str:
    """The human-readable summary of a calibration."""
    m, c, mach, noise = meta["model"], meta["context"], meta["machine"], meta["noise"]
    lines = [
        f"calibrated {m['name']} ({m['file']}, {m['size_bytes'] / 1e6:.1f} MB, sha256 {m['sha256'][:12]}...) with "
        f"llama-cpp-python {meta['llama_cpp_python']}: {c['n_threads']} threads, n_ctx {c['n_ctx']}, "
        f"{c['n_seq_max']} slots, n_batch {c['n_batch']}, n_ubatch {c['n_ubatch']}, kv_unified {c['kv_unified']}"
        + (f"; one of {c['instances']} instances sharing the machine (the others served meanwhile: "
           f"{', '.join(str(n) for n in c['neighbour_steps'])} steps)" if c.get("instances", 1) > 1 else ""),
        f"machine: {mach['cpu_model']}, {mach['nproc']} cores; load before: {_load(meta['load']['before'])}; "
        f"after: {_load(meta['load']['after'])}",
        f"grid: {len(meta['grid']['scenarios'])} scenarios, {meta['grid']['num_steps']} steps, {noise['repeats']} "
        f"repeat(s), {meta['grid']['wall_s']:.0f} s; step time = {meta['timing']}",
    ]
    if noise.get("median_repeat_spread_pct") is not None:
        n = noise
        lines.append(f"noise: a step's slowest repeat over its fastest: median +{n['median_repeat_spread_pct']:.1f}%, "
                     f"p90 +{n['p90_repeat_spread_pct']:.1f}%; {n['repeats_dropped_as_contention_pct']:.1f}% of the "
                     f"repeats were over {n.get('clean_ratio', 1.25):.2f}x the fastest (contention) and dropped; "
                     "spread of the rest: median "
                     f"+{n['median_kept_spread_pct'] or 0:.1f}%")
    lines.append(f"table model on held-out steps ({stats['hold_out']}): {_pct(stats['held_out'])}")
    for kind, s in stats["by_kind_held_out"].items():
        lines.append(f"  {kind:<18} {_pct(s)}")
    lines.append(f"table model on the steps it was fitted on: {_pct(stats['train'])}")
    wake = stats.get("wakeup")
    if wake:
        lines.append("wake-up: a prefill after an idle wait over the same prefill right after it (median of "
                     f"{wake['repeats']}): " + describe_wakeup(wake["knots"])
                     + f" ({wake['wall_s']:.0f} s); the profile prices a step after idle by its wait, linear "
                     "between these, flat beyond")
    probe = stats.get("run_probe")
    if probe:
        pf = probe.get("prefill_run_factor")
        kinds = "" if pf is None else (f" (steps of decodes only x{probe['run_factor']:.4f}, steps with prompt tokens "
                                       f"x{pf:.4f})")
        if "source" in probe:  # refitted on recorded serving steps
            lines.append(f"run factors{kinds}: fitted on the {probe['steps']} {probe['source']} (measured over "
                         "priced by the new fit); each price is multiplied by its kind's factor")
        else:
            lines.append(f"run factors{kinds}: a real-time serving run of {probe['requests']} synthetic requests at "
                         f"{probe['rate_rps']:.2f} req/s took that much longer than its {probe['steps']} steps priced "
                         f"by the grid fit (driver {probe['driver_ms_per_step']:.2f} ms/step, occasional slow steps); "
                         "each price is multiplied by its kind's factor")
    lines.append(f"profile written to {path}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Calibrate, write the profile, report."""
    from backends.cost import save_cost_model
    from backends.models import DEFAULT_MODEL
    from calib.calibrate import calibrate, refit

    if args.from_log:
        from calib.fit_log import run_from_log

        return run_from_log(args)
    out = Path(args.out) if args.out else default_out()
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r} must end in .json (profiles are JSON; the file stem names the profile)")

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    if args.refit:
        cal = refit(args.refit, out.stem)
    else:
        options = {} if args.threads is None else {"n_threads": args.threads}
        layers = gpu_layers(args)
        if layers:  # a GPU context sized for GPU serving (calib.gpu_grid)
            from calib.gpu_grid import GPU_CONTEXT

            options.update(GPU_CONTEXT, n_gpu_layers=layers)
        cal = calibrate(args.model or DEFAULT_MODEL, options, quick=args.quick, repeats=args.repeats, seed=args.seed,
                        name=out.stem, progress=say, instances=args.instances, wakeup=not args.no_wakeup_probe,
                        serving=args.serving_requests)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_cost_model(cal.model, out)
    if args.samples:
        from calib.samples import write_samples

        write_samples(cal, args.samples)
    text = report(cal.meta, cal.stats, out)
    if args.json:
        say(text)
        doc = {"profile": str(out), "samples": args.samples, "kind": "table", "describe": cal.model.describe(),
               "fit": cal.stats, "meta": {k: v for k, v in cal.meta.items() if k != "fit"}}
        sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
    else:
        print(text, flush=True)
    return 0
