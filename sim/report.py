"""Reports: a side-by-side terminal table of run summaries, and result files (JSON and CSV)."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import enum
import importlib.metadata
import json
import math
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sim.metrics import reason, request_latencies
from sim.records import STEP_FIELDS, RequestRecord, RunResult, write_steps_csv

# (label, key path, kind); kind picks the formatter. Rows of finish reasons and instance load are added per run set.
COUNT_ROWS = (
    ("requests finished", ("num_finished",), "int"),
    ("  stop / length", ("finish_reasons",), "stop_length"),
    ("requests rejected", ("num_rejected",), "int"),
)
# other ends a request can have: shown only when some run has one, each followed by its reasons
OTHER_ENDS = (
    ("requests aborted", "num_aborted", "aborted_reasons"),
    ("requests errored", "num_errors", "error_reasons"),
    ("requests unfinished", "num_unfinished", None),
)
ROWS = (
    ("throughput", ("throughput_rps",), "rps"),
    ("output tokens", ("output_tokens_per_s",), "tps"),
    ("TTFT mean", ("ttft_s", "mean"), "time"),
    ("TTFT p50", ("ttft_s", "p50"), "time"),
    ("TTFT p90", ("ttft_s", "p90"), "time"),
    ("TTFT p99", ("ttft_s", "p99"), "time"),
    ("TPOT mean", ("tpot_s", "mean"), "time"),
    ("TPOT p90", ("tpot_s", "p90"), "time"),
    ("TPOT p99", ("tpot_s", "p99"), "time"),
    ("E2E mean", ("e2e_s", "mean"), "time"),
    ("E2E p50", ("e2e_s", "p50"), "time"),
    ("E2E p90", ("e2e_s", "p90"), "time"),
    ("E2E p99", ("e2e_s", "p99"), "time"),
    ("queue p50", ("queue_s", "p50"), "time"),
    ("queue p90", ("queue_s", "p90"), "time"),
    ("preemptions", ("preemptions",), "int"),
    ("prefix hit rate", ("prefix_hit_rate",), "pct"),
    ("mean batch size", ("mean_batch_size",), "float"),
    ("KV usage max", ("max_kv_usage",), "pct"),
)
LOAD_ROWS = (
    ("requests by instance", ("instance_load",), "load:num_requests"),
    ("prompt tokens by instance", ("instance_load",), "load:num_prompt_tokens"),
    ("output tokens by instance", ("instance_load",), "load:num_output_tokens"),
    ("requests max / mean", ("instance_load",), "imbalance"),
)
GOODPUT_ROWS = (
    ("goodput", ("goodput_rps",), "rps"),
    ("SLO attainment", ("slo_attainment",), "pct"),
)
# Rows that get "x vs baseline" ratios.
RATIO_ROWS = ("throughput", "TTFT p50", "TTFT p90", "TTFT p99", "E2E p50", "E2E p90", "E2E p99")


def format_time(seconds: float | None) -> str:
    """Seconds as "12.3 ms" below one second, else "1.23 s"; "-" for None."""
    if seconds is None:
        return "-"
    if abs(seconds) < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_count(n: int) -> str:
    """A count exactly below 10,000, else in three digits and a suffix: 9876, 12.3k, 4.56M."""
    if abs(n) < 10_000:
        return str(int(n))
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def _format_load(load: dict, key: str) -> str:
    return " / ".join(format_count(load[i][key]) for i in sorted(load, key=int))


def _imbalance(load: dict) -> str:
    counts = [v["num_requests"] for v in load.values()]
    mean = sum(counts) / len(counts)
    return f"{max(counts) / mean:.2f}" if mean > 0 else "-"


def _format(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "stop_length":
        return f"{value.get('stop', 0)} / {value.get('length', 0)}"
    if kind.startswith("load:"):
        return _format_load(value, kind.removeprefix("load:"))
    if kind == "imbalance":
        return _imbalance(value)
    if kind == "time":
        return format_time(value)
    if kind == "int":
        return str(int(value))
    if kind == "count":
        return str(int(value))
    if kind == "rps":
        return f"{value:.2f} req/s"
    if kind == "tps":
        return f"{value:.1f} tok/s"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    return f"{value:.2f}"


def _get(summary: dict, path: tuple[str, ...]):
    value = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def format_ratio(ratio: float) -> str:
    """A ratio as "1.23x"; below 0.1 with two significant digits ("0.0031x"), so it never reads "0.00x"."""
    if ratio == 0:
        return "0x"
    if abs(ratio) >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x" if abs(ratio) >= 1e-4 else f"{ratio:.1e}x"


def _value(summary: dict, path: tuple[str, ...], kind: str):
    value = _get(summary, path)
    if value is None and kind == "count" and isinstance(summary.get(path[0]), dict):
        return 0  # this run has reasons, just none of this kind
    return value


def _ratio(value, base) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return format_ratio(value / base)


def _timing_note(summaries: list[dict], names: list[str]) -> str:
    timings = {s.get("ttft_timing", "computed") for s in summaries}
    words = {"computed": "when the first token is computed", "delivered": "when the first token reaches the client"}
    if len(timings) == 1:
        timing = timings.pop()
        return f"TTFT taken {words.get(timing, timing)}."
    parts = [f"{n}: {s.get('ttft_timing', 'computed')}" for n, s in zip(names, summaries, strict=True)]
    return "TTFT timing differs between runs (" + ", ".join(parts) + ")."


def _reason_rows(summaries: list[dict], key: str) -> list[tuple]:
    """One indented row per reason kind under key (rejected_reasons, ...), most common over all runs first."""
    totals: dict[str, int] = {}
    for s in summaries:
        for kind, n in (s.get(key) or {}).items():
            totals[kind] = totals.get(kind, 0) + n
    ranked = sorted(totals, key=lambda k: -totals[k])
    return [(f"  {kind}", (key, kind), "count") for kind in ranked]


def table_rows(summaries: list[dict]) -> list[tuple]:
    """The rows a table of these runs shows: counts with every finish reason, latencies, instance load, SLOs."""
    rows = list(COUNT_ROWS) + _reason_rows(summaries, "rejected_reasons")
    for label, count_key, reasons_key in OTHER_ENDS:
        if any(s.get(count_key) for s in summaries):
            rows.append((label, (count_key,), "int"))
            rows += _reason_rows(summaries, reasons_key) if reasons_key else []
    rows += ROWS
    if any(len(s.get("instance_load") or {}) > 1 for s in summaries):
        rows += LOAD_ROWS
    if any("goodput_rps" in s for s in summaries):
        rows += GOODPUT_ROWS
    return rows


def format_table(
    summaries: list[dict], title: str = "", columns: list[str] | None = None, baseline: int | None = None
) -> str:
    """A terminal table with one column per run; columns overrides the run names; baseline adds ratio columns."""
    names = list(columns) if columns is not None else [str(s.get("policy", f"run{i}")) for i, s in enumerate(summaries)]
    if len(names) != len(summaries):
        raise ValueError(f"columns has {len(names)} names for {len(summaries)} summaries; give one name per run")
    if baseline is not None and not 0 <= baseline < len(summaries):
        raise ValueError(f"baseline index {baseline} is out of range for {len(summaries)} runs")
    rows = table_rows(summaries)
    header = ["metric", *names]
    # ratios compare runs against the baseline; simulator predictions ("... (sim)") get none of their own
    others = ([i for i in range(len(summaries)) if i != baseline and not names[i].endswith("(sim)")]
              if baseline is not None else [])
    header += [f"{names[i]} x vs {names[baseline]}" for i in others]
    body = []
    for label, path, kind in rows:
        line = [label, *(_format(_value(s, path, kind), kind) for s in summaries)]
        for i in others:
            if label in RATIO_ROWS:
                line.append(_ratio(_get(summaries[i], path), _get(summaries[baseline], path)))
            else:
                line.append("")
        body.append(line)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return " | ".join([first, *rest]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    lines = [title] if title else []
    lines += [fmt(header), rule, *(fmt(r) for r in body), _timing_note(summaries, names)]
    return "\n".join(lines)


REJECTED_WARN_FRACTION = 0.01  # warn when more than 1 % of a run's requests are rejected
_REASON_HINTS = (
    ("max_model_len", "raise --max-model-len up to the model's context, or shorten prompts with --length-scale"),
    ("KV capacity", "raise --kv-blocks / --kv-tokens, or shorten prompts with --length-scale"),
)


def run_warnings(summaries: list[dict]) -> list[str]:
    """One line per run that rejected more than 1 % of its requests, or left some errored or unfinished."""
    lines = []
    for s in summaries:
        name, total = s.get("policy", "run"), s.get("num_requests") or 0
        rejected = s.get("num_rejected") or 0
        if total and rejected > REJECTED_WARN_FRACTION * total:
            reasons = s.get("rejected_reasons") or {}
            listed = "; ".join(f"{n} {kind}" for kind, n in reasons.items()) or "no reason given"
            hints = [hint for key, hint in _REASON_HINTS if any(key in kind for kind in reasons)]
            lines.append(f"warning: {name} rejected {rejected} of {total} requests ({100 * rejected / total:.1f} %): "
                         f"{listed}" + (f"; {hints[0]}" if hints else ""))
        if s.get("num_errors"):
            errors = "; ".join(f"{n} {kind}" for kind, n in (s.get("error_reasons") or {}).items())
            lines.append(f"warning: {name}: {s['num_errors']} of {total} requests failed in the backend: {errors}")
        if s.get("num_unfinished"):
            lines.append(f"warning: {name}: {s['num_unfinished']} of {total} requests never finished and have "
                         f"no finish reason")
    return lines


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of python and the packages a result depends on (llama_cpp only when installed)."""
    out = {"python": platform.python_version()}
    for dist in ("numpy", "simpy", "tokenstep"):
        out[dist] = _version(dist)
    llama = sys.modules.get("llama_cpp")
    llama_version = getattr(llama, "__version__", None) if llama is not None else None
    llama_version = llama_version or _version("llama-cpp-python") or _version("llama_cpp_python")
    if llama_version is not None:
        out["llama_cpp"] = llama_version
    return out


