"""The JSONL trace reader: tokenstep's own fields, and the names published request files give them.

Each line is one JSON object. Fields, by what they hold (the first name present wins; two names for one
quantity with different values raise TraceError):
- arrival time: arrival_s (kept as written, so a workload round-trips), or any name in TIME_FIELDS
  (rebased to the earliest row). A name that carries no unit (timestamp, arrival_time, time) needs
  time_unit (the CLI's --time-unit s|ms|ns); a string like '2023-11-16 18:15:46.68' is a date and time.
- prompt: prompt, messages or prompt_token_ids, or a length under any name in PROMPT_LENGTH_FIELDS.
- output length: max_tokens, or any name in OUTPUT_LENGTH_FIELDS.
- request_id and priority, optionally.
Fields it does not know are ignored; load_trace warns once, naming them with their line counts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sim.trace_rows import (
    _AZURE_TS,
    TraceError,
    _azure_time,
    _count,
    _json_lines,
    _Row,
    _seconds,
    quote,
)

TIME_UNITS = {"s": 1.0, "ms": 1e-3, "ns": 1e-9}
# name -> unit (None: the name does not say, so time_unit must)
TIME_FIELDS = {
    "arrival_s": "s", "arrival_time_s": "s", "arrived_at": "s", "timestamp_s": "s", "time_s": "s",
    "arrival_ms": "ms", "arrival_time_ms": "ms", "timestamp_ms": "ms", "time_ms": "ms",
    "arrival_ns": "ns", "arrival_time_ns": "ns", "timestamp_ns": "ns", "time_ns": "ns",
    "timestamp": None, "arrival_time": None, "time": None, "Timestamp": None, "TIMESTAMP": None,
}  # fmt: skip
PROMPT_LENGTH_FIELDS = (
    "num_prompt_tokens", "input_length", "input_len", "prompt_len", "prompt_length", "prompt_tokens",
    "input_tokens", "num_input_tokens", "num_prefill_tokens", "context_tokens", "ContextTokens",
    "request_tokens", "Request tokens",
)  # fmt: skip
OUTPUT_LENGTH_FIELDS = (
    "max_tokens", "output_length", "output_len", "max_new_tokens", "completion_tokens", "output_tokens",
    "num_output_tokens", "num_decode_tokens", "generated_tokens", "GeneratedTokens", "response_length",
    "response_tokens", "Response tokens",
)  # fmt: skip
OTHER_FIELDS = ("request_id", "priority", "prompt", "messages", "prompt_token_ids")
KNOWN_FIELDS = frozenset(TIME_FIELDS) | frozenset(PROMPT_LENGTH_FIELDS) | frozenset(OUTPUT_LENGTH_FIELDS) | frozenset(
    OTHER_FIELDS
)


def check_time_unit(time_unit: str | None) -> str | None:
    """time_unit if it is None or one of TIME_UNITS, else ValueError."""
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise ValueError(f"time_unit={time_unit!r} must be one of {', '.join(TIME_UNITS)}")
    return time_unit


def _first(path, line: int, obj: dict, names, agree: bool = True) -> str | None:
    """The first of names present in obj; with agree, TraceError if another one holds a different value."""
    present = [n for n in names if n in obj]
    for other in present[1:] if agree else ():
        if obj[other] != obj[present[0]]:
            raise TraceError(path, line, f"{quote(obj[other])} disagrees with {present[0]}={quote(obj[present[0]])}; "
                             "give one of them", other)  # fmt: skip
    return present[0] if present else None


def _missing(path, line: int, obj: dict, field: str, what: str, names) -> TraceError:
    """The error for a line that gives a quantity under none of its names."""
    ignored = sorted(k for k in obj if k not in KNOWN_FIELDS)
    hint = ""
    if ignored:
        names = ", ".join(map(repr, ignored[:5])) + (", ..." if len(ignored) > 5 else "")
        hint = f"; tokenstep does not read this line's {'field' if len(ignored) == 1 else 'fields'} {names}"
    return TraceError(path, line, f"missing field; give {what} as {', '.join(names[:4])}, ...{hint}", field)


def _arrival(path, line: int, obj: dict, time_unit: str | None) -> tuple[float, str]:
    """(seconds, field name) of the line's arrival time."""
    name = _first(path, line, obj, TIME_FIELDS, agree=False)  # names may differ in unit, so in value
    if name is None:
        raise _missing(path, line, obj, "arrival_s", "the arrival time", list(TIME_FIELDS))
    raw = obj[name]
    if isinstance(raw, str) and _AZURE_TS.fullmatch(raw.strip()):
        whole, frac = _azure_time(path, line, raw)
        return whole + frac, name
    unit = TIME_FIELDS[name] or time_unit
    if unit is None:
        raise TraceError(path, line, f"{name!r} does not say its unit; give --time-unit s, ms or ns "
                         "(time_unit= in load_trace)", name)  # fmt: skip
    t = _seconds(path, line, name, raw, TIME_UNITS[unit])
    if name == "arrival_s" and t < 0:
        raise TraceError(path, line, f"{t} is negative; expected seconds >= 0", name)
    return t, name


