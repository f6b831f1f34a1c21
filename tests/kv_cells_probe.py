"""Run a script of plans on a unified-KV LlamaCppBackend and print llama.cpp's own find_slot state per ubatch.

Run as `LLAMA_KV_CACHE_DEBUG=1 TOKENSTEP_LLAMA_LOG=1 python -m tests.kv_cells_probe MODEL`: llama.cpp then logs,
for every ubatch it places, "find_slot: stream[0], n = <used_max_p1>, used = <cells in use>, head = <head>, ...",
which tests/test_kv_cells.py compares with backends.cost.kvcells.UnifiedKV replaying the same plans.
"""

from __future__ import annotations

import sys

import numpy as np

from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan

N_CTX = 1024
N_BATCH = 96
N_UBATCH = 32


def _ids(n: int, seed: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(t) for t in rng.integers(1000, 30000, n))


def script() -> list[StepPlan]:
    """Prompts in several slots (split across ubatches and llama_decode calls), decodes, a finished sequence
    removed below the head, a partial cut, a prefix copy that moves its source, pad tokens, and prompts that
    land in the freed cells."""
    plans: list[StepPlan] = []
    held = {}

    def chunk(slot: int, n: int, pads: int = 0, seed: int = 0) -> ScheduledChunk:
        start = held.get(slot, 0)
        held[slot] = start + n
        return ScheduledChunk(f"s{slot}", slot, start, _ids(n, seed + slot), True, pads, n == 1)

    def add(chunks=(), removes=(), copies=()):
        for r in removes:
            held[r.slot] = min(held.get(r.slot, 0), r.start_pos)
        plans.append(StepPlan(len(plans), 0.0, tuple(chunks), tuple(removes), tuple(copies)))

    add([chunk(0, 40), chunk(1, 70), chunk(2, 20)])
    for _ in range(3):
        add([chunk(0, 1), chunk(1, 1), chunk(2, 1)])
    add([chunk(3, 50), chunk(0, 1)], removes=[KVRemove(1, 0)])
    add([chunk(1, 30, seed=7), chunk(2, 1)])
    add([chunk(3, 1), chunk(2, 1)], removes=[KVRemove(0, 20)])
    held[4] = 10
    add([chunk(4, 5), chunk(3, 1)], copies=[KVCopy(2, 4, 10, True)])
    held.pop(2, None)
    add([chunk(5, 12, pads=4), chunk(4, 1)])
    held[5] = 12
    for _ in range(4):
        add([chunk(3, 1), chunk(4, 1), chunk(5, 1), chunk(1, 1)])
    add([chunk(6, 200, seed=3)], removes=[KVRemove(3, 0), KVRemove(1, 0)])
    add([chunk(6, 1), chunk(4, 1), chunk(7, 60)])
    return plans


def main(model: str) -> None:
    from backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(model, n_ctx=N_CTX, n_seq_max=8, n_threads=2, n_batch=N_BATCH, n_ubatch=N_UBATCH,
                              kv_unified=True)
    try:
        for plan in script():
            result = backend.step(plan)
            assert not result.failed, result.failed
            print(f"STEP {plan.step_id}", file=sys.stderr, flush=True)
    finally:
        backend.close()


if __name__ == "__main__":
    main(sys.argv[1])
