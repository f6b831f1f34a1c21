"""Several real-time instances step at the same time, each on its own thread (sim.rt)."""

import threading
import time

import pytest

from backends.cost import LinearCostModel
from backends.synthetic import SyntheticBackend
from scheduler import SchedulerConfig, StepResult
from sim.model import run_workload
from sim.workload import synthetic_workload

CFG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=256, block_size=16,
                      max_model_len=1024)
STEP_S = 0.02


class Sleeper:
    """A backend whose step takes STEP_S of wall time without holding the GIL, as llama_decode does."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.inner = SyntheticBackend(LinearCostModel())
        self.spans: list[tuple[float, float, str]] = []
        self.plans = []
        self.fail_at = fail_at

    def clear_kv(self):
        self.inner = SyntheticBackend(LinearCostModel())

    def step(self, plan):
        t0 = time.perf_counter()
        if self.fail_at is not None and len(self.spans) == self.fail_at:
            raise RuntimeError("backend broke")
        time.sleep(STEP_S)
        result = self.inner.step(plan)
        t1 = time.perf_counter()
        if plan.chunks:  # not the cache release after the run
            self.spans.append((t0, t1, threading.current_thread().name))
            self.plans.append(plan)
        return StepResult(result.sampled_token_ids, t1 - t0, result.failed)


def workload(n=8, out=10):
    # all requests at t=0: each instance has steps queued from the start
    return synthetic_workload("poisson", 1e6, n, "fixed:16", f"fixed:{out}", 0)


def test_two_instances_step_at_the_same_time():
    one, two = [Sleeper()], [Sleeper(), Sleeper()]
    w = workload()
    t0 = time.perf_counter()
    r1 = run_workload(w, "sequential", CFG, one, realtime=True)
    serial_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r2 = run_workload(w, "sequential", CFG, two, realtime=True)
    parallel_s = time.perf_counter() - t0
    assert all(r.finish_reason == "length" and r.num_output_tokens == 10 for r in r1.records + r2.records)
    assert len(one[0].spans) == len(two[0].spans) + len(two[1].spans)
    # one instance ran every step; two ran half each at once: about half the wall time
    assert parallel_s < 0.7 * serial_s
    overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1, _ in two[0].spans for b0, b1, _ in two[1].spans)
    assert overlap > 0.5 * sum(b - a for a, b, _ in two[1].spans)
    # each instance's steps ran on its own thread, none on SimPy's
    names = [{n for _, _, n in b.spans} for b in two]
    assert len(names[0]) == len(names[1]) == 1 and names[0] != names[1]
    assert threading.main_thread().name not in names[0] | names[1]
    assert r2.config["parallel_instances"]["threads"] is True


def test_step_ends_land_at_start_plus_measured_time():
    backends = [Sleeper(), Sleeper()]
    res = run_workload(workload(n=4, out=6), "continuous", CFG, backends, realtime=True)
    late = 0
    for i, b in enumerate(backends):
        steps = [s for s in res.steps if s.instance == i]
        assert len(steps) == len(b.spans)
        for s, (a, z, _) in zip(steps, b.spans, strict=True):
            # a step ends at its start plus its measured time, unless SimPy's clock had already passed that
            # (the other instance's step ended in between, a hand-over earlier): then it ends at once
            over = (s.end_s - s.start_s) - (z - a)
            assert -1e-9 <= over <= 0.005
            late += over > 1e-9
    par = res.config["parallel_instances"]
    assert late == par["late_steps"] and par["max_late_s"] <= 0.005


def test_a_failing_step_raises_in_the_caller_and_stops_the_threads():
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="backend broke"):
        run_workload(workload(), "continuous", CFG, [Sleeper(), Sleeper(fail_at=2)], realtime=True)
    time.sleep(0.05)
    assert threading.active_count() == before


# -- busy neighbours (sim.neighbours) ----------------------------------------------------------
def test_neighbours_serve_on_their_own_threads_until_the_block_ends():
    from sim.neighbours import Neighbours

    backends = [Sleeper(), Sleeper()]
    with Neighbours(backends, CFG, seed=1, running=3) as busy:
        time.sleep(0.3)
    counts = list(busy.num_steps)
    time.sleep(0.1)
    assert busy.num_steps == counts  # stopped at the end of the block
    for b, n in zip(backends, counts, strict=True):
        assert n >= 5 and len(b.spans) >= 5
        assert {name for _, _, name in b.spans} != {threading.main_thread().name}
    # several requests at a time, prompt steps and decode-only steps
    plans = [p for b in backends for p in b.plans]
    assert max(len(p.chunks) for p in plans) == 3
    assert any(p.num_prefill_tokens for p in plans) and any(not p.num_prefill_tokens for p in plans)


def test_a_failing_neighbour_is_reported_when_the_block_ends():
    from sim.neighbours import Neighbours

    with pytest.raises(RuntimeError, match="a neighbour instance failed: backend broke"):
        with Neighbours([Sleeper(fail_at=1)], CFG):
            time.sleep(0.1)


# -- the default profile for N instances ---------------------------------------------------------
def test_the_default_profile_follows_the_number_of_instances():
    from backends.cost import known_cost_models
    from sim.cli_common import default_profile

    assert default_profile(1) == ("cpu-gemma3-270m", "default")
    name, note = default_profile(2)
    assert "cpu-gemma3-270m-x2" in known_cost_models()
    assert name == "cpu-gemma3-270m-x2" and "sharing this machine's cores" in note and "--cost cpu-gemma3-270m" in note
    name, note = default_profile(3)  # none bundled for 3: each instance priced as a machine of its own
    assert name == "cpu-gemma3-270m" and "no bundled profile for 3 instances" in note
