"""What a run records: one record per request and one sample per step (kept as columns: see StepLog)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """Timeline of one request in one run (seconds on the run's clock)."""

    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    instance: int = 0
    priority: int = 0
    first_scheduled_s: float | None = None  # first admission into a batch
    first_token_s: float | None = None  # first output token computed (end of its step)
    finish_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    finish_reason: str | None = None
    detail: str | None = None
    text: str | None = None  # real backend only


@dataclass(slots=True)  # not frozen: a frozen init costs 6x, and a replay makes 300k of these
class StepSample:
    """State of one instance right after one step."""

    instance: int
    start_s: float
    end_s: float
    num_seqs: int  # chunks in the batch
    num_prefill_tokens: int
    num_decode_seqs: int
    num_waiting: int
    num_running: int
    kv_used_blocks: int
    kv_total_blocks: int
    num_pad_tokens: int = 0
    num_copied_tokens: int = 0


STEP_FIELDS = tuple(f.name for f in fields(StepSample))
_FLOAT_FIELDS = frozenset(name for name in STEP_FIELDS if name.endswith("_s"))
_CHUNK = 1 << 13  # samples held as tuples before they are folded into the columns
_ROW = operator.attrgetter(*STEP_FIELDS)  # a StepSample's values as a tuple, in STEP_FIELDS order


class StepLog:
    """Step samples as one numpy column per StepSample field: a replay records ~300k steps, which as
    objects (and as dicts on the way to CSV) cost hundreds of MB and seconds; as columns, 100 bytes each.

    It reads like a list of StepSample (len, iteration, indexing, equality with a list) for code that wants
    objects; columns() gives the arrays for code that does not.
    """

    __slots__ = ("_buffer", "_parts")

    def __init__(self, samples: Iterable[StepSample] = ()) -> None:
        self._buffer: list[tuple] = []  # rows of STEP_FIELDS values not yet folded
        self._parts: list[dict[str, np.ndarray]] = []
        for s in samples:
            self.append(s)

    def append(self, sample: StepSample) -> None:
        """Record one step."""
        self.add_row(_ROW(sample))

    def add_row(self, row: tuple) -> None:
        """Record one step given as its STEP_FIELDS values in order, every one of them (the simulator's
        way: no StepSample is made)."""
        buffer = self._buffer
        buffer.append(row)
        if len(buffer) >= _CHUNK:
            self._fold()

    def _fold(self) -> None:
        if self._buffer:
            self._parts.append(_rows_to_columns(self._buffer))
            self._buffer = []

    def columns(self) -> dict[str, np.ndarray]:
        """Every field as an array (float64 for times, int32 or int64 for counts), in recording order."""
        self._fold()
        if len(self._parts) > 1:
            self._parts = [{k: np.concatenate([p[k] for p in self._parts]) for k in STEP_FIELDS}]
        return self._parts[0] if self._parts else _to_columns([])

    def __len__(self) -> int:
        return sum(len(p["instance"]) for p in self._parts) + len(self._buffer)

    def __iter__(self) -> Iterator[StepSample]:
        cols = self.columns()
        rows = zip(*(cols[k].tolist() for k in STEP_FIELDS), strict=True)
        return (StepSample(*row) for row in rows)

    def __getitem__(self, index):
        cols = self.columns()
        if isinstance(index, slice):
            return list(self)[index]
        return StepSample(*(cols[k][index].item() for k in STEP_FIELDS))

    def __eq__(self, other) -> bool:
        if isinstance(other, (StepLog, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # mutable, like a list

    def __repr__(self) -> str:
        return f"StepLog({len(self)} steps)"


def _to_columns(samples: list[StepSample]) -> dict[str, np.ndarray]:
    return _rows_to_columns(list(map(_ROW, samples)))


def _rows_to_columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    # one float64 table holds every field exactly: times are floats, counts are far below 2**53
    table = np.array(rows, dtype=np.float64)
    table = table.reshape(len(rows), len(STEP_FIELDS))
    return {name: table[:, i].copy() if name in _FLOAT_FIELDS else _counts(table[:, i])
            for i, name in enumerate(STEP_FIELDS)}


def _counts(values: np.ndarray) -> np.ndarray:
    """Counts as int32 (half the memory of int64), or int64 should one ever not fit."""
    fits = not len(values) or np.iinfo(np.int32).min <= values.min() and values.max() <= np.iinfo(np.int32).max
    return values.astype(np.int32 if fits else np.int64)


def step_columns(steps: StepLog | Iterable[StepSample]) -> dict[str, np.ndarray]:
    """The columns of a StepLog, or of any list of StepSample."""
    return steps.columns() if isinstance(steps, StepLog) else _to_columns(list(steps))


def write_steps_csv(path: str | Path, steps: StepLog | Iterable[StepSample]) -> Path:
    """Write one CSV row per step (header: STEP_FIELDS), formatted as csv.writer formats the values.

    Written a chunk of rows at a time, each row by one format string (float repr is most of the cost: a
    step's start_s, most often the end_s of the step before it, reuses that float's text).
    """
    cols = step_columns(steps)
    path = Path(path)
    with path.open("w", newline="") as fh:
        fh.write(",".join(STEP_FIELDS) + "\r\n")
        last_end: tuple[float | None, str] = (None, "")
        for start in range(0, len(cols["instance"]), _CHUNK):
            part = {name: col[start : start + _CHUNK] for name, col in cols.items()}
            texts, last_end = _time_texts(part, last_end)
            row, columns = _row_format(part, texts)
            fh.write("".join(row % values for values in zip(*columns, strict=True)))
    return path


def _time_texts(part: dict[str, np.ndarray], last_end: tuple[float | None, str]
                ) -> tuple[dict[str, list[str]], tuple[float, str]]:
    """The texts (repr) of a chunk's start_s and end_s, given the (end_s, text) of the step before it; also
    the chunk's last (end_s, text)."""
    ends = part["end_s"].tolist()
    end_texts = list(map(repr, ends))  # repr of a float and str of an int: what csv.writer writes
    before = [last_end, *zip(ends[:-1], end_texts[:-1], strict=True)]  # each row's step before
    start_texts = [text if s == e and s != 0 else repr(s)  # (0.0 == -0.0, but their texts differ)
                   for s, (e, text) in zip(part["start_s"].tolist(), before, strict=True)]
    return {"start_s": start_texts, "end_s": end_texts}, (ends[-1], end_texts[-1])


def _row_format(part: dict[str, np.ndarray], texts: dict[str, list[str]]) -> tuple[str, list[list]]:
    """A format string for a chunk's rows and the columns of values it takes: texts as they are, a count that
    is the same in every row written into the string itself."""
    formats, columns = [], []
    for name in STEP_FIELDS:
        col = part[name]
        if name in texts:
            formats.append("%s")
            columns.append(texts[name])
        elif name in _FLOAT_FIELDS:
            formats.append("%r")
            columns.append(col.tolist())
        elif col.min() == col.max():
            formats.append(str(int(col[0])))
        else:
            formats.append("%d")
            columns.append(col.tolist())
    return ",".join(formats) + "\r\n", columns


@dataclass(slots=True)
class RunResult:
    """Everything one run produced, with the configuration that produced it."""

    policy: str
    records: list[RequestRecord]
    steps: StepLog | list[StepSample]  # the simulator records a StepLog
    duration_s: float
    config: dict = field(default_factory=dict)
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    ttft_timing: str = "computed"  # "computed": end of the step that sampled it; "delivered": seen by the client
