"""Cost of the scheduler itself: schedule() + commit() per step at a decode-dominated steady state.

    python -m benchmarks.bench_scheduler                  # table
    python -m benchmarks.bench_scheduler --json           # same numbers as JSON

The executor is trivial (one token per sampling chunk, elapsed_s=0) and is timed
apart: each step's time is (schedule) + (commit), each bracketed by
time.perf_counter_ns, so the executor's time is excluded, not merely small.
Requests are 200-token prompts sharing a 64-token system prompt (prefix caching
on), max_tokens uniform in [96, 160] (mean 128) so finishes spread out; the queue
is topped up before every step so every finished request is replaced at once.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig, StepPlan, StepResult  # noqa: E402

SYSTEM_PROMPT = tuple(range(1, 65))  # 64 shared tokens = 4 full blocks of 16
BLOCK_SIZE = 16


def execute(plan: StepPlan) -> StepResult:
    """The trivial backend: token 7 for every sampling chunk, no time spent."""
    return StepResult({c.request_id: 7 for c in plan.chunks if c.sample}, 0.0)


class Workload:
    """An endless supply of requests with a shared system prompt and a seeded max_tokens."""

    def __init__(self, prompt_tokens: int, max_tokens: tuple[int, int], seed: int) -> None:
        self.unique = prompt_tokens - len(SYSTEM_PROMPT)
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.count = 0

    def next(self, now_s: float) -> Request:
        """The next request (unique tokens after the shared prefix)."""
        i = self.count
        self.count += 1
        base = 1000 + i * self.unique
        prompt = SYSTEM_PROMPT + tuple(range(base, base + self.unique))
        sampling = SamplingParams(max_tokens=self.rng.randint(*self.max_tokens))
        return Request(f"r{i}", prompt, sampling, arrival_s=now_s)


def run_once(policy: str, num_running: int, args: argparse.Namespace) -> dict:
    """One fresh scheduler: warm up, then time args.steps steps; per-step nanoseconds and steady-state facts."""
    longest = args.prompt_tokens + args.max_tokens_high
    config = SchedulerConfig(
        max_num_seqs=num_running,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=longest,
        num_kv_blocks=num_running * -(-longest // BLOCK_SIZE) + 64,  # enough: no preemption
        block_size=BLOCK_SIZE,
        enable_prefix_caching=True,
    )
    s = Scheduler(config, policy)
    work = Workload(args.prompt_tokens, (args.max_tokens_low, args.max_tokens_high), args.seed)
    queue_depth = max(4, num_running // 8)
    clock = time.perf_counter_ns
    now = 0.0
    step_ns: list[int] = []
    exec_ns = 0
    seqs = decodes = prefill = 0
    for i in range(args.warmup + args.steps):
        while len(s.waiting) < queue_depth:
            s.add_request(work.next(now), now)
        t0 = clock()
        plan = s.schedule(now)
        t1 = clock()
        result = execute(plan)
        t2 = clock()
        s.commit(plan, result, now)
        t3 = clock()
        now += 0.001
        if i >= args.warmup:
            step_ns.append((t1 - t0) + (t3 - t2))
            exec_ns += t2 - t1
            seqs += len(plan.chunks)
            prefill += plan.num_prefill_tokens
            decodes += plan.num_decode_seqs
    step_ns.sort()
    n = len(step_ns)
    return {
        "median_us": step_ns[n // 2] / 1e3,
        "p90_us": step_ns[min(n - 1, int(n * 0.9))] / 1e3,
        "mean_us": sum(step_ns) / n / 1e3,
        "executor_mean_us": exec_ns / n / 1e3,
        "mean_seqs_per_step": seqs / n,
        "mean_decodes_per_step": decodes / n,
        "mean_prefill_tokens_per_step": prefill / n,
        "prefix_hit_rate": s.stats.num_prefix_hit_tokens / max(1, s.stats.num_prompt_tokens),
        "preemptions": s.stats.num_preemptions,
    }


def clock_overhead_ns() -> float:
    """Median cost of one time.perf_counter_ns() call: each timed interval includes about one."""
    clock = time.perf_counter_ns
    gaps = []
    for _ in range(20001):
        t0 = clock()
        gaps.append(clock() - t0)
    return statistics.median(gaps)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every (policy, size) a few times interleaved, print the medians."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256], help="running requests (= max_num_seqs)")
    p.add_argument("--policies", nargs="+", default=["continuous", "chunked"])
    p.add_argument("--steps", type=int, default=3000, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1000, help="untimed steps first (several request lifetimes)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the table shows their medians")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens-low", type=int, default=96)
    p.add_argument("--max-tokens-high", type=int, default=160)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if args.prompt_tokens <= len(SYSTEM_PROMPT):
        p.error(f"--prompt-tokens must exceed the {len(SYSTEM_PROMPT)}-token shared system prompt")
    if not 1 <= args.max_tokens_low <= args.max_tokens_high:
        p.error("need 1 <= --max-tokens-low <= --max-tokens-high")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("need --steps >= 1, --warmup >= 0 and --repeats >= 1")

    configs = [(policy, n) for policy in args.policies for n in args.sizes]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):  # interleaved, so a noisy moment hits every configuration alike
        for policy, n in configs:
            runs[(policy, n)].append(run_once(policy, n, args))
    rows = []
    for (policy, n), rs in runs.items():
        row = {"policy": policy, "running": n, "runs": len(rs)}
        for key in rs[0]:
            row[key] = statistics.median(r[key] for r in rs)
        row["median_us_runs"] = [round(r["median_us"], 1) for r in rs]
        rows.append(row)
    meta = {"python": sys.version.split()[0], "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "prompt_tokens": args.prompt_tokens, "shared_prefix_tokens": len(SYSTEM_PROMPT),
            "max_tokens": [args.max_tokens_low, args.max_tokens_high],
            "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": BLOCK_SIZE,
            "clock_overhead_ns": clock_overhead_ns()}
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return 0
    print(f"schedule()+commit() per step, median of {args.repeats} runs x {args.steps} steps "
          f"(after {args.warmup} warm-up); executor excluded; perf_counter_ns overhead "
          f"{meta['clock_overhead_ns']:.0f} ns per interval")
    print(f"{'policy':<11} {'running':>7} {'median us':>10} {'p90 us':>8} {'us/seq':>7} {'seqs/step':>9} "
          f"{'prefill tok/step':>16} {'prefix hit':>10} {'exec us':>8}")
    for r in rows:
        print(f"{r['policy']:<11} {r['running']:>7} {r['median_us']:>10.1f} {r['p90_us']:>8.1f} "
              f"{r['median_us'] / r['running']:>7.2f} {r['mean_seqs_per_step']:>9.1f} "
              f"{r['mean_prefill_tokens_per_step']:>16.1f} {r['prefix_hit_rate']:>10.2f} "
              f"{r['executor_mean_us']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
