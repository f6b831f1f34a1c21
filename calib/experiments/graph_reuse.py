"""What llama.cpp's compute-graph reuse saves per decode step: two contexts side by side, reuse on and off.

    python calib/experiments/graph_reuse.py [--batch-sizes 1,4,16] [--steps 40] [--context 64]

llama.cpp reuses the previous micro-batch's compute graph when the next one has the same shape (tokens,
sequences, sequence ids, outputs, padded KV length) and builds and allocates a new graph otherwise
(LLAMA_GRAPH_REUSE_DISABLE=1 turns reuse off for contexts created after it is set). This script creates one
context of each kind over one loaded model (the bundled profile's context settings), fills B slots with
a prompt of --context tokens in both, then times --steps decode steps of the B sequences, alternating
between the two contexts, and prints the median step time of each and their difference: the cost of
building a graph that every step whose shapes differ from the previous step's pays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from calib.cli_validate import _llama_options  # noqa: E402
from calib.samples import plan_from_row  # noqa: E402


def plan(rows):
    return plan_from_row({"chunks": rows, "removes": [], "copies": []})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,4,16", help="decode batch sizes, comma-separated (default 1,4,16)")
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed per context and size (default 40)")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per sequence before decoding (default 64)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--batch-sizes: comma-separated integers expected, got {args.batch_sizes!r}")
    options = _llama_options(load_cost_model("cpu-gemma3-270m"))
    if not sizes or any(not 1 <= b <= options["n_seq_max"] for b in sizes):
        ap.error(f"--batch-sizes: each must be 1..{options['n_seq_max']} (the context's slots)")
    if args.steps < 2 or not 1 <= args.context <= 256:
        ap.error("--steps must be >= 2 and --context 1..256 (the decodes must stay within one KV padding of 256)")
    if "LLAMA_GRAPH_REUSE_DISABLE" in os.environ:
        ap.error("unset LLAMA_GRAPH_REUSE_DISABLE: the script sets it for the second context itself")

    from backends.llamacpp import LlamaCppBackend
    from backends.models import DEFAULT_MODEL, LlamaModel

    model = LlamaModel(DEFAULT_MODEL)
    contexts = {}
    try:
        contexts["reuse on"] = LlamaCppBackend(model, **options)
        os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "1"  # read when a context is created
        try:
            contexts["reuse off"] = LlamaCppBackend(model, **options)
        finally:
            del os.environ["LLAMA_GRAPH_REUSE_DISABLE"]
        print(f"decode steps of B sequences after {args.context}-token prompts, {args.steps} steps per context, "
              f"alternating; {options['n_threads']} threads")
        print(f"{'B':>3} {'reuse on ms':>12} {'reuse off ms':>13} {'graph build ms':>15} {'share':>7}")
        for b in sizes:
            times: dict[str, list[float]] = {name: [] for name in contexts}
            for backend in contexts.values():
                backend.clear_kv()
                backend.step(plan([[s, 0, args.context, 0, 1, 0] for s in range(b)]))
            for i in range(args.steps):
                for name, backend in contexts.items():
                    p = plan([[s, args.context + i, 1, 0, 1, 1] for s in range(b)])
                    t0 = time.perf_counter()
                    backend.step(p)
                    times[name].append(time.perf_counter() - t0)
            on, off = (statistics.median(times[n][1:]) for n in ("reuse on", "reuse off"))
            print(f"{b:>3} {on * 1e3:>12.2f} {off * 1e3:>13.2f} {(off - on) * 1e3:>15.2f} "
                  f"{(off / on - 1) * 100:>+6.1f}%")
    finally:
        for backend in contexts.values():
            backend.close()
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