def safe_name(name: str) -> str:
    """A policy name usable in a file name (":" "," "=" and other unsafe characters become "_")."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "run"


def _plain(value):
    """Value converted to strict-JSON-friendly data (enums to values, non-finite floats to None)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return str(value)


def flatten(summary: dict, prefix: str = "") -> dict:
    """Nested summary keys joined with "_" (ttft_s.p50 -> ttft_s_p50)."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


_RECORD_COLUMNS = tuple(f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("token_times_s", "text"))
_LATENCY_COLUMNS = ("ttft_s", "tpot_s", "e2e_s", "queue_s")  # from request_latencies
REQUEST_COLUMNS = _RECORD_COLUMNS + _LATENCY_COLUMNS
STEP_COLUMNS = STEP_FIELDS


def _cell(value):
    return "" if value is None else value


def _write_csv(path: Path, columns: list[str] | tuple[str, ...], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


_REASON_AT = _RECORD_COLUMNS.index("finish_reason")


def _request_cells(record: RequestRecord) -> list:
    """One row of a requests CSV: the record's fields (its finish reason as a string) and its latencies."""
    cells = [getattr(record, name, None) for name in _RECORD_COLUMNS]
    cells[_REASON_AT] = reason(record)
    latencies = request_latencies(record)
    cells += [latencies[name] for name in _LATENCY_COLUMNS]
    return ["" if v is None else v for v in cells]


