"""The backend contract: what executes a StepPlan, and the optional capabilities a driver may use.

A driver (scheduler.loop, the simulator, the text engine) asks a backend for one thing only, ``step``.
Anything more is an optional capability, declared here as its own Protocol and checked with
``isinstance(backend, Capability)`` where it is used; backends are plain classes and need not inherit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from .messages import StepPlan, StepResult


@runtime_checkable
class Backend(Protocol):
    """Executes one step: the plan's KV removals, then its copies, then its batch.

    step(plan) returns a StepResult with one sampled token per chunk whose ``sample`` is set (or
    that request in ``failed`` with a reason) and the step's ``elapsed_s``, measured or priced. It
    drops its per-request state (samplers, counters) for every id in ``plan.finished_request_ids``,
    also when the plan has nothing else to run. It never changes the plan and decides no policy; a
    plan that would need KV the scheduler did not reserve is a scheduler bug, reported as a failure.
    """

    def step(self, plan: StepPlan) -> StepResult:
        """Run the plan; return sampled tokens, the step's time and per-request failures."""
        ...


@runtime_checkable
class ForgetsRequests(Protocol):
    """Drops finished requests' state without a step, at no cost in time (else a plan announces them)."""

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the per-request state of these finished requests."""
        ...


@runtime_checkable
class ClearsKV(Protocol):
    """Can empty every slot at once: a backend reused across runs starts each run with an empty cache."""

    def clear_kv(self) -> None:
        """Empty every slot's KV."""
        ...


@runtime_checkable
class KnowsTokens(Protocol):
    """A simulated backend whose tokens and step prices are known ahead, so that a driver may skip
    decode-only stretches exactly (the scheduler's fast_forward) instead of stepping through them.

    never_eos: no request can stop before its max_tokens (skipping is exact only then);
    take_tokens(request_id, count): the next count tokens, as count steps would sample them;
    cost_model: prices the skipped steps; graph: the compute-graph key the last step left (cost
    models that price graph reuse carry it on); end_s: when the last step ended in virtual time.
    """

    cost_model: Any
    graph: Any
    end_s: float | None

    @property
    def never_eos(self) -> bool:
        """True when no request can stop early."""
        ...

    def take_tokens(self, request_id: str, count: int) -> list[int]:
        """The next count sampled tokens of a request."""
        ...

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the per-request state of these finished requests."""
        ...
