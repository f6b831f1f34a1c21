"""A backend that executes any plan without a model: deterministic tokens, cost-modelled time."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from scheduler.messages import StepPlan, StepResult


class SyntheticBackend:
    """Executes plans instantly; tokens are a function of (request_id, output index).

    eos_token_id with scripted_eos {request_id: k} makes the k-th output token
    (0-based) of that request the EOS token, for tests of early stops.
    """

    def __init__(self, cost_model=None, vocab_size: int = 32000, eos_token_id: int = 2,
                 scripted_eos: Mapping[str, int] | None = None) -> None:
        if cost_model is None:
            from backends.cost import LinearCostModel

            cost_model = LinearCostModel()
        if vocab_size <= 10:
            raise ValueError(f"vocab_size must be > 10, got {vocab_size}")
        self.cost_model = cost_model
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.scripted_eos = dict(scripted_eos or {})
        self._num_sampled: dict[str, int] = {}
        self.num_steps = 0
        self.num_computed_tokens = 0

    def token_for(self, request_id: str, index: int) -> int:
        """The deterministic output token at index for a request (never EOS unless scripted)."""
        if self.scripted_eos.get(request_id) == index:
            return self.eos_token_id
        token = 10 + zlib.crc32(f"{request_id}:{index}".encode()) % (self.vocab_size - 10)
        return token

    def step(self, plan: StepPlan) -> StepResult:
        """Sample one token per sampling chunk; elapsed_s from the cost model."""
        for request_id in plan.finished_request_ids:
            self._num_sampled.pop(request_id, None)
        sampled = {}
        counts = self._num_sampled
        for chunk in plan.chunks:
            self.num_computed_tokens += len(chunk.token_ids)
            if chunk.sample:
                index = counts.get(chunk.request_id, 0)
                counts[chunk.request_id] = index + 1
                sampled[chunk.request_id] = self.token_for(chunk.request_id, index)
        self.num_steps += 1
        return StepResult(sampled, self.cost_model.step_time_s(plan))
