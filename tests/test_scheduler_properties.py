"""Every policy under the scheduler state machine: invariants after every step, owed tokens at the end."""

import pytest
from hypothesis import HealthCheck, settings

from scheduler.policies import POLICIES
from scheduler.testing import policy_state_machine

SPECS = [*POLICIES, "priority", "sjf", "static:padding=true,sort=prompt", "static:batch_size=2,wait_s=3",
         "chunked:order=priority", "adaptive:min_num_seqs=1,queue_per_seq=2"]


@pytest.mark.parametrize("spec", SPECS)
def test_policy_state_machine(spec):
    machine = policy_state_machine(spec, max_examples=60, stateful_step_count=30)
    machine.TestCase.settings = settings(machine.TestCase.settings, suppress_health_check=[HealthCheck.too_slow])
    machine.TestCase().runTest()
