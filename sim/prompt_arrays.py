"""Prompts that are consecutive pieces of one id array, and the scheduler's prefix-block hashes of all of
them at once, computed on the array.

scheduler.kv.KVPool.chain_hashes hashes a prompt's full blocks as a chain of Python hashes:
h_0 = hash((ROOT_HASH, block_0)), h_j = hash((h_{j-1}, block_j)), each block a tuple of ints. Made
into tuples and hashed one prompt at a time, a trace's ~10^7 prompt tokens take most of a second.
Here CPython's own hash functions run on uint64 arrays instead: the tuple hash (xxHash lanes) of every
block of every prompt, one token position at a time, then the chains, one block depth at a time
across all prompts. The values are the ones KVPool.chain_hashes gives, so prefix-sharing decisions
are the same either way; where this Python hashes otherwise, chain_hashes returns None and the
scheduler hashes the tuples.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from scheduler.kv import ROOT_HASH, KVPool
from sim.workload import TokenArray

_U = np.uint64
_MASK = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261  # CPython's _PyHASH_XXPRIME_*
_MODULUS = (1 << 61) - 1  # CPython's int hash: the value modulo 2**61 - 1, keeping its sign
_ALL_ONES = _U(_MASK)  # -1: CPython gives a tuple whose hash comes out as -1 this hash instead
_MINUS_ONE_FIX = _U(1546275796)
_PIECE = 1 << 16  # blocks hashed at once: bounds the temporary arrays (a few MB)


def _tail(length: int) -> np.uint64:
    """What CPython adds to a tuple hash for the tuple's length."""
    return _U(length ^ (_P5 ^ 3527539))


def _round(acc: np.ndarray, lane: np.ndarray, tmp: np.ndarray) -> None:
    """One xxHash round of the tuple hash, in place: acc = rotl(acc + lane * P2, 31) * P1."""
    np.multiply(lane, _U(_P2), out=tmp, casting="unsafe")
    acc += tmp
    np.left_shift(acc, _U(31), out=tmp)
    acc >>= _U(33)
    acc |= tmp
    acc *= _U(_P1)


def _finish(acc: np.ndarray, length: int) -> np.ndarray:
    acc += _tail(length)
    acc[acc == _ALL_ONES] = _MINUS_ONE_FIX
    return acc


def _int_lanes(values: np.ndarray) -> np.ndarray:
    """hash(v) of int64 values, as uint64 (two's complement): |v| mod 2**61 - 1 with v's sign, -1 made -2."""
    neg = values < 0
    mag = values.view(_U)
    mag = np.where(neg, -mag, mag)  # uint64 negation wraps: |v| for a negative v, 2**63 included
    lanes = mag % _U(_MODULUS)
    lanes = np.where(neg, -lanes, lanes)
    lanes[lanes == _ALL_ONES] -= _U(1)
    return lanes


def _block_hashes(blocks: np.ndarray) -> np.ndarray:
    """hash(tuple(row)) of every row of an int array, as uint64."""
    n, width = blocks.shape
    if blocks.dtype.kind != "u" or blocks.dtype.itemsize > 4:  # small unsigned ids hash to themselves
        blocks = _int_lanes(blocks.astype(np.int64)).reshape(n, width)
    acc = np.full(n, _P5, dtype=_U)
    tmp = np.empty(n, dtype=_U)
    for k in range(width):
        _round(acc, blocks[:, k], tmp)
    return _finish(acc, width)


