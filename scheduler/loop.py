"""The step loop every driver runs: schedule -> backend.step -> commit, written once.

A plan with nothing to run may still announce finished requests (``finished_request_ids``): the
backend must see them, or it keeps their state (on llama.cpp, a sampler chain per request). They
reach the backend at once and cost no time: through ``backend.forget(ids)`` when the backend has
it, else through ``backend.step(plan)`` on the empty plan, whose elapsed time is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .backend import Backend, ForgetsRequests
from .messages import RequestOutput, StepPlan, StepResult

if TYPE_CHECKING:  # pragma: no cover
    from .core import Scheduler


class StepDone(NamedTuple):
    """One round of the loop: the plan, the backend's result (None: nothing ran), outputs, commit time."""

    plan: StepPlan
    result: StepResult | None
    outputs: list[RequestOutput]
    now_s: float


def announce_finished(backend: Backend, plan: StepPlan) -> None:
    """Hand an empty plan's finished request ids to the backend so it drops their state (no time passes)."""
    if not plan.finished_request_ids:
        return
    if isinstance(backend, ForgetsRequests):
        backend.forget(plan.finished_request_ids)
    else:
        backend.step(plan)  # nothing to run: the backend only drops the finished requests' state


def plan_step(scheduler: Scheduler, backend: Backend, now_s: float) -> StepPlan:
    """schedule(now_s); when the plan runs nothing, its finished ids go to the backend right away."""
    plan = scheduler.schedule(now_s)
    if plan.is_empty:
        announce_finished(backend, plan)
    return plan


def run_step(scheduler: Scheduler, backend: Backend, now_s: float | Callable[[], float],
             check: Callable[[StepPlan], None] | None = None) -> StepDone:
    """Plan, execute and commit one step.

    now_s is the start time (virtual time: the commit lands at now_s + elapsed_s), or a clock
    read before planning and again after the step (real time: the commit lands when it ends).
    check, if given, sees every plan before the backend does (the testing kit's invariants, a probe's idle wait).
    """
    clock = now_s if callable(now_s) else None
    start = clock() if clock is not None else now_s
    plan = plan_step(scheduler, backend, start)
    if check is not None:
        check(plan)
    if plan.is_empty:
        return StepDone(plan, None, [], start)
    result = backend.step(plan)
    end = clock() if clock is not None else start + result.elapsed_s
    return StepDone(plan, result, scheduler.commit(plan, result, end), end)


def release_kv(scheduler: Scheduler, backend: Backend, now_s: float) -> None:
    """Evict the whole prefix cache and run the removals, so the backend's KV ends empty."""
    scheduler.release_cache()
    run_step(scheduler, backend, lambda: now_s)
