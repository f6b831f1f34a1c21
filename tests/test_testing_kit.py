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
