"""The table cost model's parameters: their names, their checks, and their JSON form."""

from __future__ import annotations

import math
from typing import Any

from backends.cost.base import CostModelError, check_params
from backends.cost.wakeup import wakeup_curve

SCALARS = ("step_s", "per_chunk_s", "per_remove_s", "per_copy_s", "per_copied_token_s", "per_attention_pair_s",
           "idle_wakeup_s")
SPLIT = ("n_batch", "n_ubatch", "kv_unified")
# params a profile may omit (older profiles): defaults apply; without the prompt-pair params, a prompt
# chunk's attention pairs are priced like a decode's (per_attention_pair_s)
OPTIONAL = ("run_factor", "prefill_run_factor", "per_prompt_pair_s", "prompt_pair_knots", "prompt_context_pair_s",
            "per_fa_tile_s", "fa_heads", "fa_threads", "per_graph_build_s", "per_graph_build_seq_s",
            "idle_wakeup_curve", "decode_batch_factors", "per_kv_cell_s", "per_kv_token_cell_s", "kv_size")
GRAPH = ("per_graph_build_s", "per_graph_build_seq_s")
KV_RANGE = ("per_kv_cell_s", "per_kv_token_cell_s", "kv_size")
TILING = ("per_fa_tile_s", "fa_heads", "fa_threads")
TABLES = (("ubatch_tokens", "ubatch_token_s"), ("ubatch_outputs", "ubatch_output_s"))
PROMPT_PAIRS = ("per_prompt_pair_s", "prompt_pair_knots", "prompt_context_pair_s")


def check_table(knots_name: str, values_name: str, knots: tuple, values: tuple) -> None:
    """A table's knots are increasing integers >= 1, each with one finite value >= 0 (else CostModelError)."""
    if (not knots or len(knots) != len(values) or any(isinstance(k, bool) or not isinstance(k, int) for k in knots)
            or knots[0] < 1 or any(b <= a for a, b in zip(knots, knots[1:], strict=False))):
        raise CostModelError(f"TableCostModel: {knots_name} must be increasing integers >= 1 with one "
                             f"{values_name} entry each, got {knots!r} and {values!r}")
    check_params("table", {str(i): v for i, v in enumerate(values)}, tuple(map(str, range(len(values)))),
                 f"TableCostModel.{values_name}")


def check_model(m: Any) -> None:
    """Every parameter of a TableCostModel in range (else CostModelError naming it and what it must be)."""
    check_params("table", {n: getattr(m, n) for n in SCALARS}, SCALARS, "TableCostModel")
    _check_prompt_pairs(m)
    _check_tiling(m)
    _check_graph(m)
    _check_kv_range(m)
    for n in ("run_factor", "prefill_run_factor"):
        f = getattr(m, n)
        if n == "prefill_run_factor" and f is None:
            continue
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.5 <= f <= 2.0:
            raise CostModelError(f"TableCostModel: {n} must be a number in [0.5, 2], got {f!r}")
    for n in ("n_batch", "n_ubatch"):
        _check_positive_int(m, n)
    sizes = [b for b, _ in m.decode_batch_factors]
    if (any(isinstance(b, bool) or not isinstance(b, int) or b < 1 or isinstance(f, bool)
            or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.5 <= f <= 2.0
            for b, f in m.decode_batch_factors)
            or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False))):
        raise CostModelError("TableCostModel: decode_batch_factors must be [sequences, factor] pairs with "
                             "whole sequences >= 1 in rising order and factors in [0.5, 2], got "
                             f"{[list(k) for k in m.decode_batch_factors]!r}")
    waits = [a for a, _ in m.idle_wakeup_curve]
    if (any(not (math.isfinite(a) and math.isfinite(b) and a > 0 and b >= 0) for a, b in m.idle_wakeup_curve)
            or any(b <= a for a, b in zip(waits, waits[1:], strict=False))):
        raise CostModelError("TableCostModel: idle_wakeup_curve must be [idle seconds, extra seconds] pairs with "
                             "idle seconds > 0 in rising order and extra seconds >= 0, got "
                             f"{[list(k) for k in m.idle_wakeup_curve]!r}")
    if not isinstance(m.kv_unified, bool):
        raise CostModelError(f"TableCostModel: kv_unified must be true or false, got {m.kv_unified!r}")
    for knots_name, values_name in TABLES:
        values = getattr(m, values_name)
        check_table(knots_name, values_name, getattr(m, knots_name), values)
        if values_name == "ubatch_token_s" and any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise CostModelError(f"TableCostModel: {values_name} must not decrease, got {values!r}")


