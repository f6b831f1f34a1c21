"""The public property-testing kit catches a broken policy and shrinks the counterexample."""

import pytest
from hypothesis import HealthCheck, settings

from scheduler import Policy, Scheduler, SchedulerConfig, register_policy
from scheduler.testing import InvariantError, policy_state_machine


class StarvesLongPrompts(Policy):
    """Broken on purpose: prompts over 30 tokens are never admitted."""

    name = "starves-long"

    def select(self, sched, now_s, limit):
        return [r for r in sched.waiting if r.num_prompt_tokens <= 30][:limit]


def oldest_first(sched, now_s, limit):
    """A correct function policy: oldest arrival first."""
    return sorted(sched.waiting, key=lambda r: r.arrival_s)[:limit]


def test_kit_catches_a_starving_policy_with_a_shrunk_example():
    machine = policy_state_machine(StarvesLongPrompts, max_examples=300, stateful_step_count=15)
    # derandomized: the same search every run, so the test cannot pass or fail by luck
    machine.TestCase.settings = settings(machine.TestCase.settings, suppress_health_check=list(HealthCheck),
                                         database=None, print_blob=False, derandomize=True)
    with pytest.raises(InvariantError, match="deadlock|never finished|unfinished") as info:
        machine.TestCase().runTest()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    steps = [line for line in notes.splitlines() if line.strip().startswith("state.") and "invariants" not in line]
    assert any("state.add" in line for line in steps)
    assert len(steps) <= 8  # shrunk well below the 15-step runs it searched (typically setup, one add, teardown)


def test_kit_passes_a_correct_function_policy():
    machine = policy_state_machine(oldest_first, max_examples=30, stateful_step_count=20)
    machine.TestCase.settings = settings(machine.TestCase.settings, suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_registered_function_policy_is_usable_by_name():
    register_policy("oldest-first", oldest_first)
    s = Scheduler(SchedulerConfig(), "oldest-first")
    assert s.policy.name == "oldest-first"


def _quiet(machine, max_examples=None):
    """Derandomized settings: the same search every run, so a test cannot pass or fail by luck."""
    extra = {} if max_examples is None else {"max_examples": max_examples}
    machine.TestCase.settings = settings(machine.TestCase.settings, suppress_health_check=list(HealthCheck),
                                         database=None, print_blob=False, derandomize=True, **extra)
    return machine


def test_kit_reports_the_invariant_a_step_broke(monkeypatch):
    import scheduler.testing as kit

    real = kit.check_plan

    def strict(sched, plan):  # a user's extra rule, broken by any batch of two
        real(sched, plan)
        if len(plan.chunks) >= 2:
            raise InvariantError("two chunks in one step")

    monkeypatch.setattr(kit, "check_plan", strict)
    machine = _quiet(policy_state_machine("continuous", max_examples=200, stateful_step_count=10))
    # before: teardown planned again over the failed step and raised "schedule() called twice without commit()"
    with pytest.raises(InvariantError, match="two chunks in one step"):
        machine.TestCase().runTest()


def test_kit_takes_an_instance_factory():
    from scheduler.policies import Static

    made = []

    def factory():
        made.append(Static(batch_size=2))
        return made[-1]

    machine = _quiet(policy_state_machine(factory, max_examples=5, stateful_step_count=8))
    machine.TestCase().runTest()  # before: the factory was taken as a select function and failed
    assert len(made) >= 2 and len({id(p) for p in made}) == len(made)  # a fresh policy per example


def test_executor_tokens_depend_on_the_slots_whole_kv():
    from scheduler.messages import KVCopy, StepPlan, new_chunk
    from scheduler.testing import DeterministicExecutor

    def token_after_copy(slot1_tokens, copy_from):
        ex = DeterministicExecutor()
        ex.step(StepPlan(1, 0.0, (new_chunk("a", 0, 0, (5, 6, 7), False, 0, False, None),
                                  new_chunk("b", 1, 0, slot1_tokens, False, 0, False, None))))
        plan = StepPlan(2, 1.0, (new_chunk("c", 2, 2, (9,), True, 0, False, None),),
                        copies=(KVCopy(copy_from, 2, 2),))
        return ex.step(plan).sampled_token_ids["c"]

    assert token_after_copy((5, 6, 8), 0) == token_after_copy((5, 6, 8), 1)  # the same two prefix tokens
    # a prefix copied from the wrong slot changes the output (before: tokens hung on the request id alone)
    assert token_after_copy((4, 6, 8), 0) != token_after_copy((4, 6, 8), 1)


def test_kit_catches_an_abort_lost_between_schedule_and_commit(monkeypatch):
    from scheduler import core

    real = core.Scheduler.abort

    def loses_deferred(self, request_id, now_s, *args, **kwargs):
        if self._in_flight is not None:
            return None  # broken on purpose: an abort while a plan is in flight is dropped
        return real(self, request_id, now_s, *args, **kwargs)

    monkeypatch.setattr(core.Scheduler, "abort", loses_deferred)
    machine = _quiet(policy_state_machine("continuous", max_examples=200, stateful_step_count=15))
    with pytest.raises(InvariantError, match="aborted during a step"):
        machine.TestCase().runTest()


def test_kit_catches_a_release_cache_that_forgets_the_backend(monkeypatch):
    from scheduler import core

    def silent_release(self):
        while self.pool.evict_one() is not None:  # broken on purpose: no KVRemove reaches the backend
            pass

    monkeypatch.setattr(core.Scheduler, "release_cache", silent_release)
    machine = _quiet(policy_state_machine("continuous", max_examples=200, stateful_step_count=15))
    with pytest.raises(InvariantError, match="holds|still holds KV"):
        machine.TestCase().runTest()


def test_kit_explores_failures_future_arrivals_and_a_clock_stepping_back():
    from scheduler.testing import SchedulerStateMachine

    names = {r.function.__name__ for r in SchedulerStateMachine().rules}
    assert {"abort_during_step", "step_failing", "release", "clock_back"} <= names
    seen = set()

    class Watching(SchedulerStateMachine):
        def teardown(self):
            super().teardown()
            for r in self.sched.requests.values() if self.sched is not None else ():
                if r.finish_detail == "injected failure":
                    seen.add("backend failure")
                if r.first_scheduled_s is not None and r.first_scheduled_s < r.arrival_s:
                    seen.add("admitted before its arrival time")

    _quiet(Watching, max_examples=40)
    Watching.TestCase().runTest()
    assert seen == {"backend failure", "admitted before its arrival time"}
