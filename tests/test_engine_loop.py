"""The engine thread (serve.engine.EngineLoop) waits instead of stepping while stepping would change nothing.

A plan that runs nothing either names a wake-up time (the loop waits on its inbox until then) or names none
(only a request arriving or an abort changes it: the loop blocks on its inbox). Both engines built on it,
OnlineEngine and the server's AsyncEngine, are checked by counting core.step() calls during such a hold.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.cost import load_cost_model
from scheduler import SamplingParams, SchedulerConfig
from scheduler.policies import FunctionPolicy, make_policy
from serve.engine import Completion, EngineCore, OnlineEngine
from serve.sim_backend import ByteTokenizer, RealTimeSyntheticBackend

WAIT_S = 0.4  # the static policy's wait for a full batch


def counted_core(policy) -> tuple[EngineCore, list[float]]:
    """An EngineCore on the real-time synthetic backend whose step() calls are recorded (engine clock)."""
    backend = RealTimeSyntheticBackend(load_cost_model("cpu-gemma3-270m"), SchedulerConfig(), ByteTokenizer())
    core = EngineCore(backend, policy)
    calls: list[float] = []
    step = core.step

    def counting_step():
        calls.append(core.now())
        return step()

    core.step = counting_step
    return core, calls


def pairs(sched, now_s, limit):
    """Admit only two requests at a time: one alone waits, with no wake-up time, until another arrives."""
    return sched.waiting[:limit] if len(sched.waiting) >= 2 or sched.running else []


def test_online_engine_waits_for_the_static_policys_wake_up_instead_of_spinning():
    core, calls = counted_core(make_policy("static", batch_size=4, wait_s=WAIT_S))
    engine = OnlineEngine(core)
    try:
        stream = engine.submit("hello", SamplingParams(max_tokens=3, ignore_eos=True), request_id="alone")
        comp = stream.result(timeout=30)
        assert comp.finish_reason == "length" and comp.num_output_tokens == 3
        assert comp.first_token_s - comp.arrival_s >= WAIT_S * 0.9  # held for its batch, then ran
        held = [t for t in calls if t < comp.arrival_s + WAIT_S]
        assert len(held) <= 5, f"{len(held)} steps while the request waited {WAIT_S} s for its batch"
    finally:
        engine.shutdown()


def test_online_engine_blocks_while_a_plan_names_no_wake_up():
    core, calls = counted_core(FunctionPolicy(pairs))
    engine = OnlineEngine(core)
    try:
        first = engine.submit("one", SamplingParams(max_tokens=2, ignore_eos=True), request_id="one")
        time.sleep(0.3)
        assert first.completion is None and len(calls) <= 3, f"{len(calls)} steps while nothing could change"
        second = engine.submit("two", SamplingParams(max_tokens=2, ignore_eos=True), request_id="two")
        assert first.result(timeout=30).num_output_tokens == 2
        assert second.result(timeout=30).num_output_tokens == 2
    finally:
        engine.shutdown()


def test_async_engine_blocks_while_a_plan_names_no_wake_up_and_still_serves():
    from serve.async_engine import AsyncEngine
    from serve.metrics import ServerMetrics

    core, calls = counted_core(FunctionPolicy(pairs))
    loop = asyncio.new_event_loop()
    engine = AsyncEngine(core, ServerMetrics("m"), loop)
    try:
        q1, _ = engine.submit((1, 5, 6, 7), [SamplingParams(max_tokens=2, ignore_eos=True)])
        time.sleep(0.3)
        assert len(calls) <= 3, f"{len(calls)} steps while nothing could change"
        q2, _ = engine.submit((1, 8, 9), [SamplingParams(max_tokens=2, ignore_eos=True)])

        async def finish(q: asyncio.Queue) -> Completion:
            while True:
                _, item, _ = await asyncio.wait_for(q.get(), 30)
                if isinstance(item, Completion):
                    return item

        for q in (q1, q2):
            comp = loop.run_until_complete(finish(q))
            assert comp.finish_reason == "length" and comp.num_output_tokens == 2
        assert engine.error is None
    finally:
        engine.close()
        loop.close()


def test_online_engine_ends_requests_submitted_behind_shutdown():
    """A request that reaches the inbox after the stop still ends, with finish reason abort; submit afterwards
    is refused."""
    core, _ = counted_core("continuous")
    engine = OnlineEngine(core)
    engine.stop()  # the thread has stopped, as if shutdown's stop landed first
    late = engine.submit(prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    engine.shutdown()
    comp = late.result(timeout=5)
    assert comp is not None and comp.finish_reason == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompt_token_ids=[1, 2, 3])
