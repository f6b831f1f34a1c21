"""Decode throughput of LlamaCppBackend.step, side by side with a bare loop and llama-batched-bench.

    python -m benchmarks.bench_decode                       # B = 1, 4, 16; 16-token prompts, 64 generated
    python -m benchmarks.bench_decode --batched-bench PATH  # also run llama.cpp's llama-batched-bench
    python -m benchmarks.bench_decode --profile             # cProfile of the B=16 decode loop

Each repeat runs every contender at every batch size in turn, so background load hits them
alike; the table shows medians over repeats. Like llama-batched-bench's S_TG, decode tok/s
is B * gen_tokens / (time of the gen_tokens decode steps); the prompt step is timed apart.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import statistics
import subprocess
import sys
import time

import llama_cpp as L
import numpy as np

from backends.llamacpp import LlamaCppBackend
from backends.models import DEFAULT_MODEL, LlamaModel
from scheduler.messages import ScheduledChunk, StepPlan


def _prompts(rng: np.random.Generator, batch: int, prompt_tokens: int) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in rng.integers(1000, 30000, prompt_tokens)) for _ in range(batch)]


def bench_backend(be: LlamaCppBackend, prompts, gen_tokens: int) -> tuple[float, float]:
    """(prompt seconds, decode seconds) for one batch through step(), greedy, tokens fed back."""
    be.clear_kv()
    ids = [f"r{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    plan = StepPlan(0, 0.0, tuple(ScheduledChunk(ids[i], i, 0, p, True) for i, p in enumerate(prompts)))
    tokens = be.step(plan).sampled_token_ids
    t1 = time.perf_counter()
    pos = len(prompts[0])
    for step in range(gen_tokens):
        chunks = tuple(ScheduledChunk(rid, i, pos, (tokens[rid],), True, is_decode=True) for i, rid in enumerate(ids))
        tokens = be.step(StepPlan(step + 1, 0.0, chunks)).sampled_token_ids
        pos += 1
    t2 = time.perf_counter()
    be.step(StepPlan(gen_tokens + 1, 0.0, (), finished_request_ids=tuple(ids)))
    return t1 - t0, t2 - t1


class BareLoop:
    """The least Python one can write around llama_decode: a reference for step()'s overhead."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_seq_max: int, n_threads: int, kv_unified: bool) -> None:
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = n_ctx, n_seq_max, 512, 512
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = kv_unified
        self.ctx = L.llama_init_from_model(model.ptr, params)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, 1)
        self.n_vocab = model.vocab_size

    def run(self, prompts, gen_tokens: int) -> tuple[float, float]:
        b, n = self.batch, len(prompts)
        L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        k = 0
        for s, p in enumerate(prompts):
            for j, tok in enumerate(p):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, j, 1, j == len(p) - 1
                b.seq_id[k][0] = s
                k += 1
        b.n_tokens = k
        L.llama_decode(self.ctx, b)
        rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))
        tokens = rows.argmax(axis=1).tolist()
        t1 = time.perf_counter()
        pos = len(prompts[0])
        for s in range(n):
            b.seq_id[s][0], b.n_seq_id[s], b.logits[s] = s, 1, 1
        b.n_tokens = n
        for _ in range(gen_tokens):
            for s in range(n):
                b.token[s], b.pos[s] = tokens[s], pos
            L.llama_decode(self.ctx, b)
            rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))
            tokens = rows.argmax(axis=1).tolist()
            pos += 1
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)


def run_batched_bench(path: str, model: LlamaModel, args) -> dict[int, tuple[float, float]]:
    """{B: (S_PP, S_TG)} from llama.cpp's llama-batched-bench on the same shape."""
    cmd = [
        path,
        "-m",
        str(model.path),
        "-c",
        str(args.n_ctx),
        "-t",
        str(args.threads),
        "-npp",
        str(args.prompt_tokens),
        "-ntg",
        str(args.gen_tokens),
        "-npl",
        ",".join(map(str, args.batch_sizes)),
        "-kvu" if args.kv_unified else "-no-kvu",
    ]
    if not model.use_extra_bufts:
        cmd.append("-nr")  # same weight layout as the backend: no repacking (see docs/llamacpp-notes.md)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[2]):
            rows[int(cells[2])] = (float(cells[5]), float(cells[7]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batched-bench", metavar="PATH", help="llama-batched-bench binary to run side by side")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare low-level loop")
    ap.add_argument("--profile", action="store_true", help="cProfile one decode run at the largest B")
    args = ap.parse_args(argv)

    model = LlamaModel(args.model)
    n_seq_max = max(args.batch_sizes)
    be = LlamaCppBackend(
        model, n_ctx=args.n_ctx, n_seq_max=n_seq_max, n_threads=args.threads, kv_unified=args.kv_unified
    )
    bare = None if args.no_bare else BareLoop(model, args.n_ctx, n_seq_max, args.threads, args.kv_unified)
    rng = np.random.default_rng(0)
    bench_backend(be, _prompts(rng, 1, args.prompt_tokens), 4)  # warm-up
    if args.profile:
        prompts = _prompts(rng, n_seq_max, args.prompt_tokens)
        prof = cProfile.Profile()
        prof.enable()
        bench_backend(be, prompts, args.gen_tokens)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(14)
    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for B in args.batch_sizes:
            prompts = _prompts(rng, B, args.prompt_tokens)
            t_pp, t_tg = bench_backend(be, prompts, args.gen_tokens)
            res.setdefault(("step()", B), []).append((B * args.prompt_tokens / t_pp, B * args.gen_tokens / t_tg))
            if bare:
                t_pp, t_tg = bare.run(prompts, args.gen_tokens)
                res.setdefault(("bare loop", B), []).append((B * args.prompt_tokens / t_pp, B * args.gen_tokens / t_tg))
        if args.batched_bench:
            for B, speeds in run_batched_bench(args.batched_bench, model, args).items():
                res.setdefault(("llama-batched-bench", B), []).append(speeds)
    if bare:
        bare.close()
    be.close()

    print(
        f"\n{model.name}: {args.prompt_tokens}-token prompts, {args.gen_tokens} generated, n_ctx {args.n_ctx}, "
        f"{args.threads} threads, kv_unified={args.kv_unified}, extra bufts={model.use_extra_bufts}, "
        f"median of {args.repeats}"
    )
    print(f"{'contender':<20} {'B':>3} {'S_PP tok/s':>11} {'S_TG tok/s':>11} {'TG / batched-bench':>19}")
    for B in args.batch_sizes:
        ref = res.get(("llama-batched-bench", B))
        ref_tg = statistics.median(s[1] for s in ref) if ref else None
        for name in ("step()", "bare loop", "llama-batched-bench"):
            if (name, B) not in res:
                continue
            pp = statistics.median(s[0] for s in res[(name, B)])
            tg = statistics.median(s[1] for s in res[(name, B)])
            ratio = f"{tg / ref_tg:.3f}" if ref_tg else "-"
            print(f"{name:<20} {B:>3} {pp:>11.1f} {tg:>11.1f} {ratio:>19}")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
