"""The SimPy model: an arrival process and one engine process per instance, behind a router.

The same model runs in virtual time (``simpy.Environment``: the clock advances by
each step's ``elapsed_s``, from a cost model or from the measured time of a real
step) and in real time (``simpy.rt.RealtimeEnvironment(strict=False)`` with the
real backend: the step has already spent the wall time, so the timeout only
catches the clock up and arrivals land at their trace times). It holds no policy:
every decision is the scheduler's.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import simpy
import simpy.rt

from backends.cost.base import PricesDecodeRuns, PricesGraphReuse, StepFeatures
from scheduler import Request, Router, SamplingParams, Scheduler, SchedulerConfig
from scheduler.backend import Backend, ClearsKV, KnowsTokens
from scheduler.loop import plan_step, release_kv
from sim.prompt_arrays import forget_prefix_hashes
from sim.records import RequestRecord, RunResult, StepLog
from sim.rt import ThreadedRealtimeEnvironment
from sim.workload import Workload, WorkloadRequest


def to_request(w: WorkloadRequest, ignore_eos: bool = True, sampling: SamplingParams | None = None) -> Request:
    """A scheduler Request for a workload entry (trace lengths are honoured: EOS ignored by default)."""
    sp = sampling or SamplingParams(max_tokens=w.max_tokens, ignore_eos=ignore_eos)
    return Request(w.request_id, w.prompt_token_ids, sp, priority=w.priority, arrival_s=w.arrival_s)


class Engine:
    """One instance: a scheduler and a backend stepping in a SimPy process."""

    def __init__(self, env: simpy.Environment, index: int, scheduler: Scheduler, backend: Backend,
                 recorder: Recorder, fast_forward: bool = False, clock: Any = None) -> None:
        self.env = env
        self.fast_forward = fast_forward
        self.clock = clock  # holds next_arrival_s, kept by the arrival process
        self.index = index
        self.scheduler = scheduler
        self.backend = backend
        self.recorder = recorder
        self.wake = env.event()
        self.idle = False
        self.closed = False
        self.threaded = isinstance(env, ThreadedRealtimeEnvironment)
        self._priced: tuple[Any, int] | None = None  # (cost model, its stretch kind): isinstance on a Protocol is slow

    def submit(self, request: Request) -> None:
        """Hand a request to this instance's scheduler; wake the engine if it sleeps."""
        now = self.env.now
        self.recorder.arrived(request, self.index)
        out = self.scheduler.add_request(request, now)
        if out is not None:
            self.recorder.output(out, request, now)
        self.poke()

    def poke(self) -> None:
        """Wake an idle engine."""
        if self.idle and not self.wake.triggered:
            self.wake.succeed()

    def run(self):
        """The engine loop: schedule, execute, wait the step's time, commit."""
        env, sched, rec = self.env, self.scheduler, self.recorder
        while True:
            plan = plan_step(sched, self.backend, env.now)
            if plan.is_empty:
                if self.closed and not sched.has_unfinished():
                    return
                self.idle = True
                self.wake = env.event()
                if plan.wake_at_s is not None and plan.wake_at_s > env.now:
                    yield self.wake | env.timeout(plan.wake_at_s - env.now)
                else:
                    yield self.wake
                self.idle = False
                continue
            start = env.now
            if self.threaded:  # the step runs on this instance's thread; the event fires at start + elapsed_s
                result = yield env.run_in_thread(self.index, self.backend.step, plan)
            else:
                result = self.backend.step(plan)
                if result.elapsed_s > 0:
                    yield env.timeout(result.elapsed_s)
            now = env.now
            for out in sched.commit(plan, result, now):
                rec.output(out, sched.requests[out.request_id], now)
            pool = sched.pool
            rec.steps.add_row((self.index, start, now, len(plan.chunks), plan.num_prefill_tokens,  # a StepSample
                               plan.num_decode_seqs, len(sched.waiting), len(sched.running),
                               pool.num_used_blocks, pool.num_blocks, plan.num_pad_tokens, plan.num_copied_tokens))
            if self.fast_forward:
                k = sched.fast_forward.decode_horizon()
                if k > 0:
                    yield from self._jump(k)

    def _stretch(self, running, j: int, graph):
        """Pure-decode steps over the running requests from step j of a jump, priced as the backend's step
        would price them (price(i, num_context_tokens) of the stretch's step i), after graph key graph."""
        cost = self.backend.cost_model
        ordered = sorted(running, key=lambda r: r.slot)
        slots = [r.slot for r in ordered]
        kind = self._stretch_kind(cost)
        if kind == 1:  # cost models that price llama.cpp's graph reuse
            return cost.decode_stretch(slots, [r.num_computed_tokens + 1 + j for r in ordered], graph)
        if kind == 2:  # cost models that hoist the fixed part (and slot layout)
            return _Stateless(cost.decode_pricer(slots), graph)
        n = len(slots)
        return _Stateless(lambda ctx: cost.predict_s(StepFeatures(0, n, ctx, 0, 0, 0, n, 0, 0)), graph)

    def _stretch_kind(self, cost) -> int:
        """1: PricesGraphReuse, 2: PricesDecodeRuns, 0: neither (checked once per cost model)."""
        if self._priced is None or self._priced[0] is not cost:
            kind = 1 if isinstance(cost, PricesGraphReuse) else 2 if isinstance(cost, PricesDecodeRuns) else 0
            self._priced = (cost, kind)
        return self._priced[1]

    def _timeline(self, running: list[Request], horizon: int, t: float, graph, limit: float, straddle: bool):
        """The skipped steps of one run: their ends and batch sizes, priced per stretch between finishes (the
        batch shrinks as requests finish), up to horizon or to the step an arrival must be planned with;
        returns (ends, sizes, the graph key after the last step)."""
        left = sorted((r.sampling.max_tokens - len(r.output_token_ids), i) for i, r in enumerate(running))
        alive = list(running)
        base = sum(r.num_computed_tokens for r in running) + len(running)  # context at step 0
        ends: list[float] = []
        sizes: list[int] = []
        j = 0
        f = 0  # index into left: the next requests to finish
        while j < horizon:
            n = len(alive)
            stretch, j0 = self._stretch(alive, j, graph), j
            price = stretch.price
            stretch_end = min(left[f][0], horizon)  # steps j .. stretch_end - 1 have this batch
            stop = False
            while j < stretch_end:
                t_next = t + price(j - j0, base + j * n)
                if (t if straddle else t_next) >= limit:
                    stop = True  # the arrival must be seen by the next plan: leave it to a plain step
                    break
                ends.append(t_next)
                sizes.append(n)
                t = t_next
                j += 1
            if j > j0:
                graph = stretch.graph_after(j - 1 - j0)
            if stop or j >= horizon:
                break
            gone = set()
            while f < len(left) and left[f][0] == j:  # these got their last token at step j - 1
                r = running[left[f][1]]
                gone.add(r.request_id)
                base -= r.num_computed_tokens + 1
                f += 1
            alive = [r for r in alive if r.request_id not in gone]
        return ends, sizes, graph

    def _sample_steps(self, run_start: float, ends: list[float], sizes: list[int], done, adds: list[int],
                      used: int, waiting: int) -> None:
        """Step samples of a run's skipped steps, as their plain commits would have taken them."""
        sched, pool, add = self.scheduler, self.scheduler.pool, self.recorder.steps.add_row
        index, total, m = self.index, pool.num_blocks, len(ends)
        finished_at = [0] * m
        for step, _ in done:
            finished_at[step] += 1
        u = used
        s0 = run_start
        for j in range(m - 1):
            u += adds[j]
            add((index, s0, ends[j], sizes[j], 0, sizes[j], waiting, sizes[j] - finished_at[j], u, total, 0, 0))
            s0 = ends[j]
        # the last step is sampled after its finishes (and any arrival during it), as a plain commit would
        add((index, s0, ends[-1], sizes[-1], 0, sizes[-1], len(sched.waiting), len(sched.running),
             pool.num_used_blocks, total, 0, 0))

    def _jump(self, k: int):
        """Run pure-decode steps at once, across finishes, until an arrival: same results as plain steps.

        A run covers up to k steps (decode_horizon: to the first finish), or, when finishes change
        nothing but the batch (decode_run_horizon), every step to the last finish. Requests that
        finish inside the run are retired at their exact times; no plain step or SimPy event is
        needed until the next arrival.
        """
        env, sched, rec = self.env, self.scheduler, self.recorder
        limit = self.clock.next_arrival_s
        # A step that starts before an arrival is planned without it, so it may be skipped even when the
        # arrival lands while it runs -- unless the router reads the KV index, which the jump fills early.
        straddle = not self.clock.router_reads_kv
        pool = sched.pool
        t = env.now
        backend = self.backend  # a KnowsTokens: only such backends are fast-forwarded
        ff = sched.fast_forward
        graph = backend.graph
        path: list[float] = []  # the skipped steps' ends since SimPy's clock last moved
        while k > 0:
            running = list(sched.running)
            horizon = ff.decode_run_horizon() or k
            run_start = t
            ends, sizes, graph = self._timeline(running, horizon, t, graph, limit, straddle)
            m = len(ends)
            if m == 0:
                break
            t = ends[-1]
            backend.graph = graph
            backend.end_s = ends[-1]  # the next plain step straight after the jump is not after idle
            used = pool.num_used_blocks
            announced, done, adds = ff.apply_decode_steps(m, backend.take_tokens)
            if announced:
                backend.forget(announced)
            records = rec.records
            last_step = {r.request_id: step for step, r in done}  # requests that got their last token
            for r in running:
                record = records[r.request_id]
                got = last_step.get(r.request_id, m - 1) + 1  # tokens, one at the end of each step it was in
                record.token_times_s += ends if got == m else ends[:got]
                record.num_output_tokens += got
            last = ends[-1]
            # requests that finished before the last step: retired at their step's end, and announced to
            # the backend by the later skipped plans, as plain steps would
            finals = [r for step, r in done if step == m - 1]
            early = [(step, r) for step, r in done if step < m - 1]
            for step, r in early:
                for x, out in ff.finish_decode_steps([r], ends[step]):
                    rec.output(out, x, ends[step])
            if early:
                backend.forget(ff.take_announced())
            waiting = len(sched.waiting)
            arrived = last >= limit  # an arrival lands during the last step: SimPy must deliver it first
            path += ends
            if arrived:
                for d in _reach(env.now, path):
                    yield env.timeout(d)
                path = []
            for r, out in ff.finish_decode_steps(finals, last):  # at the end of the last step, as its commit would
                rec.output(out, r, last)
            self._sample_steps(run_start, ends, sizes, done, adds, used, waiting)
            if arrived or m < horizon:
                break
            k = ff.decode_horizon()
        if t > env.now:
            for d in _reach(env.now, path):
                yield env.timeout(d)