def _write_requests_csv(path: Path, records: list[RequestRecord]) -> Path:
    with path.open("w", newline="") as fh:  # rows as lists: through a DictWriter the same text takes twice as long
        writer = csv.writer(fh)
        writer.writerow(REQUEST_COLUMNS)
        writer.writerows(map(_request_cells, records))
    return path


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems of these run names, made safe and unique in order (a repeat gets _2, _3, ...)."""
    stems: list[str] = []
    for name in names:
        base = safe_name(name)
        stem, n = base, 2
        while stem in stems:
            stem, n = f"{base}_{n}", n + 1
        stems.append(stem)
    return stems


def write_run_files(out_dir, run: RunResult, stem: str) -> dict[str, Path]:
    """Write one run's requests_<stem>.csv and steps_<stem>.csv; return paths by file name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    path = _write_requests_csv(out / f"requests_{stem}.csv", run.records)
    paths[path.name] = path
    path = write_steps_csv(out / f"steps_{stem}.csv", run.steps)
    paths[path.name] = path
    return paths


def write_summary(out_dir, summaries: list[dict], config: dict) -> dict[str, Path]:
    """Write summary.json and summary.csv (the study-level files); return paths by file name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    doc = {
        "runs": _plain(summaries),
        "config": _plain(config),
        "versions": versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / "summary.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    paths[path.name] = path
    flat = [flatten(_plain(s)) for s in summaries]
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns]
    path = _write_csv(out / "summary.csv", columns, flat)
    paths[path.name] = path
    return paths


def write_results(out_dir, runs: list[RunResult], summaries: list[dict], config: dict) -> dict[str, Path]:
    """Write summary.json, summary.csv, requests_<policy>.csv and steps_<policy>.csv; return paths by file name."""
    if len(runs) != len(summaries):
        raise ValueError(f"got {len(runs)} runs but {len(summaries)} summaries; pass one summary per run")
    paths = write_summary(out_dir, summaries, config)
    for run, stem in zip(runs, unique_stems([r.policy for r in runs]), strict=True):
        paths.update(write_run_files(out_dir, run, stem))
    return paths
