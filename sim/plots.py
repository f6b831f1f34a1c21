"""Plots of runs: latency CDFs, latency and throughput against arrival rate, and request timelines.

matplotlib is imported inside the functions with the Agg backend, so no display is ever needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sim.metrics import is_finished, reason, request_latencies
from sim.records import RunResult, step_columns

_QUEUE_COLOR = "#c8c8c8"
_PREFILL_COLOR = "#f28e2b"
_DECODE_COLOR = "#4e79a7"
_DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _timing(runs: list[RunResult]) -> str:
    timings = sorted({run.ttft_timing for run in runs})
    return "/".join(timings) if timings else "computed"


def plot_latency_cdfs(runs: list[RunResult], path) -> Path:
    """CDFs of TTFT, TPOT and E2E of finished requests, one line per run, in three panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    metrics = (("ttft_s", f"TTFT (s, {_timing(runs)})"), ("tpot_s", "TPOT (s)"), ("e2e_s", "E2E latency (s)"))
    latencies = [[request_latencies(r) for r in run.records if is_finished(r)] for run in runs]
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for i, run in enumerate(runs):
            values = sorted(v for lat in latencies[i] if (v := lat[key]) is not None)
            if not values:
                continue
            fractions = [0.0] + [(k + 1) / len(values) for k in range(len(values))]
            ax.step([values[0], *values], fractions, where="post", color=f"C{i % 10}", label=run.policy)
        ax.set_xlabel(label)
        ax.ticklabel_format(useOffset=False)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of finished requests")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Latency CDFs")
    return _save(fig, path)


def plot_rate_curves(points: list[dict], path) -> Path:
    """TTFT p50/p99, TPOT p50 and throughput against arrival rate; points are {"policy", "rate", "summary"}."""
    plt = _pyplot()
    by_policy: dict[str, list[dict]] = {}
    for point in points:
        by_policy.setdefault(str(point["policy"]), []).append(point)
    fig, (ax_ttft, ax_tpot, ax_tput) = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    for i, (policy, pts) in enumerate(by_policy.items()):
        pts = sorted(pts, key=lambda p: p["rate"])
        rates = [p["rate"] for p in pts]
        color = f"C{i % 10}"
        ttft = [p["summary"].get("ttft_s") or {} for p in pts]
        ax_ttft.plot(rates, [_nan(t.get("p50")) for t in ttft], "o-", color=color, label=f"{policy} p50")
        ax_ttft.plot(rates, [_nan(t.get("p99")) for t in ttft], "s--", color=color, label=f"{policy} p99")
        tpot = [_nan((p["summary"].get("tpot_s") or {}).get("p50")) for p in pts]
        ax_tpot.plot(rates, tpot, "o-", color=color, label=policy)
        tput = [_nan(p["summary"].get("throughput_rps")) for p in pts]
        ax_tput.plot(rates, tput, "o-", color=color, label=policy)
    all_rates = [p["rate"] for p in points]
    if all_rates:
        lo, hi = min(all_rates), max(all_rates)
        ax_tput.plot([lo, hi], [lo, hi], ":", color="black", label="offered load")
    ax_ttft.set_ylabel("TTFT (s)")
    ax_tpot.set_ylabel("TPOT p50 (s)")
    ax_tput.set_ylabel("throughput (req/s)")
    for ax in (ax_ttft, ax_tpot, ax_tput):
        ax.set_xlabel("arrival rate (req/s)")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(useOffset=False)
        if points:
            ax.legend(fontsize=7)
    fig.suptitle("Latency and throughput against arrival rate")
    return _save(fig, path)


