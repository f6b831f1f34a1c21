"""What every trace reader shares: the error it raises, the row it makes, and field parsers."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

_AZURE_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")
_EPOCH = dt.datetime(1970, 1, 1)


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, line and field."""

    def __init__(self, path, line: int, message: str, field: str | None = None):
        where = f"{path} line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {one_line(message)}")
        self.path, self.line, self.field = str(path), line, field


MAX_MESSAGE_CHARS = 400


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """text on one line (whitespace runs collapsed), cut to limit characters with a mark where it was cut:
    a message quotes the file, whose lines can be megabytes long."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 25]} ... ({len(text) - limit + 25} chars cut)"


def quote(value, limit: int = 60) -> str:
    """repr of a value from a file, cut to limit characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


@dataclass(slots=True)
class _Row:
    """One request as a reader found it, before selection, scaling and token ids."""

    line: int
    arrival_s: float
    num_prompt_tokens: int | None
    max_tokens: int
    token_ids: tuple | None = None
    hash_ids: list | None = None
    prompt: str | None = None
    messages: tuple | None = None
    request_id: str | None = None
    priority: int = 0


def _count(path, line, field, raw, zero_ok: bool = False) -> int:
    """Parse a token count, raising TraceError naming the line and field."""
    try:
        x = float(raw) if isinstance(raw, str) else raw
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer()
    except ValueError:
        ok = False
    if not ok:
        raise TraceError(path, line, f"{quote(raw)} is not an integer; expected a non-negative token count", field)
    if x < 0 or (x == 0 and not zero_ok):
        need = "a non-negative" if zero_ok else "a positive (>= 1)"
        raise TraceError(path, line, f"{quote(raw)} is not allowed; expected {need} token count", field)
    return int(x)


def _seconds(path, line, field, raw, scale: float = 1.0) -> float:
    """Parse a finite number of seconds (raw * scale), raising TraceError naming the line and field."""
    try:
        x = float(raw) * scale if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise TraceError(path, line, f"{quote(raw)} is not a number; expected a time in seconds", field)
    return x


def _azure_time(path, line, raw: str) -> tuple[int, float]:
    """Whole and fractional seconds since 1970 of '2023-11-16 18:15:46.6805900' (fromisoformat takes 6 digits)."""
    m = _AZURE_TS.fullmatch(raw.strip())
    try:
        whole = dt.datetime(*map(int, m.groups()[:6])) if m else None
    except ValueError:
        whole = None
    if whole is None:
        raise TraceError(path, line, f"{quote(raw)} is not a timestamp like '2023-11-16 18:15:46.6805900'", "TIMESTAMP")
    frac = m.group(7) or "0"
    # kept apart: a float of 1.7e9 s plus 7 decimals would lose the last ones
    return (whole - _EPOCH) // dt.timedelta(seconds=1), int(frac) / 10 ** len(frac)


def _json_lines(path: Path):
    """Yield (line, object) per non-blank line, raising TraceError for bad JSON or an empty file."""
    found = False
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            text = text.rstrip("\r\n")  # else a line cut short fails at "line 2, column 1" of its own text
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                column = exc.pos + 1
                cut = "; the line ends there: was it cut short?" if exc.pos >= len(text.rstrip()) else ""
                raise TraceError(path, line, f"bad JSON ({exc.msg} at column {column}{cut})") from None
            if not isinstance(obj, dict):
                raise TraceError(path, line, f"expected a JSON object, got {type(obj).__name__}")
            found = True
            yield line, obj
    if not found:
        raise TraceError(path, 1, "file is empty; expected one JSON object per line")


def _need(path, line, obj: dict, key: str):
    """obj[key], or TraceError naming the missing field."""
    if key not in obj:
        raise TraceError(path, line, "missing field", key)
    return obj[key]


