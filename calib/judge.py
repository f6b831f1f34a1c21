"""Whether a prediction is as close to the real runs as they are to each other: errors, repeat spread, pass rule.

A machine's speed moves between two runs of the same load, so a prediction cannot be closer to one real run
than two real repeats of it are to each other. For each statistic, validate runs the load at least
MIN_REPEATS times, takes the repeats' mean as the measured value and their spread (highest minus lowest, over
the mean) as the noise floor, and a cell passes when |error| <= max(target, spread): 5 % for means and
throughput, 10 % for p90 and p99. p50 is reported, not judged.
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")
TARGET_PCT = {"mean": 5.0, "p90": 10.0, "p99": 10.0, "throughput_rps": 5.0}  # p50 is reported, not targeted
MIN_REPEATS = 3  # real repeats a spread needs before it may widen a cell's tolerance


def rel_errors(measured: dict, predicted: dict) -> dict:
    """(predicted - measured) / measured of each latency statistic and of throughput (None where undefined)."""
    def rel(p, m):
        return None if p is None or m is None or m == 0 else (p - m) / m

    out = {k: {s: rel(predicted[k][s], measured[k][s]) for s in STATS} for k in METRICS}
    out["throughput_rps"] = rel(predicted["throughput_rps"], measured["throughput_rps"])
    return out


def repeat_summary(summaries: Sequence[dict]) -> tuple[dict, dict]:
    """(measured, spread) of real repeats of one load: measured is the first repeat's summary with each latency
    statistic and throughput replaced by its mean over the repeats; spread is, for each, (highest - lowest) /
    mean over the repeats (None where a repeat lacks it, or with one repeat)."""
    def mean_and_spread(values: list) -> tuple[float | None, float | None]:
        if not values or any(v is None for v in values):
            return None, None
        mean = sum(values) / len(values)
        spread = (max(values) - min(values)) / mean if len(values) > 1 and mean else None
        return mean, spread

    measured, spread = dict(summaries[0]), {}
    for k in METRICS:
        cells = {s: mean_and_spread([d[k][s] for d in summaries]) for s in STATS}
        measured[k] = {**summaries[0][k], **{s: c[0] for s, c in cells.items()}}
        spread[k] = {s: c[1] for s, c in cells.items()}
    measured["throughput_rps"], spread["throughput_rps"] = mean_and_spread([d["throughput_rps"] for d in summaries])
    measured["num_repeats"] = len(summaries)
    return measured, spread


def _cells(doc: dict) -> list[tuple[str, str | None, object]]:
    """(metric, statistic or None for throughput, value) of each judged cell of a per-statistic dict."""
    out: list[tuple[str, str | None, object]] = [(k, s, doc[k][s]) for k in METRICS for s in ("mean", "p90", "p99")]
    out.append(("throughput_rps", None, doc["throughput_rps"]))
    return out


def judge(rel: dict, spread: dict | None = None, num_repeats: int = 1) -> dict:
    """Each judged cell's verdict: {"error", "spread", "allowed", "pass"} under metric -> statistic (throughput:
    directly). allowed = max(target, spread), the spread counting only with at least MIN_REPEATS repeats;
    pass is None where the error is undefined."""
    use_spread = spread is not None and num_repeats >= MIN_REPEATS
    out: dict = {k: {} for k in METRICS}
    for k, s, error in _cells(rel):
        sp = (spread[k] if s is None else spread[k][s]) if spread is not None else None
        allowed = TARGET_PCT[s or k] / 100
        if use_spread and sp is not None:
            allowed = max(allowed, sp)
        verdict = None if error is None else abs(error) <= allowed
        cell = {"error": error, "spread": sp, "allowed": allowed, "pass": verdict}
        if s is None:
            out[k] = cell
        else:
            out[k][s] = cell
    return out


def _failed(verdicts: dict) -> list[tuple[str, str | None, float]]:
    """(metric, statistic or None for throughput, error) of each cell judge() failed."""
    cells = [(k, s, verdicts[k][s]) for k in METRICS for s in ("mean", "p90", "p99")]
    cells.append(("throughput_rps", None, verdicts["throughput_rps"]))
    return [(k, s, cell["error"]) for k, s, cell in cells if cell["pass"] is False]


def _cell_name(k: str, s: str | None, v: float) -> str:
    return f"{k} {s} {v * 100:+.1f}%" if s else f"throughput {v * 100:+.1f}%"


def misses(rel: dict, spread: dict | None = None, num_repeats: int = 1) -> list[str]:
    """The cells that fail the pass rule (judge), named with their errors."""
    return [_cell_name(*cell) for cell in _failed(judge(rel, spread, num_repeats))]


def misses_within(rel: dict, ranges: dict, spread: dict | None = None, num_repeats: int = 1) -> list[str]:
    """The misses whose error range (noise_spread's rel_error_range) holds 0: the measured value lies among the
    reruns' predictions."""
    out = []
    for k, s, v in _failed(judge(rel, spread, num_repeats)):
        span = ranges.get(k) if s is None else (ranges.get(k) or {}).get(s)
        if span and span[0] <= 0 <= span[1]:
            out.append(_cell_name(k, s, v))
    return out
