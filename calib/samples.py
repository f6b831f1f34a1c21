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
def write_samples(cal: Calibration, path: str | os.PathLike) -> None:
    """A header line (meta, split), then one JSON line per step: shape, kind, scenario, seconds, held out or not."""
    with open(path, "w", encoding="utf-8") as fh:
        meta = {k: v for k, v in cal.meta.items() if k != "fit"}
        fh.write(json.dumps({"header": {"meta": meta, "split": cal.split}}) + "\n")
        for i, (plan, t, idle) in enumerate(cal.samples):
            row = {"scenario": cal.labels[i] if cal.labels else None, "kind": step_kind(plan, idle),
                   "held_out": cal.held_out[i], "measured_s": t, "after_idle": idle,
                   "repeats_s": cal.repeat_times[i] if cal.repeat_times else [t],
                   "chunks": [[c.slot, c.start_pos, len(c.token_ids), c.num_pad_tokens, int(c.sample),
                               int(c.is_decode)] for c in plan.chunks],
                   "removes": [[r.slot, r.start_pos] for r in plan.removes],
                   "copies": [[c.src_slot, c.dst_slot, c.num_tokens] for c in plan.copies]}
            fh.write(json.dumps(row) + "\n")


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
    copies = tuple(KVCopy(*c) for c in row["copies"])
    return StepPlan(0, 0.0, tuple(chunks), tuple(KVRemove(*r) for r in row["removes"]), copies, prefill, decode,
                    context, sum_sq, pad, sum(c.num_tokens for c in copies))


def read_samples(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, rows) of a samples file; each row gets its rebuilt "plan"."""
    header, rows = {}, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if "header" in row:
                header = row["header"]
                continue
            row["plan"] = plan_from_row(row)
            rows.append(row)
    if not rows:
        raise ValueError(f"samples file {str(path)!r} holds no measured step")
    return header, rows
