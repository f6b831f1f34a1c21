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
from pathlib import Path

import numpy as np

from sim.metrics import reason, request_latencies
from sim.records import RequestRecord, RunResult, StepSample

# (label, key path, kind); kind picks the formatter.
ROWS = (
    ("requests finished", ("num_finished",), "int"),
    ("requests rejected", ("num_rejected",), "int"),
    ("throughput", ("throughput_rps",), "rps"),
    ("output tokens", ("output_tokens_per_s",), "tps"),
    ("TTFT mean", ("ttft_s", "mean"), "time"),
    ("TTFT p50", ("ttft_s", "p50"), "time"),
    ("TTFT p99", ("ttft_s", "p99"), "time"),
    ("TPOT mean", ("tpot_s", "mean"), "time"),
    ("TPOT p99", ("tpot_s", "p99"), "time"),
    ("E2E mean", ("e2e_s", "mean"), "time"),
    ("E2E p50", ("e2e_s", "p50"), "time"),
    ("E2E p99", ("e2e_s", "p99"), "time"),
    ("queue p50", ("queue_s", "p50"), "time"),
    ("preemptions", ("preemptions",), "int"),
    ("prefix hit rate", ("prefix_hit_rate",), "pct"),
    ("mean batch size", ("mean_batch_size",), "float"),
    ("KV usage max", ("max_kv_usage",), "pct"),
)
GOODPUT_ROWS = (
    ("goodput", ("goodput_rps",), "rps"),
    ("SLO attainment", ("slo_attainment",), "pct"),
)
# Rows that get "x vs baseline" ratios.
RATIO_ROWS = ("throughput", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99")


def format_time(seconds: float | None) -> str:
    """Seconds as "12.3 ms" below one second, else "1.23 s"; "-" for None."""
    if seconds is None:
        return "-"
    if abs(seconds) < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _format(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "time":
        return format_time(value)
    if kind == "int":
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


def _ratio(value, base) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _timing_note(summaries: list[dict], names: list[str]) -> str:
    timings = {s.get("ttft_timing", "computed") for s in summaries}
    words = {"computed": "when the first token is computed", "delivered": "when the first token reaches the client"}
    if len(timings) == 1:
        timing = timings.pop()
        return f"TTFT taken {words.get(timing, timing)}."
    parts = [f"{n}: {s.get('ttft_timing', 'computed')}" for n, s in zip(names, summaries, strict=True)]
    return "TTFT timing differs between runs (" + ", ".join(parts) + ")."


def format_table(
    summaries: list[dict], title: str = "", columns: list[str] | None = None, baseline: int | None = None
) -> str:
    """A terminal table with one column per run; columns overrides the run names; baseline adds ratio columns."""
    names = list(columns) if columns is not None else [str(s.get("policy", f"run{i}")) for i, s in enumerate(summaries)]
    if len(names) != len(summaries):
        raise ValueError(f"columns has {len(names)} names for {len(summaries)} summaries; give one name per run")
    if baseline is not None and not 0 <= baseline < len(summaries):
        raise ValueError(f"baseline index {baseline} is out of range for {len(summaries)} runs")
    rows = list(ROWS)
    if any("goodput_rps" in s for s in summaries):
        rows += GOODPUT_ROWS
    header = ["metric", *names]
    # ratios compare runs against the baseline; simulator predictions ("... (sim)") get none of their own
    others = ([i for i in range(len(summaries)) if i != baseline and not names[i].endswith("(sim)")]
              if baseline is not None else [])
    header += [f"{names[i]} x vs {names[baseline]}" for i in others]
    body = []
    for label, path, kind in rows:
        line = [label, *(_format(_get(s, path), kind) for s in summaries)]
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


REQUEST_COLUMNS = tuple(f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("token_times_s", "text"))
REQUEST_COLUMNS += ("ttft_s", "tpot_s", "e2e_s", "queue_s")
STEP_COLUMNS = tuple(f.name for f in dataclasses.fields(StepSample))


def _cell(value):
    return "" if value is None else value


def _write_csv(path: Path, columns: list[str] | tuple[str, ...], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _request_row(record: RequestRecord) -> dict:
    row = {name: getattr(record, name) for name in REQUEST_COLUMNS if hasattr(record, name)}
    row["finish_reason"] = reason(record)
    row.update(request_latencies(record))
    return row


def _unique_stems(runs: list[RunResult]) -> list[str]:
    stems: list[str] = []
    for run in runs:
        base = safe_name(run.policy)
        stem, n = base, 2
        while stem in stems:
            stem, n = f"{base}_{n}", n + 1
        stems.append(stem)
    return stems


def write_results(out_dir, runs: list[RunResult], summaries: list[dict], config: dict) -> dict[str, Path]:
    """Write summary.json, summary.csv, requests_<policy>.csv and steps_<policy>.csv; return paths by file name."""
    if len(runs) != len(summaries):
        raise ValueError(f"got {len(runs)} runs but {len(summaries)} summaries; pass one summary per run")
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
    for run, stem in zip(runs, _unique_stems(runs), strict=True):
        path = _write_csv(out / f"requests_{stem}.csv", REQUEST_COLUMNS, [_request_row(r) for r in run.records])
        paths[path.name] = path
        steps = [dataclasses.asdict(s) for s in run.steps]
        path = _write_csv(out / f"steps_{stem}.csv", STEP_COLUMNS, steps)
        paths[path.name] = path
    return paths
