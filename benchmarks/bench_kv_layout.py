"""KV layout: decode step time with one KV stream shared by all slots (kv_unified) vs a stream per slot.

    python benchmarks/bench_kv_layout.py [--repeats 3] [--steps 10] [--json]

Both contexts are built in this process over one loaded model (gemma-3-270m by default), 2 threads,
n_ctx 8192, 16 slots, and run the same decode steps through LlamaCppBackend: a 40-token prompt in each
listed slot, then `--steps` decode steps of every slot at once, timed; median over all repeats. The
slot sets are the layouts continuous batching produces: consecutive slots (a fresh batch) and
fragmented ones (requests finished at different times). Further rows fill 8 other slots with cached
tokens first: with one stream, attention spans the cells in use (KV occupancy), which a mixed step
(7 decodes plus a 128-token prompt chunk) feels most.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from scheduler.messages import ScheduledChunk, StepPlan  # noqa: E402

LAYOUTS = {"B=1": [0], "B=8 consecutive": list(range(8)), "B=8 every other slot": list(range(0, 16, 2)),
           "B=4 scattered": [1, 5, 9, 14], "B=16": list(range(16))}
FILLS = (0, 200, 450)  # tokens cached in each of slots 8-15 before the B=1 and B=8 decodes


def fill_others(backend, fill: int, rng) -> None:
    """Empty the KV cache, then prefill `fill` tokens in each of slots 8-15 (200 at a time)."""
    backend.clear_kv()
    for s in range(8, 16) if fill else ():
        for off in range(0, fill, 200):
            n = min(200, fill - off)
            chunk = ScheduledChunk(f"f{s}", s, off, tuple(rng.integers(10, 32000, n).tolist()), False)
            backend.step(StepPlan(0, 0.0, (chunk,), num_prefill_tokens=n))


def decode_times(backend, slots: list[int], steps: int, repeats: int, fill: int, rng) -> float:
    """Median seconds of a decode step over `slots` (after a 40-token prompt in each)."""
    times = []
    for _ in range(repeats):
        fill_others(backend, fill, rng)
        prompts = tuple(ScheduledChunk(f"r{s}", s, 0, tuple(rng.integers(10, 32000, 40).tolist()), True)
                        for s in slots)
        backend.step(StepPlan(0, 0.0, prompts, num_prefill_tokens=40 * len(slots)))
        for k in range(steps):
            chunks = tuple(ScheduledChunk(f"r{s}", s, 40 + k, (int(rng.integers(10, 32000)),), True, 0, True)
                           for s in slots)
            t0 = time.perf_counter()
            backend.step(StepPlan(k + 1, 0.0, chunks, num_decode_seqs=len(slots)))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mixed_times(backend, repeats: int, fill: int, rng) -> float:
    """Median seconds of a mixed step: 7 decodes (slots 0-6) plus a 128-token prompt chunk in slot 7."""
    times = []
    for _ in range(repeats):
        fill_others(backend, fill, rng)
        prompts = tuple(ScheduledChunk(f"r{s}", s, 0, tuple(rng.integers(10, 32000, 40).tolist()), True)
                        for s in range(7))
        backend.step(StepPlan(0, 0.0, prompts, num_prefill_tokens=280))
        for k in range(3):  # chunks at positions 0, 128, 256 of slot 7
            chunks = tuple(ScheduledChunk(f"r{s}", s, 40 + k, (int(rng.integers(10, 32000)),), True, 0, True)
                           for s in range(7))
            chunks += (ScheduledChunk("p7", 7, 128 * k, tuple(rng.integers(10, 32000, 128).tolist()), False),)
            t0 = time.perf_counter()
            backend.step(StepPlan(k + 1, 0.0, chunks, num_prefill_tokens=128, num_decode_seqs=7))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    """Measure both layouts; print a table of medians and ratios (or --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from backends.llamacpp import LlamaCppBackend
    from backends.models import DEFAULT_MODEL, LlamaModel

    model = LlamaModel(args.model or DEFAULT_MODEL)
    rows: dict[str, dict[str, float]] = {}
    try:
        for unified in (False, True):
            key = "unified" if unified else "per_slot"
            with LlamaCppBackend(model, n_ctx=8192, n_seq_max=16, n_threads=2, kv_unified=unified) as be:
                rng = np.random.default_rng(0)
                for label, slots in LAYOUTS.items():
                    rows.setdefault(label, {})[key] = decode_times(be, slots, args.steps, args.repeats, 0, rng)
                for fill in FILLS[1:]:
                    for label, slots in (("B=1", [0]), ("B=8 consecutive", list(range(8)))):
                        name = f"{label}, 8 other slots hold {fill} tokens"
                        rows.setdefault(name, {})[key] = decode_times(be, slots, args.steps, args.repeats, fill, rng)
                for fill in FILLS:
                    name = f"mixed 7 decodes + 128-token chunk, 8 other slots hold {fill} tokens"
                    rows.setdefault(name, {})[key] = mixed_times(be, args.repeats, fill, rng)
    finally:
        model.close()
    for r in rows.values():
        r["ratio"] = r["unified"] / r["per_slot"]
    out = {"rows": rows, "python": platform.python_version(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(out))
        return 0
    width = max(map(len, rows))
    print(f"{'layout':<{width}} | per-slot streams | unified |  ratio")
    for label, r in rows.items():
        print(f"{label:<{width}} | {r['per_slot'] * 1e3:13.1f} ms | {r['unified'] * 1e3:4.1f} ms | {r['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