def _together(m: Any, names: tuple[str, ...], when_null: str) -> list | None:
    """The values of optional params that go together: None when all are null, else all of them."""
    values = [getattr(m, n) for n in names]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise CostModelError(f"TableCostModel: {', '.join(names)} go together (all set, or all null "
                             f"{when_null}), got {values!r}")
    return values


def _check_positive_int(m: Any, name: str) -> None:
    v = getattr(m, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CostModelError(f"TableCostModel: {name} must be a positive integer, got {v!r}")


def _check_prompt_pairs(m: Any) -> None:
    values = _together(m, PROMPT_PAIRS, "for a decode's per-pair price")
    if values is None:
        return
    check_params("table", {"per_prompt_pair_s": values[0]}, ("per_prompt_pair_s",), "TableCostModel")
    check_table(PROMPT_PAIRS[1], PROMPT_PAIRS[2], values[1], values[2])


def _check_tiling(m: Any) -> None:
    values = _together(m, TILING, "to price long prompt chunks by their attention pairs")
    if values is None:
        return
    check_params("table", {"per_fa_tile_s": values[0]}, ("per_fa_tile_s",), "TableCostModel")
    for n in TILING[1:]:
        _check_positive_int(m, n)
    if m.kv_unified:
        raise CostModelError("TableCostModel: flash-attention tiles are priced for one KV stream per sequence; "
                             "a kv_unified profile must leave per_fa_tile_s, fa_heads and fa_threads null")


def _check_graph(m: Any) -> None:
    values = _together(m, GRAPH, "to price no graph building apart")
    if values is None:
        return
    check_params("table", dict(zip(GRAPH, values, strict=True)), GRAPH, "TableCostModel")
    if m.kv_unified:
        raise CostModelError("TableCostModel: graph building is priced for one KV stream per sequence; a "
                             "kv_unified profile must leave per_graph_build_s and per_graph_build_seq_s null")


def _check_kv_range(m: Any) -> None:
    values = _together(m, KV_RANGE, "to price attention by the sequences' own positions")
    if values is None:
        return
    check_params("table", dict(zip(KV_RANGE[:2], values[:2], strict=True)), KV_RANGE[:2], "TableCostModel")
    _check_positive_int(m, "kv_size")
    if not m.kv_unified:
        raise CostModelError("TableCostModel: KV-range prices are for one unified KV stream; a profile with "
                             "kv_unified false must leave per_kv_cell_s, per_kv_token_cell_s and kv_size null")


def to_params(m: Any) -> dict:
    """The model's "params" JSON object (tuples as lists)."""
    params = {n: list(v) if isinstance(v := getattr(m, n), tuple) else v for n in SCALARS + SPLIT + OPTIONAL}
    for knots_name, values_name in TABLES:
        params[knots_name] = list(getattr(m, knots_name))
        params[values_name] = list(getattr(m, values_name))
    return params


def from_params(params: object, source: str) -> dict:
    """Keyword arguments of TableCostModel from a JSON params object; source names the file in errors."""
    if not isinstance(params, dict):
        raise CostModelError(f"{source}: 'params' of a table cost model must be an object")
    expected = set(SCALARS + SPLIT) | {n for pair in TABLES for n in pair}
    missing, unknown = sorted(expected - set(params)), sorted(set(params) - expected - set(OPTIONAL))
    if missing or unknown:
        raise CostModelError(f"{source}: table cost model params: missing {', '.join(missing) or 'none'}; "
                             f"unknown {', '.join(unknown) or 'none'}")
    kw = {n: params[n] for n in SCALARS + SPLIT + OPTIONAL if n in params}
    for n in ("prompt_pair_knots", "prompt_context_pair_s"):
        if isinstance(kw.get(n), list):
            kw[n] = tuple(kw[n])
    # [x, y] knot lists: checked in this function for their shape, and by check_model for their values
    for n, what, convert in (("idle_wakeup_curve", "[idle seconds, extra seconds]", wakeup_curve),
                             ("decode_batch_factors", "[sequences, factor]", lambda ks: tuple(map(tuple, ks)))):
        if n in kw:
            knots = kw[n]
            if not (isinstance(knots, list | tuple)
                    and all(isinstance(k, list | tuple) and len(k) == 2 for k in knots)):
                raise CostModelError(f"{source}: table param {n!r} must be a list of {what} pairs")
            kw[n] = convert(knots)
    for pair in TABLES:
        for n in pair:
            if not isinstance(params[n], list):
                raise CostModelError(f"{source}: table param {n!r} must be a list")
            kw[n] = tuple(params[n])
    return kw
