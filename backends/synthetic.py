"""A backend that executes any plan without a model: deterministic tokens, cost-modelled time."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

from backends.cost.base import PricesStepAfter, WakesAfterIdle
from backends.cost.wakeup import wakeup_cost
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
        self._seeds: dict[str, int] = {}
        self.num_steps = 0
        self.num_computed_tokens = 0
        # the compute-graph key the last step left, for cost models that price llama.cpp's graph reuse
        # (step_after; see backends.cost.graph): None on a fresh context
        self.graph: tuple | None = None
        self._step_after = cost_model.step_after if isinstance(cost_model, PricesStepAfter) else None
        # the virtual time the last step ended (the engine's decode fast-forward moves it too): a step whose
        # plan starts later follows an idle engine and pays the cost model's wake-up for its wait
        self.end_s: float | None = None
        self._wakes = isinstance(cost_model, WakesAfterIdle) and bool(cost_model.idle_wakeup_s
                                                                     or cost_model.idle_wakeup_curve)
        self._build_cycle()

    def _seed(self, request_id: str) -> int:
        seed = self._seeds.get(request_id)
        if seed is None:
            seed = self._seeds[request_id] = zlib.crc32(request_id.encode())
        return seed

    def token_for(self, request_id: str, index: int) -> int:
        """The deterministic output token at index for a request (never EOS unless scripted)."""
        if self.scripted_eos.get(request_id) == index:
            return self.eos_token_id
        return 10 + (self._seed(request_id) + index * 40503) % (self.vocab_size - 10)

    def tokens_for(self, request_id: str, start: int, count: int) -> list[int]:
        """token_for(request_id, i) for i in [start, start + count), in one call."""
        if request_id in self.scripted_eos:
            return [self.token_for(request_id, i) for i in range(start, start + count)]
        seed, mod = self._seed(request_id), self.vocab_size - 10
        if count > mod or self._cycle is None:
            return [10 + (seed + i * 40503) % mod for i in range(start, start + count)]
        # (seed + 40503 i) % mod == cycle[(i + seed * inverse) % mod]: consecutive i are one slice
        at = (start + seed * self._inverse) % mod
        return self._cycle[at : at + count]

    def _build_cycle(self) -> None:
        """cycle[k] = 10 + (40503 k) % mod, twice over, when 40503 is invertible mod vocab_size - 10."""
        mod = self.vocab_size - 10
        self._cycle, self._inverse = None, 0
        if math.gcd(40503, mod) == 1 and mod <= 1 << 20:
            once = [10 + (40503 * k) % mod for k in range(mod)]
            self._cycle, self._inverse = once + once, pow(40503, -1, mod)

    def forget(self, request_ids) -> None:
        """Drop per-request state, as a plan's finished_request_ids would."""
        for request_id in request_ids:
            self._num_sampled.pop(request_id, None)
            self._seeds.pop(request_id, None)

    def take_tokens(self, request_id: str, count: int) -> list[int]:
        """The next count sampled tokens of a request, as count decode steps would give them."""
        counts = self._num_sampled
        start = counts.get(request_id, 0)
        counts[request_id] = start + count
        return self.tokens_for(request_id, start, count)

    @property
    def never_eos(self) -> bool:
        """True when no request can stop early, so decode-only stretches can be skipped ahead."""
        return not self.scripted_eos

    def step(self, plan: StepPlan) -> StepResult:
        """Sample one token per sampling chunk; elapsed_s from the cost model, plus its wake-up
        (backends.cost.wakeup.wakeup_cost: by the wait's length when the model has an idle_wakeup_curve) when
        the engine waited for this plan (the first step of a run: the wait is unknown, the flat price)."""
        for request_id in plan.finished_request_ids:
            self._num_sampled.pop(request_id, None)
            self._seeds.pop(request_id, None)
        sampled = {}
        computed = 0
        take = self.take_tokens
        for chunk in plan.chunks:
            computed += len(chunk.token_ids)
            if chunk.sample:
                sampled[chunk.request_id] = take(chunk.request_id, 1)[0]
        self.num_computed_tokens += computed
        self.num_steps += 1
        if self._step_after is not None:
            elapsed, self.graph = self._step_after(plan, self.graph)
        else:
            elapsed = self.cost_model.step_time_s(plan)
        end = self.end_s
        if self._wakes and plan.chunks and (end is None or plan.now_s != end):
            elapsed += wakeup_cost(self.cost_model, None if end is None else plan.now_s - end)
        self.end_s = plan.now_s + elapsed
        return StepResult(sampled, elapsed)