class _Stateless:
    """A stretch of a cost model that prices each step alone: price(i, ctx) = price(ctx)."""

    __slots__ = ("_price", "_graph")

    def __init__(self, price: Callable[[int], float], graph) -> None:
        self._price, self._graph = price, graph

    def price(self, _i: int, ctx: int) -> float:
        """Seconds of a step with num_context_tokens ctx."""
        return self._price(ctx)

    def graph_after(self, _i: int):
        """The graph key, unchanged."""
        return self._graph


def _exact_delay(now: float, target: float) -> float | None:
    """A delay d with now + d == target exactly, as SimPy computes it (None if no float d lands there)."""
    d = target - now
    for _ in range(8):
        got = now + d
        if got == target:
            return d
        d = math.nextafter(d, math.inf if got < target else -math.inf)
    return None


def _delay_to(now: float, target: float) -> float:
    """A delay towards target (> now) that SimPy's clock lands on exactly, or else one to a point in
    [target / 2, target), from where target - point is exact (Sterbenz) and the next delay lands.

    A request is due at its own arrival time: now + (target - now) can miss it by an ulp either way
    (0.4 + (1.4452 - 0.4) == 1.4451999999999998), and no float delay from 0.4 lands on 1.4452.
    """
    d = _exact_delay(now, target)
    if d is not None:
        return d
    return 0.75 * target - now


