"""Steps over a wide unified-KV range, measured on the real backend and priced by a KV-range profile.

Fills a unified KV stream with --fill-seqs prompts of --fill-tokens tokens (one llama_decode per prompt), drops
all but the last (which sits at the top of the filled cells, so the range stays wide), then times decodes of that
one sequence and a fresh prompt that lands in the freed cells below it, and prints each next to the profile's
price (backends.cost.kvcells replaying the same plans). Run on the GPU:
`python3 -m benchmarks.kv_range_probe --model llama3-8b.gguf --n-gpu-layers 99`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from backends.cost import load_cost_model
from backends.cost.kvcells import UnifiedKV
from scheduler.messages import KVRemove, ScheduledChunk, StepPlan


def _plan(step: int, chunks=(), removes=()) -> StepPlan:
    return StepPlan(step, 0.0, tuple(chunks), tuple(removes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--profile", default="h200-llama3-8b-f16")
    ap.add_argument("--fill-seqs", type=int, default=48)
    ap.add_argument("--fill-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    from backends.llamacpp import LlamaCppBackend

    profile = load_cost_model(args.profile)
    be = LlamaCppBackend(args.model, n_ctx=profile.kv_size or 262144, n_seq_max=256, n_threads=8, n_batch=8192,
                         n_ubatch=512, kv_unified=True, n_gpu_layers=args.n_gpu_layers)
    kv = UnifiedKV(profile.kv_size or 262144)
    step = 0
    rows = []

    def run(plan: StepPlan, label: str, timed: bool = True):
        nonlocal step
        t0 = time.perf_counter()
        res = be.step(plan)
        dt = time.perf_counter() - t0
        assert not res.failed, res.failed
        n_kv = kv.run_plan(plan, be.n_batch, be.n_ubatch)
        if timed:
            rows.append({"label": label, "n_kv": max(n_kv), "measured_s": dt,
                         "priced_s": profile.time_s(plan, n_kv=n_kv)})
        step += 1
        return res

    t0 = time.perf_counter()
    n = args.fill_tokens
    for s in range(args.fill_seqs):
        run(_plan(step, [ScheduledChunk(f"f{s}", s, 0, (1000 + s,) * n, True)]), "fill", timed=False)
    top = args.fill_seqs - 1
    run(_plan(step, removes=[KVRemove(s, 0) for s in range(top)]), "drop", timed=False)
    fill_s = time.perf_counter() - t0
    pos = n
    for _ in range(2):  # untimed: the first steps after a shape change
        run(_plan(step, [ScheduledChunk("f", top, pos, (7,), True, 0, True)]), "warm", timed=False)
        pos += 1
    for _ in range(args.repeats):
        run(_plan(step, [ScheduledChunk("f", top, pos, (7,), True, 0, True)]), "decode B=1, wide range")
        pos += 1
    for r in range(args.repeats):
        slot = 200 + r
        run(_plan(step, [ScheduledChunk(f"p{r}", slot, 0, (2000 + r,) * 512, True)]), "prompt 512, wide range")
        run(_plan(step, removes=[KVRemove(slot, 0)]), "drop", timed=False)
    be.close()
    out = {"fill_s": round(fill_s, 1), "fill": [args.fill_seqs, n], "profile": args.profile, "steps": {}}
    for label in dict.fromkeys(r["label"] for r in rows):
        sel = [r for r in rows if r["label"] == label]
        m, p = statistics.median(r["measured_s"] for r in sel), statistics.median(r["priced_s"] for r in sel)
        out["steps"][label] = {"n_kv": sel[0]["n_kv"], "measured_ms": m * 1e3, "priced_ms": p * 1e3,
                               "error_pct": (p / m - 1) * 100}
        print(f"{label:<24} n_kv {sel[0]['n_kv']:>7}: measured {m * 1e3:7.2f} ms, priced {p * 1e3:7.2f} ms "
              f"({(p / m - 1) * 100:+.1f} %)")
    print(f"fill: {args.fill_seqs} x {n} tokens in {fill_s:.1f} s")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
