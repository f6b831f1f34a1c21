"""llama.cpp's micro-batch (ubatch) split of a step, and ggml's flash-attention tiles: what the table model prices.

llama.cpp computes a batch as micro-batches (ubatches), one forward pass each. With one KV stream per
sequence (kv_unified=False, the default) it uses split_equal: a ubatch holds only a run of consecutive
sequence ids, each with the same number of tokens. So a decode batch over slots 0, 2, 4 costs three forward
passes, and decodes plus one prompt cost two. With kv_unified=True it uses split_simple: n_ubatch rows at a
time, in order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from backends.cost.graph import graph_key
from scheduler.messages import StepPlan

# ggml's CPU flash attention (ggml-cpu/common.h, GGML_FA_TILE_Q and GGML_FA_TILE_KV): query rows and KV
# positions per tile; a chunk of at least FA_Q_TILE tokens per sequence takes the tiled path
FA_Q_TILE = 64
FA_KV_TILE = 64


@dataclass(frozen=True, slots=True)
class Ubatch:
    """One forward pass: tokens, sequences, output (logits) rows, and causal attention pairs.

    attention_pairs count the query-key pairs of one-token pieces (decodes). Pieces of several tokens
    (prompt chunks, q_len tokens per sequence) count apart: context_pairs, their queries against the
    positions before the chunk, and chunk_pairs, the causal pairs within it; starts holds each sequence's
    first position in the chunk. ggml's CPU flash attention runs a chunk of 64 or more queries per
    sequence as tiles of query rows against KV tiles (see fa_tiles), so its cost follows the tiles, not
    the pairs: a profile that knows the model's heads and the threads prices it so; an older one prices
    a context pair by a table over q_len. graph is the key llama.cpp reuses its compute graph by (see
    backends.cost.graph; () when not modelled).
    """

    n_tokens: int
    n_seqs: int
    n_outputs: int
    attention_pairs: int
    q_len: int = 0
    context_pairs: int = 0
    chunk_pairs: int = 0
    starts: tuple[int, ...] = ()
    graph: tuple = field(default=(), compare=False)


def split_ubatches(plan: StepPlan, n_batch: int = 512, n_ubatch: int = 512,
                   kv_unified: bool = False) -> tuple[Ubatch, ...]:
    """The ubatches llama.cpp makes of the plan's batch (LlamaCppBackend orders chunks by slot)."""
    segs = sorted((c.slot, len(c.token_ids) + c.num_pad_tokens, len(c.token_ids) - 1 if c.sample and c.token_ids
                    else -1, c.start_pos) for c in plan.chunks if c.token_ids or c.num_pad_tokens)
    out: list[Ubatch] = []
    window: list[list[int]] = []  # [slot, count, out offset or -1, first position]
    room = n_batch
    for slot, n, o, pos in segs:  # the backend calls llama_decode once per n_batch rows
        while n:
            k = min(n, room)
            window.append([slot, k, o if 0 <= o < k else -1, pos])
            n, room, o, pos = n - k, room - k, o - k, pos + k
            if room == 0:
                out += _split_window(window, n_ubatch, kv_unified)
                window, room = [], n_batch
    if window:
        out += _split_window(window, n_ubatch, kv_unified)
    return tuple(out)


def _pairs(pos: int, k: int) -> int:
    """Sum of (p + 1) over positions pos .. pos + k - 1: query-key pairs of a causal chunk."""
    return k * pos + k * (k + 1) // 2


