"""Cost models that price a StepPlan in seconds, their registry, and JSON load/save.

Kinds: "linear" (placeholder), "fitted" (NNLS on measured steps, cost_fit.py) and
"roofline" (GPU presets, cost_roofline.py). Build one with load_cost_model(name_or_path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from backends.cost_base import (
    MIN_STEP_S,
    CostModel,
    CostModelError,
    StepFeatures,
    check_params,
    features,
    floor_time,
)
from backends.cost_fit import FITTED_COLUMNS, FittedCostModel, evaluate, fit, nnls
from backends.cost_roofline import ROOFLINE_PRESETS, RooflineCostModel
from backends.cost_table import TableCostModel
from scheduler.messages import StepPlan

__all__ = [
    "BUNDLED_DIR",
    "COST_MODELS",
    "FITTED_COLUMNS",
    "MIN_STEP_S",
    "ROOFLINE_PRESETS",
    "CostModel",
    "FittedCostModel",
    "LinearCostModel",
    "RooflineCostModel",
    "StepFeatures",
    "evaluate",
    "features",
    "fit",
    "known_cost_models",
    "load_cost_model",
    "nnls",
    "save_cost_model",
]

BUNDLED_DIR = Path(__file__).parent / "data"
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


COST_MODELS: dict[str, type] = {
    "linear": LinearCostModel,
    "fitted": FittedCostModel,
    "roofline": RooflineCostModel,
    "table": TableCostModel,
}

BUILTIN_COST_MODELS: dict[str, CostModel] = {
    "linear-default": LinearCostModel(
        name="linear-default", meta={"note": "built-in placeholder, not calibrated"}
    ),
    **ROOFLINE_PRESETS,
}


def _bundled() -> dict[str, Path]:
    """Bundled profile names (file stems in backends/data) to their paths."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.json"))}


def known_cost_models() -> list[str]:
    """Every name load_cost_model accepts besides a file path."""
    return sorted(set(BUILTIN_COST_MODELS) | set(_bundled()))


def save_cost_model(model: CostModel, path: str | os.PathLike) -> Path:
    """Write model.to_dict() as JSON to path; returns the path."""
    data = model.to_dict()
    if data.get("kind") not in COST_MODELS:
        raise CostModelError(
            f"cannot save a cost model of kind {data.get('kind')!r}; known kinds: {', '.join(COST_MODELS)}"
        )
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_cost_model(name_or_path: str | os.PathLike) -> CostModel:
    """A built-in name, a bundled profile name, or a JSON file path -> a cost model."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_COST_MODELS:
        return BUILTIN_COST_MODELS[name_or_path]
    bundled = _bundled()
    if isinstance(name_or_path, str) and name_or_path in bundled:
        return _load_file(bundled[name_or_path])
    path = Path(name_or_path)
    if path.is_file():
        return _load_file(path)
    looks_like_path = path.suffix == ".json" or os.sep in str(name_or_path)
    what = (
        f"no cost model file {str(path)!r}"
        if looks_like_path
        else f"unknown cost model {str(name_or_path)!r}"
    )
    raise CostModelError(
        f"{what}; known names: {', '.join(known_cost_models())}, or give a path to a JSON file"
    )


def _load_file(path: Path) -> CostModel:
    """Parse and validate one cost-model JSON file; the model's name is the file stem."""
    source = f"cost model file {str(path)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CostModelError(
            f"{source}: cannot read it ({exc.strerror or exc})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CostModelError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CostModelError(
            f"{source}: top level must be an object with 'kind', 'params', 'meta'"
        )
    unknown = sorted(set(data) - {"kind", "params", "meta"})
    if unknown:
        raise CostModelError(
            f"{source}: unknown top-level fields {', '.join(unknown)}; expected kind, params, meta"
        )
    for key in ("kind", "params"):
        if key not in data:
            raise CostModelError(f"{source}: missing field {key!r}")
    kind = data["kind"]
    if kind not in COST_MODELS:
        raise CostModelError(
            f"{source}: unknown kind {kind!r}; known kinds: {', '.join(COST_MODELS)}"
        )
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise CostModelError(
            f"{source}: 'meta' must be an object, got {type(meta).__name__}"
        )
    return COST_MODELS[kind].from_dict(data["params"], dict(meta), path.stem, source)
