"""Decode throughput of LlamaCppBackend.step, side by side with a bare loop and llama-batched-bench.

    python -m benchmarks.bench_decode                       # B = 1, 4, 16; 16-token prompts, 64 generated
    python -m benchmarks.bench_decode --batched-bench PATH  # also run llama.cpp's llama-batched-bench
    python -m benchmarks.bench_decode --profile             # cProfile of the B=16 decode loop
    python -m benchmarks.bench_decode --model M.gguf --n-gpu-layers 99 --batch-sizes 1,4,16,32,64,128 \
        --prompt-tokens 128 --gen-tokens 128 --sampling both --engine --batched-bench PATH --json-out FILE  # GPU

Each repeat runs every contender at every batch size in turn, so background load hits them
alike; the table shows medians over repeats. Like llama-batched-bench's S_TG, decode tok/s
is B * gen_tokens / (time of the gen_tokens decode steps); the prompt step is timed apart.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
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


def bench_backend(be: LlamaCppBackend, prompts, gen_tokens: int, steps_s: list[float] | None = None
                  ) -> tuple[float, float]:
    """(prompt seconds, decode seconds) for one batch through step(), greedy, tokens fed back.

    steps_s, when given, receives each decode step's wall time (the step-noise figures).
    """
    be.clear_kv()
    ids = [f"r{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    plan = StepPlan(0, 0.0, tuple(ScheduledChunk(ids[i], i, 0, p, True) for i, p in enumerate(prompts)))
    tokens = be.step(plan).sampled_token_ids
    t1 = time.perf_counter()
    pos = len(prompts[0])
    for step in range(gen_tokens):
        chunks = tuple(ScheduledChunk(rid, i, pos, (tokens[rid],), True, is_decode=True) for i, rid in enumerate(ids))
        ts = time.perf_counter()
        tokens = be.step(StepPlan(step + 1, 0.0, chunks)).sampled_token_ids
        if steps_s is not None:
            steps_s.append(time.perf_counter() - ts)
        pos += 1
    t2 = time.perf_counter()
    be.step(StepPlan(gen_tokens + 1, 0.0, (), finished_request_ids=tuple(ids)))
    return t1 - t0, t2 - t1


class BareLoop:
    """The least Python one can write around llama_decode: a reference for step()'s overhead."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_seq_max: int, n_threads: int, kv_unified: bool) -> None:
        params = L.llama_context_default_params()
        # n_ctx is the whole cache, as for LlamaCppBackend
        params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = n_ctx, n_seq_max, 512, 512
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = kv_unified
        self.ctx = L.llama_init_from_model(model.ptr, params)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, 1)
        self.n_vocab = model.vocab_size
        self._pool = None
        self.argmax_threads = max(2, min(16, os.cpu_count() or 2))

    def run(self, prompts, gen_tokens: int, read: str = "argmax") -> tuple[float, float]:
        """read: how each decode step ends. "argmax": host argmax of the logits, fed back; "argmax-mt": the same
        split over threads; "sync": wait for the GPU, tokens not read (fixed); "none": no wait at all, the next
        llama_decode queues behind this one, as llama-batched-bench runs."""
        b, n = self.batch, len(prompts)
        L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        k, n_out, tokens = 0, 0, []
        flat = [(s, j, tok, j == len(p) - 1) for s, p in enumerate(prompts) for j, tok in enumerate(p)]
        for i, (s, j, tok, last) in enumerate(flat):  # in batches of 512 tokens
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, j, 1, last
            b.seq_id[k][0] = s
            k += 1
            n_out += last
            if k == 512 or i == len(flat) - 1:
                b.n_tokens = k
                L.llama_decode(self.ctx, b)
                if n_out:
                    rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
                    tokens += rows.argmax(axis=1).tolist()
                k = n_out = 0
        t1 = time.perf_counter()
        pos = len(prompts[0])
        for s in range(n):
            b.seq_id[s][0], b.n_seq_id[s], b.logits[s] = s, 1, 1
        b.n_tokens = n
        for _ in range(gen_tokens):
            for s in range(n):
                b.token[s], b.pos[s] = tokens[s], pos
            L.llama_decode(self.ctx, b)
            if read == "sync":
                L.llama_synchronize(self.ctx)
            elif read != "none":
                rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))
                tokens = self._argmax_mt(rows) if read == "argmax-mt" else rows.argmax(axis=1).tolist()
            pos += 1
        L.llama_synchronize(self.ctx)
        return t1 - t0, time.perf_counter() - t1

    def _argmax_mt(self, rows: np.ndarray) -> list[int]:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.argmax_threads)
        step = -(-len(rows) // self.argmax_threads)
        parts = self._pool.map(lambda i: rows[i : i + step].argmax(axis=1), range(0, len(rows), step))
        return np.concatenate(list(parts)).tolist()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)