def _reach(now: float, path: list[float]) -> list[float]:
    """Delays that take SimPy's clock from now to path[-1] exactly, as plain steps would have.

    path holds the skipped steps' ends, each its predecessor plus one float. One delay from now may
    not land on path[-1] (now + d can skip it when now is finer-grained than the target): then go to
    the latest end one delay lands on, and from there step by step, as the plain steps went.
    """
    for i in range(len(path) - 1, -1, -1):
        d = _exact_delay(now, path[i])
        if d is not None:
            return [d] + [_exact_delay(path[k - 1], path[k]) for k in range(i + 1, len(path))]
    raise ArithmeticError(f"no float delay takes {now!r} to {path[0]!r}")


class Recorder:
    """Collects request records and step samples as the run goes."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None = None) -> None:
        self.records: dict[str, RequestRecord] = {}
        self.steps = StepLog()  # columns: a replay records ~10^5 steps
        self.total = total
        self.done = 0
        self.progress = progress

    def arrived(self, r: Request, instance: int) -> None:
        """A request reached an instance."""
        self.records[r.request_id] = RequestRecord(r.request_id, r.arrival_s, r.num_prompt_tokens, r.max_tokens,
                                                   instance=instance, priority=r.priority)

    def output(self, out, r: Request, now: float) -> None:
        """Apply one RequestOutput."""
        rec = self.records[out.request_id]
        new = out.new_token_ids
        if new:
            if rec.first_token_s is None:
                rec.first_token_s = now
            if len(new) == 1:
                rec.token_times_s.append(now)
                rec.num_output_tokens += 1
            else:
                rec.token_times_s += [now] * len(new)
                rec.num_output_tokens += len(new)
        if out.finished:
            rec.finish_s = now
            rec.finish_reason = out.finish_reason
            rec.detail = out.detail
            rec.first_scheduled_s = r.first_scheduled_s
            rec.num_cached_tokens = r.num_cached_tokens
            rec.num_preemptions = r.num_preemptions
            rec.num_recomputed_tokens = r.num_recomputed_tokens
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)


def run_workload(workload: Workload, policy: Any, config: SchedulerConfig, backends: Sequence[Backend],
                 router: str = "least_outstanding", realtime: bool = False, ignore_eos: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 request_factory: Callable[[WorkloadRequest], Request] | None = None,
                 configs: Sequence[SchedulerConfig] | None = None, fast_forward: bool | None = None) -> RunResult:
    """Replay a workload through len(backends) instances; return every record and step sample.

    fast_forward (default: whenever it is exact, i.e. virtual time and backends that know their
    tokens in advance and never stop early) skips pure-decode stretches in computed jumps.
    """
    if not backends:
        raise ValueError("run_workload needs at least one backend")
    if realtime:  # several real instances step at the same time, each on its own thread (sim.rt)
        env = ThreadedRealtimeEnvironment() if len(backends) > 1 else simpy.rt.RealtimeEnvironment(strict=False)
    else:
        env = simpy.Environment()
    recorder = Recorder(len(workload.requests), progress)
    configs = list(configs) if configs is not None else [config] * len(backends)
    schedulers = [Scheduler(c, policy) for c in configs]
    # a cost model that carries the unified KV stream's cells from step to step prices no stretch of steps
    # from their slots alone, so its runs step through every decode
    can_skip = not realtime and all(isinstance(b, KnowsTokens) and b.never_eos
                                    and not getattr(b.cost_model, "tracks_kv_cells", False) for b in backends)
    if fast_forward and not can_skip:
        raise ValueError("fast_forward needs virtual time and backends that know their tokens (SyntheticBackend "
                         "without scripted EOS)")
    skip = can_skip if fast_forward is None else fast_forward
    clock = _Clock()
    clock.router_reads_kv = router == "prefix_affinity" and len(backends) > 1
    pairs = enumerate(zip(schedulers, backends, strict=True))
    engines = [Engine(env, i, s, b, recorder, skip, clock) for i, (s, b) in pairs]
    routing = Router(router)
    make = request_factory or (lambda w: to_request(w, ignore_eos))
    wall_start = time.perf_counter()

    def arrivals():
        for w in sorted(workload.requests, key=lambda w: w.arrival_s):
            if w.arrival_s > env.now:
                clock.next_arrival_s = w.arrival_s
                while env.now < w.arrival_s:  # lands on arrival_s exactly: at most two delays
                    yield env.timeout(_delay_to(env.now, w.arrival_s))
            request = make(w)
            engines[routing.route(request, schedulers)].submit(request)
        clock.next_arrival_s = math.inf
        for e in engines:
            e.closed = True
            e.poke()

    for b in backends:  # a backend reused across runs starts each run with an empty KV cache
        if isinstance(b, ClearsKV):
            b.clear_kv()
    env.process(arrivals())
    procs = [env.process(e.run()) for e in engines]
    with _cyclic_gc_paused():
        try:
            env.run(until=simpy.AllOf(env, procs))
        finally:
            if isinstance(env, ThreadedRealtimeEnvironment):
                env.close()
    for s, b in zip(schedulers, backends, strict=True):  # hand the prefix cache back: nothing outlives the run
        release_kv(s, b, env.now)
    forget_prefix_hashes(w.prompt_token_ids for w in workload.requests)  # nor the prompts' hashes made for it
    records = [recorder.records[w.request_id] for w in workload.requests if w.request_id in recorder.records]
    first = min((r.arrival_s for r in records), default=0.0)
    last = max((r.finish_s for r in records if r.finish_s is not None), default=first)
    cfg = {"policy": schedulers[0].policy.describe(), "scheduler": asdict(config),
           "num_instances": len(backends), "router": router, "realtime": realtime,
           "workload": workload.description, "wall_s": time.perf_counter() - wall_start,
           "fast_forward": skip}
    if isinstance(env, ThreadedRealtimeEnvironment):
        cfg["parallel_instances"] = {"threads": True, "late_steps": env.num_late, "max_late_s": env.max_late_s}
    return RunResult(policy=schedulers[0].policy.describe(), records=records, steps=recorder.steps,
                     duration_s=last - first, config=cfg,
                     num_preemptions=sum(s.stats.num_preemptions for s in schedulers),
                     num_recomputed_tokens=sum(s.stats.num_recomputed_tokens for s in schedulers),
                     ttft_timing="computed")


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a run.

    A replay allocates millions of small objects that live until the run ends (KV blocks, token lists,
    records); the cyclic collector would scan them again and again for nothing.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if gc.get_freeze_count() == 0:
                # the run's survivors would make the first young collection scan all of them (~0.15 s for a
                # full trace); promote them to the oldest generation unscanned, as if they had aged there
                gc.freeze()
                gc.unfreeze()
            gc.enable()


class _Clock:
    """Shared between the arrival process and the engines: when the next arrival lands."""

    next_arrival_s = 0.0
    router_reads_kv = False
