"""Decode step times on this machine's cores: one context with both threads, one with one thread alone, and
two one-thread contexts stepping at the same time on their own threads, side by side in one process.

    python calib/experiments/shared_cores.py [--steps 60] [--repeats 2]

Each cell is the median time of the decode steps of B requests (64-token prompts, --steps decodes each),
the contexts sharing one loaded gemma-3-270m. The ratios say what a multi-instance run costs per step
(one thread against two) and what the other instance's steps add to it (concurrent against alone), and the
last column the decode throughput of the two one-thread contexts against the one two-thread context.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.llamacpp import LlamaCppBackend  # noqa: E402
from backends.models import DEFAULT_MODEL, LlamaModel  # noqa: E402
from scheduler import Request, SamplingParams, Scheduler  # noqa: E402


def decode_median(backend, batch: int, steps: int, tag: str, out: list) -> None:
    """Run `batch` requests to `steps` decodes each; append the median decode-only step time."""
    sched = Scheduler(backend.scheduler_config(), "continuous")
    rng = np.random.default_rng(0)
    for i in range(batch):
        prompt = tuple(rng.integers(10, 20000, 64).tolist())
        sched.add_request(Request(f"{tag}{i}", prompt, SamplingParams(max_tokens=steps + 2, ignore_eos=True)), 0.0)
    times, now = [], 0.0
    while sched.has_unfinished():
        plan = sched.schedule(now)
        t0 = time.perf_counter()
        result = backend.step(plan)
        t = time.perf_counter() - t0
        sched.commit(plan, result, now)
        now += t
        if plan.num_prefill_tokens == 0:
            times.append(t)
    backend.clear_kv()
    out.append(statistics.median(times))


def main() -> int:
    """Time each batch size three ways and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    args = ap.parse_args()
    model = LlamaModel(DEFAULT_MODEL)

    def context(threads: int) -> LlamaCppBackend:
        return LlamaCppBackend(model, n_ctx=8192, n_seq_max=16, n_threads=threads, kv_unified=False)

    one_a, one_b, two = context(1), context(1), context(2)
    print("B   2 threads   1 thread alone (x 2 thr)   2 x 1 thread at once (x alone)   decode tok/s 2x1 / 1x2")
    for batch in (int(b) for b in args.batches.split(",")):
        for _ in range(args.repeats):
            t2, t1, ta, tb = [], [], [], []
            decode_median(two, batch, args.steps, "c", t2)
            decode_median(one_a, batch, args.steps, "a", t1)
            threads = [threading.Thread(target=decode_median, args=(one_a, batch, args.steps, "a", ta)),
                       threading.Thread(target=decode_median, args=(one_b, batch, args.steps, "b", tb))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            both = (ta[0] + tb[0]) / 2
            print(f"{batch:<3} {t2[0] * 1e3:8.2f} ms   {t1[0] * 1e3:8.2f} ms ({t1[0] / t2[0]:.2f}x)"
                  f"            {ta[0] * 1e3:7.2f} {tb[0] * 1e3:7.2f} ms ({both / t1[0]:.3f}x)"
                  f"             {(batch / ta[0] + batch / tb[0]) / (batch / t2[0]):.3f}", flush=True)
    for b in (one_a, one_b, two):
        b.close()
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