def run_batched_bench(path: str, model: LlamaModel, args) -> dict[int, tuple[float, float, float]]:
    """{B: (S_PP, S_TG, T total s)} from llama.cpp's llama-batched-bench on the same shape."""
    cmd = [path, "-m", str(model.path), "-c", str(args.n_ctx), "-t", str(args.threads),
           "-npp", str(args.prompt_tokens), "-ntg", str(args.gen_tokens),
           "-npl", ",".join(map(str, args.batch_sizes)), "-kvu" if args.kv_unified else "-no-kvu",
           "-ngl", str(args.n_gpu_layers)]
    if not model.use_extra_bufts:
        cmd.append("-nr")  # same weight layout as the backend: no repacking (see docs/llamacpp-notes.md)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[2]):
            rows[int(cells[2])] = (float(cells[5]), float(cells[7]), float(cells[8]))
    return rows


def run_engine(be: LlamaCppBackend, prompts, gen_tokens: int) -> float:
    """Seconds LLM.generate takes for the batch (prefill and decode, forced length), the serving engine's path."""
    from scheduler.request import SamplingParams
    from serve.engine import LLM

    be.clear_kv()
    llm = LLM(backend=be)
    sp = SamplingParams(max_tokens=gen_tokens, ignore_eos=True)
    items = [{"prompt_token_ids": list(p), "id": f"e{i}", "sampling": sp} for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    llm.generate(items)
    return time.perf_counter() - t0


def _noise(steps_s: list[float]) -> dict:
    """A decode step's spread around its median: p90, p99 and max over the median."""
    a = np.sort(np.asarray(steps_s))
    med = float(np.median(a))
    return {"steps": len(a), "median_ms": med * 1e3, "p90_over_median": float(np.quantile(a, 0.9)) / med,
            "p99_over_median": float(np.quantile(a, 0.99)) / med, "max_over_median": float(a[-1]) / med,
            "cv": float(a.std() / a.mean())}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, help="KV cells (default: enough for the largest batch, at least 4096)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (99: all)")
    ap.add_argument("--sampling", choices=["auto", "device", "host", "both"], default="auto",
                    help="step()'s greedy sampling: inside llama_decode (device), numpy over the logits (host), "
                         "both side by side, or the backend's default (auto: device when layers are offloaded)")
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batched-bench", metavar="PATH", help="llama-batched-bench binary to run side by side")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare low-level loop")
    ap.add_argument("--split", action="store_true",
                    help="also time the bare loop ending each step without reading (as llama-batched-bench), with "
                         "a GPU wait only, and with a threaded argmax: where a step's host time goes")
    ap.add_argument("--engine", action="store_true", help="also time LLM.generate (whole run vs batched-bench's T)")
    ap.add_argument("--profile", action="store_true", help="cProfile one decode run at the largest B")
    ap.add_argument("--json-out", metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args(argv)
    if args.n_ctx is None:
        args.n_ctx = max(4096, max(args.batch_sizes) * (args.prompt_tokens + args.gen_tokens + 8))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    model = LlamaModel(args.model, n_gpu_layers=args.n_gpu_layers)
    n_seq_max = max(args.batch_sizes)
    modes = {"auto": [None], "device": [True], "host": [False], "both": [True, False]}[args.sampling]
    opts = dict(n_ctx=args.n_ctx, n_seq_max=n_seq_max, n_threads=args.threads, kv_unified=args.kv_unified)
    steppers = {}
    for mode in modes:
        be = LlamaCppBackend(model, device_sampling=mode, **opts)
        steppers["step() " + ("device" if be.device_sampling else "host") + " argmax"] = be
    bare = None if args.no_bare else BareLoop(model, args.n_ctx, n_seq_max, args.threads, args.kv_unified)
    rng = np.random.default_rng(0)
    for be in steppers.values():
        bench_backend(be, _prompts(rng, 1, args.prompt_tokens), 4)  # warm-up
    if args.profile:
        prompts = _prompts(rng, n_seq_max, args.prompt_tokens)
        prof = cProfile.Profile()
        prof.enable()
        bench_backend(next(iter(steppers.values())), prompts, args.gen_tokens)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    res: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    steps: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for B in args.batch_sizes:
            prompts = _prompts(rng, B, args.prompt_tokens)
            for name, be in steppers.items():
                t_pp, t_tg = bench_backend(be, prompts, args.gen_tokens, steps.setdefault((name, B), []))
                res.setdefault((name, B), []).append((B * args.prompt_tokens / t_pp, B * args.gen_tokens / t_tg,
                                                      t_pp + t_tg))
            for read in (["argmax", "none", "sync", "argmax-mt"] if args.split else ["argmax"]) if bare else []:
                t_pp, t_tg = bare.run(prompts, args.gen_tokens, read)
                name = "bare loop" + ("" if read == "argmax" else f", {read}")
                res.setdefault((name, B), []).append((B * args.prompt_tokens / t_pp,
                                                      B * args.gen_tokens / t_tg, t_pp + t_tg))
            if args.engine:
                t = run_engine(next(iter(steppers.values())), prompts, args.gen_tokens)
                res.setdefault(("LLM.generate", B), []).append((float("nan"), float("nan"), t))
        if args.batched_bench:
            for B, speeds in run_batched_bench(args.batched_bench, model, args).items():
                res.setdefault(("llama-batched-bench", B), []).append(speeds)
    if bare:
        bare.close()
    for be in steppers.values():
        be.close()
    report(args, model, res, steps, list(steppers))
    model.close()
    return 0


def report(args, model: LlamaModel, res: dict, steps: dict, names: list[str]) -> None:
    """Print the ratio table (medians over repeats) and the step noise; write JSON if asked."""
    med = {k: tuple(statistics.median(s[i] for s in v) for i in range(3)) for k, v in res.items()}
    print(f"\n{model.name}: {args.prompt_tokens}-token prompts, {args.gen_tokens} generated, n_ctx {args.n_ctx}, "
          f"{args.threads} threads, n_gpu_layers {args.n_gpu_layers}, kv_unified={args.kv_unified}, "
          f"extra bufts={model.use_extra_bufts}, median of {args.repeats}")
    print(f"{'contender':<24} {'B':>4} {'S_PP tok/s':>11} {'S_TG tok/s':>11} {'TG / bb':>8} {'whole s':>8} "
          f"{'bb T / T':>8}")
    rows = []
    for B in args.batch_sizes:
        ref = med.get(("llama-batched-bench", B))
        for name in names + ["bare loop", "bare loop, none", "bare loop, sync", "bare loop, argmax-mt",
                             "LLM.generate", "llama-batched-bench"]:
            if (name, B) not in med:
                continue
            pp, tg, total = med[(name, B)]
            tg_ratio = tg / ref[1] if ref and tg == tg else None
            t_ratio = ref[2] / total if ref else None
            rows.append({"contender": name, "B": B, "s_pp": pp, "s_tg": tg, "tg_ratio": tg_ratio,
                         "whole_s": total, "whole_ratio": t_ratio})
            print(f"{name:<24} {B:>4} {pp:>11.1f} {tg:>11.1f} {tg_ratio if tg_ratio else float('nan'):>8.3f} "
                  f"{total:>8.3f} {t_ratio if t_ratio else float('nan'):>8.3f}")
    noise = {f"{name} B={B}": _noise(v) for (name, B), v in steps.items() if v}
    print("\ndecode step noise (every repeat's steps): median ms, p90 / p99 / max over the median, CV")
    for key, n in noise.items():
        print(f"  {key:<34} {n['median_ms']:8.3f}  {n['p90_over_median']:.3f} {n['p99_over_median']:.3f} "
              f"{n['max_over_median']:.3f}  {n['cv']:.4f}")
    if args.json_out:
        doc = {"args": {k: v for k, v in vars(args).items()}, "model": model.name, "rows": rows, "noise": noise}
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
