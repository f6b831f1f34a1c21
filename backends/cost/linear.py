"""The linear cost model: a fixed cost per step plus per-token, per-sequence and per-context terms."""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.cost.base import StepFeatures, check_params, features, floor_time
from scheduler.messages import StepPlan

LINEAR_PARAMS = (
    "base_s",
    "per_prefill_token_s",
    "per_decode_seq_s",
    "per_context_token_s",
    "per_copied_token_s",
)


@dataclass(frozen=True, slots=True)
class LinearCostModel:
    """t = base_s + per-prefill-token + per-decode-seq + per-context-token + per-copied-token terms."""

    # Defaults: gemma-3-270m Q4_K_M, 2 CPU threads, fitted by relative error to
    # llama-batched-bench decode (53.9/91.3/138.6 tok/s at B=1/4/16: within +3/-10/+5%)
    # and ~800 tok/s prefill. Rough: decode per seq is concave in B, this is linear.
    base_s: float = 0.0124
    per_prefill_token_s: float = 0.00125
    per_decode_seq_s: float = 0.0068
    per_context_token_s: float = 1e-6
    per_copied_token_s: float = 1e-6
    name: str = "linear"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_params(
            "linear",
            {n: getattr(self, n) for n in LINEAR_PARAMS},
            LINEAR_PARAMS,
            "LinearCostModel",
        )

    def predict_s(self, feats: StepFeatures) -> float:
        """Seconds for a step with these features."""
        raw = (
            self.base_s * feats.has_batch
            + self.per_prefill_token_s * feats.num_prefill_tokens
            + self.per_decode_seq_s * feats.num_decode_seqs
            + self.per_context_token_s * feats.num_context_tokens
            + self.per_copied_token_s * feats.num_copied_tokens
        )
        return floor_time(feats, raw)

    def step_time_s(self, plan: StepPlan) -> float:
        """Seconds the plan's step takes (0 for an empty plan)."""
        return self.predict_s(features(plan))

    def to_dict(self) -> dict:
        """{"kind": "linear", "params", "meta"}."""
        return {
            "kind": "linear",
            "params": {n: getattr(self, n) for n in LINEAR_PARAMS},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(
        cls, params: object, meta: dict, name: str, source: str
    ) -> LinearCostModel:
        """Build from a JSON params object; source names the file in errors."""
        return cls(
            **check_params("linear", params, LINEAR_PARAMS, source),
            name=name,
            meta=meta,
        )

    def describe(self) -> str:
        """One line: the coefficients, and the meta note if any."""
        note = f" [{self.meta['note']}]" if "note" in self.meta else ""
        return (
            f"linear '{self.name}': {self.base_s * 1e3:.2f} ms/step"
            f" + {self.per_prefill_token_s * 1e3:.3f} ms/prefill tok"
            f" + {self.per_decode_seq_s * 1e3:.3f} ms/decode seq + {self.per_context_token_s * 1e6:.3f} us/context tok"
            f" + {self.per_copied_token_s * 1e6:.3f} us/copied tok{note}"
        )
