"""Fitting a table cost model to measured steps: NNLS on relative error over the table's design rows."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from backends.cost.base import CostModelError
from backends.cost.graph import builds
from backends.cost.knots import default_knots, output_knots, sparse_output_knots
from backends.cost.table import StepShape, TableCostModel, kv_range_counts
from backends.cost.table_params import GRAPH, KV_RANGE, SCALARS
from backends.cost.ubatch import FA_Q_TILE, fa_tiles, takes_tiled_path
from calib.nnls import nnls
from scheduler.messages import StepPlan

# the fitted scalars, in design_row's order
FITTED = SCALARS + ("per_prompt_pair_s", "per_fa_tile_s") + GRAPH + KV_RANGE[:2]


def _hats(n: int, knots: tuple[int, ...]) -> list[float]:
    """Hat basis of a free piecewise-linear table: value(n) = hats(n) @ values (n past the end: the last value)."""
    row = [0.0] * len(knots)
    if n <= 0:
        return row
    n = min(max(n, knots[0]), knots[-1])
    j = bisect.bisect_left(knots, n)
    if knots[j] == n:
        row[j] = 1.0
    else:
        w = (n - knots[j - 1]) / (knots[j] - knots[j - 1])
        row[j - 1], row[j] = 1.0 - w, w
    return row



def _ramps(n: int, knots: tuple[int, ...]) -> list[float]:
    """Increment basis of a non-decreasing piecewise-linear table: value(n) = ramps(n) @ increments."""
    if n <= 0:
        return [0.0] * len(knots)
    row = [1.0]
    for j in range(1, len(knots)):
        lo, hi = knots[j - 1], knots[j]
        r = (n - lo) / (hi - lo)
        row.append(max(0.0, r if j == len(knots) - 1 else min(1.0, r)))  # the last segment extrapolates
    return row



def prompt_pair_knots(n_ubatch: int, tiled: bool = False) -> tuple[int, ...]:
    """Chunk lengths (tokens per sequence) at which the context-pair price is fitted.

    2 (the shortest chunk), 64 (FA_Q_TILE, the shortest tiled chunk), 128 (tiles full on 2 threads) and
    n_ubatch, the longest. tiled: longer chunks are priced by their tiles, so the table stops at 64.
    """
    top = min(n_ubatch, FA_Q_TILE) if tiled else n_ubatch
    return tuple(sorted({k for k in (2, FA_Q_TILE, 128) if k < top} | {max(top, 2)}))


def _fill_unmeasured(values: np.ndarray, measured: np.ndarray, default: float) -> tuple[float, ...]:
    """Table values with each unmeasured knot taking its nearest measured neighbour's (default if none)."""
    idx = np.flatnonzero(measured)
    if not len(idx):
        return tuple(float(default) for _ in values)
    return tuple(float(values[i] if measured[i] else values[idx[np.argmin(np.abs(idx - i))]])
                 for i in range(len(values)))


def design_row(shape: StepShape, token_knots: tuple[int, ...], output_knots: tuple[int, ...],
               pair_knots: tuple[int, ...], tiling: tuple[int, int] | None = None, graphs: bool = False,
               prev_graph=None) -> np.ndarray:
    """Feature vector: the FITTED scalars' counts (per step, chunk, KV op, copied token, attention pair of
    decodes, wake-up, attention pair within prompt chunks, flash-attention tile, graph built and its
    sequences), token-table increments, output-table hats, and the prompt chunks' context pairs over the
    prompt-pair table's hats. With tiling (heads, threads), a prompt ubatch of at least FA_Q_TILE tokens
    per sequence counts its tiles instead of its pairs. With graphs, the ubatches that build a graph after
    a ubatch of key prev_graph count (see backends.cost.graph)."""
    tok = np.zeros(len(token_knots))
    outs = np.zeros(len(output_knots))
    ctx = np.zeros(len(pair_knots))
    pairs = chunk_pairs = tiles = 0
    for u in shape.ubatches:
        tok += _ramps(u.n_tokens, token_knots)
        outs += _hats(u.n_outputs, output_knots)
        pairs += u.attention_pairs
        if tiling and takes_tiled_path(u):
            tiles += fa_tiles(u.q_len, u.starts, *tiling)
        elif u.q_len:
            chunk_pairs += u.chunk_pairs
            ctx += np.array(_hats(u.q_len, pair_knots)) * u.context_pairs
    n_builds = seqs = 0.0
    if graphs and shape.ubatches:
        built = builds([u.graph for u in shape.ubatches], None if shape.resets_graph else prev_graph)
        n_builds = float(sum(built))
        seqs = float(sum(u.n_seqs for u, b in zip(shape.ubatches, built, strict=True) if b))
    kv_cells, kv_token_cells = kv_range_counts(shape.ubatches, shape.n_kv) if shape.n_kv else (0, 0)
    head = [0.0 if shape.is_empty else 1.0, shape.num_chunks, shape.num_removes, shape.num_copies,
            shape.num_copied_tokens, pairs, float(shape.after_idle), chunk_pairs, tiles, n_builds, seqs,
            kv_cells, kv_token_cells]
    return np.concatenate([np.array(head, dtype=float), tok, outs, ctx])


