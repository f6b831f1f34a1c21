"""Workloads at a chosen arrival rate, for sweep and capacity.

Without --trace: the seeded synthetic workload of the chosen arrival process at
that rate (the same --seed gives the same prompts and lengths at every rate, so
rates are compared on common random numbers). With --trace: the trace read once,
then its arrival times scaled so its mean rate, (N - 1) / (last - first arrival),
equals the rate asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sim.cli_common import UsageError, build_workload, check_kind_flags, synthetic
from sim.cli_output import log
from sim.workload import Workload, scale_workload


def trace_rate(w: Workload) -> float:
    """Mean arrival rate of a workload: (N - 1) / (last - first arrival)."""
    n = len(w.requests)
    span = w.requests[-1].arrival_s - w.requests[0].arrival_s if n else 0.0
    if n < 2 or span <= 0:
        raise UsageError(f"the trace has {n} request(s) spanning {span:g} s; scaling it to a rate needs at least "
                         "two requests at different times")
    return (n - 1) / span


class RateWorkloads:
    """workload_at(rate) for one set of flags."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        if args.time_scale is not None:
            log(args, f"{command}: --time-scale {args.time_scale:g} ignored; the rate decides the time scale")
        self.args = args
        self.base: Workload | None = None
        self.base_rate: float | None = None
        if args.trace:
            self.base = build_workload(args, with_time_scale=False)
            self.base_rate = trace_rate(self.base)
        else:
            check_kind_flags(args, "synthetic")

    def describe(self, rate: float | None = None) -> str:
        """What the rate changes (for synthetic workloads, the one generated at rate)."""
        if self.base is not None:
            return (f"{self.base.description}; its mean rate {self.base_rate:.3g} req/s is time-scaled to each "
                    "rate")
        sample = self.at(rate or self.args.rate or 1.0)
        return f"regenerated at each rate with the same seed; {sample.description}"

    def at(self, rate: float) -> Workload:
        """The workload at this arrival rate (req/s)."""
        if self.base is not None:
            return scale_workload(self.base, self.base_rate / rate, 1.0)
        return synthetic(self.args, rate)

    def config(self, rate: float | None = None) -> dict:
        """The workload entry of the resolved configuration."""
        source = self.base.source if self.base is not None else self.at(rate or self.args.rate or 1.0).source
        return {"description": self.describe(rate), "source": source, "base_rate": self.base_rate}


def rate_row_header(slo: bool, width: int = 28) -> str:
    """Header of the compact per-point table."""
    cols = f"{'policy':<{width}} {'rate':>8} {'served':>8} "
    cols += f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'E2E p99':>9}"
    return cols + (f" {'goodput':>8} {'SLO att.':>8}" if slo else "")


def rate_row(label: str, rate: float, s: dict, slo: bool, fmt_time: Callable[[float | None], str],
             width: int = 28) -> str:
    """One point: policy, offered rate, served rate, latencies (and goodput with SLOs)."""
    def num(x):
        return "-" if x is None else f"{x:.3g}"

    line = (f"{label:<{width}} {rate:>8.3g} {num(s.get('throughput_rps')):>8} {fmt_time(s['ttft_s']['p50']):>9} "
            f"{fmt_time(s['ttft_s']['p99']):>9} {fmt_time(s['tpot_s']['p50']):>9} {fmt_time(s['e2e_s']['p99']):>9}")
    if slo:
        att = s.get("slo_attainment")
        line += f" {num(s.get('goodput_rps')):>8} {'-' if att is None else f'{100 * att:.1f} %':>8}"
    return line
