"""llama.cpp's compute-graph reuse: which micro-batches build a new graph, and which reuse the last one.

llama.cpp keeps the graph of the last micro-batch (ubatch) it ran and reuses it for the next one when
that has the same shape (llm_graph_params::allow_reuse and the inputs' can_reuse): the same tokens, tokens
per sequence, sequences and their ids, output rows, and KV length n_kv, which it pads to a multiple of
256 cells (llama_kv_cache::get_n_kv). Any other ubatch builds and allocates a new graph, about 0.3 to
0.6 ms for gemma-3-270m on 2 CPU threads. A pending KV stream copy (llama_memory_seq_cp across streams)
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


def graph_key(q_len: int, n_seqs: int, first_slot: int, n_outputs: int, end: int) -> tuple:
    """The key of a ubatch of q_len tokens in each of the sequences in slots first_slot .. first_slot +
    n_seqs - 1 (one KV stream each) with n_outputs output rows, whose sequences end at most at position end."""
    return (q_len, n_seqs, first_slot, n_outputs, kv_cells(end))


def key_slots(key: tuple) -> range:
    """The slots of a ubatch with this (modelled) key."""
    return range(key[2], key[2] + key[1])


def with_end(key: tuple, end: int) -> tuple:
    """The key of the same ubatch when its sequences end at most at position end."""
    return key[:4] + (kv_cells(end),)


def builds(keys: Sequence[tuple], prev) -> list[bool]:
    """For ubatches with these keys (in order) after a ubatch with key prev: which build a new graph."""
    out = []
    for key in keys:
        out.append(not key or key != prev)
        prev = key
    return out


def build_s(keys: Sequence[tuple], n_seqs: Sequence[int], prev, per_build_s: float, per_build_seq_s: float) -> float:
    """Seconds of graph building for ubatches with these keys (in order) after a ubatch with key prev."""
    t = 0.0
    for built, n in zip(builds(keys, prev), n_seqs, strict=True):
        if built:
            t += per_build_s + per_build_seq_s * n
    return t