def _chains(block_hashes: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """hash((parent, block)) chained along each prompt's blocks (prompt i: offsets[i], counts[i] of them)."""
    out = np.empty(len(block_hashes), dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # longest first: the prompts still going are a prefix
    first = offsets[:-1][order]
    parent = np.full(len(counts), ROOT_HASH, dtype=np.int64)
    depth = int(counts[order[0]]) if len(counts) else 0
    going = np.searchsorted(-counts[order], -np.arange(depth), side="left").tolist()  # prompts with > d blocks
    acc_all = np.empty(len(counts), dtype=_U)
    tmp_all = np.empty(len(counts), dtype=_U)
    for d in range(depth):
        c = going[d]
        at = first[:c] + d
        acc, tmp = acc_all[:c], tmp_all[:c]
        acc.fill(_P5)
        _round(acc, _int_lanes(parent[:c]), tmp)
        _round(acc, block_hashes[at], tmp)
        hashes = _finish(acc, 2).view(np.int64)
        out[at] = hashes
        parent[:c] = hashes
    return out


class PromptArrays:
    """Prompts as consecutive pieces of one array of non-negative token ids (a trace's generated prompts).

    prompt(i) is the i-th as a TokenArray view; the first time one is asked for its prefix hashes for a
    block size, those of every prompt are computed for it.
    """

    __slots__ = ("ids", "lengths", "_starts", "_hashes")

    def __init__(self, ids: np.ndarray, lengths: list[int]) -> None:
        self.ids, self.lengths = ids, list(lengths)
        ends = np.cumsum(np.asarray(self.lengths, dtype=np.int64))
        self._starts = (ends - np.asarray(self.lengths, dtype=np.int64)).tolist()
        self._hashes: dict[int, tuple[np.ndarray, list[int]] | None] = {}  # block size -> chain_hashes(...)

    def __reduce__(self):
        return PromptArrays, (self.ids, self.lengths)  # the hashes are made again where they are needed

    def forget_hashes(self) -> None:
        """Drop the prefix hashes (8 bytes a block) until they are asked for again, e.g. once a run is over."""
        self._hashes = {}

    def prompt(self, i: int) -> TokenArray:
        """The i-th prompt."""
        start = self._starts[i]
        return TokenArray(self.ids[start : start + self.lengths[i]], self, i)

    def prefix_hashes(self, i: int, block_size: int, max_blocks: int) -> list[int] | None:
        """KVPool.chain_hashes(prompt i, max_blocks) for a pool of that block size (None where they cannot
        be computed here)."""
        if block_size not in self._hashes:
            self._hashes[block_size] = chain_hashes(self.ids, self._starts, self.lengths, block_size)
        made = self._hashes[block_size]
        if made is None:
            return None
        hashes, offsets = made
        start = offsets[i]
        return hashes[start : start + max(0, min(max_blocks, offsets[i + 1] - start))].tolist()


def forget_prefix_hashes(prompts: Iterable) -> None:
    """forget_hashes() on the PromptArrays that own any of these prompts."""
    owners = {id(o): o for o in (getattr(p, "owner", None) for p in prompts) if o is not None}
    for owner in owners.values():
        owner.forget_hashes()


def chain_hashes(ids: np.ndarray, starts: Sequence[int], lengths: Sequence[int],
                 block_size: int) -> tuple[np.ndarray, list[int]] | None:
    """(hashes, offsets): hashes[offsets[i]:offsets[i + 1]] are KVPool.chain_hashes of the full blocks of
    prompt i, ids[starts[i] : starts[i] + lengths[i]] (ids non-negative ints); None where this Python's
    hashes differ from the ones replayed here."""
    if not _agrees():
        return None
    counts = np.asarray(lengths, dtype=np.int64) // block_size
    starts = np.asarray(starts, dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    block_hashes = np.empty(int(offsets[-1]), dtype=_U)
    ends = (starts + counts * block_size).tolist()
    starts_list = starts.tolist()
    i, n = 0, len(counts)
    while i < n:  # prompts in groups of about _PIECE blocks: their full blocks as rows of one array
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + _PIECE, side="right")) - 1)
        j = min(j, n)
        rows = np.concatenate([ids[a:b] for a, b in zip(starts_list[i:j], ends[i:j], strict=True)])
        block_hashes[offsets[i] : offsets[j]] = _block_hashes(rows.reshape(-1, block_size))
        i = j
    return _chains(block_hashes, offsets, counts), offsets.tolist()


@functools.cache
def _agrees() -> bool:
    """Whether the arrays hash as this Python does (CPython's 64-bit hashes), checked on a sample."""
    if sys.hash_info.width != 64 or sys.hash_info.modulus != _MODULUS:
        return False
    sample = np.random.default_rng(0).integers(0, 1 << 16, size=8 * 3 + 5).astype(np.uint16)
    wide = np.array([0, 1, 2, 3, (1 << 61) - 1, 1 << 61, 1 << 62, 12345], dtype=np.int64)
    pool = KVPool(1, 8, 1)
    for ids in (sample, wide):
        want = pool.chain_hashes(tuple(ids.tolist()), len(ids) // 8)
        got = _chains(_block_hashes(ids[: len(ids) // 8 * 8].reshape(-1, 8)), np.array([0, len(want)]),
                      np.array([len(want)]))
        if got.tolist() != want:
            return False
    return True
