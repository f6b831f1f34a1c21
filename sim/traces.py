"""Trace readers (azure, vidur, mooncake, burstgpt, tokenstep jsonl) that return Workloads.

Per-format rules (also in FORMATS):
- azure, vidur, jsonl: a token count of 0 or less raises TraceError (the Azure
  2023 traces have none; vidur and our own format require >= 1).
- burstgpt: rows with 0 response tokens (failed requests in BurstGPT) or 0
  request tokens are skipped and counted in the description.
- mooncake: rows with output_length 0 are skipped and counted; input_length 0
  raises TraceError.
- Every format: rows out of time order are sorted stably by arrival time and
  the count appears in the description. Times are rebased to the earliest row,
  except jsonl, whose arrival_s are kept as written (so a workload round-trips).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from sim.data import data_path
from sim.prompt_arrays import PromptArrays
from sim.trace_jsonl import KNOWN_FIELDS, check_time_unit, describe_ignored, read_jsonl
from sim.trace_rows import (  # noqa: F401  (TraceError and _azure_time are this module's API too)
    TraceError,
    _azure_time,
    _count,
    _json_lines,
    _need,
    _Row,
    _seconds,
    one_line,
    quote,
)
from sim.workload import (
    HashedTokens,
    Workload,
    WorkloadRequest,
    check_scale,
    check_vocab_size,
    random_ids,
    request_id,
    scale_count,
    scale_ids,
)

MOONCAKE_BLOCK_TOKENS = 512


class TraceWarning(UserWarning):
    """Something in a trace was left out (fields tokenstep does not read); the message names it."""

FORMATS = {
    "azure": "CSV TIMESTAMP,ContextTokens,GeneratedTokens (Azure LLM inference 2023); zero counts raise",
    "vidur": "CSV arrived_at,num_prefill_tokens,num_decode_tokens (seconds); zero counts raise",
    "mooncake": "JSONL timestamp (ms), input_length, output_length, hash_ids; output 0 skipped+counted",
    "burstgpt": "CSV Timestamp, Request tokens, Response tokens[, Model, Log Type]; 0 tokens skipped+counted",
    "jsonl": "JSONL: arrival_s (or timestamp, arrival_time, ... with --time-unit), max_tokens (or output_length, "
             "output_len, ...), prompt|messages|prompt_token_ids|num_prompt_tokens (or input_length, prompt_len, "
             "...); other fields ignored with a warning",
}
_CSV_COLUMNS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "vidur": ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}
def _csv_rows(path: Path, fmt: str):
    """Yield (line, row dict) under the header, raising TraceError for a missing column or ragged row."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(path, 1, f"file is empty; expected a {fmt} header: {FORMATS[fmt]}")
        header = [h.strip() for h in header]
        for col in _CSV_COLUMNS[fmt]:
            if col not in header:
                shown = ", ".join(quote(h, 30) for h in header[:6]) + (", ..." if len(header) > 6 else "")
                hint = (" (the file holds JSON lines: give --trace-format jsonl or mooncake, or none to detect it)"
                        if header[0].startswith("{") else "")  # fmt: skip
                raise TraceError(path, 1, f"missing column; the header has {len(header)} columns: {shown}{hint}", col)
        for fields in reader:
            if not fields or not any(s.strip() for s in fields):
                continue
            if len(fields) != len(header):
                raise TraceError(path, reader.line_num, f"{len(fields)} fields, expected {len(header)}")
            yield reader.line_num, dict(zip(header, fields, strict=True))


def _read_csv(path: Path, fmt: str, skipped: Counter, models: Counter) -> list[_Row]:
    """Rows of an azure, vidur or burstgpt CSV."""
    time_col, prompt_col, output_col = _CSV_COLUMNS[fmt]
    rows, base = [], None
    zero_ok = fmt == "burstgpt"
    for line, rec in _csv_rows(path, fmt):
        if fmt == "azure":
            whole, frac = _azure_time(path, line, rec[time_col])
            base = whole if base is None else base
            t = (whole - base) + frac
        else:
            t = _seconds(path, line, time_col, rec[time_col])
        prompt = _count(path, line, prompt_col, rec[prompt_col], zero_ok)
        output = _count(path, line, output_col, rec[output_col], zero_ok)
        if output == 0:
            skipped["0 response tokens (failed request in BurstGPT)"] += 1
        elif prompt == 0:
            skipped["0 request tokens"] += 1
        else:
            rows.append(_Row(line, t, prompt, output))
            if fmt == "burstgpt" and "Model" in rec:
                models[rec["Model"].strip()] += 1
    return rows


