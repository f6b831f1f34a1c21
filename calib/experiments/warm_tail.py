"""Do steps stay slow after an idle wait, beyond the first one? Decode step times by position after a sleep.

    python calib/experiments/warm_tail.py [--batch 4] [--idle 0.5] [--rounds 6] [--steps 60]

Each round runs two identical sequences on the real backend, in alternating order: --batch requests of 16
prompt tokens (EOS ignored, so the batch never shrinks) are prefilled and decoded 3 steps, then --steps decode
steps are timed, once right away ("hot") and once after the engine slept --idle seconds ("after idle"). Prints,
for every third step position, the median over rounds of both and their difference, and the excess over
stretches of steps. The first step after the wait is what calib.calibrate's wake-up probe prices; the later ones
tell whether a step's price should also depend on how recently the engine idled. `--idle 0` measures the
two sequences' difference with no wait at all: the benchmark's own noise floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from scheduler import Scheduler  # noqa: E402
from scheduler.request import Request, SamplingParams  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402


def run(backend, config, batch: int, steps: int, idle: float, tag: str, rng) -> list[float]:
    """One sequence: prefill, 3 decodes, the optional sleep, then `steps` timed decode steps."""
    sched = Scheduler(replace(config, enable_prefix_caching=False), "continuous")
    backend.clear_kv()
    for i in range(batch):
        tokens = tuple(int(t) for t in rng.integers(100, 20000, 16))
        sched.add_request(Request(f"{tag}-{i}", tokens, SamplingParams(max_tokens=steps + 10, ignore_eos=True)), 0.0)
    for _ in range(4):
        plan = sched.schedule(0.0)
        sched.commit(plan, backend.step(plan), 0.0)
    if idle:
        time.sleep(idle)
    times = []
    for _ in range(steps):
        plan = sched.schedule(0.0)
        t0 = time.perf_counter()
        result = backend.step(plan)
        times.append(time.perf_counter() - t0)
        sched.commit(plan, result, 0.0)
    return times


def main() -> int:
    """Time, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--idle", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    backends, config = make_llama_instances(None, 1)
    rng = np.random.default_rng(1)
    out: dict[str, list[list[float]]] = {"idle": [], "hot": []}
    try:
        for r in range(args.rounds):
            for mode in (("idle", "hot") if r % 2 == 0 else ("hot", "idle")):
                out[mode].append(run(backends[0], config, args.batch, args.steps,
                                     args.idle if mode == "idle" else 0.0, f"{mode}{r}", rng))
    finally:
        close_instances(backends)
    idle, hot = (np.median(np.array(out[m]), axis=0) * 1e3 for m in ("idle", "hot"))
    print(f"decode of {args.batch} sequences, {args.rounds} rounds: step k after a {args.idle:g} s wait vs the same "
          "step with no wait (median ms)")
    print(f"{'step':>5} {'after idle':>11} {'hot':>8} {'extra':>8}")
    for k in range(0, args.steps, 3):
        print(f"{k + 1:5d} {idle[k]:11.2f} {hot[k]:8.2f} {idle[k] - hot[k]:+8.2f}")
    edges = [1, 10, 30, 50, 75, 100, 150, 200, 300]
    for a, b in zip(edges, edges[1:], strict=False):
        if a < b <= args.steps:
            print(f"steps {a + 1}-{b}: after idle {idle[a:b].sum() / hot[a:b].sum() - 1:+.1%} "
                  f"({hot[a:b].sum() / 1e3:.2f} s of hot steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
