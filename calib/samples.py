"""Calibration sample files (JSON lines): one header with the profile's meta, then one row per measured step."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from calib.measure import step_kind
from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan

if TYPE_CHECKING:
    from calib.calibrate import Calibration


# -- the measured steps as a file (for audits, re-fits and tests) -------------------------
def step_row(plan, seconds: float, after_idle: bool, scenario: str | None, held_out: bool,
             repeats_s: list[float] | None = None, **extra) -> dict:
    """One measured step as a samples file's JSON row: its shape, kind, scenario and seconds."""
    return {"scenario": scenario, "kind": step_kind(plan, after_idle), "held_out": held_out, "measured_s": seconds,
            "after_idle": after_idle, "repeats_s": repeats_s if repeats_s is not None else [seconds],
            "chunks": [[c.slot, c.start_pos, len(c.token_ids), c.num_pad_tokens, int(c.sample), int(c.is_decode)]
                       for c in plan.chunks],
            "removes": [[r.slot, r.start_pos] for r in plan.removes],
            "copies": [[c.src_slot, c.dst_slot, c.num_tokens, int(c.move)] for c in plan.copies], **extra}


def write_samples(cal: Calibration, path: str | os.PathLike) -> None:
    """A header line (meta, split), then one JSON line per step: shape, kind, scenario, seconds, held out or not."""
    with open(path, "w", encoding="utf-8") as fh:
        meta = {k: v for k, v in cal.meta.items() if k != "fit"}
        fh.write(json.dumps({"header": {"meta": meta, "split": cal.split}}) + "\n")
        for i, (plan, t, idle) in enumerate(cal.samples):
            fh.write(json.dumps(step_row(plan, t, idle, cal.labels[i] if cal.labels else None, cal.held_out[i],
                                         cal.repeat_times[i] if cal.repeat_times else None)) + "\n")


def write_serving_samples(path: str | os.PathLike, meta: dict, split: dict, runs: list) -> int:
    """Real-time serving steps (validate --samples) as a samples file that calibrate --refit can add to a grid's.

    runs: (label, samples, idle_s) per real run, samples as calib.measure.TimedBackend keeps them (plan,
    seconds with the driver's work, of which driver, after idle). The header says "source": "serving"; each row
    keeps its driver seconds ("driver_s") and idle wait ("idle_s"). Returns the number of steps written."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"header": {"source": "serving", "meta": meta, "split": split}}) + "\n")
        for label, samples, idle_s in runs:
            for (plan, t, gap, idle), wait in zip(samples, idle_s or [None] * len(samples), strict=True):
                if plan.chunks:
                    fh.write(json.dumps(step_row(plan, t, bool(idle), label, False, driver_s=gap, idle_s=wait)) + "\n")
                    n += 1
    return n


def plan_from_row(row: dict) -> StepPlan:
    """A StepPlan with the recorded shape (token ids are placeholders) and the scheduler's counters."""
    chunks, prefill, decode, context, sum_sq, pad = [], 0, 0, 0, 0, 0
    for i, (slot, start, n, pads, sample, is_decode) in enumerate(row["chunks"]):
        chunks.append(ScheduledChunk(f"r{i}", slot, start, (10,) * n, bool(sample), pads, bool(is_decode)))
        pad += pads
        if is_decode:
            decode, context = decode + 1, context + start + 1
        elif n:
            prefill, context, sum_sq = prefill + n, context + start + n, sum_sq + n * (start + n)
    copies = tuple(KVCopy(*c[:3], bool(c[3]) if len(c) > 3 else False) for c in row["copies"])  # older: no move
    return StepPlan(0, 0.0, tuple(chunks), tuple(KVRemove(*r) for r in row["removes"]), copies, prefill, decode,
                    context, sum_sq, pad, sum(c.num_tokens for c in copies))


def read_samples(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, rows) of a samples file; each row gets its rebuilt "plan". A line that is not a samples row is a
    ValueError naming the file and line."""
    header, rows = {}, []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read samples file {str(path)!r}: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "header" in row:
                    header = row["header"]
                    continue
                row["plan"] = plan_from_row(row)
                float(row["measured_s"])
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"samples file {str(path)!r} line {lineno}: not a measured step ({exc!r}); write "
                                 "samples with `tokenstep calibrate --samples` or `validate --samples`") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"samples file {str(path)!r} holds no measured step")
    return header, rows
