"""A cost model that replays llama.cpp's micro-batch split and prices each micro-batch from tables (kind "table").

The split is backends.cost.ubatch's. Each ubatch is priced by two piecewise-linear tables: a non-decreasing
one over its tokens (layer compute plus the pass's fixed cost) and a free one with a value for every
output-row count (vocabulary projection and sampling; measured on gemma-3-270m, 8, 12 and 16 rows cost less
than 7, 11 and 15), plus attention: a decode's query-key pairs, and a prompt chunk's either as pairs (within
the chunk, and against the context before it at a price per pair that depends on the chunk's length) or, for
chunks long enough for ggml's tiled flash attention, as the tiles it runs (see fa_tiles); and the step's own
work: per step, per chunk, per KV op and copied token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from backends.cost.base import (
    MIN_STEP_S,
    CostModelError,
    PricesAfterIdle,
    PricesStepAfter,
    StepFeatures,
    floor_time,
)
from backends.cost.graph import KV_PAD, STEADY, build_s, graph_key, key_slots, with_end
from backends.cost.knots import default_knots, interp, interp_clamped, interp_free, knot_value, output_knots
from backends.cost.kvcells import UnifiedKV, compact_n_kv
from backends.cost.table_params import check_model, from_params, to_params
from backends.cost.ubatch import DecodeChunk, Ubatch, fa_tiles, split_ubatches, takes_tiled_path
from scheduler.messages import StepPlan


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the table model prices: the step's ubatches and its per-step counts."""

    ubatches: tuple[Ubatch, ...]
    num_chunks: int = 0
    num_removes: int = 0
    num_copies: int = 0
    num_copied_tokens: int = 0
    after_idle: bool = False  # the engine waited for work before this step
    has_prefill: bool = False  # some chunk carries prompt tokens (priced with prefill_run_factor)
    resets_graph: bool = False  # a prefix copy ran first: llama.cpp reuses no graph after it
    # one unified KV stream: the KV range (n_kv cells) each ubatch attended over (backends.cost.kvcells), in
    # order; () when unknown (a profile with KV-range prices then assumes the step's own sequences, packed)
    n_kv: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when the step runs no batch and no KV operation."""
        return not (self.ubatches or self.num_chunks or self.num_removes or self.num_copies)


@dataclass(frozen=True)
class TableCostModel:
    """t = per-step terms + sum over llama.cpp ubatches of token table + output table + attention."""

    ubatch_tokens: tuple[int, ...] = default_knots(512)
    ubatch_token_s: tuple[float, ...] = (0.0,) * len(default_knots(512))
    ubatch_outputs: tuple[int, ...] = output_knots(16)
    ubatch_output_s: tuple[float, ...] = (0.0,) * 16
    step_s: float = 0.0
    per_chunk_s: float = 0.0
    per_remove_s: float = 0.0
    per_copy_s: float = 0.0
    per_copied_token_s: float = 0.0
    per_attention_pair_s: float = 0.0  # per query-key pair of a decode (one-token piece)
    idle_wakeup_s: float = 0.0  # extra time of the first step after the engine idled (threads and caches wake)
    # the same by how long the engine idled, when measured: ((idle seconds, extra seconds), ...) in rising idle
    # order (see wakeup_from_curve); empty: idle_wakeup_s whatever the wait
    idle_wakeup_curve: tuple[tuple[float, float], ...] = ()
    # a step's price times this: what a real-time serving run adds to the calibration grid's step times
    # (the driver's own work between steps, occasional slow steps), fitted on a short real-time probe run;
    # run_factor for steps of decodes only, prefill_run_factor (None: run_factor) for steps with prompt tokens
    run_factor: float = 1.0
    prefill_run_factor: float | None = None
    # a step of decodes only, by its number of sequences B: ((B, factor), ...) in rising B, in place of
    # run_factor (linear between the knots, flat beyond them); empty: run_factor for every B. A machine's speed
    # does not move all step shapes alike (measured once on a 2-vCPU VM: B = 2 decodes at x0.85 of their price,
    # B = 16 at x0.92), so one factor fitted on a probe's mix of batch sizes misprices a run with another mix
    decode_batch_factors: tuple[tuple[int, float], ...] = ()
    # a prompt chunk's attention (see Ubatch): per pair within the chunk, and per pair against the context
    # before it, a free table over the chunk's tokens per sequence; None (older profiles): per_attention_pair_s
    per_prompt_pair_s: float | None = None
    prompt_pair_knots: tuple[int, ...] | None = None
    prompt_context_pair_s: tuple[float, ...] | None = None
    # ggml's tiled flash attention (see fa_tiles): seconds per tile, the model's query heads and the
    # threads; set together (None: older profiles price a long chunk's attention by its pairs)
    per_fa_tile_s: float | None = None
    fa_heads: int | None = None
    fa_threads: int | None = None
    # llama.cpp's graph reuse (see backends.cost.graph): seconds per ubatch that builds a new graph, and per
    # sequence in it; None (older profiles): no ubatch is priced apart for it
    per_graph_build_s: float | None = None
    per_graph_build_seq_s: float | None = None
    # one unified KV stream (see backends.cost.kvcells): seconds per ubatch per cell of its KV range n_kv, and
    # per token x cell (the attention and the host's KQ mask over the range), with kv_size, the stream's cells;
    # set together, kv_unified only (None: older profiles price attention by the sequences' own positions)
    per_kv_cell_s: float | None = None
    per_kv_token_cell_s: float | None = None
    kv_size: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    kv_unified: bool = False
    name: str = "table"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_model(self)

    # -- pricing ------------------------------------------------------------------
    def shape(self, plan: StepPlan, after_idle: bool = False, n_kv: tuple[int, ...] = ()) -> StepShape:
        """The plan's ubatches (as llama.cpp splits them) and per-step counts; n_kv: each ubatch's KV range,
        when known (UnifiedKV.run_plan)."""
        return StepShape(split_ubatches(plan, self.n_batch, self.n_ubatch, self.kv_unified), len(plan.chunks),
                         len(plan.removes), len(plan.copies), plan.num_copied_tokens, after_idle,
                         plan.num_prefill_tokens > 0, bool(plan.copies), n_kv)

    @property
    def tracks_kv_cells(self) -> bool:
        """True when a step's price depends on the unified KV stream's cells, which the steps before it left
        (step_after carries a UnifiedKV): such a model cannot price a stretch of steps from their slots alone."""
        return self.kv_size is not None

    def kv_range_s(self, shape: StepShape) -> float:
        """Seconds of the ubatches' work over their KV ranges (0 without KV-range prices; a shape without
        n_kv: the smallest range, 256 cells)."""
        if self.kv_size is None or not shape.ubatches:
            return 0.0
        cells, token_cells = kv_range_counts(shape.ubatches, shape.n_kv or (KV_PAD,))
        return self.per_kv_cell_s * cells + self.per_kv_token_cell_s * token_cells

    def price(self, shape: StepShape, prev_graph=STEADY) -> float:
        """Seconds for a step of this shape after a ubatch of graph key prev_graph (see backends.cost.graph;
        the default, STEADY, prices the step as if it followed itself)."""
        if shape.is_empty:
            return 0.0
        base_s = self.fixed_s(shape) + self.graph_build_s(shape, prev_graph)
        pairs = sum(u.attention_pairs for u in shape.ubatches)
        return self.total_s(base_s, pairs, self.factor(shape.has_prefill, shape.num_chunks))

    def fixed_s(self, shape: StepShape) -> float:
        """The step's seconds before graph building, decode attention and the run factor: the per-step terms,
        each ubatch's token and output tables, and its prompt-chunk attention. Every pricing path (price, and
        the fast-forward's decode_pricer and decode_stretch) starts from this one sum."""
        t = (self.step_s + self.per_chunk_s * shape.num_chunks + self.per_remove_s * shape.num_removes
             + self.per_copy_s * shape.num_copies + self.per_copied_token_s * shape.num_copied_tokens
             + self.idle_wakeup_s * shape.after_idle)
        for u in shape.ubatches:
            t += (interp(u.n_tokens, self.ubatch_tokens, self.ubatch_token_s)
                  + interp_free(u.n_outputs, self.ubatch_outputs, self.ubatch_output_s))
            if u.q_len:
                t += self.prompt_attention_s(u)
        return t + self.kv_range_s(shape)

    def total_s(self, base_s: float, pairs: int, factor: float) -> float:
        """A non-empty step's seconds from its fixed part plus graph building (base_s) and its decodes'
        attention pairs: the pairs come last, as one product of their integer total, so a fast-forward that
        holds base_s for a stretch of steps computes the same float as price()."""
        return max((base_s + self.per_attention_pair_s * pairs) * factor, MIN_STEP_S)

    def graph_build_s(self, shape: StepShape, prev_graph=STEADY) -> float:
        """Seconds the step's ubatches spend building compute graphs llama.cpp could not reuse."""
        if self.per_graph_build_s is None or not shape.ubatches:
            return 0.0
        keys = [u.graph for u in shape.ubatches]
        prev = None if shape.resets_graph else keys[-1] if prev_graph == STEADY else prev_graph
        return build_s(keys, [u.n_seqs for u in shape.ubatches], prev, self.per_graph_build_s,
                       self.per_graph_build_seq_s)

    @staticmethod
    def graph_after(shape: StepShape, prev_graph) -> tuple | None:
        """The graph key llama.cpp holds after the step (None: nothing to reuse)."""
        if shape.ubatches:
            return shape.ubatches[-1].graph
        return None if shape.resets_graph else prev_graph

    def step_after(self, plan: StepPlan, prev_graph, after_idle: bool = False) -> tuple[float, Any]:
        """(seconds, graph key after it) of the step following a ubatch of graph key prev_graph. A model with
        KV-range prices carries the unified stream's cells instead (a UnifiedKV, updated in place; a fresh one
        when prev_graph is not one)."""
        if self.kv_size is not None:
            cells = prev_graph if isinstance(prev_graph, UnifiedKV) else UnifiedKV(self.kv_size)
            try:
                n_kv = cells.run_plan(plan, self.n_batch, self.n_ubatch)
            except ValueError as exc:  # the scheduler's KV limit is not this context's
                raise CostModelError(f"cost model {self.name!r}: {exc} of its unified KV stream ({self.kv_size} "
                                     f"cells): give --kv-tokens {self.kv_size} or fewer, or a profile calibrated "
                                     "on a larger context") from None
            return self.price(self.shape(plan, after_idle, n_kv)), cells
        shape = self.shape(plan, after_idle)
        return self.price(shape, prev_graph), self.graph_after(shape, prev_graph)

    def tiled(self, u: Ubatch) -> bool:
        """True when the profile prices this prompt ubatch's attention by ggml's flash-attention tiles."""
        return self.per_fa_tile_s is not None and takes_tiled_path(u)

    def prompt_attention_s(self, u: Ubatch) -> float:
        """Seconds of a ubatch's prompt-chunk attention: its tiles, or its pairs (within the chunks and
        against their context)."""
        if self.tiled(u):
            return self.per_fa_tile_s * fa_tiles(u.q_len, u.starts, self.fa_heads, self.fa_threads)
        if self.prompt_pair_knots is None:
            return self.per_attention_pair_s * (u.context_pairs + u.chunk_pairs)
        per_context = interp_clamped(u.q_len, self.prompt_pair_knots, self.prompt_context_pair_s)
        return self.per_prompt_pair_s * u.chunk_pairs + per_context * u.context_pairs


    def factor(self, has_prefill: bool, num_seqs: int = 0) -> float:
        """The run factor of a step with (True) or without prompt tokens; a step of decodes only over num_seqs
        sequences takes decode_batch_factors' when the model has them."""
        if has_prefill:
            return self.run_factor if self.prefill_run_factor is None else self.prefill_run_factor
        if self.decode_batch_factors and num_seqs:
            return knot_value(num_seqs, self.decode_batch_factors)
        return self.run_factor

    def scaled(self, decode: float, prompt: float) -> TableCostModel:
        """The model with its decode-only factors (run_factor and each of decode_batch_factors) times decode and
        its factor for steps with prompt tokens times prompt, each clamped to [0.5, 2]."""
        def clamp(f: float) -> float:
            return min(max(f, 0.5), 2.0)
        return replace(self, run_factor=clamp(self.run_factor * decode),
                       prefill_run_factor=clamp(self.factor(True) * prompt),
                       decode_batch_factors=tuple((b, clamp(f * decode)) for b, f in self.decode_batch_factors))

    def grid(self) -> TableCostModel:
        """The calibration grid's prices: every run factor set aside (run_factor 1, no prefill_run_factor, no
        decode_batch_factors). Probes fit their factors against these."""
        return replace(self, run_factor=1.0, prefill_run_factor=None, decode_batch_factors=())

    def step_time_s(self, plan: StepPlan) -> float:
        """Seconds the plan's step takes (0 for an empty plan) when the engine was busy before it."""
        return self.time_s(plan)

    def time_s(self, plan: StepPlan, after_idle: bool = False, prev_graph=STEADY, n_kv: tuple[int, ...] = ()) -> float:
        """Seconds of the step; after_idle adds the wake-up of a step that follows an idle engine, prev_graph
        is the graph key before it (default: the step follows itself), n_kv its ubatches' KV ranges if known."""
        if self.kv_size is not None and not n_kv:
            n_kv = compact_n_kv(plan, self.kv_size)
        return self.price(self.shape(plan, after_idle, n_kv), prev_graph)

    def decode_pricer(self, slots: Sequence[int]) -> Callable[[int], float]:
        """price(num_context_tokens): the price() of a pure-decode step over these slots, for drivers that skip
        ahead over decode-only stretches knowing the running slots and the summed context but not each plan."""
        shape = self.decode_shape(slots, (1,) * len(slots))
        if not shape.ubatches:
            return lambda ctx: 0.0
        base_s = self.fixed_s(shape) + self.graph_build_s(shape)
        factor, total_s = self.factor(False, len(slots)), self.total_s
        return lambda ctx: total_s(base_s, ctx, factor)

    def decode_shape(self, slots: Sequence[int], ends: Sequence[int]) -> StepShape:
        """The shape of a pure-decode step over these slots whose sequences end at ends (after it)."""
        chunks = tuple(DecodeChunk(s, start_pos=e - 1) for s, e in zip(slots, ends, strict=True))
        ubatches = split_ubatches(StepPlan(0, 0.0, chunks), self.n_batch, self.n_ubatch, self.kv_unified)
        return StepShape(ubatches, len(chunks))

    def decode_stretch(self, slots: Sequence[int], ends: Sequence[int], prev_graph) -> DecodeStretch:
        """Pure-decode steps over sorted slots whose sequences end at ends (after step 0) and grow by one a
        step, after a ubatch of graph key prev_graph: each step's price, as step_after gives it, bit for bit."""
        return DecodeStretch(self, tuple(slots), tuple(ends), prev_graph)

    def predict_s(self, feats: StepFeatures) -> float:
        """Seconds from counters alone (no slots): decodes as one ubatch, each prefill chunk as its own."""
        ubatches = []
        if feats.num_decode_seqs:
            n = feats.num_decode_seqs
            ubatches.append(Ubatch(n, n, n, feats.num_context_tokens - _prefill_context(feats),
                                   graph=graph_key(1, n, 0, n, 1)))  # a decode ubatch reuses its graph
        num_prefill_chunks = max(0, feats.num_seqs - feats.num_decode_seqs)
        if feats.num_prefill_tokens:
            k = max(1, num_prefill_chunks)
            per = -(-feats.num_prefill_tokens // k)
            inner = per * (per + 1) // 2
            context = max(0, feats.sum_sq_prefill_tokens // k - per * per)
            ubatches += [Ubatch(per, 1, 1, 0, per, context, inner, (context // per,))] * k
        shape = StepShape(tuple(ubatches), feats.num_seqs, feats.num_removes, feats.num_copies,
                          feats.num_copied_tokens, has_prefill=feats.num_prefill_tokens > 0)
        return floor_time(feats, self.price(shape))

    # -- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """{"kind": "table", "params", "meta"}."""
        return {"kind": "table", "params": to_params(self), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, params: object, meta: dict, name: str, source: str) -> TableCostModel:
        """Build from a JSON params object; source names the file in errors."""
        try:
            return cls(**from_params(params, source), name=name, meta=meta)
        except CostModelError as exc:
            raise CostModelError(f"{source}: {exc}") from None

    def describe(self) -> str:
        """One line: decode-like ubatch costs at a few sizes, and the held-out fit quality if known."""
        pts = ", ".join(f"{n}:{self.price(StepShape((Ubatch(n, n, n, 0, graph=graph_key(1, n, 0, n, 1)),))) * 1e3:.1f}"
                        for n in (1, 4, 16))
        fit = self.meta.get("fit", {}).get("held_out", {})
        quality = f", held-out MAPE {fit['mape']:.1f}% (n={fit['n']})" if {"mape", "n"} <= set(fit) else ""
        pf = self.prefill_run_factor
        prefill = "" if pf is None else f" (steps with prompt tokens x{pf:.3f})"
        if self.decode_batch_factors:
            prefill += f"; decodes by batch size: {describe_batch_factors(self.decode_batch_factors)}"
        tiles = ("" if self.per_fa_tile_s is None else
                 f" + {self.per_fa_tile_s * 1e3:.3f} ms/flash-attention tile ({self.fa_heads} heads, "
                 f"{self.fa_threads} threads)")
        graphs = ("" if self.per_graph_build_s is None else
                  f" + {self.per_graph_build_s * 1e3:.3f} ms (+ {self.per_graph_build_seq_s * 1e3:.3f} ms/seq) per "
                  f"graph built")
        if self.kv_size is not None:
            graphs += (f" + KV range n_kv: {self.per_kv_cell_s * 1e9:.2f} ns/cell + "
                       f"{self.per_kv_token_cell_s * 1e9:.3f} ns/token x cell per ubatch ({self.kv_size} cells)")
        return (f"table '{self.name}': per-ubatch tables (decode ubatch of B seqs, ms: {pts}) + "
                f"{self.step_s * 1e3:.2f} ms/step + {self.per_chunk_s * 1e3:.3f} ms/chunk{tiles}{graphs}, "
                f"kv_unified={self.kv_unified}, run factor x{self.run_factor:.3f}{prefill}{quality}")


class DecodeStretch:
    """price(i, ctx): step i of a stretch of pure-decode steps over fixed slots (TableCostModel.decode_stretch).

    Only the graph building changes from step to step: a step of several ubatches builds all of them
    (their keys differ in their first slot); a step of one reuses its graph except when its KV length
    grows past a multiple of 256 cells. Step 0 compares with the key before the stretch.
    """

    __slots__ = ("total_s", "f", "first", "steady", "every", "cross", "last", "last_end")

    def __init__(self, model: TableCostModel, slots: tuple[int, ...], ends: tuple[int, ...], prev_graph) -> None:
        shape = model.decode_shape(slots, ends)
        fixed_s, ubatches = model.fixed_s(shape), shape.ubatches
        self.total_s, self.f = model.total_s, model.factor(False, len(slots))
        # fixed part plus graph building, for step 0, a step that reuses its graph, and one where every ubatch builds
        self.first = fixed_s + model.graph_build_s(shape, prev_graph)
        self.steady = fixed_s + model.graph_build_s(shape)
        self.every = fixed_s + model.graph_build_s(shape, None)
        self.last = ubatches[-1].graph if ubatches else prev_graph
        end = {s: e for s, e in zip(slots, ends, strict=True)}
        # the last ubatch's sequences' longest end: its KV length after step i is kv_cells(last_end + i)
        self.last_end = max(end[s] for s in key_slots(self.last)) if self.last else 0
        # one ubatch: the steps i >= 1 at which it crosses a multiple of 256 cells, cross + 256 t
        self.cross = -(-self.last_end // KV_PAD) * KV_PAD + 1 - self.last_end if len(ubatches) == 1 and self.last else 0

    def price(self, i: int, ctx: int) -> float:
        """Seconds of step i (0 first) with num_context_tokens ctx."""
        if i == 0:
            base_s = self.first
        elif self.cross and i >= self.cross and (i - self.cross) % KV_PAD == 0:
            base_s = self.every
        else:
            base_s = self.steady
        return self.total_s(base_s, ctx, self.f)

    def graph_after(self, i: int) -> tuple | None:
        """The graph key after step i."""
        if not self.last:
            return self.last
        return with_end(self.last, self.last_end + i)


def kv_range_counts(ubatches: Sequence[Ubatch], n_kv: Sequence[int]) -> tuple[int, int]:
    """(sum of n_kv, sum of tokens x n_kv) over the ubatches, n_kv[i] the range of ubatch i (the last value for
    any ubatch past its end): what the KV-range prices multiply."""
    cells = token_cells = 0
    for i, u in enumerate(ubatches):
        n = n_kv[min(i, len(n_kv) - 1)]
        cells += n
        token_cells += u.n_tokens * n
    return cells, token_cells


def _prefill_context(f: StepFeatures) -> int:
    # decode context = all context minus the prefill chunks' ends; sum_sq bounds those ends from below
    return min(f.num_context_tokens, f.num_prefill_tokens) if f.num_prefill_tokens else 0


def describe_batch_factors(knots: Sequence[Sequence[float]]) -> str:
    """'x0.917 at B=1, x0.859 at B=2, ...' for decode_batch_factors."""
    return ", ".join(f"x{f:.3f} at B={b}" for b, f in knots)


def price_run(model, steps: Sequence[tuple[StepPlan, bool]]) -> list[float]:
    """Each step's seconds, the steps run in this order on one fresh context: a table model carries
    llama.cpp's graph from step to step; another prices each step alone."""
    if not isinstance(model, PricesStepAfter):
        price = model.time_s if isinstance(model, PricesAfterIdle) else (lambda p, _idle: model.step_time_s(p))
        return [price(plan, idle) for plan, idle in steps]
    out, graph = [], None
    for plan, idle in steps:
        t, graph = model.step_after(plan, graph, idle)
        out.append(t)
    return out
