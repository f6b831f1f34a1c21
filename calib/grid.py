"""The calibration grid: deterministic scenarios of step shapes, and the plain loop that drives one on a backend.

Each scenario is a small set of requests (some arriving at a given step) run by a real Scheduler in a plain
schedule -> step -> commit loop, so the same step of a scenario has the same shape in every repeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.loop import run_step
from scheduler.messages import StepPlan

VOCAB_HI = 32000  # token ids drawn from [10, 32000): valid in every supported vocabulary


@dataclass(frozen=True)
class Scenario:
    """Requests (at_step, prompt_len, max_tokens, shared prefix tokens) run by one policy."""

    label: str
    policy: str
    arrivals: tuple[tuple[int, int, int, int], ...]
    overrides: dict = field(default_factory=dict)
    idle_s: float = 0.0  # sleep before every step: the engine waits for work, as between sparse arrivals


def _decode_grid(quick: bool, max_len: int) -> list[Scenario]:
    out = []
    # every batch size at a short context (decode cost is not smooth in B: 8, 12, 16 beat their neighbours),
    # a few at longer contexts for the attention term
    sizes = {24: range(1, 17), 160: (1, 2, 4, 6, 8, 12, 16)} if not quick else {32: (1, 2, 4, 6, 8, 12, 16)}
    for length, batch_sizes in sizes.items():
        for b in batch_sizes:
            out.append(Scenario(f"decode B={b} L={length}", "continuous", ((0, length, 8 if quick else 12, 0),) * b))
    long = min(320, max_len - 16)
    if not quick and long > 200:
        for b in (1, 4, 12):
            out.append(Scenario(f"decode B={b} L={long}", "continuous", ((0, long, 8, 0),) * b))
    patterns = [[12 if i % 2 == 0 else 3 for i in range(16)], [2 if i % 3 == 1 else 12 for i in range(16)],
                [3 + (7 * i) % 11 for i in range(16)], [12 if 4 <= i < 12 else 2 for i in range(16)]]
    for k, pattern in enumerate(patterns[:2] if quick else patterns):
        out.append(Scenario(f"fragmented decode {k}", "continuous", tuple((0, 40, t, 0) for t in pattern)))
    return out


def _prefill_grid(quick: bool, max_len: int) -> list[Scenario]:
    top = min(500, max_len - 2)
    # flash attention's cost jumps just past multiples of 128 tokens (see backends.cost.ubatch.fa_tiles):
    # sizes on both sides of 128, 256 and 384
    sizes = (16, 128, top) if quick else tuple(sorted({8, 16, 32, 64, 96, 128, 144, 192} | {
        min(n, top) for n in (256, 264, 320, 384, 400, 448)} | {top}))
    out = [Scenario("prefill sizes", "sequential", tuple((0, p, 2, 0) for p in sizes))]
    for cap in ((64,) if quick else (32, 64, 128)):
        out.append(Scenario(f"chunked prefill {cap}", "chunked", ((0, min(250, top), 2, 0),),
                            {"max_prefill_chunk_tokens": cap}))
    if not quick:  # chunks deep into a long prompt: attention over up to top positions of context
        for cap in (64, 128, 256):
            out.append(Scenario(f"chunked prefill {cap} long", "chunked", ((0, top, 2, 0),),
                                {"max_prefill_chunk_tokens": cap}))
    out.append(Scenario("unequal prompts", "continuous", tuple((0, p, 3, 0) for p in (40, 80, 120, 160))))
    if not quick:
        out.append(Scenario("unequal prompts 8", "continuous",
                            tuple((0, p, 4, 0) for p in (17, 150, 33, 96, 64, 200, 8, 120))))
        out.append(Scenario("padded static", "static:padding=true",
                            tuple((0, p, t, 0) for p, t in ((20, 2), (60, 4), (100, 8), (140, 12)))))
    return out


def _mixed_grid(quick: bool) -> list[Scenario]:
    out = []
    for b in ((4, 15) if quick else (1, 4, 8, 15)):
        for p in ((64,) if quick else (16, 64, 200)):
            arrivals = ((0, 32, 14, 0),) * b + ((3, p, 4, 0),)
            out.append(Scenario(f"mixed B={b}+P={p}", "continuous", arrivals))
    budget = 96 if quick else 128
    out.append(Scenario(f"chunked mixed budget {budget}", "chunked", ((0, 32, 16, 0),) * 8 + ((3, 240, 3, 0),),
                        {"max_num_batched_tokens": budget}))
    for shared in ((128,) if quick else (48, 128, 176)):
        arrivals = ((0, 192, 1, 192),) + ((2, shared + 16, 3, shared),) * 4 + ((2, 32, 3, 0),)
        out.append(Scenario(f"prefix copy {shared}", "continuous", arrivals))
    # the first step after the engine waited for an arrival wakes llama.cpp's threads: light loads are made of them
    prompts = (16, 96) if quick else (8, 24, 48, 96, 160)
    out.append(Scenario("after idle", "sequential", tuple((0, p, 2, 0) for p in prompts), idle_s=0.25))
    if not quick:
        out.append(Scenario("after idle B=4", "continuous", ((0, 32, 5, 0),) * 4, idle_s=0.25))
    return out


def grid(quick: bool = False, max_len: int = 512) -> list[Scenario]:
    """The calibration scenarios (prompts up to max_len tokens): decodes, prefills, mixed steps, prefix copies."""
    if max_len < 220:
        raise ValueError(f"calibration needs a context of at least 220 tokens per slot, got {max_len}; "
                         "raise n_ctx or lower n_seq_max")
    return _decode_grid(quick, max_len) + _prefill_grid(quick, max_len) + _mixed_grid(quick)


def _requests(s: Scenario, tag: str, rng: np.random.Generator) -> list[tuple[int, Request]]:
    base = rng.integers(10, VOCAB_HI, size=256).tolist()  # prompts with a shared prefix start with these tokens
    out = []
    for i, (at, n, max_tokens, shared) in enumerate(s.arrivals):
        own = rng.integers(10, VOCAB_HI, size=n).tolist()
        prompt = base[:shared] + own[shared:]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # what sim.model.to_request gives a trace row
        out.append((at, Request(f"{tag}-{i}", tuple(prompt), sp)))
    return out


def drive(backend, config: SchedulerConfig, scenario: Scenario, tag: str,
          rng: np.random.Generator) -> list[tuple[StepPlan, float]]:
    """Run one scenario; return each step's plan and the wall time of schedule + step + commit."""
    sched = Scheduler(replace(config, **scenario.overrides), scenario.policy)
    pending = _requests(scenario, tag, rng)
    out: list[tuple[StepPlan, float]] = []
    now, step = 0.0, 0
    backend.clear_kv()
    while True:
        while pending and pending[0][0] <= step:
            sched.add_request(pending.pop(0)[1], now)
        if scenario.idle_s:
            time.sleep(scenario.idle_s)
        t0 = time.perf_counter()
        # the step is planned and committed at the virtual time now: the clock does not move within it
        done = run_step(sched, backend, lambda t=now: t)
        if done.result is None:
            if not pending:
                break
            step = pending[0][0]
            continue
        elapsed = time.perf_counter() - t0
        if done.result.failed:
            raise RuntimeError(f"calibration scenario {scenario.label!r}: the backend failed: {done.result.failed}")
        out.append((done.plan, elapsed))
        now += elapsed
        step += 1
    backend.clear_kv()
    return out