def _read_mooncake(path: Path, skipped: Counter, models: Counter) -> list[_Row]:
    """Rows of a Mooncake JSONL trace, with their prefix hash ids."""
    rows = []
    for line, obj in _json_lines(path):
        t = _seconds(path, line, "timestamp", _need(path, line, obj, "timestamp"), 1e-3)
        n_in = _count(path, line, "input_length", _need(path, line, obj, "input_length"))
        n_out = _count(path, line, "output_length", _need(path, line, obj, "output_length"), zero_ok=True)
        hashes = _need(path, line, obj, "hash_ids")
        want = -(-n_in // MOONCAKE_BLOCK_TOKENS)
        if not isinstance(hashes, list) or len(hashes) != want:
            raise TraceError(path, line, f"expected a list of ceil(input_length/512) = {want} ids", "hash_ids")
        for h in hashes:
            _count(path, line, "hash_ids", h, zero_ok=True)
        if n_out == 0:
            skipped["output_length 0"] += 1
        else:
            rows.append(_Row(line, t, n_in, n_out, hash_ids=hashes))
    return rows


def detect_format(path: str | Path) -> str:
    """Name of the trace format of path, from its header line or first JSON object's keys."""
    path = Path(path)
    first = ""
    with path.open(encoding="utf-8-sig") as f:
        for first in f:
            if first.strip():
                break
    first = first.strip()
    listing = f"{', '.join(FORMATS)} (tokenstep --help lists their fields)"
    if not first:
        raise TraceError(path, 1, f"file is empty; known formats: {listing}")
    if first.startswith("{"):
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            raise TraceError(path, 1, "bad JSON in the first object") from None
        if "hash_ids" in keys:
            return "mooncake"
        if keys & KNOWN_FIELDS:
            return "jsonl"
    else:
        header = {h.strip() for h in next(csv.reader([first]))}
        for fmt, cols in _CSV_COLUMNS.items():
            if set(cols) <= header:
                return fmt
    raise TraceError(path, 1, f"unknown trace format (first line {quote(first, 80)}); known formats: {listing}")


def _build(path, rows: list[_Row], rng, length_scale: float, vocab_size: int) -> list[WorkloadRequest]:
    """Requests from selected rows: ids assigned in arrival order, lengths scaled, token ids made.

    Prompts the trace gives by length or by block hashes are kept compactly (sim.workload.CompactTokens):
    views of one array of seeded random ids (sim.prompt_arrays.PromptArrays), or the hash ids themselves.
    """
    plain = [r for r in rows if r.token_ids is None and r.hash_ids is None and r.num_prompt_tokens]
    lengths = np.array([scale_count(r.num_prompt_tokens, length_scale) for r in plain], dtype=np.int64)
    prompts = PromptArrays(random_ids(rng, int(lengths.sum()), vocab_size), lengths.tolist())
    made = {id(r): prompts.prompt(i) for i, r in enumerate(plain)}
    block = scale_count(MOONCAKE_BLOCK_TOKENS, length_scale)
    out: list[WorkloadRequest] = []
    seen: set[str] = set()
    for r in rows:
        if (r.prompt is not None or r.messages is not None) and length_scale != 1.0:
            raise TraceError(path, r.line, f"a text prompt cannot be scaled by length_scale={length_scale}")
        if r.hash_ids is not None:
            ids = HashedTokens(r.hash_ids, scale_count(r.num_prompt_tokens, length_scale), block, vocab_size)
        elif r.token_ids is not None:
            ids = scale_ids(r.token_ids, length_scale) if length_scale != 1.0 else r.token_ids
        else:
            ids = made.get(id(r), ())
        rid = r.request_id or request_id(len(out))
        if rid in seen:
            raise TraceError(path, r.line, f"{rid!r} is already the id of another request", "request_id")
        seen.add(rid)
        out.append(WorkloadRequest(rid, r.arrival_s, ids, scale_count(r.max_tokens, length_scale),
                                   r.priority, r.prompt, r.messages))  # fmt: skip
    return out


_READERS = {
    "azure": lambda p, s, m: _read_csv(p, "azure", s, m),
    "vidur": lambda p, s, m: _read_csv(p, "vidur", s, m),
    "burstgpt": lambda p, s, m: _read_csv(p, "burstgpt", s, m),
    "mooncake": _read_mooncake,
    "jsonl": None,  # read_jsonl takes the time unit and reports ignored fields
}


def _repeat(rows: list[_Row], repeat: int) -> list[_Row]:
    """The sorted rows followed by repeat - 1 copies, copy k shifted by k periods (span + mean gap).

    Copy k's block hash ids are shifted past every id of the copies before it, so the copies share no
    prefix; its request ids (when the trace names them) get the suffix "-k". Length-only rows get their
    own random ids anyway; token ids and text are copied as they are.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat={repeat!r} must be an int >= 1 (1 reads the trace once)")
    if repeat == 1 or not rows:
        return rows
    span = rows[-1].arrival_s - rows[0].arrival_s
    period = span * len(rows) / (len(rows) - 1) if len(rows) > 1 else 0.0
    num_ids = 1 + max((max(r.hash_ids, default=-1) for r in rows if r.hash_ids is not None), default=-1)
    out = list(rows)
    for k in range(1, repeat):
        for r in rows:
            out.append(replace(r, arrival_s=r.arrival_s + k * period,
                               hash_ids=[h + k * num_ids for h in r.hash_ids] if r.hash_ids is not None else None,
                               request_id=f"{r.request_id}-{k}" if r.request_id else None))  # fmt: skip
    return out


def _select(rows: list[_Row], rebase: bool, window_s, sample, limit, rng, repeat=1) -> tuple[list[_Row], int, list]:
    """Sort stably, rebase, repeat, then apply window, sample and limit in that order; also return notes."""
    late = sum(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(rows))
    rows = sorted(rows, key=lambda r: r.arrival_s)  # stable: equal times keep file order
    if rebase and rows:
        t0 = rows[0].arrival_s
        for r in rows:
            r.arrival_s -= t0
    notes = []
    rows = _repeat(rows, repeat)
    if repeat > 1:
        notes.append(f"repeated {repeat} times, each copy one span plus one mean gap after the one before")
    if window_s is not None:
        start, end = (float(x) for x in window_s)
        if not (math.isfinite(start) and start >= 0 and end > start):
            raise ValueError(f"window_s={window_s!r} must be (start, end) seconds with 0 <= start < end")
        rows = [r for r in rows if start <= r.arrival_s < end]
        for r in rows:
            r.arrival_s -= start
        notes.append(f"window [{start:g}, {end:g}) s of trace time, rebased to its start")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
            raise ValueError(f"sample={sample!r} must be a fraction in (0, 1]")
        keep = rng.random(len(rows)) < sample
        rows = [r for r, k in zip(rows, keep.tolist(), strict=True) if k]
        notes.append(f"each row kept with probability {sample:g}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r} must be an int >= 1 (None reads every row)")
        notes.append(f"first {limit} rows kept" if len(rows) > limit else f"limit {limit} not reached")
        rows = rows[:limit]
    return rows, late, notes


def load_trace(
    path: str | Path,
    fmt: str | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    window_s: tuple[float, float] | None = None,
    limit: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    vocab_size: int = 32000,
    repeat: int = 1,
    time_unit: str | None = None,
) -> Workload:
    """Read a trace into a Workload (see the module docstring for zero counts, ordering and rebasing).

    window_s selects [start, end) seconds of trace time (before time_scale) and
    rebases to start; sample keeps each row with that probability (seeded);
    limit keeps the first rows after both. repeat plays the trace that many times back to back
    (before window, sample and limit; see _repeat). time_scale multiplies arrival times
    (2.0 = twice as slow); length_scale multiplies prompt and output lengths
    (rounded half up, at least 1 token). Token ids for length-only rows are
    seeded random; mooncake blocks derive from their hash ids. time_unit ('s', 'ms' or 'ns') is the
    unit of a JSONL time field whose name gives none (see sim.trace_jsonl). Fields a JSONL trace has
    and tokenstep does not read raise one TraceWarning naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist or is not a file")
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    time_scale = check_scale("time_scale", time_scale)
    length_scale = check_scale("length_scale", length_scale)
    check_vocab_size(vocab_size)
    if check_time_unit(time_unit) is not None and fmt != "jsonl":
        raise ValueError(f"--time-unit (time_unit) applies to JSONL traces; the {fmt} format fixes its own time unit "
                         "(tokenstep --help lists the formats); leave it out")
    skipped: Counter = Counter()
    models: Counter = Counter()
    ignored: Counter = Counter()
    if fmt == "jsonl":
        rows, rebase = read_jsonl(path, time_unit, ignored)
    else:
        rows, rebase = _READERS[fmt](path, skipped, models), True
    num_read = len(rows) + sum(skipped.values())
    if num_read == 0:
        raise TraceError(path, 2, "no data rows; the file holds only a header or blank lines")
    if ignored:
        warnings.warn(TraceWarning(one_line(f"{path}: {describe_ignored(ignored, num_read)}")), stacklevel=2)
    rng = np.random.default_rng(seed)
    rows, late, notes = _select(rows, rebase, window_s, sample, limit, rng, repeat)
    for r in rows:
        r.arrival_s *= time_scale
    requests = tuple(_build(path, rows, rng, length_scale, vocab_size))
    skip_text = ", ".join(f"{n} with {why}" for why, n in sorted(skipped.items()))
    skip_text = f"{sum(skipped.values())} skipped ({skip_text})" if skipped else "none skipped"
    parts = [f"{fmt} trace {path}: {num_read} rows read, {skip_text}"]
    if late:
        parts.append(f"{late} rows out of time order, sorted stably by arrival")
    if models:
        parts.append("models " + ", ".join(f"{k} x{v}" for k, v in models.most_common()))
    parts += notes
    if ignored:
        parts.append("ignored fields " + ", ".join(sorted(ignored)))
    span = requests[-1].arrival_s if requests else 0.0
    parts.append(f"{len(requests)} requests over {span:.1f} s")
    parts.append(f"time_scale={time_scale:g}, length_scale={length_scale:g}, seed {seed}")
    source = {"kind": "trace", "path": str(path), "fmt": fmt, "time_scale": time_scale,
              "length_scale": length_scale, "window_s": list(window_s) if window_s else None,
              "limit": limit, "sample": sample, "seed": seed, "vocab_size": vocab_size}  # fmt: skip
    if repeat != 1:
        source["repeat"] = repeat
    if time_unit is not None:
        source["time_unit"] = time_unit
    return Workload(requests, "; ".join(parts), source)


DEFAULT_TRACE = "azure_conv_slice.csv"
DEFAULT_CREDIT = (
    "first 200 rows of the Azure LLM inference trace 2023 (conversation), CC-BY-4.0, "
    'Patel et al., "Splitwise", ISCA 2024'
)


def default_workload(time_scale: float = 1.0, length_scale: float = 1.0, limit: int | None = None) -> Workload:
    """The bundled default workload: sim/data/azure_conv_slice.csv, scaled and limited as asked."""
    w = load_trace(data_path(DEFAULT_TRACE), "azure", time_scale, length_scale, limit=limit)
    desc = w.description.replace(str(data_path(DEFAULT_TRACE)), f"sim/data/{DEFAULT_TRACE}")
    source = {"kind": "default", "time_scale": time_scale, "length_scale": length_scale, "limit": limit}
    return Workload(w.requests, f"default workload ({DEFAULT_CREDIT}); {desc}", source)