def _split_window(pieces: list[list[int]], n_ubatch: int, kv_unified: bool) -> list[Ubatch]:
    if kv_unified:  # split_simple: n_ubatch rows at a time, in order
        return _split_simple(pieces, n_ubatch)
    out = []
    live = [p for p in pieces if p[1]]
    while live:
        run = [live[0]]
        for p in live[1:]:  # split_equal(sequential=True): consecutive sequence ids only
            if p[0] != run[-1][0] + 1:
                break
            run.append(p)
        k = min(min(p[1] for p in run), max(1, n_ubatch // len(run)))
        starts = tuple(p[3] for p in run)
        n_out = sum(0 <= p[2] < k for p in run)
        graph = graph_key(k, len(run), run[0][0], n_out, max(starts) + k)
        pairs = 0
        for p in run:
            pairs += _pairs(p[3], k)
            p[1], p[2], p[3] = p[1] - k, p[2] - k, p[3] + k
        if k == 1:
            out.append(Ubatch(len(run), len(run), n_out, pairs, graph=graph))
        else:
            inner = len(run) * (k * (k + 1) // 2)
            out.append(Ubatch(k * len(run), len(run), n_out, 0, k, pairs - inner, inner, starts, graph))
        live = [p for p in live if p[1]]
    return out


def takes_tiled_path(u: Ubatch) -> bool:
    """True for a prompt ubatch ggml runs tiled: FA_Q_TILE or more tokens per sequence, one KV stream each
    (a one-stream ubatch carries no starts)."""
    return u.q_len >= FA_Q_TILE and bool(u.starts)


@functools.lru_cache(maxsize=4096)
def fa_tiles(q_len: int, starts: tuple[int, ...], heads: int, threads: int) -> int:
    """(query tile, KV tile) products ggml's tiled CPU flash attention runs for a chunk of q_len tokens in
    each sequence (one KV stream each) starting at positions starts, with heads query heads on threads threads.

    Replays ggml_compute_forward_flash_attn_ext_f16 (ggml-cpu/ops.cpp): the rows (token x head x stream)
    are cut into 4 x threads pieces of equal length; each piece runs tiles of up to FA_Q_TILE rows that
    stop at its end and at each head's end, and a partial tile costs a full one; each tile runs over the
    FA_KV_TILE-position KV tiles up to its last query's position (fully masked tiles are skipped). So the
    cost jumps just past every multiple of 128 tokens on 2 threads and 4 heads, not smoothly with the pairs.
    """
    nr = q_len * heads * len(starts)
    if nr <= 0:
        return 0
    size = -(-nr // (threads * 4))
    pieces = -(-nr // size)
    if threads == 1 or pieces < threads:
        pieces = threads
    per = -(-nr // pieces)
    tiles = 0
    for c in range(pieces):
        ir, end = per * c, min(per * c + per, nr)
        while ir < end:
            seq, row = divmod(ir, heads * q_len)
            iq = row % q_len
            rows = min(FA_Q_TILE, end - ir, q_len - iq)
            tiles += (starts[seq] + iq + rows - 1) // FA_KV_TILE + 1
            ir += rows
    return tiles


def _split_simple(pieces: list[list[int]], n_ubatch: int) -> list[Ubatch]:
    # one KV stream: the attention runs over the ubatch's rows together, so a prompt piece's q_len is the
    # ubatch's row count
    out, cur = [], [0, set(), 0, 0, 0, 0]  # tokens, slots, outputs, decode pairs, context pairs, chunk pairs
    for slot, n, o, pos in pieces:
        while n:
            k = min(n, n_ubatch - cur[0])
            cur[0] += k
            cur[1].add(slot)
            cur[2] += 0 <= o < k
            if k == 1:
                cur[3] += pos + 1
            else:
                cur[4] += k * pos
                cur[5] += k * (k + 1) // 2
            n, o, pos = n - k, o - k, pos + k
            if cur[0] == n_ubatch:
                out.append(_simple_ubatch(cur))
                cur = [0, set(), 0, 0, 0, 0]
    if cur[0]:
        out.append(_simple_ubatch(cur))
    return out


def _simple_ubatch(cur: list) -> Ubatch:
    prompt = cur[4] or cur[5]
    return Ubatch(cur[0], len(cur[1]), cur[2], cur[3], cur[0] if prompt else 0, cur[4], cur[5])


@dataclass(frozen=True, slots=True)
class DecodeChunk:
    """The fields split_ubatches reads, for a decode at position 0 of a slot."""

    slot: int
    token_ids: tuple[int, ...] = (0,)
    num_pad_tokens: int = 0
    sample: bool = True
    start_pos: int = 0