def _prompt(path, line: int, obj: dict, row: _Row) -> None:
    """Fill row's prompt: token ids, a length, text or messages."""
    if "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
            raise TraceError(path, line, "expected a non-empty list of token ids >= 0", "prompt_token_ids")
        row.token_ids = tuple(ids)
    length = _first(path, line, obj, PROMPT_LENGTH_FIELDS)
    if length is not None:
        if row.token_ids is not None:
            raise TraceError(path, line, f"give prompt_token_ids or {length}, not both", "prompt_token_ids")
        row.num_prompt_tokens = _count(path, line, length, obj[length])
    if "prompt" in obj and "messages" in obj:
        raise TraceError(path, line, "give prompt or messages, not both", "messages")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise TraceError(path, line, "expected a string", "prompt")
        row.prompt = obj["prompt"]
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise TraceError(path, line, "expected a list of objects with 'role' and 'content'", "messages")
        row.messages = tuple(msgs)
    if row.token_ids is None and row.num_prompt_tokens is None and row.prompt is None and row.messages is None:
        names = ["prompt", "messages", "prompt_token_ids", *PROMPT_LENGTH_FIELDS]
        raise _missing(path, line, obj, "prompt", "the prompt or its length", names)


def read_jsonl(path: Path, time_unit: str | None, ignored: Counter) -> tuple[list[_Row], bool]:
    """Rows of a JSONL trace, and whether their times need rebasing (given under a name other than
    arrival_s); fields it does not read are counted in ignored."""
    rows = []
    rebase = False
    for line, obj in _json_lines(path):
        ignored.update(k for k in obj if k not in KNOWN_FIELDS)
        t, time_name = _arrival(path, line, obj, time_unit)
        rebase = rebase or time_name != "arrival_s"
        out = _first(path, line, obj, OUTPUT_LENGTH_FIELDS)
        if out is None:
            raise _missing(path, line, obj, "max_tokens", "the output length", OUTPUT_LENGTH_FIELDS)
        row = _Row(line, t, None, _count(path, line, out, obj[out]))
        _prompt(path, line, obj, row)
        if "request_id" in obj:
            if not isinstance(obj["request_id"], str) or not obj["request_id"]:
                raise TraceError(path, line, "expected a non-empty string", "request_id")
            row.request_id = obj["request_id"]
        if "priority" in obj:
            if type(obj["priority"]) is not int:
                raise TraceError(path, line, f"{quote(obj['priority'])} is not an integer", "priority")
            row.priority = obj["priority"]
        rows.append(row)
    return rows, rebase


def describe_ignored(ignored: Counter, num_lines: int) -> str:
    """One line naming the ignored fields, most frequent first, with their line counts."""
    shown = ", ".join(f"{k!r} ({n} of {num_lines} lines)" for k, n in ignored.most_common(8))
    more = f" and {len(ignored) - 8} more" if len(ignored) > 8 else ""
    return f"ignored fields tokenstep does not read: {shown}{more}"
