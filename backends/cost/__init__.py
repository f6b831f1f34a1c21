"""Cost models that price a StepPlan in seconds, their registry, and JSON load/save.

Kinds: "linear" (placeholder, linear.py), "roofline" (GPU presets, roofline.py) and "table" (llama.cpp's
micro-batches priced from measured tables, table.py). Build one with load_cost_model(name_or_path); what
every model offers, and what some add, is the CostModel protocol in base.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backends.cost.base import (
    MIN_STEP_S,
    CostModel,
    CostModelError,
    PricesAfterIdle,
    PricesDecodeRuns,
    PricesGraphReuse,
    PricesStepAfter,
    SizesScheduler,
    StepFeatures,
    WakesAfterIdle,
    features,
)
from backends.cost.linear import LinearCostModel
from backends.cost.roofline import ROOFLINE_PRESETS, RooflineCostModel
from backends.cost.table import TableCostModel

__all__ = [
    "BUNDLED_DIR",
    "COST_MODELS",
    "MIN_STEP_S",
    "ROOFLINE_PRESETS",
    "CostModel",
    "CostModelError",
    "LinearCostModel",
    "PricesAfterIdle",
    "PricesDecodeRuns",
    "PricesGraphReuse",
    "PricesStepAfter",
    "RooflineCostModel",
    "SizesScheduler",
    "StepFeatures",
    "TableCostModel",
    "WakesAfterIdle",
    "features",
    "known_cost_models",
    "load_cost_model",
    "save_cost_model",
]

BUNDLED_DIR = Path(__file__).parent.parent / "data"

COST_MODELS: dict[str, type] = {
    "linear": LinearCostModel,
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
    """A built-in name, a bundled profile name, or a JSON file path -> a cost model.

    NAME:param=value,... (any of those, then overrides) changes scalar parameters: h200-llama3-8b:mfu=0.7.
    """
    if isinstance(name_or_path, str) and ":" in name_or_path and not Path(name_or_path).is_file():
        from backends.cost.overrides import load_with_overrides

        return load_with_overrides(name_or_path, load_cost_model)
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
