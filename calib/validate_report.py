"""validate's text report: the measured-vs-predicted table of a load with its verdict, and its diagnostics."""

from __future__ import annotations

from backends.cost.table import describe_batch_factors
from backends.cost.wakeup import describe_wakeup
from calib.judge import MIN_REPEATS, STATS, misses, misses_within


def _fmt_time(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms" if abs(v) < 1 else f"{v:.3f} s"


def _means(rel: dict) -> str:
    """The relative errors of the three latency means and of throughput, for a diagnostic line."""
    return (", ".join(f"{label} mean {_fmt_rel(rel[k]['mean'], None)}" for k, label in
                      (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")))
            + f", throughput {_fmt_rel(rel['throughput_rps'], None)}")


def _fmt_rel(v: float | None, target: float | None = None) -> str:
    if v is None:
        return "-"
    mark = "" if target is None else ("  ok" if abs(v) * 100 <= target else "  MISS")
    return f"{v * 100:+.1f}%{mark}"


def _fmt_cell(cell: dict | None) -> tuple[str, str, str]:
    """(error, repeats' spread, verdict) columns of a judged cell; blanks for a cell that is not judged."""
    if cell is None:
        return "", "", ""
    spread = "-" if cell["spread"] is None else f"{cell['spread'] * 100:.1f}%"
    verdict = "-" if cell["pass"] is None else ("ok" if cell["pass"] else "MISS")
    return spread, f"{cell['allowed'] * 100:.1f}%", verdict


def _profile_wakeup(probe: dict) -> str:
    """The profile's own wake-up price, as the report names it."""
    curve = probe.get("profile_idle_wakeup_curve")
    if curve:
        return describe_wakeup(curve)
    return f"+{probe['profile_idle_wakeup_s'] * 1e3:.1f} ms whatever the wait"


def measured_vs_predicted(load: dict) -> list[str]:
    """The measured-vs-predicted table: each statistic's error, the repeats' spread, what is allowed, the verdict."""
    m, p, r, verdict = load["measured"], load["predicted"], load["rel_error"], load["verdict"]
    noise = load.get("sampling_noise") or {}
    paired = load.get("rel_error_interval") or {}
    jitter = load.get("step_noise")

    def span(v: list | None) -> str:
        return f"{v[0] * 100:+.0f}..{v[1] * 100:+.0f}%" if v else ""

    def ci(d: dict, k: str, s: str) -> str:
        return span((d.get(k) or {}).get(s))

    extra = [("step noise", jitter["rel_error_range"])] if jitter else []
    intervals = bool(noise or paired)  # a recorded load judged again has no bootstrap intervals
    rows = [("metric", f"measured (mean of {load['repeats']})", "predicted", "error", "repeat spread", "allowed",
             "pass") + (("error 95%", "sampling 95%") if intervals else ()) + tuple(head for head, _ in extra)]
    for k, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        for s in STATS:
            rows.append((f"{label} {s}", _fmt_time(m[k][s]), _fmt_time(p[k][s]), _fmt_rel(r[k][s]))
                        + _fmt_cell(verdict[k].get(s)) + ((ci(paired, k, s), ci(noise, k, s)) if intervals else ())
                        + tuple(ci(d, k, s) for _, d in extra))
    rows.append(("throughput", f"{m['throughput_rps']:.3f} req/s" if m["throughput_rps"] else "-",
                 f"{p['throughput_rps']:.3f} req/s" if p["throughput_rps"] else "-", _fmt_rel(r["throughput_rps"]))
                + _fmt_cell(verdict["throughput_rps"]) + (("", "") if intervals else ())
                + tuple(span(d["throughput_rps"]) for _, d in extra))
    rows.append(("finished", str(m["num_finished"]), str(p["num_finished"])) + ("",) * (len(rows[0]) - 3))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                                          strict=True)]))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def format_load(load: dict, policy: str) -> str:
    """The measured-vs-predicted table of one load, its verdict, and the diagnostics that explain its errors."""
    m, r = load["measured"], load["rel_error"]
    lines = [f"load: {load['rate']:.3g} req/s ({load.get('factor_label', 'given')}), policy {policy}, "
             f"{m['num_requests']} requests, {load['repeats']} real run(s)"] + measured_vs_predicted(load)
    bad = misses(r, load["repeat_spread"], load["repeats"])
    rule = ("a cell passes when |error| <= max(target, the real repeats' spread); targets: means and throughput "
            "5%, p90/p99 10%")
    if load["repeats"] < MIN_REPEATS:
        rule += f" (fewer than {MIN_REPEATS} repeats: the targets alone)"
    lines.append(rule + ": " + ("all passed" if not bad else "missed " + ", ".join(bad)))
    lines += _diagnostics(load)
    return "\n".join(lines)


def _diagnostics(load: dict) -> list[str]:
    """The lines under a load's table: how it was predicted, the intervals, the speed probes, the step kinds."""
    r = load["rel_error"]
    lines = []
    det = load.get("deterministic")
    if det:
        ens = det["ensemble"]
        missed = misses(det["rel_error"], load["repeat_spread"], load["repeats"])
        lines.append(f"predicted: the median of {ens['runs']} simulated runs, each with every step's price times noise "
                     f"of mean 1 drawn from the speed probes' own steps (each step's own, sigma "
                     f"{ens['sigma'] * 100:.1f}%, times a drift shared by each second, sigma "
                     f"{ens['slow_sigma'] * 100:.1f}%); CSVs and plots show the run nearest that median (run "
                     f"{ens['medoid'] + 1}). One noiseless run instead: " + _means(det["rel_error"])
                     + (f", {len(missed)} miss{'es' if len(missed) != 1 else ''}" if missed else ", no miss"))
    else:
        lines.append("predicted: one noiseless simulated run (--ensemble-runs N: the median of N noisy ones)")
    if load.get("rel_error_interval"):
        lines.append("error 95%: paired bootstrap interval of the relative error (the same resampled requests on both "
                     "sides, the first real run): how much of the error a few requests carry")
    if load.get("sampling_noise"):
        lines.append("sampling 95%: bootstrap interval of the measured statistic over its requests (how far another "
                     "draw of as many requests could move it; the first real run)")
    jitter = load.get("step_noise")
    if jitter:
        bad = misses(r, load["repeat_spread"], load["repeats"])
        inside = misses_within(r, jitter["rel_error_range"], load["repeat_spread"], load["repeats"])
        drawn = ("lognormal, as this real run's steps scattered" if jitter["draws"] == "lognormal"
                 else "drawn from this real run's own steps' deviations from their prices")
        lines.append(f"step noise: range of the relative error over {jitter['runs']} reruns with every step's price "
                     f"times noise of mean 1 ({drawn}: each step's own, sigma {jitter['sigma'] * 100:.1f}%, times a "
                     f"drift shared by each {jitter['block_s']:g} s of steps, sigma "
                     f"{jitter['slow_sigma'] * 100:.1f}%): how far the order of events alone moves a run of this "
                     "workload (two real runs can land further apart: the machine's speed moves too)"
                     + (f"; {len(inside)} of {len(bad)} misses lie inside it" if bad else "")
                     + (f" ({', '.join(inside)})" if inside else ""))
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
    return lines
