"""What every cost model shares: the protocol, the step features, and parameter checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, runtime_checkable

from scheduler.messages import StepPlan

# A step that only drops or copies a few KV cells costs microseconds on llama.cpp; the
# floor keeps virtual time strictly advancing even when a fitted coefficient is zero.
MIN_STEP_S = 1e-6


class CostModelError(ValueError):
    """A bad cost-model name, file, parameter or calibration sample (a ValueError)."""


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """The plan counters a step's cost depends on (padding already folded into prefill)."""

    num_prefill_tokens: int = 0  # real prefill tokens + pad tokens
    num_decode_seqs: int = 0
    num_context_tokens: int = 0  # KV positions attended, summed over chunks
    sum_sq_prefill_tokens: int = 0  # sum over prefill chunks of len * (start_pos + len)
    num_pad_tokens: int = 0  # informational: already inside num_prefill_tokens
    num_copied_tokens: int = 0
    num_seqs: int = 0  # chunks in the batch
    num_removes: int = 0
    num_copies: int = 0

    def __post_init__(self) -> None:
        values = (self.num_prefill_tokens, self.num_decode_seqs, self.num_context_tokens,
                  self.sum_sq_prefill_tokens, self.num_pad_tokens, self.num_copied_tokens, self.num_seqs,
                  self.num_removes, self.num_copies)
        if min(values) >= 0 and all(type(v) is int for v in values):
            return  # the common case, checked without walking fields()
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CostModelError(
                    f"StepFeatures.{f.name} must be a non-negative integer, got {value!r}"
                )

    @property
    def is_empty(self) -> bool:
        """True when the step runs no batch and no KV operation."""
        return self.num_seqs == 0 and self.num_removes == 0 and self.num_copies == 0

    @property
    def has_batch(self) -> int:
        """1 when the step calls llama_decode (pays the per-step fixed cost), else 0."""
        return (
            1
            if (self.num_seqs or self.num_prefill_tokens or self.num_decode_seqs)
            else 0
        )

    @property
    def num_kv_ops(self) -> int:
        """KV removals plus prefix copies."""
        return self.num_removes + self.num_copies

    def to_dict(self) -> dict:
        """Plain dict of the counters (for calibration logs)."""
        return asdict(self)


def features(plan: StepPlan) -> StepFeatures:
    """Read a plan's counters into StepFeatures without walking its chunks."""
    # Pad tokens are charged as prefill tokens: padded static batching pads prompts,
    # and a padded decode slot costs about one more row in the same matmul anyway.
    return StepFeatures(
        num_prefill_tokens=plan.num_prefill_tokens + plan.num_pad_tokens,
        num_decode_seqs=plan.num_decode_seqs,
        num_context_tokens=plan.num_context_tokens,
        sum_sq_prefill_tokens=plan.sum_sq_prefill_tokens,
        num_pad_tokens=plan.num_pad_tokens,
        num_copied_tokens=plan.num_copied_tokens,
        num_seqs=len(plan.chunks),
        num_removes=len(plan.removes),
        num_copies=len(plan.copies),
    )


@runtime_checkable
class CostModel(Protocol):
    """Prices one step: seconds from the plan's counters alone.

    Every cost model has these members. Some add optional capabilities, each declared below as its own
    Protocol so a driver checks isinstance(model, Capability) instead of probing for attributes:
    PricesDecodeRuns (the fast-forward's decode_pricer), PricesGraphReuse (llama.cpp's compute graph carried
    from step to step; PricesStepAfter for a model with its step_after only), PricesAfterIdle (time_s of a
    step after idle), WakesAfterIdle (a step after idle costs extra) and SizesScheduler (the capacity a
    GPU preset implies).
    """

    name: str
    meta: dict

    def step_time_s(self, plan: StepPlan) -> float:
        """Seconds the step takes: 0 for an empty plan, > 0 otherwise."""
        ...

    def predict_s(self, feats: StepFeatures) -> float:
        """Seconds for a step with these features (what step_time_s calls)."""
        ...

    def to_dict(self) -> dict:
        """{"kind", "params", "meta"}: what save_cost_model writes."""
        ...

    def describe(self) -> str:
        """One line for reports."""
        ...


@runtime_checkable
class PricesDecodeRuns(Protocol):
    """Optional: prices pure-decode steps over fixed slots from their summed context alone (the fast-forward)."""

    def decode_pricer(self, slots: Sequence[int]) -> Callable[[int], float]:
        """price(num_context_tokens) of a pure-decode step over these slots, exactly step_time_s of its plan."""
        ...


@runtime_checkable
class PricesGraphReuse(Protocol):
    """Optional: a step's price depends on the compute graph llama.cpp kept from the step before it."""

    def step_after(self, plan: StepPlan, prev_graph: Any, after_idle: bool = False) -> tuple[float, Any]:
        """(seconds, graph key after it) of the step following a ubatch of graph key prev_graph."""
        ...

    def decode_stretch(self, slots: Sequence[int], ends: Sequence[int], prev_graph: Any) -> Any:
        """A pricer of consecutive pure-decode steps (price(i, ctx), graph_after(i)), as step_after gives them."""
        ...


@runtime_checkable
class PricesStepAfter(Protocol):
    """Optional: prices a step after the graph key of the step before it (a graph-reuse model's step_after alone)."""

    def step_after(self, plan: StepPlan, prev_graph: Any, after_idle: bool = False) -> tuple[float, Any]:
        """(seconds, graph key after it) of the step following a ubatch of graph key prev_graph."""
        ...


@runtime_checkable
class PricesAfterIdle(Protocol):
    """Optional: prices a step that follows an idle engine differently from one that does not."""

    def time_s(self, plan: StepPlan, after_idle: bool = False) -> float:
        """Seconds of the step, after_idle: the engine idled before it."""
        ...


@runtime_checkable
class WakesAfterIdle(Protocol):
    """Optional: the first step after the engine idled costs extra (see backends.cost.wakeup.wakeup_cost)."""

    idle_wakeup_s: float
    idle_wakeup_curve: tuple


@runtime_checkable
class SizesScheduler(Protocol):
    """Optional: the scheduler limits the priced hardware implies (SchedulerConfig keyword arguments)."""

    def capacity(self) -> dict:
        """max_num_seqs, max_num_batched_tokens, max_model_len, num_kv_blocks, block_size."""
        ...


def floor_time(feats: StepFeatures, raw_s: float) -> float:
    """0 for an empty step, else raw_s kept at or above MIN_STEP_S."""
    if feats.is_empty:
        return 0.0
    return max(raw_s, MIN_STEP_S)


def require_params(kind: str, params: object, names: tuple[str, ...], source: str) -> dict:
    """params must be a JSON object holding at least these names."""
    if not isinstance(params, dict):
        raise CostModelError(
            f"{source}: 'params' of a {kind} cost model must be an object, got {type(params).__name__}"
        )
    missing = [n for n in names if n not in params]
    if missing:
        raise CostModelError(
            f"{source}: {kind} cost model is missing params {', '.join(missing)}"
        )
    return params


def check_params(
    kind: str, params: object, names: tuple[str, ...], source: str
) -> dict[str, float]:
    """Validate a params dict: exactly these names, finite non-negative numbers."""
    params = require_params(kind, params, names, source)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise CostModelError(
            f"{source}: unknown {kind} params {', '.join(unknown)}; expected {', '.join(names)}"
        )
    out = {}
    for n in names:
        value = params[n]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise CostModelError(
                f"{source}: {kind} param {n!r} must be a finite number >= 0, got {value!r}"
            )
        out[n] = float(value)
    return out
