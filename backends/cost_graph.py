"""llama.cpp's compute-graph reuse: which micro-batches build a new graph, and which reuse the last one.

llama.cpp keeps the graph of the last micro-batch (ubatch) it ran and reuses it for the next one when
that has the same shape (llm_graph_params::allow_reuse and the inputs' can_reuse): the same tokens, tokens
per sequence, sequences and their ids, output rows, and KV length n_kv, which it pads to a multiple of
256 cells (llama_kv_cache::get_n_kv). Any other ubatch builds and allocates a new graph, about 0.3 to
0.6 ms on this machine's default model. A pending KV stream copy (llama_memory_seq_cp across streams)
resets the scheduler before the next decode, so nothing is reused after one.

A graph key is a tuple; () is a ubatch whose key is not modelled (one KV stream for all sequences),
which always builds; None as the previous key means nothing to reuse (a fresh context, or a reset).
"""

from __future__ import annotations

from collections.abc import Sequence

KV_PAD = 256
STEADY = "steady"  # as the previous key: the step repeats itself (its own last ubatch's key came before)


def kv_cells(end: int) -> int:
    """n_kv of a ubatch whose sequences end (after it) at most at position end, with one KV stream each."""
    return max(KV_PAD, -(-end // KV_PAD) * KV_PAD)


def decode_key(n_seqs: int, first_slot: int, n_outputs: int, end: int) -> tuple:
    """The key of a ubatch of one token per sequence over slots first_slot .. first_slot + n_seqs - 1."""
    return (1, n_seqs, first_slot, n_outputs, kv_cells(end))


def build_s(keys: Sequence[tuple], n_seqs: Sequence[int], prev, per_build_s: float, per_build_seq_s: float) -> float:
    """Seconds of graph building for ubatches with these keys (in order) after a ubatch with key prev."""
    t = 0.0
    for key, n in zip(keys, n_seqs, strict=True):
        if not key or key != prev:
            t += per_build_s + per_build_seq_s * n
        prev = key
    return t