# llama_memory_seq_rm only edits cell metadata (microseconds), and across per-sequence KV streams
# llama_memory_seq_cp copies the whole stream whatever the prefix length: fitted from a handful of
# noisy steps, these two absorbed noise (a remove once came out at 160 ms), so they stay at 0.
NOT_FITTED = ("per_remove_s", "per_copied_token_s")
SMOOTHING = 0.1
GRAPH_MIN_UBATCHES = 20  # fit graph building from at least this many ubatches that build and that reuse one


def fit_table(samples: Sequence[tuple], *, n_batch: int = 512, n_ubatch: int = 512,
              kv_unified: bool = False, n_seq_max: int = 16, name: str = "table", meta: dict | None = None,
              not_fitted: Sequence[str] = NOT_FITTED, fa_heads: int | None = None,
              fa_threads: int | None = None, graphs: bool = True, sparse_outputs: bool = False,
              kv_size: int | None = None) -> TableCostModel:
    """Fit every coefficient >= 0 (not_fitted ones stay 0) by NNLS on relative error.

    samples: (plan, measured seconds[, after_idle[, graph key before the step[, n_kv]]]) tuples, in the order
    they ran: without keys, each step follows the one before it (the first, a fresh context); n_kv, the KV
    range of each of its ubatches in one unified stream (backends.cost.kvcells.kv_ranges). With kv_unified,
    kv_size (the stream's cells) and samples that carry n_kv, the ubatches' work over their KV ranges is fitted
    (per_kv_cell_s, per_kv_token_cell_s). fa_heads
    (the model's query heads) and fa_threads (the context's threads): price long prompt chunks by ggml's
    flash-attention tiles (see fa_tiles) when the samples have such chunks and the KV is per sequence.
    graphs: price the ubatches that build a compute graph (see backends.cost.graph), with one KV stream
    per sequence. sparse_outputs: the output table at sparse_output_knots (a GPU context) instead of every
    count up to 64.
    """
    if not samples:
        raise CostModelError("no samples: record at least a few measured steps first")
    out_knots = (sparse_output_knots if sparse_outputs else output_knots)(n_seq_max)
    base = TableCostModel(default_knots(n_ubatch), (0.0,) * len(default_knots(n_ubatch)), out_knots,
                          (0.0,) * len(out_knots), n_batch=n_batch, n_ubatch=n_ubatch,
                          kv_unified=kv_unified)
    shapes, times, prevs = [], [], []
    prev = None
    for i, sample in enumerate(samples):
        plan, t, idle = sample[0], sample[1], bool(sample[2]) if len(sample) > 2 else False
        prev = sample[3] if len(sample) > 3 else prev
        n_kv = tuple(sample[4]) if len(sample) > 4 and kv_unified and kv_size else ()
        if not (isinstance(t, (int, float)) and np.isfinite(t) and t > 0):
            raise CostModelError(f"sample {i}: measured time must be a finite number > 0 seconds, got {t!r}")
        shape = base.shape(plan, idle, n_kv)
        if shape.is_empty:
            raise CostModelError(f"sample {i} is an empty step, which costs 0 by definition; drop it")
        shapes.append(shape)
        times.append(float(t))
        prevs.append(prev)
        prev = base.graph_after(shape, prev)
    tiling = None
    if fa_heads and fa_threads and not kv_unified and any(takes_tiled_path(u) for s in shapes for u in s.ubatches):
        tiling = (fa_heads, fa_threads)
    tk, ok, pk = base.ubatch_tokens, base.ubatch_outputs, prompt_pair_knots(n_ubatch, tiling is not None)
    y = np.array(times)
    x = np.stack([design_row(s, tk, ok, pk, tiling, graphs and not kv_unified, p)
                  for s, p in zip(shapes, prevs, strict=True)])
    # graph building is told apart from a pass's own cost only by passes of one shape with and without it
    built = x[:, FITTED.index("per_graph_build_s")]
    reused = sum(len(s.ubatches) for s in shapes) - built.sum()
    graphs = graphs and not kv_unified and min(reused, built.sum()) >= GRAPH_MIN_UBATCHES
    if not graphs:
        x[:, FITTED.index("per_graph_build_s")] = x[:, FITTED.index("per_graph_build_seq_s")] = 0.0
    used = np.abs(x).max(axis=0) > 0
    k0 = len(FITTED) + len(tk)
    used[k0:k0 + len(ok)] = True  # every output count gets a value (from data or the prior)
    for n in not_fitted:
        used[FITTED.index(n)] = False
    x[:, ~used] = 0.0
    a = x / y[:, None]  # rows divided by their time: residuals are relative errors
    # A light prior on the output table's second differences, in units of a typical step: an output count
    # no step had gets its neighbours' trend, while counts that were measured follow their data.
    typical = float(np.median(y))
    prior = np.zeros((max(0, len(ok) - 2), a.shape[1]))
    for i in range(len(ok) - 2):
        prior[i, k0 + i:k0 + i + 3] = np.array([1.0, -2.0, 1.0]) * SMOOTHING / typical
    # and on the context-pair table's first differences, in units of a 128-token chunk's pairs against 128
    # positions: a chunk length with few steps stays near its neighbours instead of fitting their noise
    c0 = k0 + len(ok)
    ctx_prior = np.zeros((len(pk) - 1, a.shape[1]))
    for i in range(len(pk) - 1):
        ctx_prior[i, c0 + i:c0 + i + 2] = np.array([1.0, -1.0]) * SMOOTHING * 128 * 128 / typical
    prior = np.vstack([prior, ctx_prior])
    a = np.vstack([a, prior])
    scale = np.where(used, np.abs(a).max(axis=0), 1.0)
    coef = nnls(a / scale, np.concatenate([np.ones(len(y)), np.zeros(len(prior))])) / scale
    coef[~used] = 0.0
    h = len(FITTED)
    head, tok, outs, ctx = coef[:h], coef[h:k0], coef[k0:k0 + len(ok)], coef[k0 + len(ok):]
    scalars: dict = {n: float(v) for n, v in zip(FITTED, head, strict=True)}
    if used[FITTED.index("per_prompt_pair_s")]:
        scalars["prompt_pair_knots"] = pk
        scalars["prompt_context_pair_s"] = _fill_unmeasured(ctx, used[k0 + len(ok):], scalars["per_attention_pair_s"])
    else:  # no prompt chunk in the samples: a decode's per-pair price applies
        scalars["per_prompt_pair_s"] = None
    if tiling:
        scalars["fa_heads"], scalars["fa_threads"] = tiling
    else:
        scalars["per_fa_tile_s"] = None
    if not graphs:
        scalars.update(dict.fromkeys(GRAPH))
    if kv_unified and kv_size and any(s.n_kv for s in shapes):
        scalars["kv_size"] = int(kv_size)
    else:
        scalars.update(dict.fromkeys(KV_RANGE))
    return TableCostModel(tk, tuple(float(v) for v in np.cumsum(tok)), ok, tuple(float(v) for v in outs),
                          **scalars, n_batch=n_batch, n_ubatch=n_ubatch, kv_unified=kv_unified,
                          name=name, meta=dict(meta or {}))


def graph_chain(plans: Sequence[tuple[StepPlan, bool]], model: TableCostModel) -> list:
    """The graph key before each of these steps, run in order on a fresh context (see backends.cost.graph)."""
    out, prev = [], None
    for plan, idle in plans:
        out.append(prev)
        prev = model.graph_after(model.shape(plan, idle), prev)
    return out


def percent_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """{"mape", "p90_abs_pct_error", "max_abs_pct_error", "bias_pct", "n"} of predictions against measurements."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if len(m) == 0:
        return {"mape": None, "p90_abs_pct_error": None, "max_abs_pct_error": None, "bias_pct": None, "n": 0}
    pct = (p - m) / m * 100.0
    return {"mape": float(np.abs(pct).mean()), "p90_abs_pct_error": float(np.percentile(np.abs(pct), 90)),
            "max_abs_pct_error": float(np.abs(pct).max()), "bias_pct": float(pct.mean()), "n": int(len(m))}