def busiest_window(runs: list[RunResult], max_requests: int) -> int:
    """Index (by arrival) of the first request to draw: requests arriving up to the deepest queue seen."""
    peak_waiting, peak_start = 0, None
    for run in runs:
        cols = step_columns(run.steps)
        if len(cols["num_waiting"]):
            i = int(np.argmax(cols["num_waiting"]))  # the first of the deepest, as max() over the steps
            if peak_start is None or cols["num_waiting"][i] > peak_waiting:
                peak_waiting, peak_start = int(cols["num_waiting"][i]), float(cols["start_s"][i])
    if peak_start is None or peak_waiting == 0:
        return 0
    arrivals = sorted(r.arrival_s for r in runs[0].records)
    upto = sum(1 for a in arrivals if a <= peak_start)
    return max(0, min(upto - (2 * max_requests) // 3, len(arrivals) - max_requests))


def _draw_requests(ax, run: RunResult, max_requests: int, first: int = 0) -> None:
    """One row per request: queued, prefill and decode bars, an arrival marker, a cross if not finished."""
    records = _shown(run, max_requests, first)
    bars = {"queued": ([], [], []), "prefill": ([], [], []), "decode": ([], [], [])}

    def add(kind: str, y: int, start, end) -> None:
        if start is not None and end is not None and end >= start:
            bars[kind][0].append(y)
            bars[kind][1].append(start)
            bars[kind][2].append(end - start)

    failed_x, failed_y = [], []
    for y, r in enumerate(records):
        end = r.finish_s if r.finish_s is not None else (r.token_times_s[-1] if r.token_times_s else None)
        add("queued", y, r.arrival_s, r.first_scheduled_s if r.first_scheduled_s is not None else end)
        add("prefill", y, r.first_scheduled_s, r.first_token_s if r.first_token_s is not None else end)
        add("decode", y, r.first_token_s, end)
        if reason(r) is not None and not is_finished(r):
            failed_x.append(end if end is not None else r.arrival_s)
            failed_y.append(y)
    colors = {"queued": _QUEUE_COLOR, "prefill": _PREFILL_COLOR, "decode": _DECODE_COLOR}
    for kind, (ys, lefts, widths) in bars.items():
        ax.barh(ys, widths, left=lefts, height=0.7, color=colors[kind], label=kind, edgecolor="none")
    ax.plot([r.arrival_s for r in records], range(len(records)), "|", color="black", ms=9, label="arrival")
    if failed_x:
        ax.plot(failed_x, failed_y, "x", color="red", ms=7, label="rejected/aborted/error")
    if not records:
        ax.text(0.5, 0.5, "no requests", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylim(max(len(records), 1) - 0.5, -0.5)
    if len(records) <= 40:
        ax.set_yticks(range(len(records)), [str(r.request_id) for r in records], fontsize=6)
    ax.set_ylabel("request (by arrival)")
    # Rows are sorted by arrival, so the lower left corner is the emptiest.
    ax.legend(loc="lower left", fontsize=7, ncol=3)
    ax.grid(axis="x", alpha=0.3)


def _batch_line(start: np.ndarray, end: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the batch-size line of steps sorted by start: flat over each step, down to zero across
    idle gaps (so the line never ramps between batches)."""
    m = len(start)
    gap = np.ones(m, dtype=bool)
    gap[1:] = start[1:] > end[:-1]
    prev_end = np.concatenate(([0.0], end[:-1]))
    zeros = np.zeros(m)
    xs = np.stack([prev_end, start, start, end], axis=1)
    ys = np.stack([zeros, zeros, size, size], axis=1)
    keep = np.stack([gap & (np.arange(m) > 0), gap, np.ones(m, bool), np.ones(m, bool)], axis=1)
    return np.append(xs[keep], end[-1]), np.append(ys[keep], 0.0)


def _draw_batch(ax, run: RunResult, window: tuple[float, float] | None = None) -> None:
    """Batch size per step (zero while idle) and queue depth after each step, per instance.

    With a window (the x range shown), only the steps in it, and one each side, become points: a full
    trace has ~10^5 steps, nearly all out of view. The axes' data limits are those of every step, so
    the y range is the same as if all were drawn.
    """
    cols = step_columns(run.steps)
    instances = np.unique(cols["instance"]).tolist()
    for k, instance in enumerate(instances):
        mine = np.flatnonzero(cols["instance"] == instance)
        order = mine[np.argsort(cols["start_s"][mine], kind="stable")]
        start, end = cols["start_s"][order], cols["end_s"][order]
        size, waiting = cols["num_seqs"][order].astype(float), cols["num_waiting"][order].astype(float)
        ax.update_datalim([(start.min(), 0.0), (end.max(), size.max())])
        ax.update_datalim([(end.min(), waiting.min()), (end.max(), waiting.max())])
        if window is not None:
            i0 = max(int(np.searchsorted(end, window[0], "left")) - 1, 0)
            i1 = min(int(np.searchsorted(start, window[1], "right")) + 1, len(start))
            start, end, size, waiting = start[i0:i1], end[i0:i1], size[i0:i1], waiting[i0:i1]
        xs, ys = _batch_line(start, end, size)
        suffix = f" (instance {instance})" if len(instances) > 1 else ""
        ax.plot(xs, ys, color=f"C{k % 10}", lw=1.2, label=f"batch size{suffix}")
        ax.plot(end, waiting, color=f"C{k % 10}", ls="--", lw=1, drawstyle="steps-post",
                label=f"queue depth{suffix}")
    if instances:
        ax.legend(loc="best", fontsize=7, ncol=2)
    ax.set_ylabel("requests")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _shown(run: RunResult, max_requests: int, first: int) -> list:
    """The records a timeline draws: max_requests of them by arrival, from index first."""
    return sorted(run.records, key=lambda r: (r.arrival_s, r.request_id))[first : first + max_requests]


def _span(run: RunResult, max_requests: int, first: int) -> tuple[float, float] | None:
    """(first arrival, last finish) of the records a timeline draws."""
    records = _shown(run, max_requests, first)
    ends = [r.finish_s for r in records if r.finish_s is not None]
    return (records[0].arrival_s, max(ends)) if records and ends else None


def _window(spans) -> tuple[float, float] | None:
    """The x range that shows every span, with 3% to spare each side."""
    spans = [s for s in spans if s is not None]
    if not spans:
        return None
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = 0.03 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _draw_run(ax_req, ax_batch, run: RunResult, max_requests: int, first: int, window) -> None:
    _draw_requests(ax_req, run, max_requests, first)
    _draw_batch(ax_batch, run, window)
    shown = min(len(run.records) - first, max_requests)
    if first == 0:
        title = f"{run.policy}: first {shown} of {len(run.records)} requests"
    else:
        title = f"{run.policy}: requests {first + 1}-{first + shown} of {len(run.records)} (around the deepest queue)"
    ax_req.set_title(title, fontsize=10)


def plot_timeline(run: RunResult, path, max_requests: int = 40) -> Path:
    """Per-request queued/prefill/decode bars over batch size and queue depth against time."""
    plt = _pyplot()
    shown = min(len(run.records), max_requests)
    fig, (ax_req, ax_batch) = plt.subplots(
        2,
        1,
        figsize=(12, 3 + 0.18 * shown + 2),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 1]},
    )
    first = busiest_window([run], max_requests)
    window = _window([_span(run, max_requests, first)])
    _draw_run(ax_req, ax_batch, run, max_requests, first, window)
    if window is not None:
        ax_batch.set_xlim(*window)
    ax_batch.set_xlabel("time (s)")
    fig.suptitle(f"Timeline: {run.policy}")
    return _save(fig, path)


def plot_compare_timelines(runs: list[RunResult], path, max_requests: int = 30) -> Path:
    """Timelines of several runs stacked on one shared time axis (e.g. static over continuous)."""
    if not runs:
        raise ValueError("plot_compare_timelines needs at least one run")
    plt = _pyplot()
    shown = max(min(len(r.records), max_requests) for r in runs)
    fig, axes = plt.subplots(
        2 * len(runs),
        1,
        figsize=(12, len(runs) * (2.5 + 0.15 * shown + 1.2)),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 1] * len(runs)},
        squeeze=False,
    )
    first = busiest_window(runs, max_requests)
    window = _window([_span(run, max_requests, first) for run in runs])
    for i, run in enumerate(runs):
        _draw_run(axes[2 * i, 0], axes[2 * i + 1, 0], run, max_requests, first, window)
    if window is not None:
        axes[-1, 0].set_xlim(*window)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(" vs ".join(run.policy for run in runs))
    return _save(fig, path)
